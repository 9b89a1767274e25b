//! The lab's agents: started per node, and waited for until they enforce a digest.

use crate::lab::{Enforcer, Paths, BRIDGE};
use anyhow::bail;
use anyhow::Context;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// Starts a node's enforcer (netpol's agent, the iptables or the nftables one) with a thread that
/// reaps it, so its exit is logged when it happens.
pub(super) fn spawn_agent(mut cmd: Command, index: u32, log_path: &Path) -> anyhow::Result<Agent> {
    let mut child = cmd.spawn().context("starting the agent")?;
    // `ip netns exec` execs the command, so this pid is the agent's.
    let pid = child.id();
    tracing::info!(node = index, pid, log = %log_path.display(), "agent started");
    let exited = Arc::new((Mutex::new(false), Condvar::new()));
    let flag = exited.clone();
    std::thread::spawn(move || {
        match child.wait() {
            Ok(status) => tracing::warn!(pid, %status, "agent exited"),
            Err(e) => tracing::error!(pid, error = ?e, "waiting for the agent failed"),
        }
        *flag.0.lock().unwrap() = true;
        flag.1.notify_all();
    });
    Ok(Agent { pid, exited })
}

/// Waits for every node's agent to converge to `digest` (one after the other: they
/// converge independently, so this costs the slowest of them).
pub(super) async fn agents_wait(lab: &Shared, paths: &Paths, digest: &str) -> anyhow::Result<()> {
    let (nodes, enforcer) = {
        let lab = lab.lock().unwrap();
        (lab.nodes.len() as u32, lab.enforcer)
    };
    if enforcer == Enforcer::None {
        // Nothing enforces: the lab is what the manifests say once reconciled.
        return Ok(());
    }
    for n in 0..nodes {
        agent_wait(lab, paths, digest, n).await?;
    }
    Ok(())
}

/// Waits for node `index`'s agent to converge to `digest`, giving it time to open its
/// socket.
pub(super) async fn agent_wait(
    lab: &Shared,
    paths: &Paths,
    digest: &str,
    index: u32,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + AGENT_START;
    let sock = paths.agent_sock_of(index);
    let log_path = paths.agent_log_of(index);
    let status = loop {
        match netpol_agent::api::client::wait(&sock, digest).await {
            Ok(status) => break status,
            Err(e) => {
                let agent_gone = lab.lock().unwrap().nodes[index as usize]
                    .agent
                    .as_ref()
                    .is_none_or(Agent::has_exited);
                if agent_gone {
                    bail!(
                        "the agent of node{index} is not running; {}:\n{}",
                        log_path.display(),
                        crate::lab::tail(&log_path, 20)
                    );
                }
                // Only "not listening yet" is worth waiting for.
                let not_yet = e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>().is_some_and(|io| {
                        matches!(
                            io.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        )
                    })
                });
                if !not_yet || Instant::now() > deadline {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    if !status.converged {
        bail!(
            "the agent of node{index} has not converged (pods without a veth: {:?}); see {}",
            status.pending,
            log_path.display()
        );
    }
    Ok(())
}

impl Lab {
    pub(super) fn start_agent(&self, index: u32) -> anyhow::Result<Agent> {
        let sock = self.paths.agent_sock_of(index);
        let log_path = self.paths.agent_log_of(index);
        let _ = std::fs::remove_file(&sock);
        let log_file = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let rule_based = match self.enforcer {
            Enforcer::Iptables => Some("iptables-agent"),
            Enforcer::Nftables => Some("nftables-agent"),
            Enforcer::None | Enforcer::Netpol => None,
        };
        if let Some(agent) = rule_based {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &self.nodes[index as usize].net.netns])
                .arg(&self.netpol_bin)
                .args(["lab", agent, "--source"])
                .arg(format!("dir:{}", self.paths.cluster.display()))
                .args(["--node", &crate::lab::node_name(index), "--api-socket"])
                .arg(&sock)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file);
            return spawn_agent(cmd, index, &log_path);
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.nodes[index as usize].net.netns])
            .arg(&self.netpol_bin)
            .arg("agent")
            .arg("--source")
            .arg(format!("dir:{}", self.paths.cluster.display()))
            .args([
                "--node",
                &crate::lab::node_name(index),
                "--bridge",
                BRIDGE,
                "--api-socket",
            ])
            .arg(&sock)
            .arg("--pin-root")
            .arg(crate::lab::pin_root_of(&self.name, index))
            // The Service hooks: to_remote on every way off the node (found by the
            // agent itself), local_in on the lab's cgroup tree.
            .arg("--cgroup")
            .arg(crate::lab::cgroup_root(&self.name))
            .args(&self.agent_args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        spawn_agent(cmd, index, &log_path)
    }
}

//! The lab itself: built from its options, its nodes set up and torn down, its status.

use crate::lab::kubeproxy::ClusterIps;
use crate::lab::netns::{self, NodeNet};
use crate::lab::{LabState, LabStatus, NodeStatus, Paths, PodStatus, UpOptions, BRIDGE};
use anyhow::bail;
use anyhow::Context;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use super::*;

impl Lab {
    pub(super) fn new(opts: &UpOptions) -> anyhow::Result<Lab> {
        let cidr = PodCidr::parse(&opts.pod_cidr)?;
        let mut nodes = Vec::new();
        for index in 0..opts.nodes.max(1) {
            let node_cidr = cidr.nth(index)?;
            nodes.push(LabNode {
                net: NodeNet {
                    index,
                    netns: crate::lab::node_netns_of(&opts.name, index),
                    network: node_cidr.network(),
                    prefix: node_cidr.prefix(),
                    underlay_ip: Ipv4Addr::new(172, 30, 0, 2 + index as u8),
                },
                cidr: node_cidr,
                pool: IpPool::new(node_cidr),
                agent: None,
                nat: String::new(),
            });
        }
        Ok(Lab {
            name: opts.name.clone(),
            paths: Paths::new(&opts.name),
            manifests: opts.manifests.clone(),
            netpol_bin: opts.netpol_bin.clone(),
            agent_args: opts.agent_args.clone(),
            cidr,
            nodes,
            dns: opts.dns,
            enforcer: opts.enforcer,
            pods: BTreeMap::new(),
            cluster_ips: ClusterIps::default(),
            services: Vec::new(),
            last_errors: Vec::new(),
        })
    }

    pub(super) fn multi_node(&self) -> bool {
        self.nodes.len() > 1
    }

    pub(super) fn status(&self) -> LabStatus {
        LabStatus {
            name: self.name.clone(),
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeStatus {
                    name: crate::lab::node_name(n.net.index),
                    netns: n.net.netns.clone(),
                    agent_pid: n.agent.as_ref().map(|a| a.pid),
                    pod_cidr: format!("{}/{}", n.cidr.network(), n.cidr.prefix()),
                    underlay_ip: self.multi_node().then(|| n.net.underlay_ip.to_string()),
                })
                .collect(),
            services: self.services.clone(),
            pods: self
                .pods
                .iter()
                .map(|((ns, name), p)| PodStatus {
                    namespace: ns.clone(),
                    name: name.clone(),
                    node: crate::lab::node_name(p.node),
                    ips: p.ips().iter().map(ToString::to_string).collect(),
                    netns: p.netns.clone(),
                    veth: p.veth.clone(),
                })
                .collect(),
        }
    }

    pub(super) fn write_state(&self) -> anyhow::Result<()> {
        let state = LabState {
            status: self.status(),
            supervisor_pid: std::process::id(),
            pod_cidr: format!("{}/{}", Ipv4Addr::from(self.cidr.network), self.cidr.prefix),
            manifests: self.manifests.clone(),
        };
        crate::lab::write_atomic(&self.paths.state, &serde_json::to_vec_pretty(&state)?)
    }

    /// The nodes, and for several of them the underlay and the Flannel-style overlay.
    pub(super) fn setup_nodes(&self) -> anyhow::Result<()> {
        // One bpffs for the lab (`ip netns exec` hides /sys/fs/bpf behind a fresh
        // sysfs); each node's agent pins under its own directory in it.
        mount("bpf", &crate::lab::pin_root(&self.name))?;
        // The agents hook local delivery on its root.
        mount("cgroup2", &crate::lab::cgroup_root(&self.name))?;
        netns::raise_neighbour_limits()?;
        for n in &self.nodes {
            netns::setup_node(&n.net.netns, BRIDGE, n.cidr.gateway(), n.cidr.prefix())
                .with_context(|| format!("setting up node{} ({})", n.net.index, n.net.netns))?;
        }
        if self.multi_node() {
            let underlay = crate::lab::underlay_netns(&self.name);
            netns::setup_underlay(&underlay).context("setting up the lab underlay")?;
            let all: Vec<NodeNet> = self.nodes.iter().map(|n| n.net.clone()).collect();
            for n in &all {
                netns::setup_overlay(n, &all, &underlay)
                    .with_context(|| format!("joining node{} to the overlay", n.index))?;
            }
        }
        Ok(())
    }

    /// Stops everything the lab started and deletes its namespaces.
    pub(super) fn teardown(&mut self) {
        for agent in self.nodes.iter_mut().filter_map(|n| n.agent.take()) {
            // SAFETY: plain syscalls on the agent's pid, which its reaper thread has not
            // reaped yet unless `exited` is set.
            if !agent.has_exited() {
                unsafe { libc::kill(agent.pid as i32, libc::SIGTERM) };
                if !agent.wait_exit(Duration::from_secs(5)) {
                    tracing::warn!("agent did not stop within 5s; killing it");
                    unsafe { libc::kill(agent.pid as i32, libc::SIGKILL) };
                    agent.wait_exit(Duration::from_secs(5));
                }
            }
        }
        let keys: Vec<PodKey> = self.pods.keys().cloned().collect();
        for key in keys {
            if let Err(e) = self.remove_pod(&key) {
                tracing::error!(error = ?e, "stopping an agent failed");
            }
        }
        for n in &self.nodes {
            if let Err(e) = netns::delete(&n.net.netns) {
                tracing::error!(node = n.net.index, error = ?e, "deleting a node failed");
            }
        }
        if let Err(e) = netns::delete(&crate::lab::underlay_netns(&self.name)) {
            tracing::error!(error = ?e, "deleting the underlay failed");
        }
        // The agent leaves its pins (and its link on the cgroup, which the pin holds)
        // for the next one; the lab is gone, so are they.
        crate::lab::unmount(&crate::lab::pin_root(&self.name));
        crate::lab::unmount(&crate::lab::cgroup_root(&self.name));
    }
}

/// Mounts a filesystem of type `fs` at `at` (created if missing).
fn mount(fs: &str, at: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(at)?;
    let status = Command::new("mount")
        .args(["-t", fs, fs])
        .arg(at)
        .status()
        .context("running mount")?;
    if !status.success() {
        bail!("mounting a {fs} filesystem at {} failed", at.display());
    }
    Ok(())
}

//! `netpol lab run`: the long-running owner of one lab. It builds the node, keeps pod
//! namespaces and their servers in step with the manifest directory, renders the agent's
//! view of the cluster (pods placed on node0 with the addresses the lab gave them), runs
//! the agent, and answers `wait`/`status` on `lab.sock`.

mod agents;
mod nodes;
mod pods;
mod pool;
mod render;
#[cfg(test)]
mod tests;
mod watch;

use agents::*;
use pods::*;
use pool::IpPool;
pub(crate) use pool::PodCidr;
use watch::*;

use super::kubeproxy::ClusterIps;
use super::netns::NodeNet;
use super::{Enforcer, Paths, ServiceStatus, UpOptions};
use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tokio::net::UnixListener;

/// How long a wait may take to find the agent's socket (the agent loads eBPF first).
const AGENT_START: Duration = Duration::from_secs(30);

/// How long a pod server may take to bind its ports.
const SERVER_START: Duration = Duration::from_secs(10);

type PodKey = (String, String);

/// The ports a pod's server listens on, from its containers' `ports`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Ports {
    tcp: Vec<u16>,
    udp: Vec<u16>,
}

impl Ports {
    fn of(pod: &Pod) -> Ports {
        let mut tcp = BTreeSet::new();
        let mut udp = BTreeSet::new();
        let containers = pod.spec.iter().flat_map(|s| s.containers.iter());
        for port in containers.flat_map(|c| c.ports.iter().flatten()) {
            let Ok(number) = u16::try_from(port.container_port) else {
                continue;
            };
            match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => tcp.insert(number),
                "UDP" => udp.insert(number),
                _ => false, // SCTP: the lab's server does not speak it
            };
        }
        Ports {
            tcp: tcp.into_iter().collect(),
            udp: udp.into_iter().collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.udp.is_empty()
    }
}

struct LabPod {
    node: u32,
    /// A hostNetwork pod: its server runs in the node's namespace, on the node's
    /// address, with no veth of its own.
    host_network: bool,
    netns: String,
    veth: String,
    ip: Ipv4Addr,
    ports: Ports,
    server: Option<Child>,
}

impl LabPod {
    /// Its addresses as the kubelet reports them: a pod network address and its IPv6
    /// twin, or the node's (IPv4) address.
    fn ips(&self) -> Vec<std::net::IpAddr> {
        match self.host_network {
            true => vec![self.ip.into()],
            false => vec![self.ip.into(), super::netns::ipv6_of(self.ip).into()],
        }
    }
}

/// The agent process; a thread reaps it so its exit is logged when it happens.
struct Agent {
    pid: u32,
    exited: Arc<(Mutex<bool>, Condvar)>,
}

impl Agent {
    fn has_exited(&self) -> bool {
        *self.exited.0.lock().unwrap()
    }

    /// Waits up to `timeout` for the agent to exit; true if it did.
    fn wait_exit(&self, timeout: Duration) -> bool {
        let (lock, cvar) = &*self.exited;
        let guard = lock.lock().unwrap();
        let (guard, _) = cvar
            .wait_timeout_while(guard, timeout, |exited| !*exited)
            .unwrap();
        *guard
    }
}

/// One lab node: its namespace, pod CIDR and addresses, and its agent.
struct LabNode {
    net: NodeNet,
    cidr: PodCidr,
    pool: IpPool,
    agent: Option<Agent>,
    /// The `nat` table last loaded (the lab's kube-proxy).
    nat: String,
}

struct Lab {
    name: String,
    paths: Paths,
    manifests: PathBuf,
    netpol_bin: PathBuf,
    /// Extra flags for the agent (`lab up --agent-arg`).
    agent_args: Vec<String>,
    /// node0's CIDR (the `--pod-cidr`); node n has the nth one after it.
    cidr: PodCidr,
    nodes: Vec<LabNode>,
    dns: bool,
    enforcer: Enforcer,
    pods: BTreeMap<PodKey, LabPod>,
    cluster_ips: ClusterIps,
    services: Vec<ServiceStatus>,
    last_errors: Vec<String>,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum LabRequest {
    Wait,
    Status,
}

type Shared = Arc<Mutex<Lab>>;

pub fn run_supervisor(opts: &UpOptions) -> anyhow::Result<()> {
    super::validate_name(&opts.name)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(supervise(opts))
}

async fn supervise(opts: &UpOptions) -> anyhow::Result<()> {
    let paths = Paths::new(&opts.name);
    std::fs::create_dir_all(&paths.cluster)
        .with_context(|| format!("creating {}", paths.cluster.display()))?;
    let lab: Shared = Arc::new(Mutex::new(Lab::new(opts)?));
    // Written first, so that `down` finds this process even if setup hangs.
    lab.lock().unwrap().write_state()?;
    tracing::info!(lab = %opts.name, pid = std::process::id(), "lab starting");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;

    let setup = {
        let lab = lab.clone();
        tokio::task::spawn_blocking(move || {
            let mut lab = lab.lock().unwrap();
            lab.setup_nodes()?;
            // Pod errors are not fatal: they are reported to every `wait`.
            if let Err(e) = lab.reconcile() {
                if lab.nodes.iter().any(|n| n.agent.is_none()) {
                    return Err(e);
                }
                tracing::error!(error = ?e, "reconcile failed");
            }
            anyhow::Ok(())
        })
    };
    let started = async {
        setup.await??;
        let _ = std::fs::remove_file(&paths.lab_sock);
        let listener = UnixListener::bind(&paths.lab_sock)
            .with_context(|| format!("listening on {}", paths.lab_sock.display()))?;
        anyhow::Ok(listener)
    }
    .await;
    let listener = match started {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = ?e, "setup failed");
            shut_down(lab, &paths, false).await;
            return Err(e);
        }
    };
    let server = tokio::spawn(serve_socket(listener, lab.clone()));
    let watcher = tokio::spawn(watch_manifests(lab.clone(), opts.manifests.clone()));
    tracing::info!("lab is up");

    tokio::select! {
        _ = sigterm.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = sigint.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
    server.abort();
    watcher.abort();
    shut_down(lab, &paths, true).await;
    Ok(())
}

/// Tears the lab down. After a failed setup the logs stay (for `up` to show and the user
/// to read); `down` removes them.
async fn shut_down(lab: Shared, paths: &Paths, remove_dir: bool) {
    let torn = tokio::task::spawn_blocking(move || {
        lab.lock().unwrap_or_else(|p| p.into_inner()).teardown()
    })
    .await;
    if let Err(e) = torn {
        tracing::error!(error = ?e, "teardown failed");
    }
    if remove_dir {
        let _ = std::fs::remove_dir_all(&paths.dir);
    } else {
        for f in [&paths.state, &paths.lab_sock, &paths.agent_sock] {
            let _ = std::fs::remove_file(f);
        }
    }
}

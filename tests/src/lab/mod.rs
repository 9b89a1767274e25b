//! `netpol lab`: one Flannel-like node made of network namespaces on this machine, so
//! netpol can be tried and tested without a cluster.
//!
//! ```text
//!   np-<lab>-node0 (netns)                     np-<lab>-<ns>-<pod> (netns)
//!   ┌──────────────────────────────┐           ┌──────────────────────────┐
//!   │ cni0 10.244.0.1/24 ── np<hash>┼── veth ───┼ eth0 10.244.0.N/24       │
//!   │      fd00::af4:1/96           │           │      fd00::af4:N/96      │
//!   │ netpol agent (TC on np<hash>) │           │ netpol lab serve (ports) │
//!   └──────────────────────────────┘           └──────────────────────────┘
//! ```
//! `up` starts a detached supervisor (`netpol lab run`) that owns the namespaces, keeps
//! them in step with a manifest directory, renders the agent's view of the cluster and
//! answers `wait`/`status` on `lab.sock`. Every other command is a client of the files
//! and sockets under `/run/netpol/lab/<name>/`.

pub mod dns;
pub mod fullsync;
pub mod iptables;
mod kubeproxy;
mod load;
mod netns;
pub mod nftables;
mod probe;
mod serve;
mod supervisor;

mod client;
mod paths;
#[cfg(test)]
mod tests;

pub use client::*;
pub use paths::*;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

pub use load::{load, load_address, load_with, LoadKind, LoadOptions, LoadReport};

pub use probe::{probe, ProbeOptions, Via};

pub use serve::serve;

pub use supervisor::run_supervisor;

/// Where every lab keeps its state; one directory per lab name.
pub use netpol_agent::api::LAB_ROOT;

/// The first node of a lab; node `n` is `node<n>`.
pub const NODE_NAME: &str = "node0";

/// Nodes a lab may have (underlay addresses 172.30.0.2 up).
pub const MAX_NODES: u32 = 200;

pub fn node_name(index: u32) -> String {
    format!("node{index}")
}

/// The bridge pods are plugged into, as Flannel's `cni0`.
pub const BRIDGE: &str = "cni0";

/// How long `up` waits for the supervisor to create its socket.
const SUPERVISOR_START: Duration = Duration::from_secs(30);

/// How long `up` waits for the first convergence (attaching programs can take a while).
const FIRST_CONVERGENCE: Duration = Duration::from_secs(120);

pub struct UpOptions {
    pub name: String,
    pub manifests: PathBuf,
    /// Default "10.244.0.0/24".
    pub pod_cidr: String,
    /// The netpol binary run as the agent and the pod servers.
    pub netpol_bin: PathBuf,
    /// The netpol-lab binary run as the supervisor (`netpol-lab run`).
    pub lab_bin: PathBuf,
    /// Extra flags for the lab's agent (`--keep-established`, `--event-rate=10`, ...).
    pub agent_args: Vec<String>,
    /// Nodes (1 = the single-node lab of before: no underlay, no overlay).
    pub nodes: u32,
    /// Run cluster DNS (kube-system/coredns behind kube-dns, 10.96.0.10).
    pub dns: bool,
    /// What enforces policy on the nodes (the benchmarks compare them).
    pub enforcer: Enforcer,
}

/// What enforces policy in a lab: netpol's agent, iptables and ipsets in kube-router's
/// layout (`iptables/`), nftables sets in kube-network-policies' (`nftables/`; both for
/// the benchmarks), or nothing (the baseline).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Enforcer {
    None,
    Iptables,
    Nftables,
    #[default]
    Netpol,
}

impl Enforcer {
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcer::None => "none",
            Enforcer::Iptables => "iptables",
            Enforcer::Nftables => "nftables",
            Enforcer::Netpol => "netpol",
        }
    }
}

impl std::str::FromStr for Enforcer {
    type Err = String;
    fn from_str(s: &str) -> Result<Enforcer, String> {
        match s {
            "none" => Ok(Enforcer::None),
            "iptables" => Ok(Enforcer::Iptables),
            "nftables" => Ok(Enforcer::Nftables),
            "netpol" => Ok(Enforcer::Netpol),
            _ => Err(format!(
                "unknown enforcer {s:?}: none, iptables, nftables or netpol"
            )),
        }
    }
}

/// A pod annotated `netpol.io/lab-virtual: "true"` (with `spec.nodeName` and
/// `status.podIP`) is given to the enforcers as it is but not run: a pod of another,
/// virtual node, so benchmarks can size the cluster without a namespace per pod.
pub const VIRTUAL_ANNOTATION: &str = "netpol.io/lab-virtual";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    /// An echo request (pod to pod only; the port is not used).
    #[serde(rename = "ICMP")]
    Icmp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Icmp => "ICMP",
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabStatus {
    pub name: String,
    pub nodes: Vec<NodeStatus>,
    pub pods: Vec<PodStatus>,
    /// Services with their ClusterIP and endpoints, as the lab's kube-proxy programs them.
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: String,
    pub ports: Vec<ServicePortStatus>,
}

impl ServiceStatus {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePortStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
    /// The port kube-proxy takes on every address of every node (`nodePort`, as
    /// given: the lab assigns none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// namespace/name of the backend pod.
    pub pod: String,
    pub ip: String,
    pub port: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub netns: String,
    pub agent_pid: Option<u32>,
    /// The node's IPv4 pod CIDR.
    #[serde(default)]
    pub pod_cidr: String,
    /// The node's address on the lab underlay (multi-node labs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_ip: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ips: Vec<String>,
    pub netns: String,
    pub veth: String,
}

impl PodStatus {
    /// "ns/pod", the name pods go by on the command line and in probe reports.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub protocol: Protocol,
    pub port: u16,
    pub results: Vec<ProbeResult>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub from: String,
    pub to: String,
    pub result: Outcome,
    /// The address connected to (the pod's, the Service's ClusterIP, or what DNS gave).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The backend pod that answered (known when the server says who it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Connected,
    Refused,
    Timeout,
    /// `--via dns`: the name did not resolve (no answer, or NXDOMAIN).
    Unresolved,
}

/// `state.json`: the public [`LabStatus`] (flattened, so the file reads as one) plus what
/// `down` needs to find the supervisor after a crash of the client.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct LabState {
    #[serde(flatten)]
    pub status: LabStatus,
    pub supervisor_pid: u32,
    pub pod_cidr: String,
    pub manifests: PathBuf,
}

//! The agent's local API: a Unix socket speaking one JSON request per line.
//!
//! source ──► index ──► compile ──► datapath ──► events ──► **api**
//!
//! Requests: `{"op":"status"}` → one [`Status`] line; `{"op":"wait","digest":D}` → one
//! [`Status`] line once the datapath has converged to source digest D (or the agent's
//! current input when D is empty); `{"op":"observe"}` → `{"observing":NODE}` once
//! subscribed, then one event per line until the client hangs up, with
//! `{"lost":N}` when this client fell behind and `{"rate_limited":N}` when the kernel's
//! per-pod rate limiter suppressed N events (node-wide, checked every second);
//! `{"op":"counters"}` → one [`Counters`] line (exact per-CPU sums);
//! `{"op":"explain","from":A,"to":B,"port":P,"protocol":"TCP"}` → one
//! [`netpol_engine::explain::Explanation`] line, judged on this node's live maps (or
//! `{"error":...}`); `{"op":"tally"}` → one [`crate::events::TallyReport`] line (per
//! rule, per namespace).

pub mod client;
pub mod server;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use netpol_engine::compile::Desired;
use netpol_engine::index::Snapshot;

pub const DEFAULT_SOCKET: &str = "/run/netpol/agent.sock";

/// Where `netpol lab` keeps a lab's state; node0's agent socket is `NAME/agent.sock`
/// under it. The one convention the tools (`--lab NAME`) and the lab share.
pub const LAB_ROOT: &str = "/run/netpol/lab";

/// The socket of lab `name`'s first node's agent (`--lab NAME`).
pub fn lab_agent_socket(name: &str) -> std::path::PathBuf {
    std::path::Path::new(LAB_ROOT).join(name).join("agent.sock")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Status,
    Wait {
        #[serde(default)]
        digest: String,
    },
    Observe,
    Counters,
    Tally,
    Explain {
        /// `namespace/pod` or an address.
        from: String,
        to: String,
        port: u16,
        /// TCP, UDP or SCTP.
        #[serde(default = "tcp")]
        protocol: String,
    },
}

fn tcp() -> String {
    "TCP".into()
}

/// What the datapath was last synced to: the snapshot and its compiled maps (for
/// `explain`, which names what the live maps hold with them).
#[derive(Clone, Default)]
pub struct Enforced {
    pub snapshot: Arc<Snapshot>,
    pub desired: Arc<Desired>,
}

/// The classifier's exact counters: packets per (verdict, reason, direction), and what
/// happened to events.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub packets: Vec<crate::datapath::maps::Counter>,
    pub events: crate::datapath::maps::EventCounters,
}

/// What the agent reports about itself.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub node: String,
    /// Digest of the source input the datapath was last synced to.
    pub digest: String,
    /// Whether every local pod with an address has its programs attached and maps written.
    pub converged: bool,
    pub endpoints: usize,
    /// Local pods still without a veth.
    pub pending: Vec<String>,
    pub policies: usize,
    pub identities: usize,
    pub policy_entries: usize,
    pub invalid: Vec<netpol_engine::index::Invalid>,
    /// Times the datapath was synced.
    pub syncs: u64,
    /// Milliseconds from the agent's start to its first convergence (None: not yet).
    #[serde(default)]
    pub ready_ms: Option<u64>,
    /// Whether the agent adopted pinned maps of a previous agent of its version.
    #[serde(default)]
    pub adopted: bool,
    /// Conntrack entries copied or converted from another pin version's maps at start.
    #[serde(default)]
    pub migrated_conntrack: usize,
    /// Program → instructions the kernel's verifier went through (its cost to load, and
    /// how close it is to the 1M budget).
    #[serde(default)]
    pub verified_instructions: std::collections::BTreeMap<String, u32>,
    /// Program → runs and their nanoseconds as the kernel counted them (only while
    /// `kernel.bpf_stats_enabled` is 1; empty otherwise). Read when asked.
    #[serde(default)]
    pub program_runs: std::collections::BTreeMap<String, crate::datapath::programs::ProgramRuns>,
    /// Ports left held because their pod's addresses cannot be trusted (two pods'
    /// addresses on one port, a port claiming another pod's, several claiming one).
    #[serde(default)]
    pub conflicts: Vec<crate::datapath::Conflict>,
    /// Address conflicts that appeared since the agent started.
    #[serde(default)]
    pub conflicts_seen: u64,
    /// Where the agent serves `/metrics`, `/healthz` and `/readyz` (None: nowhere).
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// What woke the agent loop since it started.
    #[serde(default)]
    pub wakes: Wakes,
}

/// What woke the agent loop, counted since it started: a new source state, a change of
/// the bridge's ports seen through netlink (a port joined, left or changed, an address
/// was added in a pod's namespace), or the backoff after a failed sync or attach. There
/// is no other timer: a pod is located because of an event.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Wakes {
    pub source: u64,
    pub ports: u64,
    pub retry: u64,
}

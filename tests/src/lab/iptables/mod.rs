//! The iptables enforcer the benchmarks measure netpol against: NetworkPolicy compiled
//! to per-pod chains and ipsets in kube-router's layout, loaded into a lab node with
//! `ipset restore` and `iptables-restore` / `ip6tables-restore` (the whole `filter` table
//! at once, so a change is atomic). `netpol lab up --enforcer iptables` runs
//! [`run_agent`] in each node in the agent's place: the same `dir` source, the same
//! `wait` on the same socket, so everything that drives a lab drives it unchanged.
//!
//! source (dir) ──► index ──► [`ruleset`] ──► ipset restore, iptables-restore
//!
//! Per address family (docs/benchmarks.md draws it):
//!
//! - `FORWARD` → `KUBE-ROUTER-FORWARD`: `RELATED,ESTABLISHED` accepted first (only a
//!   connection's first packet walks the rules), `INVALID` dropped, IPv6 neighbour
//!   discovery accepted, then per local pod `-s <pod> -j KUBE-POD-EG-<h>` when its egress
//!   is isolated and `-d <pod> -j KUBE-POD-IN-<h>` when its ingress is.
//! - `KUBE-POD-{IN,EG}-<h>`: a jump to the chain of every policy that selects the pod in
//!   that direction, then `-m mark ! --mark 0x10000/0x10000 -j DROP`, then the mark
//!   cleared so that the other end's chain starts afresh.
//! - `KUBE-NWPLCY-<h>` (one per policy and direction): per rule, per peer set, per port,
//!   two lines with the same matches (`-m set --match-set SRC src -m set --match-set DST
//!   dst -p P --dport N`), the first `-j MARK --set-xmark 0x10000/0x10000`, the second
//!   `-m mark --mark 0x10000/0x10000 -j RETURN`, as kube-router writes them.
//! - ipsets: `hash:ip` of the policy's target pods, per rule one `hash:ip` of the peer
//!   pods (none when no pod matches: the rule then has no line) and one `hash:net` of its
//!   ipBlocks with `nomatch` for every except; named ports resolve to one `hash:ip` per
//!   port number of the pods that name it.
//!
//! Departures from kube-router, each toward a stricter or cheaper enforcer: one chain per
//! pod *and direction* (kube-router's single pod chain lets an ingress rule of a policy
//! selecting both ends accept the sender's egress); DROP instead of REJECT (a denied
//! connection times out, as under netpol); chains and sets only for policies that select
//! a local pod; the conntrack rules once at the top instead of in every pod chain; no
//! NFLOG. Cluster-wide policies are not rendered (kube-router has none). Traffic from
//! the node itself never crosses FORWARD, so it passes, as netpol's default does.

mod builder;
mod load;
#[cfg(test)]
mod tests;

pub use builder::*;
pub use load::*;

use netpol_common::proto;
use netpol_engine::index::net::Cidr;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The mark a policy chain sets on a packet one of its rules accepts.
const ACCEPTED_MARK: &str = "0x10000/0x10000";

pub use super::fullsync::Family;

impl Family {
    fn ipset(self) -> &'static str {
        match self {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Family::V4 => "4",
            Family::V6 => "6",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetKind {
    HashIp,
    HashNet,
}

impl SetKind {
    fn name(self) -> &'static str {
        match self {
            SetKind::HashIp => "hash:ip",
            SetKind::HashNet => "hash:net",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpSet {
    pub kind: SetKind,
    pub family: Family,
    /// `10.0.0.1`, `10.0.0.0/8`, or `10.1.0.0/16 nomatch` (an except).
    pub members: Vec<String>,
}

/// Everything one node loads: the ipsets by name and the `filter` table of each family
/// in `iptables-restore` form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub sets: BTreeMap<String, IpSet>,
    pub filter4: String,
    pub filter6: String,
    /// Rule lines in policy chains (both families): what a new connection may walk.
    pub policy_rules: usize,
    /// Local pods with a chain (isolated in at least one direction).
    pub pods: usize,
}

/// A chain or set name: `prefix` and 16 hex digits of what it stands for (iptables
/// chains hold 28 characters, ipsets 31).
fn name(prefix: &str, what: &str) -> String {
    let digest = Sha256::digest(what.as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{}", hex.to_uppercase())
}

fn protocol(p: u8) -> &'static str {
    match p {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::SCTP => "sctp",
        _ => "all",
    }
}

/// ipset refuses /0 in a hash:net; two halves cover the same addresses.
fn net_members(c: &Cidr, suffix: &str) -> Vec<String> {
    let text = c.to_string();
    match text.as_str() {
        "0.0.0.0/0" => vec![format!("0.0.0.0/1{suffix}"), format!("128.0.0.0/1{suffix}")],
        "::/0" => vec![format!("::/1{suffix}"), format!("8000::/1{suffix}")],
        _ => vec![format!("{text}{suffix}")],
    }
}

fn is_family(c: &Cidr, f: Family) -> bool {
    c.is_v4() == (f == Family::V4)
}

/// Direction of a policy chain, pod chain or rule.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Ingress,
    Egress,
}

impl Dir {
    fn word(self) -> &'static str {
        match self {
            Dir::Ingress => "ingress",
            Dir::Egress => "egress",
        }
    }
}

/// A rule's port as lines match it: protocol (None: any), number range, or a named
/// port still to resolve.
type PortMatch<'a> = (Option<u8>, Option<(u16, u16)>, Option<&'a str>);

/// What a rule line matches besides the port.
struct Match<'a> {
    /// Set of the sender (`src`) and of the receiver (`dst`); None: anyone.
    src: Option<&'a str>,
    dst: Option<&'a str>,
    protocol: Option<u8>,
    ports: Option<(u16, u16)>,
}

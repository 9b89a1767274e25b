//! The nftables enforcer the benchmarks measure netpol against: NetworkPolicy compiled
//! to a few sets per address family, in the layout of kube-network-policies and
//! Calico's nftables mode: a new connection costs one set lookup per rule set, not a
//! walk of a chain per rule. `netpol lab up --enforcer nftables` runs [`run_agent`] in
//! each node in the agent's place (the loop is `fullsync`'s, shared with `iptables/`).
//!
//! source (dir) ──► index ──► [`ruleset`] ──► [`Ruleset::script`] ──► nft -f -
//!
//! Per address family one table, `ip netpol` and `ip6 netpol`, both in one script, so
//! one `nft -f` is one transaction: each table is declared, deleted and written whole
//! (a full sync, atomic). Two tables rather than one `inet` table because the sets are
//! per family anyway (an address type each), so the tables come out the same but for
//! `ip`/`ip6`, and a packet only ever meets its own family's rules.
//!
//! - chain `forward` (hook forward, policy accept): `ct state established,related`
//!   accepted first (only a connection's first packet is judged), `invalid` dropped,
//!   IPv6 neighbour discovery accepted, then `saddr @egress_isolated jump egress` and
//!   `daddr @ingress_isolated jump ingress`: a packet is judged by the sender's egress,
//!   then the receiver's ingress.
//! - sets `{ingress,egress}_isolated`: addresses of this node's pods (on the pod
//!   network, with an identity) that some policy isolates in that direction.
//! - chain `ingress`: `daddr . saddr . meta l4proto . th dport @ingress_allow return`,
//!   `daddr . saddr @ingress_allow_all return` (rules without ports), `drop`. Chain
//!   `egress` the same with `saddr . daddr`: the target (the local pod) comes first.
//! - sets `*_allow` (`target . peers . protocol . ports`) and `*_allow_all`
//!   (`target . peers`), `flags interval`: the target one address, the peers a range
//!   (a pod's address, or an ipBlock less its excepts, `ranges`), the ports a range (a
//!   port, an endPort range, every port for a protocol alone; a named port resolved on
//!   the receiving pod: the target for ingress, each peer pod for egress).
//!
//! An interval set refuses an element that starts or ends inside another one ("File
//! exists"), so the elements of one target and protocol are made disjoint before they
//! are written (`ranges::disjoint`): identical ones once, and each group of overlapping
//! ones cut into pieces along the peers, each piece with the union of their ports.
//! Elements that overlap nothing are written as the rules give them (neighbours are not
//! merged), so the element count, like iptables' rule count, follows the rules.
//!
//! As for `iptables/`: elements only for policies selecting a local pod; DROP, not
//! REJECT; cluster-wide policies are not rendered; traffic from the node itself never
//! crosses `forward`, so it passes.

mod builder;
mod load;
mod ranges;
#[cfg(test)]
mod tests;

pub use builder::*;
pub use load::*;

pub use super::fullsync::Family;

use netpol_common::proto;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One address family's sets, elements in nft's syntax, sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub ingress: Sets,
    pub egress: Sets,
}

/// The sets of one direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sets {
    /// Local pods isolated in this direction: `10.244.0.2`.
    pub isolated: Vec<String>,
    /// `target . peers . protocol . ports`: `10.244.0.2 . 10.244.1.0-10.244.1.2 . tcp . 80`.
    pub allow: Vec<String>,
    /// `target . peers`, for rules that allow every port of every protocol.
    pub allow_all: Vec<String>,
}

/// Everything one node loads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub v4: Table,
    pub v6: Table,
    /// Elements of the allow sets (both families): what a new connection is judged by.
    pub policy_rules: usize,
    /// Local pods isolated in at least one direction.
    pub pods: usize,
}

/// An inclusive range of addresses (IPv4 in the low 32 bits) or ports.
type Range = (u128, u128);

impl Family {
    fn table(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    fn addr_type(self) -> &'static str {
        match self {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }

    /// Every address of the family.
    fn all(self) -> Range {
        match self {
            Family::V4 => (0, u32::MAX.into()),
            Family::V6 => (0, u128::MAX),
        }
    }

    fn addr(self, a: u128) -> String {
        match self {
            Family::V4 => Ipv4Addr::from(a as u32).to_string(),
            Family::V6 => Ipv6Addr::from(a).to_string(),
        }
    }

    /// `a` or `a-b`, as nft reads a range of addresses.
    fn range(self, (a, b): Range) -> String {
        if a == b {
            self.addr(a)
        } else {
            format!("{}-{}", self.addr(a), self.addr(b))
        }
    }
}

fn number(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => a.into(),
    }
}

/// `80` or `80-90`.
fn ports((a, b): Range) -> String {
    if a == b {
        a.to_string()
    } else {
        format!("{a}-{b}")
    }
}

/// The protocol as nft's `inet_proto` reads it (a number when it has no name here).
fn protocol(p: u8) -> String {
    match p {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::SCTP => "sctp".into(),
        _ => p.to_string(),
    }
}

/// Direction of a set or rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Dir {
    Ingress,
    Egress,
}

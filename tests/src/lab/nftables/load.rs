//! The `nft -f` script of a ruleset, loading it into a node, and the enforcer's agent
//! (the loop is `fullsync`'s).

use anyhow::Context;
use std::fmt::Write as _;

use super::*;
use crate::lab::fullsync::{self, restore, AgentOptions};

/// The name of both tables (`ip netpol`, `ip6 netpol`).
pub const TABLE: &str = "netpol";

impl Ruleset {
    /// The script that replaces both tables with this ruleset in one transaction:
    /// each table declared (so that the delete finds it on a first load), deleted, and
    /// written whole.
    pub fn script(&self) -> String {
        let mut s = String::new();
        for (family, table) in [(Family::V4, &self.v4), (Family::V6, &self.v6)] {
            write_table(&mut s, family, table);
        }
        s
    }
}

fn write_table(s: &mut String, f: Family, t: &Table) {
    let (ip, addr) = (f.table(), f.addr_type());
    let _ = writeln!(s, "table {ip} {TABLE} {{}}");
    let _ = writeln!(s, "delete table {ip} {TABLE}");
    let _ = writeln!(s, "table {ip} {TABLE} {{");
    for (dir, sets) in [("ingress", &t.ingress), ("egress", &t.egress)] {
        write_set(s, &format!("{dir}_isolated"), addr, false, &sets.isolated);
        write_set(
            s,
            &format!("{dir}_allow"),
            &format!("{addr} . {addr} . inet_proto . inet_service"),
            true,
            &sets.allow,
        );
        write_set(
            s,
            &format!("{dir}_allow_all"),
            &format!("{addr} . {addr}"),
            true,
            &sets.allow_all,
        );
    }
    s.push_str("\tchain forward {\n");
    s.push_str("\t\ttype filter hook forward priority filter; policy accept;\n");
    // Only a connection's first packet is judged; replies and the rest pass here.
    s.push_str("\t\tct state established,related accept\n");
    s.push_str("\t\tct state invalid drop\n");
    if f == Family::V6 {
        // Neighbour discovery is how IPv6 finds a next hop: never policy's to judge.
        s.push_str("\t\ticmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept\n");
    }
    // The sender's egress first, then the receiver's ingress (each returns if allowed).
    let _ = writeln!(s, "\t\t{ip} saddr @egress_isolated jump egress");
    let _ = writeln!(s, "\t\t{ip} daddr @ingress_isolated jump ingress");
    s.push_str("\t}\n");
    // The target (the local pod) leads each key: daddr for ingress, saddr for egress.
    for (dir, target, peer) in [("ingress", "daddr", "saddr"), ("egress", "saddr", "daddr")] {
        let _ = writeln!(s, "\tchain {dir} {{");
        let _ = writeln!(
            s,
            "\t\t{ip} {target} . {ip} {peer} . meta l4proto . th dport @{dir}_allow return"
        );
        let _ = writeln!(s, "\t\t{ip} {target} . {ip} {peer} @{dir}_allow_all return");
        s.push_str("\t\tdrop\n");
        s.push_str("\t}\n");
    }
    s.push_str("}\n");
}

fn write_set(s: &mut String, name: &str, key: &str, interval: bool, elements: &[String]) {
    let _ = writeln!(s, "\tset {name} {{");
    let _ = writeln!(s, "\t\ttype {key}");
    if interval {
        s.push_str("\t\tflags interval\n");
    }
    // nft refuses `elements = { }`: an empty set has no such line.
    if !elements.is_empty() {
        s.push_str("\t\telements = {\n");
        for e in elements {
            let _ = writeln!(s, "\t\t\t{e},");
        }
        s.push_str("\t\t}\n");
    }
    s.push_str("\t}\n");
}

/// Loads `rs` in the current network namespace: both tables in one transaction.
pub fn apply(rs: &Ruleset) -> anyhow::Result<()> {
    restore("nft", &["-f", "-"], &rs.script()).context("loading the nftables tables")
}

/// `netpol lab nftables-agent`: on every change of the source, both tables rendered
/// and replaced (a full sync, as kube-network-policies does).
pub fn run_agent(opts: AgentOptions) -> anyhow::Result<()> {
    fullsync::run(opts, "nftables", ruleset, apply)
}

impl fullsync::Rendered for Ruleset {
    fn pods(&self) -> usize {
        self.pods
    }

    fn policy_rules(&self) -> usize {
        self.policy_rules
    }
}

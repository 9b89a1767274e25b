//! Loading a ruleset into a node (`ipset restore`, `iptables-restore`) and the enforcer's
//! agent (the loop is `fullsync`'s).

use anyhow::Context;
use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::*;
use crate::lab::fullsync::{self, restore, AgentOptions};

/// The `ipset restore` script that brings every set of `rs` to its members, each
/// filled aside and swapped in whole.
pub fn ipset_script(rs: &Ruleset) -> String {
    let mut s = String::new();
    for (n, set) in &rs.sets {
        let params = format!(
            "{} family {} hashsize 1024 maxelem 1048576",
            set.kind.name(),
            set.family.ipset()
        );
        let tmp = format!(
            "NETPOL-TMP-{}{}",
            match set.kind {
                SetKind::HashIp => "IP",
                SetKind::HashNet => "NET",
            },
            set.family.tag()
        );
        let _ = writeln!(s, "create {n} {params} -exist");
        let _ = writeln!(s, "create {tmp} {params} -exist");
        let _ = writeln!(s, "flush {tmp}");
        for m in &set.members {
            let _ = writeln!(s, "add {tmp} {m}");
        }
        let _ = writeln!(s, "swap {tmp} {n}");
        let _ = writeln!(s, "destroy {tmp}");
    }
    s
}

/// Loads `rs` in the current network namespace: sets first (a new rule may name them),
/// then each family's table in one atomic restore, then the sets nothing names any more.
/// `loaded` holds the sets of the previous call.
pub fn apply(rs: &Ruleset, loaded: &mut BTreeSet<String>) -> anyhow::Result<()> {
    restore("ipset", &["restore"], &ipset_script(rs)).context("loading the ipsets")?;
    restore("iptables-restore", &[], &rs.filter4).context("loading the IPv4 filter table")?;
    restore("ip6tables-restore", &[], &rs.filter6).context("loading the IPv6 filter table")?;
    let stale: Vec<String> = loaded
        .iter()
        .filter(|n| !rs.sets.contains_key(*n))
        .cloned()
        .collect();
    if !stale.is_empty() {
        let script: String = stale.iter().map(|n| format!("destroy {n}\n")).collect();
        restore("ipset", &["restore"], &script).context("removing unused ipsets")?;
    }
    *loaded = rs.sets.keys().cloned().collect();
    Ok(())
}

/// `netpol lab iptables-agent`: on every change of the source, the whole ruleset
/// rendered and loaded (a full sync, as kube-router does).
pub fn run_agent(opts: AgentOptions) -> anyhow::Result<()> {
    let mut loaded = BTreeSet::new();
    fullsync::run(opts, "iptables", ruleset, move |rs| apply(rs, &mut loaded))
}

impl fullsync::Rendered for Ruleset {
    fn pods(&self) -> usize {
        self.pods
    }

    fn policy_rules(&self) -> usize {
        self.policy_rules
    }
}

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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{bail, Context};
use netpol_common::proto;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch};

use netpol_agent::api::Status;
use netpol_agent::source::dir;
use netpol_engine::compile::{peer_selects, selecting};
use netpol_engine::index::net::{addr_of, Cidr};
use netpol_engine::index::{Index, Peer, PodInfo, Policy, PortRef, Rule, Snapshot};

/// The mark a policy chain sets on a packet one of its rules accepts.
const ACCEPTED_MARK: &str = "0x10000/0x10000";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

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

struct Builder<'s> {
    snap: &'s Snapshot,
    family: Family,
    sets: BTreeMap<String, IpSet>,
    chains: Vec<String>,
    lines: Vec<String>,
    policy_rules: usize,
}

impl<'s> Builder<'s> {
    fn ips_of(&self, pod: &PodInfo) -> Vec<String> {
        pod.ips
            .iter()
            .filter(|ip| Family::of(ip) == self.family)
            .map(IpAddr::to_string)
            .collect()
    }

    /// Pods that take part in policy: on the pod network, with an identity.
    fn pods(&self) -> impl Iterator<Item = &'s PodInfo> {
        self.snap
            .pods
            .values()
            .map(|p| p.as_ref())
            .filter(|p| !p.host_network && p.identity != 0)
    }

    fn set(&mut self, what: &str, kind: SetKind, mut members: Vec<String>) -> String {
        let prefix = match kind {
            SetKind::HashIp => "KUBE-SRC-",
            SetKind::HashNet => "KUBE-NET-",
        };
        let n = name(prefix, &format!("{what}/{}", self.family.tag()));
        members.sort();
        members.dedup();
        self.sets.insert(
            n.clone(),
            IpSet {
                kind,
                family: self.family,
                members,
            },
        );
        n
    }

    fn rule_line(&mut self, chain: &str, m: &Match) {
        let mut args = format!("-A {chain}");
        if let Some(s) = m.src {
            let _ = write!(args, " -m set --match-set {s} src");
        }
        if let Some(d) = m.dst {
            let _ = write!(args, " -m set --match-set {d} dst");
        }
        if let Some(p) = m.protocol {
            let _ = write!(args, " -p {}", protocol(p));
            if let Some((a, b)) = m.ports {
                if a == b {
                    let _ = write!(args, " --dport {a}");
                } else {
                    let _ = write!(args, " --dport {a}:{b}");
                }
            }
        }
        self.lines
            .push(format!("{args} -j MARK --set-xmark {ACCEPTED_MARK}"));
        self.lines
            .push(format!("{args} -m mark --mark {ACCEPTED_MARK} -j RETURN"));
        self.policy_rules += 2;
    }

    /// The chain of one policy in one direction; its name.
    fn policy_chain(&mut self, key: &str, policy: &Policy, dir: Dir) -> String {
        let chain = name("KUBE-NWPLCY-", &format!("{key}/{}", dir.word()));
        self.chains.push(chain.clone());
        let targets: Vec<&PodInfo> = self
            .pods()
            .filter(|p| p.namespace == policy.namespace && policy.pod_selector.matches(&p.labels))
            .collect();
        let target_ips: Vec<String> = targets.iter().flat_map(|p| self.ips_of(p)).collect();
        let target_set = self.set(
            &format!("{key}/{}/targets", dir.word()),
            SetKind::HashIp,
            target_ips,
        );
        let rules = match dir {
            Dir::Ingress => &policy.ingress,
            Dir::Egress => &policy.egress,
        };
        for (i, rule) in rules.iter().enumerate() {
            self.rule(&chain, key, policy, dir, i, rule, &targets, &target_set);
        }
        chain
    }

    #[allow(clippy::too_many_arguments)]
    fn rule(
        &mut self,
        chain: &str,
        key: &str,
        policy: &Policy,
        dir: Dir,
        i: usize,
        rule: &Rule,
        targets: &[&PodInfo],
        target_set: &str,
    ) {
        let what = format!("{key}/{}/{i}", dir.word());
        // Peer sets of the rule: its pods and its blocks (None: every peer).
        let mut peer_sets: Vec<Option<String>> = Vec::new();
        // Pods a named port may resolve on, for egress (None: every pod).
        let mut peer_pods: Option<Vec<&PodInfo>> = None;
        match &rule.peers {
            None => peer_sets.push(None),
            Some(peers) => {
                // Pods the selectors choose go into the rule's hash:ip set; addresses
                // of its blocks into its hash:net set (which covers pods inside them).
                let mut selected: Vec<&PodInfo> = Vec::new();
                let mut in_blocks: Vec<&PodInfo> = Vec::new();
                let mut nets: Vec<String> = Vec::new();
                for peer in peers {
                    match peer {
                        Peer::Pods { namespaces, pods } => {
                            let own = namespaces.is_none().then_some(policy.namespace.as_str());
                            selected.extend(self.pods().filter(|p| {
                                self.snap.identities.get(&p.identity).is_some_and(|k| {
                                    peer_selects(own, namespaces.as_ref(), pods, k)
                                })
                            }));
                        }
                        Peer::Block { cidr, except } => {
                            if is_family(cidr, self.family) {
                                nets.extend(net_members(cidr, ""));
                                for x in except {
                                    nets.extend(net_members(x, " nomatch"));
                                }
                            }
                            in_blocks.extend(self.pods().filter(|p| {
                                p.ips.iter().any(|ip| {
                                    let a = addr_of(*ip);
                                    cidr.contains_addr(&a)
                                        && !except.iter().any(|x| x.contains_addr(&a))
                                })
                            }));
                        }
                        Peer::Nodes(_) => {}
                    }
                }
                let ips: Vec<String> = selected.iter().flat_map(|p| self.ips_of(p)).collect();
                if !ips.is_empty() {
                    peer_sets.push(Some(self.set(
                        &format!("{what}/pods"),
                        SetKind::HashIp,
                        ips,
                    )));
                }
                if !nets.is_empty() {
                    peer_sets.push(Some(self.set(
                        &format!("{what}/blocks"),
                        SetKind::HashNet,
                        nets,
                    )));
                }
                selected.extend(in_blocks);
                peer_pods = Some(selected);
            }
        }
        let ports: Vec<PortMatch> = match &rule.ports {
            None => vec![(None, None, None)],
            Some(specs) => specs
                .iter()
                .map(|s| match &s.port {
                    None => (Some(s.protocol), None, None),
                    Some(PortRef::Number(n)) => {
                        (Some(s.protocol), Some((*n, s.end_port.unwrap_or(*n))), None)
                    }
                    Some(PortRef::Name(name)) => (Some(s.protocol), None, Some(name.as_str())),
                })
                .collect(),
        };
        for (j, (protocol, range, named)) in ports.into_iter().enumerate() {
            let Some(port_name) = named else {
                for peers in &peer_sets {
                    let m = match dir {
                        Dir::Ingress => Match {
                            src: peers.as_deref(),
                            dst: Some(target_set),
                            protocol,
                            ports: range,
                        },
                        Dir::Egress => Match {
                            src: Some(target_set),
                            dst: peers.as_deref(),
                            protocol,
                            ports: range,
                        },
                    };
                    self.rule_line(chain, &m);
                }
                continue;
            };
            let protocol = protocol.expect("a named port has a protocol");
            // A named port resolves on the receiving pod: the targets for ingress, the
            // peers for egress. One set per port number.
            let receivers: Vec<&PodInfo> = match dir {
                Dir::Ingress => targets.to_vec(),
                Dir::Egress => match &peer_pods {
                    Some(pods) => pods.clone(),
                    None => self.pods().collect(),
                },
            };
            let mut by_port: BTreeMap<u16, Vec<String>> = BTreeMap::new();
            for p in receivers {
                for (pr, port) in p.named_ports.get(port_name).into_iter().flatten() {
                    if *pr == protocol {
                        by_port.entry(*port).or_default().extend(self.ips_of(p));
                    }
                }
            }
            for (port, ips) in by_port {
                if ips.is_empty() {
                    continue;
                }
                let named_set = self.set(&format!("{what}/port{j}/{port}"), SetKind::HashIp, ips);
                match dir {
                    Dir::Ingress => {
                        for peers in peer_sets.clone() {
                            self.rule_line(
                                chain,
                                &Match {
                                    src: peers.as_deref(),
                                    dst: Some(&named_set),
                                    protocol: Some(protocol),
                                    ports: Some((port, port)),
                                },
                            );
                        }
                    }
                    Dir::Egress => self.rule_line(
                        chain,
                        &Match {
                            src: Some(target_set),
                            dst: Some(&named_set),
                            protocol: Some(protocol),
                            ports: Some((port, port)),
                        },
                    ),
                }
            }
        }
    }
}

/// The rules and sets node `node` loads for `snap`: chains for its isolated pods, the
/// policies selecting them, and the sets those use. Pure; ordered (byte-stable).
pub fn ruleset(snap: &Snapshot, node: &str) -> Ruleset {
    let mut out = Ruleset::default();
    for family in [Family::V4, Family::V6] {
        let mut b = Builder {
            snap,
            family,
            sets: BTreeMap::new(),
            chains: Vec::new(),
            lines: Vec::new(),
            policy_rules: 0,
        };
        let mut forward = vec![
            "-A FORWARD -j KUBE-ROUTER-FORWARD".to_string(),
            "-A KUBE-ROUTER-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
                .to_string(),
            "-A KUBE-ROUTER-FORWARD -m conntrack --ctstate INVALID -j DROP".to_string(),
        ];
        if family == Family::V6 {
            for t in ["neighbour-solicitation", "neighbour-advertisement"] {
                forward.push(format!(
                    "-A KUBE-ROUTER-FORWARD -p ipv6-icmp --icmpv6-type {t} -j ACCEPT"
                ));
            }
        }
        let mut policy_chains: BTreeMap<(String, bool), String> = BTreeMap::new();
        let local: Vec<&PodInfo> = snap
            .pods
            .values()
            .map(|p| p.as_ref())
            .filter(|p| {
                p.node.as_deref() == Some(node)
                    && !p.host_network
                    && p.identity != 0
                    && p.ips.iter().any(|ip| Family::of(ip) == family)
            })
            .collect();
        let mut pods_with_chains = 0;
        for pod in local {
            let Some(identity) = snap.identities.get(&pod.identity) else {
                continue;
            };
            let policies: Vec<(&String, &Policy)> = selecting(snap, identity).collect();
            let mut has_chain = false;
            for dir in [Dir::Egress, Dir::Ingress] {
                let isolating: Vec<(&String, &Policy)> = policies
                    .iter()
                    .copied()
                    .filter(|(_, p)| match dir {
                        Dir::Ingress => p.isolates_ingress,
                        Dir::Egress => p.isolates_egress,
                    })
                    .collect();
                if isolating.is_empty() {
                    continue;
                }
                has_chain = true;
                let pod_chain = name(
                    match dir {
                        Dir::Ingress => "KUBE-POD-IN-",
                        Dir::Egress => "KUBE-POD-EG-",
                    },
                    &pod.key(),
                );
                b.chains.push(pod_chain.clone());
                for ip in pod.ips.iter().filter(|ip| Family::of(ip) == family) {
                    forward.push(match dir {
                        Dir::Ingress => format!("-A KUBE-ROUTER-FORWARD -d {ip} -j {pod_chain}"),
                        Dir::Egress => format!("-A KUBE-ROUTER-FORWARD -s {ip} -j {pod_chain}"),
                    });
                }
                for (key, policy) in isolating {
                    let slot = (key.clone(), dir == Dir::Ingress);
                    let chain = match policy_chains.get(&slot) {
                        Some(c) => c.clone(),
                        None => {
                            let c = b.policy_chain(key, policy, dir);
                            policy_chains.insert(slot, c.clone());
                            c
                        }
                    };
                    b.lines.push(format!("-A {pod_chain} -j {chain}"));
                }
                b.lines.push(format!(
                    "-A {pod_chain} -m mark ! --mark {ACCEPTED_MARK} -j DROP"
                ));
                b.lines
                    .push(format!("-A {pod_chain} -j MARK --set-xmark 0x0/0x10000"));
            }
            pods_with_chains += usize::from(has_chain);
        }
        let mut table = String::from(
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-ROUTER-FORWARD - [0:0]\n",
        );
        for c in &b.chains {
            let _ = writeln!(table, ":{c} - [0:0]");
        }
        for l in forward.iter().chain(&b.lines) {
            table.push_str(l);
            table.push('\n');
        }
        table.push_str("COMMIT\n");
        match family {
            Family::V4 => {
                out.filter4 = table;
                out.pods = pods_with_chains;
            }
            Family::V6 => out.filter6 = table,
        }
        out.policy_rules += b.policy_rules;
        out.sets.extend(b.sets);
    }
    out
}

/// Runs `cmd` with `input` on stdin; its stderr in the error.
fn restore(cmd: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("running {cmd} (install iptables and ipset: cargo xtask setup)")
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

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

pub struct AgentOptions {
    pub source: Vec<PathBuf>,
    pub node: String,
    pub api_socket: PathBuf,
}

/// `netpol lab iptables-agent`: watches the source, and on every change renders the
/// whole ruleset and loads it (a full sync, as kube-router does), then publishes the
/// status `lab wait` waits on. Runs in the node's network namespace until SIGTERM.
pub fn run_agent(opts: AgentOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let (state_tx, mut state_rx) = watch::channel(dir::read_state(&opts.source));
        let paths = opts.source.clone();
        tokio::spawn(async move {
            if let Err(e) = dir::watch(paths, state_tx).await {
                tracing::error!(error = %format!("{e:#}"), "watching the manifest directory failed");
            }
        });
        let (status_tx, status_rx) = watch::channel(Status {
            node: opts.node.clone(),
            ..Default::default()
        });
        let (events_tx, _) = broadcast::channel::<Arc<str>>(1);
        let api =
            netpol_agent::api::server::serve(
                opts.api_socket.clone(),
                netpol_agent::api::server::Shared {
                    node: opts.node.clone(),
                    status: status_rx,
                    events: events_tx,
                    kernel: None,
                },
            )
            .await?;
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut index = Index::new();
        let mut loaded = BTreeSet::new();
        let mut syncs = 0u64;
        let mut state = state_rx.borrow_and_update().clone();
        loop {
            let snap = index.reset(&state);
            let t = std::time::Instant::now();
            let rs = ruleset(&snap, &opts.node);
            let rendered = t.elapsed();
            let t = std::time::Instant::now();
            let result = tokio::task::block_in_place(|| apply(&rs, &mut loaded));
            let loaded_in = t.elapsed();
            syncs += 1;
            let converged = match result {
                Ok(()) => {
                    tracing::info!(
                        pods = rs.pods,
                        policy_rules = rs.policy_rules,
                        sets = rs.sets.len(),
                        render_ms = rendered.as_secs_f64() * 1e3,
                        restore_ms = loaded_in.as_secs_f64() * 1e3,
                        "iptables synced"
                    );
                    true
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "loading the rules failed; the last ones stay");
                    false
                }
            };
            status_tx.send_replace(Status {
                node: opts.node.clone(),
                digest: snap.digest.clone(),
                converged,
                endpoints: rs.pods,
                policies: snap.policies.len(),
                identities: snap.identities.len(),
                policy_entries: rs.policy_rules,
                invalid: snap.invalid.clone(),
                syncs,
                ..Default::default()
            });
            tokio::select! {
                changed = state_rx.changed() => {
                    if changed.is_err() { break }
                    state = state_rx.borrow_and_update().clone();
                }
                _ = sigterm.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        api.abort();
        let _ = std::fs::remove_file(&opts.api_socket);
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(yaml: &str) -> netpol_engine::objects::ClusterState {
        netpol_engine::objects::ClusterState::from_text(yaml).unwrap()
    }

    const CLUSTER: &str = r#"
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
kind: Namespace
metadata: {name: y}
---
kind: Pod
metadata: {name: server, namespace: x, labels: {app: server}}
spec: {nodeName: node0, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.2, podIPs: [{ip: 10.244.0.2}, {ip: "fd00::af4:2"}]}
---
kind: Pod
metadata: {name: client, namespace: y, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c}]}
status: {podIP: 10.244.1.2, podIPs: [{ip: 10.244.1.2}]}
---
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}, {port: http}, {protocol: UDP, port: 5000, endPort: 5010}]
  - from: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]
  - from: [{podSelector: {matchLabels: {app: nobody}}}]
"#;

    #[test]
    fn a_policy_becomes_kube_router_chains_and_sets() {
        let snap = Index::new().reset(&state(CLUSTER));
        assert!(snap.invalid.is_empty(), "{:?}", snap.invalid);
        let rs = ruleset(&snap, "node0");
        let t = &rs.filter4;
        // The fast path comes first; the server has an ingress chain, nobody egress.
        let first = t.lines().position(|l| l.contains("ESTABLISHED")).unwrap();
        let jump = t
            .lines()
            .position(|l| l.contains("-d 10.244.0.2 -j KUBE-POD-IN-"))
            .unwrap();
        assert!(first < jump, "{t}");
        assert!(!t.contains("KUBE-POD-EG-"), "{t}");
        // Rule 0: the client's set, three ports (80, the named port's 8080, a range).
        let client_set = rs
            .sets
            .iter()
            .find(|(_, s)| s.members == vec!["10.244.1.2".to_string()])
            .map(|(n, _)| n.clone())
            .expect("a set of the client");
        let lines: Vec<&str> = t
            .lines()
            .filter(|l| l.contains(&format!("--match-set {client_set} src")))
            .collect();
        assert_eq!(lines.len(), 6, "{lines:#?}");
        assert!(lines[0].contains("-p tcp --dport 80 -j MARK --set-xmark 0x10000/0x10000"));
        assert!(lines[1].contains("-p tcp --dport 80 -m mark --mark 0x10000/0x10000 -j RETURN"));
        assert!(lines.iter().any(|l| l.contains("-p tcp --dport 8080")));
        assert!(lines.iter().any(|l| l.contains("-p udp --dport 5000:5010")));
        // Rule 1: a hash:net with the except as nomatch and /0 in halves; all ports.
        let net = rs
            .sets
            .values()
            .find(|s| s.kind == SetKind::HashNet && s.family == Family::V4)
            .unwrap();
        assert_eq!(
            net.members,
            ["0.0.0.0/1", "10.0.0.0/8 nomatch", "128.0.0.0/1"]
        );
        // Rule 2 selects no pod: no line, as kube-router.
        // Two lines per match: rule 0's three ports and rule 1's block, IPv4 only (the
        // client has no IPv6 address and the block is IPv4).
        assert_eq!(rs.policy_rules, 2 * (3 + 1));
        // IPv6: neighbour discovery passes; the client has no IPv6, so rule 0 is absent.
        assert!(rs.filter6.contains("neighbour-solicitation"));
        // Another node enforces nothing for x/server.
        let other = ruleset(&snap, "node1");
        assert!(!other.filter4.contains("KUBE-POD-"));
        assert_eq!(ruleset(&snap, "node0"), rs, "deterministic");
    }
}

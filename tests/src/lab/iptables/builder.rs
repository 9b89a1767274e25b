//! The ruleset built from a snapshot: per-pod chains, per-policy chains and the ipsets
//! they match, in kube-router's layout.

use netpol_engine::compile::{peer_selects, selecting};
use netpol_engine::index::net::addr_of;
use netpol_engine::index::{Peer, PodInfo, Policy, PortRef, Rule, Snapshot};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use super::*;

pub(super) struct Builder<'s> {
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

    fn pods(&self) -> impl Iterator<Item = &'s PodInfo> {
        crate::lab::fullsync::policy_pods(self.snap)
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

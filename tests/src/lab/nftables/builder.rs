//! The sets built from a snapshot: for each local pod a policy isolates, the elements
//! of every rule of the policies selecting it, with the pod as the target.

use netpol_engine::compile::{peer_selects, selecting};
use netpol_engine::index::net::{addr_of, Cidr};
use netpol_engine::index::{Peer, PodInfo, Policy, PortRef, Rule, Snapshot};
use std::collections::{BTreeMap, BTreeSet};

use super::ranges::{disjoint, minus, union};
use super::*;

/// Every port of a protocol.
const ALL_PORTS: Range = (0, 65535);

/// Who a rule lets in (ingress) or out (egress), resolved once per rule.
struct Peers<'s> {
    /// Peer addresses of the family: pods' addresses, blocks less their excepts.
    ranges: Vec<Range>,
    /// Pods among the peers (selected, or inside a block), where an egress named port
    /// resolves; None: every pod.
    pods: Option<Vec<&'s PodInfo>>,
}

/// Elements of one direction before they are made disjoint and written.
#[derive(Default)]
struct Raw {
    isolated: BTreeSet<u128>,
    /// (target, protocol) → (peers, ports).
    allow: BTreeMap<(u128, u8), Vec<(Range, Range)>>,
    /// target → peers.
    allow_all: BTreeMap<u128, Vec<Range>>,
}

struct Builder<'s> {
    snap: &'s Snapshot,
    family: Family,
    /// Peers of each (policy, direction, rule), shared by the policy's local targets.
    peers: BTreeMap<(&'s str, Dir, usize), Peers<'s>>,
}

impl<'s> Builder<'s> {
    fn ips_of(&self, pod: &PodInfo) -> Vec<u128> {
        pod.ips
            .iter()
            .filter(|ip| Family::of(ip) == self.family)
            .map(|ip| number(*ip))
            .collect()
    }

    fn pods(&self) -> impl Iterator<Item = &'s PodInfo> {
        crate::lab::fullsync::policy_pods(self.snap)
    }

    fn cidr_range(&self, c: &Cidr) -> Option<Range> {
        let net = c.net();
        (Family::of(&net.network()) == self.family)
            .then(|| (number(net.network()), number(net.broadcast())))
    }

    fn resolve(&self, policy: &Policy, rule: &Rule) -> Peers<'s> {
        let Some(peers) = &rule.peers else {
            return Peers {
                ranges: vec![self.family.all()],
                pods: None,
            };
        };
        let mut ranges = Vec::new();
        let mut pods: Vec<&'s PodInfo> = Vec::new();
        for peer in peers {
            match peer {
                Peer::Pods {
                    namespaces,
                    pods: selector,
                } => {
                    let own = namespaces.is_none().then_some(policy.namespace.as_str());
                    let selected: Vec<&PodInfo> = self
                        .pods()
                        .filter(|p| {
                            self.snap.identities.get(&p.identity).is_some_and(|k| {
                                peer_selects(own, namespaces.as_ref(), selector, k)
                            })
                        })
                        .collect();
                    ranges.extend(selected.iter().flat_map(|p| self.ips_of(p)).map(|a| (a, a)));
                    pods.extend(selected);
                }
                Peer::Block { cidr, except } => {
                    if let Some(whole) = self.cidr_range(cidr) {
                        let holes: Vec<Range> =
                            except.iter().filter_map(|x| self.cidr_range(x)).collect();
                        ranges.extend(minus(whole, &holes));
                    }
                    // Pods inside the block: where an egress named port resolves.
                    pods.extend(self.pods().filter(|p| {
                        p.ips.iter().any(|ip| {
                            let a = addr_of(*ip);
                            cidr.contains_addr(&a) && !except.iter().any(|x| x.contains_addr(&a))
                        })
                    }));
                }
                Peer::Nodes(_) => {}
            }
        }
        Peers {
            ranges,
            pods: Some(pods),
        }
    }

    /// The elements the rules of `policy` (`key`) in `dir` give target `pod`.
    fn policy(&mut self, raw: &mut Raw, key: &'s str, policy: &Policy, dir: Dir, pod: &PodInfo) {
        let rules = match dir {
            Dir::Ingress => &policy.ingress,
            Dir::Egress => &policy.egress,
        };
        for (i, rule) in rules.iter().enumerate() {
            if !self.peers.contains_key(&(key, dir, i)) {
                let peers = self.resolve(policy, rule);
                self.peers.insert((key, dir, i), peers);
            }
            self.rule(raw, &self.peers[&(key, dir, i)], rule, dir, pod);
        }
    }

    /// The elements one rule gives target `pod`.
    fn rule(&self, raw: &mut Raw, peers: &Peers, rule: &Rule, dir: Dir, pod: &PodInfo) {
        if peers.ranges.is_empty() {
            // No peer has an address of the family (or the selectors chose nobody).
            return;
        }
        for target in self.ips_of(pod) {
            let Some(specs) = &rule.ports else {
                raw.allow_all
                    .entry(target)
                    .or_default()
                    .extend(&peers.ranges);
                continue;
            };
            for spec in specs {
                let group = raw.allow.entry((target, spec.protocol)).or_default();
                let ports: Vec<Range> = match &spec.port {
                    None => vec![ALL_PORTS],
                    Some(PortRef::Number(n)) => {
                        vec![(u128::from(*n), u128::from(spec.end_port.unwrap_or(*n)))]
                    }
                    // A named port resolves on the receiving pod: for ingress the target
                    // itself (any peer), ...
                    Some(PortRef::Name(name)) if dir == Dir::Ingress => {
                        named(pod, name, spec.protocol).map(|p| (p, p)).collect()
                    }
                    // ... for egress each peer pod (to that pod's addresses only).
                    Some(PortRef::Name(name)) => {
                        let receivers: Vec<&PodInfo> = match &peers.pods {
                            Some(pods) => pods.clone(),
                            None => self.pods().collect(),
                        };
                        for p in receivers {
                            // Only the pod's addresses a peer covers: a pod in an ipBlock
                            // of one family is no peer by its address of the other.
                            let covered: Vec<u128> = self
                                .ips_of(p)
                                .into_iter()
                                .filter(|a| peers.ranges.iter().any(|(lo, hi)| lo <= a && a <= hi))
                                .collect();
                            for port in named(p, name, spec.protocol) {
                                group.extend(covered.iter().map(|a| ((*a, *a), (port, port))));
                            }
                        }
                        continue;
                    }
                };
                group.extend(
                    peers
                        .ranges
                        .iter()
                        .flat_map(|r| ports.iter().map(move |p| (*r, *p))),
                );
            }
        }
    }

    /// The table of this family for node `node`, and its pods that are isolated
    /// (namespace, name).
    fn table(&mut self, node: &str) -> (Table, BTreeSet<(&'s str, &'s str)>) {
        let snap = self.snap;
        let mut raw: BTreeMap<Dir, Raw> = BTreeMap::new();
        let mut isolated_pods = BTreeSet::new();
        let local: Vec<&'s PodInfo> = self
            .pods()
            .filter(|p| p.node.as_deref() == Some(node))
            .collect();
        for pod in local {
            let Some(identity) = snap.identities.get(&pod.identity) else {
                continue;
            };
            if self.ips_of(pod).is_empty() {
                continue;
            }
            let policies: Vec<(&'s String, &'s Policy)> = selecting(snap, identity).collect();
            for dir in [Dir::Ingress, Dir::Egress] {
                let isolating = policies.iter().filter(|(_, p)| match dir {
                    Dir::Ingress => p.isolates_ingress,
                    Dir::Egress => p.isolates_egress,
                });
                let mut any = false;
                let r = raw.entry(dir).or_default();
                for (key, policy) in isolating {
                    any = true;
                    self.policy(r, key.as_str(), policy, dir, pod);
                }
                if any {
                    r.isolated.extend(self.ips_of(pod));
                    isolated_pods.insert((pod.namespace.as_str(), pod.name.as_str()));
                }
            }
        }
        let mut sets = |dir| self.sets(raw.remove(&dir).unwrap_or_default());
        let table = Table {
            ingress: sets(Dir::Ingress),
            egress: sets(Dir::Egress),
        };
        (table, isolated_pods)
    }

    /// The sets' elements in nft's syntax, made disjoint per target and protocol.
    fn sets(&self, raw: Raw) -> Sets {
        let f = self.family;
        let mut out = Sets {
            isolated: raw.isolated.iter().map(|a| f.addr(*a)).collect(),
            ..Sets::default()
        };
        for ((target, p), rects) in raw.allow {
            for (peers, ports) in disjoint(rects) {
                out.allow.push(format!(
                    "{} . {} . {} . {}",
                    f.addr(target),
                    f.range(peers),
                    protocol(p),
                    super::ports(ports)
                ));
            }
        }
        for (target, peers) in raw.allow_all {
            for r in union(peers) {
                out.allow_all
                    .push(format!("{} . {}", f.addr(target), f.range(r)));
            }
        }
        out
    }
}

/// The port numbers `pod` gives port `name` on `protocol`.
fn named<'p>(pod: &'p PodInfo, name: &str, protocol: u8) -> impl Iterator<Item = u128> + 'p {
    pod.named_ports
        .get(name)
        .into_iter()
        .flatten()
        .filter(move |(p, _)| *p == protocol)
        .map(|(_, port)| u128::from(*port))
}

/// The sets node `node` loads for `snap`. Pure; ordered (byte-stable).
pub fn ruleset(snap: &Snapshot, node: &str) -> Ruleset {
    let mut out = Ruleset::default();
    let mut isolated = BTreeSet::new();
    for family in [Family::V4, Family::V6] {
        let mut b = Builder {
            snap,
            family,
            peers: BTreeMap::new(),
        };
        let (table, pods) = b.table(node);
        out.policy_rules += [&table.ingress, &table.egress]
            .iter()
            .map(|s| s.allow.len() + s.allow_all.len())
            .sum::<usize>();
        isolated.extend(pods);
        match family {
            Family::V4 => out.v4 = table,
            Family::V6 => out.v6 = table,
        }
    }
    out.pods = isolated.len();
    out
}

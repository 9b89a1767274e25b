//! A pure function from a snapshot of the cluster to the desired contents of every
//! map on one node. No I/O, no kernel, no async: NetworkPolicy semantics live here.
//!
//! source ──► index ──► **compile** ──► datapath ──► events
//!
//! Policy entries are keyed by the *subject identity* (pods with equal namespace
//! labels, labels and named ports get identical entries), so 10k pods with 50 label
//! sets need 50 sets of entries, and an endpoint points at its identity's entries.

pub mod cidr;
pub mod lookup;
pub mod ports;
pub mod reference;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use netpol_common::{
    direction, endpoint_flags, identity, policy_action, CidrEntry, EndpointEntry, IpcacheEntry,
    PolicyEntry, PolicyKey,
};

use crate::index::net::{addr_of, Cidr};
use crate::index::{IdentityKey, Peer, PodKey, Policy, PortRef, Rule, Selector, Snapshot};

/// What compile needs to know about the node it compiles for.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    /// `None`: compile every pod as local (simulate, tests).
    pub node: Option<String>,
    /// The node's own addresses (identity HOST).
    pub host_addrs: Vec<IpAddr>,
}

/// A policy trie key with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyPrefix {
    pub key: PolicyKey,
    pub prefix_len: u32,
}

/// Which policy rule a cookie names.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuleRef {
    /// `namespace/name`.
    pub policy: String,
    pub direction: String,
    pub rule: usize,
}

/// The desired contents of every map on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Local pods with an address, by pod key.
    pub endpoints: BTreeMap<PodKey, EndpointEntry>,
    pub ipcache: BTreeMap<Cidr, IpcacheEntry>,
    pub cidrs: BTreeMap<Cidr, CidrEntry>,
    pub policy: BTreeMap<PolicyPrefix, PolicyEntry>,
    pub rules: BTreeMap<u32, RuleRef>,
}

impl Desired {
    /// Map entries that differ from `other` (added, removed or changed): the writes a
    /// sync from one to the other makes.
    pub fn changes(&self, other: &Desired) -> usize {
        fn diff<K: Ord, V: PartialEq>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> usize {
            a.iter().filter(|(k, v)| b.get(k) != Some(v)).count()
                + b.keys().filter(|k| !a.contains_key(k)).count()
        }
        diff(&self.endpoints, &other.endpoints)
            + diff(&self.ipcache, &other.ipcache)
            + diff(&self.cidrs, &other.cidrs)
            + diff(&self.policy, &other.policy)
    }

    /// Entries in all maps.
    pub fn len(&self) -> usize {
        self.endpoints.len() + self.ipcache.len() + self.cidrs.len() + self.policy.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub fn cookie(policy_id: u32, dir: u8, rule: usize) -> u32 {
    (policy_id << 12) | ((dir as u32) << 11) | (rule as u32 & 0x7ff)
}

/// Compiles successive snapshots, reusing what did not change: peer selectors are
/// resolved once and then only tested against identities that appear, and a subject
/// identity's entries are recompiled only when something they depend on changed (its
/// policies, the resolution of their peers, the ipBlock partition). The desired policy
/// map is patched per subject; subjects own disjoint keys (they lead every key).
pub struct Compiler {
    desired: Desired,
    /// The identities the peer resolutions were last brought up to date with.
    known: BTreeMap<u32, IdentityKey>,
    peers: HashMap<PodPeer, Resolved>,
    /// Per policy: the model last compiled and its version.
    policies: HashMap<String, (Arc<Policy>, u64)>,
    partition: (cidr::Partition, u64),
    identities_version: u64,
    subjects: HashMap<u32, Subject>,
    next_version: u64,
    next_revision: u32,
}

/// A pod peer, with the namespace a bare podSelector is relative to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PodPeer {
    /// The policy's namespace when there is no namespace selector.
    own_namespace: Option<String>,
    namespaces: Option<Selector>,
    pods: Selector,
}

impl PodPeer {
    fn matches(&self, k: &IdentityKey) -> bool {
        let ns_ok = match (&self.namespaces, &self.own_namespace) {
            (Some(sel), _) => sel.matches(&k.namespace_labels),
            (None, Some(ns)) => &k.namespace == ns,
            (None, None) => false,
        };
        ns_ok && self.pods.matches(&k.labels)
    }
}

struct Resolved {
    ids: Vec<u32>,
    version: u64,
    used: bool,
}

/// What a subject's entries were compiled from; equal fingerprints, equal entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Fingerprint {
    policies: Vec<(u32, u64)>,
    peers: Vec<u64>,
    partition: u64,
    identities: u64,
}

struct Subject {
    fingerprint: Fingerprint,
    entries: Vec<(PolicyPrefix, PolicyEntry)>,
    flags: u32,
    revision: u32,
}

impl Default for Compiler {
    fn default() -> Self {
        // Revisions only need to differ from those conntrack entries may still carry
        // (from an agent before this one), so start somewhere new.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u32)
            .unwrap_or(1);
        Compiler::with_revision_seed(seed)
    }
}

impl Compiler {
    pub fn new() -> Compiler {
        Compiler::default()
    }

    /// A compiler whose revisions start at `seed` (deterministic output, for tests).
    pub fn with_revision_seed(seed: u32) -> Compiler {
        Compiler {
            desired: Desired::default(),
            known: BTreeMap::new(),
            peers: HashMap::new(),
            policies: HashMap::new(),
            partition: (cidr::Partition::default(), 0),
            identities_version: 0,
            subjects: HashMap::new(),
            next_version: 1,
            next_revision: seed | 1,
        }
    }

    fn version(&mut self) -> u64 {
        self.next_version += 1;
        self.next_version
    }

    pub fn compile(&mut self, snap: &Snapshot, view: &NodeView) -> &Desired {
        self.track_identities(snap);
        self.track_policies(snap);
        let blocks = cidr::Partition::new(snap);
        if blocks != self.partition.0 {
            let v = self.version();
            self.partition = (blocks.clone(), v);
        }
        let mut out = Desired {
            policy: std::mem::take(&mut self.desired.policy),
            ..Default::default()
        };
        for addr in &view.host_addrs {
            out.ipcache.insert(
                Cidr::host(*addr),
                IpcacheEntry {
                    identity: identity::HOST,
                    endpoint: 0,
                },
            );
        }
        for pod in snap.pods.values() {
            let id = if pod.host_network {
                identity::HOST
            } else {
                pod.identity
            };
            for ip in &pod.ips {
                out.ipcache.entry(Cidr::host(*ip)).or_insert(IpcacheEntry {
                    identity: id,
                    endpoint: 0,
                });
            }
        }
        for (c, id) in &blocks.prefixes {
            out.cidrs.insert(*c, CidrEntry { identity: *id });
        }
        for (key, policy) in &snap.policies {
            let id = snap.policy_ids[key];
            for (dir, rules) in [
                (direction::INGRESS, &policy.ingress),
                (direction::EGRESS, &policy.egress),
            ] {
                for i in 0..rules.len() {
                    let direction = if dir == direction::INGRESS {
                        "ingress"
                    } else {
                        "egress"
                    };
                    out.rules.insert(
                        cookie(id, dir, i),
                        RuleRef {
                            policy: key.clone(),
                            direction: direction.into(),
                            rule: i,
                        },
                    );
                }
            }
        }

        let by_namespace = policies_by_namespace(snap);
        let mut live: HashMap<u32, ()> = HashMap::new();
        for pod in snap.pods.values() {
            if pod.host_network
                || pod.ips.is_empty()
                || (view.node.is_some() && pod.node != view.node)
            {
                continue;
            }
            if live.insert(pod.identity, ()).is_none() {
                self.subject(snap, &by_namespace, &blocks, pod.identity, &mut out.policy);
            }
            let subject = &self.subjects[&pod.identity];
            let audit = if snap.audit_namespaces.contains(&pod.namespace) {
                endpoint_flags::AUDIT
            } else {
                0
            };
            let mut ep = EndpointEntry {
                id: pod.identity,
                flags: subject.flags | audit,
                revision: subject.revision,
                identity: pod.identity,
                ..Default::default()
            };
            for ip in &pod.ips {
                match ip {
                    IpAddr::V4(_) => ep.ipv4 = addr_of(*ip),
                    IpAddr::V6(_) => ep.ipv6 = addr_of(*ip),
                }
            }
            out.endpoints.insert(pod.key(), ep);
            if let Some(e) = out.ipcache.get_mut(&Cidr::host(pod.ips[0])) {
                e.endpoint = pod.identity;
            }
        }
        // Subjects with no local pod left: their entries go.
        let gone: Vec<u32> = self
            .subjects
            .keys()
            .filter(|id| !live.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            let s = self.subjects.remove(&id).expect("listed above");
            for (k, _) in s.entries {
                out.policy.remove(&k);
            }
        }
        self.peers.retain(|_, r| std::mem::take(&mut r.used));
        self.desired = out;
        &self.desired
    }

    /// Brings every cached peer resolution up to date with the identities that
    /// appeared and disappeared since the last compile.
    fn track_identities(&mut self, snap: &Snapshot) {
        let removed: Vec<u32> = self
            .known
            .keys()
            .filter(|id| !snap.identities.contains_key(id))
            .copied()
            .collect();
        let added: Vec<(&u32, &IdentityKey)> = snap
            .identities
            .iter()
            .filter(|(id, _)| !self.known.contains_key(id))
            .collect();
        if removed.is_empty() && added.is_empty() {
            return;
        }
        let mut bumped = 0;
        for (peer, r) in self.peers.iter_mut() {
            let before = r.ids.len();
            r.ids.retain(|id| !removed.contains(id));
            let mut changed = r.ids.len() != before;
            for (id, key) in &added {
                if peer.matches(key) {
                    r.ids.push(**id);
                    changed = true;
                }
            }
            if changed {
                r.ids.sort_unstable();
                r.version = 0; // assigned below
                bumped += 1;
            }
        }
        if bumped > 0 {
            for r in self.peers.values_mut().filter(|r| r.version == 0) {
                self.next_version += 1;
                r.version = self.next_version;
            }
        }
        for id in removed {
            self.known.remove(&id);
        }
        for (id, key) in added {
            self.known.insert(*id, key.clone());
        }
        self.identities_version = self.version();
    }

    fn track_policies(&mut self, snap: &Snapshot) {
        self.policies.retain(|k, _| snap.policies.contains_key(k));
        for (key, p) in &snap.policies {
            let same = self
                .policies
                .get(key)
                .is_some_and(|(old, _)| Arc::ptr_eq(old, p) || **old == **p);
            if !same {
                let v = self.version();
                self.policies.insert(key.clone(), (p.clone(), v));
            }
        }
    }

    fn resolve(&mut self, snap: &Snapshot, peer: PodPeer) -> (Vec<u32>, u64) {
        if let Some(r) = self.peers.get_mut(&peer) {
            r.used = true;
            return (r.ids.clone(), r.version);
        }
        let ids: Vec<u32> = snap
            .identities
            .iter()
            .filter(|(_, k)| peer.matches(k))
            .map(|(id, _)| *id)
            .collect();
        let version = self.version();
        self.peers.insert(
            peer,
            Resolved {
                ids: ids.clone(),
                version,
                used: true,
            },
        );
        (ids, version)
    }

    /// Compiles one subject identity's entries into `policy` unless its fingerprint
    /// shows nothing changed.
    fn subject(
        &mut self,
        snap: &Snapshot,
        by_namespace: &HashMap<&str, Vec<&String>>,
        blocks: &cidr::Partition,
        id: u32,
        policy: &mut BTreeMap<PolicyPrefix, PolicyEntry>,
    ) {
        let key = &snap.identities[&id];
        let selecting: Vec<(&String, &Policy)> = by_namespace
            .get(key.namespace.as_str())
            .into_iter()
            .flatten()
            .map(|k| (*k, snap.policies[*k].as_ref()))
            .filter(|(_, p)| p.pod_selector.matches(&key.labels))
            .collect();
        // Resolve every pod peer (cheap when cached) and fingerprint the inputs.
        let mut fp = Fingerprint::default();
        let mut resolved: Vec<Vec<u32>> = Vec::new();
        let mut uses_blocks = false;
        let mut named_egress = false;
        for (k, p) in &selecting {
            fp.policies.push((snap.policy_ids[*k], self.policies[*k].1));
            for (rules, egress) in [(&p.ingress, false), (&p.egress, true)] {
                for rule in rules {
                    named_egress |= egress
                        && rule
                            .ports
                            .iter()
                            .flatten()
                            .any(|s| matches!(s.port, Some(PortRef::Name(_))));
                    for peer in rule.peers.iter().flatten() {
                        match peer {
                            Peer::Pods { namespaces, pods } => {
                                let pp = PodPeer {
                                    own_namespace: namespaces
                                        .is_none()
                                        .then(|| p.namespace.clone()),
                                    namespaces: namespaces.clone(),
                                    pods: pods.clone(),
                                };
                                let (ids, v) = self.resolve(snap, pp);
                                fp.peers.push(v);
                                resolved.push(ids);
                            }
                            Peer::Block { .. } => uses_blocks = true,
                        }
                    }
                }
            }
        }
        if uses_blocks || named_egress {
            fp.partition = self.partition.1;
        }
        if named_egress {
            fp.identities = self.identities_version;
        }
        if self.subjects.get(&id).is_some_and(|s| s.fingerprint == fp) {
            return;
        }

        let mut entries: BTreeMap<PolicyPrefix, PolicyEntry> = BTreeMap::new();
        let mut flags = 0;
        let mut resolved = resolved.into_iter();
        for (k, p) in &selecting {
            let policy_id = snap.policy_ids[*k];
            for (dir, isolates, rules, flag) in [
                (
                    direction::INGRESS,
                    p.isolates_ingress,
                    &p.ingress,
                    endpoint_flags::ISOLATED_INGRESS,
                ),
                (
                    direction::EGRESS,
                    p.isolates_egress,
                    &p.egress,
                    endpoint_flags::ISOLATED_EGRESS,
                ),
            ] {
                if isolates {
                    flags |= flag;
                }
                for (i, rule) in rules.iter().enumerate() {
                    // Peers were resolved in this same order above.
                    let peers: Option<Vec<u32>> = rule.peers.as_ref().map(|peers| {
                        let mut ids = Vec::new();
                        for peer in peers {
                            match peer {
                                Peer::Pods { .. } => {
                                    ids.extend(resolved.next().expect("resolved above"))
                                }
                                Peer::Block { .. } => ids.extend(blocks.identities_of(peer)),
                            }
                        }
                        ids.sort_unstable();
                        ids.dedup();
                        ids
                    });
                    if !isolates {
                        continue;
                    }
                    let c = cookie(policy_id, dir, i);
                    for (peer, protocol, port_prefix) in
                        rule_entries(snap, blocks, key, dir, rule, peers)
                    {
                        let (port_be, bits) = match (protocol, port_prefix) {
                            (None, _) => ([0, 0], PolicyKey::FIXED_BITS),
                            (Some(_), None) => ([0, 0], PolicyKey::PROTO_BITS),
                            (Some(_), Some((port, len))) => {
                                (port.to_be_bytes(), PolicyKey::PROTO_BITS + len as u32)
                            }
                        };
                        let prefix = PolicyPrefix {
                            key: PolicyKey {
                                endpoint: id,
                                identity: peer,
                                direction: dir,
                                protocol: protocol.unwrap_or(0),
                                port_be,
                            },
                            prefix_len: bits,
                        };
                        entries.entry(prefix).or_insert(PolicyEntry {
                            cookie: c,
                            action: policy_action::ALLOW,
                            precedence: 0,
                        });
                    }
                }
            }
        }
        let entries: Vec<(PolicyPrefix, PolicyEntry)> = entries.into_iter().collect();

        // The revision moves when something allowed before is not any more (or the
        // isolation changed), so conntrack re-judges what it let through; additions
        // alone keep it, and the endpoint entries with it.
        let old = self.subjects.remove(&id);
        let revision = match &old {
            Some(o) if o.flags == flags && is_subset(&o.entries, &entries) => o.revision,
            _ => {
                self.next_revision = self.next_revision.wrapping_add(2) | 1;
                self.next_revision
            }
        };
        if let Some(o) = &old {
            for (k, _) in &o.entries {
                policy.remove(k);
            }
        }
        policy.extend(entries.iter().copied());
        self.subjects.insert(
            id,
            Subject {
                fingerprint: fp,
                entries,
                flags,
                revision,
            },
        );
    }
}

/// Both sorted by key: every entry of `a` is in `b` with the same value.
fn is_subset(a: &[(PolicyPrefix, PolicyEntry)], b: &[(PolicyPrefix, PolicyEntry)]) -> bool {
    a.iter().all(|(k, v)| {
        b.binary_search_by(|(bk, _)| bk.cmp(k))
            .is_ok_and(|i| b[i].1 == *v)
    })
}

fn policies_by_namespace(snap: &Snapshot) -> HashMap<&str, Vec<&String>> {
    let mut m: HashMap<&str, Vec<&String>> = HashMap::new();
    for (k, p) in &snap.policies {
        m.entry(p.namespace.as_str()).or_default().push(k);
    }
    m
}

/// One full compile, deterministic (simulate, tests).
pub fn compile(snap: &Snapshot, view: &NodeView) -> Desired {
    Compiler::with_revision_seed(1).compile(snap, view).clone()
}

/// The policies that select a subject, in a stable order.
pub fn selecting<'a>(
    snap: &'a Snapshot,
    subject: &'a IdentityKey,
) -> impl Iterator<Item = (&'a String, &'a Policy)> {
    snap.policies
        .iter()
        .filter(move |(_, p)| {
            p.namespace == subject.namespace && p.pod_selector.matches(&subject.labels)
        })
        .map(|(k, p)| (k, p.as_ref()))
}

/// (peer identity, protocol (None = any), port prefix (None = any port)) for one rule.
type RuleEntry = (u32, Option<u8>, Option<(u16, u8)>);

fn rule_entries(
    snap: &Snapshot,
    blocks: &cidr::Partition,
    subject: &IdentityKey,
    dir: u8,
    rule: &Rule,
    peers: Option<Vec<u32>>,
) -> Vec<RuleEntry> {
    let peers = peers.unwrap_or_else(|| vec![identity::ANY]);
    let mut out = Vec::new();
    let Some(ports) = &rule.ports else {
        out.extend(peers.iter().map(|p| (*p, None, None)));
        return out;
    };
    for spec in ports {
        match &spec.port {
            None => out.extend(peers.iter().map(|p| (*p, Some(spec.protocol), None))),
            Some(PortRef::Number(start)) => {
                for pfx in ports::range_prefixes(*start, spec.end_port.unwrap_or(*start)) {
                    out.extend(peers.iter().map(|p| (*p, Some(spec.protocol), Some(pfx))));
                }
            }
            Some(PortRef::Name(name)) => {
                // A named port resolves against the destination pod's container ports:
                // the subject's own for ingress, each peer's for egress.
                let resolve = |k: &IdentityKey| -> Vec<u16> {
                    k.named_ports
                        .get(name)
                        .into_iter()
                        .flatten()
                        .filter(|(pr, _)| *pr == spec.protocol)
                        .map(|(_, p)| *p)
                        .collect()
                };
                if dir == direction::INGRESS {
                    for port in resolve(subject) {
                        out.extend(
                            peers
                                .iter()
                                .map(|p| (*p, Some(spec.protocol), Some((port, 16)))),
                        );
                    }
                } else {
                    for peer in &peers {
                        // (key identity, the pod identity that names the port)
                        let targets: Vec<(u32, u32)> = if *peer == identity::ANY {
                            snap.identities.keys().map(|t| (*t, *t)).collect()
                        } else if snap.identities.contains_key(peer) {
                            vec![(*peer, *peer)]
                        } else {
                            // An ipBlock: only the pods in it name ports.
                            blocks
                                .pod_of(*peer)
                                .map(|t| (*peer, t))
                                .into_iter()
                                .collect()
                        };
                        for (key, t) in targets {
                            for port in resolve(&snap.identities[&t]) {
                                out.push((key, Some(spec.protocol), Some((port, 16))));
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;

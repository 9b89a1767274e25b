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

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use netpol_common::policy::stronger;
use netpol_common::{
    direction, endpoint_flags, identity, policy_action, CidrEntry, EndpointEntry, IpcacheEntry,
    PolicyEntry, PolicyKey,
};

use crate::index::cluster::{Action, ClusterPolicy, Tier};
use crate::index::net::{addr_of, Cidr};
use crate::index::{IdentityKey, Peer, PodInfo, PodKey, Policy, PortRef, Rule, Selector, Snapshot};

/// What compile needs to know about the node it compiles for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
    /// Per policy: the model last compiled, its version and its pod peers.
    policies: HashMap<String, CachedPolicy>,
    /// Per cluster policy (`Kind/name`): the same, and the precedence of its rule 0.
    cluster: HashMap<String, CachedCluster>,
    /// Bumped whenever any cluster policy, its peers, or their order changes.
    cluster_version: u64,
    partition: (cidr::Partition, u64),
    identities_version: u64,
    subjects: HashMap<u32, Subject>,
    next_version: u64,
    next_revision: u32,
    /// The node view and pods the endpoints and ipcache were last built from.
    view: Option<NodeView>,
    pods: BTreeMap<PodKey, Arc<PodInfo>>,
    /// Pods claiming each address (the first, in key order, owns it).
    claims: HashMap<IpAddr, std::collections::BTreeSet<PodKey>>,
    /// Local endpoint pods of each subject identity.
    by_identity: BTreeMap<u32, std::collections::BTreeSet<PodKey>>,
    audit: std::collections::BTreeSet<String>,
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
        peer_selects(
            self.own_namespace.as_deref(),
            self.namespaces.as_ref(),
            &self.pods,
            k,
        )
    }
}

/// Whether a pod peer selects the pods of identity `k`: `namespaces` over the namespace's
/// labels, else (a bare podSelector) the policy's own namespace, and `pods` over the pod's
/// labels. The one definition of peer selection, for the compiler and for anything else
/// that resolves peers (the lab's iptables enforcer).
pub fn peer_selects(
    own_namespace: Option<&str>,
    namespaces: Option<&Selector>,
    pods: &Selector,
    k: &IdentityKey,
) -> bool {
    let ns_ok = match (namespaces, own_namespace) {
        (Some(sel), _) => sel.matches(&k.namespace_labels),
        (None, Some(ns)) => k.namespace == ns,
        (None, None) => false,
    };
    ns_ok && pods.matches(&k.labels)
}

struct CachedPolicy {
    policy: Arc<Policy>,
    version: u64,
    /// Pod peers of every rule, ingress then egress, in rule order.
    peers: Vec<PodPeer>,
    /// max(version, versions of the peers' resolutions): versions only grow, so this
    /// changes whenever the policy or what its peers resolve to changes.
    effective: u64,
}

impl CachedPolicy {
    fn new(policy: Arc<Policy>, version: u64) -> CachedPolicy {
        let mut peers = Vec::new();
        for rule in policy.ingress.iter().chain(&policy.egress) {
            for peer in rule.peers.iter().flatten() {
                if let Peer::Pods { namespaces, pods } = peer {
                    peers.push(PodPeer {
                        own_namespace: namespaces.is_none().then(|| policy.namespace.clone()),
                        namespaces: namespaces.clone(),
                        pods: pods.clone(),
                    });
                }
            }
        }
        CachedPolicy {
            policy,
            version,
            peers,
            effective: version,
        }
    }
}

struct CachedCluster {
    policy: Arc<ClusterPolicy>,
    peers: Vec<PodPeer>,
    /// Precedence of rule 0; rule i has `base - i` (within a tier; higher wins).
    base: u16,
    /// The highest version among its peers' resolutions (see `CachedPolicy`).
    peers_version: u64,
}

/// Pod peers of every rule of a cluster policy, ingress then egress, in rule order.
fn cluster_peers(p: &ClusterPolicy) -> Vec<PodPeer> {
    let mut peers = Vec::new();
    for r in p.ingress.iter().chain(&p.egress) {
        for peer in r.rule.peers.iter().flatten() {
            if let Peer::Pods { namespaces, pods } = peer {
                peers.push(PodPeer {
                    own_namespace: None,
                    namespaces: namespaces.clone(),
                    pods: pods.clone(),
                });
            }
        }
    }
    peers
}

struct Resolved {
    ids: Vec<u32>,
    version: u64,
    used: bool,
}

/// What a subject's entries were compiled from; equal fingerprints, equal entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Fingerprint {
    /// (policy id, effective version) of each selecting policy.
    policies: Vec<(u32, u64)>,
    /// The cluster policies' version, when any selects the subject.
    cluster: u64,
    partition: u64,
    identities: u64,
}

struct Subject {
    fingerprint: Fingerprint,
    /// Whether its rules use ipBlocks (the partition) or egress named ports (every
    /// identity's ports): then those changes concern it too.
    uses_blocks: bool,
    named_egress: bool,
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
            cluster: HashMap::new(),
            cluster_version: 0,
            partition: (cidr::Partition::default(), 0),
            identities_version: 0,
            subjects: HashMap::new(),
            next_version: 1,
            next_revision: seed | 1,
            view: None,
            pods: BTreeMap::new(),
            claims: HashMap::new(),
            by_identity: BTreeMap::new(),
            audit: Default::default(),
        }
    }

    fn version(&mut self) -> u64 {
        self.next_version += 1;
        self.next_version
    }

    pub fn compile(&mut self, snap: &Snapshot, view: &NodeView) -> &Desired {
        let identities_changed = self.track_identities(snap);
        let changed_namespaces = self.track_policies(snap);
        let cluster_changed = self.track_cluster(snap);
        let policies_changed = !changed_namespaces.is_empty() || cluster_changed;
        let blocks = cidr::Partition::new(snap);
        let partition_changed = blocks != self.partition.0;
        if partition_changed {
            let v = self.version();
            self.partition = (blocks.clone(), v);
            self.desired.cidrs = blocks
                .prefixes
                .iter()
                .map(|(c, id)| (*c, CidrEntry { identity: *id }))
                .collect();
        }
        if policies_changed {
            self.desired.rules = rule_refs(snap);
        }
        if self.view.as_ref() != Some(view) {
            // Another node view: build endpoints and ipcache from scratch.
            self.view = Some(view.clone());
            self.pods.clear();
            self.claims.clear();
            self.by_identity.clear();
            self.desired.endpoints.clear();
            self.desired.ipcache.clear();
            for addr in &view.host_addrs {
                self.desired.ipcache.insert(
                    Cidr::host(*addr),
                    IpcacheEntry {
                        identity: identity::HOST,
                        endpoint: 0,
                    },
                );
            }
        }

        // Pods that appeared, went or changed since the last compile.
        let mut touched_ips = Vec::new();
        let mut dirty_endpoints = std::collections::BTreeSet::new();
        for key in changed_pods(&self.pods, &snap.pods) {
            if let Some(old) = self.pods.remove(&key) {
                for ip in &old.ips {
                    if let Some(c) = self.claims.get_mut(ip) {
                        c.remove(&key);
                        if c.is_empty() {
                            self.claims.remove(ip);
                        }
                    }
                    touched_ips.push(*ip);
                }
                if let Some(set) = self.by_identity.get_mut(&old.identity) {
                    set.remove(&key);
                    if set.is_empty() {
                        self.by_identity.remove(&old.identity);
                    }
                }
                self.desired.endpoints.remove(&key);
            }
            if let Some(new) = snap.pods.get(&key) {
                for ip in &new.ips {
                    self.claims.entry(*ip).or_default().insert(key.clone());
                    touched_ips.push(*ip);
                }
                if is_local_endpoint(new, view) {
                    self.by_identity
                        .entry(new.identity)
                        .or_default()
                        .insert(key.clone());
                    dirty_endpoints.insert(key.clone());
                }
                self.pods.insert(key, new.clone());
            }
        }

        // Subjects: gone ones lose their entries; the others are checked against
        // their fingerprints, all of them when something global changed.
        let gone: Vec<u32> = self
            .subjects
            .keys()
            .filter(|id| !self.by_identity.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            let s = self.subjects.remove(&id).expect("listed above");
            for (k, _) in s.entries {
                self.desired.policy.remove(&k);
            }
        }
        let check: Vec<u32> = self
            .by_identity
            .keys()
            .filter(|id| match self.subjects.get(id) {
                None => true,
                Some(s) => {
                    cluster_changed
                        || changed_namespaces.contains(&snap.identities[id].namespace)
                        || (partition_changed && (s.uses_blocks || s.named_egress))
                        || (identities_changed && s.named_egress)
                }
            })
            .copied()
            .collect();
        if !check.is_empty() {
            let by_namespace = policies_by_namespace(snap);
            let mut policy = std::mem::take(&mut self.desired.policy);
            for id in check {
                if self.subject(snap, &by_namespace, &blocks, id, &mut policy) {
                    dirty_endpoints.extend(self.by_identity[&id].iter().cloned());
                }
            }
            self.desired.policy = policy;
        }
        if snap.audit_namespaces != self.audit {
            for ns in snap.audit_namespaces.symmetric_difference(&self.audit) {
                let prefix = format!("{ns}/");
                dirty_endpoints.extend(
                    self.pods
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(&prefix))
                        .filter(|(_, p)| is_local_endpoint(p, view))
                        .map(|(k, _)| k.clone()),
                );
            }
            self.audit = snap.audit_namespaces.clone();
        }

        for key in dirty_endpoints {
            let pod = &self.pods[&key];
            let subject = &self.subjects[&pod.identity];
            let audit = if self.audit.contains(&pod.namespace) {
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
            self.desired.endpoints.insert(key, ep);
        }
        for ip in touched_ips {
            let cidr = Cidr::host(ip);
            if view.host_addrs.contains(&ip) {
                continue; // the node's own, whoever else claims it
            }
            let owner = self
                .claims
                .get(&ip)
                .and_then(|c| c.first())
                .map(|k| &self.pods[k]);
            match owner {
                None => {
                    self.desired.ipcache.remove(&cidr);
                }
                Some(pod) => {
                    let (identity, endpoint) = if pod.host_network {
                        (identity::HOST, 0)
                    } else if is_local_endpoint(pod, view) {
                        (pod.identity, pod.identity)
                    } else {
                        (pod.identity, 0)
                    };
                    self.desired
                        .ipcache
                        .insert(cidr, IpcacheEntry { identity, endpoint });
                }
            }
        }
        self.peers.retain(|_, r| std::mem::take(&mut r.used));
        &self.desired
    }

    /// Brings every cached peer resolution up to date with the identities that
    /// appeared and disappeared since the last compile.
    fn track_identities(&mut self, snap: &Snapshot) -> bool {
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
            return false;
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
        true
    }

    /// Returns whether any policy was added, removed or changed.
    fn track_policies(&mut self, snap: &Snapshot) -> std::collections::BTreeSet<String> {
        // The namespaces of policies added, removed, edited, or whose peers now
        // resolve differently: only subjects there can be affected.
        let mut changed = std::collections::BTreeSet::new();
        self.policies.retain(|k, c| {
            let keep = snap.policies.contains_key(k);
            if !keep {
                changed.insert(c.policy.namespace.clone());
            }
            keep
        });
        for (key, p) in &snap.policies {
            let same = self
                .policies
                .get(key)
                .is_some_and(|c| Arc::ptr_eq(&c.policy, p) || *c.policy == **p);
            if !same {
                let v = self.version();
                self.policies
                    .insert(key.clone(), CachedPolicy::new(p.clone(), v));
                changed.insert(p.namespace.clone());
            }
        }
        // Resolve every pod peer (cached unless new) and take the effective versions.
        let mut policies = std::mem::take(&mut self.policies);
        for c in policies.values_mut() {
            let before = c.effective;
            c.effective = c.version;
            for peer in &c.peers {
                let v = self.resolve(snap, peer);
                c.effective = c.effective.max(v);
            }
            if c.effective != before {
                changed.insert(c.policy.namespace.clone());
            }
        }
        self.policies = policies;
        changed
    }

    /// Brings the cluster policies' cache up to date; returns whether anything about
    /// them (content, peers' resolution, order) changed.
    fn track_cluster(&mut self, snap: &Snapshot) -> bool {
        let mut changed = self.cluster.len() != snap.cluster_policies.len()
            || self
                .cluster
                .keys()
                .any(|k| !snap.cluster_policies.contains_key(k));
        self.cluster
            .retain(|k, _| snap.cluster_policies.contains_key(k));
        for (key, p) in &snap.cluster_policies {
            let same = self
                .cluster
                .get(key)
                .is_some_and(|c| Arc::ptr_eq(&c.policy, p) || *c.policy == **p);
            if !same {
                self.cluster.insert(
                    key.clone(),
                    CachedCluster {
                        policy: p.clone(),
                        peers: cluster_peers(p),
                        base: 0,
                        peers_version: 0,
                    },
                );
                changed = true;
            }
        }
        let mut cluster = std::mem::take(&mut self.cluster);
        for c in cluster.values_mut() {
            let mut v = 0;
            for peer in &c.peers {
                v = v.max(self.resolve(snap, peer));
            }
            changed |= v != c.peers_version;
            c.peers_version = v;
        }
        self.cluster = cluster;
        if changed {
            // Precedence: within each tier, policies in evaluation order, then rules in
            // written order; the first rule evaluated gets the highest number.
            let mut order: Vec<(&String, &CachedCluster)> = self.cluster.iter().collect();
            order.sort_by(|a, b| a.1.policy.order().cmp(&b.1.policy.order()));
            let mut bases = Vec::new();
            let mut next = (None, u16::MAX);
            for (key, c) in order {
                if next.0 != Some(c.policy.tier) {
                    next = (Some(c.policy.tier), u16::MAX);
                }
                bases.push((key.clone(), next.1));
                let rules = c.policy.ingress.len().max(c.policy.egress.len()) as u16;
                next.1 = next.1.saturating_sub(rules.max(1));
            }
            for (key, base) in bases {
                self.cluster.get_mut(&key).expect("listed above").base = base;
            }
            self.cluster_version = self.version();
        }
        changed
    }

    /// The version of `peer`'s resolution, resolving it if it is new.
    fn resolve(&mut self, snap: &Snapshot, peer: &PodPeer) -> u64 {
        if let Some(r) = self.peers.get_mut(peer) {
            r.used = true;
            return r.version;
        }
        let ids: Vec<u32> = snap
            .identities
            .iter()
            .filter(|(_, k)| peer.matches(k))
            .map(|(id, _)| *id)
            .collect();
        let version = self.version();
        self.peers.insert(
            peer.clone(),
            Resolved {
                ids,
                version,
                used: true,
            },
        );
        version
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
    ) -> bool {
        let key = &snap.identities[&id];
        let selecting: Vec<(&String, &Policy)> = by_namespace
            .get(key.namespace.as_str())
            .into_iter()
            .flatten()
            .map(|k| (*k, snap.policies[*k].as_ref()))
            .filter(|(_, p)| p.pod_selector.matches(&key.labels))
            .collect();
        // Fingerprint the inputs; peers were resolved in `track_policies`.
        let mut fp = Fingerprint::default();
        let mut uses_blocks = false;
        let mut named_egress = false;
        for (k, p) in &selecting {
            fp.policies
                .push((snap.policy_ids[*k], self.policies[*k].effective));
            for (rules, egress) in [(&p.ingress, false), (&p.egress, true)] {
                for rule in rules {
                    named_egress |= egress
                        && rule
                            .ports
                            .iter()
                            .flatten()
                            .any(|s| matches!(s.port, Some(PortRef::Name(_))));
                    uses_blocks |= rule
                        .peers
                        .iter()
                        .flatten()
                        .any(|peer| matches!(peer, Peer::Block { .. }));
                }
            }
        }
        let cluster: Vec<(&String, &ClusterPolicy, u16)> = self
            .cluster
            .iter()
            .filter(|(_, c)| {
                c.policy.namespaces.matches(&key.namespace_labels)
                    && c.policy.pods.matches(&key.labels)
            })
            .map(|(k, c)| (k, c.policy.as_ref(), c.base))
            .collect();
        if !cluster.is_empty() {
            fp.cluster = self.cluster_version;
            uses_blocks |= cluster.iter().any(|(_, p, _)| {
                p.ingress
                    .iter()
                    .chain(&p.egress)
                    .flat_map(|r| r.rule.peers.iter().flatten())
                    .any(|peer| matches!(peer, Peer::Block { .. } | Peer::Nodes(_)))
            });
        }
        if uses_blocks || named_egress {
            fp.partition = self.partition.1;
        }
        if named_egress {
            fp.identities = self.identities_version;
        }
        if self.subjects.get(&id).is_some_and(|s| s.fingerprint == fp) {
            return false;
        }

        // Audit-mode policies count in a direction only where no enforced policy
        // isolates the pod (there they could not drop anything more) and no Baseline
        // rule applies (staging must not lift a Baseline deny).
        let mut audit_counts = [false; 2];
        for dir in [direction::INGRESS, direction::EGRESS] {
            let isolating = |p: &Policy| {
                if dir == direction::INGRESS {
                    p.isolates_ingress
                } else {
                    p.isolates_egress
                }
            };
            let enforced = selecting.iter().any(|(_, p)| !p.audit && isolating(p));
            let baseline = cluster.iter().any(|(_, c, _)| {
                c.tier == Tier::Baseline
                    && !(if dir == direction::INGRESS {
                        &c.ingress
                    } else {
                        &c.egress
                    })
                    .is_empty()
            });
            audit_counts[dir as usize] = !enforced && !baseline;
        }
        let mut entries: Vec<(PolicyPrefix, PolicyEntry)> = Vec::new();
        let mut flags = 0;
        for (k, p) in &selecting {
            let policy_id = snap.policy_ids[*k];
            // The pod peers' resolutions, in the order the rules below meet them.
            let mut resolved = self.policies[*k].peers.iter().map(|pp| &self.peers[pp].ids);
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
                let isolates = isolates && (!p.audit || audit_counts[dir as usize]);
                if isolates {
                    flags |= flag;
                    if p.audit {
                        flags |= endpoint_flags::audit_of(dir);
                    }
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
                                Peer::Block { .. } | Peer::Nodes(_) => {
                                    ids.extend(blocks.identities_of(peer))
                                }
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
                        let prefix = prefix_of(id, peer, dir, protocol, port_prefix);
                        entries.push((
                            prefix,
                            PolicyEntry {
                                cookie: c,
                                action: policy_action::ALLOW,
                                precedence: 0,
                            },
                        ));
                    }
                }
            }
        }
        // Cluster-wide rules: Admin entries in their own key space, Baseline entries
        // only where NetworkPolicy does not isolate (there NetworkPolicy decides).
        for (ckey, p, base) in &cluster {
            let policy_id = snap.policy_ids[*ckey];
            let mut resolved = self.cluster[*ckey]
                .peers
                .iter()
                .map(|pp| &self.peers[pp].ids);
            for (dir, rules) in [
                (direction::INGRESS, &p.ingress),
                (direction::EGRESS, &p.egress),
            ] {
                let (isolated, admin_flag, baseline_flag) = if dir == direction::INGRESS {
                    (
                        flags & endpoint_flags::ISOLATED_INGRESS != 0,
                        endpoint_flags::ADMIN_INGRESS,
                        endpoint_flags::BASELINE_INGRESS,
                    )
                } else {
                    (
                        flags & endpoint_flags::ISOLATED_EGRESS != 0,
                        endpoint_flags::ADMIN_EGRESS,
                        endpoint_flags::BASELINE_EGRESS,
                    )
                };
                for (i, cr) in rules.iter().enumerate() {
                    let mut ids = Vec::new();
                    for peer in cr.rule.peers.iter().flatten() {
                        match peer {
                            Peer::Pods { .. } => {
                                ids.extend(resolved.next().expect("resolved in track_cluster"))
                            }
                            Peer::Block { .. } | Peer::Nodes(_) => {
                                ids.extend(blocks.identities_of(peer))
                            }
                        }
                    }
                    ids.sort_unstable();
                    ids.dedup();
                    let (key_dir, flag) = match p.tier {
                        Tier::Admin => (dir | direction::ADMIN_TIER, admin_flag),
                        Tier::Baseline if isolated => continue,
                        Tier::Baseline => (dir, baseline_flag),
                    };
                    let entry = PolicyEntry {
                        cookie: cookie(policy_id, dir, i),
                        action: match cr.action {
                            Action::Accept => policy_action::ALLOW,
                            Action::Deny => policy_action::DENY,
                            Action::Pass => policy_action::PASS,
                        },
                        precedence: base.saturating_sub(i as u16),
                    };
                    for (peer, protocol, port_prefix) in
                        rule_entries(snap, blocks, key, dir, &cr.rule, Some(ids))
                    {
                        entries.push((prefix_of(id, peer, key_dir, protocol, port_prefix), entry));
                        flags |= flag;
                    }
                }
            }
        }

        // One entry per key: the strongest (for NetworkPolicy, all equal: the first rule
        // that produced it names it; the sort is stable).
        entries.sort_by_key(|(k, _)| *k);
        entries.dedup_by(|later, first| {
            if later.0 != first.0 {
                return false;
            }
            if stronger(&later.1, &first.1) {
                first.1 = later.1;
            }
            true
        });
        if !cluster.is_empty() {
            push_down(&mut entries);
        }

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
        // Patch the map with the difference only (both lists are sorted by key).
        let old_entries: &[(PolicyPrefix, PolicyEntry)] = old.as_ref().map_or(&[], |o| &o.entries);
        for (k, _) in old_entries {
            if entries.binary_search_by(|(nk, _)| nk.cmp(k)).is_err() {
                policy.remove(k);
            }
        }
        for (k, v) in &entries {
            if policy.get(k) != Some(v) {
                policy.insert(*k, *v);
            }
        }
        let changed = old.is_none_or(|o| o.flags != flags || o.revision != revision);
        self.subjects.insert(
            id,
            Subject {
                fingerprint: fp,
                uses_blocks,
                named_egress,
                entries,
                flags,
                revision,
            },
        );
        changed
    }
}

/// The trie key of one entry: protocol `None` = any protocol, port `None` = any port.
fn prefix_of(
    endpoint: u32,
    peer: u32,
    direction: u8,
    protocol: Option<u8>,
    port_prefix: Option<(u16, u8)>,
) -> PolicyPrefix {
    let (port_be, bits) = match (protocol, port_prefix) {
        (None, _) => ([0, 0], PolicyKey::FIXED_BITS),
        (Some(_), None) => ([0, 0], PolicyKey::PROTO_BITS),
        (Some(_), Some((port, len))) => (port.to_be_bytes(), PolicyKey::PROTO_BITS + len as u32),
    };
    PolicyPrefix {
        key: PolicyKey {
            endpoint,
            identity: peer,
            direction,
            protocol: protocol.unwrap_or(0),
            port_be,
        },
        prefix_len: bits,
    }
}

/// The trie answers with the longest prefix only, so an entry must already hold the
/// strongest decision of every broader entry that covers it (a port-80 Accept under an
/// all-ports Deny of higher precedence must read Deny). Entries are sorted by key.
fn push_down(entries: &mut [(PolicyPrefix, PolicyEntry)]) {
    // Only entries of one (endpoint, identity, direction) can cover each other, and
    // the sort keeps each such group together.
    let group = |k: &PolicyPrefix| (k.key.endpoint, k.key.identity, k.key.direction);
    for chunk in entries.chunk_by_mut(|a, b| group(&a.0) == group(&b.0)) {
        let before: Vec<(PolicyPrefix, PolicyEntry)> = chunk.to_vec();
        for (k, v) in chunk.iter_mut() {
            for (bk, bv) in &before {
                if bk.prefix_len < k.prefix_len && lookup::covers(bk, k) && stronger(bv, v) {
                    *v = *bv;
                }
            }
        }
    }
}

/// Both sorted by key: every entry of `a` is in `b` with the same value.
fn is_subset(a: &[(PolicyPrefix, PolicyEntry)], b: &[(PolicyPrefix, PolicyEntry)]) -> bool {
    a.iter().all(|(k, v)| {
        b.binary_search_by(|(bk, _)| bk.cmp(k))
            .is_ok_and(|i| b[i].1 == *v)
    })
}

fn is_local_endpoint(pod: &PodInfo, view: &NodeView) -> bool {
    !pod.host_network && !pod.ips.is_empty() && (view.node.is_none() || pod.node == view.node)
}

/// Keys of pods added, removed or replaced between two pod maps (both sorted).
fn changed_pods(
    old: &BTreeMap<PodKey, Arc<PodInfo>>,
    new: &BTreeMap<PodKey, Arc<PodInfo>>,
) -> Vec<PodKey> {
    let mut out = Vec::new();
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return out,
            (Some((k, _)), None) => {
                out.push((*k).clone());
                a.next();
            }
            (None, Some((k, _))) => {
                out.push((*k).clone());
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.push((*ka).clone());
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push((*kb).clone());
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(va, vb) && va != vb {
                        out.push((*ka).clone());
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

/// cookie → the rule it names, for every rule of every policy, cluster-wide ones too.
fn rule_refs(snap: &Snapshot) -> BTreeMap<u32, RuleRef> {
    let mut out = BTreeMap::new();
    let mut add = |key: &String, dir: u8, name: &str, rules: usize| {
        for i in 0..rules {
            out.insert(
                cookie(snap.policy_ids[key], dir, i),
                RuleRef {
                    policy: key.clone(),
                    direction: name.into(),
                    rule: i,
                },
            );
        }
    };
    for (key, policy) in &snap.policies {
        add(key, direction::INGRESS, "ingress", policy.ingress.len());
        add(key, direction::EGRESS, "egress", policy.egress.len());
    }
    for (key, policy) in &snap.cluster_policies {
        add(key, direction::INGRESS, "ingress", policy.ingress.len());
        add(key, direction::EGRESS, "egress", policy.egress.len());
    }
    out
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

/// The policy-trie prefixes one rule contributes to `subject`'s entries in direction
/// `dir`, on its own (before rules are merged by key and precedence): what `lint`
/// compares to find a rule whose flows other rules already allow. `own_namespace` is
/// the namespace a bare podSelector means (a NetworkPolicy's; None for cluster rules).
pub fn rule_prefixes(
    snap: &Snapshot,
    blocks: &cidr::Partition,
    subject: u32,
    dir: u8,
    rule: &Rule,
    own_namespace: Option<&str>,
) -> Vec<PolicyPrefix> {
    let peers = rule.peers.as_ref().map(|peers| {
        let mut ids = Vec::new();
        for peer in peers {
            match peer {
                Peer::Pods { namespaces, pods } => {
                    let pp = PodPeer {
                        own_namespace: own_namespace
                            .filter(|_| namespaces.is_none())
                            .map(str::to_string),
                        namespaces: namespaces.clone(),
                        pods: pods.clone(),
                    };
                    ids.extend(
                        snap.identities
                            .iter()
                            .filter(|(_, k)| pp.matches(k))
                            .map(|(id, _)| *id),
                    );
                }
                Peer::Block { .. } | Peer::Nodes(_) => ids.extend(blocks.identities_of(peer)),
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    });
    rule_entries(snap, blocks, &snap.identities[&subject], dir, rule, peers)
        .into_iter()
        .map(|(peer, protocol, port)| prefix_of(subject, peer, dir, protocol, port))
        .collect()
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

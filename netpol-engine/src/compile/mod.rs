//! A pure function from a snapshot of the cluster to the desired contents of every
//! map on one node. No I/O, no kernel, no async: NetworkPolicy semantics live here.
//!
//! source ──► index ──► **compile** ──► datapath ──► events
//!
//! Policy entries are keyed by the *subject identity* (pods with equal namespace
//! labels, labels and named ports get identical entries), so 10k pods with 50 label
//! sets need 50 sets of entries, and an endpoint points at its identity's entries.

pub mod cidr;
mod entries;
mod incremental;
pub mod lookup;
pub mod ports;
mod subject;
mod track;

pub use entries::rule_prefixes;
pub use subject::selecting;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use netpol_common::{CidrEntry, EndpointEntry, IpcacheEntry, PolicyEntry, PolicyKey};

use crate::index::cluster::ClusterPolicy;
use crate::index::net::Cidr;
use crate::index::{IdentityKey, Peer, PodInfo, PodKey, Policy, Selector, Snapshot};

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
}

/// One full compile, deterministic (simulate, tests).
pub fn compile(snap: &Snapshot, view: &NodeView) -> Desired {
    Compiler::with_revision_seed(1).compile(snap, view).clone()
}

#[cfg(test)]
mod tests;

//! The cluster as the policy engine needs it, built from a source's [`ClusterState`].
//!
//! source ──► **index** ──► compile ──► datapath ──► events
//!
//! The index is synchronous and I/O-free. `reset` replaces everything (a re-list);
//! identities are hash-consed (namespace labels + pod labels + named ports → u32) and
//! stay stable across resets while in use, so an update rewrites only what changed.

pub mod cluster;
pub mod net;
pub mod policy;
pub mod selector;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use netpol_common::identity;

pub use crate::objects::{
    Change, ClusterState, Invalid, Kind, Object, AUDIT_ANNOTATION, MODE_ANNOTATION,
};
pub use policy::{Peer, Policy, PortRef, PortSpec, Rule};
pub use selector::{Labels, Selector};

/// `namespace/name`.
pub type PodKey = String;

/// The label the API server sets on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    pub host_network: bool,
    /// Container port name → (protocol, port) for every declared port with a name.
    pub named_ports: BTreeMap<String, Vec<(u8, u16)>>,
    /// Every declared container port (protocol, port), named or not.
    pub ports: Vec<(u8, u16)>,
    /// 0 for hostNetwork pods (they are the node, not an identity of their own).
    pub identity: u32,
}

impl PodInfo {
    pub fn key(&self) -> PodKey {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What an identity stands for: pods with the same namespace labels, labels and
/// named ports are indistinguishable to policy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityKey {
    pub namespace: String,
    pub namespace_labels: Labels,
    pub labels: Labels,
    pub named_ports: BTreeMap<String, Vec<(u8, u16)>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub labels: Labels,
    pub addresses: Vec<IpAddr>,
}

/// An immutable view of the index, handed to `compile`.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Labels>,
    /// Namespaces in audit mode ([`AUDIT_ANNOTATION`]).
    pub audit_namespaces: std::collections::BTreeSet<String>,
    pub pods: BTreeMap<PodKey, Arc<PodInfo>>,
    pub policies: BTreeMap<String, Arc<Policy>>,
    /// Nodes by name: labels and addresses (for `nodes` peers).
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Cluster-wide policies (Admin and Baseline tiers), by `Kind/name`.
    pub cluster_policies: BTreeMap<String, Arc<cluster::ClusterPolicy>>,
    /// Stable policy ids (for cookies), by `namespace/name`.
    pub policy_ids: BTreeMap<String, u32>,
    pub identities: BTreeMap<u32, IdentityKey>,
    pub invalid: Vec<Invalid>,
    /// Cluster policies of one tier at one priority whose rules could conflict: the API
    /// leaves their order undefined; netpol orders them by name (reported, not fatal).
    pub conflicts: Vec<String>,
    /// The source digest this snapshot was built from.
    pub digest: String,
}

impl Snapshot {
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&PodInfo> {
        self.pods
            .values()
            .find(|p| !p.host_network && p.ips.contains(&ip))
            .map(|p| p.as_ref())
    }
}

/// The index owns the snapshot and keeps it current, one change at a time (`apply`)
/// or by re-listing (`reset`, which applies the difference).
#[derive(Default)]
pub struct Index {
    identities: BTreeMap<IdentityKey, u32>,
    /// Pods per identity; an identity is released when its last pod goes.
    refs: BTreeMap<u32, usize>,
    next_identity: u32,
    next_policy: u32,
    /// Labels and audit switch of the Namespace objects seen (without the name label).
    namespace_objects: BTreeMap<String, (Labels, bool)>,
    snap: Snapshot,
}

impl Index {
    pub fn new() -> Index {
        Index {
            next_identity: identity::FIRST_POD,
            next_policy: 1,
            ..Default::default()
        }
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    /// Replaces the whole view with `state` (a re-list): objects gone are deleted, the
    /// rest upserted; identities of unchanged pods stay as they were.
    pub fn reset(&mut self, state: &ClusterState) -> Snapshot {
        let mut namespaces = std::collections::BTreeSet::new();
        let mut pods = std::collections::BTreeSet::new();
        let mut policies = std::collections::BTreeSet::new();
        let mut cluster = std::collections::BTreeSet::new();
        let mut nodes = std::collections::BTreeSet::new();
        for obj in &state.objects {
            let (ns, name) = object_name(obj);
            match obj {
                Object::Namespace(_) => namespaces.insert(name),
                Object::Pod(_) => pods.insert(format!("{ns}/{name}")),
                Object::NetworkPolicy(_) => policies.insert(format!("{ns}/{name}")),
                Object::ClusterPolicy(o) => cluster.insert(format!("{}/{name}", o.kind)),
                Object::Service(_) => false,
                Object::Node(_) => nodes.insert(name),
            };
        }
        let gone_pods: Vec<PodKey> = self
            .snap
            .pods
            .keys()
            .filter(|k| !pods.contains(*k))
            .cloned()
            .collect();
        for key in gone_pods {
            self.delete_pod(&key);
        }
        let known_policies: Vec<String> = self
            .snap
            .policies
            .keys()
            .cloned()
            .chain(
                self.snap
                    .invalid
                    .iter()
                    .filter(|i| i.kind == "NetworkPolicy")
                    .map(|i| format!("{}/{}", i.namespace, i.name)),
            )
            .collect();
        for key in known_policies.into_iter().filter(|k| !policies.contains(k)) {
            self.delete_policy(&key);
        }
        let gone_cluster: Vec<String> = self
            .snap
            .cluster_policies
            .keys()
            .cloned()
            .chain(
                self.snap
                    .invalid
                    .iter()
                    .filter(|i| i.namespace.is_empty())
                    .map(|i| format!("{}/{}", i.kind, i.name)),
            )
            .filter(|k| !cluster.contains(k))
            .collect();
        for key in gone_cluster {
            self.delete_cluster_policy(&key);
        }
        self.snap.nodes.retain(|n, _| nodes.contains(n));
        let gone_namespaces: Vec<String> = self
            .namespace_objects
            .keys()
            .filter(|n| !namespaces.contains(*n))
            .cloned()
            .collect();
        for ns in gone_namespaces {
            self.delete_namespace(&ns);
        }
        // Namespaces first, so pods get their final identity at once.
        for obj in state
            .objects
            .iter()
            .filter(|o| matches!(o, Object::Namespace(_)))
        {
            self.upsert(obj);
        }
        for obj in state
            .objects
            .iter()
            .filter(|o| !matches!(o, Object::Namespace(_)))
        {
            self.upsert(obj);
        }
        self.snap.digest = state.digest.clone();
        self.snap.clone()
    }

    /// Applies one change.
    pub fn apply(&mut self, change: &Change) -> &Snapshot {
        match change {
            Change::Upsert(obj) => self.upsert(obj),
            Change::Delete {
                kind,
                namespace,
                name,
            } => match kind {
                Kind::Namespace => self.delete_namespace(name),
                Kind::Node => {
                    self.snap.nodes.remove(name);
                }
                Kind::Pod => self.delete_pod(&format!("{namespace}/{name}")),
                Kind::NetworkPolicy => self.delete_policy(&format!("{namespace}/{name}")),
                Kind::ClusterNetworkPolicy => {
                    self.delete_cluster_policy(&format!("ClusterNetworkPolicy/{name}"))
                }
                Kind::AdminNetworkPolicy => {
                    self.delete_cluster_policy(&format!("AdminNetworkPolicy/{name}"))
                }
                Kind::BaselineAdminNetworkPolicy => {
                    self.delete_cluster_policy(&format!("BaselineAdminNetworkPolicy/{name}"))
                }
            },
        }
        &self.snap
    }

    fn upsert(&mut self, obj: &Object) {
        match obj {
            Object::Namespace(ns) => {
                let Some(name) = ns.metadata.name.clone() else {
                    return;
                };
                let labels = ns.metadata.labels.clone().unwrap_or_default();
                let audit = ns
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(AUDIT_ANNOTATION))
                    .is_some_and(|v| v == "true");
                if self.namespace_objects.get(&name) == Some(&(labels.clone(), audit)) {
                    return;
                }
                self.namespace_objects.insert(name.clone(), (labels, audit));
                self.namespace_changed(&name);
            }
            Object::Pod(p) => {
                let Some(mut info) = pod_info(p) else {
                    // Terminated: it takes no part any more.
                    let (ns, name) = object_name(obj);
                    self.delete_pod(&format!("{ns}/{name}"));
                    return;
                };
                self.ensure_namespace(&info.namespace);
                let key = info.key();
                if let Some(old) = self.snap.pods.get(&key) {
                    info.identity = old.identity;
                    if **old == info {
                        return;
                    }
                }
                self.delete_pod(&key);
                self.insert_pod(info);
            }
            Object::NetworkPolicy(np) => {
                let (ns, name) = object_name(obj);
                let key = format!("{ns}/{name}");
                self.ensure_namespace(&ns);
                self.snap.invalid.retain(|i| {
                    !(i.kind == "NetworkPolicy" && i.namespace == ns && i.name == name)
                });
                match policy::parse_policy(np) {
                    Ok(p) => {
                        if self.snap.policies.get(&key).is_some_and(|old| **old == p) {
                            return;
                        }
                        if !self.snap.policy_ids.contains_key(&key) {
                            self.snap.policy_ids.insert(key.clone(), self.next_policy);
                            self.next_policy += 1;
                        }
                        self.snap.policies.insert(key, Arc::new(p));
                    }
                    Err(error) => {
                        tracing::warn!(namespace = %ns, policy = %name, %error, "NetworkPolicy rejected");
                        self.snap.policies.remove(&key);
                        self.snap.policy_ids.remove(&key);
                        self.snap.invalid.push(Invalid {
                            kind: "NetworkPolicy".into(),
                            namespace: ns,
                            name,
                            error,
                        });
                    }
                }
            }
            Object::Service(_) => {}
            Object::Node(n) => {
                let Some(name) = n.metadata.name.clone() else {
                    return;
                };
                let addresses = n
                    .status
                    .iter()
                    .flat_map(|s| s.addresses.iter().flatten())
                    .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                    .filter_map(|a| a.address.parse().ok())
                    .collect();
                let info = NodeInfo {
                    labels: n.metadata.labels.clone().unwrap_or_default(),
                    addresses,
                };
                self.snap.nodes.insert(name, info);
            }
            Object::ClusterPolicy(o) => {
                let name = o.metadata.name.clone().unwrap_or_default();
                let key = format!("{}/{name}", o.kind);
                let parsed = cluster::parse(o);
                if let Ok(p) = &parsed {
                    if self
                        .snap
                        .cluster_policies
                        .get(&key)
                        .is_some_and(|old| **old == *p)
                    {
                        return;
                    }
                }
                let id = self.snap.policy_ids.get(&key).copied();
                self.delete_cluster_policy(&key);
                match parsed {
                    Ok(p) => {
                        let id = id.unwrap_or_else(|| {
                            self.next_policy += 1;
                            self.next_policy - 1
                        });
                        self.snap.policy_ids.insert(key.clone(), id);
                        self.snap.cluster_policies.insert(key, Arc::new(p));
                    }
                    Err(error) => {
                        tracing::warn!(kind = %o.kind, policy = %name, %error, "cluster policy rejected");
                        self.snap.invalid.push(Invalid {
                            kind: o.kind.clone(),
                            namespace: String::new(),
                            name,
                            error,
                        });
                    }
                }
                self.snap.conflicts = cluster::conflicts(&self.snap.cluster_policies);
            }
        }
    }

    fn delete_policy(&mut self, key: &str) {
        self.snap.policies.remove(key);
        self.snap.policy_ids.remove(key);
        if let Some((ns, name)) = key.split_once('/') {
            self.snap
                .invalid
                .retain(|i| !(i.kind == "NetworkPolicy" && i.namespace == ns && i.name == name));
        }
    }

    fn delete_cluster_policy(&mut self, key: &str) {
        self.snap.cluster_policies.remove(key);
        self.snap.policy_ids.remove(key);
        if let Some((kind, name)) = key.split_once('/') {
            self.snap
                .invalid
                .retain(|i| !(i.namespace.is_empty() && i.kind == kind && i.name == name));
        }
        self.snap.conflicts = cluster::conflicts(&self.snap.cluster_policies);
    }

    fn delete_namespace(&mut self, name: &str) {
        // Pods and policies left in it keep an implied namespace with the name label.
        if self.namespace_objects.remove(name).is_some() {
            self.namespace_changed(name);
        }
    }

    /// A namespace exists for every pod and policy (the API server guarantees it).
    fn ensure_namespace(&mut self, ns: &str) {
        if !self.snap.namespaces.contains_key(ns) {
            self.snap.namespaces.insert(
                ns.to_string(),
                Labels::from([(NAMESPACE_NAME_LABEL.into(), ns.to_string())]),
            );
        }
    }

    /// Recomputes a namespace's labels and the identities of its pods.
    fn namespace_changed(&mut self, ns: &str) {
        let (mut labels, audit) = self.namespace_objects.get(ns).cloned().unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.into(), ns.to_string());
        self.snap.namespaces.insert(ns.to_string(), labels);
        if audit {
            self.snap.audit_namespaces.insert(ns.to_string());
        } else {
            self.snap.audit_namespaces.remove(ns);
        }
        let prefix = format!("{ns}/");
        let keys: Vec<PodKey> = self
            .snap
            .pods
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if let Some(old) = self.snap.pods.get(&key).cloned() {
                self.delete_pod(&key);
                self.insert_pod(PodInfo::clone(&old));
            }
        }
    }

    fn insert_pod(&mut self, mut info: PodInfo) {
        info.identity = 0;
        if !info.host_network {
            let key = IdentityKey {
                namespace: info.namespace.clone(),
                namespace_labels: self.snap.namespaces[&info.namespace].clone(),
                labels: info.labels.clone(),
                named_ports: info.named_ports.clone(),
            };
            info.identity = match self.identities.get(&key) {
                Some(id) => *id,
                None => {
                    let id = self.next_identity;
                    self.next_identity += 1;
                    self.identities.insert(key.clone(), id);
                    self.snap.identities.insert(id, key);
                    id
                }
            };
            *self.refs.entry(info.identity).or_default() += 1;
        }
        self.snap.pods.insert(info.key(), Arc::new(info));
    }

    fn delete_pod(&mut self, key: &str) {
        let Some(old) = self.snap.pods.remove(key) else {
            return;
        };
        if old.identity == 0 {
            return;
        }
        let refs = self.refs.get_mut(&old.identity).expect("counted on insert");
        *refs -= 1;
        if *refs == 0 {
            self.refs.remove(&old.identity);
            if let Some(k) = self.snap.identities.remove(&old.identity) {
                self.identities.remove(&k);
            }
        }
    }
}

fn object_name(obj: &Object) -> (String, String) {
    let meta = match obj {
        Object::Namespace(o) => &o.metadata,
        Object::Pod(o) => &o.metadata,
        Object::NetworkPolicy(o) => &o.metadata,
        Object::Service(o) => &o.metadata,
        Object::Node(o) => &o.metadata,
        Object::ClusterPolicy(o) => &o.metadata,
    };
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The pod as policy sees it; `None` for pods that take no part (terminated).
fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded") | Some("Failed")) {
        return None; // terminated pods neither send nor receive
    }
    let no_spec = Default::default();
    let spec = pod.spec.as_ref().unwrap_or(&no_spec);
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = status
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|s| s.parse().ok())
    {
        if !ips.contains(&ip) {
            ips.insert(0, ip);
        }
    }
    let mut named_ports: BTreeMap<String, Vec<(u8, u16)>> = BTreeMap::new();
    let mut ports = Vec::new();
    for c in &spec.containers {
        for p in c.ports.iter().flatten() {
            let protocol = policy::parse_protocol(p.protocol.as_deref().unwrap_or("TCP"))
                .unwrap_or(netpol_common::proto::TCP);
            let port = p.container_port as u16;
            ports.push((protocol, port));
            if let Some(name) = &p.name {
                named_ports
                    .entry(name.clone())
                    .or_default()
                    .push((protocol, port));
            }
        }
    }
    Some(PodInfo {
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: pod.metadata.name.clone()?,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ips,
        node: spec.node_name.clone(),
        host_network: spec.host_network.unwrap_or(false),
        named_ports,
        ports,
        identity: 0,
    })
}

#[cfg(test)]
pub mod tests;

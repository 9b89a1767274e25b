//! The cluster as the policy engine needs it, built from a source's [`ClusterState`].
//!
//! source ──► **index** ──► compile ──► datapath ──► events
//!
//! The index is synchronous and I/O-free. `reset` replaces everything (a re-list);
//! identities are hash-consed (namespace labels + pod labels + named ports → u32) and
//! stay stable across resets while in use, so an update rewrites only what changed.

pub mod net;
pub mod policy;
pub mod selector;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use netpol_common::identity;

use crate::source::{ClusterState, Object};
pub use policy::{Peer, Policy, PortRef, PortSpec, Rule};
pub use selector::{Labels, Selector};

/// `namespace/name`.
pub type PodKey = String;

/// The label the API server sets on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A namespace with this annotation set to "true" is in audit mode: would-be drops of
/// its pods pass and are reported as AUDIT (watch first, then enforce).
pub const AUDIT_ANNOTATION: &str = "netpol.io/audit";

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

/// An object that was rejected, with the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Invalid {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub error: String,
}

/// An immutable view of the index, handed to `compile`.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Labels>,
    /// Namespaces in audit mode ([`AUDIT_ANNOTATION`]).
    pub audit_namespaces: std::collections::BTreeSet<String>,
    pub pods: BTreeMap<PodKey, PodInfo>,
    pub policies: BTreeMap<String, Arc<Policy>>,
    /// Stable policy ids (for cookies), by `namespace/name`.
    pub policy_ids: BTreeMap<String, u32>,
    pub identities: BTreeMap<u32, IdentityKey>,
    pub invalid: Vec<Invalid>,
    /// The source digest this snapshot was built from.
    pub digest: String,
}

impl Snapshot {
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&PodInfo> {
        self.pods
            .values()
            .find(|p| !p.host_network && p.ips.contains(&ip))
    }
}

#[derive(Default)]
pub struct Index {
    identities: BTreeMap<IdentityKey, u32>,
    next_identity: u32,
    policy_ids: BTreeMap<String, u32>,
    next_policy: u32,
}

impl Index {
    pub fn new() -> Index {
        Index {
            next_identity: identity::FIRST_POD,
            next_policy: 1,
            ..Default::default()
        }
    }

    /// Replaces the whole view with `state` (level-triggered).
    pub fn reset(&mut self, state: &ClusterState) -> Snapshot {
        let mut snap = Snapshot {
            digest: state.digest.clone(),
            ..Default::default()
        };
        let mut pods = Vec::new();
        let mut policies = Vec::new();
        for obj in &state.objects {
            match obj {
                Object::Namespace(ns) => {
                    let Some(name) = ns.metadata.name.clone() else {
                        continue;
                    };
                    let audit = ns
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(AUDIT_ANNOTATION));
                    if audit.is_some_and(|v| v == "true") {
                        snap.audit_namespaces.insert(name.clone());
                    }
                    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
                    labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
                    snap.namespaces.insert(name, labels);
                }
                Object::Pod(p) => pods.push(p),
                Object::NetworkPolicy(np) => policies.push(np),
                Object::Service(_) => {}
            }
        }
        // Namespaces that pods or policies use exist even without a Namespace object,
        // as they would in a cluster (the API server would have refused them otherwise).
        for ns in pods
            .iter()
            .map(|p| p.metadata.namespace.clone())
            .chain(policies.iter().map(|p| p.metadata.namespace.clone()))
        {
            let ns = ns.unwrap_or_else(|| "default".into());
            snap.namespaces
                .entry(ns.clone())
                .or_insert_with(|| Labels::from([(NAMESPACE_NAME_LABEL.into(), ns)]));
        }

        let mut used = BTreeMap::new();
        for pod in pods {
            let Some(mut info) = pod_info(pod) else {
                continue;
            };
            if !info.host_network {
                let key = IdentityKey {
                    namespace: info.namespace.clone(),
                    namespace_labels: snap.namespaces[&info.namespace].clone(),
                    labels: info.labels.clone(),
                    named_ports: info.named_ports.clone(),
                };
                info.identity = self.identity_for(&key);
                used.insert(info.identity, key);
            }
            snap.pods.insert(info.key(), info);
        }
        self.identities.retain(|_, id| used.contains_key(id));
        snap.identities = used;

        for np in policies {
            let ns = np
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let name = np.metadata.name.clone().unwrap_or_default();
            match policy::parse_policy(np) {
                Ok(p) => {
                    let key = format!("{ns}/{name}");
                    let id = *self.policy_ids.entry(key.clone()).or_insert_with(|| {
                        self.next_policy += 1;
                        self.next_policy - 1
                    });
                    snap.policy_ids.insert(key.clone(), id);
                    snap.policies.insert(key, Arc::new(p));
                }
                Err(error) => {
                    tracing::warn!(namespace = %ns, policy = %name, %error, "NetworkPolicy rejected");
                    snap.invalid.push(Invalid {
                        kind: "NetworkPolicy".into(),
                        namespace: ns,
                        name,
                        error,
                    });
                }
            }
        }
        self.policy_ids
            .retain(|k, _| snap.policy_ids.contains_key(k));
        snap
    }

    fn identity_for(&mut self, key: &IdentityKey) -> u32 {
        if let Some(id) = self.identities.get(key) {
            return *id;
        }
        let id = self.next_identity;
        self.next_identity += 1;
        self.identities.insert(key.clone(), id);
        id
    }
}

/// The pod as policy sees it; `None` for pods that take no part (terminated).
fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let status = pod.status.clone().unwrap_or_default();
    if matches!(status.phase.as_deref(), Some("Succeeded") | Some("Failed")) {
        return None; // terminated pods neither send nor receive
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = status.pod_ip.as_deref().and_then(|s| s.parse().ok()) {
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
pub mod tests {
    use super::*;
    use crate::source::parse_manifests;

    pub fn state(yaml: &str) -> ClusterState {
        let (objects, errors) = parse_manifests(std::path::Path::new("test.yaml"), yaml);
        assert!(errors.is_empty(), "{errors:?}");
        ClusterState {
            objects,
            errors: vec![],
            digest: "test".into(),
        }
    }

    const PODS: &str = r#"
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
kind: Pod
metadata: {name: a, namespace: x, labels: {app: web}}
spec: {containers: [{name: c, image: i, ports: [{name: http, containerPort: 80}]}]}
status: {podIP: 10.244.0.5}
---
kind: Pod
metadata: {name: b, namespace: x, labels: {app: web}}
spec: {containers: [{name: c, image: i, ports: [{name: http, containerPort: 80}]}]}
status: {podIP: 10.244.0.6}
---
kind: Pod
metadata: {name: done, namespace: x}
spec: {containers: [{name: c, image: i}]}
status: {phase: Succeeded, podIP: 10.244.0.7}
---
kind: Pod
metadata: {name: node-agent, namespace: y}
spec: {hostNetwork: true, containers: [{name: c, image: i}]}
status: {podIP: 192.168.1.10}
"#;

    #[test]
    fn pods_with_equal_labels_share_an_identity_that_survives_resets() {
        let mut index = Index::new();
        let snap = index.reset(&state(PODS));
        let (a, b) = (&snap.pods["x/a"], &snap.pods["x/b"]);
        assert_eq!(a.identity, b.identity);
        assert!(a.identity >= identity::FIRST_POD);
        let again = index.reset(&state(PODS));
        assert_eq!(again.pods["x/a"].identity, a.identity);
    }

    #[test]
    fn namespaces_always_carry_their_name_label() {
        let snap = Index::new().reset(&state(PODS));
        assert_eq!(snap.namespaces["x"][NAMESPACE_NAME_LABEL], "x");
        assert_eq!(
            snap.namespaces["y"][NAMESPACE_NAME_LABEL], "y",
            "implied by a pod"
        );
    }

    #[test]
    fn terminated_pods_are_dropped_and_host_network_pods_have_no_identity() {
        let snap = Index::new().reset(&state(PODS));
        assert!(!snap.pods.contains_key("x/done"));
        assert_eq!(snap.pods["y/node-agent"].identity, 0);
    }

    #[test]
    fn an_invalid_policy_is_reported_and_the_others_kept() {
        let yaml = format!(
            "{PODS}---\nkind: NetworkPolicy\nmetadata: {{name: bad, namespace: x}}\nspec: {{podSelector: {{}}, ingress: [{{from: [{{ipBlock: {{cidr: nope}}}}]}}]}}\n---\nkind: NetworkPolicy\nmetadata: {{name: good, namespace: x}}\nspec: {{podSelector: {{}}}}\n"
        );
        let snap = Index::new().reset(&state(&yaml));
        assert_eq!(snap.invalid.len(), 1);
        assert_eq!(snap.invalid[0].name, "bad");
        assert!(snap.invalid[0]
            .error
            .starts_with("spec.ingress[0].from[0].ipBlock.cidr"));
        assert!(snap.policies.contains_key("x/good"));
    }
}

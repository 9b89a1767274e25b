//! The SIG-Network cluster-wide policy objects, as their CRDs define them (k8s-openapi
//! has no types for them). Two generations are read:
//! - `policy.networking.k8s.io/v1alpha1` AdminNetworkPolicy and
//!   BaselineAdminNetworkPolicy (network-policy-api v0.1.x);
//! - `policy.networking.k8s.io/v1alpha2` and `v1beta1` ClusterNetworkPolicy (v0.2+,
//!   one kind with `tier: Admin|Baseline`).
//!
//! Unknown fields are kept out of the model on purpose: the index validates what is
//! here and rejects what it cannot enforce (e.g. `domainNames`) by name.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

/// One cluster-wide policy object of any of the three kinds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterPolicyObject {
    #[serde(rename = "apiVersion", default)]
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<ClusterPolicySpec>,
}

/// The union of the three kinds' specs (their fields do not collide).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterPolicySpec {
    /// ClusterNetworkPolicy only: `Admin` or `Baseline`.
    pub tier: Option<String>,
    /// ClusterNetworkPolicy and AdminNetworkPolicy: 0-1000, lower is stronger.
    pub priority: Option<i64>,
    pub subject: Option<Subject>,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    pub namespaces: Option<LabelSelector>,
    pub pods: Option<NamespacedPod>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    #[serde(default)]
    pub namespace_selector: LabelSelector,
    #[serde(default)]
    pub pod_selector: LabelSelector,
}

/// An ingress or egress rule (`from` for ingress, `to` for egress).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub name: Option<String>,
    pub action: Option<String>,
    pub from: Option<Vec<Peer>>,
    pub to: Option<Vec<Peer>>,
    /// v1alpha1 port matches.
    pub ports: Option<Vec<V1alpha1Port>>,
    /// v1alpha2/v1beta1 protocol matches.
    pub protocols: Option<Vec<Protocol>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    pub namespaces: Option<LabelSelector>,
    pub pods: Option<NamespacedPod>,
    pub nodes: Option<LabelSelector>,
    pub networks: Option<Vec<String>>,
    pub domain_names: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct V1alpha1Port {
    pub port_number: Option<PortNumber>,
    pub named_port: Option<String>,
    pub port_range: Option<V1alpha1Range>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PortNumber {
    pub protocol: Option<String>,
    pub port: Option<IntOrString>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct V1alpha1Range {
    pub protocol: Option<String>,
    pub start: Option<i64>,
    pub end: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Protocol {
    pub tcp: Option<ProtocolPort>,
    pub udp: Option<ProtocolPort>,
    pub sctp: Option<ProtocolPort>,
    pub destination_named_port: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolPort {
    pub destination_port: Option<Port>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Port {
    pub number: Option<i64>,
    pub range: Option<PortRange>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PortRange {
    pub start: Option<i64>,
    pub end: Option<i64>,
}

pub const KINDS: [&str; 3] = [
    "ClusterNetworkPolicy",
    "AdminNetworkPolicy",
    "BaselineAdminNetworkPolicy",
];

//! Cluster-wide policies for the differential test: AdminNetworkPolicy,
//! BaselineAdminNetworkPolicy and ClusterNetworkPolicy, of every generation and tier.

use proptest::prelude::*;

use super::{namespace_selector, one_of, pod_selector};

fn cluster_peer(egress: bool) -> impl Strategy<Value = String> {
    let networks = one_of(&[
        "[10.0.0.0/24]",
        "[\"10.0.0.12/30\", \"fd00::/64\"]",
        "[0.0.0.0/0]",
        "[\"::/0\"]",
    ])
    .prop_map(|n| format!("{{networks: {n}}}"));
    let nodes =
        one_of(&["{}", "{matchLabels: {role: infra}}"]).prop_map(|n| format!("{{nodes: {n}}}"));
    let pods = prop_oneof![
        namespace_selector().prop_map(|n| format!("{{namespaces: {n}}}")),
        (namespace_selector(), pod_selector())
            .prop_map(|(n, p)| format!("{{pods: {{namespaceSelector: {n}, podSelector: {p}}}}}")),
    ];
    if egress {
        prop_oneof![3 => pods, 1 => networks, 1 => nodes].boxed()
    } else {
        pods.boxed()
    }
}

/// Port matches in the shape of the policy's generation.
fn cluster_ports(v1alpha1: bool) -> impl Strategy<Value = Option<String>> {
    let item = if v1alpha1 {
        one_of(&[
            "{portNumber: {port: 80}}",
            "{portNumber: {protocol: UDP, port: 53}}",
            "{namedPort: http}",
            "{namedPort: sig}",
            "{portRange: {protocol: TCP, start: 8080, end: 9000}}",
            "{portRange: {protocol: SCTP, start: 9000, end: 9001}}",
        ])
        .boxed()
    } else {
        one_of(&[
            "{tcp: {destinationPort: {number: 80}}}",
            "{udp: {destinationPort: {number: 53}}}",
            "{tcp: {}}",
            "{destinationNamedPort: http}",
            "{destinationNamedPort: dns}",
            "{tcp: {destinationPort: {range: {start: 8080, end: 9000}}}}",
            "{sctp: {destinationPort: {range: {start: 9000, end: 9001}}}}",
        ])
        .boxed()
    };
    prop::option::weighted(
        0.6,
        prop::collection::vec(item, 1..=2).prop_map(|v| format!("[{}]", v.join(", "))),
    )
}

fn cluster_rule(kind: &'static str, egress: bool) -> impl Strategy<Value = String> {
    let v1alpha1 = kind != "ClusterNetworkPolicy";
    let actions: &'static [&'static str] = match kind {
        "ClusterNetworkPolicy" => &["Accept", "Deny", "Pass"],
        "AdminNetworkPolicy" => &["Allow", "Deny", "Pass"],
        _ => &["Allow", "Deny"],
    };
    (
        one_of(actions),
        prop::collection::vec(cluster_peer(egress), 1..=2),
        cluster_ports(v1alpha1),
    )
        .prop_map(move |(action, peers, ports)| {
            let field = if egress { "to" } else { "from" };
            let ports_field = if v1alpha1 { "ports" } else { "protocols" };
            let mut f = vec![
                format!("action: {action}"),
                format!("{field}: [{}]", peers.join(", ")),
            ];
            if let Some(p) = ports {
                f.push(format!("{ports_field}: {p}"));
            }
            format!("{{{}}}", f.join(", "))
        })
}

/// A cluster-wide policy of any generation and tier.
pub fn cluster_policy_yaml(i: usize) -> impl Strategy<Value = String> {
    (
        prop_oneof![
            Just(("ClusterNetworkPolicy", "v1alpha2", "Admin")),
            Just(("ClusterNetworkPolicy", "v1beta1", "Baseline")),
            Just(("AdminNetworkPolicy", "v1alpha1", "")),
            Just(("BaselineAdminNetworkPolicy", "v1alpha1", "")),
        ],
        one_of(&["0", "5", "10"]),
        prop_oneof![
            namespace_selector().prop_map(|n| format!("{{namespaces: {n}}}")),
            (namespace_selector(), pod_selector())
                .prop_map(|(n, p)| format!("{{pods: {{namespaceSelector: {n}, podSelector: {p}}}}}")),
        ],
        any::<u64>(),
    )
        .prop_flat_map(move |((kind, version, tier), priority, subject, _)| {
            (
                prop::collection::vec(cluster_rule(kind, false), 0..=2),
                prop::collection::vec(cluster_rule(kind, true), 0..=2),
            )
                .prop_map(move |(ingress, egress)| {
                    let name = if kind == "BaselineAdminNetworkPolicy" {
                        "default".to_string()
                    } else {
                        format!("cp{i}")
                    };
                    let mut f = vec![format!("subject: {subject}")];
                    if kind == "ClusterNetworkPolicy" {
                        f.push(format!("tier: {tier}"));
                    }
                    if kind != "BaselineAdminNetworkPolicy" {
                        f.push(format!("priority: {priority}"));
                    }
                    if !ingress.is_empty() {
                        f.push(format!("ingress: [{}]", ingress.join(", ")));
                    }
                    if !egress.is_empty() {
                        f.push(format!("egress: [{}]", egress.join(", ")));
                    }
                    format!(
                        "apiVersion: policy.networking.k8s.io/{version}\nkind: {kind}\nmetadata: {{name: {name}}}\nspec: {{{}}}\n",
                        f.join(", ")
                    )
                })
        })
}

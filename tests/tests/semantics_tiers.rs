//! The tiers above and below NetworkPolicy, case by case: AdminNetworkPolicy,
//! BaselineAdminNetworkPolicy and ClusterNetworkPolicy (priorities, Pass, named ports,
//! nodes peers, conflicts), judged like semantics.rs by the reference evaluator and the
//! compiled maps on the upstream e2e cluster.

mod support;

use support::model::{cluster, expect, ip, ns};

// ---- Cluster-wide policy (AdminNetworkPolicy / BaselineAdminNetworkPolicy v1alpha1,
// ClusterNetworkPolicy v1alpha2/v1beta1), from the API documentation and its NPEPs.

fn anp(name: &str, priority: u32, subject: &str, rules: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {{name: {name}}}\nspec: {{priority: {priority}, subject: {subject}, {rules}}}\n---\n"
    )
}

fn banp(subject: &str, rules: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {{name: default}}\nspec: {{subject: {subject}, {rules}}}\n---\n"
    )
}

fn cnp(name: &str, tier: &str, priority: u32, subject: &str, rules: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec: {{tier: {tier}, priority: {priority}, subject: {subject}, {rules}}}\n---\n"
    )
}

#[test]
fn an_admin_deny_to_a_sensitive_namespace_cannot_be_reopened_by_network_policy() {
    let c = cluster(&format!(
        "{}kind: NetworkPolicy\nmetadata: {{name: allow-all, namespace: y}}\nspec: {{podSelector: {{}}, ingress: [{{}}]}}\n",
        anp(
            "protect-y",
            10,
            "{namespaces: {matchLabels: {ns: y}}}",
            "ingress: [{action: Deny, from: [{namespaces: {matchExpressions: [{key: ns, operator: NotIn, values: [y]}]}}]}]"
        )
    ));
    expect(&c, "TCP", 80, |from, to| ns(to) != "y" || ns(from) == "y");
}

#[test]
fn pass_delegates_to_the_namespace_owners_network_policy() {
    let c = cluster(&format!(
        "{}{}kind: NetworkPolicy\nmetadata: {{name: from-x, namespace: y}}\nspec: {{podSelector: {{}}, ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{ns: x}}}}}}]}}]}}\n",
        anp(
            "delegate",
            5,
            "{namespaces: {matchLabels: {ns: y}}}",
            "ingress: [{action: Pass, from: [{namespaces: {matchLabels: {ns: x}}}]}]"
        ),
        anp(
            "deny-rest",
            20,
            "{namespaces: {matchLabels: {ns: y}}}",
            "ingress: [{action: Deny, from: [{namespaces: {}}]}]"
        )
    ));
    // x is passed on to y's NetworkPolicy (which allows it); everyone else, y included,
    // meets the lower-priority deny.
    expect(&c, "TCP", 80, |from, to| ns(to) != "y" || ns(from) == "x");
}

#[test]
fn a_baseline_default_deny_is_overridden_by_a_namespaces_network_policy() {
    let c = cluster(&format!(
        "{}kind: NetworkPolicy\nmetadata: {{name: from-y, namespace: x}}\nspec: {{podSelector: {{}}, ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}}}]}}]}}\n",
        banp(
            "{namespaces: {}}",
            "ingress: [{action: Deny, from: [{namespaces: {}}]}]"
        )
    ));
    // x's NetworkPolicy decides for x; y and z fall to the baseline deny.
    expect(&c, "TCP", 80, |from, to| ns(to) == "x" && ns(from) == "y");
}

#[test]
fn an_admin_allow_for_monitoring_survives_a_namespace_default_deny() {
    let c = cluster(&format!(
        "{}kind: NetworkPolicy\nmetadata: {{name: deny, namespace: x}}\nspec: {{podSelector: {{}}}}\n",
        anp(
            "monitoring",
            1,
            "{namespaces: {}}",
            "ingress: [{action: Allow, from: [{pods: {namespaceSelector: {matchLabels: {ns: z}}, podSelector: {matchLabels: {pod: a}}}}], ports: [{portNumber: {protocol: TCP, port: 81}}]}]"
        )
    ));
    expect(&c, "TCP", 81, |from, to| ns(to) != "x" || from == "z/a");
    expect(&c, "TCP", 80, |_, to| ns(to) != "x");
}

#[test]
fn within_a_policy_the_first_rule_written_wins() {
    let c = cluster(&cnp(
        "ordered",
        "Admin",
        3,
        "{namespaces: {matchLabels: {ns: x}}}",
        "ingress: [{action: Accept, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 80}}}]}, {action: Deny, from: [{namespaces: {}}]}]",
    ));
    expect(&c, "TCP", 80, |_, _| true);
    expect(&c, "TCP", 81, |_, to| ns(to) != "x");
    expect(&c, "UDP", 80, |_, to| ns(to) != "x");
}

#[test]
fn a_lower_priority_number_wins_across_policies() {
    let c = cluster(&format!(
        "{}{}",
        cnp(
            "deny-all",
            "Admin",
            50,
            "{namespaces: {matchLabels: {ns: x}}}",
            "ingress: [{action: Deny, from: [{namespaces: {}}]}]"
        ),
        cnp(
            "allow-y-81",
            "Admin",
            10,
            "{namespaces: {matchLabels: {ns: x}}}",
            "ingress: [{action: Accept, from: [{namespaces: {matchLabels: {ns: y}}}], protocols: [{tcp: {destinationPort: {range: {start: 81, end: 82}}}}]}]"
        )
    ));
    expect(&c, "TCP", 81, |from, to| ns(to) != "x" || ns(from) == "y");
    expect(&c, "TCP", 80, |_, to| ns(to) != "x");
}

#[test]
fn an_egress_deny_to_networks_also_covers_pod_traffic() {
    let c = cluster(&cnp(
        "no-v4",
        "Admin",
        0,
        "{pods: {namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: a}}}}",
        "egress: [{action: Deny, to: [{networks: [0.0.0.0/0]}]}]",
    ));
    assert!(
        !c.allowed("x/a", "y/b", "TCP", 80),
        "IPv4 pod traffic is in 0.0.0.0/0"
    );
    let (from, to) = (c.snap.pods["x/a"].ips[1], c.snap.pods["y/b"].ips[1]);
    assert!(c.allowed_ip(from, to, "TCP", 80), "IPv6 is not");
    assert!(!c.allowed_ip(ip("10.0.1.1"), ip("8.8.8.8"), "UDP", 53));
}

#[test]
fn a_baseline_rule_applies_only_where_no_network_policy_isolates() {
    let c = cluster(&format!(
        "{}kind: NetworkPolicy\nmetadata: {{name: deny, namespace: x}}\nspec: {{podSelector: {{}}}}\n",
        cnp(
            "baseline-allow-z",
            "Baseline",
            0,
            "{namespaces: {}}",
            "ingress: [{action: Accept, from: [{namespaces: {matchLabels: {ns: z}}}]}, {action: Deny, from: [{namespaces: {}}]}]"
        )
    ));
    // x is isolated by its NetworkPolicy: the baseline allow for z does not reach it.
    expect(&c, "TCP", 80, |from, to| ns(to) != "x" && ns(from) == "z");
}

#[test]
fn admin_named_ports_resolve_on_the_destination_pod() {
    let c = cluster(&anp(
        "named",
        1,
        "{namespaces: {matchLabels: {ns: x}}}",
        "egress: [{action: Deny, to: [{namespaces: {}}], ports: [{namedPort: serve-81-udp}]}]",
    ));
    expect(&c, "UDP", 81, |from, _| ns(from) != "x");
    expect(&c, "UDP", 80, |_, _| true);
    expect(&c, "TCP", 81, |_, _| true);
}

#[test]
fn invalid_cluster_policies_are_rejected_by_name_and_the_rest_enforced() {
    let c = cluster(&format!(
        "{}{}",
        cnp(
            "bad",
            "Admin",
            1001,
            "{namespaces: {}}",
            "ingress: [{action: Deny, from: [{namespaces: {}}]}]"
        ),
        anp(
            "good",
            1,
            "{namespaces: {matchLabels: {ns: y}}}",
            "ingress: [{action: Deny, from: [{namespaces: {}}]}]"
        )
    ));
    assert_eq!(c.snap.invalid.len(), 1);
    assert_eq!(
        (
            c.snap.invalid[0].kind.as_str(),
            c.snap.invalid[0].name.as_str()
        ),
        ("ClusterNetworkPolicy", "bad")
    );
    assert!(c.snap.invalid[0].error.starts_with("spec.priority"));
    expect(&c, "TCP", 80, |_, to| ns(to) != "y");
}

#[test]
fn same_priority_conflicts_are_reported_and_resolved_by_name() {
    let c = cluster(&format!(
        "{}{}",
        anp(
            "b-allow",
            7,
            "{namespaces: {matchLabels: {ns: x}}}",
            "ingress: [{action: Allow, from: [{namespaces: {}}]}]"
        ),
        anp(
            "a-deny",
            7,
            "{namespaces: {matchLabels: {ns: x}}}",
            "ingress: [{action: Deny, from: [{namespaces: {}}]}]"
        )
    ));
    assert_eq!(c.snap.conflicts.len(), 1, "{:?}", c.snap.conflicts);
    assert!(c.snap.conflicts[0].contains("AdminNetworkPolicy/a-deny"));
    expect(&c, "TCP", 80, |_, to| ns(to) != "x");
}

#[test]
fn a_nodes_peer_selects_the_addresses_of_the_matching_nodes() {
    let c = cluster(&format!(
        "kind: Node\nmetadata: {{name: infra-1, labels: {{role: infra}}}}\nstatus: {{addresses: [{{type: InternalIP, address: 192.168.0.1}}, {{type: Hostname, address: infra-1}}]}}\n---\n\
         kind: Node\nmetadata: {{name: worker-1, labels: {{role: worker}}}}\nstatus: {{addresses: [{{type: InternalIP, address: 192.168.0.2}}]}}\n---\n{}",
        cnp(
            "no-infra-nodes",
            "Admin",
            1,
            "{namespaces: {matchLabels: {ns: x}}}",
            "egress: [{action: Deny, to: [{nodes: {matchLabels: {role: infra}}}]}]"
        )
    ));
    assert!(!c.allowed_ip(ip("10.0.1.1"), ip("192.168.0.1"), "TCP", 10250));
    assert!(c.allowed_ip(ip("10.0.1.1"), ip("192.168.0.2"), "TCP", 10250));
    assert!(
        c.allowed_ip(ip("10.0.2.1"), ip("192.168.0.1"), "TCP", 10250),
        "y is no subject"
    );
}

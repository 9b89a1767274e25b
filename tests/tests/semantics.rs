//! NetworkPolicy behaviour, case by case, in the words of the upstream documentation and
//! e2e suite. Every flow is judged twice, by the reference evaluator and by the compiled
//! maps (with the kernel's precedence); a disagreement fails the test before the
//! expectation is even checked.
//!
//! The cluster is the upstream e2e one: namespaces x, y, z, each with pods a, b, c
//! (label `pod`), every pod serving 80 and 81 on TCP, UDP and SCTP under named ports.

mod support;

use std::net::IpAddr;

use support::model::{compiled, e2e_cluster as base, Compiled, NAMESPACES, PODS};

fn cluster(policies: &str) -> Compiled {
    compiled(&format!("{}{policies}", base()))
}

fn all_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

/// Checks every ordered pair of pods against `expect(from, to)`, like the upstream
/// truth tables, on IPv4 and on IPv6.
#[track_caller]
fn expect(c: &Compiled, protocol: &str, port: u16, expect: impl Fn(&str, &str) -> bool) {
    let mut wrong = vec![];
    for from in all_pods() {
        for to in all_pods() {
            if from == to {
                continue;
            }
            let (f, t) = (&c.snap.pods[&from], &c.snap.pods[&to]);
            for (fi, ti) in f.ips.iter().zip(&t.ips) {
                let got = c.allowed_ip(*fi, *ti, protocol, port);
                if got != expect(&from, &to) {
                    wrong.push(format!("{from} -> {to} ({fi}): got {got}"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{protocol}/{port}:\n{}", wrong.join("\n"));
}

fn ns(pod: &str) -> &str {
    pod.split('/').next().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn no_policy_allows_everything() {
    let c = cluster("");
    expect(&c, "TCP", 80, |_, _| true);
    expect(&c, "SCTP", 81, |_, _| true);
}

#[test]
fn default_deny_ingress_isolates_every_pod_of_its_namespace_and_nothing_else() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n",
    );
    expect(&c, "TCP", 80, |_, to| ns(to) != "x");
    expect(&c, "UDP", 81, |_, to| ns(to) != "x");
}

#[test]
fn default_deny_all_isolates_both_directions() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}\n",
    );
    expect(&c, "TCP", 80, |from, to| ns(to) != "x" && ns(from) != "x");
}

#[test]
fn allow_all_ingress_with_an_empty_rule_reopens_an_isolated_pod() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: allow-all, namespace: x}\nspec: {podSelector: {}, ingress: [{}]}\n",
    );
    expect(&c, "TCP", 80, |_, _| true);
}

#[test]
fn a_pod_selector_peer_means_pods_in_the_policys_own_namespace() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}\n",
    );
    expect(&c, "TCP", 80, |from, to| to != "x/a" || from == "x/b");
}

#[test]
fn a_namespace_selector_peer_admits_every_pod_of_the_selected_namespaces() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}}]}]}\n",
    );
    expect(&c, "TCP", 80, |from, to| to != "x/a" || ns(from) != "x");
}

#[test]
fn pod_and_namespace_selectors_in_one_peer_are_anded() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]}\n",
    );
    expect(&c, "TCP", 80, |from, to| to != "x/a" || from == "y/b");
}

#[test]
fn pod_and_namespace_selectors_in_separate_peers_are_ored() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}, {podSelector: {matchLabels: {pod: b}}}]}]}\n",
    );
    expect(&c, "TCP", 80, |from, to| {
        to != "x/a" || ns(from) == "y" || from == "x/b"
    });
}

#[test]
fn the_default_namespace_name_label_can_select_namespaces() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}}]}]}\n",
    );
    expect(&c, "TCP", 80, |from, to| ns(to) != "x" || ns(from) == "z");
}

#[test]
fn match_expressions_exists_and_does_not_exist() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}, ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: Exists}]}, podSelector: {matchExpressions: [{key: missing, operator: DoesNotExist}, {key: pod, operator: NotIn, values: [c]}]}}]}]}\n",
    );
    expect(&c, "TCP", 80, |from, to| {
        !(to == "x/a" || to == "x/b") || !from.ends_with("/c")
    });
}

#[test]
fn a_rule_on_ports_allows_only_those_ports_and_protocols() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: 81}]}]}\n",
    );
    expect(&c, "TCP", 81, |_, _| true);
    expect(&c, "TCP", 80, |_, to| to != "x/a");
    expect(&c, "UDP", 81, |_, to| to != "x/a"); // a missing protocol is TCP
}

#[test]
fn udp_only_policy_does_not_allow_tcp() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{protocol: UDP, port: 80}]}]}\n",
    );
    expect(&c, "UDP", 80, |_, _| true);
    expect(&c, "TCP", 80, |_, to| to != "x/a");
}

#[test]
fn sctp_is_not_mistaken_for_tcp_and_isolates_like_any_protocol() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{protocol: SCTP, port: 80}]}]}\n",
    );
    expect(&c, "SCTP", 80, |_, _| true);
    expect(&c, "TCP", 80, |_, to| to != "x/a");
    expect(&c, "SCTP", 81, |_, to| to != "x/a");
}

#[test]
fn a_protocol_without_a_port_allows_every_port_of_that_protocol() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{protocol: UDP}]}]}\n",
    );
    expect(&c, "UDP", 81, |_, _| true);
    expect(&c, "TCP", 81, |_, to| to != "x/a");
}

#[test]
fn end_port_allows_the_whole_range_inclusive() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: 79, endPort: 80}]}]}\n",
    );
    expect(&c, "TCP", 80, |_, _| true);
    expect(&c, "TCP", 81, |_, to| to != "x/a");
}

#[test]
fn ingress_on_a_named_port_resolves_on_the_receiving_pod() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {}, ingress: [{ports: [{port: serve-81-tcp}]}]}\n",
    );
    expect(&c, "TCP", 81, |_, _| true);
    expect(&c, "TCP", 80, |_, to| ns(to) != "x");
    expect(&c, "UDP", 81, |_, to| ns(to) != "x");
}

#[test]
fn egress_on_a_named_port_resolves_on_the_destination_pod() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{ports: [{protocol: UDP, port: serve-80-udp}]}]}\n",
    );
    expect(&c, "UDP", 80, |_, _| true);
    expect(&c, "UDP", 81, |from, _| from != "x/a");
    // An address that is no pod names no port.
    assert!(!c.allowed_ip(ip("10.0.1.1"), ip("8.8.8.8"), "UDP", 80));
}

#[test]
fn a_named_port_the_pod_does_not_define_matches_nothing() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {}, ingress: [{ports: [{port: serve-82-tcp}]}]}\n",
    );
    for port in [80, 81, 82] {
        expect(&c, "TCP", port, |_, to| ns(to) != "x");
    }
}

#[test]
fn stacked_policies_are_unioned() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: from-b, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: from-y, namespace: x}\n\
         spec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]}\n",
    );
    expect(&c, "TCP", 80, |from, to| {
        ns(to) != "x" || ns(from) == "y" || (to == "x/a" && from == "x/b")
    });
}

#[test]
fn egress_deny_on_the_client_wins_over_an_ingress_allow_on_the_server() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: allow-in, namespace: y}\nspec: {podSelector: {}, ingress: [{}]}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: deny-out, namespace: x}\nspec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress]}\n",
    );
    expect(&c, "TCP", 80, |from, _| from != "x/a");
}

#[test]
fn ingress_and_egress_are_controlled_independently() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], ingress: [{from: [{podSelector: {matchLabels: {pod: nobody}}}]}], egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]}\n",
    );
    // The ingress section is ignored: the policy only isolates egress.
    expect(&c, "TCP", 80, |from, to| from != "x/a" || ns(to) == "y");
}

#[test]
fn an_empty_egress_list_does_not_make_a_policy_isolate_egress() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {}, egress: []}\n",
    );
    expect(&c, "TCP", 80, |_, to| ns(to) != "x");
}

#[test]
fn ip_block_allows_its_range_including_pod_addresses_minus_except() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 10.0.2.0/24, except: [10.0.2.2/32]}}, {ipBlock: {cidr: \"fd00::2:0/112\", except: [\"fd00::2:2/128\"]}}]}]}\n",
    );
    expect(&c, "TCP", 80, |from, to| {
        from != "x/a" || (ns(to) == "y" && to != "y/b")
    });
    assert!(!c.allowed_ip(ip("10.0.1.1"), ip("10.0.3.1"), "TCP", 80));
}

#[test]
fn an_address_in_both_cidr_and_except_of_different_blocks_is_allowed() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.2.0/24]}}, {ipBlock: {cidr: 10.0.2.2/32}}]}]}\n",
    );
    assert!(c.allowed_ip(ip("10.0.1.1"), ip("10.0.2.2"), "TCP", 80));
    assert!(!c.allowed_ip(ip("10.0.1.1"), ip("10.0.2.3"), "TCP", 80));
    assert!(c.allowed_ip(ip("10.0.1.1"), ip("10.0.3.3"), "TCP", 80));
}

#[test]
fn a_cidr_with_host_bits_set_means_its_network() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{ipBlock: {cidr: 10.0.2.3/24}}, {ipBlock: {cidr: \"fd00::2:3/112\"}}]}]}\n",
    );
    expect(&c, "TCP", 80, |from, to| to != "x/a" || ns(from) == "y");
}

#[test]
fn an_ipv4_block_does_not_match_ipv6_and_the_reverse() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{ipBlock: {cidr: 0.0.0.0/0}}]}]}\n",
    );
    assert!(c.allowed_ip(ip("10.0.2.1"), ip("10.0.1.1"), "TCP", 80));
    assert!(!c.allowed_ip(ip("fd00::2:1"), ip("fd00::1:1"), "TCP", 80));
}

#[test]
fn egress_to_an_ip_block_on_a_named_port_resolves_on_the_pod_in_the_block() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 10.0.2.0/24}}], ports: [{port: serve-81-tcp}]}]}\n",
    );
    assert!(c.allowed_ip(ip("10.0.1.1"), ip("10.0.2.1"), "TCP", 81));
    assert!(!c.allowed_ip(ip("10.0.1.1"), ip("10.0.2.1"), "TCP", 80));
    assert!(
        !c.allowed_ip(ip("10.0.1.1"), ip("10.0.2.99"), "TCP", 81),
        "no pod, no name"
    );
    assert!(
        !c.allowed_ip(ip("10.0.1.1"), ip("10.0.3.1"), "TCP", 81),
        "outside the block"
    );
}

#[test]
fn host_network_pods_are_never_selected_by_a_pod_selector() {
    let c = cluster(
        "kind: Pod\nmetadata: {name: node-agent, namespace: y, labels: {pod: b}}\n\
         spec: {hostNetwork: true, containers: [{name: c, image: i}]}\nstatus: {podIP: 192.168.0.10}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: b}}}]}]}\n",
    );
    assert!(c.allowed("y/b", "x/a", "TCP", 80));
    assert!(!c.allowed_ip(ip("192.168.0.10"), ip("10.0.1.1"), "TCP", 80));
}

#[test]
fn terminated_pods_and_pods_without_an_address_take_no_part() {
    let c = cluster(
        "kind: Pod\nmetadata: {name: old, namespace: y, labels: {pod: b}}\n\
         spec: {containers: [{name: c, image: i}]}\nstatus: {phase: Succeeded, podIP: 10.0.2.50}\n---\n\
         kind: Pod\nmetadata: {name: pending, namespace: y, labels: {pod: b}}\nspec: {containers: [{name: c, image: i}]}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: b}}}]}]}\n",
    );
    assert!(!c.snap.pods.contains_key("y/old"));
    assert!(!c.desired.endpoints.contains_key("y/pending"));
    assert!(
        !c.allowed_ip(ip("10.0.2.50"), ip("10.0.1.1"), "TCP", 80),
        "a dead pod's address is nobody's"
    );
}

#[test]
fn an_invalid_policy_is_rejected_by_name_and_the_others_stay_enforced() {
    let c = cluster(
        "kind: NetworkPolicy\nmetadata: {name: bad, namespace: x}\n\
         spec: {podSelector: {}, ingress: [{ports: [{port: 90, endPort: 80}]}]}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: deny, namespace: y}\nspec: {podSelector: {}}\n",
    );
    assert_eq!(c.snap.invalid.len(), 1);
    let bad = &c.snap.invalid[0];
    assert_eq!((bad.namespace.as_str(), bad.name.as_str()), ("x", "bad"));
    assert!(
        bad.error.starts_with("spec.ingress[0].ports[0].endPort"),
        "{}",
        bad.error
    );
    expect(&c, "TCP", 80, |_, to| ns(to) != "y");
}

#[test]
fn invalid_fields_are_each_named() {
    let cases = [
        (
            "{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}",
            "",
            "spec.ingress[0].from[0].ipBlock.except[0]",
        ),
        (
            "{ipBlock: {cidr: 10.0.0.0/8, except: [\"fd00::/64\"]}}",
            "",
            "spec.ingress[0].from[0].ipBlock.except[0]",
        ),
        (
            "{ipBlock: {cidr: 300.0.0.0/8}}",
            "",
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (
            "{podSelector: {}}",
            "{protocol: ICMP}",
            "spec.ingress[0].ports[0].protocol",
        ),
        (
            "{podSelector: {}}",
            "{port: serve-80-tcp-longer}",
            "spec.ingress[0].ports[0].port",
        ),
        (
            "{podSelector: {}}",
            "{port: \"-web\"}",
            "spec.ingress[0].ports[0].port",
        ),
        (
            "{podSelector: {}}",
            "{port: web, endPort: 90}",
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "{podSelector: {matchExpressions: [{key: a, operator: In}]}}",
            "",
            "spec.ingress[0].from[0].podSelector.matchExpressions[0].values",
        ),
    ];
    for (peer, port, field) in cases {
        let ports = if port.is_empty() {
            String::new()
        } else {
            format!(", ports: [{port}]")
        };
        let c = cluster(&format!(
            "kind: NetworkPolicy\nmetadata: {{name: bad, namespace: x}}\nspec: {{podSelector: {{}}, ingress: [{{from: [{peer}]{ports}}}]}}\n"
        ));
        assert_eq!(c.snap.invalid.len(), 1, "{peer} {port}");
        assert!(
            c.snap.invalid[0].error.starts_with(field),
            "{peer} {port}: {}",
            c.snap.invalid[0].error
        );
        // The reference rejects it too, so nothing is isolated.
        expect(&c, "TCP", 80, |_, _| true);
    }
}

#[test]
fn an_updated_policy_replaces_the_old_one() {
    let before = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}\n",
    );
    let after = cluster(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]}\n",
    );
    assert!(before.allowed("x/b", "x/a", "TCP", 80));
    assert!(!after.allowed("x/b", "x/a", "TCP", 80));
    assert!(after.allowed("x/c", "x/a", "TCP", 80));
}

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

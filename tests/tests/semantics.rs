//! NetworkPolicy behaviour, case by case, in the words of the upstream documentation and
//! e2e suite. Every flow is judged twice, by the reference evaluator and by the compiled
//! maps (with the kernel's precedence); a disagreement fails the test before the
//! expectation is even checked.
//!
//! The cluster is the upstream e2e one: namespaces x, y, z, each with pods a, b, c
//! (label `pod`), every pod serving 80 and 81 on TCP, UDP and SCTP under named ports.

mod support;

use support::model::{cluster, expect, ip, ns};

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

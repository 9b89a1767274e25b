//! Compiled map contents, checked through the userspace lookup.

use std::net::IpAddr;

use netpol_common::{direction, endpoint_flags, identity, proto};

use super::lookup::decide_at;
use super::*;
use crate::index::net::addr_of;
use crate::index::tests::state;
use crate::index::Index;

const CLUSTER: &str = r#"
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
kind: Namespace
metadata: {name: y, labels: {team: b}}
---
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: n0, containers: [{name: c, image: i, ports: [{name: http, containerPort: 80}]}]}
status: {podIP: 10.244.0.2}
---
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: n0, containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.3}
---
kind: Pod
metadata: {name: c, namespace: y, labels: {app: c}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {podIP: 10.244.1.4}
"#;

fn compiled(policies: &str) -> (Snapshot, Desired) {
    let snap = Index::new().reset(&state(&format!("{CLUSTER}---\n{policies}")));
    let d = compile(
        &snap,
        &NodeView {
            node: None,
            host_addrs: vec![],
        },
    );
    (snap, d)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Whether `from` may send to `to` on (protocol, port), judging both sides.
fn allowed(d: &Desired, snap: &Snapshot, from: &str, to: &str, protocol: u8, port: u16) -> bool {
    let (f, t) = (&snap.pods[from], &snap.pods[to]);
    let egress = decide_at(
        d,
        &d.endpoints[from],
        direction::EGRESS,
        &addr_of(t.ips[0]),
        protocol,
        port,
    );
    let ingress = decide_at(
        d,
        &d.endpoints[to],
        direction::INGRESS,
        &addr_of(f.ips[0]),
        protocol,
        port,
    );
    egress.allowed && ingress.allowed
}

#[test]
fn without_policies_everything_is_allowed() {
    let (snap, d) = compiled("kind: List\nitems: []\n");
    assert!(allowed(&d, &snap, "x/a", "y/c", proto::TCP, 80));
    assert!(d.policy.is_empty());
}

#[test]
fn default_deny_ingress_isolates_only_its_namespace_and_direction() {
    let (snap, d) = compiled(
        "kind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n",
    );
    assert!(!allowed(&d, &snap, "y/c", "x/a", proto::TCP, 80));
    assert!(!allowed(&d, &snap, "x/b", "x/a", proto::TCP, 80));
    assert!(
        allowed(&d, &snap, "x/a", "y/c", proto::TCP, 80),
        "egress is not isolated"
    );
}

#[test]
fn pod_selector_peer_means_the_policys_own_namespace() {
    let (snap, d) = compiled(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {matchLabels: {app: a}}, ingress: [{from: [{podSelector: {}}]}]}\n",
    );
    assert!(allowed(&d, &snap, "x/b", "x/a", proto::TCP, 80));
    assert!(!allowed(&d, &snap, "y/c", "x/a", proto::TCP, 80));
    assert!(
        allowed(&d, &snap, "y/c", "x/b", proto::TCP, 80),
        "x/b is not selected"
    );
}

#[test]
fn namespace_selector_and_ports_restrict_the_allow() {
    let (snap, d) = compiled(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {matchLabels: {app: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}}], ports: [{port: 80}]}]}\n",
    );
    assert!(allowed(&d, &snap, "y/c", "x/a", proto::TCP, 80));
    assert!(!allowed(&d, &snap, "y/c", "x/a", proto::TCP, 81));
    assert!(
        !allowed(&d, &snap, "y/c", "x/a", proto::UDP, 80),
        "a missing protocol is TCP"
    );
    assert!(!allowed(&d, &snap, "x/b", "x/a", proto::TCP, 80));
}

#[test]
fn named_ports_resolve_against_the_destination_pod() {
    let (snap, d) = compiled(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {matchLabels: {app: a}}, policyTypes: [Egress], egress: [{ports: [{port: http}]}]}\n",
    );
    assert!(
        allowed(&d, &snap, "x/a", "x/b", proto::TCP, 8080),
        "b's http is 8080"
    );
    assert!(!allowed(&d, &snap, "x/a", "x/b", proto::TCP, 80));
    assert!(
        !allowed(&d, &snap, "x/a", "y/c", proto::TCP, 80),
        "c defines no http"
    );
}

#[test]
fn ip_block_with_except_matches_pod_addresses_in_range() {
    let (snap, d) = compiled(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {matchLabels: {app: a}}, ingress: [{from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.0.3/32]}}]}]}\n",
    );
    assert!(allowed(&d, &snap, "y/c", "x/a", proto::TCP, 80));
    assert!(
        !allowed(&d, &snap, "x/b", "x/a", proto::TCP, 80),
        "excepted"
    );
    let ep = &d.endpoints["x/a"];
    assert!(
        !decide_at(
            &d,
            ep,
            direction::INGRESS,
            &addr_of(ip("10.245.0.1")),
            proto::TCP,
            80
        )
        .allowed
    );
    assert!(
        !decide_at(
            &d,
            ep,
            direction::INGRESS,
            &addr_of(ip("fd00::1")),
            proto::TCP,
            80
        )
        .allowed
    );
}

#[test]
fn end_port_ranges_are_enforced_exactly() {
    let (snap, d) = compiled(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {matchLabels: {app: a}}, ingress: [{ports: [{protocol: UDP, port: 1000, endPort: 1100}]}]}\n",
    );
    for (port, want) in [
        (999, false),
        (1000, true),
        (1050, true),
        (1100, true),
        (1101, false),
    ] {
        assert_eq!(
            allowed(&d, &snap, "x/b", "x/a", proto::UDP, port),
            want,
            "port {port}"
        );
    }
}

#[test]
fn only_local_pods_become_endpoints_but_every_pod_is_in_the_ipcache() {
    let snap = Index::new().reset(&state(CLUSTER));
    let d = compile(
        &snap,
        &NodeView {
            node: Some("n0".into()),
            host_addrs: vec![ip("10.244.0.1")],
        },
    );
    assert_eq!(
        d.endpoints.keys().cloned().collect::<Vec<_>>(),
        vec!["x/a", "x/b"]
    );
    assert_eq!(d.ipcache.len(), 4);
    assert_eq!(
        d.ipcache[&Cidr::host(ip("10.244.0.1"))].identity,
        identity::HOST
    );
}

#[test]
fn compile_is_deterministic() {
    let (_, d1) = compiled("kind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0}}]}]}\n");
    let (_, d2) = compiled("kind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0}}]}]}\n");
    assert_eq!(d1, d2);
}

#[test]
fn an_annotated_namespace_puts_its_endpoints_in_audit_mode() {
    let yaml = CLUSTER.replace(
        "metadata: {name: x, labels: {team: a}}",
        "metadata: {name: x, labels: {team: a}, annotations: {netpol.io/audit: \"true\"}}",
    );
    let snap = Index::new().reset(&state(&yaml));
    let d = compile(&snap, &NodeView::default());
    assert_ne!(d.endpoints["x/a"].flags & endpoint_flags::AUDIT, 0);
    assert_eq!(d.endpoints["y/c"].flags & endpoint_flags::AUDIT, 0);
}

#[test]
fn the_revision_moves_when_an_allow_is_withdrawn_and_stays_when_one_is_added() {
    let policy = |ports: &str| {
        state(&format!(
            "{CLUSTER}---\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec: {{podSelector: {{matchLabels: {{app: a}}}}, ingress: [{{ports: [{ports}]}}]}}\n"
        ))
    };
    let (mut index, mut compiler) = (Index::new(), Compiler::with_revision_seed(1));
    let mut revision = |s| {
        let snap = index.reset(&s);
        compiler.compile(&snap, &NodeView::default()).endpoints["x/a"].revision
    };
    let r1 = revision(policy("{port: 80}"));
    let r2 = revision(policy("{port: 80}, {port: 81}"));
    assert_eq!(r1, r2, "widening keeps established connections as they are");
    let r3 = revision(policy("{port: 81}"));
    assert_ne!(r2, r3, "port 80 withdrawn: conntrack must re-judge");
    let r4 = revision(policy("{port: 80}, {port: 81}"));
    let r5 = revision(policy("{port: 81}"));
    assert_ne!(
        r5, r3,
        "a revision is never reused, even for the same entries"
    );
    assert_ne!(r4, r5);
}

/// A staged policy: `netpol.io/mode: audit`.
const AUDITED_DENY: &str = "kind: NetworkPolicy\nmetadata: {name: staged, namespace: x, annotations: {netpol.io/mode: audit}}\nspec: {podSelector: {matchLabels: {app: a}}, ingress: [{from: [{podSelector: {matchLabels: {app: b}}}]}]}\n";

#[test]
fn a_policy_in_audit_mode_isolates_in_audit_only_where_nothing_enforced_does() {
    let (ing, eg) = (endpoint_flags::AUDIT_INGRESS, endpoint_flags::AUDIT_EGRESS);
    // Alone: x/a is isolated for ingress in audit; its allows are compiled.
    let (snap, d) = compiled(AUDITED_DENY);
    let a = d.endpoints["x/a"].flags;
    assert_ne!(a & endpoint_flags::ISOLATED_INGRESS, 0);
    assert_eq!(a & (ing | eg), ing);
    assert_eq!(a & endpoint_flags::AUDIT, 0, "not the whole endpoint");
    assert!(allowed(&d, &snap, "x/b", "x/a", proto::TCP, 80));
    // c is denied by the staged policy's lookups (the kernel passes it as AUDIT).
    assert!(!allowed(&d, &snap, "y/c", "x/a", proto::TCP, 80));

    // Beside an enforced policy: the enforced one alone decides, nothing is audited,
    // and the staged policy's allows are not in force.
    let enforced = "kind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n";
    let (snap, d) = compiled(&format!("{AUDITED_DENY}---\n{enforced}"));
    let a = d.endpoints["x/a"].flags;
    assert_ne!(a & endpoint_flags::ISOLATED_INGRESS, 0);
    assert_eq!(a & (ing | eg), 0);
    assert!(!allowed(&d, &snap, "x/b", "x/a", proto::TCP, 80));

    // Where a Baseline rule applies, staging must not lift it: the staged policy waits.
    let baseline = "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {name: default}\nspec: {subject: {namespaces: {}}, ingress: [{name: d, action: Deny, from: [{namespaces: {matchLabels: {team: b}}}]}]}\n";
    let (snap, d) = compiled(&format!("{AUDITED_DENY}---\n{baseline}"));
    let a = d.endpoints["x/a"].flags;
    assert_eq!(a & (ing | eg | endpoint_flags::ISOLATED_INGRESS), 0);
    assert_ne!(a & endpoint_flags::BASELINE_INGRESS, 0);
    assert!(!allowed(&d, &snap, "y/c", "x/a", proto::TCP, 80));

    // An unknown mode is enforced.
    let (snap, d) = compiled(&AUDITED_DENY.replace("mode: audit", "mode: watch"));
    assert_eq!(d.endpoints["x/a"].flags & (ing | eg), 0);
    assert!(!allowed(&d, &snap, "y/c", "x/a", proto::TCP, 80));
}

/// `x/a` admitting only the ipBlocks `blocks` (flow-style YAML).
fn admitting(blocks: &str) -> (Snapshot, Desired) {
    compiled(&format!(
        "kind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec: {{podSelector: {{matchLabels: {{app: a}}}}, ingress: [{{from: [{blocks}]}}]}}\n"
    ))
}

fn admits(d: &Desired, peer: &str) -> bool {
    decide_at(
        d,
        &d.endpoints["x/a"],
        direction::INGRESS,
        &addr_of(ip(peer)),
        proto::TCP,
        80,
    )
    .allowed
}

#[test]
fn a_v4_mapped_ipv6_block_admits_no_ipv4_peer_and_installs_nothing() {
    // Read as IPv4 it would be 0.0.0.0/0: every IPv4 peer.
    let (snap, d) = admitting("{ipBlock: {cidr: '::ffff:0:0/96'}}");
    assert!(d.cidrs.is_empty(), "{:?}", d.cidrs);
    assert!(!allowed(&d, &snap, "y/c", "x/a", proto::TCP, 80));
    for peer in ["10.245.0.1", "0.0.0.1", "255.255.255.255", "fd00::1"] {
        assert!(!admits(&d, peer), "{peer}");
    }
    let (_, d) = admitting("{ipBlock: {cidr: '::ffff:10.0.0.0/104'}}");
    assert!(d.cidrs.is_empty(), "{:?}", d.cidrs);
    assert!(!admits(&d, "10.1.2.3"));
}

#[test]
fn an_ipv6_block_around_the_v4_mapped_range_admits_no_ipv4_peer() {
    for blocks in [
        "{ipBlock: {cidr: '::/0'}}",
        "{ipBlock: {cidr: '::/80'}}",
        "{ipBlock: {cidr: '::/0', except: ['::ffff:0:0/96']}}",
        "{ipBlock: {cidr: '::/0', except: ['::ffff:10.0.0.0/104']}}",
    ] {
        let (snap, d) = admitting(blocks);
        assert!(
            !allowed(&d, &snap, "y/c", "x/a", proto::TCP, 80),
            "{blocks}"
        );
        assert!(!admits(&d, "10.245.0.1"), "{blocks}");
        assert!(admits(&d, "::1"), "{blocks}");
        // The except's keys are v4-mapped: none may be installed as IPv4 prefixes.
        assert!(d.cidrs.keys().all(|c| !c.is_v4_mapped_v6()), "{blocks}");
        let v4: Vec<String> = d
            .cidrs
            .iter()
            .filter(|(c, _)| c.is_v4())
            .map(|(c, e)| format!("{c}={}", e.identity))
            .collect();
        assert_eq!(v4, [format!("0.0.0.0/0={}", identity::ANY)], "{blocks}");
    }
    // Beside an IPv4 block, the IPv6 one still leaves the other IPv4 peers out.
    let (_, d) = admitting("{ipBlock: {cidr: '::/0'}}, {ipBlock: {cidr: 10.245.0.0/16}}");
    assert!(admits(&d, "10.245.0.1"));
    assert!(!admits(&d, "10.246.0.1"));
    assert!(admits(&d, "fd00::1"));
}

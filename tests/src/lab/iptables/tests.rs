//! The iptables ruleset on small clusters.

use super::*;
use netpol_engine::index::Index;

fn state(yaml: &str) -> netpol_engine::objects::ClusterState {
    netpol_engine::objects::ClusterState::from_text(yaml).unwrap()
}

const CLUSTER: &str = r#"
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
kind: Namespace
metadata: {name: y}
---
kind: Pod
metadata: {name: server, namespace: x, labels: {app: server}}
spec: {nodeName: node0, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.2, podIPs: [{ip: 10.244.0.2}, {ip: "fd00::af4:2"}]}
---
kind: Pod
metadata: {name: client, namespace: y, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c}]}
status: {podIP: 10.244.1.2, podIPs: [{ip: 10.244.1.2}]}
---
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}, {port: http}, {protocol: UDP, port: 5000, endPort: 5010}]
  - from: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]
  - from: [{podSelector: {matchLabels: {app: nobody}}}]
"#;

#[test]
fn a_policy_becomes_kube_router_chains_and_sets() {
    let snap = Index::new().reset(&state(CLUSTER));
    assert!(snap.invalid.is_empty(), "{:?}", snap.invalid);
    let rs = ruleset(&snap, "node0");
    let t = &rs.filter4;
    // The fast path comes first; the server has an ingress chain, nobody egress.
    let first = t.lines().position(|l| l.contains("ESTABLISHED")).unwrap();
    let jump = t
        .lines()
        .position(|l| l.contains("-d 10.244.0.2 -j KUBE-POD-IN-"))
        .unwrap();
    assert!(first < jump, "{t}");
    assert!(!t.contains("KUBE-POD-EG-"), "{t}");
    // Rule 0: the client's set, three ports (80, the named port's 8080, a range).
    let client_set = rs
        .sets
        .iter()
        .find(|(_, s)| s.members == vec!["10.244.1.2".to_string()])
        .map(|(n, _)| n.clone())
        .expect("a set of the client");
    let lines: Vec<&str> = t
        .lines()
        .filter(|l| l.contains(&format!("--match-set {client_set} src")))
        .collect();
    assert_eq!(lines.len(), 6, "{lines:#?}");
    assert!(lines[0].contains("-p tcp --dport 80 -j MARK --set-xmark 0x10000/0x10000"));
    assert!(lines[1].contains("-p tcp --dport 80 -m mark --mark 0x10000/0x10000 -j RETURN"));
    assert!(lines.iter().any(|l| l.contains("-p tcp --dport 8080")));
    assert!(lines.iter().any(|l| l.contains("-p udp --dport 5000:5010")));
    // Rule 1: a hash:net with the except as nomatch and /0 in halves; all ports.
    let net = rs
        .sets
        .values()
        .find(|s| s.kind == SetKind::HashNet && s.family == Family::V4)
        .unwrap();
    assert_eq!(
        net.members,
        ["0.0.0.0/1", "10.0.0.0/8 nomatch", "128.0.0.0/1"]
    );
    // Rule 2 selects no pod: no line, as kube-router.
    // Two lines per match: rule 0's three ports and rule 1's block, IPv4 only (the
    // client has no IPv6 address and the block is IPv4).
    assert_eq!(rs.policy_rules, 2 * (3 + 1));
    // IPv6: neighbour discovery passes; the client has no IPv6, so rule 0 is absent.
    assert!(rs.filter6.contains("neighbour-solicitation"));
    // Another node enforces nothing for x/server.
    let other = ruleset(&snap, "node1");
    assert!(!other.filter4.contains("KUBE-POD-"));
    assert_eq!(ruleset(&snap, "node0"), rs, "deterministic");
}

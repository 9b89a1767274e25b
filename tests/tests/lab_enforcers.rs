//! The benchmarks' other enforcers are real enforcers: on a two-node lab, the iptables
//! enforcer (kube-router's layout) and the nftables one (kube-network-policies' sets)
//! let through exactly what `netpol simulate` allows, pair by pair, on TCP and UDP,
//! across nodes and on one; with no enforcer everything connects. Needs root; each lab has its own name and a guard that tears it down.

mod support;

use support::lab::{Lab, NETPOL};

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value;

/// A two-node lab of `manifests` under `enforcer`.
fn lab_up(tag: &str, enforcer: &str, manifests: &str) -> Lab {
    Lab::up(
        tag,
        &[("cluster.yaml", manifests)],
        &["--nodes", "2", "--enforcer", enforcer],
    )
}

/// (from, to) → connected, for every ordered pair of pods.
fn probe(lab: &Lab, port: u16, protocol: &str) -> BTreeMap<(String, String), bool> {
    let port = port.to_string();
    let out = lab.netpol(&[
        "lab",
        "probe",
        "--port",
        &port,
        "--protocol",
        protocol,
        "--timeout",
        "0.5",
        "-o",
        "json",
    ]);
    pairs(&out, |r| r["result"] == "connected")
}

fn run(args: &[&str]) -> String {
    let out = Command::new(NETPOL).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "netpol {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn pairs(json: &str, ok: impl Fn(&Value) -> bool) -> BTreeMap<(String, String), bool> {
    let v: Value = serde_json::from_str(json).unwrap();
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                (
                    r["from"].as_str().unwrap().to_string(),
                    r["to"].as_str().unwrap().to_string(),
                ),
                ok(r),
            )
        })
        .collect()
}

/// Nine pods over two nodes with fixed addresses (so ipBlocks mean the same to the lab
/// and to simulate), each serving TCP 80 (named http), TCP 81 and UDP 53.
fn cluster() -> String {
    let mut out = String::new();
    for ns in ["x", "y", "z"] {
        out.push_str(&format!(
            "kind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n---\n"
        ));
    }
    let mut n = 0;
    for ns in ["x", "y", "z"] {
        for pod in ["a", "b", "c"] {
            let node = n % 2;
            let host = 2 + n / 2;
            n += 1;
            out.push_str(&format!(
                "kind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\n\
                 spec: {{nodeName: node{node}, containers: [{{name: c, ports: [{{name: http, containerPort: 80}}, \
                 {{containerPort: 81}}, {{name: dns, containerPort: 53, protocol: UDP}}]}}]}}\n\
                 status: {{podIP: 10.244.{node}.{host}}}\n---\n"
            ));
        }
    }
    out.push_str(POLICIES);
    out
}

/// Default deny, namespace and pod selectors, named and numbered ports and a range, an
/// egress policy with an ipBlock and an except, UDP.
const POLICIES: &str = r#"
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {}}
---
kind: NetworkPolicy
metadata: {name: a-from-y-and-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: 80}, {protocol: UDP, port: dns}]
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: 81}]
---
kind: NetworkPolicy
metadata: {name: c-egress, namespace: z}
spec:
  podSelector: {matchLabels: {pod: c}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}}]
  - to: [{ipBlock: {cidr: 10.244.1.0/24, except: [10.244.1.3/32]}}]
    ports: [{protocol: TCP, port: 81}, {protocol: UDP, port: 53}]
---
kind: NetworkPolicy
metadata: {name: b-ports, namespace: y}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: c}}}]
    ports: [{port: 80, endPort: 81}]
"#;

#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn the_iptables_enforcer_connects_exactly_what_simulate_allows() {
    connects_exactly_what_simulate_allows("ipt", "iptables");
}

#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn the_nftables_enforcer_connects_exactly_what_simulate_allows() {
    connects_exactly_what_simulate_allows("nft", "nftables");
}

/// Every ordered pair of pods on each port: the lab under `enforcer` connects it iff
/// `netpol simulate` allows it.
fn connects_exactly_what_simulate_allows(tag: &str, enforcer: &str) {
    let manifests = cluster();
    let lab = lab_up(tag, enforcer, &manifests);
    let dir = lab.dir.to_str().unwrap().to_string();
    let mut allowed_somewhere = 0;
    let mut denied_somewhere = 0;
    for (port, protocol) in [(80, "TCP"), (81, "TCP"), (53, "UDP")] {
        let want = pairs(
            &run(&[
                "simulate",
                "--manifests",
                &dir,
                "--port",
                &port.to_string(),
                "--protocol",
                protocol,
                "-o",
                "json",
            ]),
            |r| r["allowed"] == true,
        );
        let got = probe(&lab, port, protocol);
        assert_eq!(want.len(), 72, "every ordered pair of nine pods");
        let wrong: Vec<String> = want
            .iter()
            .filter(|(pair, allowed)| got.get(*pair) != Some(allowed))
            .map(|((from, to), allowed)| {
                format!("{from} -> {to} {protocol}/{port}: simulate allowed={allowed}, lab connected={:?}", got.get(&(from.clone(), to.clone())))
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        allowed_somewhere += want.values().filter(|a| **a).count();
        denied_somewhere += want.values().filter(|a| !**a).count();
    }
    assert!(allowed_somewhere > 0 && denied_somewhere > 0);
}

#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn with_no_enforcer_every_pod_connects() {
    let lab = lab_up("none", "none", &cluster());
    let got = probe(&lab, 80, "TCP");
    assert_eq!(got.len(), 72);
    assert!(got.values().all(|c| *c), "{got:?}");
}

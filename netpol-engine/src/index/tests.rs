//! The index kept current by resets and changes, and the state helper the engine's
//! other tests build clusters with.
use super::*;

pub fn state(yaml: &str) -> ClusterState {
    ClusterState::from_text(yaml).unwrap()
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

//! The kube source against a mocked API server speaking the real list/watch protocol
//! over HTTP (lists with a resourceVersion, chunked `watch=true` event streams,
//! BOOKMARK, 410 Gone in the stream, disconnects, failing lists), driven one step at a
//! time: each test pushes a step and waits for the index (and compiled state) it must
//! produce. The waits are on the source's own updates, bounded only to fail instead of
//! hanging.

mod mock_api;

use mock_api::{list, within, MockApi, Step, NAMESPACES, PODS, POLICIES, SERVICES};
use netpol_agent::source::kube::{self as kube_source, KubeSource, Update};
use netpol_engine::compile::{compile, NodeView};
use netpol_engine::index::{Index, Snapshot};
use serde_json::{json, Value};
use std::collections::BTreeMap;

fn namespace(name: &str, rv: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "resourceVersion": rv, "labels": labels,
                        "managedFields": [{"manager": "kubectl"}],
                        "annotations": {"netpol.io/audit": "false", "big": "x".repeat(1000)}}})
}

fn pod(ns: &str, name: &str, rv: &str, app: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "resourceVersion": rv, "labels": {"app": app},
                        "managedFields": [{"manager": "kubelet"}]},
           "spec": {"nodeName": "node-1",
                    "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "1d"],
                                    "env": [{"name": "A", "value": "b"}],
                                    "ports": [{"name": "http", "containerPort": 8080}]}],
                    "volumes": [{"name": "v", "emptyDir": {}}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                      "conditions": [{"type": "Ready", "status": "True"}]}})
}

fn deny_all(ns: &str, name: &str, rv: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": ns, "resourceVersion": rv},
           "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
}

fn bookmark(kind: &str, rv: &str) -> Value {
    json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": "v1",
           "metadata": {"resourceVersion": rv}}})
}

fn gone() -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": "too old resource version: 1 (5)", "reason": "Expired", "code": 410}})
}

/// The index fed by a running source.
struct Fed {
    source: KubeSource,
    index: Index,
    snap: Snapshot,
    resets: usize,
}

impl Fed {
    fn new(source: KubeSource) -> Fed {
        Fed {
            source,
            index: Index::new(),
            snap: Snapshot::default(),
            resets: 0,
        }
    }

    /// Applies updates until `pred` holds for the snapshot.
    async fn until(&mut self, what: &str, pred: impl Fn(&Snapshot) -> bool) {
        within(async {
            while !pred(&self.snap) {
                match self.source.updates.recv().await.expect("source ended") {
                    Update::Reset(state) => {
                        self.resets += 1;
                        self.snap = self.index.reset(&state);
                    }
                    Update::Change(c) => self.snap = self.index.apply(&c).clone(),
                }
            }
        })
        .await;
        eprintln!("reached: {what}");
    }
}

fn view() -> NodeView {
    NodeView {
        node: Some("node-1".into()),
        host_addrs: vec![],
    }
}

async fn initial_cluster(api: &MockApi) {
    api.set_list(
        NAMESPACES,
        list(
            "Namespace",
            "10",
            vec![namespace("a", "3", json!({"team": "x"}))],
        ),
    );
    api.set_list(
        PODS,
        list(
            "Pod",
            "10",
            vec![
                pod("a", "p1", "4", "web", "10.0.0.1"),
                pod("a", "p2", "5", "db", "10.0.0.2"),
            ],
        ),
    );
    api.set_list(
        POLICIES,
        list("NetworkPolicy", "10", vec![deny_all("a", "deny", "6")]),
    );
}

#[tokio::test]
async fn the_first_list_fills_the_index_and_missing_crds_do_not_block_it() {
    let api = MockApi::start().await;
    initial_cluster(&api).await;
    let source = kube_source::start(api.client());
    let health = source.health.clone();
    let mut fed = Fed::new(source);
    fed.until("first list", |s| s.pods.len() == 2 && s.policies.len() == 1)
        .await;
    assert_eq!(fed.resets, 1, "one reset carries the whole first list");
    let h = health.borrow().clone();
    assert!(h.synced);
    assert_eq!(
        h.missing.len(),
        5,
        "every cluster-policy CRD version, and the (optional) nodes, are absent here: {:?}",
        h.missing
    );
    // Compiled: both local pods are endpoints, isolated for ingress.
    let desired = compile(&fed.snap, &view());
    assert_eq!(
        desired.endpoints.keys().cloned().collect::<Vec<_>>(),
        ["a/p1", "a/p2"]
    );
    // Stripped: the namespace keeps the audit annotation only; ports survive.
    assert!(!fed.snap.audit_namespaces.contains("a"));
    assert_eq!(
        fed.snap.pods["a/p1"].named_ports["http"],
        vec![(6u8, 8080u16)]
    );
    // Every list asked for what the source needs, nothing else.
    let reqs = api.requests();
    for path in [NAMESPACES, PODS, SERVICES, POLICIES] {
        assert!(
            reqs.iter().any(|(m, t)| m == "GET" && t.starts_with(path)),
            "{path} listed: {reqs:?}"
        );
    }
}

#[tokio::test]
async fn watch_events_bookmarks_disconnects_and_gone_keep_the_index_exact() {
    let api = MockApi::start().await;
    initial_cluster(&api).await;
    let source = kube_source::start(api.client());
    let health = source.health.clone();
    let mut fed = Fed::new(source);
    fed.until("first list", |s| s.pods.len() == 2).await;
    api.wait_request(|_, t| t.starts_with(PODS) && t.contains("watch=true"))
        .await;

    // ADDED, then MODIFIED (relabel: a new identity), then DELETED.
    api.event(PODS, "ADDED", pod("a", "p3", "11", "web", "10.0.0.3"));
    fed.until("p3 added", |s| s.pods.contains_key("a/p3")).await;
    assert_eq!(
        fed.snap.pods["a/p3"].identity,
        fed.snap.pods["a/p1"].identity
    );
    api.event(PODS, "MODIFIED", pod("a", "p3", "12", "cache", "10.0.0.3"));
    fed.until("p3 relabelled", |s| {
        s.pods
            .get("a/p3")
            .is_some_and(|p| p.labels["app"] == "cache")
    })
    .await;
    assert_ne!(
        fed.snap.pods["a/p3"].identity,
        fed.snap.pods["a/p1"].identity
    );
    assert_eq!(compile(&fed.snap, &view()).endpoints.len(), 3);

    // A BOOKMARK moves the resourceVersion and changes nothing; after a disconnect the
    // watch resumes from it (no re-list).
    api.push(PODS, Step::Line(bookmark("Pod", "20")));
    api.push(PODS, Step::Close);
    api.wait_request(|_, t| t.starts_with(PODS) && t.contains("resourceVersion=20"))
        .await;
    let lists_before = health.borrow().lists.get("pods.v1").copied();
    api.event(PODS, "DELETED", pod("a", "p2", "21", "db", "10.0.0.2"));
    fed.until("p2 deleted", |s| !s.pods.contains_key("a/p2"))
        .await;
    assert_eq!(health.borrow().lists.get("pods.v1").copied(), lists_before);
    assert_eq!(fed.resets, 1, "a disconnect is resumed, not re-listed");

    // 410 Gone: the source re-lists, and the new list replaces the index, so an object
    // whose DELETED event was never seen goes too (p1 is not in the new list).
    api.set_list(
        PODS,
        list("Pod", "30", vec![pod("a", "p3", "12", "cache", "10.0.0.3")]),
    );
    api.push(PODS, Step::Line(gone()));
    fed.until("re-listed after 410", |s| {
        !s.pods.contains_key("a/p1") && s.pods.contains_key("a/p3")
    })
    .await;
    assert_eq!(fed.resets, 2);
    assert_eq!(health.borrow().lists["pods.v1"], 2);
    assert!(health.borrow().restarts["pods.v1"] >= 1);
    // The policy and namespace were untouched by the pods' re-list.
    assert_eq!(fed.snap.policies.len(), 1);
    let desired = compile(&fed.snap, &view());
    assert_eq!(
        desired.endpoints.keys().cloned().collect::<Vec<_>>(),
        ["a/p3"]
    );
}

#[tokio::test]
async fn a_failing_list_keeps_the_last_state_marks_it_stale_and_recovers() {
    let api = MockApi::start().await;
    initial_cluster(&api).await;
    let source = kube_source::start(api.client());
    let mut health = source.health.clone();
    let mut fed = Fed::new(source);
    fed.until("first list", |s| s.policies.len() == 1).await;
    api.wait_request(|_, t| t.starts_with(POLICIES) && t.contains("watch=true"))
        .await;

    // The watch says 410 and the re-list fails (500): stale, last state kept.
    api.set_list(
        POLICIES,
        (
            500,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "reason": "InternalError", "code": 500, "message": "etcd is sad"}),
        ),
    );
    api.push(POLICIES, Step::Line(gone()));
    within(health.wait_for(|h| h.stale_since.is_some()))
        .await
        .unwrap();
    assert_eq!(
        fed.snap.policies.len(),
        1,
        "the last state is still enforced"
    );
    assert!(fed.source.updates.try_recv().is_err(), "nothing to apply");

    // The API server recovers: the backoff retries, the list resets the index.
    api.set_list(
        POLICIES,
        list("NetworkPolicy", "40", vec![deny_all("a", "deny2", "39")]),
    );
    fed.until("recovered", |s| {
        s.policies.contains_key("a/deny2") && !s.policies.contains_key("a/deny")
    })
    .await;
    within(health.wait_for(|h| h.stale_since.is_none()))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_rejected_policy_is_reported_as_a_kubernetes_event_naming_the_field() {
    let api = MockApi::start().await;
    initial_cluster(&api).await;
    let client = api.client();
    let source = kube_source::start(client.clone());
    let mut fed = Fed::new(source);
    fed.until("first list", |s| s.policies.len() == 1).await;
    let (invalid_tx, invalid_rx) = tokio::sync::watch::channel(Vec::new());
    tokio::spawn(kube_source::report_invalid(
        client,
        "node-1".into(),
        invalid_rx,
    ));

    let mut bad = deny_all("a", "bad", "50");
    bad["spec"]["ingress"] = json!([{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]);
    api.event(POLICIES, "ADDED", bad);
    fed.until("rejected", |s| s.invalid.iter().any(|i| i.name == "bad"))
        .await;
    let posted = api.posted.notified();
    invalid_tx.send_replace(fed.snap.invalid.clone());
    within(posted).await;
    let posts = api.shared.lock().unwrap().posts.clone();
    assert_eq!(posts.len(), 1, "{posts:?}");
    let (path, event) = &posts[0];
    assert_eq!(path, "/apis/events.k8s.io/v1/namespaces/a/events");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "PolicyRejected");
    assert_eq!(event["regarding"]["kind"], "NetworkPolicy");
    assert_eq!(event["regarding"]["name"], "bad");
    let note = event["note"].as_str().unwrap();
    assert!(
        note.contains("spec.ingress[0].from[0].ipBlock.cidr"),
        "{note}"
    );
}

/// Issue 7, the policy-programmed signal: a local pod whose policies are in the datapath
/// gets the `netpol.io/PolicyProgrammed` condition (a strategic merge patch of its
/// status, naming the policies enforced); an unchanged state is not patched again.
#[tokio::test]
async fn programmed_pods_get_the_policy_programmed_condition() {
    let api = MockApi::start().await;
    let (tx, rx) = tokio::sync::watch::channel(BTreeMap::new());
    tokio::spawn(kube_source::report_programmed(api.client(), rx));
    let posted = api.posted.notified();
    tx.send_replace(BTreeMap::from([(
        "a/web".to_string(),
        "ingress: a/deny; egress: not isolated (revision 3)".to_string(),
    )]));
    within(posted).await;
    let posts = api.shared.lock().unwrap().posts.clone();
    assert_eq!(posts.len(), 1, "{posts:?}");
    let (path, patch) = &posts[0];
    assert_eq!(path, "/api/v1/namespaces/a/pods/web/status");
    let c = &patch["status"]["conditions"][0];
    assert_eq!(c["type"], kube_source::PROGRAMMED_CONDITION);
    assert_eq!(c["status"], "True");
    assert_eq!(
        c["message"],
        "ingress: a/deny; egress: not isolated (revision 3)"
    );
    assert!(c["lastTransitionTime"].is_string(), "{c}");
    let requests = api.shared.lock().unwrap().requests.clone();
    assert!(requests.iter().any(|(m, _)| m == "PATCH"), "{requests:?}");

    // A new revision is patched again; a second pod with it.
    let posted = api.posted.notified();
    tx.send_replace(BTreeMap::from([
        (
            "a/web".to_string(),
            "ingress: a/deny, a/allow; egress: not isolated (revision 5)".to_string(),
        ),
        (
            "a/db".to_string(),
            "ingress: not isolated; egress: not isolated (revision 1)".to_string(),
        ),
    ]));
    within(posted).await;
    // Both patches arrive (in key order); wait for the second.
    loop {
        let next = api.posted.notified();
        if api.shared.lock().unwrap().posts.len() >= 3 {
            break;
        }
        within(next).await;
    }
    let posts = api.shared.lock().unwrap().posts.clone();
    assert_eq!(posts.len(), 3, "{posts:?}");
    assert_eq!(posts[1].0, "/api/v1/namespaces/a/pods/db/status");
    assert_eq!(posts[2].0, "/api/v1/namespaces/a/pods/web/status");
    assert!(posts[2].1["status"]["conditions"][0]["lastTransitionTime"].is_null());
}

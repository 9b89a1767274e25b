//! The kube source against a mocked API server speaking the real list/watch protocol
//! over HTTP (lists with a resourceVersion, chunked `watch=true` event streams,
//! BOOKMARK, 410 Gone in the stream, disconnects, failing lists), driven one step at a
//! time: each test pushes a step and waits for the index (and compiled state) it must
//! produce. The waits are on the source's own updates, bounded only to fail instead of
//! hanging.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netpol_agent::compile::{compile, NodeView};
use netpol_agent::index::{Index, Snapshot};
use netpol_agent::source::kube::{self as kube_source, KubeSource, Update};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

/// One step of a watch stream.
enum Step {
    Line(Value),
    /// End the response: the client sees a disconnect.
    Close,
}

#[derive(Default)]
struct Shared {
    /// Path → (status, body) of its list.
    lists: BTreeMap<String, (u16, Value)>,
    /// Path → the steps its watches read, one watch at a time.
    watches: BTreeMap<String, Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Step>>>>,
    /// Every request: method and target.
    requests: Vec<(String, String)>,
    /// Bodies POSTed, by path.
    posts: Vec<(String, Value)>,
}

struct MockApi {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    senders: BTreeMap<String, mpsc::UnboundedSender<Step>>,
    posted: Arc<Notify>,
    requested: Arc<Notify>,
}

const NAMESPACES: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/pods";
const SERVICES: &str = "/api/v1/services";
const POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";

fn list(kind: &str, rv: &str, items: Vec<Value>) -> (u16, Value) {
    (
        200,
        json!({"kind": format!("{kind}List"), "apiVersion": "v1",
               "metadata": {"resourceVersion": rv}, "items": items}),
    )
}

impl MockApi {
    async fn start() -> MockApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let mut senders = BTreeMap::new();
        for path in [NAMESPACES, PODS, SERVICES, POLICIES] {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.insert(path.to_string(), tx);
            let mut s = shared.lock().unwrap();
            s.watches
                .insert(path.into(), Arc::new(tokio::sync::Mutex::new(rx)));
            s.lists.insert(path.into(), list("X", "1", vec![]));
        }
        let posted = Arc::new(Notify::new());
        let requested = Arc::new(Notify::new());
        let (s, p, r) = (shared.clone(), posted.clone(), requested.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (s, p, r) = (s.clone(), p.clone(), r.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, s, p, r).await;
                });
            }
        });
        MockApi {
            addr,
            shared,
            senders,
            posted,
            requested,
        }
    }

    fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    fn set_list(&self, path: &str, resp: (u16, Value)) {
        self.shared.lock().unwrap().lists.insert(path.into(), resp);
    }

    fn push(&self, path: &str, step: Step) {
        self.senders[path].send(step).unwrap();
    }

    fn event(&self, path: &str, kind: &str, object: Value) {
        self.push(path, Step::Line(json!({"type": kind, "object": object})));
    }

    fn requests(&self) -> Vec<(String, String)> {
        self.shared.lock().unwrap().requests.clone()
    }

    /// Waits until a request matching `pred` has been made.
    async fn wait_request(&self, pred: impl Fn(&str, &str) -> bool) {
        within(async {
            loop {
                let seen = self.requested.notified();
                if self.requests().iter().any(|(m, t)| pred(m, t)) {
                    return;
                }
                seen.await;
            }
        })
        .await
    }
}

async fn serve(
    mut stream: TcpStream,
    shared: Arc<Mutex<Shared>>,
    posted: Arc<Notify>,
    requested: Arc<Notify>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut words = head.split_whitespace();
    let (method, target) = (
        words.next().unwrap_or("").to_string(),
        words.next().unwrap_or("").to_string(),
    );
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..].to_vec();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let path = path.to_string();
    let is_watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    shared
        .lock()
        .unwrap()
        .requests
        .push((method.clone(), target.clone()));
    requested.notify_waiters();

    let respond = |code: u16, body: &Value| {
        let text = body.to_string();
        format!(
            "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
            text.len()
        )
    };
    if method == "POST" {
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        shared.lock().unwrap().posts.push((path, value.clone()));
        posted.notify_waiters();
        stream.write_all(respond(201, &value).as_bytes()).await?;
        return Ok(());
    }
    if method == "PATCH" {
        // Recorded with the posts; answered with the object the patch names.
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        shared.lock().unwrap().posts.push((path.clone(), value));
        posted.notify_waiters();
        let name = path
            .trim_end_matches("/status")
            .rsplit('/')
            .next()
            .unwrap_or_default();
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}});
        stream.write_all(respond(200, &pod).as_bytes()).await?;
        return Ok(());
    }
    let not_found = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404, "message": "the server could not find the requested resource"});
    if !is_watch {
        let (code, body) = shared
            .lock()
            .unwrap()
            .lists
            .get(&path)
            .cloned()
            .unwrap_or((404, not_found));
        stream.write_all(respond(code, &body).as_bytes()).await?;
        return Ok(());
    }
    let steps = shared.lock().unwrap().watches.get(&path).cloned();
    let Some(steps) = steps else {
        stream
            .write_all(respond(404, &not_found).as_bytes())
            .await?;
        return Ok(());
    };
    stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        .await?;
    let mut steps = steps.lock().await;
    while let Some(step) = steps.recv().await {
        match step {
            Step::Line(v) => {
                let line = format!("{v}\n");
                stream
                    .write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())
                    .await?;
            }
            Step::Close => break,
        }
    }
    stream.write_all(b"0\r\n\r\n").await?;
    stream.shutdown().await?;
    Ok(())
}

/// Fails the test instead of hanging: nothing here waits on time to be ready.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("the source did not get there within 30 s")
}

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

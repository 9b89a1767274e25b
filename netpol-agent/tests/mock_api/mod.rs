//! A mocked Kubernetes API server speaking the real list/watch protocol over HTTP:
//! lists with a resourceVersion, chunked `watch=true` event streams, POSTs recorded.
//! Shared by the kube source's tests and `lint --cluster`'s.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

/// One step of a watch stream.
pub enum Step {
    Line(Value),
    /// End the response: the client sees a disconnect.
    Close,
}

#[derive(Default)]
pub struct Shared {
    /// Path → (status, body) of its list.
    pub lists: BTreeMap<String, (u16, Value)>,
    /// Path → the steps its watches read, one watch at a time.
    pub watches: BTreeMap<String, Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Step>>>>,
    /// Every request: method and target.
    pub requests: Vec<(String, String)>,
    /// Bodies POSTed, by path.
    pub posts: Vec<(String, Value)>,
}

pub struct MockApi {
    pub addr: SocketAddr,
    pub shared: Arc<Mutex<Shared>>,
    pub senders: BTreeMap<String, mpsc::UnboundedSender<Step>>,
    pub posted: Arc<Notify>,
    pub requested: Arc<Notify>,
}

pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const PODS: &str = "/api/v1/pods";
pub const SERVICES: &str = "/api/v1/services";
pub const POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";

/// A kubeconfig whose current context is the mock at `addr` (plain HTTP, no user).
pub fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: mock\nclusters:\n- name: mock\n  cluster: {{server: \"http://{addr}\"}}\ncontexts:\n- name: mock\n  context: {{cluster: mock, user: nobody}}\nusers:\n- name: nobody\n  user: {{}}\n"
    )
}

pub fn list(kind: &str, rv: &str, items: Vec<Value>) -> (u16, Value) {
    (
        200,
        json!({"kind": format!("{kind}List"), "apiVersion": "v1",
               "metadata": {"resourceVersion": rv}, "items": items}),
    )
}

impl MockApi {
    pub async fn start() -> MockApi {
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

    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Writes a kubeconfig at `path` whose current context is this server.
    pub fn write_kubeconfig(&self, path: &std::path::Path) {
        std::fs::write(path, kubeconfig(self.addr)).unwrap();
    }

    pub fn set_list(&self, path: &str, resp: (u16, Value)) {
        self.shared.lock().unwrap().lists.insert(path.into(), resp);
    }

    pub fn push(&self, path: &str, step: Step) {
        self.senders[path].send(step).unwrap();
    }

    pub fn event(&self, path: &str, kind: &str, object: Value) {
        self.push(path, Step::Line(json!({"type": kind, "object": object})));
    }

    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared.lock().unwrap().requests.clone()
    }

    /// Waits until a request matching `pred` has been made.
    pub async fn wait_request(&self, pred: impl Fn(&str, &str) -> bool) {
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

pub async fn serve(
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
pub async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("the source did not get there within 30 s")
}

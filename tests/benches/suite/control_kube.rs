//! The kube source's share: a release agent on `--source kube` against the mocked API
//! server (the kube source tests' own, speaking list and watch), listing a synthetic
//! cluster and then following a watch event for every pod. RSS after the list and after
//! the events, the first sync, and how long the events took to be applied.

use std::sync::mpsc;
use std::time::Instant;

use anyhow::Context;
use netpol_agent::source::Object;
use netpol_tests::synthetic::{self, Shape};
use serde_json::{json, Value};

use crate::control::node;
use crate::mock_api::{self, list, MockApi, NAMESPACES, PODS, POLICIES};
use crate::report::KubeRun;
use crate::testbed::{enter_netns, memory_mib};

/// The mock, serving inside `netns` (where the agent can reach it) from a thread of its
/// own until dropped.
struct Served {
    api: MockApi,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    fn start(netns: &str) -> anyhow::Result<Served> {
        let (tx, rx) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let netns = netns.to_string();
        let thread = std::thread::spawn(move || {
            let run = || -> anyhow::Result<()> {
                enter_netns(&netns)?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    let _ = tx.send(Ok(MockApi::start().await));
                    let _ = stopped.await;
                });
                Ok(())
            };
            if let Err(e) = run() {
                let _ = tx.send(Err(e));
            }
        });
        let api = rx.recv().context("the mock API server's thread")??;
        Ok(Served {
            api,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An object as the API server lists it: its type and a resourceVersion.
fn listed(kind: &str, api_version: &str, mut v: Value, rv: u64) -> Value {
    v["kind"] = json!(kind);
    v["apiVersion"] = json!(api_version);
    v["metadata"]["resourceVersion"] = json!(rv.to_string());
    v
}

pub fn kube_run(pods: usize) -> anyhow::Result<KubeRun> {
    let mut scratch = node("kube")?;
    let served = Served::start(scratch.netns())?;
    let api = &served.api;
    let (mut namespaces, mut items, mut policies) = (vec![], vec![], vec![]);
    let mut rv = 10;
    for o in synthetic::cluster(&Shape::pods(pods)) {
        rv += 1;
        match o {
            Object::Namespace(x) => {
                namespaces.push(listed("Namespace", "v1", serde_json::to_value(&*x)?, rv))
            }
            Object::Pod(x) => items.push(listed("Pod", "v1", serde_json::to_value(&*x)?, rv)),
            Object::NetworkPolicy(x) => policies.push(listed(
                "NetworkPolicy",
                "networking.k8s.io/v1",
                serde_json::to_value(&*x)?,
                rv,
            )),
            _ => {}
        }
    }
    let local = items
        .iter()
        .filter(|p| p["spec"]["nodeName"] == "node-0")
        .count();
    let n_policies = policies.len();
    let top = (rv + 1).to_string();
    api.set_list(NAMESPACES, list("Namespace", &top, namespaces));
    api.set_list(PODS, list("Pod", &top, items.clone()));
    api.set_list(POLICIES, list("NetworkPolicy", &top, policies));
    let kubeconfig = scratch.path("kubeconfig");
    std::fs::write(&kubeconfig, mock_api::kubeconfig(api.addr))?;
    let started = Instant::now();
    let pid = scratch.start_agent("kube", &[("KUBECONFIG", &kubeconfig)])?;
    let listed_status = scratch.status_when(&format!("a sync of {pods} listed pods"), |s| {
        s.syncs >= 1 && s.policies == n_policies && s.pending.len() + s.endpoints == local
    })?;
    let first_sync_ms = started.elapsed().as_secs_f64() * 1e3;
    let (rss_listed, _) = memory_mib(pid)?;
    // A relabel of every pod (each a MODIFIED event), then one pod added on this node:
    // the pods' watch is applied in order, so once the new pod is pending, every
    // relabel before it has been applied too.
    let t = Instant::now();
    for mut p in items {
        rv += 1;
        p["metadata"]["labels"]["rollout"] = json!("2");
        p["metadata"]["resourceVersion"] = json!(rv.to_string());
        api.event(PODS, "MODIFIED", p);
    }
    rv += 1;
    api.event(
        PODS,
        "ADDED",
        json!({"kind": "Pod", "apiVersion": "v1",
               "metadata": {"name": "bench-last", "namespace": "default", "resourceVersion": rv.to_string(),
                            "labels": {"bench": "last"}},
               "spec": {"nodeName": "node-0", "containers": [{"name": "c"}]},
               "status": {"phase": "Running", "podIP": "10.244.0.250"}}),
    );
    let after = scratch.status_when(&format!("{pods} watch events"), |s| {
        s.pending.len() + s.endpoints == local + 1
    })?;
    let events_ms = t.elapsed().as_secs_f64() * 1e3;
    let (rss_watched, hwm) = memory_mib(pid)?;
    drop(scratch);
    drop(served);
    Ok(KubeRun {
        pods,
        local_pods: local,
        identities: listed_status.identities,
        identities_after: after.identities,
        first_sync_ms,
        rss_listed_mib: rss_listed,
        events: pods + 1,
        events_ms,
        rss_watched_mib: rss_watched,
        hwm_mib: hwm,
    })
}

//! The `kube` source: one kube-rs watcher per resource netpol reads, merged into the
//! changes the index applies.
//!
//! ```text
//! API server ──list/watch──► watcher per RESOURCES entry (default backoff)
//!      ──(idx, watcher::Event)──► Mirror (stripped objects per resource)
//!      ──► Update::Reset(full ClusterState) on every (re-)list, Update::Change per event
//! ```
//!
//! Nothing is emitted before every resource has been listed once (a CRD that is not
//! installed counts as listed, empty), so the first sync sees the whole cluster. A
//! re-list of any resource (410 Gone, a restart of the watcher) resets the index from
//! the mirror: level-triggered, a missed `Delete` cannot leave an object behind. A
//! watch that breaks keeps the last state enforced; [`Health::stale_since`] says since
//! when, and the agent's readiness drops once that is older than its bound.
//!
//! [`API_CALLS`] are the (group, resource, verb) this module makes, derived from the
//! same table the watchers are started from; `deploy/` grants exactly these.

mod mirror;
mod report;

pub use mirror::{object_of, strip, Health, Mirror, Update};
pub use report::{reference_of, report_invalid, report_programmed, PROGRAMMED_CONDITION};

use std::collections::BTreeSet;

use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use kube::Client;
use tokio::sync::{mpsc, watch};

use super::{ClusterState, Object};

/// A resource the source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    /// Absent from a cluster without the CRD: logged, watched on (it may come later).
    pub optional: bool,
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }

    /// `plural.group/version`, for logs and metrics.
    pub fn name(&self) -> String {
        format!("{}.{}", self.plural, self.api_version())
    }
}

const fn res(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    optional: bool,
) -> Resource {
    Resource {
        group,
        version,
        kind,
        plural,
        optional,
    }
}

/// What the source watches. Of two versions of one kind, the earlier one wins when
/// both serve an object.
pub const RESOURCES: &[Resource] = &[
    res("", "v1", "Namespace", "namespaces", false),
    res("", "v1", "Pod", "pods", false),
    res("", "v1", "Service", "services", false),
    // For cluster policies' `nodes` peers; optional so that a missing grant only
    // costs those peers.
    res("", "v1", "Node", "nodes", true),
    res(
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        false,
    ),
    res(
        "policy.networking.k8s.io",
        "v1beta1",
        "ClusterNetworkPolicy",
        "clusternetworkpolicies",
        true,
    ),
    res(
        "policy.networking.k8s.io",
        "v1alpha2",
        "ClusterNetworkPolicy",
        "clusternetworkpolicies",
        true,
    ),
    res(
        "policy.networking.k8s.io",
        "v1alpha1",
        "AdminNetworkPolicy",
        "adminnetworkpolicies",
        true,
    ),
    res(
        "policy.networking.k8s.io",
        "v1alpha1",
        "BaselineAdminNetworkPolicy",
        "baselineadminnetworkpolicies",
        true,
    ),
];

/// Where rejected objects are reported (Kubernetes Events, `events.k8s.io/v1`).
pub const EVENTS: (&str, &str) = ("events.k8s.io", "events");

/// Every (group, resource, verb) the kube source uses: list and watch per watched
/// resource, create and patch on events (a repeated event is a patch of its series).
pub fn api_calls() -> BTreeSet<(&'static str, &'static str, &'static str)> {
    let mut calls = BTreeSet::new();
    for r in RESOURCES {
        calls.insert((r.group, r.plural, "list"));
        calls.insert((r.group, r.plural, "watch"));
    }
    calls.insert((EVENTS.0, EVENTS.1, "create"));
    calls.insert((EVENTS.0, EVENTS.1, "patch"));
    calls.insert(("", "pods/status", "patch"));
    calls
}

/// The running source: updates for the index and its health.
pub struct KubeSource {
    pub updates: mpsc::UnboundedReceiver<Update>,
    pub health: watch::Receiver<Health>,
}

/// Starts one watcher per [`RESOURCES`] entry (default backoff) and the mirror merging
/// them. Runs until the receivers are dropped.
pub fn start(client: Client) -> KubeSource {
    let (item_tx, mut item_rx) = mpsc::channel(1024);
    for (idx, r) in RESOURCES.iter().enumerate() {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &r.api_resource());
        let tx = item_tx.clone();
        tokio::spawn(async move {
            let mut stream =
                std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
            while let Some(item) = stream.next().await {
                if tx.send((idx, item)).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(item_tx);
    let (update_tx, updates) = mpsc::unbounded_channel();
    let (health_tx, health) = watch::channel(Health::default());
    tokio::spawn(async move {
        let mut mirror = Mirror::new();
        while let Some((idx, item)) = item_rx.recv().await {
            for u in mirror.handle(idx, item) {
                if update_tx.send(u).is_err() {
                    return;
                }
            }
            health_tx.send_replace(mirror.health().clone());
        }
    });
    KubeSource { updates, health }
}

/// One list of every resource, for the tools that read the cluster once (`lint`,
/// `graph --cluster`): the first complete state, through the same watchers and mirror
/// the agent runs. Fails after `timeout`, naming the resources not listed by then.
pub async fn list_once(
    client: Client,
    timeout: std::time::Duration,
) -> anyhow::Result<ClusterState> {
    let mut source = start(client);
    let first = tokio::time::timeout(timeout, async {
        while let Some(update) = source.updates.recv().await {
            if let Update::Reset(state) = update {
                return Some(state);
            }
        }
        None
    })
    .await;
    if let Ok(Some(state)) = first {
        return Ok(state);
    }
    let health = source.health.borrow().clone();
    let waiting: Vec<String> = RESOURCES
        .iter()
        .map(Resource::name)
        .filter(|n| !health.lists.contains_key(n) && !health.missing.contains(n))
        .collect();
    let attempts: u64 = health.restarts.values().sum();
    anyhow::bail!(
        "the API server did not list {} within {timeout:?} ({attempts} failed attempts, logged above); \
         check the kubeconfig context and that it may list and watch these resources",
        waiting.join(", ")
    )
}

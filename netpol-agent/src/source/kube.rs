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

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use kube::Client;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::{ClusterState, Object};
use netpol_engine::objects::{Change, Invalid, Kind, AUDIT_ANNOTATION, MODE_ANNOTATION};

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

/// The pod condition the agent sets once a local pod's policies are in the datapath
/// (usable as a readiness gate, or with `kubectl wait --for=condition=...`).
pub const PROGRAMMED_CONDITION: &str = "netpol.io/PolicyProgrammed";

/// Sets [`PROGRAMMED_CONDITION`] on local pods whose programmed state changed: pod key
/// → the message naming what is enforced (policies per direction, revision). A pod
/// that went away meanwhile is skipped; a failed patch is retried at the next change.
pub async fn report_programmed(
    client: Client,
    mut programmed: watch::Receiver<BTreeMap<String, String>>,
) {
    let mut patched: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let now = programmed.borrow_and_update().clone();
        patched.retain(|k, _| now.contains_key(k));
        for (key, message) in &now {
            if patched.get(key) == Some(message) {
                continue;
            }
            let Some((ns, name)) = key.split_once('/') else {
                continue;
            };
            let mut condition = serde_json::json!({
                "type": PROGRAMMED_CONDITION,
                "status": "True",
                "reason": "Programmed",
                "message": message,
            });
            if !patched.contains_key(key) {
                condition["lastTransitionTime"] =
                    Value::String(k8s_openapi::jiff::Timestamp::now().to_string());
            }
            let patch = serde_json::json!({ "status": { "conditions": [condition] } });
            let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
            match pods
                .patch_status(
                    name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Strategic(patch),
                )
                .await
            {
                Ok(_) => {
                    patched.insert(key.clone(), message.clone());
                }
                Err(error) => {
                    tracing::debug!(pod = %key, %error, "setting the PolicyProgrammed condition failed")
                }
            }
        }
        if programmed.changed().await.is_err() {
            return;
        }
    }
}

/// What the agent applies to its index.
#[derive(Clone, Debug)]
pub enum Update {
    /// A (re-)list: the whole cluster as the mirror holds it.
    Reset(ClusterState),
    Change(Change),
}

/// The source's own state, for readiness and metrics.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// Every resource has been listed once.
    pub synced: bool,
    /// The oldest failure of a watch not yet recovered (None: every watch is live).
    pub stale_since: Option<Instant>,
    /// Watch errors (each one restarts the list or the watch after a backoff), per resource.
    pub restarts: BTreeMap<String, u64>,
    /// Lists (first and re-lists), per resource.
    pub lists: BTreeMap<String, u64>,
    /// Objects that could not be read into their type.
    pub unreadable: u64,
    /// Optional resources the API server does not serve (CRD not installed).
    pub missing: BTreeSet<String>,
}

/// Objects per resource, stripped, and how far each resource's list has got.
#[derive(Default)]
pub struct Mirror {
    /// Per RESOURCES index: (namespace, name) → object.
    stores: Vec<BTreeMap<(String, String), Object>>,
    /// Objects of a list in progress, per RESOURCES index.
    pending: Vec<Option<BTreeMap<(String, String), Object>>>,
    listed: Vec<bool>,
    /// Failure time per resource, cleared by its next successful event.
    failing: Vec<Option<Instant>>,
    health: Health,
    emitted: u64,
}

impl Mirror {
    pub fn new() -> Mirror {
        let n = RESOURCES.len();
        Mirror {
            stores: vec![BTreeMap::new(); n],
            pending: vec![None; n],
            listed: vec![false; n],
            failing: vec![None; n],
            ..Default::default()
        }
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Feeds one item of resource `idx`'s watcher; returns what the index must apply.
    pub fn handle(
        &mut self,
        idx: usize,
        item: Result<watcher::Event<DynamicObject>, watcher::Error>,
    ) -> Vec<Update> {
        let r = RESOURCES[idx];
        let event = match item {
            Ok(e) => e,
            Err(e) => {
                *self.health.restarts.entry(r.name()).or_default() += 1;
                let not_served = matches!(&e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404);
                if not_served && r.optional {
                    if self.health.missing.insert(r.name()) {
                        tracing::warn!(resource = %r.name(), "not served by the API server (CRD not installed?); watching the other resources, retrying this one");
                    }
                    self.failing[idx] = None;
                    if !self.listed[idx] {
                        self.listed[idx] = true;
                        return self.reset_if_synced();
                    }
                    return Vec::new();
                }
                tracing::warn!(resource = %r.name(), error = %e, "watch failed; enforcing the last state, retrying with backoff");
                self.failing[idx].get_or_insert_with(Instant::now);
                self.update_stale();
                return Vec::new();
            }
        };
        self.failing[idx] = None;
        self.health.missing.remove(&r.name());
        self.update_stale();
        match event {
            watcher::Event::Init => {
                self.pending[idx] = Some(BTreeMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(obj) => {
                if let Some((key, obj)) = self.read(idx, obj) {
                    self.pending[idx]
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key, obj);
                }
                Vec::new()
            }
            watcher::Event::InitDone => {
                *self.health.lists.entry(r.name()).or_default() += 1;
                self.stores[idx] = self.pending[idx].take().unwrap_or_default();
                self.listed[idx] = true;
                self.reset_if_synced()
            }
            watcher::Event::Apply(obj) => {
                let Some((key, obj)) = self.read(idx, obj) else {
                    return Vec::new();
                };
                self.stores[idx].insert(key.clone(), obj);
                self.change_of(idx, &key)
            }
            watcher::Event::Delete(obj) => {
                let key = (
                    obj.metadata.namespace.clone().unwrap_or_default(),
                    obj.metadata.name.clone().unwrap_or_default(),
                );
                self.stores[idx].remove(&key);
                self.change_of(idx, &key)
            }
        }
    }

    fn update_stale(&mut self) {
        self.health.stale_since = self.failing.iter().flatten().min().copied();
    }

    fn read(&mut self, idx: usize, obj: DynamicObject) -> Option<((String, String), Object)> {
        let r = RESOURCES[idx];
        let key = (
            obj.metadata.namespace.clone().unwrap_or_default(),
            obj.metadata.name.clone().unwrap_or_default(),
        );
        match object_of(&r, obj) {
            Ok(o) => Some((key, o)),
            Err(error) => {
                self.health.unreadable += 1;
                tracing::warn!(resource = %r.name(), namespace = %key.0, name = %key.1, %error, "object skipped");
                // Whatever it held before is not enforced on.
                self.stores[idx].remove(&key);
                None
            }
        }
    }

    fn synced(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }

    fn reset_if_synced(&mut self) -> Vec<Update> {
        if !self.synced() {
            return Vec::new();
        }
        self.health.synced = true;
        vec![Update::Reset(self.state())]
    }

    /// The whole mirror, one object per (kind, namespace, name).
    pub fn state(&mut self) -> ClusterState {
        self.emitted += 1;
        let mut seen = BTreeSet::new();
        let mut objects = Vec::new();
        for (idx, store) in self.stores.iter().enumerate() {
            for (key, obj) in store {
                if seen.insert((RESOURCES[idx].kind, key.clone())) {
                    objects.push(obj.clone());
                }
            }
        }
        ClusterState {
            objects,
            errors: Vec::new(),
            digest: format!("kube-{}", self.emitted),
        }
    }

    /// The change one object's event makes, looking at every version of its kind.
    fn change_of(&mut self, idx: usize, key: &(String, String)) -> Vec<Update> {
        if !self.synced() {
            return Vec::new(); // the first Reset carries it
        }
        let kind = RESOURCES[idx].kind;
        let current = RESOURCES
            .iter()
            .enumerate()
            .filter(|(_, r)| r.kind == kind)
            .find_map(|(i, _)| self.stores[i].get(key));
        self.emitted += 1;
        match (current, kind_of(kind)) {
            (Some(obj), _) => vec![Update::Change(Change::Upsert(obj.clone()))],
            (None, Some(kind)) => vec![Update::Change(Change::Delete {
                kind,
                namespace: key.0.clone(),
                name: key.1.clone(),
            })],
            // Services: the index keeps none yet; the next re-list forgets it.
            (None, None) => Vec::new(),
        }
    }

    /// A digest naming how many updates the mirror has emitted.
    pub fn digest(&self) -> String {
        format!("kube-{}", self.emitted)
    }
}

fn kind_of(kind: &str) -> Option<Kind> {
    Some(match kind {
        "Namespace" => Kind::Namespace,
        "Node" => Kind::Node,
        "Pod" => Kind::Pod,
        "NetworkPolicy" => Kind::NetworkPolicy,
        "ClusterNetworkPolicy" => Kind::ClusterNetworkPolicy,
        "AdminNetworkPolicy" => Kind::AdminNetworkPolicy,
        "BaselineAdminNetworkPolicy" => Kind::BaselineAdminNetworkPolicy,
        _ => return None,
    })
}

/// Reads a watched object into its type, keeping only what the index uses.
pub fn object_of(r: &Resource, obj: DynamicObject) -> Result<Object, String> {
    let mut v = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    strip(r.kind, &mut v);
    let map = v.as_object_mut().ok_or("not an object")?;
    // List items carry no type; the resource says what they are.
    map.insert("apiVersion".into(), Value::String(r.api_version()));
    map.insert("kind".into(), Value::String(r.kind.into()));
    let e = |e: serde_json::Error| format!("{} {e}", r.kind);
    Ok(match r.kind {
        "Namespace" => Object::Namespace(serde_json::from_value(v).map_err(e)?),
        "Pod" => Object::Pod(serde_json::from_value(v).map_err(e)?),
        "Service" => Object::Service(serde_json::from_value(v).map_err(e)?),
        "Node" => Object::Node(serde_json::from_value(v).map_err(e)?),
        "NetworkPolicy" => Object::NetworkPolicy(serde_json::from_value(v).map_err(e)?),
        _ => Object::ClusterPolicy(serde_json::from_value(v).map_err(e)?),
    })
}

/// Drops what the index never reads, to keep 10k pods small: managed fields, owner
/// references and annotations (but the audit switches of a namespace and a NetworkPolicy), and of a pod everything
/// but its containers' names and ports, hostNetwork, node, phase and addresses.
pub fn strip(kind: &str, v: &mut Value) {
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        meta.remove("ownerReferences");
        meta.remove("finalizers");
        // The one annotation each kind is read for.
        let kept = match kind {
            "Namespace" => Some(AUDIT_ANNOTATION),
            "NetworkPolicy" => Some(MODE_ANNOTATION),
            _ => None,
        };
        let value = kept.and_then(|k| {
            meta.get("annotations")
                .and_then(|a| a.get(k))
                .cloned()
                .map(|v| (k, v))
        });
        meta.remove("annotations");
        if let Some((k, v)) = value {
            meta.insert("annotations".into(), serde_json::json!({ k: v }));
        }
    }
    if kind == "Node" {
        // Labels (in metadata) and addresses are all a `nodes` peer reads.
        if let Some(map) = v.as_object_mut() {
            map.remove("spec");
            let addresses = map
                .get("status")
                .and_then(|s| s.get("addresses"))
                .cloned()
                .unwrap_or(Value::Null);
            map.insert(
                "status".into(),
                serde_json::json!({ "addresses": addresses }),
            );
        }
        return;
    }
    if kind != "Pod" {
        return;
    }
    if let Some(spec) = v.get_mut("spec").and_then(Value::as_object_mut) {
        spec.retain(|k, _| {
            matches!(
                k.as_str(),
                "containers" | "initContainers" | "hostNetwork" | "nodeName"
            )
        });
        for list in ["containers", "initContainers"] {
            if let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) {
                for c in cs {
                    if let Some(c) = c.as_object_mut() {
                        c.retain(|k, _| matches!(k.as_str(), "name" | "ports" | "restartPolicy"));
                    }
                }
            }
        }
    }
    if let Some(status) = v.get_mut("status").and_then(Value::as_object_mut) {
        status.retain(|k, _| matches!(k.as_str(), "phase" | "podIP" | "podIPs" | "hostIP"));
    }
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

/// Reports rejected objects as Kubernetes Events (`Warning`, reason `PolicyRejected`,
/// the note naming the field), once per (object, error).
pub async fn report_invalid(
    client: Client,
    node: String,
    mut invalid: watch::Receiver<Vec<Invalid>>,
) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "netpol-agent".into(),
            instance: Some(node),
        },
    );
    let key = |i: &Invalid| {
        (
            i.kind.clone(),
            i.namespace.clone(),
            i.name.clone(),
            i.error.clone(),
        )
    };
    let mut reported = BTreeSet::new();
    loop {
        let now: Vec<Invalid> = invalid.borrow_and_update().clone();
        for inv in now.iter().filter(|i| !reported.contains(&key(i))) {
            let event = KubeEvent {
                type_: EventType::Warning,
                reason: "PolicyRejected".into(),
                note: Some(format!("not enforced: {}", inv.error)),
                action: "Compile".into(),
                secondary: None,
            };
            if let Err(error) = recorder.publish(&event, &reference_of(inv)).await {
                tracing::warn!(kind = %inv.kind, namespace = %inv.namespace, name = %inv.name, %error, "posting the Event failed");
            }
        }
        reported = now.iter().map(key).collect();
        if invalid.changed().await.is_err() {
            return;
        }
    }
}

/// The object an [`Invalid`] names.
pub fn reference_of(inv: &Invalid) -> ObjectReference {
    let api_version = match inv.kind.as_str() {
        "NetworkPolicy" => "networking.k8s.io/v1".to_string(),
        kind => RESOURCES
            .iter()
            .find(|r| r.kind == kind)
            .map(|r| r.api_version())
            .unwrap_or_default(),
    };
    ObjectReference {
        api_version: Some(api_version),
        kind: Some(inv.kind.clone()),
        name: Some(inv.name.clone()),
        namespace: (!inv.namespace.is_empty()).then(|| inv.namespace.clone()),
        ..Default::default()
    }
}

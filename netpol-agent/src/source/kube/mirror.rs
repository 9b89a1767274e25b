//! The mirror: each resource's objects, stripped, merged into the index's updates.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use kube::api::DynamicObject;
use kube::runtime::watcher;
use serde_json::Value;

use super::{ClusterState, Object, Resource, RESOURCES};
use netpol_engine::objects::{Change, Kind, AUDIT_ANNOTATION, MODE_ANNOTATION};

/// What the agent applies to its index.
// A reset is rare and moved, never copied in bulk: boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
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

//! Where cluster state comes from, as the agent's loop sees it: the dir source's full
//! views, or the kube source's re-lists and changes applied to the index.

use std::collections::BTreeMap;

use tokio::sync::watch;

use crate::source::kube as kube_source;
use crate::source::{ClusterState, Object};
use netpol_engine::index::{Change, Index, Snapshot};

/// Where cluster state comes from, as the loop sees it.
pub(super) enum Input {
    Dir(watch::Receiver<ClusterState>),
    /// The kube source, and the Services it has delivered (for their ClusterIPs; the
    /// index does not keep Services).
    Kube(kube_source::KubeSource, BTreeMap<String, Object>),
}

impl Input {
    /// Waits for the next change and applies it (with every change already queued
    /// behind it) to the index; None when the source has ended.
    pub(super) async fn next(&mut self, index: &mut Index) -> Option<Snapshot> {
        match self {
            Input::Dir(rx) => {
                rx.changed().await.ok()?;
                let state = rx.borrow_and_update().clone();
                Some(index.reset(&state))
            }
            Input::Kube(k, services) => {
                let mut update = k.updates.recv().await?;
                let mut digest = String::new();
                loop {
                    match update {
                        kube_source::Update::Reset(state) => {
                            digest = state.digest.clone();
                            index.reset(&state);
                            services.clear();
                            for o in &state.objects {
                                if let Object::Service(svc) = o {
                                    services.insert(service_key(svc), o.clone());
                                }
                            }
                        }
                        kube_source::Update::Change(c) => {
                            if let Change::Upsert(o @ Object::Service(svc)) = &c {
                                services.insert(service_key(svc), o.clone());
                            }
                            index.apply(&c);
                        }
                    }
                    match k.updates.try_recv() {
                        Ok(u) => update = u,
                        Err(_) => break,
                    }
                }
                let mut snap = index.snapshot().clone();
                if !digest.is_empty() {
                    snap.digest = digest;
                }
                Some(snap)
            }
        }
    }
}

impl Input {
    /// The Service objects the source holds now.
    pub(super) fn services(&self) -> Vec<Object> {
        match self {
            Input::Dir(rx) => rx
                .borrow()
                .objects
                .iter()
                .filter(|o| matches!(o, Object::Service(_)))
                .cloned()
                .collect(),
            Input::Kube(_, services) => services.values().cloned().collect(),
        }
    }
}

fn service_key(svc: &k8s_openapi::api::core::v1::Service) -> String {
    format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or("default"),
        svc.metadata.name.as_deref().unwrap_or_default()
    )
}

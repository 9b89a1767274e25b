//! What the agent writes back to the API server: the programmed condition on local
//! pods and Events for rejected objects.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::Api;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::Client;
use serde_json::Value;
use tokio::sync::watch;

use super::RESOURCES;
use netpol_engine::objects::Invalid;

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

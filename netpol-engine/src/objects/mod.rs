//! The objects sources deliver: Kubernetes manifests as typed objects, a source's full
//! view ([`ClusterState`]) and its changes ([`Change`]). Leftmost box of the data flow:
//!
//! **objects** ──► index ──► compile ──► datapath ──► events
//!
//! The agent's sources (`dir`, `kube`) produce these; nothing here knows which one ran.

pub mod cluster_policy;
pub mod manifest;

pub use manifest::{parse_manifests, Object};

/// Everything a source knows at one moment, with a digest of its input so that a
/// waiter can tell whether the datapath has caught up with a given input.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub objects: Vec<Object>,
    /// Errors of objects that could not be read (file and reason); the rest is used.
    pub errors: Vec<String>,
    pub digest: String,
}

impl ClusterState {
    /// The objects of one manifest text that must read whole (tests, embedded sets):
    /// the errors of any document that does not, joined.
    pub fn from_text(text: &str) -> Result<ClusterState, String> {
        let (objects, errors) = parse_manifests(std::path::Path::new("inline.yaml"), text);
        if !errors.is_empty() {
            let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            return Err(errors.join("; "));
        }
        Ok(ClusterState {
            objects,
            errors: vec![],
            digest: "inline".into(),
        })
    }
}

/// A namespace with this annotation set to "true" is in audit mode: would-be drops of
/// its pods pass and are reported as AUDIT (watch first, then enforce).
pub const AUDIT_ANNOTATION: &str = "netpol.io/audit";

/// A NetworkPolicy with this annotation set to "audit" is staged: see `Policy::audit`.
pub const MODE_ANNOTATION: &str = "netpol.io/mode";

/// An object that was rejected, with the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Invalid {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub error: String,
}

/// One change to the cluster, as a watch delivers it.
// Moved once from the watch into the index: boxing would add an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Change {
    Upsert(Object),
    Delete {
        kind: Kind,
        namespace: String,
        name: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    NetworkPolicy,
    ClusterNetworkPolicy,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
}

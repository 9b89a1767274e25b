//! Sources of cluster state. Each produces full, level-triggered views of the cluster
//! ([`ClusterState`]); nothing downstream knows which source ran.
//!
//! source ──► index ──► compile ──► datapath ──► events

pub mod cluster_policy;
pub mod dir;
pub mod kube;
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

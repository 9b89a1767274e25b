//! Sources of cluster state. Each produces full, level-triggered views of the cluster
//! ([`ClusterState`]); nothing downstream knows which source ran.
//!
//! source ──► index ──► compile ──► datapath ──► events

pub mod dir;
pub mod kube;

pub use netpol_engine::objects::{manifest, parse_manifests, ClusterState, Object};

/// Where the tools that read the cluster once (`lint`, `graph`) take it from.
#[derive(Clone, Debug)]
pub enum Input {
    /// Manifest files or directories.
    Manifests(Vec<std::path::PathBuf>),
    /// The API server of the kubeconfig's current context (or the in-cluster config):
    /// one list of each resource the kube source watches.
    Cluster { timeout: std::time::Duration },
}

/// Reads `input` once. Any file or document that cannot be read is an error naming
/// them all: a partial view would be linted or drawn as if it were the whole.
pub fn read_once(input: &Input) -> anyhow::Result<Vec<Object>> {
    match input {
        Input::Manifests(paths) => {
            let (objects, errors, _) = manifest::read_all(paths);
            if !errors.is_empty() {
                anyhow::bail!("unreadable input:\n  {}", errors.join("\n  "));
            }
            Ok(objects)
        }
        Input::Cluster { timeout } => {
            let runtime = tokio::runtime::Runtime::new()?;
            let state = runtime.block_on(async {
                let client = ::kube::Client::try_default().await.map_err(|e| {
                    anyhow::anyhow!("no cluster to read (kubeconfig or in-cluster config): {e}")
                })?;
                kube::list_once(client, *timeout).await
            })?;
            Ok(state.objects)
        }
    }
}

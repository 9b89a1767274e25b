//! The `dir` source: a directory (or file) of manifests, watched with inotify. Every
//! change re-reads the whole tree (level-triggered: a missed event cannot leave the
//! index behind), parsing only the files whose bytes changed, and a state is published
//! only when the content changed.

use std::path::PathBuf;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::manifest::{read_all, read_all_with, Parsed};
use super::ClusterState;

/// Reads `paths` once.
pub fn read_state(paths: &[PathBuf]) -> ClusterState {
    read_state_with(paths, &mut Parsed::default())
}

/// Reads `paths` once for [`watch`]: the state, and what was parsed, which the watch
/// goes on from (parsing it all again would hold a second copy of every object).
pub fn first_read(paths: &[PathBuf]) -> (ClusterState, Parsed) {
    let mut parsed = Parsed::default();
    (read_state_with(paths, &mut parsed), parsed)
}

fn read_state_with(paths: &[PathBuf], parsed: &mut Parsed) -> ClusterState {
    let (objects, errors, contents) = read_all_with(paths, parsed);
    ClusterState {
        objects,
        errors,
        digest: digest_of(&contents),
    }
}

/// The digest of a set of manifest files: what `lab wait` compares with the agent's.
pub fn digest_of(contents: &[(PathBuf, Vec<u8>)]) -> String {
    let mut h = Sha256::new();
    for (path, bytes) in contents {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        h.update(name.as_bytes());
        h.update([0]);
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    let out = h.finalize();
    out.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// The digest of what `paths` hold now.
pub fn current_digest(paths: &[PathBuf]) -> String {
    let (_, _, contents) = read_all(paths);
    digest_of(&contents)
}

/// Watches `paths` and publishes a new [`ClusterState`] whenever their content changes,
/// going on from `parsed` ([`first_read`]'s). Runs until the receiver side is dropped.
pub async fn watch(
    paths: Vec<PathBuf>,
    tx: watch::Sender<ClusterState>,
    mut parsed: Parsed,
) -> anyhow::Result<()> {
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Our own reads show up as access events: re-reading on them would loop forever.
        if matches!(&res, Ok(ev) if matches!(ev.kind, notify::EventKind::Access(_))) {
            return;
        }
        let _ = ev_tx.send(());
    })?;
    for p in &paths {
        let mode = if p.is_dir() {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        watcher.watch(p, mode)?;
    }
    let mut last = tx.borrow().digest.clone();
    loop {
        let state = read_state_with(&paths, &mut parsed);
        if state.digest != last {
            last = state.digest.clone();
            for e in &state.errors {
                tracing::warn!(error = %e, "manifest skipped");
            }
            if tx.send(state).is_err() {
                return Ok(());
            }
        }
        // Wait for a change, then let a burst of writes settle: until 10 ms pass
        // without another event, 50 ms at the most (a half-written file read early is
        // only re-read: the next event follows).
        if ev_rx.recv().await.is_none() {
            return Ok(());
        }
        let bound = tokio::time::sleep(Duration::from_millis(50));
        tokio::pin!(bound);
        loop {
            tokio::select! {
                _ = &mut bound => break,
                _ = tokio::time::sleep(Duration::from_millis(10)) => break,
                more = ev_rx.recv() => if more.is_none() { return Ok(()) },
            }
        }
    }
}

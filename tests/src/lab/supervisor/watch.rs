//! `lab.sock` requests and the watch on the manifest directory.

use crate::lab::Paths;
use anyhow::Context;
use notify::RecursiveMode;
use notify::Watcher;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

use super::*;

pub(super) async fn reconcile_now(lab: &Shared) -> anyhow::Result<String> {
    let lab = lab.clone();
    tokio::task::spawn_blocking(move || lab.lock().unwrap().reconcile()).await?
}

pub(super) async fn handle(stream: UnixStream, lab: Shared) -> anyhow::Result<()> {
    let paths = Paths::new(&lab.lock().unwrap().name);
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = match serde_json::from_str::<LabRequest>(&line) {
            Ok(LabRequest::Status) => {
                // The lock may be held by a reconcile starting servers: wait off the runtime.
                let lab = lab.clone();
                serde_json::to_value(
                    tokio::task::spawn_blocking(move || lab.lock().unwrap().status()).await?,
                )?
            }
            Ok(LabRequest::Wait) => {
                let result = async {
                    let digest = reconcile_now(&lab).await?;
                    agents_wait(&lab, &paths, &digest).await
                }
                .await;
                match result {
                    Ok(()) => serde_json::json!({ "ok": true }),
                    Err(e) => serde_json::json!({ "ok": false, "error": format!("{e:#}") }),
                }
            }
            Err(e) => serde_json::json!({ "ok": false, "error": format!("bad request: {e}") }),
        };
        let mut out = serde_json::to_vec(&reply)?;
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}

pub(super) async fn serve_socket(listener: UnixListener, lab: Shared) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let lab = lab.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, lab).await {
                        tracing::warn!(error = ?e, "lab.sock client failed");
                    }
                });
            }
            Err(e) => tracing::error!(error = ?e, "lab.sock accept failed"),
        }
    }
}

/// Re-reads the directory on every change, after a burst of writes settled (50 ms).
pub(super) async fn watch_manifests(lab: Shared, manifests: PathBuf) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads (ours included: every reconcile opens the files) are not changes; waking
        // up on them would re-read the directory forever.
        if !matches!(
            event,
            Ok(notify::Event {
                kind: notify::EventKind::Access(_),
                ..
            })
        ) {
            let _ = tx.send(());
        }
    })?;
    let mode = if manifests.is_dir() {
        RecursiveMode::Recursive
    } else {
        RecursiveMode::NonRecursive
    };
    watcher
        .watch(&manifests, mode)
        .with_context(|| format!("watching {}", manifests.display()))?;
    while rx.recv().await.is_some() {
        let settle = tokio::time::sleep(Duration::from_millis(50));
        tokio::pin!(settle);
        loop {
            tokio::select! {
                _ = &mut settle => break,
                more = rx.recv() => if more.is_none() { return Ok(()) },
            }
        }
        if let Err(e) = reconcile_now(&lab).await {
            tracing::error!(error = ?e, "reconcile failed");
        }
    }
    Ok(())
}

//! Serving the agent's API on its Unix socket.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::{Counters, Request, Status};
use crate::datapath::maps::{read_counters, read_event_counters, CounterMap};

/// `counters`: None for an enforcer without the classifier's counters (the lab's
/// iptables enforcer), which then answers `counters` with an error line.
pub async fn serve(
    socket: PathBuf,
    status: watch::Receiver<Status>,
    events: broadcast::Sender<Arc<str>>,
    counters: Option<Arc<CounterMap>>,
) -> anyhow::Result<JoinHandle<()>> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&socket); // a stale socket of a previous agent
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (status, events) = (status.clone(), events.subscribe());
            let counters = counters.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, status, events, counters.as_deref()).await {
                    tracing::debug!(error = %e, "api client");
                }
            });
        }
    }))
}

async fn handle(
    stream: UnixStream,
    mut status: watch::Receiver<Status>,
    mut events: broadcast::Receiver<Arc<str>>,
    counters: Option<&CounterMap>,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let Some(line) = lines.next_line().await? else {
        return Ok(());
    };
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            write
                .write_all(format!("{{\"error\":{:?}}}\n", e.to_string()).as_bytes())
                .await?;
            return Ok(());
        }
    };
    match req {
        Request::Status => {
            let s = serde_json::to_string(&*status.borrow())?;
            write.write_all(format!("{s}\n").as_bytes()).await?;
        }
        Request::Wait { digest } => {
            let s = status
                .wait_for(|s| s.converged && (digest.is_empty() || s.digest == digest))
                .await
                .map(|s| s.clone())?;
            write
                .write_all(format!("{}\n", serde_json::to_string(&s)?).as_bytes())
                .await?;
        }
        Request::Counters => {
            let Some(counters) = counters else {
                write
                    .write_all(b"{\"error\":\"this enforcer keeps no packet counters\"}\n")
                    .await?;
                return Ok(());
            };
            let c = Counters {
                packets: read_counters(counters)?,
                events: read_event_counters(counters)?,
            };
            write
                .write_all(format!("{}\n", serde_json::to_string(&c)?).as_bytes())
                .await?;
        }
        Request::Observe => loop {
            match events.recv().await {
                Ok(line) => write.write_all(format!("{line}\n").as_bytes()).await?,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // Never silently lost: say how many this subscriber missed.
                    write
                        .write_all(format!("{{\"lost\":{n}}}\n").as_bytes())
                        .await?;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        },
    }
    Ok(())
}

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
use crate::datapath::tally::Tally;
use crate::events::Namer;

/// What requests are answered from: the agent loop's latest state and the kernel's
/// counters.
#[derive(Clone)]
pub struct Sources {
    pub status: watch::Receiver<Status>,
    pub events: broadcast::Sender<Arc<str>>,
    pub counters: Arc<CounterMap>,
    pub tally: Arc<Tally>,
    pub namer: watch::Receiver<Arc<Namer>>,
}

pub async fn serve(socket: PathBuf, sources: Sources) -> anyhow::Result<JoinHandle<()>> {
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
            let (sources, events) = (sources.clone(), sources.events.subscribe());
            tokio::spawn(async move {
                if let Err(e) = handle(stream, &sources, events).await {
                    tracing::debug!(error = %e, "api client");
                }
            });
        }
    }))
}

async fn handle(
    stream: UnixStream,
    sources: &Sources,
    mut events: broadcast::Receiver<Arc<str>>,
) -> anyhow::Result<()> {
    let mut status = sources.status.clone();
    let counters = &*sources.counters;
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
            let c = Counters {
                packets: read_counters(counters)?,
                events: read_event_counters(counters)?,
            };
            write
                .write_all(format!("{}\n", serde_json::to_string(&c)?).as_bytes())
                .await?;
        }
        Request::Tally => {
            let reading = sources.tally.read()?;
            let report = sources.namer.borrow().tally(&reading);
            write
                .write_all(format!("{}\n", serde_json::to_string(&report)?).as_bytes())
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

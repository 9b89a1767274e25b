//! Serving the agent's API on its Unix socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::{Counters, Enforced, Request, Status};
use crate::datapath::live::LiveMaps;
use crate::datapath::maps::{read_counters, read_event_counters, CounterMap};
use crate::datapath::pin::PinDir;
use crate::datapath::tally::Tally;
use crate::events::Namer;

/// What every API client may ask about.
#[derive(Clone)]
pub struct Shared {
    pub node: String,
    pub status: watch::Receiver<Status>,
    pub events: broadcast::Sender<Arc<str>>,
    /// None for an enforcer without the classifier (the lab's iptables enforcer), which
    /// answers what needs it with an error line.
    pub kernel: Option<Kernel>,
}

/// The classifier's side: its counters and maps, and what names them.
#[derive(Clone)]
pub struct Kernel {
    pub counters: Arc<CounterMap>,
    pub enforced: watch::Receiver<Enforced>,
    /// Where the live maps are pinned (explain reads them there).
    pub pins: PinDir,
    /// Per-rule and per-endpoint counters, and the names to put on them.
    pub tally: Arc<Tally>,
    pub namer: watch::Receiver<Arc<Namer>>,
}

/// How often an observer is told about events the kernel rate limited.
const RATE_LIMIT_REPORT: Duration = Duration::from_secs(1);

pub async fn serve(socket: PathBuf, shared: Shared) -> anyhow::Result<JoinHandle<()>> {
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
            // Subscribed before the request is read: an observer's "observing" line
            // means it gets every event from then on.
            let events = shared.events.subscribe();
            let shared = shared.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, shared, events).await {
                    tracing::debug!(error = %e, "api client");
                }
            });
        }
    }))
}

/// Bytes of event lines an observer is sent in one write, at most.
const OBSERVE_BATCH: usize = 64 * 1024;

async fn line(write: &mut OwnedWriteHalf, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_string(value)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    Ok(())
}

async fn handle(
    stream: UnixStream,
    mut shared: Shared,
    mut events: broadcast::Receiver<Arc<str>>,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let Some(request) = lines.next_line().await? else {
        return Ok(());
    };
    let req: Request = match serde_json::from_str(&request) {
        Ok(r) => r,
        Err(e) => {
            return line(&mut write, &serde_json::json!({ "error": e.to_string() })).await;
        }
    };
    let kernel = match (&req, &shared.kernel) {
        (Request::Status | Request::Wait { .. }, _) => None,
        (_, Some(k)) => Some(k.clone()),
        (_, None) => {
            let error = "this enforcer has no classifier: no counters, live maps or events";
            return line(&mut write, &serde_json::json!({ "error": error })).await;
        }
    };
    let kernel = || kernel.as_ref().expect("checked above");
    match req {
        Request::Status => {
            let mut s = shared.status.borrow().clone();
            if let Some(k) = &shared.kernel {
                s.program_runs = crate::datapath::programs::program_runs(&k.pins);
            }
            line(&mut write, &s).await?;
        }
        Request::Wait { digest } => {
            let s = shared
                .status
                .wait_for(|s| s.converged && (digest.is_empty() || s.digest == digest))
                .await
                .map(|s| s.clone())?;
            line(&mut write, &s).await?;
        }
        Request::Counters => {
            let c = Counters {
                packets: read_counters(&kernel().counters)?,
                events: read_event_counters(&kernel().counters)?,
            };
            line(&mut write, &c).await?;
        }
        Request::Tally => {
            let reading = kernel().tally.read()?;
            let report = kernel().namer.borrow().tally(&reading);
            line(&mut write, &report).await?;
        }
        Request::Explain {
            from,
            to,
            port,
            protocol,
        } => {
            let enforced = kernel().enforced.borrow().clone();
            let (node, pins) = (shared.node.clone(), kernel().pins.clone());
            // Opening the maps and walking conntrack are blocking syscalls.
            let answer = tokio::task::spawn_blocking(move || {
                let number = netpol_engine::index::policy::parse_protocol(&protocol.to_uppercase())
                    .with_context(|| format!("protocol {protocol:?}: TCP, UDP or SCTP"))?;
                let live = LiveMaps::open(&pins)?;
                crate::explain_live::explain_live(
                    &enforced.snapshot,
                    &enforced.desired,
                    &node,
                    &live,
                    &netpol_engine::explain::Question {
                        from: &from,
                        to: &to,
                        protocol: number,
                        port,
                    },
                )
            })
            .await?;
            match answer {
                Ok(x) => line(&mut write, &x).await?,
                Err(e) => {
                    line(
                        &mut write,
                        &serde_json::json!({ "error": format!("{e:#}") }),
                    )
                    .await?
                }
            }
        }
        Request::Observe => {
            line(&mut write, &serde_json::json!({ "observing": shared.node })).await?;
            let mut limited = read_event_counters(&kernel().counters)?.rate_limited;
            let mut tick = tokio::time::interval(RATE_LIMIT_REPORT);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(ev) => {
                            // What else is queued already goes out in the same write: one
                            // syscall per batch, not per event, or a flood outruns the
                            // subscriber and its events are lost.
                            let mut batch = String::with_capacity(OBSERVE_BATCH);
                            batch.push_str(&ev);
                            batch.push('\n');
                            let mut lost = 0;
                            while batch.len() < OBSERVE_BATCH {
                                match events.try_recv() {
                                    Ok(ev) => {
                                        batch.push_str(&ev);
                                        batch.push('\n');
                                    }
                                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                                        lost = n;
                                        break;
                                    }
                                    Err(_) => break,
                                }
                            }
                            write.write_all(batch.as_bytes()).await?;
                            if lost > 0 {
                                line(&mut write, &serde_json::json!({ "lost": lost })).await?;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            // Never silently lost: say how many this subscriber missed.
                            line(&mut write, &serde_json::json!({ "lost": n })).await?;
                        }
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    },
                    _ = tick.tick() => {
                        // Suppressed in the kernel (counted exactly, not reported).
                        let now = read_event_counters(&kernel().counters)?.rate_limited;
                        if now > limited {
                            line(&mut write, &serde_json::json!({ "rate_limited": now - limited })).await?;
                        }
                        limited = now;
                    }
                }
            }
        }
    }
    Ok(())
}

//! What the lab's rule-based enforcers (`iptables/`, `nftables/`) share: the agent loop
//! that renders the whole ruleset on every change and loads it (a full sync, as
//! kube-router and kube-network-policies do), the status it serves for `lab wait`, and
//! the helper that pipes a script to a loader.
//!
//! source (dir) ──► index ──► render ──► apply ──► status on the agent's socket

use anyhow::bail;
use anyhow::Context;
use netpol_agent::api::Status;
use netpol_agent::source::dir;
use netpol_engine::index::{Index, Snapshot};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{broadcast, watch};

/// An address family: each has its own table in both enforcers.
/// The pods of `snap` that take part in policy: on the pod network, with an identity
/// (what both enforcers render rules for).
pub fn policy_pods(snap: &Snapshot) -> impl Iterator<Item = &netpol_engine::index::PodInfo> {
    snap.pods
        .values()
        .map(|p| p.as_ref())
        .filter(|p| !p.host_network && p.identity != 0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

/// Runs `cmd` with `input` on stdin; its stderr in the error.
pub(crate) fn restore(cmd: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd} (install it: cargo xtask setup)"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub struct AgentOptions {
    pub source: Vec<PathBuf>,
    pub node: String,
    pub api_socket: PathBuf,
}

/// What a rendered ruleset tells the status.
pub(crate) trait Rendered {
    /// Local pods isolated in at least one direction (the status's endpoints).
    fn pods(&self) -> usize;
    /// What a new connection is judged against (the status's policy_entries).
    fn policy_rules(&self) -> usize;
}

/// The agent of a rule-based enforcer: watches the source, and on every change renders
/// the whole ruleset and applies it, then publishes the status `lab wait` waits on.
/// A failed apply leaves the last rules in place and the status not converged. Runs in
/// the node's network namespace until SIGTERM.
pub(crate) fn run<R: Rendered>(
    opts: AgentOptions,
    enforcer: &'static str,
    render: impl Fn(&Snapshot, &str) -> R,
    mut apply: impl FnMut(&R) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let (state, parsed) = dir::first_read(&opts.source);
        let (state_tx, mut state_rx) = watch::channel(state);
        let paths = opts.source.clone();
        tokio::spawn(async move {
            if let Err(e) = dir::watch(paths, state_tx, parsed).await {
                tracing::error!(error = ?e, "watching the manifest directory failed");
            }
        });
        let (status_tx, status_rx) = watch::channel(Status {
            node: opts.node.clone(),
            ..Default::default()
        });
        let (events_tx, _) = broadcast::channel::<Arc<str>>(1);
        let api = netpol_agent::api::server::serve(
            opts.api_socket.clone(),
            netpol_agent::api::server::Shared {
                node: opts.node.clone(),
                status: status_rx,
                events: events_tx,
                kernel: None,
            },
        )
        .await?;
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut index = Index::new();
        let mut syncs = 0u64;
        let mut state = state_rx.borrow_and_update().clone();
        loop {
            let snap = index.reset(&state);
            let t = Instant::now();
            let rs = render(&snap, &opts.node);
            let rendered = t.elapsed();
            let t = Instant::now();
            let result = tokio::task::block_in_place(|| apply(&rs));
            let loaded_in = t.elapsed();
            syncs += 1;
            let converged = match result {
                Ok(()) => {
                    tracing::info!(
                        enforcer,
                        pods = rs.pods(),
                        policy_rules = rs.policy_rules(),
                        render_ms = rendered.as_secs_f64() * 1e3,
                        restore_ms = loaded_in.as_secs_f64() * 1e3,
                        "synced"
                    );
                    true
                }
                Err(e) => {
                    tracing::error!(error = ?e, "loading the rules failed; the last ones stay");
                    false
                }
            };
            status_tx.send_replace(Status {
                node: opts.node.clone(),
                digest: snap.digest.clone(),
                converged,
                endpoints: rs.pods(),
                policies: snap.policies.len(),
                identities: snap.identities.len(),
                policy_entries: rs.policy_rules(),
                invalid: snap.invalid.clone(),
                syncs,
                ..Default::default()
            });
            tokio::select! {
                changed = state_rx.changed() => {
                    if changed.is_err() { break }
                    state = state_rx.borrow_and_update().clone();
                }
                _ = sigterm.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        api.abort();
        let _ = std::fs::remove_file(&opts.api_socket);
        anyhow::Ok(())
    })
}

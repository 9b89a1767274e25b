//! Loading a ruleset into a node (`ipset restore`, `iptables-restore`) and the enforcer's
//! agent loop: the `dir` source, the `wait` socket.

use anyhow::bail;
use anyhow::Context;
use netpol_agent::api::Status;
use netpol_agent::source::dir;
use netpol_engine::index::Index;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use tokio::sync::{broadcast, watch};

use super::*;

/// Runs `cmd` with `input` on stdin; its stderr in the error.
pub(super) fn restore(cmd: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("running {cmd} (install iptables and ipset: cargo xtask setup)")
        })?;
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

/// The `ipset restore` script that brings every set of `rs` to its members, each
/// filled aside and swapped in whole.
pub fn ipset_script(rs: &Ruleset) -> String {
    let mut s = String::new();
    for (n, set) in &rs.sets {
        let params = format!(
            "{} family {} hashsize 1024 maxelem 1048576",
            set.kind.name(),
            set.family.ipset()
        );
        let tmp = format!(
            "NETPOL-TMP-{}{}",
            match set.kind {
                SetKind::HashIp => "IP",
                SetKind::HashNet => "NET",
            },
            set.family.tag()
        );
        let _ = writeln!(s, "create {n} {params} -exist");
        let _ = writeln!(s, "create {tmp} {params} -exist");
        let _ = writeln!(s, "flush {tmp}");
        for m in &set.members {
            let _ = writeln!(s, "add {tmp} {m}");
        }
        let _ = writeln!(s, "swap {tmp} {n}");
        let _ = writeln!(s, "destroy {tmp}");
    }
    s
}

/// Loads `rs` in the current network namespace: sets first (a new rule may name them),
/// then each family's table in one atomic restore, then the sets nothing names any more.
/// `loaded` holds the sets of the previous call.
pub fn apply(rs: &Ruleset, loaded: &mut BTreeSet<String>) -> anyhow::Result<()> {
    restore("ipset", &["restore"], &ipset_script(rs)).context("loading the ipsets")?;
    restore("iptables-restore", &[], &rs.filter4).context("loading the IPv4 filter table")?;
    restore("ip6tables-restore", &[], &rs.filter6).context("loading the IPv6 filter table")?;
    let stale: Vec<String> = loaded
        .iter()
        .filter(|n| !rs.sets.contains_key(*n))
        .cloned()
        .collect();
    if !stale.is_empty() {
        let script: String = stale.iter().map(|n| format!("destroy {n}\n")).collect();
        restore("ipset", &["restore"], &script).context("removing unused ipsets")?;
    }
    *loaded = rs.sets.keys().cloned().collect();
    Ok(())
}

pub struct AgentOptions {
    pub source: Vec<PathBuf>,
    pub node: String,
    pub api_socket: PathBuf,
}

/// `netpol lab iptables-agent`: watches the source, and on every change renders the
/// whole ruleset and loads it (a full sync, as kube-router does), then publishes the
/// status `lab wait` waits on. Runs in the node's network namespace until SIGTERM.
pub fn run_agent(opts: AgentOptions) -> anyhow::Result<()> {
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
        let mut loaded = BTreeSet::new();
        let mut syncs = 0u64;
        let mut state = state_rx.borrow_and_update().clone();
        loop {
            let snap = index.reset(&state);
            let t = std::time::Instant::now();
            let rs = ruleset(&snap, &opts.node);
            let rendered = t.elapsed();
            let t = std::time::Instant::now();
            let result = tokio::task::block_in_place(|| apply(&rs, &mut loaded));
            let loaded_in = t.elapsed();
            syncs += 1;
            let converged = match result {
                Ok(()) => {
                    tracing::info!(
                        pods = rs.pods,
                        policy_rules = rs.policy_rules,
                        sets = rs.sets.len(),
                        render_ms = rendered.as_secs_f64() * 1e3,
                        restore_ms = loaded_in.as_secs_f64() * 1e3,
                        "iptables synced"
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
                endpoints: rs.pods,
                policies: snap.policies.len(),
                identities: snap.identities.len(),
                policy_entries: rs.policy_rules,
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

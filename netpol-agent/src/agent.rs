//! `netpol agent`: runs the data flow on one node.
//!
//! source ──► index ──► compile ──► datapath ──► events ──► api
//!
//! One loop owns the index and the datapath: each new source state (or a tick, while
//! some local pod's veth has not been found yet) recompiles and syncs; the resulting
//! [`Status`] is published for `wait`, the names for `events`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use aya::maps::RingBuf;
use netpol_common::{map, Event};
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, watch};

use crate::api::{server, Status};
use crate::compile::{Compiler, NodeView};
use crate::datapath::discovery::{bridge_addrs, Discovery};
use crate::datapath::pin::PinDir;
use crate::datapath::{Capacities, Datapath, Switches};
use crate::events::Namer;
use crate::index::Index;
use crate::source::dir;

#[derive(Clone, Debug)]
pub enum SourceSpec {
    Dir(Vec<PathBuf>),
}

impl std::str::FromStr for SourceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("dir", path)) if !path.is_empty() => Ok(SourceSpec::Dir(
                path.split(',').map(PathBuf::from).collect(),
            )),
            Some(("kube", _)) | None if s == "kube" => {
                Err("the kube source is not available yet; use --source dir:PATH".into())
            }
            _ => Err(format!("unknown source {s:?}: expected dir:PATH")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub source: SourceSpec,
    pub node: String,
    pub bridge: String,
    pub api_socket: PathBuf,
    pub capacities: Capacities,
    /// Node-wide switches of the classifier.
    pub switches: Switches,
    /// Root of pinned maps and programs in bpffs (`<root>/<PIN_VERSION>/`).
    pub pin_root: PathBuf,
    /// Pin under this version instead of the build's (upgrade tests only).
    pub pin_version: Option<String>,
    /// Devices a DNATed packet may leave the node by (overlay, uplink): the egress of
    /// local pods to Service VIPs with a remote backend is judged there.
    pub service_hooks: Vec<String>,
}

pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let pins = match &opts.pin_version {
        Some(v) => PinDir::with_version(&opts.pin_root, v),
        None => PinDir::new(&opts.pin_root),
    };
    let mut datapath = Datapath::open(&opts.capacities, pins.clone())?;
    {
        let a = datapath.adoption();
        tracing::info!(
            pins = %pins.dir().display(),
            adopted = a.adopted,
            adopted_entries = a.adopted_entries,
            epoch = a.epoch,
            replaced_versions = ?a.replaced_versions,
            migrated_conntrack = a.migrated_conntrack,
            "datapath opened"
        );
    }
    let host_addrs = bridge_addrs(&opts.bridge)
        .with_context(|| format!("reading the addresses of bridge {}", opts.bridge))?;
    let config = opts.switches.config(&host_addrs)?;
    datapath.set_config(config)?;
    let counters = datapath.take_counters()?;
    let ring = RingBuf::try_from(
        datapath
            .ebpf_mut()
            .take_map(map::EVENTS)
            .context("events map missing")?,
    )?;

    let (status_tx, status_rx) = watch::channel(Status {
        node: opts.node.clone(),
        ..Default::default()
    });
    let (namer_tx, namer_rx) = watch::channel(Arc::new(Namer::default()));
    let (events_tx, _) = broadcast::channel::<Arc<str>>(4096);

    let SourceSpec::Dir(paths) = &opts.source;
    // The first sync must see the whole cluster: a sync against an empty state would
    // empty the adopted maps and open every pod.
    let (state_tx, mut state_rx) = watch::channel(dir::read_state(paths));
    let watch_paths = paths.clone();
    tokio::spawn(async move {
        if let Err(e) = dir::watch(watch_paths, state_tx).await {
            tracing::error!(error = %format!("{e:#}"), "watching the manifest directory failed");
        }
    });
    tokio::spawn(pump_events(ring, namer_rx, events_tx.clone()));
    let api = server::serve(
        opts.api_socket.clone(),
        status_rx,
        events_tx,
        Arc::new(counters),
    )
    .await?;
    tracing::info!(node = %opts.node, socket = %opts.api_socket.display(), "agent running");

    let view = NodeView {
        node: Some(opts.node.clone()),
        host_addrs,
    };
    let mut index = Index::new();
    let mut compiler = Compiler::new();
    let mut discovery = Discovery::default();
    let mut vips_written = BTreeMap::new();
    let mut hooks = crate::datapath::services::ServiceHooks::default();
    let mut objects = state_rx.borrow().objects.clone();
    let mut snapshot = index.reset(&state_rx.borrow_and_update().clone());
    let mut syncs = 0u64;
    let mut ready_ms: Option<u64> = None;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let desired = compiler.compile(&snapshot, &view).clone();
        let wanted: BTreeMap<String, Vec<IpAddr>> = desired
            .endpoints
            .keys()
            .map(|k| (k.clone(), snapshot.pods[k].ips.clone()))
            .collect();
        let locations = discovery.locate(&opts.bridge, &wanted).unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "finding pod veths failed");
            BTreeMap::new()
        });
        match datapath.sync(&desired, &locations) {
            Ok(stats) if stats != Default::default() => {
                tracing::info!(
                    written = stats.written,
                    removed = stats.removed,
                    attached = stats.attached,
                    detached = stats.detached,
                    "datapath synced"
                )
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "datapath sync failed; isolated pods keep their last state")
            }
        }
        let vips = crate::datapath::services::vips(&objects);
        if let Err(e) =
            crate::datapath::services::sync_vips(datapath.ebpf_mut(), &mut vips_written, &vips)
        {
            tracing::error!(error = %format!("{e:#}"), "writing Service VIPs failed");
        }
        let hooks_missing = hooks.sync(datapath.ebpf_mut(), &opts.service_hooks);
        syncs += 1;
        let attached: Vec<&String> = datapath.attached().map(|(k, _)| k).collect();
        let pending: Vec<String> = wanted
            .keys()
            .filter(|k| !attached.contains(k))
            .cloned()
            .collect();
        let status = Status {
            node: opts.node.clone(),
            digest: snapshot.digest.clone(),
            converged: pending.is_empty() && hooks_missing.is_empty(),
            endpoints: attached.len(),
            pending,
            policies: snapshot.policies.len(),
            identities: snapshot.identities.len(),
            policy_entries: desired.policy.len(),
            invalid: snapshot.invalid.clone(),
            syncs,
            ready_ms: None,
            adopted: false,
        };
        let converged = status.converged;
        if converged && ready_ms.is_none() {
            let ms = started.elapsed().as_millis() as u64;
            ready_ms = Some(ms);
            // Every located endpoint runs this version's programs now.
            datapath.retire_replaced_versions();
            tracing::info!(
                ready_ms = ms,
                "agent ready: the datapath enforces the cluster state"
            );
        }
        let status = Status {
            ready_ms,
            adopted: datapath.adoption().adopted,
            ..status
        };
        namer_tx.send_replace(Arc::new(Namer::new(&snapshot, &desired)));
        status_tx.send_replace(status);

        // Until every local pod's veth is found, look again soon; after that, a slow
        // tick notices veths that went away.
        let tick = if converged {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(100)
        };
        tokio::select! {
            changed = state_rx.changed() => {
                if changed.is_err() { break; }
                let state = state_rx.borrow_and_update().clone();
                snapshot = index.reset(&state);
                objects = state.objects;
            }
            _ = tokio::time::sleep(tick) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    api.abort();
    let _ = std::fs::remove_file(&opts.api_socket);
    tracing::info!("agent stopped");
    Ok(())
}

/// Reads the ring buffer, names each record and fans it out to subscribers.
async fn pump_events(
    ring: RingBuf<aya::maps::MapData>,
    namer: watch::Receiver<Arc<Namer>>,
    tx: broadcast::Sender<Arc<str>>,
) {
    let offset = crate::events::wall_offset_ns();
    // SAFETY: the ring buffer owns its map fd, which stays open as long as it lives
    // inside this AsyncFd.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e.to_string(), "cannot poll the event ring buffer");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<Event>() {
                continue;
            }
            // SAFETY: the classifier writes whole `Event` records; read unaligned.
            let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) };
            let verdict = namer.borrow().name(&ev, offset);
            if tx.receiver_count() > 0 {
                if let Ok(line) = serde_json::to_string(&verdict) {
                    let _ = tx.send(line.into());
                }
            }
        }
        guard.clear_ready();
    }
}

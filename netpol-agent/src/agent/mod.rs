//! `netpol agent`: runs the data flow on one node.
//!
//! source ──► index ──► compile ──► datapath ──► events ──► api
//!
//! One loop owns the index and the datapath: each new source state, and each change of
//! the bridge's ports seen through netlink (`datapath/discovery.rs`), runs one
//! [`Agent::reconcile`] step (compile, locate, sync: `reconcile.rs`, tested against a
//! fake datapath); no timer, except a backoff after a failed sync or attach. The
//! resulting [`Status`] is published for `wait`, the names for `events`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use aya::maps::RingBuf;
use netpol_common::{map, Event};
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, watch};

mod input;
mod reconcile;

pub use reconcile::{Agent, NodeDatapath, Reconciled, RETRY_MAX, RETRY_MIN};

use input::Input;

use crate::api::{server, Enforced, Status, Wakes};
use crate::datapath::discovery;
use crate::datapath::maps::{read_counters, read_event_counters};
use crate::datapath::pin::PinDir;
use crate::datapath::{Capacities, Datapath, Switches};
use crate::events::Namer;
use crate::metrics::{Metrics, Readings};
use crate::source::dir;
use crate::source::kube as kube_source;
use netpol_engine::index::Index;

#[derive(Clone, Debug)]
pub enum SourceSpec {
    Dir(Vec<PathBuf>),
    /// The API server, in-cluster config (or KUBECONFIG outside a pod).
    Kube,
}

impl SourceSpec {
    /// `kube` inside a pod (KUBERNETES_SERVICE_HOST is set), else none: `--source` is
    /// then required.
    pub fn default_from_env() -> Option<SourceSpec> {
        std::env::var_os("KUBERNETES_SERVICE_HOST").map(|_| SourceSpec::Kube)
    }
}

impl std::str::FromStr for SourceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("dir", path)) if !path.is_empty() => Ok(SourceSpec::Dir(
                path.split(',').map(PathBuf::from).collect(),
            )),
            None if s == "kube" => Ok(SourceSpec::Kube),
            _ => Err(format!("unknown source {s:?}: expected kube or dir:PATH")),
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
    /// The cgroup tree whose sockets get the hook on local delivery (packets DNATed to
    /// the node itself); None: none.
    pub local_cgroup: Option<PathBuf>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (None: nowhere).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Readiness drops once a watch has been failing for longer than this.
    pub max_staleness: Duration,
    /// Series per per-policy metric (see `Metrics::max_series`).
    pub metrics_max_series: usize,
    /// Drop IP traffic on a new pod port until its endpoint is written (`hold.rs`).
    pub pod_start_hold: bool,
}

pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let pins = match &opts.pin_version {
        Some(v) => PinDir::with_version(&opts.pin_root, v),
        None => PinDir::new(&opts.pin_root),
    };
    let mut datapath = Datapath::open(&opts.capacities, pins.clone())?;
    if opts.local_cgroup.is_none() {
        tracing::warn!("--cgroup off: packets to Services DNATed to this node (hostNetwork backends) are not judged");
    }
    datapath.set_local_cgroup(opts.local_cgroup.clone());
    let hold = match opts.pod_start_hold {
        true => Some(crate::datapath::hold::on_new_port(
            datapath.hold_programs()?,
        )),
        false => None,
    };
    let mut ports_rx = discovery::watch(&opts.bridge, hold)
        .with_context(|| format!("watching the ports of bridge {}", opts.bridge))?;
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
    // The node's address on the pod network; the bridge may get it later (the CNI
    // creates the bridge with the node's first pod), which the loop follows.
    let host_addrs = ports_rx.borrow().ports.bridge_addrs.clone();
    datapath.set_config(opts.switches.config(&host_addrs)?)?;
    crate::datapath::sweep::start(pins.clone()).context("starting the conntrack sweep")?;
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
    let (enforced_tx, enforced_rx) = watch::channel(Enforced::default());
    // About 70 ms of a 230k/s flood: an observer descheduled that long loses nothing.
    let (events_tx, _) = broadcast::channel::<Arc<str>>(16_384);

    let counters = Arc::new(counters);
    // The first sync must see the whole cluster: a sync against an empty state would
    // empty the adopted maps and open every pod.
    let mut index = Index::new();
    let mut invalid_tx = None;
    let mut programmed_tx = None;
    let (mut input, mut snapshot) = match &opts.source {
        SourceSpec::Dir(paths) => {
            let (state, parsed) = dir::first_read(paths);
            let (state_tx, state_rx) = watch::channel(state);
            let watch_paths = paths.clone();
            tokio::spawn(async move {
                if let Err(e) = dir::watch(watch_paths, state_tx, parsed).await {
                    tracing::error!(error = ?e, "watching the manifest directory failed");
                }
            });
            let snapshot = Arc::new(index.reset(&state_rx.borrow()));
            (Input::Dir(state_rx), snapshot)
        }
        SourceSpec::Kube => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the API server (in-cluster config or KUBECONFIG)")?;
            let (tx, rx) = watch::channel(Vec::new());
            tokio::spawn(kube_source::report_invalid(
                client.clone(),
                opts.node.clone(),
                rx,
            ));
            invalid_tx = Some(tx);
            let (tx, rx) = watch::channel(BTreeMap::new());
            tokio::spawn(kube_source::report_programmed(client.clone(), rx));
            programmed_tx = Some(tx);
            let mut input = Input::Kube(kube_source::start(client), BTreeMap::new());
            tracing::info!("waiting for the first list of every watched resource");
            let snapshot = input
                .next(&mut index)
                .await
                .context("the kube source ended before its first list")?;
            (input, Arc::new(snapshot))
        }
    };
    let health = match &input {
        Input::Kube(k, _) => Some(k.health.clone()),
        Input::Dir(_) => None,
    };
    let read: crate::metrics::Read = {
        let (counters, tally, namer) = (counters.clone(), datapath.tally(), namer_rx.clone());
        Box::new(move || Readings {
            packets: read_counters(&counters).unwrap_or_default(),
            events: read_event_counters(&counters).unwrap_or_default(),
            tally: tally.read().ok().map(|r| namer.borrow().tally(&r)),
        })
    };
    let metrics = Arc::new(Metrics::new(
        status_rx.clone(),
        health,
        read,
        opts.metrics_max_series,
        opts.max_staleness,
    ));
    {
        let ebpf = datapath.ebpf_mut();
        let mut rec = metrics.recorded.lock().unwrap();
        for m in [
            map::ENDPOINTS,
            map::IPCACHE,
            map::CIDRS,
            map::POLICY,
            map::CONNTRACK,
            map::FRAGMENTS,
        ] {
            let cap = crate::datapath::maps::capacity_of(ebpf, m).unwrap_or(0);
            rec.maps.insert(m, (None, cap));
        }
    }
    let metrics_addr = match opts.metrics_addr {
        Some(addr) => {
            let bound = crate::metrics::serve(addr, metrics.clone()).await?;
            tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
            Some(bound.to_string())
        }
        None => None,
    };
    tokio::spawn(pump_events(ring, namer_rx.clone(), events_tx.clone()));
    let api = server::serve(
        opts.api_socket.clone(),
        server::Shared {
            node: opts.node.clone(),
            status: status_rx,
            events: events_tx,
            kernel: Some(server::Kernel {
                counters,
                enforced: enforced_rx,
                pins: pins.clone(),
                tally: datapath.tally(),
                namer: namer_rx.clone(),
            }),
        },
    )
    .await?;
    tracing::info!(node = %opts.node, socket = %opts.api_socket.display(), "agent running");

    let mut agent = Agent::new(
        opts.node.clone(),
        opts.switches.clone(),
        opts.service_hooks.clone(),
        host_addrs,
        started,
    );
    let mut invalid_total = 0u64;
    let mut last_invalid: Vec<netpol_engine::index::Invalid> = Vec::new();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut wakes = Wakes::default();
    let outcome = loop {
        let ports = ports_rx.borrow_and_update().ports.clone();
        let step = match agent.reconcile(&mut datapath, &snapshot, &ports, &input.services()) {
            Ok(step) => step,
            Err(e) => break Err(e),
        };
        let retry = step.retry;
        let desired = step.desired;
        let status = Status {
            metrics_addr: metrics_addr.clone(),
            wakes,
            ..step.status
        };
        let (compile_time, sync_time) = (step.compile_time, step.sync_time);
        {
            let mut rec = metrics.recorded.lock().unwrap();
            metrics.compile.observe(compile_time.as_secs_f64());
            metrics.sync.observe(sync_time.as_secs_f64());
            for (m, n) in [
                (map::ENDPOINTS, desired.endpoints.len()),
                (map::IPCACHE, desired.ipcache.len()),
                (map::CIDRS, desired.cidrs.len()),
                (map::POLICY, desired.policy.len()),
            ] {
                if let Some(e) = rec.maps.get_mut(m) {
                    e.0 = Some(n);
                }
            }
            if snapshot.invalid != last_invalid {
                invalid_total += snapshot
                    .invalid
                    .iter()
                    .filter(|i| !last_invalid.contains(i))
                    .count() as u64;
                last_invalid = snapshot.invalid.clone();
                if let Some(tx) = &invalid_tx {
                    tx.send_replace(last_invalid.clone());
                }
            }
            rec.invalid = snapshot.invalid.len();
            rec.invalid_total = invalid_total;
        }
        let namer = Arc::new(Namer::new(&snapshot, &desired));
        if let Some(tx) = &programmed_tx {
            // Only pods whose programs run with their entries written.
            let programmed: BTreeMap<String, String> = datapath
                .attached()
                .filter_map(|(pod, _)| {
                    let ep = desired.endpoints.get(pod)?;
                    Some((pod.clone(), namer.programmed(ep.identity, ep.revision)))
                })
                .collect();
            tx.send_if_modified(|old| {
                let changed = *old != programmed;
                *old = programmed;
                changed
            });
        }
        namer_tx.send_replace(namer);
        enforced_tx.send_replace(Enforced {
            snapshot: snapshot.clone(),
            desired: desired.clone(),
        });
        status_tx.send_replace(status);

        tokio::select! {
            next = input.next(&mut index) => {
                let Some(next) = next else { break Ok(()) };
                snapshot = Arc::new(next);
                wakes.source += 1;
            }
            changed = ports_rx.changed() => {
                if changed.is_err() {
                    break Err(anyhow::anyhow!("pod discovery stopped (its error is logged above)"));
                }
                wakes.ports += 1;
            }
            _ = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {
                wakes.retry += 1;
            }
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
        }
    };
    api.abort();
    let _ = std::fs::remove_file(&opts.api_socket);
    tracing::info!("agent stopped");
    outcome
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
            tracing::error!(error = ?e, "cannot poll the event ring buffer");
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
            let verdict = match namer.borrow().name(&ev, offset) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "dropping an event this agent cannot decode");
                    continue;
                }
            };
            if tx.receiver_count() > 0 {
                if let Ok(line) = serde_json::to_string(&verdict) {
                    let _ = tx.send(line.into());
                }
            }
        }
        guard.clear_ready();
    }
}

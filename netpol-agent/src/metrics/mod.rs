//! Prometheus metrics and health probes on `--metrics-addr`.
//!
//! source ──► index ──► compile ──► datapath ──► events ──► api / **metrics**
//!
//! `GET /metrics`: the text exposition format (0.0.4), written by `prometheus-client`.
//! Packet counts are the classifier's per-CPU counters read at scrape time (exact),
//! through the [`Read`] the agent hands over: this module touches no map. The agent
//! loop records the rest ([`Recorded`], the histograms). `GET /healthz`: 200 while the
//! process serves. `GET /readyz`: 200 once the datapath first converged to a complete
//! source state and while no watch has been failing for longer than the staleness
//! bound; enforcement never depends on it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use netpol_common::codes::{Direction, Reason, Verdict};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::Status;
use crate::datapath::maps::{Counter, EventCounters};
use crate::events::TallyReport;
use crate::source::kube::Health;

/// Histogram bucket bounds, seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A slow or silent client gets this long to send its request head...
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// ...and a request this long to be answered (408 after).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the classifier counted, read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Readings {
    pub packets: Vec<Counter>,
    pub events: EventCounters,
    /// The per-rule and per-endpoint counters, named (None when they cannot be read).
    pub tally: Option<TallyReport>,
}

/// How a scrape reads the classifier's counters (the agent owns the maps).
pub type Read = Box<dyn Fn() -> Readings + Send + Sync>;

/// What the agent loop records for scrapes.
#[derive(Clone, Debug, Default)]
pub struct Recorded {
    /// Map name → (entries the agent wrote, when it knows them; capacity).
    pub maps: BTreeMap<&'static str, (Option<usize>, u32)>,
    /// Objects rejected by the index (invalid policies) or unreadable, now.
    pub invalid: usize,
    /// Rejections seen since start (an object rejected again after a fix counts again).
    pub invalid_total: u64,
}

/// Shared between the agent loop (writer) and the HTTP server (reader).
pub struct Metrics {
    pub recorded: Mutex<Recorded>,
    /// Time to compile the index into desired map contents.
    pub compile: Histogram,
    /// Time to write the difference into the maps and attach filters.
    pub sync: Histogram,
    pub status: watch::Receiver<Status>,
    pub health: Option<watch::Receiver<Health>>,
    pub read: Read,
    /// At most this many series per per-policy metric; the rest add up in one series
    /// labelled `(other)`, so a cluster of many policies cannot flood Prometheus.
    pub max_series: usize,
    /// Readiness drops once a watch has been failing for longer than this.
    pub max_staleness: Duration,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("max_series", &self.max_series)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(
        status: watch::Receiver<Status>,
        health: Option<watch::Receiver<Health>>,
        read: Read,
        max_series: usize,
        max_staleness: Duration,
    ) -> Metrics {
        Metrics {
            recorded: Mutex::new(Recorded::default()),
            compile: Histogram::new(BUCKETS),
            sync: Histogram::new(BUCKETS),
            status,
            health,
            read,
            max_series,
            max_staleness,
        }
    }

    /// Ready: converged once against a complete source state, and not stale.
    pub fn ready(&self) -> Result<(), String> {
        if self.status.borrow().ready_ms.is_none() {
            return Err("the datapath has not converged to the source's state yet".into());
        }
        if let Some(h) = &self.health {
            let h = h.borrow();
            if let Some(since) = h.stale_since {
                let age = Instant::now().saturating_duration_since(since);
                if age > self.max_staleness {
                    return Err(format!(
                        "a watch has been failing for {}s (bound {}s); enforcing the last state",
                        age.as_secs(),
                        self.max_staleness.as_secs()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The exposition of every metric.
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = Registry::default();
        registry.register(
            "netpol_compile_duration_seconds",
            "Time to compile the index into desired map contents",
            self.compile.clone(),
        );
        registry.register(
            "netpol_sync_duration_seconds",
            "Time to write the difference into the maps and attach filters",
            self.sync.clone(),
        );
        registry.register_collector(Box::new(self.clone()));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

type Labels = Vec<(&'static str, String)>;

/// Writes metric families through one descriptor encoder.
struct Families<'e>(DescriptorEncoder<'e>);

impl Families<'_> {
    fn counter(&mut self, name: &str, help: &str, series: &[(Labels, u64)]) -> fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, n) in series {
            ConstCounter::new(*n).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn gauge(&mut self, name: &str, help: &str, series: &[(Labels, i64)]) -> fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, n) in series {
            ConstGauge::new(*n).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn one_gauge(&mut self, name: &str, help: &str, n: i64) -> fmt::Result {
        ConstGauge::new(n).encode(
            self.0
                .encode_descriptor(name, help, None, MetricType::Gauge)?,
        )
    }

    fn one_counter(&mut self, name: &str, help: &str, n: u64) -> fmt::Result {
        ConstCounter::new(n).encode(self.0.encode_descriptor(
            name,
            help,
            None,
            MetricType::Counter,
        )?)
    }
}

fn labels<const N: usize>(pairs: [(&'static str, String); N]) -> Labels {
    pairs.into()
}

impl Collector for Metrics {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        let mut f = Families(encoder);
        let readings = (self.read)();
        let status = self.status.borrow().clone();

        let mut drops: BTreeMap<(Reason, Direction), u64> = BTreeMap::new();
        let mut allowed_new: BTreeMap<Direction, u64> = BTreeMap::new();
        // Always present, so that a rate() has a series before the first drop.
        for d in Direction::ALL {
            drops.insert((Reason::PolicyDenied, *d), 0);
            allowed_new.insert(*d, 0);
        }
        let mut packets = Vec::new();
        for c in &readings.packets {
            packets.push((
                labels([
                    ("verdict", c.verdict.to_string()),
                    ("reason", c.reason.to_string()),
                    ("direction", c.direction.to_string()),
                ]),
                c.packets,
            ));
            if c.verdict == Verdict::Dropped {
                *drops.entry((c.reason, c.direction)).or_default() += c.packets;
            }
            if c.verdict == Verdict::Allowed && c.reason.opens_connection() {
                *allowed_new.entry(c.direction).or_default() += c.packets;
            }
        }
        f.counter(
            "netpol_packets",
            "Packets judged by the classifier, by verdict, reason and direction (exact)",
            &packets,
        )?;
        let drops: Vec<_> = drops
            .iter()
            .map(|((r, d), n)| {
                (
                    labels([("reason", r.to_string()), ("direction", d.to_string())]),
                    *n,
                )
            })
            .collect();
        f.counter(
            "netpol_drops",
            "Packets dropped, by reason and direction (exact)",
            &drops,
        )?;
        let allowed: Vec<_> = allowed_new
            .iter()
            .map(|(d, n)| (labels([("direction", d.to_string())]), *n))
            .collect();
        f.counter(
            "netpol_allowed_connections",
            "New connections (first packets) allowed by policy, no policy or node traffic",
            &allowed,
        )?;
        let ev = &readings.events;
        let outcomes: Vec<_> = [
            ("sent", ev.sent),
            ("rate_limited", ev.rate_limited),
            ("ring_full", ev.ring_full),
        ]
        .into_iter()
        .map(|(what, n)| (labels([("outcome", what.to_string())]), n))
        .collect();
        f.counter(
            "netpol_events",
            "Verdict events, by what happened to them",
            &outcomes,
        )?;
        f.one_counter(
            "netpol_events_rate_limited",
            "Verdict events not sent because the pod's token bucket was empty",
            ev.rate_limited,
        )?;
        f.one_counter(
            "netpol_conntrack_share_full",
            "New connections left untracked because their pod held its whole conntrack share",
            ev.conntrack_share_full,
        )?;
        f.one_counter(
            "netpol_fragments_share_full",
            "First fragments not remembered because their pod had its whole share of datagrams",
            ev.fragments_share_full,
        )?;

        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        f.one_gauge(
            "netpol_endpoints",
            "Local pods with the classifier attached",
            count(status.endpoints),
        )?;
        f.one_gauge(
            "netpol_pending_endpoints",
            "Local pods whose veth is not found yet",
            count(status.pending.len()),
        )?;
        f.one_gauge(
            "netpol_address_conflicts",
            "Pod ports held because their addresses cannot be trusted (see netpol status)",
            count(status.conflicts.len()),
        )?;
        f.one_counter(
            "netpol_address_conflicts_seen",
            "Address conflicts that appeared since the agent started",
            status.conflicts_seen,
        )?;
        f.one_gauge(
            "netpol_policies",
            "NetworkPolicies in force",
            count(status.policies),
        )?;
        f.one_gauge(
            "netpol_identities",
            "Security identities (label sets)",
            count(status.identities),
        )?;
        f.one_gauge(
            "netpol_ready",
            "1 when /readyz answers 200",
            i64::from(self.ready().is_ok()),
        )?;
        let rec = self.recorded.lock().map(|r| r.clone()).unwrap_or_default();
        let unreadable = self.health.as_ref().map_or(0, |h| h.borrow().unreadable);
        f.one_gauge(
            "netpol_invalid_objects",
            "Objects rejected now (invalid policies, unreadable objects or manifests)",
            count(rec.invalid).saturating_add(i64::try_from(unreadable).unwrap_or(i64::MAX)),
        )?;
        f.one_counter(
            "netpol_invalid_objects",
            "Rejections since the agent started",
            rec.invalid_total,
        )?;
        let entries: Vec<_> = rec
            .maps
            .iter()
            .filter_map(|(m, (n, _))| Some((labels([("map", m.to_string())]), count((*n)?))))
            .collect();
        f.gauge(
            "netpol_map_entries",
            "Entries the agent keeps in each map",
            &entries,
        )?;
        let capacity: Vec<_> = rec
            .maps
            .iter()
            .map(|(m, (_, c))| (labels([("map", m.to_string())]), i64::from(*c)))
            .collect();
        f.gauge(
            "netpol_map_capacity",
            "Capacity (max entries) of each map",
            &capacity,
        )?;
        if let Some(t) = &readings.tally {
            tally(&mut f, t, self.max_series)?;
        }

        let (mut restarts, mut lists) = (Vec::new(), Vec::new());
        if let Some(h) = &self.health {
            let h = h.borrow();
            for (r, n) in &h.restarts {
                restarts.push((labels([("resource", r.to_string())]), *n));
            }
            for (r, n) in &h.lists {
                lists.push((labels([("resource", r.to_string())]), *n));
            }
        }
        // The dir source has no watch to restart; a series exists anyway.
        if restarts.is_empty() {
            restarts.push((labels([("resource", String::new())]), 0));
        }
        f.counter(
            "netpol_watch_restarts",
            "Watch or list failures of the kube source (each restarts it after a backoff)",
            &restarts,
        )?;
        f.counter(
            "netpol_watch_lists",
            "Lists (first and re-lists) of the kube source",
            &lists,
        )
    }
}

/// The per-rule and per-namespace series, each metric bounded to `max` series.
fn tally(f: &mut Families<'_>, t: &TallyReport, max: usize) -> fmt::Result {
    // Rules come most packets first: the busiest keep their own series.
    let (mut packets, mut bytes) = (Vec::new(), Vec::new());
    let (mut other_p, mut other_b) = (0u64, 0u64);
    for (i, r) in t.rules.iter().enumerate() {
        if i >= max {
            other_p += r.packets;
            other_b += r.bytes;
            continue;
        }
        let l = labels([
            ("policy", r.policy.clone()),
            ("direction", r.direction.clone()),
            ("rule", r.rule.to_string()),
        ]);
        packets.push((l.clone(), r.packets));
        bytes.push((l, r.bytes));
    }
    if t.rules.len() > max {
        let l = labels([
            ("policy", "(other)".to_string()),
            ("direction", String::new()),
            ("rule", String::new()),
        ]);
        packets.push((l.clone(), other_p));
        bytes.push((l, other_b));
    }
    f.counter(
        "netpol_rule_allowed_packets",
        "Packets allowed per policy rule (new connections and their later packets, both ways)",
        &packets,
    )?;
    f.counter(
        "netpol_rule_allowed_bytes",
        "Bytes allowed per policy rule",
        &bytes,
    )?;

    // Per namespace (never more series than namespaces with drops, times 4).
    let mut per_ns: BTreeMap<(&str, Direction, Verdict), (u64, u64)> = BTreeMap::new();
    for d in &t.drops {
        let e = per_ns
            .entry((&d.namespace, d.direction, d.verdict))
            .or_default();
        e.0 += d.packets;
        e.1 += d.bytes;
    }
    let (mut ns_packets, mut ns_bytes) = (Vec::new(), Vec::new());
    for ((ns, dir, verdict), (p, b)) in &per_ns {
        let l = labels([
            ("namespace", ns.to_string()),
            ("direction", dir.to_string()),
            ("verdict", verdict.to_string()),
        ]);
        ns_packets.push((l.clone(), *p));
        ns_bytes.push((l, *b));
    }
    f.counter(
        "netpol_namespace_drops",
        "Packets dropped (or audited) per namespace of the pod whose policy decided, by direction (exact)",
        &ns_packets,
    )?;
    f.counter(
        "netpol_namespace_drop_bytes",
        "Bytes dropped (or audited) per namespace",
        &ns_bytes,
    )?;

    let mut sets: Vec<_> = t.drops.iter().collect();
    sets.sort_by_key(|d| std::cmp::Reverse(d.packets));
    let mut series = Vec::new();
    let mut other: BTreeMap<(Direction, Verdict), u64> = BTreeMap::new();
    for (i, d) in sets.iter().enumerate() {
        if i >= max {
            *other.entry((d.direction, d.verdict)).or_default() += d.packets;
            continue;
        }
        series.push((
            labels([
                ("namespace", d.namespace.clone()),
                ("direction", d.direction.to_string()),
                ("verdict", d.verdict.to_string()),
                ("policies", d.policies.join(",")),
            ]),
            d.packets,
        ));
    }
    for ((dir, verdict), p) in other {
        series.push((
            labels([
                ("namespace", "(other)".to_string()),
                ("direction", dir.to_string()),
                ("verdict", verdict.to_string()),
                ("policies", "(other)".to_string()),
            ]),
            p,
        ));
    }
    f.counter(
        "netpol_policy_set_drops",
        "Packets dropped (or audited) per set of policies isolating the pod, by namespace and direction",
        &series,
    )
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr`; returns the bound address.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr} (--metrics-addr)"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n") })
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(metrics);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a metrics client");
                    continue;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                // hyper's own server, so that a client that never finishes its request
                // head is cut off (axum::serve has no header timeout).
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                if let Err(e) = served {
                    tracing::debug!(error = %e, "metrics client");
                }
            });
        }
    });
    Ok(bound)
}

async fn scrape(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    // Reading the per-CPU maps is a few syscalls per slot: off the async workers.
    let body = tokio::task::spawn_blocking(move || m.render())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        body,
    )
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.ready() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

#[cfg(test)]
mod tests;

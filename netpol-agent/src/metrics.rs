//! Prometheus metrics and health probes, served over plain HTTP on `--metrics-addr`.
//!
//! source ──► index ──► compile ──► datapath ──► events ──► api / **metrics**
//!
//! `GET /metrics`: the text exposition format (0.0.4). Packet counts are read from the
//! classifier's per-CPU counters at scrape time (exact); the agent loop records the
//! rest ([`Metrics`]). `GET /healthz`: 200 while the process serves. `GET /readyz`: 200
//! once the datapath first converged to a complete source state and while no watch has
//! been failing for longer than the staleness bound; enforcement never depends on it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use netpol_common::{reason, verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::api::Status;
use crate::datapath::maps::{read_counters, read_event_counters, CounterMap};
use crate::datapath::tally::Tally;
use crate::events::{Namer, TallyReport};
use crate::source::kube::Health;

/// Histogram bucket bounds, seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Clone, Debug, Default)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += s;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// What the agent loop records for scrapes.
#[derive(Clone, Debug, Default)]
pub struct Recorded {
    pub compile: Histogram,
    pub sync: Histogram,
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
    pub status: watch::Receiver<Status>,
    pub health: Option<watch::Receiver<Health>>,
    pub counters: Arc<CounterMap>,
    /// Per-rule and per-endpoint counters, and the names to put on them.
    pub tally: Arc<Tally>,
    pub namer: watch::Receiver<Arc<Namer>>,
    /// At most this many series per per-policy metric; the rest add up in one series
    /// labelled `(other)`, so a cluster of many policies cannot flood Prometheus.
    pub max_series: usize,
    /// Readiness drops once a watch has been failing for longer than this.
    pub max_staleness: Duration,
}

impl Metrics {
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

    pub fn render(&self) -> String {
        let mut out = String::new();
        let status = self.status.borrow().clone();
        let mut drops: BTreeMap<(String, &str), u64> = BTreeMap::new();
        let mut allowed_new: BTreeMap<&str, u64> = BTreeMap::new();
        let packets = read_counters(&self.counters).unwrap_or_default();
        let dir = |d: u8| if d == 0 { "ingress" } else { "egress" };
        let _ = writeln!(out, "# HELP netpol_packets_total Packets judged by the classifier, by verdict, reason and direction (exact).\n# TYPE netpol_packets_total counter");
        for c in &packets {
            let v = match c.verdict {
                verdict::ALLOWED => "allowed",
                verdict::DROPPED => "dropped",
                _ => "audit",
            };
            let _ = writeln!(
                out,
                "netpol_packets_total{{verdict=\"{v}\",reason=\"{}\",direction=\"{}\"}} {}",
                c.reason,
                dir(c.direction),
                c.packets
            );
            if c.verdict == verdict::DROPPED {
                *drops
                    .entry((c.reason.clone(), dir(c.direction)))
                    .or_default() += c.packets;
            }
            let new_connection = [
                reason::POLICY_ALLOWED,
                reason::NOT_ISOLATED,
                reason::HOST_TRAFFIC,
                reason::ADMIN_ALLOWED,
                reason::BASELINE_ALLOWED,
            ]
            .iter()
            .any(|r| reason::name(*r) == c.reason);
            if c.verdict == verdict::ALLOWED && new_connection {
                *allowed_new.entry(dir(c.direction)).or_default() += c.packets;
            }
        }
        let _ = writeln!(out, "# HELP netpol_drops_total Packets dropped, by reason and direction (exact).\n# TYPE netpol_drops_total counter");
        // Always present, so that a rate() has a series before the first drop.
        for d in ["ingress", "egress"] {
            drops
                .entry((reason::name(reason::POLICY_DENIED).to_string(), d))
                .or_default();
            allowed_new.entry(d).or_default();
        }
        for ((r, d), n) in &drops {
            let _ = writeln!(
                out,
                "netpol_drops_total{{reason=\"{r}\",direction=\"{d}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP netpol_allowed_connections_total New connections (first packets) allowed by policy, no policy or node traffic.\n# TYPE netpol_allowed_connections_total counter");
        for (d, n) in &allowed_new {
            let _ = writeln!(
                out,
                "netpol_allowed_connections_total{{direction=\"{d}\"}} {n}"
            );
        }
        let ev = read_event_counters(&self.counters).unwrap_or_default();
        let _ = writeln!(out, "# HELP netpol_events_total Verdict events, by what happened to them.\n# TYPE netpol_events_total counter");
        for (what, n) in [
            ("sent", ev.sent),
            ("rate_limited", ev.rate_limited),
            ("ring_full", ev.ring_full),
        ] {
            let _ = writeln!(out, "netpol_events_total{{outcome=\"{what}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP netpol_events_rate_limited_total Verdict events not sent because the pod's token bucket was empty.\n# TYPE netpol_events_rate_limited_total counter\nnetpol_events_rate_limited_total {}", ev.rate_limited);
        let gauge = |out: &mut String, name: &str, help: &str, v: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut out,
            "netpol_endpoints",
            "Local pods with the classifier attached.",
            status.endpoints.to_string(),
        );
        gauge(
            &mut out,
            "netpol_pending_endpoints",
            "Local pods whose veth is not found yet.",
            status.pending.len().to_string(),
        );
        gauge(
            &mut out,
            "netpol_policies",
            "NetworkPolicies in force.",
            status.policies.to_string(),
        );
        gauge(
            &mut out,
            "netpol_identities",
            "Security identities (label sets).",
            status.identities.to_string(),
        );
        gauge(
            &mut out,
            "netpol_ready",
            "1 when /readyz answers 200.",
            u8::from(self.ready().is_ok()).to_string(),
        );
        let rec = self.recorded.lock().unwrap().clone();
        gauge(
            &mut out,
            "netpol_invalid_objects",
            "Objects rejected now (invalid policies, unreadable objects or manifests).",
            (rec.invalid as u64 + self.health.as_ref().map_or(0, |h| h.borrow().unreadable))
                .to_string(),
        );
        let _ = writeln!(out, "# HELP netpol_invalid_objects_total Rejections since the agent started.\n# TYPE netpol_invalid_objects_total counter\nnetpol_invalid_objects_total {}", rec.invalid_total);
        let _ = writeln!(out, "# HELP netpol_map_entries Entries the agent keeps in each map.\n# TYPE netpol_map_entries gauge");
        for (m, (n, _)) in &rec.maps {
            if let Some(n) = n {
                let _ = writeln!(out, "netpol_map_entries{{map=\"{m}\"}} {n}");
            }
        }
        let _ = writeln!(out, "# HELP netpol_map_capacity Capacity (max entries) of each map.\n# TYPE netpol_map_capacity gauge");
        for (m, (_, c)) in &rec.maps {
            let _ = writeln!(out, "netpol_map_capacity{{map=\"{m}\"}} {c}");
        }
        rec.compile.render(
            &mut out,
            "netpol_compile_duration_seconds",
            "Time to compile the index into desired map contents.",
        );
        rec.sync.render(
            &mut out,
            "netpol_sync_duration_seconds",
            "Time to write the difference into the maps and attach filters.",
        );
        if let Ok(reading) = self.tally.read() {
            let report = self.namer.borrow().tally(&reading);
            render_tally(&mut out, &report, self.max_series);
        }
        let _ = writeln!(out, "# HELP netpol_watch_restarts_total Watch or list failures of the kube source (each restarts it after a backoff).\n# TYPE netpol_watch_restarts_total counter");
        let _ = writeln!(out, "# HELP netpol_watch_lists_total Lists (first and re-lists) of the kube source.\n# TYPE netpol_watch_lists_total counter");
        match &self.health {
            Some(h) => {
                let h = h.borrow();
                for (r, n) in &h.restarts {
                    let _ = writeln!(out, "netpol_watch_restarts_total{{resource=\"{r}\"}} {n}");
                }
                for (r, n) in &h.lists {
                    let _ = writeln!(out, "netpol_watch_lists_total{{resource=\"{r}\"}} {n}");
                }
                if h.restarts.is_empty() {
                    let _ = writeln!(out, "netpol_watch_restarts_total{{resource=\"\"}} 0");
                }
            }
            // The dir source has no watch to restart.
            None => {
                let _ = writeln!(out, "netpol_watch_restarts_total{{resource=\"\"}} 0");
            }
        }
        out
    }
}

/// Label value escaping of the text format.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The per-rule and per-namespace series, each metric bounded to `max` series.
fn render_tally(out: &mut String, t: &TallyReport, max: usize) {
    let _ = writeln!(out, "# HELP netpol_rule_allowed_packets_total Packets allowed per policy rule (new connections and their later packets, both ways).\n# TYPE netpol_rule_allowed_packets_total counter");
    let _ = writeln!(out, "# HELP netpol_rule_allowed_bytes_total Bytes allowed per policy rule.\n# TYPE netpol_rule_allowed_bytes_total counter");
    // Rules come most packets first: the busiest keep their own series.
    let (mut other_p, mut other_b) = (0u64, 0u64);
    for (i, r) in t.rules.iter().enumerate() {
        if i >= max {
            other_p += r.packets;
            other_b += r.bytes;
            continue;
        }
        let labels = format!(
            "policy=\"{}\",direction=\"{}\",rule=\"{}\"",
            esc(&r.policy),
            r.direction,
            r.rule
        );
        let _ = writeln!(
            out,
            "netpol_rule_allowed_packets_total{{{labels}}} {}",
            r.packets
        );
        let _ = writeln!(
            out,
            "netpol_rule_allowed_bytes_total{{{labels}}} {}",
            r.bytes
        );
    }
    if t.rules.len() > max {
        let labels = "policy=\"(other)\",direction=\"\",rule=\"\"";
        let _ = writeln!(
            out,
            "netpol_rule_allowed_packets_total{{{labels}}} {other_p}"
        );
        let _ = writeln!(out, "netpol_rule_allowed_bytes_total{{{labels}}} {other_b}");
    }

    // Per namespace (never more series than namespaces with drops, times 4).
    let mut per_ns: BTreeMap<(&str, &str, &str), (u64, u64)> = BTreeMap::new();
    for d in &t.drops {
        let e = per_ns
            .entry((&d.namespace, &d.direction, &d.verdict))
            .or_default();
        e.0 += d.packets;
        e.1 += d.bytes;
    }
    let _ = writeln!(out, "# HELP netpol_namespace_drops_total Packets dropped (or audited) per namespace of the pod whose policy decided, by direction (exact).\n# TYPE netpol_namespace_drops_total counter");
    let _ = writeln!(out, "# HELP netpol_namespace_drop_bytes_total Bytes dropped (or audited) per namespace.\n# TYPE netpol_namespace_drop_bytes_total counter");
    for ((ns, dir, verdict), (p, b)) in &per_ns {
        let labels = format!(
            "namespace=\"{}\",direction=\"{dir}\",verdict=\"{verdict}\"",
            esc(ns)
        );
        let _ = writeln!(out, "netpol_namespace_drops_total{{{labels}}} {p}");
        let _ = writeln!(out, "netpol_namespace_drop_bytes_total{{{labels}}} {b}");
    }

    let _ = writeln!(out, "# HELP netpol_policy_set_drops_total Packets dropped (or audited) per set of policies isolating the pod, by namespace and direction.\n# TYPE netpol_policy_set_drops_total counter");
    let mut sets: Vec<_> = t.drops.iter().collect();
    sets.sort_by(|a, b| b.packets.cmp(&a.packets));
    let mut other: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for (i, d) in sets.iter().enumerate() {
        if i >= max {
            *other.entry((&d.direction, &d.verdict)).or_default() += d.packets;
            continue;
        }
        let _ = writeln!(
            out,
            "netpol_policy_set_drops_total{{namespace=\"{}\",direction=\"{}\",verdict=\"{}\",policies=\"{}\"}} {}",
            esc(&d.namespace),
            d.direction,
            d.verdict,
            esc(&d.policies.join(",")),
            d.packets
        );
    }
    for ((dir, verdict), p) in other {
        let _ = writeln!(
            out,
            "netpol_policy_set_drops_total{{namespace=\"(other)\",direction=\"{dir}\",verdict=\"{verdict}\",policies=\"(other)\"}} {p}"
        );
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr`; returns the bound address.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr} (--metrics-addr)"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let m = metrics.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &m).await {
                    tracing::debug!(error = %e, "metrics client");
                }
            });
        }
    });
    Ok(bound)
}

async fn answer(mut stream: TcpStream, m: &Metrics) -> anyhow::Result<()> {
    // One request per connection; its line and headers fit in 8 KiB.
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 || len + n == buf.len() {
            break;
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    let (code, ctype, body) = match path {
        "/metrics" => (200, "text/plain; version=0.0.4", m.render()),
        "/healthz" => (200, "text/plain", "ok\n".to_string()),
        "/readyz" => match m.ready() {
            Ok(()) => (200, "text/plain", "ready\n".to_string()),
            Err(why) => (503, "text/plain", format!("not ready: {why}\n")),
        },
        _ => (
            404,
            "text/plain",
            "try /metrics, /healthz or /readyz\n".to_string(),
        ),
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let resp = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

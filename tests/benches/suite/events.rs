//! Events under a flood: a pod sends UDP as fast as it can to a default-denied server;
//! an `observe` subscriber counts the drop events it receives, and the classifier's
//! counters must account for every datagram sent. The agent runs with no event rate
//! limit (`--event-rate 0`), so what is measured is the pipeline's capacity (the default,
//! 100 per second and pod, is what a node runs with).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netpol_agent::api::{client, Counters};
use netpol_common::codes::{Direction, Reason, Verdict};
use netpol_tests::lab::Enforcer;

use crate::plan::{self, Plan};
use crate::report::{Events, EventsRun};
use crate::testbed::{measure_cpu, Flood, Testbed};
use crate::Progress;

pub fn run(plan: &Plan, bed: &Testbed, progress: &mut Progress) -> anyhow::Result<Events> {
    progress.step("events: a one-node netpol lab, no event rate limit", 5.0);
    let l = bed.up(
        "ev",
        Enforcer::Netpol,
        1,
        &[("cluster.yaml", plan::EVENTS_CLUSTER)],
        &["--event-rate=0"],
    )?;
    let sock = Path::new(netpol_tests::lab::LAB_ROOT)
        .join(&l.name)
        .join("agent.sock");
    let target = l.address("x/server", plan::FLOOD_PORT)?;
    let netns = l.pod("x/flood")?.netns;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut out = Events {
        event_rate: "0 (no limit)".into(),
        runs: vec![],
    };
    for i in 0..plan.events_runs {
        progress.step(
            &format!("events: flood {}/{}", i + 1, plan.events_runs),
            plan.events_seconds + 2.0,
        );
        // The observer counts drop events from the flooder and what it was told it lost.
        let observed = Arc::new(AtomicU64::new(0));
        let lost = Arc::new(AtomicU64::new(0));
        let (o, lo, s) = (observed.clone(), lost.clone(), sock.clone());
        let observer = runtime.spawn(async move {
            let _ = client::observe(&s, |line| {
                if line.contains("\"x/flood\"") && line.contains("\"dropped\"") {
                    o.fetch_add(1, Ordering::Relaxed);
                } else if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                    if let Some(n) = v.get("lost").and_then(|n| n.as_u64()) {
                        lo.fetch_add(n, Ordering::Relaxed);
                    }
                }
                true
            })
            .await;
        });
        // Subscribed once it sees a first drop: send single datagrams until it does.
        let ready = Instant::now();
        while observed.load(Ordering::Relaxed) == 0 {
            let f = Flood::start(&netns, target, None);
            std::thread::sleep(Duration::from_millis(1));
            f.stop()?;
            if ready.elapsed() > Duration::from_secs(10) {
                anyhow::bail!("observe saw no drop from x/flood within 10 s");
            }
        }
        let counters = |rt: &tokio::runtime::Runtime| rt.block_on(client::counters(&sock));
        // Let the probes' events drain, then take the starting point.
        settle(|| Ok(observed.load(Ordering::Relaxed)))?;
        let before = counters(&runtime)?;
        let seen_before = observed.load(Ordering::Relaxed);
        let lost_before = lost.load(Ordering::Relaxed);
        let started = Instant::now();
        let f = Flood::start(&netns, target, Some(measure_cpu().saturating_sub(1)));
        // The flood's length is the measurement.
        std::thread::sleep(Duration::from_secs_f64(plan.events_seconds));
        let sent = f.stop()?;
        let seconds = started.elapsed().as_secs_f64();
        let after = settle_counters(&runtime, &sock, sent, &before)?;
        settle(|| Ok(observed.load(Ordering::Relaxed)))?;
        let seen = observed.load(Ordering::Relaxed) - seen_before;
        observer.abort();
        let counted = dropped(&after) - dropped(&before);
        let counted_egress = allowed_egress(&after) - allowed_egress(&before);
        out.runs.push(EventsRun {
            seconds,
            sent,
            sent_per_sec: sent as f64 / seconds,
            counted,
            counted_egress,
            exact: counted == sent,
            observed: seen,
            observed_per_sec: seen as f64 / seconds,
            events_sent: after.events.sent - before.events.sent,
            ring_full: after.events.ring_full - before.events.ring_full,
            rate_limited: after.events.rate_limited - before.events.rate_limited,
            observer_lost: lost.load(Ordering::Relaxed) - lost_before,
        });
    }
    Ok(out)
}

fn dropped(c: &Counters) -> u64 {
    c.packets
        .iter()
        .filter(|p| {
            p.verdict == Verdict::Dropped
                && p.direction == Direction::Ingress
                && p.reason == Reason::PolicyDenied
        })
        .map(|p| p.packets)
        .sum()
}

fn allowed_egress(c: &Counters) -> u64 {
    c.packets
        .iter()
        .filter(|p| p.verdict == Verdict::Allowed && p.direction == Direction::Egress)
        .map(|p| p.packets)
        .sum()
}

/// Reads `value` until it stops changing for 200 ms (deliveries after a flood are
/// asynchronous); 5 s at most.
fn settle(mut value: impl FnMut() -> anyhow::Result<u64>) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = value()?;
    let mut since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let v = value()?;
        if v != last {
            last = v;
            since = Instant::now();
        } else if since.elapsed() > Duration::from_millis(200) {
            break;
        }
    }
    Ok(last)
}

/// The counters once the flood's drops are all counted (or have stopped moving).
fn settle_counters(
    rt: &tokio::runtime::Runtime,
    sock: &Path,
    sent: u64,
    before: &Counters,
) -> anyhow::Result<Counters> {
    let read = || rt.block_on(client::counters(sock));
    let start = dropped(before);
    settle(|| {
        let c = read()?;
        // Done early when every datagram is accounted for.
        Ok(if dropped(&c) - start >= sent {
            u64::MAX
        } else {
            dropped(&c)
        })
    })?;
    read()
}

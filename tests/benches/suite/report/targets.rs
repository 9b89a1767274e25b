//! The goals a run is judged against (issue 16's table), each met, missed or too wide to
//! judge from this run's own figures.

use serde::Serialize;

use super::Report;
use netpol_tests::stats;

use crate::plan::RATIO_TARGETS;

#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub target: String,
    pub goal: String,
    /// The figure that decides, as the report prints it.
    pub figure: String,
    pub verdict: Verdict,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Met,
    Missed,
    /// The interval holds the goal: the run cannot tell.
    TooWide,
    /// This run did not measure it (a scenario or size left out).
    NotMeasured,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "missed",
            Verdict::TooWide => "too wide to judge",
            Verdict::NotMeasured => "not measured",
        }
    }

    fn of(met: Option<bool>) -> Verdict {
        match met {
            Some(true) => Verdict::Met,
            Some(false) => Verdict::Missed,
            None => Verdict::TooWide,
        }
    }
}

fn target(target: String, goal: &str, figure: Option<(String, Verdict)>) -> Target {
    let (figure, verdict) = figure.unwrap_or(("–".into(), Verdict::NotMeasured));
    Target {
        target,
        goal: goal.into(),
        figure,
        verdict,
    }
}

/// Every target, in the order.
pub fn judge(r: &Report) -> Vec<Target> {
    let mut out = Vec::new();
    for (case, what, goal) in [
        ("conntrack hit", "conntrack hit, per packet, every N", 90.0),
        ("new flow", "new allowed flow, per packet", 300.0),
        ("denied", "denied SYN through every lookup", 250.0),
    ] {
        // The worst N decides.
        let worst = r.packet.as_ref().and_then(|p| {
            p.points
                .iter()
                .filter(|x| x.case.starts_with(case) && x.ns.median.is_finite())
                .map(|x| (x.ns.median, x.rules))
                .max_by(|a, b| a.0.total_cmp(&b.0))
        });
        out.push(target(
            what.into(),
            &format!("≤ {goal:.0} ns"),
            worst.map(|(ns, n)| {
                (
                    format!("{ns:.0} ns (N = {n})"),
                    Verdict::of(Some(ns <= goal)),
                )
            }),
        ));
    }
    let n = r.plan.rules.iter().copied().max().unwrap_or(0);
    for (key, goal) in RATIO_TARGETS {
        let label = match key {
            "crr_per_sec" => "new connections/s",
            _ => "request/response",
        };
        for pair in &r.plan.pairs {
            let variant = r.datapath.as_ref().and_then(|d| {
                d.variants
                    .iter()
                    .find(|v| v.enforcer == "netpol" && v.rules == n && !v.flood)
            });
            let c =
                variant.and_then(|v| v.pairs.get(pair)?.get(key).filter(|c| c.ratio.is_finite()));
            // A denied flow that connected voids every figure of the variant.
            let leaked = variant.and_then(|v| v.denied).filter(|d| d.connected > 0);
            out.push(target(
                format!("{label} at N = {n}, {}, ratio to none", pair.name()),
                &format!("≥ {goal:.2}×"),
                c.map(|c| match leaked {
                    Some(d) => (
                        format!(
                            "not enforced: {} of {} denied attempts connected",
                            d.connected, d.attempts
                        ),
                        Verdict::Missed,
                    ),
                    None => (
                        format!(
                            "{:.2}× [{:.2}, {:.2}]",
                            c.ratio, c.ratio_ci[0], c.ratio_ci[1]
                        ),
                        Verdict::of(stats::judge(c.ratio_ci, goal)),
                    ),
                }),
            ));
        }
    }
    let agent = |pods: usize| {
        r.control
            .as_ref()
            .and_then(|c| c.agents.iter().find(|a| a.pods == pods))
    };
    for (pods, goal) in [(10_000, 64.0), (50_000, 256.0)] {
        out.push(target(
            format!("agent RSS, {pods} pods"),
            &format!("≤ {goal:.0} MiB"),
            agent(pods).map(|a| {
                (
                    format!("{:.0} MiB", a.rss_mib),
                    Verdict::of(Some(a.rss_mib <= goal)),
                )
            }),
        ));
    }
    out.push(target(
        "first sync, 10000 pods".into(),
        "≤ 500 ms",
        agent(10_000).map(|a| {
            (
                format!("{:.0} ms", a.first_sync_ms),
                Verdict::of(Some(a.first_sync_ms <= 500.0)),
            )
        }),
    ));
    let events = r.events.as_ref().filter(|e| !e.runs.is_empty()).map(|e| {
        let lost: u64 = e.runs.iter().map(|x| x.observer_lost).sum();
        let best = e
            .runs
            .iter()
            .map(|x| x.observed_per_sec)
            .fold(0.0, f64::max);
        let offered = e
            .runs
            .iter()
            .map(|x| x.events_sent as f64 / x.seconds)
            .fold(0.0, f64::max);
        let verdict = if lost > 0 {
            Verdict::Missed
        } else if best >= 300_000.0 {
            Verdict::Met
        } else {
            // None lost, but the flood never offered the rate the goal names.
            Verdict::NotMeasured
        };
        (
            format!("{best:.0}/s at best, {lost} lost (at most {offered:.0}/s offered)"),
            verdict,
        )
    });
    out.push(target(
        "one observe subscriber, no rate limit".into(),
        "≥ 300000 events/s received, none lost below that",
        events,
    ));
    out
}

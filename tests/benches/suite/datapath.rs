//! Datapath cost: three two-node labs of the same pods (`none`, `iptables`, `netpol`)
//! up side by side; for each N the N-rule policy goes into the enforced labs, and every
//! variant is measured between two baseline blocks of `none`.
//!
//! Metrics per pair (client on node0 → server on node0 or node1): TCP stream with 1 and
//! 4 streams (iperf3), request/response rate and latency and new connections per second
//! (netpol's own client and the lab server, both pinned to one CPU), UDP datagrams per
//! second (iperf3, 64 bytes). Flood variants add a third pod sending denied UDP from
//! the other CPU.

use std::collections::BTreeMap;
use std::time::Instant;

use netpol_agent::datapath::pin::PinDir;
use netpol_agent::datapath::programs::{self, ProgramRuns};
use netpol_tests::lab::{self, Enforcer, LoadKind, LoadOptions, LoadReport};

use crate::plan::{self, Pair, Plan};
use crate::report::{Block, Datapath, DeniedCheck, Stat};
use crate::testbed::{measure_cpu, pin_self, DeniedProbe, Flood, LabRun, Testbed};
use crate::Progress;

pub fn run(plan: &Plan, bed: &Testbed, progress: &mut Progress) -> anyhow::Result<Datapath> {
    if let Testbed::Kind = bed {
        return crate::kind::datapath(plan, progress);
    }
    let pods = plan::datapath_pods();
    let manifests = [("pods.yaml", pods.as_str())];
    progress.step(
        "datapath: four two-node labs (none, iptables, nftables, netpol)",
        24.0,
    );
    let none = bed.up("dn", Enforcer::None, 2, &manifests, &[])?;
    let mut enforced = Vec::new();
    for (tag, name) in [("di", "iptables"), ("df", "nftables"), ("dp", "netpol")] {
        let e: Enforcer = name.parse().map_err(anyhow::Error::msg)?;
        enforced.push(bed.up(tag, e, 2, &manifests, &[])?);
    }
    let cpu = measure_cpu();
    for l in std::iter::once(&none).chain(&enforced) {
        l.tune_client("x/client")?;
        for pair in &plan.pairs {
            l.pin_pod(pair.server(), cpu)?;
            l.expect_connects("x/client", pair.server())?;
        }
    }
    let mut d = Datapath {
        pinned_cpu: cpu,
        ..Datapath::default()
    };
    let target_n = plan.rules.iter().copied().max();
    let mut current = None;
    for (n, flood) in plan.steps() {
        let what = format!("N = {n}{}", if flood { " + flood" } else { "" });
        for l in enforced.iter().filter(|_| current != Some(n)) {
            progress.step(
                &format!("datapath: {} enforces N = {n}", l.enforcer.as_str()),
                4.0,
            );
            l.write("rules.yaml", &plan::rules_policy(n))?;
            let t = Instant::now();
            l.wait()?;
            d.apply_seconds
                .entry(l.enforcer.as_str().to_string())
                .or_default()
                .insert(n, t.elapsed().as_secs_f64());
            for pair in &plan.pairs {
                l.expect_connects("x/client", pair.server())?;
            }
        }
        current = Some(n);
        // rounds[i]: the baseline's block and each enforcer's (None: not in that round),
        // measured side by side.
        let mut rounds: Vec<(Block, Vec<Option<Block>>)> = Vec::new();
        let all: Vec<&LabRun> = enforced.iter().collect();
        let at = |index, of| Round {
            plan,
            what: &what,
            index,
            of,
            n,
            flood,
            cpu,
        };
        for i in 0..plan.rounds {
            let (b, vs) = round(&none, &all, &at(i, plan.rounds), progress)?;
            rounds.push((b, vs.into_iter().map(Some).collect()));
        }
        // Too wide an interval at the targets' N: more rounds of netpol alone.
        let netpol = enforced.len() - 1;
        if !flood && Some(n) == target_n {
            let judged = |rounds: &[(Block, Vec<Option<Block>>)]| {
                let pairs: Vec<(&Block, &Block)> = rounds
                    .iter()
                    .filter_map(|(b, vs)| Some((b, vs.get(netpol)?.as_ref()?)))
                    .collect();
                plan::undecided(&Datapath::paired(&pairs)).is_empty()
            };
            if !judged(&rounds) {
                d.repeated.push(n);
                progress.add(plan.rounds as f64 * 2.0 * plan.block_seconds(1));
                let np = [&enforced[netpol]];
                for i in plan.rounds..2 * plan.rounds {
                    let (b, mut v) = round(&none, &np, &at(i, 2 * plan.rounds), progress)?;
                    let mut slots = vec![None; netpol];
                    slots.push(Some(v.remove(0)));
                    rounds.push((b, slots));
                }
            }
        }
        for (k, _) in enforced.iter().enumerate() {
            let pairs: Vec<(&Block, &Block)> = rounds
                .iter()
                .filter_map(|(b, vs)| Some((b, vs.get(k)?.as_ref()?)))
                .collect();
            d.variants.push(Datapath::paired(&pairs));
        }
        for (b, vs) in rounds {
            d.blocks.push(b);
            d.blocks.extend(vs.into_iter().flatten());
        }
    }
    Ok(d)
}

/// Where a round stands in the plan, for its blocks and the progress line.
struct Round<'a> {
    plan: &'a Plan,
    what: &'a str,
    index: usize,
    of: usize,
    n: usize,
    flood: bool,
    cpu: usize,
}

/// One round: the baseline and each enforcer, one block each, in an order that reverses
/// every other round (ABBA: a drift over the round weighs on both sides alike).
fn round(
    none: &LabRun,
    enforced: &[&LabRun],
    r: &Round,
    progress: &mut Progress,
) -> anyhow::Result<(Block, Vec<Block>)> {
    // The enforcers turn by one every other round, so that each is as often next to
    // the baseline as the others, and the whole order reverses every other round.
    let k = enforced.len();
    let mut order: Vec<Option<usize>> = std::iter::once(None)
        .chain((0..k).map(|i| Some((i + r.index / 2) % k)))
        .collect();
    if r.index % 2 == 1 {
        order.reverse();
    }
    let mut base = Block::default();
    let mut blocks: Vec<Block> = vec![Block::default(); enforced.len()];
    for slot in order {
        progress.step(
            &format!(
                "datapath: {}, round {}/{}: {}",
                r.what,
                r.index + 1,
                r.of,
                slot.map_or("none", |k| enforced[k].enforcer.as_str())
            ),
            r.plan.block_seconds(1),
        );
        match slot {
            None => base = block(none, r.plan, 0, None)?,
            Some(k) => {
                let l = enforced[k];
                let flood = if r.flood {
                    let target = l.address("x/server", plan::FLOOD_PORT)?;
                    let netns = l.pod("x/flood")?.netns;
                    // The other CPU than the measured flow's.
                    Some(Flood::start(&netns, target, Some(r.cpu.saturating_sub(1))))
                } else {
                    None
                };
                let started = Instant::now();
                let mut v = block(l, r.plan, r.n, flood.as_ref().map(|_| ()));
                let sent_for = started.elapsed().as_secs_f64();
                // The kernel's cost per packet, once per N, in a run of its own (under the
                // flood, when there is one).
                let stats_run = l.enforcer == Enforcer::Netpol && r.index == 0;
                if let (Ok(b), true) = (v.as_mut(), stats_run) {
                    progress.step(
                        &format!("datapath: {}, netpol's bpf_stats run", r.what),
                        r.plan.block_seconds(1),
                    );
                    for pair in &r.plan.pairs {
                        match program_costs(l, *pair, r.plan.seconds) {
                            Ok(ns) => {
                                b.program_ns.insert(*pair, ns);
                            }
                            Err(e) => eprintln!("bench: bpf_stats run: {e:#}"),
                        }
                    }
                }
                if let Some(f) = flood {
                    let sent = f.stop()?;
                    if let Ok(b) = v.as_mut() {
                        b.flood_per_sec = Some(sent as f64 / sent_for);
                    }
                }
                blocks[k] = v?;
            }
        }
    }
    Ok((base, blocks))
}

/// Every metric of every pair once, on lab `l`; for an enforcer, the denied flow tried
/// all along.
fn block(l: &LabRun, plan: &Plan, rules: usize, flood: Option<()>) -> anyhow::Result<Block> {
    let mut b = Block {
        enforcer: l.enforcer.as_str().to_string(),
        rules,
        flood: flood.is_some(),
        ..Block::default()
    };
    for pair in &plan.pairs {
        let denied = match l.enforcer {
            Enforcer::None => None,
            _ => Some(DeniedProbe::start(
                &l.pod("x/flood")?.netns,
                l.address(pair.server(), 80)?,
            )),
        };
        let values = measure(l, *pair, plan.seconds);
        if let Some(p) = denied {
            b.denied
                .get_or_insert_with(DeniedCheck::default)
                .add(p.stop()?);
        }
        b.pairs.insert(
            *pair,
            values
                .into_iter()
                .map(|(k, v)| (k.to_string(), Stat::of(vec![v])))
                .collect(),
        );
    }
    Ok(b)
}

/// What each classifier program costs per packet under each load: one more run of the
/// loads with the kernel's statistics on, the counts of every node's pinned programs
/// read before and after. A run of its own, because counting costs each program run two
/// clock reads that the throughput figures must not carry.
fn program_costs(
    l: &LabRun,
    pair: Pair,
    seconds: f64,
) -> anyhow::Result<BTreeMap<String, BTreeMap<String, f64>>> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let counts = || {
        let mut sum: BTreeMap<String, ProgramRuns> = BTreeMap::new();
        for node in 0..2 {
            let pins = PinDir::new(lab::pin_root_of(&l.name, node));
            for (p, r) in programs::program_runs(&pins) {
                let s = sum.entry(p).or_default();
                s.runs += r.runs;
                s.run_time_ns += r.run_time_ns;
            }
        }
        sum
    };
    let mut out = BTreeMap::new();
    for (name, kind, pinned) in [
        ("TCP stream", LoadKind::Stream, false),
        ("request/response", LoadKind::Rr, true),
        ("new connections", LoadKind::Crr, true),
        ("UDP datagrams", LoadKind::Udp, false),
    ] {
        let before = counts();
        if let Err(e) = load(l, pair, kind, 1, pinned, seconds) {
            eprintln!("bench: bpf_stats run {kind:?}: {e:#}");
            continue;
        }
        let after = counts();
        let ns: BTreeMap<String, f64> = after
            .iter()
            .filter_map(|(p, a)| {
                let b = before.get(p).copied().unwrap_or_default();
                let runs = a.runs.checked_sub(b.runs).filter(|r| *r > 0)?;
                Some((
                    p.clone(),
                    (a.run_time_ns - b.run_time_ns) as f64 / runs as f64,
                ))
            })
            .collect();
        out.insert(name.to_string(), ns);
    }
    Ok(out)
}

/// One run of each metric; a failed measurement is reported and left out (NaN).
fn measure(l: &LabRun, pair: Pair, seconds: f64) -> Vec<(&'static str, f64)> {
    metrics(|kind: LoadKind, streams: u32, pinned: bool| {
        load(l, pair, kind, streams, pinned, seconds)
            .map_err(|e| {
                eprintln!(
                    "bench: {} {kind:?} x/client -> {}: {e:#}",
                    l.enforcer.as_str(),
                    pair.server()
                )
            })
            .ok()
    })
}

/// One load from `x/client` to the pair's server; the client thread pinned to the
/// measured CPU when `pinned`.
fn load(
    l: &LabRun,
    pair: Pair,
    kind: LoadKind,
    streams: u32,
    pinned: bool,
    seconds: f64,
) -> anyhow::Result<LoadReport> {
    if pinned {
        pin_self(Some(measure_cpu()));
    }
    let r = lab::load_with(
        &l.name,
        "x/client",
        pair.server(),
        kind,
        seconds,
        &LoadOptions {
            port: None,
            streams,
        },
    );
    if pinned {
        pin_self(None);
    }
    r
}

/// The block's metrics from one load run of each kind; `run(kind, streams, pinned)` is
/// the testbed's load (None: it failed, and the metric is NaN).
pub fn metrics(
    mut run: impl FnMut(LoadKind, u32, bool) -> Option<LoadReport>,
) -> Vec<(&'static str, f64)> {
    let nan = f64::NAN;
    let mut out = Vec::new();
    let s1 = run(LoadKind::Stream, 1, false);
    out.push((
        "stream1_gbps",
        s1.and_then(|r| r.throughput_bps).map_or(nan, |b| b / 1e9),
    ));
    let s4 = run(LoadKind::Stream, 4, false);
    out.push((
        "stream4_gbps",
        s4.and_then(|r| r.throughput_bps).map_or(nan, |b| b / 1e9),
    ));
    let rr = run(LoadKind::Rr, 1, true);
    out.push((
        "rr_per_sec",
        rr.as_ref()
            .and_then(|r| r.transactions_per_sec)
            .unwrap_or(nan),
    ));
    let lat = rr.and_then(|r| r.latency);
    out.push(("rr_p50_us", lat.as_ref().map_or(nan, |l| l.p50_us)));
    out.push(("rr_p99_us", lat.as_ref().map_or(nan, |l| l.p99_us)));
    let crr = run(LoadKind::Crr, 1, true);
    out.push((
        "crr_per_sec",
        crr.as_ref()
            .and_then(|r| r.connections_per_sec)
            .unwrap_or(nan),
    ));
    out.push((
        "crr_p50_us",
        crr.and_then(|r| r.latency).map_or(nan, |l| l.p50_us),
    ));
    let udp = run(LoadKind::Udp, 1, false);
    out.push((
        "udp_kpps",
        udp.and_then(|r| r.packets_per_sec).map_or(nan, |p| p / 1e3),
    ));
    out
}

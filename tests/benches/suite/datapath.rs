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
use crate::report::{Block, Datapath, Stat};
use crate::testbed::{measure_cpu, pin_self, Flood, LabRun, Testbed};
use crate::Progress;

pub fn run(plan: &Plan, bed: &Testbed, progress: &mut Progress) -> anyhow::Result<Datapath> {
    if let Testbed::Kind = bed {
        return crate::kind::datapath(plan, progress);
    }
    let pods = plan::datapath_pods();
    let manifests = [("pods.yaml", pods.as_str())];
    progress.step(
        "datapath: three two-node labs (none, iptables, netpol)",
        18.0,
    );
    let none = bed.up("dn", Enforcer::None, 2, &manifests, &[])?;
    let ipt = bed.up("di", Enforcer::Iptables, 2, &manifests, &[])?;
    let np = bed.up("dp", Enforcer::Netpol, 2, &manifests, &[])?;
    let cpu = measure_cpu();
    for l in [&none, &ipt, &np] {
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
    let mut before = block(&none, plan, 1, 0, None, progress)?;
    d.blocks.push(before.clone());
    let mut current: BTreeMap<&str, usize> = BTreeMap::new();
    for (enforcer, n, flood) in plan.variants() {
        let l = if enforcer == "iptables" { &ipt } else { &np };
        if current.get(enforcer) != Some(&n) {
            progress.step(&format!("datapath: {enforcer} enforces N = {n}"), 4.0);
            l.write("rules.yaml", &plan::rules_policy(n))?;
            let t = Instant::now();
            l.wait()?;
            d.apply_seconds
                .entry(enforcer.to_string())
                .or_default()
                .insert(n, t.elapsed().as_secs_f64());
            current.insert(enforcer, n);
            for pair in &plan.pairs {
                l.expect_connects("x/client", pair.server())?;
            }
        }
        let flood = if flood {
            let target = l.address("x/server", plan::FLOOD_PORT)?;
            let netns = l.pod("x/flood")?.netns;
            // The other CPU than the measured flow's.
            Some((
                Flood::start(&netns, target, Some(cpu.saturating_sub(1))),
                Instant::now(),
            ))
        } else {
            None
        };
        let mut v = block(
            l,
            plan,
            plan.repeats,
            n,
            flood.is_some().then_some(()),
            progress,
        );
        if let Some((f, started)) = flood {
            let sent = f.stop()?;
            if let Ok(b) = v.as_mut() {
                b.flood_per_sec = Some(sent as f64 / started.elapsed().as_secs_f64());
            }
        }
        let v = v?;
        let after = block(&none, plan, 1, 0, None, progress)?;
        d.variants.push(Datapath::compare(&before, &v, &after));
        d.blocks.push(v);
        d.blocks.push(after.clone());
        before = after;
    }
    Ok(d)
}

/// Every metric of every pair, `repeats` times, on lab `l`.
fn block(
    l: &LabRun,
    plan: &Plan,
    repeats: usize,
    rules: usize,
    flood: Option<()>,
    progress: &mut Progress,
) -> anyhow::Result<Block> {
    let enforcer = l.enforcer.as_str();
    let mut b = Block {
        enforcer: enforcer.to_string(),
        rules,
        flood: flood.is_some(),
        ..Block::default()
    };
    let step = plan.block_seconds(1) / plan.pairs.len() as f64;
    for pair in &plan.pairs {
        let mut runs: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for rep in 0..repeats {
            let what = match l.enforcer {
                Enforcer::None => "baseline".to_string(),
                _ => format!(
                    "{enforcer} N = {rules}{}",
                    if flood.is_some() { " + flood" } else { "" }
                ),
            };
            progress.step(
                &format!(
                    "datapath: {what}, {}, run {}/{repeats}",
                    pair.name(),
                    rep + 1
                ),
                step,
            );
            for (key, value) in measure(l, *pair, plan.seconds) {
                runs.entry(key).or_default().push(value);
            }
        }
        b.pairs.insert(
            *pair,
            runs.into_iter()
                .map(|(k, v)| (k.to_string(), Stat::of(v)))
                .collect(),
        );
        if l.enforcer == Enforcer::Netpol {
            progress.step(
                &format!(
                    "datapath: {enforcer} N = {rules}, {}, bpf_stats run",
                    pair.name()
                ),
                step / repeats.max(1) as f64,
            );
            b.program_ns
                .insert(*pair, program_costs(l, *pair, plan.seconds)?);
        }
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

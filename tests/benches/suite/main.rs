//! `cargo xtask bench`: what NetworkPolicy enforcement costs, netpol against no
//! enforcement (`none`) and against iptables/ipset enforcement in kube-router's layout
//! (`iptables`), measured side by side in one run on one machine. A report, never a
//! pass/fail test.
//!
//! ```text
//! plan (quick | full) ──► scenarios ──► report.json ──► report.md + *.png
//!   datapath: lab labs of each enforcer, N rules, same/cross node, load
//!   update:   policy file → first permitted / refused connection
//!   control:  compile bench numbers, real agents' RSS on synthetic clusters
//!   events:   a denied flood, what observe follows, exact counters
//!   packet:   BPF_PROG_TEST_RUN with repeat, N policy entries
//! ```
//! Usage: `suite [datapath|update|control|events|packet ...] [--quick] [--out DIR]
//! [--compile-json FILE] [--testbed lab|kind] [--page FILE]` (`--page`: also write the
//! project's benchmark page from this run). Progress goes to stderr.

mod control;
mod control_kube;
mod datapath;
mod events;
mod kind;
// The kube source tests' mocked API server, for the kube source's memory (control).
#[path = "../../../netpol-agent/tests/mock_api/mod.rs"]
mod mock_api;
mod packet;
mod plan;
mod plot;
mod report;
mod testbed;
mod update;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use plan::{Plan, Scenario};

// Counted, for the control scenario's heap by stage.
#[global_allocator]
static ALLOC: netpol_tests::alloc::Counting = netpol_tests::alloc::Counting;

/// The `netpol` binary cargo built beside this bench (release, like the bench).
pub const NETPOL: &str = env!("NETPOL_BIN");

/// Progress on stderr: the step, the time so far, and a rough time left.
pub struct Progress {
    started: Instant,
    done: f64,
    total: f64,
}

impl Progress {
    pub fn new(total: f64) -> Progress {
        Progress {
            started: Instant::now(),
            done: 0.0,
            total: total.max(1.0),
        }
    }

    /// Plans `weight` more seconds (work the plan could not foresee: more rounds).
    pub fn add(&mut self, weight: f64) {
        self.total += weight;
    }

    /// Reports `what` and counts `weight` planned seconds as done.
    pub fn step(&mut self, what: &str, weight: f64) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let left = if self.done > 0.0 {
            elapsed / self.done * (self.total - self.done)
        } else {
            self.total
        };
        eprintln!(
            "[{:>5.1}%  {}  ~{} left] {what}",
            100.0 * self.done / self.total,
            clock(elapsed),
            clock(left.max(0.0))
        );
        self.done += weight;
    }
}

fn clock(s: f64) -> String {
    format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match run(&args) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let mut scenarios = Vec::new();
    let mut quick = false;
    let mut out = PathBuf::from("target/bench");
    let mut compile_json = None;
    let mut testbed = "lab".to_string();
    let mut page = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => out = it.next().context("--out DIR")?.into(),
            "--compile-json" => {
                compile_json = Some(PathBuf::from(it.next().context("--compile-json FILE")?))
            }
            "--testbed" => testbed = it.next().context("--testbed lab|kind")?.clone(),
            "--page" => page = Some(PathBuf::from(it.next().context("--page FILE")?)),
            s => scenarios.push(Scenario::parse(s).with_context(|| {
                format!("unknown scenario {s:?}: datapath, update, control, events or packet")
            })?),
        }
    }
    if scenarios.is_empty() {
        scenarios = Scenario::ALL.to_vec();
    }
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("run as root: the labs are network namespaces and the classifier is loaded into the kernel");
    }
    // The CPUs allowed, read before any thread is pinned.
    testbed::measure_cpu();
    let plan = if quick { Plan::quick() } else { Plan::full() };
    let bed = testbed::Testbed::parse(&testbed)?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut progress = Progress::new(scenarios.iter().map(|s| plan.weight(*s)).sum());
    let mut report = report::Report::new(&plan, &scenarios, args, bed.name());
    let started = Instant::now();
    if let testbed::Testbed::Kind = bed {
        report.notes = kind::NOTES.iter().map(|n| n.to_string()).collect();
    }
    for s in &scenarios {
        let lab_only = matches!(s, Scenario::Update | Scenario::Events);
        if lab_only && matches!(bed, testbed::Testbed::Kind) {
            eprintln!(
                "bench: {s:?} is lab-only; skipped on the kind testbed (see the report's notes)"
            );
            continue;
        }
        match s {
            Scenario::Datapath => {
                report.datapath = Some(datapath::run(&plan, &bed, &mut progress)?)
            }
            Scenario::Update => {
                let (update, agents) = update::run(&plan, &bed, &mut progress)?;
                report.update = Some(update);
                report.lab_agents = agents;
            }
            Scenario::Control => {
                report.control = Some(control::run(&plan, compile_json.as_deref(), &mut progress)?)
            }
            Scenario::Events => report.events = Some(events::run(&plan, &bed, &mut progress)?),
            Scenario::Packet => report.packet = Some(packet::run(&plan, &mut progress)?),
        }
        // Written after every scenario: a long run interrupted later keeps what it has.
        report.seconds = started.elapsed().as_secs_f64();
        report.write(&out)?;
    }
    let charts = plot::draw(&report, &out)?;
    report.charts = charts;
    report.seconds = started.elapsed().as_secs_f64();
    report.write(&out)?;
    if let Some(page) = &page {
        report.write_document(&out, page)?;
        eprintln!("bench: {} written from this run", page.display());
    }
    eprintln!(
        "bench: done in {}; {} and {}",
        clock(report.seconds),
        out.join("report.json").display(),
        out.join("report.md").display()
    );
    Ok(())
}

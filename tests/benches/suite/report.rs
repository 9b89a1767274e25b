//! The report: one JSON document (`report.json`, schema `netpol-bench/1`) and the same
//! numbers as Markdown (`report.md`), with the charts `plot.rs` draws beside them.
//!
//! Every enforced figure is given with the baseline (`none`) measured right before and
//! right after it in the same run: `ratio` = value / mean(before, after), and for
//! latencies `added_us` = value − mean.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::plan::{Pair, Plan, Scenario};

pub const SCHEMA: &str = "netpol-bench/1";

#[derive(Clone, Debug, Default, Serialize)]
pub struct Stat {
    pub runs: Vec<f64>,
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(mut runs: Vec<f64>) -> Stat {
        runs.retain(|v| v.is_finite());
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        let (min, max) = (
            sorted.first().copied().unwrap_or(f64::NAN),
            sorted.last().copied().unwrap_or(f64::NAN),
        );
        Stat {
            median: percentile(&sorted, 0.5),
            runs,
            min,
            max,
        }
    }
}

/// Nearest rank on sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// A datapath metric: its key in the JSON, a label, the unit, and whether more is better
/// (throughput, rates) or worse (latency).
pub struct Metric {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub latency: bool,
}

pub const METRICS: [Metric; 8] = [
    Metric {
        key: "stream1_gbps",
        label: "TCP stream, 1 stream",
        unit: "Gbit/s",
        latency: false,
    },
    Metric {
        key: "stream4_gbps",
        label: "TCP stream, 4 streams",
        unit: "Gbit/s",
        latency: false,
    },
    Metric {
        key: "rr_per_sec",
        label: "request/response rate",
        unit: "/s",
        latency: false,
    },
    Metric {
        key: "rr_p50_us",
        label: "request/response p50",
        unit: "µs",
        latency: true,
    },
    Metric {
        key: "rr_p99_us",
        label: "request/response p99",
        unit: "µs",
        latency: true,
    },
    Metric {
        key: "crr_per_sec",
        label: "new connections",
        unit: "/s",
        latency: false,
    },
    Metric {
        key: "crr_p50_us",
        label: "new connection p50",
        unit: "µs",
        latency: true,
    },
    Metric {
        key: "udp_kpps",
        label: "UDP datagrams",
        unit: "k/s",
        latency: false,
    },
];

/// One block of measurements of one lab state: every metric of every pair.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Block {
    pub enforcer: String,
    pub rules: usize,
    pub flood: bool,
    /// pair → metric → runs.
    pub pairs: BTreeMap<Pair, BTreeMap<String, Stat>>,
    /// Flood datagrams sent per second meanwhile (flood variants).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flood_per_sec: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Compared {
    pub value: Stat,
    pub baseline_before: f64,
    pub baseline_after: f64,
    pub baseline: f64,
    /// value / baseline (throughput and rates retained; latencies multiplied).
    pub ratio: f64,
    /// Latencies: value − baseline, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added_us: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Variant {
    pub enforcer: String,
    pub rules: usize,
    pub flood: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flood_per_sec: Option<f64>,
    pub pairs: BTreeMap<Pair, BTreeMap<String, Compared>>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Datapath {
    /// Every block in the order it ran (baselines and variants).
    pub blocks: Vec<Block>,
    pub variants: Vec<Variant>,
    /// Seconds the enforcers took to enforce each N (policy written → lab wait).
    pub apply_seconds: BTreeMap<String, BTreeMap<usize, f64>>,
    /// The CPU request/response client and servers were pinned to.
    pub pinned_cpu: usize,
}

impl Datapath {
    /// Compares block `v` with the baseline blocks before and after it.
    pub fn compare(before: &Block, v: &Block, after: &Block) -> Variant {
        let mut pairs = BTreeMap::new();
        for (pair, metrics) in &v.pairs {
            let mut out = BTreeMap::new();
            for (key, value) in metrics {
                let b = |blk: &Block| {
                    blk.pairs
                        .get(pair)
                        .and_then(|m| m.get(key))
                        .map(|s| s.median)
                        .unwrap_or(f64::NAN)
                };
                let (bb, ba) = (b(before), b(after));
                let baseline = (bb + ba) / 2.0;
                let latency = METRICS.iter().any(|m| m.key == key && m.latency);
                out.insert(
                    key.clone(),
                    Compared {
                        ratio: value.median / baseline,
                        added_us: latency.then_some(value.median - baseline),
                        value: value.clone(),
                        baseline_before: bb,
                        baseline_after: ba,
                        baseline,
                    },
                );
            }
            pairs.insert(*pair, out);
        }
        Variant {
            enforcer: v.enforcer.clone(),
            rules: v.rules,
            flood: v.flood,
            flood_per_sec: v.flood_per_sec,
            pairs,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Dist {
    pub samples_ms: Vec<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Dist {
    pub fn of(samples_ms: Vec<f64>) -> Dist {
        let mut s = samples_ms.clone();
        s.sort_by(f64::total_cmp);
        Dist {
            p50_ms: percentile(&s, 0.5),
            p99_ms: percentile(&s, 0.99),
            min_ms: s.first().copied().unwrap_or(f64::NAN),
            max_ms: s.last().copied().unwrap_or(f64::NAN),
            samples_ms,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct UpdatePoint {
    pub enforcer: String,
    pub pods: usize,
    /// Policy written into the enforcers' source → first permitted connection.
    pub enforce: Dist,
    /// Policy removed → first refused connection.
    pub revoke: Dist,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Update {
    pub points: Vec<UpdatePoint>,
    /// Enforce: attempts abandoned after this (ms), the resolution of a sample.
    pub enforce_attempt_ms: f64,
    /// Revoke: an attempt unanswered after this (ms), twice in a row, is a refusal; the
    /// first one's start is the sample.
    pub revoke_attempt_ms: f64,
    /// The `dir` source waits this long for a burst of writes to settle before it reads
    /// (ms); included in every sample, for both enforcers.
    pub source_settle_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct AgentMemory {
    pub enforcer: String,
    pub pods: usize,
    pub rss_mib: f64,
    pub hwm_mib: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct AgentRun {
    pub pods: usize,
    pub local_pods: usize,
    pub policies: usize,
    pub identities: usize,
    pub policy_entries: usize,
    /// Start of the process to its first sync of the whole cluster (includes loading
    /// the classifier through the verifier).
    pub first_sync_ms: f64,
    pub rss_mib: f64,
    pub hwm_mib: f64,
    /// In-process, for the same node: index + compile, and writing every entry into
    /// fresh maps.
    pub compile_ms: f64,
    pub sync_ms: f64,
    pub map_entries: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Control {
    /// `cargo bench --bench compile -- --json` of the same run (all pods local).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compile: Option<serde_json::Value>,
    pub agents: Vec<AgentRun>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct EventsRun {
    pub seconds: f64,
    pub sent: u64,
    pub sent_per_sec: f64,
    /// Drops counted for the server's ingress (POLICY_DENIED) meanwhile.
    pub counted: u64,
    /// Packets counted as allowed at the flooder's egress meanwhile.
    pub counted_egress: u64,
    pub exact: bool,
    pub observed: u64,
    pub observed_per_sec: f64,
    pub events_sent: u64,
    pub ring_full: u64,
    pub rate_limited: u64,
    /// Events the agent could not hand to this observer (it fell behind).
    pub observer_lost: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Events {
    pub event_rate: String,
    pub runs: Vec<EventsRun>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PacketPoint {
    pub rules: usize,
    pub case: String,
    pub ns: Stat,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Packet {
    pub repeat: u32,
    /// What BPF_PROG_TEST_RUN adds to a single run (its timer), subtracted from new flows.
    pub timer_overhead_ns: f64,
    pub points: Vec<PacketPoint>,
    pub verified_insns: BTreeMap<String, u32>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub kernel: String,
    pub memory_gib: f64,
    pub iptables: String,
}

impl Machine {
    pub fn here() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default();
        let mem = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let iptables = std::process::Command::new("iptables")
            .arg("-V")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Machine {
            cpu,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            kernel,
            memory_gib: mem / (1024.0 * 1024.0),
            iptables,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub command: String,
    pub testbed: String,
    pub machine: Machine,
    pub started_unix: u64,
    pub seconds: f64,
    pub plan: Plan,
    pub scenarios: Vec<Scenario>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datapath: Option<Datapath>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update: Option<Update>,
    /// Enforcers of the update scenario's labs, after it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lab_agents: Vec<AgentMemory>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control: Option<Control>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Events>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet: Option<Packet>,
    pub charts: Vec<String>,
}

impl Report {
    pub fn new(plan: &Plan, scenarios: &[Scenario], args: &[String], testbed: &str) -> Report {
        // What a reader would type: the scenarios and --quick (xtask adds the paths).
        let mut command = String::from("cargo xtask bench");
        let mut skip = false;
        for a in args {
            if std::mem::take(&mut skip) {
                continue;
            }
            if matches!(a.as_str(), "--out" | "--compile-json" | "--testbed") {
                skip = true;
                continue;
            }
            command.push(' ');
            command.push_str(a);
        }
        if testbed == "kind" {
            command = command.replacen("cargo xtask bench", "cargo xtask kind --bench", 1);
        }
        Report {
            schema: SCHEMA,
            command,
            testbed: testbed.into(),
            machine: Machine::here(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            seconds: 0.0,
            plan: plan.clone(),
            scenarios: scenarios.to_vec(),
            datapath: None,
            update: None,
            lab_agents: vec![],
            control: None,
            events: None,
            packet: None,
            charts: vec![],
        }
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "# netpol benchmark report\n");
        let _ = writeln!(
            md,
            "`{}` ({} plan, {} testbed), {:.0} s, schema `{}`.\n\nMachine: {} × {}, {:.0} GiB, Linux {}, {}.\n",
            self.command,
            if self.plan.quick { "quick" } else { "full" },
            self.testbed,
            self.seconds,
            self.schema,
            m.cpus,
            m.cpu,
            m.memory_gib,
            m.kernel,
            m.iptables
        );
        if let Some(d) = &self.datapath {
            datapath_md(&mut md, d, &self.plan);
        }
        if let Some(u) = &self.update {
            let _ = writeln!(md, "## Policy update latency\n");
            let _ = writeln!(
                md,
                "Policy file written into the enforcers' source directory → first permitted connection \
                 (enforce: attempts abandoned after {:.0} ms, in a tight loop); removed → start of the first \
                 refused attempt (unanswered for {:.0} ms, twice in a row). Every sample includes the `dir` \
                 source's {:.0} ms settle.\n",
                u.enforce_attempt_ms, u.revoke_attempt_ms, u.source_settle_ms
            );
            let _ = writeln!(md, "| enforcer | pods | enforce p50 | enforce p99 | revoke p50 | revoke p99 | samples |");
            let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
            for p in &u.points {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
                    p.enforcer,
                    p.pods,
                    p.enforce.p50_ms,
                    p.enforce.p99_ms,
                    p.revoke.p50_ms,
                    p.revoke.p99_ms,
                    p.enforce.samples_ms.len()
                );
            }
            md.push('\n');
            if self.charts.iter().any(|c| c == "update.png") {
                let _ = writeln!(md, "![update latency](update.png)\n");
            }
        }
        if self.control.is_some() || !self.lab_agents.is_empty() {
            let _ = writeln!(md, "## Control plane\n");
        }
        if let Some(c) = &self.control {
            if let Some(full) = c
                .compile
                .as_ref()
                .and_then(|v| v.get("full"))
                .and_then(|v| v.as_array())
            {
                let _ = writeln!(md, "Compile benchmark (every pod local, one cold run):\n");
                let _ = writeln!(
                    md,
                    "| pods | policies | identities | map entries | compile | peak heap |"
                );
                let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|");
                for f in full {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {:.1} ms | {:.1} MiB |",
                        f["pods"],
                        f["policies"],
                        f["identities"],
                        f["map_entries"],
                        f["total_ms"].as_f64().unwrap_or(f64::NAN),
                        f["peak_mib"].as_f64().unwrap_or(f64::NAN)
                    );
                }
                md.push('\n');
            }
            if !c.agents.is_empty() {
                let _ = writeln!(
                    md,
                    "A real agent (release build) on a synthetic cluster (`--node node-0`: 1 % of the pods local, \
                     no veths), and the same node's compile and map writes in process:\n"
                );
                let _ = writeln!(md, "| pods | local | policies | identities | policy entries | map entries | compile | sync | first sync | RSS | peak RSS |");
                let _ = writeln!(
                    md,
                    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
                );
                for a in &c.agents {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {} | {} | {:.1} ms | {:.1} ms | {:.0} ms | {:.1} MiB | {:.1} MiB |",
                        a.pods, a.local_pods, a.policies, a.identities, a.policy_entries, a.map_entries,
                        a.compile_ms, a.sync_ms, a.first_sync_ms, a.rss_mib, a.hwm_mib
                    );
                }
                md.push('\n');
            }
        }
        if !self.lab_agents.is_empty() {
            let _ = writeln!(
                md,
                "Enforcers of the update labs (RSS after the scenario):\n"
            );
            let _ = writeln!(md, "| enforcer | pods | RSS | peak RSS |");
            let _ = writeln!(md, "|---|---:|---:|---:|");
            for a in &self.lab_agents {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.1} MiB | {:.1} MiB |",
                    a.enforcer, a.pods, a.rss_mib, a.hwm_mib
                );
            }
            md.push('\n');
        }
        if let Some(e) = &self.events {
            let _ = writeln!(md, "## Events\n");
            let _ = writeln!(
                md,
                "A pod floods a default-denied server with UDP; `observe` subscribed meanwhile (agent `--event-rate {}`).\n",
                e.event_rate
            );
            let _ = writeln!(md, "| seconds | sent/s | counted exactly | observed/s | events sent | ring full | rate limited | observer lost |");
            let _ = writeln!(md, "|---:|---:|---|---:|---:|---:|---:|---:|");
            for r in &e.runs {
                let _ = writeln!(
                    md,
                    "| {:.1} | {:.0} | {} ({} of {}) | {:.0} | {} | {} | {} | {} |",
                    r.seconds,
                    r.sent_per_sec,
                    if r.exact { "yes" } else { "no" },
                    r.counted,
                    r.sent,
                    r.observed_per_sec,
                    r.events_sent,
                    r.ring_full,
                    r.rate_limited,
                    r.observer_lost
                );
            }
            md.push('\n');
        }
        if let Some(p) = &self.packet {
            let _ = writeln!(md, "## Per packet (BPF_PROG_TEST_RUN)\n");
            let _ = writeln!(
                md,
                "Kernel mean per run over {} repeats; a new flow is one run per distinct flow, less the \
                 test runner's own {:.0} ns. Verified instructions: {}.\n",
                p.repeat,
                p.timer_overhead_ns,
                p.verified_insns.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
            );
            let mut cases: Vec<&str> = p.points.iter().map(|x| x.case.as_str()).collect();
            cases.dedup();
            let rules: std::collections::BTreeSet<usize> =
                p.points.iter().map(|x| x.rules).collect();
            let _ = write!(md, "| case |");
            for r in &rules {
                let _ = write!(md, " N = {r} |");
            }
            let _ = writeln!(md, "\n|---|{}", "---:|".repeat(rules.len()));
            let mut seen = std::collections::BTreeSet::new();
            for case in cases {
                if !seen.insert(case) {
                    continue;
                }
                let _ = write!(md, "| {case} |");
                for r in &rules {
                    match p.points.iter().find(|x| x.case == case && x.rules == *r) {
                        Some(x) => {
                            let _ = write!(
                                md,
                                " {:.0} ns ({:.0}–{:.0}) |",
                                x.ns.median, x.ns.min, x.ns.max
                            );
                        }
                        None => md.push_str(" |"),
                    }
                }
                md.push('\n');
            }
            md.push('\n');
            if self.charts.iter().any(|c| c == "packet.png") {
                let _ = writeln!(md, "![per packet](packet.png)\n");
            }
        }
        md
    }
}

fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn datapath_md(md: &mut String, d: &Datapath, plan: &Plan) {
    let _ = writeln!(md, "## Datapath\n");
    let _ = writeln!(
        md,
        "The flow's allowing rule comes last after N − 1 rules with other peers and ports. Each figure: \
         median of {} runs (min–max), then the ratio to `none` measured right before and after it \
         (latency: µs added). Request/response client and server pinned to CPU {}. Loads of {:.0} s.\n",
        plan.repeats, d.pinned_cpu, plan.seconds
    );
    for pair in &plan.pairs {
        let _ = writeln!(md, "### {}\n", pair.name());
        let _ = write!(md, "| enforcer | N |");
        for m in &METRICS {
            let _ = write!(md, " {} ({}) |", m.label, m.unit);
        }
        let _ = writeln!(md, "\n|---|---:|{}", "---:|".repeat(METRICS.len()));
        // The baseline itself, from the blocks.
        let base: Vec<&Block> = d.blocks.iter().filter(|b| b.enforcer == "none").collect();
        if !base.is_empty() {
            let _ = write!(md, "| none | – |");
            for m in &METRICS {
                let mut v: Vec<f64> = base
                    .iter()
                    .filter_map(|b| b.pairs.get(pair)?.get(m.key).map(|s| s.median))
                    .collect();
                v.sort_by(f64::total_cmp);
                let _ = write!(
                    md,
                    " {} ({}–{}) |",
                    fmt_value(percentile(&v, 0.5)),
                    fmt_value(v.first().copied().unwrap_or(f64::NAN)),
                    fmt_value(v.last().copied().unwrap_or(f64::NAN))
                );
            }
            md.push('\n');
        }
        for v in &d.variants {
            let Some(metrics) = v.pairs.get(pair) else {
                continue;
            };
            let _ = write!(
                md,
                "| {}{} | {} |",
                v.enforcer,
                if v.flood { " + flood" } else { "" },
                v.rules
            );
            for m in &METRICS {
                match metrics.get(m.key) {
                    Some(c) if m.latency => {
                        let _ = write!(
                            md,
                            " {} (+{}) |",
                            fmt_value(c.value.median),
                            fmt_value(c.added_us.unwrap_or(f64::NAN))
                        );
                    }
                    Some(c) => {
                        let _ = write!(md, " {} ({:.2}×) |", fmt_value(c.value.median), c.ratio);
                    }
                    None => md.push_str(" – |"),
                }
            }
            md.push('\n');
        }
        md.push('\n');
        let chart = format!("datapath-{}.png", pair.name());
        let _ = writeln!(md, "![cost against N, {}]({chart})\n", pair.name());
    }
    let floods: Vec<String> = d
        .variants
        .iter()
        .filter_map(|v| Some(format!("{} {:.0}/s", v.enforcer, v.flood_per_sec?)))
        .collect();
    if !floods.is_empty() {
        let _ = writeln!(
            md,
            "Flood variants: a third pod sends 64-byte UDP datagrams to a port no rule allows, from the other CPU, \
             while the pair is measured ({}).\n",
            floods.join(", ")
        );
    }
    if !d.apply_seconds.is_empty() {
        let _ = writeln!(
            md,
            "Time to enforce the N-rule policy (written → `lab wait`):\n"
        );
        for (e, by_n) in &d.apply_seconds {
            let parts: Vec<String> = by_n
                .iter()
                .map(|(n, s)| format!("N = {n}: {s:.2} s"))
                .collect();
            let _ = writeln!(md, "- {e}: {}", parts.join(", "));
        }
        md.push('\n');
    }
}

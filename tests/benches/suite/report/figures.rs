//! The measured figures of each scenario, as `report.json` holds them.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::plan::Pair;

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
    /// netpol: pair → load → program → mean ns per run, as the kernel counted them
    /// (`bpf_stats`) in one extra run of each load, kept out of the throughput figures.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub program_ns: BTreeMap<Pair, BTreeMap<String, BTreeMap<String, f64>>>,
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
    /// As [`Block::program_ns`].
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub program_ns: BTreeMap<Pair, BTreeMap<String, BTreeMap<String, f64>>>,
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
            program_ns: v.program_ns.clone(),
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

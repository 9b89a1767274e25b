//! The measured figures of each scenario, as `report.json` holds them.

use std::collections::BTreeMap;

use serde::Serialize;

use netpol_tests::stats::{bootstrap_mean_ci, mean};

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
    /// Enforced blocks: the denied flow tried meanwhile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied: Option<DeniedCheck>,
}

/// One metric of a variant against `none`, over pairs of runs that ran side by side
/// (ABAB…): the ratio is the mean of the pairs' ratios, its interval a bootstrap over
/// the pairs.
#[derive(Clone, Debug, Serialize)]
pub struct Compared {
    pub value: Stat,
    pub baseline: Stat,
    /// Pairs with both runs measured.
    pub pairs: usize,
    /// Mean of value / baseline over the pairs.
    pub ratio: f64,
    /// 95 % interval of `ratio` (bootstrap over the pairs).
    pub ratio_ci: [f64; 2],
    /// Latencies: mean of value − baseline over the pairs, µs, and its interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added_us_ci: Option<[f64; 2]>,
}

impl Compared {
    /// `pairs`: (baseline, value) of each pair; a pair with a failed run is left out.
    pub fn of(pairs: &[(f64, f64)], latency: bool) -> Compared {
        let pairs: Vec<(f64, f64)> = pairs
            .iter()
            .copied()
            .filter(|(b, v)| b.is_finite() && v.is_finite() && *b > 0.0)
            .collect();
        let ratios: Vec<f64> = pairs.iter().map(|(b, v)| v / b).collect();
        let added: Vec<f64> = pairs.iter().map(|(b, v)| v - b).collect();
        Compared {
            value: Stat::of(pairs.iter().map(|p| p.1).collect()),
            baseline: Stat::of(pairs.iter().map(|p| p.0).collect()),
            pairs: pairs.len(),
            ratio: mean(&ratios),
            ratio_ci: bootstrap_mean_ci(&ratios),
            added_us: latency.then(|| mean(&added)),
            added_us_ci: latency.then(|| bootstrap_mean_ci(&added)),
        }
    }
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
    /// The denied flow tried while the variant's loads ran: attempts, and how many
    /// connected (any is an enforcer that does not enforce, and voids the figures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied: Option<DeniedCheck>,
}

/// A flow no rule allows (`x/flood` → the pair's server on TCP 80), tried again and
/// again while a block's loads run.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct DeniedCheck {
    pub attempts: u64,
    pub connected: u64,
}

impl DeniedCheck {
    pub fn add(&mut self, other: DeniedCheck) {
        self.attempts += other.attempts;
        self.connected += other.connected;
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Datapath {
    /// Every block, round by round: the baseline's, then each enforcer's (within a
    /// round they ran in the order `datapath::round` gives).
    pub blocks: Vec<Block>,
    pub variants: Vec<Variant>,
    /// Seconds the enforcers took to enforce each N (policy written → lab wait).
    pub apply_seconds: BTreeMap<String, BTreeMap<usize, f64>>,
    /// The CPU request/response client and servers were pinned to.
    pub pinned_cpu: usize,
    /// N whose rounds were repeated because an interval was too wide to judge a target.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repeated: Vec<usize>,
}

impl Datapath {
    /// The variant of `rounds`: each a baseline block and the variant's block that ran
    /// beside it, paired metric by metric.
    pub fn paired(rounds: &[(&Block, &Block)]) -> Variant {
        let v = rounds.first().expect("at least one round").1;
        let mut pairs: BTreeMap<Pair, BTreeMap<String, Compared>> = BTreeMap::new();
        let mut program_ns = BTreeMap::new();
        let mut denied: Option<DeniedCheck> = None;
        for pair in v.pairs.keys() {
            let mut out = BTreeMap::new();
            for m in &METRICS {
                let runs: Vec<(f64, f64)> = rounds
                    .iter()
                    .map(|(b, v)| (first_run(b, *pair, m.key), first_run(v, *pair, m.key)))
                    .collect();
                out.insert(m.key.to_string(), Compared::of(&runs, m.latency));
            }
            pairs.insert(*pair, out);
        }
        for (_, b) in rounds {
            // The statistics run of the last round that has one (one per block).
            for (pair, loads) in &b.program_ns {
                program_ns.insert(*pair, loads.clone());
            }
            if let Some(d) = b.denied {
                denied.get_or_insert_with(DeniedCheck::default).add(d);
            }
        }
        let flood: Vec<f64> = rounds.iter().filter_map(|(_, v)| v.flood_per_sec).collect();
        Variant {
            enforcer: v.enforcer.clone(),
            rules: v.rules,
            flood: v.flood,
            flood_per_sec: (!flood.is_empty()).then(|| mean(&flood)),
            pairs,
            program_ns,
            denied,
        }
    }

    /// A variant measured between two baseline blocks (where the baseline cannot be
    /// alternated cheaply: the kind testbed); each of its runs is paired with the mean
    /// of the two baselines.
    pub fn bracketed(before: &Block, v: &Block, after: &Block) -> Variant {
        let mut out = Datapath::paired(&[(before, v)]);
        for (pair, metrics) in &v.pairs {
            for m in &METRICS {
                let Some(stat) = metrics.get(m.key) else {
                    continue;
                };
                let base = (first_run(before, *pair, m.key) + first_run(after, *pair, m.key)) / 2.0;
                let runs: Vec<(f64, f64)> = stat.runs.iter().map(|x| (base, *x)).collect();
                out.pairs
                    .entry(*pair)
                    .or_default()
                    .insert(m.key.to_string(), Compared::of(&runs, m.latency));
            }
        }
        out
    }
}

/// The median of a block's runs of `key` on `pair` (one run in the lab's rounds).
fn first_run(b: &Block, pair: Pair, key: &str) -> f64 {
    b.pairs
        .get(&pair)
        .and_then(|m| m.get(key))
        .map_or(f64::NAN, |s| s.median)
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
    /// In process: loading the classifier (every program through the verifier, one
    /// after the other), the floor under the first sync.
    pub load_ms: f64,
    /// The same node in process, by stage (the bench's counting allocator).
    pub heap: Heap,
}

/// Heap bytes each stage keeps, in MiB: the cluster objects as the sources hold them
/// (k8s-openapi types), the index (with its snapshot), the compiler and its desired
/// maps; and the peak of index + compile above the objects.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Heap {
    pub objects_mib: f64,
    pub index_mib: f64,
    pub compile_mib: f64,
    pub peak_mib: f64,
}

/// An agent on the kube source (the mocked API server): after its list, and after a
/// watch event for every pod.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KubeRun {
    pub pods: usize,
    pub local_pods: usize,
    pub identities: usize,
    pub identities_after: usize,
    /// Start of the process to the sync of the listed cluster.
    pub first_sync_ms: f64,
    pub rss_listed_mib: f64,
    /// MODIFIED events sent (a relabel of every pod) and one ADDED, and the time from the
    /// first sent to the last applied.
    pub events: usize,
    pub events_ms: f64,
    pub rss_watched_mib: f64,
    pub hwm_mib: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Control {
    /// `cargo bench --bench compile -- --json` of the same run (all pods local).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compile: Option<serde_json::Value>,
    pub agents: Vec<AgentRun>,
    /// The kube source's runs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kube: Vec<KubeRun>,
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

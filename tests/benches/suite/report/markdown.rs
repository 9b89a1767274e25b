//! `report.md`: the report's numbers as Markdown tables, with the charts beside them.

use std::fmt::Write as _;

use super::{percentile, Block, Datapath, Report, METRICS};
use crate::plan::Plan;

impl Report {
    pub fn markdown(&self) -> String {
        self.markdown_with("")
    }

    /// The Markdown with the charts looked up under `charts` (a directory prefix, "" for
    /// beside the file).
    pub fn markdown_with(&self, charts: &str) -> String {
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
        for n in &self.notes {
            let _ = writeln!(md, "- {n}");
        }
        if !self.notes.is_empty() {
            md.push('\n');
        }
        if !self.targets.is_empty() {
            let _ = writeln!(md, "## Targets\n");
            let _ = writeln!(
                md,
                "Ratios are judged by their 95 % interval: met when all of it meets the goal, missed when none \
                 of it does, too wide to judge otherwise (the run then repeats the rounds once; a figure still \
                 too wide needs a quieter machine or more rounds).\n"
            );
            let _ = writeln!(md, "| target | goal | this run | |");
            let _ = writeln!(md, "|---|---|---|---|");
            for t in &self.targets {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} |",
                    t.target,
                    t.goal,
                    t.figure,
                    t.verdict.word()
                );
            }
            md.push('\n');
        }
        if let Some(d) = &self.datapath {
            datapath_md(&mut md, d, &self.plan, charts);
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
                let _ = writeln!(md, "![update latency]({charts}update.png)\n");
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
                let _ = writeln!(md, "| pods | local | policies | identities | policy entries | map entries | compile | sync | classifier load | first sync | RSS | peak RSS |");
                let _ = writeln!(
                    md,
                    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
                );
                for a in &c.agents {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {} | {} | {:.1} ms | {:.1} ms | {:.0} ms | {:.0} ms | {:.1} MiB | {:.1} MiB |",
                        a.pods, a.local_pods, a.policies, a.identities, a.policy_entries, a.map_entries,
                        a.compile_ms, a.sync_ms, a.load_ms, a.first_sync_ms, a.rss_mib, a.hwm_mib
                    );
                }
                md.push('\n');
            }
        }
        if let Some(c) = self.control.as_ref().filter(|c| !c.agents.is_empty()) {
            let _ = writeln!(
                md,
                "Where the agent's heap goes, by stage (the same node in process, counted by the bench's allocator): \
                 the cluster objects as the sources keep them (k8s-openapi types), the index with its snapshot, \
                 the compiler with the desired maps, and the peak of index + compile above the objects:\n"
            );
            let _ = writeln!(
                md,
                "| pods | objects | index | compile | peak (index + compile) |"
            );
            let _ = writeln!(md, "|---:|---:|---:|---:|---:|");
            for a in &c.agents {
                let h = &a.heap;
                let _ = writeln!(
                    md,
                    "| {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
                    a.pods, h.objects_mib, h.index_mib, h.compile_mib, h.peak_mib
                );
            }
            md.push('\n');
        }
        if let Some(c) = self.control.as_ref().filter(|c| !c.kube.is_empty()) {
            let _ = writeln!(
                md,
                "The same agent on the kube source, against the mocked API server (the kube source tests' own): \
                 the synthetic cluster listed, then a watch event relabelling every pod and one adding a pod here:\n"
            );
            let _ = writeln!(md, "| pods | local | identities | first sync | RSS after the list | events | applied in | RSS after them | peak RSS |");
            let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            for k in &c.kube {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} → {} | {:.0} ms | {:.1} MiB | {} | {:.0} ms | {:.1} MiB | {:.1} MiB |",
                    k.pods, k.local_pods, k.identities, k.identities_after, k.first_sync_ms,
                    k.rss_listed_mib, k.events, k.events_ms, k.rss_watched_mib, k.hwm_mib
                );
            }
            md.push('\n');
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
                let _ = writeln!(md, "![per packet]({charts}packet.png)\n");
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

fn datapath_md(md: &mut String, d: &Datapath, plan: &Plan, charts: &str) {
    let _ = writeln!(md, "## Datapath\n");
    let _ = writeln!(
        md,
        "The flow's allowing rule comes last after N − 1 rules with other peers and ports. At each N, \
         {} rounds in which `none` and every enforcer measure each metric once, side by side (the order \
         turned every other round). Each figure: the median of the enforcer's runs, then the mean of its \
         ratios to the `none` run of the same round with the 95 % bootstrap interval over the rounds \
         (latency: µs added). \"denied\": attempts of a flow no rule allows (x/flood → the server, TCP 80) \
         made while the loads ran, and how many connected. Request/response client and server pinned to \
         CPU {}. Loads of {:.0} s.\n",
        plan.rounds, d.pinned_cpu, plan.seconds
    );
    if !d.repeated.is_empty() {
        let _ = writeln!(
            md,
            "An interval at N = {} was too wide to judge a target: {} more rounds of `none` and netpol were run, \
             and the figures include them.\n",
            d.repeated.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", "),
            plan.rounds
        );
    }
    for pair in &plan.pairs {
        let _ = writeln!(md, "### {}\n", pair.name());
        let _ = write!(md, "| enforcer | N |");
        for m in &METRICS {
            let _ = write!(md, " {} ({}) |", m.label, m.unit);
        }
        let _ = writeln!(
            md,
            " denied |\n|---|---:|{}---:|",
            "---:|".repeat(METRICS.len())
        );
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
            md.push_str(" – |\n");
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
                        let [lo, hi] = c.added_us_ci.unwrap_or([f64::NAN; 2]);
                        let _ = write!(
                            md,
                            " {} (+{} [{}, {}]) |",
                            fmt_value(c.value.median),
                            fmt_value(c.added_us.unwrap_or(f64::NAN)),
                            fmt_value(lo),
                            fmt_value(hi)
                        );
                    }
                    Some(c) => {
                        let _ = write!(
                            md,
                            " {} ({:.2}× [{:.2}, {:.2}]) |",
                            fmt_value(c.value.median),
                            c.ratio,
                            c.ratio_ci[0],
                            c.ratio_ci[1]
                        );
                    }
                    None => md.push_str(" – |"),
                }
            }
            match v.denied {
                Some(x) if x.connected > 0 => {
                    let _ = writeln!(
                        md,
                        " **{} of {} connected: not enforced** |",
                        x.connected, x.attempts
                    );
                }
                Some(x) => {
                    let _ = writeln!(md, " 0 of {} |", x.attempts);
                }
                None => md.push_str(" – |\n"),
            }
        }
        md.push('\n');
        let chart = format!("{charts}datapath-{}.png", pair.name());
        let _ = writeln!(md, "![cost against N, {}]({chart})\n", pair.name());
    }
    program_costs_md(md, d, plan);
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

/// netpol's programs per packet under each load (`bpf_stats`), per pair.
fn program_costs_md(md: &mut String, d: &Datapath, plan: &Plan) {
    const PROGRAMS: [&str; 3] = ["from_pod", "to_pod", "to_remote"];
    if d.variants.iter().all(|v| v.program_ns.is_empty()) {
        return;
    }
    let _ = writeln!(
        md,
        "netpol's classifier per packet under each load, as the kernel counts it \
         (`bpf_stats`, ns per program run, both nodes; one extra run of each load with the \
         statistics on, kept out of the figures above):\n"
    );
    for pair in &plan.pairs {
        let _ = writeln!(md, "#### {}, ns per packet\n", pair.name());
        let _ = writeln!(md, "| N | load | {} |", PROGRAMS.join(" | "));
        let _ = writeln!(md, "|---:|---|{}", "---:|".repeat(PROGRAMS.len()));
        for v in &d.variants {
            let Some(loads) = v.program_ns.get(pair) else {
                continue;
            };
            let n = format!("{}{}", v.rules, if v.flood { " + flood" } else { "" });
            for (load, ns) in loads {
                let cells: Vec<String> = PROGRAMS
                    .iter()
                    .map(|p| ns.get(*p).map_or("–".into(), |x| format!("{x:.0}")))
                    .collect();
                let _ = writeln!(md, "| {n} | {load} | {} |", cells.join(" | "));
            }
        }
        md.push('\n');
    }
}

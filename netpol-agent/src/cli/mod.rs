//! Command-line entry points: kubectl-style flags, `-o json|yaml|table`, exit codes
//! scripts can trust (0 ok, 1 failure, 2 usage).

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;

use crate::agent::{AgentOptions, SourceSpec};
use crate::datapath::{Capacities, Switches};
use crate::events::{human, Verdict};

mod args;

pub use args::*;

/// Prints `value` as `-o json|yaml|table` asks (`table` from the closure).
pub fn print<T: serde::Serialize>(
    value: &T,
    output: Output,
    table: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(value)?),
        Output::Table => print!("{}", table()),
    }
    Ok(())
}

/// The agent to talk to: a lab's (`--lab NAME`) or the one at `--socket`.
fn agent_socket(lab: &Option<String>, socket: &std::path::Path) -> PathBuf {
    match lab {
        Some(name) => crate::api::lab_agent_socket(name),
        None => socket.to_path_buf(),
    }
}

/// Runs a command; the returned number is the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Agent(a) => {
            let a = *a;
            let node = match a.node {
                Some(n) => n,
                None => std::fs::read_to_string("/etc/hostname")
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            };
            let Some(source) = a.source.or_else(SourceSpec::default_from_env) else {
                eprintln!("error: --source is required outside a pod: kube or dir:PATH");
                return Ok(2);
            };
            let opts = AgentOptions {
                source,
                metrics_addr: a.metrics_addr.0,
                max_staleness: a.max_staleness,
                metrics_max_series: a.metrics_max_series,
                pod_start_hold: !a.no_pod_start_hold,
                node,
                bridge: a.bridge,
                api_socket: a.api_socket,
                service_hooks: a.service_hooks,
                local_cgroup: match a.cgroup {
                    Some(p) if p.as_os_str() == "off" => None,
                    Some(p) => Some(p),
                    // None found: the usual place, whose attach then fails (and the
                    // egress to VIPs fails closed) with an error that names it.
                    None => Some(
                        crate::datapath::local_in::cgroup2_mount()
                            .unwrap_or_else(|| "/sys/fs/cgroup".into()),
                    ),
                },
                capacities: Capacities {
                    endpoints: a.endpoints_capacity,
                    ipcache: a.ipcache_capacity,
                    cidrs: a.cidrs_capacity,
                    policy: a.policy_capacity,
                    conntrack: a.conntrack_capacity,
                    fragments: a.fragments_capacity,
                },
                switches: Switches {
                    allow_host: !a.deny_host_traffic,
                    audit: a.audit,
                    keep_established: a.keep_established,
                    event_rate: a.event_rate,
                    event_burst: a.event_burst,
                    sample_allows: a.sample_allows,
                    ct_tcp_syn_timeout: a.ct_tcp_syn_timeout,
                    ct_tcp_established_timeout: a.ct_tcp_established_timeout,
                    ct_tcp_close_timeout: a.ct_tcp_close_timeout,
                    ct_udp_timeout: a.ct_udp_timeout,
                    ct_icmp_timeout: a.ct_icmp_timeout,
                    ct_share: a
                        .conntrack_share
                        .unwrap_or(crate::datapath::default_ct_share(a.conntrack_capacity)),
                    frag_share: a
                        .fragments_share
                        .unwrap_or(crate::datapath::default_ct_share(a.fragments_capacity)),
                },
                pin_root: a.pin_root,
                pin_version: a.pin_version,
            };
            tokio::runtime::Runtime::new()?.block_on(crate::agent::run(opts))?;
            Ok(0)
        }
        Command::Observe(o) => observe(o),
        Command::Counters(c) => {
            let socket = agent_socket(&c.lab, &c.socket);
            let counters =
                tokio::runtime::Runtime::new()?.block_on(crate::api::client::counters(&socket))?;
            print(&counters, c.output, || {
                let mut t = format!(
                    "{:<8} {:<8} {:<18} {:>12}\n",
                    "VERDICT", "DIR", "REASON", "PACKETS"
                );
                for p in &counters.packets {
                    t.push_str(&format!(
                        "{:<8} {:<8} {:<18} {:>12}\n",
                        p.verdict.name(),
                        p.direction.name(),
                        p.reason.name(),
                        p.packets
                    ));
                }
                let e = &counters.events;
                t.push_str(&format!(
                    "events: {} sent, {} rate-limited, {} lost (ring full)\n",
                    e.sent, e.rate_limited, e.ring_full
                ));
                if e.conntrack_share_full != 0 {
                    t.push_str(&format!(
                        "conntrack: {} new connections untracked (their pod held its whole share)\n",
                        e.conntrack_share_full
                    ));
                }
                t
            })?;
            Ok(0)
        }
        Command::Status(c) => {
            let socket = agent_socket(&c.lab, &c.socket);
            let rt = tokio::runtime::Runtime::new()?;
            let agent = rt.block_on(crate::api::client::status(&socket))?;
            let tally = rt.block_on(crate::api::client::tally(&socket))?;
            let both = serde_json::json!({ "agent": agent, "tally": tally });
            print(&both, c.output, || status_table(&agent, &tally))?;
            Ok(0)
        }
        Command::Simulate(s) => {
            let protocol = netpol_engine::index::policy::parse_protocol(&s.protocol.to_uppercase())
                .with_context(|| format!("--protocol {}: expected TCP, UDP or SCTP", s.protocol))?;
            let report = netpol_engine::simulate::simulate(
                &s.manifests,
                protocol,
                s.port,
                s.from.as_deref(),
                s.to.as_deref(),
            )?;
            for inv in &report.invalid {
                eprintln!(
                    "warning: {} {}/{} rejected: {}",
                    inv.kind, inv.namespace, inv.name, inv.error
                );
            }
            print(&report, s.output, || report.table())?;
            Ok(0)
        }
        Command::Explain(e) => match explain(&e) {
            Ok(x) => {
                print(&x, e.output, || x.human())?;
                // Scripts can branch on the verdict: 0 allowed, 1 denied.
                Ok(if x.allowed { 0 } else { 1 })
            }
            Err(err) => {
                // Not judged at all (bad input, no agent): neither 0 nor 1.
                eprintln!("error: {err:#}");
                Ok(2)
            }
        },
        Command::Lint(l) => {
            let objects = match l.input.read() {
                Ok(o) => o,
                Err(code) => return Ok(code),
            };
            let report = netpol_engine::lint::lint(objects);
            print(&report, l.output, || report.table())?;
            // 0: no errors (warnings pass unless --strict), 1: errors, 2: unreadable input.
            Ok(report.exit_code(l.strict))
        }
        Command::Graph(g) => {
            let objects = match g.input.read() {
                Ok(o) => o,
                Err(code) => return Ok(code),
            };
            let graph = netpol_engine::graph::graph(
                objects,
                &netpol_engine::graph::Options {
                    ports: g.ports,
                    open_flows: g.open_flows,
                },
            );
            match g.output {
                GraphOutput::Svg => print!("{}", graph.svg()),
                GraphOutput::Dot => print!("{}", graph.dot()),
                GraphOutput::Json => print(&graph, Output::Json, String::new)?,
                GraphOutput::Yaml => print(&graph, Output::Yaml, String::new)?,
            }
            Ok(0)
        }
        Command::Lab { args } => plugin("lab", &args),
        Command::External(args) => match args.split_first() {
            Some((name, rest)) => plugin(&name.to_string_lossy(), rest),
            None => Ok(2),
        },
    }
}

/// Replaces this process with `netpol-NAME ARGS`: the binary beside this one first (a
/// build directory, an unpacked release), then the PATH. Only returns on failure.
fn plugin(name: &str, args: &[OsString]) -> anyhow::Result<i32> {
    use std::os::unix::process::CommandExt;
    let file = format!("netpol-{name}");
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(&file)))
        .filter(|p| p.is_file());
    let program = beside.unwrap_or_else(|| PathBuf::from(&file));
    let err = std::process::Command::new(&program).args(args).exec();
    if err.kind() == std::io::ErrorKind::NotFound {
        eprintln!(
            "error: netpol {name}: {file} is neither beside {} nor on the PATH{}",
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            if name == "lab" {
                " (it is built with the tests: cargo build -p netpol-tests)"
            } else {
                ""
            }
        );
        return Ok(2);
    }
    Err(anyhow::anyhow!("running {}: {err}", program.display()))
}

/// `netpol explain`: offline from `--manifests`, else by the agent on its live maps.
fn explain(e: &ExplainArgs) -> anyhow::Result<netpol_engine::explain::Explanation> {
    let (protocol, port) = parse_port(&e.port).map_err(|m| anyhow::anyhow!("--port {m}"))?;
    if !e.manifests.is_empty() {
        let q = netpol_engine::explain::Question {
            from: &e.from,
            to: &e.to,
            protocol,
            port,
        };
        return Ok(netpol_engine::explain::explain(&e.manifests, &q)?);
    }
    let req = crate::api::Request::Explain {
        from: e.from.clone(),
        to: e.to.clone(),
        port,
        protocol: netpol_engine::index::policy::protocol_name(protocol).into(),
    };
    let socket = agent_socket(&e.lab, &e.socket);
    tokio::runtime::Runtime::new()?.block_on(crate::api::client::explain(&socket, &req))
}

fn observe(o: ObserveArgs) -> anyhow::Result<i32> {
    let socket = agent_socket(&o.lab, &o.socket);
    let on_side = |v: &Verdict, f: &dyn Fn(&str) -> bool| f(&v.src) || f(&v.dst);
    let keep = |v: &Verdict| {
        o.namespace
            .as_ref()
            .is_none_or(|ns| on_side(v, &|p| p.split_once('/').is_some_and(|(n, _)| n == ns)))
            && o.pod.as_ref().is_none_or(|pod| on_side(v, &|p| p == pod))
            && o.verdict.is_none_or(|x| v.verdict == x)
            && o.direction.is_none_or(|x| v.direction == x)
            && o.port.is_none_or(|x| v.dport == x)
            && o.protocol
                .as_ref()
                .is_none_or(|x| v.protocol.eq_ignore_ascii_case(x))
            && o.reason.is_none_or(|x| v.reason == x)
    };
    let mut seen = 0usize;
    tokio::runtime::Runtime::new()?.block_on(crate::api::client::observe(&socket, |line| {
        if let Ok(v) = serde_json::from_str::<Verdict>(line) {
            if !keep(&v) {
                return true;
            }
            match o.output {
                Output::Json => println!("{}", serde_json::to_string(&v).unwrap_or_default()),
                Output::Yaml => print!("---\n{}", serde_yaml::to_string(&v).unwrap_or_default()),
                Output::Table => println!("{}", human(&v)),
            }
            seen += 1;
        } else if let Ok(note) = serde_json::from_str::<serde_json::Value>(line) {
            // Notes go to stderr, so that stdout holds verdicts only.
            if let Some(node) = note.get("observing") {
                eprintln!(
                    "observing the agent of node {}",
                    node.as_str().unwrap_or("?")
                );
            }
            if let Some(n) = note.get("lost") {
                eprintln!(
                    "... {n} more verdicts were not delivered to this observer (it fell behind)"
                );
            }
            if let Some(n) = note.get("rate_limited") {
                eprintln!(
                    "... {n} more like this: events over a pod's --event-rate, suppressed in \
                     the kernel (all pods of the node; `netpol counters` has the exact counts)"
                );
            }
        }
        o.count.is_none_or(|c| seen < c)
    }))?;
    Ok(0)
}

/// `netpol status` as a person reads it.
fn status_table(agent: &crate::api::Status, tally: &crate::events::TallyReport) -> String {
    let mut t = format!(
        "node {}: {} endpoints, {} policies, {} identities, {} policy entries, {}\n",
        agent.node,
        agent.endpoints,
        agent.policies,
        agent.identities,
        agent.policy_entries,
        if agent.converged {
            "converged"
        } else {
            "converging"
        }
    );
    for i in &agent.invalid {
        t.push_str(&format!("invalid: {i:?}\n"));
    }
    for c in &agent.conflicts {
        t.push_str(&format!(
            "held for an address conflict: {} ({}): {}\n",
            c.port,
            c.pods.join(", "),
            c.why
        ));
    }
    if !agent.verified_instructions.is_empty() {
        let programs: Vec<String> = agent
            .verified_instructions
            .iter()
            .map(|(p, n)| format!("{p} {n}"))
            .collect();
        t.push_str(&format!("verified instructions: {}\n", programs.join(", ")));
    }
    let costs: Vec<String> = agent
        .program_runs
        .iter()
        .filter_map(|(p, r)| Some(format!("{p} {:.0} ns ({} runs)", r.ns_per_run()?, r.runs)))
        .collect();
    if !costs.is_empty() {
        t.push_str(&format!(
            "cost per packet (bpf_stats): {}\n",
            costs.join(", ")
        ));
    }
    t.push_str(&format!(
        "\n{:<40} {:<8} {:>4} {:>12} {:>14}\n",
        "ALLOWED BY POLICY", "DIR", "RULE", "PACKETS", "BYTES"
    ));
    for r in &tally.rules {
        t.push_str(&format!(
            "{:<40} {:<8} {:>4} {:>12} {:>14}\n",
            r.policy, r.direction, r.rule, r.packets, r.bytes
        ));
    }
    t.push_str(&format!(
        "\n{:<16} {:<8} {:<8} {:>12} {:>14}  {}\n",
        "NAMESPACE", "DIR", "VERDICT", "PACKETS", "BYTES", "ISOLATING POLICIES"
    ));
    for d in &tally.drops {
        t.push_str(&format!(
            "{:<16} {:<8} {:<8} {:>12} {:>14}  {}\n",
            d.namespace,
            d.direction,
            d.verdict,
            d.packets,
            d.bytes,
            if d.policies.is_empty() {
                "(none)".to_string()
            } else {
                d.policies.join(",")
            }
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::args::{parse_code, parse_protocol_filter};
    use super::*;
    use clap::Parser;
    use netpol_common::codes::{self, Direction, Reason};
    use std::time::Duration;

    #[test]
    fn durations_read_like_kubectl_and_reject_nonsense() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("6h"), Ok(Duration::from_secs(21600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in ["", "s", "1x", "-1s", "0s", "ms"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn observe_filters_take_names_as_printed_in_any_case() {
        assert_eq!(parse_protocol_filter("icmpv6").as_deref(), Ok("ICMPv6"));
        assert_eq!(parse_protocol_filter("17").as_deref(), Ok("UDP"));
        assert!(parse_protocol_filter("quic").is_err());
        assert_eq!(
            parse_code::<Reason>("admin_denied"),
            Ok(Reason::AdminDenied)
        );
        assert!(parse_code::<Reason>("UNKNOWN").is_err());
        let cli = Cli::try_parse_from([
            "netpol",
            "observe",
            "--verdict",
            "AUDIT",
            "--direction",
            "Egress",
            "-n",
            "x",
        ])
        .unwrap();
        let Command::Observe(o) = cli.command else {
            panic!("observe")
        };
        assert_eq!(
            (o.verdict, o.direction),
            (Some(codes::Verdict::Audit), Some(Direction::Egress))
        );
        assert!(Cli::try_parse_from(["netpol", "observe", "--verdict", "denied"]).is_err());
        // Live explain unless manifests are given; not both.
        assert!(Cli::try_parse_from([
            "netpol",
            "explain",
            "--lab",
            "l",
            "--manifests",
            "m",
            "--from",
            "a/b",
            "--to",
            "c/d",
            "--port",
            "80"
        ])
        .is_err());
    }

    #[test]
    fn agent_flags_default_to_the_documented_datapath() {
        let cli = Cli::try_parse_from(["netpol", "agent", "--source", "dir:/x"]).unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("agent")
        };
        assert!(!a.keep_established && !a.audit && !a.deny_host_traffic);
        assert_eq!(
            (a.event_rate, a.event_burst, a.sample_allows),
            (100, 200, 0)
        );
        assert_eq!(a.ct_tcp_established_timeout, Duration::from_secs(6 * 3600));
        let cli = Cli::try_parse_from([
            "netpol",
            "agent",
            "--source",
            "dir:/x",
            "--keep-established",
            "--ct-udp-timeout=2m",
            "--event-rate=0",
        ])
        .unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("agent")
        };
        assert!(a.keep_established);
        assert_eq!(a.ct_udp_timeout, Duration::from_secs(120));
        assert_eq!(a.event_rate, 0);
    }
}

//! `netpol-lab`: a Flannel-like lab of network namespaces to try, test and benchmark
//! netpol on one machine. `netpol lab ...` runs this binary (found beside `netpol` or on
//! the PATH, the way `git` finds `git-foo`); it ships with the tests, not in the image.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use netpol_agent::agent::SourceSpec;
use netpol_agent::cli::{print, Output};
use netpol_tests::lab;

#[derive(Parser)]
#[command(
    name = "netpol lab",
    bin_name = "netpol lab",
    version,
    about = "A Flannel-like lab of network namespaces to try netpol on"
)]
struct Cli {
    #[command(subcommand)]
    command: LabCommand,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NETPOL_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Logs often go to a file (the lab's agent and supervisor logs): no colours there.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match lab_command(cli.command) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

#[derive(Subcommand)]
enum LabCommand {
    /// Create the lab from a directory of manifests and start the agent on it.
    Up(LabUpArgs),
    /// Remove everything the lab created.
    Down(LabName),
    /// The lab's nodes and pods.
    Status(LabStatusArgs),
    /// Wait until the datapath enforces what the manifest directory holds now.
    Wait(LabWaitArgs),
    /// Run a command inside a pod's network namespace.
    Exec(LabExecArgs),
    /// Connect from pods to pods and report connected, refused or timeout.
    Probe(LabProbeArgs),
    /// Look a name up from inside a pod, through its resolver (cluster DNS).
    Resolve(LabResolveArgs),
    /// Traffic from one pod to another: throughput (stream, iperf3), request/response
    /// rate and latency (rr), connection rate (crr); or from here to --address.
    Load(LabLoadArgs),
    #[command(hide = true)]
    Run(LabUpArgs),
    #[command(hide = true)]
    Serve(LabServeArgs),
    /// The iptables enforcer of a node (`lab up --enforcer iptables` runs it).
    #[command(hide = true)]
    IptablesAgent(RulesAgentArgs),
    /// The nftables enforcer of a node (`lab up --enforcer nftables` runs it).
    #[command(hide = true)]
    NftablesAgent(RulesAgentArgs),
}

/// The rule-based enforcers' agents (iptables, nftables).
#[derive(Args)]
struct RulesAgentArgs {
    /// dir:PATH[,PATH...], as the agent's.
    #[arg(long)]
    source: SourceSpec,
    #[arg(long)]
    node: String,
    #[arg(long)]
    api_socket: PathBuf,
}

impl RulesAgentArgs {
    fn options(self, enforcer: &str) -> anyhow::Result<lab::fullsync::AgentOptions> {
        let SourceSpec::Dir(source) = self.source else {
            anyhow::bail!("--source: the {enforcer} enforcer reads dir:PATH only");
        };
        Ok(lab::fullsync::AgentOptions {
            source,
            node: self.node,
            api_socket: self.api_socket,
        })
    }
}

#[derive(Args)]
struct LabName {
    #[arg(long, default_value = "netpol")]
    name: String,
}

#[derive(Args)]
struct LabUpArgs {
    #[arg(long, default_value = "netpol")]
    name: String,
    #[arg(long)]
    manifests: PathBuf,
    #[arg(long, default_value = "10.244.0.0/24")]
    pod_cidr: String,
    /// A flag for the lab's agent (repeat for several), e.g. --agent-arg=--keep-established.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Lab nodes, joined by a VXLAN overlay (flannel.1) over a lab underlay; node n has
    /// the nth pod CIDR from --pod-cidr (10.244.n.0/24).
    #[arg(long, default_value_t = 1)]
    nodes: u32,
    /// Cluster DNS: kube-system/coredns (k8s-app: kube-dns) behind the kube-dns Service
    /// (10.96.0.10), every pod's resolver.
    #[arg(long)]
    dns: bool,
    /// Dual-stack pods (fd00::<pod IPv4>, a /120 per node). Always on: accepted so the
    /// issue's command lines work.
    #[arg(long)]
    ipv6: bool,
    /// What enforces policy: netpol (its agent), iptables (ipsets and per-pod chains in
    /// kube-router's layout), nftables (one set lookup per rule set, as
    /// kube-network-policies) or none; the benchmarks compare them.
    #[arg(long, default_value = "netpol")]
    enforcer: lab::Enforcer,
}

#[derive(Args)]
struct LabStatusArgs {
    #[arg(long, default_value = "netpol")]
    name: String,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Args)]
struct LabWaitArgs {
    #[arg(long, default_value = "netpol")]
    name: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(Args)]
struct LabExecArgs {
    #[arg(long, default_value = "netpol")]
    name: String,
    /// namespace/pod
    pod: String,
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Args)]
struct LabProbeArgs {
    #[arg(long, default_value = "netpol")]
    name: String,
    #[arg(long)]
    from: Option<String>,
    #[arg(long)]
    to: Option<String>,
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "TCP")]
    protocol: String,
    /// Probe the pods' IPv4 (4) or IPv6 (6) addresses.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(4..=6))]
    family: u8,
    /// Address the target pod directly, through the ClusterIP of a Service selecting it
    /// (its own, per-pod Service first), or through that Service's DNS name.
    #[arg(long, value_enum, default_value = "pod")]
    via: ProbeVia,
    /// Probe a Service (namespace/name) on --port instead of pods.
    #[arg(long, conflicts_with = "to")]
    service: Option<String>,
    /// Probes per pair (a Service picks a backend at random for each).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Seconds before a connection attempt counts as a timeout.
    #[arg(long, default_value_t = 1.0)]
    timeout: f64,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProbeVia {
    Pod,
    Service,
    Dns,
}

#[derive(Args)]
struct LabServeArgs {
    #[arg(long, value_delimiter = ',')]
    tcp: Vec<u16>,
    #[arg(long, value_delimiter = ',')]
    udp: Vec<u16>,
    /// The pod's name, sent in the TCP greeting.
    #[arg(long)]
    who: Option<String>,
    /// Serve DNS on port 53 from this records file.
    #[arg(long)]
    dns: Option<PathBuf>,
}

#[derive(Args)]
struct LabLoadArgs {
    #[arg(long, default_value = "netpol")]
    name: String,
    /// The client pod (namespace/name).
    #[arg(long, required_unless_present = "address", requires = "to")]
    from: Option<String>,
    /// The server pod (namespace/name).
    #[arg(long, requires = "from")]
    to: Option<String>,
    /// Instead of lab pods: from here (this network namespace, e.g. a cluster pod's) to
    /// IP[:PORT], where `netpol-lab serve` and `iperf3 -s` already listen.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    address: Option<String>,
    #[arg(long, value_enum)]
    kind: LoadKindArg,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Port: stream/udp 5201 (iperf3's), rr/crr 80 (a port the target pod declares).
    #[arg(long)]
    port: Option<u16>,
    /// Parallel iperf3 streams (stream, udp).
    #[arg(long, default_value_t = 1)]
    streams: u32,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LoadKindArg {
    Stream,
    Rr,
    Crr,
    Udp,
}

#[derive(Args)]
struct LabResolveArgs {
    #[arg(long, default_value = "netpol")]
    name: String,
    /// The pod (namespace/name) whose resolver is asked.
    #[arg(long)]
    from: String,
    /// The name to look up (e.g. web.x.svc.cluster.local).
    query: String,
    /// Ask over TCP instead of UDP.
    #[arg(long)]
    tcp: bool,
    /// AAAA instead of A.
    #[arg(long)]
    ipv6: bool,
    #[arg(long, default_value_t = 2.0)]
    timeout: f64,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

/// The `netpol` the lab runs as its agent and pod servers: the one beside this binary
/// (a build directory), else the PATH's. Its `netpol lab ...` comes back here.
fn netpol_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("netpol")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("netpol"))
}

fn lab_up_options(a: &LabUpArgs) -> anyhow::Result<lab::UpOptions> {
    Ok(lab::UpOptions {
        name: a.name.clone(),
        manifests: a
            .manifests
            .canonicalize()
            .with_context(|| format!("manifest directory {}", a.manifests.display()))?,
        pod_cidr: a.pod_cidr.clone(),
        netpol_bin: netpol_bin(),
        lab_bin: std::env::current_exe().context("finding netpol-lab's own executable")?,
        agent_args: a.agent_args.clone(),
        nodes: a.nodes,
        dns: a.dns,
        enforcer: a.enforcer,
    })
}

fn lab_command(cmd: LabCommand) -> anyhow::Result<i32> {
    match cmd {
        LabCommand::Up(a) => {
            lab::up(&lab_up_options(&a)?)?;
            eprintln!(
                "lab {} is up; try: netpol lab probe --name {} --port 80",
                a.name, a.name
            );
            Ok(0)
        }
        LabCommand::Run(a) => {
            lab::run_supervisor(&lab_up_options(&a)?)?;
            Ok(0)
        }
        LabCommand::Down(n) => {
            lab::down(&n.name)?;
            Ok(0)
        }
        LabCommand::Status(s) => {
            let st = lab::status(&s.name)?;
            print(&st, s.output, || {
                let mut t = format!("{:<24} {:<8} {:<16} {}\n", "POD", "NODE", "IP", "VETH");
                for p in &st.pods {
                    t.push_str(&format!(
                        "{:<24} {:<8} {:<16} {}\n",
                        format!("{}/{}", p.namespace, p.name),
                        p.node,
                        p.ips.join(","),
                        p.veth
                    ));
                }
                t
            })?;
            Ok(0)
        }
        LabCommand::Wait(w) => {
            lab::wait(&w.name, Duration::from_secs(w.timeout))?;
            Ok(0)
        }
        LabCommand::Exec(e) => lab::exec(&e.name, &e.pod, &e.command),
        LabCommand::Probe(p) => {
            let protocol = match p.protocol.to_ascii_uppercase().as_str() {
                "TCP" => lab::Protocol::Tcp,
                "UDP" => lab::Protocol::Udp,
                "ICMP" => lab::Protocol::Icmp,
                other => anyhow::bail!("--protocol {other}: the lab probes TCP, UDP or ICMP"),
            };
            let report = lab::probe(
                &p.name,
                &lab::ProbeOptions {
                    from: p.from.as_deref(),
                    to: p.to.as_deref(),
                    service: p.service.as_deref(),
                    port: p.port,
                    protocol,
                    ipv6: p.family == 6,
                    timeout: Duration::from_secs_f64(p.timeout),
                    via: match p.via {
                        ProbeVia::Pod => lab::Via::Pod,
                        ProbeVia::Service => lab::Via::Service,
                        ProbeVia::Dns => lab::Via::Dns,
                    },
                    repeat: p.repeat,
                },
            )?;
            print(&report, p.output, || report.table())?;
            Ok(0)
        }
        LabCommand::IptablesAgent(a) => {
            lab::iptables::run_agent(a.options("iptables")?)?;
            Ok(0)
        }
        LabCommand::NftablesAgent(a) => {
            lab::nftables::run_agent(a.options("nftables")?)?;
            Ok(0)
        }
        LabCommand::Serve(s) => {
            lab::serve(&s.tcp, &s.udp, s.who.as_deref(), s.dns.as_deref())?;
            Ok(0)
        }
        LabCommand::Load(l) => {
            let kind = match l.kind {
                LoadKindArg::Stream => lab::LoadKind::Stream,
                LoadKindArg::Rr => lab::LoadKind::Rr,
                LoadKindArg::Crr => lab::LoadKind::Crr,
                LoadKindArg::Udp => lab::LoadKind::Udp,
            };
            let opts = lab::LoadOptions {
                port: l.port,
                streams: l.streams,
            };
            let r = match (&l.address, &l.from, &l.to) {
                (Some(address), _, _) => lab::load_address(address, kind, l.seconds, &opts)?,
                (None, Some(from), Some(to)) => {
                    lab::load_with(&l.name, from, to, kind, l.seconds, &opts)?
                }
                _ => anyhow::bail!("give --from and --to (lab pods), or --address"),
            };
            print(&r, l.output, || {
                let mut t = format!(
                    "{:?} {} -> {} ({}:{}) for {}s\n",
                    r.kind, r.from, r.to, r.address, r.port, r.seconds
                );
                if let Some(bps) = r.throughput_bps {
                    t += &format!(
                        "throughput {:.2} Gbit/s, {} retransmits\n",
                        bps / 1e9,
                        r.retransmits.unwrap_or(0)
                    );
                }
                if let Some(pps) = r.packets_per_sec {
                    t += &format!(
                        "{pps:.0} datagrams/s received, {:.1}% lost\n",
                        r.lost_percent.unwrap_or(0.0)
                    );
                }
                if let (Some(n), Some(rate)) = (r.transactions, r.transactions_per_sec) {
                    t += &format!("{n} transactions, {rate:.0}/s\n");
                }
                if let Some(l) = &r.latency {
                    t += &format!(
                        "latency p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs, max {:.0} µs\n",
                        l.p50_us, l.p90_us, l.p99_us, l.max_us
                    );
                }
                t
            })?;
            Ok(0)
        }
        LabCommand::Resolve(r) => {
            let answer = lab::resolve(
                &r.name,
                &r.from,
                &r.query,
                r.tcp,
                r.ipv6,
                Duration::from_secs_f64(r.timeout),
            )?;
            print(&answer, r.output, || {
                format!(
                    "{} {} via {} ({}): {:?} {}\n",
                    answer.from,
                    answer.query,
                    answer.server,
                    answer.transport,
                    answer.result,
                    answer
                        .addresses
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                )
            })?;
            Ok(0)
        }
    }
}

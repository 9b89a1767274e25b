//! Command-line entry points: kubectl-style flags, `-o json|yaml|table`, exit codes
//! scripts can trust (0 ok, 1 failure, 2 usage).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::agent::{AgentOptions, SourceSpec};
use crate::datapath::{Capacities, Switches};
use crate::events::{human, Verdict};
use crate::lab;

#[derive(Parser)]
#[command(
    name = "netpol",
    version,
    about = "Kubernetes NetworkPolicy enforced with eBPF"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Json,
    Yaml,
    Table,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the node agent: watch the cluster, compile policy, enforce it on local pods.
    Agent(AgentArgs),
    /// Tail verdicts from the local agent.
    Observe(ObserveArgs),
    /// The classifier's exact packet counters per verdict, reason and direction.
    Counters(CountersArgs),
    /// Print the policy verdict for every ordered pair of pods in a set of manifests.
    Simulate(SimulateArgs),
    /// Why one flow is allowed or denied, side by side, with hints for likely mistakes.
    Explain(ExplainArgs),
    /// Findings about policy objects (invalid, never applying, shadowed, likely
    /// mistakes), each with a fix; exit 1 on errors (--strict: on warnings too).
    Lint(LintArgs),
    /// The allowed-flow graph between workloads, as SVG (drawn here) or Graphviz DOT.
    Graph(GraphArgs),
    /// A Flannel-like lab node of network namespaces to try netpol on.
    #[command(subcommand)]
    Lab(LabCommand),
}

#[derive(Args)]
pub struct AgentArgs {
    /// Where cluster state comes from: kube (the API server; the default inside a pod)
    /// or dir:PATH[,PATH...] (YAML/JSON manifests, watched).
    #[arg(long)]
    pub source: Option<SourceSpec>,
    /// Where to serve Prometheus /metrics, /healthz and /readyz (HOST:PORT or :PORT;
    /// "off": nowhere).
    #[arg(long, default_value = ":9965", value_parser = parse_metrics_addr)]
    pub metrics_addr: MetricsAddr,
    /// Readiness (/readyz) drops once a watch of the kube source has been failing this
    /// long; enforcement of the last state goes on regardless.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub max_staleness: Duration,
    /// This node's name (pods with this spec.nodeName are local).
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    /// The CNI bridge local pods' veths are enslaved to.
    #[arg(long, default_value = "cni0")]
    pub bridge: String,
    #[arg(long, default_value = crate::api::DEFAULT_SOCKET)]
    pub api_socket: PathBuf,
    /// Root of pinned maps and programs in bpffs; the next agent adopts them.
    #[arg(long, default_value = crate::datapath::pin::DEFAULT_ROOT)]
    pub pin_root: PathBuf,
    /// Pin under this version instead of the build's own (upgrade tests).
    #[arg(long, hide = true)]
    pub pin_version: Option<String>,
    /// Deny traffic from the node's own addresses to isolated pods (breaks kubelet probes).
    #[arg(long)]
    pub deny_host_traffic: bool,
    /// Let a new pod's traffic pass unjudged until the agent has located it (by default
    /// it is dropped, as PENDING_ENDPOINT, from the moment its port joins the bridge).
    #[arg(long)]
    pub no_pod_start_hold: bool,
    /// Let would-be drops pass and report them as AUDIT, on the whole node.
    #[arg(long)]
    pub audit: bool,
    /// Keep established connections when a policy change no longer allows them
    /// (default: their next packet is judged again and dropped as POLICY_REVOKED).
    #[arg(long)]
    pub keep_established: bool,
    /// Events per second each pod may cause (drops, audits, sampled allows); 0: no limit.
    /// The per-reason counters stay exact whatever this limits.
    #[arg(long, default_value_t = crate::datapath::DEFAULT_EVENT_RATE)]
    pub event_rate: u32,
    /// Events a pod may cause in a burst above --event-rate.
    #[arg(long, default_value_t = crate::datapath::DEFAULT_EVENT_BURST)]
    pub event_burst: u32,
    /// Report one in N newly allowed connections as an allow event (0: none).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub sample_allows: u32,
    /// Idle timeout of a TCP connection before its reply (e.g. 60s, 2m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub ct_tcp_syn_timeout: Duration,
    /// Idle timeout of an established TCP connection.
    #[arg(long, default_value = "6h", value_parser = parse_duration)]
    pub ct_tcp_established_timeout: Duration,
    /// How long a TCP connection is kept after FINs from both sides or a RST.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub ct_tcp_close_timeout: Duration,
    /// Idle timeout of UDP, SCTP and other connections.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub ct_udp_timeout: Duration,
    /// Idle timeout of ICMP echo exchanges.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ct_icmp_timeout: Duration,
    #[arg(long, default_value_t = netpol_common::capacity::ENDPOINTS)]
    pub endpoints_capacity: u32,
    #[arg(long, default_value_t = netpol_common::capacity::IPCACHE)]
    pub ipcache_capacity: u32,
    #[arg(long, default_value_t = netpol_common::capacity::CIDRS)]
    pub cidrs_capacity: u32,
    #[arg(long, default_value_t = netpol_common::capacity::POLICY)]
    pub policy_capacity: u32,
    #[arg(long, default_value_t = netpol_common::capacity::CONNTRACK)]
    pub conntrack_capacity: u32,
    /// Datagrams whose first fragment's verdict is kept for their later fragments.
    #[arg(long, default_value_t = netpol_common::capacity::FRAGMENTS)]
    pub fragments_capacity: u32,
    /// A device DNATed packets leave the node by (repeat: e.g. flannel.1 and the
    /// uplink); egress of local pods to Service VIPs with remote backends is judged at
    /// its TC egress.
    #[arg(long = "service-hook", value_name = "DEVICE")]
    pub service_hooks: Vec<String>,
}

/// `--metrics-addr`: an address, or none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<std::net::SocketAddr>);

pub fn parse_metrics_addr(text: &str) -> Result<MetricsAddr, String> {
    if text == "off" {
        return Ok(MetricsAddr(None));
    }
    let full = match text.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => text.to_string(),
    };
    full.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|_| format!("invalid address {text:?}: expected HOST:PORT, :PORT or off"))
}

/// A duration as kubectl writes them: `500ms`, `30s`, `5m`, `6h`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?}: expected e.g. 500ms, 30s, 5m or 6h");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(bad()),
    };
    if d.is_zero() {
        return Err(format!(
            "invalid duration {text:?}: must be longer than zero"
        ));
    }
    Ok(d)
}

#[derive(Args)]
pub struct ObserveArgs {
    #[arg(long, default_value = crate::api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Observe the agent of a lab instead of the local agent.
    #[arg(long)]
    pub lab: Option<String>,
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Only verdicts that involve this pod (namespace/name).
    #[arg(long)]
    pub pod: Option<String>,
    /// dropped, audit or allowed.
    #[arg(long)]
    pub verdict: Option<String>,
    /// ingress or egress.
    #[arg(long)]
    pub direction: Option<String>,
    #[arg(long)]
    pub port: Option<u16>,
    /// Stop after this many verdicts.
    #[arg(long)]
    pub count: Option<usize>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Args)]
pub struct CountersArgs {
    #[arg(long, default_value = crate::api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Read the agent of a lab instead of the local agent.
    #[arg(long)]
    pub lab: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Args)]
pub struct SimulateArgs {
    #[arg(long, num_args = 1.., required = true)]
    pub manifests: Vec<PathBuf>,
    /// TCP, UDP or SCTP.
    #[arg(long, default_value = "TCP")]
    pub protocol: String,
    /// The destination port of every flow.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// Only flows from this pod (namespace/name).
    #[arg(long)]
    pub from: Option<String>,
    /// Only flows to this pod (namespace/name).
    #[arg(long)]
    pub to: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Args)]
pub struct ExplainArgs {
    /// Judge offline, from these manifests (files or directories).
    #[arg(long, num_args = 1.., required = true)]
    pub manifests: Vec<PathBuf>,
    /// The sender: namespace/pod or an IP.
    #[arg(long)]
    pub from: String,
    /// The receiver: namespace/pod or an IP.
    #[arg(long)]
    pub to: String,
    /// PORT/PROTOCOL, e.g. 80/TCP (the protocol defaults to TCP).
    #[arg(long)]
    pub port: String,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

/// Where `lint` and `graph` read the cluster from: manifests, or the API server once.
#[derive(Args)]
pub struct InputArgs {
    /// Manifest files or directories (YAML/JSON).
    #[arg(long, num_args = 1.., required_unless_present = "cluster", conflicts_with = "cluster")]
    pub manifests: Vec<PathBuf>,
    /// Read the cluster of the kubeconfig's current context (or the in-cluster config):
    /// one list of each resource the agent watches.
    #[arg(long)]
    pub cluster: bool,
    /// With --cluster: how long listing may take before giving up.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
}

impl InputArgs {
    pub fn input(&self) -> crate::source::Input {
        if self.cluster {
            crate::source::Input::Cluster {
                timeout: self.request_timeout,
            }
        } else {
            crate::source::Input::Manifests(self.manifests.clone())
        }
    }

    /// The objects, or exit code 2 after saying what could not be read.
    fn read(&self) -> Result<Vec<crate::source::Object>, i32> {
        crate::source::read_once(&self.input()).map_err(|e| {
            eprintln!("error: {e:#}");
            2
        })
    }
}

#[derive(Args)]
pub struct LintArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Fail (exit 1) on warnings too, not only on errors.
    #[arg(long)]
    pub strict: bool,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GraphOutput {
    Svg,
    Dot,
    Json,
    Yaml,
}

#[derive(Args)]
pub struct GraphArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// svg (a standalone picture, no external tools), dot (Graphviz), json or yaml.
    #[arg(short = 'o', long, value_enum, default_value = "svg")]
    pub output: GraphOutput,
    /// Judge every pod pair on PORT[/PROTOCOL] (repeat for more) instead of the
    /// receiving pods' container ports.
    #[arg(long = "port", value_name = "PORT[/PROTOCOL]", value_parser = parse_port)]
    pub ports: Vec<(u8, u16)>,
    /// Also draw flows no policy judges (neither end isolated).
    #[arg(long)]
    pub open_flows: bool,
}

/// `80/TCP`, `53/UDP` or `8080` (TCP).
pub fn parse_port(text: &str) -> Result<(u8, u16), String> {
    let (port, protocol) = text.split_once('/').unwrap_or((text, "TCP"));
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{text}: expected PORT/PROTOCOL, e.g. 80/TCP"))?;
    let protocol = crate::index::policy::parse_protocol(&protocol.to_uppercase())
        .ok_or_else(|| format!("{text}: the protocol is TCP, UDP or SCTP"))?;
    Ok((protocol, port))
}

#[derive(Subcommand)]
pub enum LabCommand {
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
    /// rate and latency (rr), connection rate (crr).
    Load(LabLoadArgs),
    #[command(hide = true)]
    Run(LabUpArgs),
    #[command(hide = true)]
    Serve(LabServeArgs),
}

#[derive(Args)]
pub struct LabName {
    #[arg(long, default_value = "netpol")]
    pub name: String,
}

#[derive(Args)]
pub struct LabUpArgs {
    #[arg(long, default_value = "netpol")]
    pub name: String,
    #[arg(long)]
    pub manifests: PathBuf,
    #[arg(long, default_value = "10.244.0.0/24")]
    pub pod_cidr: String,
    /// A flag for the lab's agent (repeat for several), e.g. --agent-arg=--keep-established.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
    /// Lab nodes, joined by a VXLAN overlay (flannel.1) over a lab underlay; node n has
    /// the nth pod CIDR from --pod-cidr (10.244.n.0/24).
    #[arg(long, default_value_t = 1)]
    pub nodes: u32,
    /// Cluster DNS: kube-system/coredns (k8s-app: kube-dns) behind the kube-dns Service
    /// (10.96.0.10), every pod's resolver.
    #[arg(long)]
    pub dns: bool,
    /// Dual-stack pods (fd00::<pod IPv4>, a /120 per node). Always on: accepted so the
    /// issue's command lines work.
    #[arg(long)]
    pub ipv6: bool,
}

#[derive(Args)]
pub struct LabStatusArgs {
    #[arg(long, default_value = "netpol")]
    pub name: String,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Args)]
pub struct LabWaitArgs {
    #[arg(long, default_value = "netpol")]
    pub name: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Args)]
pub struct LabExecArgs {
    #[arg(long, default_value = "netpol")]
    pub name: String,
    /// namespace/pod
    pub pod: String,
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args)]
pub struct LabProbeArgs {
    #[arg(long, default_value = "netpol")]
    pub name: String,
    #[arg(long)]
    pub from: Option<String>,
    #[arg(long)]
    pub to: Option<String>,
    #[arg(long)]
    pub port: u16,
    #[arg(long, default_value = "TCP")]
    pub protocol: String,
    /// Probe the pods' IPv4 (4) or IPv6 (6) addresses.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(4..=6))]
    pub family: u8,
    /// Address the target pod directly, through the ClusterIP of a Service selecting it
    /// (its own, per-pod Service first), or through that Service's DNS name.
    #[arg(long, value_enum, default_value = "pod")]
    pub via: ProbeVia,
    /// Probe a Service (namespace/name) on --port instead of pods.
    #[arg(long, conflicts_with = "to")]
    pub service: Option<String>,
    /// Probes per pair (a Service picks a backend at random for each).
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Seconds before a connection attempt counts as a timeout.
    #[arg(long, default_value_t = 1.0)]
    pub timeout: f64,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ProbeVia {
    Pod,
    Service,
    Dns,
}

#[derive(Args)]
pub struct LabServeArgs {
    #[arg(long, value_delimiter = ',')]
    pub tcp: Vec<u16>,
    #[arg(long, value_delimiter = ',')]
    pub udp: Vec<u16>,
    /// The pod's name, sent in the TCP greeting.
    #[arg(long)]
    pub who: Option<String>,
    /// Serve DNS on port 53 from this records file.
    #[arg(long)]
    pub dns: Option<PathBuf>,
}

#[derive(Args)]
pub struct LabLoadArgs {
    #[arg(long, default_value = "netpol")]
    pub name: String,
    /// The client pod (namespace/name).
    #[arg(long)]
    pub from: String,
    /// The server pod (namespace/name).
    #[arg(long)]
    pub to: String,
    #[arg(long, value_enum)]
    pub kind: LoadKindArg,
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Port: stream 5201 (iperf3's), rr/crr 80 (a port the target pod declares).
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LoadKindArg {
    Stream,
    Rr,
    Crr,
}

#[derive(Args)]
pub struct LabResolveArgs {
    #[arg(long, default_value = "netpol")]
    pub name: String,
    /// The pod (namespace/name) whose resolver is asked.
    #[arg(long)]
    pub from: String,
    /// The name to look up (e.g. web.x.svc.cluster.local).
    pub query: String,
    /// Ask over TCP instead of UDP.
    #[arg(long)]
    pub tcp: bool,
    /// AAAA instead of A.
    #[arg(long)]
    pub ipv6: bool,
    #[arg(long, default_value_t = 2.0)]
    pub timeout: f64,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

fn print<T: serde::Serialize>(
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

fn lab_up_options(a: &LabUpArgs) -> anyhow::Result<lab::UpOptions> {
    Ok(lab::UpOptions {
        name: a.name.clone(),
        manifests: a
            .manifests
            .canonicalize()
            .with_context(|| format!("manifest directory {}", a.manifests.display()))?,
        pod_cidr: a.pod_cidr.clone(),
        netpol_bin: std::env::current_exe()?,
        agent_args: a.agent_args.clone(),
        nodes: a.nodes,
        dns: a.dns,
    })
}

/// Runs a command; the returned number is the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Agent(a) => {
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
                pod_start_hold: !a.no_pod_start_hold,
                node,
                bridge: a.bridge,
                api_socket: a.api_socket,
                service_hooks: a.service_hooks,
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
                },
                pin_root: a.pin_root,
                pin_version: a.pin_version,
            };
            tokio::runtime::Runtime::new()?.block_on(crate::agent::run(opts))?;
            Ok(0)
        }
        Command::Observe(o) => observe(o),
        Command::Counters(c) => {
            let socket = match &c.lab {
                Some(name) => PathBuf::from(format!("/run/netpol/lab/{name}/agent.sock")),
                None => c.socket.clone(),
            };
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
                        match p.verdict {
                            netpol_common::verdict::ALLOWED => "allowed",
                            netpol_common::verdict::AUDIT => "audit",
                            _ => "dropped",
                        },
                        if p.direction == netpol_common::direction::EGRESS {
                            "egress"
                        } else {
                            "ingress"
                        },
                        p.reason,
                        p.packets
                    ));
                }
                let e = &counters.events;
                t.push_str(&format!(
                    "events: {} sent, {} rate-limited, {} lost (ring full)\n",
                    e.sent, e.rate_limited, e.ring_full
                ));
                t
            })?;
            Ok(0)
        }
        Command::Simulate(s) => {
            let protocol = crate::index::policy::parse_protocol(&s.protocol.to_uppercase())
                .with_context(|| format!("--protocol {}: expected TCP, UDP or SCTP", s.protocol))?;
            let report = crate::simulate::simulate(
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
        Command::Explain(e) => {
            let (protocol, port) =
                parse_port(&e.port).map_err(|m| anyhow::anyhow!("--port {m}"))?;
            let x = crate::explain::explain(&e.manifests, &e.from, &e.to, protocol, port)?;
            print(&x, e.output, || x.human())?;
            // Scripts can branch on the verdict: 0 allowed, 1 denied.
            Ok(if x.allowed { 0 } else { 1 })
        }
        Command::Lint(l) => {
            let objects = match l.input.read() {
                Ok(o) => o,
                Err(code) => return Ok(code),
            };
            let report = crate::lint::lint(objects);
            print(&report, l.output, || report.table())?;
            // 0: no errors (warnings pass unless --strict), 1: errors, 2: unreadable input.
            Ok(report.exit_code(l.strict))
        }
        Command::Graph(g) => {
            let objects = match g.input.read() {
                Ok(o) => o,
                Err(code) => return Ok(code),
            };
            let graph = crate::graph::graph(
                objects,
                &crate::graph::Options {
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
        Command::Lab(cmd) => lab_command(cmd),
    }
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
        LabCommand::Serve(s) => {
            lab::serve(&s.tcp, &s.udp, s.who.as_deref(), s.dns.as_deref())?;
            Ok(0)
        }
        LabCommand::Load(l) => {
            let kind = match l.kind {
                LoadKindArg::Stream => lab::LoadKind::Stream,
                LoadKindArg::Rr => lab::LoadKind::Rr,
                LoadKindArg::Crr => lab::LoadKind::Crr,
            };
            let r = lab::load(&l.name, &l.from, &l.to, kind, l.seconds, l.port)?;
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

fn observe(o: ObserveArgs) -> anyhow::Result<i32> {
    let socket = match &o.lab {
        Some(name) => PathBuf::from(format!("/run/netpol/lab/{name}/agent.sock")),
        None => o.socket.clone(),
    };
    let keep = |v: &Verdict| {
        o.namespace.as_ref().is_none_or(|ns| {
            [&v.src, &v.dst]
                .iter()
                .any(|p| p.starts_with(&format!("{ns}/")))
        }) && o.pod.as_ref().is_none_or(|p| v.src == *p || v.dst == *p)
            && o.verdict.as_ref().is_none_or(|x| v.verdict == *x)
            && o.direction.as_ref().is_none_or(|x| v.direction == *x)
            && o.port.is_none_or(|x| v.dport == x)
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
        } else if let Ok(lost) = serde_json::from_str::<serde_json::Value>(line) {
            if let Some(n) = lost.get("lost") {
                eprintln!(
                    "... {n} more verdicts were not delivered to this observer (it fell behind)"
                );
            }
        }
        o.count.is_none_or(|c| seen < c)
    }))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl_and_reject_nonsense() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("6h"), Ok(Duration::from_secs(21600)));
        for bad in ["", "s", "1d", "-1s", "1.5s", "0s", "ms"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
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

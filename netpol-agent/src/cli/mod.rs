//! Command-line entry points: kubectl-style flags, `-o json|yaml|table`, exit codes
//! scripts can trust (0 ok, 1 failure, 2 usage).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::agent::{AgentOptions, SourceSpec};
use crate::datapath::{Capacities, Switches};
use crate::events::{human, Verdict};

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
    /// The agent's state and its per-policy counters: packets and bytes each rule
    /// allowed, drops per namespace and isolating policy set.
    Status(CountersArgs),
    /// Print the policy verdict for every ordered pair of pods in a set of manifests.
    Simulate(SimulateArgs),
    /// Why one flow is allowed or denied, side by side, with hints for likely mistakes
    /// (exit 0 allowed, 1 denied, 2 not judged: bad input or no agent).
    Explain(ExplainArgs),
    /// Findings about policy objects (invalid, never applying, shadowed, likely
    /// mistakes), each with a fix; exit 1 on errors (--strict: on warnings too).
    Lint(LintArgs),
    /// The allowed-flow graph between workloads, as SVG (drawn here) or Graphviz DOT.
    Graph(GraphArgs),
    /// A Flannel-like lab of network namespaces to try netpol on: runs `netpol-lab`
    /// (beside this binary or on the PATH; it ships with the tests, not in the image).
    #[command(disable_help_flag = true)]
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// `netpol foo ...` runs `netpol-foo ...`, the way git and kubectl find plugins.
    #[command(external_subcommand)]
    External(Vec<OsString>),
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
    /// At most this many series per per-policy metric (rules, isolating policy sets);
    /// the rest add up under `(other)`.
    #[arg(long, default_value_t = 500)]
    pub metrics_max_series: usize,
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

/// A duration as kubectl writes them (`500ms`, `30s`, `5m`, `6h`, `1h30m`; humantime
/// also reads `2d`), or plain seconds. Zero is refused: every use is a timeout or period.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(text).map_err(|e| {
            format!("invalid duration {text:?} ({e}): expected e.g. 500ms, 30s, 5m, 6h or 1h30m")
        })?,
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
    /// Only verdicts with a pod of this namespace on either side.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Only verdicts with this pod (namespace/name) on either side.
    #[arg(long)]
    pub pod: Option<String>,
    #[arg(long, value_enum, ignore_case = true)]
    pub verdict: Option<VerdictFilter>,
    #[arg(long, value_enum, ignore_case = true)]
    pub direction: Option<DirectionFilter>,
    /// The destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// TCP, UDP, SCTP, ICMP, ICMPv6 or a protocol number.
    #[arg(long, value_parser = parse_protocol_filter)]
    pub protocol: Option<String>,
    /// A reason as printed, e.g. POLICY_DENIED, CONNTRACK, ADMIN_DENIED (any case).
    #[arg(long, value_parser = parse_reason_filter)]
    pub reason: Option<String>,
    /// Stop after this many verdicts.
    #[arg(long)]
    pub count: Option<usize>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum VerdictFilter {
    Dropped,
    Audit,
    Allowed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DirectionFilter {
    Ingress,
    Egress,
}

/// `--protocol`: a name `observe` prints, or a number (printed as its name if known).
fn parse_protocol_filter(text: &str) -> Result<String, String> {
    use netpol_common::proto;
    let known = [
        proto::TCP,
        proto::UDP,
        proto::SCTP,
        proto::ICMP,
        proto::ICMPV6,
    ];
    if let Ok(n) = text.parse::<u8>() {
        return Ok(crate::events::protocol_name(n));
    }
    known
        .iter()
        .map(|p| crate::events::protocol_name(*p))
        .find(|name| name.eq_ignore_ascii_case(text))
        .ok_or_else(|| {
            format!("unknown protocol {text:?}: TCP, UDP, SCTP, ICMP, ICMPv6 or a number")
        })
}

/// `--reason`: one of the classifier's reason names.
fn parse_reason_filter(text: &str) -> Result<String, String> {
    use netpol_common::reason;
    let names: Vec<&str> = (0..reason::COUNT)
        .map(reason::name)
        .filter(|n| *n != "UNKNOWN")
        .collect();
    names
        .iter()
        .find(|n| n.eq_ignore_ascii_case(text))
        .map(|n| n.to_string())
        .ok_or_else(|| format!("unknown reason {text:?}: one of {}", names.join(", ")))
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
    /// Judge offline, from these manifests (files or directories); without them, the
    /// local agent judges on its live maps.
    #[arg(long, num_args = 1..)]
    pub manifests: Vec<PathBuf>,
    /// The local agent's socket (live explain).
    #[arg(long, default_value = crate::api::DEFAULT_SOCKET, conflicts_with = "manifests")]
    pub socket: PathBuf,
    /// Ask the agent of a lab instead of the local agent.
    #[arg(long, conflicts_with = "manifests")]
    pub lab: Option<String>,
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
    let protocol = netpol_engine::index::policy::parse_protocol(&protocol.to_uppercase())
        .ok_or_else(|| format!("{text}: the protocol is TCP, UDP or SCTP"))?;
    Ok((protocol, port))
}

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
        return netpol_engine::explain::explain(&e.manifests, &q);
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
            && o.verdict.is_none_or(|x| {
                v.verdict
                    == match x {
                        VerdictFilter::Dropped => "dropped",
                        VerdictFilter::Audit => "audit",
                        VerdictFilter::Allowed => "allowed",
                    }
            })
            && o.direction.is_none_or(|x| {
                v.direction
                    == match x {
                        DirectionFilter::Ingress => "ingress",
                        DirectionFilter::Egress => "egress",
                    }
            })
            && o.port.is_none_or(|x| v.dport == x)
            && o.protocol
                .as_ref()
                .is_none_or(|x| v.protocol.eq_ignore_ascii_case(x))
            && o.reason
                .as_ref()
                .is_none_or(|x| v.reason.eq_ignore_ascii_case(x))
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
            parse_reason_filter("admin_denied").as_deref(),
            Ok("ADMIN_DENIED")
        );
        assert!(parse_reason_filter("UNKNOWN").is_err());
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
            (Some(VerdictFilter::Audit), Some(DirectionFilter::Egress))
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

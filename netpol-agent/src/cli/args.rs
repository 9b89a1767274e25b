//! The command line as clap reads it: the commands, their kubectl-style flags, and the
//! parsers of flag values (durations, ports, filters) with errors that name the flag.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::agent::SourceSpec;
use netpol_common::codes::{Direction, Protocol, Reason, UnknownName, Verdict};

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
    Agent(Box<AgentArgs>),
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
    /// Conntrack entries one pod may hold; beyond it its new connections pass
    /// untracked when allowed (replies judged by policy), so that one pod cannot turn
    /// the table over for all. Default: a quarter of --conntrack-capacity; 0: no bound.
    #[arg(long)]
    pub conntrack_share: Option<u32>,
    /// Datagrams whose first fragment's verdict is kept for their later fragments.
    #[arg(long, default_value_t = netpol_common::capacity::FRAGMENTS)]
    pub fragments_capacity: u32,
    /// Datagrams of one pod whose first fragment's verdict is kept at once; beyond it
    /// the later fragments of its new datagrams drop. Default: a quarter of
    /// --fragments-capacity; 0: no bound.
    #[arg(long)]
    pub fragments_share: Option<u32>,
    /// A device DNATed packets leave the node by (repeat: e.g. flannel.1 and the
    /// uplink); egress of local pods to Service VIPs with remote backends is judged at
    /// its TC egress.
    #[arg(long = "service-hook", value_name = "DEVICE")]
    pub service_hooks: Vec<String>,
    /// The cgroup v2 directory whose tree's sockets get the hook on local delivery
    /// (egress of local pods to Services whose backend is the node itself). Until it is
    /// attached, egress of isolated pods to Services drops. `off`: no hook, such packets
    /// go unjudged. Default: the root of the first cgroup v2 mount.
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
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
    /// dropped, audit or allowed (any case).
    #[arg(long, value_parser = parse_code::<Verdict>)]
    pub verdict: Option<Verdict>,
    /// ingress or egress (any case).
    #[arg(long, value_parser = parse_code::<Direction>)]
    pub direction: Option<Direction>,
    /// The destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// TCP, UDP, SCTP, ICMP, ICMPv6 or a protocol number.
    #[arg(long, value_parser = parse_protocol_filter)]
    pub protocol: Option<String>,
    /// A reason as printed, e.g. POLICY_DENIED, CONNTRACK, ADMIN_DENIED (any case).
    #[arg(long, value_parser = parse_code::<Reason>)]
    pub reason: Option<Reason>,
    /// Stop after this many verdicts.
    #[arg(long)]
    pub count: Option<usize>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

/// `--protocol`: a name `observe` prints, or a number (printed as its name if known).
pub(super) fn parse_protocol_filter(text: &str) -> Result<String, String> {
    text.parse::<Protocol>()
        .map(|p| p.to_string())
        .map_err(|_| format!("unknown protocol {text:?}: TCP, UDP, SCTP, ICMP, ICMPv6 or a number"))
}

/// `--verdict`, `--direction`, `--reason`: a name as `observe` prints it, any case.
pub(super) fn parse_code<C: Code>(text: &str) -> Result<C, String> {
    text.parse::<C>().map_err(|e| {
        let names: Vec<&str> = C::all().iter().map(|c| c.printed()).collect();
        format!("{text:?} is {e}: one of {}", names.join(", "))
    })
}

/// What `parse_code` needs of a typed code.
pub(super) trait Code:
    Copy + Send + Sync + 'static + std::str::FromStr<Err = UnknownName>
{
    fn all() -> &'static [Self];
    fn printed(self) -> &'static str;
}

macro_rules! code {
    ($($t:ty),*) => {$(
        impl Code for $t {
            fn all() -> &'static [Self] {
                <$t>::ALL
            }
            fn printed(self) -> &'static str {
                self.name()
            }
        }
    )*};
}
code!(Verdict, Direction, Reason);

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
    pub(super) fn read(&self) -> Result<Vec<crate::source::Object>, i32> {
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

//! `netpol lab`: one Flannel-like node made of network namespaces on this machine, so
//! netpol can be tried and tested without a cluster.
//!
//! ```text
//!   np-<lab>-node0 (netns)                     np-<lab>-<ns>-<pod> (netns)
//!   ┌──────────────────────────────┐           ┌──────────────────────────┐
//!   │ cni0 10.244.0.1/24 ── np<hash>┼── veth ───┼ eth0 10.244.0.N/24       │
//!   │      fd00::af4:1/96           │           │      fd00::af4:N/96      │
//!   │ netpol agent (TC on np<hash>) │           │ netpol lab serve (ports) │
//!   └──────────────────────────────┘           └──────────────────────────┘
//! ```
//! `up` starts a detached supervisor (`netpol lab run`) that owns the namespaces, keeps
//! them in step with a manifest directory, renders the agent's view of the cluster and
//! answers `wait`/`status` on `lab.sock`. Every other command is a client of the files
//! and sockets under `/run/netpol/lab/<name>/`.

pub mod dns;
pub mod iptables;
mod kubeproxy;
mod load;
mod netns;
mod probe;
mod serve;
mod supervisor;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use load::{load, load_with, LoadKind, LoadOptions, LoadReport};
pub use probe::{probe, ProbeOptions, Via};
pub use serve::serve;
pub use supervisor::run_supervisor;

/// Where every lab keeps its state; one directory per lab name.
pub use netpol_agent::api::LAB_ROOT;
/// The first node of a lab; node `n` is `node<n>`.
pub const NODE_NAME: &str = "node0";
/// Nodes a lab may have (underlay addresses 172.30.0.2 up).
pub const MAX_NODES: u32 = 200;

pub fn node_name(index: u32) -> String {
    format!("node{index}")
}
/// The bridge pods are plugged into, as Flannel's `cni0`.
pub const BRIDGE: &str = "cni0";
/// How long `up` waits for the supervisor to create its socket.
const SUPERVISOR_START: Duration = Duration::from_secs(30);
/// How long `up` waits for the first convergence (attaching programs can take a while).
const FIRST_CONVERGENCE: Duration = Duration::from_secs(120);

pub struct UpOptions {
    pub name: String,
    pub manifests: PathBuf,
    /// Default "10.244.0.0/24".
    pub pod_cidr: String,
    /// The netpol binary run as supervisor, agent and pod servers.
    pub netpol_bin: PathBuf,
    /// Extra flags for the lab's agent (`--keep-established`, `--event-rate=10`, ...).
    pub agent_args: Vec<String>,
    /// Nodes (1 = the single-node lab of before: no underlay, no overlay).
    pub nodes: u32,
    /// Run cluster DNS (kube-system/coredns behind kube-dns, 10.96.0.10).
    pub dns: bool,
    /// What enforces policy on the nodes (the benchmarks compare them).
    pub enforcer: Enforcer,
}

/// What enforces policy in a lab: netpol's agent, iptables and ipsets in kube-router's
/// layout (`iptables.rs`, for the benchmarks), or nothing (the baseline).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Enforcer {
    None,
    Iptables,
    #[default]
    Netpol,
}

impl Enforcer {
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcer::None => "none",
            Enforcer::Iptables => "iptables",
            Enforcer::Netpol => "netpol",
        }
    }
}

impl std::str::FromStr for Enforcer {
    type Err = String;
    fn from_str(s: &str) -> Result<Enforcer, String> {
        match s {
            "none" => Ok(Enforcer::None),
            "iptables" => Ok(Enforcer::Iptables),
            "netpol" => Ok(Enforcer::Netpol),
            _ => Err(format!("unknown enforcer {s:?}: none, iptables or netpol")),
        }
    }
}

/// A pod annotated `netpol.io/lab-virtual: "true"` (with `spec.nodeName` and
/// `status.podIP`) is given to the enforcers as it is but not run: a pod of another,
/// virtual node, so benchmarks can size the cluster without a namespace per pod.
pub const VIRTUAL_ANNOTATION: &str = "netpol.io/lab-virtual";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    /// An echo request (pod to pod only; the port is not used).
    #[serde(rename = "ICMP")]
    Icmp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Icmp => "ICMP",
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabStatus {
    pub name: String,
    pub nodes: Vec<NodeStatus>,
    pub pods: Vec<PodStatus>,
    /// Services with their ClusterIP and endpoints, as the lab's kube-proxy programs them.
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: String,
    pub ports: Vec<ServicePortStatus>,
}

impl ServiceStatus {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePortStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// namespace/name of the backend pod.
    pub pod: String,
    pub ip: String,
    pub port: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub netns: String,
    pub agent_pid: Option<u32>,
    /// The node's IPv4 pod CIDR.
    #[serde(default)]
    pub pod_cidr: String,
    /// The node's address on the lab underlay (multi-node labs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_ip: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ips: Vec<String>,
    pub netns: String,
    pub veth: String,
}

impl PodStatus {
    /// "ns/pod", the name pods go by on the command line and in probe reports.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub protocol: Protocol,
    pub port: u16,
    pub results: Vec<ProbeResult>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub from: String,
    pub to: String,
    pub result: Outcome,
    /// The address connected to (the pod's, the Service's ClusterIP, or what DNS gave).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The backend pod that answered (known when the server says who it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Connected,
    Refused,
    Timeout,
    /// `--via dns`: the name did not resolve (no answer, or NXDOMAIN).
    Unresolved,
}

/// `state.json`: the public [`LabStatus`] (flattened, so the file reads as one) plus what
/// `down` needs to find the supervisor after a crash of the client.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct LabState {
    #[serde(flatten)]
    pub status: LabStatus,
    pub supervisor_pid: u32,
    pub pod_cidr: String,
    pub manifests: PathBuf,
}

/// Lab names end up in netns names (`np-<name>-...`) and file paths. Lowercase
/// alphanumerics only, so the prefix `np-<name>-` of one lab can never be a prefix of
/// another lab's names ("a" vs "ab" differ at the '-').
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = (1..=12).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok {
        bail!("invalid lab name {name:?}: use 1 to 12 lowercase letters or digits");
    }
    Ok(())
}

pub(crate) fn state_dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

pub(crate) struct Paths {
    pub dir: PathBuf,
    pub state: PathBuf,
    pub cluster: PathBuf,
    pub agent_sock: PathBuf,
    pub lab_sock: PathBuf,
    pub supervisor_log: PathBuf,
    pub agent_log: PathBuf,
    /// Records of the lab's cluster DNS.
    pub dns_records: PathBuf,
}

impl Paths {
    pub fn new(name: &str) -> Paths {
        let dir = state_dir(name);
        Paths {
            state: dir.join("state.json"),
            cluster: dir.join("cluster"),
            agent_sock: dir.join("agent.sock"),
            lab_sock: dir.join("lab.sock"),
            supervisor_log: dir.join("supervisor.log"),
            agent_log: dir.join("agent.log"),
            dns_records: dir.join("dns.json"),
            dir,
        }
    }

    /// Node `n`'s agent socket: `agent.sock` for node0 (as before), `agent-node<n>.sock`.
    pub fn agent_sock_of(&self, n: u32) -> PathBuf {
        if n == 0 {
            self.agent_sock.clone()
        } else {
            self.dir.join(format!("agent-{}.sock", node_name(n)))
        }
    }

    pub fn agent_log_of(&self, n: u32) -> PathBuf {
        if n == 0 {
            self.agent_log.clone()
        } else {
            self.dir.join(format!("agent-{}.log", node_name(n)))
        }
    }
}

fn netns_prefix(lab: &str) -> String {
    format!("np-{lab}-")
}

/// Detaches whatever is mounted at `path` (nothing when nothing is).
pub(crate) fn unmount(path: &Path) {
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: a plain syscall on a valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Where a lab's agent pins its maps and programs: a bpffs of the lab's own, mounted by
/// the supervisor (labs run in parallel, and `ip netns exec` hides /sys/fs/bpf behind a
/// fresh sysfs).
pub fn pin_root(lab: &str) -> PathBuf {
    state_dir(lab).join("bpffs")
}

/// The pin root of node `index`'s agent: a directory of its own in the lab's bpffs.
pub fn pin_root_of(lab: &str, index: u32) -> PathBuf {
    pin_root(lab).join(format!("node{index}"))
}

#[cfg(test)]
pub(crate) fn node_netns(lab: &str) -> String {
    node_netns_of(lab, 0)
}

pub(crate) fn node_netns_of(lab: &str, index: u32) -> String {
    format!("{}{}", netns_prefix(lab), node_name(index))
}

/// The underlay joining a multi-node lab's nodes. No '-' after the prefix: pod
/// namespaces always have one (`<ns>-<pod>`), so the names cannot collide.
pub(crate) fn underlay_netns(lab: &str) -> String {
    format!("{}underlay", netns_prefix(lab))
}

pub(crate) fn pod_netns(lab: &str, namespace: &str, pod: &str) -> String {
    format!("{}{namespace}-{pod}", netns_prefix(lab))
}

/// Host-side veth name: interface names are limited to 15 bytes, and veths of all labs
/// share one kernel namespace of names only within their node netns, but `ip` errors are
/// easier to read when names are unique everywhere, so hash (lab, ns, pod).
pub(crate) fn veth_name(lab: &str, namespace: &str, pod: &str) -> String {
    let mut h = Sha256::new();
    for part in [lab, namespace, pod] {
        h.update(part.as_bytes());
        h.update([0]); // separator: ("a","bc") and ("ab","c") must differ
    }
    let hex: String = h
        .finalize()
        .iter()
        .take(5)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("np{hex}")
}

/// Writes `bytes` to `path` so that readers see either the old or the new content.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("path without a parent")?;
    // A dot name: the dir source skips hidden files, so the agent never reads a half file.
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

pub(crate) fn read_state(name: &str) -> anyhow::Result<LabState> {
    validate_name(name)?;
    let path = Paths::new(name).state;
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no lab named {name} is running (netpol lab up --name {name} ...)")
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The last `lines` lines of a log, for error messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub fn up(opts: &UpOptions) -> anyhow::Result<()> {
    validate_name(&opts.name)?;
    // Fail here, not in the detached supervisor, on the usual mistakes.
    supervisor::PodCidr::parse(&opts.pod_cidr)?;
    if !(1..=MAX_NODES).contains(&opts.nodes) {
        bail!("--nodes {}: a lab has 1 to {MAX_NODES} nodes", opts.nodes);
    }
    let manifests = std::fs::canonicalize(&opts.manifests)
        .with_context(|| format!("manifest directory {}", opts.manifests.display()))?;
    down(&opts.name).context("cleaning up an earlier lab of the same name")?;

    let paths = Paths::new(&opts.name);
    std::fs::create_dir_all(&paths.dir)
        .with_context(|| format!("creating {}", paths.dir.display()))?;
    let log = std::fs::File::create(&paths.supervisor_log)
        .with_context(|| format!("creating {}", paths.supervisor_log.display()))?;
    let mut child = Command::new(&opts.netpol_bin)
        .args(["lab", "run", "--name", &opts.name, "--manifests"])
        .arg(&manifests)
        .args(["--pod-cidr", &opts.pod_cidr])
        .args(["--nodes", &opts.nodes.to_string()])
        .args(opts.dns.then_some("--dns"))
        .args(["--enforcer", opts.enforcer.as_str()])
        .args(opts.agent_args.iter().map(|a| format!("--agent-arg={a}")))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Own process group: a Ctrl-C in the terminal that ran `up` must not reach it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {} lab run", opts.netpol_bin.display()))?;

    let died = |status: std::process::ExitStatus| {
        anyhow::anyhow!(
            "the lab supervisor exited ({status}); {}:\n{}",
            paths.supervisor_log.display(),
            tail(&paths.supervisor_log, 30)
        )
    };
    // Poll for the socket file only: readiness itself is the `wait` below.
    let deadline = Instant::now() + SUPERVISOR_START;
    while !paths.lab_sock.exists() {
        if let Some(status) = child.try_wait()? {
            return Err(died(status));
        }
        if Instant::now() > deadline {
            bail!(
                "the lab supervisor did not open {} within {SUPERVISOR_START:?}",
                paths.lab_sock.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match wait(&opts.name, FIRST_CONVERGENCE) {
        Ok(()) => Ok(()),
        Err(e) => match child.try_wait()? {
            Some(status) => Err(died(status)),
            // Left up for inspection: its logs tell why; `down` removes it.
            None => Err(anyhow::anyhow!(
                "{e:#}\n(supervisor log: {}; `netpol lab down --name {}` removes the lab)",
                paths.supervisor_log.display(),
                opts.name
            )),
        },
    }
}

/// One request to the supervisor; the reply line parsed.
fn lab_request(name: &str, op: &str, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    validate_name(name)?;
    let sock = Paths::new(name).lab_sock;
    let mut stream = UnixStream::connect(&sock).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!("no lab named {name} is running (netpol lab up --name {name} ...)")
        } else {
            anyhow::anyhow!("cannot reach the lab supervisor at {}: {e}", sock.display())
        }
    })?;
    stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    writeln!(stream, "{}", serde_json::json!({ "op": op }))?;
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(0) => bail!("the lab supervisor closed the connection without answering"),
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            bail!("lab {name} did not converge within {timeout:?}")
        }
        Err(e) => return Err(e.into()),
    }
    Ok(serde_json::from_str(&line)?)
}

pub fn wait(name: &str, timeout: Duration) -> anyhow::Result<()> {
    let reply = lab_request(name, "wait", timeout)?;
    if reply.get("ok").and_then(|o| o.as_bool()) == Some(true) {
        return Ok(());
    }
    let error = reply
        .get("error")
        .and_then(|e| e.as_str())
        .unwrap_or("unknown error");
    bail!("lab {name}: {error}")
}

/// What `netpol lab resolve` reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResolveReport {
    pub from: String,
    pub query: String,
    pub server: String,
    /// "udp", "tcp", or "udp→tcp": a truncated UDP answer asked again over TCP.
    pub transport: String,
    pub result: dns::Resolution,
    pub addresses: Vec<std::net::IpAddr>,
    /// The UDP answer came back truncated (TC), so the outcome is that of TCP.
    #[serde(default)]
    pub truncated: bool,
}

/// Looks `query` up from inside pod `from`, through the nameserver of its resolv.conf.
pub fn resolve(
    name: &str,
    from: &str,
    query: &str,
    tcp: bool,
    ipv6: bool,
    timeout: Duration,
) -> anyhow::Result<ResolveReport> {
    let state = read_state(name)?;
    let pod = state
        .status
        .pods
        .iter()
        .find(|p| p.key() == from)
        .with_context(|| format!("lab {name} has no pod {from} (pods are named namespace/name)"))?;
    let server = dns::nameserver_of(&pod.netns)
        .with_context(|| format!("pod {from} has no resolver (start the lab with --dns)"))?;
    let netns = pod.netns.clone();
    let query_name = query.to_string();
    // A thread of its own: entering the pod's netns must not move the caller.
    let lookup = std::thread::spawn(move || -> anyhow::Result<_> {
        probe::enter_netns(&netns)?;
        dns::lookup(
            std::net::SocketAddr::new(server, 53),
            &query_name,
            ipv6,
            tcp,
            timeout,
        )
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the resolver thread panicked"))??;
    Ok(ResolveReport {
        from: from.to_string(),
        query: query.to_string(),
        server: server.to_string(),
        transport: lookup.transport,
        result: lookup.result,
        addresses: lookup.addresses,
        truncated: lookup.truncated,
    })
}

pub fn status(name: &str) -> anyhow::Result<LabStatus> {
    Ok(read_state(name)?.status)
}

pub fn exec(name: &str, pod: &str, cmd: &[String]) -> anyhow::Result<i32> {
    let state = read_state(name)?;
    let target = state
        .status
        .pods
        .iter()
        .find(|p| p.key() == pod)
        .with_context(|| format!("lab {name} has no pod {pod} (pods are named namespace/name)"))?;
    if cmd.is_empty() {
        bail!("no command to run in {pod}");
    }
    let status = Command::new("ip")
        .args(["netns", "exec", &target.netns])
        .args(cmd)
        .status()
        .with_context(|| format!("running ip netns exec {} ...", target.netns))?;
    // Shell convention for a command killed by a signal.
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

pub fn down(name: &str) -> anyhow::Result<()> {
    validate_name(name)?;
    let paths = Paths::new(name);
    let recorded = std::fs::read_to_string(&paths.state)
        .ok()
        .and_then(|t| serde_json::from_str::<LabState>(&t).ok());
    if let Some(state) = recorded {
        stop_supervisor(state.supervisor_pid, name);
    }
    // Whatever the supervisor did not get to (it crashed, was killed, or never wrote
    // state): processes in the lab's namespaces, the namespaces, the state dir.
    let prefix = netns_prefix(name);
    let leftovers: Vec<String> = netns::list()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    for ns in &leftovers {
        for pid in netns::pids(ns).unwrap_or_default() {
            // SAFETY: plain syscall on a pid; a pid that is gone yields ESRCH, ignored.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    // Pods first: deleting them drops their veths while the node is still there. Nodes
    // and the underlay have no '-' after the prefix; pods always have one.
    let (nodes, pods): (Vec<&String>, Vec<&String>) = leftovers
        .iter()
        .partition(|n| !n[prefix.len()..].contains('-'));
    for ns in pods.into_iter().chain(nodes) {
        netns::delete(ns)?;
        dns::remove_resolv_conf(ns);
    }
    // Resolver files of pods whose namespace is already gone.
    if let Ok(dir) = std::fs::read_dir("/etc/netns") {
        for e in dir.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with(&prefix) {
                dns::remove_resolv_conf(&n);
            }
        }
    }
    // The lab's bpffs (and the pins in it) go with it, even after a crashed supervisor.
    unmount(&pin_root(name));
    match std::fs::remove_dir_all(&paths.dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", paths.dir.display())),
    }
}

/// Whether `pid` is a live (not zombie) `netpol lab run --name <name>`; guards against a
/// recycled pid after a crash.
fn is_our_supervisor(pid: u32, name: &str) -> bool {
    if pid == 0 {
        return false;
    }
    // Reap it if `up` ran in this process: a zombie child would otherwise look alive.
    // SAFETY: WNOHANG never blocks; a pid that is not our child yields ECHILD.
    unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if matches!(state, Some('Z') | Some('X') | None) {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    // `netpol lab run` becomes `netpol-lab run` once netpol has handed over.
    args.windows(2)
        .any(|w| w[1] == b"run" && (w[0] == b"lab" || w[0].ends_with(b"netpol-lab")))
        && args
            .windows(2)
            .any(|w| w[0] == b"--name" && w[1] == name.as_bytes())
}

fn stop_supervisor(pid: u32, name: &str) {
    if !is_our_supervisor(pid, name) {
        return;
    }
    // SAFETY: plain syscall on a pid checked above.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    // The supervisor tears down its namespaces itself; give it the time to do so.
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_our_supervisor(pid, name) {
        if Instant::now() > deadline {
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names_are_short_lowercase_alphanumerics() {
        for ok in ["a", "lab1", "abcdefghijkl", "0"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a-b", "Lab", "abcdefghijklm", "a/b", "a b", "é"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn veth_names_fit_ifnamsiz_and_differ_across_labs_and_pods() {
        let v = veth_name("lab", "x", "a");
        assert!(v.len() <= 15 && v.starts_with("np"), "{v}");
        assert_eq!(v, veth_name("lab", "x", "a"), "stable");
        let all = [
            veth_name("lab", "x", "a"),
            veth_name("lab2", "x", "a"),
            veth_name("lab", "y", "a"),
            veth_name("lab", "x", "b"),
            veth_name("lab", "xa", ""),
            veth_name("lab", "x-a", "b"),
            veth_name("lab", "x", "a-b"),
        ];
        let unique: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
    }

    #[test]
    fn netns_prefixes_do_not_collide_between_labs() {
        let a = netns_prefix("a");
        assert!(!pod_netns("ab", "x", "p").starts_with(&a));
        assert!(!node_netns("ab").starts_with(&a));
        assert!(pod_netns("a", "x", "p").starts_with(&a));
    }

    #[test]
    fn state_json_reads_as_lab_status() {
        let state = LabState {
            status: LabStatus {
                name: "t".into(),
                nodes: vec![NodeStatus {
                    name: "node0".into(),
                    netns: node_netns("t"),
                    agent_pid: Some(7),
                    ..Default::default()
                }],
                pods: vec![],
                services: vec![],
            },
            supervisor_pid: 42,
            pod_cidr: "10.244.0.0/24".into(),
            manifests: "/m".into(),
        };
        let text = serde_json::to_string(&state).unwrap();
        let status: LabStatus = serde_json::from_str(&text).unwrap();
        assert_eq!(status, state.status);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["nodes"][0]["agent_pid"], 7);
    }

    #[test]
    fn protocol_and_outcome_serialize_as_documented() {
        assert_eq!(serde_json::to_string(&Protocol::Tcp).unwrap(), "\"TCP\"");
        assert_eq!(serde_json::to_string(&Protocol::Udp).unwrap(), "\"UDP\"");
        assert_eq!(
            serde_json::to_string(&Outcome::Refused).unwrap(),
            "\"refused\""
        );
    }
}

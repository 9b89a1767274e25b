//! The `netpol lab` commands that drive a running lab from outside: up (starting its
//! supervisor), wait, resolve, status, exec and down.

use anyhow::bail;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

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
    let mut child = Command::new(&opts.lab_bin)
        .args(["run", "--name", &opts.name, "--manifests"])
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
        .with_context(|| format!("starting {} run", opts.lab_bin.display()))?;

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
pub(super) fn lab_request(
    name: &str,
    op: &str,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
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
    // The lab's bpffs (and the pins in it) and its cgroup2 mount (whose files cannot be
    // removed) go with it, even after a crashed supervisor.
    unmount(&pin_root(name));
    unmount(&cgroup_root(name));
    match std::fs::remove_dir_all(&paths.dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", paths.dir.display())),
    }
}

/// Whether `pid` is a live (not zombie) `netpol lab run --name <name>`; guards against a
/// recycled pid after a crash.
pub(super) fn is_our_supervisor(pid: u32, name: &str) -> bool {
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
    // `up` starts the supervisor as `netpol-lab run` itself.
    args.windows(2)
        .any(|w| w[1] == b"run" && w[0].ends_with(b"netpol-lab"))
        && args
            .windows(2)
            .any(|w| w[0] == b"--name" && w[1] == name.as_bytes())
}

pub(super) fn stop_supervisor(pid: u32, name: &str) {
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

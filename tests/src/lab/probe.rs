//! `netpol lab probe`: connectivity between pods, each probe run from inside the source
//! pod's network namespace, and the result as an upstream-style reachability matrix.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, ErrorKind};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};

use serde::{Deserialize, Serialize};

use super::{Outcome, PodStatus, ProbeReport, ProbeResult, Protocol, ServiceStatus};

/// Probes in flight at once. A probe that times out holds its thread for the timeout,
/// so this bounds a matrix under default deny at about (pairs / PARALLEL) × timeout:
/// 100 pods (9900 pairs) all dropped take ~20 rounds. The threads are small.
const PARALLEL: usize = 512;
const PROBE_STACK: usize = 128 * 1024;

/// How a probe addresses its target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// The pod's own address.
    #[default]
    Pod,
    /// The ClusterIP of a Service selecting the pod (its own one when it has one).
    Service,
    /// The name of that Service, resolved through the pod's resolver (cluster DNS).
    Dns,
}

pub struct ProbeOptions<'a> {
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    /// Probe this Service (namespace/name) instead of pods (`to` must be unset).
    pub service: Option<&'a str>,
    pub port: u16,
    pub protocol: Protocol,
    pub ipv6: bool,
    pub timeout: Duration,
    pub via: Via,
    /// Probes per (from, to) pair (to see where a Service's random choice lands).
    pub repeat: u32,
}

struct Job<'a> {
    from: &'a PodStatus,
    to: String,
    target: Target,
}

enum Target {
    Addr(SocketAddr),
    /// A name to resolve from inside the source pod, then this port.
    Name(String, u16),
}

/// The Service port that reaches `pod` on target port `port`: one whose only endpoint
/// is the pod (a per-pod Service, as the upstream e2e tests make) first, else any.
fn service_for<'a>(
    services: &'a [ServiceStatus],
    pod: &PodStatus,
    port: u16,
    protocol: Protocol,
) -> Option<(&'a ServiceStatus, u16)> {
    let key = pod.key();
    let mut any = None;
    for s in services {
        for p in s.ports.iter().filter(|p| p.protocol == protocol) {
            let hits = p
                .endpoints
                .iter()
                .filter(|e| e.pod == key && e.port == port)
                .count();
            if hits == 0 {
                continue;
            }
            if p.endpoints.iter().all(|e| e.pod == key) {
                return Some((s, p.port));
            }
            any.get_or_insert((s, p.port));
        }
    }
    any
}

pub fn probe(name: &str, opts: &ProbeOptions) -> anyhow::Result<ProbeReport> {
    let state = super::read_state(name)?;
    let mut pods = state.status.pods;
    pods.sort_by_key(PodStatus::key);
    let services = state.status.services;
    for filter in [opts.from, opts.to].into_iter().flatten() {
        if !pods.iter().any(|p| p.key() == filter) {
            bail!("lab {name} has no pod {filter} (pods are named namespace/name)");
        }
    }
    if opts.protocol == Protocol::Icmp && (opts.via != Via::Pod || opts.service.is_some()) {
        bail!("ICMP probes go pod to pod: kube-proxy does not forward echo requests to a Service");
    }
    if opts.ipv6 && (opts.via != Via::Pod || opts.service.is_some()) {
        bail!("the lab's Services are IPv4 only: probe IPv6 with --via pod");
    }
    let selected = |filter: Option<&str>, p: &PodStatus| filter.is_none_or(|f| f == p.key());
    let target_of = |svc: &ServiceStatus, svc_port: u16| -> anyhow::Result<Target> {
        Ok(match opts.via {
            Via::Dns => Target::Name(
                format!("{}.{}.svc.{}", svc.name, svc.namespace, super::dns::DOMAIN),
                svc_port,
            ),
            _ => Target::Addr(SocketAddr::new(svc.cluster_ip.parse()?, svc_port)),
        })
    };

    let mut jobs = Vec::new();
    let repeat = opts.repeat.max(1);
    if let Some(service) = opts.service {
        if opts.to.is_some() {
            bail!("--service and --to exclude each other");
        }
        let svc = services
            .iter()
            .find(|s| s.key() == service)
            .with_context(|| format!("lab {name} has no Service {service}"))?;
        let port = svc
            .ports
            .iter()
            .find(|p| p.port == opts.port && p.protocol == opts.protocol)
            .with_context(|| {
                format!(
                    "Service {service} has no {} port {}",
                    opts.protocol, opts.port
                )
            })?;
        for src in pods.iter().filter(|p| selected(opts.from, p)) {
            for _ in 0..repeat {
                jobs.push(Job {
                    from: src,
                    to: service.to_string(),
                    target: target_of(svc, port.port)?,
                });
            }
        }
    } else {
        for src in pods.iter().filter(|p| selected(opts.from, p)) {
            for dst in pods
                .iter()
                .filter(|p| selected(opts.to, p) && p.key() != src.key())
            {
                let target = match opts.via {
                    Via::Pod => {
                        let ip = dst
                            .ips
                            .iter()
                            .filter_map(|ip| ip.parse::<IpAddr>().ok())
                            .find(|ip| ip.is_ipv6() == opts.ipv6)
                            .with_context(|| {
                                format!(
                                    "pod {} has no IPv{} address",
                                    dst.key(),
                                    if opts.ipv6 { 6 } else { 4 }
                                )
                            })?;
                        Target::Addr(SocketAddr::new(ip, opts.port))
                    }
                    Via::Service | Via::Dns => {
                        let found = service_for(&services, dst, opts.port, opts.protocol);
                        // In a matrix, pods no Service reaches are left out.
                        if found.is_none() && opts.to.is_none() {
                            continue;
                        }
                        let (svc, svc_port) = found.with_context(|| {
                            format!(
                                "no Service of lab {name} reaches pod {} on {} port {}",
                                dst.key(),
                                opts.protocol,
                                opts.port
                            )
                        })?;
                        target_of(svc, svc_port)?
                    }
                };
                for _ in 0..repeat {
                    jobs.push(Job {
                        from: src,
                        to: dst.key(),
                        target: match &target {
                            Target::Addr(a) => Target::Addr(*a),
                            Target::Name(n, p) => Target::Name(n.clone(), *p),
                        },
                    });
                }
            }
        }
    }

    // A fixed set of threads pulls jobs; each result lands in its job's slot, so the
    // output order is the (sorted) job order whatever finished first.
    let next = AtomicUsize::new(0);
    type Slot = Mutex<Option<anyhow::Result<(Outcome, Option<SocketAddr>, Option<String>)>>>;
    let slots: Vec<Slot> = jobs.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL.min(jobs.len()) {
            let worker = || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                let outcome = probe_one(&job.from.netns, &job.target, opts.protocol, opts.timeout);
                *slots[i].lock().unwrap() = Some(outcome);
            };
            std::thread::Builder::new()
                .stack_size(PROBE_STACK)
                .spawn_scoped(scope, worker)
                .expect("spawning a probe thread");
        }
    });

    let mut results = Vec::with_capacity(jobs.len());
    for (job, slot) in jobs.iter().zip(slots) {
        let (outcome, addr, backend) = slot
            .into_inner()
            .unwrap()
            .expect("every job ran")
            .with_context(|| format!("probing {} → {}", job.from.key(), job.to))?;
        results.push(ProbeResult {
            from: job.from.key(),
            to: job.to.clone(),
            result: outcome,
            address: addr.map(|a| a.ip().to_string()),
            backend,
        });
    }
    Ok(ProbeReport {
        protocol: opts.protocol,
        port: opts.port,
        results,
    })
}

/// Moves the calling thread into `netns`. Only this thread moves (network namespaces
/// are per thread), and sockets it creates afterwards belong to that namespace.
pub(crate) fn enter_netns(netns: &str) -> anyhow::Result<()> {
    let path = format!("/var/run/netns/{netns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on a valid fd that lives until after the call.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("entering {netns}"));
    }
    Ok(())
}

fn probe_one(
    netns: &str,
    target: &Target,
    protocol: Protocol,
    timeout: Duration,
) -> anyhow::Result<(Outcome, Option<SocketAddr>, Option<String>)> {
    enter_netns(netns)?;
    let dst = match target {
        Target::Addr(a) => *a,
        Target::Name(name, port) => {
            let server = super::dns::nameserver_of(netns)
                .context("the pod has no resolver (start the lab with --dns)")?;
            let (res, addrs) =
                super::dns::query(SocketAddr::new(server, 53), name, false, false, timeout);
            match (res, addrs.first()) {
                (super::dns::Resolution::Answered, Some(ip)) => SocketAddr::new(*ip, *port),
                _ => return Ok((Outcome::Unresolved, None, None)),
            }
        }
    };
    Ok(match protocol {
        Protocol::Tcp => {
            let (o, who) = probe_tcp(dst, timeout);
            (o, Some(dst), who)
        }
        Protocol::Udp => (probe_udp(dst, timeout)?, Some(dst), None),
        Protocol::Icmp => (probe_icmp(dst.ip(), timeout)?, Some(dst), None),
    })
}

/// An error as a probe outcome: an active rejection is `refused`, anything else (drops,
/// unreachable, timers) counts as `timeout`, as the packet did not get an answer.
fn outcome_of(e: &std::io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset => Outcome::Refused,
        _ => Outcome::Timeout,
    }
}

/// The outcome, and the pod that greeted (`netpol-lab <port> <namespace/pod>`).
fn probe_tcp(dst: SocketAddr, timeout: Duration) -> (Outcome, Option<String>) {
    let stream = match TcpStream::connect_timeout(&dst, timeout) {
        Ok(s) => s,
        Err(e) => return (outcome_of(&e), None),
    };
    // A completed handshake is not enough: the greeting proves data flows both ways.
    if let Err(e) = stream.set_read_timeout(Some(timeout)) {
        return (outcome_of(&e), None);
    }
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(_) if line.starts_with("netpol-lab") => (
            Outcome::Connected,
            line.split_whitespace().nth(2).map(str::to_string),
        ),
        Ok(_) => (Outcome::Refused, None), // closed without greeting: someone else answered
        Err(e) => (outcome_of(&e), None),
    }
}

fn probe_udp(dst: SocketAddr, timeout: Duration) -> anyhow::Result<Outcome> {
    let any: IpAddr = if dst.is_ipv6() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0)).context("binding a UDP socket")?;
    socket.set_read_timeout(Some(timeout))?;
    // Connected: an ICMP port unreachable then surfaces as ECONNREFUSED on recv.
    if let Err(e) = socket.connect(dst).and_then(|_| socket.send(b"ping")) {
        return Ok(outcome_of(&e));
    }
    let mut buf = [0u8; 64];
    Ok(match socket.recv(&mut buf) {
        Ok(_) => Outcome::Connected,
        Err(e) => outcome_of(&e),
    })
}

/// One echo request with `ping` (iputils), which runs in this thread's network
/// namespace; an answer within the timeout is `connected`, anything else `timeout`.
fn probe_icmp(dst: IpAddr, timeout: Duration) -> anyhow::Result<Outcome> {
    let secs = timeout.as_secs_f64().ceil().max(1.0).to_string();
    let family = if dst.is_ipv6() { "-6" } else { "-4" };
    let status = std::process::Command::new("ping")
        .args([family, "-n", "-q", "-c", "1", "-W", &secs])
        .arg(dst.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("running ping (iputils-ping, installed by cargo xtask setup)")?;
    Ok(if status.success() {
        Outcome::Connected
    } else {
        Outcome::Timeout
    })
}

impl ProbeReport {
    /// The reachability matrix, rows = from, columns = to, as upstream e2e truth tables.
    pub fn table(&self) -> String {
        let rows: BTreeSet<&str> = self.results.iter().map(|r| r.from.as_str()).collect();
        let cols: BTreeSet<&str> = self.results.iter().map(|r| r.to.as_str()).collect();
        let cell = |from: &str, to: &str| -> &'static str {
            if from == to {
                return ".";
            }
            match self
                .results
                .iter()
                .find(|r| r.from == from && r.to == to)
                .map(|r| r.result)
            {
                Some(Outcome::Connected) => "✓",
                Some(Outcome::Timeout) => "✗",
                Some(Outcome::Refused) => "R",
                Some(Outcome::Unresolved) => "?",
                None => "-",
            }
        };
        // Width in characters, not bytes: the marks are multi-byte.
        let width = |s: &str| s.chars().count();
        let first = rows
            .iter()
            .map(|r| width(r))
            .max()
            .unwrap_or(0)
            .max(width("from\\to"));
        let col_width: Vec<usize> = cols.iter().map(|c| width(c)).collect();
        let pad = |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(width(s))));

        let mut out = String::new();
        let _ = writeln!(out, "{}/{}", self.protocol, self.port);
        let header: Vec<String> = cols.iter().map(|c| c.to_string()).collect();
        let _ = writeln!(
            out,
            "{}  {}",
            pad("from\\to", first),
            header.join("  ").trim_end()
        );
        for from in &rows {
            let cells: Vec<String> = cols
                .iter()
                .zip(&col_width)
                .map(|(to, w)| pad(cell(from, to), *w))
                .collect();
            let _ = writeln!(out, "{}  {}", pad(from, first), cells.join("  ").trim_end());
        }
        let _ = writeln!(out, "\n✓ connected  ✗ timeout  R refused  . self");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(from: &str, to: &str, result: Outcome) -> ProbeResult {
        ProbeResult {
            from: from.into(),
            to: to.into(),
            result,
            address: None,
            backend: None,
        }
    }

    #[test]
    fn table_is_a_matrix_with_self_dots_and_a_legend() {
        let report = ProbeReport {
            protocol: Protocol::Tcp,
            port: 80,
            results: vec![
                r("x/a", "x/b", Outcome::Connected),
                r("x/a", "y/ccc", Outcome::Timeout),
                r("x/b", "x/a", Outcome::Refused),
                r("x/b", "y/ccc", Outcome::Connected),
                r("y/ccc", "x/a", Outcome::Timeout),
                r("y/ccc", "x/b", Outcome::Timeout),
            ],
        };
        let expected = "\
TCP/80
from\\to  x/a  x/b  y/ccc
x/a      .    ✓    ✗
x/b      R    .    ✓
y/ccc    ✗    ✗    .

✓ connected  ✗ timeout  R refused  . self
";
        assert_eq!(report.table(), expected);
    }

    #[test]
    fn a_filtered_report_shows_only_the_probed_rows_and_columns() {
        let report = ProbeReport {
            protocol: Protocol::Udp,
            port: 53,
            results: vec![
                r("x/a", "x/b", Outcome::Connected),
                r("x/a", "x/c", Outcome::Refused),
            ],
        };
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "UDP/53");
        assert_eq!(lines[1], "from\\to  x/b  x/c");
        assert_eq!(lines[2], "x/a      ✓    R");
        assert_eq!(lines.len(), 5);
    }

    #[test]
    fn report_json_has_the_documented_shape() {
        let report = ProbeReport {
            protocol: Protocol::Tcp,
            port: 80,
            results: vec![r("x/a", "x/b", Outcome::Timeout)],
        };
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"protocol": "TCP", "port": 80, "results": [{"from": "x/a", "to": "x/b", "result": "timeout"}]})
        );
    }
}

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

use super::{Outcome, PodStatus, ProbeReport, ProbeResult, Protocol};

/// Probes in flight at once: enough to probe a 6×6 matrix in one round.
const PARALLEL: usize = 32;

struct Job<'a> {
    from: &'a PodStatus,
    to: &'a PodStatus,
    dst: IpAddr,
}

pub fn probe(
    name: &str,
    from: Option<&str>,
    to: Option<&str>,
    port: u16,
    protocol: Protocol,
    ipv6: bool,
    timeout: Duration,
) -> anyhow::Result<ProbeReport> {
    let state = super::read_state(name)?;
    let mut pods = state.status.pods;
    pods.sort_by_key(PodStatus::key);
    for filter in [from, to].into_iter().flatten() {
        if !pods.iter().any(|p| p.key() == filter) {
            bail!("lab {name} has no pod {filter} (pods are named namespace/name)");
        }
    }
    let selected = |filter: Option<&str>, p: &PodStatus| filter.is_none_or(|f| f == p.key());

    let mut jobs = Vec::new();
    for src in pods.iter().filter(|p| selected(from, p)) {
        for dst in pods
            .iter()
            .filter(|p| selected(to, p) && p.key() != src.key())
        {
            let dst_ip = dst
                .ips
                .iter()
                .filter_map(|ip| ip.parse::<IpAddr>().ok())
                .find(|ip| ip.is_ipv6() == ipv6)
                .with_context(|| {
                    format!(
                        "pod {} has no IPv{} address",
                        dst.key(),
                        if ipv6 { 6 } else { 4 }
                    )
                })?;
            jobs.push(Job {
                from: src,
                to: dst,
                dst: dst_ip,
            });
        }
    }

    // A fixed set of threads pulls jobs; each result lands in its job's slot, so the
    // output order is the (sorted) job order whatever finished first.
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<anyhow::Result<Outcome>>>> =
        jobs.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL.min(jobs.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                let outcome = probe_one(
                    &job.from.netns,
                    SocketAddr::new(job.dst, port),
                    protocol,
                    timeout,
                );
                *slots[i].lock().unwrap() = Some(outcome);
            });
        }
    });

    let mut results = Vec::with_capacity(jobs.len());
    for (job, slot) in jobs.iter().zip(slots) {
        let outcome = slot
            .into_inner()
            .unwrap()
            .expect("every job ran")
            .with_context(|| format!("probing {} → {}", job.from.key(), job.to.key()))?;
        results.push(ProbeResult {
            from: job.from.key(),
            to: job.to.key(),
            result: outcome,
        });
    }
    Ok(ProbeReport {
        protocol,
        port,
        results,
    })
}

/// Moves the calling thread into `netns`. Only this thread moves (network namespaces
/// are per thread), and sockets it creates afterwards belong to that namespace.
fn enter_netns(netns: &str) -> anyhow::Result<()> {
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
    dst: SocketAddr,
    protocol: Protocol,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    enter_netns(netns)?;
    Ok(match protocol {
        Protocol::Tcp => probe_tcp(dst, timeout),
        Protocol::Udp => probe_udp(dst, timeout)?,
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

fn probe_tcp(dst: SocketAddr, timeout: Duration) -> Outcome {
    let stream = match TcpStream::connect_timeout(&dst, timeout) {
        Ok(s) => s,
        Err(e) => return outcome_of(&e),
    };
    // A completed handshake is not enough: the greeting proves data flows both ways.
    if let Err(e) = stream.set_read_timeout(Some(timeout)) {
        return outcome_of(&e);
    }
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(_) if line.starts_with("netpol-lab") => Outcome::Connected,
        Ok(_) => Outcome::Refused, // closed without greeting: someone else answered
        Err(e) => outcome_of(&e),
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

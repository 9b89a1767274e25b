//! `netpol lab load`: traffic between two lab pods, for benchmarks of the datapath.
//!
//! - `stream`: iperf3 (Debian's, installed by `cargo xtask setup`): a one-off server in
//!   the target pod on port 5201, the client in the source pod; throughput.
//! - `rr`: one TCP connection to the target's lab server, 1-byte request/response
//!   ping-pong; transactions per second and latency percentiles.
//! - `crr`: a new TCP connection per transaction (connect, greeting, close);
//!   connections per second and latency percentiles.
//! - `udp`: iperf3 in UDP mode, 64-byte datagrams as fast as the sender can; datagrams
//!   received per second.
//!
//! `--streams N` runs N parallel iperf3 streams (stream, udp).
//!
//! The target's ingress (and the source's egress) must allow the port used.
//!
//! `--address IP[:PORT]` runs the same measurements from the current network namespace
//! (a pod of a cluster, `kubectl exec`) against servers already running there:
//! `netpol-lab serve` for rr/crr and `iperf3 -s` for stream/udp (the load image has
//! both).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::PodStatus;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadKind {
    Stream,
    Rr,
    Crr,
    Udp,
}

/// Knobs of a load run beyond its kind and length.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Port: stream/udp 5201, rr/crr 80.
    pub port: Option<u16>,
    /// Parallel iperf3 streams (stream, udp); 0 is 1.
    pub streams: u32,
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub kind: LoadKind,
    pub from: String,
    pub to: String,
    pub address: String,
    pub port: u16,
    pub seconds: f64,
    /// stream: bits per second received by the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput_bps: Option<f64>,
    /// stream: TCP retransmissions seen by the sender.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retransmits: Option<u64>,
    /// rr, crr: completed transactions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transactions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transactions_per_sec: Option<f64>,
    /// crr: new connections per second (one per transaction).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
    /// udp: datagrams received per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets_per_sec: Option<f64>,
    /// udp: datagrams sent that did not arrive, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_percent: Option<f64>,
    /// stream, udp: parallel streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u32>,
}

fn pod<'a>(pods: &'a [PodStatus], key: &str, lab: &str) -> anyhow::Result<&'a PodStatus> {
    pods.iter()
        .find(|p| p.key() == key)
        .with_context(|| format!("lab {lab} has no pod {key} (pods are named namespace/name)"))
}

pub fn load(
    name: &str,
    from: &str,
    to: &str,
    kind: LoadKind,
    seconds: f64,
    port: Option<u16>,
) -> anyhow::Result<LoadReport> {
    load_with(
        name,
        from,
        to,
        kind,
        seconds,
        &LoadOptions { port, streams: 1 },
    )
}

pub fn load_with(
    name: &str,
    from: &str,
    to: &str,
    kind: LoadKind,
    seconds: f64,
    opts: &LoadOptions,
) -> anyhow::Result<LoadReport> {
    let state = super::read_state(name)?;
    let src = pod(&state.status.pods, from, name)?;
    let dst = pod(&state.status.pods, to, name)?;
    let ip: IpAddr = dst
        .ips
        .first()
        .context("the target pod has no address")?
        .parse()?;
    let ends = Ends::Lab {
        client: src.netns.clone(),
        server: dst.netns.clone(),
    };
    run(&ends, from, to, ip, kind, seconds, opts)
}

/// The load from this process's own network namespace (a pod's in a cluster) to
/// `address` (IP or IP:PORT; a port there wins over `opts.port`), where the servers
/// already run: `netpol-lab serve` on the rr/crr port and `iperf3 -s` on the
/// stream/udp one. `from` is this host's name, `to` the address as given.
pub fn load_address(
    address: &str,
    kind: LoadKind,
    seconds: f64,
    opts: &LoadOptions,
) -> anyhow::Result<LoadReport> {
    let (ip, port) = parse_address(address)?;
    let opts = LoadOptions {
        port: port.or(opts.port),
        ..*opts
    };
    let from = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    run(&Ends::Here, &from, address, ip, kind, seconds, &opts)
}

/// `IP`, `IP:PORT` or `[IPv6]:PORT`.
fn parse_address(address: &str) -> anyhow::Result<(IpAddr, Option<u16>)> {
    if let Ok(ip) = address.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    let sa: SocketAddr = address
        .parse()
        .with_context(|| format!("--address {address}: IP or IP:PORT"))?;
    Ok((sa.ip(), Some(sa.port())))
}

/// Where the two ends of a load run.
enum Ends {
    /// Lab pods: the client in one netns, a one-off iperf3 server started in the other.
    Lab { client: String, server: String },
    /// The client here; the servers are already up at the address.
    Here,
}

fn run(
    ends: &Ends,
    from: &str,
    to: &str,
    ip: IpAddr,
    kind: LoadKind,
    seconds: f64,
    opts: &LoadOptions,
) -> anyhow::Result<LoadReport> {
    let port = opts.port;
    let streams = opts.streams.max(1);
    if streams > 128 {
        bail!("--streams {streams}: at most 128");
    }
    if !(0.1..=3600.0).contains(&seconds) {
        bail!("--seconds {seconds}: between 0.1 and 3600");
    }
    let mut report = LoadReport {
        kind,
        from: from.into(),
        to: to.into(),
        address: ip.to_string(),
        port: 0,
        seconds,
        throughput_bps: None,
        retransmits: None,
        transactions: None,
        transactions_per_sec: None,
        connections_per_sec: None,
        latency: None,
        packets_per_sec: None,
        lost_percent: None,
        streams: None,
    };
    match kind {
        LoadKind::Stream => {
            let port = port.unwrap_or(5201);
            report.port = port;
            // iperf3 counts whole seconds (and runs forever for 0).
            let whole = seconds.ceil().max(1.0);
            report.seconds = whole;
            let end = iperf3(ends, ip, port, whole, streams, false)?;
            report.throughput_bps = Some(
                end["sum_received"]["bits_per_second"]
                    .as_f64()
                    .context("iperf3 reported no throughput")?,
            );
            report.retransmits = Some(end["sum_sent"]["retransmits"].as_u64().unwrap_or(0));
            report.streams = Some(streams);
        }
        LoadKind::Udp => {
            let port = port.unwrap_or(5201);
            report.port = port;
            let whole = seconds.ceil().max(1.0);
            report.seconds = whole;
            let end = iperf3(ends, ip, port, whole, streams, true)?;
            let sum = &end["sum"];
            let sent = sum["packets"]
                .as_f64()
                .context("iperf3 reported no packets")?;
            let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
            let seconds = sum["seconds"]
                .as_f64()
                .filter(|s| *s > 0.0)
                .unwrap_or(whole);
            report.packets_per_sec = Some((sent - lost).max(0.0) / seconds);
            report.lost_percent = sum["lost_percent"].as_f64();
            report.streams = Some(streams);
        }
        LoadKind::Rr | LoadKind::Crr => {
            let port = port.unwrap_or(80);
            report.port = port;
            let addr = SocketAddr::new(ip, port);
            let crr = kind == LoadKind::Crr;
            let length = Duration::from_secs_f64(seconds);
            let mut samples = match ends {
                // A thread of its own: entering the pod's netns must not move the caller.
                Ends::Lab { client, .. } => {
                    let netns = client.clone();
                    std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                        super::probe::enter_netns(&netns)?;
                        transactions(addr, crr, length)
                    })
                    .join()
                    .map_err(|_| anyhow::anyhow!("the load thread panicked"))??
                }
                Ends::Here => transactions(addr, crr, length)?,
            };
            let n = samples.len() as u64;
            report.transactions = Some(n);
            report.transactions_per_sec = Some(n as f64 / seconds);
            if crr {
                report.connections_per_sec = Some(n as f64 / seconds);
            }
            report.latency = Some(percentiles(&mut samples));
        }
    }
    Ok(report)
}

fn percentiles(samples: &mut [Duration]) -> Latency {
    if samples.is_empty() {
        return Latency::default();
    }
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1e6
    };
    Latency {
        p50_us: at(0.50),
        p90_us: at(0.90),
        p99_us: at(0.99),
        max_us: at(1.0),
    }
}

/// Request/response transactions against the lab server at `addr` until `length` is up.
fn transactions(addr: SocketAddr, crr: bool, length: Duration) -> anyhow::Result<Vec<Duration>> {
    let timeout = Duration::from_secs(2);
    let open = || -> anyhow::Result<BufReader<TcpStream>> {
        let s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr} (does a policy drop it?)"))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        let mut r = BufReader::new(s);
        let mut greeting = String::new();
        r.read_line(&mut greeting)?;
        if !greeting.starts_with("netpol-lab") {
            bail!("{addr} is not a lab server port");
        }
        Ok(r)
    };
    let mut samples = Vec::new();
    let end = Instant::now() + length;
    if crr {
        while Instant::now() < end {
            let t = Instant::now();
            drop(open()?);
            samples.push(t.elapsed());
        }
        return Ok(samples);
    }
    let mut r = open()?;
    let mut byte = [0u8; 1];
    while Instant::now() < end {
        let t = Instant::now();
        r.get_mut().write_all(b"x")?;
        r.read_exact(&mut byte).context("reading the echo")?;
        samples.push(t.elapsed());
    }
    Ok(samples)
}

/// iperf3 (TCP, or UDP with 64-byte datagrams at no rate limit) to `ip`: the `end`
/// object of its JSON report. In the lab a one-off server is started in the target pod
/// first; `Ends::Here` expects one listening already.
fn iperf3(
    ends: &Ends,
    ip: IpAddr,
    port: u16,
    seconds: f64,
    streams: u32,
    udp: bool,
) -> anyhow::Result<serde_json::Value> {
    let mut client = match ends {
        Ends::Lab { client, .. } => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", client, "iperf3"]);
            c
        }
        Ends::Here => Command::new("iperf3"),
    };
    client
        .args(["-J", "-c"])
        .arg(ip.to_string())
        .args(["-p", &port.to_string(), "-t", &format!("{seconds}")])
        .args(["-P", &streams.to_string()])
        .args(["--connect-timeout", "2000"]);
    if udp {
        client.args(["-u", "-b", "0", "-l", "64"]);
    }
    let mut server = match ends {
        Ends::Lab { server, .. } => Some(iperf3_server(server, port)?),
        Ends::Here => None,
    };
    let result = (|| {
        if let Some((_, listening)) = &server {
            listening
                .recv_timeout(Duration::from_secs(10))
                .context("iperf3 server did not start listening")?;
        }
        let out = client
            .output()
            .context("running the iperf3 client (is iperf3 installed?)")?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
        if let Some(e) = v.get("error") {
            bail!("iperf3: {e} (does a policy drop port {port}?)");
        }
        Ok(v["end"].clone())
    })();
    if let Some((child, _)) = server.as_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

/// A one-off iperf3 server in lab netns `netns`, and a channel told once it listens.
fn iperf3_server(
    netns: &str,
    port: u16,
) -> anyhow::Result<(std::process::Child, std::sync::mpsc::Receiver<()>)> {
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "iperf3",
            "-s",
            "-1",
            "--forceflush",
            "-p",
        ])
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("running iperf3 (install it: cargo xtask setup)")?;
    // Readiness: iperf3 says "Server listening on <port>" once it listens.
    let stdout = server.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains("listening") {
                let _ = tx.send(());
            }
        }
    });
    Ok((server, rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let mut s: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let l = percentiles(&mut s);
        assert_eq!(
            (l.p50_us, l.p90_us, l.p99_us, l.max_us),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(percentiles(&mut []), Latency::default());
    }

    #[test]
    fn addresses_take_an_optional_port() {
        let v4: IpAddr = "10.244.1.7".parse().unwrap();
        assert_eq!(parse_address("10.244.1.7").unwrap(), (v4, None));
        assert_eq!(parse_address("10.244.1.7:8080").unwrap(), (v4, Some(8080)));
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(parse_address("[fd00::1]:80").unwrap(), (v6, Some(80)));
        assert_eq!(parse_address("fd00::1").unwrap(), (v6, None));
        assert!(parse_address("server:80").is_err());
    }

    /// rr and crr from here against a stand-in for `netpol-lab serve` on loopback: the
    /// address form measures without any lab.
    #[test]
    fn address_form_measures_against_a_greeting_echo_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { break };
                std::thread::spawn(move || {
                    let _ = s.write_all(format!("netpol-lab {port}\n").as_bytes());
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = s.read(&mut buf) {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let address = format!("127.0.0.1:{port}");
        let opts = LoadOptions::default();
        let rr = load_address(&address, LoadKind::Rr, 0.2, &opts).unwrap();
        assert_eq!(
            (rr.port, rr.to.as_str(), rr.address.as_str()),
            (port, address.as_str(), "127.0.0.1")
        );
        assert!(rr.transactions.unwrap() > 10, "{rr:?}");
        assert!(rr.latency.unwrap().p50_us > 0.0);
        let crr = load_address(&address, LoadKind::Crr, 0.2, &opts).unwrap();
        assert!(crr.connections_per_sec.unwrap() > 10.0, "{crr:?}");
        // Something that does not greet like the lab server is not measured.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = format!("127.0.0.1:{}", silent.local_addr().unwrap().port());
        std::thread::spawn(move || {
            for s in silent.incoming() {
                let Ok(mut s) = s else { break };
                let _ = s.write_all(b"hello\n");
            }
        });
        assert!(load_address(&other, LoadKind::Rr, 0.2, &opts).is_err());
    }
}

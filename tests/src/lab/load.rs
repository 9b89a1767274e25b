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
    let port = opts.port;
    let streams = opts.streams.max(1);
    if streams > 128 {
        bail!("--streams {streams}: at most 128");
    }
    let state = super::read_state(name)?;
    let src = pod(&state.status.pods, from, name)?;
    let dst = pod(&state.status.pods, to, name)?;
    let ip: IpAddr = dst
        .ips
        .first()
        .context("the target pod has no address")?
        .parse()?;
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
            let end = iperf3(&src.netns, &dst.netns, ip, port, whole, streams, false)?;
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
            let end = iperf3(&src.netns, &dst.netns, ip, port, whole, streams, true)?;
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
            let netns = src.netns.clone();
            let crr = kind == LoadKind::Crr;
            let mut samples = std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                super::probe::enter_netns(&netns)?;
                transactions(addr, crr, Duration::from_secs_f64(seconds))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
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

/// iperf3 from `src` to a one-off server in `dst` (TCP, or UDP with 64-byte datagrams at
/// no rate limit): the `end` object of its JSON report.
fn iperf3(
    src: &str,
    dst: &str,
    ip: IpAddr,
    port: u16,
    seconds: f64,
    streams: u32,
    udp: bool,
) -> anyhow::Result<serde_json::Value> {
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            dst,
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
    let result = (|| {
        rx.recv_timeout(Duration::from_secs(10))
            .context("iperf3 server did not start listening")?;
        let mut client = Command::new("ip");
        client
            .args(["netns", "exec", src, "iperf3", "-J", "-c"])
            .arg(ip.to_string())
            .args(["-p", &port.to_string(), "-t", &format!("{seconds}")])
            .args(["-P", &streams.to_string()])
            .args(["--connect-timeout", "2000"]);
        if udp {
            client.args(["-u", "-b", "0", "-l", "64"]);
        }
        let out = client.output().context("running the iperf3 client")?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
        if let Some(e) = v.get("error") {
            bail!("iperf3: {e} (does a policy drop port {port}?)");
        }
        Ok(v["end"].clone())
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
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
}

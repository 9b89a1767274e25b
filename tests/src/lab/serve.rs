//! `netpol lab serve`: the pod's workload. It answers on every declared port, so that a
//! probe tells "policy dropped it" (timeout) from "nothing listens" (refused).

use std::io::Write;
use std::net::{Ipv6Addr, SocketAddr};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;

/// `dns`: the records file; TCP and UDP port 53 then speak DNS instead of echoing.
/// `who`: the pod's name, sent in the TCP greeting so a prober knows which backend of a
/// Service answered.
pub fn serve(
    tcp: &[u16],
    udp: &[u16],
    who: Option<&str>,
    dns: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    if tcp.is_empty() && udp.is_empty() {
        bail!("nothing to serve: give --tcp and/or --udp ports");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // `[::]` takes IPv4 too (v4-mapped), as long as net.ipv6.bindv6only is 0.
        let any = |port| SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
        // Bind everything before announcing readiness: the supervisor waits for it.
        let mut tasks = JoinSet::new();
        let is_dns = |port: u16| dns.is_some() && port == 53;
        if let Some(path) = dns {
            let udp = UdpSocket::bind(any(53))
                .await
                .context("binding UDP port 53")?;
            let tcp = TcpListener::bind(any(53))
                .await
                .context("binding TCP port 53")?;
            tasks.spawn(super::dns::serve(path.to_path_buf(), udp, tcp));
        }
        for &port in tcp.iter().filter(|p| !is_dns(**p)) {
            let listener = TcpListener::bind(any(port))
                .await
                .with_context(|| format!("binding TCP port {port}"))?;
            tasks.spawn(accept_loop(listener, port, who.map(str::to_string)));
        }
        for &port in udp.iter().filter(|p| !is_dns(**p)) {
            let socket = UdpSocket::bind(any(port))
                .await
                .with_context(|| format!("binding UDP port {port}"))?;
            tasks.spawn(echo_datagrams(socket, port));
        }
        let mut stdout = std::io::stdout();
        writeln!(stdout, "ready")?;
        stdout.flush()?;
        // The loops only end on a socket error; one failing is the server failing.
        match tasks.join_next().await {
            Some(result) => result?,
            None => Ok(()),
        }
    })
}

async fn accept_loop(listener: TcpListener, port: u16, who: Option<String>) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .with_context(|| format!("accepting on TCP port {port}"))?;
        let who = who.clone();
        tokio::spawn(async move {
            // A client going away mid-conversation is its business, not an error here.
            let _ = greet_and_echo(stream, port, who).await;
        });
    }
}

/// The greeting lets a prober check that data flows, not only that a SYN got through.
async fn greet_and_echo(
    mut stream: TcpStream,
    port: u16,
    who: Option<String>,
) -> std::io::Result<()> {
    let greeting = match who {
        Some(w) => format!("netpol-lab {port} {w}\n"),
        None => format!("netpol-lab {port}\n"),
    };
    stream.write_all(greeting.as_bytes()).await?;
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}

async fn echo_datagrams(socket: UdpSocket, port: u16) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            // An ICMP error for an earlier reply can surface here; keep serving.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e).with_context(|| format!("receiving on UDP port {port}")),
        };
        if let Err(e) = socket.send_to(&buf[..n], peer).await {
            tracing::warn!(port, %peer, error = ?e, "UDP reply failed");
        }
    }
}

//! The lab's cluster DNS: a tiny authoritative server for `cluster.local` run by the
//! kube-dns pod (`netpol lab serve --dns RECORDS`), and the stub resolver the probes use
//! from inside a pod (the nameserver of the pod's `/etc/netns/<netns>/resolv.conf`).
//!
//! supervisor ──► records.json (`<svc>.<ns>.svc.cluster.local` → ClusterIP,
//! `<pod>.<ns>.pod.cluster.local` → pod IPs) ──► server (A/AAAA over UDP and TCP,
//! re-read when the file changes) ◄── query (UDP or TCP) from a pod

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// The ClusterIP of the lab's `kube-system/kube-dns` Service.
pub const DNS_SERVICE_IP: &str = "10.96.0.10";
pub const DOMAIN: &str = "cluster.local";

/// Name → addresses, lowercase names without the trailing dot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Records {
    pub names: BTreeMap<String, Vec<IpAddr>>,
}

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_FORMERR: u8 = 1;

/// Reads the question of a query: (id, name, type, end of the question section).
fn question(msg: &[u8]) -> Option<(u16, String, u16, usize)> {
    if msg.len() < 12 || u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return None;
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let mut labels = Vec::new();
    let mut i = 12;
    loop {
        let len = *msg.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // compression is not used in questions
        }
        labels.push(String::from_utf8_lossy(msg.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]);
    Some((id, labels.join("."), qtype, i + 4))
}

/// The answer to `query` from `records`.
pub fn answer(records: &Records, query: &[u8]) -> Vec<u8> {
    let Some((id, name, qtype, end)) = question(query) else {
        let mut r = query.get(..12).map(<[u8]>::to_vec).unwrap_or(vec![0; 12]);
        r.resize(12, 0);
        r[2] = 0x80 | (r[2] & 0x01);
        r[3] = RCODE_FORMERR;
        r[4..12].fill(0);
        return r;
    };
    let known = records.names.get(&name);
    let addrs: Vec<&IpAddr> = known
        .into_iter()
        .flatten()
        .filter(|ip| match qtype {
            TYPE_A => ip.is_ipv4(),
            TYPE_AAAA => ip.is_ipv6(),
            _ => false,
        })
        .collect();
    let mut r = Vec::with_capacity(end + 16 * addrs.len());
    r.extend(id.to_be_bytes());
    // QR, AA, RD copied; RA clear.
    r.push(0x84 | (query[2] & 0x01));
    r.push(if known.is_some() { 0 } else { RCODE_NXDOMAIN });
    r.extend(1u16.to_be_bytes());
    r.extend((addrs.len() as u16).to_be_bytes());
    r.extend([0, 0, 0, 0]);
    r.extend(&query[12..end]);
    for ip in addrs {
        r.extend([0xc0, 12]); // pointer to the question's name
        let (t, data): (u16, Vec<u8>) = match ip {
            IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
        };
        r.extend(t.to_be_bytes());
        r.extend(CLASS_IN.to_be_bytes());
        r.extend(5u32.to_be_bytes()); // TTL: short, the lab changes
        r.extend((data.len() as u16).to_be_bytes());
        r.extend(data);
    }
    r
}

/// A query for `name` of type A (`ipv6` false) or AAAA.
pub fn query_message(id: u16, name: &str, ipv6: bool) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend(id.to_be_bytes());
    q.extend([0x01, 0x00]); // RD
    q.extend(1u16.to_be_bytes());
    q.extend([0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.push(0);
    q.extend(if ipv6 { TYPE_AAAA } else { TYPE_A }.to_be_bytes());
    q.extend(CLASS_IN.to_be_bytes());
    q
}

/// The addresses of an answer, or `None` for NXDOMAIN.
fn parse_answer(msg: &[u8], id: u16) -> anyhow::Result<Option<Vec<IpAddr>>> {
    if msg.len() < 12 || u16::from_be_bytes([msg[0], msg[1]]) != id {
        bail!("not an answer to our query");
    }
    if msg[3] & 0x0f == RCODE_NXDOMAIN {
        return Ok(None);
    }
    let (_, _, _, mut i) = question(msg).context("answer without its question")?;
    let count = u16::from_be_bytes([msg[6], msg[7]]);
    let mut out = Vec::new();
    for _ in 0..count {
        // Our server always names the answer by a 2-byte pointer.
        i += 2;
        let field = |at: usize| -> anyhow::Result<u16> {
            Ok(u16::from_be_bytes([
                *msg.get(at).context("short answer")?,
                *msg.get(at + 1).context("short answer")?,
            ]))
        };
        let t = field(i)?;
        let len = field(i + 8)? as usize;
        let data = msg.get(i + 10..i + 10 + len).context("short answer")?;
        match (t, len) {
            (TYPE_A, 4) => out.push(IpAddr::from(<[u8; 4]>::try_from(data)?)),
            (TYPE_AAAA, 16) => out.push(IpAddr::from(<[u8; 16]>::try_from(data)?)),
            _ => {}
        }
        i += 10 + len;
    }
    Ok(Some(out))
}

/// How a resolution ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    Answered,
    Nxdomain,
    Timeout,
    Refused,
}

/// Asks `server` about `name` over UDP or TCP (from the calling thread's netns).
pub fn query(
    server: SocketAddr,
    name: &str,
    ipv6: bool,
    tcp: bool,
    timeout: Duration,
) -> (Resolution, Vec<IpAddr>) {
    let id = (SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos()
        & 0xffff) as u16;
    let msg = query_message(id, name, ipv6);
    let reply = if tcp {
        query_tcp(server, &msg, timeout)
    } else {
        query_udp(server, &msg, timeout)
    };
    match reply {
        Ok(bytes) => match parse_answer(&bytes, id) {
            Ok(Some(addrs)) => (Resolution::Answered, addrs),
            Ok(None) => (Resolution::Nxdomain, vec![]),
            Err(_) => (Resolution::Timeout, vec![]),
        },
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            (Resolution::Refused, vec![])
        }
        Err(_) => (Resolution::Timeout, vec![]),
    }
}

fn query_udp(server: SocketAddr, msg: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let any: SocketAddr = if server.is_ipv6() {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    let s = UdpSocket::bind(any)?;
    s.set_read_timeout(Some(timeout))?;
    s.connect(server)?;
    s.send(msg)?;
    let mut buf = vec![0u8; 1500];
    let n = s.recv(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

fn query_tcp(server: SocketAddr, msg: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&server, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend(msg);
    s.write_all(&framed)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// The nameserver of a pod (its resolv.conf), as `ip netns exec` would show it.
pub fn nameserver_of(netns: &str) -> Option<IpAddr> {
    let text = std::fs::read_to_string(resolv_conf(netns)).ok()?;
    text.lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .find_map(|ip| ip.trim().parse().ok())
}

/// `ip netns exec` bind-mounts this file over `/etc/resolv.conf`.
pub fn resolv_conf(netns: &str) -> PathBuf {
    Path::new("/etc/netns").join(netns).join("resolv.conf")
}

/// Writes a pod's resolver configuration, as kubelet does for `ClusterFirst`.
pub fn write_resolv_conf(netns: &str, namespace: &str) -> anyhow::Result<()> {
    let path = resolv_conf(netns);
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    std::fs::write(
        &path,
        format!(
            "nameserver {DNS_SERVICE_IP}\nsearch {namespace}.svc.{DOMAIN} svc.{DOMAIN} {DOMAIN}\noptions ndots:5\n"
        ),
    )
    .with_context(|| format!("writing {}", path.display()))
}

pub fn remove_resolv_conf(netns: &str) {
    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(netns));
}

/// Serves `records` (re-read when the file changes) on the bound port-53 sockets.
pub async fn serve(
    path: PathBuf,
    udp: tokio::net::UdpSocket,
    tcp: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cache = std::sync::Arc::new(std::sync::Mutex::new((None, Records::default())));
    let load = {
        let cache = cache.clone();
        move || -> Records {
            let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
            let mut c = cache.lock().unwrap();
            if c.0 != mtime || mtime.is_none() {
                if let Ok(text) = std::fs::read(&path) {
                    if let Ok(r) = serde_json::from_slice(&text) {
                        *c = (mtime, r);
                    }
                }
            }
            c.1.clone()
        }
    };
    let tcp_load = load.clone();
    let tcp_task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = tcp.accept().await else {
                continue;
            };
            let records = tcp_load();
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                if stream.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                if stream.read_exact(&mut q).await.is_err() {
                    return;
                }
                let a = answer(&records, &q);
                let mut out = (a.len() as u16).to_be_bytes().to_vec();
                out.extend(a);
                let _ = stream.write_all(&out).await;
            });
        }
    });
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match udp.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(_) => continue,
        };
        let a = answer(&load(), &buf[..n]);
        let _ = udp.send_to(&a, peer).await;
        if tcp_task.is_finished() {
            bail!("the TCP side of the DNS server stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_a_and_aaaa_and_nxdomain() {
        let mut records = Records::default();
        records.names.insert(
            "web.x.svc.cluster.local".into(),
            vec!["10.96.1.0".parse().unwrap(), "fd00::1".parse().unwrap()],
        );
        let q = query_message(7, "Web.x.svc.cluster.local.", false);
        let a = parse_answer(&answer(&records, &q), 7).unwrap().unwrap();
        assert_eq!(a, vec!["10.96.1.0".parse::<IpAddr>().unwrap()]);
        let q = query_message(8, "web.x.svc.cluster.local", true);
        let a = parse_answer(&answer(&records, &q), 8).unwrap().unwrap();
        assert_eq!(a, vec!["fd00::1".parse::<IpAddr>().unwrap()]);
        let q = query_message(9, "nope.x.svc.cluster.local", false);
        assert_eq!(parse_answer(&answer(&records, &q), 9).unwrap(), None);
        assert!(
            parse_answer(&answer(&records, &q), 10).is_err(),
            "id checked"
        );
        // Garbage gets a FORMERR header, not a panic.
        assert_eq!(answer(&records, &[1, 2, 3])[3], RCODE_FORMERR);
    }
}

//! The lab's cluster DNS: a tiny authoritative server for `cluster.local` run by the
//! kube-dns pod (`netpol lab serve --dns RECORDS`), and the stub resolver the probes use
//! from inside a pod (the nameserver of the pod's `/etc/netns/<netns>/resolv.conf`).
//!
//! supervisor ──► records.json (`<svc>.<ns>.svc.cluster.local` → ClusterIP,
//! `<pod>.<ns>.pod.cluster.local` → pod IPs) ──► server (A/AAAA over UDP and TCP,
//! re-read when the file changes) ◄── query (UDP or TCP) from a pod
//!
//! Both sides read and write messages with hickory-proto. The server cuts a UDP answer
//! that does not fit (512 bytes, or the query's EDNS payload) to TC and the question; the
//! client then asks again over TCP, as a stub resolver does, and reads any conforming
//! answer (compressed names, other sections, CNAME chains to the A/AAAA records).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use serde::{Deserialize, Serialize};

/// The ClusterIP of the lab's `kube-system/kube-dns` Service.
pub const DNS_SERVICE_IP: &str = "10.96.0.10";
pub const DOMAIN: &str = "cluster.local";

/// Name → addresses, lowercase names without the trailing dot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Records {
    pub names: BTreeMap<String, Vec<IpAddr>>,
}

/// TTL of every answer: short, the lab changes.
const TTL: u32 = 5;
/// The largest UDP answer without EDNS (RFC 1035 4.2.1).
const UDP_PLAIN: u16 = 512;
/// The UDP payload the server offers in its OPT record, and the most it sends whatever a
/// query advertises (its receive buffer is this size too).
const UDP_EDNS: u16 = 4096;
/// How long a TCP connection may sit idle between queries (RFC 7766 6.2.3).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// CNAMEs followed from the question's name before giving up on a loop.
const MAX_CNAME_HOPS: usize = 16;

/// What an answer travels over: UDP answers are cut to the size the query allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// `name` as a records key: lowercase, without the trailing dot.
fn key(name: &Name) -> String {
    name.to_lowercase()
        .to_ascii()
        .trim_end_matches('.')
        .to_string()
}

/// The answer to the DNS message `query` from `records`, as sent over `over`; `None` for
/// what must not be answered (a response: answering it could loop two servers).
///
/// NOERROR with the name's A or AAAA records (none if it has none of that type, or for
/// any other type), NXDOMAIN for a name not in `records`, FORMERR for what does not parse
/// or does not ask exactly one question, NOTIMP for an opcode other than QUERY, BADVERS
/// for EDNS beyond version 0. Over UDP an answer longer than 512 bytes (or than the
/// payload the query's EDNS advertises, up to 4096) goes out with TC set and no records,
/// for the client to ask again over TCP.
pub fn answer(records: &Records, query: &[u8], over: Transport) -> Option<Vec<u8>> {
    if query.get(2).is_some_and(|b| b & 0x80 != 0) {
        return None;
    }
    let request = match Message::from_vec(query) {
        Ok(m) if m.queries.len() == 1 => m,
        _ => {
            // What can be read of the header: the id and RD.
            let id = match query {
                [a, b, ..] => u16::from_be_bytes([*a, *b]),
                _ => 0,
            };
            let mut r = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
            r.metadata.recursion_desired = query.get(2).is_some_and(|b| b & 0x01 != 0);
            return r.to_vec().ok();
        }
    };
    let mut response = Message::response(request.id, request.op_code);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = request.recursion_desired;
    response.metadata.checking_disabled = request.checking_disabled;
    response.add_queries(request.queries.iter().cloned());
    // RFC 6891 6.1.1: a query with OPT gets an answer with OPT.
    if let Some(edns) = &request.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(UDP_EDNS);
        response.set_edns(ours);
        if edns.version() > 0 {
            response.metadata.response_code = ResponseCode::BADVERS;
            return response.to_vec().ok();
        }
    }
    if request.op_code != OpCode::Query {
        response.metadata.response_code = ResponseCode::NotImp;
        return response.to_vec().ok();
    }
    let q = &request.queries[0];
    match records.names.get(&key(q.name())) {
        None => response.metadata.response_code = ResponseCode::NXDomain,
        Some(addrs) => {
            for ip in addrs {
                let data = match (q.query_type(), ip) {
                    (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
                    (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                    _ => continue,
                };
                response.add_answer(Record::from_rdata(q.name().clone(), TTL, data));
            }
        }
    }
    let whole = response.to_vec().ok()?;
    let limit = match (over, &request.edns) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, None) => usize::from(UDP_PLAIN),
        (Transport::Udp, Some(_)) => usize::from(request.max_payload().min(UDP_EDNS)),
    };
    if whole.len() <= limit {
        return Some(whole);
    }
    // No partial RRset (RFC 2181 9): the question (and OPT), TC, nothing else.
    response.truncate().to_vec().ok()
}

/// `name` as asked: absolute, whether or not it ends with a dot.
fn question_name(name: &str) -> anyhow::Result<Name> {
    let mut qname =
        Name::from_ascii(name).with_context(|| format!("{name:?} is not a domain name"))?;
    qname.set_fqdn(true);
    Ok(qname)
}

/// A recursive query for `name` of type `qtype`, without EDNS (so its UDP answer is at
/// most 512 bytes).
pub fn query_message(id: u16, name: &Name, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name.clone(), qtype));
    m.to_vec().expect("a query of one valid name encodes")
}

/// How a resolution ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    Answered,
    Nxdomain,
    Timeout,
    Refused,
    /// The server answered with an error code (SERVFAIL, REFUSED, FORMERR, ...).
    Failed,
}

/// What one answer says: its outcome and addresses, and whether it was truncated (TC).
#[derive(Debug, PartialEq, Eq)]
struct Reading {
    result: Resolution,
    addresses: Vec<IpAddr>,
    truncated: bool,
}

/// Reads `msg` as the answer to our query `id` for `name` of `qtype`; `None` for what is
/// not that answer (another id, not a response, another question), which a resolver
/// ignores. The addresses are those of the question's name, or of the end of the CNAME
/// chain that starts there, of the asked type; other records (and sections) are ignored.
fn read_answer(msg: &[u8], id: u16, name: &Name, qtype: RecordType) -> Option<Reading> {
    let m = Message::from_vec(msg).ok()?;
    if m.id != id || m.message_type != MessageType::Response {
        return None;
    }
    // A FORMERR may come without the question; any other answer must repeat it.
    let asked = |q: &Query| q.query_type() == qtype && key(q.name()) == key(name);
    if m.response_code != ResponseCode::FormErr && !matches!(&m.queries[..], [q] if asked(q)) {
        return None;
    }
    let result = match m.response_code {
        ResponseCode::NoError => Resolution::Answered,
        ResponseCode::NXDomain => Resolution::Nxdomain,
        _ => Resolution::Failed,
    };
    let mut addresses = Vec::new();
    if result == Resolution::Answered {
        let mut owner = key(name);
        for _ in 0..MAX_CNAME_HOPS {
            let next = m.answers.iter().find_map(|r| match &r.data {
                RData::CNAME(target) if key(&r.name) == owner => Some(key(&target.0)),
                _ => None,
            });
            match next {
                Some(target) => owner = target,
                None => break,
            }
        }
        addresses = m
            .answers
            .iter()
            .filter(|r| key(&r.name) == owner)
            .filter_map(|r| match (&r.data, qtype) {
                (RData::A(a), RecordType::A) => Some(IpAddr::V4(a.0)),
                (RData::AAAA(a), RecordType::AAAA) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect();
    }
    Some(Reading {
        result,
        addresses,
        truncated: m.truncation,
    })
}

/// What [`lookup`] found, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub result: Resolution,
    pub addresses: Vec<IpAddr>,
    /// "udp", "tcp", or "udp→tcp" when a truncated UDP answer was asked again over TCP.
    pub transport: String,
    /// A UDP answer came back truncated (TC).
    pub truncated: bool,
}

/// Asks `server` about `name` over UDP or TCP (from the calling thread's netns). Over
/// UDP, a truncated answer is asked again over TCP, as a stub resolver does; its outcome
/// is the TCP one. An error only for a name that is not a domain name.
pub fn lookup(
    server: SocketAddr,
    name: &str,
    ipv6: bool,
    tcp: bool,
    timeout: Duration,
) -> anyhow::Result<Lookup> {
    let id = (SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos()
        & 0xffff) as u16;
    let qname = question_name(name)?;
    let qtype = if ipv6 {
        RecordType::AAAA
    } else {
        RecordType::A
    };
    let msg = query_message(id, &qname, qtype);
    let failed = |e: std::io::Error| Reading {
        result: if e.kind() == std::io::ErrorKind::ConnectionRefused {
            Resolution::Refused
        } else {
            Resolution::Timeout
        },
        addresses: vec![],
        truncated: false,
    };
    let over_tcp = || {
        query_tcp(server, &msg, timeout)
            .and_then(|bytes| {
                read_answer(&bytes, id, &qname, qtype).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "not our answer")
                })
            })
            .unwrap_or_else(failed)
    };
    let (r, transport, truncated) = if tcp {
        (over_tcp(), "tcp", false)
    } else {
        let r = query_udp(server, &msg, timeout, |bytes| {
            read_answer(bytes, id, &qname, qtype)
        })
        .unwrap_or_else(failed);
        if r.truncated {
            (over_tcp(), "udp→tcp", true)
        } else {
            (r, "udp", false)
        }
    };
    Ok(Lookup {
        result: r.result,
        addresses: r.addresses,
        transport: transport.into(),
        truncated,
    })
}

/// [`lookup`]'s outcome and addresses; a name that is not a domain name is never asked
/// and so never answered (`Timeout`).
pub fn query(
    server: SocketAddr,
    name: &str,
    ipv6: bool,
    tcp: bool,
    timeout: Duration,
) -> (Resolution, Vec<IpAddr>) {
    match lookup(server, name, ipv6, tcp, timeout) {
        Ok(l) => (l.result, l.addresses),
        Err(_) => (Resolution::Timeout, vec![]),
    }
}

/// Sends `msg` and waits until `timeout` for a datagram that `read` takes as the answer,
/// ignoring any other (RFC 5452 9.1).
fn query_udp<T>(
    server: SocketAddr,
    msg: &[u8],
    timeout: Duration,
    read: impl Fn(&[u8]) -> Option<T>,
) -> std::io::Result<T> {
    let any: SocketAddr = if server.is_ipv6() {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    let s = UdpSocket::bind(any)?;
    s.connect(server)?;
    s.send(msg)?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65535];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        let n = s.recv(&mut buf)?;
        if let Some(answer) = read(&buf[..n]) {
            return Ok(answer);
        }
    }
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
            let load = tcp_load.clone();
            // Queries one after another on the connection until the client closes it or
            // leaves it idle (RFC 7766 6.2.1), each with its 2-byte length.
            tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 2];
                    match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
                        Ok(Ok(_)) => {}
                        _ => return,
                    }
                    let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                    if stream.read_exact(&mut q).await.is_err() {
                        return;
                    }
                    let Some(a) = answer(&load(), &q, Transport::Tcp) else {
                        continue;
                    };
                    let mut out = (a.len() as u16).to_be_bytes().to_vec();
                    out.extend(a);
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut buf = vec![0u8; usize::from(UDP_EDNS)];
    loop {
        let (n, peer) = match udp.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(_) => continue,
        };
        if let Some(a) = answer(&load(), &buf[..n], Transport::Udp) {
            let _ = udp.send_to(&a, peer).await;
        }
        if tcp_task.is_finished() {
            bail!("the TCP side of the DNS server stopped");
        }
    }
}

#[cfg(test)]
mod tests;

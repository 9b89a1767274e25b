//! A small rtnetlink client, shared by discovery and the pod-start hold: one socket
//! subscribed to link, address and namespace-id events, and dumps of links and of one
//! namespace's addresses, read into the few records the datapath needs.
//!
//! The subscription sets `NETLINK_LISTEN_ALL_NSID`: besides the node's own events it
//! receives those of every network namespace that has an id in the node's namespace,
//! tagged with that id. A pod's namespace gets one as soon as its veth's host side is in
//! the node (the veth's `IFLA_LINK_NETNSID` is that id), so the addresses a pod is given
//! are seen as they are added, without entering its namespace. Dumps of a pod
//! namespace's addresses name it by the same id (`IFA_TARGET_NETNSID`, strict checking).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// From the kernel's uapi headers (not all of them are in the libc crate).
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;
const NETLINK_LISTEN_ALL_NSID: libc::c_int = 8;
const NETLINK_GET_STRICT_CHK: libc::c_int = 12;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_DUMP_INTR: u16 = 16;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_LINK_NETNSID: u16 = 37;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_TARGET_NETNSID: u16 = 10;
const NETNSA_NSID: u16 = 1;
const HEADER: usize = 16;
const IFINFOMSG: usize = 16;
const IFADDRMSG: usize = 8;

/// A link of the node's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// The bridge (or other master) it is a port of; 0: none.
    pub master: u32,
    /// The other end of a veth that lives in another namespace.
    pub peer: Option<Peer>,
}

/// A veth's other end: its namespace (by its id in the node's namespace) and ifindex there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub nsid: i32,
    pub ifindex: u32,
}

/// An event or a dumped record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A link of the node's namespace appeared or changed.
    Link(Link),
    /// A link of the node's namespace is gone (deleted or moved away).
    LinkGone(u32),
    /// An address on interface `ifindex` of namespace `nsid` (None: the node's).
    Addr {
        nsid: Option<i32>,
        ifindex: u32,
        ip: IpAddr,
        added: bool,
    },
    /// A namespace id was released: what was heard from that namespace is stale.
    NsidGone(i32),
}

/// What one read from the subscription gave.
pub enum Received {
    Messages(Vec<Message>),
    /// The socket's buffer overflowed and events were lost (`ENOBUFS`): dump again.
    Overflow,
}

pub struct Socket {
    fd: OwnedFd,
}

fn check(ret: libc::c_int, what: &str) -> io::Result<()> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn setsockopt(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    value: libc::c_int,
) -> libc::c_int {
    // SAFETY: a valid fd and an int option value that lives across the call.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            &value as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    }
}

impl Socket {
    fn open() -> io::Result<Socket> {
        // SAFETY: plain socket call; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        check(fd, "netlink socket")?;
        // SAFETY: a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_nl with its family set is a valid address.
        let ret = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        check(ret, "binding a netlink socket")?;
        Ok(Socket { fd })
    }

    /// Subscribed to link, IPv4 and IPv6 address and namespace-id events of the node's
    /// namespace and of every namespace with an id in it.
    pub fn subscribe() -> io::Result<Socket> {
        let s = Socket::open()?;
        for group in [
            libc::RTNLGRP_LINK,
            libc::RTNLGRP_IPV4_IFADDR,
            libc::RTNLGRP_IPV6_IFADDR,
            libc::RTNLGRP_NSID,
        ] {
            let ret = setsockopt(
                &s.fd,
                libc::SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                group as i32,
            );
            check(ret, &format!("joining rtnetlink group {group}"))?;
        }
        let ret = setsockopt(&s.fd, libc::SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, 1);
        check(
            ret,
            "NETLINK_LISTEN_ALL_NSID (the agent needs CAP_NET_BROADCAST)",
        )?;
        // A burst of pods must not overflow the socket (an overflow is ENOBUFS: dump
        // again). Best effort: without CAP_NET_ADMIN the default size stays.
        let _ = setsockopt(&s.fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20);
        Ok(s)
    }

    /// For dumps; requests are checked strictly (needed to name another namespace).
    pub fn requests() -> io::Result<Socket> {
        let s = Socket::open()?;
        let ret = setsockopt(&s.fd, libc::SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1);
        check(ret, "NETLINK_GET_STRICT_CHK")?;
        Ok(s)
    }

    /// Blocks for the next datagram of events.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        loop {
            let mut control = [0u64; 8];
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: msghdr zeroed, then pointed at buffers that outlive the call.
            let (n, nsid) = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = std::mem::size_of_val(&control);
                let n = libc::recvmsg(self.fd.as_raw_fd(), &mut msg, 0);
                (n, if n >= 0 { nsid_of(&msg) } else { None })
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => return Ok(Received::Overflow),
                    _ => return Err(e),
                }
            }
            let mut out = Vec::new();
            for (kind, _, _, body) in messages(&buf[..n as usize]) {
                out.extend(parse(kind, body, nsid));
            }
            return Ok(Received::Messages(out));
        }
    }

    /// Every link of the node's namespace.
    pub fn dump_links(&self) -> io::Result<Vec<Message>> {
        let mut req = header(libc::RTM_GETLINK, IFINFOMSG);
        req[HEADER] = libc::AF_UNSPEC as u8;
        self.dump(&req, None)
    }

    /// Every address of namespace `nsid` (None: the node's).
    pub fn dump_addrs(&self, nsid: Option<i32>) -> io::Result<Vec<Message>> {
        let mut req = header(libc::RTM_GETADDR, IFADDRMSG);
        req[HEADER] = libc::AF_UNSPEC as u8;
        if let Some(id) = nsid {
            push_attr(&mut req, IFA_TARGET_NETNSID, &id.to_ne_bytes());
        }
        self.dump(&req, nsid)
    }

    /// Sends a dump request and reads its answer; an answer interrupted by a change
    /// (`NLM_F_DUMP_INTR`: inconsistent) is asked again.
    fn dump(&self, req: &[u8], nsid: Option<i32>) -> io::Result<Vec<Message>> {
        let mut buf = vec![0u8; 1 << 16];
        'again: for _ in 0..8 {
            // SAFETY: a valid buffer of that length.
            let n = unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut out = Vec::new();
            let mut interrupted = false;
            loop {
                // SAFETY: a valid buffer of that length.
                let n = unsafe {
                    libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    return Err(e);
                }
                for (kind, flags, _, body) in messages(&buf[..n as usize]) {
                    interrupted |= flags & NLM_F_DUMP_INTR != 0;
                    match kind {
                        NLMSG_DONE => match i32_of(body) {
                            Some(errno) if errno < 0 => {
                                return Err(io::Error::from_raw_os_error(-errno))
                            }
                            _ if interrupted => continue 'again,
                            _ => return Ok(out),
                        },
                        NLMSG_ERROR => {
                            let errno = body
                                .get(..4)
                                .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                                .unwrap_or(-libc::EIO);
                            return Err(io::Error::from_raw_os_error(-errno));
                        }
                        _ => out.extend(parse(kind, body, nsid)),
                    }
                }
            }
        }
        Err(io::Error::other(
            "the dump kept being interrupted by changes",
        ))
    }
}

/// The namespace id a received datagram came from (None: the socket's own namespace).
///
/// # Safety
/// `msg` must be a msghdr filled by `recvmsg`, with its control buffer still alive.
unsafe fn nsid_of(msg: &libc::msghdr) -> Option<i32> {
    // SAFETY: the caller's msghdr and its control buffer are alive; the CMSG_* macros walk
    // only within msg_controllen, and each header they return is checked for null.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_NETLINK && (*c).cmsg_type == NETLINK_LISTEN_ALL_NSID {
                return Some(std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const i32));
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

/// A request header for a dump of `kind`, followed by a zeroed family header.
fn header(kind: u16, family_header: usize) -> Vec<u8> {
    let mut req = vec![0u8; HEADER + family_header];
    req[4..6].copy_from_slice(&kind.to_ne_bytes());
    req[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req
}

fn push_attr(req: &mut Vec<u8>, kind: u16, data: &[u8]) {
    req.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    req.extend_from_slice(&kind.to_ne_bytes());
    req.extend_from_slice(data);
    req.resize((req.len() + 3) & !3, 0);
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
}

/// The netlink messages of a datagram: (type, flags, sequence, body).
fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, u16, u32, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < HEADER {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        if len < HEADER || len > buf.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let flags = u16::from_ne_bytes([buf[6], buf[7]]);
        let seq = u32::from_ne_bytes(buf[8..12].try_into().unwrap());
        let body = &buf[HEADER..len];
        buf = &buf[((len + 3) & !3).min(buf.len())..];
        Some((kind, flags, seq, body))
    })
}

/// The attributes of a message body after its fixed header: (type, payload).
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        // The top bits are the nested and byte-order flags.
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let data = &buf[4..len];
        buf = &buf[((len + 3) & !3).min(buf.len())..];
        Some((kind, data))
    })
}

fn u32_of(data: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(..4)?.try_into().ok()?))
}

fn i32_of(data: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(data.get(..4)?.try_into().ok()?))
}

/// One message body (`nsid`: the namespace it came from or was dumped from).
pub fn parse(kind: u16, body: &[u8], nsid: Option<i32>) -> Option<Message> {
    match kind {
        libc::RTM_NEWLINK | libc::RTM_DELLINK => {
            // Links of pods' namespaces are theirs, not ports; the bridge's own
            // (AF_BRIDGE) notifications repeat what the link's say.
            if nsid.is_some() || body.len() < IFINFOMSG || body[0] != libc::AF_UNSPEC as u8 {
                return None;
            }
            let ifindex = u32_of(&body[4..8])?;
            if kind == libc::RTM_DELLINK {
                return Some(Message::LinkGone(ifindex));
            }
            let mut link = Link {
                ifindex,
                name: String::new(),
                master: 0,
                peer: None,
            };
            let (mut peer_ifindex, mut peer_nsid) = (None, None);
            for (attr, data) in attributes(&body[IFINFOMSG..]) {
                match attr {
                    IFLA_IFNAME => {
                        let name = data.split(|b| *b == 0).next().unwrap_or_default();
                        link.name = String::from_utf8_lossy(name).into_owned();
                    }
                    IFLA_MASTER => link.master = u32_of(data)?,
                    IFLA_LINK => peer_ifindex = u32_of(data),
                    IFLA_LINK_NETNSID => peer_nsid = i32_of(data),
                    _ => {}
                }
            }
            if let (Some(nsid), Some(ifindex)) = (peer_nsid, peer_ifindex) {
                link.peer = Some(Peer { nsid, ifindex });
            }
            Some(Message::Link(link))
        }
        libc::RTM_NEWADDR | libc::RTM_DELADDR => {
            if body.len() < IFADDRMSG {
                return None;
            }
            let family = body[0] as i32;
            let ifindex = u32_of(&body[4..8])?;
            let (mut local, mut address, mut target) = (None, None, None);
            for (attr, data) in attributes(&body[IFADDRMSG..]) {
                match attr {
                    IFA_LOCAL => local = ip_of(family, data),
                    IFA_ADDRESS => address = ip_of(family, data),
                    IFA_TARGET_NETNSID => target = i32_of(data),
                    _ => {}
                }
            }
            // IFA_LOCAL is the interface's own address where the two differ (a
            // point-to-point peer is IFA_ADDRESS); IPv6 has only IFA_ADDRESS.
            Some(Message::Addr {
                nsid: target.or(nsid),
                ifindex,
                ip: local.or(address)?,
                added: kind == libc::RTM_NEWADDR,
            })
        }
        libc::RTM_DELNSID if nsid.is_none() => attributes(body.get(4..)?)
            .find(|(attr, _)| *attr == NETNSA_NSID)
            .and_then(|(_, data)| i32_of(data))
            .map(Message::NsidGone),
        _ => None,
    }
}

fn ip_of(family: i32, data: &[u8]) -> Option<IpAddr> {
    match family {
        libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(data.get(..4)?).ok()?,
        ))),
        libc::AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(data.get(..16)?).ok()?,
        ))),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A message body: the fixed header, then attributes.
    pub(crate) fn body(fixed: &[u8], attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut out = fixed.to_vec();
        for (kind, data) in attrs {
            out.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
            out.extend_from_slice(&kind.to_ne_bytes());
            out.extend_from_slice(data);
            out.resize((out.len() + 3) & !3, 0);
        }
        out
    }

    pub(crate) fn link_body(ifindex: u32, name: &str, master: u32, peer: Option<Peer>) -> Vec<u8> {
        let mut fixed = [0u8; IFINFOMSG];
        fixed[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        let name = format!("{name}\0");
        let master = master.to_ne_bytes();
        let mut attrs: Vec<(u16, &[u8])> = vec![(IFLA_IFNAME, name.as_bytes())];
        if u32::from_ne_bytes(master) != 0 {
            attrs.push((IFLA_MASTER, &master));
        }
        let (pi, pn) = peer
            .map(|p| (p.ifindex.to_ne_bytes(), p.nsid.to_ne_bytes()))
            .unwrap_or_default();
        if peer.is_some() {
            attrs.push((IFLA_LINK, &pi));
            attrs.push((IFLA_LINK_NETNSID, &pn));
        }
        body(&fixed, &attrs)
    }

    pub(crate) fn addr_body(ifindex: u32, ip: IpAddr) -> Vec<u8> {
        let mut fixed = [0u8; IFADDRMSG];
        fixed[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        match ip {
            IpAddr::V4(v4) => {
                fixed[0] = libc::AF_INET as u8;
                body(
                    &fixed,
                    &[(IFA_ADDRESS, &v4.octets()), (IFA_LOCAL, &v4.octets())],
                )
            }
            IpAddr::V6(v6) => {
                fixed[0] = libc::AF_INET6 as u8;
                body(&fixed, &[(IFA_ADDRESS, &v6.octets())])
            }
        }
    }

    #[test]
    fn a_bridge_port_with_its_peer_in_a_pod_namespace() {
        let peer = Peer {
            nsid: 3,
            ifindex: 2,
        };
        let b = link_body(7, "veth1", 4, Some(peer));
        assert_eq!(
            parse(libc::RTM_NEWLINK, &b, None),
            Some(Message::Link(Link {
                ifindex: 7,
                name: "veth1".into(),
                master: 4,
                peer: Some(peer),
            }))
        );
        assert_eq!(
            parse(libc::RTM_DELLINK, &b, None),
            Some(Message::LinkGone(7))
        );
        // The same link as a pod's namespace sees it, or the bridge's notification.
        assert_eq!(parse(libc::RTM_NEWLINK, &b, Some(3)), None);
        let mut bridge_family = b.clone();
        bridge_family[0] = libc::AF_BRIDGE as u8;
        assert_eq!(parse(libc::RTM_NEWLINK, &bridge_family, None), None);
    }

    #[test]
    fn addresses_carry_the_namespace_they_were_heard_from() {
        let v4: IpAddr = "10.244.0.5".parse().unwrap();
        let v6: IpAddr = "fd00::af4:5".parse().unwrap();
        assert_eq!(
            parse(libc::RTM_NEWADDR, &addr_body(2, v4), Some(3)),
            Some(Message::Addr {
                nsid: Some(3),
                ifindex: 2,
                ip: v4,
                added: true
            })
        );
        assert_eq!(
            parse(libc::RTM_DELADDR, &addr_body(2, v6), None),
            Some(Message::Addr {
                nsid: None,
                ifindex: 2,
                ip: v6,
                added: false
            })
        );
        // A dumped record names its namespace itself.
        let mut fixed = [0u8; IFADDRMSG];
        fixed[0] = libc::AF_INET as u8;
        fixed[4..8].copy_from_slice(&9u32.to_ne_bytes());
        let dumped = body(
            &fixed,
            &[
                (IFA_LOCAL, &[10, 0, 0, 1]),
                (IFA_TARGET_NETNSID, &5i32.to_ne_bytes()),
            ],
        );
        assert!(matches!(
            parse(libc::RTM_NEWADDR, &dumped, None),
            Some(Message::Addr {
                nsid: Some(5),
                ifindex: 9,
                ..
            })
        ));
    }

    #[test]
    fn truncated_messages_and_attributes_are_ignored() {
        let b = link_body(7, "veth1", 4, None);
        for cut in 0..IFINFOMSG {
            assert_eq!(parse(libc::RTM_NEWLINK, &b[..cut], None), None);
        }
        // An attribute cut short ends the attribute list, not the parse.
        let m = parse(libc::RTM_NEWLINK, &b[..b.len() - 2], None).unwrap();
        assert!(matches!(m, Message::Link(Link { ifindex: 7, .. })));
        let mut dgram = Vec::new();
        for kind in [libc::RTM_NEWLINK, libc::RTM_DELLINK] {
            let mut h = vec![0u8; HEADER];
            h[0..4].copy_from_slice(&((HEADER + b.len()) as u32).to_ne_bytes());
            h[4..6].copy_from_slice(&kind.to_ne_bytes());
            dgram.extend(h);
            dgram.extend(&b);
        }
        assert_eq!(messages(&dgram).count(), 2);
        assert_eq!(messages(&dgram[..dgram.len() - 1]).count(), 1);
    }

    #[test]
    fn a_released_namespace_id() {
        let b = body(&[0, 0, 0, 0], &[(NETNSA_NSID, &4i32.to_ne_bytes())]);
        assert_eq!(
            parse(libc::RTM_DELNSID, &b, None),
            Some(Message::NsidGone(4))
        );
        assert_eq!(parse(libc::RTM_NEWNSID, &b, None), None);
    }
}

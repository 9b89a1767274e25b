//! The rtnetlink socket, on plain `libc` calls.
//!
//! Not `netlink-sys`'s `Socket`: it can set `NETLINK_LISTEN_ALL_NSID`
//! (`set_listen_all_namespaces`), but reads only with `recv`/`recvfrom`, which drop the
//! control message that says which namespace a datagram came from, and without that an
//! address event of a pod's namespace cannot be told from one of the node's. So events
//! are read here with `recvmsg`, and the id is taken from its `SOL_NETLINK` /
//! `NETLINK_LISTEN_ALL_NSID` control message.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use netlink_packet_core::{NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP_INTR};

use super::messages::{self, frames};
use super::{Message, Received};

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
                libc::NETLINK_ADD_MEMBERSHIP,
                group as i32,
            );
            check(ret, &format!("joining rtnetlink group {group}"))?;
        }
        let ret = setsockopt(&s.fd, libc::SOL_NETLINK, libc::NETLINK_LISTEN_ALL_NSID, 1);
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
        let ret = setsockopt(&s.fd, libc::SOL_NETLINK, libc::NETLINK_GET_STRICT_CHK, 1);
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
            let out = frames(&buf[..n as usize])
                .filter_map(|f| messages::parse(f.kind, f.payload, nsid))
                .collect();
            return Ok(Received::Messages(out));
        }
    }

    /// Every link of the node's namespace.
    pub fn dump_links(&self) -> io::Result<Vec<Message>> {
        self.dump(&messages::get_links(None), None)
    }

    /// Every link of pod namespace `nsid` (their MACs).
    pub fn dump_pod_links(&self, nsid: i32) -> io::Result<Vec<Message>> {
        self.dump(&messages::get_links(Some(nsid)), Some(nsid))
    }

    /// Every address of namespace `nsid` (None: the node's).
    pub fn dump_addrs(&self, nsid: Option<i32>) -> io::Result<Vec<Message>> {
        self.dump(&messages::get_addrs(nsid), nsid)
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
                for frame in frames(&buf[..n as usize]) {
                    interrupted |= frame.flags & NLM_F_DUMP_INTR != 0;
                    match frame.kind {
                        NLMSG_DONE => match frame.errno() {
                            errno if errno < 0 => return Err(io::Error::from_raw_os_error(-errno)),
                            _ if interrupted => continue 'again,
                            _ => return Ok(out),
                        },
                        NLMSG_ERROR => return Err(io::Error::from_raw_os_error(-frame.errno())),
                        kind => out.extend(messages::parse(kind, frame.payload, nsid)),
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
            if (*c).cmsg_level == libc::SOL_NETLINK
                && (*c).cmsg_type == libc::NETLINK_LISTEN_ALL_NSID
            {
                return Some(std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const i32));
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

//! The pod-start hold. A pod's bridge port exists before the agent has located the pod
//! and written its endpoint; without a filter its traffic would pass unjudged. A thread
//! of its own listens for link events (rtnetlink, `RTMGRP_LINK`) and, the moment a veth
//! whose peer lives in another network namespace joins the bridge, attaches the hold
//! programs (`hold_from_pod`, `hold_to_pod`: every IP packet dropped as
//! `PENDING_ENDPOINT`, ARP and neighbour discovery pass) at our priority and handle. The
//! sync later replaces them in place with `from_pod`/`to_pod` (a netlink change: the
//! port is never without a filter). The hold only *creates* filters (`NLM_F_EXCL`), so
//! it can never replace a real program that got there first.
//!
//! At start, a dump of the links does the same for ports that have no filter yet (pods
//! started while no agent ran). Ports whose peer is in the node's own namespace (or
//! that are not veths with a peer at all: the overlay, an uplink) are left alone.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context};
use aya::programs::tc::{NlOptions, TcAttachOptions, TcAttachType};
use aya::programs::{tc, SchedClassifier};

use super::{FILTER_HANDLE, FILTER_PRIORITY};

const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINK_NETNSID: u16 = 37;

/// Starts the hold's thread for the ports of `bridge`. It runs for the process's life.
pub fn spawn(bridge: String, programs: Vec<(TcAttachType, SchedClassifier)>) -> anyhow::Result<()> {
    let sock = open()?;
    std::thread::Builder::new()
        .name("pod-start-hold".into())
        .spawn(move || {
            if let Err(e) = run(&sock, &bridge, programs) {
                tracing::error!(error = %format!("{e:#}"), "the pod-start hold stopped");
            }
        })?;
    Ok(())
}

fn open() -> anyhow::Result<OwnedFd> {
    // SAFETY: plain socket calls; the fd is owned right away.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            bail!("netlink socket: {}", std::io::Error::last_os_error());
        }
        let sock = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        if libc::bind(
            fd,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        ) < 0
        {
            bail!(
                "binding to RTMGRP_LINK: {}",
                std::io::Error::last_os_error()
            );
        }
        // A burst of pods must not overflow the socket (an overflow is ENOBUFS: dump again).
        let size: libc::c_int = 4 << 20;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
        Ok(sock)
    }
}

fn dump(sock: &OwnedFd) -> anyhow::Result<()> {
    // nlmsghdr (16) + ifinfomsg (16)
    let mut req = [0u8; 32];
    req[0..4].copy_from_slice(&32u32.to_ne_bytes());
    req[4..6].copy_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[16] = libc::AF_UNSPEC as u8;
    // SAFETY: a valid buffer of that length.
    let n = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if n < 0 {
        bail!("RTM_GETLINK: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// One RTM_NEWLINK: (ifindex, name, master, has a peer in another namespace).
fn parse_link(msg: &[u8]) -> Option<(u32, String, u32, bool)> {
    if msg.len() < 16 {
        return None;
    }
    let ifindex = i32::from_ne_bytes(msg[4..8].try_into().ok()?) as u32;
    let (mut name, mut master, mut peer_elsewhere) = (String::new(), 0u32, false);
    let mut attrs = &msg[16..];
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            break;
        }
        let data = &attrs[4..len];
        match kind {
            IFLA_IFNAME => {
                name = String::from_utf8_lossy(data.split(|b| *b == 0).next()?).into_owned()
            }
            IFLA_MASTER if data.len() >= 4 => {
                master = u32::from_ne_bytes(data[..4].try_into().ok()?)
            }
            IFLA_LINK_NETNSID => peer_elsewhere = true,
            _ => {}
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    Some((ifindex, name, master, peer_elsewhere))
}

fn run(
    sock: &OwnedFd,
    bridge: &str,
    mut programs: Vec<(TcAttachType, SchedClassifier)>,
) -> anyhow::Result<()> {
    let bridge_c = CString::new(bridge)?;
    let mut held: BTreeSet<u32> = BTreeSet::new();
    dump(sock)?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: a valid buffer of that length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) => {
                    tracing::warn!("link events overflowed; listing the links again");
                    dump(sock)?;
                    continue;
                }
                _ => return Err(e).context("receiving link events"),
            }
        }
        // SAFETY: a C string.
        let bridge_index = unsafe { libc::if_nametoindex(bridge_c.as_ptr()) };
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= 16 {
            let len = u32::from_ne_bytes(msgs[0..4].try_into()?) as usize;
            let kind = u16::from_ne_bytes([msgs[4], msgs[5]]);
            if len < 16 || len > msgs.len() {
                break;
            }
            let body = &msgs[16..len];
            if kind == libc::RTM_DELLINK {
                if let Some((ifindex, ..)) = parse_link(body) {
                    held.remove(&ifindex);
                }
            } else if kind == libc::RTM_NEWLINK {
                if let Some((ifindex, name, master, peer_elsewhere)) = parse_link(body) {
                    if bridge_index != 0
                        && master == bridge_index
                        && peer_elsewhere
                        && held.insert(ifindex)
                    {
                        hold(&name, &mut programs);
                    }
                }
            }
            msgs = &msgs[((len + 3) & !3).min(msgs.len())..];
        }
    }
}

/// Attaches the hold to a port that has no filter of ours yet.
fn hold(ifname: &str, programs: &mut [(TcAttachType, SchedClassifier)]) {
    let _ = tc::qdisc_add_clsact(ifname);
    for (hook, prog) in programs.iter_mut() {
        match prog.attach_with_options(
            ifname,
            *hook,
            TcAttachOptions::Netlink(NlOptions {
                priority: FILTER_PRIORITY,
                handle: FILTER_HANDLE,
                ..Default::default()
            }),
        ) {
            Ok(id) => match prog.take_link(id) {
                // Owned by no process, like the real filters: the sync replaces it.
                Ok(link) => std::mem::forget(link),
                Err(e) => tracing::warn!(veth = ifname, error = %e, "hold link"),
            },
            // Already filtered (the real programs were quicker, or a previous agent's),
            // or the port is gone again: nothing to hold.
            Err(e) => tracing::debug!(veth = ifname, error = %e, "no hold attached"),
        }
    }
    tracing::debug!(veth = ifname, "pod-start hold attached");
}

//! A small rtnetlink client, shared by discovery and the pod-start hold: one socket
//! subscribed to link, address and namespace-id events, and dumps of links and of one
//! namespace's addresses, read into the few records the datapath needs.
//!
//! The subscription sets `NETLINK_LISTEN_ALL_NSID`: besides the node's own events it
//! receives those of every network namespace that has an id in the node's namespace,
//! tagged with that id. A pod's namespace gets one as soon as its veth's host side is in
//! the node (the veth's `IFLA_LINK_NETNSID` is that id), so the addresses a pod is given
//! are seen as they are added, without entering its namespace. Dumps of a pod
//! namespace's addresses and links name it by the same id (`IFA_TARGET_NETNSID`,
//! `IFLA_TARGET_NETNSID`, strict checking).
//!
//! `socket.rs` is the socket (kept hand-written: it must read the namespace id from each
//! datagram's control message); `messages.rs` builds the requests and reads the messages
//! with `netlink-packet-route`'s types.

mod messages;
mod socket;

use std::net::IpAddr;

pub use socket::Socket;

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
    /// A link of pod namespace `nsid` appeared or changed: its MAC (None: it has none).
    PodLink {
        nsid: i32,
        ifindex: u32,
        mac: Option<[u8; 6]>,
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

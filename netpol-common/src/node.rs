//! Node-wide records: events and their buckets, the config, Services, counters.

use crate::*;

/// `NP_EVENT_BUCKETS` value (keyed by host veth ifindex): one endpoint's token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBucket {
    pub last_ns: u64,
    /// Tokens in billionths of an event (one event costs 1e9).
    pub tokens: u64,
    /// Events refused since the last one written (carried by the next [`Event`]).
    pub suppressed: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<EventBucket>() == 24);

/// One ring-buffer record per reported verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub timestamp_ns: u64,
    pub ifindex: u32,
    pub endpoint: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// Cookie of the deciding policy entry (0 for a default deny).
    pub policy_cookie: u32,
    /// The endpoint's policy revision at the time of the verdict.
    pub revision: u32,
    /// Packet length in bytes.
    pub len: u32,
    pub reason: u16,
    pub sport: u16,
    pub dport: u16,
    pub direction: u8,
    pub verdict: u8,
    pub protocol: u8,
    pub tcp_flags: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
    pub saddr: Addr,
    pub daddr: Addr,
    /// Events of this endpoint refused by its token bucket since its previous event
    /// ("N more like this"; node-wide they are `event_counter::RATE_LIMITED`).
    pub suppressed: u32,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<Event>() == 88);

/// `NP_CONFIG` (array of one): node-wide switches. All zero is a valid configuration:
/// default timeouts, no event limit, no sampling, no host allowance.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `config_flags::*`.
    pub flags: u32,
    /// Events per second per endpoint (token bucket refill); 0: no limit.
    pub event_rate: u32,
    /// Events an endpoint may send in a burst (bucket size); 0: same as `event_rate`.
    pub event_burst: u32,
    /// Report one in this many newly allowed connections; 0: none.
    pub sample_allows: u32,
    /// The node's own address on the pod network (the bridge), v4-mapped.
    pub host_ipv4: Addr,
    pub host_ipv6: Addr,
    /// Conntrack idle timeouts in nanoseconds; 0: the default in [`ct_timeout`].
    pub ct_tcp_syn_ns: u64,
    pub ct_tcp_established_ns: u64,
    pub ct_tcp_close_ns: u64,
    pub ct_udp_ns: u64,
    pub ct_icmp_ns: u64,
    /// Bumped by the agent after every sync that changed a map. Conntrack entries record
    /// it beside the endpoint's revision, so a change anywhere (a peer's identity in the
    /// ipcache, say, which no endpoint revision covers) has every connection judged again
    /// at its next packet, against the maps as they are once the sync is complete.
    pub epoch: u32,
    /// Conntrack entries one pod may hold (its share of the table); 0: no bound.
    /// Beyond it the pod's new connections pass untracked when allowed (their
    /// replies are judged by policy), so one pod cannot turn the table over for all.
    pub ct_share: u32,
    /// Datagrams one pod may have in `NP_FRAGMENTS` at once; 0: no bound. Beyond
    /// it a first fragment is judged but not remembered (its later fragments drop).
    pub frag_share: u32,
    /// The low 32 bits of the cookie of the node's network namespace (cookies count up
    /// from 1 and are never reused): the cgroup hook on local delivery, which sees every
    /// namespace's sockets, judges only this one's packets. 0: judges none.
    pub netns_cookie: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 104);

pub mod config_flags {
    /// Allow traffic from the node's own addresses to local pods (kubelet probes).
    pub const ALLOW_HOST: u32 = 1;
    /// Audit everything node-wide.
    pub const AUDIT: u32 = 2;
    /// Keep established connections when a policy change no longer allows them.
    pub const KEEP_ESTABLISHED: u32 = 4;
    /// Report every verdict, allowed ones included (tests and debugging; heavy).
    pub const TRACE: u32 = 8;
    /// The hook on local delivery is wanted and not attached: egress to a VIP, whose
    /// backend may be this node where nothing would judge it, drops.
    pub const LOCAL_UNHOOKED: u32 = 16;
}

/// `NP_SERVICES` value (hash keyed by the VIP as an [`Addr`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceEntry {
    /// Names the Service for the agent (index in its list), or [`ServiceEntry::NODE`]:
    /// an address of the node itself, where only packets to a NodePort are the
    /// Services' (kube-proxy DNATs a NodePort on every local address).
    pub id: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceEntry>() == 4);

impl ServiceEntry {
    pub const NODE: u32 = u32::MAX;
}

/// `NP_NODEPORTS` key: protocol in bits 16..23, port in bits 0..15.
pub const fn nodeport_key(protocol: u8, port: u16) -> u32 {
    (protocol as u32) << 16 | port as u32
}

/// `NP_SVC_PENDING` key: a connection to a VIP seen at `from_pod`, as the hook after
/// DNAT finds it again (client veth from the mark; the source port survives DNAT and,
/// normally, the hairpin masquerade).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PendingKey {
    pub ifindex: u32,
    pub sport: u16,
    pub protocol: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<PendingKey>() == 8);

/// `NP_SVC_PENDING` value: the original (pre-DNAT) tuple's addresses and VIP port, and
/// the backend the client's egress was last judged against (all zero until then), so
/// that a reply after a policy change can be judged again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingEntry {
    pub saddr: Addr,
    pub vip: Addr,
    pub backend: Addr,
    pub vport: u16,
    pub bport: u16,
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<PendingEntry>() == 56);

/// `NP_RULE_COUNTERS` value (per CPU): what one policy rule allowed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<RuleCounter>() == 16);

/// `NP_EP_COUNTERS` value (per CPU), indexed by [`EndpointCounters::slot`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    pub packets: [u64; 4],
    pub bytes: [u64; 4],
}
const _: () = assert!(core::mem::size_of::<EndpointCounters>() == 64);

impl EndpointCounters {
    /// Slot of a verdict (`DROPPED` or `AUDIT`) in a direction.
    #[inline(always)]
    pub const fn slot(verdict: u8, dir: u8) -> usize {
        (if verdict == verdict::AUDIT { 2 } else { 0 }) + (dir as usize & 1)
    }
}

/// Caps of the token bucket, so that its arithmetic cannot overflow.
pub const MAX_EVENT_RATE: u32 = 1_000_000;

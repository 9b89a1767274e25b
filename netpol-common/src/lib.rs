//! The ABI between the netpol classifier (kernel) and the agent (userspace).
//!
//! Data flow: the agent's `compile` step produces entries of the types below, the
//! `datapath` module writes them into the maps named here, the classifier reads them
//! per packet and writes [`Event`] records and counters back. Every type is
//! `#[repr(C)]` with explicit padding and a size assert, so both sides agree byte for
//! byte. Codes ([`reason`], [`verdict`]) are never reused once published.
#![cfg_attr(not(test), no_std)]

// Userspace decoding; the classifier only writes the codes.
#[cfg(not(target_arch = "bpf"))]
pub mod codes;
pub mod policy;

/// Pinned objects live under `/sys/fs/bpf/netpol/<PIN_VERSION>/`; bump on any layout change.
pub const PIN_VERSION: &str = "v5";

/// Map names, shared by both sides.
pub mod map {
    pub const ENDPOINTS: &str = "NP_ENDPOINTS";
    pub const IPCACHE: &str = "NP_IPCACHE";
    pub const CIDRS: &str = "NP_CIDRS";
    pub const POLICY: &str = "NP_POLICY";
    pub const CONNTRACK: &str = "NP_CONNTRACK";
    pub const EVENTS: &str = "NP_EVENTS";
    pub const COUNTERS: &str = "NP_COUNTERS";
    pub const CONFIG: &str = "NP_CONFIG";
    pub const FRAGMENTS: &str = "NP_FRAGMENTS";
    pub const EVENT_BUCKETS: &str = "NP_EVENT_BUCKETS";
    /// Service VIPs (ClusterIPs): egress to them is judged after kube-proxy's DNAT.
    pub const SERVICES: &str = "NP_SERVICES";
    /// Deferred connections to a VIP, by client veth and source port (see [`PendingKey`]).
    pub const SVC_PENDING: &str = "NP_SVC_PENDING";
    /// Packets and bytes allowed per policy rule (per-CPU hash keyed by cookie; the
    /// agent creates the entries, the classifier only counts into them).
    pub const RULE_COUNTERS: &str = "NP_RULE_COUNTERS";
    /// Packets and bytes dropped and audited per endpoint id (per-CPU hash; entries
    /// created by the agent).
    pub const ENDPOINT_COUNTERS: &str = "NP_EP_COUNTERS";
}

/// Program names (the functions in netpol-ebpf).
pub mod program {
    /// TC ingress of a pod's host-side veth: what the pod sends (its egress policy).
    pub const FROM_POD: &str = "from_pod";
    /// TC egress of a pod's host-side veth: what is delivered to the pod (its ingress policy).
    pub const TO_POD: &str = "to_pod";
    /// TC egress of the overlay (`flannel.1`) and the uplink: a packet a local pod sent to
    /// a Service VIP, DNATed to a backend on another node, has its egress judged here.
    pub const TO_REMOTE: &str = "to_remote";
    /// The pod-start hold on a new pod port, until `from_pod`/`to_pod` replace it.
    pub const HOLD_FROM_POD: &str = "hold_from_pod";
    pub const HOLD_TO_POD: &str = "hold_to_pod";
}

/// The packet mark (`skb->mark`) with which `from_pod` hands a packet to a Service VIP
/// over to the hook after kube-proxy's DNAT: bits 8..11 = [`svc_mark::TAG`], bits 16..31
/// = ifindex of the client's host veth (whose egress policy is pending). Bits 0..7 and
/// 12..15 are left alone (kube-proxy uses 0x4000 to masquerade, 0x8000 to drop).
pub mod svc_mark {
    pub const TAG: u32 = 0x0E00;
    pub const TAG_MASK: u32 = 0x0F00;
    pub const IFINDEX_SHIFT: u32 = 16;
    /// Bits the classifier owns.
    pub const OURS: u32 = 0xFFFF_0F00;
    /// The largest client ifindex the mark can carry.
    pub const MAX_IFINDEX: u32 = 0xFFFF;

    /// `mark` with the pending tag for client `ifindex` (`ifindex <= MAX_IFINDEX`).
    pub const fn pending(mark: u32, ifindex: u32) -> u32 {
        (mark & !OURS) | TAG | (ifindex << IFINDEX_SHIFT)
    }

    /// The client ifindex of a pending mark, or `None` when the mark carries no tag.
    pub const fn client(mark: u32) -> Option<u32> {
        if mark & TAG_MASK == TAG {
            Some(mark >> IFINDEX_SHIFT)
        } else {
            None
        }
    }

    /// `mark` without our bits (a pending packet is judged once).
    pub const fn clear(mark: u32) -> u32 {
        mark & !OURS
    }
}

/// Default capacities; each is a flag of the agent.
pub mod capacity {
    pub const ENDPOINTS: u32 = 4096;
    pub const IPCACHE: u32 = 65536;
    pub const CIDRS: u32 = 16384;
    pub const POLICY: u32 = 262144;
    pub const CONNTRACK: u32 = 262144;
    /// First-fragment verdicts kept for the later fragments of a datagram.
    pub const FRAGMENTS: u32 = 8192;
    /// Bytes of the event ring buffer (a power of two, multiple of the page size).
    pub const EVENTS_BYTES: u32 = 1 << 22;
    /// Service VIPs.
    pub const SERVICES: u32 = 16384;
    /// Connections to a VIP between `from_pod` and the hook after DNAT.
    pub const SVC_PENDING: u32 = 65536;
    /// Policy rules counted on one node (distinct cookies in its policy map).
    pub const RULE_COUNTERS: u32 = 65536;
}

/// Reserved identities. Pod identities start at [`identity::FIRST_POD`].
pub mod identity {
    /// Wildcard in a policy key: any peer.
    pub const ANY: u32 = 0;
    /// An address that is neither a known pod nor the node (outside the cluster).
    pub const WORLD: u32 = 1;
    /// The node itself (kubelet probes, hostNetwork pods).
    pub const HOST: u32 = 2;
    pub const FIRST_POD: u32 = 256;
    /// CIDR identities (ipBlock partitions) live in their own range.
    pub const FIRST_CIDR: u32 = 1 << 24;
}

/// Traffic direction, seen from the endpoint whose policy is judged.
pub mod direction {
    pub const INGRESS: u8 = 0;
    pub const EGRESS: u8 = 1;
    /// Or-ed into `PolicyKey::direction` for the Admin tier's entries (cluster-wide
    /// policy), which are looked up apart from the NetworkPolicy/Baseline entries.
    pub const ADMIN_TIER: u8 = 2;
}

pub mod verdict {
    pub const ALLOWED: u8 = 0;
    pub const DROPPED: u8 = 1;
    /// Would have been dropped; passed because of audit mode.
    pub const AUDIT: u8 = 2;
}

/// Why a packet got its verdict. Codes are never reused.
pub mod reason {
    pub const NONE: u16 = 0;
    /// The endpoint is isolated in this direction and no policy entry allows the flow.
    pub const POLICY_DENIED: u16 = 1;
    /// A header is truncated or malformed.
    pub const MALFORMED: u16 = 2;
    /// The source address is not one of the sending pod's addresses.
    pub const SPOOFED_SOURCE: u16 = 3;
    /// An established connection is no longer allowed by the current policy.
    pub const POLICY_REVOKED: u16 = 4;
    /// The upper-layer protocol could not be found (IPv6 extension chain too long).
    pub const UNKNOWN_L4: u16 = 5;
    /// A non-first fragment whose first fragment is unknown.
    pub const FRAGMENT_UNKNOWN: u16 = 6;
    /// Allowed because it belongs to a tracked connection.
    pub const CONNTRACK: u16 = 7;
    /// Allowed by a policy entry.
    pub const POLICY_ALLOWED: u16 = 8;
    /// Allowed because the endpoint is not isolated in this direction.
    pub const NOT_ISOLATED: u16 = 9;
    /// Allowed: from the node itself to a local pod.
    pub const HOST_TRAFFIC: u16 = 10;
    /// Allowed: a later fragment of a datagram whose first fragment was allowed.
    pub const FRAGMENT: u16 = 11;
    /// Allowed: an ICMP error (unreachable, too big, time exceeded, parameter problem)
    /// quoting a packet of a tracked connection.
    pub const RELATED: u16 = 12;
    /// Allowed by an Admin-tier cluster policy rule (final, whatever NetworkPolicy says).
    pub const ADMIN_ALLOWED: u16 = 24;
    /// Denied by an Admin-tier cluster policy rule (final).
    pub const ADMIN_DENIED: u16 = 25;
    /// Allowed by a Baseline-tier rule (the pod is not isolated by NetworkPolicy).
    pub const BASELINE_ALLOWED: u16 = 26;
    /// Denied by a Baseline-tier rule (the pod is not isolated by NetworkPolicy).
    pub const BASELINE_DENIED: u16 = 27;
    /// Passed on for now: egress to a Service VIP, judged against the backend after
    /// kube-proxy's DNAT (counted again there with its verdict).
    pub const SERVICE_DEFERRED: u16 = 13;
    /// A deferred packet whose client veth is no longer an endpoint, or whose ifindex
    /// does not fit in the mark: dropped (never judged is never allowed).
    pub const SERVICE_UNKNOWN_CLIENT: u16 = 14;
    /// A pod's bridge port whose endpoint is not written yet (the pod-start hold).
    pub const PENDING_ENDPOINT: u16 = 15;
    /// Upper bound (exclusive) of reason codes, for the counter array.
    pub const COUNT: u16 = 32;

    /// The printed name of a code (`UNKNOWN` for a code this build does not know).
    #[cfg(not(target_arch = "bpf"))]
    pub fn name(code: u16) -> &'static str {
        crate::codes::Reason::from_code(code).map_or("UNKNOWN", crate::codes::Reason::name)
    }
}

/// Index into the per-CPU counter array: one slot per (verdict, reason, direction).
pub const fn counter_index(verdict: u8, reason: u16, direction: u8) -> u32 {
    ((verdict as u32) * (reason::COUNT as u32) + reason as u32) * 2 + direction as u32
}
pub const COUNTERS_LEN: u32 = counter_index(3, 0, 0);

/// Slots of `NP_COUNTERS` after the verdict counters: what happened to events.
pub mod event_counter {
    use super::COUNTERS_LEN;
    /// Events not written because the endpoint's token bucket was empty.
    pub const RATE_LIMITED: u32 = COUNTERS_LEN;
    /// Events not written because the ring buffer was full.
    pub const RING_FULL: u32 = COUNTERS_LEN + 1;
    /// Events written.
    pub const SENT: u32 = COUNTERS_LEN + 2;
    /// Allowed packets of a rule that has no entry in `NP_RULE_COUNTERS` (it is full).
    pub const RULE_UNCOUNTED: u32 = COUNTERS_LEN + 3;
    /// Dropped or audited packets of an endpoint without an `NP_EP_COUNTERS` entry.
    pub const ENDPOINT_UNCOUNTED: u32 = COUNTERS_LEN + 4;
}
/// Entries of the `NP_COUNTERS` per-CPU array.
pub const COUNTERS_MAP_LEN: u32 = COUNTERS_LEN + 5;

/// IP protocol numbers the classifier knows.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// An address as the maps hold it: IPv6, with IPv4 as v4-mapped (`::ffff:a.b.c.d`), so
/// one trie serves both families. Prefix lengths of IPv4 entries are offset by 96.
pub type Addr = [u8; 16];

pub const fn v4_mapped(a: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// `NP_ENDPOINTS`: host-side veth ifindex → the local endpoint behind it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointEntry {
    /// Endpoint id used in policy keys (never 0).
    pub id: u32,
    /// `endpoint_flags::*`.
    pub flags: u32,
    /// Policy revision of this endpoint; bumped whenever its policy entries change.
    pub revision: u32,
    /// The endpoint's own identity (reported in events).
    pub identity: u32,
    /// The pod's addresses (v4-mapped for IPv4; all zero when absent), for anti-spoofing.
    pub ipv4: Addr,
    pub ipv6: Addr,
}
const _: () = assert!(core::mem::size_of::<EndpointEntry>() == 48);

pub mod endpoint_flags {
    pub const ISOLATED_INGRESS: u32 = 1;
    pub const ISOLATED_EGRESS: u32 = 2;
    /// Would-be drops pass and are reported as AUDIT.
    pub const AUDIT: u32 = 4;
    /// Admin-tier entries exist for this endpoint in that direction.
    pub const ADMIN_INGRESS: u32 = 8;
    pub const ADMIN_EGRESS: u32 = 16;
    /// Baseline-tier entries exist (only where NetworkPolicy does not isolate).
    pub const BASELINE_INGRESS: u32 = 32;
    pub const BASELINE_EGRESS: u32 = 64;
    /// The direction is isolated only by NetworkPolicies in audit mode
    /// (`netpol.io/mode: audit`): their would-be drops pass and are reported as AUDIT.
    pub const AUDIT_INGRESS: u32 = 128;
    pub const AUDIT_EGRESS: u32 = 256;

    /// The audit flag of one direction.
    #[inline(always)]
    pub const fn audit_of(dir: u8) -> u32 {
        if dir == crate::direction::EGRESS {
            AUDIT_EGRESS
        } else {
            AUDIT_INGRESS
        }
    }

    /// (isolated, admin entries, baseline entries) flags of one direction.
    #[inline(always)]
    pub const fn of(dir: u8) -> (u32, u32, u32) {
        if dir == crate::direction::EGRESS {
            (ISOLATED_EGRESS, ADMIN_EGRESS, BASELINE_EGRESS)
        } else {
            (ISOLATED_INGRESS, ADMIN_INGRESS, BASELINE_INGRESS)
        }
    }
}

/// `NP_IPCACHE` value (LPM trie keyed by [`Addr`]): who owns an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheEntry {
    pub identity: u32,
    /// Local endpoint id when the address belongs to a pod on this node, else 0.
    pub endpoint: u32,
}
const _: () = assert!(core::mem::size_of::<IpcacheEntry>() == 8);

/// `NP_CIDRS` value (LPM trie keyed by [`Addr`]): the CIDR identity of the longest
/// ipBlock boundary containing an address (identity of the set of ipBlocks it is in).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrEntry {
    pub identity: u32,
}
const _: () = assert!(core::mem::size_of::<CidrEntry>() == 4);

/// `NP_POLICY` key data (LPM trie). The prefix covers endpoint, identity and direction
/// always ([`PolicyKey::FIXED_BITS`]); protocol and port come last so that a shorter
/// prefix wildcards them: 72 bits = any protocol, 80 = any port, 80 + n = a port prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub endpoint: u32,
    pub identity: u32,
    pub direction: u8,
    pub protocol: u8,
    /// Destination port, big-endian (so prefixes are the high bits).
    pub port_be: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);

impl PolicyKey {
    pub const FIXED_BITS: u32 = 72;
    pub const PROTO_BITS: u32 = 80;
    pub const FULL_BITS: u32 = 96;
}

/// `NP_POLICY` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntry {
    /// Names the policy and rule (resolved by the agent); 0 = none.
    pub cookie: u32,
    /// `policy_action::*`.
    pub action: u16,
    /// Higher wins when several lookups hit (tiers, deny).
    pub precedence: u16,
}
const _: () = assert!(core::mem::size_of::<PolicyEntry>() == 8);

pub mod policy_action {
    pub const ALLOW: u16 = 0;
    pub const DENY: u16 = 1;
    /// Admin tier only: skip the rest of the tier, NetworkPolicy (or Baseline) decides.
    pub const PASS: u16 = 2;
    /// Never stored: what a lookup that found nothing yields (`policy::MISS`).
    pub const MISS: u16 = 0xffff;
}

/// `NP_CONNTRACK` key: the 5-tuple in the direction of the connection's first packet.
/// IPv4 addresses are v4-mapped; ports in host order (ICMP echo: id in `sport`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);

impl CtKey {
    /// Turns the key around, in place (the classifier has no stack to spare for a copy).
    #[inline(always)]
    pub fn reverse(&mut self) {
        core::mem::swap(&mut self.saddr, &mut self.daddr);
        core::mem::swap(&mut self.sport, &mut self.dport);
    }
}

/// `NP_CONNTRACK` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub last_seen_ns: u64,
    /// [`ct_stamp`] of the originating endpoint's revision and the node's epoch when its
    /// egress was allowed (0: not checked here).
    pub egress_stamp: u64,
    /// [`ct_stamp`] of the destination endpoint's revision and epoch when its ingress
    /// was allowed.
    pub ingress_stamp: u64,
    /// `ct_flags::*`: which checks of the connection already passed.
    pub flags: u32,
    /// Cookie of the rule that allowed the originator's egress (0: none, e.g. not
    /// isolated), so that every packet of the connection is counted to it.
    pub egress_cookie: u32,
    /// Cookie of the rule that allowed the destination's ingress.
    pub ingress_cookie: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 40);

pub mod ct_flags {
    /// The originator's egress policy allowed the connection.
    pub const EGRESS_OK: u32 = 1;
    /// The destination's ingress policy allowed the connection.
    pub const INGRESS_OK: u32 = 2;
    /// A packet in the reply direction was seen (TCP: the connection is established).
    pub const SEEN_REPLY: u32 = 4;
    /// `EGRESS_OK` was granted by audit mode only (the policy would have dropped it).
    pub const EGRESS_AUDIT: u32 = 8;
    /// `INGRESS_OK` was granted by audit mode only.
    pub const INGRESS_AUDIT: u32 = 16;
    /// TCP: a FIN from the originator was seen.
    pub const FIN_ORIG: u32 = 32;
    /// TCP: a FIN from the replier was seen.
    pub const FIN_REPLY: u32 = 64;
    /// TCP: a RST was seen.
    pub const RST: u32 = 128;
    /// Keyed by the client's tuple to a Service VIP; `EGRESS_OK` was granted after DNAT
    /// against the real backend. Replies (source = VIP) pass on it; only the client's
    /// own packets (deferred again) can re-judge it.
    pub const SERVICE: u32 = 256;
}

/// Default conntrack idle timeouts in seconds (`Config` fields of 0 mean these).
pub mod ct_timeout {
    /// TCP before a reply was seen (SYN sent).
    pub const TCP_SYN: u64 = 60;
    /// TCP after a reply, until FIN from both sides or a RST.
    pub const TCP_ESTABLISHED: u64 = 21600;
    /// TCP after FIN from both sides or a RST.
    pub const TCP_CLOSE: u64 = 10;
    /// UDP, SCTP and any other protocol.
    pub const UDP: u64 = 60;
    /// ICMP and ICMPv6 echo.
    pub const ICMP: u64 = 30;
    /// How long a first fragment's verdict waits for the later fragments (as
    /// Linux's `ipfrag_time`).
    pub const FRAGMENT: u64 = 30;
}

/// `NP_FRAGMENTS` key: one IP datagram at one hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: Addr,
    pub daddr: Addr,
    /// IPv4: the 16-bit identification; IPv6: the fragment header's identification.
    pub id: u32,
    /// The host veth the datagram crosses (each hook keeps its own verdict).
    pub ifindex: u32,
    /// IPv4 protocol, or the fragment header's next header (IPv6).
    pub protocol: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 44);

/// `NP_FRAGMENTS` value: the verdict of the datagram's first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragEntry {
    pub last_seen_ns: u64,
    /// `verdict::ALLOWED` or `verdict::DROPPED` (before audit mode).
    pub verdict: u8,
    pub _pad: u8,
    pub reason: u16,
    pub cookie: u32,
    pub peer_identity: u32,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<FragEntry>() == 24);

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
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 96);

/// What a conntrack entry records for a passed check: the endpoint's policy revision
/// beside the node's map epoch, each in its own half (two different pairs never make
/// the same stamp, which a fold of one into the other could).
#[inline(always)]
pub const fn ct_stamp(revision: u32, epoch: u32) -> u64 {
    ((epoch as u64) << 32) | revision as u64
}

pub mod config_flags {
    /// Allow traffic from the node's own addresses to local pods (kubelet probes).
    pub const ALLOW_HOST: u32 = 1;
    /// Audit everything node-wide.
    pub const AUDIT: u32 = 2;
    /// Keep established connections when a policy change no longer allows them.
    pub const KEEP_ESTABLISHED: u32 = 4;
    /// Report every verdict, allowed ones included (tests and debugging; heavy).
    pub const TRACE: u32 = 8;
}

/// `NP_SERVICES` value (hash keyed by the VIP as an [`Addr`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceEntry {
    /// Names the Service for the agent (index in its list); never read by the kernel.
    pub id: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceEntry>() == 4);

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

/// `NP_SVC_PENDING` value: the original (pre-DNAT) tuple's addresses and VIP port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingEntry {
    pub saddr: Addr,
    pub vip: Addr,
    pub vport: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<PendingEntry>() == 40);

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

#[cfg(feature = "aya")]
mod user {
    use super::*;
    unsafe impl aya::Pod for EndpointEntry {}
    unsafe impl aya::Pod for IpcacheEntry {}
    unsafe impl aya::Pod for CidrEntry {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyEntry {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragEntry {}
    unsafe impl aya::Pod for EventBucket {}
    unsafe impl aya::Pod for ServiceEntry {}
    unsafe impl aya::Pod for PendingKey {}
    unsafe impl aya::Pod for PendingEntry {}
    unsafe impl aya::Pod for RuleCounter {}
    unsafe impl aya::Pod for EndpointCounters {}
}

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
pub const PIN_VERSION: &str = "v6";

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
    /// NodePorts (hash: [`nodeport_key`] → u32, the Service's index for the agent): a
    /// pod's packet to one of the node's addresses on one of them is deferred too.
    pub const NODEPORTS: &str = "NP_NODEPORTS";
    /// Deferred connections to a VIP, by client veth and source port (see [`PendingKey`]).
    pub const SVC_PENDING: &str = "NP_SVC_PENDING";
    /// Packets and bytes allowed per policy rule (per-CPU hash keyed by cookie; the
    /// agent creates the entries, the classifier only counts into them).
    pub const RULE_COUNTERS: &str = "NP_RULE_COUNTERS";
    /// Packets and bytes dropped and audited per endpoint id (per-CPU hash; entries
    /// created by the agent).
    pub const ENDPOINT_COUNTERS: &str = "NP_EP_COUNTERS";
    /// Conntrack entries each pod holds (hash: host veth ifindex → u64), against
    /// `Config::ct_share`; counted by the classifier, corrected by the agent's sweep.
    pub const CT_HELD: &str = "NP_CT_HELD";
    /// Datagrams each pod has in `NP_FRAGMENTS` (hash: host veth ifindex → u64), against
    /// `Config::frag_share`; like [`CT_HELD`].
    pub const FRAG_HELD: &str = "NP_FRAG_HELD";
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
    /// cgroup_skb ingress of the node's cgroup tree: the same judgment as `to_remote`
    /// for packets DNATed to the node itself (a hostNetwork backend), on local delivery.
    pub const LOCAL_IN: &str = "local_in";
}

/// The packet mark (`skb->mark`) with which `from_pod` hands a packet to a Service VIP
/// over to the hook after kube-proxy's DNAT: bits 8..11 = [`svc_mark::TAG`] (its verdict
/// pending) or [`svc_mark::ESTABLISHED`] (a packet of an allowed connection, whose
/// backend is checked against the one its verdict was made for), bits 16..31 = ifindex
/// of the client's host veth. Bits 0..7 and 12..15 are left alone (kube-proxy uses
/// 0x4000 to masquerade, 0x8000 to drop).
pub mod svc_mark {
    pub const TAG: u32 = 0x0E00;
    pub const ESTABLISHED: u32 = 0x0D00;
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

    /// `mark` with the established tag for client `ifindex` (`ifindex <= MAX_IFINDEX`).
    pub const fn established(mark: u32, ifindex: u32) -> u32 {
        (mark & !OURS) | ESTABLISHED | (ifindex << IFINDEX_SHIFT)
    }

    /// The client ifindex of a tagged mark and whether its connection is established;
    /// `None` when the mark carries no tag.
    pub const fn tagged(mark: u32) -> Option<(u32, bool)> {
        match mark & TAG_MASK {
            TAG => Some((mark >> IFINDEX_SHIFT, false)),
            ESTABLISHED => Some((mark >> IFINDEX_SHIFT, true)),
            _ => None,
        }
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
    /// NodePorts (protocol and port).
    pub const NODEPORTS: u32 = 16384;
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
    /// A frame that is neither IPv4, IPv6 nor ARP, or that carries a VLAN tag (in the
    /// frame or in the skb's metadata): never passed unjudged.
    pub const UNKNOWN_L3: u16 = 16;
    /// A unicast frame delivered to the pod for an address that is not the pod's (sent
    /// to its MAC for someone else's address).
    pub const MISDIRECTED: u16 = 17;
    /// Egress to a Service VIP while the hook on local delivery is not attached
    /// (`config_flags::LOCAL_UNHOOKED`): dropped, as nothing might judge it after DNAT.
    pub const SERVICE_UNHOOKED: u16 = 18;
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
    /// New connections not tracked because their endpoint held its whole conntrack
    /// share (`Config::ct_share`).
    pub const CT_SHARE_FULL: u32 = COUNTERS_LEN + 5;
    /// First fragments not remembered because their endpoint held its whole fragments
    /// share (`Config::frag_share`): their later fragments drop.
    pub const FRAG_SHARE_FULL: u32 = COUNTERS_LEN + 6;
}
/// Entries of the `NP_COUNTERS` per-CPU array.
pub const COUNTERS_MAP_LEN: u32 = COUNTERS_LEN + 7;

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

mod conntrack;
mod endpoint;
mod node;
pub use conntrack::*;
pub use endpoint::*;
pub use node::*;

#[cfg(feature = "aya")]
mod user {
    // SAFETY (every impl): `repr(C)` plain data of integers and byte arrays, with its
    // padding spelled out as fields and its size asserted beside the type, so every bit
    // pattern is a value and aya may copy it to and from the kernel byte for byte.
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

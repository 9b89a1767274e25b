//! Every map of the classifier. The names (`NP_*`) are the ABI with the agent
//! (`netpol_common::map`); the key and value types are `netpol_common`'s `#[repr(C)]`
//! structs, whose own docs give the field meanings.

use aya_ebpf::{
    macros::map,
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf,
    },
};
use netpol_common::{
    capacity, Addr, CidrEntry, Config, CtEntry, CtKey, EndpointCounters, EndpointEntry,
    EventBucket, FragEntry, FragKey, IpcacheEntry, PendingEntry, PendingKey, PolicyEntry,
    PolicyKey, RuleCounter, ServiceEntry, COUNTERS_MAP_LEN,
};

/// Hash: host-side veth ifindex (`u32`) → [`EndpointEntry`] (the local pod behind it:
/// endpoint id, flags, policy revision, identity, its addresses).
#[map(name = "NP_ENDPOINTS")]
pub(crate) static ENDPOINTS: HashMap<u32, EndpointEntry> =
    HashMap::with_max_entries(capacity::ENDPOINTS, 0);

/// LPM trie: [`Addr`] (v4-mapped IPv6, prefix in bits) → [`IpcacheEntry`] (the
/// identity owning the address, and its local endpoint id or 0).
#[map(name = "NP_IPCACHE")]
pub(crate) static IPCACHE: LpmTrie<Addr, IpcacheEntry> =
    LpmTrie::with_max_entries(capacity::IPCACHE, 0);

/// LPM trie: [`Addr`] → [`CidrEntry`] (the CIDR identity of the longest ipBlock
/// boundary containing the address).
#[map(name = "NP_CIDRS")]
pub(crate) static CIDRS: LpmTrie<Addr, CidrEntry> = LpmTrie::with_max_entries(capacity::CIDRS, 0);

/// LPM trie: [`PolicyKey`] (endpoint, peer identity, direction | tier, then protocol
/// and big-endian port, so a shorter prefix wildcards them) → [`PolicyEntry`] (rule
/// cookie, action, precedence).
#[map(name = "NP_POLICY")]
pub(crate) static POLICY: LpmTrie<PolicyKey, PolicyEntry> =
    LpmTrie::with_max_entries(capacity::POLICY, 0);

/// LRU hash: [`CtKey`] (5-tuple in the direction of the connection's first packet) →
/// [`CtEntry`] (last seen, `ct_flags`, per-direction revision stamps and rule cookies).
#[map(name = "NP_CONNTRACK")]
pub(crate) static CONNTRACK: LruHashMap<CtKey, CtEntry> =
    LruHashMap::with_max_entries(capacity::CONNTRACK, 0);

/// LRU hash: [`FragKey`] (addresses, IP id, protocol, ifindex, direction of one
/// datagram) → [`FragEntry`] (its first fragment's verdict, reason, cookie, peer).
#[map(name = "NP_FRAGMENTS")]
pub(crate) static FRAGMENTS: LruHashMap<FragKey, FragEntry> =
    LruHashMap::with_max_entries(capacity::FRAGMENTS, 0);

/// Ring buffer of `netpol_common::Event` records (one per reported verdict).
#[map(name = "NP_EVENTS")]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

/// LRU hash: host veth ifindex (`u32`) → [`EventBucket`] (that endpoint's event token
/// bucket).
#[map(name = "NP_EVENT_BUCKETS")]
pub(crate) static EVENT_BUCKETS: LruHashMap<u32, EventBucket> =
    LruHashMap::with_max_entries(capacity::ENDPOINTS, 0);

/// Per-CPU array: slot (`counter_index(verdict, reason, dir)`, then the
/// `event_counter::*` slots) → packet count (`u64`).
#[map(name = "NP_COUNTERS")]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_MAP_LEN, 0);

/// Per-CPU hash: rule cookie (`u32`) → [`RuleCounter`] (packets and bytes it allowed).
#[map(name = "NP_RULE_COUNTERS")]
pub(crate) static RULE_COUNTERS: PerCpuHashMap<u32, RuleCounter> =
    PerCpuHashMap::with_max_entries(capacity::RULE_COUNTERS, 0);

/// Hash: a pod's host veth ifindex (`u32`) → the conntrack entries it holds (`u64`,
/// added to atomically), against `Config::ct_share`.
#[map(name = "NP_CT_HELD")]
pub(crate) static CT_HELD: HashMap<u32, u64> = HashMap::with_max_entries(capacity::ENDPOINTS, 0);

/// Hash: a pod's host veth ifindex (`u32`) → the datagrams it has in `NP_FRAGMENTS`
/// (`u64`), against
/// `Config::frag_share`.
#[map(name = "NP_FRAG_HELD")]
pub(crate) static FRAG_HELD: HashMap<u32, u64> = HashMap::with_max_entries(capacity::ENDPOINTS, 0);

/// Per-CPU hash: endpoint id (`u32`) → [`EndpointCounters`] (dropped and audited
/// packets and bytes per direction).
#[map(name = "NP_EP_COUNTERS")]
pub(crate) static ENDPOINT_COUNTERS: PerCpuHashMap<u32, EndpointCounters> =
    PerCpuHashMap::with_max_entries(capacity::ENDPOINTS, 0);

/// Array of one: index 0 → [`Config`] (node-wide switches, timeouts, epoch).
#[map(name = "NP_CONFIG")]
pub(crate) static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Per-CPU scratch space for lookup keys: the BPF stack (512 bytes for the whole call
/// chain) cannot hold them beside the parsed packet.
pub(crate) struct Scratch {
    pub(crate) ct: CtKey,
    pub(crate) addr: Key<Addr>,
    pub(crate) policy: Key<PolicyKey>,
    pub(crate) frag: FragKey,
    /// Policy hits per tier: [0] Admin, [1] NetworkPolicy/Baseline.
    pub(crate) hits: [[PolicyEntry; 3]; 2],
    pub(crate) pending: PendingEntry,
    /// The host veth the packet runs on.
    pub(crate) ifindex: u32,
    /// `ct_stamp(revision, epoch)` as they were when this packet's run began: read once,
    /// so that a sync landing meanwhile cannot stamp the run's decision as current.
    /// (Not a field of the parsed packet: there it moved the stack slots and added a
    /// third to the verifier's work.)
    pub(crate) stamp: u64,
    /// At `to_pod`, a Service packet's client as it was before kube-proxy's masquerade
    /// (when `svc_client_known` is 1): the peer its ingress is judged against.
    pub(crate) svc_client: Addr,
    /// A flag, not a cleared address: 16 bytes of zeroes are a call of `memset`.
    pub(crate) svc_client_known: u8,
    /// 1: the node sent the packet itself (it came in by no interface); a masqueraded,
    /// forwarded packet from the node's address is no host traffic.
    pub(crate) node_sent: u8,
}

/// Per-CPU array of one: index 0 → [`Scratch`] (never read by the agent).
#[map(name = "NP_SCRATCH")]
pub(crate) static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU array of one: index 0 → a packet rebuilt in its original direction (a Service
/// reply judged again against its backend), too big for the stack of that call chain
/// and kept apart from [`SCRATCH`], which the lookups it makes write (never read by the
/// agent).
#[map(name = "NP_SCRATCH_PACKET")]
pub(crate) static SCRATCH_PACKET: PerCpuArray<crate::parse::Packet> =
    PerCpuArray::with_max_entries(1, 0);

/// Hash: Service address ([`Addr`]: ClusterIPs, externalIPs, LoadBalancer addresses,
/// and the node's own with `ServiceEntry::NODE`) → [`ServiceEntry`].
#[map(name = "NP_SERVICES")]
pub(crate) static SERVICES: HashMap<Addr, ServiceEntry> =
    HashMap::with_max_entries(capacity::SERVICES, 0);

/// LRU hash: [`PendingKey`] (client veth ifindex, source port, protocol) →
/// [`PendingEntry`] (the pre-DNAT source, VIP and VIP port of a deferred connection).
#[map(name = "NP_SVC_PENDING")]
pub(crate) static SVC_PENDING: LruHashMap<PendingKey, PendingEntry> =
    LruHashMap::with_max_entries(capacity::SVC_PENDING, 0);

/// Hash: `nodeport_key(protocol, port)` → the Service's index for the agent (the
/// classifier only tests presence).
#[map(name = "NP_NODEPORTS")]
pub(crate) static NODEPORTS: HashMap<u32, u32> = HashMap::with_max_entries(capacity::NODEPORTS, 0);

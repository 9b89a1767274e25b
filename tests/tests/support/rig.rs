//! The classifier under `BPF_PROG_TEST_RUN`: crafted frames and prepared maps, shared by
//! the table tests (classifier_*.rs) and the fuzz test (fuzz.rs). Needs root.

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, RingBuf};
use aya::programs::{CgroupSkb, SchedClassifier, TestRun, TestRunOptions};
use aya::Ebpf;
use netpol_agent::datapath::{load, Capacities};
use netpol_common::{
    config_flags, counter_index, direction, endpoint_flags, map, policy_action, v4_mapped, Addr,
    Config, CtEntry, CtKey, EndpointCounters, EndpointEntry, Event, EventBucket, FragEntry,
    FragKey, IpcacheEntry, PolicyEntry, PolicyKey, RuleCounter, ServiceEntry,
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
/// BPF_PROG_TEST_RUN runs skb programs on the loopback device.
pub const LO: u32 = 1;

pub const CLIENT: [u8; 4] = [10, 244, 0, 2];
pub const SERVER: [u8; 4] = [10, 244, 0, 3];
pub const HOST: [u8; 4] = [10, 244, 0, 1];
pub const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const SERVER6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
pub const ROUTER6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// The MAC of the pod under test: the source MAC of every frame `packet::eth` builds.
pub const POD_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0];
pub const CLIENT_ID: u32 = 300;
pub const SERVER_ID: u32 = 301;
/// The endpoint's revision in a fresh rig.
pub const REVISION: u32 = 7;

pub fn key4(src: [u8; 4], dst: [u8; 4], protocol: u8, sport: u16, dport: u16) -> CtKey {
    CtKey {
        saddr: v4_mapped(src),
        daddr: v4_mapped(dst),
        sport,
        dport,
        protocol,
        _pad: [0; 3],
    }
}

pub fn key6(src: [u8; 16], dst: [u8; 16], protocol: u8, sport: u16, dport: u16) -> CtKey {
    CtKey {
        saddr: src,
        daddr: dst,
        sport,
        dport,
        protocol,
        _pad: [0; 3],
    }
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns` reads.
#[allow(unused_imports)] // not every suite reads the clock
pub use netpol_agent::datapath::live::monotonic_ns;

// ---- the rig --------------------------------------------------------------------------

pub struct Rig {
    pub ebpf: Ebpf,
    events: RingBuf<MapData>,
    pub endpoint: EndpointEntry,
}

impl Rig {
    /// The endpoint under test sits on `lo`: the server pod (IPv4 and IPv6), with the
    /// given flags; the client is a known pod identity.
    pub fn new(flags: u32) -> Rig {
        super::need_root("loads the classifier");
        let mut ebpf =
            load(&Capacities::default()).expect("classifier loads and passes the verifier");
        let events = RingBuf::try_from(ebpf.take_map(map::EVENTS).unwrap()).unwrap();
        let endpoint = EndpointEntry {
            id: SERVER_ID,
            flags,
            revision: REVISION,
            identity: SERVER_ID,
            ipv4: v4_mapped(SERVER),
            ipv6: SERVER6,
            mac: POD_MAC,
            _pad: [0; 2],
        };
        let mut rig = Rig {
            ebpf,
            events,
            endpoint,
        };
        rig.write_endpoint();
        for (addr, identity, endpoint) in [
            (v4_mapped(CLIENT), CLIENT_ID, 0),
            (v4_mapped(SERVER), SERVER_ID, SERVER_ID),
            (CLIENT6, CLIENT_ID, 0),
            (SERVER6, SERVER_ID, SERVER_ID),
            (v4_mapped(HOST), netpol_common::identity::HOST, 0),
        ] {
            rig.ipcache(addr, identity, endpoint);
        }
        rig
    }

    pub fn ipcache(&mut self, addr: Addr, identity: u32, endpoint: u32) {
        let mut ipc: LpmTrie<_, Addr, IpcacheEntry> =
            LpmTrie::try_from(self.ebpf.map_mut(map::IPCACHE).unwrap()).unwrap();
        ipc.insert(&Key::new(128, addr), IpcacheEntry { identity, endpoint }, 0)
            .unwrap();
    }

    pub fn write_endpoint(&mut self) {
        let mut eps: HashMap<_, u32, EndpointEntry> =
            HashMap::try_from(self.ebpf.map_mut(map::ENDPOINTS).unwrap()).unwrap();
        eps.insert(LO, self.endpoint, 0).unwrap();
    }

    /// Changes the endpoint entry as compile would (flags, revision).
    pub fn update_endpoint(&mut self, f: impl FnOnce(&mut EndpointEntry)) {
        f(&mut self.endpoint);
        self.write_endpoint();
    }

    pub fn config(&mut self, c: Config) {
        let mut a: Array<_, Config> =
            Array::try_from(self.ebpf.map_mut(map::CONFIG).unwrap()).unwrap();
        a.set(0, c, 0).unwrap();
    }

    fn policy_trie(&mut self) -> LpmTrie<&mut MapData, PolicyKey, PolicyEntry> {
        LpmTrie::try_from(self.ebpf.map_mut(map::POLICY).unwrap()).unwrap()
    }

    /// A rule of the server: (direction, peer identity, protocol, port) → allow.
    pub fn allow(&mut self, dir: u8, peer: u32, protocol: u8, port: u16, cookie: u32) {
        let key = PolicyKey {
            endpoint: SERVER_ID,
            identity: peer,
            direction: dir,
            protocol,
            port_be: port.to_be_bytes(),
        };
        self.policy_trie()
            .insert(
                &Key::new(PolicyKey::FULL_BITS, key),
                PolicyEntry {
                    cookie,
                    action: policy_action::ALLOW,
                    precedence: 0,
                },
                0,
            )
            .unwrap();
    }

    /// A rule allowing every protocol and port from/to `peer`.
    pub fn allow_all(&mut self, dir: u8, peer: u32, cookie: u32) {
        let key = PolicyKey {
            endpoint: SERVER_ID,
            identity: peer,
            direction: dir,
            protocol: 0,
            port_be: [0, 0],
        };
        self.policy_trie()
            .insert(
                &Key::new(PolicyKey::FIXED_BITS, key),
                PolicyEntry {
                    cookie,
                    action: policy_action::ALLOW,
                    precedence: 0,
                },
                0,
            )
            .unwrap();
    }

    pub fn revoke(&mut self, dir: u8, peer: u32, protocol: u8, port: u16) {
        let key = PolicyKey {
            endpoint: SERVER_ID,
            identity: peer,
            direction: dir,
            protocol,
            port_be: port.to_be_bytes(),
        };
        self.policy_trie()
            .remove(&Key::new(PolicyKey::FULL_BITS, key))
            .unwrap();
    }

    /// Like `run`, but `None` when the kernel refuses the frame itself (EINVAL: too
    /// short for `BPF_PROG_TEST_RUN` to build an skb of).
    pub fn try_run(&self, program: &str, packet: &[u8]) -> Option<u32> {
        let prog: &SchedClassifier = self.ebpf.program(program).unwrap().try_into().unwrap();
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..Default::default()
        };
        match prog.test_run(opts) {
            Ok(r) => Some(r.return_value),
            Err(aya::programs::ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EINVAL) =>
            {
                None
            }
            Err(e) => panic!("BPF_PROG_TEST_RUN of {} bytes: {e:?}", packet.len()),
        }
    }

    pub fn run(&self, program: &str, packet: &[u8]) -> u32 {
        let prog: &SchedClassifier = self.ebpf.program(program).unwrap().try_into().unwrap();
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..Default::default()
        };
        match prog.test_run(opts) {
            Ok(r) => r.return_value,
            Err(e) => panic!("BPF_PROG_TEST_RUN of {} bytes: {e:?}", packet.len()),
        }
    }

    /// Like `run`, with `skb->mark` set to `mark` (a packet handed over to the hook
    /// after DNAT); the action and the mark the program left.
    pub fn run_marked(&self, program: &str, packet: &[u8], mark: u32) -> (u32, u32) {
        self.run_received(program, packet, mark, 0)
    }

    /// [`Rig::run_marked`] for a packet received on interface `ingress_ifindex` (0: sent
    /// by the node itself), as one the node forwards is.
    pub fn run_received(
        &self,
        program: &str,
        packet: &[u8],
        mark: u32,
        ingress_ifindex: u32,
    ) -> (u32, u32) {
        let prog: &SchedClassifier = self.ebpf.program(program).unwrap().try_into().unwrap();
        let mut out = vec![0u8; packet.len() + 256];
        // struct __sk_buff: `mark` at offset 8, `ingress_ifindex` at 36; the kernel takes
        // only fields it allows.
        let mut ctx = vec![0u8; 192];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        let mut ctx_out = vec![0u8; 192];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ctx_out: Some(&mut ctx_out),
            ..Default::default()
        };
        let ret = prog
            .test_run(opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN with mark {mark:#x}: {e:?}"))
            .return_value;
        (ret, u32::from_ne_bytes(ctx_out[8..12].try_into().unwrap()))
    }

    /// Runs `local_in` (the cgroup hook on local delivery) on `frame` with `skb->mark`
    /// set to `mark`: 1 delivers, 0 drops. The kernel strips the Ethernet header first,
    /// as local delivery sees the packet.
    pub fn deliver_locally(&self, frame: &[u8], mark: u32) -> u32 {
        let prog: &CgroupSkb = self
            .ebpf
            .program(netpol_common::program::LOCAL_IN)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let mut ctx = vec![0u8; 192];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        };
        prog.test_run(opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of local_in, mark {mark:#x}: {e:?}"))
            .return_value
    }

    /// Makes `vip` a Service VIP (egress to it is judged after DNAT).
    pub fn service(&mut self, vip: Addr) {
        let mut m: HashMap<_, Addr, ServiceEntry> =
            HashMap::try_from(self.ebpf.map_mut(map::SERVICES).unwrap()).unwrap();
        m.insert(vip, ServiceEntry { id: 1 }, 0).unwrap();
    }

    /// Makes `node` one of the node's addresses and `port` a NodePort (egress to that
    /// address on that port is judged after DNAT).
    pub fn node_port(&mut self, node: Addr, protocol: u8, port: u16) {
        let mut m: HashMap<_, Addr, ServiceEntry> =
            HashMap::try_from(self.ebpf.map_mut(map::SERVICES).unwrap()).unwrap();
        let node_entry = ServiceEntry {
            id: ServiceEntry::NODE,
        };
        m.insert(node, node_entry, 0).unwrap();
        let mut m: HashMap<_, u32, u32> =
            HashMap::try_from(self.ebpf.map_mut(map::NODEPORTS).unwrap()).unwrap();
        m.insert(netpol_common::nodeport_key(protocol, port), 1, 0)
            .unwrap();
    }

    /// Runs `packet` `repeat` times in the kernel; the kernel's mean time per run.
    pub fn bench(&self, program: &str, packet: &[u8], repeat: u32) -> (u32, std::time::Duration) {
        let prog: &SchedClassifier = self.ebpf.program(program).unwrap().try_into().unwrap();
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        };
        let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
        (r.return_value, r.duration)
    }

    /// TC ingress of the host veth: what the pod sends.
    pub fn egress(&self, packet: &[u8]) -> u32 {
        self.run("from_pod", packet)
    }

    /// TC egress of the host veth: what is delivered to the pod.
    pub fn ingress(&self, packet: &[u8]) -> u32 {
        self.run("to_pod", packet)
    }

    pub fn next_event(&mut self) -> Option<Event> {
        let item = self.events.next()?;
        assert!(item.len() >= std::mem::size_of::<Event>());
        Some(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) })
    }

    pub fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.next_event()).collect()
    }

    pub fn conntrack(&self, key: &CtKey) -> Option<CtEntry> {
        let ct: HashMap<_, CtKey, CtEntry> =
            HashMap::try_from(self.ebpf.map(map::CONNTRACK).unwrap()).unwrap();
        ct.get(key, 0).ok()
    }

    pub fn put_conntrack(&mut self, key: &CtKey, entry: CtEntry) {
        let mut ct: HashMap<_, CtKey, CtEntry> =
            HashMap::try_from(self.ebpf.map_mut(map::CONNTRACK).unwrap()).unwrap();
        ct.insert(key, entry, 0).unwrap();
    }

    pub fn clear_conntrack(&mut self) {
        let mut ct: HashMap<_, CtKey, CtEntry> =
            HashMap::try_from(self.ebpf.map_mut(map::CONNTRACK).unwrap()).unwrap();
        let keys: Vec<CtKey> = ct.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = ct.remove(&k);
        }
    }

    pub fn conntrack_len(&self) -> usize {
        let ct: HashMap<_, CtKey, CtEntry> =
            HashMap::try_from(self.ebpf.map(map::CONNTRACK).unwrap()).unwrap();
        ct.keys().count()
    }

    pub fn fragment(&self, key: &FragKey) -> Option<FragEntry> {
        let m: HashMap<_, FragKey, FragEntry> =
            HashMap::try_from(self.ebpf.map(map::FRAGMENTS).unwrap()).unwrap();
        m.get(key, 0).ok()
    }

    pub fn clear_fragments(&mut self) {
        let mut m: HashMap<_, FragKey, FragEntry> =
            HashMap::try_from(self.ebpf.map_mut(map::FRAGMENTS).unwrap()).unwrap();
        let keys: Vec<FragKey> = m.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = m.remove(&k);
        }
    }

    /// Makes the counter entry of a rule (as the agent's sync does).
    pub fn count_rule(&mut self, cookie: u32) {
        let mut m: PerCpuHashMap<_, u32, RuleCounter> =
            PerCpuHashMap::try_from(self.ebpf.map_mut(map::RULE_COUNTERS).unwrap()).unwrap();
        let cpus = aya::util::nr_cpus().unwrap();
        m.insert(
            cookie,
            PerCpuValues::try_from(vec![RuleCounter::default(); cpus]).unwrap(),
            0,
        )
        .unwrap();
    }

    /// What the rule `cookie` allowed, summed over CPUs (None: no entry).
    pub fn rule_counter(&self, cookie: u32) -> Option<RuleCounter> {
        let m: PerCpuHashMap<_, u32, RuleCounter> =
            PerCpuHashMap::try_from(self.ebpf.map(map::RULE_COUNTERS).unwrap()).unwrap();
        let v = m.get(&cookie, 0).ok()?;
        Some(v.iter().fold(RuleCounter::default(), |a, c| RuleCounter {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        }))
    }

    /// Makes the server endpoint's counter entry (as the agent's sync does).
    pub fn count_endpoint(&mut self) {
        let mut m: PerCpuHashMap<_, u32, EndpointCounters> =
            PerCpuHashMap::try_from(self.ebpf.map_mut(map::ENDPOINT_COUNTERS).unwrap()).unwrap();
        let cpus = aya::util::nr_cpus().unwrap();
        m.insert(
            SERVER_ID,
            PerCpuValues::try_from(vec![EndpointCounters::default(); cpus]).unwrap(),
            0,
        )
        .unwrap();
    }

    /// The server endpoint's drop and audit counters, summed over CPUs.
    pub fn endpoint_counters(&self) -> EndpointCounters {
        let m: PerCpuHashMap<_, u32, EndpointCounters> =
            PerCpuHashMap::try_from(self.ebpf.map(map::ENDPOINT_COUNTERS).unwrap()).unwrap();
        let mut t = EndpointCounters::default();
        for c in m.get(&SERVER_ID, 0).unwrap().iter() {
            for i in 0..4 {
                t.packets[i] += c.packets[i];
                t.bytes[i] += c.bytes[i];
            }
        }
        t
    }

    /// The event token bucket of the rig's endpoint.
    pub fn event_bucket(&self) -> Option<EventBucket> {
        let m: HashMap<_, u32, EventBucket> =
            HashMap::try_from(self.ebpf.map(map::EVENT_BUCKETS).unwrap()).unwrap();
        m.get(&LO, 0).ok()
    }

    pub fn put_event_bucket(&mut self, b: EventBucket) {
        let mut m: HashMap<_, u32, EventBucket> =
            HashMap::try_from(self.ebpf.map_mut(map::EVENT_BUCKETS).unwrap()).unwrap();
        m.insert(LO, b, 0).unwrap();
    }

    /// Exact packets counted for (verdict, reason, direction), summed over CPUs.
    pub fn counter(&self, verdict: u8, reason: u16, dir: u8) -> u64 {
        self.slot(counter_index(verdict, reason, dir))
    }

    pub fn slot(&self, idx: u32) -> u64 {
        let a: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(map::COUNTERS).unwrap()).unwrap();
        a.get(&idx, 0).unwrap().iter().sum()
    }
}

// ---- what the tables share ----------------------------------------------------------

pub const EGRESS: u8 = direction::EGRESS;
pub const INGRESS: u8 = direction::INGRESS;

pub fn isolated() -> u32 {
    endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS
}

/// Every verdict reported (allowed ones too), so tables can check reasons of passes.
pub fn trace() -> Config {
    Config {
        flags: config_flags::TRACE,
        ..Config::default()
    }
}

/// Runs `packet` at the hook, returns (action, reason of the one event it caused).
pub fn judge(rig: &mut Rig, ingress: bool, packet: &[u8]) -> (u32, u16) {
    let action = if ingress {
        rig.ingress(packet)
    } else {
        rig.egress(packet)
    };
    let events = rig.events();
    assert_eq!(events.len(), 1, "one event per packet under TRACE");
    (action, events[0].reason)
}

pub const OK: u32 = TC_ACT_OK;
pub const SHOT: u32 = TC_ACT_SHOT;

//! The classifier on crafted packets with prepared maps (`BPF_PROG_TEST_RUN`): packet
//! bytes + map contents → verdict + event + conntrack state. Needs root.

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData, RingBuf};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::Ebpf;
use netpol_agent::datapath::{load, Capacities};
use netpol_common::{
    ct_flags, direction, endpoint_flags, map, policy_action, proto, reason, v4_mapped, verdict,
    CtEntry, CtKey, EndpointEntry, Event, IpcacheEntry, PolicyEntry, PolicyKey,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
/// BPF_PROG_TEST_RUN runs skb programs on the loopback device.
const LO: u32 = 1;

const CLIENT: [u8; 4] = [10, 244, 0, 2];
const SERVER: [u8; 4] = [10, 244, 0, 3];
const CLIENT_ID: u32 = 300;
const SERVER_ID: u32 = 301;

fn ipv4_tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 14 + 20 + 20];
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto::TCP;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let tcp = &mut p[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    p
}

struct Rig {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
}

impl Rig {
    /// The endpoint under test sits on `lo`: the server pod, with the given flags.
    fn new(flags: u32) -> Rig {
        let mut ebpf =
            load(&Capacities::default()).expect("classifier loads and passes the verifier");
        let events = RingBuf::try_from(ebpf.take_map(map::EVENTS).unwrap()).unwrap();
        let mut eps: HashMap<_, u32, EndpointEntry> =
            HashMap::try_from(ebpf.map_mut(map::ENDPOINTS).unwrap()).unwrap();
        let ep = EndpointEntry {
            id: SERVER_ID,
            flags,
            revision: 7,
            identity: SERVER_ID,
            ipv4: v4_mapped(SERVER),
            ..Default::default()
        };
        eps.insert(LO, ep, 0).unwrap();
        let mut ipc: LpmTrie<_, [u8; 16], IpcacheEntry> =
            LpmTrie::try_from(ebpf.map_mut(map::IPCACHE).unwrap()).unwrap();
        ipc.insert(
            &Key::new(128, v4_mapped(CLIENT)),
            IpcacheEntry {
                identity: CLIENT_ID,
                endpoint: 0,
            },
            0,
        )
        .unwrap();
        ipc.insert(
            &Key::new(128, v4_mapped(SERVER)),
            IpcacheEntry {
                identity: SERVER_ID,
                endpoint: SERVER_ID,
            },
            0,
        )
        .unwrap();
        Rig { ebpf, events }
    }

    fn allow(&mut self, dir: u8, peer: u32, protocol: u8, port: u16, cookie: u32) {
        let mut t: LpmTrie<_, PolicyKey, PolicyEntry> =
            LpmTrie::try_from(self.ebpf.map_mut(map::POLICY).unwrap()).unwrap();
        let key = PolicyKey {
            endpoint: SERVER_ID,
            identity: peer,
            direction: dir,
            protocol,
            port_be: port.to_be_bytes(),
        };
        t.insert(
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

    fn run(&self, program: &str, packet: &[u8]) -> u32 {
        let prog: &SchedClassifier = self.ebpf.program(program).unwrap().try_into().unwrap();
        let mut out = vec![0u8; packet.len() + 64];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..Default::default()
        };
        prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
    }

    fn next_event(&mut self) -> Option<Event> {
        let item = self.events.next()?;
        assert!(item.len() >= std::mem::size_of::<Event>());
        Some(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) })
    }

    fn conntrack(&self, key: &CtKey) -> Option<CtEntry> {
        let ct: HashMap<_, CtKey, CtEntry> =
            HashMap::try_from(self.ebpf.map(map::CONNTRACK).unwrap()).unwrap();
        ct.get(key, 0).ok()
    }
}

fn tuple(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> CtKey {
    CtKey {
        saddr: v4_mapped(src),
        daddr: v4_mapped(dst),
        sport,
        dport,
        protocol: proto::TCP,
        _pad: [0; 3],
    }
}

fn root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn default_deny_ingress_drops_a_syn_and_reports_it() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut rig = Rig::new(endpoint_flags::ISOLATED_INGRESS);
    let syn = ipv4_tcp(CLIENT, SERVER, 40000, 80, 0x02);
    assert_eq!(rig.run("to_pod", &syn), TC_ACT_SHOT);
    let ev = rig.next_event().expect("a drop event");
    assert_eq!(
        (ev.verdict, ev.reason, ev.direction),
        (verdict::DROPPED, reason::POLICY_DENIED, direction::INGRESS)
    );
    assert_eq!(
        (ev.src_identity, ev.dst_identity, ev.sport, ev.dport),
        (CLIENT_ID, SERVER_ID, 40000, 80)
    );
    assert_eq!(ev.policy_cookie, 0, "a default deny has no deciding rule");
    assert!(
        rig.conntrack(&tuple(CLIENT, SERVER, 40000, 80)).is_none(),
        "no state for a denied flow"
    );
}

#[test]
fn an_allowed_port_passes_and_only_that_port() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut rig = Rig::new(endpoint_flags::ISOLATED_INGRESS);
    rig.allow(direction::INGRESS, CLIENT_ID, proto::TCP, 80, 0x1000);
    assert_eq!(
        rig.run("to_pod", &ipv4_tcp(CLIENT, SERVER, 40000, 80, 0x02)),
        TC_ACT_OK
    );
    assert!(
        rig.next_event().is_none(),
        "allows are not reported by default"
    );
    let ct = rig
        .conntrack(&tuple(CLIENT, SERVER, 40000, 80))
        .expect("the connection is tracked");
    assert_eq!(ct.flags & ct_flags::INGRESS_OK, ct_flags::INGRESS_OK);
    assert_eq!(ct.ingress_revision, 7);
    assert_eq!(
        rig.run("to_pod", &ipv4_tcp(CLIENT, SERVER, 40001, 81, 0x02)),
        TC_ACT_SHOT
    );
}

#[test]
fn replies_of_an_allowed_connection_pass_under_default_deny_egress() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut rig = Rig::new(endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS);
    rig.allow(direction::INGRESS, CLIENT_ID, proto::TCP, 80, 0x1000);
    // A SYN-ACK with no connection behind it is an egress the policy does not allow.
    let synack = ipv4_tcp(SERVER, CLIENT, 80, 40000, 0x12);
    assert_eq!(rig.run("from_pod", &synack), TC_ACT_SHOT);
    assert_eq!(
        rig.next_event().map(|e| (e.direction, e.reason)),
        Some((direction::EGRESS, reason::POLICY_DENIED))
    );
    // After the SYN was let in, the reply passes.
    assert_eq!(
        rig.run("to_pod", &ipv4_tcp(CLIENT, SERVER, 40000, 80, 0x02)),
        TC_ACT_OK
    );
    assert_eq!(rig.run("from_pod", &synack), TC_ACT_OK);
    assert!(rig.next_event().is_none());
}

#[test]
fn a_spoofed_source_is_dropped_with_its_own_reason() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut rig = Rig::new(0);
    assert_eq!(
        rig.run(
            "from_pod",
            &ipv4_tcp([10, 244, 0, 99], CLIENT, 1234, 80, 0x02)
        ),
        TC_ACT_SHOT
    );
    assert_eq!(
        rig.next_event().map(|e| e.reason),
        Some(reason::SPOOFED_SOURCE)
    );
    assert_eq!(
        rig.run("from_pod", &ipv4_tcp(SERVER, CLIENT, 1234, 80, 0x02)),
        TC_ACT_OK,
        "not isolated"
    );
}

#[test]
fn a_truncated_header_is_a_drop_not_a_pass() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut rig = Rig::new(endpoint_flags::ISOLATED_INGRESS);
    let syn = ipv4_tcp(CLIENT, SERVER, 40000, 80, 0x02);
    assert_eq!(rig.run("to_pod", &syn[..14 + 20 + 2]), TC_ACT_SHOT);
    assert_eq!(rig.next_event().map(|e| e.reason), Some(reason::MALFORMED));
}

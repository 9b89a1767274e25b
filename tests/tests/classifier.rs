//! The classifier on crafted packets with prepared maps (`BPF_PROG_TEST_RUN`): packet
//! bytes + map contents → verdict + event + conntrack state, one table per branch of
//! the pipeline. Needs root.

mod support;

use netpol_common::{
    config_flags, ct_flags, direction, endpoint_flags, event_counter, reason, v4_mapped, verdict,
    Config, CtEntry, FragKey,
};
use support::packet::*;
use support::rig::*;

const EGRESS: u8 = direction::EGRESS;
const INGRESS: u8 = direction::INGRESS;

fn isolated() -> u32 {
    endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS
}

/// Every verdict reported (allowed ones too), so tables can check reasons of passes.
fn trace() -> Config {
    Config {
        flags: config_flags::TRACE,
        ..Config::default()
    }
}

/// Runs `packet` at the hook, returns (action, reason of the one event it caused).
fn judge(rig: &mut Rig, ingress: bool, packet: &[u8]) -> (u32, u16) {
    let action = if ingress {
        rig.ingress(packet)
    } else {
        rig.egress(packet)
    };
    let events = rig.events();
    assert_eq!(events.len(), 1, "one event per packet under TRACE");
    (action, events[0].reason)
}

const OK: u32 = TC_ACT_OK;
const SHOT: u32 = TC_ACT_SHOT;

#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn default_deny_ingress_drops_a_syn_and_reports_it() {
    let mut rig = Rig::new(endpoint_flags::ISOLATED_INGRESS);
    let syn = v4(CLIENT, SERVER, tcp(40000, 80, SYN));
    assert_eq!(rig.ingress(&syn), SHOT);
    let ev = rig.next_event().expect("a drop event");
    assert_eq!(
        (ev.verdict, ev.reason, ev.direction),
        (verdict::DROPPED, reason::POLICY_DENIED, INGRESS)
    );
    assert_eq!(
        (ev.src_identity, ev.dst_identity, ev.sport, ev.dport),
        (CLIENT_ID, SERVER_ID, 40000, 80)
    );
    assert_eq!(
        (ev.ifindex, ev.endpoint, ev.revision, ev.protocol, ev.family),
        (LO, SERVER_ID, REVISION, TCP, 4)
    );
    assert_eq!((ev.tcp_flags, ev.len), (SYN, syn.len() as u32));
    assert_eq!((ev.saddr, ev.daddr), (v4_mapped(CLIENT), v4_mapped(SERVER)));
    assert!(ev.timestamp_ns > 0 && ev.timestamp_ns <= monotonic_ns());
    assert_eq!(ev.policy_cookie, 0, "a default deny has no deciding rule");
    assert!(
        rig.conntrack(&key4(CLIENT, SERVER, TCP, 40000, 80))
            .is_none(),
        "no state for a denied flow"
    );
}

#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn an_allowed_port_passes_and_only_that_port() {
    let mut rig = Rig::new(endpoint_flags::ISOLATED_INGRESS);
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 0x1000);
    assert_eq!(rig.ingress(&v4(CLIENT, SERVER, tcp(40000, 80, SYN))), OK);
    assert!(
        rig.next_event().is_none(),
        "allows are not reported by default"
    );
    let ct = rig
        .conntrack(&key4(CLIENT, SERVER, TCP, 40000, 80))
        .expect("the connection is tracked");
    assert_eq!(ct.flags & ct_flags::INGRESS_OK, ct_flags::INGRESS_OK);
    assert_eq!(ct.ingress_revision, REVISION);
    assert_eq!(rig.ingress(&v4(CLIENT, SERVER, tcp(40001, 81, SYN))), SHOT);
}

#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn replies_of_an_allowed_connection_pass_under_default_deny_egress() {
    let mut rig = Rig::new(isolated());
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 0x1000);
    // A SYN-ACK with no connection behind it is an egress the policy does not allow.
    let synack = v4(SERVER, CLIENT, tcp(80, 40000, SYN | ACK));
    assert_eq!(rig.egress(&synack), SHOT);
    assert_eq!(
        rig.next_event().map(|e| (e.direction, e.reason)),
        Some((EGRESS, reason::POLICY_DENIED))
    );
    // After the SYN was let in, the reply passes.
    assert_eq!(rig.ingress(&v4(CLIENT, SERVER, tcp(40000, 80, SYN))), OK);
    assert_eq!(rig.egress(&synack), OK);
    assert!(rig.next_event().is_none());
}

/// Each protocol, IPv4 and IPv6: the allowed (protocol, port) passes and creates state
/// under the right key; another port of the same protocol drops; the reply passes.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn every_protocol_in_both_families_is_judged_on_its_own_ports() {
    type Mk = fn(u16, u16) -> (u8, Vec<u8>);
    let cases: [(&str, u8, Mk); 3] = [
        ("tcp", TCP, |s, d| tcp(s, d, SYN)),
        ("udp", UDP, udp),
        ("sctp", SCTP, sctp),
    ];
    for (name, protocol, mk) in cases {
        for v6_family in [false, true] {
            let mut rig = Rig::new(isolated());
            rig.config(trace());
            rig.allow(INGRESS, CLIENT_ID, protocol, 8080, 0x77);
            let (fwd, other, reply, key) = if v6_family {
                (
                    v6(CLIENT6, SERVER6, &[], mk(5000, 8080)),
                    v6(CLIENT6, SERVER6, &[], mk(5000, 8081)),
                    v6(SERVER6, CLIENT6, &[], mk(8080, 5000)),
                    key6(CLIENT6, SERVER6, protocol, 5000, 8080),
                )
            } else {
                (
                    v4(CLIENT, SERVER, mk(5000, 8080)),
                    v4(CLIENT, SERVER, mk(5000, 8081)),
                    v4(SERVER, CLIENT, mk(8080, 5000)),
                    key4(CLIENT, SERVER, protocol, 5000, 8080),
                )
            };
            let ctx = format!("{name} v6={v6_family}");
            assert_eq!(rig.ingress(&fwd), OK, "{ctx}");
            let ev = rig.next_event().unwrap();
            assert_eq!(
                (ev.reason, ev.policy_cookie, ev.protocol, ev.sport, ev.dport),
                (reason::POLICY_ALLOWED, 0x77, protocol, 5000, 8080),
                "{ctx}"
            );
            assert_eq!(ev.family, if v6_family { 6 } else { 4 }, "{ctx}");
            let ct = rig
                .conntrack(&key)
                .unwrap_or_else(|| panic!("{ctx}: tracked"));
            assert_eq!(ct.flags, ct_flags::INGRESS_OK, "{ctx}");
            assert_eq!(
                judge(&mut rig, true, &other),
                (SHOT, reason::POLICY_DENIED),
                "{ctx}"
            );
            assert_eq!(
                judge(&mut rig, false, &reply),
                (OK, reason::CONNTRACK),
                "{ctx}"
            );
            assert_ne!(
                rig.conntrack(&key).unwrap().flags & ct_flags::SEEN_REPLY,
                0,
                "{ctx}"
            );
        }
    }
}

#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn icmp_and_icmpv6_echo_are_tracked_by_their_identifier() {
    for v6_family in [false, true] {
        let mut rig = Rig::new(isolated());
        rig.config(trace());
        // The server may ping the client (any protocol to it); the client may not ping.
        rig.allow_all(EGRESS, CLIENT_ID, 0x55);
        let (req, rep, unsolicited, key) = if v6_family {
            (
                v6(SERVER6, CLIENT6, &[], icmp(true, 128, 0, 0x1234, b"ping")),
                v6(CLIENT6, SERVER6, &[], icmp(true, 129, 0, 0x1234, b"ping")),
                v6(CLIENT6, SERVER6, &[], icmp(true, 128, 0, 0x9999, b"ping")),
                key6(SERVER6, CLIENT6, ICMPV6, 0x1234, 0x1234),
            )
        } else {
            (
                v4(SERVER, CLIENT, icmp(false, 8, 0, 0x1234, b"ping")),
                v4(CLIENT, SERVER, icmp(false, 0, 0, 0x1234, b"ping")),
                v4(CLIENT, SERVER, icmp(false, 8, 0, 0x9999, b"ping")),
                key4(SERVER, CLIENT, ICMP, 0x1234, 0x1234),
            )
        };
        assert_eq!(judge(&mut rig, false, &req), (OK, reason::POLICY_ALLOWED));
        assert!(rig.conntrack(&key).is_some(), "v6={v6_family}");
        assert_eq!(judge(&mut rig, true, &rep), (OK, reason::CONNTRACK));
        assert_eq!(
            judge(&mut rig, true, &unsolicited),
            (SHOT, reason::POLICY_DENIED)
        );
    }
}

#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn ipv4_options_move_the_ports_and_a_bad_ihl_is_malformed() {
    let mut rig = Rig::new(endpoint_flags::ISOLATED_INGRESS);
    rig.config(trace());
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 1);
    for words in 1..=10usize {
        let o = V4 {
            options: vec![1; words * 4], // NOPs
            ..V4::default()
        };
        // Read at a fixed offset, the ports of these packets would be option bytes.
        let good = v4o(CLIENT, SERVER, tcp(40000 + words as u16, 80, SYN), &o);
        assert_eq!(
            judge(&mut rig, true, &good),
            (OK, reason::POLICY_ALLOWED),
            "{words} option words"
        );
        let bad = v4o(CLIENT, SERVER, tcp(40000 + words as u16, 22, SYN), &o);
        assert_eq!(
            judge(&mut rig, true, &bad),
            (SHOT, reason::POLICY_DENIED),
            "{words} option words"
        );
    }
    for ihl in 0..5u8 {
        let mut p = v4(CLIENT, SERVER, tcp(40000, 80, SYN));
        p[14] = 0x40 | ihl;
        assert_eq!(
            judge(&mut rig, true, &p),
            (SHOT, reason::MALFORMED),
            "ihl {ihl}"
        );
    }
    // IHL claims 60 bytes, the frame ends before.
    let mut p = v4(CLIENT, SERVER, udp(1, 2));
    p[14] = 0x4f;
    assert_eq!(judge(&mut rig, true, &p), (SHOT, reason::MALFORMED));
    // Version 5 in an IPv4 ethertype.
    let mut p = v4(CLIENT, SERVER, tcp(40000, 80, SYN));
    p[14] = 0x55;
    assert_eq!(judge(&mut rig, true, &p), (SHOT, reason::MALFORMED));
    // A TCP data offset below 5 words.
    let mut p = v4(CLIENT, SERVER, tcp(40000, 80, SYN));
    p[14 + 20 + 12] = 4 << 4;
    assert_eq!(judge(&mut rig, true, &p), (SHOT, reason::MALFORMED));
}

#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn ipv6_extension_headers_are_walked_to_the_upper_layer() {
    let mut rig = Rig::new(endpoint_flags::ISOLATED_INGRESS);
    rig.config(trace());
    rig.allow(INGRESS, CLIENT_ID, UDP, 53, 1);
    let atomic = Ext::Fragment {
        offset: 0,
        more: false,
        id: 9,
    };
    let chains: Vec<Vec<Ext>> = vec![
        vec![],
        vec![Ext::HopByHop],
        vec![Ext::Routing],
        vec![Ext::DestOpts],
        vec![Ext::Auth],
        vec![atomic.clone()],
        vec![
            Ext::HopByHop,
            Ext::DestOpts,
            Ext::Routing,
            atomic.clone(),
            Ext::Auth,
            Ext::DestOpts,
        ],
    ];
    for (i, chain) in chains.iter().enumerate() {
        // A new source port each time: a new connection, judged by policy.
        let good = v6(CLIENT6, SERVER6, chain, udp(1000 + i as u16, 53));
        assert_eq!(
            judge(&mut rig, true, &good),
            (OK, reason::POLICY_ALLOWED),
            "{chain:?}"
        );
        let bad = v6(CLIENT6, SERVER6, chain, udp(999, 54));
        assert_eq!(
            judge(&mut rig, true, &bad),
            (SHOT, reason::POLICY_DENIED),
            "{chain:?}"
        );
    }
    // Eight extension headers are walked; a ninth leaves the upper layer unfound.
    let eight = vec![Ext::DestOpts; 8];
    assert_eq!(
        judge(&mut rig, true, &v6(CLIENT6, SERVER6, &eight, udp(999, 53))),
        (SHOT, reason::UNKNOWN_L4)
    );
    let seven = vec![Ext::DestOpts; 7];
    assert_eq!(
        judge(&mut rig, true, &v6(CLIENT6, SERVER6, &seven, udp(2000, 53))),
        (OK, reason::POLICY_ALLOWED)
    );
    // An unknown next header is the upper layer: judged as that protocol, without
    // ports, so only a rule for any protocol can allow it.
    let unknown = v6(CLIENT6, SERVER6, &[Ext::HopByHop], (253, vec![0; 8]));
    assert_eq!(
        judge(&mut rig, true, &unknown),
        (SHOT, reason::POLICY_DENIED)
    );
    rig.allow_all(INGRESS, CLIENT_ID, 2);
    assert_eq!(
        judge(&mut rig, true, &unknown),
        (OK, reason::POLICY_ALLOWED)
    );
    // Version 4 in an IPv6 ethertype.
    let mut p = v6(CLIENT6, SERVER6, &[], udp(999, 53));
    p[14] = 0x40;
    assert_eq!(judge(&mut rig, true, &p), (SHOT, reason::MALFORMED));
}

#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn a_truncated_header_is_a_drop_not_a_pass() {
    let mut rig = Rig::new(endpoint_flags::ISOLATED_INGRESS);
    let syn = v4(CLIENT, SERVER, tcp(40000, 80, SYN));
    assert_eq!(rig.ingress(&syn[..14 + 20 + 2]), SHOT);
    assert_eq!(rig.next_event().map(|e| e.reason), Some(reason::MALFORMED));
}

/// Every prefix of every packet shape, cut anywhere inside its headers, is a drop with
/// reason MALFORMED, even where the whole packet is allowed and not isolated.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn truncation_at_every_header_boundary_is_malformed() {
    let mut rig = Rig::new(0); // not isolated: the whole packets pass
    rig.config(trace());
    let opts = V4 {
        options: vec![1; 8],
        ..V4::default()
    };
    let first = V4 {
        id: 5,
        more: true,
        ..V4::default()
    };
    let frag6 = Ext::Fragment {
        offset: 0,
        more: true,
        id: 77,
    };
    let quoted = ip4(SERVER, CLIENT, udp(53, 999), &V4::default());
    let shapes: Vec<(&str, Vec<u8>)> = vec![
        ("v4 tcp", v4(CLIENT, SERVER, tcp(1, 80, SYN))),
        (
            "v4 tcp options",
            v4o(CLIENT, SERVER, tcp(1, 80, SYN), &opts),
        ),
        ("v4 udp", v4(CLIENT, SERVER, udp(1, 53))),
        ("v4 sctp", v4(CLIENT, SERVER, sctp(1, 9))),
        (
            "v4 icmp echo",
            v4(CLIENT, SERVER, icmp(false, 8, 0, 7, &[])),
        ),
        ("v4 first fragment", v4o(CLIENT, SERVER, udp(1, 53), &first)),
        (
            "v4 icmp error",
            v4(CLIENT, SERVER, icmp(false, 3, 3, 0, &quoted[..28])),
        ),
        ("v6 tcp", v6(CLIENT6, SERVER6, &[], tcp(1, 80, SYN))),
        ("v6 udp", v6(CLIENT6, SERVER6, &[], udp(1, 53))),
        ("v6 sctp", v6(CLIENT6, SERVER6, &[], sctp(1, 9))),
        (
            "v6 echo",
            v6(CLIENT6, SERVER6, &[], icmp(true, 128, 0, 7, &[])),
        ),
        (
            "v6 chain",
            v6(
                CLIENT6,
                SERVER6,
                &[Ext::HopByHop, Ext::Routing, Ext::Auth, frag6, Ext::DestOpts],
                tcp(1, 80, SYN),
            ),
        ),
    ];
    for (name, p) in &shapes {
        assert_eq!(rig.ingress(p), OK, "{name}: whole");
        rig.events();
        // BPF_PROG_TEST_RUN refuses frames shorter than it can build an skb of; every
        // length it accepts is checked, and the cuts checked must cover the headers.
        let mut checked = 0;
        for len in 14..p.len() {
            let Some(action) = rig.try_run("to_pod", &p[..len]) else {
                continue;
            };
            let events = rig.events();
            assert_eq!(
                (action, events.first().map(|e| e.reason)),
                (SHOT, Some(reason::MALFORMED)),
                "{name} cut at {len} of {}",
                p.len()
            );
            checked += 1;
        }
        // The kernel builds no skb from less than Ethernet + the fixed IP header, so
        // every cut after that is checked (IPv4 options and IPv6 extensions included).
        let fixed = if name.starts_with("v4") { 20 } else { 40 };
        assert_eq!(checked, p.len() - 14 - fixed, "{name}: cuts checked");
    }
}

#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn a_spoofed_source_is_dropped_with_its_own_reason() {
    let mut rig = Rig::new(0);
    assert_eq!(
        rig.egress(&v4([10, 244, 0, 99], CLIENT, tcp(1234, 80, SYN))),
        SHOT
    );
    assert_eq!(
        rig.next_event().map(|e| e.reason),
        Some(reason::SPOOFED_SOURCE)
    );
    assert_eq!(
        rig.egress(&v4(SERVER, CLIENT, tcp(1234, 80, SYN))),
        OK,
        "not isolated"
    );
    // IPv6: another pod's address, and any address of a pod that has none.
    let mut other = SERVER6;
    other[15] = 99;
    assert_eq!(rig.egress(&v6(other, CLIENT6, &[], udp(1, 53))), SHOT);
    assert_eq!(
        rig.next_event().map(|e| e.reason),
        Some(reason::SPOOFED_SOURCE)
    );
    assert_eq!(rig.egress(&v6(SERVER6, CLIENT6, &[], udp(1, 53))), OK);
    rig.update_endpoint(|ep| ep.ipv6 = [0; 16]);
    assert_eq!(rig.egress(&v6([0; 16], CLIENT6, &[], udp(1, 53))), SHOT);
    assert_eq!(
        rig.next_event().map(|e| e.reason),
        Some(reason::SPOOFED_SOURCE)
    );
    // Spoofed fragments and spoofed ICMP errors are stopped the same way.
    let later = V4 {
        id: 1,
        offset: 100,
        ..V4::default()
    };
    assert_eq!(rig.egress(&v4o(CLIENT, SERVER, udp(1, 2), &later)), SHOT);
    assert_eq!(
        rig.next_event().map(|e| e.reason),
        Some(reason::SPOOFED_SOURCE)
    );
    // Neighbour discovery is not judged (the link needs it); but only with hop limit 255.
    let ns = eth(
        0x86dd,
        ip6_hop(
            [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
            CLIENT6,
            &[],
            icmp(true, 135, 0, 0, &[0; 16]),
            255,
        ),
    );
    assert_eq!(rig.egress(&ns), OK);
    assert!(
        rig.next_event().is_none(),
        "neighbour discovery is not judged"
    );
    let routed = eth(
        0x86dd,
        ip6_hop(
            [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
            CLIENT6,
            &[],
            icmp(true, 135, 0, 0, &[0; 16]),
            64,
        ),
    );
    assert_eq!(rig.egress(&routed), SHOT);
    assert_eq!(
        rig.next_event().map(|e| e.reason),
        Some(reason::SPOOFED_SOURCE)
    );
}

/// IPv4 and IPv6: a later fragment follows the verdict of its datagram's first fragment
/// at the same hook; without one it drops; ids, protocols and hooks do not mix.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn fragments_follow_their_first_fragment() {
    for v6_family in [false, true] {
        let mut rig = Rig::new(isolated());
        rig.config(trace());
        rig.allow(INGRESS, CLIENT_ID, UDP, 53, 0x42);
        let frame = |id: u32, offset: u16, more: bool, dport: u16| {
            if v6_family {
                let l4 = if offset == 0 {
                    udp(999, dport)
                } else {
                    (UDP, vec![0xab; 16])
                };
                v6(CLIENT6, SERVER6, &[Ext::Fragment { offset, more, id }], l4)
            } else {
                let l4 = if offset == 0 {
                    udp(999, dport)
                } else {
                    (UDP, vec![0xab; 16])
                };
                v4o(
                    CLIENT,
                    SERVER,
                    l4,
                    &V4 {
                        id: id as u16,
                        offset,
                        more,
                        ..V4::default()
                    },
                )
            }
        };
        let ctx = format!("v6={v6_family}");
        // allowed datagram
        assert_eq!(
            judge(&mut rig, true, &frame(1, 0, true, 53)),
            (OK, reason::POLICY_ALLOWED),
            "{ctx}"
        );
        let key = FragKey {
            saddr: if v6_family {
                CLIENT6
            } else {
                v4_mapped(CLIENT)
            },
            daddr: if v6_family {
                SERVER6
            } else {
                v4_mapped(SERVER)
            },
            id: 1,
            ifindex: LO,
            protocol: UDP,
            direction: INGRESS,
            _pad: [0; 2],
        };
        let f = rig.fragment(&key).expect("first fragment's verdict kept");
        assert_eq!((f.verdict, f.cookie), (verdict::ALLOWED, 0x42), "{ctx}");
        assert_eq!(
            judge(&mut rig, true, &frame(1, 100, true, 0)),
            (OK, reason::FRAGMENT),
            "{ctx}"
        );
        assert_eq!(
            judge(&mut rig, true, &frame(1, 200, false, 0)),
            (OK, reason::FRAGMENT),
            "{ctx}"
        );
        // denied datagram: its later fragments drop with the first one's reason
        assert_eq!(
            judge(&mut rig, true, &frame(2, 0, true, 54)),
            (SHOT, reason::POLICY_DENIED),
            "{ctx}"
        );
        assert_eq!(
            judge(&mut rig, true, &frame(2, 100, false, 0)),
            (SHOT, reason::POLICY_DENIED),
            "{ctx}"
        );
        // no first fragment seen
        assert_eq!(
            judge(&mut rig, true, &frame(3, 100, false, 0)),
            (SHOT, reason::FRAGMENT_UNKNOWN),
            "{ctx}"
        );
        // the same datagram at the other hook is a different datagram
        // (the server sending, so that anti-spoofing passes)
        let mirrored = if v6_family {
            v6(
                SERVER6,
                CLIENT6,
                &[Ext::Fragment {
                    offset: 100,
                    more: false,
                    id: 1,
                }],
                (UDP, vec![0; 16]),
            )
        } else {
            v4o(
                SERVER,
                CLIENT,
                (UDP, vec![0; 16]),
                &V4 {
                    id: 1,
                    offset: 100,
                    ..V4::default()
                },
            )
        };
        assert_eq!(
            judge(&mut rig, false, &mirrored),
            (SHOT, reason::FRAGMENT_UNKNOWN),
            "{ctx}"
        );
        // a second first fragment with a denied port overrides (no bypass by overlap):
        // the datagram's later fragments now drop
        assert_eq!(
            judge(&mut rig, true, &frame(4, 0, true, 53)),
            (OK, reason::CONNTRACK),
            "{ctx}"
        );
        assert_eq!(
            judge(&mut rig, true, &frame(4, 0, true, 22)),
            (SHOT, reason::POLICY_DENIED),
            "{ctx}"
        );
        assert_eq!(
            judge(&mut rig, true, &frame(4, 100, false, 0)),
            (SHOT, reason::POLICY_DENIED),
            "{ctx}"
        );
        // a first fragment too short to hold the ports is malformed
        let tiny = if v6_family {
            v6(
                CLIENT6,
                SERVER6,
                &[Ext::Fragment {
                    offset: 0,
                    more: true,
                    id: 5,
                }],
                (UDP, vec![0; 2]),
            )
        } else {
            v4o(
                CLIENT,
                SERVER,
                (UDP, vec![0; 2]),
                &V4 {
                    id: 5,
                    more: true,
                    ..V4::default()
                },
            )
        };
        assert_eq!(
            judge(&mut rig, true, &tiny),
            (SHOT, reason::MALFORMED),
            "{ctx}"
        );
    }
}

#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn ipv4_tcp_fragment_at_offset_one_is_dropped() {
    let mut rig = Rig::new(0);
    rig.config(trace());
    let o = V4 {
        id: 1,
        offset: 1,
        ..V4::default()
    };
    assert_eq!(
        judge(&mut rig, true, &v4o(CLIENT, SERVER, (TCP, vec![0; 16]), &o)),
        (SHOT, reason::MALFORMED)
    );
    // At offset 2 it cannot touch ports or flags: it follows its first fragment.
    let o = V4 {
        id: 1,
        offset: 2,
        ..V4::default()
    };
    assert_eq!(
        judge(&mut rig, true, &v4o(CLIENT, SERVER, (TCP, vec![0; 16]), &o)),
        (SHOT, reason::FRAGMENT_UNKNOWN)
    );
}

/// ICMP errors about a tracked connection pass under default deny in both directions
/// (path-MTU discovery); about an unknown flow they are judged by policy.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn icmp_errors_quoting_a_tracked_flow_pass_and_others_do_not() {
    let router = [192, 168, 1, 1];
    let mut rig = Rig::new(isolated());
    rig.config(trace());
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 1);
    // The client connects; the server replies with a large segment.
    assert_eq!(rig.ingress(&v4(CLIENT, SERVER, tcp(40000, 80, SYN))), OK);
    rig.events();
    // "fragmentation needed" from a router about the server's reply, to the server
    let reply = ip4(SERVER, CLIENT, tcp(80, 40000, ACK), &V4::default());
    let frag_needed = v4(router, SERVER, icmp(false, 3, 4, 1400, &reply[..28]));
    assert_eq!(judge(&mut rig, true, &frag_needed), (OK, reason::RELATED));
    // time exceeded about the client's SYN, to the client, sent by the server pod
    let syn = ip4(CLIENT, SERVER, tcp(40000, 80, SYN), &V4::default());
    let exceeded = v4(SERVER, CLIENT, icmp(false, 11, 0, 0, &syn[..28]));
    assert_eq!(judge(&mut rig, false, &exceeded), (OK, reason::RELATED));
    // port unreachable about an unknown flow
    let unknown = ip4(SERVER, CLIENT, udp(53, 999), &V4::default());
    let unreach = v4(router, SERVER, icmp(false, 3, 3, 0, &unknown[..28]));
    assert_eq!(
        judge(&mut rig, true, &unreach),
        (SHOT, reason::POLICY_DENIED)
    );
    // quoting a tracked flow, but addressed to someone else than its sender
    let misdirected = v4(router, SERVER, icmp(false, 3, 4, 0, &syn[..28]));
    assert_eq!(
        judge(&mut rig, true, &misdirected),
        (SHOT, reason::POLICY_DENIED)
    );
    // a quote cut inside its ports is malformed
    let cut = v4(router, SERVER, icmp(false, 3, 4, 0, &reply[..22]));
    assert_eq!(judge(&mut rig, true, &cut), (SHOT, reason::MALFORMED));

    // IPv6: packet too big about the server's reply; time exceeded about an unknown one
    assert_eq!(
        rig.ingress(&v6(CLIENT6, SERVER6, &[], tcp(40000, 80, SYN))),
        OK
    );
    rig.events();
    let reply6 = ip6(SERVER6, CLIENT6, &[], tcp(80, 40000, ACK));
    let too_big = v6(ROUTER6, SERVER6, &[], icmp(true, 2, 0, 0, &reply6[..48]));
    assert_eq!(judge(&mut rig, true, &too_big), (OK, reason::RELATED));
    let other6 = ip6(SERVER6, CLIENT6, &[], tcp(81, 40000, ACK));
    let exceeded6 = v6(ROUTER6, SERVER6, &[], icmp(true, 3, 0, 0, &other6[..48]));
    assert_eq!(
        judge(&mut rig, true, &exceeded6),
        (SHOT, reason::POLICY_DENIED)
    );
}

/// Revocation: a connection allowed under one revision is judged again when the
/// endpoint's revision changes; dropped as POLICY_REVOKED when no longer allowed, in
/// both directions; kept with KEEP_ESTABLISHED; resumed when allowed again.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn a_revoked_connection_is_cut_at_its_next_packet_unless_kept() {
    let mut rig = Rig::new(isolated());
    rig.config(trace());
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 0x10);
    let key = key4(CLIENT, SERVER, TCP, 40000, 80);
    let data = v4(CLIENT, SERVER, tcp(40000, 80, ACK));
    let reply = v4(SERVER, CLIENT, tcp(80, 40000, ACK));
    assert_eq!(
        judge(&mut rig, true, &v4(CLIENT, SERVER, tcp(40000, 80, SYN))),
        (OK, reason::POLICY_ALLOWED)
    );
    assert_eq!(judge(&mut rig, false, &reply), (OK, reason::CONNTRACK));
    assert_eq!(judge(&mut rig, true, &data), (OK, reason::CONNTRACK));

    // A change that still allows it: judged again, passes, the entry takes the revision.
    rig.update_endpoint(|ep| ep.revision = 8);
    assert_eq!(judge(&mut rig, true, &data), (OK, reason::POLICY_ALLOWED));
    assert_eq!(rig.conntrack(&key).unwrap().ingress_revision, 8);
    assert_eq!(judge(&mut rig, true, &data), (OK, reason::CONNTRACK));

    // The allowing rule goes away.
    rig.revoke(INGRESS, CLIENT_ID, TCP, 80);
    rig.update_endpoint(|ep| ep.revision = 9);
    assert_eq!(rig.ingress(&data), SHOT);
    let ev = rig.next_event().unwrap();
    assert_eq!(
        (ev.verdict, ev.reason, ev.revision),
        (verdict::DROPPED, reason::POLICY_REVOKED, 9)
    );
    assert_eq!(
        judge(&mut rig, false, &reply),
        (SHOT, reason::POLICY_REVOKED),
        "replies too"
    );
    assert_eq!(
        judge(&mut rig, true, &data),
        (SHOT, reason::POLICY_REVOKED),
        "and every later packet"
    );

    // With the flag, established connections are kept.
    rig.config(Config {
        flags: config_flags::TRACE | config_flags::KEEP_ESTABLISHED,
        ..Config::default()
    });
    assert_eq!(judge(&mut rig, true, &data), (OK, reason::CONNTRACK));
    assert_eq!(judge(&mut rig, false, &reply), (OK, reason::CONNTRACK));
    // ... but new ones are judged by the policy of now.
    assert_eq!(
        judge(&mut rig, true, &v4(CLIENT, SERVER, tcp(40001, 80, SYN))),
        (SHOT, reason::POLICY_DENIED)
    );

    // Without the flag, allowed again under a new revision: the connection resumes.
    rig.config(trace());
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 0x11);
    rig.update_endpoint(|ep| ep.revision = 10);
    assert_eq!(judge(&mut rig, false, &reply), (OK, reason::POLICY_ALLOWED));
    assert_eq!(judge(&mut rig, true, &data), (OK, reason::CONNTRACK));

    // Egress revocation: the server's own connection out.
    rig.allow(EGRESS, CLIENT_ID, UDP, 53, 0x12);
    let query = v4(SERVER, CLIENT, udp(5353, 53));
    let answer = v4(CLIENT, SERVER, udp(53, 5353));
    assert_eq!(judge(&mut rig, false, &query), (OK, reason::POLICY_ALLOWED));
    assert_eq!(judge(&mut rig, true, &answer), (OK, reason::CONNTRACK));
    rig.revoke(EGRESS, CLIENT_ID, UDP, 53);
    rig.update_endpoint(|ep| ep.revision = 11);
    assert_eq!(
        judge(&mut rig, true, &answer),
        (SHOT, reason::POLICY_REVOKED)
    );
    assert_eq!(
        judge(&mut rig, false, &query),
        (SHOT, reason::POLICY_REVOKED)
    );
}

/// TCP flags drive the entry's state, and the state its timeout: an entry idle longer
/// than its state's timeout is a miss (judged by policy again) and is removed.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn tcp_state_and_idle_timeouts_decide_when_state_expires() {
    let mut rig = Rig::new(isolated());
    rig.config(trace());
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 1);
    let key = key4(CLIENT, SERVER, TCP, 40000, 80);
    let c2s = |flags| v4(CLIENT, SERVER, tcp(40000, 80, flags));
    let s2c = |flags| v4(SERVER, CLIENT, tcp(80, 40000, flags));
    assert_eq!(rig.ingress(&c2s(SYN)), OK);
    assert_eq!(rig.conntrack(&key).unwrap().flags, ct_flags::INGRESS_OK);
    assert_eq!(rig.egress(&s2c(SYN | ACK)), OK);
    let est = ct_flags::INGRESS_OK | ct_flags::SEEN_REPLY;
    assert_eq!(rig.conntrack(&key).unwrap().flags, est);
    assert_eq!(rig.ingress(&c2s(FIN | ACK)), OK);
    assert_eq!(rig.conntrack(&key).unwrap().flags, est | ct_flags::FIN_ORIG);
    assert_eq!(rig.egress(&s2c(FIN | ACK)), OK);
    assert_eq!(
        rig.conntrack(&key).unwrap().flags,
        est | ct_flags::FIN_ORIG | ct_flags::FIN_REPLY
    );
    // A new SYN on the closed tuple starts over.
    assert_eq!(rig.ingress(&c2s(SYN)), OK);
    assert_eq!(rig.conntrack(&key).unwrap().flags, ct_flags::INGRESS_OK);
    assert_eq!(rig.egress(&s2c(RST)), OK);
    assert_eq!(rig.conntrack(&key).unwrap().flags, est | ct_flags::RST);
    rig.events();

    // Timeouts (defaults: SYN 60 s, closed 10 s, UDP 60 s, ICMP 30 s; established is
    // set to 120 s here, the default 6 h being longer than this machine's uptime):
    // entries aged by writing last_seen into the past. The reply is the probe: under
    // default-deny egress only a live entry lets it out.
    let s = 1_000_000_000u64;
    rig.config(Config {
        flags: config_flags::TRACE,
        ct_tcp_established_ns: 120 * s,
        ..Config::default()
    });
    let cases: [(&str, u32, u64, bool); 9] = [
        ("syn, 59 s", ct_flags::INGRESS_OK, 59 * s, true),
        ("syn, 61 s", ct_flags::INGRESS_OK, 61 * s, false),
        ("established, 119 s", est, 119 * s, true),
        ("established, 121 s", est, 121 * s, false),
        (
            "fin both, 9 s",
            est | ct_flags::FIN_ORIG | ct_flags::FIN_REPLY,
            9 * s,
            true,
        ),
        (
            "fin both, 11 s",
            est | ct_flags::FIN_ORIG | ct_flags::FIN_REPLY,
            11 * s,
            false,
        ),
        (
            "fin one side, 119 s",
            est | ct_flags::FIN_ORIG,
            119 * s,
            true,
        ),
        ("rst, 9 s", est | ct_flags::RST, 9 * s, true),
        ("rst, 11 s", est | ct_flags::RST, 11 * s, false),
    ];
    for (name, flags, age, live) in cases {
        rig.put_conntrack(
            &key,
            CtEntry {
                last_seen_ns: monotonic_ns() - age,
                flags,
                ingress_revision: REVISION,
                ..CtEntry::default()
            },
        );
        let (action, why) = judge(&mut rig, false, &s2c(ACK));
        if live {
            assert_eq!((action, why), (OK, reason::CONNTRACK), "{name}");
        } else {
            assert_eq!((action, why), (SHOT, reason::POLICY_DENIED), "{name}");
            assert!(
                rig.conntrack(&key).is_none(),
                "{name}: expired entry removed"
            );
        }
    }
    // UDP and ICMP idle timeouts, and the configured values replace the defaults.
    let ukey = key4(CLIENT, SERVER, UDP, 999, 53);
    let answer = v4(SERVER, CLIENT, udp(53, 999));
    for (timeout_s, age_s, live) in [(0, 59, true), (0, 61, false), (5, 4, true), (5, 6, false)] {
        rig.config(Config {
            flags: config_flags::TRACE,
            ct_udp_ns: timeout_s * s,
            ..Config::default()
        });
        rig.put_conntrack(
            &ukey,
            CtEntry {
                last_seen_ns: monotonic_ns() - age_s * s,
                flags: ct_flags::INGRESS_OK,
                ingress_revision: REVISION,
                ..CtEntry::default()
            },
        );
        let want = if live {
            (OK, reason::CONNTRACK)
        } else {
            (SHOT, reason::POLICY_DENIED)
        };
        assert_eq!(
            judge(&mut rig, false, &answer),
            want,
            "udp timeout {timeout_s} age {age_s}"
        );
    }
    let ikey = key4(CLIENT, SERVER, ICMP, 7, 7);
    let pong = v4(SERVER, CLIENT, icmp(false, 0, 0, 7, &[]));
    for (age_s, live) in [(29, true), (31, false)] {
        rig.config(trace());
        rig.put_conntrack(
            &ikey,
            CtEntry {
                last_seen_ns: monotonic_ns() - age_s * s,
                flags: ct_flags::INGRESS_OK,
                ingress_revision: REVISION,
                ..CtEntry::default()
            },
        );
        let want = if live {
            (OK, reason::CONNTRACK)
        } else {
            (SHOT, reason::POLICY_DENIED)
        };
        assert_eq!(judge(&mut rig, false, &pong), want, "icmp age {age_s}");
    }
}

#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn node_traffic_to_pods_is_allowed_unless_turned_off_and_always_reported() {
    let mut rig = Rig::new(isolated());
    let host_cfg = |flags| Config {
        flags,
        host_ipv4: v4_mapped(HOST),
        ..Config::default()
    };
    rig.config(host_cfg(config_flags::ALLOW_HOST | config_flags::TRACE));
    let probe = v4(HOST, SERVER, tcp(50000, 8080, SYN));
    assert_eq!(rig.ingress(&probe), OK);
    let ev = rig.next_event().unwrap();
    assert_eq!(
        (ev.verdict, ev.reason, ev.src_identity),
        (
            verdict::ALLOWED,
            reason::HOST_TRAFFIC,
            netpol_common::identity::HOST
        )
    );
    // The probe's reply leaves under default-deny egress.
    assert_eq!(
        judge(
            &mut rig,
            false,
            &v4(SERVER, HOST, tcp(8080, 50000, SYN | ACK))
        ),
        (OK, reason::CONNTRACK)
    );
    // Not the other way round: the pod's own connection to the node is egress policy.
    assert_eq!(
        judge(&mut rig, false, &v4(SERVER, HOST, tcp(1, 10250, SYN))),
        (SHOT, reason::POLICY_DENIED)
    );
    // Turned off: host traffic is judged like any peer (identity HOST), and reported.
    rig.clear_conntrack();
    rig.config(host_cfg(0));
    assert_eq!(rig.ingress(&probe), SHOT);
    let ev = rig.next_event().unwrap();
    assert_eq!(
        (ev.reason, ev.src_identity),
        (reason::POLICY_DENIED, netpol_common::identity::HOST)
    );
}

/// Audit (per endpoint and node-wide): would-be drops pass and are reported as AUDIT
/// with their reason; an audited connection is reported once, and enforced as soon as
/// audit ends.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn audit_mode_passes_would_be_drops_and_reports_them() {
    for node_wide in [false, true] {
        let mut rig = Rig::new(isolated());
        let audit_on = |rig: &mut Rig| {
            if node_wide {
                rig.config(Config {
                    flags: config_flags::AUDIT,
                    ..Config::default()
                })
            } else {
                rig.update_endpoint(|ep| ep.flags |= endpoint_flags::AUDIT)
            }
        };
        audit_on(&mut rig);
        let ctx = format!("node-wide={node_wide}");
        let syn = v4(CLIENT, SERVER, tcp(40000, 80, SYN));
        let data = v4(CLIENT, SERVER, tcp(40000, 80, ACK));
        assert_eq!(rig.ingress(&syn), OK, "{ctx}");
        let ev = rig.next_event().unwrap();
        assert_eq!(
            (ev.verdict, ev.reason),
            (verdict::AUDIT, reason::POLICY_DENIED),
            "{ctx}"
        );
        let ct = rig
            .conntrack(&key4(CLIENT, SERVER, TCP, 40000, 80))
            .unwrap();
        assert_eq!(
            ct.flags,
            ct_flags::INGRESS_OK | ct_flags::INGRESS_AUDIT,
            "{ctx}"
        );
        assert_eq!(rig.ingress(&data), OK, "{ctx}");
        assert!(
            rig.next_event().is_none(),
            "{ctx}: reported once per connection"
        );
        assert_eq!(
            rig.counter(verdict::AUDIT, reason::POLICY_DENIED, INGRESS),
            1
        );
        // Other would-be drops, too.
        assert_eq!(
            rig.egress(&v4([1, 2, 3, 4], CLIENT, udp(1, 2))),
            OK,
            "{ctx}"
        );
        assert_eq!(
            rig.next_event().map(|e| (e.verdict, e.reason)),
            Some((verdict::AUDIT, reason::SPOOFED_SOURCE)),
            "{ctx}"
        );
        // Audit ends: the audited connection is enforced at its next packet.
        if node_wide {
            rig.config(Config::default());
        } else {
            rig.update_endpoint(|ep| ep.flags &= !endpoint_flags::AUDIT);
        }
        assert_eq!(rig.ingress(&data), SHOT, "{ctx}");
        assert_eq!(
            rig.next_event().map(|e| (e.verdict, e.reason)),
            Some((verdict::DROPPED, reason::POLICY_DENIED)),
            "{ctx}"
        );
    }
}

/// A revoked connection in audit mode: reported once as AUDIT/POLICY_REVOKED, passes.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn a_revocation_under_audit_is_reported_once_and_passes() {
    let mut rig = Rig::new(isolated() | endpoint_flags::AUDIT);
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 1);
    let data = v4(CLIENT, SERVER, tcp(40000, 80, ACK));
    assert_eq!(rig.ingress(&v4(CLIENT, SERVER, tcp(40000, 80, SYN))), OK);
    assert!(rig.next_event().is_none());
    rig.revoke(INGRESS, CLIENT_ID, TCP, 80);
    rig.update_endpoint(|ep| ep.revision = 8);
    assert_eq!(rig.ingress(&data), OK);
    assert_eq!(
        rig.next_event().map(|e| (e.verdict, e.reason)),
        Some((verdict::AUDIT, reason::POLICY_REVOKED))
    );
    assert_eq!(rig.ingress(&data), OK);
    assert!(rig.next_event().is_none());
}

/// The token bucket bounds events per endpoint; the counters stay exact.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn a_flood_of_drops_is_rate_limited_in_events_but_counted_exactly() {
    let mut rig = Rig::new(isolated());
    rig.config(Config {
        event_rate: 1,
        event_burst: 5,
        ..Config::default()
    });
    let n = 200u64;
    for i in 0..n {
        assert_eq!(
            rig.ingress(&v4(CLIENT, SERVER, tcp(10000 + i as u16, 22, SYN))),
            SHOT
        );
    }
    let events = rig.events().len() as u64;
    // The burst, plus at most what one event per second refilled while the test ran.
    assert!((5..=7).contains(&events), "{events} events");
    assert_eq!(
        rig.counter(verdict::DROPPED, reason::POLICY_DENIED, INGRESS),
        n
    );
    assert_eq!(rig.slot(event_counter::SENT), events);
    assert_eq!(rig.slot(event_counter::RATE_LIMITED), n - events);
    // Unlimited again: every drop is reported.
    rig.config(Config::default());
    for i in 0..10u16 {
        rig.ingress(&v4(CLIENT, SERVER, tcp(i, 22, SYN)));
    }
    assert_eq!(rig.events().len(), 10);
}

#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn sampled_allows_report_new_connections_only() {
    let mut rig = Rig::new(endpoint_flags::ISOLATED_INGRESS);
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 0x99);
    rig.config(Config {
        sample_allows: 1,
        ..Config::default()
    });
    assert_eq!(rig.ingress(&v4(CLIENT, SERVER, tcp(40000, 80, SYN))), OK);
    let ev = rig.next_event().expect("the new connection is reported");
    assert_eq!(
        (ev.verdict, ev.reason, ev.policy_cookie),
        (verdict::ALLOWED, reason::POLICY_ALLOWED, 0x99)
    );
    assert_eq!(rig.ingress(&v4(CLIENT, SERVER, tcp(40000, 80, ACK))), OK);
    assert!(rig.next_event().is_none(), "later packets are not");
    // Off by default.
    rig.config(Config::default());
    assert_eq!(rig.ingress(&v4(CLIENT, SERVER, tcp(40001, 80, SYN))), OK);
    assert!(rig.next_event().is_none());
    // One in N: over many connections, some but not all are reported.
    rig.config(Config {
        sample_allows: 4,
        ..Config::default()
    });
    for i in 0..400u16 {
        rig.ingress(&v4(CLIENT, SERVER, tcp(20000 + i, 80, SYN)));
    }
    let sampled = rig.events().len();
    assert!((40..=160).contains(&sampled), "{sampled} of 400 at 1 in 4");
}

/// The programs pass this kernel's verifier; how much of its budget (1M instructions
/// per program since Linux 5.2) they take is printed and bounded, so growth is noticed.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn the_verifier_accepts_both_programs_with_room_to_spare() {
    let rig = Rig::new(0);
    for name in ["from_pod", "to_pod", "to_remote"] {
        let prog: &aya::programs::SchedClassifier =
            rig.ebpf.program(name).unwrap().try_into().unwrap();
        let info = prog.info().unwrap();
        let verified = info
            .verified_instruction_count()
            .expect("kernel reports it");
        eprintln!("{name}: {verified} instructions verified");
        // The cluster-policy tiers (a second set of lookups) took from_pod from ~310k to
        // ~500k; 600k leaves 40% of the budget free.
        assert!(verified < 600_000, "{name}: {verified} of the 1M budget");
    }
}

/// What a packet costs on the main paths (the kernel's mean over 20k runs), printed;
/// bounded generously so that only an order-of-magnitude regression fails.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn per_packet_cost_on_the_main_paths() {
    let mut rig = Rig::new(isolated());
    rig.config(Config {
        event_rate: 1, // the flood of drops below is rate limited, as on a node
        ..Config::default()
    });
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 1);
    let chain = [Ext::HopByHop, Ext::DestOpts, Ext::Routing, Ext::DestOpts];
    assert_eq!(rig.ingress(&v4(CLIENT, SERVER, tcp(40000, 80, SYN))), OK);
    assert_eq!(
        rig.ingress(&v6(CLIENT6, SERVER6, &chain, tcp(40000, 80, SYN))),
        OK
    );
    let cases: [(&str, &str, Vec<u8>, u32); 5] = [
        (
            "v4 established (conntrack hit)",
            "to_pod",
            v4(CLIENT, SERVER, tcp(40000, 80, ACK)),
            OK,
        ),
        (
            "v4 reply (reverse conntrack hit)",
            "from_pod",
            v4(SERVER, CLIENT, tcp(80, 40000, ACK)),
            OK,
        ),
        (
            "v6 established, 4 extension headers",
            "to_pod",
            v6(CLIENT6, SERVER6, &chain, tcp(40000, 80, ACK)),
            OK,
        ),
        (
            "v4 denied (policy lookups, rate-limited event)",
            "to_pod",
            v4(CLIENT, SERVER, tcp(40001, 22, SYN)),
            SHOT,
        ),
        (
            "v4 later fragment, unknown",
            "to_pod",
            v4o(
                CLIENT,
                SERVER,
                (UDP, vec![0; 64]),
                &V4 {
                    id: 9,
                    offset: 100,
                    ..V4::default()
                },
            ),
            SHOT,
        ),
    ];
    for (name, program, packet, want) in cases {
        let (action, mean) = rig.bench(program, &packet, 20_000);
        assert_eq!(action, want, "{name}");
        eprintln!("{name}: {} ns/packet", mean.as_nanos());
        assert!(
            mean < std::time::Duration::from_micros(20),
            "{name}: {mean:?}"
        );
    }
}

/// The node's map epoch: a peer changing identity changes no endpoint revision, and a
/// packet judged mid-sync sees old and new entries at once; the epoch the agent bumps
/// after every complete sync has such connections judged again.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn a_new_epoch_rejudges_connections_a_revision_cannot_see_change() {
    let mut rig = Rig::new(isolated());
    let epoch = |rig: &mut Rig, epoch| {
        rig.config(Config {
            flags: config_flags::TRACE,
            epoch,
            ..Config::default()
        })
    };
    epoch(&mut rig, 1);
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 0x10);
    let data = v4(CLIENT, SERVER, tcp(40000, 80, ACK));
    assert_eq!(
        judge(&mut rig, true, &v4(CLIENT, SERVER, tcp(40000, 80, SYN))),
        (OK, reason::POLICY_ALLOWED)
    );
    let stamp = rig
        .conntrack(&key4(CLIENT, SERVER, TCP, 40000, 80))
        .unwrap()
        .ingress_revision;
    assert_eq!(stamp, netpol_common::ct_stamp(REVISION, 1));
    // The client is relabelled: its address maps to an identity no rule allows.
    rig.ipcache(v4_mapped(CLIENT), 999, 0);
    assert_eq!(
        judge(&mut rig, true, &data),
        (OK, reason::CONNTRACK),
        "the revision did not change"
    );
    epoch(&mut rig, 2);
    assert_eq!(judge(&mut rig, true, &data), (SHOT, reason::POLICY_REVOKED));

    // Back, then a sync that removes the rule, packet by packet: entries added, the
    // endpoint's revision written (the rule still there), entries removed, new epoch.
    rig.ipcache(v4_mapped(CLIENT), CLIENT_ID, 0);
    epoch(&mut rig, 3);
    assert_eq!(judge(&mut rig, true, &data), (OK, reason::POLICY_ALLOWED));
    rig.update_endpoint(|ep| ep.revision = 8);
    assert_eq!(
        judge(&mut rig, true, &data),
        (OK, reason::POLICY_ALLOWED),
        "judged mid-sync"
    );
    rig.revoke(INGRESS, CLIENT_ID, TCP, 80);
    assert_eq!(judge(&mut rig, true, &data), (OK, reason::CONNTRACK));
    epoch(&mut rig, 4);
    assert_eq!(
        judge(&mut rig, true, &data),
        (SHOT, reason::POLICY_REVOKED),
        "cut once the sync is complete"
    );
}

/// A staged policy (`netpol.io/mode: audit`) isolates one direction in audit: its
/// would-be drops pass as AUDIT there, and only policy drops; the other direction and
/// other reasons are enforced.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn audit_of_one_direction_passes_only_its_policy_drops() {
    let mut rig = Rig::new(isolated() | endpoint_flags::AUDIT_INGRESS);
    rig.count_endpoint();
    // Ingress not allowed: passes as AUDIT, once per connection.
    assert_eq!(rig.ingress(&v4(CLIENT, SERVER, tcp(40000, 81, SYN))), OK);
    assert_eq!(
        rig.next_event().map(|e| (e.verdict, e.reason, e.direction)),
        Some((verdict::AUDIT, reason::POLICY_DENIED, INGRESS))
    );
    // The reply of that audited connection passes too (its check passed, in audit).
    assert_eq!(
        rig.egress(&v4(SERVER, CLIENT, tcp(81, 40000, SYN | ACK))),
        OK
    );
    // Egress is enforced: a new connection out is dropped.
    assert_eq!(rig.egress(&v4(SERVER, CLIENT, tcp(40001, 80, SYN))), SHOT);
    // A spoofed source is no policy drop: dropped even with egress in audit too.
    rig.update_endpoint(|ep| ep.flags |= endpoint_flags::AUDIT_EGRESS);
    assert_eq!(rig.egress(&v4([1, 2, 3, 4], CLIENT, udp(1, 2))), SHOT);
    rig.update_endpoint(|ep| ep.flags &= !endpoint_flags::AUDIT_EGRESS);
    let c = rig.endpoint_counters();
    let slot = netpol_common::EndpointCounters::slot;
    assert_eq!(c.packets[slot(verdict::AUDIT, INGRESS)], 1);
    assert_eq!(c.packets[slot(verdict::DROPPED, EGRESS)], 2);
    assert_eq!(c.packets[slot(verdict::DROPPED, INGRESS)], 0);
    assert!(c.bytes[slot(verdict::DROPPED, EGRESS)] >= 2 * 40);
    // Audit ends (the staged policy is enforced): the audited connection is cut.
    rig.update_endpoint(|ep| ep.flags &= !endpoint_flags::AUDIT_INGRESS);
    assert_eq!(rig.ingress(&v4(CLIENT, SERVER, tcp(40000, 81, ACK))), SHOT);
}

/// Every packet of an allowed connection is counted to the rule that allowed it, both
/// ways, with its bytes; a rule without a counter entry is counted apart.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn packets_and_bytes_are_counted_to_the_rule_that_allowed_them() {
    let mut rig = Rig::new(isolated());
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 7);
    rig.allow(INGRESS, CLIENT_ID, TCP, 81, 8);
    rig.count_rule(7);
    let packets = [
        (true, v4(CLIENT, SERVER, tcp(40000, 80, SYN))),
        (false, v4(SERVER, CLIENT, tcp(80, 40000, SYN | ACK))),
        (true, v4(CLIENT, SERVER, tcp(40000, 80, ACK))),
        (true, v4(CLIENT, SERVER, tcp(40000, 80, ACK))),
    ];
    let mut bytes = 0;
    for (ingress, p) in &packets {
        let action = if *ingress {
            rig.ingress(p)
        } else {
            rig.egress(p)
        };
        assert_eq!(action, OK);
        bytes += p.len() as u64;
    }
    assert_eq!(
        rig.rule_counter(7),
        Some(netpol_common::RuleCounter { packets: 4, bytes })
    );
    // Rule 8 has no entry: allowed all the same, counted as uncounted.
    assert_eq!(rig.ingress(&v4(CLIENT, SERVER, tcp(40001, 81, SYN))), OK);
    assert_eq!(rig.slot(event_counter::RULE_UNCOUNTED), 1);
    // Nothing counted for the endpoint without its entry, but counted apart.
    assert_eq!(rig.ingress(&v4(CLIENT, SERVER, tcp(40002, 82, SYN))), SHOT);
    assert_eq!(rig.slot(event_counter::ENDPOINT_UNCOUNTED), 1);
}

/// Events refused by the token bucket are counted in the bucket and carried by the next
/// event written ("N more like this").
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn suppressed_events_are_reported_by_the_next_event() {
    let mut rig = Rig::new(isolated());
    rig.config(Config {
        event_rate: 1,
        event_burst: 1,
        ..Config::default()
    });
    for port in 0..5u16 {
        assert_eq!(rig.ingress(&v4(CLIENT, SERVER, udp(1000 + port, 9))), SHOT);
    }
    let first = rig.events();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].suppressed, 0);
    let b = rig.event_bucket().expect("bucket made by the first event");
    assert_eq!(b.suppressed, 4);
    assert_eq!(rig.slot(event_counter::RATE_LIMITED), 4);
    // Refill the bucket (as a second passing would): the next event carries the 4.
    rig.put_event_bucket(netpol_common::EventBucket {
        last_ns: monotonic_ns(),
        tokens: 1_000_000_000,
        ..b
    });
    assert_eq!(rig.ingress(&v4(CLIENT, SERVER, udp(2000, 9))), SHOT);
    assert_eq!(rig.next_event().map(|e| e.suppressed), Some(4));
    assert_eq!(rig.event_bucket().unwrap().suppressed, 0);
}

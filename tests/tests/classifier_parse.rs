//! Parsing: ICMP identifiers, IPv4 options and IHL, IPv6 extension headers, truncation at
//! every header boundary, fragments.
//!
//! The classifier on crafted packets with prepared maps (`BPF_PROG_TEST_RUN`): packet
//! bytes + map contents → verdict + event + conntrack state. Needs root.

mod support;

use netpol_common::{endpoint_flags, reason, v4_mapped, verdict, FragKey};
use support::packet::*;
use support::rig::*;

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

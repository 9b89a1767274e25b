//! Policy verdicts: default deny, allowed ports, replies, every protocol in both families,
//! spoofed sources, node traffic.
//!
//! The classifier on crafted packets with prepared maps (`BPF_PROG_TEST_RUN`): packet
//! bytes + map contents → verdict + event + conntrack state. Needs root.

mod support;

use netpol_common::{config_flags, ct_flags, endpoint_flags, reason, v4_mapped, verdict, Config};
use support::packet::*;
use support::rig::*;

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
    assert_eq!(ct.ingress_stamp, u64::from(REVISION));
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

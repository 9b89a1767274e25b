//! Attacks on the classifier, each named after what it tries: crafted frames through
//! `BPF_PROG_TEST_RUN`, where the kernel's own handling of the frame does not matter
//! (the attacks that need real frames, a real agent or the kernel's answer run in a lab:
//! `bypass_lab.rs`). A pod has raw sockets (NET_RAW is a default), so it can send any
//! frame. Each test failed on the code before its fix. Needs root.

mod support;

use netpol_common::{reason, v4_mapped};
use support::packet::*;
use support::rig::*;

/// `tags` VLAN headers (TPID, TCI with VID 0: priority tags) in front of `ip`.
fn tagged(tags: &[u16], ethertype: u16, ip: Vec<u8>) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, tpid) in tags.iter().enumerate() {
        if i > 0 {
            body.extend_from_slice(&tpid.to_be_bytes());
        }
        body.extend_from_slice(&[0, 0]); // TCI: priority 0, VID 0
    }
    body.extend_from_slice(&ethertype.to_be_bytes());
    body.extend(ip);
    eth(tags[0], body)
}

/// Under default deny, a SYN wrapped in VLAN tags (one, two, 802.1ad outside 802.1Q)
/// used to pass unjudged at both hooks: the bridge forwarded it and the receiving stack
/// stripped the priority tags and answered.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn a_syn_inside_vlan_tags_is_dropped_at_both_hooks() {
    let mut rig = Rig::new(isolated());
    rig.config(trace());
    for tags in [&[0x8100u16][..], &[0x8100, 0x8100], &[0x88a8, 0x8100]] {
        let from_pod = tagged(
            tags,
            0x0800,
            ip4(SERVER, CLIENT, tcp(40000, 80, SYN), &V4::default()),
        );
        assert_eq!(
            judge(&mut rig, false, &from_pod),
            (SHOT, reason::UNKNOWN_L3),
            "{tags:x?} from the pod"
        );
        let to_pod = tagged(
            tags,
            0x0800,
            ip4(CLIENT, SERVER, tcp(40000, 80, SYN), &V4::default()),
        );
        assert_eq!(
            judge(&mut rig, true, &to_pod),
            (SHOT, reason::UNKNOWN_L3),
            "{tags:x?} to the pod"
        );
        let v6 = tagged(
            tags,
            0x86dd,
            ip6(SERVER6, CLIENT6, &[], tcp(40000, 80, SYN)),
        );
        assert_eq!(
            judge(&mut rig, false, &v6),
            (SHOT, reason::UNKNOWN_L3),
            "{tags:x?} IPv6"
        );
    }
}

/// A frame of an ethertype the classifier does not know (a local experimental one, an
/// IPX, an MPLS frame) is a channel between pods that policy says cannot talk.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn a_frame_of_an_unknown_ethertype_is_dropped_at_both_hooks() {
    let mut rig = Rig::new(isolated());
    rig.config(trace());
    for ethertype in [0x88b5u16, 0x8137, 0x8847, 0x0000, 0xffff] {
        let frame = eth(
            ethertype,
            b"a covert channel between two isolated pods".to_vec(),
        );
        assert_eq!(
            judge(&mut rig, false, &frame),
            (SHOT, reason::UNKNOWN_L3),
            "{ethertype:#x}"
        );
        assert_eq!(
            judge(&mut rig, true, &frame),
            (SHOT, reason::UNKNOWN_L3),
            "{ethertype:#x}"
        );
    }
    // ARP still works (the link needs it); it is not a policy matter.
    let arp = eth(
        0x0806,
        [&[0, 1, 8, 0, 6, 4, 0, 1][..], &POD_MAC, &SERVER].concat(),
    );
    assert_eq!(rig.egress(&arp), OK);
    assert_eq!(rig.ingress(&arp), OK);
}

/// IPv6 packets with IPv4-mapped addresses (`::ffff:a.b.c.d`) read as IPv4 in the maps'
/// form: one from a peer claiming `::ffff:<an allowed IPv4 peer>` would be judged as
/// that peer. They have no business on the wire; dropped as malformed.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn an_ipv6_packet_with_an_ipv4_mapped_address_is_dropped() {
    let mut rig = Rig::new(isolated());
    rig.config(trace());
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 1);
    // The IPv4 client is allowed; its address, v4-mapped, arrives in an IPv6 header.
    assert_eq!(rig.ingress(&v4(CLIENT, SERVER, tcp(40000, 80, SYN))), OK);
    rig.events();
    let mapped = v6(v4_mapped(CLIENT), SERVER6, &[], tcp(40001, 80, SYN));
    assert_eq!(judge(&mut rig, true, &mapped), (SHOT, reason::MALFORMED));
    let mapped_dst = v6(SERVER6, v4_mapped(CLIENT), &[], tcp(40001, 80, SYN));
    assert_eq!(
        judge(&mut rig, false, &mapped_dst),
        (SHOT, reason::MALFORMED)
    );
}

/// A pod's Router Advertisement (or Redirect) would make its neighbours route through
/// it: dropped; the rest of ND still passes (the link needs it).
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn a_pods_router_advertisements_and_redirects_are_dropped() {
    let mut rig = Rig::new(isolated());
    rig.config(trace());
    let link_local = {
        let mut a = [0u8; 16];
        a[0] = 0xfe;
        a[1] = 0x80;
        a[15] = 7;
        a
    };
    let all_nodes = {
        let mut a = [0u8; 16];
        a[0] = 0xff;
        a[1] = 0x02;
        a[15] = 1;
        a
    };
    let nd = |src, dst, kind| {
        let mut p = v6(src, dst, &[], icmp(true, kind, 0, 0, &[0; 16]));
        p[14 + 7] = 255; // hop limit: ND's
        p
    };
    // A neighbour solicitation between link-local addresses: the link's own business.
    assert_eq!(rig.egress(&nd(link_local, all_nodes, 135)), OK);
    assert!(rig.events().is_empty(), "not judged, not reported");
    // Router advertisements and redirects from the pod drop.
    for kind in [134u8, 137] {
        assert_eq!(
            judge(&mut rig, false, &nd(link_local, all_nodes, kind)),
            (SHOT, reason::SPOOFED_SOURCE),
            "type {kind}"
        );
    }
}

const OTHER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x66];

const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x02];

/// ARP from a pod used to pass unjudged whatever it claimed: a reply naming another
/// pod's address moved its neighbours' entries to the sender. From a pod, ARP must carry
/// the pod's own MAC and address (0.0.0.0 for a probe), and so must every frame's
/// source MAC; towards a pod ARP passes.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn arp_claiming_another_pods_address_or_mac_is_dropped() {
    let mut rig = Rig::new(isolated());
    rig.config(trace());
    let me = (POD_MAC, SERVER);
    let them = (CLIENT_MAC, CLIENT);
    let out = |body: Vec<u8>| frame_between([0xff; 6], POD_MAC, 0x0806, body);
    // The pod's own requests, replies and probes pass.
    assert_eq!(rig.egress(&out(arp(1, me, ([0; 6], CLIENT)))), OK);
    assert_eq!(rig.egress(&out(arp(2, me, them))), OK);
    assert_eq!(
        rig.egress(&out(arp(1, (POD_MAC, [0; 4]), ([0; 6], SERVER)))),
        OK
    );
    assert!(rig.events().is_empty(), "not judged, not reported");
    // Claiming the client's address, or another MAC, in the message or the frame.
    for (what, frame) in [
        (
            "another pod's address",
            out(arp(2, (POD_MAC, CLIENT), them)),
        ),
        (
            "another MAC as sender",
            out(arp(2, (OTHER_MAC, SERVER), them)),
        ),
        (
            "another MAC as the frame's source",
            frame_between([0xff; 6], OTHER_MAC, 0x0806, arp(2, me, them)),
        ),
    ] {
        assert_eq!(
            judge(&mut rig, false, &frame),
            (SHOT, reason::SPOOFED_SOURCE),
            "{what}"
        );
    }
    // Not Ethernet/IPv4 ARP, or cut short: malformed.
    let mut other_hw = arp(2, me, them);
    other_hw[1] = 6;
    assert_eq!(
        judge(&mut rig, false, &out(other_hw)),
        (SHOT, reason::MALFORMED)
    );
    assert_eq!(
        judge(&mut rig, false, &out(arp(2, me, them)[..16].to_vec())),
        (SHOT, reason::MALFORMED)
    );
    // Towards the pod: the sender's own veth judged it.
    assert_eq!(
        rig.ingress(&frame_between(
            POD_MAC,
            CLIENT_MAC,
            0x0806,
            arp(2, them, me)
        )),
        OK
    );
    // An IP packet of the pod's own address from another MAC (poisoning the bridge's
    // forwarding table) drops too.
    let syn = ip4(SERVER, CLIENT, tcp(40000, 80, SYN), &V4::default());
    assert_eq!(
        judge(
            &mut rig,
            false,
            &frame_between(CLIENT_MAC, OTHER_MAC, 0x0800, syn)
        ),
        (SHOT, reason::SPOOFED_SOURCE)
    );
}

/// Neighbour discovery from a pod speaks only for the pod: from its address, a
/// link-local one or `::` (duplicate address detection); an advertisement names its
/// address or a link-local one. A pod advertising another pod's address would take its
/// traffic.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn neighbour_discovery_for_another_pods_address_is_dropped() {
    let mut rig = Rig::new(isolated());
    rig.config(trace());
    let ll = |last: u8| {
        let mut a = [0u8; 16];
        a[0] = 0xfe;
        a[1] = 0x80;
        a[15] = last;
        a
    };
    let solicited = {
        let mut a = [0u8; 16];
        a[0] = 0xff;
        a[1] = 0x02;
        a[11] = 1;
        a[12] = 0xff;
        a[15] = 2;
        a
    };
    let nd = |src, dst, kind, target: [u8; 16]| {
        let mut p = v6(src, dst, &[], icmp(true, kind, 0, 0, &target));
        p[14 + 7] = 255;
        p
    };
    // Solicitations from the pod's global, link-local and unspecified addresses, and
    // advertisements of its own addresses, pass.
    for frame in [
        nd(SERVER6, solicited, 135, CLIENT6),
        nd(ll(3), solicited, 135, CLIENT6),
        nd([0; 16], solicited, 135, SERVER6),
        nd(SERVER6, CLIENT6, 136, SERVER6),
        nd(ll(3), ll(2), 136, ll(3)),
    ] {
        assert_eq!(rig.egress(&frame), OK);
    }
    assert!(rig.events().is_empty(), "not judged, not reported");
    for (what, frame) in [
        (
            "solicitation from another pod's address",
            nd(CLIENT6, solicited, 135, ROUTER6),
        ),
        (
            "advertisement of another pod's address",
            nd(SERVER6, ll(1), 136, CLIENT6),
        ),
        (
            "advertisement from another pod's address",
            nd(CLIENT6, ll(1), 136, CLIENT6),
        ),
    ] {
        assert_eq!(
            judge(&mut rig, false, &frame),
            (SHOT, reason::SPOOFED_SOURCE),
            "{what}"
        );
    }
    // An advertisement cut before its target is malformed.
    let mut cut = nd(SERVER6, ll(1), 136, SERVER6);
    cut.truncate(14 + 40 + 8 + 4);
    cut[14 + 4..14 + 6].copy_from_slice(&12u16.to_be_bytes());
    assert_eq!(judge(&mut rig, false, &cut), (SHOT, reason::MALFORMED));
}

/// A unicast frame sent to the pod's MAC for someone else's address used to be judged
/// like any packet for the pod (and reached its stack, which a pod routing for others
/// would forward). Only its own addresses, or a group MAC, reach it.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn a_frame_to_the_pods_mac_for_another_address_is_dropped() {
    let mut rig = Rig::new(isolated());
    rig.config(trace());
    rig.allow_all(INGRESS, CLIENT_ID, 1);
    let to = |dst: [u8; 6], ip: Vec<u8>, ethertype| frame_between(dst, CLIENT_MAC, ethertype, ip);
    let for_server = ip4(CLIENT, SERVER, tcp(40000, 80, SYN), &V4::default());
    assert_eq!(
        judge(&mut rig, true, &to(POD_MAC, for_server, 0x0800)),
        (OK, reason::POLICY_ALLOWED)
    );
    for (what, ethertype, ip) in [
        (
            "another pod's IPv4",
            0x0800,
            ip4(CLIENT, HOST, tcp(40001, 80, SYN), &V4::default()),
        ),
        (
            "another pod's IPv6",
            0x86dd,
            ip6(CLIENT6, ROUTER6, &[], tcp(40001, 80, SYN)),
        ),
        (
            "limited broadcast",
            0x0800,
            ip4(CLIENT, [255; 4], udp(68, 67), &V4::default()),
        ),
    ] {
        assert_eq!(
            judge(&mut rig, true, &to(POD_MAC, ip, ethertype)),
            (SHOT, reason::MISDIRECTED),
            "{what}"
        );
    }
    // Broadcast and multicast frames are the link's: judged by policy as usual.
    let broadcast = ip4(CLIENT, [10, 244, 0, 255], udp(5000, 5000), &V4::default());
    assert_eq!(
        judge(&mut rig, true, &to([0xff; 6], broadcast, 0x0800)),
        (OK, reason::POLICY_ALLOWED)
    );
}

/// ICMP errors pass as RELATED only for their own flow: a pod errs only about packets
/// it received (the quoted destination is the error's source), only while the
/// connection's check holds (a revoked connection gets no errors through), and only at
/// the size an error has. Each of these used to pass.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn icmp_errors_pass_only_for_their_own_flow() {
    let mut rig = Rig::new(isolated());
    rig.config(trace());
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 1);
    let syn = ip4(CLIENT, SERVER, tcp(40000, 80, SYN), &V4::default());
    assert_eq!(rig.ingress(&v4(CLIENT, SERVER, tcp(40000, 80, SYN))), OK);
    rig.events();
    // The pod's error about the client's SYN, which it received: related.
    let error = |quote: &[u8], pad: usize| {
        let mut payload = quote.to_vec();
        payload.resize(quote.len() + pad, 0);
        v4(SERVER, CLIENT, icmp(false, 3, 3, 0, &payload))
    };
    assert_eq!(
        judge(&mut rig, false, &error(&syn[..28], 0)),
        (OK, reason::RELATED)
    );
    // The same tuple quoted as sent to someone else: the pod is no router.
    let mut elsewhere = syn.clone();
    elsewhere[16..20].copy_from_slice(&HOST);
    assert_eq!(
        judge(&mut rig, false, &error(&elsewhere[..28], 0)),
        (SHOT, reason::POLICY_DENIED)
    );
    // Longer than an IPv4 error may be (576 bytes): a channel, not an error.
    assert_eq!(
        judge(&mut rig, false, &error(&syn[..28], 600)),
        (SHOT, reason::POLICY_DENIED)
    );
    // The connection's check revoked: no errors about it either.
    rig.revoke(INGRESS, CLIENT_ID, TCP, 80);
    rig.update_endpoint(|e| e.revision += 1);
    assert_eq!(
        judge(&mut rig, false, &error(&syn[..28], 0)),
        (SHOT, reason::POLICY_DENIED)
    );
}

/// A port on the pod-start hold (a new pod not located yet, which can last as long as
/// the API server takes to publish its address, or a port held for an address conflict)
/// used to pass the pod's ARP and neighbour discovery unchecked: a new pod could answer
/// for any address before it was ever judged. The hold drops them from the pod (and
/// counts them as `PENDING_ENDPOINT`); towards the pod they pass.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn a_held_pods_arp_and_neighbour_discovery_are_dropped() {
    use netpol_common::{counter_index, direction, verdict};
    let mut rig = Rig::new(isolated());
    for name in ["hold_from_pod", "hold_to_pod"] {
        let prog: &mut aya::programs::SchedClassifier =
            rig.ebpf.program_mut(name).unwrap().try_into().unwrap();
        prog.load().unwrap();
    }
    let spoof = frame_between(
        [0xff; 6],
        POD_MAC,
        0x0806,
        arp(2, (POD_MAC, CLIENT), (CLIENT_MAC, HOST)),
    );
    let mut na = v6(SERVER6, ROUTER6, &[], icmp(true, 136, 0, 0, &CLIENT6));
    na[14 + 7] = 255;
    let held = || {
        rig.slot(counter_index(
            verdict::DROPPED,
            reason::PENDING_ENDPOINT,
            direction::EGRESS,
        ))
    };
    for frame in [&spoof, &na] {
        let before = held();
        assert_eq!(rig.run("hold_from_pod", frame), SHOT);
        assert_eq!(held(), before + 1);
        assert_eq!(rig.run("hold_to_pod", frame), OK, "towards the pod");
    }
}

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

/// A Service connection's replies (from the VIP, after the reverse NAT) used to pass on
/// the strength of the client's egress check whatever became of it: after the policy
/// allowing the backend was removed, the server could go on sending. A reply whose check
/// no longer holds is judged again against the backend the check was made for.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn a_revoked_service_connections_replies_stop() {
    use netpol_common::svc_mark;
    let vip = [10, 96, 0, 10];
    let mut rig = Rig::new(isolated());
    rig.config(trace());
    rig.service(v4_mapped(vip));
    // The pod under test is the client; the backend is CLIENT's address, port 8080.
    rig.allow(EGRESS, CLIENT_ID, TCP, 8080, 5);
    assert_eq!(
        judge(&mut rig, false, &v4(SERVER, vip, tcp(40000, 80, SYN))),
        (OK, reason::SERVICE_DEFERRED)
    );
    // After DNAT, on the way to the backend: judged, recorded.
    let to_backend = v4(SERVER, CLIENT, tcp(40000, 8080, SYN));
    assert_eq!(
        rig.run_marked("to_remote", &to_backend, svc_mark::pending(0, LO))
            .0,
        OK
    );
    rig.events();
    let reply = v4(vip, SERVER, tcp(80, 40000, ACK));
    assert_eq!(judge(&mut rig, true, &reply), (OK, reason::CONNTRACK));
    // Policy changes, the backend still allowed: the reply passes, its check renewed.
    rig.update_endpoint(|e| e.revision += 1);
    assert_eq!(judge(&mut rig, true, &reply), (OK, reason::CONNTRACK));
    let stamp = rig
        .conntrack(&key4(SERVER, vip, TCP, 40000, 80))
        .unwrap()
        .egress_stamp;
    assert_eq!(stamp, netpol_common::ct_stamp(REVISION + 1, 0));
    // The backend no longer allowed: the replies stop.
    rig.revoke(EGRESS, CLIENT_ID, TCP, 8080);
    rig.update_endpoint(|e| e.revision += 1);
    assert_eq!(
        judge(&mut rig, true, &reply),
        (SHOT, reason::POLICY_REVOKED)
    );
    assert_eq!(
        judge(&mut rig, true, &reply),
        (SHOT, reason::POLICY_REVOKED)
    );
}

/// A Service verdict belongs to the backend it was made for. A packet of an allowed
/// Service connection used to pass on its conntrack entry (client → VIP) whatever
/// backend kube-proxy then picked: after nf_conntrack forgets a UDP flow (30 s
/// unreplied) or an endpoint change flushes it, the next packet is DNATed anew, maybe to
/// a backend the client may not reach; and two flows from one source port to two
/// Services could trade verdicts. Such a packet leaves `from_pod` tagged established,
/// and after DNAT its backend must be its verdict's, or it is judged on the new one.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn a_service_verdict_does_not_carry_a_packet_to_another_backend() {
    use netpol_common::{identity, svc_mark};
    let (vip, denied) = ([10, 96, 0, 10], [10, 244, 0, 9]);
    let mut rig = Rig::new(isolated());
    rig.config(trace());
    rig.service(v4_mapped(vip));
    rig.ipcache(v4_mapped(denied), identity::WORLD, 0);
    rig.allow(EGRESS, CLIENT_ID, UDP, 5353, 5);
    let out = v4(SERVER, vip, udp(40000, 53));
    assert_eq!(judge(&mut rig, false, &out), (OK, reason::SERVICE_DEFERRED));
    let to = |backend: [u8; 4], port| v4(SERVER, backend, udp(40000, port));
    let (action, _) = rig.run_marked("to_remote", &to(CLIENT, 5353), svc_mark::pending(0, LO));
    assert_eq!(action, OK);
    rig.events();
    // The next packet passes on the connection, tagged for the check after DNAT.
    let (action, mark) = rig.run_marked("from_pod", &out, 0);
    assert_eq!(action, OK);
    assert_eq!(rig.events()[0].reason, reason::CONNTRACK);
    assert_eq!(mark, svc_mark::established(0, LO), "tagged established");
    // DNATed to the backend its verdict was made for: on, not judged again.
    assert_eq!(
        rig.run_marked("to_remote", &to(CLIENT, 5353), mark),
        (OK, 0)
    );
    assert!(rig.events().is_empty());
    // DNATed anew, to a backend the client may not reach: judged there, dropped.
    let (action, _) = rig.run_marked("to_remote", &to(denied, 5353), mark);
    assert_eq!(action, SHOT, "carried to another backend");
    assert_eq!(rig.events()[0].reason, reason::POLICY_DENIED);
    // ...and to the allowed backend on another port, likewise.
    let (action, _) = rig.run_marked("to_remote", &to(CLIENT, 9999), mark);
    assert_eq!(action, SHOT);
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

/// One pod used to be able to turn the node's whole conntrack table over: every allowed
/// new flow inserted into one LRU, and a flood of them evicted other pods' quiet
/// connections (whose replies then dropped). Each endpoint now holds at most its share
/// (`Config::ct_share`); beyond it its allowed flows pass untracked and are counted as
/// `CT_SHARE_FULL`. The agent's sweep gives back what expired.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn one_pod_holds_no_more_conntrack_than_its_share() {
    use aya::maps::HashMap;
    use netpol_agent::datapath::sweep;
    use netpol_common::{event_counter, map, Config, CtEntry, CtKey};
    let mut rig = Rig::new(isolated());
    let config = Config {
        ct_share: 3,
        ..trace()
    };
    rig.config(config);
    rig.allow_all(EGRESS, CLIENT_ID, 1);
    let flow = |sport| v4(SERVER, CLIENT, udp(sport, 53));
    for sport in 40000..40005 {
        assert_eq!(
            judge(&mut rig, false, &flow(sport)),
            (OK, reason::POLICY_ALLOWED)
        );
    }
    assert_eq!(
        rig.conntrack_len(),
        3,
        "three flows tracked, two passed untracked"
    );
    assert_eq!(rig.slot(event_counter::CT_SHARE_FULL), 2);
    let mut held: HashMap<_, u32, u64> =
        HashMap::try_from(rig.ebpf.take_map(map::CT_HELD).unwrap()).unwrap();
    assert_eq!(held.get(&LO, 0).unwrap(), 3, "counted for the pod's veth");
    // A flow ends (its entry expires unseen): the sweep deletes it and gives it back.
    let old = key4(SERVER, CLIENT, UDP, 40000, 53);
    let mut e = rig.conntrack(&old).unwrap();
    e.last_seen_ns -= 120 * 1_000_000_000;
    rig.put_conntrack(&old, e);
    let mut ct: HashMap<_, CtKey, CtEntry> =
        HashMap::try_from(rig.ebpf.map_mut(map::CONNTRACK).unwrap()).unwrap();
    let swept = sweep::sweep(&mut ct, &mut held, &config, monotonic_ns()).unwrap();
    assert_eq!((swept.expired, swept.live), (1, 2));
    assert_eq!(held.get(&LO, 0).unwrap(), 2);
    // Room again for one.
    assert_eq!(
        judge(&mut rig, false, &flow(40010)),
        (OK, reason::POLICY_ALLOWED)
    );
    assert!(rig
        .conntrack(&key4(SERVER, CLIENT, UDP, 40010, 53))
        .is_some());
    assert_eq!(rig.slot(event_counter::CT_SHARE_FULL), 2);
}

/// The fragments table likewise: one pod sending first fragments without end used to
/// evict every other pod's datagrams in flight (their later fragments then dropped as
/// FRAGMENT_UNKNOWN). Each endpoint has at most its share of datagrams remembered
/// (`Config::frag_share`); beyond it its own later fragments drop, counted as
/// `FRAG_SHARE_FULL`.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn one_pod_has_no_more_datagrams_remembered_than_its_share() {
    use netpol_common::{event_counter, Config};
    let mut rig = Rig::new(isolated());
    rig.config(Config {
        frag_share: 2,
        ..trace()
    });
    rig.allow_all(EGRESS, CLIENT_ID, 1);
    let fragment = |id: u16, offset: u16| {
        let l4 = if offset == 0 {
            udp(1000 + id, 53)
        } else {
            (UDP, vec![0xab; 16])
        };
        let o = V4 {
            id,
            offset,
            more: offset == 0,
            ..V4::default()
        };
        v4o(SERVER, CLIENT, l4, &o)
    };
    for id in 1..=3 {
        assert_eq!(
            judge(&mut rig, false, &fragment(id, 0)),
            (OK, reason::POLICY_ALLOWED)
        );
    }
    assert_eq!(rig.slot(event_counter::FRAG_SHARE_FULL), 1);
    // The two remembered datagrams go on; the third's later fragment drops.
    for id in 1..=2 {
        assert_eq!(
            judge(&mut rig, false, &fragment(id, 100)),
            (OK, reason::FRAGMENT)
        );
    }
    assert_eq!(
        judge(&mut rig, false, &fragment(3, 100)),
        (SHOT, reason::FRAGMENT_UNKNOWN)
    );
    // A first fragment sent again is the same datagram (its flow tracked now): no
    // second share.
    assert_eq!(
        judge(&mut rig, false, &fragment(1, 0)),
        (OK, reason::CONNTRACK)
    );
    assert_eq!(rig.slot(event_counter::FRAG_SHARE_FULL), 1);
}

/// An upgrade across pin versions whose conntrack layout is unchanged used to copy the
/// entries with their stamps: made against the old agent's revisions and epochs, which
/// the new agent's own numbering can meet again and take for current (a connection the
/// new policy denies then passes unjudged). Migrated entries keep their state and rule
/// cookies, and their stamps become 0: judged again at the next packet.
#[test]
#[ignore = "needs root: pins maps in bpffs"]
fn connections_migrated_across_versions_are_judged_again() {
    use aya::maps::{HashMap, MapData};
    use netpol_agent::datapath::pin::{migrate_conntrack, PinDir};
    use netpol_common::{ct_flags, ct_stamp, map, CtEntry, CtKey};
    support::need_root("pins maps in bpffs");
    let root = std::path::PathBuf::from(format!("/sys/fs/bpf/np-migrate-{}", std::process::id()));
    struct Gone(std::path::PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _gone = Gone(root.clone());
    // The other version's pins: its layout (the same as ours) and one live connection.
    let old = PinDir::with_version(&root, "v0-test");
    let (k, v) = (std::mem::size_of::<CtKey>(), std::mem::size_of::<CtEntry>());
    std::fs::create_dir_all(old.dir().join(format!("layout/{}:{k}:{v}", map::CONNTRACK))).unwrap();
    std::fs::create_dir_all(old.dir().join("maps")).unwrap();
    let key = key4(CLIENT, SERVER, TCP, 40000, 80);
    let entry = CtEntry {
        last_seen_ns: monotonic_ns(),
        flags: ct_flags::INGRESS_OK | ct_flags::SEEN_REPLY,
        ingress_stamp: ct_stamp(REVISION, 3),
        ingress_cookie: 9,
        owner: LO,
        ..CtEntry::default()
    };
    let mut theirs: HashMap<MapData, CtKey, CtEntry> = HashMap::create(16, 0).unwrap();
    theirs.insert(key, entry, 0).unwrap();
    theirs.pin(old.map_path(map::CONNTRACK)).unwrap();
    let mut rig = Rig::new(isolated());
    let mut ours: HashMap<&mut MapData, CtKey, CtEntry> =
        HashMap::try_from(rig.ebpf.map_mut(map::CONNTRACK).unwrap()).unwrap();
    assert_eq!(migrate_conntrack(&old, &mut ours).unwrap(), Some(1));
    let migrated = ours.get(&key, 0).unwrap();
    assert_eq!(
        (migrated.ingress_stamp, migrated.egress_stamp),
        (0, 0),
        "stamps of another agent's numbering are not carried over"
    );
    assert_eq!(
        (migrated.flags, migrated.ingress_cookie, migrated.owner),
        (entry.flags, 9, LO),
        "the connection's state is"
    );
}

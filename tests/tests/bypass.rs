//! Attacks on the classifier, each named after what it tries: crafted frames through
//! `BPF_PROG_TEST_RUN` where the kernel's own handling of the frame does not matter (the
//! lab's real-frame attacks follow in this file as the threat model's paths are closed).
//! A pod has raw sockets (NET_RAW is a default), so it can send any frame. Needs root.

mod support;

use netpol_common::{reason, v4_mapped};
use support::lab::{signal_and_wait, Lab};
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
        vec![0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 0, 10, 0, 0, 2],
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

/// The post-DNAT hook (`to_remote` on `flannel.1`, where deferred Service egress meets
/// the client's policy) used to go with the agent: a clean exit or a rolling update
/// detached it, and DNATed packets to remote backends left unjudged until the next
/// agent attached it again. It stays, and a new agent replaces its program in place.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn the_post_dnat_hook_stays_when_the_agent_exits() {
    let lab = Lab::cluster(
        "hook",
        2,
        &[(
            "ns.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
        )],
    );
    let node = lab.status()["nodes"][0].clone();
    let netns = node["netns"].as_str().unwrap().to_string();
    let hooked = || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns,
                "tc",
                "filter",
                "show",
                "dev",
                "flannel.1",
                "egress",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("to_remote")
    };
    assert!(hooked(), "the agent hooks flannel.1");
    let pid = node["agent_pid"].as_i64().unwrap() as i32;
    signal_and_wait(pid, libc::SIGTERM);
    assert!(hooked(), "the hook outlives a clean exit of the agent");
}

/// A sync that fails half-way (here the policy map fills up) used to leave the epoch
/// alone: connections judged against its partial entries kept current stamps for as
/// long as the retries failed. It bumps the epoch, so they are judged again.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_sync_that_fails_half_way_still_starts_a_new_epoch() {
    let lab = Lab::up(
        "hsync",
        &[("pods.yaml", support::manifests::PODS)],
        &["--agent-arg=--policy-capacity=8"],
    );
    lab.wait();
    let epoch = || {
        use aya::maps::{Array, Map, MapData};
        let path = netpol_tests::lab::pin_root_of(&lab.name, 0)
            .join(netpol_common::PIN_VERSION)
            .join("maps/NP_CONFIG");
        let map = Map::from_map_data(MapData::from_pin(path).unwrap()).unwrap();
        let config: Array<MapData, netpol_common::Config> = Array::try_from(map).unwrap();
        config.get(&0, 0).unwrap().epoch
    };
    let before = epoch();
    // 40 ports, 40 entries or more: more than the map holds.
    let ports: Vec<String> = (1000..1040).map(|p| format!("{{port: {p}}}")).collect();
    lab.write(
        "many.yaml",
        &format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: many, namespace: x}}\nspec: {{podSelector: {{}}, ingress: [{{ports: [{}]}}]}}\n",
            ports.join(", ")
        ),
    );
    // The agent's own account of the failure is the signal to look for.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !lab.logs().contains("datapath sync failed") {
        assert!(
            std::time::Instant::now() < deadline,
            "no failed sync:\n{}",
            lab.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        epoch() > before,
        "a new epoch after the failed sync (was {before})"
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

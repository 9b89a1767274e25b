//! Attacks on what the classifier remembers (crafted frames through
//! `BPF_PROG_TEST_RUN`, like `bypass.rs`): Service verdicts reused for another backend
//! or after revocation, one pod filling the conntrack or fragments table for all, stamps
//! carried across an upgrade. Each test failed on the code before its fix. Needs root.

mod support;

use netpol_common::{reason, v4_mapped, Config};
use support::packet::*;
use support::rig::*;

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

/// A packet a pod sent to a VIP that kube-proxy DNATed to the node itself (a
/// hostNetwork backend on this node) met no hook after DNAT: delivered to the local
/// socket unjudged, whatever the client's egress said of the backend. `local_in`, on
/// local delivery, judges it like `to_remote` does a remote backend's. (The lab's
/// `bypass_lab` test proves it end to end; this one each branch of the hook.)
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn a_service_packet_dnated_to_the_node_itself_is_judged_on_local_delivery() {
    use netpol_common::{identity, svc_mark};
    let (vip, node) = ([10, 96, 0, 10], [192, 168, 0, 7]);
    let mut rig = Rig::new(isolated());
    let cookie = netpol_agent::datapath::local_in::netns_cookie().unwrap() as u32;
    rig.config(Config {
        netns_cookie: cookie,
        ..trace()
    });
    rig.service(v4_mapped(vip));
    rig.ipcache(v4_mapped(node), identity::WORLD, 0);
    rig.allow(EGRESS, CLIENT_ID, TCP, 8080, 5);
    // Each case its own connection (source port).
    let to = |sport, backend: [u8; 4]| v4(SERVER, backend, tcp(sport, 8080, SYN));
    let deferred = |rig: &mut Rig, sport| {
        assert_eq!(
            judge(rig, false, &v4(SERVER, vip, tcp(sport, 80, SYN))),
            (OK, reason::SERVICE_DEFERRED)
        );
        svc_mark::pending(0, LO)
    };
    // To the node (its address not allowed): dropped on delivery, as POLICY_DENIED.
    let mark = deferred(&mut rig, 40000);
    assert_eq!(rig.deliver_locally(&to(40000, node), mark), 0, "unjudged");
    let events = rig.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason, reason::POLICY_DENIED);
    // To an allowed backend: delivered, as POLICY_ALLOWED.
    let mark = deferred(&mut rig, 40001);
    assert_eq!(rig.deliver_locally(&to(40001, CLIENT), mark), 1);
    assert_eq!(rig.events()[0].reason, reason::POLICY_ALLOWED);
    // Untagged (the node's own traffic, replies): delivered, not judged.
    assert_eq!(rig.deliver_locally(&to(40002, node), 0), 1);
    assert!(rig.events().is_empty());
    // Tagged in another namespace (another lab node under the same cgroup tree):
    // that node's hook judges it, not this one.
    rig.config(Config {
        netns_cookie: cookie.wrapping_add(1),
        ..trace()
    });
    let mark = deferred(&mut rig, 40003);
    assert_eq!(rig.deliver_locally(&to(40003, node), mark), 1);
    assert!(rig.events().is_empty());
}

/// Until the hook on local delivery is attached (cgroup v2 missing, the attach
/// failing), a packet to a VIP might be DNATed to this node and judged nowhere: it drops
/// instead, as `SERVICE_UNHOOKED`, and the agent says so in its log.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn egress_to_a_vip_drops_while_the_local_delivery_hook_is_missing() {
    let vip = [10, 96, 0, 10];
    let mut rig = Rig::new(isolated());
    let mut config = trace();
    config.flags |= netpol_common::config_flags::LOCAL_UNHOOKED;
    rig.config(config);
    rig.service(v4_mapped(vip));
    rig.allow(EGRESS, CLIENT_ID, TCP, 8080, 5);
    assert_eq!(
        judge(&mut rig, false, &v4(SERVER, vip, tcp(40000, 80, SYN))),
        (SHOT, reason::SERVICE_UNHOOKED)
    );
    rig.config(trace());
    assert_eq!(
        judge(&mut rig, false, &v4(SERVER, vip, tcp(40000, 80, SYN))),
        (OK, reason::SERVICE_DEFERRED)
    );
}

/// A pod's packet to the node's address on a NodePort used to be judged as egress to
/// the node (allowed wherever the node's address was), and kube-proxy then DNATed it to
/// any backend; at a local backend the masquerade made it host traffic, so no ingress
/// policy judged it either. It is deferred like a packet to a ClusterIP and judged on
/// the backend, whose ingress judges the client as `from_pod` saw it, not the node.
/// A packet forwarded from outside and masqueraded to the node's address is no host
/// traffic either (`bypass_services` proves it with real traffic).
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn a_pods_packet_to_a_node_port_is_judged_on_the_backend_as_its_clients() {
    use netpol_common::{config_flags, identity, svc_mark};
    let node = [172, 30, 0, 2];
    let mut rig = Rig::new(isolated());
    rig.config(Config {
        flags: config_flags::TRACE | config_flags::ALLOW_HOST,
        host_ipv4: v4_mapped(HOST),
        ..Config::default()
    });
    rig.ipcache(v4_mapped(node), identity::WORLD, 0);
    rig.node_port(v4_mapped(node), TCP, 30080);
    // The pod may reach the outside world (an ipBlock 0.0.0.0/0) on that port.
    rig.allow(EGRESS, identity::WORLD, TCP, 30080, 3);
    let to_node = |sport, port| v4(SERVER, node, tcp(sport, port, SYN));
    assert_eq!(
        judge(&mut rig, false, &to_node(40000, 30080)),
        (OK, reason::SERVICE_DEFERRED),
        "judged as egress to the node"
    );
    // Another port of the node's is no Service's: judged at once.
    assert_eq!(
        judge(&mut rig, false, &to_node(40001, 22)),
        (SHOT, reason::POLICY_DENIED)
    );
    // DNATed to a backend the pod may not reach: dropped.
    let pending = svc_mark::pending(0, LO);
    let to_backend = |src, sport, backend| v4(src, backend, tcp(sport, 8080, SYN));
    let (action, _) = rig.run_marked("to_remote", &to_backend(SERVER, 40000, CLIENT), pending);
    assert_eq!(action, SHOT);
    assert_eq!(rig.events().last().unwrap().reason, reason::POLICY_DENIED);
    // DNATed to this pod itself (a local backend) and masqueraded to the bridge's
    // address: the backend's ingress judges its client (default deny), not the node.
    rig.allow(EGRESS, SERVER_ID, TCP, 8080, 4);
    for sport in [40002, 40003] {
        assert_eq!(
            judge(&mut rig, false, &to_node(sport, 30080)),
            (OK, reason::SERVICE_DEFERRED)
        );
    }
    let (action, _) = rig.run_marked("to_pod", &to_backend(HOST, 40002, SERVER), pending);
    let last = rig.events().last().copied().unwrap();
    assert_eq!(action, SHOT, "taken for host traffic");
    assert_eq!(last.reason, reason::POLICY_DENIED);
    // Allowed from the client: on.
    rig.allow(INGRESS, SERVER_ID, TCP, 8080, 5);
    let (action, _) = rig.run_marked("to_pod", &to_backend(HOST, 40003, SERVER), pending);
    assert_eq!(action, OK);
    assert_eq!(rig.events().last().unwrap().reason, reason::POLICY_ALLOWED);
    // Untagged from the node's address: host traffic when the node sent it, judged by
    // policy when it was forwarded (received on the uplink, say) and masqueraded.
    rig.events();
    let (action, _) = rig.run_marked("to_pod", &to_backend(HOST, 40004, SERVER), 0);
    assert_eq!(action, OK);
    assert_eq!(rig.events().last().unwrap().reason, reason::HOST_TRAFFIC);
    let (action, _) = rig.run_received("to_pod", &to_backend(HOST, 40005, SERVER), 0, 7);
    assert_eq!(action, SHOT, "a forwarded packet taken for the node's");
    assert_eq!(rig.events().last().unwrap().reason, reason::POLICY_DENIED);
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

/// `from_pod` skips the VIP lookup for a packet whose conntrack entry already knows that
/// its destination is no Service address. That knowledge holds under the stamp it was
/// found under only: once the peer's address becomes a Service's (an externalIP, say,
/// which starts a new epoch), both the pod's own connection to it and its replies to a
/// connection the peer opened go through the lookup again, and leave tagged for the
/// check after DNAT instead of passing on their entries. So too after the peer's own
/// packets renewed the entries' checks under the new stamp.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn a_peer_that_becomes_a_services_address_is_looked_up_again() {
    use netpol_common::{ct_flags, svc_mark};
    let mut rig = Rig::new(isolated());
    rig.config(trace());
    rig.allow(EGRESS, CLIENT_ID, UDP, 53, 5);
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 6);
    let query = v4(SERVER, CLIENT, udp(40000, 53));
    let syn = v4(CLIENT, SERVER, tcp(50000, 80, SYN));
    let reply = v4(SERVER, CLIENT, tcp(80, 50000, SYN | ACK));
    assert_eq!(judge(&mut rig, false, &query).0, OK);
    assert_eq!(judge(&mut rig, true, &syn).0, OK);
    for packet in [&query, &reply, &query, &reply] {
        assert_eq!(rig.run_marked("from_pod", packet, 0), (OK, 0));
    }
    assert!(rig.events().iter().all(|e| e.reason == reason::CONNTRACK));
    let flags = |rig: &Rig, key| rig.conntrack(&key).unwrap().flags;
    let (out_key, in_key) = (
        key4(SERVER, CLIENT, UDP, 40000, 53),
        key4(CLIENT, SERVER, TCP, 50000, 80),
    );
    assert_ne!(flags(&rig, out_key) & ct_flags::EGRESS_DIRECT, 0);
    assert_ne!(flags(&rig, in_key) & ct_flags::INGRESS_DIRECT, 0);

    rig.service(v4_mapped(CLIENT));
    rig.config(Config {
        epoch: 1,
        ..trace()
    });
    let answer = v4(CLIENT, SERVER, udp(53, 40000));
    let ack = v4(CLIENT, SERVER, tcp(50000, 80, ACK));
    for packet in [&answer, &ack] {
        assert_eq!(judge(&mut rig, true, packet), (OK, reason::POLICY_ALLOWED));
    }
    let stamp = netpol_common::ct_stamp(REVISION, 1);
    assert_eq!(rig.conntrack(&out_key).unwrap().egress_stamp, stamp);
    assert_eq!(rig.conntrack(&in_key).unwrap().ingress_stamp, stamp);
    // Tagged for the check after DNAT: the query's egress check is current (its backend
    // must be the one it was made for); the reply was never judged as egress to a VIP.
    let tagged = [
        (&query, svc_mark::established(0, LO), reason::CONNTRACK),
        (&reply, svc_mark::pending(0, LO), reason::SERVICE_DEFERRED),
    ];
    for (packet, tag, why) in tagged {
        assert_eq!(rig.run_marked("from_pod", packet, 0), (OK, tag));
        assert_eq!(rig.events()[0].reason, why);
    }
}

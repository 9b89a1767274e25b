//! Connection state: ICMP errors quoting tracked flows, revoked connections, TCP state and
//! idle timeouts, epochs.
//!
//! The classifier on crafted packets with prepared maps (`BPF_PROG_TEST_RUN`): packet
//! bytes + map contents → verdict + event + conntrack state. Needs root.

mod support;

use netpol_common::{config_flags, ct_flags, reason, v4_mapped, verdict, Config, CtEntry};
use support::packet::*;
use support::rig::*;

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
    assert_eq!(rig.conntrack(&key).unwrap().ingress_stamp, 8);
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
    // The reply's VIP lookup found none: the replies after it skip it.
    let est = ct_flags::INGRESS_OK | ct_flags::SEEN_REPLY | ct_flags::INGRESS_DIRECT;
    assert_eq!(rig.conntrack(&key).unwrap().flags, est);
    assert_eq!(rig.ingress(&c2s(FIN | ACK)), OK);
    assert_eq!(rig.conntrack(&key).unwrap().flags, est | ct_flags::FIN_ORIG);
    assert_eq!(rig.egress(&s2c(FIN | ACK)), OK);
    assert_eq!(
        rig.conntrack(&key).unwrap().flags,
        est | ct_flags::FIN_ORIG | ct_flags::FIN_REPLY
    );
    // A new SYN on the closed tuple starts over (the same addresses: what is known of
    // them under this stamp still holds).
    assert_eq!(rig.ingress(&c2s(SYN)), OK);
    assert_eq!(
        rig.conntrack(&key).unwrap().flags,
        ct_flags::INGRESS_OK | ct_flags::INGRESS_DIRECT
    );
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
                ingress_stamp: REVISION.into(),
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
                ingress_stamp: REVISION.into(),
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
                ingress_stamp: REVISION.into(),
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
        .ingress_stamp;
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

/// TCP state starts at an initial SYN only: a mid-stream segment (a lost state, or a
/// flood of ACKs to fill the table) is judged and passes untracked where policy allows
/// it, so its replies meet the other side's policy instead of riding on an entry.
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn tcp_state_starts_at_a_syn_only() {
    let mut rig = Rig::new(isolated());
    rig.config(trace());
    rig.allow(INGRESS, CLIENT_ID, TCP, 80, 0x10);
    let key = key4(CLIENT, SERVER, TCP, 40000, 80);
    for flags in [ACK, ACK | PSH, FIN | ACK, RST, SYN | ACK] {
        let segment = v4(CLIENT, SERVER, tcp(40000, 80, flags));
        assert_eq!(
            judge(&mut rig, true, &segment),
            (OK, reason::POLICY_ALLOWED),
            "flags {flags:#x}: allowed by policy"
        );
        assert!(rig.conntrack(&key).is_none(), "flags {flags:#x}: no state");
        // The server's answer has no entry to ride on: its own egress (default deny).
        let answer = v4(SERVER, CLIENT, tcp(80, 40000, ACK));
        assert_eq!(
            judge(&mut rig, false, &answer),
            (SHOT, reason::POLICY_DENIED),
            "flags {flags:#x}: the answer is judged"
        );
    }
    // A denied ACK flood creates nothing either; an initial SYN does.
    let other = v4(CLIENT, SERVER, tcp(40001, 81, ACK));
    assert_eq!(judge(&mut rig, true, &other), (SHOT, reason::POLICY_DENIED));
    assert_eq!(
        judge(&mut rig, true, &v4(CLIENT, SERVER, tcp(40000, 80, SYN))),
        (OK, reason::POLICY_ALLOWED)
    );
    assert!(rig.conntrack(&key).is_some(), "a SYN opens the connection");
    assert_eq!(
        judge(
            &mut rig,
            false,
            &v4(SERVER, CLIENT, tcp(80, 40000, SYN | ACK))
        ),
        (OK, reason::CONNTRACK)
    );
}

/// A pod isolated in neither direction is still tracked, so that the first policy to
/// isolate it (a namespace's default deny of ingress, the usual first step) does not cut
/// the connections it already has: their replies ride on the check made when they were
/// opened, judged again under the new revision, while new connections in are denied.
/// Without the entry the reply would meet the new ingress policy as a stranger, and a
/// mid-stream segment cannot open state again (SYN only).
#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn connections_opened_before_the_first_isolating_policy_keep_their_replies() {
    use netpol_common::endpoint_flags::ISOLATED_INGRESS;
    let mut rig = Rig::new(0);
    rig.config(trace());
    let out = v4(SERVER, CLIENT, tcp(40000, 5432, SYN));
    let reply = v4(CLIENT, SERVER, tcp(5432, 40000, SYN | ACK));
    assert_eq!(judge(&mut rig, false, &out), (OK, reason::NOT_ISOLATED));
    assert!(
        rig.conntrack(&key4(SERVER, CLIENT, TCP, 40000, 5432))
            .is_some(),
        "tracked while isolated in neither direction"
    );
    assert_eq!(judge(&mut rig, true, &reply), (OK, reason::CONNTRACK));

    rig.update_endpoint(|ep| {
        ep.flags = ISOLATED_INGRESS;
        ep.revision = 2;
    });
    let data = v4(CLIENT, SERVER, tcp(5432, 40000, ACK | PSH));
    assert_eq!(
        judge(&mut rig, true, &data).0,
        OK,
        "the reply of a connection opened before isolation passes"
    );
    assert_eq!(judge(&mut rig, true, &data), (OK, reason::CONNTRACK));
    assert_eq!(
        judge(&mut rig, true, &v4(CLIENT, SERVER, tcp(40001, 80, SYN))),
        (SHOT, reason::POLICY_DENIED),
        "a new connection in is denied"
    );
}

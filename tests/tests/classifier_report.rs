//! What is reported and counted: audit, rate-limited and sampled events, per-rule
//! counters, suppressed events.
//!
//! The classifier on crafted packets with prepared maps (`BPF_PROG_TEST_RUN`): packet
//! bytes + map contents → verdict + event + conntrack state. Needs root.

mod support;

use netpol_common::{
    config_flags, ct_flags, endpoint_flags, event_counter, reason, verdict, Config,
};
use support::packet::*;
use support::rig::*;

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

//! Random and mutated frames through the classifier (`BPF_PROG_TEST_RUN`), each checked
//! against a reference parser written from the RFCs and the userspace lookup
//! (`compile::lookup::decide_at`) over the same map contents: the kernel must parse
//! what the reference parses and give the verdict the userspace lookup gives for it.
//!
//! Deterministic: a fixed seed and case count, overridable with `NETPOL_FUZZ_SEED` and
//! `NETPOL_FUZZ_CASES` to search further. Needs root.

mod support;
// The reference parser, written from the RFCs (its own file: it is half this suite).
#[path = "fuzz/reference.rs"]
mod reference;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netpol_agent::datapath::maps::{cidr_key, policy_key, upsert_diff};
use netpol_common::{
    config_flags, direction, endpoint_flags, identity, map, policy_action, reason, v4_mapped,
    verdict, CidrEntry, Config, IpcacheEntry, PolicyEntry, PolicyKey,
};
use netpol_engine::compile::{lookup::decide_at, Desired, PolicyPrefix};
use netpol_engine::index::net::Cidr;
use support::packet::*;
use support::rig::*;

use reference::{reference, Expect};

/// xorshift64*: small, seedable, good enough to pick cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const OTHER4: [u8; 4] = [192, 168, 7, 7];
const OTHER6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
const CIDR_A: u32 = identity::FIRST_CIDR + 1;
const CIDR_B: u32 = identity::FIRST_CIDR + 2;

/// The maps' contents, as the agent would compute them: written to the kernel and
/// given to the userspace lookup.
fn desired() -> Desired {
    let mut d = Desired::default();
    let host = |ip: IpAddr| Cidr::host(ip);
    for (ip, id) in [
        (IpAddr::V4(Ipv4Addr::from(CLIENT)), CLIENT_ID),
        (IpAddr::V4(Ipv4Addr::from(SERVER)), SERVER_ID),
        (IpAddr::V6(Ipv6Addr::from(CLIENT6)), CLIENT_ID),
        (IpAddr::V6(Ipv6Addr::from(SERVER6)), SERVER_ID),
        (IpAddr::V4(Ipv4Addr::from(HOST)), identity::HOST),
    ] {
        d.ipcache.insert(
            host(ip),
            IpcacheEntry {
                identity: id,
                endpoint: 0,
            },
        );
    }
    // ipBlocks: 10.244.0.0/16 and 2001:db8::/32
    d.cidrs.insert(
        Cidr::from_map_key(v4_mapped([10, 244, 0, 0]), 96 + 16),
        CidrEntry { identity: CIDR_A },
    );
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&[0x20, 1, 0xd, 0xb8]);
    d.cidrs
        .insert(Cidr::from_map_key(b, 32), CidrEntry { identity: CIDR_B });
    let mut rule =
        |dir: u8, id: u32, protocol: u8, port: u16, len: u32, action, precedence, cookie| {
            let mut key = PolicyKey {
                endpoint: SERVER_ID,
                identity: id,
                direction: dir,
                protocol,
                port_be: port.to_be_bytes(),
            };
            if len <= PolicyKey::FIXED_BITS {
                key.protocol = 0;
            }
            if len <= PolicyKey::PROTO_BITS {
                key.port_be = [0, 0];
            }
            d.policy.insert(
                PolicyPrefix {
                    key,
                    prefix_len: len,
                },
                PolicyEntry {
                    cookie,
                    action,
                    precedence,
                },
            );
        };
    let (ing, eg) = (direction::INGRESS, direction::EGRESS);
    let (allow, deny) = (policy_action::ALLOW, policy_action::DENY);
    rule(ing, CLIENT_ID, TCP, 80, 96, allow, 0, 1);
    rule(ing, identity::ANY, UDP, 53, 96, allow, 0, 2);
    // TCP 8192-16383 from the pod CIDR (a port prefix)
    rule(ing, CIDR_A, TCP, 8192, 83, allow, 0, 3);
    rule(ing, CIDR_B, SCTP, 0, 80, allow, 0, 4);
    rule(eg, CLIENT_ID, 0, 0, 72, allow, 0, 5);
    rule(eg, identity::ANY, TCP, 443, 96, allow, 0, 6);
    rule(eg, CIDR_B, TCP, 443, 96, deny, 1, 7);
    rule(eg, identity::WORLD, UDP, 0, 80, allow, 0, 8);
    d
}

// ---- packets ------------------------------------------------------------------------

fn l4(rng: &mut Rng, v6_family: bool, depth: u32) -> (u8, Vec<u8>) {
    let port = |rng: &mut Rng| {
        let choices = [
            53,
            80,
            443,
            8192 + rng.below(8192) as u16,
            rng.next() as u16,
        ];
        rng.pick(&choices)
    };
    match rng.below(6) {
        0 => tcp(port(rng), port(rng), rng.next() as u8),
        1 => udp(port(rng), port(rng)),
        2 => sctp(port(rng), port(rng)),
        3 | 4 => {
            let kinds: &[u8] = if v6_family {
                &[128, 129, 1, 2, 3, 4, 135, 143, 200]
            } else {
                &[8, 0, 3, 11, 12, 13]
            };
            let kind = rng.pick(kinds);
            let error = if v6_family {
                kind <= 4
            } else {
                [3, 11, 12].contains(&kind)
            };
            let payload = if error && depth == 0 {
                let inner = l4(rng, v6_family, 1);
                let q = if v6_family {
                    ip6(SERVER6, CLIENT6, &[], inner)
                } else {
                    ip4(SERVER, CLIENT, inner, &V4::default())
                };
                let keep = (rng.below(q.len() as u64) as usize + 1)
                    .max(q.len() - rng.below(2) as usize * 12);
                q[..keep.min(q.len())].to_vec()
            } else {
                let n = rng.below(16) as usize;
                rng.bytes(n)
            };
            icmp(v6_family, kind, 0, rng.next() as u16, &payload)
        }
        _ => {
            let (protocol, n) = (rng.next() as u8, rng.below(24) as usize);
            (protocol, rng.bytes(n))
        }
    }
}

fn packet(rng: &mut Rng, egress: bool) -> Vec<u8> {
    let v6_family = rng.chance(2);
    let l = l4(rng, v6_family, 0);
    if v6_family {
        let peers = [CLIENT6, OTHER6, SERVER6];
        let peer = rng.pick(&peers);
        // Egress: the pod's own address, but one in ten spoofed.
        let (src, dst) = if egress && !rng.chance(10) {
            (SERVER6, peer)
        } else {
            (peer, SERVER6)
        };
        let mut exts = Vec::new();
        for _ in 0..rng.below(10) {
            let e = match rng.below(5) {
                0 => Ext::HopByHop,
                1 => Ext::Routing,
                2 => Ext::DestOpts,
                3 => Ext::Auth,
                _ => Ext::Fragment {
                    offset: rng.pick(&[0, 0, 1, 100]),
                    more: rng.chance(2),
                    id: rng.below(4) as u32,
                },
            };
            exts.push(e);
        }
        let hop = rng.pick(&[64, 255, 1]);
        eth(0x86dd, ip6_hop(src, dst, &exts, l, hop))
    } else {
        let peers = [CLIENT, OTHER4, SERVER, HOST];
        let peer = rng.pick(&peers);
        let (src, dst) = if egress && !rng.chance(10) {
            (SERVER, peer)
        } else {
            (peer, SERVER)
        };
        let o = V4 {
            options: vec![1; rng.below(4) as usize * 4 * rng.below(2) as usize],
            id: rng.below(4) as u16,
            offset: if rng.chance(4) {
                rng.pick(&[1, 2, 100])
            } else {
                0
            },
            more: rng.chance(4),
        };
        v4o(src, dst, l, &o)
    }
}

fn mutate(rng: &mut Rng, p: &mut Vec<u8>) {
    match rng.below(3) {
        0 => {
            for _ in 0..=rng.below(4) {
                let i = 12 + rng.below((p.len() - 12) as u64) as usize;
                p[i] ^= 1 << rng.below(8);
            }
        }
        1 => {
            let keep = 14 + rng.below((p.len() - 13) as u64) as usize;
            p.truncate(keep);
        }
        _ => {
            let i = 14 + rng.below((p.len() - 13) as u64) as usize;
            let b = rng.next() as u8;
            if i < p.len() {
                p[i] = b;
            } else {
                p.push(b);
            }
        }
    }
}

#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn kernel_verdicts_match_the_reference_parse_and_the_userspace_lookup() {
    let seed: u64 = std::env::var("NETPOL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6e65_7470_6f6c);
    let cases: usize = std::env::var("NETPOL_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4000);
    let mut rng = Rng(seed | 1);

    let mut rig = Rig::new(endpoint_flags::ISOLATED_INGRESS | endpoint_flags::ISOLATED_EGRESS);
    rig.config(Config {
        flags: config_flags::TRACE | config_flags::ALLOW_HOST,
        host_ipv4: v4_mapped(HOST),
        ..Config::default()
    });
    let d = desired();
    let empty = Desired::default();
    upsert_diff(
        &mut rig.ebpf,
        map::IPCACHE,
        &empty.ipcache,
        &d.ipcache,
        cidr_key,
    )
    .unwrap();
    upsert_diff(&mut rig.ebpf, map::CIDRS, &empty.cidrs, &d.cidrs, cidr_key).unwrap();
    upsert_diff(
        &mut rig.ebpf,
        map::POLICY,
        &empty.policy,
        &d.policy,
        policy_key,
    )
    .unwrap();
    let ep = rig.endpoint;

    let mut tally: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut refused = 0;
    for case in 0..cases {
        let egress = rng.chance(2);
        let mut p = packet(&mut rng, egress);
        let mutated = rng.chance(2);
        if mutated {
            mutate(&mut rng, &mut p);
        }
        // Each packet on its own: no state from earlier cases.
        rig.clear_conntrack();
        rig.clear_fragments();
        let program = if egress { "from_pod" } else { "to_pod" };
        let Some(action) = rig.try_run(program, &p) else {
            refused += 1;
            continue;
        };
        let events = rig.events();
        let ctx =
            || format!("case {case} (seed {seed}, egress {egress}, mutated {mutated}): {p:02x?}");
        let dir = if egress {
            direction::EGRESS
        } else {
            direction::INGRESS
        };
        let (want_reason, parsed) = match reference(&p, egress) {
            Expect::Skip => {
                assert_eq!((action, events.len()), (TC_ACT_OK, 0), "{}", ctx());
                *tally.entry("SKIP").or_default() += 1;
                continue;
            }
            Expect::Drop(code) => (Some((false, code, 0)), None),
            Expect::Parsed(r) => {
                let own = if r.family == 4 { ep.ipv4 } else { ep.ipv6 };
                let want = if egress && r.saddr != own {
                    Some((false, reason::SPOOFED_SOURCE, 0))
                } else if !egress && r.daddr != own {
                    // (the frames' destination MAC is unicast)
                    Some((false, reason::MISDIRECTED, 0))
                } else if r.later_fragment {
                    Some((false, reason::FRAGMENT_UNKNOWN, 0))
                } else if r.bad_quote {
                    Some((false, reason::MALFORMED, 0))
                } else {
                    None
                };
                (want, Some(r))
            }
        };
        assert_eq!(events.len(), 1, "one event per judged packet: {}", ctx());
        let ev = events[0];
        let (allowed, why, cookie) = match (want_reason, &parsed) {
            (Some(w), _) => w,
            (None, Some(r)) => {
                // What the kernel parsed is what the reference parsed...
                assert_eq!(
                    (
                        ev.family,
                        ev.protocol,
                        ev.saddr,
                        ev.daddr,
                        ev.sport,
                        ev.dport
                    ),
                    (r.family, r.protocol, r.saddr, r.daddr, r.sport, r.dport),
                    "{}",
                    ctx()
                );
                // ...and the verdict is the userspace lookup's for it.
                let peer = if egress { r.daddr } else { r.saddr };
                if !egress && peer == v4_mapped(HOST) {
                    (true, reason::HOST_TRAFFIC, 0)
                } else {
                    let dec = decide_at(&d, &ep, dir, &peer, r.protocol, r.dport);
                    (dec.allowed, dec.reason, dec.cookie)
                }
            }
            (None, None) => unreachable!(),
        };
        assert_eq!(
            (action, ev.verdict, ev.reason, ev.policy_cookie),
            (
                if allowed { TC_ACT_OK } else { TC_ACT_SHOT },
                if allowed {
                    verdict::ALLOWED
                } else {
                    verdict::DROPPED
                },
                why,
                cookie
            ),
            "{}",
            ctx()
        );
        assert_eq!(ev.direction, dir, "{}", ctx());
        *tally.entry(reason::name(why)).or_default() += 1;
    }
    eprintln!("{cases} cases, {refused} refused by BPF_PROG_TEST_RUN (too short): {tally:?}");
    // The generator must reach every branch it is meant to, or this test proves little.
    for r in [
        "POLICY_ALLOWED",
        "POLICY_DENIED",
        "MALFORMED",
        "SPOOFED_SOURCE",
        "MISDIRECTED",
        "UNKNOWN_L4",
        "FRAGMENT_UNKNOWN",
        "HOST_TRAFFIC",
        "SKIP",
    ] {
        assert!(
            tally.get(r).copied().unwrap_or(0) >= 5,
            "the generator reached {r} fewer than 5 times: {tally:?}"
        );
    }
}

//! The nftables sets on small clusters, the range arithmetic, and (root) a load of
//! overlapping rules into a throwaway network namespace.

use super::ranges::{disjoint, minus, union};
use super::*;
use netpol_engine::index::Index;
use proptest::prelude::*;

fn rules(yaml: &str, node: &str) -> Ruleset {
    let state = netpol_engine::objects::ClusterState::from_text(yaml).unwrap();
    let snap = Index::new().reset(&state);
    assert!(snap.invalid.is_empty(), "{:?}", snap.invalid);
    ruleset(&snap, node)
}

/// A server on node0 (dual-stack, a named port), a client on node1, a pod of the
/// server's namespace on node0 with its own egress policy.
const CLUSTER: &str = r#"
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
kind: Namespace
metadata: {name: y}
---
kind: Pod
metadata: {name: server, namespace: x, labels: {app: server}}
spec: {nodeName: node0, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.2, podIPs: [{ip: 10.244.0.2}, {ip: "fd00::af4:2"}]}
---
kind: Pod
metadata: {name: client, namespace: y, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c, ports: [{name: dns, containerPort: 53, protocol: UDP}]}]}
status: {podIP: 10.244.1.2, podIPs: [{ip: 10.244.1.2}]}
---
kind: Pod
metadata: {name: worker, namespace: x, labels: {app: worker}}
spec: {nodeName: node0, containers: [{name: c}]}
status: {podIP: 10.244.0.3, podIPs: [{ip: 10.244.0.3}]}
---
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}, {port: http}, {protocol: UDP, port: 5000, endPort: 5010}]
  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.244.0.0/16, 10.0.0.0/24]}}]
  - from: [{podSelector: {matchLabels: {app: nobody}}}]
---
kind: NetworkPolicy
metadata: {name: worker-out, namespace: x}
spec:
  podSelector: {matchLabels: {app: worker}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {}}]
    ports: [{protocol: UDP, port: dns}, {protocol: SCTP}]
"#;

const SCRIPT: &str = "\
table ip netpol {}
delete table ip netpol
table ip netpol {
\tset ingress_isolated {
\t\ttype ipv4_addr
\t\telements = {
\t\t\t10.244.0.2,
\t\t}
\t}
\tset ingress_allow {
\t\ttype ipv4_addr . ipv4_addr . inet_proto . inet_service
\t\tflags interval
\t\telements = {
\t\t\t10.244.0.2 . 10.244.1.2 . tcp . 80,
\t\t\t10.244.0.2 . 10.244.1.2 . tcp . 8080,
\t\t\t10.244.0.2 . 10.244.1.2 . udp . 5000-5010,
\t\t}
\t}
\tset ingress_allow_all {
\t\ttype ipv4_addr . ipv4_addr
\t\tflags interval
\t\telements = {
\t\t\t10.244.0.2 . 10.0.1.0-10.243.255.255,
\t\t\t10.244.0.2 . 10.245.0.0-10.255.255.255,
\t\t}
\t}
\tset egress_isolated {
\t\ttype ipv4_addr
\t\telements = {
\t\t\t10.244.0.3,
\t\t}
\t}
\tset egress_allow {
\t\ttype ipv4_addr . ipv4_addr . inet_proto . inet_service
\t\tflags interval
\t\telements = {
\t\t\t10.244.0.3 . 10.244.1.2 . udp . 53,
\t\t\t10.244.0.3 . 10.244.0.2 . sctp . 0-65535,
\t\t\t10.244.0.3 . 10.244.0.3 . sctp . 0-65535,
\t\t\t10.244.0.3 . 10.244.1.2 . sctp . 0-65535,
\t\t}
\t}
\tset egress_allow_all {
\t\ttype ipv4_addr . ipv4_addr
\t\tflags interval
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tct state established,related accept
\t\tct state invalid drop
\t\tip saddr @egress_isolated jump egress
\t\tip daddr @ingress_isolated jump ingress
\t}
\tchain ingress {
\t\tip daddr . ip saddr . meta l4proto . th dport @ingress_allow return
\t\tip daddr . ip saddr @ingress_allow_all return
\t\tdrop
\t}
\tchain egress {
\t\tip saddr . ip daddr . meta l4proto . th dport @egress_allow return
\t\tip saddr . ip daddr @egress_allow_all return
\t\tdrop
\t}
}
";

#[test]
fn a_policy_becomes_set_elements() {
    let rs = rules(CLUSTER, "node0");
    let script = rs.script();
    let v4 = &script[..script.find("table ip6").unwrap()];
    assert_eq!(v4, SCRIPT);
    // IPv6: the server is isolated, but no peer has an IPv6 address and the block is
    // IPv4, so nothing is allowed; neighbour discovery passes.
    assert_eq!(rs.v6.ingress.isolated, ["fd00::af4:2"]);
    assert!(rs.v6.ingress.allow.is_empty() && rs.v6.ingress.allow_all.is_empty());
    assert!(script.contains("icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept"));
    assert_eq!(rs.policy_rules, 3 + 2 + 4);
    assert_eq!(rs.pods, 2);
    // node1 has no isolated pod: empty sets, still a loadable table.
    let other = rules(CLUSTER, "node1");
    assert_eq!(other.pods, 0);
    assert_eq!(other.v4, Table::default());
    assert_eq!(rules(CLUSTER, "node0").script(), script, "byte-stable");
}

/// An egress named port through an IPv4 block: a dual-stack peer inside the block is a
/// receiver by its IPv4 address only.
const DUAL_STACK_NAMED: &str = r#"
kind: Namespace
metadata: {name: x}
---
kind: Pod
metadata: {name: client, namespace: x, labels: {app: client}}
spec: {nodeName: node0, containers: [{name: c}]}
status: {podIP: 10.244.0.2, podIPs: [{ip: 10.244.0.2}, {ip: "fd00::af4:2"}]}
---
kind: Pod
metadata: {name: server, namespace: x, labels: {app: server}}
spec: {nodeName: node1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.1.2, podIPs: [{ip: 10.244.1.2}, {ip: "fd00::af4:102"}]}
---
kind: NetworkPolicy
metadata: {name: out, namespace: x}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.244.1.0/24}}]
    ports: [{port: http}]
"#;

#[test]
fn an_egress_named_port_through_a_block_allows_only_the_addresses_it_covers() {
    let rs = rules(DUAL_STACK_NAMED, "node0");
    assert_eq!(
        rs.v4.egress.allow,
        ["10.244.0.2 . 10.244.1.2 . tcp . 8080"],
        "{rs:?}"
    );
    // The server's IPv6 address is in no block of the rule.
    assert!(rs.v6.egress.allow.is_empty(), "{:?}", rs.v6.egress.allow);
    assert_eq!(rs.v6.egress.isolated, ["fd00::af4:2"]);
}

/// Rules whose peers and ports overlap every way an interval set can refuse: ranges
/// inside ranges, a pod inside a block, the same start with other ends, every peer,
/// duplicates, an except covered again by another rule.
const OVERLAPS: &str = r#"
kind: Namespace
metadata: {name: x}
---
kind: Pod
metadata: {name: server, namespace: x, labels: {app: server}}
spec: {nodeName: node0, containers: [{name: c}]}
status: {podIP: 10.244.0.2, podIPs: [{ip: 10.244.0.2}, {ip: "fd00::af4:2"}]}
---
kind: Pod
metadata: {name: client, namespace: x, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c}]}
status: {podIP: 10.244.1.2, podIPs: [{ip: 10.244.1.2}]}
---
kind: NetworkPolicy
metadata: {name: overlaps, namespace: x}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{ipBlock: {cidr: 10.244.0.0/16}}]
    ports: [{port: 80}]
  - from: [{podSelector: {}}]
    ports: [{port: 80, endPort: 90}]
  - from: [{ipBlock: {cidr: 10.244.1.0/24, except: [10.244.1.2/32]}}]
    ports: [{protocol: TCP}]
  - ports: [{port: 85}]
  - ports: [{port: 85}]
  - from: [{ipBlock: {cidr: 10.0.0.0/8}}]
  - from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.1.0/24]}}, {podSelector: {}}]
  - from: [{ipBlock: {cidr: "fd00::/8", except: ["fd00::af4:0/120"]}}]
    ports: [{port: 80, endPort: 90}]
  - from: [{ipBlock: {cidr: "fd00::af4:0/112"}}]
    ports: [{port: 85}]
"#;

#[test]
fn overlapping_rules_become_disjoint_elements() {
    let rs = rules(OVERLAPS, "node0");
    // Cut where a rule's peers start or end; each piece has the union of the ports.
    assert_eq!(
        rs.v4.ingress.allow,
        [
            "10.244.0.2 . 0.0.0.0-10.243.255.255 . tcp . 85",
            "10.244.0.2 . 10.244.0.0-10.244.0.1 . tcp . 80",
            "10.244.0.2 . 10.244.0.0-10.244.0.1 . tcp . 85",
            "10.244.0.2 . 10.244.0.2 . tcp . 80-90",
            "10.244.0.2 . 10.244.0.3-10.244.0.255 . tcp . 80",
            "10.244.0.2 . 10.244.0.3-10.244.0.255 . tcp . 85",
            "10.244.0.2 . 10.244.1.0-10.244.1.1 . tcp . 0-65535",
            "10.244.0.2 . 10.244.1.2 . tcp . 80-90",
            "10.244.0.2 . 10.244.1.3-10.244.1.255 . tcp . 0-65535",
            "10.244.0.2 . 10.244.2.0-10.244.255.255 . tcp . 80",
            "10.244.0.2 . 10.244.2.0-10.244.255.255 . tcp . 85",
            "10.244.0.2 . 10.245.0.0-255.255.255.255 . tcp . 85",
        ]
    );
    // Rules without ports: one range holds the others.
    assert_eq!(
        rs.v4.ingress.allow_all,
        ["10.244.0.2 . 10.0.0.0-10.255.255.255"]
    );
    // IPv6: the except is covered again (port 85 only); pieces with the same ports
    // join up (fd00::af4:100 to the end of fd00::/8).
    assert_eq!(
        rs.v6.ingress.allow,
        [
            "fd00::af4:2 . ::-fcff:ffff:ffff:ffff:ffff:ffff:ffff:ffff . tcp . 85",
            "fd00::af4:2 . fd00::-fd00::af3:ffff . tcp . 80-90",
            "fd00::af4:2 . fd00::af4:0-fd00::af4:1 . tcp . 85",
            "fd00::af4:2 . fd00::af4:2 . tcp . 80-90",
            "fd00::af4:2 . fd00::af4:3-fd00::af4:ff . tcp . 85",
            "fd00::af4:2 . fd00::af4:100-fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff . tcp . 80-90",
            "fd00::af4:2 . fe00::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff . tcp . 85",
        ]
    );
    assert_eq!(rs.v6.ingress.allow_all, ["fd00::af4:2 . fd00::af4:2"]);
    assert_eq!(rs.policy_rules, 12 + 1 + 7 + 1);
}

/// Every (peer, port) of a small universe is in `rects` as often as it is in `out`
/// (once at most in `out`).
fn covered(rects: &[(Range, Range)], peer: u128, port: u128) -> usize {
    rects
        .iter()
        .filter(|((a, b), (c, d))| (*a..=*b).contains(&peer) && (*c..=*d).contains(&port))
        .count()
}

fn range(max: u128) -> impl Strategy<Value = Range> {
    (0..=max, 0..=max).prop_map(|(a, b)| (a.min(b), a.max(b)))
}

proptest! {
    #[test]
    fn disjoint_covers_the_same_points_once(
        rects in proptest::collection::vec((range(15), range(15)), 0..8)
    ) {
        let out = disjoint(rects.clone());
        for peer in 0..=16 {
            for port in 0..=16 {
                let want = covered(&rects, peer, port).min(1);
                prop_assert_eq!(covered(&out, peer, port), want, "({}, {}) in {:?}", peer, port, out);
            }
        }
    }

    #[test]
    fn rectangles_that_overlap_nothing_stay_as_they_are(
        rects in proptest::collection::vec((range(15), range(15)), 0..8)
    ) {
        let overlap = |(p, q): &(Range, Range), (r, s): &(Range, Range)| {
            p.0 <= r.1 && r.0 <= p.1 && q.0 <= s.1 && s.0 <= q.1
        };
        let apart = rects
            .iter()
            .enumerate()
            .all(|(i, a)| rects[i + 1..].iter().all(|b| !overlap(a, b)));
        prop_assume!(apart);
        let mut want = rects.clone();
        want.sort_unstable();
        prop_assert_eq!(disjoint(rects), want);
    }

    #[test]
    fn minus_removes_the_holes_only(
        whole in range(63),
        holes in proptest::collection::vec(range(63), 0..5)
    ) {
        let out = minus(whole, &holes);
        for a in 0..=64u128 {
            let want = (whole.0..=whole.1).contains(&a)
                && !holes.iter().any(|(s, e)| (*s..=*e).contains(&a));
            let got = out.iter().filter(|(s, e)| (*s..=*e).contains(&a)).count();
            prop_assert_eq!(got, usize::from(want), "{} in {:?}", a, out);
        }
        prop_assert_eq!(union(out.clone()), out.clone(), "sorted, no overlap: {:?}", out);
    }
}

#[test]
fn the_top_of_the_address_space_does_not_overflow() {
    let all = (0, u128::MAX);
    assert_eq!(minus(all, &[]), [all]);
    assert_eq!(minus(all, &[(u128::MAX, u128::MAX)]), [(0, u128::MAX - 1)]);
    assert_eq!(minus(all, &[(0, u128::MAX)]), []);
    assert_eq!(union(vec![all, (5, 6), all]), [all]);
    assert_eq!(
        disjoint(vec![(all, (80, 80)), ((u128::MAX, u128::MAX), (80, 81))]),
        [
            ((0, u128::MAX - 1), (80, 80)),
            ((u128::MAX, u128::MAX), (80, 81))
        ]
    );
    assert_eq!(
        disjoint(vec![(all, (80, 80)), ((u128::MAX, u128::MAX), (81, 81))]),
        [
            ((0, u128::MAX), (80, 80)),
            ((u128::MAX, u128::MAX), (81, 81))
        ]
    );
}

#[test]
#[ignore = "needs root: loads the tables into a throwaway network namespace"]
fn the_kernel_takes_overlapping_rules_and_empty_tables() {
    for (yaml, node) in [(OVERLAPS, "node0"), (CLUSTER, "node0"), (CLUSTER, "node1")] {
        let script = rules(yaml, node).script();
        // A fresh network namespace for nft alone: nothing to remove afterwards. Loaded
        // twice: the second load replaces the tables the first one made.
        let twice = format!("{script}{script}");
        crate::lab::fullsync::restore("unshare", &["--net", "nft", "-f", "-"], &twice)
            .unwrap_or_else(|e| panic!("{e:#}\n{script}"));
    }
}

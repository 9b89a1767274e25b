//! The kernel's verdict equals the userspace lookup: a policy set using every feature is
//! compiled, written into the classifier's maps, and crafted packets for every flow
//! (IPv4 and IPv6; TCP, UDP and SCTP, which this kernel has no sockets for) are run
//! through `BPF_PROG_TEST_RUN`. Return code, counter slot, and drop event (reason and
//! deciding rule) must match what `compile::lookup` says. Needs root.

mod support;

use std::collections::BTreeMap;
use std::net::IpAddr;

use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::Ebpf;
use netpol_agent::datapath::{load, maps, Capacities};
use netpol_common::{
    counter_index, direction, map, proto, verdict, EndpointEntry, Event, COUNTERS_LEN,
};
use netpol_engine::compile::lookup::Lookup;
use netpol_engine::index::net::addr_of;

use support::packet;
use support::rig::{LO, TC_ACT_OK, TC_ACT_SHOT};

const POLICIES: &str = r#"
kind: NetworkPolicy
metadata: {name: a-in-out, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: serve-80-tcp}]
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{protocol: SCTP, port: 80, endPort: 81}]
  egress:
  - to: [{ipBlock: {cidr: 10.0.2.0/24, except: [10.0.2.2/32]}}]
    ports: [{protocol: UDP}]
  - to: [{ipBlock: {cidr: "fd00::2:0/112"}}]
    ports: [{port: 81}]
  - to: [{namespaceSelector: {matchLabels: {ns: z}}, podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}}]
    ports: [{protocol: SCTP, port: serve-81-sctp}]
---
kind: NetworkPolicy
metadata: {name: from-cluster, namespace: y}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.3.0/24]}}, {ipBlock: {cidr: "fd00::/16"}}]
    ports: [{protocol: TCP, port: 80}, {protocol: UDP, port: 81}]
---
kind: NetworkPolicy
metadata: {name: quiet, namespace: z}
spec:
  podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [a]}]}
  policyTypes: [Ingress, Egress]
  ingress: [{}]
"#;

const EXTERNAL: [&str; 4] = ["10.0.3.99", "8.8.8.8", "fd00::3:99", "2001:db8::1"];

fn packet(src: IpAddr, dst: IpAddr, protocol: u8, sport: u16, dport: u16) -> Vec<u8> {
    let l4 = match protocol {
        proto::TCP => packet::tcp(sport, dport, packet::SYN),
        proto::UDP => packet::udp(sport, dport),
        proto::SCTP => packet::sctp_init(sport, dport),
        _ => unreachable!(),
    };
    packet::frame(src, dst, l4)
}

struct Kernel {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
    next_sport: u16,
}

impl Kernel {
    fn with(desired: &netpol_engine::compile::Desired) -> Kernel {
        support::need_root("loads the classifier");
        let mut ebpf = load(&Capacities::default()).expect("classifier loads");
        let events = RingBuf::try_from(ebpf.take_map(map::EVENTS).unwrap()).unwrap();
        let none = BTreeMap::new();
        maps::upsert_diff(
            &mut ebpf,
            map::IPCACHE,
            &none,
            &desired.ipcache,
            maps::cidr_key,
        )
        .unwrap();
        let none = BTreeMap::new();
        maps::upsert_diff(&mut ebpf, map::CIDRS, &none, &desired.cidrs, maps::cidr_key).unwrap();
        let none = BTreeMap::new();
        maps::upsert_diff(
            &mut ebpf,
            map::POLICY,
            &none,
            &desired.policy,
            maps::policy_key,
        )
        .unwrap();
        Kernel {
            ebpf,
            events,
            next_sport: 20000,
        }
    }

    fn counter(&self, slot: u32) -> u64 {
        assert!(slot < COUNTERS_LEN);
        let a: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(map::COUNTERS).unwrap()).unwrap();
        a.get(&slot, 0).unwrap().iter().sum()
    }

    /// Runs one packet at endpoint `ep` (on `lo`); a fresh source port each time, so
    /// no packet meets the conntrack state of an earlier one.
    fn judge(
        &mut self,
        ep: EndpointEntry,
        dir: u8,
        src: IpAddr,
        dst: IpAddr,
        protocol: u8,
        port: u16,
    ) -> (u32, Option<Event>, u16) {
        let mut eps: HashMap<_, u32, EndpointEntry> =
            HashMap::try_from(self.ebpf.map_mut(map::ENDPOINTS).unwrap()).unwrap();
        // The MAC is the agent's to fill in from discovery (the frames' source MAC).
        let ep = EndpointEntry {
            mac: support::rig::POD_MAC,
            ..ep
        };
        eps.insert(LO, ep, 0).unwrap();
        self.next_sport += 1;
        let pkt = packet(src, dst, protocol, self.next_sport, port);
        let program = if dir == direction::EGRESS {
            "from_pod"
        } else {
            "to_pod"
        };
        let prog: &SchedClassifier = self.ebpf.program(program).unwrap().try_into().unwrap();
        let mut out = vec![0u8; pkt.len() + 64];
        let rc = prog
            .test_run(TestRunOptions {
                data_in: Some(&pkt),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN")
            .return_value;
        let event = self.events.next().map(|item| {
            assert!(item.len() >= std::mem::size_of::<Event>());
            unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) }
        });
        (rc, event, self.next_sport)
    }
}

/// Every flow between the e2e cluster's pods and `EXTERNAL`, every protocol, ports
/// 80-82, each side at its own hook: the kernel must do what the lookup says. Returns
/// the (allowed, reason, protocol, IPv4) combinations seen.
fn kernel_agrees(policies: &str) -> std::collections::BTreeSet<(bool, u16, u8, bool)> {
    let c = support::model::compiled(&format!("{}{policies}", support::model::e2e_cluster()));
    assert!(c.snap.invalid.is_empty(), "{:?}", c.snap.invalid);
    let lookup = Lookup::new(&c.desired);
    let mut kernel = Kernel::with(&c.desired);

    let mut addrs: Vec<IpAddr> = EXTERNAL.iter().map(|a| a.parse().unwrap()).collect();
    for p in c.snap.pods.values() {
        addrs.extend(&p.ips);
    }
    let (mut runs, mut drops, mut kinds) = (0, 0, std::collections::BTreeSet::new());
    for from in &addrs {
        for to in &addrs {
            if from == to || from.is_ipv4() != to.is_ipv4() {
                continue;
            }
            for protocol in [proto::TCP, proto::UDP, proto::SCTP] {
                for port in [80, 81, 82] {
                    // Egress at the sender, ingress at the receiver: each is one hook.
                    for (dir, judged, peer) in [
                        (direction::EGRESS, from, to),
                        (direction::INGRESS, to, from),
                    ] {
                        let Some(pod) = c.snap.pod_by_ip(*judged) else {
                            continue;
                        };
                        let ep = c.desired.endpoints[&pod.key()];
                        let want = lookup.decide_at(&ep, dir, &addr_of(*peer), protocol, port);
                        let want_verdict = if want.allowed {
                            verdict::ALLOWED
                        } else {
                            verdict::DROPPED
                        };
                        let slot = counter_index(want_verdict, want.reason, dir);
                        let before = kernel.counter(slot);
                        let (rc, event, sport) = kernel.judge(ep, dir, *from, *to, protocol, port);
                        let flow = format!(
                            "{from}:{sport} -> {to}:{port} proto {protocol} at {} ({})",
                            pod.key(),
                            if dir == direction::EGRESS {
                                "egress"
                            } else {
                                "ingress"
                            }
                        );
                        assert_eq!(
                            rc,
                            if want.allowed { TC_ACT_OK } else { TC_ACT_SHOT },
                            "{flow}: {want:?}"
                        );
                        assert_eq!(
                            kernel.counter(slot),
                            before + 1,
                            "{flow}: counted under {want:?}"
                        );
                        if want.allowed {
                            assert!(event.is_none(), "{flow}: allows are not reported");
                        } else {
                            let ev = event.unwrap_or_else(|| panic!("{flow}: a drop event"));
                            assert_eq!(
                                (ev.reason, ev.policy_cookie, ev.dport, ev.protocol),
                                (want.reason, want.cookie, port, protocol),
                                "{flow}"
                            );
                            drops += 1;
                        }
                        kinds.insert((want.allowed, want.reason, protocol, from.is_ipv4()));
                        runs += 1;
                    }
                }
            }
        }
    }
    eprintln!("{runs} packets through the kernel, {drops} dropped, all as the lookup said");
    kinds
}

#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn the_kernel_verdict_equals_the_userspace_lookup_for_every_feature() {
    let kinds = kernel_agrees(POLICIES);
    // The table must exercise both outcomes for every protocol and family.
    for protocol in [proto::TCP, proto::UDP, proto::SCTP] {
        for v4 in [true, false] {
            assert!(kinds.iter().any(|k| k.0
                && k.2 == protocol
                && k.3 == v4
                && k.1 == netpol_common::reason::POLICY_ALLOWED));
            assert!(kinds.iter().any(|k| !k.0 && k.2 == protocol && k.3 == v4));
        }
    }
}

/// Admin (Accept, Deny, Pass) and Baseline (Allow, Deny) tiers over NetworkPolicy,
/// both API generations, ports of all three protocols.
const TIERS: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: guard-y}
spec:
  priority: 10
  subject: {namespaces: {matchLabels: {ns: y}}}
  ingress:
  - {action: Pass, from: [{namespaces: {matchLabels: {ns: x}}}], ports: [{portNumber: {protocol: TCP, port: 80}}]}
  - {action: Allow, from: [{pods: {namespaceSelector: {matchLabels: {ns: z}}, podSelector: {matchLabels: {pod: a}}}}]}
  - {action: Deny, from: [{namespaces: {}}], ports: [{portRange: {protocol: SCTP, start: 80, end: 81}}]}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: egress-guard}
spec:
  tier: Admin
  priority: 20
  subject: {pods: {namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: b}}}}
  egress:
  - {action: Deny, to: [{networks: ["10.0.3.0/24", "fd00::3:0/112"]}], protocols: [{udp: {}}]}
  - {action: Accept, to: [{namespaces: {}}], protocols: [{destinationNamedPort: serve-81-sctp}]}
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {}}
  ingress:
  - {action: Allow, from: [{namespaces: {matchLabels: {ns: z}}}], ports: [{portNumber: {protocol: UDP, port: 81}}]}
  - {action: Deny, from: [{namespaces: {}}]}
---
kind: NetworkPolicy
metadata: {name: y-allows-x, namespace: y}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: x}}}], ports: [{port: 80}]}]
"#;

#[test]
#[ignore = "needs root: loads the classifier (BPF_PROG_TEST_RUN)"]
fn the_kernel_resolves_every_tier_and_action_as_the_lookup_does() {
    let kinds = kernel_agrees(TIERS);
    use netpol_common::reason::*;
    for reason in [
        ADMIN_ALLOWED,
        ADMIN_DENIED,
        BASELINE_ALLOWED,
        BASELINE_DENIED,
        POLICY_ALLOWED,
        POLICY_DENIED,
        NOT_ISOLATED,
    ] {
        assert!(
            kinds.iter().any(|k| k.1 == reason),
            "no flow ended in {}",
            netpol_common::reason::name(reason)
        );
    }
}

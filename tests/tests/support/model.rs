//! The differential check shared by the semantics tests and the property test: every
//! flow is judged by the reference evaluator (the API documentation, executed) and by
//! a lookup in the compiled maps with the kernel's precedence; they must agree.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use netpol_common::{direction, reason};
use netpol_engine::compile::lookup::Lookup;
use netpol_engine::compile::{compile, Desired, NodeView};
use netpol_engine::index::net::addr_of;
use netpol_engine::index::{Index, Snapshot};
use netpol_engine::objects::{parse_manifests, ClusterState, Object};
use netpol_tests::reference::{self, Side};

pub const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];

pub fn protocol_number(p: &str) -> u8 {
    netpol_engine::index::policy::parse_protocol(p).expect("TCP, UDP or SCTP")
}

pub struct Compiled {
    pub state: ClusterState,
    pub snap: Snapshot,
    pub desired: Desired,
}

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];

/// The upstream e2e cluster: namespaces x, y, z (label `ns`), each with pods a, b, c
/// (label `pod`) serving 80 and 81 on TCP, UDP and SCTP under named ports
/// `serve-<port>-<tcp|udp|sctp>`; pod j of namespace i has 10.0.i.j and fd00::i:j.
pub fn e2e_cluster() -> String {
    let mut out = String::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        out.push_str(&format!(
            "kind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n---\n"
        ));
        for (j, pod) in PODS.iter().enumerate() {
            let ports: Vec<String> = [("TCP", "tcp"), ("UDP", "udp"), ("SCTP", "sctp")]
                .iter()
                .flat_map(|(p, n)| {
                    [80, 81].map(|port| {
                        format!("{{name: serve-{port}-{n}, protocol: {p}, containerPort: {port}}}")
                    })
                })
                .collect();
            out.push_str(&format!(
                "kind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\n\
                 spec: {{containers: [{{name: c, image: agnhost, ports: [{}]}}]}}\n\
                 status: {{podIP: 10.0.{i}.{j}, podIPs: [{{ip: 10.0.{i}.{j}}}, {{ip: \"fd00::{i}:{j}\"}}]}}\n---\n",
                ports.join(", "),
                i = i + 1,
                j = j + 1
            ));
        }
    }
    out
}

pub fn compiled(yaml: &str) -> Compiled {
    let (objects, errors) = parse_manifests(Path::new("case.yaml"), yaml);
    assert!(errors.is_empty(), "{errors:?}");
    let state = ClusterState {
        objects,
        errors: vec![],
        digest: "case".into(),
    };
    let snap = Index::new().reset(&state);
    let desired = compile(&snap, &NodeView::default());
    Compiled {
        state,
        snap,
        desired,
    }
}

impl Compiled {
    /// The compiled maps' verdict, one side at a time, as the kernel would reach it.
    pub fn lookup(
        &self,
        from: IpAddr,
        to: IpAddr,
        protocol: &str,
        port: u16,
    ) -> reference::Verdict {
        self.lookup_with(&Lookup::new(&self.desired), from, to, protocol, port)
    }

    fn lookup_with(
        &self,
        lookup: &Lookup,
        from: IpAddr,
        to: IpAddr,
        protocol: &str,
        port: u16,
    ) -> reference::Verdict {
        let proto = protocol_number(protocol);
        let side = |pod: Option<&netpol_engine::index::PodInfo>, dir: u8, peer: IpAddr| {
            let Some(ep) = pod.and_then(|p| self.desired.endpoints.get(&p.key())) else {
                return Side::NotIsolated;
            };
            let d = lookup.decide_at(ep, dir, &addr_of(peer), proto, port);
            match (d.allowed, d.reason) {
                (true, reason::NOT_ISOLATED) => Side::NotIsolated,
                (true, _) => Side::Allowed,
                (false, _) => Side::Denied,
            }
        };
        reference::Verdict {
            egress: side(self.snap.pod_by_ip(from), direction::EGRESS, to),
            ingress: side(self.snap.pod_by_ip(to), direction::INGRESS, from),
        }
    }

    pub fn reference(
        &self,
        from: IpAddr,
        to: IpAddr,
        protocol: &str,
        port: u16,
    ) -> reference::Verdict {
        reference::allowed(&self.state, from, to, protocol, port)
    }

    pub fn pod_ip(&self, pod: &str) -> IpAddr {
        self.snap.pods[pod].ips[0]
    }

    /// Both evaluators on one pod-to-pod flow; panics when they disagree.
    pub fn allowed(&self, from: &str, to: &str, protocol: &str, port: u16) -> bool {
        self.allowed_ip(self.pod_ip(from), self.pod_ip(to), protocol, port)
    }

    pub fn allowed_ip(&self, from: IpAddr, to: IpAddr, protocol: &str, port: u16) -> bool {
        let (r, c) = (
            self.reference(from, to, protocol, port),
            self.lookup(from, to, protocol, port),
        );
        assert_eq!(
            r, c,
            "{from} -> {to} {protocol}/{port}: reference vs compiled"
        );
        r.allowed()
    }

    /// The names of the NetworkPolicies the reference finds invalid, and of those the
    /// index rejected.
    pub fn rejected_policies(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let by_reference = self
            .state
            .objects
            .iter()
            .filter_map(|o| match o {
                Object::NetworkPolicy(np) if !reference::valid(np) => np.metadata.name.clone(),
                _ => None,
            })
            .collect();
        let by_index = self
            .snap
            .invalid
            .iter()
            .filter(|i| i.kind == "NetworkPolicy")
            .map(|i| i.name.clone())
            .collect();
        (by_reference, by_index)
    }

    /// Every address in the cluster plus `extra`, every ordered same-family pair, every
    /// protocol and each of `ports`: the first disagreement, if any.
    pub fn disagreement(&self, extra: &[IpAddr], ports: &[u16]) -> Option<String> {
        // The policies the API server would reject are the ones the index rejects.
        let (by_reference, by_index) = self.rejected_policies();
        if by_reference != by_index {
            return Some(format!(
                "rejected NetworkPolicies: reference {by_reference:?}, index {by_index:?} ({:?})",
                self.snap.invalid
            ));
        }
        for o in &self.state.objects {
            if let Object::ClusterPolicy(c) = o {
                let name = c.metadata.name.clone().unwrap_or_default();
                let rejected = self
                    .snap
                    .invalid
                    .iter()
                    .any(|i| i.kind == c.kind && i.name == name);
                if rejected == reference::cluster_valid(c) {
                    return Some(format!(
                        "{} {name}: reference valid={}, index rejected={rejected} ({:?})",
                        c.kind,
                        reference::cluster_valid(c),
                        self.snap.invalid
                    ));
                }
            }
        }
        let mut addrs: Vec<IpAddr> = extra.to_vec();
        for o in &self.state.objects {
            if let Object::Pod(p) = o {
                let status = p.status.iter();
                addrs.extend(
                    status
                        .clone()
                        .filter_map(|s| s.pod_ip.as_deref())
                        .chain(
                            status.flat_map(|s| s.pod_ips.iter().flatten().map(|i| i.ip.as_str())),
                        )
                        .filter_map(|s| s.parse::<IpAddr>().ok()),
                );
            }
        }
        addrs.sort();
        addrs.dedup();
        let lookup = Lookup::new(&self.desired);
        for from in &addrs {
            for to in &addrs {
                let no_pod =
                    self.snap.pod_by_ip(*from).is_none() && self.snap.pod_by_ip(*to).is_none();
                if from == to || from.is_ipv4() != to.is_ipv4() || no_pod {
                    continue;
                }
                for protocol in PROTOCOLS {
                    for port in ports {
                        let r = self.reference(*from, *to, protocol, *port);
                        let c = self.lookup_with(&lookup, *from, *to, protocol, *port);
                        if r != c {
                            return Some(format!(
                                "{from} -> {to} {protocol}/{port}: reference {r:?}, compiled {c:?}"
                            ));
                        }
                    }
                }
            }
        }
        None
    }
}

// ---- truth tables over the e2e cluster ---------------------------------------------

/// The e2e cluster with `policies`, compiled.
pub fn cluster(policies: &str) -> Compiled {
    compiled(&format!("{}{policies}", e2e_cluster()))
}

pub fn all_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

/// Checks every ordered pair of pods against `expect(from, to)`, like the upstream
/// truth tables, on IPv4 and on IPv6.
#[track_caller]
pub fn expect(c: &Compiled, protocol: &str, port: u16, expect: impl Fn(&str, &str) -> bool) {
    let mut wrong = vec![];
    for from in all_pods() {
        for to in all_pods() {
            if from == to {
                continue;
            }
            let (f, t) = (&c.snap.pods[&from], &c.snap.pods[&to]);
            for (fi, ti) in f.ips.iter().zip(&t.ips) {
                let got = c.allowed_ip(*fi, *ti, protocol, port);
                if got != expect(&from, &to) {
                    wrong.push(format!("{from} -> {to} ({fi}): got {got}"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{protocol}/{port}:\n{}", wrong.join("\n"));
}

pub fn ns(pod: &str) -> &str {
    pod.split('/').next().unwrap()
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

//! What a run measures and how long each measurement lasts: the scenario definitions
//! every testbed (the lab here, a kind cluster with `cargo xtask kind --bench`) shares,
//! including the policy sets, so both measure the same thing.

use std::fmt::Write as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Datapath,
    Update,
    Control,
    Events,
    Packet,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::Packet,
        Scenario::Control,
        Scenario::Events,
        Scenario::Update,
        Scenario::Datapath,
    ];

    pub fn parse(s: &str) -> Option<Scenario> {
        Some(match s {
            "datapath" => Scenario::Datapath,
            "update" => Scenario::Update,
            "control" => Scenario::Control,
            "events" => Scenario::Events,
            "packet" => Scenario::Packet,
            _ => return None,
        })
    }
}

/// Node pairs of the datapath scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Pair {
    #[serde(rename = "same-node")]
    SameNode,
    #[serde(rename = "cross-node")]
    CrossNode,
}

impl Pair {
    pub fn name(self) -> &'static str {
        match self {
            Pair::SameNode => "same-node",
            Pair::CrossNode => "cross-node",
        }
    }

    /// The server pod of the pair (the client is `x/client` on node0).
    pub fn server(self) -> &'static str {
        match self {
            Pair::SameNode => "x/server",
            Pair::CrossNode => "x/remote",
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    pub quick: bool,
    /// N: rules before (and including) the one that allows the measured flow.
    pub rules: Vec<usize>,
    pub pairs: Vec<Pair>,
    /// Seconds of each load measurement (iperf3 counts whole seconds).
    pub seconds: f64,
    /// Rounds at each N: in each, the baseline and every enforcer measure every metric
    /// once, side by side (ABAB…); a ratio's interval is a bootstrap over the rounds.
    pub rounds: usize,
    /// N at which a denied flood runs beside the measured flow (None: no flood variant).
    pub flood_rules: Option<usize>,
    /// Cluster sizes (pods in the index) of the update scenario, and its repetitions.
    pub update_pods: Vec<usize>,
    pub update_repeats: usize,
    /// Synthetic cluster sizes a real agent is started on (RSS).
    pub agent_pods: Vec<usize>,
    /// Cluster sizes an agent on the kube source (the mocked API server) lists.
    pub kube_pods: Vec<usize>,
    /// Policy entries and BPF_PROG_TEST_RUN repeats of the packet scenario.
    pub packet_rules: Vec<usize>,
    pub packet_repeat: u32,
    pub packet_runs: usize,
    /// Flood length (seconds) and runs of the events scenario.
    pub events_seconds: f64,
    pub events_runs: usize,
}

impl Plan {
    /// About 30 minutes on a 2-core machine.
    pub fn full() -> Plan {
        Plan {
            quick: false,
            // Three N, so that 5 alternating rounds of four labs fit in the half hour.
            rules: vec![10, 1_000, 10_000],
            pairs: vec![Pair::SameNode, Pair::CrossNode],
            seconds: 1.0,
            rounds: 5,
            flood_rules: Some(1_000),
            update_pods: vec![100, 1_000],
            update_repeats: 40,
            agent_pods: vec![1_000, 10_000, 50_000],
            kube_pods: vec![10_000],
            packet_rules: vec![10, 100, 1_000, 10_000],
            packet_repeat: 20_000,
            packet_runs: 3,
            events_seconds: 1.0,
            events_runs: 3,
        }
    }

    /// About 3 minutes, for development.
    pub fn quick() -> Plan {
        Plan {
            quick: true,
            rules: vec![10, 1_000],
            pairs: vec![Pair::SameNode],
            seconds: 1.0,
            rounds: 2,
            flood_rules: None,
            update_pods: vec![100],
            update_repeats: 8,
            agent_pods: vec![1_000],
            kube_pods: vec![1_000],
            packet_rules: vec![10, 10_000],
            packet_repeat: 5_000,
            packet_runs: 1,
            events_seconds: 1.0,
            events_runs: 1,
        }
    }

    /// Steps of the datapath scenario: (N, flood), every N once, then the flood's.
    pub fn steps(&self) -> Vec<(usize, bool)> {
        let mut v: Vec<(usize, bool)> = self.rules.iter().map(|n| (*n, false)).collect();
        v.extend(self.flood_rules.map(|n| (n, true)));
        v
    }

    /// Seconds one measurement block (every metric, every pair, one lab) takes, roughly.
    pub fn block_seconds(&self, repeats: usize) -> f64 {
        // five loads, each its length plus iperf3's start and a lab round trip
        self.pairs.len() as f64 * repeats as f64 * 5.0 * (self.seconds + 0.4)
    }

    /// Planned seconds of a scenario, for the progress line's estimate.
    pub fn weight(&self, s: Scenario) -> f64 {
        match s {
            Scenario::Datapath => {
                // a round: the baseline and three enforcers; netpol's statistics run; the
                // labs; each enforcer applying each step's N
                let steps = self.steps().len() as f64;
                steps * self.rounds as f64 * 4.0 * self.block_seconds(1)
                    + steps * self.block_seconds(1)
                    + 24.0
                    + steps * 3.0 * 4.0
            }
            Scenario::Update => {
                self.update_pods.len() as f64 * 2.0 * (5.0 + self.update_repeats as f64 * 0.5)
            }
            Scenario::Control => {
                self.agent_pods
                    .iter()
                    .map(|p| 3.0 + *p as f64 / 5_000.0)
                    .sum::<f64>()
                    + self
                        .kube_pods
                        .iter()
                        .map(|p| 5.0 + *p as f64 / 2_000.0)
                        .sum::<f64>()
            }
            Scenario::Events => 5.0 + self.events_runs as f64 * (self.events_seconds + 2.0),
            Scenario::Packet => 3.0 + self.packet_rules.len() as f64 * self.packet_runs as f64,
        }
    }
}

/// The datapath targets: netpol's ratio to `none` at the plan's largest N, on every
/// pair (metric, lowest ratio that meets it).
pub const RATIO_TARGETS: [(&str, f64); 2] = [("crr_per_sec", 0.95), ("rr_per_sec", 0.97)];

/// The ratio targets a variant's intervals leave open: (pair, metric).
pub fn undecided(v: &crate::report::Variant) -> Vec<(Pair, &'static str)> {
    let mut out = Vec::new();
    for (pair, metrics) in &v.pairs {
        for (key, goal) in RATIO_TARGETS {
            if metrics
                .get(key)
                .is_none_or(|c| netpol_tests::stats::judge(c.ratio_ci, goal).is_none())
            {
                out.push((*pair, key));
            }
        }
    }
    out
}

/// Peers of the datapath scenario's non-matching rules: virtual pods (no namespace, on
/// no lab node) with a label each, so every rule resolves to a real peer.
pub const PEERS: usize = 100;

/// The datapath scenario's cluster: pods `x/client`, `x/server`, `x/flood` on node0,
/// `x/remote` on node1, `PEERS` virtual pods, and (for `rules` > 0) one policy on the
/// servers whose ingress rules are `rules - 1` non-matching ones (peer `i % PEERS` on
/// port `10000 + i / PEERS`) and, last, the one allowing the client on the measured
/// ports (80 for rr/crr, 5201 TCP and UDP for iperf3).
pub fn datapath_pods() -> String {
    let mut out = String::from(
        "kind: Namespace\nmetadata: {name: x}\n---\nkind: Namespace\nmetadata: {name: virt}\n---\n",
    );
    for (name, node, app) in [
        ("client", 0, "client"),
        ("server", 0, "server"),
        ("flood", 0, "flood"),
        ("remote", 1, "server"),
    ] {
        let _ = write!(
            out,
            "kind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: {app}}}}}\n\
             spec: {{nodeName: node{node}, containers: [{{name: c, ports: [{{containerPort: 80}}]}}]}}\n---\n"
        );
    }
    for i in 0..PEERS {
        let _ = write!(
            out,
            "kind: Pod\nmetadata: {{name: peer-{i}, namespace: virt, labels: {{peer: p{i}}}, \
             annotations: {{netpol.io/lab-virtual: \"true\"}}}}\n\
             spec: {{nodeName: virtual, containers: [{{name: c}}]}}\n\
             status: {{phase: Running, podIP: 10.250.{}.{}}}\n---\n",
            i / 250,
            1 + i % 250
        );
    }
    out
}

pub fn rules_policy(rules: usize) -> String {
    let mut out = String::from(
        "kind: NetworkPolicy\nmetadata: {name: bench-rules, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress:\n",
    );
    for i in 0..rules.saturating_sub(1) {
        let _ = writeln!(
            out,
            "  - from: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{peer: p{}}}}}}}]\n    ports: [{{port: {}}}]",
            i % PEERS,
            10_000 + i / PEERS
        );
    }
    out.push_str(
        "  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 80}, {port: 5201}, {protocol: UDP, port: 5201}]\n",
    );
    out
}

/// The update scenario's cluster: `x/client` and `x/server` (isolated by a default
/// deny) on node0, and virtual pods up to `pods` (synthetic namespaces, apps and
/// policies as the compile benchmark makes them), half of them labelled `role: client`.
pub fn update_cluster(pods: usize) -> anyhow::Result<String> {
    use netpol_engine::objects::Object;
    use netpol_tests::synthetic::{self, Shape};
    let mut out = String::from(
        "kind: Namespace\nmetadata: {name: x}\n---\n\
         kind: Pod\nmetadata: {name: client, namespace: x, labels: {app: client, role: client}}\n\
         spec: {nodeName: node0, containers: [{name: c}]}\n---\n\
         kind: Pod\nmetadata: {name: server, namespace: x, labels: {app: server}}\n\
         spec: {nodeName: node0, containers: [{name: c, ports: [{containerPort: 80}]}]}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n---\n",
    );
    let virtual_pods = pods.saturating_sub(2);
    if virtual_pods == 0 {
        return Ok(out);
    }
    for (k, object) in synthetic::cluster(&Shape::pods(virtual_pods))
        .into_iter()
        .enumerate()
    {
        let text = match object {
            Object::Namespace(ns) => serde_yaml::to_string(&ns)?,
            Object::NetworkPolicy(np) => serde_yaml::to_string(&np)?,
            Object::Pod(mut pod) => {
                let pod = std::sync::Arc::make_mut(&mut pod);
                pod.metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert("netpol.io/lab-virtual".into(), "true".into());
                if k % 2 == 0 {
                    pod.metadata
                        .labels
                        .get_or_insert_with(Default::default)
                        .insert("role".into(), "client".into());
                }
                serde_yaml::to_string(pod)?
            }
            _ => continue,
        };
        out.push_str(&text);
        out.push_str("---\n");
    }
    Ok(out)
}

/// The policy the update scenario applies and deletes: the server admits every pod
/// labelled `role: client`, in any namespace, on port 80.
pub const UPDATE_ALLOW: &str = "kind: NetworkPolicy\nmetadata: {name: bench-allow, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress:\n  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: client}}}]\n    ports: [{port: 80}]\n";

/// The events scenario's cluster: `x/server` isolated by a default deny, `x/flood`.
pub const EVENTS_CLUSTER: &str = "kind: Namespace\nmetadata: {name: x}\n---\n\
kind: Pod\nmetadata: {name: server, namespace: x, labels: {app: server}}\n\
spec: {nodeName: node0, containers: [{name: c, ports: [{containerPort: 80}]}]}\n---\n\
kind: Pod\nmetadata: {name: flood, namespace: x, labels: {app: flood}}\n\
spec: {nodeName: node0, containers: [{name: c}]}\n---\n\
kind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {matchLabels: {app: server}}}\n";

/// The port floods are sent to: no rule allows it.
pub const FLOOD_PORT: u16 = 9;

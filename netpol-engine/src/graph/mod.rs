//! `netpol graph`: the allowed-flow graph between workloads, judged with the same
//! lookups in the compiled maps as `simulate`, drawn as Graphviz DOT or as a standalone
//! SVG laid out here (no external tools).
//!
//! ```text
//! objects ──► simulate::Model ──► workloads (pods grouped by label) ──► every pod pair on
//!             the receiver's ports, judged (Judge::flow) ──► edges ──► dot | svg | json
//! ```
//!
//! A workload is the pods of a namespace that share the first of the labels
//! [`WORKLOAD_LABELS`] they carry (a Deployment's replicas), or one pod when it carries
//! none. An edge A → B lists the ports on which some pod of A may open a connection to
//! some pod of B; it is *partial* when not every pod pair may. Pairs are judged on each
//! receiving pod's declared container ports (or on `--port`s); a pod that declares none
//! is judged on the ports its ingress rules name, else on "every TCP port" (`TCP/*`).
//! Flows that no policy judges on either side (neither end isolated) are left out
//! unless asked for: they are everything a cluster without policy allows.

mod svg;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use netpol_common::{endpoint_flags, proto};
use serde::Serialize;

use crate::index::policy::protocol_name;
use crate::index::{PodInfo, PortRef};
use crate::objects::Object;
use crate::simulate::Model;

/// The labels that name a pod's workload, most specific first.
pub const WORKLOAD_LABELS: [&str; 3] = ["app.kubernetes.io/name", "app", "k8s-app"];

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Judge every pair on these (protocol, port)s instead of the receivers' ports.
    pub ports: Vec<(u8, u16)>,
    /// Draw flows that no policy judges too.
    pub open_flows: bool,
}

#[derive(Debug, Serialize)]
pub struct Graph {
    pub namespaces: Vec<NamespaceGroup>,
    pub workloads: Vec<Workload>,
    pub edges: Vec<Edge>,
    /// Flows no policy judges were left out (see [`Options::open_flows`]).
    pub open_flows_hidden: bool,
}

#[derive(Debug, Serialize)]
pub struct NamespaceGroup {
    pub name: String,
    /// Workload keys, in name order.
    pub workloads: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Workload {
    /// `namespace/name`.
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub pods: Vec<String>,
    /// A NetworkPolicy selects some of its pods for ingress / egress (default deny).
    pub isolated_ingress: bool,
    pub isolated_egress: bool,
}

#[derive(Debug, Serialize)]
pub struct Edge {
    pub from: String,
    pub to: String,
    /// `8080/TCP`, or `TCP/*` for every port of a protocol.
    pub ports: Vec<String>,
    /// Some pod pairs of the two workloads may not connect on some of these ports.
    pub partial: bool,
}

/// The workload name of a pod.
pub fn workload_of(pod: &PodInfo) -> String {
    WORKLOAD_LABELS
        .iter()
        .find_map(|l| pod.labels.get(*l))
        .cloned()
        .unwrap_or_else(|| pod.name.clone())
}

/// Per (protocol, port): (pod pairs shown, pod pairs judged).
type PortCounts = BTreeMap<(u8, u16), (usize, usize)>;

fn port_label(protocol: u8, port: u16) -> String {
    if port == 0 {
        format!("{}/*", protocol_name(protocol))
    } else {
        format!("{port}/{}", protocol_name(protocol))
    }
}

pub fn graph(objects: Vec<Object>, options: &Options) -> Graph {
    let model = Model::new(objects);
    let snap = &model.snap;
    let judge = model.judge();
    // Pods that can be judged: they have an address and are not the node.
    let pods: Vec<&PodInfo> = snap
        .pods
        .values()
        .map(|p| p.as_ref())
        .filter(|p| !p.host_network && !p.ips.is_empty())
        .collect();
    let key_of = |p: &PodInfo| format!("{}/{}", p.namespace, workload_of(p));

    let mut workloads: BTreeMap<String, Workload> = BTreeMap::new();
    for p in &pods {
        let flags = model.desired.endpoints.get(&p.key()).map_or(0, |e| e.flags);
        let w = workloads.entry(key_of(p)).or_insert_with(|| Workload {
            key: key_of(p),
            namespace: p.namespace.clone(),
            name: workload_of(p),
            pods: vec![],
            isolated_ingress: false,
            isolated_egress: false,
        });
        w.pods.push(p.key());
        w.isolated_ingress |= flags & endpoint_flags::ISOLATED_INGRESS != 0;
        w.isolated_egress |= flags & endpoint_flags::ISOLATED_EGRESS != 0;
    }

    // The ports each receiving pod is judged on.
    let ports_of = |t: &PodInfo| -> Vec<(u8, u16)> {
        if !options.ports.is_empty() {
            return options.ports.clone();
        }
        let mut ports: BTreeSet<(u8, u16)> = t.ports.iter().copied().collect();
        if ports.is_empty() {
            for (_, p) in crate::compile::selecting(snap, &snap.identities[&t.identity]) {
                for spec in p.ingress.iter().flat_map(|r| r.ports.iter().flatten()) {
                    if let Some(PortRef::Number(n)) = spec.port {
                        ports.insert((spec.protocol, n));
                    }
                }
            }
        }
        if ports.is_empty() {
            ports.insert((proto::TCP, 0));
        }
        ports.into_iter().collect()
    };

    // Pods of one workload, identity, address class (what policy knows of an address)
    // and ports are judged alike, both ways: judge one of each group, count for all.
    let mut groups: BTreeMap<_, (&PodInfo, usize)> = BTreeMap::new();
    for p in &pods {
        let key = (
            key_of(p),
            p.identity,
            judge.class_of(p),
            ports_of(p),
            p.ips[0].is_ipv4(),
        );
        groups.entry(key).or_insert((*p, 0)).1 += 1;
    }
    // (from workload, to workload) → port → (pairs shown, pairs judged)
    let mut flows: BTreeMap<(String, String), PortCounts> = BTreeMap::new();
    for (gt, (t, nt)) in &groups {
        for (gf, (f, nf)) in &groups {
            // Ordered pairs of distinct pods, of one address family.
            let pairs = if gf == gt { nf * (nf - 1) } else { nf * nt };
            if pairs == 0 || gf.4 != gt.4 {
                continue;
            }
            let per_port = flows.entry((gf.0.clone(), gt.0.clone())).or_default();
            for (protocol, port) in &gt.3 {
                let pair = judge.flow(f, t, *protocol, *port);
                let open = pair.egress == "not-isolated" && pair.ingress == "not-isolated";
                let shown = pair.allowed && (options.open_flows || !open);
                let counts = per_port.entry((*protocol, *port)).or_default();
                counts.0 += if shown { pairs } else { 0 };
                counts.1 += pairs;
            }
        }
    }
    let edges = flows
        .into_iter()
        .filter_map(|((from, to), per_port)| {
            let shown: Vec<_> = per_port.iter().filter(|(_, (n, _))| *n > 0).collect();
            if shown.is_empty() {
                return None;
            }
            Some(Edge {
                from,
                to,
                partial: shown.iter().any(|(_, (n, all))| n < all),
                ports: shown
                    .iter()
                    .map(|((pr, p), _)| port_label(*pr, *p))
                    .collect(),
            })
        })
        .collect();

    let mut namespaces: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for w in workloads.values() {
        namespaces
            .entry(w.namespace.clone())
            .or_default()
            .push(w.key.clone());
    }
    Graph {
        namespaces: namespaces
            .into_iter()
            .map(|(name, workloads)| NamespaceGroup { name, workloads })
            .collect(),
        workloads: workloads.into_values().collect(),
        edges,
        open_flows_hidden: !options.open_flows,
    }
}

// ---- Graphviz ----

fn dot_string(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

/// What a workload's isolation looks like: (fill, stroke, words).
fn style(w: &Workload) -> (&'static str, &'static str, &'static str) {
    match (w.isolated_ingress, w.isolated_egress) {
        (false, false) => ("#f8fafc", "#64748b", "not isolated"),
        (true, false) => ("#fef3c7", "#d97706", "isolated: ingress"),
        (false, true) => ("#e0e7ff", "#4f46e5", "isolated: egress"),
        (true, true) => ("#fee2e2", "#dc2626", "isolated: ingress, egress"),
    }
}

fn pods_words(n: usize) -> String {
    format!("{n} pod{}", if n == 1 { "" } else { "s" })
}

impl Graph {
    fn title(&self) -> String {
        format!(
            "netpol graph: {} workloads in {} namespaces, {} allowed flows",
            self.workloads.len(),
            self.namespaces.len(),
            self.edges.len()
        )
    }

    /// Graphviz text: a cluster per namespace, a node per workload, an edge per flow.
    pub fn dot(&self) -> String {
        let mut out = String::from("digraph netpol {\n");
        let _ = writeln!(
            out,
            "  graph [rankdir=LR, fontname=\"sans-serif\", label={}, labelloc=t];",
            dot_string(&self.title())
        );
        out.push_str("  node [shape=box, style=\"rounded,filled\", fontname=\"sans-serif\"];\n");
        out.push_str("  edge [fontname=\"sans-serif\", fontsize=10];\n");
        let by_key: BTreeMap<&str, &Workload> =
            self.workloads.iter().map(|w| (w.key.as_str(), w)).collect();
        for ns in &self.namespaces {
            let _ = writeln!(
                out,
                "  subgraph {} {{",
                dot_string(&format!("cluster_{}", ns.name))
            );
            let _ = writeln!(out, "    label={};", dot_string(&ns.name));
            for key in &ns.workloads {
                let w = by_key[key.as_str()];
                let (fill, stroke, words) = style(w);
                let _ = writeln!(
                    out,
                    "    {} [label={}, fillcolor=\"{fill}\", color=\"{stroke}\"];",
                    dot_string(&w.key),
                    dot_string(&format!(
                        "{}\n{}, {words}",
                        w.name,
                        pods_words(w.pods.len())
                    ))
                );
            }
            out.push_str("  }\n");
        }
        for e in &self.edges {
            let _ = writeln!(
                out,
                "  {} -> {} [label={}{}];",
                dot_string(&e.from),
                dot_string(&e.to),
                dot_string(&e.ports.join(", ")),
                if e.partial { ", style=dashed" } else { "" }
            );
        }
        out.push_str("}\n");
        out
    }
}

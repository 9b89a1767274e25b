//! `netpol lint`: what is wrong or suspicious in a set of policy objects. Each finding
//! has a severity, a stable code, the object and field at fault and a fix as a YAML
//! snippet. The checks read the same index and compiled maps the agent enforces, so a
//! rule reported as never deciding never decides here.
//!
//! ```text
//! objects ──► simulate::Model (index + compile; pods without an address get
//!             simulate's) ──► checks per object, DNS reachability, shadowing ──► findings
//! ```
//!
//! What a selector matches is only known when the input describes the cluster: the
//! checks about pods run when it holds pods, those about namespace labels when it holds
//! Namespace objects (`--cluster` always has both).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use netpol_common::{direction, endpoint_flags, identity, proto, reason, PolicyKey};
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

use crate::compile::lookup::{self, Lookup};
use crate::compile::{cidr::Partition, rule_prefixes, PolicyPrefix};
use crate::hints;
use crate::index::cluster::{self, Action, ClusterPolicy, Tier};
use crate::index::net::{addr_of, Cidr};
use crate::index::policy::{parse_policy, protocol_name};
use crate::index::{Labels, Peer, PodInfo, Policy, PortRef, Rule, Selector, NAMESPACE_NAME_LABEL};
use crate::simulate::Model;
use crate::source::cluster_policy::{self as crd, ClusterPolicyObject};
use crate::source::Object;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Not enforced as written, or certainly not what was meant: fails the lint.
    Error,
    /// Likely a mistake: fails the lint only with `--strict`.
    Warning,
    /// Worth knowing.
    Info,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub severity: Severity,
    /// Stable kebab-case id (see [`CODES`]).
    pub code: String,
    /// `Kind/namespace/name`, or `Kind/name` for cluster-scoped objects.
    pub object: String,
    /// JSON path in the object, e.g. `spec.ingress[0].from[1].namespaceSelector`.
    pub field: String,
    pub message: String,
    /// A YAML snippet to put at (or around) `field`.
    pub fix: String,
}

/// Every code, its severity and what it means. A code's severity never changes.
pub const CODES: &[(&str, Severity, &str)] = &[
    ("invalid-object", Severity::Error, "rejected by validation: nothing of the object is enforced"),
    ("except-outside-cidr", Severity::Error, "an ipBlock `except` not strictly inside its `cidr` (the policy is rejected)"),
    ("fqdn-peer-unsupported", Severity::Error, "a `domainNames` peer, which netpol cannot enforce (the policy is rejected)"),
    ("empty-peer-list", Severity::Error, "`from: []` / `to: []` allows every peer, though it reads as none"),
    ("same-priority-conflict", Severity::Error, "two cluster policies of one tier share a priority and take different actions: the API leaves their order undefined"),
    ("rule-allows-all-peers", Severity::Warning, "a rule without `from`/`to` (every peer) beside rules that name their peers: a stray `-`?"),
    ("rule-ignored", Severity::Warning, "rules of a direction that `policyTypes` leaves out: never enforced"),
    ("selector-matches-no-pod", Severity::Warning, "a pod selector (subject or peer) that matches no pod"),
    ("namespace-selector-matches-no-namespace", Severity::Warning, "a namespace selector on labels no namespace carries"),
    ("ipblock-matches-pods", Severity::Warning, "an ipBlock (or networks peer) that covers pod addresses: select the pods instead"),
    ("named-port-undefined", Severity::Warning, "a named port no destination pod defines (on that protocol)"),
    ("dns-egress-missing", Severity::Warning, "pods whose egress is isolated can reach no DNS server over UDP 53"),
    ("dns-udp-only", Severity::Warning, "DNS allowed over UDP 53 but not TCP 53 (large answers fall back to TCP)"),
    ("rule-shadowed", Severity::Warning, "every flow a NetworkPolicy rule allows is allowed by other rules for the same pods"),
    ("cluster-rule-shadowed", Severity::Warning, "earlier rules of the same tier decide every flow a cluster policy rule matches (e.g. a Deny under a higher-priority Accept)"),
    ("pass-to-nothing", Severity::Warning, "a Pass for pods no NetworkPolicy or Baseline rule judges: the flows are allowed by default"),
    ("peers-or-not-and", Severity::Info, "a namespaceSelector peer and a podSelector peer (either) where one peer (both) may have been meant"),
];

fn severity_of(code: &str) -> Severity {
    CODES
        .iter()
        .find(|(c, _, _)| *c == code)
        .map(|(_, s, _)| *s)
        .unwrap_or_else(|| panic!("lint code {code} is not in CODES"))
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub errors: usize,
    pub warnings: usize,
    pub info: usize,
}

impl Report {
    /// 0: no error (warnings alone pass unless `strict`); 1: errors.
    pub fn exit_code(&self, strict: bool) -> i32 {
        i32::from(self.errors > 0 || (strict && self.warnings > 0))
    }

    pub fn table(&self) -> String {
        let w = |f: fn(&Finding) -> usize, title: &str| {
            self.findings
                .iter()
                .map(f)
                .max()
                .unwrap_or(0)
                .max(title.len())
        };
        let (wc, wo) = (w(|f| f.code.len(), "CODE"), w(|f| f.object.len(), "OBJECT"));
        if self.findings.is_empty() {
            return "no findings\n".into();
        }
        let mut out = format!(
            "{:<8}  {:<wc$}  {:<wo$}  FIELD\n",
            "SEVERITY", "CODE", "OBJECT"
        );
        for f in &self.findings {
            let sev = match f.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
                Severity::Info => "info",
            };
            out.push_str(&format!(
                "{sev:<8}  {:<wc$}  {:<wo$}  {}\n",
                f.code, f.object, f.field
            ));
            out.push_str(&format!("          {}\n          fix:\n", f.message));
            for line in f.fix.lines() {
                out.push_str(&format!("            {line}\n"));
            }
        }
        out.push_str(&format!(
            "{} error{}, {} warning{}, {} info\n",
            self.errors,
            if self.errors == 1 { "" } else { "s" },
            self.warnings,
            if self.warnings == 1 { "" } else { "s" },
            self.info
        ));
        out
    }
}

/// Lints a set of objects (what `netpol lint` read from manifests or the cluster).
pub fn lint(objects: Vec<Object>) -> Report {
    let has_pods = objects.iter().any(|o| matches!(o, Object::Pod(_)));
    let has_namespaces = objects.iter().any(|o| matches!(o, Object::Namespace(_)));
    let model = Model::new(objects.clone());
    let mut c = Checker {
        objects: &objects,
        model: &model,
        real_addresses: model
            .addresses
            .iter()
            .filter(|(_, assigned)| !assigned)
            .map(|(k, _)| k.clone())
            .collect(),
        has_pods,
        has_namespaces,
        out: Vec::new(),
    };
    c.invalid();
    c.conflicts();
    for obj in &objects {
        match obj {
            Object::NetworkPolicy(np) => c.network_policy(np),
            Object::ClusterPolicy(cp) => c.cluster_policy(cp),
            _ => {}
        }
    }
    if has_pods {
        c.dns(&objects);
        c.shadowed_rules();
        c.shadowed_cluster_rules();
        c.passes();
    }
    let mut findings = c.out;
    findings.sort_by(|a, b| {
        (a.severity, &a.object, &a.field, &a.code).cmp(&(b.severity, &b.object, &b.field, &b.code))
    });
    findings.dedup();
    let count = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
    Report {
        errors: count(Severity::Error),
        warnings: count(Severity::Warning),
        info: count(Severity::Info),
        findings,
    }
}

struct Checker<'a> {
    /// The objects as read, for field paths and fixes in their own words.
    objects: &'a [Object],
    model: &'a Model,
    /// Pods whose address came with the input (not chosen by simulate).
    real_addresses: BTreeSet<String>,
    has_pods: bool,
    has_namespaces: bool,
    out: Vec<Finding>,
}

/// `Kind/namespace/name` of a NetworkPolicy key, `Kind/name` of a cluster policy key.
fn object_of_key(snap_key: &str, is_network_policy: bool) -> String {
    if is_network_policy {
        format!("NetworkPolicy/{snap_key}")
    } else {
        snap_key.to_string()
    }
}

fn dir_name(dir: u8) -> &'static str {
    if dir == direction::INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

fn peer_list_name(dir: u8) -> &'static str {
    if dir == direction::INGRESS {
        "from"
    } else {
        "to"
    }
}

/// A few names and "and N more".
fn some<T: AsRef<str>>(names: &[T]) -> String {
    let shown: Vec<&str> = names.iter().take(3).map(|n| n.as_ref()).collect();
    match names.len() {
        0..=3 => shown.join(", "),
        n => format!("{} and {} more", shown.join(", "), n - 3),
    }
}

fn show_selector(sel: &Selector) -> String {
    if sel.is_empty() {
        return "{} (everything)".into();
    }
    let mut parts: Vec<String> = sel
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for r in &sel.requirements {
        parts.push(format!("{} {:?} {:?}", r.key, r.operator, r.values));
    }
    parts.join(",")
}

fn show_labels(labels: &Labels) -> String {
    if labels.is_empty() {
        return "(no labels)".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

// ---- YAML snippets ----

fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

fn map(pairs: Vec<(&str, Value)>) -> Value {
    let mut m = Mapping::new();
    for (k, v) in pairs {
        m.insert(s(k), v);
    }
    Value::Mapping(m)
}

fn labels_value(labels: &Labels) -> Value {
    let mut m = Mapping::new();
    for (k, v) in labels {
        m.insert(s(k), s(v));
    }
    Value::Mapping(m)
}

fn selector_value(sel: &Selector) -> Value {
    let mut pairs = Vec::new();
    if !sel.match_labels.is_empty() {
        pairs.push(("matchLabels", labels_value(&sel.match_labels)));
    }
    if !sel.requirements.is_empty() {
        let exprs = sel
            .requirements
            .iter()
            .map(|r| {
                let mut e = vec![
                    ("key", s(&r.key)),
                    ("operator", s(&format!("{:?}", r.operator))),
                ];
                if !r.values.is_empty() {
                    e.push((
                        "values",
                        Value::Sequence(r.values.iter().map(|v| s(v)).collect()),
                    ));
                }
                map(e)
            })
            .collect();
        pairs.push(("matchExpressions", Value::Sequence(exprs)));
    }
    map(pairs)
}

/// `value` as YAML, under a comment.
fn snippet(comment: &str, value: &Value) -> String {
    let body = serde_yaml::to_string(value).unwrap_or_default();
    if comment.is_empty() {
        body
    } else {
        let mut out: String = comment.lines().map(|l| format!("# {l}\n")).collect();
        out.push_str(&body);
        out
    }
}

/// The last name of a field path: `podSelector` of `spec.ingress[0].from[1].podSelector`.
fn last_key(field: &str) -> &str {
    let last = field.rsplit('.').next().unwrap_or(field);
    last.split('[').next().unwrap_or(last)
}

/// The value at a field path (`spec.ingress[0].from[1]`) of an object.
fn at<'v>(v: &'v Value, field: &str) -> Option<&'v Value> {
    let mut cur = v;
    for part in field.split('.') {
        let (name, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        cur = cur.get(name)?;
        for ix in indexes.split('[').filter(|x| !x.is_empty()) {
            cur = cur.get(ix.trim_end_matches(']').parse::<usize>().ok()?)?;
        }
    }
    Some(cur)
}

/// The object's own name and raw form.
fn raw<T: Serialize>(obj: &T) -> Value {
    serde_yaml::to_value(obj).unwrap_or(Value::Null)
}

impl<'a> Checker<'a> {
    fn push(&mut self, code: &str, object: &str, field: &str, message: String, fix: String) {
        self.out.push(Finding {
            severity: severity_of(code),
            code: code.into(),
            object: object.into(),
            field: field.into(),
            message,
            fix,
        });
    }

    /// Pods that take part and can be selected (not hostNetwork).
    fn pods(&self) -> impl Iterator<Item = &'a PodInfo> + 'a {
        let model: &'a Model = self.model;
        model
            .snap
            .pods
            .values()
            .map(|p| p.as_ref())
            .filter(|p| !p.host_network)
    }

    fn namespaces_matching(&self, sel: &Selector) -> Vec<String> {
        self.model
            .snap
            .namespaces
            .iter()
            .filter(|(_, l)| sel.matches(l))
            .map(|(n, _)| n.clone())
            .collect()
    }

    // ---- objects the index rejected ----

    fn invalid(&mut self) {
        for inv in self.model.snap.invalid.clone() {
            let object = if inv.namespace.is_empty() {
                format!("{}/{}", inv.kind, inv.name)
            } else {
                format!("{}/{}/{}", inv.kind, inv.namespace, inv.name)
            };
            let (field, why) = match inv.error.split_once(": ") {
                Some((f, w)) if !f.contains(' ') => (f.to_string(), w.to_string()),
                _ => ("spec".to_string(), inv.error.clone()),
            };
            let leaf = last_key(&field).to_string();
            if field.ends_with(".domainNames") {
                let fix = snippet(
                    "netpol cannot enforce domainNames (experimental in the API);\nname the addresses those names resolve to instead:",
                    &map(vec![(
                        "networks",
                        Value::Sequence(vec![s("203.0.113.0/24")]),
                    )]),
                );
                self.push(
                    "fqdn-peer-unsupported",
                    &object,
                    &field,
                    format!("{why}: the whole policy is rejected, nothing of it is enforced"),
                    fix,
                );
            } else if field.contains(".except[") && why.contains("strictly inside") {
                let fix = self.except_fix(&inv.namespace, &inv.name, &field);
                self.push(
                    "except-outside-cidr",
                    &object,
                    &field,
                    format!("{why}: the whole policy is rejected, nothing of it is enforced"),
                    fix,
                );
            } else {
                let current = self
                    .raw_object(&inv.kind, &inv.namespace, &inv.name)
                    .and_then(|v| at(&v, &field).cloned())
                    .unwrap_or_else(|| s("<value>"));
                self.push(
                    "invalid-object",
                    &object,
                    &field,
                    format!("{why}: the whole object is rejected, nothing of it is enforced"),
                    snippet(
                        &format!("{why}\nchange it so that validation accepts it (now:)"),
                        &map(vec![(&leaf, current)]),
                    ),
                );
            }
        }
    }

    /// The ipBlock with the excepts that are not strictly inside its cidr left out.
    fn except_fix(&self, ns: &str, name: &str, field: &str) -> String {
        let block_field = field.split(".except[").next().unwrap_or(field);
        let raw_block = self
            .raw_network_policy(ns, name)
            .and_then(|v| at(&v, block_field).cloned());
        let Some(block) = raw_block else {
            return snippet(
                "keep only excepts inside cidr",
                &map(vec![("except", Value::Sequence(vec![]))]),
            );
        };
        let cidr_text = block
            .get("cidr")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let cidr = Cidr::parse(cidr_text).ok();
        let mut keep = Vec::new();
        let mut dropped = Vec::new();
        for x in block
            .get("except")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let text = x.as_str().unwrap_or_default();
            let inside = match (cidr, Cidr::parse(text)) {
                (Some(c), Ok(xc)) => c.contains(&xc) && xc.prefix != c.prefix,
                _ => false,
            };
            if inside {
                keep.push(s(text));
            } else {
                dropped.push(text.to_string());
            }
        }
        let mut pairs = vec![("cidr", s(cidr_text))];
        if !keep.is_empty() {
            pairs.push(("except", Value::Sequence(keep)));
        }
        snippet(
            &format!(
                "{} not inside {cidr_text}: widen cidr or drop them (nothing outside cidr is matched anyway)",
                dropped.join(", ")
            ),
            &map(vec![("ipBlock", map(pairs))]),
        )
    }

    /// The last NetworkPolicy document of that name, as written.
    fn raw_network_policy(&self, ns: &str, name: &str) -> Option<Value> {
        self.raw_object("NetworkPolicy", ns, name)
    }

    /// The last document of that kind and name, as written.
    fn raw_object(&self, kind: &str, ns: &str, name: &str) -> Option<Value> {
        self.objects.iter().rev().find_map(|o| match o {
            Object::NetworkPolicy(np)
                if kind == "NetworkPolicy"
                    && np.metadata.namespace.as_deref().unwrap_or("default") == ns
                    && np.metadata.name.as_deref() == Some(name) =>
            {
                Some(raw(np))
            }
            Object::ClusterPolicy(cp)
                if cp.kind == kind && cp.metadata.name.as_deref() == Some(name) =>
            {
                Some(raw(cp))
            }
            _ => None,
        })
    }

    // ---- cluster policies of one tier at one priority ----

    fn conflicts(&mut self) {
        let snap = &self.model.snap;
        let mut found = Vec::new();
        for (first, second) in cluster::conflicting(&snap.cluster_policies) {
            // The fix goes to the one that has a priority to change.
            let (fixed, other) = if second.kind == "BaselineAdminNetworkPolicy" {
                (first, second)
            } else {
                (second, first)
            };
            let used: BTreeSet<u32> = snap
                .cluster_policies
                .values()
                .filter(|p| p.tier == fixed.tier)
                .map(|p| p.priority)
                .collect();
            let free = (fixed.priority + 1..=1000).find(|p| !used.contains(p));
            let fix = match free {
                Some(p) => snippet(
                    &format!(
                        "a priority of its own, so that {} is evaluated first",
                        other.key()
                    ),
                    &map(vec![(
                        "spec",
                        map(vec![("priority", Value::Number(p.into()))]),
                    )]),
                ),
                None => snippet("merge the two policies' rules into one", &Value::Null),
            };
            found.push((
                fixed.key(),
                format!(
                    "{} and {} share priority {} in the {:?} tier and take different actions: the API \
                     leaves their order undefined (netpol evaluates {} first, by name; other implementations may not)",
                    fixed.key(),
                    other.key(),
                    first.priority,
                    first.tier,
                    first.key()
                ),
                fix,
            ));
        }
        for (object, message, fix) in found {
            self.push(
                "same-priority-conflict",
                &object,
                "spec.priority",
                message,
                fix,
            );
        }
    }

    // ---- NetworkPolicy objects ----

    fn network_policy(&mut self, np: &NetworkPolicy) {
        let Ok(p) = parse_policy(np) else { return }; // reported as invalid
        let key = format!("{}/{}", p.namespace, p.name);
        if self.model.snap.policies.get(&key).map(|x| x.as_ref()) != Some(&p) {
            return; // a later document of the same name won
        }
        let object = format!("NetworkPolicy/{key}");
        let spec = np.spec.clone().unwrap_or_default();
        let rawv = raw(np);

        // policyTypes that leave a direction with rules out.
        if let Some(types) = spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
            for (dir, n, name) in [
                (
                    direction::INGRESS,
                    spec.ingress.as_ref().map_or(0, Vec::len),
                    "Ingress",
                ),
                (
                    direction::EGRESS,
                    spec.egress.as_ref().map_or(0, Vec::len),
                    "Egress",
                ),
            ] {
                if n > 0 && !types.iter().any(|t| t == name) {
                    let mut all: Vec<Value> = types.iter().map(|t| s(t)).collect();
                    all.push(s(name));
                    self.push(
                        "rule-ignored",
                        &object,
                        &format!("spec.{}", dir_name(dir)),
                        format!(
                            "policyTypes {types:?} leaves {name} out, so {} never enforced",
                            if n == 1 {
                                format!("its {} rule is", dir_name(dir))
                            } else {
                                format!("its {n} {} rules are", dir_name(dir))
                            }
                        ),
                        snippet(
                            &format!("enforce them (or delete spec.{})", dir_name(dir)),
                            &map(vec![(
                                "spec",
                                map(vec![("policyTypes", Value::Sequence(all))]),
                            )]),
                        ),
                    );
                }
            }
        }

        let ingress_raw: Vec<(
            Option<&Vec<NetworkPolicyPeer>>,
            Option<&Vec<NetworkPolicyPort>>,
        )> = spec
            .ingress
            .iter()
            .flatten()
            .map(|r| (r.from.as_ref(), r.ports.as_ref()))
            .collect();
        let egress_raw: Vec<(
            Option<&Vec<NetworkPolicyPeer>>,
            Option<&Vec<NetworkPolicyPort>>,
        )> = spec
            .egress
            .iter()
            .flatten()
            .map(|r| (r.to.as_ref(), r.ports.as_ref()))
            .collect();
        for (dir, raw_rules, rules) in [
            (direction::INGRESS, &ingress_raw, &p.ingress),
            (direction::EGRESS, &egress_raw, &p.egress),
        ] {
            self.peer_lists(&object, &rawv, dir, raw_rules);
            for (i, (rule, (raw_peers, _))) in rules.iter().zip(raw_rules.iter()).enumerate() {
                let rule_field = format!("spec.{}[{i}]", dir_name(dir));
                let list_field = format!("{rule_field}.{}", peer_list_name(dir));
                let peers = rule.peers.as_deref().unwrap_or_default();
                if hints::or_for_and(peers) {
                    self.or_for_and(&object, &list_field, peers);
                }
                for (j, (peer, raw_peer)) in peers
                    .iter()
                    .zip(raw_peers.map(|v| v.as_slice()).unwrap_or_default())
                    .enumerate()
                {
                    let f = format!("{list_field}[{j}]");
                    match peer {
                        Peer::Pods { namespaces, pods } => self.pod_peer(
                            &object,
                            &f,
                            namespaces.as_ref(),
                            pods,
                            Some(&p.namespace),
                            raw_peer.pod_selector.is_some(),
                            ("namespaceSelector", "podSelector"),
                        ),
                        Peer::Block { cidr, except } => {
                            self.block(&object, &format!("{f}.ipBlock.cidr"), cidr, except, false)
                        }
                        Peer::Nodes(_) => {}
                    }
                }
                self.named_ports(&object, &p, dir, i, rule);
            }
        }
        if self.has_pods {
            let subjects: Vec<&PodInfo> =
                self.pods().filter(|x| x.namespace == p.namespace).collect();
            if !subjects.iter().any(|x| p.pod_selector.matches(&x.labels)) {
                self.no_pod(
                    &object,
                    "spec.podSelector",
                    &p.pod_selector,
                    &subjects,
                    &format!("namespace {}", p.namespace),
                );
            }
        }
    }

    /// `from: []` / `to: []`, and rules without peers beside rules with them.
    fn peer_lists(
        &mut self,
        object: &str,
        rawv: &Value,
        dir: u8,
        rules: &[(
            Option<&Vec<NetworkPolicyPeer>>,
            Option<&Vec<NetworkPolicyPort>>,
        )],
    ) {
        let list = peer_list_name(dir);
        let named: Vec<usize> = rules
            .iter()
            .enumerate()
            .filter(|(_, (p, _))| p.is_some_and(|p| !p.is_empty()))
            .map(|(i, _)| i)
            .collect();
        for (i, (peers, ports)) in rules.iter().enumerate() {
            let rule_field = format!("spec.{}[{i}]", dir_name(dir));
            let on_ports = if ports.is_some_and(|p| !p.is_empty()) {
                " on its ports"
            } else {
                " on every port"
            };
            match peers {
                Some(p) if p.is_empty() => {
                    let example = map(vec![(
                        "podSelector",
                        map(vec![("matchLabels", map(vec![("app", s("client"))]))]),
                    )]);
                    self.push(
                        "empty-peer-list",
                        object,
                        &format!("{rule_field}.{list}"),
                        format!(
                            "`{list}: []` means every {}{on_ports}, inside the cluster or out, not none",
                            if dir == direction::INGRESS { "source" } else { "destination" }
                        ),
                        snippet(
                            &format!("name the peers (or delete {rule_field} to allow nothing through it)"),
                            &map(vec![(list, Value::Sequence(vec![example]))]),
                        ),
                    );
                }
                None if !named.is_empty() => {
                    // The nearest rule above with peers, else the first one below.
                    let sibling = named
                        .iter()
                        .rev()
                        .find(|j| **j < i)
                        .or_else(|| named.first())
                        .copied()
                        .expect("not empty");
                    let sibling_field = format!("spec.{}[{sibling}]", dir_name(dir));
                    let mut merged = at(rawv, &sibling_field).cloned().unwrap_or(Value::Null);
                    if let (Some(m), Some(ports)) = (merged.as_mapping_mut(), ports) {
                        m.insert(s("ports"), raw(ports));
                    }
                    let message = format!(
                        "has no `{list}`, so it allows every {}{on_ports}, while {sibling_field} names its peers; \
                         if its ports belong to that rule, a stray `-` split them apart",
                        if dir == direction::INGRESS { "source" } else { "destination" }
                    );
                    self.push(
                        "rule-allows-all-peers",
                        object,
                        &rule_field,
                        message,
                        snippet(
                            &format!("one rule: {sibling_field}'s peers with these ports (then delete {rule_field})"),
                            &map(vec![(dir_name(dir), Value::Sequence(vec![merged]))]),
                        ),
                    );
                }
                _ => {}
            }
        }
    }

    fn or_for_and(&mut self, object: &str, field: &str, peers: &[Peer]) {
        let ns = peers.iter().find_map(|p| match p {
            Peer::Pods {
                namespaces: Some(ns),
                pods,
            } if pods.is_empty() => Some(ns.clone()),
            _ => None,
        });
        let pods = peers.iter().find_map(|p| match p {
            Peer::Pods {
                namespaces: None,
                pods,
            } => Some(pods.clone()),
            _ => None,
        });
        let (Some(ns), Some(pods)) = (ns, pods) else {
            return;
        };
        self.push(
            "peers-or-not-and",
            object,
            field,
            format!(
                "lists namespaces {} and pods {} as two peers, which allows either; \
                 written as one peer it would allow only those pods in those namespaces",
                show_selector(&ns),
                show_selector(&pods)
            ),
            snippet(
                "if both were meant: one peer with both selectors",
                &map(vec![(
                    last_key(field),
                    Value::Sequence(vec![map(vec![
                        ("namespaceSelector", selector_value(&ns)),
                        ("podSelector", selector_value(&pods)),
                    ])]),
                )]),
            ),
        );
    }

    /// A peer that selects pods: its namespace selector must match a namespace, its pod
    /// selector a pod there.
    #[allow(clippy::too_many_arguments)]
    fn pod_peer(
        &mut self,
        object: &str,
        field: &str,
        namespaces: Option<&Selector>,
        pods: &Selector,
        own_namespace: Option<&str>,
        has_pod_selector: bool,
        (ns_key, pod_key): (&str, &str),
    ) {
        let in_namespaces: Vec<String> = match namespaces {
            Some(sel) => self.namespaces_matching(sel),
            None => own_namespace.map(str::to_string).into_iter().collect(),
        };
        if let Some(sel) = namespaces {
            if in_namespaces.is_empty() {
                if self.has_namespaces {
                    self.no_namespace(object, &format!("{field}.{ns_key}"), sel);
                }
                return;
            }
        }
        if !self.has_pods {
            return;
        }
        let scope: Vec<&PodInfo> = self
            .pods()
            .filter(|p| in_namespaces.contains(&p.namespace))
            .collect();
        if scope.iter().any(|p| pods.matches(&p.labels)) {
            return;
        }
        let where_ = if in_namespaces.len() == 1 {
            format!("namespace {}", in_namespaces[0])
        } else {
            format!("namespaces {}", some(&in_namespaces))
        };
        if has_pod_selector {
            self.no_pod(object, &format!("{field}.{pod_key}"), pods, &scope, &where_);
        } else {
            self.push(
                "selector-matches-no-pod",
                object,
                &format!("{field}.{ns_key}"),
                format!("matches {where_}, which hold no pod"),
                snippet(
                    "select namespaces that hold the pods meant",
                    &map(vec![(
                        ns_key,
                        selector_value(namespaces.unwrap_or(&Selector::default())),
                    )]),
                ),
            );
        }
    }

    /// `sel` (at `field`) matches none of `scope`: say so, with a typo's correction.
    fn no_pod(
        &mut self,
        object: &str,
        field: &str,
        sel: &Selector,
        scope: &[&PodInfo],
        where_: &str,
    ) {
        let key = last_key(field);
        let suggestion = scope.iter().find_map(|p| {
            let typos = hints::label_typos(sel, &p.labels);
            let fixed = hints::corrected(sel, &typos);
            (!typos.is_empty() && fixed.matches(&p.labels)).then_some((typos, fixed))
        });
        let mut message = format!(
            "{} matches no pod in {where_} ({} pod{} there)",
            show_selector(sel),
            scope.len(),
            if scope.len() == 1 { "" } else { "s" }
        );
        let fix = match suggestion {
            Some((_, fixed)) => {
                message.push_str(&format!("; did you mean {}?", show_selector(&fixed)));
                snippet("", &map(vec![(key, selector_value(&fixed))]))
            }
            None => {
                let sets: BTreeSet<String> = scope.iter().map(|p| show_labels(&p.labels)).collect();
                if sets.is_empty() {
                    snippet(
                        &format!("{where_} holds no pod: create them, or select where they run"),
                        &map(vec![(key, selector_value(sel))]),
                    )
                } else {
                    let example = scope[0].labels.clone();
                    snippet(
                        &format!(
                            "select labels the pods carry; label sets in {where_}: {}",
                            some(&sets.into_iter().collect::<Vec<_>>())
                        ),
                        &map(vec![(
                            key,
                            map(vec![("matchLabels", labels_value(&example))]),
                        )]),
                    )
                }
            }
        };
        self.push("selector-matches-no-pod", object, field, message, fix);
    }

    fn no_namespace(&mut self, object: &str, field: &str, sel: &Selector) {
        let key = last_key(field);
        let snap = &self.model.snap;
        let meant = snap.namespaces.values().find_map(|labels| {
            if let Some(v) = hints::name_label_meant_metadata_name(sel, labels) {
                let fixed = hints::with_metadata_name(sel);
                if fixed.matches(labels) {
                    return Some((
                        format!("`{NAMESPACE_NAME_LABEL}: {v}` (namespaces carry no `name` label)"),
                        fixed,
                    ));
                }
            }
            let typos = hints::label_typos(sel, labels);
            let fixed = hints::corrected(sel, &typos);
            (!typos.is_empty() && fixed.matches(labels)).then(|| (show_selector(&fixed), fixed))
        });
        let mut message = format!("{} matches no namespace", show_selector(sel));
        let fix = match meant {
            Some((words, fixed)) => {
                message.push_str(&format!("; did you mean {words}?"));
                snippet("", &map(vec![(key, selector_value(&fixed))]))
            }
            None => {
                let names: Vec<String> = snap
                    .namespaces
                    .iter()
                    .map(|(n, l)| {
                        let own: Labels = l
                            .iter()
                            .filter(|(k, _)| *k != NAMESPACE_NAME_LABEL)
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        format!("{n} {}", show_labels(&own))
                    })
                    .collect();
                message.push_str(&format!(" (namespaces: {})", some(&names)));
                snippet(
                    "select labels a namespace carries (every namespace has kubernetes.io/metadata.name)",
                    &map(vec![(
                        key,
                        map(vec![(
                            "matchLabels",
                            map(vec![(NAMESPACE_NAME_LABEL, s(snap.namespaces.keys().next().map_or("default", |n| n)))]),
                        )]),
                    )]),
                )
            }
        };
        self.push(
            "namespace-selector-matches-no-namespace",
            object,
            field,
            message,
            fix,
        );
    }

    /// An ipBlock (or `networks` CIDR) covering pod addresses of the input.
    fn block(
        &mut self,
        object: &str,
        field: &str,
        cidr: &Cidr,
        except: &[Cidr],
        cluster_peer: bool,
    ) {
        if cidr.prefix == 0 || (cidr.is_v4() && cidr.prefix == 96) {
            return; // "anywhere" is meant to include everything
        }
        let mut hits: Vec<(&PodInfo, std::net::IpAddr)> = Vec::new();
        for p in self
            .pods()
            .filter(|p| self.real_addresses.contains(&p.key()))
        {
            for ip in &p.ips {
                let a = addr_of(*ip);
                if cidr.contains_addr(&a) && !except.iter().any(|x| x.contains_addr(&a)) {
                    hits.push((p, *ip));
                }
            }
        }
        if hits.is_empty() {
            return;
        }
        let named: Vec<String> = hits
            .iter()
            .map(|(p, ip)| format!("{} ({ip})", p.key()))
            .collect();
        let mut by_ns: BTreeMap<&str, Vec<&PodInfo>> = BTreeMap::new();
        for (p, _) in &hits {
            by_ns.entry(p.namespace.as_str()).or_default().push(p);
        }
        let peers: Vec<Value> = by_ns
            .iter()
            .map(|(ns, pods)| {
                // The labels every matched pod of the namespace shares.
                let common: Labels = pods[0]
                    .labels
                    .iter()
                    .filter(|(k, v)| pods.iter().all(|p| p.labels.get(*k) == Some(*v)))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let ns_sel = map(vec![(
                    "matchLabels",
                    map(vec![(NAMESPACE_NAME_LABEL, s(ns))]),
                )]);
                let pod_sel = map(vec![("matchLabels", labels_value(&common))]);
                if cluster_peer {
                    map(vec![(
                        "pods",
                        map(vec![
                            ("namespaceSelector", ns_sel),
                            ("podSelector", pod_sel),
                        ]),
                    )])
                } else {
                    map(vec![
                        ("namespaceSelector", ns_sel),
                        ("podSelector", pod_sel),
                    ])
                }
            })
            .collect();
        self.push(
            "ipblock-matches-pods",
            object,
            field,
            format!(
                "{cidr} covers pod addresses: {}; an ipBlock is meant for addresses outside the cluster, \
                 and a pod's address changes whenever it is recreated: select the pods by label",
                some(&named)
            ),
            snippet(
                "in place of the ipBlock peer: peers that follow the pods (or narrow the block, or except them)",
                &Value::Sequence(peers),
            ),
        );
    }

    /// Named ports that no destination pod defines on the rule's protocol.
    fn named_ports(&mut self, object: &str, p: &Policy, dir: u8, i: usize, rule: &Rule) {
        if !self.has_pods {
            return;
        }
        // The pods a named port resolves on: the subjects for ingress, the peers for egress.
        let targets: Vec<&PodInfo> = if dir == direction::INGRESS {
            self.pods()
                .filter(|x| x.namespace == p.namespace && p.pod_selector.matches(&x.labels))
                .collect()
        } else {
            self.pods()
                .filter(|x| match &rule.peers {
                    None => true,
                    Some(peers) => peers.iter().any(|peer| match peer {
                        Peer::Pods { namespaces, pods } => {
                            let ns_ok = match namespaces {
                                Some(sel) => self
                                    .model
                                    .snap
                                    .namespaces
                                    .get(&x.namespace)
                                    .is_some_and(|l| sel.matches(l)),
                                None => x.namespace == p.namespace,
                            };
                            ns_ok && pods.matches(&x.labels)
                        }
                        Peer::Block { cidr, except } => x.ips.iter().any(|ip| {
                            let a = addr_of(*ip);
                            cidr.contains_addr(&a) && !except.iter().any(|e| e.contains_addr(&a))
                        }),
                        Peer::Nodes(_) => false,
                    }),
                })
                .collect()
        };
        if targets.is_empty() {
            return;
        }
        for (k, spec) in rule.ports.iter().flatten().enumerate() {
            let Some(PortRef::Name(name)) = &spec.port else {
                continue;
            };
            let on_protocol = |t: &PodInfo| {
                t.named_ports
                    .get(name)
                    .is_some_and(|v| v.iter().any(|(pr, _)| *pr == spec.protocol))
            };
            if targets.iter().any(|t| on_protocol(t)) {
                continue;
            }
            let field = format!("spec.{}[{i}].ports[{k}]", dir_name(dir));
            let whose = if dir == direction::INGRESS {
                "the pods it selects"
            } else {
                "the pods it allows"
            };
            let other_protocol = targets.iter().find_map(|t| {
                t.named_ports
                    .get(name)
                    .and_then(|v| v.first())
                    .map(|(pr, _)| *pr)
            });
            let defined: BTreeSet<&String> =
                targets.iter().flat_map(|t| t.named_ports.keys()).collect();
            let near = defined.iter().find(|d| hints::near(name, d));
            let (message, fix) = match (other_protocol, near) {
                (Some(pr), _) => (
                    format!(
                        "names port {name:?} on {}, but {whose} define it on {} only: the rule allows nothing",
                        protocol_name(spec.protocol),
                        protocol_name(pr)
                    ),
                    map(vec![("port", s(name)), ("protocol", s(protocol_name(pr)))]),
                ),
                (None, Some(d)) => (
                    format!("names port {name:?}, which none of {whose} defines; did you mean {d:?}?"),
                    map(vec![("port", s(d)), ("protocol", s(protocol_name(spec.protocol)))]),
                ),
                (None, None) => (
                    format!(
                        "names port {name:?}, which none of {whose} defines (their named ports: {}): the rule allows nothing",
                        if defined.is_empty() {
                            "none".to_string()
                        } else {
                            some(&defined.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                        }
                    ),
                    map(vec![("port", s("<a port the pods define>")), ("protocol", s(protocol_name(spec.protocol)))]),
                ),
            };
            self.push(
                "named-port-undefined",
                object,
                &field,
                message,
                snippet("", &fix),
            );
        }
    }

    // ---- cluster-wide policies ----

    fn cluster_policy(&mut self, obj: &ClusterPolicyObject) {
        let Ok(p) = cluster::parse(obj) else { return }; // reported as invalid
        if self
            .model
            .snap
            .cluster_policies
            .get(&p.key())
            .map(|x| x.as_ref())
            != Some(&p)
        {
            return;
        }
        let object = p.key();
        let spec = obj.spec.clone().unwrap_or_default();
        let subject = spec.subject.clone().unwrap_or_default();
        // The subject: namespaces, or pods in namespaces.
        match (&subject.namespaces, &subject.pods) {
            (Some(_), None) => {
                let ns = self.namespaces_matching(&p.namespaces);
                if ns.is_empty() && self.has_namespaces {
                    self.no_namespace(&object, "spec.subject.namespaces", &p.namespaces);
                }
            }
            (None, Some(_)) => self.pod_peer(
                &object,
                "spec.subject.pods",
                Some(&p.namespaces),
                &p.pods,
                None,
                true,
                ("namespaceSelector", "podSelector"),
            ),
            _ => {}
        }
        for (dir, rules) in [
            (
                direction::INGRESS,
                spec.ingress.as_deref().unwrap_or_default(),
            ),
            (
                direction::EGRESS,
                spec.egress.as_deref().unwrap_or_default(),
            ),
        ] {
            for (i, r) in rules.iter().enumerate() {
                let list = peer_list_name(dir);
                let peers = if dir == direction::INGRESS {
                    &r.from
                } else {
                    &r.to
                };
                for (j, peer) in peers.iter().flatten().enumerate() {
                    let f = format!("spec.{}[{i}].{list}[{j}]", dir_name(dir));
                    self.cluster_peer(&object, &f, peer);
                }
            }
        }
    }

    fn cluster_peer(&mut self, object: &str, f: &str, peer: &crd::Peer) {
        let parse = |sel, field: &str| Selector::parse(sel, field).ok();
        if let Some(ns) = peer.namespaces.as_ref().and_then(|s| parse(s, f)) {
            if self.namespaces_matching(&ns).is_empty() && self.has_namespaces {
                self.no_namespace(object, &format!("{f}.namespaces"), &ns);
            }
        }
        if let Some(pods) = &peer.pods {
            if let (Some(ns), Some(ps)) = (
                parse(&pods.namespace_selector, f),
                parse(&pods.pod_selector, f),
            ) {
                self.pod_peer(
                    object,
                    &format!("{f}.pods"),
                    Some(&ns),
                    &ps,
                    None,
                    true,
                    ("namespaceSelector", "podSelector"),
                );
            }
        }
        for (k, n) in peer.networks.iter().flatten().enumerate() {
            if let Ok(cidr) = Cidr::parse(n) {
                self.block(object, &format!("{f}.networks[{k}]"), &cidr, &[], true);
            }
        }
    }
}

// ---- DNS reachability ----

/// What the lint judges DNS against when the input has no DNS pod.
const DNS_STAND_IN: &str = "kind: Pod\nmetadata: {name: netpol-lint-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}\nspec: {containers: [{name: coredns, image: coredns, ports: [{name: dns, containerPort: 53, protocol: UDP}, {name: dns-tcp, containerPort: 53, protocol: TCP}]}]}\n";

impl<'a> Checker<'a> {
    fn dns(&mut self, objects: &[Object]) {
        let is_dns = |p: &PodInfo| {
            !p.host_network && p.labels.get("k8s-app").is_some_and(|v| v == "kube-dns")
        };
        let stand_in;
        let (model, stand_in_used) = if self.model.snap.pods.values().any(|p| is_dns(p)) {
            (self.model, false)
        } else {
            let pod: Pod = serde_yaml::from_str(DNS_STAND_IN).expect("literal");
            let mut with = objects.to_vec();
            with.push(Object::Pod(pod));
            stand_in = Model::new(with);
            (&stand_in, true)
        };
        let snap = &model.snap;
        let dns: Vec<&PodInfo> = snap
            .pods
            .values()
            .map(|p| p.as_ref())
            .filter(|p| is_dns(p))
            .collect();
        let lookup = Lookup::new(&model.desired);
        let judged = endpoint_flags::ISOLATED_EGRESS
            | endpoint_flags::ADMIN_EGRESS
            | endpoint_flags::BASELINE_EGRESS;
        // (code, object, field) → pods, the deciding rule's kind
        let mut found: BTreeMap<(&str, String, String), Vec<String>> = BTreeMap::new();
        for (key, ep) in &model.desired.endpoints {
            let pod = &snap.pods[key];
            if ep.flags & judged == 0 || is_dns(pod) {
                continue;
            }
            let decide = |protocol| {
                dns.iter()
                    .filter_map(|d| d.ips.iter().find(|ip| ip.is_ipv4() == pod.ips[0].is_ipv4()))
                    .map(|ip| lookup.decide_at(ep, direction::EGRESS, &addr_of(*ip), protocol, 53))
                    .collect::<Vec<_>>()
            };
            let (udp, tcp) = (decide(proto::UDP), decide(proto::TCP));
            if udp.is_empty() {
                continue; // no DNS server of the pod's address family
            }
            let udp_ok = udp.iter().find(|d| d.allowed);
            let tcp_ok = tcp.iter().any(|d| d.allowed);
            let (code, decision) = match (udp_ok, tcp_ok) {
                (Some(_), true) => continue,
                (Some(d), false) => ("dns-udp-only", *d),
                (None, _) => ("dns-egress-missing", udp[0]),
            };
            let (object, field) = self.responsible(model, pod, decision, code == "dns-udp-only");
            found
                .entry((code, object, field))
                .or_default()
                .push(key.clone());
        }
        let dns_ns = dns
            .first()
            .map(|d| d.namespace.clone())
            .unwrap_or_else(|| "kube-system".into());
        let against = if stand_in_used {
            "a stand-in kube-dns pod in kube-system, as the input has no pod labelled k8s-app=kube-dns".to_string()
        } else {
            format!(
                "{} (k8s-app=kube-dns)",
                some(&dns.iter().map(|d| d.key()).collect::<Vec<_>>())
            )
        };
        for ((code, object, field), pods) in found {
            let is_np = object.starts_with("NetworkPolicy/");
            let (message, fix) = if code == "dns-udp-only" {
                (
                    format!(
                        "lets {} reach DNS over UDP 53 but not TCP 53: answers too large for UDP are retried over TCP \
                         and fail (judged against {against})",
                        some(&pods)
                    ),
                    if is_np {
                        snippet(
                            "allow TCP 53 beside UDP 53",
                            &map(vec![(
                                "ports",
                                Value::Sequence(vec![
                                    map(vec![("protocol", s("UDP")), ("port", Value::Number(53.into()))]),
                                    map(vec![("protocol", s("TCP")), ("port", Value::Number(53.into()))]),
                                ]),
                            )]),
                        )
                    } else {
                        cluster_dns_fix(&object, &dns_ns)
                    },
                )
            } else {
                (
                    format!(
                        "isolates the egress of {} and no rule lets them reach DNS on UDP 53: every name lookup fails \
                         (judged against {against})",
                        some(&pods)
                    ),
                    if is_np {
                        snippet(
                            "an egress rule for DNS (beside the others)",
                            &map(vec![(
                                "spec",
                                map(vec![(
                                    "egress",
                                    Value::Sequence(vec![map(vec![
                                        (
                                            "to",
                                            Value::Sequence(vec![map(vec![
                                                (
                                                    "namespaceSelector",
                                                    map(vec![(
                                                        "matchLabels",
                                                        map(vec![(NAMESPACE_NAME_LABEL, s(&dns_ns))]),
                                                    )]),
                                                ),
                                                (
                                                    "podSelector",
                                                    map(vec![("matchLabels", map(vec![("k8s-app", s("kube-dns"))]))]),
                                                ),
                                            ])]),
                                        ),
                                        (
                                            "ports",
                                            Value::Sequence(vec![
                                                map(vec![("protocol", s("UDP")), ("port", Value::Number(53.into()))]),
                                                map(vec![("protocol", s("TCP")), ("port", Value::Number(53.into()))]),
                                            ]),
                                        ),
                                    ])]),
                                )]),
                            )]),
                        )
                    } else {
                        cluster_dns_fix(&object, &dns_ns)
                    },
                )
            };
            self.push(code, &object, &field, message, fix);
        }
    }

    /// The object and field behind a DNS decision: the rule whose cookie decided, else
    /// the first NetworkPolicy isolating the pod's egress.
    fn responsible(
        &self,
        model: &Model,
        pod: &PodInfo,
        d: netpol_common::policy::Decision,
        allowing: bool,
    ) -> (String, String) {
        if let Some(r) = model.desired.rules.get(&d.cookie).filter(|_| d.cookie != 0) {
            let is_np = model.snap.policies.contains_key(&r.policy);
            let field = if is_np && allowing {
                format!("spec.{}[{}].ports", r.direction, r.rule)
            } else {
                format!("spec.{}[{}]", r.direction, r.rule)
            };
            if d.reason != reason::POLICY_DENIED {
                return (object_of_key(&r.policy, is_np), field);
            }
        }
        // The broadest isolating policy (a namespace's default deny), then by name.
        let isolating = model
            .snap
            .policies
            .iter()
            .filter(|(_, p)| {
                p.namespace == pod.namespace
                    && p.isolates_egress
                    && p.pod_selector.matches(&pod.labels)
            })
            .min_by_key(|(k, p)| (!p.pod_selector.is_empty(), *k));
        match isolating {
            Some((k, p)) => (
                object_of_key(k, true),
                if p.egress.is_empty() {
                    "spec.policyTypes".into()
                } else {
                    "spec.egress".into()
                },
            ),
            None => (format!("Pod/{}", pod.key()), "spec".into()),
        }
    }
}

/// A rule allowing DNS, in the kind's own syntax, to put before the deciding rule.
fn cluster_dns_fix(object: &str, dns_ns: &str) -> String {
    let v1alpha1 = !object.starts_with("ClusterNetworkPolicy/");
    let peer = map(vec![(
        "pods",
        map(vec![
            (
                "namespaceSelector",
                map(vec![(
                    "matchLabels",
                    map(vec![(NAMESPACE_NAME_LABEL, s(dns_ns))]),
                )]),
            ),
            (
                "podSelector",
                map(vec![("matchLabels", map(vec![("k8s-app", s("kube-dns"))]))]),
            ),
        ]),
    )]);
    let mut rule = vec![
        ("name", s("allow-dns")),
        ("action", s(if v1alpha1 { "Allow" } else { "Accept" })),
        ("to", Value::Sequence(vec![peer])),
    ];
    let n53 = || Value::Number(53.into());
    if v1alpha1 {
        rule.push((
            "ports",
            Value::Sequence(vec![
                map(vec![(
                    "portNumber",
                    map(vec![("protocol", s("UDP")), ("port", n53())]),
                )]),
                map(vec![(
                    "portNumber",
                    map(vec![("protocol", s("TCP")), ("port", n53())]),
                )]),
            ]),
        ));
    } else {
        rule.push((
            "protocols",
            Value::Sequence(vec![
                map(vec![(
                    "udp",
                    map(vec![("destinationPort", map(vec![("number", n53())]))]),
                )]),
                map(vec![(
                    "tcp",
                    map(vec![("destinationPort", map(vec![("number", n53())]))]),
                )]),
            ]),
        ));
    }
    snippet(
        "a DNS rule first in spec.egress (rules are evaluated in order)",
        &map(vec![(
            "spec",
            map(vec![("egress", Value::Sequence(vec![map(rule)]))]),
        )]),
    )
}

// ---- shadowing, on the compiled model ----

/// One rule, for the shadowing checks.
struct Unit<'a> {
    /// The policy's snapshot key and whether it is a NetworkPolicy.
    policy: String,
    is_np: bool,
    dir: u8,
    index: usize,
    rule: &'a Rule,
    own_namespace: Option<String>,
    /// Subject identities (pods of the input it applies to).
    subjects: BTreeSet<u32>,
    action: Option<Action>,
    tier: Option<Tier>,
    priority: u32,
}

impl Unit<'_> {
    fn field(&self) -> String {
        format!("spec.{}[{}]", dir_name(self.dir), self.index)
    }

    fn object(&self) -> String {
        object_of_key(&self.policy, self.is_np)
    }

    fn label(&self) -> String {
        match self.action {
            None => format!("{} {}", self.object(), self.field()),
            Some(a) => format!(
                "{} {} ({}, priority {})",
                self.object(),
                self.field(),
                action_word(&self.policy, a),
                self.priority
            ),
        }
    }
}

/// An action as the policy's kind spells it (v1alpha1 says Allow, later versions Accept).
fn action_word(policy_key: &str, action: Action) -> &'static str {
    match action {
        Action::Accept if policy_key.starts_with("ClusterNetworkPolicy/") => "Accept",
        Action::Accept => "Allow",
        Action::Deny => "Deny",
        Action::Pass => "Pass",
    }
}

/// Whether `o` allows everything `k` stands for: same subject and direction, `o` for
/// any peer or `k`'s, and `o`'s protocol and port prefix around `k`'s.
fn reaches(o: &PolicyPrefix, k: &PolicyPrefix) -> bool {
    if o.key.identity != identity::ANY && o.key.identity != k.key.identity {
        return false;
    }
    let mut k2 = *k;
    k2.key.identity = o.key.identity;
    lookup::covers(o, &k2)
}

/// Whether the union of `others` reaches `k`, recording which of them were needed. A
/// port prefix no single entry reaches is split in two where narrower entries lie
/// inside it (80-81 is reached by "80" and "81" together).
fn covered(k: &PolicyPrefix, others: &[(usize, PolicyPrefix)], by: &mut BTreeSet<usize>) -> bool {
    if let Some((u, _)) = others.iter().find(|(_, o)| reaches(o, k)) {
        by.insert(*u);
        return true;
    }
    let full = PolicyKey::PROTO_BITS + 16;
    if k.prefix_len < PolicyKey::PROTO_BITS || k.prefix_len >= full {
        return false;
    }
    let inside = others.iter().any(|(_, o)| {
        (o.key.identity == identity::ANY || o.key.identity == k.key.identity) && {
            let mut o2 = *o;
            o2.key.identity = k.key.identity;
            lookup::covers(k, &o2)
        }
    });
    if !inside {
        return false;
    }
    let bit = k.prefix_len - PolicyKey::PROTO_BITS;
    let port = u16::from_be_bytes(k.key.port_be);
    let half = |set: bool| {
        let mut c = *k;
        c.prefix_len += 1;
        let p = if set { port | (1 << (15 - bit)) } else { port };
        c.key.port_be = p.to_be_bytes();
        c
    };
    covered(&half(false), others, by) && covered(&half(true), others, by)
}

impl<'a> Checker<'a> {
    fn subjects_of_policy(&self, p: &Policy) -> BTreeSet<u32> {
        self.pods()
            .filter(|x| x.namespace == p.namespace && p.pod_selector.matches(&x.labels))
            .map(|x| x.identity)
            .collect()
    }

    fn subjects_of_cluster(&self, p: &ClusterPolicy) -> BTreeSet<u32> {
        let snap = &self.model.snap;
        self.pods()
            .filter(|x| {
                snap.namespaces
                    .get(&x.namespace)
                    .is_some_and(|l| p.namespaces.matches(l))
                    && p.pods.matches(&x.labels)
            })
            .map(|x| x.identity)
            .collect()
    }

    fn pods_of(&self, subjects: &BTreeSet<u32>) -> Vec<String> {
        self.pods()
            .filter(|p| subjects.contains(&p.identity))
            .map(|p| p.key())
            .collect()
    }

    /// NetworkPolicy rules whose allowed flows other rules (of any policy selecting the
    /// same pods) allow too. Later rules are tested first and leave the pool once
    /// reported, so of two equal rules the later one is named.
    fn shadowed_rules(&mut self) {
        let snap = &self.model.snap;
        let mut units: Vec<Unit> = Vec::new();
        for (key, p) in &snap.policies {
            let subjects = self.subjects_of_policy(p);
            for (dir, isolates, rules) in [
                (direction::INGRESS, p.isolates_ingress, &p.ingress),
                (direction::EGRESS, p.isolates_egress, &p.egress),
            ] {
                if !isolates {
                    continue;
                }
                for (i, rule) in rules.iter().enumerate() {
                    units.push(Unit {
                        policy: key.clone(),
                        is_np: true,
                        dir,
                        index: i,
                        rule,
                        own_namespace: Some(p.namespace.clone()),
                        subjects: subjects.clone(),
                        action: None,
                        tier: None,
                        priority: 0,
                    });
                }
            }
        }
        let partition = Partition::new(snap);
        let mut keys: HashMap<(usize, u32), Vec<PolicyPrefix>> = HashMap::new();
        let mut prefixes = |u: usize, s: u32, units: &[Unit]| -> Vec<PolicyPrefix> {
            keys.entry((u, s))
                .or_insert_with(|| {
                    let x = &units[u];
                    rule_prefixes(
                        snap,
                        &partition,
                        s,
                        x.dir,
                        x.rule,
                        x.own_namespace.as_deref(),
                    )
                })
                .clone()
        };
        let mut active = vec![true; units.len()];
        let mut found = Vec::new();
        for u in (0..units.len()).rev() {
            let mut by = BTreeSet::new();
            let mut any = false;
            let mut all = true;
            for &s in &units[u].subjects {
                let mine = prefixes(u, s, &units);
                if mine.is_empty() {
                    continue;
                }
                any = true;
                let mut others = Vec::new();
                for v in (0..units.len()).filter(|v| {
                    *v != u
                        && active[*v]
                        && units[*v].dir == units[u].dir
                        && units[*v].subjects.contains(&s)
                }) {
                    others.extend(prefixes(v, s, &units).into_iter().map(|k| (v, k)));
                }
                if !mine.iter().all(|k| covered(k, &others, &mut by)) {
                    all = false;
                    break;
                }
            }
            if any && all {
                active[u] = false;
                found.push((u, by));
            }
        }
        let total = self.pods().count();
        for (u, by) in found {
            let unit = &units[u];
            let names: Vec<String> = by.iter().map(|v| units[*v].label()).collect();
            let pods = self.pods_of(&unit.subjects);
            let message = format!(
                "every flow it allows is also allowed by {} for the pods it applies to ({}); \
                 compared on the compiled policy entries over the {total} pods of the input",
                names.join(" and "),
                some(&pods)
            );
            let fix = self.without_rule(unit);
            self.push("rule-shadowed", &unit.object(), &unit.field(), message, fix);
        }
    }

    /// The policy's rules of that direction without `unit`, keeping its isolation.
    fn without_rule(&self, unit: &Unit) -> String {
        let p = &self.model.snap.policies[&unit.policy];
        let dir = dir_name(unit.dir);
        let mut rest: Vec<Value> = self
            .raw_network_policy(&p.namespace, &p.name)
            .and_then(|v| at(&v, &format!("spec.{dir}")).cloned())
            .and_then(|v| v.as_sequence().cloned())
            .unwrap_or_default();
        if unit.index < rest.len() {
            rest.remove(unit.index);
        }
        let mut spec = Vec::new();
        if rest.is_empty() {
            // With no rule left, an inferred Egress type would go: say it outright.
            let mut types = Vec::new();
            if p.isolates_ingress {
                types.push(s("Ingress"));
            }
            if p.isolates_egress {
                types.push(s("Egress"));
            }
            spec.push(("policyTypes", Value::Sequence(types)));
        }
        spec.push((dir, Value::Sequence(rest)));
        snippet(
            &format!("without {} (the rules that cover it stay)", unit.field()),
            &map(vec![("spec", map(spec))]),
        )
    }

    /// Cluster policy rules decided first by earlier rules of their tier (a Deny under
    /// a higher-priority Accept, a rule repeated after a broader one).
    fn shadowed_cluster_rules(&mut self) {
        let snap = &self.model.snap;
        let mut ordered: Vec<&ClusterPolicy> =
            snap.cluster_policies.values().map(|p| p.as_ref()).collect();
        ordered.sort_by(|a, b| a.order().cmp(&b.order()));
        let mut units: Vec<Unit> = Vec::new();
        for p in ordered {
            let subjects = self.subjects_of_cluster(p);
            for (dir, rules) in [
                (direction::INGRESS, &p.ingress),
                (direction::EGRESS, &p.egress),
            ] {
                for (i, r) in rules.iter().enumerate() {
                    units.push(Unit {
                        policy: p.key(),
                        is_np: false,
                        dir,
                        index: i,
                        rule: &r.rule,
                        own_namespace: None,
                        subjects: subjects.clone(),
                        action: Some(r.action),
                        tier: Some(p.tier),
                        priority: p.priority,
                    });
                }
            }
        }
        let partition = Partition::new(snap);
        let mut found = Vec::new();
        for u in 0..units.len() {
            let unit = &units[u];
            let mut by = BTreeSet::new();
            let mut any = false;
            let mut all = true;
            for &s in &unit.subjects {
                let mine = rule_prefixes(snap, &partition, s, unit.dir, unit.rule, None);
                if mine.is_empty() {
                    continue;
                }
                any = true;
                let mut earlier = Vec::new();
                for (v, e) in units[..u].iter().enumerate() {
                    if e.tier == unit.tier && e.dir == unit.dir && e.subjects.contains(&s) {
                        earlier.extend(
                            rule_prefixes(snap, &partition, s, e.dir, e.rule, None)
                                .into_iter()
                                .map(|k| (v, k)),
                        );
                    }
                }
                if !mine.iter().all(|k| covered(k, &earlier, &mut by)) {
                    all = false;
                    break;
                }
            }
            if any && all {
                found.push((u, by));
            }
        }
        for (u, by) in found {
            let unit = &units[u];
            let names: Vec<String> = by.iter().map(|v| units[*v].label()).collect();
            let action = unit.action.expect("cluster rule");
            let against: BTreeSet<String> = by
                .iter()
                .filter_map(|v| units[*v].action)
                .map(|a| format!("{a:?}"))
                .collect();
            let extra = if action == Action::Deny && against.contains("Accept") {
                format!(
                    " (a Deny shadowed by a higher-priority {})",
                    action_word(&unit.policy, Action::Accept)
                )
            } else {
                String::new()
            };
            let message = format!(
                "this {} never decides{extra}: {} {} every flow it matches, and first, for the pods it applies to ({})",
                action_word(&unit.policy, action),
                names.join(" and "),
                if by.len() == 1 { "matches" } else { "match" },
                some(&self.pods_of(&unit.subjects))
            );
            let same_policy = by.iter().all(|v| units[*v].policy == unit.policy);
            let first = by.iter().map(|v| &units[*v]).min_by_key(|x| x.priority);
            let fix = match first {
                Some(f) if !same_policy && f.priority > 0 && unit.tier == Some(Tier::Admin) => {
                    snippet(
                        &format!(
                            "evaluate this policy before {} (or delete the rule)",
                            f.object()
                        ),
                        &map(vec![(
                            "spec",
                            map(vec![("priority", Value::Number((f.priority - 1).into()))]),
                        )]),
                    )
                }
                _ => snippet(
                    &format!(
                        "move {} above {} (rules are evaluated in written order), or delete it",
                        unit.field(),
                        names.join(", ")
                    ),
                    &Value::Null,
                ),
            };
            self.push(
                "cluster-rule-shadowed",
                &unit.object(),
                &unit.field(),
                message,
                fix,
            );
        }
    }

    /// Pass rules for pods nothing below the Admin tier judges.
    fn passes(&mut self) {
        let snap = &self.model.snap;
        let mut found = Vec::new();
        for p in snap.cluster_policies.values() {
            let subjects = self.subjects_of_cluster(p);
            if subjects.is_empty() {
                continue;
            }
            for (dir, rules) in [
                (direction::INGRESS, &p.ingress),
                (direction::EGRESS, &p.egress),
            ] {
                for (i, r) in rules.iter().enumerate() {
                    if r.action != Action::Pass {
                        continue;
                    }
                    let below = p.tier == Tier::Admin
                        && subjects.iter().any(|s| {
                            let key = &snap.identities[s];
                            let isolated = crate::compile::selecting(snap, key).any(|(_, np)| {
                                if dir == direction::INGRESS {
                                    np.isolates_ingress
                                } else {
                                    np.isolates_egress
                                }
                            });
                            let baseline = snap.cluster_policies.values().any(|b| {
                                b.tier == Tier::Baseline
                                    && b.namespaces.matches(&key.namespace_labels)
                                    && b.pods.matches(&key.labels)
                                    && !(if dir == direction::INGRESS {
                                        &b.ingress
                                    } else {
                                        &b.egress
                                    })
                                    .is_empty()
                            });
                            isolated || baseline
                        });
                    if below {
                        continue;
                    }
                    let why = if p.tier == Tier::Baseline {
                        "in the Baseline tier a Pass leaves the flow to the default".to_string()
                    } else {
                        format!(
                            "no NetworkPolicy isolates the pods it applies to ({}) for {} and no Baseline rule selects them",
                            some(&self.pods_of(&subjects)),
                            dir_name(dir)
                        )
                    };
                    let accept = if p.kind == "ClusterNetworkPolicy" {
                        "Accept"
                    } else {
                        "Allow"
                    };
                    found.push((
                        p.key(),
                        format!("spec.{}[{i}].action", dir_name(dir)),
                        format!("Pass hands the flows on, but {why}: they are allowed, as with {accept}"),
                        snippet(
                            &format!("say so (or add the NetworkPolicy or Baseline rule meant to judge them)"),
                            &map(vec![("action", s(accept))]),
                        ),
                    ));
                }
            }
        }
        for (object, field, message, fix) in found {
            self.push("pass-to-nothing", &object, &field, message, fix);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(identity: u32, protocol: Option<u8>, port: Option<(u16, u8)>) -> PolicyPrefix {
        let (port_be, len) = match (protocol, port) {
            (None, _) => ([0, 0], PolicyKey::FIXED_BITS),
            (Some(_), None) => ([0, 0], PolicyKey::PROTO_BITS),
            (Some(_), Some((p, l))) => (p.to_be_bytes(), PolicyKey::PROTO_BITS + l as u32),
        };
        PolicyPrefix {
            key: PolicyKey {
                endpoint: 300,
                identity,
                direction: 0,
                protocol: protocol.unwrap_or(0),
                port_be,
            },
            prefix_len: len,
        }
    }

    #[test]
    fn a_range_is_covered_by_narrower_entries_together_and_any_peer_covers_one() {
        let tcp = Some(proto::TCP);
        let range = key(400, tcp, Some((80, 15))); // 80-81
        let mut by = BTreeSet::new();
        let parts = [
            (1, key(400, tcp, Some((80, 16)))),
            (2, key(400, tcp, Some((81, 16)))),
        ];
        assert!(covered(&range, &parts, &mut by));
        assert_eq!(by, BTreeSet::from([1, 2]));
        assert!(!covered(&range, &parts[..1], &mut BTreeSet::new()));
        assert!(covered(
            &range,
            &[(3, key(identity::ANY, tcp, None))],
            &mut BTreeSet::new()
        ));
        assert!(
            !covered(&range, &[(3, key(401, None, None))], &mut BTreeSet::new()),
            "another peer"
        );
        assert!(
            !covered(
                &key(400, None, None),
                &[(4, key(400, tcp, None))],
                &mut BTreeSet::new()
            ),
            "TCP is not every protocol"
        );
    }
}

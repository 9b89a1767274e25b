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

mod cluster;
mod dns;
mod objects;
mod peers;
mod ports;
mod rejected;
mod shadow;
mod snippet;

use std::collections::BTreeSet;

use netpol_common::direction;
use serde::{Deserialize, Serialize};

use crate::index::{Labels, PodInfo, Selector};
use crate::objects::Object;
use crate::simulate::Model;

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
    ("ipblock-v4-mapped", Severity::Warning, "an ipBlock `cidr`/`except` or `networks` CIDR inside ::ffff:0:0/96: matches no traffic (IPv4-mapped IPv6)"),
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
}

//! "Did you mean": the mistakes the troubleshooting guides keep meeting, looked for in
//! the policies of the pods of a flow.

use netpol_common::{direction, proto};

use super::{dir_name, rule_name, Endpoint, Flow, Side, SideMaps};
use crate::compile::lookup::hits;
use crate::compile::RuleRef;
use crate::hints::near;
use crate::index::net::addr_of;
use crate::index::policy::protocol_name;
use crate::index::{Peer, PodInfo, PortRef, Rule, Selector, Snapshot};

/// A selector's labels that miss `pod`'s by a typo (case, a letter or two, a prefix).
fn label_hint(sel: &Selector, pod: &PodInfo, what: &str, hints: &mut Vec<String>) {
    for (k, v) in &sel.match_labels {
        match pod.labels.get(k) {
            Some(actual) if near(v, actual) => hints.push(format!(
                "{what} selects {k}: {v}, but {} has {k}: {actual} — did you mean {actual}?",
                pod.key()
            )),
            None => {
                if let Some((ak, av)) = pod.labels.iter().find(|(ak, _)| near(k, ak)) {
                    hints.push(format!(
                        "{what} selects the label {k}, but {} has {ak}: {av} — did you mean {ak}?",
                        pod.key()
                    ));
                }
            }
            _ => {}
        }
    }
}

/// Hints for why a side was denied, from the policies of the pod judged there: selector
/// typos (the policy's own podSelector, or a peer's), `name:` namespace labels, a port
/// allowed on another protocol, a named port the destination does not define.
pub(super) fn did_you_mean(
    snap: &Snapshot,
    f: &Flow,
    ingress_denied: bool,
    egress_denied: bool,
) -> Vec<String> {
    let mut hints = Vec::new();
    for (dir, denied, subject, peer_pod) in [
        (direction::INGRESS, ingress_denied, f.dst, f.src),
        (direction::EGRESS, egress_denied, f.src, f.dst),
    ] {
        let Some(subject) = subject.filter(|_| denied) else {
            continue;
        };
        for (key, p) in &snap.policies {
            if p.namespace != subject.namespace {
                continue;
            }
            let (isolates, rules) = if dir == direction::INGRESS {
                (p.isolates_ingress, &p.ingress)
            } else {
                (p.isolates_egress, &p.egress)
            };
            if !p.pod_selector.matches(&subject.labels) {
                // A policy that selects no pod at all, a typo away from this one.
                let selects_none = !snap
                    .pods
                    .values()
                    .any(|q| q.namespace == p.namespace && p.pod_selector.matches(&q.labels));
                if isolates && selects_none {
                    label_hint(
                        &p.pod_selector,
                        subject,
                        &format!("{key} podSelector"),
                        &mut hints,
                    );
                }
                continue;
            }
            for (i, rule) in rules.iter().enumerate() {
                let at = format!("{key} {}[{i}]", dir_name(dir));
                if let Some(peer_pod) = peer_pod {
                    let ns_labels = &snap.namespaces[&peer_pod.namespace];
                    for peer in rule.peers.as_deref().unwrap_or_default() {
                        let Peer::Pods { namespaces, pods } = peer else {
                            continue;
                        };
                        label_hint(pods, peer_pod, &at, &mut hints);
                        if let Some(ns) = namespaces {
                            if ns.match_labels.contains_key("name")
                                && !ns_labels.contains_key("name")
                            {
                                hints.push(format!(
                                    "{at} selects namespaces by `name: {}`, a label namespace {} does not carry; \
                                     did you mean `kubernetes.io/metadata.name: {}`?",
                                    ns.match_labels["name"], peer_pod.namespace, ns.match_labels["name"]
                                ));
                            }
                        }
                    }
                }
                let on_port = |spec: &&crate::index::PortSpec| matches!(spec.port, Some(PortRef::Number(n)) if n == f.port);
                // The port on another protocol only: a rule that also has it on this
                // one failed for another reason.
                let other_protocol_only = !rule
                    .ports
                    .iter()
                    .flatten()
                    .any(|s| on_port(&s) && s.protocol == f.protocol);
                for spec in rule.ports.iter().flatten() {
                    match &spec.port {
                        Some(PortRef::Number(_)) if on_port(&spec) && other_protocol_only => hints
                            .push(format!(
                                "{at} allows port {} over {}, but this flow is {}",
                                f.port,
                                protocol_name(spec.protocol),
                                protocol_name(f.protocol)
                            )),
                        Some(PortRef::Name(name)) => {
                            let target = if dir == direction::INGRESS {
                                Some(subject)
                            } else {
                                peer_pod
                            };
                            if let Some(t) = target {
                                if !t.named_ports.contains_key(name) {
                                    hints.push(format!(
                                        "{at} names the port {name:?}, which {} does not define (its container ports: {})",
                                        t.key(),
                                        t.named_ports.keys().cloned().collect::<Vec<_>>().join(", ")
                                    ));
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    hints
}

/// A namespaceSelector and a podSelector as two peers of one rule (either matches)
/// where one peer with both (both must match) was likely meant.
fn split_peers(rule: &Rule) -> bool {
    let peers = rule.peers.as_deref().unwrap_or_default();
    let ns_only = peers.iter().any(
        |p| matches!(p, Peer::Pods { namespaces: Some(_), pods } if *pods == Selector::default()),
    );
    let pod_only = peers.iter().any(|p| {
        matches!(
            p,
            Peer::Pods {
                namespaces: None,
                ..
            }
        )
    });
    ns_only && pod_only
}

/// The deciding rule allowed the flow through a split namespace/pod peer (OR for AND):
/// the usual cause of "why can this pod connect at all".
pub(super) fn either_peer(snap: &Snapshot, r: &RuleRef) -> Option<String> {
    let p = snap.policies.get(&r.policy)?;
    let rules = if r.direction == "egress" {
        &p.egress
    } else {
        &p.ingress
    };
    split_peers(rules.get(r.rule)?).then(|| {
        format!(
            "{} lists a namespaceSelector and a podSelector as two peers, which allows either; \
             written as one peer they would require both",
            rule_name(r)
        )
    })
}

/// The sender's egress allows this flow but not DNS: the app cannot find the pod by
/// name, whatever the rule says.
pub(super) fn missing_dns(
    snap: &Snapshot,
    f: &Flow,
    sender: &SideMaps,
    egress: &Side,
) -> Option<String> {
    let (Endpoint::Entry(ep), Some(src)) = (sender.endpoint, f.src) else {
        return None;
    };
    if egress.verdict != "allowed" {
        return None;
    }
    let dns = snap.pods.values().filter(|p| {
        p.labels.get("k8s-app").map(String::as_str) == Some("kube-dns")
            && f.dst.is_none_or(|d| d.key() != p.key())
    });
    for d in dns {
        let Some(ip) = d.ips.iter().find(|ip| ip.is_ipv4() == f.src_ip.is_ipv4()) else {
            continue;
        };
        let h = hits(
            sender.tries,
            &ep,
            direction::EGRESS,
            &addr_of(*ip),
            proto::UDP,
            53,
        );
        if !h.decision().allowed {
            return Some(format!(
                "the egress of {} allows this flow but not DNS (UDP/53 to {} is denied), so \
                 names do not resolve; did you mean to allow egress to the kube-dns pods \
                 (namespaceSelector `kubernetes.io/metadata.name: {}` with podSelector \
                 `k8s-app: kube-dns`) on port 53, UDP and TCP?",
                src.key(),
                d.key(),
                d.namespace
            ));
        }
    }
    None
}

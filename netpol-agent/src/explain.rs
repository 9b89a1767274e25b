//! `netpol explain --manifests`: why A can or cannot reach B, from the same compiled
//! maps and lookups the classifier uses, in plain words, with "did you mean" hints for
//! the mistakes the troubleshooting guides keep meeting.

use std::net::IpAddr;
use std::path::PathBuf;

use netpol_common::{direction, reason};
use serde::Serialize;

use crate::compile::lookup::Lookup;
use crate::compile::Desired;
use crate::hints::{self, LabelTypo};
use crate::index::net::addr_of;
use crate::index::{Peer, PodInfo, PortRef, Selector, Snapshot};

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub from: String,
    pub to: String,
    pub protocol: String,
    pub port: u16,
    pub allowed: bool,
    pub egress: Side,
    pub ingress: Side,
    /// "Did you mean" hints for likely mistakes.
    pub hints: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Side {
    /// allowed | denied | not-isolated
    pub verdict: &'static str,
    pub reason: &'static str,
    /// The rule that decided, as `policy direction[rule]`, if any.
    pub rule: Option<String>,
    /// The policies that isolate the judged pod in this direction.
    pub isolating: Vec<String>,
    /// The verdict in plain words.
    pub why: String,
    /// Each tier's part, in evaluation order (Admin, NetworkPolicy, Baseline).
    pub tiers: Vec<String>,
}

/// An endpoint of the flow: a pod (`ns/name`) or an address.
fn resolve<'a>(snap: &'a Snapshot, what: &str) -> anyhow::Result<(Option<&'a PodInfo>, IpAddr)> {
    if let Ok(ip) = what.parse::<IpAddr>() {
        return Ok((snap.pod_by_ip(ip), ip));
    }
    let pod = snap.pods.get(what).ok_or_else(|| {
        anyhow::anyhow!("pod {what:?} is not in the manifests (use namespace/name or an IP)")
    })?;
    let ip = *pod
        .ips
        .first()
        .ok_or_else(|| anyhow::anyhow!("pod {what} has no address (status.podIP)"))?;
    Ok((Some(pod), ip))
}

pub fn explain(
    paths: &[PathBuf],
    from: &str,
    to: &str,
    protocol: u8,
    port: u16,
) -> anyhow::Result<Explanation> {
    // Pods without an address get the same deterministic ones `simulate` reports.
    let model = crate::simulate::Model::read(paths)?;
    let (snap, desired) = (&model.snap, &model.desired);
    let (src, src_ip) = resolve(snap, from)?;
    let (dst, dst_ip) = resolve(snap, to)?;
    if src_ip.is_ipv4() != dst_ip.is_ipv4() {
        anyhow::bail!("{from} and {to} are of different address families");
    }
    let lookup = Lookup::new(desired);
    let egress = side(
        snap,
        desired,
        &lookup,
        src,
        direction::EGRESS,
        dst_ip,
        protocol,
        port,
    );
    let ingress = side(
        snap,
        desired,
        &lookup,
        dst,
        direction::INGRESS,
        src_ip,
        protocol,
        port,
    );
    let mut hints = Vec::new();
    if egress.verdict == "denied" || ingress.verdict == "denied" {
        hints = did_you_mean(snap, src, dst, protocol, port);
    }
    Ok(Explanation {
        from: from.into(),
        to: to.into(),
        protocol: crate::index::policy::protocol_name(protocol).into(),
        port,
        allowed: egress.verdict != "denied" && ingress.verdict != "denied",
        egress,
        ingress,
        hints,
    })
}

#[allow(clippy::too_many_arguments)]
fn side(
    snap: &Snapshot,
    desired: &Desired,
    lookup: &Lookup,
    pod: Option<&PodInfo>,
    dir: u8,
    peer: IpAddr,
    protocol: u8,
    port: u16,
) -> Side {
    let what = if dir == direction::EGRESS {
        "egress"
    } else {
        "ingress"
    };
    let Some(ep) = pod.and_then(|p| desired.endpoints.get(&p.key())) else {
        return Side {
            verdict: "not-isolated",
            reason: "NOT_A_POD",
            rule: None,
            isolating: vec![],
            why: format!("no pod of the cluster: nothing enforces its {what}"),
            tiers: vec![],
        };
    };
    let pod = pod.expect("an endpoint is a pod");
    let d = lookup.decide_at(ep, dir, &addr_of(peer), protocol, port);
    let name = |cookie: u32| {
        desired
            .rules
            .get(&cookie)
            .filter(|_| cookie != 0)
            .map(|r| format!("{} {}[{}]", r.policy, r.direction, r.rule))
    };
    let rule = name(d.cookie);
    let hits = lookup.hits_at(ep, dir, &addr_of(peer), protocol, port);
    let tiers = {
        use netpol_common::policy::strongest;
        use netpol_common::policy_action::{ALLOW, DENY, MISS, PASS};
        let named = |e: netpol_common::PolicyEntry| name(e.cookie).unwrap_or_default();
        let admin = strongest(&hits.admin);
        let lower = strongest(&hits.lower);
        let mut t = vec![match admin.action {
            ALLOW => format!("Admin tier: Accept by {} (final)", named(admin)),
            DENY => format!("Admin tier: Deny by {} (final)", named(admin)),
            PASS => format!(
                "Admin tier: Pass by {}: NetworkPolicy decides",
                named(admin)
            ),
            _ => "Admin tier: no rule matches".to_string(),
        }];
        if admin.action == MISS || admin.action == PASS {
            if hits.isolated {
                t.push(match lower.action {
                    ALLOW => format!("NetworkPolicy: isolated; allowed by {}", named(lower)),
                    _ => "NetworkPolicy: isolated; no rule allows it".to_string(),
                });
            } else {
                t.push("NetworkPolicy: does not isolate it".to_string());
                t.push(match lower.action {
                    ALLOW => format!("Baseline tier: Allow by {}", named(lower)),
                    DENY => format!("Baseline tier: Deny by {}", named(lower)),
                    _ => "Baseline tier: no rule matches; the default allows".to_string(),
                });
            }
        }
        t
    };
    let isolating: Vec<String> = snap
        .policies
        .iter()
        .filter(|(_, p)| {
            p.namespace == pod.namespace
                && p.pod_selector.matches(&pod.labels)
                && if dir == direction::EGRESS {
                    p.isolates_egress
                } else {
                    p.isolates_ingress
                }
        })
        .map(|(k, _)| k.clone())
        .collect();
    let verdict = match (d.allowed, d.reason) {
        (true, reason::NOT_ISOLATED) => "not-isolated",
        (true, _) => "allowed",
        (false, _) => "denied",
    };
    let rule_words = rule.clone().unwrap_or_default();
    let why = match d.reason {
        reason::NOT_ISOLATED => format!(
            "no policy selects {} for {what}: everything is allowed",
            pod.key()
        ),
        reason::POLICY_ALLOWED => format!("allowed by {rule_words}"),
        reason::POLICY_DENIED => format!(
            "{} is isolated for {what} by {} and no rule of them allows this flow",
            pod.key(),
            isolating.join(", ")
        ),
        reason::ADMIN_ALLOWED => format!("allowed by the Admin tier: {rule_words} (final)"),
        reason::ADMIN_DENIED => format!(
            "denied by the Admin tier: {rule_words} (final; no NetworkPolicy can reopen it)"
        ),
        reason::BASELINE_ALLOWED => {
            format!("no NetworkPolicy isolates it; allowed by the Baseline tier: {rule_words}")
        }
        reason::BASELINE_DENIED => {
            format!("no NetworkPolicy isolates it; denied by the Baseline tier: {rule_words}")
        }
        other => reason::name(other).to_string(),
    };
    Side {
        verdict,
        reason: reason::name(d.reason),
        rule,
        isolating,
        why,
        tiers,
    }
}

/// Hints for the guides' common mistakes, looked for in the policies that isolate the
/// pods of the flow.
fn did_you_mean(
    snap: &Snapshot,
    src: Option<&PodInfo>,
    dst: Option<&PodInfo>,
    protocol: u8,
    port: u16,
) -> Vec<String> {
    let mut hints = Vec::new();
    let label_hint = |sel: &Selector, pod: &PodInfo, what: &str, hints: &mut Vec<String>| {
        for typo in hints::label_typos(sel, &pod.labels) {
            hints.push(match typo {
                LabelTypo::Value { key, wanted, actual } => format!(
                    "{what} selects {key}: {wanted}, but {} has {key}: {actual} — did you mean {actual}?",
                    pod.key()
                ),
                LabelTypo::Key { wanted, actual_key, actual_value } => format!(
                    "{what} selects the label {wanted}, but {} has {actual_key}: {actual_value} — did you mean {actual_key}?",
                    pod.key()
                ),
            });
        }
    };
    for (key, p) in &snap.policies {
        for (dir, rules, subject, peer_pod) in [
            (direction::INGRESS, &p.ingress, dst, src),
            (direction::EGRESS, &p.egress, src, dst),
        ] {
            let Some(subject) = subject else { continue };
            if p.namespace != subject.namespace || !p.pod_selector.matches(&subject.labels) {
                continue;
            }
            for (i, rule) in rules.iter().enumerate() {
                let at = format!(
                    "{key} {}[{i}]",
                    if dir == direction::INGRESS {
                        "ingress"
                    } else {
                        "egress"
                    }
                );
                let peers = rule.peers.as_deref().unwrap_or_default();
                if let Some(peer_pod) = peer_pod {
                    let ns_labels = &snap.namespaces[&peer_pod.namespace];
                    for peer in peers {
                        if let Peer::Pods { namespaces, pods } = peer {
                            label_hint(pods, peer_pod, &at, &mut hints);
                            if let Some(value) = namespaces
                                .as_ref()
                                .and_then(|ns| hints::name_label_meant_metadata_name(ns, ns_labels))
                            {
                                hints.push(format!(
                                    "{at} selects namespaces by `name: {value}`, a label namespace {} does not carry; \
                                     did you mean `kubernetes.io/metadata.name: {value}`?",
                                    peer_pod.namespace
                                ));
                            }
                        }
                    }
                    if hints::or_for_and(peers) {
                        hints.push(format!(
                            "{at} lists a namespaceSelector and a podSelector as two peers, which allows either; \
                             written as one peer they would require both"
                        ));
                    }
                }
                for spec in rule.ports.iter().flatten() {
                    match &spec.port {
                        Some(PortRef::Number(n)) if *n == port && spec.protocol != protocol => {
                            hints.push(format!(
                                "{at} allows port {port} over {}, but this flow is {}",
                                crate::index::policy::protocol_name(spec.protocol),
                                crate::index::policy::protocol_name(protocol)
                            ))
                        }
                        Some(PortRef::Name(name)) => {
                            let target = if dir == direction::INGRESS {
                                Some(subject)
                            } else {
                                peer_pod
                            };
                            if let Some(t) = target {
                                if hints::undefined_named_port(name, t) {
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
    hints.sort();
    hints.dedup();
    hints
}

impl Explanation {
    pub fn human(&self) -> String {
        let mut out = format!(
            "{} → {} {}/{}: {}\n",
            self.from,
            self.to,
            self.protocol,
            self.port,
            if self.allowed { "ALLOWED" } else { "DENIED" }
        );
        for (name, s) in [
            ("egress of the sender", &self.egress),
            ("ingress of the receiver", &self.ingress),
        ] {
            out.push_str(&format!("  {name}: {} — {}\n", s.verdict, s.why));
            for t in &s.tiers {
                out.push_str(&format!("      {t}\n"));
            }
        }
        for h in &self.hints {
            out.push_str(&format!("  hint: {h}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `shop/web` → `to` on TCP 8080, over the pods below plus `policies`.
    fn explained(tag: &str, policies: &str, to: &str) -> Explanation {
        let dir = std::env::temp_dir().join(format!("netpol-explain-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("m.yaml"), format!("{PODS}{policies}")).unwrap();
        let e = explain(
            &[dir.clone()],
            "shop/web",
            to,
            netpol_common::proto::TCP,
            8080,
        );
        std::fs::remove_dir_all(&dir).unwrap();
        e.unwrap()
    }

    const PODS: &str = "kind: Namespace\nmetadata: {name: shop}\n---\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec: {containers: [{name: c, image: i}]}\nstatus: {podIP: 10.0.0.1}\n---\nkind: Pod\nmetadata: {name: api, namespace: shop, labels: {app: api-server}}\nspec: {containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}]}]}\nstatus: {podIP: 10.0.0.2}\n---\n";

    #[test]
    fn a_denied_flow_names_the_isolating_policy_and_hints_at_the_label_typo() {
        let e = explained(
            "deny",
            "kind: NetworkPolicy\nmetadata: {name: api-in, namespace: shop}\nspec: {podSelector: {matchLabels: {app: api-server}}, ingress: [{from: [{podSelector: {matchLabels: {app: webb}}}], ports: [{port: htttp}]}]}\n",
            "shop/api",
        );
        assert!(!e.allowed);
        assert_eq!(
            (e.egress.verdict, e.ingress.verdict),
            ("not-isolated", "denied")
        );
        assert_eq!(e.ingress.isolating, vec!["shop/api-in".to_string()]);
        let hints = e.hints.join("\n");
        assert!(hints.contains("did you mean web?"), "{hints}");
        assert!(hints.contains("names the port \"htttp\""), "{hints}");
        assert!(e.human().contains("DENIED"));
    }

    #[test]
    fn an_allowed_flow_names_the_rule() {
        let e = explained(
            "ok",
            "kind: NetworkPolicy\nmetadata: {name: api-in, namespace: shop}\nspec: {podSelector: {matchLabels: {app: api-server}}, ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: http}]}]}\n",
            "10.0.0.2",
        );
        assert!(e.allowed);
        assert_eq!(e.ingress.rule.as_deref(), Some("shop/api-in ingress[0]"));
        assert!(e.hints.is_empty());
    }

    #[test]
    fn each_tier_says_its_part() {
        let e = explained(
            "tiers",
            "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {name: pass-web}\nspec: {priority: 1, subject: {namespaces: {}}, ingress: [{action: Pass, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}]}]}\n---\napiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {name: default}\nspec: {subject: {namespaces: {}}, ingress: [{action: Deny, from: [{namespaces: {}}]}]}\n",
            "shop/api",
        );
        assert!(!e.allowed);
        assert_eq!(
            e.ingress.tiers,
            vec![
                "Admin tier: Pass by AdminNetworkPolicy/pass-web ingress[0]: NetworkPolicy decides",
                "NetworkPolicy: does not isolate it",
                "Baseline tier: Deny by BaselineAdminNetworkPolicy/default ingress[0]",
            ]
        );
        assert_eq!(e.ingress.reason, "BASELINE_DENIED");
    }
}

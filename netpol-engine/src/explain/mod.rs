//! `netpol explain`: why A can or cannot reach B, in plain words, with "did you mean"
//! hints for the mistakes the troubleshooting guides keep meeting.
//!
//! Offline (`--manifests`) each side is judged on the compiled maps. Live, the agent
//! judges each side of its node on the pinned maps themselves (the kernel answers the
//! lookups the classifier makes) and adds what it found there: identities, the entries
//! hit, the connection's conntrack state; a side on another node is judged on what that
//! node's maps should hold, and says so. Both go through [`judge`]: one verdict, one
//! wording, one set of hints (`hints.rs`); `live.rs` holds what the agent read off its
//! live maps (the agent's `explain_live` fills it in).

mod hints;
mod live;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use netpol_common::{direction, reason, EndpointEntry};
use serde::{Deserialize, Serialize};

use crate::compile::lookup::{hits, Hits, Lookup, Tries};
use crate::compile::{compile, NodeView, RuleRef};
use crate::index::net::addr_of;
use crate::index::policy::protocol_name;
use crate::index::{Index, PodInfo, Snapshot};
use crate::objects::{manifest::read_all, ClusterState};
use hints::{did_you_mean, either_peer, missing_dns};
pub use live::{Connection, Hit, Live, LiveSide};

#[derive(Clone, Debug, Serialize, Deserialize)]
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
    /// What the node's live maps hold (live explain only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<Live>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Side {
    /// allowed | denied | not-isolated
    pub verdict: String,
    pub reason: String,
    /// The rule that decided, as `policy direction[rule]`, if any.
    pub rule: Option<String>,
    /// The policies that isolate the judged pod in this direction.
    pub isolating: Vec<String>,
    /// The verdict in plain words.
    pub why: String,
    /// Each tier's part, in evaluation order (Admin, NetworkPolicy, Baseline).
    pub tiers: Vec<String>,
    /// The node whose classifier judges this side (live explain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// One side's endpoint in the maps that judge it.
#[derive(Clone, Copy)]
pub enum Endpoint {
    Entry(EndpointEntry),
    /// Not a pod of the cluster, or a hostNetwork pod: nothing enforces this side.
    None,
    /// A pod of the judging node without an entry yet: the pod-start hold drops its
    /// traffic until the agent has located it.
    Pending,
}

/// The maps one side of a flow is judged from.
pub struct SideMaps<'a> {
    pub endpoint: Endpoint,
    pub tries: &'a dyn Tries,
    /// Names of the cookies `tries` holds.
    pub rules: &'a BTreeMap<u32, RuleRef>,
    /// The node that enforces this side (live only).
    pub node: Option<String>,
    /// Said before the reason (a side judged from another node's view).
    pub caveat: Option<String>,
    /// Addresses whose traffic to this side passes as HOST_TRAFFIC (the node's own,
    /// when the classifier is told to let kubelet probes in).
    pub host: Vec<IpAddr>,
}

/// What is asked: from whom to whom, on which port.
#[derive(Clone, Copy, Debug)]
pub struct Question<'a> {
    /// `namespace/pod` or an address, each.
    pub from: &'a str,
    pub to: &'a str,
    pub protocol: u8,
    pub port: u16,
}

/// A flow as asked, resolved against the snapshot.
pub struct Flow<'s> {
    pub from: String,
    pub to: String,
    pub src: Option<&'s PodInfo>,
    pub src_ip: IpAddr,
    pub dst: Option<&'s PodInfo>,
    pub dst_ip: IpAddr,
    pub protocol: u8,
    pub port: u16,
}

/// Why a flow could not be judged at all.
#[derive(Debug, thiserror::Error)]
pub enum Unjudged {
    /// A manifest that does not read.
    #[error("{0}")]
    Unreadable(String),
    #[error("{flag}: pod {pod:?} is not in the cluster (use namespace/name or an IP)")]
    UnknownPod { flag: &'static str, pod: String },
    #[error("{flag}: pod {pod} has no address (status.podIP)")]
    NoAddress { flag: &'static str, pod: String },
    #[error("{from} and {to} are of different address families")]
    Families { from: String, to: String },
}

/// An endpoint of the flow (`flag` says which): a pod (`ns/name`) or an address.
fn resolve<'a>(
    snap: &'a Snapshot,
    flag: &'static str,
    what: &str,
) -> Result<(Option<&'a PodInfo>, IpAddr), Unjudged> {
    if let Ok(ip) = what.parse::<IpAddr>() {
        return Ok((snap.pod_by_ip(ip), ip));
    }
    let pod = snap.pods.get(what).ok_or_else(|| Unjudged::UnknownPod {
        flag,
        pod: what.into(),
    })?;
    let ip = *pod.ips.first().ok_or_else(|| Unjudged::NoAddress {
        flag,
        pod: what.into(),
    })?;
    Ok((Some(pod), ip))
}

pub fn flow<'s>(snap: &'s Snapshot, q: &Question) -> Result<Flow<'s>, Unjudged> {
    let Question {
        from,
        to,
        protocol,
        port,
    } = *q;
    let (src, src_ip) = resolve(snap, "--from", from)?;
    let (dst, dst_ip) = resolve(snap, "--to", to)?;
    if src_ip.is_ipv4() != dst_ip.is_ipv4() {
        return Err(Unjudged::Families {
            from: from.into(),
            to: to.into(),
        });
    }
    Ok(Flow {
        from: from.into(),
        to: to.into(),
        src,
        src_ip,
        dst,
        dst_ip,
        protocol,
        port,
    })
}

/// Offline: judged on the maps compiled from the manifests, every pod as if local.
pub fn explain(paths: &[PathBuf], q: &Question) -> Result<Explanation, Unjudged> {
    let (mut objects, errors, _) = read_all(paths);
    if let Some(e) = errors.first() {
        return Err(Unjudged::Unreadable(e.clone()));
    }
    // Pods without an address get the same deterministic ones `simulate` reports.
    crate::simulate::assign_addresses(&mut objects);
    let snap = Index::new().reset(&ClusterState {
        objects,
        errors: vec![],
        digest: String::new(),
    });
    let desired = compile(&snap, &NodeView::default());
    let f = flow(&snap, q)?;
    let lookup = Lookup::new(&desired);
    let maps = |pod: Option<&PodInfo>| SideMaps {
        endpoint: match pod.and_then(|p| desired.endpoints.get(&p.key())) {
            Some(ep) => Endpoint::Entry(*ep),
            None => Endpoint::None,
        },
        tries: &lookup,
        rules: &desired.rules,
        node: None,
        caveat: None,
        host: vec![],
    };
    Ok(judge(&snap, &f, &maps(f.src), &maps(f.dst)).0)
}

/// Both sides of a flow and the hints, the same offline and live; the lookups' hits of
/// each side (egress, ingress) for whoever wants to show them.
pub fn judge(
    snap: &Snapshot,
    f: &Flow,
    sender: &SideMaps,
    receiver: &SideMaps,
) -> (Explanation, [Option<Hits>; 2]) {
    let egress = side(snap, f.src, sender, direction::EGRESS, f.dst_ip, f);
    let ingress = side(snap, f.dst, receiver, direction::INGRESS, f.src_ip, f);
    let mut hints = did_you_mean(
        snap,
        f,
        ingress.side.verdict == "denied",
        egress.side.verdict == "denied",
    );
    for j in [&egress, &ingress] {
        if let Some(h) = j.rule.as_ref().and_then(|r| either_peer(snap, r)) {
            hints.push(h);
        }
    }
    hints.extend(missing_dns(snap, f, sender, &egress.side));
    hints.sort();
    hints.dedup();
    let x = Explanation {
        from: f.from.clone(),
        to: f.to.clone(),
        protocol: protocol_name(f.protocol).into(),
        port: f.port,
        allowed: egress.side.verdict != "denied" && ingress.side.verdict != "denied",
        egress: egress.side,
        ingress: ingress.side,
        hints,
        live: None,
    };
    (x, [egress.hits, ingress.hits])
}

fn dir_name(dir: u8) -> &'static str {
    if dir == direction::EGRESS {
        "egress"
    } else {
        "ingress"
    }
}

/// One side's verdict, and what the verdict came from.
struct Judged {
    side: Side,
    hits: Option<Hits>,
    /// The rule that decided, when one did.
    rule: Option<RuleRef>,
}

fn side(
    snap: &Snapshot,
    pod: Option<&PodInfo>,
    maps: &SideMaps,
    dir: u8,
    peer: IpAddr,
    f: &Flow,
) -> Judged {
    let what = dir_name(dir);
    let plain = |verdict: &str, reason: &str, why: String| Judged {
        side: Side {
            verdict: verdict.into(),
            reason: reason.into(),
            rule: None,
            isolating: vec![],
            why,
            tiers: vec![],
            node: maps.node.clone(),
        },
        hits: None,
        rule: None,
    };
    let key = pod.map(|p| p.key()).unwrap_or_else(|| peer.to_string());
    let ep = match maps.endpoint {
        Endpoint::Entry(ep) => ep,
        Endpoint::None => {
            return plain(
                "not-isolated",
                "NOT_A_POD",
                format!("no pod of the cluster: nothing enforces its {what}"),
            )
        }
        Endpoint::Pending => {
            return plain(
                "denied",
                reason::name(reason::PENDING_ENDPOINT),
                format!(
                    "{key} has no endpoint in the maps yet: its port drops IP traffic until \
                     the agent has located it (the pod-start hold)"
                ),
            )
        }
    };
    if dir == direction::INGRESS && maps.host.contains(&peer) {
        return plain(
            "allowed",
            reason::name(reason::HOST_TRAFFIC),
            "from the node itself (kubelet probes): allowed before any policy \
             (the agent's --deny-host-traffic turns that off)"
                .into(),
        );
    }
    let h = hits(maps.tries, &ep, dir, &addr_of(peer), f.protocol, f.port);
    let d = h.decision();
    let rule_ref = |cookie: u32| maps.rules.get(&cookie).filter(|_| cookie != 0);
    let name = |cookie: u32| rule_ref(cookie).map(rule_name);
    let rule = name(d.cookie);
    let tiers = {
        use netpol_common::policy::strongest;
        use netpol_common::policy_action::{ALLOW, DENY, MISS, PASS};
        let named = |e: netpol_common::PolicyEntry| name(e.cookie).unwrap_or_default();
        let admin = strongest(&h.admin);
        let lower = strongest(&h.lower);
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
            if h.isolated {
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
    let isolating = pod.map(|p| isolating(snap, p, dir)).unwrap_or_default();
    let verdict = match (d.allowed, d.reason) {
        (true, reason::NOT_ISOLATED) => "not-isolated",
        (true, _) => "allowed",
        (false, _) => "denied",
    };
    let rule_words = rule.clone().unwrap_or_default();
    let why = match d.reason {
        reason::NOT_ISOLATED => {
            format!("no policy selects {key} for {what}: everything is allowed")
        }
        reason::POLICY_ALLOWED => format!("allowed by {rule_words}"),
        reason::POLICY_DENIED => format!(
            "{key} is isolated for {what} by {} and no rule of them allows this flow",
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
    let why = match &maps.caveat {
        Some(c) => format!("{c}: {why}"),
        None => why,
    };
    Judged {
        side: Side {
            verdict: verdict.into(),
            reason: reason::name(d.reason).into(),
            rule,
            isolating,
            why,
            tiers,
            node: maps.node.clone(),
        },
        rule: rule_ref(d.cookie).cloned(),
        hits: Some(h),
    }
}

pub fn rule_name(r: &RuleRef) -> String {
    format!("{} {}[{}]", r.policy, r.direction, r.rule)
}

/// The NetworkPolicies that isolate `pod` in `dir`.
fn isolating(snap: &Snapshot, pod: &PodInfo, dir: u8) -> Vec<String> {
    snap.policies
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
        .collect()
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
            let on = s
                .node
                .as_ref()
                .map(|n| format!(" (on {n})"))
                .unwrap_or_default();
            out.push_str(&format!("  {name}{on}: {} — {}\n", s.verdict, s.why));
            for t in &s.tiers {
                out.push_str(&format!("      {t}\n"));
            }
        }
        for h in &self.hints {
            out.push_str(&format!("  hint: {h}\n"));
        }
        if let Some(live) = &self.live {
            out.push_str(&live.human());
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
            std::slice::from_ref(&dir),
            &Question {
                from: "shop/web",
                to,
                protocol: netpol_common::proto::TCP,
                port: 8080,
            },
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
            (e.egress.verdict.as_str(), e.ingress.verdict.as_str()),
            ("not-isolated", "denied")
        );
        assert_eq!(e.ingress.isolating, vec!["shop/api-in".to_string()]);
        let hints = e.hints.join("\n");
        assert!(hints.contains("did you mean web?"), "{hints}");
        assert!(hints.contains("names the port \"htttp\""), "{hints}");
        assert!(e.human().contains("DENIED"));
    }

    #[test]
    fn a_policy_whose_pod_selector_misses_by_a_typo_is_named() {
        let e = explained(
            "subject",
            "kind: NetworkPolicy\nmetadata: {name: deny, namespace: shop}\nspec: {podSelector: {}}\n---\nkind: NetworkPolicy\nmetadata: {name: allow-web, namespace: shop}\nspec: {podSelector: {matchLabels: {app: api}}, ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]}\n",
            "shop/api",
        );
        assert!(!e.allowed);
        assert_eq!(e.ingress.isolating, vec!["shop/deny".to_string()]);
        assert_eq!(
            e.hints,
            vec!["shop/allow-web podSelector selects app: api, but shop/api has app: api-server — did you mean api-server?"]
        );
    }

    #[test]
    fn an_allow_through_split_peers_says_either_was_enough() {
        let e = explained(
            "or",
            "kind: NetworkPolicy\nmetadata: {name: api-in, namespace: shop}\nspec: {podSelector: {matchLabels: {app: api-server}}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: x}}}, {podSelector: {matchLabels: {app: web}}}]}]}\n",
            "shop/api",
        );
        assert!(e.allowed);
        assert_eq!(e.hints.len(), 1, "{:?}", e.hints);
        assert!(e.hints[0].starts_with(
            "shop/api-in ingress[0] lists a namespaceSelector and a podSelector as two peers"
        ));
    }

    #[test]
    fn egress_allowed_without_dns_says_names_will_not_resolve() {
        let dns = "kind: Namespace\nmetadata: {name: kube-system}\n---\nkind: Pod\nmetadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}\nspec: {containers: [{name: c, image: i}]}\nstatus: {podIP: 10.0.0.53}\n---\n";
        let egress = "kind: NetworkPolicy\nmetadata: {name: web-out, namespace: shop}\nspec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Egress], egress: [{to: [{podSelector: {matchLabels: {app: api-server}}}], ports: [{port: 8080}]}]}\n";
        let e = explained("dns", &format!("{dns}{egress}"), "shop/api");
        assert!(e.allowed);
        assert_eq!(e.hints.len(), 1, "{:?}", e.hints);
        assert!(
            e.hints[0].contains("UDP/53 to kube-system/coredns is denied"),
            "{}",
            e.hints[0]
        );
        // With DNS allowed, nothing to say.
        let allow_dns = "---\nkind: NetworkPolicy\nmetadata: {name: dns, namespace: shop}\nspec: {podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 53, protocol: UDP}]}]}\n";
        let e = explained("dnsok", &format!("{dns}{egress}{allow_dns}"), "shop/api");
        assert!(e.allowed && e.hints.is_empty(), "{:?}", e.hints);
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

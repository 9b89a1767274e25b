//! DNS reachability: can the pods whose egress is isolated resolve names?

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use netpol_common::{direction, endpoint_flags, proto, reason};
use serde_yaml::Value;

use super::snippet::*;
use super::*;
use crate::compile::lookup::Lookup;
use crate::index::net::addr_of;
use crate::index::NAMESPACE_NAME_LABEL;

/// What the lint judges DNS against when the input has no DNS pod.
const DNS_STAND_IN: &str = "kind: Pod\nmetadata: {name: netpol-lint-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}\nspec: {containers: [{name: coredns, image: coredns, ports: [{name: dns, containerPort: 53, protocol: UDP}, {name: dns-tcp, containerPort: 53, protocol: TCP}]}]}\n";

impl<'a> Checker<'a> {
    pub(super) fn dns(&mut self, objects: &[Object]) {
        let is_dns = |p: &PodInfo| {
            !p.host_network && p.labels.get("k8s-app").is_some_and(|v| v == "kube-dns")
        };
        let stand_in;
        let (model, stand_in_used) = if self.model.snap.pods.values().any(|p| is_dns(p)) {
            (self.model, false)
        } else {
            let pod: Pod = serde_yaml::from_str(DNS_STAND_IN).expect("literal");
            let mut with = objects.to_vec();
            with.push(Object::Pod(pod.into()));
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
                                dns_ports(),
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
                                            dns_ports(),
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

/// A NetworkPolicy's ports for DNS: UDP and TCP 53.
fn dns_ports() -> Value {
    let port = |protocol| {
        map(vec![
            ("protocol", s(protocol)),
            ("port", Value::Number(53.into())),
        ])
    };
    Value::Sequence(vec![port("UDP"), port("TCP")])
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

//! Peers of a rule: selectors that match nothing, ipBlocks that cover pods, OR read as AND.

use std::collections::{BTreeMap, BTreeSet};

use serde_yaml::Value;

use super::snippet::*;
use super::*;
use crate::hints;
use crate::index::net::{addr_of, Cidr};
use crate::index::{Peer, NAMESPACE_NAME_LABEL};

impl<'a> Checker<'a> {
    pub(super) fn or_for_and(&mut self, object: &str, field: &str, peers: &[Peer]) {
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
    pub(super) fn pod_peer(
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
    pub(super) fn no_pod(
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

    pub(super) fn no_namespace(&mut self, object: &str, field: &str, sel: &Selector) {
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

    /// An ipBlock whose `cidr` or `except` is v4-mapped IPv6 (`peer` is its field).
    pub(super) fn v4_mapped_block(
        &mut self,
        object: &str,
        peer: &str,
        cidr: &Cidr,
        except: &[Cidr],
    ) {
        if let Some(v4) = cidr.mapped_ipv4() {
            // Its excepts lie inside it, so they are v4-mapped too: one finding says it.
            let mut block = vec![("cidr", s(&v4.to_string()))];
            let v4_except: Vec<Value> = except
                .iter()
                .filter_map(Cidr::mapped_ipv4)
                .map(|x| s(&x.to_string()))
                .collect();
            if !v4_except.is_empty() {
                block.push(("except", Value::Sequence(v4_except)));
            }
            let fix = snippet(
                "for IPv4 peers, the same addresses as IPv4",
                &map(vec![("ipBlock", map(block))]),
            );
            self.v4_mapped(object, &format!("{peer}.ipBlock.cidr"), cidr, fix);
            return;
        }
        let kept: Vec<Value> = except
            .iter()
            .filter(|x| !x.is_v4_mapped_v6())
            .map(|x| s(&x.to_string()))
            .collect();
        let mut block = vec![("cidr", s(&cidr.to_string()))];
        if !kept.is_empty() {
            block.push(("except", Value::Sequence(kept)));
        }
        let fix = snippet(
            &format!("drop it: IPv4 peers never match {cidr}, so there is nothing to except"),
            &map(vec![("ipBlock", map(block))]),
        );
        for (k, x) in except.iter().enumerate() {
            if x.is_v4_mapped_v6() {
                self.v4_mapped(
                    object,
                    &format!("{peer}.ipBlock.except[{k}]"),
                    x,
                    fix.clone(),
                );
            }
        }
    }

    /// One CIDR inside ::ffff:0:0/96: no packet has such an address (Linux drops IPv6
    /// packets with v4-mapped addresses, and so does the classifier).
    pub(super) fn v4_mapped(&mut self, object: &str, field: &str, cidr: &Cidr, fix: String) {
        self.push(
            "ipblock-v4-mapped",
            object,
            field,
            format!(
                "{cidr} matches no traffic: IPv4-mapped IPv6 (inside ::ffff:0:0/96) is never \
                 on the wire, and IPv4 peers match only IPv4 CIDRs"
            ),
            fix,
        );
    }

    /// An ipBlock (or `networks` CIDR) covering pod addresses of the input.
    pub(super) fn block(
        &mut self,
        object: &str,
        field: &str,
        cidr: &Cidr,
        except: &[Cidr],
        cluster_peer: bool,
    ) {
        if cidr.prefix_len() == 0 {
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
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::lint::lint;
    use crate::objects::manifest::parse_manifests;

    /// (code, field) of each finding on `manifests`.
    fn findings(manifests: &str) -> Vec<(String, String)> {
        let (objects, errors) = parse_manifests(Path::new("test.yaml"), manifests);
        assert!(errors.is_empty(), "{errors:?}");
        lint(objects)
            .findings
            .into_iter()
            .map(|f| (f.code, f.field))
            .collect()
    }

    #[test]
    fn v4_mapped_cidrs_are_reported_as_matching_no_traffic() {
        let found = findings(
            "kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: p, namespace: x}\n\
             spec: {podSelector: {}, ingress: [{from: [\
             {ipBlock: {cidr: '::ffff:0:0/96', except: ['::ffff:10.0.0.0/104']}}, \
             {ipBlock: {cidr: '::/0', except: ['::ffff:0:0/96', 'fd00::/8']}}, \
             {ipBlock: {cidr: 10.0.0.0/8}}, {ipBlock: {cidr: 'fd00::/8'}}]}]}\n",
        );
        let mapped: Vec<&str> = found
            .iter()
            .filter(|(code, _)| code == "ipblock-v4-mapped")
            .map(|(_, field)| field.as_str())
            .collect();
        assert_eq!(
            mapped,
            [
                "spec.ingress[0].from[0].ipBlock.cidr",
                "spec.ingress[0].from[1].ipBlock.except[0]",
            ]
        );
    }

    #[test]
    fn a_v4_mapped_networks_cidr_is_reported() {
        let found = findings(
            "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {name: c}\n\
             spec: {priority: 10, subject: {namespaces: {}}, \
             egress: [{action: Deny, to: [{networks: ['::ffff:192.168.0.0/112', '192.168.0.0/16']}]}]}\n",
        );
        assert!(
            found.contains(&(
                "ipblock-v4-mapped".into(),
                "spec.egress[0].to[0].networks[0]".into()
            )),
            "{found:?}"
        );
        assert_eq!(
            found
                .iter()
                .filter(|(c, _)| c == "ipblock-v4-mapped")
                .count(),
            1
        );
    }
}

//! Checks of each object: rejected ones, same-priority conflicts, NetworkPolicy and
//! cluster policy fields (peer lists, selectors, ipBlocks, named ports).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use serde_yaml::Value;

use super::snippet::*;
use super::*;
use crate::hints;
use crate::index::cluster;
use crate::index::net::{addr_of, Cidr};
use crate::index::policy::{parse_policy, protocol_name};
use crate::index::{Peer, Policy, PortRef, Rule, NAMESPACE_NAME_LABEL};
use crate::objects::cluster_policy::{self as crd, ClusterPolicyObject};

/// A NetworkPolicy rule as written: its peer list (`from`/`to`) and ports.
type RawRule<'r> = (
    Option<&'r Vec<NetworkPolicyPeer>>,
    Option<&'r Vec<NetworkPolicyPort>>,
);

impl<'a> Checker<'a> {
    // ---- objects the index rejected ----

    pub(super) fn invalid(&mut self) {
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
                (Some(c), Ok(xc)) => c.contains(&xc) && xc.prefix_len() != c.prefix_len(),
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
    pub(super) fn raw_network_policy(&self, ns: &str, name: &str) -> Option<Value> {
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

    pub(super) fn conflicts(&mut self) {
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

    pub(super) fn network_policy(&mut self, np: &NetworkPolicy) {
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

        let ingress_raw: Vec<RawRule> = spec
            .ingress
            .iter()
            .flatten()
            .map(|r| (r.from.as_ref(), r.ports.as_ref()))
            .collect();
        let egress_raw: Vec<RawRule> = spec
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
    fn peer_lists(&mut self, object: &str, rawv: &Value, dir: u8, rules: &[RawRule]) {
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

    pub(super) fn cluster_policy(&mut self, obj: &ClusterPolicyObject) {
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

//! Rules whose flows other rules already decide, on the compiled model: NetworkPolicy
//! rules allowed by others, cluster rules decided first by earlier ones of their tier,
//! and Pass rules with nothing below them.

use std::collections::{BTreeSet, HashMap};

use netpol_common::{identity, PolicyKey};
use serde_yaml::Value;

use super::snippet::*;
use super::*;
use crate::compile::cidr::Partition;
use crate::compile::lookup;
use crate::compile::{rule_prefixes, PolicyPrefix};
use crate::index::cluster::{Action, ClusterPolicy, Tier};
use crate::index::{Policy, Rule, Snapshot};

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

/// Each rule's trie prefixes per subject identity, computed once.
struct Prefixes<'s> {
    snap: &'s Snapshot,
    partition: Partition,
    cache: HashMap<(usize, u32), Vec<PolicyPrefix>>,
}

impl<'s> Prefixes<'s> {
    fn new(snap: &'s Snapshot) -> Prefixes<'s> {
        Prefixes {
            snap,
            partition: Partition::new(snap),
            cache: HashMap::new(),
        }
    }

    /// The prefixes of `units[u]` for subject identity `s`.
    fn of(&mut self, units: &[Unit], u: usize, s: u32) -> Vec<PolicyPrefix> {
        let (snap, partition) = (self.snap, &self.partition);
        self.cache
            .entry((u, s))
            .or_insert_with(|| {
                let x = &units[u];
                rule_prefixes(
                    snap,
                    partition,
                    s,
                    x.dir,
                    x.rule,
                    x.own_namespace.as_deref(),
                )
            })
            .clone()
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
    pub(super) fn shadowed_rules(&mut self) {
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
        let mut prefixes = Prefixes::new(snap);
        let mut active = vec![true; units.len()];
        let mut found = Vec::new();
        for u in (0..units.len()).rev() {
            let mut by = BTreeSet::new();
            let mut any = false;
            let mut all = true;
            for &s in &units[u].subjects {
                let mine = prefixes.of(&units, u, s);
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
                    others.extend(prefixes.of(&units, v, s).into_iter().map(|k| (v, k)));
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
    pub(super) fn shadowed_cluster_rules(&mut self) {
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
        let mut prefixes = Prefixes::new(snap);
        let mut found = Vec::new();
        for u in 0..units.len() {
            let unit = &units[u];
            let mut by = BTreeSet::new();
            let mut any = false;
            let mut all = true;
            for &s in &unit.subjects {
                let mine = prefixes.of(&units, u, s);
                if mine.is_empty() {
                    continue;
                }
                any = true;
                let mut earlier = Vec::new();
                for (v, e) in units[..u].iter().enumerate() {
                    if e.tier == unit.tier && e.dir == unit.dir && e.subjects.contains(&s) {
                        earlier.extend(prefixes.of(&units, v, s).into_iter().map(|k| (v, k)));
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
    pub(super) fn passes(&mut self) {
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
                            "say so (or add the NetworkPolicy or Baseline rule meant to judge them)",
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
    use netpol_common::proto;

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

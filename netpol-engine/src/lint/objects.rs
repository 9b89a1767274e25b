//! Checks of each NetworkPolicy: its peer lists, then each peer (`peers`) and named
//! port (`ports`). Rejected objects are in `rejected`, cluster policies in `cluster`.

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use serde_yaml::Value;

use super::snippet::*;
use super::*;
use crate::hints;
use crate::index::policy::parse_policy;
use crate::index::Peer;

/// A NetworkPolicy rule as written: its peer list (`from`/`to`) and ports.
type RawRule<'r> = (
    Option<&'r Vec<NetworkPolicyPeer>>,
    Option<&'r Vec<NetworkPolicyPort>>,
);

impl<'a> Checker<'a> {
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
                            self.v4_mapped_block(&object, &f, cidr, except);
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
}

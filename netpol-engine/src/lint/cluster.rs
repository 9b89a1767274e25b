//! Cluster-wide policies: their peers, and rules whose order the API leaves undefined.

use std::collections::BTreeSet;

use serde_yaml::Value;

use super::snippet::*;
use super::*;
use crate::index::cluster;
use crate::index::net::Cidr;
use crate::objects::cluster_policy::{self as crd, ClusterPolicyObject};

impl<'a> Checker<'a> {
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
                let field = format!("{f}.networks[{k}]");
                if let Some(v4) = cidr.mapped_ipv4() {
                    self.v4_mapped(
                        object,
                        &field,
                        &cidr,
                        snippet(
                            "for IPv4 peers, the same addresses as IPv4",
                            &s(&v4.to_string()),
                        ),
                    );
                }
                self.block(object, &field, &cidr, &[], true);
            }
        }
    }
}

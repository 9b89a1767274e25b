//! One compile over a snapshot: the partition, the rule cookies, endpoints and ipcache
//! patched for the pods that changed, then every subject whose inputs changed.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use netpol_common::{direction, endpoint_flags, identity, CidrEntry, EndpointEntry, IpcacheEntry};

use super::{cidr, cookie, Compiler, Desired, NodeView, RuleRef};
use crate::index::net::{addr_of, Cidr};
use crate::index::{PodInfo, PodKey, Snapshot};

impl Compiler {
    pub fn compile(&mut self, snap: &Snapshot, view: &NodeView) -> &Desired {
        let identities_changed = self.track_identities(snap);
        let changed_namespaces = self.track_policies(snap);
        let cluster_changed = self.track_cluster(snap);
        let policies_changed = !changed_namespaces.is_empty() || cluster_changed;
        let blocks = cidr::Partition::new(snap);
        let partition_changed = blocks != self.partition.0;
        if partition_changed {
            let v = self.version();
            self.partition = (blocks.clone(), v);
            self.desired.cidrs = blocks
                .prefixes
                .iter()
                .map(|(c, id)| (*c, CidrEntry { identity: *id }))
                .collect();
        }
        if policies_changed {
            self.desired.rules = rule_refs(snap);
        }
        if self.view.as_ref() != Some(view) {
            // Another node view: build endpoints and ipcache from scratch.
            self.view = Some(view.clone());
            self.pods.clear();
            self.claims.clear();
            self.by_identity.clear();
            self.desired.endpoints.clear();
            self.desired.ipcache.clear();
            for addr in &view.host_addrs {
                self.desired.ipcache.insert(
                    Cidr::host(*addr),
                    IpcacheEntry {
                        identity: identity::HOST,
                        endpoint: 0,
                    },
                );
            }
        }

        // Pods that appeared, went or changed since the last compile.
        let mut touched_ips = Vec::new();
        let mut dirty_endpoints = std::collections::BTreeSet::new();
        for key in changed_pods(&self.pods, &snap.pods) {
            if let Some(old) = self.pods.remove(&key) {
                for ip in &old.ips {
                    if let Some(c) = self.claims.get_mut(ip) {
                        c.remove(&key);
                        if c.is_empty() {
                            self.claims.remove(ip);
                        }
                    }
                    touched_ips.push(*ip);
                }
                if let Some(set) = self.by_identity.get_mut(&old.identity) {
                    set.remove(&key);
                    if set.is_empty() {
                        self.by_identity.remove(&old.identity);
                    }
                }
                self.desired.endpoints.remove(&key);
            }
            if let Some(new) = snap.pods.get(&key) {
                for ip in &new.ips {
                    self.claims.entry(*ip).or_default().insert(key.clone());
                    touched_ips.push(*ip);
                }
                if is_local_endpoint(new, view) {
                    self.by_identity
                        .entry(new.identity)
                        .or_default()
                        .insert(key.clone());
                    dirty_endpoints.insert(key.clone());
                }
                self.pods.insert(key, new.clone());
            }
        }

        // Subjects: gone ones lose their entries; the others are checked against
        // their fingerprints, all of them when something global changed.
        let gone: Vec<u32> = self
            .subjects
            .keys()
            .filter(|id| !self.by_identity.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            let s = self.subjects.remove(&id).expect("listed above");
            for (k, _) in s.entries {
                self.desired.policy.remove(&k);
            }
        }
        let check: Vec<u32> = self
            .by_identity
            .keys()
            .filter(|id| match self.subjects.get(id) {
                None => true,
                Some(s) => {
                    cluster_changed
                        || changed_namespaces.contains(&snap.identities[id].namespace)
                        || (partition_changed && (s.uses_blocks || s.named_egress))
                        || (identities_changed && s.named_egress)
                }
            })
            .copied()
            .collect();
        if !check.is_empty() {
            let by_namespace = policies_by_namespace(snap);
            let mut policy = std::mem::take(&mut self.desired.policy);
            for id in check {
                if self.subject(snap, &by_namespace, &blocks, id, &mut policy) {
                    dirty_endpoints.extend(self.by_identity[&id].iter().cloned());
                }
            }
            self.desired.policy = policy;
        }
        if snap.audit_namespaces != self.audit {
            for ns in snap.audit_namespaces.symmetric_difference(&self.audit) {
                let prefix = format!("{ns}/");
                dirty_endpoints.extend(
                    self.pods
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(&prefix))
                        .filter(|(_, p)| is_local_endpoint(p, view))
                        .map(|(k, _)| k.clone()),
                );
            }
            self.audit = snap.audit_namespaces.clone();
        }

        for key in dirty_endpoints {
            let pod = &self.pods[&key];
            let subject = &self.subjects[&pod.identity];
            let audit = if self.audit.contains(&pod.namespace) {
                endpoint_flags::AUDIT
            } else {
                0
            };
            let mut ep = EndpointEntry {
                id: pod.identity,
                flags: subject.flags | audit,
                revision: subject.revision,
                identity: pod.identity,
                ..Default::default()
            };
            for ip in &pod.ips {
                match ip {
                    IpAddr::V4(_) => ep.ipv4 = addr_of(*ip),
                    IpAddr::V6(_) => ep.ipv6 = addr_of(*ip),
                }
            }
            self.desired.endpoints.insert(key, ep);
        }
        for ip in touched_ips {
            let cidr = Cidr::host(ip);
            if view.host_addrs.contains(&ip) {
                continue; // the node's own, whoever else claims it
            }
            let owner = self
                .claims
                .get(&ip)
                .and_then(|c| c.first())
                .map(|k| &self.pods[k]);
            match owner {
                None => {
                    self.desired.ipcache.remove(&cidr);
                }
                Some(pod) => {
                    let (identity, endpoint) = if pod.host_network {
                        (identity::HOST, 0)
                    } else if is_local_endpoint(pod, view) {
                        (pod.identity, pod.identity)
                    } else {
                        (pod.identity, 0)
                    };
                    self.desired
                        .ipcache
                        .insert(cidr, IpcacheEntry { identity, endpoint });
                }
            }
        }
        self.peers.retain(|_, r| std::mem::take(&mut r.used));
        &self.desired
    }
}

fn is_local_endpoint(pod: &PodInfo, view: &NodeView) -> bool {
    !pod.host_network && !pod.ips.is_empty() && (view.node.is_none() || pod.node == view.node)
}

/// Keys of pods added, removed or replaced between two pod maps (both sorted).
fn changed_pods(
    old: &BTreeMap<PodKey, Arc<PodInfo>>,
    new: &BTreeMap<PodKey, Arc<PodInfo>>,
) -> Vec<PodKey> {
    let mut out = Vec::new();
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return out,
            (Some((k, _)), None) => {
                out.push((*k).clone());
                a.next();
            }
            (None, Some((k, _))) => {
                out.push((*k).clone());
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.push((*ka).clone());
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push((*kb).clone());
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(va, vb) && va != vb {
                        out.push((*ka).clone());
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

/// cookie → the rule it names, for every rule of every policy, cluster-wide ones too.
fn rule_refs(snap: &Snapshot) -> BTreeMap<u32, RuleRef> {
    let mut out = BTreeMap::new();
    let mut add = |key: &String, dir: u8, name: &str, rules: usize| {
        for i in 0..rules {
            out.insert(
                cookie(snap.policy_ids[key], dir, i),
                RuleRef {
                    policy: key.clone(),
                    direction: name.into(),
                    rule: i,
                },
            );
        }
    };
    for (key, policy) in &snap.policies {
        add(key, direction::INGRESS, "ingress", policy.ingress.len());
        add(key, direction::EGRESS, "egress", policy.egress.len());
    }
    for (key, policy) in &snap.cluster_policies {
        add(key, direction::INGRESS, "ingress", policy.ingress.len());
        add(key, direction::EGRESS, "egress", policy.egress.len());
    }
    out
}

fn policies_by_namespace(snap: &Snapshot) -> HashMap<&str, Vec<&String>> {
    let mut m: HashMap<&str, Vec<&String>> = HashMap::new();
    for (k, p) in &snap.policies {
        m.entry(p.namespace.as_str()).or_default().push(k);
    }
    m
}

//! One subject identity's entries: its selecting policies' rules merged by key and
//! precedence, recompiled only when its fingerprint moves.

use std::collections::{BTreeMap, HashMap};

use netpol_common::policy::stronger;
use netpol_common::{direction, endpoint_flags, policy_action, PolicyEntry};

use super::entries::{prefix_of, rule_entries};
use super::{cidr, cookie, lookup, Compiler, Fingerprint, PolicyPrefix, Subject};
use crate::index::cluster::{Action, ClusterPolicy, Tier};
use crate::index::{IdentityKey, Peer, Policy, PortRef, Snapshot};

impl Compiler {
    /// Compiles one subject identity's entries into `policy` unless its fingerprint
    /// shows nothing changed.
    pub(super) fn subject(
        &mut self,
        snap: &Snapshot,
        by_namespace: &HashMap<&str, Vec<&String>>,
        blocks: &cidr::Partition,
        id: u32,
        policy: &mut BTreeMap<PolicyPrefix, PolicyEntry>,
    ) -> bool {
        let key = &snap.identities[&id];
        let selecting: Vec<(&String, &Policy)> = by_namespace
            .get(key.namespace.as_str())
            .into_iter()
            .flatten()
            .map(|k| (*k, snap.policies[*k].as_ref()))
            .filter(|(_, p)| p.pod_selector.matches(&key.labels))
            .collect();
        // Fingerprint the inputs; peers were resolved in `track_policies`.
        let mut fp = Fingerprint::default();
        let mut uses_blocks = false;
        let mut named_egress = false;
        for (k, p) in &selecting {
            fp.policies
                .push((snap.policy_ids[*k], self.policies[*k].effective));
            for (rules, egress) in [(&p.ingress, false), (&p.egress, true)] {
                for rule in rules {
                    named_egress |= egress
                        && rule
                            .ports
                            .iter()
                            .flatten()
                            .any(|s| matches!(s.port, Some(PortRef::Name(_))));
                    uses_blocks |= rule
                        .peers
                        .iter()
                        .flatten()
                        .any(|peer| matches!(peer, Peer::Block { .. }));
                }
            }
        }
        let cluster: Vec<(&String, &ClusterPolicy, u16)> = self
            .cluster
            .iter()
            .filter(|(_, c)| {
                c.policy.namespaces.matches(&key.namespace_labels)
                    && c.policy.pods.matches(&key.labels)
            })
            .map(|(k, c)| (k, c.policy.as_ref(), c.base))
            .collect();
        if !cluster.is_empty() {
            fp.cluster = self.cluster_version;
            uses_blocks |= cluster.iter().any(|(_, p, _)| {
                p.ingress
                    .iter()
                    .chain(&p.egress)
                    .flat_map(|r| r.rule.peers.iter().flatten())
                    .any(|peer| matches!(peer, Peer::Block { .. } | Peer::Nodes(_)))
            });
        }
        if uses_blocks || named_egress {
            fp.partition = self.partition.1;
        }
        if named_egress {
            fp.identities = self.identities_version;
        }
        if self.subjects.get(&id).is_some_and(|s| s.fingerprint == fp) {
            return false;
        }

        // Audit-mode policies count in a direction only where no enforced policy
        // isolates the pod (there they could not drop anything more) and no Baseline
        // rule applies (staging must not lift a Baseline deny).
        let mut audit_counts = [false; 2];
        for dir in [direction::INGRESS, direction::EGRESS] {
            let isolating = |p: &Policy| {
                if dir == direction::INGRESS {
                    p.isolates_ingress
                } else {
                    p.isolates_egress
                }
            };
            let enforced = selecting.iter().any(|(_, p)| !p.audit && isolating(p));
            let baseline = cluster.iter().any(|(_, c, _)| {
                c.tier == Tier::Baseline
                    && !(if dir == direction::INGRESS {
                        &c.ingress
                    } else {
                        &c.egress
                    })
                    .is_empty()
            });
            audit_counts[dir as usize] = !enforced && !baseline;
        }
        let mut entries: Vec<(PolicyPrefix, PolicyEntry)> = Vec::new();
        let mut flags = 0;
        for (k, p) in &selecting {
            let policy_id = snap.policy_ids[*k];
            // The pod peers' resolutions, in the order the rules below meet them.
            let mut resolved = self.policies[*k].peers.iter().map(|pp| &self.peers[pp].ids);
            for (dir, isolates, rules, flag) in [
                (
                    direction::INGRESS,
                    p.isolates_ingress,
                    &p.ingress,
                    endpoint_flags::ISOLATED_INGRESS,
                ),
                (
                    direction::EGRESS,
                    p.isolates_egress,
                    &p.egress,
                    endpoint_flags::ISOLATED_EGRESS,
                ),
            ] {
                let isolates = isolates && (!p.audit || audit_counts[dir as usize]);
                if isolates {
                    flags |= flag;
                    if p.audit {
                        flags |= endpoint_flags::audit_of(dir);
                    }
                }
                for (i, rule) in rules.iter().enumerate() {
                    // Peers were resolved in this same order above.
                    let peers: Option<Vec<u32>> = rule.peers.as_ref().map(|peers| {
                        let mut ids = Vec::new();
                        for peer in peers {
                            match peer {
                                Peer::Pods { .. } => {
                                    ids.extend(resolved.next().expect("resolved above"))
                                }
                                Peer::Block { .. } | Peer::Nodes(_) => {
                                    ids.extend(blocks.identities_of(peer))
                                }
                            }
                        }
                        ids.sort_unstable();
                        ids.dedup();
                        ids
                    });
                    if !isolates {
                        continue;
                    }
                    let c = cookie(policy_id, dir, i);
                    for (peer, protocol, port_prefix) in
                        rule_entries(snap, blocks, key, dir, rule, peers)
                    {
                        let prefix = prefix_of(id, peer, dir, protocol, port_prefix);
                        entries.push((
                            prefix,
                            PolicyEntry {
                                cookie: c,
                                action: policy_action::ALLOW,
                                precedence: 0,
                            },
                        ));
                    }
                }
            }
        }
        // Cluster-wide rules: Admin entries in their own key space, Baseline entries
        // only where NetworkPolicy does not isolate (there NetworkPolicy decides).
        for (ckey, p, base) in &cluster {
            let policy_id = snap.policy_ids[*ckey];
            let mut resolved = self.cluster[*ckey]
                .peers
                .iter()
                .map(|pp| &self.peers[pp].ids);
            for (dir, rules) in [
                (direction::INGRESS, &p.ingress),
                (direction::EGRESS, &p.egress),
            ] {
                let (isolated, admin_flag, baseline_flag) = if dir == direction::INGRESS {
                    (
                        flags & endpoint_flags::ISOLATED_INGRESS != 0,
                        endpoint_flags::ADMIN_INGRESS,
                        endpoint_flags::BASELINE_INGRESS,
                    )
                } else {
                    (
                        flags & endpoint_flags::ISOLATED_EGRESS != 0,
                        endpoint_flags::ADMIN_EGRESS,
                        endpoint_flags::BASELINE_EGRESS,
                    )
                };
                for (i, cr) in rules.iter().enumerate() {
                    let mut ids = Vec::new();
                    for peer in cr.rule.peers.iter().flatten() {
                        match peer {
                            Peer::Pods { .. } => {
                                ids.extend(resolved.next().expect("resolved in track_cluster"))
                            }
                            Peer::Block { .. } | Peer::Nodes(_) => {
                                ids.extend(blocks.identities_of(peer))
                            }
                        }
                    }
                    ids.sort_unstable();
                    ids.dedup();
                    let (key_dir, flag) = match p.tier {
                        Tier::Admin => (dir | direction::ADMIN_TIER, admin_flag),
                        Tier::Baseline if isolated => continue,
                        Tier::Baseline => (dir, baseline_flag),
                    };
                    let entry = PolicyEntry {
                        cookie: cookie(policy_id, dir, i),
                        action: match cr.action {
                            Action::Accept => policy_action::ALLOW,
                            Action::Deny => policy_action::DENY,
                            Action::Pass => policy_action::PASS,
                        },
                        precedence: base.saturating_sub(i as u16),
                    };
                    for (peer, protocol, port_prefix) in
                        rule_entries(snap, blocks, key, dir, &cr.rule, Some(ids))
                    {
                        entries.push((prefix_of(id, peer, key_dir, protocol, port_prefix), entry));
                        flags |= flag;
                    }
                }
            }
        }

        // One entry per key: the strongest (for NetworkPolicy, all equal: the first rule
        // that produced it names it; the sort is stable).
        entries.sort_by_key(|(k, _)| *k);
        entries.dedup_by(|later, first| {
            if later.0 != first.0 {
                return false;
            }
            if stronger(&later.1, &first.1) {
                first.1 = later.1;
            }
            true
        });
        if !cluster.is_empty() {
            push_down(&mut entries);
        }

        // The revision moves when something allowed before is not any more (or the
        // isolation changed), so conntrack re-judges what it let through; additions
        // alone keep it, and the endpoint entries with it.
        let old = self.subjects.remove(&id);
        let revision = match &old {
            Some(o) if o.flags == flags && is_subset(&o.entries, &entries) => o.revision,
            _ => {
                self.next_revision = self.next_revision.wrapping_add(2) | 1;
                self.next_revision
            }
        };
        // Patch the map with the difference only (both lists are sorted by key).
        let old_entries: &[(PolicyPrefix, PolicyEntry)] = old.as_ref().map_or(&[], |o| &o.entries);
        for (k, _) in old_entries {
            if entries.binary_search_by(|(nk, _)| nk.cmp(k)).is_err() {
                policy.remove(k);
            }
        }
        for (k, v) in &entries {
            if policy.get(k) != Some(v) {
                policy.insert(*k, *v);
            }
        }
        let changed = old.is_none_or(|o| o.flags != flags || o.revision != revision);
        self.subjects.insert(
            id,
            Subject {
                fingerprint: fp,
                uses_blocks,
                named_egress,
                entries,
                flags,
                revision,
            },
        );
        changed
    }
}

/// The trie answers with the longest prefix only, so an entry must already hold the
/// strongest decision of every broader entry that covers it (a port-80 Accept under an
/// all-ports Deny of higher precedence must read Deny). Entries are sorted by key.
fn push_down(entries: &mut [(PolicyPrefix, PolicyEntry)]) {
    // Only entries of one (endpoint, identity, direction) can cover each other, and
    // the sort keeps each such group together.
    let group = |k: &PolicyPrefix| (k.key.endpoint, k.key.identity, k.key.direction);
    for chunk in entries.chunk_by_mut(|a, b| group(&a.0) == group(&b.0)) {
        let before: Vec<(PolicyPrefix, PolicyEntry)> = chunk.to_vec();
        for (k, v) in chunk.iter_mut() {
            for (bk, bv) in &before {
                if bk.prefix_len < k.prefix_len && lookup::covers(bk, k) && stronger(bv, v) {
                    *v = *bv;
                }
            }
        }
    }
}

/// Both sorted by key: every entry of `a` is in `b` with the same value.
fn is_subset(a: &[(PolicyPrefix, PolicyEntry)], b: &[(PolicyPrefix, PolicyEntry)]) -> bool {
    a.iter().all(|(k, v)| {
        b.binary_search_by(|(bk, _)| bk.cmp(k))
            .is_ok_and(|i| b[i].1 == *v)
    })
}

/// The policies that select a subject, in a stable order.
pub fn selecting<'a>(
    snap: &'a Snapshot,
    subject: &'a IdentityKey,
) -> impl Iterator<Item = (&'a String, &'a Policy)> {
    snap.policies
        .iter()
        .filter(move |(_, p)| {
            p.namespace == subject.namespace && p.pod_selector.matches(&subject.labels)
        })
        .map(|(k, p)| (k, p.as_ref()))
}

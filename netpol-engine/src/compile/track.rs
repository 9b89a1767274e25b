//! What changed since the last compile: identities, policies, cluster policies, and
//! the peer resolutions they use.

use std::sync::Arc;

use super::{cluster_peers, CachedCluster, CachedPolicy, Compiler, PodPeer, Resolved};
use crate::index::{IdentityKey, Snapshot};

impl Compiler {
    /// Brings every cached peer resolution up to date with the identities that
    /// appeared and disappeared since the last compile.
    pub(super) fn track_identities(&mut self, snap: &Snapshot) -> bool {
        let removed: Vec<u32> = self
            .known
            .keys()
            .filter(|id| !snap.identities.contains_key(id))
            .copied()
            .collect();
        let added: Vec<(&u32, &IdentityKey)> = snap
            .identities
            .iter()
            .filter(|(id, _)| !self.known.contains_key(id))
            .collect();
        if removed.is_empty() && added.is_empty() {
            return false;
        }
        let mut bumped = 0;
        for (peer, r) in self.peers.iter_mut() {
            let before = r.ids.len();
            r.ids.retain(|id| !removed.contains(id));
            let mut changed = r.ids.len() != before;
            for (id, key) in &added {
                if peer.matches(key) {
                    r.ids.push(**id);
                    changed = true;
                }
            }
            if changed {
                r.ids.sort_unstable();
                r.version = 0; // assigned below
                bumped += 1;
            }
        }
        if bumped > 0 {
            for r in self.peers.values_mut().filter(|r| r.version == 0) {
                self.next_version += 1;
                r.version = self.next_version;
            }
        }
        for id in removed {
            self.known.remove(&id);
        }
        for (id, key) in added {
            self.known.insert(*id, key.clone());
        }
        self.identities_version = self.version();
        true
    }

    /// Returns whether any policy was added, removed or changed.
    pub(super) fn track_policies(&mut self, snap: &Snapshot) -> std::collections::BTreeSet<String> {
        // The namespaces of policies added, removed, edited, or whose peers now
        // resolve differently: only subjects there can be affected.
        let mut changed = std::collections::BTreeSet::new();
        self.policies.retain(|k, c| {
            let keep = snap.policies.contains_key(k);
            if !keep {
                changed.insert(c.policy.namespace.clone());
            }
            keep
        });
        for (key, p) in &snap.policies {
            let same = self
                .policies
                .get(key)
                .is_some_and(|c| Arc::ptr_eq(&c.policy, p) || *c.policy == **p);
            if !same {
                let v = self.version();
                self.policies
                    .insert(key.clone(), CachedPolicy::new(p.clone(), v));
                changed.insert(p.namespace.clone());
            }
        }
        // Resolve every pod peer (cached unless new) and take the effective versions.
        let mut policies = std::mem::take(&mut self.policies);
        for c in policies.values_mut() {
            let before = c.effective;
            c.effective = c.version;
            for peer in &c.peers {
                let v = self.resolve(snap, peer);
                c.effective = c.effective.max(v);
            }
            if c.effective != before {
                changed.insert(c.policy.namespace.clone());
            }
        }
        self.policies = policies;
        changed
    }

    /// Brings the cluster policies' cache up to date; returns whether anything about
    /// them (content, peers' resolution, order) changed.
    pub(super) fn track_cluster(&mut self, snap: &Snapshot) -> bool {
        let mut changed = self.cluster.len() != snap.cluster_policies.len()
            || self
                .cluster
                .keys()
                .any(|k| !snap.cluster_policies.contains_key(k));
        self.cluster
            .retain(|k, _| snap.cluster_policies.contains_key(k));
        for (key, p) in &snap.cluster_policies {
            let same = self
                .cluster
                .get(key)
                .is_some_and(|c| Arc::ptr_eq(&c.policy, p) || *c.policy == **p);
            if !same {
                self.cluster.insert(
                    key.clone(),
                    CachedCluster {
                        policy: p.clone(),
                        peers: cluster_peers(p),
                        base: 0,
                        peers_version: 0,
                    },
                );
                changed = true;
            }
        }
        let mut cluster = std::mem::take(&mut self.cluster);
        for c in cluster.values_mut() {
            let mut v = 0;
            for peer in &c.peers {
                v = v.max(self.resolve(snap, peer));
            }
            changed |= v != c.peers_version;
            c.peers_version = v;
        }
        self.cluster = cluster;
        if changed {
            // Precedence: within each tier, policies in evaluation order, then rules in
            // written order; the first rule evaluated gets the highest number.
            let mut order: Vec<(&String, &CachedCluster)> = self.cluster.iter().collect();
            order.sort_by(|a, b| a.1.policy.order().cmp(&b.1.policy.order()));
            let mut bases = Vec::new();
            let mut next = (None, u16::MAX);
            for (key, c) in order {
                if next.0 != Some(c.policy.tier) {
                    next = (Some(c.policy.tier), u16::MAX);
                }
                bases.push((key.clone(), next.1));
                let rules = c.policy.ingress.len().max(c.policy.egress.len()) as u16;
                next.1 = next.1.saturating_sub(rules.max(1));
            }
            for (key, base) in bases {
                self.cluster.get_mut(&key).expect("listed above").base = base;
            }
            self.cluster_version = self.version();
        }
        changed
    }

    /// The version of `peer`'s resolution, resolving it if it is new.
    fn resolve(&mut self, snap: &Snapshot, peer: &PodPeer) -> u64 {
        if let Some(r) = self.peers.get_mut(peer) {
            r.used = true;
            return r.version;
        }
        let ids: Vec<u32> = snap
            .identities
            .iter()
            .filter(|(_, k)| peer.matches(k))
            .map(|(id, _)| *id)
            .collect();
        let version = self.version();
        self.peers.insert(
            peer.clone(),
            Resolved {
                ids,
                version,
                used: true,
            },
        );
        version
    }
}

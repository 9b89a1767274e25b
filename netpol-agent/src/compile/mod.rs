//! A pure function from a snapshot of the cluster to the desired contents of every
//! map on one node. No I/O, no kernel, no async: NetworkPolicy semantics live here.
//!
//! source ──► index ──► **compile** ──► datapath ──► events
//!
//! Policy entries are keyed by the *subject identity* (pods with equal namespace
//! labels, labels and named ports get identical entries), so 10k pods with 50 label
//! sets need 50 sets of entries, and an endpoint points at its identity's entries.

pub mod cidr;
pub mod lookup;
pub mod ports;
pub mod reference;

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use netpol_common::{
    direction, endpoint_flags, identity, policy_action, CidrEntry, EndpointEntry, IpcacheEntry,
    PolicyEntry, PolicyKey,
};

use crate::index::net::{addr_of, Cidr};
use crate::index::{IdentityKey, Peer, PodKey, Policy, PortRef, Rule, Snapshot};

/// What compile needs to know about the node it compiles for.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    /// `None`: compile every pod as local (simulate, tests).
    pub node: Option<String>,
    /// The node's own addresses (identity HOST).
    pub host_addrs: Vec<IpAddr>,
}

/// A policy trie key with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyPrefix {
    pub key: PolicyKey,
    pub prefix_len: u32,
}

/// Which policy rule a cookie names.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuleRef {
    /// `namespace/name`.
    pub policy: String,
    pub direction: String,
    pub rule: usize,
}

/// The desired contents of every map on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Local pods with an address, by pod key.
    pub endpoints: BTreeMap<PodKey, EndpointEntry>,
    pub ipcache: BTreeMap<Cidr, IpcacheEntry>,
    pub cidrs: BTreeMap<Cidr, CidrEntry>,
    pub policy: BTreeMap<PolicyPrefix, PolicyEntry>,
    pub rules: BTreeMap<u32, RuleRef>,
}

pub fn cookie(policy_id: u32, dir: u8, rule: usize) -> u32 {
    (policy_id << 12) | ((dir as u32) << 11) | (rule as u32 & 0x7ff)
}

pub fn compile(snap: &Snapshot, view: &NodeView) -> Desired {
    let mut out = Desired::default();
    for addr in &view.host_addrs {
        out.ipcache.insert(
            Cidr::host(*addr),
            IpcacheEntry {
                identity: identity::HOST,
                endpoint: 0,
            },
        );
    }
    for pod in snap.pods.values() {
        let id = if pod.host_network {
            identity::HOST
        } else {
            pod.identity
        };
        for ip in &pod.ips {
            out.ipcache.entry(Cidr::host(*ip)).or_insert(IpcacheEntry {
                identity: id,
                endpoint: 0,
            });
        }
    }
    let blocks = cidr::Partition::new(snap);
    for (c, id) in &blocks.prefixes {
        out.cidrs.insert(*c, CidrEntry { identity: *id });
    }

    let mut compiled: BTreeMap<u32, (u32, u32)> = BTreeMap::new(); // identity → (flags, revision)
    for pod in snap.pods.values() {
        if pod.host_network || pod.ips.is_empty() || (view.node.is_some() && pod.node != view.node)
        {
            continue;
        }
        let (flags, revision) = *compiled.entry(pod.identity).or_insert_with(|| {
            let subject = &snap.identities[&pod.identity];
            compile_subject(snap, &blocks, pod.identity, subject, &mut out)
        });
        let audit = if snap.audit_namespaces.contains(&pod.namespace) {
            endpoint_flags::AUDIT
        } else {
            0
        };
        let mut ep = EndpointEntry {
            id: pod.identity,
            flags: flags | audit,
            revision,
            identity: pod.identity,
            ..Default::default()
        };
        for ip in &pod.ips {
            match ip {
                IpAddr::V4(_) => ep.ipv4 = addr_of(*ip),
                IpAddr::V6(_) => ep.ipv6 = addr_of(*ip),
            }
        }
        out.endpoints.insert(pod.key(), ep);
        if let Some(e) = out.ipcache.get_mut(&Cidr::host(pod.ips[0])) {
            e.endpoint = pod.identity;
        }
    }
    out
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

/// Adds the entries of one subject identity; returns its endpoint flags and revision.
fn compile_subject(
    snap: &Snapshot,
    blocks: &cidr::Partition,
    id: u32,
    subject: &IdentityKey,
    out: &mut Desired,
) -> (u32, u32) {
    let mut flags = 0;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for (key, policy) in selecting(snap, subject) {
        let policy_id = snap.policy_ids[key];
        for (dir, isolates, rules, flag) in [
            (
                direction::INGRESS,
                policy.isolates_ingress,
                &policy.ingress,
                endpoint_flags::ISOLATED_INGRESS,
            ),
            (
                direction::EGRESS,
                policy.isolates_egress,
                &policy.egress,
                endpoint_flags::ISOLATED_EGRESS,
            ),
        ] {
            if !isolates {
                continue;
            }
            flags |= flag;
            for (i, rule) in rules.iter().enumerate() {
                let c = cookie(policy_id, dir, i);
                out.rules.insert(
                    c,
                    RuleRef {
                        policy: key.clone(),
                        direction: if dir == direction::INGRESS {
                            "ingress"
                        } else {
                            "egress"
                        }
                        .into(),
                        rule: i,
                    },
                );
                for (peer, protocol, port_prefix) in
                    rule_entries(snap, blocks, policy, subject, dir, rule)
                {
                    let (port_be, bits) = match (protocol, port_prefix) {
                        (None, _) => ([0, 0], PolicyKey::FIXED_BITS),
                        (Some(_), None) => ([0, 0], PolicyKey::PROTO_BITS),
                        (Some(_), Some((port, len))) => {
                            (port.to_be_bytes(), PolicyKey::PROTO_BITS + len as u32)
                        }
                    };
                    let key = PolicyKey {
                        endpoint: id,
                        identity: peer,
                        direction: dir,
                        protocol: protocol.unwrap_or(0),
                        port_be,
                    };
                    let prefix = PolicyPrefix {
                        key,
                        prefix_len: bits,
                    };
                    let entry = PolicyEntry {
                        cookie: c,
                        action: policy_action::ALLOW,
                        precedence: 0,
                    };
                    if let std::collections::btree_map::Entry::Vacant(v) = out.policy.entry(prefix)
                    {
                        prefix.hash(&mut hasher);
                        entry.hash(&mut hasher);
                        v.insert(entry);
                    }
                }
            }
        }
    }
    flags.hash(&mut hasher);
    (flags, (hasher.finish() as u32) | 1)
}

/// (peer identity, protocol (None = any), port prefix (None = any port)) for one rule.
type RuleEntry = (u32, Option<u8>, Option<(u16, u8)>);

fn rule_entries(
    snap: &Snapshot,
    blocks: &cidr::Partition,
    policy: &Policy,
    subject: &IdentityKey,
    dir: u8,
    rule: &Rule,
) -> Vec<RuleEntry> {
    let peers: Vec<u32> = match &rule.peers {
        None => vec![identity::ANY],
        Some(peers) => {
            let mut ids = Vec::new();
            for peer in peers {
                match peer {
                    Peer::Pods { namespaces, pods } => {
                        for (id, key) in &snap.identities {
                            let ns_ok = match namespaces {
                                None => key.namespace == policy.namespace,
                                Some(sel) => sel.matches(&key.namespace_labels),
                            };
                            if ns_ok && pods.matches(&key.labels) {
                                ids.push(*id);
                            }
                        }
                    }
                    Peer::Block { .. } => ids.extend(blocks.identities_of(peer)),
                }
            }
            ids.sort_unstable();
            ids.dedup();
            ids
        }
    };
    let mut out = Vec::new();
    let Some(ports) = &rule.ports else {
        out.extend(peers.iter().map(|p| (*p, None, None)));
        return out;
    };
    for spec in ports {
        match &spec.port {
            None => out.extend(peers.iter().map(|p| (*p, Some(spec.protocol), None))),
            Some(PortRef::Number(start)) => {
                for pfx in ports::range_prefixes(*start, spec.end_port.unwrap_or(*start)) {
                    out.extend(peers.iter().map(|p| (*p, Some(spec.protocol), Some(pfx))));
                }
            }
            Some(PortRef::Name(name)) => {
                // A named port resolves against the destination pod's container ports:
                // the subject's own for ingress, each peer's for egress.
                let resolve = |k: &IdentityKey| -> Vec<u16> {
                    k.named_ports
                        .get(name)
                        .into_iter()
                        .flatten()
                        .filter(|(pr, _)| *pr == spec.protocol)
                        .map(|(_, p)| *p)
                        .collect()
                };
                if dir == direction::INGRESS {
                    for port in resolve(subject) {
                        out.extend(
                            peers
                                .iter()
                                .map(|p| (*p, Some(spec.protocol), Some((port, 16)))),
                        );
                    }
                } else {
                    for peer in &peers {
                        // (key identity, the pod identity that names the port)
                        let targets: Vec<(u32, u32)> = if *peer == identity::ANY {
                            snap.identities.keys().map(|t| (*t, *t)).collect()
                        } else if snap.identities.contains_key(peer) {
                            vec![(*peer, *peer)]
                        } else {
                            // An ipBlock: only the pods in it name ports.
                            blocks
                                .pod_of(*peer)
                                .map(|t| (*peer, t))
                                .into_iter()
                                .collect()
                        };
                        for (key, t) in targets {
                            for port in resolve(&snap.identities[&t]) {
                                out.push((key, Some(spec.protocol), Some((port, 16))));
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;

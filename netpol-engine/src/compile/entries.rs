//! Rules to policy-trie entries: (peer identity, protocol, port prefix) per rule, and
//! the trie key of each.

use netpol_common::{direction, identity, PolicyKey};

use super::{cidr, ports, PodPeer, PolicyPrefix};
use crate::index::{IdentityKey, Peer, PortRef, Rule, Snapshot};

/// The trie key of one entry: protocol `None` = any protocol, port `None` = any port.
pub(super) fn prefix_of(
    endpoint: u32,
    peer: u32,
    direction: u8,
    protocol: Option<u8>,
    port_prefix: Option<(u16, u8)>,
) -> PolicyPrefix {
    let (port_be, bits) = match (protocol, port_prefix) {
        (None, _) => ([0, 0], PolicyKey::FIXED_BITS),
        (Some(_), None) => ([0, 0], PolicyKey::PROTO_BITS),
        (Some(_), Some((port, len))) => (port.to_be_bytes(), PolicyKey::PROTO_BITS + len as u32),
    };
    PolicyPrefix {
        key: PolicyKey {
            endpoint,
            identity: peer,
            direction,
            protocol: protocol.unwrap_or(0),
            port_be,
        },
        prefix_len: bits,
    }
}

/// The policy-trie prefixes one rule contributes to `subject`'s entries in direction
/// `dir`, on its own (before rules are merged by key and precedence): what `lint`
/// compares to find a rule whose flows other rules already allow. `own_namespace` is
/// the namespace a bare podSelector means (a NetworkPolicy's; None for cluster rules).
pub fn rule_prefixes(
    snap: &Snapshot,
    blocks: &cidr::Partition,
    subject: u32,
    dir: u8,
    rule: &Rule,
    own_namespace: Option<&str>,
) -> Vec<PolicyPrefix> {
    let peers = rule.peers.as_ref().map(|peers| {
        let mut ids = Vec::new();
        for peer in peers {
            match peer {
                Peer::Pods { namespaces, pods } => {
                    let pp = PodPeer {
                        own_namespace: own_namespace
                            .filter(|_| namespaces.is_none())
                            .map(str::to_string),
                        namespaces: namespaces.clone(),
                        pods: pods.clone(),
                    };
                    ids.extend(
                        snap.identities
                            .iter()
                            .filter(|(_, k)| pp.matches(k))
                            .map(|(id, _)| *id),
                    );
                }
                Peer::Block { .. } | Peer::Nodes(_) => ids.extend(blocks.identities_of(peer)),
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    });
    rule_entries(snap, blocks, &snap.identities[&subject], dir, rule, peers)
        .into_iter()
        .map(|(peer, protocol, port)| prefix_of(subject, peer, dir, protocol, port))
        .collect()
}

/// (peer identity, protocol (None = any), port prefix (None = any port)) for one rule.
type RuleEntry = (u32, Option<u8>, Option<(u16, u8)>);

pub(super) fn rule_entries(
    snap: &Snapshot,
    blocks: &cidr::Partition,
    subject: &IdentityKey,
    dir: u8,
    rule: &Rule,
    peers: Option<Vec<u32>>,
) -> Vec<RuleEntry> {
    let peers = peers.unwrap_or_else(|| vec![identity::ANY]);
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

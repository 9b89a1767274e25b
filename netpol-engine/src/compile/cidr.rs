//! ipBlocks as CIDR identities. Every `cidr` and `except` boundary becomes a prefix in
//! the CIDR trie; the longest prefix containing an address names the exact set of
//! ipBlocks the address is in, and each distinct set is one CIDR identity. That keeps
//! the per-packet cost at one trie lookup however many ipBlocks overlap, and makes an
//! ipBlock match pod addresses too (the pod's own identity comes from the ipcache).
//!
//! One exception to "identity = set of blocks": an egress rule with a named port and an
//! ipBlock peer allows a port that only the destination pod can name. Then the pods in
//! such blocks get host prefixes whose identity is (set, pod identity), so the rule can
//! allow each of them on its own port.

use std::collections::BTreeMap;

use netpol_common::identity;

use crate::index::net::Cidr;
use crate::index::{Peer, PortRef, Selector, Snapshot};

/// (cidr, except) of one ipBlock, as a comparable key.
type Block = (Cidr, Vec<Cidr>);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Partition {
    /// Every boundary prefix → its CIDR identity (ANY when no block covers it).
    pub prefixes: BTreeMap<Cidr, u32>,
    /// Each block → the CIDR identities whose sets contain it.
    members: BTreeMap<Block, Vec<u32>>,
    /// CIDR identities of pod host prefixes → the pod identity.
    pods: BTreeMap<u32, u32>,
    /// Each `nodes` selector → the host blocks of the matching nodes' addresses.
    nodes: BTreeMap<Selector, Vec<Block>>,
}

impl Partition {
    pub fn new(snap: &Snapshot) -> Partition {
        let mut blocks: Vec<Block> = Vec::new();
        let mut named_port_blocks = false;
        for p in snap.policies.values() {
            for rule in p.egress.iter() {
                named_port_blocks |= rule
                    .ports
                    .iter()
                    .flatten()
                    .any(|s| matches!(s.port, Some(PortRef::Name(_))))
                    && rule
                        .peers
                        .iter()
                        .flatten()
                        .any(|peer| matches!(peer, Peer::Block { .. }));
            }
            for rule in p.ingress.iter().chain(&p.egress) {
                for peer in rule.peers.iter().flatten() {
                    if let Peer::Block { cidr, except } = peer {
                        if cidr.is_v4_mapped_v6() {
                            continue; // matches no packet: nothing to install
                        }
                        let b = (*cidr, except.clone());
                        if !blocks.contains(&b) {
                            blocks.push(b);
                        }
                    }
                }
            }
        }
        // Cluster policies' `networks` peers are blocks without `except`; a `nodes` peer
        // is the host blocks of the matching nodes' addresses.
        let mut nodes: BTreeMap<Selector, Vec<Block>> = BTreeMap::new();
        for p in snap.cluster_policies.values() {
            for r in p.ingress.iter().chain(&p.egress) {
                for peer in r.rule.peers.iter().flatten() {
                    let wanted: Vec<Block> = match peer {
                        Peer::Block { cidr, .. } if cidr.is_v4_mapped_v6() => vec![],
                        Peer::Block { cidr, except } => vec![(*cidr, except.clone())],
                        Peer::Nodes(sel) => {
                            let hosts: Vec<Block> = snap
                                .nodes
                                .values()
                                .filter(|n| sel.matches(&n.labels))
                                .flat_map(|n| n.addresses.iter().map(|a| (Cidr::host(*a), vec![])))
                                .collect();
                            nodes.insert(sel.clone(), hosts.clone());
                            hosts
                        }
                        Peer::Pods { .. } => vec![],
                    };
                    for b in wanted {
                        if !blocks.contains(&b) {
                            blocks.push(b);
                        }
                    }
                }
            }
        }
        blocks.sort();
        let mut boundaries: Vec<Cidr> = blocks
            .iter()
            .flat_map(|(c, ex)| std::iter::once(*c).chain(ex.iter().copied()))
            .collect();
        if !blocks.is_empty() {
            // In the trie an IPv4 address (v4-mapped) lies inside IPv6 prefixes shorter
            // than /96, such as ::/0; this longer prefix (::ffff:0:0/96 there) catches
            // every IPv4 address first, with the set of IPv4 blocks covering it.
            boundaries.push(Cidr::parse("0.0.0.0/0").expect("literal"));
        }
        let mut tags: BTreeMap<Cidr, u32> = BTreeMap::new();
        if named_port_blocks {
            for pod in snap.pods.values().filter(|p| !p.host_network) {
                for ip in &pod.ips {
                    let host = Cidr::host(*ip);
                    if blocks.iter().any(|(c, _)| c.contains(&host)) {
                        tags.insert(host, pod.identity);
                        boundaries.push(host);
                    }
                }
            }
        }
        // An IPv6 prefix inside ::ffff:0:0/96 (an `except`, a pod's v4-mapped address)
        // matches no packet, and its trie key would read as an IPv4 prefix.
        boundaries.retain(|c| !c.is_v4_mapped_v6());
        boundaries.sort();
        boundaries.dedup();

        let mut sets: BTreeMap<(Vec<usize>, Option<u32>), u32> = BTreeMap::new();
        let mut pods = BTreeMap::new();
        let mut prefixes = BTreeMap::new();
        let mut members: BTreeMap<Block, Vec<u32>> = BTreeMap::new();
        for b in &boundaries {
            let set: Vec<usize> = blocks
                .iter()
                .enumerate()
                .filter(|(_, (c, ex))| c.contains(b) && !ex.iter().any(|x| x.contains(b)))
                .map(|(i, _)| i)
                .collect();
            let tag = tags.get(b).copied();
            let id = if set.is_empty() {
                identity::ANY
            } else {
                let next = identity::FIRST_CIDR + sets.len() as u32;
                *sets.entry((set.clone(), tag)).or_insert(next)
            };
            if let (Some(pod), true) = (tag, id != identity::ANY) {
                pods.insert(id, pod);
            }
            prefixes.insert(*b, id);
            for i in set {
                let list = members.entry(blocks[i].clone()).or_default();
                if !list.contains(&id) {
                    list.push(id);
                }
            }
        }
        Partition {
            prefixes,
            members,
            pods,
            nodes,
        }
    }

    /// The CIDR identities an ipBlock peer matches.
    pub fn identities_of(&self, peer: &Peer) -> Vec<u32> {
        match peer {
            Peer::Block { cidr, except } => self
                .members
                .get(&(*cidr, except.clone()))
                .cloned()
                .unwrap_or_default(),
            Peer::Nodes(sel) => {
                let mut ids: Vec<u32> = self
                    .nodes
                    .get(sel)
                    .into_iter()
                    .flatten()
                    .flat_map(|b| self.members.get(b).into_iter().flatten().copied())
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                ids
            }
            Peer::Pods { .. } => vec![],
        }
    }

    /// The pod identity behind a CIDR identity of a pod host prefix.
    pub fn pod_of(&self, cidr_identity: u32) -> Option<u32> {
        self.pods.get(&cidr_identity).copied()
    }
}

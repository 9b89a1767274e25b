//! ipBlocks as CIDR identities. Every `cidr` and `except` boundary becomes a prefix in
//! the CIDR trie; the longest prefix containing an address names the exact set of
//! ipBlocks the address is in, and each distinct set is one CIDR identity. That keeps
//! the per-packet cost at one trie lookup however many ipBlocks overlap, and makes an
//! ipBlock match pod addresses too (the pod's own identity comes from the ipcache).

use std::collections::BTreeMap;

use netpol_common::identity;

use crate::index::net::Cidr;
use crate::index::{Peer, Snapshot};

/// (cidr, except) of one ipBlock, as a comparable key.
type Block = (Cidr, Vec<Cidr>);

pub struct Partition {
    /// Every boundary prefix → its CIDR identity (ANY when no block covers it).
    pub prefixes: BTreeMap<Cidr, u32>,
    /// Each block → the CIDR identities whose sets contain it.
    members: BTreeMap<Block, Vec<u32>>,
}

impl Partition {
    pub fn new(snap: &Snapshot) -> Partition {
        let mut blocks: Vec<Block> = Vec::new();
        for p in snap.policies.values() {
            for rule in p.ingress.iter().chain(&p.egress) {
                for peer in rule.peers.iter().flatten() {
                    if let Peer::Block { cidr, except } = peer {
                        let b = (*cidr, except.clone());
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
            // Keeps IPv4 addresses out of IPv6 prefixes such as ::/0.
            boundaries.push(Cidr::parse("0.0.0.0/0").expect("literal"));
        }
        boundaries.sort();
        boundaries.dedup();

        let mut sets: BTreeMap<Vec<usize>, u32> = BTreeMap::new();
        let mut prefixes = BTreeMap::new();
        let mut members: BTreeMap<Block, Vec<u32>> = BTreeMap::new();
        for b in &boundaries {
            let set: Vec<usize> = blocks
                .iter()
                .enumerate()
                .filter(|(_, (c, ex))| c.contains(b) && !ex.iter().any(|x| x.contains(b)))
                .map(|(i, _)| i)
                .collect();
            let id = if set.is_empty() {
                identity::ANY
            } else {
                let next = identity::FIRST_CIDR + sets.len() as u32;
                *sets.entry(set.clone()).or_insert(next)
            };
            prefixes.insert(*b, id);
            for i in set {
                let list = members.entry(blocks[i].clone()).or_default();
                if !list.contains(&id) {
                    list.push(id);
                }
            }
        }
        Partition { prefixes, members }
    }

    /// The CIDR identities an ipBlock peer matches.
    pub fn identities_of(&self, peer: &Peer) -> Vec<u32> {
        match peer {
            Peer::Block { cidr, except } => self
                .members
                .get(&(*cidr, except.clone()))
                .cloned()
                .unwrap_or_default(),
            Peer::Pods { .. } => vec![],
        }
    }
}

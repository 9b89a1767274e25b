//! The classifier's lookups done in userspace over [`Desired`]: the same keys, the same
//! longest-prefix matching and the same precedence function (`netpol_common::policy`).
//! `simulate` and the differential tests use it; it must agree with the kernel.

use netpol_common::policy::{decide_tiers, lookup_key, Decision, MISS};
use netpol_common::{
    direction, endpoint_flags, identity, Addr, CidrEntry, EndpointEntry, IpcacheEntry, PolicyEntry,
    PolicyKey,
};

use super::{Desired, PolicyPrefix};
use crate::index::net::Cidr;

/// The compiled maps, ready for many lookups: the prefix lengths each trie holds are
/// collected once, so a longest-prefix match tries only those.
pub struct Lookup<'a> {
    d: &'a Desired,
    ipcache_lens: Vec<u8>,
    cidr_lens: Vec<u8>,
    policy_lens: Vec<u32>,
}

fn lengths<T: Ord + Copy>(it: impl Iterator<Item = T>) -> Vec<T> {
    let mut v: Vec<T> = it
        .collect::<std::collections::BTreeSet<T>>()
        .into_iter()
        .collect();
    v.reverse(); // longest first
    v
}

impl<'a> Lookup<'a> {
    pub fn new(d: &'a Desired) -> Lookup<'a> {
        Lookup {
            d,
            ipcache_lens: lengths(d.ipcache.keys().map(|c| c.map_key().1)),
            cidr_lens: lengths(d.cidrs.keys().map(|c| c.map_key().1)),
            policy_lens: lengths(d.policy.keys().map(|k| k.prefix_len)),
        }
    }

    /// The policy decision for `peer` at endpoint `ep` in direction `dir`.
    pub fn decide_at(
        &self,
        ep: &EndpointEntry,
        dir: u8,
        peer: &Addr,
        protocol: u8,
        port: u16,
    ) -> Decision {
        self.hits_at(ep, dir, peer, protocol, port).decision()
    }

    /// What each tier's lookups found (for explaining a decision).
    pub fn hits_at(
        &self,
        ep: &EndpointEntry,
        dir: u8,
        peer: &Addr,
        protocol: u8,
        port: u16,
    ) -> Hits {
        hits(self, ep, dir, peer, protocol, port)
    }
}

impl Tries for Lookup<'_> {
    fn ipcache(&self, addr: &Addr) -> Option<IpcacheEntry> {
        longest(&self.d.ipcache, &self.ipcache_lens, addr).copied()
    }

    fn cidr(&self, addr: &Addr) -> Option<CidrEntry> {
        longest(&self.d.cidrs, &self.cidr_lens, addr).copied()
    }

    fn policy(&self, key: PolicyKey) -> Option<PolicyEntry> {
        let bytes = key_bytes(&key);
        self.policy_lens.iter().find_map(|len| {
            let masked = from_bytes(&mask_bytes(bytes, *len));
            self.d
                .policy
                .get(&PolicyPrefix {
                    key: masked,
                    prefix_len: *len,
                })
                .copied()
        })
    }
}

/// The three tries a judgement reads, each a longest-prefix match: the compiled maps
/// ([`Lookup`]) or a node's live maps (`datapath::live`), so that both are judged by
/// the same code.
pub trait Tries {
    /// `NP_IPCACHE`: who owns `addr`.
    fn ipcache(&self, addr: &Addr) -> Option<IpcacheEntry>;
    /// `NP_CIDRS`: the set of ipBlocks `addr` is in.
    fn cidr(&self, addr: &Addr) -> Option<CidrEntry>;
    /// `NP_POLICY`, for a full-length key.
    fn policy(&self, key: PolicyKey) -> Option<PolicyEntry>;
}

/// The classifier's policy stage (`policy` and `lookup3` in netpol-ebpf) over `tries`:
/// the peer's identities, then three lookups per tier that applies.
pub fn hits<T: Tries + ?Sized>(
    tries: &T,
    ep: &EndpointEntry,
    dir: u8,
    peer: &Addr,
    protocol: u8,
    port: u16,
) -> Hits {
    let (isolated_flag, admin_flag, baseline_flag) = endpoint_flags::of(dir);
    let isolated = ep.flags & isolated_flag != 0;
    let (peer_identity, cidr_identity) = peer_identities(tries, peer);
    let look3 = |dir: u8| {
        let look = |id| {
            tries
                .policy(lookup_key(ep.id, dir, id, protocol, port))
                .unwrap_or(MISS)
        };
        [
            look(peer_identity),
            if cidr_identity != identity::ANY {
                look(cidr_identity)
            } else {
                MISS
            },
            look(identity::ANY),
        ]
    };
    let admin = if ep.flags & admin_flag != 0 {
        look3(dir | direction::ADMIN_TIER)
    } else {
        [MISS; 3]
    };
    let lower = if isolated || ep.flags & baseline_flag != 0 {
        look3(dir)
    } else {
        [MISS; 3]
    };
    Hits {
        peer_identity,
        cidr_identity,
        admin,
        isolated,
        lower,
    }
}

/// What policy knows of an address: its identity from the ipcache (a pod's, the
/// node's, else WORLD) and the CIDR identity of the ipBlocks it lies in (else ANY).
/// Two addresses with equal pairs are judged alike.
pub fn peer_identities<T: Tries + ?Sized>(tries: &T, peer: &Addr) -> (u32, u32) {
    let peer_identity = tries
        .ipcache(peer)
        .map(|e| e.identity)
        .unwrap_or(identity::WORLD);
    let cidr_identity = tries
        .cidr(peer)
        .map(|e| e.identity)
        .unwrap_or(identity::ANY);
    (peer_identity, cidr_identity)
}

impl Lookup<'_> {
    /// [`peer_identities`] on the compiled maps.
    pub fn peer_identities(&self, peer: &Addr) -> (u32, u32) {
        peer_identities(self, peer)
    }
}

impl Hits {
    pub fn decision(&self) -> Decision {
        decide_tiers(&self.admin, self.isolated, &self.lower)
    }
}

/// The raw hits of one judgement: the peer's identities, the Admin tier's three lookups
/// (peer identity, CIDR identity, ANY), whether NetworkPolicy isolates, and the
/// NetworkPolicy/Baseline lookups (absent hits are `MISS`).
pub struct Hits {
    pub peer_identity: u32,
    /// `identity::ANY` when the peer is in no ipBlock boundary.
    pub cidr_identity: u32,
    pub admin: [PolicyEntry; 3],
    pub isolated: bool,
    pub lower: [PolicyEntry; 3],
}

/// Longest-prefix match in a map of CIDRs, trying the lengths `lens` (longest first)
/// over the trie's 128-bit keys, as the kernel does: an IPv4 address also meets IPv6
/// prefixes shorter than /96 there (see `compile::cidr` for why none of them wins).
fn longest<'m, V>(
    map: &'m std::collections::BTreeMap<Cidr, V>,
    lens: &[u8],
    addr: &Addr,
) -> Option<&'m V> {
    lens.iter()
        .find_map(|prefix| map.get(&Cidr::from_map_key(*addr, *prefix)))
}

/// Whether prefix `a` contains every key of prefix `b` (the trie's view).
pub fn covers(a: &PolicyPrefix, b: &PolicyPrefix) -> bool {
    a.prefix_len <= b.prefix_len
        && mask_bytes(key_bytes(&b.key), a.prefix_len)
            == mask_bytes(key_bytes(&a.key), a.prefix_len)
}

fn key_bytes(k: &PolicyKey) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&k.endpoint.to_ne_bytes());
    b[4..8].copy_from_slice(&k.identity.to_ne_bytes());
    b[8] = k.direction;
    b[9] = k.protocol;
    b[10..12].copy_from_slice(&k.port_be);
    b
}

fn from_bytes(b: &[u8; 12]) -> PolicyKey {
    PolicyKey {
        endpoint: u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")),
        identity: u32::from_ne_bytes(b[4..8].try_into().expect("4 bytes")),
        direction: b[8],
        protocol: b[9],
        port_be: [b[10], b[11]],
    }
}

fn mask_bytes(mut b: [u8; 12], bits: u32) -> [u8; 12] {
    for (i, byte) in b.iter_mut().enumerate() {
        let keep = (bits as i32 - (i as i32) * 8).clamp(0, 8);
        *byte &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
    }
    b
}

/// One lookup on `d` (see [`Lookup`] for many).
pub fn decide_at(
    d: &Desired,
    ep: &EndpointEntry,
    dir: u8,
    peer: &Addr,
    protocol: u8,
    port: u16,
) -> Decision {
    Lookup::new(d).decide_at(ep, dir, peer, protocol, port)
}

//! The classifier's lookups done in userspace over [`Desired`]: the same keys, the same
//! longest-prefix matching and the same precedence function (`netpol_common::policy`).
//! `simulate` and the differential tests use it; it must agree with the kernel.

use netpol_common::policy::{decide, lookup_key, Decision};
use netpol_common::{direction, endpoint_flags, identity, Addr, EndpointEntry, PolicyKey};

use super::{Desired, PolicyPrefix};
use crate::index::net::{mask, Cidr};

/// Longest-prefix match in a map of CIDRs.
pub fn longest<'a, V>(map: &'a std::collections::BTreeMap<Cidr, V>, addr: &Addr) -> Option<&'a V> {
    (0..=128u8).rev().find_map(|prefix| {
        map.get(&Cidr {
            addr: mask(*addr, prefix),
            prefix,
        })
    })
}

fn policy_lookup(d: &Desired, key: PolicyKey) -> Option<netpol_common::PolicyEntry> {
    let bytes = key_bytes(&key);
    // Valid prefix lengths: 96 down to 80 (port prefixes), then 72 (any protocol).
    (PolicyKey::PROTO_BITS..=PolicyKey::FULL_BITS)
        .rev()
        .chain([PolicyKey::FIXED_BITS])
        .find_map(|len| {
            let masked = from_bytes(&mask_bytes(bytes, len));
            d.policy
                .get(&PolicyPrefix {
                    key: masked,
                    prefix_len: len,
                })
                .copied()
        })
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

/// The policy decision for `peer` at endpoint `ep` in direction `dir`.
pub fn decide_at(
    d: &Desired,
    ep: &EndpointEntry,
    dir: u8,
    peer: &Addr,
    protocol: u8,
    port: u16,
) -> Decision {
    let flag = if dir == direction::EGRESS {
        endpoint_flags::ISOLATED_EGRESS
    } else {
        endpoint_flags::ISOLATED_INGRESS
    };
    let isolated = ep.flags & flag != 0;
    let peer_id = longest(&d.ipcache, peer)
        .map(|e| e.identity)
        .unwrap_or(identity::WORLD);
    let cidr_id = longest(&d.cidrs, peer)
        .map(|e| e.identity)
        .unwrap_or(identity::ANY);
    let hits = if isolated {
        let look = |id| policy_lookup(d, lookup_key(ep.id, dir, id, protocol, port));
        [
            look(peer_id),
            if cidr_id != identity::ANY {
                look(cidr_id)
            } else {
                None
            },
            look(identity::ANY),
        ]
    } else {
        [None, None, None]
    };
    decide(isolated, hits)
}

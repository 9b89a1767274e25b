//! The policy stage: host traffic, the peer's identities (ipcache and CIDR tries), the
//! policy-trie lookups per tier, and audit mode. The precedence of the hits is
//! `netpol_common::policy::decide_tiers`, the same function the agent's lookup uses.

use aya_ebpf::maps::lpm_trie::Key;
use netpol_common::{
    config_flags, direction, endpoint_flags, identity, policy::decide_tiers, policy::lookup_key,
    policy::MISS, reason, verdict, Addr, Config, EndpointEntry, PolicyKey,
};

use crate::maps::{Scratch, CIDRS, IPCACHE, POLICY, SCRATCH};
use crate::parse::Packet;
use crate::{opposite, Outcome};

/// Whether would-be drops of the check in direction `jdir` pass as AUDIT: node-wide,
/// for the pod's namespace, or (for policy drops only) because only audit-mode
/// policies isolate the pod in that direction.
#[inline(always)]
pub(crate) fn audit_mode(ep: &EndpointEntry, config: &Config, jdir: u8) -> bool {
    (ep.flags & (endpoint_flags::AUDIT | endpoint_flags::audit_of(jdir)) != 0)
        || (config.flags & config_flags::AUDIT != 0)
}

/// Whether a drop for `reason` in the check of `jdir` is audited rather than enforced.
#[inline(always)]
pub(crate) fn audits(ep: &EndpointEntry, config: &Config, jdir: u8, reason: u16) -> bool {
    if (ep.flags & endpoint_flags::AUDIT != 0) || (config.flags & config_flags::AUDIT != 0) {
        return true;
    }
    ep.flags & endpoint_flags::audit_of(jdir) != 0
        && (reason == reason::POLICY_DENIED || reason == reason::POLICY_REVOKED)
}

/// Judges the connection `pkt` belongs to, in its original direction, at endpoint `ep`:
/// host traffic, then policy. `reply`: `pkt` travels against the original direction.
/// Returns `out.verdict` (see [`crate::pipeline`]).
#[inline(never)]
pub(crate) fn verdict_of(
    ep: &EndpointEntry,
    config: &Config,
    pkt: &Packet,
    reply: bool,
    out: &mut Outcome,
) -> u8 {
    judge_connection(ep, config, pkt, reply, out);
    out.verdict
}

#[inline(always)]
fn judge_connection(
    ep: &EndpointEntry,
    config: &Config,
    pkt: &Packet,
    reply: bool,
    out: &mut Outcome,
) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        *out = Outcome::drop(reason::NONE);
        return;
    };
    // SAFETY: per-CPU scratch; the caller's conntrack key is not touched here.
    let scratch = unsafe { &mut *scratch };
    let jdir = if reply { opposite(pkt.dir) } else { pkt.dir };
    let arriving = pkt.dir == direction::INGRESS && !reply;
    scratch.addr.prefix_len = 128;
    scratch.addr.data = if pkt.dir == direction::EGRESS {
        pkt.daddr
    } else if arriving && scratch.svc_client_known != 0 {
        // A Service packet: its client before the masquerade (`service::note_client`).
        scratch.svc_client
    } else {
        pkt.saddr
    };
    let port = if reply { pkt.sport } else { pkt.dport };
    // Host traffic is what the node sends itself: a packet forwarded from outside and
    // masqueraded to the node's address (a NodePort) is not.
    if jdir == direction::INGRESS
        && config.flags & config_flags::ALLOW_HOST != 0
        && (!arriving || scratch.node_sent != 0)
        && is_host(config, &scratch.addr.data)
    {
        *out = Outcome {
            peer_identity: identity::HOST,
            ..Outcome::allow(reason::HOST_TRAFFIC)
        };
        return;
    }
    policy(scratch, ep, jdir, pkt.protocol, port, out);
}

#[inline(always)]
fn policy(
    scratch: &mut Scratch,
    ep: &EndpointEntry,
    dir: u8,
    protocol: u8,
    port: u16,
    out: &mut Outcome,
) {
    // The peer is in `scratch.addr`.
    let peer_identity = match IPCACHE.get(&scratch.addr) {
        Some(e) => e.identity,
        None => identity::WORLD,
    };
    let cidr_identity = match CIDRS.get(&scratch.addr) {
        Some(e) => e.identity,
        None => identity::ANY,
    };
    let (isolated_flag, admin_flag, baseline_flag) = endpoint_flags::of(dir);
    let isolated = ep.flags & isolated_flag != 0;
    scratch.hits = [[MISS; 3]; 2];
    if ep.flags & admin_flag != 0 {
        scratch.policy = Key::new(
            PolicyKey::FULL_BITS,
            lookup_key(
                ep.id,
                dir | direction::ADMIN_TIER,
                peer_identity,
                protocol,
                port,
            ),
        );
        lookup3(scratch, 0, peer_identity, cidr_identity);
    }
    if isolated || ep.flags & baseline_flag != 0 {
        scratch.policy = Key::new(
            PolicyKey::FULL_BITS,
            lookup_key(ep.id, dir, peer_identity, protocol, port),
        );
        lookup3(scratch, 1, peer_identity, cidr_identity);
    }
    let d = decide_tiers(&scratch.hits[0], isolated, &scratch.hits[1]);
    *out = Outcome {
        verdict: if d.allowed {
            verdict::ALLOWED
        } else {
            verdict::DROPPED
        },
        report: 0,
        reply: 0,
        reason: d.reason,
        cookie: d.cookie,
        peer_identity,
    };
}

/// The three policy lookups of one tier (`tier` 0: Admin, 1: the rest) with the key
/// the caller put in `scratch.policy`, into `scratch.hits`: the peer's identity, its
/// CIDR identity (when it falls in an ipBlock boundary), and ANY. Not inlined: the
/// verifier then walks it once per call site instead of once per path through the
/// caller.
#[inline(never)]
fn lookup3(scratch: &mut Scratch, tier: usize, peer_identity: u32, cidr_identity: u32) {
    let tier = if tier == 0 { 0 } else { 1 };
    scratch.policy.data.identity = peer_identity;
    if let Some(e) = POLICY.get(&scratch.policy) {
        scratch.hits[tier][0] = *e;
    }
    if cidr_identity != identity::ANY {
        scratch.policy.data.identity = cidr_identity;
        if let Some(e) = POLICY.get(&scratch.policy) {
            scratch.hits[tier][1] = *e;
        }
    }
    scratch.policy.data.identity = identity::ANY;
    if let Some(e) = POLICY.get(&scratch.policy) {
        scratch.hits[tier][2] = *e;
    }
}

#[inline(always)]
fn is_host(config: &Config, addr: &Addr) -> bool {
    (*addr == config.host_ipv4 && config.host_ipv4 != [0u8; 16])
        || (*addr == config.host_ipv6 && config.host_ipv6 != [0u8; 16])
}

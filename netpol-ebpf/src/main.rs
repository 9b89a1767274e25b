//! The netpol classifier, attached to both sides of every local pod's host veth.
//!
//! One straight pipeline per packet:
//!   parse → (egress: anti-spoofing) → conntrack (forward, then reverse tuple)
//!         → peer identity (ipcache, CIDR trie) → policy lookups → verdict → counters/event
//! `from_pod` (TC ingress of the host veth) judges the pod's egress, `to_pod` (TC
//! egress of the host veth) its ingress. The precedence of policy hits is
//! `netpol_common::policy::decide`, the same function the agent's lookup uses.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use netpol_common::{
    capacity, config_flags, counter_index, ct_flags, direction, endpoint_flags, identity,
    policy::decide, policy::lookup_key, reason, verdict, Addr, CidrEntry, Config, CtEntry, CtKey,
    EndpointEntry, Event, IpcacheEntry, PolicyEntry, PolicyKey, COUNTERS_LEN,
};
use parse::Packet;

#[map(name = "NP_ENDPOINTS")]
static ENDPOINTS: HashMap<u32, EndpointEntry> = HashMap::with_max_entries(capacity::ENDPOINTS, 0);

#[map(name = "NP_IPCACHE")]
static IPCACHE: LpmTrie<Addr, IpcacheEntry> = LpmTrie::with_max_entries(capacity::IPCACHE, 0);

#[map(name = "NP_CIDRS")]
static CIDRS: LpmTrie<Addr, CidrEntry> = LpmTrie::with_max_entries(capacity::CIDRS, 0);

#[map(name = "NP_POLICY")]
static POLICY: LpmTrie<PolicyKey, PolicyEntry> = LpmTrie::with_max_entries(capacity::POLICY, 0);

#[map(name = "NP_CONNTRACK")]
static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::with_max_entries(capacity::CONNTRACK, 0);

#[map(name = "NP_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

#[map(name = "NP_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

#[map(name = "NP_CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Per-CPU scratch space for lookup keys: the BPF stack (512 bytes for the whole call
/// chain) cannot hold them beside the parsed packet.
struct Scratch {
    ct: CtKey,
    addr: Key<Addr>,
    policy: Key<PolicyKey>,
}

#[map(name = "NP_SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    judge(&ctx, direction::EGRESS)
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    judge(&ctx, direction::INGRESS)
}

/// What the pipeline decided, before it is turned into a TC action.
struct Outcome {
    verdict: u8,
    reason: u16,
    cookie: u32,
    peer_identity: u32,
}

impl Outcome {
    const fn allow(reason: u16) -> Self {
        Outcome {
            verdict: verdict::ALLOWED,
            reason,
            cookie: 0,
            peer_identity: 0,
        }
    }
    const fn drop(reason: u16) -> Self {
        Outcome {
            verdict: verdict::DROPPED,
            reason,
            cookie: 0,
            peer_identity: 0,
        }
    }
}

#[inline(always)]
fn judge(ctx: &TcContext, dir: u8) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: map values stay valid for the whole program run.
    let Some(ep) = (unsafe { ENDPOINTS.get(&ifindex) }) else {
        // Not an endpoint we manage (yet): the agent attaches only to known veths.
        return TC_ACT_OK;
    };
    let Some(config) = CONFIG.get(0) else {
        return TC_ACT_SHOT; // cannot happen for an array; never fail open
    };
    let (out, pkt) = match parse::parse(ctx) {
        Ok(Some(p)) => (pipeline(ep, config, dir, &p), p),
        Ok(None) => return TC_ACT_OK, // not IP (ARP) or neighbour discovery
        Err(code) => (Outcome::drop(code), Packet::default()),
    };
    finish(ctx, ep, config, dir, &pkt, out)
}

#[inline(never)]
fn pipeline(ep: &EndpointEntry, config: &Config, dir: u8, pkt: &Packet) -> Outcome {
    if dir == direction::EGRESS && !source_is_own(ep, pkt) {
        return Outcome::drop(reason::SPOOFED_SOURCE);
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Outcome::drop(reason::NONE); // cannot happen for an array; never fail open
    };
    // SAFETY: per-CPU scratch, used by this program run only.
    let scratch = unsafe { &mut *scratch };
    pkt.fill_ct_key(&mut scratch.ct);
    let now = unsafe { bpf_ktime_get_ns() };
    // The check this hook performs, and the one the other side performed.
    let (mine, theirs) = if dir == direction::EGRESS {
        (ct_flags::EGRESS_OK, ct_flags::INGRESS_OK)
    } else {
        (ct_flags::INGRESS_OK, ct_flags::EGRESS_OK)
    };
    if let Some(entry) = CONNTRACK.get_ptr_mut(&scratch.ct) {
        // SAFETY: pointer into the map value, valid for this run.
        unsafe {
            if (*entry).flags & mine != 0 {
                (*entry).last_seen_ns = now;
                return Outcome::allow(reason::CONNTRACK);
            }
        }
    }
    scratch.ct.reverse();
    if let Some(entry) = CONNTRACK.get_ptr_mut(&scratch.ct) {
        // A reply: pass when the hop on this endpoint's side of the original allowed it.
        unsafe {
            if (*entry).flags & theirs != 0 {
                (*entry).last_seen_ns = now;
                (*entry).flags |= ct_flags::SEEN_REPLY;
                return Outcome::allow(reason::CONNTRACK);
            }
        }
    }
    scratch.ct.reverse();

    let peer = if dir == direction::EGRESS {
        &pkt.daddr
    } else {
        &pkt.saddr
    };
    let out = if dir == direction::INGRESS
        && config.flags & config_flags::ALLOW_HOST != 0
        && is_host(config, peer)
    {
        Outcome {
            peer_identity: identity::HOST,
            ..Outcome::allow(reason::HOST_TRAFFIC)
        }
    } else {
        policy(scratch, ep, dir, peer, pkt)
    };
    if out.verdict == verdict::ALLOWED {
        remember(&scratch.ct, mine, ep.revision, dir, now);
    }
    out
}

#[inline(always)]
fn policy(
    scratch: &mut Scratch,
    ep: &EndpointEntry,
    dir: u8,
    peer: &Addr,
    pkt: &Packet,
) -> Outcome {
    scratch.addr = Key::new(128, *peer);
    let peer_identity = match IPCACHE.get(&scratch.addr) {
        Some(e) => e.identity,
        None => identity::WORLD,
    };
    let cidr_identity = match CIDRS.get(&scratch.addr) {
        Some(e) => e.identity,
        None => identity::ANY,
    };
    let isolated_flag = if dir == direction::EGRESS {
        endpoint_flags::ISOLATED_EGRESS
    } else {
        endpoint_flags::ISOLATED_INGRESS
    };
    let isolated = ep.flags & isolated_flag != 0;
    let mut hits = [None, None, None];
    if isolated {
        scratch.policy = Key::new(
            PolicyKey::FULL_BITS,
            lookup_key(ep.id, dir, peer_identity, pkt.protocol, pkt.dport),
        );
        hits[0] = POLICY.get(&scratch.policy).copied();
        if cidr_identity != identity::ANY {
            scratch.policy.data.identity = cidr_identity;
            hits[1] = POLICY.get(&scratch.policy).copied();
        }
        scratch.policy.data.identity = identity::ANY;
        hits[2] = POLICY.get(&scratch.policy).copied();
    }
    let d = decide(isolated, hits);
    Outcome {
        verdict: if d.allowed {
            verdict::ALLOWED
        } else {
            verdict::DROPPED
        },
        reason: d.reason,
        cookie: d.cookie,
        peer_identity,
    }
}

/// Records that this hook's check passed for the connection `key` belongs to.
#[inline(always)]
fn remember(key: &CtKey, mine: u32, revision: u32, dir: u8, now: u64) {
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        unsafe {
            (*entry).flags |= mine;
            (*entry).last_seen_ns = now;
            if dir == direction::EGRESS {
                (*entry).egress_revision = revision;
            } else {
                (*entry).ingress_revision = revision;
            }
        }
        return;
    }
    let mut entry = CtEntry {
        last_seen_ns: now,
        flags: mine,
        ..CtEntry::default()
    };
    if dir == direction::EGRESS {
        entry.egress_revision = revision;
    } else {
        entry.ingress_revision = revision;
    }
    // A full table evicts the least recently used entry; a failed insert only means
    // the next packet is judged by policy again.
    let _ = CONNTRACK.insert(key, &entry, 0);
}

#[inline(always)]
fn source_is_own(ep: &EndpointEntry, pkt: &Packet) -> bool {
    if pkt.family == 4 {
        pkt.saddr == ep.ipv4
    } else {
        pkt.saddr == ep.ipv6 && ep.ipv6 != [0u8; 16]
    }
}

#[inline(always)]
fn is_host(config: &Config, addr: &Addr) -> bool {
    (*addr == config.host_ipv4 && config.host_ipv4 != [0u8; 16])
        || (*addr == config.host_ipv6 && config.host_ipv6 != [0u8; 16])
}

#[inline(always)]
fn finish(
    ctx: &TcContext,
    ep: &EndpointEntry,
    config: &Config,
    dir: u8,
    pkt: &Packet,
    mut out: Outcome,
) -> i32 {
    let audit =
        (ep.flags & endpoint_flags::AUDIT != 0) || (config.flags & config_flags::AUDIT != 0);
    if out.verdict == verdict::DROPPED && audit {
        out.verdict = verdict::AUDIT;
    }
    if let Some(slot) = COUNTERS.get_ptr_mut(counter_index(out.verdict, out.reason, dir)) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
    if out.verdict != verdict::ALLOWED {
        report(ctx, ep, dir, pkt, &out);
    }
    if out.verdict == verdict::DROPPED {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

#[inline(never)]
fn report(ctx: &TcContext, ep: &EndpointEntry, dir: u8, pkt: &Packet, out: &Outcome) {
    let Some(mut slot) = EVENTS.reserve::<Event>(0) else {
        return; // ring full: the counters still hold the exact count
    };
    let (src_identity, dst_identity) = if dir == direction::EGRESS {
        (ep.identity, out.peer_identity)
    } else {
        (out.peer_identity, ep.identity)
    };
    // Written field by field into the ring: an `Event` built on the stack first would
    // not fit the 512-byte BPF stack beside the pipeline.
    let ev = slot.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, exclusively owned record of the right size.
    unsafe {
        (*ev).timestamp_ns = bpf_ktime_get_ns();
        (*ev).ifindex = (*ctx.skb.skb).ifindex;
        (*ev).endpoint = ep.id;
        (*ev).src_identity = src_identity;
        (*ev).dst_identity = dst_identity;
        (*ev).policy_cookie = out.cookie;
        (*ev).revision = ep.revision;
        (*ev).len = ctx.len();
        (*ev).reason = out.reason;
        (*ev).sport = pkt.sport;
        (*ev).dport = pkt.dport;
        (*ev).direction = dir;
        (*ev).verdict = out.verdict;
        (*ev).protocol = pkt.protocol;
        (*ev).tcp_flags = pkt.tcp_flags;
        (*ev).family = pkt.family;
        (*ev)._pad = 0;
        (*ev).saddr = pkt.saddr;
        (*ev).daddr = pkt.daddr;
    }
    slot.submit(0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

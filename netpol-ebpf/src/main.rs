//! The netpol classifier, attached to both sides of every local pod's host veth.
//!
//! One straight pipeline per packet (numbered in [`pipeline`]):
//!   parse → (egress: anti-spoofing) → later fragments: first fragment's verdict
//!         → ICMP errors about tracked connections → conntrack (both tuples, a likely
//!         reply's first) → (egress: to a Service VIP, unless the entry knows it is
//!         not) → revision and audit checks → host traffic → peer identity (ipcache,
//!         CIDR trie) → policy lookups → verdict → counters → event (token bucket)
//! `from_pod` (TC ingress of the host veth) judges the pod's egress, `to_pod` (TC
//! egress of the host veth) its ingress. The precedence of policy hits is
//! `netpol_common::policy::decide_tiers`, the same function the agent's lookup uses.
//!
//! Needs Linux 5.11 (the coarse clock; 5.8 for the BPF ring buffer); see docs/architecture.md.
#![no_std]
// The classifier's one atomic: an add into a map value other CPUs add to as well.
#![feature(asm_experimental_arch)]
#![no_main]

// `trace!(f(args))`: with the `trace` feature (see netpol-ebpf/Cargo.toml), calls the
// aya-log line `trace::f(args)`; without it, nothing at all (the arguments are not even
// evaluated). Defined before the modules so that they can use it too.
#[cfg(feature = "trace")]
macro_rules! trace {
    ($f:ident($($arg:expr),* $(,)?)) => {
        crate::trace::$f($($arg),*)
    };
}
#[cfg(not(feature = "trace"))]
macro_rules! trace {
    ($($arg:tt)*) => {};
}

// Mind the module names: LLVM inlines `#[inline(always)]` functions in the order of
// their mangled names, `<len><name>` per path segment (crate root first, then `4emit`,
// `5parse`, `6policy`, ...), and that order lays out the stack of the functions they are
// inlined into. With `finish` and the counters in a module sorting after `parse` (say
// `report`), `judge` and `after_dnat` get the same instructions with one stack slot
// moved, and the verifier then walks 3.6x the instructions for `from_pod` (473k of its
// 1M limit instead of 133k). After renaming or moving a function, compare the verified
// instruction counts, not only the program sizes.
mod conntrack;
mod emit;
mod fragments;
mod maps;
mod neighbour;
mod parse;
mod policy;
mod service;
#[cfg(feature = "trace")]
mod trace;

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    macros::{cgroup_skb, classifier},
    programs::{SkBuffContext, TcContext},
};
use netpol_common::{counter_index, ct_stamp, direction, reason, verdict, Config, EndpointEntry};
use parse::{frag, Packet};

use conntrack::{
    audit_flag, ct_holding, ct_live, direct, established, holds, note_direct, ok_flag, opens,
    remember,
};
use emit::{count, count_rule, finish};
use maps::{Scratch, CONFIG, ENDPOINTS, SCRATCH};
use policy::{audits, verdict_of};

pub(crate) const NS_PER_SEC: u64 = 1_000_000_000;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    judge(&ctx, direction::EGRESS)
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    // A packet a local pod sent to a Service VIP, DNATed to this pod: the sender's
    // egress first (before anything else, even if this veth is not an endpoint yet).
    service::begin_to_pod(&ctx);
    if service::after_dnat(&ctx) == TC_ACT_SHOT {
        return TC_ACT_SHOT;
    }
    judge(&ctx, direction::INGRESS)
}

/// The pod-start hold: attached by the agent to a new pod's bridge port as soon as the
/// port appears (and put back in place when a port's pod cannot be trusted), replaced
/// in place (same priority and handle) by `from_pod`/`to_pod` once the endpoint is
/// written. Drops every IP packet (counted as `PENDING_ENDPOINT`), and from the pod its
/// ARP, neighbour discovery and MLD too: with no endpoint to hold them to the pod's
/// addresses, they could speak for anyone (the pod's neighbours learn it once it is
/// located; its kernel asks again). Towards the pod they pass.
#[classifier]
pub fn hold_from_pod(ctx: TcContext) -> i32 {
    hold(&ctx, direction::EGRESS)
}

#[classifier]
pub fn hold_to_pod(ctx: TcContext) -> i32 {
    hold(&ctx, direction::INGRESS)
}

#[inline(always)]
fn hold(ctx: &TcContext, dir: u8) -> i32 {
    let mut slot = MaybeUninit::uninit();
    let pkt = Packet::init(&mut slot, dir, 0);
    if parse::parse::<_, true>(ctx, pkt) == parse::SKIP && dir == direction::INGRESS {
        return TC_ACT_OK;
    }
    count(counter_index(
        verdict::DROPPED,
        reason::PENDING_ENDPOINT,
        dir,
    ));
    TC_ACT_SHOT
}

/// TC egress of the overlay and the uplink: deferred egress of packets to a VIP whose
/// backend is on another node.
#[classifier]
pub fn to_remote(ctx: TcContext) -> i32 {
    service::after_dnat(&ctx)
}

/// cgroup_skb ingress of the node's cgroup tree: deferred egress of packets to a VIP
/// whose backend is the node itself, on local delivery.
#[cgroup_skb(ingress)]
pub fn local_in(ctx: SkBuffContext) -> i32 {
    service::local_in(ctx)
}

/// What the pipeline decided, before it is turned into a TC action.
#[derive(Clone, Copy)]
pub(crate) struct Outcome {
    pub(crate) verdict: u8,
    /// 1: report this allow (a sampled new connection).
    pub(crate) report: u8,
    /// 1: the deciding check was the opposite direction's (a reply judged again).
    pub(crate) reply: u8,
    pub(crate) reason: u16,
    pub(crate) cookie: u32,
    pub(crate) peer_identity: u32,
}

impl Outcome {
    pub(crate) const fn allow(reason: u16) -> Self {
        Outcome {
            verdict: verdict::ALLOWED,
            report: 0,
            reply: 0,
            reason,
            cookie: 0,
            peer_identity: 0,
        }
    }
    pub(crate) const fn drop(reason: u16) -> Self {
        Outcome {
            verdict: verdict::DROPPED,
            report: 0,
            reply: 0,
            reason,
            cookie: 0,
            peer_identity: 0,
        }
    }
}

/// Not inlined: its frame (the parsed packet) then sits beside `to_pod`'s Service
/// check instead of under it, which keeps the deepest call chain within 512 bytes.
#[inline(never)]
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
    let mut slot = MaybeUninit::uninit();
    let pkt = Packet::init(&mut slot, dir, ctx.len());
    let mut out = Outcome::drop(reason::NONE);
    match parse::parse::<_, true>(ctx, pkt) {
        parse::PARSED => {
            trace!(parsed(ctx, pkt, ifindex));
            out.verdict = pipeline(ctx, ep, config, pkt, &mut out);
        }
        // ARP, or IPv6 neighbour discovery / MLD: held to the pod's own addresses.
        parse::SKIP => match neighbour::check(ctx, ep, pkt) {
            0 => return TC_ACT_OK,
            code => out = Outcome::drop(code),
        },
        code => out = Outcome::drop(code),
    }
    finish(ctx, ep, config, pkt, out)
}

/// The stamp of a decision made now: the endpoint's revision and the node's epoch, each
/// read once (the agent may rewrite either while the packet runs).
#[inline(always)]
pub(crate) fn stamp_now(ep: &EndpointEntry, config: &Config) -> u64 {
    // SAFETY: both point at map values, valid for the whole program run.
    unsafe {
        ct_stamp(
            core::ptr::read_volatile(&ep.revision),
            core::ptr::read_volatile(&config.epoch),
        )
    }
}

#[inline(always)]
pub(crate) fn opposite(dir: u8) -> u8 {
    if dir == direction::EGRESS {
        direction::INGRESS
    } else {
        direction::EGRESS
    }
}

/// The pipeline, in order:
///  1. anti-spoofing (egress): the source must be one of the pod's addresses
///  2. later fragments follow their first fragment's verdict
///  3. ICMP errors quoting a tracked connection pass
///  4. conntrack, both tuples (the reverse first from a lower port to a higher, as most
///     replies go); at egress, then, a packet to a Service VIP is judged after DNAT
///     (4s); a live entry passes unless the endpoint's policy revision changed since
///     (revocation) or audit ended
///  5. host traffic, then policy (`verdict_of`)
///  6. a first fragment's verdict is remembered for the rest of its datagram
///
/// Returns `out.verdict`, which the caller stores again: a subprogram must not leave
/// the caller's `out` (a stack pointer) in r0 at exit, which LLVM otherwise may (the
/// verifier rejects it), and a constant or unused return value would be optimised away.
#[inline(never)]
fn pipeline(
    ctx: &TcContext,
    ep: &EndpointEntry,
    config: &Config,
    pkt: &Packet,
    out: &mut Outcome,
) -> u8 {
    pipeline_steps(ctx, ep, config, pkt, out);
    out.verdict
}

#[inline(always)]
fn pipeline_steps(
    ctx: &TcContext,
    ep: &EndpointEntry,
    config: &Config,
    pkt: &Packet,
    out: &mut Outcome,
) {
    if pkt.dir == direction::EGRESS {
        if !source_is_own(ep, pkt) {
            *out = Outcome::drop(reason::SPOOFED_SOURCE);
            return;
        }
    } else if !addressed_to_own(ep, pkt) {
        *out = Outcome::drop(reason::MISDIRECTED);
        return;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        *out = Outcome::drop(reason::NONE); // cannot happen for an array; never fail open
        return;
    };
    // SAFETY: per-CPU scratch, used by this program run only.
    let scratch = unsafe { &mut *scratch };
    // The coarse clock (CLOCK_MONOTONIC_COARSE, a tick behind at most): idle timeouts are
    // seconds, and reading the TSC was an eighth of a conntrack hit.
    // SAFETY: a helper without arguments or memory access.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    scratch.ifindex = ifindex;
    scratch.stamp = stamp_now(ep, config);
    if pkt.frag != frag::NONE {
        fragments::set_key(&mut scratch.frag, pkt, ifindex);
    }
    if pkt.frag == frag::LATER {
        *out = fragments::follow_first(&scratch.frag, now);
        trace!(later_fragment(ctx, out));
        return;
    }
    stages(ctx, scratch, ep, config, pkt, out, now);
    if pkt.frag == frag::FIRST {
        fragments::remember_first(&scratch.frag, out, now, ifindex, config.frag_share);
    }
}

/// Steps 3 to 5 of the pipeline.
#[inline(always)]
fn stages(
    ctx: &TcContext,
    scratch: &mut Scratch,
    ep: &EndpointEntry,
    config: &Config,
    pkt: &Packet,
    out: &mut Outcome,
    now: u64,
) {
    let dir = pkt.dir;
    // This hook's check, and the one the other side of the connection performed.
    let (mine, theirs) = (ok_flag(dir), ok_flag(opposite(dir)));

    // 3. An ICMP error about a tracked connection.
    if pkt.icmp == parse::icmp::ERROR && error_sized(pkt) {
        match related(ctx, ep, config, pkt, now) {
            RELATED => {
                trace!(related(ctx));
                *out = Outcome::allow(reason::RELATED);
                return;
            }
            0 => {}
            code => {
                *out = Outcome::drop(code as u16);
                return;
            }
        }
    }

    // 4. Conntrack. A packet in the original direction needs this hook's check; a
    // reply needs the check that was made on this endpoint's side of the original.
    // Both tuples are tried, the reply's first when the packet goes from the lower port
    // to the higher (a server's to an ephemeral one): most replies then cost one lookup
    // of the 40-byte key, not two. Whichever entry answers, the verdict is the same.
    pkt.fill_ct_key(&mut scratch.ct);
    let reply_first = pkt.sport < pkt.dport;
    if reply_first {
        scratch.ct.reverse();
    }
    let mut hit = ct_holding(
        &scratch.ct,
        config,
        now,
        if reply_first { theirs } else { mine },
    );
    let mut reply = reply_first;
    if hit.is_none() {
        scratch.ct.reverse();
        reply = !reply_first;
        hit = ct_holding(&scratch.ct, config, now, if reply { theirs } else { mine });
        if !reply_first {
            scratch.ct.reverse();
        }
    }
    // 4s. To a Service: judged after DNAT unless established (service.rs). Looked up
    // only when the entry does not already know that the packet goes to none.
    let stamp = scratch.stamp;
    // SAFETY: `e` came from a CONNTRACK lookup of this run.
    if dir == direction::EGRESS && !hit.is_some_and(|e| unsafe { direct(e, reply, stamp) }) {
        if service::defers(pkt) != 0 {
            trace!(to_vip(ctx));
            // The entry of the original tuple, unless the reverse one was tried alone.
            let original = if reply && reply_first {
                None
            } else {
                Some(hit.filter(|_| !reply))
            };
            pkt.fill_ct_key(&mut scratch.ct);
            let ifindex = scratch.ifindex;
            service::egress_to_vip(ctx, scratch, ep, config, pkt, ifindex, original, out, now);
            return;
        }
        if let Some(e) = hit {
            // No VIP: the next packets under this stamp skip the lookup.
            // SAFETY: as above.
            unsafe { note_direct(e, reply, stamp) };
        }
    }
    if let Some(e) = hit {
        trace!(ct_hit(ctx, reply));
        established(ep, config, pkt, reply, e, out, now, stamp);
        return;
    }

    // 5. A new connection (or one whose state expired): policy.
    trace!(ct_miss(ctx));
    out.verdict = verdict_of(ep, config, pkt, false, out);
    trace!(policy(ctx, out));
    if pkt.icmp != parse::icmp::TRACKED {
        // ICMP errors and other messages are no connection of their own.
    } else if out.verdict == verdict::ALLOWED {
        if opens(pkt) {
            // At `from_pod`, the VIP lookup above found none.
            let direct = if dir == direction::EGRESS {
                netpol_common::ct_flags::EGRESS_DIRECT
            } else {
                0
            };
            remember(
                &scratch.ct,
                dir,
                scratch.stamp,
                direct,
                out.cookie,
                now,
                scratch.ifindex,
                config.ct_share,
            );
        }
        count_rule(out.cookie, pkt.len);
        // SAFETY: a helper without arguments or memory access.
        if config.sample_allows != 0 && unsafe { bpf_get_prandom_u32() } % config.sample_allows == 0
        {
            out.report = 1;
        }
    } else if out.reason == reason::POLICY_DENIED
        && audits(ep, config, dir, out.reason)
        && opens(pkt)
    {
        // Audit lets the connection through; it is reported once, and enforced again as
        // soon as audit ends (the entry says the check passed by audit only).
        remember(
            &scratch.ct,
            dir,
            scratch.stamp,
            audit_flag(dir),
            0,
            now,
            scratch.ifindex,
            config.ct_share,
        );
    }
}

/// [`related`]: the error is about a connection whose check still holds.
const RELATED: u32 = u32::MAX;

/// Step 3: [`RELATED`], 0 (judge the error as any packet), or a drop reason. An ICMP
/// error travels against the packet it quotes: the quoted tuple as it is names the
/// connection's original direction when that packet was the originator's. Related only
/// to its own flow: the quoted packet was sent by whom the error is for, a pod (no
/// router) errs only about packets it received itself, and the connection's check
/// still holds. A call of its own, for the verifier's sake (see parse.rs).
#[inline(never)]
fn related(ctx: &TcContext, ep: &EndpointEntry, config: &Config, pkt: &Packet, now: u64) -> u32 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch, used by this program run only.
    let scratch = unsafe { &mut *scratch };
    let dir = pkt.dir;
    match parse::parse_quoted(ctx, pkt, &mut scratch.ct) {
        parse::PARSED
            if scratch.ct.saddr == pkt.daddr
                && (dir == direction::INGRESS || scratch.ct.daddr == pkt.saddr) =>
        {
            if let Some(e) = ct_live(&scratch.ct, config, now) {
                // SAFETY: pointer into the map value, valid for this run.
                if unsafe { holds(e, ep, config, scratch.stamp, opposite(dir)) } {
                    return RELATED;
                }
            }
            scratch.ct.reverse();
            if let Some(e) = ct_live(&scratch.ct, config, now) {
                // SAFETY: pointer into the map value, valid for this run.
                if unsafe { holds(e, ep, config, scratch.stamp, dir) } {
                    return RELATED;
                }
            }
            0
        }
        parse::PARSED | parse::SKIP => 0,
        code => code as u32,
    }
}

/// An ICMP error no longer than the senders make them (RFC 1812: 576 bytes of IPv4;
/// RFC 4443: 1280 of IPv6): a longer one carries more than a quote.
#[inline(always)]
fn error_sized(pkt: &Packet) -> bool {
    const ETH: u32 = 14;
    pkt.len <= ETH + if pkt.family == 4 { 576 } else { 1280 }
}

/// The frame's source MAC and the packet's source address are the pod's.
#[inline(always)]
fn source_is_own(ep: &EndpointEntry, pkt: &Packet) -> bool {
    if pkt.smac != ep.mac {
        return false;
    }
    if pkt.family == 4 {
        pkt.saddr == ep.ipv4
    } else {
        pkt.saddr == ep.ipv6 && ep.ipv6 != [0u8; 16]
    }
}

/// A frame for the pod: a group (broadcast, multicast) MAC, or unicast to one of the
/// pod's addresses. Anything else reached its MAC for someone else's address.
#[inline(always)]
fn addressed_to_own(ep: &EndpointEntry, pkt: &Packet) -> bool {
    if pkt.l2_group != 0 {
        return true;
    }
    if pkt.family == 4 {
        pkt.daddr == ep.ipv4
    } else {
        pkt.daddr == ep.ipv6 && ep.ipv6 != [0u8; 16]
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

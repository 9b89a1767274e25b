//! The netpol classifier, attached to both sides of every local pod's host veth.
//!
//! One straight pipeline per packet (numbered in [`pipeline`]):
//!   parse → (egress: anti-spoofing) → later fragments: first fragment's verdict
//!         → ICMP errors about tracked connections → conntrack (forward, then reverse
//!         tuple; revision and audit checks) → host traffic → peer identity (ipcache,
//!         CIDR trie) → policy lookups → verdict → counters → event (token bucket)
//! `from_pod` (TC ingress of the host veth) judges the pod's egress, `to_pod` (TC
//! egress of the host veth) its ingress. The precedence of policy hits is
//! `netpol_common::policy::decide_tiers`, the same function the agent's lookup uses.
//!
//! Needs Linux 5.8 (BPF ring buffer); see docs/architecture.md for why not less.
#![no_std]
#![no_main]

mod parse;
mod service;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::{classifier, map},
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf,
    },
    programs::TcContext,
};
use netpol_common::{
    capacity, config_flags, counter_index, ct_flags, ct_stamp, ct_timeout, direction,
    endpoint_flags, event_counter, identity, policy::decide_tiers, policy::lookup_key,
    policy::MISS, proto, reason, verdict, Addr, CidrEntry, Config, CtEntry, CtKey,
    EndpointCounters, EndpointEntry, Event, EventBucket, FragEntry, FragKey, IpcacheEntry,
    PolicyEntry, PolicyKey, RuleCounter, COUNTERS_MAP_LEN, MAX_EVENT_RATE,
};
use parse::{frag, Packet};

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

#[map(name = "NP_FRAGMENTS")]
static FRAGMENTS: LruHashMap<FragKey, FragEntry> =
    LruHashMap::with_max_entries(capacity::FRAGMENTS, 0);

#[map(name = "NP_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

#[map(name = "NP_EVENT_BUCKETS")]
static EVENT_BUCKETS: LruHashMap<u32, EventBucket> =
    LruHashMap::with_max_entries(capacity::ENDPOINTS, 0);

#[map(name = "NP_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_MAP_LEN, 0);

#[map(name = "NP_RULE_COUNTERS")]
static RULE_COUNTERS: PerCpuHashMap<u32, RuleCounter> =
    PerCpuHashMap::with_max_entries(capacity::RULE_COUNTERS, 0);

#[map(name = "NP_EP_COUNTERS")]
static ENDPOINT_COUNTERS: PerCpuHashMap<u32, EndpointCounters> =
    PerCpuHashMap::with_max_entries(capacity::ENDPOINTS, 0);

#[map(name = "NP_CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Per-CPU scratch space for lookup keys: the BPF stack (512 bytes for the whole call
/// chain) cannot hold them beside the parsed packet.
struct Scratch {
    ct: CtKey,
    addr: Key<Addr>,
    policy: Key<PolicyKey>,
    frag: FragKey,
    /// Policy hits per tier: [0] Admin, [1] NetworkPolicy/Baseline.
    hits: [[PolicyEntry; 3]; 2],
    pending: netpol_common::PendingEntry,
}

#[map(name = "NP_SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

const NS_PER_SEC: u64 = 1_000_000_000;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    judge(&ctx, direction::EGRESS)
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    // A packet a local pod sent to a Service VIP, DNATed to this pod: the sender's
    // egress first (before anything else, even if this veth is not an endpoint yet).
    if service::after_dnat(&ctx) == TC_ACT_SHOT {
        return TC_ACT_SHOT;
    }
    judge(&ctx, direction::INGRESS)
}

/// The pod-start hold: attached by the agent to a new pod's bridge port as soon as the
/// port appears, replaced in place (same priority and handle) by `from_pod`/`to_pod`
/// once the endpoint is written. Drops every IP packet (counted as `PENDING_ENDPOINT`);
/// ARP, IPv6 neighbour discovery and MLD pass, so the link comes up meanwhile.
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
    let mut pkt = Packet {
        dir,
        ..Packet::default()
    };
    if parse::parse(ctx, &mut pkt) == parse::SKIP {
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

/// What the pipeline decided, before it is turned into a TC action.
#[derive(Clone, Copy)]
struct Outcome {
    verdict: u8,
    /// 1: report this allow (a sampled new connection).
    report: u8,
    /// 1: the deciding check was the opposite direction's (a reply judged again).
    reply: u8,
    reason: u16,
    cookie: u32,
    peer_identity: u32,
}

impl Outcome {
    const fn allow(reason: u16) -> Self {
        Outcome {
            verdict: verdict::ALLOWED,
            report: 0,
            reply: 0,
            reason,
            cookie: 0,
            peer_identity: 0,
        }
    }
    const fn drop(reason: u16) -> Self {
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
    let mut pkt = Packet {
        dir,
        len: ctx.len(),
        ..Packet::default()
    };
    let mut out = Outcome::drop(reason::NONE);
    match parse::parse(ctx, &mut pkt) {
        parse::PARSED => {
            out.verdict = pipeline(ctx, ep, config, &pkt, &mut out);
        }
        parse::SKIP => return TC_ACT_OK, // not IP, or IPv6 neighbour discovery / MLD
        code => out = Outcome::drop(code),
    }
    finish(ctx, ep, config, &pkt, out)
}

/// Whether would-be drops of the check in direction `jdir` pass as AUDIT: node-wide,
/// for the pod's namespace, or (for policy drops only) because only audit-mode
/// policies isolate the pod in that direction.
#[inline(always)]
fn audit_mode(ep: &EndpointEntry, config: &Config, jdir: u8) -> bool {
    (ep.flags & (endpoint_flags::AUDIT | endpoint_flags::audit_of(jdir)) != 0)
        || (config.flags & config_flags::AUDIT != 0)
}

/// Whether a drop for `reason` in the check of `jdir` is audited rather than enforced.
#[inline(always)]
fn audits(ep: &EndpointEntry, config: &Config, jdir: u8, reason: u16) -> bool {
    if (ep.flags & endpoint_flags::AUDIT != 0) || (config.flags & config_flags::AUDIT != 0) {
        return true;
    }
    ep.flags & endpoint_flags::audit_of(jdir) != 0
        && (reason == reason::POLICY_DENIED || reason == reason::POLICY_REVOKED)
}

/// The conntrack flag recording that the check in direction `jdir` passed.
#[inline(always)]
fn ok_flag(jdir: u8) -> u32 {
    if jdir == direction::EGRESS {
        ct_flags::EGRESS_OK
    } else {
        ct_flags::INGRESS_OK
    }
}

/// The conntrack flag recording that the check in `jdir` passed by audit mode only.
#[inline(always)]
fn audit_flag(jdir: u8) -> u32 {
    if jdir == direction::EGRESS {
        ct_flags::EGRESS_AUDIT
    } else {
        ct_flags::INGRESS_AUDIT
    }
}

#[inline(always)]
fn opposite(dir: u8) -> u8 {
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
///  4. conntrack, forward tuple then reverse tuple; a live entry passes unless the
///     endpoint's policy revision changed since (revocation) or audit ended
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
    if pkt.dir == direction::EGRESS && !source_is_own(ep, pkt) {
        *out = Outcome::drop(reason::SPOOFED_SOURCE);
        return;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        *out = Outcome::drop(reason::NONE); // cannot happen for an array; never fail open
        return;
    };
    // SAFETY: per-CPU scratch, used by this program run only.
    let scratch = unsafe { &mut *scratch };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if pkt.frag != frag::NONE {
        scratch.frag = FragKey {
            saddr: pkt.saddr,
            daddr: pkt.daddr,
            id: pkt.frag_id,
            ifindex,
            protocol: pkt.frag_proto,
            direction: pkt.dir,
            _pad: [0; 2],
        };
    }
    if pkt.frag == frag::LATER {
        *out = match FRAGMENTS.get_ptr(&scratch.frag) {
            // SAFETY: pointer into the map value, valid for this run.
            Some(f)
                if now.saturating_sub(unsafe { (*f).last_seen_ns })
                    <= ct_timeout::FRAGMENT * NS_PER_SEC =>
            unsafe {
                Outcome {
                    verdict: (*f).verdict,
                    report: 0,
                    reply: 0,
                    reason: if (*f).verdict == verdict::ALLOWED {
                        reason::FRAGMENT
                    } else {
                        (*f).reason
                    },
                    cookie: (*f).cookie,
                    peer_identity: (*f).peer_identity,
                }
            },
            _ => Outcome::drop(reason::FRAGMENT_UNKNOWN),
        };
        return;
    }
    stages(ctx, scratch, ep, config, pkt, out, now);
    if pkt.frag == frag::FIRST {
        let entry = FragEntry {
            last_seen_ns: now,
            verdict: out.verdict,
            _pad: 0,
            reason: out.reason,
            cookie: out.cookie,
            peer_identity: out.peer_identity,
            _pad2: 0,
        };
        // A full table evicts the oldest datagram; its later fragments then drop.
        let _ = FRAGMENTS.insert(&scratch.frag, &entry, 0);
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

    // 3. An ICMP error travels against the packet it quotes: the quoted tuple as it is
    // names the connection's original direction when that packet was the originator's.
    if pkt.icmp == parse::icmp::ERROR {
        match parse::parse_quoted(ctx, pkt, &mut scratch.ct) {
            // The quoted packet was sent by whom the error is for.
            parse::PARSED if scratch.ct.saddr == pkt.daddr => {
                if let Some(e) = ct_live(&scratch.ct, config, now) {
                    // SAFETY: pointer into the map value, valid for this run.
                    if unsafe { (*e).flags } & theirs != 0 {
                        *out = Outcome::allow(reason::RELATED);
                        return;
                    }
                }
                scratch.ct.reverse();
                if let Some(e) = ct_live(&scratch.ct, config, now) {
                    if unsafe { (*e).flags } & mine != 0 {
                        *out = Outcome::allow(reason::RELATED);
                        return;
                    }
                }
            }
            parse::PARSED | parse::SKIP => {}
            code => {
                *out = Outcome::drop(code);
                return;
            }
        }
    }

    // 4. Conntrack. A packet in the original direction needs this hook's check; a
    // reply needs the check that was made on this endpoint's side of the original.
    pkt.fill_ct_key(&mut scratch.ct);
    if dir == direction::EGRESS && service::is_vip(&pkt.daddr) {
        // 4s. To a Service VIP: judged after DNAT unless established (service.rs).
        // SAFETY: the context pointer is valid for the whole program run.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        service::egress_to_vip(ctx, scratch, ep, config, pkt, ifindex, out, now);
        return;
    }
    if let Some(e) = ct_live(&scratch.ct, config, now) {
        if unsafe { (*e).flags } & mine != 0 {
            established(ep, config, pkt, false, e, out, now);
            return;
        }
    }
    scratch.ct.reverse();
    if let Some(e) = ct_live(&scratch.ct, config, now) {
        if unsafe { (*e).flags } & theirs != 0 {
            established(ep, config, pkt, true, e, out, now);
            return;
        }
    }
    scratch.ct.reverse();

    // 5. A new connection (or one whose state expired): policy.
    out.verdict = verdict_of(ep, config, pkt, false, out);
    if pkt.icmp != parse::icmp::TRACKED {
        // ICMP errors and other messages are no connection of their own.
    } else if out.verdict == verdict::ALLOWED {
        remember(
            &scratch.ct,
            dir,
            ct_stamp(ep.revision, config.epoch),
            0,
            out.cookie,
            now,
        );
        count_rule(out.cookie, pkt.len);
        if config.sample_allows != 0 && unsafe { bpf_get_prandom_u32() } % config.sample_allows == 0
        {
            out.report = 1;
        }
    } else if out.reason == reason::POLICY_DENIED && audits(ep, config, dir, out.reason) {
        // Audit lets the connection through; it is reported once, and enforced again as
        // soon as audit ends (the entry says the check passed by audit only).
        remember(
            &scratch.ct,
            dir,
            ct_stamp(ep.revision, config.epoch),
            audit_flag(dir),
            0,
            now,
        );
    }
}

/// A packet of a tracked connection whose check on this endpoint's side passed:
/// passes, unless the endpoint's policy changed since (revocation) or the pass was
/// granted by an audit mode that has ended; then the connection is judged again.
#[inline(always)]
fn established(
    ep: &EndpointEntry,
    config: &Config,
    pkt: &Packet,
    reply: bool,
    e: *mut CtEntry,
    out: &mut Outcome,
    now: u64,
) {
    // The direction in which this endpoint's check of the connection was made.
    let jdir = if reply { opposite(pkt.dir) } else { pkt.dir };
    let audit = audit_mode(ep, config, jdir);
    let stamp = ct_stamp(ep.revision, config.epoch);
    if service::is_service_reply(e, reply, jdir) {
        // SAFETY: as below.
        unsafe {
            ct_touch(e, pkt, reply, now);
            count_rule(cookie_of(e, jdir), pkt.len);
        }
        *out = Outcome::allow(reason::CONNTRACK);
        return;
    }
    // SAFETY: pointer into the map value, valid for this run; concurrent writers on
    // other CPUs can only make fields stale, never invalid.
    unsafe {
        let revision = if jdir == direction::EGRESS {
            (*e).egress_revision
        } else {
            (*e).ingress_revision
        };
        let audited = (*e).flags & audit_flag(jdir) != 0;
        let current = revision == stamp || config.flags & config_flags::KEEP_ESTABLISHED != 0;
        if current && (!audited || audit) {
            ct_touch(e, pkt, reply, now);
            *out = Outcome::allow(reason::CONNTRACK);
            count_rule(cookie_of(e, jdir), pkt.len);
            return;
        }
        out.verdict = verdict_of(ep, config, pkt, reply, out);
        out.reply = reply as u8;
        if out.verdict == verdict::ALLOWED {
            set_revision(e, jdir, stamp);
            set_cookie(e, jdir, out.cookie);
            (*e).flags &= !audit_flag(jdir);
            ct_touch(e, pkt, reply, now);
            count_rule(out.cookie, pkt.len);
            return;
        }
        if !audited {
            out.reason = reason::POLICY_REVOKED;
        }
        if audits(ep, config, jdir, out.reason) {
            // Reported once as AUDIT, then quiet until the policy changes again.
            set_revision(e, jdir, stamp);
            (*e).flags |= audit_flag(jdir);
            ct_touch(e, pkt, reply, now);
        }
    }
}

#[inline(always)]
unsafe fn set_cookie(e: *mut CtEntry, jdir: u8, cookie: u32) {
    if jdir == direction::EGRESS {
        (*e).egress_cookie = cookie;
    } else {
        (*e).ingress_cookie = cookie;
    }
}

#[inline(always)]
unsafe fn cookie_of(e: *const CtEntry, jdir: u8) -> u32 {
    if jdir == direction::EGRESS {
        (*e).egress_cookie
    } else {
        (*e).ingress_cookie
    }
}

#[inline(always)]
unsafe fn set_revision(e: *mut CtEntry, jdir: u8, revision: u32) {
    if jdir == direction::EGRESS {
        (*e).egress_revision = revision;
    } else {
        (*e).ingress_revision = revision;
    }
}

/// Idle timeout of a connection in its current state.
#[inline(always)]
fn timeout_ns(config: &Config, protocol: u8, flags: u32) -> u64 {
    let (configured, default) = match protocol {
        proto::TCP => {
            if flags & ct_flags::RST != 0
                || flags & (ct_flags::FIN_ORIG | ct_flags::FIN_REPLY)
                    == ct_flags::FIN_ORIG | ct_flags::FIN_REPLY
            {
                (config.ct_tcp_close_ns, ct_timeout::TCP_CLOSE)
            } else if flags & ct_flags::SEEN_REPLY != 0 {
                (config.ct_tcp_established_ns, ct_timeout::TCP_ESTABLISHED)
            } else {
                (config.ct_tcp_syn_ns, ct_timeout::TCP_SYN)
            }
        }
        proto::ICMP | proto::ICMPV6 => (config.ct_icmp_ns, ct_timeout::ICMP),
        _ => (config.ct_udp_ns, ct_timeout::UDP),
    };
    if configured != 0 {
        configured
    } else {
        default * NS_PER_SEC
    }
}

/// The conntrack entry for `key` unless it has timed out (an expired entry is removed
/// and is a miss).
#[inline(always)]
fn ct_live(key: &CtKey, config: &Config, now: u64) -> Option<*mut CtEntry> {
    let e = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: pointer into the map value, valid for this run.
    let (last, flags) = unsafe { ((*e).last_seen_ns, (*e).flags) };
    if now.saturating_sub(last) > timeout_ns(config, key.protocol, flags) {
        let _ = CONNTRACK.remove(key);
        return None;
    }
    Some(e)
}

/// Advances the TCP state and the idle clock of a connection for one of its packets.
#[inline(always)]
unsafe fn ct_touch(e: *mut CtEntry, pkt: &Packet, reply: bool, now: u64) {
    let mut flags = (*e).flags;
    if pkt.protocol == proto::TCP {
        const FIN: u8 = 0x01;
        const SYN: u8 = 0x02;
        const RST: u8 = 0x04;
        const ACK: u8 = 0x10;
        let closing = ct_flags::RST | ct_flags::FIN_ORIG | ct_flags::FIN_REPLY;
        if !reply && pkt.tcp_flags & (SYN | ACK) == SYN && flags & closing != 0 {
            // A new connection reusing the tuple of a closed one.
            flags &= !(closing | ct_flags::SEEN_REPLY);
        }
        if pkt.tcp_flags & RST != 0 {
            flags |= ct_flags::RST;
        }
        if pkt.tcp_flags & FIN != 0 {
            flags |= if reply {
                ct_flags::FIN_REPLY
            } else {
                ct_flags::FIN_ORIG
            };
        }
    }
    if reply {
        flags |= ct_flags::SEEN_REPLY;
    }
    (*e).flags = flags;
    (*e).last_seen_ns = now;
}

/// Judges the connection `pkt` belongs to, in its original direction, at endpoint `ep`:
/// host traffic, then policy. `reply`: `pkt` travels against the original direction.
/// Returns `out.verdict` (see [`pipeline`]).
#[inline(never)]
fn verdict_of(
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
    let peer = if pkt.dir == direction::EGRESS {
        &pkt.daddr
    } else {
        &pkt.saddr
    };
    let port = if reply { pkt.sport } else { pkt.dport };
    if jdir == direction::INGRESS
        && config.flags & config_flags::ALLOW_HOST != 0
        && is_host(config, peer)
    {
        *out = Outcome {
            peer_identity: identity::HOST,
            ..Outcome::allow(reason::HOST_TRAFFIC)
        };
        return;
    }
    policy(scratch, ep, jdir, peer, pkt.protocol, port, out);
}

#[inline(always)]
fn policy(
    scratch: &mut Scratch,
    ep: &EndpointEntry,
    dir: u8,
    peer: &Addr,
    protocol: u8,
    port: u16,
    out: &mut Outcome,
) {
    scratch.addr = Key::new(128, *peer);
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
/// CIDR identity (when it falls in an ipBlock boundary), and ANY. Not inlined: the verifier then walks it once per call site
/// instead of once per path through the caller.
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

/// Records that the check in direction `jdir` passed for the connection `key` names
/// (`audited`: by audit mode only), and the rule that allowed it (`cookie`).
#[inline(always)]
fn remember(key: &CtKey, jdir: u8, revision: u32, audited: u32, cookie: u32, now: u64) {
    let ok = ok_flag(jdir);
    if let Some(e) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: pointer into the map value, valid for this run.
        unsafe {
            (*e).flags = ((*e).flags & !audit_flag(jdir)) | ok | audited;
            (*e).last_seen_ns = now;
            set_revision(e, jdir, revision);
            set_cookie(e, jdir, cookie);
        }
        return;
    }
    let mut entry = CtEntry {
        last_seen_ns: now,
        flags: ok | audited,
        ..CtEntry::default()
    };
    if jdir == direction::EGRESS {
        entry.egress_revision = revision;
        entry.egress_cookie = cookie;
    } else {
        entry.ingress_revision = revision;
        entry.ingress_cookie = cookie;
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
fn count(slot: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// One allowed packet of `len` bytes for the rule `cookie` names (0: no rule).
#[inline(always)]
fn count_rule(cookie: u32, len: u32) {
    if cookie == 0 {
        return;
    }
    match RULE_COUNTERS.get_ptr_mut(&cookie) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        Some(c) => unsafe {
            (*c).packets += 1;
            (*c).bytes += len as u64;
        },
        None => count(event_counter::RULE_UNCOUNTED),
    }
}

/// One dropped or audited packet of `len` bytes at endpoint `id`.
#[inline(always)]
fn count_endpoint(id: u32, verdict: u8, dir: u8, len: u32) {
    let slot = EndpointCounters::slot(verdict, dir) & 3;
    match ENDPOINT_COUNTERS.get_ptr_mut(&id) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        Some(c) => unsafe {
            (*c).packets[slot] += 1;
            (*c).bytes[slot] += len as u64;
        },
        None => count(event_counter::ENDPOINT_UNCOUNTED),
    }
}

#[inline(always)]
fn finish(
    ctx: &TcContext,
    ep: &EndpointEntry,
    config: &Config,
    pkt: &Packet,
    mut out: Outcome,
) -> i32 {
    let jdir = if out.reply != 0 {
        opposite(pkt.dir)
    } else {
        pkt.dir
    };
    if out.verdict == verdict::DROPPED && audits(ep, config, jdir, out.reason) {
        out.verdict = verdict::AUDIT;
    }
    count(counter_index(out.verdict, out.reason, pkt.dir));
    if out.verdict != verdict::ALLOWED {
        count_endpoint(ep.id, out.verdict, pkt.dir, pkt.len);
    }
    if out.verdict != verdict::ALLOWED || out.report != 0 || config.flags & config_flags::TRACE != 0
    {
        report(ctx, ep, pkt, &out);
    }
    if out.verdict == verdict::DROPPED {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

/// Takes one token from the endpoint's event bucket: the events refused since the last
/// token was taken (reset to 0), or `None` when the bucket is empty (this event is
/// refused and counted in the bucket).
#[inline(always)]
fn take_token(ifindex: u32, now: u64) -> Option<u32> {
    let config = CONFIG.get(0)?;
    let rate = config.event_rate as u64;
    if rate == 0 {
        return Some(0);
    }
    let rate = if rate > MAX_EVENT_RATE as u64 {
        MAX_EVENT_RATE as u64
    } else {
        rate
    };
    let burst = match config.event_burst as u64 {
        0 => rate,
        b if b > MAX_EVENT_RATE as u64 => MAX_EVENT_RATE as u64,
        b => b,
    };
    let cap = burst * NS_PER_SEC;
    let Some(b) = EVENT_BUCKETS.get_ptr_mut(&ifindex) else {
        let fresh = EventBucket {
            last_ns: now,
            tokens: cap - NS_PER_SEC,
            suppressed: 0,
            _pad: 0,
        };
        let _ = EVENT_BUCKETS.insert(&ifindex, &fresh, 0);
        return Some(0);
    };
    // SAFETY: pointer into the map value, valid for this run. CPUs race on the bucket;
    // a lost update can only let a few more events through, never fewer.
    unsafe {
        let elapsed = now.saturating_sub((*b).last_ns);
        // elapsed * rate < cap <= 1e15 when it is computed: no overflow.
        let mut tokens = if elapsed >= cap / rate {
            cap
        } else {
            (*b).tokens + elapsed * rate
        };
        if tokens > cap {
            tokens = cap;
        }
        (*b).last_ns = now;
        if tokens >= NS_PER_SEC {
            (*b).tokens = tokens - NS_PER_SEC;
            let suppressed = (*b).suppressed;
            (*b).suppressed = 0;
            Some(suppressed)
        } else {
            (*b).tokens = tokens;
            (*b).suppressed = (*b).suppressed.saturating_add(1);
            None
        }
    }
}

#[inline(never)]
fn report(ctx: &TcContext, ep: &EndpointEntry, pkt: &Packet, out: &Outcome) {
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(suppressed) = take_token(ifindex, now) else {
        count(event_counter::RATE_LIMITED);
        return;
    };
    let Some(mut slot) = EVENTS.reserve::<Event>(0) else {
        count(event_counter::RING_FULL); // the verdict counters still hold the exact count
        return;
    };
    let dir = pkt.dir;
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
        (*ev).timestamp_ns = now;
        (*ev).ifindex = ifindex;
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
        (*ev).suppressed = suppressed;
        (*ev)._pad2 = 0;
    }
    slot.submit(0);
    count(event_counter::SENT);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

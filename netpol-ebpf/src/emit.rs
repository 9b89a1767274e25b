//! What the classifier emits once a verdict is made: audit mode turns drops into AUDIT,
//! the counters (per verdict and reason, per rule, per endpoint), an event into the ring
//! (token bucket per endpoint), and the TC action. (Named so that it sorts before
//! `parse`: see the note on the modules in main.rs.)

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
};
use netpol_common::{
    config_flags, counter_index, direction, event_counter, verdict, Config, EndpointCounters,
    EndpointEntry, Event, EventBucket, MAX_EVENT_RATE,
};

use crate::maps::{CONFIG, COUNTERS, ENDPOINT_COUNTERS, EVENTS, EVENT_BUCKETS, RULE_COUNTERS};
use crate::parse::{Frame, Packet};
use crate::policy::audits;
use crate::{opposite, Outcome, NS_PER_SEC};

#[inline(always)]
pub(crate) fn count(slot: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// One allowed packet of `len` bytes for the rule `cookie` names (0: no rule).
#[inline(always)]
pub(crate) fn count_rule(cookie: u32, len: u32) {
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
        // SAFETY: per-CPU value, no concurrent writer on this CPU; `slot` is masked to
        // the arrays' bounds.
        Some(c) => unsafe {
            (*c).packets[slot] += 1;
            (*c).bytes[slot] += len as u64;
        },
        None => count(event_counter::ENDPOINT_UNCOUNTED),
    }
}

#[inline(always)]
pub(crate) fn finish<C: Frame>(
    ctx: &C,
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
        report(ctx.event_ifindex(), ep, pkt, &out);
    }
    trace!(action(ctx, &out));
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
fn report(ifindex: u32, ep: &EndpointEntry, pkt: &Packet, out: &Outcome) {
    // The bucket on the coarse clock (a tick is fine for a rate per second); the event's
    // own time, only for an event sent, on the precise one.
    // SAFETY: a helper without arguments or memory access.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
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
        (*ev).timestamp_ns = bpf_ktime_get_ns();
        (*ev).ifindex = ifindex;
        (*ev).endpoint = ep.id;
        (*ev).src_identity = src_identity;
        (*ev).dst_identity = dst_identity;
        (*ev).policy_cookie = out.cookie;
        (*ev).revision = ep.revision;
        (*ev).len = pkt.len;
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

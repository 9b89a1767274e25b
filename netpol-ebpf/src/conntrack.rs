//! Conntrack: live-entry lookups with idle timeouts, the TCP state a packet advances,
//! the per-direction checks an entry records (flags, revision stamps, rule cookies),
//! and the re-check of an established connection after a policy change.

use aya_ebpf::bindings::BPF_NOEXIST;
use core::mem::MaybeUninit;

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use aya_ebpf::maps::HashMap;
use netpol_common::{
    config_flags, ct_flags, ct_timeout_ns, direction, event_counter, proto, reason, verdict,
    Config, CtEntry, CtKey, EndpointEntry,
};

use crate::emit::{count, count_rule};
use crate::maps::{CONNTRACK, CT_HELD, FRAG_HELD, SCRATCH, SCRATCH_PACKET};
use crate::parse::{zeroed_in, Packet};
use crate::policy::{audit_mode, audits, verdict_of};
use crate::{opposite, service, Outcome};

/// The conntrack flag recording that the check in direction `jdir` passed.
#[inline(always)]
pub(crate) fn ok_flag(jdir: u8) -> u32 {
    if jdir == direction::EGRESS {
        ct_flags::EGRESS_OK
    } else {
        ct_flags::INGRESS_OK
    }
}

/// The conntrack flag recording that the check in `jdir` passed by audit mode only.
#[inline(always)]
pub(crate) fn audit_flag(jdir: u8) -> u32 {
    if jdir == direction::EGRESS {
        ct_flags::EGRESS_AUDIT
    } else {
        ct_flags::INGRESS_AUDIT
    }
}

/// Step 4 on one tuple: its live entry, if the check `needed` holds in it.
#[inline(always)]
pub(crate) fn ct_holding(
    key: &CtKey,
    config: &Config,
    now: u64,
    needed: u32,
) -> Option<*mut CtEntry> {
    let e = ct_live(key, config, now)?;
    // SAFETY: pointer into the map value (from `ct_live`), valid for this run.
    (unsafe { (*e).flags } & needed != 0).then_some(e)
}

/// A packet of a tracked connection whose check on this endpoint's side passed:
/// passes, unless the endpoint's policy changed since (revocation) or the pass was
/// granted by an audit mode that has ended; then the connection is judged again.
#[inline(always)]
pub(crate) fn established(
    ep: &EndpointEntry,
    config: &Config,
    pkt: &Packet,
    reply: bool,
    e: *mut CtEntry,
    out: &mut Outcome,
    now: u64,
    stamp: u64,
) {
    // The direction in which this endpoint's check of the connection was made.
    let jdir = if reply { opposite(pkt.dir) } else { pkt.dir };
    let audit = audit_mode(ep, config, jdir);
    if service::is_service_reply(e, reply, jdir) {
        // SAFETY: `e` came from `ct_live` (a CONNTRACK lookup that returned Some); map
        // values stay valid for the whole program run.
        unsafe {
            if !holds(e, ep, config, stamp, jdir) {
                // The client's egress changed since: judged again against the backend.
                service_reply_again(ep, config, pkt, e, out);
                return;
            }
            ct_touch(e, pkt, reply, now);
            count_rule(cookie_of(e, jdir), pkt.len);
        }
        *out = Outcome::allow(reason::CONNTRACK);
        return;
    }
    // SAFETY: pointer into the map value, valid for this run; concurrent writers on
    // other CPUs can only make fields stale, never invalid.
    unsafe {
        let stamped = if jdir == direction::EGRESS {
            (*e).egress_stamp
        } else {
            (*e).ingress_stamp
        };
        let audited = (*e).flags & audit_flag(jdir) != 0;
        let current = stamped == stamp || config.flags & config_flags::KEEP_ESTABLISHED != 0;
        if current && (!audited || audit) {
            ct_touch(e, pkt, reply, now);
            *out = Outcome::allow(reason::CONNTRACK);
            count_rule(cookie_of(e, jdir), pkt.len);
            return;
        }
        out.verdict = verdict_of(ep, config, pkt, reply, out);
        out.reply = reply as u8;
        if out.verdict == verdict::ALLOWED {
            set_stamp(e, jdir, stamp);
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
            set_stamp(e, jdir, stamp);
            (*e).flags |= audit_flag(jdir);
            ct_touch(e, pkt, reply, now);
        }
    }
}

/// A Service reply whose client's egress check no longer holds: judged again as the
/// client's packet to the backend the check was made for; allowed, the check is renewed;
/// denied or the backend unknown, the reply drops as `POLICY_REVOKED`.
///
/// # Safety
/// `e` must point at a live CONNTRACK value (from a lookup in this program run).
#[inline(never)]
unsafe fn service_reply_again(
    ep: &EndpointEntry,
    config: &Config,
    pkt: &Packet,
    e: *mut CtEntry,
    out: &mut Outcome,
) {
    *out = Outcome::drop(reason::POLICY_REVOKED);
    out.reply = 1;
    if service::reply_backend(pkt) == 0 {
        return;
    }
    let (Some(forward), Some(scratch)) = (SCRATCH_PACKET.get_ptr(0), SCRATCH.get_ptr(0)) else {
        return;
    };
    out.verdict = verdict_of(ep, config, &*forward, false, out);
    out.reply = 1;
    if out.verdict != verdict::ALLOWED {
        out.reason = reason::POLICY_REVOKED;
        return;
    }
    set_stamp(e, direction::EGRESS, (*scratch).stamp);
    set_cookie(e, direction::EGRESS, out.cookie);
    (*e).flags &= !ct_flags::EGRESS_AUDIT;
    ct_touch(e, pkt, true, bpf_ktime_get_coarse_ns());
    count_rule(out.cookie, pkt.len);
    out.reason = reason::CONNTRACK;
}

/// Whether the check in `jdir` recorded in `e` passed and still holds: made under this
/// run's stamp (or established connections are kept), and not by an audit mode that
/// has ended since.
///
/// # Safety
/// `e` must point at a live CONNTRACK value (from a lookup in this program run).
#[inline(always)]
pub(crate) unsafe fn holds(
    e: *const CtEntry,
    ep: &EndpointEntry,
    config: &Config,
    stamp: u64,
    jdir: u8,
) -> bool {
    let flags = (*e).flags;
    if flags & ok_flag(jdir) == 0 {
        return false;
    }
    let stamped = if jdir == direction::EGRESS {
        (*e).egress_stamp
    } else {
        (*e).ingress_stamp
    };
    let current = stamped == stamp || config.flags & config_flags::KEEP_ESTABLISHED != 0;
    current && (flags & audit_flag(jdir) == 0 || audit_mode(ep, config, jdir))
}

/// # Safety
/// `e` must point at a live CONNTRACK value (from a lookup in this program run).
#[inline(always)]
pub(crate) unsafe fn set_cookie(e: *mut CtEntry, jdir: u8, cookie: u32) {
    if jdir == direction::EGRESS {
        (*e).egress_cookie = cookie;
    } else {
        (*e).ingress_cookie = cookie;
    }
}

/// # Safety
/// `e` must point at a live CONNTRACK value (from a lookup in this program run).
#[inline(always)]
pub(crate) unsafe fn cookie_of(e: *const CtEntry, jdir: u8) -> u32 {
    if jdir == direction::EGRESS {
        (*e).egress_cookie
    } else {
        (*e).ingress_cookie
    }
}

/// A check in `jdir` made under `stamp`. What was known under the old stamp about
/// Service addresses is not known under the new one (`ct_flags::EGRESS_DIRECT`).
///
/// # Safety
/// `e` must point at a live CONNTRACK value (from a lookup in this program run).
#[inline(always)]
pub(crate) unsafe fn set_stamp(e: *mut CtEntry, jdir: u8, stamp: u64) {
    if jdir == direction::EGRESS {
        (*e).egress_stamp = stamp;
    } else {
        (*e).ingress_stamp = stamp;
    }
    (*e).flags &= !direct_flag(jdir);
}

/// The flag recording that the `from_pod` packets under the check in `jdir` go to no
/// Service address (see `ct_flags::EGRESS_DIRECT`).
#[inline(always)]
fn direct_flag(jdir: u8) -> u32 {
    if jdir == direction::EGRESS {
        ct_flags::EGRESS_DIRECT
    } else {
        ct_flags::INGRESS_DIRECT
    }
}

/// At `from_pod`: whether a packet of the connection `e` (`reply`: in its reply
/// direction) is known to go to no Service address, so that it needs no VIP lookup: the
/// check it passes under is stamped `stamp` (this run's), and a VIP lookup under that
/// stamp found none.
///
/// # Safety
/// `e` must point at a live CONNTRACK value (from a lookup in this program run).
#[inline(always)]
pub(crate) unsafe fn direct(e: *const CtEntry, reply: bool, stamp: u64) -> bool {
    let (jdir, stamped) = if reply {
        (direction::INGRESS, (*e).ingress_stamp)
    } else {
        (direction::EGRESS, (*e).egress_stamp)
    };
    (*e).flags & direct_flag(jdir) != 0 && stamped == stamp
}

/// At `from_pod`, after a VIP lookup found none for a packet of `e`: later packets
/// under the same stamp skip it (see [`direct`]). Written once per stamp.
///
/// # Safety
/// `e` must point at a live CONNTRACK value (from a lookup in this program run).
#[inline(always)]
pub(crate) unsafe fn note_direct(e: *mut CtEntry, reply: bool, stamp: u64) {
    let (jdir, stamped) = if reply {
        (direction::INGRESS, (*e).ingress_stamp)
    } else {
        (direction::EGRESS, (*e).egress_stamp)
    };
    if stamped == stamp && (*e).flags & direct_flag(jdir) == 0 {
        (*e).flags |= direct_flag(jdir);
    }
}

/// The conntrack entry for `key` unless it has timed out (an expired entry is removed
/// and is a miss).
#[inline(always)]
pub(crate) fn ct_live(key: &CtKey, config: &Config, now: u64) -> Option<*mut CtEntry> {
    let e = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: pointer into the map value, valid for this run.
    let (last, flags) = unsafe { ((*e).last_seen_ns, (*e).flags) };
    if now.saturating_sub(last) > ct_timeout_ns(config, key.protocol, flags) {
        // Its owner's share is given back by the agent's sweep (which counts what each
        // endpoint really holds), not here: most entries expire unseen anyway.
        let _ = CONNTRACK.remove(key);
        return None;
    }
    Some(e)
}

/// Whether a packet may start tracking a connection: TCP only from its initial SYN, so
/// that neither a flood of ACKs nor a connection whose state was lost mints entries
/// (such a packet is still judged, and passes untracked if policy allows it); other
/// protocols from any packet.
#[inline(always)]
pub(crate) fn opens(pkt: &Packet) -> bool {
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    pkt.protocol != proto::TCP || pkt.tcp_flags & (SYN | ACK | RST) == SYN
}

/// Advances the TCP state and the idle clock of a connection for one of its packets.
///
/// # Safety
/// `e` must point at a live CONNTRACK value (from a lookup in this program run).
#[inline(always)]
pub(crate) unsafe fn ct_touch(e: *mut CtEntry, pkt: &Packet, reply: bool, now: u64) {
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
    // Written only when they change: a store on every packet bounces the entry's cache
    // line between the CPUs of a busy connection. The idle clock moves in steps of
    // `TOUCH_STEP_NS`, so an entry may expire up to that much early.
    if (*e).flags != flags {
        (*e).flags = flags;
    }
    if now.saturating_sub((*e).last_seen_ns) >= TOUCH_STEP_NS {
        (*e).last_seen_ns = now;
    }
}

/// How stale an entry's idle clock may get before a packet moves it: a quarter second.
const TOUCH_STEP_NS: u64 = crate::NS_PER_SEC / 4;

/// `*n += delta`, atomically (BPF_ATOMIC_ADD: other CPUs add to the same value). The
/// BPF target has no atomic read-modify-write in `core`, hence the instruction itself.
///
/// # Safety
/// `n` must point at a `u64` in a map value.
#[inline(always)]
unsafe fn atomic_add(n: *mut u64, delta: u64) {
    core::arch::asm!(
        "lock *(u64 *)({n} + 0) += {delta}",
        n = in(reg) n,
        delta = in(reg) delta,
    );
}

/// One more entry held by endpoint `owner` in a table whose counts are `held`.
#[inline(always)]
fn held_one(held: &HashMap<u32, u64>, owner: u32) {
    if owner == 0 {
        return; // a migrated entry, counted by no one
    }
    if let Some(n) = held.get_ptr_mut(&owner) {
        // SAFETY: pointer into the map value, valid for this run.
        unsafe { atomic_add(n, 1) };
    } else if held.insert(&owner, &1, BPF_NOEXIST as u64).is_err() {
        // Created meanwhile on another CPU: count into it.
        if let Some(n) = held.get_ptr_mut(&owner) {
            // SAFETY: as above.
            unsafe { atomic_add(n, 1) };
        }
    }
}

/// Whether endpoint `owner` holds `share` entries or more in the table counted by `held`.
#[inline(always)]
fn at_share(held: &HashMap<u32, u64>, owner: u32, share: u32) -> bool {
    // SAFETY: a lookup; the value is read at once.
    unsafe { held.get(&owner) }.copied().unwrap_or(0) >= share as u64
}

// Calls of their own, one per table: their frames stay off the deepest chain.
#[inline(never)]
pub(crate) fn ct_held_one(owner: u32) {
    held_one(&CT_HELD, owner)
}
#[inline(never)]
pub(crate) fn ct_at_share(owner: u32, share: u32) -> u32 {
    at_share(&CT_HELD, owner, share) as u32
}
#[inline(never)]
pub(crate) fn frag_held_one(owner: u32) {
    held_one(&FRAG_HELD, owner)
}
#[inline(never)]
pub(crate) fn frag_at_share(owner: u32, share: u32) -> u32 {
    at_share(&FRAG_HELD, owner, share) as u32
}

/// Records that the check in direction `jdir` passed for the connection `key` names,
/// with the flags `marks` (its audit flag: by audit mode only; `SERVICE`;
/// `EGRESS_DIRECT`), and the rule that allowed it (`cookie`). A new
/// entry counts against the share of endpoint `owner` (`share`: `Config::ct_share`);
/// one that held its whole share tracks nothing new, so that it cannot turn the table
/// over for all (its allowed packets still pass, untracked).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn remember(
    key: &CtKey,
    jdir: u8,
    stamp: u64,
    marks: u32,
    cookie: u32,
    now: u64,
    owner: u32,
    share: u32,
) {
    let ok = ok_flag(jdir);
    if let Some(e) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: pointer into the map value, valid for this run.
        unsafe {
            set_stamp(e, jdir, stamp);
            set_cookie(e, jdir, cookie);
            (*e).flags = ((*e).flags & !audit_flag(jdir)) | ok | marks;
            (*e).last_seen_ns = now;
        }
        return;
    }
    if share != 0 && ct_at_share(owner, share) != 0 {
        count(event_counter::CT_SHARE_FULL);
        return;
    }
    let mut slot = MaybeUninit::uninit();
    // SAFETY: all zeroes is a valid entry (integers only).
    let entry = unsafe { zeroed_in::<CtEntry>(&mut slot) };
    entry.last_seen_ns = now;
    entry.flags = ok | marks;
    entry.owner = owner;
    if jdir == direction::EGRESS {
        entry.egress_stamp = stamp;
        entry.egress_cookie = cookie;
    } else {
        entry.ingress_stamp = stamp;
        entry.ingress_cookie = cookie;
    }
    // A full table evicts the least recently used entry (uncounted until the agent's
    // sweep); a failed insert (another CPU's entry for the key came first) only means
    // the next packet is judged by policy again.
    if CONNTRACK.insert(key, entry, BPF_NOEXIST as u64).is_ok() {
        ct_held_one(owner);
    }
}

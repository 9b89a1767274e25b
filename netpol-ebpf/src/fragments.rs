//! IP fragments: a first fragment is judged on its ports like any packet and its
//! verdict is remembered per datagram (`NP_FRAGMENTS`); later fragments, which carry no
//! upper-layer header, follow it (or drop when it is unknown or too old).

use aya_ebpf::bindings::BPF_NOEXIST;
use netpol_common::{ct_timeout, event_counter, reason, verdict, FragEntry, FragKey};

use crate::conntrack::{frag_at_share, frag_held_one};
use crate::emit::count;
use crate::maps::FRAGMENTS;
use crate::parse::Packet;
use crate::{Outcome, NS_PER_SEC};

/// The key of the datagram a fragment `pkt` belongs to, at the hook on `ifindex`.
#[inline(always)]
pub(crate) fn set_key(key: &mut FragKey, pkt: &Packet, ifindex: u32) {
    *key = FragKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        id: pkt.frag_id,
        ifindex,
        protocol: pkt.frag_proto,
        direction: pkt.dir,
        _pad: [0; 2],
    };
}

/// The outcome of a later fragment: its first fragment's, unless that is unknown or
/// older than `ct_timeout::FRAGMENT` (then `FRAGMENT_UNKNOWN`, a drop).
#[inline(always)]
pub(crate) fn follow_first(key: &FragKey, now: u64) -> Outcome {
    match FRAGMENTS.get_ptr(key) {
        // SAFETY: `f` came from a FRAGMENTS lookup that returned Some; map values stay
        // valid for the whole program run.
        Some(f)
            if now.saturating_sub(unsafe { (*f).last_seen_ns })
                <= ct_timeout::FRAGMENT * NS_PER_SEC =>
        // SAFETY: as above.
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
    }
}

/// Remembers a first fragment's outcome for the rest of its datagram, unless endpoint
/// `owner` has its whole share of datagrams (`share`: `Config::frag_share`) in the table
/// already: then its later fragments drop, and no one else's datagram is evicted for it.
#[inline(always)]
pub(crate) fn remember_first(key: &FragKey, out: &Outcome, now: u64, owner: u32, share: u32) {
    if let Some(f) = FRAGMENTS.get_ptr_mut(key) {
        // The same datagram's first fragment again (a retransmission): its verdict now.
        // SAFETY: pointer into the map value, valid for this run.
        unsafe {
            (*f).last_seen_ns = now;
            (*f).verdict = out.verdict;
            (*f).reason = out.reason;
            (*f).cookie = out.cookie;
            (*f).peer_identity = out.peer_identity;
        }
        return;
    }
    if share != 0 && frag_at_share(owner, share) != 0 {
        count(event_counter::FRAG_SHARE_FULL);
        return;
    }
    let entry = FragEntry {
        last_seen_ns: now,
        verdict: out.verdict,
        _pad: 0,
        reason: out.reason,
        cookie: out.cookie,
        peer_identity: out.peer_identity,
        owner,
    };
    // A full table evicts the oldest datagram (its later fragments then drop), counted
    // again by the agent's sweep.
    if FRAGMENTS.insert(key, &entry, BPF_NOEXIST as u64).is_ok() {
        frag_held_one(owner);
    }
}

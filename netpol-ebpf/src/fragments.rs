//! IP fragments: a first fragment is judged on its ports like any packet and its
//! verdict is remembered per datagram (`NP_FRAGMENTS`); later fragments, which carry no
//! upper-layer header, follow it (or drop when it is unknown or too old).

use netpol_common::{ct_timeout, reason, verdict, FragEntry, FragKey};

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

/// Remembers a first fragment's outcome for the rest of its datagram.
#[inline(always)]
pub(crate) fn remember_first(key: &FragKey, out: &Outcome, now: u64) {
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
    let _ = FRAGMENTS.insert(key, &entry, 0);
}

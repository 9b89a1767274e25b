//! The lookup precedence, shared by the classifier and the userspace lookup so both
//! decide the same way from the same map contents.
//!
//! For a packet judged at endpoint E in direction D against peer P:
//!  1. E not isolated in D                      → allow (`NOT_ISOLATED`)
//!  2. look up (E, D, identity(P), proto, port)  in the policy trie (longest port prefix)
//!  3. look up (E, D, cidr-identity(P), proto, port) when P falls in an ipBlock boundary
//!  4. look up (E, D, ANY, proto, port)
//!  5. of the hits, the highest precedence wins; on a tie deny beats allow
//!  6. no hit                                    → drop (`POLICY_DENIED`)
//!
//! With cluster-wide policy (Admin and Baseline tiers) the same three lookups are made
//! a second time with `direction | ADMIN_TIER` when the endpoint has Admin entries, and
//! the first three also run for a non-isolated endpoint that has Baseline entries;
//! [`decide_tiers`] combines them in the API's order.

use crate::{policy_action, reason, PolicyEntry, PolicyKey};

/// The outcome of the policy stage for one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: u16,
    /// Cookie of the winning entry (0 when no entry decided).
    pub cookie: u32,
}

/// Builds the full-length key for a lookup (longest-prefix match does the wildcarding).
#[inline(always)]
pub fn lookup_key(
    endpoint: u32,
    direction: u8,
    identity: u32,
    protocol: u8,
    port: u16,
) -> PolicyKey {
    PolicyKey {
        endpoint,
        identity,
        direction,
        protocol,
        port_be: port.to_be_bytes(),
    }
}

/// A lookup that found nothing. The classifier passes plain entries, not `Option`s:
/// LLVM may read an absent `Option`'s payload in a select, which the verifier refuses.
pub const MISS: PolicyEntry = PolicyEntry {
    cookie: 0,
    action: policy_action::MISS,
    precedence: 0,
};

/// The strongest of up to three hits: highest precedence; on a tie (the same rule
/// reached through two identities, or a conflict) deny beats pass beats allow.
#[inline(always)]
pub fn strongest(hits: &[PolicyEntry; 3]) -> PolicyEntry {
    let mut best = MISS;
    let mut i = 0;
    while i < 3 {
        let hit = hits[i];
        if hit.action != policy_action::MISS
            && (best.action == policy_action::MISS || stronger(&hit, &best))
        {
            best = hit;
        }
        i += 1;
    }
    best
}

/// Whether hit `a` beats hit `b` (both found): higher precedence, or on a tie the
/// stronger action (deny, then pass, then allow).
#[inline(always)]
pub fn stronger(a: &PolicyEntry, b: &PolicyEntry) -> bool {
    a.precedence > b.precedence
        || (a.precedence == b.precedence && strength(a.action) > strength(b.action))
}

#[inline(always)]
fn strength(action: u16) -> u8 {
    match action {
        policy_action::DENY => 2,
        policy_action::PASS => 1,
        _ => 0,
    }
}

#[inline(always)]
const fn decision(allowed: bool, reason: u16, cookie: u32) -> Decision {
    Decision {
        allowed,
        reason,
        cookie,
    }
}

/// NetworkPolicy only: [`decide_tiers`] without Admin entries.
pub fn decide(isolated: bool, hits: [Option<PolicyEntry>; 3]) -> Decision {
    decide_tiers(&[MISS; 3], isolated, &hits.map(|h| h.unwrap_or(MISS)))
}

/// The evaluation order of the policy API: the Admin tier (its strongest hit decides;
/// Accept and Deny are final, Pass hands over), then NetworkPolicy where it isolates
/// the endpoint (an allow entry or a drop), else the Baseline tier (its strongest hit
/// decides), else allow. `lower` holds NetworkPolicy entries where the endpoint is
/// isolated and Baseline entries where it is not; never both. Absent hits are [`MISS`].
#[inline(always)]
pub fn decide_tiers(
    admin: &[PolicyEntry; 3],
    isolated: bool,
    lower: &[PolicyEntry; 3],
) -> Decision {
    let a = strongest(admin);
    if a.action == policy_action::ALLOW {
        return decision(true, reason::ADMIN_ALLOWED, a.cookie);
    }
    if a.action == policy_action::DENY {
        return decision(false, reason::ADMIN_DENIED, a.cookie);
    }
    let best = strongest(lower);
    if isolated {
        if best.action == policy_action::ALLOW {
            return decision(true, reason::POLICY_ALLOWED, best.cookie);
        }
        return decision(false, reason::POLICY_DENIED, 0);
    }
    if best.action == policy_action::ALLOW {
        return decision(true, reason::BASELINE_ALLOWED, best.cookie);
    }
    if best.action == policy_action::DENY {
        return decision(false, reason::BASELINE_DENIED, best.cookie);
    }
    decision(true, reason::NOT_ISOLATED, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(cookie: u32) -> Option<PolicyEntry> {
        Some(PolicyEntry {
            cookie,
            action: policy_action::ALLOW,
            precedence: 0,
        })
    }

    #[test]
    fn not_isolated_allows_without_entries() {
        assert!(decide(false, [None, None, None]).allowed);
    }

    #[test]
    fn isolated_without_entries_drops_with_no_cookie() {
        let d = decide(true, [None, None, None]);
        assert_eq!(
            (d.allowed, d.reason, d.cookie),
            (false, reason::POLICY_DENIED, 0)
        );
    }

    #[test]
    fn first_hit_names_the_rule() {
        let d = decide(true, [None, allow(7), allow(9)]);
        assert_eq!((d.allowed, d.cookie), (true, 7));
    }

    #[test]
    fn deny_wins_a_tie_and_higher_precedence_wins() {
        let deny = Some(PolicyEntry {
            cookie: 3,
            action: policy_action::DENY,
            precedence: 0,
        });
        assert!(!decide(true, [allow(1), deny, None]).allowed);
        let strong = Some(PolicyEntry {
            cookie: 4,
            action: policy_action::ALLOW,
            precedence: 5,
        });
        assert!(decide(true, [deny, strong, None]).allowed);
    }

    fn entry(action: u16, precedence: u16, cookie: u32) -> PolicyEntry {
        PolicyEntry {
            cookie,
            action,
            precedence,
        }
    }
    const N: PolicyEntry = MISS;

    #[test]
    fn admin_accept_and_deny_are_final() {
        let a = entry(policy_action::ALLOW, 10, 1);
        let d = entry(policy_action::DENY, 9, 2);
        let t = decide_tiers(&[a, d, N], true, &[N, N, N]);
        assert_eq!(
            (t.allowed, t.reason, t.cookie),
            (true, reason::ADMIN_ALLOWED, 1)
        );
        let t = decide_tiers(&[N, d, N], false, &[N, N, N]);
        assert_eq!((t.allowed, t.reason), (false, reason::ADMIN_DENIED));
    }

    #[test]
    fn pass_hands_over_to_network_policy_then_baseline() {
        let pass = entry(policy_action::PASS, 10, 1);
        let weaker_deny = entry(policy_action::DENY, 5, 2);
        let np_allow = entry(policy_action::ALLOW, 0, 3);
        let t = decide_tiers(&[weaker_deny, N, pass], true, &[N, np_allow, N]);
        assert_eq!(
            (t.allowed, t.reason, t.cookie),
            (true, reason::POLICY_ALLOWED, 3)
        );
        let base_deny = entry(policy_action::DENY, 4, 4);
        let t = decide_tiers(&[pass, N, N], false, &[base_deny, N, N]);
        assert_eq!(
            (t.allowed, t.reason, t.cookie),
            (false, reason::BASELINE_DENIED, 4)
        );
        let t = decide_tiers(&[pass, N, N], false, &[N, N, N]);
        assert_eq!((t.allowed, t.reason), (true, reason::NOT_ISOLATED));
    }

    #[test]
    fn the_strongest_baseline_rule_decides() {
        let allow = entry(policy_action::ALLOW, 7, 1);
        let deny = entry(policy_action::DENY, 3, 2);
        let t = decide_tiers(&[N, N, N], false, &[deny, allow, N]);
        assert_eq!((t.allowed, t.reason), (true, reason::BASELINE_ALLOWED));
    }
}

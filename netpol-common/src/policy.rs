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

/// Combines the results of the (up to) three lookups per the numbered rules above.
#[inline(always)]
pub fn decide(isolated: bool, hits: [Option<PolicyEntry>; 3]) -> Decision {
    if !isolated {
        return Decision {
            allowed: true,
            reason: reason::NOT_ISOLATED,
            cookie: 0,
        };
    }
    let mut best: Option<PolicyEntry> = None;
    let mut i = 0;
    while i < 3 {
        if let Some(hit) = hits[i] {
            best = match best {
                None => Some(hit),
                Some(b) if hit.precedence > b.precedence => Some(hit),
                Some(b)
                    if hit.precedence == b.precedence
                        && hit.action == policy_action::DENY
                        && b.action != policy_action::DENY =>
                {
                    Some(hit)
                }
                keep => keep,
            };
        }
        i += 1;
    }
    match best {
        Some(e) if e.action == policy_action::ALLOW => Decision {
            allowed: true,
            reason: reason::POLICY_ALLOWED,
            cookie: e.cookie,
        },
        Some(e) => Decision {
            allowed: false,
            reason: reason::POLICY_DENIED,
            cookie: e.cookie,
        },
        None => Decision {
            allowed: false,
            reason: reason::POLICY_DENIED,
            cookie: 0,
        },
    }
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
}

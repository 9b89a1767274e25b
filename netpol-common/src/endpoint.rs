//! The endpoint and policy maps: who a local pod is, who owns an address, what its policy allows.

use crate::*;

/// `NP_ENDPOINTS`: host-side veth ifindex → the local endpoint behind it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointEntry {
    /// Endpoint id used in policy keys (never 0).
    pub id: u32,
    /// `endpoint_flags::*`.
    pub flags: u32,
    /// Policy revision of this endpoint; bumped whenever its policy entries change.
    pub revision: u32,
    /// The endpoint's own identity (reported in events).
    pub identity: u32,
    /// The pod's addresses (v4-mapped for IPv4; all zero when absent), for anti-spoofing.
    pub ipv4: Addr,
    pub ipv6: Addr,
    /// The MAC of the pod's interface as discovery found it: the only source MAC its
    /// frames and ARP messages may carry.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<EndpointEntry>() == 56);

pub mod endpoint_flags {
    pub const ISOLATED_INGRESS: u32 = 1;
    pub const ISOLATED_EGRESS: u32 = 2;
    /// Would-be drops pass and are reported as AUDIT.
    pub const AUDIT: u32 = 4;
    /// Admin-tier entries exist for this endpoint in that direction.
    pub const ADMIN_INGRESS: u32 = 8;
    pub const ADMIN_EGRESS: u32 = 16;
    /// Baseline-tier entries exist (only where NetworkPolicy does not isolate).
    pub const BASELINE_INGRESS: u32 = 32;
    pub const BASELINE_EGRESS: u32 = 64;
    /// The direction is isolated only by NetworkPolicies in audit mode
    /// (`netpol.io/mode: audit`): their would-be drops pass and are reported as AUDIT.
    pub const AUDIT_INGRESS: u32 = 128;
    pub const AUDIT_EGRESS: u32 = 256;

    /// The audit flag of one direction.
    #[inline(always)]
    pub const fn audit_of(dir: u8) -> u32 {
        if dir == crate::direction::EGRESS {
            AUDIT_EGRESS
        } else {
            AUDIT_INGRESS
        }
    }

    /// (isolated, admin entries, baseline entries) flags of one direction.
    #[inline(always)]
    pub const fn of(dir: u8) -> (u32, u32, u32) {
        if dir == crate::direction::EGRESS {
            (ISOLATED_EGRESS, ADMIN_EGRESS, BASELINE_EGRESS)
        } else {
            (ISOLATED_INGRESS, ADMIN_INGRESS, BASELINE_INGRESS)
        }
    }
}

/// `NP_IPCACHE` value (LPM trie keyed by [`Addr`]): who owns an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheEntry {
    pub identity: u32,
    /// Local endpoint id when the address belongs to a pod on this node, else 0.
    pub endpoint: u32,
}
const _: () = assert!(core::mem::size_of::<IpcacheEntry>() == 8);

/// `NP_CIDRS` value (LPM trie keyed by [`Addr`]): the CIDR identity of the longest
/// ipBlock boundary containing an address (identity of the set of ipBlocks it is in).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrEntry {
    pub identity: u32,
}
const _: () = assert!(core::mem::size_of::<CidrEntry>() == 4);

/// `NP_POLICY` key data (LPM trie). The prefix covers endpoint, identity and direction
/// always ([`PolicyKey::FIXED_BITS`]); protocol and port come last so that a shorter
/// prefix wildcards them: 72 bits = any protocol, 80 = any port, 80 + n = a port prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub endpoint: u32,
    pub identity: u32,
    pub direction: u8,
    pub protocol: u8,
    /// Destination port, big-endian (so prefixes are the high bits).
    pub port_be: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);

impl PolicyKey {
    pub const FIXED_BITS: u32 = 72;
    pub const PROTO_BITS: u32 = 80;
    pub const FULL_BITS: u32 = 96;
}

/// `NP_POLICY` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntry {
    /// Names the policy and rule (resolved by the agent); 0 = none.
    pub cookie: u32,
    /// `policy_action::*`.
    pub action: u16,
    /// Higher wins when several lookups hit (tiers, deny).
    pub precedence: u16,
}
const _: () = assert!(core::mem::size_of::<PolicyEntry>() == 8);

pub mod policy_action {
    pub const ALLOW: u16 = 0;
    pub const DENY: u16 = 1;
    /// Admin tier only: skip the rest of the tier, NetworkPolicy (or Baseline) decides.
    pub const PASS: u16 = 2;
    /// Never stored: what a lookup that found nothing yields (`policy::MISS`).
    pub const MISS: u16 = 0xffff;
}

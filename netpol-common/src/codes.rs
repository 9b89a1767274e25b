//! The classifier's codes as types: each byte of an event or counter slot is decoded
//! here and nowhere else, so that metrics, `observe` and `counters` name it alike.
//!
//! The constants in [`crate::verdict`], [`crate::direction`], [`crate::reason`] and
//! [`crate::proto`] stay the ABI (the classifier writes them); these types are how
//! userspace reads them. A code this build does not know decodes to `None`, never to a
//! neighbouring name.

use core::fmt;
use core::str::FromStr;

use crate::{direction, proto, reason, verdict};

/// A name that is none of a type's values (`what` says which type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownName {
    pub what: &'static str,
}

impl fmt::Display for UnknownName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a known {}", self.what)
    }
}

/// Declares a code enum: its variants, their ABI code and printed name, the decode
/// and encode functions, `Display` and a case-insensitive `FromStr`.
macro_rules! codes {
    ($(#[$m:meta])* $name:ident: $repr:ty, $what:literal { $($(#[$vm:meta])* $v:ident = $code:expr, $text:literal;)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
        pub enum $name {
            $($(#[$vm])* #[cfg_attr(feature = "serde", serde(rename = $text))] $v,)*
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v),*];

            pub const fn from_code(code: $repr) -> Option<$name> {
                match code {
                    $(c if c == $code => Some($name::$v),)*
                    _ => None,
                }
            }

            pub const fn code(self) -> $repr {
                match self {
                    $($name::$v => $code,)*
                }
            }

            pub const fn name(self) -> &'static str {
                match self {
                    $($name::$v => $text,)*
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<$name, UnknownName> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.name().eq_ignore_ascii_case(s))
                    .ok_or(UnknownName { what: $what })
            }
        }
    };
}

codes! {
    /// What the classifier did with a packet.
    Verdict: u8, "verdict" {
        Allowed = verdict::ALLOWED, "allowed";
        Dropped = verdict::DROPPED, "dropped";
        /// Would have been dropped; passed because of audit mode.
        Audit = verdict::AUDIT, "audit";
    }
}

codes! {
    /// Seen from the endpoint whose policy is judged.
    Direction: u8, "direction" {
        Ingress = direction::INGRESS, "ingress";
        Egress = direction::EGRESS, "egress";
    }
}

codes! {
    /// Why a packet got its verdict (see [`crate::reason`] for each meaning).
    Reason: u16, "reason" {
        NoReason = reason::NONE, "NONE";
        PolicyDenied = reason::POLICY_DENIED, "POLICY_DENIED";
        Malformed = reason::MALFORMED, "MALFORMED";
        SpoofedSource = reason::SPOOFED_SOURCE, "SPOOFED_SOURCE";
        PolicyRevoked = reason::POLICY_REVOKED, "POLICY_REVOKED";
        UnknownL4 = reason::UNKNOWN_L4, "UNKNOWN_L4";
        FragmentUnknown = reason::FRAGMENT_UNKNOWN, "FRAGMENT_UNKNOWN";
        Conntrack = reason::CONNTRACK, "CONNTRACK";
        PolicyAllowed = reason::POLICY_ALLOWED, "POLICY_ALLOWED";
        NotIsolated = reason::NOT_ISOLATED, "NOT_ISOLATED";
        HostTraffic = reason::HOST_TRAFFIC, "HOST_TRAFFIC";
        Fragment = reason::FRAGMENT, "FRAGMENT";
        Related = reason::RELATED, "RELATED";
        ServiceDeferred = reason::SERVICE_DEFERRED, "SERVICE_DEFERRED";
        ServiceUnknownClient = reason::SERVICE_UNKNOWN_CLIENT, "SERVICE_UNKNOWN_CLIENT";
        PendingEndpoint = reason::PENDING_ENDPOINT, "PENDING_ENDPOINT";
        UnknownL3 = reason::UNKNOWN_L3, "UNKNOWN_L3";
        Misdirected = reason::MISDIRECTED, "MISDIRECTED";
        ServiceUnhooked = reason::SERVICE_UNHOOKED, "SERVICE_UNHOOKED";
        AdminAllowed = reason::ADMIN_ALLOWED, "ADMIN_ALLOWED";
        AdminDenied = reason::ADMIN_DENIED, "ADMIN_DENIED";
        BaselineAllowed = reason::BASELINE_ALLOWED, "BASELINE_ALLOWED";
        BaselineDenied = reason::BASELINE_DENIED, "BASELINE_DENIED";
    }
}

impl Reason {
    /// Whether an allow for this reason is a new connection's first packet (policy, no
    /// policy or node traffic decided it), not a later packet of a tracked one.
    pub const fn opens_connection(self) -> bool {
        matches!(
            self,
            Reason::PolicyAllowed
                | Reason::NotIsolated
                | Reason::HostTraffic
                | Reason::AdminAllowed
                | Reason::BaselineAllowed
        )
    }

    /// The policy tier that decided, when a policy did.
    pub const fn tier(self) -> Option<&'static str> {
        match self {
            Reason::AdminAllowed | Reason::AdminDenied => Some("Admin"),
            Reason::PolicyAllowed | Reason::PolicyDenied | Reason::PolicyRevoked => {
                Some("NetworkPolicy")
            }
            Reason::BaselineAllowed | Reason::BaselineDenied => Some("Baseline"),
            _ => None,
        }
    }

    /// Denied by a cluster policy's rule (the rule's policy is responsible).
    pub const fn denied_by_cluster_rule(self) -> bool {
        matches!(self, Reason::AdminDenied | Reason::BaselineDenied)
    }
}

codes! {
    /// The IP protocols the classifier knows by name.
    KnownProtocol: u8, "protocol" {
        Tcp = proto::TCP, "TCP";
        Udp = proto::UDP, "UDP";
        Sctp = proto::SCTP, "SCTP";
        Icmp = proto::ICMP, "ICMP";
        Icmpv6 = proto::ICMPV6, "ICMPv6";
    }
}

/// An IP protocol number, named when the classifier knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Known(KnownProtocol),
    Other(u8),
}

impl Protocol {
    pub const fn from_number(n: u8) -> Protocol {
        match KnownProtocol::from_code(n) {
            Some(k) => Protocol::Known(k),
            None => Protocol::Other(n),
        }
    }

    pub const fn number(self) -> u8 {
        match self {
            Protocol::Known(k) => k.code(),
            Protocol::Other(n) => n,
        }
    }
}

impl fmt::Display for Protocol {
    /// The name when known, else the number (`observe` prints it so).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Known(k) => f.write_str(k.name()),
            Protocol::Other(n) => write!(f, "{n}"),
        }
    }
}

impl FromStr for Protocol {
    type Err = UnknownName;
    /// A known name in any case, or a number.
    fn from_str(s: &str) -> Result<Protocol, UnknownName> {
        if let Ok(n) = s.parse::<u8>() {
            return Ok(Protocol::from_number(n));
        }
        s.parse::<KnownProtocol>().map(Protocol::Known)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_decodes_to_itself_and_unknown_codes_to_none() {
        for v in Verdict::ALL {
            assert_eq!(Verdict::from_code(v.code()), Some(*v));
        }
        for r in Reason::ALL {
            assert_eq!(Reason::from_code(r.code()), Some(*r));
            assert!(r.code() < reason::COUNT);
            assert_eq!(r.name().parse::<Reason>(), Ok(*r));
        }
        // The byte the metrics once printed as "audit" and the CLI as "dropped".
        assert_eq!(Verdict::from_code(3), None);
        assert_eq!(Reason::from_code(reason::COUNT), None);
        assert_eq!(Direction::from_code(2), None);
    }

    #[test]
    fn names_parse_in_any_case_and_protocols_by_number() {
        assert_eq!("DROPPED".parse::<Verdict>(), Ok(Verdict::Dropped));
        assert_eq!("policy_denied".parse::<Reason>(), Ok(Reason::PolicyDenied));
        assert_eq!("icmpv6".parse::<Protocol>().map(Protocol::number), Ok(58));
        assert_eq!(
            "6".parse::<Protocol>(),
            Ok(Protocol::Known(KnownProtocol::Tcp))
        );
        assert_eq!("47".parse::<Protocol>(), Ok(Protocol::Other(47)));
        assert!("GRE".parse::<Protocol>().is_err());
    }
}

//! Connection and fragment state.

use crate::*;

/// `NP_CONNTRACK` key: the 5-tuple in the direction of the connection's first packet.
/// IPv4 addresses are v4-mapped; ports in host order (ICMP echo: id in `sport`).
/// 8-aligned (the layout is the same) so that the classifier fills it in wide stores.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);

impl CtKey {
    /// Sets the protocol and clears the padding behind it, in one 4-byte store: three
    /// bytes of zeroes would be, in the classifier, a call of aya's byte-at-a-time
    /// `memset`.
    #[inline(always)]
    pub fn set_protocol(&mut self, protocol: u8) {
        const _: () = assert!(core::mem::offset_of!(CtKey, protocol) == 36);
        // SAFETY: `protocol` and `_pad` are the key's last 4 bytes, at offset 36 of an
        // 8-aligned struct, so 4-aligned.
        unsafe {
            (&mut self.protocol as *mut u8 as *mut u32)
                .write(u32::from_ne_bytes([protocol, 0, 0, 0]));
        }
    }

    /// Turns the key around, in place (the classifier has no stack to spare for a copy).
    #[inline(always)]
    pub fn reverse(&mut self) {
        core::mem::swap(&mut self.saddr, &mut self.daddr);
        core::mem::swap(&mut self.sport, &mut self.dport);
    }
}

/// `NP_CONNTRACK` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub last_seen_ns: u64,
    /// [`ct_stamp`] of the originating endpoint's revision and the node's epoch when its
    /// egress was allowed (0: not checked here).
    pub egress_stamp: u64,
    /// [`ct_stamp`] of the destination endpoint's revision and epoch when its ingress
    /// was allowed.
    pub ingress_stamp: u64,
    /// `ct_flags::*`: which checks of the connection already passed.
    pub flags: u32,
    /// Cookie of the rule that allowed the originator's egress (0: none, e.g. not
    /// isolated), so that every packet of the connection is counted to it.
    pub egress_cookie: u32,
    /// Cookie of the rule that allowed the destination's ingress.
    pub ingress_cookie: u32,
    /// The pod whose conntrack share the entry counts against: the host veth ifindex of
    /// the pod at whose hook the connection was first tracked (each pod has its own
    /// share, replicas of one identity too); 0: none (migrated from a layout without it).
    pub owner: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 40);

pub mod ct_flags {
    /// The originator's egress policy allowed the connection.
    pub const EGRESS_OK: u32 = 1;
    /// The destination's ingress policy allowed the connection.
    pub const INGRESS_OK: u32 = 2;
    /// A packet in the reply direction was seen (TCP: the connection is established).
    pub const SEEN_REPLY: u32 = 4;
    /// `EGRESS_OK` was granted by audit mode only (the policy would have dropped it).
    pub const EGRESS_AUDIT: u32 = 8;
    /// `INGRESS_OK` was granted by audit mode only.
    pub const INGRESS_AUDIT: u32 = 16;
    /// TCP: a FIN from the originator was seen.
    pub const FIN_ORIG: u32 = 32;
    /// TCP: a FIN from the replier was seen.
    pub const FIN_REPLY: u32 = 64;
    /// TCP: a RST was seen.
    pub const RST: u32 = 128;
    /// Keyed by the client's tuple to a Service VIP; `EGRESS_OK` was granted after DNAT
    /// against the real backend. Replies (source = VIP) pass on it; only the client's
    /// own packets (deferred again) can re-judge it.
    pub const SERVICE: u32 = 256;
    /// The originator's packets (the ones its egress check covers) go to no Service
    /// address: found by `from_pod`'s VIP lookup under the current `egress_stamp`.
    /// Later packets under that stamp skip the lookup; a new stamp clears the flag (a
    /// Service address that came or went starts a new epoch).
    pub const EGRESS_DIRECT: u32 = 512;
    /// The replier's packets (to the originator's address, under its ingress check) go
    /// to no Service address, as of the current `ingress_stamp` (as `EGRESS_DIRECT`).
    pub const INGRESS_DIRECT: u32 = 1024;
}

/// Default conntrack idle timeouts in seconds (`Config` fields of 0 mean these).
pub mod ct_timeout {
    /// TCP before a reply was seen (SYN sent).
    pub const TCP_SYN: u64 = 60;
    /// TCP after a reply, until FIN from both sides or a RST.
    pub const TCP_ESTABLISHED: u64 = 21600;
    /// TCP after FIN from both sides or a RST.
    pub const TCP_CLOSE: u64 = 10;
    /// UDP, SCTP and any other protocol.
    pub const UDP: u64 = 60;
    /// ICMP and ICMPv6 echo.
    pub const ICMP: u64 = 30;
    /// How long a first fragment's verdict waits for the later fragments (as
    /// Linux's `ipfrag_time`).
    pub const FRAGMENT: u64 = 30;
}

/// `NP_FRAGMENTS` key: one IP datagram at one hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: Addr,
    pub daddr: Addr,
    /// IPv4: the 16-bit identification; IPv6: the fragment header's identification.
    pub id: u32,
    /// The host veth the datagram crosses (each hook keeps its own verdict).
    pub ifindex: u32,
    /// IPv4 protocol, or the fragment header's next header (IPv6).
    pub protocol: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 44);

/// `NP_FRAGMENTS` value: the verdict of the datagram's first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragEntry {
    pub last_seen_ns: u64,
    /// `verdict::ALLOWED` or `verdict::DROPPED` (before audit mode).
    pub verdict: u8,
    pub _pad: u8,
    pub reason: u16,
    pub cookie: u32,
    pub peer_identity: u32,
    /// The pod (host veth ifindex) whose fragments share the entry counts against (see
    /// `CtEntry::owner`).
    pub owner: u32,
}
const _: () = assert!(core::mem::size_of::<FragEntry>() == 24);

/// What a conntrack entry records for a passed check: the endpoint's policy revision
/// beside the node's map epoch, each in its own half (two different pairs never make
/// the same stamp, which a fold of one into the other could).
/// Idle timeout of a connection whose entry has `flags`, in nanoseconds: the
/// configured one, or the default of [`ct_timeout`]. One definition for the classifier
/// (a live entry) and the agent's sweep (an expired one).
#[inline(always)]
pub fn ct_timeout_ns(config: &Config, protocol: u8, flags: u32) -> u64 {
    const NS_PER_SEC: u64 = 1_000_000_000;
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

#[inline(always)]
pub const fn ct_stamp(revision: u32, epoch: u32) -> u64 {
    ((epoch as u64) << 32) | revision as u64
}

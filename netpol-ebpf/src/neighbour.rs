//! The link's own messages from a pod (ARP, IPv6 neighbour discovery and MLD), which
//! policy does not judge but which must not speak for anyone else: a pod that answers
//! ARP or ND for another pod's address moves its neighbours' traffic to itself.

use aya_ebpf::programs::TcContext;
use netpol_common::{direction, reason, EndpointEntry};

use crate::parse::{link, read, Packet};

/// Whether `a` is an IPv6 link-local unicast address (fe80::/10).
#[inline(always)]
fn link_local(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

#[inline(always)]
fn unspecified(a: &[u8; 16]) -> bool {
    a.iter().all(|b| *b == 0)
}

/// An ND/MLD message or ARP frame `parse` passed on ([`crate::parse::SKIP`]): 0 when it
/// may pass, else the drop reason. From a pod: the frame's source MAC is the pod's; an
/// ARP message carries the pod's MAC and IPv4 address (or 0.0.0.0, a probe) as its
/// sender; ND and MLD come from the pod's address, a link-local one or `::` (duplicate
/// address detection), and a Neighbour Advertisement names the pod's address or a
/// link-local one. Towards a pod they pass: the sender's own hook has held them to its
/// addresses, and the node is trusted.
#[inline(never)]
pub(crate) fn check(ctx: &TcContext, ep: &EndpointEntry, pkt: &Packet) -> u16 {
    if pkt.dir != direction::EGRESS {
        return 0;
    }
    if pkt.smac != ep.mac {
        return reason::SPOOFED_SOURCE;
    }
    if pkt.link == link::ARP {
        // htype, ptype, hlen, plen, op, sender MAC, sender IPv4
        let mut arp = [0u8; 18];
        if !read(ctx, 14, &mut arp) {
            return reason::MALFORMED;
        }
        let head = [arp[0], arp[1], arp[2], arp[3], arp[4], arp[5]];
        if head != [0, 1, 0x08, 0x00, 6, 4] {
            return reason::MALFORMED; // not Ethernet/IPv4 ARP
        }
        let own = [ep.ipv4[12], ep.ipv4[13], ep.ipv4[14], ep.ipv4[15]];
        let sender = [arp[14], arp[15], arp[16], arp[17]];
        let sender_mac = [arp[8], arp[9], arp[10], arp[11], arp[12], arp[13]];
        if sender_mac != ep.mac || (sender != own && sender != [0, 0, 0, 0]) {
            return reason::SPOOFED_SOURCE;
        }
        return 0;
    }
    let own = ep.ipv6 != [0u8; 16] && pkt.saddr == ep.ipv6;
    if !own && !link_local(&pkt.saddr) && !unspecified(&pkt.saddr) {
        return reason::SPOOFED_SOURCE;
    }
    if pkt.nd_kind == 136 {
        // Neighbour Advertisement: the target address follows the 8-byte header.
        let mut target = [0u8; 16];
        if !read(ctx, pkt.l4 as usize + 8, &mut target) {
            return reason::MALFORMED;
        }
        if !(ep.ipv6 != [0u8; 16] && target == ep.ipv6) && !link_local(&target) {
            return reason::SPOOFED_SOURCE;
        }
    }
    0
}

//! The fuzz suite's reference parser, written from the RFCs rather than from the
//! classifier: what a frame is (or why it drops) before any policy, as `parse.rs` and
//! the checks that follow it (`neighbour.rs`, anti-spoofing) must find it.

use netpol_common::{reason, v4_mapped, Addr};

use super::support::packet::*;
use super::support::rig::{POD_MAC, SERVER, SERVER6};

#[derive(Debug, PartialEq)]
pub enum Expect {
    /// Not judged (ARP, neighbour discovery, MLD).
    Skip,
    Drop(u16),
    Parsed(Parsed),
}

#[derive(Debug, PartialEq, Default)]
pub struct Parsed {
    pub family: u8,
    pub protocol: u8,
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub later_fragment: bool,
    /// An ICMP error whose quote is cut short (a drop, after anti-spoofing).
    pub bad_quote: bool,
}

pub fn reference(p: &[u8], egress: bool) -> Expect {
    macro_rules! need {
        ($off:expr, $n:expr) => {
            match p.get($off..$off + $n) {
                Some(b) => b,
                None => return Expect::Drop(reason::MALFORMED),
            }
        };
    }
    let et = need!(12, 2);
    let mut r = Parsed::default();
    let l4;
    let mut hop_limit = 0;
    let mut fragment = false;
    match u16::from_be_bytes([et[0], et[1]]) {
        0x0800 => {
            let h = need!(14, 20);
            let ihl = (h[0] & 15) as usize * 4;
            if h[0] >> 4 != 4 || ihl < 20 {
                return Expect::Drop(reason::MALFORMED);
            }
            need!(14, ihl);
            r.family = 4;
            r.protocol = h[9];
            r.saddr = v4_mapped(h[12..16].try_into().unwrap());
            r.daddr = v4_mapped(h[16..20].try_into().unwrap());
            let word = u16::from_be_bytes([h[6], h[7]]);
            let offset = word & 0x1fff;
            if offset == 1 && r.protocol == TCP {
                return Expect::Drop(reason::MALFORMED); // RFC 1858
            }
            r.later_fragment = offset != 0;
            l4 = 14 + ihl;
        }
        0x86dd => {
            let h = need!(14, 40);
            if h[0] >> 4 != 6 {
                return Expect::Drop(reason::MALFORMED);
            }
            r.family = 6;
            hop_limit = h[7];
            r.saddr = h[8..24].try_into().unwrap();
            r.daddr = h[24..40].try_into().unwrap();
            let mapped = |a: &Addr| a[..10] == [0; 10] && a[10..12] == [0xff, 0xff];
            if mapped(&r.saddr) || mapped(&r.daddr) {
                return Expect::Drop(reason::MALFORMED); // IPv4-mapped: never on the wire
            }
            let mut next = h[6];
            let mut off = 54;
            let mut found = false;
            for _ in 0..8 {
                match next {
                    0 | 43 | 60 | 135 | 139 | 140 => {
                        let e = need!(off, 2);
                        next = e[0];
                        off += (e[1] as usize + 1) * 8;
                    }
                    51 => {
                        let e = need!(off, 2);
                        next = e[0];
                        off += (e[1] as usize + 2) * 4;
                    }
                    44 => {
                        let e = need!(off, 8);
                        let word = u16::from_be_bytes([e[2], e[3]]);
                        let (offset, more) = (word >> 3, word & 1 != 0);
                        if offset != 0 || more {
                            if fragment {
                                return Expect::Drop(reason::MALFORMED);
                            }
                            fragment = true;
                            r.later_fragment = offset != 0;
                        }
                        next = e[0];
                        off += 8;
                        if r.later_fragment {
                            found = true;
                            break;
                        }
                    }
                    _ => {
                        found = true;
                        break;
                    }
                }
            }
            if !found {
                return Expect::Drop(reason::UNKNOWN_L4);
            }
            r.protocol = next;
            l4 = off;
        }
        0x0806 => return arp(p, egress),
        _ => return Expect::Drop(reason::UNKNOWN_L3), // VLAN tags, other ethertypes
    }
    if r.later_fragment {
        return Expect::Parsed(r);
    }
    match r.protocol {
        TCP => {
            let h = need!(l4, 20);
            let doff = (h[12] >> 4) as usize * 4;
            if doff < 20 {
                return Expect::Drop(reason::MALFORMED);
            }
            need!(l4, doff);
            r.sport = u16::from_be_bytes([h[0], h[1]]);
            r.dport = u16::from_be_bytes([h[2], h[3]]);
        }
        UDP | SCTP => {
            let h = need!(l4, if r.protocol == UDP { 8 } else { 12 });
            r.sport = u16::from_be_bytes([h[0], h[1]]);
            r.dport = u16::from_be_bytes([h[2], h[3]]);
        }
        ICMP | ICMPV6 => {
            let h = need!(l4, 8);
            let v4 = r.protocol == ICMP;
            let kind = h[0];
            if !v4 && r.family == 6 {
                let nd = (133..=137).contains(&kind) && hop_limit == 255;
                let mld = ((130..=132).contains(&kind) || kind == 143) && hop_limit == 1;
                if nd || mld {
                    // A pod's Router Advertisements and Redirects drop.
                    if egress && (kind == 134 || kind == 137) {
                        return Expect::Drop(reason::SPOOFED_SOURCE);
                    }
                    if !egress {
                        return Expect::Skip;
                    }
                    // From the pod: its own address, a link-local one or `::`; a
                    // Neighbour Advertisement names its address or a link-local one.
                    let link_local = |a: &[u8]| a[0] == 0xfe && a[1] & 0xc0 == 0x80;
                    let ours = |a: &[u8]| a == SERVER6 || link_local(a);
                    if !ours(&r.saddr) && r.saddr != [0; 16] {
                        return Expect::Drop(reason::SPOOFED_SOURCE);
                    }
                    if kind == 136 && !ours(need!(l4 + 8, 16)) {
                        return Expect::Drop(reason::SPOOFED_SOURCE);
                    }
                    return Expect::Skip;
                }
            }
            let echo = if v4 {
                kind == 0 || kind == 8
            } else {
                kind == 128 || kind == 129
            };
            let error = if v4 {
                [3, 11, 12].contains(&kind)
            } else {
                (1..=4).contains(&kind)
            };
            if echo {
                r.sport = u16::from_be_bytes([h[4], h[5]]);
                r.dport = r.sport;
            } else if error {
                r.bad_quote = !quote_ok(p, l4 + 8, r.family);
            }
        }
        _ => {}
    }
    Expect::Parsed(r)
}

/// ARP: passes towards the pod; from it, Ethernet/IPv4 ARP whose sender is the pod (its
/// MAC, its address or 0.0.0.0).
fn arp(p: &[u8], egress: bool) -> Expect {
    if !egress {
        return Expect::Skip;
    }
    if p[6..12] != POD_MAC {
        return Expect::Drop(reason::SPOOFED_SOURCE);
    }
    let Some(a) = p.get(14..32) else {
        return Expect::Drop(reason::MALFORMED);
    };
    if a[..6] != [0, 1, 8, 0, 6, 4] {
        return Expect::Drop(reason::MALFORMED);
    }
    if a[8..14] != POD_MAC || (a[14..18] != SERVER && a[14..18] != [0; 4]) {
        return Expect::Drop(reason::SPOOFED_SOURCE);
    }
    Expect::Skip
}

/// Whether the quote of an ICMP error is long enough where it must be.
fn quote_ok(p: &[u8], off: usize, family: u8) -> bool {
    let (protocol, l4) = if family == 4 {
        let Some(h) = p.get(off..off + 20) else {
            return false;
        };
        let ihl = (h[0] & 15) as usize * 4;
        if h[0] >> 4 != 4 || ihl < 20 || u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
            return true; // not a quote the classifier reads further
        }
        (h[9], off + ihl)
    } else {
        let Some(h) = p.get(off..off + 40) else {
            return false;
        };
        (h[6], off + 40)
    };
    match protocol {
        TCP | UDP | SCTP | ICMP | ICMPV6 => p.len() >= l4 + 8,
        _ => true,
    }
}

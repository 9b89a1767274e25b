//! Header parsing that honours the wire: IPv4 options (IHL), a bounded walk of the
//! IPv6 extension-header chain, and a drop reason for anything truncated or malformed.

use aya_ebpf::programs::TcContext;
use netpol_common::{proto, reason, v4_mapped, Addr, CtKey};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
/// Extension headers walked before the upper layer must have been found.
const MAX_IPV6_EXT: usize = 6;

#[derive(Clone, Copy, Default)]
pub struct Packet {
    pub family: u8,
    pub protocol: u8,
    pub tcp_flags: u8,
    pub saddr: Addr,
    pub daddr: Addr,
    /// Host order. ICMP echo: the identifier, in both ports (so replies reverse onto it).
    pub sport: u16,
    pub dport: u16,
}

impl Packet {
    #[inline(always)]
    pub fn fill_ct_key(&self, k: &mut CtKey) {
        k.saddr = self.saddr;
        k.daddr = self.daddr;
        k.sport = self.sport;
        k.dport = self.dport;
        k.protocol = self.protocol;
        k._pad = [0; 3];
    }
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, u16> {
    ctx.load::<T>(off).map_err(|_| reason::MALFORMED)
}

/// `Ok(None)`: a packet the classifier does not judge (not IP, or IPv6 neighbour
/// discovery, which the link needs to work at all).
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Option<Packet>, u16> {
    let ethertype = u16::from_be(load::<u16>(ctx, 12)?);
    let mut p = Packet::default();
    let l4: usize;
    let mut first_fragment = true;
    match ethertype {
        ETH_P_IP => {
            let vihl: u8 = load(ctx, ETH_HLEN)?;
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return Err(reason::MALFORMED);
            }
            let frag = u16::from_be(load::<u16>(ctx, ETH_HLEN + 6)?);
            first_fragment = frag & 0x1fff == 0;
            p.family = 4;
            p.protocol = load(ctx, ETH_HLEN + 9)?;
            p.saddr = v4_mapped(load::<[u8; 4]>(ctx, ETH_HLEN + 12)?);
            p.daddr = v4_mapped(load::<[u8; 4]>(ctx, ETH_HLEN + 16)?);
            l4 = ETH_HLEN + ihl;
        }
        ETH_P_IPV6 => {
            p.family = 6;
            p.saddr = load(ctx, ETH_HLEN + 8)?;
            p.daddr = load(ctx, ETH_HLEN + 24)?;
            let mut next: u8 = load(ctx, ETH_HLEN + 6)?;
            let mut off = ETH_HLEN + 40;
            let mut found = false;
            for _ in 0..MAX_IPV6_EXT {
                match next {
                    // hop-by-hop, routing, destination options: (len + 1) * 8 bytes
                    0 | 43 | 60 => {
                        let hdr: [u8; 2] = load(ctx, off)?;
                        next = hdr[0];
                        off += (hdr[1] as usize + 1) * 8;
                    }
                    // fragment header: 8 bytes; offset in the high 13 bits of bytes 2..4
                    44 => {
                        let hdr: [u8; 4] = load(ctx, off)?;
                        next = hdr[0];
                        if u16::from_be_bytes([hdr[2], hdr[3]]) >> 3 != 0 {
                            first_fragment = false;
                        }
                        off += 8;
                    }
                    _ => {
                        found = true;
                        break;
                    }
                }
            }
            if !found {
                return Err(reason::UNKNOWN_L4);
            }
            p.protocol = next;
            l4 = off;
        }
        _ => return Ok(None),
    }
    if !first_fragment {
        // No upper-layer header: judged with port 0, so only port-less rules allow it.
        return Ok(Some(p));
    }
    match p.protocol {
        proto::TCP => {
            let ports: [u16; 2] = load(ctx, l4)?;
            p.sport = u16::from_be(ports[0]);
            p.dport = u16::from_be(ports[1]);
            p.tcp_flags = load(ctx, l4 + 13)?;
        }
        proto::UDP | proto::SCTP => {
            let ports: [u16; 2] = load(ctx, l4)?;
            p.sport = u16::from_be(ports[0]);
            p.dport = u16::from_be(ports[1]);
        }
        proto::ICMP | proto::ICMPV6 => {
            let hdr: [u8; 8] = load(ctx, l4)?;
            let kind = hdr[0];
            if p.protocol == proto::ICMPV6 && (133..=137).contains(&kind) {
                return Ok(None);
            }
            let is_echo = if p.protocol == proto::ICMP {
                kind == 0 || kind == 8
            } else {
                kind == 128 || kind == 129
            };
            if is_echo {
                let id = u16::from_be_bytes([hdr[4], hdr[5]]);
                p.sport = id;
                p.dport = id;
            }
        }
        _ => {}
    }
    Ok(Some(p))
}

//! One packet builder for every suite: L4 headers, IPv4 (options, fragments) and IPv6
//! (extension headers) packets, Ethernet frames. The classifier rig runs them through
//! `BPF_PROG_TEST_RUN`; the lab suites write them to raw sockets.

use std::net::IpAddr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;

pub fn tcp(sport: u16, dport: u16, flags: u8) -> (u8, Vec<u8>) {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    (TCP, h)
}

pub fn udp(sport: u16, dport: u16) -> (u8, Vec<u8>) {
    let mut h = vec![0u8; 8];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..6].copy_from_slice(&8u16.to_be_bytes());
    (UDP, h)
}

pub fn sctp(sport: u16, dport: u16) -> (u8, Vec<u8>) {
    let mut h = vec![0u8; 12];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    (SCTP, h)
}

/// ICMP (`v6` false) or ICMPv6 header with `rest` (the id for echo) and a payload.
pub fn icmp(v6: bool, kind: u8, code: u8, id: u16, payload: &[u8]) -> (u8, Vec<u8>) {
    let mut h = vec![kind, code, 0, 0];
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    (if v6 { ICMPV6 } else { ICMP }, h)
}

/// IPv4 header knobs.
#[derive(Clone, Default)]
pub struct V4 {
    /// Options (padded to a multiple of 4 by the builder).
    pub options: Vec<u8>,
    pub id: u16,
    /// Fragment offset in 8-byte units.
    pub offset: u16,
    pub more: bool,
}

/// An IPv4 packet without the Ethernet header.
pub fn ip4(src: [u8; 4], dst: [u8; 4], l4: (u8, Vec<u8>), o: &V4) -> Vec<u8> {
    let mut opts = o.options.clone();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    let ihl = 20 + opts.len();
    let mut p = vec![0u8; ihl];
    p[0] = 0x40 | (ihl / 4) as u8;
    p[2..4].copy_from_slice(&((ihl + l4.1.len()) as u16).to_be_bytes());
    p[4..6].copy_from_slice(&o.id.to_be_bytes());
    let frag = o.offset | if o.more { 0x2000 } else { 0 };
    p[6..8].copy_from_slice(&frag.to_be_bytes());
    p[8] = 64;
    p[9] = l4.0;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..].copy_from_slice(&opts);
    p.extend_from_slice(&l4.1);
    p
}

/// IPv6 extension headers, chained by the builder.
#[derive(Clone, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOpts,
    /// offset in 8-byte units
    Fragment {
        offset: u16,
        more: bool,
        id: u32,
    },
    Auth,
}

impl Ext {
    fn code(&self) -> u8 {
        match self {
            Ext::HopByHop => 0,
            Ext::Routing => 43,
            Ext::DestOpts => 60,
            Ext::Fragment { .. } => 44,
            Ext::Auth => 51,
        }
    }
    fn bytes(&self, next: u8) -> Vec<u8> {
        match self {
            // 16 bytes: len field 1 (units of 8 beyond the first 8)
            Ext::HopByHop | Ext::DestOpts => {
                let mut b = vec![next, 1];
                b.extend_from_slice(&[1, 12]); // PadN option covering the rest
                b.extend_from_slice(&[0; 12]);
                b
            }
            // type 0 routing header with no addresses left: 8 bytes
            Ext::Routing => vec![next, 0, 0, 0, 0, 0, 0, 0],
            Ext::Fragment { offset, more, id } => {
                let word = (offset << 3) | u16::from(*more);
                let mut b = vec![next, 0];
                b.extend_from_slice(&word.to_be_bytes());
                b.extend_from_slice(&id.to_be_bytes());
                b
            }
            // 24 bytes: (len + 2) * 4 with len 4
            Ext::Auth => {
                let mut b = vec![next, 4];
                b.extend_from_slice(&[0; 22]);
                b
            }
        }
    }
}

/// An IPv6 packet without the Ethernet header; `next` overrides the last next-header
/// value (an unknown upper layer, say).
pub fn ip6(src: [u8; 16], dst: [u8; 16], exts: &[Ext], l4: (u8, Vec<u8>)) -> Vec<u8> {
    ip6_hop(src, dst, exts, l4, 64)
}

pub fn ip6_hop(
    src: [u8; 16],
    dst: [u8; 16],
    exts: &[Ext],
    l4: (u8, Vec<u8>),
    hop_limit: u8,
) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, e) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map(Ext::code).unwrap_or(l4.0);
        chain.extend(e.bytes(next));
    }
    let first = exts.first().map(Ext::code).unwrap_or(l4.0);
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((chain.len() + l4.1.len()) as u16).to_be_bytes());
    p[6] = first;
    p[7] = hop_limit;
    p[8..24].copy_from_slice(&src);
    p[24..40].copy_from_slice(&dst);
    p.extend(chain);
    p.extend_from_slice(&l4.1);
    p
}

/// A frame between the two MACs every crafted frame uses (02:00:00:00:00:00 both ways:
/// the rig's pod, `rig::POD_MAC`, and its peer).
pub fn eth(ethertype: u16, ip: Vec<u8>) -> Vec<u8> {
    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 0];
    frame_between(MAC, MAC, ethertype, ip)
}

pub fn v4(src: [u8; 4], dst: [u8; 4], l4: (u8, Vec<u8>)) -> Vec<u8> {
    eth(0x0800, ip4(src, dst, l4, &V4::default()))
}

pub fn v4o(src: [u8; 4], dst: [u8; 4], l4: (u8, Vec<u8>), o: &V4) -> Vec<u8> {
    eth(0x0800, ip4(src, dst, l4, o))
}

pub fn v6(src: [u8; 16], dst: [u8; 16], exts: &[Ext], l4: (u8, Vec<u8>)) -> Vec<u8> {
    eth(0x86dd, ip6(src, dst, exts, l4))
}

/// UDP with a payload (the length field covers it).
pub fn udp_payload(sport: u16, dport: u16, payload: &[u8]) -> (u8, Vec<u8>) {
    let (p, mut h) = udp(sport, dport);
    h[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(payload);
    (p, h)
}

/// SCTP: the common header, then an INIT chunk.
pub fn sctp_init(sport: u16, dport: u16) -> (u8, Vec<u8>) {
    let (p, mut h) = sctp(sport, dport);
    h.resize(32, 0);
    h[12] = 1;
    h[14..16].copy_from_slice(&20u16.to_be_bytes());
    (p, h)
}

/// An Ethernet frame of `l4` from `src` to `dst` (one family; IPv6 without extension
/// headers).
pub fn frame(src: IpAddr, dst: IpAddr, l4: (u8, Vec<u8>)) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => v4(s.octets(), d.octets(), l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => v6(s.octets(), d.octets(), &[], l4),
        _ => unreachable!("same family"),
    }
}

/// ARP for `sender` (MAC, IPv4) to `target` (MAC, IPv4): `op` 1 a request, 2 a reply.
pub fn arp(op: u8, sender: ([u8; 6], [u8; 4]), target: ([u8; 6], [u8; 4])) -> Vec<u8> {
    [
        &[0, 1, 8, 0, 6, 4, 0, op][..],
        &sender.0,
        &sender.1,
        &target.0,
        &target.1,
    ]
    .concat()
}

/// A frame from `src` to `dst` (MACs) of `ethertype`.
pub fn frame_between(dst: [u8; 6], src: [u8; 6], ethertype: u16, body: Vec<u8>) -> Vec<u8> {
    [&dst[..], &src, &ethertype.to_be_bytes(), &body].concat()
}

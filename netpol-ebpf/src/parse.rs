//! Header parsing that honours the wire: IPv4 options (IHL) and fragments, a bounded
//! walk of the IPv6 extension-header chain, TCP/UDP/SCTP ports, ICMP/ICMPv6 echo ids
//! and errors, and a drop reason for anything truncated or malformed.

use aya_ebpf::{
    cty::c_void,
    helpers::bpf_skb_load_bytes,
    programs::{sk_buff::SkBuff, SkBuffContext, TcContext},
    EbpfContext,
};
use core::mem::MaybeUninit;
use netpol_common::{direction, proto, reason, v4_mapped, Addr, CtKey};

/// `parse` result: the packet is not judged (not IP, neighbour discovery, MLD).
pub const SKIP: u16 = u16::MAX;
/// `parse` / `parse_quoted` result: parsed.
pub const PARSED: u16 = 0;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
/// Extension headers walked before the upper layer must have been found.
pub const MAX_IPV6_EXT: usize = 8;

/// ICMP messages by how the classifier treats them.
pub mod icmp {
    /// Not ICMP, or an echo request/reply (tracked by its identifier like a port).
    pub const TRACKED: u8 = 0;
    /// An error quoting a packet at `l4 + 8`: passes when that packet's connection is
    /// tracked, else judged; never creates state.
    pub const ERROR: u8 = 1;
    /// Any other message: judged by policy, never creates state.
    pub const UNTRACKED: u8 = 2;
}

/// Link-layer messages `parse` passes on as [`SKIP`], which `from_pod` still checks
/// against the pod's own addresses (`neighbour.rs`); 0 for any other frame.
pub mod link {
    pub const ARP: u8 = 1;
    /// IPv6 neighbour discovery or multicast listener message.
    pub const ND: u8 = 2;
}

/// Where a packet stands in fragmentation.
pub mod frag {
    /// Not fragmented (IPv6 atomic fragments included).
    pub const NONE: u8 = 0;
    /// Offset 0, more fragments follow: judged on its ports, verdict remembered.
    pub const FIRST: u8 = 1;
    /// Offset > 0: no upper-layer header; follows the first fragment's verdict.
    pub const LATER: u8 = 2;
}

#[repr(align(8))]
#[derive(Clone, Copy)]
pub struct Packet {
    pub saddr: Addr,
    pub daddr: Addr,
    pub family: u8,
    pub protocol: u8,
    pub tcp_flags: u8,
    /// `frag::*`.
    pub frag: u8,
    /// `icmp::*`: what kind of ICMP/ICMPv6 message this is, when it is one.
    pub icmp: u8,
    /// The hook's direction (`direction::*`), set by the caller.
    pub dir: u8,
    /// 1: the destination MAC is a group (broadcast or multicast) address.
    pub l2_group: u8,
    /// `link::*`: which link-layer message a [`SKIP`] was.
    pub link: u8,
    /// ICMPv6 type of an ND/MLD message.
    pub nd_kind: u8,
    /// The source MAC.
    pub smac: [u8; 6],
    /// Offset of the upper-layer header from the start of the frame.
    pub l4: u16,
    /// Fragment identification; with `frag_proto`, keys the datagram.
    pub frag_id: u32,
    /// Bytes of the whole frame (`skb->len`), set by the caller.
    pub len: u32,
    /// IPv4 protocol, or the next header of the IPv6 fragment header.
    pub frag_proto: u8,
    /// Host order. ICMP echo: the identifier, in both ports (so replies reverse onto it).
    pub sport: u16,
    pub dport: u16,
}

/// Zeroes `slot` in volatile 8-byte stores: plain ones LLVM merges into a call of aya's
/// byte-at-a-time `memset` (a tenth of a conntrack hit, when the packet was cleared so).
///
/// # Safety
/// All zeroes must be a valid `T`.
#[inline(always)]
pub(crate) unsafe fn zeroed_in<T>(slot: &mut MaybeUninit<T>) -> &mut T {
    const { assert!(core::mem::align_of::<T>() >= 8) };
    let words = slot.as_mut_ptr() as *mut u64;
    for i in 0..core::mem::size_of::<T>() / 8 {
        // SAFETY: within the value; 8-aligned, so its size is a multiple of 8.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: every byte written; the caller vouches for zeroes.
    unsafe { slot.assume_init_mut() }
}

impl Packet {
    /// A packet of zeroes but for its direction and length, made in place (a value
    /// returned would be copied, and LLVM makes a copy of known zeroes a `memset`).
    #[inline(always)]
    pub fn init(slot: &mut MaybeUninit<Packet>, dir: u8, len: u32) -> &mut Packet {
        // SAFETY: all zeroes is a valid `Packet` (integers and byte arrays).
        let p = unsafe { zeroed_in(slot) };
        p.dir = dir;
        p.len = len;
        p
    }

    #[inline(always)]
    pub fn fill_ct_key(&self, k: &mut CtKey) {
        k.saddr = self.saddr;
        k.daddr = self.daddr;
        k.sport = self.sport;
        k.dport = self.dport;
        k.set_protocol(self.protocol);
    }
}

/// What packets are read from: a TC hook's frame (from the Ethernet header) or the
/// cgroup hook's on local delivery (from the IP header, see `service::local_in`).
pub(crate) trait Frame: EbpfContext {
    fn buf(&self) -> &SkBuff;
    /// The interface whose event bucket a verdict's event draws on.
    fn event_ifindex(&self) -> u32;
    /// [`parse`] for a frame, [`parse_ip`] for a packet.
    fn parse_into(&self, p: &mut Packet) -> u16;
}

impl Frame for TcContext {
    #[inline(always)]
    fn buf(&self) -> &SkBuff {
        &self.skb
    }
    #[inline(always)]
    fn event_ifindex(&self) -> u32 {
        // SAFETY: the context pointer is valid for the whole program run.
        unsafe { (*self.skb.skb).ifindex }
    }
    #[inline(always)]
    fn parse_into(&self, p: &mut Packet) -> u16 {
        parse::<_, false>(self, p)
    }
}

/// A packet delivered to a local socket, judged as the egress of the client pod whose
/// host veth is `client` (its events are that pod's).
pub(crate) struct LocalIn {
    pub ctx: SkBuffContext,
    pub client: u32,
}

impl EbpfContext for LocalIn {
    fn as_ptr(&self) -> *mut c_void {
        self.ctx.as_ptr()
    }
}

impl Frame for LocalIn {
    #[inline(always)]
    fn buf(&self) -> &SkBuff {
        &self.ctx.skb
    }
    #[inline(always)]
    fn event_ifindex(&self) -> u32 {
        self.client
    }
    #[inline(always)]
    fn parse_into(&self, p: &mut Packet) -> u16 {
        // SAFETY: the context pointer is valid for the whole program run.
        let ethertype = u16::from_be(unsafe { (*self.ctx.skb.skb).protocol } as u16);
        match ethertype {
            ETH_P_IP => parse_ip::<_, false>(self, p, 4, 0),
            ETH_P_IPV6 => parse_ip::<_, false>(self, p, 6, 0),
            _ => SKIP, // not IP: no Service packet
        }
    }
}

/// Copies `size_of::<T>()` packet bytes at `off` into `dst`; `false` when the packet is
/// too short. Results are written into initialised memory and parsing returns plain
/// codes, not `Result<T, _>`: LLVM leaves the payload of an `Err` undefined, and the
/// verifier rejects a read of the undefined register on merged paths.
#[inline(always)]
pub(crate) fn read<C: Frame, T>(ctx: &C, off: usize, dst: &mut T) -> bool {
    // SAFETY: a `MaybeUninit<T>` has the layout of a `T`; what is written is plain bytes.
    read_uninit(ctx, off, unsafe {
        &mut *(dst as *mut T as *mut MaybeUninit<T>)
    })
}

/// [`read`] into uninitialised memory: the helper writes every byte (it zeroes the
/// buffer when it fails), so nothing is cleared first. Clearing would be a call of the
/// byte-at-a-time `memset`, which cost a conntrack hit a sixth of its time.
#[inline(always)]
pub(crate) fn read_uninit<C: Frame, T>(ctx: &C, off: usize, dst: &mut MaybeUninit<T>) -> bool {
    // SAFETY: `dst` is valid for writes of its size; the helper bounds-checks the packet.
    unsafe {
        bpf_skb_load_bytes(
            ctx.buf().skb as *const c_void,
            off as u32,
            dst.as_mut_ptr() as *mut c_void,
            core::mem::size_of::<T>() as u32,
        ) == 0
    }
}

/// [`read_uninit`], in place where the bytes are in the packet's linear part (nearly
/// always for the headers up to L4): a helper call and its return cost more than the
/// copy. Each such read is two paths for the verifier to walk, so only where packets are
/// judged (`DIRECT` in [`parse`]), not in loops, and not for the Service check after
/// DNAT (which had tripled `to_remote`'s and `local_in`'s verification).
#[inline(always)]
pub(crate) fn read_direct<C: Frame, T>(ctx: &C, off: usize, dst: &mut MaybeUninit<T>) -> bool {
    let size = core::mem::size_of::<T>();
    let skb = ctx.buf().skb;
    // SAFETY: the context pointer is valid for the whole program run.
    let (start, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    // The bound on `off` is for the verifier.
    if off < 256 {
        let at = start + off;
        if at + size <= end {
            // SAFETY: `at..at + size` lies within the packet's linear data (checked
            // above, as the verifier requires); `dst` is valid for writes of `size`.
            unsafe {
                core::ptr::copy_nonoverlapping(at as *const u8, dst.as_mut_ptr() as *mut u8, size)
            };
            return true;
        }
    }
    read_uninit(ctx, off, dst)
}

/// `let $name: &$t` (plain bytes) read at `$off`, or returns `MALFORMED` from the
/// enclosing function. A reference into the buffer, not a copy: a copy is a second
/// stack slot, and the whole call chain has 512 bytes.
macro_rules! load_or_drop {
    (direct $ctx:expr, $off:expr, $name:ident: $t:ty) => {
        let mut $name = MaybeUninit::<$t>::uninit();
        let read = if DIRECT {
            read_direct($ctx, $off, &mut $name)
        } else {
            read_uninit($ctx, $off, &mut $name)
        };
        if !read {
            return reason::MALFORMED;
        }
        // SAFETY: all of it was written; any bytes are a valid `$t`.
        let $name = unsafe { $name.assume_init_ref() };
    };
    ($ctx:expr, $off:expr, $name:ident: $t:ty) => {
        let mut $name = MaybeUninit::<$t>::uninit();
        if !read_uninit($ctx, $off, &mut $name) {
            return reason::MALFORMED;
        }
        // SAFETY: the helper wrote all of it; any bytes are a valid `$t`.
        let $name = unsafe { $name.assume_init_ref() };
    };
}

/// `dst = v4_mapped(a)` in byte stores that LLVM cannot merge into a call of `memset`.
#[inline(always)]
fn set_v4_mapped(dst: &mut Addr, a: [u8; 4]) {
    let mapped = v4_mapped(a);
    for (i, b) in mapped.iter().enumerate() {
        // SAFETY: within the array.
        unsafe { dst.as_mut_ptr().add(i).write_volatile(*b) };
    }
}

/// Reads into `$dst` or returns `MALFORMED` from the enclosing function.
macro_rules! read_or_drop {
    ($ctx:expr, $off:expr, $dst:expr) => {
        if !read($ctx, $off, $dst) {
            return reason::MALFORMED;
        }
    };
}

/// What becomes of an ND/MLD message: a drop for a pod's Router Advertisement or
/// Redirect (a pod is no router: they would move its neighbours' routes to it), else
/// [`SKIP`], the link's own traffic, whose addresses `neighbour::check` then holds to
/// the pod's. A call of its own, like `has_v4_mapped`, for the verifier's sake.
#[inline(never)]
fn neighbour_discovery(p: &Packet, kind: u8) -> u16 {
    if p.dir == direction::EGRESS && (kind == 134 || kind == 137) {
        return reason::SPOOFED_SOURCE;
    }
    SKIP
}

/// A call of its own: inlined, its compares moved the parser's stack slots and tripled
/// the verifier's work on `from_pod`.
#[inline(never)]
fn has_v4_mapped(p: &Packet) -> u32 {
    let mapped = |a: &Addr| {
        let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
        w(0) == 0 && w(4) == 0 && w(8) == u32::from_be(0x0000_ffff)
    };
    (mapped(&p.saddr) || mapped(&p.daddr)) as u32
}

/// ICMP/ICMPv6 errors that quote the packet that caused them.
#[inline(always)]
fn is_icmp_error(protocol: u8, kind: u8) -> bool {
    if protocol == proto::ICMP {
        // destination unreachable (incl. fragmentation needed), time exceeded,
        // parameter problem
        kind == 3 || kind == 11 || kind == 12
    } else {
        // destination unreachable, packet too big, time exceeded, parameter problem
        (1..=4).contains(&kind)
    }
}

/// Parses the frame into `p`. Returns [`PARSED`], [`SKIP`] (a packet the classifier
/// does not judge: ARP, or IPv6 neighbour discovery / multicast listener messages,
/// which the link needs to work at all), or a drop reason.
#[inline(always)]
pub fn parse<C: Frame, const DIRECT: bool>(ctx: &C, p: &mut Packet) -> u16 {
    // SAFETY: the context pointer is valid for the whole program run.
    if unsafe { (*ctx.buf().skb).vlan_present } != 0 {
        // The kernel took a tag off before TC; the stack behind would deliver the rest.
        return reason::UNKNOWN_L3;
    }
    load_or_drop!(direct ctx, 0, eth: [u8; 14]);
    p.l2_group = eth[0] & 1;
    p.smac = [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]];
    match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => parse_ip::<_, DIRECT>(ctx, p, 4, ETH_HLEN),
        ETH_P_IPV6 => parse_ip::<_, DIRECT>(ctx, p, 6, ETH_HLEN),
        // ARP is the link's own business (not judged by policy).
        ETH_P_ARP => {
            p.link = link::ARP;
            SKIP
        }
        // Tagged frames (802.1Q, 802.1ad, priority tags) and every other ethertype: a
        // channel policy could not see.
        _ => reason::UNKNOWN_L3,
    }
}

/// Parses an IP packet of version `family` at `base` into `p` (results as [`parse`]).
#[inline(always)]
pub fn parse_ip<C: Frame, const DIRECT: bool>(
    ctx: &C,
    p: &mut Packet,
    family: u8,
    base: usize,
) -> u16 {
    let l4: usize;
    let mut hop_limit: u8 = 0;
    match family {
        4 => {
            // version/IHL .. destination: the fixed 20 bytes
            load_or_drop!(direct ctx, base, h: [u8; 20]);
            let ihl = ((h[0] & 0x0f) as usize) * 4;
            if h[0] >> 4 != 4 || ihl < 20 {
                return reason::MALFORMED;
            }
            p.family = 4;
            // The whole header, options included, must be there (what a read of its
            // last byte would check, without the helper call).
            if base + ihl > ctx.buf().len() as usize {
                return reason::MALFORMED;
            }
            let frag_word = u16::from_be_bytes([h[6], h[7]]);
            let offset = frag_word & 0x1fff;
            let more = frag_word & 0x2000 != 0;
            p.protocol = h[9];
            set_v4_mapped(&mut p.saddr, [h[12], h[13], h[14], h[15]]);
            set_v4_mapped(&mut p.daddr, [h[16], h[17], h[18], h[19]]);
            if offset != 0 || more {
                p.frag = if offset != 0 {
                    frag::LATER
                } else {
                    frag::FIRST
                };
                p.frag_id = u16::from_be_bytes([h[4], h[5]]) as u32;
                p.frag_proto = p.protocol;
                // RFC 1858: a fragment at offset 8 can only serve to overwrite the TCP
                // header of the first one.
                if offset == 1 && p.protocol == proto::TCP {
                    return reason::MALFORMED;
                }
            }
            l4 = base + ihl;
        }
        _ => {
            load_or_drop!(direct ctx, base, h: [u8; 8]);
            if h[0] >> 4 != 6 {
                return reason::MALFORMED;
            }
            p.family = 6;
            hop_limit = h[7];
            read_or_drop!(ctx, base + 8, &mut p.saddr);
            read_or_drop!(ctx, base + 24, &mut p.daddr);
            // IPv4-mapped addresses (::ffff:0:0/96) have no business on the wire (Linux
            // drops them on input), and in the maps' form they would read as IPv4.
            if has_v4_mapped(p) != 0 {
                return reason::MALFORMED;
            }
            let mut next: u8 = h[6];
            let mut off = base + 40;
            let mut found = false;
            for _ in 0..MAX_IPV6_EXT {
                match next {
                    // hop-by-hop, routing, destination options, mobility, HIP, shim6:
                    // (len + 1) * 8 bytes
                    0 | 43 | 60 | 135 | 139 | 140 => {
                        load_or_drop!(ctx, off, hdr: [u8; 2]);
                        next = hdr[0];
                        off += (hdr[1] as usize + 1) * 8;
                    }
                    // authentication header: (len + 2) * 4 bytes
                    51 => {
                        load_or_drop!(ctx, off, hdr: [u8; 2]);
                        next = hdr[0];
                        off += (hdr[1] as usize + 2) * 4;
                    }
                    // fragment header: 8 bytes; offset in the high 13 bits of bytes 2..4,
                    // M in the low bit, identification in bytes 4..8
                    44 => {
                        load_or_drop!(ctx, off, hdr: [u8; 8]);
                        let word = u16::from_be_bytes([hdr[2], hdr[3]]);
                        let offset = word >> 3;
                        let more = word & 1 != 0;
                        // An atomic fragment (offset 0, no more) is a whole datagram.
                        if offset != 0 || more {
                            if p.frag != frag::NONE {
                                return reason::MALFORMED; // two fragment headers
                            }
                            p.frag = if offset != 0 {
                                frag::LATER
                            } else {
                                frag::FIRST
                            };
                            p.frag_id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                            p.frag_proto = hdr[0];
                        }
                        next = hdr[0];
                        off += 8;
                        if p.frag == frag::LATER {
                            // What follows is the middle of a datagram, not a header.
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
                return reason::UNKNOWN_L4;
            }
            p.protocol = next;
            l4 = off;
        }
    }
    p.l4 = l4 as u16;
    if p.frag == frag::LATER {
        // No upper-layer header: the first fragment's verdict decides.
        return PARSED;
    }
    match p.protocol {
        proto::TCP => {
            load_or_drop!(direct ctx, l4, hdr: [u8; 20]);
            p.sport = u16::from_be_bytes([hdr[0], hdr[1]]);
            p.dport = u16::from_be_bytes([hdr[2], hdr[3]]);
            let doff = (hdr[12] >> 4) as usize * 4;
            if doff < 20 {
                return reason::MALFORMED; // data offset below the minimum header
            }
            // The options, too, must be there.
            if l4 + doff > ctx.buf().len() as usize {
                return reason::MALFORMED;
            }
            p.tcp_flags = hdr[13];
        }
        proto::UDP | proto::SCTP => {
            // UDP's header is 8 bytes, SCTP's common header 12: both must be there.
            load_or_drop!(direct ctx, l4, hdr: [u8; 8]);
            if p.protocol == proto::SCTP {
                load_or_drop!(ctx, l4 + 8, _tag: [u8; 4]);
            }
            p.sport = u16::from_be_bytes([hdr[0], hdr[1]]);
            p.dport = u16::from_be_bytes([hdr[2], hdr[3]]);
        }
        proto::ICMP | proto::ICMPV6 => {
            load_or_drop!(direct ctx, l4, hdr: [u8; 8]);
            let kind = hdr[0];
            if p.protocol == proto::ICMPV6 && p.family == 6 {
                // Neighbour discovery (RFC 4861: hop limit 255, never routed) and
                // multicast listener messages (RFC 2710/3810: hop limit 1).
                if ((133..=137).contains(&kind) && hop_limit == 255)
                    || (((130..=132).contains(&kind) || kind == 143) && hop_limit == 1)
                {
                    p.link = link::ND;
                    p.nd_kind = kind;
                    return neighbour_discovery(p, kind);
                }
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
            } else if is_icmp_error(p.protocol, kind) {
                p.icmp = icmp::ERROR;
            } else {
                p.icmp = icmp::UNTRACKED;
            }
        }
        _ => {}
    }
    PARSED
}

/// The tuple of the packet an ICMP error quotes, into `k` (as that packet travelled).
/// [`PARSED`]; [`SKIP`] when the quote is not a first fragment of a TCP/UDP/SCTP/echo
/// packet (the error is then judged as any other packet); `MALFORMED` when cut short.
#[inline(always)]
pub fn parse_quoted<C: Frame>(ctx: &C, p: &Packet, k: &mut CtKey) -> u16 {
    let off = p.l4 as usize + 8;
    let l4: usize;
    if p.family == 4 {
        load_or_drop!(ctx, off, h: [u8; 20]);
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        if h[0] >> 4 != 4 || ihl < 20 {
            return SKIP;
        }
        if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
            return SKIP; // a later fragment quotes no ports
        }
        k.protocol = h[9];
        k.saddr = v4_mapped([h[12], h[13], h[14], h[15]]);
        k.daddr = v4_mapped([h[16], h[17], h[18], h[19]]);
        l4 = off + ihl;
    } else {
        // The quoted packet's own extension headers are not walked: an error quoting
        // one is judged by policy like any other packet.
        load_or_drop!(ctx, off, h: [u8; 8]);
        k.protocol = h[6];
        read_or_drop!(ctx, off + 8, &mut k.saddr);
        read_or_drop!(ctx, off + 24, &mut k.daddr);
        l4 = off + 40;
    }
    // Not `set_protocol`: here (ICMP errors only) its store cost `from_pod` 7.7k more
    // verified instructions than the `memset` call.
    k._pad = [0; 3];
    let mut hdr = [0u8; 8];
    match k.protocol {
        proto::TCP | proto::UDP | proto::SCTP => {
            // RFC 792 quotes at least 8 bytes of the upper layer.
            read_or_drop!(ctx, l4, &mut hdr);
            k.sport = u16::from_be_bytes([hdr[0], hdr[1]]);
            k.dport = u16::from_be_bytes([hdr[2], hdr[3]]);
        }
        proto::ICMP | proto::ICMPV6 => {
            read_or_drop!(ctx, l4, &mut hdr);
            let echo = if k.protocol == proto::ICMP {
                hdr[0] == 0 || hdr[0] == 8
            } else {
                hdr[0] == 128 || hdr[0] == 129
            };
            if !echo {
                return SKIP;
            }
            let id = u16::from_be_bytes([hdr[4], hdr[5]]);
            k.sport = id;
            k.dport = id;
        }
        _ => return SKIP,
    }
    PARSED
}

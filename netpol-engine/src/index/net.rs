//! CIDRs in the maps' address form: IPv6, with IPv4 v4-mapped and its prefix offset by 96.

use std::fmt;
use std::net::IpAddr;

use netpol_common::{v4_mapped, Addr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Addr,
    /// Prefix length over the 128-bit form (IPv4 /24 is 120).
    pub prefix: u8,
}

pub fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn ip_of(addr: &Addr) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(*addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

pub fn is_v4(addr: &Addr) -> bool {
    addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff
}

impl Cidr {
    pub fn host(ip: IpAddr) -> Cidr {
        Cidr {
            addr: addr_of(ip),
            prefix: 128,
        }
    }

    /// Parses `a.b.c.d/n` or `x::/n`; host bits are cleared (the network is meant).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (missing /prefix)"))?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR (bad address)"))?;
        let len: u8 = len
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR (bad prefix length)"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("{s:?} is not a CIDR (prefix longer than {max})"));
        }
        let prefix = if ip.is_ipv4() { len + 96 } else { len };
        Ok(Cidr {
            addr: mask(addr_of(ip), prefix),
            prefix,
        })
    }

    pub fn is_v4(&self) -> bool {
        is_v4(&self.addr) && self.prefix >= 96
    }

    pub fn contains_addr(&self, a: &Addr) -> bool {
        self.is_v4() == is_v4(a) && mask(*a, self.prefix) == self.addr
    }

    /// Whether `other` lies inside `self` (same family).
    pub fn contains(&self, other: &Cidr) -> bool {
        self.is_v4() == other.is_v4()
            && other.prefix >= self.prefix
            && mask(other.addr, self.prefix) == self.addr
    }
}

pub fn mask(mut a: Addr, prefix: u8) -> Addr {
    for (i, byte) in a.iter_mut().enumerate() {
        let bits = (prefix as i32 - (i as i32) * 8).clamp(0, 8);
        *byte &= if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
    }
    a
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_v4() {
            write!(f, "{}/{}", ip_of(&self.addr), self.prefix - 96)
        } else {
            write!(f, "{}/{}", ip_of(&self.addr), self.prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bits_are_cleared_and_families_kept_apart() {
        let c = Cidr::parse("10.1.2.3/8").unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains_addr(&addr_of("10.9.9.9".parse().unwrap())));
        let all6 = Cidr::parse("::/0").unwrap();
        assert!(!all6.contains_addr(&addr_of("10.9.9.9".parse().unwrap())));
        assert!(!all6.contains(&c));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("10.0.0.0").is_err());
    }
}

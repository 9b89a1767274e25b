//! CIDRs with an explicit family (`ipnet`), and the one conversion to the maps' address
//! form: IPv6, with IPv4 v4-mapped and its prefix offset by 96.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netpol_common::{v4_mapped, Addr};

/// A network: host bits are always clear. Ordered by family (IPv4 first), then
/// address, then prefix length, so a network sorts before the networks inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr(IpNet);

/// Why a text is not a CIDR; each message names the text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not a CIDR (missing /prefix)")]
    MissingPrefix(String),
    #[error("{0:?} is not a CIDR (bad address)")]
    BadAddress(String),
    #[error("{0:?} is not a CIDR (bad prefix length)")]
    BadPrefix(String),
    #[error("{text:?} is not a CIDR (prefix longer than {max})")]
    PrefixTooLong { text: String, max: u8 },
}

/// `::ffff:0:0/96`, where IPv6 spells IPv4 addresses. Linux drops IPv6 packets with
/// such addresses and so does the classifier: an IPv6 CIDR inside it matches nothing.
const V4_MAPPED: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96);

/// The maps' form of an address.
pub fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// An address back from the maps' form (a v4-mapped address is IPv4).
pub fn ip_of(addr: &Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(*addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

impl Cidr {
    /// The one-address network of `ip` (/32 or /128).
    pub fn host(ip: IpAddr) -> Cidr {
        Cidr(IpNet::from(ip))
    }

    /// Parses `a.b.c.d/n` or `x::/n`; host bits are cleared (the network is meant).
    pub fn parse(s: &str) -> Result<Cidr, CidrError> {
        match s.parse::<IpNet>().ok().or_else(|| legacy_v4(s)) {
            Some(net) => Ok(Cidr(net.trunc())),
            None => Err(why_not(s)),
        }
    }

    pub fn net(&self) -> IpNet {
        self.0
    }

    pub fn is_v4(&self) -> bool {
        matches!(self.0, IpNet::V4(_))
    }

    /// Prefix length within its own family (IPv4 /24 is 24).
    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    /// An IPv6 CIDR inside `::ffff:0:0/96`: it can match no packet, so the compiler
    /// installs nothing for it (its map form would read as an IPv4 prefix).
    pub fn is_v4_mapped_v6(&self) -> bool {
        matches!(self.0, IpNet::V6(n) if V4_MAPPED.contains(&n))
    }

    /// The IPv4 network a v4-mapped IPv6 CIDR spells (`::ffff:10.0.0.0/104` spells
    /// `10.0.0.0/8`); None for any other CIDR.
    pub fn mapped_ipv4(&self) -> Option<Cidr> {
        let (addr, prefix) = self.map_key();
        self.is_v4_mapped_v6()
            .then(|| Cidr::from_map_key(addr, prefix))
    }

    /// Whether the maps' address `a` is in this network (families never mix).
    pub fn contains_addr(&self, a: &Addr) -> bool {
        self.0.contains(&ip_of(a))
    }

    /// Whether `other` lies inside `self` (same family).
    pub fn contains(&self, other: &Cidr) -> bool {
        self.0.contains(&other.0)
    }

    /// The key in the maps' tries: (128-bit address, prefix length over 128 bits).
    pub fn map_key(&self) -> (Addr, u8) {
        match self.0 {
            IpNet::V4(n) => (v4_mapped(n.network().octets()), n.prefix_len() + 96),
            IpNet::V6(n) => (n.network().octets(), n.prefix_len()),
        }
    }

    /// The network a trie key stands for; host bits are cleared. A key inside
    /// `::ffff:0:0/96` is IPv4 (the compiler never installs IPv6 ones there).
    pub fn from_map_key(addr: Addr, prefix: u8) -> Cidr {
        // The kernel refuses longer prefixes for a 16-byte key.
        let prefix = prefix.min(128);
        let v6 = Ipv6Net::new(Ipv6Addr::from(addr), prefix)
            .expect("prefix clamped to 128")
            .trunc();
        match v6.network().to_ipv4_mapped() {
            Some(v4) if prefix >= 96 => Cidr(IpNet::V4(
                Ipv4Net::new(v4, prefix - 96).expect("at most 32"),
            )),
            _ => Cidr(IpNet::V6(v6)),
        }
    }
}

/// Which part of `s` made ipnet refuse it, for a message that says what to fix.
fn why_not(s: &str) -> CidrError {
    let Some((ip, len)) = s.split_once('/') else {
        return CidrError::MissingPrefix(s.to_string());
    };
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return CidrError::BadAddress(s.to_string());
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match len.parse::<u8>() {
        Ok(n) if n > max => CidrError::PrefixTooLong {
            text: s.to_string(),
            max,
        },
        _ => CidrError::BadPrefix(s.to_string()),
    }
}

impl From<IpNet> for Cidr {
    fn from(net: IpNet) -> Cidr {
        Cidr(net.trunc())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// IPv4 with leading zeros in its octets (`010.0.0.0/8`): the API server's lenient
/// legacy parser accepts it, reading each octet as decimal, so the engine must too (an
/// object the API server stores is never rejected here). ipnet, rightly strict, refuses it.
fn legacy_v4(s: &str) -> Option<IpNet> {
    let (addr, len) = s.split_once('/')?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32 && !len.starts_with('+'))?;
    let mut octets = [0u8; 4];
    let mut parts = addr.split('.');
    for o in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *o = part.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(octets), len)
        .ok()
        .map(IpNet::V4)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn cidr(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    #[test]
    fn host_bits_are_cleared_and_families_kept_apart() {
        let c = cidr("10.1.2.3/8");
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains_addr(&addr_of("10.9.9.9".parse().unwrap())));
        let all6 = cidr("::/0");
        assert!(!all6.contains_addr(&addr_of("10.9.9.9".parse().unwrap())));
        assert!(!all6.contains(&c));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("10.0.0.0").is_err());
    }

    #[test]
    fn errors_name_the_text_and_the_fault() {
        let msg = |s: &str| Cidr::parse(s).unwrap_err().to_string();
        assert_eq!(
            msg("10.0.0.0"),
            "\"10.0.0.0\" is not a CIDR (missing /prefix)"
        );
        assert_eq!(msg("10.0.0/8"), "\"10.0.0/8\" is not a CIDR (bad address)");
        assert_eq!(
            msg("10.0.0.0/x"),
            "\"10.0.0.0/x\" is not a CIDR (bad prefix length)"
        );
        assert_eq!(
            msg("fd00::/129"),
            "\"fd00::/129\" is not a CIDR (prefix longer than 128)"
        );
    }

    #[test]
    fn a_v4_mapped_ipv6_cidr_stays_ipv6_and_matches_no_ipv4_address() {
        let mapped = cidr("::ffff:0:0/96");
        assert!(!mapped.is_v4());
        assert_eq!(mapped.prefix_len(), 96);
        assert!(mapped.is_v4_mapped_v6());
        assert!(cidr("::ffff:10.0.0.0/104").is_v4_mapped_v6());
        assert!(!cidr("::/0").is_v4_mapped_v6());
        assert!(!cidr("0.0.0.0/0").is_v4_mapped_v6());
        assert!(!mapped.contains_addr(&addr_of("10.0.0.1".parse().unwrap())));
        assert!(!mapped.contains(&cidr("0.0.0.0/0")));
        assert_eq!(mapped.mapped_ipv4(), Some(cidr("0.0.0.0/0")));
        assert_eq!(
            cidr("::ffff:10.0.0.0/104").mapped_ipv4(),
            Some(cidr("10.0.0.0/8"))
        );
        assert_eq!(cidr("::/0").mapped_ipv4(), None);
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "10.0.0.0/8",
            "0.0.0.0/0",
            "192.168.1.7/32",
            "::/0",
            "fd00:1::/64",
        ] {
            assert_eq!(cidr(s).to_string(), s);
        }
        let mapped = cidr("::ffff:0:0/96");
        assert_eq!(cidr(&mapped.to_string()), mapped);
    }

    #[test]
    fn map_keys_round_trip_outside_the_v4_mapped_range() {
        for s in [
            "10.0.0.0/8",
            "0.0.0.0/0",
            "10.1.2.3/32",
            "::/0",
            "::/80",
            "fd00::/8",
        ] {
            let c = cidr(s);
            let (addr, prefix) = c.map_key();
            assert_eq!(Cidr::from_map_key(addr, prefix), c, "{s}");
        }
        assert_eq!(cidr("10.0.0.0/8").map_key().1, 104);
        // The reason the compiler installs no v4-mapped IPv6 prefix: it would read back
        // as IPv4.
        let (addr, prefix) = cidr("::ffff:0:0/96").map_key();
        assert_eq!(Cidr::from_map_key(addr, prefix), cidr("0.0.0.0/0"));
        // Host bits of a key are cleared too.
        let (addr, _) = cidr("10.1.2.3/32").map_key();
        assert_eq!(Cidr::from_map_key(addr, 104), cidr("10.0.0.0/8"));
    }

    #[test]
    fn ordering_sorts_containers_first_and_keys_a_btreemap() {
        let mut m = BTreeMap::new();
        for s in [
            "fd00::/8",
            "10.1.0.0/16",
            "::/0",
            "10.0.0.0/8",
            "fd00::1/128",
        ] {
            m.insert(cidr(s), s);
        }
        let order: Vec<String> = m.keys().map(|c| c.to_string()).collect();
        assert_eq!(
            order,
            [
                "10.0.0.0/8",
                "10.1.0.0/16",
                "::/0",
                "fd00::/8",
                "fd00::1/128"
            ]
        );
        assert_eq!(m[&cidr("10.0.0.1/8")], "10.0.0.0/8");
    }
}

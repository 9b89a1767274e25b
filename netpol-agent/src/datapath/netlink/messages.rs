//! rtnetlink messages, built and read with `netlink-packet-route`'s types: the dump
//! requests, the framing of a datagram, and the link, address and namespace-id
//! messages turned into the records discovery keeps.
//!
//! Messages are read header by header and attribute by attribute rather than whole
//! (`LinkMessage::parse`): the crate refuses a whole message for one attribute it cannot
//! read (a layout newer than it knows, say, in the many nested link attributes we do not
//! use), and a pod's link must not be lost for that. Such an attribute is skipped; one
//! cut short ends the list.

use std::net::IpAddr;

use netlink_packet_core::{
    DecodeError, DoneBuffer, Emitable, ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NlaBuffer, NlasIterator, Parseable, ParseableParametrized, NLMSG_ALIGNTO, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressHeader, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkHeader, LinkMessage};
use netlink_packet_route::nsid::{NsidAttribute, NsidHeader};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::{Link, Message, Peer};

/// A dump request of every link of namespace `nsid` (None: the socket's),
/// `RTM_GETLINK` with `IFLA_TARGET_NETNSID`.
pub(super) fn get_links(nsid: Option<i32>) -> Vec<u8> {
    let mut msg = LinkMessage::default();
    msg.attributes.extend(nsid.map(LinkAttribute::IfNetnsId));
    request(RouteNetlinkMessage::GetLink(msg))
}

/// A dump request of every address of namespace `nsid` (None: the socket's),
/// `RTM_GETADDR` with `IFA_TARGET_NETNSID`.
pub(super) fn get_addrs(nsid: Option<i32>) -> Vec<u8> {
    let mut msg = AddressMessage::default();
    msg.attributes
        .extend(nsid.map(AddressAttribute::TargetNetNsId));
    request(RouteNetlinkMessage::GetAddress(msg))
}

fn request(msg: RouteNetlinkMessage) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut msg = NetlinkMessage::new(header, msg.into());
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// One netlink message of a datagram.
pub(super) struct Frame<'a> {
    pub kind: u16,
    pub flags: u16,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// The error an `NLMSG_DONE` or `NLMSG_ERROR` carries, as a negative errno (0: none;
    /// an error message too short to say is `-EIO`).
    pub fn errno(&self) -> i32 {
        match self.kind {
            netlink_packet_core::NLMSG_ERROR => ErrorBuffer::new_checked(self.payload)
                .map(|b| b.code().map_or(0, |c| c.get()))
                .unwrap_or(-libc::EIO),
            // An empty NLMSG_DONE is a plain end.
            _ => DoneBuffer::new_checked(self.payload).map_or(0, |b| b.code()),
        }
    }
}

/// The netlink messages of a datagram, up to the first one cut short.
pub(super) fn frames(buf: &[u8]) -> impl Iterator<Item = Frame<'_>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let msg = NetlinkBuffer::new_checked(rest).ok()?;
        let frame = Frame {
            kind: msg.message_type(),
            flags: msg.flags(),
            payload: msg.payload(),
        };
        let align = NLMSG_ALIGNTO as usize;
        let next = (msg.length() as usize).div_ceil(align) * align;
        rest = &rest[next.min(rest.len())..];
        Some(frame)
    })
}

/// The attributes after a message's fixed header that the crate could read.
fn attributes<'a, A>(
    buf: &'a [u8],
    parse: impl Fn(&NlaBuffer<&'a [u8]>) -> Result<A, DecodeError> + 'a,
) -> impl Iterator<Item = A> + 'a {
    NlasIterator::new(buf)
        .map_while(Result::ok)
        .filter_map(move |nla| parse(&nla).ok())
}

/// One message body (`nsid`: the namespace it came from or was dumped from).
pub(super) fn parse(kind: u16, body: &[u8], nsid: Option<i32>) -> Option<Message> {
    match kind {
        libc::RTM_NEWLINK | libc::RTM_DELLINK => link(kind == libc::RTM_NEWLINK, body, nsid),
        libc::RTM_NEWADDR | libc::RTM_DELADDR => addr(kind == libc::RTM_NEWADDR, body, nsid),
        libc::RTM_DELNSID if nsid.is_none() => {
            let header = NsidHeader::parse(body).ok()?;
            attributes(&body[header.buffer_len()..], NsidAttribute::parse)
                .find_map(|a| match a {
                    NsidAttribute::Id(id) => Some(id),
                    _ => None,
                })
                .map(Message::NsidGone)
        }
        _ => None,
    }
}

fn link(added: bool, body: &[u8], nsid: Option<i32>) -> Option<Message> {
    let header = LinkHeader::parse(body).ok()?;
    // The bridge's own (AF_BRIDGE) notifications repeat what the link's say.
    if header.interface_family != AddressFamily::Unspec {
        return None;
    }
    if let Some(nsid) = nsid {
        // A link of a pod's namespace is no port: only its MAC matters (what the pod's
        // frames may carry as their source).
        if !added {
            return None;
        }
        let family = header.interface_family;
        let parse = move |nla: &NlaBuffer<&[u8]>| LinkAttribute::parse_with_param(nla, family);
        let mac = attributes(&body[header.buffer_len()..], parse).find_map(|a| match a {
            LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            _ => None,
        });
        return Some(Message::PodLink {
            nsid,
            ifindex: header.index,
            mac,
        });
    }
    if !added {
        return Some(Message::LinkGone(header.index));
    }
    let mut link = Link {
        ifindex: header.index,
        name: String::new(),
        master: 0,
        peer: None,
    };
    let (mut peer_ifindex, mut peer_nsid) = (None, None);
    let family = header.interface_family;
    let parse = move |nla: &NlaBuffer<&[u8]>| LinkAttribute::parse_with_param(nla, family);
    for attr in attributes(&body[header.buffer_len()..], parse) {
        match attr {
            LinkAttribute::IfName(name) => link.name = name,
            LinkAttribute::Controller(master) => link.master = master,
            LinkAttribute::Link(ifindex) => peer_ifindex = Some(ifindex),
            LinkAttribute::LinkNetNsId(id) => peer_nsid = Some(id),
            _ => {}
        }
    }
    if let (Some(nsid), Some(ifindex)) = (peer_nsid, peer_ifindex) {
        link.peer = Some(Peer { nsid, ifindex });
    }
    Some(Message::Link(link))
}

fn addr(added: bool, body: &[u8], nsid: Option<i32>) -> Option<Message> {
    let header = AddressHeader::parse(body).ok()?;
    let family = header.family;
    if !matches!(family, AddressFamily::Inet | AddressFamily::Inet6) {
        return None;
    }
    let of_family = |ip: IpAddr| (ip.is_ipv4() == (family == AddressFamily::Inet)).then_some(ip);
    let (mut local, mut address, mut target) = (None, None, None);
    for attr in attributes(&body[header.buffer_len()..], AddressAttribute::parse) {
        match attr {
            AddressAttribute::Local(ip) => local = of_family(ip),
            AddressAttribute::Address(ip) => address = of_family(ip),
            AddressAttribute::TargetNetNsId(id) => target = Some(id),
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address where the two differ (a point-to-point
    // peer is IFA_ADDRESS); IPv6 has only IFA_ADDRESS.
    Some(Message::Addr {
        nsid: target.or(nsid),
        ifindex: header.index,
        ip: local.or(address)?,
        added,
    })
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::DefaultNla;
    use netlink_packet_route::nsid::NsidMessage;

    use super::*;

    /// The bytes the kernel would send: the messages, each framed, in one datagram.
    fn datagram(msgs: Vec<RouteNetlinkMessage>) -> Vec<u8> {
        msgs.into_iter()
            .flat_map(|m| {
                let mut m = NetlinkMessage::new(NetlinkHeader::default(), m.into());
                m.finalize();
                let mut buf = vec![0u8; m.buffer_len()];
                m.serialize(&mut buf);
                buf
            })
            .collect()
    }

    /// Everything a datagram says, as `Socket::recv` reads it.
    fn read(dgram: &[u8], nsid: Option<i32>) -> Vec<Message> {
        frames(dgram)
            .filter_map(|f| parse(f.kind, f.payload, nsid))
            .collect()
    }

    fn link_msg(ifindex: u32, family: AddressFamily, attrs: Vec<LinkAttribute>) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = ifindex;
        m.header.interface_family = family;
        m.attributes = attrs;
        m
    }

    fn veth(master: u32, peer: Peer) -> Vec<LinkAttribute> {
        vec![
            LinkAttribute::IfName("veth1".into()),
            LinkAttribute::Mtu(1500),
            LinkAttribute::Controller(master),
            LinkAttribute::Link(peer.ifindex),
            LinkAttribute::LinkNetNsId(peer.nsid),
        ]
    }

    fn addr_msg(ifindex: u32, ip: IpAddr, attrs: Vec<AddressAttribute>) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.index = ifindex;
        m.header.family = if ip.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        m.header.prefix_len = if ip.is_ipv4() { 24 } else { 64 };
        m.attributes = attrs;
        m
    }

    #[test]
    fn a_bridge_port_with_its_peer_in_a_pod_namespace() {
        let peer = Peer {
            nsid: 3,
            ifindex: 2,
        };
        let m = link_msg(7, AddressFamily::Unspec, veth(4, peer));
        let dgram = datagram(vec![
            RouteNetlinkMessage::NewLink(m.clone()),
            RouteNetlinkMessage::DelLink(m.clone()),
            // The bridge's own notification of its port repeats it.
            RouteNetlinkMessage::NewLink(link_msg(7, AddressFamily::Bridge, veth(4, peer))),
        ]);
        assert_eq!(
            read(&dgram, None),
            [
                Message::Link(Link {
                    ifindex: 7,
                    name: "veth1".into(),
                    master: 4,
                    peer: Some(peer),
                }),
                Message::LinkGone(7),
            ]
        );
        // A link of a pod's namespace: its MAC, nothing of ports (a deletion, nothing).
        assert_eq!(
            read(&dgram, Some(3)),
            [Message::PodLink {
                nsid: 3,
                ifindex: 7,
                mac: None
            }]
        );
        let mut eth0 = link_msg(2, AddressFamily::Unspec, veth(0, peer));
        eth0.attributes
            .push(LinkAttribute::Address(vec![2, 0, 0, 0, 0, 9]));
        assert_eq!(
            read(&datagram(vec![RouteNetlinkMessage::NewLink(eth0)]), Some(3)),
            [Message::PodLink {
                nsid: 3,
                ifindex: 2,
                mac: Some([2, 0, 0, 0, 0, 9])
            }]
        );
        // A link with no peer elsewhere, not a port.
        let lo = link_msg(
            1,
            AddressFamily::Unspec,
            vec![LinkAttribute::IfName("lo".into())],
        );
        assert_eq!(
            read(&datagram(vec![RouteNetlinkMessage::NewLink(lo)]), None),
            [Message::Link(Link {
                ifindex: 1,
                name: "lo".into(),
                master: 0,
                peer: None,
            })]
        );
    }

    #[test]
    fn an_attribute_the_crate_cannot_read_costs_only_itself() {
        // IFLA_MTU (4) two bytes long: the crate refuses it (and with it a whole
        // LinkMessage::parse); the rest of the link is still read.
        let mut attrs = vec![LinkAttribute::Other(DefaultNla::new(4, vec![1, 2]))];
        attrs.extend(veth(
            4,
            Peer {
                nsid: 1,
                ifindex: 9,
            },
        ));
        let m = link_msg(7, AddressFamily::Unspec, attrs);
        let dgram = datagram(vec![RouteNetlinkMessage::NewLink(m)]);
        let payload = frames(&dgram).next().unwrap().payload;
        assert!(LinkMessage::parse(payload).is_err());
        assert!(matches!(
            &read(&dgram, None)[..],
            [Message::Link(Link {
                ifindex: 7,
                master: 4,
                peer: Some(_),
                ..
            })]
        ));
    }

    #[test]
    fn addresses_carry_the_namespace_they_were_heard_from() {
        let v4: IpAddr = "10.244.0.5".parse().unwrap();
        let v6: IpAddr = "fd00::af4:5".parse().unwrap();
        let peer_v4: IpAddr = "10.244.0.1".parse().unwrap();
        let dgram = datagram(vec![
            // Point-to-point: IFA_LOCAL is ours, IFA_ADDRESS the peer's.
            RouteNetlinkMessage::NewAddress(addr_msg(
                2,
                v4,
                vec![
                    AddressAttribute::Address(peer_v4),
                    AddressAttribute::Local(v4),
                ],
            )),
            RouteNetlinkMessage::DelAddress(addr_msg(2, v6, vec![AddressAttribute::Address(v6)])),
        ]);
        assert_eq!(
            read(&dgram, Some(3)),
            [
                Message::Addr {
                    nsid: Some(3),
                    ifindex: 2,
                    ip: v4,
                    added: true
                },
                Message::Addr {
                    nsid: Some(3),
                    ifindex: 2,
                    ip: v6,
                    added: false
                },
            ]
        );
        // A dumped record names its namespace itself.
        let dumped = addr_msg(
            9,
            v4,
            vec![
                AddressAttribute::Local(v4),
                AddressAttribute::TargetNetNsId(5),
            ],
        );
        assert_eq!(
            read(
                &datagram(vec![RouteNetlinkMessage::NewAddress(dumped)]),
                None
            ),
            [Message::Addr {
                nsid: Some(5),
                ifindex: 9,
                ip: v4,
                added: true
            }]
        );
        // An address of another family than its header says, or none at all: nothing.
        let odd = addr_msg(2, v6, vec![AddressAttribute::Address(v4)]);
        let none = addr_msg(2, v4, vec![AddressAttribute::Label("eth0".into())]);
        let dgram = datagram(vec![
            RouteNetlinkMessage::NewAddress(odd),
            RouteNetlinkMessage::NewAddress(none),
        ]);
        assert_eq!(read(&dgram, None), []);
    }

    #[test]
    fn truncated_messages_and_attributes_are_ignored() {
        let m = link_msg(
            7,
            AddressFamily::Unspec,
            veth(
                4,
                Peer {
                    nsid: 1,
                    ifindex: 2,
                },
            ),
        );
        let one = datagram(vec![RouteNetlinkMessage::NewLink(m.clone())]);
        let body = frames(&one).next().unwrap().payload;
        for cut in 0..16 {
            assert_eq!(parse(libc::RTM_NEWLINK, &body[..cut], None), None);
        }
        // An attribute cut short ends the attribute list, not the parse: the name is
        // first and stays.
        let cut = parse(libc::RTM_NEWLINK, &body[..body.len() - 2], None).unwrap();
        assert!(matches!(cut, Message::Link(Link { ifindex: 7, ref name, .. }) if name == "veth1"));
        let two = datagram(vec![
            RouteNetlinkMessage::NewLink(m.clone()),
            RouteNetlinkMessage::DelLink(m),
        ]);
        assert_eq!(frames(&two).count(), 2);
        assert_eq!(frames(&two[..two.len() - 1]).count(), 1);
        assert_eq!(frames(&two[..15]).count(), 0);
    }

    #[test]
    fn a_released_namespace_id() {
        let mut m = NsidMessage::default();
        m.attributes.push(NsidAttribute::Id(4));
        let dgram = datagram(vec![
            RouteNetlinkMessage::DelNsId(m.clone()),
            RouteNetlinkMessage::NewNsId(m),
        ]);
        assert_eq!(read(&dgram, None), [Message::NsidGone(4)]);
        // Another namespace's own ids are not the node's.
        assert_eq!(read(&dgram, Some(2)), []);
    }

    #[test]
    fn dump_requests_are_what_the_kernel_reads() {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        let mut links = Vec::new();
        links.extend(32u32.to_ne_bytes());
        links.extend(libc::RTM_GETLINK.to_ne_bytes());
        links.extend(flags.to_ne_bytes());
        links.extend(1u32.to_ne_bytes());
        links.extend([0; 4 + 16]); // port; ifinfomsg (AF_UNSPEC, all zero)
        assert_eq!(get_links(None), links);
        let mut of_pod = get_links(Some(5));
        assert_eq!(of_pod.len(), 40);
        // IFLA_TARGET_NETNSID (46), 5
        let attr: Vec<u8> = [8u16.to_ne_bytes(), 46u16.to_ne_bytes()]
            .concat()
            .into_iter()
            .chain(5i32.to_ne_bytes())
            .collect();
        assert_eq!(of_pod.split_off(32), attr);

        assert_eq!(get_addrs(None).len(), 16 + 8);
        let addrs = get_addrs(Some(5));
        let mut want = Vec::new();
        want.extend(32u32.to_ne_bytes());
        want.extend(libc::RTM_GETADDR.to_ne_bytes());
        want.extend(flags.to_ne_bytes());
        want.extend(1u32.to_ne_bytes());
        want.extend([0; 4 + 8]); // port; ifaddrmsg (AF_UNSPEC, all zero)
        want.extend(8u16.to_ne_bytes()); // IFA_TARGET_NETNSID, 5
        want.extend(10u16.to_ne_bytes());
        want.extend(5i32.to_ne_bytes());
        assert_eq!(addrs, want);
    }

    /// The real kernel's answer to the dumps: every namespace has `lo` (index 1), with
    /// 127.0.0.1 once it is up (needs no privilege).
    #[test]
    fn the_kernel_s_own_dumps_are_read() {
        let s = super::super::Socket::requests().unwrap();
        let links = s.dump_links().unwrap();
        assert!(
            links.iter().any(|m| matches!(m, Message::Link(Link { ifindex: 1, name, master: 0, .. }) if name == "lo")),
            "{links:?}"
        );
        let addrs = s.dump_addrs(None).unwrap();
        let lo_v4 = Message::Addr {
            nsid: None,
            ifindex: 1,
            ip: "127.0.0.1".parse().unwrap(),
            added: true,
        };
        let lo_up = addrs
            .iter()
            .any(|m| matches!(m, Message::Addr { ifindex: 1, .. }));
        assert!(!lo_up || addrs.contains(&lo_v4), "{addrs:?}");
    }
}

//! Finding local pods' host-side veths the way a companion of a CNI must: the ports of
//! the CNI bridge, matched to pods by the addresses inside each pod's network namespace.
//!
//! ```text
//! rtnetlink events ──► Table (the node's links, addresses and MACs per namespace)
//!                  ──► Ports (published on change) ──► agent loop: Ports::locate
//!                                                      (locate.rs: trusting no claim)
//! ```
//! One thread reads one rtnetlink subscription (`netlink.rs`): link events of the node's
//! namespace (a veth joins or leaves the bridge, is renamed or deleted), and address and
//! link events of every pod's namespace (its addresses, its interface's MAC), tagged
//! with the namespace's id, which the bridge port's `IFLA_LINK_NETNSID` names too. So a
//! pod is matched without entering its namespace, whatever created it
//! (`/var/run/netns/*`, a container runtime's `/proc/<pid>/ns/net`), and without
//! polling. A port whose namespace was never heard from gets its addresses and links
//! dumped once, when it appears.
//!
//! No periodic resync: rtnetlink multicast loses events only when the socket's buffer
//! overflows, which the kernel reports (`ENOBUFS`); the table is then dumped afresh.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use anyhow::Context;
use tokio::sync::watch;

use super::netlink::{Link, Message, Peer, Received, Socket};

/// Where a local pod's traffic enters and leaves the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub ifindex: u32,
    pub ifname: String,
    /// The MAC of the pod's own interface (what its frames and ARP may carry).
    pub mac: [u8; 6],
}

impl Location {
    /// The same bridge port (the MAC behind it may have changed).
    pub fn same_port(&self, other: &Location) -> bool {
        self.ifindex == other.ifindex && self.ifname == other.ifname
    }
}

/// A bridge port whose other end is in a pod's namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    /// The addresses on the other end, inside the pod's namespace (IPv6 link-local
    /// left out).
    pub addrs: BTreeSet<IpAddr>,
    /// The MAC of the other end; a port is not located before it is known.
    pub mac: Option<[u8; 6]>,
}

/// What the agent needs of the node's links.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ports {
    /// The bridge's own addresses: the node's address on the pod network (IPv6
    /// link-local left out). Empty while the bridge does not exist.
    pub bridge_addrs: Vec<IpAddr>,
    /// Every address of the node's own namespace but the loopback's (kube-proxy takes
    /// a NodePort on each: a pod reaches it there).
    pub node_addrs: Vec<IpAddr>,
    /// The bridge's pod ports, by ifindex.
    pub ports: BTreeMap<u32, Port>,
    /// Names of the node's links (devices the service hooks wait for).
    pub devices: BTreeSet<String>,
    /// The links a packet can leave the node by: all but the bridge, the links enslaved
    /// to a master (the bridge's ports; a bond's are reached through the bond) and the
    /// loopback (the overlays, `flannel-v6.1` included, the uplinks). Each gets the hook
    /// after DNAT as soon as it appears.
    pub exits: BTreeSet<String>,
}

/// The latest [`Ports`] and how many times they have changed since the agent started.
#[derive(Clone, Debug, Default)]
pub struct Published {
    pub ports: Ports,
    pub changes: u64,
}

/// The node's links and the addresses heard from each namespace, kept from netlink.
#[derive(Default)]
struct Table {
    bridge: String,
    links: BTreeMap<u32, Link>,
    /// (namespace id, None: the node's; ifindex there) → addresses.
    addrs: BTreeMap<(Option<i32>, u32), BTreeSet<IpAddr>>,
    /// (pod namespace id, ifindex there) → MAC.
    macs: BTreeMap<(i32, u32), [u8; 6]>,
    /// Pod namespaces whose addresses were dumped since their port appeared.
    dumped: BTreeSet<i32>,
}

impl Table {
    fn new(bridge: &str) -> Table {
        Table {
            bridge: bridge.to_string(),
            ..Table::default()
        }
    }

    fn apply(&mut self, m: Message) {
        match m {
            Message::Link(link) => {
                self.links.insert(link.ifindex, link);
            }
            Message::LinkGone(ifindex) => {
                self.addrs.remove(&(None, ifindex));
                if let Some(Peer { nsid, .. }) = self.links.remove(&ifindex).and_then(|l| l.peer) {
                    // The last veth into that namespace: its id may be given to another.
                    if !self
                        .links
                        .values()
                        .any(|l| l.peer.map(|p| p.nsid) == Some(nsid))
                    {
                        self.forget(nsid);
                    }
                }
            }
            Message::Addr {
                nsid,
                ifindex,
                ip,
                added,
            } => {
                let key = (nsid, ifindex);
                if added {
                    self.addrs.entry(key).or_default().insert(ip);
                } else if let Some(set) = self.addrs.get_mut(&key) {
                    set.remove(&ip);
                    if set.is_empty() {
                        self.addrs.remove(&key);
                    }
                }
            }
            Message::PodLink { nsid, ifindex, mac } => match mac {
                Some(mac) => {
                    self.macs.insert((nsid, ifindex), mac);
                }
                None => {
                    self.macs.remove(&(nsid, ifindex));
                }
            },
            Message::NsidGone(nsid) => self.forget(nsid),
        }
    }

    fn forget(&mut self, nsid: i32) {
        self.addrs.retain(|(n, _), _| *n != Some(nsid));
        self.macs.retain(|(n, _), _| *n != nsid);
        self.dumped.remove(&nsid);
    }

    fn bridge_index(&self) -> Option<u32> {
        self.links
            .values()
            .find(|l| l.name == self.bridge)
            .map(|l| l.ifindex)
    }

    /// Ports of the bridge whose other end is in another namespace: pods (the overlay,
    /// an uplink or a veth into the node's own namespace have no such peer).
    fn pod_ports(&self) -> impl Iterator<Item = (&Link, Peer)> {
        let bridge = self.bridge_index();
        self.links.values().filter_map(move |l| {
            let peer = l.peer?;
            (bridge.is_some() && Some(l.master) == bridge).then_some((l, peer))
        })
    }

    /// The addresses of an interface, IPv6 link-local left out (every interface has
    /// one; no pod or node is known by it).
    fn addrs_of(&self, nsid: Option<i32>, ifindex: u32) -> impl Iterator<Item = IpAddr> + '_ {
        self.addrs
            .get(&(nsid, ifindex))
            .into_iter()
            .flatten()
            .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
            .copied()
    }

    fn ports(&self) -> Ports {
        let bridge_addrs = match self.bridge_index() {
            Some(i) => self.addrs_of(None, i).collect(),
            None => vec![],
        };
        let ports = self
            .pod_ports()
            .map(|(l, peer)| {
                let addrs = self.addrs_of(Some(peer.nsid), peer.ifindex).collect();
                (
                    l.ifindex,
                    Port {
                        name: l.name.clone(),
                        addrs,
                        mac: self.macs.get(&(peer.nsid, peer.ifindex)).copied(),
                    },
                )
            })
            .collect();
        let bridge = self.bridge_index();
        let exits = self
            .links
            .values()
            .filter(|l| l.master == 0 && Some(l.ifindex) != bridge && l.name != "lo")
            .map(|l| l.name.clone())
            .collect();
        let node_addrs = self
            .addrs
            .keys()
            .filter(|(nsid, _)| nsid.is_none())
            .flat_map(|(_, ifindex)| self.addrs_of(None, *ifindex))
            .filter(|ip| !ip.is_loopback())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        Ports {
            bridge_addrs,
            node_addrs,
            ports,
            devices: self.links.values().map(|l| l.name.clone()).collect(),
            exits,
        }
    }

    /// Everything afresh: the links, the node's addresses and every pod namespace's.
    fn load(&mut self, requests: &Socket) -> anyhow::Result<()> {
        self.links.clear();
        self.addrs.clear();
        self.macs.clear();
        self.dumped.clear();
        for m in requests.dump_links().context("dumping links")? {
            self.apply(m);
        }
        for m in requests.dump_addrs(None).context("dumping addresses")? {
            self.apply(m);
        }
        self.dump_new_namespaces(requests);
        Ok(())
    }

    /// Dumps the addresses and links (MACs) of pod namespaces not heard from since their
    /// port appeared (they may have been set before the namespace had an id here).
    fn dump_new_namespaces(&mut self, requests: &Socket) {
        let new: BTreeSet<i32> = self
            .pod_ports()
            .map(|(_, p)| p.nsid)
            .filter(|n| !self.dumped.contains(n))
            .collect();
        for nsid in new {
            match requests.dump_addrs(Some(nsid)).and_then(|mut m| {
                requests.dump_pod_links(nsid).map(|l| {
                    m.extend(l);
                    m
                })
            }) {
                Ok(msgs) => msgs.into_iter().for_each(|m| self.apply(m)),
                // The namespace went away meanwhile: its port goes too.
                Err(e) => tracing::debug!(nsid, error = %e, "dumping a pod namespace's addresses"),
            }
            self.dumped.insert(nsid);
        }
    }
}

/// Called with a new pod port's name before the port is published (the pod-start hold).
pub type OnNewPort = Box<dyn FnMut(&str) + Send>;

/// Starts the discovery thread for `bridge`. The receiver holds the ports as they are
/// now, at once, and each change as it happens. The thread runs for the process's
/// life; if its socket fails, it logs why and drops the sender.
pub fn watch(
    bridge: &str,
    mut on_new_port: Option<OnNewPort>,
) -> anyhow::Result<watch::Receiver<Published>> {
    // Subscribed before the first dump: nothing that changes meanwhile is missed.
    let events = Socket::subscribe().context("subscribing to rtnetlink link and address events")?;
    let requests = Socket::requests().context("opening an rtnetlink socket")?;
    let mut table = Table::new(bridge);
    table.load(&requests)?;
    let mut known: BTreeSet<u32> = BTreeSet::new();
    announce(&table, &mut known, &mut on_new_port);
    let (tx, rx) = watch::channel(Published {
        ports: table.ports(),
        changes: 0,
    });
    std::thread::Builder::new()
        .name("discovery".into())
        .spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let result = (|| -> anyhow::Result<()> {
                loop {
                    match events
                        .recv(&mut buf)
                        .context("receiving rtnetlink events")?
                    {
                        Received::Messages(msgs) => msgs.into_iter().for_each(|m| table.apply(m)),
                        Received::Overflow => {
                            tracing::warn!("rtnetlink events overflowed; dumping the links again");
                            table.load(&requests)?;
                        }
                    }
                    announce(&table, &mut known, &mut on_new_port);
                    table.dump_new_namespaces(&requests);
                    let ports = table.ports();
                    tx.send_if_modified(|p| {
                        if p.ports == ports {
                            return false;
                        }
                        p.ports = ports;
                        p.changes += 1;
                        true
                    });
                    if tx.is_closed() {
                        return Ok(());
                    }
                }
            })();
            if let Err(e) = result {
                tracing::error!(error = ?e, "pod discovery stopped");
            }
        })?;
    Ok(rx)
}

/// Calls `on_new_port` for each pod port not seen before.
fn announce(table: &Table, known: &mut BTreeSet<u32>, on_new_port: &mut Option<OnNewPort>) {
    let now: BTreeMap<u32, &str> = table
        .pod_ports()
        .map(|(l, _)| (l.ifindex, l.name.as_str()))
        .collect();
    known.retain(|i| now.contains_key(i));
    for (ifindex, name) in now {
        if known.insert(ifindex) {
            if let Some(f) = on_new_port.as_mut() {
                f(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netpol_engine::index::PodKey;

    fn link(ifindex: u32, name: &str, master: u32, peer: Option<(i32, u32)>) -> Message {
        Message::Link(Link {
            ifindex,
            name: name.into(),
            master,
            peer: peer.map(|(nsid, ifindex)| Peer { nsid, ifindex }),
        })
    }

    fn addr(nsid: Option<i32>, ifindex: u32, ip: &str, added: bool) -> Message {
        Message::Addr {
            nsid,
            ifindex,
            ip: ip.parse().unwrap(),
            added,
        }
    }

    fn mac(nsid: i32, ifindex: u32, last: u8) -> Message {
        Message::PodLink {
            nsid,
            ifindex,
            mac: Some([2, 0, 0, 0, 0, last]),
        }
    }

    fn pods(list: &[(&str, &str)]) -> BTreeMap<PodKey, Vec<IpAddr>> {
        list.iter()
            .map(|(k, ip)| (k.to_string(), vec![ip.parse().unwrap()]))
            .collect()
    }

    /// cni0 (4) with 10.244.0.1; veth 7 into namespace 3 (eth0 = 2 there); the overlay.
    fn node() -> Table {
        let mut t = Table::new("cni0");
        for m in [
            link(4, "cni0", 0, None),
            addr(None, 4, "10.244.0.1", true),
            addr(None, 4, "fe80::1", true),
            link(5, "flannel.1", 0, None),
            link(7, "veth7", 4, Some((3, 2))),
            mac(3, 2, 7),
        ] {
            t.apply(m);
        }
        t
    }

    #[test]
    fn a_pod_is_found_by_the_address_in_its_namespace() {
        let mut t = node();
        let wanted = pods(&[("x/a", "10.244.0.5")]);
        assert!(
            t.ports()
                .locate(&wanted, &BTreeMap::new(), &BTreeMap::new())
                .found
                .is_empty(),
            "no address yet"
        );
        t.apply(addr(Some(3), 2, "10.244.0.5", true));
        let ports = t.ports();
        assert_eq!(
            ports.bridge_addrs,
            vec!["10.244.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            ports
                .locate(&wanted, &BTreeMap::new(), &BTreeMap::new())
                .found["x/a"],
            Location {
                ifindex: 7,
                ifname: "veth7".into(),
                mac: [2, 0, 0, 0, 0, 7],
            }
        );
        // The same address in another namespace, or on the wrong interface, is not it.
        let mut t = node();
        t.apply(addr(Some(4), 2, "10.244.0.5", true));
        t.apply(addr(Some(3), 9, "10.244.0.5", true));
        assert!(t
            .ports()
            .locate(&wanted, &BTreeMap::new(), &BTreeMap::new())
            .found
            .is_empty());
    }

    #[test]
    fn only_bridge_ports_with_a_peer_elsewhere_are_pods() {
        let mut t = node();
        t.apply(link(8, "host-veth", 4, None));
        t.apply(link(9, "loose", 0, Some((5, 2))));
        t.apply(link(1, "lo", 0, None));
        t.apply(link(2, "flannel-v6.1", 0, None));
        assert_eq!(t.ports().ports.keys().collect::<Vec<_>>(), [&7]);
        // Every link not enslaved but the bridge and the loopback: a way off the node.
        assert_eq!(
            t.ports().exits.into_iter().collect::<Vec<_>>(),
            ["flannel-v6.1", "flannel.1", "loose"]
        );
        // Leaving the bridge (no master any more) ends it.
        t.apply(link(7, "veth7", 0, Some((3, 2))));
        assert!(t.ports().ports.is_empty());
        // No bridge yet: no ports, no node address.
        let mut t = Table::new("cni0");
        t.apply(link(7, "veth7", 4, Some((3, 2))));
        assert_eq!(
            t.ports(),
            Ports {
                devices: ["veth7".to_string()].into(),
                ..Ports::default()
            }
        );
    }

    #[test]
    fn a_deleted_port_or_namespace_forgets_its_addresses() {
        let mut t = node();
        t.apply(addr(Some(3), 2, "10.244.0.5", true));
        t.dumped.insert(3);
        t.apply(Message::LinkGone(7));
        assert!(t.addrs.keys().all(|(n, _)| *n != Some(3)));
        assert!(
            !t.dumped.contains(&3),
            "the id may come back for another namespace"
        );
        // A new namespace with the old id starts empty.
        t.apply(link(10, "veth10", 4, Some((3, 2))));
        assert!(t.ports().ports[&10].addrs.is_empty());
        t.apply(addr(Some(3), 2, "10.244.0.6", true));
        t.apply(Message::NsidGone(3));
        assert!(t.ports().ports[&10].addrs.is_empty());
        // An address removed is no longer matched.
        let mut t = node();
        t.apply(addr(Some(3), 2, "10.244.0.5", true));
        t.apply(addr(Some(3), 2, "10.244.0.5", false));
        assert!(!t.addrs.contains_key(&(Some(3), 2)));
    }

    /// The endpoint holds the pod's MAC (the only source its frames may carry): until
    /// discovery knows it, the port stays unlocated (held); a new MAC is the same port.
    #[test]
    fn a_port_is_located_once_its_pods_mac_is_known() {
        let mut t = Table::new("cni0");
        t.apply(link(4, "cni0", 0, None));
        t.apply(link(7, "veth7", 4, Some((3, 2))));
        t.apply(addr(Some(3), 2, "10.244.0.5", true));
        let wanted = pods(&[("x/a", "10.244.0.5")]);
        assert!(
            t.ports()
                .locate(&wanted, &BTreeMap::new(), &BTreeMap::new())
                .found
                .is_empty(),
            "no MAC yet"
        );
        t.apply(mac(3, 2, 1));
        let first = t
            .ports()
            .locate(&wanted, &BTreeMap::new(), &BTreeMap::new())
            .found["x/a"]
            .clone();
        assert_eq!(first.mac, [2, 0, 0, 0, 0, 1]);
        t.apply(mac(3, 2, 9));
        let moved = t
            .ports()
            .locate(&wanted, &BTreeMap::new(), &BTreeMap::new())
            .found["x/a"]
            .clone();
        assert_eq!(moved.mac, [2, 0, 0, 0, 0, 9]);
        assert!(moved.same_port(&first));
        // Another interface of the namespace (its loopback) says nothing of eth0.
        t.apply(Message::PodLink {
            nsid: 3,
            ifindex: 1,
            mac: None,
        });
        assert_eq!(
            t.ports()
                .locate(&wanted, &BTreeMap::new(), &BTreeMap::new())
                .found["x/a"]
                .mac,
            [2, 0, 0, 0, 0, 9]
        );
        t.apply(Message::NsidGone(3));
        assert!(t
            .ports()
            .locate(&wanted, &BTreeMap::new(), &BTreeMap::new())
            .found
            .is_empty());
    }

    #[test]
    fn new_pod_ports_are_announced_once() {
        let mut t = node();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let log = seen.clone();
        let mut hook: Option<OnNewPort> = Some(Box::new(move |n: &str| {
            log.lock().unwrap().push(n.to_string())
        }));
        let mut known = BTreeSet::new();
        announce(&t, &mut known, &mut hook);
        announce(&t, &mut known, &mut hook);
        t.apply(link(8, "veth8", 4, Some((4, 2))));
        announce(&t, &mut known, &mut hook);
        // Out and back in: a new port as far as the hold is concerned.
        t.apply(Message::LinkGone(7));
        announce(&t, &mut known, &mut hook);
        t.apply(link(7, "veth7", 4, Some((3, 2))));
        announce(&t, &mut known, &mut hook);
        assert_eq!(*seen.lock().unwrap(), ["veth7", "veth8", "veth7"]);
    }
}

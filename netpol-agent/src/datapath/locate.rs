//! Which bridge port is which pod's, trusting no more than a pod can prove.
//!
//! Discovery matches a port to a pod by the addresses inside the pod's namespace, which
//! a pod with NET_ADMIN sets as it likes: it can add another pod's address, move its
//! own to `lo`, or drop it. So a port is located as a pod only when nothing about it is
//! in doubt, and a doubt never moves a pod's endpoint or frees a port:
//!
//! - a port holding the addresses of two pods is no one's;
//! - a port that was one pod's and now claims another is no one's (ports do not change
//!   hands; a recreated pod gets a new port);
//! - a pod claimed by several ports stays on the one it was on; when it was on none of
//!   them, it is on none until one is left;
//! - a port whose pod's interface has another port's MAC is no one's, unless it is the
//!   one already located with that MAC (the bridge forwards by MAC).
//!
//! A port that is no one's keeps (or gets back) the pod-start hold: it drops. Each such
//! port is a [`Conflict`], logged, counted and shown in `netpol status`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::discovery::{Location, Ports};
use netpol_engine::index::PodKey;

/// A port left held because what its pod's namespace says cannot be trusted.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Conflict {
    /// The port (host-side veth).
    pub port: String,
    /// The pods whose addresses it holds.
    pub pods: Vec<PodKey>,
    pub why: String,
}

/// Where the pods are, and the ports that are no one's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Located {
    pub found: BTreeMap<PodKey, Location>,
    pub conflicts: Vec<Conflict>,
    /// Port (ifindex) → the pod it was ever located as, while both are there: the memory
    /// that keeps a port from changing hands (the next step's `owners`). A pod deleted
    /// frees its port's ifindex for a new pod's (the kernel may give it again).
    pub owners: BTreeMap<u32, PodKey>,
}

impl Ports {
    /// Locates the pods in `pods` (key → addresses) among the bridge's ports whose MAC is
    /// known, given where they were (`before`: the attachments of the last sync) and
    /// whose each port has been (`owners`, from the last step's [`Located`]).
    pub fn locate(
        &self,
        pods: &BTreeMap<PodKey, Vec<IpAddr>>,
        before: &BTreeMap<PodKey, Location>,
        owners: &BTreeMap<u32, PodKey>,
    ) -> Located {
        let by_ip: BTreeMap<IpAddr, &PodKey> = pods
            .iter()
            .flat_map(|(k, ips)| ips.iter().map(move |ip| (*ip, k)))
            .collect();
        let mut located = Located {
            owners: owners
                .iter()
                .filter(|(i, k)| self.ports.contains_key(i) && pods.contains_key(*k))
                .map(|(i, k)| (*i, k.clone()))
                .chain(
                    before
                        .iter()
                        .filter(|(k, _)| pods.contains_key(*k))
                        .map(|(k, l)| (l.ifindex, k.clone())),
                )
                .collect(),
            ..Located::default()
        };
        let owner = located.owners.clone();
        let mut conflicts = Vec::new();
        let mut conflict = |port: &str, pods: Vec<PodKey>, why: String| {
            conflicts.push(Conflict {
                port: port.to_string(),
                pods,
                why,
            })
        };
        // MAC → the ports whose pod interface has it (the bridge forwards by MAC: two
        // ports of one MAC take each other's traffic).
        let mut by_mac: BTreeMap<[u8; 6], Vec<u32>> = BTreeMap::new();
        for (ifindex, port) in &self.ports {
            if let Some(mac) = port.mac {
                by_mac.entry(mac).or_default().push(*ifindex);
            }
        }
        // pod → the ports claiming only it
        let mut claims: BTreeMap<&PodKey, Vec<Location>> = BTreeMap::new();
        for (ifindex, port) in &self.ports {
            let Some(mac) = port.mac else { continue };
            let twins: Vec<u32> = by_mac[&mac]
                .iter()
                .copied()
                .filter(|i| i != ifindex)
                .collect();
            // A MAC another port has: only the port already located with it keeps it.
            if !twins.is_empty()
                && !before
                    .values()
                    .any(|l| l.ifindex == *ifindex && l.mac == mac)
            {
                let pods = port
                    .addrs
                    .iter()
                    .filter_map(|ip| by_ip.get(ip).map(|k| (*k).clone()))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let other = &self.ports[&twins[0]].name;
                conflict(&port.name, pods, format!("has the MAC of port {other}"));
                continue;
            }
            let pods: BTreeSet<&PodKey> = port
                .addrs
                .iter()
                .filter_map(|ip| by_ip.get(ip).copied())
                .collect();
            let Some(&pod) = pods.first() else { continue };
            if pods.len() > 1 {
                let pods: Vec<PodKey> = pods.into_iter().cloned().collect();
                conflict(
                    &port.name,
                    pods,
                    "holds the addresses of several pods".into(),
                );
                continue;
            }
            if let Some(was) = owner.get(ifindex).filter(|was| *was != pod) {
                conflict(&port.name, vec![pod.clone()], format!("was {was}'s port"));
                continue;
            }
            claims.entry(pod).or_default().push(Location {
                ifindex: *ifindex,
                ifname: port.name.clone(),
                mac,
            });
        }
        for (pod, ports) in claims {
            let stays = before
                .get(pod)
                .and_then(|b| ports.iter().find(|l| l.same_port(b)));
            let chosen = match (stays, ports.as_slice()) {
                (Some(l), _) => Some(l.clone()),
                (None, [only]) => Some(only.clone()),
                (None, _) => None,
            };
            for l in &ports {
                if chosen.as_ref().is_some_and(|c| c.same_port(l)) {
                    continue;
                }
                let why = match &chosen {
                    Some(c) => format!("claims an address of {pod}, whose port is {}", c.ifname),
                    None => format!("one of several new ports claiming {pod}'s address"),
                };
                conflict(&l.ifname, vec![pod.clone()], why);
            }
            if let Some(c) = chosen {
                located.owners.insert(c.ifindex, pod.clone());
                located.found.insert(pod.clone(), c);
            }
        }
        conflicts.sort();
        located.conflicts = conflicts;
        located
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::discovery::Port;
    use super::*;

    /// Ports 10, 11, ... holding the given addresses (MACs known).
    pub(crate) fn ports(addrs: &[&[&str]]) -> Ports {
        Ports {
            ports: addrs
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    (
                        10 + i as u32,
                        Port {
                            name: format!("veth{}", 10 + i),
                            addrs: a.iter().map(|a| a.parse().unwrap()).collect(),
                            mac: Some([2, 0, 0, 0, 0, i as u8]),
                        },
                    )
                })
                .collect(),
            ..Ports::default()
        }
    }

    fn pods(list: &[(&str, &str)]) -> BTreeMap<PodKey, Vec<IpAddr>> {
        list.iter()
            .map(|(k, ip)| (k.to_string(), vec![ip.parse().unwrap()]))
            .collect()
    }

    fn at(located: &Located) -> BTreeMap<&str, u32> {
        located
            .found
            .iter()
            .map(|(k, l)| (k.as_str(), l.ifindex))
            .collect()
    }

    fn held(located: &Located) -> Vec<&str> {
        located.conflicts.iter().map(|c| c.port.as_str()).collect()
    }

    #[test]
    fn each_pod_on_the_port_holding_its_address() {
        let p = ports(&[&["10.0.0.1"], &["10.0.0.2", "fd00::2"]]);
        let wanted = pods(&[("x/a", "10.0.0.1"), ("x/b", "fd00::2")]);
        let l = p.locate(&wanted, &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(at(&l), [("x/a", 10), ("x/b", 11)].into());
        assert!(l.conflicts.is_empty());
        // Without its MAC a port is no one's yet (not a conflict: discovery is behind).
        let mut p = p;
        p.ports.get_mut(&10).unwrap().mac = None;
        let l = p.locate(&wanted, &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(at(&l), [("x/b", 11)].into());
        assert!(l.conflicts.is_empty());
    }

    /// A pod that adds another pod's address to its own: its port is no one's (held),
    /// the other pod stays where it is.
    #[test]
    fn a_port_holding_two_pods_addresses_is_no_ones() {
        let wanted = pods(&[("x/a", "10.0.0.1"), ("x/b", "10.0.0.2")]);
        let before = ports(&[&["10.0.0.1"], &["10.0.0.2"]]).locate(
            &wanted,
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        let after = ports(&[&["10.0.0.1", "10.0.0.2"], &["10.0.0.2"]]).locate(
            &wanted,
            &before.found,
            &before.owners,
        );
        assert_eq!(at(&after), [("x/b", 11)].into());
        assert_eq!(held(&after), ["veth10"]);
        assert_eq!(after.conflicts[0].pods, ["x/a", "x/b"]);
    }

    /// A pod that swaps its address for another pod's: its port does not become that
    /// pod's, and that pod stays on its own port.
    #[test]
    fn a_port_does_not_change_hands() {
        let wanted = pods(&[("x/a", "10.0.0.1"), ("x/b", "10.0.0.2")]);
        let before = ports(&[&["10.0.0.1"], &["10.0.0.2"]]).locate(
            &wanted,
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        let swapped = ports(&[&["10.0.0.2"], &["10.0.0.2"]]);
        let after = swapped.locate(&wanted, &before.found, &before.owners);
        assert_eq!(at(&after), [("x/b", 11)].into());
        assert_eq!(held(&after), ["veth10"]);
        // Even once b's own port is gone, a's port is not b's.
        let mut alone = swapped.clone();
        alone.ports.remove(&11);
        let after = alone.locate(&wanted, &after.found, &after.owners);
        assert!(after.found.is_empty());
        assert_eq!(held(&after), ["veth10"]);
    }

    /// An address moved to `lo` (or removed): the pod is located nowhere (its port gets
    /// the hold back), and nothing else moves.
    #[test]
    fn a_pod_whose_address_left_its_interface_is_nowhere() {
        let wanted = pods(&[("x/a", "10.0.0.1"), ("x/b", "10.0.0.2")]);
        let before = ports(&[&["10.0.0.1"], &["10.0.0.2"]]).locate(
            &wanted,
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        let after = ports(&[&[], &["10.0.0.2"]]).locate(&wanted, &before.found, &before.owners);
        assert_eq!(at(&after), [("x/b", 11)].into());
        assert!(after.conflicts.is_empty());
    }

    /// A deleted pod's port index given to a new pod's port (seen in one step): the new
    /// pod's.
    #[test]
    fn a_deleted_pods_port_index_may_be_a_new_pods() {
        let wanted = pods(&[("x/b", "10.0.0.2")]);
        let before = ports(&[&["10.0.0.2"]]).locate(&wanted, &BTreeMap::new(), &BTreeMap::new());
        let now = pods(&[("x/b2", "10.0.0.2")]);
        let l = ports(&[&["10.0.0.2"]]).locate(&now, &BTreeMap::new(), &before.owners);
        assert_eq!(at(&l), [("x/b2", 10)].into());
        assert!(l.conflicts.is_empty());
        // Also in the step that puts b's port on hold (b still attached).
        let l = ports(&[&["10.0.0.2"]]).locate(&now, &before.found, &before.owners);
        assert_eq!(at(&l), [("x/b2", 10)].into());
    }

    /// A pod that sets its interface's MAC to another pod's (the bridge would then
    /// forward that pod's traffic to it): its port is no one's; the other stays.
    #[test]
    fn a_port_with_another_ports_mac_is_no_ones() {
        let wanted = pods(&[("x/a", "10.0.0.1"), ("x/b", "10.0.0.2")]);
        let p = ports(&[&["10.0.0.1"], &["10.0.0.2"]]);
        let before = p.locate(&wanted, &BTreeMap::new(), &BTreeMap::new());
        let mut copied = p.clone();
        copied.ports.get_mut(&11).unwrap().mac = p.ports[&10].mac;
        let after = copied.locate(&wanted, &before.found, &before.owners);
        assert_eq!(at(&after), [("x/a", 10)].into());
        assert_eq!(held(&after), ["veth11"]);
        assert_eq!(after.conflicts[0].pods, ["x/b"]);
        // Two new ports of one MAC: neither.
        let l = copied.locate(&wanted, &BTreeMap::new(), &BTreeMap::new());
        assert!(l.found.is_empty());
        assert_eq!(held(&l), ["veth10", "veth11"]);
    }

    /// Two new ports claiming one pod (a recreated pod whose old veth lingers, seen by an
    /// agent that just started, or an impostor): neither is it until one is left; a pod
    /// already located stays on its port.
    #[test]
    fn several_ports_claiming_one_pod() {
        let wanted = pods(&[("x/a", "10.0.0.1")]);
        let both = ports(&[&["10.0.0.1"], &["10.0.0.1"]]);
        let l = both.locate(&wanted, &BTreeMap::new(), &BTreeMap::new());
        assert!(l.found.is_empty());
        assert_eq!(held(&l), ["veth10", "veth11"]);
        let before = ports(&[&["10.0.0.1"]]).locate(&wanted, &BTreeMap::new(), &BTreeMap::new());
        let l = both.locate(&wanted, &before.found, &before.owners);
        assert_eq!(at(&l), [("x/a", 10)].into());
        assert_eq!(held(&l), ["veth11"]);
        // The old port gone: the new one is the pod's.
        let mut only_new = both.clone();
        only_new.ports.remove(&10);
        assert_eq!(
            at(&only_new.locate(&wanted, &l.found, &l.owners)),
            [("x/a", 11)].into()
        );
    }
}

//! Discovery on real links: a node namespace with a `cni0` bridge, pod namespaces plugged
//! into it by veths the ways CNIs do, and `discovery::watch` running in the node
//! namespace. Every change must reach the receiver as an event (nothing here waits for a
//! timer: each step waits on the receiver for the state it expects). Needs root;
//! namespaces are named `t<tag><pid>` and removed by guards.

mod support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netpol_agent::datapath::discovery::{self, Ports, Published};
use support::lab::ip;
use support::raw::mac_of;
use tokio::sync::watch;

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn add(tag: &str) -> Netns {
        let name = format!("t{tag}{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Starts discovery inside `node`; the names of new pod ports go to the returned list
/// (what the pod-start hold is given).
fn watch_in(node: &str) -> (watch::Receiver<Published>, Arc<Mutex<Vec<String>>>) {
    let announced = Arc::new(Mutex::new(Vec::new()));
    let log = announced.clone();
    let path = format!("/var/run/netns/{node}");
    let rx = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(&path).unwrap();
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        // The sockets belong to the namespace they are opened in.
        discovery::watch(
            "cni0",
            Some(Box::new(move |name: &str| {
                log.lock().unwrap().push(name.to_string())
            })),
        )
        .unwrap()
    })
    .join()
    .unwrap();
    (rx, announced)
}

/// Waits until the published ports satisfy `what`.
fn wait_for(
    rt: &tokio::runtime::Runtime,
    rx: &mut watch::Receiver<Published>,
    what: &str,
    f: impl Fn(&Ports) -> bool,
) -> Published {
    let seen = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|p| f(&p.ports)))
            .await
            .map(|r| r.expect("discovery stopped").clone())
    });
    seen.unwrap_or_else(|_| panic!("{what}: not seen within 10 s: {:?}", rx.borrow().ports))
}

fn addrs(ports: &Ports, veth: &str) -> Option<Vec<IpAddr>> {
    ports
        .ports
        .values()
        .find(|p| p.name == veth)
        .map(|p| p.addrs.iter().copied().collect())
}

/// The MAC discovery read for a port's pod (None: not yet).
fn mac(ports: &Ports, veth: &str) -> Option<[u8; 6]> {
    ports
        .ports
        .values()
        .find(|p| p.name == veth)
        .and_then(|p| p.mac)
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[test]
#[ignore = "needs root: network namespaces and netlink"]
fn pod_ports_and_the_addresses_inside_their_namespaces_are_followed_by_events() {
    let pid = std::process::id() % 100_000;
    let node = Netns::add("dn");
    let n = node.0.as_str();
    ip(&["-n", n, "link", "add", "cni0", "type", "bridge"]);
    ip(&["-n", n, "addr", "add", "10.244.0.1/24", "dev", "cni0"]);
    ip(&["-n", n, "link", "set", "cni0", "up"]);
    ip(&[
        "-n",
        n,
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "8472",
    ]);

    // A pod from before the agent: found by the first dump.
    let a = Netns::add("da");
    let veth_a = format!("vda{pid}");
    ip(&[
        "-n", n, "link", "add", &veth_a, "type", "veth", "peer", "name", "eth0", "netns", &a.0,
    ]);
    ip(&["-n", n, "link", "set", &veth_a, "master", "cni0", "up"]);
    ip(&["-n", &a.0, "addr", "add", "10.244.0.2/24", "dev", "eth0"]);
    ip(&["-n", &a.0, "link", "set", "eth0", "up"]);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let (mut rx, announced) = watch_in(n);
    {
        let first = rx.borrow_and_update().clone();
        assert_eq!(first.changes, 0);
        assert_eq!(first.ports.bridge_addrs, ips(&["10.244.0.1"]));
        assert_eq!(addrs(&first.ports, &veth_a), Some(ips(&["10.244.0.2"])));
        assert_eq!(
            first.ports.ports.len(),
            1,
            "only pods' veths: {:?}",
            first.ports
        );
        assert!(first.ports.devices.contains("flannel.1"));
        // The MAC of the pod's own interface, read from its namespace's first dump.
        assert_eq!(mac(&first.ports, &veth_a), Some(mac_of(&a.0)));
        assert_eq!(*announced.lock().unwrap(), std::slice::from_ref(&veth_a));
    }

    // The bridge CNI's order: the veth joins the bridge, then the pod gets its address.
    let b = Netns::add("db");
    let veth_b = format!("vdb{pid}");
    ip(&[
        "-n", n, "link", "add", &veth_b, "type", "veth", "peer", "name", "eth0", "netns", &b.0,
    ]);
    ip(&["-n", n, "link", "set", &veth_b, "master", "cni0", "up"]);
    wait_for(&rt, &mut rx, "b's port", |p| addrs(p, &veth_b).is_some());
    assert!(
        announced.lock().unwrap().contains(&veth_b),
        "announced (held) before it was published"
    );
    ip(&["-n", &b.0, "addr", "add", "10.244.0.3/24", "dev", "eth0"]);
    ip(&[
        "-n",
        &b.0,
        "addr",
        "add",
        "fd00::3/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    let seen = wait_for(&rt, &mut rx, "b's addresses and MAC", |p| {
        addrs(p, &veth_b).is_some_and(|a| a.len() == 2) && mac(p, &veth_b).is_some()
    });
    assert_eq!(
        mac(&seen.ports, &veth_b),
        Some(mac_of(&b.0)),
        "heard as an event"
    );
    assert!(seen.changes >= 2, "{seen:?}");
    let pods: BTreeMap<String, Vec<IpAddr>> = [
        ("x/a".to_string(), ips(&["10.244.0.2"])),
        ("x/b".to_string(), ips(&["fd00::3"])),
        ("x/c".to_string(), ips(&["10.244.0.9"])),
    ]
    .into();
    let found = seen
        .ports
        .locate(&pods, &BTreeMap::new(), &BTreeMap::new())
        .found;
    assert_eq!(found["x/a"].ifname, veth_a);
    assert_eq!(found["x/b"].ifname, veth_b);
    assert!(!found.contains_key("x/c"));

    // Another CNI's order: the pair made and addressed inside the pod, the host end moved
    // out to the node last; the namespace only then has an id in the node, so its
    // addresses were never heard as events: they are dumped when the port appears.
    let c = Netns::add("dc");
    let veth_c = format!("vdc{pid}");
    ip(&[
        "-n", &c.0, "link", "add", "eth0", "type", "veth", "peer", "name", &veth_c,
    ]);
    ip(&["-n", &c.0, "addr", "add", "10.244.0.9/24", "dev", "eth0"]);
    ip(&["-n", &c.0, "link", "set", "eth0", "up"]);
    ip(&["-n", &c.0, "link", "set", &veth_c, "netns", n]);
    ip(&["-n", n, "link", "set", &veth_c, "master", "cni0", "up"]);
    let seen = wait_for(&rt, &mut rx, "c's port with its address", |p| {
        addrs(p, &veth_c).is_some_and(|a| a == ips(&["10.244.0.9"]))
    });
    assert_eq!(
        mac(&seen.ports, &veth_c),
        Some(mac_of(&c.0)),
        "dumped with the addresses"
    );
    assert_eq!(
        seen.ports
            .locate(&pods, &BTreeMap::new(), &BTreeMap::new())
            .found["x/c"]
            .ifname,
        veth_c
    );

    // An address removed, a port leaving the bridge, a pod deleted.
    ip(&["-n", &b.0, "addr", "del", "fd00::3/64", "dev", "eth0"]);
    wait_for(&rt, &mut rx, "b's IPv6 address gone", |p| {
        addrs(p, &veth_b) == Some(ips(&["10.244.0.3"]))
    });
    ip(&["-n", n, "link", "set", &veth_b, "nomaster"]);
    wait_for(&rt, &mut rx, "b off the bridge", |p| {
        addrs(p, &veth_b).is_none()
    });
    drop(a);
    let seen = wait_for(&rt, &mut rx, "a's veth gone with its namespace", |p| {
        addrs(p, &veth_a).is_none()
    });
    assert_eq!(
        seen.ports
            .ports
            .values()
            .map(|p| p.name.clone())
            .collect::<Vec<_>>(),
        std::slice::from_ref(&veth_c)
    );
    // The bridge's own address changes are followed too (the node's identity).
    ip(&["-n", n, "addr", "add", "fd00::1/64", "dev", "cni0", "nodad"]);
    wait_for(&rt, &mut rx, "the bridge's IPv6 address", |p| {
        p.bridge_addrs.len() == 2
    });
}

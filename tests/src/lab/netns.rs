//! Network namespaces, the bridge and veths, by running iproute2 (`ip`). Errors carry
//! the command and its stderr; callers add which pod or node it was for.

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// Runs `ip args...`; stdin is `input` when given (for `-batch -`).
fn ip(args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    let shown = format!("ip {}", args.join(" "));
    let mut child = Command::new("ip")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{shown}` (is iproute2 installed?)"))?;
    if let Some(text) = input {
        // Dropped at the end of the statement: `ip` sees EOF and runs the batch.
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        match input {
            Some(batch) => bail!("`{shown}` failed: {}\nbatch was:\n{batch}", err.trim()),
            None => bail!("`{shown}` failed: {}", err.trim()),
        }
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs several `ip` commands inside `netns` in one process.
fn batch(netns: &str, lines: &[String]) -> anyhow::Result<()> {
    let mut text = lines.join("\n");
    text.push('\n');
    ip(&["-n", netns, "-batch", "-"], Some(&text)).map(drop)
}

/// Names of all named network namespaces.
pub fn list() -> anyhow::Result<Vec<String>> {
    let out = ip(&["netns", "list"], None)?;
    // Lines look like "name" or "name (id: 3)".
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Pids of the processes whose network namespace is `netns`.
pub fn pids(netns: &str) -> anyhow::Result<Vec<i32>> {
    let out = ip(&["netns", "pids", netns], None)?;
    Ok(out.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

pub fn add(netns: &str) -> anyhow::Result<()> {
    ip(&["netns", "add", netns], None).map(drop)
}

/// Deletes `netns`; a namespace that is already gone is fine.
pub fn delete(netns: &str) -> anyhow::Result<()> {
    if !std::path::Path::new("/run/netns").join(netns).exists() {
        return Ok(());
    }
    ip(&["netns", "delete", netns], None).map(drop)
}

/// Deletes interface `link` in `netns`; one that is already gone is fine.
pub fn delete_link(netns: &str, link: &str) -> anyhow::Result<()> {
    let exists = ip(&["-n", netns, "-o", "link", "show"], None)?
        .lines()
        .any(|l| l.split(": ").nth(1).and_then(|n| n.split('@').next()) == Some(link));
    if !exists {
        return Ok(());
    }
    ip(&["-n", netns, "link", "del", link], None).map(drop)
}

/// The pods' IPv6 network: each pod's IPv4 address embedded in `fd00::/96`, so the
/// dual-stack address follows from the IPv4 one (`10.244.0.2` → `fd00::af4:2`), and a
/// node's IPv6 pod CIDR mirrors its IPv4 one (`10.244.1.0/24` → `fd00::af4:100/120`).
pub const IPV6_BASE_PREFIX: u8 = 96;

pub fn ipv6_of(ip: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = ip.octets();
    Ipv6Addr::from([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, a, b, c, d])
}

/// Runs `sysctl -qw` settings inside `netns`.
fn sysctl(netns: &str, settings: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "sysctl", "-qw"])
        .args(settings)
        .output()
        .context("running sysctl (procps)")?;
    if !out.status.success() {
        bail!(
            "sysctl {} in {netns}: {}",
            settings.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The node: a namespace with `lo` and the bridge holding the pods' gateway addresses
/// (IPv4 and IPv6; no duplicate address detection, so the addresses work at once). It
/// routes (Services are DNATed and routed, other nodes' pods are behind the overlay).
pub fn setup_node(netns: &str, bridge: &str, gateway: Ipv4Addr, prefix: u8) -> anyhow::Result<()> {
    add(netns)?;
    batch(
        netns,
        &[
            "link set lo up".into(),
            format!("link add {bridge} type bridge"),
            format!("addr add {gateway}/{prefix} dev {bridge}"),
            format!(
                "addr add {}/{} dev {bridge} nodad",
                ipv6_of(gateway),
                IPV6_BASE_PREFIX + prefix
            ),
            format!("link set {bridge} up"),
        ],
    )?;
    sysctl(
        netns,
        &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
    )
}

/// The kernel's neighbour tables (ARP and NDP) are shared by all network namespaces and
/// hold 1024 entries by default: a node's pods reach each other on-link (one entry per
/// pair), so 100 pods on one node overflow them and connections time out. Raised, never
/// lowered, to what a lab of a few hundred pods needs (Kubernetes nodes do the same).
pub fn raise_neighbour_limits() -> anyhow::Result<()> {
    for family in ["ipv4", "ipv6"] {
        for (knob, wanted) in [
            ("gc_thresh1", 4096u64),
            ("gc_thresh2", 32768),
            ("gc_thresh3", 65536),
        ] {
            let path = format!("/proc/sys/net/{family}/neigh/default/{knob}");
            let now: u64 = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {path}"))?
                .trim()
                .parse()
                .unwrap_or(0);
            if now < wanted {
                std::fs::write(&path, wanted.to_string())
                    .with_context(|| format!("raising {path} to {wanted}"))?;
            }
        }
    }
    Ok(())
}

/// The lab's underlay: a namespace with one bridge all nodes' uplinks are plugged into.
pub fn setup_underlay(netns: &str) -> anyhow::Result<()> {
    add(netns)?;
    batch(
        netns,
        &[
            "link set lo up".into(),
            format!("link add {UNDERLAY_BRIDGE} type bridge"),
            format!("link set {UNDERLAY_BRIDGE} up"),
        ],
    )
}

pub const UNDERLAY_BRIDGE: &str = "br-underlay";
/// The node's uplink to the underlay (in the node namespace).
pub const UPLINK: &str = "eth0";
/// The VXLAN device, as Flannel names it.
pub const OVERLAY: &str = "flannel.1";
/// The overlay adds 50 bytes; the uplink carries them so pods keep a 1500-byte MTU.
const UPLINK_MTU: u32 = 1550;

/// One node as the overlay sees it.
#[derive(Clone, Debug)]
pub struct NodeNet {
    pub index: u32,
    pub netns: String,
    /// The node's pod CIDR (IPv4); the IPv6 one follows from it.
    pub network: Ipv4Addr,
    pub prefix: u8,
    pub underlay_ip: Ipv4Addr,
}

impl NodeNet {
    pub fn vtep_mac(&self) -> String {
        format!(
            "0e:6e:70:00:{:02x}:{:02x}",
            self.index >> 8,
            self.index & 0xff
        )
    }
}

/// The node's uplink into the underlay and its VXLAN device with Flannel's routes to
/// every other node's pod CIDRs (a route via the peer's VTEP address, a permanent
/// neighbour entry for it, and an fdb entry sending its MAC to the peer's underlay IP).
pub fn setup_overlay(node: &NodeNet, all: &[NodeNet], underlay_netns: &str) -> anyhow::Result<()> {
    let port = format!("node{}", node.index);
    delete_link(underlay_netns, &port)?;
    batch(
        underlay_netns,
        &[
            format!(
                "link add {port} mtu {UPLINK_MTU} type veth peer name {UPLINK} netns {}",
                node.netns
            ),
            format!("link set {port} master {UNDERLAY_BRIDGE} up"),
        ],
    )?;
    let mut lines = vec![
        format!("link set {UPLINK} mtu {UPLINK_MTU} up"),
        format!("addr add {}/16 dev {UPLINK}", node.underlay_ip),
        format!(
            "link add {OVERLAY} type vxlan id 1 local {} dev {UPLINK} dstport 8472 nolearning",
            node.underlay_ip
        ),
        format!("link set {OVERLAY} address {} mtu 1500 up", node.vtep_mac()),
        format!("addr add {}/32 dev {OVERLAY}", node.network),
        format!("addr add {}/128 dev {OVERLAY} nodad", ipv6_of(node.network)),
    ];
    for peer in all.iter().filter(|p| p.index != node.index) {
        let (v4, v6) = (peer.network, ipv6_of(peer.network));
        let mac = peer.vtep_mac();
        lines.extend([
            format!("neigh add {v4} lladdr {mac} dev {OVERLAY} nud permanent"),
            format!("neigh add {v6} lladdr {mac} dev {OVERLAY} nud permanent"),
            format!(
                "route add {v4}/{} via {v4} dev {OVERLAY} onlink",
                peer.prefix
            ),
            format!(
                "route add {v6}/{} via {v6} dev {OVERLAY} onlink",
                IPV6_BASE_PREFIX + peer.prefix
            ),
        ]);
    }
    batch(&node.netns, &lines)?;
    for peer in all.iter().filter(|p| p.index != node.index) {
        let out = Command::new("bridge")
            .args(["-n", &node.netns, "fdb", "append", &peer.vtep_mac()])
            .args(["dev", OVERLAY, "dst", &peer.underlay_ip.to_string()])
            .output()
            .context("running bridge (iproute2)")?;
        if !out.status.success() {
            bail!(
                "bridge fdb append in {}: {}",
                node.netns,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

pub struct PodLink<'a> {
    pub node_netns: &'a str,
    pub bridge: &'a str,
    pub pod_netns: &'a str,
    pub veth: &'a str,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

/// A pod: its namespace, a veth pair (host side on the bridge, `eth0` in the pod), its
/// address and a default route via the bridge. Undone on failure, so that a retry
/// starts from scratch.
pub fn setup_pod(link: &PodLink) -> anyhow::Result<()> {
    // A veth of an earlier pod of this name that the kernel has not destroyed yet.
    delete_link(link.node_netns, link.veth)?;
    add(link.pod_netns)?;
    let result = (|| {
        // Created in the node so the host side lands there and `eth0` in the pod.
        batch(
            link.node_netns,
            &[
                format!(
                    "link add {} type veth peer name eth0 netns {}",
                    link.veth, link.pod_netns
                ),
                format!("link set {} master {} up", link.veth, link.bridge),
            ],
        )?;
        batch(
            link.pod_netns,
            &[
                "link set lo up".into(),
                format!("addr add {}/{} dev eth0", link.ip, link.prefix),
                format!(
                    "addr add {}/{} dev eth0 nodad",
                    ipv6_of(link.ip),
                    IPV6_BASE_PREFIX + link.prefix
                ),
                "link set eth0 up".into(),
                format!("route add default via {}", link.gateway),
                format!("route add default via {}", ipv6_of(link.gateway)),
            ],
        )
    })();
    if result.is_err() {
        // Deleting the pod namespace also deletes the veth pair.
        let _ = delete(link.pod_netns);
    }
    result
}

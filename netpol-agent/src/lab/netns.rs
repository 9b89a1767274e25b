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
/// dual-stack address follows from the IPv4 one (`10.244.0.2` → `fd00::af4:2`).
pub const IPV6_PREFIX: u8 = 96;

pub fn ipv6_of(ip: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = ip.octets();
    Ipv6Addr::from([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, a, b, c, d])
}

/// The node: a namespace with `lo` and the bridge holding the pods' gateway addresses
/// (IPv4 and IPv6; no duplicate address detection, so the addresses work at once).
pub fn setup_node(netns: &str, bridge: &str, gateway: Ipv4Addr, prefix: u8) -> anyhow::Result<()> {
    add(netns)?;
    batch(
        netns,
        &[
            "link set lo up".into(),
            format!("link add {bridge} type bridge"),
            format!("addr add {gateway}/{prefix} dev {bridge}"),
            format!(
                "addr add {}/{IPV6_PREFIX} dev {bridge} nodad",
                ipv6_of(gateway)
            ),
            format!("link set {bridge} up"),
        ],
    )
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
                format!("addr add {}/{IPV6_PREFIX} dev eth0 nodad", ipv6_of(link.ip)),
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

//! Finding local pods' host-side veths the way a companion of a CNI must: the ports of
//! the CNI bridge, matched to pods by the addresses inside each pod's network
//! namespace (the pod side's peer ifindex names the bridge port).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::index::PodKey;

/// Where a local pod's traffic enters and leaves the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub ifindex: u32,
    pub ifname: String,
}

#[derive(Deserialize)]
struct Link {
    ifindex: u32,
    ifname: String,
    #[serde(default)]
    link_index: Option<u32>,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Deserialize)]
struct AddrInfo {
    local: String,
}

fn ip_json(args: &[&str]) -> anyhow::Result<Vec<Link>> {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if out.stdout.trim_ascii().is_empty() {
        return Ok(vec![]);
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing `ip -j {}`", args.join(" ")))
}

/// The bridge's own addresses: the node's address on the pod network.
pub fn bridge_addrs(bridge: &str) -> anyhow::Result<Vec<IpAddr>> {
    let links = ip_json(&["addr", "show", "dev", bridge])?;
    Ok(links
        .iter()
        .flat_map(|l| &l.addr_info)
        .filter_map(|a| a.local.parse().ok())
        .filter(|ip: &IpAddr| match ip {
            IpAddr::V6(v6) => !v6.is_unicast_link_local(),
            IpAddr::V4(_) => true,
        })
        .collect())
}

/// Remembers what each pod namespace held, so a steady state costs one `ip` call.
#[derive(Default)]
pub struct Discovery {
    /// netns name → (peer ifindex on the node side, addresses) of its interfaces.
    seen: BTreeMap<String, Vec<(u32, Vec<IpAddr>)>>,
}

impl Discovery {
    /// Locates every pod in `pods` (key → addresses) on `bridge`.
    pub fn locate(
        &mut self,
        bridge: &str,
        pods: &BTreeMap<PodKey, Vec<IpAddr>>,
    ) -> anyhow::Result<BTreeMap<PodKey, Location>> {
        let ports: BTreeMap<u32, String> = ip_json(&["link", "show", "master", bridge])?
            .into_iter()
            .map(|l| (l.ifindex, l.ifname))
            .collect();
        let by_ip: BTreeMap<IpAddr, &PodKey> = pods
            .iter()
            .flat_map(|(k, ips)| ips.iter().map(move |ip| (*ip, k)))
            .collect();
        let mut found = BTreeMap::new();
        let scan = |found: &mut BTreeMap<PodKey, Location>,
                    seen: &BTreeMap<String, Vec<(u32, Vec<IpAddr>)>>| {
            for ifaces in seen.values() {
                for (peer, ips) in ifaces {
                    let Some(name) = ports.get(peer) else {
                        continue;
                    };
                    if let Some(pod) = ips.iter().find_map(|ip| by_ip.get(ip)) {
                        found.insert(
                            (*pod).clone(),
                            Location {
                                ifindex: *peer,
                                ifname: name.clone(),
                            },
                        );
                    }
                }
            }
        };
        scan(&mut found, &self.seen);
        if found.len() < pods.len() {
            self.refresh(&ports)?;
            found.clear();
            scan(&mut found, &self.seen);
        }
        Ok(found)
    }

    fn refresh(&mut self, ports: &BTreeMap<u32, String>) -> anyhow::Result<()> {
        let names: Vec<String> = match std::fs::read_dir("/var/run/netns") {
            Ok(dir) => dir
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect(),
            Err(_) => vec![],
        };
        self.seen.retain(|n, _| names.contains(n));
        for name in names {
            // Interfaces and addresses change rarely once a pod is up: re-read only the
            // namespaces without an address yet or whose veth is no longer a bridge port.
            let settled = |v: &Vec<(u32, Vec<IpAddr>)>| {
                v.iter()
                    .any(|(peer, ips)| !ips.is_empty() && ports.contains_key(peer))
            };
            if self.seen.get(&name).is_some_and(settled) {
                continue;
            }
            let Ok(links) = ip_json(&["-n", &name, "addr", "show"]) else {
                continue;
            };
            let ifaces = links
                .into_iter()
                .filter_map(|l| {
                    let peer = l.link_index?;
                    Some((
                        peer,
                        l.addr_info
                            .iter()
                            .filter_map(|a| a.local.parse().ok())
                            .collect(),
                    ))
                })
                .collect();
            self.seen.insert(name, ifaces);
        }
        Ok(())
    }
}

//! Pods: where they are placed, their network namespaces and servers, how the agent's
//! view shows them.

use crate::lab::netns::{self, PodLink};
use crate::lab::{dns, BRIDGE};
use anyhow::bail;
use anyhow::Context;
use k8s_openapi::api::core::v1::{Pod, PodIP, PodStatus as K8sPodStatus};
use std::io::BufRead;
use std::io::BufReader;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::*;

pub(super) fn join_ports(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The node a pod runs on: its `spec.nodeName` when that names a lab node, else one
/// picked by a hash of its name (stable whatever other pods come and go).
pub(super) fn placement(pod: &Pod, key: &PodKey, nodes: u32) -> u32 {
    let named = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .and_then(|n| n.strip_prefix("node"))
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|n| *n < nodes);
    named.unwrap_or_else(|| {
        let mut h = sha2::Sha256::new();
        use sha2::Digest;
        h.update(key.0.as_bytes());
        h.update([0]);
        h.update(key.1.as_bytes());
        let d = h.finalize();
        u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % nodes
    })
}

/// A pod the lab's DNS server runs in.
pub(super) fn is_dns_pod(pod: &Pod) -> bool {
    pod.metadata.namespace.as_deref() == Some("kube-system")
        && pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("k8s-app"))
            .map(String::as_str)
            == Some("kube-dns")
}

/// Pods the lab runs: running-ish pods, except virtual ones (pods of a node the lab
/// only pretends to have).
pub(super) fn runs_in_lab(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded") | Some("Failed")) && !is_virtual(pod)
}

pub(super) fn is_host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

pub(super) fn is_virtual(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::lab::VIRTUAL_ANNOTATION))
        .is_some_and(|v| v == "true")
}

pub(super) fn pod_key(pod: &Pod) -> Option<PodKey> {
    let name = pod.metadata.name.clone()?;
    Some((
        pod.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name,
    ))
}

pub(super) fn ns_or_default(ns: &str) -> &str {
    if ns.is_empty() {
        "default"
    } else {
        ns
    }
}

/// The pod as the agent should see it: on its node, running, with the lab's addresses
/// (`ips`, the first the primary).
pub(super) fn place(pod: &Pod, ips: &[std::net::IpAddr], node: u32) -> Pod {
    let mut pod = pod.clone();
    pod.spec.get_or_insert_with(Default::default).node_name = Some(crate::lab::node_name(node));
    let status = pod.status.get_or_insert_with(K8sPodStatus::default);
    status.phase = Some("Running".into());
    status.pod_ip = ips.first().map(|ip| ip.to_string());
    status.pod_ips = Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect());
    pod
}

/// Starts `netpol lab serve` in a pod and waits until it has bound its ports (it says
/// "ready" on stdout), so that a `wait` that returns means the ports answer.
pub(super) fn start_server(
    netpol_bin: &Path,
    netns: &str,
    ports: &Ports,
    who: &str,
    dns: Option<&Path>,
) -> anyhow::Result<Child> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns])
        .arg(netpol_bin)
        .args(["lab", "serve", "--who", who]);
    if let Some(records) = dns {
        cmd.arg("--dns").arg(records);
    }
    if !ports.tcp.is_empty() {
        cmd.args(["--tcp", &join_ports(&ports.tcp)]);
    }
    if !ports.udp.is_empty() {
        cmd.args(["--udp", &join_ports(&ports.udp)]);
    }
    // stderr goes to the supervisor's log, where a bind error is worth reading.
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("spawning ip netns exec")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = tx.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
    });
    let ready = rx.recv_timeout(SERVER_START);
    if matches!(&ready, Ok(Ok(line)) if line.trim() == "ready") {
        return Ok(child);
    }
    let mut server = Some(child);
    stop_child(&mut server);
    match ready {
        Err(_) => bail!("the server did not bind its ports within {SERVER_START:?}"),
        Ok(_) => bail!(
            "the server exited before binding tcp [{}] udp [{}] (see the supervisor log)",
            join_ports(&ports.tcp),
            join_ports(&ports.udp)
        ),
    }
}

pub(super) fn stop_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Lab {
    /// The address of node `index` that hostNetwork pods take: its underlay address,
    /// or on a lab of one node (no underlay), its address on the bridge.
    pub(super) fn node_address(&self, index: u32) -> Ipv4Addr {
        let node = &self.nodes[index as usize];
        match self.multi_node() {
            true => node.net.underlay_ip,
            false => node.cidr.gateway(),
        }
    }

    pub(super) fn ensure_pod(&mut self, key: &PodKey, pod: &Pod) -> anyhow::Result<()> {
        let who = format!("pod {}/{}", key.0, key.1);
        let node = placement(pod, key, self.nodes.len() as u32);
        let moved = |p: &LabPod| p.node != node || p.host_network != is_host_network(pod);
        if self.pods.get(key).is_some_and(moved) {
            tracing::info!(pod = %who, node, "pod moves to another node");
            self.remove_pod(key)?;
        }
        if !self.pods.contains_key(key) && is_host_network(pod) {
            let lab_node = &self.nodes[node as usize];
            let ip = self.node_address(node);
            tracing::info!(pod = %who, %ip, node, "hostNetwork pod is up");
            self.pods.insert(
                key.clone(),
                LabPod {
                    node,
                    host_network: true,
                    netns: lab_node.net.netns.clone(),
                    veth: String::new(),
                    ip,
                    ports: Ports::default(),
                    server: None,
                },
            );
        }
        if !self.pods.contains_key(key) {
            let wanted = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok());
            let lab_node = &mut self.nodes[node as usize];
            let ip = lab_node.pool.assign(key, wanted)?;
            let netns = crate::lab::pod_netns(&self.name, &key.0, &key.1);
            let veth = crate::lab::veth_name(&self.name, &key.0, &key.1);
            let link = PodLink {
                node_netns: &lab_node.net.netns,
                bridge: BRIDGE,
                pod_netns: &netns,
                veth: &veth,
                ip,
                prefix: lab_node.cidr.prefix(),
                gateway: lab_node.cidr.gateway(),
            };
            if let Err(e) = netns::setup_pod(&link) {
                lab_node.pool.release(key);
                return Err(e.context(format!("{who}: setting up its network namespace {netns}")));
            }
            if self.dns {
                dns::write_resolv_conf(&netns, &key.0)?;
            }
            tracing::info!(pod = %who, %ip, node, netns = %netns, veth = %veth, "pod is up");
            self.pods.insert(
                key.clone(),
                LabPod {
                    node,
                    host_network: false,
                    netns,
                    veth,
                    ip,
                    ports: Ports::default(),
                    server: None,
                },
            );
        }
        let lab_pod = self.pods.get_mut(key).expect("inserted above");
        let ports = Ports::of(pod);
        let server_died = match lab_pod.server.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => {
                tracing::warn!(pod = %who, %status, "pod server exited; restarting it");
                true
            }
            _ => false,
        };
        if ports != lab_pod.ports || server_died {
            stop_child(&mut lab_pod.server);
            lab_pod.ports = ports;
            if !lab_pod.ports.is_empty() {
                let dns = (self.dns && is_dns_pod(pod)).then_some(self.paths.dns_records.as_path());
                let who = format!("{}/{}", key.0, key.1);
                let child =
                    start_server(&self.netpol_bin, &lab_pod.netns, &lab_pod.ports, &who, dns)
                        .with_context(|| {
                            format!("{who}: starting its server in {}", lab_pod.netns)
                        })?;
                lab_pod.server = Some(child);
            }
        }
        Ok(())
    }

    pub(super) fn remove_pod(&mut self, key: &PodKey) -> anyhow::Result<()> {
        let Some(mut pod) = self.pods.remove(key) else {
            return Ok(());
        };
        stop_child(&mut pod.server);
        if pod.host_network {
            // The node's namespace and address: nothing of the pod's own to delete.
            tracing::info!(pod = %format_args!("{}/{}", key.0, key.1), "hostNetwork pod removed");
            return Ok(());
        }
        let node = &mut self.nodes[pod.node as usize];
        node.pool.release(key);
        dns::remove_resolv_conf(&pod.netns);
        tracing::info!(pod = %format_args!("{}/{}", key.0, key.1), "pod removed");
        let who = format!("pod {}/{}", key.0, key.1);
        // Deleting the namespace would delete the veth pair too, but only once the kernel
        // has destroyed it (asynchronously): a pod coming straight back would find its
        // veth name still taken. So the veth goes first, synchronously.
        netns::delete_link(&node.net.netns, &pod.veth)
            .with_context(|| format!("{who}: deleting its veth"))?;
        netns::delete(&pod.netns).with_context(|| format!("{who}: deleting {}", pod.netns))
    }
}

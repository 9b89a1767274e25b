//! `netpol lab run`: the long-running owner of one lab. It builds the node, keeps pod
//! namespaces and their servers in step with the manifest directory, renders the agent's
//! view of the cluster (pods placed on node0 with the addresses the lab gave them), runs
//! the agent, and answers `wait`/`status` on `lab.sock`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::{Pod, PodIP, PodStatus as K8sPodStatus};
use notify::{RecursiveMode, Watcher};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::kubeproxy::{self, Candidate, ClusterIps};
use super::netns::{self, NodeNet, PodLink};
use super::{
    dns, Enforcer, LabState, LabStatus, NodeStatus, Paths, PodStatus, ServiceStatus, UpOptions,
    BRIDGE,
};
use netpol_engine::objects::Object;

/// How long a wait may take to find the agent's socket (the agent loads eBPF first).
const AGENT_START: Duration = Duration::from_secs(30);
/// How long a pod server may take to bind its ports.
const SERVER_START: Duration = Duration::from_secs(10);

/// The supervisor's log is its stderr (`up` points it at supervisor.log).
fn log(msg: impl std::fmt::Display) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    eprintln!("{}.{:03} lab: {msg}", now.as_secs(), now.subsec_millis());
}

/// The pod CIDR of the node: `.1` is the bridge (gateway), pods get `.2` up to the last
/// address before broadcast.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PodCidr {
    network: u32,
    prefix: u8,
}

impl PodCidr {
    pub fn parse(text: &str) -> anyhow::Result<PodCidr> {
        let bad =
            || format!("invalid pod CIDR {text:?} (expected an IPv4 CIDR such as 10.244.0.0/24)");
        let (addr, prefix) = text.split_once('/').with_context(bad)?;
        let addr: Ipv4Addr = addr.parse().with_context(bad)?;
        let prefix: u8 = prefix.parse().with_context(bad)?;
        if !(8..=30).contains(&prefix) {
            bail!("{}: the prefix must be between /8 and /30", bad());
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(PodCidr {
            network: u32::from(addr) & mask,
            prefix,
        })
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network)
    }

    /// The `n`th CIDR of this size from here: node `n`'s pod CIDR.
    pub fn nth(&self, n: u32) -> anyhow::Result<PodCidr> {
        let size = 1u64 << (32 - self.prefix);
        let network = self.network as u64 + size * n as u64;
        if network + size > 1 << 32 {
            bail!(
                "{n} pod CIDRs of /{} do not fit after {}",
                self.prefix,
                self.network()
            );
        }
        Ok(PodCidr {
            network: network as u32,
            prefix: self.prefix,
        })
    }

    /// The cluster CIDR kube-proxy is told: 8 bits shorter than a node's (`/16` for the
    /// default `/24`), as Flannel's network around its per-node subnets.
    pub fn cluster(&self) -> String {
        let prefix = self.prefix.saturating_sub(8).max(8);
        let mask = u32::MAX << (32 - prefix);
        format!("{}/{prefix}", Ipv4Addr::from(self.network & mask))
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1)
    }

    fn broadcast(&self) -> u32 {
        self.network | (u32::MAX >> self.prefix)
    }

    /// Addresses pods may have.
    fn is_pod_address(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        ip >= self.network + 2 && ip < self.broadcast()
    }
}

type PodKey = (String, String);

/// Pod addresses. A pod keeps its address for as long as it stays in the lab, whatever
/// else changes, so that the agent's view and the pod's netns never disagree.
#[derive(Debug)]
pub(crate) struct IpPool {
    cidr: PodCidr,
    by_pod: BTreeMap<PodKey, Ipv4Addr>,
    /// Addresses of pods that left: a pod that comes back (a manifest caught mid-write)
    /// gets its address back when it is still free.
    previous: BTreeMap<PodKey, Ipv4Addr>,
}

impl IpPool {
    pub fn new(cidr: PodCidr) -> IpPool {
        IpPool {
            cidr,
            by_pod: BTreeMap::new(),
            previous: BTreeMap::new(),
        }
    }

    /// The address of `pod`: the one it has, else `wanted` (its `status.podIP`) when
    /// free and in the CIDR, else the lowest free one.
    pub fn assign(&mut self, pod: &PodKey, wanted: Option<Ipv4Addr>) -> anyhow::Result<Ipv4Addr> {
        if let Some(ip) = self.by_pod.get(pod) {
            return Ok(*ip);
        }
        let used: BTreeSet<Ipv4Addr> = self.by_pod.values().copied().collect();
        let usable = |ip: &Ipv4Addr| self.cidr.is_pod_address(*ip) && !used.contains(ip);
        let ip = match wanted
            .filter(usable)
            .or_else(|| self.previous.get(pod).copied().filter(usable))
        {
            Some(ip) => ip,
            None => (self.cidr.network + 2..self.cidr.broadcast())
                .map(Ipv4Addr::from)
                .find(|ip| !used.contains(ip))
                .with_context(|| {
                    format!(
                        "pod {}/{}: no free address left in the pod CIDR",
                        pod.0, pod.1
                    )
                })?,
        };
        if let Some(w) = wanted.filter(|w| *w != ip) {
            log(format!(
                "pod {}/{}: status.podIP {w} is taken or outside the pod CIDR; using {ip}",
                pod.0, pod.1
            ));
        }
        self.by_pod.insert(pod.clone(), ip);
        Ok(ip)
    }

    pub fn release(&mut self, pod: &PodKey) {
        if let Some(ip) = self.by_pod.remove(pod) {
            self.previous.insert(pod.clone(), ip);
        }
    }
}

/// The ports a pod's server listens on, from its containers' `ports`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Ports {
    tcp: Vec<u16>,
    udp: Vec<u16>,
}

impl Ports {
    fn of(pod: &Pod) -> Ports {
        let mut tcp = BTreeSet::new();
        let mut udp = BTreeSet::new();
        let containers = pod.spec.iter().flat_map(|s| s.containers.iter());
        for port in containers.flat_map(|c| c.ports.iter().flatten()) {
            let Ok(number) = u16::try_from(port.container_port) else {
                continue;
            };
            match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => tcp.insert(number),
                "UDP" => udp.insert(number),
                _ => false, // SCTP: the lab's server does not speak it
            };
        }
        Ports {
            tcp: tcp.into_iter().collect(),
            udp: udp.into_iter().collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.udp.is_empty()
    }
}

fn join_ports(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

struct LabPod {
    node: u32,
    netns: String,
    veth: String,
    ip: Ipv4Addr,
    ports: Ports,
    server: Option<Child>,
}

/// The agent process; a thread reaps it so its exit is logged when it happens.
struct Agent {
    pid: u32,
    exited: Arc<(Mutex<bool>, Condvar)>,
}

impl Agent {
    fn has_exited(&self) -> bool {
        *self.exited.0.lock().unwrap()
    }

    /// Waits up to `timeout` for the agent to exit; true if it did.
    fn wait_exit(&self, timeout: Duration) -> bool {
        let (lock, cvar) = &*self.exited;
        let guard = lock.lock().unwrap();
        let (guard, _) = cvar
            .wait_timeout_while(guard, timeout, |exited| !*exited)
            .unwrap();
        *guard
    }
}

/// One lab node: its namespace, pod CIDR and addresses, and its agent.
struct LabNode {
    net: NodeNet,
    cidr: PodCidr,
    pool: IpPool,
    agent: Option<Agent>,
    /// The `nat` table last loaded (the lab's kube-proxy).
    nat: String,
}

struct Lab {
    name: String,
    paths: Paths,
    manifests: PathBuf,
    netpol_bin: PathBuf,
    /// Extra flags for the agent (`lab up --agent-arg`).
    agent_args: Vec<String>,
    /// node0's CIDR (the `--pod-cidr`); node n has the nth one after it.
    cidr: PodCidr,
    nodes: Vec<LabNode>,
    dns: bool,
    enforcer: Enforcer,
    pods: BTreeMap<PodKey, LabPod>,
    cluster_ips: ClusterIps,
    services: Vec<ServiceStatus>,
    last_errors: Vec<String>,
}

/// The node a pod runs on: its `spec.nodeName` when that names a lab node, else one
/// picked by a hash of its name (stable whatever other pods come and go).
fn placement(pod: &Pod, key: &PodKey, nodes: u32) -> u32 {
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

/// The cluster DNS the lab adds with `--dns`, unless the manifests have their own.
const DNS_OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  containers:
  - name: coredns
    ports:
    - {name: dns, containerPort: 53, protocol: UDP}
    - {name: dns-tcp, containerPort: 53, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: 10.96.0.10
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
"#;

fn object_id(o: &Object) -> (&'static str, String, String) {
    let (kind, meta) = match o {
        Object::Namespace(x) => ("Namespace", &x.metadata),
        Object::Pod(x) => ("Pod", &x.metadata),
        Object::NetworkPolicy(x) => ("NetworkPolicy", &x.metadata),
        Object::Service(x) => ("Service", &x.metadata),
        Object::Node(x) => ("Node", &x.metadata),
        Object::ClusterPolicy(x) => (
            netpol_engine::objects::cluster_policy::KINDS
                .iter()
                .find(|k| **k == x.kind)
                .copied()
                .unwrap_or("ClusterPolicy"),
            &x.metadata,
        ),
    };
    (
        kind,
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// A pod the lab's DNS server runs in.
fn is_dns_pod(pod: &Pod) -> bool {
    pod.metadata.namespace.as_deref() == Some("kube-system")
        && pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("k8s-app"))
            .map(String::as_str)
            == Some("kube-dns")
}

/// Pods the lab gives a namespace to: running-ish pods on the pod network, except
/// virtual ones (pods of a node the lab only pretends to have).
fn wants_netns(pod: &Pod) -> bool {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !host_network && !matches!(phase, Some("Succeeded") | Some("Failed")) && !is_virtual(pod)
}

fn is_virtual(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(super::VIRTUAL_ANNOTATION))
        .is_some_and(|v| v == "true")
}

fn pod_key(pod: &Pod) -> Option<PodKey> {
    let name = pod.metadata.name.clone()?;
    Some((
        pod.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name,
    ))
}

impl Lab {
    fn new(opts: &UpOptions) -> anyhow::Result<Lab> {
        let cidr = PodCidr::parse(&opts.pod_cidr)?;
        let mut nodes = Vec::new();
        for index in 0..opts.nodes.max(1) {
            let node_cidr = cidr.nth(index)?;
            nodes.push(LabNode {
                net: NodeNet {
                    index,
                    netns: super::node_netns_of(&opts.name, index),
                    network: node_cidr.network(),
                    prefix: node_cidr.prefix(),
                    underlay_ip: Ipv4Addr::new(172, 30, 0, 2 + index as u8),
                },
                cidr: node_cidr,
                pool: IpPool::new(node_cidr),
                agent: None,
                nat: String::new(),
            });
        }
        Ok(Lab {
            name: opts.name.clone(),
            paths: Paths::new(&opts.name),
            manifests: opts.manifests.clone(),
            netpol_bin: opts.netpol_bin.clone(),
            agent_args: opts.agent_args.clone(),
            cidr,
            nodes,
            dns: opts.dns,
            enforcer: opts.enforcer,
            pods: BTreeMap::new(),
            cluster_ips: ClusterIps::default(),
            services: Vec::new(),
            last_errors: Vec::new(),
        })
    }

    fn multi_node(&self) -> bool {
        self.nodes.len() > 1
    }

    fn status(&self) -> LabStatus {
        LabStatus {
            name: self.name.clone(),
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeStatus {
                    name: super::node_name(n.net.index),
                    netns: n.net.netns.clone(),
                    agent_pid: n.agent.as_ref().map(|a| a.pid),
                    pod_cidr: format!("{}/{}", n.cidr.network(), n.cidr.prefix()),
                    underlay_ip: self.multi_node().then(|| n.net.underlay_ip.to_string()),
                })
                .collect(),
            services: self.services.clone(),
            pods: self
                .pods
                .iter()
                .map(|((ns, name), p)| PodStatus {
                    namespace: ns.clone(),
                    name: name.clone(),
                    node: super::node_name(p.node),
                    ips: vec![p.ip.to_string(), netns::ipv6_of(p.ip).to_string()],
                    netns: p.netns.clone(),
                    veth: p.veth.clone(),
                })
                .collect(),
        }
    }

    fn write_state(&self) -> anyhow::Result<()> {
        let state = LabState {
            status: self.status(),
            supervisor_pid: std::process::id(),
            pod_cidr: format!("{}/{}", Ipv4Addr::from(self.cidr.network), self.cidr.prefix),
            manifests: self.manifests.clone(),
        };
        super::write_atomic(&self.paths.state, &serde_json::to_vec_pretty(&state)?)
    }

    /// The nodes, and for several of them the underlay and the Flannel-style overlay.
    fn setup_nodes(&self) -> anyhow::Result<()> {
        // One bpffs for the lab (`ip netns exec` hides /sys/fs/bpf behind a fresh
        // sysfs); each node's agent pins under its own directory in it.
        let pins = super::pin_root(&self.name);
        std::fs::create_dir_all(&pins)?;
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&pins)
            .status()
            .context("running mount")?;
        if !status.success() {
            bail!("mounting a bpffs at {} failed", pins.display());
        }
        netns::raise_neighbour_limits()?;
        for n in &self.nodes {
            netns::setup_node(&n.net.netns, BRIDGE, n.cidr.gateway(), n.cidr.prefix())
                .with_context(|| format!("setting up node{} ({})", n.net.index, n.net.netns))?;
        }
        if self.multi_node() {
            let underlay = super::underlay_netns(&self.name);
            netns::setup_underlay(&underlay).context("setting up the lab underlay")?;
            let all: Vec<NodeNet> = self.nodes.iter().map(|n| n.net.clone()).collect();
            for n in &all {
                netns::setup_overlay(n, &all, &underlay)
                    .with_context(|| format!("joining node{} to the overlay", n.index))?;
            }
        }
        Ok(())
    }

    /// Brings pods, the rendered cluster view and the agent in line with the manifest
    /// directory. Returns the digest of the rendered view (what the agent must reach).
    /// Pods that fail are reported in the error, after everything else was done.
    fn reconcile(&mut self) -> anyhow::Result<String> {
        let mut state =
            netpol_agent::source::dir::read_state(std::slice::from_ref(&self.manifests));
        if state.errors != self.last_errors {
            for e in &state.errors {
                log(format!("manifest skipped: {e}"));
            }
            self.last_errors = state.errors.clone();
        }
        if self.dns {
            let (builtins, _) =
                netpol_engine::objects::parse_manifests(Path::new("lab-dns.yaml"), DNS_OBJECTS);
            let have: BTreeSet<_> = state.objects.iter().map(object_id).collect();
            let own_dns_pod = state
                .objects
                .iter()
                .any(|o| matches!(o, Object::Pod(p) if is_dns_pod(p)));
            for o in builtins {
                let skip =
                    have.contains(&object_id(&o)) || (own_dns_pod && matches!(o, Object::Pod(_)));
                if !skip {
                    state.objects.push(o);
                }
            }
        }
        let mut desired: BTreeMap<PodKey, &Pod> = BTreeMap::new();
        for object in &state.objects {
            if let Object::Pod(pod) = object {
                if let Some(key) = pod_key(pod).filter(|_| wants_netns(pod)) {
                    desired.insert(key, pod);
                }
            }
        }

        let mut errors = Vec::new();
        let gone: Vec<PodKey> = self
            .pods
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Err(e) = self.remove_pod(&key) {
                errors.push(format!("{e:#}"));
            }
        }
        // Pods asking for a given address first, so a pod without one cannot take it.
        let mut order: Vec<(&PodKey, &&Pod)> = desired.iter().collect();
        order.sort_by_key(|(_, pod)| {
            pod.status
                .as_ref()
                .and_then(|s| s.pod_ip.as_ref())
                .is_none()
        });
        for (key, pod) in order {
            if let Err(e) = self.ensure_pod(key, pod) {
                errors.push(format!("{e:#}"));
            }
        }

        if let Err(e) = self.program_services(&state.objects) {
            errors.push(format!("{e:#}"));
        }
        self.render(&state.objects)?;
        for n in 0..self.nodes.len() {
            if self.nodes[n].agent.is_none() && self.enforcer != Enforcer::None {
                let agent = self.start_agent(n as u32)?;
                self.nodes[n].agent = Some(agent);
            }
        }
        self.write_state()?;
        if !errors.is_empty() {
            bail!("{}", errors.join("; "));
        }
        Ok(netpol_agent::source::dir::current_digest(
            std::slice::from_ref(&self.paths.cluster),
        ))
    }

    /// ClusterIPs, endpoints, the `nat` table of every node and the DNS records.
    fn program_services(&mut self, objects: &[Object]) -> anyhow::Result<()> {
        let pods: BTreeMap<PodKey, &Pod> = objects
            .iter()
            .filter_map(|o| match o {
                Object::Pod(p) => Some((pod_key(p)?, p)),
                _ => None,
            })
            .collect();
        let candidates: Vec<Candidate> = self
            .pods
            .iter()
            .filter_map(|(k, lp)| {
                Some(Candidate {
                    pod: pods.get(k)?,
                    key: format!("{}/{}", k.0, k.1),
                    ip: lp.ip,
                })
            })
            .collect();
        let fixed: Vec<Ipv4Addr> = objects
            .iter()
            .filter_map(|o| match o {
                Object::Service(s) => s.spec.as_ref()?.cluster_ip.as_deref()?.parse().ok(),
                _ => None,
            })
            .collect();
        let mut services = Vec::new();
        for o in objects {
            if let Object::Service(svc) = o {
                if let Some(ip) = self.cluster_ips.assign(svc, &fixed) {
                    services.push(kubeproxy::endpoints(svc, ip, &candidates));
                }
            }
        }
        services.sort_by_key(ServiceStatus::key);
        let table = kubeproxy::rules(&services, &self.cidr.cluster());
        for n in &mut self.nodes {
            if n.nat != table {
                kubeproxy::apply(&n.net.netns, &table)?;
                n.nat = table.clone();
            }
        }
        self.services = services;
        if self.dns {
            let mut records = dns::Records::default();
            for s in &self.services {
                if let Ok(ip) = s.cluster_ip.parse() {
                    records.names.insert(
                        format!("{}.{}.svc.{}", s.name, s.namespace, dns::DOMAIN),
                        vec![ip],
                    );
                }
            }
            for ((ns, name), p) in &self.pods {
                records.names.insert(
                    format!("{name}.{ns}.pod.{}", dns::DOMAIN),
                    vec![p.ip.into(), netns::ipv6_of(p.ip).into()],
                );
            }
            let text = serde_json::to_vec_pretty(&records)?;
            if std::fs::read(&self.paths.dns_records).ok() != Some(text.clone()) {
                super::write_atomic(&self.paths.dns_records, &text)?;
            }
        }
        Ok(())
    }

    fn ensure_pod(&mut self, key: &PodKey, pod: &Pod) -> anyhow::Result<()> {
        let who = format!("pod {}/{}", key.0, key.1);
        let node = placement(pod, key, self.nodes.len() as u32);
        if self.pods.get(key).is_some_and(|p| p.node != node) {
            log(format!("{who}: moves to node{node}"));
            self.remove_pod(key)?;
        }
        if !self.pods.contains_key(key) {
            let wanted = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok());
            let lab_node = &mut self.nodes[node as usize];
            let ip = lab_node.pool.assign(key, wanted)?;
            let netns = super::pod_netns(&self.name, &key.0, &key.1);
            let veth = super::veth_name(&self.name, &key.0, &key.1);
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
            log(format!(
                "{who}: {ip} on node{node} in {netns} (veth {veth})"
            ));
            self.pods.insert(
                key.clone(),
                LabPod {
                    node,
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
                log(format!("{who}: server exited ({status}); restarting it"));
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

    fn remove_pod(&mut self, key: &PodKey) -> anyhow::Result<()> {
        let Some(mut pod) = self.pods.remove(key) else {
            return Ok(());
        };
        stop_child(&mut pod.server);
        let node = &mut self.nodes[pod.node as usize];
        node.pool.release(key);
        dns::remove_resolv_conf(&pod.netns);
        log(format!("pod {}/{}: removed", key.0, key.1));
        let who = format!("pod {}/{}", key.0, key.1);
        // Deleting the namespace would delete the veth pair too, but only once the kernel
        // has destroyed it (asynchronously): a pod coming straight back would find its
        // veth name still taken. So the veth goes first, synchronously.
        netns::delete_link(&node.net.netns, &pod.veth)
            .with_context(|| format!("{who}: deleting its veth"))?;
        netns::delete(&pod.netns).with_context(|| format!("{who}: deleting {}", pod.netns))
    }

    /// Writes `cluster/objects.yaml`: every object of the directory, with the pods the lab
    /// runs placed on their node and given their addresses, as a kubelet would report
    /// them, and Services with their ClusterIP, as the API server would assign it.
    fn render(&self, objects: &[Object]) -> anyhow::Result<()> {
        let mut docs = Vec::new();
        for object in objects {
            let doc = match object {
                Object::Namespace(o) => serde_yaml::to_string(o),
                Object::NetworkPolicy(o) => serde_yaml::to_string(o),
                Object::Node(o) => serde_yaml::to_string(o),
                Object::ClusterPolicy(o) => serde_yaml::to_string(o),
                Object::Service(o) => {
                    let mut svc = o.clone();
                    let key = object_id(object);
                    let ip = self
                        .services
                        .iter()
                        .find(|s| {
                            (s.namespace.as_str(), s.name.as_str())
                                == (ns_or_default(&key.1), key.2.as_str())
                        })
                        .map(|s| s.cluster_ip.clone());
                    if let Some(ip) = ip {
                        let spec = svc.spec.get_or_insert_with(Default::default);
                        spec.cluster_ip = Some(ip.clone());
                        spec.cluster_ips = Some(vec![ip]);
                    }
                    serde_yaml::to_string(&svc)
                }
                Object::Pod(pod) => {
                    let placed = pod_key(pod)
                        .and_then(|k| self.pods.get(&k))
                        .map(|lab_pod| place(pod, lab_pod.ip, lab_pod.node));
                    serde_yaml::to_string(placed.as_ref().unwrap_or(pod))
                }
            };
            docs.push(doc.context("rendering the cluster view")?);
        }
        let text = docs.join("---\n");
        let path = self.paths.cluster.join("objects.yaml");
        // Only on change: every write is a new input for the agent.
        if std::fs::read(&path).ok().as_deref() != Some(text.as_bytes()) {
            super::write_atomic(&path, text.as_bytes())?;
        }
        Ok(())
    }

    fn start_agent(&self, index: u32) -> anyhow::Result<Agent> {
        let sock = self.paths.agent_sock_of(index);
        let log_path = self.paths.agent_log_of(index);
        let _ = std::fs::remove_file(&sock);
        let log_file = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let hooks: Vec<&str> = if self.multi_node() {
            vec![
                "--service-hook",
                netns::OVERLAY,
                "--service-hook",
                netns::UPLINK,
            ]
        } else {
            vec![]
        };
        if self.enforcer == Enforcer::Iptables {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &self.nodes[index as usize].net.netns])
                .arg(&self.netpol_bin)
                .args(["lab", "iptables-agent", "--source"])
                .arg(format!("dir:{}", self.paths.cluster.display()))
                .args(["--node", &super::node_name(index), "--api-socket"])
                .arg(&sock)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file);
            return spawn_agent(cmd, index, &log_path);
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.nodes[index as usize].net.netns])
            .arg(&self.netpol_bin)
            .arg("agent")
            .arg("--source")
            .arg(format!("dir:{}", self.paths.cluster.display()))
            .args([
                "--node",
                &super::node_name(index),
                "--bridge",
                BRIDGE,
                "--api-socket",
            ])
            .arg(&sock)
            .arg("--pin-root")
            .arg(super::pin_root_of(&self.name, index))
            .args(hooks)
            .args(&self.agent_args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        spawn_agent(cmd, index, &log_path)
    }

    /// Stops everything the lab started and deletes its namespaces.
    fn teardown(&mut self) {
        for agent in self.nodes.iter_mut().filter_map(|n| n.agent.take()) {
            // SAFETY: plain syscalls on the agent's pid, which its reaper thread has not
            // reaped yet unless `exited` is set.
            if !agent.has_exited() {
                unsafe { libc::kill(agent.pid as i32, libc::SIGTERM) };
                if !agent.wait_exit(Duration::from_secs(5)) {
                    log("agent did not stop within 5s; killing it");
                    unsafe { libc::kill(agent.pid as i32, libc::SIGKILL) };
                    agent.wait_exit(Duration::from_secs(5));
                }
            }
        }
        let keys: Vec<PodKey> = self.pods.keys().cloned().collect();
        for key in keys {
            if let Err(e) = self.remove_pod(&key) {
                log(format!("{e:#}"));
            }
        }
        for n in &self.nodes {
            if let Err(e) = netns::delete(&n.net.netns) {
                log(format!("deleting node{}: {e:#}", n.net.index));
            }
        }
        if let Err(e) = netns::delete(&super::underlay_netns(&self.name)) {
            log(format!("deleting the underlay: {e:#}"));
        }
        // The agent leaves its pins for the next one; the lab is gone, so are they.
        super::unmount(&super::pin_root(&self.name));
    }
}

/// Starts a node's enforcer (netpol's agent or the iptables one) with a thread that
/// reaps it, so its exit is logged when it happens.
fn spawn_agent(mut cmd: Command, index: u32, log_path: &Path) -> anyhow::Result<Agent> {
    let mut child = cmd.spawn().context("starting the agent")?;
    // `ip netns exec` execs the command, so this pid is the agent's.
    let pid = child.id();
    log(format!(
        "agent of node{index} started (pid {pid}), log in {}",
        log_path.display()
    ));
    let exited = Arc::new((Mutex::new(false), Condvar::new()));
    let flag = exited.clone();
    std::thread::spawn(move || {
        match child.wait() {
            Ok(status) => log(format!("agent (pid {pid}) exited: {status}")),
            Err(e) => log(format!("agent (pid {pid}): wait failed: {e}")),
        }
        *flag.0.lock().unwrap() = true;
        flag.1.notify_all();
    });
    Ok(Agent { pid, exited })
}

fn ns_or_default(ns: &str) -> &str {
    if ns.is_empty() {
        "default"
    } else {
        ns
    }
}

/// The pod as the agent should see it: on its node, running, with the lab's address.
fn place(pod: &Pod, ip: Ipv4Addr, node: u32) -> Pod {
    let mut pod = pod.clone();
    pod.spec.get_or_insert_with(Default::default).node_name = Some(super::node_name(node));
    let status = pod.status.get_or_insert_with(K8sPodStatus::default);
    status.phase = Some("Running".into());
    status.pod_ip = Some(ip.to_string());
    status.pod_ips = Some(vec![
        PodIP { ip: ip.to_string() },
        PodIP {
            ip: netns::ipv6_of(ip).to_string(),
        },
    ]);
    pod
}

/// Starts `netpol lab serve` in a pod and waits until it has bound its ports (it says
/// "ready" on stdout), so that a `wait` that returns means the ports answer.
fn start_server(
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

fn stop_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum LabRequest {
    Wait,
    Status,
}

type Shared = Arc<Mutex<Lab>>;

async fn reconcile_now(lab: &Shared) -> anyhow::Result<String> {
    let lab = lab.clone();
    tokio::task::spawn_blocking(move || lab.lock().unwrap().reconcile()).await?
}

/// Waits for every node's agent to converge to `digest` (one after the other: they
/// converge independently, so this costs the slowest of them).
async fn agents_wait(lab: &Shared, paths: &Paths, digest: &str) -> anyhow::Result<()> {
    let (nodes, enforcer) = {
        let lab = lab.lock().unwrap();
        (lab.nodes.len() as u32, lab.enforcer)
    };
    if enforcer == Enforcer::None {
        // Nothing enforces: the lab is what the manifests say once reconciled.
        return Ok(());
    }
    for n in 0..nodes {
        agent_wait(lab, paths, digest, n).await?;
    }
    Ok(())
}

/// Waits for node `index`'s agent to converge to `digest`, giving it time to open its
/// socket.
async fn agent_wait(lab: &Shared, paths: &Paths, digest: &str, index: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + AGENT_START;
    let sock = paths.agent_sock_of(index);
    let log_path = paths.agent_log_of(index);
    let status = loop {
        match netpol_agent::api::client::wait(&sock, digest).await {
            Ok(status) => break status,
            Err(e) => {
                let agent_gone = lab.lock().unwrap().nodes[index as usize]
                    .agent
                    .as_ref()
                    .is_none_or(Agent::has_exited);
                if agent_gone {
                    bail!(
                        "the agent of node{index} is not running; {}:\n{}",
                        log_path.display(),
                        super::tail(&log_path, 20)
                    );
                }
                // Only "not listening yet" is worth waiting for.
                let not_yet = e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>().is_some_and(|io| {
                        matches!(
                            io.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        )
                    })
                });
                if !not_yet || Instant::now() > deadline {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    if !status.converged {
        bail!(
            "the agent of node{index} has not converged (pods without a veth: {:?}); see {}",
            status.pending,
            log_path.display()
        );
    }
    Ok(())
}

async fn handle(stream: UnixStream, lab: Shared) -> anyhow::Result<()> {
    let paths = Paths::new(&lab.lock().unwrap().name);
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = match serde_json::from_str::<LabRequest>(&line) {
            Ok(LabRequest::Status) => {
                // The lock may be held by a reconcile starting servers: wait off the runtime.
                let lab = lab.clone();
                serde_json::to_value(
                    tokio::task::spawn_blocking(move || lab.lock().unwrap().status()).await?,
                )?
            }
            Ok(LabRequest::Wait) => {
                let result = async {
                    let digest = reconcile_now(&lab).await?;
                    agents_wait(&lab, &paths, &digest).await
                }
                .await;
                match result {
                    Ok(()) => serde_json::json!({ "ok": true }),
                    Err(e) => serde_json::json!({ "ok": false, "error": format!("{e:#}") }),
                }
            }
            Err(e) => serde_json::json!({ "ok": false, "error": format!("bad request: {e}") }),
        };
        let mut out = serde_json::to_vec(&reply)?;
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}

async fn serve_socket(listener: UnixListener, lab: Shared) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let lab = lab.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, lab).await {
                        log(format!("lab.sock client: {e:#}"));
                    }
                });
            }
            Err(e) => log(format!("lab.sock accept: {e}")),
        }
    }
}

/// Re-reads the directory on every change, after a burst of writes settled (50 ms).
async fn watch_manifests(lab: Shared, manifests: PathBuf) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads (ours included: every reconcile opens the files) are not changes; waking
        // up on them would re-read the directory forever.
        if !matches!(
            event,
            Ok(notify::Event {
                kind: notify::EventKind::Access(_),
                ..
            })
        ) {
            let _ = tx.send(());
        }
    })?;
    let mode = if manifests.is_dir() {
        RecursiveMode::Recursive
    } else {
        RecursiveMode::NonRecursive
    };
    watcher
        .watch(&manifests, mode)
        .with_context(|| format!("watching {}", manifests.display()))?;
    while rx.recv().await.is_some() {
        let settle = tokio::time::sleep(Duration::from_millis(50));
        tokio::pin!(settle);
        loop {
            tokio::select! {
                _ = &mut settle => break,
                more = rx.recv() => if more.is_none() { return Ok(()) },
            }
        }
        if let Err(e) = reconcile_now(&lab).await {
            log(format!("reconcile: {e:#}"));
        }
    }
    Ok(())
}

pub fn run_supervisor(opts: &UpOptions) -> anyhow::Result<()> {
    super::validate_name(&opts.name)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(supervise(opts))
}

async fn supervise(opts: &UpOptions) -> anyhow::Result<()> {
    let paths = Paths::new(&opts.name);
    std::fs::create_dir_all(&paths.cluster)
        .with_context(|| format!("creating {}", paths.cluster.display()))?;
    let lab: Shared = Arc::new(Mutex::new(Lab::new(opts)?));
    // Written first, so that `down` finds this process even if setup hangs.
    lab.lock().unwrap().write_state()?;
    log(format!(
        "lab {} starting (pid {})",
        opts.name,
        std::process::id()
    ));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;

    let setup = {
        let lab = lab.clone();
        tokio::task::spawn_blocking(move || {
            let mut lab = lab.lock().unwrap();
            lab.setup_nodes()?;
            // Pod errors are not fatal: they are reported to every `wait`.
            if let Err(e) = lab.reconcile() {
                if lab.nodes.iter().any(|n| n.agent.is_none()) {
                    return Err(e);
                }
                log(format!("reconcile: {e:#}"));
            }
            anyhow::Ok(())
        })
    };
    let started = async {
        setup.await??;
        let _ = std::fs::remove_file(&paths.lab_sock);
        let listener = UnixListener::bind(&paths.lab_sock)
            .with_context(|| format!("listening on {}", paths.lab_sock.display()))?;
        anyhow::Ok(listener)
    }
    .await;
    let listener = match started {
        Ok(l) => l,
        Err(e) => {
            log(format!("setup failed: {e:#}"));
            shut_down(lab, &paths, false).await;
            return Err(e);
        }
    };
    let server = tokio::spawn(serve_socket(listener, lab.clone()));
    let watcher = tokio::spawn(watch_manifests(lab.clone(), opts.manifests.clone()));
    log("lab is up");

    tokio::select! {
        _ = sigterm.recv() => log("SIGTERM: shutting down"),
        _ = sigint.recv() => log("SIGINT: shutting down"),
    }
    server.abort();
    watcher.abort();
    shut_down(lab, &paths, true).await;
    Ok(())
}

/// Tears the lab down. After a failed setup the logs stay (for `up` to show and the user
/// to read); `down` removes them.
async fn shut_down(lab: Shared, paths: &Paths, remove_dir: bool) {
    let torn = tokio::task::spawn_blocking(move || {
        lab.lock().unwrap_or_else(|p| p.into_inner()).teardown()
    })
    .await;
    if let Err(e) = torn {
        log(format!("teardown: {e}"));
    }
    if remove_dir {
        let _ = std::fs::remove_dir_all(&paths.dir);
    } else {
        for f in [&paths.state, &paths.lab_sock, &paths.agent_sock] {
            let _ = std::fs::remove_file(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, pod: &str) -> PodKey {
        (ns.into(), pod.into())
    }

    #[test]
    fn cidr_parsing_normalises_and_rejects_nonsense() {
        let c = PodCidr::parse("10.244.0.7/24").unwrap();
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 244, 0, 1));
        assert_eq!(c.prefix(), 24);
        for bad in [
            "10.244.0.0",
            "10.244.0.0/31",
            "x/24",
            "10.244.0.0/abc",
            "::1/64",
        ] {
            assert!(PodCidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses_start_at_two_and_stay_with_their_pod() {
        let mut pool = IpPool::new(PodCidr::parse("10.244.0.0/24").unwrap());
        let a = pool.assign(&key("x", "a"), None).unwrap();
        let b = pool.assign(&key("x", "b"), None).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 244, 0, 2));
        assert_eq!(b, Ipv4Addr::new(10, 244, 0, 3));
        // Stable: asking again (even with another wish) gives the same address.
        assert_eq!(
            pool.assign(&key("x", "a"), Some(Ipv4Addr::new(10, 244, 0, 9)))
                .unwrap(),
            a
        );
        // A freed address is reused by the next new pod; the others do not move.
        pool.release(&key("x", "a"));
        assert_eq!(pool.assign(&key("x", "c"), None).unwrap(), a);
        assert_eq!(pool.assign(&key("x", "b"), None).unwrap(), b);
    }

    #[test]
    fn a_pod_that_comes_back_gets_its_address_back_when_free() {
        let mut pool = IpPool::new(PodCidr::parse("10.244.0.0/24").unwrap());
        let a = pool.assign(&key("x", "a"), None).unwrap();
        let b = pool.assign(&key("x", "b"), None).unwrap();
        pool.release(&key("x", "a"));
        pool.release(&key("x", "b"));
        assert_eq!(pool.assign(&key("x", "b"), None).unwrap(), b);
        assert_eq!(pool.assign(&key("x", "a"), None).unwrap(), a);
        // Taken meanwhile: a fresh one.
        pool.release(&key("x", "a"));
        assert_eq!(pool.assign(&key("x", "c"), None).unwrap(), a);
        assert_ne!(pool.assign(&key("x", "a"), None).unwrap(), a);
    }

    #[test]
    fn status_pod_ip_is_honoured_when_usable() {
        let mut pool = IpPool::new(PodCidr::parse("10.244.0.0/24").unwrap());
        let want = Ipv4Addr::new(10, 244, 0, 50);
        assert_eq!(pool.assign(&key("x", "a"), Some(want)).unwrap(), want);
        // Taken, the gateway, or outside the CIDR: the lowest free address instead.
        for wish in [
            want,
            Ipv4Addr::new(10, 244, 0, 1),
            Ipv4Addr::new(10, 0, 0, 5),
            Ipv4Addr::new(10, 244, 0, 255),
        ] {
            let ip = pool
                .assign(&key("y", &wish.to_string()), Some(wish))
                .unwrap();
            assert_ne!(ip, wish);
        }
    }

    #[test]
    fn the_pool_runs_out() {
        let mut pool = IpPool::new(PodCidr::parse("10.0.0.0/30").unwrap());
        assert_eq!(
            pool.assign(&key("x", "a"), None).unwrap(),
            Ipv4Addr::new(10, 0, 0, 2)
        );
        let err = pool.assign(&key("x", "b"), None).unwrap_err().to_string();
        assert!(err.contains("x/b"), "{err}");
    }

    #[test]
    fn ports_come_from_containers_with_tcp_as_default() {
        let pod: Pod = serde_yaml::from_str(
            r#"
metadata: {name: a, namespace: x}
spec:
  containers:
  - name: c1
    ports: [{containerPort: 81}, {containerPort: 80, protocol: TCP}, {containerPort: 53, protocol: UDP}]
  - name: c2
    ports: [{containerPort: 80}, {containerPort: 9, protocol: SCTP}]
"#,
        )
        .unwrap();
        assert_eq!(
            Ports::of(&pod),
            Ports {
                tcp: vec![80, 81],
                udp: vec![53]
            }
        );
    }

    #[test]
    fn placed_pods_are_running_on_node0_with_the_lab_address() {
        let pod: Pod =
            serde_yaml::from_str("metadata: {name: a}\nstatus: {phase: Pending}").unwrap();
        let placed = place(&pod, Ipv4Addr::new(10, 244, 0, 4), 0);
        assert_eq!(placed.spec.unwrap().node_name.as_deref(), Some("node0"));
        let status = placed.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.244.0.4"));
        assert_eq!(status.pod_ips.unwrap()[0].ip, "10.244.0.4");
        assert_eq!(pod_key(&pod), Some(key("default", "a")));
    }

    #[test]
    fn finished_and_host_network_pods_get_no_netns() {
        let parse = |y: &str| serde_yaml::from_str::<Pod>(y).unwrap();
        assert!(wants_netns(&parse("metadata: {name: a}")));
        assert!(!wants_netns(&parse(
            "metadata: {name: a}\nstatus: {phase: Succeeded}"
        )));
        assert!(!wants_netns(&parse(
            "metadata: {name: a}\nstatus: {phase: Failed}"
        )));
        assert!(!wants_netns(&parse(
            "metadata: {name: a}\nspec: {hostNetwork: true, containers: []}"
        )));
    }
}

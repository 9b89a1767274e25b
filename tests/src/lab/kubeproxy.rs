//! The lab's kube-proxy: Services and their endpoints as iptables `nat` rules, the way
//! kube-proxy's iptables mode writes them, loaded into every node with
//! `iptables-restore` (the lab owns the node namespaces' `nat` tables whole).
//!
//! Service objects + lab pods ──► [`endpoints`] (selector, targetPort by number or
//! name) ──► [`ServiceStatus`] (state.json, probes) ──► [`rules`] ──► iptables-restore
//!
//! Chains: PREROUTING/OUTPUT → KUBE-SERVICES → KUBE-SVC-<hash> (one per service port:
//! traffic from outside the cluster CIDR is marked for masquerade, then a backend at
//! random with `statistic` probabilities 1/n, 1/(n-1), ...) → KUBE-SEP-<hash> (hairpin
//! marked for masquerade, DNAT). A `nodePort`: KUBE-SERVICES, last, sends packets to
//! any local address to KUBE-NODEPORTS → KUBE-EXT-<hash> (marked for masquerade, then
//! the Service's chain). POSTROUTING → KUBE-POSTROUTING masquerades marked packets
//! (mark 0x4000).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};

use super::{EndpointStatus, Protocol, ServicePortStatus, ServiceStatus};

/// A pod the lab runs, as a backend candidate.
pub struct Candidate<'a> {
    pub pod: &'a Pod,
    pub key: String,
    pub ip: Ipv4Addr,
}

fn protocol_of(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None, // SCTP: this kernel has none
    }
}

/// The container port a `targetPort` names on `pod` (a number is itself).
fn target_port(pod: &Pod, target: &IntOrString, protocol: Protocol) -> Option<u16> {
    match target {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => {
            let containers = pod.spec.iter().flat_map(|s| s.containers.iter());
            containers
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str())
                        && protocol_of(p.protocol.as_deref()) == Some(protocol)
                })
                .and_then(|p| u16::try_from(p.container_port).ok())
        }
    }
}

/// Endpoints of `svc` among `pods`: pods of its namespace whose labels its selector
/// matches. A Service without a selector (or without a ClusterIP) has none here.
pub fn endpoints(svc: &Service, cluster_ip: Ipv4Addr, pods: &[Candidate]) -> ServiceStatus {
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = svc.spec.clone().unwrap_or_default();
    let selector = spec.selector.clone().unwrap_or_default();
    let selected: Vec<&Candidate> = if selector.is_empty() {
        vec![]
    } else {
        pods.iter()
            .filter(|c| c.pod.metadata.namespace.as_deref().unwrap_or("default") == namespace)
            .filter(|c| {
                let labels = c.pod.metadata.labels.clone().unwrap_or_default();
                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .collect()
    };
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let Some(protocol) = protocol_of(p.protocol.as_deref()) else {
            continue;
        };
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        let target = p.target_port.clone().unwrap_or(IntOrString::Int(p.port));
        let endpoints = selected
            .iter()
            .filter_map(|c| {
                Some(EndpointStatus {
                    pod: c.key.clone(),
                    ip: c.ip.to_string(),
                    port: target_port(c.pod, &target, protocol)?,
                })
            })
            .collect();
        ports.push(ServicePortStatus {
            name: p.name.clone(),
            port,
            protocol,
            node_port: p.node_port.and_then(|n| u16::try_from(n).ok()),
            endpoints,
        });
    }
    ServiceStatus {
        namespace,
        name: svc.metadata.name.clone().unwrap_or_default(),
        cluster_ip: cluster_ip.to_string(),
        ports,
    }
}

fn chain(kind: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let hex: String = h
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02X}"))
        .collect();
    format!("KUBE-{kind}-{hex}")
}

/// The `nat` table for these services (input of `iptables-restore`).
pub fn rules(services: &[ServiceStatus], cluster_cidr: &str) -> String {
    let mut chains = vec![
        "KUBE-SERVICES".to_string(),
        "KUBE-NODEPORTS".into(),
        "KUBE-POSTROUTING".into(),
        "KUBE-MARK-MASQ".into(),
    ];
    let mut nodeports = Vec::new();
    let mut body = String::new();
    let mut add = |line: String| {
        body.push_str(&line);
        body.push('\n');
    };
    add(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".into(),
    );
    add("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".into());
    add("-A POSTROUTING -j KUBE-POSTROUTING".into());
    add("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".into());
    add("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000".into());
    add("-A KUBE-POSTROUTING -j MASQUERADE --random-fully".into());
    add("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000".into());
    for svc in services {
        for p in &svc.ports {
            if p.endpoints.is_empty() {
                continue;
            }
            let proto = match p.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
                Protocol::Icmp => continue, // Service ports are TCP or UDP
            };
            let port_name = p.name.clone().unwrap_or_default();
            let svc_chain = chain("SVC", &[&svc.namespace, &svc.name, &port_name, proto]);
            chains.push(svc_chain.clone());
            let vip = format!(
                "{}/32 -p {proto} -m {proto} --dport {}",
                svc.cluster_ip, p.port
            );
            add(format!(
                "-A KUBE-SERVICES -d {vip} -m comment --comment \"{}/{}:{port_name}\" -j {svc_chain}",
                svc.namespace, svc.name
            ));
            add(format!(
                "-A {svc_chain} ! -s {cluster_cidr} -d {vip} -j KUBE-MARK-MASQ"
            ));
            if let Some(node_port) = p.node_port {
                // Traffic to a NodePort is masqueraded whoever sends it (the Service's
                // externalTrafficPolicy: Cluster), as kube-proxy does.
                let ext = chain("EXT", &[&svc.namespace, &svc.name, &port_name, proto]);
                chains.push(ext.clone());
                nodeports.push(format!(
                    "-A KUBE-NODEPORTS -p {proto} -m {proto} --dport {node_port} -j {ext}"
                ));
                nodeports.push(format!("-A {ext} -j KUBE-MARK-MASQ"));
                nodeports.push(format!("-A {ext} -j {svc_chain}"));
            }
            let n = p.endpoints.len();
            for (i, ep) in p.endpoints.iter().enumerate() {
                let sep = chain("SEP", &[&svc_chain, &ep.ip, &ep.port.to_string()]);
                chains.push(sep.clone());
                let mut line = format!("-A {svc_chain}");
                if i + 1 < n {
                    let _ = write!(
                        line,
                        " -m statistic --mode random --probability {:.11}",
                        1.0 / (n - i) as f64
                    );
                }
                let _ = write!(line, " -j {sep}");
                add(line);
                add(format!("-A {sep} -s {}/32 -j KUBE-MARK-MASQ", ep.ip));
                add(format!(
                    "-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {}:{}",
                    ep.ip, ep.port
                ));
            }
        }
    }
    add("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".into());
    for line in nodeports {
        add(line);
    }
    let mut out = String::from("*nat\n");
    for builtin in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        let _ = writeln!(out, ":{builtin} ACCEPT [0:0]");
    }
    for c in &chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str(&body);
    out.push_str("COMMIT\n");
    out
}

/// Replaces the `nat` table of `netns` with `table`.
pub fn apply(netns: &str, table: &str) -> anyhow::Result<()> {
    super::fullsync::restore("ip", &["netns", "exec", netns, "iptables-restore"], table)
        .with_context(|| format!("iptables-restore in {netns}; input was:\n{table}"))
}

/// ClusterIPs of Services that do not carry one: stable for as long as the lab runs,
/// from 10.96.1.0 up (10.96.0.0/24 is left to fixed addresses such as kube-dns's).
#[derive(Default)]
pub struct ClusterIps {
    by_service: BTreeMap<(String, String), Ipv4Addr>,
}

impl ClusterIps {
    pub fn assign(&mut self, svc: &Service, taken: &[Ipv4Addr]) -> Option<Ipv4Addr> {
        let key = (
            svc.metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            svc.metadata.name.clone()?,
        );
        let given = svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref());
        match given {
            Some("None") => return None,
            Some(ip) if !ip.is_empty() => return ip.parse().ok(),
            _ => {}
        }
        if let Some(ip) = self.by_service.get(&key) {
            return Some(*ip);
        }
        let used = |ip: &Ipv4Addr| taken.contains(ip) || self.by_service.values().any(|v| v == ip);
        let ip = (u32::from(Ipv4Addr::new(10, 96, 1, 0))
            ..u32::from(Ipv4Addr::new(10, 96, 255, 255)))
            .map(Ipv4Addr::from)
            .find(|ip| !used(ip))?;
        self.by_service.insert(key, ip);
        Some(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn endpoints_follow_the_selector_and_resolve_named_target_ports() {
        let svc: Service = serde_yaml::from_str(
            r#"
metadata: {name: web, namespace: x}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}, {name: alt, port: 81, targetPort: 9000, protocol: UDP}]
"#,
        )
        .unwrap();
        let a = pod("metadata: {name: a, namespace: x, labels: {app: web}}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}");
        let b = pod("metadata: {name: b, namespace: x, labels: {app: web}}\nspec: {containers: [{name: c}]}");
        let c = pod("metadata: {name: c, namespace: y, labels: {app: web}}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}");
        let pods = [
            Candidate {
                pod: &a,
                key: "x/a".into(),
                ip: Ipv4Addr::new(10, 244, 0, 2),
            },
            Candidate {
                pod: &b,
                key: "x/b".into(),
                ip: Ipv4Addr::new(10, 244, 1, 2),
            },
            Candidate {
                pod: &c,
                key: "y/c".into(),
                ip: Ipv4Addr::new(10, 244, 1, 3),
            },
        ];
        let st = endpoints(&svc, Ipv4Addr::new(10, 96, 1, 0), &pods);
        assert_eq!(st.ports.len(), 2);
        // Named port: only the pod that has it.
        let http: Vec<_> = st.ports[0]
            .endpoints
            .iter()
            .map(|e| (e.pod.as_str(), e.port))
            .collect();
        assert_eq!(http, vec![("x/a", 8080)]);
        let alt: Vec<_> = st.ports[1]
            .endpoints
            .iter()
            .map(|e| (e.pod.as_str(), e.port))
            .collect();
        assert_eq!(alt, vec![("x/a", 9000), ("x/b", 9000)]);

        let table = rules(&[st], "10.244.0.0/16");
        assert!(table.starts_with("*nat\n") && table.ends_with("COMMIT\n"));
        assert!(table.contains("--probability 0.50000000000"), "{table}");
        assert!(table.contains("DNAT --to-destination 10.244.0.2:8080"));
        assert!(table.contains("DNAT --to-destination 10.244.1.2:9000"));
        assert!(table.contains(
            "! -s 10.244.0.0/16 -d 10.96.1.0/32 -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ"
        ));
        // The NodePort: on any local address, masqueraded, into the Service's chain;
        // after every Service's own rules.
        let local = "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS";
        let at = table.find(local).expect("the NodePort jump");
        assert!(table.rfind("-A KUBE-SERVICES -d").unwrap() < at);
        let ext = table
            .lines()
            .find_map(|l| l.strip_prefix("-A KUBE-NODEPORTS -p tcp -m tcp --dport 30080 -j "))
            .expect("the NodePort rule");
        assert!(table.contains(&format!(
            "-A {ext} -j KUBE-MARK-MASQ\n-A {ext} -j KUBE-SVC-"
        )));
        assert_eq!(table.matches("KUBE-NODEPORTS -p").count(), 1, "{table}");
    }

    #[test]
    fn cluster_ips_are_kept_given_or_assigned_stably() {
        let mut ips = ClusterIps::default();
        let svc = |y: &str| serde_yaml::from_str::<Service>(y).unwrap();
        let fixed =
            svc("metadata: {name: dns, namespace: kube-system}\nspec: {clusterIP: 10.96.0.10}");
        assert_eq!(ips.assign(&fixed, &[]), Some(Ipv4Addr::new(10, 96, 0, 10)));
        let headless = svc("metadata: {name: h}\nspec: {clusterIP: None}");
        assert_eq!(ips.assign(&headless, &[]), None);
        let a = svc("metadata: {name: a}");
        let b = svc("metadata: {name: b}");
        let first = ips.assign(&a, &[Ipv4Addr::new(10, 96, 1, 0)]).unwrap();
        assert_eq!(first, Ipv4Addr::new(10, 96, 1, 1));
        assert_eq!(ips.assign(&b, &[]).unwrap(), Ipv4Addr::new(10, 96, 1, 0));
        assert_eq!(ips.assign(&a, &[]).unwrap(), first, "stable");
    }
}

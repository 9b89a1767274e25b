//! Service VIPs and the hooks after DNAT.
//!
//! source (Service objects) ──► [`addresses`] ──► `NP_SERVICES`, `NP_NODEPORTS` ──►
//! from_pod defers egress to them; `to_remote` on the node's exits ([`ServiceHooks`]),
//! `local_in` and `to_pod` judge it after kube-proxy's DNAT. Each Service address
//! (ClusterIPs, externalIPs, LoadBalancer ingress, IPv4 and IPv6) is one entry, and any
//! packet to it is deferred; the node's own addresses are deferred only on a NodePort.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::{anyhow, Context};
use aya::maps::{HashMap, MapData, MapError};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType};
use aya::programs::SchedClassifier;
use aya::Ebpf;
use netpol_common::{map, nodeport_key, program, Addr, ServiceEntry};

use netpol_engine::objects::Object;

use super::{FILTER_HANDLE, FILTER_PRIORITY};

/// What `from_pod` defers to the hook after DNAT (see `service::defers` in the
/// classifier): the Services' own addresses and the NodePorts on the node's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceAddresses {
    /// ClusterIPs, externalIPs and LoadBalancer ingress addresses, each with its
    /// Service's number; the node's own addresses as `ServiceEntry::NODE` while any
    /// Service has a NodePort.
    pub vips: BTreeMap<Addr, ServiceEntry>,
    /// `nodeport_key(protocol, nodePort)` → the Service's number.
    pub nodeports: BTreeMap<u32, u32>,
}

impl ServiceAddresses {
    /// Writes what differs from `desired` into `NP_NODEPORTS` and `NP_SERVICES`
    /// (NodePorts first: a node address is only deferred on one); how many entries.
    pub fn sync(&mut self, ebpf: &mut Ebpf, desired: &ServiceAddresses) -> anyhow::Result<usize> {
        let ports = sync_map(
            ebpf,
            map::NODEPORTS,
            &mut self.nodeports,
            &desired.nodeports,
        )?;
        Ok(ports + sync_map(ebpf, map::SERVICES, &mut self.vips, &desired.vips)?)
    }
}

/// The addresses of every Service (numbered in (namespace, name) order from 1;
/// headless ClusterIPs skipped) and, when there are NodePorts, `node`'s addresses.
pub fn addresses(objects: &[Object], node: &[IpAddr]) -> ServiceAddresses {
    let mut named: Vec<(String, String, &k8s_openapi::api::core::v1::Service)> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Service(svc) => Some((
                svc.metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                svc.metadata.name.clone().unwrap_or_default(),
                &**svc,
            )),
            _ => None,
        })
        .collect();
    named.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let mut out = ServiceAddresses::default();
    for (i, (_, _, svc)) in named.iter().enumerate() {
        let id = i as u32 + 1;
        let Some(spec) = &svc.spec else { continue };
        let ingress = svc
            .status
            .iter()
            .flat_map(|s| s.load_balancer.iter())
            .flat_map(|lb| lb.ingress.iter().flatten())
            .filter_map(|i| i.ip.as_ref());
        let texts = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .chain(spec.external_ips.iter().flatten())
            .chain(ingress);
        for ip in texts.filter_map(|t| t.parse::<IpAddr>().ok()) {
            out.vips
                .insert(netpol_engine::index::net::addr_of(ip), ServiceEntry { id });
        }
        for p in spec.ports.iter().flatten() {
            let (Some(port), Some(protocol)) = (
                p.node_port.and_then(|n| u16::try_from(n).ok()),
                protocol_number(p.protocol.as_deref()),
            ) else {
                continue;
            };
            out.nodeports.insert(nodeport_key(protocol, port), id);
        }
    }
    if !out.nodeports.is_empty() {
        for ip in node {
            // A Service's own address wins: it is DNATed on any port it serves.
            out.vips
                .entry(netpol_engine::index::net::addr_of(*ip))
                .or_insert(ServiceEntry {
                    id: ServiceEntry::NODE,
                });
        }
    }
    out
}

fn protocol_number(name: Option<&str>) -> Option<u8> {
    match name.unwrap_or("TCP") {
        "TCP" => Some(6),
        "UDP" => Some(17),
        "SCTP" => Some(132),
        _ => None,
    }
}

/// Writes the difference between `actual` and `desired` into map `name` (adds first);
/// how many entries changed.
fn sync_map<K, V>(
    ebpf: &mut Ebpf,
    name: &str,
    actual: &mut BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> anyhow::Result<usize>
where
    K: aya::Pod + Ord + Clone,
    V: aya::Pod + PartialEq + Clone,
{
    let mut m: HashMap<&mut MapData, K, V> = HashMap::try_from(
        ebpf.map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing"))?,
    )?;
    let mut n = 0;
    for (k, v) in desired {
        if actual.get(k) != Some(v) {
            m.insert(k, v, 0)
                .map_err(|e| anyhow!("writing map {name}: {e} (too many Service addresses?)"))?;
            n += 1;
        }
    }
    for k in actual.keys().filter(|k| !desired.contains_key(*k)) {
        match m.remove(k) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("removing from map {name}")),
        }
        n += 1;
    }
    *actual = desired.clone();
    Ok(n)
}

/// `to_remote` attached at TC egress of the devices a DNATed packet can leave the node
/// by (`--service-hook`, e.g. `flannel.1` and the uplink). Devices that do not exist
/// yet are tried again at the next sync (a device appearing is a link event that wakes
/// the agent loop). Like the pods' filters, a hook outlives the agent (a netlink filter
/// of a fixed handle, not the process's) and a new agent replaces its program in place:
/// a clean exit or a rolling update never leaves DNATed packets unjudged.
#[derive(Default)]
pub struct ServiceHooks {
    /// Device → the ifindex this agent put its program on.
    attached: BTreeMap<String, u32>,
}

impl ServiceHooks {
    /// Attaches to every device of `devices` not attached yet (or recreated).
    pub fn sync(&mut self, prog: &mut SchedClassifier, devices: &[String]) -> Vec<String> {
        let mut missing = Vec::new();
        for dev in devices {
            let Some(ifindex) = ifindex(dev) else {
                missing.push(dev.clone());
                continue;
            };
            if self.attached.get(dev) == Some(&ifindex) {
                continue;
            }
            match attach(prog, dev) {
                Ok(()) => {
                    tracing::info!(device = %dev, "service hook attached");
                    self.attached.insert(dev.clone(), ifindex);
                }
                Err(e) => {
                    tracing::warn!(device = %dev, error = ?e, "attaching the service hook failed; will retry");
                    missing.push(dev.clone());
                }
            }
        }
        missing
    }
}

fn ifindex(dev: &str) -> Option<u32> {
    let name = std::ffi::CString::new(dev).ok()?;
    // SAFETY: a NUL-terminated name that lives across the call.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (i != 0).then_some(i)
}

fn attach(prog: &mut SchedClassifier, dev: &str) -> anyhow::Result<()> {
    let _ = tc::qdisc_add_clsact(dev);
    // A hook of ours already there (a previous agent's): its program is replaced in the
    // same filter, atomically.
    let existing = SchedClassifierLink::attached(
        dev,
        TcAttachType::Egress,
        FILTER_PRIORITY,
        FILTER_HANDLE,
        None,
    );
    let id = match existing.map(|link| prog.attach_to_link(link)) {
        Ok(Ok(id)) => id,
        _ => {
            // None yet, or one of an agent from before fixed handles: replaced (a short
            // gap, once).
            let _ = tc::qdisc_detach_program(dev, TcAttachType::Egress, program::TO_REMOTE);
            prog.attach_with_options(
                dev,
                TcAttachType::Egress,
                TcAttachOptions::Netlink(NlOptions {
                    priority: FILTER_PRIORITY,
                    handle: FILTER_HANDLE,
                    ..Default::default()
                }),
            )
            .with_context(|| format!("attaching {} to {dev}", program::TO_REMOTE))?
        }
    };
    // Not the process's: aya would detach it when the program is dropped (agent exit).
    std::mem::forget(prog.take_link(id)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netpol_common::v4_mapped;

    #[test]
    fn every_cluster_ip_is_a_vip_and_headless_services_are_not() {
        let (objects, errors) = netpol_engine::objects::parse_manifests(
            std::path::Path::new("svc.yaml"),
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec: {clusterIP: 10.96.0.20, clusterIPs: [10.96.0.20, "fd00:96::20"], ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: x}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec: {clusterIP: 10.96.0.10, ports: [{port: 53, protocol: UDP}]}
"#,
        );
        assert!(errors.is_empty());
        let v = addresses(&objects, &["10.244.0.1".parse().unwrap()]);
        assert!(v.nodeports.is_empty());
        // No NodePort: the node's address is no Service's.
        let v = v.vips;
        assert_eq!(v.len(), 3, "{v:?}");
        assert_eq!(
            v[&v4_mapped([10, 96, 0, 10])].id,
            1,
            "kube-system/dns sorts first"
        );
        // x/db (headless) is numbered but has no VIP.
        assert_eq!(v[&v4_mapped([10, 96, 0, 20])].id, 3);
        let v6 = netpol_engine::index::net::addr_of("fd00:96::20".parse().unwrap());
        assert_eq!(v[&v6].id, 3);
    }

    #[test]
    fn external_and_load_balancer_addresses_are_vips_and_node_ports_defer_the_nodes_own() {
        let (objects, errors) = netpol_engine::objects::parse_manifests(
            std::path::Path::new("svc.yaml"),
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalIPs: [192.0.2.7]
  ports: [{port: 80, nodePort: 30080}, {port: 53, protocol: UDP, nodePort: 30053}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.9}, {hostname: lb.example}]}}
"#,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let node: Vec<IpAddr> = vec!["10.244.0.1".parse().unwrap(), "172.30.0.2".parse().unwrap()];
        let a = addresses(&objects, &node);
        for ip in [[10, 96, 0, 20], [192, 0, 2, 7], [198, 51, 100, 9]] {
            assert_eq!(a.vips[&v4_mapped(ip)].id, 1, "{ip:?}");
        }
        for ip in [[10, 244, 0, 1], [172, 30, 0, 2]] {
            assert_eq!(a.vips[&v4_mapped(ip)].id, ServiceEntry::NODE, "{ip:?}");
        }
        assert_eq!(a.vips.len(), 5);
        assert_eq!(
            a.nodeports,
            BTreeMap::from([(nodeport_key(6, 30080), 1), (nodeport_key(17, 30053), 1)])
        );
    }
}

//! Service VIPs and the hooks after DNAT.
//!
//! source (Service objects) ──► [`vips`] ──► `NP_SERVICES` ──► from_pod defers egress
//! to a VIP; `to_remote` on the overlay/uplink devices ([`ServiceHooks`]) and `to_pod`
//! judge it after kube-proxy's DNAT. Each VIP (every ClusterIP of a Service, IPv4 and
//! IPv6) is one entry; ports do not matter: any packet to a VIP is deferred.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use anyhow::{anyhow, Context};
use aya::maps::{HashMap, MapData, MapError};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType};
use aya::programs::SchedClassifier;
use aya::Ebpf;
use netpol_common::{map, program, Addr, ServiceEntry};

use netpol_engine::objects::Object;

use super::{FILTER_HANDLE, FILTER_PRIORITY};

/// The VIPs of every Service with a ClusterIP (`None`/headless skipped), numbered in
/// (namespace, name) order.
pub fn vips(objects: &[Object]) -> BTreeMap<Addr, ServiceEntry> {
    let mut named: Vec<(String, String, Vec<IpAddr>)> = Vec::new();
    for object in objects {
        let Object::Service(svc) = object else {
            continue;
        };
        let Some(spec) = &svc.spec else { continue };
        let mut ips: BTreeSet<IpAddr> = BTreeSet::new();
        for text in spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
        {
            if let Ok(ip) = text.parse() {
                ips.insert(ip);
            }
        }
        named.push((
            svc.metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            svc.metadata.name.clone().unwrap_or_default(),
            ips.into_iter().collect(),
        ));
    }
    named.sort();
    let mut out = BTreeMap::new();
    for (i, (_, _, ips)) in named.iter().enumerate() {
        for ip in ips {
            out.insert(
                netpol_engine::index::net::addr_of(*ip),
                ServiceEntry { id: i as u32 + 1 },
            );
        }
    }
    out
}

/// Writes the difference between the VIPs written and `desired` (adds first).
pub fn sync_vips(
    ebpf: &mut Ebpf,
    actual: &mut BTreeMap<Addr, ServiceEntry>,
    desired: &BTreeMap<Addr, ServiceEntry>,
) -> anyhow::Result<usize> {
    let mut m: HashMap<&mut MapData, Addr, ServiceEntry> = HashMap::try_from(
        ebpf.map_mut(map::SERVICES)
            .ok_or_else(|| anyhow!("map {} missing", map::SERVICES))?,
    )?;
    let mut n = 0;
    for (k, v) in desired {
        if actual.get(k) != Some(v) {
            m.insert(k, v, 0).map_err(|e| {
                anyhow!(
                    "writing map {}: {e} (too many Service VIPs?)",
                    map::SERVICES
                )
            })?;
            n += 1;
        }
    }
    for k in actual.keys().filter(|k| !desired.contains_key(*k)) {
        match m.remove(k) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).context("removing a Service VIP"),
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
        let v = vips(&objects);
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
}

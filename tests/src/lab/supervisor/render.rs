//! Keeping the lab in step with the manifests: reconcile (pods, Services, DNS) and the
//! agent's view of the cluster rendered from them.

use crate::lab::kubeproxy::{self, Candidate};
use crate::lab::{dns, Enforcer, ServiceStatus};
use anyhow::bail;
use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use netpol_engine::objects::Object;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;

use super::*;

/// The cluster DNS the lab adds with `--dns`, unless the manifests have their own.
pub(super) const DNS_OBJECTS: &str = r#"
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

pub(super) fn object_id(o: &Object) -> (&'static str, String, String) {
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

impl Lab {
    /// Brings pods, the rendered cluster view and the agent in line with the manifest
    /// directory. Returns the digest of the rendered view (what the agent must reach).
    /// Pods that fail are reported in the error, after everything else was done.
    pub(super) fn reconcile(&mut self) -> anyhow::Result<String> {
        let mut state =
            netpol_agent::source::dir::read_state(std::slice::from_ref(&self.manifests));
        if state.errors != self.last_errors {
            for e in &state.errors {
                tracing::warn!(error = ?e, "manifest skipped");
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
                if let Some(key) = pod_key(pod).filter(|_| runs_in_lab(pod)) {
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
    pub(super) fn program_services(&mut self, objects: &[Object]) -> anyhow::Result<()> {
        let pods: BTreeMap<PodKey, &Pod> = objects
            .iter()
            .filter_map(|o| match o {
                Object::Pod(p) => Some((pod_key(p)?, &**p)),
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
                records
                    .names
                    .insert(format!("{name}.{ns}.pod.{}", dns::DOMAIN), p.ips());
            }
            let text = serde_json::to_vec_pretty(&records)?;
            if std::fs::read(&self.paths.dns_records).ok() != Some(text.clone()) {
                crate::lab::write_atomic(&self.paths.dns_records, &text)?;
            }
        }
        Ok(())
    }

    /// Writes `cluster/objects.yaml`: every object of the directory, with the pods the lab
    /// runs placed on their node and given their addresses, as a kubelet would report
    /// them, and Services with their ClusterIP, as the API server would assign it.
    pub(super) fn render(&self, objects: &[Object]) -> anyhow::Result<()> {
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
                        let spec = std::sync::Arc::make_mut(&mut svc)
                            .spec
                            .get_or_insert_with(Default::default);
                        spec.cluster_ip = Some(ip.clone());
                        spec.cluster_ips = Some(vec![ip]);
                    }
                    serde_yaml::to_string(&svc)
                }
                Object::Pod(pod) => {
                    let placed = pod_key(pod)
                        .and_then(|k| self.pods.get(&k))
                        .map(|lab_pod| place(pod, &lab_pod.ips(), lab_pod.node));
                    serde_yaml::to_string(placed.as_ref().unwrap_or(pod))
                }
            };
            docs.push(doc.context("rendering the cluster view")?);
        }
        let text = docs.join("---\n");
        let path = self.paths.cluster.join("objects.yaml");
        // Only on change: every write is a new input for the agent.
        if std::fs::read(&path).ok().as_deref() != Some(text.as_bytes()) {
            crate::lab::write_atomic(&path, text.as_bytes())?;
        }
        Ok(())
    }
}

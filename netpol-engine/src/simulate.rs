//! `netpol simulate`: the reachability matrix of a set of manifests, computed by
//! compiling them and looking every flow up in the compiled maps (no kernel).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use netpol_common::direction;
use serde::Serialize;

use crate::compile::lookup::Lookup;
use crate::compile::{compile, Desired, NodeView};
use crate::index::net::addr_of;
use crate::index::{Index, PodInfo, PodKey, Snapshot};
use crate::objects::{manifest::read_all, ClusterState, Object};

/// Why a question about the manifests could not be answered at all.
#[derive(Debug, thiserror::Error)]
pub enum Unjudged {
    /// A file or document that does not read (every one is named).
    #[error("{0}")]
    Unreadable(String),
    #[error("pod {0:?} is not in the manifests (use namespace/name)")]
    UnknownPod(String),
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub protocol: String,
    pub port: u16,
    pub pods: Vec<PodAddress>,
    pub results: Vec<Pair>,
    /// Objects that were rejected, with the field at fault.
    pub invalid: Vec<crate::index::Invalid>,
}

#[derive(Debug, Serialize)]
pub struct PodAddress {
    pub pod: String,
    pub ip: String,
    /// True when the manifest had no `status.podIP` and simulate chose one.
    pub assigned: bool,
}

#[derive(Debug, Serialize)]
pub struct Pair {
    pub from: String,
    pub to: String,
    pub allowed: bool,
    pub ingress: &'static str,
    pub egress: &'static str,
}

/// Pods without an address get one from 10.255.0.0/16, in name order (deterministic).
pub(crate) fn assign_addresses(objects: &mut [Object]) -> Vec<(String, bool)> {
    let mut pods: Vec<&mut k8s_openapi::api::core::v1::Pod> = objects
        .iter_mut()
        .filter_map(|o| {
            if let Object::Pod(p) = o {
                Some(std::sync::Arc::make_mut(p))
            } else {
                None
            }
        })
        .collect();
    pods.sort_by_key(|p| {
        (
            p.metadata.namespace.clone().unwrap_or_default(),
            p.metadata.name.clone().unwrap_or_default(),
        )
    });
    let mut next = 1u32;
    let mut out = Vec::new();
    for p in pods {
        let status = p.status.get_or_insert_with(Default::default);
        let assigned = status.pod_ip.is_none();
        if assigned {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 255, 0, 0)) + next);
            next += 1;
            status.pod_ip = Some(ip.to_string());
        }
        let key = format!(
            "{}/{}",
            p.metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            p.metadata.name.clone().unwrap_or_default()
        );
        out.push((key, assigned));
    }
    out
}

/// A set of objects compiled the way simulate judges them: every pod is local, and
/// pods without `status.podIP` get deterministic addresses ([`assign_addresses`]).
pub struct Model {
    pub snap: Snapshot,
    pub desired: Desired,
    /// Every pod in name order, and whether simulate chose its address.
    pub addresses: Vec<(PodKey, bool)>,
}

impl Model {
    pub fn new(mut objects: Vec<Object>) -> Model {
        let addresses = assign_addresses(&mut objects);
        let snap = Index::new().reset(&ClusterState {
            objects,
            errors: vec![],
            digest: String::new(),
        });
        let desired = compile(&snap, &NodeView::default());
        Model {
            snap,
            desired,
            addresses,
        }
    }

    /// Reads manifests; the first unreadable document is the error.
    pub fn read(paths: &[PathBuf]) -> Result<Model, Unjudged> {
        let (objects, errors, _) = read_all(paths);
        if let Some(e) = errors.first() {
            return Err(Unjudged::Unreadable(e.clone()));
        }
        Ok(Model::new(objects))
    }

    pub fn judge(&self) -> Judge<'_> {
        Judge {
            desired: &self.desired,
            lookup: Lookup::new(&self.desired),
        }
    }
}

/// Flows between pods looked up in the compiled maps, as the classifier would.
pub struct Judge<'a> {
    desired: &'a Desired,
    lookup: Lookup<'a>,
}

impl Judge<'_> {
    /// `pod`'s verdict in direction `dir` on a flow with `peer`: "allowed", "denied" or
    /// "not-isolated" (no policy decided: allowed by default).
    pub fn side(
        &self,
        pod: &str,
        dir: u8,
        peer: &PodInfo,
        protocol: u8,
        port: u16,
    ) -> &'static str {
        match (self.desired.endpoints.get(pod), peer.ips.first()) {
            (Some(ep), Some(ip)) => {
                let d = self
                    .lookup
                    .decide_at(ep, dir, &addr_of(*ip), protocol, port);
                match (d.allowed, d.reason) {
                    (true, netpol_common::reason::NOT_ISOLATED) => "not-isolated",
                    (true, _) => "allowed",
                    (false, _) => "denied",
                }
            }
            // No address (or a hostNetwork pod): nothing to enforce on.
            _ => "not-isolated",
        }
    }

    /// What the classifier knows of a pod as a peer: (identity, CIDR identity) of its
    /// first address. Pods of one identity and class are judged alike, both ways.
    pub fn class_of(&self, pod: &PodInfo) -> (u32, u32) {
        pod.ips
            .first()
            .map_or((0, 0), |ip| self.lookup.peer_identities(&addr_of(*ip)))
    }

    /// The sender's egress and the receiver's ingress verdicts of one flow.
    pub fn flow(&self, from: &PodInfo, to: &PodInfo, protocol: u8, port: u16) -> Pair {
        let egress = self.side(&from.key(), direction::EGRESS, to, protocol, port);
        let ingress = self.side(&to.key(), direction::INGRESS, from, protocol, port);
        Pair {
            from: from.key(),
            to: to.key(),
            allowed: egress != "denied" && ingress != "denied",
            ingress,
            egress,
        }
    }
}

pub fn simulate(
    paths: &[PathBuf],
    protocol: u8,
    port: u16,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<Report, Unjudged> {
    let model = Model::read(paths)?;
    let snap = &model.snap;
    for f in [from, to].into_iter().flatten() {
        if !snap.pods.contains_key(f) {
            return Err(Unjudged::UnknownPod(f.to_string()));
        }
    }
    let mut pods = Vec::new();
    for (key, was_assigned) in &model.addresses {
        if let Some(p) = snap.pods.get(key) {
            pods.push(PodAddress {
                pod: key.clone(),
                ip: p.ips.first().map(IpAddr::to_string).unwrap_or_default(),
                assigned: *was_assigned,
            });
        }
    }
    let judge = model.judge();
    let mut results = Vec::new();
    for (fk, f) in snap
        .pods
        .iter()
        .filter(|(k, _)| from.is_none_or(|x| x == k.as_str()))
    {
        for (tk, t) in snap
            .pods
            .iter()
            .filter(|(k, _)| to.is_none_or(|x| x == k.as_str()))
        {
            if fk == tk {
                continue;
            }
            results.push(judge.flow(f, t, protocol, port));
        }
    }
    Ok(Report {
        protocol: crate::index::policy::protocol_name(protocol).into(),
        port,
        pods,
        results,
        invalid: model.snap.invalid.clone(),
    })
}

impl Report {
    /// A matrix like the upstream e2e truth tables: rows send, columns receive.
    pub fn table(&self) -> String {
        let names: Vec<&str> = self.pods.iter().map(|p| p.pod.as_str()).collect();
        let width = names.iter().map(|n| n.len()).max().unwrap_or(4).max(4);
        let mut out = format!(
            "{} {}/{}: rows = from, columns = to (✓ allowed, ✗ denied)\n",
            "reachability", self.protocol, self.port
        );
        out.push_str(&format!("{:width$} ", ""));
        for (i, _) in names.iter().enumerate() {
            out.push_str(&format!("{:>3}", i + 1));
        }
        out.push('\n');
        for (i, from) in names.iter().enumerate() {
            out.push_str(&format!("{from:width$} "));
            for to in &names {
                let cell = if from == to {
                    "."
                } else {
                    match self.results.iter().find(|r| r.from == *from && r.to == *to) {
                        Some(r) if r.allowed => "✓",
                        Some(_) => "✗",
                        None => " ",
                    }
                };
                out.push_str(&format!("{cell:>3}"));
            }
            out.push_str(&format!("   {}\n", i + 1));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo"))
    }

    fn verdict<'a>(r: &'a Report, from: &str, to: &str) -> &'a Pair {
        r.results
            .iter()
            .find(|p| p.from == from && p.to == to)
            .expect("pair present")
    }

    #[test]
    fn the_demo_policies_allow_exactly_the_shops_flows() {
        let r = simulate(&[demo()], netpol_common::proto::TCP, 8080, None, None).unwrap();
        assert_eq!(r.results.len(), 6, "every ordered pair of three pods");
        let fa = verdict(&r, "shop/frontend", "shop/api");
        assert!(fa.allowed);
        assert_eq!((fa.ingress, fa.egress), ("allowed", "not-isolated"));
        assert_eq!(verdict(&r, "data/db", "shop/api").ingress, "denied");
        assert!(
            !verdict(&r, "shop/api", "data/db").allowed,
            "db admits api on 5432 only"
        );
        let r = simulate(
            &[demo()],
            netpol_common::proto::TCP,
            5432,
            Some("shop/api"),
            Some("data/db"),
        )
        .unwrap();
        assert!(r.results[0].allowed);
        assert!(r
            .pods
            .iter()
            .all(|p| p.assigned && p.ip.starts_with("10.255.")));
    }

    #[test]
    fn a_v4_mapped_ipv6_block_lets_no_ipv4_pod_in() {
        let dir = std::env::temp_dir().join(format!("netpol-sim-v4mapped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cluster.yaml");
        std::fs::write(
            &file,
            "kind: Namespace\nmetadata: {name: x}\n---\n\
             kind: Pod\nmetadata: {name: a, namespace: x, labels: {app: a}}\nspec: {containers: [{name: c, image: i}]}\nstatus: {podIP: 10.1.0.1}\n---\n\
             kind: Pod\nmetadata: {name: b, namespace: x}\nspec: {containers: [{name: c, image: i}]}\nstatus: {podIP: 10.2.0.1}\n---\n\
             kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
             spec: {podSelector: {matchLabels: {app: a}}, ingress: [{from: [{ipBlock: {cidr: '::ffff:0:0/96'}}]}]}\n",
        )
        .unwrap();
        let r = simulate(
            &[file],
            netpol_common::proto::TCP,
            80,
            Some("x/b"),
            Some("x/a"),
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let r = r.unwrap();
        assert_eq!(r.results[0].ingress, "denied");
    }

    #[test]
    fn an_unknown_pod_is_a_clear_error() {
        let e = simulate(
            &[demo()],
            netpol_common::proto::TCP,
            80,
            Some("shop/nope"),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("shop/nope"));
    }
}

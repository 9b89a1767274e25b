//! Owns the eBPF object: loads the classifier, writes the difference between desired
//! and actual map contents, attaches the programs to local pods' veths.
//!
//! source ──► index ──► compile ──► **datapath** ──► events
//!
//! Sync order keeps isolated pods closed at every instant: entries are added before
//! anything is deleted, an endpoint's entry is written before its programs are
//! attached, and its programs are detached before its entry is removed.

pub mod discovery;
pub mod maps;

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use aya::programs::tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcAttachType};
use aya::programs::SchedClassifier;
use aya::{Ebpf, EbpfLoader};
use netpol_common::{capacity, map, program, Config};

use crate::compile::Desired;
use crate::index::PodKey;
pub use discovery::Location;

/// The classifier object, built by build.rs.
pub static CLASSIFIER: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol-ebpf"));

/// Map capacities (flags of the agent).
#[derive(Clone, Debug)]
pub struct Capacities {
    pub endpoints: u32,
    pub ipcache: u32,
    pub cidrs: u32,
    pub policy: u32,
    pub conntrack: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Capacities {
            endpoints: capacity::ENDPOINTS,
            ipcache: capacity::IPCACHE,
            cidrs: capacity::CIDRS,
            policy: capacity::POLICY,
            conntrack: capacity::CONNTRACK,
        }
    }
}

/// Loads the classifier with the given capacities (programs loaded, not attached).
pub fn load(caps: &Capacities) -> anyhow::Result<Ebpf> {
    if CLASSIFIER.is_empty() {
        bail!("this netpol was built with AYA_BUILD_SKIP: it carries no classifier; rebuild without it");
    }
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(map::ENDPOINTS, caps.endpoints)
        .map_max_entries(map::IPCACHE, caps.ipcache)
        .map_max_entries(map::CIDRS, caps.cidrs)
        .map_max_entries(map::POLICY, caps.policy)
        .map_max_entries(map::CONNTRACK, caps.conntrack)
        .load(CLASSIFIER)
        .context("loading the classifier (needs root, BTF and bpffs; run `cargo xtask setup`)")?;
    for name in [program::FROM_POD, program::TO_POD] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .context("program missing")?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the verifier rejected {name}"))?;
    }
    Ok(ebpf)
}

/// What one sync changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub written: usize,
    pub removed: usize,
    pub attached: usize,
    pub detached: usize,
}

struct Attachment {
    location: Location,
    links: Vec<(&'static str, SchedClassifierLinkId)>,
}

pub struct Datapath {
    ebpf: Ebpf,
    actual: Desired,
    attached: BTreeMap<PodKey, Attachment>,
    /// Endpoint entries as written, by ifindex.
    endpoint_entries: BTreeMap<u32, netpol_common::EndpointEntry>,
}

impl Datapath {
    pub fn new(caps: &Capacities) -> anyhow::Result<Datapath> {
        Ok(Datapath {
            ebpf: load(caps)?,
            actual: Desired::default(),
            attached: BTreeMap::new(),
            endpoint_entries: BTreeMap::new(),
        })
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn set_config(&mut self, config: Config) -> anyhow::Result<()> {
        maps::write_config(&mut self.ebpf, config)
    }

    /// Pods that have an entry and attached programs.
    pub fn attached(&self) -> impl Iterator<Item = (&PodKey, &Location)> {
        self.attached.iter().map(|(k, a)| (k, &a.location))
    }

    /// Brings the kernel to `desired` for the pods found at `locations`.
    pub fn sync(
        &mut self,
        desired: &Desired,
        locations: &BTreeMap<PodKey, Location>,
    ) -> anyhow::Result<SyncStats> {
        let mut stats = SyncStats::default();
        // 1. additions and updates of peer data and policy
        stats.written += maps::upsert_diff(
            &mut self.ebpf,
            map::IPCACHE,
            &self.actual.ipcache,
            &desired.ipcache,
            maps::cidr_key,
        )?;
        stats.written += maps::upsert_diff(
            &mut self.ebpf,
            map::CIDRS,
            &self.actual.cidrs,
            &desired.cidrs,
            maps::cidr_key,
        )?;
        stats.written += maps::upsert_diff(
            &mut self.ebpf,
            map::POLICY,
            &self.actual.policy,
            &desired.policy,
            maps::policy_key,
        )?;

        // 2. endpoints: entry first, then programs
        let mut wanted: BTreeMap<u32, netpol_common::EndpointEntry> = BTreeMap::new();
        for (pod, ep) in &desired.endpoints {
            if let Some(loc) = locations.get(pod) {
                wanted.insert(loc.ifindex, *ep);
            }
        }
        // Pods that moved to another veth (recreated) or went away: detach first.
        let stale: Vec<PodKey> = self
            .attached
            .iter()
            .filter(|(pod, a)| {
                locations.get(*pod) != Some(&a.location) || !desired.endpoints.contains_key(*pod)
            })
            .map(|(pod, _)| pod.clone())
            .collect();
        for pod in stale {
            let a = self.attached.remove(&pod).expect("listed above");
            self.detach(a);
            stats.detached += 1;
        }
        for (ifindex, ep) in &wanted {
            if self.endpoint_entries.get(ifindex) != Some(ep) {
                maps::write_endpoint(&mut self.ebpf, *ifindex, *ep)?;
                self.endpoint_entries.insert(*ifindex, *ep);
                stats.written += 1;
            }
        }
        for (pod, loc) in locations {
            if !desired.endpoints.contains_key(pod) || self.attached.contains_key(pod) {
                continue;
            }
            match self.attach(loc) {
                Ok(links) => {
                    self.attached.insert(
                        pod.clone(),
                        Attachment {
                            location: loc.clone(),
                            links,
                        },
                    );
                    stats.attached += 1;
                }
                Err(e) => {
                    tracing::warn!(pod = %pod, veth = %loc.ifname, error = %format!("{e:#}"), "attach failed; will retry")
                }
            }
        }
        let gone: Vec<u32> = self
            .endpoint_entries
            .keys()
            .filter(|i| !wanted.contains_key(i))
            .copied()
            .collect();
        for ifindex in gone {
            maps::remove_endpoint(&mut self.ebpf, ifindex)?;
            self.endpoint_entries.remove(&ifindex);
            stats.removed += 1;
        }

        // 3. deletions of peer data and policy no longer wanted
        stats.removed += maps::remove_diff(
            &mut self.ebpf,
            map::POLICY,
            &self.actual.policy,
            &desired.policy,
            maps::policy_key,
        )?;
        stats.removed += maps::remove_diff(
            &mut self.ebpf,
            map::CIDRS,
            &self.actual.cidrs,
            &desired.cidrs,
            maps::cidr_key,
        )?;
        stats.removed += maps::remove_diff(
            &mut self.ebpf,
            map::IPCACHE,
            &self.actual.ipcache,
            &desired.ipcache,
            maps::cidr_key,
        )?;
        self.actual = desired.clone();
        Ok(stats)
    }

    fn attach(
        &mut self,
        loc: &Location,
    ) -> anyhow::Result<Vec<(&'static str, SchedClassifierLinkId)>> {
        // clsact may already exist (a previous agent): that is fine.
        let _ = tc::qdisc_add_clsact(&loc.ifname);
        let mut links = Vec::new();
        for (name, hook) in [
            (program::FROM_POD, TcAttachType::Ingress),
            (program::TO_POD, TcAttachType::Egress),
        ] {
            // A previous agent's filter (after a crash) is replaced, not stacked.
            let _ = tc::qdisc_detach_program(&loc.ifname, hook, name);
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .context("program missing")?
                .try_into()?;
            // Netlink filters outlive the agent: if it dies, the last state keeps being
            // enforced (closed), instead of the hook vanishing with the process (open).
            let id = prog
                .attach_with_options(
                    &loc.ifname,
                    hook,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: 1,
                        ..Default::default()
                    }),
                )
                .with_context(|| format!("attaching {name} to {}", loc.ifname))?;
            links.push((name, id));
        }
        Ok(links)
    }

    fn detach(&mut self, a: Attachment) {
        for (name, id) in a.links {
            if let Some(Ok(prog)) = self
                .ebpf
                .program_mut(name)
                .map(<&mut SchedClassifier>::try_from)
            {
                // The veth may be gone already (pod deleted): nothing left to detach then.
                let _ = prog.detach(id);
            }
        }
    }

    pub fn counters(&self) -> anyhow::Result<Vec<maps::Counter>> {
        maps::read_counters(&self.ebpf)
    }
}

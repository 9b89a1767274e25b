//! Owns the eBPF object: loads the classifier, writes the difference between desired
//! and actual map contents, attaches the programs to local pods' veths.
//!
//! source ──► index ──► compile ──► **datapath** ──► events
//!
//! Sync order keeps isolated pods closed at every instant: entries are added before
//! anything is deleted, an endpoint's entry is written before its programs are
//! attached, and its port is put back on the pod-start hold (never left without a
//! filter) before its entry is removed.

pub mod discovery;
pub mod hold;
pub mod live;
pub mod local_in;
pub mod locate;
pub mod maps;
pub mod netlink;
mod options;
pub mod pin;
pub mod programs;
pub mod services;
pub mod sweep;
pub mod tally;

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use aya::programs::tc::{
    self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType, TcHandle,
};
use aya::programs::SchedClassifier;
use aya::Ebpf;
use netpol_common::{config_flags, map, program, Config};

pub use discovery::Location;
pub use locate::{Conflict, Located};
use netpol_engine::compile::Desired;
use netpol_engine::index::PodKey;
pub use options::{
    default_ct_share, Capacities, Switches, DEFAULT_EVENT_BURST, DEFAULT_EVENT_RATE,
};
pub use programs::{build_id, load, load_with, CLASSIFIER};
use programs::{pin_program, verify_in_background, Programs};

/// What one sync changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub written: usize,
    pub removed: usize,
    pub attached: usize,
    /// Ports put back on the pod-start hold (their pod gone from them).
    pub held: usize,
}

/// Filters are attached at this priority and handle, so that a later agent can replace
/// them atomically (netlink "change" of the same filter) instead of detaching first.
pub const FILTER_PRIORITY: u16 = 1;
pub const FILTER_HANDLE: TcHandle = TcHandle::new(0, 1);

pub(crate) const HOOKS: [(&str, TcAttachType); 2] = [
    (program::FROM_POD, TcAttachType::Ingress),
    (program::TO_POD, TcAttachType::Egress),
];

/// The pod-start hold's programs, at the same hooks (see `hold.rs`).
pub const HOLD_HOOKS: [(&str, TcAttachType); 2] = [
    (program::HOLD_FROM_POD, TcAttachType::Ingress),
    (program::HOLD_TO_POD, TcAttachType::Egress),
];

struct Attachment {
    location: Location,
}

/// How the datapath came up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Pinned maps of this version were reused (a restart).
    pub adopted: bool,
    /// Other versions' pinned directories, rebuilt from and removed once every filter
    /// runs this version's programs (an upgrade).
    pub replaced_versions: Vec<String>,
    /// Conntrack entries copied from another version.
    pub migrated_conntrack: usize,
    /// Entries found in the pinned maps at start.
    pub adopted_entries: usize,
    /// The epoch read back from the pinned config.
    pub epoch: u32,
}

pub struct Datapath {
    tally: std::sync::Arc<tally::Tally>,
    ebpf: Ebpf,
    actual: Desired,
    attached: BTreeMap<PodKey, Attachment>,
    /// Endpoint entries as written, by ifindex.
    endpoint_entries: BTreeMap<u32, netpol_common::EndpointEntry>,
    /// The node config as written; its epoch is bumped by every sync that changes a map.
    config: Config,
    pins: Option<pin::PinDir>,
    adoption: Adoption,
    /// The programs the filters run.
    programs: Programs,
    /// `NP_SERVICES` and `NP_NODEPORTS` as written.
    services: services::ServiceAddresses,
    /// The after-DNAT program's attachments (overlay, uplink).
    service_hooks: services::ServiceHooks,
    /// The hook on local delivery (`local_in`).
    local: local_in::LocalHook,
}

impl Datapath {
    /// The node's datapath, pinned under `pins`: adopts what a previous agent of this
    /// version left (map contents become the actual state the first sync diffs against;
    /// the epoch continues), or rebuilds from another version (conntrack migrated when
    /// its layout is unchanged). Nothing is detached or emptied here: the previous
    /// programs keep enforcing the previous state until the first sync replaces them.
    /// A new build's programs are verified in the background: the first sync fills the
    /// maps meanwhile and waits for them only to attach.
    pub fn open(caps: &Capacities, pins: pin::PinDir) -> anyhow::Result<Datapath> {
        let found = pins.survey()?;
        pins.create()?;
        // The same classifier pinned already (a restart): its programs are adopted as
        // they are, which spares the verifier's second or so.
        let reuse = found == pin::Found::SameVersion && pins.has_build(&build_id());
        let programs = if reuse {
            Programs::open(&pins)?
        } else {
            // A new build: the verifier is most of the start. It begins at once, on an
            // instance of the object of its own, which creates the pinned maps; this one
            // reuses them to fill them meanwhile. Only attaching waits for the programs.
            let (tx, rx) = std::sync::mpsc::channel();
            let verifying = verify_in_background(caps.clone(), pins.clone(), tx)?;
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => bail!("{e}"),
                Err(_) => bail!("the verifier thread ended before loading the classifier"),
            }
            Programs::Verifying(verifying)
        };
        let mut ebpf = load_with(caps, Some(&pins), false)?;
        if !reuse {
            // The hold's programs are a few instructions: verified here, so that new
            // pods are held from the start.
            for (name, _) in HOLD_HOOKS {
                let prog = ebpf.program_mut(name).context("program missing")?;
                <&mut SchedClassifier>::try_from(&mut *prog)?
                    .load()
                    .with_context(|| format!("the verifier rejected {name}"))?;
                pin_program(prog, &pins, name)?;
            }
        }
        pins.write_layout()?;
        let mut adoption = Adoption::default();
        let mut actual = Desired::default();
        let mut endpoint_entries = BTreeMap::new();
        let mut config = Config::default();
        match &found {
            pin::Found::SameVersion => {
                adoption.adopted = true;
                actual.ipcache = maps::read_trie(&mut ebpf, map::IPCACHE, maps::cidr_of)?;
                actual.cidrs = maps::read_trie(&mut ebpf, map::CIDRS, maps::cidr_of)?;
                actual.policy = maps::read_trie(&mut ebpf, map::POLICY, maps::policy_prefix_of)?;
                endpoint_entries = maps::read_endpoints(&mut ebpf)?;
                config = maps::read_config(&mut ebpf)?;
                adoption.adopted_entries = actual.ipcache.len()
                    + actual.cidrs.len()
                    + actual.policy.len()
                    + endpoint_entries.len();
                adoption.epoch = config.epoch;
            }
            pin::Found::OtherVersions(versions) => {
                adoption.replaced_versions = versions.clone();
                let mut ct = maps::conntrack(&mut ebpf)?;
                for v in versions {
                    let old = pin::PinDir::with_version(&pins.root, v);
                    match pin::migrate_conntrack(&old, &mut ct) {
                        Ok(Some(n)) => adoption.migrated_conntrack += n,
                        Ok(None) => {
                            tracing::warn!(version = %v, "conntrack layout changed: connections are judged again")
                        }
                        Err(e) => {
                            tracing::warn!(version = %v, error = ?e, "conntrack not migrated")
                        }
                    }
                }
            }
            pin::Found::Nothing => {}
        }
        let tally = std::sync::Arc::new(tally::Tally::take(&mut ebpf)?);
        Ok(Datapath {
            tally,
            ebpf,
            actual,
            attached: BTreeMap::new(),
            endpoint_entries,
            config,
            pins: Some(pins),
            adoption,
            programs,
            services: services::ServiceAddresses::default(),
            service_hooks: services::ServiceHooks::default(),
            local: local_in::LocalHook::default(),
        })
    }

    /// Writes the addresses of `services` (`NP_SERVICES`, `NP_NODEPORTS`; `node`: the
    /// node's own addresses, for NodePorts), only what changed.
    pub fn sync_services(
        &mut self,
        services: &[netpol_engine::objects::Object],
        node: &[std::net::IpAddr],
    ) -> anyhow::Result<()> {
        let desired = services::addresses(services, node);
        let changed = self.services.sync(&mut self.ebpf, &desired);
        // A VIP that came or went changes how a connection to it is judged (after DNAT
        // or not at all): every connection is judged again, as after a policy change.
        if !matches!(changed, Ok(0)) {
            self.new_epoch()?;
        }
        changed.map(|_| ())
    }

    /// A new map epoch: every tracked connection is judged again at its next packet.
    fn new_epoch(&mut self) -> anyhow::Result<()> {
        let next = Config {
            epoch: self.config.epoch.wrapping_add(1),
            ..self.config
        };
        maps::write_config(&mut self.ebpf, next)?;
        self.config = next;
        Ok(())
    }

    /// The cgroup tree whose sockets' packets `local_in` judges (see `local_in.rs`);
    /// takes effect in the config with the next [`Datapath::set_config`].
    pub fn set_local_cgroup(&mut self, cgroup: Option<std::path::PathBuf>) {
        self.local = local_in::LocalHook::new(cgroup);
    }

    fn local_link(&self) -> Option<std::path::PathBuf> {
        self.pins.as_ref().map(|p| p.root.join(local_in::LINK_PIN))
    }

    /// Attaches the after-DNAT program to every device of `devices` that exists, and
    /// `local_in` to the cgroup; the ones missing are returned (a device's link event
    /// brings the agent back; a cgroup, named by its path, is retried).
    pub fn sync_service_hooks(&mut self, devices: &[String]) -> Vec<String> {
        if devices.is_empty() && !self.local.pending() {
            return vec![];
        }
        let mut wanted: Vec<String> = devices.to_vec();
        wanted.extend(self.local.pending().then(|| local_in::MISSING.to_string()));
        if let Err(e) = self.programs_ready() {
            tracing::error!(error = ?e, "no program for the Service hooks");
            return wanted;
        }
        let link = self.local_link();
        let Programs::Ready(p) = &mut self.programs else {
            unreachable!("ready above")
        };
        let mut missing = self.service_hooks.sync(&mut p.to_remote, devices);
        if let Some(link) = link.filter(|_| self.local.pending()) {
            missing.extend(self.local.sync(&mut p.local_in, &link));
            if !self.local.pending() {
                // Egress to VIPs is judged after DNAT again (LOCAL_UNHOOKED off).
                if let Err(e) = self.set_config(self.config) {
                    tracing::error!(error = ?e, "writing the node's config failed");
                }
            }
        }
        missing
    }

    /// The pinned hold programs, opened anew (for the hold's own thread).
    pub fn hold_programs(&self) -> anyhow::Result<Vec<(TcAttachType, SchedClassifier)>> {
        let pins = self.pins.as_ref().context("no pin directory")?;
        HOLD_HOOKS
            .iter()
            .map(|(name, hook)| {
                let path = pins.program_path(name);
                let prog = SchedClassifier::from_pin(&path)
                    .with_context(|| format!("opening the pinned {}", path.display()))?;
                Ok((*hook, prog))
            })
            .collect()
    }

    pub fn adoption(&self) -> &Adoption {
        &self.adoption
    }

    /// Once every located endpoint runs this version's programs: removes the pinned
    /// directories of the versions it replaced.
    pub fn retire_replaced_versions(&mut self) {
        if self.adoption.replaced_versions.is_empty() {
            return;
        }
        if let Some(p) = &self.pins {
            pin::remove_versions(&p.root, &self.adoption.replaced_versions);
            tracing::info!(versions = ?self.adoption.replaced_versions, "old pinned versions removed");
        }
        self.adoption.replaced_versions.clear();
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn set_config(&mut self, config: Config) -> anyhow::Result<()> {
        // The namespace the agent runs in is the node's (see `local_in.rs`).
        let cookie = local_in::netns_cookie().context("reading the node's namespace cookie")?;
        let unhooked = self.local.unhooked(self.local_link().as_deref());
        let config = Config {
            epoch: self.config.epoch,
            netns_cookie: cookie as u32,
            flags: match unhooked {
                true => config.flags | config_flags::LOCAL_UNHOOKED,
                false => config.flags & !config_flags::LOCAL_UNHOOKED,
            },
            ..config
        };
        maps::write_config(&mut self.ebpf, config)?;
        self.config = config;
        Ok(())
    }

    /// Waits until this build's programs are verified (an upgrade verifies them in the
    /// background; see [`Datapath::open`]); the verifier's error if it rejected them.
    pub fn programs_ready(&mut self) -> anyhow::Result<()> {
        let pins = self.pins.as_ref().context("no pin directory")?;
        self.programs.ready(pins)
    }

    /// Why the verifier rejected this build's programs, once it has (without waiting).
    pub fn verifier_failed(&self) -> Option<&str> {
        self.programs.failed()
    }

    /// Instructions the kernel's verifier went through for each of this build's programs
    /// (empty until they are verified; a kernel before 5.16 does not say).
    pub fn verified_instructions(&self) -> BTreeMap<String, u32> {
        self.programs.verified_instructions()
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
        let written = self.write_maps(desired, locations, &mut stats);
        // 4. Once the maps are complete: a new epoch, so that every tracked connection is
        // judged again at its next packet against them (revocation). Endpoint revisions
        // alone would miss a peer changing identity, and a packet that arrived between
        // steps 2 and 3 was judged against old and new entries at once. A sync that
        // failed half-way bumps it too: connections stamped against its partial state
        // must not stay current while the retries fail.
        if written.is_err() || stats.written + stats.removed > 0 {
            self.new_epoch()?;
        }
        written.map(|()| stats)
    }

    /// Steps 1 to 3 of [`Datapath::sync`], counted into `stats` as they go.
    fn write_maps(
        &mut self,
        desired: &Desired,
        locations: &BTreeMap<PodKey, Location>,
        stats: &mut SyncStats,
    ) -> anyhow::Result<()> {
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
                let mac = loc.mac;
                wanted.insert(loc.ifindex, netpol_common::EndpointEntry { mac, ..*ep });
            }
        }
        // Pods that moved to another veth (recreated), went away or can no longer be
        // trusted to be behind their port: their ports go back on the hold first.
        let stale: Vec<PodKey> = self
            .attached
            .iter()
            .filter(|(pod, a)| {
                !locations
                    .get(*pod)
                    .is_some_and(|l| l.same_port(&a.location))
                    || !desired.endpoints.contains_key(*pod)
            })
            .map(|(pod, _)| pod.clone())
            .collect();
        for pod in stale {
            let a = self.attached.remove(&pod).expect("listed above");
            self.hold(&a);
            stats.held += 1;
        }
        for (ifindex, ep) in &wanted {
            if self.endpoint_entries.get(ifindex) != Some(ep) {
                maps::write_endpoint(&mut self.ebpf, *ifindex, *ep)?;
                self.endpoint_entries.insert(*ifindex, *ep);
                stats.written += 1;
            }
        }
        let attach: Vec<(&PodKey, &Location)> = locations
            .iter()
            .filter(|(pod, _)| {
                desired.endpoints.contains_key(*pod) && !self.attached.contains_key(*pod)
            })
            .collect();
        if !attach.is_empty() {
            self.programs_ready()?;
        }
        for (pod, loc) in attach {
            match self.attach(loc) {
                Ok(()) => {
                    self.attached.insert(
                        pod.clone(),
                        Attachment {
                            location: loc.clone(),
                        },
                    );
                    stats.attached += 1;
                }
                Err(e) => {
                    tracing::warn!(pod = %pod, veth = %loc.ifname, error = ?e, "attach failed; will retry")
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

        // Counter entries for the rules and endpoints now in the maps (the classifier
        // counts their misses apart, so this can come after the entries themselves).
        self.tally.sync(desired)?;

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
        Ok(())
    }

    /// Attaches both programs to a veth. A filter already at our priority and handle
    /// (a previous agent's, maybe of another version) is changed in place, atomically:
    /// the veth is never without a filter.
    fn attach(&mut self, loc: &Location) -> anyhow::Result<()> {
        // clsact may already exist (a previous agent): that is fine.
        let _ = tc::qdisc_add_clsact(&loc.ifname);
        let Programs::Ready(verified) = &mut self.programs else {
            bail!("the programs are not verified yet");
        };
        for (name, hook, prog) in &mut verified.hooks {
            let (name, hook) = (*name, *hook);
            let existing = SchedClassifierLink::attached(
                &loc.ifname,
                hook,
                FILTER_PRIORITY,
                FILTER_HANDLE,
                None,
            )
            .with_context(|| format!("veth {}", loc.ifname))?;
            let id = match prog.attach_to_link(existing) {
                Ok(id) => id,
                Err(_) => {
                    // No filter of ours there yet. Filters of agents from before fixed
                    // handles are named like ours: replace them (a short gap, once).
                    let _ = tc::qdisc_detach_program(&loc.ifname, hook, name);
                    // Netlink filters outlive the agent: if it dies, the last state keeps
                    // being enforced (closed), instead of the hook vanishing (open).
                    prog.attach_with_options(
                        &loc.ifname,
                        hook,
                        TcAttachOptions::Netlink(NlOptions {
                            priority: FILTER_PRIORITY,
                            handle: FILTER_HANDLE,
                            ..Default::default()
                        }),
                    )
                    .with_context(|| format!("attaching {name} to {}", loc.ifname))?
                }
            };
            // The filter is not the process's: aya would detach it when the program is
            // dropped (agent exit, upgrade), which would open the pod.
            std::mem::forget(prog.take_link(id)?);
        }
        Ok(())
    }

    /// Puts a port back on the pod-start hold, in place: never detached, since a port
    /// that is still there (its pod's address gone from it, an impostor's claim) would
    /// pass everything unjudged. A port already gone has nothing to hold.
    fn hold(&mut self, a: &Attachment) {
        let programs = match self.hold_programs() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(veth = %a.location.ifname, error = ?e, "no hold programs; the port keeps its last programs");
                return;
            }
        };
        for (hook, mut prog) in programs {
            let Ok(existing) = SchedClassifierLink::attached(
                &a.location.ifname,
                hook,
                FILTER_PRIORITY,
                FILTER_HANDLE,
                None,
            ) else {
                continue; // the veth is gone (pod deleted)
            };
            match prog.attach_to_link(existing) {
                Ok(id) => match prog.take_link(id) {
                    Ok(link) => std::mem::forget(link),
                    Err(e) => tracing::warn!(veth = %a.location.ifname, error = %e, "hold link"),
                },
                Err(e) => {
                    tracing::warn!(veth = %a.location.ifname, error = %e, "putting the port back on hold")
                }
            }
        }
    }

    /// The per-rule and per-endpoint counters (shared with the API and metrics).
    pub fn tally(&self) -> std::sync::Arc<tally::Tally> {
        self.tally.clone()
    }

    /// Takes the counters map out of the object, for a reader of its own (the API).
    pub fn take_counters(&mut self) -> anyhow::Result<maps::CounterMap> {
        let m = self
            .ebpf
            .take_map(map::COUNTERS)
            .context("counters map missing")?;
        Ok(aya::maps::PerCpuArray::try_from(m)?)
    }
}

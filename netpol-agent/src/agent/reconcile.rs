//! One reconcile step: compile the snapshot for this node, locate its pods among the
//! bridge's ports, bring the datapath there, and say where that left the node (status,
//! what to retry). Written against [`NodeDatapath`], which [`Datapath`] implements, so
//! the step is tested with a fake one; the loop around it (`run`) only waits and
//! publishes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netpol_common::Config;
use netpol_engine::compile::{Compiler, Desired, NodeView};
use netpol_engine::index::{PodKey, Snapshot};
use netpol_engine::objects::Object;

use crate::api::Status;
use crate::datapath::discovery::Ports;
use crate::datapath::local_in;
use crate::datapath::{Adoption, Conflict, Datapath, Located, Location, Switches, SyncStats};

/// What a reconcile step asks of the node's datapath.
pub trait NodeDatapath {
    fn set_config(&mut self, config: Config) -> anyhow::Result<()>;
    /// Writes `desired` and attaches the programs of the pods found at `located`.
    fn sync(
        &mut self,
        desired: &Desired,
        located: &BTreeMap<PodKey, Location>,
    ) -> anyhow::Result<SyncStats>;
    /// Pods with their entry written and their programs attached, and where.
    fn attached_pods(&self) -> BTreeMap<PodKey, Location>;
    fn sync_services(&mut self, services: &[Object], node: &[IpAddr]) -> anyhow::Result<()>;
    /// Hooks the devices after DNAT; returns those not there (yet).
    fn sync_service_hooks(&mut self, devices: &[String]) -> Vec<String>;
    /// Why the verifier refused this build's programs, if it has.
    fn verifier_failed(&self) -> Option<String>;
    /// Waits for this build's programs (the verifier may still be at them).
    fn programs_ready(&mut self) -> anyhow::Result<()>;
    /// Every endpoint runs this build's programs: other versions' pins can go.
    fn retire_replaced_versions(&mut self);
    /// What the datapath took over from a previous agent.
    fn adoption(&self) -> Adoption;
    /// The verifier's instruction count of each program.
    fn verified_instructions(&self) -> BTreeMap<String, u32>;
}

impl NodeDatapath for Datapath {
    fn set_config(&mut self, config: Config) -> anyhow::Result<()> {
        Datapath::set_config(self, config)
    }
    fn sync(
        &mut self,
        desired: &Desired,
        located: &BTreeMap<PodKey, Location>,
    ) -> anyhow::Result<SyncStats> {
        Datapath::sync(self, desired, located)
    }
    fn attached_pods(&self) -> BTreeMap<PodKey, Location> {
        self.attached()
            .map(|(k, l)| (k.clone(), l.clone()))
            .collect()
    }
    fn sync_services(&mut self, services: &[Object], node: &[IpAddr]) -> anyhow::Result<()> {
        Datapath::sync_services(self, services, node)
    }
    fn sync_service_hooks(&mut self, devices: &[String]) -> Vec<String> {
        Datapath::sync_service_hooks(self, devices)
    }
    fn verifier_failed(&self) -> Option<String> {
        Datapath::verifier_failed(self).map(str::to_string)
    }
    fn programs_ready(&mut self) -> anyhow::Result<()> {
        Datapath::programs_ready(self)
    }
    fn retire_replaced_versions(&mut self) {
        Datapath::retire_replaced_versions(self)
    }
    fn adoption(&self) -> Adoption {
        Datapath::adoption(self).clone()
    }
    fn verified_instructions(&self) -> BTreeMap<String, u32> {
        Datapath::verified_instructions(self)
    }
}

/// Backoff of the retry after a failed sync or attach.
pub const RETRY_MIN: Duration = Duration::from_millis(100);
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// The agent's state between steps: what it compiled from, how far it got.
pub struct Agent {
    node: String,
    switches: Switches,
    service_hooks: Vec<String>,
    started: Instant,
    compiler: Compiler,
    view: NodeView,
    syncs: u64,
    /// The ports held for an address conflict as of the last step, and how many
    /// conflicts have appeared in all.
    conflicts: Vec<Conflict>,
    conflicts_seen: u64,
    /// Port → the pod it has been (see `Ports::locate`).
    owners: BTreeMap<u32, PodKey>,
    ready_ms: Option<u64>,
    retry: Option<Duration>,
}

/// Where one step left the node.
pub struct Reconciled {
    /// The agent's status (`metrics_addr` and `wakes` are the loop's to fill in).
    pub status: Status,
    pub desired: Arc<Desired>,
    /// What the sync changed (None: it failed, and the error is logged).
    pub stats: Option<SyncStats>,
    pub compile_time: Duration,
    pub sync_time: Duration,
    /// When to try again: a sync or an attach failed (None: wait for an event).
    pub retry: Option<Duration>,
    /// This step made the agent ready (the first convergence).
    pub became_ready: bool,
}

impl Agent {
    pub fn new(
        node: String,
        switches: Switches,
        service_hooks: Vec<String>,
        host_addrs: Vec<IpAddr>,
        started: Instant,
    ) -> Agent {
        Agent {
            view: NodeView {
                node: Some(node.clone()),
                host_addrs,
            },
            node,
            switches,
            service_hooks,
            started,
            compiler: Compiler::new(),
            syncs: 0,
            conflicts: Vec::new(),
            conflicts_seen: 0,
            owners: BTreeMap::new(),
            ready_ms: None,
            retry: None,
        }
    }

    /// One step. An error is fatal (this build's programs were refused): the previous
    /// programs, if any, keep enforcing what they enforced.
    pub fn reconcile(
        &mut self,
        dp: &mut impl NodeDatapath,
        snapshot: &Snapshot,
        ports: &Ports,
        services: &[Object],
    ) -> anyhow::Result<Reconciled> {
        if ports.bridge_addrs != self.view.host_addrs {
            tracing::info!(addrs = ?ports.bridge_addrs, "the bridge's addresses changed");
            self.view.host_addrs = ports.bridge_addrs.clone();
            let config = self.switches.config(&self.view.host_addrs);
            if let Err(e) = config.and_then(|c| dp.set_config(c)) {
                tracing::error!(error = ?e, "writing the node's addresses failed");
            }
        }
        let t = Instant::now();
        let desired = Arc::new(self.compiler.compile(snapshot, &self.view).clone());
        let compile_time = t.elapsed();
        let wanted: BTreeMap<PodKey, Vec<IpAddr>> = desired
            .endpoints
            .keys()
            .map(|k| (k.clone(), snapshot.pods[k].ips.clone()))
            .collect();
        let Located {
            found: located,
            conflicts,
            owners,
        } = ports.locate(&wanted, &dp.attached_pods(), &self.owners);
        self.owners = owners;
        for c in conflicts.iter().filter(|c| !self.conflicts.contains(c)) {
            self.conflicts_seen += 1;
            tracing::warn!(port = %c.port, pods = ?c.pods, why = %c.why, "address conflict: the port stays held (drops) until it is resolved");
        }
        self.conflicts = conflicts;
        let t = Instant::now();
        let stats = match dp.sync(&desired, &located) {
            Ok(stats) => {
                if stats != SyncStats::default() {
                    tracing::info!(
                        written = stats.written,
                        removed = stats.removed,
                        attached = stats.attached,
                        held = stats.held,
                        "datapath synced"
                    );
                }
                Some(stats)
            }
            Err(e) => {
                tracing::error!(error = ?e, "datapath sync failed; isolated pods keep their last state");
                None
            }
        };
        let sync_time = t.elapsed();
        if let Err(e) = dp.sync_services(services, &ports.node_addrs) {
            tracing::error!(error = ?e, "writing Service addresses failed");
        }
        // The named devices and every way off the node there is now.
        let hook_devices: Vec<String> = self
            .service_hooks
            .iter()
            .chain(&ports.exits)
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let hooks_missing = dp.sync_service_hooks(&hook_devices);
        if let Some(e) = dp.verifier_failed() {
            anyhow::bail!("{e}");
        }
        self.syncs += 1;
        // The heap a sync's compile and a re-list's parse freed goes back to the system;
        // glibc otherwise keeps it, and the agent's RSS would be its peak, not its state.
        // SAFETY: malloc_trim only releases free memory of the allocator.
        unsafe { libc::malloc_trim(0) };
        let attached = dp.attached_pods();
        // Located but not attached, or a hook device there but not hooked: a failure to
        // retry. A pod not located yet waits for its port or address event, a hook
        // device for its link event, a pod without an address for the source.
        let failed = stats.is_none()
            || located.keys().any(|k| !attached.contains_key(k))
            || hooks_missing
                .iter()
                .any(|d| ports.devices.contains(d) || d == local_in::MISSING);
        self.retry = failed.then(|| self.retry.map_or(RETRY_MIN, |r| (r * 2).min(RETRY_MAX)));
        let pending: Vec<String> = wanted
            .keys()
            .filter(|k| !attached.contains_key(*k))
            .cloned()
            .collect();
        let converged = pending.is_empty() && hooks_missing.is_empty();
        let mut became_ready = false;
        if converged && self.ready_ms.is_none() {
            // Ready means this build's programs passed the verifier, pods or none.
            dp.programs_ready()?;
            let ms = self.started.elapsed().as_millis() as u64;
            self.ready_ms = Some(ms);
            became_ready = true;
            // Every located endpoint runs this version's programs now.
            dp.retire_replaced_versions();
            tracing::info!(
                ready_ms = ms,
                "agent ready: the datapath enforces the cluster state"
            );
        }
        let adoption = dp.adoption();
        let status = Status {
            node: self.node.clone(),
            digest: snapshot.digest.clone(),
            converged,
            endpoints: attached.len(),
            pending,
            policies: snapshot.policies.len(),
            identities: snapshot.identities.len(),
            policy_entries: desired.policy.len(),
            invalid: snapshot.invalid.clone(),
            syncs: self.syncs,
            ready_ms: self.ready_ms,
            adopted: adoption.adopted,
            migrated_conntrack: adoption.migrated_conntrack,
            verified_instructions: dp.verified_instructions(),
            conflicts: self.conflicts.clone(),
            conflicts_seen: self.conflicts_seen,
            ..Status::default()
        };
        Ok(Reconciled {
            status,
            desired,
            stats,
            compile_time,
            sync_time,
            retry: self.retry,
            became_ready,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netpol_engine::index::Index;
    use netpol_engine::objects::ClusterState;

    /// A datapath that records what it was asked and fails on demand.
    #[derive(Default)]
    struct FakeDatapath {
        attached: BTreeMap<PodKey, Location>,
        synced: Vec<BTreeMap<PodKey, Location>>,
        fail_sync: bool,
        /// Pods whose attach fails (the sync itself succeeds).
        refuse: Vec<PodKey>,
        verifier: Option<String>,
        retired: usize,
        missing_hooks: Vec<String>,
    }

    impl NodeDatapath for FakeDatapath {
        fn set_config(&mut self, _: Config) -> anyhow::Result<()> {
            Ok(())
        }
        fn sync(
            &mut self,
            _: &Desired,
            located: &BTreeMap<PodKey, Location>,
        ) -> anyhow::Result<SyncStats> {
            self.synced.push(located.clone());
            if self.fail_sync {
                anyhow::bail!("map full");
            }
            let before = self.attached.len();
            self.attached = located
                .iter()
                .filter(|(k, _)| !self.refuse.contains(k))
                .map(|(k, l)| (k.clone(), l.clone()))
                .collect();
            Ok(SyncStats {
                attached: self.attached.len().saturating_sub(before),
                ..SyncStats::default()
            })
        }
        fn attached_pods(&self) -> BTreeMap<PodKey, Location> {
            self.attached.clone()
        }
        fn sync_services(&mut self, _: &[Object], _: &[IpAddr]) -> anyhow::Result<()> {
            Ok(())
        }
        fn sync_service_hooks(&mut self, devices: &[String]) -> Vec<String> {
            devices
                .iter()
                .filter(|d| self.missing_hooks.contains(d))
                .cloned()
                .collect()
        }
        fn verifier_failed(&self) -> Option<String> {
            self.verifier.clone()
        }
        fn programs_ready(&mut self) -> anyhow::Result<()> {
            Ok(())
        }
        fn retire_replaced_versions(&mut self) {
            self.retired += 1;
        }
        fn adoption(&self) -> Adoption {
            Adoption::default()
        }
        fn verified_instructions(&self) -> BTreeMap<String, u32> {
            BTreeMap::new()
        }
    }

    const CLUSTER: &str = "kind: Namespace\nmetadata: {name: x}\n---\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec: {nodeName: n1, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.0.0.1}\n---\nkind: Pod\nmetadata: {name: b, namespace: x}\nspec: {nodeName: n1, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.0.0.2}\n---\nkind: Pod\nmetadata: {name: elsewhere, namespace: x}\nspec: {nodeName: n2, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.0.1.1}\n";

    fn snapshot() -> Snapshot {
        Index::new().reset(&ClusterState::from_text(CLUSTER).unwrap())
    }

    /// The bridge's ports holding one address each, ifindex 10, 11, ...
    fn ports(addrs: &[&str]) -> Ports {
        let one: Vec<&[&str]> = addrs.iter().map(std::slice::from_ref).collect();
        crate::datapath::locate::tests::ports(&one)
    }

    fn agent(hooks: &[&str]) -> Agent {
        Agent::new(
            "n1".into(),
            Switches::default(),
            hooks.iter().map(|h| h.to_string()).collect(),
            vec![],
            Instant::now(),
        )
    }

    #[test]
    fn local_pods_located_become_attached_and_the_agent_ready_once() {
        let (mut agent, mut dp, snap) = (agent(&[]), FakeDatapath::default(), snapshot());
        let first = agent
            .reconcile(&mut dp, &snap, &ports(&["10.0.0.1"]), &[])
            .unwrap();
        // b has no port yet: pending, not a failure (its port event will come).
        assert_eq!(first.status.pending, vec!["x/b".to_string()]);
        assert!(!first.status.converged && !first.became_ready);
        assert_eq!(first.retry, None);
        assert_eq!(first.status.endpoints, 1);
        // Only this node's pods are endpoints.
        assert_eq!(first.desired.endpoints.len(), 2);
        let second = agent
            .reconcile(&mut dp, &snap, &ports(&["10.0.0.1", "10.0.0.2"]), &[])
            .unwrap();
        assert!(second.status.converged && second.became_ready);
        assert!(second.status.ready_ms.is_some());
        assert_eq!(
            dp.retired, 1,
            "old versions go once every endpoint runs ours"
        );
        let third = agent
            .reconcile(&mut dp, &snap, &ports(&["10.0.0.1", "10.0.0.2"]), &[])
            .unwrap();
        assert!(!third.became_ready, "ready once");
        assert_eq!(dp.retired, 1);
        assert_eq!(third.status.syncs, 3);
    }

    #[test]
    fn a_failed_sync_or_attach_is_retried_with_a_doubling_backoff() {
        let (mut agent, snap) = (agent(&[]), snapshot());
        let mut dp = FakeDatapath {
            fail_sync: true,
            ..FakeDatapath::default()
        };
        let all = ports(&["10.0.0.1", "10.0.0.2"]);
        let mut waits = vec![];
        for _ in 0..8 {
            let r = agent.reconcile(&mut dp, &snap, &all, &[]).unwrap();
            assert!(r.stats.is_none() && !r.status.converged);
            waits.push(r.retry.unwrap());
        }
        assert_eq!(waits[0], RETRY_MIN);
        assert_eq!(waits[1], RETRY_MIN * 2);
        assert_eq!(*waits.last().unwrap(), RETRY_MAX);
        // The sync works again, but one pod's attach fails: still a retry.
        dp.fail_sync = false;
        dp.refuse = vec!["x/b".into()];
        let r = agent.reconcile(&mut dp, &snap, &all, &[]).unwrap();
        assert!(r.retry.is_some() && !r.status.converged);
        // All attached: no retry, and the backoff starts over next time.
        dp.refuse.clear();
        let r = agent.reconcile(&mut dp, &snap, &all, &[]).unwrap();
        assert_eq!(r.retry, None);
        assert!(r.status.converged);
        dp.fail_sync = true;
        let r = agent.reconcile(&mut dp, &snap, &all, &[]).unwrap();
        assert_eq!(r.retry, Some(RETRY_MIN));
    }

    #[test]
    fn a_missing_service_hook_device_waits_and_a_present_unhooked_one_is_retried() {
        let (mut agent, snap) = (agent(&["flannel.1"]), snapshot());
        let mut dp = FakeDatapath {
            missing_hooks: vec!["flannel.1".into()],
            ..FakeDatapath::default()
        };
        let mut p = ports(&["10.0.0.1", "10.0.0.2"]);
        let r = agent.reconcile(&mut dp, &snap, &p, &[]).unwrap();
        assert!(!r.status.converged, "not converged without the hook");
        assert_eq!(
            r.retry, None,
            "the device does not exist: its link event wakes us"
        );
        p.devices.insert("flannel.1".into());
        let r = agent.reconcile(&mut dp, &snap, &p, &[]).unwrap();
        assert!(
            r.retry.is_some(),
            "the device exists but is not hooked: retry"
        );
        dp.missing_hooks.clear();
        let r = agent.reconcile(&mut dp, &snap, &p, &[]).unwrap();
        assert!(r.status.converged && r.became_ready);
    }

    #[test]
    fn a_refused_build_stops_the_agent() {
        let (mut agent, snap) = (agent(&[]), snapshot());
        let mut dp = FakeDatapath {
            verifier: Some("R1 invalid mem access".into()),
            ..FakeDatapath::default()
        };
        let err = agent
            .reconcile(&mut dp, &snap, &ports(&["10.0.0.1"]), &[])
            .err()
            .expect("fatal");
        assert!(err.to_string().contains("invalid mem access"));
    }
}

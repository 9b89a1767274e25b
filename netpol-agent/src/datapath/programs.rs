//! Loading the classifier: the embedded object, its maps pinned and adopted, and a new
//! build's programs verified in the background while the maps are filled.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use aya::programs::tc::TcAttachType;
use aya::programs::{CgroupSkb, CgroupSkbAttachType, Program, SchedClassifier};
use aya::{Ebpf, EbpfLoader};
use netpol_common::{map, program};

use super::{pin, Capacities, HOOKS};

/// The classifier object, built by build.rs.
pub static CLASSIFIER: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol-ebpf"));

/// Loads the classifier with the given capacities (programs loaded, not attached).
pub fn load(caps: &Capacities) -> anyhow::Result<Ebpf> {
    load_with(caps, None, true)
}

/// Loads the classifier with its maps pinned under `pins` (reused when already there);
/// the programs are loaded (verified) only if `programs`.
pub fn load_with(
    caps: &Capacities,
    pins: Option<&pin::PinDir>,
    programs: bool,
) -> anyhow::Result<Ebpf> {
    if CLASSIFIER.is_empty() {
        bail!("this netpol was built with AYA_BUILD_SKIP: it carries no classifier; rebuild without it");
    }
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, std::path::PathBuf)> = pins
        .map(|p| {
            pin::PINNED_MAPS
                .iter()
                .map(|name| (*name, p.map_path(name)))
                .collect()
        })
        .unwrap_or_default();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .map_max_entries(map::ENDPOINTS, caps.endpoints)
        .map_max_entries(map::ENDPOINT_COUNTERS, caps.endpoints)
        .map_max_entries(map::IPCACHE, caps.ipcache)
        .map_max_entries(map::CIDRS, caps.cidrs)
        .map_max_entries(map::POLICY, caps.policy)
        .map_max_entries(map::CONNTRACK, caps.conntrack)
        .map_max_entries(map::FRAGMENTS, caps.fragments)
        .load(CLASSIFIER)
        .context("loading the classifier (needs root, BTF and bpffs; run `cargo xtask setup`)")?;
    if !programs {
        return Ok(ebpf);
    }
    for name in VERIFIED_IN_BACKGROUND.concat() {
        verify(ebpf.program_mut(name).context("program missing")?, name)?;
    }
    Ok(ebpf)
}

/// Loads (verifies) a program of the object: the TC classifiers and the cgroup hook.
fn verify(prog: &mut Program, name: &str) -> anyhow::Result<()> {
    let loaded = match prog {
        Program::CgroupSkb(p) => p.load(),
        p => <&mut SchedClassifier>::try_from(p)?.load(),
    };
    loaded.with_context(|| format!("the verifier rejected {name}"))
}

/// The programs a new build must pass through the verifier before it can attach them:
/// most of an upgrade's time (see [`Datapath::open`]). One thread per group: `from_pod`
/// alone takes about as long as the others together, and these machines have 2 cores.
const VERIFIED_IN_BACKGROUND: [&[&str]; 2] = [
    &[program::FROM_POD],
    &[program::TO_POD, program::TO_REMOTE, program::LOCAL_IN],
];

/// Loads the object with its maps pinned under `pins` (created there if missing),
/// reports that on `maps_pinned`, then verifies the programs of a new build and pins
/// them, in parallel, while the caller fills the maps through an instance of its own.
pub(super) fn verify_in_background(
    caps: Capacities,
    pins: pin::PinDir,
    maps_pinned: std::sync::mpsc::Sender<Result<(), String>>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    let handle = std::thread::Builder::new()
        .name("verifier".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            let loaded = load_with(&caps, Some(&pins), false);
            let _ = maps_pinned.send(loaded.as_ref().map(drop).map_err(|e| format!("{e:#}")));
            let mut ebpf = loaded?;
            let mut programs: BTreeMap<&str, &mut aya::programs::Program> =
                ebpf.programs_mut().collect();
            let mut groups = Vec::new();
            for names in VERIFIED_IN_BACKGROUND {
                let mut group = Vec::new();
                for name in names {
                    let prog = programs.remove(name).context("program missing")?;
                    group.push((*name, prog));
                }
                groups.push(group);
            }
            std::thread::scope(|s| {
                let threads: Vec<_> = groups
                    .into_iter()
                    .map(|group| {
                        let pins = &pins;
                        s.spawn(move || -> anyhow::Result<()> {
                            for (name, prog) in group {
                                let t = std::time::Instant::now();
                                verify(prog, name)?;
                                let ms = t.elapsed().as_millis() as u64;
                                tracing::debug!(program = name, ms, "program verified");
                                pin_program(prog, pins, name)?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                threads
                    .into_iter()
                    .try_for_each(|t| t.join().expect("a verifier thread panicked"))
            })?;
            pins.write_build(&build_id())?;
            let ms = started.elapsed().as_millis() as u64;
            tracing::info!(ms, "the new build's programs are verified and pinned");
            Ok(())
        })
        .context("starting the verifier thread")?;
    Ok(handle)
}

pub(super) fn pin_program(
    prog: &mut Program,
    pins: &pin::PinDir,
    name: &str,
) -> anyhow::Result<()> {
    let path = pins.program_path(name);
    let _ = std::fs::remove_file(&path);
    prog.pin(&path)
        .with_context(|| format!("pinning {name} at {}", path.display()))
}

/// What the kernel counted for one program while `kernel.bpf_stats_enabled` was on:
/// its runs (packets) and the nanoseconds they took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProgramRuns {
    pub runs: u64,
    pub run_time_ns: u64,
}

impl ProgramRuns {
    /// Mean nanoseconds per run (None: never counted).
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.run_time_ns as f64 / self.runs as f64)
    }
}

/// The kernel's run counts of the classifier pinned under `pins`, per program that has
/// any: the kernel counts only while `kernel.bpf_stats_enabled` is on (or a
/// `BPF_ENABLE_STATS` descriptor is open), so this is empty on a node that never did.
pub fn program_runs(pins: &pin::PinDir) -> BTreeMap<String, ProgramRuns> {
    [
        program::FROM_POD,
        program::TO_POD,
        program::TO_REMOTE,
        program::LOCAL_IN,
    ]
    .into_iter()
    .filter_map(|name| {
        let info = aya::programs::ProgramInfo::from_pin(pins.program_path(name)).ok()?;
        let runs = ProgramRuns {
            runs: info.run_count(),
            run_time_ns: info.run_time().as_nanos() as u64,
        };
        (runs.runs > 0).then(|| (name.to_string(), runs))
    })
    .collect()
}

/// The programs the filters run, opened from their pins once verified.
pub(super) enum Programs {
    Ready(Box<Verified>),
    /// A new build's, still in the verifier (see `verify_in_background`).
    Verifying(std::thread::JoinHandle<anyhow::Result<()>>),
    /// The verifier rejected them: nothing can be attached (the previous agent's
    /// programs, if any, keep enforcing).
    Failed(String),
}

pub(super) struct Verified {
    /// The pods' veths' (`HOOKS`).
    pub(super) hooks: Vec<(&'static str, TcAttachType, SchedClassifier)>,
    /// The Service hooks' (after DNAT).
    pub(super) to_remote: SchedClassifier,
    /// The node cgroup tree's, on local delivery (after DNAT to the node itself).
    pub(super) local_in: CgroupSkb,
}

impl Programs {
    /// Why the verifier rejected this build's programs, once it has.
    pub(super) fn failed(&self) -> Option<&str> {
        match self {
            Programs::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// Instructions the verifier went through for each program (empty until verified).
    pub(super) fn verified_instructions(&self) -> BTreeMap<String, u32> {
        let Programs::Ready(p) = self else {
            return BTreeMap::new();
        };
        p.hooks
            .iter()
            .map(|(name, _, prog)| (*name, prog.info()))
            .chain([
                (program::TO_REMOTE, p.to_remote.info()),
                (program::LOCAL_IN, p.local_in.info()),
            ])
            .filter_map(|(name, info)| {
                let n = info.ok()?.verified_instruction_count()?;
                Some((name.to_string(), n))
            })
            .collect()
    }

    pub(super) fn open(pins: &pin::PinDir) -> anyhow::Result<Programs> {
        let open = |name: &str| {
            let path = pins.program_path(name);
            SchedClassifier::from_pin(&path)
                .with_context(|| format!("opening the pinned {}", path.display()))
        };
        let mut hooks = Vec::new();
        for (name, hook) in HOOKS {
            hooks.push((name, hook, open(name)?));
        }
        let path = pins.program_path(program::LOCAL_IN);
        let local_in = CgroupSkb::from_pin(&path, CgroupSkbAttachType::Ingress)
            .with_context(|| format!("opening the pinned {}", path.display()))?;
        Ok(Programs::Ready(Box::new(Verified {
            hooks,
            to_remote: open(program::TO_REMOTE)?,
            local_in,
        })))
    }

    /// Waits for the verifier if it is still at work.
    pub(super) fn ready(&mut self, pins: &pin::PinDir) -> anyhow::Result<()> {
        *self = match std::mem::replace(self, Programs::Failed(String::new())) {
            Programs::Verifying(handle) => handle
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the verifier thread panicked")))
                .and_then(|()| Programs::open(pins))
                .unwrap_or_else(|e| Programs::Failed(format!("{e:#}"))),
            other => other,
        };
        match self {
            Programs::Failed(e) => bail!("{e}"),
            _ => Ok(()),
        }
    }
}

/// Identifies the embedded classifier (a digest of its bytes).
pub fn build_id() -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(CLASSIFIER);
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

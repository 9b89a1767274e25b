//! Control plane: the compile benchmark's numbers (read from its JSON), and a real agent
//! started on a synthetic cluster of each size: its first sync and its memory. The same
//! node's compile and map writes are also timed in process.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use netpol_agent::api::Status;
use netpol_agent::datapath::{load, maps, Capacities};
use netpol_agent::source::{dir, Object};
use netpol_common::map;
use netpol_engine::compile::{Compiler, NodeView};
use netpol_engine::index::Index;
use netpol_tests::alloc::{self, mib};
use netpol_tests::synthetic::{self, Shape};

use crate::plan::Plan;
use crate::report::{AgentRun, Control, Heap};
use crate::testbed::memory_mib;
use crate::Progress;

/// The synthetic pods of `node-0` (1 in 100) are this node's.
const NODE: &str = "node-0";

pub fn run(
    plan: &Plan,
    compile_json: Option<&Path>,
    progress: &mut Progress,
) -> anyhow::Result<Control> {
    let compile = match compile_json {
        Some(p) => Some(
            serde_json::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("parsing {}", p.display()))?,
        ),
        None => None,
    };
    let mut agents = Vec::new();
    for &pods in &plan.agent_pods {
        progress.step(
            &format!("control: an agent on {pods} synthetic pods"),
            3.0 + pods as f64 / 5_000.0,
        );
        agents.push(agent_run(pods)?);
    }
    let mut kube = Vec::new();
    for &pods in &plan.kube_pods {
        progress.step(
            &format!(
                "control: an agent on the kube source, {pods} pods listed and then each modified"
            ),
            5.0 + pods as f64 / 2_000.0,
        );
        kube.push(crate::control_kube::kube_run(pods)?);
    }
    Ok(Control {
        compile,
        agents,
        kube,
    })
}

/// What an agent run leaves behind, removed on drop: its process, network namespace,
/// bpffs and files.
pub(crate) struct Scratch {
    netns: String,
    dir: std::path::PathBuf,
    pins: std::path::PathBuf,
    child: Option<Child>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        if let Ok(p) = std::ffi::CString::new(self.pins.as_os_str().as_encoded_bytes()) {
            // SAFETY: a plain syscall on a valid C string.
            unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| shown.clone())?;
    if !out.status.success() {
        bail!("{shown}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn yaml_of(objects: &[Object]) -> anyhow::Result<String> {
    let mut out = String::new();
    for o in objects {
        out.push_str(&match o {
            Object::Namespace(x) => serde_yaml::to_string(x)?,
            Object::Pod(x) => serde_yaml::to_string(x)?,
            Object::NetworkPolicy(x) => serde_yaml::to_string(x)?,
            _ => continue,
        });
        out.push_str("---\n");
    }
    Ok(out)
}

/// A node for one agent: its network namespace (a `cni0` bridge, no pods), a bpffs and
/// a scratch directory, all removed on drop with the agent.
pub(crate) fn node(tag: &str) -> anyhow::Result<Scratch> {
    let dir = std::env::temp_dir().join(format!("netpol-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pins = dir.join("bpffs");
    std::fs::create_dir_all(&pins)?;
    let scratch = Scratch {
        netns: format!("b{tag}{}", std::process::id() % 10_000),
        dir,
        pins: pins.clone(),
        child: None,
    };
    let _ = Command::new("ip")
        .args(["netns", "del", &scratch.netns])
        .stderr(Stdio::null())
        .status();
    sh(Command::new("ip").args(["netns", "add", &scratch.netns]))?;
    for args in [
        "link set lo up",
        "link add cni0 type bridge",
        "addr add 10.244.0.1/24 dev cni0",
        "link set cni0 up",
    ] {
        sh(Command::new("ip")
            .args(["-n", &scratch.netns])
            .args(args.split(' ')))?;
    }
    sh(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&pins))?;
    Ok(scratch)
}

impl Scratch {
    pub(crate) fn netns(&self) -> &str {
        &self.netns
    }

    pub(crate) fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }

    /// Starts the release agent as node `node-0` on `source` (`dir:PATH`, `kube`), with
    /// `env` added; its pid.
    pub(crate) fn start_agent(
        &mut self,
        source: &str,
        env: &[(&str, &Path)],
    ) -> anyhow::Result<u32> {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.netns,
            crate::NETPOL,
            "agent",
            "--source",
            source,
        ])
        .args(["--node", NODE, "--bridge", "cni0", "--metrics-addr", "off"])
        .arg("--no-pod-start-hold")
        .arg("--api-socket")
        .arg(self.path("agent.sock"))
        .arg("--pin-root")
        .arg(&self.pins)
        // As a DaemonSet runs it: with RUST_BACKTRACE set, every logged error carries a
        // symbolised backtrace (25 MiB of debug info read at 10,000 pods).
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(self.path("agent.log"))?);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("starting the agent")?;
        let pid = child.id();
        self.child = Some(child);
        Ok(pid)
    }

    /// The agent's status once `done` holds for it (read every 10 ms; the agent never
    /// converges here, its local pods having no veths).
    pub(crate) fn status_when(
        &self,
        what: &str,
        done: impl Fn(&Status) -> bool,
    ) -> anyhow::Result<Status> {
        let sock = self.path("agent.sock");
        let started = Instant::now();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            loop {
                if let Ok(s) = netpol_agent::api::client::status(&sock).await {
                    if done(&s) {
                        return Ok(s);
                    }
                }
                if started.elapsed() > Duration::from_secs(300) {
                    bail!(
                        "the agent did not reach {what} within 300 s; {}",
                        self.path("agent.log").display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    }
}

fn agent_run(pods: usize) -> anyhow::Result<AgentRun> {
    let before_objects = alloc::in_use();
    let objects = synthetic::cluster(&Shape::pods(pods));
    let objects_bytes = alloc::in_use() - before_objects;
    let mut scratch = node("ctl")?;
    let manifests = scratch.path("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("cluster.yaml"), yaml_of(&objects)?)?;
    let digest = dir::current_digest(std::slice::from_ref(&manifests));
    let started = Instant::now();
    let pid = scratch.start_agent(&format!("dir:{}", manifests.display()), &[])?;
    let status = scratch.status_when(&format!("a sync of {pods} pods"), |s| {
        s.digest == digest && s.syncs >= 1
    })?;
    let first_sync_ms = started.elapsed().as_secs_f64() * 1e3;
    let (rss, hwm) = memory_mib(pid)?;

    // The same node in process: index + compile, then every entry written once.
    let state = netpol_engine::objects::ClusterState {
        objects,
        errors: vec![],
        digest: String::new(),
    };
    let t = Instant::now();
    let base = alloc::reset_peak();
    let mut index = Index::new();
    let snap = index.reset(&state);
    let index_bytes = alloc::in_use() - base;
    let view = NodeView {
        node: Some(NODE.into()),
        host_addrs: vec![],
    };
    let mut compiler = Compiler::new();
    let desired = compiler.compile(&snap, &view).clone();
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let heap = Heap {
        objects_mib: mib(objects_bytes),
        index_mib: mib(index_bytes),
        // The compiler's own state and the desired maps it hands over (the agent keeps both).
        compile_mib: mib(alloc::in_use() - base - index_bytes),
        peak_mib: mib(alloc::peak() - base),
    };
    let t = Instant::now();
    let mut ebpf = load(&Capacities::default()).context("loading the classifier")?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let none = Default::default();
    maps::upsert_diff(
        &mut ebpf,
        map::IPCACHE,
        &none,
        &desired.ipcache,
        maps::cidr_key,
    )?;
    let none = Default::default();
    maps::upsert_diff(&mut ebpf, map::CIDRS, &none, &desired.cidrs, maps::cidr_key)?;
    let none = Default::default();
    maps::upsert_diff(
        &mut ebpf,
        map::POLICY,
        &none,
        &desired.policy,
        maps::policy_key,
    )?;
    let sync_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(scratch);
    Ok(AgentRun {
        pods,
        local_pods: status.pending.len() + status.endpoints,
        policies: status.policies,
        identities: status.identities,
        policy_entries: status.policy_entries,
        first_sync_ms,
        rss_mib: rss,
        hwm_mib: hwm,
        compile_ms,
        sync_ms,
        map_entries: desired.len(),
        load_ms,
        heap,
    })
}

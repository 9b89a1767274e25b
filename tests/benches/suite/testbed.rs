//! Where scenarios run. The lab (network namespaces on this machine, `netpol lab`) is
//! driven here; a kind cluster (`cargo xtask kind --bench`) shares the plan and its
//! policy sets: its datapath scenario runs in the cluster (kind.rs), and the scenarios
//! that need a lab are skipped there, which the report's notes say.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use netpol_tests::lab::{self, Enforcer, LabStatus, PodStatus};

use crate::report::DeniedCheck;

pub enum Testbed {
    Lab,
    Kind,
}

impl Testbed {
    pub fn parse(s: &str) -> anyhow::Result<Testbed> {
        match s {
            "lab" => Ok(Testbed::Lab),
            "kind" => Ok(Testbed::Kind),
            _ => bail!("--testbed {s}: lab or kind"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Testbed::Lab => "lab",
            Testbed::Kind => "kind",
        }
    }

    /// A lab running `enforcer` over `manifests` (file name, content).
    pub fn up(
        &self,
        tag: &str,
        enforcer: Enforcer,
        nodes: u32,
        manifests: &[(&str, &str)],
        agent_args: &[&str],
    ) -> anyhow::Result<LabRun> {
        if let Testbed::Kind = self {
            bail!(
                "a lab on the kind testbed: the kind datapath scenario runs in the cluster \
                 (kind.rs); the scenarios that need a lab are lab-only (cargo xtask bench)"
            );
        }
        LabRun::up(tag, enforcer, nodes, manifests, agent_args)
    }
}

/// One lab and its manifest directory; taken down when dropped.
pub struct LabRun {
    pub name: String,
    pub dir: PathBuf,
    pub enforcer: Enforcer,
}

impl LabRun {
    fn up(
        tag: &str,
        enforcer: Enforcer,
        nodes: u32,
        manifests: &[(&str, &str)],
        agent_args: &[&str],
    ) -> anyhow::Result<LabRun> {
        // Lab names: at most 12 of [a-z0-9].
        let name = format!("b{tag}{}", std::process::id() % 10_000);
        let dir = std::env::temp_dir().join(format!("netpol-bench-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let run = LabRun {
            name,
            dir,
            enforcer,
        };
        for (file, text) in manifests {
            run.write(file, text)?;
        }
        let out = std::process::Command::new(crate::NETPOL)
            .args(["lab", "up", "--name", &run.name, "--manifests"])
            .arg(&run.dir)
            .args([
                "--nodes",
                &nodes.to_string(),
                "--enforcer",
                enforcer.as_str(),
            ])
            .args(agent_args.iter().map(|a| format!("--agent-arg={a}")))
            .output()
            .context("running netpol lab up")?;
        if !out.status.success() {
            bail!(
                "netpol lab up --name {} ({}): {}",
                run.name,
                enforcer.as_str(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(run)
    }

    pub fn write(&self, file: &str, text: &str) -> anyhow::Result<()> {
        std::fs::write(self.dir.join(file), text)
            .with_context(|| format!("writing {}", self.dir.join(file).display()))
    }

    /// Until the enforcers enforce what the manifests and the agents' source hold.
    pub fn wait(&self) -> anyhow::Result<()> {
        lab::wait(&self.name, Duration::from_secs(300))
    }

    /// The directory the enforcers' `dir` source watches (the lab's API server): a file
    /// written here reaches them as a watch event would.
    pub fn source_dir(&self) -> PathBuf {
        PathBuf::from(lab::LAB_ROOT)
            .join(&self.name)
            .join("cluster")
    }

    pub fn status(&self) -> anyhow::Result<LabStatus> {
        lab::status(&self.name)
    }

    pub fn pod(&self, key: &str) -> anyhow::Result<PodStatus> {
        self.status()?
            .pods
            .into_iter()
            .find(|p| p.key() == key)
            .with_context(|| format!("lab {} has no pod {key}", self.name))
    }

    pub fn address(&self, key: &str, port: u16) -> anyhow::Result<SocketAddr> {
        let pod = self.pod(key)?;
        let ip = pod.ips.first().context("pod without an address")?;
        Ok(SocketAddr::new(ip.parse()?, port))
    }

    /// Pins every process of pod `key` (its lab server) to `cpu`.
    pub fn pin_pod(&self, key: &str, cpu: usize) -> anyhow::Result<()> {
        let pod = self.pod(key)?;
        let out = std::process::Command::new("ip")
            .args(["netns", "pids", &pod.netns])
            .output()?;
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let ok = std::process::Command::new("taskset")
                .args(["-a", "-p", "-c", &cpu.to_string(), pid])
                .stdout(std::process::Stdio::null())
                .status()?
                .success();
            if !ok {
                bail!("taskset -p {pid} (pod {key}) failed");
            }
        }
        Ok(())
    }

    /// Lets pod `key` open connections as fast as a benchmark does: TIME_WAIT sockets
    /// reused (RFC 1323 timestamps keep it safe) and the whole ephemeral port range, so
    /// that repeated connection-rate runs do not exhaust its ports.
    pub fn tune_client(&self, key: &str) -> anyhow::Result<()> {
        let pod = self.pod(key)?;
        let ok = std::process::Command::new("ip")
            .args(["netns", "exec", &pod.netns, "sysctl", "-qw"])
            .args([
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=1024 65535",
            ])
            .status()?
            .success();
        if !ok {
            bail!("sysctl in pod {key} failed");
        }
        Ok(())
    }

    /// Fails, with the enforcer's counters and log, unless `from` connects to `to`:80.
    pub fn expect_connects(&self, from: &str, to: &str) -> anyhow::Result<()> {
        let netns = self.pod(from)?.netns;
        let addr = self.address(to, 80)?;
        let result = until_outcome(
            &netns,
            addr,
            true,
            Instant::now(),
            Duration::from_millis(200),
            1,
            Duration::from_secs(5),
        );
        if let Err(e) = result {
            let counters = std::process::Command::new(crate::NETPOL)
                .args(["counters", "--lab", &self.name])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let log = std::fs::read_to_string(
                PathBuf::from(lab::LAB_ROOT)
                    .join(&self.name)
                    .join("agent.log"),
            )
            .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            bail!(
                "{} lab {}: {from} cannot reach {to}: {e:#}\ncounters:\n{counters}\nagent log (last lines, newest first):\n{}",
                self.enforcer.as_str(),
                self.name,
                tail.join("\n")
            );
        }
        Ok(())
    }

    pub fn agent_pids(&self) -> anyhow::Result<Vec<u32>> {
        Ok(self
            .status()?
            .nodes
            .iter()
            .filter_map(|n| n.agent_pid)
            .collect())
    }
}

impl Drop for LabRun {
    fn drop(&mut self) {
        if let Err(e) = lab::down(&self.name) {
            eprintln!("bench: taking lab {} down: {e:#}", self.name);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The CPUs this process may run on, as it started (before any pinning: a pinned thread's
/// own mask would be one CPU, and the next run would pin the client away from the
/// servers); a container's cpuset is honoured.
fn allowed_cpus() -> &'static libc::cpu_set_t {
    static ALLOWED: std::sync::OnceLock<libc::cpu_set_t> = std::sync::OnceLock::new();
    ALLOWED.get_or_init(|| {
        // SAFETY: a cpu_set_t on the stack, filled by the kernel for this process.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                libc::CPU_SET(0, &mut set);
            }
            set
        }
    })
}

/// The CPU request/response runs are pinned to: the last one allowed (the first takes
/// more of the machine's interrupts). Call it before pinning anything.
pub fn measure_cpu() -> usize {
    let set = allowed_cpus();
    // SAFETY: CPU_ISSET reads the set.
    (0..libc::CPU_SETSIZE as usize)
        .rev()
        .find(|c| unsafe { libc::CPU_ISSET(*c, set) })
        .unwrap_or(0)
}

/// Pins the calling thread (and the threads it starts afterwards) to `cpu`, or lets it
/// run on every CPU it started with (None).
pub fn pin_self(cpu: Option<usize>) {
    let set = match cpu {
        // SAFETY: a zeroed cpu_set_t and the libc macro filling it.
        Some(c) => unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(c, &mut set);
            set
        },
        None => *allowed_cpus(),
    };
    // SAFETY: sched_setaffinity for this thread with a valid set.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        eprintln!(
            "bench: pinning to {cpu:?}: {} (the figures are not pinned)",
            std::io::Error::last_os_error()
        );
    }
}

/// Moves the calling thread into network namespace `netns` (a lab pod's).
pub fn enter_netns(netns: &str) -> anyhow::Result<()> {
    let path = format!("/run/netns/{netns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a valid namespace fd; it only affects this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {netns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// 64-byte UDP datagrams from a pod to `target` as fast as one thread sends them.
pub struct Flood {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<anyhow::Result<u64>>,
}

impl Flood {
    pub fn start(netns: &str, target: SocketAddr, cpu: Option<usize>) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let netns = netns.to_string();
        let handle = std::thread::spawn(move || -> anyhow::Result<u64> {
            pin_self(cpu);
            enter_netns(&netns)?;
            let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
            let payload = [0u8; 64];
            let mut sent = 0u64;
            while !flag.load(Ordering::Relaxed) {
                // A full queue is not a datagram sent; the count stays exact.
                if socket.send_to(&payload, target).is_ok() {
                    sent += 1;
                }
            }
            Ok(sent)
        });
        Flood { stop, handle }
    }

    /// Stops the flood; the datagrams sent.
    pub fn stop(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("the flood thread panicked"))?
    }
}

/// A flow no rule allows, tried from a pod again and again until stopped: the check
/// that an enforcer under load still enforces. Each attempt waits out its timeout (the
/// SYN is dropped), so the probe itself adds a few packets a second.
pub struct DeniedProbe {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<anyhow::Result<DeniedCheck>>,
}

impl DeniedProbe {
    pub fn start(netns: &str, target: SocketAddr) -> DeniedProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let netns = netns.to_string();
        let handle = std::thread::spawn(move || -> anyhow::Result<DeniedCheck> {
            enter_netns(&netns)?;
            let mut check = DeniedCheck::default();
            while !flag.load(Ordering::Relaxed) {
                check.attempts += 1;
                check.connected += u64::from(exchange(target, Duration::from_millis(200)));
            }
            Ok(check)
        });
        DeniedProbe { stop, handle }
    }

    /// Stops the probe; what its attempts found.
    pub fn stop(self) -> anyhow::Result<DeniedCheck> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("the denied-flow probe panicked"))?
    }
}

/// From `netns`, connects to `addr` again and again (each attempt abandoned after
/// `attempt`) until `confirm` attempts in a row end `connected` (or not): the time from
/// `since` to the start of the first of them. A tight loop of attempts is the
/// measurement, not a wait; `confirm` > 1 keeps a late answer on a busy machine from
/// passing for a refusal.
pub fn until_outcome(
    netns: &str,
    addr: SocketAddr,
    connected: bool,
    since: Instant,
    attempt: Duration,
    confirm: usize,
    give_up: Duration,
) -> anyhow::Result<Duration> {
    let netns = netns.to_string();
    std::thread::spawn(move || -> anyhow::Result<Duration> {
        enter_netns(&netns)?;
        let mut first: Option<Instant> = None;
        let mut streak = 0;
        loop {
            let t = Instant::now();
            let ok = exchange(addr, attempt);
            if ok == connected {
                let start = *first.get_or_insert(t);
                streak += 1;
                if streak >= confirm.max(1) {
                    return Ok(start.saturating_duration_since(since));
                }
            } else {
                first = None;
                streak = 0;
            }
            if since.elapsed() > give_up {
                bail!(
                    "no {} connection to {addr} within {give_up:?}",
                    if connected { "permitted" } else { "refused" }
                );
            }
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
}

/// A connection that the lab server greets within `timeout`: the server must have
/// accepted it, which also keeps a tight loop from outrunning the server's accept queue
/// (an overflow drops the SYN, and the client retries only after a second).
fn exchange(addr: SocketAddr, timeout: Duration) -> bool {
    use std::io::Read;
    let start = Instant::now();
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let left = timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_micros(100));
    let mut byte = [0u8; 1];
    s.set_read_timeout(Some(left)).is_ok() && matches!(s.read(&mut byte), Ok(1))
}

/// Resident and peak resident memory of a process, in MiB (/proc/PID/status).
pub fn memory_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

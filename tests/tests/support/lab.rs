//! A lab as the tests drive it: a guard that tears it down even when an assertion
//! fails, the `netpol` commands they run on it, and observers that say when they are
//! subscribed (their "observing" line) so that nothing has to sleep for readiness.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const NETPOL: &str = env!("NETPOL_BIN");

pub const SECOND: Duration = Duration::from_secs(1);

pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// Runs `f` on a thread inside network namespace `netns` (namespaces are per thread).
/// Sends `signal` to `pid` and returns once the process is gone (pidfd: no polling).
#[allow(dead_code)] // not every suite stops processes
pub fn signal_and_wait(pid: i32, signal: i32) {
    // SAFETY: plain syscalls on a pid and a descriptor this function owns.
    unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        assert!(fd >= 0, "pidfd_open {pid}");
        assert_eq!(libc::kill(pid, signal), 0);
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        assert_eq!(
            libc::poll(&mut p, 1, 10_000),
            1,
            "process {pid} did not exit"
        );
        libc::close(fd);
    }
}

pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{netns}");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(&path).unwrap();
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns {path}"
        );
        f()
    })
    .join()
    .unwrap()
}

/// `ip ARGS`, which must succeed; its stdout.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A UDP socket (bound to any port, in the calling thread's namespace) with IP_RECVERR:
/// a datagram the veth could not take fails the send (ENOBUFS) instead of vanishing.
pub fn udp_recverr() -> std::net::UdpSocket {
    use std::os::fd::AsRawFd;
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_RECVERR,
            &one as *const _ as *const _,
            4,
        )
    };
    s
}

/// The lab guard: `lab down` (and the kill of every process it was given) when it
/// goes out of scope, on a failed assertion's unwinding too.
pub struct Lab {
    pub name: String,
    /// The manifests directory the lab's supervisor watches.
    pub dir: PathBuf,
    /// Processes a test started on the lab (an extra agent, say): killed on drop,
    /// before the lab goes down.
    children: Vec<Child>,
}

/// A pod's network namespace and addresses, from the lab's status.
pub struct PodNet {
    pub netns: String,
    pub v4: IpAddr,
    pub v6: IpAddr,
}

impl Lab {
    /// Lab `t<tag><pid>` of `manifests`, with extra `lab up` flags (`--dns`,
    /// `--nodes N`, `--enforcer E`, `--agent-arg=...`).
    pub fn up(tag: &str, manifests: &[(&str, &str)], flags: &[&str]) -> Lab {
        super::need_root("builds a lab of network namespaces");
        let name = format!("t{tag}{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("netpol-lab-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let lab = Lab {
            name,
            dir,
            children: vec![],
        };
        for (file, text) in manifests {
            lab.write(file, text);
        }
        let dir = lab.dir.to_str().unwrap().to_string();
        let mut args = vec!["lab", "up", "--manifests", &dir];
        args.extend(flags);
        lab.netpol(&args);
        lab
    }

    /// A lab whose agent runs with extra flags (each passed as `--agent-arg=FLAG`).
    pub fn with_agent(tag: &str, manifests: &[(&str, &str)], agent_args: &[&str]) -> Lab {
        let flags: Vec<String> = agent_args
            .iter()
            .map(|a| format!("--agent-arg={a}"))
            .collect();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Lab::up(tag, manifests, &flags)
    }

    /// A lab of `nodes` nodes with cluster DNS.
    pub fn cluster(tag: &str, nodes: u32, manifests: &[(&str, &str)]) -> Lab {
        let nodes = nodes.to_string();
        Lab::up(tag, manifests, &["--dns", "--nodes", &nodes])
    }

    /// The lab's state directory (logs, the agent's socket, the rendered cluster).
    pub fn state_dir(&self) -> PathBuf {
        Path::new("/run/netpol/lab").join(&self.name)
    }

    /// Hands a process to the guard, which kills it on drop.
    pub fn adopt(&mut self, child: Child) {
        self.children.push(child);
    }

    pub fn write(&self, file: &str, text: &str) {
        std::fs::write(self.dir.join(file), text).unwrap();
    }

    pub fn remove(&self, file: &str) {
        let _ = std::fs::remove_file(self.dir.join(file));
    }

    /// Writes (Some) or removes (None) manifest files, then waits until the agent
    /// enforces them.
    pub fn apply(&self, files: &[(&str, Option<&str>)]) {
        for (file, text) in files {
            match text {
                Some(t) => self.write(file, t),
                None => self.remove(file),
            }
        }
        self.wait();
    }

    /// `lab wait`: until every agent enforces the lab's manifests.
    pub fn wait(&self) {
        self.netpol(&["lab", "wait", "--timeout", "60"]);
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.netpol(&["lab", "status", "-o", "json"])).unwrap()
    }

    /// `netpol ARGS --name <lab>`, whatever its exit code.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut full: Vec<&str> = args.to_vec();
        if args.first() == Some(&"lab") {
            full.extend(["--name", &self.name]);
        } else {
            full.extend(["--lab", &self.name]);
        }
        Command::new(NETPOL).args(&full).output().unwrap()
    }

    /// `netpol ARGS`, which must succeed; its stdout.
    pub fn netpol(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "netpol {}: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn logs(&self) -> String {
        let dir = self.state_dir();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.ends_with(".log"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
            .iter()
            .map(|f| {
                format!(
                    "--- {f}\n{}",
                    std::fs::read_to_string(dir.join(f)).unwrap_or_default()
                )
            })
            .collect()
    }

    /// One probe: connected, refused or timeout.
    pub fn probe(&self, from: &str, to: &str, port: u16, protocol: &str) -> String {
        let port = port.to_string();
        let out = self.netpol(&[
            "lab",
            "probe",
            "--from",
            from,
            "--to",
            to,
            "--port",
            &port,
            "--protocol",
            protocol,
            "--timeout",
            "0.5",
            "-o",
            "json",
        ]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v["results"][0]["result"].as_str().unwrap().to_string()
    }

    /// Every probe of `lab probe` on one port: (from, to, result).
    pub fn probe_all(&self, port: u16, protocol: &str) -> Vec<(String, String, String)> {
        let out = self.netpol(&[
            "lab",
            "probe",
            "--port",
            &port.to_string(),
            "--protocol",
            protocol,
            "-o",
            "json",
        ]);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["port"], port);
        assert_eq!(v["protocol"], protocol);
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["from"].as_str().unwrap().into(),
                    r["to"].as_str().unwrap().into(),
                    r["result"].as_str().unwrap().into(),
                )
            })
            .collect()
    }

    /// `lab probe` results as (from, to, result, address, backend).
    pub fn probe_rows(&self, extra: &[&str]) -> Vec<[String; 5]> {
        let mut args = vec!["lab", "probe", "--timeout", "1", "-o", "json"];
        args.extend(extra);
        let v: Value = serde_json::from_str(&self.netpol(&args)).unwrap();
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
                [s("from"), s("to"), s("result"), s("address"), s("backend")]
            })
            .collect()
    }

    /// One IPv4 probe with the default timeout.
    pub fn result(&self, port: u16, protocol: &str, from: &str, to: &str) -> String {
        self.result_family(port, protocol, from, to, 4)
    }

    pub fn result_family(
        &self,
        port: u16,
        protocol: &str,
        from: &str,
        to: &str,
        family: u8,
    ) -> String {
        let family = family.to_string();
        let out = self.netpol(&[
            "lab",
            "probe",
            "--family",
            &family,
            "--port",
            &port.to_string(),
            "--protocol",
            protocol,
            "--from",
            from,
            "--to",
            to,
            "-o",
            "json",
        ]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v["results"][0]["result"].as_str().unwrap().to_string()
    }

    /// `lab resolve` from `from`: (result, addresses).
    pub fn resolve_addrs(&self, from: &str, name: &str, tcp: bool) -> (String, Vec<String>) {
        let mut args = vec![
            "lab",
            "resolve",
            "--from",
            from,
            name,
            "--timeout",
            "1",
            "-o",
            "json",
        ];
        if tcp {
            args.push("--tcp");
        }
        let v: Value = serde_json::from_str(&self.netpol(&args)).unwrap();
        let addrs = v["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        (v["result"].as_str().unwrap().to_string(), addrs)
    }

    /// `lab resolve`: answered, nxdomain, timeout or refused.
    pub fn resolve(&self, from: &str, name: &str, tcp: bool) -> String {
        self.resolve_addrs(from, name, tcp).0
    }

    /// Live `netpol explain` through the lab's agent: (exit code, the explanation).
    pub fn explain(&self, from: &str, to: &str, port: &str) -> (i32, Value) {
        let out = self.run(&[
            "explain", "--from", from, "--to", to, "--port", port, "-o", "json",
        ]);
        let code = out.status.code().unwrap_or(-1);
        assert!(
            code == 0 || code == 1,
            "netpol explain {from} {to} {port}: exit {code}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (code, serde_json::from_slice(&out.stdout).unwrap())
    }

    /// The agent's exact counters (`netpol counters -o json`).
    pub fn counters(&self) -> Value {
        serde_json::from_str(&self.netpol(&["counters", "-o", "json"])).unwrap()
    }

    /// One packet counter: (verdict dropped/allowed/audit, reason, direction).
    pub fn count(&self, counters: &Value, verdict: &str, reason: &str, dir: &str) -> u64 {
        counters["packets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["verdict"] == verdict && c["reason"] == reason && c["direction"] == dir)
            .map(|c| c["packets"].as_u64().unwrap())
            .sum()
    }

    /// A pod's entry in the lab's status.
    fn pod_status(&self, key: &str) -> Value {
        let status = self.status();
        status["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| format!("{}/{}", p["namespace"], p["name"]).replace('"', "") == key)
            .unwrap_or_else(|| panic!("no pod {key}"))
            .clone()
    }

    /// A pod's network namespace and IPv4 address, from the lab's status.
    pub fn pod(&self, key: &str) -> (String, IpAddr) {
        let p = self.pod_status(key);
        let v4 = p["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ip| ip.as_str().unwrap().parse::<IpAddr>().unwrap())
            .find(|ip| ip.is_ipv4())
            .unwrap();
        (p["netns"].as_str().unwrap().to_string(), v4)
    }

    /// A pod's network namespace and both its addresses.
    pub fn pod_net(&self, key: &str) -> PodNet {
        let p = self.pod_status(key);
        let ips: Vec<IpAddr> = p["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ip| ip.as_str().unwrap().parse().unwrap())
            .collect();
        PodNet {
            netns: p["netns"].as_str().unwrap().to_string(),
            v4: *ips.iter().find(|ip| ip.is_ipv4()).expect("an IPv4 address"),
            v6: *ips.iter().find(|ip| ip.is_ipv6()).expect("an IPv6 address"),
        }
    }

    /// The node a pod was placed on.
    pub fn node_of(&self, pod: &str) -> String {
        self.pod_status(pod)["node"].as_str().unwrap().to_string()
    }

    /// One request to the agent's API socket (`{"op": OP}`): its answer line.
    pub fn agent_request(&self, op: &str) -> String {
        let sock = self.state_dir().join("agent.sock");
        let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        writeln!(s, "{{\"op\":\"{op}\"}}").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        line
    }

    /// The agent's exact counters through its socket: (verdict, reason, direction) →
    /// packets, and its events.
    pub fn agent_counters(&self) -> (BTreeMap<(String, String, String), u64>, Value) {
        let v: Value = serde_json::from_str(&self.agent_request("counters")).unwrap();
        let mut m = BTreeMap::new();
        for c in v["packets"].as_array().unwrap() {
            let word = |field: &str| c[field].as_str().unwrap().to_string();
            m.insert(
                (word("verdict"), word("reason"), word("direction")),
                c["packets"].as_u64().unwrap(),
            );
        }
        (m, v["events"].clone())
    }

    /// One of `agent_counters`: (verdict, reason, direction).
    pub fn agent_count(&self, verdict: &str, reason: &str, dir: &str) -> u64 {
        self.agent_counters()
            .0
            .get(&(verdict.to_string(), reason.to_string(), dir.to_string()))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(NETPOL)
            .args(["lab", "down", "--name", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `netpol observe --lab <lab> FILTER...`, subscribed: started once the agent has
/// said "observing". Lines of stdout and stderr arrive on channels; killed on drop.
pub struct Observer {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
}

fn lines(read: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(read).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

impl Observer {
    pub fn start(lab: &Lab, filter: &[&str]) -> Observer {
        let mut child = Command::new(NETPOL)
            .args(["observe", "--lab", &lab.name])
            .args(filter)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        let obs = Observer {
            child,
            stdout,
            stderr,
        };
        match obs.stderr.recv_timeout(Duration::from_secs(10)) {
            Ok(l) if l.starts_with("observing") => obs,
            other => panic!(
                "netpol observe did not subscribe: {other:?}\n{}",
                lab.logs()
            ),
        }
    }

    /// The next verdict (`-o json`), waiting at most `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Value> {
        let line = self.stdout.recv_timeout(timeout).ok()?;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")))
    }

    /// Every verdict up to `n`, waiting at most `timeout` in all.
    pub fn take(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(v) => out.push(v),
                None => break,
            }
        }
        out
    }

    /// The next line on stderr that contains `what`, waiting at most `timeout`.
    pub fn note(&self, what: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.stderr.recv_timeout(left).ok()?;
            if line.contains(what) {
                return Some(line);
            }
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

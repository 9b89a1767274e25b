//! An agent killed with SIGKILL under steady traffic, and a new one started in its place
//! (the same version: it adopts the pinned maps; another pin version: it rebuilds, copies
//! conntrack and switches every filter atomically). Needs root; one lab per test.
//!
//! Asserted: an allowed, established connection echoes throughout (every round trip
//! within 1 s), a denied peer never connects, the new agent's `/readyz` answers 200
//! within 5 s of its start, polled from outside as a kubelet does, with 100 pods on the
//! node, after an upgrade too (its programs go through the verifier, in parallel and
//! while the maps are filled), and after an upgrade across a conntrack layout change
//! (v4's entries converted).

mod support;

use support::lab::{in_netns, Lab, NETPOL};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The lab of `manifests`, once its agent enforces them.
fn lab_up(tag: &str, manifests: &str) -> Lab {
    let lab = Lab::up(tag, &[("cluster.yaml", manifests)], &[]);
    lab.netpol(&["lab", "wait", "--timeout", "120"]);
    lab
}

impl Lab {
    /// Starts an agent on the lab's node the way the supervisor does, with `extra` flags.
    fn start_agent(&mut self, extra: &[&str]) {
        let status = self.status();
        let node_netns = status["nodes"][0]["netns"].as_str().unwrap().to_string();
        let log = std::fs::File::create(self.state_dir().join("agent2.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &node_netns, NETPOL, "agent", "--source"])
            .arg(format!(
                "dir:{}",
                self.state_dir().join("cluster").display()
            ))
            .args(["--node", "node0", "--bridge", "cni0", "--api-socket"])
            .arg(self.state_dir().join("agent.sock"))
            .arg("--pin-root")
            .arg(netpol_tests::lab::pin_root_of(&self.name, 0))
            .arg("--cgroup")
            .arg(netpol_tests::lab::cgroup_root(&self.name))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.adopt(child);
    }

    /// The agent's status once it has converged (its `wait`), polling only for its socket.
    fn wait_agent(&self, deadline: Duration) -> Value {
        let sock = self.state_dir().join("agent.sock");
        let start = Instant::now();
        loop {
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) {
                writeln!(s, "{{\"op\":\"wait\",\"digest\":\"\"}}").unwrap();
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line).unwrap();
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    return v;
                }
            }
            assert!(start.elapsed() < deadline, "agent not up\n{}", self.logs());
            // The socket appears once the agent has loaded the classifier.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// 100 pods in namespace x under default deny (ingress and egress): `server` serves 80
/// and admits `client` only; `client` may reach `server`; `intruder` is denied.
fn cluster() -> String {
    let mut out = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n");
    let pod = |name: &str, role: &str, serve: bool| {
        let ports = if serve {
            ", ports: [{containerPort: 80}]"
        } else {
            ""
        };
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{role: {role}}}}}\nspec: {{containers: [{{name: c, image: i{ports}}}]}}\n---\n")
    };
    out.push_str(&pod("server", "server", true));
    out.push_str(&pod("client", "client", false));
    out.push_str(&pod("intruder", "intruder", false));
    for i in 0..97 {
        out.push_str(&pod(&format!("filler{i}"), "filler", false));
    }
    out.push_str(
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-from-client, namespace: x}
spec:
  podSelector: {matchLabels: {role: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
    ports: [{port: 80}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-to-server, namespace: x}
spec:
  podSelector: {matchLabels: {role: client}}
  egress:
  - to: [{podSelector: {matchLabels: {role: server}}}]
    ports: [{port: 80}]
"#,
    );
    out
}

fn try_connect(netns: &str, to: IpAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    in_netns(netns, move || {
        let s = TcpStream::connect_timeout(&(to, 80).into(), timeout)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut greeting = String::new();
        BufReader::new(s.try_clone()?).read_line(&mut greeting)?;
        assert!(greeting.starts_with("netpol-lab 80 "), "{greeting:?}");
        Ok(s)
    })
}

/// Kills the process and returns once it is gone.
fn kill9(pid: i32) {
    support::lab::signal_and_wait(pid, libc::SIGKILL);
}

/// Traffic that runs through the restart: echoes on an allowed connection, connection
/// attempts from a denied pod. Steady, not flat out: a ping-pong as fast as the machine
/// allows (client, debug-built lab server, four classifier runs per round trip) would
/// take most of this 2-core machine from the agent under test, and two such tests run
/// at once.
struct Traffic {
    stop: Arc<AtomicBool>,
    echoes: Arc<(Mutex<u64>, Condvar)>,
    threads: Vec<std::thread::JoinHandle<Result<(), String>>>,
}

/// Between two round trips on the allowed connection: 1000 a second, at most.
const ECHO_INTERVAL: Duration = Duration::from_millis(1);

impl Traffic {
    fn start(allowed: TcpStream, intruder_netns: String, server: IpAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let echoes = Arc::new((Mutex::new(0u64), Condvar::new()));
        let mut threads = Vec::new();
        {
            let (stop, echoes) = (stop.clone(), echoes.clone());
            let mut s = allowed;
            threads.push(std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let msg = format!("m{n}\n");
                    s.write_all(msg.as_bytes())
                        .map_err(|e| format!("write: {e}"))?;
                    let mut got = vec![0u8; msg.len()];
                    s.read_exact(&mut got)
                        .map_err(|e| format!("echo {n} lost: {e}"))?;
                    if got != msg.as_bytes() {
                        return Err(format!("echo {n} garbled"));
                    }
                    n += 1;
                    *echoes.0.lock().unwrap() = n;
                    echoes.1.notify_all();
                    std::thread::sleep(ECHO_INTERVAL);
                }
                Ok(())
            }));
        }
        {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if try_connect(&intruder_netns, server, Duration::from_millis(200)).is_ok() {
                        return Err("the denied pod connected".into());
                    }
                }
                Ok(())
            }));
        }
        Traffic {
            stop,
            echoes,
            threads,
        }
    }

    fn echoes(&self) -> u64 {
        *self.echoes.0.lock().unwrap()
    }

    fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .filter_map(|t| t.join().unwrap().err())
            .collect()
    }
}

/// Waits until the echo thread has done `n` more round trips (it signals each one).
fn more_echoes(t: &Traffic, n: u64) {
    let target = t.echoes() + n;
    let (count, done) = &*t.echoes;
    let waited = done
        .wait_timeout_while(count.lock().unwrap(), Duration::from_secs(10), |c| {
            *c < target
        })
        .unwrap();
    assert!(!waited.1.timed_out(), "echoes stalled");
}

/// What replaces the killed agent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Replacement {
    /// The same build and pin version: adopts the pinned maps and programs.
    SameVersion,
    /// This build under another pin version name: rebuilds, copies conntrack as it is.
    AnotherPinVersion,
    /// This build over a node whose pins are pin version v4's, with its other conntrack
    /// layout: rebuilds and converts the live connections' entries.
    FromV4Layout,
}

/// The new agent's metrics address in the node's namespace (the old one's is gone).
const METRICS_PORT: u16 = 19965;

/// What a restart showed.
struct Restarted {
    status: Value,
    /// From the new agent's start to the first 200 from its `/readyz`, as a kubelet
    /// polling it sees it.
    ready_outside: Duration,
    /// Conntrack entries the test rewrote in v4's layout (FromV4Layout).
    rewritten: usize,
}

fn restart(tag: &str, how: Replacement) -> Restarted {
    let mut lab = lab_up(tag, &cluster());
    let (client_ns, _) = lab.pod("x/client");
    let (intruder_ns, _) = lab.pod("x/intruder");
    let (_, server) = lab.pod("x/server");
    let conn = try_connect(&client_ns, server, Duration::from_secs(2)).expect("allowed");
    assert!(
        try_connect(&intruder_ns, server, Duration::from_millis(500)).is_err(),
        "denied before the restart"
    );
    let traffic = Traffic::start(conn, intruder_ns.clone(), server);
    more_echoes(&traffic, 20);

    let pid = lab.status()["nodes"][0]["agent_pid"].as_i64().unwrap() as i32;
    kill9(pid);
    // Enforcement continues with no agent at all.
    more_echoes(&traffic, 20);
    let pins = netpol_tests::lab::pin_root_of(&lab.name, 0);
    let rewritten = match how {
        Replacement::FromV4Layout => v4::rewrite_pins(&pins),
        _ => 0,
    };
    let node_netns = lab.status()["nodes"][0]["netns"]
        .as_str()
        .unwrap()
        .to_string();
    let metrics = format!("127.0.0.1:{METRICS_PORT}");
    let mut flags = vec!["--metrics-addr", &metrics];
    if how == Replacement::AnotherPinVersion {
        flags.extend(["--pin-version", "vnext-test"]);
    }
    let started = Instant::now();
    lab.start_agent(&flags);
    let ready_outside = ready_from_outside(&node_netns, started, Duration::from_secs(60));
    let status = lab.wait_agent(Duration::from_secs(30));
    if std::env::var_os("NETPOL_TEST_LOGS").is_some() {
        eprintln!("{}", lab.logs());
    }
    more_echoes(&traffic, 50);
    let failures = traffic.finish();
    assert!(failures.is_empty(), "{failures:?}\n{}", lab.logs());
    assert_eq!(status["converged"], true, "{status}");
    assert_eq!(status["endpoints"], 100, "{status}");
    // The new programs enforce: a new allowed connection opens, the intruder's does not.
    assert!(try_connect(&client_ns, server, Duration::from_secs(2)).is_ok());
    assert!(try_connect(&intruder_ns, server, Duration::from_millis(500)).is_err());
    let current = pins.join(netpol_common::PIN_VERSION);
    match how {
        Replacement::SameVersion => assert!(current.join("maps/NP_CONNTRACK").exists()),
        Replacement::AnotherPinVersion => {
            assert!(!current.exists(), "the replaced version's pins are removed");
            assert!(pins.join("vnext-test/maps/NP_CONNTRACK").exists());
        }
        Replacement::FromV4Layout => {
            assert!(!pins.join("v4").exists(), "v4's pins are removed");
            assert!(current.join("maps/NP_CONNTRACK").exists());
        }
    }
    Restarted {
        status,
        ready_outside,
        rewritten,
    }
}

/// Polls the new agent's `/readyz` from its node's namespace, as a kubelet's readiness
/// probe does (the one wait here that has no signal to wait on: the agent's socket is
/// what is measured), and returns the time from `started` to the first 200.
fn ready_from_outside(netns: &str, started: Instant, deadline: Duration) -> Duration {
    in_netns(netns, move || loop {
        let ok = TcpStream::connect(("127.0.0.1", METRICS_PORT)).and_then(|mut s| {
            s.write_all(b"GET /readyz HTTP/1.0\r\nhost: x\r\n\r\n")?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok(reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"))
        });
        if ok.unwrap_or(false) {
            return started.elapsed();
        }
        assert!(started.elapsed() < deadline, "/readyz never answered 200");
        std::thread::sleep(Duration::from_millis(5));
    })
}

/// Pin version v4, as its agent left a node: the conntrack value of that version,
/// written here from its definition (netpol-common before the epoch got its own half
/// of each stamp), not taken from the agent under test.
mod v4 {
    use std::path::Path;

    use aya::maps::{HashMap, Map, MapData};
    use netpol_common::{CtEntry, CtKey, PIN_VERSION};

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    struct CtEntryV4 {
        last_seen_ns: u64,
        flags: u32,
        /// `revision ^ epoch * 0x9e3779b1`.
        egress_revision: u32,
        ingress_revision: u32,
        egress_cookie: u32,
        ingress_cookie: u32,
        _pad: u32,
    }
    // SAFETY: repr(C), integers only, no implicit padding (32 bytes).
    unsafe impl aya::Pod for CtEntryV4 {}

    fn fold(stamp: u64) -> u32 {
        let (epoch, revision) = ((stamp >> 32) as u32, stamp as u32);
        revision ^ epoch.wrapping_mul(0x9e37_79b1)
    }

    /// Turns the node's pins into what a v4 agent leaves: its conntrack map (the live
    /// connections, in v4's layout) and its layout record, and no pins of this version
    /// (the killed agent's programs go on enforcing with their maps, unpinned). Returns
    /// the entries written.
    pub fn rewrite_pins(root: &Path) -> usize {
        let current = root.join(PIN_VERSION);
        let live = MapData::from_pin(current.join("maps/NP_CONNTRACK")).unwrap();
        let live: HashMap<MapData, CtKey, CtEntry> =
            HashMap::try_from(Map::from_map_data(live).unwrap()).unwrap();
        let old_dir = root.join("v4");
        std::fs::create_dir_all(old_dir.join("maps")).unwrap();
        let (k, v) = (size_of::<CtKey>(), size_of::<CtEntryV4>());
        std::fs::create_dir_all(old_dir.join(format!("layout/NP_CONNTRACK:{k}:{v}"))).unwrap();
        let mut old: HashMap<MapData, CtKey, CtEntryV4> =
            HashMap::create(netpol_common::capacity::CONNTRACK, 0).unwrap();
        let mut n = 0;
        for item in live.iter() {
            let (key, e) = item.unwrap();
            let entry = CtEntryV4 {
                last_seen_ns: e.last_seen_ns,
                flags: e.flags,
                egress_revision: fold(e.egress_stamp),
                ingress_revision: fold(e.ingress_stamp),
                egress_cookie: e.egress_cookie,
                ingress_cookie: e.ingress_cookie,
                _pad: 0,
            };
            old.insert(key, entry, 0).unwrap();
            n += 1;
        }
        old.pin(old_dir.join("maps/NP_CONNTRACK")).unwrap();
        std::fs::remove_dir_all(&current).unwrap();
        n
    }
}

#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_killed_agent_is_replaced_without_a_gap_and_adopts_the_pinned_state() {
    let r = restart("same", Replacement::SameVersion);
    eprintln!(
        "restart at 100 pods: /readyz 200 after {:?} from the start (the agent counts {} ms)",
        r.ready_outside, r.status["ready_ms"]
    );
    assert_eq!(r.status["adopted"], true, "{}", r.status);
    assert!(r.ready_outside < READY_BOUND, "{:?}", r.ready_outside);
    // The adopted programs' verifier cost is still known (read back from the kernel).
    for p in ["from_pod", "to_pod", "to_remote"] {
        let n = r.status["verified_instructions"][p].as_u64().unwrap_or(0);
        assert!(n > 1000, "{p}: {}", r.status);
    }
}

#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn an_upgrade_to_another_pin_version_rebuilds_without_opening_anything() {
    let r = restart("upg", Replacement::AnotherPinVersion);
    eprintln!(
        "upgrade at 100 pods: /readyz 200 after {:?} from the start (the agent counts {} ms)",
        r.ready_outside, r.status["ready_ms"]
    );
    assert_eq!(r.status["adopted"], false, "{}", r.status);
    assert!(r.ready_outside < READY_BOUND, "{:?}", r.ready_outside);
}

/// An upgrade across a conntrack layout change (v4 → this build): the live connection's
/// entry is converted, so its packets in the middle of the stream, which start no state
/// of their own, still find it; without the conversion the server's answers meet its
/// default-deny egress and the echoes stop.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn an_upgrade_from_the_v4_conntrack_layout_keeps_live_connections() {
    let r = restart("v4up", Replacement::FromV4Layout);
    eprintln!(
        "upgrade from v4 at 100 pods: {} entries rewritten, {} migrated, /readyz 200 after {:?}",
        r.rewritten, r.status["migrated_conntrack"], r.ready_outside
    );
    assert!(r.rewritten >= 1, "the live connection was tracked");
    assert_eq!(r.status["adopted"], false, "{}", r.status);
    assert!(
        r.status["migrated_conntrack"].as_u64().unwrap() >= r.rewritten as u64,
        "{}",
        r.status
    );
    assert!(r.ready_outside < READY_BOUND, "{:?}", r.ready_outside);
}

/// From exec to a 200 on /readyz at 100 pods (the agent itself says about 1 s here).
const READY_BOUND: Duration = Duration::from_secs(5);

//! Real packets between pods in a lab (network namespaces, a bridge, veths, the agent).
//! Needs root. Every test has its own lab name, so they run in parallel, and a guard
//! that tears its lab down even when an assertion fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const NETPOL: &str = env!("CARGO_BIN_EXE_netpol");

fn root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

struct Lab {
    name: String,
    dir: PathBuf,
}

impl Lab {
    fn up(tag: &str, manifests: &[(&str, &str)]) -> Lab {
        let name = format!("t{tag}{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("netpol-lab-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let lab = Lab { name, dir };
        for (file, text) in manifests {
            lab.write(file, text);
        }
        lab.netpol(&["lab", "up", "--manifests", lab.dir.to_str().unwrap()]);
        lab
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.dir.join(file), text).unwrap();
    }

    fn remove(&self, file: &str) {
        std::fs::remove_file(self.dir.join(file)).unwrap();
    }

    fn netpol(&self, args: &[&str]) -> String {
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--name", &self.name]);
        let out = Command::new(NETPOL).args(&full).output().unwrap();
        assert!(
            out.status.success(),
            "netpol {}: {}\n{}",
            full.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn logs(&self) -> String {
        let dir = Path::new("/run/netpol/lab").join(&self.name);
        ["supervisor.log", "agent.log"]
            .iter()
            .map(|f| {
                format!(
                    "--- {f}\n{}",
                    std::fs::read_to_string(dir.join(f)).unwrap_or_default()
                )
            })
            .collect()
    }

    fn wait(&self) {
        self.netpol(&["lab", "wait", "--timeout", "60"]);
    }

    /// (from, to) → result, for one port.
    fn probe(&self, port: u16, protocol: &str) -> Vec<(String, String, String)> {
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

    fn result(&self, port: u16, protocol: &str, from: &str, to: &str) -> String {
        let out = self.netpol(&[
            "lab",
            "probe",
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

    fn status(&self) -> Value {
        serde_json::from_str(&self.netpol(&["lab", "status", "-o", "json"])).unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(NETPOL)
            .args(["lab", "down", "--name", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Namespace
metadata: {name: y}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {containers: [{name: c, image: i, ports: [{containerPort: 80}, {containerPort: 53, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {containers: [{name: c, image: i, ports: [{containerPort: 80}, {containerPort: 53, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: y, labels: {app: c}}
spec: {containers: [{name: c, image: i, ports: [{containerPort: 80}, {containerPort: 53, protocol: UDP}]}]}
"#;

const DENY_X: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: x}
spec: {podSelector: {}}
"#;

const ALLOW_B_TO_A: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-b, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{port: 80}]
"#;

#[test]
fn default_deny_ingress_times_out_and_an_allow_rule_admits_exactly_its_peers() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let lab = Lab::up("deny", &[("pods.yaml", PODS)]);
    assert!(
        lab.probe(80, "TCP")
            .iter()
            .all(|(_, _, r)| r == "connected"),
        "no policy: all connect"
    );
    assert_eq!(
        lab.result(81, "TCP", "x/a", "y/c"),
        "refused",
        "no listener is a refusal, not a timeout"
    );

    lab.write("deny.yaml", DENY_X);
    lab.write("allow.yaml", ALLOW_B_TO_A);
    lab.wait();
    for (from, to, result) in lab.probe(80, "TCP") {
        let want = match (from.as_str(), to.as_str()) {
            ("x/b", "x/a") => "connected",
            (_, "y/c") => "connected", // y is not isolated
            _ => "timeout",
        };
        assert_eq!(result, want, "{from} -> {to}");
    }
    // The rule names TCP 80 only.
    assert_eq!(lab.result(53, "UDP", "x/b", "x/a"), "timeout");
    assert_eq!(lab.result(53, "UDP", "x/a", "y/c"), "connected");
}

#[test]
fn replies_pass_when_the_server_denies_all_egress() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let server_policy = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ingress-only, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Ingress, Egress]
  ingress: [{}]
"#;
    let lab = Lab::up(
        "reply",
        &[("pods.yaml", PODS), ("server.yaml", server_policy)],
    );
    lab.wait();
    // The probe reads the server's greeting, so data must flow back.
    assert_eq!(lab.result(80, "TCP", "x/b", "x/a"), "connected");
    assert_eq!(lab.result(53, "UDP", "y/c", "x/a"), "connected");
    // The server cannot open connections of its own.
    assert_eq!(lab.result(80, "TCP", "x/a", "x/b"), "timeout");
}

#[test]
fn a_policy_change_applies_after_wait_and_a_removed_pod_leaves_nothing_behind() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let lab = Lab::up("change", &[("pods.yaml", PODS), ("deny.yaml", DENY_X)]);
    lab.wait();
    assert_eq!(lab.result(80, "TCP", "x/b", "x/a"), "timeout");
    lab.write("allow.yaml", ALLOW_B_TO_A);
    lab.wait();
    assert_eq!(lab.result(80, "TCP", "x/b", "x/a"), "connected");
    lab.remove("allow.yaml");
    lab.wait();
    assert_eq!(
        lab.result(80, "TCP", "x/b", "x/a"),
        "timeout",
        "the allow is gone, and so is the connection's state"
    );

    let status = lab.status();
    let pod_b = status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "b")
        .unwrap()
        .clone();
    let veth = pod_b["veth"].as_str().unwrap().to_string();
    let node_ns = status["nodes"][0]["netns"].as_str().unwrap().to_string();
    lab.write(
        "pods.yaml",
        &PODS.replace(
            "metadata: {name: b, namespace: x, labels: {app: b}}",
            "metadata: {name: b2, namespace: x, labels: {app: b}}",
        ),
    );
    lab.wait();
    let status = lab.status();
    assert!(status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["name"] != "b"));
    let link = Command::new("ip")
        .args(["-n", &node_ns, "link", "show", &veth])
        .output()
        .unwrap();
    assert!(
        !link.status.success(),
        "veth {veth} of the removed pod is gone"
    );
    let agent: Value = serde_json::from_str(&lab_agent_status(&lab)).unwrap();
    assert_eq!(
        agent["endpoints"], 3,
        "a, b2 and c: the removed pod's endpoint entry is gone"
    );
}

/// The agent's own status, through its API socket.
fn lab_agent_status(lab: &Lab) -> String {
    let sock = Path::new("/run/netpol/lab")
        .join(&lab.name)
        .join("agent.sock");
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.write_all(b"{\"op\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

#[test]
fn a_drop_shows_up_in_observe_with_pods_and_the_isolating_policy() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let lab = Lab::up("obs", &[("pods.yaml", PODS), ("deny.yaml", DENY_X)]);
    lab.wait();
    let mut observer = Command::new(NETPOL)
        .args([
            "observe",
            "--lab",
            &lab.name,
            "--verdict",
            "dropped",
            "--pod",
            "x/a",
            "--count",
            "1",
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Probe until the observer has seen a drop: the drop itself is the signal that the
    // observer was subscribed in time (bounded: each probe takes its 1 s timeout).
    let mut done = false;
    for _ in 0..10 {
        assert_eq!(lab.result(80, "TCP", "y/c", "x/a"), "timeout");
        if observer.try_wait().unwrap().is_some() {
            done = true;
            break;
        }
    }
    if !done {
        let _ = observer.kill();
        panic!("no drop reached `netpol observe`\n{}", lab.logs());
    }
    let output = observer.wait_with_output().unwrap();
    assert!(output.status.success());
    let out = output.stdout;
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["verdict"], "dropped");
    assert_eq!(v["direction"], "ingress");
    assert_eq!(v["reason"], "POLICY_DENIED");
    assert_eq!(
        (v["src"].as_str(), v["dst"].as_str()),
        (Some("y/c"), Some("x/a"))
    );
    assert_eq!(
        (v["dport"].as_u64(), v["protocol"].as_str()),
        (Some(80), Some("TCP"))
    );
    assert_eq!(v["policies"], serde_json::json!(["x/default-deny"]));
}

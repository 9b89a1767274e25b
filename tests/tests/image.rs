//! The shipped image, run as the DaemonSet runs it: `localhost/netpol:dev` (built by
//! `cargo xtask image --debug --tag dev`, which `cargo xtask test` does first) under
//! podman with exactly the DaemonSet's capabilities and mounts, read-only root, on a lab
//! node's network (hostNetwork), reading a mocked API server. It must start, enforce on
//! the node's pods, and answer /readyz. Needs root; the lab runs without an enforcer of
//! its own, so what enforces is the container.

mod support;

#[path = "../../netpol-agent/tests/mock_api/mod.rs"]
mod mock_api;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use mock_api::{list, MockApi, NAMESPACES, PODS, POLICIES};
use serde_json::{json, Value};
use support::lab::{in_netns, Lab};

const IMAGE: &str = "localhost/netpol:dev";

const PODS_YAML: &str = r#"
kind: Namespace
metadata: {name: x}
---
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
---
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
"#;

/// The capabilities deploy/daemonset.yaml grants the agent: the test runs with these
/// and no others, so the manifest and the image cannot drift apart.
fn daemonset_capabilities() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/daemonset.yaml");
    let ds: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let caps = &container["securityContext"]["capabilities"];
    assert_eq!(
        caps["drop"],
        json!(["ALL"]),
        "the DaemonSet drops every capability first"
    );
    caps["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

/// The API server's view of the lab's pods: the addresses the lab gave them, on node0.
fn api_objects(status: &Value) -> (Vec<Value>, Vec<Value>) {
    let namespaces = vec![json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "x", "resourceVersion": "1",
                     "labels": {"kubernetes.io/metadata.name": "x"}}})];
    let pods = status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let ips: Vec<Value> = p["ips"]
                .as_array()
                .unwrap()
                .iter()
                .map(|ip| json!({"ip": ip}))
                .collect();
            let name = p["name"].as_str().unwrap();
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": "x", "resourceVersion": "1",
                                "uid": format!("uid-{name}"), "labels": {"app": name}},
                   "spec": {"nodeName": "node0",
                            "containers": [{"name": "c", "image": "i",
                                            "ports": [{"containerPort": 80}]}]},
                   "status": {"phase": "Running", "podIP": ips[0]["ip"], "podIPs": ips}})
        })
        .collect();
    (namespaces, pods)
}

/// Removes the container and the agent's pins whatever happens to the test.
struct Container {
    name: String,
    pins: std::path::PathBuf,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "2", &self.name]);
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .env("STORAGE_DRIVER", "vfs")
        .args(args)
        .output()
        .expect("podman (cargo xtask setup installs it)")
}

/// One HTTP GET from inside `netns`: the status code, or None while nothing listens.
fn http_status(netns: &str, path: &'static str) -> Option<u16> {
    in_netns(netns, move || {
        let mut s = std::net::TcpStream::connect("127.0.0.1:9965").ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.split(' ').nth(1)?.parse().ok()
    })
}

#[test]
#[ignore = "needs root: builds a lab of network namespaces and runs a container"]
fn the_image_enforces_on_a_lab_node_with_the_daemonset_capabilities() {
    assert!(
        podman(&["image", "exists", IMAGE]).status.success(),
        "{IMAGE} is not in local storage: cargo xtask image --debug --tag dev"
    );
    let lab = Lab::up("img", &[("pods.yaml", PODS_YAML)], &["--enforcer", "none"]);
    let status: Value =
        serde_json::from_str(&lab.netpol(&["lab", "status", "-o", "json"])).unwrap();
    let node_netns = status["nodes"][0]["netns"].as_str().unwrap().to_string();
    // Without an enforcer everything connects.
    assert_eq!(lab.probe("x/a", "x/b", 80, "TCP"), "connected");

    // The API server lives on the node's network, as the real one is reachable from it.
    let (namespaces, pods) = api_objects(&status);
    let deny_b = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "b-deny-ingress", "namespace": "x", "resourceVersion": "1"},
        "spec": {"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]}});
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let api_netns = node_netns.clone();
    let api = std::thread::spawn(move || {
        in_netns(&api_netns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mock = MockApi::start().await;
                mock.set_list(NAMESPACES, list("Namespace", "1", namespaces));
                mock.set_list(PODS, list("Pod", "1", pods));
                mock.set_list(POLICIES, list("NetworkPolicy", "1", vec![deny_b]));
                addr_tx.send(mock.addr).unwrap();
                let _ = stop_rx.await;
            })
        })
    });
    let addr = addr_rx.recv().unwrap();
    let kubeconfig = lab.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, mock_api::kubeconfig(addr)).unwrap();
    let run_dir = lab.dir.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();

    let container = Container {
        name: format!("netpol-image-test-{}", std::process::id()),
        pins: format!("/sys/fs/bpf/netpol-image-test-{}", std::process::id()).into(),
    };
    let caps = daemonset_capabilities().join(",");
    let network = format!("ns:/var/run/netns/{node_netns}");
    let bpffs = "/sys/fs/bpf:/sys/fs/bpf".to_string();
    let run_mount = format!("{}:/run/netpol", run_dir.display());
    let kube_mount = format!("{}:/etc/netpol/kubeconfig:ro", kubeconfig.display());
    // The lab's cgroup v2 tree, where the DaemonSet mounts the host's.
    let cgroup_mount = format!(
        "{}:/host/cgroup:ro",
        netpol_tests::lab::cgroup_root(&lab.name).display()
    );
    let pin_root = format!("--pin-root={}", container.pins.display());
    let out = podman(&[
        "run",
        // crun refuses this machine's hybrid cgroup hierarchy; runc takes it.
        "--runtime",
        "runc",
        "--detach",
        "--name",
        &container.name,
        "--network",
        &network,
        "--cap-drop",
        "ALL",
        "--cap-add",
        &caps,
        "--read-only",
        "--security-opt",
        "no-new-privileges",
        // This machine refuses raised rlimits inside containers (TOOLCHAIN.md).
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--volume",
        &bpffs,
        "--volume",
        &run_mount,
        "--volume",
        &kube_mount,
        "--volume",
        &cgroup_mount,
        "--env",
        "KUBECONFIG=/etc/netpol/kubeconfig",
        "--env",
        "NODE_NAME=node0",
        IMAGE,
        "agent",
        "--source=kube",
        "--metrics-addr=:9965",
        &pin_root,
        "--api-socket=/run/netpol/agent.sock",
        "--cgroup=/host/cgroup",
    ]);
    assert!(
        out.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let logs = || {
        let out = podman(&["logs", &container.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };

    // Ready means the datapath has converged to the API server's view: kubelet's signal.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if http_status(&node_netns, "/readyz") == Some(200) {
            break;
        }
        let state = podman(&["inspect", "--format", "{{.State.Status}}", &container.name]);
        let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
        assert!(
            state == "running",
            "the agent's container is {state}:\n{}",
            logs()
        );
        assert!(Instant::now() < deadline, "not ready in 60 s:\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http_status(&node_netns, "/healthz"), Some(200));

    // b is isolated for ingress: a cannot reach it; a is not, so b reaches a.
    assert_eq!(lab.probe("x/a", "x/b", 80, "TCP"), "timeout", "{}", logs());
    assert_eq!(
        lab.probe("x/b", "x/a", 80, "TCP"),
        "connected",
        "{}",
        logs()
    );

    drop(container);
    let _ = stop_tx.send(());
    api.join().unwrap();
}

const LOAD_IMAGE: &str = "localhost/netpol-load:dev";

/// The kind benchmark's load image, run as deploy/kind/bench/pods.yaml runs it: a server
/// (`netpol-lab serve` and, sharing its network, `iperf3 -s`) and a client running
/// `load --address` against it, whose JSON is the lab's load report.
#[test]
#[ignore = "needs root: runs containers with podman"]
fn the_load_image_measures_from_one_container_to_another() {
    assert!(
        podman(&["image", "exists", LOAD_IMAGE]).status.success(),
        "{LOAD_IMAGE} is not in local storage: cargo xtask image --debug --tag dev"
    );
    // crun refuses this machine's cgroups; raised rlimits are refused (TOOLCHAIN.md).
    let run = [
        "run",
        "--runtime",
        "runc",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
    ];
    let serve = Container {
        name: format!("netpol-load-serve-{}", std::process::id()),
        pins: std::env::temp_dir().join("netpol-load-test-unused"),
    };
    let iperf3 = Container {
        name: format!("netpol-load-iperf3-{}", std::process::id()),
        pins: serve.pins.clone(),
    };
    let out = podman(&[&run[..], &["--detach", "--name", &serve.name, LOAD_IMAGE]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let network = format!("container:{}", serve.name);
    let out = podman(
        &[
            &run[..],
            &["--detach", "--name", &iperf3.name, "--network", &network],
            &[
                "--entrypoint",
                "/usr/bin/iperf3",
                LOAD_IMAGE,
                "-s",
                "-p",
                "5201",
            ],
        ]
        .concat(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ip = String::from_utf8_lossy(
        &podman(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.IPAddress}}",
            &serve.name,
        ])
        .stdout,
    )
    .trim()
    .to_string();
    assert!(!ip.is_empty(), "the server container has no address");
    let load = |kind: &str, port: &str| -> Value {
        let address = format!("{ip}:{port}");
        // The servers may still be binding: a few tries.
        for _ in 0..10 {
            let out = podman(
                &[
                    &run[..],
                    &["--rm", LOAD_IMAGE, "load", "--address", &address],
                    &["--kind", kind, "--seconds", "1", "-o", "json"],
                ]
                .concat(),
            );
            if out.status.success() {
                return serde_json::from_slice(&out.stdout).unwrap();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("load --kind {kind} --address {address} never succeeded");
    };
    let rr = load("rr", "80");
    assert_eq!(rr["kind"], "rr");
    assert_eq!(rr["address"], ip.as_str());
    assert!(rr["transactions"].as_u64().unwrap() > 100, "{rr}");
    let stream = load("stream", "5201");
    assert!(stream["throughput_bps"].as_f64().unwrap() > 1e6, "{stream}");
    // Nothing listens on 81: the load fails, with a non-zero exit.
    let out = podman(
        &[
            &run[..],
            &[
                "--rm",
                LOAD_IMAGE,
                "load",
                "--address",
                &format!("{ip}:81"),
                "--kind",
                "rr",
                "--seconds",
                "1",
            ],
        ]
        .concat(),
    );
    assert!(!out.status.success());
    drop(iperf3);
}

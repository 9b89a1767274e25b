//! What a lab's agent reports under real packets: `netpol observe` verdicts, node
//! probes, node-wide audit, metrics and health, staged policies, per-policy counters.
//! Needs root. Every test has its own lab name, so they run in parallel, and a guard
//! that tears its lab down even when an assertion fails.

mod support;

use support::lab::{in_netns, Lab, NETPOL};
use support::manifests::{ALLOW_B_TO_A, DENY_X, PODS};

use std::process::Command;

use serde_json::Value;

#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_drop_shows_up_in_observe_with_pods_and_the_isolating_policy() {
    let lab = Lab::up("obs", &[("pods.yaml", PODS), ("deny.yaml", DENY_X)], &[]);
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

/// Starts `netpol observe` on the lab for the first verdict matching `filter`.
fn observer(lab: &Lab, filter: &[&str]) -> std::process::Child {
    Command::new(NETPOL)
        .args(["observe", "--lab", &lab.name, "--count", "1", "-o", "json"])
        .args(filter)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Repeats `act` until the observer has its verdict (the verdict itself is the signal
/// that it subscribed in time), at most `tries` times; returns the verdict.
fn observe_while(
    lab: &Lab,
    mut obs: std::process::Child,
    tries: usize,
    mut act: impl FnMut(),
) -> Value {
    for _ in 0..tries {
        act();
        if obs.try_wait().unwrap().is_some() {
            let out = obs.wait_with_output().unwrap();
            return serde_json::from_slice(&out.stdout).unwrap();
        }
    }
    let _ = obs.kill();
    panic!("no verdict reached `netpol observe`\n{}", lab.logs());
}

/// A TCP connection from the node itself (a kubelet probe) to a pod's port 80.
fn from_node(lab: &Lab, to: std::net::IpAddr) -> bool {
    let node = lab.status()["nodes"][0]["netns"]
        .as_str()
        .unwrap()
        .to_string();
    in_netns(&node, move || {
        std::net::TcpStream::connect_timeout(&(to, 80).into(), std::time::Duration::from_secs(1))
            .is_ok()
    })
}

/// Kubelet probes (from the node's address) reach pods under default deny, and are
/// visible as allows (sampled) like any other verdict; with --deny-host-traffic they
/// are judged by policy, dropped, and reported.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn node_probes_pass_default_deny_unless_turned_off_and_are_reported() {
    let lab = Lab::with_agent(
        "host",
        &[("pods.yaml", PODS), ("deny.yaml", DENY_X)],
        &["--sample-allows=1"],
    );
    lab.wait();
    let a = lab.pod_net("x/a");
    let obs = observer(&lab, &["--verdict", "allowed", "--pod", "x/a"]);
    let v = observe_while(&lab, obs, 10, || {
        assert!(from_node(&lab, a.v4), "the node reaches x/a")
    });
    assert_eq!(
        (v["reason"].as_str(), v["direction"].as_str()),
        (Some("HOST_TRAFFIC"), Some("ingress"))
    );
    assert!(from_node(&lab, a.v6), "over IPv6 too");
    assert_eq!(
        lab.result(80, "TCP", "x/b", "x/a"),
        "timeout",
        "pods are still denied"
    );
    drop(lab);

    let lab = Lab::with_agent(
        "nohost",
        &[("pods.yaml", PODS), ("deny.yaml", DENY_X)],
        &["--deny-host-traffic"],
    );
    lab.wait();
    let a = lab.pod_net("x/a");
    let obs = observer(&lab, &["--verdict", "dropped", "--pod", "x/a"]);
    let v = observe_while(&lab, obs, 10, || assert!(!from_node(&lab, a.v4)));
    assert_eq!(v["reason"].as_str(), Some("POLICY_DENIED"));
}

/// Node-wide audit: what default deny would drop passes, reported as AUDIT once per
/// connection; the exact counters say how much would have been dropped.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn node_wide_audit_lets_would_be_drops_pass_and_reports_them() {
    let lab = Lab::with_agent(
        "audit",
        &[("pods.yaml", PODS), ("deny.yaml", DENY_X)],
        &["--audit"],
    );
    lab.wait();
    let obs = observer(&lab, &["--verdict", "audit", "--pod", "x/a"]);
    let v = observe_while(&lab, obs, 10, || {
        assert_eq!(
            lab.result(80, "TCP", "x/b", "x/a"),
            "connected",
            "audit does not drop"
        );
    });
    assert_eq!(
        (
            v["reason"].as_str(),
            v["direction"].as_str(),
            v["src"].as_str()
        ),
        (Some("POLICY_DENIED"), Some("ingress"), Some("x/b"))
    );
    assert!(lab.agent_count("audit", "POLICY_DENIED", "ingress") >= 1);
    assert_eq!(lab.agent_count("dropped", "POLICY_DENIED", "ingress"), 0);
}

/// GET `path` from the lab agent's metrics server (it listens in the node's netns).
fn scrape(lab: &Lab, path: &str) -> (u16, String) {
    let status: Value = serde_json::from_str(&lab.agent_request("status")).unwrap();
    let addr: std::net::SocketAddr = status["metrics_addr"]
        .as_str()
        .expect("the lab agent serves metrics")
        .parse()
        .unwrap();
    let port = addr.port();
    let netns = lab.status()["nodes"][0]["netns"]
        .as_str()
        .unwrap()
        .to_string();
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let reply = in_netns(&netns, move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    let code = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

fn sum_of(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn metrics_and_health_are_served_and_the_drop_counter_moves() {
    let lab = Lab::up("mtr", &[("pods.yaml", PODS), ("deny.yaml", DENY_X)], &[]);
    lab.wait();
    assert_eq!(scrape(&lab, "/healthz").0, 200);
    assert_eq!(
        scrape(&lab, "/readyz").0,
        200,
        "ready once the datapath enforces"
    );
    let (code, before) = scrape(&lab, "/metrics");
    assert_eq!(code, 200);
    for name in [
        "netpol_drops_total",
        "netpol_allowed_connections_total",
        "netpol_endpoints",
        "netpol_policies",
        "netpol_identities",
        "netpol_map_entries",
        "netpol_map_capacity",
        "netpol_compile_duration_seconds",
        "netpol_sync_duration_seconds",
        "netpol_events_total",
        "netpol_invalid_objects",
    ] {
        assert!(before.contains(name), "{name} missing:\n{before}");
    }
    let denied = "netpol_drops_total{reason=\"POLICY_DENIED\"";
    assert_eq!(lab.result(80, "TCP", "x/b", "x/a"), "timeout");
    let (_, after) = scrape(&lab, "/metrics");
    assert!(
        sum_of(&after, denied) > sum_of(&before, denied),
        "a denied connection attempt moves the drop counter:\n{after}"
    );
    assert!(sum_of(&after, "netpol_endpoints ") >= 3.0, "{after}");
}

const STAGED_DENY_X: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: staged-deny, namespace: x, annotations: {netpol.io/mode: audit}}
spec: {podSelector: {}}
"#;

/// Issue 7, audit per policy: a default deny staged with `netpol.io/mode: audit` drops
/// nothing, and `observe --verdict audit` shows exactly what it would drop, attributed
/// to it; once enforced (annotation gone), the same flow is dropped.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_staged_default_deny_reports_what_it_would_drop_and_drops_nothing() {
    let lab = Lab::up(
        "stage",
        &[("pods.yaml", PODS), ("deny.yaml", STAGED_DENY_X)],
        &[],
    );
    lab.wait();
    let obs = observer(&lab, &["--verdict", "audit", "--pod", "x/a"]);
    let v = observe_while(&lab, obs, 10, || {
        assert_eq!(lab.result(80, "TCP", "y/c", "x/a"), "connected");
    });
    assert_eq!(
        (
            v["reason"].as_str(),
            v["direction"].as_str(),
            v["src"].as_str()
        ),
        (Some("POLICY_DENIED"), Some("ingress"), Some("y/c"))
    );
    assert_eq!(v["policies"], serde_json::json!(["x/staged-deny (audit)"]));
    assert_eq!(lab.agent_count("dropped", "POLICY_DENIED", "ingress"), 0);
    // Staging touches no other pod and no other direction.
    assert_eq!(lab.result(80, "TCP", "x/a", "y/c"), "connected");

    // Enforced: the same flow is dropped.
    lab.write(
        "deny.yaml",
        &STAGED_DENY_X.replace("netpol.io/mode: audit", "netpol.io/mode: enforce"),
    );
    lab.wait();
    assert_eq!(lab.result(80, "TCP", "y/c", "x/a"), "timeout");
}

/// Issue 7, per-policy counters: the rule that allowed a connection counts its packets
/// and bytes, drops count per namespace and isolating policy set, in `netpol status`
/// and in the metrics.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn per_policy_counters_name_the_rule_and_the_isolating_policies() {
    let lab = Lab::up(
        "tally",
        &[
            ("pods.yaml", PODS),
            ("deny.yaml", DENY_X),
            ("allow.yaml", ALLOW_B_TO_A),
        ],
        &[],
    );
    lab.wait();
    assert_eq!(lab.result(80, "TCP", "x/b", "x/a"), "connected");
    assert_eq!(lab.result(80, "TCP", "y/c", "x/a"), "timeout");
    let out = Command::new(NETPOL)
        .args(["status", "--lab", &lab.name, "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rules = status["tally"]["rules"].as_array().unwrap();
    let rule = rules
        .iter()
        .find(|r| r["policy"] == "x/a-from-b")
        .unwrap_or_else(|| panic!("the allowing rule is counted: {status}"));
    assert_eq!(
        (rule["direction"].as_str(), rule["rule"].as_u64()),
        (Some("ingress"), Some(0))
    );
    // A TCP connection and its close: at least SYN, SYN-ACK, ACK, FIN both ways.
    assert!(rule["packets"].as_u64().unwrap() >= 4, "{rule}");
    assert!(rule["bytes"].as_u64().unwrap() >= 4 * 40, "{rule}");
    let drops = status["tally"]["drops"].as_array().unwrap();
    let x = drops
        .iter()
        .find(|d| d["namespace"] == "x" && d["direction"] == "ingress" && d["verdict"] == "dropped")
        .unwrap_or_else(|| panic!("x's ingress drops are counted: {status}"));
    assert_eq!(
        x["policies"],
        serde_json::json!(["x/a-from-b", "x/default-deny"]),
        "every policy isolating x/a"
    );
    assert!(x["packets"].as_u64().unwrap() >= 1);
    let (_, metrics) = scrape(&lab, "/metrics");
    assert!(
        sum_of(
            &metrics,
            "netpol_rule_allowed_packets_total{policy=\"x/a-from-b\""
        ) >= 4.0,
        "{metrics}"
    );
    assert!(
        sum_of(&metrics, "netpol_namespace_drops_total{namespace=\"x\",direction=\"ingress\",verdict=\"dropped\"") >= 1.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("netpol_policy_set_drops_total{namespace=\"x\""),
        "{metrics}"
    );
}

/// Issue 16: with the kernel's program statistics on, `netpol status` shows what each
/// program costs per packet (the kernel's own count of runs and nanoseconds).
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn status_shows_the_kernels_cost_per_packet_while_bpf_stats_are_on() {
    let lab = Lab::up("stats", &[("pods.yaml", PODS), ("deny.yaml", DENY_X)], &[]);
    lab.wait();
    // Counting lasts while this descriptor is open (BPF_ENABLE_STATS).
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    assert_eq!(lab.result(80, "TCP", "x/b", "y/c"), "connected");
    let status: Value = serde_json::from_str(&lab.netpol(&["status", "-o", "json"])).unwrap();
    for p in ["from_pod", "to_pod"] {
        let runs = &status["agent"]["program_runs"][p];
        let (n, ns) = (
            runs["runs"].as_u64().unwrap_or(0),
            runs["run_time_ns"].as_u64().unwrap_or(0),
        );
        assert!(n >= 3, "{p} counted the connection's packets: {status}");
        assert!(ns > 0 && ns / n < 100_000, "{p}: {ns} ns over {n} runs");
    }
    let table = lab.netpol(&["status"]);
    assert!(
        table.contains("cost per packet (bpf_stats): from_pod"),
        "{table}"
    );
}

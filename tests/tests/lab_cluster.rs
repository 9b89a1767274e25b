//! The troubleshooting guides' scenarios on a multi-node lab: Services through the lab's
//! kube-proxy (iptables DNAT), cluster DNS, egress judged on the real backend, on one
//! node and across the VXLAN overlay. Needs root; every test has its own lab name and a
//! guard that tears the lab down even when an assertion fails.

mod support;

use support::lab::{Lab, NETPOL};

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Clients in `x` on node0 and node1, the cluster DNS pinned to node1: one client
/// resolves on its node, the other across the overlay.
const DNS_CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  nodeName: node1
  containers:
  - name: coredns
    ports:
    - {name: dns, containerPort: 53, protocol: UDP}
    - {name: dns-tcp, containerPort: 53, protocol: TCP}
---
apiVersion: v1
kind: Pod
metadata: {name: near, namespace: x, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: far, namespace: x, labels: {app: client}}
spec: {nodeName: node0, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec: {selector: {app: client}, ports: [{port: 80}]}
"#;

const DENY_EGRESS_X: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-egress, namespace: x}
spec: {podSelector: {}, policyTypes: [Egress]}
"#;

/// The guides' fix: egress to the kube-dns pods, by namespace and pod labels.
fn dns_rule(namespace_labels: &str, ports: &str) -> String {
    format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-dns, namespace: x}}
spec:
  podSelector: {{}}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {{matchLabels: {namespace_labels}}}
      podSelector: {{matchLabels: {{k8s-app: kube-dns}}}}
    ports: {ports}
"#
    )
}

const UDP_AND_TCP_53: &str = "[{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]";

#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn dns_under_default_deny_egress_needs_the_kube_dns_rule_on_one_node_and_across_nodes() {
    let lab = Lab::cluster("dns", 2, &[("cluster.yaml", DNS_CLUSTER)]);
    assert_eq!(lab.node_of("kube-system/coredns"), "node1");
    assert_eq!(lab.node_of("x/far"), "node0");
    let name = "web.x.svc.cluster.local";
    let svc_ip = lab.status()["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap()["cluster_ip"]
        .as_str()
        .unwrap()
        .to_string();
    let answered = |lab: &Lab, tcp: bool| -> [bool; 2] {
        ["x/near", "x/far"].map(|from| {
            let (result, addrs) = lab.resolve_addrs(from, name, tcp);
            if result == "answered" {
                assert_eq!(addrs, vec![svc_ip.clone()], "{from}");
            }
            result == "answered"
        })
    };

    // Open: both clients resolve, over UDP and TCP, through the ClusterIP 10.96.0.10.
    assert_eq!(answered(&lab, false), [true, true], "no policy, UDP");
    assert_eq!(answered(&lab, true), [true, true], "no policy, TCP");

    // Default-deny egress breaks name resolution.
    lab.apply(&[("deny.yaml", Some(DENY_EGRESS_X))]);
    assert_eq!(answered(&lab, false), [false, false], "default deny, UDP");
    assert_eq!(answered(&lab, true), [false, false], "default deny, TCP");

    // The fix: namespaceSelector + podSelector to kube-dns, UDP and TCP 53.
    let by_name = "{kubernetes.io/metadata.name: kube-system}";
    lab.apply(&[("dns.yaml", Some(&dns_rule(by_name, UDP_AND_TCP_53)))]);
    assert_eq!(answered(&lab, false), [true, true], "kube-dns rule, UDP");
    assert_eq!(answered(&lab, true), [true, true], "kube-dns rule, TCP");

    // Only UDP 53: small queries answer, a TCP query does not.
    let udp_only = dns_rule(by_name, "[{protocol: UDP, port: 53}]");
    lab.apply(&[("dns.yaml", Some(&udp_only))]);
    assert_eq!(answered(&lab, false), [true, true], "UDP-only rule, UDP");
    assert_eq!(answered(&lab, true), [false, false], "UDP-only rule, TCP");

    // A label the namespace does not carry blocks DNS.
    let wrong = dns_rule("{name: kube-system}", UDP_AND_TCP_53);
    lab.apply(&[("dns.yaml", Some(&wrong))]);
    assert_eq!(answered(&lab, false), [false, false], "name: kube-system");
}

const FRONTEND_API: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend-near, namespace: shop, labels: {app: frontend}}
spec: {nodeName: node1, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend-far, namespace: shop, labels: {app: frontend}}
spec: {nodeName: node0, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec: {nodeName: node1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {selector: {app: api}, ports: [{port: 80, targetPort: http}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
"#;

const FRONTEND_EGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend-to-api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: frontend}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 8080}]
"#;

const API_INGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-frontend, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: frontend}}}]
    ports: [{port: http}]
"#;

#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn a_frontend_reaches_the_api_service_only_when_its_egress_and_the_api_ingress_allow() {
    let lab = Lab::cluster("fe", 2, &[("shop.yaml", FRONTEND_API)]);
    // Through the ClusterIP (port 80 → targetPort http = 8080), from the api's node and
    // from the other one; the rule names the backend's port, as egress is judged after DNAT.
    let reach = |lab: &Lab| -> Vec<String> {
        let r = lab.probe_rows(&["--via", "service", "--to", "shop/api", "--port", "8080"]);
        let mut out: Vec<(String, String)> = r
            .into_iter()
            .filter(|[from, ..]| from.starts_with("shop/frontend"))
            .map(|[from, _, result, address, _]| {
                assert!(
                    address.starts_with("10.96."),
                    "via the ClusterIP: {address}"
                );
                (from, result)
            })
            .collect();
        out.sort();
        out.into_iter().map(|(_, r)| r).collect()
    };
    // [frontend-far (node0), frontend-near (node1)]
    assert_eq!(reach(&lab), ["timeout", "timeout"], "default deny");
    lab.apply(&[("egress.yaml", Some(FRONTEND_EGRESS))]);
    assert_eq!(reach(&lab), ["timeout", "timeout"], "egress only");
    lab.apply(&[("egress.yaml", None), ("ingress.yaml", Some(API_INGRESS))]);
    assert_eq!(reach(&lab), ["timeout", "timeout"], "ingress only");
    lab.apply(&[("egress.yaml", Some(FRONTEND_EGRESS))]);
    assert_eq!(reach(&lab), ["connected", "connected"], "both");
    // And by name, through the cluster DNS (whose egress the frontends lack: it fails).
    let r = lab.probe_rows(&["--via", "dns", "--to", "shop/api", "--port", "8080"]);
    assert!(
        r.iter()
            .filter(|x| x[0].starts_with("shop/frontend"))
            .all(|x| x[2] == "unresolved"),
        "{r:?}"
    );
}

const TWO_BACKENDS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: x, labels: {app: client}}
spec: {nodeName: node0, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: web, replica: a}}
spec: {nodeName: node0, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: web, replica: b}}
spec: {nodeName: node1, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec: {selector: {app: web}, ports: [{port: 8080, targetPort: http}]}
"#;

fn egress_to_replica(replica: &str) -> String {
    format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: client-egress, namespace: x}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{podSelector: {{matchLabels: {{replica: {replica}}}}}}}]
    ports: [{{port: 80}}]
"#
    )
}

/// Connections to the Service land on a or b at random; tally (backend or "timeout").
fn tally(lab: &Lab) -> std::collections::BTreeMap<String, usize> {
    let r = lab.probe_rows(&[
        "--service",
        "x/web",
        "--from",
        "x/client",
        "--port",
        "8080",
        "--repeat",
        "16",
    ]);
    let mut t = std::collections::BTreeMap::new();
    for [_, _, result, address, backend] in r {
        assert!(address.starts_with("10.96."), "{address}");
        let k = if result == "connected" {
            backend
        } else {
            result
        };
        *t.entry(k).or_insert(0) += 1;
    }
    t
}

#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn egress_allowed_to_one_backend_of_a_service_passes_there_and_times_out_on_the_other() {
    let lab = Lab::cluster("two", 2, &[("two.yaml", TWO_BACKENDS)]);
    // a is on the client's node (judged at a's to_pod), b across the overlay (judged at
    // flannel.1). 16 tries each: both sides are hit with probability 1 - 2^-15.
    let open = tally(&lab);
    assert_eq!(open.get("timeout"), None, "{open:?}");
    assert!(
        open.contains_key("x/a") && open.contains_key("x/b"),
        "{open:?}"
    );

    lab.apply(&[("egress.yaml", Some(&egress_to_replica("a")))]);
    let t = tally(&lab);
    assert!(t.contains_key("x/a") && t.contains_key("timeout"), "{t:?}");
    assert_eq!(t.get("x/b"), None, "the remote backend is denied: {t:?}");

    lab.apply(&[("egress.yaml", Some(&egress_to_replica("b")))]);
    let t = tally(&lab);
    assert!(t.contains_key("x/b") && t.contains_key("timeout"), "{t:?}");
    assert_eq!(t.get("x/a"), None, "the local backend is denied: {t:?}");
}

const MONITORING: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: monitoring}
---
apiVersion: v1
kind: Namespace
metadata: {name: app}
---
apiVersion: v1
kind: Pod
metadata: {name: prometheus, namespace: monitoring, labels: {app: prometheus}}
spec: {nodeName: node0, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: grafana, namespace: monitoring, labels: {app: grafana}}
spec: {nodeName: node0, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: app, labels: {app: web}}
spec: {nodeName: node1, containers: [{name: c, ports: [{name: metrics, containerPort: 9090}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: worker, namespace: app, labels: {app: worker}}
spec: {nodeName: node0, containers: [{name: c, ports: [{name: metrics, containerPort: 9090}]}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: app}
spec: {podSelector: {}, policyTypes: [Ingress]}
"#;

/// The documented rule: ingress on the metrics port from Prometheus in `monitoring`.
const ALLOW_SCRAPE: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-prometheus, namespace: app}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}
      podSelector: {matchLabels: {app: prometheus}}
    ports: [{port: metrics}]
"#;

#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn prometheus_scrapes_a_default_deny_namespace_only_with_the_documented_rule() {
    let lab = Lab::cluster("prom", 2, &[("mon.yaml", MONITORING)]);
    let scrape = |lab: &Lab| -> Vec<(String, String, String)> {
        let mut r: Vec<_> = lab
            .probe_rows(&["--port", "9090"])
            .into_iter()
            .filter(|x| x[0].starts_with("monitoring/") && x[1].starts_with("app/"))
            .map(|[from, to, result, _, _]| (from, to, result))
            .collect();
        r.sort();
        r
    };
    let row = |from: &str, to: &str, result: &str| (from.into(), to.into(), result.into());
    assert_eq!(
        scrape(&lab),
        vec![
            row("monitoring/grafana", "app/web", "timeout"),
            row("monitoring/grafana", "app/worker", "timeout"),
            row("monitoring/prometheus", "app/web", "timeout"),
            row("monitoring/prometheus", "app/worker", "timeout"),
        ]
    );
    lab.apply(&[("scrape.yaml", Some(ALLOW_SCRAPE))]);
    // web is on the other node, worker on Prometheus's own.
    assert_eq!(
        scrape(&lab),
        vec![
            row("monitoring/grafana", "app/web", "timeout"),
            row("monitoring/grafana", "app/worker", "timeout"),
            row("monitoring/prometheus", "app/web", "connected"),
            row("monitoring/prometheus", "app/worker", "connected"),
        ]
    );
}

/// Everything of lab `name` that can outlive it: namespaces, resolver files, state.
fn leftovers(name: &str) -> Vec<String> {
    let prefix = format!("np-{name}-");
    let mut out: Vec<String> = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .lines()
    .filter(|l| l.starts_with(&prefix))
    .map(|l| format!("netns {l}"))
    .collect();
    if let Ok(dir) = std::fs::read_dir("/etc/netns") {
        out.extend(
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(&prefix))
                .map(|n| format!("/etc/netns/{n}")),
        );
    }
    let state = Path::new("/run/netpol/lab").join(name);
    if state.exists() {
        out.push(state.display().to_string());
    }
    // Processes of the lab: its supervisor, agents and pod servers name it.
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let ours = args
            .iter()
            .any(|a| a.starts_with(state.to_str().unwrap().as_bytes()))
            || args
                .windows(2)
                .any(|w| w[0] == b"--name" && w[1] == name.as_bytes())
            || args.iter().any(|a| a.starts_with(prefix.as_bytes()));
        if ours && e.file_name() != std::process::id().to_string().as_str() {
            out.push(format!("process {:?}", e.file_name()));
        }
    }
    out
}

#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn lab_down_and_a_crashed_lab_leave_nothing_behind() {
    for crash in [false, true] {
        let lab = Lab::cluster(
            if crash { "crash" } else { "down" },
            2,
            &[("two.yaml", TWO_BACKENDS)],
        );
        let name = lab.name.clone();
        assert!(!leftovers(&name).is_empty(), "the lab is up");
        // The rules are in place: kube-proxy chains in every node's nat table.
        for node in ["node0", "node1"] {
            let out = Command::new("ip")
                .args(["netns", "exec", &format!("np-{name}-{node}")])
                .args(["iptables", "-t", "nat", "-S", "KUBE-SERVICES"])
                .output()
                .unwrap();
            let rules = String::from_utf8_lossy(&out.stdout);
            assert!(rules.contains("x/web:"), "{node}: {rules}");
        }
        if crash {
            // The supervisor and every agent die at once, as in a machine-wide OOM kill.
            let st = lab.status();
            let state: Value = serde_json::from_str(
                &std::fs::read_to_string(format!("/run/netpol/lab/{name}/state.json")).unwrap(),
            )
            .unwrap();
            let mut pids = vec![state["supervisor_pid"].as_i64().unwrap()];
            pids.extend(
                st["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| n["agent_pid"].as_i64().unwrap()),
            );
            for pid in pids {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        lab.netpol(&["lab", "down"]);
        let left = leftovers(&name);
        assert!(left.is_empty(), "crash={crash}: {left:?}");
    }
}

#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn load_reports_throughput_transaction_rates_and_latencies_across_nodes() {
    let lab = Lab::cluster("load", 2, &[("two.yaml", TWO_BACKENDS)]);
    let run = |kind: &str| -> Value {
        serde_json::from_str(&lab.netpol(&[
            "lab",
            "load",
            "--from",
            "x/client",
            "--to",
            "x/b",
            "--kind",
            kind,
            "--seconds",
            "0.5",
            "-o",
            "json",
        ]))
        .unwrap()
    };
    let stream = run("stream");
    assert!(stream["throughput_bps"].as_f64().unwrap() > 1e6, "{stream}");
    for kind in ["rr", "crr"] {
        let r = run(kind);
        assert!(r["transactions"].as_u64().unwrap() > 10, "{r}");
        let l = &r["latency"];
        assert!(
            l["p50_us"].as_f64().unwrap() <= l["p99_us"].as_f64().unwrap(),
            "{r}"
        );
    }
    assert!(run("crr")["connections_per_sec"].as_f64().unwrap() > 20.0);
    // Denied, the generators fail loudly instead of reporting zeros.
    lab.apply(&[("deny.yaml", Some(DENY_EGRESS_X))]);
    let out = Command::new(NETPOL)
        .args([
            "lab", "load", "--name", &lab.name, "--from", "x/client", "--to", "x/b",
        ])
        .args(["--kind", "rr", "--seconds", "0.5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

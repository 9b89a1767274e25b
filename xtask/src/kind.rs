//! `cargo xtask kind`: the image on a kind cluster beside Flannel, and the scenario
//! suite (deploy/kind/scenarios) probed pod to pod with kubectl.

use std::path::Path;
use std::process::Command;

use crate::{image, root, run, scenario, step, succeeds, suite, Result};

const FLANNEL_MANIFEST: &str =
    "https://github.com/flannel-io/flannel/releases/latest/download/kube-flannel.yml";

/// The kind path: fails at once, naming what is missing, where there is no container
/// engine (these machines).
pub fn kind(bench: bool) -> Result {
    // kubectl's own version: there is no cluster to ask yet.
    for (tool, args) in [
        ("docker", &["version"][..]),
        ("kind", &["version"]),
        ("kubectl", &["version", "--client"]),
    ] {
        if !succeeds(Command::new(tool).args(args)) {
            return Err(format!(
                "`cargo xtask kind` needs {tool} (docker, kind and kubectl), which is not usable here; \
                 run it on a machine with a container engine. Here the scenario suite \
                 (deploy/kind/scenarios) is checked against `netpol simulate` (cargo test -p \
                 netpol-tests --test deploy) and the lab (--test lab_scenarios)"
            ));
        }
    }
    let root = root();
    // The same image as `cargo xtask image`, tagged as deploy/kustomization.yaml names it.
    let archive = image::build(true, "latest")?;
    let load_archive = image::build_load(true, "latest")?;
    step("creating the kind cluster");
    run(Command::new("kind").current_dir(&root).args([
        "create",
        "cluster",
        "--name",
        "netpol",
        "--config",
        "deploy/kind.yaml",
    ]))?;
    for a in [&archive, &load_archive] {
        run(Command::new("kind")
            .args(["load", "image-archive"])
            .arg(a)
            .args(["--name", "netpol"]))?;
    }
    step("installing Flannel and netpol");
    run(Command::new("kubectl").args(["apply", "-f", FLANNEL_MANIFEST]))?;
    run(Command::new("kubectl")
        .current_dir(&root)
        .args(["apply", "-k", "deploy/"]))?;
    run(Command::new("kubectl").args([
        "-n",
        "kube-system",
        "rollout",
        "status",
        "daemonset/netpol",
        "--timeout=300s",
    ]))?;
    if bench {
        step("running the benchmark scenarios against the cluster");
        return suite(&[], false, "kind");
    }
    step("running the scenario suite against the cluster");
    scenarios_on_cluster(&root.join("deploy/kind/scenarios"))?;
    eprintln!("every scenario holds; the cluster stays up (kind delete cluster --name netpol)");
    Ok(())
}

/// Rounds of probes per scenario: `kubectl apply` returns before the agents have synced.
const PROBE_ROUNDS: usize = 5;

/// The scenario suite against the cluster kubectl points at: the suite's pods once, then
/// each scenario's policies in turn, every pair of every expected matrix probed with
/// `/agnhost connect` from inside the sending pod. The same files are proven on
/// machines without a cluster by netpol-agent's tests (`netpol simulate`, the lab).
fn scenarios_on_cluster(dir: &Path) -> Result {
    let all = scenario::load_all(dir)?;
    let cluster = dir.join(scenario::CLUSTER);
    run(Command::new("kubectl").arg("apply").arg("-f").arg(&cluster))?;
    let pods: std::collections::BTreeSet<String> = all
        .iter()
        .flat_map(|s| &s.expectations)
        .flat_map(|e| e.pods.iter().cloned())
        .collect();
    let namespaces: std::collections::BTreeSet<&str> = pods
        .iter()
        .filter_map(|p| p.split_once('/'))
        .map(|(ns, _)| ns)
        .collect();
    for ns in namespaces {
        run(Command::new("kubectl").args([
            "wait",
            "--for=condition=Ready",
            "pod",
            "--all",
            "-n",
            ns,
            "--timeout=300s",
        ]))?;
    }
    let mut ips = std::collections::BTreeMap::new();
    for pod in &pods {
        let (ns, name) = pod.split_once('/').expect("namespace/pod");
        let out = Command::new("kubectl")
            .args([
                "get",
                "pod",
                "-n",
                ns,
                name,
                "-o",
                "jsonpath={.status.podIP}",
            ])
            .output()
            .map_err(|e| format!("kubectl get pod {pod}: {e}"))?;
        let ip = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || ip.is_empty() {
            return Err(format!("pod {pod} has no address"));
        }
        ips.insert(pod.clone(), ip);
    }
    let mut failed = Vec::new();
    for sc in &all {
        step(&format!("scenario {}", sc.name));
        run(Command::new("kubectl")
            .arg("apply")
            .arg("-f")
            .arg(&sc.manifests))?;
        let mut wrong = Vec::new();
        for _ in 0..PROBE_ROUNDS {
            wrong = sc
                .expectations
                .iter()
                .flat_map(|e| probe_matrix(e, &ips))
                .collect();
            if wrong.is_empty() {
                break;
            }
        }
        run(Command::new("kubectl")
            .args(["delete", "--wait", "-f"])
            .arg(&sc.manifests))?;
        for w in &wrong {
            eprintln!("    {w}");
        }
        if !wrong.is_empty() {
            failed.push(sc.name.clone());
        }
    }
    let _ = run(Command::new("kubectl")
        .args(["delete", "--wait=false", "-f"])
        .arg(&cluster));
    match failed.is_empty() {
        true => Ok(()),
        false => Err(format!("scenarios that do not hold: {}", failed.join(", "))),
    }
}

/// Every pair of one expectation at once (a refused connection waits for its timeout);
/// the pairs whose outcome differs from the expected one.
fn probe_matrix(
    e: &scenario::Expectation,
    ips: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    let mark = |connects: bool| if connects { "✓" } else { "✗" };
    let probes: Vec<_> = e
        .connects
        .iter()
        .map(|((from, to), want)| {
            let (from, to, want) = (from.clone(), to.clone(), *want);
            let addr = format!("{}:{}", ips[&to], e.port);
            let protocol = format!("--protocol={}", e.protocol.to_lowercase());
            std::thread::spawn(move || {
                let (ns, pod) = from.split_once('/').expect("namespace/pod");
                let connects = succeeds(Command::new("kubectl").args([
                    "exec",
                    "-n",
                    ns,
                    pod,
                    "-c",
                    "serve-80-tcp",
                    "--",
                    "/agnhost",
                    "connect",
                    &addr,
                    "--timeout=2s",
                    &protocol,
                ]));
                (connects != want).then(|| {
                    format!(
                        "{from} to {to} ({addr}): expected {}, got {}",
                        mark(want),
                        mark(connects)
                    )
                })
            })
        })
        .collect();
    probes
        .into_iter()
        .filter_map(|p| p.join().expect("a probe thread panicked"))
        .collect()
}

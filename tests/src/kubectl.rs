//! The kubectl command lines of the kind benchmark (`cargo xtask kind --bench`): its
//! pods (deploy/kind/bench/pods.yaml) applied and waited for, and the load run inside
//! the client pod with `netpol-lab load --address`, whose JSON is the lab's.

use std::process::Command;

use thiserror::Error;

use crate::lab::{LoadKind, LoadReport};

/// The namespace and pods of deploy/kind/bench/pods.yaml.
pub const NAMESPACE: &str = "x";
pub const CLIENT: &str = "client";
/// Where the image puts the load generator.
pub const LOAD_BIN: &str = "/netpol-lab";

#[derive(Debug, Error)]
pub enum KubectlError {
    #[error("running kubectl {args}: {source} (is kubectl installed?)")]
    Spawn {
        args: String,
        source: std::io::Error,
    },
    #[error("kubectl {args} failed ({status}): {stderr}")]
    Failed {
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("kubectl {args}: not a load report: {source}")]
    Report {
        args: String,
        source: serde_json::Error,
    },
    #[error("pod {0} has no address yet")]
    NoAddress(String),
}

pub fn apply_file(path: &str) -> Vec<String> {
    args(&["apply", "-f", path])
}

/// `kubectl apply -f -`: the manifest comes on stdin (the plan renders its policies).
pub fn apply_stdin() -> Vec<String> {
    args(&["apply", "-f", "-"])
}

pub fn delete_policy(name: &str) -> Vec<String> {
    args(&[
        "delete",
        "networkpolicy",
        "-n",
        NAMESPACE,
        name,
        "--ignore-not-found",
        "--wait",
    ])
}

pub fn wait_ready(timeout_s: u64) -> Vec<String> {
    args(&[
        "wait",
        "--for=condition=Ready",
        "pod",
        "--all",
        "-n",
        NAMESPACE,
        &format!("--timeout={timeout_s}s"),
    ])
}

pub fn pod_ip(pod: &str) -> Vec<String> {
    args(&[
        "get",
        "pod",
        "-n",
        NAMESPACE,
        pod,
        "-o",
        "jsonpath={.status.podIP}",
    ])
}

/// The load from the client pod to `ip` (its servers' default ports), JSON on stdout.
pub fn load(ip: &str, kind: LoadKind, seconds: f64, streams: u32) -> Vec<String> {
    let kind = match kind {
        LoadKind::Stream => "stream",
        LoadKind::Rr => "rr",
        LoadKind::Crr => "crr",
        LoadKind::Udp => "udp",
    };
    args(&[
        "exec",
        "-n",
        NAMESPACE,
        CLIENT,
        "-c",
        "load",
        "--",
        LOAD_BIN,
        "load",
        "--address",
        ip,
        "--kind",
        kind,
        "--seconds",
        &seconds.to_string(),
        "--streams",
        &streams.to_string(),
        "-o",
        "json",
    ])
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Runs kubectl with `args` (and `stdin`, if any): its stdout.
pub fn run(args: &[String], stdin: Option<&str>) -> Result<String, KubectlError> {
    use std::io::Write;
    let shown = args.join(" ");
    let spawn = |source| KubectlError::Spawn {
        args: shown.clone(),
        source,
    };
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("piped");
        pipe.write_all(text.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if !out.status.success() {
        return Err(KubectlError::Failed {
            args: shown,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn address(pod: &str) -> Result<String, KubectlError> {
    let ip = run(&pod_ip(pod), None)?.trim().to_string();
    if ip.is_empty() {
        return Err(KubectlError::NoAddress(format!("{NAMESPACE}/{pod}")));
    }
    Ok(ip)
}

/// One load run in the client pod against `ip`.
pub fn run_load(
    ip: &str,
    kind: LoadKind,
    seconds: f64,
    streams: u32,
) -> Result<LoadReport, KubectlError> {
    let argv = load(ip, kind, seconds, streams);
    let out = run(&argv, None)?;
    serde_json::from_str(&out).map_err(|source| KubectlError::Report {
        args: argv.join(" "),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_runs_in_the_client_pod_with_the_lab_json() {
        assert_eq!(
            load("10.244.2.5", LoadKind::Crr, 1.0, 1).join(" "),
            "exec -n x client -c load -- /netpol-lab load --address 10.244.2.5 --kind crr \
             --seconds 1 --streams 1 -o json"
        );
        assert_eq!(
            wait_ready(300).join(" "),
            "wait --for=condition=Ready pod --all -n x --timeout=300s"
        );
        assert_eq!(
            pod_ip("remote").join(" "),
            "get pod -n x remote -o jsonpath={.status.podIP}"
        );
    }

    /// The manifest's names are the ones the command lines use, and the servers run
    /// what the load expects on the plan's ports (80 serve, 5201 iperf3).
    #[test]
    fn the_bench_manifest_has_the_pods_the_commands_name() {
        let text = include_str!("../../deploy/kind/bench/pods.yaml");
        let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        let pod = |name: &str| {
            docs.iter()
                .find(|d| d["kind"] == "Pod" && d["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("no pod {name}"))
                .clone()
        };
        let client = pod(CLIENT);
        assert_eq!(client["metadata"]["namespace"], NAMESPACE);
        assert_eq!(client["metadata"]["labels"]["app"], "client");
        assert_eq!(client["spec"]["containers"][0]["name"], "load");
        for (server, affinity) in [("server", "podAffinity"), ("remote", "podAntiAffinity")] {
            let p = pod(server);
            assert_eq!(p["metadata"]["labels"]["app"], "server", "{server}");
            assert!(p["spec"]["affinity"][affinity].is_object(), "{server}");
            let c = &p["spec"]["containers"];
            assert_eq!(c[0]["args"], serde_json::json!(["serve", "--tcp", "80"]));
            assert_eq!(c[1]["args"], serde_json::json!(["-s", "-p", "5201"]));
            for c in c.as_array().unwrap() {
                assert_eq!(c["image"], "ghcr.io/netpol/netpol-load:latest");
            }
        }
    }
}

//! `netpol lint` as a script sees it: the corpus under `tests/lint/` (one directory per
//! case: `manifests.yaml` and `expected.yaml`, the findings compared exactly on
//! severity, code, object and field), exit codes, output formats, and `--cluster`
//! (lint's and graph's) against a mocked API server.

mod mock_api;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use mock_api::{list, MockApi, NAMESPACES, PODS, POLICIES};
use netpol_engine::lint::{Finding, Severity, CODES};
use serde::Deserialize;
use serde_json::json;

const NETPOL: &str = env!("CARGO_BIN_EXE_netpol");

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lint")
}

#[derive(Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord, Clone)]
struct Expected {
    severity: Severity,
    code: String,
    object: String,
    field: String,
}

#[derive(Deserialize)]
struct Report {
    findings: Vec<Finding>,
    errors: usize,
    warnings: usize,
}

fn lint(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(NETPOL)
        .arg("lint")
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .expect("run netpol");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Every finding's fix is YAML, and says something.
fn check_finding(case: &str, f: &Finding, problems: &mut Vec<String>) {
    if f.message.is_empty() {
        problems.push(format!("{case}: {} has no message", f.code));
    }
    match serde_yaml::from_str::<serde_yaml::Value>(&f.fix) {
        Ok(_) if f.fix.trim().is_empty() => problems.push(format!("{case}: {} has no fix", f.code)),
        Ok(_) => {}
        Err(e) => problems.push(format!(
            "{case}: {}'s fix is not YAML ({e}):\n{}",
            f.code, f.fix
        )),
    }
    if !CODES
        .iter()
        .any(|(c, s, _)| *c == f.code && *s == f.severity)
    {
        problems.push(format!(
            "{case}: {} {:?} is not in CODES",
            f.code, f.severity
        ));
    }
}

#[test]
fn every_case_of_the_corpus_yields_exactly_its_findings() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(corpus())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 20, "the corpus is there: {cases:?}");
    let mut problems = Vec::new();
    let mut seen_codes = BTreeSet::new();
    let mut clean = 0;
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let manifests = case.join("manifests.yaml");
        let (code, stdout, stderr) =
            lint(&["--manifests", manifests.to_str().unwrap(), "-o", "json"]);
        let report: Report = match serde_json::from_str(&stdout) {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!(
                    "{name}: output is not the JSON report ({e}): {stdout}{stderr}"
                ));
                continue;
            }
        };
        let expected: Vec<Expected> =
            serde_yaml::from_str(&std::fs::read_to_string(case.join("expected.yaml")).unwrap())
                .unwrap_or_else(|e| panic!("{name}/expected.yaml: {e}"));
        let mut got: Vec<Expected> = report
            .findings
            .iter()
            .map(|f| Expected {
                severity: f.severity,
                code: f.code.clone(),
                object: f.object.clone(),
                field: f.field.clone(),
            })
            .collect();
        got.sort();
        let mut want = expected.clone();
        want.sort();
        if got != want {
            problems.push(format!("{name}: expected {want:#?}\ngot {got:#?}"));
        }
        for f in &report.findings {
            check_finding(&name, f, &mut problems);
            seen_codes.insert(f.code.clone());
        }
        let errors = report
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .count();
        if report.errors != errors {
            problems.push(format!(
                "{name}: summary says {} errors, {errors} listed",
                report.errors
            ));
        }
        let want_code = i32::from(errors > 0);
        if code != want_code {
            problems.push(format!(
                "{name}: exit {code}, expected {want_code}; {stderr}"
            ));
        }
        clean += usize::from(report.findings.is_empty());
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    assert!(clean >= 3, "good manifests are part of the corpus");
    let missing: Vec<&str> = CODES
        .iter()
        .map(|(c, _, _)| *c)
        .filter(|c| !seen_codes.contains(*c))
        .collect();
    assert!(missing.is_empty(), "codes no case exercises: {missing:?}");
}

#[test]
fn warnings_pass_unless_strict_errors_fail_and_unreadable_input_exits_2() {
    let warnings_only = corpus().join("dns-udp-only/manifests.yaml");
    let path = warnings_only.to_str().unwrap();
    let (code, table, _) = lint(&["--manifests", path]);
    assert_eq!(code, 0, "{table}");
    assert!(
        table.contains("dns-udp-only") && table.contains("fix:"),
        "{table}"
    );
    assert!(table.ends_with("0 errors, 1 warning, 0 info\n"), "{table}");
    assert_eq!(lint(&["--manifests", path, "--strict"]).0, 1);
    let (code, yaml, _) = lint(&["--manifests", path, "-o", "yaml"]);
    assert_eq!(code, 0);
    let report: Report = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!((report.errors, report.warnings), (0, 1));

    let errors = corpus().join("invalid-cidr/manifests.yaml");
    assert_eq!(lint(&["--manifests", errors.to_str().unwrap()]).0, 1);
    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
    let (code, out, _) = lint(&["--manifests", good.to_str().unwrap(), "--strict"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "no findings\n"),
        "a directory is read whole"
    );

    // Unreadable: a missing path, a YAML syntax error, a document of the wrong shape.
    let dir = std::env::temp_dir().join(format!("netpol-lint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let broken = dir.join("broken.yaml");
    std::fs::write(&broken, "kind: NetworkPolicy\nmetadata: {name: [\n").unwrap();
    let shape = dir.join("shape.yaml");
    std::fs::write(
        &shape,
        "kind: Pod\nmetadata: {name: p}\nspec: {containers: 3}\n",
    )
    .unwrap();
    for (path, named) in [
        (dir.join("nope.yaml"), "nope.yaml"),
        (broken.clone(), "broken.yaml"),
        (shape.clone(), "shape.yaml"),
    ] {
        let (code, stdout, stderr) = lint(&["--manifests", path.to_str().unwrap()]);
        assert_eq!(code, 2, "{named}: {stdout}{stderr}");
        assert!(stderr.contains(named), "{named}: {stderr}");
        assert!(stdout.is_empty(), "nothing is linted: {stdout}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    // Usage: neither or both inputs.
    assert_eq!(lint(&[]).0, 2);
    assert_eq!(lint(&["--manifests", path, "--cluster"]).0, 2);
}

/// A cluster behind the mock: namespace `shop`, pods `api` and `web`, a policy with an
/// empty `from` and a typo.
async fn cluster() -> MockApi {
    let api = MockApi::start().await;
    api.set_list(
        NAMESPACES,
        list(
            "Namespace",
            "5",
            vec![json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "resourceVersion": "1"}})],
        ),
    );
    let pod = |name: &str, ip: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "shop", "resourceVersion": "2", "labels": {"app": name}},
               "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"name": "http", "containerPort": 8080}]}]},
               "status": {"phase": "Running", "podIP": ip}})
    };
    api.set_list(
        PODS,
        list(
            "Pod",
            "5",
            vec![pod("api", "10.0.0.1"), pod("web", "10.0.0.2")],
        ),
    );
    api.set_list(
        POLICIES,
        list(
            "NetworkPolicy",
            "5",
            vec![json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                        "metadata": {"name": "api", "namespace": "shop", "resourceVersion": "3"},
                        "spec": {"podSelector": {"matchLabels": {"app": "api"}},
                                 "ingress": [{"from": []},
                                             {"from": [{"podSelector": {"matchLabels": {"app": "wbe"}}}]}]}})],
        ),
    );
    api
}

/// `netpol ARGS` with `kubeconfig` as its kubeconfig (the mock serves on while it runs).
async fn netpol_with(kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(NETPOL)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .await
        .unwrap()
}

fn expected_from_the_cluster() -> Vec<(String, String)> {
    vec![
        ("empty-peer-list".into(), "spec.ingress[0].from".into()),
        (
            "selector-matches-no-pod".into(),
            "spec.ingress[1].from[0].podSelector".into(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn lint_and_graph_read_the_cluster_once_through_the_kube_source() {
    let api = cluster().await;
    // The library path: one list of every resource, linted.
    let state =
        netpol_agent::source::kube::list_once(api.client(), std::time::Duration::from_secs(20))
            .await
            .unwrap();
    let report = netpol_engine::lint::lint(state.objects);
    let mut got: Vec<(String, String)> = report
        .findings
        .iter()
        .inspect(|f| assert_eq!(f.object, "NetworkPolicy/shop/api"))
        .map(|f| (f.code.clone(), f.field.clone()))
        .collect();
    got.sort();
    assert_eq!(got, expected_from_the_cluster(), "{:#?}", report.findings);

    // The command: `--cluster` reads the kubeconfig's current context.
    let dir = std::env::temp_dir().join(format!("netpol-lint-kube-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("config");
    api.write_kubeconfig(&kubeconfig);
    let out = netpol_with(
        &kubeconfig,
        &[
            "lint",
            "--cluster",
            "-o",
            "json",
            "--request-timeout",
            "20s",
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an error finding fails: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Report = serde_json::from_str(&stdout).unwrap();
    let mut got: Vec<(String, String)> = report
        .findings
        .iter()
        .map(|f| (f.code.clone(), f.field.clone()))
        .collect();
    got.sort();
    assert_eq!(got, expected_from_the_cluster());

    // `graph --cluster` reads it the same way.
    let out = netpol_with(&kubeconfig, &["graph", "--cluster", "-o", "json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let graph: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let workloads: Vec<&str> = graph["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["key"].as_str().unwrap())
        .collect();
    assert_eq!(workloads, ["shop/api", "shop/web"]);
    // `from: []` lets web in: the one flow a policy judges.
    assert_eq!(graph["edges"][0]["from"], "shop/web");
    assert_eq!(graph["edges"][0]["ports"], json!(["8080/TCP"]));

    // No cluster to reach: unreadable input.
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n",
    )
    .unwrap();
    let out = netpol_with(&kubeconfig, &["lint", "--cluster"]).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

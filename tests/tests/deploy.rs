//! `deploy/`: every manifest parses into its k8s-openapi type with no field left over
//! (a typo would be silently dropped by the API server), and the ClusterRole grants
//! exactly the API calls the kube source makes.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use netpol_agent::source::kube::{api_calls, RESOURCES};
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(rel: &str) -> Value {
    let text = std::fs::read_to_string(deploy().join(rel)).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Parses `v` as `T` and checks that serialising it gives `v` back: nothing unknown.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(rel: &str, v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let back = serde_json::to_value(&t).unwrap();
    if let Some(at) = first_difference(v, &back, String::new()) {
        panic!("{rel}: {at} is not a field of the type, or does not read back");
    }
    t
}

/// The path of the first value of `a` that `b` lacks or holds otherwise (numbers
/// compared as numbers: the types hold bounds as f64).
fn first_difference(a: &Value, b: &Value, at: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x.iter().find_map(|(k, v)| match y.get(k) {
            Some(w) => first_difference(v, w, format!("{at}.{k}")),
            None => Some(format!("{at}.{k}")),
        }),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, format!("{at}[{i}]"))),
        (Value::Number(x), Value::Number(y)) => (x.as_f64() != y.as_f64()).then_some(at),
        _ => (a != b).then_some(at),
    }
}

fn resources() -> Vec<String> {
    read("kustomization.yaml")["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_manifest_is_listed_and_parses_into_its_type() {
    let listed = resources();
    let mut crds = Vec::new();
    for rel in &listed {
        let v = read(rel);
        match v["kind"].as_str().unwrap() {
            "CustomResourceDefinition" => crds.push(typed::<CustomResourceDefinition>(rel, &v)),
            "DaemonSet" => {
                let ds: DaemonSet = typed(rel, &v);
                let spec = ds.spec.unwrap();
                let pod = spec.template.spec.unwrap();
                assert_eq!(pod.host_network, Some(true));
                assert!(pod
                    .tolerations
                    .unwrap()
                    .iter()
                    .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
                let c = &pod.containers[0];
                let caps = c.security_context.clone().unwrap().capabilities.unwrap();
                assert_eq!(caps.drop.unwrap(), ["ALL"]);
                assert_eq!(
                    caps.add.unwrap(),
                    ["BPF", "NET_ADMIN", "NET_BROADCAST", "SYS_ADMIN", "PERFMON"]
                );
                assert!(c.resources.clone().unwrap().requests.is_some());
                let ru = spec.update_strategy.unwrap().rolling_update.unwrap();
                assert_eq!(
                    ru.max_unavailable,
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
                );
                let mounts: Vec<String> = c
                    .volume_mounts
                    .clone()
                    .unwrap()
                    .into_iter()
                    .map(|m| m.mount_path)
                    .collect();
                // Pins live in the host's bpffs; pods are found through netlink, so no
                // namespace directory is mounted.
                assert!(mounts.contains(&"/sys/fs/bpf".into()));
                // The hook on local delivery goes on the host's cgroup tree, mounted.
                let args = c.args.clone().unwrap();
                let cgroup = args
                    .iter()
                    .find_map(|a| a.strip_prefix("--cgroup="))
                    .expect("--cgroup names the host's cgroup tree");
                assert!(mounts.contains(&cgroup.to_string()), "{cgroup} is mounted");
                assert!(!mounts.contains(&"/var/run/netns".into()));
            }
            "ServiceAccount" => drop(typed::<ServiceAccount>(rel, &v)),
            "ClusterRole" => drop(typed::<ClusterRole>(rel, &v)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(rel, &v)),
            k => panic!("{rel}: unexpected kind {k}"),
        }
    }
    // Every YAML under deploy/ but the kustomization and kind's config is deployed.
    let mut files = Vec::new();
    for dir in [deploy(), deploy().join("crds")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") {
                files.push(
                    p.strip_prefix(deploy())
                        .unwrap()
                        .to_string_lossy()
                        .to_string(),
                );
            }
        }
    }
    files.retain(|f| f != "kustomization.yaml" && f != "kind.yaml");
    files.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(files, sorted);
    // The CRDs serve every cluster-policy version the source watches.
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == "policy.networking.k8s.io")
    {
        let crd = crds
            .iter()
            .find(|c| c.spec.names.kind == r.kind)
            .unwrap_or_else(|| panic!("no CRD for {}", r.kind));
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.names.plural, r.plural);
        let v = crd
            .spec
            .versions
            .iter()
            .find(|v| v.name == r.version)
            .unwrap();
        assert!(v.served && v.schema.is_some(), "{} {}", r.kind, r.version);
    }
    for crd in &crds {
        assert_eq!(crd.spec.versions.iter().filter(|v| v.storage).count(), 1);
    }
    let kind = read("kind.yaml");
    assert_eq!(kind["networking"]["disableDefaultCNI"], true);
}

#[test]
fn the_cluster_role_grants_exactly_the_calls_the_kube_source_makes() {
    let role: ClusterRole = typed("clusterrole.yaml", &read("clusterrole.yaml"));
    let mut granted = std::collections::BTreeSet::new();
    for rule in role.rules.unwrap() {
        for g in rule.api_groups.unwrap_or_default() {
            for r in rule.resources.clone().unwrap_or_default() {
                for v in &rule.verbs {
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    let used: std::collections::BTreeSet<(String, String, String)> = api_calls()
        .into_iter()
        .map(|(g, r, v)| (g.into(), r.into(), v.into()))
        .collect();
    let missing: Vec<_> = used.difference(&granted).collect();
    assert!(missing.is_empty(), "used but not granted: {missing:?}");
    let extra: Vec<_> = granted.difference(&used).collect();
    assert!(extra.is_empty(), "granted but never used: {extra:?}");
    let binding: ClusterRoleBinding =
        typed("clusterrolebinding.yaml", &read("clusterrolebinding.yaml"));
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
}

#[path = "../../xtask/src/scenario.rs"]
mod scenario;

fn scenarios() -> PathBuf {
    deploy().join("kind/scenarios")
}

/// Every document of a multi-document YAML file.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{path:?}: {e}")))
        .collect()
}

/// What `cargo xtask kind` applies reads into the API's types with nothing left over
/// (the lab and simulate ignore images and commands; a cluster would not).
#[test]
fn the_kind_scenarios_are_kubernetes_objects() {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let all = scenario::load_all(&scenarios()).unwrap();
    assert!(all.len() >= 7, "{} scenarios", all.len());
    let mut files = vec![scenarios().join(scenario::CLUSTER)];
    files.extend(all.iter().map(|s| s.manifests.clone()));
    for file in files {
        let rel = file.strip_prefix(deploy()).unwrap().display().to_string();
        for doc in documents(&file) {
            match doc["kind"].as_str().unwrap() {
                "Namespace" => drop(typed::<Namespace>(&rel, &doc)),
                "Pod" => {
                    let pod: Pod = typed(&rel, &doc);
                    // The probe runs /agnhost in this container.
                    assert_eq!(pod.spec.unwrap().containers[0].name, "serve-80-tcp");
                }
                "NetworkPolicy" => drop(typed::<NetworkPolicy>(&rel, &doc)),
                "AdminNetworkPolicy" => {
                    assert_eq!(doc["apiVersion"], "policy.networking.k8s.io/v1alpha1")
                }
                k => panic!("{rel}: unexpected kind {k}"),
            }
        }
    }
}

/// Every expected matrix of the kind scenario suite is what `netpol simulate` computes
/// from the same manifests: the expectations are proven here, although the cluster
/// path (`cargo xtask kind`) cannot run on these machines. The lab proves them with
/// real packets (`tests/lab_scenarios.rs`).
#[test]
fn every_kind_scenario_expects_what_simulate_computes() {
    let mut wrong = Vec::new();
    for sc in scenario::load_all(&scenarios()).unwrap() {
        for e in &sc.expectations {
            let out = std::process::Command::new(env!("NETPOL_BIN"))
                .arg("simulate")
                .arg("--manifests")
                .arg(scenarios().join(scenario::CLUSTER))
                .arg(&sc.manifests)
                .args(["--port", &e.port.to_string(), "--protocol", &e.protocol])
                .args(["-o", "json"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                sc.name,
                String::from_utf8_lossy(&out.stderr)
            );
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["invalid"], serde_json::json!([]), "{}", sc.name);
            let mut pods: Vec<&str> = v["pods"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["pod"].as_str().unwrap())
                .collect();
            pods.sort();
            let mut expected: Vec<&str> = e.pods.iter().map(String::as_str).collect();
            expected.sort();
            assert_eq!(pods, expected, "{}: the matrix names every pod", sc.name);
            let results = v["results"].as_array().unwrap();
            assert_eq!(results.len(), e.connects.len(), "{}", sc.name);
            for r in results {
                let (from, to) = (r["from"].as_str().unwrap(), r["to"].as_str().unwrap());
                let want = e.connects[&(from.to_string(), to.to_string())];
                if r["allowed"].as_bool().unwrap() != want {
                    wrong.push(format!(
                        "{} {}/{}: {from} to {to}: expected {}, simulate: egress {}, ingress {}",
                        sc.name,
                        e.port,
                        e.protocol,
                        if want { "✓" } else { "✗" },
                        r["egress"],
                        r["ingress"]
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

//! Synthetic clusters of a chosen size, shaped like real ones, for benchmarks and load:
//! namespaces of a few teams, each running apps of web/api/db tiers with replicas, and
//! the policies operators write (default deny, tier-to-tier allows, cross-namespace
//! allows by team label, DNS egress, external egress through an ipBlock with except).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;

use netpol_engine::objects::Object;

#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub pods: usize,
    pub namespaces: usize,
    pub policies: usize,
}

impl Shape {
    /// The benchmark's proportions: 50 pods and 5 policies per namespace.
    pub fn pods(pods: usize) -> Shape {
        let namespaces = (pods / 50).max(1);
        Shape {
            pods,
            namespaces,
            policies: namespaces * 5,
        }
    }
}

/// Apps per namespace; each app is one identity (its replicas share labels).
const APPS: usize = 10;
const TIERS: [&str; 3] = ["web", "api", "db"];

pub fn namespace_name(i: usize) -> String {
    format!("ns-{i:04}")
}

pub fn namespace(i: usize) -> Namespace {
    serde_json::from_value(json!({
        "metadata": {"name": namespace_name(i), "labels": {"team": format!("team-{}", i % 20), "env": if i.is_multiple_of(3) {"prod"} else {"dev"}}}
    }))
    .expect("a valid Namespace")
}

/// Pod `n` of the cluster: spread round-robin over namespaces, then apps.
pub fn pod(shape: &Shape, n: usize, app_label: Option<&str>) -> Pod {
    let ns = n % shape.namespaces;
    let app = (n / shape.namespaces) % APPS;
    let tier = TIERS[app % 3];
    let ip = format!("10.{}.{}.{}", 64 + (n >> 16), (n >> 8) & 0xff, n & 0xff);
    let app_name = app_label.map(String::from).unwrap_or(format!("app-{app}"));
    serde_json::from_value(json!({
        "metadata": {"name": format!("pod-{n}"), "namespace": namespace_name(ns),
                     "labels": {"app": app_name, "tier": tier}},
        "spec": {"nodeName": format!("node-{}", n % 100), "containers": [{"name": "main", "image": "app",
                 "ports": [{"name": "http", "containerPort": 8080 + (app % 2) as i32},
                           {"name": "metrics", "containerPort": 9090}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .expect("a valid Pod")
}

/// Policy `k` of namespace `ns`; `port` varies the allowed port (for edits).
pub fn policy(ns: usize, k: usize, port: u16) -> NetworkPolicy {
    let name = namespace_name(ns);
    let spec = match k % 5 {
        0 => json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                    "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace_name(0)}}}],
                                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}),
        1 => json!({"podSelector": {"matchLabels": {"tier": "api"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}], "ports": [{"port": "http"}]}]}),
        2 => json!({"podSelector": {"matchLabels": {"tier": "db"}},
                    "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["api"]}]}}],
                                 "ports": [{"port": port}]}]}),
        3 => json!({"podSelector": {"matchLabels": {"tier": "web"}},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", (ns + 1) % 20)}},
                                           "podSelector": {"matchLabels": {"tier": "web"}}}]},
                                {"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}], "ports": [{"port": 443}]}]}),
        _ => {
            json!({"podSelector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]},
                    "policyTypes": ["Egress"],
                    "egress": [{"to": [{"podSelector": {}}]},
                               {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "192.168.0.0/16"]}}],
                                "ports": [{"port": 443}, {"port": 8000, "endPort": 8999}]}]})
        }
    };
    serde_json::from_value(json!({
        "metadata": {"name": format!("np-{k}"), "namespace": name},
        "spec": spec
    }))
    .expect("a valid NetworkPolicy")
}

/// The whole cluster.
pub fn cluster(shape: &Shape) -> Vec<Object> {
    let mut out: Vec<Object> = (0..shape.namespaces)
        .map(|i| Object::Namespace(namespace(i).into()))
        .collect();
    out.extend((0..shape.pods).map(|n| Object::Pod(pod(shape, n, None).into())));
    let per_ns = shape.policies.div_ceil(shape.namespaces);
    let mut count = 0;
    'outer: for ns in 0..shape.namespaces {
        for k in 0..per_ns {
            if count == shape.policies {
                break 'outer;
            }
            out.push(Object::NetworkPolicy(policy(ns, k, 5432).into()));
            count += 1;
        }
    }
    out
}

/// Object counts by kind, for reports.
pub fn summary(objects: &[Object]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for o in objects {
        let k = match o {
            Object::Namespace(_) => "namespaces",
            Object::Pod(_) => "pods",
            Object::NetworkPolicy(_) => "policies",
            Object::Service(_) => "services",
            Object::Node(_) => "nodes",
            Object::ClusterPolicy(_) => "cluster policies",
        };
        *m.entry(k).or_default() += 1;
    }
    m
}

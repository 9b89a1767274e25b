//! Random small clusters and random policies using every NetworkPolicy feature: for
//! every flow, the compiled maps (looked up with the kernel's precedence) must give the
//! reference evaluator's verdict. Failures ever found are kept in `tests/corpus/`.
//!
//! Deterministic by default (fixed seed); `NETPOL_PROPTEST_SEED=<u64>` explores others,
//! `PROPTEST_CASES=<n>` runs more.

mod support;

#[path = "differential/cluster_policy.rs"]
mod cluster_policy;
#[path = "differential/invalid.rs"]
mod invalid;

use std::net::IpAddr;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngSeed, TestRunner};

/// Addresses that are no pod: inside, at the edges of and outside the generated blocks.
const EXTERNAL: [&str; 10] = [
    "192.168.0.1",
    "192.168.0.2",
    "fd01::1",
    "10.0.0.99",
    "10.0.0.13",
    "10.1.2.3",
    "192.168.0.99",
    "8.8.8.8",
    "fd00::99",
    "2001:db8::1",
];
const PORTS: [u16; 8] = [53, 80, 81, 8080, 8081, 9000, 9001, 65535];

fn one_of(items: &'static [&'static str]) -> impl Strategy<Value = &'static str> + Clone {
    proptest::sample::select(items)
}

fn namespace_yaml() -> impl Strategy<Value = (&'static str, String)> {
    (
        one_of(&["x", "y", "z"]),
        prop::option::of(one_of(&["a", "b"])),
        prop::option::of(one_of(&["prod", "dev"])),
    )
        .prop_map(|(name, team, env)| {
            let mut labels = vec![];
            if let Some(t) = team {
                labels.push(format!("team: {t}"));
            }
            if let Some(e) = env {
                labels.push(format!("env: {e}"));
            }
            let yaml = format!(
                "kind: Namespace\nmetadata: {{name: {name}, labels: {{{}}}}}\n",
                labels.join(", ")
            );
            (name, yaml)
        })
}

/// (name, protocol, port) of the container ports a pod may declare.
const CONTAINER_PORTS: [(&str, &str, u16); 6] = [
    ("http", "TCP", 80),
    ("http", "TCP", 8080),
    ("dns", "UDP", 53),
    ("dns", "TCP", 53),
    ("sig", "SCTP", 9000),
    ("", "TCP", 9001),
];

fn pod_yaml(i: usize) -> impl Strategy<Value = String> {
    (
        one_of(&["x", "y", "z"]),
        prop::option::of(one_of(&["a", "b", "c"])),
        prop::option::of(one_of(&["web", "db"])),
        proptest::sample::subsequence(&CONTAINER_PORTS[..], 0..=3),
        // 0: IPv4, 1: dual-stack, 2: IPv6 only, 3: no address yet
        prop_oneof![4 => Just(0u8), 3 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)],
        prop_oneof![8 => Just(""), 1 => Just("hostNetwork"), 1 => Just("Succeeded")],
    )
        .prop_map(move |(ns, app, tier, ports, addressing, special)| {
            let mut labels = vec![];
            if let Some(a) = app {
                labels.push(format!("app: {a}"));
            }
            if let Some(t) = tier {
                labels.push(format!("tier: {t}"));
            }
            // A pod cannot declare one name twice.
            let mut seen = std::collections::BTreeSet::new();
            let ports: Vec<String> = ports
                .iter()
                .filter(|(n, _, _)| n.is_empty() || seen.insert(*n))
                .map(|(n, p, c)| {
                    let name = if n.is_empty() {
                        String::new()
                    } else {
                        format!("name: {n}, ")
                    };
                    format!("{{{name}protocol: {p}, containerPort: {c}}}")
                })
                .collect();
            let host = special == "hostNetwork";
            let (v4, v6) = if host {
                (format!("192.168.0.{}", 10 + i), format!("fd01::{}", 10 + i))
            } else {
                (format!("10.0.0.{}", 10 + i), format!("fd00::{}", 10 + i))
            };
            let ips: Vec<String> = match addressing {
                0 => vec![v4],
                1 => vec![v4, v6],
                2 => vec![v6],
                _ => vec![],
            };
            let mut status = vec![];
            if let Some(first) = ips.first() {
                status.push(format!("podIP: {first}"));
                let all: Vec<String> = ips.iter().map(|ip| format!("{{ip: {ip}}}")).collect();
                status.push(format!("podIPs: [{}]", all.join(", ")));
            }
            if special == "Succeeded" {
                status.push("phase: Succeeded".into());
            }
            format!(
                "kind: Pod\nmetadata: {{name: p{i}, namespace: {ns}, labels: {{{}}}}}\nspec: {{hostNetwork: {host}, containers: [{{name: c, image: i, ports: [{}]}}]}}\nstatus: {{{}}}\n",
                labels.join(", "),
                ports.join(", "),
                status.join(", ")
            )
        })
}

fn pod_selector() -> impl Strategy<Value = &'static str> + Clone {
    one_of(&[
        "{}",
        "{matchLabels: {app: a}}",
        "{matchLabels: {app: b}}",
        "{matchLabels: {app: a, tier: web}}",
        "{matchExpressions: [{key: app, operator: In, values: [a, c]}]}",
        "{matchExpressions: [{key: app, operator: NotIn, values: [a]}]}",
        "{matchExpressions: [{key: tier, operator: Exists}]}",
        "{matchExpressions: [{key: tier, operator: DoesNotExist}]}",
        "{matchLabels: {tier: db}, matchExpressions: [{key: app, operator: Exists}]}",
    ])
}

fn namespace_selector() -> impl Strategy<Value = &'static str> + Clone {
    one_of(&[
        "{}",
        "{matchLabels: {team: a}}",
        "{matchLabels: {kubernetes.io/metadata.name: y}}",
        "{matchExpressions: [{key: env, operator: NotIn, values: [prod]}]}",
        "{matchExpressions: [{key: team, operator: Exists}]}",
        "{matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [x, z]}]}",
    ])
}

fn ip_block() -> impl Strategy<Value = String> {
    (
        one_of(&[
            "10.0.0.0/24",
            "10.0.0.13/30",
            "10.0.0.0/8",
            "10.0.0.16/28",
            "0.0.0.0/0",
            "192.168.0.0/16",
            "fd00::/64",
            "fd00::10/126",
            "::/0",
        ]),
        proptest::sample::subsequence(
            &[
                "10.0.0.12/31",
                "10.0.0.10/32",
                "10.0.0.0/25",
                "10.0.0.16/29",
                "fd00::10/127",
                "fd00::11/128",
                "192.168.0.10/31",
            ][..],
            0..=2,
        ),
    )
        .prop_map(|(cidr, except)| {
            // Only the excepts inside cidr: invalid blocks are `invalid::FRAGMENTS`' part.
            let (net, len) = cidr.split_once('/').unwrap();
            let inside: Vec<&str> = except
                .into_iter()
                .filter(|x| {
                    let (xn, xl) = x.split_once('/').unwrap();
                    let (a, b): (IpAddr, IpAddr) = (net.parse().unwrap(), xn.parse().unwrap());
                    a.is_ipv4() == b.is_ipv4()
                        && xl.parse::<u32>().unwrap() > len.parse::<u32>().unwrap()
                        && same_prefix(a, b, len.parse().unwrap())
                })
                .collect();
            let quoted: Vec<String> = inside.iter().map(|x| format!("{x:?}")).collect();
            format!(
                "{{ipBlock: {{cidr: {cidr:?}, except: [{}]}}}}",
                quoted.join(", ")
            )
        })
}

fn same_prefix(a: IpAddr, b: IpAddr, len: u32) -> bool {
    let (a, b, bits) = match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return false,
    };
    len == 0 || (a >> (bits - len)) == (b >> (bits - len))
}

fn peer() -> impl Strategy<Value = String> {
    prop_oneof![
        pod_selector().prop_map(|p| format!("{{podSelector: {p}}}")),
        namespace_selector().prop_map(|n| format!("{{namespaceSelector: {n}}}")),
        (pod_selector(), namespace_selector())
            .prop_map(|(p, n)| format!("{{podSelector: {p}, namespaceSelector: {n}}}")),
        ip_block(),
    ]
}

fn port() -> impl Strategy<Value = String> {
    (
        one_of(&["", "TCP", "UDP", "SCTP"]),
        prop_oneof![
            Just(String::new()),
            one_of(&["53", "80", "8080", "9000"]).prop_map(String::from),
            one_of(&["http", "dns", "sig", "nope"]).prop_map(String::from),
        ],
        one_of(&["", "+0", "+1", "+1000"]),
    )
        .prop_map(|(protocol, port, end)| {
            let mut f = vec![];
            if !protocol.is_empty() {
                f.push(format!("protocol: {protocol}"));
            }
            if !port.is_empty() {
                f.push(format!("port: {port}"));
                if let (Ok(n), Some(d)) = (port.parse::<u32>(), end.strip_prefix('+')) {
                    f.push(format!("endPort: {}", n + d.parse::<u32>().unwrap()));
                }
            }
            format!("{{{}}}", f.join(", "))
        })
}

/// `None` = the field is absent, `Some([])` = present and empty.
fn list(item: impl Strategy<Value = String>, max: usize) -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(
        0.75,
        prop::collection::vec(item, 0..=max).prop_map(|v| format!("[{}]", v.join(", "))),
    )
}

fn rule(peers_field: &'static str) -> impl Strategy<Value = String> {
    (list(peer(), 2), list(port(), 2)).prop_map(move |(peers, ports)| {
        let mut f = vec![];
        if let Some(p) = peers {
            f.push(format!("{peers_field}: {p}"));
        }
        if let Some(p) = ports {
            f.push(format!("ports: {p}"));
        }
        format!("{{{}}}", f.join(", "))
    })
}

fn rules(peers_field: &'static str) -> impl Strategy<Value = Option<Vec<String>>> {
    prop::option::weighted(0.75, prop::collection::vec(rule(peers_field), 0..=2))
}

/// A policy of random valid parts; one in three also carries a fragment of
/// `invalid::FRAGMENTS` (most of which the API server rejects).
fn policy_yaml(i: usize) -> impl Strategy<Value = String> {
    (
        one_of(&["x", "y", "z"]),
        pod_selector(),
        prop_oneof![
            3 => Just(""),
            1 => Just("[]"),
            1 => Just("[Ingress]"),
            2 => Just("[Egress]"),
            2 => Just("[Ingress, Egress]"),
        ],
        rules("from"),
        rules("to"),
        prop::option::weighted(1.0 / 3.0, invalid::fragment()),
    )
        .prop_map(move |(ns, sel, types, ingress, egress, fragment)| {
            let mut policy = invalid::Policy {
                pod_selector: sel.into(),
                types: types.into(),
                ingress,
                egress,
            };
            if let Some((f, spot)) = &fragment {
                policy.carry(f, *spot);
            }
            policy.yaml(ns, &format!("np{i}"), fragment.map(|(f, _)| f.class))
        })
}

/// (namespaces, pods, policies), each a YAML stream.
fn parts() -> impl Strategy<Value = (String, String, String)> {
    (
        prop::collection::vec(namespace_yaml(), 0..=3),
        (1..=6usize).prop_flat_map(|n| (0..n).map(pod_yaml).collect::<Vec<_>>()),
        (0..=4usize).prop_flat_map(|n| (0..n).map(policy_yaml).collect::<Vec<_>>()),
        prop::collection::vec(0..3usize, 0..=2).prop_flat_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, _)| cluster_policy::cluster_policy_yaml(i))
                .collect::<Vec<_>>()
        }),
    )
        .prop_map(|(mut namespaces, pods, policies, cluster)| {
            // One Namespace object per name.
            namespaces.sort();
            namespaces.dedup_by_key(|(name, _)| *name);
            let namespaces: Vec<String> = namespaces.into_iter().map(|(_, y)| y).collect();
            // Two BaselineAdminNetworkPolicies would both be "default": keep one.
            let mut banp = false;
            let cluster: Vec<String> = cluster
                .into_iter()
                .filter(|c| {
                    !c.contains("BaselineAdminNetworkPolicy") || !std::mem::replace(&mut banp, true)
                })
                .collect();
            // Two nodes, for `nodes` peers.
            let nodes = "kind: Node\nmetadata: {name: n1, labels: {role: infra}}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.1}, {type: InternalIP, address: \"fd01::1\"}, {type: Hostname, address: n1}]}\n---\nkind: Node\nmetadata: {name: n2, labels: {role: worker}}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.2}]}\n";
            let namespaces: Vec<String> = namespaces.into_iter().chain([nodes.to_string()]).collect();
            (
                namespaces.join("---\n"),
                pods.join("---\n"),
                policies
                    .into_iter()
                    .chain(cluster)
                    .collect::<Vec<_>>()
                    .join("---\n"),
            )
        })
}

fn join(parts: &[&str]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("---\n")
}

fn cluster() -> impl Strategy<Value = String> {
    parts().prop_map(|(n, p, q)| join(&[&n, &p, &q]))
}

fn check(yaml: &str) -> Result<(), String> {
    let extra: Vec<IpAddr> = EXTERNAL.iter().map(|a| a.parse().unwrap()).collect();
    match support::model::compiled(yaml).disagreement(&extra, &PORTS) {
        None => Ok(()),
        Some(d) => Err(format!("{d}\n--- cluster ---\n{yaml}")),
    }
}

#[test]
fn compiled_maps_agree_with_the_reference_on_random_clusters() {
    let seed = std::env::var("NETPOL_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6e70_6f6c);
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let mut runner = TestRunner::new(Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&cluster(), |yaml| {
        check(&yaml).map_err(proptest::test_runner::TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("seed {seed}: {e}\nAdd the cluster above to tests/corpus/ once fixed.");
    }
}

#[test]
fn every_failure_ever_found_stays_fixed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/corpus exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for f in files {
        let yaml = std::fs::read_to_string(&f).unwrap();
        if let Err(e) = check(&yaml) {
            panic!("{}: {e}", f.display());
        }
    }
}

#[test]
fn the_generator_writes_valid_manifests() {
    let mut runner = TestRunner::new(Config {
        rng_seed: RngSeed::Fixed(1),
        ..Config::default()
    });
    let (mut classes, mut rejected) = (std::collections::BTreeSet::new(), 0);
    for _ in 0..300 {
        let yaml = cluster().new_tree(&mut runner).unwrap().current();
        let (objects, errors) =
            netpol_engine::objects::parse_manifests(std::path::Path::new("gen.yaml"), &yaml);
        assert!(errors.is_empty(), "{errors:?}\n{yaml}");
        for o in &objects {
            if let netpol_engine::objects::Object::NetworkPolicy(np) = o {
                let annotations = np.metadata.annotations.iter().flatten();
                classes.extend(
                    annotations
                        .filter(|(k, _)| *k == invalid::CLASS_ANNOTATION)
                        .map(|(_, v)| v.clone()),
                );
                rejected += usize::from(!netpol_tests::reference::valid(np));
            }
        }
    }
    // Every class of fragment, and invalid policies in numbers, reach the random test.
    for f in invalid::FRAGMENTS {
        assert!(classes.contains(f.class), "{} never generated", f.class);
    }
    assert!(
        rejected >= 50,
        "only {rejected} invalid policies in 300 clusters"
    );
}

/// A small fixed cluster for the fragments, with one valid policy that must keep being
/// enforced beside the rejected ones.
fn fragment_cluster() -> String {
    let pods = [
        (
            "p0",
            "x",
            "app: a",
            "10.0.0.10",
            "ports: [{name: http, containerPort: 80}]",
        ),
        (
            "p1",
            "y",
            "app: b",
            "10.0.0.11",
            "ports: [{protocol: UDP, containerPort: 53}]",
        ),
        ("p2", "x", "tier: web", "fd00::12", "ports: []"),
    ];
    let mut out = String::from(
        "kind: Namespace\nmetadata: {name: x, labels: {team: a}}\n---\nkind: Namespace\nmetadata: {name: y}\n---\n",
    );
    for (name, ns, labels, ip, ports) in pods {
        out.push_str(&format!(
            "kind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{containers: [{{name: c, image: i, {ports}}}]}}\nstatus: {{podIP: \"{ip}\", podIPs: [{{ip: \"{ip}\"}}]}}\n---\n"
        ));
    }
    out.push_str("kind: NetworkPolicy\nmetadata: {name: kept, namespace: x}\nspec: {podSelector: {matchLabels: {app: a}}, ingress: [{from: [{namespaceSelector: {}}], ports: [{port: 80}]}]}\n---\n");
    out
}

#[test]
fn every_fragment_is_judged_as_the_api_server_would() {
    let (mut cases, mut wrong) = (0, vec![]);
    for f in invalid::FRAGMENTS {
        for spot in 0..invalid::spots(f.place) {
            let mut policy = invalid::Policy {
                pod_selector: "{}".into(),
                types: String::new(),
                ingress: Some(vec!["{}".into()]),
                egress: None,
            };
            policy.carry(f, spot);
            let yaml = format!(
                "{}{}",
                fragment_cluster(),
                policy.yaml("x", "np0", Some(f.class))
            );
            let compiled = support::model::compiled(&yaml);
            let (by_reference, _) = compiled.rejected_policies();
            if by_reference.is_empty() != f.valid {
                wrong.push(format!(
                    "the reference on {} at {spot}: {}",
                    f.class, f.yaml
                ));
            } else if let Some(d) = compiled.disagreement(&[], &PORTS) {
                wrong.push(format!("{} at {spot}: {}: {d}", f.class, f.yaml));
            }
            cases += 1;
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {cases}:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(cases > 200, "{cases} cases");
}

#[test]
fn the_index_reads_cidr_text_as_the_api_server_does() {
    for f in invalid::DIVERGENCES {
        let mut policy = invalid::Policy {
            pod_selector: "{}".into(),
            types: String::new(),
            ingress: None,
            egress: None,
        };
        policy.carry(f, 0);
        let yaml = format!(
            "{}{}",
            fragment_cluster(),
            policy.yaml("x", "np0", Some(f.class))
        );
        let compiled = support::model::compiled(&yaml);
        let (by_reference, by_index) = compiled.rejected_policies();
        assert_eq!(
            by_reference.is_empty(),
            f.valid,
            "the reference on {}",
            f.yaml
        );
        assert_eq!(by_index, by_reference, "{}", f.yaml);
    }
}

/// The desired state without revisions (which depend on history by design).
fn without_revisions(d: &netpol_engine::compile::Desired) -> netpol_engine::compile::Desired {
    let mut d = d.clone();
    for ep in d.endpoints.values_mut() {
        ep.revision = 0;
    }
    d
}

#[test]
fn incremental_compiles_equal_a_fresh_compile() {
    use netpol_engine::compile::{compile, Compiler, NodeView};
    use netpol_engine::index::Index;
    let mut runner = TestRunner::new(Config {
        cases: 300,
        rng_seed: RngSeed::Fixed(7),
        failure_persistence: None,
        ..Config::default()
    });
    // Two of each part, changed one at a time: pods under fixed policies, policies
    // over fixed pods, namespace labels under both.
    let result = runner.run(&(parts(), parts()), |((n1, p1, q1), (n2, p2, q2))| {
        let steps = [
            join(&[&n1, &p1, &q1]),
            join(&[&n1, &p2, &q1]),
            join(&[&n1, &p2, &q2]),
            join(&[&n2, &p2, &q2]),
            join(&[&n2, &p1, &q2]),
            join(&[&n1, &p1, &q1]),
        ];
        let (mut index, mut compiler) = (Index::new(), Compiler::with_revision_seed(9));
        for (i, yaml) in steps.iter().enumerate() {
            let state = support::model::compiled(yaml).state;
            let snap = index.reset(&state);
            let incremental = without_revisions(compiler.compile(&snap, &NodeView::default()));
            let fresh = without_revisions(&compile(&snap, &NodeView::default()));
            if incremental != fresh {
                return Err(proptest::test_runner::TestCaseError::fail(format!(
                    "incremental compile differs at step {i}:\n{}",
                    steps[..=i].join("\n=====\n")
                )));
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

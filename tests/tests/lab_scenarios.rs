//! Every kind scenario of deploy/kind/scenarios holds in a lab.
//! Needs root. Every test has its own lab name, so they run in parallel, and a guard
//! that tears its lab down even when an assertion fails.

mod support;

use support::lab::Lab;

use std::path::Path;

#[path = "../../xtask/src/scenario.rs"]
mod scenario;

/// The kind scenario suite (`deploy/kind/scenarios/`, what `cargo xtask kind` runs
/// against a cluster) with real packets: one lab with the suite's pods, each scenario's
/// policies in turn, every expected matrix probed.
#[test]
#[ignore = "needs root: builds a lab of network namespaces"]
fn every_kind_scenario_holds_in_the_lab() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kind/scenarios");
    let all = scenario::load_all(&dir).unwrap();
    let cluster = std::fs::read_to_string(dir.join(scenario::CLUSTER)).unwrap();
    let lab = Lab::up("scn", &[("cluster.yaml", &cluster)], &[]);
    lab.wait();
    let mut wrong = Vec::new();
    for sc in &all {
        lab.write(
            "policies.yaml",
            &std::fs::read_to_string(&sc.manifests).unwrap(),
        );
        lab.wait();
        for e in &sc.expectations {
            let results = lab.probe_all(e.port, &e.protocol);
            assert_eq!(results.len(), e.connects.len(), "{}", sc.name);
            for (from, to, result) in results {
                let want = e.connects[&(from.clone(), to.clone())];
                let got = match result.as_str() {
                    "connected" => Some(true),
                    "timeout" => Some(false),
                    _ => None, // refused: the pod serves nothing there
                };
                if got != Some(want) {
                    wrong.push(format!(
                        "{} {}/{}: {from} to {to}: expected {}, the lab: {result}",
                        sc.name,
                        e.port,
                        e.protocol,
                        if want { "✓" } else { "✗" }
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "\n{}\n{}", wrong.join("\n"), lab.logs());
}

//! The datapath scenario on a kind cluster (`cargo xtask kind --bench`): the pods of
//! deploy/kind/bench/pods.yaml, the load run in the client pod with `kubectl exec`
//! (netpol_tests::kubectl), and the plan's policies applied with kubectl. A cluster has
//! one enforcer, the installed netpol: its variants (N rules) are compared with no
//! policy at all, between baseline blocks.

use std::time::{Duration, Instant};

use netpol_tests::kubectl;
use netpol_tests::lab::LoadKind;

use crate::plan::{self, Pair, Plan};
use crate::report::{Block, Datapath, Stat};
use crate::Progress;

/// What the kind testbed does not measure, and what its figures mean; the report
/// carries these lines (`notes`).
pub const NOTES: &[&str] = &[
    "kind testbed: the datapath baseline (`none`) is netpol installed with no policy selecting the servers, not a cluster without an enforcer",
    "kind testbed: the iptables enforcer is lab-only; its datapath variants are skipped",
    "kind testbed: the denied-flood variant is lab-only (the flood sender is a lab pod thread); skipped",
    "kind testbed: each variant runs between two baseline blocks (a policy applied and deleted per round would cost a sync each), not in alternating rounds; its interval is over its own runs, each against the mean of the two baselines",
    "kind testbed: the denied-flow check under load is lab-only (the probe is a lab pod thread)",
    "kind testbed: the update and events scenarios read lab internals (the dir source, the agent's process); skipped",
    "kind testbed: the rules' peers are lab virtual pods, absent from a cluster: the N - 1 non-matching rules select no pod",
];

const MANIFEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/kind/bench/pods.yaml"
);

pub fn datapath(plan: &Plan, progress: &mut Progress) -> anyhow::Result<Datapath> {
    progress.step(
        "datapath: the kind benchmark pods (deploy/kind/bench)",
        18.0,
    );
    kubectl::run(&kubectl::apply_file(MANIFEST), None)?;
    kubectl::run(&kubectl::delete_policy("bench-rules"), None)?;
    kubectl::run(&kubectl::wait_ready(300), None)?;
    let mut servers = Vec::new();
    for pair in &plan.pairs {
        let (_, pod) = pair.server().split_once('/').expect("namespace/pod");
        let ip = kubectl::address(pod)?;
        expect_connects(&ip)?;
        servers.push((*pair, ip));
    }
    let mut d = Datapath::default();
    let mut before = block(&servers, plan, 1, 0, progress)?;
    d.blocks.push(before.clone());
    for n in &plan.rules {
        progress.step(&format!("datapath: netpol enforces N = {n}"), 4.0);
        let t = Instant::now();
        kubectl::run(&kubectl::apply_stdin(), Some(&policy(*n)))?;
        // kubectl apply returns once stored; enforced is when the allowed flow passes.
        for (_, ip) in &servers {
            expect_connects(ip)?;
        }
        d.apply_seconds
            .entry("netpol".into())
            .or_default()
            .insert(*n, t.elapsed().as_secs_f64());
        let v = block(&servers, plan, plan.rounds, *n, progress)?;
        kubectl::run(&kubectl::delete_policy("bench-rules"), None)?;
        let after = block(&servers, plan, 1, 0, progress)?;
        d.variants.push(Datapath::bracketed(&before, &v, &after));
        d.blocks.push(v);
        d.blocks.push(after.clone());
        before = after;
    }
    Ok(d)
}

/// The plan's N-rule policy as kubectl takes it (the lab's files omit apiVersion).
pub fn policy(rules: usize) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\n{}",
        plan::rules_policy(rules)
    )
}

/// A short rr run until it passes: the agents may not have synced yet.
fn expect_connects(ip: &str) -> anyhow::Result<()> {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        match kubectl::run_load(ip, LoadKind::Rr, 0.2, 1) {
            Ok(r) if r.transactions.unwrap_or(0) > 0 => return Ok(()),
            Ok(_) | Err(_) if Instant::now() < give_up => {
                std::thread::sleep(Duration::from_millis(500))
            }
            Ok(r) => anyhow::bail!("x/client -> {ip}: no transactions ({r:?})"),
            Err(e) => return Err(e).context(format!("x/client cannot reach {ip}")),
        }
    }
}

use anyhow::Context as _;

fn block(
    servers: &[(Pair, String)],
    plan: &Plan,
    repeats: usize,
    rules: usize,
    progress: &mut Progress,
) -> anyhow::Result<Block> {
    let enforcer = if rules == 0 { "none" } else { "netpol" };
    let mut b = Block {
        enforcer: enforcer.into(),
        rules,
        ..Block::default()
    };
    let step = plan.block_seconds(1) / servers.len().max(1) as f64;
    for (pair, ip) in servers {
        let mut runs: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
        for rep in 0..repeats {
            progress.step(
                &format!(
                    "datapath (kind): {enforcer} N = {rules}, {}, run {}/{repeats}",
                    pair.name(),
                    rep + 1
                ),
                step,
            );
            // No pinning: the client runs in a pod on a node of the cluster's choosing.
            let values = crate::datapath::metrics(|kind, streams, _pinned| {
                kubectl::run_load(ip, kind, plan.seconds, streams)
                    .map_err(|e| eprintln!("bench: kind {kind:?} x/client -> {ip}: {e}"))
                    .ok()
            });
            for (key, value) in values {
                runs.entry(key).or_default().push(value);
            }
        }
        b.pairs.insert(
            *pair,
            runs.into_iter()
                .map(|(k, v)| (k.to_string(), Stat::of(v)))
                .collect(),
        );
    }
    Ok(b)
}

//! `cargo xtask bench compile`: full compile time and peak memory at growing cluster
//! sizes, and the cost of one change (a pod added, a label changed, a policy edited):
//! time to the new desired state and the map entries that change.
//!
//! Peak memory is measured by a counting allocator (heap bytes in use above what the
//! cluster objects themselves take), so the number is compile's own.

use std::time::{Duration, Instant};

use netpol_engine::compile::{Compiler, NodeView};
use netpol_engine::index::{Change, Index, Kind};
use netpol_engine::objects::{ClusterState, Object};
use netpol_tests::alloc::{self, mib, Counting};
use netpol_tests::synthetic::{self, Shape};

#[global_allocator]
static ALLOC: Counting = Counting;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[derive(serde::Serialize)]
struct Full {
    pods: usize,
    namespaces: usize,
    policies: usize,
    identities: usize,
    map_entries: usize,
    policy_entries: usize,
    index_ms: f64,
    compile_ms: f64,
    total_ms: f64,
    peak_mib: f64,
}

#[derive(serde::Serialize)]
struct Change_ {
    pods: usize,
    change: &'static str,
    index_ms: f64,
    compile_ms: f64,
    total_ms: f64,
    entries_changed: usize,
    map_entries: usize,
}

struct Run {
    index: Index,
    compiler: Compiler,
}

fn state(objects: &[Object]) -> ClusterState {
    ClusterState {
        objects: objects.to_vec(),
        errors: vec![],
        digest: String::new(),
    }
}

/// Median of `reps` runs of `f`.
fn median<T>(reps: usize, mut f: impl FnMut() -> (Duration, T)) -> (Duration, T) {
    let mut runs: Vec<(Duration, T)> = (0..reps).map(|_| f()).collect();
    runs.sort_by_key(|r| r.0);
    runs.swap_remove(reps / 2)
}

fn full(shape: Shape) -> (Full, Run) {
    let objects = synthetic::cluster(&shape);
    let st = state(&objects);
    let view = NodeView::default();
    // Peak: one cold run, measured above the objects already in memory.
    let base = alloc::reset_peak();
    let mut index = Index::new();
    let t0 = Instant::now();
    let snap = index.reset(&st);
    let t1 = Instant::now();
    let mut compiler = Compiler::new();
    let desired = compiler.compile(&snap, &view).clone();
    let t2 = Instant::now();
    let peak = alloc::peak() - base;
    let report = Full {
        pods: shape.pods,
        namespaces: shape.namespaces,
        policies: shape.policies,
        identities: snap.identities.len(),
        map_entries: desired.len(),
        policy_entries: desired.policy.len(),
        index_ms: ms(t1 - t0),
        compile_ms: ms(t2 - t1),
        total_ms: ms(t2 - t0),
        peak_mib: mib(peak),
    };
    drop(objects);
    let run = Run { index, compiler };
    (report, run)
}

/// Applies one change as a watch event would deliver it (and then its undo, so every
/// repetition measures the same change), with the index and compiler kept from the
/// previous state as the agent keeps them: time to the new desired state, and the
/// map entries that differ from the state before.
fn change(
    run: &mut Run,
    pods: usize,
    name: &'static str,
    forward: Change,
    undo: Change,
) -> Change_ {
    let view = NodeView::default();
    let (_, (index_d, compile_d, changed, total)) = median(5, || {
        let before = run.compiler.compile(run.index.snapshot(), &view).clone();
        let t0 = Instant::now();
        let snap = run.index.apply(&forward);
        let t1 = Instant::now();
        let after = run.compiler.compile(snap, &view);
        let t2 = Instant::now();
        let counts = (after.changes(&before), after.len());
        run.index.apply(&undo);
        (t2 - t0, (t1 - t0, t2 - t1, counts.0, counts.1))
    });
    Change_ {
        pods,
        change: name,
        index_ms: ms(index_d),
        compile_ms: ms(compile_d),
        total_ms: ms(index_d + compile_d),
        entries_changed: changed,
        map_entries: total,
    }
}

fn bar(value: f64, max: f64, width: usize) -> String {
    let n = ((value / max) * width as f64).round() as usize;
    "█".repeat(n.max(1))
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let json = args.iter().any(|a| a == "--json");
    let sizes: Vec<usize> = args
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect::<Vec<_>>();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000, 50_000]
    } else {
        sizes
    };

    let mut fulls = vec![];
    let mut changes = vec![];
    for pods in sizes {
        eprintln!("compiling {pods} pods ...");
        let shape = Shape::pods(pods);
        let (f, mut run) = full(shape);
        fulls.push(f);
        let added = synthetic::pod(&shape, pods, None);
        changes.push(change(
            &mut run,
            pods,
            "pod added",
            Change::Upsert(Object::Pod(added.clone().into())),
            Change::Delete {
                kind: Kind::Pod,
                namespace: added.metadata.namespace.clone().unwrap(),
                name: added.metadata.name.clone().unwrap(),
            },
        ));
        // A relabel makes a new identity; how many subjects gain a peer depends on who
        // may reach the pod: few in an ordinary namespace, every pod in the cluster
        // in ns-0 (every namespace's DNS egress rule allows ns-0, like kube-system).
        let ordinary = 1 % shape.namespaces;
        changes.push(change(
            &mut run,
            pods,
            "relabel",
            Change::Upsert(Object::Pod(
                synthetic::pod(&shape, ordinary, Some("app-relabelled")).into(),
            )),
            Change::Upsert(Object::Pod(synthetic::pod(&shape, ordinary, None).into())),
        ));
        changes.push(change(
            &mut run,
            pods,
            "relabel in ns-0",
            Change::Upsert(Object::Pod(
                synthetic::pod(&shape, 0, Some("app-relabelled")).into(),
            )),
            Change::Upsert(Object::Pod(synthetic::pod(&shape, 0, None).into())),
        ));
        changes.push(change(
            &mut run,
            pods,
            "policy edited",
            Change::Upsert(Object::NetworkPolicy(synthetic::policy(0, 2, 5433).into())),
            Change::Upsert(Object::NetworkPolicy(synthetic::policy(0, 2, 5432).into())),
        ));
    }

    if json {
        println!(
            "{}",
            serde_json::json!({"full": fulls, "incremental": changes})
        );
        return;
    }
    println!("full compile (index + compile, one cold run; peak = heap above the input objects)");
    println!(
        "{:>7} {:>5} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9}  time",
        "pods", "ns", "pols", "ids", "entries", "index ms", "total ms", "peak MiB"
    );
    let max = fulls.iter().map(|f| f.total_ms).fold(0.0, f64::max);
    for f in &fulls {
        println!(
            "{:>7} {:>5} {:>6} {:>6} {:>9} {:>9.1} {:>9.1} {:>9.1}  {}",
            f.pods,
            f.namespaces,
            f.policies,
            f.identities,
            f.map_entries,
            f.index_ms,
            f.total_ms,
            f.peak_mib,
            bar(f.total_ms, max, 30)
        );
    }
    for w in fulls.windows(2) {
        println!(
            "  {}→{} pods: time ×{:.1}, peak memory ×{:.1}",
            w[0].pods,
            w[1].pods,
            w[1].total_ms / w[0].total_ms,
            w[1].peak_mib / w[0].peak_mib
        );
    }
    println!("\none change, applied as a watch event (median of 5; index + compile to the new desired state)");
    println!(
        "{:>7} {:<16} {:>9} {:>10} {:>9} {:>8} {:>9}",
        "pods", "change", "index ms", "compile ms", "total ms", "changed", "of"
    );
    for c in &changes {
        println!(
            "{:>7} {:<16} {:>9.2} {:>10.2} {:>9.2} {:>8} {:>9}",
            c.pods,
            c.change,
            c.index_ms,
            c.compile_ms,
            c.total_ms,
            c.entries_changed,
            c.map_entries
        );
    }
}

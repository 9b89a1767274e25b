//! The scenario suite: `deploy/kind/scenarios/`. `cluster.yaml` holds the pods every
//! scenario probes (plain Kubernetes objects, servers included, as `kubectl apply`
//! takes them); each scenario is `<name>.yaml` (its policies) beside `<name>.expect`
//! (the reachability it must give, written from the API's semantics):
//!
//! ```text
//! # A comment says what the scenario shows.
//! port 80/TCP
//!       x/a  x/b  y/a
//! x/a    .    ✓    ✗        rows send, columns receive: ✓ connects, ✗ does not,
//! x/b    ✗    .    ✗        . the pod itself (not probed)
//! y/a    ✓    ✓    .
//! ```
//! One `port` block per port probed. std only: compiled into xtask, which runs the
//! suite against a kind cluster with kubectl, and into netpol-agent's tests, which hold
//! every expectation against `netpol simulate` and the lab on machines without one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The pods every scenario runs against.
pub const CLUSTER: &str = "cluster.yaml";

/// The expected reachability on one port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expectation {
    pub port: u16,
    /// TCP, UDP or SCTP.
    pub protocol: String,
    /// namespace/name, in the order of the matrix.
    pub pods: Vec<String>,
    /// (from, to) → whether it connects, for every ordered pair of distinct pods.
    pub connects: BTreeMap<(String, String), bool>,
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    /// Its policies (`<name>.yaml`).
    pub manifests: PathBuf,
    pub expectations: Vec<Expectation>,
}

/// Every scenario of `dir`, in name order.
pub fn load_all(dir: &Path) -> Result<Vec<Scenario>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_suffix(".expect").map(str::to_string)
        })
        .collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let expect = dir.join(format!("{name}.expect"));
        let manifests = dir.join(format!("{name}.yaml"));
        if !manifests.is_file() {
            return Err(format!(
                "{}: no {name}.yaml beside it (the scenario's policies)",
                expect.display()
            ));
        }
        let text =
            std::fs::read_to_string(&expect).map_err(|e| format!("{}: {e}", expect.display()))?;
        out.push(Scenario {
            expectations: parse(&text, &expect.display().to_string())?,
            name,
            manifests,
        });
    }
    Ok(out)
}

/// Parses an `.expect` file; errors name the file and line.
pub fn parse(text: &str, file: &str) -> Result<Vec<Expectation>, String> {
    let mut out: Vec<Expectation> = Vec::new();
    // The block being read, and how many of its rows are (None: its columns are next).
    let mut current: Option<(Expectation, Option<usize>)> = None;
    let finish = |block: Option<(Expectation, Option<usize>)>, out: &mut Vec<Expectation>| {
        if let Some((e, rows)) = block {
            let rows = rows.unwrap_or(0);
            if rows == 0 || rows != e.pods.len() {
                return Err(format!(
                    "{file}: port {}/{}: every pod needs a row ({rows} of {})",
                    e.port,
                    e.protocol,
                    e.pods.len()
                ));
            }
            out.push(e);
        }
        Ok(())
    };
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        if let Some(spec) = line.strip_prefix("port ") {
            finish(current.take(), &mut out)?;
            let (port, protocol) = spec
                .trim()
                .split_once('/')
                .ok_or_else(|| format!("{file}:{n}: expected `port N/TCP|UDP|SCTP`"))?;
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{file}:{n}: {port:?} is not a port (1-65535)"))?;
            if !["TCP", "UDP", "SCTP"].contains(&protocol) {
                return Err(format!(
                    "{file}:{n}: protocol {protocol:?}: expected TCP, UDP or SCTP"
                ));
            }
            current = Some((
                Expectation {
                    port,
                    protocol: protocol.to_string(),
                    pods: vec![],
                    connects: BTreeMap::new(),
                },
                None,
            ));
            continue;
        }
        let Some((block, rows)) = current.as_mut() else {
            return Err(format!(
                "{file}:{n}: a matrix starts with `port N/PROTOCOL`"
            ));
        };
        let cells: Vec<&str> = line.split_whitespace().collect();
        let Some(row) = *rows else {
            if let Some(bad) = cells.iter().find(|c| c.split('/').count() != 2) {
                return Err(format!("{file}:{n}: column {bad:?} is not namespace/pod"));
            }
            block.pods = cells.iter().map(|c| c.to_string()).collect();
            *rows = Some(0);
            continue;
        };
        *rows = Some(row + 1);
        let from = cells[0];
        if block.pods.get(row).map(String::as_str) != Some(from) {
            return Err(format!(
                "{file}:{n}: row {from:?}: rows must follow the columns' order ({:?} expected)",
                block.pods.get(row)
            ));
        }
        if cells.len() != block.pods.len() + 1 {
            return Err(format!(
                "{file}:{n}: row {from}: {} cells for {} columns",
                cells.len() - 1,
                block.pods.len()
            ));
        }
        for (to, cell) in block.pods.clone().iter().zip(&cells[1..]) {
            let connects = match (*cell, to == from) {
                (".", true) => continue,
                ("✓", false) => true,
                ("✗", false) => false,
                (_, true) => return Err(format!("{file}:{n}: {from} to itself must be `.`")),
                (other, false) => {
                    return Err(format!(
                        "{file}:{n}: {from} to {to}: {other:?} is neither ✓ nor ✗"
                    ))
                }
            };
            block
                .connects
                .insert((from.to_string(), to.clone()), connects);
        }
    }
    finish(current, &mut out)?;
    if out.is_empty() {
        return Err(format!("{file}: no `port` block"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_matrix_reads_into_pairs() {
        let e = parse(
            "# demo\nport 80/TCP\n  x/a x/b\nx/a . ✓ # a reaches b\nx/b ✗ .\n\nport 81/UDP\nx/a x/b\nx/a . ✗\nx/b ✗ .\n",
            "t",
        )
        .unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].port, e[0].protocol.as_str()), (80, "TCP"));
        assert!(e[0].connects[&("x/a".into(), "x/b".into())]);
        assert!(!e[0].connects[&("x/b".into(), "x/a".into())]);
        assert_eq!(e[1].connects.len(), 2);
    }

    #[test]
    fn mistakes_name_the_line() {
        for (text, wanted) in [
            ("x/a x/b\n", "t:1: a matrix starts with"),
            ("port 80\n", "t:1: expected `port N/"),
            ("port 0/TCP\n", "t:1: \"0\" is not a port"),
            ("port 80/HTTP\n", "t:1: protocol \"HTTP\""),
            ("port 80/TCP\nx/a b\n", "t:2: column \"b\""),
            ("port 80/TCP\nx/a x/b\nx/b . ✓\n", "t:3: row \"x/b\""),
            ("port 80/TCP\nx/a x/b\nx/a . ✓ ✓\n", "t:3: row x/a: 3 cells"),
            ("port 80/TCP\nx/a x/b\nx/a ✓ ✓\n", "t:3: x/a to itself"),
            ("port 80/TCP\nx/a x/b\nx/a . y\n", "t:3: x/a to x/b: \"y\""),
            ("port 80/TCP\nx/a x/b\nx/a . ✓\n", "every pod needs a row"),
            ("# nothing\n", "no `port` block"),
        ] {
            let e = parse(text, "t").unwrap_err();
            assert!(e.contains(wanted), "{text:?}: {e}");
        }
    }
}

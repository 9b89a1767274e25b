//! The test runner behind `cargo xtask test`: every test binary of the workspace run by
//! itself, so one that crashes (a signal, a bad exit, no summary) is counted as a
//! failure and named, and the next one still runs; then the doctests.
//!
//! `cargo test` stops at the first failing binary; with `--no-fail-fast` it runs them
//! all, but a binary that dies without a `test result:` line adds nothing to totals
//! added up from those lines.

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Where the binaries' stdout is echoed as it comes: the terminal, or a buffer in this
/// module's tests (which run inside `cargo xtask test` and must not print result lines).
pub type Echo = Arc<Mutex<dyn Write + Send>>;

/// How long to keep reading after a binary exits: a process it started and left
/// behind may hold its stdout open forever.
const GRACE: Duration = Duration::from_secs(5);

/// The workspace whose tests run.
pub struct Workspace<'a> {
    pub root: &'a Path,
    /// CARGO_TARGET_DIR for its cargo commands; `None` inherits the environment's.
    pub target_dir: Option<&'a Path>,
}

impl Workspace<'_> {
    fn cargo(&self) -> Command {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(self.root);
        if let Some(dir) = self.target_dir {
            cmd.env("CARGO_TARGET_DIR", dir);
        }
        cmd
    }
}

/// A test executable as cargo built it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestBinary {
    pub package: String,
    pub version: String,
    /// The target's name and kind (lib, bin, test, example).
    pub target: String,
    pub kind: String,
    pub executable: PathBuf,
    pub manifest_path: PathBuf,
}

/// The numbers of one or more `test result:` lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
    }
}

/// How a binary ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    Exit(i32),
    Signal(i32),
    NotStarted(String),
}

/// Everything a run counted, and the binaries that failed with how they ended.
#[derive(Debug, Default)]
pub struct Summary {
    pub counts: Counts,
    pub failed: Vec<(String, String)>,
}

/// `test result: ok. 3 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; ...`
pub fn parse_result_line(line: &str) -> Option<Counts> {
    let rest = line.trim_end().strip_prefix("test result: ")?;
    // Past the verdict ("ok." or "FAILED."), `N word` pieces split by `;`.
    let (_, rest) = rest.split_once(". ")?;
    let mut counts = Counts::default();
    let mut known = false;
    for piece in rest.split(';') {
        let Some((n, word)) = piece.trim().split_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        let slot = match word {
            "passed" => &mut counts.passed,
            "failed" => &mut counts.failed,
            "ignored" => &mut counts.ignored,
            _ => continue,
        };
        *slot = n;
        known = true;
    }
    known.then_some(counts)
}

/// What one binary adds to the totals, and why it failed if it did. A binary that
/// crashed, exited non-zero or printed no result line is at least one failed test,
/// whatever its own line said.
pub fn classify(ending: &Ending, result: Option<Counts>) -> (Counts, Option<String>) {
    let mut counts = result.unwrap_or_default();
    let why = match ending {
        Ending::Signal(s) => Some(format!("killed by signal {s}")),
        Ending::NotStarted(e) => Some(format!("could not start: {e}")),
        Ending::Exit(0) if result.is_none() => Some("no result line".to_string()),
        Ending::Exit(0) if counts.failed > 0 => Some("exit 0 despite failures".to_string()),
        Ending::Exit(0) => None,
        Ending::Exit(c) => Some(format!("exit {c}")),
    };
    if why.is_some() && counts.failed == 0 {
        counts.failed = 1;
    }
    (counts, why)
}

/// The test executables in cargo's `--message-format=json` output: artifacts built for
/// test with an executable; benches are left out (harness=false mains, not tests).
pub fn test_binaries(json_lines: &str) -> Vec<TestBinary> {
    let mut out: Vec<TestBinary> = json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .filter(|m| {
            !m["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bench"))
        })
        .filter_map(|m| {
            let (package, version) = package_of(m["package_id"].as_str()?);
            Some(TestBinary {
                package,
                version,
                target: m["target"]["name"].as_str()?.to_string(),
                kind: m["target"]["kind"][0].as_str().unwrap_or("").to_string(),
                executable: m["executable"].as_str()?.into(),
                manifest_path: m["manifest_path"].as_str()?.into(),
            })
        })
        .collect();
    // Cargo reports artifacts as they finish; run them in a stable order.
    out.sort_by(|a, b| (&a.package, &a.kind, &a.target).cmp(&(&b.package, &b.kind, &b.target)));
    out.dedup();
    out
}

/// Name and version from a package ID: `path+file:///w/tests#netpol-tests@0.1.0`, or
/// `path+file:///w/xtask#0.1.0` when the name is the directory's.
fn package_of(id: &str) -> (String, String) {
    let (url, frag) = id.rsplit_once('#').unwrap_or((id, ""));
    match frag.split_once('@') {
        Some((name, version)) => (name.to_string(), version.to_string()),
        None => {
            let dir = url.trim_end_matches('/').rsplit('/').next().unwrap_or(url);
            (dir.to_string(), frag.to_string())
        }
    }
}

/// Builds the workspace's tests as plain `cargo test` selects them (no target flags:
/// lib, bins, tests, and examples or benches only where `test = true`) and lists them.
pub fn list(ws: &Workspace) -> Result<Vec<TestBinary>, String> {
    let out = ws
        .cargo()
        // Diagnostics still rendered to stderr for a human; stdout is JSON.
        .args([
            "test",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cargo test --no-run: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo test --no-run failed: {}", out.status));
    }
    Ok(test_binaries(&String::from_utf8_lossy(&out.stdout)))
}

/// Runs `cmd` with stdout echoed live and its result lines added up; stderr passes
/// straight through.
fn run_counted(mut cmd: Command, echo: &Echo) -> (Ending, Option<Counts>) {
    let mut child = match cmd.stdout(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => return (Ending::NotStarted(e.to_string()), None),
    };
    let mut stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let echo = echo.clone();
    // A thread reads, so that a pipe held open past the exit cannot stall the run.
    std::thread::spawn(move || {
        let (mut buf, mut line) = ([0u8; 8192], Vec::new());
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            // Chunks, not lines: `test name ... ` shows while the test runs.
            if let Ok(mut w) = echo.lock() {
                let _ = w.write_all(&buf[..n]).and_then(|_| w.flush());
            }
            for &b in &buf[..n] {
                if b != b'\n' {
                    line.push(b);
                    continue;
                }
                if let Some(c) = parse_result_line(&String::from_utf8_lossy(&line)) {
                    let _ = tx.send(c);
                }
                line.clear();
            }
        }
    });
    let ending = match child.wait() {
        Ok(s) => match (s.signal(), s.code()) {
            (Some(sig), _) => Ending::Signal(sig),
            (None, Some(code)) => Ending::Exit(code),
            (None, None) => Ending::Exit(-1),
        },
        Err(e) => Ending::NotStarted(e.to_string()),
    };
    let (mut total, mut seen) = (Counts::default(), false);
    let deadline = Instant::now() + GRACE;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(c) => {
                total += c;
                seen = true;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                eprintln!("==> its stdout is still open (a process it left running?); moving on");
                break;
            }
        }
    }
    (ending, seen.then_some(total))
}

/// Every test binary with `--include-ignored` (the root-only tests are ignored for a
/// user's plain `cargo test`; xtask runs as root) and `args`, each from its package's
/// directory as cargo runs it, then the doctests.
pub fn run(ws: &Workspace, args: &[String], echo: &Echo) -> Result<Summary, String> {
    let binaries = list(ws)?;
    let mut summary = Summary::default();
    let n = binaries.len();
    for (i, b) in binaries.iter().enumerate() {
        let name = format!("{} {}", b.package, b.target);
        eprintln!("==> [{}/{n}] {name}", i + 1);
        let dir = b.manifest_path.parent().unwrap_or(ws.root);
        let mut cmd = Command::new(&b.executable);
        // The runtime environment cargo gives tests that read it with std::env.
        cmd.current_dir(dir)
            .env("CARGO_MANIFEST_DIR", dir)
            .env("CARGO_MANIFEST_PATH", &b.manifest_path)
            .env("CARGO_PKG_NAME", &b.package)
            .env("CARGO_PKG_VERSION", &b.version)
            .arg("--include-ignored")
            .args(args);
        let (ending, result) = run_counted(cmd, echo);
        add(&mut summary, name, &ending, result);
    }
    eprintln!("==> doctests");
    let mut cmd = ws.cargo();
    // Every crate's doctests even after one fails. Rustdoc's `ignore` blocks do not
    // compile, so no --include-ignored here: they count as skipped.
    cmd.args(["test", "--doc", "--no-fail-fast", "--"])
        .args(args);
    let (ending, result) = run_counted(cmd, echo);
    // No result line is fine here: a workspace without a library has no doctests.
    add(
        &mut summary,
        "doctests".into(),
        &ending,
        Some(result.unwrap_or_default()),
    );
    Ok(summary)
}

fn add(summary: &mut Summary, name: String, ending: &Ending, result: Option<Counts>) {
    let (counts, why) = classify(ending, result);
    summary.counts += counts;
    if let Some(why) = why {
        summary.failed.push((name, why));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(passed: u64, failed: u64, ignored: u64) -> Counts {
        Counts {
            passed,
            failed,
            ignored,
        }
    }

    #[test]
    fn result_lines_parse() {
        let ok = "test result: ok. 3 passed; 0 failed; 2 ignored; 0 measured; 5 filtered out; finished in 0.01s";
        assert_eq!(parse_result_line(ok), Some(counts(3, 0, 2)));
        let bad = "test result: FAILED. 10 passed; 4 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.20s\r";
        assert_eq!(parse_result_line(bad), Some(counts(10, 4, 0)));
        for not in [
            "",
            "running 3 tests",
            "test foo ... ok",
            "  test result: ok. 1 passed; 0 failed",
            "test result: garbage",
        ] {
            assert_eq!(parse_result_line(not), None, "{not:?}");
        }
    }

    #[test]
    fn endings_classify_honestly() {
        let fine = Some(counts(5, 0, 1));
        assert_eq!(classify(&Ending::Exit(0), fine), (counts(5, 0, 1), None));
        // Failing tests: the binary's own count stands.
        assert_eq!(
            classify(&Ending::Exit(101), Some(counts(5, 2, 0))),
            (counts(5, 2, 0), Some("exit 101".into()))
        );
        // A crash after a clean line, a crash with no line, a silent exit: one failure.
        assert_eq!(
            classify(&Ending::Signal(11), fine),
            (counts(5, 1, 1), Some("killed by signal 11".into()))
        );
        assert_eq!(
            classify(&Ending::Signal(6), None),
            (counts(0, 1, 0), Some("killed by signal 6".into()))
        );
        assert_eq!(
            classify(&Ending::Exit(0), None),
            (counts(0, 1, 0), Some("no result line".into()))
        );
        assert_eq!(
            classify(&Ending::Exit(1), None),
            (counts(0, 1, 0), Some("exit 1".into()))
        );
        assert_eq!(
            classify(&Ending::Exit(0), Some(counts(1, 1, 0))).1,
            Some("exit 0 despite failures".into())
        );
        assert_eq!(
            classify(&Ending::NotStarted("gone".into()), None).1,
            Some("could not start: gone".into())
        );
    }

    #[test]
    fn cargo_json_lists_test_executables_only() {
        let json = [
            // The lib built for linking (not a test), its unit tests, a bench, a build script.
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#netpol-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["lib"],"name":"netpol_tests"},"profile":{"test":false},"executable":null}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#netpol-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"name":"lab"},"profile":{"test":true},"executable":"/w/target/debug/deps/lab-1"}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#netpol-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["bench"],"name":"suite"},"profile":{"test":true},"executable":"/w/target/debug/deps/suite-1"}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/xtask#0.1.0","manifest_path":"/w/xtask/Cargo.toml","target":{"kind":["bin"],"name":"xtask"},"profile":{"test":true},"executable":"/w/target/debug/deps/xtask-1"}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/xtask#0.1.0","manifest_path":"/w/xtask/Cargo.toml","target":{"kind":["custom-build"],"name":"build-script-build"},"profile":{"test":false},"executable":null}"#,
            r#"{"reason":"build-finished","success":true}"#,
            "not json",
        ]
        .join("\n");
        let got = test_binaries(&json);
        let names: Vec<_> = got
            .iter()
            .map(|b| (b.package.as_str(), b.target.as_str(), b.version.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("netpol-tests", "lab", "0.1.0"),
                ("xtask", "xtask", "0.1.0")
            ]
        );
        assert_eq!(got[0].manifest_path, Path::new("/w/tests/Cargo.toml"));
        assert_eq!(got[0].executable, Path::new("/w/target/debug/deps/lab-1"));
    }

    /// A scratch workspace with a passing, a failing, an ignored and an aborting test, a
    /// harness=false test that prints nothing, a bench that must not run and doctests.
    const SCRATCH: &[(&str, &str)] = &[
        ("Cargo.toml", "[workspace]\nresolver = \"2\"\nmembers = [\"good\", \"bad\", \"binonly\"]\n"),
        ("good/Cargo.toml", "[package]\nname = \"good\"\nversion = \"0.2.0\"\nedition = \"2021\"\n\n[[bench]]\nname = \"b\"\nharness = false\n"),
        ("good/src/lib.rs", "//! ```\n//! assert_eq!(good::two(), 2);\n//! ```\n//! ```ignore\n//! not rust\n//! ```\npub fn two() -> u32 { 2 }\n#[test] fn passes() {}\n#[test] #[ignore = \"needs root: pretend\"] fn ignored_but_run() {}\n"),
        ("good/tests/env.rs", "#[test] fn runs_where_cargo_runs_it() {\n    let dir = std::env::var(\"CARGO_MANIFEST_DIR\").unwrap();\n    assert_eq!(std::env::current_dir().unwrap(), std::path::Path::new(&dir));\n    assert!(std::path::Path::new(\"Cargo.toml\").exists());\n    assert_eq!(std::env::var(\"CARGO_PKG_NAME\").unwrap(), \"good\");\n}\n"),
        ("good/benches/b.rs", "fn main() { panic!(\"a bench must not run\") }\n"),
        ("bad/Cargo.toml", "[package]\nname = \"bad\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[[test]]\nname = \"silent\"\nharness = false\n"),
        ("bad/src/lib.rs", "//! ```\n//! assert_eq!(1, 2);\n//! ```\n#[test] fn passes() {}\n#[test] fn fails() { panic!(\"on purpose\") }\n"),
        ("bad/tests/abort.rs", "#[test] fn aborts() { std::process::abort() }\n"),
        ("bad/tests/silent.rs", "fn main() {}\n"),
        ("binonly/Cargo.toml", "[package]\nname = \"binonly\"\nversion = \"0.1.0\"\nedition = \"2021\"\n"),
        ("binonly/src/main.rs", "fn main() {}\n#[test] fn passes() {}\n"),
    ];

    #[test]
    #[ignore = "slow: builds and runs a scratch cargo workspace (cargo test -p xtask -- --ignored)"]
    fn a_scratch_workspace_counts_honestly() {
        let root = std::env::temp_dir().join(format!("xtask-scratch-{}", std::process::id()));
        for (path, text) in SCRATCH {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let target = root.join("target");
        let ws = Workspace {
            root: &root,
            target_dir: Some(&target),
        };
        let buf = Arc::new(Mutex::new(Vec::<u8>::new()));
        let echo: Echo = buf.clone();
        let summary = run(&ws, &[], &echo).unwrap();
        let _ = std::fs::remove_dir_all(&root);
        let out = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
        // Passed: good's 2 unit tests (one ignored, run anyway), its env test, bad's
        // passing one, binonly's, good's doctest. Failed: bad's failing test, the abort,
        // the silent binary, bad's doctest. Skipped: good's `ignore` doctest.
        assert_eq!(summary.counts, counts(6, 4, 1), "{out}");
        let failed: Vec<_> = summary
            .failed
            .iter()
            .map(|(n, w)| format!("{n}: {w}"))
            .collect();
        assert_eq!(
            failed,
            [
                "bad bad: exit 101",
                "bad abort: killed by signal 6",
                "bad silent: no result line",
                "doctests: exit 101",
            ],
            "{out}"
        );
        assert!(out.contains("test fails ... FAILED"), "{out}");
    }
}

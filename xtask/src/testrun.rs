//! Runs every test binary of the workspace, one after the other, whatever happened to
//! the one before, and counts honestly: a binary that dies by a signal, exits non-zero
//! or never prints its `test result:` line has failed, whatever its lines said.
//!
//! cargo's own `cargo test` stops at the first failing binary (without
//! `--no-fail-fast`) and leaves the counting to whoever reads its output; running the
//! binaries here makes each one's ending visible.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// One test executable as cargo built it.
#[derive(Clone, Debug)]
pub struct TestBinary {
    pub package: String,
    /// `lib`, `bin`, `test`, ... and the target's name.
    pub kind: String,
    pub target: String,
    pub executable: PathBuf,
    pub package_dir: PathBuf,
}

/// The counts of one run, and the binaries that failed as binaries.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
    /// (binary, how it ended), for every binary that failed.
    pub failures: Vec<(String, String)>,
}

/// `test result: ok. 3 passed; 1 failed; 2 ignored; ...` → (passed, failed, ignored).
pub fn parse_result(line: &str) -> Option<(u64, u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let count = |word: &str| -> u64 {
        rest.split(';')
            .find_map(|part| part.trim().strip_suffix(word))
            .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    Some((count(" passed"), count(" failed"), count(" ignored")))
}

/// What one binary adds to the tally: its own counts, and a failure of its own when
/// it ended badly (a signal, a non-zero exit, no result line) without a failed test to
/// show for it.
pub fn judge(
    counts: Option<(u64, u64, u64)>,
    status: ExitStatus,
) -> (u64, u64, u64, Option<String>) {
    use std::os::unix::process::ExitStatusExt;
    let (passed, failed, ignored) = counts.unwrap_or((0, 0, 0));
    let ending = if let Some(sig) = status.signal() {
        Some(format!("killed by signal {sig}"))
    } else if counts.is_none() {
        Some(match status.code() {
            Some(0) => "no result line".to_string(),
            Some(c) => format!("exit {c}, no result line"),
            None => "no result line".to_string(),
        })
    } else if !status.success() {
        Some(format!("exit {}", status.code().unwrap_or(-1)))
    } else {
        None
    };
    let failed = match &ending {
        Some(_) if failed == 0 => 1,
        _ => failed,
    };
    (passed, failed, ignored, ending)
}

/// Builds the test executables (`cargo test --no-run`, the targets plain `cargo test`
/// runs: libraries, binaries, integration tests) and lists them.
pub fn list(root: &Path) -> Result<Vec<TestBinary>, String> {
    let out = Command::new("cargo")
        .current_dir(root)
        .args([
            "test",
            "--no-run",
            "--lib",
            "--bins",
            "--tests",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cargo test --no-run: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo test --no-run failed: {}", out.status));
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let kind = msg["target"]["kind"][0].as_str().unwrap_or("?").to_string();
        if kind == "bench" {
            continue;
        }
        // "path+file:///work/x/netpol-agent#netpol-agent@0.1.0", or "...#0.1.0" when the
        // directory is the package's name.
        let id = msg["package_id"].as_str().unwrap_or_default();
        let manifest = PathBuf::from(msg["manifest_path"].as_str().unwrap_or_default());
        let package_dir = manifest.parent().map(Path::to_path_buf).unwrap_or_default();
        let package = match id.rsplit_once('#').map(|(_, p)| p) {
            Some(p) if p.contains('@') => p.split('@').next().unwrap_or(p).to_string(),
            _ => package_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        bins.push(TestBinary {
            package,
            kind,
            target: msg["target"]["name"].as_str().unwrap_or("?").to_string(),
            executable: PathBuf::from(exe),
            package_dir,
        });
    }
    Ok(bins)
}

/// Runs `bins` in turn with `args` (a name filter, `--include-ignored`, ...), each
/// from its package's directory as cargo would, its output passed through.
pub fn run_all(bins: &[TestBinary], args: &[String]) -> Tally {
    let mut tally = Tally::default();
    for (i, bin) in bins.iter().enumerate() {
        let name = format!("{} {} {}", bin.package, bin.kind, bin.target);
        eprintln!("==> [{}/{}] {name}", i + 1, bins.len());
        let (counts, status) = match run_one(bin, args) {
            Ok(r) => r,
            Err(e) => {
                tally.failed += 1;
                tally.failures.push((name, format!("not started: {e}")));
                continue;
            }
        };
        let (p, f, s, ending) = judge(counts, status);
        tally.passed += p;
        tally.failed += f;
        tally.skipped += s;
        if let Some(ending) = ending {
            tally.failures.push((name, ending));
        } else if f > 0 {
            tally.failures.push((name, format!("{f} failed")));
        }
    }
    tally
}

/// One binary: its summed result lines (None: it printed none) and how it ended.
fn run_one(
    bin: &TestBinary,
    args: &[String],
) -> std::io::Result<(Option<(u64, u64, u64)>, ExitStatus)> {
    let mut child = Command::new(&bin.executable)
        .args(args)
        .current_dir(&bin.package_dir)
        .env("CARGO_MANIFEST_DIR", &bin.package_dir)
        .env("CARGO_PKG_NAME", &bin.package)
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let mut counts: Option<(u64, u64, u64)> = None;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        println!("{line}");
        if let Some((p, f, i)) = parse_result(&line) {
            let c = counts.get_or_insert((0, 0, 0));
            *c = (c.0 + p, c.1 + f, c.2 + i);
        }
    }
    Ok((counts, child.wait()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn result_lines_read_into_counts() {
        assert_eq!(
            parse_result("test result: ok. 3 passed; 0 failed; 2 ignored; 0 measured; 1 filtered out; finished in 0.01s"),
            Some((3, 0, 2))
        );
        assert_eq!(
            parse_result(
                "test result: FAILED. 5 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some((5, 1, 0))
        );
        assert_eq!(parse_result("running 3 tests"), None);
    }

    #[test]
    fn a_binary_that_ends_badly_fails_whatever_its_lines_said() {
        let ok = ExitStatus::from_raw(0);
        let exit101 = ExitStatus::from_raw(101 << 8);
        let segv = ExitStatus::from_raw(11);
        assert_eq!(judge(Some((3, 0, 1)), ok), (3, 0, 1, None));
        // Failed tests: their count, the exit is what cargo's harness does then.
        assert_eq!(
            judge(Some((3, 2, 0)), exit101),
            (3, 2, 0, Some("exit 101".into()))
        );
        // A signal after a clean-looking line still fails the binary.
        assert_eq!(
            judge(Some((3, 0, 0)), segv),
            (3, 1, 0, Some("killed by signal 11".into()))
        );
        assert_eq!(
            judge(None, segv),
            (0, 1, 0, Some("killed by signal 11".into()))
        );
        assert_eq!(judge(None, ok), (0, 1, 0, Some("no result line".into())));
        assert_eq!(judge(None, exit101).1, 1);
    }

    /// A scratch project with a passing, a failing, an ignored and an aborting test:
    /// every binary runs and the count is honest.
    #[test]
    fn a_scratch_workspace_is_counted_honestly() {
        let dir = std::env::temp_dir().join(format!("xtask-testrun-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::create_dir_all(dir.join("tests")).unwrap();
        std::fs::write(
            dir.join("Cargo.toml"),
            "[package]\nname = \"scratch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n[workspace]\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("src/lib.rs"),
            "#[test] fn passes() {}\n#[test] fn fails() { panic!(\"no\") }\n#[test] #[ignore = \"slow\"] fn ignored() {}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("tests/aborts.rs"),
            "#[test] fn aborts() { std::process::abort() }\n",
        )
        .unwrap();
        std::fs::write(dir.join("tests/fine.rs"), "#[test] fn fine() {}\n").unwrap();
        let bins = list(&dir).unwrap();
        assert_eq!(bins.len(), 3, "{bins:?}");
        let tally = run_all(&bins, &[]);
        // lib: 1 passed, 1 failed, 1 ignored; aborts: killed (1 failed); fine: 1 passed.
        assert_eq!(
            (tally.passed, tally.failed, tally.skipped),
            (2, 2, 1),
            "{tally:?}"
        );
        assert!(tally
            .failures
            .iter()
            .any(|(n, e)| n.contains("aborts") && e == "killed by signal 6"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

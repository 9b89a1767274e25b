//! `cargo xtask setup|test|demo|bench`: what a newcomer and CI run, the same way.
//!
//! setup installs only what a fresh machine lacks (nightly rust-src, bpf-linker linked
//! against the nightly's LLVM, Debian packages, a bpffs mount) and checks the kernel.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use clap::{Parser, Subcommand};

mod image;
mod kind;
mod scenario;
mod testrun;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing and check the kernel (idempotent).
    Setup,
    /// Setup, then every test: unit, BPF_PROG_TEST_RUN, and lab (real packets).
    Test {
        /// Extra arguments for every test binary and the doctests (a test name filter,
        /// say), after `--include-ignored`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, then the lab demo on examples/demo.
    Demo,
    /// The OCI image deploy/ names (localhost/netpol:TAG and target/image/netpol-TAG.oci.tar),
    /// built with buildah from scratch: the netpol binary and the libraries it loads; and
    /// beside it the load image of the kind benchmark (localhost/netpol-load:TAG).
    Image {
        /// Package the dev-profile binary `cargo build` made (the tests' image).
        #[arg(long)]
        debug: bool,
        #[arg(long, default_value = "latest")]
        tag: String,
    },
    /// Build the image, create a kind cluster (deploy/kind.yaml), install Flannel and
    /// netpol (deploy/), run the scenario suite (deploy/kind/scenarios/) against it.
    /// Needs docker, kind and kubectl.
    Kind {
        /// Run the benchmark scenarios (the lab harness's plan) on the cluster instead.
        #[arg(long)]
        bench: bool,
    },
    /// Benchmarks that report ratios and growth, never pass/fail on time: netpol against
    /// no enforcement, iptables/ipset and nftables sets in one run;
    /// target/bench/report.{json,md}, *.png.
    ///
    /// `bench` runs every scenario; `bench datapath|update|control|events|packet ...`
    /// some of them; `bench compile [SIZES...] [--json]` the compiler alone.
    Bench {
        /// Scenarios (datapath, update, control, events, packet), or `compile [SIZES...]`.
        what: Vec<String>,
        /// About 3 minutes instead of about 30: fewer N, sizes and rounds.
        #[arg(long)]
        quick: bool,
        /// compile: print one JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
}

const SCENARIOS: &[&str] = &["datapath", "update", "control", "events", "packet"];

const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "iperf3",
    "netcat-openbsd",
    "bpftool",
    "tcpdump",
    "iptables",
    "ipset",
    "nftables",
    // sysctl in the lab's node namespaces (forwarding)
    "procps",
    // the benchmark report's charts (text)
    "fonts-dejavu-core",
    // `cargo xtask image` (buildah, from scratch) and the test that runs it (podman)
    "buildah",
    "podman",
    // podman's runtime here: crun refuses this machine's hybrid cgroup hierarchy
    "runc",
    // the CA bundle the image carries
    "ca-certificates",
];

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup(),
        // The image test runs what `cargo xtask image --debug` packages: build, then
        // package, then test.
        Task::Test { args } => setup()
            .and_then(|_| build_everything())
            .and_then(|_| image::build(false, "dev"))
            .and_then(|_| image::build_load(false, "dev").map(|_| ()))
            .and_then(|_| test(&args)),
        Task::Demo => setup().and_then(|_| demo()),
        Task::Image { debug, tag } => setup()
            .and_then(|_| image::build(!debug, &tag))
            .and_then(|_| image::build_load(!debug, &tag).map(|_| ())),
        Task::Bench { what, quick, json } => bench(&what, quick, json),
        Task::Kind { bench } => kind::kind(bench),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T = ()> = std::result::Result<T, String>;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result {
    let shown = format!("{cmd:?}");
    let status = cmd.status().map_err(|e| format!("{shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed: {status}"))
    }
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn step(what: &str) {
    eprintln!("==> {what}");
}

fn setup() -> Result {
    let started = Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        return Err("run as root: loading eBPF programs and creating network namespaces need it (sudo -E cargo xtask ...)".into());
    }
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !succeeds(Command::new("dpkg-query").args(["-W", "-f=${Status}", p])) || !installed(p)
        })
        .collect();
    if !missing.is_empty() {
        step(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let has_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false);
    if !has_src {
        step("adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    // bpf-linker finds libLLVM only under `cargo +nightly`, so look for the binary itself.
    let cargo_home = std::env::var("CARGO_HOME").unwrap_or_else(|_| {
        format!(
            "{}/.cargo",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into())
        )
    });
    if !Path::new(&cargo_home).join("bin/bpf-linker").exists() {
        step("building bpf-linker against the nightly's LLVM (about a minute)");
        let sysroot = Command::new("rustc")
            .args(["+nightly", "--print", "sysroot"])
            .output()
            .map_err(|e| format!("rustc +nightly: {e}"))?;
        let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
        let llvm = std::fs::read_dir(sysroot.join("lib"))
            .map_err(|e| format!("reading the nightly sysroot: {e}"))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
            })
            .ok_or(
                "the nightly toolchain ships no libLLVM.so: install a nightly with the LLVM tools",
            )?;
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        let prefix = PathBuf::from(home).join(".cache/netpol-llvm");
        std::fs::create_dir_all(prefix.join("lib")).map_err(|e| e.to_string())?;
        let link = prefix.join("lib/libLLVM.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link).map_err(|e| e.to_string())?;
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
                "--locked",
            ])
            .env("LLVM_PREFIX", &prefix))?;
    }
    if !Path::new("/sys/fs/bpf").exists()
        || !succeeds(Command::new("mountpoint").args(["-q", "/sys/fs/bpf"]))
    {
        step("mounting bpffs on /sys/fs/bpf");
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    check_kernel()?;
    eprintln!("==> setup done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Every target of the workspace's default members (`cargo build --all-targets`).
fn build_everything() -> Result {
    step("building");
    run(Command::new("cargo")
        .current_dir(root())
        .args(["build", "--all-targets"]))
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn check_kernel() -> Result {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err("the kernel has no BTF (/sys/kernel/btf/vmlinux): use a kernel built with CONFIG_DEBUG_INFO_BTF=y".into());
    }
    let jit = std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable").unwrap_or_default();
    if jit.trim() == "0" {
        return Err("the BPF JIT is off: sysctl -w net.core.bpf_jit_enable=1".into());
    }
    // clsact on a throwaway veth in a throwaway namespace.
    let ns = format!("npx-check-{}", std::process::id());
    let ok = succeeds(Command::new("ip").args(["netns", "add", &ns]))
        && succeeds(Command::new("ip").args([
            "-n", &ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
        ]))
        && succeeds(Command::new("tc").args(["-n", &ns, "qdisc", "add", "dev", "d0", "clsact"]));
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    if !ok {
        return Err("the kernel cannot create a network namespace with a veth and a clsact qdisc (needs CONFIG_NET_NS, CONFIG_VETH, CONFIG_NET_SCH_INGRESS)".into());
    }
    Ok(())
}

fn test(args: &[String]) -> Result {
    let started = Instant::now();
    step("running every test (unit, BPF_PROG_TEST_RUN, lab, image), every binary whatever the others do");
    let root = root();
    let ws = testrun::Workspace {
        root: &root,
        target_dir: None,
    };
    let echo: testrun::Echo = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let summary = testrun::run(&ws, args, &echo)?;
    let testrun::Counts {
        passed,
        failed,
        ignored,
    } = summary.counts;
    if !summary.failed.is_empty() {
        println!("\nfailed binaries:");
        for (name, why) in &summary.failed {
            println!("    {name}: {why}");
        }
    }
    eprintln!("==> tests done in {:.1}s", started.elapsed().as_secs_f64());
    // CI reads this line: keep its form.
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if failed == 0 && summary.failed.is_empty() {
        Ok(())
    } else {
        let names: Vec<&str> = summary.failed.iter().map(|(n, _)| n.as_str()).collect();
        Err(format!("{failed} failed, in {}", names.join(", ")))
    }
}

fn bench(what: &[String], quick: bool, json: bool) -> Result {
    if what.first().map(String::as_str) == Some("compile") {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root())
            .args(["bench", "-p", "netpol-tests", "--bench", "compile", "--"])
            .args(&what[1..]);
        if json {
            cmd.arg("--json");
        }
        return run(&mut cmd);
    }
    if let Some(bad) = what.iter().find(|w| !SCENARIOS.contains(&w.as_str())) {
        return Err(format!(
            "unknown scenario {bad:?}: {} or compile [SIZES...]",
            SCENARIOS.join(", ")
        ));
    }
    setup()?;
    suite(what, quick, "lab")
}

/// The benchmark suite (tests/benches/suite) on a testbed, after the compile
/// benchmark whose JSON its control scenario reads.
fn suite(what: &[String], quick: bool, testbed: &str) -> Result {
    let out = root().join("target/bench");
    std::fs::create_dir_all(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let compile_json = out.join("compile.json");
    let wants_control = what.is_empty() || what.iter().any(|w| w == "control");
    if wants_control {
        step("compile benchmark (control scenario)");
        let sizes: &[&str] = if quick { &["1000"] } else { &[] };
        let output = Command::new("cargo")
            .current_dir(root())
            .args(["bench", "-p", "netpol-tests", "--bench", "compile", "--"])
            .args(sizes)
            .arg("--json")
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| format!("cargo bench --bench compile: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "cargo bench --bench compile failed: {}",
                output.status
            ));
        }
        // The JSON document is the last line cargo's bench printed.
        let text = String::from_utf8_lossy(&output.stdout);
        let doc = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or("{}");
        std::fs::write(&compile_json, doc).map_err(|e| e.to_string())?;
    }
    // The suite drives `netpol` and `netpol-lab` of the bench profile; cargo builds
    // only the benchmarked package's own targets, so build both first.
    step("building netpol and netpol-lab (release)");
    run(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "netpol-agent",
        "-p",
        "netpol-tests",
        "--bins",
    ]))?;
    step("benchmark suite (progress below; results in target/bench)");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .args(["bench", "-p", "netpol-tests", "--bench", "suite", "--"])
        .args(what)
        .arg("--out")
        .arg(&out)
        .args(["--testbed", testbed]);
    if quick {
        cmd.arg("--quick");
    }
    // Every scenario on the lab: the project's benchmark page is this run's.
    if what.is_empty() && testbed == "lab" {
        cmd.arg("--page").arg(root().join("docs/benchmarks.md"));
    }
    if wants_control {
        cmd.arg("--compile-json").arg(&compile_json);
    }
    run(&mut cmd)
}

fn demo() -> Result {
    run(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "netpol-agent",
        "-p",
        "netpol-tests",
        "--bins",
    ]))?;
    run(Command::new("bash")
        .current_dir(root())
        .arg("examples/demo.sh")
        .env("NETPOL", root().join("target/release/netpol")))
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

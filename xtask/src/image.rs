//! `cargo xtask image`: the OCI image that deploy/ names, built without a container
//! engine: buildah assembles it from scratch around the `netpol` binary and the few
//! shared libraries it loads (the dynamic loader, libc, libm, libgcc_s) and the CA
//! bundle, nothing else: no shell, no lab, no test gear.
//!
//! Beside it, `localhost/netpol-load:<tag>` (target/image/netpol-load-<tag>.oci.tar,
//! named `ghcr.io/netpol/netpol-load:<tag>`): `netpol-lab` and iperf3, the load pods of
//! `cargo xtask kind --bench`.
//!
//! The image lands in the local containers-storage as `localhost/netpol:<tag>` (podman
//! runs it from there) and as an OCI archive, `target/image/netpol-<tag>.oci.tar`, for
//! `kind load image-archive` or a registry push.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{root, run, step, Result};

/// The image's name in local storage (podman runs it from there).
pub const NAME: &str = "localhost/netpol";

/// The name deploy/kustomization.yaml gives the image: the archive carries it, so that
/// `kind load image-archive` (or a push) puts it where the DaemonSet looks.
pub const PUBLISHED: &str = "ghcr.io/netpol/netpol";

/// buildah and podman on these machines: vfs storage works in nested sandboxes where
/// overlay does not (TOOLCHAIN.md).
pub fn storage_env(cmd: &mut Command) -> &mut Command {
    cmd.env("STORAGE_DRIVER", "vfs")
}

/// The load generator's image (`cargo xtask kind --bench` runs its pods): `netpol-lab`
/// and iperf3 with their libraries, no shell; kept apart so the agent's image has no lab.
pub const LOAD_NAME: &str = "localhost/netpol-load";
pub const LOAD_PUBLISHED: &str = "ghcr.io/netpol/netpol-load";

/// One image: where its files come from and how it starts.
struct Spec {
    name: &'static str,
    published: &'static str,
    /// The archive's file name before `-<tag>.oci.tar`.
    stem: &'static str,
    /// (binary on this machine, path in the image), each stripped, its libraries beside.
    binaries: Vec<(PathBuf, &'static str)>,
    ca_bundle: bool,
    entrypoint: &'static str,
    cmd: &'static str,
    env: &'static [&'static str],
    description: &'static str,
}

/// cargo's target directory: CARGO_TARGET_DIR when set, as cargo itself reads it.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { root().join(d) })
        .unwrap_or_else(|| root().join("target"))
}

/// `release` builds `bin` of `package` first; the dev profile reuses what `cargo build`
/// made (the tests' image).
fn binary(release: bool, package: &str, bin: &str) -> Result<PathBuf> {
    if release {
        step(&format!("building {bin} (release)"));
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root())
            .args(["build", "--release", "-p", package, "--bin", bin]);
        run(&mut cmd)?;
    }
    let profile = if release { "release" } else { "debug" };
    let path = target_dir().join(profile).join(bin);
    if !path.is_file() {
        return Err(format!(
            "{} is missing: cargo build -p {package} first",
            path.display()
        ));
    }
    Ok(path)
}

/// Builds `localhost/netpol:TAG` from the `netpol` binary.
pub fn build(release: bool, tag: &str) -> Result<PathBuf> {
    assemble(
        &Spec {
            name: NAME,
            published: PUBLISHED,
            stem: "netpol",
            binaries: vec![(
                binary(release, "netpol-agent", "netpol")?,
                "usr/local/bin/netpol",
            )],
            ca_bundle: true,
            entrypoint: r#"["/usr/local/bin/netpol"]"#,
            cmd: "agent",
            env: &[],
            description: "Kubernetes NetworkPolicy enforced with eBPF: the node agent and the operators' tools",
        },
        tag,
    )
}

/// Builds `localhost/netpol-load:TAG`: `/netpol-lab` (entrypoint; `serve` by default)
/// and `/usr/bin/iperf3` (the stream/udp server and client), from this machine's iperf3.
pub fn build_load(release: bool, tag: &str) -> Result<PathBuf> {
    let iperf3 = PathBuf::from("/usr/bin/iperf3");
    if !iperf3.is_file() {
        return Err("/usr/bin/iperf3 is missing: cargo xtask setup installs it".into());
    }
    assemble(
        &Spec {
            name: LOAD_NAME,
            published: LOAD_PUBLISHED,
            stem: "netpol-load",
            binaries: vec![
                (binary(release, "netpol-tests", "netpol-lab")?, "netpol-lab"),
                (iperf3, "usr/bin/iperf3"),
            ],
            ca_bundle: false,
            entrypoint: r#"["/netpol-lab"]"#,
            cmd: "serve --tcp 80",
            env: &["PATH=/usr/bin"],
            description:
                "netpol's load generator for cluster benchmarks: netpol-lab load/serve and iperf3",
        },
        tag,
    )
}

fn assemble(spec: &Spec, tag: &str) -> Result<PathBuf> {
    let out = target_dir().join("image");
    let rootfs = out.join(format!("rootfs-{}-{tag}", spec.stem));
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::create_dir_all(rootfs.join("run/netpol")).map_err(|e| e.to_string())?;
    // iperf3 keeps its buffers in a /tmp file; the agent writes there too.
    std::fs::create_dir_all(rootfs.join("tmp")).map_err(|e| e.to_string())?;
    step(&format!(
        "assembling the root filesystem of {} (stripped)",
        spec.name
    ));
    let mut libs = Vec::new();
    for (binary, inside) in &spec.binaries {
        let dest = rootfs.join(inside);
        std::fs::create_dir_all(dest.parent().expect("a binary lives in a directory"))
            .map_err(|e| e.to_string())?;
        run(Command::new("strip").arg("-o").arg(&dest).arg(binary))?;
        libs.extend(shared_libraries(binary)?);
    }
    libs.sort();
    libs.dedup();
    for lib in libs {
        let dest = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
        std::fs::create_dir_all(dest.parent().expect("a library lives in a directory"))
            .map_err(|e| e.to_string())?;
        // The file itself, not a symlink into the build machine.
        std::fs::copy(&lib, &dest).map_err(|e| format!("copying {}: {e}", lib.display()))?;
    }
    if spec.ca_bundle {
        // The kube client's TLS loads the system's roots even beside the in-cluster CA:
        // the image carries the build machine's bundle (Debian's ca-certificates).
        let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
        std::fs::create_dir_all(rootfs.join("etc/ssl/certs")).map_err(|e| e.to_string())?;
        std::fs::copy(bundle, rootfs.join("etc/ssl/certs/ca-certificates.crt")).map_err(|e| {
            format!(
                "copying {}: {e} (apt-get install ca-certificates)",
                bundle.display()
            )
        })?;
    }
    let (name, published) = (spec.name, spec.published);
    step(&format!("building {name}:{tag} with buildah"));
    let container = output(storage_env(
        Command::new("buildah").args(["from", "--quiet", "scratch"]),
    ))?;
    let container = container.trim().to_string();
    let archive = out.join(format!("{}-{tag}.oci.tar", spec.stem));
    let result = (|| {
        run(storage_env(
            Command::new("buildah")
                .args(["copy", "--quiet", &container])
                .arg(format!("{}/", rootfs.display()))
                .arg("/"),
        ))?;
        let mut config = Command::new("buildah");
        config.args(["config", "--entrypoint", spec.entrypoint, "--cmd", spec.cmd]);
        for e in spec.env {
            config.args(["--env", e]);
        }
        config
            .args([
                "--label",
                &format!("org.opencontainers.image.title={}", spec.stem),
            ])
            .args([
                "--label",
                &format!("org.opencontainers.image.description={}", spec.description),
            ])
            .arg(&container);
        run(storage_env(&mut config))?;
        let _ = std::fs::remove_file(&archive);
        run(storage_env(Command::new("buildah").args([
            "commit",
            "--quiet",
            "--rm",
            &container,
            &format!("{name}:{tag}"),
        ])))
    })();
    if result.is_err() {
        let _ = storage_env(Command::new("buildah").args(["rm", &container])).output();
    }
    result?;
    run(storage_env(
        Command::new("buildah")
            .args(["push", "--quiet", &format!("{name}:{tag}")])
            .arg(format!(
                "oci-archive:{}:{published}:{tag}",
                archive.display()
            )),
    ))?;
    let size = dir_size(&rootfs);
    eprintln!(
        "==> {name}:{tag}: {:.1} MiB unpacked, {}",
        size as f64 / (1 << 20) as f64,
        archive.display()
    );
    Ok(archive)
}

/// What the dynamic loader maps for `binary` (ldd's resolved paths, the loader itself
/// included): a dynamically linked binary's whole runtime.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(binary))?;
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, right)) => right.trim().split(' ').next().unwrap_or(""),
            None => line.trim().split(' ').next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            return Err(format!("{}: {line}", binary.display()));
        }
    }
    // The loader at the path the binary names, and where its symlink points.
    let mut all = libs.clone();
    for lib in &libs {
        if let Ok(real) = std::fs::canonicalize(lib) {
            if &real != lib {
                all.push(real);
            }
        }
    }
    all.sort();
    all.dedup();
    Ok(all)
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| format!("{shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => dirs.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

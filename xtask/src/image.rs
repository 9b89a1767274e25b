//! `cargo xtask image`: the OCI image that deploy/ names, built without a container
//! engine: buildah assembles it from scratch around the `netpol` binary and the few
//! shared libraries it loads (the dynamic loader, libc, libm, libgcc_s) and the CA
//! bundle, nothing else: no shell, no lab, no test gear.
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

/// Builds `localhost/netpol:TAG` from `target/<profile>/netpol`. `release` builds it
/// first; the dev profile reuses what `cargo build` made (the tests' image).
pub fn build(release: bool, tag: &str) -> Result<PathBuf> {
    let profile = if release { "release" } else { "debug" };
    if release {
        step("building netpol (release)");
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root()).args([
            "build",
            "--release",
            "-p",
            "netpol-agent",
            "--bin",
            "netpol",
        ]);
        run(&mut cmd)?;
    }
    let binary = root().join("target").join(profile).join("netpol");
    if !binary.is_file() {
        return Err(format!(
            "{} is missing: cargo build -p netpol-agent first",
            binary.display()
        ));
    }
    let out = root().join("target/image");
    let rootfs = out.join(format!("rootfs-{tag}"));
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::create_dir_all(rootfs.join("usr/local/bin")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(rootfs.join("run/netpol")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(rootfs.join("tmp")).map_err(|e| e.to_string())?;
    step(&format!(
        "assembling the root filesystem ({profile} netpol, stripped)"
    ));
    let inside = rootfs.join("usr/local/bin/netpol");
    run(Command::new("strip").arg("-o").arg(&inside).arg(&binary))?;
    for lib in shared_libraries(&binary)? {
        let dest = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
        std::fs::create_dir_all(dest.parent().expect("a library lives in a directory"))
            .map_err(|e| e.to_string())?;
        // The file itself, not a symlink into the build machine.
        std::fs::copy(&lib, &dest).map_err(|e| format!("copying {}: {e}", lib.display()))?;
    }
    // The kube client's TLS loads the system's roots even beside the in-cluster CA: the
    // image carries the build machine's bundle (Debian's ca-certificates).
    let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    std::fs::create_dir_all(rootfs.join("etc/ssl/certs")).map_err(|e| e.to_string())?;
    std::fs::copy(bundle, rootfs.join("etc/ssl/certs/ca-certificates.crt")).map_err(|e| {
        format!(
            "copying {}: {e} (apt-get install ca-certificates)",
            bundle.display()
        )
    })?;
    step(&format!("building {NAME}:{tag} with buildah"));
    let container = output(storage_env(
        Command::new("buildah").args(["from", "--quiet", "scratch"]),
    ))?;
    let container = container.trim().to_string();
    let result = (|| {
        run(storage_env(
            Command::new("buildah")
                .args(["copy", "--quiet", &container])
                .arg(format!("{}/", rootfs.display()))
                .arg("/"),
        ))?;
        run(storage_env(Command::new("buildah").args([
            "config",
            "--entrypoint",
            r#"["/usr/local/bin/netpol"]"#,
            "--cmd",
            "agent",
            "--label",
            "org.opencontainers.image.title=netpol",
            "--label",
            "org.opencontainers.image.description=Kubernetes NetworkPolicy enforced with eBPF: the node agent and the operators' tools",
            &container,
        ])))?;
        let _ = std::fs::remove_file(out.join(format!("netpol-{tag}.oci.tar")));
        run(storage_env(Command::new("buildah").args([
            "commit",
            "--quiet",
            "--rm",
            &container,
            &format!("{NAME}:{tag}"),
        ])))
    })();
    if result.is_err() {
        let _ = storage_env(Command::new("buildah").args(["rm", &container])).output();
    }
    result?;
    let archive = out.join(format!("netpol-{tag}.oci.tar"));
    run(storage_env(
        Command::new("buildah")
            .args(["push", "--quiet", &format!("{NAME}:{tag}")])
            .arg(format!(
                "oci-archive:{}:{PUBLISHED}:{tag}",
                archive.display()
            )),
    ))?;
    let size = dir_size(&rootfs);
    eprintln!(
        "==> {NAME}:{tag}: {:.1} MiB unpacked (netpol {:.1} MiB), {}",
        size as f64 / (1 << 20) as f64,
        std::fs::metadata(&inside).map(|m| m.len()).unwrap_or(0) as f64 / (1 << 20) as f64,
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

//! Builds the classifier (netpol-ebpf) for the BPF target with the nightly toolchain
//! and bpf-linker, so the agent can embed it (`include_bytes_aligned!`).
//!
//! It also fails the build when a module names one that is not to its left in the data
//! flow (`netpol-engine/layers.rs`).
#[path = "../netpol-engine/layers.rs"]
mod layers;

fn main() -> anyhow::Result<()> {
    let flow: &[&[&str]] = &[
        &["source"],
        &["datapath"],
        &["events"],
        &["explain_live"],
        &["api"],
        &["metrics"],
        &["agent"],
        &["cli"],
    ];
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    layers::check(&src, flow).map_err(|f| anyhow::anyhow!("the data flow runs one way:\n{f}"))?;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    println!("cargo:rerun-if-changed={root}/netpol-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "netpol-ebpf",
            root_dir: &format!("{root}/netpol-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )?;
    // With AYA_BUILD_SKIP=1 (quick checks of userspace code) nothing was built: embed an
    // empty object so the crate compiles; loading it then fails with a clear error.
    let object = std::path::Path::new(&std::env::var("OUT_DIR")?).join("netpol-ebpf");
    if !object.exists() {
        std::fs::write(&object, [])?;
    }
    Ok(())
}

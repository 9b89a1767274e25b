//! The suites run `netpol` (netpol-agent's binary) beside their own `netpol-lab`: both
//! land in the profile directory this build writes into (`target/debug`, say). Cargo
//! builds netpol with the workspace (`cargo xtask test` builds everything first).
fn main() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // OUT_DIR is <profile>/build/netpol-tests-<hash>/out.
    let profile = out
        .ancestors()
        .nth(3)
        .expect("OUT_DIR under the profile directory");
    println!(
        "cargo:rustc-env=NETPOL_BIN={}",
        profile.join("netpol").display()
    );
}

//! What the integration suites share, one copy each (every suite says `mod support;`
//! and uses the parts it needs):
//! - `lab`: the lab guard (torn down on drop, even when an assertion fails), the
//!   `netpol` commands run on it, observers, and helpers for traffic between pods;
//! - `manifests`: the pods and policies most lab suites start from;
//! - `traffic`: ping, connections and echoes between a lab's pods;
//! - `packet`: the packet builder (headers, IPv4/IPv6 packets, Ethernet frames);
//! - `raw`: frames sent from a pod's raw socket, and its interface's MAC;
//! - `rig`: the classifier loaded alone, under `BPF_PROG_TEST_RUN`;
//! - `model`: the compiled model next to the reference evaluator.
#![allow(dead_code)] // each suite uses a different part

pub mod lab;
pub mod manifests;
pub mod model;
pub mod packet;
pub mod raw;
pub mod rig;
pub mod traffic;

/// The suites' one root check: whether this process runs as root.
pub fn root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Fails at once, with what to do, when not root (tests that need it are
/// `#[ignore = "needs root: ..."]`: run them as root with `--include-ignored`).
pub fn need_root(what: &str) {
    assert!(
        root(),
        "needs root: {what} (run as root with `cargo test -- --include-ignored`)"
    );
}

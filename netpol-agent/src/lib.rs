//! netpol: Kubernetes NetworkPolicy enforced with eBPF. This crate is the `netpol`
//! binary of the image: the node agent and the operators' tools.
//!
//! ```text
//! source ──► (netpol-engine: objects ─► index ─► compile) ──► datapath ──► kernel
//!                                                                 │ ring buffer
//!                                                                 ▼
//!                        events ──► explain_live ──► api ──► metrics ──► agent ──► cli
//! ```
//! Each module knows only the boxes to its left; `build.rs` fails the build otherwise.
//! The policy engine (`netpol-engine`) is pure; the lab lives with the tests.

pub mod agent;
pub mod api;
pub mod cli;
pub mod datapath;
pub mod events;
pub mod explain_live;
pub mod metrics;
pub mod source;

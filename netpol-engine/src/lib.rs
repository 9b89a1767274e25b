//! The policy engine: Kubernetes objects in, the desired contents of every eBPF map out,
//! and the tools that reason over those maps. Pure: no kernel, no API client, no async.
//!
//! ```text
//! objects ──► index ──► compile ──► simulate ──► explain, lint, graph
//! ```
//! Each module knows only the boxes to its left; `build.rs` fails the build otherwise.
//! The agent (`netpol-agent`) feeds `objects` from its sources and writes `compile`'s
//! output into the kernel.

#![forbid(unsafe_code)]

pub mod compile;
pub mod explain;
pub mod graph;
pub mod hints;
pub mod index;
pub mod lint;
pub mod objects;
pub mod simulate;

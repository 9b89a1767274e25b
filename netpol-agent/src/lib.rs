//! netpol: Kubernetes NetworkPolicy enforced with eBPF.
//!
//! ```text
//! source ──► index ──► compile ──► datapath ──► kernel (TC programs + maps)
//!                                                  │ ring buffer
//!                                                  ▼
//!                                    events ──► api (status, wait, observe, counters, explain)
//! ```
//! Each module knows only the boxes to its left. `lab` and `cli` sit outside the flow:
//! the lab builds a Flannel-like node of network namespaces and runs the agent on it.

pub mod agent;
pub mod api;
pub mod cli;
pub mod compile;
pub mod datapath;
pub mod events;
pub mod explain;
pub mod graph;
pub mod hints;
pub mod index;
pub mod lab;
pub mod lint;
pub mod metrics;
pub mod simulate;
pub mod source;
pub mod synthetic;

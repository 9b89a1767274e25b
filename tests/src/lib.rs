//! What tests and benchmarks need besides netpol itself: the lab (a Flannel-like node of
//! network namespaces, its kube-proxy, DNS server, load generator and the iptables and
//! nftables enforcers to compare with), the reference evaluator written from the API
//! documentation, the synthetic-cluster generator, and the benchmarks' statistics and
//! counting allocator.
//!
//! None of it is in the image: the `netpol` binary links only `netpol-agent`.

pub mod alloc;
pub mod kubectl;
pub mod lab;
pub mod reference;
pub mod stats;
pub mod synthetic;

//! What tests and benchmarks need besides netpol itself: the lab (a Flannel-like node of
//! network namespaces, its kube-proxy, DNS server, load generator and an iptables
//! enforcer to compare with), the reference evaluator written from the API
//! documentation, and the synthetic-cluster generator of the benchmarks.
//!
//! None of it is in the image: the `netpol` binary links only `netpol-agent`.

pub mod kubectl;
pub mod lab;
pub mod reference;
pub mod synthetic;

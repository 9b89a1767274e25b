//! The pod network of a node (its CIDR) and the addresses the lab hands its pods.

use anyhow::bail;
use anyhow::Context;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::*;

/// The pod CIDR of the node: `.1` is the bridge (gateway), pods get `.2` up to the last
/// address before broadcast.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PodCidr {
    pub(super) network: u32,
    pub(super) prefix: u8,
}

impl PodCidr {
    pub fn parse(text: &str) -> anyhow::Result<PodCidr> {
        let bad =
            || format!("invalid pod CIDR {text:?} (expected an IPv4 CIDR such as 10.244.0.0/24)");
        let (addr, prefix) = text.split_once('/').with_context(bad)?;
        let addr: Ipv4Addr = addr.parse().with_context(bad)?;
        let prefix: u8 = prefix.parse().with_context(bad)?;
        if !(8..=30).contains(&prefix) {
            bail!("{}: the prefix must be between /8 and /30", bad());
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(PodCidr {
            network: u32::from(addr) & mask,
            prefix,
        })
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network)
    }

    /// The `n`th CIDR of this size from here: node `n`'s pod CIDR.
    pub fn nth(&self, n: u32) -> anyhow::Result<PodCidr> {
        let size = 1u64 << (32 - self.prefix);
        let network = self.network as u64 + size * n as u64;
        if network + size > 1 << 32 {
            bail!(
                "{n} pod CIDRs of /{} do not fit after {}",
                self.prefix,
                self.network()
            );
        }
        Ok(PodCidr {
            network: network as u32,
            prefix: self.prefix,
        })
    }

    /// The cluster CIDR kube-proxy is told: 8 bits shorter than a node's (`/16` for the
    /// default `/24`), as Flannel's network around its per-node subnets.
    pub fn cluster(&self) -> String {
        let prefix = self.prefix.saturating_sub(8).max(8);
        let mask = u32::MAX << (32 - prefix);
        format!("{}/{prefix}", Ipv4Addr::from(self.network & mask))
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1)
    }

    fn broadcast(&self) -> u32 {
        self.network | (u32::MAX >> self.prefix)
    }

    /// Addresses pods may have.
    fn is_pod_address(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        ip >= self.network + 2 && ip < self.broadcast()
    }
}

/// Pod addresses. A pod keeps its address for as long as it stays in the lab, whatever
/// else changes, so that the agent's view and the pod's netns never disagree.
#[derive(Debug)]
pub(crate) struct IpPool {
    cidr: PodCidr,
    by_pod: BTreeMap<PodKey, Ipv4Addr>,
    /// Addresses of pods that left: a pod that comes back (a manifest caught mid-write)
    /// gets its address back when it is still free.
    previous: BTreeMap<PodKey, Ipv4Addr>,
}

impl IpPool {
    pub fn new(cidr: PodCidr) -> IpPool {
        IpPool {
            cidr,
            by_pod: BTreeMap::new(),
            previous: BTreeMap::new(),
        }
    }

    /// The address of `pod`: the one it has, else `wanted` (its `status.podIP`) when
    /// free and in the CIDR, else the lowest free one.
    pub fn assign(&mut self, pod: &PodKey, wanted: Option<Ipv4Addr>) -> anyhow::Result<Ipv4Addr> {
        if let Some(ip) = self.by_pod.get(pod) {
            return Ok(*ip);
        }
        let used: BTreeSet<Ipv4Addr> = self.by_pod.values().copied().collect();
        let usable = |ip: &Ipv4Addr| self.cidr.is_pod_address(*ip) && !used.contains(ip);
        let ip = match wanted
            .filter(usable)
            .or_else(|| self.previous.get(pod).copied().filter(usable))
        {
            Some(ip) => ip,
            None => (self.cidr.network + 2..self.cidr.broadcast())
                .map(Ipv4Addr::from)
                .find(|ip| !used.contains(ip))
                .with_context(|| {
                    format!(
                        "pod {}/{}: no free address left in the pod CIDR",
                        pod.0, pod.1
                    )
                })?,
        };
        if let Some(w) = wanted.filter(|w| *w != ip) {
            tracing::warn!(
                pod = %format_args!("{}/{}", pod.0, pod.1),
                wanted = %w,
                %ip,
                "status.podIP is taken or outside the pod CIDR; using another address"
            );
        }
        self.by_pod.insert(pod.clone(), ip);
        Ok(ip)
    }

    pub fn release(&mut self, pod: &PodKey) {
        if let Some(ip) = self.by_pod.remove(pod) {
            self.previous.insert(pod.clone(), ip);
        }
    }
}

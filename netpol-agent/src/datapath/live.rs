//! Read-only views of a node's pinned maps, for `explain` against the live agent. A
//! lookup in an LPM trie from userspace is the kernel's own longest-prefix match, the one
//! the classifier gets, so these answer with what the datapath holds, not what the agent
//! meant to write.
//!
//! source ──► index ──► compile ──► **datapath** ──► events

use std::net::IpAddr;

use anyhow::Context;
use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData};
use netpol_common::{
    map, Addr, CidrEntry, Config, CtEntry, CtKey, EndpointEntry, IpcacheEntry, PolicyEntry,
    PolicyKey,
};

use super::pin::PinDir;
use netpol_engine::compile::lookup::Tries;
use netpol_engine::index::net::addr_of;

/// The maps a judgement reads, opened from their pins.
pub struct LiveMaps {
    endpoints: HashMap<MapData, u32, EndpointEntry>,
    ipcache: LpmTrie<MapData, Addr, IpcacheEntry>,
    cidrs: LpmTrie<MapData, Addr, CidrEntry>,
    policy: LpmTrie<MapData, PolicyKey, PolicyEntry>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    /// `NP_CONFIG` as read at open.
    pub config: Config,
}

fn open(pins: &PinDir, name: &str) -> anyhow::Result<Map> {
    let path = pins.map_path(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening the pinned map {} (is the agent running with this --pin-root?)",
            path.display()
        )
    })?;
    Ok(Map::from_map_data(data)?)
}

impl LiveMaps {
    pub fn open(pins: &PinDir) -> anyhow::Result<LiveMaps> {
        let config: Array<MapData, Config> = Array::try_from(open(pins, map::CONFIG)?)?;
        Ok(LiveMaps {
            endpoints: HashMap::try_from(open(pins, map::ENDPOINTS)?)?,
            ipcache: LpmTrie::try_from(open(pins, map::IPCACHE)?)?,
            cidrs: LpmTrie::try_from(open(pins, map::CIDRS)?)?,
            policy: LpmTrie::try_from(open(pins, map::POLICY)?)?,
            conntrack: HashMap::try_from(open(pins, map::CONNTRACK)?)?,
            config: config.get(&0, 0).context("reading the node config")?,
        })
    }

    /// The endpoint whose pod owns `ip`, with its host veth's ifindex (the classifier's
    /// `NP_ENDPOINTS` key). None: no pod of this node has that address.
    pub fn endpoint_of(&self, ip: IpAddr) -> Option<(u32, EndpointEntry)> {
        let addr = addr_of(ip);
        self.endpoints
            .iter()
            .flatten()
            .find(|(_, ep)| ep.ipv4 == addr || ep.ipv6 == addr)
    }

    /// Conntrack entries between `a` and `b` for `protocol` with `port` on `b`'s side,
    /// keyed either way round (the key is the originator's tuple).
    pub fn connections(
        &self,
        a: IpAddr,
        b: IpAddr,
        protocol: u8,
        port: u16,
    ) -> Vec<(CtKey, CtEntry)> {
        let (a, b) = (addr_of(a), addr_of(b));
        self.conntrack
            .iter()
            .flatten()
            .filter(|(k, _)| {
                k.protocol == protocol
                    && ((k.saddr == a && k.daddr == b && k.dport == port)
                        || (k.saddr == b && k.daddr == a && k.sport == port))
            })
            .collect()
    }
}

impl Tries for LiveMaps {
    fn ipcache(&self, addr: &Addr) -> Option<IpcacheEntry> {
        self.ipcache.get(&Key::new(128, *addr), 0).ok()
    }

    fn cidr(&self, addr: &Addr) -> Option<CidrEntry> {
        self.cidrs.get(&Key::new(128, *addr), 0).ok()
    }

    fn policy(&self, key: PolicyKey) -> Option<PolicyEntry> {
        self.policy
            .get(&Key::new(PolicyKey::FULL_BITS, key), 0)
            .ok()
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns` (conntrack's
/// `last_seen_ns`, event timestamps).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

//! Typed writes to the classifier's maps. Each map has one writer: this module.
//! A full map is an error that names the map and its capacity flag, never a silent skip.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use aya::Ebpf;
use netpol_common::codes::{Direction, Reason, Verdict};
use netpol_common::{
    event_counter, map, Addr, Config, CtEntry, CtKey, EndpointEntry, PolicyKey, COUNTERS_LEN,
};

use netpol_engine::compile::PolicyPrefix;
use netpol_engine::index::net::Cidr;

pub fn cidr_key(c: &Cidr) -> Key<Addr> {
    let (addr, prefix) = c.map_key();
    Key::new(u32::from(prefix), addr)
}

pub fn policy_key(p: &PolicyPrefix) -> Key<PolicyKey> {
    Key::new(p.prefix_len, p.key)
}

pub fn cidr_of(k: &Key<Addr>) -> Cidr {
    // The kernel holds no prefix over 128 for a 16-byte key.
    Cidr::from_map_key(k.data(), k.prefix_len().min(128) as u8)
}

pub fn policy_prefix_of(k: &Key<PolicyKey>) -> PolicyPrefix {
    PolicyPrefix {
        key: k.data(),
        prefix_len: k.prefix_len(),
    }
}

/// Reads a whole trie back (adoption of pinned state).
pub fn read_trie<K: Ord, D: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    key: fn(&Key<D>) -> K,
) -> anyhow::Result<BTreeMap<K, V>> {
    let t: LpmTrie<_, D, V> = trie(ebpf, name)?;
    let mut out = BTreeMap::new();
    for item in t.iter() {
        let (k, v) = item.with_context(|| format!("reading {name}"))?;
        out.insert(key(&k), v);
    }
    Ok(out)
}

/// Reads the endpoint entries back, by ifindex (adoption of pinned state).
pub fn read_endpoints(ebpf: &mut Ebpf) -> anyhow::Result<BTreeMap<u32, EndpointEntry>> {
    let m = endpoints(ebpf)?;
    let mut out = BTreeMap::new();
    for item in m.iter() {
        let (k, v) = item.context("reading endpoints")?;
        out.insert(k, v);
    }
    Ok(out)
}

pub fn read_config(ebpf: &mut Ebpf) -> anyhow::Result<Config> {
    let a: Array<_, Config> = Array::try_from(
        ebpf.map_mut(map::CONFIG)
            .ok_or_else(|| anyhow!("map {} missing", map::CONFIG))?,
    )?;
    a.get(&0, 0).context("reading the node config")
}

pub fn conntrack(ebpf: &mut Ebpf) -> anyhow::Result<HashMap<&mut MapData, CtKey, CtEntry>> {
    Ok(HashMap::try_from(
        ebpf.map_mut(map::CONNTRACK)
            .ok_or_else(|| anyhow!("map {} missing", map::CONNTRACK))?,
    )?)
}

/// The capacity (max entries) of a map, for metrics.
pub fn capacity_of(ebpf: &Ebpf, name: &str) -> Option<u32> {
    use aya::maps::Map;
    let data = match ebpf.map(name)? {
        Map::HashMap(d) | Map::LruHashMap(d) | Map::LpmTrie(d) => d,
        _ => return None,
    };
    data.info().ok().map(|i| i.max_entries())
}

fn trie<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> anyhow::Result<LpmTrie<&'a mut MapData, K, V>> {
    let m = ebpf
        .map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the classifier"))?;
    Ok(LpmTrie::try_from(m)?)
}

fn full(name: &str, e: MapError) -> anyhow::Error {
    anyhow!("writing map {name}: {e} (if the map is full, raise its capacity flag)")
}

/// Inserts the entries of `desired` that are new or changed in trie `name`.
pub fn upsert_diff<K: Ord, D: aya::Pod, V: PartialEq + aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    actual: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    key: fn(&K) -> Key<D>,
) -> anyhow::Result<usize> {
    let mut t: LpmTrie<_, D, V> = trie(ebpf, name)?;
    let mut n = 0;
    for (k, v) in desired {
        if actual.get(k) != Some(v) {
            t.insert(&key(k), v, 0).map_err(|e| full(name, e))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Removes the entries of `actual` that `desired` no longer holds from trie `name`.
pub fn remove_diff<K: Ord, D: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    actual: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    key: fn(&K) -> Key<D>,
) -> anyhow::Result<usize> {
    let mut t: LpmTrie<_, D, V> = trie(ebpf, name)?;
    let mut n = 0;
    for k in actual.keys().filter(|k| !desired.contains_key(k)) {
        t.remove(&key(k))
            .with_context(|| format!("removing from {name}"))?;
        n += 1;
    }
    Ok(n)
}

fn endpoints(ebpf: &mut Ebpf) -> anyhow::Result<HashMap<&mut MapData, u32, EndpointEntry>> {
    Ok(HashMap::try_from(
        ebpf.map_mut(map::ENDPOINTS)
            .ok_or_else(|| anyhow!("map {} missing", map::ENDPOINTS))?,
    )?)
}

pub fn write_endpoint(ebpf: &mut Ebpf, ifindex: u32, ep: EndpointEntry) -> anyhow::Result<()> {
    endpoints(ebpf)?
        .insert(ifindex, ep, 0)
        .map_err(|e| full(map::ENDPOINTS, e))
}

pub fn remove_endpoint(ebpf: &mut Ebpf, ifindex: u32) -> anyhow::Result<()> {
    match endpoints(ebpf)?.remove(&ifindex) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e).context("removing an endpoint"),
    }
}

pub fn write_config(ebpf: &mut Ebpf, config: Config) -> anyhow::Result<()> {
    let mut a: Array<_, Config> = Array::try_from(
        ebpf.map_mut(map::CONFIG)
            .ok_or_else(|| anyhow!("map {} missing", map::CONFIG))?,
    )?;
    a.set(0, config, 0).context("writing the node config")
}

/// One exact counter: packets with this verdict, reason and direction, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counter {
    pub verdict: Verdict,
    pub reason: Reason,
    pub direction: Direction,
    pub packets: u64,
}

/// The counters map, taken out of the object so that the API can read it on its own.
pub type CounterMap = PerCpuArray<MapData, u64>;

pub fn read_counters<T: std::borrow::Borrow<MapData>>(
    a: &PerCpuArray<T, u64>,
) -> anyhow::Result<Vec<Counter>> {
    let mut out = Vec::new();
    // The slots of the codes this build knows: the classifier of the same build writes
    // no others.
    for &verdict in Verdict::ALL {
        for &reason in Reason::ALL {
            for &direction in Direction::ALL {
                let idx =
                    netpol_common::counter_index(verdict.code(), reason.code(), direction.code());
                debug_assert!(idx < COUNTERS_LEN);
                let packets: u64 = a.get(&idx, 0)?.iter().sum();
                if packets > 0 {
                    out.push(Counter {
                        verdict,
                        reason,
                        direction,
                        packets,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// What happened to events, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EventCounters {
    /// Written to the ring buffer.
    pub sent: u64,
    /// Not written: the endpoint's token bucket was empty.
    pub rate_limited: u64,
    /// Not written: the ring buffer was full.
    pub ring_full: u64,
    /// New connections left untracked: their endpoint held its whole conntrack share.
    #[serde(default)]
    pub conntrack_share_full: u64,
    /// First fragments not remembered: their endpoint had its whole share of datagrams.
    #[serde(default)]
    pub fragments_share_full: u64,
}

pub fn read_event_counters<T: std::borrow::Borrow<MapData>>(
    a: &PerCpuArray<T, u64>,
) -> anyhow::Result<EventCounters> {
    let sum = |idx: u32| -> anyhow::Result<u64> { Ok(a.get(&idx, 0)?.iter().sum()) };
    Ok(EventCounters {
        sent: sum(event_counter::SENT)?,
        rate_limited: sum(event_counter::RATE_LIMITED)?,
        ring_full: sum(event_counter::RING_FULL)?,
        conntrack_share_full: sum(event_counter::CT_SHARE_FULL)?,
        fragments_share_full: sum(event_counter::FRAG_SHARE_FULL)?,
    })
}

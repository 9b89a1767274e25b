//! The conntrack sweep: what the classifier cannot do for itself. It counts each new
//! entry into its owner's share (`NP_CT_HELD`), but never sees most entries go: they
//! expire without another packet, or the LRU evicts them silently. Every [`EVERY`] the
//! agent walks the table, deletes the expired entries and sets each endpoint's count to
//! the entries it really holds, so that a share is not eaten by dead flows for longer.
//! The fragments table (`NP_FRAGMENTS`, `NP_FRAG_HELD`) likewise.
//!
//! The classifier counts on while the walk runs; what it added or gave back meanwhile
//! is kept on top of the count (an entry both counted by the walk and added meanwhile
//! counts twice until the next sweep: a share errs towards closed).

use std::borrow::{Borrow, BorrowMut};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context;
use aya::maps::{Array, HashMap, Map, MapData};
use netpol_common::{ct_timeout, ct_timeout_ns, map, Config, CtEntry, CtKey, FragEntry, FragKey};

use super::live::monotonic_ns;
use super::pin::PinDir;

/// How often the agent sweeps.
pub const EVERY: Duration = Duration::from_secs(10);

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub expired: usize,
    pub live: usize,
    /// Pod (host veth ifindex) → entries it holds, as set.
    pub held: BTreeMap<u32, u64>,
}

fn snapshot<H: Borrow<MapData>>(held: &HashMap<H, u32, u64>) -> BTreeMap<u32, u64> {
    held.iter().filter_map(Result::ok).collect()
}

/// One sweep of the conntrack table at `now` (CLOCK_MONOTONIC ns, the classifier's clock).
pub fn sweep<C, H>(
    conntrack: &mut HashMap<C, CtKey, CtEntry>,
    held: &mut HashMap<H, u32, u64>,
    config: &Config,
    now: u64,
) -> anyhow::Result<Swept>
where
    C: BorrowMut<MapData>,
    H: BorrowMut<MapData>,
{
    sweep_table(conntrack, held, |k: &CtKey, e: &CtEntry| {
        let expired =
            now.saturating_sub(e.last_seen_ns) > ct_timeout_ns(config, k.protocol, e.flags);
        (expired, e.owner)
    })
}

/// One sweep of the fragments table at `now`.
pub fn sweep_fragments<F, H>(
    fragments: &mut HashMap<F, FragKey, FragEntry>,
    held: &mut HashMap<H, u32, u64>,
    now: u64,
) -> anyhow::Result<Swept>
where
    F: BorrowMut<MapData>,
    H: BorrowMut<MapData>,
{
    let timeout = ct_timeout::FRAGMENT * 1_000_000_000;
    sweep_table(fragments, held, |_: &FragKey, e: &FragEntry| {
        (now.saturating_sub(e.last_seen_ns) > timeout, e.owner)
    })
}

/// Deletes the entries `judge` says are expired and sets each owner's count in `held`
/// to the live entries it has (`judge`: entry → (expired, owner)).
fn sweep_table<T, H, K, V>(
    table: &mut HashMap<T, K, V>,
    held: &mut HashMap<H, u32, u64>,
    judge: impl Fn(&K, &V) -> (bool, u32),
) -> anyhow::Result<Swept>
where
    T: BorrowMut<MapData>,
    H: BorrowMut<MapData>,
    K: aya::Pod,
    V: aya::Pod,
{
    let before = snapshot(held);
    let mut swept = Swept::default();
    let mut live: BTreeMap<u32, u64> = BTreeMap::new();
    let entries: Vec<(K, V)> = table.iter().filter_map(Result::ok).collect();
    for (key, e) in entries {
        let (expired, owner) = judge(&key, &e);
        if expired {
            // Gone meanwhile (the classifier found it expired first): not ours to count.
            if table.remove(&key).is_ok() {
                swept.expired += 1;
            }
        } else {
            swept.live += 1;
            if owner != 0 {
                *live.entry(owner).or_default() += 1;
            }
        }
    }
    let after = snapshot(held);
    let owners: BTreeSet<u32> = after.keys().chain(live.keys()).copied().collect();
    for owner in owners {
        // What the classifier added while the walk ran.
        let meanwhile = after.get(&owner).copied().unwrap_or(0) as i128
            - before.get(&owner).copied().unwrap_or(0) as i128;
        let n = (live.get(&owner).copied().unwrap_or(0) as i128 + meanwhile).max(0) as u64;
        if n == 0 && !live.contains_key(&owner) {
            // An endpoint that holds nothing (gone, maybe): its slot is freed.
            let _ = held.remove(&owner);
        } else {
            held.insert(owner, n, 0)?;
            swept.held.insert(owner, n);
        }
    }
    Ok(swept)
}

/// The name of the host veth `ifindex` (the pod's port), or the index when it is gone.
fn veth_name(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: a buffer of IF_NAMESIZE bytes, as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return format!("ifindex {ifindex}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `buf`.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Sweeps the pinned maps of `pins` every [`EVERY`], for the process's life, on a
/// thread of its own. A pod that reaches its share is logged once (until it
/// falls below again).
pub fn start(pins: PinDir) -> anyhow::Result<()> {
    let open = |name: &str| -> anyhow::Result<Map> {
        let path = pins.map_path(name);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Map::from_map_data(data)?)
    };
    let mut conntrack: HashMap<MapData, CtKey, CtEntry> = HashMap::try_from(open(map::CONNTRACK)?)?;
    let mut held: HashMap<MapData, u32, u64> = HashMap::try_from(open(map::CT_HELD)?)?;
    let mut fragments: HashMap<MapData, FragKey, FragEntry> =
        HashMap::try_from(open(map::FRAGMENTS)?)?;
    let mut frag_held: HashMap<MapData, u32, u64> = HashMap::try_from(open(map::FRAG_HELD)?)?;
    let config: Array<MapData, Config> = Array::try_from(open(map::CONFIG)?)?;
    std::thread::Builder::new()
        .name("conntrack-sweep".into())
        .spawn(move || {
            let mut full: BTreeSet<u32> = BTreeSet::new();
            loop {
                std::thread::sleep(EVERY);
                let Ok(c) = config.get(&0, 0) else { continue };
                if let Err(e) = sweep_fragments(&mut fragments, &mut frag_held, monotonic_ns()) {
                    tracing::warn!(error = ?e, "fragments sweep failed");
                }
                match sweep(&mut conntrack, &mut held, &c, monotonic_ns()) {
                    Ok(s) => {
                        let at_share: BTreeSet<u32> = s
                            .held
                            .iter()
                            .filter(|(_, n)| c.ct_share != 0 && **n >= c.ct_share as u64)
                            .map(|(id, _)| *id)
                            .collect();
                        for ifindex in at_share.difference(&full) {
                            tracing::warn!(veth = %veth_name(*ifindex), share = c.ct_share, "a pod holds its whole conntrack share: its new connections pass untracked (replies judged by policy)");
                        }
                        full = at_share;
                        tracing::debug!(expired = s.expired, live = s.live, "conntrack swept");
                    }
                    Err(e) => tracing::warn!(error = ?e, "conntrack sweep failed"),
                }
            }
        })?;
    Ok(())
}

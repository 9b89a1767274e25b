//! Per-rule and per-endpoint counters: what each policy rule allowed, what each
//! endpoint dropped or audited. The classifier only counts into entries the agent made
//! (a full map cannot grow behind our back; misses are counted apart), so the sync
//! creates one entry per rule cookie in the node's policy map and one per endpoint.
//!
//! An endpoint's entry outlives it as a per-namespace total, so that the namespace's
//! drop counters never go backwards when a pod goes away.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use anyhow::Context;
use aya::maps::{MapData, PerCpuHashMap, PerCpuValues};
use aya::Ebpf;
use netpol_common::{map, EndpointCounters, RuleCounter};

use netpol_engine::compile::Desired;

/// Sums over CPUs, with the names of the namespaces that endpoints belong to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// Rule cookie → what it allowed.
    pub rules: BTreeMap<u32, RuleCounter>,
    /// Endpoint id → what it dropped and audited.
    pub endpoints: BTreeMap<u32, EndpointCounters>,
    /// Namespace → the totals of its endpoints that are gone.
    pub retired: BTreeMap<String, EndpointCounters>,
}

struct State {
    rules: PerCpuHashMap<MapData, u32, RuleCounter>,
    endpoints: PerCpuHashMap<MapData, u32, EndpointCounters>,
    /// Endpoint id → namespace, for the entries present.
    namespaces: BTreeMap<u32, String>,
    rule_keys: BTreeSet<u32>,
    retired: BTreeMap<String, EndpointCounters>,
    /// Whether a full map was already logged (once per agent).
    full_logged: bool,
}

pub struct Tally {
    state: Mutex<State>,
    cpus: usize,
}

fn add(into: &mut EndpointCounters, c: &EndpointCounters) {
    for i in 0..4 {
        into.packets[i] += c.packets[i];
        into.bytes[i] += c.bytes[i];
    }
}

fn sum_endpoint(v: &PerCpuValues<EndpointCounters>) -> EndpointCounters {
    let mut total = EndpointCounters::default();
    for c in v.iter() {
        add(&mut total, c);
    }
    total
}

impl Tally {
    /// Takes both maps out of the object; entries already there (adopted from a
    /// previous agent) are kept with their counts.
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Tally> {
        let rules: PerCpuHashMap<MapData, u32, RuleCounter> = ebpf
            .take_map(map::RULE_COUNTERS)
            .context("rule counters map missing")?
            .try_into()?;
        let endpoints: PerCpuHashMap<MapData, u32, EndpointCounters> = ebpf
            .take_map(map::ENDPOINT_COUNTERS)
            .context("endpoint counters map missing")?
            .try_into()?;
        let rule_keys = rules.keys().collect::<Result<BTreeSet<u32>, _>>()?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        Ok(Tally {
            state: Mutex::new(State {
                rules,
                endpoints,
                namespaces: BTreeMap::new(),
                rule_keys,
                retired: BTreeMap::new(),
                full_logged: false,
            }),
            cpus,
        })
    }

    /// One entry per rule cookie of `desired.policy` and per endpoint; entries of rules
    /// and endpoints no longer there are removed (an endpoint's counts retired to its
    /// namespace's total). Returns how many could not be created (full maps).
    pub fn sync(&self, desired: &Desired) -> anyhow::Result<usize> {
        let mut s = self.state.lock().unwrap();
        let mut failed = 0;
        let cookies: BTreeSet<u32> = desired
            .policy
            .values()
            .map(|e| e.cookie)
            .filter(|c| *c != 0)
            .collect();
        for c in cookies.difference(&s.rule_keys.clone()) {
            match s.rules.insert(c, self.zeros()?, 0) {
                Ok(()) => {
                    s.rule_keys.insert(*c);
                }
                Err(_) => failed += 1,
            }
        }
        for c in s
            .rule_keys
            .difference(&cookies)
            .copied()
            .collect::<Vec<_>>()
        {
            let _ = s.rules.remove(&c);
            s.rule_keys.remove(&c);
        }

        let wanted: BTreeMap<u32, String> = desired
            .endpoints
            .iter()
            .map(|(pod, ep)| (ep.id, pod.split('/').next().unwrap_or_default().to_string()))
            .collect();
        if s.namespaces.is_empty() {
            // First sync: adopted entries of endpoints still here keep counting.
            let present = s.endpoints.keys().collect::<Result<Vec<u32>, _>>()?;
            for id in present {
                if let Some(ns) = wanted.get(&id) {
                    s.namespaces.insert(id, ns.clone());
                } else {
                    let _ = s.endpoints.remove(&id);
                }
            }
        }
        for (id, ns) in &wanted {
            if s.namespaces.contains_key(id) {
                continue;
            }
            match s.endpoints.insert(id, self.zeros()?, 0) {
                Ok(()) => {
                    s.namespaces.insert(*id, ns.clone());
                }
                Err(_) => failed += 1,
            }
        }
        let gone: Vec<u32> = s
            .namespaces
            .keys()
            .filter(|id| !wanted.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            let ns = s.namespaces.remove(&id).unwrap_or_default();
            if let Ok(v) = s.endpoints.get(&id, 0) {
                let total = sum_endpoint(&v);
                add(s.retired.entry(ns).or_default(), &total);
            }
            let _ = s.endpoints.remove(&id);
        }
        if failed > 0 && !s.full_logged {
            s.full_logged = true;
            tracing::warn!(
                failed,
                "counter maps full: some rules or endpoints are counted only in the totals"
            );
        }
        Ok(failed)
    }

    fn zeros<T: aya::Pod + Default + Clone>(&self) -> anyhow::Result<PerCpuValues<T>> {
        Ok(PerCpuValues::try_from(vec![T::default(); self.cpus])?)
    }

    /// Current sums over CPUs.
    pub fn read(&self) -> anyhow::Result<Reading> {
        let s = self.state.lock().unwrap();
        let mut r = Reading {
            retired: s.retired.clone(),
            ..Default::default()
        };
        for item in s.rules.iter() {
            let (k, v) = item?;
            let mut t = RuleCounter::default();
            for c in v.iter() {
                t.packets += c.packets;
                t.bytes += c.bytes;
            }
            r.rules.insert(k, t);
        }
        for item in s.endpoints.iter() {
            let (k, v) = item?;
            r.endpoints.insert(k, sum_endpoint(&v));
        }
        Ok(r)
    }
}

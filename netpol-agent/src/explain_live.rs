//! Live explain: the sides on the agent's node judged on its pinned maps (`netpol explain --lab|--socket`).
//! The types it answers with are the engine's (`explain::Live`); this reads them off the kernel.

use std::collections::BTreeMap;
use std::net::IpAddr;

use netpol_common::{
    config_flags, ct_flags, ct_stamp, endpoint_flags, identity, policy_action, CtEntry, CtKey,
    EndpointEntry,
};

use netpol_engine::compile::lookup::{Hits, Lookup};
use netpol_engine::compile::{compile, Desired, NodeView, RuleRef};
use netpol_engine::explain::{
    flow, judge, rule_name, Connection, Endpoint, Explanation, Hit, Live, LiveSide, Question,
    SideMaps,
};
use netpol_engine::index::net::{addr_of, ip_of};
use netpol_engine::index::{PodInfo, Snapshot};

use crate::datapath::live::{monotonic_ns, LiveMaps};

/// Live: the sides on `node` judged on its pinned maps (`live`), with the agent's
/// snapshot and compiled rules naming what the maps hold.
pub fn explain_live(
    snap: &Snapshot,
    desired: &Desired,
    node: &str,
    live: &LiveMaps,
    q: &Question,
) -> anyhow::Result<Explanation> {
    let f = flow(snap, q)?;
    let (protocol, port) = (q.protocol, q.port);
    let config = &live.config;
    let host: Vec<IpAddr> = if config.flags & config_flags::ALLOW_HOST != 0 {
        [config.host_ipv4, config.host_ipv6]
            .iter()
            .filter(|a| **a != [0u8; 16])
            .map(ip_of)
            .collect()
    } else {
        vec![]
    };
    let (src_local, dst_local) = (live.endpoint_of(f.src_ip), live.endpoint_of(f.dst_ip));
    // A pod of another node is judged on what its node's maps should hold: compiled
    // from this agent's view of the cluster for that node.
    let remote_node = |pod: Option<&PodInfo>, local: bool| {
        pod.filter(|p| !local && !p.host_network)
            .and_then(|p| p.node.clone())
            .filter(|n| n != node)
    };
    let (src_remote, dst_remote) = (
        remote_node(f.src, src_local.is_some()),
        remote_node(f.dst, dst_local.is_some()),
    );
    let compiled: BTreeMap<&String, Desired> = [&src_remote, &dst_remote]
        .into_iter()
        .flatten()
        .map(|n| {
            let view = NodeView {
                node: Some(n.clone()),
                host_addrs: vec![],
            };
            (n, compile(snap, &view))
        })
        .collect();
    let lookups: BTreeMap<&String, Lookup> =
        compiled.iter().map(|(n, d)| (*n, Lookup::new(d))).collect();
    let maps = |pod: Option<&PodInfo>,
                local: Option<(u32, EndpointEntry)>,
                remote: &Option<String>|
     -> SideMaps {
        if let Some((_, ep)) = local {
            return SideMaps {
                endpoint: Endpoint::Entry(ep),
                tries: live,
                rules: &desired.rules,
                node: Some(node.to_string()),
                caveat: None,
                host: host.clone(),
            };
        }
        if let (Some(n), Some(pod)) = (remote, pod) {
            return SideMaps {
                endpoint: match compiled[n].endpoints.get(&pod.key()) {
                    Some(ep) => Endpoint::Entry(*ep),
                    None => Endpoint::None,
                },
                tries: &lookups[n],
                rules: &compiled[n].rules,
                node: Some(n.clone()),
                caveat: Some(format!(
                    "judged on node {n} (from this agent's view of the cluster; node {n}'s \
                     agent reads its live maps)"
                )),
                host: vec![],
            };
        }
        let here = pod.is_some_and(|p| {
            !p.host_network && !p.ips.is_empty() && p.node.as_deref() == Some(node)
        });
        SideMaps {
            endpoint: if here {
                Endpoint::Pending
            } else {
                Endpoint::None
            },
            tries: live,
            rules: &desired.rules,
            node: here.then(|| node.to_string()),
            caveat: None,
            host: vec![],
        }
    };
    let sender = maps(f.src, src_local, &src_remote);
    let receiver = maps(f.dst, dst_local, &dst_remote);
    let (mut x, [egress_hits, ingress_hits]) = judge(snap, &f, &sender, &receiver);
    let live_side = |local: Option<(u32, EndpointEntry)>, hits: Option<Hits>| {
        local.map(|(ifindex, ep)| live_side(snap, &desired.rules, ifindex, &ep, hits))
    };
    let originator_ep = |addr: &netpol_common::Addr| {
        [(f.src_ip, src_local), (f.dst_ip, dst_local)]
            .into_iter()
            .find(|(ip, _)| addr_of(*ip) == *addr)
            .and_then(|(_, local)| local.map(|(_, ep)| ep))
    };
    let now = monotonic_ns();
    x.live = Some(Live {
        node: node.to_string(),
        epoch: config.epoch,
        config: names(config.flags, CONFIG_FLAGS),
        egress: live_side(src_local, egress_hits),
        ingress: live_side(dst_local, ingress_hits),
        conntrack: live
            .connections(f.src_ip, f.dst_ip, protocol, port)
            .into_iter()
            .map(|(k, e)| {
                connection(
                    &k,
                    &e,
                    originator_ep(&k.saddr),
                    originator_ep(&k.daddr),
                    config.epoch,
                    now,
                )
            })
            .collect(),
    });
    Ok(x)
}

const ENDPOINT_FLAGS: &[(u32, &str)] = &[
    (endpoint_flags::ISOLATED_INGRESS, "ISOLATED_INGRESS"),
    (endpoint_flags::ISOLATED_EGRESS, "ISOLATED_EGRESS"),
    (endpoint_flags::AUDIT, "AUDIT"),
    (endpoint_flags::ADMIN_INGRESS, "ADMIN_INGRESS"),
    (endpoint_flags::ADMIN_EGRESS, "ADMIN_EGRESS"),
    (endpoint_flags::BASELINE_INGRESS, "BASELINE_INGRESS"),
    (endpoint_flags::BASELINE_EGRESS, "BASELINE_EGRESS"),
];

const CT_FLAGS: &[(u32, &str)] = &[
    (ct_flags::EGRESS_OK, "EGRESS_OK"),
    (ct_flags::INGRESS_OK, "INGRESS_OK"),
    (ct_flags::SEEN_REPLY, "SEEN_REPLY"),
    (ct_flags::EGRESS_AUDIT, "EGRESS_AUDIT"),
    (ct_flags::INGRESS_AUDIT, "INGRESS_AUDIT"),
    (ct_flags::FIN_ORIG, "FIN_ORIG"),
    (ct_flags::FIN_REPLY, "FIN_REPLY"),
    (ct_flags::RST, "RST"),
    (ct_flags::SERVICE, "SERVICE"),
    (ct_flags::EGRESS_DIRECT, "EGRESS_DIRECT"),
    (ct_flags::INGRESS_DIRECT, "INGRESS_DIRECT"),
];

const CONFIG_FLAGS: &[(u32, &str)] = &[
    (config_flags::ALLOW_HOST, "ALLOW_HOST"),
    (config_flags::AUDIT, "AUDIT"),
    (config_flags::KEEP_ESTABLISHED, "KEEP_ESTABLISHED"),
    (config_flags::TRACE, "TRACE"),
];

fn names(flags: u32, table: &[(u32, &str)]) -> Vec<String> {
    table
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| n.to_string())
        .collect()
}

/// What an identity stands for, in words.
fn identity_name(snap: &Snapshot, id: u32) -> String {
    match id {
        identity::WORLD => "world (no pod or node of the cluster)".into(),
        identity::HOST => "the node".into(),
        id if id >= identity::FIRST_CIDR => "a set of ipBlocks".into(),
        id => match snap.identities.get(&id) {
            Some(k) => format!(
                "pods of namespace {} with {{{}}}",
                k.namespace,
                k.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            None => "not in the agent's snapshot".into(),
        },
    }
}

fn live_side(
    snap: &Snapshot,
    rules: &BTreeMap<u32, RuleRef>,
    ifindex: u32,
    ep: &EndpointEntry,
    hits: Option<Hits>,
) -> LiveSide {
    let mut side = LiveSide {
        ifindex,
        endpoint: ep.id,
        revision: ep.revision,
        flags: names(ep.flags, ENDPOINT_FLAGS),
        peer_identity: None,
        peer: None,
        cidr_identity: None,
        entries: vec![],
    };
    let Some(h) = hits else { return side };
    side.peer_identity = Some(h.peer_identity);
    side.peer = Some(identity_name(snap, h.peer_identity));
    side.cidr_identity = (h.cidr_identity != identity::ANY).then_some(h.cidr_identity);
    let ids = [h.peer_identity, h.cidr_identity, identity::ANY];
    let lower = if h.isolated {
        "NetworkPolicy"
    } else {
        "Baseline"
    };
    for (tier, entries) in [("Admin", &h.admin), (lower, &h.lower)] {
        for (e, id) in entries.iter().zip(ids) {
            if e.action == policy_action::MISS {
                continue;
            }
            side.entries.push(Hit {
                tier: tier.into(),
                identity: id,
                action: match e.action {
                    policy_action::ALLOW => "ALLOW",
                    policy_action::DENY => "DENY",
                    policy_action::PASS => "PASS",
                    _ => "UNKNOWN",
                }
                .into(),
                precedence: e.precedence,
                cookie: e.cookie,
                rule: rules.get(&e.cookie).map(rule_name),
            });
        }
    }
    side
}

/// A conntrack entry in words; `originator`/`responder`: the endpoints of this node at
/// either end of the key, whose current revision a stamp must carry.
fn connection(
    k: &CtKey,
    e: &CtEntry,
    originator: Option<EndpointEntry>,
    responder: Option<EndpointEntry>,
    epoch: u32,
    now_ns: u64,
) -> Connection {
    let current = |ok: u32, stamp: u64, ep: Option<EndpointEntry>| {
        (e.flags & ok != 0)
            .then_some(ep)
            .flatten()
            .map(|ep| stamp == ct_stamp(ep.revision, epoch))
    };
    let at = |a: &netpol_common::Addr, port: u16| match ip_of(a) {
        IpAddr::V4(ip) => format!("{ip}:{port}"),
        IpAddr::V6(ip) => format!("[{ip}]:{port}"),
    };
    Connection {
        src: at(&k.saddr, k.sport),
        dst: at(&k.daddr, k.dport),
        flags: names(e.flags, CT_FLAGS),
        idle_seconds: now_ns.saturating_sub(e.last_seen_ns) as f64 / 1e9,
        egress_current: current(ct_flags::EGRESS_OK, e.egress_stamp, originator),
        ingress_current: current(ct_flags::INGRESS_OK, e.ingress_stamp, responder),
    }
}

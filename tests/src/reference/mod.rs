//! The NetworkPolicy API documentation, executed. Slow and obvious on purpose: it reads
//! the raw objects (not the index's model), shares no code with `compile`, and is the
//! oracle the compiled maps are tested against.
//!
//! Each rule below cites the part of the `networking.k8s.io/v1` reference (and the API
//! server's defaulting and validation) it comes from.

mod cluster;
mod validation;

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use netpol_engine::objects::{ClusterState, Object};

pub use cluster::cluster_valid;
pub use validation::valid;

use cluster::tiers;

/// The verdict of one side of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// No policy selects the pod for this direction (or the address is not a pod).
    NotIsolated,
    Allowed,
    Denied,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub egress: Side,
    pub ingress: Side,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.egress != Side::Denied && self.ingress != Side::Denied
    }
}

/// Whether a connection from `from` to `to` on (`protocol`, `port`) is allowed: the
/// sender's egress policy and the receiver's ingress policy must both allow it.
/// `protocol` is "TCP", "UDP" or "SCTP".
pub fn allowed(
    state: &ClusterState,
    from: IpAddr,
    to: IpAddr,
    protocol: &str,
    port: u16,
) -> Verdict {
    let src = pod_at(state, from);
    let dst = pod_at(state, to);
    // Per side, the API's order: Admin tier, then NetworkPolicy, then Baseline tier,
    // then the default (allow).
    let egress = match src {
        None => Side::NotIsolated,
        Some(pod) => tiers(state, pod, true, to, dst, protocol, port, || {
            side(state, pod, "Egress", |rule_peers, rule_ports| {
                peers_match(state, namespace(pod), rule_peers, to, dst)
                    && ports_match(rule_ports, dst, protocol, port)
            })
        }),
    };
    let ingress = match dst {
        None => Side::NotIsolated,
        Some(pod) => tiers(state, pod, false, from, src, protocol, port, || {
            side(state, pod, "Ingress", |rule_peers, rule_ports| {
                peers_match(state, namespace(pod), rule_peers, from, src)
                    && ports_match(rule_ports, Some(pod), protocol, port)
            })
        }),
    };
    Verdict { egress, ingress }
}

/// "A pod is isolated for ingress/egress if there is any NetworkPolicy that both selects
/// the pod and has Ingress/Egress in its policyTypes"; then only what the union of
/// those policies' rules allows is allowed.
fn side(
    state: &ClusterState,
    pod: &Pod,
    policy_type: &str,
    rule_matches: impl Fn(Option<&[NetworkPolicyPeer]>, Option<&[NetworkPolicyPort]>) -> bool,
) -> Side {
    let mut isolated = false;
    for np in policies(state) {
        let spec = np.spec.as_ref().expect("valid policies have a spec");
        if np.metadata.namespace.as_deref().unwrap_or("default") != namespace(pod)
            || !selector_matches(spec.pod_selector.as_ref(), labels(pod))
            || !policy_types(np).contains(&policy_type)
        {
            continue;
        }
        isolated = true;
        let allows = if policy_type == "Ingress" {
            spec.ingress
                .iter()
                .flatten()
                .any(|r| rule_matches(r.from.as_deref(), r.ports.as_deref()))
        } else {
            spec.egress
                .iter()
                .flatten()
                .any(|r| rule_matches(r.to.as_deref(), r.ports.as_deref()))
        };
        if allows {
            return Side::Allowed;
        }
    }
    if isolated {
        Side::Denied
    } else {
        Side::NotIsolated
    }
}

/// API server defaulting: without `policyTypes`, a policy is an Ingress policy, and
/// also an Egress policy when it has at least one egress rule.
fn policy_types(np: &NetworkPolicy) -> Vec<&str> {
    let spec = np.spec.as_ref().expect("valid policies have a spec");
    match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => types.iter().map(String::as_str).collect(),
        _ => {
            let mut t = vec!["Ingress"];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                t.push("Egress");
            }
            t
        }
    }
}

/// "If this field is empty or missing, this rule matches all sources/destinations";
/// otherwise the peers are ORed.
fn peers_match(
    state: &ClusterState,
    policy_namespace: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    addr: IpAddr,
    pod: Option<&Pod>,
) -> bool {
    let Some(peers) = peers.filter(|p| !p.is_empty()) else {
        return true;
    };
    peers.iter().any(|peer| {
        if let Some(block) = &peer.ip_block {
            return in_block(block, addr);
        }
        // podSelector alone: pods in the policy's namespace. namespaceSelector alone:
        // all pods in the selected namespaces. Both: the pods matching podSelector in
        // the namespaces matching namespaceSelector.
        let Some(pod) = pod else { return false };
        let ns_ok = match &peer.namespace_selector {
            None => namespace(pod) == policy_namespace,
            Some(sel) => selector_matches(Some(sel), &namespace_labels(state, namespace(pod))),
        };
        ns_ok && selector_matches(peer.pod_selector.as_ref(), labels(pod))
    })
}

/// "If this field is empty or missing, this rule matches all ports"; otherwise ORed.
/// A named port is looked up on the destination pod ("a name a pod does not define
/// matches nothing on that pod", and an address that is not a pod defines none).
fn ports_match(
    ports: Option<&[NetworkPolicyPort]>,
    destination: Option<&Pod>,
    protocol: &str,
    port: u16,
) -> bool {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return true;
    };
    ports.iter().any(|p| {
        if p.protocol.as_deref().unwrap_or("TCP") != protocol {
            return false;
        }
        match &p.port {
            None => true,
            Some(IntOrString::Int(n)) => {
                let end = p.end_port.unwrap_or(*n);
                (*n..=end).contains(&(port as i32))
            }
            Some(IntOrString::String(name)) => destination.is_some_and(|d| {
                container_ports(d).iter().any(|(n, proto, number)| {
                    n.as_deref() == Some(name.as_str()) && proto == protocol && *number == port
                })
            }),
        }
    })
}

/// "IPBlock describes a particular CIDR ... that is allowed ... except" the listed
/// CIDRs. A CIDR with host bits set means its network.
fn in_block(block: &IPBlock, addr: IpAddr) -> bool {
    cidr_contains(&block.cidr, addr)
        && !block
            .except
            .iter()
            .flatten()
            .any(|x| cidr_contains(x, addr))
}

fn cidr_contains(cidr: &str, addr: IpAddr) -> bool {
    validation::legacy_cidr(cidr).is_some_and(|(net, len)| same_network(net, addr, len))
}

/// Whether `a` and `b` are of one family and agree on the first `len` bits.
fn same_network(a: IpAddr, b: IpAddr, len: u32) -> bool {
    let (a, b, bits) = match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return false,
    };
    len == 0 || a >> (bits - len) == b >> (bits - len)
}

/// `matchLabels` and `matchExpressions` are ANDed; a missing or empty selector selects
/// everything.
fn selector_matches(sel: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = sel else { return true };
    sel.match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
        && sel.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// The pod that owns `addr`: running or pending (not Succeeded/Failed), not
/// hostNetwork (such a pod is the node, and no podSelector selects it).
fn pod_at(state: &ClusterState, addr: IpAddr) -> Option<&Pod> {
    state.objects.iter().find_map(|o| match o {
        Object::Pod(p) if takes_part(p) && pod_ips(p).contains(&addr) => Some(&**p),
        _ => None,
    })
}

fn takes_part(p: &Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    let host_network = p.spec.as_ref().and_then(|s| s.host_network) == Some(true);
    !matches!(phase, Some("Succeeded") | Some("Failed")) && !host_network
}

fn pod_ips(p: &Pod) -> Vec<IpAddr> {
    let Some(status) = &p.status else {
        return vec![];
    };
    status
        .pod_ip
        .iter()
        .chain(status.pod_ips.iter().flatten().map(|i| &i.ip))
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn namespace(p: &Pod) -> &str {
    p.metadata.namespace.as_deref().unwrap_or("default")
}

fn labels(p: &Pod) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    p.metadata.labels.as_ref().unwrap_or(&EMPTY)
}

/// A namespace's labels, with `kubernetes.io/metadata.name` as the API server sets it.
fn namespace_labels(state: &ClusterState, name: &str) -> BTreeMap<String, String> {
    let mut out = state
        .objects
        .iter()
        .find_map(|o| match o {
            Object::Namespace(ns) if ns.metadata.name.as_deref() == Some(name) => {
                ns.metadata.labels.clone()
            }
            _ => None,
        })
        .unwrap_or_default();
    out.insert("kubernetes.io/metadata.name".into(), name.into());
    out
}

/// (name, protocol, number) of every container port; the protocol defaults to TCP.
fn container_ports(p: &Pod) -> Vec<(Option<String>, String, u16)> {
    p.spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .map(|cp| {
            (
                cp.name.clone(),
                cp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                cp.container_port as u16,
            )
        })
        .collect()
}

/// The policies the API server would have accepted.
fn policies(state: &ClusterState) -> impl Iterator<Item = &NetworkPolicy> {
    state.objects.iter().filter_map(|o| match o {
        Object::NetworkPolicy(np) if valid(np) => Some(&**np),
        _ => None,
    })
}

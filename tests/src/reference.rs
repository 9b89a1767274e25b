//! The NetworkPolicy API documentation, executed. Slow and obvious on purpose: it reads
//! the raw objects (not the index's model), shares no code with `compile`, and is the
//! oracle the compiled maps are tested against.
//!
//! Each rule below cites the part of the `networking.k8s.io/v1` reference (and the API
//! server's defaulting and validation) it comes from.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use netpol_engine::objects::cluster_policy::{
    ClusterPolicyObject, ClusterPolicySpec, Peer as ClusterPeer, Rule as ClusterRule,
};
use netpol_engine::objects::{ClusterState, Object};

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

/// The cluster policy tiers around NetworkPolicy, for one side of a flow: `pod` is the
/// subject, `peer_addr`/`peer_pod` the other end, `network_policy` the NetworkPolicy
/// verdict.
///
/// From the policy API: "Policy tiers are evaluated in the following order: Admin
/// tier, NetworkPolicy tier, Baseline tier"; within a tier, lower `priority` first,
/// and within a policy the rules in the order written; the first matching rule's
/// action applies: Accept/Allow and Deny are final, Pass "skips all further rules in
/// the current tier". NetworkPolicy "always makes a final decision for selected pods";
/// "If a given connection wasn't allowed or denied by any of the tiers, ... all pods
/// can communicate". Equal priorities are undefined in the API; netpol orders them by
/// name, then kind.
#[allow(clippy::too_many_arguments)]
fn tiers(
    state: &ClusterState,
    pod: &Pod,
    egress: bool,
    peer_addr: IpAddr,
    peer_pod: Option<&Pod>,
    protocol: &str,
    port: u16,
    network_policy: impl Fn() -> Side,
) -> Side {
    let destination = if egress { peer_pod } else { Some(pod) };
    let first_match = |tier: &str| -> Option<&'static str> {
        let mut policies: Vec<(i64, String, String, &ClusterPolicySpec)> = cluster_policies(state)
            .filter(|(_, _, spec)| cluster_tier(spec) == tier)
            .filter(|(_, _, spec)| cluster_subject_matches(state, spec, pod))
            .map(|(kind, name, spec)| (spec.priority.unwrap_or(0), name, kind, spec))
            .collect();
        policies.sort_by(|a, b| (a.0, &a.1, &a.2).cmp(&(b.0, &b.1, &b.2)));
        for (_, _, _, spec) in policies {
            let rules = if egress { &spec.egress } else { &spec.ingress };
            for rule in rules.iter().flatten() {
                let peers = if egress { &rule.to } else { &rule.from };
                let peer_ok = peers
                    .iter()
                    .flatten()
                    .any(|p| cluster_peer_matches(state, p, peer_addr, peer_pod));
                if peer_ok && cluster_ports_match(rule, destination, protocol, port) {
                    return Some(match rule.action.as_deref() {
                        Some("Accept") | Some("Allow") => "Accept",
                        Some("Deny") => "Deny",
                        _ => "Pass",
                    });
                }
            }
        }
        None
    };
    match first_match("Admin") {
        Some("Accept") => return Side::Allowed,
        Some("Deny") => return Side::Denied,
        _ => {}
    }
    let np = network_policy();
    if np != Side::NotIsolated {
        return np;
    }
    match first_match("Baseline") {
        Some("Accept") => Side::Allowed,
        Some("Deny") => Side::Denied,
        _ => Side::NotIsolated,
    }
}

fn cluster_policies(
    state: &ClusterState,
) -> impl Iterator<Item = (String, String, &ClusterPolicySpec)> {
    state.objects.iter().filter_map(|o| match o {
        Object::ClusterPolicy(c) if cluster_valid(c) => Some((
            c.kind.clone(),
            c.metadata.name.clone().unwrap_or_default(),
            c.spec.as_ref().expect("valid"),
        )),
        _ => None,
    })
}

fn cluster_tier(spec: &ClusterPolicySpec) -> &str {
    match spec.tier.as_deref() {
        Some(t) => t,
        // v1alpha1: an AdminNetworkPolicy has a priority, the Baseline one has none.
        None if spec.priority.is_some() => "Admin",
        None => "Baseline",
    }
}

/// "Subject defines the pods to which this policy applies ... host-networked pods are
/// not included in subject selection" (`pod_at` already leaves them out).
fn cluster_subject_matches(state: &ClusterState, spec: &ClusterPolicySpec, pod: &Pod) -> bool {
    let Some(subject) = &spec.subject else {
        return false;
    };
    let ns_labels = namespace_labels(state, namespace(pod));
    match (&subject.namespaces, &subject.pods) {
        (Some(ns), _) => selector_matches(Some(ns), &ns_labels),
        (None, Some(p)) => {
            selector_matches(Some(&p.namespace_selector), &ns_labels)
                && selector_matches(Some(&p.pod_selector), labels(pod))
        }
        _ => false,
    }
}

/// `namespaces`: every pod of the selected namespaces; `pods`: the selected pods of the
/// selected namespaces; `networks`: "cluster-internal traffic will be checked against
/// the rule as well" (an address in the CIDR, pod or not).
fn cluster_peer_matches(
    state: &ClusterState,
    peer: &ClusterPeer,
    addr: IpAddr,
    pod: Option<&Pod>,
) -> bool {
    if let Some(nets) = &peer.networks {
        return nets.iter().any(|n| cidr_contains(n, addr));
    }
    // "It selects the nodeIPs ... present in the node.Status.Addresses field".
    if let Some(sel) = &peer.nodes {
        return state.objects.iter().any(|o| match o {
            Object::Node(n) => {
                let empty = BTreeMap::new();
                selector_matches(Some(sel), n.metadata.labels.as_ref().unwrap_or(&empty))
                    && n.status
                        .iter()
                        .flat_map(|s| s.addresses.iter().flatten())
                        .any(|a| {
                            (a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                                && a.address.parse::<IpAddr>().ok() == Some(addr)
                        })
            }
            _ => false,
        });
    }
    let Some(pod) = pod else { return false };
    let ns_labels = namespace_labels(state, namespace(pod));
    match (&peer.namespaces, &peer.pods) {
        (Some(ns), _) => selector_matches(Some(ns), &ns_labels),
        (None, Some(p)) => {
            selector_matches(Some(&p.namespace_selector), &ns_labels)
                && selector_matches(Some(&p.pod_selector), labels(pod))
        }
        _ => false,
    }
}

/// "If unspecified, protocol-specific attributes will not be used to match traffic";
/// a named port is the destination pod's container port of that name.
fn cluster_ports_match(
    rule: &ClusterRule,
    destination: Option<&Pod>,
    protocol: &str,
    port: u16,
) -> bool {
    let named = |name: &str| {
        destination.is_some_and(|d| {
            container_ports(d).iter().any(|(n, p, number)| {
                n.as_deref() == Some(name) && p == protocol && *number == port
            })
        })
    };
    if let Some(ports) = &rule.ports {
        return ports.iter().any(|p| {
            if let Some(n) = &p.port_number {
                let number = match &n.port {
                    Some(IntOrString::Int(x)) => *x as i64,
                    _ => return false,
                };
                n.protocol.as_deref().unwrap_or("TCP") == protocol && number == port as i64
            } else if let Some(name) = &p.named_port {
                named(name)
            } else if let Some(r) = &p.port_range {
                r.protocol.as_deref().unwrap_or("TCP") == protocol
                    && (r.start.unwrap_or(0)..=r.end.unwrap_or(0)).contains(&(port as i64))
            } else {
                false
            }
        });
    }
    if let Some(protocols) = &rule.protocols {
        return protocols.iter().any(|p| {
            if let Some(name) = &p.destination_named_port {
                return named(name);
            }
            let (name, pp) = match (&p.tcp, &p.udp, &p.sctp) {
                (Some(x), _, _) => ("TCP", x),
                (_, Some(x), _) => ("UDP", x),
                (_, _, Some(x)) => ("SCTP", x),
                _ => return false,
            };
            name == protocol
                && match &pp.destination_port {
                    None => true,
                    Some(d) => match (d.number, &d.range) {
                        (Some(n), _) => n == port as i64,
                        (None, Some(r)) => {
                            (r.start.unwrap_or(0)..=r.end.unwrap_or(0)).contains(&(port as i64))
                        }
                        _ => false,
                    },
                }
        });
    }
    true
}

/// The CRDs' validation, as far as enforcement cares.
pub fn cluster_valid(c: &ClusterPolicyObject) -> bool {
    let Some(spec) = &c.spec else { return false };
    let cnp = c.kind == "ClusterNetworkPolicy";
    let banp = c.kind == "BaselineAdminNetworkPolicy";
    let max = if cnp { 25 } else { 100 };
    let tier_ok = if cnp {
        matches!(spec.tier.as_deref(), Some("Admin" | "Baseline"))
    } else {
        spec.tier.is_none()
    };
    let priority_ok = if banp {
        c.metadata.name.as_deref() == Some("default")
    } else {
        spec.priority.is_some_and(|p| (0..=1000).contains(&p))
    };
    let subject_ok = spec.subject.as_ref().is_some_and(|s| {
        s.namespaces.is_some() != s.pods.is_some()
            && s.namespaces.iter().all(selector_valid)
            && s.pods
                .iter()
                .all(|p| selector_valid(&p.namespace_selector) && selector_valid(&p.pod_selector))
    });
    let actions: &[&str] = match (cnp, banp) {
        (true, _) => &["Accept", "Deny", "Pass"],
        (false, false) => &["Allow", "Deny", "Pass"],
        (false, true) => &["Allow", "Deny"],
    };
    let rules_ok = [(&spec.ingress, false), (&spec.egress, true)]
        .iter()
        .all(|(rules, egress)| {
            let rules = rules.as_deref().unwrap_or_default();
            rules.len() <= max
                && rules.iter().all(|r| {
                    let peers = if *egress {
                        r.to.as_deref()
                    } else {
                        r.from.as_deref()
                    };
                    let peers = peers.unwrap_or_default();
                    let has_networks = peers
                        .iter()
                        .any(|p| p.networks.is_some() || p.nodes.is_some());
                    let named = r.ports.iter().flatten().any(|p| p.named_port.is_some())
                        || r.protocols
                            .iter()
                            .flatten()
                            .any(|p| p.destination_named_port.is_some());
                    r.name.as_ref().is_none_or(|n| n.len() <= 100)
                        && r.action.as_deref().is_some_and(|a| actions.contains(&a))
                        && !peers.is_empty()
                        && peers.len() <= max
                        && peers.iter().all(|p| cluster_peer_valid(p, *egress))
                        && !(has_networks && named)
                        && cluster_port_matches_valid(r, max, cnp)
                })
        });
    tier_ok && priority_ok && subject_ok && rules_ok
}

fn cluster_peer_valid(p: &ClusterPeer, egress: bool) -> bool {
    let set = [
        p.namespaces.is_some(),
        p.pods.is_some(),
        p.nodes.is_some(),
        p.networks.is_some(),
        p.domain_names.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    // domainNames (experimental) are not enforced: such a policy is refused.
    set == 1
        && p.domain_names.is_none()
        && (egress || (p.networks.is_none() && p.nodes.is_none()))
        && p.nodes.iter().all(selector_valid)
        && p.namespaces.iter().all(selector_valid)
        && p.pods
            .iter()
            .all(|x| selector_valid(&x.namespace_selector) && selector_valid(&x.pod_selector))
        && p.networks.as_ref().is_none_or(|n| {
            !n.is_empty() && n.len() <= 25 && n.iter().all(|c| parse_cidr(c).is_some())
        })
}

fn cluster_port_matches_valid(r: &ClusterRule, max: usize, cnp: bool) -> bool {
    let number = |n: i64| (1..=65535).contains(&n);
    let range = |s: Option<i64>, e: Option<i64>| match (s, e) {
        (Some(s), Some(e)) => number(s) && number(e) && s < e,
        _ => false,
    };
    let proto = |p: Option<&str>| matches!(p, None | Some("TCP" | "UDP" | "SCTP"));
    if cnp {
        if r.ports.is_some() {
            return false;
        }
        return r.protocols.as_ref().is_none_or(|ps| {
            !ps.is_empty()
                && ps.len() <= max
                && ps.iter().all(|p| {
                    let set = [
                        p.tcp.is_some(),
                        p.udp.is_some(),
                        p.sctp.is_some(),
                        p.destination_named_port.is_some(),
                    ]
                    .iter()
                    .filter(|x| **x)
                    .count();
                    let port_ok = [&p.tcp, &p.udp, &p.sctp].iter().all(|x| {
                        x.as_ref()
                            .and_then(|pp| pp.destination_port.as_ref())
                            .is_none_or(|d| match (d.number, &d.range) {
                                (Some(n), None) => number(n),
                                (None, Some(rg)) => range(rg.start, rg.end),
                                _ => false,
                            })
                    });
                    set == 1
                        && port_ok
                        && p.destination_named_port
                            .as_deref()
                            .is_none_or(iana_service_name)
                })
        });
    }
    if r.protocols.is_some() {
        return false;
    }
    r.ports.as_ref().is_none_or(|ps| {
        !ps.is_empty()
            && ps.len() <= max
            && ps
                .iter()
                .all(|p| match (&p.port_number, &p.named_port, &p.port_range) {
                    (Some(n), None, None) => {
                        proto(n.protocol.as_deref())
                            && matches!(&n.port, Some(IntOrString::Int(x)) if number(*x as i64))
                    }
                    (None, Some(name), None) => iana_service_name(name),
                    (None, None, Some(rg)) => {
                        proto(rg.protocol.as_deref()) && range(rg.start, rg.end)
                    }
                    _ => false,
                })
    })
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
    let Some((net, len)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(net), Ok(len)) = (net.parse::<IpAddr>(), len.parse::<u32>()) else {
        return false;
    };
    match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
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
        Object::Pod(p) if takes_part(p) && pod_ips(p).contains(&addr) => Some(p),
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
        Object::NetworkPolicy(np) if valid(np) => Some(np),
        _ => None,
    })
}

/// The API server's validation of a NetworkPolicy, as far as enforcement cares.
pub fn valid(np: &NetworkPolicy) -> bool {
    let Some(spec) = &np.spec else { return false };
    let types_ok = spec
        .policy_types
        .iter()
        .flatten()
        .all(|t| t == "Ingress" || t == "Egress");
    let rules = spec
        .ingress
        .iter()
        .flatten()
        .map(|r| (r.from.as_deref(), r.ports.as_deref()))
        .chain(
            spec.egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_deref(), r.ports.as_deref())),
        );
    let mut selectors = vec![spec.pod_selector.as_ref()];
    let mut ok = types_ok;
    for (peers, ports) in rules {
        for peer in peers.into_iter().flatten() {
            selectors.push(peer.pod_selector.as_ref());
            selectors.push(peer.namespace_selector.as_ref());
            ok &= match &peer.ip_block {
                Some(b) => {
                    peer.pod_selector.is_none()
                        && peer.namespace_selector.is_none()
                        && block_valid(b)
                }
                None => peer.pod_selector.is_some() || peer.namespace_selector.is_some(),
            };
        }
        for p in ports.into_iter().flatten() {
            ok &= port_valid(p);
        }
    }
    ok && selectors.into_iter().flatten().all(selector_valid)
}

fn block_valid(b: &IPBlock) -> bool {
    let Some((net, len)) = parse_cidr(&b.cidr) else {
        return false;
    };
    // Each except must be a strict subset of cidr.
    b.except.iter().flatten().all(|x| match parse_cidr(x) {
        Some((xnet, xlen)) => {
            xlen > len && cidr_contains(&b.cidr, xnet) && xnet.is_ipv4() == net.is_ipv4()
        }
        None => false,
    })
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u32)> {
    let (net, len) = s.split_once('/')?;
    let net: IpAddr = net.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    let max = if net.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((net, len))
}

fn port_valid(p: &NetworkPolicyPort) -> bool {
    let protocol_ok = matches!(p.protocol.as_deref(), None | Some("TCP" | "UDP" | "SCTP"));
    let port_ok = match (&p.port, p.end_port) {
        (None, None) => true,
        (None, Some(_)) => false,
        (Some(IntOrString::Int(n)), end) => {
            (1..=65535).contains(n) && end.is_none_or(|e| e >= *n && e <= 65535)
        }
        (Some(IntOrString::String(name)), end) => end.is_none() && iana_service_name(name),
    };
    protocol_ok && port_ok
}

/// RFC 6335: 1-15 characters, lowercase letters, digits and hyphens, at least one
/// letter, no hyphen at either end and no two in a row.
fn iana_service_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn selector_valid(sel: &LabelSelector) -> bool {
    sel.match_expressions.iter().flatten().all(|e| {
        let n = e.values.as_ref().map_or(0, Vec::len);
        match e.operator.as_str() {
            "In" | "NotIn" => n > 0,
            "Exists" | "DoesNotExist" => n == 0,
            _ => false,
        }
    })
}

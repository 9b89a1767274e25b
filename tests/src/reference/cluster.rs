//! The cluster policy tiers (AdminNetworkPolicy, BaselineAdminNetworkPolicy and
//! ClusterNetworkPolicy) around NetworkPolicy, and their CRDs' validation.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use netpol_engine::objects::cluster_policy::{
    ClusterPolicyObject, ClusterPolicySpec, Peer as ClusterPeer, Rule as ClusterRule,
};
use netpol_engine::objects::{ClusterState, Object};

use super::validation::{iana_service_name, parse_cidr, selector_valid};
use super::{
    cidr_contains, container_ports, labels, namespace, namespace_labels, selector_matches, Side,
};

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
pub(super) fn tiers(
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

//! The API server's validation of a NetworkPolicy, and the checks it shares with the
//! cluster policies' CRDs.

use std::net::IpAddr;

use k8s_openapi::api::networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::cidr_contains;

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

pub(super) fn parse_cidr(s: &str) -> Option<(IpAddr, u32)> {
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
pub(super) fn iana_service_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

pub(super) fn selector_valid(sel: &LabelSelector) -> bool {
    sel.match_expressions.iter().flatten().all(|e| {
        let n = e.values.as_ref().map_or(0, Vec::len);
        match e.operator.as_str() {
            "In" | "NotIn" => n > 0,
            "Exists" | "DoesNotExist" => n == 0,
            _ => false,
        }
    })
}

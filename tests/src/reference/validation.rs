//! The API server's validation of a NetworkPolicy, and the checks it shares with the
//! cluster policies' CRDs.

use std::net::IpAddr;

use k8s_openapi::api::networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::same_network;

/// The API server's validation of a NetworkPolicy, as far as enforcement cares.
pub fn valid(np: &NetworkPolicy) -> bool {
    let Some(spec) = &np.spec else { return false };
    // "may not specify more than two policyTypes", each Ingress or Egress.
    let types = spec.policy_types.as_deref().unwrap_or_default();
    let types_ok = types.len() <= 2 && types.iter().all(|t| t == "Ingress" || t == "Egress");
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
    ok && selectors
        .into_iter()
        .flatten()
        .all(|s| selector_valid(s) && labels_well_formed(s))
}

/// "except is a slice of CIDRs that should not be included within an IPBlock ...
/// Except values will be rejected if they are outside the cidr range": each must be a
/// CIDR of the same family, strictly inside `cidr` (a longer prefix).
fn block_valid(b: &IPBlock) -> bool {
    let Some((net, len)) = legacy_cidr(&b.cidr) else {
        return false;
    };
    b.except.iter().flatten().all(|x| match legacy_cidr(x) {
        Some((xnet, xlen)) => xlen > len && same_network(net, xnet, len),
        None => false,
    })
}

/// A CIDR as the CRDs' `isCIDR()` reads it (Go's `netip.ParsePrefix`): as below, but
/// no decimal field may carry a leading zero.
pub(super) fn parse_cidr(s: &str) -> Option<(IpAddr, u32)> {
    read_cidr(s, false)
}

/// A CIDR as the API server reads `ipBlock` (its "sloppy" legacy parser): an IPv4 or
/// IPv6 address (no zone), "/" and a prefix length in decimal digits (no sign), at most
/// the family's width; IPv4 octets and the length may carry leading zeros, read as
/// decimal. Host bits may be set.
pub(super) fn legacy_cidr(s: &str) -> Option<(IpAddr, u32)> {
    read_cidr(s, true)
}

fn read_cidr(s: &str, leading_zeros: bool) -> Option<(IpAddr, u32)> {
    let decimal = |t: &str| {
        !t.is_empty()
            && t.bytes().all(|b| b.is_ascii_digit())
            && (leading_zeros || t == "0" || !t.starts_with('0'))
    };
    let (net, len) = s.split_once('/')?;
    if !decimal(len) {
        return None;
    }
    let octets: Vec<&str> = net.split('.').collect();
    let net: IpAddr = if octets.len() == 4 {
        let mut v4 = [0u8; 4];
        for (o, text) in v4.iter_mut().zip(&octets) {
            if !decimal(text) {
                return None;
            }
            *o = text.parse().ok()?;
        }
        IpAddr::from(v4)
    } else {
        net.parse::<std::net::Ipv6Addr>().ok()?.into()
    };
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

/// The label syntax a NetworkPolicy's selectors are held to (the CRDs' schemas do not
/// check it): every `matchLabels` key and every expression's key is a qualified name,
/// every `matchLabels` value and every `In`/`NotIn` value a label value.
fn labels_well_formed(sel: &LabelSelector) -> bool {
    sel.match_labels
        .iter()
        .flatten()
        .all(|(k, v)| qualified_name(k) && label_value(v))
        && sel
            .match_expressions
            .iter()
            .flatten()
            .all(|e| qualified_name(&e.key) && e.values.iter().flatten().all(|v| label_value(v)))
}

/// "an optional prefix and name, separated by a slash (/). The name segment is
/// required and must be 63 characters or less, beginning and ending with an
/// alphanumeric character ([a-z0-9A-Z]) with dashes (-), underscores (_), dots (.),
/// and alphanumerics between. The prefix is optional. If specified, the prefix must be
/// a DNS subdomain".
fn qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    prefix.is_none_or(dns_subdomain) && !name.is_empty() && label_value(name)
}

/// "must be 63 characters or less (can be empty), unless empty, must begin and end
/// with an alphanumeric character ([a-z0-9A-Z]), could contain dashes (-),
/// underscores (_), dots (.), and alphanumerics between."
fn label_value(s: &str) -> bool {
    let inner = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    s.len() <= 63
        && s.bytes().all(inner)
        && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

/// RFC 1123 subdomain: at most 253 characters, dot-separated parts of lowercase
/// alphanumerics and '-', each beginning and ending with an alphanumeric.
fn dns_subdomain(s: &str) -> bool {
    let edge = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    s.len() <= 253
        && s.split('.').all(|part| {
            edge(part.bytes().next())
                && edge(part.bytes().last())
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

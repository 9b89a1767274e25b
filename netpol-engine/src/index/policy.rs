//! NetworkPolicy objects into the internal model, validated as the API server would:
//! an invalid policy is rejected whole with an error naming the object and field.

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use netpol_common::proto;

use super::net::Cidr;
use super::selector::Selector;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    /// `policyTypes`, explicit or inferred.
    pub isolates_ingress: bool,
    pub isolates_egress: bool,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
    /// `netpol.io/mode: audit`: staged. The policy changes no verdict; where only audit
    /// policies would isolate a pod, what they would drop passes and is reported.
    pub audit: bool,
}

/// One ingress or egress rule. `peers: None` = all peers; `ports: None` = all ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub peers: Option<Vec<Peer>>,
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Pods chosen by namespace (None = the policy's own namespace) and pod selectors.
    Pods {
        namespaces: Option<Selector>,
        pods: Selector,
    },
    Block {
        cidr: Cidr,
        except: Vec<Cidr>,
    },
    /// The addresses of the nodes whose labels match (cluster policies only).
    Nodes(Selector),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub protocol: u8,
    pub port: Option<PortRef>,
    pub end_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

pub fn protocol_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "TCP",
        proto::UDP => "UDP",
        proto::SCTP => "SCTP",
        proto::ICMP => "ICMP",
        proto::ICMPV6 => "ICMPv6",
        _ => "OTHER",
    }
}

pub fn parse_protocol(s: &str) -> Option<u8> {
    match s {
        "TCP" => Some(proto::TCP),
        "UDP" => Some(proto::UDP),
        "SCTP" => Some(proto::SCTP),
        _ => None,
    }
}

/// Parses and validates; the error names the field, e.g.
/// `spec.ingress[0].from[1].ipBlock.cidr: "10.0.0.0/33" is not a CIDR (...)`.
pub fn parse_policy(np: &NetworkPolicy) -> Result<Policy, String> {
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = np.metadata.name.clone().ok_or("metadata.name: missing")?;
    let spec = np.spec.as_ref().ok_or("spec: missing")?;
    let pod_selector = selector(
        &spec.pod_selector.clone().unwrap_or_default(),
        "spec.podSelector",
    )?;
    // API server defaulting: no policyTypes (missing or empty) means Ingress, plus
    // Egress when there is at least one egress rule (`egress: []` is not one).
    let (mut isolates_ingress, mut isolates_egress) =
        (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()));
    if let Some(types) = spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
        if types.len() > 2 {
            return Err("spec.policyTypes: may not specify more than two policyTypes".into());
        }
        isolates_ingress = false;
        isolates_egress = false;
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "Ingress" => isolates_ingress = true,
                "Egress" => isolates_egress = true,
                other => {
                    return Err(format!(
                        "spec.policyTypes[{i}]: unknown type {other:?} (Ingress, Egress)"
                    ))
                }
            }
        }
    }
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let f = format!("spec.ingress[{i}]");
        ingress.push(Rule {
            peers: parse_peers(r.from.as_deref(), &format!("{f}.from"))?,
            ports: parse_ports(r.ports.as_deref(), &format!("{f}.ports"))?,
        });
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let f = format!("spec.egress[{i}]");
        egress.push(Rule {
            peers: parse_peers(r.to.as_deref(), &format!("{f}.to"))?,
            ports: parse_ports(r.ports.as_deref(), &format!("{f}.ports"))?,
        });
    }
    let audit = match np
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(super::MODE_ANNOTATION))
        .map(String::as_str)
    {
        Some("audit") => true,
        None | Some("enforce") => false,
        Some(other) => {
            // The API server takes any annotation: enforcing is the safe reading.
            tracing::warn!(policy = %format!("{namespace}/{name}"), value = other,
                "metadata.annotations[{}]: expected audit or enforce; enforcing", super::MODE_ANNOTATION);
            false
        }
    };
    Ok(Policy {
        namespace,
        name,
        pod_selector,
        isolates_ingress,
        isolates_egress,
        ingress,
        egress,
        audit,
    })
}

fn parse_peers(
    peers: Option<&[NetworkPolicyPeer]>,
    field: &str,
) -> Result<Option<Vec<Peer>>, String> {
    // A missing or empty list means all peers.
    let Some(peers) = peers.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        let f = format!("{field}[{i}]");
        match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
            (Some(block), None, None) => {
                let cidr =
                    Cidr::parse(&block.cidr).map_err(|e| format!("{f}.ipBlock.cidr: {e}"))?;
                let mut except = Vec::new();
                for (j, x) in block.except.iter().flatten().enumerate() {
                    let xc = Cidr::parse(x).map_err(|e| format!("{f}.ipBlock.except[{j}]: {e}"))?;
                    if !cidr.contains(&xc) || xc.prefix_len() == cidr.prefix_len() {
                        return Err(format!(
                            "{f}.ipBlock.except[{j}]: {x:?} must be strictly inside cidr {:?}",
                            block.cidr
                        ));
                    }
                    except.push(xc);
                }
                out.push(Peer::Block { cidr, except });
            }
            (Some(_), _, _) => {
                return Err(format!(
                    "{f}: ipBlock cannot be combined with podSelector or namespaceSelector"
                ))
            }
            (None, None, None) => {
                return Err(format!(
                    "{f}: a peer needs podSelector, namespaceSelector or ipBlock"
                ))
            }
            (None, ns, pods) => {
                let namespaces = ns
                    .as_ref()
                    .map(|s| selector(s, &format!("{f}.namespaceSelector")))
                    .transpose()?;
                let pods = pods
                    .as_ref()
                    .map(|s| selector(s, &format!("{f}.podSelector")))
                    .transpose()?
                    .unwrap_or_default();
                out.push(Peer::Pods { namespaces, pods });
            }
        }
    }
    Ok(Some(out))
}

fn parse_ports(
    ports: Option<&[NetworkPolicyPort]>,
    field: &str,
) -> Result<Option<Vec<PortSpec>>, String> {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let protocol = match p.protocol.as_deref() {
            None => proto::TCP,
            Some(s) => parse_protocol(s)
                .ok_or_else(|| format!("{f}.protocol: unknown protocol {s:?} (TCP, UDP, SCTP)"))?,
        };
        let port = match &p.port {
            None => None,
            Some(IntOrString::Int(n)) => {
                if !(1..=65535).contains(n) {
                    return Err(format!("{f}.port: {n} is not a port number (1-65535)"));
                }
                Some(PortRef::Number(*n as u16))
            }
            Some(IntOrString::String(s)) => {
                validate_port_name(s).map_err(|e| format!("{f}.port: {e}"))?;
                Some(PortRef::Name(s.clone()))
            }
        };
        let end_port = match p.end_port {
            None => None,
            Some(end) => match &port {
                Some(PortRef::Number(start)) if end >= *start as i32 && end <= 65535 => {
                    Some(end as u16)
                }
                Some(PortRef::Number(start)) => {
                    return Err(format!(
                        "{f}.endPort: {end} must be between port {start} and 65535"
                    ));
                }
                Some(PortRef::Name(_)) => {
                    return Err(format!("{f}.endPort: not allowed with a named port"))
                }
                None => return Err(format!("{f}.endPort: requires port")),
            },
        };
        out.push(PortSpec {
            protocol,
            port,
            end_port,
        });
    }
    Ok(Some(out))
}

/// A NetworkPolicy's selector: parsed, and its label keys and values held to the
/// syntax the API server checks for NetworkPolicy (the cluster policies' CRDs do not).
fn selector(sel: &LabelSelector, field: &str) -> Result<Selector, String> {
    for (key, value) in sel.match_labels.iter().flatten() {
        validate_label_key(key).map_err(|e| format!("{field}.matchLabels: {e}"))?;
        validate_label_value(value).map_err(|e| format!("{field}.matchLabels[{key}]: {e}"))?;
    }
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        validate_label_key(&e.key).map_err(|err| format!("{f}.key: {err}"))?;
        for (j, v) in e.values.iter().flatten().enumerate() {
            validate_label_value(v).map_err(|err| format!("{f}.values[{j}]: {err}"))?;
        }
    }
    Selector::parse(sel, field)
}

/// A label key is a qualified name: `[prefix/]name`, the prefix a DNS subdomain (at
/// most 253 characters), the name a non-empty label value.
fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        p.len() <= 253
            && p.split('.').all(|part| {
                let b = part.as_bytes();
                !b.is_empty()
                    && b.iter()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                    && b[0] != b'-'
                    && b[b.len() - 1] != b'-'
            })
    });
    if !prefix_ok || name.is_empty() || validate_label_value(name).is_err() {
        return Err(format!(
            "{key:?} is not a label key ([DNS subdomain/]name, the name 1-63 characters)"
        ));
    }
    Ok(())
}

/// A label value: empty, or at most 63 of `A-Za-z0-9-_.` with an alphanumeric at
/// either end.
fn validate_label_value(value: &str) -> Result<(), String> {
    let b = value.as_bytes();
    let ok = b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_none_or(u8::is_ascii_alphanumeric)
        && b.last().is_none_or(u8::is_ascii_alphanumeric);
    if !ok {
        return Err(format!(
            "{value:?} is not a label value (at most 63 characters, alphanumeric at the ends)"
        ));
    }
    Ok(())
}

/// An IANA service name: 1-15 characters of `a-z0-9-`, at least one letter, no leading,
/// trailing or doubled hyphen.
pub fn validate_port_name(s: &str) -> Result<(), String> {
    let ok_chars = s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if s.is_empty() || s.len() > 15 {
        return Err(format!("port name {s:?} must be 1-15 characters"));
    }
    if !ok_chars
        || !s.chars().any(|c| c.is_ascii_lowercase())
        || s.starts_with('-')
        || s.ends_with('-')
        || s.contains("--")
    {
        return Err(format!("port name {s:?} is not a valid IANA service name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> NetworkPolicy {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn policy_types_are_inferred_from_the_sections_present() {
        let p = parse_policy(&policy(
            "metadata: {name: p, namespace: x}\nspec: {podSelector: {}}",
        ))
        .unwrap();
        assert!(p.isolates_ingress && !p.isolates_egress);
        let p = parse_policy(&policy(
            "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, egress: [{}]}",
        ))
        .unwrap();
        assert!(p.isolates_ingress && p.isolates_egress);
        let p = parse_policy(&policy(
            "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, egress: [], policyTypes: []}",
        ))
        .unwrap();
        assert!(
            p.isolates_ingress && !p.isolates_egress,
            "an empty egress list is no egress rule, and empty policyTypes are defaulted"
        );
        let p = parse_policy(&policy(
            "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, policyTypes: [Egress]}",
        ))
        .unwrap();
        assert!(!p.isolates_ingress && p.isolates_egress);
    }

    #[test]
    fn empty_from_and_missing_ports_mean_all() {
        let p = parse_policy(&policy(
            "metadata: {name: p}\nspec: {podSelector: {}, ingress: [{from: []}]}",
        ))
        .unwrap();
        assert_eq!(
            p.ingress[0],
            Rule {
                peers: None,
                ports: None
            }
        );
        assert_eq!(p.namespace, "default");
    }

    #[test]
    fn invalid_fields_are_named() {
        let cases = [
            ("spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}", "spec.ingress[0].from[0].ipBlock.cidr"),
            ("spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]}", "spec.ingress[0].from[0].ipBlock.except[0]"),
            ("spec: {podSelector: {}, egress: [{ports: [{protocol: ICMP, port: 1}]}]}", "spec.egress[0].ports[0].protocol"),
            ("spec: {podSelector: {}, egress: [{ports: [{port: a-very-long-port-name}]}]}", "spec.egress[0].ports[0].port"),
            ("spec: {podSelector: {}, egress: [{ports: [{port: 80, endPort: 79}]}]}", "spec.egress[0].ports[0].endPort"),
            ("spec: {podSelector: {}, egress: [{ports: [{port: http, endPort: 90}]}]}", "spec.egress[0].ports[0].endPort"),
            ("spec: {podSelector: {}, policyTypes: [Sideways]}", "spec.policyTypes[0]"),
            ("spec: {podSelector: {}, policyTypes: [Ingress, Egress, Ingress]}", "spec.policyTypes"),
            ("spec: {podSelector: {matchLabels: {Example.com/app: a}}}", "spec.podSelector.matchLabels"),
            ("spec: {podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {app: -a}}}]}]}", "spec.ingress[0].from[0].podSelector.matchLabels[app]"),
            ("spec: {podSelector: {}, egress: [{to: [{namespaceSelector: {matchExpressions: [{key: a/b/c, operator: Exists}]}}]}]}", "spec.egress[0].to[0].namespaceSelector.matchExpressions[0].key"),
            ("spec: {podSelector: {matchExpressions: [{key: app, operator: In, values: [a, b!]}]}}", "spec.podSelector.matchExpressions[0].values[1]"),
        ];
        for (spec, field) in cases {
            let e = parse_policy(&policy(&format!("metadata: {{name: p}}\n{spec}"))).unwrap_err();
            assert!(e.starts_with(field), "{spec}: {e}");
        }
    }

    #[test]
    fn label_keys_and_values_follow_the_api_syntax() {
        for key in [
            "app",
            "example.com/app",
            "A_b.c-D",
            "kubernetes.io/metadata.name",
        ] {
            assert!(validate_label_key(key).is_ok(), "{key}");
        }
        for key in [
            "",
            "bad key",
            "a/b/c",
            "/app",
            "Example.com/app",
            "-app",
            "app-",
            &"a".repeat(64),
        ] {
            assert!(validate_label_key(key).is_err(), "{key}");
        }
        for value in ["", "a", "A.b_c-9", &"a".repeat(63)] {
            assert!(validate_label_value(value).is_ok(), "{value}");
        }
        for value in ["-a", "a-", "a b", "a/b", &"a".repeat(64)] {
            assert!(validate_label_value(value).is_err(), "{value}");
        }
    }

    #[test]
    fn port_names_follow_iana_rules() {
        assert!(validate_port_name("http").is_ok());
        assert!(validate_port_name("web-8080").is_ok());
        assert!(validate_port_name("8080").is_err());
        assert!(validate_port_name("HTTP").is_err());
        assert!(validate_port_name("a--b").is_err());
        assert!(validate_port_name("sixteen-chars-xx").is_err());
    }
}

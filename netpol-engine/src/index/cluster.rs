//! Cluster-wide policy (ClusterNetworkPolicy, AdminNetworkPolicy,
//! BaselineAdminNetworkPolicy) into one internal model, validated as the CRDs would:
//! an invalid object is rejected whole, with an error naming the field.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use netpol_common::proto;

use super::net::Cidr;
use super::policy::{parse_protocol, validate_port_name, Peer, PortRef, PortSpec, Rule};
use super::selector::Selector;
use crate::objects::cluster_policy::{self as crd, ClusterPolicyObject};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Admin,
    Baseline,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// `Accept` (v1alpha2+) or `Allow` (v1alpha1).
    Accept,
    Deny,
    Pass,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterPolicy {
    pub kind: String,
    pub name: String,
    pub tier: Tier,
    /// 0-1000, lower is stronger (a BaselineAdminNetworkPolicy has none: 0).
    pub priority: u32,
    /// Pods in namespaces matching `namespaces` whose labels match `pods`.
    pub namespaces: Selector,
    pub pods: Selector,
    pub ingress: Vec<ClusterRule>,
    pub egress: Vec<ClusterRule>,
}

impl ClusterPolicy {
    /// `Kind/name`: its key in the snapshot and in rule references.
    pub fn key(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }

    /// The order of evaluation within a tier: priority, then (the API leaves equal
    /// priorities undefined) name and kind, so the choice is at least stable.
    pub fn order(&self) -> (Tier, u32, &str, &str) {
        (self.tier, self.priority, &self.name, &self.kind)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterRule {
    pub name: String,
    pub action: Action,
    /// Peers (always a list: the API requires at least one) and ports (None = all).
    pub rule: Rule,
}

/// Limits of the CRDs: (rules per direction, peers per rule, port matches per rule).
fn limits(kind: &str) -> (usize, usize, usize) {
    if kind == "ClusterNetworkPolicy" {
        (25, 25, 25)
    } else {
        (100, 100, 100)
    }
}

pub fn parse(obj: &ClusterPolicyObject) -> Result<ClusterPolicy, String> {
    let kind = obj.kind.clone();
    let name = obj.metadata.name.clone().ok_or("metadata.name: missing")?;
    let spec = obj.spec.as_ref().ok_or("spec: missing")?;
    let (tier, priority) = match kind.as_str() {
        "ClusterNetworkPolicy" => {
            let tier = match spec.tier.as_deref() {
                Some("Admin") => Tier::Admin,
                Some("Baseline") => Tier::Baseline,
                Some(t) => return Err(format!("spec.tier: unknown tier {t:?} (Admin, Baseline)")),
                None => return Err("spec.tier: missing (Admin or Baseline)".into()),
            };
            (tier, priority(spec.priority)?)
        }
        "AdminNetworkPolicy" => (Tier::Admin, priority(spec.priority)?),
        _ => {
            if name != "default" {
                return Err(format!(
                    "metadata.name: a BaselineAdminNetworkPolicy must be named \"default\", not {name:?}"
                ));
            }
            (Tier::Baseline, 0)
        }
    };
    let subject = spec.subject.as_ref().ok_or("spec.subject: missing")?;
    let (namespaces, pods) = match (&subject.namespaces, &subject.pods) {
        (Some(ns), None) => (
            Selector::parse(ns, "spec.subject.namespaces")?,
            Selector::default(),
        ),
        (None, Some(p)) => (
            Selector::parse(&p.namespace_selector, "spec.subject.pods.namespaceSelector")?,
            Selector::parse(&p.pod_selector, "spec.subject.pods.podSelector")?,
        ),
        _ => return Err("spec.subject: exactly one of namespaces and pods must be set".into()),
    };
    let (max_rules, _, _) = limits(&kind);
    let mut out = ClusterPolicy {
        kind: kind.clone(),
        name,
        tier,
        priority,
        namespaces,
        pods,
        ingress: vec![],
        egress: vec![],
    };
    for (dir, rules) in [("ingress", &spec.ingress), ("egress", &spec.egress)] {
        let rules = rules.as_deref().unwrap_or_default();
        if rules.len() > max_rules {
            return Err(format!(
                "spec.{dir}: {} rules, at most {max_rules} are allowed",
                rules.len()
            ));
        }
        for (i, r) in rules.iter().enumerate() {
            let rule = parse_rule(&kind, tier, r, dir == "egress", &format!("spec.{dir}[{i}]"))?;
            if dir == "ingress" {
                out.ingress.push(rule);
            } else {
                out.egress.push(rule);
            }
        }
    }
    Ok(out)
}

fn priority(p: Option<i64>) -> Result<u32, String> {
    match p {
        Some(p) if (0..=1000).contains(&p) => Ok(p as u32),
        Some(p) => Err(format!("spec.priority: {p} is out of range (0-1000)")),
        None => Err("spec.priority: missing (0-1000)".into()),
    }
}

fn parse_rule(
    kind: &str,
    tier: Tier,
    r: &crd::Rule,
    egress: bool,
    f: &str,
) -> Result<ClusterRule, String> {
    let (_, max_peers, max_ports) = limits(kind);
    let name = r.name.clone().unwrap_or_default();
    if name.len() > 100 {
        return Err(format!("{f}.name: longer than 100 characters"));
    }
    let v1alpha1 = kind != "ClusterNetworkPolicy";
    let action = match (r.action.as_deref(), v1alpha1) {
        (Some("Accept"), false) | (Some("Allow"), true) => Action::Accept,
        (Some("Deny"), _) => Action::Deny,
        (Some("Pass"), _) if !(v1alpha1 && tier == Tier::Baseline) => Action::Pass,
        (Some(a), _) => {
            let known = match (v1alpha1, tier) {
                (false, _) => "Accept, Deny, Pass",
                (true, Tier::Admin) => "Allow, Deny, Pass",
                (true, Tier::Baseline) => "Allow, Deny",
            };
            return Err(format!("{f}.action: unknown action {a:?} ({known})"));
        }
        (None, _) => return Err(format!("{f}.action: missing")),
    };
    let (field, peers) = if egress {
        ("to", r.to.as_deref())
    } else {
        ("from", r.from.as_deref())
    };
    let peers = peers.unwrap_or_default();
    if peers.is_empty() || peers.len() > max_peers {
        return Err(format!("{f}.{field}: needs 1 to {max_peers} peers"));
    }
    let mut out_peers = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        let pf = format!("{f}.{field}[{i}]");
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
        if set != 1 {
            return Err(format!(
                "{pf}: exactly one of namespaces, pods, nodes, networks must be set"
            ));
        }
        if p.domain_names.is_some() {
            return Err(format!(
                "{pf}.domainNames: domain-name peers are experimental in the API and not supported"
            ));
        }
        if (p.nodes.is_some() || p.networks.is_some()) && !egress {
            return Err(format!(
                "{pf}: nodes and networks peers are for egress rules only"
            ));
        }
        if let Some(ns) = &p.namespaces {
            out_peers.push(Peer::Pods {
                namespaces: Some(Selector::parse(ns, &format!("{pf}.namespaces"))?),
                pods: Selector::default(),
            });
        }
        if let Some(pods) = &p.pods {
            out_peers.push(Peer::Pods {
                namespaces: Some(Selector::parse(
                    &pods.namespace_selector,
                    &format!("{pf}.pods.namespaceSelector"),
                )?),
                pods: Selector::parse(&pods.pod_selector, &format!("{pf}.pods.podSelector"))?,
            });
        }
        if let Some(nodes) = &p.nodes {
            out_peers.push(Peer::Nodes(Selector::parse(nodes, &format!("{pf}.nodes"))?));
        }
        if let Some(nets) = &p.networks {
            if nets.is_empty() || nets.len() > 25 {
                return Err(format!("{pf}.networks: needs 1 to 25 CIDRs"));
            }
            for (j, n) in nets.iter().enumerate() {
                let cidr = Cidr::parse(n).map_err(|e| format!("{pf}.networks[{j}]: {e}"))?;
                out_peers.push(Peer::Block {
                    cidr,
                    except: vec![],
                });
            }
        }
    }
    let ports = if v1alpha1 {
        parse_v1alpha1_ports(r.ports.as_deref(), max_ports, &format!("{f}.ports"))?
    } else {
        parse_protocols(r.protocols.as_deref(), max_ports, &format!("{f}.protocols"))?
    };
    let named = ports
        .iter()
        .flatten()
        .any(|p| matches!(p.port, Some(PortRef::Name(_))));
    if named
        && out_peers
            .iter()
            .any(|p| matches!(p, Peer::Block { .. } | Peer::Nodes(_)))
    {
        return Err(format!(
            "{f}: a named port cannot be used with networks or nodes peers (they have no named ports)"
        ));
    }
    Ok(ClusterRule {
        name,
        action,
        rule: Rule {
            peers: Some(out_peers),
            ports,
        },
    })
}

/// A named port matches a container port of that name whatever its protocol.
fn named(name: &str, f: &str) -> Result<Vec<PortSpec>, String> {
    validate_port_name(name).map_err(|e| format!("{f}: {e}"))?;
    Ok([proto::TCP, proto::UDP, proto::SCTP]
        .into_iter()
        .map(|protocol| PortSpec {
            protocol,
            port: Some(PortRef::Name(name.to_string())),
            end_port: None,
        })
        .collect())
}

fn port_number(n: i64, f: &str) -> Result<u16, String> {
    if (1..=65535).contains(&n) {
        Ok(n as u16)
    } else {
        Err(format!("{f}: {n} is not a port number (1-65535)"))
    }
}

fn range(start: Option<i64>, end: Option<i64>, f: &str) -> Result<(u16, u16), String> {
    let start = port_number(
        start.ok_or(format!("{f}.start: missing"))?,
        &format!("{f}.start"),
    )?;
    let end = port_number(end.ok_or(format!("{f}.end: missing"))?, &format!("{f}.end"))?;
    if start >= end {
        return Err(format!("{f}: start {start} must be less than end {end}"));
    }
    Ok((start, end))
}

fn protocol(p: Option<&str>, f: &str) -> Result<u8, String> {
    let p = p.unwrap_or("TCP");
    parse_protocol(p).ok_or_else(|| format!("{f}: unknown protocol {p:?} (TCP, UDP, SCTP)"))
}

fn parse_v1alpha1_ports(
    ports: Option<&[crd::V1alpha1Port]>,
    max: usize,
    field: &str,
) -> Result<Option<Vec<PortSpec>>, String> {
    let Some(ports) = ports else { return Ok(None) };
    if ports.is_empty() || ports.len() > max {
        return Err(format!("{field}: needs 1 to {max} items"));
    }
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let f = format!("{field}[{i}]");
        match (&p.port_number, &p.named_port, &p.port_range) {
            (Some(n), None, None) => {
                let number = match &n.port {
                    Some(IntOrString::Int(n)) => {
                        port_number(*n as i64, &format!("{f}.portNumber.port"))?
                    }
                    _ => return Err(format!("{f}.portNumber.port: a number is required")),
                };
                out.push(PortSpec {
                    protocol: protocol(n.protocol.as_deref(), &format!("{f}.portNumber.protocol"))?,
                    port: Some(PortRef::Number(number)),
                    end_port: None,
                });
            }
            (None, Some(name), None) => out.extend(named(name, &format!("{f}.namedPort"))?),
            (None, None, Some(r)) => {
                let (start, end) = range(r.start, r.end, &format!("{f}.portRange"))?;
                out.push(PortSpec {
                    protocol: protocol(r.protocol.as_deref(), &format!("{f}.portRange.protocol"))?,
                    port: Some(PortRef::Number(start)),
                    end_port: Some(end),
                });
            }
            _ => {
                return Err(format!(
                    "{f}: exactly one of portNumber, namedPort, portRange must be set"
                ))
            }
        }
    }
    Ok(Some(out))
}

fn parse_protocols(
    protocols: Option<&[crd::Protocol]>,
    max: usize,
    field: &str,
) -> Result<Option<Vec<PortSpec>>, String> {
    let Some(protocols) = protocols else {
        return Ok(None);
    };
    if protocols.is_empty() || protocols.len() > max {
        return Err(format!("{field}: needs 1 to {max} items"));
    }
    let mut out = Vec::new();
    for (i, p) in protocols.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let set = [
            p.tcp.is_some(),
            p.udp.is_some(),
            p.sctp.is_some(),
            p.destination_named_port.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if set != 1 {
            return Err(format!(
                "{f}: exactly one of tcp, udp, sctp, destinationNamedPort must be set"
            ));
        }
        if let Some(name) = &p.destination_named_port {
            out.extend(named(name, &format!("{f}.destinationNamedPort"))?);
            continue;
        }
        let (proto_num, proto_name, pp) = if let Some(x) = &p.tcp {
            (proto::TCP, "tcp", x)
        } else if let Some(x) = &p.udp {
            (proto::UDP, "udp", x)
        } else {
            (proto::SCTP, "sctp", p.sctp.as_ref().expect("one is set"))
        };
        let pf = format!("{f}.{proto_name}.destinationPort");
        let (port, end_port) = match &pp.destination_port {
            None => (None, None),
            Some(dp) => match (dp.number, &dp.range) {
                (Some(n), None) => (
                    Some(PortRef::Number(port_number(n, &format!("{pf}.number"))?)),
                    None,
                ),
                (None, Some(r)) => {
                    let (s, e) = range(r.start, r.end, &format!("{pf}.range"))?;
                    (Some(PortRef::Number(s)), Some(e))
                }
                _ => return Err(format!("{pf}: exactly one of number and range must be set")),
            },
        };
        out.push(PortSpec {
            protocol: proto_num,
            port,
            end_port,
        });
    }
    Ok(Some(out))
}

/// Pairs of policies in one tier at one priority whose rules take different actions:
/// the API leaves their relative order undefined, so they are reported.
pub fn conflicts(
    policies: &std::collections::BTreeMap<String, std::sync::Arc<ClusterPolicy>>,
) -> Vec<String> {
    conflicting(policies)
        .into_iter()
        .map(|(first, second)| {
            format!(
                "{} and {} share priority {} in the {:?} tier with different actions; \
                 the API leaves their order undefined, netpol evaluates {} first (by name)",
                first.key(),
                second.key(),
                first.priority,
                first.tier,
                first.key()
            )
        })
        .collect()
}

/// The pairs behind [`conflicts`], each as (evaluated first, evaluated second).
pub fn conflicting(
    policies: &std::collections::BTreeMap<String, std::sync::Arc<ClusterPolicy>>,
) -> Vec<(&ClusterPolicy, &ClusterPolicy)> {
    let all: Vec<&ClusterPolicy> = policies.values().map(|p| p.as_ref()).collect();
    let actions = |p: &ClusterPolicy| -> Vec<Action> {
        p.ingress
            .iter()
            .chain(&p.egress)
            .map(|r| r.action)
            .collect()
    };
    let mut out = Vec::new();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            if a.tier != b.tier || a.priority != b.priority {
                continue;
            }
            let (aa, ba) = (actions(a), actions(b));
            if aa.iter().any(|x| ba.iter().any(|y| x != y)) {
                out.push(if a.order() <= b.order() {
                    (*a, *b)
                } else {
                    (*b, *a)
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_yaml(yaml: &str) -> Result<ClusterPolicy, String> {
        let obj: ClusterPolicyObject = serde_yaml::from_str(yaml).unwrap();
        parse(&obj)
    }

    #[test]
    fn both_generations_map_onto_one_model() {
        let v2 = parse_yaml(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: a}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {namespaces: {matchLabels: {team: x}}}\n  ingress: [{action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {range: {start: 80, end: 90}}}}]}]\n",
        )
        .unwrap();
        let v1 = parse_yaml(
            "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {name: a}\nspec:\n  priority: 10\n  subject: {namespaces: {matchLabels: {team: x}}}\n  ingress: [{action: Deny, from: [{namespaces: {}}], ports: [{portRange: {protocol: TCP, start: 80, end: 90}}]}]\n",
        )
        .unwrap();
        assert_eq!(v1.ingress, v2.ingress);
        assert_eq!((v1.tier, v1.priority), (Tier::Admin, 10));
    }

    #[test]
    fn invalid_objects_name_the_field() {
        let cases = [
            ("kind: ClusterNetworkPolicy\nmetadata: {name: a}\nspec: {tier: Admin, priority: 1001, subject: {namespaces: {}}}", "spec.priority"),
            ("kind: ClusterNetworkPolicy\nmetadata: {name: a}\nspec: {tier: Middle, priority: 1, subject: {namespaces: {}}}", "spec.tier"),
            ("kind: AdminNetworkPolicy\nmetadata: {name: a}\nspec: {priority: 1, subject: {namespaces: {}}, ingress: [{action: Accept, from: [{namespaces: {}}]}]}", "spec.ingress[0].action"),
            ("kind: BaselineAdminNetworkPolicy\nmetadata: {name: other}\nspec: {subject: {namespaces: {}}}", "metadata.name"),
            ("kind: BaselineAdminNetworkPolicy\nmetadata: {name: default}\nspec: {subject: {namespaces: {}}, egress: [{action: Pass, to: [{namespaces: {}}]}]}", "spec.egress[0].action"),
            ("kind: ClusterNetworkPolicy\nmetadata: {name: a}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}, egress: [{action: Accept, to: [{domainNames: [example.com]}]}]}", "spec.egress[0].to[0].domainNames"),
            ("kind: ClusterNetworkPolicy\nmetadata: {name: a}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}, egress: [{action: Accept, to: []}]}", "spec.egress[0].to"),
            ("kind: ClusterNetworkPolicy\nmetadata: {name: a}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}, pods: {podSelector: {}}}}", "spec.subject"),
            ("kind: ClusterNetworkPolicy\nmetadata: {name: a}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}, egress: [{action: Deny, to: [{networks: [10.0.0.0/33]}]}]}", "spec.egress[0].to[0].networks[0]"),
            ("kind: ClusterNetworkPolicy\nmetadata: {name: a}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}, egress: [{action: Deny, to: [{networks: [10.0.0.0/8]}], protocols: [{destinationNamedPort: http}]}]}", "spec.egress[0]"),
            ("kind: ClusterNetworkPolicy\nmetadata: {name: a}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}, ingress: [{action: Deny, from: [{namespaces: {}}], protocols: [{udp: {destinationPort: {range: {start: 90, end: 80}}}}]}]}", "spec.ingress[0].protocols[0].udp.destinationPort.range"),
        ];
        for (yaml, field) in cases {
            let e = parse_yaml(yaml).unwrap_err();
            assert!(e.starts_with(field), "{yaml}: {e}");
        }
        let many: Vec<String> = (0..26)
            .map(|_| "{action: Deny, to: [{namespaces: {}}]}".to_string())
            .collect();
        let e = parse_yaml(&format!(
            "kind: ClusterNetworkPolicy\nmetadata: {{name: a}}\nspec: {{tier: Admin, priority: 1, subject: {{namespaces: {{}}}}, egress: [{}]}}",
            many.join(", ")
        ))
        .unwrap_err();
        assert!(e.starts_with("spec.egress: 26 rules"), "{e}");
    }
}

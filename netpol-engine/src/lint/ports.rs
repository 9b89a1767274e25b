//! Named ports that no destination pod defines.

use std::collections::BTreeSet;

use super::snippet::*;
use super::*;
use crate::hints;
use crate::index::net::addr_of;
use crate::index::policy::protocol_name;
use crate::index::{Peer, Policy, PortRef, Rule};

impl<'a> Checker<'a> {
    /// Named ports that no destination pod defines on the rule's protocol.
    pub(super) fn named_ports(&mut self, object: &str, p: &Policy, dir: u8, i: usize, rule: &Rule) {
        if !self.has_pods {
            return;
        }
        // The pods a named port resolves on: the subjects for ingress, the peers for egress.
        let targets: Vec<&PodInfo> = if dir == direction::INGRESS {
            self.pods()
                .filter(|x| x.namespace == p.namespace && p.pod_selector.matches(&x.labels))
                .collect()
        } else {
            self.pods()
                .filter(|x| match &rule.peers {
                    None => true,
                    Some(peers) => peers.iter().any(|peer| match peer {
                        Peer::Pods { namespaces, pods } => {
                            let ns_ok = match namespaces {
                                Some(sel) => self
                                    .model
                                    .snap
                                    .namespaces
                                    .get(&x.namespace)
                                    .is_some_and(|l| sel.matches(l)),
                                None => x.namespace == p.namespace,
                            };
                            ns_ok && pods.matches(&x.labels)
                        }
                        Peer::Block { cidr, except } => x.ips.iter().any(|ip| {
                            let a = addr_of(*ip);
                            cidr.contains_addr(&a) && !except.iter().any(|e| e.contains_addr(&a))
                        }),
                        Peer::Nodes(_) => false,
                    }),
                })
                .collect()
        };
        if targets.is_empty() {
            return;
        }
        for (k, spec) in rule.ports.iter().flatten().enumerate() {
            let Some(PortRef::Name(name)) = &spec.port else {
                continue;
            };
            let on_protocol = |t: &PodInfo| {
                t.named_ports
                    .get(name)
                    .is_some_and(|v| v.iter().any(|(pr, _)| *pr == spec.protocol))
            };
            if targets.iter().any(|t| on_protocol(t)) {
                continue;
            }
            let field = format!("spec.{}[{i}].ports[{k}]", dir_name(dir));
            let whose = if dir == direction::INGRESS {
                "the pods it selects"
            } else {
                "the pods it allows"
            };
            let other_protocol = targets.iter().find_map(|t| {
                t.named_ports
                    .get(name)
                    .and_then(|v| v.first())
                    .map(|(pr, _)| *pr)
            });
            let defined: BTreeSet<&String> =
                targets.iter().flat_map(|t| t.named_ports.keys()).collect();
            let near = defined.iter().find(|d| hints::near(name, d));
            let (message, fix) = match (other_protocol, near) {
                (Some(pr), _) => (
                    format!(
                        "names port {name:?} on {}, but {whose} define it on {} only: the rule allows nothing",
                        protocol_name(spec.protocol),
                        protocol_name(pr)
                    ),
                    map(vec![("port", s(name)), ("protocol", s(protocol_name(pr)))]),
                ),
                (None, Some(d)) => (
                    format!("names port {name:?}, which none of {whose} defines; did you mean {d:?}?"),
                    map(vec![("port", s(d)), ("protocol", s(protocol_name(spec.protocol)))]),
                ),
                (None, None) => (
                    format!(
                        "names port {name:?}, which none of {whose} defines (their named ports: {}): the rule allows nothing",
                        if defined.is_empty() {
                            "none".to_string()
                        } else {
                            some(&defined.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                        }
                    ),
                    map(vec![("port", s("<a port the pods define>")), ("protocol", s(protocol_name(spec.protocol)))]),
                ),
            };
            self.push(
                "named-port-undefined",
                object,
                &field,
                message,
                snippet("", &fix),
            );
        }
    }
}

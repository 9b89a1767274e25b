//! NetworkPolicy fragments the API server rejects, class by class, next to the near
//! misses it accepts. The differential test puts them into its random policies, so the
//! index and the reference must reject the same policies and still agree on the rest.
//!
//! Each class follows the API server's validation of `networking.k8s.io/v1`
//! NetworkPolicy and of label selectors; a near miss sits just inside the rule.

use proptest::prelude::*;

/// Where a fragment goes in a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// A label selector: the policy's podSelector or a peer's pod or namespace selector.
    Selector,
    /// The body of a peer's ipBlock.
    Block,
    /// A whole peer.
    Peer,
    /// One entry of a rule's ports.
    Port,
    /// The policyTypes list.
    Types,
}

#[derive(Clone, Copy, Debug)]
pub struct Fragment {
    pub class: &'static str,
    pub place: Place,
    pub yaml: &'static str,
    /// Whether the API server accepts it (the near misses).
    pub valid: bool,
}

const fn bad(class: &'static str, place: Place, yaml: &'static str) -> Fragment {
    Fragment {
        class,
        place,
        yaml,
        valid: false,
    }
}

const fn good(class: &'static str, place: Place, yaml: &'static str) -> Fragment {
    Fragment {
        class,
        place,
        yaml,
        valid: true,
    }
}

use Place::{Block, Peer, Port, Selector, Types};

pub const FRAGMENTS: &[Fragment] = &[
    // ipBlock.except: a CIDR of the cidr's family, strictly inside it.
    bad(
        "except-outside",
        Block,
        "{cidr: 10.0.0.0/24, except: [10.0.1.0/28]}",
    ),
    bad(
        "except-outside",
        Block,
        "{cidr: 10.0.0.0/24, except: [10.0.0.128/25, 192.168.0.0/24]}",
    ),
    bad(
        "except-not-strict",
        Block,
        "{cidr: 10.0.0.0/24, except: [10.0.0.0/24]}",
    ),
    bad(
        "except-not-strict",
        Block,
        "{cidr: 10.0.0.0/24, except: [10.0.0.0/16]}",
    ),
    bad(
        "except-other-family",
        Block,
        "{cidr: 10.0.0.0/24, except: [\"fd00::/64\"]}",
    ),
    bad(
        "except-other-family",
        Block,
        "{cidr: \"fd00::/64\", except: [10.0.0.0/28]}",
    ),
    bad(
        "except-other-family",
        Block,
        "{cidr: 0.0.0.0/0, except: [\"::/1\"]}",
    ),
    bad(
        "except-unparsable",
        Block,
        "{cidr: 10.0.0.0/24, except: [10.0.0.300/32]}",
    ),
    bad(
        "except-unparsable",
        Block,
        "{cidr: 10.0.0.0/24, except: [nope]}",
    ),
    bad(
        "except-unparsable",
        Block,
        "{cidr: 10.0.0.0/24, except: [10.0.0.16]}",
    ),
    bad(
        "except-unparsable",
        Block,
        "{cidr: 10.0.0.0/24, except: [10.0.0.16/33]}",
    ),
    bad(
        "except-unparsable",
        Block,
        "{cidr: 10.0.0.0/24, except: [\"\"]}",
    ),
    good(
        "except-inside",
        Block,
        "{cidr: 10.0.0.0/24, except: [10.0.0.0/25]}",
    ),
    good(
        "except-inside",
        Block,
        "{cidr: 10.0.0.0/24, except: [10.0.0.10/32, 10.0.0.12/31]}",
    ),
    good(
        "except-inside",
        Block,
        "{cidr: \"fd00::/64\", except: [\"fd00::10/127\"]}",
    ),
    good(
        "except-inside",
        Block,
        "{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}",
    ),
    good("except-inside", Block, "{cidr: 10.0.0.0/24, except: []}"),
    // Host bits are allowed on both: the network is meant.
    good(
        "except-host-bits",
        Block,
        "{cidr: 10.0.0.13/30, except: [10.0.0.13/31]}",
    ),
    // ipBlock.cidr: an address, "/" and a prefix length in decimal digits.
    bad("cidr-bad", Block, "{cidr: 10.0.0.0/33}"),
    bad("cidr-bad", Block, "{cidr: 10.0.0.0}"),
    bad("cidr-bad", Block, "{cidr: 10.0.0/24}"),
    bad("cidr-bad", Block, "{cidr: 256.0.0.0/8}"),
    bad("cidr-bad", Block, "{cidr: \"fd00::/129\"}"),
    bad("cidr-bad", Block, "{cidr: \"fd00::1%eth0/128\"}"),
    bad("cidr-bad", Block, "{cidr: \"\"}"),
    bad("cidr-bad", Block, "{cidr: 10.0.0.0/-1}"),
    bad("cidr-bad", Block, "{cidr: \"10.0.0.0/ 8\"}"),
    bad("cidr-bad", Block, "{cidr: nope}"),
    good("cidr-edge", Block, "{cidr: 10.0.0.0/08}"),
    good("cidr-edge", Block, "{cidr: 10.0.0.13/32}"),
    good("cidr-edge", Block, "{cidr: \"::/0\"}"),
    // A peer is exactly one of ipBlock or (podSelector and/or namespaceSelector).
    bad("peer-empty", Peer, "{}"),
    bad(
        "peer-block-and-selector",
        Peer,
        "{ipBlock: {cidr: 10.0.0.0/24}, podSelector: {}}",
    ),
    bad(
        "peer-block-and-selector",
        Peer,
        "{ipBlock: {cidr: 10.0.0.0/24}, namespaceSelector: {}}",
    ),
    // endPort: only with a numeric port, at least that port, at most 65535.
    bad("endport-below-port", Port, "{port: 80, endPort: 79}"),
    bad("endport-named-port", Port, "{port: http, endPort: 90}"),
    bad("endport-without-port", Port, "{endPort: 90}"),
    bad("endport-without-port", Port, "{protocol: UDP, endPort: 53}"),
    bad("endport-out-of-range", Port, "{port: 80, endPort: 65536}"),
    good("endport-edge", Port, "{port: 80, endPort: 80}"),
    good("endport-edge", Port, "{port: 1, endPort: 65535}"),
    // protocol: TCP, UDP or SCTP, case-sensitive.
    bad("protocol-unknown", Port, "{protocol: ICMP}"),
    bad("protocol-unknown", Port, "{protocol: tcp, port: 80}"),
    bad("protocol-unknown", Port, "{protocol: Udp}"),
    bad("protocol-unknown", Port, "{protocol: ICMPv6}"),
    bad("protocol-unknown", Port, "{protocol: \"\"}"),
    // port: a number 1-65535, or an IANA service name.
    bad("port-out-of-range", Port, "{port: 0}"),
    bad("port-out-of-range", Port, "{port: 65536}"),
    bad("port-out-of-range", Port, "{port: -1}"),
    bad("port-out-of-range", Port, "{protocol: UDP, port: 70000}"),
    good("port-edge", Port, "{port: 1}"),
    good("port-edge", Port, "{protocol: SCTP, port: 65535}"),
    bad("port-name-bad", Port, "{port: \"80\"}"),
    bad("port-name-bad", Port, "{port: HTTP}"),
    bad("port-name-bad", Port, "{port: a--b}"),
    bad("port-name-bad", Port, "{port: -http}"),
    bad("port-name-bad", Port, "{port: sixteen-chars-xx}"),
    bad("port-name-bad", Port, "{port: \"\"}"),
    good("port-name-edge", Port, "{port: web-8080}"),
    good(
        "port-name-edge",
        Port,
        "{protocol: UDP, port: fifteen-chars-x}",
    ),
    // matchExpressions: In/NotIn need values, Exists/DoesNotExist take none.
    bad(
        "selector-in-empty",
        Selector,
        "{matchExpressions: [{key: app, operator: In, values: []}]}",
    ),
    bad(
        "selector-in-empty",
        Selector,
        "{matchExpressions: [{key: app, operator: In}]}",
    ),
    bad(
        "selector-in-empty",
        Selector,
        "{matchExpressions: [{key: app, operator: NotIn, values: []}]}",
    ),
    bad(
        "selector-exists-values",
        Selector,
        "{matchExpressions: [{key: app, operator: Exists, values: [a]}]}",
    ),
    bad(
        "selector-exists-values",
        Selector,
        "{matchExpressions: [{key: app, operator: DoesNotExist, values: [a]}]}",
    ),
    good(
        "selector-exists-values",
        Selector,
        "{matchExpressions: [{key: app, operator: Exists, values: []}]}",
    ),
    bad(
        "selector-operator-unknown",
        Selector,
        "{matchExpressions: [{key: app, operator: Equals, values: [a]}]}",
    ),
    bad(
        "selector-operator-unknown",
        Selector,
        "{matchExpressions: [{key: app, operator: in, values: [a]}]}",
    ),
    bad(
        "selector-operator-unknown",
        Selector,
        "{matchExpressions: [{key: app, operator: \"\"}]}",
    ),
    // Keys: [prefix/]name, the prefix a DNS subdomain, the name at most 63 characters
    // of alphanumerics, '-', '_' and '.', alphanumeric at both ends.
    bad("label-key-bad", Selector, "{matchLabels: {\"bad key\": a}}"),
    bad("label-key-bad", Selector, "{matchLabels: {a/b/c: a}}"),
    bad("label-key-bad", Selector, "{matchLabels: {/app: a}}"),
    bad(
        "label-key-bad",
        Selector,
        "{matchLabels: {Example.com/app: a}}",
    ),
    bad("label-key-bad", Selector, "{matchLabels: {-app: a}}"),
    bad("label-key-bad", Selector, "{matchLabels: {\"\": a}}"),
    bad(
        "label-key-bad",
        Selector,
        "{matchLabels: {aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa: a}}",
    ),
    bad(
        "label-key-bad",
        Selector,
        "{matchExpressions: [{key: app!, operator: Exists}]}",
    ),
    bad(
        "label-key-bad",
        Selector,
        "{matchExpressions: [{key: \"\", operator: DoesNotExist}]}",
    ),
    good(
        "label-key-edge",
        Selector,
        "{matchLabels: {example.com/app: a}}",
    ),
    good("label-key-edge", Selector, "{matchLabels: {A_b.c-D: a}}"),
    good(
        "label-key-edge",
        Selector,
        "{matchLabels: {aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa: a}}",
    ),
    good(
        "label-key-edge",
        Selector,
        "{matchExpressions: [{key: app.kubernetes.io/name, operator: Exists}]}",
    ),
    // Values: empty, or at most 63 characters, alphanumeric at both ends.
    bad("label-value-bad", Selector, "{matchLabels: {app: -a}}"),
    bad("label-value-bad", Selector, "{matchLabels: {app: \"a b\"}}"),
    bad("label-value-bad", Selector, "{matchLabels: {app: a/b}}"),
    bad(
        "label-value-bad",
        Selector,
        "{matchLabels: {app: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa}}",
    ),
    bad(
        "label-value-bad",
        Selector,
        "{matchExpressions: [{key: app, operator: In, values: [a, b!]}]}",
    ),
    bad(
        "label-value-bad",
        Selector,
        "{matchExpressions: [{key: app, operator: NotIn, values: [x-]}]}",
    ),
    good("label-value-edge", Selector, "{matchLabels: {app: \"\"}}"),
    good(
        "label-value-edge",
        Selector,
        "{matchLabels: {app: A.b_c-9}}",
    ),
    good(
        "label-value-edge",
        Selector,
        "{matchLabels: {app: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa}}",
    ),
    good(
        "label-value-edge",
        Selector,
        "{matchExpressions: [{key: app, operator: In, values: [\"\", a]}]}",
    ),
    // policyTypes: Ingress and Egress, at most two entries.
    bad("policy-types-unknown", Types, "[Sideways]"),
    bad("policy-types-unknown", Types, "[ingress]"),
    bad("policy-types-unknown", Types, "[Ingress, egress]"),
    bad("policy-types-too-many", Types, "[Ingress, Egress, Ingress]"),
    good("policy-types-edge", Types, "[Ingress, Ingress]"),
    good("policy-types-edge", Types, "[Egress, Ingress]"),
];

/// The spots a fragment of `place` can take in a policy: 0 and 1 for every place,
/// and for a selector also 2 (see `Policy::carry`).
pub fn spots(place: Place) -> u8 {
    match place {
        Selector => 3,
        Types => 1,
        Block | Peer | Port => 2,
    }
}

/// A fragment and its spot, for the random policies.
pub fn fragment() -> impl Strategy<Value = (Fragment, u8)> {
    proptest::sample::select(FRAGMENTS).prop_flat_map(|f| (Just(f), 0..spots(f.place)))
}

/// A NetworkPolicy's parts, as YAML flow text, before it is written out.
pub struct Policy {
    pub pod_selector: String,
    /// Empty: no policyTypes field.
    pub types: String,
    pub ingress: Option<Vec<String>>,
    pub egress: Option<Vec<String>>,
}

impl Policy {
    /// Puts `f` at `spot`: a selector as the podSelector (0), an ingress peer's
    /// podSelector (1) or an egress peer's namespaceSelector (2); a block, peer or port
    /// in a rule of its own, ingress (0) or egress (1); policyTypes replaced.
    pub fn carry(&mut self, f: &Fragment, spot: u8) {
        let ingress = match f.place {
            Selector => spot == 1,
            _ => spot == 0,
        };
        let peers = if ingress { "from" } else { "to" };
        let rule = match (f.place, spot) {
            (Selector, 0) => {
                self.pod_selector = f.yaml.into();
                return;
            }
            (Types, _) => {
                self.types = f.yaml.into();
                return;
            }
            (Selector, 1) => format!("{{from: [{{podSelector: {}}}]}}", f.yaml),
            (Selector, _) => format!("{{to: [{{namespaceSelector: {}}}]}}", f.yaml),
            (Block, _) => format!("{{{peers}: [{{ipBlock: {}}}]}}", f.yaml),
            (Peer, _) => format!("{{{peers}: [{}]}}", f.yaml),
            (Port, _) => format!("{{ports: [{}]}}", f.yaml),
        };
        let rules = if ingress {
            &mut self.ingress
        } else {
            &mut self.egress
        };
        rules.get_or_insert_with(Vec::new).push(rule);
    }

    /// The NetworkPolicy `name` in `namespace`; `class` (the fragment carried, if
    /// any) becomes an annotation, so a failing case says what it tests.
    pub fn yaml(&self, namespace: &str, name: &str, class: Option<&str>) -> String {
        let mut f = vec![format!("podSelector: {}", self.pod_selector)];
        if !self.types.is_empty() {
            f.push(format!("policyTypes: {}", self.types));
        }
        if let Some(r) = &self.ingress {
            f.push(format!("ingress: [{}]", r.join(", ")));
        }
        if let Some(r) = &self.egress {
            f.push(format!("egress: [{}]", r.join(", ")));
        }
        let annotations = class
            .map(|c| format!(", annotations: {{{CLASS_ANNOTATION}: {c}}}"))
            .unwrap_or_default();
        format!(
            "kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {{name: {name}, namespace: {namespace}{annotations}}}\nspec: {{{}}}\n",
            f.join(", ")
        )
    }
}

/// The annotation naming the fragment class a generated policy carries.
pub const CLASS_ANNOTATION: &str = "test.netpol.io/fragment";

/// Where a parser of CIDR text easily parts from the API server's: a signed prefix
/// length (refused there) and IPv4 octets with leading zeros (accepted there, read as
/// decimal). `netpol_engine::index::net` once did the opposite on both.
pub const DIVERGENCES: &[Fragment] = &[
    bad("cidr-bad", Block, "{cidr: 10.0.0.0/+8}"),
    bad(
        "except-unparsable",
        Block,
        "{cidr: 10.0.0.0/8, except: [10.0.0.0/+16]}",
    ),
    good("cidr-edge", Block, "{cidr: 010.0.0.0/8}"),
    good(
        "except-inside",
        Block,
        "{cidr: 10.0.0.0/8, except: [010.0.0.0/16]}",
    ),
];

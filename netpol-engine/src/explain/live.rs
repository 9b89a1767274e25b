//! What live explain found on the agent's node: its pinned maps' identities, the entries
//! hit and the flow's conntrack state (filled in by the agent's `explain_live`).

use serde::{Deserialize, Serialize};

/// The live maps of the node that answered.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Live {
    pub node: String,
    /// `NP_CONFIG`: the node's map epoch (part of every conntrack stamp) and switches.
    pub epoch: u32,
    pub config: Vec<String>,
    /// The sender's side, when it is an endpoint of this node.
    pub egress: Option<LiveSide>,
    /// The receiver's side, when it is an endpoint of this node.
    pub ingress: Option<LiveSide>,
    /// `NP_CONNTRACK` entries of this pair and port, either way round.
    pub conntrack: Vec<Connection>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveSide {
    /// The host veth's ifindex: the `NP_ENDPOINTS` key.
    pub ifindex: u32,
    /// The entry found there: the id its policy keys carry, its revision and flags.
    pub endpoint: u32,
    pub revision: u32,
    pub flags: Vec<String>,
    /// The peer's identity in `NP_IPCACHE` (world without an entry) and what it is;
    /// none when the classifier did not look (traffic from the node).
    pub peer_identity: Option<u32>,
    pub peer: Option<String>,
    /// The peer's identity in `NP_CIDRS`, when it is in an ipBlock boundary.
    pub cidr_identity: Option<u32>,
    /// Every `NP_POLICY` entry the lookups hit, in the order the classifier makes them.
    pub entries: Vec<Hit>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hit {
    /// Admin, NetworkPolicy or Baseline.
    pub tier: String,
    /// The identity looked up: the peer's, its ipBlock set's, or 0 (any peer).
    pub identity: u32,
    pub action: String,
    pub precedence: u16,
    pub cookie: u32,
    pub rule: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Connection {
    /// The originator's tuple (the key), `address:port` each.
    pub src: String,
    pub dst: String,
    pub flags: Vec<String>,
    pub idle_seconds: f64,
    /// Whether the recorded egress check is stamped with the originator's current
    /// revision and the node's epoch (a stale stamp: the next packet is judged again).
    /// None: no egress check recorded, or the originator is not on this node.
    pub egress_current: Option<bool>,
    pub ingress_current: Option<bool>,
}

impl Live {
    pub fn human(&self) -> String {
        let live = self;
        let mut out = String::new();
        out.push_str(&format!(
            "  live maps of {} (epoch {}{}):\n",
            live.node,
            live.epoch,
            live.config
                .iter()
                .map(|c| format!(", {c}"))
                .collect::<String>()
        ));
        for (name, s) in [("egress", &live.egress), ("ingress", &live.ingress)] {
            let Some(s) = s else {
                out.push_str(&format!("    {name}: not an endpoint of this node\n"));
                continue;
            };
            out.push_str(&format!(
                "    {name}: ifindex {}, endpoint {} revision {} [{}]",
                s.ifindex,
                s.endpoint,
                s.revision,
                s.flags.join(" ")
            ));
            if let (Some(id), Some(peer)) = (s.peer_identity, &s.peer) {
                out.push_str(&format!("; peer identity {id}: {peer}"));
            }
            if let Some(c) = s.cidr_identity {
                out.push_str(&format!("; ipBlock identity {c}"));
            }
            out.push('\n');
            for e in &s.entries {
                out.push_str(&format!(
                    "      hit {} identity {}: {} precedence {} cookie {:#x} {}\n",
                    e.tier,
                    e.identity,
                    e.action,
                    e.precedence,
                    e.cookie,
                    e.rule.as_deref().unwrap_or("(unnamed)")
                ));
            }
        }
        if live.conntrack.is_empty() {
            out.push_str("    conntrack: no connection\n");
        }
        for c in &live.conntrack {
            let stamp = |what: &str, s: Option<bool>| match s {
                Some(true) => format!(", {what} check current"),
                Some(false) => {
                    format!(", {what} check stale (judged again at the next packet)")
                }
                None => String::new(),
            };
            out.push_str(&format!(
                "    conntrack: {} → {} [{}], idle {:.1}s{}{}\n",
                c.src,
                c.dst,
                c.flags.join(" "),
                c.idle_seconds,
                stamp("egress", c.egress_current),
                stamp("ingress", c.ingress_current)
            ));
        }
        out
    }
}

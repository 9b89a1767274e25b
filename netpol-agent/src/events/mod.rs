//! Verdict records from the ring buffer, named: pods and namespaces on both sides, the
//! policies that isolate the dropping pod, the rule that decided.
//!
//! source ──► index ──► compile ──► datapath ──► **events**

use std::collections::BTreeMap;
use std::net::IpAddr;

use netpol_common::codes::{self, Direction, Protocol, Reason};
use netpol_common::{direction, EndpointCounters, Event};
use serde::{Deserialize, Serialize};

use crate::datapath::tally::Reading;
use netpol_engine::compile::{selecting, Desired, RuleRef};
use netpol_engine::index::net::ip_of;
use netpol_engine::index::Snapshot;

/// An event as operators read it (`netpol observe -o json`: one per line).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Verdict {
    pub time: String,
    pub verdict: codes::Verdict,
    pub direction: Direction,
    pub reason: Reason,
    pub protocol: String,
    pub src: String,
    pub dst: String,
    pub src_ip: String,
    pub dst_ip: String,
    pub sport: u16,
    pub dport: u16,
    /// The pod whose policy was judged (`namespace/name`).
    pub pod: String,
    /// For a drop, every policy responsible: the cluster policy whose rule denied it
    /// (reasons ADMIN_DENIED, BASELINE_DENIED), then the NetworkPolicies that isolate
    /// `pod` in `direction` (a default deny included).
    pub policies: Vec<String>,
    /// The rule that decided, when one did (for an allow: the rule that allowed it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleRef>,
    pub tcp_flags: u8,
    pub len: u32,
    pub revision: u32,
    /// The tier that decided, when policy did: Admin, NetworkPolicy or Baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Events of this pod the kernel's rate limiter suppressed just before this one
    /// ("N more like this"); never lost silently.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub suppressed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How many events of the same endpoint the kernel's token bucket refused before `ev`
/// (node-wide they are `event_counter::RATE_LIMITED`, streamed to observers as
/// `rate_limited`).
fn suppressed_before(ev: &Event) -> u64 {
    ev.suppressed as u64
}

/// What naming needs, rebuilt with every snapshot.
#[derive(Default)]
pub struct Namer {
    by_ip: BTreeMap<IpAddr, String>,
    by_identity: BTreeMap<u32, String>,
    rules: BTreeMap<u32, RuleRef>,
    /// Endpoint identity → (ingress isolators, egress isolators).
    isolators: BTreeMap<u32, [Vec<String>; 2]>,
}

impl Namer {
    pub fn new(snap: &Snapshot, desired: &Desired) -> Namer {
        let mut n = Namer {
            rules: desired.rules.clone(),
            ..Default::default()
        };
        for pod in snap.pods.values() {
            for ip in &pod.ips {
                n.by_ip.entry(*ip).or_insert_with(|| pod.key());
            }
        }
        for ep in desired.endpoints.values() {
            let Some(subject) = snap.identities.get(&ep.identity) else {
                continue;
            };
            // Enforced policies isolate; staged (audit) ones only where none does.
            let mut lists: [Vec<String>; 2] = Default::default();
            let mut staged: [Vec<String>; 2] = Default::default();
            for (key, p) in selecting(snap, subject) {
                let to = if p.audit { &mut staged } else { &mut lists };
                let name = if p.audit {
                    format!("{key} (audit)")
                } else {
                    key.clone()
                };
                if p.isolates_ingress {
                    to[direction::INGRESS as usize].push(name.clone());
                }
                if p.isolates_egress {
                    to[direction::EGRESS as usize].push(name);
                }
            }
            for (l, s) in lists.iter_mut().zip(staged) {
                if l.is_empty() {
                    *l = s;
                }
            }
            n.isolators.insert(ep.identity, lists);
        }
        for (pod_key, ep) in &desired.endpoints {
            n.by_identity
                .entry(ep.id)
                .or_insert_with(|| pod_key.clone());
        }
        n
    }

    /// Names an event; fails on a code this build does not know (a classifier of
    /// another build), rather than guessing a neighbouring name.
    pub fn name(&self, ev: &Event, wall_offset_ns: i128) -> Result<Verdict, Undecodable> {
        let undecodable = |field, code| Undecodable { field, code };
        let verdict = codes::Verdict::from_code(ev.verdict)
            .ok_or(undecodable("verdict", ev.verdict.into()))?;
        let direction = Direction::from_code(ev.direction)
            .ok_or(undecodable("direction", ev.direction.into()))?;
        let reason = Reason::from_code(ev.reason).ok_or(undecodable("reason", ev.reason))?;
        let (src_ip, dst_ip) = (ip_of(&ev.saddr), ip_of(&ev.daddr));
        let label = |ip: IpAddr| {
            self.by_ip
                .get(&ip)
                .cloned()
                .unwrap_or_else(|| ip.to_string())
        };
        let local = if direction == Direction::Egress {
            src_ip
        } else {
            dst_ip
        };
        let pod = self
            .by_ip
            .get(&local)
            .cloned()
            .or_else(|| self.by_identity.get(&ev.endpoint).cloned())
            .unwrap_or_default();
        let rule = self.rules.get(&ev.policy_cookie).cloned();
        Ok(Verdict {
            time: format_time(ev.timestamp_ns as i128 + wall_offset_ns),
            verdict,
            direction,
            reason,
            protocol: Protocol::from_number(ev.protocol).to_string(),
            src: label(src_ip),
            dst: label(dst_ip),
            src_ip: src_ip.to_string(),
            dst_ip: dst_ip.to_string(),
            sport: ev.sport,
            dport: ev.dport,
            pod,
            policies: self.responsible(ev, reason, rule.as_ref()),
            rule,
            tcp_flags: ev.tcp_flags,
            len: ev.len,
            revision: ev.revision,
            tier: reason.tier().map(str::to_string),
            suppressed: suppressed_before(ev),
        })
    }

    /// The policies a verdict is attributed to: a cluster policy whose rule denied it,
    /// then whatever isolates the endpoint in that direction.
    fn responsible(&self, ev: &Event, reason: Reason, rule: Option<&RuleRef>) -> Vec<String> {
        let mut out = Vec::new();
        if let (true, Some(r)) = (reason.denied_by_cluster_rule(), rule) {
            out.push(r.policy.clone());
        }
        if let Some(l) = self.isolators.get(&ev.endpoint) {
            out.extend(l[ev.direction as usize & 1].iter().cloned());
        }
        out
    }

    /// What a pod's programmed policy is, in words (the PolicyProgrammed condition).
    pub fn programmed(&self, identity: u32, revision: u32) -> String {
        let iso = self.isolators.get(&identity);
        let side = |d: u8| match iso.map(|l| &l[d as usize]) {
            Some(l) if !l.is_empty() => l.join(", "),
            _ => "not isolated".to_string(),
        };
        format!(
            "ingress: {}; egress: {} (revision {revision})",
            side(direction::INGRESS),
            side(direction::EGRESS)
        )
    }

    /// Names the per-rule and per-endpoint counters.
    pub fn tally(&self, r: &Reading) -> TallyReport {
        let mut report = TallyReport::default();
        for (cookie, c) in &r.rules {
            let (policy, direction, rule) = match self.rules.get(cookie) {
                Some(rr) => (rr.policy.clone(), rr.direction.clone(), rr.rule),
                None => continue, // withdrawn since the read
            };
            report.rules.push(RuleTally {
                policy,
                direction,
                rule,
                packets: c.packets,
                bytes: c.bytes,
            });
        }
        // (namespace, direction, verdict, isolating policies) → (packets, bytes).
        type DropKey = (String, Direction, codes::Verdict, Vec<String>);
        let mut drops: BTreeMap<DropKey, (u64, u64)> = BTreeMap::new();
        let mut add = |ns: &str, policies: &dyn Fn(usize) -> Vec<String>, c: &EndpointCounters| {
            for v in [codes::Verdict::Dropped, codes::Verdict::Audit] {
                for d in Direction::ALL.iter().copied() {
                    let slot = EndpointCounters::slot(v.code(), d.code());
                    if c.packets[slot] == 0 {
                        continue;
                    }
                    let e = drops
                        .entry((ns.to_string(), d, v, policies(d.code() as usize)))
                        .or_default();
                    e.0 += c.packets[slot];
                    e.1 += c.bytes[slot];
                }
            }
        };
        for (id, c) in &r.endpoints {
            let Some(pod) = self.by_identity.get(id) else {
                continue;
            };
            let ns = pod.split('/').next().unwrap_or_default();
            let iso = self.isolators.get(id);
            add(ns, &|d| iso.map(|l| l[d].clone()).unwrap_or_default(), c);
        }
        for (ns, c) in &r.retired {
            add(ns, &|_| vec!["(pods gone)".to_string()], c);
        }
        for ((namespace, direction, verdict, policies), (packets, bytes)) in drops {
            report.drops.push(DropTally {
                namespace,
                direction,
                verdict,
                policies,
                packets,
                bytes,
            });
        }
        report
            .rules
            .sort_by(|a, b| b.packets.cmp(&a.packets).then(a.policy.cmp(&b.policy)));
        report
    }
}

/// What each policy rule allowed and what each namespace dropped, named.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TallyReport {
    /// Most packets first.
    pub rules: Vec<RuleTally>,
    /// Drops and audits per namespace, direction and the set of policies isolating the
    /// pods that dropped (pods gone since are `(pods gone)`).
    pub drops: Vec<DropTally>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RuleTally {
    pub policy: String,
    pub direction: String,
    pub rule: usize,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DropTally {
    pub namespace: String,
    pub direction: Direction,
    /// `dropped` or `audit`.
    pub verdict: codes::Verdict,
    pub policies: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
}

/// An event with a code this build of the agent does not know.
#[derive(Debug, thiserror::Error)]
#[error("event with unknown {field} code {code}")]
pub struct Undecodable {
    pub field: &'static str,
    pub code: u16,
}

/// Wall clock minus the monotonic clock the kernel stamps events with.
pub fn wall_offset_ns() -> i128 {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec out-pointer.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}

/// RFC 3339 UTC with milliseconds.
pub fn format_time(unix_ns: i128) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000) as i64;
    let ms = (unix_ns.rem_euclid(1_000_000_000) / 1_000_000) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The human line `netpol observe` prints.
pub fn human(v: &Verdict) -> String {
    let policies = if v.policies.is_empty() {
        String::new()
    } else {
        format!(" policies={}", v.policies.join(","))
    };
    let rule = v
        .rule
        .as_ref()
        .map(|r| format!(" rule={}:{}[{}]", r.policy, r.direction, r.rule))
        .unwrap_or_default();
    let more = if v.suppressed > 0 {
        format!(" (+{} more like this)", v.suppressed)
    } else {
        String::new()
    };
    format!(
        "{} {:<7} {:<7} {} -> {} {}/{} {}{}{}{}",
        v.time,
        v.verdict.name().to_uppercase(),
        v.direction,
        if v.sport != 0 {
            format!("{}:{}", v.src, v.sport)
        } else {
            v.src.clone()
        },
        v.dst,
        v.dport,
        v.protocol,
        v.reason,
        policies,
        rule,
        more
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use netpol_common::{proto, reason, verdict};
    use netpol_engine::compile::{compile, NodeView};
    use netpol_engine::index::net::addr_of;
    use netpol_engine::index::Index;

    /// A drop by a cluster policy names it, its rule and its tier; an allow names the
    /// rule that allowed it and the policies that isolate the pod.
    #[test]
    fn a_verdict_names_the_policies_responsible_and_the_tier() {
        let state = netpol_engine::objects::ClusterState::from_text(
            "kind: Namespace\nmetadata: {name: x}\n---\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {app: a}}\nspec: {containers: [{name: c, image: i}]}\nstatus: {podIP: 10.0.0.1}\n---\nkind: Pod\nmetadata: {name: b, namespace: x, labels: {app: b}}\nspec: {containers: [{name: c, image: i}]}\nstatus: {podIP: 10.0.0.2}\n---\napiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {name: default}\nspec: {subject: {namespaces: {}}, ingress: [{action: Deny, from: [{namespaces: {}}]}]}\n---\nkind: NetworkPolicy\nmetadata: {name: b-in, namespace: x}\nspec: {podSelector: {matchLabels: {app: b}}, ingress: [{from: [{podSelector: {}}]}]}\n",
        )
        .unwrap();
        let snap = Index::new().reset(&state);
        let desired = compile(&snap, &NodeView::default());
        let namer = Namer::new(&snap, &desired);
        let cookie_of = |policy: &str| {
            *desired
                .rules
                .iter()
                .find(|(_, r)| r.policy == policy)
                .expect("a rule")
                .0
        };
        let event = |to: &str, to_ip: &str, reason: u16, cookie: u32| Event {
            endpoint: desired.endpoints[to].id,
            direction: direction::INGRESS,
            verdict: if reason == reason::BASELINE_DENIED {
                verdict::DROPPED
            } else {
                verdict::ALLOWED
            },
            reason,
            policy_cookie: cookie,
            protocol: proto::TCP,
            dport: 80,
            saddr: addr_of("10.0.0.9".parse().unwrap()),
            daddr: addr_of(to_ip.parse().unwrap()),
            ..Event::default()
        };
        let baseline = "BaselineAdminNetworkPolicy/default";
        let v = namer
            .name(
                &event(
                    "x/a",
                    "10.0.0.1",
                    reason::BASELINE_DENIED,
                    cookie_of(baseline),
                ),
                0,
            )
            .unwrap();
        assert_eq!(v.policies, vec![baseline.to_string()]);
        assert_eq!(v.rule.as_ref().map(|r| r.policy.as_str()), Some(baseline));
        assert_eq!(v.tier.as_deref(), Some("Baseline"));
        let v = namer
            .name(
                &event(
                    "x/b",
                    "10.0.0.2",
                    reason::POLICY_ALLOWED,
                    cookie_of("x/b-in"),
                ),
                0,
            )
            .unwrap();
        assert_eq!(v.policies, vec!["x/b-in".to_string()]);
        assert_eq!(v.rule.as_ref().map(|r| r.rule), Some(0));
        assert_eq!(v.tier.as_deref(), Some("NetworkPolicy"));
        assert!(!human(&v).contains("more like this"));
        let more = Verdict { suppressed: 7, ..v };
        assert!(human(&more).ends_with("(+7 more like this)"));
        let json = serde_json::to_value(&more).unwrap();
        assert_eq!(json["suppressed"], 7);
        assert_eq!(json["verdict"], "allowed");
        assert_eq!(json["reason"], "POLICY_ALLOWED");
        assert_eq!(json["direction"], "ingress");
        let unknown = Event {
            verdict: 3,
            ..event("x/b", "10.0.0.2", reason::POLICY_DENIED, 0)
        };
        assert!(
            namer.name(&unknown, 0).is_err(),
            "an unknown verdict is not named"
        );
    }

    #[test]
    fn time_is_rfc3339_utc() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_time(1_795_000_000_123_000_000),
            "2026-11-18T11:06:40.123Z"
        );
    }
}

//! Findings on objects the index rejected: what validation said, at the field.

use serde_yaml::Value;

use super::snippet::*;
use super::*;
use crate::index::net::Cidr;

impl<'a> Checker<'a> {
    // ---- objects the index rejected ----

    pub(super) fn invalid(&mut self) {
        for inv in self.model.snap.invalid.clone() {
            let object = if inv.namespace.is_empty() {
                format!("{}/{}", inv.kind, inv.name)
            } else {
                format!("{}/{}/{}", inv.kind, inv.namespace, inv.name)
            };
            let (field, why) = match inv.error.split_once(": ") {
                Some((f, w)) if !f.contains(' ') => (f.to_string(), w.to_string()),
                _ => ("spec".to_string(), inv.error.clone()),
            };
            let leaf = last_key(&field).to_string();
            if field.ends_with(".domainNames") {
                let fix = snippet(
                    "netpol cannot enforce domainNames (experimental in the API);\nname the addresses those names resolve to instead:",
                    &map(vec![(
                        "networks",
                        Value::Sequence(vec![s("203.0.113.0/24")]),
                    )]),
                );
                self.push(
                    "fqdn-peer-unsupported",
                    &object,
                    &field,
                    format!("{why}: the whole policy is rejected, nothing of it is enforced"),
                    fix,
                );
            } else if field.contains(".except[") && why.contains("strictly inside") {
                let fix = self.except_fix(&inv.namespace, &inv.name, &field);
                self.push(
                    "except-outside-cidr",
                    &object,
                    &field,
                    format!("{why}: the whole policy is rejected, nothing of it is enforced"),
                    fix,
                );
            } else {
                let current = self
                    .raw_object(&inv.kind, &inv.namespace, &inv.name)
                    .and_then(|v| at(&v, &field).cloned())
                    .unwrap_or_else(|| s("<value>"));
                self.push(
                    "invalid-object",
                    &object,
                    &field,
                    format!("{why}: the whole object is rejected, nothing of it is enforced"),
                    snippet(
                        &format!("{why}\nchange it so that validation accepts it (now:)"),
                        &map(vec![(&leaf, current)]),
                    ),
                );
            }
        }
    }

    /// The ipBlock with the excepts that are not strictly inside its cidr left out.
    fn except_fix(&self, ns: &str, name: &str, field: &str) -> String {
        let block_field = field.split(".except[").next().unwrap_or(field);
        let raw_block = self
            .raw_network_policy(ns, name)
            .and_then(|v| at(&v, block_field).cloned());
        let Some(block) = raw_block else {
            return snippet(
                "keep only excepts inside cidr",
                &map(vec![("except", Value::Sequence(vec![]))]),
            );
        };
        let cidr_text = block
            .get("cidr")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let cidr = Cidr::parse(cidr_text).ok();
        let mut keep = Vec::new();
        let mut dropped = Vec::new();
        for x in block
            .get("except")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let text = x.as_str().unwrap_or_default();
            let inside = match (cidr, Cidr::parse(text)) {
                (Some(c), Ok(xc)) => c.contains(&xc) && xc.prefix_len() != c.prefix_len(),
                _ => false,
            };
            if inside {
                keep.push(s(text));
            } else {
                dropped.push(text.to_string());
            }
        }
        let mut pairs = vec![("cidr", s(cidr_text))];
        if !keep.is_empty() {
            pairs.push(("except", Value::Sequence(keep)));
        }
        snippet(
            &format!(
                "{} not inside {cidr_text}: widen cidr or drop them (nothing outside cidr is matched anyway)",
                dropped.join(", ")
            ),
            &map(vec![("ipBlock", map(pairs))]),
        )
    }

    /// The last NetworkPolicy document of that name, as written.
    pub(super) fn raw_network_policy(&self, ns: &str, name: &str) -> Option<Value> {
        self.raw_object("NetworkPolicy", ns, name)
    }

    /// The last document of that kind and name, as written.
    fn raw_object(&self, kind: &str, ns: &str, name: &str) -> Option<Value> {
        self.objects.iter().rev().find_map(|o| match o {
            Object::NetworkPolicy(np)
                if kind == "NetworkPolicy"
                    && np.metadata.namespace.as_deref().unwrap_or("default") == ns
                    && np.metadata.name.as_deref() == Some(name) =>
            {
                Some(raw(np))
            }
            Object::ClusterPolicy(cp)
                if cp.kind == kind && cp.metadata.name.as_deref() == Some(name) =>
            {
                Some(raw(cp))
            }
            _ => None,
        })
    }
}

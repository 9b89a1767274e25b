//! "Did you mean" detectors for the mistakes the troubleshooting guides keep meeting:
//! a label off by a typo or by case, `name:` where namespaces carry
//! `kubernetes.io/metadata.name`, two peers (OR) where one peer (AND) was meant, a named
//! port the pod does not define. `explain` asks them about one flow, `lint` about every
//! object; both word the answer their own way.

use crate::index::{Labels, Peer, PodInfo, Selector, NAMESPACE_NAME_LABEL};

/// Two different words one could have meant for the other.
pub fn near(a: &str, b: &str) -> bool {
    a != b
        && (a.eq_ignore_ascii_case(b)
            // OSA counts a swap of two neighbouring letters (`wbe` for `web`) as one
            // edit, as a typist makes it; Levenshtein would count two.
            || strsim::osa_distance(a, b) <= 2
            || a.starts_with(b)
            || b.starts_with(a))
}

/// A `matchLabels` pair that some labels miss by a typo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelTypo {
    /// The key is there with a near value: `app: webb` against `app: web`.
    Value {
        key: String,
        wanted: String,
        actual: String,
    },
    /// A near key is there: `ap: web` against `app: web`.
    Key {
        wanted: String,
        actual_key: String,
        actual_value: String,
    },
}

/// The typos by which `sel`'s `matchLabels` miss `labels`.
pub fn label_typos(sel: &Selector, labels: &Labels) -> Vec<LabelTypo> {
    let mut out = Vec::new();
    for (k, v) in &sel.match_labels {
        match labels.get(k) {
            Some(actual) if near(v, actual) => out.push(LabelTypo::Value {
                key: k.clone(),
                wanted: v.clone(),
                actual: actual.clone(),
            }),
            None => {
                if let Some((ak, av)) = labels.iter().find(|(ak, _)| near(k, ak)) {
                    out.push(LabelTypo::Key {
                        wanted: k.clone(),
                        actual_key: ak.clone(),
                        actual_value: av.clone(),
                    });
                }
            }
            _ => {}
        }
    }
    out
}

/// `sel` with every typo of `typos` corrected (a misspelt key keeps its value).
pub fn corrected(sel: &Selector, typos: &[LabelTypo]) -> Selector {
    let mut out = sel.clone();
    for t in typos {
        match t {
            LabelTypo::Value { key, actual, .. } => {
                out.match_labels.insert(key.clone(), actual.clone());
            }
            // The key was misspelt; the value stays what was asked for.
            LabelTypo::Key {
                wanted, actual_key, ..
            } => {
                if let Some(v) = out.match_labels.remove(wanted) {
                    out.match_labels.insert(actual_key.clone(), v);
                }
            }
        }
    }
    out
}

/// The value of a namespace selector's `name:` label when the namespace (labels
/// `ns_labels`) does not carry `name`: `kubernetes.io/metadata.name` was likely meant.
pub fn name_label_meant_metadata_name<'a>(
    sel: &'a Selector,
    ns_labels: &Labels,
) -> Option<&'a str> {
    if ns_labels.contains_key("name") {
        return None;
    }
    sel.match_labels.get("name").map(String::as_str)
}

/// `sel` with `name: X` replaced by `kubernetes.io/metadata.name: X`.
pub fn with_metadata_name(sel: &Selector) -> Selector {
    let mut out = sel.clone();
    if let Some(v) = out.match_labels.remove("name") {
        out.match_labels.insert(NAMESPACE_NAME_LABEL.into(), v);
    }
    out
}

/// A rule's peers list a namespaceSelector alone and a podSelector alone: that allows
/// either (OR); written as one peer they would require both (AND).
pub fn or_for_and(peers: &[Peer]) -> bool {
    let ns_only = peers.iter().any(
        |p| matches!(p, Peer::Pods { namespaces: Some(_), pods } if *pods == Selector::default()),
    );
    let pod_only = peers.iter().any(|p| {
        matches!(
            p,
            Peer::Pods {
                namespaces: None,
                ..
            }
        )
    });
    ns_only && pod_only
}

/// The pod does not define a container port of that name.
pub fn undefined_named_port(name: &str, pod: &PodInfo) -> bool {
    !pod.named_ports.contains_key(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::selector::tests::labels;

    #[test]
    fn swapped_letters_are_one_typo_each() {
        // Two swaps: two edits for OSA, four for Levenshtein.
        assert!(near("fornetnd", "frontend"));
        assert!(!near("frontend", "backend"));
        assert!(!near("web", "web"));
    }

    #[test]
    fn typos_by_value_key_and_case_are_found_and_corrected() {
        let sel = Selector {
            match_labels: labels(&[("app", "Web"), ("tierr", "front")]),
            requirements: vec![],
        };
        let pod = labels(&[("app", "web"), ("tier", "front")]);
        let typos = label_typos(&sel, &pod);
        assert_eq!(typos.len(), 2, "{typos:?}");
        assert!(corrected(&sel, &typos).matches(&pod));
        assert!(label_typos(&sel, &labels(&[("team", "x")])).is_empty());
    }

    #[test]
    fn name_label_is_flagged_only_where_the_namespace_lacks_it() {
        let sel = Selector {
            match_labels: labels(&[("name", "shop")]),
            requirements: vec![],
        };
        let ns = labels(&[(NAMESPACE_NAME_LABEL, "shop")]);
        assert_eq!(name_label_meant_metadata_name(&sel, &ns), Some("shop"));
        assert!(with_metadata_name(&sel).matches(&ns));
        let named = labels(&[("name", "shop")]);
        assert_eq!(name_label_meant_metadata_name(&sel, &named), None);
    }
}

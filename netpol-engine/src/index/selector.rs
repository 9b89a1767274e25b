//! Label selectors (`matchLabels` and `matchExpressions`) as the API defines them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

/// A parsed selector. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    pub match_labels: Labels,
    pub requirements: Vec<Requirement>,
}

impl Selector {
    /// Parses a selector; `field` names where it sits, for the error.
    pub fn parse(sel: &LabelSelector, field: &str) -> Result<Selector, String> {
        let mut out = Selector {
            match_labels: sel.match_labels.clone().unwrap_or_default(),
            requirements: vec![],
        };
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let f = format!("{field}.matchExpressions[{i}]");
            let values = e.values.clone().unwrap_or_default();
            let operator = match e.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(format!(
                    "{f}.operator: unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"
                ))
                }
            };
            match operator {
                Operator::In | Operator::NotIn if values.is_empty() => {
                    return Err(format!(
                        "{f}.values: must be non-empty for operator {}",
                        e.operator
                    ));
                }
                Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                    return Err(format!(
                        "{f}.values: must be empty for operator {}",
                        e.operator
                    ));
                }
                _ => {}
            }
            out.requirements.push(Requirement {
                key: e.key.clone(),
                operator,
                values,
            });
        }
        Ok(out)
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.requirements.iter().all(|r| {
                let v = labels.get(&r.key);
                match r.operator {
                    Operator::In => v.is_some_and(|v| r.values.contains(v)),
                    Operator::NotIn => v.is_none_or(|v| !r.values.contains(v)),
                    Operator::Exists => v.is_some(),
                    Operator::DoesNotExist => v.is_none(),
                }
            })
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.requirements.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    pub(crate) fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|s| s.to_string()).collect())
            },
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = Selector::parse(&LabelSelector::default(), "spec.podSelector").unwrap();
        assert!(s.matches(&labels(&[])) && s.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_need_every_pair() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "api"), ("tier", "be")])),
            ..Default::default()
        };
        let s = Selector::parse(&sel, "f").unwrap();
        assert!(s.matches(&labels(&[("app", "api"), ("tier", "be"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "api")])));
    }

    #[test]
    fn expressions_follow_the_api_definitions() {
        let sel = LabelSelector {
            match_expressions: Some(vec![
                expr("env", "In", &["prod", "stage"]),
                expr("legacy", "DoesNotExist", &[]),
            ]),
            ..Default::default()
        };
        let s = Selector::parse(&sel, "f").unwrap();
        assert!(s.matches(&labels(&[("env", "prod")])));
        assert!(!s.matches(&labels(&[("env", "dev")])));
        assert!(!s.matches(&labels(&[("env", "prod"), ("legacy", "")])));
        let not_in = Selector::parse(
            &LabelSelector {
                match_expressions: Some(vec![expr("env", "NotIn", &["prod"])]),
                ..Default::default()
            },
            "f",
        )
        .unwrap();
        assert!(
            not_in.matches(&labels(&[])),
            "NotIn matches pods without the key"
        );
        assert!(!not_in.matches(&labels(&[("env", "prod")])));
        let exists = Selector::parse(
            &LabelSelector {
                match_expressions: Some(vec![expr("env", "Exists", &[])]),
                ..Default::default()
            },
            "f",
        )
        .unwrap();
        assert!(exists.matches(&labels(&[("env", "")])) && !exists.matches(&labels(&[])));
    }

    #[test]
    fn bad_operators_and_values_name_the_field() {
        let bad = LabelSelector {
            match_expressions: Some(vec![expr("a", "Equals", &["x"])]),
            ..Default::default()
        };
        let e = Selector::parse(&bad, "spec.podSelector").unwrap_err();
        assert!(
            e.starts_with("spec.podSelector.matchExpressions[0].operator"),
            "{e}"
        );
        let empty_in = LabelSelector {
            match_expressions: Some(vec![expr("a", "In", &[])]),
            ..Default::default()
        };
        assert!(Selector::parse(&empty_in, "f")
            .unwrap_err()
            .contains("values"));
    }
}

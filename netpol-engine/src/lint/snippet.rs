//! YAML snippets for the fixes, and field paths into the objects as written.

use serde::Serialize;
use serde_yaml::{Mapping, Value};

use super::*;

pub(super) fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

pub(super) fn map(pairs: Vec<(&str, Value)>) -> Value {
    let mut m = Mapping::new();
    for (k, v) in pairs {
        m.insert(s(k), v);
    }
    Value::Mapping(m)
}

pub(super) fn labels_value(labels: &Labels) -> Value {
    let mut m = Mapping::new();
    for (k, v) in labels {
        m.insert(s(k), s(v));
    }
    Value::Mapping(m)
}

pub(super) fn selector_value(sel: &Selector) -> Value {
    let mut pairs = Vec::new();
    if !sel.match_labels.is_empty() {
        pairs.push(("matchLabels", labels_value(&sel.match_labels)));
    }
    if !sel.requirements.is_empty() {
        let exprs = sel
            .requirements
            .iter()
            .map(|r| {
                let mut e = vec![
                    ("key", s(&r.key)),
                    ("operator", s(&format!("{:?}", r.operator))),
                ];
                if !r.values.is_empty() {
                    e.push((
                        "values",
                        Value::Sequence(r.values.iter().map(|v| s(v)).collect()),
                    ));
                }
                map(e)
            })
            .collect();
        pairs.push(("matchExpressions", Value::Sequence(exprs)));
    }
    map(pairs)
}

/// `value` as YAML, under a comment.
pub(super) fn snippet(comment: &str, value: &Value) -> String {
    let body = serde_yaml::to_string(value).unwrap_or_default();
    if comment.is_empty() {
        body
    } else {
        let mut out: String = comment.lines().map(|l| format!("# {l}\n")).collect();
        out.push_str(&body);
        out
    }
}

/// The last name of a field path: `podSelector` of `spec.ingress[0].from[1].podSelector`.
pub(super) fn last_key(field: &str) -> &str {
    let last = field.rsplit('.').next().unwrap_or(field);
    last.split('[').next().unwrap_or(last)
}

/// The value at a field path (`spec.ingress[0].from[1]`) of an object.
pub(super) fn at<'v>(v: &'v Value, field: &str) -> Option<&'v Value> {
    let mut cur = v;
    for part in field.split('.') {
        let (name, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        cur = cur.get(name)?;
        for ix in indexes.split('[').filter(|x| !x.is_empty()) {
            cur = cur.get(ix.trim_end_matches(']').parse::<usize>().ok()?)?;
        }
    }
    Some(cur)
}

/// The object's own name and raw form.
pub(super) fn raw<T: Serialize>(obj: &T) -> Value {
    serde_yaml::to_value(obj).unwrap_or(Value::Null)
}

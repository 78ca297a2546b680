//! Faults: problems found in user-supplied JSON.
//!
//! Validators collect every fault instead of stopping at the first one, so a
//! SQL user can fix a whole definition in one round trip. Each fault carries a
//! JSONPath-like location (`$.nodes.check.paths[0].next`) so the user knows
//! exactly which part of their JSON is wrong.

use std::fmt;

/// One problem found in user-supplied JSON, located by a JSONPath-like path such as `$.nodes.check.paths[0].next`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub path: String,
    pub message: String,
}

impl Fault {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Fault {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Joins faults as `path: msg; path2: msg2`, the form shown in a single SQL error.
pub fn describe(faults: &[Fault]) -> String {
    faults
        .iter()
        .map(Fault::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Path of an object member. Keys that are not plain identifiers use the
/// bracket form so the path stays unambiguous (`$["a b"]`).
pub fn child(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        format!("{path}.{key}")
    } else {
        let quoted = serde_json::to_string(key).unwrap_or_else(|_| format!("\"{key}\""));
        format!("{path}[{quoted}]")
    }
}

/// Path of an array element.
pub fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// The one unknown-key check of every validator: a fault for each key of `obj` that `allowed` does
/// not name, at the key's own path, in key order (so messages do not depend on the input's order):
/// `unknown key "colour" in a broadcast; allowed: name, audience, …`. `place` says where the object
/// sits (empty: nowhere said). Returns whether it found any.
pub fn reject_unknown_keys(
    obj: &serde_json::Map<String, serde_json::Value>,
    allowed: &[&str],
    path: &str,
    place: &str,
    faults: &mut Vec<Fault>,
) -> bool {
    let mut extra: Vec<&String> = obj
        .keys()
        .filter(|k| !allowed.contains(&k.as_str()))
        .collect();
    extra.sort();
    let sep = if place.is_empty() { "" } else { " " };
    for key in &extra {
        faults.push(Fault::new(
            child(path, key),
            format!(
                "unknown key {key:?}{sep}{place}; allowed: {}",
                allowed.join(", ")
            ),
        ));
    }
    !extra.is_empty()
}

/// Short name of a JSON value's type, for "expected X, got Y" messages.
pub fn type_name(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn display_is_path_colon_message() {
        let f = Fault::new("$.name", "must be a string");
        assert_eq!(f.to_string(), "$.name: must be a string");
    }

    #[test]
    fn describe_joins_with_semicolons() {
        let fs = vec![Fault::new("$.a", "x"), Fault::new("$.b[0]", "y")];
        assert_eq!(describe(&fs), "$.a: x; $.b[0]: y");
    }

    #[test]
    fn describe_empty_is_empty() {
        assert_eq!(describe(&[]), "");
    }

    #[test]
    fn child_plain_key_uses_dot() {
        assert_eq!(child("$.nodes", "check-1_a"), "$.nodes.check-1_a");
    }

    #[test]
    fn child_odd_key_uses_brackets() {
        assert_eq!(child("$.nodes", "a b"), "$.nodes[\"a b\"]");
        assert_eq!(child("$", ""), "$[\"\"]");
        assert_eq!(child("$", "a\"b"), "$[\"a\\\"b\"]");
        assert_eq!(child("$", "a.b"), "$[\"a.b\"]");
    }

    #[test]
    fn index_uses_brackets() {
        assert_eq!(index("$.paths", 3), "$.paths[3]");
    }

    #[test]
    fn unknown_keys_are_named_in_order_with_what_is_allowed() {
        let obj = json!({"b": 1, "field": 2, "a b": 3});
        let mut faults = Vec::new();
        let found = reject_unknown_keys(
            obj.as_object().unwrap(),
            &["field", "op"],
            "$.x",
            "in a condition",
            &mut faults,
        );
        assert!(found);
        assert_eq!(
            describe(&faults),
            "$.x[\"a b\"]: unknown key \"a b\" in a condition; allowed: field, op; \
             $.x.b: unknown key \"b\" in a condition; allowed: field, op"
        );
        faults.clear();
        assert!(reject_unknown_keys(
            obj.as_object().unwrap(),
            &["field"],
            "options",
            "",
            &mut faults
        ));
        assert_eq!(
            faults[0].to_string(),
            "options[\"a b\"]: unknown key \"a b\"; allowed: field"
        );
        faults.clear();
        let ok = json!({"field": 1});
        assert!(!reject_unknown_keys(
            ok.as_object().unwrap(),
            &["field"],
            "$",
            "",
            &mut faults
        ));
        assert!(faults.is_empty());
    }

    #[test]
    fn type_names() {
        assert_eq!(type_name(&json!(null)), "null");
        assert_eq!(type_name(&json!(true)), "boolean");
        assert_eq!(type_name(&json!(1.5)), "number");
        assert_eq!(type_name(&json!("x")), "string");
        assert_eq!(type_name(&json!([])), "array");
        assert_eq!(type_name(&json!({})), "object");
    }
}

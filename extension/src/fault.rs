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
    fn type_names() {
        assert_eq!(type_name(&json!(null)), "null");
        assert_eq!(type_name(&json!(true)), "boolean");
        assert_eq!(type_name(&json!(1.5)), "number");
        assert_eq!(type_name(&json!("x")), "string");
        assert_eq!(type_name(&json!([])), "array");
        assert_eq!(type_name(&json!({})), "object");
    }
}

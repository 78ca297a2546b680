//! The condition language shared by triggers, branches, filters and segments.
//!
//! One small JSON language everywhere means a SQL user learns it once:
//!
//! ```json
//! {"all": [c, ...]}   every condition holds (an empty list is true)
//! {"any": [c, ...]}   at least one holds (an empty list is false)
//! {"not": c}          c does not hold
//! {"field": "contact.plan", "op": "eq", "value": "pro"}
//! ```
//!
//! A field starts with a scope, `contact.`, `event.` or `context.`, followed by
//! a dotted path that walks nested objects (`event.utm.source`); a segment made
//! of digits indexes an array (`event.items.0.sku`).
//!
//! Evaluation semantics (everything is case-sensitive):
//! - A missing field and a JSON `null` are the same thing: "absent". An absent
//!   field makes `ne` true and every other op false, except `exists`.
//! - `exists` is true when the field is present and not null; with
//!   `"value": false` it is true when the field is absent.
//! - `eq` / `ne`: JSON equality, where numbers compare numerically
//!   (`1` equals `1.0`), also inside arrays and objects.
//! - `gt` / `gte` / `lt` / `lte`: two numbers compare numerically; two strings
//!   compare lexicographically (so ISO-8601 dates order correctly); a string
//!   and a number compare numerically when the string parses as a number;
//!   any other mix is false.
//! - `in`: the value is an array that holds the field's value (numeric-aware).
//! - `contains`: a string field contains the value as a substring (value must
//!   be a string then); an array field holds an element equal to the value;
//!   anything else is false.
//! - `starts_with` / `ends_with`: the field is a string with that prefix/suffix.

use std::cmp::Ordering;
use std::fmt;

use serde_json::{Map, Value};

use crate::fault::{child, index, reject_unknown_keys, type_name, Fault};

/// Conditions nest at most this deep, so a hostile definition cannot
/// exhaust the stack of the Postgres backend.
pub const MAX_DEPTH: usize = 32;

/// Where a field's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Contact,
    Event,
    Context,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Contact => "contact",
            Scope::Event => "event",
            Scope::Context => "context",
        }
    }
}

/// A parsed field reference such as `event.utm.source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub scope: Scope,
    pub path: Vec<String>,
}

const FIELD_HELP: &str = "field must start with contact., event. or context. followed by a dotted path such as contact.plan or event.utm.source";

impl Field {
    /// Parses `scope.path.to.value`; every segment must be non-empty.
    pub fn parse(s: &str) -> Result<Field, String> {
        let (scope, rest) = if let Some(rest) = s.strip_prefix("contact.") {
            (Scope::Contact, rest)
        } else if let Some(rest) = s.strip_prefix("event.") {
            (Scope::Event, rest)
        } else if let Some(rest) = s.strip_prefix("context.") {
            (Scope::Context, rest)
        } else {
            return Err(format!("{FIELD_HELP}; got {s:?}"));
        };
        let path: Vec<String> = rest.split('.').map(str::to_owned).collect();
        if path.iter().any(String::is_empty) {
            return Err(format!("{FIELD_HELP}; got {s:?} (empty path segment)"));
        }
        Ok(Field { scope, path })
    }

    /// Looks the field up; `None` when the scope or any step is missing.
    pub fn resolve<'a>(&self, facts: &Facts<'a>) -> Option<&'a Value> {
        let root = match self.scope {
            Scope::Contact => facts.contact,
            Scope::Event => facts.event,
            Scope::Context => facts.context,
        }?;
        self.path.iter().try_fold(root, |cur, seg| match cur {
            Value::Object(map) => map.get(seg),
            Value::Array(items) => seg.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        })
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.scope.as_str(), self.path.join("."))
    }
}

/// A comparison operator of a leaf condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
    In,
    Contains,
    Exists,
    StartsWith,
    EndsWith,
}

const OP_NAMES: &str = "eq, ne, gt, gte, lt, lte, in, contains, exists, starts_with, ends_with";

impl Op {
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "eq" => Op::Eq,
            "ne" => Op::Ne,
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "in" => Op::In,
            "contains" => Op::Contains,
            "exists" => Op::Exists,
            "starts_with" => Op::StartsWith,
            "ends_with" => Op::EndsWith,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "eq",
            Op::Ne => "ne",
            Op::Gt => "gt",
            Op::Gte => "gte",
            Op::Lt => "lt",
            Op::Lte => "lte",
            Op::In => "in",
            Op::Contains => "contains",
            Op::Exists => "exists",
            Op::StartsWith => "starts_with",
            Op::EndsWith => "ends_with",
        }
    }

    /// Why `value` cannot be used with this op, if it cannot.
    fn check_value(self, value: Option<&Value>) -> Option<String> {
        let name = self.as_str();
        let Some(value) = value else {
            return (self != Op::Exists).then(|| format!("value is required for op {name}"));
        };
        let got = type_name(value);
        match self {
            Op::Eq | Op::Ne if value.is_null() => Some(format!(
                "value must not be null for op {name}; use op exists to test whether a field is set"
            )),
            Op::Eq | Op::Ne => None,
            Op::In if !value.is_array() => Some(format!(
                "value must be an array for op in, e.g. [\"a\", \"b\"]; got {got}"
            )),
            Op::Gt | Op::Gte | Op::Lt | Op::Lte if !(value.is_number() || value.is_string()) => {
                Some(format!(
                    "value must be a number or a string for op {name}; got {got}"
                ))
            }
            Op::StartsWith | Op::EndsWith if !value.is_string() => {
                Some(format!("value must be a string for op {name}; got {got}"))
            }
            Op::Exists if !value.is_boolean() => Some(format!(
                "value must be true or false for op exists (or left out); got {got}"
            )),
            Op::Contains if !(value.is_string() || value.is_number() || value.is_boolean()) => {
                Some(format!(
                    "value must be a string, number or boolean for op contains; got {got}"
                ))
            }
            _ => None,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed, validated condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    Leaf { field: Field, op: Op, value: Value },
}

/// The data a condition is evaluated against. `contact` is ONE object: the contact's attributes with "email" (and maybe "timezone", "tags") merged in by the caller.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts<'a> {
    pub contact: Option<&'a Value>,
    pub event: Option<&'a Value>,
    pub context: Option<&'a Value>,
}

/// Which scopes a condition reads, so callers can skip fetching unused data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScopeSet {
    pub contact: bool,
    pub event: bool,
    pub context: bool,
}

impl ScopeSet {
    pub fn reads(self, scope: Scope) -> bool {
        match scope {
            Scope::Contact => self.contact,
            Scope::Event => self.event,
            Scope::Context => self.context,
        }
    }

    pub fn insert(&mut self, scope: Scope) {
        match scope {
            Scope::Contact => self.contact = true,
            Scope::Event => self.event = true,
            Scope::Context => self.context = true,
        }
    }

    pub fn union(self, other: ScopeSet) -> ScopeSet {
        ScopeSet {
            contact: self.contact || other.contact,
            event: self.event || other.event,
            context: self.context || other.context,
        }
    }
}

const SHAPE_HELP: &str =
    "a condition is an object with exactly one of \"all\", \"any\", \"not\" or \"field\"";

impl Condition {
    /// Parses and validates; collects ALL faults (not just the first), each with its path (the caller passes the path of `v`, e.g. "$.trigger.filter").
    pub fn parse(v: &Value, path: &str) -> Result<Condition, Vec<Fault>> {
        let mut faults = Vec::new();
        let parsed = parse_at(v, path, 0, &mut faults);
        match parsed {
            Some(c) if faults.is_empty() => Ok(c),
            _ => Err(faults),
        }
    }

    pub fn eval(&self, facts: &Facts) -> bool {
        match self {
            Condition::All(cs) => cs.iter().all(|c| c.eval(facts)),
            Condition::Any(cs) => cs.iter().any(|c| c.eval(facts)),
            Condition::Not(c) => !c.eval(facts),
            Condition::Leaf { field, op, value } => {
                eval_leaf(field.resolve(facts).filter(|v| !v.is_null()), *op, value)
            }
        }
    }

    /// How many single tests evaluating the condition can take: one per leaf, and for an `in` leaf
    /// one per value of its list (it compares with each). Definitions bound the sum.
    pub fn tests(&self) -> usize {
        match self {
            Condition::All(cs) | Condition::Any(cs) => cs.iter().map(Condition::tests).sum(),
            Condition::Not(c) => c.tests(),
            Condition::Leaf {
                op: Op::In, value, ..
            } => value.as_array().map_or(1, |items| items.len().max(1)),
            Condition::Leaf { .. } => 1,
        }
    }

    /// Which scopes the condition reads (so callers can skip fetching data).
    pub fn scopes(&self) -> ScopeSet {
        let mut set = ScopeSet::default();
        self.collect_scopes(&mut set);
        set
    }

    fn collect_scopes(&self, set: &mut ScopeSet) {
        match self {
            Condition::All(cs) | Condition::Any(cs) => {
                cs.iter().for_each(|c| c.collect_scopes(set));
            }
            Condition::Not(c) => c.collect_scopes(set),
            Condition::Leaf { field, .. } => set.insert(field.scope),
        }
    }
}

fn parse_at(v: &Value, path: &str, depth: usize, faults: &mut Vec<Fault>) -> Option<Condition> {
    let Value::Object(obj) = v else {
        faults.push(Fault::new(
            path,
            format!("{SHAPE_HELP}; got {}", type_name(v)),
        ));
        return None;
    };
    if depth >= MAX_DEPTH {
        faults.push(Fault::new(
            path,
            format!("conditions may nest at most {MAX_DEPTH} levels deep"),
        ));
        return None;
    }
    let kinds: Vec<&str> = ["all", "any", "not", "field"]
        .into_iter()
        .filter(|k| obj.contains_key(*k))
        .collect();
    match kinds.as_slice() {
        // Looks like a leaf that forgot its field: say so precisely.
        [] if obj.contains_key("op") || obj.contains_key("value") => parse_leaf(obj, path, faults),
        [] => {
            faults.push(Fault::new(path, SHAPE_HELP));
            None
        }
        [kind] => match *kind {
            "all" | "any" => parse_list(obj, kind, path, depth, faults),
            "not" => {
                reject_unknown_keys(obj, &["not"], path, "in a condition", faults);
                let inner = obj
                    .get("not")
                    .and_then(|v| parse_at(v, &child(path, "not"), depth + 1, faults));
                inner.map(|c| Condition::Not(Box::new(c)))
            }
            _ => parse_leaf(obj, path, faults),
        },
        many => {
            faults.push(Fault::new(
                path,
                format!("{SHAPE_HELP}; this one has {}", many.join(" and ")),
            ));
            None
        }
    }
}

fn parse_list(
    obj: &Map<String, Value>,
    kind: &str,
    path: &str,
    depth: usize,
    faults: &mut Vec<Fault>,
) -> Option<Condition> {
    reject_unknown_keys(obj, &[kind], path, "in a condition", faults);
    let list_path = child(path, kind);
    let Some(items) = obj.get(kind).and_then(Value::as_array) else {
        let got = obj.get(kind).map_or("nothing", type_name);
        faults.push(Fault::new(
            list_path,
            format!("{kind} must be an array of conditions; got {got}"),
        ));
        return None;
    };
    let before = faults.len();
    let parsed: Vec<Condition> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| parse_at(item, &index(&list_path, i), depth + 1, faults))
        .collect();
    if faults.len() != before {
        return None;
    }
    Some(if kind == "all" {
        Condition::All(parsed)
    } else {
        Condition::Any(parsed)
    })
}

fn parse_leaf(obj: &Map<String, Value>, path: &str, faults: &mut Vec<Fault>) -> Option<Condition> {
    let before = faults.len();
    reject_unknown_keys(
        obj,
        &["field", "op", "value"],
        path,
        "in a condition",
        faults,
    );

    let field = match obj.get("field") {
        Some(Value::String(s)) => match Field::parse(s) {
            Ok(f) => Some(f),
            Err(msg) => {
                faults.push(Fault::new(child(path, "field"), msg));
                None
            }
        },
        Some(other) => {
            faults.push(Fault::new(
                child(path, "field"),
                format!("{FIELD_HELP}; got {}", type_name(other)),
            ));
            None
        }
        None => {
            faults.push(Fault::new(
                child(path, "field"),
                format!("field is required; {FIELD_HELP}"),
            ));
            None
        }
    };

    let op = match obj.get("op") {
        None => {
            faults.push(Fault::new(
                child(path, "op"),
                format!("op is required; allowed ops: {OP_NAMES}"),
            ));
            None
        }
        Some(Value::String(s)) => {
            let op = Op::parse(s);
            if op.is_none() {
                faults.push(Fault::new(
                    child(path, "op"),
                    format!("unknown op {s:?}; allowed ops: {OP_NAMES}"),
                ));
            }
            op
        }
        Some(other) => {
            faults.push(Fault::new(
                child(path, "op"),
                format!(
                    "op must be a string, one of: {OP_NAMES}; got {}",
                    type_name(other)
                ),
            ));
            None
        }
    };

    if let Some(op) = op {
        if let Some(msg) = op.check_value(obj.get("value")) {
            let at = if obj.contains_key("value") {
                child(path, "value")
            } else {
                path.to_owned()
            };
            faults.push(Fault::new(at, msg));
        }
    }

    match (field, op) {
        (Some(field), Some(op)) if faults.len() == before => Some(Condition::Leaf {
            field,
            op,
            value: obj.get("value").cloned().unwrap_or(Value::Null),
        }),
        _ => None,
    }
}

fn eval_leaf(actual: Option<&Value>, op: Op, value: &Value) -> bool {
    if op == Op::Exists {
        let want_present = value.as_bool().unwrap_or(true);
        return actual.is_some() == want_present;
    }
    let Some(actual) = actual else {
        return op == Op::Ne;
    };
    match op {
        Op::Eq => json_eq(actual, value),
        Op::Ne => !json_eq(actual, value),
        Op::Gt => compare(actual, value) == Some(Ordering::Greater),
        Op::Gte => matches!(
            compare(actual, value),
            Some(Ordering::Greater | Ordering::Equal)
        ),
        Op::Lt => compare(actual, value) == Some(Ordering::Less),
        Op::Lte => matches!(
            compare(actual, value),
            Some(Ordering::Less | Ordering::Equal)
        ),
        Op::In => value
            .as_array()
            .is_some_and(|items| items.iter().any(|item| json_eq(actual, item))),
        Op::Contains => match (actual, value) {
            (Value::String(hay), Value::String(needle)) => hay.contains(needle.as_str()),
            (Value::Array(items), _) => items.iter().any(|item| json_eq(item, value)),
            _ => false,
        },
        Op::StartsWith => match (actual, value) {
            (Value::String(s), Value::String(p)) => s.starts_with(p.as_str()),
            _ => false,
        },
        Op::EndsWith => match (actual, value) {
            (Value::String(s), Value::String(p)) => s.ends_with(p.as_str()),
            _ => false,
        },
        // Present here; absent was answered above.
        Op::Exists => value.as_bool().unwrap_or(true),
    }
}

/// JSON equality where numbers compare by value, so `1` equals `1.0`.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => num_eq(x, y),
        (Value::Array(xs), Value::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(xs), Value::Object(ys)) => {
            xs.len() == ys.len()
                && xs
                    .iter()
                    .all(|(k, x)| ys.get(k).is_some_and(|y| json_eq(x, y)))
        }
        _ => a == b,
    }
}

fn num_eq(x: &serde_json::Number, y: &serde_json::Number) -> bool {
    // Exact integer comparison first, so large ids do not collide through f64.
    if let (Some(a), Some(b)) = (x.as_i64(), y.as_i64()) {
        return a == b;
    }
    if let (Some(a), Some(b)) = (x.as_u64(), y.as_u64()) {
        return a == b;
    }
    match (x.as_f64(), y.as_f64()) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

fn compare(actual: &Value, value: &Value) -> Option<Ordering> {
    match (actual, value) {
        (Value::Number(a), Value::Number(b)) => {
            if let (Some(a), Some(b)) = (a.as_i64(), b.as_i64()) {
                return Some(a.cmp(&b));
            }
            a.as_f64()?.partial_cmp(&b.as_f64()?)
        }
        (Value::String(a), Value::String(b)) => Some(a.as_str().cmp(b.as_str())),
        (Value::String(a), Value::Number(b)) => {
            a.trim().parse::<f64>().ok()?.partial_cmp(&b.as_f64()?)
        }
        (Value::Number(a), Value::String(b)) => {
            a.as_f64()?.partial_cmp(&b.trim().parse::<f64>().ok()?)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cond(v: Value) -> Condition {
        Condition::parse(&v, "$").unwrap_or_else(|f| panic!("{f:?}"))
    }

    fn faults(v: Value) -> Vec<Fault> {
        Condition::parse(&v, "$.c").expect_err("should be rejected")
    }

    fn leaf_on(actual: Value, op: &str, value: Value) -> bool {
        let c = cond(json!({"field": "contact.x", "op": op, "value": value}));
        let contact = json!({ "x": actual });
        c.eval(&Facts {
            contact: Some(&contact),
            ..Facts::default()
        })
    }

    fn leaf_missing(op: &str, value: Option<Value>) -> bool {
        let mut obj = json!({"field": "contact.x", "op": op});
        if let Some(v) = value {
            obj["value"] = v;
        }
        let c = cond(obj);
        let contact = json!({});
        c.eval(&Facts {
            contact: Some(&contact),
            ..Facts::default()
        })
    }

    // ---- parsing: accepted shapes ----

    #[test]
    fn parses_nested_tree() {
        let c = cond(json!({"all": [
            {"field": "contact.plan", "op": "eq", "value": "pro"},
            {"not": {"any": [{"field": "event.utm.source", "op": "exists"}]}}
        ]}));
        let Condition::All(items) = c else {
            panic!("expected all")
        };
        assert_eq!(items.len(), 2);
        assert!(matches!(items[1], Condition::Not(_)));
    }

    #[test]
    fn field_parse_splits_path() {
        let f = Field::parse("context.crm.score").unwrap();
        assert_eq!(f.scope, Scope::Context);
        assert_eq!(f.path, vec!["crm", "score"]);
        assert_eq!(f.to_string(), "context.crm.score");
    }

    #[test]
    fn empty_lists_are_allowed() {
        assert!(cond(json!({"all": []})).eval(&Facts::default()));
        assert!(!cond(json!({"any": []})).eval(&Facts::default()));
    }

    // ---- parsing: faults ----

    #[test]
    fn rejects_non_object() {
        for v in [json!(null), json!(1), json!("x"), json!([]), json!(true)] {
            let f = faults(v);
            assert_eq!(f.len(), 1);
            assert_eq!(f[0].path, "$.c");
            assert!(f[0].message.contains("exactly one of"), "{}", f[0]);
        }
    }

    #[test]
    fn rejects_empty_object() {
        let f = faults(json!({}));
        assert_eq!(f, vec![Fault::new("$.c", SHAPE_HELP)]);
    }

    #[test]
    fn rejects_two_kinds() {
        let f = faults(json!({"all": [], "not": {"all": []}}));
        assert_eq!(f.len(), 1);
        assert!(f[0].message.contains("all and not"), "{}", f[0]);
    }

    #[test]
    fn rejects_all_not_array() {
        let f = faults(json!({"all": {"field": "contact.a", "op": "exists"}}));
        assert_eq!(f[0].path, "$.c.all");
        assert!(f[0].message.contains("must be an array"));
        let f = faults(json!({"any": "x"}));
        assert_eq!(f[0].path, "$.c.any");
    }

    #[test]
    fn collects_all_faults_with_paths() {
        let f = faults(json!({"any": [
            {"field": "contact.a", "op": "eq", "value": 1},
            {"field": "user.a", "op": "eq", "value": 1},
            {"not": {"field": "event.x", "op": "bogus", "value": 1}},
            {"field": "event.y", "op": "in", "value": "notarray"}
        ]}));
        let paths: Vec<&str> = f.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            vec!["$.c.any[1].field", "$.c.any[2].not.op", "$.c.any[3].value"]
        );
    }

    #[test]
    fn rejects_bad_field() {
        for bad in [
            "plan",
            "contact.",
            "contact",
            "event..x",
            "context.a.",
            ".event.x",
            "Contact.plan",
        ] {
            let f = faults(json!({"field": bad, "op": "exists"}));
            assert_eq!(f.len(), 1, "{bad}");
            assert_eq!(f[0].path, "$.c.field");
            assert!(
                f[0].message
                    .contains("field must start with contact., event. or context."),
                "{}",
                f[0]
            );
        }
        let f = faults(json!({"field": 3, "op": "exists"}));
        assert_eq!(f[0].path, "$.c.field");
    }

    #[test]
    fn rejects_leaf_without_field() {
        let f = faults(json!({"op": "eq", "value": 1}));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].path, "$.c.field");
        assert!(f[0].message.starts_with("field is required"), "{}", f[0]);
        let f = faults(json!({"value": 1}));
        let paths: Vec<&str> = f.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, vec!["$.c.field", "$.c.op"]);
    }

    #[test]
    fn rejects_missing_op_and_lists_ops() {
        let f = faults(json!({"field": "contact.a", "value": 1}));
        assert_eq!(f[0].path, "$.c.op");
        assert!(f[0].message.contains("starts_with"));
    }

    #[test]
    fn rejects_unknown_op() {
        let f = faults(json!({"field": "contact.a", "op": "EQ", "value": 1}));
        assert_eq!(f[0].path, "$.c.op");
        assert!(f[0].message.contains("unknown op \"EQ\""));
        assert!(f[0].message.contains("eq, ne, gt"));
        let f = faults(json!({"field": "contact.a", "op": 7, "value": 1}));
        assert_eq!(f[0].path, "$.c.op");
    }

    #[test]
    fn rejects_unknown_keys() {
        let f = faults(json!({"field": "contact.a", "op": "eq", "value": 1, "vaule": 2}));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].path, "$.c.vaule");
        assert!(f[0].message.contains("field, op, value"));
        let f = faults(json!({"not": {"all": []}, "x y": 1}));
        assert_eq!(f[0].path, "$.c[\"x y\"]");
        let f = faults(json!({"all": [], "extra": 1}));
        assert_eq!(f[0].path, "$.c.extra");
    }

    #[test]
    fn rejects_missing_value_except_exists() {
        let f = faults(json!({"field": "contact.a", "op": "eq"}));
        assert_eq!(f, vec![Fault::new("$.c", "value is required for op eq")]);
        assert!(Condition::parse(&json!({"field": "contact.a", "op": "exists"}), "$").is_ok());
    }

    #[test]
    fn rejects_wrong_value_types() {
        let cases = [
            ("in", json!("a")),
            ("gt", json!(true)),
            ("lte", json!([1])),
            ("starts_with", json!(1)),
            ("ends_with", json!(null)),
            ("exists", json!("yes")),
            ("contains", json!([1])),
            ("contains", json!({"a": 1})),
            ("eq", json!(null)),
        ];
        for (op, value) in cases {
            let f = faults(json!({"field": "contact.a", "op": op, "value": value}));
            assert_eq!(f.len(), 1, "{op} {value}");
            assert_eq!(f[0].path, "$.c.value", "{op}");
            assert!(f[0].message.contains(op), "{}", f[0]);
        }
    }

    #[test]
    fn accepts_right_value_types() {
        for (op, value) in [
            ("gt", json!("2024-01-01")),
            ("gte", json!(3)),
            ("contains", json!(true)),
            ("exists", json!(false)),
            ("in", json!([])),
            ("eq", json!({"a": [1]})),
        ] {
            assert!(
                Condition::parse(&json!({"field": "event.a", "op": op, "value": value}), "$")
                    .is_ok(),
                "{op}"
            );
        }
    }

    #[test]
    fn rejects_too_deep_nesting_without_overflow() {
        let mut v = json!({"field": "contact.a", "op": "exists"});
        for _ in 0..200 {
            v = json!({ "not": v });
        }
        let f = Condition::parse(&v, "$").unwrap_err();
        assert_eq!(f.len(), 1);
        assert!(f[0].message.contains("nest"));
        assert!(f[0].path.starts_with("$.not.not"));
    }

    #[test]
    fn nesting_at_limit_is_fine() {
        let mut v = json!({"field": "contact.a", "op": "exists"});
        for _ in 0..MAX_DEPTH - 1 {
            v = json!({ "not": v });
        }
        assert!(Condition::parse(&v, "$").is_ok());
    }

    // ---- evaluation ----

    #[test]
    fn eq_ne_numeric_aware() {
        assert!(leaf_on(json!(1), "eq", json!(1.0)));
        assert!(!leaf_on(json!(1), "eq", json!("1")));
        assert!(leaf_on(json!("pro"), "eq", json!("pro")));
        assert!(!leaf_on(json!("Pro"), "eq", json!("pro")));
        assert!(leaf_on(
            json!([1, {"a": 2.0}]),
            "eq",
            json!([1.0, {"a": 2}])
        ));
        assert!(leaf_on(json!(2), "ne", json!(1)));
        assert!(!leaf_on(json!(2), "ne", json!(2.0)));
        assert!(!leaf_on(json!(u64::MAX), "eq", json!(u64::MAX - 1)));
    }

    #[test]
    fn absent_field_semantics() {
        assert!(!leaf_missing("eq", Some(json!(1))));
        assert!(leaf_missing("ne", Some(json!(1))));
        for op in ["gt", "gte", "lt", "lte"] {
            assert!(!leaf_missing(op, Some(json!(1))), "{op}");
        }
        assert!(!leaf_missing("in", Some(json!([1]))));
        assert!(!leaf_missing("contains", Some(json!("a"))));
        assert!(!leaf_missing("starts_with", Some(json!(""))));
        assert!(!leaf_missing("ends_with", Some(json!(""))));
        assert!(!leaf_missing("exists", None));
        assert!(!leaf_missing("exists", Some(json!(true))));
        assert!(leaf_missing("exists", Some(json!(false))));
    }

    #[test]
    fn null_is_absent() {
        assert!(!leaf_on(json!(null), "exists", json!(true)));
        assert!(leaf_on(json!(null), "exists", json!(false)));
        assert!(leaf_on(json!(null), "ne", json!(1)));
        assert!(leaf_on(json!(0), "exists", json!(true)));
        assert!(leaf_on(json!(""), "exists", json!(true)));
        assert!(!leaf_on(json!(""), "exists", json!(false)));
    }

    #[test]
    fn ordering_ops() {
        assert!(leaf_on(json!(5), "gt", json!(4.5)));
        assert!(!leaf_on(json!(5), "gt", json!(5)));
        assert!(leaf_on(json!(5), "gte", json!(5.0)));
        assert!(leaf_on(json!(-1), "lt", json!(0)));
        assert!(leaf_on(json!(0), "lte", json!(0)));
        assert!(!leaf_on(json!(1), "lte", json!(0)));
        assert!(leaf_on(json!("2026-03-02"), "gt", json!("2026-02-28")));
        assert!(leaf_on(json!("b"), "gt", json!("a")));
        assert!(!leaf_on(json!("B"), "gt", json!("a")));
    }

    #[test]
    fn ordering_mixed_types() {
        assert!(leaf_on(json!("10"), "gt", json!(9)));
        assert!(leaf_on(json!(" 2.5 "), "lt", json!(3)));
        assert!(leaf_on(json!(10), "gt", json!("9")));
        assert!(!leaf_on(json!("ten"), "gt", json!(9)));
        assert!(!leaf_on(json!("NaN"), "gt", json!(9)));
        assert!(!leaf_on(json!(true), "gt", json!(0)));
        assert!(!leaf_on(json!([5]), "gt", json!(0)));
        assert!(!leaf_on(json!({"a": 1}), "lt", json!("z")));
    }

    #[test]
    fn in_op() {
        assert!(leaf_on(json!("pro"), "in", json!(["free", "pro"])));
        assert!(leaf_on(json!(2.0), "in", json!([1, 2])));
        assert!(!leaf_on(json!("x"), "in", json!([])));
        assert!(!leaf_on(json!("2"), "in", json!([2])));
    }

    #[test]
    fn contains_op() {
        assert!(leaf_on(json!("hello world"), "contains", json!("o w")));
        assert!(!leaf_on(json!("hello"), "contains", json!("H")));
        assert!(!leaf_on(json!("hello 1"), "contains", json!(1)));
        assert!(leaf_on(json!(["vip", "beta"]), "contains", json!("vip")));
        assert!(leaf_on(json!([1, 2]), "contains", json!(2.0)));
        assert!(!leaf_on(json!(["vip"]), "contains", json!("vi")));
        assert!(!leaf_on(json!({"vip": true}), "contains", json!("vip")));
        assert!(!leaf_on(json!(12), "contains", json!(1)));
    }

    #[test]
    fn prefix_suffix_ops() {
        assert!(leaf_on(
            json!("ann@example.com"),
            "ends_with",
            json!("@example.com")
        ));
        assert!(!leaf_on(
            json!("ann@example.com"),
            "ends_with",
            json!("@EXAMPLE.com")
        ));
        assert!(leaf_on(
            json!("ann@example.com"),
            "starts_with",
            json!("ann")
        ));
        assert!(!leaf_on(json!(123), "starts_with", json!("1")));
    }

    #[test]
    fn nested_paths_and_array_indexes() {
        let c = cond(json!({"all": [
            {"field": "event.utm.source", "op": "eq", "value": "google"},
            {"field": "event.items.1.sku", "op": "eq", "value": "B"},
            {"field": "context.crm.score", "op": "gte", "value": 50}
        ]}));
        let event = json!({"utm": {"source": "google"}, "items": [{"sku": "A"}, {"sku": "B"}]});
        let context = json!({"crm": {"score": 70}});
        let facts = Facts {
            contact: None,
            event: Some(&event),
            context: Some(&context),
        };
        assert!(c.eval(&facts));
        let low = json!({"crm": {"score": 10}});
        assert!(!c.eval(&Facts {
            context: Some(&low),
            ..facts
        }));
    }

    #[test]
    fn resolve_edge_cases() {
        let event = json!({"items": ["a"], "s": "str", "obj": {"0": "zero"}});
        let facts = Facts {
            event: Some(&event),
            ..Facts::default()
        };
        let get = |f: &str| Field::parse(f).unwrap().resolve(&facts).cloned();
        assert_eq!(get("event.items.0"), Some(json!("a")));
        assert_eq!(get("event.items.1"), None);
        assert_eq!(get("event.items.x"), None);
        assert_eq!(get("event.items.-1"), None);
        assert_eq!(get("event.s.length"), None);
        assert_eq!(get("event.obj.0"), Some(json!("zero")));
        assert_eq!(get("contact.email"), None);
    }

    #[test]
    fn boolean_combinators() {
        let t = json!({"field": "contact.a", "op": "exists"});
        let f = json!({"field": "contact.zz", "op": "exists"});
        let contact = json!({"a": 1});
        let facts = Facts {
            contact: Some(&contact),
            ..Facts::default()
        };
        let ev = |v: Value| cond(v).eval(&facts);
        assert!(ev(json!({"all": [t, t]})));
        assert!(!ev(json!({"all": [t, f]})));
        assert!(ev(json!({"any": [f, t]})));
        assert!(!ev(json!({"any": [f, f]})));
        assert!(ev(json!({"not": f})));
        assert!(!ev(json!({"not": t})));
    }

    #[test]
    fn tests_count_leaves_and_in_values() {
        assert_eq!(cond(json!({"all": []})).tests(), 0);
        assert_eq!(
            cond(json!({"all": [
                {"field": "contact.a", "op": "exists"},
                {"not": {"any": [
                    {"field": "contact.b", "op": "in", "value": [1, 2, 3]},
                    {"field": "contact.c", "op": "in", "value": []}
                ]}}
            ]}))
            .tests(),
            5
        );
    }

    #[test]
    fn scopes_reports_what_is_read() {
        let c = cond(json!({"any": [
            {"field": "event.a", "op": "exists"},
            {"not": {"field": "context.b", "op": "exists"}}
        ]}));
        assert_eq!(
            c.scopes(),
            ScopeSet {
                contact: false,
                event: true,
                context: true
            }
        );
        assert!(!c.scopes().reads(Scope::Contact));
        assert_eq!(cond(json!({"all": []})).scopes(), ScopeSet::default());
        let u = c.scopes().union(ScopeSet {
            contact: true,
            ..ScopeSet::default()
        });
        assert!(u.contact && u.event && u.context);
    }
}

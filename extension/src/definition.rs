//! Validating an automation definition.
//!
//! A definition is JSON written by a SQL user. `validate` turns it into a
//! typed [`Automation`] or reports every problem at once, each located by a
//! JSONPath-like path, so the engine never has to re-check a stored
//! definition and the user never has to fix faults one round trip at a time.
//!
//! Besides per-node checks, the graph is checked: every target must exist,
//! every node must be reachable from `start`, and every cycle must pass
//! through a wait node (delay, wait_event, approval) so an enrollment can
//! never loop without pausing.
//!
//! Limits: a definition is written by one tenant and validated inside a
//! Postgres backend that serves all of them, so its size bounds the work.
//! Validation is linear in the definition apart from the wait-free-cycle
//! search (a breadth-first search per non-wait node on a cycle, bounded by
//! the size limit), and takes milliseconds at the limits:
//!
//! | limit                         | value   | fault at                         |
//! |-------------------------------|---------|----------------------------------|
//! | definition text (jsonb form)  | 256 KiB | `$` ([`validate_text`])          |
//! | nesting of arrays and objects | 100     | `$` ([`validate_text`])          |
//! | nodes                         | 1,000   | `$.nodes`                        |
//! | paths of a branch             | 100     | `$.nodes.<id>.paths`             |
//! | variants of a split           | 100     | `$.nodes.<id>.variants`          |
//! | paths of a decide             | 100     | `$.nodes.<id>.paths`             |
//! | condition tests in all        | 5,000   | the condition that goes over     |
//! | entries of a tag/list list    | 100     | `$.nodes.<id>.add_tags` etc.     |
//! | attributes of a `set`         | 100     | `$.nodes.<id>.set`               |
//! | conditions nest (condition.rs)| 32      | the condition too deep           |
//!
//! A condition test is one field/op/value leaf; an `in` leaf counts one per
//! value of its list, since evaluating it compares with each.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value};

use crate::condition::Condition;
use crate::duration::{parse_duration, TimeWindow};
use crate::fault::{child, index, reject_unknown_keys, type_name, Fault};

/// How often the same contact may enter the automation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reentry {
    /// At most one enrollment per contact, ever.
    #[default]
    Once,
    /// Again once the previous enrollment has ended.
    AfterExit,
    /// On every trigger, even while already enrolled.
    Always,
}

impl Reentry {
    pub fn as_str(self) -> &'static str {
        match self {
            Reentry::Once => "once",
            Reentry::AfterExit => "after_exit",
            Reentry::Always => "always",
        }
    }
}

/// The event that enrolls contacts, optionally narrowed by a condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    pub event: String,
    pub filter: Option<Condition>,
}

/// A validated automation definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Automation {
    pub name: String,
    /// Absent for enroll-only automations.
    pub trigger: Option<Trigger>,
    pub reentry: Reentry,
    pub start: String,
    pub nodes: BTreeMap<String, Node>,
    /// Top-level "goal": once it holds for the contact, the enrollment completes.
    pub goal: Option<Condition>,
}

impl Automation {
    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.get(id)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub id: String,
    pub kind: NodeKind,
}

/// What a delay node waits for.
#[derive(Debug, Clone, PartialEq)]
pub enum DelaySpec {
    Duration(Duration),
    Until(DateTime<Utc>),
    Window(TimeWindow),
}

/// One step of an automation. A `next` of `None` means the enrollment
/// completes after the step (for `Filter::otherwise`: the enrollment exits).
#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    Email {
        template: String,
        provider: String,
        next: Option<String>,
        on_error: Option<String>,
    },
    Webhook {
        url: String,
        method: String,
        headers: BTreeMap<String, String>,
        body: Option<Value>,
        timeout_ms: u64,
        next: Option<String>,
        on_error: Option<String>,
    },
    Delay {
        wait: DelaySpec,
        next: String,
    },
    Branch {
        paths: Vec<(Condition, String)>,
        default: String,
    },
    Filter {
        when: Condition,
        next: String,
        otherwise: Option<String>,
    },
    Split {
        variants: Vec<(f64, String)>,
    },
    UpdateContact {
        set: Map<String, Value>,
        add_tags: Vec<String>,
        remove_tags: Vec<String>,
        add_lists: Vec<String>,
        remove_lists: Vec<String>,
        next: String,
    },
    WaitEvent {
        event: String,
        filter: Option<Condition>,
        timeout: Duration,
        next: String,
        timeout_next: String,
    },
    Approval {
        approved: String,
        rejected: String,
        timeout: Option<Duration>,
        timeout_next: Option<String>,
    },
    Decide {
        url: String,
        method: String,
        headers: BTreeMap<String, String>,
        body: Option<Value>,
        timeout_ms: u64,
        field: String,
        paths: BTreeMap<String, String>,
        default: String,
        cache_ttl: Duration,
    },
    Goal {
        next: Option<String>,
    },
    Exit,
}

/// Every node type, in the order they are listed to users.
pub const NODE_TYPES: &[&str] = &[
    "email",
    "webhook",
    "delay",
    "branch",
    "filter",
    "split",
    "update_contact",
    "wait_event",
    "approval",
    "decide",
    "goal",
    "exit",
];

impl NodeKind {
    /// Node ids this node can lead to, without duplicates.
    pub fn successors(&self) -> Vec<&str> {
        let all: Vec<&String> = match self {
            NodeKind::Email { next, on_error, .. } | NodeKind::Webhook { next, on_error, .. } => {
                next.iter().chain(on_error).collect()
            }
            NodeKind::Delay { next, .. } | NodeKind::UpdateContact { next, .. } => vec![next],
            NodeKind::Branch { paths, default } => paths
                .iter()
                .map(|(_, s)| s)
                .chain(std::iter::once(default))
                .collect(),
            NodeKind::Filter {
                next, otherwise, ..
            } => std::iter::once(next).chain(otherwise).collect(),
            NodeKind::Split { variants } => variants.iter().map(|(_, s)| s).collect(),
            NodeKind::WaitEvent {
                next, timeout_next, ..
            } => vec![next, timeout_next],
            NodeKind::Approval {
                approved,
                rejected,
                timeout_next,
                ..
            } => [approved, rejected]
                .into_iter()
                .chain(timeout_next)
                .collect(),
            NodeKind::Decide { paths, default, .. } => {
                paths.values().chain(std::iter::once(default)).collect()
            }
            NodeKind::Goal { next } => next.iter().collect(),
            NodeKind::Exit => Vec::new(),
        };
        // a set, not `Vec::contains`: a node may list many targets
        let mut seen: HashSet<&str> = HashSet::with_capacity(all.len());
        all.into_iter()
            .map(String::as_str)
            .filter(|s| seen.insert(s))
            .collect()
    }

    /// Wait nodes pause the enrollment, which is what makes a cycle safe.
    pub fn is_wait(&self) -> bool {
        matches!(
            self,
            NodeKind::Delay { .. } | NodeKind::WaitEvent { .. } | NodeKind::Approval { .. }
        )
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            NodeKind::Email { .. } => "email",
            NodeKind::Webhook { .. } => "webhook",
            NodeKind::Delay { .. } => "delay",
            NodeKind::Branch { .. } => "branch",
            NodeKind::Filter { .. } => "filter",
            NodeKind::Split { .. } => "split",
            NodeKind::UpdateContact { .. } => "update_contact",
            NodeKind::WaitEvent { .. } => "wait_event",
            NodeKind::Approval { .. } => "approval",
            NodeKind::Decide { .. } => "decide",
            NodeKind::Goal { .. } => "goal",
            NodeKind::Exit => "exit",
        }
    }
}

const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "trigger",
    "reentry",
    "start",
    "nodes",
    "goal",
];
const MAX_NAME_CHARS: usize = 200;
/// Keeps graph checks cheap inside a Postgres backend.
pub const MAX_NODES: usize = 1000;
/// The definition's text as Postgres prints the jsonb (what `_check_automation` and tick see).
pub const MAX_DEFINITION_BYTES: usize = 256 * 1024;
/// Arrays and objects nested in each other; serde_json stops at 128, and tick nests a definition
/// one level deeper in its batch. Conditions at their own limit (32) need about 70.
pub const MAX_DEFINITION_DEPTH: usize = 100;
pub const MAX_BRANCH_PATHS: usize = 100;
pub const MAX_SPLIT_VARIANTS: usize = 100;
pub const MAX_DECIDE_PATHS: usize = 100;
/// Condition tests over the whole automation (trigger filter, goal, branches, filters, wait_event
/// filters): every enrollment may evaluate them on every tick.
pub const MAX_CONDITION_TESTS: usize = 5000;
/// Entries of each of add_tags, remove_tags, add_lists, remove_lists.
pub const MAX_LIST_ENTRIES: usize = 100;
/// Attributes an update_contact node may set.
pub const MAX_SET_ATTRIBUTES: usize = 100;
/// Wait-free cycles reported one by one; the nodes of any further ones are listed in one fault.
const MAX_CYCLE_FAULTS: usize = 20;
/// Edges the shortest-cycle searches may look at in all (a few milliseconds): past it, the nodes on
/// wait-free cycles not reported yet are listed in one fault. Only graphs near the size limit made
/// of long wait-free cycles get there.
const CYCLE_SEARCH_BUDGET: usize = 250_000;
const MAX_URL_LEN: usize = 2048;
pub const MAX_TIMEOUT_MS: u64 = 120_000;
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];
const WAIT_HELP: &str = "add a delay, wait_event or approval node to it";

/// Validates a definition given as JSON text: its size and nesting are checked before it is parsed,
/// so an oversized or too deeply nested one gets a fault naming the limit instead of a parser error.
pub fn validate_text(text: &str) -> Result<Automation, Vec<Fault>> {
    validate(&read_text(text)?)
}

/// Parses a definition's text once its size and nesting are within the limits.
pub fn read_text(text: &str) -> Result<Value, Vec<Fault>> {
    if let Some(problem) =
        crate::json_limits::fault(text, MAX_DEFINITION_DEPTH, MAX_DEFINITION_BYTES)
    {
        return Err(vec![Fault::new("$", format!("the definition {problem}"))]);
    }
    serde_json::from_str(text).map_err(|e| {
        vec![Fault::new(
            "$",
            format!("the definition is not valid JSON: {e}"),
        )]
    })
}

/// Validates a definition; on failure returns every fault found.
pub fn validate(def: &Value) -> Result<Automation, Vec<Fault>> {
    let mut cx = Cx::default();
    let Value::Object(top) = def else {
        return Err(vec![Fault::new(
            "$",
            format!(
                "an automation definition must be a JSON object with name, start and nodes; got {}",
                type_name(def)
            ),
        )]);
    };
    reject_unknown_keys(top, TOP_KEYS, "$", "at the top level", &mut cx.faults);

    let name = parse_name(top.get("name"), &mut cx.faults);
    if let Some(d) = top.get("description") {
        if !d.is_string() && !d.is_null() {
            cx.fault(
                "$.description",
                format!("description must be a string; got {}", type_name(d)),
            );
        }
    }
    let trigger = match top.get("trigger") {
        None | Some(Value::Null) => Some(None),
        Some(t) => parse_trigger(t, &mut cx).map(Some),
    };
    let reentry = match top.get("reentry") {
        None | Some(Value::Null) => Some(Reentry::Once),
        Some(Value::String(s)) if s == "once" => Some(Reentry::Once),
        Some(Value::String(s)) if s == "after_exit" => Some(Reentry::AfterExit),
        Some(Value::String(s)) if s == "always" => Some(Reentry::Always),
        Some(other) => {
            cx.fault(
                "$.reentry",
                format!("reentry must be \"once\" (the default), \"after_exit\" or \"always\"; got {other}"),
            );
            None
        }
    };
    let goal = match top.get("goal") {
        None | Some(Value::Null) => Some(None),
        Some(g) => cx.condition(g, "$.goal").map(Some),
    };

    let ids: Option<BTreeSet<String>> = match top.get("nodes") {
        None => {
            cx.fault(
                "$.nodes",
                "nodes is required: an object mapping node ids to nodes",
            );
            None
        }
        Some(Value::Object(map)) if map.is_empty() => {
            cx.fault("$.nodes", "nodes must contain at least one node");
            None
        }
        Some(Value::Object(map)) => Some(map.keys().cloned().collect()),
        Some(other) => {
            cx.fault(
                "$.nodes",
                format!(
                    "nodes must be an object mapping node ids to nodes; got {}",
                    type_name(other)
                ),
            );
            None
        }
    };

    let mut nodes = BTreeMap::new();
    let mut all_parsed = true;
    if let (Some(Value::Object(map)), Some(ids)) = (top.get("nodes"), &ids) {
        // too many: the count is the fault; parsing them all is work a hostile definition asks for
        let too_many = ids.len() > MAX_NODES;
        if too_many {
            cx.fault(
                "$.nodes",
                format!(
                    "an automation may have at most {MAX_NODES} nodes; this one has {}",
                    ids.len()
                ),
            );
            all_parsed = false;
        }
        for id in ids.iter().filter(|_| !too_many) {
            let path = child("$.nodes", id);
            if !valid_id(id) {
                cx.fault(
                    &path,
                    format!("node id {id:?} must be 1-64 characters of A-Z, a-z, 0-9, _ and -"),
                );
            }
            let before = cx.faults.len();
            let kind = map.get(id).and_then(|v| parse_node(v, &path, &mut cx));
            match kind {
                Some(kind) if cx.faults.len() == before => {
                    nodes.insert(
                        id.clone(),
                        Node {
                            id: id.clone(),
                            kind,
                        },
                    );
                }
                _ => all_parsed = false,
            }
        }
    }

    let start = match top.get("start") {
        None => {
            cx.fault("$.start", "start is required: the id of the first node");
            None
        }
        Some(Value::String(s)) => {
            if let Some(ids) = &ids {
                if !ids.contains(s) {
                    cx.fault("$.start", not_a_node(s, ids));
                }
            }
            Some(s.clone())
        }
        Some(other) => {
            cx.fault(
                "$.start",
                format!(
                    "start must be the id of a node (a string); got {}",
                    type_name(other)
                ),
            );
            None
        }
    };

    if let Some(ids) = &ids {
        let refs = std::mem::take(&mut cx.refs);
        for (path, target) in refs {
            if !ids.contains(&target) {
                cx.fault(&path, not_a_node(&target, ids));
            }
        }
        if ids.len() <= MAX_NODES {
            check_graph(&nodes, start.as_deref(), all_parsed, ids, &mut cx.faults);
        }
    }

    match (name, trigger, reentry, goal, start) {
        (Some(name), Some(trigger), Some(reentry), Some(goal), Some(start))
            if cx.faults.is_empty() =>
        {
            Ok(Automation {
                name,
                trigger,
                reentry,
                start,
                nodes,
                goal,
            })
        }
        _ => Err(cx.faults),
    }
}

/// Faults found so far, node references to check once all ids are known, and the condition tests
/// counted against [`MAX_CONDITION_TESTS`].
#[derive(Default)]
struct Cx {
    faults: Vec<Fault>,
    refs: Vec<(String, String)>,
    tests: usize,
}

impl Cx {
    fn fault(&mut self, path: &str, message: impl Into<String>) {
        self.faults.push(Fault::new(path, message));
    }

    fn condition(&mut self, v: &Value, path: &str) -> Option<Condition> {
        let c = Condition::parse(v, path)
            .map_err(|fs| self.faults.extend(fs))
            .ok()?;
        let before = self.tests;
        self.tests = before.saturating_add(c.tests());
        if before <= MAX_CONDITION_TESTS && self.tests > MAX_CONDITION_TESTS {
            self.fault(
                path,
                format!(
                    "the automation's conditions reach {} tests here; at most {MAX_CONDITION_TESTS} are allowed in all (a field test counts 1, an \"in\" test 1 per value in its list)",
                    self.tests
                ),
            );
            return None;
        }
        Some(c)
    }
}

fn parse_name(v: Option<&Value>, faults: &mut Vec<Fault>) -> Option<String> {
    let problem = match v {
        None => "name is required: a non-empty string".to_owned(),
        Some(Value::String(s)) if s.trim().is_empty() => "name must not be empty".to_owned(),
        Some(Value::String(s)) if s.chars().count() > MAX_NAME_CHARS => {
            format!("name must be at most {MAX_NAME_CHARS} characters")
        }
        Some(Value::String(s)) if s.chars().any(char::is_control) => {
            "name must not contain control characters such as line breaks".to_owned()
        }
        Some(Value::String(s)) => return Some(s.clone()),
        Some(other) => format!("name must be a non-empty string; got {}", type_name(other)),
    };
    faults.push(Fault::new("$.name", problem));
    None
}

fn parse_trigger(v: &Value, cx: &mut Cx) -> Option<Trigger> {
    let Value::Object(obj) = v else {
        cx.fault(
            "$.trigger",
            format!(
                "trigger must be an object like {{\"event\": \"contact.created\", \"filter\": {{...}}}}; got {}",
                type_name(v)
            ),
        );
        return None;
    };
    reject_unknown_keys(
        obj,
        &["event", "filter"],
        "$.trigger",
        "in a trigger",
        &mut cx.faults,
    );
    let event = match obj.get("event") {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
        None | Some(Value::Null) => {
            cx.fault(
                "$.trigger.event",
                "event is required: the event kind that enrolls contacts, e.g. \"contact.created\"",
            );
            None
        }
        Some(other) => {
            cx.fault(
                "$.trigger.event",
                format!("event must be a non-empty string; got {other}"),
            );
            None
        }
    };
    let filter = match obj.get("filter") {
        None | Some(Value::Null) => Some(None),
        Some(f) => cx.condition(f, "$.trigger.filter").map(Some),
    };
    Some(Trigger {
        event: event?,
        filter: filter?,
    })
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn not_a_node(target: &str, ids: &BTreeSet<String>) -> String {
    const SHOWN: usize = 20;
    let list: Vec<&str> = ids.iter().take(SHOWN).map(String::as_str).collect();
    let more = ids.len().saturating_sub(SHOWN);
    let suffix = if more > 0 {
        format!(", … ({more} more)")
    } else {
        String::new()
    };
    format!(
        "{target:?} is not a node; nodes are: {}{suffix}",
        list.join(", ")
    )
}

/// "an email", "a delay": messages read as English.
fn a_node_type(ty: &str) -> String {
    let article = if ty.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {ty}")
}

fn allowed_fields(ty: &str) -> &'static [&'static str] {
    match ty {
        "email" => &["type", "template", "provider", "next", "on_error"],
        "webhook" => &[
            "type",
            "url",
            "method",
            "headers",
            "body",
            "timeout_ms",
            "next",
            "on_error",
        ],
        "delay" => &["type", "duration", "until", "window", "next"],
        "branch" => &["type", "paths", "default"],
        "filter" => &["type", "when", "next", "otherwise"],
        "split" => &["type", "variants"],
        "update_contact" => &[
            "type",
            "set",
            "add_tags",
            "remove_tags",
            "add_lists",
            "remove_lists",
            "next",
        ],
        "wait_event" => &["type", "event", "filter", "timeout", "next", "timeout_next"],
        "approval" => &["type", "approved", "rejected", "timeout", "timeout_next"],
        "decide" => &[
            "type",
            "url",
            "method",
            "headers",
            "body",
            "timeout_ms",
            "field",
            "paths",
            "default",
            "cache_ttl",
        ],
        "goal" => &["type", "next"],
        _ => &["type"],
    }
}

/// Reads the fields of one node object, recording faults and references.
struct NodeReader<'a> {
    obj: &'a Map<String, Value>,
    path: &'a str,
    ty: &'static str,
}

impl<'a> NodeReader<'a> {
    fn at(&self, key: &str) -> String {
        child(self.path, key)
    }

    /// The value of `key`; JSON null counts as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn required(&self, key: &str, what: &str, cx: &mut Cx) -> Option<&'a Value> {
        let v = self.get(key);
        if v.is_none() {
            cx.fault(
                &self.at(key),
                format!(
                    "{key} is required for {} node: {what}",
                    a_node_type(self.ty)
                ),
            );
        }
        v
    }

    fn string_of(&self, key: &str, v: &Value, cx: &mut Cx) -> Option<String> {
        match v {
            Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            other => {
                cx.fault(
                    &self.at(key),
                    format!("{key} must be a non-empty string; got {other}"),
                );
                None
            }
        }
    }

    fn req_string(&self, key: &str, what: &str, cx: &mut Cx) -> Option<String> {
        let v = self.required(key, what, cx)?;
        self.string_of(key, v, cx)
    }

    /// `Some(None)` when absent, `None` when present but invalid.
    fn opt_string(&self, key: &str, cx: &mut Cx) -> Option<Option<String>> {
        match self.get(key) {
            None => Some(None),
            Some(v) => self.string_of(key, v, cx).map(Some),
        }
    }

    fn target_of(&self, key_path: String, key: &str, v: &Value, cx: &mut Cx) -> Option<String> {
        match v {
            Value::String(s) => {
                cx.refs.push((key_path, s.clone()));
                Some(s.clone())
            }
            other => {
                cx.fault(
                    &key_path,
                    format!(
                        "{key} must be the id of a node (a string); got {}",
                        type_name(other)
                    ),
                );
                None
            }
        }
    }

    fn req_target(&self, key: &str, cx: &mut Cx) -> Option<String> {
        let v = self.required(key, "the id of the node to go to", cx)?;
        self.target_of(self.at(key), key, v, cx)
    }

    fn opt_target(&self, key: &str, cx: &mut Cx) -> Option<Option<String>> {
        match self.get(key) {
            None => Some(None),
            Some(v) => self.target_of(self.at(key), key, v, cx).map(Some),
        }
    }

    fn duration_of(&self, key: &str, v: &Value, cx: &mut Cx) -> Option<Duration> {
        let parsed = match v {
            Value::String(s) => parse_duration(s),
            other => Err(format!(
                "{key} must be a duration string such as \"2 days\" or \"1 hour 30 minutes\"; got {}",
                type_name(other)
            )),
        };
        parsed.map_err(|e| cx.fault(&self.at(key), e)).ok()
    }

    fn req_positive_duration(&self, key: &str, cx: &mut Cx) -> Option<Duration> {
        let v = self.required(key, "a duration such as \"3 days\"", cx)?;
        self.positive(key, self.duration_of(key, v, cx)?, cx)
    }

    fn positive(&self, key: &str, d: Duration, cx: &mut Cx) -> Option<Duration> {
        if d <= Duration::zero() {
            cx.fault(
                &self.at(key),
                format!("{key} must be longer than 0 seconds"),
            );
            return None;
        }
        Some(d)
    }

    fn condition(&self, key: &str, v: &Value, cx: &mut Cx) -> Option<Condition> {
        cx.condition(v, &self.at(key))
    }

    fn string_list(&self, key: &str, cx: &mut Cx) -> Option<Vec<String>> {
        let Some(v) = self.get(key) else {
            return Some(Vec::new());
        };
        let Value::Array(items) = v else {
            cx.fault(
                &self.at(key),
                format!("{key} must be an array of strings; got {}", type_name(v)),
            );
            return None;
        };
        if items.len() > MAX_LIST_ENTRIES {
            cx.fault(
                &self.at(key),
                format!(
                    "{key} may have at most {MAX_LIST_ENTRIES} entries; this one has {}",
                    items.len()
                ),
            );
            return None;
        }
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::String(s) if !s.trim().is_empty() => {
                    if seen.insert(s.as_str()) {
                        out.push(s.clone());
                    }
                }
                other => {
                    ok = false;
                    cx.fault(
                        &index(&self.at(key), i),
                        format!("{key} entries must be non-empty strings; got {other}"),
                    );
                }
            }
        }
        ok.then_some(out)
    }
}

fn parse_node(v: &Value, path: &str, cx: &mut Cx) -> Option<NodeKind> {
    let Value::Object(obj) = v else {
        cx.fault(
            path,
            format!(
                "a node must be an object with a \"type\"; got {}",
                type_name(v)
            ),
        );
        return None;
    };
    let known = NODE_TYPES.join(", ");
    let ty: &'static str = match obj.get("type") {
        None => {
            cx.fault(
                &child(path, "type"),
                format!("type is required; known types: {known}"),
            );
            return None;
        }
        Some(Value::String(s)) => match NODE_TYPES.iter().find(|t| **t == s.as_str()) {
            Some(t) => t,
            None => {
                cx.fault(
                    &child(path, "type"),
                    format!("unknown node type {s:?}; known types: {known}"),
                );
                return None;
            }
        },
        Some(other) => {
            cx.fault(
                &child(path, "type"),
                format!(
                    "type must be a string, one of: {known}; got {}",
                    type_name(other)
                ),
            );
            return None;
        }
    };
    let place = format!("for {} node", a_node_type(ty));
    reject_unknown_keys(obj, allowed_fields(ty), path, &place, &mut cx.faults);
    let r = NodeReader { obj, path, ty };
    match ty {
        "email" => parse_email(&r, cx),
        "webhook" => {
            let http = parse_http(&r, cx);
            let next = r.opt_target("next", cx);
            let on_error = r.opt_target("on_error", cx);
            let http = http?;
            Some(NodeKind::Webhook {
                url: http.url,
                method: http.method,
                headers: http.headers,
                body: http.body,
                timeout_ms: http.timeout_ms,
                next: next?,
                on_error: on_error?,
            })
        }
        "delay" => parse_delay(&r, cx),
        "branch" => parse_branch(&r, cx),
        "filter" => {
            let when = r
                .required("when", "a condition", cx)
                .and_then(|w| r.condition("when", w, cx));
            let next = r.req_target("next", cx);
            let otherwise = r.opt_target("otherwise", cx);
            Some(NodeKind::Filter {
                when: when?,
                next: next?,
                otherwise: otherwise?,
            })
        }
        "split" => parse_split(&r, cx),
        "update_contact" => parse_update_contact(&r, cx),
        "wait_event" => {
            let event = r.req_string("event", "the event kind to wait for", cx);
            let filter = match r.get("filter") {
                None => Some(None),
                Some(f) => r.condition("filter", f, cx).map(Some),
            };
            let timeout = r.req_positive_duration("timeout", cx);
            let next = r.req_target("next", cx);
            let timeout_next = r.req_target("timeout_next", cx);
            Some(NodeKind::WaitEvent {
                event: event?,
                filter: filter?,
                timeout: timeout?,
                next: next?,
                timeout_next: timeout_next?,
            })
        }
        "approval" => parse_approval(&r, cx),
        "decide" => parse_decide(&r, cx),
        "goal" => Some(NodeKind::Goal {
            next: r.opt_target("next", cx)?,
        }),
        _ => Some(NodeKind::Exit),
    }
}

fn parse_email(r: &NodeReader, cx: &mut Cx) -> Option<NodeKind> {
    let template = r.req_string("template", "the name of the email template", cx);
    let provider = r.opt_string("provider", cx);
    let next = r.opt_target("next", cx);
    let on_error = r.opt_target("on_error", cx);
    Some(NodeKind::Email {
        template: template?,
        provider: provider?.unwrap_or_else(|| "default".to_owned()),
        next: next?,
        on_error: on_error?,
    })
}

/// The request part shared by webhook and decide nodes.
struct Http {
    url: String,
    method: String,
    headers: BTreeMap<String, String>,
    body: Option<Value>,
    timeout_ms: u64,
}

fn parse_http(r: &NodeReader, cx: &mut Cx) -> Option<Http> {
    let url = r
        .required("url", "the http(s) URL to call", cx)
        .and_then(|v| match v.as_str().map(check_url) {
            Some(Ok(())) => v.as_str().map(str::to_owned),
            Some(Err(e)) => {
                cx.fault(&r.at("url"), e);
                None
            }
            None => {
                cx.fault(
                    &r.at("url"),
                    format!("url must be a string; got {}", type_name(v)),
                );
                None
            }
        });
    let method = match r.get("method") {
        None => Some("POST".to_owned()),
        Some(Value::String(m)) if METHODS.contains(&m.to_ascii_uppercase().as_str()) => {
            Some(m.to_ascii_uppercase())
        }
        Some(other) => {
            cx.fault(
                &r.at("method"),
                format!("method must be one of {}; got {other}", METHODS.join(", ")),
            );
            None
        }
    };
    let headers = parse_headers(r, cx);
    let body = r.get("body").cloned();
    let timeout_ms = match r.get("timeout_ms") {
        None => Some(DEFAULT_TIMEOUT_MS),
        Some(v) => match v.as_u64() {
            Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Some(ms),
            _ => {
                cx.fault(
                    &r.at("timeout_ms"),
                    format!("timeout_ms must be a whole number of milliseconds from 1 to {MAX_TIMEOUT_MS}; got {v}"),
                );
                None
            }
        },
    };
    Some(Http {
        url: url?,
        method: method?,
        headers: headers?,
        body,
        timeout_ms: timeout_ms?,
    })
}

fn parse_headers(r: &NodeReader, cx: &mut Cx) -> Option<BTreeMap<String, String>> {
    let Some(v) = r.get("headers") else {
        return Some(BTreeMap::new());
    };
    let Value::Object(map) = v else {
        cx.fault(
            &r.at("headers"),
            format!(
                "headers must be an object of header names to string values; got {}",
                type_name(v)
            ),
        );
        return None;
    };
    let mut out = BTreeMap::new();
    let mut ok = true;
    for (name, value) in map {
        let path = child(&r.at("headers"), name);
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if name.is_empty() || !name.chars().all(token) {
            ok = false;
            cx.fault(&path, format!("{name:?} is not a valid HTTP header name"));
            continue;
        }
        match value {
            Value::String(s) if !s.contains(['\r', '\n']) => {
                out.insert(name.clone(), s.clone());
            }
            Value::String(_) => {
                ok = false;
                cx.fault(&path, "header values must not contain line breaks");
            }
            other => {
                ok = false;
                cx.fault(
                    &path,
                    format!("header values must be strings; got {}", type_name(other)),
                );
            }
        }
    }
    ok.then_some(out)
}

/// Checks for an absolute http(s) URL with a plausible host, by hand so the
/// extension needs no URL crate.
pub fn check_url(s: &str) -> Result<(), String> {
    let help = "url must be an absolute http:// or https:// URL with a host, e.g. \"https://crm.example/hooks/pro\"";
    if s.len() > MAX_URL_LEN {
        return Err(format!("url must be at most {MAX_URL_LEN} characters"));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{help}; it must not contain spaces or control characters"
        ));
    }
    let lower = s.to_ascii_lowercase();
    let scheme_len = if lower.starts_with("https://") {
        8
    } else if lower.starts_with("http://") {
        7
    } else {
        return Err(format!("{help}; got {s:?}"));
    };
    let rest = s.get(scheme_len..).unwrap_or("");
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(
            "url must not contain a user name or password; send credentials in headers".to_owned(),
        );
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((inside, after)) = v6.split_once(']') else {
            return Err(format!("{help}; unclosed [ in host"));
        };
        if inside.is_empty()
            || !inside
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return Err(format!("{help}; bad IPv6 address {inside:?}"));
        }
        match after {
            "" => ("v6", None),
            p => match p.strip_prefix(':') {
                Some(p) => ("v6", Some(p)),
                None => return Err(format!("{help}; unexpected {p:?} after host")),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() {
        return Err(format!("{help}; the host is missing"));
    }
    if !host.split('.').all(label_ok) {
        return Err(format!("{help}; {host:?} is not a valid host name"));
    }
    if let Some(p) = port {
        let valid = !p.is_empty()
            && p.len() <= 5
            && p.chars().all(|c| c.is_ascii_digit())
            && p.parse::<u32>().is_ok_and(|n| (1..=65_535).contains(&n));
        if !valid {
            return Err(format!(
                "{help}; port {p:?} must be a number from 1 to 65535"
            ));
        }
    }
    Ok(())
}

fn parse_delay(r: &NodeReader, cx: &mut Cx) -> Option<NodeKind> {
    let given: Vec<&str> = ["duration", "until", "window"]
        .into_iter()
        .filter(|k| r.get(k).is_some())
        .collect();
    let next = r.req_target("next", cx);
    let wait = match given.as_slice() {
        ["duration"] => r
            .get("duration")
            .and_then(|v| r.duration_of("duration", v, cx))
            .map(DelaySpec::Duration),
        ["until"] => match r.get("until") {
            Some(Value::String(s)) => match DateTime::parse_from_rfc3339(s) {
                Ok(t) => Some(DelaySpec::Until(t.with_timezone(&Utc))),
                Err(_) => {
                    cx.fault(
                        &r.at("until"),
                        format!("until must be an RFC 3339 timestamp such as \"2026-05-01T09:00:00Z\"; got {s:?}"),
                    );
                    None
                }
            },
            other => {
                cx.fault(
                    &r.at("until"),
                    format!(
                        "until must be an RFC 3339 timestamp string such as \"2026-05-01T09:00:00Z\"; got {}",
                        other.map_or("nothing", type_name)
                    ),
                );
                None
            }
        },
        ["window"] => {
            let v = r.get("window")?;
            match TimeWindow::parse(v, &r.at("window")) {
                Ok(w) => Some(DelaySpec::Window(w)),
                Err(fs) => {
                    cx.faults.extend(fs);
                    None
                }
            }
        }
        other => {
            let got = if other.is_empty() {
                "none".to_owned()
            } else {
                other.join(" and ")
            };
            cx.fault(
                r.path,
                format!("a delay node needs exactly one of duration, until or window; got {got}"),
            );
            None
        }
    };
    Some(NodeKind::Delay {
        wait: wait?,
        next: next?,
    })
}

fn parse_branch(r: &NodeReader, cx: &mut Cx) -> Option<NodeKind> {
    let paths = r
        .required(
            "paths",
            "a non-empty array of {\"when\": condition, \"next\": node id}",
            cx,
        )
        .and_then(|v| parse_branch_paths(r, v, cx));
    let default = r.req_target("default", cx);
    Some(NodeKind::Branch {
        paths: paths?,
        default: default?,
    })
}

fn parse_branch_paths(r: &NodeReader, v: &Value, cx: &mut Cx) -> Option<Vec<(Condition, String)>> {
    let path = r.at("paths");
    let items = match v {
        Value::Array(items) if items.len() > MAX_BRANCH_PATHS => {
            cx.fault(
                &path,
                format!(
                    "a branch may have at most {MAX_BRANCH_PATHS} paths; this one has {}",
                    items.len()
                ),
            );
            return None;
        }
        Value::Array(items) if !items.is_empty() => items,
        other => {
            cx.fault(
                &path,
                format!(
                    "paths must be a non-empty array of {{\"when\": condition, \"next\": node id}}; got {}",
                    describe_value(other)
                ),
            );
            return None;
        }
    };
    let mut out = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let item_path = index(&path, i);
        let Value::Object(obj) = item else {
            ok = false;
            cx.fault(
                &item_path,
                format!(
                    "each path must be an object {{\"when\": condition, \"next\": node id}}; got {}",
                    type_name(item)
                ),
            );
            continue;
        };
        reject_unknown_keys(
            obj,
            &["when", "next"],
            &item_path,
            "in a branch path",
            &mut cx.faults,
        );
        let sub = NodeReader {
            obj,
            path: &item_path,
            ty: r.ty,
        };
        let when = sub
            .required("when", "a condition", cx)
            .and_then(|w| sub.condition("when", w, cx));
        let next = sub.req_target("next", cx);
        match (when, next) {
            (Some(w), Some(n)) => out.push((w, n)),
            _ => ok = false,
        }
    }
    ok.then_some(out)
}

fn describe_value(v: &Value) -> String {
    match v {
        Value::Array(a) if a.is_empty() => "an empty array".to_owned(),
        Value::Object(o) if o.is_empty() => "an empty object".to_owned(),
        other => type_name(other).to_owned(),
    }
}

fn parse_split(r: &NodeReader, cx: &mut Cx) -> Option<NodeKind> {
    let v = r.required(
        "variants",
        "an array of {\"weight\": number, \"next\": node id}",
        cx,
    )?;
    let path = r.at("variants");
    let items = match v {
        Value::Array(items) if items.len() > MAX_SPLIT_VARIANTS => {
            cx.fault(
                &path,
                format!(
                    "a split may have at most {MAX_SPLIT_VARIANTS} variants; this one has {}",
                    items.len()
                ),
            );
            return None;
        }
        Value::Array(items) if items.len() >= 2 => items,
        other => {
            cx.fault(
                &path,
                format!(
                    "variants must be an array of at least 2 {{\"weight\": number, \"next\": node id}}; got {}",
                    match other {
                        Value::Array(a) => format!("{} variant(s)", a.len()),
                        o => type_name(o).to_owned(),
                    }
                ),
            );
            return None;
        }
    };
    let mut out = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let item_path = index(&path, i);
        let Value::Object(obj) = item else {
            ok = false;
            cx.fault(
                &item_path,
                format!(
                    "each variant must be an object {{\"weight\": number, \"next\": node id}}; got {}",
                    type_name(item)
                ),
            );
            continue;
        };
        reject_unknown_keys(
            obj,
            &["weight", "next"],
            &item_path,
            "in a split variant",
            &mut cx.faults,
        );
        let sub = NodeReader {
            obj,
            path: &item_path,
            ty: r.ty,
        };
        let weight = sub
            .required("weight", "a positive number", cx)
            .and_then(|w| match w.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Some(x),
                _ => {
                    cx.fault(
                        &sub.at("weight"),
                        format!("weight must be a number greater than 0; got {w}"),
                    );
                    None
                }
            });
        let next = sub.req_target("next", cx);
        match (weight, next) {
            (Some(w), Some(n)) => out.push((w, n)),
            _ => ok = false,
        }
    }
    ok.then_some(NodeKind::Split { variants: out })
}

fn parse_update_contact(r: &NodeReader, cx: &mut Cx) -> Option<NodeKind> {
    let set = match r.get("set") {
        None => Some(Map::new()),
        Some(Value::Object(m)) if m.len() > MAX_SET_ATTRIBUTES => {
            cx.fault(
                &r.at("set"),
                format!(
                    "set may hold at most {MAX_SET_ATTRIBUTES} attributes; this one has {}",
                    m.len()
                ),
            );
            None
        }
        Some(Value::Object(m)) => {
            if m.contains_key("") {
                cx.fault(&r.at("set"), "attribute names in set must not be empty");
            }
            Some(m.clone())
        }
        Some(other) => {
            cx.fault(
                &r.at("set"),
                format!(
                    "set must be an object of attribute names to values (null removes an attribute); got {}",
                    type_name(other)
                ),
            );
            None
        }
    };
    let add_tags = r.string_list("add_tags", cx);
    let remove_tags = r.string_list("remove_tags", cx);
    let add_lists = r.string_list("add_lists", cx);
    let remove_lists = r.string_list("remove_lists", cx);
    let next = r.req_target("next", cx);
    for (added, removed, key) in [
        (&add_tags, &remove_tags, "remove_tags"),
        (&add_lists, &remove_lists, "remove_lists"),
    ] {
        if let (Some(a), Some(rm)) = (added, removed) {
            let a: HashSet<&String> = a.iter().collect();
            for (i, item) in rm.iter().enumerate() {
                if a.contains(item) {
                    cx.fault(
                        &index(&r.at(key), i),
                        format!("{item:?} is both added and removed"),
                    );
                }
            }
        }
    }
    let (set, add_tags, remove_tags, add_lists, remove_lists) =
        (set?, add_tags?, remove_tags?, add_lists?, remove_lists?);
    if set.is_empty()
        && add_tags.is_empty()
        && remove_tags.is_empty()
        && add_lists.is_empty()
        && remove_lists.is_empty()
    {
        cx.fault(
            r.path,
            "an update_contact node needs at least one non-empty set, add_tags, remove_tags, add_lists or remove_lists",
        );
        return None;
    }
    Some(NodeKind::UpdateContact {
        set,
        add_tags,
        remove_tags,
        add_lists,
        remove_lists,
        next: next?,
    })
}

fn parse_approval(r: &NodeReader, cx: &mut Cx) -> Option<NodeKind> {
    let approved = r.req_target("approved", cx);
    let rejected = r.req_target("rejected", cx);
    let timeout = match r.get("timeout") {
        None => Some(None),
        Some(v) => r
            .duration_of("timeout", v, cx)
            .and_then(|d| r.positive("timeout", d, cx))
            .map(Some),
    };
    let timeout_next = r.opt_target("timeout_next", cx);
    if r.get("timeout").is_some() != r.get("timeout_next").is_some() {
        cx.fault(
            r.path,
            "timeout and timeout_next go together: give both (where to go when nobody decides in time) or neither",
        );
        return None;
    }
    Some(NodeKind::Approval {
        approved: approved?,
        rejected: rejected?,
        timeout: timeout?,
        timeout_next: timeout_next?,
    })
}

fn parse_decide(r: &NodeReader, cx: &mut Cx) -> Option<NodeKind> {
    let http = parse_http(r, cx);
    let field = r.opt_string("field", cx);
    let paths = r
        .required("paths", "an object mapping reply values to node ids", cx)
        .and_then(|v| match v {
            Value::Object(map) if map.len() > MAX_DECIDE_PATHS => {
                cx.fault(
                    &r.at("paths"),
                    format!(
                        "a decide node may have at most {MAX_DECIDE_PATHS} paths; this one has {}",
                        map.len()
                    ),
                );
                None
            }
            Value::Object(map) if !map.is_empty() => {
                let mut out = BTreeMap::new();
                let mut ok = true;
                for (answer, target) in map {
                    let path = child(&r.at("paths"), answer);
                    match r.target_of(path, "each path", target, cx) {
                        Some(t) => {
                            out.insert(answer.clone(), t);
                        }
                        None => ok = false,
                    }
                }
                ok.then_some(out)
            }
            other => {
                cx.fault(
                    &r.at("paths"),
                    format!(
                        "paths must be a non-empty object mapping reply values to node ids; got {}",
                        describe_value(other)
                    ),
                );
                None
            }
        });
    let default = r.req_target("default", cx);
    let cache_ttl = match r.get("cache_ttl") {
        None => Some(Duration::hours(1)),
        Some(v) => r.duration_of("cache_ttl", v, cx),
    };
    let http = http?;
    Some(NodeKind::Decide {
        url: http.url,
        method: http.method,
        headers: http.headers,
        body: http.body,
        timeout_ms: http.timeout_ms,
        field: field?.unwrap_or_else(|| "path".to_owned()),
        paths: paths?,
        default: default?,
        cache_ttl: cache_ttl?,
    })
}

/// The parsed nodes as a graph over dense indices (in id order), each successor list computed once.
/// (Graph checks used to call `successors()` per visit, deduplicating with a linear scan, from a
/// search started at every node: a branch of 20,000 paths took minutes.)
struct Graph<'a> {
    names: Vec<&'a str>,
    wait: Vec<bool>,
    succ: Vec<Vec<usize>>,
}

impl<'a> Graph<'a> {
    fn new(nodes: &'a BTreeMap<String, Node>) -> Self {
        let names: Vec<&str> = nodes.keys().map(String::as_str).collect();
        let at: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        // targets that are not parsed nodes have no edges to follow: leave them out
        let succ = nodes
            .values()
            .map(|n| {
                let targets = n.kind.successors();
                targets
                    .into_iter()
                    .filter_map(|t| at.get(t).copied())
                    .collect()
            })
            .collect();
        let wait = nodes.values().map(|n| n.kind.is_wait()).collect();
        Graph { names, wait, succ }
    }
}

/// Reachability and wait-free cycles, over the nodes that parsed.
fn check_graph(
    nodes: &BTreeMap<String, Node>,
    start: Option<&str>,
    all_parsed: bool,
    ids: &BTreeSet<String>,
    faults: &mut Vec<Fault>,
) {
    let g = Graph::new(nodes);
    let n = g.names.len();
    // Unreachable: only meaningful when every node's edges are known.
    if let Some(start) = start.filter(|s| all_parsed && ids.contains(*s)) {
        if let Ok(s) = g.names.binary_search(&start) {
            let mut seen = vec![false; n];
            let mut queue = VecDeque::from([s]);
            seen[s] = true;
            while let Some(v) = queue.pop_front() {
                for &w in &g.succ[v] {
                    if !seen[w] {
                        seen[w] = true;
                        queue.push_back(w);
                    }
                }
            }
            for (id, _) in g.names.iter().zip(&seen).filter(|(_, seen)| !**seen) {
                faults.push(Fault::new(
                    child("$.nodes", id),
                    format!(
                        "node {id:?} is not reachable from start {start:?}; link to it or remove it"
                    ),
                ));
            }
        }
    }

    // Cycles through non-wait nodes only: a wait node breaks any cycle it is
    // on. Each node's shortest cycle is reported once, rotated to start at
    // its smallest id so the same loop found from two nodes is one fault.
    // Only nodes on a cycle are searched from (those in a strongly connected
    // component of the non-wait subgraph with more than one node, or with a
    // self-loop), and each search stays inside the node's component: a cycle
    // never leaves it, so the shortest one found is the same.
    let plain_succ: Vec<Vec<usize>> = (0..n)
        .map(|v| {
            if g.wait[v] {
                Vec::new()
            } else {
                g.succ[v].iter().copied().filter(|&w| !g.wait[w]).collect()
            }
        })
        .collect();
    let comp = components(&plain_succ);
    let mut comp_size = vec![0usize; n];
    for &c in &comp {
        comp_size[c] += 1;
    }
    let on_cycle: Vec<bool> = (0..n)
        .map(|v| !g.wait[v] && (comp_size[comp[v]] > 1 || plain_succ[v].contains(&v)))
        .collect();

    let mut reported: HashSet<Vec<usize>> = HashSet::new();
    let mut covered = vec![false; n];
    let mut parent = vec![usize::MAX; n];
    let mut touched: Vec<usize> = Vec::new();
    let mut budget = CYCLE_SEARCH_BUDGET;
    for from in (0..n).filter(|&v| on_cycle[v]) {
        if reported.len() == MAX_CYCLE_FAULTS || budget == 0 {
            break;
        }
        let search = Search {
            succ: &plain_succ,
            comp: &comp,
        };
        let Some(mut cycle) = search.shortest_cycle(from, &mut parent, &mut touched, &mut budget)
        else {
            continue;
        };
        let first = (0..cycle.len()).min_by_key(|&i| cycle[i]).unwrap_or(0);
        cycle.rotate_left(first);
        if reported.insert(cycle.clone()) {
            for &v in &cycle {
                covered[v] = true;
            }
            let mut names: Vec<&str> = cycle.iter().map(|&v| g.names[v]).collect();
            let head = names[0];
            names.push(head);
            faults.push(Fault::new(
                child("$.nodes", head),
                format!(
                    "cycle with no wait step: {}; {WAIT_HELP}",
                    names.join(" -> ")
                ),
            ));
        }
    }
    let rest: Vec<&str> = (0..n)
        .filter(|&v| on_cycle[v] && !covered[v])
        .map(|v| g.names[v])
        .collect();
    if !rest.is_empty() {
        const SHOWN: usize = 20;
        let more = rest.len().saturating_sub(SHOWN);
        let suffix = if more > 0 {
            format!(", … ({more} more)")
        } else {
            String::new()
        };
        faults.push(Fault::new(
            "$.nodes",
            format!(
                "more nodes are on cycles with no wait step: {}{suffix}; {WAIT_HELP}",
                rest[..rest.len().min(SHOWN)].join(", ")
            ),
        ));
    }
}

/// The non-wait subgraph and its strongly connected components.
struct Search<'g> {
    succ: &'g [Vec<usize>],
    comp: &'g [usize],
}

impl Search<'_> {
    /// The shortest cycle from `from` back to itself, as `[from, …]` (without repeating `from`),
    /// searching breadth-first inside `from`'s component. `None` when there is none, or when the
    /// `budget` of edges to look at runs out (it is then 0). `parent` is all `usize::MAX` on entry
    /// and left so; `touched` is scratch.
    fn shortest_cycle(
        &self,
        from: usize,
        parent: &mut [usize],
        touched: &mut Vec<usize>,
        budget: &mut usize,
    ) -> Option<Vec<usize>> {
        let mut queue = VecDeque::from([from]);
        let mut found = None;
        'search: while let Some(v) = queue.pop_front() {
            for &w in &self.succ[v] {
                if *budget == 0 {
                    break 'search;
                }
                *budget -= 1;
                if w == from {
                    found = Some(v);
                    break 'search;
                }
                if self.comp[w] == self.comp[from] && parent[w] == usize::MAX {
                    parent[w] = v;
                    touched.push(w);
                    queue.push_back(w);
                }
            }
        }
        let cycle = found.map(|last| {
            let mut back = Vec::new();
            let mut cur = last;
            while cur != from {
                back.push(cur);
                cur = parent[cur];
            }
            let mut cycle = vec![from];
            cycle.extend(back.into_iter().rev());
            cycle
        });
        for v in touched.drain(..) {
            parent[v] = usize::MAX;
        }
        cycle
    }
}

/// Strongly connected components (Tarjan's algorithm, without recursion):
/// the component number of each node.
fn components(succ: &[Vec<usize>]) -> Vec<usize> {
    const UNSET: usize = usize::MAX;
    let n = succ.len();
    let (mut index, mut low) = (vec![UNSET; n], vec![0usize; n]);
    let mut on_stack = vec![false; n];
    let mut stack: Vec<usize> = Vec::new();
    let mut comp = vec![UNSET; n];
    let (mut next_index, mut next_comp) = (0usize, 0usize);
    // (node, position in its successor list): the recursion, made explicit
    let mut calls: Vec<(usize, usize)> = Vec::new();
    for root in 0..n {
        if index[root] != UNSET {
            continue;
        }
        index[root] = next_index;
        low[root] = next_index;
        next_index += 1;
        stack.push(root);
        on_stack[root] = true;
        calls.push((root, 0));
        while let Some(top) = calls.len().checked_sub(1) {
            let (v, pos) = calls[top];
            if let Some(&w) = succ[v].get(pos) {
                calls[top].1 += 1;
                if index[w] == UNSET {
                    index[w] = next_index;
                    low[w] = next_index;
                    next_index += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    calls.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            calls.pop();
            if let Some(&(up, _)) = calls.last() {
                low[up] = low[up].min(low[v]);
            }
            if low[v] == index[v] {
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    comp[w] = next_comp;
                    if w == v {
                        break;
                    }
                }
                next_comp += 1;
            }
        }
    }
    comp
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn example() -> Value {
        json!({
          "name": "Welcome series",
          "trigger": { "event": "contact.created",
                       "filter": { "all": [ { "field": "event.source", "op": "eq", "value": "signup" } ] } },
          "reentry": "once",
          "start": "welcome",
          "nodes": {
            "welcome": { "type": "email", "template": "welcome", "provider": "default", "next": "wait" },
            "wait":    { "type": "delay", "duration": "2 days", "next": "check" },
            "check":   { "type": "branch",
                         "paths": [ { "when": { "field": "contact.plan", "op": "eq", "value": "pro" }, "next": "crm" } ],
                         "default": "nudge" },
            "crm":     { "type": "webhook", "url": "https://crm.example/hooks/pro", "method": "POST",
                         "timeout_ms": 5000, "next": "done" },
            "nudge":   { "type": "split", "variants": [ { "weight": 50, "next": "a" }, { "weight": 50, "next": "b" } ] },
            "a":       { "type": "email", "template": "nudge-a", "next": "done" },
            "b":       { "type": "email", "template": "nudge-b", "next": "done" },
            "done":    { "type": "exit" }
          }
        })
    }

    /// A definition whose start node `s` leads to `node` under id `n`, which leads to `end`.
    fn with_node(node: Value) -> Value {
        json!({
            "name": "t",
            "start": "s",
            "nodes": {
                "s": {"type": "goal", "next": "n"},
                "n": node,
                "end": {"type": "exit"},
                "alt": {"type": "goal", "next": "end"}
            }
        })
    }

    /// Validates `with_node(node)` with every node reachable and returns node `n`.
    fn ok_node(node: Value) -> NodeKind {
        let mut def = with_node(node);
        def["nodes"]["s"] = json!({"type": "split", "variants": [
            {"weight": 1, "next": "n"}, {"weight": 1, "next": "alt"}]});
        let a = validate(&def).unwrap_or_else(|f| panic!("{}", crate::fault::describe(&f)));
        a.nodes["n"].kind.clone()
    }

    fn faults(def: &Value) -> Vec<Fault> {
        validate(def).expect_err("definition should be rejected")
    }

    fn node_faults(node: Value) -> Vec<Fault> {
        faults(&with_node(node))
    }

    #[track_caller]
    fn has(fs: &[Fault], path: &str, needle: &str) {
        assert!(
            fs.iter()
                .any(|f| f.path == path && f.message.contains(needle)),
            "no fault at {path} containing {needle:?}; got: {}",
            crate::fault::describe(fs)
        );
    }

    // ---- the happy path ----

    #[test]
    fn example_validates() {
        let a = validate(&example()).unwrap_or_else(|f| panic!("{}", crate::fault::describe(&f)));
        assert_eq!(a.name, "Welcome series");
        let t = a.trigger.as_ref().unwrap();
        assert_eq!(t.event, "contact.created");
        assert!(t.filter.is_some());
        assert_eq!(a.reentry, Reentry::Once);
        assert_eq!(a.start, "welcome");
        assert_eq!(a.nodes.len(), 8);
        assert_eq!(a.node("check").unwrap().id, "check");
        match &a.nodes["crm"].kind {
            NodeKind::Webhook {
                url,
                method,
                timeout_ms,
                next,
                on_error,
                headers,
                body,
            } => {
                assert_eq!(url, "https://crm.example/hooks/pro");
                assert_eq!(method, "POST");
                assert_eq!(*timeout_ms, 5000);
                assert_eq!(next.as_deref(), Some("done"));
                assert!(on_error.is_none() && headers.is_empty() && body.is_none());
            }
            other => panic!("{other:?}"),
        }
        match &a.nodes["wait"].kind {
            NodeKind::Delay {
                wait: DelaySpec::Duration(d),
                next,
            } => {
                assert_eq!(d.num_seconds(), 2 * 86_400);
                assert_eq!(next, "check");
            }
            other => panic!("{other:?}"),
        }
        match &a.nodes["a"].kind {
            NodeKind::Email { provider, .. } => assert_eq!(provider, "default"),
            other => panic!("{other:?}"),
        }
        match &a.nodes["nudge"].kind {
            NodeKind::Split { variants } => {
                assert_eq!(
                    variants,
                    &vec![(50.0, "a".to_owned()), (50.0, "b".to_owned())]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn minimal_enroll_only_definition() {
        let a = validate(&json!({"name": "x", "start": "e", "nodes": {"e": {"type": "exit"}}}))
            .unwrap();
        assert!(a.trigger.is_none());
        assert!(a.goal.is_none());
        assert_eq!(a.reentry, Reentry::Once);
    }

    #[test]
    fn successors_wait_and_type_names() {
        let a = validate(&example()).unwrap();
        assert_eq!(a.nodes["check"].kind.successors(), vec!["crm", "nudge"]);
        assert_eq!(a.nodes["nudge"].kind.successors(), vec!["a", "b"]);
        assert!(a.nodes["done"].kind.successors().is_empty());
        assert!(a.nodes["wait"].kind.is_wait());
        assert!(!a.nodes["check"].kind.is_wait());
        assert_eq!(a.nodes["nudge"].kind.type_name(), "split");
        assert_eq!(a.nodes["done"].kind.type_name(), "exit");
        let k = NodeKind::Approval {
            approved: "x".into(),
            rejected: "x".into(),
            timeout: None,
            timeout_next: Some("y".into()),
        };
        assert_eq!(k.successors(), vec!["x", "y"]);
        assert!(k.is_wait());
        for ty in NODE_TYPES {
            assert!(allowed_fields(ty).contains(&"type"));
        }
    }

    #[test]
    fn reentry_values() {
        for (s, want) in [
            ("once", Reentry::Once),
            ("after_exit", Reentry::AfterExit),
            ("always", Reentry::Always),
        ] {
            let mut d = example();
            d["reentry"] = json!(s);
            assert_eq!(validate(&d).unwrap().reentry, want);
            assert_eq!(want.as_str(), s);
        }
        for bad in [json!("Once"), json!(1), json!(["once"])] {
            let mut d = example();
            d["reentry"] = bad;
            has(&faults(&d), "$.reentry", "\"after_exit\"");
        }
    }

    // ---- top level ----

    #[test]
    fn non_object_definitions() {
        for v in [
            json!(null),
            json!(1),
            json!("x"),
            json!([example()]),
            json!(true),
        ] {
            let f = faults(&v);
            assert_eq!(f.len(), 1);
            has(&f, "$", "must be a JSON object");
        }
    }

    #[test]
    fn name_faults() {
        let cases = [
            (None, "required"),
            (Some(json!("")), "empty"),
            (Some(json!("   ")), "empty"),
            (Some(json!(12)), "got number"),
            (Some(json!("x".repeat(201))), "at most 200"),
            (Some(json!("a\nb")), "control characters"),
        ];
        for (name, needle) in cases {
            let mut d = example();
            match name {
                Some(n) => d["name"] = n,
                None => {
                    d.as_object_mut().unwrap().remove("name");
                }
            }
            let f = faults(&d);
            assert_eq!(f.len(), 1, "{}", crate::fault::describe(&f));
            has(&f, "$.name", needle);
        }
        let mut d = example();
        d["name"] = json!("é".repeat(200));
        assert!(validate(&d).is_ok());
    }

    #[test]
    fn unknown_top_level_keys() {
        let mut d = example();
        d["nodez"] = json!({});
        d["odd key"] = json!(1);
        d["description"] = json!("fine");
        d["goal"] = json!({"field": "contact.plan", "op": "eq", "value": "pro"});
        let f = faults(&d);
        assert_eq!(f.len(), 2);
        has(
            &f,
            "$.nodez",
            "allowed: name, description, trigger, reentry, start, nodes, goal",
        );
        has(&f, "$[\"odd key\"]", "unknown key");
    }

    #[test]
    fn description_and_goal_types() {
        let mut d = example();
        d["description"] = json!(5);
        d["goal"] = json!({"field": "plan", "op": "eq", "value": 1});
        let f = faults(&d);
        has(&f, "$.description", "must be a string");
        has(
            &f,
            "$.goal.field",
            "field must start with contact., event. or context.",
        );
        let mut d = example();
        d["goal"] = json!({"field": "contact.plan", "op": "eq", "value": "pro"});
        assert!(validate(&d).unwrap().goal.is_some());
    }

    #[test]
    fn start_faults() {
        let mut d = example();
        d.as_object_mut().unwrap().remove("start");
        has(&faults(&d), "$.start", "start is required");
        d["start"] = json!(3);
        has(&faults(&d), "$.start", "got number");
        d["start"] = json!("welcom");
        let f = faults(&d);
        assert_eq!(f.len(), 1, "{}", crate::fault::describe(&f));
        has(
            &f,
            "$.start",
            "\"welcom\" is not a node; nodes are: a, b, check, crm, done, nudge, wait, welcome",
        );
    }

    #[test]
    fn nodes_faults() {
        let mut d = example();
        d.as_object_mut().unwrap().remove("nodes");
        let f = faults(&d);
        has(&f, "$.nodes", "nodes is required");
        assert!(
            !f.iter().any(|f| f.path == "$.start"),
            "start not checked without nodes"
        );
        d["nodes"] = json!({});
        has(&faults(&d), "$.nodes", "at least one node");
        d["nodes"] = json!([{"type": "exit"}]);
        has(&faults(&d), "$.nodes", "got array");
    }

    #[test]
    fn too_many_nodes() {
        let mut nodes = Map::new();
        for i in 0..=MAX_NODES {
            nodes.insert(format!("n{i}"), json!({"type": "exit"}));
        }
        let d = json!({"name": "big", "start": "n0", "nodes": nodes});
        has(&faults(&d), "$.nodes", "at most 1000 nodes");
    }

    #[test]
    fn bad_node_ids() {
        let long = "x".repeat(65);
        for id in ["has space", "", "dot.ted", "ünï", long.as_str()] {
            let mut d = example();
            d["nodes"][id] = json!({"type": "exit"});
            d["nodes"]["done"] = json!({"type": "goal", "next": id});
            let f = faults(&d);
            has(&f, &child("$.nodes", id), "must be 1-64 characters");
            assert_eq!(f.len(), 1, "{}", crate::fault::describe(&f));
        }
        let mut d = example();
        d["nodes"]["x".repeat(64)] = json!({"type": "exit"});
        d["nodes"]["done"] = json!({"type": "goal", "next": "x".repeat(64)});
        assert!(validate(&d).is_ok());
    }

    // ---- node shape ----

    #[test]
    fn node_not_object_or_bad_type() {
        has(
            &node_faults(json!("exit")),
            "$.nodes.n",
            "must be an object",
        );
        has(
            &node_faults(json!({"next": "end"})),
            "$.nodes.n.type",
            "type is required",
        );
        let f = node_faults(json!({"type": "sms", "next": "end"}));
        has(&f, "$.nodes.n.type", "unknown node type \"sms\"; known types: email, webhook, delay, branch, filter, split, update_contact, wait_event, approval, decide, goal, exit");
        has(
            &node_faults(json!({"type": ["email"]})),
            "$.nodes.n.type",
            "got array",
        );
    }

    #[test]
    fn unknown_field_lists_allowed_fields() {
        let f = node_faults(json!({"type": "email", "template": "t", "nxt": "end"}));
        has(
            &f,
            "$.nodes.n.nxt",
            "allowed: type, template, provider, next, on_error",
        );
        let f = node_faults(json!({"type": "exit", "next": "end"}));
        has(&f, "$.nodes.n.next", "for an exit node; allowed: type");
    }

    #[test]
    fn missing_required_fields() {
        has(
            &node_faults(json!({"type": "email"})),
            "$.nodes.n.template",
            "required for an email node",
        );
        has(
            &node_faults(json!({"type": "delay", "duration": "1h"})),
            "$.nodes.n.next",
            "required",
        );
        has(
            &node_faults(json!({"type": "webhook"})),
            "$.nodes.n.url",
            "required",
        );
        has(
            &node_faults(json!({"type": "branch", "default": "end"})),
            "$.nodes.n.paths",
            "required",
        );
        has(
            &node_faults(json!({"type": "filter", "next": "end"})),
            "$.nodes.n.when",
            "required",
        );
        has(
            &node_faults(json!({"type": "split"})),
            "$.nodes.n.variants",
            "required",
        );
        has(
            &node_faults(json!({"type": "approval", "approved": "end"})),
            "$.nodes.n.rejected",
            "required",
        );
        let f = node_faults(json!({"type": "decide", "url": "https://x.example"}));
        has(&f, "$.nodes.n.paths", "required");
        has(&f, "$.nodes.n.default", "required");
        let f = node_faults(json!({"type": "email", "template": null}));
        has(&f, "$.nodes.n.template", "required");
    }

    // ---- references and graph ----

    #[test]
    fn dangling_target_names_path_and_nodes() {
        let mut d = example();
        d["nodes"]["check"]["paths"][0]["next"] = json!("crm2");
        let f = faults(&d);
        has(
            &f,
            "$.nodes.check.paths[0].next",
            "\"crm2\" is not a node; nodes are: a, b, check, crm, done, nudge, wait, welcome",
        );
        // crm is now unreachable too.
        has(&f, "$.nodes.crm", "not reachable from start \"welcome\"");
        assert_eq!(f.len(), 2, "{}", crate::fault::describe(&f));
    }

    #[test]
    fn dangling_targets_in_every_kind_of_slot() {
        let mut d = example();
        d["nodes"]["check"]["default"] = json!("x1");
        d["nodes"]["nudge"]["variants"][1]["next"] = json!("x2");
        d["nodes"]["welcome"]["on_error"] = json!("x3");
        let f = faults(&d);
        has(&f, "$.nodes.check.default", "\"x1\" is not a node");
        has(&f, "$.nodes.nudge.variants[1].next", "\"x2\" is not a node");
        has(&f, "$.nodes.welcome.on_error", "\"x3\" is not a node");
    }

    #[test]
    fn dangling_list_is_truncated() {
        let mut nodes = Map::new();
        nodes.insert("s".into(), json!({"type": "goal", "next": "nope"}));
        for i in 0..30 {
            nodes.insert(format!("n{i:02}"), json!({"type": "exit"}));
        }
        let f = faults(&json!({"name": "t", "start": "s", "nodes": nodes}));
        has(&f, "$.nodes.s.next", ", … (11 more)");
    }

    #[test]
    fn unreachable_nodes_are_named() {
        let mut d = example();
        d["nodes"]["orphan"] = json!({"type": "exit"});
        d["nodes"]["orphan2"] = json!({"type": "goal", "next": "orphan"});
        let f = faults(&d);
        assert_eq!(f.len(), 2, "{}", crate::fault::describe(&f));
        has(
            &f,
            "$.nodes.orphan",
            "node \"orphan\" is not reachable from start \"welcome\"",
        );
        has(&f, "$.nodes.orphan2", "node \"orphan2\" is not reachable");
    }

    #[test]
    fn graph_checks_skip_unparsed_nodes() {
        let mut d = example();
        // "check" is broken, so what it leads to is unknown: no unreachable faults.
        d["nodes"]["check"]["paths"] = json!("oops");
        let f = faults(&d);
        assert_eq!(f.len(), 1, "{}", crate::fault::describe(&f));
        has(&f, "$.nodes.check.paths", "non-empty array");
    }

    #[test]
    fn cycle_without_wait_is_reported() {
        let d = json!({"name": "loop", "start": "a", "nodes": {
            "a": {"type": "email", "template": "t", "next": "b"},
            "b": {"type": "filter", "when": {"field": "contact.x", "op": "exists"}, "next": "a", "otherwise": "z"},
            "z": {"type": "exit"}
        }});
        let f = faults(&d);
        assert_eq!(f.len(), 1, "{}", crate::fault::describe(&f));
        has(
            &f,
            "$.nodes.a",
            "cycle with no wait step: a -> b -> a; add a delay, wait_event or approval node",
        );
    }

    #[test]
    fn longer_cycle_listed_in_order_and_self_loop() {
        let d = json!({"name": "loop", "start": "a", "nodes": {
            "a": {"type": "goal", "next": "c"},
            "c": {"type": "goal", "next": "b"},
            "b": {"type": "email", "template": "t", "next": "a", "on_error": "b"}
        }});
        let f = faults(&d);
        has(&f, "$.nodes.a", "a -> c -> b -> a");
        has(&f, "$.nodes.b", "b -> b");
        assert_eq!(f.len(), 2, "{}", crate::fault::describe(&f));
    }

    #[test]
    fn cycle_through_wait_is_fine() {
        let d = json!({"name": "loop", "start": "a", "nodes": {
            "a": {"type": "email", "template": "t", "next": "w"},
            "w": {"type": "delay", "duration": "1 week", "next": "a"}
        }});
        assert!(validate(&d).is_ok());
        let d = json!({"name": "loop", "start": "a", "nodes": {
            "a": {"type": "email", "template": "t", "next": "w"},
            "w": {"type": "wait_event", "event": "x", "timeout": "1d", "next": "a", "timeout_next": "a"}
        }});
        assert!(validate(&d).is_ok());
    }

    // ---- conditions inside definitions ----

    #[test]
    fn condition_faults_carry_paths() {
        let mut d = example();
        d["trigger"]["filter"]["all"][0]["op"] = json!("equals");
        d["nodes"]["check"]["paths"][0]["when"] =
            json!({"field": "plan", "op": "eq", "value": "pro"});
        let f = faults(&d);
        has(&f, "$.trigger.filter.all[0].op", "unknown op \"equals\"");
        has(
            &f,
            "$.nodes.check.paths[0].when.field",
            "contact., event. or context.",
        );
        assert_eq!(f.len(), 2, "{}", crate::fault::describe(&f));
    }

    #[test]
    fn trigger_faults() {
        let mut d = example();
        d.as_object_mut().unwrap().remove("trigger");
        assert!(validate(&d).unwrap().trigger.is_none());
        for (trigger, path, needle) in [
            (json!({}), "$.trigger.event", "event is required"),
            (json!({"event": ""}), "$.trigger.event", "non-empty string"),
            (json!({"event": 5}), "$.trigger.event", "non-empty string"),
            (json!("contact.created"), "$.trigger", "must be an object"),
            (
                json!({"event": "x", "when": {}}),
                "$.trigger.when",
                "allowed: event, filter",
            ),
            (
                json!({"event": "x", "filter": []}),
                "$.trigger.filter",
                "exactly one of",
            ),
        ] {
            d["trigger"] = trigger;
            has(&faults(&d), path, needle);
        }
    }

    // ---- per-type checks ----

    #[test]
    fn email_defaults_and_optional_next() {
        match ok_node(json!({"type": "email", "template": "t", "next": null})) {
            NodeKind::Email {
                provider,
                next,
                on_error,
                ..
            } => {
                assert_eq!(provider, "default");
                assert!(next.is_none() && on_error.is_none());
            }
            other => panic!("{other:?}"),
        }
        has(
            &node_faults(json!({"type": "email", "template": ""})),
            "$.nodes.n.template",
            "non-empty string",
        );
        has(
            &node_faults(json!({"type": "email", "template": "t", "provider": 1})),
            "$.nodes.n.provider",
            "non-empty string",
        );
        has(
            &node_faults(json!({"type": "email", "template": "t", "next": 1})),
            "$.nodes.n.next",
            "id of a node",
        );
    }

    #[test]
    fn webhook_urls() {
        for good in [
            "http://localhost:8080/x",
            "HTTPS://crm.example",
            "https://crm.example/hooks?x=1#f",
            "https://[::1]:443/x",
            "https://10.0.0.1/x",
            "https://a.b.c/{{contact.email}}",
        ] {
            ok_node(json!({"type": "webhook", "url": good, "next": "end"}));
        }
        for (bad, needle) in [
            ("ftp://x.example", "http:// or https://"),
            ("crm.example/hook", "http:// or https://"),
            ("https://", "host is missing"),
            ("https:///path", "host is missing"),
            ("https://crm example", "spaces"),
            ("https://crm.example:0", "port"),
            ("https://crm.example:99999", "port"),
            ("https://crm.example:", "port"),
            ("https://user:pw@crm.example", "user name or password"),
            ("https://crm..example", "not a valid host"),
            ("https://-crm.example", "not a valid host"),
            ("https://[zz]/", "IPv6"),
            ("https://[::1/", "unclosed"),
        ] {
            let f = node_faults(json!({"type": "webhook", "url": bad, "next": "end"}));
            has(&f, "$.nodes.n.url", needle);
        }
        let long = format!("https://x.example/{}", "a".repeat(MAX_URL_LEN));
        has(
            &node_faults(json!({"type": "webhook", "url": long})),
            "$.nodes.n.url",
            "at most",
        );
        has(
            &node_faults(json!({"type": "webhook", "url": 1})),
            "$.nodes.n.url",
            "must be a string",
        );
    }

    #[test]
    fn webhook_method_timeout_headers() {
        match ok_node(
            json!({"type": "webhook", "url": "https://x.example", "method": "put",
                             "headers": {"X-Key": "k"}, "body": {"a": [1]}}),
        ) {
            NodeKind::Webhook {
                method,
                timeout_ms,
                headers,
                body,
                next,
                ..
            } => {
                assert_eq!(method, "PUT");
                assert_eq!(timeout_ms, DEFAULT_TIMEOUT_MS);
                assert_eq!(headers.get("X-Key").map(String::as_str), Some("k"));
                assert_eq!(body, Some(json!({"a": [1]})));
                assert!(next.is_none());
            }
            other => panic!("{other:?}"),
        }
        let base = |k: &str, v: Value| {
            let mut n = json!({"type": "webhook", "url": "https://x.example", "next": "end"});
            n[k] = v;
            node_faults(n)
        };
        has(
            &base("method", json!("HEAD")),
            "$.nodes.n.method",
            "GET, POST, PUT, PATCH, DELETE",
        );
        for t in [
            json!(0),
            json!(120_001),
            json!(1.5),
            json!("5000"),
            json!(-1),
        ] {
            has(
                &base("timeout_ms", t),
                "$.nodes.n.timeout_ms",
                "from 1 to 120000",
            );
        }
        ok_node(json!({"type": "webhook", "url": "https://x.example", "timeout_ms": 120000}));
        has(
            &base("headers", json!({"X-A": 1})),
            "$.nodes.n.headers.X-A",
            "must be strings",
        );
        has(
            &base("headers", json!({"Bad Name": "v"})),
            "$.nodes.n.headers[\"Bad Name\"]",
            "not a valid HTTP header name",
        );
        has(
            &base("headers", json!({"X-A": "a\r\nb"})),
            "$.nodes.n.headers.X-A",
            "line breaks",
        );
        has(
            &base("headers", json!(["X-A"])),
            "$.nodes.n.headers",
            "must be an object",
        );
    }

    #[test]
    fn delay_variants() {
        match ok_node(json!({"type": "delay", "until": "2026-05-01T09:00:00+02:00", "next": "end"}))
        {
            NodeKind::Delay {
                wait: DelaySpec::Until(t),
                ..
            } => assert_eq!(t.to_rfc3339(), "2026-05-01T07:00:00+00:00"),
            other => panic!("{other:?}"),
        }
        match ok_node(
            json!({"type": "delay", "window": {"start": "09:00", "end": "17:00", "days": ["mon"]}, "next": "end"}),
        ) {
            NodeKind::Delay {
                wait: DelaySpec::Window(w),
                ..
            } => assert_eq!(w.days, vec![chrono::Weekday::Mon]),
            other => panic!("{other:?}"),
        }
        has(
            &node_faults(json!({"type": "delay", "next": "end"})),
            "$.nodes.n",
            "exactly one of duration, until or window; got none",
        );
        has(
            &node_faults(
                json!({"type": "delay", "duration": "1h", "until": "2026-05-01T09:00:00Z", "next": "end"}),
            ),
            "$.nodes.n",
            "got duration and until",
        );
        has(
            &node_faults(json!({"type": "delay", "duration": 60, "next": "end"})),
            "$.nodes.n.duration",
            "duration string",
        );
        has(
            &node_faults(json!({"type": "delay", "duration": "2 fortnights", "next": "end"})),
            "$.nodes.n.duration",
            "unknown unit",
        );
        has(
            &node_faults(json!({"type": "delay", "until": "tomorrow", "next": "end"})),
            "$.nodes.n.until",
            "RFC 3339",
        );
        has(
            &node_faults(json!({"type": "delay", "until": 5, "next": "end"})),
            "$.nodes.n.until",
            "RFC 3339",
        );
        has(
            &node_faults(
                json!({"type": "delay", "window": {"start": "18:00", "end": "09:00"}, "next": "end"}),
            ),
            "$.nodes.n.window.end",
            "later than start",
        );
    }

    #[test]
    fn branch_paths_faults() {
        has(
            &node_faults(json!({"type": "branch", "paths": [], "default": "end"})),
            "$.nodes.n.paths",
            "got an empty array",
        );
        let f = node_faults(json!({"type": "branch", "default": "end", "paths": [
            5,
            {"next": "end"},
            {"when": {"all": []}, "next": "end", "else": "x"}
        ]}));
        has(&f, "$.nodes.n.paths[0]", "must be an object");
        has(&f, "$.nodes.n.paths[1].when", "required");
        has(&f, "$.nodes.n.paths[2].else", "allowed: when, next");
    }

    #[test]
    fn filter_node() {
        match ok_node(
            json!({"type": "filter", "when": {"field": "contact.x", "op": "exists"}, "next": "end"}),
        ) {
            NodeKind::Filter {
                otherwise, next, ..
            } => {
                assert!(otherwise.is_none());
                assert_eq!(next, "end");
            }
            other => panic!("{other:?}"),
        }
        has(
            &node_faults(json!({"type": "filter", "when": 1, "next": "end"})),
            "$.nodes.n.when",
            "exactly one of",
        );
    }

    #[test]
    fn split_faults() {
        let one = json!({"type": "split", "variants": [{"weight": 1, "next": "end"}]});
        has(&node_faults(one), "$.nodes.n.variants", "at least 2");
        let f = node_faults(json!({"type": "split", "variants": [
            {"weight": 0, "next": "end"}, {"weight": -1, "next": "end"},
            {"weight": "50", "next": "end"}, "x", {"next": "end"}, {"weight": 1, "next": "end", "label": "A"}
        ]}));
        has(&f, "$.nodes.n.variants[0].weight", "greater than 0");
        has(&f, "$.nodes.n.variants[1].weight", "greater than 0");
        has(&f, "$.nodes.n.variants[2].weight", "greater than 0");
        has(&f, "$.nodes.n.variants[3]", "must be an object");
        has(&f, "$.nodes.n.variants[4].weight", "required");
        has(&f, "$.nodes.n.variants[5].label", "allowed: weight, next");
        has(
            &node_faults(json!({"type": "split", "variants": {}})),
            "$.nodes.n.variants",
            "got object",
        );
    }

    #[test]
    fn update_contact_node() {
        match ok_node(
            json!({"type": "update_contact", "set": {"plan": "pro", "old": null},
                             "add_tags": ["vip", "vip"], "next": "end"}),
        ) {
            NodeKind::UpdateContact { set, add_tags, .. } => {
                assert_eq!(set.get("old"), Some(&Value::Null));
                assert_eq!(add_tags, vec!["vip"]);
            }
            other => panic!("{other:?}"),
        }
        has(
            &node_faults(
                json!({"type": "update_contact", "set": {}, "add_tags": [], "next": "end"}),
            ),
            "$.nodes.n",
            "at least one non-empty",
        );
        has(
            &node_faults(json!({"type": "update_contact", "set": [1], "next": "end"})),
            "$.nodes.n.set",
            "must be an object",
        );
        has(
            &node_faults(json!({"type": "update_contact", "add_tags": "vip", "next": "end"})),
            "$.nodes.n.add_tags",
            "array of strings",
        );
        has(
            &node_faults(
                json!({"type": "update_contact", "remove_lists": ["a", 2], "next": "end"}),
            ),
            "$.nodes.n.remove_lists[1]",
            "non-empty strings",
        );
        has(
            &node_faults(
                json!({"type": "update_contact", "add_tags": ["a"], "remove_tags": ["b", "a"], "next": "end"}),
            ),
            "$.nodes.n.remove_tags[1]",
            "both added and removed",
        );
    }

    #[test]
    fn wait_event_node() {
        match ok_node(json!({"type": "wait_event", "event": "order.paid",
                             "filter": {"field": "event.total", "op": "gt", "value": 10},
                             "timeout": "3 days", "next": "end", "timeout_next": "alt"}))
        {
            NodeKind::WaitEvent {
                timeout, filter, ..
            } => {
                assert_eq!(timeout.num_seconds(), 3 * 86_400);
                assert!(filter.is_some());
            }
            other => panic!("{other:?}"),
        }
        let f = node_faults(
            json!({"type": "wait_event", "event": "x", "next": "end", "timeout_next": "alt"}),
        );
        has(&f, "$.nodes.n.timeout", "required");
        let f = node_faults(
            json!({"type": "wait_event", "event": "x", "timeout": "0s", "next": "end", "timeout_next": "alt"}),
        );
        has(&f, "$.nodes.n.timeout", "longer than 0 seconds");
        let f = node_faults(
            json!({"type": "wait_event", "event": "x", "filter": {"field": "x"}, "timeout": "1d", "next": "end", "timeout_next": "alt"}),
        );
        has(&f, "$.nodes.n.filter.field", "field must start with");
        has(&f, "$.nodes.n.filter.op", "op is required");
    }

    #[test]
    fn approval_node() {
        match ok_node(
            json!({"type": "approval", "approved": "end", "rejected": "alt",
                             "timeout": "2 days", "timeout_next": "end"}),
        ) {
            NodeKind::Approval { timeout, .. } => {
                assert_eq!(timeout.map(|d| d.num_hours()), Some(48))
            }
            other => panic!("{other:?}"),
        }
        ok_node(json!({"type": "approval", "approved": "end", "rejected": "alt"}));
        has(
            &node_faults(
                json!({"type": "approval", "approved": "end", "rejected": "alt", "timeout": "1d"}),
            ),
            "$.nodes.n",
            "timeout and timeout_next go together",
        );
        has(
            &node_faults(
                json!({"type": "approval", "approved": "end", "rejected": "alt", "timeout_next": "end"}),
            ),
            "$.nodes.n",
            "timeout and timeout_next go together",
        );
    }

    #[test]
    fn decide_node() {
        match ok_node(json!({"type": "decide", "url": "https://ai.example/decide",
                             "paths": {"yes": "end", "no way": "alt"}, "default": "end"}))
        {
            NodeKind::Decide {
                method,
                timeout_ms,
                field,
                paths,
                cache_ttl,
                ..
            } => {
                assert_eq!(method, "POST");
                assert_eq!(timeout_ms, 10_000);
                assert_eq!(field, "path");
                assert_eq!(paths.get("no way").map(String::as_str), Some("alt"));
                assert_eq!(cache_ttl.num_seconds(), 3600);
            }
            other => panic!("{other:?}"),
        }
        let base = |paths: Value| {
            node_faults(
                json!({"type": "decide", "url": "https://ai.example", "paths": paths, "default": "end"}),
            )
        };
        has(&base(json!({})), "$.nodes.n.paths", "non-empty object");
        has(
            &base(json!({"no way": "missing"})),
            "$.nodes.n.paths[\"no way\"]",
            "\"missing\" is not a node",
        );
        has(
            &base(json!({"yes": 1})),
            "$.nodes.n.paths.yes",
            "id of a node",
        );
        let f = node_faults(
            json!({"type": "decide", "url": "https://ai.example", "paths": {"y": "end"},
                                   "default": "end", "cache_ttl": "forever", "field": ""}),
        );
        has(&f, "$.nodes.n.cache_ttl", "expected a number");
        has(&f, "$.nodes.n.field", "non-empty string");
    }

    #[test]
    fn goal_node_optional_next() {
        let d = json!({"name": "g", "start": "g", "nodes": {"g": {"type": "goal"}}});
        match &validate(&d).unwrap().nodes["g"].kind {
            NodeKind::Goal { next } => assert!(next.is_none()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reports_many_faults_at_once() {
        let d = json!({
            "name": "",
            "reentry": "twice",
            "start": "nope",
            "extra": 1,
            "nodes": {
                "a": {"type": "email"},
                "b": {"type": "delay", "duration": "soon", "next": "zz"},
                "c": 7
            }
        });
        let f = faults(&d);
        for path in [
            "$.name",
            "$.reentry",
            "$.start",
            "$.extra",
            "$.nodes.a.template",
            "$.nodes.b.duration",
            "$.nodes.b.next",
            "$.nodes.c",
        ] {
            assert!(
                f.iter().any(|x| x.path == path),
                "missing {path}: {}",
                crate::fault::describe(&f)
            );
        }
    }

    #[test]
    fn never_panics_on_odd_input() {
        let mut deep = json!({"field": "contact.a", "op": "exists"});
        for _ in 0..500 {
            deep = json!({"any": [deep]});
        }
        let mut deep_array = json!(1);
        for _ in 0..500 {
            deep_array = json!([deep_array]);
        }
        let odd = [
            json!(null),
            json!(0),
            json!(-1.5e300),
            json!(""),
            json!("\u{0}"),
            json!([]),
            json!([null, {}, []]),
            json!({}),
            json!(true),
            json!(u64::MAX),
            json!({"": ""}),
            json!({"type": "email"}),
            json!({"type": null}),
            deep.clone(),
            deep_array.clone(),
        ];
        let slots = [
            "name",
            "trigger",
            "reentry",
            "start",
            "nodes",
            "goal",
            "description",
        ];
        let node_fields = [
            "type",
            "template",
            "provider",
            "next",
            "on_error",
            "url",
            "method",
            "headers",
            "body",
            "timeout_ms",
            "duration",
            "until",
            "window",
            "paths",
            "default",
            "when",
            "otherwise",
            "variants",
            "set",
            "add_tags",
            "remove_tags",
            "add_lists",
            "remove_lists",
            "event",
            "filter",
            "timeout",
            "timeout_next",
            "approved",
            "rejected",
            "field",
            "cache_ttl",
        ];
        let mut checked = 0;
        for v in &odd {
            let _ = validate(v);
            for slot in slots {
                let mut d = example();
                d[slot] = v.clone();
                let optional = ["description", "goal", "trigger", "reentry"].contains(&slot);
                let harmless = v.is_null() || (slot == "description" && v.is_string());
                assert!(
                    validate(&d).is_err() || (optional && harmless),
                    "{slot} = {v}"
                );
                checked += 1;
            }
            let mut d = example();
            d["trigger"]["filter"] = v.clone();
            let _ = validate(&d);
            for ty in NODE_TYPES {
                for field in node_fields {
                    let mut d = example();
                    d["nodes"]["check"] = json!({"type": ty});
                    d["nodes"]["check"][field] = v.clone();
                    let _ = validate(&d);
                    let mut d = example();
                    d["nodes"]["crm"][field] = v.clone();
                    d["nodes"][format!("weird {field}")] = v.clone();
                    let _ = validate(&d);
                    checked += 2;
                }
            }
        }
        assert!(checked > 5_000);
        let f = faults(&{
            let mut d = example();
            d["goal"] = deep;
            d
        });
        has(&f, &format!("$.goal{}", ".any[0]".repeat(32)), "nest");
    }

    // ---- limits: validation stays bounded whatever a tenant sends ----

    /// `n` nodes `n0000…` that are splits, each to the `k` nodes after it (wrapping around): long
    /// wait-free cycles, the slowest shape for the cycle search.
    fn forward_chords(n: usize, k: usize) -> Value {
        let mut nodes = Map::new();
        for i in 0..n {
            let vs: Vec<Value> = (1..=k)
                .map(|j| json!({"weight": 1, "next": format!("n{:04}", (i + j) % n)}))
                .collect();
            nodes.insert(format!("n{i:04}"), json!({"type": "split", "variants": vs}));
        }
        json!({"name": "x", "start": "n0000", "nodes": nodes})
    }

    #[test]
    fn a_branch_of_20000_paths_is_refused_at_once() {
        // took 29 s (release) before: successors() deduplicated with Vec::contains and was
        // recomputed by a search from every node
        let paths: Vec<Value> = (0..20_000)
            .map(|i| json!({"when": {"field": "contact.x", "op": "eq", "value": i}, "next": format!("t{}", i % 998)}))
            .collect();
        let mut nodes = Map::new();
        nodes.insert(
            "b".into(),
            json!({"type": "branch", "paths": paths, "default": "t0"}),
        );
        for t in 0..998 {
            nodes.insert(format!("t{t}"), json!({"type": "goal", "next": "b"}));
        }
        let d = json!({"name": "x", "start": "b", "nodes": nodes});
        let t = std::time::Instant::now();
        let f = faults(&d);
        has(
            &f,
            "$.nodes.b.paths",
            "a branch may have at most 100 paths; this one has 20000",
        );
        let f = validate_text(&d.to_string()).unwrap_err();
        assert_eq!(f.len(), 1);
        has(&f, "$", "the definition is 1");
        has(&f, "$", " bytes; at most 262144 are allowed");
        assert!(t.elapsed().as_millis() < 1000, "{:?}", t.elapsed());
    }

    #[test]
    fn definition_text_limits() {
        let ok = example().to_string();
        assert!(validate_text(&ok).is_ok());
        let mut big = example();
        big["description"] = json!("x".repeat(MAX_DEFINITION_BYTES));
        let f = validate_text(&big.to_string()).unwrap_err();
        assert_eq!(f.len(), 1);
        has(&f, "$", "bytes; at most 262144 are allowed");
        // deeper than serde_json can read: the limit, not the parser, answers
        let mut body = String::from("1");
        for _ in 0..500 {
            body = format!("[{body}]");
        }
        let text = format!(
            r#"{{"name": "x", "start": "w", "nodes": {{"w": {{"type": "webhook", "url": "https://x.example", "body": {body}}}}}}}"#
        );
        let f = validate_text(&text).unwrap_err();
        assert_eq!(
            f,
            vec![Fault::new(
                "$",
                "the definition nests 503 levels deep; at most 100 are allowed"
            )]
        );
        let f = validate_text("{\"name\": ").unwrap_err();
        has(&f, "$", "not valid JSON");
        // a condition at its own nesting limit fits in the definition's
        let mut c = json!({"field": "contact.a", "op": "in", "value": [1]});
        for _ in 0..crate::condition::MAX_DEPTH - 1 {
            c = json!({ "all": [c] });
        }
        let mut d = example();
        d["goal"] = c;
        assert!(validate_text(&d.to_string()).is_ok());
    }

    #[test]
    fn split_decide_and_update_contact_limits() {
        let variants: Vec<Value> = (0..101)
            .map(|_| json!({"weight": 1, "next": "end"}))
            .collect();
        has(
            &node_faults(json!({"type": "split", "variants": variants})),
            "$.nodes.n.variants",
            "a split may have at most 100 variants; this one has 101",
        );
        let paths: Map<String, Value> = (0..101).map(|i| (format!("r{i}"), json!("end"))).collect();
        has(
            &node_faults(
                json!({"type": "decide", "url": "https://x.example", "paths": paths, "default": "end"}),
            ),
            "$.nodes.n.paths",
            "a decide node may have at most 100 paths; this one has 101",
        );
        let tags: Vec<String> = (0..101).map(|i| format!("t{i}")).collect();
        has(
            &node_faults(json!({"type": "update_contact", "remove_lists": tags, "next": "end"})),
            "$.nodes.n.remove_lists",
            "remove_lists may have at most 100 entries; this one has 101",
        );
        let set: Map<String, Value> = (0..101).map(|i| (format!("a{i}"), json!(i))).collect();
        has(
            &node_faults(json!({"type": "update_contact", "set": set, "next": "end"})),
            "$.nodes.n.set",
            "set may hold at most 100 attributes; this one has 101",
        );
        // at the limits: fine
        let variants: Vec<Value> = (0..100)
            .map(|i| json!({"weight": 1, "next": if i % 2 == 0 { "n" } else { "alt" }}))
            .collect();
        let mut d = with_node(json!({"type": "exit"}));
        d["nodes"]["s"] = json!({"type": "split", "variants": variants});
        assert!(validate(&d).is_ok());
        let tags: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
        ok_node(json!({"type": "update_contact", "add_tags": tags, "next": "end"}));
    }

    #[test]
    fn condition_tests_are_counted_over_the_automation() {
        let values: Vec<usize> = (0..3000).collect();
        let mut d = example();
        d["trigger"]["filter"] = json!({"field": "event.id", "op": "in", "value": values});
        assert!(validate(&d).is_ok(), "3000 is fine");
        d["goal"] = json!({"not": {"field": "contact.id", "op": "in", "value": values}});
        let f = faults(&d);
        assert_eq!(f.len(), 1, "{}", crate::fault::describe(&f));
        has(
            &f,
            "$.goal",
            "the automation's conditions reach 6000 tests here; at most 5000 are allowed in all",
        );
        // leaves count one each, over every node
        let leaf = json!({"field": "contact.plan", "op": "eq", "value": "pro"});
        let mut nodes = Map::new();
        for i in 0..60 {
            let paths: Vec<Value> = (0..100)
                .map(|_| json!({"when": leaf, "next": "end"}))
                .collect();
            let next = if i == 59 {
                "end".to_owned()
            } else {
                format!("b{:02}", i + 1)
            };
            nodes.insert(
                format!("b{i:02}"),
                json!({"type": "branch", "paths": paths, "default": next}),
            );
        }
        nodes.insert("end".into(), json!({"type": "exit"}));
        let f = faults(&json!({"name": "x", "start": "b00", "nodes": nodes}));
        assert_eq!(f.len(), 1, "{}", crate::fault::describe(&f));
        has(&f, "$.nodes.b50.paths[0].when", "reach 5001 tests");
    }

    #[test]
    fn too_many_nodes_are_not_parsed_one_by_one() {
        let mut nodes = Map::new();
        for i in 0..5000 {
            nodes.insert(format!("n{i}"), json!({"type": "nonsense"}));
        }
        let f = faults(&json!({"name": "big", "start": "n0", "nodes": nodes}));
        assert_eq!(f.len(), 1, "{}", f[0]);
        has(&f, "$.nodes", "at most 1000 nodes; this one has 5000");
    }

    #[test]
    fn many_cycles_are_summarised() {
        // 490 two-node loops: 20 reported one by one, the other nodes listed once
        let mut nodes = Map::new();
        let starts: Vec<Value> = (0..490)
            .map(|i| json!({"weight": 1, "next": format!("a{i:03}")}))
            .collect();
        for (i, chunk) in starts.chunks(98).enumerate() {
            let mut vs = chunk.to_vec();
            if i < 4 {
                vs.push(json!({"weight": 1, "next": format!("s{}", i + 1)}));
            }
            nodes.insert(format!("s{i}"), json!({"type": "split", "variants": vs}));
        }
        for i in 0..490 {
            nodes.insert(
                format!("a{i:03}"),
                json!({"type": "goal", "next": format!("b{i:03}")}),
            );
            nodes.insert(
                format!("b{i:03}"),
                json!({"type": "goal", "next": format!("a{i:03}")}),
            );
        }
        let d = json!({"name": "x", "start": "s0", "nodes": nodes});
        let f = faults(&d);
        assert_eq!(f.len(), 21, "{}", crate::fault::describe(&f));
        has(
            &f,
            "$.nodes.a000",
            "cycle with no wait step: a000 -> b000 -> a000",
        );
        has(&f, "$.nodes.a019", "a019 -> b019 -> a019");
        has(
            &f,
            "$.nodes",
            "more nodes are on cycles with no wait step: a020, a021,",
        );
        has(&f, "$.nodes", ", … (920 more); add a delay");
    }

    #[test]
    fn validation_stays_fast_at_the_limits() {
        // the slowest shapes found, just under 256 KiB (release: ~15 ms with parsing; debug is
        // ~10x slower, hence the generous bound)
        let ring = {
            let mut nodes = Map::new();
            for i in 0..MAX_NODES {
                nodes.insert(
                    format!("n{i:04}"),
                    json!({"type": "goal", "next": format!("n{:04}", (i + 1) % MAX_NODES)}),
                );
            }
            json!({"name": "x", "start": "n0000", "nodes": nodes})
        };
        for (label, d, cycles) in [
            ("ring", ring, 1),
            ("chords", forward_chords(MAX_NODES, 8), 8),
        ] {
            let text = d.to_string();
            assert!(text.len() < MAX_DEFINITION_BYTES, "{label}");
            let t = std::time::Instant::now();
            let f = validate_text(&text).unwrap_err();
            let took = t.elapsed();
            assert_eq!(f.len(), cycles, "{label}: {}", crate::fault::describe(&f));
            assert!(f
                .iter()
                .all(|f| f.message.contains("cycle with no wait step")));
            assert!(took.as_millis() < 1500, "{label} took {took:?}");
        }
    }

    #[test]
    fn cycle_search_agrees_with_every_node_searched() {
        // the shortest cycle of every node on one, over small graphs: reported once each
        let d = json!({"name": "loops", "start": "a", "nodes": {
            "a": {"type": "split", "variants": [{"weight": 1, "next": "b"}, {"weight": 1, "next": "w"}]},
            "b": {"type": "split", "variants": [{"weight": 1, "next": "c"}, {"weight": 1, "next": "a"}]},
            "c": {"type": "split", "variants": [{"weight": 1, "next": "b"}, {"weight": 1, "next": "d"}]},
            "d": {"type": "goal", "next": "d"},
            "w": {"type": "delay", "duration": "1h", "next": "a"}
        }});
        let f = faults(&d);
        let messages: Vec<&str> = f.iter().map(|f| f.message.as_str()).collect();
        assert_eq!(
            messages,
            vec![
                "cycle with no wait step: a -> b -> a; add a delay, wait_event or approval node to it",
                "cycle with no wait step: b -> c -> b; add a delay, wait_event or approval node to it",
                "cycle with no wait step: d -> d; add a delay, wait_event or approval node to it",
            ]
        );
    }
}

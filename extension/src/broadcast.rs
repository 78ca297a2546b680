//! Broadcast definitions: validation and the normalised form SQL stores and enqueues from.
//!
//! A definition names its audience (lists, a segment, an exclusion), what to send (one template, or
//! weighted variations with an optional A/B test), the provider, optionally its own sender and
//! Reply-To (over the template's and the provider's), an optional rate and when to send
//! (now, at a timestamp, or at a local time in each recipient's zone), and when to stop by itself
//! (`auto_pause`: bounce and complaint rates). Every fault is collected with
//! its JSON path, like automation definitions, so a user fixes a whole definition in one round trip.
//! SQL never reads the user's JSON directly: it reads the normalised object `validate` returns, whose
//! shape is fixed (every key present, variations always a list, weights summing to 100).

use serde_json::{json, Map, Value};

use crate::condition::{Condition, Scope};
use crate::duration::parse_duration;
use crate::fault::{child, index, reject_unknown_keys, Fault};

const KEYS: &[&str] = &[
    "name",
    "audience",
    "template",
    "variations",
    "ab_test",
    "provider",
    "from",
    "reply_to",
    "rate_per_second",
    "send_at",
    "variables",
    "auto_pause",
];
const NAME_RE_HELP: &str = "1 to 200 characters";
/// A key, template key, list or provider name: what herald accepts elsewhere for such names.
fn is_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Validates a broadcast definition; on success returns its normalised form:
/// `{name, lists[], segment|null, exclude|null, variations[{key, template, weight}], ab_test|null
///   {test_percent, metric, wait_seconds}, provider, from|null, reply_to|null, rate_per_second|null,
///   send_at {kind, at|local_time}, variables{}, auto_pause|null {bounce_percent|null,
///   complaint_percent|null, min_sent}}`.
pub fn validate(def: &Value) -> Result<Value, Vec<Fault>> {
    let mut faults = Vec::new();
    let Some(obj) = def.as_object() else {
        return Err(vec![Fault::new(
            "$",
            "a broadcast definition must be a JSON object",
        )]);
    };
    reject_unknown_keys(obj, KEYS, "$", "in a broadcast", &mut faults);

    let name = match obj.get("name") {
        Some(Value::String(s)) if !s.trim().is_empty() && s.chars().count() <= 200 => s.clone(),
        _ => {
            faults.push(Fault::new(
                "$.name",
                format!("required: a string of {NAME_RE_HELP}"),
            ));
            String::new()
        }
    };

    let (lists, segment, exclude) = audience(obj.get("audience"), &mut faults);
    let variations = variations(obj, &mut faults);
    let ab_test = ab_test(obj.get("ab_test"), variations.len(), &mut faults);

    let provider = match obj.get("provider") {
        None => "default".to_string(),
        Some(Value::String(s)) if is_name(s, 64) => s.clone(),
        Some(_) => {
            faults.push(Fault::new(
                "$.provider",
                "a provider name: 1 to 64 letters, digits, \"_\" or \"-\"",
            ));
            String::new()
        }
    };
    let from = mailbox(obj.get("from"), "$.from", &mut faults);
    let reply_to = mailbox(obj.get("reply_to"), "$.reply_to", &mut faults);
    let rate = match obj.get("rate_per_second") {
        None | Some(Value::Null) => Value::Null,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=1_000_000).contains(&n) => json!(n),
            _ => {
                faults.push(Fault::new(
                    "$.rate_per_second",
                    "a whole number from 1 to 1000000",
                ));
                Value::Null
            }
        },
    };
    let send_at = send_at(obj.get("send_at"), &mut faults);
    let auto_pause = auto_pause(obj.get("auto_pause"), &mut faults);
    let variables = match obj.get("variables") {
        None => json!({}),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => {
            faults.push(Fault::new(
                "$.variables",
                "an object (available to templates as broadcast.<key>)",
            ));
            json!({})
        }
    };

    if !faults.is_empty() {
        return Err(faults);
    }
    let prefilter = prefilter(&segment);
    Ok(json!({
        "name": name,
        "lists": lists,
        "segment": segment,
        "segment_sql": prefilter.to_json(),
        "segment_exact": prefilter.exact && !segment.is_null(),
        "exclude": exclude,
        "variations": variations,
        "ab_test": ab_test,
        "provider": provider,
        "from": from,
        "reply_to": reply_to,
        "rate_per_second": rate,
        "send_at": send_at,
        "variables": variables,
        "auto_pause": auto_pause,
    }))
}

/// What of a segment SQL can test itself, with an index, before the condition engine (Rust) runs per
/// contact. Leaves of the segment, alone or under `all`:
///
///   contact.<attribute> eq <string | boolean>     → contains: `attributes @> {...}` (all of them in one)
///   contact.<attribute> in [<string | boolean>…]  → any: `attributes @> ANY ([{...}, …])` (the first such)
///   contact.tags contains <string>                → tags: `tags @> ARRAY[…]`
///   contact.email eq <string> | in [<string>…]    → emails: `email = ANY (…)` (the first such)
///
/// `exact` says these tests are the whole segment, so the engine need not run at all; otherwise it still
/// runs, on the contacts they let through. Strings and booleans only: `eq` compares numbers numerically,
/// which containment does not. Anything else (numbers, ranges, `any`, `not`, nested paths) is the engine's.
#[derive(Debug, Default, PartialEq)]
pub struct Prefilter {
    pub contains: Map<String, Value>,
    pub any: Option<Vec<Value>>,
    pub tags: Vec<String>,
    pub emails: Option<Vec<String>>,
    pub exact: bool,
}

impl Prefilter {
    /// The form stored in a broadcast's definition (`segment_sql`), NULL for what does not apply.
    pub fn to_json(&self) -> Value {
        json!({
            "contains": if self.contains.is_empty() { Value::Null } else { Value::Object(self.contains.clone()) },
            "any": self.any,
            "tags": if self.tags.is_empty() { Value::Null } else { json!(self.tags) },
            "emails": self.emails,
        })
    }
}

pub fn prefilter(segment: &Value) -> Prefilter {
    fn scalar(v: &Value) -> bool {
        v.is_string() || v.is_boolean()
    }
    let children: Vec<&Value> = match segment.get("all").and_then(Value::as_array) {
        Some(items) => items.iter().collect(),
        None if segment.is_object() => vec![segment],
        None => return Prefilter::default(),
    };
    let mut p = Prefilter {
        exact: true,
        ..Prefilter::default()
    };
    for c in children {
        let leaf = (|| {
            let attr = c.get("field")?.as_str()?.strip_prefix("contact.")?;
            Some((attr, c.get("op")?.as_str()?, c.get("value")?))
        })();
        let taken = match leaf {
            Some(("email", "eq", Value::String(e))) if p.emails.is_none() => {
                p.emails = Some(vec![e.clone()]);
                true
            }
            Some(("email", "in", Value::Array(items)))
                if p.emails.is_none()
                    && !items.is_empty()
                    && items.iter().all(Value::is_string) =>
            {
                p.emails = Some(
                    items
                        .iter()
                        .filter_map(|e| e.as_str().map(String::from))
                        .collect(),
                );
                true
            }
            Some(("tags", "contains", Value::String(tag))) => {
                p.tags.push(tag.clone());
                true
            }
            Some((attr, op, value))
                if !attr.contains('.') && !["email", "timezone", "tags"].contains(&attr) =>
            {
                match (op, value) {
                    ("eq", v) if scalar(v) && p.contains.get(attr).is_none_or(|old| old == v) => {
                        p.contains.insert(attr.to_string(), v.clone());
                        true
                    }
                    ("in", Value::Array(items))
                        if p.any.is_none() && !items.is_empty() && items.iter().all(scalar) =>
                    {
                        p.any = Some(items.iter().map(|v| json!({ attr: v })).collect());
                        true
                    }
                    _ => false,
                }
            }
            _ => false,
        };
        p.exact &= taken;
    }
    p
}

/// `"all"` (every contact that is not suppressed) or `{lists?: [name], segment?: condition,
/// exclude?: condition}` with at least one of them. A missing or empty audience is refused: sending to
/// everyone must be said, never a default a forgotten key falls into.
fn audience(v: Option<&Value>, faults: &mut Vec<Fault>) -> (Vec<String>, Value, Value) {
    const SHAPE: &str =
        "\"all\" (every contact that is not suppressed) or an object with lists, segment and/or exclude";
    let mut lists = Vec::new();
    let (mut segment, mut exclude) = (Value::Null, Value::Null);
    let obj = match v {
        Some(Value::String(s)) if s == "all" => return (lists, segment, exclude),
        None => {
            faults.push(Fault::new("$.audience", format!("required: {SHAPE}")));
            return (lists, segment, exclude);
        }
        Some(Value::Object(obj)) if obj.is_empty() => {
            faults.push(Fault::new(
                "$.audience",
                "an empty audience would reach every contact: write \"all\" if that is meant",
            ));
            return (lists, segment, exclude);
        }
        Some(Value::Object(obj)) => obj,
        Some(_) => {
            faults.push(Fault::new("$.audience", SHAPE));
            return (lists, segment, exclude);
        }
    };
    reject_unknown_keys(
        obj,
        &["lists", "segment", "exclude"],
        "$.audience",
        "in an audience",
        faults,
    );
    match obj.get("lists") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(s) if !s.is_empty() && s.len() <= 200 => {
                        if !lists.iter().any(|l| l == s) {
                            lists.push(s.to_string());
                        }
                    }
                    _ => faults.push(Fault::new(
                        index("$.audience.lists", i),
                        "a list name: a non-empty string of at most 200 characters",
                    )),
                }
            }
        }
        Some(_) => faults.push(Fault::new("$.audience.lists", "an array of list names")),
    }
    for (key, slot) in [("segment", &mut segment), ("exclude", &mut exclude)] {
        if let Some(c) = obj.get(key) {
            let path = child("$.audience", key);
            match Condition::parse(c, &path) {
                Ok(cond) => {
                    let scopes = cond.scopes();
                    if scopes.reads(Scope::Event) || scopes.reads(Scope::Context) {
                        faults.push(Fault::new(
                            path,
                            "an audience condition may only use contact.* fields",
                        ));
                    } else {
                        *slot = c.clone();
                    }
                }
                Err(fs) => faults.extend(fs),
            }
        }
    }
    (lists, segment, exclude)
}

/// `template` (one variation "default", weight 100) or `variations` (weights normalised to sum 100).
/// A sender or Reply-To: absent or null → null; else a mailbox, stored trimmed.
fn mailbox(v: Option<&Value>, path: &str, faults: &mut Vec<Fault>) -> Value {
    match v {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) if crate::mailbox::is_valid(s.trim()) => json!(s.trim()),
        Some(other) => {
            faults.push(Fault::new(
                path,
                format!("{other} is not {}", crate::mailbox::HELP),
            ));
            Value::Null
        }
    }
}

fn variations(obj: &Map<String, Value>, faults: &mut Vec<Fault>) -> Vec<Value> {
    match (obj.get("template"), obj.get("variations")) {
        (Some(_), Some(_)) => {
            faults.push(Fault::new(
                "$",
                "give either template or variations, not both",
            ));
            Vec::new()
        }
        (None, None) => {
            faults.push(Fault::new(
                "$.template",
                "required: a template key (or variations)",
            ));
            Vec::new()
        }
        (Some(t), None) => match t.as_str() {
            Some(s) if is_name(s, 100) => {
                vec![json!({"key": "default", "template": s, "weight": 100.0})]
            }
            _ => {
                faults.push(Fault::new("$.template", "a template key"));
                Vec::new()
            }
        },
        (None, Some(v)) => {
            let Some(items) = v.as_array().filter(|a| !a.is_empty() && a.len() <= 26) else {
                faults.push(Fault::new(
                    "$.variations",
                    "an array of 1 to 26 {key, template, weight} objects",
                ));
                return Vec::new();
            };
            let mut out: Vec<(String, String, u64)> = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let path = index("$.variations", i);
                let key = item.get("key").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str);
                let weight = match item.get("weight") {
                    None => Some(1),
                    Some(w) => w.as_u64().filter(|w| (1..=1000).contains(w)),
                };
                if let Some(o) = item.as_object() {
                    reject_unknown_keys(
                        o,
                        &["key", "template", "weight"],
                        &path,
                        "in a variation",
                        faults,
                    );
                }
                match key {
                    Some(k) if is_name(k, 32) => {
                        if out.iter().any(|(o, _, _)| o == k) {
                            faults.push(Fault::new(child(&path, "key"), "duplicate variation key"));
                        }
                    }
                    _ => faults.push(Fault::new(
                        child(&path, "key"),
                        "required: 1 to 32 letters, digits, \"_\", \"-\" or \".\"",
                    )),
                }
                if !template.is_some_and(|t| is_name(t, 100)) {
                    faults.push(Fault::new(
                        child(&path, "template"),
                        "required: a template key",
                    ));
                }
                if weight.is_none() {
                    faults.push(Fault::new(
                        child(&path, "weight"),
                        "a whole number from 1 to 1000",
                    ));
                }
                if let (Some(k), Some(t), Some(w)) = (key, template, weight) {
                    out.push((k.to_string(), t.to_string(), w));
                }
            }
            let total: u64 = out.iter().map(|(_, _, w)| w).sum();
            out.into_iter()
                .map(|(k, t, w)| json!({"key": k, "template": t, "weight": w as f64 * 100.0 / total.max(1) as f64}))
                .collect()
        }
    }
}

/// `{test_percent: 1..50, metric: "opens"|"clicks", wait: duration}`; only with 2+ variations.
fn ab_test(v: Option<&Value>, n_variations: usize, faults: &mut Vec<Fault>) -> Value {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Value::Null;
    };
    let Some(obj) = v.as_object() else {
        faults.push(Fault::new(
            "$.ab_test",
            "an object {test_percent, metric, wait}",
        ));
        return Value::Null;
    };
    if n_variations < 2 {
        faults.push(Fault::new(
            "$.ab_test",
            "an A/B test needs variations (at least two)",
        ));
    }
    let pct = obj
        .get("test_percent")
        .and_then(Value::as_u64)
        .filter(|p| (1..=50).contains(p));
    if pct.is_none() {
        faults.push(Fault::new(
            "$.ab_test.test_percent",
            "required: a whole number from 1 to 50 (the share of the audience that tests)",
        ));
    }
    let metric = obj.get("metric").and_then(Value::as_str).unwrap_or("opens");
    if !["opens", "clicks"].contains(&metric) {
        faults.push(Fault::new("$.ab_test.metric", "opens or clicks"));
    }
    let wait = match obj.get("wait").and_then(Value::as_str).map(parse_duration) {
        Some(Ok(d)) if d.num_seconds() >= 60 && d.num_seconds() <= 30 * 86_400 => {
            Some(d.num_seconds())
        }
        _ => {
            faults.push(Fault::new(
                "$.ab_test.wait",
                "required: a duration from 1 minute to 30 days, e.g. \"4 hours\"",
            ));
            None
        }
    };
    reject_unknown_keys(
        obj,
        &["test_percent", "metric", "wait"],
        "$.ab_test",
        "in an A/B test",
        faults,
    );
    json!({"test_percent": pct, "metric": metric, "wait_seconds": wait})
}

/// How many sent messages an automatic pause waits for by default: below that a rate says little
/// (2 bounces in the first 20 messages are 10%).
const AUTO_PAUSE_MIN_SENT: u64 = 500;

/// `{bounce_percent, complaint_percent, min_sent}`: advance_broadcasts pauses a sending broadcast once
/// `min_sent` of its messages are sent and hard bounces or complaints reach the percent of them. At
/// least one percent; each more than 0 and at most 100 (0.1 for complaints is the usual mailbox
/// providers' line).
fn auto_pause(v: Option<&Value>, faults: &mut Vec<Fault>) -> Value {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Value::Null;
    };
    let Some(obj) = v.as_object() else {
        faults.push(Fault::new(
            "$.auto_pause",
            "an object {bounce_percent, complaint_percent, min_sent}",
        ));
        return Value::Null;
    };
    reject_unknown_keys(
        obj,
        &["bounce_percent", "complaint_percent", "min_sent"],
        "$.auto_pause",
        "in auto_pause",
        faults,
    );
    let mut percent = |key: &str| match obj.get(key) {
        None | Some(Value::Null) => Value::Null,
        Some(v) => match v.as_f64() {
            Some(p) if p > 0.0 && p <= 100.0 => json!(p),
            _ => {
                faults.push(Fault::new(
                    format!("$.auto_pause.{key}"),
                    "a number more than 0 and at most 100 (a percent of the messages sent)",
                ));
                Value::Null
            }
        },
    };
    let bounce = percent("bounce_percent");
    let complaint = percent("complaint_percent");
    if obj.get("bounce_percent").is_none_or(Value::is_null)
        && obj.get("complaint_percent").is_none_or(Value::is_null)
    {
        faults.push(Fault::new(
            "$.auto_pause",
            "give bounce_percent, complaint_percent or both",
        ));
    }
    let min_sent = match obj.get("min_sent") {
        None | Some(Value::Null) => AUTO_PAUSE_MIN_SENT,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=100_000_000).contains(&n) => n,
            _ => {
                faults.push(Fault::new(
                    "$.auto_pause.min_sent",
                    "a whole number from 1 to 100000000 (messages sent before the rates count)",
                ));
                AUTO_PAUSE_MIN_SENT
            }
        },
    };
    json!({"bounce_percent": bounce, "complaint_percent": complaint, "min_sent": min_sent})
}

/// absent = when scheduled; `{"at": "<RFC 3339>"}`; `{"local_time": "HH:MM"}` in each recipient's zone.
fn send_at(v: Option<&Value>, faults: &mut Vec<Fault>) -> Value {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return json!({"kind": "now"});
    };
    let obj = v.as_object();
    if let Some(at) = obj.and_then(|o| o.get("at")) {
        return match at.as_str().map(chrono::DateTime::parse_from_rfc3339) {
            Some(Ok(t)) if obj.is_some_and(|o| o.len() == 1) => {
                json!({"kind": "at", "at": t.to_rfc3339()})
            }
            _ => {
                faults.push(Fault::new(
                    "$.send_at.at",
                    "an RFC 3339 timestamp such as \"2026-12-01T09:00:00Z\", and nothing else in send_at",
                ));
                Value::Null
            }
        };
    }
    if let Some(local) = obj.and_then(|o| o.get("local_time")) {
        return match local.as_str().and_then(parse_hh_mm) {
            Some(t) if obj.is_some_and(|o| o.len() == 1) => {
                json!({"kind": "local", "local_time": t})
            }
            _ => {
                faults.push(Fault::new(
                    "$.send_at.local_time",
                    "a local time \"HH:MM\" (24 h), and nothing else in send_at",
                ));
                Value::Null
            }
        };
    }
    faults.push(Fault::new(
        "$.send_at",
        "{\"at\": \"<timestamp>\"} or {\"local_time\": \"HH:MM\"} (absent: when scheduled)",
    ));
    Value::Null
}

fn parse_hh_mm(s: &str) -> Option<String> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then(|| format!("{h:02}:{m:02}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(def: Value) -> Vec<String> {
        validate(&def)
            .unwrap_err()
            .into_iter()
            .map(|f| f.path)
            .collect()
    }

    #[test]
    fn the_audience_must_be_said() {
        assert_eq!(
            paths(json!({"name": "x", "template": "t"})),
            vec!["$.audience"]
        );
        assert_eq!(
            paths(json!({"name": "x", "template": "t", "audience": {}})),
            vec!["$.audience"]
        );
        assert_eq!(
            paths(json!({"name": "x", "template": "t", "audience": "everyone"})),
            vec!["$.audience"]
        );
        let all = validate(&json!({"name": "x", "template": "t", "audience": "all"})).unwrap();
        assert_eq!(
            (&all["lists"], &all["segment"], &all["exclude"]),
            (&json!([]), &Value::Null, &Value::Null)
        );
        let f = validate(&json!({"name": "x", "template": "t", "audience": {}})).unwrap_err();
        assert!(f[0].message.contains("write \"all\""), "{}", f[0].message);
    }

    #[test]
    fn a_single_template_becomes_one_default_variation() {
        let n = validate(&json!({"name": "News", "audience": "all", "template": "news"})).unwrap();
        assert_eq!(
            n["variations"],
            json!([{"key": "default", "template": "news", "weight": 100.0}])
        );
        assert_eq!(n["lists"], json!([]));
        assert_eq!(n["provider"], "default");
        assert_eq!(n["send_at"], json!({"kind": "now"}));
        assert_eq!(n["ab_test"], Value::Null);
    }

    #[test]
    fn the_design_example_validates_and_weights_sum_to_100() {
        let n = validate(&json!({ "name": "November news",
          "audience": { "lists": ["newsletter", "newsletter"],
                        "segment": { "field": "contact.plan", "op": "eq", "value": "pro" },
                        "exclude": { "field": "contact.country", "op": "eq", "value": "XX" } },
          "variations": [ { "key": "a", "template": "news-a", "weight": 1 }, { "key": "b", "template": "news-b", "weight": 3 } ],
          "ab_test": { "test_percent": 20, "metric": "opens", "wait": "4 hours" },
          "provider": "default", "rate_per_second": 200 }))
        .unwrap();
        assert_eq!(n["lists"], json!(["newsletter"]));
        assert_eq!(n["variations"][0]["weight"], 25.0);
        assert_eq!(n["variations"][1]["weight"], 75.0);
        assert_eq!(
            n["ab_test"],
            json!({"test_percent": 20, "metric": "opens", "wait_seconds": 14400})
        );
        assert_eq!(n["rate_per_second"], 200);
    }

    #[test]
    fn every_fault_is_reported_with_its_path() {
        let p = paths(
            json!({"name": "", "audience": "all", "template": "t", "variations": [], "colour": 1,
                             "audience": {"lists": [""], "segment": {"field": "event.x", "op": "eq", "value": 1}},
                             "rate_per_second": 0, "send_at": {"local_time": "25:00"}}),
        );
        for want in [
            "$.name",
            "$",
            "$.colour",
            "$.audience.lists[0]",
            "$.audience.segment",
            "$.rate_per_second",
            "$.send_at.local_time",
        ] {
            assert!(p.contains(&want.to_string()), "{want} missing from {p:?}");
        }
    }

    #[test]
    fn auto_pause_is_checked_and_normalised() {
        let base = json!({"name": "x", "audience": "all", "template": "t"});
        let with = |auto_pause: Value| {
            let mut d = base.clone();
            d["auto_pause"] = auto_pause;
            validate(&d)
        };
        assert_eq!(validate(&base).unwrap()["auto_pause"], Value::Null);
        assert_eq!(
            with(json!({"bounce_percent": 5})).unwrap()["auto_pause"],
            json!({"bounce_percent": 5.0, "complaint_percent": null, "min_sent": 500})
        );
        assert_eq!(
            with(json!({"complaint_percent": 0.1, "min_sent": 2000})).unwrap()["auto_pause"],
            json!({"bounce_percent": null, "complaint_percent": 0.1, "min_sent": 2000})
        );
        let faults = |v: Value| {
            with(v)
                .unwrap_err()
                .into_iter()
                .map(|f| f.path)
                .collect::<Vec<_>>()
        };
        assert_eq!(faults(json!({})), vec!["$.auto_pause"]);
        assert_eq!(faults(json!(5)), vec!["$.auto_pause"]);
        assert_eq!(
            faults(
                json!({"bounce_percent": 0, "complaint_percent": 101, "min_sent": 0, "rate": 1})
            ),
            vec![
                "$.auto_pause.rate",
                "$.auto_pause.bounce_percent",
                "$.auto_pause.complaint_percent",
                "$.auto_pause.min_sent"
            ]
        );
        assert_eq!(
            faults(json!({"bounce_percent": "5%"})),
            vec!["$.auto_pause.bounce_percent"]
        );
    }

    #[test]
    fn senders_are_mailboxes() {
        let n = validate(&json!({"name": "x", "audience": "all", "template": "t",
                                 "from": " Acme News <news@acme.test> ", "reply_to": "help@acme.test"}))
        .unwrap();
        assert_eq!(
            (&n["from"], &n["reply_to"]),
            (
                &json!("Acme News <news@acme.test>"),
                &json!("help@acme.test")
            )
        );
        let n = validate(&json!({"name": "x", "audience": "all", "template": "t"})).unwrap();
        assert_eq!((&n["from"], &n["reply_to"]), (&Value::Null, &Value::Null));
        let f = validate(&json!({"name": "x", "audience": "all", "template": "t",
                                 "from": "Acme <news@acme>", "reply_to": 5}))
        .unwrap_err();
        assert_eq!(
            f.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
            ["$.from", "$.reply_to"]
        );
        assert!(
            f[0].message
                .starts_with("\"Acme <news@acme>\" is not a mailbox"),
            "{}",
            f[0].message
        );
    }

    #[test]
    fn variations_and_ab_tests_are_checked() {
        let p = paths(
            json!({"name": "x", "audience": "all", "variations": [{"key": "a", "template": "t"}, {"key": "a", "template": "", "weight": 0}],
                             "ab_test": {"test_percent": 80, "metric": "likes"}}),
        );
        for want in [
            "$.variations[1].key",
            "$.variations[1].template",
            "$.variations[1].weight",
            "$.ab_test.test_percent",
            "$.ab_test.metric",
            "$.ab_test.wait",
        ] {
            assert!(p.contains(&want.to_string()), "{want} missing from {p:?}");
        }
        let p = paths(
            json!({"name": "x", "audience": "all", "template": "t", "ab_test": {"test_percent": 10, "wait": "1 hour"}}),
        );
        assert_eq!(p, vec!["$.ab_test"]);
        assert!(validate(&json!("nope")).is_err());
    }

    #[test]
    fn segments_become_sql_tests_where_sql_can_make_them() {
        let sql = |v: Value| {
            let p = prefilter(&v);
            (p.to_json(), p.exact)
        };
        let none = json!({"contains": null, "any": null, "tags": null, "emails": null});
        assert_eq!(
            sql(json!({"field": "contact.plan", "op": "eq", "value": "pro"})),
            (
                json!({"contains": {"plan": "pro"}, "any": null, "tags": null, "emails": null}),
                true
            )
        );
        assert_eq!(
            sql(
                json!({"all": [{"field": "contact.plan", "op": "in", "value": ["pro", "team"]},
                               {"field": "contact.vip", "op": "eq", "value": true},
                               {"field": "contact.tags", "op": "contains", "value": "beta"},
                               {"field": "contact.tags", "op": "contains", "value": "eu"},
                               {"field": "contact.email", "op": "in", "value": ["a@x.example", "b@x.example"]}]})
            ),
            (
                json!({"contains": {"vip": true}, "any": [{"plan": "pro"}, {"plan": "team"}],
                       "tags": ["beta", "eu"], "emails": ["a@x.example", "b@x.example"]}),
                true
            )
        );
        // partly: the engine still runs on what the SQL tests let through
        assert_eq!(
            sql(
                json!({"all": [{"field": "contact.plan", "op": "eq", "value": "pro"},
                               {"field": "contact.age", "op": "gt", "value": 30}]})
            ),
            (
                json!({"contains": {"plan": "pro"}, "any": null, "tags": null, "emails": null}),
                false
            )
        );
        // a second `in` on attributes, a second email test, a contradiction: left to the engine
        for (v, kept) in [
            (
                json!({"all": [{"field": "contact.plan", "op": "in", "value": ["pro"]},
                               {"field": "contact.lang", "op": "in", "value": ["fr"]}]}),
                json!({"contains": null, "any": [{"plan": "pro"}], "tags": null, "emails": null}),
            ),
            (
                json!({"all": [{"field": "contact.email", "op": "eq", "value": "a@x.example"},
                               {"field": "contact.email", "op": "eq", "value": "b@x.example"}]}),
                json!({"contains": null, "any": null, "tags": null, "emails": ["a@x.example"]}),
            ),
            (
                json!({"all": [{"field": "contact.plan", "op": "eq", "value": "pro"},
                               {"field": "contact.plan", "op": "eq", "value": "free"}]}),
                json!({"contains": {"plan": "pro"}, "any": null, "tags": null, "emails": null}),
            ),
        ] {
            assert_eq!(sql(v.clone()), (kept, false), "{v}");
        }
        // numbers compare numerically, any/not are not conjunctions, nested paths and empty lists stay
        for v in [
            json!({"field": "contact.age", "op": "eq", "value": 30}),
            json!({"field": "contact.plan", "op": "in", "value": []}),
            json!({"field": "contact.plan", "op": "in", "value": [1, 2]}),
            json!({"field": "contact.tags", "op": "contains", "value": 3}),
            json!({"any": [{"field": "contact.plan", "op": "eq", "value": "pro"}]}),
            json!({"not": {"field": "contact.plan", "op": "eq", "value": "pro"}}),
            json!({"field": "contact.address.city", "op": "eq", "value": "Paris"}),
            json!({"field": "event.plan", "op": "eq", "value": "pro"}),
        ] {
            assert_eq!(sql(v.clone()), (none.clone(), false), "{v}");
        }
        assert_eq!(sql(Value::Null), (none, false));
    }

    #[test]
    fn send_times() {
        let n =
            validate(&json!({"name": "x", "audience": "all", "template": "t", "send_at": {"local_time": "09:30"}}))
                .unwrap();
        assert_eq!(
            n["send_at"],
            json!({"kind": "local", "local_time": "09:30"})
        );
        let n = validate(
            &json!({"name": "x", "audience": "all", "template": "t", "send_at": {"at": "2026-12-01T09:00:00+01:00"}}),
        )
        .unwrap();
        assert_eq!(n["send_at"]["kind"], "at");
        assert_eq!(
            paths(
                json!({"name": "x", "audience": "all", "template": "t", "send_at": {"at": "tomorrow"}})
            ),
            vec!["$.send_at.at"]
        );
        assert_eq!(
            paths(json!({"name": "x", "audience": "all", "template": "t", "send_at": "now"})),
            vec!["$.send_at"]
        );
    }
}

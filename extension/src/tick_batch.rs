//! The bridge between `herald.tick()`'s batch (two JSON documents built by SQL) and the step engine:
//! take each automation validated (from the [`DefinitionCache`], so once per backend, not per tick),
//! build the engine's inputs, and flatten its outcomes into the rows SQL writes back. No Postgres
//! here, so it is tested with plain `cargo test`.
//!
//! One tenant's data cannot stop the tick for the others: the batch is split into raw enrollments
//! (skipping a value is iterative in serde_json, so no depth reaches its recursion limit) and each is
//! read on its own; one that cannot be read (nested too deep, a wrong type, an unknown status), whose
//! automation does not validate, or that makes the engine panic becomes a `failed` row alone.

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::definition_cache::{DefinitionCache, Validated};
use crate::step_engine::{self, Outcome, Status, StepInput, Wait};

/// One enrollment's outcome, shaped like a row of `herald._steps`.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRow {
    pub enrollment_id: i64,
    /// Passed through from the batch, so SQL needs no join back to the due rows.
    pub workspace_id: String,
    pub automation_id: i64,
    pub contact_id: i64,
    pub status: String,
    pub node: String,
    /// Epoch seconds; None = not by time ('infinity' in SQL).
    pub next_run_at: Option<f64>,
    pub visit: i32,
    pub exit_reason: Option<String>,
    pub wait_kind: Option<String>,
    pub wait_event: Option<String>,
    pub wait_filter: Option<Value>,
    pub job: Option<Value>,
    pub contact_update: Option<Value>,
    /// The step log, as parallel arrays (node, visit, action): SQL unnests them without parsing JSON.
    pub log_nodes: Vec<String>,
    pub log_visits: Vec<i32>,
    pub log_actions: Vec<String>,
    /// Stats deltas of this enrollment: (node, '' for automation-level metrics; metric).
    pub counts: Vec<(String, &'static str)>,
    /// The automation version the enrollment ran on (1 when the batch did not say).
    pub version: i32,
}

/// The metric that counts entries into a node by contacts on `version`, kept beside the total
/// `entered` for versions after the first (the operator's page shows "passed" per version; version
/// 1's figure is the total minus the others, so an automation never updated writes no extra rows).
pub fn entered_on_version(version: i32) -> Option<String> {
    (version > 1).then(|| format!("entered@v{version}"))
}

/// The batch's stats deltas summed per (automation, node, metric), so SQL inserts a handful of rows
/// instead of grouping one row per count (7 per enrollment in a 3-node flow). Neighbouring rows of
/// one automation mostly made the same counts (a batch is in due order, one journey's contacts
/// together): such a run is compared row to row and added to the map once, with its length; a map
/// entry per count was an eighth of `_steps`' time (perf, 10,000 rows of a 3-node flow).
pub fn count_totals(rows: &[StepRow]) -> Vec<(i64, String, String, i64)> {
    type Totals<'r> = BTreeMap<(i64, &'r str, std::borrow::Cow<'r, str>), i64>;
    fn add<'r>(totals: &mut Totals<'r>, r: &'r StepRow, times: i64) {
        let per_version = entered_on_version(r.version);
        for (node, metric) in &r.counts {
            *totals
                .entry((r.automation_id, node.as_str(), (*metric).into()))
                .or_default() += times;
            if let (Some(versioned), "entered") = (&per_version, *metric) {
                *totals
                    .entry((r.automation_id, node.as_str(), versioned.clone().into()))
                    .or_default() += times;
            }
        }
    }
    let mut totals: Totals<'_> = BTreeMap::new();
    let same = |a: &StepRow, b: &StepRow| {
        a.automation_id == b.automation_id && a.version == b.version && a.counts == b.counts
    };
    let mut run: Option<(&StepRow, i64)> = None;
    for r in rows {
        run = match run {
            Some((first, n)) if same(first, r) => Some((first, n + 1)),
            Some((first, n)) => {
                add(&mut totals, first, n);
                Some((r, 1))
            }
            None => Some((r, 1)),
        };
    }
    if let Some((first, n)) = run {
        add(&mut totals, first, n);
    }
    totals
        .into_iter()
        .map(|((a, node, metric), n)| (a, node.to_string(), metric.into_owned(), n))
        .collect()
}

/// Runs one batch. `automations`: the text of `{"<id>:<version>": definition}` (a key without
/// `:<version>` is version 1); `enrollments`: the text of an array of `{id, workspace_id,
/// automation_id, version, contact_id, status, node, visit, context, event, contact, timezone}`
/// (`version` defaults to 1): each enrollment runs on the definition of its own version, so two
/// versions of one automation can share a batch. A batch SQL did not build right is an error:
/// automations not an object of `<id>:<version>` keys, enrollments not an array, an enrollment whose keys (id, workspace_id, automation_id,
/// contact_id, node, visit) cannot be read. Anything else wrong with one enrollment or automation
/// fails that enrollment with the reason instead of stopping the tick.
pub fn run(
    automations: &str,
    enrollments: &str,
    now_epoch: f64,
    max_transitions: i32,
    cache: &mut DefinitionCache,
) -> Result<Vec<StepRow>, String> {
    run_with(
        automations,
        enrollments,
        now_epoch,
        max_transitions,
        cache,
        step_engine::advance,
    )
}

/// [`run`] with the step engine passed in, so a test can make it panic.
fn run_with(
    automations: &str,
    enrollments: &str,
    now_epoch: f64,
    max_transitions: i32,
    cache: &mut DefinitionCache,
    advance: impl Fn(StepInput) -> Outcome,
) -> Result<Vec<StepRow>, String> {
    let now = DateTime::<Utc>::from_timestamp_micros((now_epoch * 1e6).round() as i64)
        .ok_or_else(|| format!("now {now_epoch} is out of range"))?;
    // Each definition stays raw text here: read (and validated) only when an enrollment needs it,
    // and only on a cache miss.
    let defs: HashMap<String, &RawValue> = serde_json::from_str(automations).map_err(|e| {
        format!("automations must be an object of \"<id>:<version>\" -> definition: {e}")
    })?;
    let defs: HashMap<(i64, i32), &RawValue> = defs
        .into_iter()
        .map(|(key, def)| {
            version_key(&key)
                .map(|k| (k, def))
                .ok_or_else(|| format!("automation key {key:?} is not <id>:<version>"))
        })
        .collect::<Result<_, String>>()?;
    let mut validated: HashMap<(i64, i32), Validated> = HashMap::new();
    let items: Option<Vec<&RawValue>> =
        serde_json::from_str(enrollments).map_err(|e| format!("enrollments: {e}"))?;
    let items = items.unwrap_or_default();

    let mut rows = Vec::with_capacity(items.len());
    for raw in items {
        let e = match read_enrollment(raw.get()) {
            Ok(e) => e,
            Err(reason) => {
                // the keys alone (other fields skipped unparsed) say which row fails
                let keys: Keys = serde_json::from_str(raw.get()).map_err(|e| {
                    format!("enrollments: an enrollment's keys cannot be read: {e}")
                })?;
                rows.push(failed(
                    &keys,
                    format!("enrollment data cannot be read: {reason}"),
                ));
                continue;
            }
        };
        let key = (e.keys.automation_id, e.version);
        let automation = defs.get(&key).map(|def| {
            validated
                .entry(key)
                .or_insert_with(|| cache.get(key, def.get()))
                .clone()
        });
        let row = match automation.as_deref() {
            Some(Ok(automation)) => {
                let keys = e.keys.clone();
                let input = StepInput {
                    enrollment_id: e.keys.id,
                    automation_id: e.keys.automation_id,
                    automation,
                    status: e.status,
                    node: e.keys.node,
                    visit: e.keys.visit,
                    context: e.context,
                    contact: e.contact,
                    event: e.event,
                    timezone: e.timezone.and_then(|tz| tz.parse().ok()),
                    now,
                    max_transitions: max_transitions.max(1) as u32,
                };
                // No Postgres call happens inside the step engine (plain Rust over its input), so
                // catching its panic cannot swallow a Postgres ERROR that pgrx carries as a panic:
                // an engine bug fails this enrollment, not the tick of every workspace.
                match catch_unwind(AssertUnwindSafe(|| advance(input))) {
                    Ok(outcome) => StepRow {
                        version: e.version,
                        ..to_row(outcome, &keys)
                    },
                    Err(panic) => failed(
                        &keys,
                        format!(
                            "the step engine failed on this enrollment (a bug in herald): {}",
                            panic_message(panic.as_ref())
                        ),
                    ),
                }
            }
            Some(Err(reason)) => failed(
                &e.keys,
                format!(
                    "automation {} no longer validates: {reason}",
                    e.keys.automation_id
                ),
            ),
            None => failed(
                &e.keys,
                format!(
                    "automation {} version {} is missing from the batch",
                    e.keys.automation_id, e.version
                ),
            ),
        };
        rows.push(row);
    }
    Ok(rows)
}

/// A definition's key in the batch: `"<automation id>:<version>"`, or `"<automation id>"` for
/// version 1 (what tick sent before automations had versions).
fn version_key(key: &str) -> Option<(i64, i32)> {
    match key.split_once(':') {
        Some((id, version)) => Some((id.parse().ok()?, version.parse().ok()?)),
        None => Some((key.parse().ok()?, 1)),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

/// What identifies an enrollment's row: enough to write a `failed` row when the rest cannot be
/// read. Unknown fields are skipped without being parsed.
#[derive(Deserialize, Clone)]
struct Keys {
    id: i64,
    workspace_id: String,
    automation_id: i64,
    contact_id: i64,
    node: String,
    visit: i32,
}

struct Enrollment {
    keys: Keys,
    /// The automation version the enrollment runs on (1 when the batch does not say).
    version: i32,
    status: Status,
    context: Value,
    contact: Value,
    event: Option<Value>,
    timezone: Option<String>,
}

/// One element of the batch as SQL builds it. (The keys are spelled out rather than a flattened
/// [`Keys`]: serde buffers a flattened struct's fields, every value included, before reading them.)
#[derive(Deserialize)]
struct RawEnrollment {
    id: i64,
    workspace_id: String,
    automation_id: i64,
    contact_id: i64,
    node: String,
    visit: i32,
    status: String,
    #[serde(default = "first_version")]
    version: i32,
    #[serde(default)]
    context: Value,
    /// The contact's facts as one object (what `_contact_facts` builds), or in parts below.
    #[serde(default)]
    contact: Value,
    /// The contact in parts, as tick sends it: its attributes, email and tags (with `timezone`),
    /// joined here into the facts `_contact_facts` would build, so SQL builds no JSON per contact.
    #[serde(default)]
    attributes: Option<Map<String, Value>>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    tags: Option<Value>,
    #[serde(default)]
    event: Value,
    #[serde(default)]
    timezone: Option<String>,
}

/// Reads one enrollment of the batch; `Err` says why it cannot be read.
fn first_version() -> i32 {
    1
}

fn read_enrollment(text: &str) -> Result<Enrollment, String> {
    let r: RawEnrollment = serde_json::from_str(text).map_err(|e| e.to_string())?;
    Ok(Enrollment {
        status: Status::parse(&r.status)
            .ok_or_else(|| format!("unknown enrollment status {:?}", r.status))?,
        version: r.version,
        keys: Keys {
            id: r.id,
            workspace_id: r.workspace_id,
            automation_id: r.automation_id,
            contact_id: r.contact_id,
            node: r.node,
            visit: r.visit,
        },
        context: if r.context.is_object() {
            r.context
        } else {
            json!({})
        },
        contact: match (r.contact, r.attributes) {
            (Value::Null, Some(attributes)) => {
                contact_facts(attributes, r.email, r.timezone.clone(), r.tags)
            }
            (Value::Null, None) => json!({}),
            (contact, _) => contact,
        },
        event: Some(r.event).filter(|e| !e.is_null()),
        timezone: r.timezone,
    })
}

/// The facts a condition reads as `contact.*`: the attributes, with `email`, `timezone` and `tags`
/// over them (the same object as SQL's `herald._contact_facts`; a missing tags array is empty).
fn contact_facts(
    mut attributes: Map<String, Value>,
    email: Option<String>,
    timezone: Option<String>,
    tags: Option<Value>,
) -> Value {
    attributes.insert("email".into(), email.map_or(Value::Null, Value::String));
    attributes.insert(
        "timezone".into(),
        timezone.map_or(Value::Null, Value::String),
    );
    attributes.insert(
        "tags".into(),
        tags.filter(|t| !t.is_null()).unwrap_or_else(|| json!([])),
    );
    Value::Object(attributes)
}

fn failed(e: &Keys, reason: String) -> StepRow {
    StepRow {
        enrollment_id: e.id,
        workspace_id: e.workspace_id.clone(),
        automation_id: e.automation_id,
        contact_id: e.contact_id,
        status: Status::Failed.as_str().into(),
        node: e.node.clone(),
        next_run_at: None,
        visit: e.visit,
        exit_reason: Some(reason.clone()),
        wait_kind: None,
        wait_event: None,
        wait_filter: None,
        job: None,
        contact_update: None,
        log_nodes: vec![e.node.clone()],
        log_visits: vec![e.visit],
        log_actions: vec![format!("failed: {reason}")],
        counts: vec![(String::new(), "failed")],
        version: 1,
    }
}

/// `keys`: the enrollment's workspace, automation and contact are passed through to SQL.
fn to_row(o: Outcome, keys: &Keys) -> StepRow {
    let (workspace_id, automation_id, contact_id) = (
        keys.workspace_id.clone(),
        keys.automation_id,
        keys.contact_id,
    );
    let (wait_kind, wait_event, wait_filter) = match &o.wait {
        Some(Wait::Event { kind, filter }) => (
            Some("event".to_string()),
            Some(kind.clone()),
            filter.clone(),
        ),
        Some(w) => (Some(w.kind_str().to_string()), None, None),
        None => (None, None, None),
    };
    let job = o.job.map(|j| {
        let ttl = j
            .payload
            .get("cache_ttl_seconds")
            .cloned()
            .unwrap_or(Value::Null);
        json!({
            "kind": j.kind.as_str(),
            "node": j.node,
            "dedupe_key": j.dedupe_key,
            "provider": j.provider,
            "rate_host": j.rate_host,
            "payload": j.payload,
            "on_success": j.on_success,
            "on_error": j.on_error,
            "request_hash": j.request_hash,
            "cache_ttl_seconds": ttl,
        })
    });
    let contact_update = o.contact_update.map(|u| {
        json!({
            "set": Value::Object(u.set),
            "add_tags": u.add_tags,
            "remove_tags": u.remove_tags,
            "add_lists": u.add_lists,
            "remove_lists": u.remove_lists,
        })
    });
    let (mut log_nodes, mut log_visits, mut log_actions) = (vec![], vec![], vec![]);
    for l in o.log {
        log_nodes.push(l.node);
        log_visits.push(l.visit);
        log_actions.push(l.action);
    }
    let counts = o
        .counts
        .into_iter()
        .map(|c| (c.node.unwrap_or_default(), c.metric))
        .collect();
    StepRow {
        enrollment_id: o.enrollment_id,
        workspace_id,
        automation_id,
        contact_id,
        status: o.status.as_str().into(),
        node: o.node,
        next_run_at: o.next_run_at.map(|t| t.timestamp_micros() as f64 / 1e6),
        visit: o.visit,
        exit_reason: o.exit_reason,
        wait_kind,
        wait_event,
        wait_filter,
        job,
        contact_update,
        log_nodes,
        log_visits,
        log_actions,
        counts,
        version: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn automations() -> Value {
        json!({"7": {"name": "t", "start": "hello", "nodes": {
            "hello": {"type": "email", "template": "welcome", "next": "wait"},
            "wait": {"type": "delay", "duration": "1 hour", "next": "done"},
            "done": {"type": "exit"}}},
              "8": {"name": "broken"}})
    }

    fn enrollment(id: i64, automation: i64, node: &str) -> Value {
        json!({"id": id, "workspace_id": "w", "automation_id": automation, "contact_id": 100 + id,
               "status": "active", "node": node, "visit": 0,
               "context": {}, "event": null, "contact": {"email": "a@example.com"}, "timezone": "Europe/Paris"})
    }

    const NOW: f64 = 1_795_000_000.0;

    /// One batch with a fresh cache.
    fn run1(automations: &Value, enrollments: &str) -> Result<Vec<StepRow>, String> {
        run(
            &automations.to_string(),
            enrollments,
            NOW,
            50,
            &mut DefinitionCache::new(),
        )
    }

    fn batch(items: &[Value]) -> String {
        Value::Array(items.to_vec()).to_string()
    }

    #[test]
    fn an_email_node_parks_with_a_job() {
        let rows = run1(&automations(), &batch(&[enrollment(1, 7, "hello")])).unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(
            (r.status.as_str(), r.node.as_str(), r.wait_kind.as_deref()),
            ("waiting", "hello", Some("job"))
        );
        assert_eq!(r.next_run_at, None);
        let job = r.job.as_ref().unwrap();
        assert_eq!(job["kind"], "email");
        assert_eq!(job["dedupe_key"], "a7:e1:hello:1");
        assert_eq!(job["on_success"], "wait");
        assert_eq!(r.counts.len(), 2, "entered + queued: {:?}", r.counts);
        assert!(r.counts.iter().all(|(node, _)| node == "hello"));
        assert_eq!(r.log_nodes, vec!["hello"]);
        assert_eq!(r.log_visits, vec![1]);
    }

    /// A branch on the contact's plan and tags, to see which facts the engine was given.
    fn branching() -> Value {
        json!({"9:1": {"name": "b", "start": "b", "nodes": {
            "b": {"type": "branch", "paths": [
                {"when": {"all": [{"field": "contact.plan", "op": "eq", "value": "pro"},
                                  {"field": "contact.tags", "op": "contains", "value": "vip"},
                                  {"field": "contact.email", "op": "eq", "value": "a@example.com"}]},
                 "next": "yes"}],
             "default": "no"},
            "yes": {"type": "exit"}, "no": {"type": "exit"}}}})
    }

    #[test]
    fn a_contact_sent_in_parts_reads_like_the_facts_object() {
        let mut parts = enrollment(1, 9, "b");
        let fields = parts.as_object_mut().unwrap();
        fields.remove("contact");
        fields.insert(
            "attributes".into(),
            json!({"plan": "pro", "email": "ignored"}),
        );
        fields.insert("email".into(), json!("a@example.com"));
        fields.insert("tags".into(), json!(["vip"]));
        let mut whole = enrollment(2, 9, "b");
        whole["contact"] = json!({"plan": "pro", "email": "a@example.com", "tags": ["vip"],
                                  "timezone": "Europe/Paris"});
        let rows = run1(&branching(), &batch(&[parts, whole])).unwrap();
        assert_eq!(rows[0].log_actions, rows[1].log_actions);
        assert!(
            rows[0].log_actions[0].contains("yes"),
            "{:?}",
            rows[0].log_actions
        );
        // the attribute named email is shadowed by the contact's address, as in _contact_facts
        assert_eq!(
            contact_facts(
                serde_json::from_value(json!({"email": "x", "plan": "pro"})).unwrap(),
                Some("a@example.com".into()),
                None,
                None
            ),
            json!({"email": "a@example.com", "plan": "pro", "timezone": null, "tags": []})
        );
    }

    #[test]
    fn counts_are_summed_per_automation_node_and_metric() {
        let items = [
            enrollment(1, 7, "hello"),
            enrollment(2, 7, "hello"),
            enrollment(3, 8, "x"),
        ];
        let rows = run1(&automations(), &batch(&items)).unwrap();
        let totals = count_totals(&rows);
        let per_enrollment: usize = rows.iter().map(|r| r.counts.len()).sum();
        assert_eq!(
            totals.iter().map(|t| t.3).sum::<i64>(),
            per_enrollment as i64
        );
        assert!(totals.contains(&(8, String::new(), "failed".into(), 1)));
        assert!(totals
            .iter()
            .filter(|t| t.0 == 7)
            .all(|t| t.1 == "hello" && t.3 == 2));
    }

    #[test]
    fn runs_of_equal_counts_sum_like_one_entry_per_count() {
        let mut autos = automations();
        autos["7:2"] = autos["7"].clone();
        let mut on_v2 = enrollment(5, 7, "hello");
        on_v2["version"] = json!(2);
        // runs broken by another automation, another node, another version and a failed row
        let items = [
            enrollment(1, 7, "hello"),
            enrollment(2, 7, "hello"),
            enrollment(3, 8, "x"),
            enrollment(4, 7, "hello"),
            on_v2,
            enrollment(6, 7, "wait"),
            enrollment(7, 7, "hello"),
        ];
        let rows = run1(&autos, &batch(&items)).unwrap();
        let mut naive: BTreeMap<(i64, String, String), i64> = BTreeMap::new();
        for r in &rows {
            for (node, metric) in &r.counts {
                *naive
                    .entry((r.automation_id, node.clone(), metric.to_string()))
                    .or_default() += 1;
                if let (Some(v), "entered") = (entered_on_version(r.version), *metric) {
                    *naive.entry((r.automation_id, node.clone(), v)).or_default() += 1;
                }
            }
        }
        let naive: Vec<_> = naive
            .into_iter()
            .map(|((a, n, m), c)| (a, n, m, c))
            .collect();
        assert_eq!(count_totals(&rows), naive);
        assert!(naive.contains(&(7, "hello".into(), "entered".into(), 5)));
        assert!(naive.contains(&(7, "hello".into(), "entered@v2".into(), 1)));
    }

    #[test]
    fn entries_on_a_later_version_are_also_counted_per_version() {
        let mut autos = automations();
        autos["7:2"] = autos["7"].clone();
        let mut on_v2 = enrollment(2, 7, "hello");
        on_v2["version"] = json!(2);
        let rows = run1(&autos, &batch(&[enrollment(1, 7, "hello"), on_v2])).unwrap();
        let totals = count_totals(&rows);
        let figure = |metric: &str| {
            totals
                .iter()
                .find(|t| t.0 == 7 && t.1 == "hello" && t.2 == metric)
                .map(|t| t.3)
        };
        assert_eq!(figure("entered"), Some(2), "the total stays: {totals:?}");
        assert_eq!(figure("entered@v2"), Some(1), "{totals:?}");
        assert_eq!(
            figure("entered@v1"),
            None,
            "version 1 is the total minus the others"
        );
    }

    #[test]
    fn a_delay_schedules_the_next_node_in_epoch_seconds() {
        let rows = run1(&automations(), &batch(&[enrollment(2, 7, "wait")])).unwrap();
        assert_eq!(rows[0].status, "active");
        assert_eq!(rows[0].node, "done");
        assert_eq!(rows[0].next_run_at, Some(NOW + 3600.0));
    }

    #[test]
    fn a_broken_or_missing_automation_fails_only_its_enrollments() {
        let items = [
            enrollment(3, 8, "x"),
            enrollment(4, 9, "x"),
            enrollment(5, 7, "done"),
        ];
        let rows = run1(&automations(), &batch(&items)).unwrap();
        assert_eq!(rows[0].status, "failed");
        assert!(rows[0]
            .exit_reason
            .as_ref()
            .unwrap()
            .contains("no longer validates"));
        assert_eq!(rows[1].status, "failed");
        assert!(rows[1].exit_reason.as_ref().unwrap().contains("missing"));
        assert_eq!(rows[2].status, "completed");
    }

    #[test]
    fn malformed_batches_are_errors() {
        assert!(run1(&json!([]), "[]").is_err());
        assert!(run1(&json!(null), "[]").is_err());
        assert!(run1(&automations(), "{}").is_err());
        assert!(run1(&automations(), r#"[{"id": 1}]"#).is_err());
        assert!(run1(&json!({"x": {}}), "[]").is_err());
        // keys of the wrong type: SQL built them, so the batch is wrong, not one enrollment
        let mut bad = enrollment(1, 7, "hello");
        bad["visit"] = json!("zero");
        let err = run1(&automations(), &batch(&[bad])).unwrap_err();
        assert!(err.contains("keys cannot be read"), "{err}");
        assert_eq!(run1(&automations(), "null").unwrap(), vec![]);
    }

    /// `bad` (an enrollment's text) fails alone, with a reason containing `needle`, and the normal
    /// enrollment next to it advances exactly as it does alone.
    #[track_caller]
    fn fails_alone(bad: &str, needle: &str) {
        let normal = enrollment(2, 7, "hello").to_string();
        let alone = run1(&automations(), &format!("[{normal}]")).unwrap();
        let rows = run1(&automations(), &format!("[{bad}, {normal}]")).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1], alone[0]);
        let r = &rows[0];
        assert_eq!(
            (r.enrollment_id, r.workspace_id.as_str(), r.automation_id),
            (1, "w", 7)
        );
        assert_eq!((r.contact_id, r.node.as_str(), r.visit), (101, "hello", 0));
        assert_eq!(r.status, "failed");
        let reason = r.exit_reason.as_deref().unwrap();
        assert!(
            reason.starts_with("enrollment data cannot be read: ") && reason.contains(needle),
            "{reason}"
        );
        assert_eq!(r.log_actions, vec![format!("failed: {reason}")]);
        assert_eq!(r.log_nodes, vec!["hello"]);
        assert_eq!(r.counts, vec![(String::new(), "failed")]);
        assert!(r.job.is_none() && r.next_run_at.is_none());
    }

    /// Enrollment 1 with `field` set to `value` (JSON text, built as text: a deep `Value` would
    /// overflow the test's stack when serialized or dropped).
    fn with_field(field: &str, value: &str) -> String {
        let mut e = enrollment(1, 7, "hello");
        e[field] = json!("@@");
        e.to_string().replacen("\"@@\"", value, 1)
    }

    fn nested(levels: usize) -> String {
        format!(
            r#"{}{{"leaf": true}}{}"#,
            r#"{"a": "#.repeat(levels),
            "}".repeat(levels)
        )
    }

    #[test]
    fn an_enrollment_nested_too_deep_fails_alone() {
        fails_alone(
            &with_field("context", &nested(200)),
            "recursion limit exceeded",
        );
        let contact = format!(
            r#"{{"email": "a@example.com", "deep": {}}}"#,
            nested(100_000)
        );
        fails_alone(&with_field("contact", &contact), "recursion limit exceeded");
        // 127 inside the enrollment object and its batch array is beyond serde_json's 128
        fails_alone(
            &with_field("event", &nested(127)),
            "recursion limit exceeded at line 1",
        );
        // what ingest allows (32 levels) reads fine
        let rows = run1(
            &automations(),
            &format!("[{}]", with_field("event", &nested(32))),
        )
        .unwrap();
        assert_eq!(rows[0].status, "waiting");
    }

    #[test]
    fn an_enrollment_with_a_wrong_type_fails_alone() {
        fails_alone(
            &with_field("timezone", "42"),
            "invalid type: integer `42`, expected a string",
        );
        fails_alone(
            &with_field("status", r#"["active"]"#),
            "invalid type: sequence",
        );
    }

    #[test]
    fn an_enrollment_with_an_unknown_status_fails_alone() {
        fails_alone(
            &with_field("status", r#""sleeping""#),
            "unknown enrollment status \"sleeping\"",
        );
    }

    #[test]
    fn skipping_a_deep_value_never_hits_the_recursion_limit() {
        // the raw split and the keys-only read skip values with serde_json's iterative ignore_value
        let text = format!(
            r#"[{{"id": 1, "workspace_id": "w", "automation_id": 7, "contact_id": 2, "node": "n",
                 "visit": 0, "context": {}1{}}}]"#,
            "[".repeat(1_000_000),
            "]".repeat(1_000_000)
        );
        let raw: Vec<&RawValue> = serde_json::from_str(&text).unwrap();
        let keys: Keys = serde_json::from_str(raw[0].get()).unwrap();
        assert_eq!(
            (keys.id, keys.automation_id, keys.node.as_str()),
            (1, 7, "n")
        );
        let rows = run1(&automations(), &text).unwrap();
        assert_eq!(rows[0].status, "failed");
        // and where serde_json's limit lies: 127 nested levels read, 128 do not
        let depth = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(serde_json::from_str::<Value>(&depth(127)).is_ok());
        assert!(serde_json::from_str::<Value>(&depth(128)).is_err());
    }

    #[test]
    fn a_panic_in_the_engine_fails_only_that_enrollment() {
        let items = [enrollment(1, 7, "hello"), enrollment(2, 7, "hello")];
        let rows = run_with(
            &automations().to_string(),
            &batch(&items),
            NOW,
            50,
            &mut DefinitionCache::new(),
            |input: StepInput| {
                if input.enrollment_id == 1 {
                    panic!("index out of bounds");
                }
                step_engine::advance(input)
            },
        )
        .unwrap();
        assert_eq!(rows[0].status, "failed");
        assert_eq!(
            rows[0].exit_reason.as_deref(),
            Some(
                "the step engine failed on this enrollment (a bug in herald): index out of bounds"
            )
        );
        assert_eq!(rows[1].status, "waiting");
    }

    #[test]
    fn each_enrollment_runs_on_its_own_version() {
        // version 1 of automation 7 sends an email first; version 2 starts with the delay
        let defs = automations();
        let v1 = defs["7"].clone();
        let mut v2 = v1.clone();
        v2["nodes"]["hello"] = json!({"type": "delay", "duration": "2 hours", "next": "wait"});
        let defs = json!({"7:1": v1, "7:2": v2, "8": defs["8"]});
        let mut on_v2 = enrollment(2, 7, "hello");
        on_v2["version"] = json!(2);
        let mut on_v3 = enrollment(3, 7, "hello");
        on_v3["version"] = json!(3);
        let mut cache = DefinitionCache::new();
        for _ in 0..3 {
            let items = batch(&[enrollment(1, 7, "hello"), on_v2.clone(), on_v3.clone()]);
            let rows = run(&defs.to_string(), &items, NOW, 50, &mut cache).unwrap();
            assert_eq!(
                (rows[0].status.as_str(), rows[0].wait_kind.as_deref()),
                ("waiting", Some("job")),
                "no version: version 1"
            );
            assert_eq!(
                (rows[1].status.as_str(), rows[1].node.as_str()),
                ("active", "wait")
            );
            assert_eq!(rows[1].next_run_at, Some(NOW + 7200.0));
            assert_eq!(rows[2].status, "failed");
            assert_eq!(
                rows[2].exit_reason.as_deref(),
                Some("automation 7 version 3 is missing from the batch")
            );
        }
        assert_eq!(
            cache.validations(),
            2,
            "two versions of one automation in one batch: each validated once, no thrashing"
        );
    }

    #[test]
    fn definition_keys_name_automation_and_version() {
        assert_eq!(version_key("7"), Some((7, 1)));
        assert_eq!(version_key("7:3"), Some((7, 3)));
        assert_eq!(version_key("7:x"), None);
        assert_eq!(version_key(":3"), None);
        assert!(run1(&json!({"7:": {}}), "[]").is_err());
    }

    #[test]
    fn an_automation_is_validated_once_across_ticks() {
        let mut cache = DefinitionCache::new();
        let text = automations().to_string();
        let items = batch(&[enrollment(1, 7, "hello"), enrollment(2, 8, "x")]);
        for _ in 0..3 {
            let rows = run(&text, &items, NOW, 50, &mut cache).unwrap();
            assert_eq!(
                (rows[0].status.as_str(), rows[1].status.as_str()),
                ("waiting", "failed")
            );
        }
        assert_eq!(cache.validations(), 2, "7 and 8 once each");
        // a changed definition is validated again
        let mut changed = automations();
        changed["7"]["name"] = json!("renamed");
        run(&changed.to_string(), &items, NOW, 50, &mut cache).unwrap();
        assert_eq!(cache.validations(), 3);
    }

    #[test]
    fn a_deep_definition_fails_its_enrollments_not_the_batch() {
        // deeper than serde_json reads: stored before the definition limits, or edited by hand
        let mut body = json!(1);
        for _ in 0..300 {
            body = json!([body]);
        }
        let text = format!(
            r#"{{"7": {}, "9": {{"name": "deep", "start": "e", "nodes": {{"e": {{"type": "webhook", "url": "https://x.example", "body": {}}}}}}}}}"#,
            automations()["7"],
            body
        );
        let items = batch(&[enrollment(1, 9, "e"), enrollment(2, 7, "hello")]);
        let rows = run(&text, &items, NOW, 50, &mut DefinitionCache::new()).unwrap();
        let reason = rows[0].exit_reason.as_deref().unwrap();
        assert!(
            reason.contains("automation 9 no longer validates: $: the definition nests 303 levels deep; at most 100 are allowed"),
            "{reason}"
        );
        assert_eq!(rows[1].status, "waiting");
    }
}

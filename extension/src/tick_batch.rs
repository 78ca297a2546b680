//! The bridge between `herald.tick()`'s batch (two JSON documents built by SQL) and the step engine:
//! parse each automation once, build the engine's inputs, and flatten its outcomes into the rows SQL
//! writes back. No Postgres here, so it is tested with plain `cargo test`.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::definition::{self, Automation};
use crate::fault;
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
}

/// The batch's stats deltas summed per (automation, node, metric), so SQL inserts a handful of rows
/// instead of grouping one row per count (7 per enrollment in a 3-node flow).
pub fn count_totals(rows: &[StepRow]) -> Vec<(i64, String, String, i64)> {
    let mut totals: BTreeMap<(i64, &str, &str), i64> = BTreeMap::new();
    for r in rows {
        for (node, metric) in &r.counts {
            *totals
                .entry((r.automation_id, node.as_str(), metric))
                .or_default() += 1;
        }
    }
    totals
        .into_iter()
        .map(|((a, node, metric), n)| (a, node.to_string(), metric.to_string(), n))
        .collect()
}

/// Runs one batch. `automations`: `{"<id>": definition}`; `enrollments`: array of
/// `{id, workspace_id, automation_id, contact_id, status, node, visit, context, event, contact, timezone}`.
/// A malformed batch is an error (SQL builds it, so that is a bug); an automation whose stored
/// definition no longer validates fails its enrollments with the reason instead of stopping the tick.
pub fn run(
    automations: &Value,
    enrollments: &str,
    now_epoch: f64,
    max_transitions: i32,
) -> Result<Vec<StepRow>, String> {
    let now = DateTime::<Utc>::from_timestamp_micros((now_epoch * 1e6).round() as i64)
        .ok_or_else(|| format!("now {now_epoch} is out of range"))?;
    let defs = automations
        .as_object()
        .ok_or("automations must be an object")?;
    let parsed: HashMap<i64, Result<Automation, String>> = defs
        .iter()
        .map(|(id, def)| {
            let id: i64 = id
                .parse()
                .map_err(|_| format!("automation id {id:?} is not a number"))?;
            Ok((
                id,
                definition::validate(def).map_err(|f| fault::describe(&f)),
            ))
        })
        .collect::<Result<_, String>>()?;
    // typed straight from the text: no intermediate JSON object per enrollment
    let items: Option<Vec<RawEnrollment>> =
        serde_json::from_str(enrollments).map_err(|e| format!("enrollments: {e}"))?;
    let items = items.unwrap_or_default();

    let mut rows = Vec::with_capacity(items.len());
    for item in items {
        let e = Enrollment::from_raw(item)?;
        let row = match parsed.get(&e.automation_id) {
            Some(Ok(automation)) => {
                let keys = (e.workspace_id.clone(), e.automation_id, e.contact_id);
                let input = StepInput {
                    enrollment_id: e.id,
                    automation_id: e.automation_id,
                    automation,
                    status: e.status,
                    node: e.node,
                    visit: e.visit,
                    context: e.context,
                    contact: e.contact,
                    event: e.event,
                    timezone: e.timezone.and_then(|tz| tz.parse().ok()),
                    now,
                    max_transitions: max_transitions.max(1) as u32,
                };
                to_row(step_engine::advance(input), keys)
            }
            Some(Err(reason)) => failed(
                &e,
                format!(
                    "automation {} no longer validates: {reason}",
                    e.automation_id
                ),
            ),
            None => failed(
                &e,
                format!("automation {} is missing from the batch", e.automation_id),
            ),
        };
        rows.push(row);
    }
    Ok(rows)
}

struct Enrollment {
    id: i64,
    workspace_id: String,
    automation_id: i64,
    contact_id: i64,
    status: Status,
    node: String,
    visit: i32,
    context: Value,
    contact: Value,
    event: Option<Value>,
    timezone: Option<String>,
}

/// One element of the batch as SQL builds it.
#[derive(Deserialize)]
struct RawEnrollment {
    id: i64,
    workspace_id: String,
    automation_id: i64,
    contact_id: i64,
    status: String,
    node: String,
    visit: i32,
    #[serde(default)]
    context: Value,
    #[serde(default)]
    contact: Value,
    #[serde(default)]
    event: Value,
    #[serde(default)]
    timezone: Option<String>,
}

impl Enrollment {
    fn from_raw(r: RawEnrollment) -> Result<Self, String> {
        Ok(Self {
            status: Status::parse(&r.status)
                .ok_or_else(|| format!("unknown enrollment status {:?}", r.status))?,
            id: r.id,
            workspace_id: r.workspace_id,
            automation_id: r.automation_id,
            contact_id: r.contact_id,
            node: r.node,
            visit: r.visit,
            context: if r.context.is_object() {
                r.context
            } else {
                json!({})
            },
            contact: if r.contact.is_null() {
                json!({})
            } else {
                r.contact
            },
            event: Some(r.event).filter(|e| !e.is_null()),
            timezone: r.timezone,
        })
    }
}

fn failed(e: &Enrollment, reason: String) -> StepRow {
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
    }
}

/// `keys`: the enrollment's (workspace, automation, contact), passed through to SQL.
fn to_row(o: Outcome, keys: (String, i64, i64)) -> StepRow {
    let (workspace_id, automation_id, contact_id) = keys;
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

    #[test]
    fn an_email_node_parks_with_a_job() {
        let rows = run(
            &automations(),
            &json!([enrollment(1, 7, "hello")]).to_string(),
            NOW,
            50,
        )
        .unwrap();
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

    #[test]
    fn counts_are_summed_per_automation_node_and_metric() {
        let batch = json!([
            enrollment(1, 7, "hello"),
            enrollment(2, 7, "hello"),
            enrollment(3, 8, "x")
        ]);
        let rows = run(&automations(), &batch.to_string(), NOW, 50).unwrap();
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
    fn a_delay_schedules_the_next_node_in_epoch_seconds() {
        let rows = run(
            &automations(),
            &json!([enrollment(2, 7, "wait")]).to_string(),
            NOW,
            50,
        )
        .unwrap();
        assert_eq!(rows[0].status, "active");
        assert_eq!(rows[0].node, "done");
        assert_eq!(rows[0].next_run_at, Some(NOW + 3600.0));
    }

    #[test]
    fn a_broken_or_missing_automation_fails_only_its_enrollments() {
        let batch = json!([
            enrollment(3, 8, "x"),
            enrollment(4, 9, "x"),
            enrollment(5, 7, "done")
        ]);
        let rows = run(&automations(), &batch.to_string(), NOW, 50).unwrap();
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
        assert!(run(&json!([]), "[]", NOW, 50).is_err());
        assert!(run(&automations(), "{}", NOW, 50).is_err());
        assert!(run(&automations(), r#"[{"id": 1}]"#, NOW, 50).is_err());
        assert!(run(&json!({"x": {}}), "[]", NOW, 50).is_err());
        let mut bad = enrollment(1, 7, "hello");
        bad["status"] = json!("sleeping");
        assert!(run(&automations(), &json!([bad]).to_string(), NOW, 50).is_err());
        assert_eq!(run(&automations(), "null", NOW, 50).unwrap(), vec![]);
    }
}

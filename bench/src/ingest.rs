//! The herald side of the ingest benchmark: the workspace and its contacts, live automations
//! created in bulk, and events sent through `herald.track_many`.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use tokio_postgres::Client;

use super::Rate;
use herald_sidecar::db::Target;

pub const WORKSPACE: &str = "bench";
/// The event kind the matching automations trigger on.
pub const HIT: &str = "bench.hit";
/// Contacts per `upsert_contacts` call when pre-creating contacts.
const CONTACTS_PER_CALL: usize = 10_000;

pub fn email(i: usize) -> String {
    format!("c{i}@bench.example")
}

/// A live-able automation triggered by `kind` whose filter matches every event with plan "pro".
pub fn definition(name: &str, kind: &str) -> Value {
    json!({
        "name": name,
        "trigger": {"event": kind, "filter": {"field": "event.plan", "op": "eq", "value": "pro"}},
        "reentry": "always",
        "start": "x",
        "nodes": {"x": {"type": "exit"}}
    })
}

/// Creates the workspace and `contacts` contacts (`email(0)` …), one jsonb parameter per call.
pub async fn create_contacts(db: &Client, workspace: &str, contacts: usize) -> Result<()> {
    db.execute("SELECT herald.create_workspace($1)", &[&workspace])
        .await?;
    for start in (0..contacts).step_by(CONTACTS_PER_CALL) {
        let chunk: Vec<Value> = (start..contacts.min(start + CONTACTS_PER_CALL))
            .map(|i| json!({"email": email(i), "attributes": {"plan": "pro"}, "timezone": "Europe/Paris"}))
            .collect();
        let row = db
            .query_one(
                "SELECT inserted FROM herald.upsert_contacts($1, $2)",
                &[&workspace, &Value::from(chunk.clone())],
            )
            .await
            .context("pre-creating contacts")?;
        ensure!(
            row.get::<_, i64>(0) == chunk.len() as i64,
            "upsert_contacts did not insert every contact"
        );
    }
    Ok(())
}

/// Creates and sets live automations `first..first + count` in one statement. `{}` in `name` and
/// `kind` is replaced by the automation's number, so `other.{}` gives each one a kind of its own.
pub async fn add_live_automations(
    db: &Client,
    name: &str,
    kind: &str,
    first: usize,
    count: usize,
) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let template = definition(name, kind);
    let (first, last) = (first as i32, (first + count - 1) as i32);
    let n = db
        .execute(
            "SELECT herald.set_automation_status(herald.create_automation($1::text,
                    jsonb_set(jsonb_set($2::jsonb, '{name}', to_jsonb(replace($3::text, '{}', i::text))),
                              '{trigger,event}', to_jsonb(replace($4::text, '{}', i::text)))), 'live')
               FROM generate_series($5::int, $6::int) AS i",
            &[&WORKSPACE, &template, &name, &kind, &first, &last],
        )
        .await
        .with_context(|| format!("creating {count} live automations on {kind}"))?;
    ensure!(
        n == count as u64,
        "created {n} automations, expected {count}"
    );
    Ok(())
}

/// Moves every live automation of the workspace whose trigger kind is LIKE `kind_like` to `status`,
/// in one statement; returns how many moved.
pub async fn set_status_where_kind(db: &Client, kind_like: &str, status: &str) -> Result<u64> {
    db.execute(
        "SELECT herald.set_automation_status(a.id, $3) FROM herald.automations a
          WHERE a.workspace_id = $1 AND a.trigger_event LIKE $2 AND a.status = 'live'",
        &[&WORKSPACE, &kind_like, &status],
    )
    .await
    .with_context(|| format!("setting automations on {kind_like} {status}"))
}

/// `size` events of kind `HIT` with payload {"plan": "pro"}, for contacts `first`, `first + 1`, …
/// (modulo `contacts`).
pub fn events(first: usize, size: usize, contacts: usize) -> Value {
    (first..first + size)
        .map(|i| json!({"email": email(i % contacts), "kind": HIT, "payload": {"plan": "pro"}}))
        .collect::<Vec<_>>()
        .into()
}

pub async fn track_many(db: &Client, events: &Value) -> Result<()> {
    let n: i64 = db
        .query_one("SELECT herald.track_many($1, $2)", &[&WORKSPACE, events])
        .await
        .context("herald.track_many")?
        .get(0);
    ensure!(
        Some(n as usize) == events.as_array().map(Vec::len),
        "track_many recorded {n} events"
    );
    Ok(())
}

pub async fn enrollments(db: &Client) -> Result<i64> {
    Ok(db
        .query_one(
            "SELECT count(*) FROM herald.enrollments WHERE workspace_id = $1",
            &[&WORKSPACE],
        )
        .await?
        .get(0))
}

/// Sends the batches through `track_many` on a fresh connection, one call per batch.
pub async fn measure(target: &Target, batches: &[Value]) -> Result<Rate> {
    let db = target.connect().await?;
    let before = enrollments(&db).await?;
    let started = Instant::now();
    for batch in batches {
        track_many(&db, batch).await?;
    }
    let elapsed = started.elapsed();
    let events = batches
        .iter()
        .filter_map(Value::as_array)
        .map(Vec::len)
        .sum();
    Ok(Rate::new(events, elapsed, enrollments(&db).await? - before))
}

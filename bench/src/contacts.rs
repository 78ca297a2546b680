//! Contact import: `herald.upsert_contacts` in calls of CALL contacts into a fresh workspace, against
//! the same rows as a plain multi-row INSERT into a table with a unique index on email, and as a plain
//! `INSERT … SELECT` into `herald.contacts` itself (another fresh workspace: the same table, every index
//! of it, no validation, no merge, no events) — the floor upsert_contacts cannot go under. The three
//! take turns call by call.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::baseline;
use herald_sidecar::db::Target;

pub const CALL: usize = 10_000;
const WORKSPACE: &str = "bench_contacts";
const PLAIN_WORKSPACE: &str = "bench_contacts_plain";
const PLANS: [&str; 3] = ["free", "pro", "team"];
const ZONES: [&str; 4] = ["Europe/Paris", "America/New_York", "Asia/Tokyo", "UTC"];

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Import {
    pub contacts: usize,
    pub per_call: usize,
    pub herald_secs: f64,
    pub herald_contacts_per_sec: f64,
    pub baseline_secs: f64,
    pub baseline_contacts_per_sec: f64,
    /// Plain `INSERT … SELECT` into herald.contacts, same rows, same calls.
    pub contacts_table_secs: f64,
    pub contacts_table_contacts_per_sec: f64,
    /// upsert_contacts' rate over the plain insert's into the same table (issue 14: goal >= 0.5).
    pub herald_over_contacts_table: f64,
}

#[derive(Clone, Copy)]
enum Kind {
    Herald,
    Baseline,
    Table,
}

/// One upsert_contacts call into the fresh workspace; every entry must be a new contact.
async fn upsert(db: &tokio_postgres::Client, call: &Value) -> Result<()> {
    let row = db
        .query_one(
            "SELECT inserted, rejected FROM herald.upsert_contacts($1, $2)",
            &[&WORKSPACE, call],
        )
        .await
        .context("herald.upsert_contacts")?;
    let (inserted, rejected): (i64, i64) = (row.get(0), row.get(1));
    ensure!(
        rejected == 0 && Some(inserted as usize) == call.as_array().map(Vec::len),
        "upsert_contacts inserted {inserted}, rejected {rejected}"
    );
    Ok(())
}

/// The same rows as a plain `INSERT … SELECT` into herald.contacts (another fresh workspace).
async fn plain_insert(db: &tokio_postgres::Client, call: &Value) -> Result<()> {
    db.execute(
        "INSERT INTO herald.contacts (workspace_id, email, attributes, timezone)
         SELECT $1, r.email, r.attributes, r.timezone
           FROM jsonb_to_recordset($2) AS r(email text, attributes jsonb, timezone text)",
        &[&PLAIN_WORKSPACE, call],
    )
    .await
    .context("plain INSERT into herald.contacts")?;
    Ok(())
}

pub async fn run(target: &Target, contacts: usize) -> Result<Import> {
    let calls: Vec<Value> = (0..contacts)
        .step_by(CALL)
        .map(|start| {
            (start..contacts.min(start + CALL))
                .map(|i| {
                    json!({
                        "email": format!("u{i}@contacts.example"),
                        "attributes": {"first_name": format!("User {i}"), "plan": PLANS[i % PLANS.len()]},
                        "timezone": ZONES[i % ZONES.len()],
                    })
                })
                .collect::<Vec<_>>()
                .into()
        })
        .collect();
    let db = target.connect().await?;
    for ws in [WORKSPACE, PLAIN_WORKSPACE] {
        db.execute("SELECT herald.create_workspace($1)", &[&ws])
            .await?;
    }

    // The three in turns, call by call (the order alternating), so that a change of load on the machine
    // or a GIN pending-list flush (the first two write the same table) falls on all of them alike.
    let (mut herald, mut base, mut table) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for (k, call) in calls.iter().enumerate() {
        let mut order = [Kind::Herald, Kind::Baseline, Kind::Table];
        if k % 2 == 1 {
            order.reverse();
        }
        for kind in order {
            let started = Instant::now();
            match kind {
                Kind::Herald => upsert(&db, call).await?,
                Kind::Baseline => baseline::insert_contacts(&db, call).await.map(drop)?,
                Kind::Table => plain_insert(&db, call).await?,
            }
            let took = started.elapsed();
            match kind {
                Kind::Herald => herald += took,
                Kind::Baseline => base += took,
                Kind::Table => table += took,
            }
        }
    }

    let rate = |d: Duration| contacts as f64 / d.as_secs_f64();
    Ok(Import {
        contacts,
        per_call: CALL.min(contacts),
        herald_secs: herald.as_secs_f64(),
        herald_contacts_per_sec: rate(herald),
        baseline_secs: base.as_secs_f64(),
        baseline_contacts_per_sec: rate(base),
        contacts_table_secs: table.as_secs_f64(),
        contacts_table_contacts_per_sec: rate(table),
        herald_over_contacts_table: table.as_secs_f64() / herald.as_secs_f64(),
    })
}

//! Contact import: `herald.upsert_contacts` in calls of CALL contacts into a fresh workspace, against
//! the same rows as a plain multi-row INSERT into a table with a unique index on email, and as a plain
//! `INSERT … SELECT` into `herald.contacts` itself (another fresh workspace: the same table, every index
//! of it, no validation, no merge, no events) — the floor upsert_contacts cannot go under. The three
//! take turns call by call. That runs in the bench database after its ANALYZE; herald and the plain
//! insert into herald.contacts then run again, in turns, in a database of their own whose tables were
//! never analysed (a fresh install, or the first import before autovacuum gets to it).

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
    /// The same import (herald and the plain insert into herald.contacts, in turns) in a fresh database
    /// whose tables were never analysed.
    pub never_analysed: NeverAnalysed,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct NeverAnalysed {
    pub herald_contacts_per_sec: f64,
    pub contacts_table_contacts_per_sec: f64,
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

/// Runs every call through each of `kinds` in turns (the order alternating call by call, so that a change
/// of load on the machine or a GIN pending-list flush falls on all of them alike); each kind's total time.
async fn in_turns(
    db: &tokio_postgres::Client,
    calls: &[Value],
    kinds: &[Kind],
) -> Result<Vec<Duration>> {
    let mut took = vec![Duration::ZERO; kinds.len()];
    for (k, call) in calls.iter().enumerate() {
        let mut order: Vec<usize> = (0..kinds.len()).collect();
        if k % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let started = Instant::now();
            match kinds[i] {
                Kind::Herald => upsert(db, call).await?,
                Kind::Baseline => baseline::insert_contacts(db, call).await.map(drop)?,
                Kind::Table => plain_insert(db, call).await?,
            }
            took[i] += started.elapsed();
        }
    }
    Ok(took)
}

/// The import in a fresh database of its own (`<bench database>_import`), never analysed: autovacuum
/// is off on contacts and events there for the run, so that its ANALYZE cannot land halfway.
async fn never_analysed(
    target: &Target,
    calls: &[Value],
    contacts: usize,
) -> Result<NeverAnalysed> {
    let fresh = target.with_dbname(&format!("{}_import", target.dbname()));
    let db = fresh.recreate_with_extension().await?;
    db.batch_execute(
        "ALTER TABLE herald.contacts SET (autovacuum_enabled = off);
         ALTER TABLE herald.events SET (autovacuum_enabled = off)",
    )
    .await?;
    for ws in [WORKSPACE, PLAIN_WORKSPACE] {
        db.execute("SELECT herald.create_workspace($1)", &[&ws])
            .await?;
    }
    let took = in_turns(&db, calls, &[Kind::Herald, Kind::Table]).await?;
    let analysed: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_user_tables
              WHERE schemaname = 'herald' AND relname IN ('contacts', 'events')
                AND (last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL)",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        analysed == 0,
        "the never-analysed import database was analysed"
    );
    let rate = |d: Duration| contacts as f64 / d.as_secs_f64();
    Ok(NeverAnalysed {
        herald_contacts_per_sec: rate(took[0]),
        contacts_table_contacts_per_sec: rate(took[1]),
        herald_over_contacts_table: took[1].as_secs_f64() / took[0].as_secs_f64(),
    })
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

    // The three in turns, call by call (herald and the plain insert write the same table).
    let took = in_turns(&db, &calls, &[Kind::Herald, Kind::Baseline, Kind::Table]).await?;
    let (herald, base, table) = (took[0], took[1], took[2]);
    let never_analysed = never_analysed(target, &calls, contacts).await?;

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
        never_analysed,
    })
}

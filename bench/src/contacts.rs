//! Contact import: `herald.upsert_contacts` in calls of CALL contacts into a fresh workspace, against
//! the same rows as a plain multi-row INSERT into a table with a unique index on email.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::baseline;
use herald_sidecar::db::Target;

pub const CALL: usize = 10_000;
const WORKSPACE: &str = "bench_contacts";
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
    db.execute("SELECT herald.create_workspace($1)", &[&WORKSPACE])
        .await?;

    let started = Instant::now();
    for call in &calls {
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
    }
    let herald = started.elapsed();

    let started = Instant::now();
    for call in &calls {
        baseline::insert_contacts(&db, call).await?;
    }
    let base = started.elapsed();

    let rate = |d: Duration| contacts as f64 / d.as_secs_f64();
    Ok(Import {
        contacts,
        per_call: CALL.min(contacts),
        herald_secs: herald.as_secs_f64(),
        herald_contacts_per_sec: rate(herald),
        baseline_secs: base.as_secs_f64(),
        baseline_contacts_per_sec: rate(base),
    })
}

//! The queue when jobs wake enrollments, on tables autovacuum has not analysed yet: the state right
//! after a burst of enrollments or a fresh install. A journey `webhook → exit` for N contacts (enroll +
//! tick queue one job per enrollment, each enrollment waiting on its job), drained with `claim(100)` +
//! `complete(100)` from one connection, first with no statistics at all (autovacuum off for the run),
//! then again after `ANALYZE`. complete() wakes the waiting enrollments in the same statement; planned
//! from statistics, that wake-up scanned every waiting enrollment once per job (~170 jobs/s).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::Client;
use tracing::info;

use super::meter::{Meter, ServerCost};
use crate::stats::Summary;
use herald_sidecar::db::Target;

const DATABASE: &str = "herald_bench_wake";
const WORKSPACE: &str = "bench_wake";
const BATCH: i32 = 100;

#[derive(Debug, Serialize)]
pub struct WakeRun {
    pub statistics: &'static str,
    pub jobs: usize,
    pub jobs_per_sec: f64,
    pub complete_ms: Summary,
    /// The backend's CPU and WAL per job: what the plans cost, whatever else loads the machine.
    pub server: ServerCost,
}

#[derive(Debug, Serialize)]
pub struct QueueWake {
    pub fresh: WakeRun,
    pub analysed: WakeRun,
    /// fresh / analysed throughput: 1.0 means the plan does not depend on statistics.
    pub fresh_over_analysed: f64,
}

pub async fn run(target: &Target, small: bool) -> Result<QueueWake> {
    let jobs = if small { 5_000 } else { 50_000 };
    let wake = target.with_dbname(DATABASE);
    let db = wake.recreate_with_extension().await?;
    setup(&db, jobs).await?;
    info!("queue wake-up: {jobs} jobs waking enrollments, tables never analysed");
    let fresh = drain(&db, "none (never analysed)", jobs).await?;

    // the same again with statistics: the journey ended, so after_exit lets every contact in again
    db.batch_execute("ANALYZE").await?;
    queue_jobs(&db).await?;
    db.batch_execute("ANALYZE").await?;
    info!("queue wake-up: the same after ANALYZE");
    let analysed = drain(&db, "after ANALYZE", jobs).await?;
    drop(db);
    let admin = target.with_dbname("postgres").connect().await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
        .await?;
    Ok(QueueWake {
        fresh_over_analysed: fresh.jobs_per_sec / analysed.jobs_per_sec,
        fresh,
        analysed,
    })
}

async fn setup(db: &Client, contacts: usize) -> Result<()> {
    // autovacuum must not analyse the tables behind the benchmark's back
    for table in [
        "contacts",
        "events",
        "enrollments",
        "outbox",
        "message_history",
        "step_log",
    ] {
        db.batch_execute(&format!(
            "ALTER TABLE herald.{table} SET (autovacuum_enabled = false)"
        ))
        .await?;
    }
    db.execute("SELECT herald.create_workspace($1)", &[&WORKSPACE])
        .await?;
    db.execute(
        "SELECT * FROM herald.upsert_contacts($1, (SELECT jsonb_agg(jsonb_build_object('email', 'w' || g || '@example.com'))
                                                  FROM generate_series(1, $2::int) g))",
        &[&WORKSPACE, &(contacts as i32)],
    )
    .await?;
    let definition = json!({
        "name": "wake", "trigger": {"event": "go"}, "reentry": "after_exit", "start": "hook",
        "nodes": {"hook": {"type": "webhook", "url": "http://127.0.0.1:9/hook", "next": "done"},
                  "done": {"type": "exit"}}});
    db.execute(
        "SELECT herald.set_automation_status(herald.create_automation($1, $2), 'live')",
        &[&WORKSPACE, &definition],
    )
    .await?;
    queue_jobs(db).await
}

/// Finishes the previous round (woken enrollments still have their exit step to take), enrols every
/// contact and ticks until each enrollment waits on its webhook job.
async fn queue_jobs(db: &Client) -> Result<()> {
    tick_until_idle(db).await?;
    db.execute(
        "SELECT * FROM herald.enroll((SELECT id FROM herald.automations WHERE workspace_id = $1),
                                     (SELECT array_agg(id) FROM herald.contacts WHERE workspace_id = $1))",
        &[&WORKSPACE],
    )
    .await?;
    tick_until_idle(db).await
}

async fn tick_until_idle(db: &Client) -> Result<()> {
    while db
        .query_one("SELECT herald.tick(10000)", &[])
        .await?
        .get::<_, i32>(0)
        > 0
    {}
    Ok(())
}

async fn drain(db: &Client, statistics: &'static str, expected: usize) -> Result<WakeRun> {
    let claim = db
        .prepare("SELECT id FROM herald.claim('bench-wake', $1::int, '5 minutes')")
        .await?;
    let complete = db.prepare("SELECT herald.complete($1::jsonb)").await?;
    let mut samples: Vec<Duration> = Vec::new();
    let mut jobs = 0;
    let meter = Meter::start(db).await;
    let started = Instant::now();
    loop {
        let rows = db.query(&claim, &[&BATCH]).await?;
        if rows.is_empty() {
            break;
        }
        let results: Vec<Value> = rows
            .iter()
            .map(|r| json!({"id": r.get::<_, i64>(0), "ok": true, "response": {"ok": true}}))
            .collect();
        jobs += results.len();
        let t = Instant::now();
        db.query_one(&complete, &[&Value::Array(results)])
            .await
            .context("complete")?;
        samples.push(t.elapsed());
    }
    let secs = started.elapsed().as_secs_f64();
    let server = meter.stop(db, jobs).await;
    let woken: i64 = db
        .query_one(
            "SELECT count(*) FROM herald.enrollments WHERE workspace_id = $1 AND status = 'waiting'",
            &[&WORKSPACE],
        )
        .await?
        .get(0);
    ensure!(
        jobs == expected && woken == 0,
        "queue wake-up: drained {jobs} of {expected} jobs, {woken} enrollments still waiting"
    );
    Ok(WakeRun {
        statistics,
        jobs,
        jobs_per_sec: jobs as f64 / secs,
        complete_ms: Summary::of(&samples),
        server,
    })
}

pub(super) fn render(o: &mut String, w: &QueueWake) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "  jobs that wake enrollments (webhook → exit, claim({BATCH}) + complete({BATCH})), by table statistics:"
    );
    for r in [&w.fresh, &w.analysed] {
        let _ = writeln!(
            o,
            "    {:<24} {:>8.0} jobs/s   complete p50 {:.2} ms p99 {:.2} ms max {:.1} ms ({} jobs){}",
            r.statistics,
            r.jobs_per_sec,
            r.complete_ms.p50_ms,
            r.complete_ms.p99_ms,
            r.complete_ms.max_ms,
            r.jobs,
            r.server
                .cpu_us_per_job
                .map_or(String::new(), |c| format!("; backend CPU {c:.1} µs/job"))
        );
    }
    let _ = writeln!(
        o,
        "    never analysed / analysed: {:.2}x (1.0 = the plans do not depend on statistics)",
        w.fresh_over_analysed
    );
    if let (Some(f), Some(a)) = (
        w.fresh.server.cpu_us_per_job,
        w.analysed.server.cpu_us_per_job,
    ) {
        // the same question asked of the server's own CPU time, which the machine's load moves far less
        let _ = writeln!(
            o,
            "    by backend CPU per job: never analysed / analysed {:.2}x",
            a / f
        );
    }
}

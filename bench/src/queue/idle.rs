//! What one `claim(100)` costs when most workspaces are idle: 10 workspaces with pending jobs alone,
//! then with 990 more that have nothing pending (half hold done jobs, half nothing). Each call runs in
//! BEGIN; claim; ROLLBACK so the pending set stays the same; only the claim is timed.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use tokio_postgres::Client;

use super::{BATCH, CLAIM};
use crate::stats::Summary;
use crate::thousands;
use herald_sidecar::db::Target;

const WORKSPACES: i32 = 1_000;
/// Every STRIDE-th workspace has pending jobs: 10 busy ones spread among the idle.
const STRIDE: i32 = 100;
const PENDING_PER_BUSY: i32 = 1_000;
/// Done jobs in each idle workspace that has any (every other one).
const DONE_PER_IDLE: i32 = 100;

#[derive(Debug, Serialize)]
pub struct IdleWorkspaces {
    pub busy_workspaces: i32,
    pub pending_per_busy: i32,
    pub done_per_idle: i32,
    /// Idle workspaces holding done jobs / holding nothing.
    pub idle_with_done: i32,
    pub idle_empty: i32,
    pub calls: usize,
    pub cases: Vec<ClaimCost>,
}

#[derive(Debug, Serialize)]
pub struct ClaimCost {
    pub case: String,
    pub workspaces: i32,
    pub claim_ms: Summary,
    pub mean_ms: f64,
    pub mean_over_first: f64,
}

pub async fn run(target: &Target, small: bool) -> Result<IdleWorkspaces> {
    let calls = if small { 100 } else { 200 };
    let mut db = target.connect().await?;
    let name = "format('bench_idle_%s', lpad(w::text, 4, '0'))";
    // the queue run leaves 100,000 done jobs whose pending-index entries are dead until VACUUM
    db.batch_execute("VACUUM herald.outbox").await?;
    db.batch_execute(&format!(
        "SELECT count(herald.create_workspace({name})) FROM generate_series(0, {last}, {STRIDE}) w;
         INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, payload)
         SELECT {name}, 'webhook', 'pending:' || j, '{{}}'
           FROM generate_series(0, {last}, {STRIDE}) w, generate_series(1, {PENDING_PER_BUSY}) j;",
        last = WORKSPACES - 1
    ))
    .await
    .context("busy workspaces")?;
    db.batch_execute("VACUUM (ANALYZE) herald.outbox").await?;
    let mut cases = vec![
        measure(
            &mut db,
            calls,
            "10 workspaces, all with pending jobs",
            WORKSPACES / STRIDE,
        )
        .await?,
    ];

    // 990 idle workspaces; every other one gets jobs that are queued and then done (an UPDATE, as
    // complete() makes), so the pending index keeps their dead entries until VACUUM
    db.batch_execute(&format!(
        "SELECT count(herald.create_workspace({name})) FROM generate_series(0, {last}) w WHERE w % {STRIDE} <> 0;
         INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, payload)
         SELECT {name}, 'webhook', 'done:' || j, '{{}}'
           FROM generate_series(1, {last}, 2) w, generate_series(1, {DONE_PER_IDLE}) j;
         UPDATE herald.outbox SET status = 'done', done_at = now(), updated_at = now()
          WHERE status = 'pending' AND dedupe_key LIKE 'done:%';",
        last = WORKSPACES - 1
    ))
    .await
    .context("idle workspaces")?;
    db.batch_execute("ANALYZE herald.outbox").await?;
    cases.push(
        measure(
            &mut db,
            calls,
            "1,000: 990 idle, done jobs not yet vacuumed",
            WORKSPACES,
        )
        .await?,
    );
    db.batch_execute("VACUUM (ANALYZE) herald.outbox").await?;
    cases.push(measure(&mut db, calls, "1,000: 990 idle, after VACUUM", WORKSPACES).await?);

    let first = cases[0].mean_ms;
    for c in &mut cases {
        c.mean_over_first = c.mean_ms / first;
    }
    Ok(IdleWorkspaces {
        busy_workspaces: WORKSPACES / STRIDE,
        pending_per_busy: PENDING_PER_BUSY,
        done_per_idle: DONE_PER_IDLE,
        idle_with_done: WORKSPACES / 2,
        idle_empty: WORKSPACES / 2 - WORKSPACES / STRIDE,
        calls,
        cases,
    })
}

async fn measure(db: &mut Client, calls: usize, case: &str, workspaces: i32) -> Result<ClaimCost> {
    let claim = db.prepare(CLAIM).await?;
    let mut samples: Vec<Duration> = Vec::with_capacity(calls);
    for _ in 0..calls {
        let tx = db.transaction().await?;
        let t = Instant::now();
        let rows = tx
            .query(&claim, &[&"bench", &BATCH])
            .await
            .context("herald.claim")?;
        samples.push(t.elapsed());
        ensure!(
            rows.len() == BATCH as usize,
            "claim returned {} jobs",
            rows.len()
        );
        tx.rollback().await?;
    }
    let mean = samples.iter().sum::<Duration>().as_secs_f64() * 1_000.0 / calls.max(1) as f64;
    Ok(ClaimCost {
        case: case.into(),
        workspaces,
        claim_ms: Summary::of(&samples),
        mean_ms: mean,
        mean_over_first: 1.0,
    })
}

pub fn render(o: &mut String, r: &IdleWorkspaces) {
    let _ = writeln!(
        o,
        "\n8. claim({BATCH}) vs idle workspaces: {} workspaces with {} pending jobs each; {} calls per case, \
         each BEGIN; claim; ROLLBACK (claim timed)",
        r.busy_workspaces,
        thousands(r.pending_per_busy as f64),
        r.calls
    );
    let _ = writeln!(
        o,
        "{:<44} | {:>7} | {:>6} | {:>6} | {:>6} | {:>8}",
        "workspaces", "mean ms", "p50 ms", "p99 ms", "max ms", "vs first"
    );
    for c in &r.cases {
        let _ = writeln!(
            o,
            "{:<44} | {:>7.2} | {:>6.2} | {:>6.2} | {:>6.2} | {:>7.2}x",
            c.case,
            c.mean_ms,
            c.claim_ms.p50_ms,
            c.claim_ms.p99_ms,
            c.claim_ms.max_ms,
            c.mean_over_first
        );
    }
    let _ = writeln!(
        o,
        "  idle: {} hold {} done jobs each, {} nothing; expect ~1x (claim's skip-scan visits only workspaces with pending work)",
        r.idle_with_done, r.done_per_idle, r.idle_empty
    );
}

//! Growth (issue 14 §2): does the queue slow down as it gets deep? claim(100) + complete(100) over the
//! same due work (DUE webhook jobs in 10 workspaces) with a backlog of 10,000, 1,000,000 and
//! 10,000,000 pending jobs around it, as a real backlog looks: due tomorrow, in 100 workspaces (the
//! busy ones among them). The backlog is added between levels and never analysed (tables straight
//! after a burst, as autovacuum may not have seen them yet). Prints claim p50/p99 and jobs/s per level
//! and the deepest level's p99 over the shallowest's (goal: within 2x).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::queue::{BATCH, CLAIM};
use crate::stats::Summary;
use crate::thousands;
use herald_sidecar::db::Target;

/// Due jobs drained at each level.
const DUE: i64 = 20_000;
/// Workspaces holding the backlog; the first BUSY of them also get the due jobs.
const WORKSPACES: i64 = 100;
const BUSY: i64 = 10;
/// Backlog rows per INSERT statement (keeps each statement's memory modest).
const CHUNK: i64 = 1_000_000;
pub const GOAL: &str = "claim p99 at the deepest backlog within 2x of the shallowest";

#[derive(Debug, Serialize)]
pub struct Growth {
    pub due_per_level: i64,
    pub levels: Vec<Level>,
    pub deepest_p99_over_shallowest: f64,
}

#[derive(Debug, Serialize)]
pub struct Level {
    /// Pending jobs due later, around the due work.
    pub backlog: i64,
    pub fill_secs: f64,
    pub claim_ms: Summary,
    pub complete_ms: Summary,
    pub jobs_per_sec: f64,
}

pub async fn run(target: &Target, small: bool) -> Result<Growth> {
    let levels: &[i64] = if small {
        &[10_000, 100_000]
    } else {
        &[10_000, 1_000_000, 10_000_000]
    };
    let db = target.connect().await?;
    db.execute(
        "SELECT count(herald.create_workspace(format('bench_growth_%s', lpad(w::text, 3, '0'))))
           FROM generate_series(0, $1::bigint - 1) w",
        &[&WORKSPACES],
    )
    .await
    .context("workspaces")?;
    let mut out = Vec::new();
    let mut backlog = 0i64;
    for (round, &level) in levels.iter().enumerate() {
        let started = Instant::now();
        while backlog < level {
            let n = (level - backlog).min(CHUNK);
            fill(&db, backlog, n).await?;
            backlog += n;
        }
        let fill_secs = started.elapsed().as_secs_f64();
        queue_due(&db, round).await?;
        let (claim_ms, complete_ms, jobs_per_sec) = drain(&db).await?;
        out.push(Level {
            backlog,
            fill_secs,
            claim_ms,
            complete_ms,
            jobs_per_sec,
        });
    }
    let ratio = match (out.first(), out.last()) {
        (Some(a), Some(b)) if a.claim_ms.p99_ms > 0.0 => b.claim_ms.p99_ms / a.claim_ms.p99_ms,
        _ => 0.0,
    };
    Ok(Growth {
        due_per_level: DUE,
        levels: out,
        deepest_p99_over_shallowest: ratio,
    })
}

/// `n` backlog jobs numbered from `from`, spread over every workspace, due in a day.
async fn fill(db: &Client, from: i64, n: i64) -> Result<()> {
    db.execute(
        "INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, payload, run_at)
         SELECT format('bench_growth_%s', lpad((i % $3)::text, 3, '0')), 'webhook', 'later:' || i,
                '{\"url\": \"http://127.0.0.1:9/\", \"body\": {}}', now() + interval '1 day'
           FROM generate_series($1::bigint, $1::bigint + $2::bigint - 1) i",
        &[&from, &n, &WORKSPACES],
    )
    .await
    .context("backlog")?;
    Ok(())
}

/// DUE jobs due now in the BUSY first workspaces.
async fn queue_due(db: &Client, round: usize) -> Result<()> {
    db.execute(
        "INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, payload)
         SELECT format('bench_growth_%s', lpad((i % $2)::text, 3, '0')), 'webhook', format('due:%s:%s', $3::int, i),
                '{\"url\": \"http://127.0.0.1:9/\", \"body\": {}}'
           FROM generate_series(1, $1::bigint) i",
        &[&DUE, &BUSY, &(round as i32)],
    )
    .await
    .context("due jobs")?;
    Ok(())
}

/// claim(100) + complete(100) until no job is due; (claim, complete, jobs/s).
async fn drain(db: &Client) -> Result<(Summary, Summary, f64)> {
    let claim = db.prepare(CLAIM).await?;
    let complete = db.prepare("SELECT herald.complete($1::jsonb)").await?;
    let (mut claims, mut completes): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    let mut done = 0i64;
    let started = Instant::now();
    loop {
        let t = Instant::now();
        let rows = db
            .query(&claim, &[&"bench", &BATCH])
            .await
            .context("herald.claim")?;
        claims.push(t.elapsed());
        if rows.is_empty() {
            break;
        }
        let results: Value = rows
            .iter()
            .map(|r| json!({"id": r.get::<_, i64>(0), "ok": true}))
            .collect::<Vec<_>>()
            .into();
        let t = Instant::now();
        let n: i32 = db
            .query_one(&complete, &[&results])
            .await
            .context("herald.complete")?
            .get(0);
        completes.push(t.elapsed());
        done += i64::from(n);
    }
    let secs = started.elapsed().as_secs_f64();
    ensure!(done == DUE, "drained {done} jobs, {DUE} were due");
    Ok((
        Summary::of(&claims),
        Summary::of(&completes),
        done as f64 / secs,
    ))
}

pub fn render(o: &mut String, r: &Growth, verdict: impl Fn(&str) -> &'static str) {
    let _ = writeln!(
        o,
        "\nGrowth: claim({BATCH}) + complete({BATCH}) of {} due webhook jobs in {BUSY} workspaces, beside a \
         backlog due tomorrow in {WORKSPACES} workspaces; never analysed",
        thousands(r.due_per_level as f64)
    );
    let _ = writeln!(
        o,
        "{:>12} | {:>8} | {:>12} | {:>12} | {:>13} | {:>9}",
        "backlog", "fill s", "claim p50 ms", "claim p99 ms", "complete p99", "jobs/s"
    );
    for l in &r.levels {
        let _ = writeln!(
            o,
            "{:>12} | {:>8.1} | {:>12.2} | {:>12.2} | {:>13.2} | {:>9}",
            thousands(l.backlog as f64),
            l.fill_secs,
            l.claim_ms.p50_ms,
            l.claim_ms.p99_ms,
            l.complete_ms.p99_ms,
            thousands(l.jobs_per_sec)
        );
    }
    let _ = writeln!(
        o,
        "deepest p99 / shallowest p99: {:.2}x   goal <= 2x: {}",
        r.deepest_p99_over_shallowest,
        verdict(GOAL)
    );
}

//! Growth (issue 14 §2): does the queue slow down as it gets deep? claim(100) + complete(100) over the
//! same due work (DUE webhook jobs in 10 workspaces) with a backlog of 10,000, 1,000,000 and
//! 10,000,000 pending jobs around it, as a real backlog looks: due tomorrow, in 100 workspaces (the
//! busy ones among them). The backlog is added between levels and never analysed (tables straight
//! after a burst, as autovacuum may not have seen them yet). Prints claim p50/p99 and jobs/s per level
//! and the deepest level's p99 over the shallowest's (goal: within 2x).

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use tokio_postgres::Client;

use crate::queue::BATCH;
use crate::stats::Summary;
use crate::thousands;
use herald_sidecar::db::Target;

pub mod history;

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
    pub history: history::History,
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
    // what earlier sections left in the queue (due now or retrying soon) would be counted as this
    // section's work: it is cancelled, as nothing reads it after them
    let db = target.connect().await?;
    db.execute(
        "UPDATE herald.outbox SET status = 'cancelled', updated_at = now()
          WHERE status IN ('pending', 'leased', 'held')",
        &[],
    )
    .await
    .context("cancelling what earlier sections left queued")?;
    // history first, on tables that are still empty; its finished jobs and events stay for the
    // depth levels (done rows are not in claim's pending index)
    let history = history::run(target, small).await?;
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
        let busy: Vec<String> = (0..BUSY).map(|w| format!("bench_growth_{w:03}")).collect();
        let busy: Vec<&str> = busy.iter().map(String::as_str).collect();
        queue_due(&db, &busy, &format!("depth{round}")).await?;
        let d = drain(&db).await?;
        out.push(Level {
            backlog,
            fill_secs,
            claim_ms: d.claim_ms,
            complete_ms: d.complete_ms,
            jobs_per_sec: d.jobs_per_sec,
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
        history,
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

/// DUE webhook jobs due now, spread over `workspaces`; `tag` keeps their dedupe keys apart.
async fn queue_due(db: &Client, workspaces: &[&str], tag: &str) -> Result<()> {
    let workspaces: Vec<String> = workspaces.iter().map(|w| w.to_string()).collect();
    db.execute(
        "INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, payload)
         SELECT ($2::text[])[1 + i % cardinality($2::text[])], 'webhook', format('due:%s:%s', $3::text, i),
                '{\"url\": \"http://127.0.0.1:9/\", \"body\": {}}'
           FROM generate_series(1, $1::bigint) i",
        &[&DUE, &workspaces, &tag],
    )
    .await
    .context("due jobs")?;
    Ok(())
}

struct Drained {
    claim_ms: Summary,
    complete_ms: Summary,
    jobs_per_sec: f64,
}

/// claim(100) + complete(100) until no job is due (the queue section's loop).
async fn drain(db: &Client) -> Result<Drained> {
    let (t, claim_ms, complete_ms) = crate::queue::herald(db, DUE as usize).await?;
    ensure!(
        t.jobs == DUE as usize,
        "drained {} jobs, {DUE} were due",
        t.jobs
    );
    Ok(Drained {
        claim_ms,
        complete_ms,
        jobs_per_sec: t.jobs_per_sec,
    })
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
    let h = &r.history;
    let _ = writeln!(
        o,
        "\nHistory: {} finished jobs (+ their message_history rows) and {} events over 30 days, loaded in {:.0} s",
        thousands(h.finished_jobs as f64),
        thousands(h.events as f64),
        h.fill_secs
    );
    let _ = writeln!(
        o,
        "medians of {} rounds per state (lowest-highest), each state after a CHECKPOINT and once autovacuum is idle",
        h.empty_rounds.len()
    );
    let _ = writeln!(
        o,
        "{:<30} | {:>26} | {:>26} | {:>6}",
        "rate", "empty tables", "full tables", "full/empty"
    );
    type Rate = fn(&history::Rates) -> f64;
    let rates: [(&str, Rate, f64); 3] = [
        (
            "ingest (track_many) events/s",
            |r| r.ingest_events_per_sec,
            h.ingest_ratio,
        ),
        ("tick node-steps/s", |r| r.tick_steps_per_sec, h.tick_ratio),
        (
            "claim + complete jobs/s",
            |r| r.claim_complete_jobs_per_sec,
            h.claim_ratio,
        ),
    ];
    for (what, rate, ratio) in rates {
        let state = |median: &history::Rates, rounds: &[history::Rates]| {
            let (lo, hi) = history::Rates::spread(rounds, rate);
            format!(
                "{} ({}-{})",
                thousands(rate(median)),
                thousands(lo),
                thousands(hi)
            )
        };
        let _ = writeln!(
            o,
            "{what:<30} | {:>26} | {:>26} | {ratio:>9.2}x",
            state(&h.empty, &h.empty_rounds),
            state(&h.full, &h.full_rounds)
        );
    }
    let _ = writeln!(
        o,
        "lowest full/empty: {:.2}x   goal >= 0.83x (within 1.2x): {}",
        h.worst_ratio,
        verdict(history::GOAL)
    );
    let _ = writeln!(
        o,
        "prune, the oldest day (jobs, message_history, events: each kept 29 days): {} rows in {:.1} s; claim + complete meanwhile on another connection: {} jobs/s, claim p99 {:.2} ms",
        thousands(h.prune.rows as f64),
        h.prune.secs,
        thousands(h.prune.during_jobs_per_sec),
        h.prune.during_claim_ms.p99_ms
    );
}

//! The contract floor: the fewest rows any queue must write per job to keep what herald promises
//! (DESIGN.md: a job stays as a deduplicated row until pruned, complete() leaves a history row, a
//! result for the stream and a stats count), written by two plain SQL statements per batch with no
//! feature of herald's around them: no fairness across workspaces, no rate limits, no suppression
//! check, no contact or template joined into the payload, no enrollment to wake, one index per
//! history and result table, and a lease that changes no indexed column (the pending index is keyed
//! on done_at; the lease sets status and lease_until, neither indexed; fillfactor 50 leaves room on
//! the page), so it is a HOT update. It is a generous bound (a real engine with this contract needs
//! more), so floor ÷ bare batched is about the most that "claim + complete ≥ 0.5× a bare batched
//! queue" can reach while the contract holds, and herald ÷ floor is what herald's own features cost
//! on top of it.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use tokio_postgres::Client;
use tracing::warn;

use super::{throughput, Throughput, BATCH, WORKSPACE};

/// Queues `jobs` webhook jobs into the floor's tables, one per contact in turn, as herald's setup does.
pub async fn setup(db: &Client, jobs: usize) -> Result<()> {
    db.batch_execute(
        "CREATE SCHEMA bench_floor;
         -- a job: deduplicated per workspace, in claim's order until done (leased or not), kept once done
         CREATE TABLE bench_floor.jobs (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             workspace_id text NOT NULL, dedupe_key text NOT NULL,
             status text NOT NULL DEFAULT 'pending', contact_id bigint,
             run_at timestamptz NOT NULL DEFAULT now(), payload jsonb NOT NULL,
             attempt int NOT NULL DEFAULT 0, lease_until timestamptz, message_id text, done_at timestamptz)
             WITH (fillfactor = 50);
         CREATE UNIQUE INDEX ON bench_floor.jobs (workspace_id, dedupe_key);
         CREATE INDEX ON bench_floor.jobs (workspace_id, run_at) WHERE done_at IS NULL;
         -- what was sent, found by contact (erasure) as herald's message_history is
         CREATE TABLE bench_floor.history (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             workspace_id text NOT NULL, job_id bigint NOT NULL, status text NOT NULL,
             contact_id bigint, dedupe_key text NOT NULL, message_id text,
             created_at timestamptz NOT NULL DEFAULT now());
         CREATE INDEX ON bench_floor.history (workspace_id, contact_id);
         -- the results stream's staging, read in order
         CREATE TABLE bench_floor.results (
             id bigint GENERATED ALWAYS AS IDENTITY,
             workspace_id text NOT NULL, kind text NOT NULL, job_id bigint,
             data jsonb NOT NULL, at timestamptz NOT NULL DEFAULT now());
         CREATE INDEX ON bench_floor.results (id);
         CREATE TABLE bench_floor.stats (workspace_id text NOT NULL, metric text NOT NULL, n bigint NOT NULL);",
    )
    .await
    .context("creating the contract floor's tables")?;
    let n = db
        .execute(
            "INSERT INTO bench_floor.jobs (workspace_id, dedupe_key, contact_id, payload)
             SELECT $1, 'bench:' || i, i % 1000, '{}' FROM generate_series(0, $2::int - 1) i",
            &[&WORKSPACE, &(jobs as i32)],
        )
        .await?;
    ensure!(n == jobs as u64, "queued {n} floor jobs");
    db.batch_execute("VACUUM (ANALYZE) bench_floor.jobs")
        .await?;
    Ok(())
}

/// Lease 100 (lease_until set: a HOT update), then finish them in one statement (done_at set, a history row
/// and a result row each, one stats row per batch): two transactions per batch, as herald's.
pub async fn run(db: &Client, jobs: usize) -> Result<Throughput> {
    let lease = db
        .prepare(
            "WITH c AS (SELECT id FROM bench_floor.jobs
                         WHERE workspace_id = $1 AND done_at IS NULL AND lease_until IS NULL AND run_at <= now()
                         ORDER BY run_at FOR UPDATE SKIP LOCKED LIMIT $2)
             UPDATE bench_floor.jobs j SET status = 'leased', lease_until = now() + interval '60 s',
                    attempt = j.attempt + 1
               FROM c WHERE j.id = c.id
             RETURNING j.id, j.dedupe_key, j.payload",
        )
        .await?;
    let complete = db
        .prepare(
            "WITH f AS (
                 UPDATE bench_floor.jobs j SET status = 'done', lease_until = NULL, done_at = now()
                  WHERE j.id = ANY ($1) AND j.done_at IS NULL
                 RETURNING j.workspace_id, j.id, j.contact_id, j.dedupe_key, j.message_id
             ), h AS (
                 INSERT INTO bench_floor.history (workspace_id, job_id, status, contact_id, dedupe_key, message_id)
                 SELECT f.workspace_id, f.id, 'sent', f.contact_id, f.dedupe_key, f.message_id FROM f
             ), r AS (
                 INSERT INTO bench_floor.results (workspace_id, kind, job_id, data)
                 SELECT f.workspace_id, 'webhook.answered', f.id, jsonb_build_object('status', 'ok') FROM f
             )
             INSERT INTO bench_floor.stats SELECT f.workspace_id, 'sent', count(*) FROM f GROUP BY 1",
        )
        .await?;
    let (mut done, mut batches) = (0usize, 0usize);
    let started = Instant::now();
    loop {
        let rows = db
            .query(&lease, &[&WORKSPACE, &(BATCH as i64)])
            .await
            .context("contract floor: lease")?;
        if rows.is_empty() {
            break;
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        db.execute(&complete, &[&ids])
            .await
            .context("contract floor: complete")?;
        done += ids.len();
        batches += 1;
    }
    let elapsed = started.elapsed();
    let history: i64 = db
        .query_one("SELECT count(*) FROM bench_floor.history", &[])
        .await?
        .get(0);
    if done != jobs || history != jobs as i64 {
        warn!("queue: the contract floor leased {done} jobs and wrote {history} history rows of {jobs}");
    }
    Ok(throughput(
        "contract floor: lease + done, history, result",
        done,
        elapsed,
        batches,
    ))
}

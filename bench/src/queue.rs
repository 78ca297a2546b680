//! The outbox as a queue: N jobs worked by `claim(100)` + `complete(100 ok results)` from one
//! connection, with herald's bookkeeping (leases, message history, stats deltas), next to three plain
//! queues in the same database and run: a textbook single-row SKIP LOCKED queue (one job per
//! transaction), a bare batched lease queue (lease 100, delete them), and PgQ; and the contract floor
//! (`queue/floor.rs`): the rows herald must write per job, by plain SQL. Then what one `claim(100)`
//! costs when most workspaces are idle (`queue/idle.rs`).

mod floor;
mod idle;
pub(crate) mod meter;
mod wake;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::Client;
use tracing::{info, warn};

use super::stats::Summary;
use super::{thousands, Goal};
use herald_sidecar::db::Target;

pub use idle::IdleWorkspaces;
pub use meter::ServerCost;
pub use wake::QueueWake;

const WORKSPACE: &str = "bench_queue";
/// Jobs per claim / complete / lease.
pub const BATCH: i32 = 100;
/// Contacts the jobs cycle through (claim joins each job's contact).
const CONTACTS: usize = 1_000;
/// The single-row queue stops after the N jobs or this long, whichever comes first.
const SINGLE_SAMPLE: Duration = Duration::from_secs(5);
/// Events per insert statement for the PgQ queue ticked once for all.
const PGQ_INSERT: usize = 10_000;
/// Gives up on a PgQ consumer that stops seeing batches.
const PGQ_LIMIT: Duration = Duration::from_secs(120);
/// What `herald run` selects from claim.
pub const CLAIM: &str = "SELECT id, workspace, kind, provider, dedupe_key, attempt, payload \
                         FROM herald.claim($1::text, $2::int)";
const GOAL_SINGLE: &str = "herald queue >= 10x single-row queue";
const GOAL_BATCHED: &str = "herald queue >= 0.5x bare batched lease queue";

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub queue: String,
    pub jobs: usize,
    pub secs: f64,
    pub jobs_per_sec: f64,
    /// Round trips that fetched work (claims, leases, batches).
    pub batches: usize,
    pub herald_over_this: f64,
    /// The backend's CPU and the WAL per job (measured for herald and the two plain queues).
    pub server: ServerCost,
}

#[derive(Debug, Serialize)]
pub struct Queue {
    pub jobs: usize,
    pub herald: Throughput,
    pub claim_ms: Summary,
    pub complete_ms: Summary,
    /// Rows complete() wrote: message_history and the 'sent' stats deltas (both should equal jobs).
    pub history_rows: i64,
    pub stats_sent: i64,
    pub single_row: Throughput,
    pub single_row_time_bounded: bool,
    pub bare_batched: Throughput,
    pub contract_floor: Throughput,
    pub pgq_tick_per_100: Throughput,
    pub pgq_one_tick: Throughput,
    pub idle_workspaces: IdleWorkspaces,
    pub wake_up: QueueWake,
}

impl Queue {
    pub(super) fn goals(&self) -> Vec<Goal> {
        let (s, b) = (
            self.single_row.herald_over_this,
            self.bare_batched.herald_over_this,
        );
        vec![
            Goal::new(GOAL_SINGLE, s, s >= 10.0),
            Goal::new(GOAL_BATCHED, b, b >= 0.5),
        ]
    }
}

fn throughput(queue: &str, jobs: usize, elapsed: Duration, batches: usize) -> Throughput {
    let secs = elapsed.as_secs_f64();
    Throughput {
        queue: queue.into(),
        jobs,
        secs,
        jobs_per_sec: jobs as f64 / secs,
        batches,
        herald_over_this: 0.0,
        server: ServerCost::default(),
    }
}

pub async fn run(target: &Target, small: bool) -> Result<Queue> {
    let jobs = if small { 5_000 } else { 100_000 };
    let db = target.connect().await?;
    setup(&db, jobs).await?;

    info!("queue: herald, {jobs} jobs");
    let m = meter::Meter::start(&db).await;
    let (mut herald, claim_ms, complete_ms) = herald(&db, jobs).await?;
    herald.server = m.stop(&db, herald.jobs).await;
    let row = db
        .query_one(
            "SELECT (SELECT count(*) FROM herald.message_history WHERE workspace_id = $1),
                    (SELECT coalesce(sum(n), 0)::bigint FROM herald.stats_delta WHERE workspace_id = $1 AND metric = 'sent')",
            &[&WORKSPACE],
        )
        .await?;
    let (history_rows, stats_sent): (i64, i64) = (row.get(0), row.get(1));
    if herald.jobs != jobs || history_rows != jobs as i64 || stats_sent != jobs as i64 {
        warn!(
            "queue: herald worked {} jobs, wrote {history_rows} history rows and {stats_sent} sent; expected {jobs}",
            herald.jobs
        );
    }
    info!("queue: single-row");
    let m = meter::Meter::start(&db).await;
    let mut single_row = single_row(&db, jobs).await?;
    single_row.server = m.stop(&db, single_row.jobs).await;
    let single_row_time_bounded = single_row.jobs < jobs;
    info!("queue: bare batched");
    let m = meter::Meter::start(&db).await;
    let mut bare_batched = bare_batched(&db, jobs).await?;
    bare_batched.server = m.stop(&db, bare_batched.jobs).await;
    info!("queue: contract floor");
    let m = meter::Meter::start(&db).await;
    let mut contract_floor = floor::run(&db, jobs).await?;
    contract_floor.server = m.stop(&db, contract_floor.jobs).await;
    info!("queue: PgQ");
    let (mut pgq_tick_per_100, mut pgq_one_tick) = pgq(&db, jobs).await?;
    herald.herald_over_this = 1.0;
    for q in [
        &mut single_row,
        &mut bare_batched,
        &mut contract_floor,
        &mut pgq_tick_per_100,
        &mut pgq_one_tick,
    ] {
        q.herald_over_this = herald.jobs_per_sec / q.jobs_per_sec;
    }

    info!("queue: claim cost against idle workspaces");
    let idle_workspaces = idle::run(target, small).await?;
    info!("queue: jobs that wake enrollments, with and without table statistics");
    let wake_up = wake::run(target, small).await?;
    Ok(Queue {
        jobs,
        herald,
        claim_ms,
        complete_ms,
        history_rows,
        stats_sent,
        single_row,
        single_row_time_bounded,
        bare_batched,
        contract_floor,
        pgq_tick_per_100,
        pgq_one_tick,
        idle_workspaces,
        wake_up,
    })
}

/// herald's jobs (webhooks for CONTACTS contacts, tied to an automation so complete() counts stats)
/// and the plain queues' tables, each with `jobs` rows.
async fn setup(db: &Client, jobs: usize) -> Result<()> {
    db.execute("SELECT herald.create_workspace($1)", &[&WORKSPACE])
        .await?;
    let contacts: Value = (0..CONTACTS)
        .map(|i| json!({"email": format!("q{i}@queue.example")}))
        .collect::<Vec<_>>()
        .into();
    db.execute(
        "SELECT inserted FROM herald.upsert_contacts($1, $2)",
        &[&WORKSPACE, &contacts],
    )
    .await?;
    let automation: i64 = db
        .query_one(
            "SELECT herald.create_automation($1, $2)",
            &[
                &WORKSPACE,
                &json!({"name": "queue", "start": "x", "nodes": {"x": {"type": "exit"}}}),
            ],
        )
        .await?
        .get(0);
    let n = db
        .execute(
            "INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, contact_id, automation_id, node, payload)
             SELECT $1, 'webhook', 'bench:' || i, c.ids[1 + i % cardinality(c.ids)], $2, 'w', '{}'
               FROM generate_series(0, $3::int - 1) i,
                    (SELECT array_agg(id ORDER BY id) AS ids FROM herald.contacts WHERE workspace_id = $1) c",
            &[&WORKSPACE, &automation, &(jobs as i32)],
        )
        .await
        .context("queueing herald's jobs")?;
    ensure!(n == jobs as u64, "queued {n} herald jobs");
    floor::setup(db, jobs).await?;
    db.batch_execute(
        "CREATE SCHEMA bench_q;
         CREATE TABLE bench_q.single (id bigserial PRIMARY KEY, payload jsonb);
         CREATE TABLE bench_q.batch (id bigserial PRIMARY KEY, payload jsonb, leased_until timestamptz);",
    )
    .await?;
    for table in ["bench_q.single", "bench_q.batch"] {
        db.execute(
            &format!(
                "INSERT INTO {table} (payload) SELECT '{{}}' FROM generate_series(1, $1::int)"
            ),
            &[&(jobs as i32)],
        )
        .await?;
    }
    db.batch_execute(
        "VACUUM (ANALYZE) herald.outbox, herald.contacts, bench_q.single, bench_q.batch",
    )
    .await?;
    Ok(())
}

/// claim(100), then complete() with an ok result for each, until claim returns nothing.
pub(crate) async fn herald(db: &Client, jobs: usize) -> Result<(Throughput, Summary, Summary)> {
    let claim = db.prepare(CLAIM).await?;
    let complete = db.prepare("SELECT herald.complete($1::jsonb)").await?;
    let (mut claims, mut completes) = (Vec::new(), Vec::new());
    let mut done = 0usize;
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
        done += n as usize;
        ensure!(done <= jobs, "herald completed more jobs than queued");
    }
    let elapsed = started.elapsed();
    Ok((
        throughput(
            "herald claim(100) + complete(100)",
            done,
            elapsed,
            completes.len(),
        ),
        Summary::of(&claims),
        Summary::of(&completes),
    ))
}

/// One DELETE … SKIP LOCKED LIMIT 1 per job, each its own transaction; stops after `jobs` or SINGLE_SAMPLE.
async fn single_row(db: &Client, jobs: usize) -> Result<Throughput> {
    let take = db
        .prepare(
            "DELETE FROM bench_q.single WHERE id = (SELECT id FROM bench_q.single ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1) \
             RETURNING *",
        )
        .await?;
    let mut done = 0usize;
    let started = Instant::now();
    while done < jobs && started.elapsed() < SINGLE_SAMPLE {
        let rows = db.query(&take, &[]).await.context("single-row DELETE")?;
        if rows.is_empty() {
            break;
        }
        done += rows.len();
    }
    Ok(throughput(
        "single-row DELETE ... SKIP LOCKED, autocommit",
        done,
        started.elapsed(),
        done,
    ))
}

/// Lease 100 with SKIP LOCKED (UPDATE … RETURNING), then DELETE them by id: two transactions per batch.
async fn bare_batched(db: &Client, jobs: usize) -> Result<Throughput> {
    let lease = db
        .prepare(
            "WITH c AS (SELECT id FROM bench_q.batch ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 100) \
             UPDATE bench_q.batch b SET leased_until = now() + interval '60 s' FROM c WHERE b.id = c.id RETURNING b.*",
        )
        .await?;
    let delete = db
        .prepare("DELETE FROM bench_q.batch WHERE id = ANY($1)")
        .await?;
    let (mut done, mut batches) = (0usize, 0usize);
    let started = Instant::now();
    loop {
        let rows = db.query(&lease, &[]).await.context("batched lease")?;
        if rows.is_empty() {
            break;
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        done += db.execute(&delete, &[&ids]).await? as usize;
        batches += 1;
    }
    let elapsed = started.elapsed();
    if done != jobs {
        warn!("queue: bare batched worked {done} jobs of {jobs}");
    }
    Ok(throughput(
        "bare batched lease 100 + DELETE",
        done,
        elapsed,
        batches,
    ))
}

/// Two PgQ queues of `jobs` events each, consumed by ticker() / next_batch / get_batch_events /
/// finish_batch. PgQ batches by ticks: `bench_100` is ticked after every insert of 100 events (as if
/// the ticker kept up with 100-event bursts), `bench_all` gets all its events before the first tick,
/// so its consumer sees one batch.
async fn pgq(db: &Client, jobs: usize) -> Result<(Throughput, Throughput)> {
    db.batch_execute(
        "CREATE EXTENSION IF NOT EXISTS pgq;
         SELECT pgq.create_queue('bench_100'), pgq.register_consumer('bench_100', 'c'),
                pgq.set_queue_config('bench_100', 'ticker_max_count', '1'),
                pgq.create_queue('bench_all'), pgq.register_consumer('bench_all', 'c');",
    )
    .await
    .context("PgQ (postgresql-15-pgq3)")?;
    let insert = db
        .prepare("SELECT count(pgq.insert_event($1, 'job', '{}')) FROM generate_series(1, $2::int)")
        .await?;
    let tick = db.prepare("SELECT pgq.ticker($1)").await?;
    for start in (0..jobs).step_by(BATCH as usize) {
        let n = (jobs - start).min(BATCH as usize) as i32;
        db.query_one(&insert, &[&"bench_100", &n]).await?;
        db.query_one(&tick, &[&"bench_100"]).await?;
    }
    let per_100 = consume(db, "bench_100", jobs, "PgQ, one tick per 100 events").await?;
    for start in (0..jobs).step_by(PGQ_INSERT) {
        let n = (jobs - start).min(PGQ_INSERT) as i32;
        db.query_one(&insert, &[&"bench_all", &n]).await?;
    }
    let one_tick = consume(
        db,
        "bench_all",
        jobs,
        &format!("PgQ, one tick for all {} events", thousands(jobs as f64)),
    )
    .await?;
    Ok((per_100, one_tick))
}

async fn consume(db: &Client, queue: &str, jobs: usize, name: &str) -> Result<Throughput> {
    let ticker = db.prepare("SELECT pgq.ticker()").await?;
    let next = db.prepare("SELECT pgq.next_batch($1, 'c')").await?;
    let events = db
        .prepare("SELECT ev_id, ev_type, ev_data FROM pgq.get_batch_events($1)")
        .await?;
    let finish = db.prepare("SELECT pgq.finish_batch($1)").await?;
    let (mut done, mut batches) = (0usize, 0usize);
    let started = Instant::now();
    while done < jobs {
        db.query_one(&ticker, &[]).await?;
        let batch: Option<i64> = db.query_one(&next, &[&queue]).await?.get(0);
        let Some(batch) = batch else {
            if started.elapsed() > PGQ_LIMIT {
                bail!("PgQ {queue}: {done} of {jobs} events consumed after {PGQ_LIMIT:?}");
            }
            continue;
        };
        done += db.query(&events, &[&batch]).await?.len();
        db.query_one(&finish, &[&batch]).await?;
        batches += 1;
    }
    Ok(throughput(name, done, started.elapsed(), batches))
}

pub(super) fn render(o: &mut String, q: &Queue) {
    let goals = q.goals();
    let _ = writeln!(
        o,
        "\n7. Queue throughput: {} jobs, one connection, batches of {BATCH} (herald: claim + complete with history and stats)",
        thousands(q.jobs as f64)
    );
    let _ = writeln!(
        o,
        "{:<46} | {:>10} | {:>8} | {:>7} | {:>11}",
        "queue", "jobs/s", "jobs", "batches", "herald/this"
    );
    for t in [
        &q.herald,
        &q.single_row,
        &q.bare_batched,
        &q.contract_floor,
        &q.pgq_tick_per_100,
        &q.pgq_one_tick,
    ] {
        let _ = writeln!(
            o,
            "{:<46} | {:>10} | {:>8} | {:>7} | {:>10.2}x",
            t.queue,
            thousands(t.jobs_per_sec),
            thousands(t.jobs as f64),
            thousands(t.batches as f64),
            t.herald_over_this
        );
    }
    if q.single_row_time_bounded {
        let _ = writeln!(
            o,
            "  single-row: a {:.1} s sample ({} of {} jobs)",
            q.single_row.secs,
            thousands(q.single_row.jobs as f64),
            thousands(q.jobs as f64)
        );
    }
    let _ = writeln!(
        o,
        "  herald: claim(100) p50 {:.2} ms p99 {:.2} ms, complete(100) p50 {:.2} ms p99 {:.2} ms; {} history rows, {} sent counted",
        q.claim_ms.p50_ms,
        q.claim_ms.p99_ms,
        q.complete_ms.p50_ms,
        q.complete_ms.p99_ms,
        thousands(q.history_rows as f64),
        thousands(q.stats_sent as f64)
    );
    render_server_cost(o, q);
    render_floor(o, q);
    let _ = writeln!(
        o,
        "  PgQ batches by ticks, not by {BATCH}: its rows show PgQ with a tick every {BATCH} events and with one tick for all"
    );
    for g in &goals {
        let _ = writeln!(
            o,
            "  goal: {:<58} {:>7.2}x  {}",
            g.goal,
            g.value,
            g.verdict()
        );
    }
    wake::render(o, &q.wake_up);
    idle::render(o, &q.idle_workspaces);
}

/// The server's own cost per job of herald and the plain queues, and herald's rate as it would be if
/// only that cost counted (this/herald): steadier than the wall clock on a shared machine.
fn render_server_cost(o: &mut String, q: &Queue) {
    let h = q.herald.server;
    for t in [&q.herald, &q.single_row, &q.bare_batched, &q.contract_floor] {
        let (cpu, wal) = (t.server.cpu_us_per_job, t.server.wal_bytes_per_job);
        if cpu.is_none() && wal.is_none() {
            continue;
        }
        let ratio = |mine: Option<f64>, theirs: Option<f64>| match (mine, theirs) {
            (Some(m), Some(t)) if m > 0.0 => format!(" ({:.2}x)", t / m),
            _ => String::new(),
        };
        let _ = writeln!(
            o,
            "  server cost, {:<44} backend CPU {:>7} µs/job{}, WAL {:>6} B/job{}",
            t.queue,
            cpu.map_or("-".into(), |c| format!("{c:.1}")),
            ratio(h.cpu_us_per_job, cpu),
            wal.map_or("-".into(), |w| format!("{w:.0}")),
            ratio(h.wal_bytes_per_job, wal),
        );
    }
}

/// How far the 0.5x goal can be reached while herald's contract holds (floor over bare), and what
/// herald's features cost on top of the floor; by wall clock and by backend CPU.
fn render_floor(o: &mut String, q: &Queue) {
    let (f, b, h) = (&q.contract_floor, &q.bare_batched, &q.herald);
    let by_cpu =
        |x: &Throughput, y: &Throughput| match (x.server.cpu_us_per_job, y.server.cpu_us_per_job) {
            (Some(x), Some(y)) if x > 0.0 => format!(", by backend CPU {:.2}x", y / x),
            _ => String::new(),
        };
    let _ = writeln!(
        o,
        "  contract floor / bare batched: {:.2}x{} (the most a queue keeping herald's rows reaches); herald / floor: {:.2}x{}",
        f.jobs_per_sec / b.jobs_per_sec,
        by_cpu(f, b),
        h.jobs_per_sec / f.jobs_per_sec,
        by_cpu(h, f),
    );
}

//! What the results stream costs `complete()`: the same claim(100) + complete(100) drain of N email
//! jobs (queued by one `herald.send` statement) in two databases of the same server, one with the
//! current extension (whose complete() stages an `email.sent` result per job) and one with release
//! 0.2.0 (no results stream), taking turns run by run (A B A B). Then what publishing those results
//! costs: `herald.advance_results(10000)` until nothing is staged, as maintenance runs it, off the
//! complete path.
//!
//! Statistics: the tables are measured as they are right after the inserts: never analysed. Autovacuum
//! is off on herald's tables in both databases for the section, so it cannot analyse one side behind
//! the benchmark's back; each run records how many (auto)analyses herald's tables have had (0).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::Client;
use tracing::info;

use crate::cpu::Cpu;
use crate::queue::CLAIM;
use crate::stats::Summary;
use herald_sidecar::db::Target;

/// The current extension (with the results stream) and release 0.2.0 (without).
pub const DB_CURRENT: &str = "herald_bench_stream_current";
pub const DB_OLD: &str = "herald_bench_stream_v020";
pub const OLD_VERSION: &str = "0.2.0";
const WORKSPACE: &str = "bench_complete";
const TEMPLATE: &str = "t";
const WORKER: &str = "bench";
/// Jobs per claim / complete.
pub const BATCH: i32 = 100;
/// advance_results' batch, as the daemon's maintenance calls it.
pub const PUBLISH_BATCH: i32 = 10_000;
const CONTACTS_PER_CALL: usize = 10_000;

#[derive(Debug, Serialize)]
pub struct Run {
    pub version: String,
    pub round: usize,
    pub jobs: usize,
    /// One herald.send statement queueing the jobs (not part of the figure).
    pub queue_secs: f64,
    pub secs: f64,
    pub jobs_per_sec: f64,
    pub claim_ms: Summary,
    pub complete_ms: Summary,
    /// ANALYZE and autoanalyze runs on herald's tables so far, at the start and end of the drain.
    pub analyses_before: i64,
    pub analyses_after: i64,
    /// herald.outbox's pg_class.reltuples at the start (-1: never analysed or vacuumed).
    pub outbox_reltuples: f64,
    /// CPU cores busy on average on the whole machine during the drain (this drain needs about one:
    /// its Postgres backend, plus the client; more means something else ran too).
    pub machine_cores: Option<f64>,
}

/// One version's runs together.
#[derive(Debug, Serialize)]
pub struct Side {
    pub version: String,
    pub runs: usize,
    pub jobs: usize,
    pub secs: f64,
    pub jobs_per_sec: f64,
    pub complete_ms: Summary,
}

#[derive(Debug, Serialize)]
pub struct Publish {
    pub results: i64,
    pub calls: usize,
    pub secs: f64,
    pub results_per_sec: f64,
    pub call_ms: Summary,
}

#[derive(Debug, Serialize)]
pub struct CompleteCost {
    pub jobs_per_run: usize,
    pub rounds: usize,
    pub batch: i32,
    pub statistics: &'static str,
    /// In the order they ran.
    pub runs: Vec<Run>,
    pub with_stream: Side,
    pub without_stream: Side,
    /// with / without (jobs/s over all runs of each).
    pub ratio: f64,
    /// Results the current extension's complete() staged (one email.sent per job expected).
    pub results_staged: i64,
    /// advance_results(PUBLISH_BATCH) publishing them, after each current-version run.
    pub publish: Publish,
    pub problems: Vec<String>,
}

pub async fn run(target: &Target, jobs: usize, rounds: usize) -> Result<CompleteCost> {
    let current_target = target.with_dbname(DB_CURRENT);
    let old_target = target.with_dbname(DB_OLD);
    let current = current_target.recreate_with_extension().await?;
    let old = recreate_old(&old_target).await?;
    let current_version = setup(&current, jobs).await?;
    let old_version = setup(&old, jobs).await?;
    ensure!(
        old_version == OLD_VERSION,
        "{DB_OLD} has herald {old_version}, expected {OLD_VERSION}"
    );
    info!(
        "stream: complete() with the results stream (herald {current_version}) and without ({old_version}), \
         {rounds} rounds of {jobs} jobs each, in turns"
    );

    let mut runs = Vec::new();
    let mut problems = Vec::new();
    let mut publish_times = Vec::new();
    // complete() times per version over all its runs
    let mut completes: Vec<(String, Vec<Duration>)> = Vec::new();
    let mut published = 0i64;
    let mut staged = 0i64;
    for round in 1..=rounds {
        for (db, version) in [(&current, &current_version), (&old, &old_version)] {
            let (r, times) = drain(db, version, round, jobs).await?;
            match completes.iter_mut().find(|(v, _)| v == version) {
                Some((_, all)) => all.extend(times),
                None => completes.push((version.clone(), times)),
            }
            info!(
                "stream: herald {version} round {round}: {:.0} jobs/s (complete p50 {:.2} ms)",
                r.jobs_per_sec, r.complete_ms.p50_ms
            );
            if r.jobs != jobs {
                problems.push(format!(
                    "herald {version} round {round}: {} jobs completed of {jobs}",
                    r.jobs
                ));
            }
            if r.analyses_after > 0 {
                problems.push(format!(
                    "herald {version} round {round}: herald's tables had {} analyses (expected none)",
                    r.analyses_after
                ));
            }
            runs.push(r);
            if *version == current_version {
                let n: i64 = db
                    .query_one(
                        "SELECT count(*) FROM herald.results_staged WHERE workspace_id = $1 AND kind = 'email.sent'",
                        &[&WORKSPACE],
                    )
                    .await?
                    .get(0);
                if n != jobs as i64 {
                    problems.push(format!(
                        "herald {version} round {round}: {n} email.sent results staged for {jobs} jobs"
                    ));
                }
                staged += n;
                published += publish(db, &mut publish_times).await?;
            }
        }
    }
    let in_results: i64 = current
        .query_one(
            "SELECT count(*) FROM herald.results WHERE workspace_id = $1",
            &[&WORKSPACE],
        )
        .await?
        .get(0);
    if in_results != staged || published != staged {
        problems.push(format!(
            "advance_results published {published} results ({in_results} in herald.results) of {staged} staged"
        ));
    }
    drop((current, old));
    let admin = target.with_dbname("postgres").connect().await?;
    for name in [DB_CURRENT, DB_OLD] {
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
    }

    let side = |version: &str| {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.version == version).collect();
        let jobs: usize = mine.iter().map(|r| r.jobs).sum();
        let secs: f64 = mine.iter().map(|r| r.secs).sum();
        let times = completes
            .iter()
            .find(|(v, _)| v == version)
            .map_or(&[][..], |(_, t)| t.as_slice());
        Side {
            version: version.to_string(),
            runs: mine.len(),
            jobs,
            secs,
            jobs_per_sec: jobs as f64 / secs,
            complete_ms: Summary::of(times),
        }
    };
    let with_stream = side(&current_version);
    let without_stream = side(&old_version);
    let publish_secs: f64 = publish_times.iter().map(Duration::as_secs_f64).sum();
    Ok(CompleteCost {
        jobs_per_run: jobs,
        rounds,
        batch: BATCH,
        statistics:
            "none: never analysed, as right after the inserts (autovacuum off on herald's tables)",
        ratio: with_stream.jobs_per_sec / without_stream.jobs_per_sec,
        with_stream,
        without_stream,
        runs,
        results_staged: staged,
        publish: Publish {
            results: published,
            calls: publish_times.len(),
            secs: publish_secs,
            results_per_sec: published as f64 / publish_secs,
            call_ms: Summary::of(&publish_times),
        },
        problems,
    })
}

/// The database again with herald 0.2.0 (its install script sits beside the current one).
async fn recreate_old(target: &Target) -> Result<Client> {
    let admin = target.with_dbname("postgres").connect().await?;
    let name = target.dbname().replace('"', "\"\"");
    for sql in [
        format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
        format!("CREATE DATABASE \"{name}\""),
    ] {
        admin
            .batch_execute(&sql)
            .await
            .with_context(|| format!("re-creating database {name}"))?;
    }
    let db = target.connect().await?;
    db.batch_execute(&format!("CREATE EXTENSION herald VERSION '{OLD_VERSION}'"))
        .await
        .with_context(|| {
            format!(
                "CREATE EXTENSION herald VERSION '{OLD_VERSION}' (its install script, sql/releases/herald--{OLD_VERSION}.sql, \
                 is installed by `make install`)"
            )
        })?;
    Ok(db)
}

/// Autovacuum off on herald's tables, the workspace, a template and `jobs` contacts; the installed
/// herald version.
async fn setup(db: &Client, jobs: usize) -> Result<String> {
    db.batch_execute(
        "DO $$
         DECLARE t regclass;
         BEGIN
             FOR t IN SELECT c.oid::regclass FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE n.nspname = 'herald' AND c.relkind = 'r'
             LOOP
                 EXECUTE format('ALTER TABLE %s SET (autovacuum_enabled = false)', t);
             END LOOP;
         END $$",
    )
    .await
    .context("turning autovacuum off on herald's tables")?;
    db.execute("SELECT herald.create_workspace($1)", &[&WORKSPACE])
        .await?;
    db.execute(
        "SELECT herald.upsert_template($1, $2, 'Hello {{ contact.email }}', '<p>Hello {{ contact.email }}</p>')",
        &[&WORKSPACE, &TEMPLATE],
    )
    .await?;
    for start in (0..jobs).step_by(CONTACTS_PER_CALL) {
        let chunk: Vec<Value> = (start..jobs.min(start + CONTACTS_PER_CALL))
            .map(|i| json!({"email": email(i)}))
            .collect();
        db.execute(
            "SELECT inserted FROM herald.upsert_contacts($1, $2)",
            &[&WORKSPACE, &Value::from(chunk)],
        )
        .await
        .context("creating the contacts")?;
    }
    let version: String = db
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'herald'",
            &[],
        )
        .await?
        .get(0);
    Ok(version)
}

fn email(i: usize) -> String {
    format!("s{i}@complete.example")
}

/// ANALYZE + autoanalyze runs on herald's tables so far, and herald.outbox's reltuples.
async fn statistics(db: &Client) -> Result<(i64, f64)> {
    let r = db
        .query_one(
            "SELECT (SELECT coalesce(sum(analyze_count + autoanalyze_count), 0)::int8
                       FROM pg_stat_user_tables WHERE schemaname = 'herald'),
                    (SELECT reltuples::float8 FROM pg_class WHERE oid = 'herald.outbox'::regclass)",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

/// Queues `jobs` emails with one herald.send statement, then claim(100) + complete(100 ok results,
/// each with a message id as the daemon reports it) until claim returns nothing.
async fn drain(
    db: &Client,
    version: &str,
    round: usize,
    jobs: usize,
) -> Result<(Run, Vec<Duration>)> {
    let started = Instant::now();
    let n: i64 = db
        .query_one(
            "SELECT count(herald.send($1, 's' || i || '@complete.example', $2)) FROM generate_series(0, $3::int - 1) i",
            &[&WORKSPACE, &TEMPLATE, &(jobs as i32)],
        )
        .await
        .context("queueing the emails")?
        .get(0);
    ensure!(n == jobs as i64, "queued {n} emails of {jobs}");
    let queue_secs = started.elapsed().as_secs_f64();
    let (analyses_before, outbox_reltuples) = statistics(db).await?;

    let claim = db.prepare(CLAIM).await?;
    let complete = db.prepare("SELECT herald.complete($1::jsonb)").await?;
    let (mut claims, mut completes) = (Vec::new(), Vec::new());
    let mut done = 0usize;
    let cpu = Cpu::read();
    let started = Instant::now();
    loop {
        let t = Instant::now();
        let rows = db
            .query(&claim, &[&WORKER, &BATCH])
            .await
            .context("herald.claim")?;
        claims.push(t.elapsed());
        if rows.is_empty() {
            break;
        }
        let results: Value = rows
            .iter()
            .map(|r| {
                let id: i64 = r.get(0);
                json!({"id": id, "ok": true, "message_id": format!("<{id}@bench.example>")})
            })
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
        ensure!(done <= jobs, "complete() recorded more jobs than queued");
    }
    let elapsed = started.elapsed();
    let machine_cores = Cpu::cores(cpu, Cpu::read(), elapsed.as_secs_f64()).map(|c| c.1);
    let (analyses_after, _) = statistics(db).await?;
    let run = Run {
        version: version.to_string(),
        round,
        jobs: done,
        queue_secs,
        secs: elapsed.as_secs_f64(),
        jobs_per_sec: done as f64 / elapsed.as_secs_f64(),
        claim_ms: Summary::of(&claims),
        complete_ms: Summary::of(&completes),
        analyses_before,
        analyses_after,
        outbox_reltuples,
        machine_cores,
    };
    Ok((run, completes))
}

/// advance_results(PUBLISH_BATCH) until a call publishes less than a full batch, each call its own
/// transaction (as maintenance calls it); the results published.
async fn publish(db: &Client, times: &mut Vec<Duration>) -> Result<i64> {
    let call = db
        .prepare("SELECT herald.advance_results($1::int)::int8")
        .await?;
    let mut total = 0;
    loop {
        let t = Instant::now();
        let n: i64 = db
            .query_one(&call, &[&PUBLISH_BATCH])
            .await
            .context("herald.advance_results")?
            .get(0);
        times.push(t.elapsed());
        total += n;
        if n < i64::from(PUBLISH_BATCH) {
            return Ok(total);
        }
    }
}

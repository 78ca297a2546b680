//! The step engine: `herald.tick` driving enrollments through a three-node flow that never leaves the
//! database (delay 0 s → branch on contact.plan → exit), and how many SQL statements one tick batch
//! runs (pg_stat_statements with nested statements tracked), at two batch sizes.
//!
//! A "step" as `tick()` counts it is one enrollment advanced: it runs consecutive non-waiting nodes
//! until it parks or ends, so here one step covers all 3 nodes. Rates are given both ways.
//!
//! tick is measured the way `herald run` calls it: herald.tick_publishes_results = off, and the results
//! stream published beside it every 250 ms from a connection of its own (as the daemon's maintenance
//! does). The same run also ticks the same number of enrollments with tick publishing its own results
//! (what a caller that does not publish gets, and what every tick did up to 0.4.0): the baseline.
//!
//! Beside the wall clock, each run prints the CPU time of tick's own backend per enrollment (and the
//! node steps per CPU-second that makes) and the WAL per enrollment: on a machine shared with other
//! work the wall-clock rate moves by 2× and more between runs, the backend's CPU far less.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::{Client, Statement};
use tracing::{info, warn};

use super::queue::meter::{Meter, ServerCost};
use super::stats::Summary;
use super::{thousands, Goal};
use herald_sidecar::db::Target;

const WORKSPACE: &str = "bench_engine";
/// Enrollments per tick call in the throughput run (what `herald run` asks for).
const TICK_BATCH: i32 = 10_000;
/// Nodes each enrollment executes: delay, branch, exit.
const NODES: usize = 3;
const CONTACTS_PER_CALL: usize = 10_000;
/// Batch sizes compared for statements per tick, and the ticks run at each.
const STATEMENT_BATCHES: [usize; 2] = [1_000, 10_000];
const STATEMENT_TICKS: usize = 2;
const GOAL_STEPS: &str = "tick >= 100,000 node steps/s";
/// How often the publisher beside the ticks publishes (herald run's maintenance: RESULTS_EVERY).
const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// advance_results' batch in the publisher (herald run's RESULTS_BATCH).
const PUBLISH_BATCH: i32 = 100_000;
/// How herald run's connections call tick: the results stream is published beside it.
const TICK_LEAVES_RESULTS: &str = "SET herald.tick_publishes_results = off";
const GOAL_STATEMENTS: &str = "statements per tick batch <= 6 at every batch size";

#[derive(Debug, Serialize)]
pub struct Engine {
    /// As herald run ticks: results published beside the ticks.
    pub tick: TickRun,
    /// The same enrollments with tick publishing its own results (the baseline).
    pub tick_publishing: TickRun,
    /// Results the publisher beside `tick` published while it ran.
    pub published_beside: i64,
    pub setup: Setup,
    pub statements: Vec<StatementCount>,
    /// What runs inside one tick (at the largest batch size): query text, calls per tick.
    pub statements_inside: Vec<(String, f64)>,
}

#[derive(Debug, Serialize)]
pub struct TickRun {
    pub enrollments: usize,
    pub nodes_per_enrollment: usize,
    pub node_steps: usize,
    pub max_steps: i32,
    /// tick calls that advanced enrollments (the last call, which returned 0, is not one).
    pub batches: usize,
    pub secs: f64,
    pub enrollments_per_sec: f64,
    pub node_steps_per_sec: f64,
    pub batch_ms: Summary,
    pub batch_mean_ms: f64,
    pub enroll_secs: f64,
    /// tick's backend CPU and the database's WAL, per enrollment advanced.
    pub server: ServerCost,
}

impl TickRun {
    /// Node steps per second of tick's backend CPU (None when the CPU time could not be read).
    fn node_steps_per_cpu_sec(&self) -> Option<f64> {
        self.server
            .cpu_us_per_job
            .filter(|us| *us > 0.0)
            .map(|us| self.nodes_per_enrollment as f64 * 1e6 / us)
    }
}

/// The set-up both tick runs share.
#[derive(Debug, Serialize)]
pub struct Setup {
    pub contacts_secs: f64,
    /// Enrollments of the earlier sections still in progress, ended (their automations archived) so
    /// tick sees only this run's.
    pub leftover_ended: i64,
    pub leftover_secs: f64,
}

#[derive(Debug, Serialize)]
pub struct StatementCount {
    pub batch: usize,
    pub ticks: i64,
    pub steps: usize,
    /// Calls of statements run inside tick (pg_stat_statements, toplevel = false).
    pub nested_calls: i64,
    pub per_tick: f64,
}

impl Engine {
    pub(super) fn goals(&self) -> Vec<Goal> {
        let worst = self
            .statements
            .iter()
            .map(|s| s.per_tick)
            .fold(0.0, f64::max);
        vec![
            Goal::new(
                GOAL_STEPS,
                self.tick.node_steps_per_sec,
                self.tick.node_steps_per_sec >= 100_000.0,
            ),
            Goal::new(
                GOAL_STATEMENTS,
                worst,
                !self.statements.is_empty() && worst <= 6.0,
            ),
        ]
    }
}

/// A live automation with the three-node flow; `name` must be new (re-entry is once per contact).
fn definition(name: &str) -> Value {
    json!({
        "name": name,
        "start": "d",
        "nodes": {
            "d": {"type": "delay", "duration": "0 seconds", "next": "b"},
            "b": {"type": "branch",
                  "paths": [{"when": {"field": "contact.plan", "op": "eq", "value": "pro"}, "next": "x"}],
                  "default": "x"},
            "x": {"type": "exit"}
        }
    })
}

pub async fn run(target: &Target, small: bool) -> Result<Engine> {
    let enrollments = if small { 5_000 } else { 100_000 };
    let db = target.connect().await?;

    let started = Instant::now();
    let leftover_ended = end_leftovers(&db).await?;
    let leftover_secs = started.elapsed().as_secs_f64();
    info!("engine: ended {leftover_ended} enrollments left by earlier sections in {leftover_secs:.1} s");

    let started = Instant::now();
    let contacts = create_contacts(&db, enrollments).await?;
    let contacts_secs = started.elapsed().as_secs_f64();
    let tick = db.prepare("SELECT herald.tick($1)").await?;

    // the baseline first: the run that counts gets the tables as the baseline left them (larger)
    info!("engine: {enrollments} enrollments, tick publishing its own results");
    let tick_publishing = tick_run(&db, &tick, "bench tick (tick publishes)", &contacts).await?;

    db.batch_execute(TICK_LEAVES_RESULTS).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(publish_until(target.connect().await?, stop.clone()));
    info!("engine: {enrollments} enrollments as herald run ticks (results published beside)");
    let tick_result = tick_run(&db, &tick, "bench tick", &contacts).await;
    stop.store(true, Ordering::Relaxed);
    let published_beside = publisher.await.context("the publisher task")??;
    let tick = tick_result?;

    let statements = statements(target, &contacts).await?;
    Ok(Engine {
        tick,
        tick_publishing,
        published_beside,
        setup: Setup {
            contacts_secs,
            leftover_ended,
            leftover_secs,
        },
        statements: statements.0,
        statements_inside: statements.1,
    })
}

/// Enrolls `contacts` into a new live automation, then ticks until tick returns 0.
async fn tick_run(db: &Client, tick: &Statement, name: &str, contacts: &[i64]) -> Result<TickRun> {
    let automation = live_automation(db, name).await?;
    let started = Instant::now();
    enroll(db, automation, contacts).await?;
    let enroll_secs = started.elapsed().as_secs_f64();
    db.batch_execute("VACUUM (ANALYZE) herald.enrollments, herald.contacts")
        .await?;

    let mut batches: Vec<Duration> = Vec::new();
    let mut steps = 0usize;
    let meter = Meter::start(db).await;
    let started = Instant::now();
    loop {
        let t = Instant::now();
        let n: i32 = db
            .query_one(tick, &[&TICK_BATCH])
            .await
            .context("herald.tick")?
            .get(0);
        if n == 0 {
            break;
        }
        batches.push(t.elapsed());
        steps += n as usize;
    }
    let secs = started.elapsed().as_secs_f64();
    let server = meter.stop(db, steps).await;
    check_completed(db, automation, contacts.len(), steps).await?;
    let mean =
        batches.iter().sum::<Duration>().as_secs_f64() * 1_000.0 / batches.len().max(1) as f64;
    Ok(TickRun {
        enrollments: contacts.len(),
        nodes_per_enrollment: NODES,
        node_steps: steps * NODES,
        max_steps: TICK_BATCH,
        batches: batches.len(),
        secs,
        enrollments_per_sec: steps as f64 / secs,
        node_steps_per_sec: (steps * NODES) as f64 / secs,
        batch_ms: Summary::of(&batches),
        batch_mean_ms: mean,
        enroll_secs,
        server,
    })
}

/// herald run's publishing round, every PUBLISH_EVERY until `stop`, then once more for what is
/// left: advance_results again at once while it returns a full batch. Returns the results published.
async fn publish_until(db: Client, stop: Arc<AtomicBool>) -> Result<i64> {
    let advance = db.prepare("SELECT herald.advance_results($1)").await?;
    let mut published = 0i64;
    loop {
        let last = stop.load(Ordering::Relaxed);
        loop {
            let n: i32 = db
                .query_one(&advance, &[&PUBLISH_BATCH])
                .await
                .context("herald.advance_results")?
                .get(0);
            published += i64::from(n);
            if n < PUBLISH_BATCH {
                break;
            }
        }
        if last {
            return Ok(published);
        }
        tokio::time::sleep(PUBLISH_EVERY).await;
    }
}

/// The ingest sections leave enrollments due at their exit node; tick would work them too. Archiving
/// their automations (herald's own way) ends them; VACUUM clears them from the due index.
async fn end_leftovers(db: &Client) -> Result<i64> {
    let ended: i64 = db
        .query_one(
            "SELECT count(*) FROM herald.enrollments WHERE status IN ('active', 'waiting')",
            &[],
        )
        .await?
        .get(0);
    db.execute(
        "SELECT herald.set_automation_status(a.id, 'archived') FROM herald.automations a
          WHERE a.status IN ('live', 'paused')
            AND EXISTS (SELECT 1 FROM herald.enrollments e
                         WHERE e.workspace_id = a.workspace_id AND e.automation_id = a.id
                           AND e.status IN ('active', 'waiting'))",
        &[],
    )
    .await
    .context("archiving the automations of earlier sections")?;
    db.batch_execute("VACUUM (ANALYZE) herald.enrollments")
        .await?;
    Ok(ended)
}

/// `count` contacts in WORKSPACE, plan alternating pro / free; returns their ids.
async fn create_contacts(db: &Client, count: usize) -> Result<Vec<i64>> {
    db.execute("SELECT herald.create_workspace($1)", &[&WORKSPACE])
        .await?;
    for start in (0..count).step_by(CONTACTS_PER_CALL) {
        let chunk: Value = (start..count.min(start + CONTACTS_PER_CALL))
            .map(|i| {
                json!({"email": format!("e{i}@engine.example"),
                       "attributes": {"plan": if i % 2 == 0 { "pro" } else { "free" }}})
            })
            .collect::<Vec<_>>()
            .into();
        db.execute(
            "SELECT inserted FROM herald.upsert_contacts($1, $2)",
            &[&WORKSPACE, &chunk],
        )
        .await
        .context("creating the engine's contacts")?;
    }
    let ids: Vec<i64> = db
        .query(
            "SELECT id FROM herald.contacts WHERE workspace_id = $1 ORDER BY id",
            &[&WORKSPACE],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure!(
        ids.len() == count,
        "{} engine contacts, expected {count}",
        ids.len()
    );
    Ok(ids)
}

async fn live_automation(db: &Client, name: &str) -> Result<i64> {
    let id: i64 = db
        .query_one(
            "SELECT herald.create_automation($1, $2)",
            &[&WORKSPACE, &definition(name)],
        )
        .await
        .context("create_automation")?
        .get(0);
    db.execute("SELECT herald.set_automation_status($1, 'live')", &[&id])
        .await?;
    Ok(id)
}

async fn enroll(db: &Client, automation: i64, contacts: &[i64]) -> Result<()> {
    let enrolled: i64 = db
        .query_one(
            "SELECT enrolled FROM herald.enroll($1, $2)",
            &[&automation, &contacts],
        )
        .await
        .context("herald.enroll")?
        .get(0);
    ensure!(
        enrolled == contacts.len() as i64,
        "enrolled {enrolled} of {} contacts",
        contacts.len()
    );
    Ok(())
}

async fn check_completed(db: &Client, automation: i64, want: usize, steps: usize) -> Result<()> {
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'completed'),
                    (SELECT count(*) FROM herald.step_history l WHERE l.automation_id = $1)
               FROM herald.enrollments WHERE automation_id = $1",
            &[&automation],
        )
        .await?;
    let (completed, logged): (i64, i64) = (row.get(0), row.get(1));
    if completed != want as i64 || steps != want || logged != (want * NODES) as i64 {
        warn!(
            "engine: {completed} enrollments completed, {steps} steps, {logged} step-log rows; \
             expected {want}, {want} and {}",
            want * NODES
        );
    }
    Ok(())
}

/// For each batch size: exactly STATEMENT_TICKS batches due, pg_stat_statements reset for this
/// database, then the ticks; nested statement calls divided by tick calls.
async fn statements(
    target: &Target,
    contacts: &[i64],
) -> Result<(Vec<StatementCount>, Vec<(String, f64)>)> {
    let db = target.connect().await?;
    db.batch_execute(
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
         SET pg_stat_statements.track = 'all'",
    )
    .await
    .context("pg_stat_statements (is it in shared_preload_libraries?)")?;
    // as herald run ticks; the results are published after the counts
    db.batch_execute(TICK_LEAVES_RESULTS).await?;
    let tick = db.prepare("SELECT herald.tick($1)").await?;
    let mut counts = Vec::new();
    let mut inside = Vec::new();
    for batch in STATEMENT_BATCHES {
        // batch * ticks due enrollments, over as many automations as the contacts require
        let (mut left, mut part) = (batch * STATEMENT_TICKS, 0);
        while left > 0 {
            let take = left.min(contacts.len());
            let automation =
                live_automation(&db, &format!("bench statements {batch} {part}")).await?;
            enroll(&db, automation, &contacts[..take]).await?;
            left -= take;
            part += 1;
        }
        db.batch_execute(
            "SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database WHERE datname = current_database()), 0)",
        )
        .await?;
        let mut steps = 0usize;
        for _ in 0..STATEMENT_TICKS {
            let n: i32 = db.query_one(&tick, &[&(batch as i32)]).await?.get(0);
            steps += n as usize;
        }
        let rows = db
            .query(
                "SELECT s.toplevel, s.calls, regexp_replace(s.query, '\\s+', ' ', 'g')
                   FROM pg_stat_statements s
                  WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                  ORDER BY s.calls DESC, s.query",
                &[],
            )
            .await?;
        let ticks: i64 = rows
            .iter()
            .filter(|r| r.get::<_, bool>(0) && r.get::<_, String>(2).contains("herald.tick("))
            .map(|r| r.get::<_, i64>(1))
            .sum();
        let nested: Vec<(String, i64)> = rows
            .iter()
            .filter(|r| !r.get::<_, bool>(0))
            .map(|r| (r.get(2), r.get(1)))
            .collect();
        let nested_calls: i64 = nested.iter().map(|(_, c)| c).sum();
        if steps != batch * STATEMENT_TICKS || ticks != STATEMENT_TICKS as i64 {
            warn!(
                "statements: {ticks} tick calls recorded for {STATEMENT_TICKS}, {steps} steps for {}",
                batch * STATEMENT_TICKS
            );
        }
        let per_tick = nested_calls as f64 / ticks.max(1) as f64;
        inside = nested
            .into_iter()
            .map(|(q, c)| (q, c as f64 / ticks.max(1) as f64))
            .collect();
        counts.push(StatementCount {
            batch,
            ticks,
            steps,
            nested_calls,
            per_tick,
        });
        info!("statements: batches of {batch}: {per_tick:.1} statements per tick");
    }
    publish_until(db, Arc::new(AtomicBool::new(true))).await?;
    Ok((counts, inside))
}

pub(super) fn render(o: &mut String, e: &Engine) {
    let goals = e.goals();
    let t = &e.tick;
    let _ = writeln!(
        o,
        "\n5. Step engine: {} enrollments through delay 0 s -> branch (contact.plan) -> exit, tick({}) until it returns 0",
        thousands(t.enrollments as f64),
        thousands(t.max_steps as f64)
    );
    let _ = writeln!(
        o,
        "   (a tick \"step\" = one enrollment advanced through consecutive non-waiting nodes: here all {} nodes in one step)",
        t.nodes_per_enrollment
    );
    let _ = writeln!(
        o,
        "{:>30} | {:>10} | {:>7} | {:>6} | {:>13} | {:>12} | {:>29}",
        "tick",
        "node steps",
        "batches",
        "secs",
        "enrollments/s",
        "node steps/s",
        "ms per batch mean/p50/max"
    );
    for (label, run) in [
        ("as herald run (results beside)", &e.tick),
        ("publishing its own results", &e.tick_publishing),
    ] {
        let _ = writeln!(
            o,
            "{:>30} | {:>10} | {:>7} | {:>6.2} | {:>13} | {:>12} | {:>9.1} / {:>7.1} / {:>7.1}",
            label,
            thousands(run.node_steps as f64),
            run.batches,
            run.secs,
            thousands(run.enrollments_per_sec),
            thousands(run.node_steps_per_sec),
            run.batch_mean_ms,
            run.batch_ms.p50_ms,
            run.batch_ms.max_ms
        );
    }
    for (label, run) in [
        ("as herald run", &e.tick),
        ("publishing its own", &e.tick_publishing),
    ] {
        let cpu = match (run.server.cpu_us_per_job, run.node_steps_per_cpu_sec()) {
            (Some(us), Some(rate)) => format!(
                "{us:.1} us of tick's backend CPU per enrollment = {} node steps per CPU-second",
                thousands(rate)
            ),
            _ => "tick's backend CPU not readable (server on another machine?)".to_string(),
        };
        let wal = run.server.wal_bytes_per_job.map_or(String::new(), |b| {
            format!("; {b:.0} B of WAL per enrollment (this database's statements meanwhile)")
        });
        let _ = writeln!(o, "  {label}: {cpu}{wal}");
    }
    let _ = writeln!(
        o,
        "  as herald run: {} results published beside the ticks (advance_results({PUBLISH_BATCH}) every {} ms, own connection); \
         {:.2}x the rate of tick publishing its own",
        thousands(e.published_beside as f64),
        PUBLISH_EVERY.as_millis(),
        t.node_steps_per_sec / e.tick_publishing.node_steps_per_sec.max(f64::MIN_POSITIVE)
    );
    let _ = writeln!(
        o,
        "  setup: {} contacts in {:.1} s, enrolled in {:.1} / {:.1} s; {} enrollments of earlier sections ended first ({:.1} s)",
        thousands(t.enrollments as f64),
        e.setup.contacts_secs,
        t.enroll_secs,
        e.tick_publishing.enroll_secs,
        thousands(e.setup.leftover_ended as f64),
        e.setup.leftover_secs
    );
    let _ = writeln!(
        o,
        "  goal: {:<58} {:>8}  {}",
        goals[0].goal,
        thousands(goals[0].value),
        goals[0].verdict()
    );

    let _ = writeln!(
        o,
        "\n6. Statements per tick batch, as herald run ticks: pg_stat_statements (track = all) calls of statements run inside tick / tick calls"
    );
    let _ = writeln!(
        o,
        "{:>6} | {:>5} | {:>10} | {:>17} | {:>8}",
        "batch", "ticks", "steps", "nested statements", "per tick"
    );
    for s in &e.statements {
        let _ = writeln!(
            o,
            "{:>6} | {:>5} | {:>10} | {:>17} | {:>8.1}",
            thousands(s.batch as f64),
            s.ticks,
            thousands(s.steps as f64),
            s.nested_calls,
            s.per_tick
        );
    }
    for (query, per_tick) in &e.statements_inside {
        let short: String = query.chars().take(70).collect();
        let _ = writeln!(o, "  {per_tick:>4.1} x  {short}");
    }
    let _ = writeln!(
        o,
        "  goal: {:<58} {:>8.1}  {}",
        goals[1].goal,
        goals[1].value,
        goals[1].verdict()
    );
}

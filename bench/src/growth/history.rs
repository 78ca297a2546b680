//! Growth of history (issue 14 §2): ingest, tick and claim + complete measured on empty tables, then
//! again with millions of finished jobs (outbox rows done, with their message_history rows) and
//! events in the tables, dated over the last 30 days; each rate full / empty (goal >= 1/1.2). Then
//! `prune` removes the oldest day's finished jobs, history rows and events (retention 29 days for
//! each) while claim + complete drains due work on another
//! connection: how long it takes, what it removed, and the drain's claim p99 during it. The loaded
//! tables are VACUUMed (not analysed) before the second measurement, as autovacuum would.
//!
//! Each state is measured ROUNDS times and compared by its medians, after a CHECKPOINT and once no
//! autovacuum worker runs: the rates are samples of about a second, and on a 2-core machine the
//! write-back of the 30M-row load, or an autovacuum ANALYZE of it, took a core from one of them (single
//! samples gave full/empty 0.79x for ingest in one run and 1.13x in the next, tick 0.98x then 0.65x).
//! Autovacuum stays on (the small hot tables need it between rounds: with it off, the empty state's
//! rounds slowed one after the other), except its ANALYZE of the three loaded tables, which stay never
//! analysed as after a burst. What is compared is the table size, not the load's aftermath.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::Client;

use super::{drain, queue_due, Drained};
use crate::stats::Summary;
use herald_sidecar::db::Target;

const WORKSPACE: &str = "bench_history";
const CONTACTS: i64 = 10_000;
/// Events per track_many call, and calls per ingest measurement.
const EVENTS_PER_CALL: usize = 1_000;
const CALLS: usize = 20;
/// History rows per INSERT statement.
const CHUNK: i64 = 1_000_000;
/// Measurements of each state; the medians are compared.
const ROUNDS: usize = 3;
/// Keeps the loaded tables never analysed while autovacuum goes on vacuuming (its largest threshold).
const NO_ANALYZE: &str = "(autovacuum_analyze_threshold = 2147483647)";
/// How long a state waits for autovacuum to finish before its first round.
const SETTLE: Duration = Duration::from_secs(120);
pub const GOAL: &str =
    "ingest, tick and claim with full history >= 1/1.2 of their rates on empty tables";

#[derive(Debug, Serialize)]
pub struct History {
    pub finished_jobs: i64,
    pub events: i64,
    pub fill_secs: f64,
    /// The median of ROUNDS measurements of each rate, and every round.
    pub empty: Rates,
    pub full: Rates,
    pub empty_rounds: Vec<Rates>,
    pub full_rounds: Vec<Rates>,
    /// full / empty for each median rate, and the lowest of the three.
    pub ingest_ratio: f64,
    pub tick_ratio: f64,
    pub claim_ratio: f64,
    pub worst_ratio: f64,
    pub prune: Prune,
}

#[derive(Debug, Serialize)]
pub struct Rates {
    pub ingest_events_per_sec: f64,
    pub tick_steps_per_sec: f64,
    pub claim_complete_jobs_per_sec: f64,
    /// claim's latency in this round (for a median, in the round whose drain rate is the median).
    pub claim_ms: Summary,
}

impl Rates {
    /// Each rate's median over the rounds (ROUNDS is odd: a measured value, not an average).
    fn median(rounds: &[Rates]) -> Rates {
        let mid = |rate: fn(&Rates) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(rate).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let claim = mid(|r| r.claim_complete_jobs_per_sec);
        let claim_ms = rounds
            .iter()
            .find(|r| r.claim_complete_jobs_per_sec == claim)
            .map(|r| r.claim_ms)
            .unwrap_or_default();
        Rates {
            ingest_events_per_sec: mid(|r| r.ingest_events_per_sec),
            tick_steps_per_sec: mid(|r| r.tick_steps_per_sec),
            claim_complete_jobs_per_sec: claim,
            claim_ms,
        }
    }

    /// "lowest–highest" of one rate over the rounds.
    pub fn spread(rounds: &[Rates], rate: fn(&Rates) -> f64) -> (f64, f64) {
        rounds
            .iter()
            .map(rate)
            .fold((f64::MAX, 0.0), |(lo, hi), x| (lo.min(x), hi.max(x)))
    }
}

#[derive(Debug, Serialize)]
pub struct Prune {
    pub rows: i64,
    pub secs: f64,
    /// claim + complete on another connection while prune ran.
    pub during_jobs_per_sec: f64,
    pub during_claim_ms: Summary,
}

pub async fn run(target: &Target, small: bool) -> Result<History> {
    let (finished, events) = if small {
        (100_000, 200_000)
    } else {
        (10_000_000, 20_000_000)
    };
    let db = target.connect().await?;
    db.batch_execute(&format!(
        "ALTER TABLE herald.outbox SET {NO_ANALYZE}; ALTER TABLE herald.message_history SET {NO_ANALYZE};
         ALTER TABLE herald.events SET {NO_ANALYZE}"
    ))
    .await
    .context("autovacuum's ANALYZE off")?;
    setup(&db).await?;
    let empty_rounds = rounds(&db, 0).await?;
    let started = Instant::now();
    fill(&db, finished, events).await?;
    let fill_secs = started.elapsed().as_secs_f64();
    let full_rounds = rounds(&db, ROUNDS).await?;
    db.batch_execute(
        "ALTER TABLE herald.outbox RESET (autovacuum_analyze_threshold);
         ALTER TABLE herald.message_history RESET (autovacuum_analyze_threshold);
         ALTER TABLE herald.events RESET (autovacuum_analyze_threshold)",
    )
    .await?;
    let prune = prune_while_draining(target, &db).await?;
    let (empty, full) = (Rates::median(&empty_rounds), Rates::median(&full_rounds));
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let ingest_ratio = ratio(full.ingest_events_per_sec, empty.ingest_events_per_sec);
    let tick_ratio = ratio(full.tick_steps_per_sec, empty.tick_steps_per_sec);
    let claim_ratio = ratio(
        full.claim_complete_jobs_per_sec,
        empty.claim_complete_jobs_per_sec,
    );
    Ok(History {
        finished_jobs: finished,
        events,
        fill_secs,
        empty,
        full,
        empty_rounds,
        full_rounds,
        ingest_ratio,
        tick_ratio,
        claim_ratio,
        worst_ratio: ingest_ratio.min(tick_ratio).min(claim_ratio),
        prune,
    })
}

/// The workspace, its contacts and a live journey on `history.signup`: a branch on the plan, then
/// exit (two node-steps per enrollment, in one tick).
async fn setup(db: &Client) -> Result<()> {
    db.execute("SELECT herald.create_workspace($1)", &[&WORKSPACE])
        .await?;
    let contacts: Value = (0..CONTACTS)
        .map(|i| json!({"email": format!("h{i}@history.example"), "attributes": {"plan": "pro"}}))
        .collect::<Vec<_>>()
        .into();
    db.query_one(
        "SELECT inserted FROM herald.upsert_contacts($1, $2)",
        &[&WORKSPACE, &contacts],
    )
    .await
    .context("contacts")?;
    let journey = json!({
        "name": "history", "trigger": {"event": "history.signup"}, "reentry": "always", "start": "check",
        "nodes": {
            "check": {"type": "branch", "paths": [{"when": {"field": "contact.plan", "op": "eq", "value": "pro"}, "next": "done"}], "default": "done"},
            "done": {"type": "exit"}
        }
    });
    db.execute(
        "SELECT herald.set_automation_status(herald.create_automation($1, $2), 'live')",
        &[&WORKSPACE, &journey],
    )
    .await
    .context("journey")?;
    Ok(())
}

/// ROUNDS measurements of one state, numbered from `first`, after a CHECKPOINT (the dirty pages of what
/// came before are written before the first sample, not during it) and once autovacuum is idle.
async fn rounds(db: &Client, first: usize) -> Result<Vec<Rates>> {
    db.batch_execute("CHECKPOINT").await.context("CHECKPOINT")?;
    crate::autovacuum::wait_idle(db, SETTLE).await?;
    let mut out = Vec::with_capacity(ROUNDS);
    for round in first..first + ROUNDS {
        out.push(rates(db, round).await?);
    }
    Ok(out)
}

async fn rates(db: &Client, round: usize) -> Result<Rates> {
    // ingest: CALLS track_many calls of EVENTS_PER_CALL events, each enrolling its contact
    let track = db.prepare("SELECT herald.track_many($1, $2)").await?;
    let started = Instant::now();
    for call in 0..CALLS {
        let events: Value = (0..EVENTS_PER_CALL)
            .map(|i| {
                let n = ((round * CALLS + call) * EVENTS_PER_CALL + i) as i64;
                json!({"email": format!("h{}@history.example", n % CONTACTS), "kind": "history.signup"})
            })
            .collect::<Vec<_>>()
            .into();
        let n: i64 = db
            .query_one(&track, &[&WORKSPACE, &events])
            .await
            .context("track_many")?
            .get(0);
        ensure!(n as usize == EVENTS_PER_CALL, "track_many recorded {n}");
    }
    let ingest = (CALLS * EVENTS_PER_CALL) as f64 / started.elapsed().as_secs_f64();
    // tick until nothing is due
    let tick = db.prepare("SELECT herald.tick(10000)").await?;
    let started = Instant::now();
    let mut steps = 0i64;
    loop {
        let n: i32 = db.query_one(&tick, &[]).await.context("tick")?.get(0);
        if n == 0 {
            break;
        }
        steps += i64::from(n);
    }
    let tick_rate = steps as f64 / started.elapsed().as_secs_f64();
    ensure!(
        steps >= (CALLS * EVENTS_PER_CALL) as i64,
        "tick made {steps} steps for {} enrollments",
        CALLS * EVENTS_PER_CALL
    );
    // claim + complete of due webhook jobs
    queue_due(db, &[WORKSPACE], &format!("history{round}")).await?;
    let Drained {
        claim_ms,
        jobs_per_sec,
        ..
    } = drain(db).await?;
    Ok(Rates {
        ingest_events_per_sec: ingest,
        tick_steps_per_sec: tick_rate,
        claim_complete_jobs_per_sec: jobs_per_sec,
        claim_ms,
    })
}

/// Finished jobs (done, with their message_history rows) and events, dated evenly over 30 days.
/// The events are loaded as a restore loads them (herald.restoring: already dispatched).
async fn fill(db: &Client, finished: i64, events: i64) -> Result<()> {
    let mut from = 0;
    while from < finished {
        let n = (finished - from).min(CHUNK);
        db.execute(
            "WITH jobs AS (
                 INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, payload, status, attempt, done_at, created_at, updated_at)
                 SELECT $1, 'email', 'old:' || i, '{}', 'done', 1, t, t, t
                   FROM generate_series($2::bigint, $2::bigint + $3::bigint - 1) i,
                        LATERAL (SELECT now() - make_interval(secs => 86400 * 30 * (i::float8 / $4)) AS t) d
                 RETURNING id, dedupe_key, done_at)
             INSERT INTO herald.message_history (workspace_id, outbox_id, kind, status, dedupe_key, attempt, created_at)
             SELECT $1, j.id, 'email', 'sent', j.dedupe_key, 1, j.done_at FROM jobs j",
            &[&WORKSPACE, &from, &n, &(finished as f64)],
        )
        .await
        .context("finished jobs")?;
        from += n;
    }
    db.batch_execute("SET herald.restoring = on").await?;
    let mut from = 0;
    while from < events {
        let n = (events - from).min(CHUNK);
        db.execute(
            "INSERT INTO herald.events (workspace_id, contact_id, kind, payload, occurred_at, created_at)
             SELECT $1, c.first + (i % $5), 'history.old', '{\"n\": 1}', t, t
               FROM generate_series($2::bigint, $2::bigint + $3::bigint - 1) i,
                    LATERAL (SELECT now() - make_interval(secs => 86400 * 30 * (i::float8 / $4)) AS t) d,
                    (SELECT min(id) AS first FROM herald.contacts WHERE workspace_id = $1) c",
            &[&WORKSPACE, &from, &n, &(events as f64), &CONTACTS],
        )
        .await
        .context("events")?;
        from += n;
    }
    db.batch_execute("RESET herald.restoring").await?;
    // what autovacuum would do next (on this 2-core box it otherwise runs during the measurement
    // and takes a core from it); VACUUM only: no ANALYZE, the column statistics stay unknown
    db.batch_execute("VACUUM herald.outbox, herald.message_history, herald.events")
        .await
        .context("VACUUM")?;
    Ok(())
}

/// prune('29 days') with events and message_history kept 29 days too (the oldest day of finished jobs,
/// their history rows and events) on a connection of its own, while this one drains due work.
async fn prune_while_draining(target: &Target, db: &Client) -> Result<Prune> {
    queue_due(db, &[WORKSPACE], "during-prune").await?;
    let other = target.connect().await?;
    let pruning = tokio::spawn(async move {
        let t = Instant::now();
        let rows: i64 = other
            .query_one(
                "SELECT herald.prune('29 days', '7 days', events_older_than => '29 days', \
                 history_older_than => '29 days')",
                &[],
            )
            .await
            .context("prune")?
            .get(0);
        Ok::<(i64, Duration), anyhow::Error>((rows, t.elapsed()))
    });
    // give prune a head start, so the drain runs while it deletes
    tokio::time::sleep(Duration::from_millis(50)).await;
    let d = drain(db).await?;
    let (rows, took) = pruning.await.context("prune task")??;
    Ok(Prune {
        rows,
        secs: took.as_secs_f64(),
        during_jobs_per_sec: d.jobs_per_sec,
        during_claim_ms: d.claim_ms,
    })
}

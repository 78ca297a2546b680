//! The journey end to end (issue 14's headline): N contacts tracked with `track_many` into a live journey
//! (email → branch on the event's plan → email for "pro" → exit), `herald run` (in-process) delivering to
//! postfix's `smtp-sink`, timed from the first `track_many` until every enrollment has completed. Then,
//! with the same daemon and sink in the same run, N transactional `send()` emails: the baseline the
//! journey's emails/s is compared with.
//!
//! Two rounds of the journey, each with N new contacts: first on tables autovacuum has never analysed
//! (a fresh database, autovacuum off for the run: the state after a fresh install or a burst), then
//! after a `VACUUM ANALYZE` (the favourable state). Both are reported; the goals are judged on the
//! first. Where the database time went in each round comes from pg_stat_statements when it is loaded;
//! with `HERALD_BENCH_AUTO_EXPLAIN_MS=<ms>` the plans of slower statements (nested ones included, with
//! row counts) go to the server log through auto_explain.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::Client;
use tracing::info;

use super::delivery::{find_tool, start_sink, Daemon};
use super::{thousands, Goal};
use herald_sidecar::db::Target;

const DBNAME: &str = "herald_bench_journey";
const WORKSPACE: &str = "bench";
/// Events per track_many call.
const TRACK_BATCH: usize = 1_000;
/// The daemon's settings: executor concurrency and SMTP connections.
const CONCURRENCY: usize = 128;
const SMTP_POOL: usize = 32;
const GOAL_CONTACTS_PER_MIN: f64 = 150_000.0;
const GOAL_SEND_RATIO: f64 = 0.8;
const GOAL_RATE: &str = "journey >= 150,000 contacts/min (never analysed)";
const GOAL_RATIO: &str = "journey emails/s >= 0.8x send() emails/s (never analysed)";
/// What the server-time breakdown groups statements by (a LIKE pattern on pg_stat_statements.query).
const STATEMENTS: [(&str, &str); 5] = [
    ("tick", "%herald.tick(%"),
    ("claim", "%herald.claim(%"),
    ("complete", "%herald.complete(%"),
    ("track_many", "%herald.track_many(%"),
    ("advance_results", "%herald.advance_results(%"),
];

#[derive(Debug, Serialize)]
pub struct Round {
    pub statistics: &'static str,
    pub contacts: usize,
    pub emails: i64,
    pub secs: f64,
    pub contacts_per_min: f64,
    pub emails_per_sec: f64,
    /// Server time by statement during the round: name → (calls, total ms). Empty without
    /// pg_stat_statements.
    pub server_ms: BTreeMap<String, (i64, f64)>,
}

#[derive(Debug, Serialize)]
pub struct Journey {
    pub contacts: usize,
    pub concurrency: usize,
    pub smtp_pool: usize,
    pub fresh: Option<Round>,
    pub analysed: Option<Round>,
    /// Transactional send() of `contacts` emails through the same daemon and sink: (secs, emails/s).
    pub send_secs: f64,
    pub send_per_sec: f64,
    /// fresh journey emails/s over send() emails/s.
    pub ratio: f64,
    pub skipped: Option<String>,
}

impl Journey {
    pub(super) fn goals(&self) -> Vec<Goal> {
        let Some(fresh) = &self.fresh else {
            return Vec::new();
        };
        vec![
            Goal::new(
                GOAL_RATE,
                fresh.contacts_per_min,
                fresh.contacts_per_min >= GOAL_CONTACTS_PER_MIN,
            ),
            Goal::new(GOAL_RATIO, self.ratio, self.ratio >= GOAL_SEND_RATIO),
        ]
    }
}

pub async fn run(target: &Target, small: bool) -> Result<Journey> {
    let contacts = if small { 2_000 } else { 50_000 };
    let timeout = Duration::from_secs(if small { 60 } else { 600 });
    let mut out = Journey {
        contacts,
        concurrency: CONCURRENCY,
        smtp_pool: SMTP_POOL,
        fresh: None,
        analysed: None,
        send_secs: 0.0,
        send_per_sec: 0.0,
        ratio: 0.0,
        skipped: None,
    };
    let Some(sink_bin) = find_tool("smtp-sink") else {
        out.skipped = Some("postfix's smtp-sink not found (apt-get install postfix)".into());
        return Ok(out);
    };
    let target = target.with_dbname(DBNAME);
    let mut db = target.recreate_with_extension().await?;
    setup(&db).await?;
    if let Ok(ms) = std::env::var("HERALD_BENCH_AUTO_EXPLAIN_MS") {
        db.batch_execute(&format!(
            "ALTER DATABASE {DBNAME} SET session_preload_libraries = 'auto_explain';
             ALTER DATABASE {DBNAME} SET auto_explain.log_min_duration = '{ms}ms';
             ALTER DATABASE {DBNAME} SET auto_explain.log_nested_statements = on;
             ALTER DATABASE {DBNAME} SET auto_explain.log_analyze = on;
             ALTER DATABASE {DBNAME} SET auto_explain.log_timing = off;"
        ))
        .await?;
        db = target.connect().await?;
    }
    let statements = db
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
        .is_ok();
    let (sink, addr) = start_sink(&sink_bin).await?;
    let daemon = Daemon::start(
        &target,
        &[
            ("HERALD_WORKER_ID", "bench-journey".to_string()),
            ("HERALD_CONCURRENCY", CONCURRENCY.to_string()),
            (
                "HERALD_SMTP_URL_DEFAULT",
                format!("smtp://{addr}?tls=none&pool={SMTP_POOL}"),
            ),
        ],
    )?;
    // the daemon's first connections and listeners
    tokio::time::sleep(Duration::from_secs(1)).await;

    info!("journey: {contacts} contacts, tables never analysed");
    let fresh = round(
        &db,
        &daemon,
        "never analysed",
        0,
        contacts,
        statements,
        timeout,
    )
    .await?;
    db.batch_execute("VACUUM ANALYZE").await?;
    info!("journey: {contacts} more contacts after VACUUM ANALYZE");
    let analysed = round(
        &db,
        &daemon,
        "after VACUUM ANALYZE",
        contacts,
        contacts,
        statements,
        timeout,
    )
    .await?;

    // the baseline: transactional email through the same daemon and sink; timed from the commit that
    // makes the jobs visible, as the daemon sees them only then
    let before = done_emails(&db).await?;
    db.execute(
        "SELECT count(herald.send($1, 'c' || g || '@example.com', 'welcome')) FROM generate_series(0, $2::int - 1) g",
        &[&WORKSPACE, &(contacts as i32)],
    )
    .await
    .context("queueing the send() emails")?;
    let started = Instant::now();
    while done_emails(&db).await? < before + contacts as i64 {
        check(&daemon, started, timeout, "send()")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out.send_secs = started.elapsed().as_secs_f64();
    out.send_per_sec = contacts as f64 / out.send_secs;
    daemon.stop().await?;
    drop(sink);
    out.ratio = fresh.emails_per_sec / out.send_per_sec;
    info!(
        "journey: {:.0} contacts/min never analysed, {:.0} after VACUUM ANALYZE; send() {:.0} emails/s",
        fresh.contacts_per_min, analysed.contacts_per_min, out.send_per_sec
    );
    out.fresh = Some(fresh);
    out.analysed = Some(analysed);
    drop(db);
    let admin = target.with_dbname("postgres").connect().await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)"))
        .await?;
    Ok(out)
}

async fn setup(db: &Client) -> Result<()> {
    // autovacuum must not analyse the tables behind the benchmark's back during the first round
    crate::autovacuum::off(db).await?;
    db.execute("SELECT herald.create_workspace($1)", &[&WORKSPACE])
        .await?;
    db.execute(
        "SELECT herald.upsert_template($1, 'welcome', 'Hi {{ contact.email }}', '<p>Welcome</p>')",
        &[&WORKSPACE],
    )
    .await?;
    db.execute(
        "SELECT herald.upsert_template($1, 'pro', 'Pro tips', '<p>Pro</p>')",
        &[&WORKSPACE],
    )
    .await?;
    let definition = json!({
        "name": "journey", "trigger": {"event": "signup"}, "start": "hello",
        "nodes": {
            "hello": {"type": "email", "template": "welcome", "next": "plan"},
            "plan": {"type": "branch",
                     "paths": [{"when": {"field": "event.plan", "op": "eq", "value": "pro"}, "next": "tips"}],
                     "default": "done"},
            "tips": {"type": "email", "template": "pro", "next": "done"},
            "done": {"type": "exit"}}});
    db.execute(
        "SELECT herald.set_automation_status(herald.create_automation($1, $2), 'live')",
        &[&WORKSPACE, &definition],
    )
    .await
    .context("creating the journey")?;
    Ok(())
}

/// Tracks `contacts` new contacts (numbered from `first`) in batches and waits until all of their
/// enrollments have completed.
async fn round(
    db: &Client,
    daemon: &Daemon,
    statistics: &'static str,
    first: usize,
    contacts: usize,
    statements: bool,
    timeout: Duration,
) -> Result<Round> {
    let completed_before = completed(db).await?;
    let emails_before = done_emails(db).await?;
    let server_before = server_ms(db, statements).await;
    let track = db
        .prepare("SELECT herald.track_many($1, $2::jsonb)")
        .await?;
    let started = Instant::now();
    for from in (first..first + contacts).step_by(TRACK_BATCH) {
        let events: Vec<Value> = (from..(from + TRACK_BATCH).min(first + contacts))
            .map(|g| {
                json!({"email": format!("c{g}@example.com"), "kind": "signup",
                       "payload": {"plan": if g % 2 == 0 { "pro" } else { "free" }}})
            })
            .collect();
        db.execute(&track, &[&WORKSPACE, &Value::Array(events)])
            .await
            .context("track_many")?;
    }
    while completed(db).await? < completed_before + contacts as i64 {
        check(daemon, started, timeout, "the journey")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let emails = done_emails(db).await? - emails_before;
    let after = server_ms(db, statements).await;
    let server_ms = after
        .into_iter()
        .map(|(k, (calls, ms))| {
            let (c0, m0) = server_before.get(&k).copied().unwrap_or_default();
            (k, (calls - c0, ms - m0))
        })
        .collect();
    Ok(Round {
        statistics,
        contacts,
        emails,
        secs,
        contacts_per_min: contacts as f64 / secs * 60.0,
        emails_per_sec: emails as f64 / secs,
        server_ms,
    })
}

fn check(daemon: &Daemon, started: Instant, timeout: Duration, what: &str) -> Result<()> {
    if daemon.exited() {
        bail!("herald run stopped on its own during {what}");
    }
    if started.elapsed() > timeout {
        bail!("{what} did not finish within {} s", timeout.as_secs());
    }
    Ok(())
}

async fn completed(db: &Client) -> Result<i64> {
    Ok(db
        .query_one(
            "SELECT count(*) FROM herald.enrollments WHERE status = 'completed'",
            &[],
        )
        .await?
        .get(0))
}

async fn done_emails(db: &Client) -> Result<i64> {
    Ok(db
        .query_one(
            "SELECT count(*) FROM herald.outbox WHERE status = 'done'",
            &[],
        )
        .await?
        .get(0))
}

/// Cumulative server time per statement group; empty without pg_stat_statements.
async fn server_ms(db: &Client, statements: bool) -> BTreeMap<String, (i64, f64)> {
    let mut out = BTreeMap::new();
    if !statements {
        return out;
    }
    for (name, pattern) in STATEMENTS {
        // top-level calls only (toplevel exists from PostgreSQL 14 on)
        let row = db
            .query_one(
                "SELECT coalesce(sum(calls), 0)::int8, coalesce(sum(total_exec_time), 0)::float8
                   FROM pg_stat_statements
                  WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND toplevel AND query LIKE $1",
                &[&pattern],
            )
            .await;
        if let Ok(row) = row {
            out.insert(name.to_string(), (row.get(0), row.get(1)));
        }
    }
    out
}

pub(super) fn render(o: &mut String, j: &Journey, goals: &[Goal]) {
    let verdict = |g: &str| goals.iter().find(|x| x.goal == g).map_or("", Goal::verdict);
    let _ = writeln!(
        o,
        "\n11. Journey end to end: {} contacts by track_many (batches of {TRACK_BATCH}) into email → branch on plan → \
         email (pro, half) → exit; herald run (concurrency {}, SMTP pool {}) into smtp-sink",
        thousands(j.contacts as f64),
        j.concurrency,
        j.smtp_pool
    );
    if let Some(why) = &j.skipped {
        let _ = writeln!(o, "  skipped: {why}");
        return;
    }
    for r in [&j.fresh, &j.analysed].into_iter().flatten() {
        let _ = writeln!(
            o,
            "  {:<22} {:>9} contacts/min  {:>6} emails/s  ({} emails in {:.1} s)",
            r.statistics,
            thousands(r.contacts_per_min),
            thousands(r.emails_per_sec),
            thousands(r.emails as f64),
            r.secs
        );
        if !r.server_ms.is_empty() {
            let parts: Vec<String> = r
                .server_ms
                .iter()
                .filter(|(_, (calls, _))| *calls > 0)
                .map(|(k, (calls, ms))| {
                    format!(
                        "{k} {:.1} s ({calls} calls, {:.1} ms each)",
                        ms / 1000.0,
                        ms / *calls as f64
                    )
                })
                .collect();
            let _ = writeln!(o, "    server time: {}", parts.join(", "));
        }
    }
    let _ = writeln!(
        o,
        "  send() baseline, same daemon and sink: {} emails/s ({} in {:.1} s)",
        thousands(j.send_per_sec),
        thousands(j.contacts as f64),
        j.send_secs
    );
    let _ = writeln!(
        o,
        "  goal: {GOAL_RATE}: {}\n  goal: {GOAL_RATIO}: {:.2}x {}",
        verdict(GOAL_RATE),
        j.ratio,
        verdict(GOAL_RATIO)
    );
}

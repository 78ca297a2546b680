//! Soak (issue 14 §2): does herald hold steady under a long mixed load? `herald-bench --only soak`
//! (never part of a full run or of `make test`: it lasts `--soak-minutes`, 30 by default).
//!
//! In a database of its own (`herald_bench_soak`, autovacuum as the server has it), the `herald` binary
//! runs as a child process (`soak/daemon.rs`) delivering into postfix's `smtp-sink` and the delivery
//! section's HTTP receiver, while `soak/load.rs` offers a steady load, paced by the clock:
//!   - signup events by `track_many` into a live journey: email → delay 20 s (the enrollment waits and
//!     is ticked again) → branch on the event's plan → pro (1 in 5): webhook; else: a second email →
//!     exit. 1.8 emails and 0.2 webhooks per event: `--soak-emails-per-sec` (3,000) / 1.8 events/s;
//!   - one `track()` every 50 ms (timed: the track() latency);
//!   - one `claim(100)` every 200 ms in a rolled-back transaction (timed: the claim latency; the jobs
//!     it took are kept too, to tell a claim that found work from one that found none);
//!   - at half time, a broadcast to every contact.
//!
//! Every sampling interval (run/60, between 5 and 30 s) `soak/sample.rs` reads the size, live and
//! dead tuples of each herald table and index, the daemon's counters (/metrics) and the server time of
//! its claim()/complete() calls. At the end, the verdicts (PASS/MISS, never a failure):
//!   - sizes: bytes added per job delivered, last third ≤ 1.2× the first third. Within 30 minutes
//!     nothing is old enough for `prune` (its minimum age is an hour; the daemon calls it hourly with
//!     30 days), so every event, finished job and history row is kept and the tables must grow with
//!     the work done; what must not grow is the cost per unit of work (bloat, dead space not reused).
//!   - dead tuples: per table, the peak of the last third is within 1.5× the first third's peak, or
//!     within 25% of the table's rows (autovacuum's trigger is 20% of a table's rows: dead tuples of a
//!     table that grows may grow with it), or the table did not grow in the last third (a staging
//!     queue such as results_staged has few live rows and dead ones up to what arrives between two
//!     autovacuum rounds; when its size stays put, that space is being reused, which is what matters);
//!   - claim and track() p99 over the last sixth of the run (5 minutes of 30) within 1.5× the first;
//!   - no ERROR line in the daemon's log; the backlog at the end under 5 s of the offered work.
//!
//! The curve goes to target/soak/soak.json and target/soak/soak.png, the daemon's log to
//! target/soak/daemon.log.

mod chart;
mod cost;
pub(crate) mod daemon;
mod load;
mod sample;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::Client;
use tracing::{info, warn};

use super::delivery::receiver::Receiver;
use super::delivery::{find_tool, start_sink};
use super::stats::Summary;
use super::{thousands, Goal};
use herald_sidecar::db::Target;
use sample::{Counters, Table};

const DBNAME: &str = "herald_bench_soak";
pub const WORKSPACE: &str = "soak";
/// Contacts the events cycle through; the broadcast goes to all of them.
pub const CONTACTS: usize = 30_000;
/// Emails and webhooks per signup event (see the journey above).
const EMAILS_PER_EVENT: f64 = 1.0 + (load::PRO - 1) as f64 / load::PRO as f64;
const WEBHOOKS_PER_EVENT: f64 = 1.0 / load::PRO as f64;
const CONCURRENCY: usize = 128;
const SMTP_POOL: usize = 32;
const OUT_DIR: &str = "target/soak";

pub const GOAL_SIZES: &str = "soak: bytes per job, last third <= 1.2x first third";
pub const GOAL_DEAD: &str = "soak: dead tuples bounded (every table)";
pub const GOAL_CLAIM: &str = "soak: claim p99, last window <= 1.5x first";
pub const GOAL_TRACK: &str = "soak: track() p99, last window <= 1.5x first";
pub const GOAL_ERRORS: &str = "soak: no ERROR in the daemon's log";
pub const GOAL_BACKLOG: &str = "soak: backlog at the end < 5 s of the offered jobs";

/// What the run is asked for.
pub struct Settings {
    pub minutes: f64,
    pub emails_per_sec: f64,
}

/// One sampling interval's rates and latencies.
#[derive(Debug, Clone, Serialize)]
pub struct Interval {
    pub secs: f64,
    pub events_per_sec: f64,
    pub emails_per_sec: f64,
    pub webhooks_per_sec: f64,
    pub claim: Summary,
    pub track: Summary,
    pub track_many: Summary,
    /// Server time per call of the daemon's own claim()/complete() (pg_stat_statements).
    pub daemon_claim_mean_ms: Option<f64>,
    pub daemon_complete_mean_ms: Option<f64>,
    /// CPU per job delivered in the interval: the daemon process, the database's backends.
    pub daemon_cpu_us_per_job: Option<f64>,
    pub server_cpu_us_per_job: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub secs: f64,
    pub load_average: f64,
    pub tables: BTreeMap<String, Table>,
    pub indexes: BTreeMap<String, i64>,
    pub counters: Counters,
    /// CPU seconds since the load started: the daemon process, the database's backends.
    pub daemon_cpu_secs: f64,
    pub server_cpu_secs: f64,
    pub events: u64,
    pub log_errors: usize,
    pub log_warnings: usize,
    /// Since the previous point (None for the first, taken before the load starts).
    pub interval: Option<Interval>,
}

/// The claim probes of a window split by what they found: a claim that takes 100 jobs does ~100×
/// the work of one that finds none, so a window in which the daemon more often lags behind has a
/// higher p99 with no claim getting slower. The goal stays on all probes; this says which it was.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClaimSplit {
    /// Probes that found no job.
    pub empty: Summary,
    /// Probes that took at least one job.
    pub working: Summary,
    /// Share of the probes that took jobs.
    pub working_share: f64,
    /// Median of (duration / jobs taken) over the working probes, µs.
    pub median_us_per_job: f64,
}

impl ClaimSplit {
    fn of(calls: &[(Duration, u32)]) -> Self {
        let (working, empty): (Vec<_>, Vec<_>) = calls.iter().partition(|(_, n)| *n > 0);
        let mut per_job: Vec<f64> = working
            .iter()
            .map(|(d, n)| d.as_secs_f64() * 1e6 / f64::from(*n))
            .collect();
        per_job.sort_by(f64::total_cmp);
        Self {
            empty: Summary::of(&empty.iter().map(|(d, _)| *d).collect::<Vec<_>>()),
            working: Summary::of(&working.iter().map(|(d, _)| *d).collect::<Vec<_>>()),
            working_share: working.len() as f64 / calls.len().max(1) as f64,
            median_us_per_job: per_job.get(per_job.len() / 2).copied().unwrap_or(0.0),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TableGrowth {
    pub table: String,
    pub first_third_mib: f64,
    pub last_third_mib: f64,
    pub final_mib: f64,
    pub dead_peak_first_third: i64,
    pub dead_peak_last_third: i64,
    pub rows_at_peak: i64,
    pub dead_bounded: bool,
}

#[derive(Debug, Serialize)]
pub struct Soak {
    pub minutes: f64,
    pub sample_every_secs: f64,
    pub window_secs: f64,
    pub offered_emails_per_sec: f64,
    pub offered_events_per_sec: f64,
    pub contacts: usize,
    pub broadcast_at_secs: Option<f64>,
    pub events: u64,
    pub emails: f64,
    pub webhooks: f64,
    pub emails_per_sec: f64,
    pub webhooks_per_sec: f64,
    pub bytes_per_job_first_third: f64,
    pub bytes_per_job_last_third: f64,
    pub size_ratio: f64,
    pub tables: Vec<TableGrowth>,
    pub claim_first: Summary,
    pub claim_last: Summary,
    pub claim_ratio: f64,
    pub claim_split_first: ClaimSplit,
    pub claim_split_last: ClaimSplit,
    pub track_first: Summary,
    pub track_last: Summary,
    pub track_ratio: f64,
    pub log_errors: usize,
    pub log_warnings: usize,
    pub first_errors: Vec<String>,
    pub client_errors: u64,
    pub backlog_at_end: f64,
    /// CPU per job delivered over the run: the daemon process, the database's backends.
    pub daemon_cpu_us_per_job: f64,
    pub server_cpu_us_per_job: f64,
    /// Where the server's time went (pg_stat_statements, the load's statements only).
    pub statements: Vec<cost::StatementCost>,
    pub load_average_mean: f64,
    pub autovacuum: BTreeMap<String, String>,
    pub json: String,
    pub png: Option<String>,
    pub skipped: Option<String>,
}

impl Soak {
    pub(super) fn goals(&self) -> Vec<Goal> {
        if self.skipped.is_some() {
            return Vec::new();
        }
        let offered_jobs = self.offered_events_per_sec * (EMAILS_PER_EVENT + WEBHOOKS_PER_EVENT);
        vec![
            Goal::new(GOAL_SIZES, self.size_ratio, self.size_ratio <= 1.2),
            Goal::new(
                GOAL_DEAD,
                self.tables.iter().filter(|t| !t.dead_bounded).count() as f64,
                self.tables.iter().all(|t| t.dead_bounded),
            ),
            Goal::new(GOAL_CLAIM, self.claim_ratio, self.claim_ratio <= 1.5),
            Goal::new(GOAL_TRACK, self.track_ratio, self.track_ratio <= 1.5),
            Goal::new(GOAL_ERRORS, self.log_errors as f64, self.log_errors == 0),
            Goal::new(
                GOAL_BACKLOG,
                self.backlog_at_end,
                self.backlog_at_end < 5.0 * offered_jobs,
            ),
        ]
    }
}

pub async fn run(target: &Target, settings: &Settings) -> Result<Soak> {
    let total = Duration::from_secs_f64((settings.minutes * 60.0).max(30.0));
    let every = Duration::from_secs_f64((total.as_secs_f64() / 60.0).clamp(5.0, 30.0));
    let events_per_sec = settings.emails_per_sec / EMAILS_PER_EVENT;
    let mut out = empty(settings, total, every, events_per_sec);
    let Some(sink_bin) = find_tool("smtp-sink") else {
        out.skipped = Some("postfix's smtp-sink not found (apt-get install postfix)".into());
        return Ok(out);
    };
    let dir = PathBuf::from(OUT_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {OUT_DIR}"))?;

    let target = target.with_dbname(DBNAME);
    let db = target.recreate_with_extension().await?;
    if db
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
        .is_err()
    {
        info!("soak: pg_stat_statements unavailable: no server time of the daemon's calls");
    }
    out.autovacuum = autovacuum_settings(&db).await?;
    if out.autovacuum.get("autovacuum").map(String::as_str) != Some("on") {
        warn!("soak: autovacuum is off on this server; production runs with it on");
    }
    let receiver = Receiver::start().await?;
    setup(&db, &format!("http://{}/hook", receiver.addr)).await?;
    let (sink, smtp) = start_sink(&sink_bin).await?;
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let log = dir.join("daemon.log");
    let mut daemon = daemon::Daemon::start(
        target.config(),
        &log,
        &[
            ("HERALD_WORKER_ID", "bench-soak".to_string()),
            ("HERALD_CONCURRENCY", CONCURRENCY.to_string()),
            (
                "HERALD_SMTP_URL_DEFAULT",
                format!("smtp://{smtp}?tls=none&pool={SMTP_POOL}"),
            ),
            ("HERALD_FROM", "Soak <soak@example.com>".to_string()),
            ("HERALD_WEBHOOK_ALLOW", "127.0.0.1".to_string()),
            ("HERALD_WEBHOOK_SECRET", "bench-secret".to_string()),
            ("HERALD_METRICS_ADDR", metrics.to_string()),
            ("HERALD_SHUTDOWN_GRACE_SECONDS", "5".to_string()),
        ],
    )?;
    wait_for_metrics(&mut daemon, metrics).await?;
    info!(
        "soak: {:.0} min, {:.0} events/s offered (~{:.0} emails/s, {:.0} webhooks/s), a sample every {:.0} s; \
         herald run's log: {}",
        total.as_secs_f64() / 60.0,
        events_per_sec,
        settings.emails_per_sec,
        events_per_sec * WEBHOOKS_PER_EVENT,
        every.as_secs_f64(),
        log.display()
    );

    let mut points = vec![point(&db, metrics, &log, 0.0, 0, None).await?];
    // the statements of the set-up are not the load's
    let _ = db
        .batch_execute(
            "SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database WHERE datname = current_database()), 0)",
        )
        .await;
    let mut cpu = cost::CpuMeter::start(&db, daemon.pid()).await;
    let load = load::Load::start(&target, events_per_sec).await?;
    let mut broadcast_at = None;
    let mut next = Instant::now() + every;
    let mut outcome = Ok(());
    loop {
        tokio::time::sleep_until(next.into()).await;
        next += every;
        let secs = load.secs();
        let prev = points.last().expect("the first point");
        let counters = sample::counters(&db, metrics).await;
        cpu.sample(&db).await;
        let events = load.events.load(std::sync::atomic::Ordering::Relaxed);
        let interval = interval(prev, secs, &counters, &cpu, events, &load);
        let mut p = point(&db, metrics, &log, secs, events, Some(interval)).await?;
        (p.daemon_cpu_secs, p.server_cpu_secs) = (cpu.daemon_secs, cpu.server_secs);
        points.push(p);
        let p = points.last().expect("just pushed");
        let i = p.interval.as_ref().expect("an interval");
        info!(
            "soak {:>5.1} min: {:>5.0} emails/s {:>4.0} webhooks/s {:>5.0} events/s, pending {:>6.0}; claim p99 {:>6.1} ms, \
             track() p99 {:>5.1} ms; herald {:>6.0} MiB; log errors {}; load {:.1}",
            secs / 60.0,
            i.emails_per_sec,
            i.webhooks_per_sec,
            i.events_per_sec,
            p.counters.pending.unwrap_or(f64::NAN),
            i.claim.p99_ms,
            i.track.p99_ms,
            p.tables.values().map(|t| t.total_bytes).sum::<i64>() as f64 / 1048576.0,
            p.log_errors,
            p.load_average
        );
        if daemon.exited() {
            outcome = Err(anyhow::anyhow!(
                "herald run stopped on its own (see {})",
                log.display()
            ));
            break;
        }
        if broadcast_at.is_none() && secs >= total.as_secs_f64() / 2.0 {
            broadcast(&db).await?;
            broadcast_at = Some(load.secs());
            info!("soak: broadcast to {CONTACTS} contacts started");
        }
        if secs + every.as_secs_f64() / 2.0 >= total.as_secs_f64() {
            break;
        }
    }
    let client_errors = [&load.ingest, &load.track, &load.claim]
        .iter()
        .map(|s| s.errors.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let windows = (
        total.as_secs_f64() / 6.0,
        load.secs() - total.as_secs_f64() / 6.0,
    );
    let claim_first = Summary::of(&load.claim.between(0.0, windows.0));
    let claim_last = Summary::of(&load.claim.between(windows.1, f64::MAX));
    let claim_split_first = ClaimSplit::of(&load.claim.items_between(0.0, windows.0));
    let claim_split_last = ClaimSplit::of(&load.claim.items_between(windows.1, f64::MAX));
    let track_first = Summary::of(&load.track.between(0.0, windows.0));
    let track_last = Summary::of(&load.track.between(windows.1, f64::MAX));
    // counted here rather than taken from /metrics, whose queue depth is missing when its read is slow
    let backlog = db
        .query_one(
            "SELECT count(*)::float8 FROM herald.outbox WHERE status = 'pending' AND run_at <= now()",
            &[],
        )
        .await?
        .get(0);
    load.stop().await;
    let stopped = daemon.stop(Duration::from_secs(20)).await;
    drop(sink);
    drop(receiver);
    outcome?;
    stopped?;

    let statements = cost::top_statements(&db).await;
    let (log_errors, log_warnings, first_errors) = daemon::log_levels(&log);
    verdicts(&mut out, &points);
    out.statements = statements;
    out.backlog_at_end = backlog;
    out.broadcast_at_secs = broadcast_at;
    out.claim_first = claim_first;
    out.claim_last = claim_last;
    out.claim_ratio = ratio(claim_last.p99_ms, claim_first.p99_ms);
    out.claim_split_first = claim_split_first;
    out.claim_split_last = claim_split_last;
    out.track_first = track_first;
    out.track_last = track_last;
    out.track_ratio = ratio(track_last.p99_ms, track_first.p99_ms);
    out.log_errors = log_errors;
    out.log_warnings = log_warnings;
    out.first_errors = first_errors;
    out.client_errors = client_errors;

    let json_path = dir.join("soak.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&json!({"summary": &out, "points": &points}))? + "\n",
    )
    .with_context(|| format!("writing {}", json_path.display()))?;
    out.json = json_path.display().to_string();
    let png = dir.join("soak.png");
    let top = |key: fn(&TableGrowth) -> f64| -> Vec<String> {
        let mut t: Vec<&TableGrowth> = out.tables.iter().collect();
        t.sort_by(|a, b| key(b).total_cmp(&key(a)));
        t.into_iter().take(5).map(|t| t.table.clone()).collect()
    };
    let (by_size, by_dead) = (
        top(|t| t.final_mib),
        top(|t| t.dead_peak_first_third.max(t.dead_peak_last_third) as f64),
    );
    match chart::draw(
        &png,
        &points,
        &by_size,
        &by_dead,
        broadcast_at.map(|s| s / 60.0),
    ) {
        Ok(()) => out.png = Some(png.display().to_string()),
        Err(e) => warn!("soak: no chart: {e:#}"),
    }
    drop(db);
    let admin = target.with_dbname("postgres").connect().await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)"))
        .await?;
    Ok(out)
}

fn empty(settings: &Settings, total: Duration, every: Duration, events_per_sec: f64) -> Soak {
    Soak {
        minutes: total.as_secs_f64() / 60.0,
        sample_every_secs: every.as_secs_f64(),
        window_secs: total.as_secs_f64() / 6.0,
        offered_emails_per_sec: settings.emails_per_sec,
        offered_events_per_sec: events_per_sec,
        contacts: CONTACTS,
        broadcast_at_secs: None,
        events: 0,
        emails: 0.0,
        webhooks: 0.0,
        emails_per_sec: 0.0,
        webhooks_per_sec: 0.0,
        bytes_per_job_first_third: 0.0,
        bytes_per_job_last_third: 0.0,
        size_ratio: 0.0,
        tables: Vec::new(),
        claim_first: Summary::default(),
        claim_last: Summary::default(),
        claim_ratio: 0.0,
        claim_split_first: ClaimSplit::default(),
        claim_split_last: ClaimSplit::default(),
        track_first: Summary::default(),
        track_last: Summary::default(),
        track_ratio: 0.0,
        log_errors: 0,
        log_warnings: 0,
        first_errors: Vec::new(),
        client_errors: 0,
        backlog_at_end: 0.0,
        daemon_cpu_us_per_job: 0.0,
        server_cpu_us_per_job: 0.0,
        statements: Vec::new(),
        load_average_mean: 0.0,
        autovacuum: BTreeMap::new(),
        json: String::new(),
        png: None,
        skipped: None,
    }
}

fn ratio(last: f64, first: f64) -> f64 {
    if first > 0.0 {
        last / first
    } else {
        0.0
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn autovacuum_settings(db: &Client) -> Result<BTreeMap<String, String>> {
    let rows = db
        .query(
            "SELECT name, setting FROM pg_settings
              WHERE name IN ('autovacuum', 'autovacuum_naptime', 'autovacuum_vacuum_scale_factor',
                             'autovacuum_vacuum_insert_scale_factor', 'autovacuum_max_workers',
                             'autovacuum_vacuum_cost_limit', 'autovacuum_vacuum_cost_delay')",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn setup(db: &Client, hook: &str) -> Result<()> {
    db.execute("SELECT herald.create_workspace($1)", &[&WORKSPACE])
        .await?;
    for (name, subject) in [
        ("welcome", "Welcome {{ contact.email }}"),
        ("followup", "Still there, {{ contact.email }}?"),
        ("news", "News for {{ contact.email }}"),
    ] {
        db.execute(
            "SELECT herald.upsert_template($1, $2, $3, '<p>Hello {{ contact.email }}</p>', 'Hello {{ contact.email }}')",
            &[&WORKSPACE, &name, &subject],
        )
        .await
        .with_context(|| format!("template {name}"))?;
    }
    for from in (0..CONTACTS).step_by(10_000) {
        let contacts: Value = (from..(from + 10_000).min(CONTACTS))
            .map(|i| json!({"email": format!("s{i}@soak.example")}))
            .collect::<Vec<_>>()
            .into();
        db.execute(
            "SELECT inserted FROM herald.upsert_contacts($1, $2)",
            &[&WORKSPACE, &contacts],
        )
        .await
        .context("contacts")?;
    }
    let journey = json!({
        "name": "soak", "trigger": {"event": "signup"}, "reentry": "always", "start": "hello",
        "nodes": {
            "hello": {"type": "email", "template": "welcome", "next": "wait"},
            "wait": {"type": "delay", "duration": "20s", "next": "plan"},
            "plan": {"type": "branch",
                     "paths": [{"when": {"field": "event.plan", "op": "eq", "value": "pro"}, "next": "crm"}],
                     "default": "again"},
            "crm": {"type": "webhook", "url": hook, "method": "POST", "timeout_ms": 5000, "next": "done"},
            "again": {"type": "email", "template": "followup", "next": "done"},
            "done": {"type": "exit"}}});
    db.execute(
        "SELECT herald.set_automation_status(herald.create_automation($1, $2), 'live')",
        &[&WORKSPACE, &journey],
    )
    .await
    .context("creating the journey")?;
    Ok(())
}

async fn broadcast(db: &Client) -> Result<()> {
    let id: i64 = db
        .query_one(
            "SELECT herald.create_broadcast($1, $2)",
            &[
                &WORKSPACE,
                &json!({"name": "soak news", "audience": "all", "template": "news"}),
            ],
        )
        .await
        .context("create_broadcast")?
        .get(0);
    db.execute("SELECT herald.schedule_broadcast($1)", &[&id])
        .await
        .context("schedule_broadcast")?;
    Ok(())
}

async fn wait_for_metrics(daemon: &mut daemon::Daemon, metrics: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(metrics).await.is_ok() {
            // the first connections and listeners
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Ok(());
        }
        if daemon.exited() || Instant::now() > deadline {
            let (_, _, errors) = daemon::log_levels(&daemon.log);
            bail!(
                "herald run did not come up ({}): {}",
                daemon.log.display(),
                errors.join(" | ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn point(
    db: &Client,
    metrics: SocketAddr,
    log: &std::path::Path,
    secs: f64,
    events: u64,
    interval: Option<Interval>,
) -> Result<Point> {
    let (log_errors, log_warnings, _) = daemon::log_levels(log);
    Ok(Point {
        secs,
        load_average: sample::load_average(),
        tables: sample::tables(db).await?,
        indexes: sample::indexes(db).await?,
        counters: sample::counters(db, metrics).await,
        daemon_cpu_secs: 0.0,
        server_cpu_secs: 0.0,
        events,
        log_errors,
        log_warnings,
        interval,
    })
}

fn interval(
    prev: &Point,
    secs: f64,
    c: &Counters,
    cpu: &cost::CpuMeter,
    events: u64,
    load: &load::Load,
) -> Interval {
    let dt = (secs - prev.secs).max(1e-3);
    let p = &prev.counters;
    let mean = |calls: i64, ms: f64| (calls > 0).then(|| ms / calls as f64);
    let delivered = c.emails_sent + c.webhooks_sent - p.emails_sent - p.webhooks_sent;
    let per_job = |secs: f64| (delivered > 0.0).then(|| secs * 1e6 / delivered);
    Interval {
        secs: dt,
        events_per_sec: (events - prev.events) as f64 / dt,
        emails_per_sec: (c.emails_sent - p.emails_sent) / dt,
        webhooks_per_sec: (c.webhooks_sent - p.webhooks_sent) / dt,
        claim: Summary::of(&load.claim.between(prev.secs, secs)),
        track: Summary::of(&load.track.between(prev.secs, secs)),
        track_many: Summary::of(&load.ingest.between(prev.secs, secs)),
        daemon_claim_mean_ms: mean(c.claim_calls - p.claim_calls, c.claim_ms - p.claim_ms),
        daemon_complete_mean_ms: mean(
            c.complete_calls - p.complete_calls,
            c.complete_ms - p.complete_ms,
        ),
        daemon_cpu_us_per_job: per_job(cpu.daemon_secs - prev.daemon_cpu_secs),
        server_cpu_us_per_job: per_job(cpu.server_secs - prev.server_cpu_secs),
    }
}

/// The point closest to `secs`.
fn at(points: &[Point], secs: f64) -> &Point {
    points
        .iter()
        .min_by(|a, b| (a.secs - secs).abs().total_cmp(&(b.secs - secs).abs()))
        .expect("points")
}

fn jobs(p: &Point) -> f64 {
    p.counters.emails_sent + p.counters.webhooks_sent
}

fn size(p: &Point) -> i64 {
    p.tables.values().map(|t| t.total_bytes).sum()
}

/// Sizes per job by thirds, dead tuples per table, throughput and the backlog at the end.
fn verdicts(out: &mut Soak, points: &[Point]) {
    let (first, last) = (&points[0], points.last().expect("points"));
    let end = last.secs;
    let (a, b) = (at(points, end / 3.0), at(points, 2.0 * end / 3.0));
    let per_job = |from: &Point, to: &Point| {
        (size(to) - size(from)) as f64 / (jobs(to) - jobs(from)).max(1.0)
    };
    out.bytes_per_job_first_third = per_job(first, a);
    out.bytes_per_job_last_third = per_job(b, last);
    out.size_ratio = ratio(out.bytes_per_job_last_third, out.bytes_per_job_first_third);
    out.events = last.events;
    out.emails = last.counters.emails_sent;
    out.webhooks = last.counters.webhooks_sent;
    out.emails_per_sec = out.emails / end.max(1e-3);
    out.webhooks_per_sec = out.webhooks / end.max(1e-3);
    let delivered = (out.emails + out.webhooks).max(1.0);
    out.daemon_cpu_us_per_job = last.daemon_cpu_secs * 1e6 / delivered;
    out.server_cpu_us_per_job = last.server_cpu_secs * 1e6 / delivered;
    out.load_average_mean =
        points.iter().map(|p| p.load_average).sum::<f64>() / points.len() as f64;
    let mib = |p: &Point, t: &str| p.tables.get(t).map_or(0, |x| x.total_bytes) as f64 / 1048576.0;
    let mut tables: Vec<TableGrowth> = last
        .tables
        .keys()
        .map(|t| {
            let peak = |from: f64, to: f64| {
                points
                    .iter()
                    .filter(|p| p.secs >= from && p.secs <= to)
                    .filter_map(|p| p.tables.get(t))
                    .max_by_key(|x| x.dead)
                    .map_or((0, 0), |x| (x.dead, x.live + x.dead))
            };
            let (dead_first, _) = peak(0.0, end / 3.0);
            let (dead_last, rows) = peak(2.0 * end / 3.0, end);
            let size_kept = mib(last, t) <= 1.02 * mib(b, t) + 1.0;
            let bounded = dead_last as f64 <= 1.5 * dead_first as f64
                || dead_last as f64 <= 0.25 * rows as f64
                || dead_last <= 1_000
                || size_kept;
            TableGrowth {
                table: t.clone(),
                first_third_mib: mib(a, t) - mib(first, t),
                last_third_mib: mib(last, t) - mib(b, t),
                final_mib: mib(last, t),
                dead_peak_first_third: dead_first,
                dead_peak_last_third: dead_last,
                rows_at_peak: rows,
                dead_bounded: bounded,
            }
        })
        .collect();
    tables.sort_by(|x, y| y.final_mib.total_cmp(&x.final_mib));
    out.tables = tables;
}

pub(super) fn render(o: &mut String, s: &Soak, goals: &[Goal]) {
    let verdict = |g: &str| goals.iter().find(|x| x.goal == g).map_or("", Goal::verdict);
    let _ = writeln!(
        o,
        "\nSoak: {:.0} min of steady load into herald run (the binary; concurrency {CONCURRENCY}, SMTP pool {SMTP_POOL}): \
         {} events/s offered by track_many into a live journey (~{} emails/s, {} webhooks/s), track() every 50 ms, \
         claim(100) probed every 200 ms, a broadcast to {} contacts at half time; sampled every {:.0} s",
        s.minutes,
        thousands(s.offered_events_per_sec),
        thousands(s.offered_emails_per_sec),
        thousands(s.offered_events_per_sec * WEBHOOKS_PER_EVENT),
        thousands(s.contacts as f64),
        s.sample_every_secs
    );
    if let Some(why) = &s.skipped {
        let _ = writeln!(o, "  skipped: {why}");
        return;
    }
    let _ = writeln!(
        o,
        "  delivered {} emails ({} /s) and {} webhooks ({} /s) for {} events; load average {:.1} on average",
        thousands(s.emails),
        thousands(s.emails_per_sec),
        thousands(s.webhooks),
        thousands(s.webhooks_per_sec),
        thousands(s.events as f64),
        s.load_average_mean
    );
    let _ = writeln!(
        o,
        "  CPU per job delivered: herald run {:.0} µs, the database's backends {:.0} µs",
        s.daemon_cpu_us_per_job, s.server_cpu_us_per_job
    );
    let _ = writeln!(
        o,
        "  {:<22} | {:>10} | {:>13} | {:>13} | {:>15} | {:>15} | {:>9}",
        "table",
        "final MiB",
        "+MiB 1st 3rd",
        "+MiB last 3rd",
        "dead peak 1st",
        "dead peak last",
        "bounded"
    );
    for t in s.tables.iter().take(10) {
        let _ = writeln!(
            o,
            "  {:<22} | {:>10.1} | {:>13.1} | {:>13.1} | {:>15} | {:>15} | {:>9}",
            t.table,
            t.final_mib,
            t.first_third_mib,
            t.last_third_mib,
            thousands(t.dead_peak_first_third as f64),
            thousands(t.dead_peak_last_third as f64),
            if t.dead_bounded { "yes" } else { "NO" }
        );
    }
    let _ = writeln!(
        o,
        "  bytes added per job delivered: first third {:.0}, last third {:.0} = {:.2}x   goal <= 1.2x: {}",
        s.bytes_per_job_first_third,
        s.bytes_per_job_last_third,
        s.size_ratio,
        verdict(GOAL_SIZES)
    );
    let unbounded: Vec<&str> = s
        .tables
        .iter()
        .filter(|t| !t.dead_bounded)
        .map(|t| t.table.as_str())
        .collect();
    let _ = writeln!(
        o,
        "  dead tuples: last third's peak within 1.5x the first's or under 25% of the rows: {}{}",
        verdict(GOAL_DEAD),
        if unbounded.is_empty() {
            String::new()
        } else {
            format!(" (not: {})", unbounded.join(", "))
        }
    );
    let w = s.window_secs / 60.0;
    for (name, first, last, r, goal) in [
        (
            "claim(100)",
            &s.claim_first,
            &s.claim_last,
            s.claim_ratio,
            GOAL_CLAIM,
        ),
        (
            "track()",
            &s.track_first,
            &s.track_last,
            s.track_ratio,
            GOAL_TRACK,
        ),
    ] {
        let _ = writeln!(
            o,
            "  {name:<10} first {w:.1} min p50 {:>6.2} p99 {:>7.2} ms | last {w:.1} min p50 {:>6.2} p99 {:>7.2} ms = {r:.2}x   goal <= 1.5x: {}",
            first.p50_ms,
            first.p99_ms,
            last.p50_ms,
            last.p99_ms,
            verdict(goal)
        );
    }
    let (f, l) = (&s.claim_split_first, &s.claim_split_last);
    let _ = writeln!(
        o,
        "  claim(100) probes that found no job: p99 {:.2} -> {:.2} ms = {:.2}x; that took jobs: {:.0}% -> {:.0}% of the probes, \
         p99 {:.2} -> {:.2} ms = {:.2}x, median {:.0} -> {:.0} us a job taken = {:.2}x",
        f.empty.p99_ms,
        l.empty.p99_ms,
        ratio(l.empty.p99_ms, f.empty.p99_ms),
        f.working_share * 100.0,
        l.working_share * 100.0,
        f.working.p99_ms,
        l.working.p99_ms,
        ratio(l.working.p99_ms, f.working.p99_ms),
        f.median_us_per_job,
        l.median_us_per_job,
        ratio(l.median_us_per_job, f.median_us_per_job),
    );
    let _ = writeln!(
        o,
        "  daemon log: {} ERROR, {} WARN lines   goal 0 errors: {}{}",
        s.log_errors,
        s.log_warnings,
        verdict(GOAL_ERRORS),
        s.first_errors
            .first()
            .map(|e| format!("\n    first: {e}"))
            .unwrap_or_default()
    );
    if s.client_errors > 0 {
        let _ = writeln!(o, "  load generator: {} failed calls", s.client_errors);
    }
    let _ = writeln!(
        o,
        "  backlog at the end: {} pending jobs   goal < 5 s of the offered jobs: {}",
        thousands(s.backlog_at_end),
        verdict(GOAL_BACKLOG)
    );
    if !s.statements.is_empty() {
        let _ = writeln!(
            o,
            "  server time by statement (pg_stat_statements, the load's):"
        );
        for st in &s.statements {
            let _ = writeln!(
                o,
                "    {:>9.0} ms {:>9} calls {:>10} rows  {}",
                st.total_ms,
                thousands(st.calls as f64),
                thousands(st.rows as f64),
                st.query
            );
        }
    }
    let _ = writeln!(
        o,
        "  curve: {} and {}",
        s.json,
        s.png.as_deref().unwrap_or("(no chart: see the log)")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points every 10 s over 90 s: `jobs` delivered so far, one table with `bytes` and `dead` at each.
    fn points(bytes: impl Fn(f64) -> i64, dead: impl Fn(f64) -> i64) -> Vec<Point> {
        (0..10)
            .map(|i| {
                let secs = i as f64 * 10.0;
                let table = Table {
                    total_bytes: bytes(secs),
                    heap_bytes: 0,
                    index_bytes: 0,
                    live: 100_000,
                    dead: dead(secs),
                    autovacuums: 0,
                    autoanalyzes: 0,
                };
                Point {
                    secs,
                    load_average: 1.0,
                    tables: [("outbox".to_string(), table)].into(),
                    indexes: BTreeMap::new(),
                    counters: Counters {
                        emails_sent: secs * 100.0,
                        ..Counters::default()
                    },
                    daemon_cpu_secs: 0.0,
                    server_cpu_secs: 0.0,
                    events: 0,
                    log_errors: 0,
                    log_warnings: 0,
                    interval: None,
                }
            })
            .collect()
    }

    fn judged(points: &[Point]) -> Soak {
        let settings = Settings {
            minutes: 1.5,
            emails_per_sec: 100.0,
        };
        let mut s = empty(
            &settings,
            Duration::from_secs(90),
            Duration::from_secs(10),
            55.0,
        );
        verdicts(&mut s, points);
        s
    }

    #[test]
    fn steady_growth_with_vacuumed_dead_tuples_passes() {
        // 1,000 bytes per job all along; dead tuples climb and are vacuumed away every 30 s
        let s = judged(&points(
            |t| (t * 100.0 * 1000.0) as i64,
            |t| ((t % 30.0) * 500.0) as i64,
        ));
        assert!((s.size_ratio - 1.0).abs() < 0.01, "{}", s.size_ratio);
        assert!(s.tables[0].dead_bounded);
        assert!(
            s.goals()
                .iter()
                .find(|g| g.goal == GOAL_SIZES)
                .unwrap()
                .pass
        );
    }

    #[test]
    fn a_staging_queue_whose_size_stays_put_is_bounded() {
        // few live rows, dead ones peaking higher late in the run (more work then), and the table
        // no bigger at the end than at two thirds: its dead space is reused
        let s = judged(&points(
            |t| {
                if t < 40.0 {
                    (t * 1_000_000.0) as i64
                } else {
                    40_000_000
                }
            },
            |t| if t < 60.0 { 150_000 } else { 300_000 },
        ));
        assert!(s.tables[0].dead_bounded);
    }

    #[test]
    fn bloat_and_piling_dead_tuples_miss() {
        // bytes per job doubling by the last third; dead tuples never vacuumed
        let s = judged(&points(
            |t| (t * t * 1000.0) as i64,
            |t| (t * 1000.0) as i64,
        ));
        assert!(s.size_ratio > 1.2, "{}", s.size_ratio);
        assert!(!s.tables[0].dead_bounded);
        let goals = s.goals();
        assert!(!goals.iter().find(|g| g.goal == GOAL_SIZES).unwrap().pass);
        assert!(!goals.iter().find(|g| g.goal == GOAL_DEAD).unwrap().pass);
    }
}

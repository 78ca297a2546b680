//! `herald-bench`: throughput and latency figures in a fresh database `herald_bench`, each next to a
//! plain-Postgres baseline doing the same work in the same run. Prints a report to stdout and writes
//! it as JSON; goals are printed as PASS/MISS and never fail the command.
//!
//! The parts: `ingest` (herald's side of event ingest), `baseline` (plain tables and one row trigger
//! per automation), `golive` (going live during ingest), `latency` (concurrent `track()` calls),
//! `contacts` (bulk contact import), `stats` (percentiles), `engine` (tick throughput, statements per
//! tick), `queue` (claim/complete against plain queues and PgQ; claim against idle workspaces) and
//! `stream` (what the results stream costs complete(); `/stream` fanned out to 100 subscribers) and
//! `journey` (contacts/min through a live journey into smtp-sink, next to send() in the same run);
//! `api` (the HTTP API: /v1/track/batch next to track_many from SQL; /v1/track with 100 clients;
//! GET /v1/results next to read_results from SQL);
//! `soak` (a long steady mixed load: sizes, dead tuples and latencies over time; only with --only).

mod api;
mod autovacuum;
mod baseline;
mod broadcast;
mod contacts;
mod cpu;
mod delivery;
mod engine;
mod golive;
mod growth;
mod ingest;
mod journey;
mod latency;
mod queue;
mod soak;
mod stats;
mod stream;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio_postgres::Client;
use tracing::{info, warn};

use herald_sidecar::db::Target;
use herald_sidecar::{logging, run as daemon};

/// The benchmark harness is a binary of its own, so that the daemon users deploy does not carry it.
#[derive(clap::Parser)]
#[command(
    name = "herald-bench",
    version,
    about = "herald's performance figures, each next to a plain-Postgres baseline in the same run"
)]
struct Cli {
    /// The server to measure on (database `herald_bench` is recreated there). Defaults to the local
    /// socket as the current OS user.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    #[command(flatten)]
    args: BenchArgs,
}

fn main() -> Result<()> {
    if daemon::render::is_worker() {
        // the delivery section runs `herald run` in this process; its render workers are this binary
        logging::init(logging::LogFormat::Text);
        return daemon::render::worker_main();
    }
    let cli = <Cli as clap::Parser>::parse();
    logging::init(logging::LogFormat::Text);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(run(&Target::new(cli.database_url), cli.args))
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A tiny run (seconds) that only checks the benchmark still works; its figures mean little.
    #[arg(long)]
    pub small: bool,
    /// Run one section only (its own figures and goals); default: all of them, in this order.
    #[arg(long, value_enum)]
    pub only: Option<Section>,
    /// The soak's length in minutes (`--only soak`; default 30, 1 with --small).
    #[arg(long, value_name = "MINUTES")]
    pub soak_minutes: Option<f64>,
    /// The email rate the soak's load offers (events are sized to it).
    #[arg(long, value_name = "N", default_value_t = 3000.0)]
    pub soak_emails_per_sec: f64,
    /// Where to write the figures as JSON.
    #[arg(long, value_name = "PATH", default_value = "target/bench/ingest.json")]
    pub json: PathBuf,
}

/// The sections of `herald bench`, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Event ingest and the dispatcher, go-live, contact import, track() latency (sections 1-4).
    Ingest,
    /// tick throughput and statements per tick (5-6).
    Engine,
    /// claim + complete against plain queues and PgQ; claim with idle workspaces (7-8).
    Queue,
    /// herald run: emails/s, webhooks/s, track() -> SMTP latency.
    Delivery,
    /// resolving and enqueueing a 1,000,000-recipient broadcast; segment evaluation (9).
    Broadcast,
    /// the results stream: complete() with and without it (0.2.0), /stream to 100 subscribers (10).
    Stream,
    /// the HTTP API: /v1/track/batch next to track_many from SQL, /v1/track latency (12).
    Api,
    /// a journey end to end through herald run into smtp-sink, next to send() in the same run (11).
    Journey,
    /// the queue as its backlog grows to 10,000,000 pending jobs: claim latency and jobs/s per depth.
    Growth,
    /// a long steady mixed load through herald run (30 min by default); never part of a full run.
    Soak,
}

/// Contacts in workspace `bench`; events cycle through them.
const CONTACTS: usize = 10_000;
/// Automations (and baseline triggers) every event matches, so each event makes this many enrollments.
const MATCHING: usize = 10;
/// Events per track_many call / per baseline INSERT.
const BATCH: usize = 1_000;

struct Sizes {
    batches: usize,
    /// Live automations on other event kinds at each measured level (cumulative).
    others: [usize; 3],
    golive_window: Duration,
    import_contacts: usize,
    track_calls: usize,
}

impl Sizes {
    fn new(small: bool) -> Self {
        if small {
            Self {
                batches: 3,
                others: [0, 100, 300],
                golive_window: Duration::from_secs(1),
                import_contacts: 5_000,
                track_calls: 100,
            }
        } else {
            Self {
                batches: 20,
                others: [0, 1_000, 10_000],
                golive_window: Duration::from_secs(3),
                import_contacts: 100_000,
                track_calls: 2_000,
            }
        }
    }
}

/// Which system a measurement drives: herald, or the plain-Postgres baseline.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    Herald,
    Baseline,
}

/// Events sent, how long it took, and the enrollments it made.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Rate {
    pub events: usize,
    pub secs: f64,
    pub events_per_sec: f64,
    pub enrollments: i64,
}

impl Rate {
    pub fn new(events: usize, elapsed: Duration, enrollments: i64) -> Self {
        let secs = elapsed.as_secs_f64();
        Self {
            events,
            secs,
            events_per_sec: events as f64 / secs,
            enrollments,
        }
    }
}

#[derive(Debug, Serialize)]
struct Level {
    automations: usize,
    herald: Rate,
    herald_pct_of_first: f64,
    baseline: Rate,
    herald_over_baseline: f64,
    /// Seconds to create the automations added for this level (herald) / the triggers (baseline).
    herald_setup_secs: f64,
    baseline_setup_secs: f64,
}

/// Herald at MATCHING live automations again, measured last (the other automations paused).
#[derive(Debug, Serialize)]
struct Control {
    automations: usize,
    paused: usize,
    herald: Rate,
    herald_pct_of_first: f64,
}

#[derive(Debug, Serialize)]
struct Goal {
    goal: String,
    value: f64,
    pass: bool,
}

impl Goal {
    fn new(goal: &str, value: f64, pass: bool) -> Self {
        Self {
            goal: goal.into(),
            value,
            pass,
        }
    }
    fn verdict(&self) -> &'static str {
        if self.pass {
            "PASS"
        } else {
            "MISS"
        }
    }
}

#[derive(Debug, Serialize)]
struct GoLives {
    automations: usize,
    batch: usize,
    go_lives: usize,
    herald: golive::GoLive,
    baseline: golive::GoLive,
}

#[derive(Debug, Serialize)]
struct Report {
    small: bool,
    server_version: String,
    /// Sections not run (`--only`) are null.
    ingest: Option<IngestReport>,
    engine: Option<engine::Engine>,
    queue: Option<queue::Queue>,
    broadcast: Option<broadcast::Broadcast>,
    stream: Option<stream::Stream>,
    /// emails/s, webhooks/s and track() -> SMTP latency (`delivery.rs` renders its own table).
    delivery: Option<serde_json::Value>,
    api: Option<api::Api>,
    journey: Option<journey::Journey>,
    growth: Option<growth::Growth>,
    soak: Option<soak::Soak>,
    goals: Vec<Goal>,
}

#[derive(Debug, Serialize)]
struct IngestReport {
    contacts: usize,
    batch: usize,
    batches: usize,
    matching_automations: usize,
    ingest: Vec<Level>,
    ingest_control: Control,
    go_live: GoLives,
    upsert_contacts: contacts::Import,
    /// track() with 1 and 4 clients, each beside its floor; the baseline's INSERT for context.
    track_latency: latency::TrackLatency,
}

pub async fn run(target: &Target, args: BenchArgs) -> Result<()> {
    // HERALD_BENCH_DB: another name, so that runs on one machine do not drop each other's database
    let dbname = std::env::var("HERALD_BENCH_DB").unwrap_or_else(|_| "herald_bench".to_owned());
    let target = target.with_dbname(&dbname);
    let db = target.recreate_with_extension().await?;
    let server_version: String = db.query_one("SHOW server_version", &[]).await?.get(0);
    info!("database {dbname} ready (PostgreSQL {server_version})");
    // the soak runs only when asked for by name: it lasts half an hour
    let wanted = |s: Section| args.only.map_or(s != Section::Soak, |only| only == s);

    let mut goals = Vec::new();
    let ingest = if wanted(Section::Ingest) {
        let r = run_ingest(&target, &db, &Sizes::new(args.small)).await?;
        goals.extend(ingest_goals(
            &r.ingest,
            &r.upsert_contacts,
            &r.track_latency,
        ));
        Some(r)
    } else {
        None
    };
    let engine = if wanted(Section::Engine) {
        info!("engine: tick throughput and statements per tick");
        let e = engine::run(&target, args.small).await?;
        goals.extend(e.goals());
        Some(e)
    } else {
        None
    };
    let queue = if wanted(Section::Queue) {
        info!("queue: herald against plain queues and PgQ");
        let q = queue::run(&target, args.small).await?;
        goals.extend(q.goals());
        Some(q)
    } else {
        None
    };
    let broadcast = if wanted(Section::Broadcast) {
        info!("broadcast: resolving and enqueueing a large broadcast");
        let b = broadcast::run(&target, args.small).await?;
        goals.extend(b.goals());
        Some(b)
    } else {
        None
    };
    let stream = if wanted(Section::Stream) {
        info!(
            "stream: complete() with and without the results stream; /stream to many subscribers"
        );
        let s = stream::run(&target, args.small).await?;
        goals.extend(s.goals());
        Some(s)
    } else {
        None
    };
    let (delivery_table, delivery) = if wanted(Section::Delivery) {
        info!("delivery: herald run against smtp-sink, an HTTP receiver and an SMTP server that timestamps");
        let (table, d) = delivery::run(&target, args.small).await?;
        for g in d["goals"].as_array().into_iter().flatten() {
            goals.push(Goal::new(
                g["goal"].as_str().unwrap_or_default(),
                g["value"].as_f64().unwrap_or_default(),
                g["pass"].as_bool().unwrap_or_default(),
            ));
        }
        (table, Some(d))
    } else {
        (String::new(), None)
    };

    let journey = if wanted(Section::Journey) {
        info!(
            "journey: track_many into a live journey, herald run into smtp-sink, send() beside it"
        );
        let j = journey::run(&target, args.small).await?;
        goals.extend(j.goals());
        Some(j)
    } else {
        None
    };

    let api = if wanted(Section::Api) {
        info!("api: /v1/track/batch against track_many from SQL; /v1/track with 100 clients; /v1/results against read_results");
        let a = api::run(&target, args.small).await?;
        goals.extend(a.goals());
        Some(a)
    } else {
        None
    };

    let growth = if wanted(Section::Growth) {
        info!("growth: claim + complete as the queue's backlog grows");
        let g = growth::run(&target, args.small).await?;
        goals.push(Goal::new(
            growth::GOAL,
            g.deepest_p99_over_shallowest,
            g.deepest_p99_over_shallowest <= 2.0,
        ));
        goals.push(Goal::new(
            growth::history::GOAL,
            g.history.worst_ratio,
            g.history.worst_ratio >= 1.0 / 1.2,
        ));
        Some(g)
    } else {
        None
    };

    let soak = if wanted(Section::Soak) {
        info!("soak: a long steady mixed load through herald run");
        let settings = soak::Settings {
            minutes: args
                .soak_minutes
                .unwrap_or(if args.small { 1.0 } else { 30.0 }),
            emails_per_sec: args.soak_emails_per_sec,
        };
        let s = soak::run(&target, &settings).await?;
        goals.extend(s.goals());
        Some(s)
    } else {
        None
    };

    let report = Report {
        small: args.small,
        server_version,
        ingest,
        engine,
        queue,
        broadcast,
        stream,
        delivery,
        api,
        journey,
        growth,
        soak,
        goals,
    };
    print!("{}", render(&report));
    print!("{delivery_table}");
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", args.json.display()))?;
    info!("wrote {}", args.json.display());
    Ok(())
}

/// Sections 1-4: ingest at three automation counts against the baseline, the control, going live,
/// track() latency, contact import.
async fn run_ingest(target: &Target, db: &Client, sizes: &Sizes) -> Result<IngestReport> {
    ingest::create_contacts(db, ingest::WORKSPACE, CONTACTS).await?;
    baseline::create_schema(db).await?;
    ingest::add_live_automations(db, "hit {}", ingest::HIT, 0, MATCHING).await?;
    baseline::add_triggers(db, ingest::HIT, 0, MATCHING).await?;
    info!("{CONTACTS} contacts, {MATCHING} matching automations and baseline triggers");

    let herald_batches: Vec<_> = (0..sizes.batches)
        .map(|b| ingest::events(b * BATCH, BATCH, CONTACTS))
        .collect();
    let baseline_batches: Vec<_> = (0..sizes.batches)
        .map(|b| baseline::events(b * BATCH, BATCH, CONTACTS))
        .collect();

    let mut levels: Vec<Level> = Vec::new();
    let mut others = 0;
    let mut middle = None;
    for (i, &want) in sizes.others.iter().enumerate() {
        let add = want - others;
        let first = MATCHING + others;
        let started = Instant::now();
        ingest::add_live_automations(db, "other {}", "other.{}", first, add).await?;
        let herald_setup_secs = started.elapsed().as_secs_f64();
        let started = Instant::now();
        baseline::add_triggers(db, "other.{}", first, add).await?;
        let baseline_setup_secs = started.elapsed().as_secs_f64();
        others = want;
        let automations = MATCHING + others;
        if add > 0 {
            info!(
                "{automations} automations: created {add} more in {herald_setup_secs:.1} s, \
                 {add} baseline triggers in {baseline_setup_secs:.1} s"
            );
        }
        db.batch_execute("ANALYZE").await.context("ANALYZE")?;

        let herald = ingest::measure(target, &herald_batches).await?;
        check_enrollments("herald", &herald);
        let baseline = baseline::measure(target, &baseline_batches).await?;
        check_enrollments("baseline", &baseline);
        info!(
            "{automations} automations: herald {:.0} events/s, baseline {:.0} events/s",
            herald.events_per_sec, baseline.events_per_sec
        );
        let first_rate = levels
            .first()
            .map_or(herald.events_per_sec, |l| l.herald.events_per_sec);
        levels.push(Level {
            automations,
            herald,
            herald_pct_of_first: 100.0 * herald.events_per_sec / first_rate,
            baseline,
            herald_over_baseline: herald.events_per_sec / baseline.events_per_sec,
            herald_setup_secs,
            baseline_setup_secs,
        });

        if i == 1 {
            middle = Some(middle_level(target, db, sizes, automations).await?);
        }
    }
    let (track_latency, go_live) = middle.context("no middle level")?;

    // Control: back to the 10 matching automations (the others paused) on the now larger tables,
    // to tell the cost of more automations from the cost of more rows.
    let paused = ingest::set_status_where_kind(db, "other.%", "paused").await?;
    db.batch_execute("ANALYZE").await?;
    let control = ingest::measure(target, &herald_batches).await?;
    check_enrollments("herald", &control);
    info!(
        "control: {paused} automations paused, herald {:.0} events/s",
        control.events_per_sec
    );
    let ingest_control = Control {
        automations: MATCHING,
        paused: paused as usize,
        herald: control,
        herald_pct_of_first: 100.0 * control.events_per_sec / levels[0].herald.events_per_sec,
    };

    info!("importing {} contacts", sizes.import_contacts);
    let upsert_contacts = contacts::run(target, sizes.import_contacts).await?;
    Ok(IngestReport {
        contacts: CONTACTS,
        batch: BATCH,
        batches: sizes.batches,
        matching_automations: MATCHING,
        ingest: levels,
        ingest_control,
        go_live,
        upsert_contacts,
        track_latency,
    })
}

/// At the middle level (1,010 automations): track() latency, then going live during ingest.
async fn middle_level(
    target: &Target,
    db: &Client,
    sizes: &Sizes,
    automations: usize,
) -> Result<(latency::TrackLatency, GoLives)> {
    info!(
        "{automations} automations: track() with {:?} clients, {} calls each, and the floor",
        latency::CLIENTS,
        sizes.track_calls
    );
    let track = latency::measure(target, automations, sizes.track_calls, CONTACTS).await?;
    db.batch_execute("ANALYZE").await?;
    info!("{automations} automations: going live during ingest");
    let herald = golive::run(target, Side::Herald, CONTACTS, sizes.golive_window).await?;
    let baseline = golive::run(target, Side::Baseline, CONTACTS, sizes.golive_window).await?;
    let go_live = GoLives {
        automations,
        batch: golive::BATCH,
        go_lives: golive::GO_LIVES,
        herald,
        baseline,
    };
    Ok((track, go_live))
}

fn check_enrollments(side: &str, rate: &Rate) {
    let want = (rate.events * MATCHING) as i64;
    if rate.enrollments != want {
        warn!(
            "{side}: {} enrollments for {} events, expected {want}",
            rate.enrollments, rate.events
        );
    }
}

fn ingest_goals(
    levels: &[Level],
    import: &contacts::Import,
    track: &latency::TrackLatency,
) -> Vec<Goal> {
    let mut goals = Vec::new();
    for l in levels.iter().skip(1) {
        goals.push(Goal::new(
            &format!(
                "herald at {} automations >= 90% of its rate at {}",
                l.automations, MATCHING
            ),
            l.herald_pct_of_first,
            l.herald_pct_of_first >= 90.0,
        ));
    }
    if let Some(l) = levels.last() {
        goals.push(Goal::new(
            &format!("herald at {} automations >= 10x baseline", l.automations),
            l.herald_over_baseline,
            l.herald_over_baseline >= 10.0,
        ));
    }
    goals.push(Goal::new(
        "upsert_contacts >= 100,000 contacts/s",
        import.herald_contacts_per_sec,
        import.herald_contacts_per_sec >= 100_000.0,
    ));
    goals.push(Goal::new(
        "upsert_contacts >= 0.5x a plain INSERT ... SELECT into herald.contacts",
        import.herald_over_contacts_table,
        import.herald_over_contacts_table >= 0.5,
    ));
    goals.push(Goal::new(
        "upsert_contacts >= 0.5x a plain INSERT ... SELECT into herald.contacts, never analysed",
        import.never_analysed.herald_over_contacts_table,
        import.never_analysed.herald_over_contacts_table >= 0.5,
    ));
    for p in &track.pairs {
        let goal = latency::goal_ms(p.clients);
        goals.push(Goal::new(
            &latency::goal_name(p.clients),
            p.track.calls.p99_ms,
            p.track.calls.p99_ms < goal,
        ));
    }
    goals
}

/// `1234567.8` → `1,234,568`.
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn render(report: &Report) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "herald bench{} — PostgreSQL {}",
        if report.small { " --small" } else { "" },
        report.server_version
    );
    if let Some(r) = &report.ingest {
        render_ingest(&mut o, r, &report.goals);
    }
    if let Some(e) = &report.engine {
        engine::render(&mut o, e);
    }
    if let Some(q) = &report.queue {
        queue::render(&mut o, q);
    }
    if let Some(b) = &report.broadcast {
        broadcast::render(&mut o, b);
    }
    if let Some(s) = &report.stream {
        stream::render(&mut o, s);
    }
    if let Some(a) = &report.api {
        api::render(&mut o, a, &report.goals);
    }
    if let Some(j) = &report.journey {
        journey::render(&mut o, j, &report.goals);
    }
    if let Some(g) = &report.growth {
        let verdict = |goal: &str| {
            report
                .goals
                .iter()
                .find(|x| x.goal == goal)
                .map_or("", Goal::verdict)
        };
        growth::render(&mut o, g, verdict);
    }
    if let Some(s) = &report.soak {
        soak::render(&mut o, s, &report.goals);
    }
    o
}

fn render_ingest(o: &mut String, r: &IngestReport, goals: &[Goal]) {
    use std::fmt::Write;
    let verdict = |g: &str| goals.iter().find(|x| x.goal == g).map_or("", Goal::verdict);

    let _ = writeln!(
        o,
        "\n1. Ingest: track_many, {} batches of {} events; every event matches {} automations (or triggers)",
        r.batches,
        thousands(r.batch as f64),
        r.matching_automations
    );
    let _ = writeln!(
        o,
        "{:>11} | {:>15} | {:>15} | {:>17} | {:>15}",
        "automations", "herald events/s", "herald % of @10", "baseline events/s", "herald/baseline"
    );
    for l in &r.ingest {
        let _ = writeln!(
            o,
            "{:>11} | {:>15} | {:>14.1}% | {:>17} | {:>14.2}x",
            thousands(l.automations as f64),
            thousands(l.herald.events_per_sec),
            l.herald_pct_of_first,
            thousands(l.baseline.events_per_sec),
            l.herald_over_baseline
        );
    }
    let c = &r.ingest_control;
    let _ = writeln!(
        o,
        "{:>11} | {:>15} | {:>14.1}% | {:>17} | {:>15}  <- control, run last: {} others paused",
        format!("{} again", c.automations),
        thousands(c.herald.events_per_sec),
        c.herald_pct_of_first,
        "-",
        "-",
        thousands(c.paused as f64)
    );
    for pair in r.ingest.windows(2) {
        let (from, to) = (&pair[0], &pair[1]);
        let added = thousands((to.automations - from.automations) as f64);
        let _ = writeln!(
            o,
            "  setup {} -> {}: {added} automations created and set live in {:.1} s; {added} CREATE TRIGGER in {:.1} s",
            thousands(from.automations as f64),
            thousands(to.automations as f64),
            to.herald_setup_secs,
            to.baseline_setup_secs
        );
    }
    for g in goals.iter().filter(|g| g.goal.starts_with("herald at")) {
        let unit = if g.goal.ends_with("baseline") {
            "x"
        } else {
            "%"
        };
        let _ = writeln!(
            o,
            "  goal: {:<58} {:>8.1}{unit}  {}",
            g.goal,
            g.value,
            g.verdict()
        );
    }

    let gl = &r.go_live;
    let _ = writeln!(
        o,
        "\n2. Going live during ingest: {} go-lives, one by one, while another connection ingests batches of {} ({} automations live)",
        gl.go_lives,
        gl.batch,
        thousands(gl.automations as f64)
    );
    let _ = writeln!(
        o,
        "{:<34} | {:>10} | {:>10} | {:>22} | {:>22}",
        "", "op p50 ms", "op max ms", "ingest max ms before", "ingest max ms during"
    );
    for (name, g) in [
        ("herald set_automation_status live", &gl.herald),
        ("baseline CREATE TRIGGER", &gl.baseline),
    ] {
        let _ = writeln!(
            o,
            "{:<34} | {:>10.2} | {:>10.2} | {:>13.1} ({:>3} b.) | {:>13.1} ({:>3} b.)",
            name,
            g.op.p50_ms,
            g.op.max_ms,
            g.ingest_max_ms_before,
            g.ingest_batches_before,
            g.ingest_max_ms_during,
            g.ingest_batches_during
        );
    }

    let im = &r.upsert_contacts;
    let _ = writeln!(
        o,
        "\n3. Contact import: {} new contacts in calls of {}",
        thousands(im.contacts as f64),
        thousands(im.per_call as f64)
    );
    let _ = writeln!(
        o,
        "  herald upsert_contacts    {:>10} contacts/s",
        thousands(im.herald_contacts_per_sec)
    );
    let _ = writeln!(
        o,
        "  baseline INSERT … SELECT  {:>10} contacts/s",
        thousands(im.baseline_contacts_per_sec)
    );
    let _ = writeln!(
        o,
        "  plain INSERT … SELECT into herald.contacts (every index, no checks, no events) {:>10} contacts/s",
        thousands(im.contacts_table_contacts_per_sec)
    );
    let _ = writeln!(
        o,
        "  herald/baseline {:.2}x   goal >= 100,000 contacts/s: {}",
        im.herald_contacts_per_sec / im.baseline_contacts_per_sec,
        verdict("upsert_contacts >= 100,000 contacts/s")
    );
    let _ = writeln!(
        o,
        "  herald/herald.contacts {:.3}x   goal >= 0.5x: {}",
        im.herald_over_contacts_table,
        verdict("upsert_contacts >= 0.5x a plain INSERT ... SELECT into herald.contacts")
    );
    let na = &im.never_analysed;
    let _ = writeln!(
        o,
        "  never analysed (a fresh database, same rows, in turns): herald {} contacts/s, plain INSERT into herald.contacts {} contacts/s",
        thousands(na.herald_contacts_per_sec),
        thousands(na.contacts_table_contacts_per_sec)
    );
    let _ = writeln!(
        o,
        "  herald/herald.contacts never analysed {:.3}x   goal >= 0.5x: {}",
        na.herald_over_contacts_table,
        verdict("upsert_contacts >= 0.5x a plain INSERT ... SELECT into herald.contacts, never analysed")
    );

    latency::render(o, &r.track_latency, r.matching_automations, verdict);
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn groups_thousands() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
    }
}

//! The HTTP API (issue 13): what `/v1/…` costs next to calling the SQL functions directly, with
//! `herald run` (the binary, as a process) serving the API on loopback and a key made by
//! `herald.create_api_key`.
//!
//!   a. events/s through `POST /v1/track/batch` (one `herald.api_call` → one `track_many` per
//!      request) against `herald.track_many` from SQL, the same batches of 1,000 events and the same
//!      number of concurrent clients, in turns (SQL, HTTP, SQL, HTTP) in one database; goal ≥ 0.7×.
//!   b. `POST /v1/track` latency with 100 concurrent clients, each on its own kept-alive connection
//!      (spread over loopback addresses: the daemon takes at most 32 connections per address). For
//!      context, track() from SQL on 8 connections (the daemon's pool size), as many calls: with 100
//!      clients the API's latency is mostly the wait for one of the pool's connections.
//!   c. results/s read page by page (1,000 a page, each page's last id the next cursor) through
//!      `GET /v1/results` (one `api_call` → `read_results` per page, a key with the `results` scope)
//!      against `herald.read_results` from SQL, one client each, in turns, over the same results.
//!
//! The workspace has its contacts already and no automation: the figures are the API's own cost
//! (HTTP, JSON, the key check, the call) on top of the ingest, not the dispatcher's.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tracing::info;

use super::soak::daemon::Daemon;
use super::stats::Summary;
use super::{ingest, thousands, Goal};
use herald_sidecar::db::Target;

const DBNAME: &str = "herald_bench_api";
const LINK_SECRET: &str = "bench-api-link-secret-0123456789";
/// Events per batch (per /v1/track/batch request, per track_many call).
const BATCH: usize = 1_000;
/// Concurrent clients of the throughput runs (each side).
const THROUGHPUT_CLIENTS: usize = 4;
/// Concurrent clients of the latency run.
const LATENCY_CLIENTS: usize = 100;
/// Results staged and published for the read runs, and the page they are read in.
const RESULTS: usize = 100_000;
const RESULTS_PAGE: usize = 1_000;
/// Latency clients per loopback address (the daemon's per-address limit is 32).
const PER_ADDRESS: usize = 25;
const CONTACTS: usize = 10_000;
/// The context run's connections: as many as the daemon's pool has.
const SQL_TRACK_CONNECTIONS: usize = 8;
pub const GOAL_RATIO: &str = "/v1/track/batch >= 0.7x track_many from SQL";
const RATIO: f64 = 0.7;

struct Sizes {
    /// Batches per throughput run (split over the clients).
    batches: usize,
    rounds: usize,
    /// /v1/track calls per latency client.
    calls: usize,
    /// Results read per run (c.).
    results: usize,
}

impl Sizes {
    fn new(small: bool) -> Self {
        if small {
            Self {
                batches: 8,
                rounds: 1,
                calls: 5,
                results: 3_000,
            }
        } else {
            Self {
                batches: 200,
                rounds: 2,
                calls: 100,
                results: RESULTS,
            }
        }
    }
}

/// One throughput run of one side.
#[derive(Debug, Serialize)]
pub struct Run {
    pub side: &'static str,
    pub round: usize,
    pub events: usize,
    pub secs: f64,
    pub events_per_sec: f64,
}

#[derive(Debug, Serialize)]
pub struct Api {
    pub batch: usize,
    pub clients: usize,
    pub runs: Vec<Run>,
    pub sql_events_per_sec: f64,
    pub http_events_per_sec: f64,
    /// HTTP over SQL, over the whole of each side's runs.
    pub ratio: f64,
    pub track_clients: usize,
    pub track_calls: usize,
    pub track: Summary,
    pub track_calls_per_sec: f64,
    /// Context: track() from SQL on as many connections as the daemon's pool has, the same number
    /// of calls, in the same run.
    pub sql_track_connections: usize,
    pub sql_track: Summary,
    pub sql_track_calls_per_sec: f64,
    /// c.: runs of reading every staged result, page by page, from SQL and over HTTP.
    pub reads: Vec<Run>,
    pub sql_results_per_sec: f64,
    pub http_results_per_sec: f64,
    /// HTTP over SQL (no goal: the figure says what the API adds to a read).
    pub read_ratio: f64,
}

impl Api {
    pub(super) fn goals(&self) -> Vec<Goal> {
        vec![Goal::new(GOAL_RATIO, self.ratio, self.ratio >= RATIO)]
    }
}

pub async fn run(target: &Target, small: bool) -> Result<Api> {
    let sizes = Sizes::new(small);
    let target = target.with_dbname(DBNAME);
    let db = target.recreate_with_extension().await?;
    ingest::create_contacts(&db, ingest::WORKSPACE, CONTACTS).await?;
    let key: String = db
        .query_one(
            "SELECT herald.create_api_key($1, 'bench', ARRAY['track', 'results'])",
            &[&ingest::WORKSPACE],
        )
        .await?
        .get(0);
    let first_result = publish_results(&db, sizes.results).await?;
    db.batch_execute("ANALYZE").await?;
    let port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut daemon = start_daemon(&target, addr)?;
    let out = measure(&target, addr, &key, &sizes, &mut daemon, first_result).await;
    daemon.stop(Duration::from_secs(20)).await?;
    let out = out?;
    drop(db);
    let admin = target.with_dbname("postgres").connect().await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)"))
        .await?;
    Ok(out)
}

async fn measure(
    target: &Target,
    addr: SocketAddr,
    key: &str,
    sizes: &Sizes,
    daemon: &mut Daemon,
    first_result: i64,
) -> Result<Api> {
    wait_for_http(addr, daemon).await?;
    let base = format!("http://{addr}");
    let bodies: Arc<Vec<Value>> = Arc::new(
        (0..sizes.batches)
            .map(|b| ingest::events(b * BATCH, BATCH, CONTACTS))
            .collect(),
    );
    // warm-up: the daemon's pool and prepared statement, the SQL side's plans
    http_batches(&base, key, &Arc::new(vec![bodies[0].clone()]), 1).await?;
    sql_batches(target, &Arc::new(vec![bodies[0].clone()]), 1).await?;

    let mut runs = Vec::new();
    for round in 1..=sizes.rounds {
        info!(
            "api: round {round}: {} batches of {BATCH} by track_many from SQL, then by /v1/track/batch ({THROUGHPUT_CLIENTS} clients each)",
            sizes.batches
        );
        let secs = sql_batches(target, &bodies, THROUGHPUT_CLIENTS).await?;
        runs.push(Run::new(
            "sql track_many",
            round,
            sizes.batches * BATCH,
            secs,
        ));
        let secs = http_batches(&base, key, &bodies, THROUGHPUT_CLIENTS).await?;
        runs.push(Run::new(
            "http /v1/track/batch",
            round,
            sizes.batches * BATCH,
            secs,
        ));
    }
    let (sql, http) = (rate(&runs, "sql"), rate(&runs, "http"));

    info!(
        "api: {LATENCY_CLIENTS} clients calling /v1/track {} times each",
        sizes.calls
    );
    let (track, secs) = track_latency(addr, key, sizes.calls).await?;
    info!("api: context: track() from SQL on {SQL_TRACK_CONNECTIONS} connections");
    let (sql_track, sql_secs) = sql_track_latency(
        target,
        LATENCY_CLIENTS * sizes.calls / SQL_TRACK_CONNECTIONS,
    )
    .await?;

    info!(
        "api: reading {} results in pages of {RESULTS_PAGE}: read_results from SQL, then GET /v1/results",
        sizes.results
    );
    let after = first_result - 1;
    // warm-up: a page each
    sql_read(target, after, RESULTS_PAGE).await?;
    http_read(&base, key, after, RESULTS_PAGE).await?;
    let mut reads = Vec::new();
    for round in 1..=sizes.rounds {
        reads.push(Run::new(
            "sql read_results",
            round,
            sizes.results,
            sql_read(target, after, sizes.results).await?,
        ));
        reads.push(Run::new(
            "http GET /v1/results",
            round,
            sizes.results,
            http_read(&base, key, after, sizes.results).await?,
        ));
    }
    let (sql_reads, http_reads) = (rate(&reads, "sql"), rate(&reads, "http"));
    Ok(Api {
        reads,
        sql_results_per_sec: sql_reads,
        http_results_per_sec: http_reads,
        read_ratio: http_reads / sql_reads,
        batch: BATCH,
        clients: THROUGHPUT_CLIENTS,
        runs,
        sql_events_per_sec: sql,
        http_events_per_sec: http,
        ratio: http / sql,
        track_clients: LATENCY_CLIENTS,
        track_calls: track.count,
        track_calls_per_sec: track.count as f64 / secs,
        track,
        sql_track_connections: SQL_TRACK_CONNECTIONS,
        sql_track_calls_per_sec: sql_track.count as f64 / sql_secs,
        sql_track,
    })
}

/// Items a second over all the runs of one side (whose name starts with `side`).
fn rate(runs: &[Run], side: &str) -> f64 {
    let (n, secs) = runs
        .iter()
        .filter(|r| r.side.starts_with(side))
        .fold((0, 0.0), |(n, s), r| (n + r.events, s + r.secs));
    n as f64 / secs
}

/// Stages `n` results shaped like email.sent ones and publishes them; the first one's id.
async fn publish_results(db: &tokio_postgres::Client, n: usize) -> Result<i64> {
    db.execute(
        "INSERT INTO herald.results_staged (workspace_id, kind, contact_id, job_id, data) \
         SELECT $1, 'email.sent', 1 + i % 10000, i, jsonb_build_object('message_id', \
                '<' || i || '.bench@herald.example>', 'node', 'welcome', 'variation', NULL) \
           FROM generate_series(1, $2::int) i",
        &[&ingest::WORKSPACE, &(n as i32)],
    )
    .await?;
    loop {
        let moved: i32 = db
            .query_one("SELECT herald.advance_results(100000)", &[])
            .await?
            .get(0);
        if moved == 0 {
            break;
        }
    }
    let (first, count): (Option<i64>, i64) = {
        let row = db
            .query_one(
                "SELECT min(id), count(*) FROM herald.results WHERE workspace_id = $1",
                &[&ingest::WORKSPACE],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    ensure!(count as usize == n, "{count} results published of {n}");
    first.context("no result published")
}

/// Reads `n` results after `after` with read_results, a page at a time; seconds.
async fn sql_read(target: &Target, after: i64, n: usize) -> Result<f64> {
    let db = target.connect().await?;
    let statement = db
        .prepare("SELECT id, kind, at, contact_id, automation_id, enrollment_id, broadcast_id, job_id, data FROM herald.read_results($1, $2, $3)")
        .await?;
    let started = Instant::now();
    let (mut cursor, mut read) = (after, 0);
    while read < n {
        let rows = db
            .query(
                &statement,
                &[&ingest::WORKSPACE, &cursor, &(RESULTS_PAGE as i32)],
            )
            .await?;
        ensure!(!rows.is_empty(), "read_results ended after {read} results");
        read += rows.len();
        cursor = rows.last().expect("not empty").get(0);
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Reads `n` results after `after` through GET /v1/results, a page at a time; seconds.
async fn http_read(base: &str, key: &str, after: i64, n: usize) -> Result<f64> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()?;
    let auth = format!("Bearer {key}");
    let started = Instant::now();
    let (mut cursor, mut read) = (after, 0);
    while read < n {
        let response = client
            .get(format!(
                "{base}/v1/results?after={cursor}&limit={RESULTS_PAGE}"
            ))
            .header("authorization", &auth)
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        ensure!(status.is_success(), "/v1/results answered {status}: {text}");
        let page: Value = serde_json::from_str(&text)?;
        let got = page["results"].as_array().map_or(0, Vec::len);
        ensure!(got > 0, "/v1/results ended after {read} results: {page}");
        read += got;
        cursor = page["next"].as_i64().context("no next in the answer")?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// `SQL_TRACK_CONNECTIONS` connections calling track() `calls` times each; durations and seconds.
async fn sql_track_latency(target: &Target, calls: usize) -> Result<(Summary, f64)> {
    let mut conns = Vec::new();
    for _ in 0..SQL_TRACK_CONNECTIONS {
        conns.push(target.connect().await?);
    }
    let began = Instant::now();
    let tasks: Vec<JoinHandle<Result<Vec<Duration>>>> = conns
        .into_iter()
        .enumerate()
        .map(|(c, db)| {
            tokio::spawn(async move {
                let statement = db
                    .prepare("SELECT herald.track($1, $2, 'sql.ping', $3::jsonb)")
                    .await?;
                let mut took = Vec::with_capacity(calls);
                for i in 0..calls {
                    let email = ingest::email((c * calls + i) % CONTACTS);
                    let t = Instant::now();
                    db.query_one(&statement, &[&ingest::WORKSPACE, &email, &json!({"n": i})])
                        .await
                        .context("herald.track")?;
                    took.push(t.elapsed());
                }
                Ok(took)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((Summary::of(&all), began.elapsed().as_secs_f64()))
}

impl Run {
    fn new(side: &'static str, round: usize, events: usize, secs: f64) -> Self {
        Self {
            side,
            round,
            events,
            secs,
            events_per_sec: events as f64 / secs,
        }
    }
}

/// `clients` connections calling track_many on the batches, each taking the next one; seconds.
async fn sql_batches(target: &Target, bodies: &Arc<Vec<Value>>, clients: usize) -> Result<f64> {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(target.connect().await?);
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<JoinHandle<Result<()>>> = conns
        .into_iter()
        .map(|db| {
            let (bodies, next) = (Arc::clone(bodies), Arc::clone(&next));
            tokio::spawn(async move {
                let statement = db
                    .prepare("SELECT herald.track_many($1, $2::jsonb)")
                    .await?;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(events) = bodies.get(i) else {
                        return Ok(());
                    };
                    let n: i64 = db
                        .query_one(&statement, &[&ingest::WORKSPACE, events])
                        .await
                        .context("herald.track_many")?
                        .get(0);
                    ensure!(n as usize == BATCH, "track_many recorded {n} events");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// `clients` HTTP clients posting the batches to /v1/track/batch, each taking the next; seconds.
async fn http_batches(
    base: &str,
    key: &str,
    bodies: &Arc<Vec<Value>>,
    clients: usize,
) -> Result<f64> {
    let payloads: Arc<Vec<Vec<u8>>> = Arc::new(
        bodies
            .iter()
            .map(|events| json!({"events": events}).to_string().into_bytes())
            .collect(),
    );
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let url = format!("{base}/v1/track/batch");
    let started = Instant::now();
    let tasks: Vec<JoinHandle<Result<()>>> = (0..clients)
        .map(|_| {
            let (payloads, next) = (Arc::clone(&payloads), Arc::clone(&next));
            let (url, auth) = (url.clone(), format!("Bearer {key}"));
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()?;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(body) = payloads.get(i) else {
                        return Ok(());
                    };
                    let response = client
                        .post(&url)
                        .header("authorization", &auth)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await?;
                    let status = response.status();
                    let text = response.text().await?;
                    ensure!(
                        status.is_success(),
                        "/v1/track/batch answered {status}: {text}"
                    );
                    ensure!(
                        text == format!("{{\"accepted\":{BATCH}}}"),
                        "/v1/track/batch answered {text}"
                    );
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// 100 clients, each on one kept-alive connection from its loopback address, calling /v1/track
/// `calls` times as fast as answers come; every call's duration, and the whole run's seconds.
async fn track_latency(addr: SocketAddr, key: &str, calls: usize) -> Result<(Summary, f64)> {
    let url = format!("http://{addr}/v1/track");
    let mut clients = Vec::new();
    for c in 0..LATENCY_CLIENTS {
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (c / PER_ADDRESS) as u8));
        clients.push(
            reqwest::Client::builder()
                .local_address(from)
                .pool_max_idle_per_host(1)
                .build()?,
        );
    }
    let start = Arc::new(tokio::sync::Barrier::new(LATENCY_CLIENTS));
    let began = Instant::now();
    let tasks: Vec<JoinHandle<Result<Vec<Duration>>>> = clients
        .into_iter()
        .enumerate()
        .map(|(c, client)| {
            let (url, auth, start) = (url.clone(), format!("Bearer {key}"), Arc::clone(&start));
            tokio::spawn(async move {
                let mut took = Vec::with_capacity(calls);
                start.wait().await;
                for i in 0..calls {
                    let body = json!({"email": ingest::email((c * calls + i) % CONTACTS),
                                      "kind": "api.ping", "payload": {"n": i}})
                    .to_string();
                    let t = Instant::now();
                    let response = client
                        .post(&url)
                        .header("authorization", &auth)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await?;
                    let status = response.status();
                    let text = response.text().await?;
                    took.push(t.elapsed());
                    ensure!(status.is_success(), "/v1/track answered {status}: {text}");
                }
                Ok(took)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let secs = began.elapsed().as_secs_f64();
    Ok((Summary::of(&all), secs))
}

async fn wait_for_http(addr: SocketAddr, daemon: &mut Daemon) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if daemon.exited() || Instant::now() > deadline {
            bail!("herald run's HTTP side never listened on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `herald run` as a process (the binary built beside herald-bench), serving its HTTP side on
/// `addr`. In this process it would share the runtime with the 100 clients, whose tasks delay what
/// the daemon awaits: the figures would measure the bench as much as the daemon.
fn start_daemon(target: &Target, addr: SocketAddr) -> Result<Daemon> {
    let log = std::env::temp_dir().join(format!("herald-bench-api-{}.log", addr.port()));
    Daemon::start(
        target.config(),
        &log,
        &[
            ("HERALD_WORKER_ID", "bench-api".to_string()),
            ("HERALD_SHUTDOWN_GRACE_SECONDS", "5".to_string()),
            ("HERALD_HTTP_ADDR", addr.to_string()),
            // the section measures the API's throughput with one key, not the key's limit
            ("HERALD_API_RATE_PER_KEY", "0".to_string()),
            ("HERALD_PUBLIC_URL", format!("http://{addr}")),
            ("HERALD_LINK_SECRET", LINK_SECRET.to_string()),
        ],
    )
}

/// One line per run: side, round, items, seconds, items a second.
fn write_runs(o: &mut String, runs: &[Run]) {
    use std::fmt::Write as _;
    for r in runs {
        let _ = writeln!(
            o,
            "  {:<22} | {:>5} | {:>8} | {:>7.2} | {:>9}",
            r.side,
            r.round,
            thousands(r.events as f64),
            r.secs,
            thousands(r.events_per_sec)
        );
    }
}

pub(super) fn render(o: &mut String, a: &Api, goals: &[Goal]) {
    use std::fmt::Write as _;
    let verdict = goals
        .iter()
        .find(|g| g.goal == GOAL_RATIO)
        .map_or("", Goal::verdict);
    let _ = writeln!(
        o,
        "\n12. HTTP API: herald run (a process), {} contacts, no automation\n\
         a. events/s, batches of {} events, {} clients a side, in turns in one database",
        thousands(CONTACTS as f64),
        thousands(a.batch as f64),
        a.clients
    );
    let _ = writeln!(
        o,
        "  {:<22} | {:>5} | {:>8} | {:>7} | {:>9}",
        "side", "round", "events", "seconds", "events/s"
    );
    write_runs(o, &a.runs);
    let _ = writeln!(
        o,
        "  track_many from SQL {:>9} events/s   /v1/track/batch {:>9} events/s   ratio {:.2}x   goal >= {RATIO}x: {verdict}",
        thousands(a.sql_events_per_sec),
        thousands(a.http_events_per_sec),
        a.ratio
    );
    let t = &a.track;
    let _ = writeln!(
        o,
        "b. POST /v1/track, {} concurrent clients (one kept-alive connection each), {} calls: \
         p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  max {:.2} ms  {} calls/s",
        a.track_clients,
        thousands(a.track_calls as f64),
        t.p50_ms,
        t.p95_ms,
        t.p99_ms,
        t.max_ms,
        thousands(a.track_calls_per_sec)
    );
    let t = &a.sql_track;
    let _ = writeln!(
        o,
        "   context: track() from SQL on {} connections (the daemon's pool size), {} calls: \
         p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  max {:.2} ms  {} calls/s",
        a.sql_track_connections,
        thousands(t.count as f64),
        t.p50_ms,
        t.p95_ms,
        t.p99_ms,
        t.max_ms,
        thousands(a.sql_track_calls_per_sec)
    );
    let _ = writeln!(
        o,
        "c. reading results in pages of {}, one client a side, in turns (no goal: what the API adds to a read)\n  \
         {:<22} | {:>5} | {:>8} | {:>7} | {:>9}",
        thousands(RESULTS_PAGE as f64),
        "side",
        "round",
        "results",
        "seconds",
        "results/s"
    );
    write_runs(o, &a.reads);
    let _ = writeln!(
        o,
        "  read_results from SQL {:>9} results/s   GET /v1/results {:>9} results/s   ratio {:.2}x",
        thousands(a.sql_results_per_sec),
        thousands(a.http_results_per_sec),
        a.read_ratio
    );
}

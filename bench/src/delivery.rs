//! Delivery figures of `herald bench`, in a fresh database `herald_bench_delivery`, with `herald run`
//! running in-process (as `herald demo` does), each next to a plain tool doing the same work in the same
//! run. Figures only: goals are printed PASS/MISS and never fail anything.
//!
//!   a. emails/s: N emails queued by ONE `herald.send` statement, drained into postfix's `smtp-sink`;
//!      next to `smtp-source` pushing N messages of the same size into the same sink (20 sessions).
//!   b. webhooks/s: N webhook jobs INSERTed into the outbox, drained into a tiny HTTP receiver
//!      (`delivery/receiver.rs`); next to `wrk` POSTing to the same receiver, and next to herald's own
//!      claim(100) + complete(100) loop (the queue section's, no I/O) over the same N jobs in the same
//!      run: what the daemon adds on top of the queue (goal: webhooks/s >= 0.8x that rate).
//!   c. latency from `herald.track()` to the final `.` of the message reaching an SMTP server
//!      (`delivery/smtp.rs`, which records when), through a live one-email automation.
//!
//! The peers are child processes on free loopback ports, killed when their guard drops (errors included).
//! Part c runs first: it measures the size of herald's message, which smtp-source then copies.
//! Concurrency stays at most 256: smtp-sink serves about 256 sessions at once, and connections beyond
//! that hang until the client's time-out.

pub(crate) mod receiver;
mod smtp;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tracing::info;

use super::stats::Summary;
use crate::cpu::{machine_cores as cores, Cpu};
use herald_sidecar::db::Target;
use herald_sidecar::run;

/// The database's name: `herald_bench_delivery`, or `<HERALD_BENCH_DB>_delivery` when that is set, so
/// that runs side by side on one machine do not drop each other's database.
fn dbname() -> String {
    match std::env::var("HERALD_BENCH_DB") {
        Ok(base) if !base.is_empty() => format!("{base}_delivery"),
        _ => "herald_bench_delivery".to_owned(),
    }
}
/// `HERALD_BENCH_DELIVERY=webhooks` runs part b alone (a minute less per run when working on it).
fn webhooks_only() -> bool {
    std::env::var("HERALD_BENCH_DELIVERY").is_ok_and(|v| v == "webhooks")
}
/// `HERALD_BENCH_WEBHOOKS=N` drains N webhook jobs instead of 20,000: a drain long enough to profile
/// the daemon (`perf record`) or to average out a shared machine's noise.
fn webhooks_override() -> Option<usize> {
    std::env::var("HERALD_BENCH_WEBHOOKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
}
const WORKSPACE: &str = "bench";
const TEMPLATE: &str = "t";
/// smtp-source sessions (the comparison the goal is stated against).
const SOURCE_SESSIONS: usize = 20;
/// wrk threads and connections.
const WRK_THREADS: usize = 2;
const WRK_CONNECTIONS: usize = 64;
/// The daemon's fallback poll (its default): the latency part tells whether NOTIFY or this timer drives.
const POLL_MS: u64 = 1000;
const EMAIL_GOAL: f64 = 0.70;
const WEBHOOK_GOAL: f64 = 0.50;
/// herald's webhooks/s over its own claim + complete rate with no I/O (issue 14: the daemon adds at
/// most a fifth).
const QUEUE_GOAL: f64 = 0.80;

struct Sizes {
    emails: usize,
    webhooks: usize,
    pings: usize,
    ping_gap: Duration,
    /// HERALD_CONCURRENCY values tried for emails and webhooks (the SMTP pool follows it); the best is kept.
    concurrencies: [usize; 2],
    wrk: Duration,
    /// A drain still running after this is cut short and reported as such.
    timeout: Duration,
}

impl Sizes {
    fn new(small: bool) -> Self {
        if small {
            Self {
                emails: 1_000,
                webhooks: 1_000,
                pings: 30,
                ping_gap: Duration::from_millis(20),
                concurrencies: [64, 256],
                wrk: Duration::from_secs(2),
                timeout: Duration::from_secs(15),
            }
        } else {
            Self {
                emails: 20_000,
                webhooks: 20_000,
                pings: 200,
                ping_gap: Duration::from_millis(20),
                concurrencies: [64, 256],
                wrk: Duration::from_secs(5),
                timeout: Duration::from_secs(45),
            }
        }
    }
}

pub async fn run(target: &Target, small: bool) -> Result<(String, Value)> {
    let mut sizes = Sizes::new(small);
    if let Some(n) = webhooks_override() {
        sizes.webhooks = n;
    }
    let target = target.with_dbname(&dbname());
    let db = target.recreate_with_extension().await?;
    db.batch_execute(&format!(
        "SELECT herald.create_workspace('{WORKSPACE}', 'Delivery bench');
         SELECT herald.upsert_template('{WORKSPACE}', '{TEMPLATE}', 'News for {{{{ contact.email }}}}',
                '<p>Hello {{{{ contact.email }}}}, here is the news.</p>',
                'Hello {{{{ contact.email }}}}, here is the news.');"
    ))
    .await
    .context("creating the workspace and template")?;
    // optional (needs shared_preload_libraries): server time of claim() and complete() per drain
    if let Err(e) = db
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
    {
        info!("pg_stat_statements unavailable ({e}): no claim/complete server times");
    }
    info!("database {} ready", dbname());

    if webhooks_only() {
        let webhooks = webhooks(&target, &db, &sizes).await?;
        let mut text = format!(
            "\nDelivery{}, webhooks only (HERALD_BENCH_DELIVERY=webhooks; database {})\n",
            if small { " --small" } else { "" },
            dbname()
        );
        Report::render_webhooks(&webhooks, &mut text);
        let json = json!({"small": small, "webhooks": webhooks.json(), "goals": webhooks.goals()});
        return Ok((text, json));
    }

    let latency = latency(&target, &db, &sizes).await?;
    let emails = emails(&target, &db, &sizes, latency.message_bytes).await?;
    let webhooks = webhooks(&target, &db, &sizes).await?;

    let report = Report {
        small,
        emails,
        webhooks,
        latency,
    };
    Ok((report.render(), report.json()))
}

// ------------------------------------------------------------------------------------------- the daemon

/// `herald run` in-process; stopped the way SIGTERM would (also when dropped).
pub(crate) struct Daemon {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
}

impl Daemon {
    pub(crate) fn start(target: &Target, settings: &[(&str, String)]) -> Result<Self> {
        let mut raw: BTreeMap<String, String> = [
            ("HERALD_WORKER_ID", "bench-delivery"),
            ("HERALD_FROM", "Bench <bench@example.com>"),
            ("HERALD_SHUTDOWN_GRACE_SECONDS", "5"),
            ("HERALD_WEBHOOK_SECRET", "bench-secret"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        raw.insert("HERALD_POLL_INTERVAL_MS".into(), POLL_MS.to_string());
        for (k, v) in settings {
            raw.insert((*k).to_string(), v.clone());
        }
        let mut config = run::Config::from_map(&raw)?;
        config.database = target.config().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run::run(config, async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub(crate) fn exited(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    pub(crate) async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.context("the daemon task panicked")?,
            None => Ok(()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// How a drain of the outbox went: from the daemon's start until nothing is pending or leased.
#[derive(Debug, Clone, Copy, Default)]
struct Drain {
    jobs: usize,
    secs: f64,
    per_sec: f64,
    done: i64,
    failed: i64,
    /// Jobs that needed more than one attempt.
    retried: i64,
    timed_out: bool,
    /// Jobs done per second from the first lease to the last result (outbox leased_at/done_at, server
    /// clock): the rate without the daemon's start-up, measured as the claim + complete loop is.
    span_per_sec: f64,
    /// Claim to recorded result (outbox leased_at → done_at): send plus the completer's batching.
    leased_to_done_p50_ms: f64,
    leased_to_done_mean_ms: f64,
    /// Little's law: jobs leased on average (per_sec × mean leased → done).
    leased_mean: f64,
    /// Server time of the daemon's claim() and complete() calls during the drain (pg_stat_statements).
    db: Option<DbTime>,
    /// CPU cores in use on average during the drain: this process (the daemon, the receivers) and
    /// the whole machine (this process, Postgres, the peers).
    cpu_own: Option<f64>,
    cpu_machine: Option<f64>,
    /// The daemon's own view (/metrics): mean time from claim to result per job, as the executor saw it.
    job_mean_ms: Option<f64>,
}

/// The daemon's /metrics page as text (headers included); `None` when it does not answer within 5 s.
pub(crate) async fn scrape_metrics(addr: SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut text))
        .await
        .ok()?
        .ok()?;
    Some(text)
}

/// Mean of herald_job_duration_seconds over every kind, from the daemon's /metrics.
async fn job_mean_ms(addr: SocketAddr) -> Option<f64> {
    let text = scrape_metrics(addr).await?;
    let total = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let count = total("herald_job_duration_seconds_count");
    (count > 0.0).then(|| total("herald_job_duration_seconds_sum") / count * 1000.0)
}

/// Calls and total execution time of herald.claim / herald.complete in this database, from
/// pg_stat_statements (None when it is not loaded).
#[derive(Debug, Clone, Copy, Default)]
struct DbTime {
    claim_calls: i64,
    claim_ms: f64,
    complete_calls: i64,
    complete_ms: f64,
}

impl DbTime {
    async fn read(db: &Client) -> Option<Self> {
        let r = db
            .query_one(
                "SELECT coalesce(sum(calls) FILTER (WHERE query LIKE '%herald.claim(%'), 0)::int8,
                        coalesce(sum(total_exec_time) FILTER (WHERE query LIKE '%herald.claim(%'), 0)::float8,
                        coalesce(sum(calls) FILTER (WHERE query LIKE '%herald.complete(%'), 0)::int8,
                        coalesce(sum(total_exec_time) FILTER (WHERE query LIKE '%herald.complete(%'), 0)::float8
                   FROM pg_stat_statements
                  WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .ok()?;
        Some(Self {
            claim_calls: r.get(0),
            claim_ms: r.get(1),
            complete_calls: r.get(2),
            complete_ms: r.get(3),
        })
    }

    /// None when the counters went backwards (someone reset pg_stat_statements meanwhile).
    fn since(self, before: Self) -> Option<Self> {
        let d = Self {
            claim_calls: self.claim_calls - before.claim_calls,
            claim_ms: self.claim_ms - before.claim_ms,
            complete_calls: self.complete_calls - before.complete_calls,
            complete_ms: self.complete_ms - before.complete_ms,
        };
        let sane = d.claim_calls >= 0
            && d.complete_calls >= 0
            && d.claim_ms >= 0.0
            && d.complete_ms >= 0.0;
        sane.then_some(d)
    }
}

/// Starts the daemon and polls the outbox every 50 ms until every job is finished.
async fn drain(
    target: &Target,
    db: &Client,
    settings: &[(&str, String)],
    jobs: usize,
    timeout: Duration,
) -> Result<Drain> {
    let db_before = DbTime::read(db).await;
    let cpu_before = Cpu::read();
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mut settings = settings.to_vec();
    settings.push(("HERALD_METRICS_ADDR", metrics.to_string()));
    let started = Instant::now();
    let daemon = Daemon::start(target, &settings)?;
    let mut timed_out = false;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let open: i64 = db
            .query_one(
                "SELECT count(*) FROM herald.outbox WHERE status IN ('pending', 'leased')",
                &[],
            )
            .await?
            .get(0);
        if open == 0 {
            break;
        }
        if daemon.exited() {
            daemon.stop().await?;
            bail!("herald run stopped on its own with {open} jobs open");
        }
        if started.elapsed() > timeout {
            timed_out = true;
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = Cpu::cores(cpu_before, Cpu::read(), secs);
    let job_mean = job_mean_ms(metrics).await;
    daemon.stop().await?;
    let db_time = match (db_before, DbTime::read(db).await) {
        (Some(before), Some(after)) => after.since(before),
        _ => None,
    };
    let r = db
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'done'),
                    count(*) FILTER (WHERE status IN ('failed', 'dead')),
                    count(*) FILTER (WHERE attempt > 1),
                    coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM done_at - leased_at))
                             FILTER (WHERE status = 'done'), 0)::float8 * 1000,
                    coalesce(avg(extract(epoch FROM done_at - leased_at)) FILTER (WHERE status = 'done'), 0)::float8 * 1000,
                    coalesce(extract(epoch FROM max(done_at) FILTER (WHERE status = 'done')
                                          - min(leased_at) FILTER (WHERE status = 'done')), 0)::float8
               FROM herald.outbox",
            &[],
        )
        .await?;
    let done: i64 = r.get(0);
    let per_sec = done as f64 / secs;
    let mean_ms: f64 = r.get(4);
    let span: f64 = r.get(5);
    Ok(Drain {
        jobs,
        secs,
        per_sec,
        span_per_sec: if span > 0.0 { done as f64 / span } else { 0.0 },
        done,
        failed: r.get(1),
        retried: r.get(2),
        timed_out,
        leased_to_done_p50_ms: r.get(3),
        leased_to_done_mean_ms: mean_ms,
        leased_mean: per_sec * mean_ms / 1000.0,
        db: db_time,
        cpu_own: cpu.map(|c| c.0),
        cpu_machine: cpu.map(|c| c.1),
        job_mean_ms: job_mean,
    })
}

/// Empties the queue between runs, so each starts from the same tables.
async fn reset_queue(db: &Client) -> Result<()> {
    db.batch_execute("TRUNCATE herald.outbox, herald.message_history")
        .await
        .context("emptying the outbox")
}

// ------------------------------------------------------------------------------------------- the peers

/// A child process, killed and reaped when dropped; its output goes to temporary files.
pub(crate) struct Peer {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Peer {
    fn spawn(bin: &Path, args: &[String]) -> Result<Self> {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = std::env::temp_dir().join(format!(
            "herald-bench-delivery-{}-{seq}-{}",
            std::process::id(),
            bin.file_name().and_then(|n| n.to_str()).unwrap_or("peer")
        ));
        let stdout = base.with_extension("out");
        let stderr = base.with_extension("err");
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout)?)
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            child,
            stdout,
            stderr,
        })
    }

    fn output(&self) -> (String, String) {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        (read(&self.stdout), read(&self.stderr))
    }

    /// Waits for the process to exit on its own (off the async threads); the wall clock it took.
    async fn finish(mut self, what: &str) -> Result<(Duration, String)> {
        let started = Instant::now();
        let (status, peer) = tokio::task::spawn_blocking(move || {
            let status = self.child.wait();
            (status, self)
        })
        .await?;
        let took = started.elapsed();
        let (out, err) = peer.output();
        if !status?.success() {
            bail!("{what} failed: {}", err.trim());
        }
        Ok((took, out))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stdout);
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// `name` on PATH or in the sbin folders where Debian's postfix puts its tools.
pub(crate) fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/lib/postfix/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// postfix's smtp-sink on a free loopback port, once it accepts connections.
pub(crate) async fn start_sink(bin: &Path) -> Result<(Peer, SocketAddr)> {
    let root = is_root();
    let mut last = String::new();
    for _ in 0..3 {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let mut args: Vec<String> = Vec::new();
        if root {
            // smtp-sink insists on dropping root privileges
            args.extend(["-u".into(), "nobody".into()]);
        }
        args.extend([addr.to_string(), "1000".into()]);
        let mut peer = Peer::spawn(bin, &args)?;
        for _ in 0..60 {
            if peer.child.try_wait()?.is_some() {
                break;
            }
            if StdStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok((peer, addr));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        last = peer.output().1;
        // the port may have been taken between choosing and binding it: another one
    }
    bail!("smtp-sink did not start: {}", last.trim())
}

// ------------------------------------------------------------------------------------------- a. emails

struct Emails {
    jobs: usize,
    trials: Vec<(usize, f64, Drain)>, // concurrency (= SMTP pool), enqueue seconds, drain
    best: usize,
    /// smtp-source: message bytes, seconds, msgs/s; None when postfix's tools are missing.
    source: Option<(usize, f64, f64)>,
    skipped: Option<String>,
}

async fn emails(target: &Target, db: &Client, sizes: &Sizes, bytes: usize) -> Result<Emails> {
    let mut out = Emails {
        jobs: sizes.emails,
        trials: Vec::new(),
        best: 0,
        source: None,
        skipped: None,
    };
    let (Some(sink_bin), Some(source_bin)) = (find_tool("smtp-sink"), find_tool("smtp-source"))
    else {
        out.skipped =
            Some("postfix's smtp-sink/smtp-source not found (apt-get install postfix)".into());
        return Ok(out);
    };
    let (sink, addr) = start_sink(&sink_bin).await?;
    for &concurrency in &sizes.concurrencies {
        reset_queue(db).await?;
        let started = Instant::now();
        db.execute(
            "SELECT count(herald.send($1, 'r' || i || '@example.com', $2, '{}')) FROM generate_series(1, $3::int) i",
            &[&WORKSPACE, &TEMPLATE, &(sizes.emails as i32)],
        )
        .await
        .context("queueing the emails")?;
        let enqueue = started.elapsed().as_secs_f64();
        db.batch_execute("ANALYZE herald.outbox").await?;
        info!(
            "{} emails queued in {enqueue:.2} s; draining at concurrency {concurrency}",
            sizes.emails
        );
        let settings = [
            ("HERALD_CONCURRENCY", concurrency.to_string()),
            (
                "HERALD_SMTP_URL_DEFAULT",
                format!("smtp://{addr}?tls=none&pool={concurrency}"),
            ),
        ];
        let d = drain(target, db, &settings, sizes.emails, sizes.timeout).await?;
        info!(
            "concurrency {concurrency}: {:.0} emails/s ({} done in {:.2} s)",
            d.per_sec, d.done, d.secs
        );
        out.trials.push((concurrency, enqueue, d));
    }
    out.best = best(&out.trials);

    let args: Vec<String> = [
        "-s".to_string(),
        SOURCE_SESSIONS.to_string(),
        "-m".into(),
        sizes.emails.to_string(),
        "-l".into(),
        bytes.to_string(),
        "-f".into(),
        "bench@example.com".into(),
        "-t".into(),
        "r@example.com".into(),
        addr.to_string(),
    ]
    .into();
    let (took, _) = Peer::spawn(&source_bin, &args)?
        .finish("smtp-source")
        .await?;
    let secs = took.as_secs_f64();
    out.source = Some((bytes, secs, sizes.emails as f64 / secs));
    info!("smtp-source: {} messages in {secs:.2} s", sizes.emails);
    drop(sink);
    Ok(out)
}

fn best(trials: &[(usize, f64, Drain)]) -> usize {
    (0..trials.len())
        .max_by(|&a, &b| trials[a].2.per_sec.total_cmp(&trials[b].2.per_sec))
        .unwrap_or(0)
}

// ------------------------------------------------------------------------------------------- b. webhooks

struct Webhooks {
    jobs: usize,
    trials: Vec<(usize, f64, Drain)>,
    best: usize,
    /// Requests the receiver answered during each herald trial.
    received: Vec<u64>,
    /// wrk: seconds, requests/s; None when wrk is missing.
    wrk: Option<(f64, f64)>,
    wrk_missing: bool,
    /// herald's claim(100) + complete(100) loop over the same jobs, no I/O: (jobs/s, claim, complete).
    queue: Option<(f64, Summary, Summary)>,
}

/// `n` webhook jobs to `url`, as the daemon's executor would find them from a journey's webhook node.
async fn queue_webhooks(db: &Client, url: &str, n: usize) -> Result<f64> {
    reset_queue(db).await?;
    let started = Instant::now();
    db.execute(
        "INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, rate_keys, payload)
         SELECT $1, 'webhook', 'w' || i, ARRAY['host:127.0.0.1'],
                jsonb_build_object('url', $2::text, 'method', 'POST', 'headers', '{}'::jsonb,
                                   'body', jsonb_build_object('n', i), 'timeout_ms', 5000, 'node', 'hook')
           FROM generate_series(1, $3::int) i",
        &[&WORKSPACE, &url, &(n as i32)],
    )
    .await
    .context("queueing the webhooks")?;
    let enqueue = started.elapsed().as_secs_f64();
    db.batch_execute("ANALYZE herald.outbox").await?;
    Ok(enqueue)
}

async fn webhooks(target: &Target, db: &Client, sizes: &Sizes) -> Result<Webhooks> {
    let receiver = receiver::Receiver::start().await?;
    let url = format!("http://{}/hook", receiver.addr);
    let mut out = Webhooks {
        jobs: sizes.webhooks,
        trials: Vec::new(),
        best: 0,
        received: Vec::new(),
        wrk: None,
        wrk_missing: false,
        queue: None,
    };
    // the same jobs, claimed and completed by the queue section's loop: no HTTP, no daemon
    queue_webhooks(db, &url, sizes.webhooks).await?;
    let (t, claim, complete) = super::queue::herald(db, sizes.webhooks).await?;
    info!(
        "webhooks: claim + complete without I/O: {:.0} jobs/s ({} jobs)",
        t.jobs_per_sec, t.jobs
    );
    out.queue = Some((t.jobs_per_sec, claim, complete));
    for &concurrency in &sizes.concurrencies {
        let enqueue = queue_webhooks(db, &url, sizes.webhooks).await?;
        let before = receiver.requests();
        let settings = [
            ("HERALD_CONCURRENCY", concurrency.to_string()),
            ("HERALD_WEBHOOK_ALLOW", "127.0.0.1".to_string()),
        ];
        let d = drain(target, db, &settings, sizes.webhooks, sizes.timeout).await?;
        info!(
            "webhooks at concurrency {concurrency}: {:.0}/s ({} done in {:.2} s)",
            d.per_sec, d.done, d.secs
        );
        out.received.push(receiver.requests() - before);
        out.trials.push((concurrency, enqueue, d));
    }
    out.best = best(&out.trials);

    let Some(wrk) = find_tool("wrk") else {
        out.wrk_missing = true;
        return Ok(out);
    };
    let script = std::env::temp_dir().join(format!(
        "herald-bench-delivery-{}-post.lua",
        std::process::id()
    ));
    std::fs::write(
        &script,
        "wrk.method = \"POST\"\n\
         wrk.body = '{\"n\":12345}'\n\
         wrk.headers[\"Content-Type\"] = \"application/json\"\n\
         wrk.headers[\"Idempotency-Key\"] = \"w12345\"\n\
         wrk.headers[\"X-Herald-Timestamp\"] = \"1700000000\"\n\
         wrk.headers[\"X-Herald-Signature\"] = \"sha256=0000000000000000000000000000000000000000000000000000000000000000\"\n",
    )?;
    let args = vec![
        format!("-t{WRK_THREADS}"),
        format!("-c{WRK_CONNECTIONS}"),
        format!("-d{}s", sizes.wrk.as_secs()),
        "-s".into(),
        script.display().to_string(),
        url,
    ];
    let ran = match Peer::spawn(&wrk, &args) {
        Ok(peer) => peer.finish("wrk").await,
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_file(&script);
    let (took, stdout) = ran?;
    let rps = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| anyhow!("no Requests/sec in wrk's output: {stdout}"))?;
    out.wrk = Some((took.as_secs_f64(), rps));
    info!("wrk: {rps:.0} requests/s");
    Ok(out)
}

impl Webhooks {
    fn wrk_ratio(&self) -> Option<f64> {
        Some(self.trials.get(self.best)?.2.per_sec / self.wrk?.1)
    }

    /// The best trial's webhooks/s (first lease to last result) over claim + complete with no I/O.
    fn queue_ratio(&self) -> Option<f64> {
        let best = self
            .trials
            .iter()
            .map(|t| t.2.span_per_sec)
            .fold(0.0, f64::max);
        let (queue, _, _) = self.queue?;
        (queue > 0.0 && best > 0.0).then(|| best / queue)
    }

    fn json(&self) -> Value {
        let w = self;
        json!({
            "jobs": w.jobs,
            "trials": w.trials.iter().map(|(c, q, d)| drain_json(*c, *q, d)).collect::<Vec<_>>(),
            "received": w.received,
            "best_concurrency": w.trials.get(w.best).map(|x| x.0),
            "herald_per_sec": w.trials.get(w.best).map(|t| t.2.per_sec),
            "wrk": w.wrk.map(|(secs, rps)| json!({
                "threads": WRK_THREADS, "connections": WRK_CONNECTIONS, "secs": secs, "requests_per_sec": rps})),
            "herald_over_wrk": w.wrk_ratio(),
            "claim_complete_no_io": w.queue.map(|(rate, claim, complete)| json!({
                "jobs_per_sec": rate, "claim": summary_json(&claim), "complete": summary_json(&complete)})),
            "herald_over_claim_complete": w.queue_ratio(),
        })
    }

    fn goals(&self) -> [Value; 2] {
        [
            goal(
                "herald webhooks/s >= 50% of wrk",
                self.wrk_ratio(),
                WEBHOOK_GOAL,
            ),
            goal(
                "herald webhooks/s >= 0.8x claim+complete without I/O (same run)",
                self.queue_ratio(),
                QUEUE_GOAL,
            ),
        ]
    }
}

// ------------------------------------------------------------------------------------------- c. latency

struct Latency {
    calls: usize,
    gap_ms: u64,
    accepted: usize,
    /// track() started → final '.' received by the SMTP server.
    end_to_end: Summary,
    /// The track() call itself (client side).
    track: Summary,
    /// Stages by wall clock: track() started → outbox row created (the tick that ran the step),
    /// → leased by claim, → accepted by the SMTP server.
    to_queued: Summary,
    to_leased: Summary,
    to_accepted: Summary,
    /// Inside DATA: the longest pause between two lines of the message, the final '.' included.
    longest_pause: Summary,
    message_bytes: usize,
}

async fn latency(target: &Target, db: &Client, sizes: &Sizes) -> Result<Latency> {
    let server = smtp::SmtpServer::start().await?;
    let automation = json!({
        "name": "latency",
        "trigger": {"event": "ping"},
        "reentry": "always",
        "start": "mail",
        "nodes": {"mail": {"type": "email", "template": TEMPLATE}}
    });
    let id: i64 = db
        .query_one(
            "SELECT herald.create_automation($1, $2)",
            &[&WORKSPACE, &automation],
        )
        .await?
        .get(0);
    db.execute("SELECT herald.set_automation_status($1, 'live')", &[&id])
        .await?;
    let settings = [
        ("HERALD_CONCURRENCY", "64".to_string()),
        (
            "HERALD_SMTP_URL_DEFAULT",
            format!("smtp://{}?tls=none&pool=16", server.addr),
        ),
    ];
    let daemon = Daemon::start(target, &settings)?;
    let track = db.prepare("SELECT herald.track($1, $2, 'ping')").await?;

    // warm-up: the daemon is listening, connected and has sent once before the clock starts
    db.execute(&track, &[&WORKSPACE, &"warm@example.com"])
        .await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while server.accepted("warm@example.com").is_none() {
        if daemon.exited() || Instant::now() > deadline {
            daemon.stop().await?;
            bail!("the warm-up email never reached the bench SMTP server");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    info!(
        "latency: {} track() calls, {} ms apart",
        sizes.pings,
        sizes.ping_gap.as_millis()
    );
    let mut calls = Vec::with_capacity(sizes.pings);
    for i in 0..sizes.pings {
        let email = format!("lat{i}@example.com");
        let (at, wall) = (Instant::now(), SystemTime::now());
        db.execute(&track, &[&WORKSPACE, &email]).await?;
        let took = at.elapsed();
        calls.push((email, at, wall, took));
        tokio::time::sleep_until((at + sizes.ping_gap).into()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while calls.iter().any(|c| server.accepted(&c.0).is_none()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.stop().await?;
    db.execute("SELECT herald.set_automation_status($1, 'paused')", &[&id])
        .await?;

    let rows = db
        .query(
            "SELECT c.email, o.created_at, o.leased_at FROM herald.outbox o
               JOIN herald.contacts c ON c.workspace_id = o.workspace_id AND c.id = o.contact_id
              WHERE o.workspace_id = $1 AND o.kind = 'email' AND c.email LIKE 'lat%'",
            &[&WORKSPACE],
        )
        .await?;
    let stamps: BTreeMap<String, (SystemTime, Option<SystemTime>)> = rows
        .iter()
        .map(|r| {
            let created: chrono::DateTime<chrono::Utc> = r.get(1);
            let leased: Option<chrono::DateTime<chrono::Utc>> = r.get(2);
            (r.get(0), (created.into(), leased.map(Into::into)))
        })
        .collect();
    let since = |a: SystemTime, b: SystemTime| b.duration_since(a).unwrap_or_default();
    let (mut e2e, mut queued, mut leased, mut sent, mut bytes, mut dot) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (email, at, wall, _) in &calls {
        let Some(got) = server.accepted(email) else {
            continue;
        };
        e2e.push(got.at.duration_since(*at));
        bytes.push(got.bytes);
        dot.push(got.longest_pause);
        if let Some(&(created, Some(lease))) = stamps.get(email) {
            queued.push(since(*wall, created));
            leased.push(since(created, lease));
            sent.push(since(lease, got.wall));
        }
    }
    let track_times: Vec<Duration> = calls.iter().map(|c| c.3).collect();
    let message_bytes = match server.accepted("warm@example.com") {
        Some(w) if bytes.is_empty() => w.bytes,
        _ => bytes.iter().sum::<usize>() / bytes.len().max(1),
    };
    info!(
        "latency: {} of {} messages accepted",
        e2e.len(),
        calls.len()
    );
    Ok(Latency {
        calls: calls.len(),
        gap_ms: sizes.ping_gap.as_millis() as u64,
        accepted: e2e.len(),
        end_to_end: Summary::of(&e2e),
        track: Summary::of(&track_times),
        to_queued: Summary::of(&queued),
        to_leased: Summary::of(&leased),
        to_accepted: Summary::of(&sent),
        longest_pause: Summary::of(&dot),
        message_bytes,
    })
}

// ------------------------------------------------------------------------------------------- the report

struct Report {
    small: bool,
    emails: Emails,
    webhooks: Webhooks,
    latency: Latency,
}

fn goal(goal: &str, value: Option<f64>, at_least: f64) -> Value {
    json!({"goal": goal, "value": value, "pass": value.is_some_and(|v| v >= at_least)})
}

fn verdict(value: Option<f64>, at_least: f64) -> &'static str {
    match value {
        Some(v) if v >= at_least => "PASS",
        Some(_) => "MISS",
        None => "n/a",
    }
}

fn drain_json(concurrency: usize, enqueue_secs: f64, d: &Drain) -> Value {
    json!({
        "concurrency": concurrency,
        "enqueue_secs": enqueue_secs,
        "jobs": d.jobs,
        "secs": d.secs,
        "per_sec": d.per_sec,
        "done": d.done,
        "failed": d.failed,
        "retried": d.retried,
        "timed_out": d.timed_out,
        "first_lease_to_last_result_per_sec": d.span_per_sec,
        "leased_to_done_p50_ms": d.leased_to_done_p50_ms,
        "leased_to_done_mean_ms": d.leased_to_done_mean_ms,
        "leased_mean": d.leased_mean,
        "claim_calls": d.db.map(|t| t.claim_calls),
        "claim_ms_total": d.db.map(|t| t.claim_ms),
        "complete_calls": d.db.map(|t| t.complete_calls),
        "complete_ms_total": d.db.map(|t| t.complete_ms),
        "cpu_cores_own": d.cpu_own,
        "cpu_cores_machine": d.cpu_machine,
        "job_mean_ms": d.job_mean_ms,
    })
}

fn summary_json(s: &Summary) -> Value {
    serde_json::to_value(s).unwrap_or(Value::Null)
}

impl Report {
    fn email_ratio(&self) -> Option<f64> {
        let e = &self.emails;
        Some(e.trials.get(e.best)?.2.per_sec / e.source?.2)
    }

    /// The step engine is driven by NOTIFY when even the slow calls were queued well within one poll.
    fn notify_drives(&self) -> bool {
        self.latency.to_queued.p99_ms < POLL_MS as f64 / 2.0
    }

    fn json(&self) -> Value {
        let (e, w, l) = (&self.emails, &self.webhooks, &self.latency);
        let webhook_goals = w.goals();
        let best_of = |t: &[(usize, f64, Drain)], b: usize| t.get(b).map(|x| x.0);
        json!({
            "small": self.small,
            "emails": {
                "jobs": e.jobs,
                "skipped": e.skipped,
                "trials": e.trials.iter().map(|(c, q, d)| drain_json(*c, *q, d)).collect::<Vec<_>>(),
                "best_concurrency": best_of(&e.trials, e.best),
                "herald_per_sec": e.trials.get(e.best).map(|t| t.2.per_sec),
                "smtp_source": e.source.map(|(bytes, secs, rate)| json!({
                    "sessions": SOURCE_SESSIONS, "message_bytes": bytes, "secs": secs, "per_sec": rate})),
                "herald_over_smtp_source": self.email_ratio(),
            },
            "webhooks": w.json(),
            "latency": {
                "calls": l.calls,
                "gap_ms": l.gap_ms,
                "accepted": l.accepted,
                "poll_interval_ms": POLL_MS,
                "end_to_end": summary_json(&l.end_to_end),
                "track_call": summary_json(&l.track),
                "track_to_queued": summary_json(&l.to_queued),
                "queued_to_leased": summary_json(&l.to_leased),
                "leased_to_accepted": summary_json(&l.to_accepted),
                "longest_pause_inside_data": summary_json(&l.longest_pause),
                "message_bytes": l.message_bytes,
                "step_engine_driven_by": if self.notify_drives() { "notify" } else { "timer" },
            },
            "goals": [
                goal("herald emails/s >= 70% of smtp-source", self.email_ratio(), EMAIL_GOAL),
                webhook_goals[0],
                webhook_goals[1],
            ],
        })
    }

    fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "\nDelivery{}: herald run in-process, every peer on 127.0.0.1 (database {})",
            if self.small { " --small" } else { "" },
            dbname()
        );
        self.render_emails(&mut o);
        Self::render_webhooks(&self.webhooks, &mut o);
        self.render_latency(&mut o);
        o
    }

    fn trials_table(o: &mut String, unit: &str, trials: &[(usize, f64, Drain)], best: usize) {
        let _ = writeln!(
            o,
            "  {:>11} | {:>9} | {:>7} | {:>10} | {:>14} | {:>12} | {:>24} | {:>24} | {:>14}",
            "concurrency",
            "queued in",
            "seconds",
            unit,
            "job ms (slots",
            "leased->done",
            "claim(): calls x avg,",
            "complete(): calls x avg,",
            "CPU cores:"
        );
        let _ = writeln!(
            o,
            "  {:>11} | {:>9} | {:>7} | {:>10} | {:>14} | {:>12} | {:>24} | {:>24} | {:>14}",
            "",
            "",
            "",
            "",
            "busy on avg)",
            "p50 ms",
            "busy (server time)",
            "busy (server time)",
            format!("herald/all of {}", cores())
        );
        for (i, (c, q, d)) in trials.iter().enumerate() {
            let mut note = String::new();
            if d.done != d.jobs as i64 {
                note += &format!("  {} of {} done", d.done, d.jobs);
            }
            if d.failed > 0 || d.retried > 0 {
                note += &format!("  {} failed, {} retried", d.failed, d.retried);
            }
            if d.timed_out {
                note += "  cut short (time limit)";
            }
            if i == best {
                note += "  <- best";
            }
            let busy = |calls: i64, ms: f64| {
                format!(
                    "{:>5} x {:>5.1} ms, {:>3.0}%",
                    calls,
                    ms / calls.max(1) as f64,
                    100.0 * ms / (d.secs * 1000.0)
                )
            };
            let (claim, complete) = match d.db {
                Some(t) => (
                    busy(t.claim_calls, t.claim_ms),
                    busy(t.complete_calls, t.complete_ms),
                ),
                None => ("n/a".to_string(), "n/a".to_string()),
            };
            let cpu = match (d.cpu_own, d.cpu_machine) {
                (Some(own), Some(all)) => format!("{own:.2} / {all:.2}"),
                _ => "n/a".to_string(),
            };
            let job = match d.job_mean_ms {
                Some(ms) => format!("{ms:.1} ({:.0})", d.per_sec * ms / 1000.0),
                None => "n/a".to_string(),
            };
            let _ = writeln!(
                o,
                "  {:>11} | {:>7.2} s | {:>7.2} | {:>10} | {:>14} | {:>12.1} | {:>24} | {:>24} | {:>14}{note}",
                c,
                q,
                d.secs,
                super::thousands(d.per_sec),
                job,
                d.leased_to_done_p50_ms,
                claim,
                complete,
                cpu
            );
        }
        let _ = writeln!(
            o,
            "  (job = claim to result in the executor, from /metrics; busy = server time / drain time: one producer\n   \
             claims and one completer records, one call at a time; seconds run from the daemon's start to the last result)"
        );
    }

    fn render_emails(&self, o: &mut String) {
        let e = &self.emails;
        let _ = writeln!(
            o,
            "\na. Email: {} queued by one herald.send() statement, drained into postfix smtp-sink (SMTP pool = concurrency)",
            super::thousands(e.jobs as f64)
        );
        if let Some(why) = &e.skipped {
            let _ = writeln!(o, "  skipped: {why}");
            return;
        }
        Self::trials_table(o, "emails/s", &e.trials, e.best);
        let _ = writeln!(
            o,
            "  (the first run's send() also creates the {} contacts and their contact.created events)",
            super::thousands(e.jobs as f64)
        );
        if let (Some((c, _, d)), Some((bytes, secs, rate))) = (e.trials.get(e.best), e.source) {
            let _ = writeln!(
                o,
                "  herald run, concurrency {c:<4}                 {:>8} emails/s",
                super::thousands(d.per_sec)
            );
            let _ = writeln!(
                o,
                "  smtp-source, {SOURCE_SESSIONS} sessions, {bytes} B/message  {:>8} msgs/s   ({secs:.2} s)",
                super::thousands(rate)
            );
            let ratio = self.email_ratio();
            let _ = writeln!(
                o,
                "  herald / smtp-source = {:.2}   goal >= {EMAIL_GOAL:.2}: {}",
                ratio.unwrap_or(0.0),
                verdict(ratio, EMAIL_GOAL)
            );
        }
    }

    fn render_webhooks(w: &Webhooks, o: &mut String) {
        let _ = writeln!(
            o,
            "\nb. Webhooks: {} POSTs INSERTed into herald.outbox, drained into a tokio HTTP receiver (keep-alive, 200 + JSON)",
            super::thousands(w.jobs as f64)
        );
        Self::trials_table(o, "webhooks/s", &w.trials, w.best);
        if w.received
            .iter()
            .zip(&w.trials)
            .any(|(r, t)| *r != t.2.done as u64)
        {
            let _ = writeln!(
                o,
                "  note: requests received per run {:?} differ from jobs done",
                w.received
            );
        }
        let Some((c, _, d)) = w.trials.get(w.best) else {
            return;
        };
        let _ = writeln!(
            o,
            "  herald run, concurrency {c:<4}                 {:>8} webhooks/s",
            super::thousands(d.per_sec)
        );
        match w.wrk {
            Some((secs, rps)) => {
                let _ = writeln!(
                    o,
                    "  wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS}, same receiver         {:>8} requests/s ({secs:.1} s)",
                    super::thousands(rps)
                );
                let ratio = w.wrk_ratio();
                let _ = writeln!(
                    o,
                    "  herald / wrk = {:.2}   goal >= {WEBHOOK_GOAL:.2}: {}",
                    ratio.unwrap_or(0.0),
                    verdict(ratio, WEBHOOK_GOAL)
                );
            }
            None if w.wrk_missing => {
                let _ = writeln!(
                    o,
                    "  wrk not found (apt-get install wrk): goal >= {WEBHOOK_GOAL:.2} of wrk: n/a"
                );
            }
            None => {}
        }
        if let Some((rate, claim, complete)) = w.queue {
            let best = w
                .trials
                .iter()
                .map(|t| t.2.span_per_sec)
                .fold(0.0, f64::max);
            let _ = writeln!(
                o,
                "  herald claim(100) + complete(100), no I/O, same {} jobs, one connection: {:>8} jobs/s \
                 (claim p50 {:.1} ms, complete p50 {:.1} ms)",
                super::thousands(w.jobs as f64),
                super::thousands(rate),
                claim.p50_ms,
                complete.p50_ms
            );
            let ratio = w.queue_ratio();
            let _ = writeln!(
                o,
                "  herald run, first lease -> last result:       {:>8} webhooks/s (best trial)\n  \
                 webhooks / claim+complete = {:.2}   goal >= {QUEUE_GOAL:.2}: {}",
                super::thousands(best),
                ratio.unwrap_or(0.0),
                verdict(ratio, QUEUE_GOAL)
            );
        }
    }

    fn render_latency(&self, o: &mut String) {
        let l = &self.latency;
        let _ = writeln!(
            o,
            "\nc. track() -> accepted by SMTP: {} calls one at a time, {} ms apart; a live one-email automation on 'ping'",
            l.calls, l.gap_ms
        );
        let row = |o: &mut String, name: &str, s: &Summary| {
            let _ = writeln!(
                o,
                "  {name:<44} p50 {:>7.1} ms  p95 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms",
                s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms
            );
        };
        row(
            o,
            "end to end: track() called -> final '.' in",
            &l.end_to_end,
        );
        row(o, "  the track() call itself", &l.track);
        row(o, "  track() called -> outbox row (step ran)", &l.to_queued);
        row(o, "  outbox row -> leased by claim", &l.to_leased);
        row(
            o,
            "  leased -> final '.' in (render + SMTP)",
            &l.to_accepted,
        );
        row(
            o,
            "    of which: longest pause inside DATA",
            &l.longest_pause,
        );
        if l.accepted < l.calls {
            let _ = writeln!(
                o,
                "  only {} of {} messages arrived within 15 s",
                l.accepted, l.calls
            );
        }
        let _ = writeln!(
            o,
            "  (stages by wall clock against the outbox's created_at/leased_at; no goal set; message {} B)",
            l.message_bytes
        );
        let _ = writeln!(
            o,
            "  step engine: herald run calls herald.tick() on each herald.tick NOTIFY (sent when track() commits\n  \
             new enrollments) and on its {POLL_MS} ms poll timer; here p99 track->outbox row = {:.1} ms, so {}",
            l.to_queued.p99_ms,
            if self.notify_drives() {
                "the NOTIFY drives it"
            } else {
                "the timer drives it (the NOTIFY path is not taking effect)"
            }
        );
    }
}

//! `GET /stream` to many subscribers at once: `herald run` in-process with its HTTP side, S
//! subscribers (raw HTTP/1.1 over tokio sockets, bound to several loopback addresses because the
//! daemon takes at most 32 connections per client address), and R results made by the step engine:
//! a live automation on event `ping` whose only node is an exit, fed by `herald.track_many` in chunks;
//! each enrollment completes at its tick and writes one `enrollment.completed` result.
//!
//! Two phases:
//!   live      the subscribers are connected (Last-Event-ID = the newest result before the burst)
//!             before the first track_many; the clock runs from the first track_many until every
//!             subscriber has its R-th event. Production, tick, publishing and the fan-out together.
//!   catch-up  S new subscribers connect with the same Last-Event-ID after the R results are
//!             published: reading and sending only (the clock includes connecting).
//!
//! Every subscriber must receive exactly the R results, each once, in increasing id order: its ids
//! are compared with herald.results' after the run (and a grace period, to catch extra events).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tracing::info;

use super::sse;
use crate::cpu::Cpu;
use herald_sidecar::db::Target;
use herald_sidecar::run;

pub const DBNAME: &str = "herald_bench_stream";
pub const WORKSPACE: &str = "bench";
const TOKEN: &str = "bench-stream-token-0123456789";
const LINK_SECRET: &str = "bench-link-secret-0123456789";
const EVENT: &str = "ping";
pub const KIND: &str = "enrollment.completed";
/// After the last subscriber has everything: how long to keep listening for events that should
/// not come (more than one publishing round, 250 ms, and one stream poll, 1 s).
const GRACE: Duration = Duration::from_millis(1_500);
/// Loopback addresses the live subscribers connect from (the daemon's per-address limit is 32);
/// the catch-up phase uses the next four, the warm-up one more.
const LIVE_FROM: u8 = 1;
const CATCH_UP_FROM: u8 = 5;
const WARM_FROM: u8 = 9;
const ADDRESSES: u8 = 4;

pub struct Sizes {
    pub subscribers: usize,
    pub results: usize,
    pub chunk: usize,
    pub timeout: Duration,
}

#[derive(Debug, Serialize)]
pub struct Phase {
    pub phase: &'static str,
    pub subscribers: usize,
    pub results: usize,
    /// Opening every subscriber (connect + response head), in parallel.
    pub connect_ms: f64,
    /// live: the track_many calls (first call to the last one's return).
    pub produce_secs: Option<f64>,
    /// From the clock's start (live: the first track_many; catch-up: connecting) to the last
    /// subscriber's last event.
    pub secs: f64,
    pub delivered: usize,
    /// results × subscribers / secs.
    pub delivered_per_sec: f64,
    /// Each subscriber's results / its own time to its last event: min, median, max.
    pub per_subscriber_min: f64,
    pub per_subscriber_p50: f64,
    pub per_subscriber_max: f64,
    /// Start to the first event any subscriber got.
    pub first_event_ms: f64,
    /// live: the last track_many's return to the last subscriber's last event.
    pub last_track_to_last_event_ms: Option<f64>,
    /// live: when the server made and published the results (its clock, from the first track_many).
    pub server: Option<ServerTimes>,
    /// CPU cores in use on average from the start to the last event: this process (herald run and
    /// the subscribers) and the whole machine (Postgres included).
    pub cpu: Option<(f64, f64)>,
    /// Subscribers that got exactly the R results, each once, in increasing id order.
    pub correct: usize,
    pub timed_out: bool,
    pub problems: Vec<String>,
}

/// The live burst by the server's clock (the same machine's), in ms from the first track_many call:
/// the last result made (its `at`: the tick statement that ended the enrollment), the first and the
/// last published (`published_at`: the start of the transaction that numbered it; tick() publishes
/// what it staged before it returns).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ServerTimes {
    pub last_made_ms: f64,
    pub first_published_ms: f64,
    pub last_published_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Fanout {
    pub subscribers: usize,
    pub results: usize,
    pub chunk: usize,
    pub addresses: usize,
    pub live: Phase,
    pub catch_up: Phase,
    /// Bytes of one event's data (JSON), on average, as received.
    pub event_data_bytes: f64,
}

pub async fn run(target: &Target, sizes: &Sizes) -> Result<Fanout> {
    let target = target.with_dbname(DBNAME);
    let db = target.recreate_with_extension().await?;
    setup(&db, sizes.results).await?;
    let port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let daemon = Daemon::start(&target, addr)?;
    let out = phases(&db, addr, sizes, &daemon).await;
    daemon.stop().await?;
    let out = out?;
    drop(db);
    let admin = target.with_dbname("postgres").connect().await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)"))
        .await?;
    Ok(out)
}

async fn phases(db: &Client, addr: SocketAddr, sizes: &Sizes, daemon: &Daemon) -> Result<Fanout> {
    wait_for_http(addr, daemon).await?;
    warm_up(db, addr).await?;
    let cursor: i64 = db
        .query_one("SELECT herald.newest_result($1)", &[&WORKSPACE])
        .await?
        .get(0);

    info!(
        "stream: {} subscribers follow /stream; {} results from track_many in chunks of {}",
        sizes.subscribers, sizes.results, sizes.chunk
    );
    let chunks: Vec<Value> = (0..sizes.results)
        .step_by(sizes.chunk)
        .map(|start| {
            (start..sizes.results.min(start + sizes.chunk))
                .map(|i| json!({"email": email(i), "kind": EVENT}))
                .collect::<Vec<_>>()
                .into()
        })
        .collect();
    let track = db
        .prepare("SELECT herald.track_many($1, $2::jsonb)")
        .await?;
    let mut live = Subscribers::open(addr, LIVE_FROM, sizes, cursor).await?;
    let cpu = Cpu::read();
    let (started, wall) = (Instant::now(), SystemTime::now());
    for chunk in &chunks {
        db.query_one(&track, &[&WORKSPACE, chunk])
            .await
            .context("herald.track_many")?;
    }
    let tracked = Instant::now();
    let done = live.wait(sizes.timeout).await;
    let cpu_end = Cpu::read();
    let live = live.finish().await;
    let expected = expected(db, cursor).await?;
    let mut live_phase = live.phase("live", started, sizes, &expected, done);
    live_phase.cpu = Cpu::cores(cpu, cpu_end, live_phase.secs);
    live_phase.produce_secs = Some(tracked.duration_since(started).as_secs_f64());
    live_phase.server = Some(server_times(db, cursor, wall).await?);
    live_phase.last_track_to_last_event_ms = live
        .last_event()
        .map(|t| t.saturating_duration_since(tracked).as_secs_f64() * 1000.0);
    let event_data_bytes = live.data_bytes as f64 / live.events().max(1) as f64;

    info!(
        "stream: catch-up, {} new subscribers from the same cursor",
        sizes.subscribers
    );
    let cpu = Cpu::read();
    let started = Instant::now();
    let mut catch_up = Subscribers::open(addr, CATCH_UP_FROM, sizes, cursor).await?;
    let done = catch_up.wait(sizes.timeout).await;
    let cpu_end = Cpu::read();
    let catch_up = catch_up.finish().await;
    let mut catch_up_phase = catch_up.phase("catch-up", started, sizes, &expected, done);
    catch_up_phase.cpu = Cpu::cores(cpu, cpu_end, catch_up_phase.secs);

    Ok(Fanout {
        subscribers: sizes.subscribers,
        results: sizes.results,
        chunk: sizes.chunk,
        addresses: ADDRESSES as usize,
        live: live_phase,
        catch_up: catch_up_phase,
        event_data_bytes,
    })
}

fn email(i: usize) -> String {
    format!("f{i}@stream.example")
}

/// The workspace, `contacts` contacts (so that track_many only records events), and the live
/// automation: trigger `ping`, a single exit node.
async fn setup(db: &Client, contacts: usize) -> Result<()> {
    db.execute("SELECT herald.create_workspace($1)", &[&WORKSPACE])
        .await?;
    for start in (0..contacts).step_by(10_000) {
        let chunk: Vec<Value> = (start..contacts.min(start + 10_000))
            .map(|i| json!({"email": email(i)}))
            .collect();
        db.execute(
            "SELECT inserted FROM herald.upsert_contacts($1, $2)",
            &[&WORKSPACE, &Value::from(chunk)],
        )
        .await
        .context("creating the contacts")?;
    }
    let definition = json!({
        "name": "stream bench",
        "trigger": {"event": EVENT},
        "reentry": "always",
        "start": "done",
        "nodes": {"done": {"type": "exit"}}
    });
    let id: i64 = db
        .query_one(
            "SELECT herald.create_automation($1, $2)",
            &[&WORKSPACE, &definition],
        )
        .await?
        .get(0);
    db.execute("SELECT herald.set_automation_status($1, 'live')", &[&id])
        .await?;
    db.batch_execute("ANALYZE").await?;
    Ok(())
}

/// The ids of the workspace's results after `cursor`: what every subscriber should have got.
async fn expected(db: &Client, cursor: i64) -> Result<Vec<i64>> {
    let rows = db
        .query(
            "SELECT id FROM herald.results WHERE workspace_id = $1 AND id > $2 ORDER BY id",
            &[&WORKSPACE, &cursor],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn server_times(db: &Client, cursor: i64, wall: SystemTime) -> Result<ServerTimes> {
    let r = db
        .query_one(
            "SELECT extract(epoch FROM max(at))::float8, extract(epoch FROM min(published_at))::float8,
                    extract(epoch FROM max(published_at))::float8
               FROM herald.results WHERE workspace_id = $1 AND id > $2",
            &[&WORKSPACE, &cursor],
        )
        .await?;
    let zero = wall.duration_since(SystemTime::UNIX_EPOCH)?.as_secs_f64();
    let ms = |i: usize| (r.get::<_, Option<f64>>(i).unwrap_or(zero) - zero) * 1000.0;
    Ok(ServerTimes {
        last_made_ms: ms(0),
        first_published_ms: ms(1),
        last_published_ms: ms(2),
    })
}

/// Waits until the HTTP side accepts connections.
async fn wait_for_http(addr: SocketAddr, daemon: &Daemon) -> Result<()> {
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

/// One subscriber and one result through the whole path before the clock starts: the daemon has
/// ticked, published and streamed once.
async fn warm_up(db: &Client, addr: SocketAddr) -> Result<()> {
    let cursor: i64 = db
        .query_one("SELECT herald.newest_result($1)", &[&WORKSPACE])
        .await?
        .get(0);
    let sizes = Sizes {
        subscribers: 1,
        results: 1,
        chunk: 1,
        timeout: Duration::from_secs(15),
    };
    let mut one = Subscribers::open(addr, WARM_FROM, &sizes, cursor).await?;
    db.execute(
        "SELECT herald.track($1, 'warm@stream.example', $2)",
        &[&WORKSPACE, &EVENT],
    )
    .await?;
    let done = one.wait(sizes.timeout).await;
    let got = one.finish().await;
    if !done || got.events() != 1 {
        bail!(
            "warm-up: the subscriber got {} events within 15 s, expected 1 ({:?})",
            got.events(),
            got.outcomes.first().and_then(|o| o.error.clone())
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------- subscribers

/// What one subscriber saw.
#[derive(Default)]
struct Outcome {
    ids: Vec<i64>,
    /// Events without a numeric id, or of another kind.
    odd: usize,
    data_bytes: usize,
    first: Option<Instant>,
    /// When it had `want` events.
    reached: Option<Instant>,
    error: Option<String>,
}

struct Subscribers {
    stop: watch::Sender<bool>,
    done: mpsc::UnboundedReceiver<()>,
    tasks: Vec<JoinHandle<Outcome>>,
    connect_ms: f64,
}

struct Finished {
    outcomes: Vec<Outcome>,
    connect_ms: f64,
    data_bytes: usize,
}

impl Subscribers {
    /// Opens `sizes.subscribers` streams at once from 127.0.0.`first`.. (spread over ADDRESSES),
    /// each with Last-Event-ID `cursor`; returns once every one has its response head.
    async fn open(addr: SocketAddr, first: u8, sizes: &Sizes, cursor: i64) -> Result<Self> {
        let (stop, stopped) = watch::channel(false);
        let (done_tx, done) = mpsc::unbounded_channel();
        let mut ready = Vec::new();
        let mut tasks = Vec::new();
        let started = Instant::now();
        for i in 0..sizes.subscribers {
            let local = IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                0,
                first + (i % ADDRESSES as usize) as u8,
            ));
            let (ready_tx, ready_rx) = oneshot::channel();
            ready.push(ready_rx);
            tasks.push(tokio::spawn(follow(
                local,
                addr,
                cursor,
                sizes.results,
                stopped.clone(),
                ready_tx,
                done_tx.clone(),
            )));
        }
        let mut failed = Vec::new();
        for (i, r) in ready.into_iter().enumerate() {
            match r.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed.push(format!("subscriber {i}: {e}")),
                Err(_) => failed.push(format!("subscriber {i}: its task ended")),
            }
        }
        let connect_ms = started.elapsed().as_secs_f64() * 1000.0;
        let me = Self {
            stop,
            done,
            tasks,
            connect_ms,
        };
        if !failed.is_empty() {
            let n = failed.len();
            me.finish().await;
            bail!(
                "{n} of {} subscribers could not open /stream: {}",
                sizes.subscribers,
                failed[..n.min(3)].join("; ")
            );
        }
        Ok(me)
    }

    /// Waits until every subscriber has its R events (true) or `timeout` passes (false).
    async fn wait(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut left = self.tasks.len();
        while left > 0 {
            match tokio::time::timeout_at(deadline, self.done.recv()).await {
                Ok(Some(())) => left -= 1,
                _ => return false,
            }
        }
        true
    }

    /// Listens for GRACE more (events beyond the R must not come), then closes every stream.
    async fn finish(self) -> Finished {
        tokio::time::sleep(GRACE).await;
        let _ = self.stop.send(true);
        let mut outcomes = Vec::new();
        for t in self.tasks {
            outcomes.push(t.await.unwrap_or_else(|e| Outcome {
                error: Some(format!("the subscriber task failed: {e}")),
                ..Outcome::default()
            }));
        }
        let data_bytes = outcomes.iter().map(|o| o.data_bytes).sum();
        Finished {
            outcomes,
            connect_ms: self.connect_ms,
            data_bytes,
        }
    }
}

/// One subscriber: opens the stream, says so on `ready`, then records events until `stop`; says
/// `done` once it has `want`.
async fn follow(
    local: IpAddr,
    server: SocketAddr,
    cursor: i64,
    want: usize,
    mut stop: watch::Receiver<bool>,
    ready: oneshot::Sender<Result<(), String>>,
    done: mpsc::UnboundedSender<()>,
) -> Outcome {
    let mut out = Outcome::default();
    let headers = [
        ("Authorization", format!("Bearer {TOKEN}")),
        ("Last-Event-ID", cursor.to_string()),
    ];
    let path = format!("/stream?workspace={WORKSPACE}");
    let mut conn = match sse::open(local, server, &path, &headers).await {
        Ok(c) => c,
        Err(e) => {
            let e = format!("{e:#}");
            out.error = Some(e.clone());
            let _ = ready.send(Err(e));
            return out;
        }
    };
    let _ = ready.send(Ok(()));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        for event in conn.body.events() {
            let now = Instant::now();
            out.first.get_or_insert(now);
            out.data_bytes += event.data.len();
            match event.id {
                Some(id) if event.kind == KIND => out.ids.push(id),
                _ => out.odd += 1,
            }
            if out.ids.len() == want && out.reached.is_none() {
                out.reached = Some(now);
                let _ = done.send(());
            }
        }
        if conn.body.ended() {
            out.error = Some("the server ended the stream".into());
            return out;
        }
        tokio::select! {
            _ = stop.changed() => return out,
            read = conn.stream.read(&mut buf) => match read {
                Ok(0) => {
                    out.error = Some("the server closed the connection".into());
                    return out;
                }
                Ok(n) => {
                    if let Err(e) = conn.body.feed(&buf[..n]) {
                        out.error = Some(format!("{e:#}"));
                        return out;
                    }
                }
                Err(e) => {
                    out.error = Some(format!("reading: {e}"));
                    return out;
                }
            },
        }
    }
}

impl Finished {
    fn events(&self) -> usize {
        self.outcomes.iter().map(|o| o.ids.len() + o.odd).sum()
    }

    fn last_event(&self) -> Option<Instant> {
        self.outcomes.iter().filter_map(|o| o.reached).max()
    }

    fn phase(
        &self,
        name: &'static str,
        started: Instant,
        sizes: &Sizes,
        expected: &[i64],
        all_done: bool,
    ) -> Phase {
        let mut problems = Vec::new();
        if expected.len() != sizes.results {
            problems.push(format!(
                "herald.results holds {} results after the cursor, {} expected",
                expected.len(),
                sizes.results
            ));
        }
        let mut correct = 0;
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for (i, o) in self.outcomes.iter().enumerate() {
            let increasing = o.ids.windows(2).all(|w| w[0] < w[1]);
            if o.ids == expected && o.odd == 0 && o.error.is_none() {
                correct += 1;
                continue;
            }
            let why = if let Some(e) = &o.error {
                format!("error: {e}")
            } else if !increasing {
                "ids not strictly increasing".to_string()
            } else if o.odd > 0 {
                format!("{} events of another kind or without an id", o.odd)
            } else {
                "ids differ from herald.results'".to_string()
            };
            *kinds.entry(why.clone()).or_default() += 1;
            if problems.len() < 5 {
                problems.push(format!(
                    "subscriber {i}: {} events ({} expected): {why}",
                    o.ids.len() + o.odd,
                    expected.len()
                ));
            }
        }
        if kinds.len() > 1 || kinds.values().sum::<usize>() > 5 {
            problems.push(format!("wrong subscribers by reason: {kinds:?}"));
        }
        let end = self.last_event().unwrap_or_else(Instant::now);
        let secs = end.saturating_duration_since(started).as_secs_f64();
        let mut rates: Vec<f64> = self
            .outcomes
            .iter()
            .filter_map(|o| o.reached)
            .map(|t| sizes.results as f64 / t.saturating_duration_since(started).as_secs_f64())
            .collect();
        rates.sort_by(f64::total_cmp);
        let first = self
            .outcomes
            .iter()
            .filter_map(|o| o.first)
            .min()
            .map_or(0.0, |t| {
                t.saturating_duration_since(started).as_secs_f64() * 1000.0
            });
        let delivered = self.outcomes.iter().map(|o| o.ids.len()).sum();
        Phase {
            phase: name,
            subscribers: self.outcomes.len(),
            results: sizes.results,
            connect_ms: self.connect_ms,
            produce_secs: None,
            secs,
            delivered,
            delivered_per_sec: (sizes.results * self.outcomes.len()) as f64 / secs,
            per_subscriber_min: rates.first().copied().unwrap_or(0.0),
            per_subscriber_p50: rates.get(rates.len() / 2).copied().unwrap_or(0.0),
            per_subscriber_max: rates.last().copied().unwrap_or(0.0),
            first_event_ms: first,
            last_track_to_last_event_ms: None,
            server: None,
            cpu: None,
            correct,
            timed_out: !all_done,
            problems,
        }
    }
}

// ------------------------------------------------------------------------------------------- the daemon

/// `herald run` in-process with its HTTP side on `addr` and a default stream token; stopped the way
/// SIGTERM would (also when dropped).
struct Daemon {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
}

impl Daemon {
    fn start(target: &Target, addr: SocketAddr) -> Result<Self> {
        let raw: BTreeMap<String, String> = [
            ("HERALD_WORKER_ID", "bench-stream".to_string()),
            ("HERALD_SHUTDOWN_GRACE_SECONDS", "5".to_string()),
            ("HERALD_HTTP_ADDR", addr.to_string()),
            ("HERALD_PUBLIC_URL", format!("http://{addr}")),
            ("HERALD_LINK_SECRET", LINK_SECRET.to_string()),
            ("HERALD_STREAM_TOKEN", TOKEN.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
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

    fn exited(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    async fn stop(mut self) -> Result<()> {
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

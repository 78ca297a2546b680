//! The soak's steady load, each part on a connection of its own and paced by the clock (open loop: a
//! slow call does not lower the rate offered, it only delays the next one):
//!   ingest  `track_many` of the signup events, every INGEST_EVERY, sized to the offered email rate
//!   track   one `track()` every TRACK_EVERY (a signup too): its latency is the goal's `track()`
//!   claim   one `claim(100)` every CLAIM_EVERY in a transaction that is rolled back: what a claim costs
//!           on the live tables at that moment, without taking work from the daemon (its leases vanish
//!           with the rollback; the rows it locked are skipped by the daemon's claims for those ms)
//! Each part records (seconds since the start, call duration, and for claim the jobs it took); a
//! failed call is counted and logged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tracing::warn;

use herald_sidecar::db::Target;

use super::{CONTACTS, WORKSPACE};

pub const INGEST_EVERY: Duration = Duration::from_millis(200);
pub const TRACK_EVERY: Duration = Duration::from_millis(50);
pub const CLAIM_EVERY: Duration = Duration::from_millis(200);
/// Every PRO-th event has plan "pro" (its enrollment ends in the webhook, the others in a 2nd email).
pub const PRO: u64 = 5;

/// Timed calls of one kind: (seconds since the start, duration, items: the jobs a claim took).
#[derive(Default)]
pub struct Samples {
    calls: Mutex<Vec<(f64, Duration, u32)>>,
    pub errors: AtomicU64,
}

impl Samples {
    fn push(&self, at: f64, took: Duration, items: u32) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((at, took, items));
    }

    /// Durations of the calls started in [from, to) seconds.
    pub fn between(&self, from: f64, to: f64) -> Vec<Duration> {
        self.items_between(from, to)
            .into_iter()
            .map(|(d, _)| d)
            .collect()
    }

    /// (duration, items) of the calls started in [from, to) seconds.
    pub fn items_between(&self, from: f64, to: f64) -> Vec<(Duration, u32)> {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(at, _, _)| *at >= from && *at < to)
            .map(|(_, d, n)| (*d, *n))
            .collect()
    }
}

pub struct Load {
    pub started: Instant,
    pub ingest: Arc<Samples>,
    pub track: Arc<Samples>,
    pub claim: Arc<Samples>,
    /// Events accepted by track_many and track().
    pub events: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    pub async fn start(target: &Target, events_per_sec: f64) -> Result<Self> {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(AtomicU64::new(0));
        let (ingest, track, claim) = (
            Arc::new(Samples::default()),
            Arc::new(Samples::default()),
            Arc::new(Samples::default()),
        );
        let per_call = (events_per_sec * INGEST_EVERY.as_secs_f64())
            .round()
            .max(1.0) as u64;
        let tasks = vec![
            tokio::spawn(ingest_loop(
                target.connect().await?,
                per_call,
                started,
                Arc::clone(&ingest),
                Arc::clone(&events),
                Arc::clone(&stop),
            )),
            tokio::spawn(track_loop(
                target.connect().await?,
                started,
                Arc::clone(&track),
                Arc::clone(&events),
                Arc::clone(&stop),
            )),
            tokio::spawn(claim_loop(
                target.connect().await?,
                started,
                Arc::clone(&claim),
                Arc::clone(&stop),
            )),
        ];
        Ok(Self {
            started,
            ingest,
            track,
            claim,
            events,
            stop,
            tasks,
        })
    }

    pub fn secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn event(n: u64) -> Value {
    json!({"email": format!("s{}@soak.example", n % CONTACTS as u64), "kind": "signup",
           "payload": {"plan": if n.is_multiple_of(PRO) { "pro" } else { "free" }}})
}

async fn ingest_loop(
    db: tokio_postgres::Client,
    per_call: u64,
    started: Instant,
    samples: Arc<Samples>,
    events: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let Ok(statement) = db.prepare("SELECT herald.track_many($1, $2::jsonb)").await else {
        samples.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut next = 0u64;
    let mut due = tokio::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let batch: Value = (next..next + per_call)
            .map(event)
            .collect::<Vec<_>>()
            .into();
        let at = started.elapsed().as_secs_f64();
        let t = Instant::now();
        match db.execute(&statement, &[&WORKSPACE, &batch]).await {
            Ok(_) => {
                samples.push(at, t.elapsed(), 0);
                events.fetch_add(per_call, Ordering::Relaxed);
            }
            Err(e) => {
                samples.errors.fetch_add(1, Ordering::Relaxed);
                warn!("soak: track_many failed: {e}");
            }
        }
        next += per_call;
        due += INGEST_EVERY;
        tokio::time::sleep_until(due).await;
    }
}

async fn track_loop(
    db: tokio_postgres::Client,
    started: Instant,
    samples: Arc<Samples>,
    events: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let Ok(statement) = db
        .prepare("SELECT herald.track($1, $2, 'signup', $3::jsonb)")
        .await
    else {
        samples.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    // numbered from the far end of the contacts, so they rarely meet the batches' contacts
    let mut n = u64::MAX / 2;
    let mut due = tokio::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let email = format!(
            "s{}@soak.example",
            CONTACTS as u64 - 1 - n % CONTACTS as u64
        );
        let payload = json!({"plan": if n.is_multiple_of(PRO) { "pro" } else { "free" }});
        let at = started.elapsed().as_secs_f64();
        let t = Instant::now();
        match db
            .execute(&statement, &[&WORKSPACE, &email, &payload])
            .await
        {
            Ok(_) => {
                samples.push(at, t.elapsed(), 0);
                events.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                samples.errors.fetch_add(1, Ordering::Relaxed);
                warn!("soak: track() failed: {e}");
            }
        }
        n += 1;
        due += TRACK_EVERY;
        tokio::time::sleep_until(due.max(tokio::time::Instant::now())).await;
    }
}

async fn claim_loop(
    db: tokio_postgres::Client,
    started: Instant,
    samples: Arc<Samples>,
    stop: Arc<AtomicBool>,
) {
    let Ok(statement) = db
        .prepare("SELECT count(*) FROM herald.claim('soak-probe', 100)")
        .await
    else {
        samples.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut due = tokio::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let at = started.elapsed().as_secs_f64();
        let probe = async {
            db.batch_execute("BEGIN").await?;
            let t = Instant::now();
            let claimed = db.query_one(&statement, &[]).await;
            let took = t.elapsed();
            db.batch_execute("ROLLBACK").await?;
            claimed.map(|row| (took, row.get::<_, i64>(0) as u32))
        };
        match probe.await {
            Ok((took, jobs)) => samples.push(at, took, jobs),
            Err(e) => {
                samples.errors.fetch_add(1, Ordering::Relaxed);
                warn!("soak: claim probe failed: {e}");
                let _ = db.batch_execute("ROLLBACK").await;
            }
        }
        due += CLAIM_EVERY;
        tokio::time::sleep_until(due.max(tokio::time::Instant::now())).await;
    }
}

//! Metrics of this process in a prometheus-client registry (no global state), and the router that
//! serves them at `GET /metrics` on HERALD_METRICS_ADDR (run by `http::serve`, like the HTTP side).
//! The exposition is OpenMetrics text, which Prometheus reads.
//!
//! The queue depth (jobs not finished yet, QUEUE_DEPTH) is read on a pooled connection at most every 5 s;
//! while the database is away it is left out (a scrape must not hang on it) and the health gauges
//! say so. The server starts before the daemon first reaches the database, so a daemon waiting for it
//! at start-up can be watched too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::{Mutex, Semaphore};

use super::database::Database;
use super::db_health::DbHealth;
use super::job::Outcome;

/// Job kinds with series of their own; any other kind counts as the last.
const KINDS: [&str; 4] = ["email", "webhook", "decide", "other"];
/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const QUEUE_CACHE: Duration = Duration::from_secs(5);
/// A scrape answers within this even when the database hangs.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(2);
/// The jobs still to be handed out or finished, by kind and status: each status through its own
/// partial index. Finished jobs (done, failed, cancelled) stay in the outbox until `prune`, 30 days by
/// default: counting them (herald.queue_status) read the whole table on every scrape, ~0.4 s at a
/// million rows in the soak and growing with the history; the daemon's counters count them instead.
const QUEUE_DEPTH: &str = "\
    SELECT kind, 'pending', count(*)::int8 FROM herald.outbox WHERE status = 'pending' GROUP BY kind
    UNION ALL
    SELECT kind, 'leased', count(*)::int8 FROM herald.outbox WHERE status = 'leased' GROUP BY kind
    UNION ALL
    SELECT kind, 'held', count(*)::int8 FROM herald.outbox
     WHERE broadcast_id IS NOT NULL AND status = 'held' GROUP BY kind
    UNION ALL
    SELECT kind, 'dead', count(*)::int8 FROM herald.outbox WHERE status = 'dead' GROUP BY kind";
/// The statuses of QUEUE_DEPTH, shown at 0 for every kind when no job has them.
const OPEN_STATUSES: [&str; 4] = ["pending", "leased", "held", "dead"];
/// The OpenMetrics text format's media type.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    kind: String,
    status: String,
}

type Latency = Family<KindLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    claimed: Counter,
    completed: Counter,
    complete_errors: Counter,
    sent: Family<KindLabels, Counter>,
    failed: Family<KindLabels, Counter>,
    retried: Family<KindLabels, Counter>,
    duration: Latency,
    in_flight: Gauge,
    /// Results handed to the completer and not yet recorded (or given up): the ones an outage holds.
    unrecorded: Gauge,
    database_up: Gauge,
    database_down_seconds: Gauge<f64, AtomicU64>,
    /// Age of the transaction holding the oldest snapshot in the database (horizon.rs).
    oldest_transaction_seconds: Gauge<f64, AtomicU64>,
    queue_jobs: Family<QueueLabels, Gauge>,
    /// The completer is retrying a batch it could not record.
    recording_stalled: AtomicBool,
    concurrency: usize,
    slots: Arc<Semaphore>,
    health: Arc<DbHealth>,
    /// The last queue depth read; held while a scrape fills `queue_jobs` and encodes.
    queue: Mutex<QueueCache>,
}

#[derive(Default)]
struct QueueCache {
    at: Option<Instant>,
    rows: Vec<(String, String, i64)>,
}

fn kind(kind: &str) -> KindLabels {
    KindLabels {
        kind: KINDS
            .iter()
            .find(|k| **k == kind)
            .unwrap_or(&KINDS[KINDS.len() - 1]),
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

impl Metrics {
    pub fn new(concurrency: usize, slots: Arc<Semaphore>, health: Arc<DbHealth>) -> Self {
        let mut registry = Registry::default();
        // counters are named without `_total`, help texts without a full stop: the encoder adds both
        let claimed = Counter::default();
        registry.register(
            "herald_jobs_claimed",
            "Jobs leased by this process",
            claimed.clone(),
        );
        let sent = Family::<KindLabels, Counter>::default();
        registry.register(
            "herald_jobs_sent",
            "Jobs that succeeded (email accepted, 2xx reply)",
            sent.clone(),
        );
        let failed = Family::<KindLabels, Counter>::default();
        registry.register(
            "herald_jobs_failed",
            "Jobs that failed permanently",
            failed.clone(),
        );
        let retried = Family::<KindLabels, Counter>::default();
        registry.register(
            "herald_jobs_retried",
            "Jobs that failed and will be retried",
            retried.clone(),
        );
        let completed = Counter::default();
        registry.register(
            "herald_results_recorded",
            "Results recorded with herald.complete",
            completed.clone(),
        );
        let complete_errors = Counter::default();
        registry.register(
            "herald_complete_errors",
            "Failed herald.complete calls (retried)",
            complete_errors.clone(),
        );
        let duration: Latency = Family::new_with_constructor(latency_histogram);
        registry.register(
            "herald_job_duration_seconds",
            "Time from claim to result, per job",
            duration.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "herald_jobs_in_flight",
            "Jobs being executed by this process",
            in_flight.clone(),
        );
        let unrecorded = Gauge::default();
        registry.register(
            "herald_results_unrecorded",
            "Results of finished jobs not yet recorded with herald.complete (kept while the database is away)",
            unrecorded.clone(),
        );
        let database_up = Gauge::default();
        registry.register(
            "herald_database_up",
            "1 while this process reaches the database, 0 while it waits for it",
            database_up.clone(),
        );
        let database_down_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "herald_database_down_seconds",
            "How long the database has been unreachable (0 while it answers)",
            database_down_seconds.clone(),
        );
        let oldest_transaction_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "herald_oldest_transaction_seconds",
            "How long the transaction holding the oldest snapshot in the database has been open (0: none); claim slows while it lasts",
            oldest_transaction_seconds.clone(),
        );
        let queue_jobs = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "herald_queue_jobs",
            "Jobs of herald.outbox not finished yet (pending, leased, held, dead) by kind and status, all workers",
            queue_jobs.clone(),
        );
        // every kind is shown from the start, at 0
        for k in KINDS {
            let labels = kind(k);
            drop(sent.get_or_create(&labels));
            drop(failed.get_or_create(&labels));
            drop(retried.get_or_create(&labels));
            drop(duration.get_or_create(&labels));
        }
        Self {
            registry,
            claimed,
            completed,
            complete_errors,
            sent,
            failed,
            retried,
            duration,
            in_flight,
            unrecorded,
            database_up,
            database_down_seconds,
            oldest_transaction_seconds,
            queue_jobs,
            recording_stalled: AtomicBool::new(false),
            concurrency,
            slots,
            health,
            queue: Mutex::new(QueueCache::default()),
        }
    }

    pub fn claimed(&self, n: usize) {
        self.claimed.inc_by(n as u64);
    }

    pub fn completed(&self, n: usize) {
        self.completed.inc_by(n as u64);
        self.unrecorded.dec_by(n as i64);
        self.recording_stalled.store(false, Relaxed);
    }

    /// Results the completer dropped (refused by complete(), or given up at shutdown).
    pub fn not_recorded(&self, n: usize) {
        self.unrecorded.dec_by(n as i64);
    }

    pub fn complete_error(&self) {
        self.complete_errors.inc();
    }

    /// A batch failed for a reason retrying may cure; cleared by the next recorded batch.
    pub fn recording_stalled(&self) {
        self.recording_stalled.store(true, Relaxed);
    }

    /// True while the completer holds results it is retrying (e.g. the database was away).
    pub fn is_recording_stalled(&self) -> bool {
        self.recording_stalled.load(Relaxed)
    }

    /// The long-transaction watch's last reading (whole seconds: it checks every few).
    pub fn set_oldest_transaction(&self, age: Duration) {
        self.oldest_transaction_seconds.set(age.as_secs() as f64);
    }

    /// A job finished; its result goes to the completer next.
    pub fn record(&self, job_kind: &str, outcome: &Outcome, elapsed: Duration) {
        self.unrecorded.inc();
        let labels = kind(job_kind);
        match outcome {
            Outcome::Done { .. } => &self.sent,
            Outcome::Failed {
                retryable: true, ..
            } => &self.retried,
            Outcome::Failed {
                retryable: false, ..
            }
            | Outcome::Refused { .. } => &self.failed,
        }
        .get_or_create(&labels)
        .inc();
        self.duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// The exposition; `queue` rows are (kind, status, jobs), `None` when the depth is not known.
    fn render(&self, queue: Option<&[(String, String, i64)]>) -> String {
        let in_flight = self
            .concurrency
            .saturating_sub(self.slots.available_permits());
        self.in_flight.set(in_flight as i64);
        self.database_up.set(i64::from(self.health.is_up()));
        // tenths of a second, as a scrape is not more precise than that
        let down = (self.health.down_for().as_secs_f64() * 10.0).round() / 10.0;
        self.database_down_seconds.set(down);
        self.queue_jobs.clear();
        if queue.is_some() {
            for k in KINDS.iter().filter(|k| **k != "other") {
                for status in OPEN_STATUSES {
                    let labels = QueueLabels {
                        kind: (*k).to_string(),
                        status: status.to_string(),
                    };
                    self.queue_jobs.get_or_create(&labels).set(0);
                }
            }
        }
        for (kind, status, jobs) in queue.unwrap_or_default() {
            let labels = QueueLabels {
                kind: kind.clone(),
                status: status.clone(),
            };
            self.queue_jobs.get_or_create(&labels).set(*jobs);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The exposition with a fresh-enough queue depth. One scrape at a time (the queue gauges are
    /// filled for the encoding).
    async fn scrape(&self, database: &Database) -> String {
        let mut cache = self.queue.lock().await;
        let fresh = cache.at.is_some_and(|t| t.elapsed() < QUEUE_CACHE);
        if !fresh {
            match self.read_queue(database).await {
                Some(rows) => {
                    cache.rows = rows;
                    cache.at = Some(Instant::now());
                }
                None => return self.render(None),
            }
        }
        self.render(Some(&cache.rows))
    }

    /// Queue depth; None when the database cannot be asked. While the components that retry with
    /// back-off find the database away, a scrape does not try (it would wait for the connect timeout).
    async fn read_queue(&self, database: &Database) -> Option<Vec<(String, String, i64)>> {
        if !self.health.is_up() {
            return None;
        }
        let read = async {
            let client = database.get().await?;
            let rows = client.query(QUEUE_DEPTH, &[]).await?;
            Ok::<_, super::database::DbError>(rows)
        };
        match tokio::time::timeout(QUEUE_TIMEOUT, read).await {
            Err(_) => {
                tracing::debug!("queue depth not read in time");
                None
            }
            // the server's reason (e.g. a role without read access to herald.queue_status)
            Ok(Err(e)) if e.is_connection_error() => {
                tracing::debug!(error = %e, "queue depth not read");
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "queue depth not read");
                None
            }
            Ok(Ok(rows)) => Some(
                rows.iter()
                    .filter_map(|r| {
                        Some((r.try_get(0).ok()?, r.try_get(1).ok()?, r.try_get(2).ok()?))
                    })
                    .collect(),
            ),
        }
    }
}

#[derive(Clone)]
struct Scrape {
    metrics: Arc<Metrics>,
    database: Arc<Database>,
}

/// `GET /metrics`, for `http::serve` on HERALD_METRICS_ADDR.
pub fn router(metrics: Arc<Metrics>, database: Arc<Database>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: try /metrics\n") })
        .method_not_allowed_fallback(|| async { (StatusCode::METHOD_NOT_ALLOWED, "GET only\n") })
        .with_state(Scrape { metrics, database })
}

async fn metrics_page(State(s): State<Scrape>) -> Response {
    let text = s.metrics.scrape(&s.database).await;
    ([(CONTENT_TYPE, OPENMETRICS)], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition() {
        let slots = Arc::new(Semaphore::new(4));
        let health = Arc::new(DbHealth::new(tokio_postgres::Config::new()));
        let m = Metrics::new(4, Arc::clone(&slots), Arc::clone(&health));
        let _held = slots.try_acquire().unwrap();
        m.claimed(3);
        m.record(
            "email",
            &Outcome::Done {
                message_id: None,
                response: None,
            },
            Duration::from_millis(20),
        );
        m.record("email", &Outcome::retry("451"), Duration::from_millis(300));
        m.record(
            "webhook",
            &Outcome::permanent("404"),
            Duration::from_secs(60),
        );
        m.record("undecodable", &Outcome::permanent("?"), Duration::ZERO);
        m.completed(1);
        let text = m.render(Some(&[("email".into(), "pending".into(), 7)]));
        assert!(
            text.contains("\nherald_database_up 0\n"),
            "not known to be up yet"
        );
        health.ok();
        let text = m.render(Some(&[("email".into(), "pending".into(), 7)]));
        for line in [
            "# HELP herald_jobs_claimed Jobs leased by this process.",
            "# TYPE herald_jobs_claimed counter",
            "herald_jobs_claimed_total 3",
            "herald_jobs_sent_total{kind=\"email\"} 1",
            "herald_jobs_sent_total{kind=\"decide\"} 0",
            "herald_jobs_retried_total{kind=\"email\"} 1",
            "herald_jobs_failed_total{kind=\"webhook\"} 1",
            "herald_jobs_failed_total{kind=\"other\"} 1",
            "herald_results_recorded_total 1",
            "herald_complete_errors_total 0",
            "# TYPE herald_job_duration_seconds histogram",
            "herald_job_duration_seconds_bucket{le=\"0.025\",kind=\"email\"} 1",
            "herald_job_duration_seconds_bucket{le=\"0.5\",kind=\"email\"} 2",
            "herald_job_duration_seconds_bucket{le=\"30.0\",kind=\"webhook\"} 0",
            "herald_job_duration_seconds_bucket{le=\"+Inf\",kind=\"webhook\"} 1",
            "herald_job_duration_seconds_count{kind=\"email\"} 2",
            "herald_job_duration_seconds_sum{kind=\"email\"} 0.32",
            "# TYPE herald_jobs_in_flight gauge",
            "herald_jobs_in_flight 1",
            "herald_queue_jobs{kind=\"email\",status=\"pending\"} 7",
            "herald_queue_jobs{kind=\"webhook\",status=\"leased\"} 0",
            "herald_results_unrecorded 3",
            "herald_database_up 1",
            "herald_database_down_seconds 0.0",
            "herald_oldest_transaction_seconds 0.0",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // the depth is left out when it cannot be read
        let text = m.render(None);
        assert!(!text.contains("herald_queue_jobs{"), "{text}");
    }

    #[tokio::test]
    async fn the_router_serves_only_metrics() {
        use axum::body::{to_bytes, Body};
        use axum::http::Request;
        use tower::ServiceExt as _;

        let health = Arc::new(DbHealth::new(tokio_postgres::Config::new()));
        let m = Arc::new(Metrics::new(
            1,
            Arc::new(Semaphore::new(1)),
            Arc::clone(&health),
        ));
        let database = Arc::new(Database::new(health));
        let app = router(m, database);
        let call = |method: &str, path: &str| {
            let request = Request::builder()
                .method(method)
                .uri(path)
                .body(Body::empty())
                .expect("a request");
            app.clone().oneshot(request)
        };
        let response = call("GET", "/metrics").await.expect("infallible");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], OPENMETRICS);
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let text = String::from_utf8_lossy(&body);
        // the database is not known to be up: no queue depth, and no attempt to read it
        assert!(text.contains("\nherald_database_up 0\n"), "{text}");
        assert!(!text.contains("herald_queue_jobs{"), "{text}");
        let response = call("GET", "/").await.expect("infallible");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let response = call("POST", "/metrics").await.expect("infallible");
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}

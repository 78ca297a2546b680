//! Metrics: counters and a latency histogram kept in atomics, served in the Prometheus text format at
//! `GET /metrics` on HERALD_METRICS_ADDR by a tiny HTTP/1.1 server (one request per connection). The
//! queue depth comes from `herald.queue_status`, queried at most every 5 s; while the database is away
//! it is left out (a scrape must not hang on it) and the health gauges say so. The server starts before
//! the daemon first reaches the database, so a daemon waiting for it at start-up can be watched too.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::db_health::DbHealth;
use super::job::Outcome;

const KINDS: [&str; 4] = ["email", "webhook", "decide", "other"];
/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const QUEUE_CACHE: Duration = Duration::from_secs(5);
/// A scrape answers within this even when the database hangs.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct PerKind {
    sent: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

pub struct Metrics {
    claimed: AtomicU64,
    completed: AtomicU64,
    complete_errors: AtomicU64,
    /// Results handed to the completer and not yet recorded (or given up): the ones an outage holds.
    unrecorded: AtomicU64,
    /// The completer is retrying a batch it could not record.
    recording_stalled: AtomicBool,
    kinds: [PerKind; KINDS.len()],
    concurrency: usize,
    slots: Arc<Semaphore>,
    health: Arc<DbHealth>,
    queue: Mutex<QueueCache>,
}

#[derive(Default)]
struct QueueCache {
    at: Option<Instant>,
    rows: Vec<(String, String, i64)>,
    client: Option<Client>,
}

fn kind_index(kind: &str) -> usize {
    KINDS
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(KINDS.len() - 1)
}

impl Metrics {
    pub fn new(concurrency: usize, slots: Arc<Semaphore>, health: Arc<DbHealth>) -> Self {
        Self {
            claimed: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            complete_errors: AtomicU64::new(0),
            unrecorded: AtomicU64::new(0),
            recording_stalled: AtomicBool::new(false),
            kinds: Default::default(),
            concurrency,
            slots,
            health,
            queue: Mutex::new(QueueCache::default()),
        }
    }

    pub fn claimed(&self, n: usize) {
        self.claimed.fetch_add(n as u64, Relaxed);
    }

    pub fn completed(&self, n: usize) {
        self.completed.fetch_add(n as u64, Relaxed);
        self.unrecorded.fetch_sub(n as u64, Relaxed);
        self.recording_stalled.store(false, Relaxed);
    }

    /// Results the completer dropped (refused by complete(), or given up at shutdown).
    pub fn not_recorded(&self, n: usize) {
        self.unrecorded.fetch_sub(n as u64, Relaxed);
    }

    pub fn complete_error(&self) {
        self.complete_errors.fetch_add(1, Relaxed);
    }

    /// A batch failed for a reason retrying may cure; cleared by the next recorded batch.
    pub fn recording_stalled(&self) {
        self.recording_stalled.store(true, Relaxed);
    }

    /// True while the completer holds results it is retrying (e.g. the database was away).
    pub fn is_recording_stalled(&self) -> bool {
        self.recording_stalled.load(Relaxed)
    }

    /// A job finished; its result goes to the completer next.
    pub fn record(&self, kind: &str, outcome: &Outcome, elapsed: Duration) {
        self.unrecorded.fetch_add(1, Relaxed);
        let k = &self.kinds[kind_index(kind)];
        match outcome {
            Outcome::Done { .. } => &k.sent,
            Outcome::Failed {
                retryable: true, ..
            } => &k.retried,
            Outcome::Failed {
                retryable: false, ..
            } => &k.failed,
        }
        .fetch_add(1, Relaxed);
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            k.buckets[i].fetch_add(1, Relaxed);
        }
        k.count.fetch_add(1, Relaxed);
        k.sum_micros.fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    /// The Prometheus text exposition; `queue` rows are (kind, status, jobs).
    pub fn render(&self, queue: Option<&[(String, String, i64)]>) -> String {
        let mut out = String::new();
        let mut counter =
            |name: &str, help: &str, values: &mut dyn Iterator<Item = (String, u64)>| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                for (labels, v) in values {
                    let _ = writeln!(out, "{name}{labels} {v}");
                }
            };
        counter(
            "herald_jobs_claimed_total",
            "Jobs leased by this process.",
            &mut std::iter::once((String::new(), self.claimed.load(Relaxed))),
        );
        let per_kind = |f: fn(&PerKind) -> &AtomicU64| {
            KINDS
                .iter()
                .zip(&self.kinds)
                .map(move |(k, p)| (format!("{{kind=\"{k}\"}}"), f(p).load(Relaxed)))
        };
        counter(
            "herald_jobs_sent_total",
            "Jobs that succeeded (email accepted, 2xx reply).",
            &mut per_kind(|p| &p.sent),
        );
        counter(
            "herald_jobs_failed_total",
            "Jobs that failed permanently.",
            &mut per_kind(|p| &p.failed),
        );
        counter(
            "herald_jobs_retried_total",
            "Jobs that failed and will be retried.",
            &mut per_kind(|p| &p.retried),
        );
        counter(
            "herald_results_recorded_total",
            "Results recorded with herald.complete.",
            &mut std::iter::once((String::new(), self.completed.load(Relaxed))),
        );
        counter(
            "herald_complete_errors_total",
            "Failed herald.complete calls (retried).",
            &mut std::iter::once((String::new(), self.complete_errors.load(Relaxed))),
        );

        let name = "herald_job_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from claim to result, per job.\n# TYPE {name} histogram"
        );
        for (k, p) in KINDS.iter().zip(&self.kinds) {
            let mut cumulative = 0;
            for (b, n) in BUCKETS.iter().zip(&p.buckets) {
                cumulative += n.load(Relaxed);
                let _ = writeln!(out, "{name}_bucket{{kind=\"{k}\",le=\"{b}\"}} {cumulative}");
            }
            let count = p.count.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{kind=\"{k}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(
                out,
                "{name}_sum{{kind=\"{k}\"}} {}",
                p.sum_micros.load(Relaxed) as f64 / 1e6
            );
            let _ = writeln!(out, "{name}_count{{kind=\"{k}\"}} {count}");
        }

        let in_flight = self
            .concurrency
            .saturating_sub(self.slots.available_permits());
        let _ = writeln!(out, "# HELP herald_jobs_in_flight Jobs being executed by this process.\n# TYPE herald_jobs_in_flight gauge\nherald_jobs_in_flight {in_flight}");
        let mut gauge = |name: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            "herald_results_unrecorded",
            "Results of finished jobs not yet recorded with herald.complete (kept while the database is away).",
            self.unrecorded.load(Relaxed).to_string(),
        );
        gauge(
            "herald_database_up",
            "1 while this process reaches the database, 0 while it waits for it.",
            u8::from(self.health.is_up()).to_string(),
        );
        gauge(
            "herald_database_down_seconds",
            "How long the database has been unreachable (0 while it answers).",
            format!("{:.1}", self.health.down_for().as_secs_f64()),
        );
        if let Some(rows) = queue {
            let _ = writeln!(out, "# HELP herald_queue_jobs Jobs in herald.outbox by kind and status (all workers).\n# TYPE herald_queue_jobs gauge");
            for (kind, status, n) in rows {
                let _ = writeln!(
                    out,
                    "herald_queue_jobs{{kind=\"{}\",status=\"{}\"}} {n}",
                    escape(kind),
                    escape(status)
                );
            }
        }
        out
    }

    /// Queue depth, from the cache when fresh; None when the database cannot be asked. Reconnecting
    /// is left to the components that retry with back-off: while they find the database away, a
    /// scrape does not try (it would wait for the connect timeout).
    async fn queue(&self) -> Option<Vec<(String, String, i64)>> {
        let mut cache = self.queue.lock().await;
        if cache.at.is_some_and(|t| t.elapsed() < QUEUE_CACHE) {
            return Some(cache.rows.clone());
        }
        if !self.health.is_up() {
            return None;
        }
        if cache.client.as_ref().is_none_or(Client::is_closed) {
            cache.client = self.health.connect("metrics").await.ok();
        }
        let client = cache.client.as_ref()?;
        let rows = match tokio::time::timeout(
            QUEUE_TIMEOUT,
            client.query("SELECT kind, status, sum(jobs)::bigint FROM herald.queue_status GROUP BY 1, 2 ORDER BY 1, 2", &[]),
        )
        .await
        .ok()?
        {
            Ok(rows) => rows,
            Err(e) => {
                // the server's reason (e.g. a role without read access to herald.queue_status)
                if super::pg::is_connection_error(&e) {
                    tracing::debug!(error = %super::pg::describe(&e), "queue depth not read");
                } else {
                    tracing::warn!(error = %super::pg::describe(&e), "queue depth not read");
                }
                return None;
            }
        };
        self.health.ok();
        cache.rows = rows
            .iter()
            .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?, r.try_get(2).ok()?)))
            .collect();
        cache.at = Some(Instant::now());
        Some(cache.rows.clone())
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` until shutdown.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            if let Err(e) =
                tokio::time::timeout(Duration::from_secs(10), answer(stream, &metrics)).await
            {
                tracing::debug!(error = %e, "metrics request timed out");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => {
            let queue = metrics.queue().await;
            ("200 OK", metrics.render(queue.as_deref()))
        }
        ("GET", _) => ("404 Not Found", "not found: try /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "GET only\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
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
        m.completed(1);
        let text = m.render(Some(&[("email".into(), "pending".into(), 7)]));
        assert!(
            text.contains("\nherald_database_up 0\n"),
            "not known to be up yet"
        );
        health.ok();
        let text = m.render(Some(&[("email".into(), "pending".into(), 7)]));
        for line in [
            "herald_jobs_claimed_total 3",
            "herald_jobs_sent_total{kind=\"email\"} 1",
            "herald_jobs_retried_total{kind=\"email\"} 1",
            "herald_jobs_failed_total{kind=\"webhook\"} 1",
            "herald_job_duration_seconds_bucket{kind=\"email\",le=\"0.025\"} 1",
            "herald_job_duration_seconds_bucket{kind=\"email\",le=\"0.5\"} 2",
            "herald_job_duration_seconds_bucket{kind=\"webhook\",le=\"30\"} 0",
            "herald_job_duration_seconds_bucket{kind=\"webhook\",le=\"+Inf\"} 1",
            "herald_job_duration_seconds_count{kind=\"email\"} 2",
            "herald_jobs_in_flight 1",
            "herald_queue_jobs{kind=\"email\",status=\"pending\"} 7",
            "herald_results_unrecorded 2",
            "herald_database_up 1",
            "herald_database_down_seconds 0.0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}

//! Completer: gathers executors' results and records them with ONE `herald.complete` call per batch —
//! every 100 results, or 50 ms after the first result of a batch. A failed call is retried with back-off
//! and the batch is kept (complete() ignores results it has already applied, so a retry after an
//! ambiguous failure is harmless), for as long as the database stays away: while it retries it reads no
//! new results, so the bounded channel fills up and executors wait to hand theirs over (holding their
//! slots, so nothing more is claimed). Results are dropped only when shutdown gives up (`give_up`):
//! their jobs stay leased and run again once the lease expires. Ends when every executor is gone,
//! after a final flush.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value as Json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::database::{Database, DbError};
use super::metrics::Metrics;
use super::pg::Backoff;

pub const BATCH: usize = 100;
pub const LINGER: Duration = Duration::from_millis(50);

pub struct Completer {
    pub db: Arc<Database>,
    pub results: mpsc::Receiver<Json>,
    /// Cancelled when the process must exit even though results could not be recorded.
    pub give_up: CancellationToken,
    pub metrics: Arc<Metrics>,
    /// Results dropped because shutdown gave up, reported once at the end.
    pub lost: usize,
}

impl Completer {
    pub async fn run(mut self) {
        let mut batch: Vec<Json> = Vec::with_capacity(BATCH);
        let mut flush_at = Instant::now();
        loop {
            let next = if batch.is_empty() {
                self.results.recv().await
            } else {
                tokio::select! {
                    r = self.results.recv() => r,
                    () = tokio::time::sleep_until(flush_at) => {
                        self.flush(&mut batch).await;
                        continue;
                    }
                }
            };
            match next {
                Some(result) => {
                    if batch.is_empty() {
                        flush_at = Instant::now() + LINGER;
                    }
                    batch.push(result);
                    if batch.len() >= BATCH {
                        self.flush(&mut batch).await;
                    }
                }
                None => break,
            }
        }
        if !batch.is_empty() {
            self.flush(&mut batch).await;
        }
        if self.lost > 0 {
            tracing::error!(
                results = self.lost,
                "gave up on recording results at shutdown: those jobs stay leased until their lease expires, then run again"
            );
        } else {
            tracing::info!("all results recorded");
        }
    }

    /// Records the batch, retrying until it is recorded or the process gives up.
    async fn flush(&mut self, batch: &mut Vec<Json>) {
        let mut backoff = Backoff::default();
        let array = Json::Array(std::mem::take(batch));
        let n = array.as_array().map_or(0, Vec::len);
        loop {
            let attempt = async {
                let c = self.db.get().await?;
                Ok::<_, DbError>(
                    c.query_one("SELECT herald.complete($1::jsonb)", &[&array])
                        .await?,
                )
            };
            let attempt = tokio::select! {
                biased;
                // once shutdown gives up, what is left is dropped without a try (each try could wait
                // for the connect timeout)
                () = self.give_up.cancelled() => None,
                r = attempt => Some(r),
            };
            let Some(attempt) = attempt else {
                self.lost += n;
                self.metrics.not_recorded(n);
                return;
            };
            match attempt {
                Ok(row) => {
                    let applied: i32 = row.try_get(0).unwrap_or(-1);
                    tracing::debug!(results = n, applied, "recorded");
                    self.metrics.completed(n);
                    return;
                }
                Err(e) if is_data_error(&e) && array.as_array().is_some_and(|a| a.len() > 1) => {
                    // a result complete() refuses (a bug on this side) must not hold up the others
                    tracing::error!(error = %e.describe(), "complete refused the batch; recording its results one by one");
                    for one in array.as_array().into_iter().flatten() {
                        let mut single = vec![one.clone()];
                        Box::pin(self.flush(&mut single)).await;
                    }
                    return;
                }
                Err(e) if is_data_error(&e) => {
                    self.metrics.complete_error();
                    self.metrics.not_recorded(n);
                    tracing::error!(error = %e.describe(), result = %array, "complete refused this result; its job will run again once its lease expires");
                    return;
                }
                Err(e) => {
                    self.metrics.complete_error();
                    self.metrics.recording_stalled();
                    let delay = backoff.step();
                    if e.is_connection_error() {
                        // DbHealth says once that the database is away; the batch waits for it
                        tracing::debug!(error = %e.describe(), results = n, retry_in_ms = delay.as_millis() as u64, "complete failed; keeping the batch");
                    } else {
                        tracing::warn!(error = %e.describe(), results = n, retry_in_ms = delay.as_millis() as u64, "complete failed; keeping the batch");
                    }
                    tokio::select! {
                        () = self.give_up.cancelled() => {}
                        () = self.db.health().pause(delay) => {}
                    }
                }
            }
        }
    }
}

/// SQLSTATE class 22 (data exception): complete() refused the input; retrying it cannot help.
fn is_data_error(e: &DbError) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("22"))
}

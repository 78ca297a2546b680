//! Executors: one task per claimed job. Renders, sends (email or HTTP), turns what happened into a
//! result for `herald.complete`, and hands it to the completer. Nothing a job does can crash the
//! process: every failure is a result, retryable or not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde_json::Value as Json;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::email::Mailer;
use super::job::{Job, Outcome};
use super::metrics::Metrics;
use super::render::{Renderer, Vars};
use super::webhook::Webhooks;

pub struct Executor {
    pub mailer: Mailer,
    pub webhooks: Webhooks,
    pub renderer: Renderer,
    pub metrics: Arc<Metrics>,
    pub results: mpsc::Sender<Json>,
    /// A job still running this long after its claim is given up (its lease is about to expire).
    pub deadline: Duration,
    /// Cancelled when the shutdown grace period is over: jobs still running report a retryable failure.
    pub hard_stop: CancellationToken,
}

impl Executor {
    /// Runs one job; the permit is released once its result is queued for the completer.
    pub async fn run(self: Arc<Self>, job: Job, permit: OwnedSemaphorePermit) {
        let started = Instant::now();
        // boxed: the send's state machine (reqwest's and hyper's futures inside) is kilobytes, and
        // unboxed it was copied whole at each wrapping (the task, the timeout, the select): in a
        // profile of the webhook bench, ~5% of the process's CPU was those copies
        let work = std::panic::AssertUnwindSafe(Box::pin(self.execute(&job))).catch_unwind();
        let outcome = tokio::select! {
            finished = tokio::time::timeout(self.deadline, work) => match finished {
                Ok(Ok(outcome)) => outcome,
                // a bug, not the job's fault: it would happen again, so it is not retried
                Ok(Err(panic)) => {
                    Outcome::permanent(format!("internal error: {}", super::panic_message(&*panic)))
                }
                Err(_) => Outcome::retry(format!(
                    "not finished after {} s, before its lease ends",
                    self.deadline.as_secs()
                )),
            },
            () = self.hard_stop.cancelled() => {
                Outcome::retry("interrupted: herald run shut down before the job finished")
            }
        };
        let elapsed = started.elapsed();
        self.metrics.record(&job.kind, &outcome, elapsed);
        let (id, kind, attempt) = (job.id, job.kind.as_str(), job.attempt);
        let ms = elapsed.as_millis() as u64;
        match &outcome {
            Outcome::Done { .. } => tracing::debug!(job = id, kind, attempt, ms, "done"),
            Outcome::Failed {
                retryable: true,
                error,
            } => {
                tracing::info!(job = id, kind, attempt, ms, %error, "failed, will be retried")
            }
            Outcome::Failed {
                retryable: false,
                error,
            } => {
                tracing::warn!(job = id, kind, attempt, ms, %error, "failed permanently")
            }
            Outcome::Refused { error, .. } => {
                tracing::info!(job = id, kind, attempt, ms, %error, "refused by the receiving server: a hard bounce")
            }
        }
        // waits while the channel is full (the completer is retrying a database that is away): the slot
        // held meanwhile is what keeps the producer from claiming more than can be recorded
        if self
            .results
            .send(outcome.into_result(job.id))
            .await
            .is_err()
        {
            tracing::error!(
                "completer is gone: result lost (the lease will expire and the job run again)"
            );
        }
        drop(permit);
    }

    /// A claimed job the producer could not decode: reported as a permanent failure, like any result.
    pub async fn reject(self: Arc<Self>, id: i64, error: String, permit: OwnedSemaphorePermit) {
        let outcome = Outcome::permanent(error);
        self.metrics.record("undecodable", &outcome, Duration::ZERO);
        if let Outcome::Failed { error, .. } = &outcome {
            tracing::warn!(job = id, %error, "failed permanently");
        }
        if self.results.send(outcome.into_result(id)).await.is_err() {
            tracing::error!(
                "completer is gone: result lost (the lease will expire and the job run again)"
            );
        }
        drop(permit);
    }

    async fn execute(&self, job: &Job) -> Outcome {
        match job.kind.as_str() {
            "email" => {
                let vars = Vars::from_payload(&job.workspace, &job.payload);
                self.mailer.send(job, &self.renderer, &vars).await
            }
            // builds its variables only if it has templates to render
            "webhook" | "decide" => self.webhooks.call(job, &self.renderer).await,
            other => Outcome::permanent(format!("unknown job kind {other:?}")),
        }
    }
}

//! Executors: one task per claimed job. Renders, sends (email or HTTP), turns what happened into a
//! result for `herald.complete`, and hands it to the completer. Nothing a job does can crash the
//! process: every failure is a result, retryable or not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde_json::{json, Value as Json};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::email::Mailer;
use super::metrics::Metrics;
use super::render::{Renderer, Vars};
use super::webhook::Webhooks;

/// A row of `herald.claim`.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: i64,
    pub workspace: String,
    pub kind: String,
    pub provider: Option<String>,
    pub dedupe_key: String,
    pub attempt: i32,
    pub payload: Json,
}

/// A row of `herald.claim` as the producer decoded it.
#[derive(Debug)]
pub enum Claimed {
    Job(Job),
    /// Its id is readable, the rest is not: failed permanently with this error, alone.
    Undecodable {
        id: i64,
        error: String,
    },
    /// Not even its id (cannot happen with a sane server): left to its lease.
    Unreadable(String),
}

/// What the executors read from a payload, by kind: a field of the wrong type is refused here, with
/// its name, rather than read as absent later (`"to": 42` is not "the contact was deleted").
pub fn check_payload(job: &Job) -> Result<(), String> {
    let p = &job.payload;
    if !p.is_object() {
        return Err(format!("expected a JSON object, got {}", type_name(p)));
    }
    let fields: &[(&str, Want)] = match job.kind.as_str() {
        "email" => &[
            ("to", Want::Str),
            ("from", Want::Str),
            ("provider", Want::Str),
            ("template", Want::Object),
            ("broadcast_id", Want::Int),
            ("variation", Want::Str),
        ],
        "webhook" | "decide" => &[
            ("url", Want::Str),
            ("method", Want::Str),
            ("headers", Want::Object),
            ("timeout_ms", Want::Int),
        ],
        _ => &[],
    };
    for (name, want) in fields {
        let Some(v) = p.get(*name).filter(|v| !v.is_null()) else {
            continue; // absence is the executor's to explain ("the job has no url")
        };
        let fits = match want {
            Want::Str => v.is_string(),
            Want::Object => v.is_object(),
            Want::Int => v.is_i64() || v.is_u64(),
        };
        if !fits {
            return Err(format!(
                "{name}: expected {}, got {}",
                want.name(),
                type_name(v)
            ));
        }
    }
    if let Some(t) = p.get("template").and_then(Json::as_object) {
        for part in ["subject", "html", "text"] {
            if let Some(v) = t.get(part).filter(|v| !v.is_null() && !v.is_string()) {
                return Err(format!(
                    "template.{part}: expected a string, got {}",
                    type_name(v)
                ));
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Want {
    Str,
    Object,
    Int,
}

impl Want {
    fn name(self) -> &'static str {
        match self {
            Want::Str => "a string",
            Want::Object => "an object",
            Want::Int => "a whole number",
        }
    }
}

fn type_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Done {
        message_id: Option<String>,
        response: Option<Json>,
    },
    Failed {
        retryable: bool,
        error: String,
    },
}

impl Outcome {
    pub fn permanent(error: impl Into<String>) -> Self {
        Self::Failed {
            retryable: false,
            error: error.into(),
        }
    }

    pub fn retry(error: impl Into<String>) -> Self {
        Self::Failed {
            retryable: true,
            error: error.into(),
        }
    }

    /// The element of `herald.complete`'s array for this job.
    pub fn to_result(&self, id: i64) -> Json {
        match self {
            Self::Done {
                message_id,
                response,
            } => {
                let mut r = json!({"id": id, "ok": true});
                if let Some(m) = message_id {
                    r["message_id"] = Json::String(m.clone());
                }
                if let Some(v) = response {
                    r["response"] = v.clone();
                }
                r
            }
            Self::Failed { retryable, error } => {
                // keep stored errors readable and bounded
                let error: String = error.chars().take(2000).collect();
                json!({"id": id, "ok": false, "retryable": retryable, "error": error})
            }
        }
    }
}

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
        let work = std::panic::AssertUnwindSafe(self.execute(&job)).catch_unwind();
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
        }
        // waits while the channel is full (the completer is retrying a database that is away): the slot
        // held meanwhile is what keeps the producer from claiming more than can be recorded
        if self.results.send(outcome.to_result(job.id)).await.is_err() {
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
        if self.results.send(outcome.to_result(id)).await.is_err() {
            tracing::error!(
                "completer is gone: result lost (the lease will expire and the job run again)"
            );
        }
        drop(permit);
    }

    async fn execute(&self, job: &Job) -> Outcome {
        let vars = Vars::from_payload(&job.workspace, &job.payload);
        match job.kind.as_str() {
            "email" => self.mailer.send(job, &self.renderer, &vars).await,
            "webhook" | "decide" => self.webhooks.call(job, &self.renderer, &vars).await,
            other => Outcome::permanent(format!("unknown job kind {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_match_what_complete_accepts() {
        let ok = Outcome::Done {
            message_id: Some("<a@herald>".into()),
            response: Some(json!({"x": 1})),
        };
        assert_eq!(
            ok.to_result(17),
            json!({"id": 17, "ok": true, "message_id": "<a@herald>", "response": {"x": 1}})
        );
        let bare = Outcome::Done {
            message_id: None,
            response: None,
        };
        assert_eq!(bare.to_result(1), json!({"id": 1, "ok": true}));
        assert_eq!(
            Outcome::retry("451 4.3.0 try later").to_result(18),
            json!({"id": 18, "ok": false, "retryable": true, "error": "451 4.3.0 try later"})
        );
        let long = Outcome::permanent("x".repeat(5000)).to_result(2);
        assert_eq!(long["error"].as_str().unwrap().chars().count(), 2000);
        assert_eq!(long["error"].as_str().unwrap().len(), 2000);
        assert_eq!(long["retryable"], json!(false));
    }

    fn job(kind: &str, payload: Json) -> Job {
        Job {
            id: 1,
            workspace: "w".into(),
            kind: kind.into(),
            provider: None,
            dedupe_key: "k".into(),
            attempt: 1,
            payload,
        }
    }

    #[test]
    fn payload_fields_of_the_wrong_type_are_named() {
        assert_eq!(
            check_payload(&job(
                "email",
                json!({"to": "a@x.example", "template": {"subject": "s", "html": "h", "text": null}})
            )),
            Ok(())
        );
        assert_eq!(check_payload(&job("email", json!({"to": null}))), Ok(()));
        assert_eq!(
            check_payload(&job("email", json!({"to": 42}))),
            Err("to: expected a string, got a number".into())
        );
        assert_eq!(
            check_payload(&job(
                "email",
                json!({"to": "a@x.example", "template": {"html": ["x"]}})
            )),
            Err("template.html: expected a string, got an array".into())
        );
        assert_eq!(
            check_payload(&job(
                "webhook",
                json!({"url": "http://x", "timeout_ms": "soon"})
            )),
            Err("timeout_ms: expected a whole number, got a string".into())
        );
        assert!(check_payload(&job("webhook", json!([1]))).is_err());
    }
}

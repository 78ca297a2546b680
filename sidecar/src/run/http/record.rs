//! What the HTTP side learns goes into the database through ONE `herald.record_feedback` call per
//! request, on a connection borrowed from the daemon's pool (`database.rs`).
//!
//! While the database is away, requests must not pile up as connection attempts each waiting for the
//! connect timeout: after a failed attempt, the next requests answer 503 at once until a back-off step
//! has passed (or another component found the database back).

use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value as Json;
use tokio::time::Instant;

use crate::run::database::{Database, DbError};
use crate::run::pg::Backoff;

pub struct Recorder {
    database: Arc<Database>,
    gate: Mutex<Gate>,
}

/// When the next connection attempt may be made while the database is known to be away.
#[derive(Default)]
struct Gate {
    backoff: Backoff,
    retry_at: Option<Instant>,
}

#[derive(Debug)]
pub enum RecordError {
    /// The database is away; no attempt was made.
    Unavailable,
    Failed(DbError),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable => f.write_str("waiting for the database"),
            Self::Failed(e) => f.write_str(&e.describe()),
        }
    }
}

impl RecordError {
    /// An outage is `DbHealth`'s to report, not once per request.
    pub fn log(&self, what: &str) {
        match self {
            Self::Failed(e) if !e.is_connection_error() => {
                tracing::warn!(error = %self, "http: {what} failed")
            }
            _ => tracing::debug!(error = %self, "http: {what} failed"),
        }
    }

    /// The answer when a request's facts could not be recorded (logged here): 503, try again.
    pub fn respond(&self, what: &str) -> Response {
        self.log(what);
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "could not record it now; please try again\n",
        )
            .into_response()
    }
}

impl Recorder {
    pub fn new(database: Arc<Database>) -> Self {
        Self {
            database,
            gate: Mutex::new(Gate::default()),
        }
    }

    /// One `record_feedback` call; `only_workspace`: the workspace whose credentials came with it
    /// (a link key, a workspace's events token): entries are resolved there only. Returns how many
    /// entries were recorded.
    pub async fn record(
        &self,
        feedback: Json,
        only_workspace: Option<&str>,
    ) -> Result<i32, RecordError> {
        let mut retried = false;
        loop {
            let client = self.connection().await?;
            let result = client
                .query_one(
                    "SELECT herald.record_feedback($1::jsonb, $2::text)",
                    &[&feedback, &only_workspace],
                )
                .await;
            match result.map_err(DbError::from) {
                Ok(row) => return row.try_get(0).map_err(|e| RecordError::Failed(e.into())),
                // a pooled connection that died while idle (the server restarted) fails its
                // statement, and so would the other idle ones: once more, on a new connection
                Err(e) if !retried && e.is_connection_error() => {
                    retried = true;
                    self.database.forget_idle();
                }
                Err(e) => return Err(RecordError::Failed(e)),
            }
        }
    }

    async fn connection(&self) -> Result<deadpool_postgres::Object, RecordError> {
        let health = self.database.health();
        if self
            .lock()
            .retry_at
            .is_some_and(|at| Instant::now() < at && !health.is_up())
        {
            return Err(RecordError::Unavailable);
        }
        match self.database.get().await {
            Ok(client) => {
                let mut gate = self.lock();
                gate.backoff.reset();
                gate.retry_at = None;
                Ok(client)
            }
            Err(e) => {
                let mut gate = self.lock();
                gate.retry_at = Some(Instant::now() + gate.backoff.step());
                Err(RecordError::Failed(e))
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Gate> {
        // the gate stays consistent even if a holder panicked (each update is a plain store)
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }
}

//! How a request reaches the database: alone (`herald.api_call`, one transaction) or, for the
//! single-item operations (one event, one contact, one email), together with the others that
//! arrived meanwhile (`herald.api_calls`, one transaction for up to HERALD_API_COALESCE of them).
//! Each request of a shared call still runs in a subtransaction of its own and gets its own answer;
//! what they share is the commit (a WAL flush), the round trip and the wait for a connection,
//! which is what one event per transaction spent its time on under many clients.
//!
//! Nothing waits for a batch to fill: a request that finds a free slot goes at once (alone if it
//! is alone); the requests that arrive while [`SLOTS`] calls are in the database go in the next.
//! A shared call's requests are ordered by address, so two calls lock the same contacts in the
//! same order. A request that lost a deadlock or a serialization conflict inside a shared call
//! (nothing of it was kept) is run again alone.

use std::sync::Arc;

use serde_json::{json, Value as Json};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::error::{ApiError, SqlError};
use super::routes::Operation;
use crate::run::database::{Database, DbError};

/// Shared calls in the database at once (each holds a pooled connection). Two keep the database
/// busy while the next batch gathers; the pool's other connections stay for the daemon's own work
/// and the batch routes.
const SLOTS: usize = 2;
/// Requests waiting for a slot, at most; more wait to be queued (their clients see the latency).
const QUEUE: usize = 4096;

const CALL: &str = "SELECT response, replayed FROM herald.api_call($1, $2, $3::jsonb, $4)";
const CALLS: &str = "SELECT herald.api_calls($1::jsonb)";

/// One API request, its form checked.
pub struct Request {
    pub secret: String,
    pub operation: Operation,
    pub args: Json,
    pub idempotency_key: Option<String>,
}

/// The answer to a request: the operation's JSON and whether it is a stored one (a replay).
pub type Answer = Result<(Json, bool), ApiError>;

struct Pending {
    request: Request,
    reply: oneshot::Sender<Answer>,
}

/// Where the single-item requests queue for a shared call.
pub struct Coalescer {
    queue: mpsc::Sender<Pending>,
}

impl Coalescer {
    /// Starts the task that gathers requests into calls of at most `most`; None when `most` is 1
    /// (every request alone).
    pub fn start(database: Arc<Database>, most: usize) -> Option<Self> {
        if most <= 1 {
            return None;
        }
        let (queue, waiting) = mpsc::channel(QUEUE);
        tokio::spawn(gather(waiting, database, most));
        Some(Self { queue })
    }

    /// Runs `request` in the next shared call and waits for its answer.
    pub async fn call(&self, request: Request) -> Answer {
        let (reply, answer) = oneshot::channel();
        if self.queue.send(Pending { request, reply }).await.is_err() {
            return Err(ApiError::unavailable());
        }
        answer
            .await
            .unwrap_or_else(|_| Err(ApiError::unavailable()))
    }
}

/// Takes the waiting requests, as many as fit, whenever a slot is free; ends when the router that
/// holds the sender is gone.
async fn gather(mut waiting: mpsc::Receiver<Pending>, database: Arc<Database>, most: usize) {
    let slots = Arc::new(Semaphore::new(SLOTS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let Some(first) = waiting.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < most {
            match waiting.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        let database = Arc::clone(&database);
        tokio::spawn(async move {
            run(&database, batch).await;
            drop(slot);
        });
    }
}

/// One shared call, every request answered.
async fn run(database: &Database, mut batch: Vec<Pending>) {
    if batch.len() == 1 {
        let Pending { request, reply } = batch.remove(0);
        let _ = reply.send(alone(database, &request).await);
        return;
    }
    batch.sort_by(|a, b| lock_order(&a.request).cmp(lock_order(&b.request)));
    let requests = Json::Array(
        batch
            .iter()
            .map(|p| {
                json!({
                    "secret": p.request.secret,
                    "operation": p.request.operation.sql_name(),
                    "args": p.request.args,
                    "idempotency_key": p.request.idempotency_key,
                })
            })
            .collect(),
    );
    let answers = async {
        let client = database.get().await?;
        let statement = client.prepare_cached(CALLS).await?;
        let row = client.query_one(&statement, &[&requests]).await?;
        row.try_get::<_, Json>(0).map_err(DbError::from)
    }
    .await;
    match answers {
        Ok(Json::Array(answers)) if answers.len() == batch.len() => {
            let mut again = Vec::new();
            for (pending, answer) in batch.into_iter().zip(answers) {
                match read(&answer) {
                    Err(e) if retry_alone(&e) => again.push(pending),
                    answer => {
                        let _ = pending.reply.send(answer);
                    }
                }
            }
            for Pending { request, reply } in again {
                let _ = reply.send(alone(database, &request).await);
            }
        }
        Ok(other) => {
            tracing::error!(answer = %other, "http api: herald.api_calls answered out of form");
            for pending in batch {
                let _ = pending.reply.send(Err(ApiError::internal()));
            }
        }
        Err(e) => {
            // as for a request alone: again (alone) only when it has an idempotency key
            for Pending { request, reply } in batch {
                let answer = if e.is_connection_error() && request.idempotency_key.is_some() {
                    alone(database, &request).await
                } else {
                    Err(ApiError::from_db(&e))
                };
                let _ = reply.send(answer);
            }
        }
    }
}

/// The order a shared call runs its requests in: by address (what their locks are on), so that
/// two calls at once take them in the same order.
fn lock_order(request: &Request) -> &str {
    request.args["email"].as_str().unwrap_or_default()
}

/// A deadlock or serialization failure of one request in a shared call: its subtransaction was
/// rolled back, so running it again is safe.
fn retry_alone(e: &ApiError) -> bool {
    matches!(e.code.as_str(), "40P01" | "40001")
}

/// One element of `herald.api_calls`' answer.
fn read(answer: &Json) -> Answer {
    if let Some(error) = answer.get("error") {
        let text = |k: &str| error.get(k).and_then(Json::as_str);
        return Err(ApiError::from_sql(SqlError {
            code: text("code").unwrap_or("XX000"),
            message: text("message").unwrap_or_default(),
            detail: text("detail"),
            hint: text("hint"),
        }));
    }
    match (answer.get("response"), answer.get("replayed")) {
        (Some(response), Some(Json::Bool(replayed))) => Ok((response.clone(), *replayed)),
        _ => {
            tracing::error!(%answer, "http api: herald.api_calls answered out of form");
            Err(ApiError::internal())
        }
    }
}

/// The one statement of a request alone. A statement that failed on a connection that died while
/// idle is sent again on a new one only when the request has an idempotency key (then running it
/// twice is safe); otherwise the client gets a 503 and decides.
pub async fn alone(database: &Database, request: &Request) -> Answer {
    let mut retried = false;
    loop {
        let result = async {
            let client = database.get().await?;
            let statement = client.prepare_cached(CALL).await?;
            let row = client
                .query_one(
                    &statement,
                    &[
                        &request.secret,
                        &request.operation.sql_name(),
                        &request.args,
                        &request.idempotency_key,
                    ],
                )
                .await?;
            Ok::<_, DbError>((row.try_get(0)?, row.try_get(1)?))
        }
        .await;
        match result {
            Ok(answer) => return Ok(answer),
            Err(e) if e.is_connection_error() && request.idempotency_key.is_some() && !retried => {
                retried = true;
                database.forget_idle();
            }
            Err(e) => return Err(ApiError::from_db(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_a_response_or_the_sql_error() {
        let (response, replayed) =
            read(&json!({"response": {"id": 7}, "replayed": false})).expect("an answer");
        assert_eq!(response, json!({"id": 7}));
        assert!(!replayed);
        let e = read(&json!({"error": {"code": "22023", "message": "track: email \"x\" is not a valid address", "detail": null, "hint": null}}))
            .expect_err("refused");
        assert_eq!(e.status.as_u16(), 422);
        assert_eq!(e.code, "22023");
        assert_eq!(e.message, "track: email \"x\" is not a valid address");
        let e = read(
            &json!({"error": {"code": "28000", "message": "unknown API key", "hint": "Send …"}}),
        )
        .expect_err("refused");
        assert_eq!(
            (e.status.as_u16(), e.hint.as_deref()),
            (401, Some("Send …"))
        );
        // an internal error says nothing of itself to the client
        let e = read(&json!({"error": {"code": "XX000", "message": "secret internals"}}))
            .expect_err("failed");
        assert_eq!(e.status.as_u16(), 500);
        assert!(!e.message.contains("secret"), "{}", e.message);
        assert_eq!(
            read(&json!({"what": 1})).expect_err("odd").status.as_u16(),
            500
        );
    }

    #[test]
    fn only_conflicts_are_run_again_alone() {
        let code =
            |c: &str| read(&json!({"error": {"code": c, "message": "m"}})).expect_err("an error");
        assert!(retry_alone(&code("40P01")));
        assert!(retry_alone(&code("40001")));
        assert!(!retry_alone(&code("22023")));
        assert!(
            !retry_alone(&code("23505")),
            "an idempotency key's conflict is the client's"
        );
    }

    #[test]
    fn requests_are_ordered_by_address() {
        let request = |args: Json| Request {
            secret: String::new(),
            operation: Operation::Track,
            args,
            idempotency_key: None,
        };
        assert_eq!(lock_order(&request(json!({"email": "b@x"}))), "b@x");
        assert_eq!(lock_order(&request(json!({"kind": "k"}))), "");
        assert_eq!(lock_order(&request(json!({"email": 5}))), "");
    }
}

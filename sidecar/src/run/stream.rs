//! `GET /stream?workspace=<ws>`: a workspace's results (`herald.read_results`) as server-sent events,
//! for apps that react to what herald did without polling tables.
//!
//! Each event is one result: `id:` its result id (the cursor), `event:` its kind (`email.sent`, …),
//! `data:` the result as JSON (id, kind, at, subjects, data). A client that reconnects sends the last id
//! it got as `Last-Event-ID` (browsers' EventSource do so by themselves; `?after=<id>` does the same)
//! and gets every result after it, in order, each once: the ids are the stream's own cursor (see
//! sql/results.sql, "Order and cursor"). Without either, the stream starts at what is published now.
//! `?kinds=email.sent,email.failed` narrows it.
//!
//! Access: `Authorization: Bearer <token>` (or `?token=`, for EventSource, which cannot send headers;
//! a URL may end up in logs, so prefer the header) with the workspace's stream token
//! (`[workspaces.<ws>] stream_token`) or the default HERALD_STREAM_TOKEN, which may read every
//! workspace; or with an API key that has the `results` scope (`hk_…`, `herald.create_api_key`),
//! which reads its own workspace (`workspace=` may be left out; a token of an API key's form,
//! `hk_<id>_<64 hex>`, is taken as one). A key is checked by the database
//! (`herald.api_key_workspace`) when the stream opens and again before an event is sent once
//! [`KEY_RECHECK`] has passed since the last check: a revoked key's stream ends then. Opening a
//! stream with a key is one of the key's requests under HERALD_API_RATE_PER_KEY (the buckets of the
//! HTTP API, shared): over it, 429 before the database is asked. Without any
//! stream token configured, a request without an API key answers 404.
//!
//! Waking: results become readable when maintenance publishes them (`herald.advance_results`, each
//! round); a publishing round that moved rows bumps [`Published`], which wakes every reader at once.
//! Readers also look every second (another daemon may have published). Open streams of one workspace
//! (and kinds) share one reader, see `stream_tail`: one query per wake-up and workspace, not per
//! stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::config::{constant_time_eq, Keys, TokenScope};
use super::database::{Database, DbError};
use super::http::{is_api_key, retry_after_seconds, KeyRates};
use super::stream_tail::{newest, read, Follower, Row, Source, Tails};

/// A comment line this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How long an API key's answer stands before the next event asks the database again: how late a
/// revocation may stop a stream (an idle stream sends nothing, so it is asked only when it would).
const KEY_RECHECK: Duration = Duration::from_secs(5);
/// The scope an API key needs to read results.
const RESULTS_SCOPE: &str = "results";

/// Bumped by maintenance whenever `advance_results` published rows.
#[derive(Clone)]
pub struct Published(Arc<watch::Sender<u64>>);

impl Default for Published {
    fn default() -> Self {
        Self(Arc::new(watch::channel(0).0))
    }
}

impl Published {
    pub fn bump(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

#[derive(Clone)]
struct StreamApp {
    database: Arc<Database>,
    keys: Arc<Keys>,
    published: Published,
    shutdown: CancellationToken,
    tails: Tails,
    /// The API keys' rates (HERALD_API_RATE_PER_KEY): opening a stream with a key is one request.
    rates: Option<Arc<KeyRates>>,
}

/// The `/stream` route. Served without the request time limit of the other routes: a stream is
/// meant to stay open.
pub fn router(
    database: Arc<Database>,
    keys: Arc<Keys>,
    published: Published,
    shutdown: CancellationToken,
    rates: Option<Arc<KeyRates>>,
) -> Router {
    Router::new()
        .route("/stream", get(open))
        .with_state(StreamApp {
            database,
            keys,
            published,
            shutdown,
            tails: Tails::default(),
            rates,
        })
}

#[derive(Deserialize)]
struct Params {
    workspace: Option<String>,
    after: Option<String>,
    kinds: Option<String>,
    token: Option<String>,
}

/// What a request asked for, checked.
#[derive(Debug, PartialEq, Eq)]
struct Ask {
    /// None: the API key's.
    workspace: Option<String>,
    /// None: from what is published now.
    after: Option<i64>,
    kinds: Option<Vec<String>>,
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, format!("{why}\n")).into_response()
}

/// The request's workspace, cursor and kinds, or why it is refused (a 400).
fn ask(params: &Params, headers: &HeaderMap) -> Result<Ask, &'static str> {
    let workspace = params
        .workspace
        .as_deref()
        .map(str::trim)
        .filter(|w| !w.is_empty());
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let after = match last_event_id.or(params.after.as_deref()) {
        None => None,
        Some(text) => Some(text.parse::<i64>().ok().filter(|n| *n >= 0).ok_or(
            "Last-Event-ID / after must be a result id (a whole number, 0 for every result kept)",
        )?),
    };
    let kinds = params.kinds.as_deref().map(|k| {
        k.split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(String::from)
            .collect::<Vec<_>>()
    });
    Ok(Ask {
        workspace: workspace.map(String::from),
        after,
        kinds: kinds.filter(|k| !k.is_empty()),
    })
}

/// The presented token: the Authorization header's bearer token, else `?token=`.
fn presented<'a>(params: &'a Params, headers: &'a HeaderMap) -> Option<&'a str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .or(params.token.as_deref())
}

/// The workspace an API key reads (the database's answer), or the refusal to send.
async fn key_workspace(database: &Database, secret: &str) -> Result<String, Response> {
    let checked = async {
        let client = database.get().await?;
        let row = client
            .query_one(
                "SELECT herald.api_key_workspace($1, $2)",
                &[&secret, &RESULTS_SCOPE],
            )
            .await?;
        Ok::<String, DbError>(row.try_get(0)?)
    }
    .await;
    checked.map_err(|e| match e.code().map(|c| c.code()) {
        // an unknown or revoked key; a key without the results scope
        Some("28000") => refuse(StatusCode::UNAUTHORIZED, &db_message(&e)),
        Some("42501") => refuse(StatusCode::FORBIDDEN, &db_message(&e)),
        // undefined_function: the database's extension is older than 0.16.0 (compat.rs: a daemon may
        // be upgraded first)
        Some("42883") => refuse(
            StatusCode::NOT_IMPLEMENTED,
            "API keys read the stream once the database's herald extension is 0.16.0 or later",
        ),
        _ => read_failed(&e),
    })
}

/// 429 with when to come back: the key opened more streams than its rate allows.
fn over_rate(refusal: &str, retry_after: u64) -> Response {
    let mut refused = refuse(StatusCode::TOO_MANY_REQUESTS, refusal);
    refused
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after));
    refused
}

fn db_message(e: &DbError) -> String {
    match e {
        DbError::Pg(pg) => pg
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_default(),
        DbError::Pool(_) => String::new(),
    }
}

/// Whether `token` may read `workspace`'s stream: its own token, or the default one.
fn allowed(keys: &Keys, workspace: &str, token: &str) -> bool {
    match keys.stream_scope(|t| constant_time_eq(t, token.as_bytes())) {
        Some(TokenScope::All) => true,
        Some(TokenScope::Workspace(w)) => w == workspace,
        None => false,
    }
}

async fn open(
    State(app): State<StreamApp>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Response {
    let token = presented(&params, &headers);
    let api_key = token.filter(|t| is_api_key(t));
    if api_key.is_none() && !app.keys.has_stream_tokens() {
        return refuse(StatusCode::NOT_FOUND, "not found");
    }
    let Some(token) = token else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "a stream token or an API key with the results scope is required: Authorization: Bearer <token>",
        );
    };
    let mut ask = match ask(&params, &headers) {
        Ok(ask) => ask,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, why),
    };
    let key_check = match api_key {
        Some(secret) => {
            // a reconnect loop is held to the key's rate as its API calls are, before it costs a
            // database call
            if let Some(rates) = &app.rates {
                if let Err(wait) = rates.take(secret, Instant::now()) {
                    return over_rate(&rates.refusal(), retry_after_seconds(wait));
                }
            }
            let workspace = match key_workspace(&app.database, secret).await {
                Ok(w) => w,
                Err(refused) => return refused,
            };
            if ask.workspace.as_ref().is_some_and(|w| *w != workspace) {
                return refuse(
                    StatusCode::FORBIDDEN,
                    "this API key reads its own workspace's stream only",
                );
            }
            ask.workspace = Some(workspace);
            Some(KeyCheck {
                database: Arc::clone(&app.database),
                secret: secret.to_string(),
                checked: Instant::now(),
            })
        }
        None => {
            let Some(workspace) = ask.workspace.as_deref() else {
                return refuse(StatusCode::BAD_REQUEST, "workspace=<name> is required");
            };
            if !allowed(&app.keys, workspace, token) {
                return refuse(
                    StatusCode::FORBIDDEN,
                    "this token may not read that workspace's stream",
                );
            }
            None
        }
    };
    let workspace = ask.workspace.expect("set above");
    // the first read happens now, so that a bad workspace or kind is an HTTP error, not a broken stream
    let after = match ask.after {
        Some(after) => after,
        None => match newest(&app.database, &workspace).await {
            Ok(id) => id,
            Err(e) => return read_failed(&e),
        },
    };
    let first = match read(&app.database, &workspace, after, ask.kinds.as_deref()).await {
        Ok(rows) => rows,
        Err(e) => return read_failed(&e),
    };
    let source = Source {
        database: app.database,
        published: app.published.subscribe(),
        shutdown: app.shutdown,
    };
    let follower = app
        .tails
        .follow(&source, workspace, ask.kinds, after, first);
    Sse::new(events(follower, key_check))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// An API key's stream: the key, and when the database last said it may read.
struct KeyCheck {
    database: Arc<Database>,
    secret: String,
    checked: Instant,
}

impl KeyCheck {
    /// Whether the key may still read: asked again once [`KEY_RECHECK`] has passed. Any failure ends
    /// the stream (a client reconnects, and its key is checked as at the start).
    async fn still_valid(&mut self) -> bool {
        if self.checked.elapsed() < KEY_RECHECK {
            return true;
        }
        match key_workspace(&self.database, &self.secret).await {
            Ok(_) => {
                self.checked = Instant::now();
                true
            }
            Err(_) => {
                tracing::info!("stream: an API key no longer reads results; its stream ends");
                false
            }
        }
    }
}

fn events(
    follower: Follower,
    key_check: Option<KeyCheck>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    stream::unfold(
        (follower, key_check),
        |(mut follower, mut key_check)| async move {
            let next = follower.next().await?;
            if let Some(check) = key_check.as_mut() {
                if !check.still_valid().await {
                    return None;
                }
            }
            Some((Ok(event(next.row())), (follower, key_check)))
        },
    )
}

/// A refused read: the workspace or kinds are wrong (400, with the database's message), or the
/// database is away (503).
fn read_failed(e: &DbError) -> Response {
    if e.is_connection_error() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database is not reachable; try again shortly",
        );
    }
    match e {
        DbError::Pg(pg) => match pg.as_db_error() {
            // an invalid argument (22…) or an unknown workspace (23503, as every API function says)
            Some(db) if db.code().code().starts_with("22") || db.code().code() == "23503" => {
                refuse(StatusCode::BAD_REQUEST, db.message())
            }
            _ => {
                tracing::warn!(error = %e.describe(), "stream: reading results failed");
                refuse(StatusCode::INTERNAL_SERVER_ERROR, "reading results failed")
            }
        },
        DbError::Pool(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "no database connection"),
    }
}

fn event(row: &Row) -> Event {
    Event::default()
        .id(row.id.to_string())
        .event(&row.kind)
        .data(row.json.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(query: &str) -> Params {
        let uri: axum::http::Uri = format!("/stream?{query}").parse().unwrap();
        Query::<Params>::try_from_uri(&uri).unwrap().0
    }

    #[test]
    fn a_request_names_its_workspace_cursor_and_kinds() {
        let mut headers = HeaderMap::new();
        let a = ask(
            &params("workspace=acme&kinds=email.sent,%20email.failed"),
            &headers,
        )
        .unwrap();
        assert_eq!(
            a,
            Ask {
                workspace: Some("acme".into()),
                after: None,
                kinds: Some(vec!["email.sent".into(), "email.failed".into()]),
            }
        );
        assert_eq!(
            ask(&params("workspace=acme&after=7"), &headers)
                .unwrap()
                .after,
            Some(7)
        );
        // Last-Event-ID wins over ?after= (a browser reconnecting keeps the URL it started with)
        headers.insert("last-event-id", HeaderValue::from_static("42"));
        assert_eq!(
            ask(&params("workspace=acme&after=7"), &headers)
                .unwrap()
                .after,
            Some(42)
        );
        // without a workspace: the API key's (a stream token without one is refused by `open`)
        assert_eq!(ask(&params("after=7"), &headers).unwrap().workspace, None);
        headers.insert("last-event-id", HeaderValue::from_static("-1"));
        assert!(ask(&params("workspace=acme"), &headers).is_err());
        headers.insert("last-event-id", HeaderValue::from_static("x"));
        assert!(ask(&params("workspace=acme"), &headers).is_err());
    }

    #[test]
    fn the_bearer_header_wins_over_the_query_token() {
        let mut headers = HeaderMap::new();
        let p = params("workspace=acme&token=from-url");
        assert_eq!(presented(&p, &headers), Some("from-url"));
        headers.insert(
            "authorization",
            HeaderValue::from_static("Bearer from-header"),
        );
        assert_eq!(presented(&p, &headers), Some("from-header"));
    }

    #[test]
    fn events_carry_the_cursor_and_the_kind() {
        let e = event(&Row {
            id: 12,
            kind: "email.sent".into(),
            json: serde_json::json!({"id": 12}),
        });
        let text = format!("{e:?}");
        assert!(text.contains("12"), "{text}");
    }
}

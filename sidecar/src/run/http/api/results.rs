//! `GET /v1/results?after=<id>&kinds=<k1,k2>&limit=<n>`: the key's workspace's results (what herald
//! did: emails sent, bounced, opened, journeys finished, …), for an application that holds an API
//! key with the `results` scope and polls. One `herald.api_call(secret, 'read_results', args)`: the
//! answer is `{"results": [...], "next": <id>}`, and `next` is the `after` of the following call, so
//! nothing is skipped or read twice (sql/results.sql, "Order and cursor"). Without `after` the read
//! starts at what is published now, as `GET /stream` does; `after=0` reads every result kept.
//!
//! The query is only turned into the call's arguments here: whole numbers become JSON numbers,
//! anything else is passed as text, so the database's checks give the messages (the same as from
//! SQL). A parameter given twice is refused here (which one would count?).
//!
//! `GET /v1/results/subscriptions` is another read: the workspace's result webhooks with their
//! state (`list_result_subscriptions`, no parameters). And `GET /v1/suppressions/{email}` (a key with
//! the `suppressions` scope): whether the address is suppressed in the workspace, and why
//! (`read_suppression`).

use axum::extract::{RawPathParams, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value as Json};

use super::error::ApiError;
use super::routes::{admit, answer, call};
use super::ApiState;

/// The reads among `herald.api_call`'s operations.
#[derive(Clone, Copy, Debug)]
pub enum Read {
    Results,
    Subscriptions,
    Suppression,
}

impl Read {
    pub fn sql_name(self) -> &'static str {
        match self {
            Self::Results => "read_results",
            Self::Subscriptions => "list_result_subscriptions",
            Self::Suppression => "read_suppression",
        }
    }
}

pub async fn handle(
    read: Read,
    State(state): State<ApiState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let args = arguments(query.as_deref().unwrap_or(""));
    respond(read, &state, &headers, args).await
}

/// A read whose path names what it reads (`/v1/suppressions/{email}`): the path's parameters are its
/// arguments (percent-decoded; a query string is refused: the path says it all).
pub async fn handle_path(
    read: Read,
    State(state): State<ApiState>,
    params: RawPathParams,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let args = match query.filter(|q| !q.is_empty()) {
        Some(q) => Err(ApiError::invalid(
            format!("this route takes no query string, got {q:?}"),
            Some("GET /v1/suppressions/<email>, the address percent-encoded if need be."),
        )),
        None => Ok(params
            .iter()
            .map(|(name, value)| (name.to_string(), Json::String(value.to_string())))
            .collect()),
    };
    respond(read, &state, &headers, args).await
}

async fn respond(
    read: Read,
    state: &ApiState,
    headers: &HeaderMap,
    args: Result<Map<String, Json>, ApiError>,
) -> Response {
    let read = async {
        let secret = admit(state, headers)?;
        // a read is safe to send again on a new connection
        call(
            state,
            secret,
            read.sql_name(),
            &Json::Object(args?),
            None,
            true,
        )
        .await
    };
    match read.await {
        Ok((json, _)) => answer(&json, false),
        Err(e) => e.into_response(),
    }
}

/// The query string as read_results' arguments: `after` and `limit` as numbers when they are
/// whole numbers, `kinds` as a list split at commas, any other name passed on (the database names
/// what it does not know).
pub fn arguments(query: &str) -> Result<Map<String, Json>, ApiError> {
    let mut args = Map::new();
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        let value = match name.as_ref() {
            "kinds" => Json::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(|k| Json::String(k.to_string()))
                    .collect(),
            ),
            _ => match value.trim().parse::<i64>() {
                Ok(n) => Json::from(n),
                Err(_) => Json::String(value.to_string()),
            },
        };
        if args.insert(name.to_string(), value).is_some() {
            return Err(ApiError::bad_request(
                format!("the query names {name} twice"),
                Some("GET /v1/results?after=<next of the last answer>&kinds=email.sent,email.bounced&limit=100"),
            ));
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_query_becomes_the_calls_arguments() {
        let args = |q: &str| arguments(q).map(Json::Object);
        assert_eq!(args("").unwrap(), json!({}));
        assert_eq!(
            args("after=42&limit=10&kinds=email.sent,%20email.bounced,").unwrap(),
            json!({"after": 42, "limit": 10, "kinds": ["email.sent", "email.bounced"]})
        );
        // not a number: passed as text, for the database to refuse with its message
        assert_eq!(
            args("after=yesterday&limit=-3").unwrap(),
            json!({"after": "yesterday", "limit": -3})
        );
        assert_eq!(args("kinds=").unwrap(), json!({"kinds": []}));
        assert_eq!(
            args("workspace=other").unwrap(),
            json!({"workspace": "other"})
        );
        let twice = arguments("after=1&after=2").expect_err("twice");
        assert_eq!(twice.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(twice.message.contains("after twice"), "{}", twice.message);
    }
}

//! The API's routes: which SQL operation each one is, which fields its body may have, and the one
//! handler they share: the request's form is checked here (key syntax, Idempotency-Key, JSON, depth,
//! fields, batch size), then ONE `herald.api_call` does the rest in the database.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawPathParams, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value as Json};

use super::error::ApiError;
use super::{auth, idempotency, key_rate, ApiState};
use crate::run::database::DbError;

/// The most items (events, contacts, addresses) one batch request may carry; more is a 413 that
/// says to split it. With the 1 MiB body limit, about 100 bytes an event.
pub const MAX_BATCH: usize = 10_000;
/// How deep a body may nest: an event's payload may nest 32 levels (herald._value_fault), and the
/// envelope adds three (body, events, the event).
pub const MAX_DEPTH: usize = 40;

/// What a route does in the database: an operation of `herald.api_call`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Track,
    TrackMany,
    UpsertContact,
    UpsertContacts,
    Send,
    Subscribe,
    Unsubscribe,
    SubscribeResults,
    UnsubscribeResults,
    RetryResultSubscription,
    Suppress,
    Unsuppress,
}

impl Operation {
    /// Its name in `herald.api_call`.
    pub fn sql_name(self) -> &'static str {
        match self {
            Self::Track => "track",
            Self::TrackMany => "track_many",
            Self::UpsertContact => "upsert_contact",
            Self::UpsertContacts => "upsert_contacts",
            Self::Send => "send",
            Self::Subscribe => "subscribe",
            Self::Unsubscribe => "unsubscribe",
            Self::SubscribeResults => "subscribe_results",
            Self::UnsubscribeResults => "unsubscribe_results",
            Self::RetryResultSubscription => "retry_result_subscription",
            Self::Suppress => "suppress",
            Self::Unsuppress => "unsuppress",
        }
    }

    /// The fields its body may have (the API key gives the workspace; the path gives the list or
    /// the subscription).
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            Self::Track => &["email", "kind", "payload"],
            Self::TrackMany => &["events"],
            Self::UpsertContact => &["email", "attributes"],
            Self::UpsertContacts => &["contacts"],
            Self::Send => &["email", "template", "context", "provider", "dedupe_key"],
            Self::Subscribe | Self::Unsubscribe => &["email", "emails"],
            Self::SubscribeResults => &["url", "kinds", "options"],
            Self::Suppress => &["email", "reason", "detail"],
            Self::UnsubscribeResults | Self::RetryResultSubscription | Self::Unsuppress => &[],
        }
    }

    /// The field that holds a batch, with what its items are called.
    fn batch(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::TrackMany => Some(("events", "events")),
            Self::UpsertContacts => Some(("contacts", "contacts")),
            Self::Subscribe | Self::Unsubscribe => Some(("emails", "addresses")),
            _ => None,
        }
    }

    /// The scope a key needs (`herald._api_scope`).
    pub fn scope(self) -> &'static str {
        match self {
            Self::Track | Self::TrackMany => "track",
            Self::UpsertContact | Self::UpsertContacts => "contacts",
            Self::Send => "send",
            Self::Subscribe | Self::Unsubscribe => "lists",
            Self::SubscribeResults | Self::UnsubscribeResults | Self::RetryResultSubscription => {
                "results"
            }
            Self::Suppress | Self::Unsuppress => "suppressions",
        }
    }
}

/// A write's HTTP method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Post,
    /// Ends something the path names; no body (an empty one, or `{}`).
    Delete,
}

impl Method {
    /// Its name in the OpenAPI document.
    pub fn openapi(self) -> &'static str {
        match self {
            Self::Post => "post",
            Self::Delete => "delete",
        }
    }
}

/// A route of the API: `<method> <path>` runs `operation`.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub operation: Operation,
}

const fn post(path: &'static str, operation: Operation) -> Route {
    Route {
        method: Method::Post,
        path,
        operation,
    }
}

/// Every write route the router serves (the router is built from this list, and the OpenAPI
/// document is checked against it). The reads are in `results`.
pub const ROUTES: &[Route] = &[
    post("/v1/track", Operation::Track),
    post("/v1/track/batch", Operation::TrackMany),
    post("/v1/contacts", Operation::UpsertContact),
    post("/v1/contacts/batch", Operation::UpsertContacts),
    post("/v1/send", Operation::Send),
    post("/v1/lists/{list}/subscribe", Operation::Subscribe),
    post("/v1/lists/{list}/unsubscribe", Operation::Unsubscribe),
    post("/v1/results/subscriptions", Operation::SubscribeResults),
    Route {
        method: Method::Delete,
        path: "/v1/results/subscriptions/{id}",
        operation: Operation::UnsubscribeResults,
    },
    post(
        "/v1/results/subscriptions/{id}/retry",
        Operation::RetryResultSubscription,
    ),
    post("/v1/suppressions", Operation::Suppress),
    Route {
        method: Method::Delete,
        path: "/v1/suppressions/{email}",
        operation: Operation::Unsuppress,
    },
];

const CALL: &str = "SELECT response, replayed FROM herald.api_call($1, $2, $3::jsonb, $4)";

/// Every write route: check the form, make the one call, answer with its JSON.
pub async fn handle(
    operation: Operation,
    State(state): State<ApiState>,
    params: RawPathParams,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match run(operation, &state, &params, &headers, body).await {
        Ok((json, replayed)) => answer(&json, replayed),
        Err(e) => e.into_response(),
    }
}

/// A 200 with the call's JSON; a replayed one says so.
pub(super) fn answer(json: &Json, replayed: bool) -> Response {
    let mut response = (
        StatusCode::OK,
        [(CONTENT_TYPE, "application/json")],
        json.to_string(),
    )
        .into_response();
    if replayed {
        response
            .headers_mut()
            .insert(idempotency::REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

async fn run(
    operation: Operation,
    state: &ApiState,
    params: &RawPathParams,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(Json, bool), ApiError> {
    let secret = admit(state, headers)?;
    let idempotency_key = idempotency::key(headers)?;
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::body_too_large()
        } else {
            ApiError::bad_request(r.body_text(), None)
        }
    })?;
    // a route that takes no field (the path says it all) may come without a body
    let body: &[u8] = if body.is_empty() && operation.fields().is_empty() {
        b"{}"
    } else {
        &body
    };
    let mut args = arguments(operation, body)?;
    for (name, value) in params.iter() {
        let value = match (name, value.parse::<i64>()) {
            ("id", Ok(id)) => Json::from(id),
            _ => Json::String(value.to_string()),
        };
        args.insert(name.into(), value);
    }
    call(
        state,
        secret,
        operation.sql_name(),
        &Json::Object(args),
        idempotency_key,
        idempotency_key.is_some(),
    )
    .await
}

/// The request's API key, when it has the form of one and is within its rate (`key_rate`); whether
/// it is a live key is the database's to say, in the request's one call.
pub(super) fn admit<'h>(state: &ApiState, headers: &'h HeaderMap) -> Result<&'h str, ApiError> {
    let secret = auth::secret(headers)?;
    if let Some(rates) = &state.rates {
        rates
            .take(secret, std::time::Instant::now())
            .map_err(|wait| {
                ApiError::rate_limited(rates.refusal(), key_rate::retry_after_seconds(wait))
            })?;
    }
    Ok(secret)
}

/// The body as `herald.api_call`'s arguments, or why it is refused: JSON, an object, at most
/// [`MAX_DEPTH`] deep, only the route's fields, at most [`MAX_BATCH`] items. The values themselves
/// are the SQL functions' to check (so their messages are the same as from SQL).
pub fn arguments(operation: Operation, body: &[u8]) -> Result<Map<String, Json>, ApiError> {
    let value: Json = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_json(format!("the body is not JSON: {e}")))?;
    let Json::Object(mut args) = value else {
        return Err(ApiError::invalid(
            "the body must be a JSON object",
            Some("GET /v1/openapi.json describes each route's body."),
        ));
    };
    if depth(&args) > MAX_DEPTH {
        return Err(ApiError::too_deep(format!(
            "the body nests deeper than {MAX_DEPTH} levels"
        )));
    }
    let allowed = operation.fields();
    if let Some(unknown) = args.keys().find(|k| !allowed.contains(&k.as_str())) {
        let hint = (unknown == "workspace")
            .then_some("The workspace is the API key's; a key acts for its workspace only.");
        return Err(ApiError::unknown_field(
            format!(
                "unknown field {} in the body; allowed: {}",
                Json::String(unknown.clone()),
                allowed.join(", ")
            ),
            hint,
        ));
    }
    if matches!(operation, Operation::Subscribe | Operation::Unsubscribe) {
        // one address or many: `emails` is what the SQL function takes
        match (args.remove("email"), args.contains_key("emails")) {
            (Some(_), true) => {
                return Err(ApiError::invalid(
                    "give either email or emails, not both",
                    None,
                ))
            }
            (Some(one), false) => {
                args.insert("emails".into(), Json::Array(vec![one]));
            }
            (None, _) => {}
        }
    }
    if let Some((field, items)) = operation.batch() {
        if let Some(n) = args.get(field).and_then(Json::as_array).map(Vec::len) {
            if n > MAX_BATCH {
                return Err(ApiError::batch_too_large(format!(
                    "at most {MAX_BATCH} {items} per request, got {n}"
                )));
            }
        }
    }
    Ok(args)
}

/// How many levels of arrays and objects `args` (an object: level 1) holds, without recursion.
fn depth(args: &Map<String, Json>) -> usize {
    let mut deepest = 1;
    let mut stack: Vec<(&Json, usize)> = args.values().map(|v| (v, 2)).collect();
    while let Some((value, level)) = stack.pop() {
        match value {
            Json::Array(items) => {
                deepest = deepest.max(level);
                stack.extend(items.iter().map(|v| (v, level + 1)));
            }
            Json::Object(map) => {
                deepest = deepest.max(level);
                stack.extend(map.values().map(|v| (v, level + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// The one statement of a request. A statement that failed on a connection that died while idle is
/// sent again on a new one only when `repeatable` (a read, or a write with an idempotency key: then
/// running it twice is safe); otherwise the client gets a 503 and decides.
pub(super) async fn call(
    state: &ApiState,
    secret: &str,
    operation: &str,
    args: &Json,
    idempotency_key: Option<&str>,
    repeatable: bool,
) -> Result<(Json, bool), ApiError> {
    let mut retried = false;
    loop {
        let result = async {
            let client = state.database.get().await?;
            let statement = client.prepare_cached(CALL).await?;
            let row = client
                .query_one(&statement, &[&secret, &operation, args, &idempotency_key])
                .await?;
            Ok::<_, DbError>((row.try_get(0)?, row.try_get(1)?))
        }
        .await;
        match result {
            Ok(answer) => return Ok(answer),
            Err(e) if e.is_connection_error() && repeatable && !retried => {
                retried = true;
                state.database.forget_idle();
            }
            Err(e) => return Err(ApiError::from_call(&e, operation)),
        }
    }
}

/// Any other path under /v1/: a JSON 404 that names it.
pub async fn unknown(uri: Uri) -> Response {
    ApiError::not_found(format!("no route {}", uri.path())).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn depth_counts_levels_of_containers() {
        let obj = |v: Json| v.as_object().cloned().expect("an object");
        assert_eq!(depth(&obj(json!({"a": 1}))), 1);
        assert_eq!(depth(&obj(json!({"events": [{"payload": {}}]}))), 4);
        assert_eq!(depth(&obj(json!({"a": [[[]]], "b": {}}))), 4);
    }

    #[test]
    fn one_address_becomes_a_list_of_one() {
        let args = arguments(Operation::Subscribe, br#"{"email": "a@x.example"}"#).expect("ok");
        assert_eq!(Json::Object(args), json!({"emails": ["a@x.example"]}));
        let e = arguments(
            Operation::Subscribe,
            br#"{"email": "a@x.example", "emails": []}"#,
        )
        .expect_err("both");
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[test]
    fn bodies_that_are_not_objects_are_refused() {
        for (body, status) in [
            (&b"[]"[..], StatusCode::UNPROCESSABLE_ENTITY),
            (b"\"x\"", StatusCode::UNPROCESSABLE_ENTITY),
            (b"{", StatusCode::BAD_REQUEST),
            (b"", StatusCode::BAD_REQUEST),
        ] {
            let e = arguments(Operation::Track, body).expect_err("refused");
            assert_eq!(e.status, status, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn every_operation_has_a_scope_and_a_route() {
        for route in ROUTES {
            assert!(!route.operation.scope().is_empty());
            assert!(route.path.starts_with("/v1/"));
        }
        assert_eq!(ROUTES.len(), 12);
    }
}

//! The HTTP API (`/v1/…`): what an application that holds no database connection (a browser, a
//! mobile backend, a serverless function, a form) may ask of herald, with a per-workspace API key.
//!
//!   POST /v1/track                      one event              herald.track
//!   POST /v1/track/batch                many events            herald.track_many (one call)
//!   POST /v1/contacts                   identify / upsert      herald.upsert_contact
//!   POST /v1/contacts/batch             many contacts          herald.upsert_contacts
//!   POST /v1/send                       a transactional email  herald.send
//!   POST /v1/lists/{list}/subscribe     join a list            herald.subscribe
//!   POST /v1/lists/{list}/unsubscribe   leave a list           herald.unsubscribe
//!   GET  /v1/results                    what herald did        herald.read_results (a `results` key)
//!   GET  /v1/results/subscriptions      result webhooks        result_subscription_overview
//!   POST /v1/results/subscriptions      add one                herald.subscribe_results
//!   DELETE /v1/results/subscriptions/{id}  end one             herald.unsubscribe_results
//!   POST /v1/results/subscriptions/{id}/retry  unblock one     herald.redrive / retry_failed
//!   GET  /v1/suppressions/{email}       suppressed? why?       read_suppression (a `suppressions` key)
//!   POST /v1/suppressions               suppress an address    herald.suppress
//!   DELETE /v1/suppressions/{email}     lift a suppression     herald.unsuppress
//!   GET  /v1/openapi.json               this API in OpenAPI 3.1
//!
//! Each request is ONE statement, `herald.api_call(secret, operation, args, idempotency_key)`
//! (sql/api.sql): the key is checked there (stored as a SHA-256 only; revocation counts at once), the
//! workspace is the key's (never the body's), the idempotency key is claimed in the same transaction
//! as the write, and the SQL function runs with the same checks and messages as from SQL. The daemon
//! checks only the request's form: the key's syntax (`auth`), the Idempotency-Key header
//! (`idempotency`), the body's JSON, depth, fields and batch size (`routes`), and each key's rate
//! (`key_rate`, 429 with Retry-After). Errors are JSON
//! (`error`): the SQL error's message, hint and detail, with its SQLSTATE as the code.

mod auth;
mod error;
mod idempotency;
mod key_rate;
mod openapi;
mod results;
mod routes;

use std::sync::Arc;

use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderName, Method};
use axum::routing::{delete, get, post};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::run::database::Database;

pub use auth::well_formed as is_api_key;
pub use key_rate::{retry_after_seconds, KeyRates};
pub use routes::ROUTES;

/// What the API's handlers share.
#[derive(Clone)]
struct ApiState {
    database: Arc<Database>,
    /// HERALD_API_RATE_PER_KEY; None: no limit.
    rates: Option<Arc<key_rate::KeyRates>>,
}

/// The `/v1/…` routes, for any outer router's state (they carry their own). `rates`: the keys'
/// rates through this daemon (HERALD_API_RATE_PER_KEY; None: no limit), shared with `/stream`.
pub fn router<S: Clone + Send + Sync + 'static>(
    database: Arc<Database>,
    rates: Option<Arc<KeyRates>>,
) -> Router<S> {
    // OPTIONS is a route of its own on each path (answered by the CORS layer), so that the outer
    // router's method-not-allowed fallback never sees a preflight
    let mut router =
        Router::new().route("/v1/openapi.json", get(openapi::serve).options(preflight));
    router = router.route(
        "/v1/results",
        get(|state, query, headers| results::handle(results::Read::Results, state, query, headers))
            .options(preflight),
    );
    router = router.route(
        "/v1/results/subscriptions",
        get(|state, query, headers| {
            results::handle(results::Read::Subscriptions, state, query, headers)
        }),
    );
    router = router.route(
        "/v1/suppressions/{email}",
        get(|state, path, query, headers| {
            results::handle_path(results::Read::Suppression, state, path, query, headers)
        }),
    );
    for route in ROUTES {
        let operation = route.operation;
        let handler =
            move |state, path, headers, body| routes::handle(operation, state, path, headers, body);
        let method_router = match route.method {
            routes::Method::Post => post(handler),
            routes::Method::Delete => delete(handler),
        };
        // a path may have a read too (GET /v1/results/subscriptions): merge, not replace
        router = router.route(route.path, method_router.options(preflight));
    }
    router
        .route("/v1/{*rest}", axum::routing::any(routes::unknown))
        .layer(cors())
        .with_state(ApiState { database, rates })
}

/// An OPTIONS request that is not a CORS preflight (those the layer answers itself).
async fn preflight() -> axum::http::StatusCode {
    axum::http::StatusCode::NO_CONTENT
}

/// Browsers may call the API from any origin (a signup form on the marketing site, a web app): a
/// key is a bearer token sent in a header, never a cookie, so allowing every origin lends a page no
/// credential it does not already hold. Preflights are answered here; no credentials mode.
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::any())
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            AUTHORIZATION,
            CONTENT_TYPE,
            HeaderName::from_static(idempotency::HEADER),
        ])
        .expose_headers([HeaderName::from_static(idempotency::REPLAYED)])
        .max_age(std::time::Duration::from_secs(3600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{to_bytes, Body};
    use axum::http::{Request, StatusCode};
    use serde_json::Value as Json;
    use tower::ServiceExt as _;

    async fn call(request: Request<Body>) -> (StatusCode, Json) {
        let app: Router = router(Database::unreachable(), None);
        let response = app.oneshot(request).await.expect("infallible");
        let status = response.status();
        let body = to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("a body");
        (status, serde_json::from_slice(&body).unwrap_or(Json::Null))
    }

    fn post(path: &str, headers: &[(&str, &str)], body: &str) -> Request<Body> {
        let mut request = Request::post(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request
            .body(Body::from(body.to_string()))
            .expect("a request")
    }

    const KEY: &str = "hk_1_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[tokio::test]
    async fn the_form_of_a_request_is_checked_before_the_database() {
        let auth = format!("Bearer {KEY}");
        let auth = ("authorization", auth.as_str());
        let (status, body) = call(post("/v1/track", &[], "{}")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["code"], "unauthorized");
        let (status, _) = call(post("/v1/track", &[("authorization", "Bearer nope")], "{}")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);

        let (status, body) = call(post("/v1/track", &[auth], "not json")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("the body is not JSON"),
            "{body}"
        );
        let (status, body) = call(post(
            "/v1/track",
            &[auth],
            r#"{"workspace": "other", "email": "a@x.example", "kind": "k"}"#,
        ))
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            body["error"]["message"],
            "unknown field \"workspace\" in the body; allowed: email, kind, payload"
        );
        assert_eq!(
            body["error"]["hint"],
            "The workspace is the API key's; a key acts for its workspace only."
        );
        let deep = format!("{{\"events\": {}1{}}}", "[".repeat(60), "]".repeat(60));
        let (status, body) = call(post("/v1/track/batch", &[auth], &deep)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let many = format!(
            "{{\"events\": [{}]}}",
            vec!["{}"; routes::MAX_BATCH + 1].join(",")
        );
        let (status, body) = call(post("/v1/track/batch", &[auth], &many)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        assert_eq!(
            body["error"]["message"],
            format!(
                "at most {} events per request, got {}",
                routes::MAX_BATCH,
                routes::MAX_BATCH + 1
            )
        );
        let (status, body) = call(post(
            "/v1/track",
            &[auth, ("idempotency-key", "")],
            r#"{"email": "a@x.example", "kind": "k"}"#,
        ))
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        // a well-formed request reaches for the database, which is away here
        let (status, body) = call(post(
            "/v1/track",
            &[auth],
            r#"{"email": "a@x.example", "kind": "k"}"#,
        ))
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "unavailable");

        let (status, body) = call(post("/v1/nothing", &[auth], "{}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/nothing"));
        let request = Request::get("/v1/track")
            .body(Body::empty())
            .expect("a request");
        let (status, _) = call(request).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn browsers_may_call_it_from_any_origin() {
        let app: Router = router(Database::unreachable(), None);
        let preflight = Request::builder()
            .method("OPTIONS")
            .uri("/v1/track")
            .header("origin", "https://shop.example")
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, idempotency-key",
            )
            .body(Body::empty())
            .expect("a request");
        let response = app.clone().oneshot(preflight).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::OK);
        let header = |r: &axum::response::Response, name: &str| {
            r.headers()
                .get(name)
                .map(|v| v.to_str().unwrap_or_default().to_string())
        };
        assert_eq!(
            header(&response, "access-control-allow-origin").as_deref(),
            Some("*")
        );
        let allowed = header(&response, "access-control-allow-headers").unwrap_or_default();
        assert!(allowed.contains("idempotency-key"), "{allowed}");
        let request = post(
            "/v1/track",
            &[("origin", "https://shop.example")],
            r#"{"email": "a@x.example", "kind": "k"}"#,
        );
        let response = app.oneshot(request).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            header(&response, "access-control-allow-origin").as_deref(),
            Some("*"),
            "errors are readable by the page too"
        );
    }

    /// Every route the router serves is in the OpenAPI document, and everything the document
    /// describes is served (a documented path that answered 404 would be a lie).
    #[tokio::test]
    async fn the_openapi_document_describes_every_route() {
        let (status, doc) = call(
            Request::get("/v1/openapi.json")
                .body(Body::empty())
                .expect("a request"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().expect("paths");
        for route in ROUTES {
            let path = route.path;
            let method = route.method.openapi();
            let described = &paths
                .get(path)
                .unwrap_or_else(|| panic!("{path} is not described"))[method];
            assert!(described.is_object(), "{method} {path} is not described");
            let schema = &described["requestBody"]["content"]["application/json"]["schema"];
            let mut properties: Vec<&str> = schema["properties"]
                .as_object()
                .expect("properties")
                .keys()
                .map(String::as_str)
                .collect();
            properties.sort_unstable();
            let mut fields = route.operation.fields().to_vec();
            fields.sort_unstable();
            assert_eq!(properties, fields, "{path}: the body's fields");
        }
        assert!(paths["/v1/openapi.json"]["get"].is_object());
        let read = &paths["/v1/results"]["get"];
        let mut parameters: Vec<&str> = read["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        parameters.sort_unstable();
        assert_eq!(parameters, ["after", "kinds", "limit"]);
        assert!(paths["/v1/results/subscriptions"]["get"].is_object());
        let operations: usize = paths
            .values()
            .map(|item| item.as_object().expect("methods").len())
            .sum();
        assert!(paths["/v1/suppressions/{email}"]["get"].is_object());
        assert_eq!(
            operations,
            ROUTES.len() + 4,
            "the writes and four reads (openapi, results, subscriptions, a suppression), nothing unserved"
        );
        for (path, item) in paths {
            for method in item.as_object().expect("methods").keys() {
                let concrete = path
                    .replace("{list}", "news")
                    .replace("{id}", "1")
                    .replace("{email}", "ann%40example.com");
                let request = Request::builder()
                    .method(method.to_uppercase().as_str())
                    .uri(&concrete)
                    .body(Body::from("{}"))
                    .expect("a request");
                let (status, _) = call(request).await;
                assert_ne!(
                    status,
                    StatusCode::NOT_FOUND,
                    "{method} {path} is not served"
                );
                assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            }
        }
    }
}

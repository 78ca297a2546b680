//! The HTTP side of `herald run` (HERALD_HTTP_ADDR): what recipients and providers send back.
//!
//!   GET  /u/<token>        unsubscribe confirmation page (changes nothing; its button POSTs)
//!   POST /u/<token>        RFC 8058 one-click unsubscribe: suppress the address, event list.unsubscribed
//!   GET  /o/<token>        open pixel (a 1×1 GIF, always): event email.opened
//!   GET  /c/<token>        click: event email.clicked, then 302 to the URL signed into the token only
//!   POST /events/generic   provider reports in herald's JSON format (bounces, complaints, unsubscribes)
//!   POST /events/sendgrid  the same from SendGrid's event webhook (an array of events)
//!   /v1/…                  the HTTP API for applications, with per-workspace API keys (`api/`)
//!
//! An axum router (`router`; routes in `links` and `events`, SendGrid's signature in the leaf
//! `run/sendgrid`). [`serve`] runs it — and the metrics router on HERALD_METRICS_ADDR — on hyper's
//! HTTP/1.1 (keep-alive and chunked bodies are hyper's) with the same limits for both: tower layers
//! for bodies ≤ 1 MiB (413), 30 s a request (408) and `Cache-Control: no-store` on every answer; at
//! most [`MAX_CONNECTIONS`] connections, 32 per client address by default
//! (HERALD_HTTP_CONNECTIONS_PER_ADDRESS), a request head within [`HEAD_TIMEOUT`] (slowloris); a
//! graceful stop on shutdown. Every request records its facts with ONE `herald.record_feedback` call
//! on a pooled connection (`record`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;

use super::config::HttpSide;
use super::database::Database;
use per_address::PerAddress;
use record::Recorder;

/// Whether a bearer token has an API key's form (GET /stream takes API keys too).
pub use api::{is_api_key, retry_after_seconds, KeyRates};

mod api;
mod events;
mod links;
mod one_click;
mod per_address;
mod record;

/// The largest request body taken (a provider batching more events gets 413 and sends fewer).
const MAX_BODY: usize = 1024 * 1024;
/// The largest request head (request line and headers); larger ones get 431.
const MAX_HEAD: usize = 16 * 1024;
/// Connections served at once (each holds at most one request, its body and one query in flight);
/// more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 512;
/// How long a request head may take to arrive, also the idle time allowed between requests on a
/// kept-alive connection (slowloris: idle or trickling connections are closed).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may take once its head is in, body and recording included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// At shutdown, how long requests in progress may take to finish before their connections close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// What the handlers share.
#[derive(Clone)]
struct App {
    side: Arc<HttpSide>,
    recorder: Arc<Recorder>,
}

/// The public routes (their limits are added by [`serve`], for whatever it serves). `rates`: the
/// API keys' rates (HERALD_API_RATE_PER_KEY), shared with `/stream` where a key opens a stream.
pub fn router(side: HttpSide, database: Arc<Database>, rates: Option<Arc<KeyRates>>) -> Router {
    let app = App {
        side: Arc::new(side),
        recorder: Arc::new(Recorder::new(Arc::clone(&database))),
    };
    Router::new()
        // the HTTP API for applications (/v1/…, per-workspace API keys)
        .merge(api::router(Arc::clone(&database), rates))
        .route("/u/{token}", get(links::confirm).post(links::unsubscribe))
        .route("/o/{token}", get(links::open))
        .route("/c/{token}", get(links::click))
        .route("/events/{format}", post(events::receive))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

/// The limits every served route gets, as tower layers. Innermost first: the size limit on bodies
/// (at once by Content-Length, else while a chunked body is read), then the time limit, then what
/// every answer carries.
fn with_limits(router: Router) -> Router {
    router
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(RequestBodyLimitLayer::new(MAX_BODY))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(axum::middleware::map_response(explain_limits))
        // a route may say otherwise (static files); links and events must never be cached
        .layer(SetResponseHeaderLayer::if_not_present(
            CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

async fn method_not_allowed() -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n").into_response()
}

/// The limit layers answer with bare statuses; these say which limit, and what to do. An answer that
/// is JSON already (the API's own errors) says it.
async fn explain_limits(response: Response) -> Response {
    if response
        .headers()
        .get(CONTENT_TYPE)
        .map(HeaderValue::as_bytes)
        == Some(b"application/json")
    {
        return response;
    }
    match response.status() {
        StatusCode::PAYLOAD_TOO_LARGE => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "the body is over 1 MiB; send fewer events per request\n",
        )
            .into_response(),
        StatusCode::REQUEST_TIMEOUT => (
            StatusCode::REQUEST_TIMEOUT,
            "the request took over 30 s; please try again\n",
        )
            .into_response(),
        _ => response,
    }
}

/// Serves `router` on `listener` until `shutdown`: HTTP/1.1 by hyper, with the limits of this module
/// (connections, request heads, and [`with_limits`]). On shutdown it stops accepting, lets requests
/// in progress finish (for [`SHUTDOWN_GRACE`] at most) and closes idle connections.
/// `per_address`: connections one client address may hold (0: no limit):
/// HERALD_HTTP_CONNECTIONS_PER_ADDRESS for the HTTP side, the default for /metrics.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    per_address: usize,
) {
    let router = with_limits(router);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_header_size(MAX_HEAD)
        // `Location:`, not `location:`, as before: some clients and scripts match it so
        .title_case_headers(true);
    let graceful = GracefulShutdown::new();
    // bounded: a flood of (slow) connections waits in the listen backlog instead of growing tasks
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_address = Arc::new(PerAddress::new(per_address));
    // dropped at the end, which aborts connections that outlived the grace period
    let mut connections = JoinSet::new();
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // e.g. out of file descriptors: waiting lets connections close
                    tracing::warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(counted) = per_address.take(peer.ip()) else {
            tracing::debug!(client = %peer.ip(), "http: too many connections from one address; closed");
            continue; // dropping the stream closes it
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "http: TCP_NODELAY not set");
        }
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        connections.spawn(async move {
            let _held = (slot, counted);
            if let Err(e) = connection.await {
                // a client that went away, a head that did not arrive in time, a malformed request
                tracing::debug!(client = %peer.ip(), error = %e, "http: connection ended");
            }
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!(
            open = connections.len(),
            "http: closing connections still busy at shutdown"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::config::{KeyPair, Keys, Secret, Secrets};
    use crate::run::links::{sign, Claims, Purpose};
    use axum::body::{to_bytes, Body};
    use axum::http::Request;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt as _;

    const LINK_KEY: &str = "a-link-key-for-unit-tests";
    const EVENTS_TOKEN: &str = "an-events-token";

    /// A database nobody listens at: every attempt to record fails at once (connection refused).
    fn away() -> Arc<Database> {
        Database::unreachable()
    }

    /// The public routes, as `serve` is given them.
    fn public() -> Router {
        let key = |k: &str| KeyPair {
            current: Some(Secret(k.into())),
            previous: None,
        };
        let keys = Keys {
            default: Secrets {
                link: key(LINK_KEY),
                events: key(EVENTS_TOKEN),
                ..Secrets::default()
            },
            workspaces: Default::default(),
        };
        let side = HttpSide {
            addr: "127.0.0.1:0".parse().expect("an address"),
            public_url: "http://mail.test".into(),
            keys: Arc::new(keys),
            sendgrid_key: None,
            sendgrid_workspace_keys: Default::default(),
            api_rate_per_key: 0,
            connections_per_address: crate::run::config::CONNECTIONS_PER_ADDRESS,
        };
        router(side, away(), None)
    }

    /// The public routes with their limits, as `serve` serves them.
    fn app() -> Router {
        with_limits(public())
    }

    fn token(purpose: Purpose, url: Option<&str>) -> String {
        sign(
            LINK_KEY.as_bytes(),
            &Claims {
                purpose,
                workspace: "acme".into(),
                email: "ann@x.example".into(),
                key: "k1".into(),
                job: None,
                broadcast: None,
                variation: None,
                url: url.map(str::to_string),
            },
        )
    }

    /// (status, Cache-Control, body) of one request through the router.
    async fn call(request: Request<Body>) -> (StatusCode, Option<String>, String) {
        let response = app().oneshot(request).await.expect("infallible");
        let status = response.status();
        let cache = response
            .headers()
            .get(CACHE_CONTROL)
            .map(|v| v.to_str().unwrap_or_default().to_string());
        let body = to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("a body");
        (status, cache, String::from_utf8_lossy(&body).into_owned())
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(path).body(Body::empty()).expect("a request")
    }

    fn post(path: &str, headers: &[(&str, &str)], body: impl Into<Body>) -> Request<Body> {
        let mut request = Request::post(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(body.into()).expect("a request")
    }

    #[tokio::test]
    async fn links_are_checked_before_anything_is_recorded() {
        let (status, cache, body) = call(get("/o/forged.token")).await;
        assert_eq!(
            (status, cache.as_deref()),
            (StatusCode::OK, Some("no-store"))
        );
        assert!(body.starts_with("GIF89a"), "the pixel whatever the token");

        let (status, _, body) =
            call(get(&format!("/u/{}", token(Purpose::Unsubscribe, None)))).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("Stop emails to ann@x.example?"), "{body}");
        let (status, _, body) = call(get(&format!("/u/{}", token(Purpose::Open, None)))).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::BAD_REQUEST, "link is not for this\n")
        );

        let unsubscribe = format!("/u/{}", token(Purpose::Unsubscribe, None));
        let (status, _, body) = call(post(&unsubscribe, &[], "List-Unsubscribe=Maybe")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("List-Unsubscribe=One-Click"), "{body}");
        // the right body, and the database away: 503, try again
        let (status, _, body) = call(post(&unsubscribe, &[], "List-Unsubscribe=One-Click")).await;
        assert_eq!(
            (status, body.as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "could not record it now; please try again\n"
            )
        );

        // a click goes where its token says even when it cannot be recorded
        let click = format!(
            "/c/{}",
            token(Purpose::Click, Some("https://shop.test/a b"))
        );
        let response = app().oneshot(get(&click)).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::FOUND);
        assert_eq!(
            response
                .headers()
                .get("location")
                .map(HeaderValue::as_bytes),
            Some(&b"https://shop.test/a%20b"[..])
        );
        let click = format!("/c/{}", token(Purpose::Click, Some("javascript:alert(1)")));
        assert_eq!(call(get(&click)).await.0, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn refusals_name_their_reason() {
        assert_eq!(
            call(get("/nothing")).await,
            (
                StatusCode::NOT_FOUND,
                Some("no-store".into()),
                "not found\n".into()
            )
        );
        let (status, _, body) = call(post("/o/x", &[], "")).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        );
        let (status, _, _) = call(post("/events/generic", &[], "{}")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);

        let auth = format!("Bearer {EVENTS_TOKEN}");
        let auth = [("authorization", auth.as_str())];
        let (status, _, body) = call(post("/events/generic", &auth, "not json")).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::BAD_REQUEST, "the body is not JSON\n")
        );
        let (status, _, body) = call(post("/events/other", &auth, "{}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        let events =
            r#"{"events": [{"type": "bounce", "email": "a@x.example", "workspace": "acme"}]}"#;
        let (status, _, _) = call(post("/events/generic", &auth, events)).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "the database is away"
        );
    }

    #[tokio::test]
    async fn bodies_over_1_mib_are_refused_with_413() {
        let auth = format!("Bearer {EVENTS_TOKEN}");
        let big = vec![b' '; MAX_BODY + 1];
        // announced by Content-Length: refused before it is read
        let length = big.len().to_string();
        let request = post(
            "/events/generic",
            &[
                ("authorization", auth.as_str()),
                ("content-length", length.as_str()),
            ],
            big.clone(),
        );
        let (status, cache, body) = call(request).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(cache.as_deref(), Some("no-store"));
        assert_eq!(
            body,
            "the body is over 1 MiB; send fewer events per request\n"
        );
        // streamed without a length (as a chunked body arrives): refused once it grows too large
        let chunks = big
            .chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(axum::body::Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>();
        let stream = Body::from_stream(futures_util::stream::iter(chunks));
        let (status, _, body) = call(post(
            "/events/generic",
            &[("authorization", auth.as_str())],
            stream,
        ))
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            body,
            "the body is over 1 MiB; send fewer events per request\n"
        );
    }

    /// hyper reads a chunked body (the hand-written server refused them with 411), keeps the
    /// connection alive, and the serving loop stops when told.
    #[tokio::test]
    async fn serve_reads_chunked_bodies_and_stops_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("bound");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            public(),
            shutdown.clone(),
            crate::run::config::CONNECTIONS_PER_ADDRESS,
        ));

        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connects");
        let request = format!(
            "POST /events/generic HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {EVENTS_TOKEN}\r\n\
             Transfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"
        );
        s.write_all(request.as_bytes()).await.expect("sent");
        let mut buf = vec![0; 4096];
        let n = s.read(&mut buf).await.expect("an answer");
        let reply = String::from_utf8_lossy(&buf[..n]);
        // `{}` arrived: it is JSON, only without events
        assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
        assert!(reply.ends_with("expected {\"events\": [...]}\n"), "{reply}");

        // the same connection serves the next request
        s.write_all(b"GET /o/x HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("sent");
        let n = s.read(&mut buf).await.expect("an answer");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 "));

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("stops within the grace period")
            .expect("no panic");
        assert_eq!(
            s.read(&mut buf).await.ok(),
            Some(0),
            "idle connections are closed"
        );
    }

    /// A connection over the per-address limit is closed unread; with the limit lifted (0, behind a
    /// proxy) it is served.
    #[tokio::test]
    async fn connections_over_the_per_address_limit_are_closed_unless_lifted() {
        for (limit, third_served) in [(2, false), (0, true)] {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
            let addr = listener.local_addr().expect("bound");
            let shutdown = CancellationToken::new();
            let server = tokio::spawn(serve(listener, public(), shutdown.clone(), limit));
            let mut held = Vec::new();
            for _ in 0..2 {
                held.push(
                    tokio::net::TcpStream::connect(addr)
                        .await
                        .expect("connects"),
                );
            }
            let mut third = tokio::net::TcpStream::connect(addr)
                .await
                .expect("connects");
            let mut buf = vec![0; 4096];
            let answer = async {
                third
                    .write_all(b"GET /o/x HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await?;
                third.read(&mut buf).await
            };
            let answered = match tokio::time::timeout(Duration::from_secs(5), answer)
                .await
                .expect("an answer or a close within 5 s")
            {
                Ok(n) => buf[..n].starts_with(b"HTTP/1.1 200 "),
                Err(_) => false, // reset
            };
            assert_eq!(answered, third_served, "limit {limit}");
            shutdown.cancel();
            drop(held);
            server.await.expect("no panic");
        }
    }
}

//! The HTTP side of `herald run` (HERALD_HTTP_ADDR): what recipients and providers send back.
//!
//!   GET  /u/<token>        unsubscribe confirmation page (changes nothing; its button POSTs)
//!   POST /u/<token>        RFC 8058 one-click unsubscribe: suppress the address, event list.unsubscribed
//!   GET  /o/<token>        open pixel (a 1×1 GIF, always): event email.opened
//!   GET  /c/<token>        click: event email.clicked, then 302 to the URL signed into the token only
//!   POST /events/generic   provider reports in herald's JSON format (bounces, complaints, unsubscribes)
//!   POST /events/sendgrid  the same from SendGrid's event webhook (an array of events)
//!
//! Tokens are signed (`links.rs`): a forged or altered one is refused and records nothing. The
//! provider endpoints need `Authorization: Bearer <HERALD_EVENTS_TOKEN>` (or Basic with the token as
//! password); with HERALD_SENDGRID_VERIFICATION_KEY, /events/sendgrid instead needs SendGrid's ECDSA
//! signature over a fresh timestamp and the body (`verify_sendgrid`). Every request records its facts
//! with ONE `herald.record_feedback` call. A tiny HTTP/1.1 server, one request per connection.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use p256::ecdsa::signature::MultipartVerifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;

use serde_json::{json, Value as Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::config::{HttpSide, TokenScope};
use super::db_health::DbHealth;
use super::links::{self, message_id, Claims, Purpose};
use super::pg::{self, Backoff};

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;
/// Connections handled at once (each holds at most MAX_HEAD + MAX_BODY and one query in flight).
const MAX_CONNECTIONS: usize = 512;
/// Connections one client address may hold at once; more are closed at once, unread. (A client
/// that holds connections open without sending anything must not use up `MAX_CONNECTIONS`.)
pub const MAX_PER_ADDRESS: usize = 32;
/// How long a request head may take to arrive (slowloris: idle or trickling connections are closed).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a whole request may take, body and recording included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Open connections per client address.
#[derive(Default)]
struct PerAddress {
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One connection counted against its address until dropped.
struct AddressSlot {
    table: Arc<PerAddress>,
    ip: std::net::IpAddr,
}

impl PerAddress {
    /// A slot for one more connection from `ip`, or None when it holds `MAX_PER_ADDRESS` already.
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<AddressSlot> {
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= MAX_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}
/// A transparent 1×1 GIF.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// One shared connection (tokio-postgres pipelines concurrent queries on it), reconnected on loss.
/// Requests drive reconnecting, so after a failed attempt the next ones answer 503 at once until a
/// back-off step has passed (or another component found the database back): while it is away, a
/// burst of requests does not become a burst of connection attempts, each waiting for the timeout.
struct Db {
    health: Arc<DbHealth>,
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    client: Option<Arc<Client>>,
    backoff: Backoff,
    retry_at: Option<Instant>,
}

enum RecordError {
    /// The database is away; no attempt was made.
    Unavailable,
    Failed(tokio_postgres::Error),
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable => f.write_str("waiting for the database"),
            Self::Failed(e) => f.write_str(&pg::describe(e)),
        }
    }
}

impl RecordError {
    /// An outage is `DbHealth`'s to report, not once per request.
    fn log(&self, what: &str) {
        match self {
            Self::Failed(e) if !pg::is_connection_error(e) => {
                tracing::warn!(error = %self, "http: {what} failed")
            }
            _ => tracing::debug!(error = %self, "http: {what} failed"),
        }
    }
}

impl Db {
    /// The shared connection, and whether it was opened just now.
    async fn client(&self) -> Result<(Arc<Client>, bool), RecordError> {
        let mut slot = self.slot.lock().await;
        if let Some(c) = slot.client.as_ref().filter(|c| !c.is_closed()) {
            return Ok((Arc::clone(c), false));
        }
        if slot
            .retry_at
            .is_some_and(|at| Instant::now() < at && !self.health.is_up())
        {
            return Err(RecordError::Unavailable);
        }
        match self.health.connect("http").await {
            Ok(c) => {
                let c = Arc::new(c);
                slot.client = Some(Arc::clone(&c));
                slot.backoff.reset();
                slot.retry_at = None;
                Ok((c, true))
            }
            Err(e) => {
                slot.client = None;
                slot.retry_at = Some(Instant::now() + slot.backoff.step());
                Err(RecordError::Failed(e))
            }
        }
    }

    /// One `record_feedback` call; `only_workspace`: the workspace whose credentials came with it
    /// (a link key, a workspace's events token): entries are resolved there only.
    async fn record(
        &self,
        feedback: Json,
        only_workspace: Option<&str>,
    ) -> Result<i32, RecordError> {
        loop {
            let (client, fresh) = self.client().await?;
            match client
                .query_one(
                    "SELECT herald.record_feedback($1::jsonb, $2::text)",
                    &[&feedback, &only_workspace],
                )
                .await
            {
                Ok(row) => {
                    self.health.ok();
                    return row.try_get(0).map_err(RecordError::Failed);
                }
                // a connection that died while idle (the server restarted): once more on a new one
                Err(e) if !fresh && pg::is_connection_error(&e) => {
                    let mut slot = self.slot.lock().await;
                    if slot
                        .client
                        .as_ref()
                        .is_some_and(|c| Arc::ptr_eq(c, &client))
                    {
                        slot.client = None;
                    }
                }
                Err(e) => return Err(RecordError::Failed(e)),
            }
        }
    }
}

struct Request {
    method: String,
    path: String,
    query: String,
    /// Header names lower-cased, in the order received.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    /// The first header of that (lower-case) name.
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Response {
    status: &'static str,
    content_type: &'static str,
    location: Option<String>,
    body: Vec<u8>,
}

impl Response {
    fn text(status: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            location: None,
            body: body.into().into_bytes(),
        }
    }
    fn html(status: &'static str, body: String) -> Self {
        Self {
            status,
            content_type: "text/html; charset=utf-8",
            location: None,
            body: body.into_bytes(),
        }
    }
    fn json(status: &'static str, body: Json) -> Self {
        Self {
            status,
            content_type: "application/json",
            location: None,
            body: body.to_string().into_bytes(),
        }
    }
}

pub async fn serve(
    listener: TcpListener,
    side: HttpSide,
    health: Arc<DbHealth>,
    shutdown: CancellationToken,
) {
    let side = Arc::new(side);
    let db = Arc::new(Db {
        health,
        slot: Mutex::new(Slot::default()),
    });
    // bounded: a flood of (slow) connections waits in the listen backlog instead of growing tasks
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_address = Arc::new(PerAddress::default());
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match per_address.take(peer.ip()) {
                    Some(counted) => (stream, counted),
                    None => {
                        tracing::debug!(client = %peer.ip(), "http: too many connections from one address; closed");
                        continue; // dropping the stream closes it; the slot is taken again
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (stream, counted) = stream;
        let (side, db) = (Arc::clone(&side), Arc::clone(&db));
        tokio::spawn(async move {
            let _slot = slot;
            let _counted = counted;
            if tokio::time::timeout(REQUEST_TIMEOUT, handle(stream, &side, &db))
                .await
                .is_err()
            {
                tracing::debug!("http: request timed out");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, side: &HttpSide, db: &Db) {
    let response = match read_request(&mut stream).await {
        Ok(req) => route(&req, side, db).await,
        Err((status, why)) => Response::text(status, format!("{why}\n")),
    };
    let mut head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    if let Some(location) = &response.location {
        // every header built from data is checked: a CR/LF would start a header of its own
        if links::is_header_safe(location) {
            head.push_str(&format!("Location: {location}\r\n"));
        } else {
            tracing::warn!("http: refused a Location with control characters");
            let body = b"refused: the redirect target holds control characters\n";
            let head = format!(
                "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body).await;
            let _ = stream.shutdown().await;
            return;
        }
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&response.body).await;
    let _ = stream.shutdown().await;
}

/// `Err((status, why))` for requests this small server does not take.
async fn read_request(stream: &mut TcpStream) -> Result<Request, (&'static str, &'static str)> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let head_by = Instant::now() + HEAD_TIMEOUT;
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err((
                "431 Request Header Fields Too Large",
                "the request head is over 16 KiB",
            ));
        }
        match tokio::time::timeout_at(head_by, stream.read(&mut chunk)).await {
            Err(_) => {
                return Err((
                    "408 Request Timeout",
                    "the request head did not arrive within 10 s",
                ))
            }
            Ok(Ok(0) | Err(_)) => return Err(("400 Bad Request", "incomplete request head")),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut length = 0usize;
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => {
                length = value
                    .parse()
                    .map_err(|_| ("400 Bad Request", "Content-Length is not a number"))?
            }
            // a chunked body would otherwise read as empty and be refused as "not JSON"
            "transfer-encoding" if !value.eq_ignore_ascii_case("identity") => {
                return Err((
                    "411 Length Required",
                    "chunked bodies are not accepted; send the body with Content-Length",
                ))
            }
            _ => {}
        }
        headers.push((name, value.to_string()));
    }
    if length > MAX_BODY {
        return Err((
            "413 Payload Too Large",
            "the body is over 1 MiB; send fewer events per request",
        ));
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                return Err(("400 Bad Request", "body shorter than its Content-Length"))
            }
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(length);
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        headers,
        body,
    })
}

/// A link token verified with its workspace's link keys (current, then previous during a rotation).
fn verify_link(side: &HttpSide, token: &str, purpose: Purpose) -> Result<Claims, links::Refused> {
    let workspace = links::claimed_workspace(token).ok_or(links::Refused::Malformed)?;
    links::verify_any(side.keys.link(&workspace).verifying(), token, purpose)
}

async fn route(req: &Request, side: &HttpSide, db: &Db) -> Response {
    let mut parts = req.path.trim_start_matches('/').splitn(2, '/');
    let (head, rest) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (req.method.as_str(), head) {
        ("GET", "u") => match verify_link(side, rest, Purpose::Unsubscribe) {
            Ok(c) => Response::html("200 OK", confirm_page(&c)),
            Err(e) => Response::text("400 Bad Request", format!("{e}\n")),
        },
        ("POST", "u") => match verify_link(side, rest, Purpose::Unsubscribe) {
            Ok(_) if !is_one_click(req.header("content-type"), &req.body) => Response::text(
                "400 Bad Request",
                "a one-click unsubscribe carries List-Unsubscribe=One-Click in a form-urlencoded or multipart/form-data body (RFC 8058)\n",
            ),
            Ok(c) => match db.record(json!([feedback("unsubscribed", &c)]), Some(&c.workspace)).await {
                Ok(_) => Response::html(
                    "200 OK",
                    page(
                        "Unsubscribed",
                        &format!("{} will not receive these emails again.", escape(&c.email)),
                    ),
                ),
                Err(e) => server_error("unsubscribe", &e),
            },
            Err(e) => Response::text("400 Bad Request", format!("{e}\n")),
        },
        ("GET", "o") => {
            // a mail client shows whatever it gets; only a valid token records anything
            if let Ok(c) = verify_link(side, rest, Purpose::Open) {
                if let Err(e) = db.record(json!([feedback("opened", &c)]), Some(&c.workspace)).await {
                    e.log("recording an open");
                }
            }
            Response {
                status: "200 OK",
                content_type: "image/gif",
                location: None,
                body: PIXEL.to_vec(),
            }
        }
        ("GET", "c") => match verify_link(side, rest, Purpose::Click) {
            Ok(c) => {
                // normalised again: a link signed before targets were normalised may hold anything
                let Some(url) = c.url.as_deref().and_then(links::normalise_url) else {
                    return Response::text(
                        "400 Bad Request",
                        "this link's target is not an http(s) URL herald can redirect to\n",
                    );
                };
                if let Err(e) = db.record(json!([feedback("clicked", &c)]), Some(&c.workspace)).await {
                    // the reader still gets where they wanted to go
                    e.log("recording a click");
                }
                Response {
                    status: "302 Found",
                    content_type: "text/plain; charset=utf-8",
                    location: Some(url),
                    body: Vec::new(),
                }
            }
            Err(e) => Response::text("400 Bad Request", format!("{e}\n")),
        },
        ("POST", "events") => provider_events(req, rest, side, db).await,
        (_, "u" | "o" | "c" | "events") => {
            Response::text("405 Method Not Allowed", "method not allowed\n")
        }
        _ => Response::text("404 Not Found", "not found\n"),
    }
}

/// RFC 8058: a one-click unsubscribe POST carries the field `List-Unsubscribe=One-Click`, as
/// multipart/form-data or application/x-www-form-urlencoded (also assumed without a Content-Type).
/// Anything else (an empty POST from a link scanner, another media type) unsubscribes nobody.
pub fn is_one_click(content_type: Option<&str>, body: &[u8]) -> bool {
    let content_type = content_type.unwrap_or("application/x-www-form-urlencoded");
    let mut params = content_type.split(';');
    let media = params.next().unwrap_or("").trim().to_ascii_lowercase();
    match media.as_str() {
        "application/x-www-form-urlencoded" => url::form_urlencoded::parse(body)
            .any(|(k, v)| k == ONE_CLICK_FIELD && v.trim_end() == ONE_CLICK_VALUE),
        "multipart/form-data" => params
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
            .map(|(_, b)| b.trim().trim_matches('"'))
            .is_some_and(|boundary| multipart_one_click(body, boundary)),
        _ => false,
    }
}

const ONE_CLICK_FIELD: &str = "List-Unsubscribe";
const ONE_CLICK_VALUE: &str = "One-Click";

/// Whether a multipart/form-data body has a part named `List-Unsubscribe` whose value is `One-Click`
/// (RFC 7578: parts are separated by `--boundary`, each is headers, a blank line, the value).
fn multipart_one_click(body: &[u8], boundary: &str) -> bool {
    if boundary.is_empty() {
        return false;
    }
    let text = String::from_utf8_lossy(body);
    let delimiter = format!("--{boundary}");
    text.split(delimiter.as_str()).skip(1).any(|part| {
        let part = part
            .strip_prefix("\r\n")
            .or_else(|| part.strip_prefix('\n'));
        let Some((head, value)) =
            part.and_then(|p| p.split_once("\r\n\r\n").or_else(|| p.split_once("\n\n")))
        else {
            return false;
        };
        let named = head.lines().any(|line| {
            let Some((name, rest)) = line.split_once(':') else {
                return false;
            };
            name.trim().eq_ignore_ascii_case("content-disposition")
                && rest.split(';').skip(1).any(|p| {
                    p.split_once('=').is_some_and(|(k, v)| {
                        k.trim().eq_ignore_ascii_case("name")
                            && v.trim().trim_matches('"') == ONE_CLICK_FIELD
                    })
                })
        });
        // the CRLF before the next delimiter belongs to the delimiter, not the value
        let value = value
            .strip_suffix("\r\n")
            .or_else(|| value.strip_suffix('\n'))
            .unwrap_or(value);
        named && value.trim() == ONE_CLICK_VALUE
    })
}

/// One feedback entry for `herald.record_feedback` from a verified link.
fn feedback(kind: &str, c: &Claims) -> Json {
    json!({
        "kind": kind,
        "workspace": c.workspace,
        "email": c.email,
        "message_id": message_id(&c.workspace, &c.key),
        "payload": {"broadcast": c.broadcast, "variation": c.variation, "message": c.key, "url": c.url},
    })
}

async fn provider_events(req: &Request, format: &str, side: &HttpSide, db: &Db) -> Response {
    let scope = match provider_scope(req, format, side) {
        Ok(scope) => scope,
        Err(refused) => return refused,
    };
    let Ok(body) = serde_json::from_slice::<Json>(&req.body) else {
        return Response::text("400 Bad Request", "the body is not JSON\n");
    };
    let only = match &scope {
        TokenScope::All => None,
        TokenScope::Workspace(w) => Some(w.clone()),
    };
    // a workspace's token: its entries are that workspace's unless they name another (then skipped)
    let workspace = only.clone().or_else(|| {
        req.query
            .split('&')
            .find_map(|kv| kv.strip_prefix("workspace="))
            .map(|w| {
                percent_encoding::percent_decode_str(w)
                    .decode_utf8_lossy()
                    .to_string()
            })
    });
    let entries = match format {
        "generic" => generic_events(&body),
        "sendgrid" => sendgrid_events(&body),
        _ => {
            return Response::text(
                "404 Not Found",
                "formats: /events/generic, /events/sendgrid\n",
            )
        }
    };
    let entries = match entries {
        Ok(e) => e,
        Err(e) => return Response::text("400 Bad Request", format!("{e}\n")),
    };
    let feedback: Vec<Json> = entries
        .into_iter()
        .map(|mut e| {
            if e.get("workspace").is_none_or(Json::is_null) {
                if let Some(w) = &workspace {
                    e["workspace"] = json!(w);
                }
            }
            e
        })
        .collect();
    let received = feedback.len();
    match db.record(Json::Array(feedback), only.as_deref()).await {
        Ok(recorded) => Response::json(
            "200 OK",
            json!({"received": received, "recorded": recorded}),
        ),
        Err(e) => server_error("provider events", &e),
    }
}

/// Who may post provider events, and for which workspaces: with a SendGrid verification key,
/// /events/sendgrid takes SendGrid's signature instead of a token (the signature also proves the body
/// was not altered, and SendGrid sends it whatever the webhook URL holds; it speaks for every
/// workspace); every other case needs an events token: the default one (every workspace) or a
/// workspace's own (that workspace only), current or previous. `Err`: the refusal to send.
fn provider_scope(req: &Request, format: &str, side: &HttpSide) -> Result<TokenScope, Response> {
    if format == "sendgrid" {
        if let Some(key) = &side.sendgrid_key {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            let checked = verify_sendgrid(
                key,
                req.header(SENDGRID_SIGNATURE),
                req.header(SENDGRID_TIMESTAMP),
                &req.body,
                now,
            );
            return checked.map(|()| TokenScope::All).map_err(|refusal| {
                tracing::info!(reason = %refusal, "http: SendGrid events refused");
                Response::text(refusal.status(), format!("{refusal}\n"))
            });
        }
    }
    if !side.keys.has_events_tokens() {
        return Err(Response::text(
            "404 Not Found",
            "provider events are off (no HERALD_EVENTS_TOKEN)\n",
        ));
    }
    let header = req.header("authorization");
    side.keys
        .events_scope(|token| authorized(header, token))
        .ok_or_else(|| {
            Response::text(
                "401 Unauthorized",
                "missing or wrong token (Authorization: Bearer <token>, or Basic with the token as password)\n",
            )
        })
}

/// SendGrid's Signed Event Webhook headers (names lower-cased as `Request` keeps them).
const SENDGRID_SIGNATURE: &str = "x-twilio-email-event-webhook-signature";
const SENDGRID_TIMESTAMP: &str = "x-twilio-email-event-webhook-timestamp";
/// How far a signed request's timestamp may be from now, either way: a captured request can be
/// replayed only this long, and this much clock difference is tolerated.
pub const SENDGRID_MAX_SKEW_SECS: i64 = 5 * 60;

/// Why a SendGrid verification key from the settings was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendgridKeyError {
    NotBase64,
    NotP256,
}

impl fmt::Display for SendgridKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotBase64 => "not base64 (paste the verification key SendGrid shows for the Signed Event Webhook)",
            Self::NotP256 => "not a P-256 (prime256v1) public key in DER SubjectPublicKeyInfo form, as SendGrid shows it",
        })
    }
}

impl std::error::Error for SendgridKeyError {}

/// The key SendGrid shows: base64 of a DER SubjectPublicKeyInfo of a P-256 key. PEM armour
/// (`-----BEGIN PUBLIC KEY-----` lines) and line breaks are tolerated, since copies often carry them.
pub fn parse_sendgrid_key(text: &str) -> Result<VerifyingKey, SendgridKeyError> {
    let b64: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("-----"))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| SendgridKeyError::NotBase64)?;
    // checks the algorithm (id-ecPublicKey), the curve (P-256) and that the point is on it
    VerifyingKey::from_public_key_der(&der).map_err(|_| SendgridKeyError::NotP256)
}

/// Why a request to /events/sendgrid was refused when signatures are required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendgridRefusal {
    MissingSignature,
    MissingTimestamp,
    BadTimestamp,
    StaleTimestamp,
    MalformedSignature,
    WrongSignature,
}

impl SendgridRefusal {
    /// 401 when the request carries no signature at all, 403 when it carries a bad one.
    pub fn status(self) -> &'static str {
        match self {
            Self::MissingSignature | Self::MissingTimestamp => "401 Unauthorized",
            _ => "403 Forbidden",
        }
    }
}

impl fmt::Display for SendgridRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MissingSignature => "unsigned: X-Twilio-Email-Event-Webhook-Signature is missing",
            Self::MissingTimestamp => "unsigned: X-Twilio-Email-Event-Webhook-Timestamp is missing",
            Self::BadTimestamp => {
                "X-Twilio-Email-Event-Webhook-Timestamp is not a Unix time in seconds"
            }
            Self::StaleTimestamp => "the signed timestamp is more than 5 minutes from now",
            Self::MalformedSignature => {
                "the signature is not base64 of a DER-encoded ECDSA signature"
            }
            Self::WrongSignature => {
                "the signature does not match this body, timestamp and verification key"
            }
        })
    }
}

/// SendGrid's Signed Event Webhook: an ECDSA P-256/SHA-256 signature (base64 of DER) over the bytes
/// of the timestamp header followed by the raw body, with the timestamp (Unix seconds) within
/// `SENDGRID_MAX_SKEW_SECS` of `now` so that a captured request cannot be replayed later.
pub fn verify_sendgrid(
    key: &VerifyingKey,
    signature: Option<&str>,
    timestamp: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), SendgridRefusal> {
    let signature = signature
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or(SendgridRefusal::MissingSignature)?;
    let timestamp = timestamp
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(SendgridRefusal::MissingTimestamp)?;
    let at: i64 = timestamp
        .parse()
        .ok()
        .filter(|_| timestamp.bytes().all(|b| b.is_ascii_digit()))
        .ok_or(SendgridRefusal::BadTimestamp)?;
    if now.abs_diff(at) > SENDGRID_MAX_SKEW_SECS.unsigned_abs() {
        return Err(SendgridRefusal::StaleTimestamp);
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .map_err(|_| SendgridRefusal::MalformedSignature)?;
    let signature = Signature::from_der(&der).map_err(|_| SendgridRefusal::MalformedSignature)?;
    key.multipart_verify(&[timestamp.as_bytes(), body], &signature)
        .map_err(|_| SendgridRefusal::WrongSignature)
}

/// herald's own format: `{"events": [{"type": "bounce" | "complaint" | "unsubscribe", "bounce_type":
/// "hard" | "soft", "email": "…", "workspace": "…", "message_id": "<…>"}]}` (workspace or message_id
/// needed; a bounce without bounce_type is hard).
pub fn generic_events(body: &Json) -> Result<Vec<Json>, String> {
    let events = body
        .get("events")
        .and_then(Json::as_array)
        .ok_or("expected {\"events\": [...]}")?;
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let kind = match (
                e.get("type").and_then(Json::as_str),
                e.get("bounce_type").and_then(Json::as_str),
            ) {
                (Some("bounce"), None | Some("hard")) => "hard_bounce",
                (Some("bounce"), Some("soft")) => "soft_bounce",
                (Some("complaint"), _) => "complaint",
                (Some("unsubscribe"), _) => "unsubscribed",
                _ => {
                    return Err(format!(
                        "events[{i}]: type must be bounce (bounce_type hard|soft), complaint or unsubscribe"
                    ))
                }
            };
            Ok(json!({
                "kind": kind,
                "email": e.get("email"),
                "workspace": e.get("workspace"),
                "message_id": e.get("message_id"),
                "payload": {"source": "generic", "reason": e.get("reason")},
            }))
        })
        .collect()
}

/// SendGrid's event webhook: an array of `{"email", "event", "type", "smtp-id", "reason", …}`.
/// bounce → hard bounce (type "blocked": soft), spamreport → complaint, unsubscribe and
/// group_unsubscribe → unsubscribed; other events (delivered, open, click, …) are ignored here.
pub fn sendgrid_events(body: &Json) -> Result<Vec<Json>, String> {
    let events = body
        .as_array()
        .ok_or("expected a JSON array of SendGrid events")?;
    Ok(events
        .iter()
        .filter_map(|e| {
            let kind = match (
                e.get("event").and_then(Json::as_str)?,
                e.get("type").and_then(Json::as_str),
            ) {
                ("bounce", Some("blocked")) => "soft_bounce",
                ("bounce", _) => "hard_bounce",
                ("spamreport", _) => "complaint",
                ("unsubscribe" | "group_unsubscribe", _) => "unsubscribed",
                _ => return None,
            };
            Some(json!({
                "kind": kind,
                "email": e.get("email"),
                "message_id": e.get("smtp-id"),
                "payload": {"source": "sendgrid", "reason": e.get("reason"), "sg_event_id": e.get("sg_event_id")},
            }))
        })
        .collect())
}

/// `Bearer <token>`, or `Basic base64(<any user>:<token>)` for providers that can only put
/// credentials into the webhook URL (SendGrid's `https://user:token@host/events/sendgrid`).
fn authorized(header: Option<&str>, token: &[u8]) -> bool {
    let Some((scheme, value)) = header.and_then(|h| h.trim().split_once(' ')) else {
        return false;
    };
    let given = match scheme.to_ascii_lowercase().as_str() {
        "bearer" => value.trim().as_bytes().to_vec(),
        "basic" => {
            let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(value.trim()) else {
                return false;
            };
            match raw.iter().position(|&b| b == b':') {
                Some(i) => raw[i + 1..].to_vec(),
                None => return false,
            }
        }
        _ => return false,
    };
    constant_time_eq(&given, token)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn server_error(what: &str, e: &RecordError) -> Response {
    e.log(what);
    Response::text(
        "503 Service Unavailable",
        "could not record it now; please try again\n",
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(title: &str, text: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
         <body><h1>{title}</h1><p>{text}</p></body></html>"
    )
}

/// GET never unsubscribes (link scanners follow links); the button does, with the RFC 8058 body.
/// The form has no action: it posts back to the URL it was shown at (also behind a path prefix).
fn confirm_page(c: &Claims) -> String {
    page(
        "Unsubscribe",
        &format!(
            "Stop emails to {}?</p><form method=\"post\">\
             <input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
             <button type=\"submit\">Unsubscribe</button></form><p>",
            escape(&c.email)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_click_needs_the_rfc_8058_body() {
        let form = Some("application/x-www-form-urlencoded");
        assert!(is_one_click(form, b"List-Unsubscribe=One-Click"));
        assert!(is_one_click(form, b"a=1&List-Unsubscribe=One-Click\r\n"));
        assert!(is_one_click(
            Some("application/x-www-form-urlencoded; charset=UTF-8"),
            b"List-Unsubscribe=One%2DClick"
        ));
        // no Content-Type: read as a form
        assert!(is_one_click(None, b"List-Unsubscribe=One-Click"));
        // what confirm_page's form posts (a browser sends its fields form-urlencoded)
        assert!(confirm_page_posts_one_click());
        let multipart = b"--x\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--x--\r\n";
        assert!(is_one_click(
            Some("multipart/form-data; boundary=x"),
            multipart
        ));
        assert!(is_one_click(
            Some("Multipart/Form-Data; boundary=\"x\""),
            multipart
        ));
        for body in [
            &b""[..],
            b"List-Unsubscribe=Other",
            b"One-Click",
            b"List-Unsubscribe=One-Click-Now",
            b"list-unsubscribe=One-Click",
        ] {
            assert!(
                !is_one_click(form, body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // the right words in the wrong media type, or in the wrong multipart field
        assert!(!is_one_click(
            Some("application/json"),
            b"List-Unsubscribe=One-Click"
        ));
        assert!(
            !is_one_click(Some("multipart/form-data"), multipart),
            "no boundary"
        );
        assert!(!is_one_click(
            Some("multipart/form-data; boundary=y"),
            multipart
        ));
        let other_field = b"--x\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nNo\r\n--x\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nOne-Click\r\n--x--\r\n";
        assert!(!is_one_click(
            Some("multipart/form-data; boundary=x"),
            other_field
        ));
        assert!(!is_one_click(
            Some("multipart/form-data; boundary=x"),
            b"List-Unsubscribe=One-Click"
        ));
    }

    /// The hidden field of the confirmation page, posted as a browser would.
    fn confirm_page_posts_one_click() -> bool {
        let page = confirm_page(&Claims {
            purpose: Purpose::Unsubscribe,
            workspace: "w".into(),
            email: "a@x.example".into(),
            key: "k".into(),
            broadcast: None,
            variation: None,
            url: None,
        });
        let input = page
            .split("<input ")
            .nth(1)
            .and_then(|i| i.split('>').next())
            .unwrap_or("");
        let attr = |name: &str| {
            input
                .split(&format!("{name}=\""))
                .nth(1)
                .and_then(|v| v.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair(&attr("name"), &attr("value"))
            .finish();
        page.contains("<form method=\"post\">")
            && is_one_click(Some("application/x-www-form-urlencoded"), body.as_bytes())
    }

    /// SendGrid's key for the tests, from a fixed scalar (signing is deterministic, RFC 6979).
    fn sendgrid_pair() -> (p256::ecdsa::SigningKey, VerifyingKey) {
        let signing = p256::ecdsa::SigningKey::from_slice(&[0x42; 32]).expect("a valid scalar");
        let verifying = *signing.verifying_key();
        (signing, verifying)
    }

    fn sendgrid_sign(key: &p256::ecdsa::SigningKey, timestamp: &str, body: &[u8]) -> String {
        use p256::ecdsa::signature::Signer as _;
        let mut message = timestamp.as_bytes().to_vec();
        message.extend_from_slice(body);
        let signature: Signature = key.sign(&message);
        base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
    }

    #[test]
    fn sendgrid_signatures_verify_over_timestamp_and_body() {
        use p256::pkcs8::EncodePublicKey as _;
        let (signing, verifying) = sendgrid_pair();
        let now = 1_800_000_000;
        let body = br#"[{"email":"a@x.example","event":"bounce"}]"#;
        let ts = now.to_string();
        let sig = sendgrid_sign(&signing, &ts, body);
        assert_eq!(
            verify_sendgrid(&verifying, Some(&sig), Some(&ts), body, now),
            Ok(())
        );
        // the key as SendGrid shows it (base64 DER SubjectPublicKeyInfo) round-trips
        let shown = base64::engine::general_purpose::STANDARD
            .encode(verifying.to_public_key_der().expect("encodable").as_bytes());
        let parsed = parse_sendgrid_key(&shown).expect("SendGrid's key form");
        assert_eq!(
            verify_sendgrid(&parsed, Some(&sig), Some(&ts), body, now + 299),
            Ok(())
        );

        // a changed body, timestamp or key, or a garbled signature, does not verify
        let mut tampered = body.to_vec();
        tampered[3] ^= 1;
        let wrong = Err(SendgridRefusal::WrongSignature);
        assert_eq!(
            verify_sendgrid(&verifying, Some(&sig), Some(&ts), &tampered, now),
            wrong
        );
        let ts2 = (now + 1).to_string();
        assert_eq!(
            verify_sendgrid(&verifying, Some(&sig), Some(&ts2), body, now),
            wrong
        );
        let other = *p256::ecdsa::SigningKey::from_slice(&[0x43; 32])
            .expect("a valid scalar")
            .verifying_key();
        assert_eq!(
            verify_sendgrid(&other, Some(&sig), Some(&ts), body, now),
            wrong
        );
        assert_eq!(
            verify_sendgrid(&verifying, Some("bm90IGRlcg=="), Some(&ts), body, now),
            Err(SendgridRefusal::MalformedSignature)
        );
        assert_eq!(
            verify_sendgrid(&verifying, Some("%%%"), Some(&ts), body, now),
            Err(SendgridRefusal::MalformedSignature)
        );

        // stale or future timestamps (over 5 minutes), even correctly signed, are refused
        for at in [now - 301, now + 301, 0] {
            let at_text = at.to_string();
            let sig = sendgrid_sign(&signing, &at_text, body);
            assert_eq!(
                verify_sendgrid(&verifying, Some(&sig), Some(&at_text), body, now),
                Err(SendgridRefusal::StaleTimestamp),
                "{at}"
            );
        }
        let sig_300 = sendgrid_sign(&signing, &(now - 300).to_string(), body);
        assert_eq!(
            verify_sendgrid(
                &verifying,
                Some(&sig_300),
                Some(&(now - 300).to_string()),
                body,
                now
            ),
            Ok(())
        );
        for bad in ["soon", "-1", "+1800000000", "1.8e9", "99999999999999999999"] {
            assert_eq!(
                verify_sendgrid(&verifying, Some(&sig), Some(bad), body, now),
                Err(SendgridRefusal::BadTimestamp),
                "{bad}"
            );
        }

        // unsigned requests: 401; badly signed ones: 403
        assert_eq!(
            verify_sendgrid(&verifying, None, Some(&ts), body, now),
            Err(SendgridRefusal::MissingSignature)
        );
        assert_eq!(
            verify_sendgrid(&verifying, Some(&sig), Some(" "), body, now),
            Err(SendgridRefusal::MissingTimestamp)
        );
        assert!(SendgridRefusal::MissingSignature
            .status()
            .starts_with("401"));
        assert!(SendgridRefusal::WrongSignature.status().starts_with("403"));
        assert!(SendgridRefusal::StaleTimestamp.status().starts_with("403"));
    }

    /// A key, signature and body made by another implementation (Python `cryptography`), so the
    /// byte layout (timestamp then body, DER signature, SPKI key) is checked, not only a round trip.
    #[test]
    fn sendgrid_signature_from_another_implementation() {
        let key = parse_sendgrid_key(
            "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEvl8xDT8gYPEN/AJ1nDAHCdeYcjsCC/pPZ1x2Z5qSAWcpZreqWAbg9tVykL0Og7/JuCctZSXvoKi9otsL+tpGew==",
        )
        .expect("a P-256 key");
        let sig = "MEYCIQCpTbecBQq0/U9zBfsQJAVu1gTHDjZDCKNmVQHzol0AhwIhAJ8geQ8geWrdVxlfD0WoLq6rMJSXej6HqLAZbf59HwcF";
        let body = b"[{\"email\":\"a@x.example\",\"event\":\"bounce\"}]\r\n";
        let ts = "1700000000";
        assert_eq!(
            verify_sendgrid(&key, Some(sig), Some(ts), body, 1_700_000_060),
            Ok(())
        );
        assert_eq!(
            verify_sendgrid(
                &key,
                Some(sig),
                Some(ts),
                &body[..body.len() - 2],
                1_700_000_060
            ),
            Err(SendgridRefusal::WrongSignature)
        );
    }

    #[test]
    fn sendgrid_keys_must_be_p256_public_keys() {
        let p256 = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEvl8xDT8gYPEN/AJ1nDAHCdeYcjsCC/pPZ1x2Z5qSAWcpZreqWAbg9tVykL0Og7/JuCctZSXvoKi9otsL+tpGew==";
        assert!(parse_sendgrid_key(p256).is_ok());
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n{}\n-----END PUBLIC KEY-----\n",
            &p256[..64],
            &p256[64..]
        );
        assert!(
            parse_sendgrid_key(&pem).is_ok(),
            "PEM armour and line breaks"
        );
        let p384 = "MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEMMt3D8OUjxVzmIFsc1WkclS/rvbq+/wtd4wfGUvZDP3h0Ot5ID+7cRFyM+ZUEq2x5Rw4NqwkQSX9ucsxO+OfP5lcygmnSyaWWRGsCAWuOwLTRxfvypRhYsc9rCcA8Z5P";
        assert_eq!(
            parse_sendgrid_key(p384).err(),
            Some(SendgridKeyError::NotP256)
        );
        assert_eq!(
            parse_sendgrid_key("not base64!").err(),
            Some(SendgridKeyError::NotBase64)
        );
        assert_eq!(
            parse_sendgrid_key("aGVsbG8=").err(),
            Some(SendgridKeyError::NotP256)
        );
        // a point off the curve: the last coordinate byte changed
        let mut der = base64::engine::general_purpose::STANDARD
            .decode(p256)
            .expect("base64");
        let last = der.len() - 1;
        der[last] ^= 1;
        let off_curve = base64::engine::general_purpose::STANDARD.encode(der);
        assert_eq!(
            parse_sendgrid_key(&off_curve).err(),
            Some(SendgridKeyError::NotP256)
        );
    }

    #[test]
    fn generic_events_map_to_feedback_kinds() {
        let e = generic_events(&json!({"events": [
            {"type": "bounce", "email": "a@x.example", "workspace": "w"},
            {"type": "bounce", "bounce_type": "soft", "message_id": "<m@herald>"},
            {"type": "complaint", "email": "c@x.example", "workspace": "w"},
            {"type": "unsubscribe", "email": "d@x.example", "workspace": "w"}]}))
        .unwrap();
        let kinds: Vec<&str> = e.iter().map(|x| x["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            ["hard_bounce", "soft_bounce", "complaint", "unsubscribed"]
        );
        assert_eq!(e[1]["message_id"], "<m@herald>");
        assert!(generic_events(&json!({"events": [{"type": "delivered"}]}))
            .unwrap_err()
            .contains("events[0]"));
        assert!(generic_events(&json!([])).is_err());
    }

    #[test]
    fn sendgrid_events_keep_what_herald_acts_on() {
        let e = sendgrid_events(&json!([
            {"email": "a@x.example", "event": "bounce", "type": "bounce", "smtp-id": "<1@herald>"},
            {"email": "b@x.example", "event": "bounce", "type": "blocked"},
            {"email": "c@x.example", "event": "spamreport"},
            {"email": "d@x.example", "event": "delivered"},
            {"email": "e@x.example", "event": "group_unsubscribe"}]))
        .unwrap();
        let kinds: Vec<&str> = e.iter().map(|x| x["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            ["hard_bounce", "soft_bounce", "complaint", "unsubscribed"]
        );
        assert_eq!(e[0]["message_id"], "<1@herald>");
        assert!(sendgrid_events(&json!({})).is_err());
    }

    #[test]
    fn provider_credentials_bearer_or_basic_password() {
        let t = b"provider-token";
        assert!(authorized(Some("Bearer provider-token"), t));
        assert!(authorized(Some("bearer provider-token "), t));
        // base64("sendgrid:provider-token")
        assert!(authorized(
            Some("Basic c2VuZGdyaWQ6cHJvdmlkZXItdG9rZW4="),
            t
        ));
        // base64("provider-token:x"): the token as user name is not the password
        assert!(!authorized(Some("Basic cHJvdmlkZXItdG9rZW46eA=="), t));
        assert!(!authorized(Some("Basic !!!"), t));
        assert!(!authorized(Some("Bearer provider-toke"), t));
        assert!(!authorized(Some("Token provider-token"), t));
        assert!(!authorized(Some("provider-token"), t));
        assert!(!authorized(None, t));
    }

    #[test]
    fn connections_are_counted_per_address() {
        let table = Arc::new(PerAddress::default());
        let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: std::net::IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        let mut held: Vec<AddressSlot> = (0..MAX_PER_ADDRESS - 1)
            .map(|_| table.take(a).expect("under the limit"))
            .collect();
        held.push(table.take(mapped).expect("the same address, IPv4-mapped"));
        assert!(table.take(a).is_none() && table.take(mapped).is_none());
        assert!(table.take(b).is_some(), "another address is not held up");
        held.pop();
        assert!(
            table.take(a).is_some(),
            "a closed connection frees its place"
        );
        held.clear();
        assert!(table.open.lock().unwrap().is_empty(), "nothing left behind");
    }

    #[test]
    fn tokens_compare_in_constant_time_and_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}

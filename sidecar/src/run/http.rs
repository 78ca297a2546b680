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
//! password). Every request records its facts with ONE `herald.record_feedback` call. A tiny
//! HTTP/1.1 server, one request per connection.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value as Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_postgres::{Client, Config};
use tokio_util::sync::CancellationToken;

use super::config::HttpSide;
use super::email::message_id;
use super::links::{self, Claims, Purpose};
use super::pg;

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;
/// Connections handled at once (each holds at most MAX_HEAD + MAX_BODY and one query in flight).
const MAX_CONNECTIONS: usize = 512;
/// A transparent 1×1 GIF.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// One shared connection (tokio-postgres pipelines concurrent queries on it), reconnected on loss.
struct Db {
    config: Config,
    client: Mutex<Option<Arc<Client>>>,
}

impl Db {
    async fn record(&self, feedback: Json) -> Result<i32, tokio_postgres::Error> {
        let client = {
            let mut slot = self.client.lock().await;
            match slot.as_ref().filter(|c| !c.is_closed()) {
                Some(c) => Arc::clone(c),
                None => {
                    let c = Arc::new(pg::connect(&self.config, "http").await?);
                    *slot = Some(Arc::clone(&c));
                    c
                }
            }
        };
        let row = client
            .query_one("SELECT herald.record_feedback($1::jsonb)", &[&feedback])
            .await?;
        row.try_get(0)
    }
}

struct Request {
    method: String,
    path: String,
    query: String,
    authorization: Option<String>,
    body: Vec<u8>,
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

pub async fn serve(listener: TcpListener, side: HttpSide, db: Config, shutdown: CancellationToken) {
    let side = Arc::new(side);
    let db = Arc::new(Db {
        config: db,
        client: Mutex::new(None),
    });
    // bounded: a flood of (slow) connections waits in the listen backlog instead of growing tasks
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (side, db) = (Arc::clone(&side), Arc::clone(&db));
        tokio::spawn(super::in_current_dispatch(async move {
            let _slot = slot;
            if tokio::time::timeout(Duration::from_secs(30), handle(stream, &side, &db))
                .await
                .is_err()
            {
                tracing::debug!("http: request timed out");
            }
        }));
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
        head.push_str(&format!("Location: {location}\r\n"));
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
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(("400 Bad Request", "incomplete request head")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut length = 0usize;
    let mut authorization = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                length = value
                    .trim()
                    .parse()
                    .map_err(|_| ("400 Bad Request", "Content-Length is not a number"))?
            }
            "authorization" => authorization = Some(value.trim().to_string()),
            // a chunked body would otherwise read as empty and be refused as "not JSON"
            "transfer-encoding" if !value.trim().eq_ignore_ascii_case("identity") => {
                return Err((
                    "411 Length Required",
                    "chunked bodies are not accepted; send the body with Content-Length",
                ))
            }
            _ => {}
        }
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
        authorization,
        body,
    })
}

async fn route(req: &Request, side: &HttpSide, db: &Db) -> Response {
    let key = side.link_secret.0.as_bytes();
    let mut parts = req.path.trim_start_matches('/').splitn(2, '/');
    let (head, rest) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (req.method.as_str(), head) {
        ("GET", "u") => match links::verify(key, rest, Purpose::Unsubscribe) {
            Ok(c) => Response::html("200 OK", confirm_page(&c)),
            Err(e) => Response::text("400 Bad Request", format!("{e}\n")),
        },
        ("POST", "u") => match links::verify(key, rest, Purpose::Unsubscribe) {
            Ok(_) if !is_one_click(&req.body) => Response::text(
                "400 Bad Request",
                "a one-click unsubscribe carries List-Unsubscribe=One-Click in its body (RFC 8058)\n",
            ),
            Ok(c) => match db.record(json!([feedback("unsubscribed", &c)])).await {
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
            if let Ok(c) = links::verify(key, rest, Purpose::Open) {
                if let Err(e) = db.record(json!([feedback("opened", &c)])).await {
                    tracing::warn!(error = %e, "http: recording an open failed");
                }
            }
            Response {
                status: "200 OK",
                content_type: "image/gif",
                location: None,
                body: PIXEL.to_vec(),
            }
        }
        ("GET", "c") => match links::verify(key, rest, Purpose::Click) {
            Ok(c) => {
                let url = c.url.clone().unwrap_or_default();
                if let Err(e) = db.record(json!([feedback("clicked", &c)])).await {
                    // the reader still gets where they wanted to go
                    tracing::warn!(error = %e, "http: recording a click failed");
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

/// RFC 8058: a one-click unsubscribe POST carries `List-Unsubscribe=One-Click`, form-urlencoded or as a
/// multipart/form-data field. Anything else (an empty POST, from a scanner say) unsubscribes nobody.
pub fn is_one_click(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body);
    text.split('&')
        .any(|pair| pair.trim() == "List-Unsubscribe=One-Click")
        || (text.contains("name=\"List-Unsubscribe\"")
            && text.lines().any(|l| l.trim() == "One-Click"))
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
    let Some(token) = &side.events_token else {
        return Response::text(
            "404 Not Found",
            "provider events are off (no HERALD_EVENTS_TOKEN)\n",
        );
    };
    if !authorized(req.authorization.as_deref(), token.0.as_bytes()) {
        return Response::text(
            "401 Unauthorized",
            "missing or wrong token (Authorization: Bearer <token>, or Basic with the token as password)\n",
        );
    }
    let Ok(body) = serde_json::from_slice::<Json>(&req.body) else {
        return Response::text("400 Bad Request", "the body is not JSON\n");
    };
    let workspace = req
        .query
        .split('&')
        .find_map(|kv| kv.strip_prefix("workspace="))
        .map(|w| {
            percent_encoding::percent_decode_str(w)
                .decode_utf8_lossy()
                .to_string()
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
    match db.record(Json::Array(feedback)).await {
        Ok(recorded) => Response::json(
            "200 OK",
            json!({"received": received, "recorded": recorded}),
        ),
        Err(e) => server_error("provider events", &e),
    }
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
    use base64::Engine as _;
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

fn server_error(what: &str, e: &tokio_postgres::Error) -> Response {
    tracing::warn!(error = %e, "http: {what} failed");
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
        assert!(is_one_click(b"List-Unsubscribe=One-Click"));
        assert!(is_one_click(b"a=1&List-Unsubscribe=One-Click\r\n"));
        let multipart = b"--x\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--x--\r\n";
        assert!(is_one_click(multipart));
        for body in [
            &b""[..],
            b"List-Unsubscribe=Other",
            b"One-Click",
            b"List-Unsubscribe=One-Click-Now",
        ] {
            assert!(!is_one_click(body), "{}", String::from_utf8_lossy(body));
        }
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
    fn tokens_compare_in_constant_time_and_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}

//! Webhook and decide jobs: one HTTP request each, through one shared reqwest client (rustls).
//!
//! Request: the payload's method, URL and headers, its body rendered (every string inside it is a
//! template; a payload with `"verbatim": true`, a results-stream delivery, is sent as it is),
//! `Content-Type: application/json`, `Idempotency-Key: <dedupe key>`, `X-Herald-Timestamp:
//! <unix seconds>` and, with a key configured, `X-Herald-Signature: sha256=<hex HMAC-SHA256(key,
//! timestamp + "." + body)>` with the job's workspace's key (or the default), plus, during a rotation,
//! `X-Herald-Signature-Previous` with the previous key. Timeout: the payload's `timeout_ms` (default 10 s), for the whole exchange.
//!
//! Reply: 2xx succeeds and its JSON (at most 64 KiB; anything else becomes `{"text": …}`) goes back as the
//! job's response; 408, 429, 5xx, time-outs and connection errors are retried; other statuses (redirects
//! are not followed) fail permanently.
//!
//! Targets: an address that is loopback, private, link-local, unspecified (and the like, see
//! [`restricted`]) is refused, as a permanent failure, unless its host name or a CIDR holding it is in
//! HERALD_WEBHOOK_ALLOW. Names are resolved once, by the client's resolver, which hands the connector only
//! the addresses it checked: a DNS answer that changes between check and connect (rebinding) cannot slip
//! through. Literal IP hosts are checked before the request is made.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use serde_json::{json, Value as Json};
use sha2::Sha256;

use super::address_policy::{AllowList, Refused};
use super::config::{Config, Keys};
use super::job::{Job, Outcome};
use super::render::{Renderer, Vars, MAX_OUTPUT};
use herald_render::engine::has_syntax;

/// Largest reply kept as the job's response.
pub const REPLY_CAP: usize = 64 * 1024;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The client's resolver: looks a name up once and returns only the addresses the policy allows.
struct GuardedResolver {
    allow: Arc<AllowList>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = Arc::clone(&self.allow);
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<IpAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .map(|a| a.ip())
                .collect();
            let ok = allow.check(&host, &found)?;
            let addrs: Addrs = Box::new(ok.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// `sha256=<hex HMAC-SHA256(key, timestamp + "." + body)>`.
pub fn signature(key: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Whether rendering these values (the URL, the string header values, the body) would give them back
/// unchanged: no template syntax in any string, and their text within the render's output bound (over
/// it, the renderer says so). Such a job skips the renderer, and with it a copy of its payload as
/// variables (contact, event, context) and of its fields: most webhooks carry no template, and at
/// thousands per second the copies were a good part of the daemon's CPU per job. Reads the payload in
/// place: nothing is copied to ask.
fn renders_as_is<'a>(values: impl IntoIterator<Item = &'a Json>) -> bool {
    fn text(v: &Json, total: &mut usize) -> bool {
        match v {
            Json::String(s) => {
                *total += s.len();
                !has_syntax(s)
            }
            Json::Array(items) => items.iter().all(|v| text(v, total)),
            Json::Object(map) => map.values().all(|v| text(v, total)),
            _ => true,
        }
    }
    let mut total = 0;
    values.into_iter().all(|v| text(v, &mut total)) && total <= MAX_OUTPUT
}

/// Whether a non-2xx status is worth retrying.
pub fn retryable_status(status: u16) -> bool {
    status == 408 || status == 429 || (500..600).contains(&status)
}

/// The job's response from a 2xx reply body.
pub fn reply_value(body: &[u8], truncated: bool) -> Option<Json> {
    if body.iter().all(u8::is_ascii_whitespace) && !truncated {
        return None;
    }
    if !truncated {
        if let Ok(v) = serde_json::from_slice::<Json>(body) {
            return Some(v);
        }
    }
    let text = String::from_utf8_lossy(body);
    let mut reply = json!({"text": text});
    if truncated {
        reply["truncated"] = Json::Bool(true);
    }
    Some(reply)
}

pub struct Webhooks {
    client: reqwest::Client,
    allow: Arc<AllowList>,
    keys: Arc<Keys>,
    max_timeout: Duration,
}

impl Webhooks {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let allow = Arc::new(config.webhook_allow.clone());
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver {
                allow: Arc::clone(&allow),
            }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            allow,
            keys: Arc::clone(&config.keys),
            max_timeout: config.lease,
        })
    }

    pub async fn call(&self, job: &Job, renderer: &Renderer) -> Outcome {
        let p = &job.payload;
        let Some(url_src) = p.get("url").and_then(Json::as_str) else {
            return Outcome::permanent("the job has no url");
        };
        let header_map = p.get("headers").and_then(Json::as_object);
        let body = p.get("body").filter(|b| !b.is_null());
        // a job marked verbatim carries data, not templates (a results-stream delivery: a result
        // holding "{{" must arrive as it is); so does one without template syntax: both are sent
        // from the payload as it is, borrowed
        let verbatim = p.get("verbatim").and_then(Json::as_bool) == Some(true);
        let string_headers = || {
            header_map
                .into_iter()
                .flatten()
                .filter(|(_, v)| v.is_string())
        };
        let as_is = verbatim || {
            let url = p.get("url").into_iter();
            renders_as_is(url.chain(string_headers().map(|(_, v)| v)).chain(body))
        };
        let prepared = if as_is {
            self.prepare(job, url_src, None, body)
        } else {
            // everything templated in one render: the URL, header values, the body's strings
            let mut fields = vec![("url".to_string(), Json::from(url_src))];
            let mut header_names = Vec::new();
            for (name, value) in string_headers() {
                fields.push((format!("headers.{name}"), value.clone()));
                header_names.push(name.clone());
            }
            if let Some(b) = body {
                fields.push(("body".to_string(), b.clone()));
            }
            let vars = Vars::from_payload(&job.workspace, p);
            let mut rendered = match renderer.render_fields(fields, &vars).await {
                Ok(r) => r.into_iter(),
                Err(e) => return e.outcome(),
            };
            let url_text = match rendered.next() {
                Some(Json::String(u)) => u,
                _ => return Outcome::permanent("the url did not render to text"),
            };
            let headers: Vec<(String, String)> = header_names
                .into_iter()
                .zip(rendered.by_ref())
                .map(|(n, v)| (n, v.as_str().unwrap_or_default().to_string()))
                .collect();
            let body = body.and_then(|_| rendered.next());
            self.prepare(job, &url_text, Some(&headers), body.as_ref())
        };
        match prepared {
            Ok(request) => self.send(request).await,
            Err(error) => Outcome::permanent(error),
        }
    }

    /// The request from the URL, string header values and body: rendered, or (`rendered_headers`
    /// None) the payload's own.
    fn prepare(
        &self,
        job: &Job,
        url_text: &str,
        rendered_headers: Option<&[(String, String)]>,
        body: Option<&Json>,
    ) -> Result<Prepared, String> {
        let p = &job.payload;
        let url = reqwest::Url::parse(url_text.trim())
            .map_err(|e| format!("invalid url {url_text:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("url must be http or https, got {url_text:?}"));
        }
        let literal = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => None,
            None => return Err(format!("url {url_text:?} has no host")),
        };
        if let Some(ip) = literal {
            // the resolver never sees IP literals: check them here
            self.allow.check(&ip.to_string(), &[ip]).map_err(|e| e.0)?;
        }
        let method_text = p
            .get("method")
            .and_then(Json::as_str)
            .unwrap_or("POST")
            .to_ascii_uppercase();
        let method = reqwest::Method::from_bytes(method_text.as_bytes())
            .map_err(|_| format!("invalid method {method_text:?}"))?;

        let mut headers = HeaderMap::new();
        if let Some(map) = p.get("headers").and_then(Json::as_object) {
            for (name, value) in map {
                let other;
                let value = match (value, rendered_headers) {
                    (Json::String(s), None) => s.as_str(),
                    (Json::String(_), Some(rendered)) => rendered
                        .iter()
                        .find(|(n, _)| n == name)
                        .map_or("", |(_, v)| v.as_str()),
                    (Json::Null, _) => continue,
                    (v, _) => {
                        other = v.to_string();
                        other.as_str()
                    }
                };
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("invalid header name {name:?}"))?;
                let value = HeaderValue::from_str(value)
                    .map_err(|_| format!("invalid value for header {name}"))?;
                headers.insert(name, value);
            }
        }
        let body = match body {
            None => Vec::new(),
            Some(b) => serde_json::to_vec(b).expect("JSON serialises"),
        };
        if !body.is_empty() && !headers.contains_key(CONTENT_TYPE) {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let timestamp = chrono::Utc::now().timestamp();
        let set =
            |headers: &mut HeaderMap, name: &'static str, value: &str| -> Result<(), String> {
                let value = HeaderValue::from_str(value)
                    .map_err(|_| format!("invalid value for header {name}"))?;
                headers.insert(HeaderName::from_static(name), value);
                Ok(())
            };
        set(&mut headers, "idempotency-key", &job.dedupe_key)?;
        set(&mut headers, "x-herald-timestamp", &timestamp.to_string())?;
        // the workspace's key (or the default); during a rotation also the previous key's signature,
        // so a receiver that knows only one of the two verifies either way
        let keys = self.keys.webhook(&job.workspace);
        if let Some(current) = &keys.current {
            set(
                &mut headers,
                "x-herald-signature",
                &signature(current.0.as_bytes(), timestamp, &body),
            )?;
        }
        if let Some(previous) = &keys.previous {
            set(
                &mut headers,
                "x-herald-signature-previous",
                &signature(previous.0.as_bytes(), timestamp, &body),
            )?;
        }
        let timeout = match p.get("timeout_ms").and_then(Json::as_u64) {
            Some(ms) => Duration::from_millis(ms.max(1)).min(self.max_timeout),
            None => DEFAULT_TIMEOUT.min(self.max_timeout),
        };
        Ok(Prepared {
            method,
            url,
            headers,
            body,
            timeout,
        })
    }

    async fn send(&self, r: Prepared) -> Outcome {
        let host = r.url.host_str().unwrap_or("?").to_string();
        let timeout = r.timeout;
        let request = self
            .client
            .request(r.method, r.url)
            .headers(r.headers)
            .body(r.body)
            .timeout(timeout);
        let mut response = match request.send().await {
            Ok(resp) => resp,
            Err(e) => return classify_error(&e, &host, timeout),
        };
        let status = response.status();
        let cap = if status.is_success() { REPLY_CAP } else { 1024 };
        let mut body = Vec::new();
        let mut truncated = false;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = cap - body.len();
                    if chunk.len() > room {
                        body.extend_from_slice(&chunk[..room]);
                        truncated = true;
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if status.is_success() => return classify_error(&e, &host, timeout),
                Err(_) => break,
            }
        }
        if status.is_success() {
            return Outcome::Done {
                message_id: None,
                response: reply_value(&body, truncated),
            };
        }
        let snippet: String = String::from_utf8_lossy(&body).chars().take(200).collect();
        let snippet = snippet.split_whitespace().collect::<Vec<_>>().join(" ");
        let error = format!(
            "HTTP {status} from {host}{}{snippet}",
            if snippet.is_empty() { "" } else { ": " }
        );
        Outcome::Failed {
            retryable: retryable_status(status.as_u16()),
            error,
        }
    }
}

struct Prepared {
    method: reqwest::Method,
    url: reqwest::Url,
    headers: HeaderMap,
    body: Vec<u8>,
    timeout: Duration,
}

fn classify_error(e: &reqwest::Error, host: &str, timeout: Duration) -> Outcome {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut chain = Vec::new();
    while let Some(s) = source {
        if let Some(refused) = s.downcast_ref::<Refused>() {
            return Outcome::permanent(refused.0.clone());
        }
        chain.push(s.to_string());
        source = s.source();
    }
    if e.is_timeout() {
        return Outcome::retry(format!(
            "{host} did not answer within {} ms",
            timeout.as_millis()
        ));
    }
    // the innermost causes say the most ("connection refused"); the URL is left out (it may carry tokens)
    let detail = chain.into_iter().skip(1).collect::<Vec<_>>().join(": ");
    let what = if e.is_connect() {
        "cannot connect to"
    } else {
        "request failed to"
    };
    Outcome::retry(format!("{what} {host}: {detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_signature() {
        // the HMAC itself: RFC 4231, test case 2
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // what is signed: timestamp + "." + body
        let mut mac = Hmac::<Sha256>::new_from_slice(b"k").unwrap();
        mac.update(b"1700000000.{\"a\":1}");
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(signature(b"k", 1_700_000_000, b"{\"a\":1}"), expected);
        assert_ne!(signature(b"k", 1_700_000_001, b"{\"a\":1}"), expected);
    }

    #[test]
    fn only_fields_without_templates_within_the_bound_skip_the_renderer() {
        let url = json!("http://h/x");
        let field = |v: Json| [url.clone(), v];
        assert!(renders_as_is(&field(
            json!({"n": 1, "a": ["x", {"b": "y"}]})
        )));
        assert!(!renders_as_is(&field(
            json!({"a": ["x", {"b": "{{ contact.email }}"}]})
        )));
        assert!(!renders_as_is(&field(
            json!({"a": "{% if x %}y{% endif %}"})
        )));
        // over the output bound the renderer runs, and fails the job naming the bound
        assert!(!renders_as_is(&field(json!("x".repeat(MAX_OUTPUT)))));
        assert!(renders_as_is(&field(json!("x".repeat(MAX_OUTPUT - 10)))));
    }

    #[test]
    fn statuses() {
        for s in [408, 429, 500, 502, 503, 599] {
            assert!(retryable_status(s), "{s}");
        }
        for s in [301, 400, 401, 403, 404, 409, 410, 422] {
            assert!(!retryable_status(s), "{s}");
        }
    }

    #[test]
    fn replies() {
        assert_eq!(
            reply_value(b"{\"score\": 3}", false),
            Some(json!({"score": 3}))
        );
        assert_eq!(reply_value(b"", false), None);
        assert_eq!(reply_value(b"  \n", false), None);
        assert_eq!(reply_value(b"ok", false), Some(json!({"text": "ok"})));
        assert_eq!(
            reply_value(b"{\"a\":", true),
            Some(json!({"text": "{\"a\":", "truncated": true}))
        );
    }
}

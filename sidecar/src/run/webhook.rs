//! Webhook and decide jobs: one HTTP request each, through one shared reqwest client (rustls).
//!
//! Request: the payload's method, URL and headers, its body rendered (every string inside it is a
//! template), `Content-Type: application/json`, `Idempotency-Key: <dedupe key>`, `X-Herald-Timestamp:
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

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use serde_json::{json, Value as Json};
use sha2::Sha256;

use super::config::{Config, Keys};
use super::executor::{Job, Outcome};
use super::render::{Renderer, Vars};

/// Largest reply kept as the job's response.
pub const REPLY_CAP: usize = 64 * 1024;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A block of addresses: `10.0.0.0/8`, `::1/128`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    if a[..full] != b[..full] {
        return false;
    }
    let rest = bits % 8;
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[full] & mask == b[full] & mask
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// HERALD_WEBHOOK_ALLOW: host names and CIDRs that may be reached although restricted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    hosts: Vec<String>,
    nets: Vec<Cidr>,
}

impl AllowList {
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut out = Self::default();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bare = item.trim_start_matches('[').trim_end_matches(']');
            if bare.contains('/') || bare.parse::<IpAddr>().is_ok() {
                out.nets.push(Cidr::parse(bare)?);
            } else if bare
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
            {
                out.hosts
                    .push(bare.trim_end_matches('.').to_ascii_lowercase());
            } else {
                return Err(format!(
                    "{item:?} is neither a host name nor an IP address/CIDR"
                ));
            }
        }
        Ok(out)
    }

    fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    /// An IPv6 address that reaches an IPv4 host is allowed when either form is listed.
    fn allows_ip(&self, ip: IpAddr) -> bool {
        let inner = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.nets
            .iter()
            .any(|n| n.contains(ip) || inner.is_some_and(|v4| n.contains(v4)))
    }

    /// The addresses of `host` that may be connected to, or why none may.
    pub fn check(&self, host: &str, addrs: &[IpAddr]) -> Result<Vec<IpAddr>, Refused> {
        if self.allows_host(host) {
            return Ok(addrs.to_vec());
        }
        let mut reasons = Vec::new();
        let ok: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|ip| match restricted(*ip) {
                Some(why) if !self.allows_ip(*ip) => {
                    reasons.push(format!("{ip} is {why}"));
                    false
                }
                _ => true,
            })
            .collect();
        if ok.is_empty() {
            let why = if reasons.is_empty() {
                "it has no address".to_string()
            } else {
                reasons.join(", ")
            };
            return Err(Refused(format!(
                "webhook target {host} refused: {why} (add the host or a CIDR to HERALD_WEBHOOK_ALLOW to allow it)"
            )));
        }
        Ok(ok)
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self
            .hosts
            .iter()
            .cloned()
            .chain(self.nets.iter().map(ToString::to_string))
            .collect();
        f.write_str(&items.join(","))
    }
}

/// The IPv4 address an IPv6 address carries on to an IPv4 host, for the forms that reach one:
/// IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, SIIT `::ffff:0:a.b.c.d`, NAT64
/// `64:ff9b::a.b.c.d` (RFC 6052, /96) and 6to4 `2002:aabb:ccdd::/48` (RFC 3056).
pub fn embedded_v4(v6: std::net::Ipv6Addr) -> Option<Ipv4Addr> {
    let seg = v6.segments();
    let v4 = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    match seg {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(v4(hi, lo)),
        [0, 0, 0, 0, 0xffff, 0, hi, lo] => Some(v4(hi, lo)),
        // :: and ::1 are themselves, not IPv4-compatible addresses
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 => Some(v4(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
        [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
        _ => None,
    }
}

/// Why a webhook may not reach this address by default, or None for a public one.
pub fn restricted(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => restricted_v4(v4),
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            if let Some(v4) = embedded_v4(v6) {
                // judged by the IPv4 host it reaches; the forms without a public use are refused whole
                return match seg {
                    [0, 0, 0, 0, 0, 0xffff, ..] => restricted_v4(v4),
                    [0x64, 0xff9b, ..] => {
                        restricted_v4(v4).map(|_| "NAT64 of a restricted IPv4 address")
                    }
                    [0x2002, ..] => restricted_v4(v4).map(|_| "6to4 of a restricted IPv4 address"),
                    _ => Some("reserved (IPv4-compatible or -translated)"),
                };
            }
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if seg[..6] == [0; 6] {
                Some("reserved (IPv4-compatible or -translated)")
            } else if seg[0] & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if seg[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if seg[0] & 0xffc0 == 0xfec0 {
                Some("private (site-local)")
            } else if seg[0] & 0xff00 == 0xff00 {
                Some("multicast")
            } else if seg[0] == 0x2001 && seg[1] == 0 {
                // the client's IPv4 address is hidden (XOR-ed) inside: it may be anything
                Some("Teredo (tunnels to an IPv4 address)")
            } else if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1 {
                Some("local-use NAT64 (RFC 8215)")
            } else if seg[0] == 0x64 && seg[1] == 0xff9b {
                Some("NAT64 (not the well-known /96 form)")
            } else if seg[0] == 0x2001 && seg[1] == 0xdb8 {
                Some("reserved (documentation)")
            } else if seg[..4] == [0x100, 0, 0, 0] {
                Some("reserved (discard-only)")
            } else {
                None
            }
        }
    }
}

fn restricted_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if a == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("private (shared address space)")
    } else if a == 192 && b == 0 && c == 0 {
        Some("reserved (IETF protocol assignments)")
    } else if a == 198 && (b == 18 || b == 19) {
        Some("reserved (benchmarking)")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if (a, b, c) == (192, 0, 2) || (a, b, c) == (198, 51, 100) || (a, b, c) == (203, 0, 113)
    {
        Some("reserved (documentation)")
    } else if a >= 240 {
        Some("reserved")
    } else {
        None
    }
}

/// A target the policy refuses: a permanent failure.
#[derive(Debug)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

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

    pub async fn call(&self, job: &Job, renderer: &Renderer, vars: &Vars) -> Outcome {
        let p = &job.payload;
        let Some(url_src) = p.get("url").and_then(Json::as_str) else {
            return Outcome::permanent("the job has no url");
        };
        // everything templated in one render: the URL, header values, the body's strings
        let mut fields = vec![("url".to_string(), Json::from(url_src))];
        let mut header_names = Vec::new();
        if let Some(map) = p.get("headers").and_then(Json::as_object) {
            for (name, value) in map {
                if let Json::String(s) = value {
                    fields.push((format!("headers.{name}"), Json::from(s.as_str())));
                    header_names.push(name.clone());
                }
            }
        }
        let body = p.get("body").filter(|b| !b.is_null());
        if let Some(b) = body {
            fields.push(("body".to_string(), b.clone()));
        }
        let mut rendered = match renderer.render_fields(fields, vars).await {
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
        match self.prepare(job, &url_text, &headers, body.as_ref()) {
            Ok(request) => self.send(request).await,
            Err(error) => Outcome::permanent(error),
        }
    }

    /// The request from the rendered URL, string header values and body.
    fn prepare(
        &self,
        job: &Job,
        url_text: &str,
        rendered_headers: &[(String, String)],
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
                let value = match value {
                    Json::String(_) => rendered_headers
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default(),
                    Json::Null => continue,
                    other => other.to_string(),
                };
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("invalid header name {name:?}"))?;
                let value = HeaderValue::from_str(&value)
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn restricted_addresses() {
        for (a, why) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "private (shared address space)"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fd00::1", "private (unique local)"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "NAT64 of a restricted IPv4 address"),
            ("64:ff9b::7f00:1", "NAT64 of a restricted IPv4 address"),
            // 6to4 wrapping private, loopback, link-local IPv4
            ("2002:0a00:0001::1", "6to4 of a restricted IPv4 address"),
            ("2002:7f00:0001::", "6to4 of a restricted IPv4 address"),
            ("2002:a9fe:a9fe:1::5", "6to4 of a restricted IPv4 address"),
            ("2002:c0a8:0101::1", "6to4 of a restricted IPv4 address"),
            // Teredo: the IPv4 address inside is obfuscated, so all of it
            (
                "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                "Teredo (tunnels to an IPv4 address)",
            ),
            ("2001::1", "Teredo (tunnels to an IPv4 address)"),
            // local-use NAT64, whatever it wraps
            ("64:ff9b:1::a00:1", "local-use NAT64 (RFC 8215)"),
            ("64:ff9b:1:ffff::808:808", "local-use NAT64 (RFC 8215)"),
            ("64:ff9b:0:1::1", "NAT64 (not the well-known /96 form)"),
            // IPv4-compatible (deprecated) and SIIT-translated forms
            ("::10.0.0.1", "reserved (IPv4-compatible or -translated)"),
            ("::8.8.8.8", "reserved (IPv4-compatible or -translated)"),
            ("::102", "reserved (IPv4-compatible or -translated)"),
            (
                "::ffff:0:10.0.0.1",
                "reserved (IPv4-compatible or -translated)",
            ),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:0.0.0.0", "unspecified"),
            ("2001:db8::1", "reserved (documentation)"),
            ("100::1", "reserved (discard-only)"),
            ("192.0.2.10", "reserved (documentation)"),
        ] {
            assert_eq!(restricted(ip(a)), Some(why), "{a}");
        }
        for a in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "93.184.216.34",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
            "2001:4860:4860::8888",
            "2001:1::1",
        ] {
            assert_eq!(restricted(ip(a)), None, "{a}");
        }
        // listed, the embedded IPv4 address counts too
        let allow = AllowList::parse("10.0.0.0/8, 2001::/32").unwrap();
        for a in [
            "2002:0a00:0001::1",
            "64:ff9b::a00:1",
            "::ffff:10.0.0.1",
            "2001:0:4136:e378::1",
        ] {
            assert!(allow.check("h", &[ip(a)]).is_ok(), "{a}");
        }
        assert!(allow.check("h", &[ip("2002:c0a8:0101::1")]).is_err());
    }

    #[test]
    fn cidr_matching() {
        let n = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(n.contains(ip("10.255.1.2")) && !n.contains(ip("11.0.0.1")));
        assert!(
            n.contains(ip("::ffff:10.1.1.1")),
            "IPv4-mapped addresses match IPv4 blocks"
        );
        let n = Cidr::parse("172.16.0.0/12").unwrap();
        assert!(n.contains(ip("172.31.0.1")) && !n.contains(ip("172.32.0.1")));
        let n = Cidr::parse("192.168.1.128/25").unwrap();
        assert!(n.contains(ip("192.168.1.200")) && !n.contains(ip("192.168.1.127")));
        let n = Cidr::parse("127.0.0.1").unwrap();
        assert!(n.contains(ip("127.0.0.1")) && !n.contains(ip("127.0.0.2")));
        let n = Cidr::parse("fd00::/8").unwrap();
        assert!(
            n.contains(ip("fd12::1")) && !n.contains(ip("fe80::1")) && !n.contains(ip("10.0.0.1"))
        );
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("::1")));
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "x/8", "10.0.0.0/-1"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allow_list() {
        let allow = AllowList::parse(" 127.0.0.1, 10.0.0.0/8 ,crm.internal., [::1]").unwrap();
        assert_eq!(
            allow.to_string(),
            "crm.internal,127.0.0.1/32,10.0.0.0/8,::1/128"
        );
        assert_eq!(
            allow.check("localhost", &[ip("127.0.0.1")]).unwrap(),
            vec![ip("127.0.0.1")]
        );
        assert!(allow.check("x", &[ip("127.0.0.2")]).is_err());
        assert!(allow.check("CRM.internal", &[ip("192.168.0.1")]).is_ok());
        // public addresses pass; restricted ones are dropped from a mixed answer
        assert_eq!(
            allow
                .check("mixed", &[ip("192.168.0.1"), ip("8.8.8.8")])
                .unwrap(),
            vec![ip("8.8.8.8")]
        );
        let e = AllowList::default()
            .check("evil.test", &[ip("169.254.169.254")])
            .unwrap_err()
            .0;
        assert!(
            e.contains("evil.test")
                && e.contains("169.254.169.254 is link-local")
                && e.contains("HERALD_WEBHOOK_ALLOW"),
            "{e}"
        );
        assert!(AllowList::default().check("nothing", &[]).is_err());
        assert!(AllowList::parse("10.0.0.0/40").is_err());
        assert!(AllowList::parse("bad host!").is_err());
        assert_eq!(AllowList::parse("").unwrap(), AllowList::default());
    }

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

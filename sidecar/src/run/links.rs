//! Signed links for the HTTP side: one-click unsubscribe, the open pixel and click redirects.
//!
//! A token is `base64url(JSON claims) "." base64url(HMAC-SHA256(secret, first part))`. The claims say
//! what the link may do (purpose), for whom (workspace, recipient, the message's dedupe key, broadcast
//! and variation) and, for a click, the one URL it may redirect to — so a token cannot be forged, turned
//! into another purpose, or used as an open redirect to anywhere else. Verification is constant-time.
//! The Message-ID lives here too: a link names its message by the same job, workspace and dedupe key.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `<{job id, 16 hex digits}.{sha256(workspace + "\n" + dedupe_key) hex[..32]}@herald>`: the same for
/// every attempt of a job, so a copy sent again after a crash is recognisable. The workspace is in the
/// hash because dedupe keys are unique per workspace only (two workspaces may both `send()` with key
/// "order-42"), and a bounce that names a Message-ID must name one message.
///
/// The job id leads so that Message-IDs grow with time: `message_history_message_id_idx` (how bounces
/// and complaints find their message) then takes each new entry at its right edge. Led by the hash, each
/// entry went to a random leaf of an index as large as the history, and each such leaf's first change
/// after a checkpoint wrote a full 8 KB page image to the WAL: the largest single source of full-page
/// images in the soak, growing with the history (docs/ARCHITECTURE.md, *Where the soak's WAL goes*).
/// `job: None` is the form before 0.9.0 (hash only), for links signed before it, whose claims carry no
/// job id and whose messages were recorded under that form.
pub fn message_id(workspace: &str, dedupe_key: &str, job: Option<i64>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(workspace.as_bytes());
    hasher.update(b"\n");
    hasher.update(dedupe_key.as_bytes());
    let digest = hex::encode(hasher.finalize());
    match job {
        Some(job) => format!("<{job:016x}.{}@herald>", &digest[..32]),
        None => format!("<{}@herald>", &digest[..32]),
    }
}

/// What a link does when followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purpose {
    #[serde(rename = "u")]
    Unsubscribe,
    #[serde(rename = "o")]
    Open,
    #[serde(rename = "c")]
    Click,
}

/// The claims a token carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(rename = "p")]
    pub purpose: Purpose,
    #[serde(rename = "w")]
    pub workspace: String,
    #[serde(rename = "e")]
    pub email: String,
    /// The message's dedupe key (its Message-ID derives from it).
    #[serde(rename = "k")]
    pub key: String,
    /// The message's job (its Message-ID begins with it); absent in links signed before 0.9.0.
    #[serde(rename = "j", default, skip_serializing_if = "Option::is_none")]
    pub job: Option<i64>,
    #[serde(rename = "b", default, skip_serializing_if = "Option::is_none")]
    pub broadcast: Option<i64>,
    #[serde(rename = "v", default, skip_serializing_if = "Option::is_none")]
    pub variation: Option<String>,
    /// Click links only: where to send the reader.
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// Why a token was refused (shown to the client as a plain 400/404, never with details of the key).
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    BadSignature,
    WrongPurpose,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refused::Malformed => "malformed link",
            Refused::BadSignature => "link signature does not match",
            Refused::WrongPurpose => "link is not for this",
        })
    }
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length")
}

pub fn sign(secret: &[u8], claims: &Claims) -> String {
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialise"));
    let mut m = mac(secret);
    m.update(body.as_bytes());
    format!(
        "{body}.{}",
        URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
    )
}

pub fn verify(secret: &[u8], token: &str, purpose: Purpose) -> Result<Claims, Refused> {
    let (body, sig) = token.split_once('.').ok_or(Refused::Malformed)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| Refused::Malformed)?;
    let mut m = mac(secret);
    m.update(body.as_bytes());
    m.verify_slice(&sig).map_err(|_| Refused::BadSignature)?;
    let raw = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| Refused::Malformed)?;
    let claims: Claims = serde_json::from_slice(&raw).map_err(|_| Refused::Malformed)?;
    if claims.purpose != purpose || (purpose == Purpose::Click) != claims.url.is_some() {
        return Err(Refused::WrongPurpose);
    }
    Ok(claims)
}

/// The form of a link target herald signs and redirects to: parsed and re-serialised by a real URL
/// parser (WHATWG, the `url` crate), which drops tabs and line breaks and percent-encodes other
/// control bytes and spaces; only absolute http(s) URLs with a host. `None`: not a link herald follows.
pub fn normalise_url(raw: &str) -> Option<String> {
    let url = url::Url::parse(raw.trim()).ok()?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return None;
    }
    let text = url.to_string();
    // the serialisation is ASCII without controls; checked anyway, as it goes into a header
    is_header_safe(&text).then_some(text)
}

/// Whether a value may go into an HTTP or mail header as it is: no CR, LF or other control bytes.
pub fn is_header_safe(value: &str) -> bool {
    !value.bytes().any(|b| b.is_ascii_control() && b != b'\t')
}

/// The workspace a token claims, read WITHOUT verifying it: only to pick the keys to verify it with.
pub fn claimed_workspace(token: &str) -> Option<String> {
    let (body, _) = token.split_once('.')?;
    let raw = URL_SAFE_NO_PAD.decode(body).ok()?;
    serde_json::from_slice::<Claims>(&raw)
        .ok()
        .map(|c| c.workspace)
}

/// Verifies with each key in turn (a workspace's current link key, then the previous one during a
/// rotation); the refusal is the current key's.
pub fn verify_any<'k>(
    keys: impl IntoIterator<Item = &'k [u8]>,
    token: &str,
    purpose: Purpose,
) -> Result<Claims, Refused> {
    let mut first = None;
    for key in keys {
        match verify(key, token, purpose) {
            Ok(c) => return Ok(c),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    Err(first.unwrap_or(Refused::BadSignature))
}

/// Rewrites every `href="http(s)://…"` (double or single quotes) of an HTML body to a signed click
/// link built by `link(url)`; other hrefs (mailto:, #anchors, relative) stay as they are.
pub fn rewrite_links(html: &str, mut link: impl FnMut(&str) -> String) -> String {
    let mut out = String::with_capacity(html.len() + 256);
    let mut rest = html;
    while let Some(at) = find_href(rest) {
        let (before, after) = rest.split_at(at.start);
        out.push_str(before);
        let quote = at.quote;
        let value_start = at.value_start - at.start;
        let value_end = after[value_start..].find(quote).map(|i| value_start + i);
        let Some(value_end) = value_end else {
            out.push_str(after);
            return out;
        };
        let url = &after[value_start..value_end];
        out.push_str(&after[..value_start]);
        // attribute values are HTML: the template engine escapes "/" and "&" in variables it inserts
        let decoded = super::render::decode_entities(url);
        let absolute = decoded.trim_start();
        let normalised = (absolute.starts_with("http://") || absolute.starts_with("https://"))
            .then(|| normalise_url(absolute))
            .flatten();
        match normalised {
            // signed in its normalised form: the redirect sends the reader to exactly that
            Some(target) => out.push_str(&link(&target).replace('&', "&amp;")),
            None => out.push_str(url),
        }
        rest = &after[value_end..];
    }
    out.push_str(rest);
    out
}

struct Href {
    start: usize,
    value_start: usize,
    quote: char,
}

/// The next `href=` attribute (case-insensitive) followed by a quoted value.
/// Scans the bytes in place: called once per link, so copying (lower-casing) the rest of the body on
/// every call would make a long message quadratic.
fn find_href(s: &str) -> Option<Href> {
    let bytes = s.as_bytes();
    let mut from = 0;
    while let Some(i) = bytes[from..]
        .windows(4)
        .position(|w| w.eq_ignore_ascii_case(b"href"))
    {
        let start = from + i;
        let mut j = start + 4;
        while j < bytes.len() && bytes[j].is_ascii_whitespace() {
            j += 1;
        }
        if j < bytes.len() && bytes[j] == b'=' {
            j += 1;
            while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                j += 1;
            }
            if j < bytes.len() && (bytes[j] == b'"' || bytes[j] == b'\'') {
                return Some(Href {
                    start,
                    value_start: j + 1,
                    quote: bytes[j] as char,
                });
            }
        }
        from = start + 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"a link secret";

    fn claims(purpose: Purpose, url: Option<&str>) -> Claims {
        Claims {
            purpose,
            workspace: "w".into(),
            email: "ann@example.com".into(),
            key: "b:7:42".into(),
            job: Some(4_242),
            broadcast: Some(7),
            variation: Some("a".into()),
            url: url.map(str::to_string),
        }
    }

    #[test]
    fn tokens_round_trip() {
        for (p, u) in [
            (Purpose::Unsubscribe, None),
            (Purpose::Open, None),
            (Purpose::Click, Some("https://example.com/x?a=1&b=2")),
        ] {
            let c = claims(p, u);
            assert_eq!(verify(KEY, &sign(KEY, &c), p), Ok(c));
        }
    }

    /// Links in messages sent before 0.9.0 carry no job id: they still verify, and name their
    /// message by the Message-ID of that time.
    #[test]
    fn tokens_signed_before_job_ids_still_verify() {
        let body =
            URL_SAFE_NO_PAD.encode(r#"{"p":"o","w":"w","e":"ann@example.com","k":"b:7:42","b":7}"#);
        let mut m = mac(KEY);
        m.update(body.as_bytes());
        let token = format!(
            "{body}.{}",
            URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
        );
        let c = verify(KEY, &token, Purpose::Open).expect("an old token verifies");
        assert_eq!(c.job, None);
        assert_eq!(
            message_id(&c.workspace, &c.key, c.job),
            message_id("w", "b:7:42", None)
        );
    }

    #[test]
    fn forged_tampered_and_repurposed_tokens_are_refused() {
        let t = sign(KEY, &claims(Purpose::Click, Some("https://example.com/")));
        assert_eq!(
            verify(b"another key", &t, Purpose::Click),
            Err(Refused::BadSignature)
        );
        // swap in claims pointing elsewhere, keep the old signature
        let (_, sig) = t.split_once('.').unwrap();
        let evil = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&claims(Purpose::Click, Some("https://evil.example/"))).unwrap(),
        );
        assert_eq!(
            verify(KEY, &format!("{evil}.{sig}"), Purpose::Click),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            verify(KEY, &t, Purpose::Unsubscribe),
            Err(Refused::WrongPurpose)
        );
        assert_eq!(verify(KEY, "nodot", Purpose::Open), Err(Refused::Malformed));
        assert_eq!(
            verify(KEY, &t[..t.len() - 3], Purpose::Click),
            Err(Refused::BadSignature)
        );
        // a click claim without a URL is not a click link
        let t = sign(KEY, &claims(Purpose::Click, None));
        assert_eq!(verify(KEY, &t, Purpose::Click), Err(Refused::WrongPurpose));
    }

    #[test]
    fn link_targets_are_normalised_and_never_carry_line_breaks() {
        for (raw, want) in [
            ("https://a.example/x?y=1", Some("https://a.example/x?y=1")),
            ("HTTPS://A.Example", Some("https://a.example/")),
            (" https://a.example/p q", Some("https://a.example/p%20q")),
            // the reported injection: a contact attribute with CR/LF inside a link
            (
                "https://a.example/x\r\nSet-Cookie: a=b",
                Some("https://a.example/xSet-Cookie:%20a=b"),
            ),
            (
                "https://a.example/\u{1}\u{7f}",
                Some("https://a.example/%01%7F"),
            ),
            ("javascript:alert(1)", None),
            ("ftp://a.example/", None),
            ("https://", None),
            ("/relative", None),
        ] {
            let got = normalise_url(raw);
            assert_eq!(got.as_deref(), want, "{raw:?}");
            if let Some(g) = got {
                assert!(is_header_safe(&g), "{g:?}");
            }
        }
        assert!(!is_header_safe("a\r\nb") && !is_header_safe("a\u{0}") && is_header_safe("a b"));
        let html = "<a href=\"https://a.example/x\r\nLocation: https://evil.example\">x</a>";
        let mut seen = Vec::new();
        rewrite_links(html, |u| {
            seen.push(u.to_string());
            String::new()
        });
        assert_eq!(
            seen,
            ["https://a.example/xLocation:%20https://evil.example"]
        );
    }

    #[test]
    fn rotation_previous_keys_still_verify() {
        let old: &[u8] = b"the previous link key";
        let new: &[u8] = b"the current link key!";
        let c = claims(Purpose::Unsubscribe, None);
        let signed_before = sign(old, &c);
        let signed_after = sign(new, &c);
        assert_eq!(claimed_workspace(&signed_before).as_deref(), Some("w"));
        // during the rotation both verify
        for t in [&signed_before, &signed_after] {
            assert_eq!(
                verify_any([new, old], t, Purpose::Unsubscribe),
                Ok(c.clone())
            );
        }
        // after it, the old one no longer does
        assert_eq!(
            verify_any([new], &signed_before, Purpose::Unsubscribe),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            verify_any([new, old], &signed_after, Purpose::Open),
            Err(Refused::WrongPurpose)
        );
        assert_eq!(
            verify_any(
                std::iter::empty::<&[u8]>(),
                &signed_after,
                Purpose::Unsubscribe
            ),
            Err(Refused::BadSignature)
        );
        assert_eq!(claimed_workspace("garbage"), None);
    }

    #[test]
    fn only_absolute_http_links_are_rewritten() {
        let html = r##"<a href="https://a.example/x?y=1&amp;z=2">A</a> <A HREF='http:&#x2f;&#x2f;b.example'>B</A>
<a href="mailto:x@example.com">m</a> <a href="#top">t</a> <a href = "/rel">r</a>"##;
        let out = rewrite_links(html, |u| format!("https://t.example/c/{}", u.len()));
        assert!(out.contains(r#"href="https://t.example/c/27""#), "{out}");
        // normalised: "http://b.example" is "http://b.example/"
        assert!(out.contains("HREF='https://t.example/c/17'"), "{out}");
        assert!(out.contains(r#"href="mailto:x@example.com""#));
        assert!(out.contains(r##"href="#top""##));
        assert!(out.contains(r#"href = "/rel""#));
    }
}

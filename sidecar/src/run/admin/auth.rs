//! Who may use the admin page: the password check, sessions in a signed cookie, the per-session form
//! token (CSRF) and the Origin check of every POST. Pure functions of their inputs (the clock is
//! passed in), unit-tested here.
//!
//! - The session cookie is `base64url(claims).base64url(HMAC-SHA256(session key, claims))`; claims
//!   are the operator's name, the expiry (Unix seconds) and a random nonce. The session key is
//!   derived from the link key and the admin password (HMAC(link key, "herald admin session" ‖
//!   password)): every daemon sharing the settings accepts the same cookies, a cookie says nothing
//!   about the password without the link key, and changing either signs every operator out.
//! - The form token is HMAC(session key, "csrf" ‖ nonce): one per session, never stored, checked
//!   on every POST in constant time; a POST must also come from the page's own origin (`Origin`,
//!   else `Sec-Fetch-Site`), so another site cannot submit a form even with a guessed token.
//! - Cookie attributes: HttpOnly, SameSite=Strict, Path = the page's path, Max-Age = the session's
//!   life, Secure when the public URL is https.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The cookie's name.
pub const COOKIE: &str = "herald_admin";
/// How long a session lasts after signing in.
pub const SESSION_SECONDS: i64 = 12 * 3600;
/// The longest operator name taken (it is recorded with approvals).
pub const MAX_NAME: usize = 64;

/// A signed-in operator.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Session {
    #[serde(rename = "n")]
    pub name: String,
    /// Unix seconds.
    #[serde(rename = "x")]
    pub expires: i64,
    #[serde(rename = "r")]
    pub nonce: String,
    /// When it was issued, Unix milliseconds: what "sign out everyone" compares with (a cookie from
    /// before 0.15.0 has none: 0, issued before any sign-out).
    #[serde(rename = "i", default)]
    pub issued_ms: i64,
}

/// The keys of the admin page, derived once at start.
pub struct Keyring {
    session: Vec<u8>,
    password_mac: Vec<u8>,
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length")
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = mac(key);
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

/// Equal in time independent of where they differ (the length is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 16 random bytes, hex (from the kernel's generator).
pub fn random_hex() -> String {
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("/dev/urandom is readable");
    hex::encode(bytes)
}

impl Keyring {
    pub fn new(link_key: &[u8], password: &str) -> Self {
        let session = hmac(link_key, &[b"herald admin session\0", password.as_bytes()]);
        let password_mac = hmac(&session, &[b"password\0", password.as_bytes()]);
        Self {
            session,
            password_mac,
        }
    }

    /// Whether `given` is the password: both sides through the same HMAC, compared in constant
    /// time (neither the length nor a prefix of the password shows in the timing).
    pub fn password_ok(&self, given: &str) -> bool {
        let given = hmac(&self.session, &[b"password\0", given.as_bytes()]);
        constant_time_eq(&given, &self.password_mac)
    }

    /// A new session for `name` (issued at `now_ms`, Unix milliseconds) and its cookie value.
    pub fn issue(&self, name: &str, now_ms: i64) -> (Session, String) {
        let session = Session {
            name: name.to_string(),
            expires: now_ms.div_euclid(1000) + SESSION_SECONDS,
            nonce: random_hex(),
            issued_ms: now_ms,
        };
        let value = self.seal(&session);
        (session, value)
    }

    fn seal(&self, session: &Session) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(session).expect("serialises"));
        let sig = hmac(&self.session, &[b"cookie\0", body.as_bytes()]);
        format!("{body}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// The session a cookie value carries, if it is ours, intact and not expired.
    pub fn open(&self, value: &str, now: i64) -> Option<Session> {
        let (body, sig) = value.split_once('.')?;
        let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
        let mut m = mac(&self.session);
        m.update(b"cookie\0");
        m.update(body.as_bytes());
        m.verify_slice(&sig).ok()?;
        let session: Session = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()?;
        (session.expires > now && valid_name(&session.name)).then_some(session)
    }

    /// The session's form token.
    pub fn csrf(&self, session: &Session) -> String {
        hex::encode(hmac(&self.session, &[b"csrf\0", session.nonce.as_bytes()]))
    }

    /// Whether a form carried the session's token (constant time).
    pub fn csrf_ok(&self, session: &Session, given: Option<&str>) -> bool {
        let expected = self.csrf(session);
        given.is_some_and(|g| constant_time_eq(g.as_bytes(), expected.as_bytes()))
    }
}

/// An operator name as the login form takes it: 1–64 characters, no control characters, not only
/// spaces.
pub fn valid_name(name: &str) -> bool {
    !name.trim().is_empty()
        && name.chars().count() <= MAX_NAME
        && !name.chars().any(char::is_control)
}

/// Whether a POST comes from the page itself. A browser names the page that sent a form in
/// `Origin`: it must be the public URL's origin, or the origin of the host the request was sent to
/// (the page opened by another address than the public URL; a cross-site form never has its own
/// origin there). Without `Origin`, `Sec-Fetch-Site` (when sent) must say same-origin. Clients that
/// send neither (not a browser) still need the form token.
pub fn origin_ok(
    origin: Option<&str>,
    sec_fetch_site: Option<&str>,
    host: Option<&str>,
    public_origin: &str,
) -> bool {
    match origin {
        Some("null") => false,
        Some(o) => {
            o.eq_ignore_ascii_case(public_origin)
                || host.is_some_and(|h| {
                    o.split_once("://")
                        .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(h))
                })
        }
        None => sec_fetch_site.is_none_or(|s| s == "same-origin" || s == "none"),
    }
}

/// The `Set-Cookie` value that stores a session (or, with `value` None, removes it).
pub fn set_cookie(value: Option<&str>, path: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match value {
        Some(v) => format!(
            "{COOKIE}={v}; Path={path}; Max-Age={SESSION_SECONDS}; HttpOnly; SameSite=Strict{secure}"
        ),
        None => format!("{COOKIE}=; Path={path}; Max-Age=0; HttpOnly; SameSite=Strict{secure}"),
    }
}

/// The session cookie's value among a request's `Cookie` headers.
pub fn cookie_value<'a>(headers: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    headers
        .flat_map(|h| h.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_900_000_000;

    fn keys() -> Keyring {
        Keyring::new(b"a-link-key-for-tests", "correct horse battery")
    }

    #[test]
    fn cookies_round_trip_and_refuse_tampering_expiry_and_other_keys() {
        let k = keys();
        let (session, value) = k.issue("Ann Operator", NOW * 1000);
        assert_eq!(session.expires, NOW + SESSION_SECONDS);
        assert_eq!(k.open(&value, NOW + 10), Some(session.clone()));
        // expired
        assert_eq!(k.open(&value, NOW + SESSION_SECONDS), None);
        // another password or link key: not ours
        assert_eq!(
            Keyring::new(b"a-link-key-for-tests", "another one!").open(&value, NOW),
            None
        );
        assert_eq!(
            Keyring::new(b"another-link-key-xx", "correct horse battery").open(&value, NOW),
            None
        );
        // a changed name (re-encoded claims with the old signature)
        let (_, sig) = value.split_once('.').unwrap();
        let forged = Session {
            name: "Mallory".into(),
            ..session.clone()
        };
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(k.open(&format!("{body}.{sig}"), NOW), None);
        // a longer expiry signed by us is fine; garbage is not
        for bad in ["", ".", "x.y", "no-dot", &value[..value.len() - 2]] {
            assert_eq!(k.open(bad, NOW), None, "{bad}");
        }
        // two sessions of the same name differ (nonce), and so do their form tokens
        let (other, _) = k.issue("Ann Operator", NOW * 1000);
        assert_ne!(other.nonce, session.nonce);
        assert_ne!(k.csrf(&other), k.csrf(&session));
    }

    #[test]
    fn csrf_tokens_are_per_session_and_checked() {
        let k = keys();
        let (session, _) = k.issue("ann", NOW * 1000);
        let token = k.csrf(&session);
        assert_eq!(token.len(), 64);
        assert!(k.csrf_ok(&session, Some(&token)));
        assert!(!k.csrf_ok(&session, None));
        assert!(!k.csrf_ok(&session, Some("")));
        assert!(!k.csrf_ok(&session, Some(&token[..63])));
        let mut flipped = token.clone().into_bytes();
        flipped[10] = if flipped[10] == b'a' { b'b' } else { b'a' };
        assert!(!k.csrf_ok(&session, Some(std::str::from_utf8(&flipped).unwrap())));
        // another session's token is not this one's
        let (other, _) = k.issue("ann", NOW * 1000);
        assert!(!k.csrf_ok(&session, Some(&k.csrf(&other))));
    }

    #[test]
    fn password_and_constant_time_comparison() {
        let k = keys();
        assert!(k.password_ok("correct horse battery"));
        for wrong in [
            "",
            "correct horse batter",
            "correct horse battery ",
            "CORRECT HORSE BATTERY",
        ] {
            assert!(!k.password_ok(wrong), "{wrong}");
        }
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn posts_must_come_from_the_page() {
        let public = "https://mail.example.com";
        let host = Some("mail.example.com");
        assert!(origin_ok(
            Some("https://mail.example.com"),
            None,
            host,
            public
        ));
        assert!(origin_ok(
            Some("https://MAIL.example.com"),
            None,
            host,
            public
        ));
        // the page opened at the daemon's own address
        assert!(origin_ok(
            Some("http://10.0.0.5:8080"),
            None,
            Some("10.0.0.5:8080"),
            public
        ));
        assert!(!origin_ok(Some("https://evil.example"), None, host, public));
        assert!(!origin_ok(
            Some("https://mail.example.com.evil.example"),
            None,
            host,
            public
        ));
        assert!(!origin_ok(Some("null"), None, host, public));
        assert!(origin_ok(None, Some("same-origin"), host, public));
        assert!(!origin_ok(None, Some("cross-site"), host, public));
        assert!(!origin_ok(None, Some("same-site"), host, public));
        assert!(
            origin_ok(None, None, host, public),
            "not a browser: the token decides"
        );
    }

    #[test]
    fn names_and_cookie_headers() {
        assert!(valid_name("Ann O'Neil"));
        assert!(!valid_name("   "));
        assert!(!valid_name("a\nb"));
        assert!(!valid_name(&"x".repeat(65)));
        assert_eq!(
            set_cookie(Some("v.s"), "/mail/admin", true),
            "herald_admin=v.s; Path=/mail/admin; Max-Age=43200; HttpOnly; SameSite=Strict; Secure"
        );
        assert_eq!(
            set_cookie(None, "/admin", false),
            "herald_admin=; Path=/admin; Max-Age=0; HttpOnly; SameSite=Strict"
        );
        let headers = ["theme=dark; herald_admin=abc.def", "other=1"];
        assert_eq!(cookie_value(headers.into_iter()), Some("abc.def"));
        assert_eq!(cookie_value(["x=1"].into_iter()), None);
    }
}

//! POST /events/<format>: what providers report back (bounces, complaints, unsubscribes), turned into
//! `record_feedback` entries. Formats: `generic` (herald's own JSON) and `sendgrid` (SendGrid's event
//! webhook). Credentials: an events token (`Authorization: Bearer`, or Basic with the token as
//! password), or for SendGrid with a verification key, SendGrid's signature instead (`sendgrid.rs`).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Value as Json};

use super::App;
use crate::run::config::{constant_time_eq, HttpSide, TokenScope};
use crate::run::sendgrid::{self, verify_sendgrid, SendgridRefusal};

pub async fn receive(
    State(app): State<App>,
    Path(format): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // `?workspace=`: whom the entries that name no workspace are for, and for SendGrid whose key
    // checks the signature
    let named = query
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| {
            kv.strip_prefix("workspace=").map(|w| {
                percent_encoding::percent_decode_str(w)
                    .decode_utf8_lossy()
                    .to_string()
            })
        });
    let scope = match scope(&headers, &format, named.as_deref(), &body, &app.side) {
        Ok(scope) => scope,
        Err(refused) => return refused.into_response(),
    };
    let Ok(body) = serde_json::from_slice::<Json>(&body) else {
        return (StatusCode::BAD_REQUEST, "the body is not JSON\n").into_response();
    };
    let only = match &scope {
        TokenScope::All => None,
        TokenScope::Workspace(w) => Some(w.clone()),
    };
    // a workspace's token: its entries are that workspace's unless they name another (then skipped)
    let workspace = only.clone().or(named);
    let entries = match format.as_str() {
        "generic" => generic_events(&body),
        "sendgrid" => sendgrid_events(&body),
        _ => {
            return (
                StatusCode::NOT_FOUND,
                "formats: /events/generic, /events/sendgrid\n",
            )
                .into_response()
        }
    };
    let entries = match entries {
        Ok(e) => e,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
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
    match app
        .recorder
        .record(Json::Array(feedback), only.as_deref())
        .await
    {
        Ok(recorded) => (
            [(CONTENT_TYPE, "application/json")],
            json!({"received": received, "recorded": recorded}).to_string(),
        )
            .into_response(),
        Err(e) => e.respond("provider events"),
    }
}

/// Why a request to /events/… was not let in.
enum Refused {
    /// No events token is configured, so the endpoint is off.
    Off,
    Unauthorized,
    Sendgrid(SendgridRefusal),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Self::Off => (
                StatusCode::NOT_FOUND,
                "provider events are off (no HERALD_EVENTS_TOKEN)\n".to_string(),
            ),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "missing or wrong token (Authorization: Bearer <token>, or Basic with the token as password)\n".to_string(),
            ),
            Self::Sendgrid(refusal) => (refusal.status(), format!("{refusal}\n")),
        }
        .into_response()
    }
}

/// Who may post provider events, and for which workspaces: with a SendGrid verification key,
/// /events/sendgrid takes SendGrid's signature instead of a token (the signature also proves the body
/// was not altered, and SendGrid sends it whatever the webhook URL holds): a workspace's own key
/// (`?workspace=<ws>` names it) speaks for that workspace only, the default key for every workspace.
/// Every other case needs an events token: the default one (every workspace) or a workspace's own
/// (that workspace only), current or previous.
fn scope(
    headers: &HeaderMap,
    format: &str,
    named: Option<&str>,
    body: &[u8],
    side: &HttpSide,
) -> Result<TokenScope, Refused> {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if format == "sendgrid" {
        // the workspace's own key first, then the default one (which speaks for every workspace)
        let own = named.and_then(|ws| {
            let key = side.sendgrid_workspace_keys.get(ws)?;
            Some((TokenScope::Workspace(ws.to_string()), key))
        });
        let default = side.sendgrid_key.as_ref().map(|key| (TokenScope::All, key));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let mut refused = None;
        for (scope, key) in own.into_iter().chain(default) {
            match verify_sendgrid(
                key,
                header(sendgrid::SIGNATURE_HEADER),
                header(sendgrid::TIMESTAMP_HEADER),
                body,
                now,
            ) {
                Ok(()) => return Ok(scope),
                Err(refusal) => {
                    refused.get_or_insert(refusal);
                }
            }
        }
        if let Some(refusal) = refused {
            tracing::info!(reason = %refusal, "http: SendGrid events refused");
            return Err(Refused::Sendgrid(refusal));
        }
    }
    if !side.keys.has_events_tokens() {
        return Err(Refused::Off);
    }
    let given = header(AUTHORIZATION.as_str());
    side.keys
        .events_scope(|token| authorized(given, token))
        .ok_or(Refused::Unauthorized)
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

#[cfg(test)]
mod tests {
    use super::*;

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

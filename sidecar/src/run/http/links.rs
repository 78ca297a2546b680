//! The routes behind the links in every email (signed by `run::links`): the unsubscribe page and its
//! RFC 8058 one-click POST, the open pixel and click redirects. A forged or altered token is refused
//! and records nothing; a valid one records its fact with one `record_feedback` call.

use axum::extract::{Path, Request, State};
use axum::http::header::{CONTENT_TYPE, LOCATION};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use serde_json::{json, Value as Json};

use super::one_click::is_one_click;
use super::App;
use crate::run::config::HttpSide;
use crate::run::links::{self, message_id, Claims, Purpose};

/// A transparent 1×1 GIF.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// A link token verified with its workspace's link keys (current, then previous during a rotation).
fn verify(side: &HttpSide, token: &str, purpose: Purpose) -> Result<Claims, links::Refused> {
    let workspace = links::claimed_workspace(token).ok_or(links::Refused::Malformed)?;
    links::verify_any(side.keys.link(&workspace).verifying(), token, purpose)
}

fn refused(e: links::Refused) -> Response {
    (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
}

/// GET /u/<token>: a confirmation page. It changes nothing: link scanners follow GETs.
pub async fn confirm(State(app): State<App>, Path(token): Path<String>) -> Response {
    match verify(&app.side, &token, Purpose::Unsubscribe) {
        Ok(c) => Html(confirm_page(&c)).into_response(),
        Err(e) => refused(e),
    }
}

/// POST /u/<token>: RFC 8058 one-click unsubscribe: suppress the address, event list.unsubscribed.
pub async fn unsubscribe(
    State(app): State<App>,
    Path(token): Path<String>,
    request: Request,
) -> Response {
    let c = match verify(&app.side, &token, Purpose::Unsubscribe) {
        Ok(c) => c,
        Err(e) => return refused(e),
    };
    match is_one_click(request).await {
        Ok(true) => {}
        Ok(false) => return (
            StatusCode::BAD_REQUEST,
            "a one-click unsubscribe carries List-Unsubscribe=One-Click in a form-urlencoded or multipart/form-data body (RFC 8058)\n",
        )
            .into_response(),
        Err(unreadable) => return unreadable,
    }
    let recorded = app
        .recorder
        .record(json!([feedback("unsubscribed", &c)]), Some(&c.workspace))
        .await;
    match recorded {
        Ok(_) => Html(page(
            "Unsubscribed",
            &format!("{} will not receive these emails again.", escape(&c.email)),
        ))
        .into_response(),
        Err(e) => e.respond("unsubscribe"),
    }
}

/// GET /o/<token>: the pixel, always (a mail client shows whatever it gets); only a valid token
/// records `email.opened`.
pub async fn open(State(app): State<App>, Path(token): Path<String>) -> Response {
    if let Ok(c) = verify(&app.side, &token, Purpose::Open) {
        let recorded = app
            .recorder
            .record(json!([feedback("opened", &c)]), Some(&c.workspace))
            .await;
        if let Err(e) = recorded {
            e.log("recording an open");
        }
    }
    ([(CONTENT_TYPE, "image/gif")], PIXEL).into_response()
}

/// GET /c/<token>: records `email.clicked`, then 302 to the URL signed into the token, and only
/// there (no open redirect).
pub async fn click(State(app): State<App>, Path(token): Path<String>) -> Response {
    let c = match verify(&app.side, &token, Purpose::Click) {
        Ok(c) => c,
        Err(e) => return refused(e),
    };
    // normalised again: a link signed before targets were normalised may hold anything
    let Some(url) = c.url.as_deref().and_then(links::normalise_url) else {
        return (
            StatusCode::BAD_REQUEST,
            "this link's target is not an http(s) URL herald can redirect to\n",
        )
            .into_response();
    };
    // every header built from data is checked: a CR/LF would start a header of its own
    if !links::is_header_safe(&url) {
        tracing::warn!("http: refused a Location with control characters");
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "refused: the redirect target holds control characters\n",
        )
            .into_response();
    }
    let recorded = app
        .recorder
        .record(json!([feedback("clicked", &c)]), Some(&c.workspace))
        .await;
    if let Err(e) = recorded {
        // the reader still gets where they wanted to go
        e.log("recording a click");
    }
    (StatusCode::FOUND, [(LOCATION, url)]).into_response()
}

/// One feedback entry for `herald.record_feedback` from a verified link.
fn feedback(kind: &str, c: &Claims) -> Json {
    json!({
        "kind": kind,
        "workspace": c.workspace,
        "email": c.email,
        "message_id": message_id(&c.workspace, &c.key, c.job),
        "payload": {"broadcast": c.broadcast, "variation": c.variation, "message": c.key, "url": c.url},
    })
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
    use axum::body::Body;

    /// The hidden field of the confirmation page, posted as a browser would.
    #[tokio::test]
    async fn the_confirmation_page_posts_one_click() {
        let page = confirm_page(&Claims {
            purpose: Purpose::Unsubscribe,
            workspace: "w".into(),
            email: "a@x.example".into(),
            key: "k".into(),
            job: None,
            broadcast: None,
            variation: None,
            url: None,
        });
        assert!(page.contains("<form method=\"post\">"));
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
        let request = Request::builder()
            .method("POST")
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(body))
            .expect("a valid request");
        assert_eq!(is_one_click(request).await.ok(), Some(true));
    }
}

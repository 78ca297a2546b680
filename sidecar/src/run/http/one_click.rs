//! RFC 8058's rule for a one-click unsubscribe: the POST carries the field
//! `List-Unsubscribe=One-Click`, as multipart/form-data (read by axum's multer-based parser) or
//! application/x-www-form-urlencoded (also assumed without a Content-Type). Anything else — an empty
//! POST from a link scanner, another media type, the value in another field — unsubscribes nobody.

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

const FIELD: &str = "List-Unsubscribe";
const VALUE: &str = "One-Click";

/// Whether the request's body says one-click. `Err`: the body could not be read (over the size
/// limit, cut short); the answer to send.
pub async fn is_one_click(request: Request) -> Result<bool, Response> {
    let media = request
        .headers()
        .get(CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or_default())
        .unwrap_or("application/x-www-form-urlencoded")
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "application/x-www-form-urlencoded" => {
            let body = Bytes::from_request(request, &())
                .await
                .map_err(IntoResponse::into_response)?;
            Ok(
                url::form_urlencoded::parse(&body)
                    .any(|(k, v)| k == FIELD && v.trim_end() == VALUE),
            )
        }
        "multipart/form-data" => {
            // no boundary, or not one the body uses: not a form this says anything in
            let Ok(mut form) = Multipart::from_request(request, &()).await else {
                return Ok(false);
            };
            loop {
                match form.next_field().await {
                    Ok(Some(field)) if field.name() == Some(FIELD) => match field.text().await {
                        Ok(value) if value.trim() == VALUE => return Ok(true),
                        Ok(_) => {}
                        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                            return Err(e.into_response())
                        }
                        Err(_) => return Ok(false),
                    },
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(false),
                    Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                        return Err(e.into_response())
                    }
                    Err(_) => return Ok(false),
                }
            }
        }
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    /// What a client would send: the body with that Content-Type (none when `None`).
    async fn says(content_type: Option<&str>, body: &[u8]) -> bool {
        let mut request = Request::builder().method("POST");
        if let Some(ct) = content_type {
            request = request.header(CONTENT_TYPE, ct);
        }
        let request = request
            .body(Body::from(body.to_vec()))
            .expect("a valid request");
        is_one_click(request).await.expect("a readable body")
    }

    #[tokio::test]
    async fn one_click_needs_the_rfc_8058_body() {
        let form = Some("application/x-www-form-urlencoded");
        assert!(says(form, b"List-Unsubscribe=One-Click").await);
        assert!(says(form, b"a=1&List-Unsubscribe=One-Click\r\n").await);
        assert!(
            says(
                Some("application/x-www-form-urlencoded; charset=UTF-8"),
                b"List-Unsubscribe=One%2DClick"
            )
            .await
        );
        // no Content-Type: read as a form
        assert!(says(None, b"List-Unsubscribe=One-Click").await);
        let multipart = b"--x\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--x--\r\n";
        assert!(says(Some("multipart/form-data; boundary=x"), multipart).await);
        assert!(says(Some("Multipart/Form-Data; boundary=\"x\""), multipart).await);
        for body in [
            &b""[..],
            b"List-Unsubscribe=Other",
            b"One-Click",
            b"List-Unsubscribe=One-Click-Now",
            b"list-unsubscribe=One-Click",
        ] {
            assert!(!says(form, body).await, "{}", String::from_utf8_lossy(body));
        }
        // the right words in the wrong media type, or in the wrong multipart field
        assert!(!says(Some("application/json"), b"List-Unsubscribe=One-Click").await);
        assert!(
            !says(Some("multipart/form-data"), multipart).await,
            "no boundary"
        );
        assert!(!says(Some("multipart/form-data; boundary=y"), multipart).await);
        let other_field = b"--x\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nNo\r\n--x\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nOne-Click\r\n--x--\r\n";
        assert!(!says(Some("multipart/form-data; boundary=x"), other_field).await);
        assert!(
            !says(
                Some("multipart/form-data; boundary=x"),
                b"List-Unsubscribe=One-Click"
            )
            .await
        );
    }
}

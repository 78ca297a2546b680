//! The API's errors, all as JSON: `{"error": {"message", "hint", "detail", "code"}}`. A refusal by
//! the database carries the SQL error's own message, hint and detail (what a SQL user of the same
//! function reads) and its SQLSTATE as `code`; the daemon's own refusals (the request's form) have a
//! word as `code` (`unauthorized`, `rate_limited`, `invalid_json`, `too_deep`, `unknown_field`,
//! `batch_too_large`, `not_found`, `unavailable`, `internal`, `extension_too_old`).

use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::run::database::DbError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub hint: Option<String>,
    pub detail: Option<String>,
    pub code: String,
    /// Seconds for a Retry-After header (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            hint: None,
            detail: None,
            code: code.into(),
            retry_after: None,
        }
    }

    fn with_hint(mut self, hint: Option<&str>) -> Self {
        self.hint = hint.map(str::to_string);
        self
    }

    pub fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message).with_hint(Some(
            "Send Authorization: Bearer hk_…, a key made by herald.create_api_key(workspace, name).",
        ))
    }

    pub fn bad_request(message: impl Into<String>, hint: Option<&str>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message).with_hint(hint)
    }

    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_json", message)
    }

    pub fn too_deep(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "too_deep", message)
    }

    pub fn unknown_field(message: impl Into<String>, hint: Option<&str>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_field", message).with_hint(hint)
    }

    pub fn invalid(message: impl Into<String>, hint: Option<&str>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", message).with_hint(hint)
    }

    pub fn batch_too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large", message)
            .with_hint(Some("Split the batch into several requests."))
    }

    pub fn body_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the body is over 1 MiB",
        )
        .with_hint(Some("Split the batch into several requests."))
    }

    /// The key is over HERALD_API_RATE_PER_KEY: 429, with when to come back.
    pub fn rate_limited(refusal: String, retry_after: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", refusal)
        .with_hint(Some(
            "Retry after the seconds in the Retry-After header; send many events or contacts in one request (POST /v1/track/batch, /v1/contacts/batch).",
        ));
        e.retry_after = Some(retry_after);
        e
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
            .with_hint(Some("GET /v1/openapi.json lists the routes."))
    }

    /// The database's refusal of `operation`, or its absence (503, try again). An api_call that
    /// does not know the operation runs an extension older than this daemon (compat.rs: daemons may
    /// be upgraded first): a 501 that says so, not the 422 of a bad value.
    pub fn from_call(e: &DbError, operation: &str) -> Self {
        let unknown_operation = matches!(e, DbError::Pg(pg) if pg.as_db_error().is_some_and(|db| {
            db.code().code() == "22023"
                && db.message() == format!("unknown API operation '{operation}'")
        }));
        if !unknown_operation {
            return Self::from_db(e);
        }
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            "extension_too_old",
            format!(
                "this route needs a newer herald extension in the database: its herald.api_call does not know '{operation}'"
            ),
        )
        .with_hint(Some(
            "Update the extension to this daemon's version (ALTER EXTENSION herald UPDATE, as its owner). API keys read and subscribe to results from 0.16.0, and manage suppressions from 0.18.0.",
        ))
    }

    /// The database's refusal, or its absence (503, try again).
    fn from_db(e: &DbError) -> Self {
        let db = match e {
            DbError::Pg(pg) => pg.as_db_error(),
            DbError::Pool(_) => None,
        };
        match db {
            Some(db) if !e.is_connection_error() => {
                let code = db.code().code();
                let status = status_for(code);
                if status == StatusCode::INTERNAL_SERVER_ERROR {
                    // not a refusal of the request: the log says what, the client only that it failed
                    tracing::warn!(error = %e.describe(), "http api: a request failed");
                    return Self::new(status, code, "the request failed; please try again later");
                }
                Self {
                    status,
                    message: db.message().to_string(),
                    hint: db.hint().map(str::to_string),
                    detail: db.detail().map(str::to_string),
                    code: code.to_string(),
                    retry_after: None,
                }
            }
            _ => {
                tracing::debug!(error = %e.describe(), "http api: no database");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the database is not reachable now; please try again",
                )
            }
        }
    }
}

/// The HTTP status for a SQLSTATE the API functions raise.
pub fn status_for(sqlstate: &str) -> StatusCode {
    match sqlstate {
        // invalid_authorization_specification: an unknown or revoked key
        "28000" | "28P01" => StatusCode::UNAUTHORIZED,
        // insufficient_privilege: the key lacks the scope
        "42501" => StatusCode::FORBIDDEN,
        // no_data_found: an unknown template, provider, list or key
        "02000" | "P0002" => StatusCode::NOT_FOUND,
        // unique_violation: an idempotency key used for another request
        "23505" => StatusCode::CONFLICT,
        // program_limit_exceeded: too many items or too large a value
        "54000" => StatusCode::PAYLOAD_TOO_LARGE,
        // serialization failures, deadlocks, lock timeouts, cancelled statements, shutdown: retry
        "40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03" => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        // data exceptions (invalid_parameter_value, …) and integrity refusals: the values are wrong
        s if s.starts_with("22") || s.starts_with("23") => StatusCode::UNPROCESSABLE_ENTITY,
        s if s.starts_with("08") || s.starts_with("53") => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "hint": self.hint,
            "detail": self.detail,
            "code": self.code,
        }});
        let mut response = (
            self.status,
            [(CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_statuses() {
        for (code, status) in [
            ("28000", 401),
            ("42501", 403),
            ("02000", 404),
            ("23505", 409),
            ("54000", 413),
            ("22023", 422),
            ("23502", 422),
            ("40P01", 503),
            ("08006", 503),
            ("XX000", 500),
            ("42883", 500),
        ] {
            assert_eq!(status_for(code).as_u16(), status, "{code}");
        }
    }
}

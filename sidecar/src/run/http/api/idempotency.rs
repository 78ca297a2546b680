//! `Idempotency-Key` on writes: a client that retries a request (a timeout, a dropped connection)
//! sends the same key, and gets the first answer again instead of a second write. The claim, the
//! stored answer and the comparison of the request are `herald.api_call`'s (sql/api.sql: one row per
//! workspace and key, written in the transaction of the write, so two copies arriving together run
//! once; kept 24 hours; another request under a used key is a 409). Here: only the header's form.

use axum::http::HeaderMap;

use super::error::ApiError;

pub const HEADER: &str = "idempotency-key";
/// Sent with an answer that was stored by an earlier request with the same key.
pub const REPLAYED: &str = "idempotent-replayed";
const MAX_LEN: usize = 255;

/// The request's idempotency key, if it has one: 1 to 255 visible ASCII characters.
pub fn key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(k) if (1..=MAX_LEN).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(k))
        }
        _ => Err(ApiError::bad_request(
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
            Some("A UUID is a good key."),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(value: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER, HeaderValue::from_bytes(value).expect("a value"));
        h
    }

    #[test]
    fn keys_are_short_visible_ascii() {
        assert_eq!(key(&HeaderMap::new()).ok(), Some(None));
        assert_eq!(key(&with(b"order-17")).ok(), Some(Some("order-17")));
        assert!(key(&with(b"")).is_err());
        assert!(key(&with(b"a b")).is_err());
        assert!(key(&with("é".as_bytes())).is_err());
        assert!(key(&with(&[b'k'; 256])).is_err());
        assert!(key(&with(&[b'k'; 255])).is_ok());
    }
}

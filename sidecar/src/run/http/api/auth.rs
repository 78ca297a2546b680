//! The API key a request presents: `Authorization: Bearer hk_<id>_<64 hex>`. Only its form is
//! checked here, so that junk never costs a database call; whether it is a live key of which
//! workspace, and with which scopes, is checked by `herald.api_call` in the same statement as the
//! work (a revoked key stops at once; nothing is cached in the daemon).

use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;

use super::error::ApiError;

/// The secret from the request's `Authorization` header, when it has the form of an API key.
pub fn secret(headers: &HeaderMap) -> Result<&str, ApiError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err(ApiError::unauthorized("missing API key"));
    };
    let presented = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|s| well_formed(s));
    // the same message as the database's for a key it does not know
    presented.ok_or_else(|| ApiError::unauthorized("unknown API key"))
}

/// `hk_`, a key id (1-18 digits), `_`, 64 lower-case hex digits: what `herald.create_api_key` makes.
pub fn well_formed(secret: &str) -> bool {
    let Some(rest) = secret.strip_prefix("hk_") else {
        return false;
    };
    let Some((id, random)) = rest.split_once('_') else {
        return false;
    };
    (1..=18).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_digit())
        && random.len() == 64
        && random
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const KEY: &str = "hk_12_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(value).expect("a value"),
        );
        h
    }

    #[test]
    fn takes_only_bearer_keys_of_the_right_form() {
        assert_eq!(secret(&with(&format!("Bearer {KEY}"))).ok(), Some(KEY));
        assert!(secret(&HeaderMap::new()).is_err());
        assert!(secret(&with(KEY)).is_err(), "no Bearer");
        assert!(secret(&with(&format!("Basic {KEY}"))).is_err());
        for bad in [
            "hk__0123",
            "hk_x_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "hk_1_0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
            "hk_1_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde",
            "hk_1234567890123456789_0123456789abcdef0123456789abcdef0123456789abcdef",
            "xx_1_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(!well_formed(bad), "{bad}");
        }
        assert!(well_formed(KEY));
    }
}

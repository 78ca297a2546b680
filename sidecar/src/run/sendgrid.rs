//! SendGrid's Signed Event Webhook: its verification key (read by `config` at start) and the check of
//! a signed request. A leaf: it knows HTTP status codes and P-256, nothing of the daemon, so `config`
//! can parse the key without reaching the HTTP side's server code.

use std::fmt;

use axum::http::StatusCode;
use base64::Engine as _;
use p256::ecdsa::signature::MultipartVerifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;

/// The request headers SendGrid signs with.
pub const SIGNATURE_HEADER: &str = "x-twilio-email-event-webhook-signature";
pub const TIMESTAMP_HEADER: &str = "x-twilio-email-event-webhook-timestamp";
/// How far a signed request's timestamp may be from now, either way: a captured request can be
/// replayed only this long, and this much clock difference is tolerated.
pub const MAX_SKEW_SECS: i64 = 5 * 60;

/// Why a SendGrid verification key from the settings was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendgridKeyError {
    NotBase64,
    NotP256,
}

impl fmt::Display for SendgridKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotBase64 => "not base64 (paste the verification key SendGrid shows for the Signed Event Webhook)",
            Self::NotP256 => "not a P-256 (prime256v1) public key in DER SubjectPublicKeyInfo form, as SendGrid shows it",
        })
    }
}

impl std::error::Error for SendgridKeyError {}

/// The key SendGrid shows: base64 of a DER SubjectPublicKeyInfo of a P-256 key. PEM armour
/// (`-----BEGIN PUBLIC KEY-----` lines) and line breaks are tolerated, since copies often carry them.
pub fn parse_sendgrid_key(text: &str) -> Result<VerifyingKey, SendgridKeyError> {
    let b64: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("-----"))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| SendgridKeyError::NotBase64)?;
    // checks the algorithm (id-ecPublicKey), the curve (P-256) and that the point is on it
    VerifyingKey::from_public_key_der(&der).map_err(|_| SendgridKeyError::NotP256)
}

/// Why a request to /events/sendgrid was refused when signatures are required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendgridRefusal {
    MissingSignature,
    MissingTimestamp,
    BadTimestamp,
    StaleTimestamp,
    MalformedSignature,
    WrongSignature,
}

impl SendgridRefusal {
    /// 401 when the request carries no signature at all, 403 when it carries a bad one.
    pub fn status(self) -> StatusCode {
        match self {
            Self::MissingSignature | Self::MissingTimestamp => StatusCode::UNAUTHORIZED,
            _ => StatusCode::FORBIDDEN,
        }
    }
}

impl fmt::Display for SendgridRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MissingSignature => "unsigned: X-Twilio-Email-Event-Webhook-Signature is missing",
            Self::MissingTimestamp => "unsigned: X-Twilio-Email-Event-Webhook-Timestamp is missing",
            Self::BadTimestamp => {
                "X-Twilio-Email-Event-Webhook-Timestamp is not a Unix time in seconds"
            }
            Self::StaleTimestamp => "the signed timestamp is more than 5 minutes from now",
            Self::MalformedSignature => {
                "the signature is not base64 of a DER-encoded ECDSA signature"
            }
            Self::WrongSignature => {
                "the signature does not match this body, timestamp and verification key"
            }
        })
    }
}

/// An ECDSA P-256/SHA-256 signature (base64 of DER) over the bytes of the timestamp header followed
/// by the raw body, with the timestamp (Unix seconds) within [`MAX_SKEW_SECS`] of `now`, so that a
/// captured request cannot be replayed later.
pub fn verify_sendgrid(
    key: &VerifyingKey,
    signature: Option<&str>,
    timestamp: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), SendgridRefusal> {
    let signature = signature
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or(SendgridRefusal::MissingSignature)?;
    let timestamp = timestamp
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(SendgridRefusal::MissingTimestamp)?;
    let at: i64 = timestamp
        .parse()
        .ok()
        .filter(|_| timestamp.bytes().all(|b| b.is_ascii_digit()))
        .ok_or(SendgridRefusal::BadTimestamp)?;
    if now.abs_diff(at) > MAX_SKEW_SECS.unsigned_abs() {
        return Err(SendgridRefusal::StaleTimestamp);
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .map_err(|_| SendgridRefusal::MalformedSignature)?;
    let signature = Signature::from_der(&der).map_err(|_| SendgridRefusal::MalformedSignature)?;
    key.multipart_verify(&[timestamp.as_bytes(), body], &signature)
        .map_err(|_| SendgridRefusal::WrongSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SendGrid's key for the tests, from a fixed scalar (signing is deterministic, RFC 6979).
    fn sendgrid_pair() -> (p256::ecdsa::SigningKey, VerifyingKey) {
        let signing = p256::ecdsa::SigningKey::from_slice(&[0x42; 32]).expect("a valid scalar");
        let verifying = *signing.verifying_key();
        (signing, verifying)
    }

    fn sendgrid_sign(key: &p256::ecdsa::SigningKey, timestamp: &str, body: &[u8]) -> String {
        use p256::ecdsa::signature::Signer as _;
        let mut message = timestamp.as_bytes().to_vec();
        message.extend_from_slice(body);
        let signature: Signature = key.sign(&message);
        base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
    }

    #[test]
    fn sendgrid_signatures_verify_over_timestamp_and_body() {
        use p256::pkcs8::EncodePublicKey as _;
        let (signing, verifying) = sendgrid_pair();
        let now = 1_800_000_000;
        let body = br#"[{"email":"a@x.example","event":"bounce"}]"#;
        let ts = now.to_string();
        let sig = sendgrid_sign(&signing, &ts, body);
        assert_eq!(
            verify_sendgrid(&verifying, Some(&sig), Some(&ts), body, now),
            Ok(())
        );
        // the key as SendGrid shows it (base64 DER SubjectPublicKeyInfo) round-trips
        let shown = base64::engine::general_purpose::STANDARD
            .encode(verifying.to_public_key_der().expect("encodable").as_bytes());
        let parsed = parse_sendgrid_key(&shown).expect("SendGrid's key form");
        assert_eq!(
            verify_sendgrid(&parsed, Some(&sig), Some(&ts), body, now + 299),
            Ok(())
        );

        // a changed body, timestamp or key, or a garbled signature, does not verify
        let mut tampered = body.to_vec();
        tampered[3] ^= 1;
        let wrong = Err(SendgridRefusal::WrongSignature);
        assert_eq!(
            verify_sendgrid(&verifying, Some(&sig), Some(&ts), &tampered, now),
            wrong
        );
        let ts2 = (now + 1).to_string();
        assert_eq!(
            verify_sendgrid(&verifying, Some(&sig), Some(&ts2), body, now),
            wrong
        );
        let other = *p256::ecdsa::SigningKey::from_slice(&[0x43; 32])
            .expect("a valid scalar")
            .verifying_key();
        assert_eq!(
            verify_sendgrid(&other, Some(&sig), Some(&ts), body, now),
            wrong
        );
        assert_eq!(
            verify_sendgrid(&verifying, Some("bm90IGRlcg=="), Some(&ts), body, now),
            Err(SendgridRefusal::MalformedSignature)
        );
        assert_eq!(
            verify_sendgrid(&verifying, Some("%%%"), Some(&ts), body, now),
            Err(SendgridRefusal::MalformedSignature)
        );

        // stale or future timestamps (over 5 minutes), even correctly signed, are refused
        for at in [now - 301, now + 301, 0] {
            let at_text = at.to_string();
            let sig = sendgrid_sign(&signing, &at_text, body);
            assert_eq!(
                verify_sendgrid(&verifying, Some(&sig), Some(&at_text), body, now),
                Err(SendgridRefusal::StaleTimestamp),
                "{at}"
            );
        }
        let sig_300 = sendgrid_sign(&signing, &(now - 300).to_string(), body);
        assert_eq!(
            verify_sendgrid(
                &verifying,
                Some(&sig_300),
                Some(&(now - 300).to_string()),
                body,
                now
            ),
            Ok(())
        );
        for bad in ["soon", "-1", "+1800000000", "1.8e9", "99999999999999999999"] {
            assert_eq!(
                verify_sendgrid(&verifying, Some(&sig), Some(bad), body, now),
                Err(SendgridRefusal::BadTimestamp),
                "{bad}"
            );
        }

        // unsigned requests: 401; badly signed ones: 403
        assert_eq!(
            verify_sendgrid(&verifying, None, Some(&ts), body, now),
            Err(SendgridRefusal::MissingSignature)
        );
        assert_eq!(
            verify_sendgrid(&verifying, Some(&sig), Some(" "), body, now),
            Err(SendgridRefusal::MissingTimestamp)
        );
        assert_eq!(
            SendgridRefusal::MissingSignature.status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            SendgridRefusal::WrongSignature.status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            SendgridRefusal::StaleTimestamp.status(),
            StatusCode::FORBIDDEN
        );
    }

    /// A key, signature and body made by another implementation (Python `cryptography`), so the
    /// byte layout (timestamp then body, DER signature, SPKI key) is checked, not only a round trip.
    #[test]
    fn sendgrid_signature_from_another_implementation() {
        let key = parse_sendgrid_key(
            "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEvl8xDT8gYPEN/AJ1nDAHCdeYcjsCC/pPZ1x2Z5qSAWcpZreqWAbg9tVykL0Og7/JuCctZSXvoKi9otsL+tpGew==",
        )
        .expect("a P-256 key");
        let sig = "MEYCIQCpTbecBQq0/U9zBfsQJAVu1gTHDjZDCKNmVQHzol0AhwIhAJ8geQ8geWrdVxlfD0WoLq6rMJSXej6HqLAZbf59HwcF";
        let body = b"[{\"email\":\"a@x.example\",\"event\":\"bounce\"}]\r\n";
        let ts = "1700000000";
        assert_eq!(
            verify_sendgrid(&key, Some(sig), Some(ts), body, 1_700_000_060),
            Ok(())
        );
        assert_eq!(
            verify_sendgrid(
                &key,
                Some(sig),
                Some(ts),
                &body[..body.len() - 2],
                1_700_000_060
            ),
            Err(SendgridRefusal::WrongSignature)
        );
    }

    #[test]
    fn sendgrid_keys_must_be_p256_public_keys() {
        let p256 = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEvl8xDT8gYPEN/AJ1nDAHCdeYcjsCC/pPZ1x2Z5qSAWcpZreqWAbg9tVykL0Og7/JuCctZSXvoKi9otsL+tpGew==";
        assert!(parse_sendgrid_key(p256).is_ok());
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n{}\n-----END PUBLIC KEY-----\n",
            &p256[..64],
            &p256[64..]
        );
        assert!(
            parse_sendgrid_key(&pem).is_ok(),
            "PEM armour and line breaks"
        );
        let p384 = "MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEMMt3D8OUjxVzmIFsc1WkclS/rvbq+/wtd4wfGUvZDP3h0Ot5ID+7cRFyM+ZUEq2x5Rw4NqwkQSX9ucsxO+OfP5lcygmnSyaWWRGsCAWuOwLTRxfvypRhYsc9rCcA8Z5P";
        assert_eq!(
            parse_sendgrid_key(p384).err(),
            Some(SendgridKeyError::NotP256)
        );
        assert_eq!(
            parse_sendgrid_key("not base64!").err(),
            Some(SendgridKeyError::NotBase64)
        );
        assert_eq!(
            parse_sendgrid_key("aGVsbG8=").err(),
            Some(SendgridKeyError::NotP256)
        );
        // a point off the curve: the last coordinate byte changed
        let mut der = base64::engine::general_purpose::STANDARD
            .decode(p256)
            .expect("base64");
        let last = der.len() - 1;
        der[last] ^= 1;
        let off_curve = base64::engine::general_purpose::STANDARD.encode(der);
        assert_eq!(
            parse_sendgrid_key(&off_curve).err(),
            Some(SendgridKeyError::NotP256)
        );
    }
}

//! Result subscriptions (`herald.subscribe_results`): where a workspace's results stream is POSTed
//! and how, checked once when the subscription is made, with the same URL rule as webhook nodes
//! (`definition::check_url`) and the same host for rate limits (`step_engine::url_host`).
//!
//! The normalised form SQL stores: `{"url", "host", "batch", "max_attempts", "timeout_ms", "after"}`
//! (`after` null when not given: the subscription starts at the newest published result).

use serde_json::{json, Value};

use crate::definition::{check_url, DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS};
use crate::fault::{reject_unknown_keys, Fault};
use crate::step_engine::url_host;

/// Results per delivery (one POST) when not said, and at most.
pub const DEFAULT_BATCH: u64 = 100;
pub const MAX_BATCH: u64 = 1000;
/// Attempts per delivery before its job is dead (and the subscription waits for a redrive). With the
/// outbox's back-off (10 s doubling, capped at an hour) 20 attempts span about 11 hours.
pub const DEFAULT_MAX_ATTEMPTS: u64 = 20;
pub const MAX_ATTEMPTS: u64 = 100;
const OPTIONS: &[&str] = &["after", "batch", "max_attempts", "timeout_ms"];

/// Checks a subscription's URL and options; every fault names its place (`url`, `options.batch`).
pub fn validate(url: Option<&str>, options: &Value) -> Result<Value, Vec<Fault>> {
    let mut faults = Vec::new();
    let host = match url {
        None => {
            faults.push(Fault::new("url", "url must not be NULL"));
            None
        }
        Some(u) => match check_url(u) {
            Ok(()) => url_host(u),
            Err(e) => {
                faults.push(Fault::new("url", e));
                None
            }
        },
    };
    let empty = serde_json::Map::new();
    let map = match options {
        Value::Null => &empty,
        Value::Object(m) => m,
        _ => {
            faults.push(Fault::new(
                "options",
                "must be a JSON object, e.g. {\"batch\": 100}",
            ));
            &empty
        }
    };
    reject_unknown_keys(map, OPTIONS, "options", "", &mut faults);
    let mut whole = |key: &str, default: u64, min: u64, max: u64, what: &str| -> u64 {
        match map.get(key) {
            None | Some(Value::Null) => default,
            Some(v) => match v.as_u64() {
                Some(n) if (min..=max).contains(&n) => n,
                _ => {
                    faults.push(Fault::new(
                        format!("options.{key}"),
                        format!("{what}: a whole number from {min} to {max}; got {v}"),
                    ));
                    default
                }
            },
        }
    };
    let batch = whole("batch", DEFAULT_BATCH, 1, MAX_BATCH, "results per delivery");
    let attempts = whole(
        "max_attempts",
        DEFAULT_MAX_ATTEMPTS,
        1,
        MAX_ATTEMPTS,
        "attempts per delivery",
    );
    let timeout = whole(
        "timeout_ms",
        DEFAULT_TIMEOUT_MS,
        1,
        MAX_TIMEOUT_MS,
        "milliseconds per request",
    );
    let after = whole(
        "after",
        0,
        0,
        i64::MAX as u64,
        "the result id to start after (0: the oldest kept)",
    );
    if !faults.is_empty() {
        return Err(faults);
    }
    Ok(json!({
        "url": url,
        "host": host,
        "batch": batch,
        "max_attempts": attempts,
        "timeout_ms": timeout,
        "after": map.get("after").filter(|v| !v.is_null()).map(|_| after),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(url: Option<&str>, options: Value) -> Vec<String> {
        validate(url, &options)
            .unwrap_err()
            .iter()
            .map(Fault::to_string)
            .collect()
    }

    #[test]
    fn defaults_and_host() {
        let v = validate(Some("https://Hooks.Example:8443/herald?x=1"), &json!({})).unwrap();
        assert_eq!(
            v,
            json!({"url": "https://Hooks.Example:8443/herald?x=1", "host": "hooks.example",
                   "batch": 100, "max_attempts": 20, "timeout_ms": 10000, "after": null})
        );
        let v = validate(
            Some("http://127.0.0.1:9/r"),
            &json!({"batch": 5, "max_attempts": 3, "timeout_ms": 2000, "after": 0}),
        )
        .unwrap();
        assert_eq!(v["batch"], 5);
        assert_eq!(v["max_attempts"], 3);
        assert_eq!(v["timeout_ms"], 2000);
        assert_eq!(v["after"], 0);
        assert_eq!(v["host"], "127.0.0.1");
        assert!(validate(Some("https://x.example"), &Value::Null).is_ok());
    }

    #[test]
    fn every_fault_is_named() {
        assert_eq!(faults(None, json!({})), vec!["url: url must not be NULL"]);
        assert!(faults(Some("ftp://x.example"), json!({}))[0]
            .starts_with("url: url must be an absolute http:// or https:// URL"));
        assert_eq!(
            faults(
                Some("https://x.example"),
                json!({"batch": 0, "max_attempts": 1000, "timeout_ms": "fast", "after": -1, "colour": 1})
            ),
            vec![
                "options.colour: unknown key \"colour\"; allowed: after, batch, max_attempts, timeout_ms",
                "options.batch: results per delivery: a whole number from 1 to 1000; got 0",
                "options.max_attempts: attempts per delivery: a whole number from 1 to 100; got 1000",
                "options.timeout_ms: milliseconds per request: a whole number from 1 to 120000; got \"fast\"",
                "options.after: the result id to start after (0: the oldest kept): a whole number from 0 to 9223372036854775807; got -1",
            ]
        );
        assert_eq!(
            faults(Some("https://x.example"), json!([])),
            vec!["options: must be a JSON object, e.g. {\"batch\": 100}"]
        );
    }
}

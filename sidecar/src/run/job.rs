//! What a job and its outcome are, for every part of the daemon that handles one (producer, executors,
//! metrics, completer): a leaf module, so that none of them imports another for its types (River's
//! `rivertype`).

use serde_json::{json, Value as Json};

/// A row of `herald.claim`.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: i64,
    pub workspace: String,
    pub kind: String,
    pub provider: Option<String>,
    pub dedupe_key: String,
    pub attempt: i32,
    pub payload: Json,
}

/// A row of `herald.claim` as the producer decoded it.
#[derive(Debug)]
pub enum Claimed {
    Job(Job),
    /// Its id is readable, the rest is not: failed permanently with this error, alone.
    Undecodable {
        id: i64,
        error: String,
    },
    /// Not even its id (cannot happen with a sane server): left to its lease.
    Unreadable(String),
}

/// What the executors read from a payload, by kind: a field of the wrong type is refused here, with
/// its name, rather than read as absent later (`"to": 42` is not "the contact was deleted").
pub fn check_payload(job: &Job) -> Result<(), String> {
    let p = &job.payload;
    if !p.is_object() {
        return Err(format!("expected a JSON object, got {}", type_name(p)));
    }
    let fields: &[(&str, Want)] = match job.kind.as_str() {
        "email" => &[
            ("to", Want::Str),
            ("from", Want::Str),
            ("reply_to", Want::Str),
            ("provider_kind", Want::Str),
            ("provider", Want::Str),
            ("template", Want::Object),
            ("broadcast_id", Want::Int),
            ("variation", Want::Str),
        ],
        "webhook" | "decide" => &[
            ("url", Want::Str),
            ("method", Want::Str),
            ("headers", Want::Object),
            ("timeout_ms", Want::Int),
            ("verbatim", Want::Bool),
        ],
        _ => &[],
    };
    for (name, want) in fields {
        let Some(v) = p.get(*name).filter(|v| !v.is_null()) else {
            continue; // absence is the executor's to explain ("the job has no url")
        };
        let fits = match want {
            Want::Str => v.is_string(),
            Want::Object => v.is_object(),
            Want::Int => v.is_i64() || v.is_u64(),
            Want::Bool => v.is_boolean(),
        };
        if !fits {
            return Err(format!(
                "{name}: expected {}, got {}",
                want.name(),
                type_name(v)
            ));
        }
    }
    if let Some(t) = p.get("template").and_then(Json::as_object) {
        for part in ["subject", "html", "text"] {
            if let Some(v) = t.get(part).filter(|v| !v.is_null() && !v.is_string()) {
                return Err(format!(
                    "template.{part}: expected a string, got {}",
                    type_name(v)
                ));
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Want {
    Str,
    Object,
    Int,
    Bool,
}

impl Want {
    fn name(self) -> &'static str {
        match self {
            Want::Str => "a string",
            Want::Object => "an object",
            Want::Int => "a whole number",
            Want::Bool => "true or false",
        }
    }
}

fn type_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Done {
        message_id: Option<String>,
        response: Option<Json>,
    },
    Failed {
        retryable: bool,
        error: String,
    },
    /// An email the receiving server refused for good with an address-level reply (550 5.1.1 user
    /// unknown): a permanent failure that is also a hard bounce, so `herald.complete` suppresses the
    /// address and records the bounce as a provider's report of it would be.
    Refused {
        message_id: String,
        error: String,
    },
}

impl Outcome {
    pub fn permanent(error: impl Into<String>) -> Self {
        Self::Failed {
            retryable: false,
            error: error.into(),
        }
    }

    pub fn retry(error: impl Into<String>) -> Self {
        Self::Failed {
            retryable: true,
            error: error.into(),
        }
    }

    /// The element of `herald.complete`'s array for this job (the outcome moves into it: a reply kept
    /// as the response is not copied).
    pub fn into_result(self, id: i64) -> Json {
        match self {
            Self::Done {
                message_id,
                response,
            } => {
                let mut r = json!({"id": id, "ok": true});
                if let Some(m) = message_id {
                    r["message_id"] = Json::String(m);
                }
                if let Some(v) = response {
                    r["response"] = v;
                }
                r
            }
            Self::Failed { retryable, error } => {
                json!({"id": id, "ok": false, "retryable": retryable, "error": bounded(&error)})
            }
            // the bounce rides in `response`, which every complete() since 0.1.0 accepts (an older
            // extension stores it and records a plain permanent failure)
            Self::Refused { message_id, error } => {
                let error = bounded(&error);
                json!({"id": id, "ok": false, "retryable": false, "error": error,
                       "message_id": message_id, "response": {"smtp": error, "bounce": "hard"}})
            }
        }
    }
}

/// Stored errors stay readable and bounded.
fn bounded(error: &str) -> String {
    error.chars().take(2000).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_match_what_complete_accepts() {
        let ok = Outcome::Done {
            message_id: Some("<a@herald>".into()),
            response: Some(json!({"x": 1})),
        };
        assert_eq!(
            ok.into_result(17),
            json!({"id": 17, "ok": true, "message_id": "<a@herald>", "response": {"x": 1}})
        );
        let bare = Outcome::Done {
            message_id: None,
            response: None,
        };
        assert_eq!(bare.into_result(1), json!({"id": 1, "ok": true}));
        assert_eq!(
            Outcome::retry("451 4.3.0 try later").into_result(18),
            json!({"id": 18, "ok": false, "retryable": true, "error": "451 4.3.0 try later"})
        );
        let long = Outcome::permanent("x".repeat(5000)).into_result(2);
        assert_eq!(long["error"].as_str().unwrap().chars().count(), 2000);
        assert_eq!(long["error"].as_str().unwrap().len(), 2000);
        assert_eq!(long["retryable"], json!(false));
        let refused = Outcome::Refused {
            message_id: "<b@herald>".into(),
            error: "550 5.1.1 no such user".into(),
        };
        assert_eq!(
            refused.into_result(19),
            json!({"id": 19, "ok": false, "retryable": false, "error": "550 5.1.1 no such user",
                   "message_id": "<b@herald>",
                   "response": {"smtp": "550 5.1.1 no such user", "bounce": "hard"}})
        );
    }

    fn job(kind: &str, payload: Json) -> Job {
        Job {
            id: 1,
            workspace: "w".into(),
            kind: kind.into(),
            provider: None,
            dedupe_key: "k".into(),
            attempt: 1,
            payload,
        }
    }

    #[test]
    fn payload_fields_of_the_wrong_type_are_named() {
        assert_eq!(
            check_payload(&job(
                "email",
                json!({"to": "a@x.example", "template": {"subject": "s", "html": "h", "text": null}})
            )),
            Ok(())
        );
        assert_eq!(check_payload(&job("email", json!({"to": null}))), Ok(()));
        assert_eq!(
            check_payload(&job("email", json!({"to": 42}))),
            Err("to: expected a string, got a number".into())
        );
        assert_eq!(
            check_payload(&job(
                "email",
                json!({"to": "a@x.example", "template": {"html": ["x"]}})
            )),
            Err("template.html: expected a string, got an array".into())
        );
        assert_eq!(
            check_payload(&job(
                "webhook",
                json!({"url": "http://x", "timeout_ms": "soon"})
            )),
            Err("timeout_ms: expected a whole number, got a string".into())
        );
        assert!(check_payload(&job("webhook", json!([1]))).is_err());
    }
}

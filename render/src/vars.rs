//! The variables one job's templates see.

use minijinja::Value;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// Every variable a template can see, in the order the documentation lists them.
pub const ROOTS: [&str; 7] = [
    "contact",
    "context",
    "event",
    "variables",
    "broadcast",
    "workspace",
    "unsubscribe_url",
];

/// Everything one job's templates see: the claimed payload and a few extras. Serialisable, so a
/// render worker can rebuild the same variables.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Vars {
    workspace: String,
    payload: Json,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unsubscribe_url: Option<String>,
}

impl Vars {
    /// `payload`: a claimed job's (`contact`, `context`, `event`, `variables`, `broadcast`, …).
    pub fn from_payload(workspace: &str, payload: &Json) -> Self {
        Self {
            workspace: workspace.to_string(),
            payload: payload.clone(),
            unsubscribe_url: None,
        }
    }

    /// The same variables plus `unsubscribe_url` (the HTTP side's signed one-click link).
    pub fn with_unsubscribe_url(&self, url: &str) -> Self {
        Self {
            unsubscribe_url: Some(url.to_string()),
            ..self.clone()
        }
    }

    /// The variables as one JSON object (`unsubscribe_url` only when known): what a path such as
    /// `contact.first_name` is looked up in.
    pub fn json(&self) -> Json {
        let p = &self.payload;
        let mut m = serde_json::Map::new();
        for k in ["contact", "context", "event", "variables", "broadcast"] {
            m.insert(k.to_string(), p.get(k).cloned().unwrap_or(Json::Null));
        }
        m.insert("workspace".into(), Json::from(self.workspace.as_str()));
        if let Some(url) = &self.unsubscribe_url {
            m.insert("unsubscribe_url".into(), Json::from(url.as_str()));
        }
        Json::Object(m)
    }

    /// True for a test send's job (`herald.send_test`): its subject is marked.
    pub fn is_test(&self) -> bool {
        self.payload.get("test").and_then(Json::as_bool) == Some(true)
    }

    /// The variables as the engine takes them (serialised from the payload in place: no copy per job).
    pub fn value(&self) -> Value {
        #[derive(Serialize)]
        struct View<'a> {
            contact: &'a Json,
            context: &'a Json,
            event: &'a Json,
            variables: &'a Json,
            broadcast: &'a Json,
            workspace: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            unsubscribe_url: Option<&'a str>,
        }
        let field = |k: &str| self.payload.get(k).unwrap_or(&Json::Null);
        Value::from_serialize(View {
            contact: field("contact"),
            context: field("context"),
            event: field("event"),
            variables: field("variables"),
            broadcast: field("broadcast"),
            workspace: &self.workspace,
            unsubscribe_url: self.unsubscribe_url.as_deref(),
        })
    }
}

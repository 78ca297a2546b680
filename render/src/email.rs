//! An email template's parts (`{"key", "subject", "html", "text"}`, as claim and render_template
//! pass them) and the email they render into.

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::text::html_to_text;
use crate::vars::Vars;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedEmail {
    pub subject: String,
    pub html: String,
    pub text: String,
}

/// What starts the subject of a test send (`herald.send_test`: a job whose payload has `"test": true`).
pub const TEST_PREFIX: &str = "[test] ";

impl RenderedEmail {
    /// The email as a test send delivers it: the subject starts with [`TEST_PREFIX`].
    pub fn marked_as_test(self) -> Self {
        Self {
            subject: format!("{TEST_PREFIX}{}", self.subject),
            ..self
        }
    }
}

/// The parts of a template to render, named as errors call them (`subject`, `html`, `text`; the
/// `html` part is HTML-escaped).
pub fn email_fields(template: &Json) -> Result<Vec<(String, Json)>, String> {
    let part = |k: &str| template.get(k).and_then(Json::as_str);
    let key = part("key").unwrap_or("?");
    let subject = part("subject").ok_or_else(|| format!("template {key:?} has no subject"))?;
    let html = part("html").ok_or_else(|| format!("template {key:?} has no html"))?;
    let mut fields = vec![
        ("subject".to_string(), Json::from(subject)),
        ("html".to_string(), Json::from(html)),
    ];
    if let Some(text) = part("text") {
        fields.push(("text".to_string(), Json::from(text)));
    }
    Ok(fields)
}

/// Subject on one line (marked for a test send); without a text part, one derived from the rendered
/// HTML.
pub fn finish_email(rendered: Vec<Json>, vars: &Vars) -> Result<RenderedEmail, String> {
    let mut parts = rendered.into_iter().map(|v| match v {
        Json::String(s) => s,
        _ => String::new(),
    });
    let subject = parts.next().unwrap_or_default();
    let html = parts.next().unwrap_or_default();
    // a header is one line: newlines a variable brought in become spaces
    let subject = subject
        .split(['\r', '\n'])
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let text = match parts.next() {
        Some(text) => text,
        None => html_to_text(&html),
    };
    let email = RenderedEmail {
        subject,
        html,
        text,
    };
    Ok(if vars.is_test() {
        email.marked_as_test()
    } else {
        email
    })
}

//! Templates: email subject/html/text and webhook bodies, rendered with minijinja (Jinja2 syntax).
//! Variables: `contact` (attributes + email, timezone, tags), `context` (the enrollment's collected
//! webhook replies), `event` (the triggering event's payload), `variables` (send()'s context),
//! `broadcast`, `workspace`. HTML is auto-escaped; subject, text and webhook strings are not.
//! A missing attribute renders as empty (`{{ contact.first_name | default("there") }}`); an error in a
//! template fails that one job permanently, with the error in the message.

use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};
use serde_json::Value as Json;

/// Upper bound on the work one template may do (loops over huge ranges end with an error, not a hang).
const FUEL: u64 = 2_000_000;

pub struct Renderer {
    env: Environment<'static>,
}

impl Default for Renderer {
    fn default() -> Self {
        Self::new()
    }
}

/// Everything one job's templates see.
pub struct Vars(Value);

impl Vars {
    pub fn from_payload(workspace: &str, payload: &Json) -> Self {
        let field = |k: &str| Value::from_serialize(payload.get(k).unwrap_or(&Json::Null));
        Self(minijinja::context! {
            contact => field("contact"),
            context => field("context"),
            event => field("event"),
            variables => field("variables"),
            broadcast => field("broadcast"),
            workspace => workspace,
        })
    }

    /// The same variables plus `unsubscribe_url` (the HTTP side's signed one-click link).
    pub fn with_unsubscribe_url(&self, url: &str) -> Self {
        Self(minijinja::context! { unsubscribe_url => url, ..self.0.clone() })
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct RenderedEmail {
    pub subject: String,
    pub html: String,
    pub text: String,
}

impl Renderer {
    pub fn new() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        env.set_auto_escape_callback(|name| {
            if name.ends_with(".html") {
                AutoEscape::Html
            } else {
                AutoEscape::None
            }
        });
        env.set_fuel(Some(FUEL));
        env.set_keep_trailing_newline(true);
        Self { env }
    }

    /// Renders one template source; `name` says what it is in error messages and picks the escaping
    /// (`*.html` is HTML-escaped).
    pub fn render(&self, name: &str, source: &str, vars: &Vars) -> Result<String, String> {
        if !source.contains("{{") && !source.contains("{%") && !source.contains("{#") {
            return Ok(source.to_string());
        }
        let tmpl = self
            .env
            .template_from_named_str(name, source)
            .map_err(|e| format!("template error in {name}: {}", describe(&e)))?;
        tmpl.render(&vars.0)
            .map_err(|e| format!("template error in {name}: {}", describe(&e)))
    }

    /// Renders every string inside a JSON document (object keys stay as they are).
    pub fn render_json(&self, name: &str, value: &Json, vars: &Vars) -> Result<Json, String> {
        Ok(match value {
            Json::String(s) => Json::String(self.render(name, s, vars)?),
            Json::Array(items) => Json::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.render_json(&format!("{name}[{i}]"), v, vars))
                    .collect::<Result<_, _>>()?,
            ),
            Json::Object(map) => Json::Object(
                map.iter()
                    .map(|(k, v)| {
                        Ok((
                            k.clone(),
                            self.render_json(&format!("{name}.{k}"), v, vars)?,
                        ))
                    })
                    .collect::<Result<_, String>>()?,
            ),
            other => other.clone(),
        })
    }

    /// The email of a claimed job: its template (`{"key", "version", "subject", "html", "text"}`) rendered.
    /// Without a text part, one is derived from the rendered HTML.
    pub fn render_email(&self, template: &Json, vars: &Vars) -> Result<RenderedEmail, String> {
        let part = |k: &str| template.get(k).and_then(Json::as_str);
        let key = part("key").unwrap_or("?");
        let subject_src =
            part("subject").ok_or_else(|| format!("template {key:?} has no subject"))?;
        let html_src = part("html").ok_or_else(|| format!("template {key:?} has no html"))?;
        let subject = self.render("subject", subject_src, vars)?;
        // a header is one line: newlines a variable brought in become spaces
        let subject = subject
            .split(['\r', '\n'])
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let html = self.render("body.html", html_src, vars)?;
        let text = match part("text") {
            Some(src) => self.render("body.txt", src, vars)?,
            None => html_to_text(&html),
        };
        Ok(RenderedEmail {
            subject,
            html,
            text,
        })
    }
}

/// The message of a minijinja error with its line, without the debug dump of all variables.
fn describe(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// A crude plain-text version of an HTML body: tags dropped (block ends and `<br>` become line breaks,
/// links keep their target), `<head>`, `<style>` and `<script>` dropped whole, common entities decoded,
/// blank runs collapsed.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(lt) = rest.find('<') {
        out.push_str(&rest[..lt]);
        rest = &rest[lt..];
        let Some(gt) = rest.find('>') else {
            out.push_str(rest);
            rest = "";
            break;
        };
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        let closing = tag.starts_with('/');
        match name.as_str() {
            "head" | "style" | "script" | "title" if !closing => {
                let end = format!("</{name}");
                match rest.to_ascii_lowercase().find(&end) {
                    Some(i) => {
                        rest = &rest[i..];
                        if let Some(gt) = rest.find('>') {
                            rest = &rest[gt + 1..];
                        }
                    }
                    None => rest = "",
                }
            }
            "br" => out.push('\n'),
            "p" | "div" | "tr" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6" | "ul" | "ol"
            | "table" | "blockquote" => out.push('\n'),
            "li" if !closing => out.push_str("\n- "),
            "a" if !closing => {
                if let Some(href) = attribute(tag, "href") {
                    // the link text follows; its target is added after it
                    out.push('\u{1}');
                    out.push_str(&href);
                    out.push('\u{2}');
                }
            }
            "a" => out.push('\u{3}'),
            _ => {}
        }
    }
    out.push_str(rest);
    let out = place_links(&out);
    let decoded = decode_entities(&out);
    // collapse spaces inside lines, and runs of blank lines
    let mut text = String::with_capacity(decoded.len());
    let mut blank = 0;
    for line in decoded.lines() {
        let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if line.is_empty() {
            blank += 1;
            if blank == 1 && !text.is_empty() {
                text.push('\n');
            }
        } else {
            blank = 0;
            text.push_str(&line);
            text.push('\n');
        }
    }
    text.trim().to_string() + "\n"
}

/// `\1href\2text\3` → `text (href)`, or just `href` when the text is the address.
fn place_links(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find('\u{1}') {
        out.push_str(&rest[..start]);
        rest = &rest[start + 1..];
        let (href, after) = rest.split_once('\u{2}').unwrap_or((rest, ""));
        let (text, after) = after.split_once('\u{3}').unwrap_or((after, ""));
        let t = text.trim();
        if t.is_empty() || t == href {
            out.push_str(href);
        } else {
            out.push_str(&format!("{t} ({href})"));
        }
        rest = after;
    }
    out.push_str(rest);
    out.replace('\u{3}', "")
}

fn attribute(tag: &str, name: &str) -> Option<String> {
    let lower = tag.to_ascii_lowercase();
    let at = lower.find(&format!("{name}="))? + name.len() + 1;
    let value = &tag[at..];
    let value = match value.chars().next()? {
        q @ ('"' | '\'') => value[1..].split(q).next()?,
        _ => value
            .split(|c: char| c.is_whitespace() || c == '>')
            .next()?,
    };
    Some(decode_entities(value))
}

pub(crate) fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let end = rest[1..]
            .find(|c: char| c == ';' || c == '&' || c.is_whitespace())
            .map(|i| i + 1);
        let decoded = end.filter(|&e| rest.as_bytes()[e] == b';').and_then(|e| {
            let entity = &rest[1..e];
            let c = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" | "#39" | "#x27" => Some('\''),
                "nbsp" => Some(' '),
                _ if entity.starts_with("#x") || entity.starts_with("#X") => {
                    u32::from_str_radix(&entity[2..], 16)
                        .ok()
                        .and_then(char::from_u32)
                }
                _ if entity.starts_with('#') => entity[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            }?;
            Some((c, e + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars() -> Vars {
        Vars::from_payload(
            "acme",
            &json!({
                "contact": {"email": "ann@example.com", "first_name": "Ann", "plan": "pro", "tags": ["vip"]},
                "context": {"crm": {"score": 42}},
                "event": {"utm": {"source": "ads"}},
                "variables": {"code": "<b>1234</b>"},
            }),
        )
    }

    #[test]
    fn renders_every_variable() {
        let r = Renderer::new();
        let out = r
            .render(
                "t",
                "{{ workspace }} {{ contact.first_name }} {{ contact.tags[0] }} {{ context.crm.score }} {{ event.utm.source }} {{ variables.code }}",
                &vars(),
            )
            .unwrap();
        assert_eq!(out, "acme Ann vip 42 ads <b>1234</b>");
    }

    #[test]
    fn missing_values_are_empty_and_defaults_work() {
        let r = Renderer::new();
        let v = vars();
        assert_eq!(r.render("t", "[{{ contact.nickname }}]", &v).unwrap(), "[]");
        assert_eq!(r.render("t", "[{{ event.a.b.c }}]", &v).unwrap(), "[]");
        assert_eq!(
            r.render("t", "Hi {{ contact.nickname | default('there') }}", &v)
                .unwrap(),
            "Hi there"
        );
        let no_event = Vars::from_payload("w", &json!({"event": null}));
        assert_eq!(
            r.render("t", "[{{ broadcast.name }}]", &no_event).unwrap(),
            "[]"
        );
        assert_eq!(
            r.render("t", "{% if event %}x{% else %}none{% endif %}", &no_event)
                .unwrap(),
            "none"
        );
    }

    #[test]
    fn html_is_escaped_text_is_not() {
        let r = Renderer::new();
        let v = vars();
        assert_eq!(
            r.render("body.html", "{{ variables.code }}", &v).unwrap(),
            "&lt;b&gt;1234&lt;&#x2f;b&gt;"
        );
        assert_eq!(
            r.render("body.txt", "{{ variables.code }}", &v).unwrap(),
            "<b>1234</b>"
        );
    }

    #[test]
    fn errors_are_messages_not_panics() {
        let r = Renderer::new();
        let v = vars();
        let e = r
            .render("subject", "Hello {{ contact.first_name", &v)
            .unwrap_err();
        assert!(e.starts_with("template error in subject:"), "{e}");
        let e = r.render("subject", "{{ 1 // 0 }}", &v).unwrap_err();
        assert!(e.contains("template error"), "{e}");
        let e = r
            .render("subject", "{{ contact.first_name.nope() }}", &v)
            .unwrap_err();
        assert!(e.contains("template error"), "{e}");
        let e = r.render("t", "{{ nope() }}", &v).unwrap_err();
        assert!(e.contains("nope") || e.contains("unknown"), "{e}");
        // runaway loops run out of fuel
        let e = r.render(
            "t",
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            &v,
        );
        assert!(e.is_err());
    }

    #[test]
    fn json_bodies_render_strings_recursively() {
        let r = Renderer::new();
        let body = json!({"email": "{{ contact.email }}", "n": 3, "list": ["{{ contact.plan }}", null, true],
                          "{{ keys stay }}": {"deep": "{{ context.crm.score }}"}});
        let out = r.render_json("body", &body, &vars()).unwrap();
        assert_eq!(
            out,
            json!({"email": "ann@example.com", "n": 3, "list": ["pro", null, true], "{{ keys stay }}": {"deep": "42"}})
        );
        let e = r
            .render_json("body", &json!({"a": ["{% if %}"]}), &vars())
            .unwrap_err();
        assert!(e.contains("body.a[0]"), "{e}");
    }

    #[test]
    fn email_parts() {
        let r = Renderer::new();
        let t = json!({"key": "welcome", "version": 2, "subject": "Hi {{ contact.first_name }}\r\nBcc: x@y.z",
                       "html": "<p>Hello {{ contact.first_name }}</p>", "text": null});
        let m = r.render_email(&t, &vars()).unwrap();
        assert_eq!(m.subject, "Hi Ann Bcc: x@y.z");
        assert_eq!(m.html, "<p>Hello Ann</p>");
        assert_eq!(m.text, "Hello Ann\n");
        let t = json!({"key": "k", "subject": "s", "html": "<p>h</p>", "text": "Dear {{ contact.first_name }}"});
        assert_eq!(r.render_email(&t, &vars()).unwrap().text, "Dear Ann");
        assert!(r
            .render_email(&json!({"key": "k", "html": "x"}), &vars())
            .is_err());
    }

    #[test]
    fn html_to_text_is_readable() {
        let html = "<html><head><title>T</title><style>p {color: red}</style></head><body>\
                    <h1>Welcome&nbsp;Ann</h1><p>Your code is <b>42</b> &amp; counting.</p>\
                    <ul><li>one</li><li>two</li></ul><p>See <a href=\"https://x.test/a?b=1&amp;c=2\">the docs</a> \
                    or <a href='https://y.test'>https://y.test</a>.<br>Bye &#8212; &#x263A; &unknown;</p></body></html>";
        assert_eq!(
            html_to_text(html),
            "Welcome Ann\n\nYour code is 42 & counting.\n\n- one\n- two\n\nSee the docs (https://x.test/a?b=1&c=2) or https://y.test.\nBye \u{2014} \u{263A} &unknown;\n"
        );
        assert_eq!(html_to_text("plain"), "plain\n");
        assert_eq!(html_to_text("a < b"), "a < b\n");
    }
}

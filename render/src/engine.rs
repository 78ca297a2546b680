//! The template engine: minijinja (Jinja2 syntax) with herald's settings.
//!
//! - Escaping by part name: a part named `html` or ending in `.html` is HTML-escaped; the subject,
//!   the text part and webhook strings are not.
//! - Fuel: at most [`FUEL`] steps per template (a loop over a huge range ends with an error).
//! - Output: at most [`MAX_OUTPUT`] bytes for all the parts of one job together.
//! - Undefined variables: email parts render with [`Undefined::Fail`] (minijinja's semi-strict mode:
//!   printing, iterating or looking into an undefined value fails, naming the variable; `{% if x %}`,
//!   `x is defined` and `x | default(…)` work); webhook bodies with [`Undefined::Empty`] (a missing
//!   value renders as nothing, as before: a webhook's body is built for a machine that treats an
//!   empty field as absent, and automations are not checked against templates when saved).

use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, Value};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::undefined;
use crate::vars::Vars;

/// Upper bound on the work one template may do (loops over huge ranges end with an error, not a hang).
pub const FUEL: u64 = 2_000_000;
/// Upper bound on what one job's templates produce together.
pub const MAX_OUTPUT: usize = 2 * 1024 * 1024;

/// What an undefined variable does when a template uses it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Undefined {
    /// The render fails with the variable's name (email templates).
    #[default]
    #[serde(rename = "fail")]
    Fail,
    /// It renders as nothing, and looking into it gives nothing again (webhook bodies).
    #[serde(rename = "empty")]
    Empty,
}

/// The template engine itself, in process: what a render worker and the extension's sandbox run.
pub struct Engine {
    strict: Environment<'static>,
    lenient: Environment<'static>,
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

/// True when a string holds template syntax (a string without it renders as itself).
pub fn has_syntax(source: &str) -> bool {
    source.contains("{{") || source.contains("{%") || source.contains("{#")
}

/// True when some string inside a JSON document holds template syntax.
pub fn json_has_syntax(value: &Json) -> bool {
    match value {
        Json::String(s) => has_syntax(s),
        Json::Array(items) => items.iter().any(json_has_syntax),
        Json::Object(map) => map.values().any(json_has_syntax),
        _ => false,
    }
}

/// Collects output up to a budget shared by every template of a request.
struct Bounded<'a> {
    out: Vec<u8>,
    left: &'a mut usize,
    over: bool,
}

impl std::io::Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() > *self.left {
            self.over = true;
            return Err(std::io::Error::other("rendered output over the bound"));
        }
        *self.left -= buf.len();
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn over_output(name: &str) -> String {
    format!(
        "template error in {name}: the rendered output is over {} MiB (the bound on what one job's templates may produce)",
        MAX_OUTPUT / (1024 * 1024)
    )
}

/// The environment both modes share, apart from what an undefined value does.
pub(crate) fn environment(undefined: UndefinedBehavior) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(undefined);
    env.set_auto_escape_callback(|name| {
        if name == "html" || name.ends_with(".html") {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    env.set_fuel(Some(FUEL));
    env.set_keep_trailing_newline(true);
    env
}

impl Engine {
    pub fn new() -> Self {
        Self {
            strict: environment(UndefinedBehavior::SemiStrict),
            lenient: environment(UndefinedBehavior::Chainable),
        }
    }

    /// Renders one template source; `name` says what it is in error messages and picks the escaping.
    /// `left`: the output budget still available.
    fn render_bounded(
        &self,
        name: &str,
        source: &str,
        vars: &Vars,
        value: &Value,
        undefined: Undefined,
        left: &mut usize,
    ) -> Result<String, String> {
        if !has_syntax(source) {
            if source.len() > *left {
                return Err(over_output(name));
            }
            *left -= source.len();
            return Ok(source.to_string());
        }
        let env = match undefined {
            Undefined::Fail => &self.strict,
            Undefined::Empty => &self.lenient,
        };
        let tmpl = env
            .template_from_named_str(name, source)
            .map_err(|e| format!("template error in {name}: {}", describe(&e)))?;
        let mut out = Bounded {
            out: Vec::new(),
            left,
            over: false,
        };
        match tmpl.render_captured_to(value, &mut out) {
            Ok(_) => String::from_utf8(out.out)
                .map_err(|_| format!("template error in {name}: the output is not UTF-8")),
            Err(_) if out.over => Err(over_output(name)),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(format!(
                "template error in {name}: the template does too much work (over {FUEL} steps)"
            )),
            Err(e) if e.kind() == ErrorKind::UndefinedError => Err(format!(
                "template error in {name}: {}",
                undefined::explain(source, &e, &vars.json())
            )),
            Err(e) => Err(format!("template error in {name}: {}", describe(&e))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn render_json_bounded(
        &self,
        name: &str,
        value: &Json,
        vars: &Vars,
        ctx: &Value,
        undefined: Undefined,
        left: &mut usize,
    ) -> Result<Json, String> {
        Ok(match value {
            Json::String(s) => {
                Json::String(self.render_bounded(name, s, vars, ctx, undefined, left)?)
            }
            Json::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, v) in items.iter().enumerate() {
                    let name = format!("{name}[{i}]");
                    out.push(self.render_json_bounded(&name, v, vars, ctx, undefined, left)?);
                }
                Json::Array(out)
            }
            Json::Object(map) => {
                let mut out = serde_json::Map::new();
                for (k, v) in map {
                    let name = format!("{name}.{k}");
                    let v = self.render_json_bounded(&name, v, vars, ctx, undefined, left)?;
                    out.insert(k.clone(), v);
                }
                Json::Object(out)
            }
            other => other.clone(),
        })
    }

    /// Renders named fields (each a string template, or a JSON document whose strings are templates,
    /// object keys staying as they are) with one output budget for all of them.
    pub fn render_fields(
        &self,
        fields: &[(String, Json)],
        vars: &Vars,
        undefined: Undefined,
    ) -> Result<Vec<Json>, String> {
        let value = vars.value();
        let mut left = MAX_OUTPUT;
        fields
            .iter()
            .map(|(name, v)| self.render_json_bounded(name, v, vars, &value, undefined, &mut left))
            .collect()
    }

    /// One template source, strictly (tests and checks).
    pub fn render(&self, name: &str, source: &str, vars: &Vars) -> Result<String, String> {
        let mut left = MAX_OUTPUT;
        self.render_bounded(
            name,
            source,
            vars,
            &vars.value(),
            Undefined::Fail,
            &mut left,
        )
    }

    /// The email of a template (`{"key", "subject", "html", "text"}`), in process.
    pub fn render_email(
        &self,
        template: &Json,
        vars: &Vars,
    ) -> Result<crate::RenderedEmail, String> {
        let fields = crate::email_fields(template)?;
        crate::finish_email(self.render_fields(&fields, vars, Undefined::Fail)?, vars)
    }
}

/// The message of a minijinja error with its line, without the debug dump of all variables.
pub fn describe(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
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
        let out = Engine::new()
            .render(
                "t",
                "{{ workspace }} {{ contact.first_name }} {{ contact.tags[0] }} {{ context.crm.score }} {{ event.utm.source }} {{ variables.code }}",
                &vars(),
            )
            .unwrap();
        assert_eq!(out, "acme Ann vip 42 ads <b>1234</b>");
    }

    /// minijinja's semi-strict mode, as email templates render: what fails and what does not.
    #[test]
    fn an_undefined_variable_fails_with_its_name_unless_allowed_to_be_missing() {
        let r = Engine::new();
        let v = vars();
        let e = r
            .render("subject", "Hi {{ contact.nickname }}", &v)
            .unwrap_err();
        assert_eq!(
            e,
            "template error in subject: contact.nickname is not defined (line 1); write {{ contact.nickname | default(\"…\") }} if it may be missing"
        );
        // a filter on it, a concatenation, a loop over it: named all the same
        let e = r
            .render("html", "<p>\n{{ contact.nickname | upper }}</p>", &v)
            .unwrap_err();
        assert!(
            e.starts_with("template error in html: contact.nickname is not defined (line 2)"),
            "{e}"
        );
        let e = r
            .render("t", "{{ contact.email ~ contact.nickname }}", &v)
            .unwrap_err();
        assert!(e.contains("contact.nickname is not defined"), "{e}");
        let e = r
            .render("t", "{% for x in contact.orders %}{{ x }}{% endfor %}", &v)
            .unwrap_err();
        assert!(e.contains("contact.orders is not defined"), "{e}");
        // looking into a missing value names the missing part
        let e = r.render("t", "{{ event.page.url }}", &v).unwrap_err();
        assert!(
            e.contains("event.page is not defined (line 1) (in event.page.url)"),
            "{e}"
        );
        let e = r
            .render("html", "<a href=\"{{ unsubscribe_url }}\">", &v)
            .unwrap_err();
        assert!(
            e.contains("unsubscribe_url is not defined (line 1): the daemon makes it only when its HTTP side is configured"),
            "{e}"
        );
        let e = r.render("t", "{{ broadcast.issue }}", &v).unwrap_err();
        assert!(e.contains("broadcast.issue is not defined"), "{e}");
        // a name that is no variable at all (a template saved before names were checked)
        let e = r.render("t", "{{ issue }}", &v).unwrap_err();
        assert!(
            e.contains("issue is not defined (line 1); templates see contact,"),
            "{e}"
        );
        assert!(
            e.contains("did you mean broadcast.issue or variables.issue?"),
            "{e}"
        );
        // allowed to be missing: default (d), is defined, if, or
        for (src, want) in [
            ("Hi {{ contact.nickname | default('there') }}", "Hi there"),
            (
                "Hi {{ contact.nickname | d(contact.first_name) }}",
                "Hi Ann",
            ),
            (
                "{% if contact.nickname is defined %}x{% else %}none{% endif %}",
                "none",
            ),
            (
                "{% if contact.nickname %}x{% else %}none{% endif %}",
                "none",
            ),
            ("{{ contact.nickname or 'n/a' }}", "n/a"),
            (
                "{{ contact.nickname if contact.nickname is defined else '-' }}",
                "-",
            ),
        ] {
            assert_eq!(r.render("t", src, &v).unwrap(), want, "{src}");
        }
        // webhook bodies keep rendering a missing value as nothing
        let fields = [(
            "body".to_string(),
            json!("[{{ contact.nickname }}{{ event.a.b.c }}]"),
        )];
        assert_eq!(
            r.render_fields(&fields, &v, Undefined::Empty).unwrap(),
            vec![json!("[]")]
        );
    }

    /// Why semi-strict: minijinja's `Strict` and `SemiStrict` both fail printing an undefined value
    /// and both let `default` and `is defined` through, but `Strict` also fails a plain condition.
    #[test]
    fn strict_and_semi_strict_differ_only_in_conditions() {
        let ctx = minijinja::context! { contact => minijinja::context! { email => "a@b.c" } };
        for (src, strict_ok, semi_ok) in [
            ("{{ contact.first_name }}", false, false),
            ("{{ contact.first_name | default('x') }}", true, true),
            ("{{ contact.first_name is defined }}", true, true),
            ("{% if contact.first_name %}y{% endif %}", false, true),
            ("{{ contact.x.y | default('z') }}", false, false),
        ] {
            for (behavior, ok) in [
                (UndefinedBehavior::Strict, strict_ok),
                (UndefinedBehavior::SemiStrict, semi_ok),
            ] {
                let env = environment(behavior);
                assert_eq!(env.render_str(src, &ctx).is_ok(), ok, "{behavior:?} {src}");
            }
        }
    }

    #[test]
    fn html_is_escaped_text_is_not() {
        let r = Engine::new();
        let v = vars();
        assert_eq!(
            r.render("html", "{{ variables.code }}", &v).unwrap(),
            "&lt;b&gt;1234&lt;&#x2f;b&gt;"
        );
        assert_eq!(
            r.render("body.html", "{{ variables.code }}", &v).unwrap(),
            "&lt;b&gt;1234&lt;&#x2f;b&gt;"
        );
        assert_eq!(
            r.render("text", "{{ variables.code }}", &v).unwrap(),
            "<b>1234</b>"
        );
    }

    #[test]
    fn errors_are_messages_not_panics() {
        let r = Engine::new();
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
    }

    fn doubling(times: usize) -> String {
        let mut t = String::from("{% set s = \"12345678\" %}");
        for _ in 0..times {
            t.push_str("{% set s = s ~ s %}");
        }
        t.push_str("{{ s|length }}");
        t
    }

    #[test]
    fn output_is_bounded() {
        let e = Engine::new();
        let v = vars();
        // 8 × 2^19 = 4 MiB written out: refused at 2 MiB, naming the bound
        let t = doubling(19).replace("{{ s|length }}", "{{ s }}");
        let err = e.render("html", &t, &v).unwrap_err();
        assert!(err.contains("over 2 MiB"), "{err}");
        // the bound is per job: two parts of 1.5 MiB each do not fit together
        let big = "x".repeat(1536 * 1024);
        let fields = vec![
            ("subject".to_string(), Json::from("{{ 1 }}")),
            ("html".to_string(), Json::from(format!("{{{{ 1 }}}}{big}"))),
            ("text".to_string(), Json::from(format!("{{{{ 2 }}}}{big}"))),
        ];
        let err = e.render_fields(&fields, &v, Undefined::Fail).unwrap_err();
        assert!(
            err.starts_with("template error in text") && err.contains("over 2 MiB"),
            "{err}"
        );
        assert_eq!(e.render("t", &doubling(10), &v).unwrap(), "8192");
    }

    #[test]
    fn runaway_work_names_the_fuel_bound() {
        let err = Engine::new()
            .render(
                "t",
                "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                &vars(),
            )
            .unwrap_err();
        assert!(err.contains("too much work"), "{err}");
    }

    #[test]
    fn json_bodies_render_strings_recursively() {
        let r = Engine::new();
        let body = json!({"email": "{{ contact.email }}", "n": 3, "list": ["{{ contact.plan }}", null, true],
                          "{{ keys stay }}": {"deep": "{{ context.crm.score }}"}});
        let out = r
            .render_fields(&[("body".to_string(), body)], &vars(), Undefined::Empty)
            .unwrap();
        assert_eq!(
            out[0],
            json!({"email": "ann@example.com", "n": 3, "list": ["pro", null, true], "{{ keys stay }}": {"deep": "42"}})
        );
        let e = r
            .render_fields(
                &[("body".to_string(), json!({"a": ["{% if %}"]}))],
                &vars(),
                Undefined::Empty,
            )
            .unwrap_err();
        assert!(e.contains("body.a[0]"), "{e}");
    }

    #[test]
    fn email_parts() {
        let r = Engine::new();
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
        let test = Vars::from_payload(
            "acme",
            &json!({"test": true, "contact": {"first_name": "Ann"}}),
        );
        let t = json!({"key": "k", "subject": "Hi {{ contact.first_name }}", "html": "x"});
        assert_eq!(r.render_email(&t, &test).unwrap().subject, "[test] Hi Ann");
        let t = json!({"key": "k", "subject": "Hi {{ contact.nickname }}", "html": "x"});
        assert!(r
            .render_email(&t, &vars())
            .unwrap_err()
            .starts_with("template error in subject: contact.nickname"));
    }
}

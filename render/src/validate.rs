//! What a template must be to be saved (`upsert_template`) and to be used by a broadcast
//! (`create_broadcast`): each part parses, every variable it names is one templates can see, and a
//! `broadcast.<name>` it needs is one the broadcast defines.

use std::collections::BTreeSet;

use serde_json::Value as Json;

use crate::undefined::{paths, Path, Step};
use crate::vars::ROOTS;

/// Why a template is refused: the message, and what is allowed instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
    pub hint: String,
}

/// Names a template may use besides [`ROOTS`]: minijinja's global functions and the names its
/// blocks define (`loop` in a for, `caller`/`varargs`/`kwargs` in a macro).
const BUILTINS: [&str; 7] = [
    "range",
    "dict",
    "namespace",
    "loop",
    "caller",
    "varargs",
    "kwargs",
];

const ROOTS_HINT: &str = "Templates see: contact (the recipient's attributes, and email), context (what the journey collected), event (the triggering event's payload), variables (send()'s context), broadcast (the broadcast definition's variables), workspace, unsubscribe_url.";

const SYNTAX_HINT: &str = "Templates use Jinja syntax: {{ contact.first_name }} prints a value, {% if … %}…{% endif %} and {% for … in … %}…{% endfor %} are blocks, {# … #} is a comment.";

/// One `{{ … }}` or `{% … %}` of a template: its line and its inside.
pub struct Tag<'a> {
    pub line: usize,
    pub block: bool,
    pub text: &'a str,
}

/// The expression and statement tags of a template, in order (comments skipped). Lexical: used after
/// the template parsed, to say where a name is.
pub fn tags(source: &str) -> Vec<Tag<'_>> {
    let b = source.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut line = 1;
    while i + 1 < b.len() {
        if b[i] == b'\n' {
            line += 1;
        }
        if b[i] == b'{' && matches!(b[i + 1], b'{' | b'%' | b'#') {
            let (close, block) = match b[i + 1] {
                b'{' => ("}}", false),
                b'%' => ("%}", true),
                _ => ("#}", true),
            };
            let start = i + 2;
            let mut j = start;
            while j + 1 < b.len() && &source[j..j + 2] != close {
                if b[i + 1] != b'#' && (b[j] == b'"' || b[j] == b'\'') {
                    let q = b[j];
                    j += 1;
                    while j < b.len() && b[j] != q {
                        j += 1;
                    }
                }
                j += 1;
            }
            let end = j.min(b.len());
            if b[i + 1] != b'#' {
                out.push(Tag {
                    line,
                    block,
                    text: &source[start..end],
                });
            }
            line += source[i..end].matches('\n').count();
            i = end + 2;
            continue;
        }
        i += 1;
    }
    out
}

/// The first line of `source` where a tag names the variable `root`.
fn line_of(source: &str, root: &str) -> Option<usize> {
    tags(source)
        .into_iter()
        .find(|t| paths(t.text).iter().any(|p| p.root == root))
        .map(|t| t.line)
}

/// Checks one template: `parts` are (name, source) pairs (`subject`, `html`, `text`).
pub fn check_template(parts: &[(&str, &str)]) -> Result<(), Refusal> {
    let env = crate::engine::environment(minijinja::UndefinedBehavior::SemiStrict);
    for (name, source) in parts {
        let tmpl = env.template_from_named_str(name, source).map_err(|e| {
            let line = e.line().map(|l| format!(", line {l}")).unwrap_or_default();
            let detail = e.detail().unwrap_or("it does not parse");
            Refusal {
                message: format!("syntax error in {name}{line}: {detail}"),
                hint: SYNTAX_HINT.to_string(),
            }
        })?;
        check_statements(name, source)?;
        check_names(&env, name, source)?;
        let used: BTreeSet<String> = tmpl.undeclared_variables(false).into_iter().collect();
        if let Some(unknown) = used
            .iter()
            .find(|v| !ROOTS.contains(&v.as_str()) && !BUILTINS.contains(&v.as_str()))
        {
            let line = line_of(source, unknown)
                .map(|l| format!(", line {l}"))
                .unwrap_or_default();
            return Err(Refusal {
                message: format!(
                    "{name}{line}: {unknown} is not a variable templates can see; did you mean broadcast.{unknown} (a broadcast's variables), variables.{unknown} (send()'s context) or contact.{unknown} (a contact attribute)?"
                ),
                hint: ROOTS_HINT.to_string(),
            });
        }
    }
    Ok(())
}

/// Filters and tests the hint names (a test checks each exists).
const COMMON_FILTERS: [&str; 16] = [
    "default",
    "d",
    "upper",
    "lower",
    "title",
    "capitalize",
    "trim",
    "replace",
    "join",
    "length",
    "first",
    "last",
    "round",
    "int",
    "escape",
    "sort",
];
const COMMON_TESTS: [&str; 7] = [
    "defined",
    "undefined",
    "none",
    "number",
    "string",
    "even",
    "odd",
];

fn filter_hint() -> String {
    format!(
        "Filters include {}; tests include {} (minijinja's built-ins).",
        COMMON_FILTERS.join(", "),
        COMMON_TESTS.join(", ")
    )
}

/// The filter (`| name`) and test (`is name`) names in an expression, in order.
fn filter_and_test_names(expr: &str) -> Vec<(bool, String)> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let ident = |from: usize| -> (usize, String) {
        let mut j = from;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
        (j, expr[from..j].to_string())
    };
    let skip_ws = |mut j: usize| {
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        j
    };
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'|' => {
                let (end, name) = ident(skip_ws(i + 1));
                if !name.is_empty() {
                    out.push((true, name));
                }
                i = end.max(i + 1);
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let (end, word) = ident(i);
                let before_ok = i == 0
                    || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b'.');
                if word == "is" && before_ok {
                    let (mut end2, mut name) = ident(skip_ws(end));
                    if name == "not" {
                        (end2, name) = ident(skip_ws(end2));
                    }
                    if !name.is_empty() {
                        out.push((false, name));
                    }
                    i = end2.max(end);
                } else {
                    i = end;
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// Refuses what needs other templates (`include`, `extends`, `import`): a part is one text, and the
/// engine has no loader, so they would fail only when rendered.
fn check_statements(part: &str, source: &str) -> Result<(), Refusal> {
    for tag in tags(source).into_iter().filter(|t| t.block) {
        let word: String = tag
            .text
            .trim_start_matches(['-', '+'])
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect();
        if matches!(word.as_str(), "include" | "extends" | "import" | "from") {
            return Err(Refusal {
                message: format!(
                    "{part}, line {}: {{% {word} %}} is not supported (a template's parts cannot use other templates)",
                    tag.line
                ),
                hint: "Write the shared part into each template, or use a macro defined in the same part ({% macro name(x) %}…{% endmacro %}).".to_string(),
            });
        }
    }
    Ok(())
}

/// Refuses a filter or a test the engine does not have (they would fail only when rendered).
fn check_names(
    env: &minijinja::Environment<'static>,
    part: &str,
    source: &str,
) -> Result<(), Refusal> {
    for tag in tags(source) {
        for (filter, n) in filter_and_test_names(tag.text) {
            // asked of the engine itself: an unknown name is its own error kind
            let probe = if filter {
                format!("{{{{ none | {n} }}}}")
            } else {
                format!("{{{{ none is {n} }}}}")
            };
            let unknown = match env.render_str(&probe, ()) {
                Err(e) => matches!(
                    e.kind(),
                    minijinja::ErrorKind::UnknownFilter | minijinja::ErrorKind::UnknownTest
                ),
                Ok(_) => false,
            };
            if unknown {
                let what = if filter { "filter" } else { "test" };
                return Err(Refusal {
                    message: format!("{part}, line {}: there is no {what} named {n}", tag.line),
                    hint: filter_hint(),
                });
            }
        }
    }
    Ok(())
}

/// True when a use of a path is allowed to find it missing: `| default(…)` (or `| d`) after it, an
/// `is defined`-style test, or a condition (`{% if … %}`, `… if … else …`).
fn guarded(tag: &Tag<'_>, p: &Path) -> bool {
    let after = tag.text[p.end..].trim_start();
    let filter = after
        .strip_prefix('|')
        .map(|f| f.trim_start())
        .is_some_and(|f| {
            let name: String = f
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            name == "default" || name == "d"
        });
    let test = after.starts_with("is ") || after.starts_with("is\n");
    let head = tag.text.trim_start();
    let condition = tag.block && (head.starts_with("if ") || head.starts_with("elif "));
    filter || test || condition || (!tag.block && tag.text.contains(" if "))
}

/// Checks the `broadcast.<name>` a template uses against a broadcast definition's `variables`: a name
/// the definition does not hold is refused unless the template allows it to be missing somewhere
/// (a default, an `is defined` test, or a condition on it).
pub fn check_broadcast_variables(
    template: &str,
    parts: &[(&str, &str)],
    variables: &Json,
) -> Result<(), Refusal> {
    let held: Vec<&str> = variables
        .as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();
    for (name, source) in parts {
        let tags = tags(source);
        let mut uses: Vec<(String, usize, bool)> = Vec::new();
        for tag in &tags {
            for p in paths(tag.text) {
                if p.root != "broadcast" {
                    continue;
                }
                if let Some(Step::Key(k)) = p.steps.first() {
                    uses.push((k.clone(), tag.line, guarded(tag, &p)));
                }
            }
        }
        for (k, line, _) in &uses {
            if held.contains(&k.as_str()) {
                continue;
            }
            if uses.iter().any(|(k2, _, g)| k2 == k && *g) {
                continue;
            }
            let has = if held.is_empty() {
                "it defines none".to_string()
            } else {
                format!("it defines {}", held.join(", "))
            };
            return Err(Refusal {
                message: format!(
                    "template '{template}' uses broadcast.{k} ({name}, line {line}), which the broadcast's \"variables\" do not hold ({has})"
                ),
                hint: format!(
                    "Add \"{k}\" to the definition's \"variables\" ({{\"variables\": {{\"{k}\": …}}}}), or write {{{{ broadcast.{k} | default(\"…\") }}}} in the template."
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_syntax_error_names_part_and_line() {
        let e = check_template(&[("subject", "Hi"), ("html", "<p>\n{% if contact.x %}\n</p>")])
            .unwrap_err();
        assert!(
            e.message.starts_with("syntax error in html, line 2:"),
            "{}",
            e.message
        );
        assert!(e.hint.contains("{% if … %}"), "{}", e.hint);
        let e = check_template(&[("subject", "Hi {{ contact.first_name")]).unwrap_err();
        assert!(
            e.message.starts_with("syntax error in subject, line 1:"),
            "{}",
            e.message
        );
    }

    #[test]
    fn unknown_roots_are_refused_with_a_suggestion() {
        let e = check_template(&[
            ("subject", "Issue {{ broadcast.n }}"),
            ("html", "a\n\n<b>{{ issue }}</b>"),
        ])
        .unwrap_err();
        assert!(
            e.message.starts_with("html, line 3: issue is not a variable templates can see; did you mean broadcast.issue"),
            "{}",
            e.message
        );
        assert!(e.message.contains("variables.issue"), "{}", e.message);
        assert!(e.hint.contains("unsubscribe_url"), "{}", e.hint);
    }

    #[test]
    fn unknown_filters_and_tests_are_refused() {
        let e = check_template(&[
            ("subject", "Hi"),
            ("html", "<p>\n{{ contact.first_name | uper }}</p>"),
        ])
        .unwrap_err();
        assert_eq!(e.message, "html, line 2: there is no filter named uper");
        let e = check_template(&[("subject", "{% if contact.x is definned %}x{% endif %}")])
            .unwrap_err();
        assert_eq!(
            e.message,
            "subject, line 1: there is no test named definned"
        );
        check_template(&[(
            "subject",
            "{{ contact.a | default('a|b') | upper | d('x') }}{% if contact.x is not defined %}{% endif %}{{ 'x is y' }}",
        )])
        .unwrap();
    }

    #[test]
    fn other_templates_cannot_be_used() {
        let e = check_template(&[
            ("subject", "Hi"),
            ("html", "a\n{% include 'footer.html' %}"),
        ])
        .unwrap_err();
        assert_eq!(
            e.message,
            "html, line 2: {% include %} is not supported (a template's parts cannot use other templates)"
        );
        let e = check_template(&[("html", "{%- extends 'base' %}")]).unwrap_err();
        assert!(e.message.contains("{% extends %}"), "{}", e.message);
        check_template(&[("html", "{% if contact.importer is defined %}{% endif %}")]).unwrap();
    }

    #[test]
    fn the_hint_names_filters_and_tests_that_exist() {
        let env = crate::engine::environment(minijinja::UndefinedBehavior::SemiStrict);
        let uses: Vec<String> = COMMON_FILTERS
            .iter()
            .map(|f| format!("{{{{ x | {f} }}}}"))
            .chain(COMMON_TESTS.iter().map(|t| format!("{{{{ x is {t} }}}}")))
            .collect();
        for source in uses {
            check_names(&env, "t", &source).unwrap_or_else(|e| panic!("{source}: {}", e.message));
        }
    }

    #[test]
    fn known_roots_locals_and_builtins_pass() {
        check_template(&[
            ("subject", "{{ contact.first_name | default('there') }} {{ workspace }}"),
            (
                "html",
                "{% set n = contact.email %}{{ n }}{% for t in contact.tags %}{{ loop.index }}{{ t }}{% endfor %}\
                 {{ range(3) | join(',') }}{{ event.x }}{{ context.y }}{{ variables.z }}{{ broadcast.w }}{{ unsubscribe_url }}\
                 {% macro m(a) %}{{ a }}{% endmacro %}{{ m(1) }}",
            ),
            ("text", "plain"),
        ])
        .unwrap();
    }

    #[test]
    fn broadcast_variables_must_exist_unless_defaulted() {
        let parts = [
            ("subject", "Issue {{ broadcast.issue }}"),
            ("html", "<p>{{ broadcast.title | default('News') }}</p>"),
        ];
        check_broadcast_variables("news", &parts, &json!({"issue": 7})).unwrap();
        let e = check_broadcast_variables("news", &parts, &json!({"title": "x"})).unwrap_err();
        assert_eq!(
            e.message,
            "template 'news' uses broadcast.issue (subject, line 1), which the broadcast's \"variables\" do not hold (it defines title)"
        );
        assert!(e.hint.contains("default"), "{}", e.hint);
        // guarded uses: a test, a condition
        let guarded = [
            (
                "subject",
                "{% if broadcast.issue is defined %}#{{ broadcast.issue }}{% endif %}",
            ),
            (
                "html",
                "{% if broadcast.extra %}{{ broadcast.extra }}{% endif %}",
            ),
        ];
        check_broadcast_variables("news", &guarded, &json!({})).unwrap();
    }

    #[test]
    fn tags_know_their_lines() {
        let t = tags("a\n{{ x }}\n{# c\n #}{% if y %}\n{{ 'a}}' ~ z }}");
        let got: Vec<(usize, &str)> = t.iter().map(|t| (t.line, t.text.trim())).collect();
        assert_eq!(got, [(2, "x"), (4, "if y"), (5, "'a}}' ~ z")]);
    }
}

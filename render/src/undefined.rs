//! Which variable an undefined-value error is about. minijinja's error says only "undefined value"
//! and where (a span of the source); the path is read from that span (or its line) and looked up in
//! the variables, so the message names the first part that is missing: `contact.first_name`, or
//! `event.utm` in `event.utm.source`.

use serde_json::Value as Json;

use crate::vars::ROOTS;

/// One step of a path: `.name`, `[0]` or `["name"]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// A variable path as written in a template: its root and the steps into it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Path {
    pub root: String,
    pub steps: Vec<Step>,
    /// Where the path ends in the expression it was read from.
    pub end: usize,
}

impl Path {
    /// The path with its first `n` steps, written as a template would.
    pub fn display(&self, n: usize) -> String {
        let mut s = self.root.clone();
        for step in &self.steps[..n] {
            match step {
                Step::Key(k) if is_ident(k) => {
                    s.push('.');
                    s.push_str(k);
                }
                Step::Key(k) => s.push_str(&format!("[{}]", Json::from(k.as_str()))),
                Step::Index(i) => s.push_str(&format!("[{i}]")),
            }
        }
        s
    }
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

const KEYWORDS: [&str; 16] = [
    "and", "or", "not", "if", "else", "elif", "in", "is", "true", "false", "none", "True", "False",
    "None", "loop", "self",
];

/// The variable paths an expression mentions, in order (string literals, filter and test names,
/// function names and keywords skipped).
pub fn paths(expr: &str) -> Vec<Path> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    // what came before the current token: a filter/test/attribute name is not a variable
    let mut prev_sig: Option<u8> = None;
    let mut prev_word = String::new();
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' {
            i = skip_string(b, i);
            prev_sig = Some(b'"');
            prev_word.clear();
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            let word = &expr[start..i];
            let is_name = prev_sig != Some(b'.')
                && prev_sig != Some(b'|')
                && prev_word != "is"
                && prev_word != "not_is"
                && !KEYWORDS.contains(&word);
            let mut steps = Vec::new();
            // the steps that follow: .name, [0], ["name"]
            loop {
                let j = skip_ws(b, i);
                if j < b.len() && b[j] == b'.' {
                    let k = skip_ws(b, j + 1);
                    let s = k;
                    let mut e = k;
                    while e < b.len() && (b[e].is_ascii_alphanumeric() || b[e] == b'_') {
                        e += 1;
                    }
                    if e == s {
                        break;
                    }
                    let part = &expr[s..e];
                    steps.push(match part.parse::<usize>() {
                        Ok(n) => Step::Index(n),
                        Err(_) => Step::Key(part.to_string()),
                    });
                    i = e;
                } else if j < b.len() && b[j] == b'[' {
                    let k = skip_ws(b, j + 1);
                    if k < b.len() && (b[k] == b'"' || b[k] == b'\'') {
                        let e = skip_string(b, k);
                        let close = skip_ws(b, e);
                        if close >= b.len() || b[close] != b']' {
                            break;
                        }
                        steps.push(Step::Key(expr[k + 1..e - 1].to_string()));
                        i = close + 1;
                    } else {
                        let mut e = k;
                        while e < b.len() && b[e].is_ascii_digit() {
                            e += 1;
                        }
                        let close = skip_ws(b, e);
                        if e == k || close >= b.len() || b[close] != b']' {
                            break;
                        }
                        steps.push(Step::Index(expr[k..e].parse().unwrap_or(0)));
                        i = close + 1;
                    }
                } else {
                    break;
                }
            }
            let called = {
                let j = skip_ws(b, i);
                j < b.len() && b[j] == b'('
            };
            if is_name && !(called && steps.is_empty()) {
                out.push(Path {
                    root: word.to_string(),
                    steps,
                    end: i,
                });
            }
            prev_word = if prev_word == "is" && word == "not" {
                "not_is".to_string()
            } else {
                word.to_string()
            };
            prev_sig = Some(b'a');
            continue;
        }
        if !c.is_ascii_whitespace() {
            prev_sig = Some(c);
            prev_word.clear();
        }
        i += 1;
    }
    out
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The index just after the string literal starting at `i`.
fn skip_string(b: &[u8], i: usize) -> usize {
    let q = b[i];
    let mut j = i + 1;
    while j < b.len() && b[j] != q {
        if b[j] == b'\\' {
            j += 1;
        }
        j += 1;
    }
    (j + 1).min(b.len())
}

/// How many steps of `path` exist in `vars`; `None` when all of them do.
pub fn missing_at(path: &Path, vars: &Json) -> Option<usize> {
    let mut v = vars.get(&path.root)?;
    for (n, step) in path.steps.iter().enumerate() {
        let next = match (step, v) {
            (Step::Key(k), Json::Object(m)) => m.get(k),
            (Step::Index(i), Json::Array(a)) => a.get(*i),
            _ => None,
        };
        match next {
            Some(x) => v = x,
            None => return Some(n),
        }
    }
    None
}

/// The explanation of an undefined-value error in `source`: the variable and how to allow it to be
/// missing.
pub fn explain(source: &str, e: &minijinja::Error, vars: &Json) -> String {
    let range = e
        .range()
        .filter(|r| r.end <= source.len() && source.is_char_boundary(r.start));
    let span = range.clone().map(|r| widen(source, r));
    let line = e
        .line()
        .and_then(|l| source.lines().nth(l.saturating_sub(1)));
    let at_line = e.line().map(|l| format!(" (line {l})")).unwrap_or_default();
    // the expressions to read names from: the span, then the tags of the error's line (not the raw
    // line: its HTML is no expression)
    let line_tags: Vec<&str> = line
        .map(|l| {
            crate::validate::tags(l)
                .into_iter()
                .map(|t| t.text)
                .collect()
        })
        .unwrap_or_default();
    // a span that is a filter's or a test's name names no variable
    let span_is_name = range.is_some_and(|r| {
        let before = source[..r.start].trim_end();
        !before.ends_with('|') && !before.ends_with(" is")
    });
    let texts: Vec<&str> = span.into_iter().chain(line_tags.iter().copied()).collect();
    // a variable of the context, missing from what this job has
    for text in &texts {
        for p in paths(text) {
            if !ROOTS.contains(&p.root.as_str()) {
                continue;
            }
            if vars.get(&p.root).is_none() {
                // the only root a job may lack: the daemon makes it with its HTTP side
                return format!(
                    "{} is not defined{at_line}: the daemon makes it only when its HTTP side is configured (HERALD_HTTP_ADDR)",
                    p.root
                );
            }
            if let Some(n) = missing_at(&p, vars) {
                return if n + 1 == p.steps.len() {
                    let full = p.display(n + 1);
                    format!(
                        "{full} is not defined{at_line}; write {{{{ {full} | default(\"…\") }}}} if it may be missing"
                    )
                } else {
                    let part = p.display(n + 1);
                    format!(
                        "{part} is not defined{at_line} (in {}); test it with {{% if {part} is defined %}}…{{% endif %}} if it may be missing",
                        p.display(p.steps.len())
                    )
                };
            }
        }
    }
    // a name that is not a variable of the context (a template saved before names were checked)
    let names = line_tags
        .iter()
        .copied()
        .chain(span.filter(|_| span_is_name));
    for text in names {
        if let Some(p) = paths(text)
            .into_iter()
            .find(|p| !ROOTS.contains(&p.root.as_str()))
        {
            if p.steps.is_empty() {
                return format!(
                    "{} is not defined{at_line}; templates see {} (did you mean broadcast.{} or variables.{}?)",
                    p.root,
                    ROOTS.join(", "),
                    p.root,
                    p.root
                );
            }
            return format!("{} is not defined{at_line}", p.display(p.steps.len()));
        }
    }
    match span {
        Some(s) => format!("an undefined value in `{}`{at_line}", s.trim()),
        None => format!("an undefined value{at_line}"),
    }
}

/// The span, widened to the left over a path it continues (`.utm.source` → `event.utm.source`).
fn widen(source: &str, r: std::ops::Range<usize>) -> &str {
    let b = source.as_bytes();
    let mut start = r.start;
    if matches!(b.get(start), Some(b'.') | Some(b'[')) {
        while start > 0 {
            let c = b[start - 1];
            if c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'[' | b']' | b'"' | b'\'') {
                start -= 1;
            } else {
                break;
            }
        }
    }
    &source[start..r.end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(expr: &str) -> Vec<String> {
        paths(expr)
            .iter()
            .map(|p| p.display(p.steps.len()))
            .collect()
    }

    #[test]
    fn paths_skip_filters_tests_strings_and_keywords() {
        assert_eq!(names("contact.first_name"), ["contact.first_name"]);
        assert_eq!(
            names("contact.a ~ ' x.y ' ~ event.utm['source'] | default('z')"),
            ["contact.a", "event.utm.source"]
        );
        assert_eq!(
            names("contact.tags[0] if contact.tags is not defined else range(3)"),
            ["contact.tags[0]", "contact.tags"]
        );
        assert_eq!(
            names("contact[\"first name\"]"),
            ["contact[\"first name\"]"]
        );
        assert_eq!(names("x is defined and not y"), ["x", "y"]);
    }

    #[test]
    fn missing_names_the_first_missing_step() {
        let vars = serde_json::json!({"contact": {"email": "a@b.c", "tags": ["x"]}, "event": null});
        let p = |s: &str| paths(s).remove(0);
        assert_eq!(missing_at(&p("contact.email"), &vars), None);
        assert_eq!(missing_at(&p("contact.first_name"), &vars), Some(0));
        assert_eq!(missing_at(&p("contact.tags[0]"), &vars), None);
        assert_eq!(missing_at(&p("contact.tags[1]"), &vars), Some(1));
        assert_eq!(missing_at(&p("event.utm.source"), &vars), Some(0));
    }
}

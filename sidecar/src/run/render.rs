//! Templates: email subject/html/text and webhook bodies, rendered with minijinja (Jinja2 syntax).
//! Variables: `contact` (attributes + email, timezone, tags), `context` (the enrollment's collected
//! webhook replies), `event` (the triggering event's payload), `variables` (send()'s context),
//! `broadcast`, `workspace`. HTML is auto-escaped; subject, text and webhook strings are not.
//! A missing attribute renders as empty (`{{ contact.first_name | default("there") }}`); an error in a
//! template fails that one job permanently, with the error in the message.

//!
//! Bounds (issue 11: one tenant's template must not stop the others): a render may produce at most
//! [`MAX_OUTPUT`] bytes in all (subject, bodies, webhook strings of one job), spend at most [`FUEL`]
//! instructions, take at most [`RENDER_TIMEOUT`] and use at most [`WORKER_MEMORY`] of memory. Going over
//! any of them fails that job permanently with a message naming the bound. The memory and time bounds
//! need a process of their own, as minijinja has no hook to stop a single huge allocation (a template
//! that doubles a string 28 times asks for 2 GiB in one `~`, and Rust aborts the process when an
//! allocation fails): templates run in render workers, child processes of `herald run` (the same
//! binary, started with `HERALD_INTERNAL_RENDER_WORKER=1`) under `RLIMIT_AS`, one request at a time
//! each, over a pipe. A worker that dies or overruns is replaced, and only the job it was rendering
//! fails. Strings without template syntax are never sent to a worker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

/// Upper bound on the work one template may do (loops over huge ranges end with an error, not a hang).
const FUEL: u64 = 2_000_000;
/// Upper bound on what one job's templates produce together.
pub const MAX_OUTPUT: usize = 2 * 1024 * 1024;
/// Upper bound on one render request's wall-clock time (the worker is killed after it).
pub const RENDER_TIMEOUT: Duration = Duration::from_secs(10);
/// Address space of a render worker (`RLIMIT_AS`).
pub const WORKER_MEMORY: u64 = 512 * 1024 * 1024;
/// The environment variable that turns `herald run` into a render worker.
pub const WORKER_ENV: &str = "HERALD_INTERNAL_RENDER_WORKER";

/// True in a process started as a render worker: its `main` calls [`worker_main`] and nothing else.
pub fn is_worker() -> bool {
    std::env::var_os(WORKER_ENV).is_some()
}

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

    /// `contact`, `context`, `event`, `variables`, `broadcast`, `workspace` (+ `unsubscribe_url`).
    fn value(&self) -> Value {
        let p = &self.payload;
        let field = |k: &str| Value::from_serialize(p.get(k).unwrap_or(&Json::Null));
        let base = minijinja::context! {
            contact => field("contact"),
            context => field("context"),
            event => field("event"),
            variables => field("variables"),
            broadcast => field("broadcast"),
            workspace => self.workspace.as_str(),
        };
        match &self.unsubscribe_url {
            Some(url) => minijinja::context! { unsubscribe_url => url, ..base },
            None => base,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct RenderedEmail {
    pub subject: String,
    pub html: String,
    pub text: String,
}

/// The template engine itself, in process: what a render worker runs, and what renders strings
/// without template syntax (nothing to run) in the daemon.
pub struct Engine {
    env: Environment<'static>,
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

fn has_syntax(source: &str) -> bool {
    source.contains("{{") || source.contains("{%") || source.contains("{#")
}

fn json_has_syntax(value: &Json) -> bool {
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

impl Engine {
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
    /// (`*.html` is HTML-escaped). `left`: the output budget still available.
    fn render_bounded(
        &self,
        name: &str,
        source: &str,
        vars: &Value,
        left: &mut usize,
    ) -> Result<String, String> {
        if !has_syntax(source) {
            if source.len() > *left {
                return Err(over_output(name));
            }
            *left -= source.len();
            return Ok(source.to_string());
        }
        let tmpl = self
            .env
            .template_from_named_str(name, source)
            .map_err(|e| format!("template error in {name}: {}", describe(&e)))?;
        let mut out = Bounded {
            out: Vec::new(),
            left,
            over: false,
        };
        match tmpl.render_captured_to(vars, &mut out) {
            Ok(_) => String::from_utf8(out.out)
                .map_err(|_| format!("template error in {name}: the output is not UTF-8")),
            Err(_) if out.over => Err(over_output(name)),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(format!(
                "template error in {name}: the template does too much work (over {FUEL} steps)"
            )),
            Err(e) => Err(format!("template error in {name}: {}", describe(&e))),
        }
    }

    fn render_json_bounded(
        &self,
        name: &str,
        value: &Json,
        vars: &Value,
        left: &mut usize,
    ) -> Result<Json, String> {
        Ok(match value {
            Json::String(s) => Json::String(self.render_bounded(name, s, vars, left)?),
            Json::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, v) in items.iter().enumerate() {
                    out.push(self.render_json_bounded(&format!("{name}[{i}]"), v, vars, left)?);
                }
                Json::Array(out)
            }
            Json::Object(map) => {
                let mut out = serde_json::Map::new();
                for (k, v) in map {
                    let v = self.render_json_bounded(&format!("{name}.{k}"), v, vars, left)?;
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
    ) -> Result<Vec<Json>, String> {
        let value = vars.value();
        let mut left = MAX_OUTPUT;
        fields
            .iter()
            .map(|(name, v)| self.render_json_bounded(name, v, &value, &mut left))
            .collect()
    }

    /// One template source (unit tests).
    #[cfg(test)]
    pub fn render(&self, name: &str, source: &str, vars: &Vars) -> Result<String, String> {
        let mut left = MAX_OUTPUT;
        self.render_bounded(name, source, &vars.value(), &mut left)
    }

    /// Renders every string inside a JSON document (object keys stay as they are).
    #[cfg(test)]
    pub fn render_json(&self, name: &str, value: &Json, vars: &Vars) -> Result<Json, String> {
        let mut left = MAX_OUTPUT;
        self.render_json_bounded(name, value, &vars.value(), &mut left)
    }

    /// The email of a claimed job, in process (unit tests).
    #[cfg(test)]
    pub fn render_email(&self, template: &Json, vars: &Vars) -> Result<RenderedEmail, String> {
        let fields = email_fields(template)?;
        finish_email(self.render_fields(&fields, vars)?)
    }
}

/// The parts of a template (`{"key", "version", "subject", "html", "text"}`) to render.
fn email_fields(template: &Json) -> Result<Vec<(String, Json)>, String> {
    let part = |k: &str| template.get(k).and_then(Json::as_str);
    let key = part("key").unwrap_or("?");
    let subject = part("subject").ok_or_else(|| format!("template {key:?} has no subject"))?;
    let html = part("html").ok_or_else(|| format!("template {key:?} has no html"))?;
    let mut fields = vec![
        ("subject".to_string(), Json::from(subject)),
        ("body.html".to_string(), Json::from(html)),
    ];
    if let Some(text) = part("text") {
        fields.push(("body.txt".to_string(), Json::from(text)));
    }
    Ok(fields)
}

/// Subject on one line; without a text part, one derived from the rendered HTML.
fn finish_email(rendered: Vec<Json>) -> Result<RenderedEmail, String> {
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
    Ok(RenderedEmail {
        subject,
        html,
        text,
    })
}

/// A render request to a worker, and its answer.
#[derive(Serialize, Deserialize)]
struct Request {
    fields: Vec<(String, Json)>,
    vars: Vars,
}

#[derive(Serialize, Deserialize)]
enum Answer {
    #[serde(rename = "ok")]
    Ok(Vec<Json>),
    #[serde(rename = "err")]
    Err(String),
}

/// Why a render gave nothing: the job's templates (a permanent failure of that job), or no render
/// worker could be started (not the job's fault: retried).
#[derive(Debug, PartialEq, Eq)]
pub enum RenderError {
    Template(String),
    Unavailable(String),
}

impl From<String> for RenderError {
    fn from(e: String) -> Self {
        Self::Template(e)
    }
}

impl RenderError {
    pub fn outcome(self) -> super::job::Outcome {
        match self {
            Self::Template(e) => super::job::Outcome::permanent(e),
            Self::Unavailable(e) => super::job::Outcome::retry(e),
        }
    }
}

/// Renders for the executors: in render workers (child processes with memory and time bounds), or,
/// in unit tests and for strings without template syntax, in process.
pub struct Renderer {
    engine: Engine,
    /// How to start a worker: program and arguments (this binary, `run`).
    command: (std::path::PathBuf, Vec<String>),
    workers: Vec<Mutex<Option<Worker>>>,
    next: AtomicUsize,
}

impl Default for Renderer {
    fn default() -> Self {
        Self::new()
    }
}

struct Worker {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: BufReader<tokio::process::ChildStdout>,
}

impl Renderer {
    /// Renders in process (unit tests): no memory or time bound beyond fuel and output.
    pub fn new() -> Self {
        Self {
            engine: Engine::new(),
            command: (std::path::PathBuf::new(), Vec::new()),
            workers: Vec::new(),
            next: AtomicUsize::new(0),
        }
    }

    /// Renders in `n` worker processes (started on first use, replaced when one fails).
    pub fn isolated(n: usize) -> Self {
        let exe = std::env::current_exe().unwrap_or_else(|_| "herald".into());
        Self::isolated_with(n, exe, vec!["run".to_string()])
    }

    fn isolated_with(n: usize, program: std::path::PathBuf, args: Vec<String>) -> Self {
        Self {
            engine: Engine::new(),
            command: (program, args),
            workers: (0..n.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Renders named fields (see [`Engine::render_fields`]).
    pub async fn render_fields(
        &self,
        fields: Vec<(String, Json)>,
        vars: &Vars,
    ) -> Result<Vec<Json>, RenderError> {
        if self.workers.is_empty() || !fields.iter().any(|(_, v)| json_has_syntax(v)) {
            return Ok(self.engine.render_fields(&fields, vars)?);
        }
        let names = fields
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let request = serde_json::to_string(&Request {
            fields,
            vars: vars.clone(),
        })
        .map_err(|e| format!("cannot pass the variables to the renderer: {e}"))?;
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let mut slot = self.workers[i].lock().await;
        if slot.is_none() {
            *slot = Some(Worker::start(&self.command).map_err(|e| {
                RenderError::Unavailable(format!("cannot start a render worker: {e}"))
            })?);
        }
        let worker = slot.as_mut().expect("started above");
        let answer = tokio::time::timeout(RENDER_TIMEOUT, worker.ask(&request)).await;
        match answer {
            Ok(Ok(Answer::Ok(values))) => Ok(values),
            Ok(Ok(Answer::Err(e))) => Err(e.into()),
            Ok(Err(died)) => {
                let mut worker = slot.take().expect("present");
                let _ = worker.child.start_kill();
                let status = worker.child.wait().await.ok();
                tracing::warn!(?status, %died, "render worker stopped while rendering; replaced");
                Err(format!(
                    "template error in {names}: rendering needed more than {} MiB of memory (the render process stopped)",
                    WORKER_MEMORY / (1024 * 1024)
                ).into())
            }
            Err(_) => {
                let mut worker = slot.take().expect("present");
                let _ = worker.child.start_kill();
                let _ = worker.child.wait().await;
                tracing::warn!(
                    "render worker overran {} s; replaced",
                    RENDER_TIMEOUT.as_secs()
                );
                Err(format!(
                    "template error in {names}: rendering took more than {} s",
                    RENDER_TIMEOUT.as_secs()
                )
                .into())
            }
        }
    }

    pub async fn render_email(
        &self,
        template: &Json,
        vars: &Vars,
    ) -> Result<RenderedEmail, RenderError> {
        let fields = email_fields(template)?;
        Ok(finish_email(self.render_fields(fields, vars).await?)?)
    }
}

impl Worker {
    fn start((program, args): &(std::path::PathBuf, Vec<String>)) -> std::io::Result<Self> {
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .env(WORKER_ENV, "1")
            // a worker that runs out of memory aborts at once, without a slow backtrace
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    /// One request, one answer line; an error means the worker is gone.
    async fn ask(&mut self, request: &str) -> std::io::Result<Answer> {
        self.stdin.write_all(request.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await?;
        loop {
            let mut line = String::new();
            if self.stdout.read_line(&mut line).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the render worker exited",
                ));
            }
            // answers are marked, so that nothing else a process prints is taken for one
            if let Some(at) = line.find(ANSWER_MARK) {
                let answer = &line[at + ANSWER_MARK.len()..];
                return serde_json::from_str(answer).map_err(std::io::Error::other);
            }
        }
    }
}

/// Starts every answer line of a worker.
const ANSWER_MARK: &str = "\u{1e}herald-render ";

/// The render worker's main loop (`herald run` with [`WORKER_ENV`] set): limits its own address
/// space, then answers one request line with one answer line until stdin closes.
pub fn worker_main() -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    let limit = libc::rlimit {
        rlim_cur: WORKER_MEMORY,
        rlim_max: WORKER_MEMORY,
    };
    // SAFETY: setrlimit reads the struct it is given and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } != 0 {
        anyhow::bail!(
            "render worker: setrlimit failed: {}",
            std::io::Error::last_os_error()
        );
    }
    let engine = Engine::new();
    let stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lines() {
        let line = line?;
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(r) => match engine.render_fields(&r.fields, &r.vars) {
                Ok(v) => Answer::Ok(v),
                Err(e) => Answer::Err(e),
            },
            Err(e) => Answer::Err(format!("render worker: bad request: {e}")),
        };
        stdout.write_all(ANSWER_MARK.as_bytes())?;
        serde_json::to_writer(&mut stdout, &answer)?;
        stdout.write_all(b"\n")?;
        stdout.flush()?;
    }
    Ok(())
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
        let r = Engine::new();
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
        let r = Engine::new();
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
        let r = Engine::new();
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
        // runaway loops run out of fuel
        let e = r.render(
            "t",
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            &v,
        );
        assert!(e.is_err());
    }

    /// What the reported attack looked like: 28 doublings of a string, 2 GiB at the end.
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
        let err = e.render("body.html", &t, &v).unwrap_err();
        assert!(err.contains("over 2 MiB"), "{err}");
        // the bound is per job: two parts of 1.5 MiB each do not fit together
        let big = "x".repeat(1536 * 1024);
        let fields = vec![
            ("subject".to_string(), Json::from("{{ 1 }}")),
            (
                "body.html".to_string(),
                Json::from(format!("{{{{ 1 }}}}{big}")),
            ),
            (
                "body.txt".to_string(),
                Json::from(format!("{{{{ 2 }}}}{big}")),
            ),
        ];
        let err = e.render_fields(&fields, &v).unwrap_err();
        assert!(
            err.starts_with("template error in body.txt") && err.contains("over 2 MiB"),
            "{err}"
        );
        // just under: fine
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

    /// This test binary stands in for `herald run` as a render worker (see below).
    fn test_worker() -> Renderer {
        let exe = std::env::current_exe().unwrap();
        Renderer::isolated_with(
            1,
            exe,
            [
                "--exact",
                "run::render::tests::render_worker_entry",
                "--nocapture",
                "--test-threads=1",
            ]
            .map(String::from)
            .to_vec(),
        )
    }

    /// Not a test of its own: the entry point of the worker processes `test_worker` starts.
    #[test]
    fn render_worker_entry() {
        if std::env::var_os(WORKER_ENV).is_some() {
            worker_main().unwrap();
        }
    }

    #[tokio::test]
    async fn a_template_that_doubles_a_string_28_times_fails_its_job_not_the_process() {
        let r = test_worker();
        let v = vars();
        let bomb = doubling(28);
        assert!(bomb.len() < 600, "a small template: {}", bomb.len());
        let t = json!({"key": "bomb", "subject": "s", "html": bomb});
        let err = r.render_email(&t, &v).await.unwrap_err();
        match &err {
            RenderError::Template(e) => assert!(e.contains("more than 512 MiB of memory"), "{e}"),
            other => panic!("{other:?}"),
        }
        // the worker was replaced: the next job renders
        let t = json!({"key": "ok", "subject": "Hi {{ contact.first_name }}", "html": "<p>{{ workspace }}</p>"});
        let m = r.render_email(&t, &v).await.unwrap();
        assert_eq!(
            (m.subject.as_str(), m.html.as_str()),
            ("Hi Ann", "<p>acme</p>")
        );
        // errors and bounds other than memory come back as the job's error, the worker stays
        let t = json!({"key": "k", "subject": "{{ nope( }}", "html": "x"});
        assert!(
            matches!(r.render_email(&t, &v).await, Err(RenderError::Template(e)) if e.contains("subject"))
        );
        // and plain text never needs a worker
        let plain = Renderer::isolated_with(1, "/nonexistent".into(), vec![]);
        let t = json!({"key": "k", "subject": "s", "html": "<p>h</p>"});
        assert_eq!(plain.render_email(&t, &v).await.unwrap().text, "h\n");
        let t = json!({"key": "k", "subject": "{{ 1 }}", "html": "<p>h</p>"});
        assert!(matches!(
            plain.render_email(&t, &v).await,
            Err(RenderError::Unavailable(_))
        ));
    }

    #[test]
    fn json_bodies_render_strings_recursively() {
        let r = Engine::new();
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

//! Templates in the daemon: the engine is the `herald-render` crate (the same one the extension
//! validates and previews with: one implementation); this module runs it in render workers.
//! Email parts render strictly (an undefined variable fails the job with its name); webhook bodies
//! render a missing value as nothing. An error in a template fails that one job permanently, with
//! the error in the message.
//!
//! Bounds (issue 11: one tenant's template must not stop the others): a render may produce at most
//! [`MAX_OUTPUT`] bytes in all (subject, bodies, webhook strings of one job), spend at most
//! `herald_render::FUEL` instructions, take at most [`RENDER_TIMEOUT`] and use at most
//! [`WORKER_MEMORY`] of memory. Going over any of them fails that job permanently with a message
//! naming the bound. The memory and time bounds need a process of their own, as minijinja has no
//! hook to stop a single huge allocation: templates run in render workers, child processes of
//! `herald run` (the same binary, started with `HERALD_INTERNAL_RENDER_WORKER=1`) under `RLIMIT_AS`,
//! one request at a time each, over a pipe. A worker that dies or overruns is replaced, and only the
//! job it was rendering fails. Strings without template syntax are never sent to a worker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use herald_render::engine::json_has_syntax;
use herald_render::sandbox;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

pub use herald_render::text::decode_entities;
pub use herald_render::{Engine, RenderedEmail, Undefined, Vars, MAX_OUTPUT};

/// Upper bound on one render request's wall-clock time (the worker is killed after it).
pub const RENDER_TIMEOUT: Duration = sandbox::TIMEOUT;
/// Address space of a render worker (`RLIMIT_AS`).
pub const WORKER_MEMORY: u64 = sandbox::MEMORY;
/// The environment variable that turns `herald run` into a render worker.
pub const WORKER_ENV: &str = "HERALD_INTERNAL_RENDER_WORKER";

/// True in a process started as a render worker: its `main` calls [`worker_main`] and nothing else.
pub fn is_worker() -> bool {
    std::env::var_os(WORKER_ENV).is_some()
}

/// A render request to a worker, and its answer.
#[derive(Serialize, Deserialize)]
struct Request {
    fields: Vec<(String, Json)>,
    vars: Vars,
    #[serde(default)]
    undefined: Undefined,
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

    /// Renders a webhook's named fields (see [`Engine::render_fields`]); a missing value renders
    /// as nothing.
    pub async fn render_fields(
        &self,
        fields: Vec<(String, Json)>,
        vars: &Vars,
    ) -> Result<Vec<Json>, RenderError> {
        self.render(fields, vars, Undefined::Empty).await
    }

    async fn render(
        &self,
        fields: Vec<(String, Json)>,
        vars: &Vars,
        undefined: Undefined,
    ) -> Result<Vec<Json>, RenderError> {
        if self.workers.is_empty() || !fields.iter().any(|(_, v)| json_has_syntax(v)) {
            return Ok(self.engine.render_fields(&fields, vars, undefined)?);
        }
        let names = fields
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let request = serde_json::to_string(&Request {
            fields,
            vars: vars.clone(),
            undefined,
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
                Err(sandbox::memory_message(&names).into())
            }
            Err(_) => {
                let mut worker = slot.take().expect("present");
                let _ = worker.child.start_kill();
                let _ = worker.child.wait().await;
                tracing::warn!(
                    "render worker overran {} s; replaced",
                    RENDER_TIMEOUT.as_secs()
                );
                Err(sandbox::timeout_message(&names).into())
            }
        }
    }

    /// An email template's parts (`{"key", "subject", "html", "text"}`), strictly.
    pub async fn render_email(
        &self,
        template: &Json,
        vars: &Vars,
    ) -> Result<RenderedEmail, RenderError> {
        let fields = herald_render::email_fields(template)?;
        let rendered = self.render(fields, vars, Undefined::Fail).await?;
        Ok(herald_render::finish_email(rendered, vars)?)
    }
}

/// The longest line of a worker's stderr relayed to the log; the rest is cut.
const MAX_STDERR_LINE: usize = 1000;

/// A worker's own messages (Rust's "memory allocation of … bytes failed" before it aborts) as WARN
/// lines of the daemon's log, in its format: written straight to the shared stderr, a plain line
/// would break a log of JSON lines. Ends when the worker does.
async fn relay_stderr(stderr: tokio::process::ChildStderr) {
    let mut lines = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        // at most this much of one line is held (4 bytes a character); the rest is read as the next
        let mut bounded = (&mut lines).take(4 * MAX_STDERR_LINE as u64);
        match bounded.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end();
                if !text.is_empty() {
                    let cut: String = text.chars().take(MAX_STDERR_LINE).collect();
                    tracing::warn!(worker_said = %cut, "render worker");
                }
            }
        }
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
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        tokio::spawn(relay_stderr(child.stderr.take().expect("piped")));
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
            Ok(r) => match engine.render_fields(&r.fields, &r.vars, r.undefined) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars() -> Vars {
        Vars::from_payload(
            "acme",
            &json!({"contact": {"email": "ann@example.com", "first_name": "Ann"}}),
        )
    }

    fn doubling(times: usize) -> String {
        let mut t = String::from("{% set s = \"12345678\" %}");
        for _ in 0..times {
            t.push_str("{% set s = s ~ s %}");
        }
        t.push_str("{{ s|length }}");
        t
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

    #[tokio::test]
    async fn emails_render_strictly_webhook_bodies_leniently() {
        let r = test_worker();
        let v = vars();
        let t = json!({"key": "k", "subject": "Hi {{ contact.nickname }}", "html": "<p>x</p>"});
        match r.render_email(&t, &v).await {
            Err(RenderError::Template(e)) => assert!(
                e.starts_with("template error in subject: contact.nickname is not defined"),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
        let fields = vec![("body".to_string(), json!({"n": "[{{ contact.nickname }}]"}))];
        assert_eq!(
            r.render_fields(fields, &v).await.unwrap(),
            vec![json!({"n": "[]"})]
        );
    }
}

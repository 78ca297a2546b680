//! The step engine: the in-memory part of `herald.tick()`.
//!
//! SQL locks a batch of due enrollments and hands them here; [`advance`] moves
//! each one through consecutive non-waiting nodes until it parks (a job, a
//! delay, an event, an approval), ends, or hits the per-tick cap, and reports
//! everything SQL must write back: the enrollment's new state, at most one
//! outbox job, a contact update, step-log entries and stats deltas.
//!
//! Everything here is a pure function of its input: no clock (`now` is passed
//! in), no randomness, no database. Re-running the same input gives the same
//! outcome, which is what makes the SQL side idempotent:
//! - job dedupe keys are built from the enrollment, the node and the visit
//!   counter of that node execution, so a re-run enqueues nothing new
//!   (`ON CONFLICT` on the key);
//! - a split picks its arm from a stable hash of (enrollment id, node id,
//!   visit) instead of a random number, so a re-run picks the same arm while
//!   different enrollments spread over the arms in proportion to the weights.
//!
//! Visits: every node execution increments `visit` and logs with the new
//! value. Resolving a timed-out wait (and an automation goal met) does not
//! execute a node, so it logs with the current visit and does not increment.

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use serde_json::{json, Map, Value};

use crate::condition::{Condition, Facts};
use crate::definition::{Automation, DelaySpec, Node, NodeKind};

/// Enrollment status, as stored in `herald.enrollments.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    Waiting,
    Completed,
    Exited,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Waiting => "waiting",
            Status::Completed => "completed",
            Status::Exited => "exited",
            Status::Failed => "failed",
        }
    }

    /// The inverse of [`Status::as_str`].
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "active" => Status::Active,
            "waiting" => Status::Waiting,
            "completed" => Status::Completed,
            "exited" => Status::Exited,
            "failed" => Status::Failed,
            _ => return None,
        })
    }

    /// Completed, exited or failed: the enrollment will never run again.
    pub fn is_ended(self) -> bool {
        matches!(self, Status::Completed | Status::Exited | Status::Failed)
    }
}

/// One due enrollment.
///
/// Why it is due: `Active` = run its current node (arrival); `Waiting` = its
/// wait timed out (it is parked on a wait_event or approval node whose timeout
/// passed).
#[derive(Debug, Clone)]
pub struct StepInput<'a> {
    pub enrollment_id: i64,
    pub automation_id: i64,
    pub automation: &'a Automation,
    /// Active or Waiting; an ended status is returned unchanged.
    pub status: Status,
    /// Current node id.
    pub node: String,
    /// Count of node executions so far for this enrollment (monotonic).
    pub visit: i32,
    /// Enrollment context object (webhook/decide replies are stored under node ids).
    pub context: Value,
    /// Contact facts object: attributes + "email", "timezone", "tags" (array).
    pub contact: Value,
    /// The triggering event's payload (conditions read `event.*`).
    pub event: Option<Value>,
    /// The contact's zone for delay windows; `None` means UTC.
    pub timezone: Option<Tz>,
    pub now: DateTime<Utc>,
    /// Node executions allowed in this call (SQL passes 50); 0 counts as 1.
    pub max_transitions: u32,
}

/// Everything SQL must write for one enrollment.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub enrollment_id: i64,
    pub status: Status,
    /// The node the enrollment is now at.
    pub node: String,
    /// `None` = never by time (parked on a job, an event without timeout, an
    /// approval without timeout, or ended).
    pub next_run_at: Option<DateTime<Utc>>,
    /// What a Waiting enrollment waits for.
    pub wait: Option<Wait>,
    /// Updated visit counter.
    pub visit: i32,
    /// The context (unchanged by the step engine).
    pub context: Value,
    /// Why the enrollment ended, for ended statuses.
    pub exit_reason: Option<String>,
    /// At most one outbox job per call: the step parks right after queueing it.
    pub job: Option<Job>,
    /// Merged across all update_contact nodes passed in this call.
    pub contact_update: Option<ContactUpdate>,
    /// One entry per node executed, in order (plus timeout / goal notes).
    pub log: Vec<LogEntry>,
    /// Stats deltas to append.
    pub counts: Vec<Count>,
}

/// What a Waiting enrollment waits for.
#[derive(Debug, Clone, PartialEq)]
pub enum Wait {
    /// An outbox job (email, webhook, decide) to finish.
    Job,
    /// An event of `kind`; `filter` is the condition as JSON, for SQL to
    /// evaluate against arriving events.
    Event { kind: String, filter: Option<Value> },
    /// A human decision via `herald.decide_approval`.
    Approval,
}

impl Wait {
    /// `wait_kind` as stored: "job", "event" or "approval".
    pub fn kind_str(&self) -> &'static str {
        match self {
            Wait::Job => "job",
            Wait::Event { .. } => "event",
            Wait::Approval => "approval",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Email,
    Webhook,
    Decide,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Email => "email",
            JobKind::Webhook => "webhook",
            JobKind::Decide => "decide",
        }
    }
}

/// An outbox job to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub kind: JobKind,
    pub node: String,
    /// `a{automation_id}:e{enrollment_id}:{node}:{visit}` with the visit of
    /// this node execution: stable across re-runs, distinct per visit.
    pub dedupe_key: String,
    /// Email: the node's provider; webhook/decide: None.
    pub provider: Option<String>,
    /// Webhook/decide: lower-cased host of the url; email: None.
    pub rate_host: Option<String>,
    /// email → {"template", "provider"}; webhook → {"url", "method",
    /// "headers", "body", "timeout_ms"}; decide → webhook's plus {"field",
    /// "paths", "default", "cache_ttl_seconds"}; always also {"node"}.
    pub payload: Value,
    /// Next node after success (None = the enrollment completes); None for
    /// decide (SQL picks from the reply using payload.paths/field/default).
    pub on_success: Option<String>,
    /// Node for a permanent failure (None = the enrollment fails).
    pub on_error: Option<String>,
    /// Decide only: see [`request_hash`].
    pub request_hash: Option<String>,
}

/// Changes to the contact, merged over every update_contact node passed.
/// No value is ever in both an add and the matching remove list.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContactUpdate {
    /// Attributes to set; null removes the attribute.
    pub set: Map<String, Value>,
    pub add_tags: Vec<String>,
    pub remove_tags: Vec<String>,
    pub add_lists: Vec<String>,
    pub remove_lists: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    pub node: String,
    pub node_type: &'static str,
    /// e.g. "entered", "branch -> crm", "split -> a", "delayed until 2026-…",
    /// "queued email", "waiting for event signup", "goal reached", "exit".
    pub action: String,
    pub visit: i32,
}

/// One stats delta. Metrics: "entered", "completed" (per node), "goal" (per
/// goal node, or `node: None` for the automation goal), "queued" (per email /
/// webhook / decide node), "exited", "completed_journey", "failed" (`node: None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Count {
    pub node: Option<String>,
    pub metric: &'static str,
}

/// Runs one enrollment until it parks, ends or reaches the cap.
pub fn advance(input: StepInput) -> Outcome {
    advance_returning(input).0
}

/// [`advance`], also handing back the input's contact facts (with this call's update_contact
/// changes applied, as its later conditions saw them) and event, so a caller that runs the same
/// contact again (the dry run, `simulate.rs`) moves them in and out instead of cloning them per call.
pub fn advance_returning(input: StepInput) -> (Outcome, Value, Option<Value>) {
    let mut run = Run {
        automation: input.automation,
        automation_id: input.automation_id,
        contact: input.contact,
        event: input.event,
        timezone: input.timezone,
        now: input.now,
        out: Outcome {
            enrollment_id: input.enrollment_id,
            status: input.status,
            node: input.node,
            next_run_at: None,
            wait: None,
            visit: input.visit,
            context: input.context,
            exit_reason: None,
            job: None,
            contact_update: None,
            log: Vec::new(),
            counts: Vec::new(),
        },
    };
    let due = match input.status {
        Status::Active => true,
        Status::Waiting => run.timed_out(),
        // Not due by definition; nothing to do.
        _ => false,
    };
    if due {
        run.run(input.max_transitions.max(1));
    }
    (run.out, run.contact, run.event)
}

/// [`advance`] over a batch, in order.
pub fn advance_all(inputs: Vec<StepInput>) -> Vec<Outcome> {
    inputs.into_iter().map(advance).collect()
}

/// What executing a node leads to.
enum Flow {
    /// Run this node next.
    Next(String),
    /// Parked or ended; `out` says how.
    Stop,
}

struct Run<'a> {
    automation: &'a Automation,
    automation_id: i64,
    contact: Value,
    event: Option<Value>,
    timezone: Option<Tz>,
    now: DateTime<Utc>,
    out: Outcome,
}

impl<'a> Run<'a> {
    fn eval(&self, c: &Condition) -> bool {
        c.eval(&Facts {
            contact: Some(&self.contact),
            event: self.event.as_ref(),
            context: Some(&self.out.context),
        })
    }

    fn count(&mut self, node: Option<&str>, metric: &'static str) {
        self.out.counts.push(Count {
            node: node.map(str::to_owned),
            metric,
        });
    }

    fn log(&mut self, node: &Node, action: impl Into<String>) {
        self.out.log.push(LogEntry {
            node: node.id.clone(),
            node_type: node.kind.type_name(),
            action: action.into(),
            visit: self.out.visit,
        });
    }

    /// Ends the enrollment where it is, with the matching journey count.
    fn end(&mut self, status: Status, reason: String) {
        self.out.status = status;
        self.out.exit_reason = Some(reason);
        self.out.next_run_at = None;
        self.out.wait = None;
        let metric = match status {
            Status::Completed => "completed_journey",
            Status::Exited => "exited",
            _ => "failed",
        };
        self.count(None, metric);
    }

    /// The current node, or fails the enrollment when it no longer exists.
    fn current(&mut self) -> Option<&'a Node> {
        let node = self.automation.node(&self.out.node);
        if node.is_none() {
            let reason = format!("node {:?} no longer exists", self.out.node);
            self.end(Status::Failed, reason);
        }
        node
    }

    /// Completes the enrollment when the automation-level goal holds.
    fn goal_met(&mut self, node: &Node) -> bool {
        let met = self.automation.goal.as_ref().is_some_and(|g| self.eval(g));
        if met {
            self.log(node, "automation goal reached");
            self.count(None, "goal");
            self.end(Status::Completed, "goal reached".to_owned());
        }
        met
    }

    /// A Waiting enrollment is due: its wait timed out. Returns whether to go on running.
    fn timed_out(&mut self) -> bool {
        let Some(node) = self.current() else {
            return false;
        };
        if self.goal_met(node) {
            return false;
        }
        let next = match &node.kind {
            NodeKind::WaitEvent { timeout_next, .. } => timeout_next,
            NodeKind::Approval {
                timeout_next: Some(t),
                ..
            } => t,
            other => {
                let reason = format!(
                    "enrollment was due while waiting at {} node {:?}, which has no timeout",
                    other.type_name(),
                    node.id
                );
                self.end(Status::Failed, reason);
                return false;
            }
        };
        self.log(node, format!("timed out -> {next}"));
        self.count(Some(&node.id), "completed");
        self.out.status = Status::Active;
        self.out.wait = None;
        self.out.node = next.clone();
        true
    }

    /// Executes nodes from `out.node` on, at most `cap` of them.
    fn run(&mut self, cap: u32) {
        let mut executed = 0;
        loop {
            if executed == cap {
                self.out.status = Status::Active;
                self.out.wait = None;
                self.out.next_run_at = Some(self.now);
                return;
            }
            let Some(node) = self.current() else {
                return;
            };
            if self.goal_met(node) {
                return;
            }
            executed += 1;
            self.out.visit = self.out.visit.saturating_add(1);
            self.count(Some(&node.id), "entered");
            match self.execute(node) {
                Flow::Next(next) => self.out.node = next,
                Flow::Stop => return,
            }
        }
    }

    /// Logs and counts a node that finished immediately and leads to `next`.
    fn pass(&mut self, node: &Node, action: String, next: &str) -> Flow {
        self.log(node, action);
        self.count(Some(&node.id), "completed");
        Flow::Next(next.to_owned())
    }

    fn park(&mut self, node: &Node, action: String, wait: Wait, until: Option<DateTime<Utc>>) {
        self.log(node, action);
        self.out.status = Status::Waiting;
        self.out.wait = Some(wait);
        self.out.next_run_at = until;
    }

    fn later(&self, d: chrono::Duration) -> DateTime<Utc> {
        self.now
            .checked_add_signed(d)
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    fn execute(&mut self, node: &'a Node) -> Flow {
        let id = node.id.as_str();
        match &node.kind {
            NodeKind::Email { .. } | NodeKind::Webhook { .. } | NodeKind::Decide { .. } => {
                let job = self.job(node);
                self.count(Some(id), "queued");
                self.park(
                    node,
                    format!("queued {}", job.kind.as_str()),
                    Wait::Job,
                    None,
                );
                self.out.job = Some(job);
                Flow::Stop
            }
            NodeKind::Delay { wait, next } => {
                let tz = self.timezone.unwrap_or(chrono_tz::UTC);
                let (wake, how) = match wait {
                    DelaySpec::Duration(d) => (self.later(*d), "duration"),
                    DelaySpec::Until(t) => (*t, "until time passed"),
                    DelaySpec::Window(w) => (w.next_open(self.now, tz), "window open"),
                };
                if wake <= self.now {
                    return self.pass(node, format!("no delay ({how}) -> {next}"), next);
                }
                let at = wake.to_rfc3339_opts(SecondsFormat::Secs, true);
                self.log(node, format!("delayed until {at}"));
                self.count(Some(id), "completed");
                self.out.status = Status::Active;
                self.out.wait = None;
                self.out.node = next.clone();
                self.out.next_run_at = Some(wake);
                Flow::Stop
            }
            NodeKind::Branch { paths, default } => match paths.iter().find(|(c, _)| self.eval(c)) {
                Some((_, next)) => self.pass(node, format!("branch -> {next}"), next),
                None => self.pass(node, format!("branch default -> {default}"), default),
            },
            NodeKind::Filter {
                when,
                next,
                otherwise,
            } => {
                if self.eval(when) {
                    return self.pass(node, format!("filter passed -> {next}"), next);
                }
                if let Some(other) = otherwise {
                    return self.pass(node, format!("filter failed -> {other}"), other);
                }
                self.log(node, "filter failed: exit");
                self.count(Some(id), "completed");
                self.end(Status::Exited, format!("filter {id} did not match"));
                Flow::Stop
            }
            NodeKind::Split { variants } => {
                let i = split_pick(self.out.enrollment_id, id, self.out.visit, variants);
                let next = &variants[i].1;
                self.pass(node, format!("split -> {next}"), next)
            }
            NodeKind::UpdateContact {
                set,
                add_tags,
                remove_tags,
                add_lists,
                remove_lists,
                next,
            } => {
                let update = self.out.contact_update.get_or_insert_with(Default::default);
                for (k, v) in set {
                    update.set.insert(k.clone(), v.clone());
                }
                for t in add_tags {
                    toggle(&mut update.add_tags, &mut update.remove_tags, t);
                }
                for t in remove_tags {
                    toggle(&mut update.remove_tags, &mut update.add_tags, t);
                }
                for l in add_lists {
                    toggle(&mut update.add_lists, &mut update.remove_lists, l);
                }
                for l in remove_lists {
                    toggle(&mut update.remove_lists, &mut update.add_lists, l);
                }
                apply_to_facts(&mut self.contact, set, add_tags, remove_tags);
                self.pass(node, format!("updated contact -> {next}"), next)
            }
            NodeKind::WaitEvent {
                event,
                filter,
                timeout,
                ..
            } => {
                let wait = Wait::Event {
                    kind: event.clone(),
                    filter: filter.as_ref().map(condition_json),
                };
                let until = self.later(*timeout);
                self.park(
                    node,
                    format!("waiting for event {event}"),
                    wait,
                    Some(until),
                );
                Flow::Stop
            }
            NodeKind::Approval { timeout, .. } => {
                let until = timeout.map(|d| self.later(d));
                self.park(
                    node,
                    "waiting for approval".to_owned(),
                    Wait::Approval,
                    until,
                );
                Flow::Stop
            }
            NodeKind::Goal { next } => {
                self.log(node, "goal reached");
                self.count(Some(id), "goal");
                self.count(Some(id), "completed");
                match next {
                    Some(next) => Flow::Next(next.clone()),
                    None => {
                        self.end(Status::Completed, format!("completed at goal {id}"));
                        Flow::Stop
                    }
                }
            }
            NodeKind::Exit => {
                self.log(node, "exit");
                self.count(Some(id), "completed");
                self.end(Status::Completed, format!("exit {id}"));
                Flow::Stop
            }
        }
    }

    /// The outbox job for an email, webhook or decide node at the current visit.
    fn job(&self, node: &Node) -> Job {
        let dedupe_key = dedupe_key(
            self.automation_id,
            self.out.enrollment_id,
            &node.id,
            self.out.visit,
        );
        let mut job = Job {
            kind: JobKind::Email,
            node: node.id.clone(),
            dedupe_key,
            provider: None,
            rate_host: None,
            payload: Value::Null,
            on_success: None,
            on_error: None,
            request_hash: None,
        };
        match &node.kind {
            NodeKind::Email {
                template,
                provider,
                next,
                on_error,
            } => {
                job.provider = Some(provider.clone());
                job.payload = json!({"node": node.id, "template": template, "provider": provider});
                job.on_success = next.clone();
                job.on_error = on_error.clone();
            }
            NodeKind::Webhook {
                url,
                method,
                headers,
                body,
                timeout_ms,
                next,
                on_error,
            } => {
                job.kind = JobKind::Webhook;
                job.rate_host = url_host(url);
                job.payload = json!({"node": node.id, "url": url, "method": method,
                                     "headers": headers, "body": body, "timeout_ms": timeout_ms});
                job.on_success = next.clone();
                job.on_error = on_error.clone();
            }
            NodeKind::Decide {
                url,
                method,
                headers,
                body,
                timeout_ms,
                field,
                paths,
                default,
                cache_ttl,
            } => {
                job.kind = JobKind::Decide;
                job.rate_host = url_host(url);
                job.payload = json!({"node": node.id, "url": url, "method": method,
                                     "headers": headers, "body": body, "timeout_ms": timeout_ms,
                                     "field": field, "paths": paths, "default": default,
                                     "cache_ttl_seconds": cache_ttl.num_seconds()});
                let facts = Facts {
                    contact: Some(&self.contact),
                    event: self.event.as_ref(),
                    context: Some(&self.out.context),
                };
                job.request_hash = Some(request_hash(url, method, body.as_ref(), headers, &facts));
            }
            _ => {}
        }
        job
    }
}

/// `a{automation_id}:e{enrollment_id}:{node}:{visit}`.
pub fn dedupe_key(automation_id: i64, enrollment_id: i64, node: &str, visit: i32) -> String {
    format!("a{automation_id}:e{enrollment_id}:{node}:{visit}")
}

/// Adds `value` to `list` (once) and cancels it in `opposite`.
fn toggle(list: &mut Vec<String>, opposite: &mut Vec<String>, value: &str) {
    opposite.retain(|x| x != value);
    if !list.iter().any(|x| x == value) {
        list.push(value.to_owned());
    }
}

/// Facts the caller merges over the attributes; `set` never changes them in memory.
const RESERVED_FACTS: &[&str] = &["email", "timezone", "tags"];

/// Applies an update_contact node to the in-memory contact facts, so later
/// conditions in the same call see the new values.
fn apply_to_facts(
    contact: &mut Value,
    set: &Map<String, Value>,
    add: &[String],
    remove: &[String],
) {
    if !contact.is_object() {
        *contact = Value::Object(Map::new());
    }
    let Value::Object(facts) = contact else {
        return;
    };
    for (k, v) in set {
        if RESERVED_FACTS.contains(&k.as_str()) {
            continue;
        }
        if v.is_null() {
            facts.remove(k);
        } else {
            facts.insert(k.clone(), v.clone());
        }
    }
    if add.is_empty() && remove.is_empty() {
        return;
    }
    let tags = facts
        .entry("tags")
        .or_insert_with(|| Value::Array(Vec::new()));
    if !tags.is_array() {
        *tags = Value::Array(Vec::new());
    }
    if let Value::Array(items) = tags {
        for t in add {
            if !items.iter().any(|x| x.as_str() == Some(t.as_str())) {
                items.push(Value::String(t.clone()));
            }
        }
        items.retain(|x| !x.as_str().is_some_and(|s| remove.iter().any(|r| r == s)));
    }
}

/// The lower-cased host of an http(s) URL, without the port (IPv6 literals
/// keep their brackets), for per-host rate limits.
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if authority.starts_with('[') {
        authority.find(']').map_or(authority, |i| &authority[..=i])
    } else {
        authority.split(':').next().unwrap_or(authority)
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// Picks a split arm deterministically: a stable hash of (enrollment id, node
/// id, visit) mapped to [0, total weight). The same enrollment at the same
/// visit always takes the same arm (re-runs are idempotent); over many
/// enrollments the arms are taken in proportion to their weights.
pub fn split_pick(enrollment_id: i64, node: &str, visit: i32, variants: &[(f64, String)]) -> usize {
    let mut h = Fnv64::new();
    h.part(&enrollment_id.to_le_bytes());
    h.part(node.as_bytes());
    h.part(&visit.to_le_bytes());
    let x = (mix64(h.0) >> 11) as f64 / (1u64 << 53) as f64;
    let total: f64 = variants.iter().map(|(w, _)| w).sum();
    let target = x * total;
    let mut acc = 0.0;
    for (i, (w, _)) in variants.iter().enumerate() {
        acc += w;
        if target < acc {
            return i;
        }
    }
    variants.len().saturating_sub(1)
}

/// A stable 128-bit FNV-1a hex hash of a decide request: url, method,
/// canonical JSON of the body (keys sorted) and the headers, so identical
/// questions share one cached reply. When the url, body or headers contain a
/// `{{` placeholder, the request is rendered per contact later, so the facts
/// it may be rendered from (contact, event, context) are hashed too: sharing
/// is then limited to enrollments whose rendered requests must be identical.
pub fn request_hash(
    url: &str,
    method: &str,
    body: Option<&Value>,
    headers: &std::collections::BTreeMap<String, String>,
    facts: &Facts,
) -> String {
    let mut body_json = String::new();
    canonical_json(body.unwrap_or(&Value::Null), &mut body_json);
    let mut headers_json = String::new();
    let header_map: Map<String, Value> = headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    canonical_json(&Value::Object(header_map), &mut headers_json);
    let mut h = Fnv128::new();
    h.part(url.as_bytes());
    h.part(method.as_bytes());
    h.part(body_json.as_bytes());
    h.part(headers_json.as_bytes());
    let templated = [url, &body_json, &headers_json]
        .iter()
        .any(|s| s.contains("{{"));
    if templated {
        for scope in [facts.contact, facts.event, facts.context] {
            let mut s = String::new();
            canonical_json(scope.unwrap_or(&Value::Null), &mut s);
            h.part(s.as_bytes());
        }
    }
    format!("{:032x}", h.0)
}

/// JSON with object keys sorted, whatever the map's own order.
fn canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(&map[k], out);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A parsed condition back as the JSON it was written as (modulo key order),
/// for SQL to evaluate against events later.
pub fn condition_json(c: &Condition) -> Value {
    match c {
        Condition::All(cs) => json!({"all": cs.iter().map(condition_json).collect::<Vec<_>>()}),
        Condition::Any(cs) => json!({"any": cs.iter().map(condition_json).collect::<Vec<_>>()}),
        Condition::Not(inner) => json!({"not": condition_json(inner)}),
        Condition::Leaf { field, op, value } => {
            let mut m = Map::new();
            m.insert("field".into(), Value::String(field.to_string()));
            m.insert("op".into(), Value::String(op.as_str().to_owned()));
            // Only exists may leave the value out, which parsing stores as null.
            if !value.is_null() {
                m.insert("value".into(), value.clone());
            }
            Value::Object(m)
        }
    }
}

/// FNV-1a 64 over length-framed parts.
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn part(&mut self, b: &[u8]) {
        self.bytes(&(b.len() as u64).to_le_bytes());
        self.bytes(b);
    }
}

/// FNV-1a 128 over length-framed parts.
struct Fnv128(u128);

impl Fnv128 {
    fn new() -> Self {
        Fnv128(0x6c62_272e_07bb_0142_62b8_2175_6295_c58d)
    }

    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u128::from(x);
            self.0 = self
                .0
                .wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
        }
    }

    fn part(&mut self, b: &[u8]) {
        self.bytes(&(b.len() as u64).to_le_bytes());
        self.bytes(b);
    }
}

/// SplitMix64's finalizer: spreads FNV's low-bit entropy over all bits.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::validate;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn automation(def: Value) -> Automation {
        validate(&def).unwrap_or_else(|f| panic!("{}", crate::fault::describe(&f)))
    }

    fn example() -> Automation {
        automation(json!({
          "name": "Welcome series",
          "trigger": { "event": "contact.created" },
          "start": "welcome",
          "nodes": {
            "welcome": { "type": "email", "template": "welcome", "provider": "ses", "next": "wait" },
            "wait":    { "type": "delay", "duration": "2 days", "next": "check" },
            "check":   { "type": "branch",
                         "paths": [ { "when": { "field": "contact.plan", "op": "eq", "value": "pro" }, "next": "crm" } ],
                         "default": "nudge" },
            "crm":     { "type": "webhook", "url": "https://CRM.example:8443/hooks/pro", "method": "POST",
                         "headers": {"X-Key": "k"}, "body": {"b": 1, "a": [true]},
                         "timeout_ms": 5000, "next": "done", "on_error": "done" },
            "nudge":   { "type": "split", "variants": [ { "weight": 50, "next": "a" }, { "weight": 50, "next": "b" } ] },
            "a":       { "type": "email", "template": "nudge-a", "next": "done" },
            "b":       { "type": "email", "template": "nudge-b", "next": "done" },
            "done":    { "type": "exit" }
          }
        }))
    }

    const NOW: &str = "2026-03-02T10:00:00Z"; // a Monday

    fn input<'a>(a: &'a Automation, node: &str) -> StepInput<'a> {
        StepInput {
            enrollment_id: 7,
            automation_id: 3,
            automation: a,
            status: Status::Active,
            node: node.to_owned(),
            visit: 0,
            context: json!({}),
            contact: json!({"email": "x@y.example", "tags": []}),
            event: Some(json!({"source": "signup"})),
            timezone: None,
            now: utc(NOW),
            max_transitions: 50,
        }
    }

    /// What SQL does with an outcome before the enrollment is due again:
    /// jobs succeed, delays elapse. Returns None when nothing would run it.
    fn feed<'a>(prev: &StepInput<'a>, out: &Outcome) -> Option<StepInput<'a>> {
        let mut next = prev.clone();
        next.node = out.node.clone();
        next.visit = out.visit;
        next.context = out.context.clone();
        match (out.status, &out.job) {
            (Status::Waiting, Some(job)) => {
                next.node = job.on_success.clone()?;
                next.status = Status::Active;
            }
            (Status::Active, _) => {
                next.status = Status::Active;
                next.now = out.next_run_at?;
            }
            _ => return None,
        }
        Some(next)
    }

    fn actions(o: &Outcome) -> Vec<String> {
        o.log
            .iter()
            .map(|l| format!("{}:{}:{}", l.node, l.visit, l.action))
            .collect()
    }

    fn has_count(o: &Outcome, node: Option<&str>, metric: &str) -> bool {
        o.counts
            .iter()
            .any(|c| c.node.as_deref() == node && c.metric == metric)
    }

    #[test]
    fn status_strings_round_trip() {
        for s in [
            Status::Active,
            Status::Waiting,
            Status::Completed,
            Status::Exited,
            Status::Failed,
        ] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::parse("done"), None);
        assert!(Status::Failed.is_ended() && !Status::Waiting.is_ended());
        assert_eq!(Wait::Approval.kind_str(), "approval");
        assert_eq!(JobKind::Decide.as_str(), "decide");
    }

    #[test]
    fn example_walk_pro_contact() {
        let a = example();
        let mut inp = input(&a, "welcome");
        inp.contact = json!({"email": "x@y.example", "plan": "pro"});

        // 1. email: queued, parked on the job.
        let o = advance(inp.clone());
        assert_eq!(o.status, Status::Waiting);
        assert_eq!(o.node, "welcome");
        assert_eq!(o.wait, Some(Wait::Job));
        assert_eq!(o.next_run_at, None);
        assert_eq!(o.visit, 1);
        let job = o.job.clone().unwrap();
        assert_eq!(job.kind, JobKind::Email);
        assert_eq!(job.dedupe_key, "a3:e7:welcome:1");
        assert_eq!(job.provider.as_deref(), Some("ses"));
        assert_eq!(job.rate_host, None);
        assert_eq!(
            job.payload,
            json!({"node": "welcome", "template": "welcome", "provider": "ses"})
        );
        assert_eq!(job.on_success.as_deref(), Some("wait"));
        assert_eq!(job.on_error, None);
        assert_eq!(job.request_hash, None);
        assert_eq!(actions(&o), vec!["welcome:1:queued email"]);
        assert!(has_count(&o, Some("welcome"), "entered"));
        assert!(has_count(&o, Some("welcome"), "queued"));
        assert!(!has_count(&o, Some("welcome"), "completed"));

        // 2. job succeeded: the delay is consumed on arrival, parked at check.
        let inp = feed(&inp, &o).unwrap();
        assert_eq!(inp.node, "wait");
        let o = advance(inp.clone());
        assert_eq!(o.status, Status::Active);
        assert_eq!(o.node, "check");
        assert_eq!(o.next_run_at, Some(utc("2026-03-04T10:00:00Z")));
        assert_eq!(o.wait, None);
        assert_eq!(o.job, None);
        assert_eq!(o.visit, 2);
        assert_eq!(
            actions(&o),
            vec!["wait:2:delayed until 2026-03-04T10:00:00Z"]
        );
        assert!(has_count(&o, Some("wait"), "completed"));

        // 3. two days later: branch to crm, webhook queued.
        let inp = feed(&inp, &o).unwrap();
        assert_eq!(inp.now, utc("2026-03-04T10:00:00Z"));
        let o = advance(inp.clone());
        assert_eq!(
            actions(&o),
            vec!["check:3:branch -> crm", "crm:4:queued webhook"]
        );
        assert_eq!(o.status, Status::Waiting);
        assert_eq!(o.node, "crm");
        let job = o.job.clone().unwrap();
        assert_eq!(job.kind, JobKind::Webhook);
        assert_eq!(job.dedupe_key, "a3:e7:crm:4");
        assert_eq!(job.rate_host.as_deref(), Some("crm.example"));
        assert_eq!(job.provider, None);
        assert_eq!(job.on_error.as_deref(), Some("done"));
        assert_eq!(
            job.payload,
            json!({"node": "crm", "url": "https://CRM.example:8443/hooks/pro", "method": "POST",
                   "headers": {"X-Key": "k"}, "body": {"a": [true], "b": 1}, "timeout_ms": 5000})
        );
        assert!(has_count(&o, Some("check"), "completed"));
        assert!(has_count(&o, Some("crm"), "queued"));

        // 4. webhook succeeded: exit completes the journey.
        let inp = feed(&inp, &o).unwrap();
        let o = advance(inp.clone());
        assert_eq!(actions(&o), vec!["done:5:exit"]);
        assert_eq!(o.status, Status::Completed);
        assert_eq!(o.exit_reason.as_deref(), Some("exit done"));
        assert_eq!(o.next_run_at, None);
        assert!(has_count(&o, None, "completed_journey"));
        assert!(feed(&inp, &o).is_none());
    }

    #[test]
    fn example_walk_free_contact_takes_the_split() {
        let a = example();
        let mut inp = input(&a, "check");
        inp.contact = json!({"plan": "free"});
        let o = advance(inp.clone());
        assert_eq!(o.log.len(), 3);
        assert_eq!(o.log[0].action, "branch default -> nudge");
        assert_eq!(o.log[0].node_type, "branch");
        let arm = o.log[1]
            .action
            .strip_prefix("split -> ")
            .unwrap()
            .to_owned();
        assert!(arm == "a" || arm == "b");
        assert_eq!(o.node, arm);
        assert_eq!(o.status, Status::Waiting);
        let job = o.job.clone().unwrap();
        assert_eq!(job.payload["template"], json!(format!("nudge-{arm}")));
        assert_eq!(job.provider.as_deref(), Some("default"));
        assert_eq!(job.dedupe_key, format!("a3:e7:{arm}:3"));
        let o = advance(feed(&inp, &o).unwrap());
        assert_eq!(o.status, Status::Completed);
        assert_eq!(o.visit, 4);
    }

    fn delay_automation(delay: Value) -> Automation {
        let mut d = delay;
        d["type"] = json!("delay");
        d["next"] = json!("end");
        automation(json!({"name": "d", "start": "d", "nodes": {"d": d, "end": {"type": "exit"}}}))
    }

    #[test]
    fn delay_until_past_and_future() {
        let a = delay_automation(json!({"until": "2026-03-01T00:00:00Z"}));
        let o = advance(input(&a, "d"));
        assert_eq!(o.status, Status::Completed);
        assert_eq!(
            actions(&o),
            vec!["d:1:no delay (until time passed) -> end", "end:2:exit"]
        );
        let a = delay_automation(json!({"until": "2026-03-05T09:30:00+01:00"}));
        let o = advance(input(&a, "d"));
        assert_eq!(o.status, Status::Active);
        assert_eq!(o.node, "end");
        assert_eq!(o.next_run_at, Some(utc("2026-03-05T08:30:00Z")));
        // exactly now counts as passed
        let a = delay_automation(json!({"until": NOW}));
        assert_eq!(advance(input(&a, "d")).status, Status::Completed);
    }

    #[test]
    fn delay_window_in_paris() {
        let a = delay_automation(
            json!({"window": {"start": "09:00", "end": "17:00", "days": ["mon", "tue"]}}),
        );
        let paris: Tz = "Europe/Paris".parse().unwrap();
        // 10:00Z on Monday is 11:00 in Paris: open, continue at once.
        let mut inp = input(&a, "d");
        inp.timezone = Some(paris);
        let o = advance(inp.clone());
        assert_eq!(o.status, Status::Completed);
        assert_eq!(o.log[0].action, "no delay (window open) -> end");
        // 17:30 Paris on Monday: closed until Tuesday 09:00 Paris = 08:00Z.
        inp.now = utc("2026-03-02T16:30:00Z");
        let o = advance(inp.clone());
        assert_eq!(o.status, Status::Active);
        assert_eq!(o.node, "end");
        assert_eq!(o.next_run_at, Some(utc("2026-03-03T08:00:00Z")));
        // Without a zone the window is read in UTC: 16:30Z Monday is still open.
        inp.timezone = None;
        assert_eq!(advance(inp.clone()).status, Status::Completed);
        // Tuesday 17:00 Paris: next opening is the following Monday 09:00 Paris.
        inp.timezone = Some(paris);
        inp.now = utc("2026-03-03T16:00:00Z");
        assert_eq!(advance(inp).next_run_at, Some(utc("2026-03-09T08:00:00Z")));
    }

    #[test]
    fn delay_duration() {
        let a = delay_automation(json!({"duration": "1h 30m"}));
        let o = advance(input(&a, "d"));
        assert_eq!(o.next_run_at, Some(utc("2026-03-02T11:30:00Z")));
        assert_eq!(o.node, "end");
        assert_eq!(o.status, Status::Active);
        assert_eq!(o.visit, 1);
    }

    fn filter_automation(otherwise: bool) -> Automation {
        let mut f = json!({"type": "filter", "when": {"field": "contact.plan", "op": "eq", "value": "pro"}, "next": "yes"});
        if otherwise {
            f["otherwise"] = json!("no");
        }
        let mut nodes = json!({"f": f, "yes": {"type": "goal"}, "no": {"type": "exit"}});
        if !otherwise {
            nodes.as_object_mut().unwrap().remove("no");
        }
        automation(json!({"name": "f", "start": "f", "nodes": nodes}))
    }

    #[test]
    fn filter_passes_goes_otherwise_or_exits() {
        let a = filter_automation(true);
        let mut inp = input(&a, "f");
        inp.contact = json!({"plan": "pro"});
        let o = advance(inp.clone());
        assert_eq!(
            actions(&o),
            vec!["f:1:filter passed -> yes", "yes:2:goal reached"]
        );
        assert_eq!(o.status, Status::Completed);
        assert_eq!(o.exit_reason.as_deref(), Some("completed at goal yes"));
        assert!(has_count(&o, Some("yes"), "goal"));
        assert!(has_count(&o, None, "completed_journey"));
        inp.contact = json!({"plan": "free"});
        let o = advance(inp.clone());
        assert_eq!(actions(&o), vec!["f:1:filter failed -> no", "no:2:exit"]);
        assert_eq!(o.exit_reason.as_deref(), Some("exit no"));

        let a = filter_automation(false);
        let mut inp = input(&a, "f");
        inp.contact = json!({"plan": "free"});
        let o = advance(inp);
        assert_eq!(o.status, Status::Exited);
        assert_eq!(o.exit_reason.as_deref(), Some("filter f did not match"));
        assert_eq!(o.node, "f");
        assert!(has_count(&o, None, "exited"));
        assert!(!has_count(&o, None, "completed_journey"));
    }

    fn split_automation(w: (f64, f64)) -> Automation {
        automation(json!({"name": "s", "start": "s", "nodes": {
            "s": {"type": "split", "variants": [{"weight": w.0, "next": "a"}, {"weight": w.1, "next": "b"}]},
            "a": {"type": "exit"}, "b": {"type": "exit"}}}))
    }

    #[test]
    fn split_is_deterministic() {
        let a = split_automation((1.0, 1.0));
        for id in 0..200 {
            let mut inp = input(&a, "s");
            inp.enrollment_id = id;
            let first = advance(inp.clone());
            let again = advance(inp.clone());
            assert_eq!(first, again);
        }
        let v = vec![(1.0, "a".to_owned()), (1.0, "b".to_owned())];
        // The visit takes part: over visits, one enrollment sees both arms.
        let arms: std::collections::BTreeSet<usize> =
            (0..50).map(|visit| split_pick(1, "s", visit, &v)).collect();
        assert_eq!(arms.len(), 2);
        // So does the node id.
        let by_node: std::collections::BTreeSet<usize> = (0..50)
            .map(|i| split_pick(1, &format!("s{i}"), 1, &v))
            .collect();
        assert_eq!(by_node.len(), 2);
    }

    #[test]
    fn split_follows_weights() {
        for (w, want_a) in [((70.0, 30.0), 0.70), ((1.0, 1.0), 0.5), ((0.1, 0.9), 0.1)] {
            let a = split_automation(w);
            let mut got_a = 0;
            for id in 0..10_000 {
                let mut inp = input(&a, "s");
                inp.enrollment_id = id;
                if advance(inp).node == "a" {
                    got_a += 1;
                }
            }
            let share = f64::from(got_a) / 10_000.0;
            assert!(
                (share - want_a).abs() < 0.03,
                "weights {w:?}: share of a {share}"
            );
        }
        // Sequential ids at a fixed visit, three arms.
        let v = vec![
            (2.0, "a".to_owned()),
            (1.0, "b".to_owned()),
            (1.0, "c".to_owned()),
        ];
        let mut hits = [0u32; 3];
        for id in 0..10_000 {
            hits[split_pick(id, "ab", 4, &v)] += 1;
        }
        for (h, want) in hits.iter().zip([5_000.0, 2_500.0, 2_500.0]) {
            assert!((f64::from(*h) - want).abs() < 300.0, "{hits:?}");
        }
    }

    #[test]
    fn update_contact_is_visible_to_a_following_branch() {
        let a = automation(json!({"name": "u", "start": "u1", "nodes": {
            "u1": {"type": "update_contact", "set": {"plan": "pro", "old": null, "email": "z@z.example"},
                   "add_tags": ["vip", "new"], "add_lists": ["l1"], "next": "u2"},
            "u2": {"type": "update_contact", "remove_tags": ["new", "gone"], "add_lists": ["l2"],
                   "remove_lists": ["l1"], "set": {"plan": "max"}, "next": "u3"},
            "u3": {"type": "update_contact", "add_tags": ["gone"], "next": "br"},
            "br": {"type": "branch", "paths": [
                {"when": {"all": [
                    {"field": "contact.plan", "op": "eq", "value": "max"},
                    {"field": "contact.tags", "op": "contains", "value": "vip"},
                    {"not": {"field": "contact.tags", "op": "contains", "value": "new"}},
                    {"field": "contact.old", "op": "exists", "value": false},
                    {"field": "contact.email", "op": "eq", "value": "x@y.example"}
                ]}, "next": "yes"}], "default": "no"},
            "yes": {"type": "exit"}, "no": {"type": "exit"}}}));
        let mut inp = input(&a, "u1");
        inp.contact = json!({"email": "x@y.example", "plan": "free", "old": 1, "tags": ["gone"]});
        let o = advance(inp);
        assert_eq!(o.exit_reason.as_deref(), Some("exit yes"), "{:?}", o.log);
        let u = o.contact_update.unwrap();
        assert_eq!(u.set.get("plan"), Some(&json!("max")));
        assert_eq!(u.set.get("old"), Some(&Value::Null));
        assert_eq!(u.set.get("email"), Some(&json!("z@z.example")));
        assert_eq!(u.add_tags, vec!["vip", "gone"]);
        assert_eq!(u.remove_tags, vec!["new"]);
        assert_eq!(u.add_lists, vec!["l2"]);
        assert_eq!(u.remove_lists, vec!["l1"]);
        assert_eq!(o.log[0].action, "updated contact -> u2");
    }

    #[test]
    fn no_contact_update_without_update_nodes() {
        let a = example();
        assert_eq!(advance(input(&a, "welcome")).contact_update, None);
    }

    fn wait_automation() -> Automation {
        automation(json!({"name": "w", "start": "w", "nodes": {
            "w": {"type": "wait_event", "event": "signup",
                  "filter": {"all": [{"field": "event.plan", "op": "in", "value": ["pro", "max"]},
                                     {"not": {"field": "event.test", "op": "exists"}}]},
                  "timeout": "3 days", "next": "got", "timeout_next": "late"},
            "got": {"type": "exit"}, "late": {"type": "goal", "next": "bye"}, "bye": {"type": "exit"}}}))
    }

    #[test]
    fn wait_event_arrival_and_timeout() {
        let a = wait_automation();
        let inp = input(&a, "w");
        let o = advance(inp.clone());
        assert_eq!(o.status, Status::Waiting);
        assert_eq!(o.node, "w");
        assert_eq!(o.next_run_at, Some(utc("2026-03-05T10:00:00Z")));
        let Some(Wait::Event { kind, filter }) = &o.wait else {
            panic!("{:?}", o.wait)
        };
        assert_eq!(kind, "signup");
        let filter = filter.clone().unwrap();
        assert_eq!(
            filter,
            json!({"all": [{"field": "event.plan", "op": "in", "value": ["pro", "max"]},
                           {"not": {"field": "event.test", "op": "exists"}}]})
        );
        // The raw JSON parses back to the very condition.
        assert_eq!(
            Condition::parse(&filter, "$").unwrap(),
            *match &a.nodes["w"].kind {
                NodeKind::WaitEvent { filter, .. } => filter.as_ref().unwrap(),
                _ => unreachable!(),
            }
        );
        assert_eq!(actions(&o), vec!["w:1:waiting for event signup"]);
        assert!(has_count(&o, Some("w"), "entered"));
        assert!(!has_count(&o, Some("w"), "completed"));

        // Timed out: off to timeout_next, which runs at once.
        let mut due = inp.clone();
        due.status = Status::Waiting;
        due.visit = o.visit;
        due.now = o.next_run_at.unwrap();
        let o = advance(due);
        assert_eq!(
            actions(&o),
            vec!["w:1:timed out -> late", "late:2:goal reached", "bye:3:exit"]
        );
        assert!(has_count(&o, Some("w"), "completed"));
        assert!(!has_count(&o, Some("w"), "entered"));
        assert_eq!(o.status, Status::Completed);
        assert_eq!(o.wait, None);
    }

    fn approval_automation(timeout: bool) -> Automation {
        let mut ap = json!({"type": "approval", "approved": "ok", "rejected": "no"});
        if timeout {
            ap["timeout"] = json!("1 day");
            ap["timeout_next"] = json!("late");
        }
        let mut nodes = json!({"ap": ap, "ok": {"type": "exit"}, "no": {"type": "exit"}});
        if timeout {
            nodes["late"] = json!({"type": "exit"});
        }
        automation(json!({"name": "a", "start": "ap", "nodes": nodes}))
    }

    #[test]
    fn approval_with_and_without_timeout() {
        let a = approval_automation(true);
        let o = advance(input(&a, "ap"));
        assert_eq!(o.status, Status::Waiting);
        assert_eq!(o.wait, Some(Wait::Approval));
        assert_eq!(o.next_run_at, Some(utc("2026-03-03T10:00:00Z")));
        assert_eq!(o.log[0].action, "waiting for approval");
        let mut due = input(&a, "ap");
        due.status = Status::Waiting;
        due.visit = 1;
        let o = advance(due);
        assert_eq!(o.exit_reason.as_deref(), Some("exit late"));
        assert_eq!(o.visit, 2);

        let a = approval_automation(false);
        let o = advance(input(&a, "ap"));
        assert_eq!(o.status, Status::Waiting);
        assert_eq!(o.wait, Some(Wait::Approval));
        assert_eq!(o.next_run_at, None);
        // Due while waiting without a timeout: a clear failure.
        let mut due = input(&a, "ap");
        due.status = Status::Waiting;
        let o = advance(due);
        assert_eq!(o.status, Status::Failed);
        assert_eq!(
            o.exit_reason.as_deref(),
            Some("enrollment was due while waiting at approval node \"ap\", which has no timeout")
        );
        assert!(has_count(&o, None, "failed"));
    }

    #[test]
    fn waiting_on_a_job_node_fails_clearly() {
        let a = example();
        let mut inp = input(&a, "crm");
        inp.status = Status::Waiting;
        let o = advance(inp);
        assert_eq!(o.status, Status::Failed);
        assert!(o.exit_reason.unwrap().contains("webhook node \"crm\""));
        assert!(o.log.is_empty());
        assert_eq!(o.job, None);
    }

    #[test]
    fn automation_goal_completes_before_each_node() {
        let mut def = json!({"name": "g", "start": "u", "goal": {"field": "contact.paid", "op": "eq", "value": true},
            "nodes": {
                "u": {"type": "update_contact", "set": {"paid": true}, "next": "m"},
                "m": {"type": "email", "template": "t"}}});
        let a = automation(def.clone());
        let o = advance(input(&a, "u"));
        assert_eq!(o.status, Status::Completed);
        assert_eq!(o.exit_reason.as_deref(), Some("goal reached"));
        assert_eq!(o.node, "m");
        assert_eq!(o.job, None);
        assert!(o.contact_update.is_some());
        assert_eq!(
            actions(&o),
            vec!["u:1:updated contact -> m", "m:1:automation goal reached"]
        );
        assert!(has_count(&o, None, "goal"));
        assert!(has_count(&o, None, "completed_journey"));
        // Met already on arrival: nothing runs.
        let mut inp = input(&a, "u");
        inp.contact = json!({"paid": true});
        let o = advance(inp.clone());
        assert_eq!(o.visit, 0);
        assert_eq!(o.node, "u");
        assert!(o.contact_update.is_none());
        // Also checked when a wait times out.
        def["nodes"]["u"] = json!({"type": "wait_event", "event": "x", "timeout": "1d", "next": "m", "timeout_next": "m"});
        let a = automation(def);
        inp.automation = &a;
        inp.status = Status::Waiting;
        assert_eq!(advance(inp).exit_reason.as_deref(), Some("goal reached"));
    }

    #[test]
    fn goal_node_continues() {
        let a = automation(json!({"name": "g", "start": "g", "nodes": {
            "g": {"type": "goal", "next": "m"}, "m": {"type": "email", "template": "t"}}}));
        let o = advance(input(&a, "g"));
        assert_eq!(actions(&o), vec!["g:1:goal reached", "m:2:queued email"]);
        assert!(has_count(&o, Some("g"), "goal"));
        assert_eq!(o.job.as_ref().unwrap().on_success, None);
        assert_eq!(o.status, Status::Waiting);
    }

    #[test]
    fn cap_stops_and_resumes() {
        let mut nodes = Map::new();
        for i in 0..10 {
            nodes.insert(
                format!("g{i}"),
                json!({"type": "goal", "next": format!("g{}", i + 1)}),
            );
        }
        nodes.insert("g10".into(), json!({"type": "exit"}));
        let a = automation(json!({"name": "c", "start": "g0", "nodes": nodes}));
        let mut inp = input(&a, "g0");
        inp.max_transitions = 4;
        let o = advance(inp.clone());
        assert_eq!(o.status, Status::Active);
        assert_eq!(o.node, "g4");
        assert_eq!(o.next_run_at, Some(utc(NOW)));
        assert_eq!(o.visit, 4);
        assert_eq!(o.log.len(), 4);
        let o2 = advance(feed(&inp, &o).unwrap());
        assert_eq!(o2.node, "g8");
        assert_eq!(o2.log[0].visit, 5);
        // 0 counts as 1, so the engine always progresses.
        inp.max_transitions = 0;
        assert_eq!(advance(inp.clone()).node, "g1");
        // A cap larger than the path runs it to the end.
        inp.max_transitions = 50;
        assert_eq!(advance(inp).status, Status::Completed);
    }

    #[test]
    fn missing_node_fails() {
        let a = example();
        let o = advance(input(&a, "gone"));
        assert_eq!(o.status, Status::Failed);
        assert_eq!(
            o.exit_reason.as_deref(),
            Some("node \"gone\" no longer exists")
        );
        assert!(has_count(&o, None, "failed"));
        let mut w = input(&a, "gone");
        w.status = Status::Waiting;
        assert_eq!(advance(w).status, Status::Failed);
    }

    #[test]
    fn ended_input_is_left_alone() {
        let a = example();
        let mut inp = input(&a, "welcome");
        inp.status = Status::Completed;
        let o = advance(inp);
        assert_eq!(o.status, Status::Completed);
        assert!(o.log.is_empty() && o.counts.is_empty() && o.job.is_none());
    }

    #[test]
    fn dedupe_keys_stable_and_distinct_per_visit() {
        let a = example();
        let mut inp = input(&a, "welcome");
        let k1 = advance(inp.clone()).job.unwrap().dedupe_key;
        assert_eq!(k1, advance(inp.clone()).job.unwrap().dedupe_key);
        inp.visit = 9;
        let k2 = advance(inp.clone()).job.unwrap().dedupe_key;
        assert_eq!(k2, "a3:e7:welcome:10");
        assert_ne!(k1, k2);
        inp.enrollment_id = 8;
        assert_eq!(advance(inp).job.unwrap().dedupe_key, "a3:e8:welcome:10");
    }

    fn decide_automation(body: Value, headers: Value, url: &str) -> Automation {
        automation(json!({"name": "d", "start": "q", "nodes": {
            "q": {"type": "decide", "url": url, "body": body, "headers": headers,
                  "paths": {"yes": "y", "no": "n"}, "default": "n", "field": "answer", "cache_ttl": "10m"},
            "y": {"type": "exit"}, "n": {"type": "exit"}}}))
    }

    #[test]
    fn decide_job() {
        let a = decide_automation(json!({"q": "buy?"}), json!({}), "https://AI.example/ask");
        let o = advance(input(&a, "q"));
        let job = o.job.unwrap();
        assert_eq!(job.kind, JobKind::Decide);
        assert_eq!(job.on_success, None);
        assert_eq!(job.on_error, None);
        assert_eq!(job.rate_host.as_deref(), Some("ai.example"));
        assert_eq!(
            job.payload,
            json!({"node": "q", "url": "https://AI.example/ask", "method": "POST", "headers": {},
                   "body": {"q": "buy?"}, "timeout_ms": 10000, "field": "answer",
                   "paths": {"yes": "y", "no": "n"}, "default": "n", "cache_ttl_seconds": 600})
        );
        assert_eq!(job.request_hash.as_ref().unwrap().len(), 32);
        assert_eq!(o.log[0].action, "queued decide");
        assert_eq!(o.wait, Some(Wait::Job));
    }

    #[test]
    fn request_hash_identity() {
        let hash = |body: Value, headers: Value, url: &str, contact: Value| {
            let a = decide_automation(body, headers, url);
            let mut inp = input(&a, "q");
            inp.contact = contact;
            advance(inp).job.unwrap().request_hash.unwrap()
        };
        let h = hash(
            json!({"q": "buy?", "n": [1, {"b": 2, "a": 1}]}),
            json!({"X-A": "1"}),
            "https://ai.example",
            json!({"id": 1}),
        );
        // Same question from another contact and enrollment: same hash.
        let a = decide_automation(
            json!({"q": "buy?", "n": [1, {"b": 2, "a": 1}]}),
            json!({"X-A": "1"}),
            "https://ai.example",
        );
        let mut other = input(&a, "q");
        other.enrollment_id = 99;
        other.visit = 41;
        other.contact = json!({"id": 2});
        assert_eq!(advance(other).job.unwrap().request_hash.unwrap(), h);
        // Key order does not matter.
        let b = json!({"n": [1, {"a": 1, "b": 2}], "q": "buy?"});
        assert_eq!(
            hash(
                b.clone(),
                json!({"X-A": "1"}),
                "https://ai.example",
                json!({})
            ),
            h
        );
        // Body, header, url differences do.
        assert_ne!(
            hash(
                json!({"q": "buy!"}),
                json!({"X-A": "1"}),
                "https://ai.example",
                json!({})
            ),
            h
        );
        assert_ne!(
            hash(
                json!({"q": "buy?", "n": [1, {"b": 2, "a": 1.5}]}),
                json!({"X-A": "1"}),
                "https://ai.example",
                json!({})
            ),
            h
        );
        assert_ne!(
            hash(
                b.clone(),
                json!({"X-A": "2"}),
                "https://ai.example",
                json!({})
            ),
            h
        );
        assert_ne!(
            hash(b.clone(), json!({}), "https://ai.example", json!({})),
            h
        );
        assert_ne!(
            hash(b, json!({"X-A": "1"}), "https://ai.example/x", json!({})),
            h
        );
        // Templated requests are rendered per contact: facts take part then.
        let t = |c: Value| {
            hash(
                json!({"q": "{{ contact.plan }}"}),
                json!({}),
                "https://ai.example",
                c,
            )
        };
        assert_eq!(t(json!({"plan": "pro"})), t(json!({"plan": "pro"})));
        assert_ne!(t(json!({"plan": "pro"})), t(json!({"plan": "free"})));
        // Method too (direct call).
        let facts = Facts::default();
        let hs = std::collections::BTreeMap::new();
        assert_ne!(
            request_hash("https://x", "GET", None, &hs, &facts),
            request_hash("https://x", "POST", None, &hs, &facts)
        );
        assert_eq!(
            request_hash("https://x", "GET", None, &hs, &facts),
            request_hash("https://x", "GET", Some(&Value::Null), &hs, &facts)
        );
    }

    #[test]
    fn hosts() {
        assert_eq!(
            url_host("https://CRM.Example:8443/x?y").as_deref(),
            Some("crm.example")
        );
        assert_eq!(url_host("http://[::1]:80/").as_deref(), Some("[::1]"));
        assert_eq!(url_host("http://a.b#f").as_deref(), Some("a.b"));
        assert_eq!(url_host("nope"), None);
    }

    #[test]
    fn condition_json_round_trips() {
        for c in [
            json!({"field": "contact.x", "op": "exists"}),
            json!({"field": "contact.x", "op": "exists", "value": false}),
            json!({"any": [{"field": "event.a.0", "op": "gte", "value": 3}, {"all": []}]}),
            json!({"not": {"field": "context.q.answer", "op": "starts_with", "value": "y"}}),
        ] {
            let parsed = Condition::parse(&c, "$").unwrap();
            assert_eq!(condition_json(&parsed), c);
        }
    }

    #[test]
    fn advance_all_keeps_order() {
        let a = example();
        let mut inputs = Vec::new();
        for id in 1..=3 {
            let mut inp = input(&a, "welcome");
            inp.enrollment_id = id;
            inputs.push(inp);
        }
        let out = advance_all(inputs);
        let ids: Vec<i64> = out.iter().map(|o| o.enrollment_id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
    }
}

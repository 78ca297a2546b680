//! The dry run of an automation (`herald.simulate_automation`, issue 15 §2): a past period's recorded
//! events are replayed through the trigger, its filter and the re-entry rule, and every would-be
//! enrollment is walked through the graph by the step engine itself ([`step_engine::advance`], the
//! code `tick` runs), on a virtual clock. Nothing here touches Postgres; SQL reads the events and the
//! contacts they name and hands them over as two `json` texts (see `sql/simulate.sql`).
//!
//! The virtual clock, per contact (contacts are independent in a dry run, so each is simulated alone,
//! start to finish, in contact-id order):
//! - the contact's events are taken in `occurred_at` order; before each one, every enrollment due by
//!   then (a delay ended, a wait or approval timed out) runs at the time it was due;
//! - an event of the trigger kind that passes the filter enrols the contact unless the re-entry rule
//!   forbids it (decided against the state before the event, as the dispatcher does); an event a
//!   `wait_event` node waits for wakes it (filter checked, payload into `context.<node>`); both then run
//!   at the event's time;
//! - a job (email, webhook, decide) is answered at once, at the time it was queued: success with an
//!   empty body unless `options.replies` says otherwise; an approval is answered at once by
//!   `options.approvals` (default: left waiting, so a timeout fires later if the node has one);
//! - after the last event, the clock runs on to the end of the period; whatever is still in progress
//!   then is reported as waiting, at its node.
//!
//! Differences from the real thing, by design: enrollment ids are the simulation's own (1, 2, … in
//! contact order), so a split falls in the right proportions but not necessarily on the same people
//! (`exact_split: false`); contacts are read as they are stored now (update_contact nodes change the
//! simulated copy); list changes made by update_contact nodes emit no events; jobs take no time.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::condition::Facts;
use crate::definition::{Automation, NodeKind, Reentry};
use crate::fault::{reject_unknown_keys, Fault};
use crate::step_engine::{self, Outcome, Status, StepInput, Wait};

/// What a job node is answered with in the dry run.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Success with this body (webhook/decide: stored in `context.<node>`).
    Ok(Value),
    /// A permanent failure: the node's `on_error`, or the enrollment fails.
    Error,
}

/// How an approval node is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Approve,
    Reject,
    Wait,
}

/// The width of the queued-messages histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Hour,
    Day,
}

impl Bucket {
    fn seconds(self) -> i64 {
        match self {
            Bucket::Hour => 3600,
            Bucket::Day => 86_400,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Bucket::Hour => "hour",
            Bucket::Day => "day",
        }
    }
}

/// `options` of simulate_automation, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// node → reply (email, webhook and decide nodes); default success with `{}`.
    pub replies: HashMap<String, Reply>,
    /// node → answer (approval nodes); default [`Answer::Wait`].
    pub approvals: HashMap<String, Answer>,
    pub bucket: Bucket,
    /// Count contacts already enrolled in the automation for the re-entry rule (SQL reads them).
    pub include_enrolled: bool,
    /// The end of the period (default: now; SQL reads it).
    pub until: Option<DateTime<Utc>>,
}

const OPTION_KEYS: &[&str] = &[
    "until",
    "replies",
    "approvals",
    "histogram",
    "include_enrolled",
];

/// Reads and checks `options` against the automation: every fault names its key
/// (`options.replies.crm.status: …`).
pub fn read_options(options: &Value, automation: &Automation) -> Result<Options, Vec<Fault>> {
    let mut out = Options {
        replies: HashMap::new(),
        approvals: HashMap::new(),
        bucket: Bucket::Day,
        include_enrolled: false,
        until: None,
    };
    let mut faults = Vec::new();
    let map = match options {
        Value::Null => return Ok(out),
        Value::Object(m) => m,
        other => {
            return Err(vec![Fault::new(
                "options",
                format!("must be a JSON object, got {}", type_name(other)),
            )])
        }
    };
    reject_unknown_keys(map, OPTION_KEYS, "options", "", &mut faults);
    for (key, value) in map {
        let path = format!("options.{key}");
        match key.as_str() {
            "until" => match value.as_str().map(DateTime::parse_from_rfc3339) {
                Some(Ok(t)) => out.until = Some(t.with_timezone(&Utc)),
                _ => faults.push(Fault::new(
                    path,
                    "must be an RFC 3339 timestamp, e.g. \"2026-12-01T00:00:00Z\"",
                )),
            },
            "histogram" => match value.as_str() {
                Some("hour") => out.bucket = Bucket::Hour,
                Some("day") => out.bucket = Bucket::Day,
                _ => faults.push(Fault::new(path, "must be \"hour\" or \"day\"")),
            },
            "include_enrolled" => match value.as_bool() {
                Some(b) => out.include_enrolled = b,
                None => faults.push(Fault::new(path, "must be true or false")),
            },
            "replies" => read_replies(value, &path, automation, &mut out, &mut faults),
            "approvals" => read_approvals(value, &path, automation, &mut out, &mut faults),
            _ => {} // reported above
        }
    }
    if faults.is_empty() {
        Ok(out)
    } else {
        Err(faults)
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The node `id` when it exists and its type is one of `types`, else a fault at `path`.
fn node_of_type(
    automation: &Automation,
    id: &str,
    types: &[&str],
    path: &str,
    faults: &mut Vec<Fault>,
) -> bool {
    match automation.node(id) {
        None => {
            faults.push(Fault::new(
                path,
                format!("no node {id:?} in the automation"),
            ));
            false
        }
        Some(n) if !types.contains(&n.kind.type_name()) => {
            faults.push(Fault::new(
                path,
                format!(
                    "node {id:?} is of type {}, expected {}",
                    n.kind.type_name(),
                    types.join(" or ")
                ),
            ));
            false
        }
        Some(_) => true,
    }
}

fn read_replies(
    value: &Value,
    path: &str,
    automation: &Automation,
    out: &mut Options,
    faults: &mut Vec<Fault>,
) {
    let Some(map) = value.as_object() else {
        faults.push(Fault::new(
            path,
            "must be an object: {\"<node>\": {\"status\": \"ok\" | \"error\", \"body\": …}}",
        ));
        return;
    };
    for (node, reply) in map {
        let p = format!("{path}.{node}");
        if !node_of_type(
            automation,
            node,
            &["email", "webhook", "decide"],
            &p,
            faults,
        ) {
            continue;
        }
        let Some(r) = reply.as_object() else {
            faults.push(Fault::new(
                p,
                "must be an object {\"status\": \"ok\" | \"error\", \"body\": …}",
            ));
            continue;
        };
        if reject_unknown_keys(r, &["status", "body"], &p, "in a reply", faults) {
            continue;
        }
        let body = r
            .get("body")
            .cloned()
            .unwrap_or_else(|| Value::Object(Map::new()));
        match r.get("status").map(|s| s.as_str()) {
            None | Some(Some("ok")) => {
                out.replies.insert(node.clone(), Reply::Ok(body));
            }
            Some(Some("error")) => {
                out.replies.insert(node.clone(), Reply::Error);
            }
            Some(_) => faults.push(Fault::new(
                format!("{p}.status"),
                "must be \"ok\" or \"error\"",
            )),
        }
    }
}

fn read_approvals(
    value: &Value,
    path: &str,
    automation: &Automation,
    out: &mut Options,
    faults: &mut Vec<Fault>,
) {
    let Some(map) = value.as_object() else {
        faults.push(Fault::new(
            path,
            "must be an object: {\"<node>\": \"approve\" | \"reject\" | \"wait\"}",
        ));
        return;
    };
    for (node, answer) in map {
        let p = format!("{path}.{node}");
        if !node_of_type(automation, node, &["approval"], &p, faults) {
            continue;
        }
        let a = match answer.as_str() {
            Some("approve") => Answer::Approve,
            Some("reject") => Answer::Reject,
            Some("wait") => Answer::Wait,
            _ => {
                faults.push(Fault::new(p, "must be \"approve\", \"reject\" or \"wait\""));
                continue;
            }
        };
        out.approvals.insert(node.clone(), a);
    }
}

/// The event kinds the dry run reads: the trigger's first, then every kind a `wait_event` node
/// waits for (sorted, without repeats). SQL sends each event's kind as its 1-based position here.
pub fn event_kinds(automation: &Automation) -> Vec<String> {
    let mut kinds: Vec<String> = automation.trigger.iter().map(|t| t.event.clone()).collect();
    let mut waits: Vec<&String> = automation
        .nodes
        .values()
        .filter_map(|n| match &n.kind {
            NodeKind::WaitEvent { event, .. } => Some(event),
            _ => None,
        })
        .collect();
    waits.sort();
    for w in waits {
        if !kinds.contains(w) {
            kinds.push(w.clone());
        }
    }
    kinds
}

/// Counts per node, as reported.
#[derive(Debug, Default)]
struct NodeStats {
    entered: u64,
    completed: u64,
    goal: u64,
    queued: u64,
    /// bucket start (epoch seconds) → messages queued
    queued_at: BTreeMap<i64, u64>,
    /// branch / split / filter / decide: target node → count ("(exit)" for a failed filter that exits)
    arms: BTreeMap<String, u64>,
    /// ok / error (jobs), event / timed_out (wait_event), approved / rejected / timed_out (approval)
    outcomes: BTreeMap<&'static str, u64>,
    /// the first contacts that entered (distinct, up to [`SAMPLE`])
    sample: Vec<i64>,
}

const SAMPLE: usize = 5;
/// Engine calls allowed per enrollment (a cycle through a short delay could otherwise run long).
const MAX_CALLS: u32 = 10_000;

#[derive(Debug, Default)]
struct Totals {
    events: u64,
    trigger_events: u64,
    filtered_out: u64,
    entered: u64,
    contacts_entered: u64,
    skipped: u64,
    completed: u64,
    exited: u64,
    failed: u64,
    goal: u64,
    stopped: u64,
}

/// One simulated enrollment in progress.
struct Enr {
    id: i64,
    status: Status,
    node: String,
    visit: i32,
    context: Value,
    event: Option<Value>,
    next_run_at: Option<DateTime<Utc>>,
    wait: Option<Wait>,
    /// The delay node it sleeps in, when it sleeps (the engine has already moved it to the next node).
    delayed_at: Option<String>,
    calls: u32,
}

/// One contact while it is simulated.
struct Contact {
    id: i64,
    facts: Value,
    tz: Option<Tz>,
    /// Enrolled before (once: never again).
    ever: bool,
    /// In progress in the real automation (after_exit: not again within the period).
    in_progress_before: bool,
    entered: bool,
    enrs: Vec<Enr>,
}

struct Sim<'a> {
    a: &'a Automation,
    opts: &'a Options,
    index: HashMap<&'a str, usize>,
    nodes: Vec<NodeStats>,
    wait_kinds: HashSet<&'a str>,
    totals: Totals,
    /// (node, kind) → enrollments still there at the end of the period
    waiting: BTreeMap<(String, &'static str), u64>,
    next_id: i64,
}

type EventRow<'a> = (i64, f64, usize, &'a RawValue);
type ContactRow<'a> = (i64, &'a RawValue, Option<String>, i32);

fn at(epoch: f64) -> Result<DateTime<Utc>, String> {
    DateTime::<Utc>::from_timestamp_micros((epoch * 1e6).round() as i64)
        .ok_or_else(|| format!("time {epoch} is out of range"))
}

/// Runs the dry run. `events`: the text of `[[contact_id, occurred_at (epoch seconds), kind (1-based
/// position in [`event_kinds`]), payload], …]` ordered by contact id, then occurred_at (then event id);
/// `contacts`: `[[contact_id, facts, timezone, prior], …]` ordered by id, with `prior` 0 (never
/// enrolled), 1 (enrolled before, ended) or 2 (in progress now). Returns the report.
pub fn run(
    automation: &Automation,
    options: &Options,
    events: &str,
    contacts: &str,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Value, String> {
    let Some(trigger) = automation.trigger.as_ref() else {
        return Err("the automation has no trigger: there are no events to replay".into());
    };
    let kinds = event_kinds(automation);
    let events: Vec<EventRow> = serde_json::from_str(events).map_err(|e| format!("events: {e}"))?;
    let contacts: Vec<ContactRow> =
        serde_json::from_str(contacts).map_err(|e| format!("contacts: {e}"))?;
    let mut sim = Sim {
        a: automation,
        opts: options,
        index: automation
            .nodes
            .keys()
            .enumerate()
            .map(|(i, k)| (k.as_str(), i))
            .collect(),
        nodes: automation
            .nodes
            .keys()
            .map(|_| NodeStats::default())
            .collect(),
        wait_kinds: kinds.iter().skip(1).map(String::as_str).collect(),
        totals: Totals::default(),
        waiting: BTreeMap::new(),
        next_id: 0,
    };
    if automation.nodes.values().any(|n| match &n.kind {
        NodeKind::WaitEvent { event, .. } => *event == trigger.event,
        _ => false,
    }) {
        sim.wait_kinds.insert(trigger.event.as_str());
    }
    let mut ci = 0;
    let mut start = 0;
    while start < events.len() {
        let cid = events[start].0;
        let mut end = start + 1;
        while end < events.len() && events[end].0 == cid {
            end += 1;
        }
        while ci < contacts.len() && contacts[ci].0 < cid {
            ci += 1;
        }
        let mut contact = Contact {
            id: cid,
            facts: Value::Object(Map::new()),
            tz: None,
            ever: false,
            in_progress_before: false,
            entered: false,
            enrs: Vec::new(),
        };
        if let Some((_, facts, tz, prior)) = contacts.get(ci).filter(|c| c.0 == cid) {
            contact.facts = serde_json::from_str(facts.get())
                .map_err(|e| format!("contact {cid}: facts: {e}"))?;
            contact.tz = tz.as_deref().and_then(|t| t.parse().ok());
            contact.ever = *prior >= 1;
            contact.in_progress_before = *prior >= 2;
        }
        sim.contact(&mut contact, &events[start..end], &kinds, until)?;
        start = end;
    }
    Ok(sim.report(since, until))
}

impl<'a> Sim<'a> {
    fn stats(&mut self, node: &str) -> Option<&mut NodeStats> {
        let i = *self.index.get(node)?;
        self.nodes.get_mut(i)
    }

    fn contact(
        &mut self,
        c: &mut Contact,
        events: &[EventRow],
        kinds: &[String],
        until: DateTime<Utc>,
    ) -> Result<(), String> {
        let trigger = self.a.trigger.as_ref().expect("checked by run");
        for &(_, epoch, kind, raw) in events {
            let t = at(epoch)?;
            if t > until {
                break;
            }
            self.totals.events += 1;
            self.run_due(c, t);
            self.settle(c);
            let kind = kinds
                .get(kind.wrapping_sub(1))
                .ok_or_else(|| format!("event kind {kind} is not one of {kinds:?}"))?;
            let payload: Value = serde_json::from_str(raw.get())
                .map_err(|e| format!("contact {}: event payload: {e}", c.id))?;
            // the re-entry rule is decided on the state before this event, like the dispatcher
            let mut enroll = false;
            if *kind == trigger.event {
                self.totals.trigger_events += 1;
                let passes = trigger.filter.as_ref().is_none_or(|f| {
                    f.eval(&Facts {
                        contact: Some(&c.facts),
                        event: Some(&payload),
                        context: None,
                    })
                });
                if !passes {
                    self.totals.filtered_out += 1;
                } else {
                    let skip = match self.a.reentry {
                        Reentry::Once => c.ever,
                        Reentry::AfterExit => c.in_progress_before || !c.enrs.is_empty(),
                        Reentry::Always => false,
                    };
                    if skip {
                        self.totals.skipped += 1;
                    } else {
                        enroll = true;
                    }
                }
            }
            if self.wait_kinds.contains(kind.as_str()) {
                for i in 0..c.enrs.len() {
                    if self.wakes(&c.enrs[i], c, kind, &payload) {
                        let e = &mut c.enrs[i];
                        let node = std::mem::take(&mut e.node);
                        let next = match self.a.node(&node).map(|n| &n.kind) {
                            Some(NodeKind::WaitEvent { next, .. }) => next.clone(),
                            _ => unreachable!("wakes() checked the node"),
                        };
                        if let Value::Object(ctx) = &mut e.context {
                            ctx.insert(node.clone(), payload.clone());
                        }
                        e.node = next;
                        e.status = Status::Active;
                        e.wait = None;
                        e.next_run_at = Some(t);
                        if let Some(s) = self.stats(&node) {
                            s.completed += 1;
                            *s.outcomes.entry("event").or_default() += 1;
                        }
                        self.step(c, i, t);
                    }
                }
            }
            if enroll {
                self.next_id += 1;
                c.ever = true;
                self.totals.entered += 1;
                if !c.entered {
                    c.entered = true;
                    self.totals.contacts_entered += 1;
                }
                c.enrs.push(Enr {
                    id: self.next_id,
                    status: Status::Active,
                    node: self.a.start.clone(),
                    visit: 0,
                    context: Value::Object(Map::new()),
                    event: Some(payload),
                    next_run_at: Some(t),
                    wait: None,
                    delayed_at: None,
                    calls: 0,
                });
                self.step(c, c.enrs.len() - 1, t);
            }
            self.settle(c);
        }
        self.run_due(c, until);
        self.settle(c);
        for e in &c.enrs {
            let place = match (&e.delayed_at, &e.wait) {
                (Some(d), _) if e.status == Status::Active => (d.clone(), "delay"),
                (_, Some(w)) => (e.node.clone(), w.kind_str()),
                _ => (e.node.clone(), "due"),
            };
            *self.waiting.entry(place).or_default() += 1;
        }
        Ok(())
    }

    /// Whether `kind` with `payload` wakes enrollment `e` (waiting at a wait_event node for it).
    fn wakes(&self, e: &Enr, c: &Contact, kind: &str, payload: &Value) -> bool {
        if e.status != Status::Waiting {
            return false;
        }
        let Some(Wait::Event { kind: k, .. }) = &e.wait else {
            return false;
        };
        if k != kind {
            return false;
        }
        match self.a.node(&e.node).map(|n| &n.kind) {
            Some(NodeKind::WaitEvent { filter, .. }) => filter.as_ref().is_none_or(|f| {
                f.eval(&Facts {
                    contact: Some(&c.facts),
                    event: Some(payload),
                    context: Some(&e.context),
                })
            }),
            _ => false,
        }
    }

    /// Counts ended enrollments and drops them.
    fn settle(&mut self, c: &mut Contact) {
        let totals = &mut self.totals;
        c.enrs.retain(|e| {
            match e.status {
                Status::Completed => totals.completed += 1,
                Status::Exited => totals.exited += 1,
                Status::Failed => totals.failed += 1,
                _ => return true,
            }
            false
        });
    }

    /// Runs every enrollment of `c` that is due by `t`, earliest first, each at the time it is due.
    fn run_due(&mut self, c: &mut Contact, t: DateTime<Utc>) {
        loop {
            let due = c
                .enrs
                .iter()
                .enumerate()
                .filter(|(_, e)| !e.status.is_ended())
                .filter_map(|(i, e)| e.next_run_at.filter(|n| *n <= t).map(|n| (n, i)))
                .min();
            let Some((when, i)) = due else {
                return;
            };
            self.step(c, i, when);
        }
    }

    /// Runs enrollment `i` at `now` until it parks for later, waits for something the dry run does
    /// not answer, or ends. Jobs and approvals are answered on the spot (at `now`).
    fn step(&mut self, c: &mut Contact, i: usize, now: DateTime<Utc>) {
        loop {
            let e = &mut c.enrs[i];
            if e.calls >= MAX_CALLS {
                self.totals.stopped += 1;
                e.status = Status::Exited;
                e.next_run_at = None;
                return;
            }
            e.calls += 1;
            let (out, facts, event) = step_engine::advance_returning(StepInput {
                enrollment_id: e.id,
                automation_id: 0,
                automation: self.a,
                status: e.status,
                node: std::mem::take(&mut e.node),
                visit: e.visit,
                context: std::mem::take(&mut e.context),
                contact: std::mem::take(&mut c.facts),
                event: e.event.take(),
                timezone: c.tz,
                now,
                max_transitions: 50,
            });
            // the facts come back with this call's update_contact changes applied
            c.facts = facts;
            self.record(&out, c.id);
            let e = &mut c.enrs[i];
            e.event = event;
            e.delayed_at = out
                .log
                .last()
                .filter(|l| l.action.starts_with("delayed until"))
                .map(|l| l.node.clone());
            e.status = out.status;
            e.node = out.node;
            e.visit = out.visit;
            e.context = out.context;
            e.next_run_at = out.next_run_at;
            e.wait = out.wait;
            if e.status.is_ended() {
                return;
            }
            match (&e.wait, out.job) {
                (Some(Wait::Job), Some(job)) => {
                    self.answer_job(&mut c.enrs[i], &job.node, now);
                    if c.enrs[i].status.is_ended() {
                        return;
                    }
                }
                (Some(Wait::Approval), _) => {
                    let answer = self
                        .opts
                        .approvals
                        .get(&e.node)
                        .copied()
                        .unwrap_or(Answer::Wait);
                    let Some(NodeKind::Approval {
                        approved, rejected, ..
                    }) = self.a.node(&e.node).map(|n| &n.kind)
                    else {
                        return;
                    };
                    let (next, outcome) = match answer {
                        Answer::Wait => return,
                        Answer::Approve => (approved, "approved"),
                        Answer::Reject => (rejected, "rejected"),
                    };
                    let node = std::mem::replace(&mut e.node, next.clone());
                    e.status = Status::Active;
                    e.wait = None;
                    e.next_run_at = Some(now);
                    if let Some(s) = self.stats(&node) {
                        s.completed += 1;
                        *s.outcomes.entry(outcome).or_default() += 1;
                    }
                }
                // the per-call cap: go on at the same instant
                _ if e.status == Status::Active && e.next_run_at == Some(now) => {}
                _ => return,
            }
        }
    }

    /// A job answered at `now` as `options.replies` says (default: success, empty body), moved on as
    /// complete() would move it.
    fn answer_job(&mut self, e: &mut Enr, node_id: &str, now: DateTime<Utc>) {
        let reply = self
            .opts
            .replies
            .get(node_id)
            .cloned()
            .unwrap_or_else(|| Reply::Ok(Value::Object(Map::new())));
        let Some(node) = self.a.node(node_id) else {
            return;
        };
        let ok = matches!(reply, Reply::Ok(_));
        let next: Option<String> = match (&node.kind, &reply) {
            (NodeKind::Email { next, .. }, Reply::Ok(_)) => next.clone(),
            (NodeKind::Webhook { next, .. }, Reply::Ok(body)) => {
                if let Value::Object(ctx) = &mut e.context {
                    ctx.insert(node_id.to_owned(), body.clone());
                }
                next.clone()
            }
            (
                NodeKind::Decide {
                    field,
                    paths,
                    default,
                    ..
                },
                Reply::Ok(body),
            ) => {
                if let Value::Object(ctx) = &mut e.context {
                    ctx.insert(node_id.to_owned(), body.clone());
                }
                // like complete(): paths ->> (reply ->> field), else the default
                let picked = body.get(field).and_then(|v| match v {
                    Value::Null => None,
                    Value::String(s) => paths.get(s),
                    other => paths.get(&other.to_string()),
                });
                Some(picked.unwrap_or(default).clone())
            }
            (NodeKind::Email { on_error, .. }, Reply::Error)
            | (NodeKind::Webhook { on_error, .. }, Reply::Error) => on_error.clone(),
            _ => None,
        };
        let bucket = self.opts.bucket.seconds();
        if let Some(s) = self.stats(node_id) {
            *s.queued_at
                .entry(now.timestamp().div_euclid(bucket) * bucket)
                .or_default() += 1;
            *s.outcomes
                .entry(if ok { "ok" } else { "error" })
                .or_default() += 1;
            s.completed += u64::from(ok);
            if let (NodeKind::Decide { .. }, Some(n)) = (&node.kind, &next) {
                *s.arms.entry(n.clone()).or_default() += 1;
            }
        }
        e.wait = None;
        match next {
            Some(n) => {
                e.node = n;
                e.status = Status::Active;
                e.next_run_at = Some(now);
            }
            None => {
                e.status = if ok {
                    Status::Completed
                } else {
                    Status::Failed
                };
                e.next_run_at = None;
            }
        }
    }

    /// Adds an outcome's counts, arms and samples to the report.
    fn record(&mut self, out: &Outcome, contact: i64) {
        for count in &out.counts {
            let Some(node) = count.node.as_deref() else {
                if count.metric == "goal" {
                    self.totals.goal += 1;
                }
                continue;
            };
            let Some(s) = self.stats(node) else {
                continue;
            };
            match count.metric {
                "entered" => {
                    s.entered += 1;
                    if s.sample.len() < SAMPLE && s.sample.last() != Some(&contact) {
                        s.sample.push(contact);
                    }
                }
                "goal" => s.goal += 1,
                "queued" => s.queued += 1,
                // jobs are counted completed when answered (answer_job)
                "completed" => s.completed += 1,
                _ => {}
            }
        }
        for l in &out.log {
            let arm = match l.node_type {
                "branch" | "split" | "filter" => match l.action.rsplit_once(" -> ") {
                    Some((_, target)) => Some(target.to_owned()),
                    None if l.action.starts_with("filter failed") => Some("(exit)".to_owned()),
                    None => None,
                },
                _ => None,
            };
            let timed_out = l.action.starts_with("timed out");
            if arm.is_none() && !timed_out {
                continue;
            }
            if let Some(s) = self.stats(&l.node) {
                if let Some(arm) = arm {
                    *s.arms.entry(arm).or_default() += 1;
                }
                if timed_out {
                    *s.outcomes.entry("timed_out").or_default() += 1;
                }
            }
        }
    }

    fn report(self, since: DateTime<Utc>, until: DateTime<Utc>) -> Value {
        let iso = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
        let mut nodes = Map::new();
        for ((id, node), s) in self.a.nodes.iter().zip(self.nodes) {
            let mut n = Map::new();
            n.insert("type".into(), json!(node.kind.type_name()));
            n.insert("entered".into(), json!(s.entered));
            n.insert("completed".into(), json!(s.completed));
            if matches!(
                node.kind,
                NodeKind::Email { .. } | NodeKind::Webhook { .. } | NodeKind::Decide { .. }
            ) {
                n.insert("queued".into(), json!(s.queued));
                let hist: Map<String, Value> = s
                    .queued_at
                    .iter()
                    .filter_map(|(b, k)| {
                        DateTime::<Utc>::from_timestamp(*b, 0).map(|t| (iso(t), json!(k)))
                    })
                    .collect();
                n.insert("queued_at".into(), Value::Object(hist));
            }
            if matches!(
                node.kind,
                NodeKind::Branch { .. }
                    | NodeKind::Split { .. }
                    | NodeKind::Filter { .. }
                    | NodeKind::Decide { .. }
            ) {
                n.insert("arms".into(), json!(s.arms));
            }
            if !s.outcomes.is_empty() {
                n.insert("outcomes".into(), json!(s.outcomes));
            }
            if s.goal > 0 {
                n.insert("goal".into(), json!(s.goal));
            }
            n.insert("sample".into(), json!(s.sample));
            nodes.insert(id.clone(), Value::Object(n));
        }
        let total_waiting: u64 = self.waiting.values().sum();
        let mut by_node: Map<String, Value> = Map::new();
        for ((node, kind), n) in &self.waiting {
            let entry = by_node.entry(node.clone()).or_insert_with(|| json!({}));
            entry[*kind] = json!(n);
        }
        let t = &self.totals;
        json!({
            "since": iso(since),
            "until": iso(until),
            "events": {"replayed": t.events, "trigger": t.trigger_events, "filtered_out": t.filtered_out},
            "enrollments": {
                "entered": t.entered, "contacts": t.contacts_entered, "skipped_reentry": t.skipped,
                "completed": t.completed, "exited": t.exited, "failed": t.failed,
                "goal": t.goal, "stopped": t.stopped, "waiting": total_waiting,
            },
            "waiting": by_node,
            "nodes": nodes,
            "histogram": self.opts.bucket.name(),
            "exact_split": false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::validate;

    fn automation(def: Value) -> Automation {
        validate(&def).unwrap_or_else(|f| panic!("{}", crate::fault::describe(&f)))
    }

    fn epoch(s: &str) -> f64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp() as f64
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn opts(a: &Automation, v: Value) -> Options {
        read_options(&v, a).unwrap_or_else(|f| panic!("{}", crate::fault::describe(&f)))
    }

    /// events: (contact, time, kind position, payload)
    fn sim(
        a: &Automation,
        o: &Options,
        events: &[(i64, &str, usize, Value)],
        contacts: Value,
        until: &str,
    ) -> Value {
        let ev: Vec<Value> = events
            .iter()
            .map(|(c, t, k, p)| json!([c, epoch(t), k, p]))
            .collect();
        run(
            a,
            o,
            &Value::Array(ev).to_string(),
            &contacts.to_string(),
            utc("2026-03-01T00:00:00Z"),
            utc(until),
        )
        .unwrap()
    }

    fn flow() -> Automation {
        automation(json!({
          "name": "Welcome", "trigger": {"event": "signup", "filter": {"field": "event.src", "op": "ne", "value": "spam"}},
          "reentry": "after_exit",
          "start": "hello",
          "nodes": {
            "hello": {"type": "email", "template": "welcome", "next": "wait"},
            "wait":  {"type": "delay", "duration": "2 days", "next": "check"},
            "check": {"type": "branch", "paths": [{"when": {"field": "contact.plan", "op": "eq", "value": "pro"}, "next": "crm"}],
                      "default": "ab"},
            "crm":   {"type": "webhook", "url": "https://crm.example/x", "next": "done", "on_error": "done"},
            "ab":    {"type": "split", "variants": [{"weight": 50, "next": "a"}, {"weight": 50, "next": "b"}]},
            "a":     {"type": "email", "template": "a", "next": "done"},
            "b":     {"type": "email", "template": "b", "next": "done"},
            "done":  {"type": "exit"}
          }
        }))
    }

    #[test]
    fn kinds_trigger_first_then_waits() {
        let a = automation(json!({
          "name": "n", "trigger": {"event": "t"}, "start": "w1",
          "nodes": {
            "w1": {"type": "wait_event", "event": "z", "timeout": "1 day", "next": "w2", "timeout_next": "w2"},
            "w2": {"type": "wait_event", "event": "b", "timeout": "1 day", "next": "w3", "timeout_next": "w3"},
            "w3": {"type": "wait_event", "event": "t", "timeout": "1 day", "next": "x", "timeout_next": "x"},
            "x": {"type": "exit"}
          }
        }));
        assert_eq!(event_kinds(&a), vec!["t", "b", "z"]);
        assert!(event_kinds(&automation(
            json!({"name": "n", "start": "x", "nodes": {"x": {"type": "exit"}}})
        ))
        .is_empty());
    }

    #[test]
    fn walks_a_flow_on_the_virtual_clock() {
        let a = flow();
        let o = opts(&a, json!({}));
        let contacts = json!([
            [1, {"plan": "pro", "email": "p@x.example"}, null, 0],
            [2, {"plan": "free"}, "Europe/Paris", 0],
            [3, {}, null, 0],
        ]);
        let r = sim(
            &a,
            &o,
            &[
                (1, "2026-03-01T10:00:00Z", 1, json!({})),
                (1, "2026-03-01T11:00:00Z", 1, json!({})), // in progress: after_exit skips
                (2, "2026-03-02T10:00:00Z", 1, json!({})),
                (3, "2026-03-04T10:00:00Z", 1, json!({})), // delay ends after the period
                (3, "2026-03-04T11:00:00Z", 1, json!({"src": "spam"})),
            ],
            contacts,
            "2026-03-05T00:00:00Z",
        );
        let e = &r["enrollments"];
        assert_eq!(e["entered"], 3);
        assert_eq!(e["skipped_reentry"], 1);
        assert_eq!(e["completed"], 2);
        assert_eq!(e["waiting"], 1);
        assert_eq!(r["events"]["filtered_out"], 1);
        assert_eq!(r["waiting"], json!({"wait": {"delay": 1}}));
        let n = &r["nodes"];
        assert_eq!(n["hello"]["queued"], 3);
        assert_eq!(
            n["hello"]["queued_at"],
            json!({"2026-03-01T00:00:00Z": 1, "2026-03-02T00:00:00Z": 1, "2026-03-04T00:00:00Z": 1})
        );
        assert_eq!(n["check"]["arms"], json!({"ab": 1, "crm": 1}));
        assert_eq!(n["crm"]["outcomes"], json!({"ok": 1}));
        assert_eq!(n["crm"]["queued_at"], json!({"2026-03-03T00:00:00Z": 1}));
        let ab: u64 = n["ab"]["arms"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(ab, 1);
        assert_eq!(n["done"]["entered"], 2);
        assert_eq!(n["hello"]["sample"], json!([1, 2, 3]));
        assert_eq!(n["check"]["sample"], json!([1, 2]));
    }

    #[test]
    fn reentry_rules() {
        let run_with = |reentry: &str, prior: i32, include: bool| {
            let a = automation(json!({
              "name": "n", "trigger": {"event": "t"}, "reentry": reentry, "start": "d",
              "nodes": {"d": {"type": "delay", "duration": "1 hour", "next": "x"}, "x": {"type": "exit"}}
            }));
            let o = opts(&a, json!({"include_enrolled": include}));
            let r = sim(
                &a,
                &o,
                &[
                    (1, "2026-03-01T10:00:00Z", 1, json!({})),
                    (1, "2026-03-01T10:30:00Z", 1, json!({})), // in progress
                    (1, "2026-03-01T12:00:00Z", 1, json!({})), // the first one ended
                ],
                json!([[1, {}, null, prior]]),
                "2026-03-02T00:00:00Z",
            );
            (
                r["enrollments"]["entered"].as_u64().unwrap(),
                r["enrollments"]["skipped_reentry"].as_u64().unwrap(),
            )
        };
        assert_eq!(run_with("once", 0, false), (1, 2));
        assert_eq!(run_with("after_exit", 0, false), (2, 1));
        assert_eq!(run_with("always", 0, false), (3, 0));
        // counted as enrolled before the period (SQL sends prior only with include_enrolled)
        assert_eq!(run_with("once", 1, true), (0, 3));
        assert_eq!(run_with("after_exit", 2, true), (0, 3));
        assert_eq!(run_with("after_exit", 1, true), (2, 1));
    }

    fn waits() -> Automation {
        automation(json!({
          "name": "n", "trigger": {"event": "cart"}, "reentry": "always", "start": "w",
          "nodes": {
            "w": {"type": "wait_event", "event": "paid", "filter": {"field": "event.amount", "op": "gt", "value": 0},
                  "timeout": "1 day", "next": "thanks", "timeout_next": "ask"},
            "thanks": {"type": "decide", "url": "https://ai.example/q", "field": "tone",
                       "paths": {"warm": "x", "1": "y"}, "default": "x"},
            "ask": {"type": "approval", "approved": "x", "rejected": "y", "timeout": "3 days", "timeout_next": "y"},
            "x": {"type": "exit"},
            "y": {"type": "exit"}
          }
        }))
    }

    #[test]
    fn wait_event_woken_or_timing_out_and_answers() {
        let a = waits();
        let o = opts(
            &a,
            json!({"replies": {"thanks": {"status": "ok", "body": {"tone": 1}}}}),
        );
        let r = sim(
            &a,
            &o,
            &[
                (1, "2026-03-01T10:00:00Z", 1, json!({})),
                (1, "2026-03-01T12:00:00Z", 2, json!({"amount": 0})), // filtered: keeps waiting
                (1, "2026-03-01T13:00:00Z", 2, json!({"amount": 5})),
                (2, "2026-03-01T10:00:00Z", 1, json!({})), // times out, approval left waiting
                (3, "2026-03-03T10:00:00Z", 1, json!({})), // still waiting for the event at the end
            ],
            json!([[1, {}, null, 0], [2, {}, null, 0], [3, {}, null, 0]]),
            "2026-03-03T12:00:00Z",
        );
        let n = &r["nodes"];
        assert_eq!(n["w"]["outcomes"], json!({"event": 1, "timed_out": 1}));
        assert_eq!(n["thanks"]["arms"], json!({"y": 1}));
        assert_eq!(n["ask"]["entered"], 1);
        assert_eq!(
            r["waiting"],
            json!({"ask": {"approval": 1}, "w": {"event": 1}})
        );
        assert_eq!(r["enrollments"]["completed"], 1);

        // approved at once; an approval without an answer times out in virtual time
        let o = opts(&a, json!({"approvals": {"ask": "approve"}}));
        let r = sim(
            &a,
            &o,
            &[(2, "2026-03-01T10:00:00Z", 1, json!({}))],
            json!([]),
            "2026-03-09T00:00:00Z",
        );
        assert_eq!(r["nodes"]["ask"]["outcomes"], json!({"approved": 1}));
        assert_eq!(r["nodes"]["x"]["entered"], 1);
        let o = opts(&a, json!({}));
        let r = sim(
            &a,
            &o,
            &[(2, "2026-03-01T10:00:00Z", 1, json!({}))],
            json!([]),
            "2026-03-09T00:00:00Z",
        );
        assert_eq!(r["nodes"]["ask"]["outcomes"], json!({"timed_out": 1}));
        assert_eq!(r["nodes"]["y"]["entered"], 1);
    }

    #[test]
    fn webhook_error_takes_on_error_and_email_error_fails() {
        let a = flow();
        let o = opts(
            &a,
            json!({"replies": {"crm": {"status": "error"}, "hello": {"status": "error"}}}),
        );
        let r = sim(
            &a,
            &o,
            &[(1, "2026-03-01T10:00:00Z", 1, json!({}))],
            json!([[1, {"plan": "pro"}, null, 0]]),
            "2026-03-05T00:00:00Z",
        );
        assert_eq!(r["enrollments"]["failed"], 1);
        assert_eq!(r["nodes"]["hello"]["outcomes"], json!({"error": 1}));
        assert_eq!(r["nodes"]["hello"]["completed"], 0);
    }

    #[test]
    fn window_delay_in_the_contacts_zone() {
        let a = automation(json!({
          "name": "n", "trigger": {"event": "t"}, "start": "d",
          "nodes": {"d": {"type": "delay", "window": {"days": ["mon","tue","wed","thu","fri"], "start": "09:00", "end": "17:00"}, "next": "m"},
                    "m": {"type": "email", "template": "t", "next": "x"}, "x": {"type": "exit"}}
        }));
        let o = opts(&a, json!({"histogram": "hour"}));
        // Sunday 2026-03-01 20:00 UTC → Monday 09:00 in Tokyo = 00:00 UTC Monday
        let r = sim(
            &a,
            &o,
            &[(1, "2026-03-01T20:00:00Z", 1, json!({}))],
            json!([[1, {}, "Asia/Tokyo", 0]]),
            "2026-03-03T00:00:00Z",
        );
        assert_eq!(
            r["nodes"]["m"]["queued_at"],
            json!({"2026-03-02T00:00:00Z": 1})
        );
        assert_eq!(r["histogram"], "hour");
    }

    #[test]
    fn update_contact_is_seen_later() {
        let a = automation(json!({
          "name": "n", "trigger": {"event": "t"}, "start": "u",
          "nodes": {"u": {"type": "update_contact", "set": {"plan": "pro"}, "next": "d"},
                    "d": {"type": "delay", "duration": "1 hour", "next": "b"},
                    "b": {"type": "branch", "paths": [{"when": {"field": "contact.plan", "op": "eq", "value": "pro"}, "next": "x"}], "default": "y"},
                    "x": {"type": "exit"}, "y": {"type": "exit"}}
        }));
        let o = opts(&a, json!({}));
        let r = sim(
            &a,
            &o,
            &[(1, "2026-03-01T10:00:00Z", 1, json!({}))],
            json!([[1, {}, null, 0]]),
            "2026-03-02T00:00:00Z",
        );
        assert_eq!(r["nodes"]["b"]["arms"], json!({"x": 1}));
    }

    #[test]
    fn split_spreads_by_weight() {
        let a = flow();
        let o = opts(&a, json!({}));
        let events: Vec<(i64, &str, usize, Value)> = (1..=1000)
            .map(|c| (c, "2026-03-01T10:00:00Z", 1, json!({})))
            .collect();
        let r = sim(&a, &o, &events, json!([]), "2026-03-05T00:00:00Z");
        let arms = &r["nodes"]["ab"]["arms"];
        let (x, y) = (arms["a"].as_u64().unwrap(), arms["b"].as_u64().unwrap());
        assert_eq!(x + y, 1000);
        assert!((400..600).contains(&x), "{x}");
        assert_eq!(r["nodes"]["a"]["queued"].as_u64().unwrap(), x);
        assert_eq!(r["enrollments"]["contacts"], 1000);
    }

    #[test]
    fn options_are_checked_by_key() {
        let a = waits();
        let bad = |v: Value| -> Vec<String> {
            read_options(&v, &a)
                .unwrap_err()
                .iter()
                .map(|f| f.to_string())
                .collect()
        };
        assert_eq!(
            bad(json!([])),
            vec!["options: must be a JSON object, got array"]
        );
        assert_eq!(
            bad(json!({"speed": 1})),
            vec!["options.speed: unknown key \"speed\"; allowed: until, replies, approvals, histogram, include_enrolled"]
        );
        assert!(
            bad(json!({"until": "yesterday"}))[0].starts_with("options.until: must be an RFC 3339")
        );
        assert!(bad(json!({"replies": {"nope": {}}}))[0]
            .starts_with("options.replies.nope: no node \"nope\""));
        assert!(bad(json!({"replies": {"w": {}}}))[0].contains("is of type wait_event"));
        assert!(bad(json!({"replies": {"thanks": {"status": "maybe"}}}))[0]
            .starts_with("options.replies.thanks.status"));
        assert!(bad(json!({"replies": {"thanks": {"code": 1}}}))[0]
            .starts_with("options.replies.thanks.code: unknown key"));
        assert!(bad(json!({"approvals": {"ask": "yes"}}))[0]
            .starts_with("options.approvals.ask: must be"));
        assert!(bad(json!({"approvals": {"thanks": "approve"}}))[0].contains("expected approval"));
        assert!(bad(json!({"histogram": "week"}))[0].starts_with("options.histogram"));
        assert!(bad(json!({"include_enrolled": "yes"}))[0].starts_with("options.include_enrolled"));
        let o = opts(
            &a,
            json!({"until": "2026-03-02T00:00:00+01:00", "histogram": "hour"}),
        );
        assert_eq!(o.until, Some(utc("2026-03-01T23:00:00Z")));
        assert_eq!(o.bucket, Bucket::Hour);
        assert_eq!(read_options(&Value::Null, &a).unwrap().bucket, Bucket::Day);
    }

    #[test]
    fn no_trigger_is_refused_and_bad_input_is_an_error() {
        let a = automation(json!({"name": "n", "start": "x", "nodes": {"x": {"type": "exit"}}}));
        let o = opts(&a, json!({}));
        let t = utc("2026-03-01T00:00:00Z");
        assert!(run(&a, &o, "[]", "[]", t, t)
            .unwrap_err()
            .contains("no trigger"));
        let a = flow();
        assert!(run(&a, &o, "{}", "[]", t, t)
            .unwrap_err()
            .starts_with("events:"));
        assert!(run(&a, &o, "[[1, 0, 9, {}]]", "[]", t, t)
            .unwrap_err()
            .contains("kind 9"));
    }
}

/// `cargo test --release -p herald --lib simulate::bench -- --ignored --nocapture`: the Rust part of
/// the 1,000,000-event figure (100,000 contacts × 10 events over 7 days, a 6-node flow).
#[cfg(test)]
mod bench {
    use super::*;
    use crate::definition::validate;

    #[test]
    #[ignore]
    fn million_events() {
        let a = validate(&json!({"name": "bench", "trigger": {"event": "page_view", "filter": {"field": "event.path", "op": "ne", "value": "/p/49"}},
          "reentry": "always", "start": "hello",
          "nodes": {"hello": {"type": "email", "template": "t", "next": "wait"},
                    "wait": {"type": "delay", "duration": "1 day", "next": "check"},
                    "check": {"type": "branch", "paths": [{"when": {"field": "contact.plan", "op": "eq", "value": "pro"}, "next": "ab"}], "default": "done"},
                    "ab": {"type": "split", "variants": [{"weight": 50, "next": "a"}, {"weight": 50, "next": "done"}]},
                    "a": {"type": "email", "template": "a", "next": "done"},
                    "done": {"type": "exit"}}})).unwrap();
        let o = read_options(&json!({}), &a).unwrap();
        let t0 = 1_800_000_000.0;
        let mut ev = String::from("[");
        let mut co = String::from("[");
        for c in 1..=100_000i64 {
            for k in 0..10i64 {
                let g = k * 100_000 + c;
                if ev.len() > 1 {
                    ev.push_str(", ");
                }
                ev.push_str(&format!(
                    "[{c}, {}, 1, {{\"path\": \"/p/{}\"}}]",
                    t0 + g as f64 * 0.604,
                    g % 50
                ));
            }
            if co.len() > 1 {
                co.push_str(", ");
            }
            co.push_str(&format!("[{c}, {{\"plan\": \"{}\", \"email\": \"c{c}@x.example\", \"timezone\": \"Europe/Paris\", \"tags\": []}}, \"Europe/Paris\", 0]",
                if c % 3 == 0 { "pro" } else { "free" }));
        }
        ev.push(']');
        co.push(']');
        let since = DateTime::<Utc>::from_timestamp(t0 as i64, 0).unwrap();
        let until = DateTime::<Utc>::from_timestamp(t0 as i64 + 8 * 86_400, 0).unwrap();
        let start = std::time::Instant::now();
        let r = run(&a, &o, &ev, &co, since, until).unwrap();
        eprintln!("{:?} {}", start.elapsed(), r["enrollments"]);
    }
}

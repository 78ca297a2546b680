//! The Rust functions SQL calls. Each is a thin adapter: convert, call a plain module, turn a typed
//! failure into an `ereport` a SQL user can act on. Names start with `_`: they are herald's internals,
//! called by the SQL API in `sql/`, not part of the contract.

use std::cell::RefCell;
use std::ffi::CStr;

use pgrx::callconv::{Arg, ArgAbi};
use pgrx::nullable::Nullable;
use pgrx::prelude::*;
use pgrx::{Json, JsonB};
use serde_json::{json, Value};

use crate::condition::{Condition, Facts, Scope};
use crate::datum_array::{Int4Array, TextArray};
use crate::definition::{self, Reentry};
use crate::definition_cache::DefinitionCache;
use crate::fault::Fault;

thread_local! {
    /// Automations validated by this backend's ticks (a backend is single-threaded): each
    /// definition is validated once, not on every tick.
    static DEFINITIONS: RefCell<DefinitionCache> = RefCell::new(DefinitionCache::new());
}

/// A `json` argument as its text, unparsed. pgrx's `Json` parses it with serde_json first, whose
/// recursion limit (128 levels) would fail the whole call because of one deep value inside.
pub struct JsonText(pub String);

/// A `jsonb` argument printed to text (`jsonb_out`) and not parsed, so the function can check its
/// size and nesting before parsing it (pgrx's `JsonB` would fail on a document deeper than 128
/// levels with serde_json's message, before the function runs).
pub struct JsonbText(pub String);

impl FromDatum for JsonText {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        oid: pg_sys::Oid,
    ) -> Option<Self> {
        // SAFETY: the caller hands a json datum (the function's declared argument type)
        unsafe { pgrx::datum::JsonString::from_polymorphic_datum(datum, is_null, oid) }
            .map(|j| JsonText(j.0))
    }
}

impl FromDatum for JsonbText {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY: the caller hands a jsonb datum; jsonb_out detoasts it and returns a palloc'd
        // C string, copied and freed here
        unsafe {
            let cstr = pgrx::direct_function_call::<&CStr>(pg_sys::jsonb_out, &[Some(datum)])
                .expect("jsonb_out returned NULL");
            let text = cstr.to_string_lossy().into_owned();
            pg_sys::pfree(cstr.as_ptr() as *mut std::ffi::c_void);
            Some(JsonbText(text))
        }
    }
}

// SAFETY (both): unboxed with FromDatum from the declared json/jsonb argument, as pgrx's Json does.
unsafe impl<'fcx> ArgAbi<'fcx> for JsonText {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}

unsafe impl<'fcx> ArgAbi<'fcx> for JsonbText {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}

pgrx::impl_sql_translatable!(JsonText, arg_only = "json");
pgrx::impl_sql_translatable!(JsonbText, arg_only = "jsonb");

/// DETAIL lists at most this many faults (a hostile definition can have thousands).
const MAX_DETAIL_FAULTS: usize = 100;

/// Raises `what: <first fault>`; when there are several, DETAIL lists them, one per line (the
/// first [`MAX_DETAIL_FAULTS`]).
fn raise_faults(what: &str, faults: &[Fault]) -> ! {
    let first = faults.first().map(Fault::to_string).unwrap_or_default();
    let message = format!("{what}: {first}");
    if faults.len() > 1 {
        let mut all: Vec<String> = faults
            .iter()
            .take(MAX_DETAIL_FAULTS)
            .map(Fault::to_string)
            .collect();
        if faults.len() > MAX_DETAIL_FAULTS {
            all.push(format!("… and {} more", faults.len() - MAX_DETAIL_FAULTS));
        }
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{message} (and {} more)", faults.len() - 1),
            all.join("\n")
        );
    }
    ereport!(
        ERROR,
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message
    );
}

/// Validates an automation definition and returns what the automations table stores next to it:
/// `{"name", "trigger_event", "trigger_filter", "reentry", "start"}`. The definition arrives as
/// text, so one too big or too deeply nested is refused with the limit before it is parsed.
#[pg_extern(immutable, parallel_safe)]
fn _check_automation(definition: Option<JsonbText>) -> JsonB {
    let Some(JsonbText(text)) = definition else {
        raise_faults(
            "invalid automation definition",
            &[Fault::new("$", "definition must not be NULL")],
        );
    };
    let def = definition::read_text(&text)
        .unwrap_or_else(|faults| raise_faults("invalid automation definition", &faults));
    let automation = definition::validate(&def)
        .unwrap_or_else(|faults| raise_faults("invalid automation definition", &faults));
    let reentry = match automation.reentry {
        Reentry::Once => "once",
        Reentry::AfterExit => "after_exit",
        Reentry::Always => "always",
    };
    let trigger = def.get("trigger");
    let filter_reads_contact = automation
        .trigger
        .as_ref()
        .and_then(|t| t.filter.as_ref())
        .is_some_and(|f| f.scopes().reads(Scope::Contact));
    JsonB(json!({
        "filter_reads_contact": filter_reads_contact,
        "name": automation.name,
        "trigger_event": automation.trigger.as_ref().map(|t| t.event.clone()),
        "trigger_filter": trigger.and_then(|t| t.get("filter")).cloned().unwrap_or(Value::Null),
        "reentry": reentry,
        "start": automation.start,
    }))
}

/// Validates a broadcast definition and returns its normalised form (see `broadcast.rs`); a bad one
/// raises with every fault and its JSON path.
#[pg_extern(immutable, parallel_safe)]
fn _check_broadcast(definition: Option<JsonB>) -> JsonB {
    let Some(JsonB(def)) = definition else {
        raise_faults(
            "invalid broadcast",
            &[Fault::new("$", "definition must not be NULL")],
        );
    };
    JsonB(
        crate::broadcast::validate(&def)
            .unwrap_or_else(|faults| raise_faults("invalid broadcast", &faults)),
    )
}

/// Checks a result subscription's URL and options (see `subscription.rs`) and returns the normalised
/// form `herald.subscribe_results` stores; a bad one raises with every fault.
#[pg_extern(immutable, parallel_safe)]
fn _check_subscription(url: Option<&str>, options: Option<JsonB>) -> JsonB {
    let options = options.map_or(Value::Null, |JsonB(v)| v);
    JsonB(
        crate::subscription::validate(url, &options)
            .unwrap_or_else(|faults| raise_faults("invalid subscription", &faults)),
    )
}

/// Checks a segment: a valid condition that reads contact fields only.
#[pg_extern(immutable, parallel_safe)]
fn _check_segment(segment: Option<JsonB>) {
    let Some(JsonB(segment)) = segment else {
        raise_faults(
            "invalid segment",
            &[Fault::new("$", "segment must not be NULL")],
        );
    };
    let condition = Condition::parse(&segment, "$")
        .unwrap_or_else(|faults| raise_faults("invalid segment", &faults));
    let scopes = condition.scopes();
    if scopes.reads(Scope::Event) || scopes.reads(Scope::Context) {
        raise_faults(
            "invalid segment",
            &[Fault::new(
                "$",
                "a segment may only use contact.* fields (there is no event or context)",
            )],
        );
    }
}

/// Evaluates a condition against a contact, an event payload and an enrollment context.
/// A NULL condition matches everything. Conditions are validated when stored, so a parse failure
/// here means a row was edited by hand; it is reported, not ignored.
#[pg_extern(immutable, parallel_safe)]
fn _matches(
    condition: Option<JsonB>,
    contact: Option<JsonB>,
    event: Option<JsonB>,
    context: Option<JsonB>,
) -> bool {
    let Some(JsonB(condition)) = condition else {
        return true;
    };
    let condition = Condition::parse(&condition, "$")
        .unwrap_or_else(|faults| raise_faults("invalid stored condition", &faults));
    let facts = Facts {
        contact: contact.as_ref().map(|j| &j.0),
        event: event.as_ref().map(|j| &j.0),
        context: context.as_ref().map(|j| &j.0),
    };
    condition.eval(&facts)
}

/// Why a JSON text is out of bounds: `None` when it nests at most `max_depth` arrays/objects deep
/// and is at most `max_bytes` long, else e.g. "nests 200 levels deep; at most 32 are allowed" or
/// "is 2000000 bytes; at most 65536 are allowed". One pass over the bytes, nothing parsed; SQL
/// calls it on what a tenant stores (`herald._json_fault(payload::text, 32, 65536)`).
#[pg_extern(immutable, parallel_safe, strict)]
fn _json_fault(value: &str, max_depth: i32, max_bytes: i32) -> Option<String> {
    crate::json_limits::fault(value, max_depth.max(0) as usize, max_bytes.max(0) as usize)
}

/// True when `name` is an IANA time zone name (e.g. `Europe/Paris`).
#[pg_extern(immutable, strict, parallel_safe)]
fn _valid_timezone(name: &str) -> bool {
    name.parse::<chrono_tz::Tz>().is_ok()
}

/// True when `text` is an RFC 3339 timestamp (what track_many accepts for `occurred_at`).
#[pg_extern(immutable, strict, parallel_safe)]
fn _valid_timestamp(text: &str) -> bool {
    chrono::DateTime::parse_from_rfc3339(text).is_ok()
}

/// True when `email` is an address herald accepts ([`crate::mailbox::valid_address`]); false, never
/// NULL, for NULL, so `NOT herald._valid_email(x)` always decides. Every import, track() and send()
/// asks it once per address.
#[pg_extern(immutable, parallel_safe)]
fn _valid_email(email: Option<&str>) -> bool {
    email.is_some_and(crate::mailbox::valid_address)
}

/// True when `mailbox` is a sender or Reply-To herald accepts ([`crate::mailbox::is_valid`]: an
/// address, or a name and an address in angle brackets); false for NULL.
#[pg_extern(immutable, parallel_safe)]
fn _valid_mailbox(mailbox: Option<&str>) -> bool {
    mailbox.is_some_and(crate::mailbox::is_valid)
}

/// Delay before retrying a job whose attempt number `attempt` failed; `jitter` in [0, 1) (SQL passes random()).
#[pg_extern(immutable, strict, parallel_safe)]
fn _retry_delay(attempt: i32, jitter: f64) -> pgrx::datum::Interval {
    let delay = crate::backoff::retry_delay(attempt, jitter);
    pgrx::datum::Interval::from_micros(delay.as_micros() as i64)
}

/// The step engine over a whole tick batch: `automations` maps automation id → definition,
/// `enrollments` is an array of `{id, workspace_id, automation_id, contact_id, status, node, visit,
/// context, event, contact, timezone}`. Pure computation: tick() does all reading and writing, in one statement. One row per
/// enrollment, what tick() writes back. `json`/text, not `jsonb`, both ways: pgrx reads a jsonb by
/// printing it to text first (~25 µs per enrollment in a 10,000 batch), while json is already text.
/// Both documents arrive as text and each automation and enrollment is parsed on its own, so one
/// that cannot be read fails alone (see tick_batch.rs); automations are validated once per backend
/// (the thread-local definition cache). The step log
/// comes back as arrays, so SQL unnests it without parsing JSON; the stats deltas come back summed for
/// the whole batch, on the first row.
// pgrx needs the row tuple spelled out in the signature, so no type alias.
#[allow(clippy::type_complexity)]
#[pg_extern(strict)]
fn _steps(
    automations: JsonText,
    enrollments: &str,
    now_epoch: f64,
    max_transitions: i32,
) -> TableIterator<
    'static,
    (
        name!(enrollment_id, i64),
        name!(workspace_id, String),
        name!(automation_id, i64),
        name!(contact_id, i64),
        name!(status, String),
        name!(node, String),
        name!(next_run_at, Option<f64>),
        name!(visit, i32),
        name!(exit_reason, Option<String>),
        name!(wait_kind, Option<String>),
        name!(wait_event, Option<String>),
        name!(wait_filter, Option<Json>),
        name!(job, Option<Json>),
        name!(contact_update, Option<Json>),
        name!(log_nodes, TextArray),
        name!(log_visits, Int4Array),
        name!(log_actions, TextArray),
        name!(count_automations, Option<Vec<i64>>),
        name!(count_nodes, Option<Vec<String>>),
        name!(count_metrics, Option<Vec<String>>),
        name!(count_n, Option<Vec<i64>>),
    ),
> {
    let outcomes = DEFINITIONS
        .with_borrow_mut(|cache| {
            crate::tick_batch::run(
                &automations.0,
                enrollments,
                now_epoch,
                max_transitions,
                cache,
            )
        })
        .unwrap_or_else(|e| {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
                format!("tick batch: {e}")
            );
        });
    // the batch's stats totals ride on the first row only (NULL on the others)
    let mut totals = Some(crate::tick_batch::count_totals(&outcomes));
    TableIterator::new(outcomes.into_iter().map(move |r| {
        let (count_automations, count_nodes, count_metrics, count_n) = match totals.take() {
            Some(t) => {
                let (mut a, mut nodes, mut metrics, mut n) = (vec![], vec![], vec![], vec![]);
                for (automation, node, metric, count) in t {
                    a.push(automation);
                    nodes.push(node);
                    metrics.push(metric);
                    n.push(count);
                }
                (Some(a), Some(nodes), Some(metrics), Some(n))
            }
            None => (None, None, None, None),
        };
        (
            r.enrollment_id,
            r.workspace_id,
            r.automation_id,
            r.contact_id,
            r.status,
            r.node,
            r.next_run_at,
            r.visit,
            r.exit_reason,
            r.wait_kind,
            r.wait_event,
            r.wait_filter.map(Json),
            r.job.map(Json),
            r.contact_update.map(Json),
            TextArray(r.log_nodes),
            Int4Array(r.log_visits),
            TextArray(r.log_actions),
            count_automations,
            count_nodes,
            count_metrics,
            count_n,
        )
    }))
}

/// The dry run of an automation (see `simulate.rs`; called by `sql/simulate.sql`). With `events`
/// NULL it only checks: the definition (every fault with its JSON path) and the options (every fault
/// naming its key), and answers `{"kinds": [the event kinds to read, trigger first], "until":
/// options.until or null, "include_enrolled": bool}`. With `events` and `contacts` (json texts, the
/// shapes `simulate::run` documents) it runs and returns the report. Nothing is read or written here.
#[pg_extern]
fn _simulate(
    definition: Option<JsonbText>,
    options: Option<JsonbText>,
    events: Option<JsonText>,
    contacts: Option<JsonText>,
    since: Option<f64>,
    until: Option<f64>,
) -> JsonB {
    let what = "invalid automation definition";
    let Some(JsonbText(text)) = definition else {
        raise_faults(what, &[Fault::new("$", "definition must not be NULL")]);
    };
    let def = definition::read_text(&text).unwrap_or_else(|faults| raise_faults(what, &faults));
    let automation =
        definition::validate(&def).unwrap_or_else(|faults| raise_faults(what, &faults));
    if automation.trigger.is_none() {
        raise_faults(
            what,
            &[Fault::new(
                "$.trigger",
                "the automation has no trigger, so no recorded event would enrol anyone: nothing to simulate",
            )],
        );
    }
    let options: Value = match options {
        None => Value::Null,
        Some(JsonbText(t)) => serde_json::from_str(&t).unwrap_or_else(|e| {
            raise_faults("invalid options", &[Fault::new("options", e.to_string())])
        }),
    };
    let opts = crate::simulate::read_options(&options, &automation)
        .unwrap_or_else(|faults| raise_faults("invalid options", &faults));
    let (Some(JsonText(events)), Some(JsonText(contacts)), Some(since), Some(until)) =
        (events, contacts, since, until)
    else {
        return JsonB(json!({
            "kinds": crate::simulate::event_kinds(&automation),
            "until": opts.until.map(|t| t.to_rfc3339()),
            "include_enrolled": opts.include_enrolled,
        }));
    };
    let time = |epoch: f64| {
        chrono::DateTime::<chrono::Utc>::from_timestamp_micros((epoch * 1e6).round() as i64)
            .unwrap_or_else(|| {
                ereport!(
                    ERROR,
                    PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
                    format!("time {epoch} is out of range")
                );
            })
    };
    let report = crate::simulate::run(
        &automation,
        &opts,
        &events,
        &contacts,
        time(since),
        time(until),
    )
    .unwrap_or_else(|e| {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
            format!("simulate: {e}")
        );
    });
    JsonB(report)
}

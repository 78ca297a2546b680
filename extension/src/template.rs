//! Templates in SQL: thin adapters over `herald-render`, the engine the daemon renders with, so a
//! template saved, previewed or test-sent here behaves as the daemon will send it. Called by
//! `sql/templates.sql` (upsert_template, render_template, send_test) and `create_broadcast`.

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use herald_render::validate::{self, Refusal};
use herald_render::{sandbox, Undefined, Vars};

/// Raises an error with a hint (what is allowed instead).
fn raise(code: PgSqlErrorCode, message: String, hint: String) -> ! {
    pgrx::pg_sys::panic::ErrorReport::new(code, message, "herald")
        .set_hint(hint)
        .report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

fn refuse(template: &str, r: Refusal) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        format!("template {}: {}", quote(template), r.message),
        r.hint,
    )
}

/// `'key'`, as the SQL functions quote a template key in their messages.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn parts<'a>(
    subject: &'a str,
    html: &'a str,
    text_body: Option<&'a str>,
) -> Vec<(&'a str, &'a str)> {
    let mut parts = vec![("subject", subject), ("html", html)];
    if let Some(t) = text_body {
        parts.push(("text", t));
    }
    parts
}

/// Refuses a template that does not parse or names a variable templates cannot see.
#[pg_extern(immutable, parallel_safe)]
fn _check_template(key: &str, subject: &str, html: &str, text_body: Option<&str>) {
    if let Err(r) = validate::check_template(&parts(subject, html, text_body)) {
        refuse(key, r);
    }
}

/// Refuses a template that needs a `broadcast.<name>` the broadcast's `variables` do not hold.
#[pg_extern(immutable, parallel_safe)]
fn _check_broadcast_template(
    key: &str,
    subject: &str,
    html: &str,
    text_body: Option<&str>,
    variables: Option<JsonB>,
) {
    let variables = variables.map_or(Value::Null, |JsonB(v)| v);
    if let Err(r) =
        validate::check_broadcast_variables(key, &parts(subject, html, text_body), &variables)
    {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid broadcast: {}", r.message),
            r.hint,
        );
    }
}

/// Renders an email template (`{"key", "subject", "html", "text"}`) with the variables of a job
/// payload, in a child process with the daemon's memory and time bounds; returns
/// `{"subject", "html", "text"}` or raises the daemon's message.
#[pg_extern(volatile, parallel_unsafe)]
fn _render_email(
    template: JsonB,
    payload: JsonB,
    workspace: &str,
    unsubscribe_url: Option<&str>,
) -> JsonB {
    let mut vars = Vars::from_payload(workspace, &payload.0);
    if let Some(url) = unsubscribe_url {
        vars = vars.with_unsubscribe_url(url);
    }
    let rendered = herald_render::email_fields(&template.0).and_then(|fields| {
        let values = sandbox::render_fields(&fields, &vars, Undefined::Fail, || {
            check_for_interrupts!();
        })?;
        herald_render::finish_email(values, &vars)
    });
    match rendered {
        Ok(e) => JsonB(json!({"subject": e.subject, "html": e.html, "text": e.text})),
        Err(message) => {
            ereport!(ERROR, PgSqlErrorCode::ERRCODE_DATA_EXCEPTION, message);
        }
    }
}

//! herald: a marketing-automation and broadcast engine inside Postgres.
//!
//! This file is the table of contents. The SQL surface lives in `sql/*.sql` (tables, the dispatcher,
//! the API functions); Rust supplies what SQL does badly, as thin `#[pg_extern]`s in [`api`] over
//! plain modules that are unit-tested without Postgres.

::pgrx::pg_module_magic!(name, version);

mod api;
pub mod backoff;
pub mod broadcast;
pub mod condition;
pub mod datum_array;
pub mod definition;
pub mod definition_cache;
pub mod duration;
pub mod fault;
pub mod json_limits;
pub mod mailbox;
pub mod simulate;
pub mod step_engine;
pub mod subscription;
mod template;
pub mod tick_batch;

pgrx::extension_sql_file!("../../sql/schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!(
    "../../sql/contacts.sql",
    name = "contacts",
    requires = [
        "schema",
        api::_valid_timezone,
        api::_json_fault,
        api::_valid_email
    ]
);
pgrx::extension_sql_file!(
    "../../sql/events.sql",
    name = "events",
    requires = ["contacts", api::_matches, api::_valid_timestamp]
);
pgrx::extension_sql_file!(
    "../../sql/automations.sql",
    name = "automations",
    requires = ["events", api::_check_automation, api::_check_segment]
);
pgrx::extension_sql_file!(
    "../../sql/queue.sql",
    name = "queue",
    requires = ["automations", api::_retry_delay, api::_valid_mailbox]
);
// templates: saved checked, previewed, test-sent, with the daemon's engine (herald-render)
pgrx::extension_sql_file!(
    "../../sql/templates.sql",
    name = "templates",
    requires = [
        "queue",
        template::_check_template,
        template::_check_broadcast_template,
        template::_render_email
    ]
);
pgrx::extension_sql_file!("../../sql/stats.sql", name = "stats", requires = ["queue"]);
pgrx::extension_sql_file!(
    "../../sql/engine.sql",
    name = "engine",
    requires = ["stats", api::_steps]
);
pgrx::extension_sql_file!(
    "../../sql/versions.sql",
    name = "versions",
    requires = ["engine", api::_check_automation]
);
pgrx::extension_sql_file!(
    "../../sql/simulate.sql",
    name = "simulate",
    requires = ["versions", api::_simulate]
);
pgrx::extension_sql_file!(
    "../../sql/broadcasts.sql",
    name = "broadcasts",
    requires = ["engine", api::_check_broadcast]
);
pgrx::extension_sql_file!(
    "../../sql/results.sql",
    name = "results",
    requires = ["broadcasts", api::_check_subscription]
);
// the HTTP API's keys and idempotency, and its one entry point (api_call)
pgrx::extension_sql_file!("../../sql/api.sql", name = "api", requires = ["results"]);
// archiving and deleting templates, lists and broadcasts (after the functions that refuse archived ones)
pgrx::extension_sql_file!(
    "../../sql/archive.sql",
    name = "archive",
    requires = ["broadcasts"]
);
// roles, grants, SECURITY DEFINER, row-level security: after every function and table exists
pgrx::extension_sql_file!(
    "../../sql/admin_sessions.sql",
    name = "admin_sessions",
    requires = ["schema"]
);
pgrx::extension_sql_file!("../../sql/security.sql", name = "security", finalize);

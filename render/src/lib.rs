//! herald's templates: one engine for everything herald renders, used by the daemon (`herald run`,
//! in its render workers) and by the extension (`upsert_template`'s checks, `render_template`,
//! `send_test`), so a preview is exactly what is sent.
//!
//! - [`vars`]: the variables a job's templates see, built from the claimed job payload.
//! - [`engine`]: the minijinja environment (escaping by part name, fuel, bounded output) and its
//!   error messages; email parts render strictly (an undefined variable fails with its name).
//! - [`undefined`]: which variable was undefined, from the error's span and the variables.
//! - [`email`]: an email template's parts, rendered into subject/html/text.
//! - [`validate`]: what `upsert_template` and `create_broadcast` refuse.
//! - [`text`]: the plain-text part derived from HTML.
//! - [`sandbox`]: one render in a forked child under memory and time bounds (the extension's).

pub mod email;
pub mod engine;
pub mod sandbox;
pub mod text;
pub mod undefined;
pub mod validate;
pub mod vars;

pub use email::{email_fields, finish_email, RenderedEmail};
pub use engine::{Engine, Undefined, FUEL, MAX_OUTPUT};
pub use vars::{Vars, ROOTS};

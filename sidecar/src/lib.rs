//! herald's daemon and command-line tool as a library: the `herald` binary (main.rs) parses the
//! command line, sets up logging and signals, and calls in here; `herald-bench` (its own crate, not
//! shipped with the daemon) drives `run` in-process.

pub mod compat;
pub mod db;
pub mod demo;
pub mod import;
pub mod listing;
pub mod logging;
pub mod run;
pub mod status;

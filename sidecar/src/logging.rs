//! Logging is set up once per process, by the binary, before any work starts: text (coloured on a
//! terminal) or one JSON object per line (`HERALD_LOG_FORMAT=json`, for log shippers). Always to stderr:
//! stdout carries the commands' own output (`herald status --json`, bench reports).

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The filter when RUST_LOG is not set: herald's own INFO lines, the driver's warnings only.
const DEFAULT_FILTER: &str = "info,tokio_postgres=warn";

/// Installs the process-wide subscriber. Call once, from `main`.
pub fn init(format: LogFormat) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| DEFAULT_FILTER.into());
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("deadpool")) {
        // the pool warns each time it drops a connection that closed (the database restarted):
        // db_health already says once that the database is away, so these lines are noise
        filter = filter.add_directive("deadpool=error".parse().expect("a valid directive"));
    }
    match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
}

//! How `herald run` connects: the settings every connection gets, back-off, and which errors mean the
//! database is away rather than the statement wrong. Server notices (e.g. complete()'s WARNING about
//! ignored results) are logged, never dropped.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, Client, Config};

/// The settings every connection of the daemon uses: named after the component (`application_name`,
/// visible in pg_stat_activity), and with time limits, so that a server that vanished without closing
/// the connection (network cut, failover) is noticed in seconds rather than after the kernel's TCP
/// retransmission limit (~15 min) or the 2 h keepalive default. What DATABASE_URL sets is kept.
pub fn settings(config: &Config, component: &'static str) -> Config {
    let mut config = config.clone();
    config.application_name(format!("herald run: {component}"));
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(30));
    }
    if config.get_keepalives_idle() == Config::new().get_keepalives_idle() {
        // the LISTEN connection is idle for long stretches: only keepalives find it dead
        config.keepalives_idle(Duration::from_secs(30));
    }
    config
}

/// Tells herald.tick not to publish the results stream itself (sql/engine.sql): `maintenance` does,
/// every 250 ms and after every tick round, beside the ticks. A session setting rather than a startup
/// option, which poolers such as PgBouncer refuse; a database older than the setting ignores it.
const TICK_LEAVES_RESULTS: &str = "SET herald.tick_publishes_results = off";

/// Opens a connection with [`settings`] and starts the task that drives it, which logs the server's
/// notices; the task ends when the connection closes. The pool (`database`) and the notifier's LISTEN
/// connection are the only callers.
pub async fn connect_driven(
    config: &Config,
    component: &'static str,
) -> Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    // TLS as DATABASE_URL's sslmode says (crate::db::connect)
    let (client, mut messages) = crate::db::connect(&settings(config, component)).await?;
    let driver = tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notice(n)) => match n.severity() {
                    "WARNING" | "ERROR" => tracing::warn!(component, "server: {}", n.message()),
                    _ => tracing::debug!(component, "server: {}", n.message()),
                },
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(component, error = %describe(&e), "connection closed");
                    break;
                }
            }
        }
    });
    client.batch_execute(TICK_LEAVES_RESULTS).await?;
    Ok((client, driver))
}

/// [`connect_driven`] without the driver's handle.
pub async fn connect(
    config: &Config,
    component: &'static str,
) -> Result<Client, tokio_postgres::Error> {
    Ok(connect_driven(config, component).await?.0)
}

/// Exponential back-off with jitter: 100 ms, 200 ms, … up to 10 s. The cap bounds how long a component
/// stays idle after the database comes back (the first component to reconnect also wakes the others).
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// The delay to wait now (between half and all of the current step); doubles the next one.
    pub fn step(&mut self) -> Duration {
        let current = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        current / 2 + current.mul_f64(f64::from(nanos % 1000) / 2000.0)
    }
}

/// True when the error says a function is not installed (an older herald build).
pub fn is_undefined_function(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_FUNCTION)
}

/// The error with its causes: tokio-postgres prints only its kind ("db error", "error connecting to
/// server") and keeps the server's message or the OS error in the source chain. Every error the
/// daemon logs goes through it.
pub use crate::db::describe;

/// True when the error is about the connection rather than the statement: the server went away or
/// cannot take us now (I/O, closed, timeout, SQLSTATE class 08, shutdown/starting up, too many
/// connections). These are retried quietly: `DbHealth` says once that the database is away.
pub fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => {
            let code = code.code();
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
        }
        // tokio-postgres does not expose its error kinds; these are its fixed descriptions
        None => {
            e.is_closed()
                || matches!(
                    e.to_string().as_str(),
                    "error connecting to server"
                        | "error communicating with the server"
                        | "timeout waiting for server"
                )
        }
    }
}

/// True when reconnecting cannot help, so `herald run` stops at start-up instead of waiting:
/// authentication refused (28000 no pg_hba entry / peer mismatch, 28P01 wrong password, a password
/// missing from the settings), the role may not connect (42501), bad settings or TLS. A database that
/// does not exist (3D000) is also final: it may be created later, but a typo in DATABASE_URL is the
/// common cause, and a clear error says so at once. Once running, every failure is retried.
pub fn is_permanent(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => matches!(code.code(), "28000" | "28P01" | "3D000" | "42501"),
        None => matches!(
            e.to_string().as_str(),
            "invalid configuration"
                | "invalid connection string"
                | "authentication error"
                | "error performing TLS handshake"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap() {
        let mut b = Backoff::default();
        let first = b.step();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            assert!(b.step() <= Duration::from_secs(10));
        }
        assert!(b.step() >= Duration::from_secs(5));
        b.reset();
        assert!(b.step() <= Duration::from_millis(100));
    }
}

//! Is the database there? Every connection attempt (the pool's, in `database`, and the notifier's)
//! reports what it sees, so that an outage is told ONCE — one WARN "waiting for the database" when the
//! first connection attempt fails, one INFO "database is back after N s" when one succeeds — instead of
//! a line per component per retry, and /metrics can show `herald_database_up` and `herald_database_down_seconds`.
//!
//! Only connection attempts decide that the database is away: a statement failing on an established
//! connection (the server just restarted, a backend was terminated) makes the component reconnect,
//! and the outcome of that attempt is what counts. Any success says it is back: a component whose
//! connection outlived another's failed attempt proves the database answers.
//!
//! Components keep their own back-off; [`DbHealth::pause`] cuts it short when the database comes back,
//! so after a long outage the daemon resumes at once rather than at each component's next step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio::sync::Notify;
use tokio_postgres::{Client, Config};

use super::pg::{self, Backoff};

/// While the database stays away, a reminder this often (so a long outage is visible in the log).
const REMIND_EVERY: Duration = Duration::from_secs(60);

pub struct DbHealth {
    config: Config,
    dbname: String,
    up: AtomicBool,
    state: Mutex<State>,
    back: Notify,
}

struct State {
    /// When the current outage was first seen; None while the database answers.
    down_since: Option<Instant>,
    reminded_at: Instant,
    /// False until the first successful connection (start-up says "connected", not "back").
    ever_up: bool,
}

impl DbHealth {
    pub fn new(config: Config) -> Self {
        let dbname = config.get_dbname().unwrap_or("?").to_string();
        Self {
            config,
            dbname,
            // not known to be up until a connection opened (the gauge says 0 while start-up waits)
            up: AtomicBool::new(false),
            state: Mutex::new(State {
                down_since: None,
                reminded_at: Instant::now(),
                ever_up: false,
            }),
            back: Notify::new(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// How long the database has been away (zero while it answers).
    pub fn down_for(&self) -> Duration {
        self.lock()
            .down_since
            .map_or(Duration::ZERO, |since| since.elapsed())
    }

    /// The database answered (a connection opened or a statement ran). Cheap when nothing changes.
    pub fn ok(&self) {
        if self.is_up() {
            return;
        }
        let mut state = self.lock();
        let first = !state.ever_up;
        state.ever_up = true;
        if let Some(since) = state.down_since.take() {
            let secs = since.elapsed().as_secs();
            if first {
                tracing::info!(
                    down_s = secs,
                    "connected to database {:?} after waiting {secs} s",
                    self.dbname
                );
            } else {
                tracing::info!(down_s = secs, "database is back after {secs} s");
            }
            self.back.notify_waiters();
        }
        self.up.store(true, Ordering::Release);
    }

    /// A connection attempt failed.
    pub fn failed(&self, e: &tokio_postgres::Error) {
        let mut state = self.lock();
        let now = Instant::now();
        match state.down_since {
            None => {
                state.down_since = Some(now);
                state.reminded_at = now;
                self.up.store(false, Ordering::Release);
                let kept = if state.ever_up {
                    " (results of finished jobs are kept until it is back)"
                } else {
                    ""
                };
                tracing::warn!(
                    error = %pg::describe(e),
                    "waiting for the database {:?}: cannot connect; retrying with back-off{kept}",
                    self.dbname
                );
            }
            Some(since) if now.duration_since(state.reminded_at) >= REMIND_EVERY => {
                state.reminded_at = now;
                tracing::warn!(
                    error = %pg::describe(e),
                    down_s = since.elapsed().as_secs(),
                    "still waiting for the database {:?}",
                    self.dbname
                );
            }
            Some(_) => {}
        }
    }

    /// Sleeps for a back-off delay, or less if the database comes back meanwhile.
    pub async fn pause(&self, delay: Duration) {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = self.back.notified() => {}
        }
    }

    /// Start-up: connects, retrying with back-off for as long as the failure is one that time can
    /// cure (server down or starting, network); stops at once on one it cannot (see
    /// [`pg::is_permanent`]). The caller races it against the shutdown signal.
    pub async fn wait_until_up(&self, component: &'static str) -> Result<Client> {
        let mut backoff = Backoff::default();
        loop {
            match pg::connect(&self.config, component).await {
                Ok(client) => {
                    self.ok();
                    return Ok(client);
                }
                // not reported as an outage: the process stops with this error instead
                Err(e) if pg::is_permanent(&e) => {
                    bail!(
                        "cannot use database {:?}: {} (retrying cannot fix this; check DATABASE_URL, the role and pg_hba.conf)",
                        self.dbname,
                        pg::describe(&e)
                    )
                }
                Err(e) => {
                    self.failed(&e);
                    self.pause(backoff.step()).await;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // the state stays consistent even if a holder panicked (every update is a plain store)
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn refused() -> tokio_postgres::Error {
        // a loopback port nobody listens on: refused at once
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = Config::new();
        c.host("127.0.0.1").port(port).user("x").dbname("d");
        match pg::connect(&c, "test").await {
            Ok(_) => panic!("nothing listens there"),
            Err(e) => e,
        }
    }

    #[tokio::test]
    async fn outage_and_return() {
        let mut c = Config::new();
        c.dbname("shop");
        let h = DbHealth::new(c);
        assert!(!h.is_up(), "unknown until a connection opens");
        h.ok();
        assert!(h.is_up());
        assert_eq!(h.down_for(), Duration::ZERO);
        let e = refused().await;
        assert!(pg::is_connection_error(&e), "{}", pg::describe(&e));
        assert!(!pg::is_permanent(&e));
        assert!(pg::describe(&e).starts_with("error connecting to server: "));
        h.failed(&e);
        h.failed(&e);
        assert!(!h.is_up());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(h.down_for() >= Duration::from_millis(20));

        // a pause is cut short when the database is back
        let started = Instant::now();
        let (_, ()) = tokio::join!(h.pause(Duration::from_secs(30)), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            h.ok();
        });
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(h.is_up());
        assert_eq!(h.down_for(), Duration::ZERO);
    }

    #[tokio::test]
    async fn settings_problems_are_permanent() {
        let no_host = Config::new();
        let Err(e) = pg::connect(&no_host, "test").await else {
            panic!("connected without a host")
        };
        assert!(pg::is_permanent(&e), "{}", pg::describe(&e));
        assert!(!pg::is_connection_error(&e));
        let h = DbHealth::new(no_host);
        let Err(err) = h.wait_until_up("test").await else {
            panic!("connected without a host")
        };
        let err = err.to_string();
        assert!(err.contains("retrying cannot fix this"), "{err}");
    }
}

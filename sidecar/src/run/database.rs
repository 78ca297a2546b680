//! The daemon's connections: one `deadpool-postgres` pool that every component borrows from (producer,
//! completer, maintenance, the HTTP side, metrics), so connecting, recycling a connection that died
//! and reporting an outage are written once, here. Only the notifier's LISTEN connection is its own
//! (a notification arrives on the session that listens, so it cannot be pooled).
//!
//! Each connection attempt is reported to [`DbHealth`], which tells the log and /metrics that the
//! database is away (once) and back. Callers keep their own back-off: a failed `get` is cheap to retry
//! and [`DbHealth::pause`] cuts the wait short when the database returns.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Timeouts,
};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use super::db_health::DbHealth;
use super::pg;

/// Connections the pool holds at most: one each for the producer, completer, maintenance and
/// metrics, the rest for the HTTP side's requests (each holds one for a single statement).
pub const POOL_SIZE: usize = 8;
/// How long a borrower waits for a free connection before it gets an error (an HTTP request then
/// answers 503; the components retry).
const WAIT: Duration = Duration::from_secs(15);

/// What went wrong when borrowing a connection or running a statement on it.
#[derive(Debug)]
pub enum DbError {
    /// The server's or the driver's error (connecting, or the statement).
    Pg(tokio_postgres::Error),
    /// The pool gave no connection (every one busy for [`WAIT`], or the pool is closed).
    Pool(String),
}

impl DbError {
    /// True when the database is away or busy rather than the statement wrong: retried quietly.
    pub fn is_connection_error(&self) -> bool {
        match self {
            Self::Pg(e) => pg::is_connection_error(e),
            Self::Pool(_) => true,
        }
    }

    /// The server's SQLSTATE, when the server answered.
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            Self::Pg(e) => e.code(),
            Self::Pool(_) => None,
        }
    }

    /// The error with its causes (see [`pg::describe`]).
    pub fn describe(&self) -> String {
        match self {
            Self::Pg(e) => pg::describe(e),
            Self::Pool(e) => e.clone(),
        }
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e)
    }
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl std::error::Error for DbError {}

/// The pool and the health it reports to.
pub struct Database {
    pool: Pool,
    health: Arc<DbHealth>,
}

/// Opens pooled connections with the daemon's settings ([`pg::settings`]): named `herald run: pool`
/// in pg_stat_activity, with connect and TCP time limits, TLS as DATABASE_URL says.
struct Connector;

impl deadpool_postgres::Connect for Connector {
    fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let config = config.clone();
        async move { pg::connect_driven(&config, "pool").await }.boxed()
    }
}

impl Database {
    pub fn new(health: Arc<DbHealth>) -> Self {
        let manager = Manager::from_connect(
            health.config().clone(),
            Connector,
            ManagerConfig {
                // a closed connection is noticed by the driver; a broken one fails its statement,
                // which the caller treats as a connection error, and is dropped on its next recycle
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .timeouts(Timeouts {
                wait: Some(WAIT),
                // connecting is bounded by the connection's own connect_timeout (pg::settings)
                create: None,
                recycle: Some(Duration::from_secs(5)),
            })
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .expect("a runtime is given, so building cannot fail");
        Self { pool, health }
    }

    pub fn health(&self) -> &Arc<DbHealth> {
        &self.health
    }

    /// A connection from the pool (a new one when none is idle), reporting the outcome of a
    /// connection attempt to [`DbHealth`].
    pub async fn get(&self) -> Result<Object, DbError> {
        match self.pool.get().await {
            Ok(client) => {
                self.health.ok();
                Ok(client)
            }
            Err(PoolError::Backend(e)) => {
                if pg::is_connection_error(&e) || pg::is_permanent(&e) {
                    self.health.failed(&e);
                }
                Err(DbError::Pg(e))
            }
            Err(e) => Err(DbError::Pool(format!("no database connection: {e}"))),
        }
    }

    /// Drops the idle connections, e.g. once a statement failed because the server restarted: the
    /// next `get` connects afresh instead of trying the other dead ones first.
    pub fn forget_idle(&self) {
        self.pool.retain(|_, _| false);
    }

    /// Closes the pool at shutdown: idle connections are closed, borrowers get an error.
    pub fn close(&self) {
        self.pool.close();
    }
}

#[cfg(test)]
impl Database {
    /// A pool for a database nobody listens at: every `get` fails at once (connection refused).
    /// For unit tests of what borrows from the pool.
    pub fn unreachable() -> Arc<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut config = tokio_postgres::Config::new();
        config.host("127.0.0.1").port(port).user("x").dbname("d");
        Arc::new(Self::new(Arc::new(DbHealth::new(config))))
    }
}

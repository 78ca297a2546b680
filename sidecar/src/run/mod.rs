//! `herald run`: the daemon that does herald's network I/O, shaped like River's client.
//!
//! ```text
//!  notifier ──wake──▶ producer ──job + slot──▶ executors (email / webhook) ──result──▶ completer
//!  (LISTEN)           (claim, one call         (render, send, classify)               (complete, one
//!     │                per free batch)                                                 call per batch)
//!     └────wake─────▶ maintenance (tick, reap, flush_stats, prune,      metrics (/metrics, optional)
//!                     advance_results ──wake──▶ /stream readers)       http/ (links, provider events,
//!                                                                      /admin, /stream; optional)
//! ```
//!
//! Each component has a file; they borrow connections from one pool (`database`; the notifier keeps
//! its LISTEN connection to itself), and every connection attempt tells `db_health`, which tells the
//! log and /metrics when the database is away. The daemon outlives the database: each component
//! retries with back-off, finished jobs' results wait in the completer, and nothing is claimed
//! meanwhile. Started while the database is away, it waits for it too (but stops at once on
//! what waiting cannot fix: see `pg::is_permanent`, and the extension version check in `compat`).
//!
//! Shutdown (SIGTERM/SIGINT): the producer stops claiming; jobs in flight get the grace period to
//! finish, then report a retryable failure; the completer records every result (giving up after 10 s
//! more if the database is away); the process exits 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::FutureExt;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod address_policy;
mod admin;
mod completer;
mod config;
mod database;
mod db_health;
mod email;
mod executor;
mod horizon;
mod http;
mod job;
mod links;
mod maintenance;
mod metrics;
mod notifier;
mod pg;
mod producer;
pub mod render;
mod sendgrid;
mod smtp_pool;
mod stream;
mod stream_tail;
mod tick_wakeup;
mod transport;
mod webhook;

pub use config::{Config, RunArgs};
pub use maintenance::TICK_BATCH;

/// Spawns a component. Its log lines carry its module as their target (`herald_sidecar::run::producer`), so
/// no span is needed: spans are avoided on purpose, as a span closed under another task's subscriber
/// would confuse the JSON subscriber's registry. A component that panics cancels `crashed`, which
/// stops the whole process (gracefully, then with an error).
fn spawn<F>(name: &'static str, crashed: &CancellationToken, f: F) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let crashed = crashed.clone();
    tokio::spawn(async move {
        if let Err(panic) = std::panic::AssertUnwindSafe(f).catch_unwind().await {
            tracing::error!(
                component = name,
                panic = panic_message(&*panic),
                "component crashed; stopping"
            );
            crashed.cancel();
        }
    })
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// The daemon needs only what `herald_worker` grants; a superuser's rights behind an internet-facing
/// HTTP side are a risk worth a line in the log.
async fn warn_if_superuser(client: &tokio_postgres::Client) {
    let row = client
        .query_opt(
            "SELECT r.rolsuper, current_user::text FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await;
    match row {
        Ok(Some(row)) if row.get::<_, bool>(0) => {
            let role: String = row.get(1);
            tracing::warn!(
                role = %role,
                "connected as a superuser: herald run needs only the rights of herald_worker; connect as a role in it (CREATE ROLE herald_daemon LOGIN IN ROLE herald_worker)"
            );
        }
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(error = %pg::describe(&e), "could not read the role's attributes")
        }
    }
}

/// One render worker per core (rendering is CPU work; each worker takes one request at a time).
fn render_workers() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// How long shutdown waits for the completer once the executors are done (or interrupted).
const RECORD_GRACE: Duration = Duration::from_secs(10);
/// How long shutdown waits for a background component (one may be inside a connect timeout).
const BACKGROUND_GRACE: Duration = Duration::from_secs(5);

/// Runs until `shutdown` resolves, then stops gracefully. Errors only at start-up (metrics address
/// taken, bad transport settings, and what waiting for the database cannot fix: refused credentials,
/// no such database, the extension missing or too old).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let dbname = config.database.get_dbname().unwrap_or("?").to_string();
    tracing::info!(worker = %config.worker_id, "herald run starting: {}", config.summary());
    let health = Arc::new(db_health::DbHealth::new(config.database.clone()));
    let database = Arc::new(database::Database::new(Arc::clone(&health)));
    let slots = Arc::new(Semaphore::new(config.concurrency));
    let metrics = Arc::new(metrics::Metrics::new(
        config.concurrency,
        Arc::clone(&slots),
        Arc::clone(&health),
    ));
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("HERALD_METRICS_ADDR: cannot listen on {addr}"))?,
        ),
        None => None,
    };
    let background = CancellationToken::new();
    let crashed = CancellationToken::new();
    // served from the start, so a daemon waiting for the database can be watched
    let metrics_server = metrics_listener.map(|l| {
        tracing::info!(addr = %config.metrics_addr.expect("bound above"), "serving /metrics");
        spawn(
            "metrics",
            &crashed,
            http::serve(
                l,
                metrics::router(Arc::clone(&metrics), Arc::clone(&database)),
                background.clone(),
                config::CONNECTIONS_PER_ADDRESS,
            ),
        )
    });

    let mut shutdown = std::pin::pin!(shutdown);
    let ready = tokio::select! {
        () = &mut shutdown => None,
        r = async {
            let probe = health.wait_until_up("startup").await?;
            crate::db::check_extension(&probe, &dbname).await?;
            warn_if_superuser(&probe).await;
            transport::check_at_start(&probe, &config).await
        } => Some(r),
    };
    match ready {
        Some(Ok(())) => {}
        not_ready => {
            background.cancel();
            if let Some(m) = metrics_server {
                let _ = m.await;
            }
            return not_ready.unwrap_or_else(|| {
                tracing::info!("stopped before the database was reachable");
                Ok(())
            });
        }
    }

    if config.keys.default.webhook.current.is_none() {
        tracing::warn!(
            "HERALD_WEBHOOK_SECRET is not set: webhooks of workspaces without a key of their own are sent without X-Herald-Signature"
        );
    }
    if config.unsubscribe_url.is_some()
        && config.http.is_none()
        && config.keys.default.link.current.is_none()
    {
        tracing::warn!("HERALD_UNSUBSCRIBE_URL: its tokens are keyed with HERALD_WEBHOOK_SECRET because no HERALD_LINK_SECRET is set; this is deprecated (one key for two purposes): set HERALD_LINK_SECRET and check the tokens with it");
    }

    let http_listener = match &config.http {
        Some(side) => Some(
            tokio::net::TcpListener::bind(side.addr)
                .await
                .with_context(|| format!("HERALD_HTTP_ADDR: cannot listen on {}", side.addr))?,
        ),
        None => None,
    };

    let stop_claiming = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let give_up = CancellationToken::new();
    let outbox_wake = Arc::new(Notify::new());
    let tick_wake = Arc::new(Notify::new());
    let (results_tx, results_rx) = mpsc::channel(config.concurrency * 2 + completer::BATCH);

    let executor = Arc::new(executor::Executor {
        mailer: email::Mailer::new(&config)?,
        webhooks: webhook::Webhooks::new(&config)?,
        renderer: render::Renderer::isolated(render_workers()),
        metrics: Arc::clone(&metrics),
        results: results_tx,
        // a job still running near the end of its lease is given up (another worker may take it then)
        deadline: config.lease.mul_f64(0.9),
        hard_stop: hard_stop.clone(),
    });

    let completer = spawn(
        "completer",
        &crashed,
        completer::Completer {
            db: Arc::clone(&database),
            results: results_rx,
            give_up: give_up.clone(),
            metrics: Arc::clone(&metrics),
        }
        .run(),
    );
    let notifier = spawn(
        "notifier",
        &crashed,
        notifier::Notifier {
            db: Arc::clone(&health),
            outbox: Arc::clone(&outbox_wake),
            tick: Arc::clone(&tick_wake),
            shutdown: background.clone(),
        }
        .run(),
    );
    // maintenance bumps it when it publishes results; /stream readers wait on it
    let published = stream::Published::default();
    let maintenance = spawn(
        "maintenance",
        &crashed,
        maintenance::Maintenance {
            db: Arc::clone(&database),
            metrics: Arc::clone(&metrics),
            tick_wake: Arc::clone(&tick_wake),
            poll: config.poll_interval,
            long_transaction_warn: config.long_transaction_warn,
            shutdown: background.clone(),
            published: published.clone(),
        }
        .run(),
    );
    let http_server = http_listener.map(|l| {
        let side = config.http.clone().expect("bound above");
        let per_address = side.connections_per_address;
        let key_rates = http::KeyRates::new(side.api_rate_per_key).map(Arc::new);
        tracing::info!(addr = %side.addr, public_url = %side.public_url, "serving unsubscribe, tracking and provider events");
        spawn(
            "http",
            &crashed,
            http::serve(
                l,
                // the admin page (run/admin/), when HERALD_ADMIN_PASSWORD is set
                admin::mount(
                    http::router(side, Arc::clone(&database), key_rates.clone()),
                    &config,
                    &database,
                )
                    // the results stream, when a stream token is set (answers 404 otherwise)
                    .merge(stream::router(
                        Arc::clone(&database),
                        Arc::clone(&config.keys),
                        published.clone(),
                        background.clone(),
                        key_rates,
                    )),
                background.clone(),
                per_address,
            ),
        )
    });
    let tasks = TaskTracker::new();
    let producer = spawn(
        "producer",
        &crashed,
        producer::Producer {
            db: Arc::clone(&database),
            worker: config.worker_id.clone(),
            lease: config.lease,
            poll: config.poll_interval,
            slots: Arc::clone(&slots),
            slots_total: config.concurrency,
            wake: Arc::clone(&outbox_wake),
            executor,
            tasks: tasks.clone(),
            metrics: Arc::clone(&metrics),
            shutdown: stop_claiming.clone(),
        }
        .run(),
    );
    tracing::info!(worker = %config.worker_id, concurrency = config.concurrency, "running");

    tokio::select! {
        () = shutdown => {}
        () = crashed.cancelled() => {}
    }
    stop_claiming.cancel();
    let _ = producer.await; // drops the producer's handle on the executor once it returns
    tasks.close();
    let in_flight = config.concurrency - slots.available_permits();
    if in_flight > 0 {
        tracing::info!(
            in_flight,
            grace_s = config.shutdown_grace.as_secs(),
            "waiting for jobs in flight"
        );
    }
    if tokio::time::timeout(config.shutdown_grace, tasks.wait())
        .await
        .is_err()
    {
        let left = config.concurrency - slots.available_permits();
        tracing::warn!(
            left,
            "grace period over: interrupting the jobs still running (they are retried)"
        );
        hard_stop.cancel();
    }
    // Executors that finished may still be waiting to hand their result to a completer that cannot
    // record (the database is away), so both are waited for together: once every executor is gone,
    // the completer's channel closes when drained. After RECORD_GRACE the completer gives up, which
    // also drains the channel and so releases the executors.
    let mut completer = completer;
    let recorded = tokio::time::timeout(RECORD_GRACE, async {
        tasks.wait().await;
        let _ = (&mut completer).await;
    })
    .await;
    if recorded.is_err() {
        give_up.cancel();
        tasks.wait().await;
        let _ = completer.await;
    }
    background.cancel();
    for handle in [
        Some(notifier),
        Some(maintenance),
        metrics_server,
        http_server,
    ]
    .into_iter()
    .flatten()
    {
        let mut handle = handle;
        if tokio::time::timeout(BACKGROUND_GRACE, &mut handle)
            .await
            .is_err()
        {
            handle.abort();
        }
    }
    database.close();
    if crashed.is_cancelled() {
        bail!("a component crashed (see the log); stopped after recording what could be recorded");
    }
    tracing::info!("stopped");
    Ok(())
}

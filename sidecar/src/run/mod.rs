//! `herald run`: the daemon that does herald's network I/O, shaped like River's client.
//!
//! ```text
//!  notifier ──wake──▶ producer ──job + slot──▶ executors (email / webhook) ──result──▶ completer
//!  (LISTEN)           (claim, one call         (render, send, classify)               (complete, one
//!     │                per free batch)                                                 call per batch)
//!     └────wake─────▶ maintenance (tick, reap, flush_stats, prune)     metrics (/metrics, optional)
//! ```
//!
//! Each component has a file and a database connection of its own. Shutdown (SIGTERM/SIGINT): the
//! producer stops claiming; jobs in flight get the grace period to finish, then report a retryable
//! failure; the completer records every result; the process exits 0.

use std::future::Future;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use futures_util::FutureExt;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::instrument::{WithDispatch, WithSubscriber};

mod completer;
mod config;
mod email;
mod executor;
mod http;
mod links;
mod maintenance;
mod metrics;
mod notifier;
mod pg;
mod producer;
mod render;
mod smtp_pool;
mod webhook;

pub use config::{Config, LogFormat, RunArgs};

/// The subcommand: settings, logging, signals, then [`run`].
pub async fn main(args: RunArgs) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // handlers first, so a signal during start-up is a clean stop rather than the default kill
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let shutdown = async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
    };

    // `--database-url` is a global flag of the binary (also read from DATABASE_URL by clap); read it
    // back from the same command line rather than widening the other subcommands' interface.
    let database_url = <crate::Cli as clap::Parser>::try_parse()
        .ok()
        .and_then(|cli| cli.database_url);
    let config = Config::load(args, database_url)?;
    match config.log_format {
        LogFormat::Text => run(config, shutdown).await,
        LogFormat::Json => {
            let json = tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info,tokio_postgres=warn".into()),
                )
                .with_writer(std::io::stderr)
                .finish();
            run(config, shutdown).with_subscriber(json).await
        }
    }
}

/// Wraps a future so that tasks spawned with it log through the subscriber of the spawning task (the
/// JSON one when HERALD_LOG_FORMAT=json) rather than the process-wide one.
pub(crate) fn in_current_dispatch<F: Future>(f: F) -> WithDispatch<F> {
    f.with_current_subscriber()
}

/// Spawns a component. Its log lines carry its module as their target (`herald::run::producer`), so
/// no span is needed: spans are avoided on purpose, as a span closed under another task's subscriber
/// would confuse the JSON subscriber's registry. A component that panics cancels `crashed`, which
/// stops the whole process (gracefully, then with an error).
fn spawn<F>(name: &'static str, crashed: &CancellationToken, f: F) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let crashed = crashed.clone();
    tokio::spawn(in_current_dispatch(async move {
        if let Err(panic) = std::panic::AssertUnwindSafe(f).catch_unwind().await {
            tracing::error!(
                component = name,
                panic = panic_message(&*panic),
                "component crashed; stopping"
            );
            crashed.cancel();
        }
    }))
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// Runs until `shutdown` resolves, then stops gracefully. Errors only at start-up (database unreachable,
/// extension missing, metrics address taken, bad transport settings).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let dbname = config.database.get_dbname().unwrap_or("?").to_string();
    tracing::info!(worker = %config.worker_id, "herald run starting: {}", config.summary());

    let probe = pg::connect(&config.database, "startup")
        .await
        .with_context(|| format!("connecting to database {dbname:?}"))?;
    let installed = probe
        .query_opt(
            "SELECT extversion FROM pg_extension WHERE extname = 'herald'",
            &[],
        )
        .await
        .context("checking for the herald extension")?;
    if installed.is_none() {
        bail!("the herald extension is not installed in database {dbname:?}: run CREATE EXTENSION herald");
    }
    drop(probe);
    if config.smtp.is_empty() && config.maildir.is_none() {
        tracing::warn!("no email transport: set HERALD_SMTP_URL_DEFAULT (or HERALD_MAILDIR); email jobs will be retried until one is configured");
    }
    if config.webhook_secret.is_none() {
        tracing::warn!(
            "HERALD_WEBHOOK_SECRET is not set: webhooks are sent without X-Herald-Signature"
        );
    }

    let slots = Arc::new(Semaphore::new(config.concurrency));
    let metrics = Arc::new(metrics::Metrics::new(
        config.concurrency,
        Arc::clone(&slots),
    ));
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("HERALD_METRICS_ADDR: cannot listen on {addr}"))?,
        ),
        None => None,
    };

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
    let background = CancellationToken::new();
    let crashed = CancellationToken::new();
    let outbox_wake = Arc::new(Notify::new());
    let tick_wake = Arc::new(Notify::new());
    let (results_tx, results_rx) = mpsc::channel(config.concurrency * 2 + completer::BATCH);

    let executor = Arc::new(executor::Executor {
        mailer: email::Mailer::new(&config)?,
        webhooks: webhook::Webhooks::new(&config)?,
        renderer: render::Renderer::new(),
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
            db: config.database.clone(),
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
            db: config.database.clone(),
            outbox: Arc::clone(&outbox_wake),
            tick: Arc::clone(&tick_wake),
            shutdown: background.clone(),
        }
        .run(),
    );
    let maintenance = spawn(
        "maintenance",
        &crashed,
        maintenance::Maintenance {
            db: config.database.clone(),
            tick_wake: Arc::clone(&tick_wake),
            poll: config.poll_interval,
            shutdown: background.clone(),
        }
        .run(),
    );
    let metrics_server = metrics_listener.map(|l| {
        tracing::info!(addr = %config.metrics_addr.expect("bound above"), "serving /metrics");
        spawn(
            "metrics",
            &crashed,
            metrics::serve(
                l,
                Arc::clone(&metrics),
                config.database.clone(),
                background.clone(),
            ),
        )
    });
    let http_server = http_listener.map(|l| {
        let side = config.http.clone().expect("bound above");
        tracing::info!(addr = %side.addr, public_url = %side.public_url, "serving unsubscribe, tracking and provider events");
        spawn(
            "http",
            &crashed,
            http::serve(l, side, config.database.clone(), background.clone()),
        )
    });
    let tasks = TaskTracker::new();
    let producer = spawn(
        "producer",
        &crashed,
        producer::Producer {
            db: config.database.clone(),
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
        tasks.wait().await;
    }
    // every executor is gone, so the completer's channel closes once drained
    let mut completer = completer;
    if tokio::time::timeout(std::time::Duration::from_secs(10), &mut completer)
        .await
        .is_err()
    {
        give_up.cancel();
        let _ = completer.await;
    }
    background.cancel();
    let _ = notifier.await;
    let _ = maintenance.await;
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    if let Some(h) = http_server {
        let _ = h.await;
    }
    if crashed.is_cancelled() {
        bail!("a component crashed (see the log); stopped after recording what could be recorded");
    }
    tracing::info!("stopped");
    Ok(())
}

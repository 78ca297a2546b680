//! `herald`: the command-line side of herald. This file only parses arguments, sets up logging and
//! signals, and hands over to the library (`herald_sidecar`), where each subcommand has its module.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use herald_sidecar::{db, demo, import, listing, logging, run, status};

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "herald: marketing automation inside Postgres"
)]
struct Cli {
    /// Where herald lives. Defaults to the local socket, database `herald`, as the current OS user.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-workspace counts (contacts, events, live automations, enrollments by status), the queue
    /// (jobs by state, oldest pending age, dead letters, rate limits) and broadcasts (by status, and
    /// the progress of those in flight).
    Status,
    /// Imports contacts from a CSV file (email, optional timezone, attribute columns), streamed via COPY
    /// in chunks through herald.upsert_contacts; prints inserted/updated/rejected with reasons.
    Import(import::ImportArgs),
    /// Lists automations: id, workspace, name, status, trigger, enrollments by status.
    Automations(listing::ListArgs),
    /// Lists broadcasts: id, workspace, name, status, phase, enqueued/sent/failed, progress (archived
    /// ones with --all).
    Broadcasts(listing::BroadcastArgs),
    /// Runs the end-to-end demo in a fresh database `herald_demo`.
    Demo,
    /// The daemon: sends the queued email, calls webhooks, runs the step engine and queue upkeep.
    Run(Box<run::RunArgs>),
}

fn main() -> Result<()> {
    if run::render::is_worker() {
        // a render worker of another `herald run` (see run/render.rs): no settings, no database,
        // no runtime; it logs through its parent's stderr as text
        logging::init(logging::LogFormat::Text);
        return run::render::worker_main();
    }
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Run(args) => {
            // settings first: the log format is one of them
            let config = run::Config::load(*args, cli.database_url)?;
            logging::init(config.log_format);
            // tokio's signal handlers register with the runtime's reactor
            let stop = {
                let _entered = runtime.enter();
                stop_signal()?
            };
            runtime.block_on(run::run(config, stop))
        }
        command => {
            logging::init(logging::LogFormat::Text);
            let target = db::Target::new(cli.database_url);
            runtime.block_on(async {
                match command {
                    Command::Status => status::run(&target).await,
                    Command::Demo => demo::run(&target).await,
                    Command::Import(args) => import::run(&target, args).await,
                    Command::Automations(args) => listing::run_automations(&target, args).await,
                    Command::Broadcasts(args) => listing::run_broadcasts(&target, args).await,
                    Command::Run(_) => unreachable!("handled above"),
                }
            })
        }
    }
}

/// Resolves at the first SIGTERM or SIGINT. The handlers are installed now, so a signal during
/// start-up is a clean stop rather than the default kill.
fn stop_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
    })
}

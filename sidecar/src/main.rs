//! `herald`: the command-line side of herald. This file only parses arguments and wires logging;
//! each subcommand lives in its own module.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod compat;
mod db;
mod demo;
mod import;
mod listing;
mod run;
mod status;

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
    /// Lists broadcasts: id, workspace, name, status, phase, enqueued/sent/failed, progress.
    Broadcasts(listing::ListArgs),
    /// Runs the end-to-end demo in a fresh database `herald_demo`.
    Demo,
    /// Prints throughput figures and writes them as JSON (see the README's performance section).
    Bench(bench::BenchArgs),
    /// The daemon: sends the queued email, calls webhooks, runs the step engine and queue upkeep.
    Run(Box<run::RunArgs>),
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tokio_postgres=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let target = db::Target::new(cli.database_url);
    match cli.command {
        Command::Status => status::run(&target).await,
        Command::Demo => demo::run(&target).await,
        Command::Import(args) => import::run(&target, args).await,
        Command::Automations(args) => listing::run_automations(&target, args).await,
        Command::Broadcasts(args) => listing::run_broadcasts(&target, args).await,
        Command::Bench(args) => bench::run(&target, args).await,
        Command::Run(args) => run::main(*args).await,
    }
}

//! Maintenance: the step engine and the queue's housekeeping, on timers.
//!   herald.tick(TICK_BATCH) on a herald.tick notification and every poll interval (each taking the
//!                          pending wake-up first, tick_wakeup.rs), again at once
//!                          while a call returns a full batch, and once more when every transaction
//!                          older than the take has ended
//!   herald.reap()          every 5 s: expired leases back to pending
//!   herald.flush_stats()   every 2 s
//!   herald.prune('30 days') hourly (and at start); events and message_history by the database's
//!                          retention settings, if any (herald.prune_events_older_than, …)
//!   herald.advance_results(RESULTS_BATCH) every 250 ms and after every tick round: publishes the results
//!                          stream (numbers staged results, queues subscriptions' deliveries); wakes
//!                          the /stream readers when it moved any. Our ticks leave publishing to it
//!                          (herald.tick_publishes_results = off on every connection, `pg`), and it
//!                          runs beside the other tasks, not between two tick rounds: a long publish
//!                          never holds the step engine up
//!   herald.advance_broadcasts(BROADCAST_BUDGET) after every tick round: starts due broadcasts and enqueues their
//!                          audience in chunks, again at once while it uses its whole budget
//!   herald.oldest_snapshot() every half HERALD_LONG_TRANSACTION_WARN_SECONDS (1-30 s): the
//!                          long-transaction watch (horizon.rs)
//! A function missing from the installed extension (an older build) is reported once and skipped.
//! Any number of `herald run` processes may do this at once: each function is safe concurrently.
//! Each call borrows a connection from the pool (`database`). While the database is away the timers
//! keep firing but a new attempt waits for a back-off step (or for another component to find it back); reap also waits while this process's completer is behind,
//! so that after a long outage our own finished jobs are recorded before their expired leases are
//! reaped (which would send them again).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::database::{Database, DbError};
use super::horizon;
use super::metrics::Metrics;
use super::pg::{self, Backoff};
use super::stream::Published;
use super::tick_wakeup::TickWakeup;

/// tick's batch (enrollments per call); a call that returns a full batch is repeated at once.
pub const TICK_BATCH: i32 = 10_000;
/// advance_results' batch (staged results numbered per call); a full batch is repeated at once. Its
/// largest: each call reads the whole staging heap (no index there, by design), so a backlog (a journey
/// at full speed stages tens of thousands of results a second) drains in as few calls as possible.
pub const RESULTS_BATCH: i32 = 100_000;
/// How often results are published when nothing else runs maintenance: the stream's latency.
const RESULTS_EVERY: Duration = Duration::from_millis(250);
/// advance_broadcasts' budget per call (contacts read); a call that uses it all is repeated at once.
pub const BROADCAST_BUDGET: i32 = 100_000;

pub struct Maintenance {
    pub db: Arc<Database>,
    pub metrics: Arc<Metrics>,
    pub tick_wake: Arc<Notify>,
    pub poll: Duration,
    /// The long-transaction watch's threshold (HERALD_LONG_TRANSACTION_WARN_SECONDS).
    pub long_transaction_warn: Duration,
    pub shutdown: CancellationToken,
    /// Bumped when advance_results published results (wakes the /stream readers).
    pub published: Published,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Task {
    Tick,
    Broadcasts,
    Results,
    Reap,
    FlushStats,
    Prune,
}

impl Task {
    /// The statement, and its one argument where it takes one.
    fn sql(self) -> (&'static str, Option<i32>) {
        match self {
            Task::Tick => ("SELECT herald.tick($1::int)::bigint", Some(TICK_BATCH)),
            Task::Reap => ("SELECT herald.reap()::bigint", None),
            Task::FlushStats => ("SELECT herald.flush_stats()::bigint", None),
            Task::Prune => ("SELECT herald.prune('30 days')::bigint", None),
            Task::Broadcasts => (
                "SELECT herald.advance_broadcasts($1::int)::bigint",
                Some(BROADCAST_BUDGET),
            ),
            Task::Results => (
                "SELECT herald.advance_results($1::int)::bigint",
                Some(RESULTS_BATCH),
            ),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Task::Tick => "herald.tick",
            Task::Reap => "herald.reap",
            Task::FlushStats => "herald.flush_stats",
            Task::Prune => "herald.prune",
            Task::Broadcasts => "herald.advance_broadcasts",
            Task::Results => "herald.advance_results",
        }
    }
}

struct State {
    missing: HashSet<Task>,
    failing: HashSet<Task>,
    backoff: Backoff,
    /// No attempt before this (after one failed for want of a connection), unless the database is
    /// known back.
    retry_at: Option<Instant>,
}

fn every(d: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval(d);
    i.set_missed_tick_behavior(MissedTickBehavior::Delay);
    i
}

impl State {
    fn new() -> Self {
        Self {
            missing: HashSet::new(),
            failing: HashSet::new(),
            backoff: Backoff::default(),
            retry_at: None,
        }
    }
}

impl Maintenance {
    /// The step engine and housekeeping in one loop, publishing the results stream in another beside
    /// it (each on a connection of its own from the pool).
    pub async fn run(self) {
        let publish_now = Notify::new();
        tokio::join!(self.engine(&publish_now), self.publishing(&publish_now));
    }

    /// Publishes the results stream every RESULTS_EVERY, and when a tick round asks.
    async fn publishing(&self, publish_now: &Notify) {
        let mut results = every(RESULTS_EVERY);
        let mut state = State::new();
        loop {
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                () = publish_now.notified() => {}
                _ = results.tick() => {}
            }
            self.publish_results(&mut state).await;
        }
    }

    async fn engine(&self, publish_now: &Notify) {
        let mut tick = every(self.poll);
        let mut reap = every(Duration::from_secs(5));
        let mut stats = every(Duration::from_secs(2));
        let mut prune = every(Duration::from_secs(3600));
        let mut horizon_watch = horizon::Watch::new(self.long_transaction_warn);
        let mut horizon_check = every(horizon_watch.check_every());
        let mut watching = true; // until the extension turns out to have no herald.oldest_snapshot
        let mut state = State::new();
        let mut wakeup = TickWakeup::new(self.poll);
        loop {
            let mut follow_up = false;
            let task = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                _ = horizon_check.tick(), if watching => {
                    watching = horizon::check(&self.db, &self.metrics, &mut horizon_watch).await;
                    continue;
                }
                () = self.tick_wake.notified() => Task::Tick,
                _ = tick.tick() => Task::Tick,
                () = wakeup.settled(&self.db) => {
                    follow_up = true;
                    Task::Tick
                }
                _ = reap.tick() => Task::Reap,
                _ = stats.tick() => Task::FlushStats,
                _ = prune.tick() => Task::Prune,
            };
            if task == Task::Tick {
                if !follow_up {
                    // enrolling transactions skip their NOTIFY while a wake-up is pending (tick_wakeup.rs)
                    wakeup.take(&self.db).await;
                }
                // a full batch means more are due now
                let mut stepped = 0;
                while let Some(n) = self.call(&mut state, task).await {
                    stepped += n;
                    if n < i64::from(TICK_BATCH) || self.shutdown.is_cancelled() {
                        break;
                    }
                }
                if stepped > 0 {
                    // another process's publish round may take this round's results first: wake
                    // the readers anyway
                    self.published.bump();
                }
                while self.call(&mut state, Task::Broadcasts).await
                    == Some(i64::from(BROADCAST_BUDGET))
                {
                    if self.shutdown.is_cancelled() {
                        break;
                    }
                }
                publish_now.notify_one();
            } else {
                self.call(&mut state, task).await;
            }
        }
    }

    /// Publishes staged results until none are left, and wakes the stream readers if any were.
    async fn publish_results(&self, state: &mut State) {
        let mut moved = 0;
        while let Some(n) = self.call(state, Task::Results).await {
            moved += n;
            if n < i64::from(RESULTS_BATCH) || self.shutdown.is_cancelled() {
                break;
            }
        }
        if moved > 0 {
            self.published.bump();
        }
    }

    async fn call(&self, state: &mut State, task: Task) -> Option<i64> {
        if state.missing.contains(&task) {
            return None;
        }
        if task == Task::Reap && self.metrics.is_recording_stalled() {
            tracing::debug!("reap waits: this process has results it could not record yet");
            return None;
        }
        if state
            .retry_at
            .is_some_and(|at| Instant::now() < at && !self.db.health().is_up())
        {
            return None;
        }
        let client = match self.db.get().await {
            Ok(c) => {
                state.backoff.reset();
                state.retry_at = None;
                c
            }
            Err(e) => {
                tracing::debug!(error = %e.describe(), "no database connection");
                state.retry_at = Some(Instant::now() + state.backoff.step());
                return None;
            }
        };
        let result = async {
            let (sql, arg) = task.sql();
            let row = match arg {
                Some(n) => client.query_one(sql, &[&n]).await?,
                None => client.query_one(sql, &[]).await?,
            };
            Ok::<_, DbError>(row.try_get::<_, i64>(0)?)
        }
        .await;
        match result {
            Ok(n) => {
                if state.failing.remove(&task) {
                    tracing::info!(task = task.name(), "works again");
                }
                if n > 0 && !matches!(task, Task::FlushStats | Task::Results) {
                    tracing::debug!(task = task.name(), n, "done");
                }
                Some(n)
            }
            Err(DbError::Pg(e)) if pg::is_undefined_function(&e) => {
                tracing::warn!(task = task.name(), "not installed in this database (older herald build); skipping it until restart");
                state.missing.insert(task);
                None
            }
            Err(e) if e.is_connection_error() => {
                // the connection is gone (the pool drops it); the next call gets another, and
                // DbHealth tells the log when the database is away
                tracing::debug!(task = task.name(), error = %e.describe(), "failed");
                None
            }
            Err(e) => {
                // one line per task and outage, not one per timer
                if state.failing.insert(task) {
                    tracing::warn!(task = task.name(), error = %e.describe(), "failed; will retry on its next timer");
                }
                None
            }
        }
    }
}

//! Producer: claims as many jobs as there are free executor slots, in ONE `herald.claim` call, and
//! starts an executor task for each. A full batch means there is more: it claims again as soon as a
//! slot frees up; otherwise it sleeps until a notification or the fallback poll. Stops claiming on
//! shutdown; the jobs it already started finish on their own. While the database is away it retries
//! with back-off (quietly: `DbHealth` tells the log) and resumes as soon as it is back. Each claim
//! borrows a connection from the pool (`database`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::database::{Database, DbError};
use super::executor::Executor;
use super::job::{check_payload, Claimed, Job};
use super::metrics::Metrics;
use super::pg::{self, Backoff};

pub struct Producer {
    pub db: Arc<Database>,
    pub worker: String,
    pub lease: Duration,
    pub poll: Duration,
    pub slots: Arc<Semaphore>,
    pub slots_total: usize,
    pub wake: Arc<Notify>,
    pub executor: Arc<Executor>,
    pub tasks: TaskTracker,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
}

const CLAIM: &str = "SELECT id, workspace, kind, provider, dedupe_key, attempt, payload \
                     FROM herald.claim($1::text, $2::int, make_interval(secs => $3::float8))";
/// How long at most to let slots accumulate behind a backlog (until a quarter of them is free).
const BATCH_WAIT: Duration = Duration::from_millis(10);

impl Producer {
    pub async fn run(self) {
        let mut backoff = Backoff::default();
        let mut backlog = false;
        loop {
            // wait for at least one free slot, then take every free one
            let mut permits = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                p = Arc::clone(&self.slots).acquire_owned() => p.expect("the slot semaphore is never closed"),
            };
            // behind a backlog, let a few more slots free up so claims come in batches rather than
            // one call per finished job: the claim starts the moment a batch's worth is free (fast
            // jobs free them within a millisecond or two), or after BATCH_WAIT with what there is
            // (slow jobs). A fixed sleep here left the claimer idle for most of each cycle when jobs
            // are fast: webhooks to a local receiver ran at 0.64x the bare claim+complete rate.
            let short = self
                .batch_min()
                .saturating_sub(self.slots.available_permits() + 1);
            if backlog && short > 0 {
                let more = Arc::clone(&self.slots).acquire_many_owned(short as u32);
                tokio::select! {
                    () = self.shutdown.cancelled() => break,
                    more = more => permits.merge(more.expect("the slot semaphore is never closed")),
                    () = tokio::time::sleep(BATCH_WAIT) => {}
                }
            }
            let free = self.slots.available_permits();
            if free > 0 {
                if let Ok(more) = Arc::clone(&self.slots).try_acquire_many_owned(free as u32) {
                    permits.merge(more);
                }
            }
            let want = permits.num_permits();

            let claim_started = std::time::Instant::now();
            let jobs = match self.claim(want).await {
                Ok(jobs) => {
                    backoff.reset();
                    jobs
                }
                Err(e) => {
                    drop(permits);
                    backlog = false;
                    let delay = backoff.step();
                    let (error, retry_in_ms) = (e.describe(), delay.as_millis() as u64);
                    if e.is_connection_error() {
                        tracing::debug!(%error, retry_in_ms, "claim failed");
                    } else {
                        tracing::warn!(%error, retry_in_ms, "claim failed");
                    }
                    tokio::select! {
                        () = self.shutdown.cancelled() => break,
                        () = self.db.health().pause(delay) => continue,
                    }
                }
            };

            let got = jobs.len();
            if got > 0 {
                let ms = claim_started.elapsed().as_secs_f64() * 1000.0;
                tracing::debug!(claimed = got, asked = want, ms, "claimed");
                self.metrics.claimed(got);
            }
            for job in jobs {
                let permit = permits.split(1).expect("one permit per claimed job");
                let executor = Arc::clone(&self.executor);
                match job {
                    Claimed::Job(job) => {
                        self.tasks.spawn(executor.run(job, permit));
                    }
                    // a row this process cannot read fails alone, permanently: the others run
                    Claimed::Undecodable { id, error } => {
                        let reject = executor.reject(id, error, permit);
                        self.tasks.spawn(reject);
                    }
                    Claimed::Unreadable(error) => {
                        // not even its id: nothing to report it under; its lease expires, and reap
                        // gives it back (and in the end makes it dead) without holding up the others
                        tracing::error!(%error, "a claimed row cannot be read at all; it is left to its lease");
                        drop(permit);
                    }
                }
            }
            drop(permits);
            backlog = got == want;
            if backlog {
                continue; // a full batch: there may be more right away
            }
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.poll) => {}
            }
        }
        tracing::info!("stopped claiming");
    }

    /// The smallest claim worth making behind a backlog.
    fn batch_min(&self) -> usize {
        (self.slots_total / 4).max(1)
    }

    async fn claim(&self, want: usize) -> Result<Vec<Claimed>, DbError> {
        let client = self.db.get().await?;
        // prepared once per connection: one round trip per claim instead of two (parse, then run),
        // each a wake-up of the daemon and of the server, which on a busy machine cost more than
        // the claim's own server time
        let statement = client.prepare_cached(CLAIM).await?;
        let rows = client
            .query(
                &statement,
                &[&self.worker, &(want as i32), &self.lease.as_secs_f64()],
            )
            .await?;
        // each row on its own terms: the claim has committed, so a row that cannot be decoded must not
        // take the rest of the batch (other workspaces' jobs included) down with it
        Ok(rows.iter().map(decode).collect())
    }
}

/// One row of `herald.claim`, decoded on its own: the id first (it is what a failure is reported
/// under), then the other columns, then the payload's shape (`job::check_payload`).
fn decode(r: &tokio_postgres::Row) -> Claimed {
    let id: i64 = match r.try_get(0) {
        Ok(id) => id,
        Err(e) => return Claimed::Unreadable(pg::describe(&e)),
    };
    let column = |name: &str, e: tokio_postgres::Error| {
        format!(
            "herald run cannot decode the job's {name}: {}",
            pg::describe(&e)
        )
    };
    let job = (|| -> Result<Job, String> {
        let job = Job {
            id,
            workspace: r.try_get(1).map_err(|e| column("workspace", e))?,
            kind: r.try_get(2).map_err(|e| column("kind", e))?,
            provider: r.try_get(3).map_err(|e| column("provider", e))?,
            dedupe_key: r.try_get(4).map_err(|e| column("dedupe_key", e))?,
            attempt: r.try_get(5).map_err(|e| column("attempt", e))?,
            payload: r.try_get(6).map_err(|e| column("payload", e))?,
        };
        check_payload(&job)
            .map_err(|e| format!("herald run cannot decode the job's payload: {e}"))?;
        Ok(job)
    })();
    match job {
        Ok(job) => Claimed::Job(job),
        Err(error) => Claimed::Undecodable { id, error },
    }
}

//! Producer: claims as many jobs as there are free executor slots, in ONE `herald.claim` call, and
//! starts an executor task for each. A full batch means there is more: it claims again as soon as a
//! slot frees up; otherwise it sleeps until a notification or the fallback poll. Stops claiming on
//! shutdown; the jobs it already started finish on their own. While the database is away it retries
//! with back-off (quietly: `DbHealth` tells the log) and resumes as soon as it is back.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::db_health::DbHealth;
use super::executor::{Executor, Job};
use super::metrics::Metrics;
use super::pg::{self, Backoff};

pub struct Producer {
    pub db: Arc<DbHealth>,
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
/// How long to let slots accumulate behind a backlog.
const BATCH_WAIT: Duration = Duration::from_millis(10);

impl Producer {
    pub async fn run(self) {
        let mut client: Option<Client> = None;
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
            // one call per finished job
            if backlog && self.slots.available_permits() + 1 < self.batch_min() {
                tokio::select! {
                    () = self.shutdown.cancelled() => break,
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

            let claimed = match &client {
                Some(c) => self.claim(c, want).await,
                None => match self.db.connect("producer").await {
                    Ok(c) => {
                        let r = self.claim(&c, want).await;
                        client = Some(c);
                        r
                    }
                    Err(e) => Err(e),
                },
            };
            let jobs = match claimed {
                Ok(jobs) => {
                    backoff.reset();
                    self.db.ok();
                    jobs
                }
                Err(e) => {
                    drop(permits);
                    backlog = false;
                    if client.as_ref().is_none_or(Client::is_closed) {
                        client = None;
                    }
                    let delay = backoff.step();
                    let (error, retry_in_ms) = (pg::describe(&e), delay.as_millis() as u64);
                    if pg::is_connection_error(&e) {
                        tracing::debug!(%error, retry_in_ms, "claim failed");
                    } else {
                        tracing::warn!(%error, retry_in_ms, "claim failed");
                    }
                    tokio::select! {
                        () = self.shutdown.cancelled() => break,
                        () = self.db.pause(delay) => continue,
                    }
                }
            };

            let got = jobs.len();
            if got > 0 {
                tracing::debug!(claimed = got, asked = want, "claimed");
                self.metrics.claimed(got);
            }
            for job in jobs {
                let permit = permits.split(1).expect("one permit per claimed job");
                self.tasks.spawn(super::in_current_dispatch(
                    Arc::clone(&self.executor).run(job, permit),
                ));
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

    async fn claim(&self, client: &Client, want: usize) -> Result<Vec<Job>, tokio_postgres::Error> {
        let rows = client
            .query(
                CLAIM,
                &[&self.worker, &(want as i32), &self.lease.as_secs_f64()],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Job {
                    id: r.try_get(0)?,
                    workspace: r.try_get(1)?,
                    kind: r.try_get(2)?,
                    provider: r.try_get(3)?,
                    dedupe_key: r.try_get(4)?,
                    attempt: r.try_get(5)?,
                    payload: r.try_get(6)?,
                })
            })
            .collect()
    }
}

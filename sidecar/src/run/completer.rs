//! Completer: gathers executors' results and records them with `herald.complete`, group-commit style: a
//! call starts when a result is waiting, no call is running and the last call started at least [`GAP`]
//! ago; results that arrive meanwhile wait for the next call, up to [`BATCH`] per call. A second call
//! (at most [`IN_FLIGHT`] at once) starts only for an overflow of at least [`OVERFLOW`] waiting
//! results, or once the running call is slow ([`SLOW_CALL`]). So batches form by themselves under load
//! and a lone result after a quiet spell is recorded at once: what a crash can leave "sent but not
//! recorded" (and so sends twice after the lease expires) is what arrived during the last call or two
//! and the gap, not a fixed batch window's worth. (With the second call free for any result, each call
//! took the few results of the last millisecond or two: many more, smaller calls, each with its own
//! commit, for the same work. Issue 14's webhook round: with calls back to back, 20,000 webhooks at
//! concurrency 64 still took ~950 calls of ~21 results, and each call has a fixed cost of its own.)
//!
//! A failed call is retried with back-off and its batch kept (complete() ignores results it has already
//! applied, so a retry after an ambiguous failure is harmless), for as long as the database stays away.
//! Meanwhile at most [`BATCH`] more results wait here; then it reads no new ones, the bounded channel
//! fills up and executors wait to hand theirs over (holding their slots, so nothing more is claimed).
//! Results are dropped only when shutdown gives up (`give_up`): their jobs stay leased and run again once
//! the lease expires. Ends when every executor is gone, after the last calls.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::Value as Json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::database::{Database, DbError};
use super::metrics::Metrics;
use super::pg::Backoff;

/// Results per complete() call at most: a call's fixed cost (a round trip, a transaction, the
/// statement's set-up) is several complete()s' worth of per-result work, so fuller calls cost less
/// per result (measured one call at a time on this machine at load average 5: ~150 µs a result in
/// calls of 50, ~90 in calls of 100, ~56 in calls of 400).
pub const BATCH: usize = 400;
/// complete() calls at once: a second call may start while one is running, for an overflow (see
/// [`OVERFLOW`]), so results that come faster than one call at a time records do not pile up. (Two
/// concurrent calls touch different outbox rows; each is one statement, so they cannot hold each other
/// up for long.)
pub const IN_FLIGHT: usize = 2;
/// Results waiting that start a call at once, beside a running one if a slot is free; fewer wait for
/// it to end (a call lasts a few milliseconds) and for [`GAP`], which keeps calls few and full.
pub const OVERFLOW: usize = BATCH / 2;
/// A call running this long opens the second slot to whatever waits, however little: a slow call
/// (100-250 ms seen under load) must not hold results back, as each is a second copy if the process
/// is killed meanwhile. (10 ms opened it for nearly every call on a loaded machine, where a call
/// lasts ~8 ms: the second slot then took the few results of the last milliseconds again.)
pub const SLOW_CALL: Duration = Duration::from_millis(20);
/// Least time from one call's start to the next's while fewer than [`OVERFLOW`] wait: behind a steady
/// stream of results a call takes at least this long's worth of them (at 3,000 results/s, ~9 rather
/// than ~2), and a crash leaves at most this much more unrecorded.
pub const GAP: Duration = Duration::from_millis(3);

const COMPLETE: &str = "SELECT herald.complete($1::jsonb)";

pub struct Completer {
    pub db: Arc<Database>,
    pub results: mpsc::Receiver<Json>,
    /// Cancelled when the process must exit even though results could not be recorded.
    pub give_up: CancellationToken,
    pub metrics: Arc<Metrics>,
}

impl Completer {
    pub async fn run(self) {
        let Completer {
            db,
            mut results,
            give_up,
            metrics,
        } = self;
        let recorder = Recorder {
            db,
            give_up,
            metrics,
        };
        let lost: usize = group_commit(&mut results, Pace::DAEMON, |batch| recorder.record(batch))
            .await
            .into_iter()
            .sum();
        if lost > 0 {
            tracing::error!(
                results = lost,
                "gave up on recording results at shutdown: those jobs stay leased until their lease expires, then run again"
            );
        } else {
            tracing::info!("all results recorded");
        }
    }
}

/// When calls start: see [`group_commit`].
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Results per call at most.
    pub batch: usize,
    /// Calls running at once at most.
    pub in_flight: usize,
    /// Results waiting that start a call at once (beside a running one, if a slot is free).
    pub overflow: usize,
    /// A running call this old opens a free slot to whatever waits.
    pub slow: Duration,
    /// Fewer than `overflow` results wait until this long after the last call started.
    pub gap: Duration,
}

impl Pace {
    /// The daemon's.
    pub const DAEMON: Pace = Pace {
        batch: BATCH,
        in_flight: IN_FLIGHT,
        overflow: OVERFLOW,
        slow: SLOW_CALL,
        gap: GAP,
    };
}

/// Hands what `results` yields to `record`, in batches of at most `pace.batch`, with at most
/// `pace.in_flight` calls running at once. A call starts with everything waiting when: no call runs
/// and either at least `pace.overflow` wait or the last call started `pace.gap` ago or more (a lone
/// result after a quiet spell goes at once); or a call slot is free and either at least
/// `pace.overflow` wait or the oldest running call has lasted `pace.slow`. Returns each call's
/// output once the channel is closed and every call is done.
async fn group_commit<R, F, T>(results: &mut mpsc::Receiver<Json>, pace: Pace, record: R) -> Vec<T>
where
    R: Fn(Vec<Json>) -> F,
    F: Future<Output = T>,
{
    let batch = pace.batch.max(1);
    let mut waiting: Vec<Json> = Vec::with_capacity(batch);
    // when the last call started
    let mut last_start: Option<Instant> = None;
    let mut calls = FuturesUnordered::new();
    // when each running call started, by its number
    let mut running: Vec<(u64, Instant)> = Vec::new();
    let mut numbered = 0u64;
    let mut outputs = Vec::new();
    let mut open = true;
    loop {
        // everything already in the channel joins this batch (no waiting for more)
        while open && waiting.len() < batch {
            match results.try_recv() {
                Ok(r) => waiting.push(r),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        let now = Instant::now();
        let oldest = running.iter().map(|(_, at)| *at).min();
        let slot_free = calls.len() < pace.in_flight;
        let enough = waiting.len() >= pace.overflow || waiting.len() >= batch || !open;
        let next_at = last_start.map(|at| at + pace.gap);
        let start = if calls.is_empty() {
            enough || next_at.is_none_or(|at| now >= at)
        } else {
            slot_free && (enough || oldest.is_some_and(|at| now - at >= pace.slow))
        };
        if !waiting.is_empty() && start {
            let taken = std::mem::replace(&mut waiting, Vec::with_capacity(batch));
            last_start = Some(now);
            let call = record(taken);
            let number = numbered;
            numbered += 1;
            running.push((number, now));
            calls.push(async move { (number, call.await) });
            continue;
        }
        if !open && waiting.is_empty() && calls.is_empty() {
            return outputs;
        }
        // results wait: with no call running, for the gap since the last call's start to pass;
        // behind a running call, for a free slot to open when that call turns slow
        let wake_at = if waiting.is_empty() {
            None
        } else if calls.is_empty() {
            next_at
        } else {
            oldest.filter(|_| slot_free).map(|at| at + pace.slow)
        };
        // wait for a result (while there is room for it), for a call to end or for that moment
        tokio::select! {
            r = results.recv(), if open && waiting.len() < batch => match r {
                Some(r) => waiting.push(r),
                None => open = false,
            },
            Some((number, out)) = calls.next(), if !calls.is_empty() => {
                running.retain(|(n, _)| *n != number);
                outputs.push(out);
            }
            () = tokio::time::sleep_until(wake_at.unwrap_or(now)), if wake_at.is_some() => {}
        }
    }
}

/// What one complete() call needs.
struct Recorder {
    db: Arc<Database>,
    give_up: CancellationToken,
    metrics: Arc<Metrics>,
}

impl Recorder {
    /// Records the batch, retrying until it is recorded or the process gives up; returns how many
    /// results were dropped.
    async fn record(&self, batch: Vec<Json>) -> usize {
        let mut backoff = Backoff::default();
        let n = batch.len();
        let array = Json::Array(batch);
        loop {
            let started = Instant::now();
            let attempt = async {
                let c = self.db.get().await?;
                // prepared once per connection: one round trip per call instead of two
                let statement = c.prepare_cached(COMPLETE).await?;
                Ok::<_, DbError>(c.query_one(&statement, &[&array]).await?)
            };
            let attempt = tokio::select! {
                biased;
                // once shutdown gives up, what is left is dropped without a try (each try could wait
                // for the connect timeout)
                () = self.give_up.cancelled() => None,
                r = attempt => Some(r),
            };
            let Some(attempt) = attempt else {
                self.metrics.not_recorded(n);
                return n;
            };
            match attempt {
                Ok(row) => {
                    let applied: i32 = row.try_get(0).unwrap_or(-1);
                    let ms = started.elapsed().as_secs_f64() * 1000.0;
                    tracing::debug!(results = n, applied, ms, "recorded");
                    self.metrics.completed(n);
                    return 0;
                }
                Err(e) if is_data_error(&e) && n > 1 => {
                    // a result complete() refuses (a bug on this side) must not hold up the others
                    tracing::error!(error = %e.describe(), "complete refused the batch; recording its results one by one");
                    let mut lost = 0;
                    for one in array.as_array().into_iter().flatten() {
                        lost += Box::pin(self.record(vec![one.clone()])).await;
                    }
                    return lost;
                }
                Err(e) if is_data_error(&e) => {
                    self.metrics.complete_error();
                    self.metrics.not_recorded(n);
                    tracing::error!(error = %e.describe(), result = %array, "complete refused this result; its job will run again once its lease expires");
                    return 0;
                }
                Err(e) => {
                    self.metrics.complete_error();
                    self.metrics.recording_stalled();
                    let delay = backoff.step();
                    if e.is_connection_error() {
                        // DbHealth says once that the database is away; the batch waits for it
                        tracing::debug!(error = %e.describe(), results = n, retry_in_ms = delay.as_millis() as u64, "complete failed; keeping the batch");
                    } else {
                        tracing::warn!(error = %e.describe(), results = n, retry_in_ms = delay.as_millis() as u64, "complete failed; keeping the batch");
                    }
                    tokio::select! {
                        () = self.give_up.cancelled() => {}
                        () = self.db.health().pause(delay) => {}
                    }
                }
            }
        }
    }
}

/// SQLSTATE class 22 (data exception): complete() refused the input; retrying it cannot help.
fn is_data_error(e: &DbError) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("22"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Mutex;
    use tokio::sync::Semaphore;

    /// A `slow` no test call reaches.
    const LONG: Duration = Duration::from_secs(3600);

    /// The daemon's pace with these slots and slow-call threshold, and no gap between calls.
    fn pace(in_flight: usize, slow: Duration) -> Pace {
        Pace {
            in_flight,
            slow,
            gap: Duration::ZERO,
            ..Pace::DAEMON
        }
    }

    /// A recorder whose calls end when the test releases them; it logs each batch's ids.
    struct Fake {
        calls: Mutex<Vec<Vec<i64>>>,
        running: Mutex<usize>,
        most_at_once: Mutex<usize>,
        release: Semaphore,
    }

    impl Fake {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                calls: Mutex::new(Vec::new()),
                running: Mutex::new(0),
                most_at_once: Mutex::new(0),
                release: Semaphore::new(0),
            })
        }

        async fn record(self: Arc<Self>, batch: Vec<Json>) -> usize {
            let ids = batch.iter().map(|r| r["id"].as_i64().unwrap()).collect();
            self.calls.lock().unwrap().push(ids);
            {
                let mut running = self.running.lock().unwrap();
                *running += 1;
                let mut most = self.most_at_once.lock().unwrap();
                *most = (*most).max(*running);
            }
            self.release.acquire().await.unwrap().forget();
            *self.running.lock().unwrap() -= 1;
            batch.len()
        }

        fn calls(&self) -> Vec<Vec<i64>> {
            self.calls.lock().unwrap().clone()
        }
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_lone_result_is_recorded_at_once_and_later_ones_join_the_next_call() {
        let (tx, mut rx) = mpsc::channel(1000);
        let fake = Fake::new();
        let f = Arc::clone(&fake);
        let run = tokio::spawn(async move {
            group_commit(&mut rx, pace(1, LONG), |b| Arc::clone(&f).record(b)).await
        });
        tx.send(json!({"id": 1})).await.unwrap();
        settle().await;
        // no timer: the call started with the one result there was
        assert_eq!(fake.calls(), vec![vec![1]]);
        for id in 2..=5 {
            tx.send(json!({ "id": id })).await.unwrap();
        }
        settle().await;
        assert_eq!(fake.calls().len(), 1, "one call at a time");
        fake.release.add_permits(1);
        settle().await;
        // the four that arrived during the first call go together in the second
        assert_eq!(fake.calls(), vec![vec![1], vec![2, 3, 4, 5]]);
        fake.release.add_permits(1);
        drop(tx);
        let outputs = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("ends once the channel is closed and the calls are done")
            .unwrap();
        assert_eq!(outputs, vec![1, 4]);
    }

    #[tokio::test]
    async fn a_second_call_starts_only_for_an_overflow() {
        let (tx, mut rx) = mpsc::channel(1000);
        let fake = Fake::new();
        let f = Arc::clone(&fake);
        let run = tokio::spawn(async move {
            group_commit(&mut rx, pace(2, LONG), |b| Arc::clone(&f).record(b)).await
        });
        tx.send(json!({"id": 0})).await.unwrap();
        settle().await;
        assert_eq!(fake.calls().len(), 1);
        // a few results while the first call runs wait for it, though a second slot is free
        for id in 1..OVERFLOW as i64 {
            tx.send(json!({ "id": id })).await.unwrap();
        }
        settle().await;
        assert_eq!(
            fake.calls().len(),
            1,
            "no second call for {} results",
            OVERFLOW - 1
        );
        // one more makes an overflow: the second call starts beside the first
        tx.send(json!({ "id": OVERFLOW as i64 })).await.unwrap();
        settle().await;
        let calls = fake.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1], (1..=OVERFLOW as i64).collect::<Vec<_>>());
        assert_eq!(*fake.most_at_once.lock().unwrap(), 2);
        fake.release.add_permits(2);
        drop(tx);
        let outputs = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(outputs.iter().sum::<usize>(), OVERFLOW + 1);
    }

    #[tokio::test]
    async fn a_slow_call_opens_the_second_slot_to_a_few_results() {
        let (tx, mut rx) = mpsc::channel(1000);
        let fake = Fake::new();
        let f = Arc::clone(&fake);
        let slow = Duration::from_millis(500);
        let run = tokio::spawn(async move {
            group_commit(&mut rx, pace(2, slow), |b| Arc::clone(&f).record(b)).await
        });
        tx.send(json!({"id": 0})).await.unwrap();
        settle().await;
        for id in 1..=3 {
            tx.send(json!({ "id": id })).await.unwrap();
        }
        settle().await;
        assert_eq!(fake.calls().len(), 1, "a call just begun: the few wait");
        tokio::time::sleep(slow * 3).await;
        settle().await;
        assert_eq!(fake.calls(), vec![vec![0], vec![1, 2, 3]]);
        fake.release.add_permits(2);
        drop(tx);
        let mut outputs = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .unwrap()
            .unwrap();
        outputs.sort_unstable();
        assert_eq!(outputs, vec![1, 3]);
    }

    #[tokio::test]
    async fn behind_a_stream_of_results_calls_start_a_gap_apart() {
        let (tx, mut rx) = mpsc::channel(1000);
        let fake = Fake::new();
        let f = Arc::clone(&fake);
        // long enough that a loaded machine does not reach it between two checks by accident
        let gap = Duration::from_millis(500);
        let pace = Pace {
            gap,
            ..pace(2, LONG)
        };
        let run =
            tokio::spawn(
                async move { group_commit(&mut rx, pace, |b| Arc::clone(&f).record(b)).await },
            );
        // the first result after a quiet spell goes at once
        tx.send(json!({"id": 0})).await.unwrap();
        settle().await;
        assert_eq!(fake.calls(), vec![vec![0]]);
        fake.release.add_permits(1);
        settle().await;
        // that call has ended, but the next waits for the gap since its start, gathering meanwhile
        for id in 1..=3 {
            tx.send(json!({ "id": id })).await.unwrap();
            settle().await;
        }
        assert_eq!(fake.calls().len(), 1, "the results wait for the gap");
        // an overflow does not wait for it
        for id in 10..(10 + OVERFLOW as i64 - 3) {
            tx.send(json!({ "id": id })).await.unwrap();
        }
        settle().await;
        assert_eq!(fake.calls().len(), 2);
        assert_eq!(fake.calls()[1].len(), OVERFLOW);
        fake.release.add_permits(1);
        settle().await;
        // a few more wait for the gap after that call's start, then go together
        for id in 4..=5 {
            tx.send(json!({ "id": id })).await.unwrap();
        }
        settle().await;
        assert_eq!(fake.calls().len(), 2);
        tokio::time::sleep(gap * 2).await;
        settle().await;
        assert_eq!(fake.calls()[2], vec![4, 5]);
        fake.release.add_permits(1);
        drop(tx);
        let outputs = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(outputs, vec![1, OVERFLOW, 2]);
    }

    #[tokio::test]
    async fn batches_are_capped_and_calls_overlap_up_to_the_limit() {
        let (tx, mut rx) = mpsc::channel(1000);
        let fake = Fake::new();
        for id in 0..(2 * BATCH as i64 + 50) {
            tx.send(json!({ "id": id })).await.unwrap();
        }
        drop(tx);
        let f = Arc::clone(&fake);
        let run = tokio::spawn(async move {
            group_commit(&mut rx, pace(2, LONG), |b| Arc::clone(&f).record(b)).await
        });
        settle().await;
        let calls = fake.calls();
        assert_eq!(calls.len(), 2, "two calls at once, no more");
        assert!(calls.iter().all(|c| c.len() == BATCH));
        fake.release.add_permits(10);
        let outputs = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(outputs.iter().sum::<usize>(), 2 * BATCH + 50);
        let mut all: Vec<i64> = fake.calls().into_iter().flatten().collect();
        all.sort_unstable();
        assert_eq!(all, (0..(2 * BATCH as i64 + 50)).collect::<Vec<_>>());
        assert_eq!(*fake.most_at_once.lock().unwrap(), 2);
    }
}

//! The long-transaction watch. A transaction that holds a snapshot open in herald's database (a report,
//! an idle-in-transaction session, a pg_dump) keeps vacuum from removing the index entries of the jobs
//! leased or finished since, and every claim walks them, more with each minute (README *Known
//! limits*). Nothing in herald can end such a transaction, so the daemon says who holds it: every
//! check reads `herald.oldest_snapshot()`, /metrics shows its age (`herald_oldest_transaction_seconds`),
//! and the log gets one WARN when a session passes HERALD_LONG_TRANSACTION_WARN_SECONDS, a reminder
//! every REMIND_EVERY while it lasts, and one INFO when it ends.

use std::time::Duration;

use super::database::{Database, DbError};
use super::metrics::Metrics;
use super::pg;

/// While the same session stays over the threshold, a reminder this often.
const REMIND_EVERY: Duration = Duration::from_secs(300);

/// The session with the oldest snapshot, as `herald.oldest_snapshot()` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Holder {
    pub pid: i32,
    pub application_name: String,
    pub state: String,
    pub age: Duration,
}

/// What the log should say after a check.
#[derive(Debug, PartialEq)]
pub enum Notice {
    /// A session passed the threshold (or the one over it changed).
    Over(Holder),
    /// The same session is still over it, REMIND_EVERY after the last line.
    Still(Holder),
    /// The session that was over it is not any more.
    Ended { pid: i32 },
}

/// Decides what to log from one check to the next; no I/O, so it is tested on its own.
#[derive(Debug)]
pub struct Watch {
    /// HERALD_LONG_TRANSACTION_WARN_SECONDS.
    threshold: Duration,
    /// The session last reported over the threshold, and its age when its last line was written.
    reported: Option<(i32, Duration)>,
}

impl Watch {
    pub fn new(threshold: Duration) -> Self {
        Self {
            threshold,
            reported: None,
        }
    }

    /// How often to check: half the threshold, between 1 and 30 seconds.
    pub fn check_every(&self) -> Duration {
        (self.threshold / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }

    /// `oldest`: the holder of the oldest snapshot, if any.
    pub fn observe(&mut self, oldest: Option<Holder>) -> Option<Notice> {
        let over = oldest.filter(|h| h.age >= self.threshold);
        match (over, self.reported) {
            (None, None) => None,
            (None, Some((pid, _))) => {
                self.reported = None;
                Some(Notice::Ended { pid })
            }
            (Some(h), Some((pid, at))) if h.pid == pid => {
                if h.age >= at + REMIND_EVERY {
                    self.reported = Some((pid, h.age));
                    Some(Notice::Still(h))
                } else {
                    None
                }
            }
            (Some(h), _) => {
                self.reported = Some((h.pid, h.age));
                Some(Notice::Over(h))
            }
        }
    }
}

/// One check: reads the oldest snapshot, sets the gauge, logs what `watch` decides. Returns false when
/// the installed extension has no `herald.oldest_snapshot` (an older release): the caller stops checking.
pub async fn check(db: &Database, metrics: &Metrics, watch: &mut Watch) -> bool {
    let client = match db.get().await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e.describe(), "long-transaction check: no database connection");
            return true;
        }
    };
    let row = client
        .query_opt(
            "SELECT pid, coalesce(application_name, ''), coalesce(state, ''),
                    extract(epoch FROM transaction_age)::float8
               FROM herald.oldest_snapshot()",
            &[],
        )
        .await
        .map_err(DbError::from);
    let oldest = match row {
        Ok(row) => row.map(|r| Holder {
            pid: r.get(0),
            application_name: r.get(1),
            state: r.get(2),
            age: Duration::from_secs_f64(r.get::<_, f64>(3).max(0.0)),
        }),
        Err(DbError::Pg(e)) if pg::is_undefined_function(&e) => {
            tracing::warn!("herald.oldest_snapshot is not installed in this database (herald before 0.11.0): no long-transaction warnings until restart");
            return false;
        }
        Err(e) => {
            tracing::debug!(error = %e.describe(), "long-transaction check failed");
            return true;
        }
    };
    metrics.set_oldest_transaction(oldest.as_ref().map_or(Duration::ZERO, |h| h.age));
    match watch.observe(oldest) {
        Some(Notice::Over(h)) => warn_about(&h, "a transaction has held a snapshot open this long: vacuum cannot clean up behind the queue, so claim slows down until it ends (end it, or run such work on a replica)"),
        Some(Notice::Still(h)) => warn_about(&h, "that transaction is still open"),
        Some(Notice::Ended { pid }) => {
            tracing::info!(pid, "the long transaction has ended")
        }
        None => {}
    }
    true
}

fn warn_about(h: &Holder, what: &str) {
    tracing::warn!(
        pid = h.pid,
        application_name = %h.application_name,
        state = %h.state,
        open_s = h.age.as_secs(),
        "{what}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(pid: i32, secs: u64) -> Holder {
        Holder {
            pid,
            application_name: "report".into(),
            state: "idle in transaction".into(),
            age: Duration::from_secs(secs),
        }
    }

    #[test]
    fn one_line_when_a_session_passes_the_threshold_then_reminders_then_one_when_it_ends() {
        let mut w = Watch::new(Duration::from_secs(60));
        assert_eq!(w.observe(None), None);
        assert_eq!(w.observe(Some(holder(7, 59))), None); // under the threshold: nothing
        assert_eq!(
            w.observe(Some(holder(7, 61))),
            Some(Notice::Over(holder(7, 61)))
        );
        assert_eq!(w.observe(Some(holder(7, 91))), None);
        assert_eq!(w.observe(Some(holder(7, 360))), None);
        assert_eq!(
            w.observe(Some(holder(7, 361))),
            Some(Notice::Still(holder(7, 361)))
        );
        assert_eq!(w.observe(Some(holder(7, 400))), None);
        assert_eq!(w.observe(None), Some(Notice::Ended { pid: 7 }));
        assert_eq!(w.observe(None), None);
    }

    #[test]
    fn another_session_over_the_threshold_is_told_at_once() {
        let mut w = Watch::new(Duration::from_secs(60));
        w.observe(Some(holder(7, 61)));
        assert_eq!(
            w.observe(Some(holder(8, 70))),
            Some(Notice::Over(holder(8, 70)))
        );
    }

    #[test]
    fn checks_at_half_the_threshold_within_bounds() {
        let every = |s| Watch::new(Duration::from_secs(s)).check_every();
        assert_eq!(every(60), Duration::from_secs(30));
        assert_eq!(every(600), Duration::from_secs(30));
        assert_eq!(every(4), Duration::from_secs(2));
        assert_eq!(every(1), Duration::from_secs(1));
    }
}

//! Taking herald.tick's wake-up, and the follow-up tick that makes skipping a NOTIFY safe.
//!
//! An enrolling transaction notifies `herald.tick` only when no wake-up is pending (`herald._wake_tick`,
//! sql/queue.sql), and so does one that woke enrollments (complete(), the dispatcher's wake-up of waiting
//! enrollments: `herald._request_tick`; both have their transaction id before they read the flag, as an
//! enrolling one does): Postgres commits notifying transactions one at a time, so a NOTIFY in every track()
//! made concurrent clients queue. A transaction that skipped its NOTIFY relies on the round that takes the
//! pending wake-up: before its tick, the round calls `herald.take_tick_wakeup()` (from then on the next
//! enrolling transaction notifies again), and then, in a later statement, reads the next transaction id to
//! be assigned (`pg_snapshot_xmax` of a fresh snapshot), the *horizon*. Every transaction that skipped read
//! the wake-up before the take, and had its own id before that read (it wrote first), so its id is below
//! the horizon. It may still be running when the round's tick takes its snapshot, so once every transaction
//! below the horizon has ended (the oldest running transaction id, `pg_snapshot_xmin`, is at or above it)
//! [`TickWakeup::settled`] resolves and the loop ticks once more, without taking. Reading the horizon
//! assigns no transaction id (a round a few times a second would otherwise burn ids and bring
//! anti-wraparound vacuums sooner). A later take replaces the horizon with a higher one, which covers the
//! older skippers too. A transaction that stays open longer than the poll interval is left to the fallback
//! poll (which takes as well): the waiting stops there.

use std::time::Duration;

use tokio::time::Instant;

use super::database::{Database, DbError};
use super::pg;

/// The first wait between two checks of the horizon; doubled up to [`SETTLE_STEP_MAX`].
const SETTLE_STEP: Duration = Duration::from_millis(2);
const SETTLE_STEP_MAX: Duration = Duration::from_millis(50);

/// A take whose skippers may not all have ended yet.
struct Horizon {
    /// The next transaction id to be assigned, read just after the take (xid8, as text).
    xid: String,
    /// Past this the waiting stops (the poll covers what is left).
    until: Instant,
}

pub struct TickWakeup {
    horizon: Option<Horizon>,
    /// The database's herald has no take_tick_wakeup (older build): its transactions always notify.
    unsupported: bool,
    /// How long a horizon is waited for: the poll interval.
    poll: Duration,
}

impl TickWakeup {
    pub fn new(poll: Duration) -> Self {
        Self {
            horizon: None,
            unsupported: false,
            poll,
        }
    }

    /// Before a tick round woken by a notification or the poll: takes the pending wake-up and sets the
    /// horizon. On failure the round goes on without a horizon (the next round or the poll covers it).
    pub async fn take(&mut self, db: &Database) {
        if self.unsupported {
            return;
        }
        match self.try_take(db).await {
            Ok(xid) => {
                self.horizon = Some(Horizon {
                    xid,
                    until: Instant::now() + self.poll,
                })
            }
            Err(DbError::Pg(e)) if pg::is_undefined_function(&e) => {
                tracing::info!("herald.take_tick_wakeup is not installed (older herald build): every enrolling transaction notifies");
                self.unsupported = true;
            }
            Err(e) => tracing::debug!(error = %e.describe(), "could not take the tick wake-up"),
        }
    }

    /// Two statements: the horizon's snapshot must be taken after the take (a statement's snapshot is
    /// taken when it starts).
    async fn try_take(&self, db: &Database) -> Result<String, DbError> {
        let client = db.get().await?;
        client
            .execute("SELECT herald.take_tick_wakeup()", &[])
            .await?;
        let row = client
            .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Resolves when every transaction below the horizon has ended: a follow-up tick is due (the
    /// horizon is then cleared). Pending while there is no horizon. Cancel-safe: the state is kept
    /// in `self`.
    pub async fn settled(&mut self, db: &Database) {
        let mut step = SETTLE_STEP;
        loop {
            let Some(h) = &self.horizon else {
                return std::future::pending().await;
            };
            if Instant::now() >= h.until {
                tracing::debug!("a transaction older than the tick wake-up's take is still open; the poll covers it");
                self.horizon = None;
                continue;
            }
            if passed(db, &h.xid).await {
                self.horizon = None;
                return;
            }
            tokio::time::sleep(step).await;
            step = (step * 2).min(SETTLE_STEP_MAX);
        }
    }
}

/// True when no transaction with an id below `xid` is running (false on any error: checked again).
async fn passed(db: &Database, xid: &str) -> bool {
    let Ok(client) = db.get().await else {
        return false;
    };
    client
        .query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8",
            &[&xid],
        )
        .await
        .and_then(|r| r.try_get::<_, bool>(0))
        .unwrap_or(false)
}

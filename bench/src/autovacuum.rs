//! Autovacuum and the measurements: a section that measures a state (tables never analysed, or a rate
//! at a table size) must not have autovacuum analyse the tables behind its back or take one of this
//! 2-core machine's cores in the middle of a one-second sample.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio_postgres::Client;

/// `ALTER TABLE … SET (autovacuum_enabled = false)` on every table of the herald schema.
pub async fn off(db: &Client) -> Result<()> {
    // the table names come from the catalog, quoted by format
    db.batch_execute(
        "DO $$ DECLARE t text; BEGIN
           FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'herald' LOOP
             EXECUTE format('ALTER TABLE herald.%I SET (autovacuum_enabled = false)', t);
           END LOOP; END $$",
    )
    .await
    .context("turning autovacuum off")
}

/// Waits until no autovacuum worker runs in this database (at most `max`), so that a sample of about
/// a second does not share this 2-core machine with one.
pub async fn wait_idle(db: &Client, max: Duration) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < max {
        let busy: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE backend_type = 'autovacuum worker' AND datname = current_database()",
                &[],
            )
            .await
            .context("pg_stat_activity")?
            .get(0);
        if busy == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

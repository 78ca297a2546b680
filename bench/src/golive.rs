//! "Going live never blocks ingest": one connection ingests batch after batch while another sets
//! automations live one by one (herald), or creates triggers one by one (baseline). Reports how long
//! each go-live took and the worst ingest batch before and while they happened.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::Client;

use super::stats::{ms, Summary};
use super::{baseline, ingest, Side};
use herald_sidecar::db::Target;

pub const GO_LIVES: usize = 20;
pub const BATCH: usize = 200;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct GoLive {
    /// Duration of `set_automation_status(…, 'live')` (herald) or `CREATE TRIGGER` (baseline).
    pub op: Summary,
    pub ingest_batches_before: usize,
    pub ingest_max_ms_before: f64,
    pub ingest_batches_during: usize,
    pub ingest_max_ms_during: f64,
}

/// One ingest batch: when it started and ended, relative to the run's origin.
struct Sample {
    start: Duration,
    end: Duration,
}

/// Ingests for about `window` in all: a third alone (before), then while GO_LIVES go-lives run,
/// spread over half the window.
pub async fn run(target: &Target, side: Side, contacts: usize, window: Duration) -> Result<GoLive> {
    let ingest_db = target.connect().await?;
    let admin_db = target.connect().await?;
    let batches: Vec<Value> = (0..16)
        .map(|b| match side {
            Side::Herald => ingest::events(b * BATCH, BATCH, contacts),
            Side::Baseline => baseline::events(b * BATCH, BATCH, contacts),
        })
        .collect();
    // one untimed batch first, so "before" does not count the session's first plans
    ingest_batch(&ingest_db, side, &batches[0]).await?;
    let origin = Instant::now();
    let stop = AtomicBool::new(false);

    let ingesting = async {
        let mut samples = Vec::new();
        for batch in batches.iter().cycle() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let start = origin.elapsed();
            ingest_batch(&ingest_db, side, batch).await?;
            samples.push(Sample {
                start,
                end: origin.elapsed(),
            });
        }
        anyhow::Ok(samples)
    };
    let going_live = async {
        let result = go_lives(&admin_db, side, window, origin).await;
        stop.store(true, Ordering::Relaxed);
        result
    };
    let (samples, (ops, from, to)) = tokio::try_join!(ingesting, going_live)?;
    cleanup(&admin_db, side).await?;

    let worst = |keep: &dyn Fn(&Sample) -> bool| {
        let picked: Vec<Duration> = samples
            .iter()
            .filter(|s| keep(s))
            .map(|s| s.end - s.start)
            .collect();
        (
            picked.len(),
            picked.iter().copied().max().map(ms).unwrap_or(0.0),
        )
    };
    let (ingest_batches_before, ingest_max_ms_before) = worst(&|s| s.end <= from);
    let (ingest_batches_during, ingest_max_ms_during) = worst(&|s| s.start < to && s.end > from);
    Ok(GoLive {
        op: Summary::of(&ops),
        ingest_batches_before,
        ingest_max_ms_before,
        ingest_batches_during,
        ingest_max_ms_during,
    })
}

async fn ingest_batch(db: &Client, side: Side, batch: &Value) -> Result<()> {
    match side {
        Side::Herald => ingest::track_many(db, batch).await,
        Side::Baseline => baseline::insert_events(db, batch).await,
    }
}

/// Waits a third of the window, then makes GO_LIVES automations live one by one. Returns each
/// go-live's duration and the span (from the origin) in which they ran.
async fn go_lives(
    db: &Client,
    side: Side,
    window: Duration,
    origin: Instant,
) -> Result<(Vec<Duration>, Duration, Duration)> {
    tokio::time::sleep(window / 3).await;
    let gap = window / 2 / GO_LIVES as u32;
    let from = origin.elapsed();
    let mut ops = Vec::with_capacity(GO_LIVES);
    for i in 0..GO_LIVES {
        let kind = format!("golive.{i}");
        ops.push(match side {
            Side::Herald => {
                let id: i64 = db
                    .query_one(
                        "SELECT herald.create_automation($1, $2)",
                        &[
                            &ingest::WORKSPACE,
                            &ingest::definition(&format!("golive {i}"), &kind),
                        ],
                    )
                    .await?
                    .get(0);
                let started = Instant::now();
                db.execute("SELECT herald.set_automation_status($1, 'live')", &[&id])
                    .await
                    .context("set_automation_status live")?;
                started.elapsed()
            }
            Side::Baseline => baseline::create_trigger(db, golive_trigger_id(i), &kind).await?,
        });
        tokio::time::sleep(gap).await;
    }
    Ok((ops, from, origin.elapsed()))
}

/// Baseline ids for the go-live triggers, clear of the automations' ids.
fn golive_trigger_id(i: usize) -> i32 {
    1_000_000 + i as i32
}

/// Takes the go-live automations out again so later measurements see the same automations.
async fn cleanup(db: &Client, side: Side) -> Result<()> {
    match side {
        Side::Herald => {
            ingest::set_status_where_kind(db, "golive.%", "archived").await?;
        }
        Side::Baseline => {
            for i in 0..GO_LIVES {
                baseline::drop_trigger(db, golive_trigger_id(i)).await?;
            }
        }
    }
    Ok(())
}

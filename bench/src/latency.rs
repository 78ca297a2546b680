//! `herald.track()` latency: a few concurrent clients, each calling it in a loop; every call is timed
//! on the client, from sending the query to having its result. The baseline twin is a single-row
//! INSERT into bench_base.events (same triggers), which also shows the machine's commit floor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::sync::Barrier;

use super::stats::Summary;
use super::{ingest, Side};
use herald_sidecar::db::Target;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub clients: usize,
    pub calls_per_client: usize,
    pub calls: Summary,
    pub calls_per_sec: f64,
}

pub async fn run(
    target: &Target,
    side: Side,
    clients: usize,
    calls: usize,
    contacts: usize,
) -> Result<Latency> {
    let barrier = Arc::new(Barrier::new(clients));
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (target, barrier) = (target.clone(), barrier.clone());
            tokio::spawn(async move { client(&target, &barrier, side, c, calls, contacts).await })
        })
        .collect();
    let mut all = Vec::with_capacity(clients * calls);
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    for task in tasks {
        let (samples, started, ended) = task.await.context("track client panicked")??;
        all.extend(samples);
        first = Some(first.map_or(started, |f| f.min(started)));
        last = Some(last.map_or(ended, |l| l.max(ended)));
    }
    let wall = match (first, last) {
        (Some(f), Some(l)) => (l - f).as_secs_f64(),
        _ => 0.0,
    };
    Ok(Latency {
        clients,
        calls_per_client: calls,
        calls: Summary::of(&all),
        calls_per_sec: if wall > 0.0 {
            all.len() as f64 / wall
        } else {
            0.0
        },
    })
}

/// Client `c` tracks `bench.hit` for its own run of contacts; statement prepared before the clock starts.
async fn client(
    target: &Target,
    barrier: &Barrier,
    side: Side,
    c: usize,
    calls: usize,
    contacts: usize,
) -> Result<(Vec<Duration>, Instant, Instant)> {
    let db = target.connect().await?;
    let contact = |i: usize| (c * calls + i) % contacts;
    let mut samples = Vec::with_capacity(calls);
    let started;
    match side {
        Side::Herald => {
            let track = db
                .prepare("SELECT herald.track($1, $2, $3, '{\"plan\": \"pro\"}')")
                .await?;
            let emails: Vec<String> = (0..calls).map(|i| ingest::email(contact(i))).collect();
            barrier.wait().await;
            started = Instant::now();
            for email in &emails {
                let t = Instant::now();
                db.query_one(&track, &[&ingest::WORKSPACE, email, &ingest::HIT])
                    .await
                    .context("herald.track")?;
                samples.push(t.elapsed());
            }
        }
        Side::Baseline => {
            let insert = db
                .prepare("INSERT INTO bench_base.events (contact_id, kind, payload) VALUES ($1, $2, '{\"plan\": \"pro\"}')")
                .await?;
            barrier.wait().await;
            started = Instant::now();
            for i in 0..calls {
                let t = Instant::now();
                db.execute(&insert, &[&(contact(i) as i64 + 1), &ingest::HIT])
                    .await
                    .context("baseline single-row INSERT")?;
                samples.push(t.elapsed());
            }
        }
    }
    Ok((samples, started, Instant::now()))
}

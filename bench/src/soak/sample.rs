//! One point of the soak's curve: herald's tables (sizes, live and dead tuples, autovacuum runs), the
//! daemon's counters from its /metrics, and the server time of its claim()/complete() calls so far.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Result;
use serde::Serialize;
use tokio_postgres::Client;

#[derive(Debug, Clone, Serialize)]
pub struct Table {
    /// pg_total_relation_size: heap, indexes, TOAST.
    pub total_bytes: i64,
    /// pg_relation_size: the heap alone.
    pub heap_bytes: i64,
    pub index_bytes: i64,
    pub live: i64,
    pub dead: i64,
    pub autovacuums: i64,
    pub autoanalyzes: i64,
}

/// Counters read at one moment (cumulative since the daemon or the server started).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    pub emails_sent: f64,
    pub webhooks_sent: f64,
    pub jobs_failed: f64,
    pub jobs_retried: f64,
    /// Jobs pending in the outbox (herald_queue_jobs, cached up to 5 s by the daemon); None when the
    /// daemon left it out (its read of the queue took over 2 s).
    pub pending: Option<f64>,
    pub claim_calls: i64,
    pub claim_ms: f64,
    pub complete_calls: i64,
    pub complete_ms: f64,
}

pub async fn tables(db: &Client) -> Result<BTreeMap<String, Table>> {
    let rows = db
        .query(
            "SELECT s.relname::text, pg_total_relation_size(s.relid), pg_relation_size(s.relid),
                    pg_indexes_size(s.relid), s.n_live_tup, s.n_dead_tup, s.autovacuum_count,
                    s.autoanalyze_count
               FROM pg_stat_user_tables s
              WHERE s.schemaname = 'herald'",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                Table {
                    total_bytes: r.get(1),
                    heap_bytes: r.get(2),
                    index_bytes: r.get(3),
                    live: r.get(4),
                    dead: r.get(5),
                    autovacuums: r.get(6),
                    autoanalyzes: r.get(7),
                },
            )
        })
        .collect())
}

/// Every herald index's size (index name → bytes).
pub async fn indexes(db: &Client) -> Result<BTreeMap<String, i64>> {
    let rows = db
        .query(
            "SELECT indexrelname::text, pg_relation_size(indexrelid)
               FROM pg_stat_user_indexes WHERE schemaname = 'herald'",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

pub async fn counters(db: &Client, metrics: SocketAddr) -> Counters {
    let mut c = Counters::default();
    if let Some(text) = crate::delivery::scrape_metrics(metrics).await {
        let sum = |prefix: &str, label: Option<&str>| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(prefix))
                .filter(|l| label.is_none_or(|x| l.contains(x)))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum()
        };
        c.emails_sent = sum("herald_jobs_sent", Some("kind=\"email\""));
        c.webhooks_sent = sum("herald_jobs_sent", Some("kind=\"webhook\""));
        c.jobs_failed = sum("herald_jobs_failed", None);
        c.jobs_retried = sum("herald_jobs_retried", None);
        c.pending = text
            .lines()
            .any(|l| l.starts_with("herald_queue_jobs{"))
            .then(|| sum("herald_queue_jobs", Some("status=\"pending\"")));
    }
    // the daemon's calls only (the probe's claim is another statement text)
    if let Ok(r) = db
        .query_one(
            "SELECT coalesce(sum(calls) FILTER (WHERE query LIKE '%FROM herald.claim($1::text%'), 0)::int8,
                    coalesce(sum(total_exec_time) FILTER (WHERE query LIKE '%FROM herald.claim($1::text%'), 0)::float8,
                    coalesce(sum(calls) FILTER (WHERE query LIKE '%herald.complete(%'), 0)::int8,
                    coalesce(sum(total_exec_time) FILTER (WHERE query LIKE '%herald.complete(%'), 0)::float8
               FROM pg_stat_statements
              WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND toplevel",
            &[],
        )
        .await
    {
        c.claim_calls = r.get(0);
        c.claim_ms = r.get(1);
        c.complete_calls = r.get(2);
        c.complete_ms = r.get(3);
    }
    c
}

/// The 1-minute load average of the machine.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

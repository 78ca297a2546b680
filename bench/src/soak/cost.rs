//! What a delivered job cost in CPU, on both sides: the daemon process and the server backends
//! connected to the soak's database. Throughput on this shared 2-core machine moves with whatever
//! else runs; CPU per job moves far less, so two daemons (or two versions of the extension) can be
//! compared by it even when the machine is not quiet. Also the statements the server spent its time
//! on (pg_stat_statements), to say where a difference comes from.

use std::collections::HashMap;

use serde::Serialize;
use tokio_postgres::Client;

/// How many statements the summary lists.
const TOP_STATEMENTS: i64 = 12;

/// CPU seconds a process has used so far (user + system), from /proc/<pid>/stat.
fn process_cpu(pid: i32) -> Option<f64> {
    crate::queue::meter::process_cpu(pid).map(|d| d.as_secs_f64())
}

/// Accumulates CPU seconds of the daemon and of the database's backends between samples. A backend
/// seen for the first time counts from zero (it started during the interval); the last slice of a
/// backend that ended between two samples is lost (the daemon's pool keeps its connections).
pub struct CpuMeter {
    daemon_pid: i32,
    daemon_last: Option<f64>,
    backends_last: HashMap<i32, f64>,
    /// Totals since the meter started.
    pub daemon_secs: f64,
    pub server_secs: f64,
}

impl CpuMeter {
    pub async fn start(db: &Client, daemon_pid: u32) -> CpuMeter {
        let mut m = CpuMeter {
            daemon_pid: daemon_pid as i32,
            daemon_last: process_cpu(daemon_pid as i32),
            backends_last: HashMap::new(),
            daemon_secs: 0.0,
            server_secs: 0.0,
        };
        m.backends_last = backends(db).await;
        m
    }

    /// Reads both sides again and adds what they used since the last sample.
    pub async fn sample(&mut self, db: &Client) {
        if let (Some(before), Some(now)) = (self.daemon_last, process_cpu(self.daemon_pid)) {
            self.daemon_secs += (now - before).max(0.0);
            self.daemon_last = Some(now);
        }
        let now = backends(db).await;
        for (pid, secs) in &now {
            let before = self.backends_last.get(pid).copied().unwrap_or(0.0);
            self.server_secs += (secs - before).max(0.0);
        }
        self.backends_last = now;
    }
}

/// CPU seconds of every backend connected to this database (the sampling connection included: a
/// few milliseconds per sample).
async fn backends(db: &Client) -> HashMap<i32, f64> {
    let pids: Vec<i32> = match db
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()",
            &[],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(_) => return HashMap::new(),
    };
    pids.into_iter()
        .filter_map(|pid| Some((pid, process_cpu(pid)?)))
        .collect()
}

/// One statement's share of the server's time over the run.
#[derive(Debug, Clone, Serialize)]
pub struct StatementCost {
    pub query: String,
    pub calls: i64,
    pub total_ms: f64,
    pub rows: i64,
}

/// The statements of this database that took the most execution time (nested ones included when
/// pg_stat_statements tracks them), empty when pg_stat_statements is not loaded.
pub async fn top_statements(db: &Client) -> Vec<StatementCost> {
    let rows = db
        .query(
            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 90), calls, total_exec_time, rows
               FROM pg_stat_statements
              WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
              ORDER BY total_exec_time DESC
              LIMIT $1",
            &[&TOP_STATEMENTS],
        )
        .await
        .unwrap_or_default();
    rows.iter()
        .map(|r| StatementCost {
            query: r.get(0),
            calls: r.get(1),
            total_ms: r.get(2),
            rows: r.get(3),
        })
        .collect()
}

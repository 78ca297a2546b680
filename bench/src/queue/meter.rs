//! What one queue's run cost the server itself, beside its wall-clock rate: the CPU time of the
//! connection's backend process and the WAL its statements wrote. On a machine shared with other work
//! the wall clock of two queues measured a minute apart moves by 2× and more; these two move far less
//! (the WAL not at all), so they say what the ratio of the rates would be on a quiet machine.
//! Each is optional: the CPU time needs the server on this machine (`/proc/<pid>/stat` of the backend),
//! the WAL needs `pg_stat_statements` loaded (`shared_preload_libraries`).

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

/// Clock ticks per second of /proc's utime/stime (USER_HZ: 100 on Linux whatever the kernel's HZ).
const USER_HZ: f64 = 100.0;

/// The server-side cost of a run: backend CPU per job and WAL per job, when they could be read.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ServerCost {
    pub cpu_us_per_job: Option<f64>,
    pub wal_bytes_per_job: Option<f64>,
}

/// Started before a run; `stop` reads the cost since.
pub struct Meter {
    pid: i32,
    cpu: Option<Duration>,
    wal: bool,
}

impl Meter {
    pub async fn start(db: &Client) -> Meter {
        let pid: i32 = match db.query_one("SELECT pg_backend_pid()", &[]).await {
            Ok(row) => row.get(0),
            Err(_) => 0,
        };
        // the statistics of this database only (other databases' runs keep theirs)
        let wal = db
            .batch_execute(
                "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
                 SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database WHERE datname = current_database()), 0);",
            )
            .await
            .is_ok();
        Meter {
            pid,
            cpu: backend_cpu(pid),
            wal,
        }
    }

    pub async fn stop(self, db: &Client, jobs: usize) -> ServerCost {
        let jobs = jobs.max(1) as f64;
        let cpu = match (self.cpu, backend_cpu(self.pid)) {
            (Some(before), Some(after)) => {
                Some(after.saturating_sub(before).as_secs_f64() * 1e6 / jobs)
            }
            _ => None,
        };
        let wal = if self.wal {
            db.query_one(
                "SELECT coalesce(sum(wal_bytes), 0)::float8 FROM pg_stat_statements
                  WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND toplevel",
                &[],
            )
            .await
            .ok()
            .map(|r| r.get::<_, f64>(0) / jobs)
        } else {
            None
        };
        ServerCost {
            cpu_us_per_job: cpu,
            wal_bytes_per_job: wal,
        }
    }
}

/// The user + system CPU time of backend `pid` so far, if it runs on this machine.
fn backend_cpu(pid: i32) -> Option<Duration> {
    let stat = read_stat(pid)?;
    let comm = stat.rfind(')')?;
    if !stat[..comm].contains("postgres") {
        return None; // a pid of the server's machine, not ours: some other process
    }
    stat_cpu(&stat)
}

/// The user + system CPU time of any process of this machine so far (the soak's daemon, backends).
pub(crate) fn process_cpu(pid: i32) -> Option<Duration> {
    stat_cpu(&read_stat(pid)?)
}

fn read_stat(pid: i32) -> Option<String> {
    if pid <= 0 {
        return None;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

fn stat_cpu(stat: &str) -> Option<Duration> {
    parse_cpu_ticks(stat).map(|ticks| Duration::from_secs_f64(ticks as f64 / USER_HZ))
}

/// utime + stime (fields 14 and 15) of a /proc/<pid>/stat line. The command name (field 2) is in
/// parentheses and may hold spaces, so fields are counted after its closing parenthesis.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, i.e. index 11 here
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_utime_plus_stime_after_the_command_name() {
        let line = "4242 (postgres: root db [local] SELECT) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    1234 56 0 0 20 0 1 0 100 200000000 3000 18446744073709551615";
        assert_eq!(parse_cpu_ticks(line), Some(1234 + 56));
    }

    #[test]
    fn a_short_or_garbled_line_is_none() {
        assert_eq!(parse_cpu_ticks("4242 (postgres) S 1 2"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis"), None);
    }
}

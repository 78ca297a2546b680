//! `herald status`: what each workspace holds right now, and the state of the queue.

use anyhow::{Context, Result};
use tokio_postgres::Client;

use crate::db::Target;

/// One workspace's counts, as printed by `herald status`.
#[derive(Debug, PartialEq, Eq)]
pub struct WorkspaceCounts {
    pub workspace: String,
    pub contacts: i64,
    pub events: i64,
    pub live_automations: i64,
    pub enrollments: Vec<(String, i64)>,
}

// Each count is one grouped scan, joined per workspace; nothing loops over workspaces.
const COUNTS: &str = "
    WITH c AS (SELECT workspace_id, count(*) AS n FROM herald.contacts GROUP BY 1),
         e AS (SELECT workspace_id, count(*) AS n FROM herald.events GROUP BY 1),
         a AS (SELECT workspace_id, count(*) AS n FROM herald.automations WHERE status = 'live' GROUP BY 1),
         r AS (SELECT workspace_id, jsonb_object_agg(status, n) AS by_status
                 FROM (SELECT workspace_id, status, count(*) AS n FROM herald.enrollments GROUP BY 1, 2) s
                GROUP BY 1)
    SELECT w.id, coalesce(c.n, 0), coalesce(e.n, 0), coalesce(a.n, 0), coalesce(r.by_status, '{}')
      FROM herald.workspaces w
      LEFT JOIN c ON c.workspace_id = w.id LEFT JOIN e ON e.workspace_id = w.id
      LEFT JOIN a ON a.workspace_id = w.id LEFT JOIN r ON r.workspace_id = w.id
     ORDER BY w.id";

pub async fn counts(client: &Client) -> Result<Vec<WorkspaceCounts>> {
    let rows = client
        .query(COUNTS, &[])
        .await
        .context("reading workspace counts")?;
    Ok(rows
        .iter()
        .map(|row| {
            let by_status: serde_json::Value = row.get(4);
            let mut enrollments: Vec<(String, i64)> = by_status
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_i64().unwrap_or(0)))
                .collect();
            enrollments.sort();
            WorkspaceCounts {
                workspace: row.get(0),
                contacts: row.get(1),
                events: row.get(2),
                live_automations: row.get(3),
                enrollments,
            }
        })
        .collect())
}

pub fn render(counts: &[WorkspaceCounts]) -> String {
    const STATUSES: [&str; 5] = ["active", "waiting", "completed", "exited", "failed"];
    let mut out = format!(
        "{:<20} {:>10} {:>10} {:>6} {:>9} {:>9} {:>10} {:>9} {:>9}\n",
        "workspace",
        "contacts",
        "events",
        "live",
        "active",
        "waiting",
        "completed",
        "exited",
        "failed"
    );
    for w in counts {
        let n = |s: &str| {
            w.enrollments
                .iter()
                .find(|(k, _)| k == s)
                .map_or(0, |(_, v)| *v)
        };
        out.push_str(&format!(
            "{:<20} {:>10} {:>10} {:>6} {:>9} {:>9} {:>10} {:>9} {:>9}\n",
            w.workspace,
            w.contacts,
            w.events,
            w.live_automations,
            n(STATUSES[0]),
            n(STATUSES[1]),
            n(STATUSES[2]),
            n(STATUSES[3]),
            n(STATUSES[4])
        ));
    }
    if counts.is_empty() {
        out.push_str("(no workspaces yet: herald.create_workspace('id', 'name'))\n");
    }
    out
}

/// The queue as the sidecar sees it: jobs by workspace and state, oldest pending age, dead letters,
/// and the rate limits with what they granted in the last second.
const QUEUE: &str = "
    SELECT q.workspace_id,
           coalesce(sum(q.jobs) FILTER (WHERE q.status = 'pending'), 0)::bigint,
           coalesce(sum(q.jobs) FILTER (WHERE q.status = 'leased'), 0)::bigint,
           coalesce(sum(q.jobs) FILTER (WHERE q.status = 'done'), 0)::bigint,
           coalesce(sum(q.jobs) FILTER (WHERE q.status = 'failed'), 0)::bigint,
           coalesce(sum(q.jobs) FILTER (WHERE q.status = 'dead'), 0)::bigint,
           coalesce(extract(epoch FROM max(q.oldest_pending_age)), 0)::float8
      FROM herald.queue_status q
     GROUP BY q.workspace_id
     ORDER BY q.workspace_id";

const RATES: &str = "
    SELECT r.key, r.per_second,
           coalesce((SELECT sum(g.n) FROM herald.rate_grants g
                      WHERE g.key = r.key AND g.granted_at > clock_timestamp() - interval '1 second'), 0)::bigint
      FROM herald.rate_limits r ORDER BY r.key";

pub async fn render_queue(client: &Client) -> Result<String> {
    let mut out = format!(
        "{:<20} {:>9} {:>9} {:>10} {:>9} {:>7} {:>12}\n",
        "workspace", "pending", "leased", "done", "failed", "dead", "oldest (s)"
    );
    for r in client
        .query(QUEUE, &[])
        .await
        .context("reading herald.queue_status")?
    {
        out.push_str(&format!(
            "{:<20} {:>9} {:>9} {:>10} {:>9} {:>7} {:>12.1}\n",
            r.get::<_, String>(0),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2),
            r.get::<_, i64>(3),
            r.get::<_, i64>(4),
            r.get::<_, i64>(5),
            r.get::<_, f64>(6)
        ));
    }
    let rates = client
        .query(RATES, &[])
        .await
        .context("reading rate limits")?;
    if !rates.is_empty() {
        out.push_str(&format!(
            "\n{:<48} {:>10} {:>16}\n",
            "rate limit", "per second", "granted last 1s"
        ));
        for r in rates {
            out.push_str(&format!(
                "{:<48} {:>10} {:>16}\n",
                r.get::<_, String>(0),
                r.get::<_, i32>(1),
                r.get::<_, i64>(2)
            ));
        }
    }
    Ok(out)
}

/// Broadcasts per workspace and status, one grouped scan.
const BROADCASTS: &str = "
    SELECT workspace_id,
           count(*) FILTER (WHERE status = 'draft'), count(*) FILTER (WHERE status = 'scheduled'),
           count(*) FILTER (WHERE status = 'sending'), count(*) FILTER (WHERE status = 'paused'),
           count(*) FILTER (WHERE status = 'sent'), count(*) FILTER (WHERE status = 'cancelled')
      FROM herald.broadcast_overview
     GROUP BY workspace_id
     ORDER BY workspace_id";

/// Broadcasts by workspace and status, then those in flight (scheduled, sending, paused) with their
/// progress, as `herald broadcasts` shows them.
pub async fn render_broadcasts(client: &Client) -> Result<String> {
    let rows = client
        .query(BROADCASTS, &[])
        .await
        .context("reading herald.broadcast_overview")?;
    if rows.is_empty() {
        return Ok("(no broadcasts)\n".into());
    }
    let mut out = format!(
        "{:<20} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "broadcasts", "draft", "scheduled", "sending", "paused", "sent", "cancelled"
    );
    for r in &rows {
        out.push_str(&format!(
            "{:<20} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            r.get::<_, String>(0),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2),
            r.get::<_, i64>(3),
            r.get::<_, i64>(4),
            r.get::<_, i64>(5),
            r.get::<_, i64>(6)
        ));
    }
    let in_flight = crate::listing::broadcasts(client, None, true).await?;
    if !in_flight.is_empty() {
        out.push('\n');
        out.push_str(&crate::listing::render_broadcasts(&in_flight));
    }
    Ok(out)
}

pub async fn run(target: &Target) -> Result<()> {
    let client = target.connect_herald().await?;
    print!("{}", render(&counts(&client).await?));
    println!();
    print!("{}", render_queue(&client).await?);
    println!();
    print!("{}", render_broadcasts(&client).await?);
    Ok(())
}

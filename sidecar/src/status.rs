//! `herald status`: what each workspace holds right now.

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

pub async fn run(target: &Target) -> Result<()> {
    let client = target.connect().await?;
    print!("{}", render(&counts(&client).await?));
    Ok(())
}

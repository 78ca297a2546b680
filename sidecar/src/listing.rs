//! `herald automations` and `herald broadcasts`: what exists, with status and progress, as aligned
//! text tables (or JSON with `--json`). One query each, read from the views the SQL API documents
//! (`herald.automation_overview`, `herald.broadcast_overview`) and `herald.broadcast_stats`; archived
//! broadcasts (sql/archive.sql) are left out, as the view leaves them out, unless `--all`.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio_postgres::Client;

use crate::db::Target;

#[derive(clap::Args)]
pub struct ListArgs {
    /// Only this workspace.
    #[arg(long)]
    pub workspace: Option<String>,
    /// One JSON array of objects instead of the table (for scripts).
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct BroadcastArgs {
    #[command(flatten)]
    pub list: ListArgs,
    /// Also the archived broadcasts (herald.archive_broadcast), marked as such.
    #[arg(long)]
    pub all: bool,
}

/// A text table: columns padded to their widest cell; numbers (right-aligned columns) on the right.
pub fn table(headers: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i > 0 {
                out.push_str("  ");
            }
            if right[i] {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.push_str(&" ".repeat(pad));
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(&mut headers.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// A name cut to `max` characters (with an ellipsis), so one long name does not widen the whole table.
fn cut(name: &str, max: usize) -> String {
    if name.chars().count() <= max {
        name.to_string()
    } else {
        let mut s: String = name.chars().take(max - 1).collect();
        s.push('…');
        s
    }
}

async fn check_workspace(client: &Client, workspace: Option<&str>) -> Result<()> {
    if let Some(ws) = workspace {
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM herald.workspaces WHERE id = $1)",
                &[&ws],
            )
            .await?
            .get(0);
        if !exists {
            bail!("unknown workspace {ws:?}");
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------ automations

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Automation {
    pub id: i64,
    pub workspace: String,
    pub name: String,
    pub status: String,
    pub trigger: Option<String>,
    pub reentry: Option<String>,
    pub active: i64,
    pub waiting: i64,
    pub completed: i64,
    pub exited: i64,
    pub failed: i64,
}

pub async fn automations(client: &Client, workspace: Option<&str>) -> Result<Vec<Automation>> {
    let rows = client
        .query(
            "SELECT automation_id, workspace_id, name, status, trigger_event, reentry,
                    active, waiting, completed, exited, failed
               FROM herald.automation_overview
              WHERE $1::text IS NULL OR workspace_id = $1
              ORDER BY workspace_id, automation_id",
            &[&workspace],
        )
        .await
        .context("reading herald.automation_overview")?;
    Ok(rows
        .iter()
        .map(|r| Automation {
            id: r.get(0),
            workspace: r.get(1),
            name: r.get(2),
            status: r.get(3),
            trigger: r.get(4),
            reentry: r.get(5),
            active: r.get(6),
            waiting: r.get(7),
            completed: r.get(8),
            exited: r.get(9),
            failed: r.get(10),
        })
        .collect())
}

pub fn render_automations(list: &[Automation]) -> String {
    if list.is_empty() {
        return "(no automations: herald.create_automation(workspace, definition))\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|a| {
            vec![
                a.id.to_string(),
                a.workspace.clone(),
                cut(&a.name, 40),
                a.status.clone(),
                a.trigger.clone().unwrap_or_else(|| "-".into()),
                a.active.to_string(),
                a.waiting.to_string(),
                a.completed.to_string(),
                a.exited.to_string(),
                a.failed.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "id",
            "workspace",
            "name",
            "status",
            "trigger",
            "active",
            "waiting",
            "completed",
            "exited",
            "failed",
        ],
        &[
            true, false, false, false, false, true, true, true, true, true,
        ],
        &rows,
    )
}

// ------------------------------------------------------------------------------------- broadcasts

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Broadcast {
    pub id: i64,
    pub workspace: String,
    pub name: String,
    pub status: String,
    pub phase: String,
    pub enqueued: i64,
    pub sent: i64,
    /// failed + dead
    pub failed: i64,
    pub suppressed: i64,
    pub cancelled: i64,
    /// Sent messages with a hard bounce / a complaint reported (each once; what auto_pause reads).
    pub bounced: i64,
    /// Messages the receiving server refused as a hard bounce at send time (also in `failed`).
    pub refused: i64,
    pub complained: i64,
    pub opened: i64,
    pub clicked: i64,
    /// Jobs ended (sent, failed, dead, suppressed, cancelled) as a share of the audience, once the whole
    /// audience is enqueued (phase `done`); None before, when the audience's size is not known yet.
    pub progress_percent: Option<f64>,
    pub winner: Option<String>,
    pub last_error: Option<String>,
    /// Why the broadcast paused itself (its definition's auto_pause; the data of its
    /// broadcast.auto_paused result), until it is resumed (a cancel keeps it).
    pub auto_paused: Option<serde_json::Value>,
    /// Archived (herald.archive_broadcast): listed only with `--all`.
    pub archived: bool,
}

/// Broadcasts with their counts, archived ones left out; `in_flight` keeps only scheduled, sending and
/// paused ones. A draft's stats are not read (it has none).
pub async fn broadcasts(
    client: &Client,
    workspace: Option<&str>,
    in_flight: bool,
) -> Result<Vec<Broadcast>> {
    broadcasts_including(client, workspace, in_flight, false).await
}

/// As [`broadcasts`]; `archived` also lists the archived ones (read from herald.broadcasts, of which
/// herald.broadcast_overview is the unarchived part).
pub async fn broadcasts_including(
    client: &Client,
    workspace: Option<&str>,
    in_flight: bool,
    archived: bool,
) -> Result<Vec<Broadcast>> {
    let rows = client
        .query(
            "SELECT o.id, o.workspace_id, o.name, o.status, o.phase, o.enqueued, o.winner, o.last_error,
                    CASE WHEN o.status <> 'draft' THEN
                        (SELECT jsonb_object_agg(x.metric, x.value)
                           FROM (SELECT s.metric, sum(s.value) AS value
                                   FROM herald.broadcast_stats(o.id) s GROUP BY s.metric) x)
                    END,
                    o.id NOT IN (SELECT v.id FROM herald.broadcast_overview v WHERE v.workspace_id = o.workspace_id),
                    nullif(to_jsonb(o) -> 'auto_paused', 'null')   -- (a column since 0.15.0; the row as JSON says null for NULL)
               FROM herald.broadcasts o
              WHERE ($1::text IS NULL OR o.workspace_id = $1)
                AND (NOT $2 OR o.status IN ('scheduled', 'sending', 'paused'))
                AND ($3 OR o.id IN (SELECT v.id FROM herald.broadcast_overview v WHERE v.workspace_id = o.workspace_id))
              ORDER BY o.workspace_id, o.id",
            &[&workspace, &in_flight, &archived],
        )
        .await
        .context("reading herald.broadcast_overview and herald.broadcast_stats")?;
    Ok(rows
        .iter()
        .map(|r| {
            let stats: Option<serde_json::Value> = r.get(8);
            let n = |k: &str| {
                stats
                    .as_ref()
                    .and_then(|s| s.get(k))
                    .and_then(serde_json::Value::as_i64)
                    .unwrap_or(0)
            };
            let status: String = r.get(3);
            let phase: String = r.get(4);
            let enqueued: i64 = r.get(5);
            let ended = n("sent") + n("failed") + n("dead") + n("suppressed") + n("cancelled");
            Broadcast {
                id: r.get(0),
                workspace: r.get(1),
                name: r.get(2),
                progress_percent: progress(&status, &phase, enqueued, ended),
                status,
                phase,
                enqueued,
                sent: n("sent"),
                failed: n("failed") + n("dead"),
                suppressed: n("suppressed"),
                cancelled: n("cancelled"),
                bounced: n("bounced"),
                refused: n("refused"),
                complained: n("complained"),
                opened: n("opened"),
                clicked: n("clicked"),
                winner: r.get(6),
                last_error: r.get(7),
                auto_paused: r.get(10),
                archived: r.get(9),
            }
        })
        .collect())
}

/// The share of the audience whose jobs have ended; known once the whole audience is enqueued.
pub fn progress(status: &str, phase: &str, enqueued: i64, ended: i64) -> Option<f64> {
    if status == "draft" || phase != "done" || enqueued <= 0 {
        return None;
    }
    Some((ended as f64 * 100.0 / enqueued as f64).min(100.0))
}

pub fn render_broadcasts(list: &[Broadcast]) -> String {
    if list.is_empty() {
        return "(no broadcasts: herald.create_broadcast(workspace, definition))\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|b| {
            vec![
                b.id.to_string(),
                b.workspace.clone(),
                cut(&b.name, 40),
                if b.archived {
                    format!("{} (archived)", b.status)
                } else {
                    b.status.clone()
                },
                b.phase.clone(),
                b.enqueued.to_string(),
                b.sent.to_string(),
                b.failed.to_string(),
                b.progress_percent
                    .map_or_else(|| "-".into(), |p| format!("{p:.1}%")),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "id",
            "workspace",
            "name",
            "status",
            "phase",
            "enqueued",
            "sent",
            "failed",
            "progress",
        ],
        &[true, false, false, false, false, true, true, true, true],
        &rows,
    );
    for b in list {
        if let Some(e) = &b.last_error {
            out.push_str(&format!("broadcast {}: last error: {e}\n", b.id));
        }
        // kept after a cancel (why it stopped); said while it waits for a resume or a cancel
        if let (Some(why), "paused") = (&b.auto_paused, b.status.as_str()) {
            out.push_str(&format!(
                "broadcast {}: paused by itself: {} (resume or cancel it)\n",
                b.id,
                auto_pause_note(why)
            ));
        }
    }
    out
}

/// Why a broadcast paused itself, for a person, from the data of its broadcast.auto_paused result
/// (sql/broadcasts.sql, `_auto_pause_verdict`): which rate stopped it, at how much of how many
/// messages, and the line.
pub fn auto_pause_note(why: &serde_json::Value) -> String {
    // 30.00 → "30", 0.12 → "0.12": numbers as a person writes them
    let num = |k: &str| match why.get(k).and_then(serde_json::Value::as_f64) {
        Some(n) => format!("{}", (n * 100.0).round() / 100.0),
        None => "?".into(),
    };
    let count = |k: &str| why.get(k).and_then(serde_json::Value::as_i64);
    let reason = why.get("reason").and_then(serde_json::Value::as_str);
    let what = match reason {
        Some("complaint_percent") => "complaints",
        Some("bounce_percent") => "hard bounces",
        _ => "reports",
    };
    // the bounce percent is of the messages sent or refused at send time (0.18.0); complaints, of those sent
    let refused = count("refused").filter(|&n| n > 0 && reason == Some("bounce_percent"));
    let of = count("sent").map(|sent| sent + refused.unwrap_or(0));
    let messages = match refused {
        Some(n) => format!("sent or refused ({n} refused at send time)"),
        None => "sent".to_owned(),
    };
    let since = if why.get("since_resume").and_then(serde_json::Value::as_bool) == Some(true) {
        " since it was last resumed"
    } else {
        ""
    };
    format!(
        "{what} reached {}% of {} message{} {messages}{since} (auto_pause: {}%)",
        num("percent"),
        of.map_or_else(|| "?".to_owned(), |n| n.to_string()),
        if of == Some(1) { "" } else { "s" },
        num("limit"),
    )
}

// ------------------------------------------------------------------------------------ subcommands

pub async fn run_automations(target: &Target, args: ListArgs) -> Result<()> {
    let client = target.connect_herald().await?;
    check_workspace(&client, args.workspace.as_deref()).await?;
    let list = automations(&client, args.workspace.as_deref()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", render_automations(&list));
    }
    Ok(())
}

pub async fn run_broadcasts(target: &Target, args: BroadcastArgs) -> Result<()> {
    let client = target.connect_herald().await?;
    check_workspace(&client, args.list.workspace.as_deref()).await?;
    let list =
        broadcasts_including(&client, args.list.workspace.as_deref(), false, args.all).await?;
    if args.list.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", render_broadcasts(&list));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["id", "name", "n"],
            &[true, false, true],
            &[
                vec!["1".into(), "Welcome séries".into(), "335".into()],
                vec!["12".into(), "x".into(), "0".into()],
            ],
        );
        assert_eq!(
            t,
            "id  name              n\n 1  Welcome séries  335\n12  x                 0\n"
        );
    }

    #[test]
    fn long_names_are_cut() {
        assert_eq!(cut("abc", 3), "abc");
        assert_eq!(cut("abcd", 3), "ab…");
    }

    #[test]
    fn progress_is_known_once_the_audience_is() {
        assert_eq!(progress("draft", "all", 0, 0), None);
        assert_eq!(progress("sending", "all", 500, 100), None);
        assert_eq!(progress("sending", "test", 500, 100), None);
        assert_eq!(progress("sending", "done", 400, 100), Some(25.0));
        assert_eq!(progress("sent", "done", 400, 400), Some(100.0));
        assert_eq!(progress("sent", "done", 0, 0), None);
    }

    fn broadcast(id: i64, phase: &str, progress_percent: Option<f64>) -> Broadcast {
        Broadcast {
            id,
            workspace: "acme".into(),
            name: "Nov news".into(),
            status: "sending".into(),
            phase: phase.into(),
            enqueued: 3,
            sent: 1,
            failed: 0,
            suppressed: 0,
            cancelled: 0,
            bounced: 0,
            refused: 0,
            complained: 0,
            opened: 0,
            clicked: 0,
            progress_percent,
            winner: None,
            last_error: None,
            auto_paused: None,
            archived: false,
        }
    }

    #[test]
    fn broadcast_table() {
        let mut b = vec![
            broadcast(1, "done", Some(100.0 / 3.0)),
            broadcast(2, "all", None),
        ];
        b[1].last_error = Some("template gone".into());
        let t = render_broadcasts(&b);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "id  workspace  name      status   phase  enqueued  sent  failed  progress"
        );
        assert_eq!(
            lines[1],
            " 1  acme       Nov news  sending  done          3     1       0     33.3%"
        );
        assert!(lines[2].ends_with("       -"), "{t}");
        assert_eq!(lines[3], "broadcast 2: last error: template gone");
        assert!(render_broadcasts(&[]).contains("no broadcasts"));
    }

    #[test]
    fn a_broadcast_that_paused_itself_says_why() {
        let mut b = vec![broadcast(4, "all", None)];
        b[0].status = "paused".into();
        b[0].auto_paused = Some(
            serde_json::json!({"name": "Nov news", "reason": "complaint_percent",
            "percent": 0.12, "limit": 0.1, "min_sent": 500, "sent": 2500, "bounced": 9, "complained": 3,
            "since_resume": true}),
        );
        let t = render_broadcasts(&b);
        b[0].status = "cancelled".into();
        assert!(
            !render_broadcasts(&b).contains("paused by itself"),
            "said while paused only"
        );
        assert_eq!(
            t.lines().last().unwrap(),
            "broadcast 4: paused by itself: complaints reached 0.12% of 2500 messages sent since it \
             was last resumed (auto_pause: 0.1%) (resume or cancel it)"
        );
        let bounce = serde_json::json!({"reason": "bounce_percent", "percent": 30.0, "limit": 20.0,
            "sent": 10, "since_resume": false});
        assert_eq!(
            auto_pause_note(&bounce),
            "hard bounces reached 30% of 10 messages sent (auto_pause: 20%)"
        );
        let refusals = serde_json::json!({"reason": "bounce_percent", "percent": 22.22, "limit": 20.0,
            "sent": 7, "bounced": 0, "refused": 2, "since_resume": false});
        assert_eq!(
            auto_pause_note(&refusals),
            "hard bounces reached 22.22% of 9 messages sent or refused (2 refused at send time) \
             (auto_pause: 20%)"
        );
        let one = serde_json::json!({"reason": "bounce_percent", "percent": 100.0, "limit": 50, "sent": 1});
        assert_eq!(
            auto_pause_note(&one),
            "hard bounces reached 100% of 1 message sent (auto_pause: 50%)"
        );
    }

    #[test]
    fn archived_broadcasts_are_marked() {
        let mut b = vec![broadcast(1, "done", Some(100.0))];
        b[0].archived = true;
        let t = render_broadcasts(&b);
        assert!(
            t.lines().nth(1).unwrap().contains(" sending (archived) "),
            "{t}"
        );
    }
}

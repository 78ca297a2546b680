//! What the admin page reads and does, each a parameterised statement (no SQL is built from what a
//! request carries; the only text put into SQL is the name of one of two herald tables, from the
//! constants below). Reads run inside one read-only transaction per request (pages.rs), so a
//! page's numbers are of one moment.
//!
//! Why not `herald status`'s queries (status.rs): they count whole tables (events, outbox,
//! enrollments) grouped by workspace, which takes seconds at millions of rows; a page must answer in
//! 200 ms. Here every count is served by an index and proportional to what it counts (contacts,
//! work in the queue, the last minute's events, the last hour's messages), and "the last minute"
//! is found by a binary search over ids (see [`since`]).

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::Transaction;

use super::chart::Minute;
use super::graph::Figures;
use crate::run::database::DbError;

type Result<T> = std::result::Result<T, DbError>;
type Params<'a, const N: usize> = [&'a (dyn ToSql + Sync); N];

/// One workspace on the overview.
#[derive(Clone, Debug, Default)]
pub struct WorkspaceFigures {
    pub id: String,
    pub name: String,
    pub live_automations: i64,
    pub events_last_minute: i64,
    pub leased: i64,
    /// How long the longest-waiting due job has been due (seconds); None: nothing due.
    pub oldest_due: Option<f64>,
    /// The counts that scan (cached, see cache.rs), and how old they are.
    pub counts: Counts,
    pub counted_ago: std::time::Duration,
    /// Sent and failed per minute, the last 60 minutes, oldest first.
    pub minutes: Vec<Minute>,
}

/// A workspace's counts that read a range as large as what they count.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub contacts: i64,
    pub pending: i64,
    pub due: i64,
    pub held: i64,
    pub dead: i64,
}

// Each count reads one index range: contacts by the primary key, the outbox's partial indexes
// (pending, held/failed/dead of broadcasts, dead).
const COUNTS: &str = "
    SELECT w.id,
           (SELECT count(*) FROM herald.contacts c WHERE c.workspace_id = w.id),
           (SELECT count(*) FROM herald.outbox o WHERE o.workspace_id = w.id AND o.status = 'pending'),
           (SELECT count(*) FROM herald.outbox o WHERE o.workspace_id = w.id AND o.status = 'pending' AND o.run_at <= now()),
           (SELECT count(*) FROM herald.outbox o
             WHERE o.workspace_id = w.id AND o.status = 'held' AND o.broadcast_id IS NOT NULL),
           (SELECT count(*) FROM herald.outbox o WHERE o.workspace_id = w.id AND o.status = 'dead')
      FROM herald.workspaces w";

/// Per workspace, the counts that scan (called in the background, see cache.rs).
pub async fn counts(tx: &Transaction<'_>) -> Result<HashMap<String, Counts>> {
    Ok(tx
        .query(COUNTS, &[])
        .await?
        .iter()
        .map(|r| {
            (
                r.get(0),
                Counts {
                    contacts: r.get(1),
                    pending: r.get(2),
                    due: r.get(3),
                    held: r.get(4),
                    dead: r.get(5),
                },
            )
        })
        .collect())
}

// What is cheap: live automations, leased jobs (at most the daemons' concurrency), the oldest due
// job (the first pending job of each priority in run_at order: three index probes), and the
// database's clock.
const OVERVIEW: &str = "
    SELECT w.id, w.name,
           (SELECT count(*) FROM herald.automations a WHERE a.workspace_id = w.id AND a.status = 'live'),
           (SELECT count(*) FROM herald.outbox o WHERE o.workspace_id = w.id AND o.status = 'leased'),
           (SELECT extract(epoch FROM now() - min(f.run_at))::float8
              FROM unnest('{0,1,2}'::smallint[]) p(priority)
              CROSS JOIN LATERAL (SELECT o.run_at FROM herald.outbox o
                                   WHERE o.workspace_id = w.id AND o.status = 'pending' AND o.priority = p.priority
                                   ORDER BY o.run_at LIMIT 1) f
             WHERE f.run_at <= now()),
           extract(epoch FROM now())::float8
      FROM herald.workspaces w
     ORDER BY w.id";

/// The tables [`since`] may search (ids rise with created_at in both: rows are inserted with now()).
const EVENTS: &str = "events";
const MESSAGES: &str = "message_history";

/// Per workspace, the first id of `table` whose row was created at or after `cutoff` (an SQL
/// expression), as a recursive CTE named `search(ws, lo, hi, mid)`; the answer is `lo` in the row
/// where `lo >= hi`. A binary search over the id range: each step probes the first row at or after
/// the middle id through the (workspace_id, id) primary key and keeps the half where the boundary
/// is, so ~log2(id range) probes find it whatever the table's size. It relies on ids rising with
/// created_at, which holds for rows inserted with now(); the counts that follow also check
/// created_at, so a stray row can only shift the boundary, not be counted wrongly.
/// The middle is a column of its own: on a table with row-level security an index condition must
/// be leakproof, and `id >= (lo + hi) / 2` is not (the arithmetic can raise an error), so it would
/// filter the whole workspace instead of seeking.
fn since(table: &'static str, cutoff: &'static str) -> String {
    format!(
        "WITH RECURSIVE cutoff AS (SELECT {cutoff} AS at),
         bounds AS (
            SELECT w.id AS ws,
                   (SELECT t.id FROM herald.{table} t WHERE t.workspace_id = w.id ORDER BY t.id LIMIT 1) AS lo,
                   (SELECT t.id FROM herald.{table} t WHERE t.workspace_id = w.id ORDER BY t.id DESC LIMIT 1) + 1 AS hi
              FROM herald.workspaces w),
         search(ws, lo, hi, mid) AS (
            SELECT b.ws, b.lo, b.hi, (b.lo + b.hi) / 2 FROM bounds b
            UNION ALL
            SELECT s.ws, n.lo, n.hi, (n.lo + n.hi) / 2
              FROM search s
              LEFT JOIN LATERAL (SELECT t.id, t.created_at FROM herald.{table} t
                                  WHERE t.workspace_id = s.ws AND t.id >= s.mid
                                  ORDER BY t.id LIMIT 1) p ON true
             CROSS JOIN LATERAL (
                 SELECT CASE WHEN p.created_at < (SELECT at FROM cutoff) THEN p.id + 1 ELSE s.lo END AS lo,
                        CASE WHEN p.created_at < (SELECT at FROM cutoff) THEN s.hi ELSE s.mid END AS hi) n
             WHERE s.lo < s.hi)"
    )
}

fn events_last_minute_sql() -> String {
    format!(
        "{} SELECT s.ws, (SELECT count(*) FROM herald.{EVENTS} t
                           WHERE t.workspace_id = s.ws AND t.id >= s.lo AND t.created_at >= (SELECT at FROM cutoff))
              FROM search s WHERE s.lo >= s.hi",
        since(EVENTS, "now() - interval '1 minute'")
    )
}

/// Sent and failed per workspace and minute from minute $1 (Unix seconds; at most the last hour).
fn messages_sql() -> String {
    format!(
        "{} SELECT s.ws, extract(epoch FROM date_trunc('minute', t.created_at))::bigint,
                   count(*) FILTER (WHERE t.status = 'sent'), count(*) FILTER (WHERE t.status <> 'sent')
              FROM search s
              JOIN herald.{MESSAGES} t ON t.workspace_id = s.ws AND t.id >= s.lo AND t.created_at >= (SELECT at FROM cutoff)
             WHERE s.lo >= s.hi
             GROUP BY 1, 2",
        since(
            MESSAGES,
            "greatest(to_timestamp($1::bigint), date_trunc('minute', now()) - interval '59 minutes')"
        )
    )
}

/// The overview's cheap reads: per workspace (id, name, live automations, leased, oldest due,
/// events in the last minute; the counts and minutes are filled in by the caller), the database's
/// clock (Unix seconds), and sent/failed per (workspace, minute) from minute `read_from` on.
pub struct Fresh {
    pub workspaces: Vec<WorkspaceFigures>,
    pub now: f64,
    pub minutes: Vec<(String, i64, Minute)>,
}

/// [`Fresh`] (three statements, sent together).
pub async fn overview(tx: &Transaction<'_>, read_from: i64) -> Result<Fresh> {
    let events_sql = events_last_minute_sql();
    let messages_sql = messages_sql();
    let from: Params<1> = [&read_from];
    let (rows, events, messages) = futures_util::try_join!(
        tx.query(OVERVIEW, &[]),
        tx.query(events_sql.as_str(), &[]),
        tx.query(messages_sql.as_str(), &from),
    )?;
    let events: HashMap<String, i64> = events.iter().map(|r| (r.get(0), r.get(1))).collect();
    let now = rows.first().map_or(0.0, |r| r.get::<_, f64>(5));
    Ok(Fresh {
        workspaces: rows
            .iter()
            .map(|r| {
                let id: String = r.get(0);
                WorkspaceFigures {
                    events_last_minute: events.get(&id).copied().unwrap_or(0),
                    name: r.get(1),
                    live_automations: r.get(2),
                    leased: r.get(3),
                    oldest_due: r.get(4),
                    id,
                    ..WorkspaceFigures::default()
                }
            })
            .collect(),
        now,
        minutes: messages
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get(1),
                    Minute {
                        sent: r.get(2),
                        failed: r.get(3),
                    },
                )
            })
            .collect(),
    })
}

/// One row of the automations list.
#[derive(Clone, Debug)]
pub struct AutomationRow {
    pub workspace: String,
    pub id: i64,
    pub name: String,
    pub status: String,
    pub trigger: Option<String>,
    pub versions: i32,
    pub active: i64,
    pub waiting: i64,
}

const AUTOMATIONS: &str = "
    SELECT a.workspace_id, a.id, a.name, a.status, a.trigger_event,
           (SELECT max(v.version) FROM herald.automation_versions v
             WHERE v.workspace_id = a.workspace_id AND v.automation_id = a.id)
      FROM herald.automations a
     ORDER BY a.workspace_id, (a.status = 'archived'), a.id
     LIMIT 1000";

/// The automations (their in-progress counts are filled in from [`in_progress`]).
pub async fn automations(tx: &Transaction<'_>) -> Result<Vec<AutomationRow>> {
    Ok(tx
        .query(AUTOMATIONS, &[])
        .await?
        .iter()
        .map(|r| AutomationRow {
            workspace: r.get(0),
            id: r.get(1),
            name: r.get(2),
            status: r.get(3),
            trigger: r.get(4),
            versions: r.get::<_, Option<i32>>(5).unwrap_or(1),
            active: 0,
            waiting: 0,
        })
        .collect())
}

// In progress per automation: a range of (workspace_id, automation_id, status) for each of the two
// statuses, so the cost is what is in progress, not every enrollment ever.
const IN_PROGRESS: &str = "
    SELECT a.id,
           (SELECT count(*) FROM herald.enrollments e
             WHERE e.workspace_id = a.workspace_id AND e.automation_id = a.id AND e.status = 'active'),
           (SELECT count(*) FROM herald.enrollments e
             WHERE e.workspace_id = a.workspace_id AND e.automation_id = a.id AND e.status = 'waiting')
      FROM herald.automations a
     WHERE a.status <> 'archived'";

/// Automation id → (active, waiting) enrollments.
pub type InProgress = HashMap<i64, (i64, i64)>;

/// [`InProgress`] (called in the background, see cache.rs).
pub async fn in_progress(tx: &Transaction<'_>) -> Result<InProgress> {
    Ok(tx
        .query(IN_PROGRESS, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}

/// One automation with what its diagram shows.
#[derive(Clone, Debug)]
pub struct AutomationDetail {
    pub workspace: String,
    pub id: i64,
    pub name: String,
    pub status: String,
    pub trigger: Option<String>,
    pub definition: Value,
    pub version: i32,
    /// (version, created_at text, note) newest first.
    pub versions: Vec<(i32, String, Option<String>)>,
    /// Node metrics (now, opened and clicked are filled in from [`node_figures`]).
    pub figures: Figures,
    /// How old the cached node figures are.
    pub counted_ago: std::time::Duration,
    /// Automation-level metrics (node ''): enrolled, completed, exited, failed, goal, …
    pub totals: BTreeMap<String, i64>,
}

const AUTOMATION: &str = "
    SELECT a.workspace_id, a.name, a.status, a.trigger_event, a.definition,
           coalesce((SELECT max(v.version) FROM herald.automation_versions v
                      WHERE v.workspace_id = a.workspace_id AND v.automation_id = a.id), 1)
      FROM herald.automations a WHERE a.id = $1";

const VERSIONS: &str = "
    SELECT v.version, to_char(v.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI \"UTC\"'), v.note
      FROM herald.automation_versions v
     WHERE v.workspace_id = $1 AND v.automation_id = $2
     ORDER BY v.version DESC";

// Contacts on each node now, per version: the in-progress range of the automation only.
const NOW_BY_NODE: &str = "
    SELECT coalesce((e.event ->> 'version')::int, 1), e.current_node, count(*)
      FROM herald.enrollments e
     WHERE e.workspace_id = $1 AND e.automation_id = $2 AND e.status IN ('active', 'waiting')
     GROUP BY 1, 2";

// Unique openers and clickers per email node: opens and clicks of automation mail carry the job's
// dedupe key (a<automation>:e<enrollment>:<node>:<visit>) as `message`, and no broadcast.
const ENGAGEMENT: &str = "
    SELECT substring(e.payload ->> 'message' FROM '^a[0-9]+:e[0-9]+:(.*):[0-9]+$'), e.kind, count(DISTINCT e.contact_id)
      FROM herald.events e
     WHERE e.workspace_id = $1 AND e.kind IN ('email.opened', 'email.clicked')
       AND (e.payload ->> 'broadcast') IS NULL AND (e.payload ->> 'message') LIKE $2
     GROUP BY 1, 2";

/// An automation, its current definition and its figures; None when there is no such automation.
pub async fn automation(tx: &Transaction<'_>, id: i64) -> Result<Option<AutomationDetail>> {
    let Some(row) = tx.query_opt(AUTOMATION, &[&id]).await? else {
        return Ok(None);
    };
    let workspace: String = row.get(0);
    let ws_id: Params<2> = [&workspace, &id];
    let only_id: Params<1> = [&id];
    let (versions, stats) = futures_util::try_join!(
        tx.query(VERSIONS, &ws_id),
        tx.query(
            "SELECT node, metric, value FROM herald.automation_stats($1)",
            &only_id
        ),
    )?;
    let mut figures = Figures::default();
    let mut totals = BTreeMap::new();
    for r in &stats {
        let node: String = r.get(0);
        let metric: String = r.get(1);
        let value: i64 = r.get(2);
        if node.is_empty() {
            totals.insert(metric, value);
        } else {
            figures.metrics.insert((node, metric), value);
        }
    }
    Ok(Some(AutomationDetail {
        workspace,
        id,
        name: row.get(1),
        status: row.get(2),
        trigger: row.get(3),
        definition: row.get(4),
        version: row.get(5),
        versions: versions
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect(),
        figures,
        counted_ago: std::time::Duration::ZERO,
        totals,
    }))
}

/// What scans on an automation's page: contacts on each node now (per version), and unique
/// openers and clickers per email node.
#[derive(Clone, Debug, Default)]
pub struct NodeFigures {
    pub now: HashMap<String, BTreeMap<i32, i64>>,
    pub opened: HashMap<String, i64>,
    pub clicked: HashMap<String, i64>,
}

/// An automation's [`NodeFigures`] (called in the background, see cache.rs).
pub async fn node_figures(tx: &Transaction<'_>, id: i64) -> Result<NodeFigures> {
    let mut out = NodeFigures::default();
    let Some(row) = tx
        .query_opt(
            "SELECT a.workspace_id FROM herald.automations a WHERE a.id = $1",
            &[&id],
        )
        .await?
    else {
        return Ok(out);
    };
    let workspace: String = row.get(0);
    let pattern = format!("a{id}:%");
    let ws_id: Params<2> = [&workspace, &id];
    let ws_pattern: Params<2> = [&workspace, &pattern];
    let (now, engagement) = futures_util::try_join!(
        tx.query(NOW_BY_NODE, &ws_id),
        tx.query(ENGAGEMENT, &ws_pattern),
    )?;
    for r in &now {
        let version: i32 = r.get(0);
        let node: String = r.get(1);
        out.now.entry(node).or_default().insert(version, r.get(2));
    }
    for r in &engagement {
        let Some(node) = r.get::<_, Option<String>>(0) else {
            continue;
        };
        let kind: String = r.get(1);
        let target = if kind == "email.opened" {
            &mut out.opened
        } else {
            &mut out.clicked
        };
        target.insert(node, r.get(2));
    }
    Ok(out)
}

/// One enrollment of a contact, with its steps.
#[derive(Clone, Debug)]
pub struct Journey {
    pub enrollment: i64,
    pub version: i32,
    pub status: String,
    pub node: String,
    pub enrolled_at: String,
    pub ended: Option<String>,
    pub exit_reason: Option<String>,
    /// (when, node, visit, action)
    pub steps: Vec<(String, String, i32, String)>,
}

/// A contact found by email, with its journeys through one automation.
#[derive(Clone, Debug)]
pub struct ContactHistory {
    pub contact: i64,
    pub email: String,
    pub journeys: Vec<Journey>,
}

const TIME: &str = "'YYYY-MM-DD HH24:MI:SS \"UTC\"'";

/// The step history (herald.step_history) of the contact with `email` in one automation: its
/// latest 20 enrollments there, 500 steps at most. None: no such contact in the workspace.
pub async fn contact_history(
    tx: &Transaction<'_>,
    workspace: &str,
    automation: i64,
    email: &str,
) -> Result<Option<ContactHistory>> {
    let Some(contact) = tx
        .query_opt(
            "SELECT c.id, c.email FROM herald.contacts c WHERE c.email = $1 AND c.workspace_id = $2",
            &[&email, &workspace],
        )
        .await?
    else {
        return Ok(None);
    };
    let contact_id: i64 = contact.get(0);
    let enrollments = tx
        .query(
            &format!(
                "SELECT e.id, coalesce((e.event ->> 'version')::int, 1), e.status, e.current_node,
                        to_char(e.enrolled_at AT TIME ZONE 'UTC', {TIME}),
                        to_char(e.ended_at AT TIME ZONE 'UTC', {TIME}), e.exit_reason
                   FROM herald.enrollments e
                  WHERE e.workspace_id = $1 AND e.automation_id = $2 AND e.contact_id = $3
                  ORDER BY e.id DESC LIMIT 20"
            ),
            &[&workspace, &automation, &contact_id],
        )
        .await?;
    let ids: Vec<i64> = enrollments.iter().map(|r| r.get(0)).collect();
    let steps = tx
        .query(
            &format!(
                "SELECT h.enrollment_id, to_char(h.created_at AT TIME ZONE 'UTC', {TIME}), h.node, h.visit, h.action
                   FROM herald.step_history h
                  WHERE h.workspace_id = $1 AND h.enrollment_id = ANY($2)
                  ORDER BY h.enrollment_id DESC, h.log_id, h.seq
                  LIMIT 500"
            ),
            &[&workspace, &ids],
        )
        .await?;
    let mut by_enrollment: HashMap<i64, Vec<(String, String, i32, String)>> = HashMap::new();
    for r in &steps {
        by_enrollment
            .entry(r.get(0))
            .or_default()
            .push((r.get(1), r.get(2), r.get(3), r.get(4)));
    }
    Ok(Some(ContactHistory {
        contact: contact_id,
        email: contact.get(1),
        journeys: enrollments
            .iter()
            .map(|r| {
                let id: i64 = r.get(0);
                Journey {
                    enrollment: id,
                    version: r.get(1),
                    status: r.get(2),
                    node: r.get(3),
                    enrolled_at: r.get(4),
                    ended: r.get(5),
                    exit_reason: r.get(6),
                    steps: by_enrollment.remove(&id).unwrap_or_default(),
                }
            })
            .collect(),
    }))
}

/// One broadcast with its results.
#[derive(Clone, Debug)]
pub struct BroadcastRow {
    pub workspace: String,
    pub id: i64,
    pub name: String,
    pub status: String,
    pub phase: String,
    pub send_at: Option<String>,
    pub enqueued: i64,
    pub winner: Option<String>,
    pub winner_reason: Option<String>,
    pub test_ends_at: Option<String>,
    pub last_error: Option<String>,
    /// Why it paused itself (definition auto_pause), until it is resumed (a cancel keeps it).
    pub auto_paused: Option<Value>,
    pub ab_metric: Option<String>,
    /// Variation keys in the definition's order, with their template.
    pub variations: Vec<(String, String)>,
    /// variation → metric → value (herald.broadcast_stats).
    pub stats: BTreeMap<String, BTreeMap<String, i64>>,
}

impl BroadcastRow {
    pub fn total(&self, metric: &str) -> i64 {
        self.stats
            .values()
            .map(|m| m.get(metric).copied().unwrap_or(0))
            .sum()
    }
}

// In flight first (scheduled, sending, paused), then the newest; 30 at most. Archived ones
// (herald.archive_broadcast) are left out of the list, as in broadcast_overview, but one asked for by
// id is shown.
const BROADCASTS: &str = "
    SELECT b.workspace_id, b.id, b.name, b.status, b.phase,
           to_char(b.send_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI \"UTC\"'), b.enqueued, b.winner, b.winner_reason,
           to_char(b.test_ends_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI \"UTC\"'), b.last_error,
           b.definition -> 'ab_test' ->> 'metric', b.definition -> 'variations',
           nullif(to_jsonb(b) -> 'auto_paused', 'null')   -- (a column since 0.15.0; the row as JSON says null for NULL)
      FROM herald.broadcasts b
     WHERE ($1::bigint IS NULL
            AND NOT EXISTS (SELECT 1 FROM herald.archived a
                             WHERE a.workspace_id = b.workspace_id AND a.kind = 'broadcast' AND a.name = b.id::text))
        OR b.id = $1
     ORDER BY (b.status IN ('scheduled', 'sending', 'paused')) DESC, b.id DESC
     LIMIT 30";

/// The broadcasts to show (or just one), each with herald.broadcast_stats.
pub async fn broadcasts(tx: &Transaction<'_>, only: Option<i64>) -> Result<Vec<BroadcastRow>> {
    let rows = tx.query(BROADCASTS, &[&only]).await?;
    let mut out: Vec<BroadcastRow> = rows
        .iter()
        .map(|r| {
            let variations: Option<Value> = r.get(12);
            BroadcastRow {
                workspace: r.get(0),
                id: r.get(1),
                name: r.get(2),
                status: r.get(3),
                phase: r.get(4),
                send_at: r.get(5),
                enqueued: r.get(6),
                winner: r.get(7),
                winner_reason: r.get(8),
                test_ends_at: r.get(9),
                last_error: r.get(10),
                auto_paused: r.get(13),
                ab_metric: r.get(11),
                variations: variations
                    .as_ref()
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|v| {
                        let s =
                            |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                        (s("key"), s("template"))
                    })
                    .collect(),
                stats: BTreeMap::new(),
            }
        })
        .collect();
    let stats = futures_util::future::try_join_all(out.iter().map(|b| async move {
        tx.query(
            "SELECT variation, metric, value FROM herald.broadcast_stats($1)",
            &[&b.id],
        )
        .await
    }))
    .await?;
    for (b, rows) in out.iter_mut().zip(stats) {
        for r in rows {
            b.stats
                .entry(r.get(0))
                .or_default()
                .insert(r.get(1), r.get(2));
        }
    }
    Ok(out)
}

/// One pending approval.
#[derive(Clone, Debug)]
pub struct ApprovalRow {
    pub workspace: String,
    pub enrollment: i64,
    pub automation: i64,
    pub automation_name: String,
    pub node: String,
    pub email: String,
    pub waiting_since: String,
    pub times_out_at: Option<String>,
    pub context: Value,
    pub event: Option<Value>,
}

// The oldest 200 of what herald.pending_approvals lists (the same conditions), in two steps: the
// enrollments first, found through (workspace_id, automation_id, status) of the automations that
// have an approval node in some version (a small table), then the contacts and automations of those
// 200 only (the view joins every pending approval's contact before any limit).
const APPROVALS: &str = "
    WITH candidates AS (
        SELECT e.workspace_id, e.id, e.automation_id, e.contact_id, e.current_node, e.updated_at,
               nullif(e.next_run_at, 'infinity') AS times_out_at, e.context, e.event
          FROM herald.enrollments e
         WHERE (e.workspace_id, e.automation_id) IN (
                   SELECT DISTINCT v.workspace_id, v.automation_id FROM herald.automation_versions v
                    WHERE jsonb_path_exists(v.definition, '$.nodes.* ? (@.type == \"approval\")'))
           AND e.status = 'waiting' AND e.wait_kind = 'approval'
    ), top AS (
        SELECT * FROM candidates ORDER BY updated_at, id LIMIT 200
    )
    SELECT t.workspace_id, t.id, t.automation_id, a.name, t.current_node, c.email,
           to_char(t.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"'),
           to_char(t.times_out_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI \"UTC\"'),
           t.context, t.event, (SELECT count(*) FROM candidates)
      FROM top t
      JOIN herald.automations a ON a.workspace_id = t.workspace_id AND a.id = t.automation_id
     CROSS JOIN LATERAL (SELECT x.email FROM herald.contacts x
                          WHERE x.workspace_id = t.workspace_id AND x.id = t.contact_id LIMIT 1) c
     ORDER BY t.updated_at, t.id";

/// The oldest 200 pending approvals, and how many are pending in all.
pub async fn approvals(tx: &Transaction<'_>) -> Result<(Vec<ApprovalRow>, i64)> {
    let rows = tx.query(APPROVALS, &[]).await?;
    let total = rows.first().map_or(0, |r| r.get(10));
    Ok((
        rows.iter()
            .map(|r| ApprovalRow {
                workspace: r.get(0),
                enrollment: r.get(1),
                automation: r.get(2),
                automation_name: r.get(3),
                node: r.get(4),
                email: r.get(5),
                waiting_since: r.get(6),
                times_out_at: r.get(7),
                context: r.get(8),
                event: r.get(9),
            })
            .collect(),
        total,
    ))
}

/// One dead job.
#[derive(Clone, Debug)]
pub struct DeadRow {
    pub workspace: String,
    pub id: i64,
    pub kind: String,
    pub attempt: i32,
    pub error: Option<String>,
    pub automation: Option<i64>,
    pub node: Option<String>,
    pub broadcast: Option<i64>,
    pub email: Option<String>,
    pub died_at: String,
}

// herald.dead_letters (outbox_dead_idx), newest first, with the recipient's address.
const DEAD: &str = "
    SELECT d.workspace_id, d.id, d.kind, d.attempt, d.last_error, d.automation_id, d.node, c.email,
           to_char(d.died_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"'), o.broadcast_id
      FROM herald.dead_letters d
      JOIN herald.outbox o ON o.id = d.id
      LEFT JOIN LATERAL (SELECT x.email FROM herald.contacts x
                          WHERE x.workspace_id = o.workspace_id AND x.id = o.contact_id LIMIT 1) c ON true
     ORDER BY d.died_at DESC, d.id DESC
     LIMIT 200";

pub async fn dead_letters(tx: &Transaction<'_>) -> Result<(Vec<DeadRow>, i64)> {
    let (rows, total) = futures_util::try_join!(
        tx.query(DEAD, &[]),
        tx.query_one("SELECT count(*) FROM herald.dead_letters", &[]),
    )?;
    Ok((
        rows.iter()
            .map(|r| DeadRow {
                workspace: r.get(0),
                id: r.get(1),
                kind: r.get(2),
                attempt: r.get(3),
                error: r.get(4),
                automation: r.get(5),
                node: r.get(6),
                email: r.get(7),
                died_at: r.get(8),
                broadcast: r.get(9),
            })
            .collect(),
        total.get(0),
    ))
}

/// Whether the database still counts the session (its nonce, issued at Unix millisecond
/// `issued_ms`) as signed in: not signed out, and not issued before a "sign out everyone"
/// (sql/admin_sessions.sql). An extension older than 0.15.0 keeps no sign-outs: signed in. Asked
/// before the page's transaction, so that the older extension's missing function aborts nothing.
pub async fn signed_in(
    client: &tokio_postgres::Client,
    nonce: &str,
    issued_ms: i64,
) -> Result<bool> {
    let asked = client
        .query_one(
            "SELECT herald.admin_session_ok($1, to_timestamp($2::bigint / 1000.0))",
            &[&nonce, &issued_ms],
        )
        .await;
    match asked {
        Ok(row) => Ok(row.get(0)),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_FUNCTION) => {
            Ok(true)
        }
        Err(e) => Err(e.into()),
    }
}

/// Signs the session out in the database (every session issued until now with `everyone`), kept
/// until `until` (Unix seconds): when the session(s) would have expired anyway.
pub async fn sign_out(
    client: &tokio_postgres::Client,
    (nonce, operator): (&str, &str),
    until: i64,
    everyone: bool,
) -> Result<()> {
    client
        .execute(
            "SELECT herald.admin_sign_out($1, $2, to_timestamp($3::bigint), $4)",
            &[&nonce, &operator, &until, &everyone],
        )
        .await?;
    Ok(())
}

/// What the buttons do: one call each of herald's own functions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Pause(i64),
    Resume(i64),
    Cancel(i64),
    Decide {
        enrollment: i64,
        approved: bool,
        actor: String,
    },
    Redrive(i64),
}

pub async fn act(client: &Transaction<'_>, action: &Action) -> Result<()> {
    match action {
        Action::Pause(id) => {
            client
                .execute("SELECT herald.pause_broadcast($1)", &[id])
                .await
        }
        Action::Resume(id) => {
            client
                .execute("SELECT herald.resume_broadcast($1)", &[id])
                .await
        }
        Action::Cancel(id) => {
            client
                .execute("SELECT herald.cancel_broadcast($1)", &[id])
                .await
        }
        Action::Decide {
            enrollment,
            approved,
            actor,
        } => {
            client
                .execute(
                    "SELECT herald.decide_approval($1, $2, $3)",
                    &[enrollment, approved, actor],
                )
                .await
        }
        Action::Redrive(id) => {
            client
                .execute("SELECT herald.redrive(ARRAY[$1::bigint])", &[id])
                .await
        }
    }?;
    Ok(())
}

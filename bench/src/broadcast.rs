//! Broadcasts: resolving and enqueueing a broadcast to every contact of a large workspace with ONE
//! `herald.advance_broadcasts` call (chunks of 10,000, each one INSERT … SELECT), how many statements a
//! chunk runs (pg_stat_statements, nested statements tracked), and how long a segment takes to evaluate
//! over the whole workspace.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use serde_json::json;
use tracing::info;

use super::{thousands, Goal};
use herald_sidecar::db::Target;

const WORKSPACE: &str = "bench_broadcast";
const CHUNK: i64 = 10_000;
const GOAL_SECS: &str = "1,000,000-recipient broadcast resolved and enqueued <= 10 s";
const GOAL_STATEMENTS: &str = "enqueue statements per 10,000-row chunk <= 1";
const GOAL_FRESH: &str = "the same straight after the import (never vacuumed or analysed) <= 10 s";

#[derive(Debug, Serialize)]
pub struct Broadcast {
    pub contacts: i64,
    pub setup_secs: f64,
    pub enqueued: i64,
    pub enqueue_secs: f64,
    pub recipients_per_sec: f64,
    /// The same enqueue straight after the contacts were written, before any VACUUM or ANALYZE (the
    /// everyday "import a list, send the newsletter"; autovacuum may not have come by yet).
    pub fresh_enqueue_secs: f64,
    pub chunks: i64,
    /// Calls of the statement that inserts into the outbox, per chunk.
    pub insert_statements_per_chunk: f64,
    /// Every statement run inside advance_broadcasts (the loop's bookkeeping included), per chunk.
    pub all_statements_per_chunk: f64,
    pub segments: Vec<Segment>,
}

#[derive(Debug, Serialize)]
pub struct Segment {
    pub name: String,
    pub matches: i64,
    /// Through audience resolution, in pages of 10,000 (SQL part with indexes, engine for the rest).
    pub audience_secs: f64,
    /// Through the condition engine for every contact, for comparison.
    pub engine_secs: f64,
}

impl Broadcast {
    pub(super) fn goals(&self) -> Vec<Goal> {
        let full = self.contacts >= 1_000_000;
        vec![
            Goal::new(
                GOAL_SECS,
                self.enqueue_secs,
                full && self.enqueue_secs <= 10.0,
            ),
            Goal::new(
                GOAL_FRESH,
                self.fresh_enqueue_secs,
                full && self.fresh_enqueue_secs <= 10.0,
            ),
            Goal::new(
                GOAL_STATEMENTS,
                self.insert_statements_per_chunk,
                self.chunks > 0 && self.insert_statements_per_chunk <= 1.0,
            ),
        ]
    }
}

pub async fn run(target: &Target, small: bool) -> Result<Broadcast> {
    let contacts: i64 = if small { 20_000 } else { 1_000_000 };
    let db = target.connect().await?;
    let started = Instant::now();
    db.execute("SELECT herald.create_workspace($1)", &[&WORKSPACE])
        .await?;
    db.execute(
        "SELECT herald.upsert_template($1, 'news', 'News for {{ contact.email }}', '<p>Hello</p>')",
        &[&WORKSPACE],
    )
    .await?;
    // setup only (not what is measured): plain rows, as an import would leave them
    db.execute(
        "INSERT INTO herald.contacts (workspace_id, email, attributes, tags)
         SELECT $1, 'r' || i || '@broadcast.example',
                jsonb_build_object('plan', CASE WHEN i % 4 = 0 THEN 'pro' ELSE 'free' END, 'cohort', 'c' || i % 100),
                CASE WHEN i % 200 = 0 THEN '{vip}'::text[] ELSE '{}' END
           FROM generate_series(1, $2::bigint) i",
        &[&WORKSPACE, &contacts],
    )
    .await
    .context("creating the broadcast's contacts")?;

    // straight after the import: no VACUUM, no ANALYZE (autovacuum off on the two tables meanwhile)
    db.batch_execute(
        "ALTER TABLE herald.contacts SET (autovacuum_enabled = false);
         ALTER TABLE herald.outbox SET (autovacuum_enabled = false);
         CHECKPOINT",
    )
    .await?;
    let fresh_enqueue_secs = fresh_enqueue(&db, contacts).await?;
    info!("broadcast: {contacts} enqueued in {fresh_enqueue_secs:.1} s straight after the import");
    db.batch_execute(
        "ALTER TABLE herald.contacts RESET (autovacuum_enabled);
         ALTER TABLE herald.outbox RESET (autovacuum_enabled)",
    )
    .await?;

    // the setup's writes are flushed here, not by a checkpoint in the middle of the measurement
    db.batch_execute("VACUUM (ANALYZE) herald.contacts, herald.outbox")
        .await?;
    db.batch_execute("CHECKPOINT").await?;
    let setup_secs = started.elapsed().as_secs_f64();
    info!("broadcast: {contacts} contacts in {setup_secs:.1} s");

    db.batch_execute(
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
         SET pg_stat_statements.track = 'all'",
    )
    .await
    .context("pg_stat_statements (is it in shared_preload_libraries?)")?;
    let id: i64 = db
        .query_one(
            "SELECT herald.create_broadcast($1, $2)",
            &[
                &WORKSPACE,
                &json!({"name": "bench", "template": "news", "audience": "all"}),
            ],
        )
        .await?
        .get(0);
    db.execute("SELECT herald.schedule_broadcast($1)", &[&id])
        .await?;
    db.batch_execute(
        "SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database WHERE datname = current_database()), 0)",
    )
    .await?;
    let started = Instant::now();
    let read: i32 = db
        .query_one(
            "SELECT herald.advance_broadcasts($1)",
            &[&(contacts as i32)],
        )
        .await
        .context("herald.advance_broadcasts")?
        .get(0);
    let enqueue_secs = started.elapsed().as_secs_f64();
    let enqueued: i64 = db
        .query_one(
            "SELECT enqueued FROM herald.broadcasts WHERE id = $1",
            &[&id],
        )
        .await?
        .get(0);
    ensure!(
        read as i64 == contacts && enqueued == contacts,
        "read {read}, enqueued {enqueued} of {contacts}"
    );
    let rows = db
        .query(
            "SELECT s.calls, s.query FROM pg_stat_statements s
              WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND NOT s.toplevel",
            &[],
        )
        .await?;
    let chunks = (contacts + CHUNK - 1) / CHUNK;
    let inserts: i64 = rows
        .iter()
        .filter(|r| r.get::<_, String>(1).contains("INSERT INTO herald.outbox"))
        .map(|r| r.get::<_, i64>(0))
        .sum();
    let all: i64 = rows.iter().map(|r| r.get::<_, i64>(0)).sum();
    info!("broadcast: {enqueued} enqueued in {enqueue_secs:.1} s, {inserts} outbox inserts for {chunks} chunks");

    // segment evaluation over the whole workspace, a broad segment and two narrow ones: through audience
    // resolution (pages of 10,000 in id order, as enqueue reads them; the SQL part of a segment is
    // containment on attributes or tags, which the GIN indexes serve when the segment is narrow), and
    // through the condition engine (Rust) for every contact
    let mut segments = Vec::new();
    for (name, segment, share) in [
        (
            "contact.plan = pro",
            json!({"field": "contact.plan", "op": "eq", "value": "pro"}),
            0.25,
        ),
        (
            "contact.cohort in [c7, c8]",
            json!({"field": "contact.cohort", "op": "in", "value": ["c7", "c8"]}),
            0.02,
        ),
        (
            "contact.tags contains vip",
            json!({"field": "contact.tags", "op": "contains", "value": "vip"}),
            0.005,
        ),
    ] {
        segments.push(segment_figures(&db, name, &segment, contacts, share).await?);
    }
    // leave nothing pending for later sections: cancel moves the first chunk, advance settles the rest
    db.execute("SELECT herald.cancel_broadcast($1)", &[&id])
        .await?;
    db.execute(
        "SELECT herald.advance_broadcasts($1)",
        &[&(contacts as i32)],
    )
    .await?;
    let left: i64 = db
        .query_one(
            "SELECT count(*) FROM herald.outbox WHERE broadcast_id = $1 AND status = 'pending'",
            &[&id],
        )
        .await?
        .get(0);
    ensure!(
        left == 0,
        "{left} jobs of the cancelled broadcast still pending"
    );
    Ok(Broadcast {
        contacts,
        setup_secs,
        enqueued,
        enqueue_secs,
        recipients_per_sec: enqueued as f64 / enqueue_secs,
        fresh_enqueue_secs,
        chunks,
        insert_statements_per_chunk: inserts as f64 / chunks as f64,
        all_statements_per_chunk: all as f64 / chunks as f64,
        segments,
    })
}

/// One broadcast to every contact, enqueued by one advance_broadcasts call and timed; then cancelled and
/// its jobs deleted, so the measurement after VACUUM ANALYZE starts from the same outbox.
async fn fresh_enqueue(db: &tokio_postgres::Client, contacts: i64) -> Result<f64> {
    let id: i64 = db
        .query_one(
            "SELECT herald.create_broadcast($1, $2)",
            &[
                &WORKSPACE,
                &json!({"name": "fresh", "template": "news", "audience": "all"}),
            ],
        )
        .await?
        .get(0);
    db.execute("SELECT herald.schedule_broadcast($1)", &[&id])
        .await?;
    let started = Instant::now();
    let read: i32 = db
        .query_one(
            "SELECT herald.advance_broadcasts($1)",
            &[&(contacts as i32)],
        )
        .await
        .context("herald.advance_broadcasts straight after the import")?
        .get(0);
    let secs = started.elapsed().as_secs_f64();
    ensure!(
        read as i64 == contacts,
        "read {read} of {contacts} straight after the import"
    );
    db.execute("SELECT herald.cancel_broadcast($1)", &[&id])
        .await?;
    db.execute(
        "SELECT herald.advance_broadcasts($1)",
        &[&(contacts as i32)],
    )
    .await?;
    db.execute("DELETE FROM herald.outbox WHERE broadcast_id = $1", &[&id])
        .await?;
    Ok(secs)
}

async fn segment_figures(
    db: &tokio_postgres::Client,
    name: &str,
    segment: &serde_json::Value,
    contacts: i64,
    share: f64,
) -> Result<Segment> {
    let id: i64 = db
        .query_one(
            "SELECT herald.create_broadcast($1, $2)",
            &[
                &WORKSPACE,
                &json!({"name": name, "template": "news", "audience": {"segment": segment}}),
            ],
        )
        .await?
        .get(0);
    let started = Instant::now();
    let (mut matches, mut cursor) = (0i64, 0i64);
    loop {
        let row = db
            .query_one(
                "SELECT count(*), coalesce(max(a.contact_id), 0)
                   FROM herald.broadcasts b, herald._audience_page(b, $2, $3::int) a WHERE b.id = $1",
                &[&id, &cursor, &(CHUNK as i32)],
            )
            .await?;
        let (n, last): (i64, i64) = (row.get(0), row.get(1));
        matches += n;
        cursor = last;
        if n < CHUNK {
            break;
        }
    }
    let audience_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let engine_matches: i64 = db
        .query_one(
            "SELECT count(*) FROM herald.contacts c
              WHERE c.workspace_id = $1
                AND herald._matches($2, herald._contact_facts(c.email, c.attributes, c.timezone, c.tags), NULL, NULL)",
            &[&WORKSPACE, segment],
        )
        .await?
        .get(0);
    let engine_secs = started.elapsed().as_secs_f64();
    let expected = (contacts as f64 * share).round() as i64;
    ensure!(
        matches == expected && engine_matches == matches,
        "segment {name} matched {matches} (audience) and {engine_matches} (engine), expected {expected}"
    );
    info!(
        "broadcast: segment {name}: {matches} in {audience_secs:.2} s (engine {engine_secs:.2} s)"
    );
    Ok(Segment {
        name: name.to_string(),
        matches,
        audience_secs,
        engine_secs,
    })
}

pub(super) fn render(o: &mut String, b: &Broadcast) {
    let goals = b.goals();
    let _ = writeln!(
        o,
        "\n9. Broadcast: one advance_broadcasts() call resolves and enqueues {} contacts (chunks of {})",
        thousands(b.contacts as f64),
        thousands(CHUNK as f64)
    );
    let _ = writeln!(
        o,
        "  enqueued {} in {:.2} s = {} recipients/s; {} chunks, {:.1} outbox INSERT per chunk, {:.1} statements in all per chunk",
        thousands(b.enqueued as f64),
        b.enqueue_secs,
        thousands(b.recipients_per_sec),
        b.chunks,
        b.insert_statements_per_chunk,
        b.all_statements_per_chunk
    );
    let _ = writeln!(
        o,
        "  the same straight after the import (never vacuumed or analysed): {:.2} s",
        b.fresh_enqueue_secs
    );
    for s in &b.segments {
        let _ = writeln!(
            o,
            "  segment {:<28} over {} contacts ({:>7} match): {:.2} s audience resolution (SQL + indexes), {:.2} s condition engine per contact = {:.1}x",
            s.name,
            thousands(b.contacts as f64),
            thousands(s.matches as f64),
            s.audience_secs,
            s.engine_secs,
            s.engine_secs / s.audience_secs
        );
    }
    for g in goals {
        let _ = writeln!(
            o,
            "  goal: {:<62} {:>7.2}  {}",
            g.goal,
            g.value,
            if b.contacts < 1_000_000 && (g.goal == GOAL_SECS || g.goal == GOAL_FRESH) {
                "n/a (--small)"
            } else {
                g.verdict()
            }
        );
    }
}

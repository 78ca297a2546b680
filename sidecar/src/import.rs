//! `herald import FILE.csv --workspace W`: contacts from a CSV file, streamed.
//!
//! The file is read row by row and streamed with COPY into a temporary table, one chunk at a time; each
//! chunk then goes through `herald.upsert_contacts` in one call, so the import follows exactly the rules
//! of the SQL API (normalised emails, merged attributes, reasons for rejected rows, contact events).
//! Memory stays flat whatever the file size.
//!
//! Columns: `email` (required), `timezone` (optional), every other column becomes an attribute (empty
//! cells are left out, so they never erase a stored value).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use futures_util::SinkExt;
use serde_json::{Map, Value};
use tokio_postgres::Client;

use crate::db::Target;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// CSV file with a header row: email, optional timezone, and any attribute columns.
    pub file: PathBuf,
    /// The workspace the contacts belong to.
    #[arg(long)]
    pub workspace: String,
    /// Rows per upsert_contacts call.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub chunk: u32,
}

/// What an import did, summed over its chunks.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub rows: u64,
    pub inserted: i64,
    pub updated: i64,
    pub rejected: i64,
    /// The first rejected rows: (CSV line, reason).
    pub rejections: Vec<(u64, String)>,
}

/// How many rejected rows the summary names; the rest are counted (and kept in herald.contact_rejections).
const SHOWN_REJECTIONS: usize = 20;

pub async fn run(target: &Target, args: ImportArgs) -> Result<()> {
    let db = target.connect_herald().await?;
    let file = std::fs::File::open(&args.file)
        .with_context(|| format!("opening {}", args.file.display()))?;
    let summary = import(&db, &args.workspace, file, args.chunk as usize, progress).await?;
    eprintln!();
    println!(
        "imported {} rows into workspace {}: {} inserted, {} updated, {} rejected",
        summary.rows, args.workspace, summary.inserted, summary.updated, summary.rejected
    );
    for (line, reason) in &summary.rejections {
        println!("  line {line}: {reason}");
    }
    if summary.rejected as usize > summary.rejections.len() {
        println!("  … all reasons are in herald.contact_rejections");
    }
    Ok(())
}

fn progress(done: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    eprint!("\r{done} rows ({:.0} rows/s)", done as f64 / secs);
    let _ = std::io::stderr().flush();
}

/// Streams `reader` into the workspace; `on_progress` is called after each chunk.
pub async fn import(
    db: &Client,
    workspace: &str,
    reader: impl std::io::Read,
    chunk: usize,
    on_progress: impl Fn(u64, Instant),
) -> Result<Summary> {
    let started = Instant::now();
    let exists: bool = db
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM herald.workspaces WHERE id = $1)",
            &[&workspace],
        )
        .await?
        .get(0);
    if !exists {
        bail!("unknown workspace {workspace:?}: create it with SELECT herald.create_workspace('{workspace}')");
    }
    let mut csv = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(reader);
    let headers: Vec<String> = csv
        .headers()
        .context("reading the CSV header")?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let email_col = headers
        .iter()
        .position(|h| h.eq_ignore_ascii_case("email"))
        .with_context(|| {
            format!(
                "the CSV header has no email column (columns: {})",
                headers.join(", ")
            )
        })?;
    let tz_col = headers
        .iter()
        .position(|h| h.eq_ignore_ascii_case("timezone"));

    db.batch_execute(
        "CREATE TEMP TABLE IF NOT EXISTS herald_import (line bigint, email text, attributes jsonb, timezone text);
         TRUNCATE herald_import",
    )
    .await?;
    let mut summary = Summary::default();
    let mut records = csv.records();
    loop {
        // one chunk: CSV rows re-encoded as COPY csv rows (line, email, attributes json, timezone)
        let mut buffer = csv::WriterBuilder::new()
            .has_headers(false)
            .from_writer(Vec::new());
        let mut n = 0;
        for record in records.by_ref().take(chunk) {
            let line = summary.rows + n as u64 + 2; // 1-based, after the header
            let record = record.with_context(|| format!("reading CSV line {line}"))?;
            let mut attributes = Map::new();
            for (i, cell) in record.iter().enumerate() {
                if i != email_col && Some(i) != tz_col && !cell.is_empty() {
                    attributes.insert(headers[i].clone(), Value::String(cell.to_string()));
                }
            }
            let tz = tz_col
                .map(|i| record.get(i).unwrap_or_default())
                .unwrap_or_default();
            buffer.write_record([
                line.to_string().as_str(),
                record.get(email_col).unwrap_or_default(),
                Value::Object(attributes).to_string().as_str(),
                tz,
            ])?;
            n += 1;
        }
        if n == 0 {
            break;
        }
        let first_line = summary.rows + 2;
        let bytes = buffer.into_inner().context("encoding a chunk")?;
        // one transaction per chunk: its rejections are the rows of batch txid_current()
        db.batch_execute("BEGIN").await?;
        let sink = db
            .copy_in(
                "COPY herald_import (line, email, attributes, timezone) FROM STDIN (FORMAT csv)",
            )
            .await?;
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from(bytes)).await?;
        sink.finish().await.context("streaming a chunk with COPY")?;
        let row = db
            .query_one(
                "WITH chunk AS (DELETE FROM herald_import RETURNING line, email, attributes, timezone)
                 SELECT * FROM herald.upsert_contacts($1, (
                     SELECT coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                                'email', c.email, 'attributes', c.attributes, 'timezone', nullif(c.timezone, '')))
                            ORDER BY c.line), '[]')
                       FROM chunk c))",
                &[&workspace],
            )
            .await
            .context("upsert_contacts")?;
        if row.get::<_, i64>(2) > 0 && summary.rejections.len() < SHOWN_REJECTIONS {
            for r in db
                .query(
                    "SELECT position, reason FROM herald.contact_rejections
                      WHERE workspace_id = $1 AND batch = txid_current() ORDER BY position LIMIT $2",
                    &[&workspace, &(SHOWN_REJECTIONS as i64)],
                )
                .await?
            {
                summary.rejections.push((first_line + r.get::<_, i32>(0) as u64, r.get(1)));
            }
            summary.rejections.truncate(SHOWN_REJECTIONS);
        }
        db.batch_execute("COMMIT").await?;
        summary.rows += n as u64;
        summary.inserted += row.get::<_, i64>(0);
        summary.updated += row.get::<_, i64>(1);
        summary.rejected += row.get::<_, i64>(2);
        on_progress(summary.rows, started);
    }
    Ok(summary)
}

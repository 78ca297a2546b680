//! `herald import FILE.csv --workspace W`: contacts from a CSV file, streamed.
//!
//! Three steps, memory flat whatever the file size:
//! 1. The file is read row by row and streamed with one COPY into a temporary table `herald_import`
//!    (line, email, attributes, timezone, reason). A row that cannot be a contact (a wrong number of
//!    fields, bytes that are not UTF-8) is staged with its `reason` and counted as rejected; the run goes
//!    on. Every row carries its CSV line: the physical line it starts on, counting empty lines and the
//!    lines inside multi-line quoted fields.
//! 2. Duplicate emails within the file (compared as `upsert_contacts` does: trimmed, lower-cased) are
//!    found in one statement: **the last occurrence wins**, every earlier one is rejected as
//!    "duplicate of line N".
//! 3. The staged rows go through `herald.upsert_contacts` in chunks of `--chunk` rows, one transaction
//!    per chunk, in line order, so the import follows exactly the rules of the SQL API (normalised
//!    emails, merged attributes, reasons for rejected rows, contact events). With `--dry-run` each chunk's
//!    transaction is rolled back: the same validation (email syntax, time zones, sizes), the same counts,
//!    nothing kept (identity sequences still advance).
//!
//! Header: trimmed, lower-cased, a UTF-8 byte-order mark dropped; `email` is required, `timezone`
//! optional, every other column becomes an attribute (empty cells are left out, so they never erase a
//! stored value). A column without a name, or two columns with the same name, stop the import before
//! anything is written.
//!
//! If the run stops half-way (the database goes away), the summary still says what was committed: the
//! chunks are committed in line order, so everything up to the last committed line is in, nothing after.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::rc::Rc;
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
    /// Rows per upsert_contacts call (and per transaction).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub chunk: u32,
    /// Field delimiter: `,` (default), `;`, `|`, or a tab (`\t` or `tab`).
    #[arg(long, default_value = ",", value_parser = parse_delimiter)]
    pub delimiter: u8,
    /// Validate every row exactly as an import would (upsert_contacts in transactions that are rolled
    /// back) and print the same summary, writing nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `--delimiter`: one of `,` `;` `|` or a tab, given as a tab character, `\t` or `tab`.
pub fn parse_delimiter(s: &str) -> Result<u8, String> {
    match s {
        "," => Ok(b','),
        ";" => Ok(b';'),
        "|" => Ok(b'|'),
        "\t" | "\\t" => Ok(b'\t'),
        _ if s.eq_ignore_ascii_case("tab") => Ok(b'\t'),
        _ => Err(format!(
            "{s:?} is not a supported delimiter; use ',', ';', '|' or a tab ('\\t' or 'tab')"
        )),
    }
}

/// The header, normalised: which column is the email, which the time zone, and the attribute names.
#[derive(Debug, PartialEq, Eq)]
pub struct Columns {
    /// Every column's name: byte-order mark dropped, trimmed, lower-cased.
    pub names: Vec<String>,
    pub email: usize,
    pub timezone: Option<usize>,
}

/// Normalises a header row; refuses a column without a name, two columns with the same name and a
/// header without `email`.
pub fn normalise_header<S: AsRef<str>>(raw: &[S]) -> Result<Columns> {
    let names: Vec<String> = raw
        .iter()
        .map(|h| {
            h.as_ref()
                .trim_start_matches('\u{feff}')
                .trim()
                .to_lowercase()
        })
        .collect();
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() {
            bail!(
                "column {} of the CSV header has no name (every column needs one; remove trailing delimiters)",
                i + 1
            );
        }
        if let Some(j) = names[..i].iter().position(|n| n == name) {
            bail!(
                "columns {} and {} of the CSV header are both named {name:?} (names are compared trimmed and lower-cased)",
                j + 1,
                i + 1
            );
        }
    }
    let email = names.iter().position(|h| h == "email").with_context(|| {
        format!(
            "the CSV header has no email column (columns: {}); is the delimiter right? (--delimiter)",
            names.join(", ")
        )
    })?;
    let timezone = names.iter().position(|h| h == "timezone");
    Ok(Columns {
        names,
        email,
        timezone,
    })
}

/// One data row of the file, ready to be staged.
#[derive(Debug, PartialEq, Eq)]
pub enum Row {
    /// A row to hand to upsert_contacts.
    Contact {
        line: u64,
        email: String,
        attributes: Map<String, Value>,
        timezone: String,
    },
    /// A row that cannot be a contact, with the reason.
    Rejected { line: u64, reason: String },
}

#[cfg(test)]
impl Row {
    pub fn line(&self) -> u64 {
        match self {
            Row::Contact { line, .. } | Row::Rejected { line, .. } => *line,
        }
    }
}

/// The offsets of the newlines the CSV reader has been given but not yet passed: enough to say on which
/// line any byte it still holds is.
#[derive(Default)]
struct Newlines {
    /// Newlines dropped from `offsets` (all before the reader's position).
    passed: u64,
    offsets: VecDeque<u64>,
}

impl Newlines {
    /// The 1-based line the byte at `offset` is on.
    fn line_of(&self, offset: u64) -> u64 {
        1 + self.passed + self.offsets.partition_point(|&o| o < offset) as u64
    }

    /// Forgets newlines before `offset`.
    fn pass(&mut self, offset: u64) {
        while self.offsets.front().is_some_and(|&o| o < offset) {
            self.offsets.pop_front();
            self.passed += 1;
        }
    }
}

/// A reader that notes where the newlines are, for [`CsvRows`] to number the rows.
struct Tracking<R> {
    inner: R,
    offset: u64,
    newlines: Rc<RefCell<Newlines>>,
}

impl<R: Read> Read for Tracking<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut newlines = self.newlines.borrow_mut();
        for (i, _) in buf[..n].iter().enumerate().filter(|(_, &b)| b == b'\n') {
            newlines.offsets.push_back(self.offset + i as u64);
        }
        self.offset += n as u64;
        Ok(n)
    }
}

/// The rows of a CSV file, each with the physical line it starts on.
///
/// The csv crate's record position is where the reader *resumed*, before it skipped empty lines (and,
/// with CRLF, the previous record's `\n`), so it is one too low after an empty line. The line a record
/// ends on is exact (the line of its last byte), and the record starts that many lines earlier as its
/// fields hold newlines (only quoted fields can).
pub struct CsvRows<R> {
    csv: csv::Reader<Tracking<std::io::BufReader<R>>>,
    newlines: Rc<RefCell<Newlines>>,
    record: csv::ByteRecord,
    pub columns: Columns,
}

impl<R: Read> CsvRows<R> {
    /// Reads and checks the header.
    pub fn new(reader: R, delimiter: u8) -> Result<Self> {
        let mut buffered = std::io::BufReader::with_capacity(64 * 1024, reader);
        if buffered
            .fill_buf()
            .context("reading the CSV file")?
            .starts_with(b"\xEF\xBB\xBF")
        {
            buffered.consume(3);
        }
        let newlines = Rc::new(RefCell::new(Newlines::default()));
        let csv = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(delimiter)
            .from_reader(Tracking {
                inner: buffered,
                offset: 0,
                newlines: newlines.clone(),
            });
        let mut rows = CsvRows {
            csv,
            newlines,
            record: csv::ByteRecord::new(),
            columns: Columns {
                names: vec![],
                email: 0,
                timezone: None,
            },
        };
        let Some(_) = rows.next_record().context("reading the CSV header")? else {
            bail!("the CSV file is empty (it needs a header row with an email column)");
        };
        let header: Vec<&str> = rows
            .record
            .iter()
            .map(std::str::from_utf8)
            .collect::<Result<_, _>>()
            .context("the CSV header is not valid UTF-8 (save the file as UTF-8)")?;
        rows.columns = normalise_header(&header)?;
        Ok(rows)
    }

    /// The next record into `self.record`, with its first line.
    fn next_record(&mut self) -> Result<Option<u64>> {
        if !self.csv.read_byte_record(&mut self.record)? {
            return Ok(None);
        }
        let end = self.csv.position().byte();
        let mut newlines = self.newlines.borrow_mut();
        let last_line = newlines.line_of(end.saturating_sub(1));
        let inside = self
            .record
            .as_slice()
            .iter()
            .filter(|&&b| b == b'\n')
            .count() as u64;
        newlines.pass(end);
        Ok(Some(last_line - inside))
    }

    /// The next data row; an error only when the file cannot be read at all.
    pub fn next_row(&mut self) -> Result<Option<Row>> {
        let Some(line) = self
            .next_record()
            .context("reading the CSV file after the last line read")?
        else {
            return Ok(None);
        };
        let wanted = self.columns.names.len();
        if self.record.len() != wanted {
            return Ok(Some(Row::Rejected {
                line,
                reason: format!(
                    "has {} field{}, the header has {wanted}",
                    self.record.len(),
                    if self.record.len() == 1 { "" } else { "s" }
                ),
            }));
        }
        let Ok(cells) = self
            .record
            .iter()
            .map(std::str::from_utf8)
            .collect::<Result<Vec<&str>, _>>()
        else {
            return Ok(Some(Row::Rejected {
                line,
                reason: "is not valid UTF-8 (save the file as UTF-8)".into(),
            }));
        };
        let mut attributes = Map::new();
        for (i, cell) in cells.iter().enumerate() {
            if i != self.columns.email && Some(i) != self.columns.timezone && !cell.is_empty() {
                attributes.insert(
                    self.columns.names[i].clone(),
                    Value::String(cell.to_string()),
                );
            }
        }
        Ok(Some(Row::Contact {
            line,
            email: cells[self.columns.email].to_string(),
            attributes,
            timezone: self
                .columns
                .timezone
                .map(|i| cells[i].to_string())
                .unwrap_or_default(),
        }))
    }
}

/// What an import did, summed over its committed chunks (a dry run: its rolled-back chunks).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Data rows in the file (empty lines are not rows).
    pub rows: u64,
    /// Rows of the chunks that were committed (all of them unless the run stopped).
    pub done: u64,
    /// The last line of the last committed chunk.
    pub last_line: u64,
    pub inserted: i64,
    pub updated: i64,
    pub rejected: i64,
    /// The rejected rows with the lowest lines: (CSV line, reason).
    pub rejections: Vec<(u64, String)>,
    pub dry_run: bool,
    /// Why the run stopped before the end, if it did.
    pub stopped: Option<String>,
}

/// How many rejected rows the summary names; the rest are counted.
const SHOWN_REJECTIONS: usize = 20;

impl Summary {
    fn note_rejections(&mut self, more: impl IntoIterator<Item = (u64, String)>) {
        self.rejections.extend(more);
        self.rejections.sort();
        self.rejections.truncate(SHOWN_REJECTIONS);
    }

    pub fn render(&self, workspace: &str) -> String {
        let counts = format!(
            "{} inserted, {} updated, {} rejected",
            self.inserted, self.updated, self.rejected
        );
        let mut out = match (&self.stopped, self.dry_run) {
            (None, false) => format!(
                "imported {} rows into workspace {workspace}: {counts}\n",
                self.rows
            ),
            (None, true) => format!(
                "dry run, nothing written: {} rows for workspace {workspace} would be {counts}\n",
                self.rows
            ),
            (Some(_), false) => format!(
                "import stopped: {} of {} rows done (lines up to {} are in, none after): {counts}\n",
                self.done, self.rows, self.last_line
            ),
            (Some(_), true) => format!(
                "dry run stopped, nothing written: {} of {} rows checked (lines up to {}): {counts}\n",
                self.done, self.rows, self.last_line
            ),
        };
        for (line, reason) in &self.rejections {
            out.push_str(&format!("  line {line}: {reason}\n"));
        }
        if self.rejected as usize > self.rejections.len() {
            out.push_str(&format!(
                "  … and {} more{}\n",
                self.rejected as usize - self.rejections.len(),
                if self.dry_run {
                    ""
                } else {
                    " (what upsert_contacts rejected is also in herald.contact_rejections)"
                }
            ));
        }
        if let Some(why) = &self.stopped {
            out.push_str(&format!("  stopped by: {why}\n"));
        }
        out
    }
}

pub async fn run(target: &Target, args: ImportArgs) -> Result<()> {
    let db = target.connect_herald().await?;
    let file = std::fs::File::open(&args.file)
        .with_context(|| format!("opening {}", args.file.display()))?;
    let summary = import(
        &db,
        &args.workspace,
        file,
        Options {
            delimiter: args.delimiter,
            chunk: args.chunk as usize,
            dry_run: args.dry_run,
        },
        progress,
    )
    .await?;
    eprintln!();
    print!("{}", summary.render(&args.workspace));
    if let Some(why) = summary.stopped {
        match summary.last_line {
            0 => bail!("the import stopped before any row was done: {why}"),
            n => bail!("the import stopped after line {n}: {why}"),
        }
    }
    Ok(())
}

fn progress(done: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    eprint!("\r{done} rows ({:.0} rows/s)", done as f64 / secs);
    let _ = std::io::stderr().flush();
}

/// How to read and import a file.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub delimiter: u8,
    pub chunk: usize,
    pub dry_run: bool,
}

/// Bytes of COPY data sent at a time while staging.
const COPY_BATCH: usize = 1 << 20;

/// Stages `reader` and upserts it into the workspace in chunks; `on_progress` is called after each
/// chunk. An error means nothing was written (no workspace, a bad header, the file unreadable, the
/// database gone while staging); a stop after that is in [`Summary::stopped`], with what was done.
pub async fn import(
    db: &Client,
    workspace: &str,
    reader: impl std::io::Read,
    options: Options,
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
    let mut rows = CsvRows::new(reader, options.delimiter)?;
    let mut summary = Summary {
        dry_run: options.dry_run,
        ..Summary::default()
    };
    stage(db, &mut rows, &mut summary)
        .await
        .context("staging the file (nothing was imported)")?;

    let mut last: i64 = 0;
    loop {
        match chunk(db, workspace, last, options).await {
            Ok(None) => break,
            Ok(Some(done)) => {
                summary.done += done.rows;
                summary.last_line = done.last_line as u64;
                summary.inserted += done.inserted;
                summary.updated += done.updated;
                summary.rejected += done.rejected;
                summary.note_rejections(done.rejections);
                last = done.last_line;
                on_progress(summary.done, started);
            }
            Err(e) => {
                // best effort: the chunk's transaction is gone with the connection anyway
                let _ = db.batch_execute("ROLLBACK").await;
                summary.stopped = Some(format!("{e:#}"));
                break;
            }
        }
    }
    Ok(summary)
}

/// Step 1 and 2: every row into `herald_import` with one COPY, then the duplicates marked.
async fn stage<R: Read>(db: &Client, rows: &mut CsvRows<R>, summary: &mut Summary) -> Result<()> {
    db.batch_execute(
        "CREATE TEMP TABLE IF NOT EXISTS herald_import
             (line bigint PRIMARY KEY, email text, attributes jsonb, timezone text, reason text);
         TRUNCATE herald_import",
    )
    .await?;
    let sink = db
        .copy_in(
            "COPY herald_import (line, email, attributes, timezone, reason) FROM STDIN (FORMAT csv)",
        )
        .await?;
    futures_util::pin_mut!(sink);
    let writer = || {
        csv::WriterBuilder::new()
            .has_headers(false)
            .from_writer(Vec::with_capacity(COPY_BATCH + 64 * 1024))
    };
    let mut buffer = writer();
    while let Some(row) = rows.next_row()? {
        summary.rows += 1;
        // an empty cell is NULL to COPY: a missing email or time zone, no reason
        match row {
            Row::Contact {
                line,
                email,
                attributes,
                timezone,
            } => buffer.write_record([
                line.to_string().as_str(),
                &email,
                &Value::Object(attributes).to_string(),
                &timezone,
                "",
            ])?,
            Row::Rejected { line, reason } => {
                buffer.write_record([line.to_string().as_str(), "", "", "", &reason])?
            }
        }
        if buffer.get_ref().len() >= COPY_BATCH {
            let bytes = std::mem::replace(&mut buffer, writer())
                .into_inner()
                .context("encoding the rows")?;
            sink.send(bytes::Bytes::from(bytes)).await?;
        }
    }
    let bytes = buffer.into_inner().context("encoding the rows")?;
    sink.send(bytes::Bytes::from(bytes)).await?;
    sink.finish()
        .await
        .context("streaming the rows with COPY")?;
    // duplicates, compared as upsert_contacts compares emails (herald._normalize_email): the last wins
    db.batch_execute(
        "UPDATE herald_import i
            SET reason = format('duplicate of line %s (%s), which is imported instead', d.keep, d.email)
           FROM (SELECT line, lower(btrim(email)) AS email,
                        max(line) OVER (PARTITION BY lower(btrim(email))) AS keep
                   FROM herald_import WHERE reason IS NULL AND btrim(email) <> '') d
          WHERE i.line = d.line AND d.line <> d.keep;
         ANALYZE herald_import",
    )
    .await
    .context("finding duplicate emails")?;
    Ok(())
}

/// What one chunk did.
struct Chunk {
    rows: u64,
    last_line: i64,
    inserted: i64,
    updated: i64,
    rejected: i64,
    rejections: Vec<(u64, String)>,
}

/// The staged rows after line `after`, at most `chunk` of them, through upsert_contacts in one
/// transaction (rolled back in a dry run). None when no rows are left.
async fn chunk(
    db: &Client,
    workspace: &str,
    after: i64,
    options: Options,
) -> Result<Option<Chunk>> {
    let bounds = db
        .query_one(
            "SELECT max(line), count(*) FROM
                (SELECT line FROM herald_import WHERE line > $1 ORDER BY line LIMIT $2) s",
            &[&after, &(options.chunk as i64)],
        )
        .await?;
    let Some(upper) = bounds.get::<_, Option<i64>>(0) else {
        return Ok(None);
    };
    let span = format!("lines {}–{upper}", after + 1);
    // rows rejected while reading the file (ragged, not UTF-8) or as duplicates
    let staged = db
        .query(
            "SELECT line, reason, count(*) OVER () FROM herald_import
              WHERE line > $1 AND line <= $2 AND reason IS NOT NULL ORDER BY line LIMIT $3",
            &[&after, &upper, &(SHOWN_REJECTIONS as i64)],
        )
        .await?;
    let mut rejections: Vec<(u64, String)> = staged
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
        .collect();
    let staged_rejected = staged.first().map_or(0, |r| r.get::<_, i64>(2));

    db.batch_execute("BEGIN").await?;
    let row = db
        .query_one(
            "WITH good AS (SELECT line, email, attributes, timezone FROM herald_import
                            WHERE line > $2 AND line <= $3 AND reason IS NULL)
             SELECT u.inserted, u.updated, u.rejected,
                    (SELECT coalesce(array_agg(g.line ORDER BY g.line), '{}') FROM good g)
               FROM herald.upsert_contacts($1, (
                        SELECT coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                                   'email', g.email, 'attributes', g.attributes, 'timezone', g.timezone))
                               ORDER BY g.line), '[]')
                          FROM good g)) u",
            &[&workspace, &after, &upper],
        )
        .await
        .with_context(|| format!("upsert_contacts of {span}"))?;
    let (inserted, updated, rejected): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    if rejected > 0 {
        // rows of one call share batch = txid_current(); position indexes the chunk's good lines
        let lines: Vec<i64> = row.get(3);
        for r in db
            .query(
                "SELECT position, reason FROM herald.contact_rejections
                  WHERE workspace_id = $1 AND batch = txid_current() ORDER BY position LIMIT $2",
                &[&workspace, &(SHOWN_REJECTIONS as i64)],
            )
            .await?
        {
            let line = lines.get(r.get::<_, i32>(0) as usize).copied().unwrap_or(0);
            rejections.push((line as u64, r.get(1)));
        }
    }
    let end = if options.dry_run {
        "ROLLBACK"
    } else {
        "COMMIT"
    };
    db.batch_execute(end).await.with_context(|| {
        format!("{end} of {span} (if the connection was lost, they may or may not be in)")
    })?;
    Ok(Some(Chunk {
        rows: bounds.get::<_, i64>(1) as u64,
        last_line: upper,
        inserted,
        updated,
        rejected: rejected + staged_rejected,
        rejections,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(text: &str, delimiter: u8) -> Vec<Row> {
        let mut r = CsvRows::new(text.as_bytes(), delimiter).unwrap();
        let mut out = vec![];
        while let Some(row) = r.next_row().unwrap() {
            out.push(row);
        }
        out
    }

    fn lines(text: &str) -> Vec<u64> {
        rows(text, b',').iter().map(Row::line).collect()
    }

    #[test]
    fn delimiters() {
        assert_eq!(parse_delimiter(","), Ok(b','));
        assert_eq!(parse_delimiter(";"), Ok(b';'));
        assert_eq!(parse_delimiter("|"), Ok(b'|'));
        assert_eq!(parse_delimiter("\t"), Ok(b'\t'));
        assert_eq!(parse_delimiter("\\t"), Ok(b'\t'));
        assert_eq!(parse_delimiter("tab"), Ok(b'\t'));
        assert_eq!(parse_delimiter("TAB"), Ok(b'\t'));
        for bad in ["", ":", ",,", "comma", " "] {
            let e = parse_delimiter(bad).unwrap_err();
            assert!(e.contains("not a supported delimiter"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn header_is_normalised() {
        let c = normalise_header(&["\u{feff}Email", " Plan ", "TimeZone", "first_name"]).unwrap();
        assert_eq!(c.names, ["email", "plan", "timezone", "first_name"]);
        assert_eq!((c.email, c.timezone), (0, Some(2)));
        let c = normalise_header(&["name", "EMAIL"]).unwrap();
        assert_eq!((c.email, c.timezone), (1, None));
    }

    #[test]
    fn header_faults() {
        let e = normalise_header(&["email", "Plan", " plan"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("columns 2 and 3") && e.contains("\"plan\""),
            "{e}"
        );
        let e = normalise_header(&["Email", "email"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("columns 1 and 2"), "{e}");
        let e = normalise_header(&["email", "plan", ""])
            .unwrap_err()
            .to_string();
        assert!(e.contains("column 3") && e.contains("no name"), "{e}");
        let e = normalise_header(&["mail", "plan"]).unwrap_err().to_string();
        assert!(
            e.contains("no email column") && e.contains("mail, plan"),
            "{e}"
        );
        // a wrong delimiter reads the header as one column: say so
        let e = CsvRows::new("email;plan\na@b.co;pro\n".as_bytes(), b',')
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--delimiter"), "{e}");
        assert!(CsvRows::new("".as_bytes(), b',').is_err());
    }

    #[test]
    fn bom_and_case_in_the_file() {
        let r = rows("\u{feff}Email,Plan\nA@B.co,Pro\n", b',');
        let Row::Contact {
            email, attributes, ..
        } = &r[0]
        else {
            panic!("{r:?}")
        };
        assert_eq!(email, "A@B.co");
        assert_eq!(attributes.get("plan"), Some(&Value::String("Pro".into())));
        // a quoted header after the BOM
        let r = rows("\u{feff}\"Email\",\"Plan\"\na@b.co,pro\n", b',');
        assert!(matches!(&r[0], Row::Contact { email, .. } if email == "a@b.co"));
    }

    #[test]
    fn line_numbers_count_every_physical_line() {
        assert_eq!(lines("email\na@b.co\nc@d.co\n"), [2, 3]);
        // empty lines are skipped but counted
        assert_eq!(lines("email\n\na@b.co\n\n\nc@d.co\n"), [3, 6]);
        assert_eq!(lines("\n\nemail\na@b.co\n"), [4]);
        // no newline at the end
        assert_eq!(lines("email\na@b.co\nc@d.co"), [2, 3]);
        // CRLF, with empty lines
        assert_eq!(lines("email\r\na@b.co\r\n\r\nc@d.co\r\n"), [2, 4]);
        // quoted fields over several lines: a row is numbered by the line it starts on
        let text =
            "email,note\na@b.co,\"one\ntwo\n\nthree\"\nc@d.co,x\n\n\"e@f.co\",\"\r\n\"\ng@h.co,y";
        assert_eq!(lines(text), [2, 6, 8, 10]);
        // the reader's buffer boundaries do not matter
        let mut big = String::from("email,note\n");
        let mut expected = vec![];
        let mut line = 2;
        for i in 0..5000 {
            if i % 7 == 0 {
                big.push('\n');
                line += 1;
            }
            expected.push(line);
            if i % 11 == 0 {
                big.push_str(&format!("p{i}@x.co,\"a\nb\"\n"));
                line += 2;
            } else {
                big.push_str(&format!("p{i}@x.co,{}\n", "z".repeat(i % 300)));
                line += 1;
            }
        }
        assert_eq!(lines(&big), expected);
    }

    #[test]
    fn ragged_and_non_utf8_rows_are_rejected_rows() {
        let r = rows(
            "email,plan\na@b.co,pro\nc@d.co\ne@f.co,pro,extra\n\ng@h.co,free\n",
            b',',
        );
        assert_eq!(r.len(), 4);
        assert_eq!(
            r[1],
            Row::Rejected {
                line: 3,
                reason: "has 1 field, the header has 2".into()
            }
        );
        assert_eq!(
            r[2],
            Row::Rejected {
                line: 4,
                reason: "has 3 fields, the header has 2".into()
            }
        );
        assert!(matches!(&r[3], Row::Contact { line: 6, email, .. } if email == "g@h.co"));
        let mut r = CsvRows::new(&b"email,plan\na@b.co,\xff\xfe\nc@d.co,x\n"[..], b',').unwrap();
        assert!(
            matches!(r.next_row().unwrap(), Some(Row::Rejected { line: 2, reason }) if reason.contains("UTF-8"))
        );
        assert!(matches!(
            r.next_row().unwrap(),
            Some(Row::Contact { line: 3, .. })
        ));
    }

    #[test]
    fn delimiters_in_files_and_empty_cells() {
        let r = rows("email;plan;timezone\na@b.co;;Europe/Paris\n", b';');
        assert_eq!(
            r[0],
            Row::Contact {
                line: 2,
                email: "a@b.co".into(),
                attributes: Map::new(),
                timezone: "Europe/Paris".into()
            }
        );
        let r = rows("email\tplan\na@b.co\tpro\n", b'\t');
        assert!(matches!(&r[0], Row::Contact { attributes, .. } if attributes["plan"] == "pro"));
    }

    #[test]
    fn summary_keeps_the_lowest_lines() {
        let mut s = Summary::default();
        s.note_rejections((0..30).rev().map(|i| (i + 10, format!("r{i}"))));
        s.note_rejections([(
            3,
            "duplicate of line 9 (a@b.co), which is imported instead".to_string(),
        )]);
        assert_eq!(s.rejections.len(), SHOWN_REJECTIONS);
        assert_eq!(s.rejections[0].0, 3);
        assert_eq!(s.rejections[1].0, 10);
        s.rejected = 31;
        s.rows = 40;
        let text = s.render("acme");
        assert!(text.starts_with(
            "imported 40 rows into workspace acme: 0 inserted, 0 updated, 31 rejected\n"
        ));
        assert!(text.contains("  line 3: duplicate of line 9"));
        assert!(text.contains("… and 11 more"));
        s.stopped = Some("connection closed".into());
        s.done = 20;
        s.last_line = 25;
        let text = s.render("acme");
        assert!(
            text.starts_with(
                "import stopped: 20 of 40 rows done (lines up to 25 are in, none after)"
            ),
            "{text}"
        );
        assert!(text.contains("stopped by: connection closed"));
    }
}

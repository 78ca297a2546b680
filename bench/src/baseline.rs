//! The baseline herald is compared with: plain tables in schema `bench_base` and the textbook way to
//! react to events, one row-level AFTER INSERT trigger per automation, each with a WHEN clause and a
//! plpgsql function that inserts one enrollment row.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use tokio_postgres::Client;

use super::Rate;
use herald_sidecar::db::Target;

const SCHEMA: &str = "
    CREATE SCHEMA bench_base;
    CREATE TABLE bench_base.events (
        id bigserial, contact_id bigint, kind text, payload jsonb, created_at timestamptz DEFAULT now());
    CREATE TABLE bench_base.enrollments (
        automation_id int, contact_id bigint, event_id bigint, created_at timestamptz DEFAULT now());
    CREATE TABLE bench_base.contacts (
        id bigserial, email text NOT NULL, attributes jsonb, timezone text, created_at timestamptz DEFAULT now());
    CREATE UNIQUE INDEX contacts_email_uq ON bench_base.contacts (email);

    -- the work of one trigger: one enrollment row; the automation id is the trigger's argument
    CREATE FUNCTION bench_base.enrol() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO bench_base.enrollments (automation_id, contact_id, event_id)
        VALUES (TG_ARGV[0]::int, NEW.contact_id, NEW.id);
        RETURN NULL;
    END $$;

    -- CREATE TRIGGER a<id> for ids first..last, on kind (with {} replaced by the id); one call sets up many
    CREATE FUNCTION bench_base.add_triggers(first int, last int, kind text) RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        FOR i IN first..last LOOP
            EXECUTE bench_base.create_trigger_sql(i, replace(kind, '{}', i::text));
        END LOOP;
    END $$;

    CREATE FUNCTION bench_base.create_trigger_sql(id int, kind text) RETURNS text LANGUAGE sql IMMUTABLE
    RETURN format('CREATE TRIGGER a%s AFTER INSERT ON bench_base.events FOR EACH ROW '
                  'WHEN (NEW.kind = %L AND NEW.payload->>''plan'' = ''pro'') '
                  'EXECUTE FUNCTION bench_base.enrol(%L)', id, kind, id);
";

const INSERT_EVENTS: &str = "
    INSERT INTO bench_base.events (contact_id, kind, payload)
    SELECT r.contact_id, r.kind, r.payload
      FROM jsonb_to_recordset($1) AS r(contact_id bigint, kind text, payload jsonb)";

pub async fn create_schema(db: &Client) -> Result<()> {
    db.batch_execute(SCHEMA)
        .await
        .context("creating schema bench_base")
}

/// Triggers `first..first + count` (automation ids), on `kind` (`{}` is replaced by the id).
pub async fn add_triggers(db: &Client, kind: &str, first: usize, count: usize) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let (first, last) = (first as i32, (first + count - 1) as i32);
    db.execute(
        "SELECT bench_base.add_triggers($1, $2, $3)",
        &[&first, &last, &kind],
    )
    .await
    .with_context(|| format!("creating {count} baseline triggers on {kind}"))?;
    Ok(())
}

/// One `CREATE TRIGGER`, timed: the baseline's way to set an automation live.
pub async fn create_trigger(db: &Client, id: i32, kind: &str) -> Result<Duration> {
    let sql: String = db
        .query_one(
            "SELECT bench_base.create_trigger_sql($1, $2)",
            &[&id, &kind],
        )
        .await?
        .get(0);
    let started = Instant::now();
    db.batch_execute(&sql).await.context("CREATE TRIGGER")?;
    Ok(started.elapsed())
}

pub async fn drop_trigger(db: &Client, id: i32) -> Result<()> {
    db.batch_execute(&format!("DROP TRIGGER a{id} ON bench_base.events"))
        .await
        .context("DROP TRIGGER")
}

/// The baseline twin of `ingest::events`: same size, same contacts (by number), same kind and payload.
pub fn events(first: usize, size: usize, contacts: usize) -> Value {
    (first..first + size)
        .map(|i| json!({"contact_id": i % contacts + 1, "kind": super::ingest::HIT, "payload": {"plan": "pro"}}))
        .collect::<Vec<_>>()
        .into()
}

pub async fn insert_events(db: &Client, events: &Value) -> Result<()> {
    let n = db
        .execute(INSERT_EVENTS, &[events])
        .await
        .context("baseline INSERT … SELECT")?;
    ensure!(
        Some(n as usize) == events.as_array().map(Vec::len),
        "baseline inserted {n} events"
    );
    Ok(())
}

pub async fn enrollments(db: &Client) -> Result<i64> {
    Ok(db
        .query_one("SELECT count(*) FROM bench_base.enrollments", &[])
        .await?
        .get(0))
}

/// One `INSERT … SELECT` per batch on a fresh connection.
pub async fn measure(target: &Target, batches: &[Value]) -> Result<Rate> {
    let db = target.connect().await?;
    let before = enrollments(&db).await?;
    let started = Instant::now();
    for batch in batches {
        insert_events(&db, batch).await?;
    }
    let elapsed = started.elapsed();
    let events = batches
        .iter()
        .filter_map(Value::as_array)
        .map(Vec::len)
        .sum();
    Ok(Rate::new(events, elapsed, enrollments(&db).await? - before))
}

/// The same rows `upsert_contacts` gets, as one plain multi-row INSERT into a table with a unique email.
pub async fn insert_contacts(db: &Client, contacts: &Value) -> Result<u64> {
    db.execute(
        "INSERT INTO bench_base.contacts (email, attributes, timezone)
         SELECT r.email, r.attributes, r.timezone
           FROM jsonb_to_recordset($1) AS r(email text, attributes jsonb, timezone text)",
        &[contacts],
    )
    .await
    .context("baseline contacts INSERT")
}

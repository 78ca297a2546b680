//! `herald demo`: the end-to-end flow in a fresh database `herald_demo`, from contacts to delivered mail
//! in the file mailbox `demo-mailbox/`. Each step is a plain SQL call a user would make (or the daemon);
//! the output shows what herald did with it.

use anyhow::{Context, Result};
use serde_json::json;
use tokio_postgres::Client;

use crate::db::Target;
use crate::run::{self, TICK_BATCH};
use crate::status;

const CONTACTS: usize = 1_000;

fn step(title: &str) {
    println!("\n== {title}");
}

pub async fn run(target: &Target) -> Result<()> {
    let target = target.with_dbname("herald_demo");
    let db = target.recreate_with_extension().await?;
    println!("database herald_demo: extension herald installed");

    step("workspace");
    db.execute("SELECT herald.create_workspace('acme', 'Acme Inc.')", &[])
        .await?;
    println!("created workspace acme");

    step("import contacts (upsert_contacts, one call)");
    let contacts: Vec<_> = (0..CONTACTS)
        .map(|i| {
            json!({
                "email": format!("Person{i}@Example.com "),
                "attributes": {"first_name": format!("Person {i}"), "plan": if i % 4 == 0 { "pro" } else { "free" }},
                "timezone": if i % 2 == 0 { "Europe/Paris" } else { "America/New_York" },
            })
        })
        .chain([json!({"email": "not-an-address"}), json!({"email": "x@example.com", "attributes": [1]})])
        .collect();
    let row = db
        .query_one(
            "SELECT * FROM herald.upsert_contacts('acme', $1)",
            &[&json!(contacts)],
        )
        .await?;
    let (inserted, updated, rejected): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    println!("inserted {inserted}, updated {updated}, rejected {rejected}");
    for r in db
        .query(
            "SELECT position, reason FROM herald.contact_rejections WHERE workspace_id = 'acme' ORDER BY position",
            &[],
        )
        .await?
    {
        println!("  rejected entry #{}: {}", r.get::<_, i32>(0), r.get::<_, String>(1));
    }

    step("templates");
    // a contact made on the fly has no first_name: templates render strictly, so they say what to write
    for (key, subject, html) in [
        (
            "welcome",
            "Welcome, {{ contact.first_name | default(\"friend\") }}!",
            "<p>Hello {{ contact.first_name | default(\"there\") }}, welcome aboard.</p>",
        ),
        (
            "pro-tips",
            "Tips for Pro users",
            "<p>{{ contact.first_name | default(\"Hello\") }}, here is how to get the most of Pro.</p>",
        ),
        (
            "thanks",
            "Thanks for upgrading",
            "<p>Thank you, {{ contact.first_name | default(\"friend\") }}!</p>",
        ),
    ] {
        let version: i32 = db
            .query_one(
                "SELECT herald.upsert_template('acme', $1, $2, $3)",
                &[&key, &subject, &html],
            )
            .await?
            .get(0);
        println!("template {key} v{version}");
    }

    step("automations");
    let welcome = json!({
        "name": "Welcome series",
        "trigger": {"event": "signup", "filter": {"all": [{"field": "event.source", "op": "eq", "value": "ads"}]}},
        "reentry": "once",
        "start": "welcome",
        "nodes": {
            "welcome": {"type": "email", "template": "welcome", "next": "wait"},
            "wait": {"type": "delay", "duration": "2 days", "next": "check"},
            "check": {"type": "branch",
                      "paths": [{"when": {"field": "contact.plan", "op": "eq", "value": "pro"}, "next": "pro"}],
                      "default": "done"},
            "pro": {"type": "email", "template": "pro-tips", "next": "done"},
            "done": {"type": "exit"}
        }
    });
    let upgrade = json!({
        "name": "Upgrade thanks",
        "trigger": {"event": "plan.upgraded",
                    "filter": {"field": "contact.plan", "op": "eq", "value": "pro"}},
        "reentry": "always",
        "start": "thanks",
        "nodes": {"thanks": {"type": "email", "template": "thanks"}}
    });
    let mut ids = Vec::new();
    for def in [&welcome, &upgrade] {
        let id: i64 = db
            .query_one("SELECT herald.create_automation('acme', $1)", &[def])
            .await?
            .get(0);
        db.execute("SELECT herald.set_automation_status($1, 'live')", &[&id])
            .await?;
        println!(
            "automation {id} {:?} is live",
            def["name"].as_str().unwrap_or_default()
        );
        ids.push(id);
    }
    let broken = json!({"name": "broken", "start": "a", "nodes": {"a": {"type": "email", "next": "nowhere"}}});
    match db
        .query_one("SELECT herald.create_automation('acme', $1)", &[&broken])
        .await
    {
        Ok(_) => anyhow::bail!("a broken automation was accepted"),
        Err(e) => println!("a broken definition is refused: {}", db_message(&e)),
    }

    step("events (track_many, track, and a plain INSERT)");
    let events: Vec<_> = (0..CONTACTS)
        .map(|i| {
            json!({"email": format!("person{i}@example.com"), "kind": "signup",
                   "payload": {"source": if i % 3 == 0 { "ads" } else { "organic" }}})
        })
        .collect();
    let n: i64 = db
        .query_one("SELECT herald.track_many('acme', $1)", &[&json!(events)])
        .await?
        .get(0);
    println!("track_many recorded {n} signup events");
    let again: i64 = db
        .query_one("SELECT herald.track_many('acme', $1)", &[&json!(events)])
        .await?
        .get(0);
    println!("the same {again} events again: re-entry 'once' enrols nobody twice");
    db.execute(
        "SELECT herald.track('acme', 'person4@example.com', 'plan.upgraded', '{\"to\": \"pro\"}')",
        &[],
    )
    .await?;
    db.execute(
        "INSERT INTO herald.events (workspace_id, email, kind, payload)
         VALUES ('acme', 'newcomer@example.com', 'signup', '{\"source\": \"ads\"}')",
        &[],
    )
    .await?;
    println!(
        "track() for an upgrade, and a plain INSERT for an unknown email (creates the contact)"
    );

    step("what got enrolled");
    print_enrollments(&db).await?;

    step("tick: the step engine moves every due enrollment (emails are queued in the outbox)");
    let mut steps = 0;
    loop {
        let n: i32 = db
            .query_one("SELECT herald.tick($1)", &[&TICK_BATCH])
            .await?
            .get(0);
        if n == 0 {
            break;
        }
        steps += n;
    }
    println!("{steps} steps");

    step("delivery: herald run (file transport) until the queue is empty");
    let delivered = deliver(&target, &db).await?;
    println!("{delivered} messages in {}", MAILBOX);
    if let Some(sample) = sample_message()? {
        println!("--- one of them ---\n{sample}\n---");
    }

    step("stats (exact: flushed + unflushed deltas)");
    db.execute("SELECT herald.flush_stats()", &[]).await?;
    for r in db
        .query(
            "SELECT a.name, s.node, s.metric, s.value FROM herald.automations a,
                    LATERAL herald.automation_stats(a.id) s
              WHERE a.workspace_id = 'acme' AND s.metric IN ('enrolled', 'queued', 'sent', 'failed')
              ORDER BY a.id, s.node, s.metric",
            &[],
        )
        .await?
    {
        println!(
            "{:<16} {:<10} {:<9} {:>5}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, i64>(3)
        );
    }

    step("herald status");
    print!("{}", status::render(&status::counts(&db).await?));
    println!();
    print!("{}", status::render_queue(&db).await?);
    Ok(())
}

/// Where the demo's file transport writes one .eml per message.
pub const MAILBOX: &str = "demo-mailbox";

/// Runs the daemon in-process with the file transport until nothing is pending or leased, then stops it
/// the way SIGTERM would. Returns the number of messages in the mailbox.
async fn deliver(target: &Target, db: &Client) -> Result<usize> {
    let _ = std::fs::remove_dir_all(MAILBOX);
    std::fs::create_dir_all(MAILBOX).with_context(|| format!("creating {MAILBOX}"))?;
    let raw = [
        ("HERALD_MAILDIR", MAILBOX),
        ("HERALD_WORKER_ID", "demo"),
        ("HERALD_FROM", "Acme <hello@acme.example>"),
        ("HERALD_POLL_INTERVAL_MS", "200"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut config = run::Config::from_map(&raw)?;
    config.database = target.config().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(run::run(config, async move {
        let _ = stopped.await;
    }));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let open: i64 = db
            .query_one(
                "SELECT count(*) FROM herald.outbox WHERE status IN ('pending', 'leased') AND run_at <= now()",
                &[],
            )
            .await?
            .get(0);
        if open == 0 || std::time::Instant::now() > deadline || daemon.is_finished() {
            break;
        }
    }
    let _ = stop.send(());
    daemon.await.context("the delivery task panicked")??;
    Ok(std::fs::read_dir(MAILBOX)?.filter(|e| e.is_ok()).count())
}

/// The headers and text part of one delivered message, for the reader to see what was sent.
fn sample_message() -> Result<Option<String>> {
    let mut files: Vec<_> = std::fs::read_dir(MAILBOX)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    files.sort();
    let Some(first) = files.first() else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(first)?;
    let headers: Vec<&str> = text
        .lines()
        .take_while(|l| !l.is_empty())
        .filter(|l| {
            ["From:", "To:", "Subject:", "Message-ID:", "Date:"]
                .iter()
                .any(|h| l.starts_with(h))
        })
        .collect();
    Ok(Some(headers.join("\n")))
}

async fn print_enrollments(db: &Client) -> Result<()> {
    let rows = db
        .query(
            "SELECT name, status, active, waiting, completed, exited, failed
               FROM herald.automation_overview WHERE workspace_id = 'acme' ORDER BY automation_id",
            &[],
        )
        .await
        .context("reading automation_overview")?;
    for r in rows {
        println!(
            "{:<16} {:<6} active {:>4}  waiting {:>3}  completed {:>3}  exited {:>3}  failed {:>3}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, i64>(2),
            r.get::<_, i64>(3),
            r.get::<_, i64>(4),
            r.get::<_, i64>(5),
            r.get::<_, i64>(6)
        );
    }
    Ok(())
}

/// The server's message for a failed statement (what a psql user would see).
pub fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_string())
}

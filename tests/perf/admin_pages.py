#!/usr/bin/env python3
"""The admin page's answer times on a large database (issue 16: no page over 200 ms with 1,000,000
contacts and 100 automations). Prints figures, asserts nothing.

    python3 tests/perf/admin_pages.py [contacts=1000000] [fresh] [reuse]

Builds the database perf_admin: one workspace of N contacts (upsert_contacts, 50,000 a call; each also
writes its contact.created event) and a small second one; 100 live automations of 9 nodes (split,
two emails, a delay or not, a branch, an approval, more emails), 2,000 contacts enrolled in each
(200,000 journeys) and ticked: their emails queued, 120,000 of them sent through claim/complete (message
history over the last minutes, stats), the journeys moved on (about 12,000 waiting for approval), 5,000
opens recorded; a broadcast to a quarter of the contacts queued (250,000 pending jobs) and one paused
after queueing (250,000 held); 300 dead letters. Then VACUUM ANALYZE (what autovacuum does soon after
an import; with `fresh` it is skipped).

Then `herald run` serves the page (HERALD_ADMIN_DATABASE_URL: a LOGIN role in herald_admin, so row-level
security applies as in production; email claims limited to 1/s so the daemon stays quiet), and, 5 s after
it started (it counts what the overview caches at start), each page is fetched over HTTP 1 + 10 times:
the first answer, then min / median / max of the rest.

Needs the extension installed and target/release/herald built. The database stays for inspection
(drop it with dropdb perf_admin); `reuse` times the pages on it again without building it anew."""
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import psycopg

N = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 1_000_000
FRESH = "fresh" in sys.argv[1:]
REUSE = "reuse" in sys.argv[1:]
DB = "perf_admin"
HOST = "/var/run/postgresql"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("HERALD_BIN", os.path.join(ROOT, "target", "release", "herald"))
ROLE, ROLE_PASSWORD = "perf_admin_ops", "perf-admin-ops-password"
PASSWORD = "perf-admin-page-password"
AUTOMATIONS = 100
PER_AUTOMATION = 2_000
SENT = 120_000
PLANS = ["free", "pro", "team", "enterprise"]


def step(what, started=[time.time()]):
    now = time.time()
    print(f"[{now - started[0]:6.0f} s] {what}", flush=True)


def journey(i, delay):
    nodes = {
        "split": {"type": "split", "variants": [{"weight": 1, "next": "hello_a"}, {"weight": 1, "next": "hello_b"}]},
        "hello_a": {"type": "email", "template": "welcome", "next": "wait" if delay else "check"},
        "hello_b": {"type": "email", "template": "welcome", "next": "wait" if delay else "check", "on_error": "done"},
        "check": {"type": "branch", "paths": [{"when": {"field": "contact.plan", "op": "eq", "value": "pro"}, "next": "review"}],
                  "default": "nudge"},
        "review": {"type": "approval", "approved": "thanks", "rejected": "done"},
        "nudge": {"type": "email", "template": "nudge", "next": "done"},
        "thanks": {"type": "email", "template": "thanks", "next": "done"},
        "done": {"type": "exit"},
    }
    if delay:
        nodes["wait"] = {"type": "delay", "duration": "1 day", "next": "check"}
    return {"name": f"Journey {i}", "trigger": {"event": f"signup-{i}"}, "start": "split", "nodes": nodes}


def build():
    with psycopg.connect(host=HOST, dbname="postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DB} TEMPLATE template0")
        if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone():
            admin.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{ROLE_PASSWORD}' IN ROLE herald_admin")
        admin.execute(f"GRANT CONNECT ON DATABASE {DB} TO {ROLE}")
    c = psycopg.connect(host=HOST, dbname=DB, autocommit=True)
    c.execute("SET jit = off")
    c.execute("CREATE EXTENSION herald")
    c.execute("SELECT herald.create_workspace('big', 'Big Co')")
    c.execute("SELECT herald.create_workspace('small', 'Small Co')")
    for ws in ["big", "small"]:
        for t in ["welcome", "nudge", "thanks"]:
            c.execute("SELECT herald.upsert_template(%s, %s, 'Hello', '<p>hi {{ contact.email }}</p>')", (ws, t))
    c.execute("SELECT herald.set_rate_limit('provider:default', 1)")

    for i in range(0, N, 50_000):
        c.execute("""SELECT herald.upsert_contacts('big', (SELECT jsonb_agg(jsonb_build_object(
                       'email', 'c' || g || '@example.com',
                       'attributes', jsonb_build_object('plan', (%s::text[])[1 + g %% 4])))
                     FROM generate_series(%s, %s) g))""", (PLANS, i + 1, min(N, i + 50_000)))
    c.execute("""SELECT herald.upsert_contacts('small', (SELECT jsonb_agg(jsonb_build_object('email', 's' || g || '@example.com'))
                 FROM generate_series(1, 500) g))""")
    step(f"{N:,} contacts imported")

    ids = []
    for i in range(AUTOMATIONS):
        a = c.execute("SELECT herald.create_automation('big', %s::jsonb)",
                      (json.dumps(journey(i, delay=i >= AUTOMATIONS // 2)),)).fetchone()[0]
        c.execute("SELECT herald.set_automation_status(%s, 'live')", (a,))
        ids.append(a)
    first = c.execute("SELECT min(id) FROM herald.contacts WHERE workspace_id = 'big'").fetchone()[0]
    for k, a in enumerate(ids):
        start = first + k * PER_AUTOMATION * 3
        c.execute("SELECT * FROM herald.enroll(%s, ARRAY(SELECT generate_series(%s::bigint, %s::bigint, 3)))",
                  (a, start, start + PER_AUTOMATION * 3 - 1))
    step(f"{AUTOMATIONS} automations, {AUTOMATIONS * PER_AUTOMATION:,} enrollments")

    while c.execute("SELECT herald.tick(20000)").fetchone()[0] > 0:
        pass
    step("ticked: emails queued")
    # send some: claim (the rate limit would hold claims back: lifted meanwhile) and complete
    c.execute("SELECT herald.set_rate_limit('provider:default', NULL)")
    sent = 0
    while sent < SENT:
        jobs = c.execute("SELECT id, dedupe_key FROM herald.claim('perf', 5000, '60 seconds')").fetchall()
        if not jobs:
            break
        results = [{"id": j, "ok": True, "message_id": f"<{key}@perf>"} for j, key in jobs]
        c.execute("SELECT herald.complete(%s::jsonb)", (json.dumps(results),))
        sent += len(jobs)
    c.execute("SELECT herald.set_rate_limit('provider:default', 1)")
    while c.execute("SELECT herald.tick(20000)").fetchone()[0] > 0:
        pass
    c.execute("SELECT herald.flush_stats()")
    step(f"{sent:,} sent (claim + complete), journeys moved on")

    rows = c.execute("""SELECT h.message_id, h.dedupe_key, x.email FROM herald.message_history h
                        JOIN herald.contacts x ON x.workspace_id = h.workspace_id AND x.id = h.contact_id
                        WHERE h.workspace_id = 'big' ORDER BY h.id LIMIT 5000""").fetchall()
    for k in range(0, len(rows), 1000):
        feedback = [{"kind": "opened", "workspace": "big", "email": e, "message_id": m,
                     "payload": {"broadcast": None, "message": key}} for m, key, e in rows[k:k + 1000]]
        c.execute("SELECT herald.record_feedback(%s::jsonb)", (json.dumps(feedback),))
    step("5,000 opens recorded")

    b1 = c.execute("""SELECT herald.create_broadcast('big', '{"name": "Team news",
                      "audience": {"segment": {"field": "contact.plan", "op": "eq", "value": "team"}},
                      "variations": [{"key": "a", "template": "welcome"}, {"key": "b", "template": "nudge"}]}')""").fetchone()[0]
    b2 = c.execute("""SELECT herald.create_broadcast('big', '{"name": "Enterprise news", "template": "welcome",
                      "audience": {"segment": {"field": "contact.plan", "op": "eq", "value": "enterprise"}}}')""").fetchone()[0]
    for b in [b1, b2]:
        c.execute("SELECT herald.schedule_broadcast(%s)", (b,))
    while c.execute("SELECT herald.advance_broadcasts(200000)").fetchone()[0] > 0:
        pass
    c.execute("SELECT herald.pause_broadcast(%s)", (b2,))
    while c.execute("SELECT herald.advance_broadcasts(200000)").fetchone()[0] > 0:
        pass
    c.execute("""UPDATE herald.outbox SET status = 'dead', attempt = 5, last_error = '451 4.3.0 try later'
                  WHERE id IN (SELECT id FROM herald.outbox WHERE status = 'pending' AND broadcast_id IS NULL LIMIT 300)""")
    c.execute("SELECT herald.track_many('big', (SELECT jsonb_agg(jsonb_build_object('email', 'c' || g || '@example.com', 'kind', 'visit')) FROM generate_series(1, 3000) g))")
    step("broadcasts queued (one paused), 300 dead letters, 3,000 fresh events")
    if not FRESH:
        c.execute("VACUUM ANALYZE")
        step("VACUUM ANALYZE")
    for label, sql in [
        ("contacts", "SELECT count(*) FROM herald.contacts"),
        ("events", "SELECT count(*) FROM herald.events"),
        ("enrollments", "SELECT count(*) FROM herald.enrollments"),
        ("waiting for approval", "SELECT count(*) FROM herald.enrollments WHERE wait_kind = 'approval'"),
        ("outbox", "SELECT count(*) FROM herald.outbox"),
        ("outbox pending", "SELECT count(*) FROM herald.outbox WHERE status = 'pending'"),
        ("outbox held", "SELECT count(*) FROM herald.outbox WHERE status = 'held'"),
        ("message history", "SELECT count(*) FROM herald.message_history"),
        ("step log", "SELECT count(*) FROM herald.step_log"),
    ]:
        print(f"  {label:<22} {c.execute(sql).fetchone()[0]:>12,}")
    c.close()
    return pick()


def pick():
    """An automation to time, and a contact of it waiting for approval."""
    c = psycopg.connect(host=HOST, dbname=DB, autocommit=True)
    automation = c.execute("SELECT min(id) FROM herald.automations").fetchone()[0]
    email = c.execute("""SELECT x.email FROM herald.enrollments e JOIN herald.contacts x
                          ON x.workspace_id = e.workspace_id AND x.id = e.contact_id
                         WHERE e.automation_id = %s AND e.wait_kind = 'approval' LIMIT 1""", (automation,)).fetchone()[0]
    c.close()
    return automation, email


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None


def main():
    automation, email = pick() if REUSE else build()
    port = free_port()
    maildir = tempfile.mkdtemp(prefix="perf-admin-mail-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env.update({
        "DATABASE_URL": f"host={HOST} dbname={DB}",
        "HERALD_ADMIN_DATABASE_URL": f"host=127.0.0.1 port=5432 dbname={DB} user={ROLE} password={ROLE_PASSWORD} sslmode=disable",
        "HERALD_HTTP_ADDR": f"127.0.0.1:{port}", "HERALD_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "HERALD_LINK_SECRET": "perf-link-secret-0123456789", "HERALD_ADMIN_PASSWORD": PASSWORD,
        "HERALD_MAILDIR": maildir, "RUST_LOG": "warn",
    })
    log = open(os.path.join(maildir, "herald.log"), "wb")
    daemon = subprocess.Popen([BIN, "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}/admin"
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        # the daemon counts what the overview caches once at start (~0.4 s at 1M contacts); an
        # operator arrives later than that
        time.sleep(5)
        opener = urllib.request.build_opener(NoRedirect)
        body = urllib.parse.urlencode({"name": "perf", "password": PASSWORD}).encode()
        try:
            opener.open(urllib.request.Request(f"{base}/login", data=body, method="POST"), timeout=30)
        except urllib.error.HTTPError as e:
            cookie = e.headers["Set-Cookie"].split(";")[0]
        pages = [
            ("overview", ""),
            ("automations", "/automations"),
            ("automation", f"/automations/{automation}"),
            ("automation + contact steps", f"/automations/{automation}?email={urllib.parse.quote(email)}"),
            ("broadcasts", "/broadcasts"),
            ("approvals", "/approvals"),
            ("dead letters", "/dead-letters"),
            ("live: overview", "/live?view=overview"),
            ("live: automation", f"/live?view=automation&id={automation}"),
            ("live: broadcasts", "/live?view=broadcasts"),
        ]
        print(f"\n{'page':<28} {'status':>6} {'bytes':>8} {'first':>8} {'min':>8} {'median':>8} {'max':>8}  (ms, {daemon.pid})")
        for label, path in pages:
            times, status, size = [], None, 0
            for _ in range(11):
                request = urllib.request.Request(base + path, headers={"Cookie": cookie})
                t = time.perf_counter()
                with opener.open(request, timeout=60) as r:
                    data = r.read()
                    status = r.status
                times.append((time.perf_counter() - t) * 1000)
                size = len(data)
            rest = times[1:]
            print(f"{label:<28} {status:>6} {size:>8,} {times[0]:>8.1f} {min(rest):>8.1f} "
                  f"{statistics.median(rest):>8.1f} {max(rest):>8.1f}")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        log.close()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Events that wake enrollments parked on a wait_event node, on tables autovacuum has not analysed yet
and after ANALYZE (issue 14: plans must not depend on fresh statistics). Prints wake-ups/s for both.

    python3 tests/perf/wake_event.py [enrollments=20000]

Needs the extension installed (make install); uses its own database perf_wake_event, dropped at the end."""
import json
import sys
import time

import psycopg

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
DB = "perf_wake_event"
HOST = "/var/run/postgresql"


def run(analyse):
    with psycopg.connect(host=HOST, dbname="postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DB} TEMPLATE template0")
    with psycopg.connect(host=HOST, dbname=DB, autocommit=True) as c:
        c.execute("CREATE EXTENSION herald")
        for t in ["contacts", "events", "enrollments", "outbox", "message_history", "step_log"]:
            c.execute(f"ALTER TABLE herald.{t} SET (autovacuum_enabled = false)")
        c.execute("SELECT herald.create_workspace('w')")
        c.execute("""SELECT herald.upsert_contacts('w', (SELECT jsonb_agg(jsonb_build_object('email', 'c' || g || '@example.com'))
                                                         FROM generate_series(1, %s) g))""", (N,))
        c.execute("""SELECT herald.set_automation_status(herald.create_automation('w', '{"name": "h", "trigger": {"event": "go"},
                     "start": "a", "nodes": {"a": {"type": "wait_event", "event": "clicked", "timeout": "7 days",
                     "next": "d", "timeout_next": "d"}, "d": {"type": "exit"}}}'), 'live')""")
        c.execute("SELECT herald.enroll(1, (SELECT array_agg(id) FROM herald.contacts))")
        while c.execute("SELECT herald.tick(10000)").fetchone()[0] > 0:
            pass
        if analyse:
            c.execute("ANALYZE")
        woken, started = 0, time.time()
        for i in range(0, min(N, 5000), 100):
            events = [{"email": f"c{g}@example.com", "kind": "clicked"} for g in range(i + 1, i + 101)]
            c.execute("SELECT herald.track_many('w', %s::jsonb)", (json.dumps(events),))
            woken += 100
        secs = time.time() - started
        assert c.execute("SELECT count(*) FROM herald.enrollments WHERE status = 'active'").fetchone()[0] == woken
    return woken / secs


fresh = run(False)
analysed = run(True)
print(f"wait_event wake-ups, {N} waiting, track_many(100): never analysed {fresh:,.0f}/s, "
      f"after ANALYZE {analysed:,.0f}/s, ratio {fresh / analysed:.2f}x")
with psycopg.connect(host=HOST, dbname="postgres", autocommit=True) as admin:
    admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")

#!/usr/bin/env python3
"""tick() of an older commit against the installed one, in turns in ONE database (issue 14): each round
tracks N new contacts into a live journey (email → branch → email → exit) and times one tick that takes
them to their first email (enrollment update, outbox insert, step log). The older body is installed
beside the current one as herald.tick_old (its results-stream call left out of both, so only the step
engine is compared). Tables are never analysed (autovacuum off), as after a burst.

    python3 tests/perf/tick_ab.py <commit> [contacts_per_round=5000] [rounds=8]

Needs make install (the current tick) and git (the old one is read with git show)."""
import json
import statistics
import subprocess
import sys
import time

import psycopg

REV = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 8
DB = "perf_tick_ab"
HOST = "/var/run/postgresql"


def tick_body(source: str, name: str) -> str:
    start = source.index("CREATE FUNCTION herald.tick(")
    end = source.index("$$;", start) + 3
    return (source[start:end]
            .replace("CREATE FUNCTION herald.tick(", f"CREATE OR REPLACE FUNCTION herald.{name}(")
            .replace("PERFORM herald.advance_results(100000);", ""))


old = subprocess.run(["git", "show", f"{REV}:sql/engine.sql"], check=True, capture_output=True, text=True).stdout
new = open("sql/engine.sql").read()

with psycopg.connect(host=HOST, dbname="postgres", autocommit=True) as admin:
    admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {DB} TEMPLATE template0")
db = psycopg.connect(host=HOST, dbname=DB, autocommit=True)
db.execute("CREATE EXTENSION herald")
db.execute("""DO $$ DECLARE t text; BEGIN FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'herald' LOOP
  EXECUTE format('ALTER TABLE herald.%I SET (autovacuum_enabled = false)', t); END LOOP; END $$""")
db.execute(tick_body(old, "tick_old"))
db.execute(tick_body(new, "tick_new"))
db.execute("SELECT herald.create_workspace('w')")
db.execute("SELECT herald.upsert_template('w', 'welcome', 'Hi {{ contact.email }}', '<p>Welcome</p>')")
db.execute("SELECT herald.upsert_template('w', 'pro', 'Pro tips', '<p>Pro</p>')")
db.execute("""SELECT herald.set_automation_status(herald.create_automation('w', '{"name": "j", "trigger": {"event": "signup"},
  "start": "hello", "nodes": {"hello": {"type": "email", "template": "welcome", "next": "plan"},
  "plan": {"type": "branch", "paths": [{"when": {"field": "event.plan", "op": "eq", "value": "pro"}, "next": "tips"}], "default": "done"},
  "tips": {"type": "email", "template": "pro", "next": "done"}, "done": {"type": "exit"}}}'), 'live')""")

times = {"tick_old": [], "tick_new": []}
first = 0
for r in range(ROUNDS):
    for fn in (["tick_old", "tick_new"] if r % 2 == 0 else ["tick_new", "tick_old"]):
        events = [{"email": f"c{g}@example.com", "kind": "signup", "payload": {"plan": "pro" if g % 2 == 0 else "free"}}
                  for g in range(first, first + N)]
        first += N
        db.execute("SELECT herald.track_many('w', %s::jsonb)", (json.dumps(events),))
        started = time.perf_counter()
        steps = db.execute(f"SELECT herald.{fn}(100000)").fetchone()[0]
        times[fn].append((time.perf_counter() - started) * 1000)
        assert steps == N, f"{fn} made {steps} steps, expected {N}"
db.close()
with psycopg.connect(host=HOST, dbname="postgres", autocommit=True) as admin:
    admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
for fn, ms in times.items():
    print(f"{fn} ({REV if fn == 'tick_old' else 'installed'}): median {statistics.median(ms):.0f} ms per {N:,} "
          f"enrollments ({', '.join(f'{m:.0f}' for m in ms)})")
print(f"installed / {REV}: {statistics.median(times['tick_new']) / statistics.median(times['tick_old']):.2f}x")

#!/usr/bin/env python3
"""preview_broadcast on a large workspace (issue 15 §3: fast enough to call while a user edits a
segment). Builds N contacts (plan and country attributes, ~0.1% suppressed), then times
herald.preview_broadcast for GIN-served segments and for no segment.

    python3 tests/perf/preview_broadcast.py [contacts=1000000] [analyze]

With `analyze`, the tables are analysed after the import; without, the first call meets tables autovacuum
has not analysed yet (what a user sees right after importing a list).

Needs make install; uses its own database perf_preview, dropped at the end."""
import json
import sys
import time

import psycopg

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
DB = "perf_preview"
HOST = "/var/run/postgresql"
PLANS = ["free", "pro", "team", "enterprise"]
COUNTRIES = ["FR", "DE", "US", "GB", "ES", "IT", "NL", "SE", "PL", "JP"]

with psycopg.connect(host=HOST, dbname="postgres", autocommit=True) as admin:
    admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {DB} TEMPLATE template0")
c = psycopg.connect(host=HOST, dbname=DB, autocommit=True)
c.execute("CREATE EXTENSION herald")
c.execute("SELECT herald.create_workspace('big')")
c.execute("SELECT herald.upsert_template('big', 't', 'Hi', '<p>hi</p>')")
started = time.time()
for i in range(0, N, 50_000):
    c.execute("""SELECT herald.upsert_contacts('big', (SELECT jsonb_agg(jsonb_build_object(
                   'email', 'c' || g || '@example.com',
                   'attributes', jsonb_build_object('plan', (%s::text[])[1 + g %% 4], 'country', (%s::text[])[1 + g %% 10]),
                   'timezone', CASE WHEN g %% 3 = 0 THEN 'Asia/Tokyo' WHEN g %% 3 = 1 THEN 'Europe/Paris' END))
                 FROM generate_series(%s, %s) g))""", (PLANS, COUNTRIES, i + 1, min(N, i + 50_000)))
c.execute("INSERT INTO herald.suppressions (workspace_id, email, reason) "
          "SELECT 'big', 'c' || g || '@example.com', 'manual' FROM generate_series(1, %s, 1000) g", (N,))
print(f"{N:,} contacts imported in {time.time() - started:.0f} s")
if "analyze" in sys.argv[2:]:
    c.execute("VACUUM ANALYZE")
    print("VACUUM ANALYZE done")

cases = {
    "plan = enterprise (GIN), A/B test, local_time": {"name": "p", "audience": {"segment": {"field": "contact.plan", "op": "eq", "value": "enterprise"}},
        "variations": [{"key": "a", "template": "t"}, {"key": "b", "template": "t"}],
        "ab_test": {"test_percent": 20, "metric": "opens", "wait": "4 hours"}, "send_at": {"local_time": "09:00"}},
    "country = FR (GIN)": {"name": "p", "template": "t", "audience": {"segment": {"field": "contact.country", "op": "eq", "value": "FR"}}},
    "country = FR and plan = team (GIN)": {"name": "p", "template": "t", "audience": {"segment": {"all": [
        {"field": "contact.country", "op": "eq", "value": "FR"}, {"field": "contact.plan", "op": "eq", "value": "team"}]}}},
    "no segment (every contact)": {"name": "p", "template": "t", "audience": "all"},
}
for label, definition in cases.items():
    times = []
    for _ in range(3):
        t = time.time()
        answer = c.execute("SELECT herald.preview_broadcast('big', %s::jsonb)", (json.dumps(definition),)).fetchone()[0]
        times.append(time.time() - t)
    print(f"{label:<48} {answer['recipients']:>9,} recipients   {min(times) * 1000:7.0f} ms warm, {times[0] * 1000:7.0f} ms first")
c.close()
with psycopg.connect(host=HOST, dbname="postgres", autocommit=True) as admin:
    admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")

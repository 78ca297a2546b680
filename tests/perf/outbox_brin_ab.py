#!/usr/bin/env python3
"""What outbox_created_idx (0.8.0: prune finds old jobs through it) costs the queue's hot path:
rounds of ROUND webhook jobs queued by one INSERT, then drained by claim(100) + complete(100) on one
connection, with the index and without it in turns (dropped and made again between rounds, on the same
tables). Prints per variant the median drain rate and the backend CPU per job (from /proc of the
connection's server process); asserts nothing.

    python3 tests/perf/outbox_brin_ab.py [rounds=8] [jobs_per_round=20000]

Needs make install; runs as a Postgres superuser on the local socket, in the database bench_outbox_brin
(dropped and made again)."""
import json
import statistics
import sys
import time

import psycopg

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 8
ROUND = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
HOST = "/var/run/postgresql"
TICKS = 100  # /proc's clock ticks per second on Linux


def backend_cpu(db):
    pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


with psycopg.connect(host=HOST, dbname="postgres", autocommit=True) as admin:
    admin.execute("DROP DATABASE IF EXISTS bench_outbox_brin WITH (FORCE)")
    admin.execute("CREATE DATABASE bench_outbox_brin")
db = psycopg.connect(host=HOST, dbname="bench_outbox_brin", autocommit=True)
db.execute("CREATE EXTENSION herald")
db.execute("SELECT herald.create_workspace('ab')")
results = {"with": [], "without": []}
for r in range(ROUNDS):
    for variant in (("with", "without") if r % 2 == 0 else ("without", "with")):
        if variant == "with":
            db.execute("CREATE INDEX IF NOT EXISTS outbox_created_idx ON herald.outbox USING brin (created_at)")
        else:
            db.execute("DROP INDEX IF EXISTS herald.outbox_created_idx")
        db.execute("""INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, payload)
                      SELECT 'ab', 'webhook', format('ab:%%s:%%s:%%s', %s::int, %s::text, g),
                             '{"url": "http://127.0.0.1:9/x", "method": "POST"}'
                        FROM generate_series(1, %s) g""", (r, variant, ROUND))
        cpu, started, done = backend_cpu(db), time.perf_counter(), 0
        while True:
            ids = [row[0] for row in db.execute("SELECT id FROM herald.claim('ab-worker', 100)").fetchall()]
            if not ids:
                break
            db.execute("SELECT herald.complete(%s::jsonb)", (json.dumps([{"id": i, "ok": True} for i in ids]),))
            done += len(ids)
        took, cpu = time.perf_counter() - started, backend_cpu(db) - cpu
        assert done == ROUND, (variant, done)
        results[variant].append((done / took, cpu / done * 1e6))
for variant, runs in results.items():
    rate = statistics.median(x for x, _ in runs)
    cpu = statistics.median(y for _, y in runs)
    print(f"{variant:>7} outbox_created_idx: median {rate:,.0f} jobs/s, {cpu:.1f} µs backend CPU per job "
          f"({len(runs)} rounds of {ROUND:,})")

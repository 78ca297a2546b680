#!/usr/bin/env python3
"""What a snapshot held open elsewhere (a report, an idle-in-transaction session, pg_dump) does to claim,
for release 0.10.0's claim against this workspace's, in turns in one database with herald installed.
0.10.0's claim walked the outbox_pending_idx entries of the jobs leased or finished since vacuum last
came by twice per busy (workspace, priority) pair: once in its skip-scan, once in the workspace's
offer. Under an old snapshot those entries cannot be removed or marked dead, so each claim walks all
of them (README *Known limits*); 0.11.0 starts the offer's range at the job the skip-scan found.

JOBS due webhook jobs in WORKSPACES workspaces; one client drains them with claim(100) + complete(100),
the two claims taking turns batch by batch (both see the same index), first for SECONDS with nothing
else open, then for SECONDS while another connection holds a REPEATABLE READ snapshot taken at the
start of that phase. Prints per phase and per 10-second window the median and p99 of each claim's
time (client side, loopback), and the backend CPU per claim; asserts nothing.

    python3 tests/perf/claim_held_snapshot_ab.py [jobs=600000] [seconds=40] [workspaces=10] [run_at=each|shared]

run_at each: every job has its own run_at (1 ms apart, in the past), as jobs queued by a stream of
track() calls; shared: all have the same, as the jobs of one statement (a tick's batch, a broadcast's
chunk), where the offer's range cannot start later than the skip-scan's (its bound is run_at alone).

Runs as root on the local socket (a superuser role of that name; reads the backend's /proc/<pid>/stat),
in the database bench_claim_snapshot_ab (dropped and made again, and dropped at the end). Release
0.10.0's claim comes from sql/releases/herald--0.10.0.sql, installed beside as herald.claim_0_10."""
import json
import os
import re
import statistics
import sys
import time

import psycopg

JOBS = int(sys.argv[1]) if len(sys.argv) > 1 else 600_000
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 40.0
WORKSPACES = int(sys.argv[3]) if len(sys.argv) > 3 else 10
RUN_AT = sys.argv[4] if len(sys.argv) > 4 else "each"
assert RUN_AT in ("each", "shared"), "run_at: each (a run_at per job) or shared (one for all)"
WINDOW = 10.0
HOST = "/var/run/postgresql"
DB = "bench_claim_snapshot_ab"
TICKS = os.sysconf("SC_CLK_TCK")
RELEASE = os.path.join(os.path.dirname(__file__), "..", "..", "sql", "releases", "herald--0.10.0.sql")
VARIANTS = {"0.10.0": "herald.claim_0_10", "0.11.0": "herald.claim"}


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICKS


def release_claim():
    """0.10.0's CREATE FUNCTION herald.claim(…) … $$; renamed herald.claim_0_10."""
    text = open(RELEASE).read()
    m = re.search(r"CREATE\s+FUNCTION herald\.claim\(.*?\n\$\$;\n", text, re.S)
    assert m, f"no herald.claim in {RELEASE}"
    return m.group(0).replace("FUNCTION herald.claim(", "FUNCTION herald.claim_0_10(", 1)


def p99(v):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * 0.99))]


def phase(db, pid, name, seconds):
    """Alternate the variants batch by batch for `seconds`; return {variant: [(t, ms, cpu_ms)]}."""
    out = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < seconds:
        v = order[i % 2]
        i += 1
        c0, t0 = cpu_seconds(pid), time.perf_counter()
        ids = [r[0] for r in db.execute(f"SELECT id FROM {VARIANTS[v]}('bench', 100)").fetchall()]
        ms, cpu = (time.perf_counter() - t0) * 1000, (cpu_seconds(pid) - c0) * 1000
        if not ids:
            print(f"{name}: the queue ran dry after {time.monotonic() - started:.0f} s")
            break
        out[v].append((time.monotonic() - started, ms, cpu))
        db.execute("SELECT herald.complete(%s::jsonb)", (json.dumps([{"id": j, "ok": True} for j in ids]),))
    return out


def report(name, samples):
    print(f"\n{name}")
    print(f"{'window':>10} | " + " | ".join(f"{v + ' p50/p99 ms':>22}" for v in VARIANTS) + " | new/old p50")
    end = max((s[-1][0] for s in samples.values() if s), default=0)
    w = 0.0
    while w < end:
        cols, p50s = [], []
        for v in VARIANTS:
            ms = [m for t, m, _ in samples[v] if w <= t < w + WINDOW]
            p50s.append(statistics.median(ms) if ms else float("nan"))
            cols.append(f"{p50s[-1]:>10.2f} / {p99(ms) if ms else float('nan'):>8.2f}")
        print(f"{int(w):>4}-{int(w + WINDOW):<4} s | " + " | ".join(f"{c:>22}" for c in cols)
              + f" | {p50s[1] / p50s[0]:>10.2f}x")
        w += WINDOW
    for v in VARIANTS:
        s = samples[v]
        if s:
            print(f"  {v}: {len(s)} claims, median {statistics.median(m for _, m, _ in s):.2f} ms, "
                  f"p99 {p99([m for _, m, _ in s]):.2f} ms, backend CPU {statistics.mean(c for _, _, c in s):.2f} ms a claim")


with psycopg.connect(host=HOST, dbname="postgres", autocommit=True) as admin:
    admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {DB}")
db = psycopg.connect(host=HOST, dbname=DB, autocommit=True)
db.execute("CREATE EXTENSION herald")
db.execute(release_claim())
names = [f"ws{i}" for i in range(WORKSPACES)]
db.execute("SELECT herald.create_workspace(w) FROM unnest(%s::text[]) w", (names,))
db.execute("""INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, payload, run_at)
              SELECT (%(ws)s::text[])[1 + i %% cardinality(%(ws)s::text[])], 'webhook', 'snap:' || i,
                     '{"url": "http://127.0.0.1:9/", "body": {}}',
                     now() - CASE WHEN %(each)s THEN make_interval(secs => (%(n)s - i) / 1000.0) ELSE interval '0' END
                FROM generate_series(1, %(n)s::int) i""", {"ws": names, "n": JOBS, "each": RUN_AT == "each"})
db.execute("VACUUM herald.outbox")   # as autovacuum would; never analysed
pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]

report(f"nothing else open, {SECONDS:.0f} s", phase(db, pid, "quiet", SECONDS))
holder = psycopg.connect(host=HOST, dbname=DB)
holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
holder.execute("SELECT count(*) FROM herald.workspaces").fetchone()
report(f"a REPEATABLE READ snapshot held open from the start, {SECONDS:.0f} s",
       phase(db, pid, "held", SECONDS))
holder.rollback()
holder.close()
db.close()
with psycopg.connect(host=HOST, dbname="postgres", autocommit=True) as admin:
    admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")

#!/usr/bin/env python3
"""What the results stream costs complete() (issue 16: jobs/s with the stream ≥ 0.9× without).
Prints figures, asserts nothing.

    python3 tests/perf/results_complete.py [jobs=60000] [send]

Builds the database perf_results: one workspace, `jobs` contacts, and a pending email job for each:
by default from a one-node journey (the email ends the enrollment, so each job makes two results,
email.sent and enrollment.completed: the most a job makes), with `send` from herald.send (one result
per job). Next to herald.complete it installs bench.complete_nostream: the same function read from
sql/queue.sql without its results CTE. Then claim(100) + complete of each batch, the two functions
taking turns batch by batch (so both see the same load and table sizes), and prints per function
complete()'s jobs/s, its trimmed mean per batch, and claim + complete jobs/s. Then what the rest of
the stream costs outside complete(): herald.advance_results publishing everything staged (results/s),
and read_results reading it all back in pages of 1000.

Needs the extension installed (make install). The database stays for inspection."""
import json
import os
import re
import statistics
import sys
import time

import psycopg

DB = "perf_results"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 60000
SEND = "send" in sys.argv[2:]
BATCH = 100


def without_stream():
    """herald.complete as sql/queue.sql has it, minus the CTE that stages results."""
    src = open(os.path.join(ROOT, "sql", "queue.sql")).read()
    body = re.search(r"CREATE FUNCTION herald\.complete\(results jsonb\).*?\n\$\$;\n", src, re.S).group(0)
    cut = re.sub(r"    \), reported AS \(.*?\n    \), counted_b AS \(", "    ), counted_b AS (", body, flags=re.S)
    assert cut != body, "complete() has no results CTE to leave out"
    return cut.replace("CREATE FUNCTION herald.complete(", "CREATE FUNCTION bench.complete_nostream(")


with psycopg.connect("dbname=postgres", autocommit=True) as c:
    c.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
    c.execute(f'CREATE DATABASE "{DB}"')

with psycopg.connect(f"dbname={DB}", autocommit=True) as c:
    c.execute("CREATE EXTENSION herald")
    c.execute("CREATE SCHEMA bench")
    c.execute(without_stream())
    c.execute("SELECT herald.create_workspace('bw')")
    c.execute("SELECT herald.upsert_template('bw', 'hi', 'Hi', '<p>hi</p>')")
    for i in range(0, N, 10000):
        c.execute("""SELECT herald.upsert_contacts('bw', (SELECT jsonb_agg(jsonb_build_object('email', 'u' || g || '@example.com'))
                                                     FROM generate_series(%s::int, %s::int) g))""", (i, min(i + 9999, N - 1)))
    if SEND:
        c.execute("SELECT count(herald.send('bw', c.email, 'hi')) FROM herald.contacts c WHERE c.workspace_id = 'bw'")
    else:
        a = c.execute("""SELECT herald.create_automation('bw', '{"name": "n", "start": "m",
                           "nodes": {"m": {"type": "email", "template": "hi"}}}')""").fetchone()[0]
        c.execute("SELECT herald.set_automation_status(%s, 'live')", (a,))
        c.execute("SELECT herald.enroll(%s, (SELECT array_agg(id) FROM herald.contacts WHERE workspace_id = 'bw'))", (a,))
        while c.execute("SELECT herald.tick(10000)").fetchone()[0] > 0:
            pass
    c.execute("SELECT herald.advance_results(100000)")
    c.execute("VACUUM ANALYZE")
    print(f"{c.execute('SELECT count(*) FROM herald.outbox WHERE status = %s', ('pending',)).fetchone()[0]} pending email jobs"
          f" ({'send()' if SEND else 'a journey each'})")

    fns = ["herald.complete", "bench.complete_nostream"]
    times = {f: [] for f in fns}
    k = 0
    while True:
        fn = fns[k % len(fns)]
        t0 = time.perf_counter()
        ids = [r[0] for r in c.execute("SELECT id FROM herald.claim('bench', %s)", (BATCH,)).fetchall()]
        if not ids:
            break
        results = json.dumps([{"id": i, "ok": True, "message_id": f"<{i}@bench>"} for i in ids])
        t1 = time.perf_counter()
        c.execute(f"SELECT {fn}(%s::jsonb)", (results,))
        t2 = time.perf_counter()
        times[fn].append((t2 - t1, len(ids), t2 - t0))
        k += 1
    rate = {}
    for fn, xs in times.items():
        jobs = sum(x[1] for x in xs)
        alone = sorted(x[0] for x in xs)
        cut = len(alone) // 10
        trimmed = statistics.mean(alone[cut:len(alone) - cut])
        rate[fn] = (jobs / sum(alone), jobs / sum(x[2] for x in xs))
        print(f"{fn:24} {jobs} jobs: complete() {rate[fn][0]:,.0f} jobs/s (trimmed mean {trimmed * 1000:.2f} ms per {BATCH}),"
              f" claim + complete {rate[fn][1]:,.0f} jobs/s")
    print(f"with / without the stream: complete() {rate[fns[0]][0] / rate[fns[1]][0]:.2f}x,"
          f" claim + complete {rate[fns[0]][1] / rate[fns[1]][1]:.2f}x")

    staged = c.execute("SELECT count(*) FROM herald.results_staged").fetchone()[0]
    t = time.perf_counter()
    published = 0
    while (n := c.execute("SELECT herald.advance_results(10000)").fetchone()[0]) > 0:
        published += n
    dt = time.perf_counter() - t
    print(f"advance_results: {published} of {staged} staged results published in {dt:.2f} s ({published / dt:,.0f}/s)")
    t = time.perf_counter()
    read, after = 0, 0
    while True:
        last, n = c.execute("SELECT max(id), count(*) FROM herald.read_results('bw', %s, 1000)", (after,)).fetchone()
        if n == 0:
            break
        read, after = read + n, last
    dt = time.perf_counter() - t
    print(f"read_results: {read} results in pages of 1000 in {dt:.2f} s ({read / dt:,.0f}/s)")

#!/usr/bin/env python3
"""What counting a broadcast message's bounces and complaints (0.15.0: message_history.reported and the
bounced / complained counters auto_pause reads) costs herald.record_feedback. Prints figures, asserts
nothing.

    python3 tests/perf/record_feedback_ab.py [calls=2000]

Builds the database perf_feedback: one workspace, `calls` x 2 contacts with a sent broadcast message
each (message_history rows, as complete() writes them). Next to herald.record_feedback it installs
bench.record_feedback_0140: the function as release 0.14.0 has it (sql/releases/herald--0.14.0.sql),
without the new CTEs. Then the two take turns, call by call, on messages of their own:
  open     the pixel's call: one `opened` entry by Message-ID (most calls the daemon makes)
  bounce   a provider's report: one `hard_bounce` entry by Message-ID (suppresses, and now counts)
and prints each one's median and p90 per call, and the ratio. Needs the extension installed (make
install). The database stays for inspection."""
import os
import re
import statistics
import sys
import time

import psycopg

DB = "perf_feedback"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
CALLS = int(sys.argv[1]) if len(sys.argv) > 1 else 2000


def old_body():
    src = open(os.path.join(ROOT, "sql", "releases", "herald--0.14.0.sql")).read()
    body = re.search(r"CREATE\s+FUNCTION herald\.record_feedback\(.*?\n\$\$;", src, re.S).group(0)
    return re.sub(r"CREATE\s+FUNCTION herald\.record_feedback\(", "CREATE FUNCTION bench.record_feedback_0140(", body)


def main():
    with psycopg.connect(dbname="postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DB}")
    with psycopg.connect(dbname=DB, autocommit=True) as c:
        c.execute("CREATE EXTENSION herald")
        c.execute("CREATE SCHEMA bench")
        c.execute(old_body())
        c.execute("SELECT herald.create_workspace('acme', 'Acme')")
        n = CALLS * 4
        c.execute("""INSERT INTO herald.contacts (workspace_id, email)
                     SELECT 'acme', 'r' || i || '@example.com' FROM generate_series(1, %s) i""", (n,))
        c.execute("""INSERT INTO herald.broadcasts (workspace_id, name, definition, status)
                     VALUES ('acme', 'perf', '{}', 'sent')""")
        c.execute("""INSERT INTO herald.message_history (workspace_id, outbox_id, kind, status, contact_id, broadcast_id,
                                                        variation, dedupe_key, message_id, attempt)
                     SELECT 'acme', c.id, 'email', 'sent', c.id, (SELECT max(id) FROM herald.broadcasts), 'default',
                            'b:' || c.id, '<perf-' || c.id || '@herald>', 1
                       FROM herald.contacts c""")
        c.execute("VACUUM ANALYZE")
        ids = [r[0] for r in c.execute("SELECT id FROM herald.contacts ORDER BY id").fetchall()]
        times = {(kind, fn): [] for kind in ("opened", "hard_bounce") for fn in ("new", "0.14.0")}
        it = iter(ids)
        for _ in range(CALLS):
            for kind in ("opened", "hard_bounce"):
                for fn, name in (("new", "herald.record_feedback"), ("0.14.0", "bench.record_feedback_0140")):
                    mid = f"<perf-{next(it)}@herald>"
                    entry = f'[{{"kind": "{kind}", "message_id": "{mid}"}}]'
                    t = time.perf_counter()
                    c.execute(f"SELECT {name}(%s::jsonb)", (entry,))
                    times[(kind, fn)].append(time.perf_counter() - t)
        counted = c.execute("SELECT coalesce(sum(n), 0) FROM herald.broadcast_stats_delta WHERE metric = 'bounced'").fetchone()[0]
    print(f"record_feedback, one entry a call, {CALLS} calls each, in turns (ms a call, client clock)")
    for kind in ("opened", "hard_bounce"):
        med = {fn: statistics.median(times[(kind, fn)]) * 1000 for fn in ("new", "0.14.0")}
        p90 = {fn: statistics.quantiles(times[(kind, fn)], n=10)[8] * 1000 for fn in ("new", "0.14.0")}
        print(f"  {kind:12} 0.15.0 p50 {med['new']:.3f} p90 {p90['new']:.3f} | 0.14.0 p50 {med['0.14.0']:.3f} "
              f"p90 {p90['0.14.0']:.3f} | ratio p50 {med['new'] / med['0.14.0']:.2f}x")
    print(f"  bounces counted by 0.15.0 (each of its {CALLS} bounced messages once): {counted}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What the key of a message_history index costs in WAL, on tables shaped like message_history that
already hold PRELOAD rows (a history of some minutes or days), as complete() fills them: batches of 100
rows, a CHECKPOINT every CYCLE rows (what max_wal_size forces every few seconds under load). Each
variant has a table of its own with the history's primary key and the one index compared; the variants
run in turns, ROUNDS times, on an otherwise idle server (the WAL counters are the server's). Prints per
variant WAL bytes and full-page images per row (medians); asserts nothing.

    python3 tests/perf/history_index_wal_ab.py message_id|contact|automation [preload=2000000] [rows_per_round=60000] [rounds=4] [cycle=20000]

message_id: message_history_message_id_idx under the Message-ID before 0.9.0 (`<hash@herald>`, 32
random hex digits) and 0.9.0's (`<job id, 16 hex digits>.<hash>@herald>`).
contact: message_history_contact_idx as it is, (workspace_id, contact_id, created_at), against
(workspace_id, contact_id), whose equal keys btree deduplication folds into posting lists; 30,000
contacts, as in the soak.
automation: message_history_automation_idx the same way, (workspace_id, automation_id, created_at)
against (workspace_id, automation_id); 1,000 automations.

Runs as a Postgres superuser on the local socket, in the database bench_history_index_wal (dropped and
made again, and dropped at the end)."""
import statistics
import sys

import psycopg

WHICH = sys.argv[1] if len(sys.argv) > 1 else ""
PRELOAD = int(sys.argv[2]) if len(sys.argv) > 2 else 2_000_000
ROWS = int(sys.argv[3]) if len(sys.argv) > 3 else 60_000
ROUNDS = int(sys.argv[4]) if len(sys.argv) > 4 else 4
CYCLE = int(sys.argv[5]) if len(sys.argv) > 5 else 20_000
BATCH = 100
HOST = "/var/run/postgresql"
HASH_LED = "'<' || md5(random()::text) || '@herald>'"

# per variant: the Message-ID of the row whose id is `id` (the outbox id stands in for it: both rise
# with time) and the columns of the index compared
VARIANTS = {
    "message_id": {
        "hash-led (before 0.9.0)": (HASH_LED, "(message_id) WHERE message_id IS NOT NULL"),
        "job-led (0.9.0)": ("'<' || lpad(to_hex(id), 16, '0') || '.' || md5(random()::text) || '@herald>'",
                            "(message_id) WHERE message_id IS NOT NULL"),
    },
    "contact": {
        "(workspace, contact, created_at)": (HASH_LED, "(workspace_id, contact_id, created_at)"),
        "(workspace, contact)": (HASH_LED, "(workspace_id, contact_id)"),
    },
    "automation": {
        "(workspace, automation, created_at)": (HASH_LED, "(workspace_id, automation_id, created_at)"),
        "(workspace, automation)": (HASH_LED, "(workspace_id, automation_id)"),
    },
}
if WHICH not in VARIANTS:
    raise SystemExit(__doc__)
CHOSEN = VARIANTS[WHICH]


def wal(db):
    # this backend's WAL counters reach pg_stat_wal when its pending statistics are flushed (at most
    # once a second unless forced): forced, so a round's full-page images are not counted in the next
    db.execute("SELECT pg_stat_force_next_flush()")
    lsn, fpi = db.execute("SELECT pg_current_wal_insert_lsn(), wal_fpi FROM pg_stat_wal").fetchone()
    return lsn, fpi


def insert(db, table, form, n):
    # ids from the table's own sequence; the expression reads the id being inserted. created_at rises
    # row by row (clock_timestamp), as complete()'s rows' do over time, also within the preload
    db.execute(f"""INSERT INTO {table} (workspace_id, id, contact_id, automation_id, message_id, created_at)
                   SELECT 'acme', id, (random() * 30000)::int, (random() * 1000)::int, {form}, clock_timestamp()
                     FROM (SELECT nextval('{table}_seq') AS id FROM generate_series(1, %s)) s""", (n,))


with psycopg.connect(host=HOST, dbname="postgres", autocommit=True) as admin:
    admin.execute("DROP DATABASE IF EXISTS bench_history_index_wal WITH (FORCE)")
    admin.execute("CREATE DATABASE bench_history_index_wal")
db = psycopg.connect(host=HOST, dbname="bench_history_index_wal", autocommit=True)
tables = {}
for i, (name, (form, columns)) in enumerate(CHOSEN.items()):
    t = f"history_{i}"
    tables[name] = t
    db.execute(f"CREATE SEQUENCE {t}_seq")
    db.execute(f"""CREATE TABLE {t} (workspace_id text NOT NULL, id bigint NOT NULL, contact_id bigint,
                   automation_id bigint, message_id text, created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (workspace_id, id))""")
    db.execute(f"CREATE INDEX {t}_compared_idx ON {t} {columns}")
    insert(db, t, form, PRELOAD)
    db.execute(f"VACUUM ANALYZE {t}")
print(f"{PRELOAD:,} rows in each table; {ROWS:,} rows a round in batches of {BATCH}, "
      f"a CHECKPOINT every {CYCLE:,} rows, {ROUNDS} rounds per variant in turns")
results = {name: [] for name in CHOSEN}
for r in range(ROUNDS):
    for name in (list(CHOSEN) if r % 2 == 0 else list(reversed(CHOSEN))):
        t, form = tables[name], CHOSEN[name][0]
        db.execute("CHECKPOINT")
        lsn0, fpi0 = wal(db)
        done = 0
        while done < ROWS:
            insert(db, t, form, BATCH)
            done += BATCH
            if done % CYCLE == 0 and done < ROWS:
                db.execute("CHECKPOINT")
        lsn1, fpi1 = wal(db)
        nbytes = db.execute("SELECT pg_wal_lsn_diff(%s, %s)", (lsn1, lsn0)).fetchone()[0]
        results[name].append((float(nbytes) / ROWS, (fpi1 - fpi0) / ROWS))
for name, runs in results.items():
    b = statistics.median(x for x, _ in runs)
    f = statistics.median(y for _, y in runs)
    size = db.execute("SELECT pg_relation_size(%s)", (f"{tables[name]}_compared_idx",)).fetchone()[0]
    print(f"  {name:<34} {b:7.0f} B of WAL per row, {f:.3f} full-page images per row "
          f"(rounds: {', '.join(f'{x:.0f}' for x, _ in runs)} B); index {size / 2**20:.0f} MiB")
db.close()
with psycopg.connect(host=HOST, dbname="postgres", autocommit=True) as admin:
    admin.execute("DROP DATABASE bench_history_index_wal WITH (FORCE)")

#!/usr/bin/env python3
"""What reentry-always enrollments' entries in enrollments_entry_uq cost track() and tick: the index as
0.9.0 had it (every 'event:<id>' key, kept after the enrollment ends) against 0.10.0's (none), swapped
in turns in one database with herald installed. The workload is the ingest section's track() goal:
1,000 live automations, 10 of them triggered by the event (reentry always, start node `exit`), one
client calling track() once per event, then tick(1000) until nothing is due; a CHECKPOINT every CYCLE
events (what max_wal_size forces every few seconds under load). PRELOAD events are tracked and ticked
first (each leaves 10 ended enrollments: the history the 0.9.0 index kept). Prints per variant, as
medians of the rounds: WAL bytes and full-page images per event (the server's counters: run it on an
idle server), track() backend CPU and p50/p99 per call, tick backend CPU per event; asserts nothing.

    python3 tests/perf/entry_key_index_ab.py [preload=100000] [events_per_round=5000] [rounds=4] [cycle=1000]

Runs as root on the local socket (a superuser role of that name; reads the backend's /proc/<pid>/stat), in the
database bench_entry_key_ab (dropped and made again, and dropped at the end)."""
import json
import os
import statistics
import sys
import time

import psycopg

PRELOAD = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
EVENTS = int(sys.argv[2]) if len(sys.argv) > 2 else 5_000
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 4
CYCLE = int(sys.argv[4]) if len(sys.argv) > 4 else 1_000
CONTACTS = 30_000
HOST = "/var/run/postgresql"
TICKS = os.sysconf("SC_CLK_TCK")
INDEX = ("CREATE UNIQUE INDEX enrollments_entry_uq ON herald.enrollments "
         "(workspace_id, automation_id, contact_id, entry_key) WITH (fillfactor = 50) WHERE ")
VARIANTS = {
    "0.9.0: every key": "entry_key <> 'active' OR status IN ('active', 'waiting')",
    "0.10.0: no 'event:' keys": "entry_key = 'once' OR (entry_key = 'active' AND status IN ('active', 'waiting'))",
}


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICKS


def automation(name, kind):
    return json.dumps({"name": name, "trigger": {"event": kind, "filter": {"field": "event.plan", "op": "eq", "value": "pro"}},
                       "reentry": "always", "start": "x", "nodes": {"x": {"type": "exit"}}})


def drain(db):
    while db.execute("SELECT herald.tick(1000)").fetchone()[0] > 0:
        pass


def wal(db):
    db.execute("SELECT pg_stat_force_next_flush()")
    return db.execute("SELECT pg_current_wal_insert_lsn(), wal_fpi FROM pg_stat_wal").fetchone()


with psycopg.connect(host=HOST, dbname="postgres", autocommit=True) as admin:
    admin.execute("DROP DATABASE IF EXISTS bench_entry_key_ab WITH (FORCE)")
    admin.execute("CREATE DATABASE bench_entry_key_ab")
db = psycopg.connect(host=HOST, dbname="bench_entry_key_ab", autocommit=True)
db.execute("CREATE EXTENSION herald")
db.execute("SELECT herald.create_workspace('acme')")
for start in range(0, CONTACTS, 10_000):
    db.execute("SELECT herald.upsert_contacts('acme', %s::jsonb)",
               (json.dumps([{"email": f"c{i}@bench.example", "attributes": {"plan": "pro"}}
                            for i in range(start, min(CONTACTS, start + 10_000))]),))
db.execute("""SELECT herald.set_automation_status(herald.create_automation('acme', d::jsonb), 'live')
                FROM unnest(%s::text[]) d""",
           ([automation(f"hit {i}", "signup") for i in range(10)]
            + [automation(f"other {i}", f"other.{i}") for i in range(990)],))
for start in range(0, PRELOAD, 1_000):
    db.execute("SELECT herald.track_many('acme', %s::jsonb)",
               (json.dumps([{"email": f"c{(start + i) % CONTACTS}@bench.example", "kind": "signup",
                             "payload": {"plan": "pro"}} for i in range(1_000)]),))
    drain(db)
db.execute("VACUUM ANALYZE herald.enrollments")
pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]
track = "SELECT herald.track('acme', %s, 'signup', '{\"plan\": \"pro\"}'::jsonb)"
print(f"{PRELOAD:,} events tracked and ticked before ({PRELOAD * 10:,} ended enrollments); {EVENTS:,} events a "
      f"round, one track() a call, tick(1000) after each {CYCLE:,} with a CHECKPOINT; {ROUNDS} rounds per variant in turns")
results = {name: [] for name in VARIANTS}
n = 0
for r in range(ROUNDS):
    for name in (list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))):
        db.execute("DROP INDEX herald.enrollments_entry_uq")
        db.execute(INDEX + VARIANTS[name])
        db.execute("CHECKPOINT")
        (lsn0, fpi0), track_cpu, tick_cpu, lat = wal(db), 0.0, 0.0, []
        for done in range(EVENTS):
            c0, t0 = cpu_seconds(pid), time.perf_counter()
            db.execute(track, (f"c{n % CONTACTS}@bench.example",))
            lat.append(time.perf_counter() - t0)
            track_cpu += cpu_seconds(pid) - c0
            n += 1
            if (done + 1) % CYCLE == 0:
                c0 = cpu_seconds(pid)
                drain(db)
                tick_cpu += cpu_seconds(pid) - c0
                db.execute("CHECKPOINT")
        lsn1, fpi1 = wal(db)
        nbytes = float(db.execute("SELECT pg_wal_lsn_diff(%s, %s)", (lsn1, lsn0)).fetchone()[0])
        lat.sort()
        results[name].append({"wal": nbytes / EVENTS, "fpi": (fpi1 - fpi0) / EVENTS,
                              "track_cpu": track_cpu / EVENTS * 1e3, "tick_cpu": tick_cpu / EVENTS * 1e3,
                              "p50": lat[len(lat) // 2] * 1e3, "p99": lat[int(len(lat) * 0.99)] * 1e3})
        size = db.execute("SELECT pg_relation_size('herald.enrollments_entry_uq')").fetchone()[0]
        results[name][-1]["size"] = size
for name, runs in results.items():
    med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
    print(f"  {name:<26} per event: {med['wal']:6.0f} B of WAL, {med['fpi']:.2f} page images; track() "
          f"{med['track_cpu']:.3f} ms CPU, p50 {med['p50']:.2f} ms, p99 {med['p99']:.2f} ms; tick {med['tick_cpu']:.3f} ms "
          f"CPU (10 enrollments); index {med['size'] / 2**20:.1f} MiB (WAL by round: "
          f"{', '.join(str(round(x['wal'])) for x in runs)})")
db.close()
with psycopg.connect(host=HOST, dbname="postgres", autocommit=True) as admin:
    admin.execute("DROP DATABASE bench_entry_key_ab WITH (FORCE)")

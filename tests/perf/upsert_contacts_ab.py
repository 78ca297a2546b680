#!/usr/bin/env python3
"""upsert_contacts of release 0.6.0 against the installed one (issue 14), each in a fresh database of its
own (CREATE EXTENSION herald VERSION '0.6.0' / the default), each beside a plain INSERT ... SELECT of the
same rows into herald.contacts (another workspace of the same database): the ratio the README's goal is
about. The four take turns call by call (order reversed every other call), so a change of load falls on
all alike. First with contacts and events never analysed (autovacuum off), then after ANALYZE. Prints,
per state and side, contacts/s, the wall-clock ratio plain/herald, and the same ratio in backend CPU
(utime+stime of the backend from /proc: the figure that moves least on a shared machine).

    python3 tests/perf/upsert_contacts_ab.py [calls_per_state=20]

Needs make install (both versions' scripts are installed with it); runs as a Postgres superuser over the
local socket; drops and creates the databases bench_contacts_ab_old and bench_contacts_ab_new."""

import json
import os
import sys
import time

import psycopg

CALL = 10_000
CALLS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
PLANS = ["free", "pro", "team"]
ZONES = ["Europe/Paris", "America/New_York", "Asia/Tokyo", "UTC"]
HOST = "/var/run/postgresql"


def rows(start):
    """The bench's rows (bench/src/contacts.rs): new addresses, two attributes, a time zone."""
    return json.dumps([{"email": f"u{i}@contacts.example",
                        "attributes": {"first_name": f"User {i}", "plan": PLANS[i % 3]},
                        "timezone": ZONES[i % 4]} for i in range(start, start + CALL)])


def cpu(pid):
    """CPU seconds (user + system) the backend `pid` has used."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


admin = psycopg.connect(host=HOST, dbname="postgres", autocommit=True)
dbs = {}
for tag, version in (("old", "0.6.0"), ("new", None)):
    name = f"bench_contacts_ab_{tag}"
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.execute(f'CREATE DATABASE "{name}"')
    db = psycopg.connect(host=HOST, dbname=name, autocommit=True)
    db.execute(f"CREATE EXTENSION herald VERSION '{version}'" if version else "CREATE EXTENSION herald")
    db.execute("ALTER TABLE herald.contacts SET (autovacuum_enabled = off)")
    db.execute("ALTER TABLE herald.events SET (autovacuum_enabled = off)")
    db.execute("SELECT herald.create_workspace('ws'), herald.create_workspace('plain')")
    dbs[tag] = (db, db.execute("SELECT pg_backend_pid()").fetchone()[0])


def run(kind, tag, payload):
    """One call; its wall-clock and backend CPU seconds."""
    db, pid = dbs[tag]
    c0, t0 = cpu(pid), time.perf_counter()
    if kind == "herald":
        got = db.execute("SELECT inserted, rejected FROM herald.upsert_contacts('ws', %s::jsonb)", (payload,)).fetchone()
        assert got == (CALL, 0), got
    else:
        db.execute("""INSERT INTO herald.contacts (workspace_id, email, attributes, timezone)
                      SELECT 'plain', r.email, r.attributes, r.timezone
                        FROM jsonb_to_recordset(%s::jsonb) AS r(email text, attributes jsonb, timezone text)""",
                   (payload,))
    return time.perf_counter() - t0, cpu(pid) - c0


def state(label, first):
    total = {(k, t): [0.0, 0.0] for k in ("herald", "plain") for t in dbs}
    for n in range(CALLS):
        payload = rows((first + n) * CALL)
        order = [(k, t) for t in dbs for k in ("herald", "plain")]
        if n % 2:
            order.reverse()
        for k, t in order:
            wall, used = run(k, t, payload)
            total[(k, t)][0] += wall
            total[(k, t)][1] += used
    out = {"state": label, "loadavg": open("/proc/loadavg").read().split()[:3]}
    for t in dbs:
        h, p = total[("herald", t)], total[("plain", t)]
        out[t] = {"herald_per_s": round(CALLS * CALL / h[0]), "plain_per_s": round(CALLS * CALL / p[0]),
                  "ratio_wall": round(p[0] / h[0], 3), "ratio_cpu": round(p[1] / h[1], 3) if h[1] else None,
                  "herald_cpu_s": round(h[1], 2), "plain_cpu_s": round(p[1], 2)}
    print(json.dumps(out), flush=True)


state("never analysed", 0)
for db, _ in dbs.values():
    db.execute("ANALYZE herald.contacts")
    db.execute("ANALYZE herald.events")
state("analysed", CALLS)

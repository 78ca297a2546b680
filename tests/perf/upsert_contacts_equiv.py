#!/usr/bin/env python3
"""upsert_contacts of release 0.6.0 against the installed one on the same random batches (issue 14: the
0.7.0 import must return and record exactly what 0.6.0 did): repeated addresses in case and space
variants, invalid addresses, time zones and attributes, null-valued attributes at two depths, non-object
entries, unknown keys. Each batch goes to both (a fresh database each); the call's counts must match,
then the contacts, the events (kind, address, payload, contact in id order) and the rejections.

    python3 tests/perf/upsert_contacts_equiv.py

Needs make install; runs as a Postgres superuser over the local socket; drops and creates the databases
bench_contacts_eq_old and bench_contacts_eq_new."""
import json, random, psycopg
HOST="/var/run/postgresql"
random.seed(14)
admin = psycopg.connect(host=HOST, dbname="postgres", autocommit=True)
dbs = {}
for tag, ver in (("old", "0.6.0"), ("new", None)):
    name = f"bench_contacts_eq_{tag}"
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'); admin.execute(f'CREATE DATABASE "{name}"')
    db = psycopg.connect(host=HOST, dbname=name, autocommit=True)
    db.execute(f"CREATE EXTENSION herald VERSION '{ver}'" if ver else "CREATE EXTENSION herald")
    db.execute("SELECT herald.create_workspace('eq')")
    dbs[tag] = db
def entry():
    r = random.random()
    if r < 0.03: return random.choice([42, "x", None, [1]])
    n = random.randint(0, 30)
    e = {"email": random.choice([f"u{n}@ex.com", f"U{n}@EX.com ", f" u{n}@ex.com", "bad", f"u{n}@ex", 5])}
    if random.random() < 0.7:
        e["attributes"] = random.choice([{"a": random.randint(0, 3)}, {"b": None}, {"a": None, "c": {"d": None, "e": 1}}, {}, None, "str",
                                         {"a": random.randint(0, 3), "plan": random.choice(["x", "y"])}])
    if random.random() < 0.5:
        e["timezone"] = random.choice(["UTC", "Europe/Paris", None, "Mars/X", 3])
    if random.random() < 0.03: e["extra"] = 1
    if random.random() < 0.03: del e["email"]
    return e
for b in range(80):
    batch = json.dumps([entry() for _ in range(random.randint(0, 25))])
    res = {t: db.execute("SELECT * FROM herald.upsert_contacts('eq', %s::jsonb)", (batch,)).fetchone() for t, db in dbs.items()}
    assert res["old"] == res["new"], (b, res, batch)
q = {"contacts": "SELECT email, attributes, timezone FROM herald.contacts ORDER BY id",
     "events": "SELECT kind, email, payload, contact_id - (SELECT min(id) FROM herald.contacts) FROM herald.events ORDER BY id",
     "rejections": "SELECT position, input, reason FROM herald.contact_rejections ORDER BY batch, position"}
for k, sql in q.items():
    o, n = dbs["old"].execute(sql).fetchall(), dbs["new"].execute(sql).fetchall()
    assert o == n, (k, [x for x in zip(o, n) if x[0] != x[1]][:3])
    print(k, len(o), "identical")

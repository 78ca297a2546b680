#!/usr/bin/env python3
"""What users feel (issue 14): contacts/min through a live journey, from track_many to every email
delivered, with `herald run` sending to a local smtp-sink; then, in the same run, transactional send()
emails/s through the same daemon and sink, as the baseline.

Journey: email → branch on event.plan → email for pro (half of them) → exit.

    python3 tests/perf/journey.py [contacts=50000]

Needs make install build and postfix's smtp-sink (tests/setup.sh installs it)."""
import json
import os
import subprocess
import sys
import time

import psycopg

N = int(sys.argv[1]) if len(sys.argv) > 1 else 50000
DB = "perf_journey"
HOST = "/var/run/postgresql"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PORT = 2526

with psycopg.connect(host=HOST, dbname="postgres", autocommit=True) as admin:
    admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {DB} TEMPLATE template0")
c = psycopg.connect(host=HOST, dbname=DB, autocommit=True)
c.execute("CREATE EXTENSION herald")
c.execute("SELECT herald.create_workspace('w')")
c.execute("SELECT herald.upsert_template('w', 'welcome', 'Hi {{ contact.email }}', '<p>Welcome</p>')")
c.execute("SELECT herald.upsert_template('w', 'pro', 'Pro tips', '<p>Pro</p>')")
c.execute("""SELECT herald.set_automation_status(herald.create_automation('w', '{"name": "j", "trigger": {"event": "signup"},
  "start": "hello", "nodes": {"hello": {"type": "email", "template": "welcome", "next": "plan"},
  "plan": {"type": "branch", "paths": [{"when": {"field": "event.plan", "op": "eq", "value": "pro"}, "next": "tips"}], "default": "done"},
  "tips": {"type": "email", "template": "pro", "next": "done"}, "done": {"type": "exit"}}}'), 'live')""")

sink = subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{PORT}", "2000"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
env.update(DATABASE_URL=f"host={HOST} dbname={DB} user={os.environ.get('USER', 'root')}",
           HERALD_SMTP_URL_DEFAULT=f"smtp://127.0.0.1:{PORT}?tls=none&pool=32", HERALD_FROM="A <a@a.test>",
           HERALD_CONCURRENCY="128", RUST_LOG="warn")
daemon = subprocess.Popen([os.path.join(ROOT, "target/release/herald"), "run"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    time.sleep(2)
    started = time.time()
    for i in range(0, N, 1000):
        events = [{"email": f"c{g}@example.com", "kind": "signup", "payload": {"plan": "pro" if g % 2 == 0 else "free"}}
                  for g in range(i, min(N, i + 1000))]
        c.execute("SELECT herald.track_many('w', %s::jsonb)", (json.dumps(events),))
    while c.execute("SELECT count(*) FROM herald.enrollments WHERE status = 'completed'").fetchone()[0] < N:
        if time.time() - started > 900:
            sys.exit("journey: timed out")
        time.sleep(0.2)
    journey_s = time.time() - started
    journey_mails = c.execute("SELECT count(*) FROM herald.outbox WHERE status = 'done'").fetchone()[0]

    # the same daemon and sink, transactional email only
    c.execute("SELECT herald.send('w', 'c' || g || '@example.com', 'welcome') FROM generate_series(0, %s - 1) g", (N,))
    started = time.time()
    while c.execute("SELECT count(*) FROM herald.outbox WHERE status = 'done'").fetchone()[0] < journey_mails + N:
        if time.time() - started > 900:
            sys.exit("send: timed out")
        time.sleep(0.2)
    send_s = time.time() - started
finally:
    daemon.terminate()
    daemon.wait()
    sink.terminate()
print(f"journey: {N:,} contacts in {journey_s:.1f} s = {N / journey_s * 60:,.0f} contacts/min, "
      f"{journey_mails:,} emails = {journey_mails / journey_s:,.0f}/s")
print(f"send():  {N:,} emails in {send_s:.1f} s = {N / send_s:,.0f}/s; journey emails/s over send() emails/s: "
      f"{journey_mails / journey_s / (N / send_s):.2f}x")
c.close()
with psycopg.connect(host=HOST, dbname="postgres", autocommit=True) as admin:
    admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")

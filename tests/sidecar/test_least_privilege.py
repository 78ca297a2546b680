"""The production set-up of README's *Security*: the daemon logs in as a role that is only a member of
herald_worker, an application as a role that is only a member of herald_app with one workspace granted.
The daemon does all of its work with that (tick, claim, complete, reap, flush, prune, advance, /metrics),
and the application can act for its own workspace only."""

import json
import time
import urllib.request
import uuid

import psycopg
import pytest

from conftest import PGHOST, USER, free_port, wait_until

PASSWORD = "least-privilege-test"


@pytest.fixture
def roles(db):
    """Two LOGIN roles (names unique to this test), removed at the end. They log in over TCP with a
    password: the local socket maps OS users to roles (peer auth), and the tests run as one OS user."""
    suffix = uuid.uuid4().hex[:8]
    worker, app = f"hlp_worker_{suffix}", f"hlp_app_{suffix}"
    db.q(f"CREATE ROLE {worker} LOGIN PASSWORD '{PASSWORD}' IN ROLE herald_worker")
    db.q(f"CREATE ROLE {app} LOGIN PASSWORD '{PASSWORD}' IN ROLE herald_app")
    db.q(f'GRANT CONNECT ON DATABASE "{db.name}" TO {worker}, {app}')
    yield worker, app
    db.q(f"DELETE FROM herald.workspace_grants WHERE role_name IN ('{worker}', '{app}')")
    db.q(f'REVOKE CONNECT ON DATABASE "{db.name}" FROM {worker}, {app}')
    db.q(f"DROP ROLE IF EXISTS {worker}")
    db.q(f"DROP ROLE IF EXISTS {app}")


def url(db, role):
    return f"host=127.0.0.1 port=5432 dbname={db.name} user={role} password={PASSWORD} sslmode=disable"


def test_daemon_as_herald_worker_and_app_as_herald_app(db, smtp, sidecar, roles):
    worker, app = roles
    db.q("SELECT herald.create_workspace('other', 'Other')")
    db.q("SELECT herald.grant_workspace(%s, 'acme')", app)
    db.q("SELECT herald.upsert_template(w, 'welcome', 'Welcome {{ contact.email }}', '<p>Hello</p>') "
         "FROM unnest(ARRAY['acme', 'other']) w")
    db.q("""SELECT herald.set_automation_status(herald.create_automation('acme', '{"name": "w", "trigger": {"event": "signup"},
            "start": "hello", "nodes": {"hello": {"type": "email", "template": "welcome", "next": "wait"},
            "wait": {"type": "delay", "duration": "1 second", "next": "done"}, "done": {"type": "exit"}}}'), 'live')""")

    # the application, as its own role: its workspace works, another one is refused
    with psycopg.connect(url(db, app), autocommit=True) as conn:
        conn.execute("SELECT herald.track_many('acme', %s::jsonb)",
                     (json.dumps([{"email": f"p{i}@example.com", "kind": "signup"} for i in range(20)]),))
        conn.execute("SELECT herald.send('acme', 'buyer@example.com', 'welcome')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match='may not act for workspace "other"'):
            conn.execute("SELECT herald.track('other', 'x@example.com', 'signup')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT herald.claim('app', 10)")
        # reads see its own workspace only
        assert conn.execute("SELECT DISTINCT workspace_id FROM herald.contacts").fetchall() == [("acme",)]

    # the daemon, as a herald_worker member: sends, ticks journeys to their end, serves /metrics
    metrics = free_port()
    s = sidecar(DATABASE_URL=url(db, worker), HERALD_METRICS_ADDR=f"127.0.0.1:{metrics}")
    wait_until(lambda: smtp.count() == 21, timeout=60, what="21 messages")
    wait_until(lambda: db.one("SELECT count(*) FROM herald.enrollments WHERE status = 'completed'") == 20,
               timeout=60, what="20 journeys completed")
    assert db.counts() == {"done": 21}
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
    assert "herald_database_up 1" in body
    log = s.log()
    assert "permission denied" not in log, log[-3000:]
    assert "superuser" not in log.lower(), log[-3000:]
    # and it can do nothing else: the worker role cannot write contacts
    with psycopg.connect(url(db, worker), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT herald.upsert_contact('acme', 'w@example.com')")


def test_daemon_as_herald_worker_names_another_roles_long_transaction(db, sidecar, roles):
    """A snapshot held open by a session of another role (a report; here the tests' superuser) slows claim
    (README *Known limits*). The daemon, as a herald_worker member, names it in one WARN once it passes
    HERALD_LONG_TRANSACTION_WARN_SECONDS, shows its age in /metrics, and tells when it has ended."""
    worker, _ = roles
    metrics = free_port()
    s = sidecar(DATABASE_URL=url(db, worker), HERALD_METRICS_ADDR=f"127.0.0.1:{metrics}",
                HERALD_LONG_TRANSACTION_WARN_SECONDS=2)

    def age():
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
        return float(next(line for line in body.splitlines()
                          if line.startswith("herald_oldest_transaction_seconds ")).split()[1])

    wait_until(lambda: "running worker" in s.log(), timeout=30, what="the daemon running")
    assert age() == 0
    report = psycopg.connect(host=PGHOST, dbname=db.name, user=USER, application_name="nightly-report")
    try:
        report.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        report.execute("SELECT count(*) FROM herald.outbox").fetchone()
        pid = report.info.backend_pid
        wait_until(lambda: "nightly-report" in s.log(), timeout=20, what="the warning")
        [line] = [line for line in s.log().splitlines() if "nightly-report" in line]
        assert "WARN" in line and f"pid={pid}" in line and "idle in transaction" in line, line
        assert age() >= 2
        time.sleep(2.5)  # checked every second meanwhile: still one line
        assert s.log().count("nightly-report") == 1
    finally:
        report.rollback()
        report.close()
    wait_until(lambda: "the long transaction has ended" in s.log(), timeout=20, what="its end")
    wait_until(lambda: age() == 0, timeout=20, what="the gauge back at 0")
    assert "permission denied" not in s.log()

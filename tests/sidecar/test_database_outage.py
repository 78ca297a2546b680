"""`herald run` while the database goes away: a restart mid-run, a start while it is down, and what it
refuses to wait for. Everything runs against a throwaway cluster of this module's own (scratch_cluster),
never the shared 15/main, since these tests stop the server."""

import os
import re
import signal
import subprocess
import time
import urllib.request
import uuid
from collections import Counter

import psycopg
import pytest

from conftest import BIN, ROOT, SECRET, USER, Sidecar, free_port, message_id, wait_until
from scratch_cluster import ScratchCluster


@pytest.fixture(scope="module")
def cluster():
    c = ScratchCluster()
    yield c
    c.destroy()


class ScratchDb:
    """A database with herald in the scratch cluster. Every query opens its own connection, so the
    helper keeps working across server restarts."""

    def __init__(self, cluster, name):
        self.cluster = cluster
        self.name = name

    @property
    def url(self):
        return f"host={self.cluster.socket_dir} port={self.cluster.port} dbname={self.name} user={USER}"

    def q(self, sql, *params):
        with self.cluster.connect(dbname=self.name) as conn, conn.cursor() as cur:
            cur.execute(sql, params or None)
            return cur.fetchall() if cur.description else []

    def counts(self):
        return dict(self.q("SELECT status, count(*) FROM herald.outbox GROUP BY 1"))


@pytest.fixture
def scratch_db(cluster):
    if not cluster.running():
        cluster.start()
    name = "herald_outage_" + uuid.uuid4().hex[:8]
    cluster.admin_sql(f'CREATE DATABASE "{name}" OWNER "{USER}"')
    d = ScratchDb(cluster, name)
    d.q("CREATE EXTENSION herald")
    d.q("SELECT herald.create_workspace('acme', 'Acme')")
    d.q("""SELECT herald.upsert_template('acme', 'welcome', 'Welcome {{ contact.email }}',
            '<p>Your code is {{ variables.code }}.</p>', 'Your code is {{ variables.code }}.')""")
    yield d
    if not cluster.running():
        cluster.start()
    cluster.admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def queue(db, n):
    db.q("""SELECT herald.send('acme', format('user%%s@example.com', i), 'welcome', jsonb_build_object('code', i))
              FROM generate_series(0, %s - 1) i""", n)


def daemon_env(url, **overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env.update({
        "DATABASE_URL": url,
        "HERALD_FROM": "Acme <news@acme.test>",
        "HERALD_WEBHOOK_SECRET": SECRET,
        "HERALD_POLL_INTERVAL_MS": "200",
        "HERALD_SHUTDOWN_GRACE_SECONDS": "20",
        "RUST_LOG": "info",
        "NO_COLOR": "1",
    })
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@pytest.fixture
def daemon(smtp, tmp_path, request):
    """Factory: daemon(url, **env) starts `herald run` against the scratch database (the conftest
    `sidecar` fixture is tied to the shared cluster); every one started is stopped at the end."""
    started = []

    def start(url, **overrides):
        env = daemon_env(url, HERALD_SMTP_URL_DEFAULT=f"smtp://127.0.0.1:{smtp.port}?tls=none", **overrides)
        s = Sidecar(env, tmp_path / f"daemon-{len(started)}.log").start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for s in started:
            print(f"---- {s.log_path} (last 80 lines)")
            print("\n".join(s.log().splitlines()[-80:]))


def scrape(port):
    """The unlabelled samples of /metrics, as floats; {} when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z_]+) (\S+)$", text, re.M)}


def warnings_after(log, marker):
    """WARN/ERROR lines from the first line containing `marker` on."""
    lines = log.splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    return [line for line in lines[start:] if " WARN " in line or " ERROR " in line]


def test_database_restart_mid_run_loses_and_repeats_nothing(cluster, scratch_db, smtp, daemon):
    """The server stops for 12 s while jobs are in flight, longer than their 5 s lease: their results
    wait in the daemon and are recorded once it is back, before its own reaper may take the expired
    leases (which would send them again)."""
    n = 300
    queue(scratch_db, n)
    # slow enough that jobs are in flight (sent, result not yet recorded) when the server stops
    smtp.delay = 0.25
    port = free_port()
    d = daemon(scratch_db.url, HERALD_CONCURRENCY=16, HERALD_LEASE_SECONDS=5, HERALD_METRICS_ADDR=f"127.0.0.1:{port}")
    wait_until(lambda: smtp.count() >= 40, timeout=30, what="the first 40 messages")
    assert scrape(port)["herald_database_up"] == 1
    assert scratch_db.counts().get("leased", 0) > 0, "jobs in flight when the database stops"

    cluster.stop("fast")
    stopped = time.monotonic()
    at_stop = smtp.count()
    samples = []
    while time.monotonic() - stopped < 12:
        samples.append(scrape(port))
        time.sleep(0.5)
    assert d.running()
    cluster.start()
    restarted = time.monotonic()

    # the daemon said it was waiting, and kept what it could not record
    assert any(s.get("herald_database_up") == 0 for s in samples), samples
    assert max(s.get("herald_database_down_seconds", 0) for s in samples) >= 5
    held = max(s.get("herald_results_unrecorded", 0) for s in samples)
    assert held > 0, "no result was waiting for the database: the outage came too late to test anything"
    assert at_stop < n

    wait_until(lambda: scratch_db.counts() == {"done": n}, timeout=60, what=f"all {n} jobs done after the restart")
    back_in = time.monotonic() - restarted
    wait_until(lambda: scrape(port).get("herald_database_up") == 1, what="herald_database_up 1 again")
    after = scrape(port)
    assert after["herald_database_down_seconds"] == 0
    assert after["herald_results_unrecorded"] == 0

    # every message arrived exactly once, under the Message-ID its job and dedupe key give
    keys = {email: (key, job) for email, key, job in scratch_db.q(
        "SELECT c.email, o.dedupe_key, o.id FROM herald.outbox o JOIN herald.contacts c ON c.id = o.contact_id")}
    copies = Counter(msg["Message-ID"] for _, msg, _ in smtp.snapshot())
    assert sum(copies.values()) == n, f"{sum(copies.values())} messages for {n} jobs"
    assert set(copies) == {message_id("acme", k, j) for k, j in keys.values()}
    assert max(copies.values()) == 1
    by_rcpt = Counter(r for rcpts, _, _ in smtp.snapshot() for r in rcpts)
    assert set(by_rcpt) == set(keys) and max(by_rcpt.values()) == 1

    log = d.log()
    assert log.count("waiting for the database") == 1, log
    assert len(re.findall(r"database is back after \d+ s", log)) == 1, log
    # one line about the outage, not one per component per retry (a complete() that committed just as
    # the server went down is sent again and its results ignored, harmlessly: the server's WARNING says so)
    unexpected = [line for line in warnings_after(log, "LISTEN connection lost")
                  if not any(s in line for s in ("LISTEN connection lost", "waiting for the database",
                                                 "complete: ignored result"))]
    assert unexpected == [], unexpected
    print(f"outage 12 s: {at_stop} messages before it, {held:.0f} results held through it; "
          f"all {n} done {back_in:.1f} s after the restart")


def test_started_while_the_database_is_down_waits_then_works(cluster, scratch_db, smtp, daemon):
    queue(scratch_db, 20)
    cluster.stop("fast")
    try:
        port = free_port()
        d = daemon(scratch_db.url, HERALD_METRICS_ADDR=f"127.0.0.1:{port}")
        quitter = daemon(scratch_db.url)
        wait_until(lambda: "waiting for the database" in d.log() and "waiting for the database" in quitter.log(),
                   timeout=15, what="both daemons waiting")
        # SIGTERM while waiting stops at once, cleanly
        asked = time.monotonic()
        quitter.signal(signal.SIGTERM)
        assert quitter.wait(10) == 0
        assert time.monotonic() - asked < 3
        assert "stopped before the database was reachable" in quitter.log()

        time.sleep(2)
        assert d.running()
        m = scrape(port)
        assert m["herald_database_up"] == 0 and m["herald_database_down_seconds"] >= 2, m
        assert "error connecting to server" in d.log()  # the reason is in the waiting line
    finally:
        cluster.start()
    wait_until(lambda: scratch_db.counts() == {"done": 20}, timeout=30, what="20 jobs done once the database is up")
    assert smtp.count() == 20
    assert re.search(r'connected to database "herald_outage_\w+" after waiting \d+ s', d.log())
    assert scrape(port)["herald_database_up"] == 1
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0


def test_sigterm_while_the_database_is_away_gives_up_after_a_grace(cluster, scratch_db, smtp, daemon):
    """Stopping while results cannot be recorded must not hang: after the completer's grace the daemon
    exits 0 and says how many it dropped; their jobs run again once their lease expires."""
    n = 100
    queue(scratch_db, n)
    smtp.delay = 0.25
    first = daemon(scratch_db.url, HERALD_CONCURRENCY=8, HERALD_LEASE_SECONDS=3)
    wait_until(lambda: smtp.count() >= 16, timeout=30, what="the first 16 messages")
    cluster.stop("fast")
    try:
        time.sleep(1)
        asked = time.monotonic()
        first.signal(signal.SIGTERM)
        assert first.wait(30) == 0
        took = time.monotonic() - asked
        assert took < 20, took
        gave_up = re.search(r"gave up on recording results at shutdown.* results=(\d+)", first.log())
        assert gave_up, first.log()
        lost = int(gave_up[1])
        # the jobs in flight at the stop, and the batch the completer was recording then
        assert 1 <= lost <= 2 * 8, lost
    finally:
        cluster.start()
    daemon(scratch_db.url, HERALD_CONCURRENCY=8, HERALD_LEASE_SECONDS=3)
    wait_until(lambda: scratch_db.counts() == {"done": n}, timeout=40, what=f"all {n} done by the next daemon")
    copies = Counter(msg["Message-ID"] for _, msg, _ in smtp.snapshot())
    assert len(copies) == n
    # only the jobs whose results were dropped came twice, each under its first Message-ID
    assert sum(copies.values()) - n <= lost
    print(f"SIGTERM with the database away: exited after {took:.1f} s, {lost} results dropped, "
          f"{sum(copies.values()) - n} messages sent twice")


def run_cli(args, url, timeout=30):
    started = time.monotonic()
    r = subprocess.run([BIN, *args], env=daemon_env(url), cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, r.stderr, time.monotonic() - started


def test_refuses_at_once_what_waiting_cannot_fix(cluster, tmp_path):
    if not cluster.running():
        cluster.start()
    # the cluster's own database has no herald extension: status, import and run refuse and say what to do
    bare = cluster.url
    csv = tmp_path / "contacts.csv"
    csv.write_text("email\na@example.com\n")
    for args in (["status"], ["import", str(csv), "--workspace", "acme"], ["run"]):
        rc, err, took = run_cli(args, bare)
        assert rc != 0, (args, err)
        assert f'the herald extension is not installed in database "{cluster.dbname}"' in err, (args, err)
        assert "CREATE EXTENSION herald" in err, err
        assert took < 10, (args, took)

    # no such database, and a refused password: `herald run` stops with the reason instead of waiting
    sock = f"host={cluster.socket_dir} port={cluster.port} user={USER}"
    rc, err, took = run_cli(["run"], f"{sock} dbname=no_such_db")
    assert rc != 0 and 'database "no_such_db" does not exist' in err and "retrying cannot fix this" in err, err
    assert "waiting for the database" not in err and took < 10, (err, took)
    tcp = f"host=127.0.0.1 port={cluster.port} user={USER} password=wrong dbname={cluster.dbname}"
    rc, err, took = run_cli(["run"], tcp)
    assert rc != 0 and "password authentication failed" in err and "retrying cannot fix this" in err, err
    assert "waiting for the database" not in err and took < 10, (err, took)

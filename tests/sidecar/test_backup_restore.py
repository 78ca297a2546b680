"""Backup and restore (issue 10): a herald database in the middle of everything (tests/fixtures/midflight.sql)
goes through `pg_dump -Fc` + `pg_restore` and through a plain `pg_dump` + `psql -f`. The copy must hold
exactly the same rows and sequence positions (tests/fixtures/table_checksums.sql), loading it must run
none of herald's triggers (no NOTIFY reaches a listener, no row is added: no enrollment is made again),
and the stats must read the same. Then `herald run` on the copy picks up where the original stopped:
every job that was pending or leased in the source arrives exactly once at a real SMTP server (the
leased ones once their 2-second lease has expired), the journeys waiting on those jobs move on, the
broadcast that was part-way through its enqueue finishes with every recipient queued and sent once,
held jobs of the paused broadcast and enrollments of the paused automation stay where they were, and
a normal session on the copy dispatches events again.

The fixture's webhook and decide nodes call an HTTP receiver this module starts on loopback (its URL
goes into the fixture as the psql variable `receiver`); it answers /crm with a score and /decide with
{"tier": "gold"}.
"""

import difflib
import email.parser
import email.policy
import json
import os
import subprocess
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest
from aiosmtpd.controller import Controller

from conftest import PGHOST, ROOT, SECRET, USER, Sidecar, free_port, message_id, wait_until

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
MIDFLIGHT = os.path.join(FIXTURES, "midflight.sql")
CHECKSUMS = os.path.join(FIXTURES, "table_checksums.sql")
BIG_BROADCAST = "Spring promo"      # globex, one chunk of 10,000 enqueued of its 11,975 recipients


# ------------------------------------------------------------------------------------------- helpers

def admin(sql):
    for attempt in range(5):
        try:
            with psycopg.connect(host=PGHOST, dbname="postgres", user=USER, autocommit=True) as c:
                c.execute(sql)
            return
        except psycopg.errors.ObjectInUse:
            # CREATE DATABASE … TEMPLATE template0 is refused while someone else is connected to it
            if attempt == 4:
                raise
            time.sleep(0.5)


def create_db(name):
    admin(f'CREATE DATABASE "{name}" TEMPLATE template0')


def drop_db(name):
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def connect(name):
    return psycopg.connect(host=PGHOST, dbname=name, user=USER, autocommit=True)


def q(conn, sql, *params):
    with conn.cursor() as cur:
        cur.execute(sql, params or None)
        return cur.fetchall() if cur.description else []


def one(conn, sql, *params):
    rows = q(conn, sql, *params)
    return rows[0][0] if rows else None


def run(cmd, timeout=120):
    """Runs a client program; returns (exit code, stdout, stderr)."""
    env = dict(os.environ, PGHOST=PGHOST, PGUSER=USER)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def checksums(db):
    code, out, err = run(["psql", "-XAt", "-v", "ON_ERROR_STOP=1", "-d", db, "-f", CHECKSUMS])
    assert code == 0, err
    return out


def stats(conn):
    """automation_stats and broadcast_stats of every automation and broadcast, as one comparable dict."""
    result = {}
    for (a,) in q(conn, "SELECT id FROM herald.automations ORDER BY id"):
        result[("automation", a)] = q(conn, "SELECT node, metric, value FROM herald.automation_stats(%s)", a)
    for (b,) in q(conn, "SELECT id FROM herald.broadcasts ORDER BY id"):
        result[("broadcast", b)] = q(conn, "SELECT variation, metric, value FROM herald.broadcast_stats(%s)", b)
    return result


class Mailbox:
    """A lean SMTP sink (aiosmtpd): keeps (recipients, raw message) and parses headers only when asked.
    conftest's SmtpHandler parses every whole message as it arrives, which made the Python side the
    bottleneck of a 12,000-message run on two cores."""

    def __init__(self):
        self.lock = threading.Lock()
        self.raw = []
        for attempt in range(5):
            self.port = free_port()
            self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
            try:
                self.controller.start()
                break
            except Exception:
                if attempt == 4:     # the port was taken between choosing and binding it
                    raise

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.raw.append((list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 queued"

    def count(self):
        with self.lock:
            return len(self.raw)

    def snapshot(self, start=0):
        """[(recipients, headers)] of the messages from index `start` on."""
        with self.lock:
            raw = self.raw[start:]
        parser = email.parser.BytesHeaderParser(policy=email.policy.default)
        return [(rcpts, parser.parsebytes(content)) for rcpts, content in raw]

    def close(self):
        self.controller.stop()


class Receiver:
    """The HTTP end of the fixture's webhook (/crm) and decide (/decide) nodes; records every request."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with receiver.lock:
                    receiver.requests.append((self.path, body))
                reply = {"/crm": {"score": 77}, "/decide": {"tier": "gold"}}.get(self.path, {"ok": True})
                data = json.dumps(reply).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_PUT = do_POST

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def snapshot(self):
        with self.lock:
            return list(self.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def source(receiver, tmp_path_factory):
    """The mid-flight database, its checksums and stats, and a dump in each format. Nothing runs against
    it after the fixture, so its checksums stay valid."""
    name = "herald_br_src_" + uuid.uuid4().hex[:10]
    create_db(name)
    try:
        with connect(name) as c:
            c.execute("CREATE EXTENSION herald")
            version = one(c, "SELECT extversion FROM pg_extension WHERE extname = 'herald'")
        code, out, err = run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-v", f"receiver={receiver.url}",
                              "-d", name, "-f", MIDFLIGHT])
        assert code == 0, f"midflight.sql failed:\n{out}\n{err}"
        with connect(name) as c:
            source_stats = stats(c)
        sums = checksums(name)
        folder = tmp_path_factory.mktemp("dumps")
        dumps = {"custom": str(folder / "herald.dump"), "plain": str(folder / "herald.sql")}
        code, _, err = run(["pg_dump", "-Fc", "-d", name, "-f", dumps["custom"]])
        assert code == 0, err
        code, _, err = run(["pg_dump", "-d", name, "-f", dumps["plain"]])
        assert code == 0, err
        yield {"name": name, "version": version, "checksums": sums, "stats": source_stats, "dumps": dumps}
    finally:
        drop_db(name)


@pytest.fixture
def smtp():
    m = Mailbox()
    yield m
    m.close()


@pytest.fixture
def target():
    name = "herald_br_dst_" + uuid.uuid4().hex[:10]
    create_db(name)
    yield name
    drop_db(name)


# -------------------------------------------------------------------------------------------- the test

@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_dump_restore_then_run(fmt, source, target, receiver, smtp, tmp_path):
    # ---- restore, with a session of the target listening on herald's channels the whole time
    with connect(target) as listener:
        listener.execute('LISTEN "herald.outbox"')
        listener.execute('LISTEN "herald.tick"')
        if fmt == "custom":
            cmd = ["pg_restore", "--exit-on-error", "-d", target, source["dumps"]["custom"]]
        else:
            cmd = ["psql", "-X", "-q", "-o", "/dev/null", "-v", "ON_ERROR_STOP=1", "-d", target,
                   "-f", source["dumps"]["plain"]]
        started = time.monotonic()
        code, out, err = run(cmd)
        restore_s = time.monotonic() - started
        assert code == 0, f"{cmd[0]} failed ({code}):\n{out[-3000:]}\n{err[-3000:]}"
        assert "ERROR" not in err, err

        # ---- the copy is the source, row for row and sequence for sequence
        restored = checksums(target)
        assert restored == source["checksums"], "restored tables/sequences differ from the source:\n" + "\n".join(
            difflib.unified_diff(source["checksums"].splitlines(), restored.splitlines(), "source", "restored", lineterm=""))
        assert "rows=0 " not in restored

        # ---- and loading it ran none of herald's triggers: nothing was notified (no row was added, no
        #      enrollment made again, no waiting journey woken: the checksums above)
        notes = [(n.channel, n.payload) for n in listener.notifies(timeout=1.0)]
        assert notes == [], f"the restore sent notifications: {notes[:10]}"
        # (the listener does hear what is sent now: the check above could not pass by deafness)
        with connect(target) as other:
            other.execute("SELECT pg_notify('herald.tick', 'control')")
        heard = [(n.channel, n.payload) for n in listener.notifies(timeout=5.0, stop_after=1)]
        assert heard == [("herald.tick", "control")]

    db = connect(target)
    try:
        assert one(db, "SELECT extversion FROM pg_extension WHERE extname = 'herald'") == source["version"]
        # ---- stats read the same before the daemon touches anything
        assert stats(db) == source["stats"]

        # ---- what the daemon must deliver: every email job pending or leased in the copy, to an address
        #      not suppressed; what it must not: every other email job known now
        rows = q(db, """
            SELECT o.id, o.workspace_id, o.dedupe_key, o.status, c.email,
                   EXISTS (SELECT 1 FROM herald.suppressions s WHERE s.workspace_id = o.workspace_id AND s.email = c.email)
              FROM herald.outbox o JOIN herald.contacts c ON c.workspace_id = o.workspace_id AND c.id = o.contact_id
             WHERE o.kind = 'email'""")
        due = {message_id(ws, key, job): (job, email) for job, ws, key, status, email, supp in rows
               if status in ("pending", "leased") and not supp}
        leased = {message_id(ws, key, job) for job, ws, key, status, _, supp in rows if status == "leased"}
        suppressed = {message_id(ws, key, job): job for job, ws, key, status, _, supp in rows
                      if status in ("pending", "leased") and supp}
        never = {message_id(ws, key, job) for job, ws, key, status, _, _ in rows if status not in ("pending", "leased")}
        finished = {job: status for job, _, _, status, _, _ in rows if status not in ("pending", "leased")}
        assert leased and suppressed and len(due) > 10_000
        held_before = one(db, "SELECT count(*) FROM herald.outbox WHERE status = 'held'")
        b3, enqueued, ws3 = q(db, "SELECT id, enqueued, workspace_id FROM herald.broadcasts WHERE name = %s", BIG_BROADCAST)[0]
        audience = one(db, """SELECT count(*) FROM herald.contacts c WHERE c.workspace_id = %s AND NOT EXISTS (
                                SELECT 1 FROM herald.suppressions s WHERE s.workspace_id = c.workspace_id AND s.email = c.email)""", ws3)
        assert enqueued == 10_000 < audience
        # journeys parked on a job the daemon has to do (email, webhook or decide), by enrollment id
        parked = dict(q(db, """SELECT e.id, o.kind FROM herald.enrollments e
                                 JOIN herald.outbox o ON o.workspace_id = e.workspace_id AND o.dedupe_key = e.wait_job
                                WHERE e.status = 'waiting' AND e.wait_kind = 'job' AND o.status IN ('pending', 'leased')"""))
        assert set(parked.values()) == {"email", "webhook", "decide"}
        paused = q(db, """SELECT e.id, e.current_node FROM herald.enrollments e JOIN herald.automations a ON a.id = e.automation_id
                           WHERE a.status = 'paused' ORDER BY e.id""")
        assert paused
        requests_before = len(receiver.snapshot())

        # ---- herald run on the copy
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
        env.update({
            "DATABASE_URL": f"host={PGHOST} dbname={target} user={USER}",
            "HERALD_SMTP_URL_DEFAULT": f"smtp://127.0.0.1:{smtp.port}?tls=none",
            # the fixture's provider acme/archive is of kind file: herald run refuses to start without its mailbox
            "HERALD_MAILDIR": str(tmp_path / "mailbox"),
            "HERALD_FROM": "Herald <herald@restore.test>",
            "HERALD_WEBHOOK_SECRET": SECRET,
            "HERALD_WEBHOOK_ALLOW": "127.0.0.1",
            "HERALD_POLL_INTERVAL_MS": "200",
            "HERALD_CONCURRENCY": "128",
            "HERALD_SHUTDOWN_GRACE_SECONDS": "20",
            "RUST_LOG": "info",
            "NO_COLOR": "1",
        })
        daemon = Sidecar(env, tmp_path / "herald-run.log").start()
        try:
            def settled():
                open_jobs = one(db, "SELECT count(*) FROM herald.outbox WHERE status IN ('pending', 'leased')")
                status = one(db, "SELECT status FROM herald.broadcasts WHERE id = %s", b3)
                still_parked = one(db, "SELECT count(*) FROM herald.enrollments WHERE id = ANY(%s) AND status = 'waiting' AND wait_kind = 'job'",
                                   list(parked))
                # journeys that were active (due, delayed or never ticked) have moved on, except the paused ones
                still_active = one(db, """SELECT count(*) FROM herald.enrollments e JOIN herald.automations a ON a.id = e.automation_id
                                           WHERE e.status = 'active' AND a.status <> 'paused'""")
                return open_jobs == 0 and status == "sent" and still_parked == 0 and still_active == 0
            try:
                wait_until(settled, timeout=75, interval=0.25, what="the copy's queue to drain")
            except AssertionError:
                print(daemon.log()[-6000:])
                print(q(db, "SELECT kind, status, count(*) FROM herald.outbox GROUP BY 1, 2 ORDER BY 1, 2"))
                raise
            drained_s = time.monotonic() - started

            messages = smtp.snapshot()
            ids = Counter(m["Message-ID"] for _, m in messages)
            twice = [k for k, n in ids.items() if n > 1]
            assert not twice, f"{len(twice)} messages arrived more than once, e.g. {twice[:3]}"
            missing = set(due) - set(ids)
            assert not missing, f"{len(missing)} jobs pending/leased in the source never arrived, e.g. {sorted(missing)[:3]}"
            by_id = {m["Message-ID"]: rcpts for rcpts, m in messages}
            wrong = [mid for mid, (_, email) in due.items() if by_id[mid] != [email]]
            assert not wrong, f"delivered to the wrong recipient: {wrong[:3]}"
            assert leased <= set(ids), "leased jobs arrive once their lease has expired"
            assert not (never & set(ids)), "a job that was done, failed, dead, cancelled or held in the source was sent"
            assert not (set(suppressed) & set(ids)), "mail to a suppressed address was sent"
            assert {s for (s,) in q(db, "SELECT status FROM herald.outbox WHERE id = ANY(%s)", list(suppressed.values()))} == {"cancelled"}
            # done, failed, dead, cancelled and held jobs of the source stay as they were (dead until a redrive)
            assert dict(q(db, "SELECT id, status FROM herald.outbox WHERE id = ANY(%s)", list(finished))) == finished

            # the broadcast that stopped mid-enqueue: every recipient queued once and sent once
            total, distinct, sent = q(db, """SELECT count(*), count(DISTINCT contact_id), count(*) FILTER (WHERE status = 'done')
                                               FROM herald.outbox WHERE broadcast_id = %s""", b3)[0]
            assert total == distinct == sent == audience
            assert one(db, "SELECT enqueued FROM herald.broadcasts WHERE id = %s", b3) == audience
            b3_rcpts = Counter(r for rcpts, m in messages for r in rcpts if r.endswith("@globex.test"))
            assert len(b3_rcpts) == audience and set(b3_rcpts.values()) == {1}
            sent_stat = one(db, "SELECT sum(value) FROM herald.broadcast_stats(%s) WHERE metric = 'sent'", b3)
            assert sent_stat == audience

            # the journeys waiting on those jobs moved on (to their wait_event node, or to the end)
            moved = q(db, """SELECT e.id, e.status, e.current_node, e.wait_kind FROM herald.enrollments e
                              WHERE e.id = ANY(%s) ORDER BY e.id""", list(parked))
            for eid, status, node, wait_kind in moved:
                kind = parked[eid]
                if kind == "email":     # the onboarding welcome email: next is the wait for 'activated'
                    assert (status, node, wait_kind) == ("waiting", "gate", "event"), (eid, status, node)
                else:                   # webhook -> decide (gold) -> gold_mail -> done
                    assert (status, node) == ("completed", "done"), (eid, status, node)
            calls = receiver.snapshot()[requests_before:]
            journey_calls = Counter(p for p, _ in calls if p != "/results")
            assert journey_calls == {"/crm": 2, "/decide": 3}, journey_calls
            # the source's results subscription (0.3.0) goes on after the restore: each result once, in
            # order, after the ones it had delivered before the dump
            delivered = [r["id"] for p, body in calls if p == "/results" for r in json.loads(body)["results"]]
            assert delivered == sorted(set(delivered)), delivered

            # what was paused stays paused
            assert one(db, "SELECT count(*) FROM herald.outbox WHERE status = 'held'") == held_before
            assert q(db, """SELECT e.id, e.current_node FROM herald.enrollments e JOIN herald.automations a ON a.id = e.automation_id
                             WHERE a.status = 'paused' AND e.status = 'active' ORDER BY e.id""") == paused

            # ---- a normal session on the copy is no restore: events dispatch again (they wake a journey
            #      parked on a wait_event node and enrol a new contact) and the daemon carries them on
            before = smtp.count()
            q(db, "SELECT herald.track('acme', 'c09@acme.test', 'activated', '{}')")
            q(db, "SELECT herald.track('acme', 'fresh@acme.test', 'signup', '{\"source\": \"after-restore\"}')")
            wait_until(lambda: one(db, """SELECT e.wait_kind FROM herald.enrollments e JOIN herald.contacts c ON c.id = e.contact_id
                                          WHERE c.email = 'c09@acme.test' AND e.automation_id = (
                                                SELECT id FROM herald.automations WHERE name = 'Onboarding')""") == "approval",
                       timeout=15, what="c09 to wait for an approval")
            wait_until(lambda: smtp.count() == before + 1, timeout=15, what="the new contact's welcome email")
            (rcpts, msg), = smtp.snapshot(before)
            assert rcpts == ["fresh@acme.test"] and msg["Subject"].startswith("Welcome aboard")
        finally:
            daemon.stop()
        log = daemon.log()
        # the tests connect as a superuser, which herald run rightly warns about; nothing else may warn
        assert not [l for l in log.splitlines() if (" WARN " in l and "connected as a superuser" not in l)
                    or " ERROR " in l or "panicked" in l], log[-4000:]
        print(f"{fmt}: restore {restore_s:.1f}s, drained {drained_s:.1f}s after the restore began, "
              f"{len(messages)} messages")
    finally:
        db.close()


def test_parallel_restore(source, target):
    """`pg_restore -j 2` (restore only: checksums and exit code). It loads herald's tables in parallel and
    unordered, so it works only because no foreign key links two herald tables."""
    code, out, err = run(["pg_restore", "--exit-on-error", "-j", "2", "-d", target, source["dumps"]["custom"]])
    assert code == 0, err[-2000:]
    assert checksums(target) == source["checksums"]

"""End-to-end harness for `herald run`: a fresh database per test, a real SMTP server (aiosmtpd), a real
HTTP server (http.server), and the daemon as a child process pointed at them. Everything on loopback."""

import asyncio
import email
import email.policy
import getpass
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest
from aiosmtpd.controller import Controller

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BIN = os.environ.get("HERALD_BIN", os.path.join(ROOT, "target", "release", "herald"))
PGHOST = os.environ.get("PGHOST", "/var/run/postgresql")
USER = getpass.getuser()
SECRET = "test-secret"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout=30.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def message_id(workspace, dedupe_key, job):
    """The Message-ID herald gives the job `job` (its outbox id): the id leads, as 16 hex digits."""
    return f"<{job:016x}." + hashlib.sha256(f"{workspace}\n{dedupe_key}".encode()).hexdigest()[:32] + "@herald>"


def signature_ok(headers, body):
    ts = headers.get("X-Herald-Timestamp")
    sig = headers.get("X-Herald-Signature")
    if not ts or not sig:
        return False
    expected = "sha256=" + hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, sig)


# --------------------------------------------------------------------------------------------- database

class Database:
    def __init__(self, name):
        self.name = name
        self.conn = psycopg.connect(host=PGHOST, dbname=name, user=USER, autocommit=True)

    @property
    def url(self):
        return f"host={PGHOST} dbname={self.name} user={USER}"

    def q(self, sql, *params):
        with self.conn.cursor() as cur:
            cur.execute(sql, params or None)
            return cur.fetchall() if cur.description else []

    def one(self, sql, *params):
        rows = self.q(sql, *params)
        return rows[0][0] if rows else None

    def counts(self):
        return dict(self.q("SELECT status, count(*) FROM herald.outbox GROUP BY 1"))


@pytest.fixture
def db():
    name = "herald_sidecar_" + uuid.uuid4().hex[:10]
    # from template0: CREATE DATABASE from template1 fails while anyone else is connected to template1
    for attempt in range(5):
        try:
            with psycopg.connect(host=PGHOST, dbname="postgres", user=USER, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
            break
        except psycopg.errors.ObjectInUse:
            if attempt == 4:
                raise
            time.sleep(0.5)
    d = Database(name)
    d.q("CREATE EXTENSION herald")
    d.q("SELECT herald.create_workspace('acme', 'Acme')")
    yield d
    d.conn.close()
    with psycopg.connect(host=PGHOST, dbname="postgres", user=USER, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ------------------------------------------------------------------------------------------------- SMTP

class SmtpHandler:
    """Stores accepted messages; can answer 451 once per recipient (at DATA), 550 or another refusal (at RCPT),
    or be slow."""

    def __init__(self):
        self.lock = threading.Lock()
        self.messages = []          # (rcpt list, parsed message, raw bytes)
        self.refusals = []          # (rcpt, code)
        self.fail_once = set()      # recipients answered 451 at their first DATA
        self.reject = set()         # recipients answered 550 5.1.1 at RCPT
        self.replies = {}           # recipient -> another refusal answered at RCPT ("550 5.7.1 …")
        self.delay = 0.0            # seconds before answering DATA
        self.connections = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        with self.lock:
            self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.reject:
            with self.lock:
                self.refusals.append((address, 550))
            return "550 5.1.1 mailbox unavailable"
        if address in self.replies:
            reply = self.replies[address]
            with self.lock:
                self.refusals.append((address, int(reply[:3])))
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            hit = [r for r in envelope.rcpt_tos if r in self.fail_once]
            for r in hit:
                self.fail_once.discard(r)
                self.refusals.append((r, 451))
        if hit:
            return "451 4.3.0 try later"
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        # stored before the (optional) delay of the 250 reply: a client that dies in between has had its
        # message taken, as with a real server, and will send it again
        with self.lock:
            self.messages.append((list(envelope.rcpt_tos), msg, envelope.content))
        if self.delay:
            await asyncio.sleep(self.delay)
        return "250 2.0.0 queued"

    def count(self):
        with self.lock:
            return len(self.messages)

    def snapshot(self):
        with self.lock:
            return list(self.messages)


@pytest.fixture
def smtp():
    handler = SmtpHandler()
    for attempt in range(5):
        port = free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port)
        try:
            controller.start()
            break
        except Exception:
            # the port was taken between choosing and binding it
            if attempt == 4:
                raise
    handler.port = port
    yield handler
    controller.stop()


# ------------------------------------------------------------------------------------------------- HTTP

class HttpRecorder:
    """Records every request; answers from a per-path script of (status, delay_s, body), then 200 + JSON."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []          # dicts: method, path, headers, body
        self.script = {}            # path -> list of (status, delay, body)

    def plan(self, path, *steps):
        with self.lock:
            self.script.setdefault(path, []).extend(steps)

    def next_step(self, path):
        with self.lock:
            steps = self.script.get(path)
            if steps:
                return steps.pop(0)
        return (200, 0, json.dumps({"ok": True, "path": path}))

    def record(self, req):
        with self.lock:
            self.requests.append(req)

    def count(self, path=None):
        with self.lock:
            return sum(1 for r in self.requests if path is None or r["path"] == path)

    def snapshot(self):
        with self.lock:
            return list(self.requests)


@pytest.fixture
def http():
    recorder = HttpRecorder()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _any(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            recorder.record({"method": self.command, "path": self.path, "headers": self.headers,
                             "body": body, "at": time.monotonic()})
            status, delay, reply = recorder.next_step(self.path)
            if delay:
                time.sleep(delay)
            data = reply.encode() if isinstance(reply, str) else reply
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

    # a backlog for the daemon's bursts (64 connections at once); the default of 5 let connections time
    # out under load, and their webhooks were retried
    ThreadingHTTPServer.request_queue_size = 128
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    recorder.port = server.server_address[1]
    recorder.url = f"http://127.0.0.1:{recorder.port}"
    yield recorder
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------- sidecar

class Sidecar:
    def __init__(self, env, log_path):
        self.env = env
        self.log_path = log_path
        self.proc = None

    def start(self):
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen([BIN, "run"], env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     cwd=ROOT)
        return self

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log_file.close()

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and not self.log_file.closed:
            self.log_file.close()


@pytest.fixture
def sidecar(db, smtp, http, tmp_path, request):
    """Factory: sidecar(**env overrides) starts `herald run`; every one started is stopped at the end."""
    started = []

    def start(**overrides):
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
        env.update({
            "DATABASE_URL": db.url,
            "HERALD_SMTP_URL_DEFAULT": f"smtp://127.0.0.1:{smtp.port}?tls=none",
            "HERALD_FROM": "Acme <news@acme.test>",
            "HERALD_WEBHOOK_SECRET": SECRET,
            "HERALD_WEBHOOK_ALLOW": "127.0.0.1",
            "HERALD_POLL_INTERVAL_MS": "200",
            "HERALD_SHUTDOWN_GRACE_SECONDS": "20",
            "RUST_LOG": "info",
            "NO_COLOR": "1",
        })
        for k, v in overrides.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
        s = Sidecar(env, tmp_path / f"sidecar-{len(started)}.log").start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for s in started:
            print(f"---- {s.log_path} (last 60 lines)")
            print("\n".join(s.log().splitlines()[-60:]))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep

"""Issue 10 §3, "crashes lose nothing", the database part.

Postgres is killed hard (SIGKILL to the postmaster and every backend at once, as a power cut would) while
ingest, tick, broadcast enqueue, claim/complete, reap and flush_stats all run against it, twice: once in
the middle of the broadcast's enqueue and once while completes are in flight. After each crash the server
restarts (crash recovery from the WAL); in the end the remaining work is finished on the restarted server
and the rows are checked against what the clients were told:

- every acknowledged event is there, once; an event whose call died with the server is there zero times
  or once, and a track_many batch all or nothing; nothing is there that nobody sent;
- every trigger event has exactly one enrollment, every enrollment went through its nodes exactly once
  (no (node, visit) twice in the step log) and queued one job per email node;
- no job was handed out while an acknowledged lease on it was live, and none after its completion was
  acknowledged; the attempts the database counted are the claims we saw plus at most the claims whose
  answer the crash swallowed;
- every broadcast recipient has exactly one job (= audience size = the broadcast's enqueued counter);
- nothing is lost: every job ends done with one message_history row, every enrollment completed, the
  broadcast sent;
- after flush_stats, automation_stats and broadcast_stats equal the counts computed from the rows.

Two sidecars are played by claimer threads: "w1" survives the crash (like a daemon that keeps running
and retries its complete once the database is back), "w2" dies with it (its leases expire and reap
hands the jobs out again). The test runs on a throwaway cluster (ScratchCluster), never on the shared one.
"""

import datetime
import itertools
import json
import random
import re
import threading
import time
import traceback

import psycopg

from scratch_cluster import ScratchCluster

WS_A = "shop"          # automation on 'order' events; some events create contacts on the fly
WS_B = "news"          # automation on 'visit' events and the broadcast to all its contacts
CONTACTS_A = 2_000
CONTACTS_B = 30_000    # the broadcast's audience: several enqueue chunks
LEASE = "4 seconds"    # short, so the leases a dead sidecar leaves behind expire soon
ENQUEUE_BUDGET = 1_000 # advance_broadcasts(max_rows) per call: the enqueue spans many calls
CLAIM_BATCH = 50
NODES = ["first", "pause", "second", "done"]
EMAIL_NODES = ["first", "second"]
SEQ = itertools.count(1)   # unique sequence number in every event payload we send


def flow(name, event):
    return {"name": name, "trigger": {"event": event}, "reentry": "always", "start": "first",
            "nodes": {"first": {"type": "email", "template": "t1", "provider": "mail", "next": "pause"},
                      "pause": {"type": "delay", "duration": "1 second", "next": "second"},
                      "second": {"type": "email", "template": "t2", "provider": "mail", "next": "done"},
                      "done": {"type": "exit"}}}


def wait_until(pred, timeout, what, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def server_gone(exc, conn):
    """A connection error because the server went away (not an SQL error such as a deadlock, which is
    an OperationalError too but leaves the connection usable)."""
    if not isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return False
    # 57P01/57P02/57P03: terminated by a shutdown or by the crash of another backend, or not accepting
    # connections yet
    return conn is None or conn.closed or conn.broken or (getattr(exc, "sqlstate", None) or "").startswith("57P")


def q(conn, sql, *params):
    cur = conn.execute(sql, params or None)
    return cur.fetchall() if cur.description else []


def one(conn, sql, *params):
    rows = q(conn, sql, *params)
    return rows[0][0] if rows else None


# ------------------------------------------------------------------------------------- what clients saw

class Record:
    """What the clients were told, merged from every thread (under one lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent = {}              # seq -> (workspace, kind): every event we tried to record
        self.acked = set()          # seqs whose call returned
        self.unknown = []           # [seqs] of calls that died with the server (one list per call)
        self.claims = []            # (job id, leased_at, lease_until, worker): claims whose COMMIT returned
        self.unknown_claims = 0     # claims that died with the server (committed or not: unknown)
        self.completed = {}         # job id -> when complete() returned having applied its result
        self.unknown_completes = 0
        self.ignored = 0            # results complete() ignored (already finished or not leased)
        self.carry = {}             # surviving worker -> job ids whose result it still has to report
        self.crashes = []           # what was in flight at each kill

    def add(self, **kw):
        with self.lock:
            for k, v in kw.items():
                cur = getattr(self, k)
                if isinstance(cur, int):
                    setattr(self, k, cur + v)
                elif isinstance(cur, set):
                    cur.update(v)
                elif isinstance(cur, dict):
                    cur.update(v)
                else:
                    cur.extend(v)


def parse_ignored(notices):
    ids = set()
    for n in notices:
        m = re.search(r"ignored result\(s\) for job\(s\) ([0-9, ]+)", n)
        if m:
            ids.update(int(x) for x in m.group(1).split(","))
    return ids


def complete(conn, notices, ids):
    """complete() with ok results; returns the ids it applied (the others come back in a WARNING)."""
    notices.clear()
    results = [{"id": i, "ok": True, "message_id": f"<job-{i}@crash.test>"} for i in ids]
    applied = one(conn, "SELECT herald.complete(%s::jsonb)", json.dumps(results))
    ignored = parse_ignored(notices)
    assert applied == len(set(ids) - ignored), (applied, ids, notices)
    return set(ids) - ignored, ignored


def connect_with_notices(cluster):
    conn = cluster.connect()
    notices = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    return conn, notices


# ---------------------------------------------------------------------------------------------- load

class Load(threading.Thread):
    """One client with its own connection, looping until told to stop or until the server is gone.
    `state` names the call in flight, so a crash tells which outcomes are unknown."""

    def __init__(self, cluster, rec, stop, name):
        super().__init__(name=name, daemon=True)
        self.cluster, self.rec, self.stop = cluster, rec, stop
        self.conn = None
        self.state = "connecting"
        self.calls = 0
        self.gone = False
        self.died_in = None
        self.error = None

    def run(self):
        try:
            self.conn, self.notices = connect_with_notices(self.cluster)
            while not self.stop.is_set():
                self.step()
                self.calls += 1
        except Exception as e:  # noqa: BLE001 - sorted below
            if server_gone(e, self.conn):
                self.gone = True
                self.died_in = self.state
                self.on_gone()
            else:
                self.error = "".join(traceback.format_exception(e))
        finally:
            if self.conn is not None:
                try:
                    self.conn.close()
                except Exception:  # noqa: BLE001
                    pass

    def on_gone(self):
        pass


class Ingest(Load):
    """track_many batches (many=True) or single track() calls, each event with a unique seq. A tenth of
    the shop's events name a new email (the contact is created on the fly)."""

    def __init__(self, *a, many):
        super().__init__(*a)
        self.many = many
        self.in_flight = None
        self.rng = random.Random()

    def event(self, rng, ws):
        seq = next(SEQ)
        if ws == WS_A:
            kind = "order" if rng.random() < 0.8 else "pageview"
            email = f"new{seq}@shop.test" if rng.random() < 0.1 else f"a{rng.randrange(CONTACTS_A)}@shop.test"
        else:
            kind = "visit" if rng.random() < 0.8 else "pageview"
            email = f"b{rng.randrange(CONTACTS_B)}@news.test"   # existing only: the audience stays fixed
        return seq, kind, email

    def step(self):
        rng = self.rng
        ws = WS_A if self.calls % 2 else WS_B
        if self.many:
            batch = [self.event(rng, ws) for _ in range(20)]
            self.rec.add(sent={s: (ws, k) for s, k, _ in batch})
            self.in_flight = [s for s, _, _ in batch]
            self.state = "track_many"
            n = one(self.conn, "SELECT herald.track_many(%s, %s::jsonb)", ws,
                    json.dumps([{"email": e, "kind": k, "payload": {"seq": s}} for s, k, e in batch]))
            assert n == len(batch)
        else:
            seq, kind, email = self.event(rng, ws)
            self.rec.add(sent={seq: (ws, kind)})
            self.in_flight = [seq]
            self.state = "track"
            assert one(self.conn, "SELECT herald.track(%s, %s, %s, %s::jsonb)", ws, email, kind,
                       json.dumps({"seq": seq})) is not None
        self.rec.add(acked=self.in_flight)
        self.in_flight = None
        self.state = "idle"
        time.sleep(0.005)

    def on_gone(self):
        if self.in_flight:
            self.rec.add(unknown=[self.in_flight])


class Ticker(Load):
    def step(self):
        self.state = "tick"
        if one(self.conn, "SELECT herald.tick(500)") == 0:
            self.state = "idle"
            time.sleep(0.02)


class Advancer(Load):
    def step(self):
        self.state = "advance_broadcasts"
        one(self.conn, "SELECT herald.advance_broadcasts(%s)", ENQUEUE_BUDGET)
        self.state = "idle"
        time.sleep(0.05)


class Upkeep(Load):
    """What the daemon's maintenance loop does: reap expired leases, fold stats."""

    def step(self):
        self.state = "reap"
        one(self.conn, "SELECT herald.reap()")
        self.state = "flush_stats"
        one(self.conn, "SELECT herald.flush_stats()")
        self.state = "idle"
        time.sleep(0.2)


class Claimer(Load):
    """A sidecar: claim (recording each lease as the database stored it, read in the claiming
    transaction), 'send' for a few ms, complete with ok results. A survivor keeps the results of the
    jobs it held when the server went away and reports them once it is back."""

    def __init__(self, *a, worker, survivor, batch=CLAIM_BATCH):
        super().__init__(*a)
        self.worker, self.survivor, self.batch = worker, survivor, batch
        self.held = []

    def step(self):
        self.state = "claim"
        with self.conn.transaction():
            ids = [r[0] for r in q(self.conn, "SELECT id FROM herald.claim(%s, %s, %s::interval)",
                                   self.worker, self.batch, LEASE)]
            leases = q(self.conn, "SELECT id, leased_at, lease_until FROM herald.outbox WHERE id = ANY (%s)",
                       ids) if ids else []
        assert sorted(r[0] for r in leases) == sorted(ids)
        self.rec.add(claims=[(i, at, until, self.worker) for i, at, until in leases])
        if not ids:
            self.state = "idle"
            time.sleep(0.02)
            return
        self.held = ids
        self.state = "sending"
        time.sleep(0.005)
        self.state = "complete"
        done, ignored = complete(self.conn, self.notices, ids)
        now = time.time()
        self.rec.add(completed={i: now for i in done}, ignored=len(ignored))
        self.held = []
        self.state = "idle"

    def on_gone(self):
        if self.state == "claim":
            self.rec.add(unknown_claims=1)
        if self.state == "complete":
            self.rec.add(unknown_completes=1)
        if self.survivor and self.state in ("sending", "complete"):
            self.rec.carry.setdefault(self.worker, []).extend(self.held)


def start_load(cluster, rec, stop, ingest=True, batch=CLAIM_BATCH):
    threads = [Ticker(cluster, rec, stop, "tick"), Advancer(cluster, rec, stop, "advance"),
               Upkeep(cluster, rec, stop, "upkeep"),
               Claimer(cluster, rec, stop, "w1", worker="w1", survivor=True, batch=batch),
               Claimer(cluster, rec, stop, "w2", worker="w2", survivor=False, batch=batch)]
    if ingest:
        threads += [Ingest(cluster, rec, stop, "track_many", many=True),
                    Ingest(cluster, rec, stop, "track", many=False)]
    for t in threads:
        t.start()
    return threads


def report_errors(threads):
    errors = [f"{t.name}:\n{t.error}" for t in threads if t.error]
    assert not errors, "unexpected errors under load:\n" + "\n".join(errors)


def crash(cluster, rec, threads, label, enqueued):
    """kill -9 now; every thread must notice that the server is gone; then restart."""
    in_flight = {t.name: t.state for t in threads}
    cluster.kill9()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), f"{t.name} still running after the crash"
    report_errors(threads)
    assert all(t.gone for t in threads), {t.name: t.gone for t in threads}
    rec.crashes.append({"moment": label, "enqueued": enqueued,
                        "in_flight": {t.name: t.died_in for t in threads}, "seen": in_flight})
    cluster.start()


def survivor_reports(cluster, rec):
    """The surviving sidecar reports the results it held when the server went away (the complete that
    died with the server may have committed: then they are ignored, which is what makes it safe)."""
    for worker, ids in list(rec.carry.items()):
        if not ids:
            continue
        conn, notices = connect_with_notices(cluster)
        with conn:
            done, ignored = complete(conn, notices, ids)
        rec.add(completed={i: time.time() for i in done}, ignored=len(ignored))
        rec.carry[worker] = []


# --------------------------------------------------------------------------------------------- set-up

def set_up(conn):
    q(conn, "CREATE EXTENSION herald")
    automations = {}
    for ws, n, prefix, event in ((WS_A, CONTACTS_A, "a", "order"), (WS_B, CONTACTS_B, "b", "visit")):
        q(conn, "SELECT herald.create_workspace(%s, %s)", ws, ws.title())
        for key in ("t1", "t2", "news-a", "news-b"):
            q(conn, "SELECT herald.upsert_template(%s, %s, %s, '<p>{{ contact.email }}</p>')", ws, key, f"Subject {key}")
        q(conn, """SELECT herald.upsert_provider(%s, 'mail', 'smtp', '{"rate_per_second": 1000000}')""", ws)
        for start in range(0, n, 10_000):
            contacts = [{"email": f"{prefix}{i}@{ws}.test", "attributes": {"i": i}}
                        for i in range(start, min(n, start + 10_000))]
            inserted, _, rejected = q(conn, "SELECT * FROM herald.upsert_contacts(%s, %s::jsonb)", ws,
                                      json.dumps(contacts))[0]
            assert (inserted, rejected) == (len(contacts), 0)
        a = one(conn, "SELECT herald.create_automation(%s, %s::jsonb)", ws, json.dumps(flow(f"{event} flow", event)))
        q(conn, "SELECT herald.set_automation_status(%s, 'live')", a)
        automations[ws] = a
    broadcast = one(conn, """SELECT herald.create_broadcast(%s, '{"name": "Crash news", "audience": "all", "provider": "mail",
                               "variations": [{"key": "a", "template": "news-a"}, {"key": "b", "template": "news-b"}]}')""",
                    WS_B)
    q(conn, "SELECT herald.schedule_broadcast(%s)", broadcast)
    return automations, broadcast


# ---------------------------------------------------------------------------------------------- checks

def check_events(conn, rec):
    rows = q(conn, """SELECT (payload ->> 'seq')::bigint, workspace_id, kind FROM herald.events
                       WHERE payload ? 'seq'""")
    seen = {}
    for seq, ws, kind in rows:
        seen.setdefault(seq, []).append((ws, kind))
    twice = {s: v for s, v in seen.items() if len(v) > 1}
    assert not twice, f"events recorded twice (nobody retried them): {sorted(twice)[:20]}"
    missing = sorted(rec.acked - set(seen))
    assert not missing, f"{len(missing)} acknowledged events are missing, e.g. seqs {missing[:20]}"
    phantom = sorted(set(seen) - set(rec.sent))
    assert not phantom, f"events nobody sent: {phantom[:20]}"
    wrong = [s for s, [(ws, kind)] in seen.items() if rec.sent[s] != (ws, kind)]
    assert not wrong, f"events in the wrong workspace or of the wrong kind: {wrong[:20]}"
    unknown_in = 0
    for batch in rec.unknown:
        present = [s for s in batch if s in seen]
        assert len(present) in (0, len(batch)), f"a call that died half-recorded: {present} of {batch}"
        unknown_in += bool(present)
    unaccounted = set(seen) - rec.acked - {s for b in rec.unknown for s in b}
    assert not unaccounted, f"events of calls that never ran: {sorted(unaccounted)[:20]}"
    # contacts made on the fly: each once, each with exactly one contact.created event
    bad = q(conn, """SELECT c.workspace_id, c.id, count(e.id) FROM herald.contacts c
                       LEFT JOIN herald.events e ON e.workspace_id = c.workspace_id AND e.contact_id = c.id
                                                AND e.kind = 'contact.created'
                      GROUP BY 1, 2 HAVING count(e.id) <> 1 LIMIT 10""")
    assert not bad, f"contacts without exactly one contact.created event: {bad}"
    return len(seen), unknown_in


def check_enrollments(conn):
    # every trigger event has exactly one enrollment (reentry always: one per event) and vice versa
    bad = q(conn, """SELECT e.workspace_id, e.id, count(n.id) FROM herald.events e
                       LEFT JOIN herald.enrollments n ON n.workspace_id = e.workspace_id AND n.event_id = e.id
                      WHERE (e.workspace_id, e.kind) IN ((%s, 'order'), (%s, 'visit'))
                      GROUP BY 1, 2 HAVING count(n.id) <> 1 LIMIT 10""", WS_A, WS_B)
    assert not bad, f"trigger events without exactly one enrollment (workspace, event, enrollments): {bad}"
    assert one(conn, """SELECT count(*) FROM herald.enrollments n WHERE NOT EXISTS (
                          SELECT 1 FROM herald.events e WHERE e.workspace_id = n.workspace_id AND e.id = n.event_id)""") == 0
    # no enrollment advanced twice: no (node, visit) twice in its step log ...
    bad = q(conn, """SELECT enrollment_id, node, visit, count(*) FROM herald.step_history
                      GROUP BY 1, 2, 3 HAVING count(*) > 1 LIMIT 10""")
    assert not bad, f"steps logged twice (enrollment, node, visit, times): {bad}"
    # ... and, this flow being a line, every enrollment passed exactly its four nodes, in order
    bad = q(conn, """SELECT n.id, n.status, h.nodes, h.visits FROM herald.enrollments n
                      LEFT JOIN LATERAL (
                          SELECT array_agg(s.node ORDER BY s.log_id, s.seq) AS nodes,
                                 array_agg(s.visit ORDER BY s.log_id, s.seq) AS visits
                            FROM herald.step_history s
                           WHERE s.workspace_id = n.workspace_id AND s.enrollment_id = n.id) h ON true
                     WHERE n.status <> 'completed' OR h.nodes IS DISTINCT FROM %s::text[]
                        OR h.visits IS DISTINCT FROM ARRAY[1, 2, 3, 4] LIMIT 10""", NODES)
    assert not bad, f"enrollments that did not go first → pause → second → done once: {bad}"
    # one job per email node per enrollment
    bad = q(conn, """SELECT enrollment_id, node, count(*) FROM herald.outbox WHERE enrollment_id IS NOT NULL
                      GROUP BY 1, 2 HAVING count(*) > 1 LIMIT 10""")
    assert not bad, f"an enrollment's step queued twice (enrollment, node, jobs): {bad}"
    n, jobs = q(conn, """SELECT (SELECT count(*) FROM herald.enrollments),
                                (SELECT count(*) FROM herald.outbox WHERE enrollment_id IS NOT NULL)""")[0]
    assert jobs == 2 * n, (jobs, n)
    return n


def check_jobs(conn, rec):
    # nothing lost: every job done, finished once in the history
    bad = q(conn, "SELECT status, count(*) FROM herald.outbox WHERE status <> 'done' GROUP BY 1")
    assert not bad, f"jobs not done: {bad}"
    bad = q(conn, """SELECT o.id, count(h.id), array_agg(h.status) FROM herald.outbox o
                       LEFT JOIN herald.message_history h ON h.outbox_id = o.id
                      GROUP BY o.id HAVING count(h.id) <> 1 OR bool_or(h.status <> 'sent') LIMIT 10""")
    assert not bad, f"jobs without exactly one 'sent' history row: {bad}"
    attempts = dict(q(conn, "SELECT id, attempt FROM herald.outbox"))

    # claims: a job handed out again only after the previous acknowledged lease expired
    by_job = {}
    for job, at, until, worker in rec.claims:
        by_job.setdefault(job, []).append((at, until, worker))
    overlaps = []
    for job, leases in by_job.items():
        leases.sort()
        for (at1, until1, w1), (at2, until2, w2) in zip(leases, leases[1:]):
            if at2 <= until1:
                overlaps.append((job, w1, at1, until1, w2, at2))
    assert not overlaps, f"jobs handed out twice under a live lease: {overlaps[:10]}"
    # ... and never after its completion was acknowledged
    late = [(job, datetime.datetime.fromtimestamp(t, datetime.timezone.utc), at, w)
            for job, t in rec.completed.items() for at, _, w in by_job.get(job, ()) if at.timestamp() > t]
    assert not late, f"jobs claimed again after their completion was acknowledged: {late[:10]}"
    # every job we saw completed was one we saw claimed, and the database counted every claim we saw
    assert set(rec.completed) <= set(by_job)
    unseen = [job for job in attempts if job not in by_job]
    assert not unseen, f"jobs done without a claim we saw: {unseen[:10]}"
    fewer = [(job, attempts[job], len(v)) for job, v in by_job.items() if attempts.get(job, 0) < len(v)]
    assert not fewer, f"jobs with fewer attempts than acknowledged claims (job, attempt, claims): {fewer[:10]}"
    # claims whose answer was lost in a crash may have committed: at most a batch each
    extra = sum(attempts[job] - len(v) for job, v in by_job.items())
    assert extra <= rec.unknown_claims * CLAIM_BATCH, (extra, rec.unknown_claims)
    reclaimed = sum(1 for v in by_job.values() if len(v) > 1)
    return len(attempts), len(rec.claims), reclaimed, extra


def check_broadcast(conn, broadcast):
    status, phase, enqueued = q(conn, "SELECT status, phase, enqueued FROM herald.broadcasts WHERE id = %s",
                                broadcast)[0]
    jobs, recipients, audience = q(conn, """SELECT count(*), count(DISTINCT contact_id),
                                                   (SELECT count(*) FROM herald.contacts WHERE workspace_id = %s)
                                              FROM herald.outbox WHERE broadcast_id = %s""", WS_B, broadcast)[0]
    assert (status, phase) == ("sent", "done")
    assert jobs == recipients == audience == enqueued == CONTACTS_B, (jobs, recipients, audience, enqueued)


def check_stats(conn, automations, broadcast):
    one(conn, "SELECT herald.flush_stats()")
    assert one(conn, "SELECT count(*) FROM herald.stats_delta") == 0
    assert one(conn, "SELECT count(*) FROM herald.broadcast_stats_delta") == 0
    for ws, a in automations.items():
        expected = {("", "enrolled"): one(conn, "SELECT count(*) FROM herald.enrollments WHERE automation_id = %s", a),
                    ("", "completed_journey"): one(conn, """SELECT count(*) FROM herald.enrollments
                                                            WHERE automation_id = %s AND status = 'completed'""", a)}
        for node, n in q(conn, "SELECT node, count(*) FROM herald.step_history WHERE automation_id = %s GROUP BY 1", a):
            expected[(node, "entered")] = n
            if node not in EMAIL_NODES:
                expected[(node, "completed")] = n     # delay and exit finish in the step; emails park
        for node, n in q(conn, "SELECT node, count(*) FROM herald.outbox WHERE automation_id = %s GROUP BY 1", a):
            expected[(node, "queued")] = n
        for node, n in q(conn, """SELECT node, count(*) FROM herald.message_history
                                   WHERE automation_id = %s AND status = 'sent' GROUP BY 1""", a):
            expected[(node, "sent")] = n
        stats = {(node, metric): v for node, metric, v in q(conn, "SELECT * FROM herald.automation_stats(%s)", a)
                 if v != 0}
        assert stats == expected, f"automation {a} ({ws}): stats {stats} != rows {expected}"
    expected = {}
    for variation, n in q(conn, "SELECT variation, count(*) FROM herald.outbox WHERE broadcast_id = %s GROUP BY 1",
                          broadcast):
        expected[(variation, "queued")] = n
    for variation, n in q(conn, """SELECT variation, count(*) FROM herald.message_history
                                    WHERE broadcast_id = %s AND status = 'sent' GROUP BY 1""", broadcast):
        expected[(variation, "sent")] = n
    stats = {(v, m): n for v, m, n in q(conn, "SELECT * FROM herald.broadcast_stats(%s)", broadcast) if n != 0}
    assert stats == expected, f"broadcast stats {stats} != rows {expected}"


# ------------------------------------------------------------------------------------------------ test

def enqueued(conn, broadcast):
    return one(conn, "SELECT enqueued FROM herald.broadcasts WHERE id = %s", broadcast)


def load_until_crash(cluster, rec, label, moment, broadcast):
    """Runs the full load on the (re)started server until moment(mon, threads, t0) says now; kills the
    server; restarts it; the surviving sidecar reports what it held."""
    stop = threading.Event()
    threads = start_load(cluster, rec, stop)
    mon = cluster.connect()
    t0 = time.monotonic()

    def ready():
        report_errors(threads)
        # every client has got through a few calls: all of them are running when the crash hits
        return min(t.calls for t in threads) >= 3 and moment(mon, threads, t0)

    wait_until(ready, 60, f"the moment to crash ({label})", interval=0.002)
    n = enqueued(mon, broadcast)
    mon.close()
    crash(cluster, rec, threads, label, n)
    survivor_reports(cluster, rec)


def run_scenario(cluster):
    """Set-up, two crashes under load, then the rest of the work on the restarted server. Returns what
    the checks need."""
    rec = Record()
    with cluster.connect() as conn:
        automations, broadcast = set_up(conn)

    def mid_enqueue(mon, threads, t0):
        # an advance_broadcasts call in flight with part of the audience enqueued (or, should the
        # machine be fast, the enqueue over: then the crash comes anyway)
        n = enqueued(mon, broadcast)
        adv = next(t for t in threads if t.name == "advance")
        return time.monotonic() - t0 >= 0.5 and (
            (n >= 5_000 and adv.state == "advance_broadcasts") or n >= CONTACTS_B)

    load_until_crash(cluster, rec, "during the broadcast's enqueue", mid_enqueue, broadcast)

    done_before = len(rec.completed)

    def completing(mon, threads, t0):
        # well into the round, and a complete() call in flight
        return (time.monotonic() - t0 >= 2.0 and len(rec.completed) - done_before >= 500
                and any(t.state == "complete" for t in threads if isinstance(t, Claimer)))

    load_until_crash(cluster, rec, "while completes are in flight", completing, broadcast)

    # finish the work on the restarted server (no more ingest); expired leases come back through reap
    stop = threading.Event()
    threads = start_load(cluster, rec, stop, ingest=False)
    with cluster.connect() as mon:
        def drained():
            report_errors(threads)
            return one(mon, """SELECT (SELECT status FROM herald.broadcasts WHERE id = %s) = 'sent'
                                  AND NOT EXISTS (SELECT 1 FROM herald.outbox WHERE status <> 'done')
                                  AND NOT EXISTS (SELECT 1 FROM herald.enrollments
                                                   WHERE status IN ('active', 'waiting'))""", broadcast)

        wait_until(drained, 90, "the queue to drain and the broadcast to be sent", interval=0.2)
    stop.set()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), f"{t.name} did not stop"
    report_errors(threads)
    assert not any(t.gone for t in threads)
    return rec, automations, broadcast


def check_all(conn, rec, automations, broadcast):
    events, unknown_in = check_events(conn, rec)
    enrollments = check_enrollments(conn)
    jobs, claims, reclaimed, extra = check_jobs(conn, rec)
    check_broadcast(conn, broadcast)
    check_stats(conn, automations, broadcast)
    return (f"  events: {len(rec.acked)} acknowledged, {len(rec.unknown)} calls cut by a crash "
            f"({unknown_in} of them had committed), {events} recorded\n"
            f"  enrollments: {enrollments}, jobs: {jobs} ({CONTACTS_B} of the broadcast), claims seen: {claims}, "
            f"jobs handed out again after their lease expired: {reclaimed}, claims cut by a crash: "
            f"{rec.unknown_claims} (attempts they added: {extra})\n"
            f"  completes: {len(rec.completed)} jobs acknowledged, {rec.unknown_completes} calls cut by a crash, "
            f"{rec.ignored} results ignored (already finished or no longer leased)")


def test_kill_9_of_postgres_under_load_loses_nothing_and_repeats_nothing():
    started = time.monotonic()
    cluster = ScratchCluster("herald_crash")
    try:
        rec, automations, broadcast = run_scenario(cluster)
        # both restarts really were crash recoveries from the WAL
        with open(cluster.log) as f:
            assert f.read().count("automatic recovery in progress") == 2
        with cluster.connect() as conn:
            summary = check_all(conn, rec, automations, broadcast)
        print(f"\ncrash recovery ({time.monotonic() - started:.1f}s):\n{summary}")
        for c in rec.crashes:
            print(f"  crash {c['moment']}: enqueued {c['enqueued']}/{CONTACTS_B}, in flight {c['in_flight']}")
    finally:
        cluster.destroy()

"""herald.tick's wake-up is notified once per daemon round, not by every enrolling transaction
(herald._wake_tick, sidecar/src/run/tick_wakeup.rs). These tests fail if a transaction that skipped its
NOTIFY is left to the fallback poll: the poll is set to 5 s, and every enrollment must be stepped well
within a second of its commit."""
import json
import threading
import time

import psycopg

from conftest import PGHOST, USER, wait_until

POLL_MS = 5000
BOUND_S = 1.0  # well under the poll fallback


def journey_that_ends_at_once(db):
    definition = {"name": "Ends", "trigger": {"event": "ping"}, "reentry": "always", "start": "done",
                  "nodes": {"done": {"type": "exit"}}}
    automation = db.one("SELECT herald.create_automation('acme', %s::jsonb)", json.dumps(definition))
    db.q("SELECT herald.set_automation_status(%s, 'live')", automation)
    return automation


def connect(db):
    return psycopg.connect(host=PGHOST, dbname=db.name, user=USER, autocommit=True)


def track_sql(email):
    return "SELECT herald.track('acme', %s, 'ping', '{}')", (email,)


def slowest_step(db, automation):
    """Seconds from an enrollment's commit (its tracking transaction's end, recorded by the test) to its
    completion, worst case; and how many are not completed."""
    return db.one("SELECT count(*) FROM herald.enrollments WHERE automation_id = %s AND status <> 'completed'",
                  automation)


class Listener:
    """Counts herald.tick notifications on a connection of its own."""

    def __init__(self, db):
        self.conn = connect(db)
        self.conn.execute('LISTEN "herald.tick"')
        self.count = 0
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            for _ in self.conn.notifies(timeout=0.2):
                self.count += 1

    def close(self):
        self.stop = True
        self.thread.join()
        self.conn.close()


def test_many_concurrent_tracks_are_all_stepped_within_a_second(db, sidecar):
    automation = journey_that_ends_at_once(db)
    sidecar(HERALD_POLL_INTERVAL_MS=POLL_MS)
    listener = Listener(db)
    committed = {}  # email -> wall clock of its commit
    errors = []

    def client(c, calls):
        try:
            with connect(db) as conn:
                for i in range(calls):
                    email = f"c{c}-{i}@example.com"
                    if i % 10 == 9:
                        # an explicit transaction that commits well after its track() (a skipper that
                        # commits after the round that took the wake-up), in REPEATABLE READ every other time
                        level = "REPEATABLE READ" if i % 20 == 19 else "READ COMMITTED"
                        with conn.transaction():
                            conn.execute(f"SET TRANSACTION ISOLATION LEVEL {level}")
                            conn.execute(*track_sql(email))
                            time.sleep(0.08)
                    else:
                        conn.execute(*track_sql(email))
                    committed[email] = time.time()
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c, 100)) for c in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    calls = len(committed)
    assert calls == 600
    wait_until(lambda: slowest_step(db, automation) == 0, timeout=BOUND_S + 2, interval=0.02,
               what="every enrollment stepped")
    # each completion against its enrolment, on the database's clock: ended_at is the tick's
    # transaction start, which comes after the commit it saw
    late = db.one("""SELECT count(*) FROM herald.enrollments e
                      WHERE e.automation_id = %s AND e.ended_at - e.enrolled_at > make_interval(secs => %s)""",
                  automation, BOUND_S + 0.08)
    assert late == 0, f"{late} enrollments waited longer than {BOUND_S} s for their first step"
    listener.close()
    assert listener.count < calls, f"{listener.count} NOTIFYs for {calls} enrolling transactions: none skipped"


def test_a_skipper_that_commits_after_the_round_is_stepped_without_the_poll(db, sidecar):
    automation = journey_that_ends_at_once(db)
    sidecar(HERALD_POLL_INTERVAL_MS=POLL_MS)
    # the daemon's first round takes the wake-up (a fresh sequence is not called either: the take is
    # the one that stamps it); nothing enrols after it, and the start-up rounds are over before the
    # test's transactions begin (a take between their reads would make the second notify too)
    wait_until(lambda: db.one("SELECT NOT is_called AND last_value > 0 FROM herald.tick_wakeup"), timeout=10,
               what="the daemon taking the wake-up")
    time.sleep(0.5)
    listener = Listener(db)
    with connect(db) as first, connect(db) as skipper:
        first.execute("BEGIN")
        first.execute(*track_sql("first@example.com"))  # finds no wake-up pending: will notify
        assert db.one("SELECT is_called FROM herald.tick_wakeup")
        skipper.execute("BEGIN")
        skipper.execute(*track_sql("skipper@example.com"))  # a wake-up is pending: no NOTIFY
        first.execute("COMMIT")
        wait_until(lambda: db.one("SELECT count(*) FROM herald.enrollments WHERE automation_id = %s "
                                  "AND status = 'completed'", automation) == 1, timeout=BOUND_S,
                   interval=0.01, what="the first enrollment stepped")
        time.sleep(0.3)  # the round woken by the first has ticked: the skipper is still open
        skipper.execute("COMMIT")
        done = time.time()
    wait_until(lambda: slowest_step(db, automation) == 0, timeout=BOUND_S, interval=0.01,
               what="the skipper's enrollment stepped without waiting for the poll")
    assert time.time() - done < BOUND_S
    time.sleep(0.3)
    listener.close()
    assert listener.count == 1, f"{listener.count} NOTIFYs: the skipper should not have notified"


def journey_that_calls_a_webhook(db, http):
    definition = {"name": "Calls", "trigger": {"event": "ping"}, "reentry": "always", "start": "crm",
                  "nodes": {"crm": {"type": "webhook", "url": http.url + "/crm", "next": "done"},
                            "done": {"type": "exit"}}}
    automation = db.one("SELECT herald.create_automation('acme', %s::jsonb)", json.dumps(definition))
    db.q("SELECT herald.set_automation_status(%s, 'live')", automation)
    return automation


def test_complete_notifies_only_when_no_wake_up_is_pending(db, http):
    # no daemon: this test claims and completes, so it counts every NOTIFY there is
    journey_that_calls_a_webhook(db, http)
    for i in range(2):
        db.q(*track_sql(f"w{i}@example.com"))
    assert db.one("SELECT herald.tick(100)") == 2   # two webhook jobs, their enrollments waiting on them
    jobs = [r[0] for r in db.q("SELECT id FROM herald.claim('test', 10)")]
    assert len(jobs) == 2
    db.q("SELECT herald.take_tick_wakeup()")   # as a daemon's round does: no wake-up pending
    listener = Listener(db)
    time.sleep(0.3)   # LISTEN is in effect before the first complete
    assert db.one("SELECT herald.complete(%s::jsonb)", json.dumps([{"id": jobs[0], "ok": True}])) == 1
    assert db.one("SELECT is_called FROM herald.tick_wakeup"), "the first wake-up is pending"
    assert db.one("SELECT herald.complete(%s::jsonb)", json.dumps([{"id": jobs[1], "ok": True}])) == 1
    time.sleep(0.5)
    listener.close()
    assert listener.count == 1, f"{listener.count} NOTIFYs: the second complete() should have skipped its own"
    assert db.one("SELECT count(*) FROM herald.enrollments WHERE status = 'active' AND current_node = 'done'") == 2


def test_journeys_woken_by_complete_are_stepped_without_the_poll(db, http, sidecar):
    automation = journey_that_calls_a_webhook(db, http)
    sidecar(HERALD_POLL_INTERVAL_MS=POLL_MS)
    for c in range(3):
        with connect(db) as conn:
            for i in range(100):
                conn.execute(*track_sql(f"c{c}-{i}@example.com"))
    wait_until(lambda: slowest_step(db, automation) == 0, timeout=POLL_MS / 1000, interval=0.02,
               what="every journey past its webhook and ended")
    # each journey's end against its webhook's completion, on the database's clock
    late = db.one("""SELECT count(*) FROM herald.enrollments e JOIN herald.outbox o
                       ON o.workspace_id = e.workspace_id AND o.enrollment_id = e.id
                      WHERE e.automation_id = %s AND e.ended_at - o.done_at > make_interval(secs => %s)""",
                  automation, BOUND_S)
    assert late == 0, f"{late} journeys waited longer than {BOUND_S} s after their webhook's completion"

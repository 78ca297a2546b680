"""No tenant can stop another, on the daemon's side (issue 11): workspace A's poisoned job fails alone,
permanently and with its reason, while workspace B's jobs in the same claimed batch are delivered and
the daemon keeps running."""

import json

from conftest import wait_until


def two_workspaces(db, normal=20):
    """acme holds the poison (added by each test); globex `normal` ordinary emails."""
    db.q("SELECT herald.create_workspace('globex', 'Globex')")
    for ws in ("acme", "globex"):
        db.q("SELECT herald.upsert_template(%s, 'hello', 'Hello {{ contact.email }}', '<p>hi</p>')", ws)
    db.q("""SELECT herald.send('globex', format('b%%s@example.com', i), 'hello')
              FROM generate_series(1, %s) i""", normal)


def poison(db, email, template="hello"):
    """A pending job of acme; returns its id."""
    db.q("SELECT herald.send('acme', %s, %s)", email, template)
    return db.one("SELECT o.id FROM herald.outbox o JOIN herald.contacts c ON c.id = o.contact_id "
                  "WHERE c.email = %s", email)


def outcome(db, job):
    return db.q("SELECT status, last_error FROM herald.outbox WHERE id = %s", job)[0]


def test_a_job_the_daemon_cannot_decode_fails_alone(db, smtp, sidecar):
    two_workspaces(db)
    # nested deeper than the daemon's JSON decoder goes (serde_json stops at 128 levels)
    deep = poison(db, "deep@example.com")
    db.q("UPDATE herald.outbox SET payload = payload || jsonb_build_object('variables', %s::jsonb) WHERE id = %s",
         "[" * 200 + "]" * 200, deep)
    # a field the executor needs, of the wrong type (it used to be read as absent: the default From)
    wrong = poison(db, "wrong@example.com")
    db.q("""UPDATE herald.outbox SET payload = payload || '{"from": 42}' WHERE id = %s""", wrong)
    # a healthy job of the poisoned workspace still goes out too
    db.q("SELECT herald.send('acme', 'fine@example.com', 'hello')")

    s = sidecar(HERALD_CONCURRENCY="64")
    wait_until(lambda: db.one("SELECT count(*) FROM herald.outbox WHERE status IN ('pending', 'leased')") == 0,
               timeout=60, what="every job finished")
    status, error = outcome(db, deep)
    assert status == "failed", (status, error)
    assert "cannot decode the job's payload" in error, error
    status, error = outcome(db, wrong)
    assert status == "failed", (status, error)
    assert "from: expected a string, got a number" in error, error
    # attempted once: a permanent failure is not retried
    assert db.q("SELECT attempt FROM herald.outbox WHERE id IN (%s, %s)", deep, wrong) == [(1,), (1,)]
    got = sorted(r for rcpts, _, _ in smtp.snapshot() for r in rcpts)
    assert got == sorted([f"b{i}@example.com" for i in range(1, 21)] + ["fine@example.com"])
    assert db.one("SELECT count(*) FROM herald.outbox WHERE workspace_id = 'globex' AND status = 'done'") == 20
    assert s.running()
    assert "failed permanently" in s.log()


def doubling(times):
    """The reported attack: a few hundred bytes that double a string `times` times (2 GiB at 28)."""
    return '{% set s = "12345678" %}' + "{% set s = s ~ s %}" * times + "{{ s|length }}"


def test_a_template_that_asks_for_gigabytes_fails_its_job_not_the_daemon(db, smtp, sidecar):
    two_workspaces(db)
    bomb = doubling(28)
    assert len(bomb) < 600
    db.q("SELECT herald.upsert_template('acme', 'bomb', 'Hi', %s)", bomb)
    # output past the 2 MiB bound, and runaway work, are the job's errors too
    db.q("SELECT herald.upsert_template('acme', 'wide', 'Hi', %s)", doubling(19).replace("{{ s|length }}", "{{ s }}"))
    db.q("""SELECT herald.upsert_template('acme', 'busy', 'Hi',
            '{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}')""")
    jobs = {t: poison(db, f"{t}@example.com", t) for t in ("bomb", "wide", "busy")}
    db.q("SELECT herald.send('acme', 'fine@example.com', 'hello')")

    s = sidecar(HERALD_CONCURRENCY="16", HERALD_LOG_FORMAT="json")
    wait_until(lambda: db.one("SELECT count(*) FROM herald.outbox WHERE status IN ('pending', 'leased')") == 0,
               timeout=90, what="every job finished")
    # the worker that died said why in the daemon's log, as one of its JSON lines (a plain line from
    # the worker itself would break a log read as JSON lines)
    logged = [json.loads(line) for line in s.log().splitlines() if line.strip()]
    said = [line["worker_said"] for line in logged if "worker_said" in line]
    assert any(w.startswith("memory allocation of") for w in said), said
    reasons = {t: outcome(db, j) for t, j in jobs.items()}
    assert reasons["bomb"][0] == "failed" and "more than 512 MiB of memory" in reasons["bomb"][1], reasons
    assert reasons["wide"][0] == "failed" and "over 2 MiB" in reasons["wide"][1], reasons
    assert reasons["busy"][0] == "failed" and "too much work" in reasons["busy"][1], reasons
    got = sorted(r for rcpts, _, _ in smtp.snapshot() for r in rcpts)
    assert got == sorted([f"b{i}@example.com" for i in range(1, 21)] + ["fine@example.com"])
    assert s.running(), s.log()
    # and it goes on working: a mail queued after the bomb still goes out
    db.q("SELECT herald.send('globex', 'later@example.com', 'hello')")
    wait_until(lambda: smtp.count() == 22, timeout=30, what="a later mail")
    assert s.running()


def test_maintenance_errors_carry_the_servers_message(db, smtp, sidecar):
    # tick made to fail with a server error: a table only it writes is gone
    db.q("ALTER TABLE herald.step_log RENAME TO step_log_away")
    s = sidecar()
    wait_until(lambda: 'task="herald.tick"' in s.log() and "failed" in s.log(), timeout=30, what="tick to fail")
    line = next(l for l in s.log().splitlines() if 'task="herald.tick"' in l and "failed" in l)
    assert "does not exist" in line, line          # the server's words, not only "db error"
    # and the daemon still sends mail meanwhile
    db.q("SELECT herald.upsert_template('acme', 'hello', 'Hello', '<p>hi</p>')")
    db.q("SELECT herald.send('acme', 'a@example.com', 'hello')")
    wait_until(lambda: smtp.count() == 1, timeout=30, what="the mail")

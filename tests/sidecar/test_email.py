"""Email delivery through `herald run` to a real SMTP server."""

import hashlib
import hmac
import json
import re
import signal
import urllib.parse
import urllib.request
from collections import Counter, defaultdict

from conftest import SECRET, free_port, message_id, wait_until


def add_templates(db):
    db.q("""SELECT herald.upsert_template('acme', 'welcome', 'Welcome, {{ contact.first_name | default("friend") }}!',
            '<p>Hello {{ contact.first_name | default("friend") }}, your code is <b>{{ variables.code | default("none") }}</b>.</p>',
            'Hello {{ contact.first_name | default("friend") }}, your code is {{ variables.code | default("none") }}.')""")
    # (templates render strictly: a value some jobs lack says what to write instead)
    db.q("""SELECT herald.upsert_template('acme', 'notext', 'Plain {{ variables.code | default("none") }}',
            '<h1>Hi {{ contact.first_name | default("there") }}</h1><p>Code&nbsp;{{ variables.code | default("none") }} &amp; more</p>')""")


def queue(db, n, template="welcome", prefix="user"):
    contacts = [{"email": f"{prefix}{i}@example.com", "attributes": {"first_name": f"User{i}"}} for i in range(n)]
    db.q("SELECT * FROM herald.upsert_contacts('acme', %s::jsonb)", json.dumps(contacts))
    db.q("""SELECT herald.send('acme', format('%%s%%s@example.com', %s::text, i), %s, jsonb_build_object('code', i))
              FROM generate_series(0, %s - 1) i""", prefix, template, n)


def parts(msg):
    return {p.get_content_type(): p.get_content() for p in msg.walk() if not p.is_multipart()}


def test_transactional_emails_arrive_once_with_headers(db, smtp, sidecar):
    add_templates(db)
    queue(db, 190)
    queue(db, 10, template="notext", prefix="plain")
    metrics_port = free_port()
    s = sidecar(HERALD_UNSUBSCRIBE_URL="https://acme.test/unsub", HERALD_METRICS_ADDR=f"127.0.0.1:{metrics_port}")
    wait_until(lambda: db.counts().get("done") == 200, timeout=60, what="200 jobs done")
    assert db.counts() == {"done": 200}
    assert smtp.count() == 200

    jobs = {r[0]: (r[1], r[2], r[3]) for r in db.q(
        "SELECT c.email, o.dedupe_key, o.message_id, o.id FROM herald.outbox o JOIN herald.contacts c ON c.id = o.contact_id")}
    per_rcpt = Counter()
    for rcpts, msg, raw in smtp.snapshot():
        assert len(rcpts) == 1
        rcpt = rcpts[0]
        per_rcpt[rcpt] += 1
        dedupe_key, stored_id, job = jobs[rcpt]
        assert msg["Message-ID"] == message_id("acme", dedupe_key, job) == stored_id
        assert msg["To"] == rcpt
        assert msg["From"] == "Acme <news@acme.test>"
        assert msg["Date"] is not None and msg["Date"].datetime is not None
        assert msg.get_content_type() == "multipart/alternative"
        body = parts(msg)
        assert set(body) == {"text/plain", "text/html"}
        i = int(re.search(r"\d+", rcpt).group())
        if rcpt.startswith("user"):
            assert msg["Subject"] == f"Welcome, User{i}!"
            assert body["text/plain"].strip() == f"Hello User{i}, your code is {i}."
            assert f"<p>Hello User{i}, your code is <b>{i}</b>.</p>" in body["text/html"]
        else:
            assert msg["Subject"] == f"Plain {i}"
            # no text template: derived from the HTML
            assert body["text/plain"].split() == ["Hi", f"User{i}", "Code", str(i), "&", "more"]
        unsub = msg["List-Unsubscribe"]
        assert unsub.startswith("<https://acme.test/unsub?") and unsub.endswith(">")
        q = urllib.parse.parse_qs(urllib.parse.urlparse(unsub[1:-1]).query)
        assert q["workspace"] == ["acme"] and q["email"] == [rcpt]
        token = hmac.new(SECRET.encode(), f"unsubscribe:acme:{rcpt}".encode(), hashlib.sha256).hexdigest()[:32]
        assert q["token"] == [token]
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert len(per_rcpt) == 200 and set(per_rcpt.values()) == {1}

    history = dict(db.q("SELECT status, count(*) FROM herald.message_history GROUP BY 1"))
    assert history == {"sent": 200}

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'herald_jobs_sent_total{kind="email"} 200' in text
    assert "herald_jobs_claimed_total 200" in text
    # the depth counts the jobs not finished yet (finished ones are the counters' business)
    assert 'herald_queue_jobs{kind="email",status="pending"} 0' in text
    assert 'herald_queue_jobs{kind="email",status="leased"} 0' in text
    assert 'status="done"' not in text
    assert 'herald_job_duration_seconds_count{kind="email"} 200' in text

    s.signal(signal.SIGTERM)
    assert s.wait(30) == 0


def test_smtp_451_is_retried_and_delivered_once(db, smtp, sidecar):
    add_templates(db)
    smtp.fail_once.add("retry@example.com")
    job = db.one("SELECT herald.send('acme', 'retry@example.com', 'welcome', '{\"code\": 7}')")
    sidecar()
    wait_until(lambda: db.one("SELECT last_error FROM herald.outbox WHERE id = %s AND status = 'pending'", job),
               what="the 451 to be recorded")
    status, attempt, error = db.q("SELECT status, attempt, last_error FROM herald.outbox WHERE id = %s", job)[0]
    assert (status, attempt) == ("pending", 1)
    assert error.startswith("451") and "try later" in error
    assert smtp.count() == 0
    # skip the back-off wait
    db.q("UPDATE herald.outbox SET run_at = now() WHERE id = %s", job)
    db.q('NOTIFY "herald.outbox"')
    wait_until(lambda: db.one("SELECT status FROM herald.outbox WHERE id = %s", job) == "done", what="delivery")
    assert db.one("SELECT attempt FROM herald.outbox WHERE id = %s", job) == 2
    msgs = smtp.snapshot()
    assert [m[0] for m in msgs] == [["retry@example.com"]]
    assert smtp.refusals == [("retry@example.com", 451)]
    assert db.q("SELECT status, attempt FROM herald.message_history WHERE outbox_id = %s", job) == [("sent", 2)]


def test_smtp_550_fails_permanently(db, smtp, sidecar):
    add_templates(db)
    smtp.reject.add("nobody@example.com")
    smtp.replies["policy@example.com"] = "550 5.7.1 message refused as spam"
    job = db.one("SELECT herald.send('acme', 'nobody@example.com', 'welcome')")
    ok = db.one("SELECT herald.send('acme', 'somebody@example.com', 'welcome')")
    policy = db.one("SELECT herald.send('acme', 'policy@example.com', 'welcome')")
    sidecar()
    for j in (job, policy):
        wait_until(lambda: db.one("SELECT status FROM herald.outbox WHERE id = %s", j) == "failed", what="failure")
    wait_until(lambda: db.one("SELECT status FROM herald.outbox WHERE id = %s", ok) == "done", what="the other one")
    status, attempt, error, mid = db.q(
        "SELECT status, attempt, error, message_id FROM herald.message_history WHERE outbox_id = %s", job)[0]
    assert (status, attempt) == ("failed", 1)
    assert error.startswith("550") and "mailbox unavailable" in error
    assert [m[0] for m in smtp.snapshot()] == [["somebody@example.com"]]

    # 550 5.1.1 refuses the address: a hard bounce at send time. The address is suppressed, the bounce is
    # an event and a result like a provider's report of it, and the next email to it is never tried.
    key = db.one("SELECT dedupe_key FROM herald.outbox WHERE id = %s", job)
    assert mid == message_id("acme", key, job)
    assert db.q("SELECT email, reason, detail ->> 'smtp_reply', detail ->> 'message_id' FROM herald.suppressions") == [
        ("nobody@example.com", "hard_bounce", error, mid)]
    assert db.q("SELECT email, payload ->> 'bounce_type', payload ->> 'refused_at_send' FROM herald.events "
                "WHERE kind = 'email.bounced'") == [("nobody@example.com", "hard", "true")]
    assert db.q("SELECT job_id FROM herald.results_staged WHERE kind = 'email.bounced' "
                "UNION ALL SELECT job_id FROM herald.results WHERE kind = 'email.bounced'") == [(job,)]
    # a policy refusal (5.7.1) says nothing about the address: failed, not suppressed
    assert db.one("SELECT last_error FROM herald.outbox WHERE id = %s", policy).startswith("550 5.7.1")
    again = db.one("SELECT herald.send('acme', 'nobody@example.com', 'welcome')")
    wait_until(lambda: db.one("SELECT status FROM herald.outbox WHERE id = %s", again) == "cancelled",
               what="the next email to a bounced address to be cancelled by claim")
    assert db.one("SELECT last_error FROM herald.outbox WHERE id = %s", again) == "suppressed: hard_bounce"
    assert sorted(smtp.refusals) == [("nobody@example.com", 550), ("policy@example.com", 550)]


def test_deleted_template_and_render_error_fail_permanently_without_crashing(db, smtp, sidecar):
    add_templates(db)
    # upsert_template refuses it now; a template saved before 0.4.0 can still be this broken
    db.q("INSERT INTO herald.templates (workspace_id, key, version, subject, html) "
         "VALUES ('acme', 'broken', 1, 'Hi {{ contact.first_name', '<p>x</p>')")
    broken = db.one("SELECT herald.send('acme', 'a@example.com', 'broken')")
    gone = db.one("SELECT herald.send('acme', 'b@example.com', 'welcome')")
    db.q("DELETE FROM herald.templates WHERE key = 'welcome'")
    fine = db.one("SELECT herald.send('acme', 'c@example.com', 'notext')")
    s = sidecar()
    wait_until(lambda: db.one("SELECT count(*) FROM herald.outbox WHERE status IN ('done', 'failed')") == 3,
               what="all three finished")
    errors = dict(db.q("SELECT outbox_id, error FROM herald.message_history WHERE status = 'failed'"))
    assert "template error in subject" in errors[broken]
    assert "template no longer exists" in errors[gone]
    assert db.one("SELECT status FROM herald.outbox WHERE id = %s", fine) == "done"
    assert s.running()


def delivered(smtp):
    by_id = defaultdict(list)
    for rcpts, msg, raw in smtp.snapshot():
        by_id[msg["Message-ID"]].append((tuple(rcpts), msg["Subject"], parts(msg)["text/plain"]))
    return by_id


def test_kill_9_mid_run_then_restart_delivers_everything(db, smtp, sidecar):
    # Second copies after a kill are messages the server accepted that the daemon had not yet recorded:
    # the sends in flight (accepted, 250 not yet read: about emails/s x the server's reply time, 5 ms
    # here) and the results not yet handed to complete(). Their number does not depend on the run's
    # size, so the goal (at most 0.5% second copies) is counted over a run large enough for the kill to
    # land in steady delivery: 10,000 emails, killed after 3,000. The lease is short so the restart
    # is quick, but long enough that no send is given up at its deadline on a loaded machine (a send given
    # up may have been accepted all the same: a second copy the kill did not cause).
    n, kill_after, lease = 10_000, 3_000, 10
    add_templates(db)
    queue(db, n)
    smtp.delay = 0.005
    first = sidecar(HERALD_LEASE_SECONDS=lease, HERALD_CONCURRENCY=64)
    wait_until(lambda: smtp.count() >= kill_after, timeout=120, what=f"{kill_after} messages")
    first.signal(signal.SIGKILL)
    first.wait(10)
    at_kill = smtp.count()
    assert at_kill < n, "the kill came too late to test anything"
    leased = db.counts().get("leased", 0)

    second = sidecar(HERALD_LEASE_SECONDS=lease, HERALD_CONCURRENCY=64)
    wait_until(lambda: db.counts() == {"done": n}, timeout=180, what=f"all {n} done after restart")

    keys = {email: (key, job) for email, key, job in db.q(
        "SELECT c.email, o.dedupe_key, o.id FROM herald.outbox o JOIN herald.contacts c ON c.id = o.contact_id")}
    by_id = delivered(smtp)
    # every message arrived, under the Message-ID its job and dedupe key give
    assert len(by_id) == n
    assert set(by_id) == {message_id("acme", k, j) for k, j in keys.values()}
    duplicates = 0
    for mid, copies in by_id.items():
        rcpt = copies[0][0][0]
        assert mid == message_id("acme", *keys[rcpt])
        # the rule: a copy sent again is the same message under the same Message-ID
        assert all(c == copies[0] for c in copies), copies
        duplicates += len(copies) - 1
    given_up = sum(s.log().count("not finished after") for s in (first, second))
    print(f"kill -9 after {at_kill} messages, {leased} leased at the time: {duplicates} second copies "
          f"({100 * duplicates / n:.2f}% of {n}), all with the same Message-ID; {given_up} send(s) given up at the deadline")
    # only messages in flight, or sent but not yet handed to complete(), when the process died come twice
    assert duplicates <= n * 0.005, f"{duplicates} second copies in {n} emails (goal: at most 0.5%)"


def test_sigterm_under_load_exits_0_and_loses_nothing(db, smtp, sidecar):
    add_templates(db)
    queue(db, 1000)
    smtp.delay = 0.02
    first = sidecar(HERALD_CONCURRENCY=32)
    wait_until(lambda: smtp.count() >= 200, timeout=60, what="200 messages")
    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0
    assert "shutting down" in first.log()
    counts = db.counts()
    assert "leased" not in counts, counts
    assert counts.get("done", 0) + counts.get("pending", 0) == 1000
    # everything delivered was recorded done, and nothing was recorded done without being delivered
    done = {r[0] for r in db.q("SELECT o.message_id FROM herald.outbox o WHERE status = 'done'")}
    assert done == set(delivered(smtp))
    assert counts["done"] < 1000, "the stop came too late to test anything"

    sidecar(HERALD_CONCURRENCY=32)
    wait_until(lambda: db.counts() == {"done": 1000}, timeout=90, what="the rest after restart")
    by_id = delivered(smtp)
    assert len(by_id) == 1000 and all(len(c) == 1 for c in by_id.values()), "a graceful stop sends nothing twice"


def test_file_transport_and_json_logs(db, smtp, sidecar, tmp_path):
    add_templates(db)
    queue(db, 5)
    maildir = tmp_path / "mail"
    s = sidecar(HERALD_SMTP_URL_DEFAULT=None, HERALD_MAILDIR=maildir, HERALD_LOG_FORMAT="json")
    wait_until(lambda: db.counts() == {"done": 5}, what="5 files written")
    jobs = db.q("SELECT dedupe_key, id FROM herald.outbox")
    files = sorted(p.name for p in maildir.iterdir())
    assert files == sorted(message_id("acme", k, j)[1:-1] + ".eml" for k, j in jobs)
    import email as email_lib
    import email.policy
    for p in maildir.iterdir():
        msg = email_lib.message_from_bytes(p.read_bytes(), policy=email.policy.default)
        assert msg.get_content_type() == "multipart/alternative"
        assert p.name == msg["Message-ID"][1:-1] + ".eml"
    assert smtp.count() == 0
    s.signal(signal.SIGTERM)
    assert s.wait(30) == 0
    lines = [line for line in s.log().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]
    assert any(p.get("message") == "running" and p.get("target") == "herald_sidecar::run" for p in parsed)
    assert any(p.get("target") == "herald_sidecar::run::notifier" for p in parsed)


def test_reconnects_after_its_connections_are_killed(db, smtp, sidecar):
    add_templates(db)
    s = sidecar()
    wait_until(lambda: db.one("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                              "AND application_name LIKE 'herald run:%%'") >= 3, what="the daemon's connections")
    killed = db.one("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name LIKE 'herald run:%%') t")
    assert killed >= 3
    queue(db, 20)
    wait_until(lambda: db.counts() == {"done": 20}, timeout=30, what="delivery after reconnecting")
    assert smtp.count() == 20
    # the notifier is back: a new job is picked up at once, not at the next poll
    wait_until(lambda: "listening on herald.outbox" in s.log().split("LISTEN connection lost")[-1],
               what="LISTEN again")
    assert s.running()

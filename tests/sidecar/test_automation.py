"""The whole loop: an event enrols a contact, the daemon's maintenance runs the step engine (woken by the
herald.tick notification), the webhook's reply lands in the enrollment's context, and the email after it
uses that reply."""

import json
import time

import pytest

from conftest import signature_ok, wait_until


def has_function(db, name):
    return db.one("SELECT count(*) FROM pg_proc WHERE pronamespace = 'herald'::regnamespace AND proname = %s", name) > 0


def test_event_to_webhook_to_email(db, smtp, http, sidecar):
    if not has_function(db, "tick"):
        pytest.skip("herald.tick is not in the installed extension yet")
    http.plan("/score", (200, 0, json.dumps({"score": 42})))
    db.q("SELECT herald.upsert_template('acme', 'scored', 'Your score: {{ context.crm.score }}', "
         "'<p>{{ contact.first_name }} from {{ event.source }} scored {{ context.crm.score }}</p>')")
    definition = {"name": "Scored", "trigger": {"event": "signup"}, "start": "crm", "nodes": {
        "crm": {"type": "webhook", "url": http.url + "/score", "body": {"email": "{{ contact.email }}"}, "next": "mail"},
        "mail": {"type": "email", "template": "scored", "next": "done"},
        "done": {"type": "exit"}}}
    automation = db.one("SELECT herald.create_automation('acme', %s::jsonb)", json.dumps(definition))
    db.q("SELECT herald.set_automation_status(%s, 'live')", automation)
    sidecar()
    db.q("SELECT herald.upsert_contact('acme', 'ann@example.com', '{\"first_name\": \"Ann\"}')")
    db.q("SELECT herald.track('acme', 'ann@example.com', 'signup', '{\"source\": \"ads\"}')")
    wait_until(lambda: smtp.count() == 1, timeout=30, what="the email after the webhook")
    (rcpts, msg, _), = smtp.snapshot()
    assert rcpts == ["ann@example.com"]
    assert msg["Subject"] == "Your score: 42"
    assert "Ann from ads scored 42" in msg.get_body(("html",)).get_content()
    req, = http.snapshot()
    assert json.loads(req["body"]) == {"email": "ann@example.com"}
    assert signature_ok(req["headers"], req["body"])
    wait_until(lambda: db.one("SELECT status FROM herald.enrollments WHERE automation_id = %s", automation)
               == "completed", what="the enrollment to complete")


def test_missing_maintenance_functions_are_reported_once(db, smtp, sidecar):
    for name in ["tick", "prune"]:
        # every signature the installed release has (prune gained an argument in 0.3.0)
        for (sig,) in db.q("SELECT p.oid::regprocedure::text FROM pg_proc p "
                             "WHERE p.pronamespace = 'herald'::regnamespace AND p.proname = %s", name):
            db.q(f"ALTER EXTENSION herald DROP FUNCTION {sig}")
            db.q(f"DROP FUNCTION {sig}")
    db.q("SELECT herald.upsert_template('acme', 't', 's', '<p>h</p>')")
    db.q("SELECT herald.send('acme', 'x@example.com', 't')")
    s = sidecar()
    wait_until(lambda: db.counts() == {"done": 1}, what="the email")
    wait_until(lambda: "herald.prune" in s.log(), what="the prune report")
    time.sleep(1.0)  # five more tick timers
    log = s.log()
    assert log.count('task="herald.tick"') == 1, log
    assert log.count('task="herald.prune"') == 1, log
    assert "not installed" in log
    assert s.running()


def test_500_contacts_email_delay_webhook_exit(db, smtp, http, sidecar):
    """The issue's scenario: every message arrives once, parses as MIME, is personalised and carries the
    headers; every webhook arrives once with a valid signature; every journey completes."""
    db.q("SELECT herald.upsert_template('acme', 'hi', 'Hi {{ contact.first_name }}', "
         "'<p>Hello {{ contact.first_name }}</p>', 'Hello {{ contact.first_name }}')")
    db.q("SELECT herald.upsert_contacts('acme', (SELECT jsonb_agg(jsonb_build_object("
         "'email', 'c' || i || '@example.com', 'attributes', jsonb_build_object('first_name', 'C' || i))) "
         "FROM generate_series(1, 500) i))")
    definition = {"name": "Series", "start": "mail", "nodes": {
        "mail": {"type": "email", "template": "hi", "next": "wait"},
        "wait": {"type": "delay", "duration": "1 second", "next": "crm"},
        "crm": {"type": "webhook", "url": http.url + "/crm", "body": {"email": "{{ contact.email }}"}, "next": "done"},
        "done": {"type": "exit"}}}
    automation = db.one("SELECT herald.create_automation('acme', %s::jsonb)", json.dumps(definition))
    db.q("SELECT herald.set_automation_status(%s, 'live')", automation)
    db.q("SELECT herald.enroll_segment(%s, '{\"field\": \"contact.email\", \"op\": \"ends_with\", \"value\": \"@example.com\"}')",
         automation)
    sidecar()
    wait_until(lambda: db.one("SELECT count(*) FROM herald.enrollments WHERE automation_id = %s AND status = 'completed'",
                              automation) == 500, timeout=90, what="500 completed journeys")

    received = smtp.snapshot()
    assert len(received) == 500
    by_rcpt = {}
    for rcpts, msg, _ in received:
        assert len(rcpts) == 1
        by_rcpt.setdefault(rcpts[0], []).append(msg)
    assert len(by_rcpt) == 500, "every contact got exactly one message"
    for rcpt, (msg,) in by_rcpt.items():
        n = rcpt.split("@")[0][1:]
        assert msg["Subject"] == f"Hi C{n}"
        assert msg["To"] == rcpt and msg["From"] and msg["Date"] and msg["Message-ID"].endswith("@herald>")
        assert msg.get_content_type() == "multipart/alternative"
        assert f"Hello C{n}" in msg.get_body(("plain",)).get_content()
        assert f"<p>Hello C{n}</p>" in msg.get_body(("html",)).get_content()
    assert len({m["Message-ID"] for ms in by_rcpt.values() for m in ms}) == 500

    calls = http.snapshot()
    assert len(calls) == 500
    emails = sorted(json.loads(c["body"])["email"] for c in calls)
    assert emails == sorted(by_rcpt), "one webhook per contact"
    assert all(signature_ok(c["headers"], c["body"]) for c in calls)
    assert len({c["headers"]["Idempotency-Key"] for c in calls}) == 500

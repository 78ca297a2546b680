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
    for sig in ["herald.tick(int)", "herald.prune(interval)"]:
        name = sig.split("(")[0].split(".")[1]
        if has_function(db, name):
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

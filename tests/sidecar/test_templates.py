"""Templates end to end (issue 13): what herald.render_template previews is what `herald run` sends (one
engine), an undefined variable fails the job with its name, and herald.send_test's email arrives."""

import json

import psycopg
import pytest

from conftest import wait_until


def parts(msg):
    """The message's parts by content type, line ends as the template wrote them."""
    return {p.get_content_type(): p.get_content().replace("\r\n", "\n")
            for p in msg.walk() if not p.is_multipart()}


def received(smtp, rcpt):
    msgs = [msg for rcpts, msg, _ in smtp.snapshot() if rcpt in rcpts]
    assert len(msgs) == 1, f"{len(msgs)} messages to {rcpt}"
    return msgs[0]


def test_render_template_is_what_the_daemon_sends(db, smtp, sidecar):
    db.q("""SELECT herald.upsert_template('acme', 'order',
            'Order #{{ variables.order }} for {{ contact.first_name | default("you") }}',
            '<h1>Thanks, {{ contact.first_name }}!</h1>
<p>{% for item in variables["items"] %}{{ loop.index }}. {{ item.name }} ({{ item.qty }})<br>{% endfor %}</p>
<p>Plan: {{ contact.plan | upper }} · {{ "<escaped & safe>" }} · {{ workspace }}</p>',
            'Thanks, {{ contact.first_name }}.
{% for item in variables["items"] %}- {{ item.name }} x{{ item.qty }}
{% endfor %}Total: {{ variables.total }} ({{ contact.likes | join(", ") }})')""")
    # no text part: the daemon derives one from the html, and so does the preview
    db.q("""SELECT herald.upsert_template('acme', 'note', 'A note for {{ contact.email }}',
            '<p>Hello {{ contact.first_name | default("there") }},</p><ul><li>one</li><li>two &amp; three</li></ul>')""")
    db.q("""SELECT * FROM herald.upsert_contacts('acme', '[
            {"email": "ann@example.com", "attributes": {"first_name": "Ann", "plan": "pro", "likes": ["tea", "mugs"]}},
            {"email": "bob@example.com", "attributes": {"first_name": "Bob", "plan": "free", "likes": []}}]'::jsonb)""")
    assert db.one("SELECT count(*) FROM herald.contacts") == 2
    context = {"order": 1042, "total": "€30.50", "items": [{"name": "Mug", "qty": 2}, {"name": "Tea <Earl Grey>", "qty": 1}]}
    previews = {}
    for email, key in [("ann@example.com", "order"), ("bob@example.com", "order"), ("ann@example.com", "note"),
                       ("carol@example.com", "note")]:
        ctx = context if key == "order" else {}
        previews[(email, key)] = db.one("SELECT herald.render_template('acme', %s, %s, %s::jsonb)",
                                        key, email, json.dumps(ctx))
        db.q("SELECT herald.send('acme', %s, %s, %s::jsonb)", email, key, json.dumps(ctx))
    sidecar()
    wait_until(lambda: db.counts().get("done") == 4, timeout=60, what="4 emails sent")
    assert smtp.count() == 4

    for (email, key), preview in previews.items():
        msg = [m for rcpts, m, _ in smtp.snapshot() if email in rcpts and m["Subject"] == preview["subject"]]
        assert len(msg) == 1, f"{email}/{key}: the preview's subject {preview['subject']!r} was not received"
        body = parts(msg[0])
        assert body["text/html"] == preview["html"], (email, key)
        assert body["text/plain"] == preview["text"], (email, key)
    ann = previews[("ann@example.com", "order")]
    assert ann["subject"] == "Order #1042 for Ann"
    assert "1. Mug (2)<br>2. Tea &lt;Earl Grey&gt; (1)<br>" in ann["html"]
    assert "Plan: PRO · &lt;escaped &amp; safe&gt; · acme" in ann["html"]
    assert ann["text"] == "Thanks, Ann.\n- Mug x2\n- Tea <Earl Grey> x1\nTotal: €30.50 (tea, mugs)"
    assert previews[("carol@example.com", "note")]["subject"] == "A note for carol@example.com"
    assert previews[("carol@example.com", "note")]["text"] == "Hello there,\n\n- one\n- two & three\n"


def test_an_undefined_variable_fails_the_job_with_its_name(db, smtp, sidecar):
    db.q("""SELECT herald.upsert_template('acme', 'welcome', 'Welcome, {{ contact.first_name }}!',
            '<p>Hi</p>\n<p>Your plan: {{ contact.plan | default("free") }}</p>')""")
    db.q("SELECT herald.upsert_contact('acme', 'named@example.com', '{\"first_name\": \"Nia\"}')")
    db.q("SELECT herald.upsert_contact('acme', 'nameless@example.com', '{}')")
    named = db.one("SELECT herald.send('acme', 'named@example.com', 'welcome')")
    nameless = db.one("SELECT herald.send('acme', 'nameless@example.com', 'welcome')")
    expected = ('template error in subject: contact.first_name is not defined (line 1); '
                'write {{ contact.first_name | default("…") }} if it may be missing')
    # the preview says the same before anything is sent
    with pytest.raises(psycopg.errors.DataException) as e:
        db.q("SELECT herald.render_template('acme', 'welcome', 'nameless@example.com')")
    assert e.value.diag.message_primary == expected
    sidecar()
    wait_until(lambda: db.one("SELECT count(*) FROM herald.outbox WHERE status IN ('done', 'failed')") == 2,
               timeout=60, what="both jobs finished")
    assert db.one("SELECT status FROM herald.outbox WHERE id = %s", named) == "done"
    assert db.q("SELECT status, last_error FROM herald.outbox WHERE id = %s", nameless) == [("failed", expected)]
    assert db.one("SELECT error FROM herald.message_history WHERE outbox_id = %s", nameless) == expected
    assert smtp.count() == 1
    assert received(smtp, "named@example.com")["Subject"] == "Welcome, Nia!"


def test_send_test_arrives_marked(db, smtp, sidecar):
    db.q("""SELECT herald.upsert_template('acme', 'promo', 'Spring deals for {{ contact.first_name | default("you") }}',
            '<p>Code {{ variables.code }}</p>', 'Code {{ variables.code }}',
            'Acme Deals <deals@acme.test>', 'help@acme.test')""")
    db.q("SELECT herald.upsert_contact('acme', 'ann@example.com', '{\"first_name\": \"Ann\"}')")
    contacts = db.one("SELECT count(*) FROM herald.contacts")
    to_contact = db.one("SELECT herald.send_test('acme', 'promo', 'ann@example.com', '{\"code\": \"A1\"}')")
    to_stranger = db.one("SELECT herald.send_test('acme', 'promo', 'qa@example.com', '{\"code\": \"Q2\"}')")
    assert to_contact != to_stranger
    sidecar()
    wait_until(lambda: db.counts().get("done") == 2, timeout=60, what="2 test emails sent")

    ann = received(smtp, "ann@example.com")
    assert ann["Subject"] == "[test] Spring deals for Ann"
    assert parts(ann)["text/plain"] == "Code A1"
    assert ann["From"] == "Acme Deals <deals@acme.test>" and ann["Reply-To"] == "help@acme.test"
    qa = received(smtp, "qa@example.com")
    assert qa["Subject"] == "[test] Spring deals for you"
    assert parts(qa)["text/html"] == "<p>Code Q2</p>"
    # the address that was no contact is still none, and no journey could have started for it
    assert db.one("SELECT count(*) FROM herald.contacts") == contacts
    assert db.one("SELECT count(*) FROM herald.events WHERE email = 'qa@example.com'") == 0
    # counted in no statistic: no automation or broadcast behind them
    assert db.q("SELECT automation_id, broadcast_id FROM herald.message_history ORDER BY outbox_id") == [(None, None)] * 2
    assert db.one("SELECT count(*) FROM herald.stats_delta") == 0

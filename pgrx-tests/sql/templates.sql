-- Templates (sql/templates.sql, render/): checked when saved (syntax, variable roots, sender
-- mailboxes), checked against a broadcast's variables, previewed with render_template exactly as the
-- daemon renders them (strict: an undefined variable fails with its name), and sent as a test.
\set SHOW_CONTEXT never
\set ON_ERROR_ROLLBACK on
SELECT herald.create_workspace('tp1');
SELECT herald.upsert_contact('tp1', 'ann@example.com', '{"first_name": "Ann", "plan": "pro"}') > 0 AS contact;

-- ------------------------------------------------------------------------------- saved checked
SELECT herald.upsert_template('tp1', 'welcome', 'Hi {{ contact.first_name | default("there") }}',
    E'<p>Your plan: {{ contact.plan }}</p>\n<p>Code {{ variables.code }}</p>',
    E'Plan {{ contact.plan }}, code {{ variables.code }}');
-- a syntax error: part, line, what is wrong, what is allowed
SELECT herald.upsert_template('tp1', 'bad', 'Hi {{ contact.first_name', '<p>x</p>');
SELECT herald.upsert_template('tp1', 'bad', 'Hi', E'<p>\n{% if contact.plan %}\n</p>');
SELECT herald.upsert_template('tp1', 'bad', 'Hi', '<p>x</p>', E'line 1\nline 2 {{ }}');
-- a variable whose root templates cannot see: what it probably means
SELECT herald.upsert_template('tp1', 'bad', 'Issue {{ issue }}', '<p>x</p>');
SELECT herald.upsert_template('tp1', 'bad', 'Hi', E'<p>\n\n{{ first_name | default("you") }}</p>');
-- a filter or a test the engine does not have
SELECT herald.upsert_template('tp1', 'bad', 'Hi {{ contact.first_name | uper }}', '<p>x</p>');
SELECT herald.upsert_template('tp1', 'bad', 'Hi', '{% if contact.plan is definned %}x{% endif %}');
-- a part is one text: it cannot include or extend another template
SELECT herald.upsert_template('tp1', 'bad', 'Hi', E'<p>x</p>\n{% include "footer" %}');
-- locals, loops, macros and the global functions are fine; nothing was stored for 'bad'
SELECT herald.upsert_template('tp1', 'fine', '{% set n = contact.email %}{{ n }}',
    '{% for t in contact.tags %}{{ loop.index }}:{{ t }} {% endfor %}{{ range(3) | join(",") }}{% macro m(a) %}[{{ a }}]{% endmacro %}{{ m(workspace) }}');
SELECT count(*) AS bad_versions FROM herald.templates WHERE workspace_id = 'tp1' AND key = 'bad';

-- the sender: an address or Name <address>, stored trimmed; NULL leaves it to the provider
SELECT herald.upsert_template('tp1', 'sender', 'Hi', '<p>x</p>', NULL, ' Acme News <news@acme.test> ', 'help@acme.test');
SELECT herald.upsert_template('tp1', 'sender', 'Hi', '<p>x</p>', NULL, '"Acme, Inc." <news@acme.test>');
SELECT version, from_address, reply_to FROM herald.templates WHERE workspace_id = 'tp1' AND key = 'sender' ORDER BY version;
SELECT herald.upsert_template('tp1', 'sender', 'Hi', '<p>x</p>', NULL, 'news at acme');
SELECT herald.upsert_template('tp1', 'sender', 'Hi', '<p>x</p>', NULL, 'Acme, Inc <news@acme.test>');
SELECT herald.upsert_template('tp1', 'sender', 'Hi', '<p>x</p>', NULL, NULL, 'a@acme.test, b@acme.test');
SELECT herald.upsert_template('tp1', 'sender', 'Hi', '<p>x</p>', NULL, E'News <news@acme.test>\r\nBcc: x@y.test');

-- ------------------------------------------------------------------------------- render_template
-- the contact's attributes and the context as variables; html escaped, text as written
SELECT herald.render_template('tp1', 'welcome', 'ann@example.com', '{"code": "<b>42</b>"}');
-- the address is matched as stored (trimmed, lower-cased)
SELECT herald.render_template('tp1', 'welcome', ' ANN@example.com ', '{"code": 1}') ->> 'subject' AS subject;
-- an address that is no contact has contact.email and nothing else: the daemon would fail the same way
SELECT herald.render_template('tp1', 'welcome', 'bob@example.com', '{"code": 1}');
SELECT herald.upsert_template('tp1', 'plain', 'Hello {{ contact.email }}', '<h1>Hello</h1><p>See <a href="https://acme.test/x">this</a></p><p><a href="{{ unsubscribe_url }}">stop</a></p>');
-- no text part: derived from the html, as the daemon derives it; unsubscribe_url is a placeholder
SELECT herald.render_template('tp1', 'plain', 'bob@example.com');
SELECT herald.render_template('tp1', 'welcome', 'ann@example.com');
SELECT herald.render_template('tp1', 'fine', 'ann@example.com') ->> 'html' AS html;
-- what can be wrong with the call
SELECT herald.render_template('tp1', 'nope', 'ann@example.com');
SELECT herald.render_template('tp1', 'welcome', 'not-an-address');
SELECT herald.render_template('tp1', 'welcome', 'ann@example.com', '[1]');
SELECT herald.render_template('nowhere', 'welcome', 'ann@example.com');
-- a template saved before 0.3.0 may still name an unknown variable: the render says what it probably means
INSERT INTO herald.templates (workspace_id, key, version, subject, html) VALUES ('tp1', 'legacy', 1, 'Issue {{ issue }}', '<p>x</p>');
SELECT herald.render_template('tp1', 'legacy', 'ann@example.com');
-- bounded like the daemon's render workers: a template that asks for gigabytes fails, the backend lives on
INSERT INTO herald.templates (workspace_id, key, version, subject, html)
VALUES ('tp1', 'bomb', 1, 's', '{% set s = "12345678" %}' || repeat('{% set s = s ~ s %}', 28) || '{{ s | length }}');
SELECT herald.render_template('tp1', 'bomb', 'ann@example.com');
SELECT herald.render_template('tp1', 'welcome', 'ann@example.com', '{"code": 7}') ->> 'subject' AS still_rendering;
-- nothing was written
SELECT (SELECT count(*) FROM herald.contacts WHERE workspace_id = 'tp1') AS contacts,
       (SELECT count(*) FROM herald.outbox WHERE workspace_id = 'tp1') AS jobs;

-- ------------------------------------------------------------------------------- send_test
SELECT herald.send_test('tp1', 'welcome', 'ann@example.com', '{"code": 5}') AS test_job \gset
SELECT kind, priority, provider, contact_id IS NOT NULL AS has_contact, automation_id, broadcast_id, dedupe_key LIKE 'test:%' AS test_key,
       payload - 'to' AS payload, payload ->> 'to' AS "to"
  FROM herald.outbox WHERE id = :test_job;
-- an address that is no contact stays none (no contact, no contact.created event)
SELECT herald.send_test('tp1', 'plain', 'Bob@Example.com') AS bob_job \gset
SELECT contact_id, payload ->> 'to' AS "to" FROM herald.outbox WHERE id = :bob_job;
SELECT count(*) AS bob_contacts FROM herald.contacts WHERE workspace_id = 'tp1' AND email = 'bob@example.com';
SELECT count(*) AS created_events FROM herald.events WHERE workspace_id = 'tp1' AND email = 'bob@example.com';
-- claim hands the test jobs out with their recipient and contact facts, as for any job (other files'
-- jobs held meanwhile, and all of it rolled back)
BEGIN;
UPDATE herald.outbox SET status = 'held' WHERE workspace_id <> 'tp1' AND status = 'pending';
SELECT j.id = :test_job AS ann, j.payload ->> 'to' AS "to", j.payload -> 'contact' AS contact, j.payload -> 'test' AS test,
       j.payload -> 'template' ->> 'key' AS template
  FROM herald.claim('templates-test', 10) j WHERE j.workspace = 'tp1' ORDER BY j.id;
ROLLBACK;
-- an address suppressed after its test was queued is not mailed: claim checks a test's recipient that
-- is no contact as it checks a contact's (rolled back)
BEGIN;
UPDATE herald.outbox SET status = 'held' WHERE workspace_id <> 'tp1' AND status = 'pending';
SELECT herald.suppress('tp1', 'bob@example.com', 'unsubscribed');
SELECT count(*) FILTER (WHERE j.id = :bob_job) AS bob_handed_out, count(*) AS handed_out
  FROM herald.claim('templates-test', 10) j WHERE j.workspace = 'tp1';
SELECT status, last_error FROM herald.outbox WHERE id = :bob_job;
ROLLBACK;
-- refused, and nothing queued: a template that would fail, a suppressed address, an unknown provider
SELECT herald.send_test('tp1', 'welcome', 'bob@example.com', '{"code": 5}');
SELECT herald.suppress('tp1', 'carol@example.com', 'unsubscribed');
SELECT herald.send_test('tp1', 'plain', 'carol@example.com');
SELECT herald.send_test('tp1', 'plain', 'ann@example.com', '{}', 'nope');
SELECT count(*) AS jobs FROM herald.outbox WHERE workspace_id = 'tp1';

-- ------------------------------------------------------------------------------- broadcasts
SELECT herald.upsert_template('tp1', 'news', 'Issue {{ broadcast.issue }}: {{ broadcast.name }}',
                              '<p>{{ broadcast.title | default("News") }} for {{ contact.email }}</p>');
-- broadcast.issue is not in the variables, and nothing allows it to be missing
SELECT herald.create_broadcast('tp1', '{"name": "n1", "template": "news", "audience": "all", "variables": {"title": "Hello"}}');
SELECT herald.create_broadcast('tp1', '{"name": "n1", "variations": [{"key": "a", "template": "plain", "weight": 50}, {"key": "b", "template": "news", "weight": 50}], "audience": "all"}');
-- with it (broadcast.title may be missing: it has a default)
SELECT herald.create_broadcast('tp1', '{"name": "n2", "template": "news", "audience": "all", "variables": {"issue": 7}}') > 0 AS created;
-- a test or a condition allows it too
SELECT herald.upsert_template('tp1', 'news-guarded', '{% if broadcast.issue is defined %}Issue {{ broadcast.issue }}{% else %}News{% endif %}', '<p>x</p>');
SELECT herald.create_broadcast('tp1', '{"name": "n3", "template": "news-guarded", "audience": "all"}') > 0 AS created;

-- nothing left for the files after this one to claim
DELETE FROM herald.outbox WHERE workspace_id = 'tp1';

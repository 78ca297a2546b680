-- Events: track, track_many, plain INSERT and COPY all reach the dispatcher; errors change nothing.
\set SHOW_CONTEXT never
-- ids start at this file's own base, so expected output does not depend on the other files
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 60000', t);
  END LOOP;
END $$;
SELECT herald.create_workspace('e1');

-- track creates an unknown contact (and its contact.created event), returns the event id
SELECT herald.track('e1', 'New@Example.com', 'signup', '{"source": "ads"}') AS ev \gset
SELECT e.kind, e.payload, c.email FROM herald.events e JOIN herald.contacts c ON c.id = e.contact_id WHERE e.id = :ev;
SELECT kind FROM herald.events WHERE workspace_id = 'e1' ORDER BY id;
SELECT herald.track('e1', 'new@example.com', 'signup') > :ev AS later_id;
SELECT count(*) AS contacts FROM herald.contacts WHERE workspace_id = 'e1';

-- track_many
SELECT herald.track_many('e1', '[
  {"email": "a@example.com", "kind": "page.view", "payload": {"path": "/pricing"}},
  {"email": "b@example.com", "kind": "page.view", "occurred_at": "2026-11-22T10:00:00Z"},
  {"email": "A@example.com", "kind": "purchase", "payload": {"amount": 42}}
]');
SELECT email, kind, payload, occurred_at = '2026-11-22T10:00:00Z' AS at_given_time
  FROM herald.events WHERE workspace_id = 'e1' AND kind IN ('page.view', 'purchase') ORDER BY id;
SELECT herald.track_many('e1', '[]');

-- errors: name the entry, record nothing
SELECT count(*) AS events_before FROM herald.events WHERE workspace_id = 'e1';
SELECT herald.track_many('e1', '[{"email": "ok@example.com", "kind": "x"}, {"email": "nope", "kind": "x"}]');
SELECT herald.track_many('e1', '[{"email": "ok@example.com"}]');
SELECT herald.track_many('e1', '[{"email": "ok@example.com", "kind": "x", "payload": [1]}]');
SELECT herald.track_many('e1', '[{"email": "ok@example.com", "kind": "x", "occurred_at": "yesterday"}]');
SELECT herald.track_many('e1', '[{"email": "ok@example.com", "kind": "x", "extra": 1}]');
SELECT herald.track_many('e1', '[{"email": "ok@example.com", "kind": ""}]');
SELECT herald.track_many('e1', '{"email": "ok@example.com"}');
SELECT herald.track_many('nope', '[]');
SELECT herald.track('e1', NULL, 'x');
SELECT herald.track('e1', 'ok@example.com', NULL);
SELECT herald.track('e1', 'ok@example.com', 'x', '"str"');
SELECT herald.track('nope', 'ok@example.com', 'x');
SELECT count(*) AS events_after FROM herald.events WHERE workspace_id = 'e1';
SELECT count(*) AS no_ok_contact FROM herald.contacts WHERE email = 'ok@example.com';

-- plain INSERT with only an email: the dispatcher creates the contact and fills contact_id
INSERT INTO herald.events (workspace_id, email, kind) VALUES ('e1', ' Plain@Example.com', 'signup'), ('e1', 'a@example.com', 'signup');
SELECT e.email, e.contact_id = c.id AS linked FROM herald.events e JOIN herald.contacts c ON c.workspace_id = e.workspace_id AND c.email = 'plain@example.com'
 WHERE e.workspace_id = 'e1' AND e.kind = 'signup' AND e.email = 'plain@example.com';
SELECT count(*) AS created_events FROM herald.events e JOIN herald.contacts c ON c.id = e.contact_id
 WHERE c.email = 'plain@example.com' AND e.kind = 'contact.created';

-- plain INSERT errors
INSERT INTO herald.events (workspace_id, email, kind) VALUES ('nope', 'a@example.com', 'x');
INSERT INTO herald.events (workspace_id, email, kind) VALUES ('e1', 'not-an-email', 'x');
INSERT INTO herald.events (workspace_id, contact_id, kind) VALUES ('e1', -1, 'x');
\set VERBOSITY terse
INSERT INTO herald.events (workspace_id, kind) VALUES ('e1', 'x');
\set VERBOSITY default
-- a contact of another workspace cannot be used
SELECT herald.create_workspace('e2');
SELECT herald.upsert_contact('e2', 'other@example.com') AS other \gset
CREATE FUNCTION pg_temp.error_of(statement text) RETURNS text LANGUAGE plpgsql AS
$$ BEGIN EXECUTE statement; RETURN 'no error'; EXCEPTION WHEN others THEN RETURN sqlerrm; END $$;
SELECT replace(pg_temp.error_of(format('INSERT INTO herald.events (workspace_id, contact_id, kind) VALUES (%L, %s, %L)', 'e1', :other, 'x')),
               :'other', '<id of e2''s contact>') AS error;

-- COPY reaches the dispatcher too
COPY herald.events (workspace_id, email, kind, payload) FROM stdin;
e1	copy1@example.com	signup	{"source": "copy"}
e1	copy2@example.com	signup	{}
\.
SELECT email, contact_id IS NOT NULL AS linked FROM herald.events WHERE workspace_id = 'e1' AND email LIKE 'copy%' AND kind = 'signup' ORDER BY email;

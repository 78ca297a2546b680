-- Workspaces and contacts: create_workspace, upsert_contact, upsert_contacts, and their errors.
\set SHOW_CONTEXT never
-- ids start at this file's own base, so expected output does not depend on the other files
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 20000', t);
  END LOOP;
END $$;
\set VERBOSITY default

-- workspaces
SELECT herald.create_workspace('c1', 'Contacts One');
SELECT herald.create_workspace('c1');                      -- idempotent, keeps the name
SELECT name = 'Contacts One' AS kept_name FROM herald.workspaces WHERE id = 'c1';
SELECT herald.create_workspace('bad id');
SELECT herald.create_workspace(NULL);
SELECT herald.create_workspace(repeat('x', 65));

-- upsert_contact: normalises email, returns the id, merges attributes
SELECT herald.upsert_contact('c1', '  Ann@Example.COM ', '{"plan": "free", "first_name": "Ann"}') AS ann \gset
SELECT email, attributes FROM herald.contacts WHERE id = :ann;
SELECT herald.upsert_contact('c1', 'ann@example.com', '{"plan": "pro", "first_name": null}') = :ann AS same_contact;
SELECT attributes FROM herald.contacts WHERE id = :ann;
SELECT kind, payload FROM herald.events WHERE contact_id = :ann ORDER BY id;

-- errors change nothing
SELECT count(*) AS contacts_before FROM herald.contacts WHERE workspace_id = 'c1';
SELECT herald.upsert_contact('nope', 'a@example.com');
SELECT herald.upsert_contact('c1', 'not an email');
-- control and bidirectional-formatting characters are refused (they hide or reorder what a person reads)
SELECT herald.upsert_contact('c1', E'ann\x01@example.com');
SELECT herald.upsert_contact('c1', E'ann\u202e@example.com');
SELECT herald._valid_email(e) AS valid, e FROM unnest(ARRAY['plain@example.com', E'tab\t@example.com', E'rlo\u202emoc.elpmaxe@x.com',
                                                            E'lrm\u200e@example.com', 'zoë@exämple.com',
                                                            -- Unicode's spaces, whatever the database's locale says
                                                            E'nbsp\u00a0@example.com', E'wide\u3000@example.com']) e;
SELECT herald._valid_email(NULL) AS null_is_not_valid, herald._valid_mailbox(NULL) AS nor_as_a_mailbox;
SELECT herald.upsert_contact('c1', NULL);
SELECT herald.upsert_contact('c1', 'b@example.com', '[1,2]');
SELECT count(*) AS contacts_after FROM herald.contacts WHERE workspace_id = 'c1';

-- upsert_contacts: bulk, rejects are counted and explained, never abort the good rows;
-- inside the caller's transaction the reasons of this very call are the rows of batch txid_current()
BEGIN;
SELECT * FROM herald.upsert_contacts('c1', '[
  {"email": "bob@example.com", "attributes": {"plan": "pro"}, "timezone": "Europe/Paris"},
  {"email": "ANN@example.com", "attributes": {"plan": "pro"}},
  {"email": "carl@example.com"},
  {"email": "broken"},
  {"email": "dora@example.com", "attributes": "pro"},
  {"email": "eve@example.com", "timezone": "Mars/Olympus"},
  {"email": "fred@example.com", "plan": "pro"},
  42,
  {"attributes": {}},
  {"email": "carl@example.com", "attributes": {"plan": "trial"}}
]');
SELECT position, reason, input FROM herald.contact_rejections WHERE workspace_id = 'c1' AND batch = txid_current() ORDER BY position;
COMMIT;
SELECT count(*) AS kept_after_commit FROM herald.contact_rejections WHERE workspace_id = 'c1';
SELECT email, attributes, timezone FROM herald.contacts WHERE workspace_id = 'c1' ORDER BY email;

-- only real changes emit contact.updated, with the changed attribute names
SELECT kind, count(*) FROM herald.events WHERE workspace_id = 'c1' GROUP BY kind ORDER BY kind;
SELECT * FROM herald.upsert_contacts('c1', '[{"email": "bob@example.com", "attributes": {"plan": "pro"}}]');
SELECT kind, count(*) FROM herald.events WHERE workspace_id = 'c1' GROUP BY kind ORDER BY kind;
SELECT * FROM herald.upsert_contacts('c1', '[{"email": "bob@example.com", "attributes": {"plan": "team", "seats": 5}}]');
SELECT payload FROM herald.events WHERE workspace_id = 'c1' AND kind = 'contact.updated' ORDER BY id DESC LIMIT 1;
-- a timezone change alone is an update too; null in a new contact's attributes is not stored
SELECT * FROM herald.upsert_contacts('c1', '[{"email": "bob@example.com", "timezone": "Asia/Tokyo"},
                                             {"email": "gil@example.com", "attributes": {"a": 1, "b": null}}]');
SELECT email, attributes, timezone FROM herald.contacts WHERE workspace_id = 'c1' AND email IN ('bob@example.com', 'gil@example.com') ORDER BY email;

-- bad calls
SELECT * FROM herald.upsert_contacts('c1', '{"email": "x@example.com"}');
SELECT * FROM herald.upsert_contacts('c1', NULL);
SELECT * FROM herald.upsert_contacts('nope', '[]');
SELECT * FROM herald.upsert_contacts(NULL, '[]');
SELECT * FROM herald.upsert_contacts('c1', '[]');

-- workspaces are isolated: same email, two contacts
SELECT herald.create_workspace('c2');
SELECT herald.upsert_contact('c2', 'ann@example.com') <> :ann AS distinct_contact;

-- Imports into a workspace where no live automation triggers on contact.created skip the dispatcher for
-- their contact.created events (herald.restoring, for that one statement). The events are still written,
-- the setting is put back after the call (the dispatcher checks the next INSERT of the same transaction),
-- and contact.updated events still go through the dispatcher (they wake a waiting enrollment).
SELECT herald.create_workspace('cq');
BEGIN;
SELECT * FROM herald.upsert_contacts('cq', '[{"email": "q1@example.com", "attributes": {"plan": "pro", "gone": null}},
                                             {"email": "q2@example.com"}, {"email": "Q1@example.com", "timezone": "UTC"}]');
SELECT coalesce(current_setting('herald.restoring', true), '') AS restoring_after_call;
SELECT e.kind, e.email, e.payload, e.contact_id = c.id AS same_contact FROM herald.events e
  JOIN herald.contacts c ON c.workspace_id = e.workspace_id AND c.email = e.email WHERE e.workspace_id = 'cq' ORDER BY e.id;
SELECT email, attributes, timezone FROM herald.contacts WHERE workspace_id = 'cq' ORDER BY email;
INSERT INTO herald.events (workspace_id, contact_id, kind) VALUES ('cq', -1, 'checked');
ROLLBACK;
-- a loader's own herald.restoring = on is kept
SET herald.restoring = on;
SELECT inserted FROM herald.upsert_contacts('cq', '[{"email": "q3@example.com"}]');
SHOW herald.restoring;
RESET herald.restoring;
-- a contact.updated from an import wakes an enrollment waiting for it
SELECT * FROM herald.upsert_contacts('cq', '[{"email": "q4@example.com", "attributes": {"plan": "free"}}]');
SELECT herald.create_automation('cq', '{"name": "upgrade", "start": "w",
  "nodes": {"w": {"type": "wait_event", "event": "contact.updated", "timeout": "1 day", "next": "done", "timeout_next": "done"},
            "done": {"type": "exit"}}}') AS waiting \gset
SELECT herald.set_automation_status(:waiting, 'live');
SELECT enrolled FROM herald.enroll(:waiting, ARRAY(SELECT id FROM herald.contacts WHERE workspace_id = 'cq' AND email = 'q4@example.com'));
UPDATE herald.enrollments SET status = 'waiting', wait_kind = 'event', wait_event = 'contact.updated',
       next_run_at = now() + interval '1 day'
 WHERE workspace_id = 'cq' AND automation_id = :waiting;
SELECT * FROM herald.upsert_contacts('cq', '[{"email": "q4@example.com", "attributes": {"plan": "pro"}}]');
SELECT status, current_node, wait_kind, context -> 'w' -> 'changed' AS changed FROM herald.enrollments
 WHERE workspace_id = 'cq' AND automation_id = :waiting;
-- with a live contact.created automation the dispatcher runs as before: it enrols the new contacts
SELECT herald.create_automation('cq', '{"name": "welcome", "trigger": {"event": "contact.created", "filter": {"field": "event.plan", "op": "eq", "value": "pro"}},
  "start": "x", "nodes": {"x": {"type": "exit"}}}') AS welcome \gset
SELECT herald.set_automation_status(:welcome, 'live');
SELECT * FROM herald.upsert_contacts('cq', '[{"email": "q5@example.com", "attributes": {"plan": "pro"}}, {"email": "q6@example.com"}]');
SELECT c.email FROM herald.enrollments e JOIN herald.contacts c ON c.workspace_id = e.workspace_id AND c.id = e.contact_id
 WHERE e.workspace_id = 'cq' AND e.automation_id = :welcome ORDER BY c.email;
SELECT herald.set_automation_status(:welcome, 'paused');
-- attributes merged from repeated entries are bounded like each entry's (64 KiB): the call fails, nothing is kept
SELECT * FROM herald.upsert_contacts('cq', jsonb_build_array(
    jsonb_build_object('email', 'big@example.com', 'attributes', jsonb_build_object('a', repeat('x', 40000))),
    jsonb_build_object('email', 'big@example.com', 'attributes', jsonb_build_object('b', repeat('y', 40000)))));
SELECT count(*) AS big_contacts FROM herald.contacts WHERE workspace_id = 'cq' AND email = 'big@example.com';
-- each entry's fields are taken out once for its check and its row: a null time zone is accepted, a
-- number is not, nor are null attributes; a repeated address keeps the last time zone given as a name
-- (a later null does not clear it); null-valued keys are dropped at any depth, from the contact and its
-- contact.created payload, also when the attributes are large enough to be stored compressed
SELECT * FROM herald.upsert_contacts('cq', jsonb_build_array(
    jsonb_build_object('email', 'tz1@example.com', 'timezone', null),
    jsonb_build_object('email', 'tz2@example.com', 'timezone', 5),
    jsonb_build_object('email', 'tz3@example.com', 'attributes', null),
    jsonb_build_object('email', 'tz4@example.com', 'timezone', 'UTC'),
    jsonb_build_object('email', 'TZ4@example.com', 'timezone', 'Asia/Tokyo',
                       'attributes', jsonb_build_object('n', jsonb_build_object('x', 1, 'y', null))),
    jsonb_build_object('email', 'tz4@example.com', 'timezone', null),
    jsonb_build_object('email', 'big2@example.com', 'attributes', jsonb_build_object('big', repeat('x', 3000), 'gone', null))));
SELECT position, reason FROM herald.contact_rejections
 WHERE workspace_id = 'cq' AND batch = (SELECT max(batch) FROM herald.contact_rejections WHERE workspace_id = 'cq') ORDER BY position;
SELECT email, timezone, attributes ? 'gone' AS kept_null, attributes -> 'n' AS n,
       pg_column_compression(attributes) IS NOT NULL AS compressed
  FROM herald.contacts WHERE workspace_id = 'cq' AND (email LIKE 'tz%' OR email = 'big2@example.com') ORDER BY email;
SELECT e.email, e.payload ? 'gone' AS null_in_payload, e.payload -> 'n' AS n FROM herald.events e
 WHERE e.workspace_id = 'cq' AND e.kind = 'contact.created' AND e.email IN ('big2@example.com', 'tz4@example.com') ORDER BY e.email;
-- (the woken enrollment would be due for the next suite's tick)
DELETE FROM herald.enrollments WHERE workspace_id = 'cq';
-- an address whose other copy in the call is rejected is taken from its accepted copy alone; the
-- contact.created events of a call follow contact id order (one per new contact)
SELECT * FROM herald.upsert_contacts('cq', jsonb_build_array(
    jsonb_build_object('email', 'half@example.com', 'timezone', 'Mars/Olympus', 'attributes', jsonb_build_object('a', 1)),
    jsonb_build_object('email', 'zed@example.com'),
    jsonb_build_object('email', 'HALF@example.com', 'attributes', jsonb_build_object('b', 2)),
    jsonb_build_object('email', 'abe@example.com')));
SELECT email, attributes, timezone FROM herald.contacts WHERE workspace_id = 'cq' AND email IN ('half@example.com', 'zed@example.com', 'abe@example.com') ORDER BY email;
SELECT count(*) AS created_events,
       bool_and(x.in_order) AS ids_follow_contacts
  FROM (SELECT e.email, (lag(e.contact_id) OVER (ORDER BY e.id) < e.contact_id) IS NOT FALSE AS in_order
          FROM herald.events e WHERE e.workspace_id = 'cq' AND e.kind = 'contact.created') x
 WHERE x.email IN ('half@example.com', 'zed@example.com', 'abe@example.com');
DELETE FROM herald.enrollments WHERE workspace_id = 'cq';

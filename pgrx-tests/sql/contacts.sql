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
                                                            E'lrm\u200e@example.com', 'zoë@exämple.com']) e;
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

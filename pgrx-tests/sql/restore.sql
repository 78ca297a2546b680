-- Loading a dump runs none of herald's triggers (herald._restoring): rows restored into herald.events
-- were dispatched in the database they come from, their enrollments and contact.created events are
-- restored rows of their own, and restored jobs must not wake the daemons.
\set SHOW_CONTEXT never
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 90000', t);
  END LOOP;
END $$;
SELECT herald.create_workspace('r1');
SELECT herald.create_automation('r1', '{"name": "on signup", "trigger": {"event": "signup"},
  "start": "w", "nodes": {"w": {"type": "delay", "duration": "1 day", "next": "x"}, "x": {"type": "exit"}}}') AS auto \gset
SELECT herald.set_automation_status(:auto, 'live');
-- an ordinary session: not restoring; an event enrols (and creates its contact)
SELECT herald._restoring() AS restoring;
INSERT INTO herald.events (workspace_id, email, kind) VALUES ('r1', 'live@example.com', 'signup');
SELECT count(*) AS enrollments FROM herald.enrollments WHERE automation_id = :auto;
-- from here on, a notification would show in this output (psql prints each one it receives)
LISTEN "herald.outbox";
LISTEN "herald.tick";

-- what every pg_dump output sets at its top (pg_restore sets the same on each connection)
BEGIN;
SET LOCAL check_function_bodies = false;
SET LOCAL row_security = off;
SELECT herald._restoring() AS restoring;
-- a restored event: its contact and enrollment come from the dump, so nothing is created or checked
-- (the workspace it names is restored later in pg_dump's order)
INSERT INTO herald.events (workspace_id, id, contact_id, email, kind) VALUES ('r9', 91000, 91000, 'old@example.com', 'signup');
INSERT INTO herald.events (workspace_id, id, email, kind) VALUES ('r1', 91001, 'restored@example.com', 'signup');
INSERT INTO herald.outbox (workspace_id, id, kind, dedupe_key, payload) OVERRIDING SYSTEM VALUE
VALUES ('r1', 91000, 'webhook', 'restored-job', '{}');
SELECT count(*) AS enrollments, (SELECT count(*) FROM herald.contacts WHERE email = 'restored@example.com') AS contacts_made
  FROM herald.enrollments WHERE automation_id = :auto;
ROLLBACK;
-- either setting alone is not a restore
SET check_function_bodies = false;
SELECT herald._restoring() AS restoring;
RESET check_function_bodies;
SET row_security = off;
SELECT herald._restoring() AS restoring;
RESET row_security;
-- other loaders say so explicitly
SET herald.restoring = on;
SELECT herald._restoring() AS restoring;
INSERT INTO herald.events (workspace_id, id, email, kind) VALUES ('r1', 91002, 'explicit@example.com', 'signup');
INSERT INTO herald.outbox (workspace_id, id, kind, dedupe_key, payload) OVERRIDING SYSTEM VALUE
VALUES ('r1', 91001, 'webhook', 'restored-job-2', '{}');
SELECT count(*) AS enrollments FROM herald.enrollments WHERE automation_id = :auto;
RESET herald.restoring;
SELECT herald._restoring() AS restoring;
UNLISTEN *;

-- One tenant's bad data fails its own row, never everyone's work: what a tenant stores is bounded
-- (JSON at most 32 levels deep and 64 KiB), and tick runs each enrollment on its own terms.
\set SHOW_CONTEXT never
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 97000', t);
  END LOOP;
END $$;
SELECT herald.create_workspace(w) FROM unnest(ARRAY['la', 'lb']) w;
SELECT herald.upsert_template(w, 't', 'Hi', '<p>hi</p>') FROM unnest(ARRAY['la', 'lb']) w;
-- 40 levels deep, and 70,000 bytes
CREATE TEMP TABLE poison AS
SELECT (repeat('{"a":', 40) || '1' || repeat('}', 40))::jsonb AS deep,
       jsonb_build_object('big', repeat('x', 70000)) AS big;

-- refused at every way in, with the limit named; nothing is recorded
SELECT herald.track('la', 'a@example.com', 'go', (SELECT deep FROM poison));
SELECT herald.track_many('la', jsonb_build_array(jsonb_build_object('email', 'a@example.com', 'kind', 'go', 'payload', (SELECT big FROM poison))));
INSERT INTO herald.events (workspace_id, email, kind, payload) SELECT 'la', 'a@example.com', 'go', deep FROM poison;
SELECT herald.send('la', 'a@example.com', 't', (SELECT deep FROM poison));
SELECT count(*) AS events_recorded FROM herald.events WHERE workspace_id = 'la';
-- in a bulk upsert the bad entry alone is rejected, with its reason
SELECT * FROM herald.upsert_contacts('la', jsonb_build_array(
    jsonb_build_object('email', 'deep@example.com', 'attributes', (SELECT deep FROM poison)),
    jsonb_build_object('email', 'fine@example.com', 'attributes', jsonb_build_object('plan', 'pro'))));
SELECT position, reason FROM herald.contact_rejections WHERE workspace_id = 'la' ORDER BY position;
-- at the limit is fine: 32 levels
SELECT herald.track('la', 'a@example.com', 'ok', (repeat('{"a":', 32) || '1' || repeat('}', 32))::jsonb) > 0 AS at_the_limit;

-- tick: an enrollment whose stored data is deeper than the engine reads (stored before these limits,
-- or by hand) fails alone, with the reason; the other workspace's enrollment in the same batch goes on
SELECT herald.set_automation_status(herald.create_automation(w, '{"name": "n", "trigger": {"event": "go"},
  "start": "x", "nodes": {"x": {"type": "exit"}}}'), 'live') FROM unnest(ARRAY['la', 'lb']) w;
SELECT herald.track(w, 'p@example.com', 'go') > 0 AS tracked FROM unnest(ARRAY['la', 'lb']) w;
UPDATE herald.enrollments SET context = (SELECT jsonb_build_object('x', (repeat('[', 200) || repeat(']', 200))::jsonb))
 WHERE workspace_id = 'la';
SELECT herald.tick() >= 2 AS ticked;
SELECT workspace_id, status, left(exit_reason, 60) AS exit_reason FROM herald.enrollments
 WHERE workspace_id IN ('la', 'lb') ORDER BY workspace_id;

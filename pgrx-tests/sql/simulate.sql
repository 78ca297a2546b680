-- Dry run of an automation (simulate_automation, issue 15 §2): recorded events replayed through the
-- trigger, its filter and the re-entry rule, the step engine walking each would-be enrollment on a
-- virtual clock; webhook replies and approvals from options; every refusal; nothing written.
\set SHOW_CONTEXT never
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox', 'broadcasts'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 4000000', t);
  END LOOP;
END $$;
SELECT herald.create_workspace('sim');
SELECT * FROM herald.upsert_contacts('sim', '[
  {"email": "ann@example.com", "attributes": {"plan": "pro"}},
  {"email": "bob@example.com", "attributes": {"plan": "free"}, "timezone": "Europe/Paris"},
  {"email": "cat@example.com", "attributes": {"plan": "free"}},
  {"email": "dan@example.com", "attributes": {"plan": "pro"}},
  {"email": "eve@example.com", "attributes": {"plan": "free"}}]');
SELECT email, id FROM herald.contacts WHERE workspace_id = 'sim' ORDER BY id;

-- a live automation with real enrollments, for include_enrolled: ann and bob visit and are enrolled
SELECT herald.create_automation('sim', '{"name": "visits", "trigger": {"event": "visit"}, "start": "d",
  "nodes": {"d": {"type": "delay", "duration": "1 day", "next": "x"}, "x": {"type": "exit"}}}') AS live \gset
SELECT herald.set_automation_status(:live, 'live');
INSERT INTO herald.events (workspace_id, email, kind, occurred_at) VALUES
  ('sim', 'ann@example.com', 'visit', '2026-11-01T09:00:00Z'),
  ('sim', 'bob@example.com', 'visit', '2026-11-01T09:00:00Z'),
  ('sim', 'cat@example.com', 'visit', '2026-11-02T09:00:00Z');
DELETE FROM herald.enrollments WHERE workspace_id = 'sim'   -- cat: as if never enrolled
   AND contact_id = (SELECT id FROM herald.contacts WHERE workspace_id = 'sim' AND email = 'cat@example.com');
SELECT c.email, e.status FROM herald.enrollments e JOIN herald.contacts c ON c.id = e.contact_id
 WHERE e.workspace_id = 'sim' ORDER BY 1;

-- the recorded period: 2026-11-01 .. 2026-11-08 (events kept as drafts see them: nothing enrols into drafts)
INSERT INTO herald.events (workspace_id, email, kind, payload, occurred_at) VALUES
  ('sim', 'ann@example.com', 'signup', '{}', '2026-11-01T10:00:00Z'),
  ('sim', 'ann@example.com', 'signup', '{}', '2026-11-01T12:00:00Z'),             -- once: skipped
  ('sim', 'bob@example.com', 'signup', '{}', '2026-11-02T10:00:00Z'),
  ('sim', 'eve@example.com', 'signup', '{}', '2026-11-02T11:00:00Z'),
  ('sim', 'dan@example.com', 'signup', '{"src": "spam"}', '2026-11-03T10:00:00Z'), -- filtered out
  ('sim', 'cat@example.com', 'signup', '{}', '2026-11-06T20:00:00Z'),             -- its delay ends after the period
  ('sim', 'bob@example.com', 'cart', '{"total": 40}', '2026-11-03T10:00:00Z'),
  ('sim', 'bob@example.com', 'paid', '{"amount": 40}', '2026-11-03T15:00:00Z'),   -- wakes bob's wait
  ('sim', 'cat@example.com', 'cart', '{"total": 15}', '2026-11-04T10:00:00Z'),    -- times out, then approval
  ('sim', 'ann@example.com', 'cart', '{"total": 99}', '2026-11-07T12:00:00Z'),    -- still waiting at the end
  ('sim', 'ann@example.com', 'signup', '{}', '2026-10-20T10:00:00Z'),             -- before the period
  ('sim', 'eve@example.com', 'signup', '{}', '2026-11-09T10:00:00Z');             -- after it

CREATE TEMP VIEW written AS
SELECT (SELECT count(*) FROM herald.enrollments WHERE workspace_id = 'sim') AS enrollments,
       (SELECT count(*) FROM herald.outbox WHERE workspace_id = 'sim') AS outbox,
       (SELECT count(*) FROM herald.events WHERE workspace_id = 'sim') AS events,
       (SELECT count(*) FROM herald.step_log WHERE workspace_id = 'sim') AS step_log,
       (SELECT count(*) FROM herald.contacts WHERE workspace_id = 'sim') AS contacts,
       (SELECT md5(string_agg(c::text, ',' ORDER BY c.id)) FROM herald.contacts c WHERE c.workspace_id = 'sim') AS contacts_md5;
CREATE TEMP TABLE before AS SELECT * FROM written;

-- welcome: email -> 2-day delay -> branch on plan: pro -> CRM webhook -> branch on its reply; else a split
\set welcome '{"name": "welcome", "trigger": {"event": "signup", "filter": {"field": "event.src", "op": "ne", "value": "spam"}}, "start": "hello", "nodes": {"hello": {"type": "email", "template": "welcome", "next": "wait"}, "wait": {"type": "delay", "duration": "2 days", "next": "plan"}, "plan": {"type": "branch", "paths": [{"when": {"field": "contact.plan", "op": "eq", "value": "pro"}, "next": "crm"}], "default": "ab"}, "crm": {"type": "webhook", "url": "https://crm.example/hook", "next": "score", "on_error": "done"}, "score": {"type": "branch", "paths": [{"when": {"field": "context.crm.score", "op": "gte", "value": 50}, "next": "vip"}], "default": "done"}, "vip": {"type": "email", "template": "vip", "next": "done"}, "ab": {"type": "split", "variants": [{"weight": 50, "next": "a"}, {"weight": 50, "next": "b"}]}, "a": {"type": "email", "template": "tip-a", "next": "done"}, "b": {"type": "email", "template": "tip-b", "next": "done"}, "done": {"type": "exit"}}}'
CREATE TEMP TABLE runs (name text, r jsonb);
INSERT INTO runs SELECT 'welcome', herald.simulate_automation('sim', :'welcome'::jsonb, '2026-11-01T00:00:00Z'::timestamptz,
  '{"until": "2026-11-08T00:00:00Z", "replies": {"crm": {"status": "ok", "body": {"score": 87}}}}');
SELECT r -> 'events' AS events, r -> 'enrollments' AS enrollments, r -> 'waiting' AS waiting
  FROM runs WHERE name = 'welcome';
-- per node: passes, arms, the webhook answered by options (its reply read by the next branch), queued per day
SELECT n.key AS node, n.value - 'type' AS counts
  FROM runs, jsonb_each(r -> 'nodes') n WHERE name = 'welcome' ORDER BY n.key;
SELECT r ->> 'since' AS since, r ->> 'until' AS until, r ->> 'histogram' AS histogram, r -> 'exact_split' AS exact_split,
       r -> 'automation' AS automation, r ->> 'workspace' AS workspace
  FROM runs WHERE name = 'welcome';
-- the webhook failing instead: on_error; hourly histogram
SELECT r #> '{nodes,crm,outcomes}' AS crm, r #> '{nodes,score,entered}' AS score, r #> '{nodes,hello,queued_at}' AS hello_per_hour
  FROM (SELECT herald.simulate_automation('sim', :'welcome'::jsonb, '2026-11-01T00:00:00Z'::timestamptz,
          '{"until": "2026-11-08T00:00:00Z", "histogram": "hour", "replies": {"crm": {"status": "error"}}}') AS r) x;
-- re-entry after_exit: ann's second signup comes while she is in the journey, skipped too; always: entered
SELECT x.reentry, x.r -> 'enrollments' ->> 'entered' AS entered, x.r -> 'enrollments' ->> 'skipped_reentry' AS skipped
  FROM (SELECT m AS reentry, herald.simulate_automation('sim', jsonb_set(:'welcome'::jsonb, '{reentry}', to_jsonb(m)),
                 '2026-11-01T00:00:00Z'::timestamptz, '{"until": "2026-11-08T00:00:00Z"}') AS r
          FROM unnest(ARRAY['once', 'after_exit', 'always']) m) x;

-- carts: wait for payment (1 day), thanks on payment; on timeout an approval (no timeout) decides
\set carts '{"name": "carts", "trigger": {"event": "cart"}, "reentry": "always", "start": "pay", "nodes": {"pay": {"type": "wait_event", "event": "paid", "filter": {"field": "event.amount", "op": "gt", "value": 0}, "timeout": "1 day", "next": "thanks", "timeout_next": "ask"}, "thanks": {"type": "email", "template": "thanks", "next": "done"}, "ask": {"type": "approval", "approved": "nudge", "rejected": "done"}, "nudge": {"type": "email", "template": "nudge", "next": "done"}, "done": {"type": "exit"}}}'
INSERT INTO runs SELECT 'carts', herald.simulate_automation('sim', :'carts'::jsonb, '2026-11-01T00:00:00Z'::timestamptz,
  '{"until": "2026-11-08T00:00:00Z"}');
SELECT r -> 'enrollments' AS enrollments, r -> 'waiting' AS waiting FROM runs WHERE name = 'carts';
SELECT n.key AS node, n.value - 'type' AS counts
  FROM runs, jsonb_each(r -> 'nodes') n WHERE name = 'carts' ORDER BY n.key;
-- approvals answered by options
SELECT a.answer, x.r #> '{nodes,ask,outcomes}' AS ask, x.r #> '{nodes,nudge,queued}' AS nudged, x.r -> 'waiting' AS waiting
  FROM unnest(ARRAY['approve', 'reject', 'wait']) a(answer)
 CROSS JOIN LATERAL (SELECT herald.simulate_automation('sim', :'carts'::jsonb, '2026-11-01T00:00:00Z'::timestamptz,
          jsonb_build_object('until', '2026-11-08T00:00:00Z', 'approvals', jsonb_build_object('ask', a.answer))) AS r) x;

-- the id form: the stored automation's newest definition and workspace
SELECT herald.create_automation('sim', :'welcome') AS draft \gset
SELECT (r - 'automation') = (SELECT w.r - 'automation' FROM runs w WHERE w.name = 'welcome') AS same_as_definition_form,
       r -> 'automation' = to_jsonb(:draft) AS names_automation
  FROM (SELECT herald.simulate_automation(:draft, '2026-11-01T00:00:00Z'::timestamptz,
          '{"until": "2026-11-08T00:00:00Z", "replies": {"crm": {"status": "ok", "body": {"score": 87}}}}') AS r) x;
-- include_enrolled: ann and bob are in "visits" already (once: skipped); without it everyone enters
SELECT o.opts, x.r -> 'enrollments' ->> 'entered' AS entered, x.r -> 'enrollments' ->> 'skipped_reentry' AS skipped,
       x.r #> '{nodes,d,sample}' AS sample
  FROM unnest(ARRAY['{}', '{"include_enrolled": true}']::jsonb[]) o(opts)
 CROSS JOIN LATERAL (SELECT herald.simulate_automation(:live, '2026-11-01T00:00:00Z'::timestamptz, o.opts) AS r) x;

-- refusals
\set VERBOSITY default
SELECT herald.simulate_automation('sim', '{"name": "bad", "trigger": {"event": "signup"}, "start": "nope",
  "nodes": {"x": {"type": "email"}}}'::jsonb, '2026-11-01T00:00:00Z'::timestamptz);
SELECT herald.simulate_automation('sim', '{"name": "manual", "start": "x", "nodes": {"x": {"type": "exit"}}}'::jsonb,
  '2026-11-01T00:00:00Z'::timestamptz);
\set VERBOSITY terse
SELECT herald.simulate_automation('sim', :'welcome'::jsonb, NULL::timestamptz);
SELECT herald.simulate_automation(:draft, NULL);
SELECT herald.simulate_automation(123456789, '2026-11-01T00:00:00Z');
SELECT herald.simulate_automation('nowhere', :'welcome'::jsonb, '2026-11-01T00:00:00Z'::timestamptz);
SELECT herald.simulate_automation(:draft, '2026-11-05T00:00:00Z', '{"until": "2026-11-01T00:00:00Z"}');
CREATE FUNCTION pg_temp.refusal(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE q;
  RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
  RETURN regexp_replace(SQLERRM, '\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ', '<time>', 'g');
END $$;
SELECT pg_temp.refusal(format('SELECT herald.simulate_automation(%s, now() + interval ''1 day'')', :draft)) AS since_in_future;
SELECT pg_temp.refusal(format('SELECT herald.simulate_automation(%s, now() - interval ''1 day'', %L)', :draft,
  jsonb_build_object('until', to_char(now() + interval '1 day', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')))) AS until_in_future;
SELECT herald.simulate_automation(:draft, '2026-11-01T00:00:00Z', '[]');
SELECT herald.simulate_automation(:draft, '2026-11-01T00:00:00Z', '{"speed": "fast"}');
SELECT herald.simulate_automation(:draft, '2026-11-01T00:00:00Z', '{"until": "last week"}');
SELECT herald.simulate_automation(:draft, '2026-11-01T00:00:00Z', '{"histogram": "week"}');
SELECT herald.simulate_automation(:draft, '2026-11-01T00:00:00Z', '{"include_enrolled": "yes"}');
SELECT herald.simulate_automation(:draft, '2026-11-01T00:00:00Z', '{"replies": {"nope": {"status": "ok"}}}');
SELECT herald.simulate_automation(:draft, '2026-11-01T00:00:00Z', '{"replies": {"plan": {"status": "ok"}}}');
SELECT herald.simulate_automation(:draft, '2026-11-01T00:00:00Z', '{"replies": {"crm": {"status": "maybe"}}}');
SELECT herald.simulate_automation(:draft, '2026-11-01T00:00:00Z', '{"replies": {"crm": {"code": 200}}}');
SELECT herald.simulate_automation(:draft, '2026-11-01T00:00:00Z', '{"replies": ["crm"]}');
SELECT herald.simulate_automation(:draft, '2026-11-01T00:00:00Z', '{"approvals": {"hello": "approve"}}');
SELECT herald.simulate_automation('sim', :'carts'::jsonb, '2026-11-01T00:00:00Z'::timestamptz, '{"approvals": {"ask": "yes"}}');
SELECT herald.simulate_automation('sim', :'carts'::jsonb, '2026-11-01T00:00:00Z'::timestamptz, '{"include_enrolled": true}');
\set VERBOSITY default

-- nothing was written, nothing was sent
SELECT (SELECT row(b.*) FROM before b) = (SELECT row(w.*) FROM written w) AS nothing_written,
       enrollments, outbox, events, step_log, contacts FROM written;

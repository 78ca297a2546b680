-- Automations: create_automation validation (errors name the JSON path), set_automation_status transitions.
\set SHOW_CONTEXT never
-- ids start at this file's own base, so expected output does not depend on the other files
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 10000', t);
  END LOOP;
END $$;
SELECT herald.create_workspace('a1');

SELECT herald.create_automation('a1', '{
  "name": "Welcome series",
  "trigger": { "event": "contact.created",
               "filter": { "all": [ { "field": "event.source", "op": "eq", "value": "signup" } ] } },
  "reentry": "once",
  "start": "welcome",
  "nodes": {
    "welcome": { "type": "email", "template": "welcome", "provider": "default", "next": "wait" },
    "wait":    { "type": "delay", "duration": "2 days", "next": "check" },
    "check":   { "type": "branch",
                 "paths": [ { "when": { "field": "contact.plan", "op": "eq", "value": "pro" }, "next": "crm" } ],
                 "default": "nudge" },
    "crm":     { "type": "webhook", "url": "https://crm.example/hooks/pro", "method": "POST",
                 "timeout_ms": 5000, "next": "done" },
    "nudge":   { "type": "split", "variants": [ { "weight": 50, "next": "a" }, { "weight": 50, "next": "b" } ] },
    "a":       { "type": "email", "template": "nudge-a", "next": "done" },
    "b":       { "type": "email", "template": "nudge-b", "next": "done" },
    "done":    { "type": "exit" }
  }
}') AS welcome \gset
SELECT name, status, trigger_event, trigger_filter, reentry, start_node FROM herald.automations WHERE id = :welcome;

-- every fault is named by its JSON path; nothing is stored
SELECT count(*) AS automations_before FROM herald.automations;
SELECT herald.create_automation('a1', '{"name": "x", "start": "a", "nodes": {"a": {"type": "teleport"}}}');
SELECT herald.create_automation('a1', '{"name": "x", "start": "a", "nodes": {"a": {"type": "email", "next": "b"}, "b": {"type": "exit"}}}');
SELECT herald.create_automation('a1', '{"name": "x", "start": "a", "nodes": {"a": {"type": "email", "template": "t", "next": "nowhere"}}}');
SELECT herald.create_automation('a1', '{"name": "x", "start": "a", "nodes": {"a": {"type": "exit"}, "orphan": {"type": "exit"}}}');
SELECT herald.create_automation('a1', '{"name": "x", "start": "a", "nodes": {
    "a": {"type": "email", "template": "t", "next": "b"},
    "b": {"type": "branch", "paths": [{"when": {"field": "contact.x", "op": "eq", "value": 1}, "next": "a"}], "default": "c"},
    "c": {"type": "exit"}}}');
SELECT herald.create_automation('a1', '{"name": "x", "start": "a", "nodes": {
    "a": {"type": "email", "template": "t", "next": "w"},
    "w": {"type": "delay", "duration": "1 day", "next": "a"}}}') IS NOT NULL AS a_cycle_with_a_delay_is_fine;
SELECT herald.create_automation('a1', '{"name": "x", "trigger": {"event": "e", "filter": {"field": "contact.plan", "op": "like", "value": "p%"}}, "start": "a", "nodes": {"a": {"type": "exit"}}}');
SELECT herald.create_automation('a1', '{"name": "x", "trigger": {"event": "e", "filter": {"field": "plan", "op": "eq", "value": "p"}}, "start": "a", "nodes": {"a": {"type": "exit"}}}');
SELECT herald.create_automation('a1', '{"name": "x", "start": "a", "nodes": {"a": {"type": "delay", "duration": 5, "next": "b"}, "b": {"type": "exit"}}}');
SELECT herald.create_automation('a1', '{"name": "x", "start": "a", "nodes": {"a": {"type": "split", "variants": [{"weight": "half", "next": "b"}, {"weight": 1, "next": "b"}]}, "b": {"type": "exit"}}}');
SELECT herald.create_automation('a1', '{"name": "x", "start": "a", "nodes": {"a": {"type": "webhook", "url": "ftp://x", "next": "b"}, "b": {"type": "exit"}}}');
SELECT herald.create_automation('a1', '{"name": "x", "reentry": "sometimes", "start": "a", "nodes": {"a": {"type": "exit"}}}');
SELECT herald.create_automation('a1', '{"start": "a", "nodes": {}}');
SELECT herald.create_automation('a1', '[]');
SELECT herald.create_automation('a1', NULL);
SELECT herald.create_automation('nope', '{"name": "x", "start": "a", "nodes": {"a": {"type": "exit"}}}');
SELECT count(*) AS automations_after FROM herald.automations;

-- life cycle: an automation goes live only when the templates and providers it sends with exist
SELECT herald.set_automation_status(:welcome, 'paused');
SELECT herald.set_automation_status(:welcome, 'live');
SELECT herald.upsert_template('a1', 'welcome', 'Hi', '<p>Hi</p>'), herald.upsert_template('a1', 'nudge-a', 'A', '<p>A</p>');
SELECT herald.set_automation_status(:welcome, 'live');
SELECT herald.upsert_template('a1', 'nudge-b', 'B', '<p>B</p>');
SELECT herald.set_automation_status(:welcome, 'live');
SELECT herald.set_automation_status(:welcome, 'live');     -- idempotent
SELECT status FROM herald.automations WHERE id = :welcome;
SELECT herald.set_automation_status(:welcome, 'paused');
SELECT herald.set_automation_status(:welcome, 'draft');
SELECT herald.set_automation_status(:welcome, 'deleted');
SELECT herald.set_automation_status(:welcome, NULL);
SELECT herald.set_automation_status(-1, 'live');
SELECT status FROM herald.automations WHERE id = :welcome;

SELECT herald.create_automation('a1', '{"name": "p", "start": "m", "nodes": {"m": {"type": "email", "template": "welcome", "provider": "ses"}}}') AS via_ses \gset
SELECT herald.set_automation_status(:via_ses, 'live');
SELECT herald.upsert_provider('a1', 'ses', 'smtp', '{"rate_per_second": 14}');
SELECT herald.set_automation_status(:via_ses, 'live');

-- archiving ends what is in progress and is final
SELECT herald.create_automation('a1', '{"name": "manual", "start": "w", "nodes": {"w": {"type": "delay", "duration": "1 day", "next": "x"}, "x": {"type": "exit"}}}') AS manual \gset
SELECT herald.set_automation_status(:manual, 'live');
SELECT herald.upsert_contact('a1', 'z@example.com') AS z \gset
SELECT * FROM herald.enroll(:manual, ARRAY[:z]::bigint[]);
SELECT herald.set_automation_status(:manual, 'archived');
SELECT status, exit_reason, ended_at IS NOT NULL AS ended FROM herald.enrollments WHERE automation_id = :manual;
SELECT herald.set_automation_status(:manual, 'live');
SELECT name, status, active, exited FROM herald.automation_overview WHERE workspace_id = 'a1' ORDER BY automation_id;

-- The step engine: tick() through every node type, the outbox hand-off, complete() waking enrollments,
-- wait_event, approval, decide (with its reply cache), update_contact, stats and the step log.
\set SHOW_CONTEXT never
-- ids start at this file's own base, so expected output does not depend on the other files
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 40000', t);
  END LOOP;
END $$;
SELECT herald.create_workspace('t1');
SELECT herald.upsert_template('t1', 'welcome', 'Welcome', '<p>Hi</p>') AS v;
SELECT * FROM herald.upsert_contacts('t1', '[{"email": "pro@example.com", "attributes": {"plan": "pro"}},
                                             {"email": "free@example.com", "attributes": {"plan": "free"}}]');
CREATE TEMP VIEW journey AS
SELECT c.email, e.status, e.current_node, e.wait_kind, e.next_run_at = 'infinity' AS parked, e.exit_reason
  FROM herald.enrollments e JOIN herald.contacts c ON c.id = e.contact_id
 WHERE e.workspace_id = 't1' ORDER BY e.automation_id, c.email;
-- complete every leased/pending job of t1 with the given result
CREATE FUNCTION pg_temp.finish_all(result jsonb) RETURNS int LANGUAGE sql AS
$$ SELECT herald.complete(coalesce(jsonb_agg(result || jsonb_build_object('id', j.id)), '[]'))
     FROM herald.claim('test', 1000) j WHERE j.workspace = 't1' $$;

SELECT herald.create_automation('t1', '{
  "name": "journey", "start": "welcome",
  "nodes": {
    "welcome": {"type": "email", "template": "welcome", "next": "pause"},
    "pause":   {"type": "delay", "duration": "0 seconds", "next": "check"},
    "check":   {"type": "branch", "paths": [{"when": {"field": "contact.plan", "op": "eq", "value": "pro"}, "next": "tag"}], "default": "ab"},
    "tag":     {"type": "update_contact", "set": {"stage": "vip"}, "add_tags": ["vip"], "add_lists": ["vips"], "next": "crm"},
    "crm":     {"type": "webhook", "url": "https://crm.example/hook", "body": {"email": "{{ contact.email }}"}, "next": "score", "on_error": "sorry"},
    "score":   {"type": "branch", "paths": [{"when": {"field": "context.crm.score", "op": "gte", "value": 50}, "next": "won"}], "default": "done"},
    "won":     {"type": "goal", "next": "done"},
    "ab":      {"type": "split", "variants": [{"weight": 1, "next": "done"}, {"weight": 1, "next": "done2"}]},
    "sorry":   {"type": "exit"},
    "done":    {"type": "exit"},
    "done2":   {"type": "exit"}
  }}') AS journey \gset
SELECT herald.set_automation_status(:journey, 'live');
SELECT * FROM herald.enroll(:journey, (SELECT array_agg(id) FROM herald.contacts WHERE workspace_id = 't1'));

-- (enrollments of earlier test files that are due now are ticked away first)
SELECT herald.tick() >= 0 AS drained;
-- tick 1: both queue the welcome email and park; a second tick has nothing to do
SELECT herald.tick() AS steps;
SELECT * FROM journey;
SELECT kind, node, on_success, dedupe_key LIKE 'a%:e%:welcome:1' AS keyed FROM herald.outbox WHERE workspace_id = 't1' ORDER BY id;
SELECT herald.tick() AS nothing_due;
-- a job for the same step is never queued twice (the dedupe key): replaying the parked state changes nothing
UPDATE herald.enrollments SET status = 'active', next_run_at = now(), visit = 0, wait_kind = NULL WHERE workspace_id = 't1';
SELECT herald.tick() AS replayed;
SELECT count(*) AS welcome_jobs FROM herald.outbox WHERE workspace_id = 't1';

-- the sidecar sends: complete wakes them; tick 2 runs delay 0 → branch → (pro) update_contact → webhook, (free) split → exit
SELECT pg_temp.finish_all('{"ok": true, "message_id": "<m@herald>"}') AS sent;
SELECT * FROM journey;
SELECT herald.tick() AS steps;
SELECT * FROM journey;
SELECT email, attributes, tags FROM herald.contacts WHERE email = 'pro@example.com' AND workspace_id = 't1';
SELECT list, status FROM herald.list_members WHERE workspace_id = 't1';
SELECT kind, payload FROM herald.events WHERE workspace_id = 't1' AND kind LIKE 'list.%';
SELECT kind, node, payload ->> 'url' AS url, payload -> 'body' AS body, rate_keys FROM herald.outbox WHERE workspace_id = 't1' AND kind = 'webhook';

-- the webhook answers {"score": 80}: stored under context.crm, the branch reads it, goal, exit
SELECT pg_temp.finish_all('{"ok": true, "response": {"score": 80}}') AS called;
SELECT herald.tick() AS steps;
SELECT * FROM journey;
SELECT e.context FROM herald.enrollments e JOIN herald.contacts c ON c.id = e.contact_id WHERE c.email = 'pro@example.com' AND e.workspace_id = 't1';
SELECT l.node, l.visit, l.action FROM herald.step_history l
  JOIN herald.enrollments e ON e.workspace_id = l.workspace_id AND e.id = l.enrollment_id
  JOIN herald.contacts c ON c.id = e.contact_id
 WHERE c.email = 'pro@example.com' AND e.automation_id = :journey ORDER BY l.log_id, l.seq;

-- stats: exact before and after flush
SELECT * FROM herald.automation_stats(:journey);
SELECT herald.flush_stats() > 0 AS flushed;
SELECT count(*) AS deltas_left FROM herald.stats_delta WHERE automation_id = :journey;
SELECT * FROM herald.automation_stats(:journey);
SELECT count(*) AS days FROM herald.automation_stats_daily(:journey) WHERE day = current_date;

-- re-entry once; a permanent webhook failure takes on_error
SELECT herald.enroll(:journey, ARRAY[(SELECT id FROM herald.contacts WHERE email = 'pro@example.com' AND workspace_id = 't1')]) AS once_only;
SELECT herald.upsert_contact('t1', 'vip2@example.com', '{"plan": "pro"}') AS vip2 \gset
SELECT (herald.enroll(:journey, ARRAY[:vip2]::bigint[])).enrolled;
SELECT herald.tick() AS steps, pg_temp.finish_all('{"ok": true}') AS sent, herald.tick() AS steps_after;
SELECT pg_temp.finish_all('{"ok": false, "retryable": false, "error": "400 bad request"}') AS webhook_failed;
SELECT herald.tick() AS steps;
SELECT * FROM journey WHERE email = 'vip2@example.com';
SELECT node, metric, value FROM herald.automation_stats(:journey) WHERE node IN ('crm', 'sorry') ORDER BY 1, 2;

-- wait_event, approval, decide
SELECT herald.create_automation('t1', '{
  "name": "flow", "reentry": "always", "start": "w",
  "nodes": {
    "w":   {"type": "wait_event", "event": "purchase", "filter": {"field": "event.amount", "op": "gte", "value": 10},
            "timeout": "1 hour", "next": "ok", "timeout_next": "late"},
    "ok":  {"type": "approval", "approved": "ask", "rejected": "no"},
    "ask": {"type": "decide", "url": "https://brain.example/decide", "field": "answer", "paths": {"a": "ea", "b": "eb"}, "default": "eb", "cache_ttl": "1 hour"},
    "ea":  {"type": "exit"}, "eb": {"type": "exit"}, "no": {"type": "exit"}, "late": {"type": "exit"}
  }}') AS flow \gset
SELECT herald.set_automation_status(:flow, 'live');
SELECT * FROM herald.enroll(:flow, (SELECT array_agg(id) FROM herald.contacts WHERE workspace_id = 't1'));
SELECT herald.tick() >= 2 AS ticked;
SELECT email, status, current_node, wait_kind FROM journey WHERE current_node = 'w';
-- a purchase too small does not match the filter; a big one wakes only that contact
SELECT herald.track('t1', 'pro@example.com', 'purchase', '{"amount": 5}') > 0 AS small;
SELECT herald.track('t1', 'pro@example.com', 'purchase', '{"amount": 25}') > 0 AS big;
SELECT email, status, current_node FROM journey WHERE current_node IN ('w', 'ok');
SELECT herald.tick() AS steps;
SELECT enrollment_id > 0 AS listed, automation, node, email, times_out_at IS NULL AS no_timeout FROM herald.pending_approvals WHERE workspace_id = 't1';
SELECT herald.decide_approval(enrollment_id, true, 'boss@example.com') FROM herald.pending_approvals WHERE workspace_id = 't1';
SELECT herald.decide_approval(id, true, 'boss') FROM herald.enrollments WHERE workspace_id = 't1' AND current_node = 'w';
SELECT herald.decide_approval(id, NULL, 'boss') FROM herald.enrollments WHERE workspace_id = 't1' AND current_node = 'w';
SELECT herald.decide_approval(id, true, ' ') FROM herald.enrollments WHERE workspace_id = 't1' AND current_node = 'w';
SELECT herald.decide_approval(-1, true, 'boss');
SELECT decided_by, approved FROM herald.enrollments WHERE workspace_id = 't1' AND decided_by IS NOT NULL;
SELECT herald.tick() AS steps;
SELECT kind, dedupe_key LIKE 'decide:%' AS shared_key, payload ->> 'field' AS field FROM herald.outbox WHERE workspace_id = 't1' AND kind = 'decide';
-- the free contact times out of its wait
UPDATE herald.enrollments SET next_run_at = now() - interval '1 second' WHERE workspace_id = 't1' AND current_node = 'w';
SELECT herald.tick() AS steps;
SELECT email, status, current_node, exit_reason FROM journey WHERE current_node IN ('late', 'ask');
-- the decision comes back {"answer": "a"}: cached; a later identical question is answered from the cache
SELECT pg_temp.finish_all('{"ok": true, "response": {"answer": "a"}}') AS decided;
SELECT herald.tick() AS steps;
SELECT email, status, current_node FROM journey WHERE current_node IN ('ea', 'eb');
SELECT reply, expires_at > now() + interval '50 minutes' AS cached_for_an_hour FROM herald.decide_cache WHERE workspace_id = 't1';
SELECT * FROM herald.enroll(:flow, ARRAY[(SELECT id FROM herald.contacts WHERE email = 'free@example.com' AND workspace_id = 't1')]);
-- (skip its wait and approval: put it right before the same question)
UPDATE herald.enrollments SET current_node = 'ask', next_run_at = now()
 WHERE workspace_id = 't1' AND automation_id = :flow AND status = 'active';
SELECT herald.tick() AS steps;
SELECT count(*) AS decide_jobs_still FROM herald.outbox WHERE workspace_id = 't1' AND kind = 'decide';
SELECT e.status, e.current_node, e.context FROM herald.enrollments e JOIN herald.contacts c ON c.id = e.contact_id
 WHERE c.email = 'free@example.com' AND e.automation_id = :flow AND e.status = 'active';
SELECT herald.tick() AS steps;
SELECT email, status, current_node FROM journey WHERE current_node = 'ea';

-- paused automations are not ticked; tick's argument is checked
SELECT herald.create_automation('t1', '{"name": "slow", "start": "d", "nodes": {"d": {"type": "delay", "duration": "0 seconds", "next": "x"}, "x": {"type": "exit"}}}') AS slow \gset
SELECT herald.set_automation_status(:slow, 'live');
SELECT (herald.enroll(:slow, ARRAY[(SELECT id FROM herald.contacts WHERE email = 'pro@example.com' AND workspace_id = 't1')])).enrolled;
SELECT herald.set_automation_status(:slow, 'paused');
SELECT herald.tick() AS paused_steps;
SELECT herald.set_automation_status(:slow, 'live');
SELECT herald.tick() AS resumed_steps;
SELECT herald.tick(0);

-- exiting an enrollment (or archiving its automation) cancels the jobs no sidecar has taken yet
SELECT herald.create_automation('t1', '{"name": "mail", "start": "m", "nodes": {"m": {"type": "email", "template": "welcome"}}}') AS mail \gset
SELECT herald.set_automation_status(:mail, 'live');
SELECT (herald.enroll(:mail, (SELECT array_agg(id) FROM herald.contacts WHERE workspace_id = 't1'))).enrolled;
SELECT herald.tick() AS steps;
SELECT herald.exit_enrollment(e.id, 'asked to stop') FROM herald.enrollments e JOIN herald.contacts c ON c.id = e.contact_id
 WHERE e.automation_id = :mail AND c.email = 'pro@example.com';
SELECT c.email, o.status, o.last_error FROM herald.outbox o JOIN herald.contacts c ON c.id = o.contact_id
 WHERE o.automation_id = :mail ORDER BY c.email;
SELECT herald.set_automation_status(:mail, 'archived');
SELECT c.email, o.status, o.last_error FROM herald.outbox o JOIN herald.contacts c ON c.id = o.contact_id
 WHERE o.automation_id = :mail ORDER BY c.email;
SELECT count(*) AS nothing_to_claim FROM herald.claim('w', 100) j WHERE (j.payload ->> 'automation_id')::bigint = :mail;

-- the indexes into which every enrollment update of tick's inserts a second entry with the same key keep
-- half of each page free (sql/schema.sql: the update is not HOT; full pages were split by every batch)
SELECT c.relname, c.reloptions FROM pg_class c
 WHERE c.relnamespace = 'herald'::regnamespace AND c.relkind = 'i' AND c.relname LIKE 'enrollments%'
 ORDER BY c.relname;

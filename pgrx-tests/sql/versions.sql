-- Versions of an automation (update_automation, preview_automation_update, automation_history,
-- automation_version_stats): pinned enrollments run on their version, migrate moves them (keeping
-- their waits), every refusal; then preview_broadcast.
\set SHOW_CONTEXT never
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox', 'broadcasts'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 3000000', t);
  END LOOP;
END $$;
SELECT herald.create_workspace('ver');
SELECT herald.upsert_template('ver', 'welcome', 'Welcome', '<p>Hi</p>') AS t;
CREATE TEMP VIEW journey AS
SELECT c.email, e.status, coalesce((e.event ->> 'version')::int, 1) AS version, e.current_node, e.wait_kind,
       o.on_success AS job_next, e.exit_reason
  FROM herald.enrollments e JOIN herald.contacts c ON c.id = e.contact_id
  LEFT JOIN herald.outbox o ON o.workspace_id = e.workspace_id AND o.dedupe_key = e.wait_job AND o.broadcast_id IS NULL
 WHERE e.workspace_id = 'ver' ORDER BY c.email, e.id;
CREATE FUNCTION pg_temp.finish(who text) RETURNS int LANGUAGE sql AS
$$ SELECT herald.complete(coalesce(jsonb_agg(jsonb_build_object('id', j.id, 'ok', true)), '[]'))
     FROM herald.claim('test', 1000) j WHERE j.workspace = 'ver' AND j.payload ->> 'to' LIKE who || '@%' $$;
-- a job of someone else claimed above goes back to pending
CREATE FUNCTION pg_temp.unlease() RETURNS void LANGUAGE sql AS
$$ UPDATE herald.outbox SET status = 'pending', lease_until = NULL WHERE workspace_id = 'ver' AND status = 'leased' $$;

-- version 1: hello (email) -> wait (1 day) -> bye (email) -> done
SELECT herald.create_automation('ver', '{"name": "onboard", "trigger": {"event": "signup"}, "start": "hello",
  "nodes": {"hello": {"type": "email", "template": "welcome", "next": "wait"},
            "wait": {"type": "delay", "duration": "1 day", "next": "bye"},
            "bye": {"type": "email", "template": "welcome", "next": "done"},
            "done": {"type": "exit"}}}') AS a \gset
SELECT herald.set_automation_status(:a, 'live');
SELECT count(*) FROM (SELECT herald.track('ver', x || '@example.com', 'signup') FROM unnest(ARRAY['ann', 'bob', 'cid']) x) t;
SELECT herald.tick() IS NOT NULL AS ticked;
SELECT pg_temp.finish('ann'); SELECT pg_temp.unlease();
SELECT herald.tick() IS NOT NULL AS ticked;
SELECT * FROM journey;

-- version 2 without migrate: everyone stays pinned to version 1; the preview says so and changes nothing
\set v2 '{"name": "onboard 2", "trigger": {"event": "signup"}, "start": "hello", "nodes": {"hello": {"type": "email", "template": "welcome", "next": "wait2"}, "wait2": {"type": "delay", "duration": "0 seconds", "next": "thanks"}, "thanks": {"type": "email", "template": "welcome", "next": "done"}, "done": {"type": "exit"}}}'
SELECT jsonb_pretty(herald.preview_automation_update(:a, :'v2'));
SELECT count(*) AS versions FROM herald.automation_versions WHERE automation_id = :a;
SELECT herald.update_automation(:a, :'v2', '{"note": "shorter wait"}') - 'changes' - 'nodes' AS update_report;
SELECT version, current, name, created_by = session_user AS by_caller, note, changes, pinned, moved, exited
  FROM herald.automation_history WHERE automation_id = :a ORDER BY version;
SELECT name, start_node, definition -> 'nodes' ? 'wait2' AS newest FROM herald.automations WHERE id = :a;
-- a new enrollment starts on version 2 (the dispatcher); its job leads to version 2's next node
SELECT herald.track('ver', 'dan@example.com', 'signup') > 0 AS tracked;
SELECT herald.tick() IS NOT NULL AS ticked;
SELECT * FROM journey;
-- bob, pinned to version 1, goes on through version 1's delay (1 day); dan through version 2's (none)
SELECT pg_temp.finish('bob'); SELECT pg_temp.unlease();
SELECT pg_temp.finish('dan'); SELECT pg_temp.unlease();
SELECT herald.tick() IS NOT NULL AS ticked;
SELECT * FROM journey;

-- refusals
-- migrate given: every node holding contacts must be mapped (named, with counts)
SELECT herald.update_automation(:a, :'v2', '{"migrate": {}}');
-- a migrate target that the new version lacks, a source that is no node of any version
SELECT herald.update_automation(:a, :'v2', '{"migrate": {"hello": "nope", "zz": "hello", "bye": null, "thanks": "thanks"}}');
-- waiting contacts keep their wait: an email job cannot be waited for at a delay node
SELECT herald.update_automation(:a, :'v2', '{"migrate": {"hello": "wait2", "bye": "bye2", "thanks": "thanks"}}');
-- bad options, invalid definition
SELECT herald.update_automation(:a, :'v2', '{"migrate": {"hello": 3}}');
SELECT herald.update_automation(:a, :'v2', '{"moves": {}}');
SELECT herald.update_automation(:a, :'v2', '[]');
SELECT herald.update_automation(:a, '{"name": "broken", "start": "x", "nodes": {}}');
SELECT herald.update_automation(:a, '{"name": "t", "start": "x", "nodes": {"x": {"type": "email", "template": "nope"}}}');
SELECT herald.update_automation(-1, :'v2');
SELECT herald.preview_automation_update(-1, :'v2');
-- the preview lists the same faults without raising
SELECT jsonb_pretty(herald.preview_automation_update(:a, :'v2', '{"migrate": {"hello": "wait2"}}') -> 'errors');
SELECT count(*) AS versions FROM herald.automation_versions WHERE automation_id = :a;

-- version 3 with migrate: hello (versions 1 and 2) -> hello, thanks -> thanks, bye -> exit. The preview
-- and the update report the same numbers; waits are kept and jobs lead along the new version
\set v3 '{"name": "onboard 3", "trigger": {"event": "signup"}, "start": "hello", "nodes": {"hello": {"type": "email", "template": "welcome", "next": "thanks"}, "thanks": {"type": "email", "template": "welcome", "next": "done"}, "done": {"type": "exit"}}}'
SELECT herald.track('ver', 'eve@example.com', 'signup') > 0 AS tracked;   -- on version 2, not ticked yet
SELECT * FROM journey;
\set m3 '{"migrate": {"hello": "hello", "thanks": "thanks", "bye": null}, "note": "move everyone"}'
SELECT herald.preview_automation_update(:a, :'v3', :'m3') AS preview \gset
SELECT jsonb_pretty(:'preview');
SELECT herald.update_automation(:a, :'v3', :'m3') AS done \gset
SELECT (:'done'::jsonb - 'version') = (:'preview'::jsonb - 'errors') AS same_as_preview, (:'done'::jsonb) -> 'version' AS version;
SELECT * FROM journey;
SELECT o.status, o.last_error FROM herald.outbox o JOIN herald.contacts c ON c.id = o.contact_id
 WHERE o.workspace_id = 'ver' AND c.email = 'ann@example.com' ORDER BY o.id;
SELECT herald.tick() IS NOT NULL AS ticked;
SELECT pg_temp.finish('cid'); SELECT pg_temp.unlease();
SELECT herald.tick() IS NOT NULL AS ticked;
SELECT * FROM journey;
SELECT * FROM herald.automation_version_stats(:a);
SELECT node, metric, value FROM herald.automation_stats(:a) WHERE node IN ('', 'thanks') ORDER BY 1, 2;
SELECT version, current, name, note, changes, pinned, moved, exited FROM herald.automation_history WHERE automation_id = :a ORDER BY version;

-- an approval answered on the version the enrollment is pinned to; and one migrated keeps its wait
SELECT herald.create_automation('ver', '{"name": "ask", "trigger": {"event": "ask"}, "start": "ok",
  "nodes": {"ok": {"type": "approval", "approved": "yes", "rejected": "no"}, "yes": {"type": "exit"}, "no": {"type": "exit"}}}') AS b \gset
SELECT herald.set_automation_status(:b, 'live');
SELECT count(*) FROM (SELECT herald.track('ver', x || '@example.com', 'ask') FROM unnest(ARRAY['fay', 'gus']) x) t;
SELECT herald.tick() IS NOT NULL AS ticked;
\set b2 '{"name": "ask 2", "trigger": {"event": "ask"}, "start": "ok", "nodes": {"ok": {"type": "approval", "approved": "yes2", "rejected": "no"}, "yes2": {"type": "exit"}, "no": {"type": "exit"}}}'
SELECT herald.update_automation(:b, :'b2') ->> 'pinned' AS pinned;
SELECT herald.decide_approval(e.id, true, 'boss') FROM herald.enrollments e JOIN herald.contacts c ON c.id = e.contact_id
 WHERE e.automation_id = :b AND c.email = 'fay@example.com';
SELECT c.email, e.status, e.current_node FROM herald.enrollments e JOIN herald.contacts c ON c.id = e.contact_id
 WHERE e.automation_id = :b ORDER BY 1;   -- fay: version 1's approved path (yes), not version 2's (yes2)
SELECT herald.update_automation(:b, :'b2', '{"migrate": {"ok": "ok", "yes": "yes2"}}') ->> 'moved' AS moved;
SELECT herald.decide_approval(e.id, true, 'boss') FROM herald.enrollments e JOIN herald.contacts c ON c.id = e.contact_id
 WHERE e.automation_id = :b AND c.email = 'gus@example.com';
SELECT herald.tick() IS NOT NULL AS ticked;
SELECT c.email, e.status, coalesce((e.event ->> 'version')::int, 1) AS version, e.exit_reason
  FROM herald.enrollments e JOIN herald.contacts c ON c.id = e.contact_id WHERE e.automation_id = :b ORDER BY 1;

-- pausing and archiving apply to the whole automation; an archived one cannot change
SELECT herald.set_automation_status(:b, 'archived');
SELECT herald.update_automation(:b, :'b2');
SELECT herald.preview_automation_update(:b, :'b2') -> 'errors' AS errors;

-- preview_broadcast: the enqueue's audience (lists, segment, exclusions, suppressions), per variation
-- and A/B share, per local_time hour, a sample; nothing created
SELECT herald.create_workspace('verb');
SELECT herald.upsert_template('verb', 't', 'Hi', '<p>x</p>') AS t;
SELECT (herald.upsert_contacts('verb', jsonb_agg(jsonb_build_object('email', 'p' || i || '@example.com',
            'attributes', jsonb_build_object('plan', CASE WHEN i % 2 = 0 THEN 'pro' ELSE 'free' END),
            'timezone', CASE WHEN i % 4 = 0 THEN 'Europe/Paris' WHEN i % 4 = 1 THEN 'America/New_York' END)))).inserted
  FROM generate_series(1, 40) i;
SELECT herald.suppress('verb', 'p2@example.com', 'manual');
\set bdef '{"name": "promo", "audience": {"segment": {"field": "contact.plan", "op": "eq", "value": "pro"}, "exclude": {"field": "contact.email", "op": "eq", "value": "p4@example.com"}}, "variations": [{"key": "a", "template": "t", "weight": 1}, {"key": "b", "template": "t", "weight": 3}], "ab_test": {"test_percent": 50, "metric": "opens", "wait": "1 hour"}, "send_at": {"local_time": "09:00"}}'
SELECT p - 'send_hours' - 'sample' AS preview, jsonb_array_length(p -> 'sample') AS sampled, p -> 'sample' -> 0 AS first,
       (SELECT sum((h ->> 'recipients')::int) FROM jsonb_array_elements(p -> 'send_hours') h) AS in_hours,
       jsonb_array_length(p -> 'send_hours') AS hours
  FROM herald.preview_broadcast('verb', :'bdef') p;
SELECT count(*) AS broadcasts FROM herald.broadcasts WHERE workspace_id = 'verb';
SELECT herald.create_broadcast('verb', :'bdef') AS bc \gset
SELECT p ->> 'recipients' AS recipients, p -> 'ab_test' AS ab_test, p ->> 'exact_split' AS exact, p ->> 'status' AS status
  FROM herald.preview_broadcast(:bc) p;
-- what the enqueue then queues: the same audience, the same test share
SELECT herald.schedule_broadcast(:bc);
SELECT herald.advance_broadcasts(1000) >= 0 AS advanced;
SELECT variation, count(*) FROM herald.outbox WHERE broadcast_id = :bc GROUP BY 1 ORDER BY 1;
SELECT (herald.preview_broadcast(:bc) -> 'variations') AS variations;
-- no segment: everyone not suppressed; bad input
SELECT herald.preview_broadcast('verb', '{"name": "all", "template": "t", "audience": "all"}') - 'sample' AS everyone;
SELECT herald.preview_broadcast('verb', '{"name": "x"}');
SELECT herald.preview_broadcast('nope', '{"name": "all", "template": "t", "audience": "all"}');
SELECT herald.preview_broadcast(-1);

-- a contact pinned to version 1 and waiting on an event is woken onto version 1's next node, not the
-- newest version's
SELECT herald.create_workspace('verw');
SELECT herald.create_automation('verw', '{"name": "w1", "trigger": {"event": "go"}, "start": "wait",
  "nodes": {"wait": {"type": "wait_event", "event": "clicked", "timeout": "7 days", "next": "old", "timeout_next": "old"},
            "old": {"type": "delay", "duration": "1 day", "next": "done"}, "done": {"type": "exit"}}}') AS wa \gset
SELECT herald.set_automation_status(:wa, 'live');
SELECT herald.track('verw', 'pinned@example.com', 'go') > 0 AS tracked;
SELECT herald.tick() > 0 AS ticked;
SELECT herald.update_automation(:wa, '{"name": "w2", "trigger": {"event": "go"}, "start": "wait",
  "nodes": {"wait": {"type": "wait_event", "event": "clicked", "timeout": "7 days", "next": "new", "timeout_next": "new"},
            "new": {"type": "delay", "duration": "2 days", "next": "done"}, "done": {"type": "exit"}}}') ->> 'pinned' AS pinned;
SELECT herald.track('verw', 'pinned@example.com', 'clicked') > 0 AS clicked;
SELECT current_node, status, coalesce((event ->> 'version')::int, 1) AS version FROM herald.enrollments WHERE workspace_id = 'verw';

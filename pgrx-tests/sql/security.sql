-- Tenants are walled off. Every API function × every role × own/other workspace: allowed, or refused
-- with a clear error (a refused call changes nothing: each call below runs in a subtransaction that is
-- always rolled back, and the state is checked unchanged at the end). Then every table and view read
-- as a tenant shows no row of another workspace.
\set SHOW_CONTEXT never
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox', 'broadcasts'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 95000', t);
  END LOOP;
END $$;
-- roles are cluster-wide: made once, kept (other runs and databases may use them)
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hsec_app_a') THEN CREATE ROLE hsec_app_a NOLOGIN IN ROLE herald_app; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hsec_app_b') THEN CREATE ROLE hsec_app_b NOLOGIN IN ROLE herald_app; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hsec_worker') THEN CREATE ROLE hsec_worker NOLOGIN IN ROLE herald_worker; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hsec_admin') THEN CREATE ROLE hsec_admin NOLOGIN IN ROLE herald_admin; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hsec_nobody') THEN CREATE ROLE hsec_nobody NOLOGIN; END IF;
  -- a login role acting through SET ROLE, as a pooler does
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hsec_pool') THEN CREATE ROLE hsec_pool NOLOGIN IN ROLE hsec_app_a; END IF;
END $$;
-- nothing is granted to PUBLIC
SELECT p.oid::regprocedure AS executable_by_public
  FROM pg_proc p WHERE p.pronamespace = 'herald'::regnamespace AND has_function_privilege('public', p.oid, 'EXECUTE');

-- two workspaces with the same kinds of things; hsec_app_a acts for sa, hsec_app_b for sb
SELECT herald.create_workspace(w) FROM unnest(ARRAY['sa', 'sb']) w;
SELECT herald.grant_workspace('hsec_app_a', 'sa') AS granted, herald.grant_workspace('hsec_app_a', 'sa') AS again,
       herald.grant_workspace('hsec_app_b', 'sb') AS granted_b;
SELECT herald.grant_workspace('hsec_nobody', 'sa');   -- allowed, with a warning: not a herald_app member
SELECT herald.revoke_workspace('hsec_nobody', 'sa');
SELECT herald.grant_workspace('no_such_role', 'sa');
SELECT herald.upsert_template(w, 't', 'Hi', '<p>hi</p>'), herald.upsert_provider(w, 'default', 'file'),
       herald.upsert_contact(w, 'x@example.com', '{"plan": "pro"}'), herald.suppress(w, 's@example.com', 'manual')
  FROM unnest(ARRAY['sa', 'sb']) w;
SELECT herald.create_automation(w, '{"name": "ask", "trigger": {"event": "ask"}, "start": "ok",
  "nodes": {"ok": {"type": "approval", "approved": "x", "rejected": "x"}, "x": {"type": "exit"}}}')
  FROM unnest(ARRAY['sa', 'sb']) w;
SELECT herald.set_automation_status(id, 'live') FROM herald.automations WHERE workspace_id IN ('sa', 'sb');
SELECT herald.track(w, 'x@example.com', 'ask') FROM unnest(ARRAY['sa', 'sb']) w;
SELECT herald.tick() >= 2 AS ticked;
SELECT herald.create_broadcast(w, '{"name": "b", "template": "t", "audience": {"lists": ["none"]}}')
  FROM unnest(ARRAY['sa', 'sb']) w;
INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, status, payload)
SELECT w, 'webhook', 'dead-' || w, 'dead', '{}' FROM unnest(ARRAY['sa', 'sb']) w;
-- the results stream: each workspace's approval.requested (published by the tick), and a subscription
SELECT count(DISTINCT workspace_id) = 2 AS published FROM herald.results WHERE workspace_id IN ('sa', 'sb');
SELECT herald.subscribe_results(w, 'https://hooks.example/' || w, NULL) > 0 AS subscribed FROM unnest(ARRAY['sa', 'sb']) w;
-- a template and a list nothing uses, for archive/delete
SELECT herald.upsert_template(w, 'spare', 'Hi', '<p>x</p>'), herald.create_list(w, 'spare') FROM unnest(ARRAY['sa', 'sb']) w;
-- the ids of each workspace's things, for the calls below
CREATE TEMP TABLE ids AS
SELECT w.id AS ws,
       (SELECT a.id FROM herald.automations a WHERE a.workspace_id = w.id) AS automation,
       (SELECT e.id FROM herald.enrollments e WHERE e.workspace_id = w.id) AS enrollment,
       (SELECT c.id FROM herald.contacts c WHERE c.workspace_id = w.id AND c.email = 'x@example.com') AS contact,
       (SELECT b.id FROM herald.broadcasts b WHERE b.workspace_id = w.id) AS broadcast,
       (SELECT o.id FROM herald.outbox o WHERE o.workspace_id = w.id AND o.status = 'dead') AS dead_job,
       (SELECT s.id FROM herald.result_subscriptions s WHERE s.workspace_id = w.id) AS subscription
  FROM herald.workspaces w WHERE w.id IN ('sa', 'sb');
GRANT SELECT ON ids TO PUBLIC;
-- an API key of each workspace (its secret is random: kept out of the output)
CREATE TEMP TABLE api_secrets AS
SELECT w AS ws, k AS secret, split_part(k, '_', 2)::bigint AS id
  FROM unnest(ARRAY['sa', 'sb']) w, LATERAL herald.create_api_key(w, 'matrix') k;
GRANT SELECT ON api_secrets TO PUBLIC;
SELECT ws, status, wait_kind FROM herald.enrollments JOIN ids ON enrollment = id ORDER BY 1;

-- one call as one role, always rolled back: 'ok', or why it was refused
CREATE FUNCTION pg_temp.try_as(r name, q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        EXECUTE format('SET LOCAL ROLE %I', r);
        EXECUTE q;
        RAISE EXCEPTION 'rolled back';
    EXCEPTION WHEN OTHERS THEN
        RETURN CASE
            WHEN SQLERRM = 'rolled back' THEN 'ok'
            WHEN SQLERRM LIKE 'permission denied for %' THEN 'no grant'
            WHEN SQLERRM LIKE 'permission denied: role % may not act for %' THEN 'not its workspace'
            WHEN SQLERRM LIKE 'new row violates row-level security%' THEN 'row-level security'
            ELSE SQLSTATE || ' ' || SQLERRM END;
    END;
END $$;
-- {ws} {automation} {enrollment} {contact} {broadcast} {dead} {subscription} are replaced by the target workspace's
CREATE TEMP TABLE calls (n serial, fn text, q text);
INSERT INTO calls (fn, q) VALUES
  ('upsert_contact',        $q$SELECT herald.upsert_contact('{ws}', 'm@example.com', '{}')$q$),
  ('upsert_contacts',       $q$SELECT herald.upsert_contacts('{ws}', '[{"email": "m@example.com"}]')$q$),
  ('track',                 $q$SELECT herald.track('{ws}', 'x@example.com', 'ping')$q$),
  ('track_many',            $q$SELECT herald.track_many('{ws}', '[{"email": "x@example.com", "kind": "ping"}]')$q$),
  ('INSERT INTO events',    $q$INSERT INTO herald.events (workspace_id, email, kind) VALUES ('{ws}', 'x@example.com', 'ping')$q$),
  ('enroll',                $q$SELECT herald.enroll({automation}, ARRAY[{contact}]::bigint[])$q$),
  ('enroll_segment',        $q$SELECT herald.enroll_segment({automation}, '{"field": "contact.plan", "op": "eq", "value": "pro"}')$q$),
  ('exit_enrollment',       $q$SELECT herald.exit_enrollment({enrollment}, 'test')$q$),
  ('decide_approval',       $q$SELECT herald.decide_approval({enrollment}, true, 'tester')$q$),
  ('send',                  $q$SELECT herald.send('{ws}', 'x@example.com', 't')$q$),
  ('render_template',       $q$SELECT herald.render_template('{ws}', 't', 'x@example.com')$q$),
  ('send_test',             $q$SELECT herald.send_test('{ws}', 't', 'x@example.com')$q$),
  ('suppress',              $q$SELECT herald.suppress('{ws}', 'z@example.com', 'manual')$q$),
  ('unsuppress',            $q$SELECT herald.unsuppress('{ws}', 's@example.com')$q$),
  ('redrive',               $q$SELECT herald.redrive(ARRAY[{dead}]::bigint[])$q$),
  ('create_list',           $q$SELECT herald.create_list('{ws}', 'news')$q$),
  ('subscribe',             $q$SELECT herald.subscribe('{ws}', 'news', ARRAY['x@example.com'])$q$),
  ('unsubscribe',           $q$SELECT herald.unsubscribe('{ws}', 'news', ARRAY['x@example.com'])$q$),
  ('delete_contact',        $q$SELECT herald.delete_contact('{ws}', 'x@example.com')$q$),
  ('retry_failed',          $q$SELECT herald.retry_failed('{ws}', '{"error": "x"}')$q$),
  ('automation_stats',      $q$SELECT herald.automation_stats({automation})$q$),
  ('automation_stats_daily',$q$SELECT herald.automation_stats_daily({automation})$q$),
  ('automation_version_stats', $q$SELECT herald.automation_version_stats({automation})$q$),
  ('broadcast_stats',       $q$SELECT herald.broadcast_stats({broadcast})$q$),
  ('preview_broadcast(ws, definition)', $q$SELECT herald.preview_broadcast('{ws}', '{"name": "n", "template": "t", "audience": "all"}')$q$),
  ('preview_broadcast(id)', $q$SELECT herald.preview_broadcast({broadcast})$q$),
  ('simulate_automation(ws, definition)', $q$SELECT herald.simulate_automation('{ws}', '{"name": "n", "trigger": {"event": "ping"}, "start": "x", "nodes": {"x": {"type": "exit"}}}'::jsonb, now() - interval '1 day')$q$),
  ('simulate_automation(id)', $q$SELECT herald.simulate_automation({automation}, now() - interval '1 day')$q$),
  ('read_results',          $q$SELECT herald.read_results('{ws}', 0)$q$),
  ('newest_result',         $q$SELECT herald.newest_result('{ws}')$q$),
  ('subscribe_results',     $q$SELECT herald.subscribe_results('{ws}', 'https://hooks.example/x', ARRAY['email.sent'])$q$),
  ('unsubscribe_results',   $q$SELECT herald.unsubscribe_results('{ws}', {subscription})$q$),
  ('create_api_key',        $q$SELECT herald.create_api_key('{ws}', 'k')$q$),
  ('revoke_api_key',        $q$SELECT herald.revoke_api_key('{ws}', (SELECT id FROM api_secrets WHERE ws = '{ws}'))$q$),
  ('list_api_keys',         $q$SELECT herald.list_api_keys('{ws}')$q$),
  ('api_call (the key''s workspace)', $q$SELECT herald.api_call((SELECT secret FROM api_secrets WHERE ws = '{ws}'), 'track', '{"email": "x@example.com", "kind": "ping"}')$q$),
  ('create_workspace',      $q$SELECT herald.create_workspace('{ws}-2')$q$),
  ('grant_workspace',       $q$SELECT herald.grant_workspace('hsec_app_b', '{ws}')$q$),
  ('revoke_workspace',      $q$SELECT herald.revoke_workspace('hsec_app_a', '{ws}')$q$),
  ('create_automation',     $q$SELECT herald.create_automation('{ws}', '{"name": "n", "trigger": {"event": "e"}, "start": "x", "nodes": {"x": {"type": "exit"}}}')$q$),
  ('set_automation_status', $q$SELECT herald.set_automation_status({automation}, 'paused')$q$),
  ('update_automation',     $q$SELECT herald.update_automation({automation}, '{"name": "ask 2", "trigger": {"event": "ask"}, "start": "ok", "nodes": {"ok": {"type": "approval", "approved": "x", "rejected": "x"}, "x": {"type": "exit"}}}')$q$),
  ('preview_automation_update', $q$SELECT herald.preview_automation_update({automation}, '{"name": "ask 2", "trigger": {"event": "ask"}, "start": "ok", "nodes": {"ok": {"type": "approval", "approved": "x", "rejected": "x"}, "x": {"type": "exit"}}}', '{"migrate": {"ok": "ok"}}')$q$),
  ('upsert_template',       $q$SELECT herald.upsert_template('{ws}', 't', 'Hi', '<p>x</p>')$q$),
  ('upsert_provider',       $q$SELECT herald.upsert_provider('{ws}', 'p2', 'file')$q$),
  ('set_rate_limit',        $q$SELECT herald.set_rate_limit('provider:x', 5)$q$),
  ('create_broadcast',      $q$SELECT herald.create_broadcast('{ws}', '{"name": "n", "template": "t", "audience": "all"}')$q$),
  ('schedule_broadcast',    $q$SELECT herald.schedule_broadcast({broadcast})$q$),
  ('pause_broadcast',       $q$SELECT herald.schedule_broadcast({broadcast}); SELECT herald.pause_broadcast({broadcast})$q$),
  ('resume_broadcast',      $q$SELECT herald.schedule_broadcast({broadcast}); SELECT herald.pause_broadcast({broadcast}); SELECT herald.resume_broadcast({broadcast})$q$),
  ('cancel_broadcast',      $q$SELECT herald.cancel_broadcast({broadcast})$q$),
  ('resend_failed',         $q$SELECT herald.cancel_broadcast({broadcast}); SELECT herald.resend_failed({broadcast})$q$),
  ('archive_template',      $q$SELECT herald.archive_template('{ws}', 'spare')$q$),
  ('unarchive_template',    $q$SELECT herald.unarchive_template('{ws}', 'spare')$q$),
  ('delete_template',       $q$SELECT herald.delete_template('{ws}', 'spare')$q$),
  ('archive_list',          $q$SELECT herald.archive_list('{ws}', 'spare')$q$),
  ('unarchive_list',        $q$SELECT herald.unarchive_list('{ws}', 'spare')$q$),
  ('delete_list',           $q$SELECT herald.delete_list('{ws}', 'spare')$q$),
  ('archive_broadcast',     $q$SELECT herald.archive_broadcast({broadcast})$q$),
  ('unarchive_broadcast',   $q$SELECT herald.unarchive_broadcast({broadcast})$q$),
  ('delete_broadcast',      $q$SELECT herald.delete_broadcast({broadcast})$q$),
  ('claim',                 $q$SELECT herald.claim('w', 10)$q$),
  ('complete',              $q$SELECT herald.complete('[]')$q$),
  ('reap',                  $q$SELECT herald.reap()$q$),
  ('tick',                  $q$SELECT herald.tick(10)$q$),
  ('take_tick_wakeup',      $q$SELECT herald.take_tick_wakeup()$q$),
  ('flush_stats',           $q$SELECT herald.flush_stats()$q$),
  ('advance_broadcasts',    $q$SELECT herald.advance_broadcasts(10)$q$),
  ('record_feedback',       $q$SELECT herald.record_feedback('[]')$q$),
  ('prune',                 $q$SELECT herald.prune('30 days')$q$),
  ('advance_results',       $q$SELECT herald.advance_results(10)$q$),
  ('provider_kinds',        $q$SELECT herald.provider_kinds()$q$),
  ('internal: _check_automation', $q$SELECT herald._check_automation('{}')$q$),
  ('internal: _render_email', $q$SELECT herald._render_email('{"subject": "s", "html": "h"}', '{}', '{ws}', NULL)$q$),
  ('internal: _authorize',  $q$SELECT herald._authorize('{ws}')$q$);
CREATE FUNCTION pg_temp.call_for(q text, w text) RETURNS text LANGUAGE sql AS $$
  SELECT replace(replace(replace(replace(replace(replace(replace(q, '{ws}', i.ws), '{automation}', i.automation::text),
         '{enrollment}', i.enrollment::text), '{contact}', i.contact::text), '{broadcast}', i.broadcast::text),
         '{dead}', i.dead_job::text), '{subscription}', i.subscription::text)
    FROM ids i WHERE i.ws = w $$;
-- what the tables hold before the matrix
CREATE TEMP TABLE before AS
SELECT c.relname, (xpath('/row/c/text()', query_to_xml(format('SELECT md5(string_agg(t::text, '','' ORDER BY t::text)) AS c FROM herald.%I t', c.relname), false, true, '')))[1]::text AS sum
  FROM pg_class c WHERE c.relnamespace = 'herald'::regnamespace AND c.relkind = 'r';

\pset null '-'
SELECT c.fn AS function,
       pg_temp.try_as('hsec_app_a', pg_temp.call_for(c.q, 'sa')) AS "app, own workspace",
       pg_temp.try_as('hsec_app_a', pg_temp.call_for(c.q, 'sb')) AS "app, other workspace",
       pg_temp.try_as('hsec_pool', pg_temp.call_for(c.q, 'sa')) AS "SET ROLE via member",
       pg_temp.try_as('hsec_worker', pg_temp.call_for(c.q, 'sa')) AS worker,
       pg_temp.try_as('hsec_admin', pg_temp.call_for(c.q, 'sb')) AS admin,
       pg_temp.try_as('hsec_nobody', pg_temp.call_for(c.q, 'sa')) AS "no herald role"
  FROM calls c ORDER BY c.n;

-- nothing changed: every table holds what it held before the matrix
SELECT b.relname AS changed FROM before b
  JOIN LATERAL (SELECT (xpath('/row/c/text()', query_to_xml(format('SELECT md5(string_agg(t::text, '','' ORDER BY t::text)) AS c FROM herald.%I t', b.relname), false, true, '')))[1]::text AS sum) a ON true
 WHERE a.sum IS DISTINCT FROM b.sum;

-- reads: as a tenant, every table and view shows its own workspace's rows and none of another's
CREATE FUNCTION pg_temp.rows_as(r name, rel text, own text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE v_own bigint; v_other bigint; v_col text;
BEGIN
    v_col := CASE WHEN rel = 'workspaces' THEN 'id' ELSE 'workspace_id' END;
    BEGIN
        EXECUTE format('SET LOCAL ROLE %I', r);
        EXECUTE format('SELECT count(*) FILTER (WHERE %I = $1), count(*) FILTER (WHERE %I <> $1) FROM herald.%I', v_col, v_col, rel)
           INTO v_own, v_other USING own;
        RAISE EXCEPTION 'rolled back';
    EXCEPTION WHEN OTHERS THEN
        IF SQLERRM = 'rolled back' THEN
            RETURN CASE WHEN v_other > 0 THEN format('LEAK: %s rows of another workspace', v_other)
                        WHEN v_own > 0 THEN 'own rows only' ELSE 'none (the fixture has none)' END;
        END IF;
        RETURN CASE WHEN SQLERRM LIKE 'permission denied for %' THEN 'no grant' ELSE SQLERRM END;
    END;
END $$;
SELECT c.relname AS relation, c.relkind,
       pg_temp.rows_as('hsec_app_a', c.relname, 'sa') AS "as app of sa",
       pg_temp.rows_as('hsec_nobody', c.relname, 'sa') AS "as no herald role"
  FROM pg_class c
 WHERE c.relnamespace = 'herald'::regnamespace AND c.relkind IN ('r', 'v')
   AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname IN ('workspace_id', 'id') AND NOT a.attisdropped)
 ORDER BY c.relkind, c.relname;
-- tables without a workspace: no tenant sees them
SELECT pg_temp.try_as('hsec_app_a', 'SELECT * FROM herald.rate_limits') AS rate_limits,
       pg_temp.try_as('hsec_app_a', 'SELECT * FROM herald.rate_grants') AS rate_grants;
-- a refused call does not lock: the other tenant's enrollment is free right after (isolation spec
-- tenant_lock shows it across sessions); the refusal names the id, not the other workspace
SET ROLE hsec_app_b;
SELECT herald.exit_enrollment(enrollment, 'hostile') FROM ids WHERE ws = 'sa';
SELECT herald.track('sa', 'x@example.com', 'ping');
RESET ROLE;
-- as its own tenant, an application works normally
SET ROLE hsec_app_a;
SELECT herald.decide_approval(enrollment, true, 'app a') FROM ids WHERE ws = 'sa';
SELECT status FROM herald.enrollments ORDER BY id;
SELECT workspace_id, count(*) FROM herald.events GROUP BY 1 ORDER BY 1;
RESET ROLE;

-- The results stream (sql/results.sql): each kind appears when what it tells happens, in the statement
-- that makes it true; read_results from a cursor, pages and kinds; workspaces walled off; pruning;
-- webhook subscriptions delivered as outbox jobs, ordered batches, one in flight, retries and dead
-- deliveries holding a subscription up until redriven.
\set SHOW_CONTEXT never
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox', 'broadcasts', 'result_subscriptions'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 5000000', t);
  END LOOP;
END $$;
-- what earlier files left due or staged goes first, so what follows is this file's
SELECT herald.tick() >= 0 AS drained, herald.advance_results(100000) >= 0 AS published;

SELECT herald.create_workspace(w) FROM unnest(ARRAY['rs1', 'rs2']) w;
SELECT herald.upsert_template(w, 'hi', 'Hi', '<p>hi</p>') FROM unnest(ARRAY['rs1', 'rs2']) w;
SELECT * FROM herald.upsert_contacts('rs1', '[{"email": "ann@example.com"}, {"email": "bob@example.com"},
    {"email": "cat@example.com"}, {"email": "dan@example.com"}, {"email": "eve@example.com"}]');

-- what a reader of rs1 gets next: advance_results publishes, read_results reads after the cursor kept here
CREATE TEMP TABLE seen (ws text PRIMARY KEY, cursor bigint NOT NULL);
INSERT INTO seen VALUES ('rs1', 0), ('rs2', 0);
CREATE FUNCTION pg_temp.news(w text) RETURNS TABLE (kind text, email text, automation bigint, enrollment bigint,
                                                    broadcast bigint, job bigint, data jsonb)
LANGUAGE plpgsql AS $$
DECLARE v_after bigint;
BEGIN
    PERFORM herald.advance_results();
    SELECT s.cursor INTO v_after FROM seen s WHERE s.ws = w;
    RETURN QUERY
    SELECT r.kind, c.email, r.automation_id, r.enrollment_id, r.broadcast_id, r.job_id, r.data - 'send_at'
      FROM herald.read_results(w, v_after) r
      LEFT JOIN herald.contacts c ON c.workspace_id = w AND c.id = r.contact_id
     ORDER BY r.id;
    UPDATE seen s SET cursor = coalesce((SELECT max(r.id) FROM herald.read_results(w, v_after) r), s.cursor) WHERE s.ws = w;
END $$;
-- finish rs1's claimable jobs (all of them: each call below has only the intended ones pending) with
-- one result; k names what they are
CREATE FUNCTION pg_temp.finish(k text, result jsonb) RETURNS int LANGUAGE sql AS
$$ SELECT herald.complete(coalesce(jsonb_agg(result || jsonb_build_object('id', j.id) ORDER BY j.id), '[]'))
     FROM herald.claim('test', 1000) j WHERE j.workspace = 'rs1' $$;

-- a journey: email -> approval -> webhook -> decide -> exit
SELECT herald.create_automation('rs1', '{
  "name": "journey", "trigger": {"event": "go"}, "start": "mail",
  "nodes": {
    "mail": {"type": "email", "template": "hi", "next": "ask"},
    "ask":  {"type": "approval", "approved": "crm", "rejected": "bye"},
    "crm":  {"type": "webhook", "url": "https://crm.example/hook", "next": "tier"},
    "tier": {"type": "decide", "url": "https://crm.example/tier", "field": "tier", "paths": {"gold": "done"}, "default": "bye"},
    "done": {"type": "exit"},
    "bye":  {"type": "exit"}}}') AS journey \gset
SELECT herald.set_automation_status(:journey, 'live');
SELECT herald.track('rs1', e, 'go') FROM unnest(ARRAY['ann@example.com', 'bob@example.com', 'cat@example.com']) e;
SELECT herald.tick() AS steps;
-- nothing has happened yet that the stream tells
SELECT * FROM pg_temp.news('rs1');

-- email.sent, email.failed (for good: the journey fails with it); a retry is not a result
SELECT herald.complete(jsonb_agg(CASE j.payload ->> 'to'
         WHEN 'ann@example.com' THEN jsonb_build_object('id', j.id, 'ok', true, 'message_id', '<ann@herald>')
         WHEN 'bob@example.com' THEN jsonb_build_object('id', j.id, 'ok', false, 'error', '550 no such user')
         ELSE jsonb_build_object('id', j.id, 'ok', false, 'retryable', true, 'error', '451 later') END ORDER BY j.id))
  FROM herald.claim('test', 10) j WHERE j.workspace = 'rs1';
SELECT * FROM pg_temp.news('rs1');
-- out of attempts: email.failed with status dead (the journey waits for a redrive)
UPDATE herald.outbox SET run_at = now(), max_attempts = 2 WHERE workspace_id = 'rs1' AND status = 'pending';
SELECT pg_temp.finish('email', '{"ok": false, "retryable": true, "error": "451 still later"}') AS finished;
SELECT * FROM pg_temp.news('rs1');

-- approval.requested when ann parks on the approval node, approval.decided, webhook.answered,
-- decide.answered (with the path its reply chose), enrollment.completed with the last context
SELECT herald.tick() AS steps;
SELECT * FROM pg_temp.news('rs1');
SELECT herald.decide_approval(e.id, true, 'boss@example.com')
  FROM herald.enrollments e WHERE e.workspace_id = 'rs1' AND e.wait_kind = 'approval';
SELECT herald.tick() AS steps;
SELECT pg_temp.finish('webhook', '{"ok": true, "response": {"score": 91}}') AS finished;
SELECT herald.tick() AS steps;
SELECT pg_temp.finish('decide', '{"ok": true, "response": {"tier": "gold"}}') AS finished;
SELECT herald.tick() AS steps;
SELECT * FROM pg_temp.news('rs1');

-- enrollment.exited: by hand, and when the automation is archived
SELECT herald.exit_enrollment(e.id, 'asked to stop')
  FROM herald.enrollments e JOIN herald.contacts c ON c.id = e.contact_id
 WHERE e.workspace_id = 'rs1' AND c.email = 'cat@example.com';
SELECT herald.create_automation('rs1', '{"name": "slow", "start": "wait",
  "nodes": {"wait": {"type": "delay", "duration": "1 day", "next": "x"}, "x": {"type": "exit"}}}') AS slow \gset
SELECT herald.set_automation_status(:slow, 'live');
SELECT enrolled FROM herald.enroll(:slow, ARRAY(SELECT id FROM herald.contacts WHERE workspace_id = 'rs1' AND email = 'dan@example.com'));
SELECT herald.tick() AS steps;
SELECT herald.set_automation_status(:slow, 'archived');
SELECT * FROM pg_temp.news('rs1');

-- a suppressed recipient: claim cancels the email, and a journey that ends with it completes there
-- (enrollment.completed)
SELECT herald.suppress('rs1', 'eve@example.com', 'manual');
SELECT herald.create_automation('rs1', '{"name": "note", "start": "m",
  "nodes": {"m": {"type": "email", "template": "hi"}}}') AS note \gset
SELECT herald.set_automation_status(:note, 'live');
SELECT enrolled FROM herald.enroll(:note, ARRAY(SELECT id FROM herald.contacts WHERE workspace_id = 'rs1' AND email = 'eve@example.com'));
SELECT herald.tick() AS steps;
SELECT count(*) AS handed_out FROM herald.claim('test', 10) j WHERE j.workspace = 'rs1';
SELECT * FROM pg_temp.news('rs1');

-- what recipients report about ann's message: email.opened, email.clicked, email.bounced (a replayed
-- open within minutes is no new result; an unsubscribe is not a result kind)
SELECT herald.record_feedback('[{"kind": "opened", "message_id": "<ann@herald>"},
                                {"kind": "clicked", "message_id": "<ann@herald>", "payload": {"url": "https://shop.example/"}},
                                {"kind": "opened", "message_id": "<ann@herald>"},
                                {"kind": "unsubscribed", "message_id": "<ann@herald>"},
                                {"kind": "soft_bounce", "message_id": "<ann@herald>", "payload": {"smtp": "452 full"}}]') AS recorded;
SELECT herald.record_feedback('[{"kind": "opened", "message_id": "<ann@herald>"}]') AS replayed;
SELECT * FROM pg_temp.news('rs1');

-- a broadcast with an A/B test: broadcast.started, email.sent per recipient, broadcast.winner,
-- broadcast.sent
SELECT herald.subscribe('rs1', 'news', ARRAY['ann@example.com', 'bob@example.com', 'cat@example.com', 'dan@example.com']);
SELECT herald.upsert_template('rs1', 'hi-b', 'Hey', '<p>hey</p>');
SELECT herald.create_broadcast('rs1', '{"name": "Spring", "audience": {"lists": ["news"]},
    "variations": [{"key": "a", "template": "hi"}, {"key": "b", "template": "hi-b"}],
    "ab_test": {"test_percent": 50, "metric": "opens", "wait": "1 hour"}}') AS spring \gset
SELECT herald.schedule_broadcast(:spring);
SELECT herald.advance_broadcasts() AS read;
SELECT pg_temp.finish('email', '{"ok": true}') AS finished;
UPDATE herald.broadcasts SET test_ends_at = now() - interval '1 second' WHERE id = :spring;
SELECT herald.advance_broadcasts() AS decided;
SELECT herald.advance_broadcasts() AS rest;
SELECT pg_temp.finish('email', '{"ok": true}') AS finished;
SELECT herald.advance_broadcasts() AS settled;
SELECT status FROM herald.broadcasts WHERE id = :spring;
SELECT * FROM pg_temp.news('rs1');

-- ------------------------------------------------------------------------------------ reading

-- pages of 4 from 0 on give the whole stream, each result once, in id order
WITH RECURSIVE page(n, last, ids) AS (
    SELECT 1, (SELECT max(id) FROM herald.read_results('rs1', 0, 4)), ARRAY(SELECT id FROM herald.read_results('rs1', 0, 4) ORDER BY id)
    UNION ALL
    SELECT p.n + 1, (SELECT max(id) FROM herald.read_results('rs1', p.last, 4)),
           ARRAY(SELECT id FROM herald.read_results('rs1', p.last, 4) ORDER BY id)
      FROM page p WHERE cardinality(p.ids) = 4
)
SELECT count(DISTINCT p.n) AS pages, count(*) AS results,
       array_agg(x ORDER BY p.n, x.o) = ARRAY(SELECT id FROM herald.read_results('rs1', 0, 10000) ORDER BY id) AS same_as_one_read
  FROM page p CROSS JOIN LATERAL unnest(p.ids) WITH ORDINALITY x(x, o);
-- kinds: only those, in id order, from the cursor on
SELECT kind, count(*) FROM herald.read_results('rs1', 0, 100, ARRAY['email.sent', 'enrollment.exited', 'email.sent']) GROUP BY kind ORDER BY kind;
SELECT bool_and(id > (SELECT min(id) FROM herald.results WHERE workspace_id = 'rs1' AND kind = 'email.sent')) AS after_cursor, count(*)
  FROM herald.read_results('rs1', (SELECT min(id) FROM herald.results WHERE workspace_id = 'rs1' AND kind = 'email.sent'), 100, ARRAY['email.sent']);
-- refusals
SELECT * FROM herald.read_results('rs1', NULL);
SELECT * FROM herald.read_results('rs1', -1);
SELECT * FROM herald.read_results('rs1', 0, 0);
SELECT * FROM herald.read_results('rs1', 0, 10001);
SELECT * FROM herald.read_results('rs1', 0, 10, ARRAY['email.sent', 'email.delivered']);
SELECT * FROM herald.read_results('rs1', 0, 10, '{}');
SELECT * FROM herald.read_results('nowhere', 0);

-- a staged result is not readable before advance_results publishes it, and gets an id above every one
-- published so far
SELECT herald.track('rs2', 'zed@example.com', 'hello');
SELECT herald.create_automation('rs2', '{"name": "ask", "trigger": {"event": "ask"}, "start": "ok",
  "nodes": {"ok": {"type": "approval", "approved": "x", "rejected": "x"}, "x": {"type": "exit"}}}') AS r2ask \gset
SELECT herald.set_automation_status(:r2ask, 'live');
SELECT herald.track('rs2', 'zed@example.com', 'ask');
-- (tick ends with advance_results: approval.requested is readable at once)
SELECT herald.tick() AS steps;
SELECT kind FROM herald.read_results('rs2', 0);
SELECT herald.decide_approval(id, false, 'boss') FROM herald.enrollments WHERE workspace_id = 'rs2';
SELECT count(*) AS staged FROM herald.results_staged WHERE workspace_id = 'rs2';
SELECT count(*) AS readable FROM herald.read_results('rs2', 0, 10, ARRAY['approval.decided']);
SELECT herald.advance_results() AS published;
SELECT kind, id > (SELECT max(id) FROM herald.results WHERE workspace_id = 'rs1') AS above_rs1 FROM herald.read_results('rs2', 0);
SELECT count(*) AS staged_left FROM herald.results_staged WHERE workspace_id IN ('rs1', 'rs2');

-- workspaces are walled off: an application of rs2 reads rs2's stream, and is refused rs1's
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hres_app_rs2') THEN CREATE ROLE hres_app_rs2 NOLOGIN IN ROLE herald_app; END IF;
END $$;
SELECT herald.grant_workspace('hres_app_rs2', 'rs2');
SET ROLE hres_app_rs2;
SELECT kind FROM herald.read_results('rs2', 0);
SELECT kind FROM herald.read_results('rs1', 0);
SELECT workspace_id, count(*) FROM herald.results WHERE workspace_id IN ('rs1', 'rs2') GROUP BY 1;
SELECT count(*) FROM herald.results_staged;
SELECT herald.subscribe_results('rs1', 'https://hooks.example/r', NULL);
SELECT herald.advance_results();
RESET ROLE;

-- ------------------------------------------------------------------------------- subscriptions

-- rs1's whole stream (after 0), 5 per delivery; another for enrollment results only, from now on
SELECT herald.subscribe_results('rs1', 'https://hooks.example/all', NULL, '{"after": 0, "batch": 5}') AS sub_all \gset
SELECT herald.subscribe_results('rs1', 'https://hooks.example/ends', ARRAY['enrollment.exited', 'enrollment.completed'],
                                '{"max_attempts": 1}') AS sub_ends \gset
SELECT id, url, kinds, options, cursor = (SELECT max(id) FROM herald.results WHERE workspace_id = 'rs1') AS at_newest, state
  FROM herald.result_subscription_overview WHERE workspace_id = 'rs1' ORDER BY id;
-- what each delivery carries: its subscription, the cursor it follows, the result ids it holds
CREATE TEMP VIEW deliveries AS
SELECT o.id AS job, o.status, o.payload -> 'body' ->> 'subscription' AS sub, o.dedupe_key LIKE 'results:%' AS keyed,
       o.payload ->> 'url' AS url, o.payload ->> 'verbatim' AS verbatim, o.max_attempts, o.rate_keys,
       (o.payload -> 'body' ->> 'after')::bigint AS after,
       ARRAY(SELECT (x ->> 'id')::bigint FROM jsonb_array_elements(o.payload -> 'body' -> 'results') x) AS ids
  FROM herald.outbox o WHERE o.workspace_id = 'rs1' AND o.kind = 'webhook' AND o.automation_id IS NULL;
SELECT herald.advance_results() AS published;
SELECT job, status, sub, keyed, url, verbatim, max_attempts, rate_keys, after = 0 AS from_start, cardinality(ids) FROM deliveries ORDER BY job;
-- one delivery in flight per subscription: nothing more is queued while it is pending
SELECT herald.advance_results() AS published, (SELECT count(*) FROM deliveries) AS deliveries;
-- the subscriber answers 500: the same delivery is retried (no next batch meanwhile), then accepted
SELECT pg_temp.finish('webhook', '{"ok": false, "retryable": true, "error": "500 Internal Server Error"}') AS failed;
SELECT herald.advance_results() AS published, (SELECT count(*) FROM deliveries) AS deliveries;
SELECT state, job_status, attempts, last_error FROM herald.result_subscription_overview WHERE id = :sub_all;
UPDATE herald.outbox SET run_at = now() WHERE workspace_id = 'rs1' AND status = 'pending' AND automation_id IS NULL;
SELECT pg_temp.finish('webhook', '{"ok": true}') AS accepted;
SELECT herald.advance_results() AS published;
SELECT job, status, sub, cardinality(ids), after = (SELECT d.ids[5] FROM deliveries d WHERE d.sub = :'sub_all' ORDER BY d.job LIMIT 1) AS follows
  FROM deliveries WHERE sub = :'sub_all' ORDER BY job;
-- drained: every result of rs1 once, in order, across the deliveries
DO $$ BEGIN
  FOR i IN 1..20 LOOP
    PERFORM pg_temp.finish('webhook', '{"ok": true}');
    PERFORM herald.advance_results();
  END LOOP;
END $$;
SELECT array_agg(x ORDER BY d.job, x.o) = ARRAY(SELECT id FROM herald.read_results('rs1', 0, 10000) ORDER BY id) AS everything_in_order,
       count(DISTINCT d.job) AS deliveries
  FROM deliveries d CROSS JOIN LATERAL unnest(d.ids) WITH ORDINALITY x(x, o) WHERE d.sub = :'sub_all';
SELECT state, queued, cursor = (SELECT max(id) FROM herald.results WHERE workspace_id = 'rs1') AS caught_up
  FROM herald.result_subscription_overview WHERE id = :sub_all;

-- the kinds subscription: new enrollment ends only; a delivery that runs out of attempts holds it up
-- (blocked) until it is redriven, and nothing is skipped
SELECT herald.track('rs1', e, 'go') FROM unnest(ARRAY['dan@example.com', 'eve@example.com']) e;
SELECT herald.tick() AS steps;
SELECT herald.exit_enrollment(e.id, 'changed plans') FROM herald.enrollments e
 WHERE e.workspace_id = 'rs1' AND e.automation_id = :journey AND e.status = 'waiting' AND e.wait_job LIKE '%mail%' ORDER BY e.id;
SELECT herald.advance_results() AS published;
SELECT sub, ARRAY(SELECT r.kind FROM herald.results r WHERE r.workspace_id = 'rs1' AND r.id = ANY (d.ids) ORDER BY r.id) AS kinds
  FROM deliveries d WHERE d.sub = :'sub_ends';
SELECT herald.complete(jsonb_agg(CASE WHEN j.payload ->> 'url' LIKE '%/ends'
                                      THEN jsonb_build_object('id', j.id, 'ok', false, 'retryable', true, 'error', '503 down')
                                      ELSE jsonb_build_object('id', j.id, 'ok', true) END ORDER BY j.id))
  FROM herald.claim('test', 100) j WHERE j.workspace = 'rs1';
SELECT state, job_status, last_error FROM herald.result_subscription_overview WHERE id = :sub_ends;
SELECT herald.track('rs1', 'fay@example.com', 'go');
SELECT herald.tick() AS steps;
SELECT herald.exit_enrollment(e.id, 'later') FROM herald.enrollments e JOIN herald.contacts c ON c.id = e.contact_id
 WHERE e.workspace_id = 'rs1' AND c.email = 'fay@example.com';
SELECT herald.advance_results() AS published, (SELECT count(*) FROM deliveries WHERE sub = :'sub_ends') AS deliveries;
SELECT herald.redrive(ARRAY[job_id]) FROM herald.result_subscription_overview WHERE id = :sub_ends;
SELECT pg_temp.finish('webhook', '{"ok": true}') AS accepted;
SELECT herald.advance_results() AS published;
SELECT job, status, cardinality(ids), ARRAY(SELECT r.kind FROM herald.results r WHERE r.id = ANY (d.ids) ORDER BY r.id) AS kinds
  FROM deliveries d WHERE d.sub = :'sub_ends' ORDER BY job;

-- unsubscribing cancels a delivery not yet handed out; subscribing checks what it is given
SELECT herald.unsubscribe_results('rs1', :sub_ends) AS unsubscribed, herald.unsubscribe_results('rs1', :sub_ends) AS again;
SELECT o.status, o.last_error FROM herald.outbox o JOIN deliveries d ON d.job = o.id WHERE d.sub = :'sub_ends' ORDER BY o.id;
SELECT herald.unsubscribe_results('rs2', :sub_all) AS other_workspace;
-- a workspace's subscriptions are bounded (herald.max_result_subscriptions, default 100)
SELECT herald.create_workspace('rs_cap');
SET herald.max_result_subscriptions = 2;
SELECT herald.subscribe_results('rs_cap', 'https://hooks.example/' || i, NULL) > 0 AS made FROM generate_series(1, 2) i;
SELECT herald.subscribe_results('rs_cap', 'https://hooks.example/3', NULL);
SELECT count(*) AS kept FROM herald.result_subscriptions WHERE workspace_id = 'rs_cap';
SELECT herald.unsubscribe_results('rs_cap', min(id)) FROM herald.result_subscriptions WHERE workspace_id = 'rs_cap';
SELECT herald.subscribe_results('rs_cap', 'https://hooks.example/3', NULL) > 0 AS made_after_one_ended;
SET herald.max_result_subscriptions = 'lots';
SELECT herald.subscribe_results('rs_cap', 'https://hooks.example/4', NULL);
RESET herald.max_result_subscriptions;
SELECT herald.subscribe_results('rs_cap', 'https://hooks.example/4', NULL) > 0 AS made_under_the_default;
SELECT herald.subscribe_results('rs1', 'ftp://hooks.example/r', NULL);
SELECT herald.subscribe_results('rs1', 'https://hooks.example/r', ARRAY['email.delivered']);
SELECT herald.subscribe_results('rs1', 'https://hooks.example/r', NULL, '{"batch": 0, "colour": "red"}');
SELECT herald.subscribe_results('rs1', NULL, NULL);
SELECT herald.advance_results(0);

-- ---------------------------------------------------------------------------------- pruning

UPDATE herald.results SET published_at = now() - interval '8 days'
 WHERE workspace_id = 'rs1' AND id <= (SELECT min(id) + 2 FROM herald.results WHERE workspace_id = 'rs1');
SELECT herald.prune('30 days') >= 3 AS pruned;
SELECT count(*) AS old_left FROM herald.results WHERE workspace_id = 'rs1' AND published_at < now() - interval '7 days';
SELECT herald.prune('30 days', '30 minutes');
-- retention: events and message_history are kept unless a retention is given (argument or setting)
SELECT herald.create_workspace('rt1');
INSERT INTO herald.events (workspace_id, email, kind, created_at)
SELECT 'rt1', 'old@example.com', 'retention.test', now() - make_interval(days => d) FROM unnest(ARRAY[2, 15, 25, 45]) d;
INSERT INTO herald.message_history (workspace_id, outbox_id, kind, status, dedupe_key, attempt, created_at)
SELECT 'rt1', -d, 'email', 'sent', 'retention:' || d, 1, now() - make_interval(days => d) FROM unnest(ARRAY[2, 35, 45, 400]) d;
CREATE TEMP VIEW rt_left AS
SELECT (SELECT array_agg(extract(day FROM now() - e.created_at)::int ORDER BY e.created_at DESC) FROM herald.events e
         WHERE e.workspace_id = 'rt1' AND e.kind = 'retention.test') AS event_ages,
       (SELECT array_agg(-h.outbox_id ORDER BY h.created_at DESC) FROM herald.message_history h
         WHERE h.workspace_id = 'rt1' AND h.dedupe_key LIKE 'retention:%') AS history_ages;
SELECT herald.prune('30 days') >= 0 AS pruned_with_no_retention;
SELECT * FROM rt_left;
SELECT herald.prune('30 days', '7 days', events_older_than => '20 days') >= 2 AS pruned_events;
SELECT * FROM rt_left;
SELECT herald.prune('30 days', '7 days', history_older_than => '40 days') >= 2 AS pruned_history;
SELECT * FROM rt_left;
-- bad retentions change nothing
SELECT herald.prune('30 days', '7 days', events_older_than => '1 hour');
SELECT herald.prune('30 days', '7 days', history_older_than => '10 days');
SELECT * FROM rt_left;
-- the database's settings, for the daemon's prune('30 days'); an argument wins over a setting
SET herald.prune_events_older_than = 'soon';
SELECT herald.prune('30 days');
SET herald.prune_events_older_than = '12 hours';
SELECT herald.prune('30 days');
SET herald.prune_events_older_than = '10 days';
SET herald.prune_history_older_than = '30 days';
SELECT herald.prune('30 days', '7 days', events_older_than => '1000 days') >= 1 AS history_by_setting;
SELECT * FROM rt_left;
SELECT herald.prune('30 days') >= 1 AS events_by_setting;
SELECT * FROM rt_left;
RESET herald.prune_events_older_than;
RESET herald.prune_history_older_than;
-- finished jobs go after older_than, cancelled ones too; a dead job waits for its redrive
INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, payload, status, done_at, created_at)
SELECT 'rt1', 'email', 'old:' || s, '{}', s, CASE WHEN s <> 'dead' THEN now() - interval '40 days' END,
       now() - interval '40 days'
  FROM unnest(ARRAY['done', 'failed', 'cancelled', 'dead']) s;
SELECT herald.prune('30 days') >= 3 AS pruned_jobs;
SELECT array_agg(o.status) AS old_jobs_left FROM herald.outbox o WHERE o.workspace_id = 'rt1' AND o.dedupe_key LIKE 'old:%';
-- erasure takes a contact's results too, and takes them out of the deliveries that carried them
-- (sent ones included: the subscriber has its copy, herald keeps none); the others' results stay
SELECT c.id AS ann FROM herald.contacts c WHERE c.workspace_id = 'rs1' AND c.email = 'ann@example.com' \gset
CREATE TEMP VIEW delivered AS
SELECT count(*) FILTER (WHERE x -> 'contact_id' = to_jsonb(:ann::bigint)) AS ann, count(*) AS results,
       count(DISTINCT o.id) AS deliveries
  FROM herald.outbox o CROSS JOIN LATERAL jsonb_array_elements(o.payload -> 'body' -> 'results') x
 WHERE o.workspace_id = 'rs1' AND o.kind = 'webhook' AND o.contact_id IS NULL;
SELECT * FROM delivered;
SELECT e ->> 'results' > '0' AS erased_results, (e ->> 'result_deliveries')::int AS deliveries_rewritten
  FROM herald.delete_contact('rs1', 'ann@example.com') e;
SELECT * FROM delivered;
SELECT count(*) AS ann_results FROM herald.results r
 WHERE r.workspace_id = 'rs1' AND r.data ->> 'message_id' = '<ann@herald>';
-- newest_result: where a reader that wants only what happens from now on starts
SELECT herald.newest_result('rs1') = (SELECT coalesce(max(id), 0) FROM herald.results WHERE workspace_id = 'rs1') AS newest_is_the_max;
SELECT herald.newest_result('rs2') >= 0 AS newest_of_another;
SELECT herald.newest_result('nobody');

-- ------------------------------------------------------------------ who publishes after a tick

-- a caller that publishes on its own (herald run) tells tick to leave the stream to it: the tick's
-- results stay staged until that caller's advance_results; any other value than off/false/0 publishes
SELECT herald.create_workspace('rs3');
SELECT herald.set_automation_status(herald.create_automation('rs3', '{"name": "ask", "trigger": {"event": "ask"}, "start": "ok",
  "nodes": {"ok": {"type": "approval", "approved": "x", "rejected": "x"}, "x": {"type": "exit"}}}'), 'live');
SET herald.tick_publishes_results = off;
SELECT herald.track('rs3', 'zoe@example.com', 'ask') > 0 AS tracked;
SELECT herald.tick() AS steps;
SELECT count(*) AS staged, (SELECT count(*) FROM herald.read_results('rs3', 0)) AS readable
  FROM herald.results_staged WHERE workspace_id = 'rs3';
SELECT herald.advance_results() AS published;
SELECT kind FROM herald.read_results('rs3', 0);
SET herald.tick_publishes_results = on;
SELECT herald.track('rs3', 'zia@example.com', 'ask') > 0 AS tracked;
SELECT herald.tick() AS steps;
SELECT count(*) AS staged, (SELECT count(*) FROM herald.read_results('rs3', 0)) AS readable
  FROM herald.results_staged WHERE workspace_id = 'rs3';
RESET herald.tick_publishes_results;

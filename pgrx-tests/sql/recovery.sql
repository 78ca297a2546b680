-- Recovery after a mistake is fixed: retry_failed puts failed (permanent) and dead jobs back, and the
-- enrollments that failed on them wait on them again, at the node they failed on.
\set SHOW_CONTEXT never
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 99000', t);
  END LOOP;
END $$;
SELECT herald.create_workspace('rc');
SELECT herald.create_automation('rc', '{"name": "crm", "trigger": {"event": "lead"}, "reentry": "after_exit", "start": "hook",
  "nodes": {"hook": {"type": "webhook", "url": "https://crm.example/hook", "next": "done"}, "done": {"type": "exit"}}}') AS a \gset
SELECT herald.set_automation_status(:a, 'live');
SELECT herald.track('rc', 'p' || g || '@example.com', 'lead') > 0 AS tracked FROM generate_series(1, 3) g;
SELECT herald.tick() >= 3 AS ticked;
UPDATE herald.outbox SET status = 'cancelled' WHERE workspace_id <> 'rc' AND status = 'pending';
-- the daemon refused all three (say, the allow-list): permanent failures, the journeys failed
SELECT herald.complete((SELECT jsonb_agg(jsonb_build_object('id', c.id, 'ok', false, 'retryable', false,
        'error', 'webhook target crm.example resolves to a private address (not in HERALD_WEBHOOK_ALLOW)'))
  FROM herald.claim('rc-worker', 10) c)) AS completed;
SELECT e.status, e.exit_reason FROM herald.enrollments e WHERE e.workspace_id = 'rc' ORDER BY e.id;
-- one contact started the journey again meanwhile: its old enrollment must stay failed
SELECT herald.track('rc', 'p3@example.com', 'lead') > 0 AS p3_again;

-- refusals
SELECT herald.retry_failed('rc', '{}');
SELECT herald.retry_failed('rc', '{"automaton": 1}');
SELECT herald.retry_failed('rc', '{"ids": "x"}');
SELECT herald.retry_failed('rc', '[]');
-- a dry run says what would happen and changes nothing
SELECT herald.retry_failed('rc', jsonb_build_object('automation', :a, 'error', 'allow', 'dry_run', true)) - 'sample' AS dry;
SELECT status, count(*) FROM herald.outbox WHERE workspace_id = 'rc' GROUP BY 1 ORDER BY 1;
-- the retry: two journeys wait on their jobs again; the third stays failed and its job is not retried (skipped)
SELECT herald.retry_failed('rc', jsonb_build_object('automation', :a, 'error', 'allow')) - 'sample' AS retried;
SELECT e.status, e.current_node, e.wait_kind, e.exit_reason IS NULL AS reason_cleared
  FROM herald.enrollments e WHERE e.workspace_id = 'rc' ORDER BY e.id;
SELECT o.status, o.attempt FROM herald.outbox o WHERE o.workspace_id = 'rc' ORDER BY o.id;
-- this time the webhook answers: the restored journeys complete
SELECT herald.complete((SELECT jsonb_agg(jsonb_build_object('id', c.id, 'ok', true, 'response', '{}'::jsonb))
  FROM herald.claim('rc-worker', 10) c WHERE c.workspace = 'rc')) AS completed;
SELECT herald.tick() >= 0 AS ticked;
SELECT e.status, count(*) FROM herald.enrollments e WHERE e.workspace_id = 'rc' GROUP BY 1 ORDER BY 1;
-- nothing left to retry
SELECT herald.retry_failed('rc', jsonb_build_object('automation', :a)) ->> 'jobs' AS jobs;

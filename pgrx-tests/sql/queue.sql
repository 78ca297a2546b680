-- The queue: send, claim, complete, reap, redrive, priorities, fairness, rate limits.
\set SHOW_CONTEXT never
-- ids start at this file's own base, so expected output does not depend on the other files
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 1000000', t);
  END LOOP;
END $$;
SELECT herald.create_workspace('q1');
SELECT herald.upsert_template('q1', 'receipt', 'Your receipt {{ context.order }}', '<p>Thanks {{ contact.first_name }}</p>', 'Thanks');
-- templates are bounded: a subject of at most 998 characters, html and text of at most 512 KiB each
SELECT herald.upsert_template('q1', 'huge', repeat('s', 999), '<p>x</p>');
SELECT herald.upsert_template('q1', 'huge', 'Hi', repeat('x', 524289));
SELECT herald.upsert_contact('q1', 'buyer@example.com', '{"first_name": "Bo"}') > 0 AS contact;

-- send: transactional mail, priority 0; a dedupe key makes a repeated request a no-op
SELECT herald.send('q1', 'buyer@example.com', 'receipt', '{"order": 42}', 'default', 'order-42') AS job \gset
SELECT herald.send('q1', 'buyer@example.com', 'receipt', '{"order": 42}', 'default', 'order-42') = :job AS same_job;
SELECT count(*) AS jobs FROM herald.outbox WHERE workspace_id = 'q1';
SELECT herald.send('q1', 'buyer@example.com', 'nope');
SELECT herald.send('q1', 'buyer@example.com', 'receipt', '{}', 'ses');
SELECT herald.send('q1', 'not-mail', 'receipt');
SELECT herald.send('q1', NULL, 'receipt');
SELECT herald.send('zz', 'buyer@example.com', 'receipt');
SELECT herald.send('q1', 'buyer@example.com', 'receipt', '{}', 'default', 'b:1:1');   -- reserved for broadcasts
-- herald's own keys: an automation step's, a decide question's, a result delivery's
SELECT herald.send('q1', 'buyer@example.com', 'receipt', '{}', 'default', 'a3:e7:welcome:1');
SELECT herald.send('q1', 'buyer@example.com', 'receipt', '{}', 'default', 'decide:abc:1');
SELECT herald.send('q1', 'buyer@example.com', 'receipt', '{}', 'default', 'results:1:10');
SELECT herald.send('q1', 'buyer@example.com', 'receipt', '{}', 'default', '');
-- keys that only look alike are the application's (rolled back: the claims below see one job)
BEGIN;
SELECT herald.send('q1', 'buyer@example.com', 'receipt', '{}', 'default', 'a3:welcome') > 0 AS allowed,
       herald.send('q1', 'buyer@example.com', 'receipt', '{}', 'default', 'results-2026') > 0 AS allowed_too;
ROLLBACK;

-- claim: everything the sidecar needs
SELECT workspace, kind, provider, dedupe_key, attempt, payload ->> 'to' AS to, payload -> 'template' ->> 'subject' AS subject,
       payload -> 'template' ->> 'version' AS version, payload -> 'contact' ->> 'first_name' AS first_name,
       payload -> 'variables' AS variables
  FROM herald.claim('w1', 10);
SELECT count(*) AS nothing_left FROM herald.claim('w2', 10);
SELECT status, leased_by, lease_until > now() AS leased FROM herald.outbox WHERE id = :job;
SELECT * FROM herald.claim('', 10);
SELECT * FROM herald.claim('w1', 0);
SELECT * FROM herald.claim('w1', 10, '0 seconds');

-- complete: ok → done + history; twice → ignored with a warning
SELECT herald.complete(jsonb_build_array(jsonb_build_object('id', :job, 'ok', true, 'message_id', '<order-42@herald>')));
SELECT status, message_id, done_at IS NOT NULL AS done FROM herald.outbox WHERE id = :job;
SELECT kind, status, message_id, attempt FROM herald.message_history WHERE outbox_id = :job;
\set VERBOSITY terse
SELECT herald.complete(jsonb_build_array(jsonb_build_object('id', :job, 'ok', true))) AS applied_again;
SELECT herald.complete('[{"id": -1, "ok": true}]') AS unknown_applied;
\set VERBOSITY default
SELECT count(*) AS history_rows FROM herald.message_history WHERE outbox_id = :job;
-- malformed results change nothing
SELECT herald.complete('{"id": 1}');
SELECT herald.complete('[{"id": "x", "ok": true}]');
SELECT herald.complete('[{"id": 1}]');
SELECT herald.complete('[{"id": 1, "ok": false}]');
SELECT herald.complete('[{"id": 1, "ok": true, "colour": "red"}]');

-- retryable failures back off, then die; dead letters can be redriven
SELECT herald.send('q1', 'buyer@example.com', 'receipt', '{}', 'default', 'flaky') AS flaky \gset
UPDATE herald.outbox SET max_attempts = 2 WHERE id = :flaky;
SELECT count(*) AS claimed FROM herald.claim('w1', 10);
SELECT herald.complete(jsonb_build_array(jsonb_build_object('id', :flaky, 'ok', false, 'retryable', true, 'error', '451 4.3.0 try later')));
SELECT status, attempt, run_at > now() + interval '4 seconds' AS backed_off, last_error FROM herald.outbox WHERE id = :flaky;
SELECT count(*) AS not_due_yet FROM herald.claim('w1', 10);
UPDATE herald.outbox SET run_at = now() WHERE id = :flaky;
SELECT count(*) AS claimed FROM herald.claim('w1', 10);
SELECT herald.complete(jsonb_build_array(jsonb_build_object('id', :flaky, 'ok', false, 'retryable', true, 'error', '451 again')));
SELECT status, attempt FROM herald.outbox WHERE id = :flaky;
SELECT kind, dedupe_key, attempt, last_error FROM herald.dead_letters WHERE workspace_id = 'q1';
SELECT herald.redrive(ARRAY[:flaky]::bigint[]);
SELECT status, attempt FROM herald.outbox WHERE id = :flaky;
SELECT herald.redrive(ARRAY[:flaky]::bigint[]);
SELECT herald.redrive(NULL);
-- a permanent failure is final at once
SELECT count(*) AS claimed FROM herald.claim('w1', 10);
SELECT herald.complete(jsonb_build_array(jsonb_build_object('id', :flaky, 'ok', false, 'retryable', false, 'error', '550 5.1.1 no such user')));
SELECT status, last_error FROM herald.outbox WHERE id = :flaky;
SELECT status, error FROM herald.message_history WHERE outbox_id = :flaky ORDER BY id;

-- reap: an expired lease goes back to pending
SELECT herald.send('q1', 'buyer@example.com', 'receipt', '{}', 'default', 'reaped') AS reaped \gset
SELECT count(*) AS claimed FROM herald.claim('dying-worker', 10, '1 millisecond');
SELECT pg_sleep(0.01);
-- at least this job (on a loaded machine another short lease of this file may have expired too)
SELECT herald.reap() >= 1 AS reaped_some;
SELECT status, attempt, last_error FROM herald.outbox WHERE id = :reaped;
SELECT herald.reap() AS nothing_to_reap;

-- priorities: transactional (0) before automation (1) before broadcast (2), oldest first within one
SELECT herald.complete(jsonb_agg(jsonb_build_object('id', id, 'ok', true))) >= 0 AS cleared FROM herald.claim('w1', 100);
INSERT INTO herald.outbox (workspace_id, kind, priority, dedupe_key, payload)
SELECT 'q1', 'webhook', p, 'prio-' || p || '-' || i, '{}' FROM generate_series(2, 0, -1) p, generate_series(1, 2) i;
SELECT dedupe_key FROM herald.claim('w1', 4);

-- fairness: one workspace with 100,000 pending jobs and nine with 10 each; the first claim serves all ten
SELECT herald.create_workspace('big'), herald.create_workspace('small' || i) FROM generate_series(1, 9) i;
INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, payload, run_at)
SELECT 'big', 'webhook', 'big-' || i, '{}', now() - interval '1 hour' FROM generate_series(1, 100000) i;
INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, payload)
SELECT 'small' || w, 'webhook', 'small-' || i, '{}' FROM generate_series(1, 9) w, generate_series(1, 10) i;
SELECT count(DISTINCT workspace) AS workspaces_served, count(*) AS jobs,
       count(*) FILTER (WHERE workspace = 'big') AS from_big
  FROM herald.claim('w1', 100);
SELECT count(DISTINCT workspace) AS workspaces_served_next, count(*) FILTER (WHERE workspace <> 'big') AS small_jobs
  FROM herald.claim('w1', 100);
DELETE FROM herald.outbox WHERE workspace_id = 'big' OR workspace_id LIKE 'small%';

-- a backlog due later hides no due work and is handed out by no one: 'later' holds only jobs due
-- tomorrow, 'mixed' transactional jobs due tomorrow and automation jobs due now, 'both' transactional and
-- broadcast jobs due now. Only the due ones come out, priority first, then rank within the workspace
SELECT herald.create_workspace(w) FROM unnest(ARRAY['later', 'mixed', 'both']) w;
INSERT INTO herald.outbox (workspace_id, kind, priority, dedupe_key, payload, run_at)
SELECT x.w, 'webhook', x.p, x.w || '-' || x.p || '-' || i, '{}',
       CASE WHEN x.due THEN now() - interval '1 minute' ELSE now() + interval '1 day' END
  FROM (VALUES ('later', 0, false), ('later', 1, false), ('mixed', 0, false), ('mixed', 1, true),
               ('both', 0, true), ('both', 2, true)) x(w, p, due),
       generate_series(1, 2) i;
SELECT workspace, dedupe_key FROM herald.claim('w1', 100);
SELECT workspace_id, status, count(*) FROM herald.outbox WHERE workspace_id IN ('later', 'mixed', 'both')
 GROUP BY 1, 2 ORDER BY 1, 2;
DELETE FROM herald.outbox WHERE workspace_id IN ('later', 'mixed', 'both');

-- rate limits: a provider of q1 limited to 5/s; no one-second window ever holds more than 5 claims
SELECT herald.upsert_provider('q1', 'slow', 'smtp', '{"rate_per_second": 5}');
SELECT count(*) AS queued FROM (SELECT herald.send('q1', 'buyer@example.com', 'receipt', '{}', 'slow') FROM generate_series(1, 40)) s;
SELECT count(*) FILTER (WHERE provider = 'slow') AS first_claim_of_slow FROM herald.claim('w1', 100);
SELECT count(*) AS right_after FROM herald.claim('w1', 100);
DO $$
BEGIN
    FOR i IN 1 .. 30 LOOP            -- about 1.5 s of claiming every 50 ms
        PERFORM herald.claim('w1', 100);
        PERFORM pg_sleep(0.05);
    END LOOP;
END $$;
SELECT count(*) BETWEEN 10 AND 20 AS claimed_about_rate_times_seconds,
       (SELECT max(n) FROM (SELECT (SELECT count(*) FROM herald.outbox o2
                                     WHERE o2.provider = 'slow' AND o2.leased_at >= o1.leased_at
                                       AND o2.leased_at < o1.leased_at + interval '1 second') AS n
                              FROM herald.outbox o1 WHERE o1.provider = 'slow' AND o1.leased_at IS NOT NULL) w) AS max_in_any_second
  FROM herald.outbox WHERE provider = 'slow' AND leased_at IS NOT NULL;
SELECT herald.set_rate_limit('host:crm.example', 100), herald.set_rate_limit('host:crm.example', NULL);
SELECT herald.set_rate_limit('crm.example', 100);
SELECT herald.set_rate_limit('provider:x', 0);
SELECT herald.upsert_provider('q1', 'bad', 'smtp', '{"password": "hunter2"}');
SELECT herald.upsert_provider('q1', 'bad', 'pigeon');
SELECT herald.upsert_provider('q1', 'bad', 'smtp', '{"rate_per_second": 1.5}');

SELECT workspace_id, kind, status, jobs FROM herald.queue_status WHERE workspace_id = 'q1' AND status IN ('done', 'failed') ORDER BY 1, 2, 3;

-- providers: a sender or Reply-To is a mailbox (the error names the setting's JSON path), stored trimmed;
-- a refused call saves nothing
SELECT herald.create_workspace('q2');
SELECT herald.upsert_provider('q2', 'bad', 'smtp', '{"from": "Acme <news@acme>"}');
SELECT herald.upsert_provider('q2', 'bad', 'smtp', '{"reply_to": 5}');
SELECT herald.upsert_provider('q2', 'bad', 'smtp', '{"from": "Acme, Inc. <news@acme.test>"}');
SELECT herald.upsert_provider('q2', 'bad', 'smtp', '{"from": "news@acme.test", "sender": "x"}');
SELECT count(*) AS nothing_saved FROM herald.providers WHERE workspace_id = 'q2';
SELECT herald.upsert_provider('q2', 'esp', 'smtp', '{"from": " Acme <news@acme.test> ", "reply_to": "help@acme.test"}');
SELECT herald.upsert_provider('q2', 'archive', 'file', '{"from": "\"Acme, Archive\" <archive@acme.test>"}');
SELECT name, kind, settings FROM herald.providers WHERE workspace_id = 'q2' ORDER BY name;
SELECT * FROM herald.provider_kinds() WHERE workspace_id = 'q2';
-- the claim's payload: the provider's kind (none without a row), and From / Reply-To each from the
-- template, else the provider, else absent (the daemon's HERALD_FROM)
SELECT herald.upsert_template('q2', 'plain', 'Hi', '<p>x</p>');
SELECT herald.upsert_template('q2', 'signed', 'Hi', '<p>x</p>', NULL, 'Templates <t@acme.test>');
SELECT herald.send('q2', 'p1@example.com', 'plain', '{}', 'esp') > 0 AS p1, herald.send('q2', 'p2@example.com', 'signed', '{}', 'esp') > 0 AS p2,
       herald.send('q2', 'p3@example.com', 'plain', '{}', 'archive') > 0 AS p3, herald.send('q2', 'p4@example.com', 'plain') > 0 AS p4;
SELECT payload ->> 'to' AS recipient, payload ->> 'provider_kind' AS kind, payload ? 'provider_kind' AS has_kind,
       payload ->> 'from' AS sender, payload ->> 'reply_to' AS reply_to
  FROM herald.claim('w1', 10000) WHERE workspace = 'q2' ORDER BY 1;

-- oldest_snapshot (herald run's long-transaction watch): no other session of this database holds a
-- snapshot a day old; bad input is refused
SELECT count(*) <= 1 AS at_most_one FROM herald.oldest_snapshot();
SELECT count(*) AS none_a_day_old FROM herald.oldest_snapshot('1 day');
SELECT * FROM herald.oldest_snapshot('-1 second');
SELECT * FROM herald.oldest_snapshot(NULL);

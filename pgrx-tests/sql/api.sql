-- The HTTP API's side in the database (sql/api.sql): keys made, listed and revoked (the secret shown
-- once, only its hash kept), api_call checking the key and its scope, acting for the key's workspace
-- only, with the called function's own errors; idempotency keys: a replay, another request under a used
-- key refused, failures not kept, expiry after 24 hours and pruning.
\set SHOW_CONTEXT never
ALTER TABLE herald.api_keys ALTER COLUMN id RESTART WITH 7000000;
SELECT herald.create_workspace(w) FROM unnest(ARRAY['api_a', 'api_b']) w;
SELECT herald.create_api_key('api_a', 'form') AS a_key \gset
SELECT herald.create_api_key('api_b', 'theirs', ARRAY['track', 'send', 'track']) AS b_key \gset
SELECT :'a_key' ~ '^hk_[0-9]+_[0-9a-f]{64}$' AS secret_form;
-- only the hash is kept, and the listing shows no secret
SELECT count(*) AS secrets_stored FROM herald.api_keys k
 WHERE to_jsonb(k)::text LIKE '%' || right(:'a_key', 64) || '%';
SELECT k.secret_hash = sha256(convert_to(:'a_key', 'UTF8')) AS hash_kept FROM herald.api_keys k
 WHERE k.id = split_part(:'a_key', '_', 2)::bigint;
SELECT name, prefix = 'hk_' || id || '_' AS prefix_ok, scopes, created_by IS NOT NULL AS by, last_used_at, revoked_at
  FROM herald.list_api_keys('api_b');
-- bad keys made
SELECT herald.create_api_key('api_a', ' ');
SELECT herald.create_api_key('api_a', 'x', ARRAY[]::text[]);
SELECT herald.create_api_key('api_a', 'x', ARRAY['track', 'admin', NULL]);
SELECT herald.create_api_key('nowhere', 'x');

-- each operation, for the key's workspace
SELECT response ? 'id' AS has_id, replayed FROM herald.api_call(:'a_key', 'track', '{"email": "ann@example.com", "kind": "signup"}');
SELECT response, replayed FROM herald.api_call(:'a_key', 'track_many', '{"events": [{"email": "bob@example.com", "kind": "signup"}]}');
SELECT response ? 'id' AS has_id FROM herald.api_call(:'a_key', 'upsert_contact', '{"email": "ann@example.com", "attributes": {"plan": "pro"}}');
SELECT response FROM herald.api_call(:'a_key', 'upsert_contacts', '{"contacts": [{"email": "cy@example.com"}, {"email": "ann@example.com"}]}');
SELECT response FROM herald.api_call(:'a_key', 'subscribe', '{"list": "news", "emails": ["ann@example.com", "x"]}');
SELECT response FROM herald.api_call(:'a_key', 'unsubscribe', '{"list": "news", "emails": ["ann@example.com"]}');
SELECT workspace_id, count(*) FROM herald.contacts WHERE workspace_id LIKE 'api_%' GROUP BY 1 ORDER BY 1;
SELECT (SELECT last_used_at IS NOT NULL FROM herald.list_api_keys('api_a')) AS marked_used;

-- refusals: key, scope, operation, arguments (the function's own message)
SELECT * FROM herald.api_call('hk_1_' || repeat('0', 64), 'track', '{}');
SELECT * FROM herald.api_call('nonsense', 'track', '{}');
SELECT * FROM herald.api_call(NULL, 'track', '{}');
SELECT * FROM herald.api_call(:'a_key', 'send', '{"email": "ann@example.com", "template": "t"}');
SELECT * FROM herald.api_call(:'a_key', 'drop_everything', '{}');
SELECT * FROM herald.api_call(:'a_key', 'track', '[]');
SELECT * FROM herald.api_call(:'a_key', 'track', '{"email": "nope", "kind": "x"}');
SELECT * FROM herald.api_call(:'a_key', 'subscribe', '{"list": "news", "emails": "ann@example.com"}');
SELECT * FROM herald.api_call(:'b_key', 'send', '{"email": "ann@example.com", "template": "none"}');

-- idempotency: replay, conflict, failures not kept
SELECT response ? 'id' AS has_id, replayed FROM herald.api_call(:'a_key', 'track', '{"email": "dee@example.com", "kind": "paid"}', 'order-1');
SELECT replayed FROM herald.api_call(:'a_key', 'track', '{"kind": "paid", "email": "dee@example.com"}', 'order-1');
SELECT count(*) AS paid_events FROM herald.events WHERE workspace_id = 'api_a' AND kind = 'paid';
SELECT * FROM herald.api_call(:'a_key', 'track', '{"email": "dee@example.com", "kind": "refund"}', 'order-1');
SELECT * FROM herald.api_call(:'a_key', 'track_many', '{"email": "dee@example.com", "kind": "paid"}', 'order-1');
-- the same idempotency key in another workspace is another key
SELECT replayed FROM herald.api_call(:'b_key', 'track', '{"email": "dee@example.com", "kind": "paid"}', 'order-1');
SELECT * FROM herald.api_call(:'a_key', 'track', '{"email": "bad", "kind": "paid"}', 'order-2');
SELECT count(*) AS failures_kept FROM herald.api_idempotency WHERE idempotency_key = 'order-2';
SELECT * FROM herald.api_call(:'a_key', 'track', '{"email": "dee@example.com", "kind": "paid"}', '');
SELECT * FROM herald.api_call(:'a_key', 'track', '{"email": "dee@example.com", "kind": "paid"}', 'a b');
-- after 24 hours the key is new again; prune removes expired ones
UPDATE herald.api_idempotency SET created_at = now() - interval '25 hours' WHERE workspace_id = 'api_a';
SELECT replayed FROM herald.api_call(:'a_key', 'track', '{"email": "dee@example.com", "kind": "other"}', 'order-1');
UPDATE herald.api_idempotency SET created_at = now() - interval '25 hours' WHERE workspace_id = 'api_b';
SELECT herald.prune('30 days') >= 1 AS pruned;
SELECT workspace_id, idempotency_key FROM herald.api_idempotency WHERE workspace_id LIKE 'api_%' ORDER BY 1;

-- read_results: a key with the results scope reads its own workspace's results, in pages, by kind
SELECT herald.create_api_key('api_a', 'dashboard', ARRAY['results']) AS r_key \gset
SELECT herald.create_api_key('api_b', 'theirs too', ARRAY['results']) AS rb_key \gset
SELECT herald.newest_result('api_a') AS before_any \gset
INSERT INTO herald.results_staged (workspace_id, kind, contact_id, data)
SELECT w, k, i, jsonb_build_object('n', i)
  FROM unnest(ARRAY['api_a', 'api_b']) w, generate_series(1, 5) i,
       LATERAL (SELECT CASE WHEN i % 2 = 0 THEN 'email.sent' ELSE 'email.opened' END) x(k);
SELECT herald.advance_results() >= 10 AS published;
-- without after: from what is published now (nothing yet), with the cursor to go on from
SELECT response -> 'results' AS results, (response ->> 'next')::bigint = herald.newest_result('api_a') AS next_is_newest
  FROM herald.api_call(:'r_key', 'read_results', '{}');
SELECT jsonb_path_query_array(response, '$.results[*].data.n') AS page_1,
       (response ->> 'next')::bigint AS next_1
  FROM herald.api_call(:'r_key', 'read_results', jsonb_build_object('after', :before_any, 'limit', 2)) \gset
SELECT :'page_1' AS page_1;
SELECT jsonb_path_query_array(response, '$.results[*].data.n') AS page_2,
       jsonb_path_query_array(response, '$.results[*].kind') AS kinds,
       (SELECT bool_and(r ? 'id' AND r ? 'at' AND r ? 'contact_id' AND NOT r ? 'job_id')
          FROM jsonb_array_elements(response -> 'results') r) AS shape
  FROM herald.api_call(:'r_key', 'read_results', jsonb_build_object('after', :next_1, 'limit', 1000));
SELECT jsonb_path_query_array(response, '$.results[*].data.n') AS sent_only
  FROM herald.api_call(:'r_key', 'read_results', jsonb_build_object('after', :before_any, 'kinds', '["email.sent"]'::jsonb));
-- the other workspace's key reads its own five
SELECT jsonb_array_length(response -> 'results') AS theirs,
       (SELECT bool_and(NOT (r ->> 'contact_id')::bigint IS NULL) FROM jsonb_array_elements(response -> 'results') r) AS ok
  FROM herald.api_call(:'rb_key', 'read_results', jsonb_build_object('after', :before_any));
-- past the end: nothing, and the cursor stays
SELECT response FROM herald.api_call(:'r_key', 'read_results', '{"after": 999999999999}');
-- refused: a key without the scope, bad arguments, an Idempotency-Key
SELECT * FROM herald.api_call(:'a_key', 'read_results', '{}');
SELECT * FROM herald.api_call(:'r_key', 'track', '{"email": "ann@example.com", "kind": "x"}');
SELECT * FROM herald.api_call(:'r_key', 'read_results', '{"after": -1}');
SELECT * FROM herald.api_call(:'r_key', 'read_results', '{"after": "7"}');
SELECT * FROM herald.api_call(:'r_key', 'read_results', '{"after": 1.5}');
SELECT * FROM herald.api_call(:'r_key', 'read_results', '{"limit": 0}');
SELECT * FROM herald.api_call(:'r_key', 'read_results', '{"limit": 1001}');
SELECT * FROM herald.api_call(:'r_key', 'read_results', '{"kinds": "email.sent"}');
SELECT * FROM herald.api_call(:'r_key', 'read_results', '{"kinds": ["email.sent", 3]}');
SELECT * FROM herald.api_call(:'r_key', 'read_results', '{"kinds": []}');
SELECT * FROM herald.api_call(:'r_key', 'read_results', '{"kinds": ["no.such"]}');
SELECT * FROM herald.api_call(:'r_key', 'read_results', '{"from": 0}');
SELECT * FROM herald.api_call(:'r_key', 'read_results', '{}', 'poll-1');
SELECT count(*) AS kept FROM herald.api_idempotency WHERE idempotency_key = 'poll-1';
-- result subscriptions with the key: made (idempotently), listed, ended; the key's workspace only
SELECT response ? 'id' AS made, replayed FROM herald.api_call(:'r_key', 'subscribe_results',
    '{"url": "https://app.example/hooks", "kinds": ["email.sent"], "options": {"batch": 10}}', 'hook-1');
SELECT replayed FROM herald.api_call(:'r_key', 'subscribe_results',
    '{"url": "https://app.example/hooks", "kinds": ["email.sent"], "options": {"batch": 10}}', 'hook-1');
SELECT (response -> 'subscriptions' -> 0) - 'id' - 'cursor' - 'created_at' AS listed,
       jsonb_array_length(response -> 'subscriptions') AS n
  FROM herald.api_call(:'r_key', 'list_result_subscriptions', '{}');
SELECT created_by ~ '^api key [0-9]+$' AS made_by_the_key FROM herald.result_subscriptions WHERE workspace_id = 'api_a';
SELECT jsonb_array_length(response -> 'subscriptions') AS theirs FROM herald.api_call(:'rb_key', 'list_result_subscriptions', '{}');
SELECT id AS sub_id FROM herald.result_subscriptions WHERE workspace_id = 'api_a' \gset
SELECT response FROM herald.api_call(:'rb_key', 'unsubscribe_results', jsonb_build_object('id', :sub_id));
SELECT * FROM herald.api_call(:'r_key', 'subscribe_results', '{"url": "ftp://app.example/x"}');
SELECT * FROM herald.api_call(:'r_key', 'subscribe_results', '{"url": "https://app.example/x", "kinds": "email.sent"}');
SELECT * FROM herald.api_call(:'r_key', 'unsubscribe_results', '{"id": "x"}');
SELECT * FROM herald.api_call(:'r_key', 'list_result_subscriptions', '{"all": true}');
SELECT * FROM herald.api_call(:'a_key', 'list_result_subscriptions', '{}');
SELECT count(*) AS still_one FROM herald.result_subscriptions WHERE workspace_id = 'api_a';
SELECT response FROM herald.api_call(:'r_key', 'unsubscribe_results', jsonb_build_object('id', :sub_id));
SELECT response FROM herald.api_call(:'r_key', 'unsubscribe_results', jsonb_build_object('id', :sub_id));
SELECT response FROM herald.api_call(:'r_key', 'list_result_subscriptions', '{}');
-- a blocked subscription retried by the key: a failed delivery (retry_failed), a dead one (redrive)
SELECT (response ->> 'id')::bigint AS sub2 FROM herald.api_call(:'r_key', 'subscribe_results',
    '{"url": "https://app.example/hooks2", "options": {"after": 0}}') \gset
SELECT herald.advance_results() >= 0 AS advanced;
SELECT job_id AS sub2_job FROM herald.result_subscriptions WHERE id = :sub2 \gset
UPDATE herald.outbox SET status = 'failed', done_at = now(), last_error = 'HTTP 400' WHERE id = :sub2_job;
SELECT response FROM herald.api_call(:'r_key', 'retry_result_subscription', jsonb_build_object('id', :sub2));
SELECT status, attempt, done_at FROM herald.outbox WHERE id = :sub2_job;
SELECT response FROM herald.api_call(:'r_key', 'retry_result_subscription', jsonb_build_object('id', :sub2));
UPDATE herald.outbox SET status = 'dead', attempt = 20, done_at = now() WHERE id = :sub2_job;
SELECT response FROM herald.api_call(:'r_key', 'retry_result_subscription', jsonb_build_object('id', :sub2));
SELECT status, attempt FROM herald.outbox WHERE id = :sub2_job;
UPDATE herald.outbox SET status = 'done', done_at = now() WHERE id = :sub2_job;
SELECT response FROM herald.api_call(:'r_key', 'retry_result_subscription', jsonb_build_object('id', :sub2));
-- nothing to retry either way: the answer's state is the overview's (a cancelled job: blocked)
UPDATE herald.outbox SET status = 'cancelled' WHERE id = :sub2_job;
SELECT r.response, v.state AS overview_state
  FROM herald.api_call(:'r_key', 'retry_result_subscription', jsonb_build_object('id', :sub2)) r,
       herald.result_subscription_overview v WHERE v.id = :sub2;
-- another workspace's key: no such subscription (the id is the only thing that varies, so it is masked)
SELECT set_config('t.rb_key', :'rb_key', false) IS NOT NULL AS set, set_config('t.sub2', :'sub2', false) IS NOT NULL AS set2;
DO $$
BEGIN
    PERFORM herald.api_call(current_setting('t.rb_key'), 'retry_result_subscription',
                            jsonb_build_object('id', current_setting('t.sub2')::bigint));
EXCEPTION WHEN no_data_found THEN
    RAISE NOTICE 'refused (%): %', SQLSTATE, regexp_replace(SQLERRM, '[0-9]+', 'N');
END
$$;
SELECT * FROM herald.api_call(:'r_key', 'retry_result_subscription', jsonb_build_object('id', :sub2, 'now', true));
SELECT response FROM herald.api_call(:'r_key', 'unsubscribe_results', jsonb_build_object('id', :sub2));
-- api_key_workspace: the daemon's check for GET /stream
SELECT herald.api_key_workspace(:'r_key', 'results') AS workspace;
SELECT herald.api_key_workspace(:'a_key', 'results');
SELECT herald.api_key_workspace(:'a_key', 'everything');
SELECT herald.api_key_workspace('hk_1_' || repeat('0', 64), 'results');
SELECT herald.revoke_api_key('api_a', split_part(:'r_key', '_', 2)::bigint) AS revoked;
SELECT herald.api_key_workspace(:'r_key', 'results');
SELECT * FROM herald.api_call(:'r_key', 'read_results', '{}');

-- suppressions (0.18.0): a key with the scope reads whether an address is suppressed and why, adds one
-- (reason manual unless it names another), lifts one; the default scopes do not include it; another
-- workspace's suppression is not seen; an erased contact's is seen and not lifted; bad input is refused
SELECT herald.create_api_key('api_a', 'support desk', ARRAY['suppressions']) AS s_key \gset
SELECT herald.create_api_key('api_b', 'theirs too', ARRAY['suppressions']) AS sb_key \gset
SELECT response FROM herald.api_call(:'s_key', 'read_suppression', '{"email": " Gone@Example.com "}');
SELECT response, replayed FROM herald.api_call(:'s_key', 'suppress', '{"email": "gone@example.com", "detail": {"ticket": 7}}', 'sup-1');
SELECT response, replayed FROM herald.api_call(:'s_key', 'suppress', '{"email": "gone@example.com", "detail": {"ticket": 7}}', 'sup-1');
SELECT response FROM herald.api_call(:'s_key', 'suppress', '{"email": "GONE@example.com", "reason": "complaint"}');
SELECT response - 'since' AS response, (response ->> 'since')::timestamptz <= now() AS since_then
  FROM herald.api_call(:'s_key', 'read_suppression', '{"email": "gone@example.com"}');
SELECT response FROM herald.api_call(:'sb_key', 'read_suppression', '{"email": "gone@example.com"}');
SELECT workspace_id, email, reason, detail FROM herald.suppressions WHERE email = 'gone@example.com';
SELECT response FROM herald.api_call(:'s_key', 'unsuppress', '{"email": "Gone@example.com"}');
SELECT response FROM herald.api_call(:'s_key', 'unsuppress', '{"email": "gone@example.com"}');
SELECT response FROM herald.api_call(:'s_key', 'read_suppression', '{"email": "gone@example.com"}');
INSERT INTO herald.suppressions (workspace_id, email, reason) VALUES ('api_a', herald._email_key('erased@example.com'), 'erased');
SELECT response ->> 'reason' AS reason FROM herald.api_call(:'s_key', 'read_suppression', '{"email": "erased@example.com"}');
SELECT response FROM herald.api_call(:'s_key', 'unsuppress', '{"email": "erased@example.com"}');
SELECT * FROM herald.api_call(:'s_key', 'suppress', '{"email": "x@example.com", "reason": "bored"}');
SELECT * FROM herald.api_call(:'s_key', 'suppress', '{"email": "not an address"}');
SELECT * FROM herald.api_call(:'s_key', 'read_suppression', '{"email": "x@example.com", "workspace": "api_b"}');
SELECT * FROM herald.api_call(:'s_key', 'read_suppression', '{"email": 42}');
SELECT * FROM herald.api_call(:'s_key', 'read_suppression', '{"email": "x@example.com"}', 'read-1');
SELECT * FROM herald.api_call(:'s_key', 'track', '{"email": "x@example.com", "kind": "x"}');
SELECT * FROM herald.api_call(:'a_key', 'read_suppression', '{"email": "x@example.com"}');
SELECT count(*) AS suppressed_by_bad_calls FROM herald.suppressions WHERE email IN ('x@example.com', 'not an address');

-- revoking: at once, once, and only in its own workspace
SELECT herald.revoke_api_key('api_b', split_part(:'a_key', '_', 2)::bigint);
SELECT herald.revoke_api_key('api_a', split_part(:'a_key', '_', 2)::bigint) AS revoked,
       herald.revoke_api_key('api_a', split_part(:'a_key', '_', 2)::bigint) AS again;
SELECT * FROM herald.api_call(:'a_key', 'track', '{"email": "ann@example.com", "kind": "x"}') \gset
SELECT revoked_at IS NOT NULL AS revoked, revoked_by IS NOT NULL AS by FROM herald.list_api_keys('api_a');

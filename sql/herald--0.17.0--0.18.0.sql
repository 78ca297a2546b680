-- herald 0.17.0 -> 0.18.0
--   Release 0.17.0 is the SQL that landed on 2026-12-08 (commit f54a7b6), kept in
--   sql/releases/herald--0.17.0.sql. Everything since, one marked block per change:
--   Functions replaced here lose SECURITY DEFINER (CREATE OR REPLACE resets it): it is set again at
--   the end of each block.

-- ==== refused_at_send: an SMTP server's refusal of the address is a hard bounce ====
-- A 5xx reply with an X.1.* enhanced code (550 5.1.1 user unknown) failed the job and nothing more: the
-- address was not suppressed, no email.bounced event or result, and auto_pause never saw it. The daemon
-- (0.18.0) marks such a failure ("response": {"bounce": "hard"}); complete() records it through
-- _record_refusals as a provider's hard-bounce report would be, and a broadcast's counts as 'refused',
-- which auto_pause reads with the reported bounces.
CREATE FUNCTION herald._record_refusals(jobs bigint[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    INSERT INTO herald.broadcast_stats_delta (workspace_id, broadcast_id, variation, metric, n)
    SELECT o.workspace_id, o.broadcast_id, coalesce(o.variation, 'default'), 'refused', count(*)
      FROM herald.outbox o
     WHERE o.id = ANY (jobs) AND o.broadcast_id IS NOT NULL AND o.status = 'failed'
     GROUP BY 1, 2, 3;
    -- the recipient: the contact's address, or a test's to an address that is no contact
    PERFORM herald.record_feedback(f.feedback)
       FROM (SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                        'kind', 'hard_bounce', 'workspace', o.workspace_id,
                        'email', coalesce(c.email, o.payload ->> 'to'), 'message_id', o.message_id,
                        'payload', jsonb_build_object('smtp_reply', o.last_error, 'refused_at_send', true)))
                        ORDER BY o.id) AS feedback
               FROM herald.outbox o
               LEFT JOIN LATERAL (SELECT x.email FROM herald.contacts x
                                   WHERE x.workspace_id = o.workspace_id AND x.id = o.contact_id LIMIT 1) c ON true
              WHERE o.id = ANY (jobs) AND o.status = 'failed'
                AND coalesce(c.email, o.payload ->> 'to') IS NOT NULL) f
      WHERE f.feedback IS NOT NULL;
END
$$;
REVOKE ALL ON FUNCTION herald._record_refusals(bigint[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION herald._report_counts(workspace text, broadcast bigint) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, herald, pg_temp
BEGIN ATOMIC
    SELECT jsonb_build_object('sent', coalesce(sum(x.n) FILTER (WHERE x.metric = 'sent'), 0),
                              'bounced', coalesce(sum(x.n) FILTER (WHERE x.metric = 'bounced'), 0),
                              'complained', coalesce(sum(x.n) FILTER (WHERE x.metric = 'complained'), 0),
                              'refused', coalesce(sum(x.n) FILTER (WHERE x.metric = 'refused'), 0))
      FROM (SELECT s.metric, s.value AS n FROM herald.broadcast_stats s
             WHERE s.workspace_id = _report_counts.workspace AND s.broadcast_id = _report_counts.broadcast
               AND s.metric IN ('sent', 'bounced', 'complained', 'refused')
            UNION ALL
            SELECT d.metric, d.n FROM herald.broadcast_stats_delta d
             WHERE d.workspace_id = _report_counts.workspace AND d.broadcast_id = _report_counts.broadcast
               AND d.metric IN ('sent', 'bounced', 'complained', 'refused')) x;
END;

CREATE OR REPLACE FUNCTION herald._auto_pause_verdict(v herald.broadcasts) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_rule jsonb := v.definition -> 'auto_pause';
    v_now jsonb := herald._report_counts(v.workspace_id, v.id);
    v_sent bigint := (v_now ->> 'sent')::bigint - coalesce((v.auto_pause_base ->> 'sent')::bigint, 0);
    v_bounced bigint := (v_now ->> 'bounced')::bigint - coalesce((v.auto_pause_base ->> 'bounced')::bigint, 0);
    v_complained bigint := (v_now ->> 'complained')::bigint - coalesce((v.auto_pause_base ->> 'complained')::bigint, 0);
    v_refused bigint := (v_now ->> 'refused')::bigint - coalesce((v.auto_pause_base ->> 'refused')::bigint, 0);
    -- the messages handed to a receiving server: accepted, or refused as a hard bounce
    v_tried bigint := v_sent + v_refused;
    v_reason text;
    v_n bigint;
    v_of bigint;
BEGIN
    IF v_tried < (v_rule ->> 'min_sent')::bigint THEN
        RETURN NULL;
    END IF;
    IF v_complained > 0 AND v_complained * 100 >= (v_rule ->> 'complaint_percent')::numeric * v_sent THEN
        v_reason := 'complaint_percent';
        v_n := v_complained;
        v_of := v_sent;
    ELSIF v_bounced + v_refused > 0 AND (v_bounced + v_refused) * 100 >= (v_rule ->> 'bounce_percent')::numeric * v_tried THEN
        v_reason := 'bounce_percent';
        v_n := v_bounced + v_refused;
        v_of := v_tried;
    ELSE
        RETURN NULL;
    END IF;
    IF v.phase = 'done' AND NOT EXISTS (SELECT 1 FROM herald.outbox o WHERE o.broadcast_id = v.id AND o.status = 'pending') THEN
        RETURN NULL;
    END IF;
    RETURN jsonb_build_object('name', v.name, 'reason', v_reason, 'percent', round(v_n * 100.0 / v_of, 2),
                              'limit', (v_rule ->> v_reason)::numeric, 'min_sent', (v_rule ->> 'min_sent')::bigint,
                              'sent', v_sent, 'bounced', v_bounced, 'complained', v_complained, 'refused', v_refused,
                              'since_resume', v.auto_pause_base IS NOT NULL);
END
$$;

CREATE OR REPLACE FUNCTION herald.complete(results jsonb) RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
SET enable_seqscan = off    -- every table is reached by key (the job ids, the waiting enrollments): a plan
SET enable_hashjoin = off   -- cached while the outbox was small and never analysed read all of it on every
SET enable_mergejoin = off  -- call later (52 ms of 72 per complete(100) in the journey bench)
AS $$
DECLARE
    v_bad record;
    v_applied int;
    v_ignored text;
    v_woken int;
    v_refused bigint[];
BEGIN
    IF jsonb_typeof(results) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'results must be a JSON array, got %', coalesce(jsonb_typeof(results), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Example: [{"id": 17, "ok": true, "message_id": "<…>"}, {"id": 18, "ok": false, "retryable": true, "error": "451 try later"}]';
    END IF;
    SELECT t.ord - 1 AS position, herald._result_fault(t.r) AS fault INTO v_bad
      FROM jsonb_array_elements(results) WITH ORDINALITY t(r, ord)
     WHERE herald._result_fault(t.r) IS NOT NULL ORDER BY t.ord LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'results[%]: %', v_bad.position, v_bad.fault USING ERRCODE = 'invalid_parameter_value';
    END IF;

    WITH input AS (
        -- the last result for an id wins (a batch may repeat one)
        SELECT DISTINCT ON ((t.r ->> 'id')::bigint)
               (t.r ->> 'id')::bigint AS id, (t.r ->> 'ok')::boolean AS ok,
               coalesce((t.r ->> 'retryable')::boolean, false) AS retryable,
               t.r ->> 'error' AS error, t.r ->> 'message_id' AS message_id, t.r -> 'response' AS response
          FROM jsonb_array_elements(results) WITH ORDINALITY t(r, ord)
         ORDER BY (t.r ->> 'id')::bigint, t.ord DESC
    ), finished AS (
        -- one pass per job: found by id (outbox_pkey, not outbox_leased_idx with every leased job, whatever
        -- the statistics say) and changed only while it is leased, re-checked on the locked row (a job
        -- reaped or completed meanwhile is left alone). RETURNING gives the row as it is now: outcome is
        -- its new status. (A locking read first, then the update, found every row twice.)
        UPDATE herald.outbox o
           SET status = CASE WHEN i.ok THEN 'done'
                             -- a retry of a broadcast paused or cancelled meanwhile is held or cancelled, not queued
                             WHEN i.retryable AND o.attempt < o.max_attempts THEN
                                  herald._queue_status((SELECT b.status FROM herald.broadcasts b
                                                         WHERE b.workspace_id = o.workspace_id AND b.id = o.broadcast_id))
                             WHEN i.retryable THEN 'dead'
                             ELSE 'failed' END,
               run_at = CASE WHEN NOT i.ok AND i.retryable AND o.attempt < o.max_attempts
                              AND herald._queue_status((SELECT b.status FROM herald.broadcasts b
                                                         WHERE b.workspace_id = o.workspace_id AND b.id = o.broadcast_id)) = 'pending'
                             THEN now() + herald._retry_delay(o.attempt, random()) ELSE o.run_at END,
               leased_by = NULL, lease_until = NULL,
               message_id = coalesce(i.message_id, o.message_id),
               response = coalesce(i.response, o.response),
               last_error = CASE WHEN i.ok THEN o.last_error ELSE i.error END,
               -- finished unless it goes back to the queue (pending) or waits for its broadcast (held)
               done_at = CASE WHEN i.ok OR NOT i.retryable OR o.attempt >= o.max_attempts THEN now()
                              WHEN herald._queue_status((SELECT b.status FROM herald.broadcasts b
                                                          WHERE b.workspace_id = o.workspace_id AND b.id = o.broadcast_id))
                                   = 'cancelled' THEN now() END,
               updated_at = now()
          FROM input i
         WHERE o.id = i.id AND o.status IS NOT DISTINCT FROM 'leased'
        RETURNING o.workspace_id, o.id, o.kind, o.status AS outcome, o.contact_id, o.automation_id, o.enrollment_id,
                  o.broadcast_id, o.variation, o.node, o.dedupe_key, o.attempt,
                  -- only a decide job's payload is read below (its paths and cache settings): an email's
                  -- variables can be large, and a returned column is copied into every CTE that reads it
                  CASE WHEN o.kind = 'decide' THEN o.payload END AS payload, o.on_success, o.on_error,
                  i.ok, i.error, i.message_id AS new_message_id, i.response AS new_response
    ), job AS (
        -- where a finished job sends the enrollments waiting on it (a decide reply picks its path)
        SELECT j.*,
               CASE WHEN j.outcome = 'done' AND j.kind = 'decide'
                        THEN coalesce(j.payload -> 'paths' ->> (j.new_response ->> (j.payload ->> 'field')), j.payload ->> 'default')
                    WHEN j.outcome = 'done' THEN j.on_success
                    ELSE j.on_error END AS next_node
          FROM finished j
    ), history AS (
        INSERT INTO herald.message_history (workspace_id, outbox_id, kind, status, contact_id, automation_id,
                                            enrollment_id, broadcast_id, variation, node, dedupe_key, message_id, error, attempt)
        SELECT j.workspace_id, j.id, j.kind, CASE j.outcome WHEN 'done' THEN 'sent' ELSE j.outcome END,
               j.contact_id, j.automation_id, j.enrollment_id, j.broadcast_id, j.variation, j.node, j.dedupe_key, j.new_message_id,
               CASE WHEN NOT j.ok THEN j.error END, j.attempt
          FROM job j WHERE j.outcome IN ('done', 'failed', 'dead')
        RETURNING 1
    ), cache AS (
        INSERT INTO herald.decide_cache (workspace_id, request_hash, reply, expires_at)
        SELECT j.workspace_id, j.payload ->> 'request_hash', coalesce(j.new_response, 'null'),
               now() + make_interval(secs => (j.payload ->> 'cache_ttl_seconds')::float8)
          FROM job j WHERE j.kind = 'decide' AND j.outcome = 'done'
        ON CONFLICT (workspace_id, request_hash) DO UPDATE SET reply = EXCLUDED.reply, expires_at = EXCLUDED.expires_at
        RETURNING 1
    ), resolution AS (
        -- only a step's job can have enrollments waiting on it, and tick queues every step's job with the
        -- enrollment that took the step (a shared decide question: the first one that asked), so a job
        -- without one (send(), a broadcast's, a results stream's delivery) costs no probe
        SELECT j.workspace_id, j.dedupe_key, j.node, j.outcome, j.error, j.kind, j.new_response, j.next_node
          FROM job j WHERE j.outcome IN ('done', 'failed') AND j.enrollment_id IS NOT NULL
    ), waiting AS (
        -- the enrollments waiting on each finished job: one probe of enrollments_wait_job_idx per job.
        -- OFFSET 0 keeps the subquery from being flattened into a join whose order the planner picks from
        -- statistics: on tables autovacuum had not analysed yet it estimated the batch at one row and
        -- scanned every waiting enrollment once per job (1.2 s per complete(100) with 20,000 waiting).
        -- The status test is written so that no other partial index can serve the probe: with
        -- status = 'waiting' the planner could also read enrollments_due_idx (every active or waiting
        -- enrollment) and did, after an ANALYZE taken while few were waiting: 2,500 rows filtered per
        -- job, 140 ms per complete(100). wait_kind and ended_at IS NULL are what the wait index's
        -- predicate needs; status is re-checked on the row.
        SELECT r.*, w.id AS enrollment_id
          FROM resolution r
         CROSS JOIN LATERAL (SELECT x.id FROM herald.enrollments x
                              WHERE x.workspace_id = r.workspace_id AND x.wait_job = r.dedupe_key
                                AND x.wait_kind = 'job' AND x.ended_at IS NULL
                                AND x.status IS NOT DISTINCT FROM 'waiting'
                             OFFSET 0) w
    ), woken AS (
        UPDATE herald.enrollments e
           SET status = CASE WHEN r.next_node IS NOT NULL THEN 'active'
                             WHEN r.outcome = 'done' THEN 'completed' ELSE 'failed' END,
               current_node = coalesce(r.next_node, e.current_node),
               next_run_at = now(),
               context = CASE WHEN r.kind IN ('webhook', 'decide') AND r.new_response IS NOT NULL
                              THEN e.context || jsonb_build_object(r.node, r.new_response) ELSE e.context END,
               ended_at = CASE WHEN r.next_node IS NULL THEN now() END,
               exit_reason = CASE WHEN r.next_node IS NOT NULL THEN NULL
                                  WHEN r.outcome = 'done' THEN 'completed after ' || r.node
                                  ELSE format('%s failed: %s', r.node, r.error) END,
               wait_kind = NULL, wait_job = NULL, updated_at = now()
          FROM waiting r
         WHERE e.id = r.enrollment_id
           -- by id alone (enrollments_id_idx), the rest written with IS NOT DISTINCT FROM on purpose: it
           -- is not indexable, so a planner without statistics cannot drive this update from an index it
           -- guesses at one row (the partial wait index, or (workspace_id, automation_id)) and filter
           -- every waiting enrollment. Status and wait_kind are re-checked on the locked row.
           AND e.workspace_id IS NOT DISTINCT FROM r.workspace_id
           AND e.status IS NOT DISTINCT FROM 'waiting' AND e.wait_kind IS NOT DISTINCT FROM 'job'
        RETURNING e.workspace_id, e.id, e.automation_id, e.contact_id, e.status, e.current_node, e.exit_reason, e.context
    ), reported AS (
        -- the results stream (sql/results.sql): what the jobs came to, and the journeys they ended. A
        -- webhook job without an automation is the stream's own delivery: not a result.
        INSERT INTO herald.results_staged (workspace_id, kind, contact_id, automation_id, enrollment_id, broadcast_id,
                                           job_id, data)
        SELECT j.workspace_id,
               CASE WHEN j.kind <> 'email' THEN j.kind || '.answered' WHEN j.outcome = 'done' THEN 'email.sent'
                    ELSE 'email.failed' END,
               j.contact_id, j.automation_id, j.enrollment_id, j.broadcast_id, j.id,
               -- only the keys each kind has (building jsonb is most of what a result costs here)
               CASE WHEN j.outcome <> 'done'
                    THEN jsonb_build_object('status', j.outcome, 'error', j.error, 'node', j.node, 'attempt', j.attempt)
                         || CASE WHEN j.kind = 'email' THEN jsonb_build_object('variation', j.variation) ELSE '{}' END
                    WHEN j.kind = 'email'
                    THEN jsonb_build_object('message_id', j.new_message_id, 'node', j.node, 'variation', j.variation)
                    WHEN j.kind = 'decide'
                    THEN jsonb_build_object('status', 'ok', 'reply', j.new_response, 'node', j.node, 'next', j.next_node)
                    ELSE jsonb_build_object('status', 'ok', 'reply', j.new_response, 'node', j.node) END
          FROM job j
         WHERE j.outcome IN ('done', 'failed', 'dead') AND (j.kind = 'email' OR j.automation_id IS NOT NULL)
        UNION ALL
        SELECT w.workspace_id, 'enrollment.' || w.status, w.contact_id, w.automation_id, w.id, NULL, NULL,
               herald._ended_data(w.current_node, w.exit_reason, w.context)
          FROM woken w WHERE w.status IN ('completed', 'failed')
    ), counted_b AS (
        INSERT INTO herald.broadcast_stats_delta (workspace_id, broadcast_id, variation, metric, n)
        SELECT j.workspace_id, j.broadcast_id, coalesce(j.variation, 'default'),
               CASE j.outcome WHEN 'done' THEN 'sent' WHEN 'failed' THEN 'failed' WHEN 'dead' THEN 'dead'
                              WHEN 'cancelled' THEN 'cancelled' ELSE 'retried' END,
               count(*)
          FROM job j WHERE j.broadcast_id IS NOT NULL
         GROUP BY 1, 2, 3, 4
        RETURNING 1
    ), counted AS (
        INSERT INTO herald.stats_delta (workspace_id, automation_id, node, metric, n)
        SELECT s.workspace_id, s.automation_id, s.node, s.metric, count(*)
          FROM (SELECT j.workspace_id, j.automation_id, j.node,
                       CASE j.outcome WHEN 'done' THEN 'sent' WHEN 'failed' THEN 'failed' WHEN 'dead' THEN 'dead' ELSE 'retried' END AS metric
                  FROM job j WHERE j.automation_id IS NOT NULL
                UNION ALL
                SELECT w.workspace_id, w.automation_id, '', CASE w.status WHEN 'completed' THEN 'completed' ELSE 'failed' END
                  FROM woken w WHERE w.status IN ('completed', 'failed')) s
         GROUP BY 1, 2, 3, 4
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM job),
           (SELECT string_agg(i.id::text, ', ' ORDER BY i.id) FROM input i WHERE i.id NOT IN (SELECT j.id FROM job j)),
           (SELECT count(*) FROM woken w WHERE w.status = 'active'),
           -- emails the receiving server refused for good as a hard bounce (the daemon's response says
           -- "bounce": "hard"): applied now, so a repeated call does not record them twice
           (SELECT array_agg(j.id ORDER BY j.id) FROM job j
             WHERE j.kind = 'email' AND j.outcome = 'failed' AND j.new_response ->> 'bounce' = 'hard')
      INTO v_applied, v_ignored, v_woken, v_refused;

    IF v_ignored IS NOT NULL THEN
        RAISE WARNING 'complete: ignored result(s) for job(s) % (unknown, not leased, or already completed)', v_ignored;
    END IF;
    IF v_woken > 0 THEN
        PERFORM herald._request_tick();   -- coalesced (see there)
    END IF;
    IF v_refused IS NOT NULL THEN
        PERFORM herald._record_refusals(v_refused);
    END IF;
    RETURN v_applied;
END
$$;
ALTER FUNCTION herald.complete(jsonb) SECURITY DEFINER;

-- ==== api_suppressions: API keys read, add and lift suppressions ====
-- Suppressions happen by themselves (reports, and since refused_at_send a server's refusal); an
-- application holding only an API key could not see why an address gets no mail, nor lift it. A new
-- scope, suppressions (never a default), and three operations: read_suppression (a read), suppress,
-- unsuppress, served as GET/DELETE /v1/suppressions/{email} and POST /v1/suppressions.
CREATE OR REPLACE FUNCTION herald._api_scopes() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY['track', 'contacts', 'lists', 'send', 'results', 'suppressions'];

CREATE OR REPLACE FUNCTION herald._api_scope(operation text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE operation
    WHEN 'track' THEN 'track' WHEN 'track_many' THEN 'track'
    WHEN 'upsert_contact' THEN 'contacts' WHEN 'upsert_contacts' THEN 'contacts'
    WHEN 'send' THEN 'send'
    WHEN 'subscribe' THEN 'lists' WHEN 'unsubscribe' THEN 'lists'
    WHEN 'read_results' THEN 'results' WHEN 'list_result_subscriptions' THEN 'results'
    WHEN 'subscribe_results' THEN 'results' WHEN 'unsubscribe_results' THEN 'results'
    WHEN 'retry_result_subscription' THEN 'results'
    WHEN 'suppress' THEN 'suppressions' WHEN 'unsuppress' THEN 'suppressions'
    WHEN 'read_suppression' THEN 'suppressions'
END;

CREATE FUNCTION herald._api_read_suppression(workspace text, args jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_email text := herald._normalize_email(args ->> 'email');
BEGIN
    IF (args - 'email') <> '{}' THEN
        RAISE EXCEPTION 'read_suppression takes only email, got %', args - 'email'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(args -> 'email') IS DISTINCT FROM 'string' OR NOT herald._valid_email(v_email) THEN
        RAISE EXCEPTION 'email % is not a valid address', coalesce(args ->> 'email', 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- an erased contact's address is suppressed under its key (delete_contact): reason 'erased', which
    -- unsuppress does not lift
    RETURN coalesce(
        (SELECT jsonb_build_object('email', v_email, 'suppressed', true, 'reason', s.reason, 'detail', s.detail,
                                   'since', s.created_at)
           FROM herald.suppressions s
          WHERE s.workspace_id = workspace AND s.email IN (v_email, herald._email_key(v_email))
          ORDER BY s.email = v_email DESC LIMIT 1),
        jsonb_build_object('email', v_email, 'suppressed', false));
END
$$;
REVOKE ALL ON FUNCTION herald._api_read_suppression(text, jsonb) FROM PUBLIC;

CREATE OR REPLACE FUNCTION herald.api_call(secret text, operation text, args jsonb, idempotency_key text DEFAULT NULL)
RETURNS TABLE (response jsonb, replayed boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_key herald.api_keys := herald._api_key(secret);
    v_ws text := v_key.workspace_id;
    v_scope text := herald._api_scope(operation);
    v_hash bytea;
    v_claimed boolean;
    v_stored record;
    v_emails text[];
BEGIN
    IF v_scope IS NULL THEN
        RAISE EXCEPTION 'unknown API operation %', coalesce(quote_literal(operation), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT v_scope = ANY (v_key.scopes) THEN
        RAISE EXCEPTION 'API key % may not %: it lacks the scope "%"', v_key.id, operation, v_scope
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('Its scopes: %s. An admin makes a key with it: herald.create_api_key(workspace, name, ARRAY[''%s'', …]).',
                                array_to_string(v_key.scopes, ', '), v_scope);
    END IF;
    IF jsonb_typeof(args) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'the request body must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF operation IN ('read_results', 'list_result_subscriptions', 'read_suppression') THEN
        IF api_call.idempotency_key IS NOT NULL THEN
            RAISE EXCEPTION '% takes no Idempotency-Key: reading twice changes nothing', operation
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        response := CASE operation
            WHEN 'read_results' THEN herald._api_read_results(v_ws, args)
            WHEN 'read_suppression' THEN herald._api_read_suppression(v_ws, args)
            ELSE herald._api_result_subscriptions(v_ws, args) END;
        replayed := false;
        RETURN NEXT;
        RETURN;
    END IF;

    IF api_call.idempotency_key IS NOT NULL THEN
        IF api_call.idempotency_key !~ '^[!-~]{1,255}$' THEN
            RAISE EXCEPTION 'Idempotency-Key must be 1 to 255 visible ASCII characters'
                USING ERRCODE = 'invalid_parameter_value', HINT = 'A UUID is a good key.';
        END IF;
        v_hash := sha256(convert_to(operation || ' ' || args::text, 'UTF8'));
        INSERT INTO herald.api_idempotency AS i (workspace_id, idempotency_key, request_hash, response)
        VALUES (v_ws, api_call.idempotency_key, v_hash, 'null')
        ON CONFLICT ON CONSTRAINT api_idempotency_pkey DO UPDATE
           SET request_hash = EXCLUDED.request_hash, response = 'null', created_at = now()
         WHERE i.created_at < now() - interval '24 hours'   -- an expired key is a new one
        RETURNING true INTO v_claimed;
        IF v_claimed IS NULL THEN
            SELECT i.request_hash, i.response INTO v_stored FROM herald.api_idempotency i
             WHERE i.workspace_id = v_ws AND i.idempotency_key = api_call.idempotency_key;
            IF v_stored.request_hash IS DISTINCT FROM v_hash THEN
                RAISE EXCEPTION 'Idempotency-Key % was used for another request', quote_literal(api_call.idempotency_key)
                    USING ERRCODE = 'unique_violation',
                          DETAIL = 'A key stands for one request (operation and body) for 24 hours.',
                          HINT = 'Use a new key for a new request.';
            END IF;
            response := v_stored.response;
            replayed := true;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;

    IF operation IN ('subscribe', 'unsubscribe') THEN
        IF jsonb_typeof(args -> 'emails') IS DISTINCT FROM 'array'
           OR EXISTS (SELECT 1 FROM jsonb_array_elements(args -> 'emails') e WHERE jsonb_typeof(e) <> 'string') THEN
            RAISE EXCEPTION 'emails must be a JSON array of strings' USING ERRCODE = 'invalid_parameter_value',
                HINT = 'Example: {"emails": ["ann@example.com"]}, or {"email": "ann@example.com"}.';
        END IF;
        v_emails := ARRAY(SELECT jsonb_array_elements_text(args -> 'emails'));
    END IF;

    response := CASE operation
        WHEN 'track' THEN
            jsonb_build_object('id', herald.track(v_ws, args ->> 'email', args ->> 'kind', coalesce(args -> 'payload', '{}')))
        WHEN 'track_many' THEN
            jsonb_build_object('accepted', herald.track_many(v_ws, args -> 'events'))
        WHEN 'upsert_contact' THEN
            jsonb_build_object('id', herald.upsert_contact(v_ws, args ->> 'email', coalesce(args -> 'attributes', '{}')))
        WHEN 'upsert_contacts' THEN
            (SELECT to_jsonb(u) FROM herald.upsert_contacts(v_ws, args -> 'contacts') u)
        WHEN 'send' THEN
            jsonb_build_object('id', herald.send(v_ws, args ->> 'email', args ->> 'template',
                                                 coalesce(args -> 'context', '{}'),
                                                 coalesce(args ->> 'provider', 'default'), args ->> 'dedupe_key'))
        WHEN 'subscribe' THEN
            (SELECT to_jsonb(s) FROM herald.subscribe(v_ws, args ->> 'list', v_emails) s)
        WHEN 'unsubscribe' THEN
            (SELECT to_jsonb(s) FROM herald.unsubscribe(v_ws, args ->> 'list', v_emails) s)
        WHEN 'subscribe_results' THEN
            jsonb_build_object('id', herald.subscribe_results(v_ws, args ->> 'url', herald._api_kinds(args -> 'kinds'),
                                                              coalesce(args -> 'options', '{}')))
        WHEN 'unsubscribe_results' THEN
            jsonb_build_object('unsubscribed', herald.unsubscribe_results(v_ws, herald._api_id(args -> 'id')))
        WHEN 'retry_result_subscription' THEN
            herald._api_retry_subscription(v_ws, args)
        WHEN 'suppress' THEN
            jsonb_build_object('added', herald.suppress(v_ws, args ->> 'email', coalesce(args ->> 'reason', 'manual'),
                                                        coalesce(args -> 'detail', '{}')))
        WHEN 'unsuppress' THEN
            jsonb_build_object('removed', herald.unsuppress(v_ws, args ->> 'email'))
    END;
    IF operation = 'subscribe_results' THEN   -- who made it: the key (the caller is the daemon's role)
        UPDATE herald.result_subscriptions s SET created_by = format('api key %s', v_key.id)
         WHERE s.workspace_id = v_ws AND s.id = (response ->> 'id')::bigint;
    END IF;
    replayed := false;
    IF api_call.idempotency_key IS NOT NULL THEN
        UPDATE herald.api_idempotency i SET response = api_call.response
         WHERE i.workspace_id = v_ws AND i.idempotency_key = api_call.idempotency_key;
    END IF;
    RETURN NEXT;
END
$$;
ALTER FUNCTION herald.api_call(text, text, jsonb, text) SECURITY DEFINER;

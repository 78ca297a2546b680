-- herald 0.15.0 -> 0.16.0
--   Release 0.15.0 is the SQL that landed on 2026-12-07 (commit 4d8f852), kept in
--   sql/releases/herald--0.15.0.sql. Everything since, one marked block per change:
--   Functions replaced here lose SECURITY DEFINER (CREATE OR REPLACE resets it): it is set again at
--   the end of each block.

-- ==== results_scope: API keys may read and subscribe to the workspace's results ====
-- A new key scope, results (never a default); api_call's read_results (GET /v1/results: after, kinds,
-- limit), list_result_subscriptions (GET /v1/results/subscriptions), subscribe_results,
-- unsubscribe_results and retry_result_subscription (POST / DELETE /v1/results/subscriptions[/{id}],
-- POST /v1/results/subscriptions/{id}/retry); api_key_workspace(secret, scope) gives the daemon a
-- key's workspace for GET /stream, asked again while it streams.
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
END;

CREATE OR REPLACE FUNCTION herald.create_api_key(workspace text, name text,
                                      scopes text[] DEFAULT ARRAY['track', 'contacts', 'lists'])
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_secret text := replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
    v_id bigint;
    v_bad text;
BEGIN
    PERFORM herald._require_workspace(workspace);
    IF name IS NULL OR btrim(name) = '' OR length(name) > 200 THEN
        RAISE EXCEPTION 'invalid API key name %', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value', DETAIL = 'A key''s name is 1 to 200 characters, e.g. ''signup form''.';
    END IF;
    IF scopes IS NULL OR cardinality(scopes) = 0 THEN
        RAISE EXCEPTION 'an API key needs at least one scope'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Scopes: track, contacts, lists, send, results.';
    END IF;
    SELECT string_agg(quote_nullable(s), ', ') INTO v_bad
      FROM unnest(scopes) s WHERE s IS NULL OR s NOT IN ('track', 'contacts', 'lists', 'send', 'results');
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown API key scope(s) %', v_bad
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Scopes: track, contacts, lists, send, results.';
    END IF;
    INSERT INTO herald.api_keys (workspace_id, name, scopes, secret_hash, created_by)
    VALUES (workspace, btrim(name), ARRAY(SELECT DISTINCT s FROM unnest(scopes) s ORDER BY 1),
            '\x00', herald._caller())
    RETURNING id INTO v_id;
    v_secret := 'hk_' || v_id || '_' || v_secret;
    UPDATE herald.api_keys k SET secret_hash = sha256(convert_to(v_secret, 'UTF8')) WHERE k.id = v_id;
    RETURN v_secret;
END
$$;

CREATE FUNCTION herald._api_kinds(kinds jsonb) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF coalesce(jsonb_typeof(kinds), 'null') = 'null' THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(kinds) <> 'array'
       OR EXISTS (SELECT 1 FROM jsonb_array_elements(kinds) e WHERE jsonb_typeof(e) <> 'string') THEN
        RAISE EXCEPTION 'kinds must be an array of result kinds, got %', kinds
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Example: ["email.sent", "email.bounced"]; leave it out for every kind.';
    END IF;
    RETURN ARRAY(SELECT jsonb_array_elements_text(kinds));
END
$$;

CREATE FUNCTION herald._api_result_subscriptions(workspace text, args jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF args <> '{}' THEN
        RAISE EXCEPTION 'list_result_subscriptions takes no arguments, got %', args
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN jsonb_build_object('subscriptions', coalesce(
        (SELECT jsonb_agg(jsonb_build_object('id', s.id, 'url', s.url, 'kinds', s.kinds, 'options', s.options,
                                             'cursor', s.cursor, 'state', s.state, 'last_error', s.last_error,
                                             'created_at', s.created_at) ORDER BY s.id)
           FROM herald.result_subscription_overview s WHERE s.workspace_id = workspace), '[]'));
END
$$;

CREATE FUNCTION herald._api_retry_subscription(workspace text, args jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_id bigint := herald._api_id(args -> 'id');
    v_job bigint;
    v_status text;
    v_found boolean;
BEGIN
    IF (args - 'id') <> '{}' THEN
        RAISE EXCEPTION 'unknown retry_result_subscription argument(s) %',
                        (SELECT string_agg(quote_literal(k), ', ' ORDER BY k) FROM jsonb_object_keys(args - 'id') k)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'It takes the subscription''s id only.';
    END IF;
    SELECT true, s.job_id, o.status INTO v_found, v_job, v_status
      FROM herald.result_subscriptions s
      LEFT JOIN herald.outbox o ON o.workspace_id = s.workspace_id AND o.id = s.job_id
     WHERE s.workspace_id = _api_retry_subscription.workspace AND s.id = v_id
       FOR UPDATE OF s;   -- one retry at a time; advance_results queues its next batch after it
    IF v_found IS NULL THEN
        RAISE EXCEPTION 'unknown result subscription %', v_id
            USING ERRCODE = 'no_data_found', HINT = 'GET /v1/results/subscriptions lists the key''s workspace''s.';
    END IF;
    IF v_status = 'dead' THEN
        PERFORM herald.redrive(ARRAY[v_job]);
    ELSIF v_status = 'failed' THEN
        PERFORM herald.retry_failed(workspace, jsonb_build_object('ids', jsonb_build_array(v_job)));
    ELSE
        RETURN jsonb_build_object('retried', false,
                                  'state', CASE WHEN v_status IS NULL OR v_status = 'done' THEN 'idle' ELSE 'delivering' END);
    END IF;
    RETURN jsonb_build_object('retried', true, 'state', 'delivering');
END
$$;

CREATE FUNCTION herald._api_read_results(workspace text, args jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_after bigint;
    v_limit int := 100;
    v_kinds text[];
    v_bad text;
BEGIN
    SELECT string_agg(quote_literal(k), ', ' ORDER BY k) INTO v_bad
      FROM jsonb_object_keys(args) k WHERE k NOT IN ('after', 'kinds', 'limit');
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown read_results argument(s) %', v_bad
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Arguments: after, kinds, limit.';
    END IF;
    IF jsonb_typeof(args -> 'after') = 'number' AND (args ->> 'after') ~ '^[0-9]{1,18}$' THEN
        v_after := (args ->> 'after')::bigint;
    ELSIF coalesce(jsonb_typeof(args -> 'after'), 'null') = 'null' THEN
        v_after := herald.newest_result(workspace);
    ELSE
        RAISE EXCEPTION 'after must be a result id (a whole number, 0 for every result kept), got %', args -> 'after'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass the "next" of the previous answer; leave it out to start at what is published now.';
    END IF;
    IF jsonb_typeof(args -> 'limit') = 'number' AND (args ->> 'limit') ~ '^[0-9]{1,4}$'
       AND (args ->> 'limit')::int BETWEEN 1 AND 1000 THEN
        v_limit := (args ->> 'limit')::int;
    ELSIF coalesce(jsonb_typeof(args -> 'limit'), 'null') <> 'null' THEN
        RAISE EXCEPTION 'limit must be a whole number from 1 to 1000, got %', args -> 'limit'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_kinds := herald._api_kinds(args -> 'kinds');
    PERFORM herald._check_result_kinds(v_kinds);
    -- to_jsonb of an array of jsonb: ~15% less than jsonb_agg, which walks each value into its state
    RETURN (SELECT jsonb_build_object('results', coalesce(to_jsonb(array_agg(herald._result_json(r) ORDER BY r.id)), '[]'),
                                      'next', coalesce(max(r.id), v_after))
              FROM herald._results_after(workspace, v_after, v_limit, v_kinds) r);
END
$$;

CREATE FUNCTION herald._api_id(id jsonb) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF jsonb_typeof(id) = 'number' AND (id #>> '{}') ~ '^[0-9]{1,18}$' THEN
        RETURN (id #>> '{}')::bigint;
    END IF;
    RAISE EXCEPTION 'id must be a subscription id (a whole number), got %', coalesce(id::text, 'nothing')
        USING ERRCODE = 'invalid_parameter_value';
END
$$;

CREATE FUNCTION herald.api_key_workspace(secret text, scope text) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_key herald.api_keys := herald._api_key(secret);
BEGIN
    IF scope IS NULL OR NOT scope = ANY (ARRAY['track', 'contacts', 'lists', 'send', 'results']) THEN
        RAISE EXCEPTION 'unknown API key scope %', coalesce(quote_literal(scope), 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Scopes: track, contacts, lists, send, results.';
    END IF;
    IF NOT scope = ANY (v_key.scopes) THEN
        RAISE EXCEPTION 'API key % lacks the scope "%"', v_key.id, scope
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('Its scopes: %s. An admin makes a key with it: herald.create_api_key(workspace, name, ARRAY[''%s'', …]).',
                                array_to_string(v_key.scopes, ', '), scope);
    END IF;
    RETURN v_key.workspace_id;
END
$$;

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
    IF operation IN ('read_results', 'list_result_subscriptions') THEN
        IF api_call.idempotency_key IS NOT NULL THEN
            RAISE EXCEPTION '% takes no Idempotency-Key: reading twice changes nothing', operation
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        response := CASE operation
            WHEN 'read_results' THEN herald._api_read_results(v_ws, args)
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

ALTER FUNCTION herald.create_api_key(text, text, text[]) SECURITY DEFINER;
ALTER FUNCTION herald.api_call(text, text, jsonb, text) SECURITY DEFINER;
ALTER FUNCTION herald.api_key_workspace(text, text) SECURITY DEFINER;
REVOKE ALL ON FUNCTION herald._api_kinds(jsonb), herald._api_result_subscriptions(text, jsonb),
    herald._api_retry_subscription(text, jsonb), herald._api_read_results(text, jsonb), herald._api_id(jsonb),
    herald.api_key_workspace(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION herald.api_key_workspace(text, text) TO herald_worker, herald_admin;

-- ==== result_subscription_cap: at most herald.max_result_subscriptions (default 100) per workspace ====
-- Every advance_results round looks at each subscription; API keys with the results scope may now
-- subscribe, so a workspace's count is bounded (a tenant or a leaked key cannot slow the round for all).
CREATE OR REPLACE FUNCTION herald.subscribe_results(workspace text, url text, kinds text[], options jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_options jsonb;
    v_id bigint;
    v_setting text := nullif(btrim(current_setting('herald.max_result_subscriptions', true)), '');
    v_max int;
BEGIN
    PERFORM herald._require_workspace(workspace);
    PERFORM herald._check_result_kinds(kinds);
    v_options := herald._check_subscription(url, options);
    -- a workspace's subscriptions are bounded: every advance_results round looks at each one, so one
    -- tenant (or a leaked key with the results scope) must not make that round slow for all
    IF v_setting IS NOT NULL AND v_setting !~ '^[0-9]{1,9}$' THEN
        RAISE EXCEPTION 'setting herald.max_result_subscriptions must be a whole number, got %', quote_literal(v_setting)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Fix it with ALTER DATABASE … SET herald.max_result_subscriptions = 100, or RESET it.';
    END IF;
    v_max := coalesce(v_setting::int, 100);
    -- two subscribing at once count one after the other
    PERFORM pg_advisory_xact_lock(hashtext('herald.subscribe_results'), hashtext(workspace));
    IF (SELECT count(*) FROM herald.result_subscriptions s WHERE s.workspace_id = subscribe_results.workspace) >= v_max THEN
        RAISE EXCEPTION 'workspace % has % result subscriptions, the most allowed', quote_literal(workspace), v_max
            USING ERRCODE = 'check_violation',
                  HINT = 'End one (herald.unsubscribe_results, DELETE /v1/results/subscriptions/<id>), or raise the database setting herald.max_result_subscriptions.';
    END IF;
    INSERT INTO herald.result_subscriptions (workspace_id, url, kinds, options, cursor, created_by)
    VALUES (workspace, url, (SELECT array_agg(DISTINCT k ORDER BY k) FROM unnest(kinds) k), v_options - 'after' - 'url',
            coalesce((v_options ->> 'after')::bigint, herald.newest_result(workspace)),
            herald._caller())
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

ALTER FUNCTION herald.subscribe_results(text, text, text[], jsonb) SECURITY DEFINER;

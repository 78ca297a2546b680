-- herald: the HTTP API's side in the database (issue 13). The daemon serves /v1/… (sidecar/src/run/http/api/)
-- and makes ONE call per request: herald.api_call(secret, operation, args, idempotency_key), which
-- checks the key, claims the idempotency key, runs the existing SQL function the operation names
-- (track, track_many, upsert_contact, upsert_contacts, send, subscribe, unsubscribe, read_results,
-- subscribe_results, unsubscribe_results, retry_result_subscription, list_result_subscriptions,
-- suppress, unsuppress, read_suppression) for
-- the key's workspace, and stores the answer for a retry: one statement, one transaction.
--
-- Keys: the secret `hk_<id>_<64 hex>` is shown once, by create_api_key; the table keeps its SHA-256
-- only. 244 random bits (two gen_random_uuid: pg_strong_random), so a plain SHA-256 is enough (no
-- salt or slow hash: nothing to brute-force). Lookup by the id in the secret, then the hashes are
-- compared: a timing difference tells nothing (the attacker does not know the stored hash).

CREATE TABLE herald.api_keys (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,   -- the id is in the secret: found without the workspace
    workspace_id text NOT NULL,
    name         text NOT NULL,
    scopes       text[] NOT NULL,
    secret_hash  bytea NOT NULL,        -- sha256 of the whole secret; the secret itself is never stored
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   name NOT NULL,
    last_used_at timestamptz,           -- kept to the minute (see _api_key)
    revoked_at   timestamptz,
    revoked_by   name
);
CREATE INDEX api_keys_workspace_idx ON herald.api_keys (workspace_id, id);

-- Idempotency-Key: the first request with a key (per workspace) runs and its answer is kept 24 hours;
-- the same key with the same operation and arguments gets that answer again without running; with
-- others, an error (409). Only answers of requests that succeeded are kept: a request that failed
-- changed nothing, so running it again is safe. Pruned by herald.prune (after 24 hours).
CREATE TABLE herald.api_idempotency (
    workspace_id    text NOT NULL,
    idempotency_key text NOT NULL,
    request_hash    bytea NOT NULL,     -- sha256 of operation and arguments (jsonb's text: key order does not count)
    response        jsonb NOT NULL,     -- ids and counts only, never an address
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, idempotency_key)
);

SELECT pg_catalog.pg_extension_config_dump('herald.api_keys', '');
SELECT pg_catalog.pg_extension_config_dump('herald.api_idempotency', '');
SELECT pg_catalog.pg_extension_config_dump('herald.api_keys_id_seq', '');

-- The scopes a key may have (create_api_key checks a new key's against them, api_key_workspace the
-- one it is asked about).
CREATE FUNCTION herald._api_scopes() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY['track', 'contacts', 'lists', 'send', 'results', 'suppressions'];

CREATE FUNCTION herald._api_scopes_hint() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'Scopes: ' || array_to_string(herald._api_scopes(), ', ') || '.';

-- The scope each operation needs.
CREATE FUNCTION herald._api_scope(operation text) RETURNS text
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

-- Creates an API key for `workspace` and returns its secret: shown this once, stored only as a hash.
-- scopes: any of track (/v1/track, /v1/track/batch), contacts (/v1/contacts, /v1/contacts/batch),
-- lists (/v1/lists/…), send (/v1/send), results (GET /v1/results, GET /stream,
-- /v1/results/subscriptions: the workspace's results, which carry contact ids, replies and contexts),
-- suppressions (/v1/suppressions: whether an address is suppressed and why, add one, lift one).
-- By default track, contacts and lists: a key that ends up in a browser can then neither mail anyone
-- nor read what herald did. herald_admin.
CREATE FUNCTION herald.create_api_key(workspace text, name text,
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
            USING ERRCODE = 'invalid_parameter_value', HINT = herald._api_scopes_hint();
    END IF;
    SELECT string_agg(quote_nullable(s), ', ') INTO v_bad
      FROM unnest(scopes) s WHERE s IS NULL OR NOT s = ANY (herald._api_scopes());
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown API key scope(s) %', v_bad
            USING ERRCODE = 'invalid_parameter_value', HINT = herald._api_scopes_hint();
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

-- Revokes a key of `workspace` (at once: every request checks the key). True when it was live;
-- false when it was revoked already. herald_admin.
CREATE FUNCTION herald.revoke_api_key(workspace text, key_id bigint) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_revoked timestamptz;
BEGIN
    PERFORM herald._require_workspace(workspace);
    SELECT k.revoked_at INTO v_revoked FROM herald.api_keys k
     WHERE k.id = key_id AND k.workspace_id = workspace FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown API key % in workspace %', coalesce(key_id::text, 'NULL'), quote_literal(workspace)
            USING ERRCODE = 'no_data_found', HINT = 'herald.list_api_keys(workspace) shows the keys.';
    END IF;
    IF v_revoked IS NOT NULL THEN
        RETURN false;
    END IF;
    UPDATE herald.api_keys k SET revoked_at = now(), revoked_by = herald._caller() WHERE k.id = key_id;
    RETURN true;
END
$$;

-- A workspace's keys, without their secrets (`prefix` is the start of the secret, to tell keys
-- apart). herald_admin.
CREATE FUNCTION herald.list_api_keys(workspace text)
RETURNS TABLE (id bigint, name text, prefix text, scopes text[], created_at timestamptz, created_by name,
               last_used_at timestamptz, revoked_at timestamptz, revoked_by name)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    PERFORM herald._require_workspace(workspace);
    RETURN QUERY
    SELECT k.id, k.name, 'hk_' || k.id || '_', k.scopes, k.created_at, k.created_by, k.last_used_at,
           k.revoked_at, k.revoked_by
      FROM herald.api_keys k WHERE k.workspace_id = workspace ORDER BY k.id;
END
$$;

-- The key a secret belongs to, or an error (invalid_authorization_specification: the daemon answers
-- 401). Marks it used, at most once a minute and never waiting: a request that finds the key's row
-- locked by another request's mark skips it (a mark per request would queue every request of a busy
-- key behind one row lock).
CREATE FUNCTION herald._api_key(secret text) RETURNS herald.api_keys
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_key herald.api_keys;
    v_id bigint;
BEGIN
    IF secret ~ '^hk_[0-9]{1,18}_[0-9a-f]{64}$' THEN
        v_id := split_part(secret, '_', 2)::bigint;
        SELECT * INTO v_key FROM herald.api_keys k
         WHERE k.id = v_id AND k.secret_hash = sha256(convert_to(secret, 'UTF8'));
    END IF;
    IF v_key.id IS NULL THEN
        RAISE EXCEPTION 'unknown API key'
            USING ERRCODE = 'invalid_authorization_specification',
                  HINT = 'Send Authorization: Bearer hk_…, a key made by herald.create_api_key(workspace, name).';
    END IF;
    IF v_key.revoked_at IS NOT NULL THEN
        RAISE EXCEPTION 'API key % was revoked', v_key.id
            USING ERRCODE = 'invalid_authorization_specification',
                  HINT = 'Ask an admin for a new key (herald.create_api_key).';
    END IF;
    IF v_key.last_used_at IS NULL OR v_key.last_used_at < now() - interval '1 minute' THEN
        UPDATE herald.api_keys k SET last_used_at = now()
         WHERE k.id = (SELECT l.id FROM herald.api_keys l WHERE l.id = v_key.id FOR UPDATE SKIP LOCKED);
    END IF;
    RETURN v_key;
END
$$;

-- An API request's `kinds`: a JSON array of strings as text[], or NULL (absent or null: every kind).
-- The names are checked by _check_result_kinds where they are used.
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

-- A workspace's result subscriptions for an API key: {"subscriptions": [{id, url, kinds, options,
-- cursor, state, last_error, created_at}]}, from result_subscription_overview (state: idle,
-- delivering, or blocked until retried: retry_result_subscription, or an admin's redrive). Called by
-- api_call only.
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

-- read_suppression for an API key: whether `email` is suppressed in the workspace, and why:
-- {"email", "suppressed": true, "reason", "detail", "since"} or {"email", "suppressed": false}, the
-- address as suppress() stores it (trimmed, lower-cased). Called by api_call only.
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

-- retry_result_subscription for an API key: a subscription that is blocked (its delivery failed for
-- good, or ran out of attempts) delivers again from the same batch, attempts reset, as an admin's
-- herald.retry_failed / herald.redrive of its job would. {"retried": true, "state": "delivering"}, or
-- false with its state as result_subscription_overview gives it when there is nothing to retry. An
-- unknown id is no_data_found. Called by api_call only.
CREATE FUNCTION herald._api_retry_subscription(workspace text, args jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_id bigint := herald._api_id(args -> 'id');
    v_job bigint;
    v_status text;
    v_state text;
BEGIN
    IF (args - 'id') <> '{}' THEN
        RAISE EXCEPTION 'unknown retry_result_subscription argument(s) %',
                        (SELECT string_agg(quote_literal(k), ', ' ORDER BY k) FROM jsonb_object_keys(args - 'id') k)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'It takes the subscription''s id only.';
    END IF;
    -- one retry at a time; advance_results queues its next batch after it
    PERFORM FROM herald.result_subscriptions s
      WHERE s.workspace_id = _api_retry_subscription.workspace AND s.id = v_id
        FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown result subscription %', v_id
            USING ERRCODE = 'no_data_found', HINT = 'GET /v1/results/subscriptions lists the key''s workspace''s.';
    END IF;
    SELECT v.job_id, v.job_status, v.state INTO v_job, v_status, v_state
      FROM herald.result_subscription_overview v
     WHERE v.workspace_id = _api_retry_subscription.workspace AND v.id = v_id;
    IF v_status = 'dead' THEN
        PERFORM herald.redrive(ARRAY[v_job]);
    ELSIF v_status = 'failed' THEN
        PERFORM herald.retry_failed(workspace, jsonb_build_object('ids', jsonb_build_array(v_job)));
    ELSE
        RETURN jsonb_build_object('retried', false, 'state', v_state);
    END IF;
    RETURN jsonb_build_object('retried', true, 'state', 'delivering');
END
$$;

-- read_results for an API key: {"results": [results as _result_json, in id order], "next": the cursor
-- to pass as the next call's after}. args: after (a result id; 0 reads from the oldest kept; absent
-- or null: from the newest published now, as GET /stream starts), kinds (an array of kinds, or
-- absent/null for every kind), limit (1 to 1000, default 100: an answer stays around a megabyte).
-- Read through _results_after like read_results. Called by api_call only.
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

-- An API request's id (a subscription's): a whole JSON number, or an error naming what came.
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

-- The workspace of an API key that has `scope`, or the error api_call would give (unknown or revoked
-- key: invalid_authorization_specification; scope lacking: insufficient_privilege). For what the
-- daemon serves outside api_call with a key: GET /stream, which asks again while it streams, so a
-- revoked key stops reading. herald_worker (the daemon) and herald_admin.
CREATE FUNCTION herald.api_key_workspace(secret text, scope text) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_key herald.api_keys := herald._api_key(secret);
BEGIN
    IF scope IS NULL OR NOT scope = ANY (herald._api_scopes()) THEN
        RAISE EXCEPTION 'unknown API key scope %', coalesce(quote_literal(scope), 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = herald._api_scopes_hint();
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

-- One API request: the key's check, the idempotency claim, the operation for the key's workspace (the
-- workspace never comes from the request), the answer kept for a retry. Returns the answer and
-- whether it is a replay of a stored one. Errors are the operation's own (same message, hint and
-- SQLSTATE as when called from SQL); the daemon maps them to HTTP statuses.
--
-- Two requests with the same Idempotency-Key at once: the second's INSERT waits on the first's
-- uncommitted row, then finds it (committed: the stored answer is returned) or not (rolled back:
-- it runs). So a request runs once however many copies arrive together.
--
-- `args`: track {email, kind, payload}; track_many {events}; upsert_contact {email, attributes};
-- upsert_contacts {contacts}; send {email, template, context, provider, dedupe_key}; subscribe and
-- unsubscribe {list, emails}; read_results {after, kinds, limit} and list_result_subscriptions {}
-- (reads: no Idempotency-Key, nothing kept); subscribe_results {url, kinds, options};
-- unsubscribe_results {id}; retry_result_subscription {id}; suppress {email, reason (default manual),
-- detail}; unsuppress {email}; read_suppression {email} (a read). herald_worker (the daemon) and
-- herald_admin.
CREATE FUNCTION herald.api_call(secret text, operation text, args jsonb, idempotency_key text DEFAULT NULL)
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

-- herald 0.16.0 -> 0.17.0
--   Release 0.16.0 is the SQL that landed on 2026-12-07 (commit c984833), kept in
--   sql/releases/herald--0.16.0.sql. Everything since, one marked block per change:
--   Functions replaced here lose SECURITY DEFINER (CREATE OR REPLACE resets it): it is set again at
--   the end of each block.

-- ==== api_scopes: the list of API key scopes in one place ====
-- create_api_key and api_key_workspace each wrote the list of scopes and the hint naming them;
-- _api_scopes() holds it once (a scope added later is added there).
CREATE FUNCTION herald._api_scopes() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY['track', 'contacts', 'lists', 'send', 'results'];

CREATE FUNCTION herald._api_scopes_hint() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'Scopes: ' || array_to_string(herald._api_scopes(), ', ') || '.';

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

CREATE OR REPLACE FUNCTION herald.api_key_workspace(secret text, scope text) RETURNS text
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

ALTER FUNCTION herald.create_api_key(text, text, text[]) SECURITY DEFINER;
ALTER FUNCTION herald.api_key_workspace(text, text) SECURITY DEFINER;
REVOKE ALL ON FUNCTION herald._api_scopes(), herald._api_scopes_hint() FROM PUBLIC;

-- ==== retry_state: retry_result_subscription answers the overview's state ====
-- When there is nothing to retry, the answer's state is result_subscription_overview's (a
-- subscription whose job was cancelled is "blocked" there; the retry called it "delivering").
CREATE OR REPLACE FUNCTION herald._api_retry_subscription(workspace text, args jsonb) RETURNS jsonb
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

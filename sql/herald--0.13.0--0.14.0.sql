-- herald 0.13.0 -> 0.14.0
--   Release 0.13.0 is the SQL that landed on 2026-12-07 (commit 78d3814), kept in
--   sql/releases/herald--0.13.0.sql. Everything since, one marked block per change:
--   Functions replaced here lose SECURITY DEFINER (CREATE OR REPLACE resets it): it is set again at
--   the end of each block.

-- ==== api_calls: many API requests in one transaction, each in its own subtransaction ====
-- The daemon coalesces single-item /v1/track, /v1/contacts and /v1/send requests that arrive
-- together into one call (one commit for many); new function, invoker's rights over api_call.
-- Many API requests in one transaction: the daemon coalesces the single-item requests that arrive
-- together (/v1/track, /v1/contacts, /v1/send) into one call, so they share one commit (a WAL
-- flush) and one round trip instead of one each. Each request runs as herald.api_call in a
-- subtransaction of its own: one that fails (an unknown key, a bad value, a deadlock) fails alone,
-- with its own error, and changes nothing; the others stand. `requests`: a JSON array of
-- {"secret", "operation", "args", "idempotency_key"}; the answer is an array in the same order,
-- each {"response": …, "replayed": bool} or {"error": {"code", "message", "detail", "hint"}}.
-- At most 64 requests: a backend keeps the ids of 64 subtransactions in shared memory, and more
-- would make every other session's snapshots slower while the call runs. herald_worker and herald_admin.
CREATE FUNCTION herald.api_calls(requests jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off
AS $$
DECLARE
    v_request jsonb;
    v_answer jsonb;
    v_answers jsonb[] := '{}';
    v_code text;
    v_message text;
    v_detail text;
    v_hint text;
BEGIN
    IF jsonb_typeof(requests) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'requests must be a JSON array' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Example: [{"secret": "hk_…", "operation": "track", "args": {"email": "ann@example.com", "kind": "signup"}}].';
    END IF;
    IF jsonb_array_length(requests) > 64 THEN
        RAISE EXCEPTION 'at most 64 requests per call, got %', jsonb_array_length(requests)
            USING ERRCODE = 'program_limit_exceeded', HINT = 'Split them into several calls.';
    END IF;
    -- one subtransaction per request is the point (each answered on its own terms), not a set to
    -- process as one: what the requests share is the commit
    FOR v_request IN SELECT r FROM jsonb_array_elements(requests) r LOOP
        BEGIN
            IF jsonb_typeof(v_request) IS DISTINCT FROM 'object' THEN
                RAISE EXCEPTION 'each request must be a JSON object with secret, operation and args'
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            SELECT jsonb_build_object('response', c.response, 'replayed', c.replayed) INTO v_answer
              FROM herald.api_call(v_request ->> 'secret', v_request ->> 'operation', v_request -> 'args',
                                   v_request ->> 'idempotency_key') c;
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS v_code = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT,
                                    v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT;
            v_answer := jsonb_build_object('error', jsonb_build_object(
                'code', v_code, 'message', v_message,
                'detail', nullif(v_detail, ''), 'hint', nullif(v_hint, '')));
        END;
        v_answers := v_answers || v_answer;
    END LOOP;
    RETURN to_jsonb(v_answers);
END
$$;
REVOKE ALL ON FUNCTION herald.api_calls(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION herald.api_calls(jsonb) TO herald_worker, herald_admin;

-- herald 0.13.0 -> 0.14.0
--   Release 0.13.0 is the SQL that landed on 2026-12-07 (commit 78d3814), kept in
--   sql/releases/herald--0.13.0.sql. Everything since, one marked block per change:
--   Functions replaced here lose SECURITY DEFINER (CREATE OR REPLACE resets it): it is set again at
--   the end of each block.

-- ==== reserved_dedupe_keys: send() refuses the dedupe keys of herald's own jobs ====
-- Automation steps (a<automation>:e<enrollment>:…), decide questions (decide:…) and result deliveries
-- (results:…) share the outbox's dedupe index with send(); a send() under one of their keys took its
-- place, and the step's, question's or delivery's job was never made (its enrollment or result
-- subscription stuck). send() refused only b: (broadcasts).
CREATE OR REPLACE FUNCTION herald.send(workspace text, email text, template text, context jsonb DEFAULT '{}',
                            provider text DEFAULT 'default', dedupe_key text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_contact bigint;
    v_id bigint;
    v_key text := coalesce(send.dedupe_key, 'send:' || gen_random_uuid());
BEGIN
    PERFORM herald._require_workspace(workspace);
    -- first: holds the template against a concurrent delete (see there)
    PERFORM herald._refuse_archived(workspace, 'send', ARRAY[template]);
    IF NOT EXISTS (SELECT 1 FROM herald.templates t WHERE t.workspace_id = workspace AND t.key = template) THEN
        RAISE EXCEPTION 'unknown template % in workspace %', coalesce(quote_literal(template), 'NULL'), quote_literal(workspace)
            USING ERRCODE = 'no_data_found', HINT = 'Create it with herald.upsert_template(…).';
    END IF;
    IF provider IS NULL OR (provider <> 'default'
        AND NOT EXISTS (SELECT 1 FROM herald.providers p WHERE p.workspace_id = workspace AND p.name = provider)) THEN
        RAISE EXCEPTION 'unknown provider % in workspace %', coalesce(quote_literal(provider), 'NULL'), quote_literal(workspace)
            USING ERRCODE = 'no_data_found', HINT = 'Create it with herald.upsert_provider(…), or use ''default''.';
    END IF;
    IF jsonb_typeof(context) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'context must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF herald._value_fault(context) IS NOT NULL THEN
        RAISE EXCEPTION 'context %', herald._value_fault(context) USING ERRCODE = 'program_limit_exceeded';
    END IF;
    -- herald's own jobs share the outbox's dedupe index, so an application's key equal to one of
    -- theirs would take its place: the automation step's, decide question's or result delivery's job
    -- never made, its enrollment or result subscription stuck behind it (b:, broadcasts' keys, which
    -- have an index of their own: so that dedupe_key stays unique over all rows, schema.sql)
    IF v_key = '' OR v_key ~ '^(b:|results:|decide:|a[0-9]+:e[0-9]+:)' THEN
        RAISE EXCEPTION 'dedupe_key % is not allowed', quote_literal(v_key) USING ERRCODE = 'invalid_parameter_value',
            DETAIL = 'Keys beginning with b:, results:, decide: or a<number>:e<number>: are herald''s own (broadcast messages, result deliveries, decide questions, automation steps).',
            HINT = 'Use a non-empty key of your own, e.g. ''order-42''.';
    END IF;
    IF NOT herald._valid_email(herald._normalize_email(email)) THEN
        RAISE EXCEPTION 'email % is not a valid address', coalesce(quote_literal(email), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    SELECT c.id INTO v_contact FROM herald._create_contacts(ARRAY[workspace], ARRAY[herald._normalize_email(send.email)]) c;
    IF v_contact IS NULL THEN
        SELECT c.id INTO v_contact FROM herald.contacts c
         WHERE c.email = herald._normalize_email(send.email) AND c.workspace_id IS NOT DISTINCT FROM workspace;   -- see contacts' unique index
    END IF;

    INSERT INTO herald.outbox AS o (workspace_id, kind, priority, dedupe_key, provider, rate_keys, contact_id, payload)
    VALUES (workspace, 'email', 0, v_key, provider,
            herald._email_rate_keys(workspace, provider), v_contact,
            jsonb_build_object('template', template, 'provider', provider, 'variables', context))
    ON CONFLICT (workspace_id, dedupe_key) WHERE broadcast_id IS NULL DO NOTHING
    RETURNING o.id INTO v_id;
    IF v_id IS NULL THEN
        SELECT o.id INTO v_id FROM herald.outbox o
         WHERE o.workspace_id = workspace AND o.dedupe_key = v_key AND o.broadcast_id IS NULL;
    END IF;
    RETURN v_id;
END
$$;
ALTER FUNCTION herald.send(text, text, text, jsonb, text, text) SECURITY DEFINER;

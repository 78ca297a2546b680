-- herald 0.12.0 -> 0.13.0
--   Release 0.12.0 is the SQL that landed on 2026-12-07 (commit ee0b66c), kept in
--   sql/releases/herald--0.12.0.sql. Everything since, one marked block per change:
--   Functions replaced here lose SECURITY DEFINER (CREATE OR REPLACE resets it): it is set again at
--   the end of each block.

-- ==== in_use_locks: every new use of a template or list holds it against archive and delete ====
-- 0.12.0 held templates for send, send_test and create_broadcast only, and lists not at all: a
-- create_broadcast, subscribe, create_automation, update_automation or go-live committing in the same
-- instant as an archive_list / delete_list (or an automation against delete_template, a broadcast
-- against archive_template) made a broadcast or live automation naming a list or template that was
-- archived or gone. _refuse_archived, which each of them calls, now takes the locks shared itself
-- (sql/archive.sql); _share_templates goes; one helper names the lock (_use_lock).
CREATE FUNCTION herald._use_lock(kind text, workspace text, name text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN hashtext('herald.' || kind || ':' || workspace || '/' || name);
REVOKE ALL ON FUNCTION herald._use_lock(text, text, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION herald._refuse_archived(workspace text, what text, templates text[], lists text[] DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_archived text;
    v_hint text;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(herald._use_lock(u.kind, workspace, u.name))
       FROM (SELECT 'template' AS kind, t.name FROM unnest(templates) t(name) WHERE t.name IS NOT NULL
             UNION
             SELECT 'list', l.name FROM unnest(lists) l(name) WHERE l.name IS NOT NULL
             ORDER BY 1, 2) u;
    SELECT string_agg(format('%s %s', a.kind, quote_literal(a.name)), ', ' ORDER BY a.kind, a.name),
           string_agg(DISTINCT format('herald.unarchive_%s(workspace, name)', a.kind), ' / ')
      INTO v_archived, v_hint
      FROM herald.archived a
     WHERE a.workspace_id = workspace
       AND ((a.kind = 'template' AND a.name = ANY (templates)) OR (a.kind = 'list' AND a.name = ANY (lists)));
    IF v_archived IS NOT NULL THEN
        RAISE EXCEPTION '%: % archived', what, v_archived
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('An archived template or list cannot be put to new use (automations, broadcasts, sends, subscriptions); restore it with %s, or use another.', v_hint);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION herald._lock_template(workspace text, key text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    PERFORM herald._require_workspace(workspace);
    PERFORM pg_advisory_xact_lock(herald._use_lock('template', workspace, key));
    IF NOT EXISTS (SELECT 1 FROM herald.templates t WHERE t.workspace_id = workspace AND t.key = _lock_template.key) THEN
        RAISE EXCEPTION 'unknown template % in workspace %', coalesce(quote_literal(key), 'NULL'), quote_literal(workspace)
            USING ERRCODE = 'no_data_found';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION herald._lock_list(workspace text, name text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    PERFORM herald._require_workspace(workspace);
    PERFORM pg_advisory_xact_lock(herald._use_lock('list', workspace, name));
    IF NOT EXISTS (SELECT 1 FROM herald.lists l WHERE l.workspace_id = workspace AND l.name = _lock_list.name)
       AND NOT EXISTS (SELECT 1 FROM herald.list_members m WHERE m.workspace_id = workspace AND m.list = _lock_list.name) THEN
        RAISE EXCEPTION 'unknown list % in workspace %', coalesce(quote_literal(name), 'NULL'), quote_literal(workspace)
            USING ERRCODE = 'no_data_found', HINT = 'herald.list_overview lists them.';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION herald.upsert_template(workspace text, key text, subject text, html text, text_body text DEFAULT NULL,
                                       from_address text DEFAULT NULL, reply_to text DEFAULT NULL)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_version int;
    v_from text := nullif(btrim(from_address), '');
    v_reply_to text := nullif(btrim(reply_to), '');
BEGIN
    PERFORM herald._require_workspace(workspace);
    IF key IS NULL OR key !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$' THEN
        RAISE EXCEPTION 'invalid template key %', coalesce(quote_literal(key), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'A template key is 1 to 100 characters: letters, digits, "_", "-" and ".".';
    END IF;
    IF subject IS NULL OR btrim(subject) = '' OR html IS NULL OR btrim(html) = '' THEN
        RAISE EXCEPTION 'template % needs a non-empty subject and html', quote_literal(key)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- bounded, so one workspace's template cannot make the daemon render (and hold) megabytes per message
    IF length(subject) > 998 THEN
        RAISE EXCEPTION 'template %: the subject is % characters; at most 998 are allowed', quote_literal(key), length(subject)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF octet_length(html) > 524288 OR octet_length(coalesce(text_body, '')) > 524288 THEN
        RAISE EXCEPTION 'template %: the html and the text body may be at most 512 KiB each (html % bytes, text % bytes)',
            quote_literal(key), octet_length(html), octet_length(coalesce(text_body, ''))
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF v_from IS NOT NULL AND NOT herald._valid_mailbox(v_from) THEN
        RAISE EXCEPTION 'template %: invalid from_address %', quote_literal(key), quote_literal(v_from)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use an address (news@example.com) or a name and an address (Example News <news@example.com>; quote a name holding , ; : @ or parentheses: "Example, Inc." <news@example.com>), or NULL for the provider''s.';
    END IF;
    IF v_reply_to IS NOT NULL AND NOT herald._valid_mailbox(v_reply_to) THEN
        RAISE EXCEPTION 'template %: invalid reply_to %', quote_literal(key), quote_literal(v_reply_to)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use an address (help@example.com) or a name and an address (Example Help <help@example.com>), or NULL for none.';
    END IF;
    -- the engine's checks (extension/src/template.rs → render/src/validate.rs): it parses, and names
    -- only variables templates can see
    PERFORM herald._check_template(key, subject, html, text_body);
    -- serialise versions of one key
    PERFORM pg_advisory_xact_lock(herald._use_lock('template', workspace, key));
    SELECT coalesce(max(t.version), 0) + 1 INTO v_version
      FROM herald.templates t WHERE t.workspace_id = workspace AND t.key = upsert_template.key;
    INSERT INTO herald.templates (workspace_id, key, version, subject, html, text_body, from_address, reply_to)
    VALUES (workspace, key, v_version, subject, html, text_body, v_from, v_reply_to);
    RETURN v_version;
END
$$;

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
    IF v_key = '' OR v_key LIKE 'b:%' THEN
        RAISE EXCEPTION 'dedupe_key % is not allowed', quote_literal(v_key) USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Use a non-empty key that does not begin with ''b:'' (reserved for broadcast messages).';
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

CREATE OR REPLACE FUNCTION herald.send_test(workspace text, key text, to_email text, context jsonb DEFAULT '{}',
                                 provider text DEFAULT 'default')
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_payload jsonb;
    v_reason text;
    v_id bigint;
BEGIN
    PERFORM herald._require_workspace(workspace);
    -- first: holds the template against a concurrent delete (see there)
    PERFORM herald._refuse_archived(workspace, 'send_test', ARRAY[key]);
    v_payload := herald._template_payload(workspace, key, to_email, context, provider);
    SELECT s.reason INTO v_reason FROM herald.suppressions s
     WHERE s.workspace_id = workspace AND s.email IN (v_payload ->> 'to', herald._email_key(v_payload ->> 'to'));
    IF v_reason IS NOT NULL THEN
        RAISE EXCEPTION '% is suppressed (%): a test is not sent to it', quote_literal(v_payload ->> 'to'), v_reason
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Send the test to another address, or lift the suppression with herald.unsuppress(workspace, email) if it was a mistake.';
    END IF;
    PERFORM herald._render_email(v_payload -> 'template', v_payload || '{"test": true}', workspace, 'https://unsubscribe.invalid/preview');
    INSERT INTO herald.outbox AS o (workspace_id, kind, priority, dedupe_key, provider, rate_keys, contact_id, payload)
    VALUES (workspace, 'email', 0, 'test:' || gen_random_uuid(), provider, herald._email_rate_keys(workspace, provider),
            (SELECT c.id FROM herald.contacts c WHERE c.workspace_id = workspace AND c.email = v_payload ->> 'to'),
            jsonb_build_object('template', key, 'provider', provider, 'variables', context,
                               'to', v_payload ->> 'to', 'test', true))
    RETURNING o.id INTO v_id;
    RETURN v_id;
END
$$;

CREATE OR REPLACE FUNCTION herald.create_broadcast(workspace text, definition jsonb) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_def jsonb;
    v_missing text;
    v_id bigint;
BEGIN
    PERFORM herald._require_workspace(workspace);
    v_def := herald._check_broadcast(definition);
    PERFORM herald._refuse_archived(workspace, 'create_broadcast',
                                    ARRAY(SELECT x ->> 'template' FROM jsonb_array_elements(v_def -> 'variations') x),
                                    ARRAY(SELECT jsonb_array_elements_text(v_def -> 'lists')));
    -- a time already past would send at once, which is never what "send at" meant
    IF v_def -> 'send_at' ->> 'kind' = 'at' AND (v_def -> 'send_at' ->> 'at')::timestamptz < now() THEN
        RAISE EXCEPTION 'send_at.at % is in the past', v_def -> 'send_at' ->> 'at'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Leave send_at out to send when the broadcast is scheduled (herald.schedule_broadcast(id)), or give a future time.';
    END IF;
    SELECT string_agg(DISTINCT quote_literal(v ->> 'template'), ', ') INTO v_missing
      FROM jsonb_array_elements(v_def -> 'variations') v
     WHERE NOT EXISTS (SELECT 1 FROM herald.templates t WHERE t.workspace_id = workspace AND t.key = v ->> 'template');
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION 'unknown template(s) % in workspace %', v_missing, quote_literal(workspace)
            USING ERRCODE = 'no_data_found', HINT = 'Create them with herald.upsert_template(…).';
    END IF;
    -- what the templates read as broadcast.<name> is in the definition's variables (or allowed missing)
    PERFORM herald._check_broadcast_templates(workspace, v_def);
    IF v_def ->> 'provider' <> 'default' AND NOT EXISTS (
        SELECT 1 FROM herald.providers p WHERE p.workspace_id = workspace AND p.name = v_def ->> 'provider') THEN
        RAISE EXCEPTION 'unknown provider % in workspace %', quote_literal(v_def ->> 'provider'), quote_literal(workspace)
            USING ERRCODE = 'no_data_found', HINT = 'Create it with herald.upsert_provider(…), or use ''default''.';
    END IF;
    INSERT INTO herald.broadcasts (workspace_id, name, definition, phase)
    VALUES (workspace, v_def ->> 'name', v_def, CASE WHEN v_def -> 'ab_test' <> 'null' THEN 'test' ELSE 'all' END)
    RETURNING id INTO v_id;
    UPDATE herald.broadcasts b SET payloads = herald._broadcast_payloads(b.id, b.name, b.definition)
     WHERE b.workspace_id = workspace AND b.id = v_id;
    IF v_def -> 'rate_per_second' <> 'null' THEN
        INSERT INTO herald.rate_limits (key, per_second) VALUES (herald._broadcast_rate_key(v_id), (v_def ->> 'rate_per_second')::int);
    END IF;
    RETURN v_id;
END
$$;

DROP FUNCTION herald._share_templates(text, text[]);
ALTER FUNCTION herald.upsert_template(text, text, text, text, text, text, text) SECURITY DEFINER;
ALTER FUNCTION herald.send(text, text, text, jsonb, text, text) SECURITY DEFINER;
ALTER FUNCTION herald.send_test(text, text, text, jsonb, text) SECURITY DEFINER;
ALTER FUNCTION herald.create_broadcast(text, jsonb) SECURITY DEFINER;

-- ==== erase_from_deliveries: delete_contact takes the contact's results out of result deliveries ====
-- A result delivery (an outbox job of subscribe_results) carries a batch of many contacts' results in
-- its body, with no contact_id of its own, so erasure left the contact's results there until prune
-- (30 days), sent or not. delete_contact now rewrites those bodies without them and says how many it
-- rewrote ('result_deliveries').
CREATE OR REPLACE FUNCTION herald.delete_contact(workspace text, email text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_email text := herald._normalize_email(email);
    v_key text;
    v_contact bigint;
    v_removed jsonb;
BEGIN
    PERFORM herald._require_workspace(workspace);
    IF NOT herald._valid_email(v_email) THEN
        RAISE EXCEPTION 'email % is not a valid address', coalesce(quote_literal(email), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_key := herald._email_key(v_email);
    SELECT c.id INTO v_contact FROM herald.contacts c
     WHERE c.email = v_email AND c.workspace_id IS NOT DISTINCT FROM workspace FOR UPDATE;

    WITH enrollments AS (
        DELETE FROM herald.enrollments e WHERE e.workspace_id = workspace AND e.contact_id = v_contact
        RETURNING e.id
    ), steps AS (
        DELETE FROM herald.step_log l
         WHERE l.workspace_id = workspace AND l.enrollment_id IN (SELECT x.id FROM enrollments x)
        RETURNING 1
    ), jobs AS (
        DELETE FROM herald.outbox o WHERE o.workspace_id = workspace AND o.contact_id = v_contact RETURNING 1
    ), history AS (
        DELETE FROM herald.message_history h WHERE h.workspace_id = workspace AND h.contact_id = v_contact RETURNING 1
    ), events AS (
        DELETE FROM herald.events e
         WHERE e.workspace_id = workspace AND (e.contact_id = v_contact OR (e.contact_id IS NULL AND e.email = v_email))
        RETURNING 1
    ), lists AS (
        DELETE FROM herald.list_members m WHERE m.workspace_id = workspace AND m.contact_id = v_contact RETURNING 1
    ), rejections AS (
        DELETE FROM herald.contact_rejections r
         WHERE r.workspace_id = workspace AND herald._normalize_email(r.input ->> 'email') = v_email
        RETURNING 1
    ), suppressions AS (
        DELETE FROM herald.suppressions s WHERE s.workspace_id = workspace AND s.email = v_email RETURNING 1
    ), results AS (
        -- the results stream, published or not yet (copies already delivered to subscribers are theirs)
        DELETE FROM herald.results r WHERE r.workspace_id = workspace AND r.contact_id = v_contact RETURNING 1
    ), staged AS (
        DELETE FROM herald.results_staged r WHERE r.workspace_id = workspace AND r.contact_id = v_contact RETURNING 1
    ), deliveries AS (
        -- a delivery is a batch of many contacts' results: the contact's are taken out of its body
        UPDATE herald.outbox o
           SET payload = jsonb_set(o.payload, '{body,results}',
                                   (SELECT coalesce(jsonb_agg(x.r ORDER BY x.n), '[]')
                                      FROM jsonb_array_elements(o.payload -> 'body' -> 'results') WITH ORDINALITY x(r, n)
                                     WHERE x.r -> 'contact_id' IS DISTINCT FROM to_jsonb(v_contact)))
         WHERE o.workspace_id = workspace AND o.kind = 'webhook' AND o.contact_id IS NULL AND v_contact IS NOT NULL
           AND o.payload -> 'body' -> 'results' @> jsonb_build_array(jsonb_build_object('contact_id', v_contact))
        RETURNING 1
    ), contacts AS (
        DELETE FROM herald.contacts c WHERE c.workspace_id = workspace AND c.id = v_contact RETURNING 1
    )
    SELECT jsonb_build_object(
               'contacts', (SELECT count(*) FROM contacts), 'events', (SELECT count(*) FROM events),
               'enrollments', (SELECT count(*) FROM enrollments), 'step_log', (SELECT count(*) FROM steps),
               'jobs', (SELECT count(*) FROM jobs), 'message_history', (SELECT count(*) FROM history),
               'list_members', (SELECT count(*) FROM lists), 'contact_rejections', (SELECT count(*) FROM rejections),
               'suppressions', (SELECT count(*) FROM suppressions),
               'results', (SELECT count(*) FROM results) + (SELECT count(*) FROM staged),
               'result_deliveries', (SELECT count(*) FROM deliveries))
      INTO v_removed;

    INSERT INTO herald.suppressions (workspace_id, email, reason)
    VALUES (workspace, v_key, 'erased')
    ON CONFLICT ON CONSTRAINT suppressions_pkey DO NOTHING;
    INSERT INTO herald.erasures (workspace_id, email_key, erased_by, removed)
    VALUES (workspace, v_key, herald._caller(), v_removed);
    RETURN v_removed;
END
$$;
ALTER FUNCTION herald.delete_contact(text, text) SECURITY DEFINER;

-- herald: templates. Saved checked (upsert_template), previewed as the daemon renders them
-- (render_template) and sent to one address as a test (send_test). The engine is the daemon's
-- (the herald-render crate, through extension/src/template.rs): one implementation.

-- Role: herald_admin. Adds a version of a template (the newest is what jobs render), refused when a
-- part does not parse or names a variable templates cannot see (render/src/validate.rs). from_address and
-- reply_to, when given, are this template's sender and Reply-To (mailboxes, see _valid_mailbox); NULL
-- leaves them to the provider.
CREATE FUNCTION herald.upsert_template(workspace text, key text, subject text, html text, text_body text DEFAULT NULL,
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

-- Role: herald_admin. Creates or changes a provider. Its kind decides its transport in herald run: smtp
-- needs HERALD_SMTP_URL_<NAME> there, file needs HERALD_MAILDIR (never one in place of the other).
-- settings: rate_per_second, and from / reply_to, the sender and Reply-To of its emails (mailboxes, see
-- _valid_mailbox) unless a broadcast or the template says otherwise.
-- Refuses a broadcast whose templates need a broadcast.<name> its definition's variables do not hold
-- (and do not allow to be missing). `definition`: the normalised one (_check_broadcast). The newest
-- version of each template, as the broadcast's jobs will render it. Internal: granted to no role.
CREATE FUNCTION herald._check_broadcast_templates(workspace text, definition jsonb) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, herald, pg_temp
BEGIN ATOMIC
    SELECT herald._check_broadcast_template(t.key, t.subject, t.html, t.text_body,
               -- what {{ broadcast.* }} holds: the variables, and what _broadcast_payloads adds
               coalesce(definition -> 'variables', '{}') || '{"id": 0, "name": "", "variation": ""}')
      FROM (SELECT DISTINCT v ->> 'template' AS key FROM jsonb_array_elements(definition -> 'variations') v) u
     CROSS JOIN LATERAL (SELECT t.* FROM herald.templates t
                          WHERE t.workspace_id = _check_broadcast_templates.workspace AND t.key = u.key
                          ORDER BY t.version DESC LIMIT 1) t;
END;

-- A template version as a job's payload carries it (claim, and the previews here): what the daemon
-- renders. A plain expression, so it is inlined where it is used. Internal: granted to no role.
CREATE FUNCTION herald._template_part(key text, version int, subject text, html text, text_body text) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE   -- STABLE like jsonb_build_object(); a stricter label would block inlining
RETURN jsonb_build_object('key', key, 'version', version, 'subject', subject, 'html', html, 'text', text_body);

-- The payload the daemon would render for send(workspace, email, key, context, provider), as claim
-- hands it out (the newest version of the template; the contact's facts as herald._contact_facts
-- makes them, or an address alone when it is no contact; no journey context, no event), plus "to".
-- Raises for an unknown template or provider, an invalid address or context. Internal: granted to
-- no role (render_template and send_test call it).
CREATE FUNCTION herald._template_payload(workspace text, key text, email text, context jsonb, provider text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_email text := herald._normalize_email(email);
    v_template jsonb;
    v_contact jsonb;
BEGIN
    SELECT herald._template_part(t.key, t.version, t.subject, t.html, t.text_body)
      INTO v_template
      FROM herald.templates t WHERE t.workspace_id = workspace AND t.key = _template_payload.key
     ORDER BY t.version DESC LIMIT 1;
    IF v_template IS NULL THEN
        RAISE EXCEPTION 'unknown template % in workspace %', coalesce(quote_literal(key), 'NULL'), quote_literal(workspace)
            USING ERRCODE = 'no_data_found', HINT = 'Create it with herald.upsert_template(…).';
    END IF;
    IF provider IS NULL OR (provider <> 'default'
        AND NOT EXISTS (SELECT 1 FROM herald.providers p WHERE p.workspace_id = workspace AND p.name = provider)) THEN
        RAISE EXCEPTION 'unknown provider % in workspace %', coalesce(quote_literal(provider), 'NULL'), quote_literal(workspace)
            USING ERRCODE = 'no_data_found', HINT = 'Create it with herald.upsert_provider(…), or use ''default''.';
    END IF;
    IF NOT herald._valid_email(v_email) THEN
        RAISE EXCEPTION 'email % is not a valid address', coalesce(quote_literal(email), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(context) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'context must be a JSON object' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Templates read it as variables.<key>, e.g. {"code": "1234"} for {{ variables.code }}.';
    END IF;
    IF herald._value_fault(context) IS NOT NULL THEN
        RAISE EXCEPTION 'context %', herald._value_fault(context) USING ERRCODE = 'program_limit_exceeded';
    END IF;
    SELECT herald._contact_facts(c.email, c.attributes, c.timezone, c.tags) INTO v_contact
      FROM herald.contacts c WHERE c.workspace_id = workspace AND c.email = v_email;
    RETURN jsonb_build_object('template', v_template, 'provider', provider, 'variables', context,
                              'to', v_email,
                              'contact', coalesce(v_contact, herald._contact_facts(v_email, NULL, NULL, NULL)),
                              'context', '{}'::jsonb, 'event', NULL, 'automation_id', NULL, 'enrollment_id', NULL);
END
$$;

-- Role: herald_app, herald_admin (like send()). What the daemon would send to `email` for template
-- `key` from send(workspace, email, key, context): {"subject", "html", "text"}, rendered by the same
-- engine with the same variables (the contact's current attributes; none but email when the address is
-- no contact). What needs the daemon's secrets differs: {{ unsubscribe_url }} is the placeholder
-- https://unsubscribe.invalid/preview, and links are shown as written (the daemon rewrites them for
-- click tracking when its HTTP side is configured). A template that would fail raises the daemon's
-- message (SQLSTATE 22000). Nothing is written.
CREATE FUNCTION herald.render_template(workspace text, key text, email text, context jsonb DEFAULT '{}')
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_payload jsonb;
BEGIN
    PERFORM herald._require_workspace(workspace);
    v_payload := herald._template_payload(workspace, key, email, context, 'default');
    RETURN herald._render_email(v_payload -> 'template', v_payload, workspace, 'https://unsubscribe.invalid/preview');
END
$$;

-- Role: herald_app, herald_admin (like send()). Queues one email of template `key` to `to_email`
-- through the outbox, as send() would (same provider rules and rate limits, priority 0), marked as a
-- test: its subject starts with "[test] " (the daemon adds it), it is counted in no automation or
-- broadcast statistic, and an address that is no contact stays none (the email renders with only
-- contact.email; no contact.created event). The template is rendered here first (as render_template
-- does), so one that would fail is refused now with the daemon's message instead of failing the job. A suppressed address is
-- refused (unsubscribed, bounced or erased addresses are never mailed, tests included). Returns the
-- job id.
CREATE FUNCTION herald.send_test(workspace text, key text, to_email text, context jsonb DEFAULT '{}',
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

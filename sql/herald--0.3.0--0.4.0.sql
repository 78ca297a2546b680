-- herald 0.3.0 -> 0.4.0
--   Release 0.3.0 is the SQL that landed on 2026-12-06 (commit e590124), kept in
--   sql/releases/herald--0.3.0.sql. Everything since:
--   * templates (issue 13): one engine for the daemon and the extension, strict rendering of email
--     parts checked when a template is saved (herald._check_template, _check_broadcast_template(s),
--     _render_email, render_template, send_test), per-template from_address/reply_to
--     (templates gains two columns; upsert_template gains two arguments, so it is dropped and
--     created again), herald._valid_mailbox;
--   * providers: a provider's kind decides its transport (upsert_provider checks it,
--     provider_kinds() for the daemon's start-up check);
--   * A/B feedback without a message id is attributed through the recipient's job of the named
--     broadcast or refused per item into herald.feedback_rejections (record_feedback, _ab_winner,
--     broadcast_stats);
--   * archive/delete of templates, lists and broadcasts (herald.archived, sql/archive.sql), refused
--     while in use; archived things are refused by new automations, broadcasts, send and subscribe
--     and hidden from the overviews;
--   * the HTTP API's keys and idempotency (herald.api_keys, herald.api_idempotency, api_call);
--   * statistics-proof plans (issue 14): the wait indexes lead with workspace_id and the wake-up
--     probes use only them; claim's lease and complete's lock go by id; tick parses each job once;
--     broadcast audiences without SQL filters walk contacts_pkey (herald._audience_range);
--   * joins between workspace-scoped tables equate workspace_id (advance_results,
--     result_subscription_overview, record_feedback) for the Citus plan (docs/SCALING.md);
--   * "passed" per automation version (tick counts entered@v<N>).
--   Functions replaced here lose SECURITY DEFINER (CREATE OR REPLACE resets it): it is set again at
--   the end of each part.

DROP INDEX herald.enrollments_wait_job_idx;

CREATE INDEX enrollments_wait_job_idx ON herald.enrollments (workspace_id, wait_job) WHERE wait_kind = 'job' AND ended_at IS NULL;

DROP INDEX herald.enrollments_wait_event_idx;

CREATE INDEX enrollments_wait_event_idx ON herald.enrollments (workspace_id, contact_id, wait_event)
    WHERE wait_kind = 'event' AND ended_at IS NULL;

CREATE OR REPLACE FUNCTION herald._dispatch() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
AS $$
DECLARE
    v_bad text;
    v_woken int;
BEGIN
    -- a dump being loaded: these events were dispatched in the database they come from
    IF herald._restoring() THEN
        RETURN NULL;
    END IF;
    -- statements that inserted nothing (tick's list events, usually) cost one check, not a dispatch
    IF NOT EXISTS (SELECT 1 FROM new_events) THEN
        RETURN NULL;
    END IF;
    -- 1. integrity, checked once for the whole statement; payloads bounded like track's (for plain
    --    INSERT and COPY; the check prints only payloads large enough to be out of bounds)
    SELECT format('event %s (workspace %s): payload %s', n.id, quote_literal(n.workspace_id), herald._value_fault(n.payload))
      INTO v_bad
      FROM new_events n WHERE herald._value_fault(n.payload) IS NOT NULL LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION '%', v_bad USING ERRCODE = 'program_limit_exceeded';
    END IF;
    SELECT string_agg(DISTINCT quote_literal(n.workspace_id), ', ') INTO v_bad
      FROM new_events n
     WHERE NOT EXISTS (SELECT 1 FROM herald.workspaces w WHERE w.id = n.workspace_id);
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'events for unknown workspace(s) %', v_bad
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'Create the workspace first with herald.create_workspace(id, name).';
    END IF;

    SELECT string_agg(format('%s (workspace %s)', b.contact_id, quote_literal(b.workspace_id)), ', ') INTO v_bad
      FROM (SELECT DISTINCT n.workspace_id, n.contact_id
              FROM new_events n
             WHERE n.contact_id IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM herald.contacts c
                                WHERE c.workspace_id = n.workspace_id AND c.id = n.contact_id)
             LIMIT 10) b;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'events name unknown contact id(s): %', v_bad
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'Give the email instead of contact_id to create contacts on the fly.';
    END IF;

    -- 2. events that name their contact by email only
    IF EXISTS (SELECT 1 FROM new_events n WHERE n.contact_id IS NULL) THEN
        SELECT string_agg(quote_literal(b.email), ', ') INTO v_bad
          FROM (SELECT DISTINCT n.email FROM new_events n
                 WHERE n.contact_id IS NULL AND NOT herald._valid_email(herald._normalize_email(n.email))
                 LIMIT 10) b;
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'events carry invalid email address(es): %', v_bad
                USING ERRCODE = 'invalid_parameter_value';
        END IF;

        PERFORM herald._create_contacts(m.workspaces, m.emails)
           FROM (SELECT array_agg(n.workspace_id) AS workspaces, array_agg(herald._normalize_email(n.email)) AS emails
                   FROM new_events n WHERE n.contact_id IS NULL) m;

        UPDATE herald.events e
           SET contact_id = c.id, email = c.email
          FROM new_events n
          JOIN herald.contacts c ON c.email = herald._normalize_email(n.email) AND c.workspace_id IS NOT DISTINCT FROM n.workspace_id
         WHERE n.contact_id IS NULL AND e.workspace_id = n.workspace_id AND e.id = n.id;
    END IF;

    -- 3. enrol into every live automation whose trigger matches, and 4. wake the enrollments parked on a
    --    wait_event node for one of these events (first matching event wins). One statement.
    WITH ev AS (
        SELECT n.workspace_id, n.id, n.contact_id, n.kind, n.payload
          FROM new_events n WHERE n.contact_id IS NOT NULL
        UNION ALL
        SELECT n.workspace_id, n.id, c.id, n.kind, n.payload
          FROM new_events n
         CROSS JOIN LATERAL (SELECT c.id FROM herald.contacts c
                              WHERE c.email = herald._normalize_email(n.email) AND c.workspace_id IS NOT DISTINCT FROM n.workspace_id
                              LIMIT 1) c   -- LIMIT: keeps it a parameterized unique-index probe (see contacts' index)
         WHERE n.contact_id IS NULL
    ), candidate AS (
        SELECT ev.workspace_id, ev.id AS event_id, ev.contact_id, ev.kind, ev.payload,
               a.id AS automation_id, a.reentry, a.start_node, a.trigger_filter, a.filter_reads_contact
          FROM ev
          JOIN herald.automations a
            ON a.workspace_id = ev.workspace_id AND a.trigger_event = ev.kind
           AND a.status = 'live' AND a.trigger_event IS NOT NULL
    ), matched AS (
        -- the contact is fetched and turned into facts only for filters that read contact.* fields
        SELECT k.* FROM candidate k
         WHERE k.trigger_filter IS NULL
            OR (NOT k.filter_reads_contact AND herald._matches(k.trigger_filter, NULL, k.payload, NULL))
            OR (k.filter_reads_contact AND herald._matches(k.trigger_filter,
                   (SELECT herald._contact_facts(c.email, c.attributes, c.timezone, c.tags) FROM herald.contacts c
                     WHERE c.workspace_id = k.workspace_id AND c.id = k.contact_id),
                   k.payload, NULL))
    ), enrolled AS (
        INSERT INTO herald.enrollments (workspace_id, automation_id, contact_id, entry_key, current_node, event_id, event)
        SELECT m.workspace_id, m.automation_id, m.contact_id, herald._entry_key(m.reentry, m.event_id), m.start_node,
               m.event_id, jsonb_build_object('kind', m.kind, 'payload', m.payload)
                           -- the newest version (sql/versions.sql), read in this statement's snapshot like
                           -- start_node, so the two agree; version 1 is not written
                           || herald._version_tag((SELECT max(v.version) FROM herald.automation_versions v
                                                    WHERE v.workspace_id = m.workspace_id AND v.automation_id = m.automation_id))
          FROM matched m
         ORDER BY m.workspace_id, m.automation_id, m.contact_id, m.event_id
        ON CONFLICT (workspace_id, automation_id, contact_id, entry_key)
           WHERE entry_key <> 'active' OR status IN ('active', 'waiting')
           DO NOTHING
        RETURNING workspace_id, automation_id
    ), counted AS (
        INSERT INTO herald.stats_delta (workspace_id, automation_id, metric, n)
        SELECT x.workspace_id, x.automation_id, 'enrolled', count(*) FROM enrolled x GROUP BY 1, 2
    ), awaited AS (
        -- one probe of enrollments_wait_event_idx per event, and the contact and the automation read by
        -- key only where needed. OFFSET 0 keeps the planner from turning the probe into a join it orders
        -- by statistics: on tables autovacuum had not analysed yet it scanned every waiting enrollment
        -- once per event (266 wake-ups/s instead of 22,000)
        SELECT DISTINCT ON (x.id) x.workspace_id, x.id, ev.payload,
               -- the next node in the version the enrollment is pinned to (update_automation)
               herald._version_definition(x.workspace_id, x.automation_id, coalesce((x.event ->> 'version')::int, 1))
                   -> 'nodes' -> x.current_node ->> 'next' AS next_node
          FROM ev
         CROSS JOIN LATERAL (SELECT e.workspace_id, e.id, e.contact_id, e.automation_id, e.current_node,
                                    e.wait_filter, e.context, e.event
                               FROM herald.enrollments e
                              WHERE e.workspace_id = ev.workspace_id AND e.contact_id = ev.contact_id
                                AND e.wait_event = ev.kind AND e.wait_kind = 'event' AND e.ended_at IS NULL
                                -- not status = 'waiting': that would let the planner read
                                -- enrollments_due_idx instead (see complete); re-checked on the row
                                AND e.status IS NOT DISTINCT FROM 'waiting'
                             OFFSET 0) x
         WHERE x.wait_filter IS NULL
            OR herald._matches(x.wait_filter,
                               (SELECT herald._contact_facts(c.email, c.attributes, c.timezone, c.tags)
                                  FROM herald.contacts c WHERE c.workspace_id = x.workspace_id AND c.id = x.contact_id),
                               ev.payload, x.context)
         ORDER BY x.id, ev.id
    ), woken AS (
        UPDATE herald.enrollments e
           SET status = 'active', next_run_at = now(), updated_at = now(),
               current_node = w.next_node,
               context = e.context || jsonb_build_object(e.current_node, w.payload),
               wait_kind = NULL, wait_event = NULL, wait_filter = NULL
          FROM awaited w
         WHERE e.id = w.id
           -- by id alone (enrollments_id_idx): IS NOT DISTINCT FROM is not indexable, so a planner without
           -- statistics cannot drive this update from another index it guesses at one row (it picked the
           -- partial wait index, then (workspace_id, automation_id) and filtered every enrollment by id);
           -- status and wait_kind are re-checked on the locked row
           AND e.workspace_id IS NOT DISTINCT FROM w.workspace_id
           AND e.status IS NOT DISTINCT FROM 'waiting' AND e.wait_kind IS NOT DISTINCT FROM 'event'
        RETURNING 1
    )
    SELECT count(*) INTO v_woken FROM woken;
    IF v_woken > 0 THEN
        PERFORM pg_notify('herald.tick', '');
    END IF;

    RETURN NULL;
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
    IF NOT EXISTS (SELECT 1 FROM herald.templates t WHERE t.workspace_id = workspace AND t.key = template) THEN
        RAISE EXCEPTION 'unknown template % in workspace %', coalesce(quote_literal(template), 'NULL'), quote_literal(workspace)
            USING ERRCODE = 'no_data_found', HINT = 'Create it with herald.upsert_template(…).';
    END IF;
    PERFORM herald._refuse_archived(workspace, 'send', ARRAY[template]);
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

CREATE OR REPLACE FUNCTION herald.advance_results(max_rows int DEFAULT 10000) RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
AS $$
DECLARE
    v_published int;
    v_queued int;
BEGIN
    IF max_rows IS NULL OR max_rows < 1 OR max_rows > 100000 THEN
        RAISE EXCEPTION 'max_rows must be between 1 and 100000, got %', coalesce(max_rows::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtext('herald.advance_results')) THEN
        RETURN 0;
    END IF;

    WITH batch AS MATERIALIZED (
        -- results_staged has no index: it holds what was staged since the last call
        SELECT s.ctid AS row FROM herald.results_staged s ORDER BY s.id LIMIT max_rows
    ), moved AS (
        DELETE FROM herald.results_staged s WHERE s.ctid = ANY (ARRAY(SELECT b.row FROM batch b))
        RETURNING s.*
    ), published AS (
        INSERT INTO herald.results (workspace_id, kind, at, contact_id, automation_id, enrollment_id, broadcast_id,
                                    job_id, data)
        SELECT m.workspace_id, m.kind, m.at, m.contact_id, m.automation_id, m.enrollment_id, m.broadcast_id,
               m.job_id, m.data
          FROM moved m ORDER BY m.id
        RETURNING 1
    )
    SELECT count(*) INTO v_published FROM published;

    WITH ready AS MATERIALIZED (
        -- nothing of theirs in flight: the last job is done (or pruned, or there was none)
        SELECT s.workspace_id, s.id, s.url, s.kinds, s.options, s.cursor
          FROM herald.result_subscriptions s
         WHERE NOT EXISTS (SELECT 1 FROM herald.outbox o
                            WHERE o.workspace_id = s.workspace_id AND o.id = s.job_id AND o.status <> 'done')
    ), picked AS (
        -- each one's next results: at most its batch, and about 1 MiB of data (at least one result)
        SELECT s.workspace_id, s.id AS subscription, r.id AS result_id, herald._result_json(r) AS result,
               sum(pg_column_size(r.data)) OVER (PARTITION BY s.id ORDER BY r.id) - pg_column_size(r.data) AS bytes_before
          FROM ready s
         CROSS JOIN LATERAL herald._results_after(s.workspace_id, s.cursor, (s.options ->> 'batch')::int, s.kinds) r
    ), batch AS (
        SELECT p.workspace_id, p.subscription, max(p.result_id) AS last_id, count(*) AS n,
               jsonb_agg(p.result ORDER BY p.result_id) AS results
          FROM picked p
         WHERE p.bytes_before < 1048576
         GROUP BY p.workspace_id, p.subscription
    ), queued AS (
        INSERT INTO herald.outbox AS o (workspace_id, kind, priority, dedupe_key, rate_keys, payload, max_attempts)
        SELECT b.workspace_id, 'webhook', 1, format('results:%s:%s', b.subscription, b.last_id),
               ARRAY['host:' || (s.options ->> 'host')],
               -- verbatim: the body is data, sent as it is (not a template whose strings are rendered)
               jsonb_build_object('url', s.url, 'method', 'POST', 'headers', '{}'::jsonb,
                                  'timeout_ms', s.options -> 'timeout_ms', 'verbatim', true,
                                  'body', jsonb_build_object('subscription', b.subscription, 'workspace', b.workspace_id,
                                                             'after', s.cursor, 'results', b.results)),
               (s.options ->> 'max_attempts')::int
          FROM batch b
          JOIN ready s ON s.workspace_id = b.workspace_id AND s.id = b.subscription
         ORDER BY b.workspace_id, b.subscription
        -- a key taken already (send() lets an application choose any key) holds up that subscription
        -- alone: no job, no move
        ON CONFLICT (workspace_id, dedupe_key) WHERE broadcast_id IS NULL DO NOTHING
        RETURNING o.id, o.workspace_id, o.dedupe_key
    ), moved AS (
        UPDATE herald.result_subscriptions s
           SET cursor = b.last_id, job_id = q.id, queued = s.queued + b.n, updated_at = now()
          FROM batch b
          JOIN queued q ON q.workspace_id = b.workspace_id AND q.dedupe_key = format('results:%s:%s', b.subscription, b.last_id)
         WHERE s.workspace_id = b.workspace_id AND s.id = b.subscription
        RETURNING 1
    )
    SELECT count(*) INTO v_queued FROM moved;
    RETURN v_published;
END
$$;

CREATE OR REPLACE VIEW herald.result_subscription_overview AS
SELECT s.workspace_id, s.id, s.url, s.kinds, s.options, s.cursor, s.queued,
       CASE WHEN o.status IS NULL OR o.status = 'done' THEN 'idle'
            WHEN o.status IN ('pending', 'leased', 'held') THEN 'delivering'
            ELSE 'blocked' END AS state,
       s.job_id, o.status AS job_status, o.attempt AS attempts,
       CASE WHEN o.status = 'pending' THEN o.run_at END AS next_attempt_at, o.last_error,
       s.created_by, s.created_at, s.updated_at
  FROM herald.result_subscriptions s
  LEFT JOIN herald.outbox o ON o.workspace_id = s.workspace_id AND o.id = s.job_id;

CREATE OR REPLACE FUNCTION herald.set_automation_status(automation bigint, status text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.automations;
    v_allowed text[];
    v_exited bigint;
    v_missing text;
BEGIN
    IF status IS NULL OR status NOT IN ('live', 'paused', 'archived') THEN
        RAISE EXCEPTION 'invalid automation status %', coalesce(quote_literal(status), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use one of: live, paused, archived.';
    END IF;
    v := herald._lock_automation(automation);
    IF v.status = status THEN
        RETURN;  -- already there: idempotent
    END IF;
    v_allowed := CASE v.status
        WHEN 'draft' THEN ARRAY['live', 'archived']
        WHEN 'live' THEN ARRAY['paused', 'archived']
        WHEN 'paused' THEN ARRAY['live', 'archived']
        ELSE ARRAY[]::text[]
    END;
    IF NOT status = ANY (v_allowed) THEN
        RAISE EXCEPTION 'automation % cannot go from % to %', automation, v.status, status
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = CASE WHEN v.status = 'archived' THEN 'An archived automation is final.'
                                ELSE format('From %s it can go to: %s.', v.status, array_to_string(v_allowed, ', ')) END;
    END IF;

    IF status = 'live' THEN
        PERFORM herald._refuse_archived(v.workspace_id, format('automation %s cannot go live', automation),
                                        herald._definition_templates(v.definition), herald._definition_lists(v.definition));
        -- what the automation sends with must exist before it can run (provider "default" always does:
        -- the sidecar maps it to its default transport)
        SELECT string_agg(DISTINCT format('template %s (node %s)', quote_literal(n.node ->> 'template'), n.id), ', ') INTO v_missing
          FROM jsonb_each(v.definition -> 'nodes') AS n(id, node)
         WHERE n.node ->> 'type' = 'email'
           AND NOT EXISTS (SELECT 1 FROM herald.templates t WHERE t.workspace_id = v.workspace_id AND t.key = n.node ->> 'template');
        IF v_missing IS NULL THEN
            SELECT string_agg(DISTINCT format('provider %s (node %s)', quote_literal(n.node ->> 'provider'), n.id), ', ') INTO v_missing
              FROM jsonb_each(v.definition -> 'nodes') AS n(id, node)
             WHERE n.node ->> 'type' = 'email' AND coalesce(n.node ->> 'provider', 'default') <> 'default'
               AND NOT EXISTS (SELECT 1 FROM herald.providers p WHERE p.workspace_id = v.workspace_id AND p.name = n.node ->> 'provider');
        END IF;
        IF v_missing IS NOT NULL THEN
            RAISE EXCEPTION 'automation % cannot go live: unknown %', automation, v_missing
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Create them with herald.upsert_template(…) / herald.upsert_provider(…) first.';
        END IF;
    END IF;

    UPDATE herald.automations a SET status = set_automation_status.status, updated_at = now()
     WHERE a.workspace_id = v.workspace_id AND a.id = v.id;

    IF status = 'archived' THEN
        WITH exited AS (
            UPDATE herald.enrollments e
               SET status = 'exited', exit_reason = 'automation archived', ended_at = now(), updated_at = now()
             WHERE e.workspace_id = v.workspace_id AND e.automation_id = v.id AND e.status IN ('active', 'waiting')
            RETURNING e.workspace_id, e.id, e.automation_id, e.contact_id, e.current_node, e.exit_reason, e.context
        ), reported AS (
            -- the results stream (sql/results.sql)
            INSERT INTO herald.results_staged (workspace_id, kind, contact_id, automation_id, enrollment_id, data)
            SELECT x.workspace_id, 'enrollment.exited', x.contact_id, x.automation_id, x.id,
                   herald._ended_data(x.current_node, x.exit_reason, x.context)
              FROM exited x
        )
        SELECT count(*) INTO v_exited FROM exited;
        PERFORM herald._cancel_pending_jobs(v.workspace_id, v.id, NULL, 'automation archived');
        IF v_exited > 0 THEN
            INSERT INTO herald.stats_delta (workspace_id, automation_id, metric, n) VALUES (v.workspace_id, v.id, 'exited', v_exited);
        END IF;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION herald.update_automation(automation bigint, definition jsonb, options jsonb DEFAULT '{}') RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.automations;
    v_opts jsonb;
    v_checked jsonb;
    v_ids bigint[];
    v_plan jsonb;
    v_next int;
    v_missing text;
    v_reason text;
    v_moved bigint;
BEGIN
    v_opts := herald._version_options(options);
    v := herald._lock_automation(automation);   -- the caller's workspace checked before the lock
    IF v.status = 'archived' THEN
        RAISE EXCEPTION 'automation % is archived: an archived automation is final', v.id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Create a new automation with herald.create_automation(…).';
    END IF;
    -- raises "invalid automation definition: <path>: <fault>" naming every fault
    v_checked := herald._check_automation(definition);
    PERFORM herald._refuse_archived(v.workspace_id, format('automation %s cannot be updated', v.id),
                                    herald._definition_templates(definition), herald._definition_lists(definition));
    IF v_opts ? 'migrate' THEN
        -- the contacts to move, locked (and waited for while a tick runs them) in id order; one that a
        -- dispatcher enrols meanwhile starts on the version it read and stays there
        SELECT coalesce(array_agg(x.id ORDER BY x.id), '{}') INTO v_ids
          FROM (SELECT e.id FROM herald.enrollments e
                 WHERE e.workspace_id = v.workspace_id AND e.automation_id = v.id AND e.status IN ('active', 'waiting')
                 ORDER BY e.id
                   FOR UPDATE) x;
    END IF;
    v_plan := herald._version_plan(v, definition, v_opts, v_ids);
    IF jsonb_array_length(v_plan -> 'errors') > 0 THEN
        RAISE EXCEPTION '%', format('automation %s cannot be updated: %s%s', v.id, v_plan -> 'errors' ->> 0,
                                    CASE WHEN jsonb_array_length(v_plan -> 'errors') > 1
                                         THEN format(' (and %s more)', jsonb_array_length(v_plan -> 'errors') - 1) ELSE '' END)
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = (SELECT string_agg(x, E'\n') FROM jsonb_array_elements_text(v_plan -> 'errors') x),
                  HINT = 'Map every node that holds contacts in options.migrate ({"old": "new"}, or null to exit them), '
                         'or leave migrate out to keep them on their version; herald.preview_automation_update(…) shows the plan.';
    END IF;
    IF v.status IN ('live', 'paused') THEN
        -- what the new version sends with must exist, as when going live (provider "default" always does)
        SELECT string_agg(DISTINCT format('template %s (node %s)', quote_literal(n.node ->> 'template'), n.id), ', ') INTO v_missing
          FROM jsonb_each(definition -> 'nodes') AS n(id, node)
         WHERE n.node ->> 'type' = 'email'
           AND NOT EXISTS (SELECT 1 FROM herald.templates t WHERE t.workspace_id = v.workspace_id AND t.key = n.node ->> 'template');
        IF v_missing IS NULL THEN
            SELECT string_agg(DISTINCT format('provider %s (node %s)', quote_literal(n.node ->> 'provider'), n.id), ', ') INTO v_missing
              FROM jsonb_each(definition -> 'nodes') AS n(id, node)
             WHERE n.node ->> 'type' = 'email' AND coalesce(n.node ->> 'provider', 'default') <> 'default'
               AND NOT EXISTS (SELECT 1 FROM herald.providers p WHERE p.workspace_id = v.workspace_id AND p.name = n.node ->> 'provider');
        END IF;
        IF v_missing IS NOT NULL THEN
            RAISE EXCEPTION 'automation % cannot be updated: unknown %', v.id, v_missing
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Create them with herald.upsert_template(…) / herald.upsert_provider(…) first.';
        END IF;
    END IF;

    v_next := (v_plan ->> 'to_version')::int;
    v_plan := v_plan - 'errors' || jsonb_build_object('version', v_next);
    INSERT INTO herald.automation_versions (workspace_id, automation_id, version, definition, start_node, created_by, note, report)
    VALUES (v.workspace_id, v.id, v_next, definition, v_checked ->> 'start', herald._caller(), v_opts ->> 'note', v_plan);
    UPDATE herald.automations a
       SET name = v_checked ->> 'name', definition = update_automation.definition,
           trigger_event = v_checked ->> 'trigger_event', trigger_filter = nullif(v_checked -> 'trigger_filter', 'null'),
           filter_reads_contact = (v_checked ->> 'filter_reads_contact')::boolean,
           reentry = v_checked ->> 'reentry', start_node = v_checked ->> 'start', updated_at = now()
     WHERE a.workspace_id = v.workspace_id AND a.id = v.id;

    IF v_opts ? 'migrate' AND cardinality(v_ids) > 0 THEN
        v_reason := format('exited by the update to version %s', v_next);
        WITH moves AS (
            SELECT m.key AS node, m.value #>> '{}' AS target FROM jsonb_each(v_opts -> 'migrate') m
        ), moved AS (
            -- waits are kept: status, wait_kind, wait_job / wait_event / wait_filter and next_run_at as they were
            UPDATE herald.enrollments e
               SET current_node = m.target, event = coalesce(e.event, '{}') || jsonb_build_object('version', v_next),
                   updated_at = now()
              FROM moves m
             WHERE e.id = ANY (v_ids) AND e.workspace_id = v.workspace_id AND e.current_node = m.node AND m.target IS NOT NULL
               AND e.status IN ('active', 'waiting')
            RETURNING e.id, e.wait_kind, e.wait_job, e.current_node
        ), rerouted AS (
            -- an email or webhook job in flight or queued takes its enrollment along the new node's exits
            UPDATE herald.outbox o
               SET on_success = definition -> 'nodes' -> mv.current_node ->> 'next',
                   on_error = definition -> 'nodes' -> mv.current_node ->> 'on_error', updated_at = now()
              FROM moved mv
             WHERE mv.wait_kind = 'job' AND o.workspace_id = v.workspace_id AND o.dedupe_key = mv.wait_job
               AND o.broadcast_id IS NULL AND o.kind IN ('email', 'webhook')
               AND o.status IN ('pending', 'leased', 'held', 'dead')
            RETURNING 1
        ), exited AS (
            UPDATE herald.enrollments e
               SET status = 'exited', exit_reason = v_reason, ended_at = now(), updated_at = now()
              FROM moves m
             WHERE e.id = ANY (v_ids) AND e.workspace_id = v.workspace_id AND e.current_node = m.node AND m.target IS NULL
               AND e.status IN ('active', 'waiting')
            RETURNING e.workspace_id, e.id, e.automation_id, e.contact_id, e.current_node, e.exit_reason, e.context
        ), reported AS (
            -- the results stream (sql/results.sql)
            INSERT INTO herald.results_staged (workspace_id, kind, contact_id, automation_id, enrollment_id, data)
            SELECT x.workspace_id, 'enrollment.exited', x.contact_id, x.automation_id, x.id,
                   herald._ended_data(x.current_node, x.exit_reason, x.context)
              FROM exited x
        ), cancelled AS (
            UPDATE herald.outbox o
               SET status = 'cancelled', last_error = 'enrollment exited: ' || v_reason, done_at = now(), updated_at = now()
             WHERE o.workspace_id = v.workspace_id AND o.status = 'pending' AND o.kind <> 'decide'
               AND o.automation_id = v.id AND o.enrollment_id IN (SELECT x.id FROM exited x)
            RETURNING 1
        ), counted AS (
            INSERT INTO herald.stats_delta (workspace_id, automation_id, metric, n)
            SELECT v.workspace_id, v.id, 'exited', count(*) FROM exited HAVING count(*) > 0
        )
        SELECT count(*) INTO v_moved FROM moved;   -- every data-modifying CTE above runs to completion
        PERFORM pg_notify('herald.tick', '');
    END IF;
    RETURN v_plan;
END
$$;

CREATE OR REPLACE FUNCTION herald.record_feedback(feedback jsonb, only_workspace text DEFAULT NULL) RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_bad text;
    v_n int;
BEGIN
    IF jsonb_typeof(feedback) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'feedback must be a JSON array' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT format('feedback[%s]: kind must be unsubscribed, hard_bounce, soft_bounce, complaint, opened or clicked', t.ord - 1)
      INTO v_bad
      FROM jsonb_array_elements(feedback) WITH ORDINALITY t(f, ord)
     WHERE jsonb_typeof(t.f) IS DISTINCT FROM 'object'
        OR (t.f ->> 'kind') IS NULL
        OR t.f ->> 'kind' NOT IN ('unsubscribed', 'hard_bounce', 'soft_bounce', 'complaint', 'opened', 'clicked')
     LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION '%', v_bad USING ERRCODE = 'invalid_parameter_value';
    END IF;

    WITH input AS (
        SELECT t.f ->> 'kind' AS kind, coalesce(t.f -> 'payload', '{}') AS payload, t.f ->> 'message_id' AS message_id,
               coalesce(t.f ->> 'workspace', m.workspace_id, bw.workspace_id) AS workspace_id,
               herald._normalize_email(coalesce(t.f ->> 'email', c.email)) AS email, t.ord, t.f AS entry,
               m.contact_id, m.automation_id, m.enrollment_id, m.broadcast_id, m.job_id, m.variation,
               -- the broadcast an open or click names in its payload (read when its message does not say)
               CASE WHEN t.f ->> 'kind' IN ('opened', 'clicked') AND m.broadcast_id IS NULL
                    THEN t.f -> 'payload' ->> 'broadcast' END AS named_broadcast,
               -- the event it becomes (and the result, for bounces, opens and clicks): its kind, and the
               -- report's payload with the message and the kind of bounce
               CASE t.f ->> 'kind' WHEN 'unsubscribed' THEN 'list.unsubscribed' WHEN 'complaint' THEN 'email.complained'
                                   WHEN 'opened' THEN 'email.opened' WHEN 'clicked' THEN 'email.clicked'
                                   ELSE 'email.bounced' END AS event_kind,
               coalesce(t.f -> 'payload', '{}') || jsonb_strip_nulls(jsonb_build_object(
                   'message_id', t.f ->> 'message_id',
                   'bounce_type', CASE t.f ->> 'kind' WHEN 'hard_bounce' THEN 'hard' WHEN 'soft_bounce' THEN 'soft' END))
                   AS event_payload
          FROM jsonb_array_elements(feedback) WITH ORDINALITY t(f, ord)
          -- the message named, in the workspace given if one is; a Message-ID found in two workspaces
          -- (derived from dedupe keys, which two workspaces may choose alike) names neither
          LEFT JOIN LATERAL (SELECT min(h.workspace_id) AS workspace_id,
                                    (array_agg(h.contact_id ORDER BY h.id DESC))[1] AS contact_id,
                                    (array_agg(h.automation_id ORDER BY h.id DESC))[1] AS automation_id,
                                    (array_agg(h.enrollment_id ORDER BY h.id DESC))[1] AS enrollment_id,
                                    (array_agg(h.broadcast_id ORDER BY h.id DESC))[1] AS broadcast_id,
                                    (array_agg(h.outbox_id ORDER BY h.id DESC))[1] AS job_id,
                                    (array_agg(h.variation ORDER BY h.id DESC))[1] AS variation
                               FROM herald.message_history h
                              WHERE t.f ->> 'message_id' IS NOT NULL AND h.message_id = t.f ->> 'message_id'
                                AND (t.f ->> 'workspace' IS NULL OR h.workspace_id = t.f ->> 'workspace')
                                AND (only_workspace IS NULL OR h.workspace_id = only_workspace)
                             HAVING count(DISTINCT h.workspace_id) = 1) m ON true
          LEFT JOIN LATERAL (SELECT x.email FROM herald.contacts x
                              WHERE x.workspace_id = m.workspace_id AND x.id = m.contact_id LIMIT 1) c ON true
          -- an open or click that names neither a workspace nor a known message: the workspace of the
          -- broadcast its payload names
          LEFT JOIN LATERAL (SELECT x.workspace_id FROM herald.broadcasts x
                              WHERE t.f ->> 'workspace' IS NULL AND m.workspace_id IS NULL
                                AND t.f ->> 'kind' IN ('opened', 'clicked')
                                AND x.id = CASE WHEN t.f -> 'payload' ->> 'broadcast' ~ '^[0-9]{1,18}$'
                                                THEN (t.f -> 'payload' ->> 'broadcast')::bigint END) bw ON true
    ), known AS (
        SELECT i.*,
               CASE WHEN i.named_broadcast ~ '^[0-9]{1,18}$' THEN i.named_broadcast::bigint END AS named_id
          FROM input i
         WHERE i.email IS NOT NULL AND herald._valid_email(i.email)
           AND (only_workspace IS NULL OR i.workspace_id = only_workspace)
           AND EXISTS (SELECT 1 FROM herald.workspaces w WHERE w.id = i.workspace_id)
    ), attributed AS (
        -- opens and clicks: the broadcast and variation they count for, or why they cannot count
        SELECT k.*, b.id AS named_found, j.job_id AS named_job, j.variation AS named_variation,
               CASE WHEN k.named_broadcast IS NULL THEN NULL
                    WHEN k.named_id IS NULL THEN
                        format('payload.broadcast must be a broadcast id (a whole number), got %s', k.entry -> 'payload' -> 'broadcast')
                    WHEN b.id IS NULL THEN
                        format('broadcast %s does not exist in workspace %s', k.named_id, quote_literal(k.workspace_id))
                    WHEN j.variation IS NULL THEN
                        format('could not be attributed to a variation of broadcast %s: no message_id and no message of this broadcast to that address', k.named_id)
                    WHEN NOT j.sent THEN
                        format('could not be attributed to a variation of broadcast %s: its message to that address was not sent (%s)', k.named_id, j.status)
                    WHEN k.payload ->> 'variation' IS NOT NULL AND k.payload ->> 'variation' <> j.variation THEN
                        format('could not be attributed to a variation of broadcast %s: the report names variation %s, the message sent to that address was variation %s',
                               k.named_id, quote_literal(k.payload ->> 'variation'), quote_literal(j.variation))
               END AS refusal
          FROM known k
          LEFT JOIN LATERAL (SELECT x.id FROM herald.broadcasts x
                              WHERE x.workspace_id = k.workspace_id AND x.id = k.named_id) b ON true
          -- the contact's job of that broadcast (one per contact), or, once pruned, its history
          LEFT JOIN LATERAL (SELECT coalesce(o.id, h.outbox_id) AS job_id, coalesce(o.variation, h.variation) AS variation,
                                    -- leased: handed to a daemon, whose completion may not be recorded yet
                                    -- when the recipient already opens it
                                    coalesce(o.status IN ('done', 'leased'), h.status = 'sent') AS sent,
                                    coalesce(o.status, h.status) AS status
                               FROM herald.contacts ct
                               LEFT JOIN herald.outbox o ON o.broadcast_id = b.id AND o.contact_id = ct.id
                                                          AND o.workspace_id = ct.workspace_id
                               LEFT JOIN LATERAL (SELECT y.outbox_id, y.variation, y.status FROM herald.message_history y
                                                   WHERE o.id IS NULL AND y.workspace_id = ct.workspace_id
                                                     AND y.contact_id = ct.id AND y.broadcast_id = b.id
                                                   ORDER BY y.id DESC LIMIT 1) h ON true
                              WHERE b.id IS NOT NULL AND ct.email = k.email AND ct.workspace_id = k.workspace_id
                              LIMIT 1) j ON true
    ), fresh AS (
        -- an open or a click counts once per (message, kind, link) in 10 minutes: a replayed pixel or
        -- link (prefetchers, scanners, a hostile loop) adds no event and wakes no automation
        SELECT k.*,
               -- the broadcast and variation it counts for: its message's, else the named broadcast's job's
               CASE WHEN k.kind NOT IN ('opened', 'clicked') THEN k.event_payload
                    WHEN k.broadcast_id IS NOT NULL THEN
                        k.event_payload || jsonb_build_object('broadcast', k.broadcast_id, 'variation', k.variation)
                    WHEN k.named_job IS NOT NULL THEN
                        k.event_payload || jsonb_build_object('broadcast', k.named_id, 'variation', k.named_variation)
                    ELSE k.event_payload END AS counted_payload
          FROM (SELECT k.*, row_number() OVER (PARTITION BY k.workspace_id, k.kind, k.message_id, k.payload ->> 'url'
                                                        ORDER BY k.ord) AS nth
                           FROM attributed k WHERE k.refusal IS NULL) k
         WHERE k.kind NOT IN ('opened', 'clicked') OR k.message_id IS NULL
            OR (k.nth = 1 AND NOT EXISTS (
                   SELECT 1 FROM herald.events e
                    WHERE e.workspace_id = k.workspace_id AND (e.payload ->> 'message_id') = k.message_id
                      AND e.kind IN ('email.opened', 'email.clicked') AND e.kind = 'email.' || k.kind
                      AND (e.payload ->> 'url') IS NOT DISTINCT FROM (k.payload ->> 'url')
                      AND e.created_at > now() - interval '10 minutes'))
    ), refused AS (
        INSERT INTO herald.feedback_rejections (workspace_id, batch, position, input, reason, broadcast_id)
        SELECT a.workspace_id, txid_current(), (a.ord - 1)::int, a.entry, a.refusal, a.named_found
          FROM attributed a WHERE a.refusal IS NOT NULL
        ON CONFLICT (workspace_id, batch, position) DO UPDATE
           SET input = EXCLUDED.input, reason = EXCLUDED.reason, broadcast_id = EXCLUDED.broadcast_id
        RETURNING 1
    ), unattributed AS (
        -- the broadcast's count of reports that could not count for a variation
        INSERT INTO herald.broadcast_stats_delta (workspace_id, broadcast_id, variation, metric, n)
        SELECT a.workspace_id, a.named_found, '', a.kind || '_unattributed', count(*)
          FROM attributed a WHERE a.refusal IS NOT NULL AND a.named_found IS NOT NULL
         GROUP BY a.workspace_id, a.named_found, a.kind
    ), suppressed AS (
        INSERT INTO herald.suppressions (workspace_id, email, reason, detail)
        SELECT DISTINCT ON (k.workspace_id, k.email) k.workspace_id, k.email,
               CASE k.kind WHEN 'unsubscribed' THEN 'unsubscribed' WHEN 'hard_bounce' THEN 'hard_bounce' ELSE 'complaint' END,
               jsonb_strip_nulls(k.payload || jsonb_build_object('message_id', k.message_id))
          FROM known k WHERE k.kind IN ('unsubscribed', 'hard_bounce', 'complaint')
         ORDER BY k.workspace_id, k.email, k.ord
        ON CONFLICT ON CONSTRAINT suppressions_pkey DO NOTHING
        RETURNING 1
    ), recorded AS (
        INSERT INTO herald.events (workspace_id, email, kind, payload)
        SELECT k.workspace_id, k.email, k.event_kind, k.counted_payload
          FROM fresh k ORDER BY k.ord
        RETURNING 1
    ), reported AS (
        -- the results stream (sql/results.sql): bounces, opens and clicks of the messages herald sent
        -- (an address named alone: its contact, when there is one yet)
        INSERT INTO herald.results_staged (workspace_id, kind, contact_id, automation_id, enrollment_id, broadcast_id,
                                           job_id, data)
        SELECT k.workspace_id, k.event_kind,
               coalesce(k.contact_id, (SELECT c.id FROM herald.contacts c
                                        WHERE c.email = k.email AND c.workspace_id IS NOT DISTINCT FROM k.workspace_id LIMIT 1)),
               k.automation_id, k.enrollment_id, coalesce(k.broadcast_id, k.named_id), coalesce(k.job_id, k.named_job),
               k.counted_payload
          FROM fresh k
         WHERE k.event_kind IN ('email.bounced', 'email.opened', 'email.clicked')
         ORDER BY k.ord
    )
    SELECT count(*) INTO v_n FROM recorded;
    RETURN v_n;
END
$$;

CREATE OR REPLACE FUNCTION herald.prune(older_than interval DEFAULT '30 days', results_older_than interval DEFAULT '7 days')
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_n bigint;
    v_total bigint := 0;
BEGIN
    IF older_than IS NULL OR older_than < interval '1 hour' THEN
        RAISE EXCEPTION 'older_than must be at least 1 hour' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF results_older_than IS NULL OR results_older_than < interval '1 hour' THEN
        RAISE EXCEPTION 'results_older_than must be at least 1 hour' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM herald.results WHERE published_at < now() - results_older_than;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    DELETE FROM herald.step_log WHERE created_at < now() - older_than;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    DELETE FROM herald.contact_rejections WHERE created_at < now() - older_than;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    DELETE FROM herald.feedback_rejections WHERE created_at < now() - older_than;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    DELETE FROM herald.outbox WHERE status IN ('done', 'failed') AND done_at < now() - older_than;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    DELETE FROM herald.decide_cache WHERE expires_at < now();
    GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    -- the HTTP API's idempotency keys hold for 24 hours (sql/api.sql)
    DELETE FROM herald.api_idempotency WHERE created_at < now() - interval '24 hours';
    GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    RETURN v_total;
END
$$;

ALTER TABLE herald.templates ADD COLUMN IF NOT EXISTS from_address text, ADD COLUMN IF NOT EXISTS reply_to text;

CREATE OR REPLACE FUNCTION herald._valid_mailbox(mailbox text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN coalesce(length(mailbox) <= 998
                AND mailbox !~ '[[:cntrl:]\u0080-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
                AND ((herald._valid_email(mailbox) AND mailbox !~ '[<>"]')
                     OR (mailbox ~ '^([^]<>@,;:"\\[()[:cntrl:]]+|"[^"\\]*")[[:space:]]*<[^<>]+>$'
                         AND herald._valid_email(substring(mailbox FROM '<([^<>]+)>$')))), false);

CREATE OR REPLACE FUNCTION herald._template_part(key text, version int, subject text, html text, text_body text) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE   -- STABLE like jsonb_build_object(); a stricter label would block inlining
RETURN jsonb_build_object('key', key, 'version', version, 'subject', subject, 'html', html, 'text', text_body);

CREATE OR REPLACE FUNCTION "_check_template"(
	"key" TEXT, /* & str */
	"subject" TEXT, /* & str */
	"html" TEXT, /* & str */
	"text_body" TEXT /* Option < & str > */
) RETURNS void
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_check_template_wrapper';

CREATE OR REPLACE FUNCTION "_check_broadcast_template"(
	"key" TEXT, /* & str */
	"subject" TEXT, /* & str */
	"html" TEXT, /* & str */
	"text_body" TEXT, /* Option < & str > */
	"variables" jsonb /* Option < JsonB > */
) RETURNS void
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_check_broadcast_template_wrapper';

CREATE OR REPLACE FUNCTION "_render_email"(
	"template" jsonb, /* JsonB */
	"payload" jsonb, /* JsonB */
	"workspace" TEXT, /* & str */
	"unsubscribe_url" TEXT /* Option < & str > */
) RETURNS jsonb /* JsonB */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_render_email_wrapper';

DROP FUNCTION IF EXISTS herald.upsert_template(text, text, text, text, text);

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
    PERFORM pg_advisory_xact_lock(hashtext('herald.template:' || workspace || '/' || key));
    SELECT coalesce(max(t.version), 0) + 1 INTO v_version
      FROM herald.templates t WHERE t.workspace_id = workspace AND t.key = upsert_template.key;
    INSERT INTO herald.templates (workspace_id, key, version, subject, html, text_body, from_address, reply_to)
    VALUES (workspace, key, v_version, subject, html, text_body, v_from, v_reply_to);
    RETURN v_version;
END
$$;

CREATE OR REPLACE FUNCTION herald._check_broadcast_templates(workspace text, definition jsonb) RETURNS void
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

CREATE OR REPLACE FUNCTION herald._template_payload(workspace text, key text, email text, context jsonb, provider text)
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

CREATE OR REPLACE FUNCTION herald.render_template(workspace text, key text, email text, context jsonb DEFAULT '{}')
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
    v_payload := herald._template_payload(workspace, key, to_email, context, provider);
    PERFORM herald._refuse_archived(workspace, 'send_test', ARRAY[key]);
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

ALTER FUNCTION herald.upsert_template(text, text, text, text, text, text, text) SECURITY DEFINER;

ALTER FUNCTION herald.render_template(text, text, text, jsonb) SECURITY DEFINER;

ALTER FUNCTION herald.send_test(text, text, text, jsonb, text) SECURITY DEFINER;

REVOKE ALL ON FUNCTION herald._valid_mailbox(text), herald._template_part(text, int, text, text, text), herald._check_template(text, text, text, text), herald._check_broadcast_template(text, text, text, text, jsonb), herald._render_email(jsonb, jsonb, text, text), herald._check_broadcast_templates(text, jsonb), herald._template_payload(text, text, text, jsonb, text), herald.upsert_template(text, text, text, text, text, text, text), herald.render_template(text, text, text, jsonb), herald.send_test(text, text, text, jsonb, text) FROM PUBLIC;

GRANT EXECUTE ON FUNCTION herald.upsert_template(text, text, text, text, text, text, text) TO herald_admin;

GRANT EXECUTE ON FUNCTION herald.render_template(text, text, text, jsonb), herald.send_test(text, text, text, jsonb, text) TO herald_app, herald_admin;

CREATE OR REPLACE FUNCTION herald.upsert_provider(workspace text, name text, kind text, settings jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_rate jsonb := settings -> 'rate_per_second';
    v_bad text;
    v_key text;
BEGIN
    PERFORM herald._require_workspace(workspace);
    IF name IS NULL OR name !~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$' THEN
        RAISE EXCEPTION 'invalid provider name %', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'A provider name is 1 to 64 characters: letters, digits, "_" and "-".';
    END IF;
    IF kind IS NULL OR kind NOT IN ('smtp', 'file') THEN
        RAISE EXCEPTION 'invalid provider kind %', coalesce(quote_literal(kind), 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use smtp or file.';
    END IF;
    IF jsonb_typeof(settings) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'provider settings must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT string_agg(k, ', ') INTO v_bad FROM jsonb_object_keys(settings) k WHERE k NOT IN ('rate_per_second', 'from', 'reply_to');
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown provider setting(s) %', v_bad
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'Allowed: rate_per_second, from, reply_to. Credentials belong in the sidecar''s environment (HERALD_SMTP_URL_<NAME>), never in the database.';
    END IF;
    FOREACH v_key IN ARRAY ARRAY['from', 'reply_to'] LOOP
        IF settings ? v_key AND (jsonb_typeof(settings -> v_key) <> 'string'
                                 OR NOT herald._valid_mailbox(btrim(settings ->> v_key))) THEN
            RAISE EXCEPTION 'provider %: $.%: % is not a mailbox', quote_literal(name), v_key, settings -> v_key
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Use an address (news@example.com) or a name and an address (Example News <news@example.com>; quote a name holding , ; : @ or parentheses: "Example, Inc." <news@example.com>), or leave the setting out.';
        ELSIF settings ? v_key THEN
            settings := jsonb_set(settings, ARRAY[v_key], to_jsonb(btrim(settings ->> v_key)));
        END IF;
    END LOOP;
    IF v_rate IS NOT NULL AND (jsonb_typeof(v_rate) <> 'number' OR (v_rate)::numeric <= 0
                               OR (v_rate)::numeric <> trunc((v_rate)::numeric)) THEN
        RAISE EXCEPTION 'rate_per_second must be a whole number greater than 0, got %', v_rate
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO herald.providers AS p (workspace_id, name, kind, settings) VALUES (workspace, name, kind, settings)
    ON CONFLICT ON CONSTRAINT providers_pkey DO UPDATE SET kind = EXCLUDED.kind, settings = EXCLUDED.settings, updated_at = now();
    IF v_rate IS NULL THEN
        DELETE FROM herald.rate_limits r WHERE r.key = herald._provider_rate_key(workspace, name);
    ELSE
        INSERT INTO herald.rate_limits (key, per_second) VALUES (herald._provider_rate_key(workspace, name), (v_rate)::int)
        ON CONFLICT (key) DO UPDATE SET per_second = EXCLUDED.per_second;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION herald.provider_kinds() RETURNS TABLE (workspace_id text, name text, kind text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
    SELECT p.workspace_id, p.name, p.kind FROM herald.providers p
     WHERE p.workspace_id IN (SELECT herald._my_workspaces())
     ORDER BY p.workspace_id, p.name;
$$;

ALTER FUNCTION herald.upsert_provider(text, text, text, jsonb) SECURITY DEFINER;

ALTER FUNCTION herald.provider_kinds() SECURITY DEFINER;

REVOKE ALL ON FUNCTION herald.provider_kinds() FROM PUBLIC;

GRANT EXECUTE ON FUNCTION herald.provider_kinds() TO herald_worker, herald_admin;

CREATE TABLE IF NOT EXISTS herald.api_keys (
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

CREATE INDEX IF NOT EXISTS api_keys_workspace_idx ON herald.api_keys (workspace_id, id);

CREATE TABLE IF NOT EXISTS herald.api_idempotency (
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

CREATE OR REPLACE FUNCTION herald._api_scope(operation text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE operation
    WHEN 'track' THEN 'track' WHEN 'track_many' THEN 'track'
    WHEN 'upsert_contact' THEN 'contacts' WHEN 'upsert_contacts' THEN 'contacts'
    WHEN 'send' THEN 'send'
    WHEN 'subscribe' THEN 'lists' WHEN 'unsubscribe' THEN 'lists'
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
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Scopes: track, contacts, lists, send.';
    END IF;
    SELECT string_agg(quote_nullable(s), ', ') INTO v_bad
      FROM unnest(scopes) s WHERE s IS NULL OR s NOT IN ('track', 'contacts', 'lists', 'send');
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown API key scope(s) %', v_bad
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Scopes: track, contacts, lists, send.';
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

CREATE OR REPLACE FUNCTION herald.revoke_api_key(workspace text, key_id bigint) RETURNS boolean
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

CREATE OR REPLACE FUNCTION herald.list_api_keys(workspace text)
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

CREATE OR REPLACE FUNCTION herald._api_key(secret text) RETURNS herald.api_keys
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
    END;
    replayed := false;
    IF api_call.idempotency_key IS NOT NULL THEN
        UPDATE herald.api_idempotency i SET response = api_call.response
         WHERE i.workspace_id = v_ws AND i.idempotency_key = api_call.idempotency_key;
    END IF;
    RETURN NEXT;
END
$$;

ALTER FUNCTION herald.create_api_key(text, text, text[]) SECURITY DEFINER;

ALTER FUNCTION herald.revoke_api_key(text, bigint) SECURITY DEFINER;

ALTER FUNCTION herald.list_api_keys(text) SECURITY DEFINER;

ALTER FUNCTION herald.api_call(text, text, jsonb, text) SECURITY DEFINER;

REVOKE ALL ON FUNCTION herald._api_scope(text), herald._api_key(text), herald.create_api_key(text, text, text[]),
    herald.revoke_api_key(text, bigint), herald.list_api_keys(text), herald.api_call(text, text, jsonb, text) FROM PUBLIC;

GRANT EXECUTE ON FUNCTION
    herald.create_api_key(text, text, text[]), herald.revoke_api_key(text, bigint), herald.list_api_keys(text)
TO herald_admin;

GRANT EXECUTE ON FUNCTION herald.api_call(text, text, jsonb, text) TO herald_worker, herald_admin;

ALTER TABLE herald.api_keys ENABLE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS tenant ON herald.api_keys;
CREATE POLICY tenant ON herald.api_keys USING (workspace_id IN (SELECT herald._my_workspaces()));

ALTER TABLE herald.api_idempotency ENABLE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS tenant ON herald.api_idempotency;
CREATE POLICY tenant ON herald.api_idempotency USING (workspace_id IN (SELECT herald._my_workspaces()));

CREATE TABLE IF NOT EXISTS herald.archived (
    workspace_id text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('template', 'list', 'broadcast')),
    name         text NOT NULL,
    archived_by  name NOT NULL,
    archived_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, kind, name)
);

CREATE TABLE IF NOT EXISTS herald.feedback_rejections (
    workspace_id text NOT NULL,
    batch        bigint NOT NULL,
    position     int NOT NULL,          -- 0-based index in the feedback array
    input        jsonb,
    reason       text NOT NULL,
    broadcast_id bigint,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, batch, position)
);

SELECT pg_catalog.pg_extension_config_dump('herald.archived', '');

SELECT pg_catalog.pg_extension_config_dump('herald.feedback_rejections', '');

CREATE OR REPLACE FUNCTION herald._definition_templates(definition jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT coalesce(array_agg(DISTINCT n.node ->> 'template'), '{}')
          FROM jsonb_each(CASE WHEN jsonb_typeof(definition -> 'nodes') = 'object' THEN definition -> 'nodes' END) n(id, node)
         WHERE n.node ->> 'type' = 'email' AND n.node ->> 'template' IS NOT NULL);

CREATE OR REPLACE FUNCTION herald._definition_lists(definition jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT coalesce(array_agg(DISTINCT l.name), '{}') FROM (
            SELECT jsonb_array_elements_text(x) AS name
              FROM jsonb_path_query(definition, 'lax $.nodes.*.add_lists') x WHERE jsonb_typeof(x) = 'array'
            UNION ALL
            SELECT jsonb_array_elements_text(x)
              FROM jsonb_path_query(definition, 'lax $.nodes.*.remove_lists') x WHERE jsonb_typeof(x) = 'array'
            UNION ALL
            SELECT CASE jsonb_typeof(v) WHEN 'string' THEN v #>> '{}' END
              FROM jsonb_path_query(definition, 'lax $.**.value') v
             WHERE jsonb_typeof(v) = 'string'
               AND jsonb_path_exists(definition, 'lax $.** ? (@.event starts with "list.")')
            UNION ALL
            SELECT jsonb_array_elements_text(v)
              FROM jsonb_path_query(definition, 'lax $.**.value') v
             WHERE jsonb_typeof(v) = 'array'
               AND jsonb_path_exists(definition, 'lax $.** ? (@.event starts with "list.")')) l
         WHERE l.name IS NOT NULL);

CREATE OR REPLACE FUNCTION herald._refuse_archived(workspace text, what text, templates text[], lists text[] DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_archived text;
    v_hint text;
BEGIN
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

CREATE OR REPLACE FUNCTION herald._template_users(workspace text, key text) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, herald, pg_temp
BEGIN ATOMIC
    SELECT nullif(concat_ws('; ',
        (SELECT 'automation(s) ' || string_agg(DISTINCT format('%s (%s)', a.id, a.status), ', ')
           FROM herald.automations a
           JOIN herald.automation_versions v ON v.workspace_id = a.workspace_id AND v.automation_id = a.id
          WHERE a.workspace_id = _template_users.workspace AND a.status IN ('live', 'paused')
            AND _template_users.key = ANY (herald._definition_templates(v.definition))),
        (SELECT 'broadcast(s) ' || string_agg(format('%s (%s)', b.id, b.status), ', ' ORDER BY b.id)
           FROM herald.broadcasts b
          WHERE b.workspace_id = _template_users.workspace AND b.status IN ('draft', 'scheduled', 'sending', 'paused')
            AND EXISTS (SELECT 1 FROM jsonb_array_elements(b.definition -> 'variations') x
                         WHERE x ->> 'template' = _template_users.key)),
        (SELECT count(*) || ' email job(s) not yet sent'
           FROM herald.outbox o
          WHERE o.workspace_id = _template_users.workspace AND o.status IN ('pending', 'leased') AND o.kind = 'email'
            AND o.broadcast_id IS NULL AND o.payload ->> 'template' = _template_users.key
         HAVING count(*) > 0)), '');
END;

CREATE OR REPLACE FUNCTION herald._list_users(workspace text, name text) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, herald, pg_temp
BEGIN ATOMIC
    SELECT nullif(concat_ws('; ',
        (SELECT 'automation(s) ' || string_agg(DISTINCT format('%s (%s)', a.id, a.status), ', ')
           FROM herald.automations a
           JOIN herald.automation_versions v ON v.workspace_id = a.workspace_id AND v.automation_id = a.id
          WHERE a.workspace_id = _list_users.workspace AND a.status IN ('live', 'paused')
            AND _list_users.name = ANY (herald._definition_lists(v.definition))),
        (SELECT 'broadcast(s) ' || string_agg(format('%s (%s)', b.id, b.status), ', ' ORDER BY b.id)
           FROM herald.broadcasts b
          WHERE b.workspace_id = _list_users.workspace AND b.status IN ('draft', 'scheduled', 'sending', 'paused')
            AND b.definition -> 'lists' ? _list_users.name)), '');
END;

CREATE OR REPLACE FUNCTION herald._lock_template(workspace text, key text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    PERFORM herald._require_workspace(workspace);
    PERFORM pg_advisory_xact_lock(hashtext('herald.template:' || workspace || '/' || key));
    IF NOT EXISTS (SELECT 1 FROM herald.templates t WHERE t.workspace_id = workspace AND t.key = _lock_template.key) THEN
        RAISE EXCEPTION 'unknown template % in workspace %', coalesce(quote_literal(key), 'NULL'), quote_literal(workspace)
            USING ERRCODE = 'no_data_found';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION herald.archive_template(workspace text, key text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_users text;
    v_new boolean;
BEGIN
    PERFORM herald._lock_template(workspace, key);
    v_users := herald._template_users(workspace, key);
    IF v_users IS NOT NULL THEN
        RAISE EXCEPTION 'template % is in use and cannot be archived: %', quote_literal(key), v_users
            USING ERRCODE = 'object_in_use',
                  HINT = 'Archive the automations first (set_automation_status(id, ''archived'')), let the broadcasts finish or cancel them, and let the jobs be sent.';
    END IF;
    INSERT INTO herald.archived (workspace_id, kind, name, archived_by) VALUES (workspace, 'template', key, herald._caller())
    ON CONFLICT ON CONSTRAINT archived_pkey DO NOTHING
    RETURNING true INTO v_new;
    RETURN coalesce(v_new, false);
END
$$;

CREATE OR REPLACE FUNCTION herald.unarchive_template(workspace text, key text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_n int;
BEGIN
    PERFORM herald._lock_template(workspace, key);
    DELETE FROM herald.archived a WHERE a.workspace_id = workspace AND a.kind = 'template' AND a.name = key;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n > 0;
END
$$;

CREATE OR REPLACE FUNCTION herald.delete_template(workspace text, key text) RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_users text;
    v_n int;
BEGIN
    PERFORM herald._lock_template(workspace, key);
    v_users := herald._template_users(workspace, key);
    IF v_users IS NOT NULL THEN
        RAISE EXCEPTION 'template % is in use and cannot be deleted: %', quote_literal(key), v_users
            USING ERRCODE = 'object_in_use',
                  HINT = 'Archive the automations first (set_automation_status(id, ''archived'')), let the broadcasts finish or cancel them, and let the jobs be sent.';
    END IF;
    DELETE FROM herald.archived a WHERE a.workspace_id = workspace AND a.kind = 'template' AND a.name = key;
    DELETE FROM herald.templates t WHERE t.workspace_id = workspace AND t.key = delete_template.key;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;

CREATE OR REPLACE FUNCTION herald._lock_list(workspace text, name text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    PERFORM herald._require_workspace(workspace);
    PERFORM pg_advisory_xact_lock(hashtext('herald.list:' || workspace || '/' || name));
    IF NOT EXISTS (SELECT 1 FROM herald.lists l WHERE l.workspace_id = workspace AND l.name = _lock_list.name)
       AND NOT EXISTS (SELECT 1 FROM herald.list_members m WHERE m.workspace_id = workspace AND m.list = _lock_list.name) THEN
        RAISE EXCEPTION 'unknown list % in workspace %', coalesce(quote_literal(name), 'NULL'), quote_literal(workspace)
            USING ERRCODE = 'no_data_found', HINT = 'herald.list_overview lists them.';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION herald.archive_list(workspace text, name text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_users text;
    v_new boolean;
BEGIN
    PERFORM herald._lock_list(workspace, name);
    v_users := herald._list_users(workspace, name);
    IF v_users IS NOT NULL THEN
        RAISE EXCEPTION 'list % is in use and cannot be archived: %', quote_literal(name), v_users
            USING ERRCODE = 'object_in_use',
                  HINT = 'Archive the automations first (set_automation_status(id, ''archived'')), and let the broadcasts finish or cancel them.';
    END IF;
    INSERT INTO herald.archived (workspace_id, kind, name, archived_by) VALUES (workspace, 'list', name, herald._caller())
    ON CONFLICT ON CONSTRAINT archived_pkey DO NOTHING
    RETURNING true INTO v_new;
    RETURN coalesce(v_new, false);
END
$$;

CREATE OR REPLACE FUNCTION herald.unarchive_list(workspace text, name text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_n int;
BEGIN
    PERFORM herald._lock_list(workspace, name);
    DELETE FROM herald.archived a WHERE a.workspace_id = workspace AND a.kind = 'list' AND a.name = unarchive_list.name;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n > 0;
END
$$;

CREATE OR REPLACE FUNCTION herald.delete_list(workspace text, name text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_users text;
    v_n int;
BEGIN
    PERFORM herald._lock_list(workspace, name);
    v_users := herald._list_users(workspace, name);
    IF v_users IS NOT NULL THEN
        RAISE EXCEPTION 'list % is in use and cannot be deleted: %', quote_literal(name), v_users
            USING ERRCODE = 'object_in_use',
                  HINT = 'Archive the automations first (set_automation_status(id, ''archived'')), and let the broadcasts finish or cancel them.';
    END IF;
    DELETE FROM herald.archived a WHERE a.workspace_id = workspace AND a.kind = 'list' AND a.name = delete_list.name;
    DELETE FROM herald.lists l WHERE l.workspace_id = workspace AND l.name = delete_list.name;
    DELETE FROM herald.list_members m WHERE m.workspace_id = workspace AND m.list = delete_list.name;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN jsonb_build_object('list', name, 'members', v_n);
END
$$;

CREATE OR REPLACE FUNCTION herald._broadcast_at_rest(v herald.broadcasts, what text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF v.status IN ('scheduled', 'sending', 'paused') THEN
        RAISE EXCEPTION 'broadcast % is %: it cannot be %', v.id, v.status, what
            USING ERRCODE = 'object_in_use', HINT = format('Cancel it first: herald.cancel_broadcast(%s).', v.id);
    END IF;
    IF v.settle_cursor IS NOT NULL
       OR EXISTS (SELECT 1 FROM herald.outbox o WHERE o.broadcast_id = v.id AND o.status IN ('pending', 'leased', 'held')) THEN
        RAISE EXCEPTION 'broadcast % is % but some of its jobs are not settled yet: it cannot be %', v.id, v.status, what
            USING ERRCODE = 'object_in_use',
                  HINT = 'herald.advance_broadcasts() settles them (the daemon calls it); jobs handed to a daemon finish first.';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION herald.archive_broadcast(broadcast bigint) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.broadcasts := herald._lock_broadcast(broadcast);
    v_new boolean;
BEGIN
    PERFORM herald._broadcast_at_rest(v, 'archived');
    INSERT INTO herald.archived (workspace_id, kind, name, archived_by)
    VALUES (v.workspace_id, 'broadcast', v.id::text, herald._caller())
    ON CONFLICT ON CONSTRAINT archived_pkey DO NOTHING
    RETURNING true INTO v_new;
    RETURN coalesce(v_new, false);
END
$$;

CREATE OR REPLACE FUNCTION herald.unarchive_broadcast(broadcast bigint) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.broadcasts := herald._lock_broadcast(broadcast);
    v_n int;
BEGIN
    DELETE FROM herald.archived a WHERE a.workspace_id = v.workspace_id AND a.kind = 'broadcast' AND a.name = v.id::text;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n > 0;
END
$$;

CREATE OR REPLACE FUNCTION herald._refuse_archived_broadcast(v herald.broadcasts) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM herald.archived a
                WHERE a.workspace_id = v.workspace_id AND a.kind = 'broadcast' AND a.name = v.id::text) THEN
        RAISE EXCEPTION 'broadcast % is archived', v.id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Restore it first: herald.unarchive_broadcast(%s).', v.id);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION herald.delete_broadcast(broadcast bigint) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.broadcasts := herald._lock_broadcast(broadcast);
    v_resends text;
    v_jobs int;
    v_stats int;
    v_n int;
BEGIN
    PERFORM herald._broadcast_at_rest(v, 'deleted');
    SELECT string_agg(format('%s (%s)', r.id, r.status), ', ' ORDER BY r.id) INTO v_resends
      FROM herald.broadcasts r
     WHERE r.workspace_id = v.workspace_id AND r.retry_of = v.id AND r.status IN ('draft', 'scheduled', 'sending', 'paused');
    IF v_resends IS NOT NULL THEN
        RAISE EXCEPTION 'broadcast % cannot be deleted: resend_failed broadcast(s) % read its failed recipients', v.id, v_resends
            USING ERRCODE = 'object_in_use', HINT = 'Let them finish, or cancel them, first.';
    END IF;
    DELETE FROM herald.outbox o WHERE o.broadcast_id = v.id;
    GET DIAGNOSTICS v_jobs = ROW_COUNT;
    DELETE FROM herald.broadcast_stats s WHERE s.workspace_id = v.workspace_id AND s.broadcast_id = v.id;
    GET DIAGNOSTICS v_stats = ROW_COUNT;
    DELETE FROM herald.broadcast_stats_delta d WHERE d.workspace_id = v.workspace_id AND d.broadcast_id = v.id;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    DELETE FROM herald.feedback_rejections r WHERE r.workspace_id = v.workspace_id AND r.broadcast_id = v.id;
    DELETE FROM herald.rate_limits r WHERE r.key = herald._broadcast_rate_key(v.id);
    DELETE FROM herald.archived a WHERE a.workspace_id = v.workspace_id AND a.kind = 'broadcast' AND a.name = v.id::text;
    DELETE FROM herald.broadcasts b WHERE b.workspace_id = v.workspace_id AND b.id = v.id;
    RETURN jsonb_build_object('broadcast', v.id, 'jobs', v_jobs, 'stats', v_stats + v_n);
END
$$;

CREATE OR REPLACE FUNCTION herald.create_automation(workspace text, definition jsonb) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_checked jsonb;
    v_id bigint;
BEGIN
    PERFORM herald._require_workspace(workspace);
    -- raises "invalid automation definition: <path>: <fault>" naming every fault
    v_checked := herald._check_automation(definition);
    PERFORM herald._refuse_archived(workspace, 'create_automation', herald._definition_templates(definition),
                                    herald._definition_lists(definition));
    INSERT INTO herald.automations (workspace_id, name, definition, trigger_event, trigger_filter, filter_reads_contact,
                                    reentry, start_node)
    VALUES (workspace, v_checked ->> 'name', definition, v_checked ->> 'trigger_event',
            nullif(v_checked -> 'trigger_filter', 'null'), (v_checked ->> 'filter_reads_contact')::boolean,
            v_checked ->> 'reentry', v_checked ->> 'start')
    RETURNING id INTO v_id;
    -- version 1 (sql/versions.sql: update_automation makes the next ones)
    INSERT INTO herald.automation_versions (workspace_id, automation_id, version, definition, start_node, created_by)
    VALUES (workspace, v_id, 1, definition, v_checked ->> 'start', herald._caller());
    RETURN v_id;
END
$$;

CREATE OR REPLACE FUNCTION herald.schedule_broadcast(broadcast bigint, at timestamptz DEFAULT now()) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.broadcasts := herald._lock_broadcast(broadcast);
    v_fixed boolean;
    v_send_at timestamptz;
BEGIN
    IF v.status <> 'draft' THEN
        RAISE EXCEPTION 'broadcast % is %, only a draft can be scheduled', v.id, v.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    PERFORM herald._refuse_archived_broadcast(v);
    IF at IS NULL THEN
        RAISE EXCEPTION 'at must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- a send_at.at in the definition wins over at; it was in the future when the broadcast was created,
    -- not necessarily now
    v_fixed := v.definition -> 'send_at' ->> 'kind' = 'at';
    v_send_at := CASE WHEN v_fixed THEN (v.definition -> 'send_at' ->> 'at')::timestamptz ELSE at END;
    IF v_send_at < now() - interval '1 minute' THEN
        RAISE EXCEPTION 'broadcast %: the time to send at (%) is in the past', v.id,
            CASE WHEN v_fixed THEN 'send_at.at of its definition' ELSE 'at' END
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Schedule it for now (herald.schedule_broadcast(id)) or a future time; a send_at.at in its definition wins over at.';
    END IF;
    UPDATE herald.broadcasts b
       SET status = 'scheduled', updated_at = now(), send_at = v_send_at
     WHERE b.workspace_id = v.workspace_id AND b.id = v.id;
    PERFORM pg_notify('herald.tick', '');
END
$$;

CREATE OR REPLACE VIEW herald.broadcast_overview AS
SELECT b.workspace_id, b.id, b.name, b.status, b.phase, b.send_at, b.enqueued, b.winner, b.winner_reason,
       b.retry_of, b.last_error, b.created_at, b.finished_at
  FROM herald.broadcasts b
 WHERE NOT EXISTS (SELECT 1 FROM herald.archived a
                    WHERE a.workspace_id = b.workspace_id AND a.kind = 'broadcast' AND a.name = b.id::text);

CREATE OR REPLACE VIEW herald.list_overview AS
SELECT n.workspace_id, n.name AS list, l.description,
       count(m.contact_id) FILTER (WHERE m.status = 'subscribed') AS subscribed,
       count(m.contact_id) FILTER (WHERE m.status = 'unsubscribed') AS unsubscribed,
       l.created_at
  FROM (SELECT workspace_id, name FROM herald.lists
        UNION
        SELECT DISTINCT workspace_id, list FROM herald.list_members) n
  LEFT JOIN herald.lists l ON l.workspace_id = n.workspace_id AND l.name = n.name
  LEFT JOIN herald.list_members m ON m.workspace_id = n.workspace_id AND m.list = n.name
 WHERE NOT EXISTS (SELECT 1 FROM herald.archived a WHERE a.workspace_id = n.workspace_id AND a.kind = 'list' AND a.name = n.name)
 GROUP BY n.workspace_id, n.name, l.description, l.created_at;

CREATE OR REPLACE FUNCTION herald._ab_winner(v herald.broadcasts, OUT winner text, OUT reason text)
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_metric text := v.definition -> 'ab_test' ->> 'metric';
    v_kind text := CASE v_metric WHEN 'clicks' THEN 'email.clicked' ELSE 'email.opened' END;
    v_min constant int := 5;   -- fewer engaged recipients than this in total: no evidence either way
    r record;
    v_total bigint := 0;
    v_best_rate float8 := -1;
    v_best text;
    v_tied int := 0;
    v_detail text := '';
    v_unattributed bigint;
    v_note text;
BEGIN
    -- one row per variation (at most 26): sent test messages, unique engaged recipients, their rate
    FOR r IN
        WITH sent AS (
            SELECT o.variation, count(*) AS n FROM herald.outbox o
             WHERE o.workspace_id = v.workspace_id AND o.broadcast_id = v.id AND o.status = 'done'
             GROUP BY o.variation
        ), engaged AS (
            SELECT e.payload ->> 'variation' AS variation, count(DISTINCT e.contact_id) AS n
              FROM herald.events e
             WHERE e.workspace_id = v.workspace_id AND (e.payload ->> 'broadcast') = v.id::text AND e.kind = v_kind
             GROUP BY 1
        )
        SELECT x.value ->> 'key' AS variation, coalesce(s.n, 0) AS sent, coalesce(g.n, 0) AS engaged,
               CASE WHEN coalesce(s.n, 0) = 0 THEN 0 ELSE coalesce(g.n, 0)::float8 / s.n END AS rate
          FROM jsonb_array_elements(v.definition -> 'variations') WITH ORDINALITY x(value, ord)
          LEFT JOIN sent s ON s.variation = x.value ->> 'key'
          LEFT JOIN engaged g ON g.variation = x.value ->> 'key'
         ORDER BY x.ord
    LOOP
        v_total := v_total + r.engaged;
        v_detail := v_detail || CASE WHEN v_detail = '' THEN '' ELSE ', ' END
                    || format('%s: %s of %s', r.variation, r.engaged, r.sent);
        IF r.rate > v_best_rate THEN
            v_best_rate := r.rate; v_best := r.variation; v_tied := 1;
        ELSIF r.rate = v_best_rate THEN
            v_tied := v_tied + 1;
        END IF;
    END LOOP;
    SELECT coalesce(sum(x.n), 0) INTO v_unattributed FROM (
        SELECT s.value AS n FROM herald.broadcast_stats s
         WHERE s.workspace_id = v.workspace_id AND s.broadcast_id = v.id AND s.variation = ''
           AND s.metric = replace(v_kind, 'email.', '') || '_unattributed'
        UNION ALL
        SELECT d.n FROM herald.broadcast_stats_delta d
         WHERE d.workspace_id = v.workspace_id AND d.broadcast_id = v.id AND d.variation = ''
           AND d.metric = replace(v_kind, 'email.', '') || '_unattributed'
        UNION ALL
        SELECT count(DISTINCT e.contact_id) FROM herald.events e
         WHERE e.workspace_id = v.workspace_id AND (e.payload ->> 'broadcast') = v.id::text AND e.kind = v_kind
           AND NOT coalesce(e.payload ->> 'variation' IN (SELECT x ->> 'key' FROM jsonb_array_elements(v.definition -> 'variations') x), false)) x;
    IF v_unattributed > 0 THEN
        v_note := format('%s %s could not be attributed to a variation (no message_id and no sent message of this broadcast '
                         'to that address, or another variation named: see herald.feedback_rejections)', v_unattributed, v_metric);
    END IF;
    IF v_total < v_min THEN
        winner := v.definition -> 'variations' -> 0 ->> 'key';
        reason := CASE WHEN v_note IS NULL
                       THEN format('sample too small: %s unique %s in all (%s), fewer than %s; sending the first variation',
                                   v_total, v_metric, v_detail, v_min)
                       ELSE format('sample too small: %s unique %s attributed (%s), fewer than %s; %s; sending the first variation',
                                   v_total, v_metric, v_detail, v_min, v_note) END;
    ELSIF v_tied > 1 THEN
        winner := v_best;
        reason := format('tie on %s rate (%s); the first tied variation wins', v_metric, v_detail)
                  || coalesce('; ' || v_note, '');
    ELSE
        winner := v_best;
        reason := format('highest %s rate, %s%% (%s)', v_metric, round((v_best_rate * 100)::numeric, 1), v_detail)
                  || coalesce('; ' || v_note, '');
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION herald.broadcast_stats(broadcast bigint)
RETURNS TABLE (variation text, metric text, value bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_ws text;
BEGIN
    SELECT b.workspace_id INTO v_ws FROM herald.broadcasts b WHERE b.id = broadcast;
    IF v_ws IS NULL THEN
        RAISE EXCEPTION 'broadcast % does not exist', coalesce(broadcast::text, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM herald._authorize(v_ws, format('broadcast %s', broadcast));
    RETURN QUERY
    SELECT x.variation, x.metric, sum(x.n)::bigint FROM (
        SELECT s.variation, s.metric, s.value AS n FROM herald.broadcast_stats s
         WHERE s.workspace_id = v_ws AND s.broadcast_id = broadcast
        UNION ALL
        SELECT d.variation, d.metric, d.n FROM herald.broadcast_stats_delta d
         WHERE d.workspace_id = v_ws AND d.broadcast_id = broadcast
        UNION ALL
        SELECT coalesce(e.payload ->> 'variation', ''), CASE e.kind WHEN 'email.opened' THEN 'opened' ELSE 'clicked' END,
               count(DISTINCT e.contact_id)
          FROM herald.events e
         WHERE e.workspace_id = v_ws AND (e.payload ->> 'broadcast') = broadcast::text
           AND e.kind IN ('email.opened', 'email.clicked')
         GROUP BY 1, 2) x
     GROUP BY 1, 2
     ORDER BY 1, 2;
END
$$;

ALTER FUNCTION herald.create_automation(text, jsonb) SECURITY DEFINER;

ALTER FUNCTION herald.schedule_broadcast(bigint, timestamptz) SECURITY DEFINER;

ALTER FUNCTION herald.broadcast_stats(bigint) SECURITY DEFINER;

ALTER FUNCTION herald.archive_template(text, text) SECURITY DEFINER;

ALTER FUNCTION herald.unarchive_template(text, text) SECURITY DEFINER;

ALTER FUNCTION herald.delete_template(text, text) SECURITY DEFINER;

ALTER FUNCTION herald.archive_list(text, text) SECURITY DEFINER;

ALTER FUNCTION herald.unarchive_list(text, text) SECURITY DEFINER;

ALTER FUNCTION herald.delete_list(text, text) SECURITY DEFINER;

ALTER FUNCTION herald.archive_broadcast(bigint) SECURITY DEFINER;

ALTER FUNCTION herald.unarchive_broadcast(bigint) SECURITY DEFINER;

ALTER FUNCTION herald.delete_broadcast(bigint) SECURITY DEFINER;

REVOKE ALL ON FUNCTION herald._definition_templates(jsonb), herald._definition_lists(jsonb),
    herald._refuse_archived(text, text, text[], text[]), herald._template_users(text, text), herald._list_users(text, text),
    herald._lock_template(text, text), herald._lock_list(text, text), herald._broadcast_at_rest(herald.broadcasts, text),
    herald._refuse_archived_broadcast(herald.broadcasts),
    herald.archive_template(text, text), herald.unarchive_template(text, text), herald.delete_template(text, text),
    herald.archive_list(text, text), herald.unarchive_list(text, text), herald.delete_list(text, text),
    herald.archive_broadcast(bigint), herald.unarchive_broadcast(bigint), herald.delete_broadcast(bigint)
FROM PUBLIC;

GRANT EXECUTE ON FUNCTION
    herald.archive_template(text, text), herald.unarchive_template(text, text), herald.delete_template(text, text),
    herald.archive_broadcast(bigint), herald.unarchive_broadcast(bigint), herald.delete_broadcast(bigint)
TO herald_admin;

GRANT EXECUTE ON FUNCTION
    herald.archive_list(text, text), herald.unarchive_list(text, text), herald.delete_list(text, text)
TO herald_app, herald_admin;

ALTER VIEW herald.broadcast_overview SET (security_invoker = true);

ALTER VIEW herald.list_overview SET (security_invoker = true);

GRANT SELECT ON herald.archived, herald.feedback_rejections TO herald_app, herald_admin;

ALTER TABLE herald.archived ENABLE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS tenant ON herald.archived;
CREATE POLICY tenant ON herald.archived USING (workspace_id IN (SELECT herald._my_workspaces()));

ALTER TABLE herald.feedback_rejections ENABLE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS tenant ON herald.feedback_rejections;
CREATE POLICY tenant ON herald.feedback_rejections USING (workspace_id IN (SELECT herald._my_workspaces()));

ALTER FUNCTION herald.upsert_contacts(text, jsonb) SECURITY DEFINER;

CREATE OR REPLACE FUNCTION herald.subscribe(workspace text, list text, emails text[])
RETURNS TABLE (subscribed bigint, already bigint, rejected bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off
AS $$
DECLARE
    v_valid jsonb;
BEGIN
    PERFORM herald.create_list(workspace, list);
    -- leaving an archived list stays possible (unsubscribe); joining it is refused
    PERFORM herald._refuse_archived(workspace, format('subscribe to list %s', quote_literal(list)), '{}', ARRAY[list]);
    IF emails IS NULL THEN
        RAISE EXCEPTION 'emails must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF cardinality(emails) > 100000 THEN
        RAISE EXCEPTION 'at most 100000 addresses per call, got %', cardinality(emails) USING ERRCODE = 'program_limit_exceeded';
    END IF;
    SELECT jsonb_agg(jsonb_build_object('email', e)) INTO v_valid
      FROM (SELECT DISTINCT herald._normalize_email(u.e) AS e FROM unnest(emails) u(e)
             WHERE herald._valid_email(herald._normalize_email(u.e))) v;
    -- missing contacts are created the way every import creates them
    PERFORM herald.upsert_contacts(workspace, coalesce(v_valid, '[]'));
    WITH wanted AS (
        SELECT c.id FROM jsonb_array_elements(coalesce(v_valid, '[]')) v(x)
         CROSS JOIN LATERAL (SELECT c.id FROM herald.contacts c
                              WHERE c.email = v.x ->> 'email' AND c.workspace_id IS NOT DISTINCT FROM workspace LIMIT 1) c
    ), joined AS (
        INSERT INTO herald.list_members AS m (workspace_id, list, contact_id, status)
        SELECT subscribe.workspace, subscribe.list, w.id, 'subscribed' FROM wanted w ORDER BY w.id
        ON CONFLICT ON CONSTRAINT list_members_pkey DO UPDATE SET status = 'subscribed', updated_at = now()
         WHERE m.status <> 'subscribed'
        RETURNING m.contact_id
    ), announced AS (
        INSERT INTO herald.events (workspace_id, contact_id, kind, payload)
        SELECT subscribe.workspace, j.contact_id, 'list.joined', jsonb_build_object('list', subscribe.list)
          FROM joined j ORDER BY j.contact_id
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM announced),
           cardinality(emails) - (SELECT count(*) FROM announced)
               - (SELECT count(*) FROM unnest(emails) u(e) WHERE NOT herald._valid_email(herald._normalize_email(u.e))),
           (SELECT count(*) FROM unnest(emails) u(e) WHERE NOT herald._valid_email(herald._normalize_email(u.e)))
      INTO subscribed, already, rejected;
    RETURN NEXT;
END
$$;

ALTER FUNCTION herald.subscribe(text, text, text[]) SECURITY DEFINER;

CREATE OR REPLACE FUNCTION herald._audience_range(workspace text, after bigint, lim int, segment jsonb, exclude jsonb)
RETURNS TABLE (contact_id bigint, timezone text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
SET plan_cache_mode = force_custom_plan
SET enable_bitmapscan = off
SET enable_sort = off
AS $$
BEGIN
    RETURN QUERY
    SELECT c.id, c.timezone
      FROM herald.contacts c
     WHERE c.workspace_id = workspace AND c.id > after
       AND NOT EXISTS (SELECT 1 FROM herald.suppressions s WHERE s.workspace_id = c.workspace_id AND s.email = c.email)
       AND (segment IS NULL
            OR herald._matches(segment, herald._contact_facts(c.email, c.attributes, c.timezone, c.tags), NULL, NULL))
       AND (exclude IS NULL
            OR NOT herald._matches(exclude, herald._contact_facts(c.email, c.attributes, c.timezone, c.tags), NULL, NULL))
     ORDER BY c.id
     LIMIT lim;
END
$$;

CREATE OR REPLACE FUNCTION herald._audience(workspace text, after bigint, lim int, lists text[], segment_contains jsonb,
                                 segment_any jsonb[], segment_tags text[], segment_emails text[],
                                 segment jsonb, exclude jsonb, failed_of bigint)
RETURNS TABLE (contact_id bigint, timezone text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
SET plan_cache_mode = force_custom_plan
AS $$
BEGIN
    IF lists IS NULL AND segment_contains IS NULL AND segment_any IS NULL AND segment_tags IS NULL
       AND segment_emails IS NULL AND failed_of IS NULL AND lim <= 100000 THEN
        -- a page (enqueue's chunks); a read of the whole audience (preview) keeps the planner's plan
        RETURN QUERY SELECT r.contact_id, r.timezone FROM herald._audience_range(workspace, after, lim, segment, exclude) r;
        RETURN;
    END IF;
    RETURN QUERY
    SELECT c.id, c.timezone
      FROM herald.contacts c
     WHERE c.workspace_id = workspace AND c.id > after
       AND (lists IS NULL
            OR EXISTS (SELECT 1 FROM herald.list_members m
                        WHERE m.workspace_id = c.workspace_id AND m.contact_id = c.id AND m.status = 'subscribed'
                          AND m.list = ANY (lists)))
       AND NOT EXISTS (SELECT 1 FROM herald.suppressions s WHERE s.workspace_id = c.workspace_id AND s.email = c.email)
       -- resend_failed: the failed recipients, read once per page (a set the contacts are tested against,
       -- not a probe per contact through every failed job of the broadcast)
       AND (failed_of IS NULL
            OR c.id IN (SELECT o.contact_id FROM herald.outbox o
                         WHERE o.broadcast_id = failed_of AND o.status IN ('failed', 'dead')))
       AND (segment_contains IS NULL OR c.attributes @> segment_contains)
       AND (segment_any IS NULL OR c.attributes @> ANY (segment_any))
       AND (segment_tags IS NULL OR c.tags @> segment_tags)
       AND (segment_emails IS NULL OR c.email = ANY (segment_emails))
       AND (segment IS NULL
            OR herald._matches(segment, herald._contact_facts(c.email, c.attributes, c.timezone, c.tags), NULL, NULL))
       AND (exclude IS NULL
            OR NOT herald._matches(exclude, herald._contact_facts(c.email, c.attributes, c.timezone, c.tags), NULL, NULL))
     ORDER BY c.id
     LIMIT lim;
END
$$;

REVOKE ALL ON FUNCTION herald._audience_range(text, bigint, int, jsonb, jsonb) FROM PUBLIC;

ALTER FUNCTION herald._dispatch() SECURITY DEFINER;
ALTER FUNCTION herald.send(text, text, text, jsonb, text, text) SECURITY DEFINER;
ALTER FUNCTION herald.claim(text, int, interval) SECURITY DEFINER;
ALTER FUNCTION herald.complete(jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.tick(int) SECURITY DEFINER;
ALTER FUNCTION herald.create_broadcast(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.advance_results(int) SECURITY DEFINER;
ALTER FUNCTION herald.set_automation_status(bigint, text) SECURITY DEFINER;
ALTER FUNCTION herald.update_automation(bigint, jsonb, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.record_feedback(jsonb, text) SECURITY DEFINER;
ALTER FUNCTION herald.prune(interval, interval) SECURITY DEFINER;
ALTER VIEW herald.result_subscription_overview SET (security_invoker = true);-- ---------------------------------------------------------------------------------------------------
-- Changes made after 0.4.0's first landing (session 7 onwards). Each change: its CREATE OR REPLACE /
-- ALTER here, then ALTER FUNCTION … SECURITY DEFINER again where sql/security.sql sets it.

-- queue (issue 14): claim skip-scans (workspace, priority) pairs, reading only the first entry of each
-- (a backlog due later costs one probe per pair); its lease goes by id without a join; complete does
-- not probe for enrollments waiting on a broadcast's jobs. (begin issue-14-queue)
CREATE OR REPLACE FUNCTION herald.claim(worker text, max_jobs int DEFAULT 100, lease interval DEFAULT '60 seconds')
RETURNS SETOF herald.job
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
AS $$
DECLARE
    v_ids bigint[];
    v_keys text[];
    v_now timestamptz;
    v_screen boolean;
BEGIN
    IF worker IS NULL OR btrim(worker) = '' THEN
        RAISE EXCEPTION 'worker must be a non-empty name' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_jobs IS NULL OR max_jobs < 1 OR max_jobs > 10000 THEN
        RAISE EXCEPTION 'max_jobs must be between 1 and 10000, got %', coalesce(max_jobs::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF lease IS NULL OR lease <= interval '0' OR lease > interval '1 day' THEN
        RAISE EXCEPTION 'lease must be longer than 0 and at most 1 day, got %', coalesce(lease::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- 1. pick and lock
    WITH RECURSIVE pairs AS (
        -- a skip-scan over the (workspace, priority) pairs that have pending jobs: each step reads only
        -- the first entry of the next pair in outbox_pending_idx, i.e. its earliest run_at, so it costs
        -- one index probe per pair however many jobs wait behind it (a backlog due tomorrow costs nothing)
        (SELECT o.workspace_id, o.priority, o.run_at FROM herald.outbox o
          WHERE o.status = 'pending'
          ORDER BY o.workspace_id, o.priority, o.run_at LIMIT 1)
        UNION ALL
        SELECT n.workspace_id, n.priority, n.run_at
          FROM pairs p
         CROSS JOIN LATERAL (SELECT o.workspace_id, o.priority, o.run_at FROM herald.outbox o
                              WHERE o.status = 'pending' AND (o.workspace_id, o.priority) > (p.workspace_id, p.priority)
                              ORDER BY o.workspace_id, o.priority, o.run_at LIMIT 1) n
    ), workspaces AS (
        -- busy: a workspace whose earliest job of some priority is due
        SELECT d.workspace_id, count(*) OVER () AS n
          FROM (SELECT DISTINCT p.workspace_id FROM pairs p WHERE p.run_at <= now()) d
    ), offered AS (
        -- locked while scanned (SKIP LOCKED inside the per-workspace scan), so rows another claimer holds
        -- do not use up the limit; rows offered but not picked are released when claim commits. One scan
        -- per priority (its run_at range ends at the first job not yet due), read in priority order until
        -- the workspace's offer is full
        SELECT c.workspace_id, c.id, c.priority, c.rate_keys, c.screen,
               row_number() OVER (PARTITION BY c.workspace_id ORDER BY c.priority, c.run_at, c.id) AS rank
          FROM workspaces w
          CROSS JOIN LATERAL (
              SELECT q.workspace_id, q.id, q.priority, q.run_at, q.kind = 'email' OR q.broadcast_id IS NOT NULL AS screen,
                     herald._job_rate_keys(q.rate_keys, q.workspace_id, q.provider, q.broadcast_id) AS rate_keys
                FROM (VALUES (0::smallint), (1::smallint), (2::smallint)) p(priority)
               CROSS JOIN LATERAL (
                   SELECT o.workspace_id, o.id, o.priority, o.run_at, o.kind, o.rate_keys, o.provider, o.broadcast_id
                     FROM herald.outbox o
                    WHERE o.workspace_id = w.workspace_id AND o.priority = p.priority AND o.status = 'pending'
                      AND o.run_at <= now()
                    ORDER BY o.run_at
                    LIMIT least(max_jobs, ceil(max_jobs * 4.0 / w.n)::int)
                      FOR UPDATE OF o SKIP LOCKED) q
               -- each busy workspace offers a few times its fair share, so small ones cannot underfill a batch
               LIMIT least(max_jobs, ceil(max_jobs * 4.0 / w.n)::int)) c
    ), locked AS (
        SELECT f.id, f.rate_keys, f.screen, row_number() OVER (ORDER BY f.priority, f.rank, f.workspace_id) AS ord
          FROM offered f
         ORDER BY f.priority, f.rank, f.workspace_id
         LIMIT max_jobs
    )
    SELECT array_agg(l.id ORDER BY l.ord),
           (SELECT array_agg(DISTINCT k) FROM locked l2, unnest(l2.rate_keys) k
             WHERE k IN (SELECT r.key FROM herald.rate_limits r)),
           bool_or(l.screen)
      INTO v_ids, v_keys, v_screen
      FROM locked l;

    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    -- 1b. suppressed recipients: such an email job is never handed out, whatever queued it. It is
    --     finished as cancelled ('suppressed: <reason>'), counted as 'suppressed', and an enrollment
    --     waiting on it moves on as if the step had been done (the journey goes on without the email).
    --     And a job of a paused or cancelled broadcast is not handed out either: it is held or cancelled
    --     here. pause and cancel change the status at once; the broadcast's jobs follow in chunks
    --     (advance_broadcasts), and this is what stops them meanwhile (also a job whose complete read
    --     the status just before the change committed).
    --     Only an email or a broadcast's job can be either: a batch of neither skips this step.
    IF v_screen THEN
        WITH picked AS (
            SELECT o.workspace_id, o.id, o.dedupe_key, o.automation_id, o.node, o.on_success, o.broadcast_id,
                   o.variation, s.reason, b.status AS broadcast_status
              FROM unnest(v_ids) u(id)
              JOIN herald.outbox o ON o.id = u.id
              LEFT JOIN LATERAL (SELECT c.email FROM herald.contacts c
                                  WHERE o.kind = 'email' AND c.workspace_id = o.workspace_id AND c.id = o.contact_id LIMIT 1) c ON true
              -- the address, or its key when the contact was erased and came back (delete_contact)
              LEFT JOIN LATERAL (SELECT s.reason FROM herald.suppressions s
                                  WHERE c.email IS NOT NULL AND s.workspace_id = o.workspace_id
                                    AND s.email IN (c.email, herald._email_key(c.email))
                                  LIMIT 1) s ON true
              LEFT JOIN herald.broadcasts b ON b.workspace_id = o.workspace_id AND b.id = o.broadcast_id
        ), suppressed AS (
            SELECT p.* FROM picked p WHERE p.reason IS NOT NULL
        ), stopped AS (
            SELECT p.* FROM picked p WHERE p.reason IS NULL AND p.broadcast_status IN ('paused', 'cancelled')
        ), cancelled AS (
            UPDATE herald.outbox o
               SET status = 'cancelled', last_error = 'suppressed: ' || x.reason, done_at = now(), updated_at = now()
              FROM suppressed x
             WHERE o.workspace_id = x.workspace_id AND o.id = x.id
            RETURNING o.id
        ), halted AS (
            UPDATE herald.outbox o
               SET status = herald._queue_status(x.broadcast_status),
                   last_error = CASE WHEN x.broadcast_status = 'cancelled' THEN 'broadcast cancelled' ELSE o.last_error END,
                   done_at = CASE WHEN x.broadcast_status = 'cancelled' THEN now() END, updated_at = now()
              FROM stopped x
             WHERE o.workspace_id = x.workspace_id AND o.id = x.id
            RETURNING o.id
        ), suppressed_waiting AS (
            -- the enrollments waiting on a suppressed job: one probe of enrollments_wait_job_idx per job,
            -- then the update by id, as in complete (a join here was planned as a scan of every waiting
            -- enrollment, 46 ms per claim even with nothing suppressed)
            SELECT x.*, w.id AS enrollment_id
              FROM suppressed x
             CROSS JOIN LATERAL (SELECT e.id FROM herald.enrollments e
                                  WHERE e.workspace_id = x.workspace_id AND e.wait_job = x.dedupe_key
                                    AND e.wait_kind = 'job' AND e.ended_at IS NULL
                                    AND e.status IS NOT DISTINCT FROM 'waiting'
                                 OFFSET 0) w
        ), woken AS (
            UPDATE herald.enrollments e
               SET status = CASE WHEN x.on_success IS NULL THEN 'completed' ELSE 'active' END,
                   current_node = coalesce(x.on_success, e.current_node), next_run_at = now(),
                   ended_at = CASE WHEN x.on_success IS NULL THEN now() END,
                   exit_reason = CASE WHEN x.on_success IS NULL THEN 'completed after ' || x.node || ' (recipient suppressed)' END,
                   wait_kind = NULL, wait_job = NULL, updated_at = now()
              FROM suppressed_waiting x
             WHERE e.id = x.enrollment_id AND e.workspace_id IS NOT DISTINCT FROM x.workspace_id
               AND e.status IS NOT DISTINCT FROM 'waiting' AND e.wait_kind IS NOT DISTINCT FROM 'job'
            RETURNING e.workspace_id, e.id, e.automation_id, e.contact_id, e.status, e.current_node, e.exit_reason, e.context
        ), reported AS (
            -- the results stream (sql/results.sql): journeys that ended here
            INSERT INTO herald.results_staged (workspace_id, kind, contact_id, automation_id, enrollment_id, data)
            SELECT w.workspace_id, 'enrollment.' || w.status, w.contact_id, w.automation_id, w.id,
                   herald._ended_data(w.current_node, w.exit_reason, w.context)
              FROM woken w WHERE w.status = 'completed'
        ), counted AS (
            INSERT INTO herald.stats_delta (workspace_id, automation_id, node, metric, n)
            SELECT x.workspace_id, x.automation_id, x.node, 'suppressed', count(*)
              FROM suppressed x WHERE x.automation_id IS NOT NULL GROUP BY 1, 2, 3
        ), counted_b AS (
            INSERT INTO herald.broadcast_stats_delta (workspace_id, broadcast_id, variation, metric, n)
            SELECT x.workspace_id, x.broadcast_id, x.variation, x.metric, count(*)
              FROM (SELECT y.workspace_id, y.broadcast_id, y.variation, 'suppressed' AS metric
                      FROM suppressed y WHERE y.broadcast_id IS NOT NULL
                    UNION ALL
                    SELECT y.workspace_id, y.broadcast_id, y.variation, 'cancelled'
                      FROM stopped y WHERE y.broadcast_status = 'cancelled') x
             GROUP BY 1, 2, 3, 4
        )
        SELECT array_agg(u.id ORDER BY u.ord) INTO v_ids
          FROM unnest(v_ids) WITH ORDINALITY u(id, ord)
         WHERE u.id NOT IN (SELECT x.id FROM cancelled x UNION ALL SELECT x.id FROM halted x);
           -- (woken and counted run to completion regardless)
        IF v_ids IS NULL THEN
            RETURN;
        END IF;
    END IF;

    -- 2. rate limits
    IF v_keys IS NOT NULL THEN
        PERFORM 1 FROM herald.rate_limits r WHERE r.key = ANY (v_keys) ORDER BY r.key FOR UPDATE;
        v_now := clock_timestamp();   -- after the lock: grants of one key are recorded in time order
        WITH room AS (
            SELECT r.key, r.per_second - coalesce((SELECT sum(g.n) FROM herald.rate_grants g
                                                    WHERE g.key = r.key AND g.granted_at > v_now - interval '1 second'), 0) AS free
              FROM herald.rate_limits r WHERE r.key = ANY (v_keys)
        ), wanted AS (
            SELECT u.id, u.ord, k AS key,
                   row_number() OVER (PARTITION BY k ORDER BY u.ord) AS n
              FROM unnest(v_ids) WITH ORDINALITY AS u(id, ord)
              JOIN herald.outbox o ON o.id = u.id
             CROSS JOIN LATERAL unnest(herald._job_rate_keys(o.rate_keys, o.workspace_id, o.provider, o.broadcast_id)) k
             WHERE k = ANY (v_keys)
        ), refused AS (
            SELECT DISTINCT w.id FROM wanted w JOIN room r ON r.key = w.key WHERE w.n > r.free
        )
        SELECT array_agg(u.id ORDER BY u.ord) INTO v_ids
          FROM unnest(v_ids) WITH ORDINALITY AS u(id, ord)
         WHERE u.id NOT IN (SELECT f.id FROM refused f);

        INSERT INTO herald.rate_grants (key, granted_at, n)
        SELECT k, v_now, count(*)
          FROM herald.outbox o
         CROSS JOIN LATERAL unnest(herald._job_rate_keys(o.rate_keys, o.workspace_id, o.provider, o.broadcast_id)) k
         WHERE o.id = ANY (coalesce(v_ids, '{}')) AND k = ANY (v_keys)
         GROUP BY k;
        DELETE FROM herald.rate_grants g WHERE g.key = ANY (v_keys) AND g.granted_at < v_now - interval '2 seconds';
        IF v_ids IS NULL THEN
            RETURN;
        END IF;
    END IF;

    -- 3. lease and return
    RETURN QUERY
    WITH leased AS (
        UPDATE herald.outbox o
           SET status = 'leased', leased_by = worker, leased_at = coalesce(v_now, clock_timestamp()),
               lease_until = now() + lease, attempt = o.attempt + 1, updated_at = now()
         -- by id only (outbox_pkey, id = ANY: an index scan in custom and generic plans alike): with
         -- status = 'pending' the planner could read outbox_pending_idx (every pending job) and did on
         -- never-analysed tables, 15,000 rows per claim(100); the status is re-checked on the locked row.
         -- No join with unnest(v_ids) for the order: a generic plan guessed it at 10 rows and compared
         -- every id with every row (a third of the lease's time); array_position is 100 integer compares.
         WHERE o.id = ANY (v_ids) AND o.status IS NOT DISTINCT FROM 'pending'
        RETURNING o.*, array_position(v_ids, o.id) AS ord
    )
    SELECT l.id, l.workspace_id, l.kind, l.provider, l.dedupe_key, l.attempt,
           p.payload || jsonb_build_object(
               -- a test send to an address that is no contact carries its address (send_test)
               'to', coalesce(c.email, p.payload ->> 'to'),
               'contact', herald._contact_facts(coalesce(c.email, p.payload ->> 'to'), c.attributes, c.timezone, c.tags),
               'context', coalesce(e.context, '{}'),
               'event', e.event -> 'payload',
               'automation_id', l.automation_id,
               'enrollment_id', l.enrollment_id)
           || CASE WHEN l.kind = 'email' THEN jsonb_build_object('template', CASE WHEN t.key IS NULL THEN NULL ELSE
                  herald._template_part(t.key, t.version, t.subject, t.html, t.text_body) END)
                  -- the provider's kind (absent: no row, the implicit default) decides the transport; From and
                  -- Reply-To each: the broadcast's, else the template's, else the provider's, else absent
                  -- (the daemon's HERALD_FROM; no Reply-To)
                  || jsonb_strip_nulls(jsonb_build_object(
                         'provider_kind', pr.kind,
                         'from', coalesce(b.definition ->> 'from', t.from_address, pr.settings ->> 'from'),
                         'reply_to', coalesce(b.definition ->> 'reply_to', t.reply_to, pr.settings ->> 'reply_to')))
              ELSE '{}' END
      FROM leased l
      LEFT JOIN herald.contacts c ON c.workspace_id = l.workspace_id AND c.id = l.contact_id
      -- by id alone (enrollments_id_idx): planned without statistics, e.workspace_id = … read
      -- enrollments_automation_idx and filtered the workspace's every enrollment per job
      LEFT JOIN herald.enrollments e ON e.id = l.enrollment_id AND e.workspace_id IS NOT DISTINCT FROM l.workspace_id
      -- a broadcast's rows carry no payload: its variation's is kept once on the broadcast
      LEFT JOIN herald.broadcasts b ON b.workspace_id = l.workspace_id AND b.id = l.broadcast_id
     CROSS JOIN LATERAL (SELECT coalesce(b.payloads -> l.variation, l.payload) AS payload) p
      LEFT JOIN LATERAL (
          SELECT t.* FROM herald.templates t
           WHERE t.workspace_id = l.workspace_id AND t.key = p.payload ->> 'template'
           ORDER BY t.version DESC LIMIT 1) t ON l.kind = 'email'
      LEFT JOIN herald.providers pr ON l.kind = 'email' AND pr.workspace_id = l.workspace_id
            AND pr.name = l.provider   -- an email job always names its provider
     ORDER BY l.ord;
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
                  o.broadcast_id, o.variation, o.node, o.dedupe_key, o.attempt, o.payload, o.on_success, o.on_error,
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
        -- a broadcast's job has no enrollment waiting on it (its 'b:' key is no step's): no probe
        SELECT j.workspace_id, j.dedupe_key, j.node, j.outcome, j.error, j.kind, j.new_response, j.next_node
          FROM job j WHERE j.outcome IN ('done', 'failed') AND j.broadcast_id IS NULL
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
           (SELECT count(*) FROM woken w WHERE w.status = 'active')
      INTO v_applied, v_ignored, v_woken;

    IF v_ignored IS NOT NULL THEN
        RAISE WARNING 'complete: ignored result(s) for job(s) % (unknown, not leased, or already completed)', v_ignored;
    END IF;
    IF v_woken > 0 THEN
        PERFORM pg_notify('herald.tick', '');
    END IF;
    RETURN v_applied;
END
$$;

ALTER FUNCTION herald.claim(text, int, interval) SECURITY DEFINER;
ALTER FUNCTION herald.complete(jsonb) SECURITY DEFINER;
-- (end issue-14-queue)

-- ingest (issue 14): upsert_contacts normalises each address once and merges only repeated ones (no
-- ordered aggregate per address); contacts are inserted in byte order (COLLATE "C") by it and by
-- _create_contacts alike; track/track_many create contacts only when one is missing (a probe, not a
-- speculative insert per entry); preview_broadcast hashes its joins (enable_nestloop = off), whatever
-- the statistics. (begin issue-14-ingest)

CREATE OR REPLACE FUNCTION herald._contact_entry_fault(entry jsonb, email text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE   -- STABLE like format(); a stricter label would block inlining
RETURN CASE
    WHEN jsonb_typeof(entry) IS DISTINCT FROM 'object' THEN
        format('entry must be a JSON object, got %s', coalesce(jsonb_typeof(entry), 'NULL'))
    WHEN (entry - ARRAY['email', 'attributes', 'timezone']) <> '{}' THEN
        format('unknown key(s) in %s; allowed: email, attributes, timezone', entry - ARRAY['email', 'attributes', 'timezone'])
    WHEN jsonb_typeof(entry -> 'email') IS DISTINCT FROM 'string' THEN 'email is missing or not a string'
    WHEN NOT herald._valid_email(email) THEN
        format('email %s is not a valid address', entry -> 'email')
    WHEN entry ? 'attributes' AND jsonb_typeof(entry -> 'attributes') <> 'object' THEN
        format('attributes must be a JSON object, got %s', jsonb_typeof(entry -> 'attributes'))
    WHEN herald._value_fault(entry -> 'attributes') IS NOT NULL THEN
        'attributes ' || herald._value_fault(entry -> 'attributes')
    WHEN entry ? 'timezone' AND jsonb_typeof(entry -> 'timezone') <> 'null'
         AND (jsonb_typeof(entry -> 'timezone') <> 'string' OR NOT herald._valid_timezone(entry ->> 'timezone')) THEN
        format('timezone %s is not an IANA time zone name such as "Europe/Paris"', entry -> 'timezone')
END;

CREATE OR REPLACE FUNCTION herald._contact_entry_fault(entry jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN herald._contact_entry_fault(entry, herald._normalize_email(entry ->> 'email'));

CREATE OR REPLACE FUNCTION herald._create_contacts(workspaces text[], emails text[])
RETURNS TABLE (workspace_id text, id bigint, email text)
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH created AS (
        INSERT INTO herald.contacts AS c (workspace_id, email)
        SELECT d.w, d.e FROM (SELECT DISTINCT u.w, u.e FROM unnest(workspaces, emails) u(w, e)) d
         ORDER BY d.w COLLATE "C", d.e COLLATE "C"   -- the order upsert_contacts inserts in too
        ON CONFLICT (workspace_id, email) DO NOTHING
        RETURNING c.workspace_id, c.id, c.email
    ), announced AS (
        INSERT INTO herald.events (workspace_id, contact_id, email, kind, payload)
        SELECT c.workspace_id, c.id, c.email, 'contact.created', '{}' FROM created c ORDER BY c.id
    )
    SELECT c.workspace_id, c.id, c.email FROM created c;
END
$$;

CREATE OR REPLACE FUNCTION herald.upsert_contacts(workspace text, contacts jsonb)
RETURNS TABLE (inserted bigint, updated bigint, rejected bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
AS $$
DECLARE
    v_ws text := workspace;
    v_with_nulls bigint[];
BEGIN
    PERFORM herald._require_workspace(v_ws);
    IF jsonb_typeof(contacts) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'contacts must be a JSON array of objects, got %', coalesce(jsonb_typeof(contacts), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Example: [{"email": "ann@example.com", "attributes": {"plan": "pro"}, "timezone": "Europe/Paris"}]';
    END IF;

    WITH input AS MATERIALIZED (
        SELECT x.position, x.entry, x.email, herald._contact_entry_fault(x.entry, x.email) AS fault
          FROM (SELECT (t.ord - 1)::int AS position, t.entry, herald._normalize_email(t.entry ->> 'email') AS email
                  FROM jsonb_array_elements(contacts) WITH ORDINALITY AS t(entry, ord)
                OFFSET 0) x   -- OFFSET 0: each address is normalised once, not once per reference
    ), rejects AS (
        INSERT INTO herald.contact_rejections (workspace_id, batch, position, input, reason)
        SELECT v_ws, txid_current(), i.position, i.entry, i.fault FROM input i WHERE i.fault IS NOT NULL
        ON CONFLICT (workspace_id, batch, position) DO UPDATE SET input = EXCLUDED.input, reason = EXCLUDED.reason
        RETURNING 1
    ), accepted AS MATERIALIZED (
        -- how often each address occurs in the call (one sort, in byte order: cheaper than the
        -- collation's, and the order contacts are inserted in)
        SELECT i.position, i.email, i.entry, count(*) OVER (PARTITION BY i.email COLLATE "C") AS copies
          FROM input i
         WHERE i.fault IS NULL
    ), good AS (
        -- an address given once is taken as it is; only repeated ones are merged, in input order
        -- (an ordered aggregate per address cost a sort per group: ~20 ms per 10,000 distinct ones)
        SELECT a.email, coalesce(a.entry -> 'attributes', '{}') AS attrs,
               CASE WHEN jsonb_typeof(a.entry -> 'timezone') = 'string' THEN a.entry ->> 'timezone' END AS tz,
               1 AS entries
          FROM accepted a
         WHERE a.copies = 1
        UNION ALL
        SELECT a.email,
               herald._jsonb_merge_agg(coalesce(a.entry -> 'attributes', '{}') ORDER BY a.position),
               (array_agg(a.entry ->> 'timezone' ORDER BY a.position DESC)
                    FILTER (WHERE jsonb_typeof(a.entry -> 'timezone') = 'string'))[1],
               count(*)
          FROM accepted a
         WHERE a.copies > 1
         GROUP BY a.email
    ), up AS (
        INSERT INTO herald.contacts AS c (workspace_id, email, attributes, timezone)
        SELECT v_ws, g.email, g.attrs, g.tz FROM good g ORDER BY g.email COLLATE "C"   -- as _create_contacts
        ON CONFLICT (workspace_id, email) DO UPDATE
           SET attributes = herald._merge_attributes(c.attributes, EXCLUDED.attributes),
               timezone = coalesce(EXCLUDED.timezone, c.timezone),
               updated_at = now()
         WHERE c.attributes IS DISTINCT FROM herald._merge_attributes(c.attributes, EXCLUDED.attributes)
            OR c.timezone IS DISTINCT FROM coalesce(EXCLUDED.timezone, c.timezone)
        RETURNING c.id, c.email, c.attributes, (c.xmax = 0) AS is_new
    ), before AS MATERIALIZED (
        -- the stored attributes of the contacts this statement updated, as they were before it, as ONE
        -- id -> attributes object. Every part of one statement reads the same snapshot, so
        -- herald.contacts here still holds the old versions of the rows `up` changed; new contacts are
        -- not probed at all (a batch of new ones costs nothing here). LATERAL + LIMIT keeps each probe a
        -- primary-key lookup whatever the estimates say.
        SELECT coalesce(jsonb_object_agg(u.id::text, o.attributes), '{}') AS by_id FROM up u
         CROSS JOIN LATERAL (SELECT c.attributes FROM herald.contacts c
                              WHERE c.workspace_id = v_ws AND c.id = u.id LIMIT 1) o
         WHERE NOT u.is_new
    ), emitted AS (
        INSERT INTO herald.events (workspace_id, contact_id, email, kind, payload)
        SELECT v_ws, u.id, u.email,
               CASE WHEN u.is_new THEN 'contact.created' ELSE 'contact.updated' END,
               CASE WHEN u.is_new THEN jsonb_strip_nulls(u.attributes)
                    ELSE jsonb_build_object('changed', herald._changed_keys(b.by_id -> u.id::text, u.attributes)) END
          FROM up u CROSS JOIN before b
         ORDER BY u.id
    )
    -- (data-modifying CTEs always run to completion, referenced or not)
    SELECT (SELECT count(*) FROM up WHERE up.is_new),
           (SELECT coalesce(sum(g.entries), 0) FROM good g) - (SELECT count(*) FROM up WHERE up.is_new),
           (SELECT count(*) FROM rejects),
           (SELECT array_agg(up.id) FROM up WHERE up.is_new AND jsonb_strip_nulls(up.attributes) <> up.attributes)
      INTO inserted, updated, rejected, v_with_nulls;

    -- New contacts keep no null-valued keys (ON CONFLICT needs the raw input in EXCLUDED to remove keys).
    IF v_with_nulls IS NOT NULL THEN
        UPDATE herald.contacts c SET attributes = jsonb_strip_nulls(c.attributes)
         WHERE c.workspace_id = v_ws AND c.id = ANY (v_with_nulls);
    END IF;
    RETURN NEXT;
END
$$;

CREATE OR REPLACE FUNCTION herald._ingest(workspace text, events jsonb, caller text) RETURNS SETOF bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
AS $$
DECLARE
    v_ws text := workspace;
    v_bad record;
    v_missing text[];
BEGIN
    PERFORM herald._require_workspace(v_ws);
    IF jsonb_typeof(events) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION '%: events must be a JSON array of objects, got %', caller, coalesce(jsonb_typeof(events), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Example: [{"email": "ann@example.com", "kind": "signup", "payload": {"source": "ads"}}]';
    END IF;

    SELECT t.ord - 1 AS position, f.fault, count(*) OVER () AS bad_count INTO v_bad
      FROM jsonb_array_elements(events) WITH ORDINALITY AS t(entry, ord),
           LATERAL (SELECT herald._event_entry_fault(t.entry) AS fault) f
     WHERE f.fault IS NOT NULL
     ORDER BY t.ord
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION '%: %', caller,
                        CASE WHEN caller = 'track' THEN v_bad.fault
                             ELSE format('events[%s]: %s', v_bad.position, v_bad.fault) END
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('%s of %s entries are invalid; nothing was recorded.', v_bad.bad_count, jsonb_array_length(events));
    END IF;

    -- contacts are created only when one is missing: a probe per entry (LATERAL + LIMIT: a unique-index
    -- probe whatever the estimates) instead of a speculative insert per entry, which cost track() ~0.1 ms
    SELECT array_agg(x.email) INTO v_missing
      FROM (SELECT herald._normalize_email(t.entry ->> 'email') AS email
              FROM jsonb_array_elements(events) AS t(entry) OFFSET 0) x
      LEFT JOIN LATERAL (SELECT c.id FROM herald.contacts c
                          WHERE c.email = x.email AND c.workspace_id IS NOT DISTINCT FROM v_ws LIMIT 1) c ON true
     WHERE c.id IS NULL;
    IF v_missing IS NOT NULL THEN
        PERFORM herald._create_contacts(array_fill(v_ws, ARRAY[cardinality(v_missing)]), v_missing);
    END IF;

    RETURN QUERY
    WITH inserted AS (
        INSERT INTO herald.events (workspace_id, contact_id, email, kind, payload, occurred_at)
        SELECT v_ws, c.id, c.email, t.entry ->> 'kind', coalesce(t.entry -> 'payload', '{}'),
               coalesce((t.entry ->> 'occurred_at')::timestamptz, now())
          FROM jsonb_array_elements(events) WITH ORDINALITY AS t(entry, ord)
         CROSS JOIN LATERAL (SELECT c.id, c.email FROM herald.contacts c
                              WHERE c.email = herald._normalize_email(t.entry ->> 'email') AND c.workspace_id IS NOT DISTINCT FROM v_ws
                              LIMIT 1) c   -- LIMIT: keeps it a parameterized unique-index probe (see contacts' index)
         ORDER BY t.ord
        RETURNING id
    )
    SELECT i.id FROM inserted i;
END
$$;

CREATE OR REPLACE FUNCTION herald.preview_broadcast(workspace text, definition jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET enable_nestloop = off
AS $$
DECLARE
    v herald.broadcasts;
BEGIN
    PERFORM herald._require_workspace(workspace);
    v.workspace_id := workspace;
    v.definition := herald._check_broadcast(definition);
    v.name := v.definition ->> 'name';
    RETURN herald._preview_audience(v, 10);
END
$$;

CREATE OR REPLACE FUNCTION herald.preview_broadcast(broadcast bigint) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET enable_nestloop = off
AS $$
DECLARE
    v herald.broadcasts;
BEGIN
    PERFORM herald._authorize(b.workspace_id, format('broadcast %s', broadcast))
       FROM herald.broadcasts b WHERE b.id = broadcast;
    SELECT b.* INTO v FROM herald.broadcasts b WHERE b.id = broadcast;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'broadcast % does not exist', coalesce(broadcast::text, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    RETURN herald._preview_audience(v, 10) || jsonb_build_object('broadcast', v.id, 'status', v.status);
END
$$;

REVOKE ALL ON FUNCTION herald._contact_entry_fault(jsonb, text) FROM PUBLIC;
ALTER FUNCTION herald.upsert_contacts(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.preview_broadcast(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.preview_broadcast(bigint) SECURITY DEFINER;
-- (end issue-14-ingest)

-- engine (issue 14): enrollments_due_idx no longer holds parked enrollments without a timeout; tick's
-- live test is a hashed subplan; the batch goes to _steps as text written out, the contact in parts.
-- (begin issue-14-engine)
DROP INDEX herald.enrollments_due_idx;
CREATE INDEX enrollments_due_idx ON herald.enrollments (next_run_at)
    WHERE status IN ('active', 'waiting') AND next_run_at < 'infinity';

CREATE OR REPLACE FUNCTION herald.tick(max_steps int DEFAULT 10000) RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
SET enable_bitmapscan = off   -- due: walk enrollments_due_idx in next_run_at order and stop at the limit;
SET enable_sort = off         -- a bitmap scan and a sort read and sorted every due enrollment per tick
AS $$
DECLARE
    v_steps int;
BEGIN
    IF max_steps IS NULL OR max_steps < 1 OR max_steps > 100000 THEN
        RAISE EXCEPTION 'max_steps must be between 1 and 100000, got %', coalesce(max_steps::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    WITH due AS (
        -- up to max_steps due enrollments of live automations, oldest due first, locked (FOR UPDATE SKIP
        -- LOCKED: concurrent ticks never run a step twice). Inline, in this statement's snapshot: in a
        -- function of its own (a new snapshot per call, session 7) it locked enrollments committed after
        -- this statement began, which the UPDATE below then could not see, so they stayed due and their
        -- first step ran again (test_crash_recovery). next_run_at < 'infinity' lets enrollments_due_idx
        -- serve it. IS TRUE keeps the live test a hashed subplan (the live automations read once).
        SELECT e.workspace_id, e.id, e.automation_id, e.contact_id, e.status, e.current_node, e.visit,
               e.context, e.event,
               -- the version the enrollment is pinned to (sql/versions.sql); none written: version 1
               coalesce((e.event ->> 'version')::int, 1) AS version
          FROM herald.enrollments e
         WHERE e.status IN ('active', 'waiting') AND e.next_run_at <= now() AND e.next_run_at < 'infinity'
           AND ((e.workspace_id, e.automation_id) IN (SELECT a.workspace_id, a.id FROM herald.automations a
                                                       WHERE a.status = 'live')) IS TRUE
         ORDER BY e.next_run_at
         LIMIT max_steps
           FOR UPDATE OF e SKIP LOCKED
    ), defs AS (
        -- the definition of every (automation, version) in the batch, read once per version. An
        -- enrollment moved to a newer version by an update_automation that committed after this
        -- statement's snapshot (the row lock returns the moved row) finds no definition here and is left
        -- for the next tick, unchanged. Every automation has its version rows (create_automation writes
        -- version 1; the 0.2.0 upgrade wrote them for older ones).
        SELECT v.automation_id, v.version, v.definition
          FROM herald.automation_versions v
         WHERE (v.workspace_id, v.automation_id, v.version) IN (SELECT DISTINCT d.workspace_id, d.automation_id, d.version FROM due d)
    ), batch AS (
        -- the enrollments as the text of a JSON array, written out rather than built as json values
        -- (json_build_object per row, and the contact's facts as jsonb, were ~45 ms of a 10,000 batch):
        -- strings through to_json (quoted, escaped), jsonb through its text form, numbers as they print,
        -- every value that can be NULL coalesced to null. The contact goes in parts (attributes, email,
        -- tags, timezone); _steps joins them into the facts herald._contact_facts would make.
        SELECT (SELECT json_object_agg(x.automation_id::text || ':' || x.version::text, x.definition) FROM defs x) AS automations,
               '[' || string_agg(concat(
                   '{"id":', d.id, ',"workspace_id":', to_json(d.workspace_id), ',"automation_id":', d.automation_id,
                   ',"version":', d.version, ',"contact_id":', d.contact_id, ',"status":', to_json(d.status),
                   ',"node":', to_json(d.current_node), ',"visit":', d.visit, ',"context":', d.context,
                   ',"event":', coalesce(d.event -> 'payload', 'null'), ',"attributes":', coalesce(c.attributes, '{}'),
                   ',"email":', to_json(c.email), ',"tags":', coalesce(to_json(c.tags), '[]'),
                   ',"timezone":', coalesce(to_json(c.timezone), 'null'), '}'), ',') || ']' AS enrollments
          FROM due d
          -- a primary-key probe per due row (a plain join was planned as a merge over the contacts index)
         CROSS JOIN LATERAL (SELECT c.email, c.attributes, c.timezone, c.tags FROM herald.contacts c
                              WHERE c.workspace_id = d.workspace_id AND c.id = d.contact_id LIMIT 1) c
         WHERE (d.automation_id, d.version) IN (SELECT x.automation_id, x.version FROM defs x)
    ), stepped AS MATERIALIZED (
        -- _steps passes workspace, automation and contact through: no join back to due, so the
        -- planner's estimate stays _steps' ROWS and the writes below probe indexes row by row
        -- instead of hashing whole tables (which grew with every enrollment ever made).
        -- A decide question already answered in the cache (a primary-key probe) takes the enrollment
        -- straight to the chosen path: cache_reply / cache_next.
        SELECT s.*, j.jb, k.job_kind, k.job_key, dc.reply AS cache_reply,
               coalesce(j.jb -> 'payload' -> 'paths' ->> (dc.reply ->> (j.jb -> 'payload' ->> 'field')),
                        j.jb -> 'payload' ->> 'default') AS cache_next
          FROM batch b
         CROSS JOIN LATERAL herald._steps(b.automations, b.enrollments, extract(epoch FROM now())::float8, 50) s
         -- the job as jsonb, parsed once: every ->> on a json value parses its text again (~10 per job
         -- below); OFFSET 0 keeps the cast from being copied into each of them
         CROSS JOIN LATERAL (SELECT s.job::jsonb AS jb OFFSET 0) j
         CROSS JOIN LATERAL (
             SELECT j.jb ->> 'kind' AS job_kind,
                    -- decide: identical questions share one job per TTL window (and one cached reply)
                    CASE WHEN j.jb ->> 'kind' = 'decide'
                         THEN format('decide:%s:%s', j.jb ->> 'request_hash',
                                     floor(extract(epoch FROM now()) / greatest((j.jb ->> 'cache_ttl_seconds')::float8, 1)))
                         ELSE j.jb ->> 'dedupe_key' END AS job_key) k
          LEFT JOIN LATERAL (
              SELECT c.reply FROM herald.decide_cache c
               WHERE k.job_kind = 'decide' AND c.workspace_id = s.workspace_id
                 AND c.request_hash = j.jb ->> 'request_hash' AND c.expires_at > now()
               LIMIT 1) dc ON true
    ), moved AS (
        UPDATE herald.enrollments e
           SET status = CASE WHEN st.cache_reply IS NOT NULL THEN 'active' ELSE st.status END,
               current_node = CASE WHEN st.cache_reply IS NOT NULL THEN coalesce(st.cache_next, st.node) ELSE st.node END,
               next_run_at = CASE WHEN st.cache_reply IS NOT NULL THEN now()
                                  ELSE coalesce(to_timestamp(st.next_run_at), 'infinity') END,
               visit = st.visit,
               context = CASE WHEN st.cache_reply IS NOT NULL THEN e.context || jsonb_build_object(st.node, st.cache_reply)
                              ELSE e.context END,
               exit_reason = st.exit_reason,
               ended_at = CASE WHEN st.status IN ('completed', 'exited', 'failed') THEN now() END,
               wait_kind = CASE WHEN st.cache_reply IS NOT NULL THEN NULL ELSE st.wait_kind END,
               wait_job = CASE WHEN st.cache_reply IS NULL AND st.wait_kind = 'job' THEN st.job_key END,
               wait_event = st.wait_event,
               wait_filter = st.wait_filter::jsonb,
               updated_at = now()
          FROM stepped st
         WHERE e.workspace_id = st.workspace_id AND e.id = st.enrollment_id
        RETURNING e.workspace_id, e.id, e.automation_id, e.contact_id, e.status, e.current_node, e.exit_reason,
                  e.context, e.wait_kind
    ), reported AS (
        -- the results stream (sql/results.sql): journeys that ended, and approvals asked for (a waiting
        -- enrollment due again always leaves its approval node: waiting on one now means it just came)
        INSERT INTO herald.results_staged (workspace_id, kind, contact_id, automation_id, enrollment_id, data)
        SELECT m.workspace_id, CASE WHEN m.wait_kind = 'approval' THEN 'approval.requested' ELSE 'enrollment.' || m.status END,
               m.contact_id, m.automation_id, m.id,
               CASE WHEN m.wait_kind = 'approval' THEN jsonb_build_object('node', m.current_node, 'context', m.context)
                    ELSE herald._ended_data(m.current_node, m.exit_reason, m.context) END
          FROM moved m
         WHERE m.status IN ('completed', 'exited', 'failed') OR m.wait_kind = 'approval'
    ), queued AS (
        INSERT INTO herald.outbox AS o (workspace_id, kind, priority, dedupe_key, provider, rate_keys, contact_id,
                                        automation_id, enrollment_id, node, on_success, on_error, payload)
        SELECT st.workspace_id, st.job_kind, 1, st.job_key, st.jb ->> 'provider',
               CASE WHEN st.job_kind = 'email'
                    THEN herald._email_rate_keys(st.workspace_id, st.jb ->> 'provider')
                    ELSE ARRAY['host:' || (st.jb ->> 'rate_host')] END,
               st.contact_id, st.automation_id, st.enrollment_id, st.jb ->> 'node',
               st.jb ->> 'on_success', st.jb ->> 'on_error',
               (st.jb -> 'payload') || jsonb_build_object('request_hash', st.jb ->> 'request_hash',
                                                                 'cache_ttl_seconds', (st.jb -> 'cache_ttl_seconds'))
          FROM (SELECT DISTINCT ON (x.job_key) x.* FROM stepped x
                 WHERE x.job IS NOT NULL AND x.cache_reply IS NULL
                 ORDER BY x.job_key, x.enrollment_id) st   -- one row per key: shared decide questions
         ORDER BY st.job_key
        ON CONFLICT (workspace_id, dedupe_key) WHERE broadcast_id IS NULL DO UPDATE
           -- a shared decide question that failed before is asked again for the newcomers
           SET status = 'pending', attempt = 0, run_at = now(), updated_at = now()
         WHERE o.kind = 'decide' AND o.status = 'failed'
        RETURNING 1
    ), contact_changes AS (
        SELECT st.workspace_id, st.contact_id,
               herald._jsonb_merge_agg(coalesce((st.contact_update -> 'set')::jsonb, '{}') ORDER BY st.enrollment_id) AS set_attrs,
               array_agg(DISTINCT t) FILTER (WHERE t IS NOT NULL) AS add_tags
          FROM stepped st
          LEFT JOIN LATERAL json_array_elements_text(st.contact_update -> 'add_tags') t ON true
         WHERE st.contact_update IS NOT NULL
         GROUP BY st.workspace_id, st.contact_id
    ), contact_removals AS (
        SELECT st.workspace_id, st.contact_id, array_agg(DISTINCT t) AS remove_tags
          FROM stepped st
         CROSS JOIN LATERAL json_array_elements_text(st.contact_update -> 'remove_tags') t
         GROUP BY st.workspace_id, st.contact_id
    ), contacts_updated AS (
        UPDATE herald.contacts c
           SET attributes = herald._merge_attributes(c.attributes, ch.set_attrs),
               tags = ARRAY(SELECT DISTINCT x FROM unnest(c.tags || coalesce(ch.add_tags, '{}')) x
                             WHERE x <> ALL (coalesce(r.remove_tags, '{}')) ORDER BY x),
               updated_at = now()
          FROM contact_changes ch
          LEFT JOIN contact_removals r ON r.workspace_id = ch.workspace_id AND r.contact_id = ch.contact_id
         WHERE c.workspace_id = ch.workspace_id AND c.id = ch.contact_id
        RETURNING 1
    ), list_moves AS (
        SELECT DISTINCT ON (st.workspace_id, l.list, st.contact_id)
               st.workspace_id, st.contact_id, l.list, l.status
          FROM stepped st
         CROSS JOIN LATERAL (
             SELECT j, 'subscribed' AS status FROM json_array_elements_text(st.contact_update -> 'add_lists') j
             UNION ALL
             SELECT j, 'unsubscribed' FROM json_array_elements_text(st.contact_update -> 'remove_lists') j) l(list, status)
         WHERE st.contact_update IS NOT NULL
         ORDER BY st.workspace_id, l.list, st.contact_id, st.enrollment_id DESC
    ), memberships AS (
        INSERT INTO herald.list_members AS m (workspace_id, list, contact_id, status)
        SELECT lm.workspace_id, lm.list, lm.contact_id, lm.status FROM list_moves lm
         ORDER BY lm.workspace_id, lm.list, lm.contact_id
        ON CONFLICT (workspace_id, list, contact_id) DO UPDATE SET status = EXCLUDED.status, updated_at = now()
         WHERE m.status <> EXCLUDED.status
        RETURNING m.workspace_id, m.contact_id, m.list, m.status
    ), list_events AS (
        -- reach the dispatcher, so automations can trigger on list.joined / list.left
        INSERT INTO herald.events (workspace_id, contact_id, kind, payload)
        SELECT mb.workspace_id, mb.contact_id,
               CASE mb.status WHEN 'subscribed' THEN 'list.joined' ELSE 'list.left' END,
               jsonb_build_object('list', mb.list)
          FROM memberships mb
        RETURNING 1
    ), logged AS (
        INSERT INTO herald.step_log (workspace_id, enrollment_id, automation_id, nodes, visits, actions)
        SELECT st.workspace_id, st.enrollment_id, st.automation_id, st.log_nodes, st.log_visits, st.log_actions
          FROM stepped st WHERE cardinality(st.log_nodes) > 0
        RETURNING 1
    ), counted AS (
        INSERT INTO herald.stats_delta (workspace_id, automation_id, node, metric, n)
        -- _steps sums the batch's counts per (automation, node, metric) on its first row; the
        -- automations of one batch may belong to several workspaces
        SELECT a.workspace_id, c.automation, c.node, c.metric, c.n
          FROM stepped st
         CROSS JOIN LATERAL unnest(st.count_automations, st.count_nodes, st.count_metrics, st.count_n) c(automation, node, metric, n)
          JOIN herald.automations a ON a.id = c.automation
         WHERE st.count_automations IS NOT NULL
        RETURNING 1
    )
    SELECT count(*) INTO v_steps FROM stepped;
    -- the results stream moves on with every tick (sql/results.sql), so any daemon that ticks keeps it
    -- published and its subscriptions served; one caller at a time does it, the others skip at once
    PERFORM herald.advance_results(100000);
    RETURN v_steps;
END
$$;

ALTER FUNCTION herald.tick(int) SECURITY DEFINER;
-- (end issue-14-engine)

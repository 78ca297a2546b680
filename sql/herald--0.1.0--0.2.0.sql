-- herald 0.1.0 -> 0.2.0: backups carry herald's data, and loading a dump runs none of herald's triggers.
--   * every table and identity sequence is registered with pg_extension_config_dump (pg_dump left
--     herald's rows out of every dump before);
--   * herald._restoring() recognises a dump being loaded; the dispatcher and the NOTIFY triggers do
--     nothing then.
-- No table changes: every row stays as it is.
\echo Use "ALTER EXTENSION herald UPDATE TO '0.2.0'" to load this file. \quit

-- Backups. Tables created by an extension script are left out of pg_dump unless registered here, and
-- so are the sequences behind their ids: without this a dump of a herald database restores no herald
-- row. Every table and identity sequence is registered whole (filter ''): CREATE EXTENSION creates no
-- row of its own in any of them. A restore loads the rows back as they were, without running herald's
-- triggers again (see herald._restoring). A new table or sequence must be added here and to its
-- release's upgrade script; `make upgrade-check` fails when one is missing.
-- (one statement each: two calls in one statement update the extension's row twice)
SELECT pg_catalog.pg_extension_config_dump('herald.workspaces', '');
SELECT pg_catalog.pg_extension_config_dump('herald.contacts', '');
SELECT pg_catalog.pg_extension_config_dump('herald.contact_rejections', '');
SELECT pg_catalog.pg_extension_config_dump('herald.events', '');
SELECT pg_catalog.pg_extension_config_dump('herald.automations', '');
SELECT pg_catalog.pg_extension_config_dump('herald.enrollments', '');
SELECT pg_catalog.pg_extension_config_dump('herald.templates', '');
SELECT pg_catalog.pg_extension_config_dump('herald.providers', '');
SELECT pg_catalog.pg_extension_config_dump('herald.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('herald.rate_limits', '');
SELECT pg_catalog.pg_extension_config_dump('herald.rate_grants', '');
SELECT pg_catalog.pg_extension_config_dump('herald.message_history', '');
SELECT pg_catalog.pg_extension_config_dump('herald.step_log', '');
SELECT pg_catalog.pg_extension_config_dump('herald.stats_delta', '');
SELECT pg_catalog.pg_extension_config_dump('herald.stats', '');
SELECT pg_catalog.pg_extension_config_dump('herald.decide_cache', '');
SELECT pg_catalog.pg_extension_config_dump('herald.list_members', '');
SELECT pg_catalog.pg_extension_config_dump('herald.suppressions', '');
SELECT pg_catalog.pg_extension_config_dump('herald.broadcasts', '');
SELECT pg_catalog.pg_extension_config_dump('herald.broadcast_stats_delta', '');
SELECT pg_catalog.pg_extension_config_dump('herald.broadcast_stats', '');
-- identity sequences: dumped with their position, so ids continue past the highest restored one
SELECT pg_catalog.pg_extension_config_dump('herald.contacts_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('herald.events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('herald.automations_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('herald.enrollments_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('herald.outbox_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('herald.message_history_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('herald.step_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('herald.broadcasts_id_seq', '');

-- True while a dump is being loaded into this database: pg_restore, or psql running a plain pg_dump
-- file. herald's triggers (the dispatcher, the NOTIFY triggers) then do nothing, because what they
-- would do is already in the dump: a restored event's enrollments, contact.created events and jobs are
-- restored rows of their own, so dispatching it again would enrol twice, and restoring events before
-- workspaces (pg_dump's order) would even fail the dispatcher's integrity check.
-- A restore is recognised by two settings every pg_dump output sets at its top and applications do
-- not: check_function_bodies = off (only DDL loaders turn it off) together with row_security = off.
-- Any other loader says it explicitly with SET herald.restoring = on. Cheap: called once per statement.
CREATE FUNCTION herald._restoring() RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, herald, pg_temp
RETURN coalesce(current_setting('herald.restoring', true), '') IN ('on', 'true', '1')
    OR (current_setting('check_function_bodies') = 'off' AND current_setting('row_security') = 'off');

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
    -- 1. integrity, checked once for the whole statement
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

        WITH missing AS (
            SELECT DISTINCT n.workspace_id, herald._normalize_email(n.email) AS email
              FROM new_events n WHERE n.contact_id IS NULL
        ), created AS (
            INSERT INTO herald.contacts (workspace_id, email)
            SELECT m.workspace_id, m.email FROM missing m ORDER BY 1, 2
            ON CONFLICT (workspace_id, email) DO NOTHING
            RETURNING workspace_id, id, email
        )
        INSERT INTO herald.events (workspace_id, contact_id, email, kind, payload)
        SELECT c.workspace_id, c.id, c.email, 'contact.created', '{}' FROM created c ORDER BY c.id;

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
        SELECT DISTINCT ON (e.id) e.workspace_id, e.id, ev.payload
          FROM ev
          JOIN herald.enrollments e
            ON e.workspace_id = ev.workspace_id AND e.contact_id = ev.contact_id AND e.wait_event = ev.kind
           AND e.status = 'waiting' AND e.wait_kind = 'event'
          LEFT JOIN herald.contacts c
            ON e.wait_filter IS NOT NULL AND c.workspace_id = e.workspace_id AND c.id = e.contact_id
         WHERE e.wait_filter IS NULL
            OR herald._matches(e.wait_filter, herald._contact_facts(c.email, c.attributes, c.timezone, c.tags),
                               ev.payload, e.context)
         ORDER BY e.id, ev.id
    ), woken AS (
        UPDATE herald.enrollments e
           SET status = 'active', next_run_at = now(), updated_at = now(),
               current_node = a.definition -> 'nodes' -> e.current_node ->> 'next',
               context = e.context || jsonb_build_object(e.current_node, w.payload),
               wait_kind = NULL, wait_event = NULL, wait_filter = NULL
          FROM awaited w
          JOIN herald.automations a ON true
         WHERE e.workspace_id = w.workspace_id AND e.id = w.id
           AND a.workspace_id = e.workspace_id AND a.id = e.automation_id
           AND e.status = 'waiting' AND e.wait_kind = 'event'
        RETURNING 1
    )
    SELECT count(*) INTO v_woken FROM woken;
    IF v_woken > 0 THEN
        PERFORM pg_notify('herald.tick', '');
    END IF;

    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION herald._notify() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows) AND NOT herald._restoring() THEN
        PERFORM pg_notify(TG_ARGV[0], '');
    END IF;
    RETURN NULL;
END
$$;

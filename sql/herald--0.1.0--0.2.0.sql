-- herald 0.1.0 -> 0.2.0: backups carry herald's data, and loading a dump runs none of herald's triggers.
--   * every table and identity sequence is registered with pg_extension_config_dump (pg_dump left
--     herald's rows out of every dump before);
--   * herald._restoring() recognises a dump being loaded; the dispatcher and the NOTIFY triggers do
--     nothing then;
--   * tenants are walled off: roles herald_admin / herald_worker / herald_app, herald.workspace_grants
--     (grant_workspace, revoke_workspace), SECURITY DEFINER API functions that check the caller's
--     workspace, nothing granted to PUBLIC, row-level security on every table with a workspace.
--   * bounded input: emails with control or bidi characters are refused, templates are size-limited;
--     replayed opens and clicks (same message, kind and link within 10 minutes) are recorded once.
--   * no foreign key between herald tables, so pg_restore -j works;
--   * complete() and the dispatcher wake waiting enrollments with one index probe per job or event,
--     whatever the table statistics;
--   * JSON a tenant stores (event payloads, contact attributes, send contexts) is at most 32 levels deep
--     and 64 KiB (herald._value_fault), at every way in.
--   * a broadcast's send time in the past is refused (create_broadcast, schedule_broadcast);
--   * retry_failed: failed and dead jobs back, with the journeys that failed on them;
--   * lists (create_list, subscribe, unsubscribe, list_overview) and erasure (delete_contact: the
--     contact everywhere, a keyed suppression and an audit row in herald.erasures stay).
-- Existing tables keep every row; tables added: workspace_grants, lists, erasures.
\echo Use "ALTER EXTENSION herald UPDATE TO '0.2.0'" to load this file. \quit

-- Every table first, in one statement, before any catalog row changes: an autovacuum worker busy on one
-- of them is cancelled by this wait (Postgres cancels autovacuum that blocks a lock request), instead of
-- waiting on this transaction's catalog updates while we wait for its lock (a deadlock the upgrade test
-- met). Applications wait for the few seconds the upgrade takes.
LOCK TABLE herald.workspaces, herald.contacts, herald.contact_rejections, herald.events, herald.automations,
           herald.enrollments, herald.templates, herald.providers, herald.outbox, herald.rate_limits,
           herald.rate_grants, herald.message_history, herald.step_log, herald.stats_delta, herald.stats,
           herald.decide_cache, herald.list_members, herald.suppressions, herald.broadcasts,
           herald.broadcast_stats_delta, herald.broadcast_stats
    IN ACCESS EXCLUSIVE MODE;

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
                                AND e.wait_event = ev.kind AND e.status = 'waiting' AND e.wait_kind = 'event'
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

-- One coalesced wake-up per transaction: Postgres folds identical notifications of a transaction into one,
-- and these triggers fire once per statement, never per row. Channels: herald.outbox (jobs to claim) and
-- herald.tick (enrollments due now).
-- The channel is the trigger's argument.
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

-- pg_restore -j loads the tables of an extension in parallel, unordered: a foreign key between herald
-- tables failed a parallel restore (automations -> workspaces). herald's functions check workspaces.
ALTER TABLE herald.automations DROP CONSTRAINT automations_workspace_id_fkey;

-- ---------------------------------------------------------------- tenants: roles, grants, checks

-- Which workspaces a role may act for (herald.grant_workspace; see sql/security.sql). Data, not a session
-- setting a client could change. role_name is a name, not an oid, so grants survive a dump restored into
-- another cluster that has the same roles.
CREATE TABLE herald.workspace_grants (
    workspace_id text NOT NULL,             -- no foreign key: see herald.automations
    role_name    name NOT NULL,
    granted_by   name NOT NULL,
    granted_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, role_name)
);
CREATE INDEX workspace_grants_role_idx ON herald.workspace_grants (role_name);

SELECT pg_catalog.pg_extension_config_dump('herald.workspace_grants', '');

-- the functions that now check the caller's workspace (through herald._authorize, defined below;
-- PL/pgSQL resolves it when called)

-- Raises unless the workspace exists. Used at the top of every function that takes one.
CREATE OR REPLACE FUNCTION herald._require_workspace(workspace text) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF workspace IS NULL THEN
        RAISE EXCEPTION 'workspace must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- the caller's right first: to a tenant, another tenant's workspace and an unknown one look alike
    PERFORM herald._authorize(workspace);
    IF NOT EXISTS (SELECT 1 FROM herald.workspaces w WHERE w.id = workspace) THEN
        RAISE EXCEPTION 'unknown workspace "%"', workspace
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'Create it first with herald.create_workspace(id, name).';
    END IF;
END
$$;

-- Finds an enrollment by id and locks it, or raises a clear error.
CREATE OR REPLACE FUNCTION herald._lock_enrollment(enrollment bigint) RETURNS herald.enrollments
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.enrollments;
BEGIN
    -- the caller's right before the lock: a refused call must not hold another tenant's row
    PERFORM herald._authorize(e.workspace_id, format('enrollment %s', enrollment))
       FROM herald.enrollments e WHERE e.id = enrollment;
    SELECT * INTO v FROM herald.enrollments e WHERE e.id = enrollment FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown enrollment %', coalesce(enrollment::text, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v;
END
$$;

-- Finds an automation by id and locks it, or raises a clear error.
CREATE OR REPLACE FUNCTION herald._lock_automation(automation bigint) RETURNS herald.automations
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.automations;
BEGIN
    PERFORM herald._authorize(a.workspace_id, format('automation %s', automation))
       FROM herald.automations a WHERE a.id = automation;
    SELECT * INTO v FROM herald.automations a WHERE a.id = automation FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown automation %', coalesce(automation::text, 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v;
END
$$;

-- Only live automations accept enrollments.
CREATE OR REPLACE FUNCTION herald._require_live(v herald.automations) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    PERFORM herald._authorize(v.workspace_id, format('automation %s', v.id));
    IF v.status <> 'live' THEN
        RAISE EXCEPTION 'automation % is %, only a live automation accepts enrollments', v.id, v.status
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Call herald.set_automation_status(%s, ''live'') first.', v.id);
    END IF;
END
$$;

-- Locks a broadcast for a state change; raises a clear error when it does not exist.
CREATE OR REPLACE FUNCTION herald._lock_broadcast(broadcast bigint) RETURNS herald.broadcasts
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.broadcasts;
BEGIN
    PERFORM herald._authorize(b.workspace_id, format('broadcast %s', broadcast))
       FROM herald.broadcasts b WHERE b.id = broadcast;
    SELECT b.* INTO v FROM herald.broadcasts b WHERE b.id = broadcast FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'broadcast % does not exist', coalesce(broadcast::text, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v;
END
$$;

-- Exact per-variation numbers: folded + not yet folded deltas (queued, sent, failed, dead, suppressed,
-- cancelled, retried), plus unique opens and clicks from the engagement events.
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
        SELECT e.payload ->> 'variation', CASE e.kind WHEN 'email.opened' THEN 'opened' ELSE 'clicked' END,
               count(DISTINCT e.contact_id)
          FROM herald.events e
         WHERE e.workspace_id = v_ws AND (e.payload ->> 'broadcast') = broadcast::text
           AND e.kind IN ('email.opened', 'email.clicked')
         GROUP BY 1, 2) x
     GROUP BY 1, 2
     ORDER BY 1, 2;
END
$$;

-- Per node and metric, per day: folded + not yet folded. node '' holds automation-level metrics
-- (enrolled, completed, failed, exited, goal).
CREATE OR REPLACE FUNCTION herald.automation_stats_daily(automation bigint)
RETURNS TABLE (day date, node text, metric text, value bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_ws text;
BEGIN
    SELECT a.workspace_id INTO v_ws FROM herald.automations a WHERE a.id = automation;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown automation %', coalesce(automation::text, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM herald._authorize(v_ws, format('automation %s', automation));
    RETURN QUERY
    SELECT u.day, u.node, u.metric, sum(u.n)::bigint
      FROM (SELECT s.day, s.node, s.metric, s.value AS n FROM herald.stats s
             WHERE s.workspace_id = v_ws AND s.automation_id = automation
            UNION ALL
            SELECT d.day, d.node, d.metric, d.n FROM herald.stats_delta d
             WHERE d.workspace_id = v_ws AND d.automation_id = automation) u
     GROUP BY 1, 2, 3
     ORDER BY 1, 2, 3;
END
$$;

-- Dead jobs back to pending, attempts reset. Any id that is not a dead job is an error; nothing changes.
CREATE OR REPLACE FUNCTION herald.redrive(ids bigint[]) RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_bad text;
    v_n int;
BEGIN
    IF ids IS NULL THEN
        RAISE EXCEPTION 'ids must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- the caller must act for the workspace of every job it names (one check per workspace, not per job)
    PERFORM herald._authorize(w.workspace_id, format('job %s', w.id))
       FROM (SELECT DISTINCT ON (o.workspace_id) o.workspace_id, o.id
               FROM herald.outbox o WHERE o.id = ANY (ids) ORDER BY o.workspace_id, o.id) w;
    SELECT string_agg(coalesce(u.id::text, 'NULL'), ', ') INTO v_bad
      FROM unnest(ids) u(id)
     WHERE u.id IS NULL OR NOT EXISTS (SELECT 1 FROM herald.outbox o WHERE o.id = u.id AND o.status = 'dead');
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'not dead job(s): %', v_bad
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Only jobs listed in herald.dead_letters can be redriven.';
    END IF;
    UPDATE herald.outbox o SET status = 'pending', attempt = 0, run_at = now(), done_at = NULL, updated_at = now()
     WHERE o.id = ANY (ids) AND o.status = 'dead';
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;

-- ------------------------------------------------------------------- bounded input, replayed opens
-- (before security.sql's part below: CREATE OR REPLACE resets SECURITY DEFINER, which that part sets)
CREATE INDEX events_engagement_message_idx ON herald.events (workspace_id, ((payload ->> 'message_id')))
    WHERE kind IN ('email.opened', 'email.clicked');

-- A pragmatic address check: one @, no whitespace, a dot in the domain, at most 254 characters, and no
-- control or bidirectional-formatting characters (they pass for invisible in a mail client or an
-- operator's page, and can make one address display as another). NULL is not valid (false, never NULL,
-- so `NOT _valid_email(x)` always decides).
CREATE OR REPLACE FUNCTION herald._valid_email(email text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE   -- not STRICT: a strict function with an AND body is not inlined
RETURN coalesce(length(email) <= 254
                AND email ~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:].]+$'
                AND email !~ '[[:cntrl:]\u0080-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]', false);

CREATE OR REPLACE FUNCTION herald.upsert_template(workspace text, key text, subject text, html text, text_body text DEFAULT NULL)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_version int;
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
    -- serialise versions of one key
    PERFORM pg_advisory_xact_lock(hashtext('herald.template:' || workspace || '/' || key));
    SELECT coalesce(max(t.version), 0) + 1 INTO v_version
      FROM herald.templates t WHERE t.workspace_id = workspace AND t.key = upsert_template.key;
    INSERT INTO herald.templates (workspace_id, key, version, subject, html, text_body)
    VALUES (workspace, key, v_version, subject, html, text_body);
    RETURN v_version;
END
$$;

-- record_feedback gains only_workspace (a report's credentials name its workspace)
DROP FUNCTION herald.record_feedback(jsonb);
-- What recipients and providers report back, recorded in ONE statement per batch (the sidecar's HTTP
-- side calls it: unsubscribe links, the open pixel, click redirects, provider bounce/complaint events).
-- feedback: [{"kind": "unsubscribed" | "hard_bounce" | "soft_bounce" | "complaint" | "opened" | "clicked",
--             "workspace": "…", "email": "…", "message_id": "<…>", "payload": {…}}, …]
-- workspace and email may be left out when message_id names a message herald sent. unsubscribed,
-- hard_bounce and complaint suppress the address; every entry becomes an event (list.unsubscribed,
-- email.bounced, email.complained, email.opened, email.clicked) that automations can trigger on.
-- Entries that name no known message or workspace are skipped. Returns the events recorded.
-- only_workspace: the workspace whose credentials the report came with (a provider's events token, a
-- link key); entries are then resolved in that workspace only, and entries naming another are skipped,
-- so one workspace's token can never unsubscribe or suppress another's contacts.
CREATE FUNCTION herald.record_feedback(feedback jsonb, only_workspace text DEFAULT NULL) RETURNS int
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
               coalesce(t.f ->> 'workspace', m.workspace_id) AS workspace_id,
               herald._normalize_email(coalesce(t.f ->> 'email', c.email)) AS email, t.ord
          FROM jsonb_array_elements(feedback) WITH ORDINALITY t(f, ord)
          -- the message named, in the workspace given if one is; a Message-ID found in two workspaces
          -- (derived from dedupe keys, which two workspaces may choose alike) names neither
          LEFT JOIN LATERAL (SELECT min(h.workspace_id) AS workspace_id,
                                    (array_agg(h.contact_id ORDER BY h.id DESC))[1] AS contact_id
                               FROM herald.message_history h
                              WHERE t.f ->> 'message_id' IS NOT NULL AND h.message_id = t.f ->> 'message_id'
                                AND (t.f ->> 'workspace' IS NULL OR h.workspace_id = t.f ->> 'workspace')
                                AND (only_workspace IS NULL OR h.workspace_id = only_workspace)
                             HAVING count(DISTINCT h.workspace_id) = 1) m ON true
          LEFT JOIN LATERAL (SELECT x.email FROM herald.contacts x
                              WHERE x.workspace_id = m.workspace_id AND x.id = m.contact_id LIMIT 1) c ON true
    ), known AS (
        SELECT i.* FROM input i
         WHERE i.email IS NOT NULL AND herald._valid_email(i.email)
           AND (only_workspace IS NULL OR i.workspace_id = only_workspace)
           AND EXISTS (SELECT 1 FROM herald.workspaces w WHERE w.id = i.workspace_id)
    ), fresh AS (
        -- an open or a click counts once per (message, kind, link) in 10 minutes: a replayed pixel or
        -- link (prefetchers, scanners, a hostile loop) adds no event and wakes no automation
        SELECT k.* FROM (SELECT k.*, row_number() OVER (PARTITION BY k.workspace_id, k.kind, k.message_id, k.payload ->> 'url'
                                                        ORDER BY k.ord) AS nth
                           FROM known k) k
         WHERE k.kind NOT IN ('opened', 'clicked') OR k.message_id IS NULL
            OR (k.nth = 1 AND NOT EXISTS (
                   SELECT 1 FROM herald.events e
                    WHERE e.workspace_id = k.workspace_id AND (e.payload ->> 'message_id') = k.message_id
                      AND e.kind IN ('email.opened', 'email.clicked') AND e.kind = 'email.' || k.kind
                      AND (e.payload ->> 'url') IS NOT DISTINCT FROM (k.payload ->> 'url')
                      AND e.created_at > now() - interval '10 minutes'))
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
        SELECT k.workspace_id, k.email,
               CASE k.kind WHEN 'unsubscribed' THEN 'list.unsubscribed' WHEN 'complaint' THEN 'email.complained'
                           WHEN 'opened' THEN 'email.opened' WHEN 'clicked' THEN 'email.clicked' ELSE 'email.bounced' END,
               k.payload || jsonb_strip_nulls(jsonb_build_object(
                   'message_id', k.message_id,
                   'bounce_type', CASE k.kind WHEN 'hard_bounce' THEN 'hard' WHEN 'soft_bounce' THEN 'soft' END))
          FROM fresh k ORDER BY k.ord
        RETURNING 1
    )
    SELECT count(*) INTO v_n FROM recorded;
    RETURN v_n;
END
$$;


-- ---------------------------------------------------------------- Rust functions new in 0.2.0
-- (as cargo pgrx generates them; the install script has the same)
-- JSON depth and size bounds, checked at ingest
CREATE FUNCTION herald._json_fault(value text, max_depth int, max_bytes int) RETURNS text
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_json_fault_wrapper';

-- ---------------------------------------------------- JSON a tenant stores is bounded
-- Validates one upsert_contacts entry; NULL when it is acceptable, else the reason. No sub-selects, so
-- Postgres inlines it (a non-inlined SQL function costs ~30 µs per row).
-- Why a JSON value a tenant stores (event payload, contact attributes, a send's context) is out of
-- bounds, or NULL: at most 32 levels deep and 64 KiB. Deeper values broke every tick for every workspace
-- once (the engine's JSON parser stops at 128 levels). Small values, the common case, are not even
-- printed: 33 levels take more than 256 bytes (a compressed value is always checked).
CREATE FUNCTION herald._value_fault(v jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE WHEN pg_column_size(v) > 256 OR pg_column_compression(v) IS NOT NULL
            THEN herald._json_fault(v::text, 32, 65536) END;

CREATE OR REPLACE FUNCTION herald._contact_entry_fault(entry jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE   -- STABLE like format(); a stricter label would block inlining
RETURN CASE
    WHEN jsonb_typeof(entry) IS DISTINCT FROM 'object' THEN
        format('entry must be a JSON object, got %s', coalesce(jsonb_typeof(entry), 'NULL'))
    WHEN (entry - ARRAY['email', 'attributes', 'timezone']) <> '{}' THEN
        format('unknown key(s) in %s; allowed: email, attributes, timezone', entry - ARRAY['email', 'attributes', 'timezone'])
    WHEN jsonb_typeof(entry -> 'email') IS DISTINCT FROM 'string' THEN 'email is missing or not a string'
    WHEN NOT herald._valid_email(herald._normalize_email(entry ->> 'email')) THEN
        format('email %s is not a valid address', entry -> 'email')
    WHEN entry ? 'attributes' AND jsonb_typeof(entry -> 'attributes') <> 'object' THEN
        format('attributes must be a JSON object, got %s', jsonb_typeof(entry -> 'attributes'))
    WHEN herald._value_fault(entry -> 'attributes') IS NOT NULL THEN
        'attributes ' || herald._value_fault(entry -> 'attributes')
    WHEN entry ? 'timezone' AND jsonb_typeof(entry -> 'timezone') <> 'null'
         AND (jsonb_typeof(entry -> 'timezone') <> 'string' OR NOT herald._valid_timezone(entry ->> 'timezone')) THEN
        format('timezone %s is not an IANA time zone name such as "Europe/Paris"', entry -> 'timezone')
END;

-- Validates one track_many entry; NULL when it is acceptable, else the reason (inlinable: no sub-selects).
CREATE OR REPLACE FUNCTION herald._event_entry_fault(entry jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE   -- STABLE like format(); a stricter label would block inlining
RETURN CASE
    WHEN jsonb_typeof(entry) IS DISTINCT FROM 'object' THEN
        format('must be a JSON object, got %s', coalesce(jsonb_typeof(entry), 'NULL'))
    WHEN (entry - ARRAY['email', 'kind', 'payload', 'occurred_at']) <> '{}' THEN
        format('unknown key(s) in %s; allowed: email, kind, payload, occurred_at', entry - ARRAY['email', 'kind', 'payload', 'occurred_at'])
    WHEN jsonb_typeof(entry -> 'email') IS DISTINCT FROM 'string' THEN 'email is missing or not a string'
    WHEN NOT herald._valid_email(herald._normalize_email(entry ->> 'email')) THEN
        format('email %s is not a valid address', entry -> 'email')
    WHEN jsonb_typeof(entry -> 'kind') IS DISTINCT FROM 'string' OR entry ->> 'kind' = '' THEN
        'kind is missing or not a non-empty string'
    WHEN length(entry ->> 'kind') > 200 THEN 'kind is longer than 200 characters'
    WHEN entry ? 'payload' AND jsonb_typeof(entry -> 'payload') <> 'object' THEN
        format('payload must be a JSON object, got %s', jsonb_typeof(entry -> 'payload'))
    WHEN herald._value_fault(entry -> 'payload') IS NOT NULL THEN
        'payload ' || herald._value_fault(entry -> 'payload')
    WHEN entry ? 'occurred_at' AND (jsonb_typeof(entry -> 'occurred_at') <> 'string'
                                    OR NOT herald._valid_timestamp(entry ->> 'occurred_at')) THEN
        format('occurred_at %s is not an RFC 3339 timestamp such as "2026-11-22T10:00:00Z"', entry -> 'occurred_at')
END;

-- Transactional email (priority 0: claimed before automation and broadcast mail). The contact is created
-- when the email is unknown. dedupe_key makes a retry of the caller's own request a no-op; by default
-- every call is a new message. Returns the outbox id (of the existing job when the key was seen before).
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

    WITH created AS (
        INSERT INTO herald.contacts AS c (workspace_id, email) VALUES (workspace, herald._normalize_email(send.email))
        ON CONFLICT ON CONSTRAINT contacts_workspace_id_email_key DO NOTHING RETURNING c.id, c.email
    ), announced AS (
        INSERT INTO herald.events (workspace_id, contact_id, email, kind) SELECT workspace, c.id, c.email, 'contact.created' FROM created c
    )
    SELECT x.id INTO v_contact FROM created x;
    IF v_contact IS NULL THEN
        SELECT c.id INTO v_contact FROM herald.contacts c
         WHERE c.email = herald._normalize_email(send.email) AND c.workspace_id IS NOT DISTINCT FROM workspace;   -- see contacts' unique index
    END IF;

    INSERT INTO herald.outbox AS o (workspace_id, kind, priority, dedupe_key, provider, rate_keys, contact_id, payload)
    VALUES (workspace, 'email', 0, v_key, provider,
            ARRAY[herald._provider_rate_key(workspace, provider), 'provider:' || provider], v_contact,
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


-- Finishes a batch of jobs in ONE statement: outbox rows, message history, stats deltas, decide cache,
-- and the enrollments waiting on them (success → on_success; a decide reply picks its path; permanent
-- failure → on_error or the enrollment fails). Retryable failures back off with jitter and become
-- dead after max_attempts (their enrollments keep waiting until redrive or exit).
-- Results for jobs that are not leased (unknown, already completed, reaped) change nothing and are
-- reported in a WARNING; the return value counts the results applied. Calling it twice is harmless.
CREATE OR REPLACE FUNCTION herald.complete(results jsonb) RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
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
    ), job AS (
        SELECT o.*, i.ok, i.retryable, i.error, i.message_id AS new_message_id, i.response AS new_response,
               CASE WHEN i.ok THEN 'done'
                    -- a retry of a broadcast paused or cancelled meanwhile is held or cancelled, not queued
                    WHEN i.retryable AND o.attempt < o.max_attempts THEN
                         CASE (SELECT b.status FROM herald.broadcasts b WHERE b.workspace_id = o.workspace_id AND b.id = o.broadcast_id)
                              WHEN 'paused' THEN 'held' WHEN 'cancelled' THEN 'cancelled' ELSE 'pending' END
                    WHEN i.retryable THEN 'dead'
                    ELSE 'failed' END AS outcome
          FROM input i JOIN herald.outbox o ON o.id = i.id
         WHERE o.status = 'leased'
           FOR UPDATE OF o
    ), finished AS (
        UPDATE herald.outbox o
           SET status = j.outcome,
               run_at = CASE WHEN j.outcome = 'pending' THEN now() + herald._retry_delay(j.attempt, random()) ELSE o.run_at END,
               leased_by = NULL, lease_until = NULL,
               message_id = coalesce(j.new_message_id, o.message_id),
               response = coalesce(j.new_response, o.response),
               last_error = CASE WHEN j.ok THEN o.last_error ELSE j.error END,
               done_at = CASE WHEN j.outcome IN ('done', 'failed', 'dead', 'cancelled') THEN now() END,
               updated_at = now()
          FROM job j
         WHERE o.workspace_id = j.workspace_id AND o.id = j.id
        RETURNING o.id
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
        -- where each finished job sends the enrollments waiting on it
        SELECT j.workspace_id, j.dedupe_key, j.node, j.outcome, j.error, j.kind, j.new_response,
               CASE WHEN j.outcome = 'done' AND j.kind = 'decide'
                        THEN coalesce(j.payload -> 'paths' ->> (j.new_response ->> (j.payload ->> 'field')), j.payload ->> 'default')
                    WHEN j.outcome = 'done' THEN j.on_success
                    ELSE j.on_error END AS next_node
          FROM job j WHERE j.outcome IN ('done', 'failed')
    ), waiting AS (
        -- the enrollments waiting on each finished job: one probe of enrollments_wait_job_idx per job.
        -- OFFSET 0 keeps the subquery from being flattened into a join whose order the planner picks from
        -- statistics: on tables autovacuum had not analysed yet it estimated the batch at one row and
        -- scanned every waiting enrollment once per job (1.2 s per complete(100) with 20,000 waiting)
        SELECT r.*, w.id AS enrollment_id
          FROM resolution r
         CROSS JOIN LATERAL (SELECT x.id FROM herald.enrollments x
                              WHERE x.workspace_id = r.workspace_id AND x.wait_job = r.dedupe_key
                                AND x.status = 'waiting' AND x.wait_kind = 'job'
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
        RETURNING e.workspace_id, e.automation_id, e.status, r.node, r.outcome
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

-- ------------------------------------------------- versions of an automation (issue 15)
-- update_automation makes version n+1 of an automation; enrollments are pinned to their version (written as
-- "version" in their event document) unless the update migrates them; tick runs each enrollment on its
-- version's definition; preview_automation_update and preview_broadcast answer without changing anything.
CREATE TABLE herald.automation_versions (
    workspace_id  text NOT NULL,
    automation_id bigint NOT NULL,
    version       int NOT NULL CHECK (version >= 1),
    definition    jsonb NOT NULL,
    start_node    text NOT NULL,
    created_by    name,                 -- herald._caller() of the call that made it
    note          text,                 -- update_automation's options.note
    report        jsonb,                -- what the update did (its return value); NULL for version 1
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, automation_id, version)
);
SELECT pg_catalog.pg_extension_config_dump('herald.automation_versions', '');
-- every automation so far is its version 1 (who made it was not recorded)
INSERT INTO herald.automation_versions (workspace_id, automation_id, version, definition, start_node, created_at)
SELECT a.workspace_id, a.id, 1, a.definition, a.start_node, a.created_at FROM herald.automations a;

-- The `event` keys that pin an enrollment to `version` (version 1 writes nothing). Inlinable.
CREATE FUNCTION herald._version_tag(version int) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE WHEN version > 1 THEN jsonb_build_object('version', version) ELSE '{}'::jsonb END;

-- The newest version of an automation and its start node (no row: an automation without version rows,
-- which runs as version 1).
CREATE FUNCTION herald._newest_version(workspace text, automation bigint)
RETURNS TABLE (version int, start_node text)
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT v.version, v.start_node FROM herald.automation_versions v
     WHERE v.workspace_id = _newest_version.workspace AND v.automation_id = _newest_version.automation
     ORDER BY v.version DESC
     LIMIT 1;
END;

-- The definition of one version (version 1 of an automation without version rows: its definition).
CREATE FUNCTION herald._version_definition(workspace text, automation bigint, version int) RETURNS jsonb
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce(
        (SELECT v.definition FROM herald.automation_versions v
          WHERE v.workspace_id = _version_definition.workspace AND v.automation_id = _version_definition.automation
            AND v.version = _version_definition.version),
        (SELECT a.definition FROM herald.automations a
          WHERE a.workspace_id = _version_definition.workspace AND a.id = _version_definition.automation
            AND _version_definition.version = 1
            AND NOT EXISTS (SELECT 1 FROM herald.automation_versions v
                             WHERE v.workspace_id = a.workspace_id AND v.automation_id = a.id)));
END;

-- What a new definition changes against the old one: node ids added, removed, changed (sorted), and the
-- other top-level keys that differ (name, trigger, start, reentry, …).
CREATE FUNCTION herald._version_changes(old jsonb, new jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE
BEGIN ATOMIC
    SELECT jsonb_build_object(
        'added', coalesce((SELECT jsonb_agg(k ORDER BY k) FROM jsonb_object_keys(new -> 'nodes') k
                            WHERE NOT (old -> 'nodes') ? k), '[]'),
        'removed', coalesce((SELECT jsonb_agg(k ORDER BY k) FROM jsonb_object_keys(old -> 'nodes') k
                              WHERE NOT (new -> 'nodes') ? k), '[]'),
        'changed', coalesce((SELECT jsonb_agg(k ORDER BY k) FROM jsonb_object_keys(new -> 'nodes') k
                              WHERE (old -> 'nodes') ? k AND old -> 'nodes' -> k <> new -> 'nodes' -> k), '[]'),
        'settings', coalesce((SELECT jsonb_agg(k ORDER BY k)
                                FROM (SELECT jsonb_object_keys(old) UNION SELECT jsonb_object_keys(new)) s(k)
                               WHERE k <> 'nodes' AND (old -> k) IS DISTINCT FROM (new -> k)), '[]'));
END;

-- update_automation's options, checked: {"migrate": {"<old node>": "<new node>" | null}, "note": text}.
CREATE FUNCTION herald._version_options(options jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_bad text;
BEGIN
    IF options IS NULL OR options = 'null' THEN
        RETURN '{}';
    END IF;
    IF jsonb_typeof(options) <> 'object' THEN
        RAISE EXCEPTION 'options must be a JSON object, got %', jsonb_typeof(options)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Example: {"migrate": {"old_node": "new_node"}, "note": "why"}';
    END IF;
    SELECT string_agg(k, ', ' ORDER BY k) INTO v_bad FROM jsonb_object_keys(options) k WHERE k NOT IN ('migrate', 'note');
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown option(s) %; allowed: migrate, note', v_bad USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF options ? 'note' AND (jsonb_typeof(options -> 'note') <> 'string' OR length(options ->> 'note') > 1000) THEN
        RAISE EXCEPTION 'options.note must be a string of at most 1000 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF options -> 'migrate' = 'null' THEN
        options := options - 'migrate';
    END IF;
    IF options ? 'migrate' THEN
        IF jsonb_typeof(options -> 'migrate') <> 'object' THEN
            RAISE EXCEPTION 'options.migrate must be an object of old node id -> new node id (or null: exit), got %',
                jsonb_typeof(options -> 'migrate') USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT string_agg(format('%s: %s', quote_literal(m.key), m.value), ', ' ORDER BY m.key) INTO v_bad
          FROM jsonb_each(options -> 'migrate') m WHERE jsonb_typeof(m.value) NOT IN ('string', 'null');
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'options.migrate: each old node maps to a new node id or to null (exit), not %', v_bad
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    RETURN options;
END
$$;

-- What updating automation `v` to `definition` does, as update_automation reports it. `ids`: the
-- in-progress enrollments the update locked (NULL: a preview, counted without locks). Faults are listed
-- in "errors" (the update refuses when there is one; a preview shows them).
CREATE FUNCTION herald._version_plan(v herald.automations, definition jsonb, options jsonb, ids bigint[]) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_migrate jsonb := options -> 'migrate';
    v_new_nodes jsonb := definition -> 'nodes';
    v_cur int;
    v_cur_def jsonb;
    v_errors text[] := '{}';
    v_nodes jsonb;
    v_node_errors text[];
    v_pinned bigint;
    v_moved bigint;
    v_exited bigint;
BEGIN
    PERFORM herald._check_automation(definition);
    SELECT n.version, herald._version_definition(v.workspace_id, v.id, n.version) INTO v_cur, v_cur_def
      FROM herald._newest_version(v.workspace_id, v.id) n;
    IF NOT FOUND THEN
        v_cur := 1;
        v_cur_def := v.definition;
    END IF;
    IF v.status = 'archived' THEN
        v_errors := v_errors || format('automation %s is archived: an archived automation is final', v.id);
    END IF;
    IF v_migrate IS NOT NULL THEN
        SELECT v_errors || coalesce(array_agg(format('migrate: %s -> %s: %s', m.key, coalesce(m.value #>> '{}', 'null'),
                                                     CASE WHEN NOT m.known THEN format('%s is not a node of any version of automation %s', m.key, v.id)
                                                          ELSE format('node %s does not exist in the new version', m.value #>> '{}') END)
                                              ORDER BY m.key), '{}')
          INTO v_errors
          FROM (SELECT j.key, j.value,
                       EXISTS (SELECT 1 FROM herald.automation_versions x
                                WHERE x.workspace_id = v.workspace_id AND x.automation_id = v.id AND x.definition -> 'nodes' ? j.key)
                       OR v.definition -> 'nodes' ? j.key AS known
                  FROM jsonb_each(v_migrate) j) m
         WHERE NOT m.known OR (jsonb_typeof(m.value) = 'string' AND NOT v_new_nodes ? (m.value #>> '{}'));
    END IF;

    WITH held AS (
        SELECT coalesce((e.event ->> 'version')::int, 1) AS version, e.current_node AS node,
               count(*) FILTER (WHERE e.status = 'active') AS active,
               count(*) FILTER (WHERE e.status = 'waiting') AS waiting,
               count(*) FILTER (WHERE e.wait_kind = 'job') AS on_job
          FROM herald.enrollments e
         WHERE e.workspace_id = v.workspace_id AND e.automation_id = v.id AND e.status IN ('active', 'waiting')
           AND (ids IS NULL OR e.id = ANY (ids))
         GROUP BY 1, 2
    ), decided AS (
        SELECT h.*, o.node_def AS old_node, v_new_nodes -> (v_migrate ->> h.node) AS new_node,
               CASE WHEN v_migrate IS NULL THEN 'pinned'
                    WHEN NOT v_migrate ? h.node THEN 'unmapped'
                    WHEN v_migrate -> h.node = 'null' THEN 'exit'
                    ELSE 'move' END AS action,
               v_migrate ->> h.node AS target
          FROM held h
         CROSS JOIN LATERAL (SELECT herald._version_definition(v.workspace_id, v.id, h.version) -> 'nodes' -> h.node AS node_def) o
    ), judged AS (
        SELECT d.*,
               CASE WHEN d.action = 'unmapped' THEN
                        format('node %s (version %s) holds %s contact(s) (%s active, %s waiting) and is not in options.migrate',
                               d.node, d.version, d.active + d.waiting, d.active, d.waiting)
                    WHEN d.action = 'move' AND d.new_node IS NOT NULL AND d.waiting > 0
                         AND d.old_node ->> 'type' IS DISTINCT FROM d.new_node ->> 'type' THEN
                        format('node %s (version %s) holds %s contact(s) waiting at a node of type %s: they keep that wait, so %s must be of type %s too (it is of type %s)',
                               d.node, d.version, d.waiting, d.old_node ->> 'type', d.target, d.old_node ->> 'type', d.new_node ->> 'type')
                    WHEN d.action = 'move' AND d.new_node IS NOT NULL AND d.on_job > 0 AND d.old_node ->> 'type' = 'decide'
                         AND (d.old_node -> 'field' IS DISTINCT FROM d.new_node -> 'field'
                              OR d.old_node -> 'paths' IS DISTINCT FROM d.new_node -> 'paths'
                              OR d.old_node -> 'default' IS DISTINCT FROM d.new_node -> 'default') THEN
                        format('node %s (version %s) holds %s contact(s) waiting on a decide question, which routes by its field, paths and default: %s must have the same ones',
                               d.node, d.version, d.on_job, d.target)
               END AS fault
          FROM decided d
    )
    SELECT jsonb_agg(jsonb_build_object('version', j.version, 'node', j.node, 'type', j.old_node ->> 'type',
                                        'contacts', j.active + j.waiting, 'active', j.active, 'waiting', j.waiting,
                                        'action', j.action, 'to', j.target) ORDER BY j.version, j.node),
           array_agg(j.fault ORDER BY j.version, j.node) FILTER (WHERE j.fault IS NOT NULL),
           coalesce(sum(j.active + j.waiting) FILTER (WHERE j.action = 'pinned'), 0),
           coalesce(sum(j.active + j.waiting) FILTER (WHERE j.action = 'move'), 0),
           coalesce(sum(j.active + j.waiting) FILTER (WHERE j.action = 'exit'), 0)
      INTO v_nodes, v_node_errors, v_pinned, v_moved, v_exited
      FROM judged j;

    RETURN jsonb_build_object(
        'automation', v.id, 'from_version', v_cur, 'to_version', v_cur + 1,
        'changes', herald._version_changes(v_cur_def, definition),
        'nodes', coalesce(v_nodes, '[]'),
        'pinned', v_pinned, 'moved', v_moved, 'exited', v_exited,
        'errors', to_jsonb(v_errors || coalesce(v_node_errors, '{}')));
END
$$;

-- Makes `definition` the next version of `automation` (same id). Validated like create_automation; an
-- archived automation cannot change; a live or paused one needs its templates and providers to exist.
-- Enrollments in progress stay on their version unless options.migrate moves them (see the top of this
-- file). Returns what it did, in the shape preview_automation_update answers with.
CREATE FUNCTION herald.update_automation(automation bigint, definition jsonb, options jsonb DEFAULT '{}') RETURNS jsonb
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
            RETURNING e.id
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

-- What update_automation(automation, definition, options) would do, changing nothing: per node holding
-- contacts, how many and where they would go; what the new version changes; "errors" lists why the
-- update would be refused (empty: it would go through). An invalid definition raises, as the update does.
CREATE FUNCTION herald.preview_automation_update(automation bigint, definition jsonb, options jsonb DEFAULT '{}') RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.automations;
    v_opts jsonb;
BEGIN
    v_opts := herald._version_options(options);
    PERFORM herald._authorize(a.workspace_id, format('automation %s', automation))
       FROM herald.automations a WHERE a.id = automation;
    SELECT * INTO v FROM herald.automations a WHERE a.id = automation;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown automation %', coalesce(automation::text, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    RETURN herald._version_plan(v, definition, v_opts, NULL);
END
$$;

-- Enrollments per version of an automation, by status and node (where an enrollment is, or where it
-- ended). automation_stats stays the total over every version.
CREATE FUNCTION herald.automation_version_stats(automation bigint)
RETURNS TABLE (version int, status text, node text, enrollments bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_ws text;
BEGIN
    SELECT a.workspace_id INTO v_ws FROM herald.automations a WHERE a.id = automation;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown automation %', coalesce(automation::text, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM herald._authorize(v_ws, format('automation %s', automation));
    RETURN QUERY
    SELECT coalesce((e.event ->> 'version')::int, 1), e.status, e.current_node, count(*)
      FROM herald.enrollments e
     WHERE e.workspace_id = v_ws AND e.automation_id = automation_version_stats.automation
     GROUP BY 1, 2, 3
     ORDER BY 1, 2, 3;
END
$$;

-- The versions of every automation, newest marked current: who made each, when, why (note), what it
-- changed and what its update did (contacts pinned, moved, exited).
CREATE VIEW herald.automation_history AS
SELECT v.workspace_id, v.automation_id, v.version,
       v.version = max(v.version) OVER (PARTITION BY v.workspace_id, v.automation_id) AS current,
       v.definition ->> 'name' AS name, v.created_by, v.created_at, v.note,
       v.report -> 'changes' AS changes,
       (v.report ->> 'pinned')::bigint AS pinned, (v.report ->> 'moved')::bigint AS moved,
       (v.report ->> 'exited')::bigint AS exited,
       v.definition
  FROM herald.automation_versions v;

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

-- Enrols contacts by id. Totals add up to the input's length:
--   enrolled  new enrollments;
--   skipped   already enrolled as the re-entry rule forbids again (also a duplicate id in the input);
--   rejected  NULL or not a contact of the automation's workspace.
-- Concurrent calls for the same contacts cannot both enrol: the re-entry unique index decides.
CREATE OR REPLACE FUNCTION herald.enroll(automation bigint, contact_ids bigint[])
RETURNS TABLE (enrolled bigint, skipped bigint, rejected bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
AS $$
DECLARE
    v herald.automations;
BEGIN
    SELECT * INTO v FROM herald.automations a WHERE a.id = automation;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown automation %', coalesce(automation::text, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM herald._require_live(v);
    IF contact_ids IS NULL THEN
        RAISE EXCEPTION 'contact_ids must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;

    WITH wanted AS (
        SELECT DISTINCT u.id FROM unnest(contact_ids) AS u(id) WHERE u.id IS NOT NULL
    ), known AS (
        SELECT c.id FROM herald.contacts c JOIN wanted w ON c.workspace_id = v.workspace_id AND c.id = w.id
    ), ins AS (
        INSERT INTO herald.enrollments (workspace_id, automation_id, contact_id, entry_key, current_node, event)
        -- the newest version and its start node, read together in this statement (sql/versions.sql)
        SELECT v.workspace_id, v.id, k.id, herald._entry_key(v.reentry, NULL), coalesce(cur.start_node, v.start_node),
               nullif(herald._version_tag(cur.version), '{}')
          FROM known k
          LEFT JOIN herald._newest_version(v.workspace_id, v.id) cur ON true
         ORDER BY k.id
        ON CONFLICT (workspace_id, automation_id, contact_id, entry_key)
           WHERE entry_key <> 'active' OR status IN ('active', 'waiting')
           DO NOTHING
        RETURNING 1
    ), counted AS (
        INSERT INTO herald.stats_delta (workspace_id, automation_id, metric, n)
        SELECT v.workspace_id, v.id, 'enrolled', count(*) FROM ins HAVING count(*) > 0
    ), accepted AS (
        SELECT count(*) AS n FROM unnest(contact_ids) u(id) WHERE u.id IN (SELECT k.id FROM known k)
    )
    SELECT (SELECT count(*) FROM ins),
           (SELECT a.n FROM accepted a) - (SELECT count(*) FROM ins),
           cardinality(contact_ids) - (SELECT a.n FROM accepted a)
      INTO enrolled, skipped, rejected;
    RETURN NEXT;
END
$$;

-- Enrols every contact of the workspace that matches a segment condition (contact.* fields only).
-- rejected is always 0 here; skipped counts matching contacts the re-entry rule keeps out.
CREATE OR REPLACE FUNCTION herald.enroll_segment(automation bigint, segment jsonb)
RETURNS TABLE (enrolled bigint, skipped bigint, rejected bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
AS $$
DECLARE
    v herald.automations;
BEGIN
    SELECT * INTO v FROM herald.automations a WHERE a.id = automation;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown automation %', coalesce(automation::text, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM herald._require_live(v);
    PERFORM herald._check_segment(segment);

    WITH matching AS (
        SELECT c.id FROM herald.contacts c
         WHERE c.workspace_id = v.workspace_id
           AND herald._matches(segment, herald._contact_facts(c.email, c.attributes, c.timezone, c.tags), NULL, NULL)
    ), ins AS (
        INSERT INTO herald.enrollments (workspace_id, automation_id, contact_id, entry_key, current_node, event)
        -- the newest version and its start node, read together in this statement (sql/versions.sql)
        SELECT v.workspace_id, v.id, m.id, herald._entry_key(v.reentry, NULL), coalesce(cur.start_node, v.start_node),
               nullif(herald._version_tag(cur.version), '{}')
          FROM matching m
          LEFT JOIN herald._newest_version(v.workspace_id, v.id) cur ON true
         ORDER BY m.id
        ON CONFLICT (workspace_id, automation_id, contact_id, entry_key)
           WHERE entry_key <> 'active' OR status IN ('active', 'waiting')
           DO NOTHING
        RETURNING 1
    ), counted AS (
        INSERT INTO herald.stats_delta (workspace_id, automation_id, metric, n)
        SELECT v.workspace_id, v.id, 'enrolled', count(*) FROM ins HAVING count(*) > 0
    )
    SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM matching) - (SELECT count(*) FROM ins), 0
      INTO enrolled, skipped, rejected;
    RETURN NEXT;
END
$$;

CREATE OR REPLACE FUNCTION herald.tick(max_steps int DEFAULT 10000) RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
AS $$
DECLARE
    v_steps int;
BEGIN
    IF max_steps IS NULL OR max_steps < 1 OR max_steps > 100000 THEN
        RAISE EXCEPTION 'max_steps must be between 1 and 100000, got %', coalesce(max_steps::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    WITH due AS (
        SELECT e.workspace_id, e.id, e.automation_id, e.contact_id, e.status, e.current_node, e.visit,
               e.context, e.event,
               -- the version the enrollment is pinned to (sql/versions.sql); none written: version 1
               coalesce((e.event ->> 'version')::int, 1) AS version
          FROM herald.enrollments e
         WHERE e.status IN ('active', 'waiting') AND e.next_run_at <= now()
           AND EXISTS (SELECT 1 FROM herald.automations a
                        WHERE a.workspace_id = e.workspace_id AND a.id = e.automation_id AND a.status = 'live')
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
        SELECT (SELECT json_object_agg(x.automation_id::text || ':' || x.version::text, x.definition) FROM defs x) AS automations,
               json_agg(json_build_object(
                   'id', d.id, 'workspace_id', d.workspace_id, 'automation_id', d.automation_id, 'version', d.version,
                   'contact_id', d.contact_id, 'status', d.status, 'node', d.current_node,
                   'visit', d.visit, 'context', d.context, 'event', d.event -> 'payload',
                   'contact', herald._contact_facts(c.email, c.attributes, c.timezone, c.tags),
                   'timezone', c.timezone)) AS enrollments
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
        SELECT s.*, k.job_kind, k.job_key, dc.reply AS cache_reply,
               coalesce(s.job -> 'payload' -> 'paths' ->> (dc.reply ->> (s.job -> 'payload' ->> 'field')),
                        s.job -> 'payload' ->> 'default') AS cache_next
          FROM batch b
         CROSS JOIN LATERAL herald._steps(b.automations, b.enrollments::text, extract(epoch FROM now())::float8, 50) s
         CROSS JOIN LATERAL (
             SELECT s.job ->> 'kind' AS job_kind,
                    -- decide: identical questions share one job per TTL window (and one cached reply)
                    CASE WHEN s.job ->> 'kind' = 'decide'
                         THEN format('decide:%s:%s', s.job ->> 'request_hash',
                                     floor(extract(epoch FROM now()) / greatest((s.job ->> 'cache_ttl_seconds')::float8, 1)))
                         ELSE s.job ->> 'dedupe_key' END AS job_key) k
          LEFT JOIN LATERAL (
              SELECT c.reply FROM herald.decide_cache c
               WHERE k.job_kind = 'decide' AND c.workspace_id = s.workspace_id
                 AND c.request_hash = s.job ->> 'request_hash' AND c.expires_at > now()
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
        RETURNING 1
    ), queued AS (
        INSERT INTO herald.outbox AS o (workspace_id, kind, priority, dedupe_key, provider, rate_keys, contact_id,
                                        automation_id, enrollment_id, node, on_success, on_error, payload)
        SELECT st.workspace_id, st.job_kind, 1, st.job_key, st.job ->> 'provider',
               CASE WHEN st.job_kind = 'email'
                    THEN ARRAY[herald._provider_rate_key(st.workspace_id, st.job ->> 'provider'), 'provider:' || (st.job ->> 'provider')]
                    ELSE ARRAY['host:' || (st.job ->> 'rate_host')] END,
               st.contact_id, st.automation_id, st.enrollment_id, st.job ->> 'node',
               st.job ->> 'on_success', st.job ->> 'on_error',
               (st.job -> 'payload')::jsonb || jsonb_build_object('request_hash', st.job ->> 'request_hash',
                                                                 'cache_ttl_seconds', (st.job -> 'cache_ttl_seconds')::jsonb)
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
    RETURN v_steps;
END
$$;

-- Resolves an enrollment parked on an approval node: approved → the node's "approved" path, else "rejected".
-- Who decided and when are recorded on the enrollment and in the step log.
CREATE OR REPLACE FUNCTION herald.decide_approval(enrollment bigint, approved boolean, actor text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.enrollments;
    v_next text;
BEGIN
    IF approved IS NULL THEN
        RAISE EXCEPTION 'approved must be true or false' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF actor IS NULL OR btrim(actor) = '' THEN
        RAISE EXCEPTION 'actor is required: who decides' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v := herald._lock_enrollment(enrollment);
    IF v.status <> 'waiting' OR v.wait_kind IS DISTINCT FROM 'approval' THEN
        RAISE EXCEPTION 'enrollment % is not waiting for an approval (status %, at node %)', enrollment, v.status, v.current_node
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- the node's paths in the version the enrollment is on (sql/versions.sql)
    v_next := herald._version_definition(v.workspace_id, v.automation_id, coalesce((v.event ->> 'version')::int, 1))
              -> 'nodes' -> v.current_node ->> CASE WHEN approved THEN 'approved' ELSE 'rejected' END;

    UPDATE herald.enrollments e
       SET status = 'active', current_node = v_next, next_run_at = now(), wait_kind = NULL,
           decided_by = actor, decided_at = now(), approved = decide_approval.approved, updated_at = now()
     WHERE e.workspace_id = v.workspace_id AND e.id = v.id;
    INSERT INTO herald.step_log (workspace_id, enrollment_id, automation_id, nodes, visits, actions)
    VALUES (v.workspace_id, v.id, v.automation_id, ARRAY[v.current_node], ARRAY[v.visit],
            ARRAY[format('%s by %s -> %s', CASE WHEN approved THEN 'approved' ELSE 'rejected' END, actor, v_next)]);
    INSERT INTO herald.stats_delta (workspace_id, automation_id, node, metric, n)
    VALUES (v.workspace_id, v.automation_id, v.current_node, CASE WHEN approved THEN 'approved' ELSE 'rejected' END, 1);
    PERFORM pg_notify('herald.tick', '');
END
$$;

-- What a broadcast would send to, creating and changing nothing: the audience exactly as the enqueue
-- reads it (herald._audience with the definition's filters: lists, segment, exclusions, suppressions;
-- failed recipients for a resend_failed broadcast), counted; its split per variation and A/B share (the
-- enqueue's hash buckets: exact for a broadcast that exists, with its id; for a definition not yet
-- created the same hashing over id 0, so the same proportions); with send_at.local_time, recipients per
-- UTC hour they would be sent in (from now, or from send_at when that is later); and a sample of
-- addresses (the first `sample` in contact order). One pass over the audience; the time zones are
-- grouped before any time is computed.
CREATE FUNCTION herald._preview_audience(v herald.broadcasts, sample int) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off
AS $$
DECLARE
    f record;
    v_test float8 := coalesce((v.definition -> 'ab_test' ->> 'test_percent')::float8, 0);
    v_local time := (v.definition -> 'send_at' ->> 'local_time')::time;
    v_from timestamptz := greatest(now(), coalesce(v.send_at, now()));
    v_keys text[];
    v_bounds float8[];
    v_result jsonb;
BEGIN
    SELECT a.* INTO f FROM herald._audience_filters(v) a;
    SELECT array_agg(x.value ->> 'key' ORDER BY x.ord), array_agg(x.lower ORDER BY x.ord)
      INTO v_keys, v_bounds
      FROM (SELECT e.value, e.ord,
                   coalesce(sum((e.value ->> 'weight')::float8)
                                OVER (ORDER BY e.ord ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS lower
              FROM jsonb_array_elements(v.definition -> 'variations') WITH ORDINALITY e(value, ord)) x;

    WITH audience AS MATERIALIZED (
        SELECT a.contact_id, a.timezone
          FROM herald._audience(v.workspace_id, 0, 2147483647, f.lists, f.segment_contains, f.segment_any,
                                f.segment_tags, f.segment_emails, f.segment, f.exclude, v.retry_of) a
    ), placed AS MATERIALIZED (
        -- as _enqueue_chunk places them: the test share (bucket < test_percent) split by weight and the
        -- rest to the winner; without a test, everyone split by weight
        SELECT v_test > 0 AND herald._broadcast_bucket(coalesce(v.id, 0), a.contact_id, 'test') < v_test AS in_test,
               CASE WHEN cardinality(v_keys) = 1 THEN 1
                    ELSE width_bucket(herald._broadcast_bucket(coalesce(v.id, 0), a.contact_id, 'variation'), v_bounds) END AS slot
          FROM audience a
    ), per_slot AS (
        SELECT p.slot, count(*) AS n FROM placed p WHERE v_test = 0 OR p.in_test GROUP BY p.slot
    ), zones AS (
        SELECT a.timezone, count(*) AS n FROM audience a WHERE v_local IS NOT NULL GROUP BY a.timezone
    ), hours AS (
        -- the next time the recipient's clock shows local_time, as the enqueue computes it
        SELECT date_trunc('hour', CASE WHEN t > v_from THEN t ELSE t + interval '1 day' END) AS hour, sum(z.n) AS n
          FROM zones z
         CROSS JOIN LATERAL (SELECT ((v_from AT TIME ZONE coalesce(z.timezone, 'UTC'))::date + v_local)
                                    AT TIME ZONE coalesce(z.timezone, 'UTC') AS t) l
         GROUP BY 1
    )
    SELECT jsonb_build_object(
        'recipients', (SELECT count(*) FROM audience),
        'variations', (SELECT coalesce(jsonb_agg(jsonb_build_object('key', k.key,
                                                                    'weight', v.definition -> 'variations' -> (k.ord::int - 1) -> 'weight',
                                                                    'recipients', coalesce(s.n, 0)) ORDER BY k.ord), '[]')
                         FROM unnest(v_keys) WITH ORDINALITY k(key, ord)
                         LEFT JOIN per_slot s ON s.slot = k.ord),
        'ab_test', CASE WHEN v_test > 0 THEN jsonb_build_object(
                       'test_percent', v_test, 'metric', v.definition -> 'ab_test' -> 'metric',
                       'test', (SELECT count(*) FROM placed p WHERE p.in_test),
                       'rest', (SELECT count(*) FROM placed p WHERE NOT p.in_test)) END,
        'local_time', v.definition -> 'send_at' -> 'local_time',
        'send_hours', CASE WHEN v_local IS NOT NULL THEN
                          (SELECT coalesce(jsonb_agg(jsonb_build_object('hour', h.hour, 'recipients', h.n) ORDER BY h.hour), '[]')
                             FROM hours h) END,
        'sample', (SELECT coalesce(jsonb_agg(c.email ORDER BY s.contact_id), '[]')
                     FROM (SELECT a.contact_id FROM audience a ORDER BY a.contact_id LIMIT greatest(sample, 0)) s
                    CROSS JOIN LATERAL (SELECT c.email FROM herald.contacts c
                                         WHERE c.workspace_id = v.workspace_id AND c.id = s.contact_id LIMIT 1) c),
        'exact_split', v.id IS NOT NULL)
      INTO v_result;
    RETURN v_result;
END
$$;

-- Previews an existing broadcast (any status), without locking or changing it.
CREATE FUNCTION herald.preview_broadcast(broadcast bigint) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
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

-- Previews a broadcast definition (validated like create_broadcast; nothing is created): see
-- herald._preview_audience for the answer's shape.
CREATE FUNCTION herald.preview_broadcast(workspace text, definition jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
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

-- ---------------------------------------------------------- lists and erasure (right to be forgotten)
-- Lists a workspace has made (create_list, subscribe). Memberships are herald.list_members; a list an
-- update_contact node joins contacts to exists there even without a row here.
CREATE TABLE herald.lists (
    workspace_id text NOT NULL,
    name         text NOT NULL CHECK (name <> '' AND length(name) <= 200),
    description  text CHECK (length(description) <= 2000),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, name)
);

-- Contacts erased with herald.delete_contact (a person's right to erasure): who, when, how many rows
-- went from each table. The address itself is not kept, only its key (herald._email_key).
CREATE TABLE herald.erasures (
    workspace_id text NOT NULL,
    email_key    text NOT NULL,
    erased_by    name NOT NULL,
    erased_at    timestamptz NOT NULL DEFAULT now(),
    removed      jsonb NOT NULL,
    PRIMARY KEY (workspace_id, email_key, erased_at)
);

SELECT pg_catalog.pg_extension_config_dump('herald.lists', '');
SELECT pg_catalog.pg_extension_config_dump('herald.erasures', '');
ALTER TABLE herald.suppressions DROP CONSTRAINT suppressions_reason_check,
    ADD CONSTRAINT suppressions_reason_check CHECK (reason IN ('unsubscribed', 'hard_bounce', 'complaint', 'manual', 'erased'));

-- The key an erased address is remembered by: 'sha256:' and the hex SHA-256 of the normalised address.
CREATE FUNCTION herald._email_key(email text) RETURNS text
LANGUAGE sql STABLE STRICT PARALLEL SAFE   -- STABLE like convert_to(); a stricter label would block inlining
RETURN 'sha256:' || encode(sha256(convert_to(herald._normalize_email(email), 'UTF8')), 'hex');

-- Creates a list (or updates its description). Returns true when it is new. herald_app.
CREATE FUNCTION herald.create_list(workspace text, name text, description text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_new boolean;
BEGIN
    PERFORM herald._require_workspace(workspace);
    IF name IS NULL OR btrim(name) = '' OR length(name) > 200 THEN
        RAISE EXCEPTION 'invalid list name %', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value', DETAIL = 'A list name is 1 to 200 characters.';
    END IF;
    IF length(description) > 2000 THEN
        RAISE EXCEPTION 'list %: the description is % characters; at most 2000 are allowed', quote_literal(name), length(description)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    INSERT INTO herald.lists AS l (workspace_id, name, description) VALUES (workspace, name, description)
    ON CONFLICT ON CONSTRAINT lists_pkey DO UPDATE SET description = coalesce(EXCLUDED.description, l.description)
    RETURNING (xmax = 0) INTO v_new;
    RETURN v_new;
END
$$;

-- Subscribes addresses to a list (one or many; an unknown address becomes a contact, with its
-- contact.created event). Every new subscription is a list.joined event, as update_contact nodes emit,
-- so automations can trigger on it. Totals add up to the array's length: subscribed (new, or back
-- from unsubscribed), already (subscribed before, or a repeat in the array), rejected (not a valid
-- address). Set-based: a constant number of statements whatever the array's length. herald_app.
CREATE FUNCTION herald.subscribe(workspace text, list text, emails text[])
RETURNS TABLE (subscribed bigint, already bigint, rejected bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off
AS $$
DECLARE
    v_valid jsonb;
BEGIN
    PERFORM herald.create_list(workspace, list);
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

-- Unsubscribes addresses from a list (the membership stays, as 'unsubscribed'; a list.left event each).
-- Not a suppression: other lists and transactional mail still reach them (herald.suppress stops all).
-- Totals: unsubscribed, not_subscribed (unknown address, not a member, already out, or a repeat),
-- rejected (not a valid address). herald_app.
CREATE FUNCTION herald.unsubscribe(workspace text, list text, emails text[])
RETURNS TABLE (unsubscribed bigint, not_subscribed bigint, rejected bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off
AS $$
BEGIN
    PERFORM herald._require_workspace(workspace);
    IF emails IS NULL THEN
        RAISE EXCEPTION 'emails must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF cardinality(emails) > 100000 THEN
        RAISE EXCEPTION 'at most 100000 addresses per call, got %', cardinality(emails) USING ERRCODE = 'program_limit_exceeded';
    END IF;
    WITH wanted AS (
        SELECT DISTINCT c.id
          FROM unnest(emails) u(e)
         CROSS JOIN LATERAL (SELECT c.id FROM herald.contacts c
                              WHERE c.email = herald._normalize_email(u.e) AND c.workspace_id IS NOT DISTINCT FROM workspace
                              LIMIT 1) c
    ), left_list AS (
        UPDATE herald.list_members m SET status = 'unsubscribed', updated_at = now()
          FROM wanted w
         WHERE m.workspace_id = workspace AND m.list = unsubscribe.list AND m.contact_id = w.id AND m.status = 'subscribed'
        RETURNING m.contact_id
    ), announced AS (
        INSERT INTO herald.events (workspace_id, contact_id, kind, payload)
        SELECT unsubscribe.workspace, l.contact_id, 'list.left', jsonb_build_object('list', unsubscribe.list)
          FROM left_list l ORDER BY l.contact_id
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM announced),
           cardinality(emails) - (SELECT count(*) FROM announced)
               - (SELECT count(*) FROM unnest(emails) u(e) WHERE NOT herald._valid_email(herald._normalize_email(u.e))),
           (SELECT count(*) FROM unnest(emails) u(e) WHERE NOT herald._valid_email(herald._normalize_email(u.e)))
      INTO unsubscribed, not_subscribed, rejected;
    RETURN NEXT;
END
$$;

-- Erases a contact everywhere (a person's right to erasure): the contact, its events, enrollments and
-- their step log, its jobs (sent or not; a job already handed to a daemon may still go out), message
-- history, list memberships, import rejections that name it, and any suppression of the address.
-- What stays: a suppression under the address's key (herald._email_key, reason 'erased'), so it is
-- never mailed again even if it comes back; stats (counts, no one in them); and an audit row in
-- herald.erasures (who, when, rows removed per table). Returns those counts. An address herald does
-- not know is still suppressed by key. Cost: a scan of the workspace's enrollments and outbox (no
-- index by contact on those hot tables, on purpose). herald_app.
CREATE FUNCTION herald.delete_contact(workspace text, email text) RETURNS jsonb
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
    ), contacts AS (
        DELETE FROM herald.contacts c WHERE c.workspace_id = workspace AND c.id = v_contact RETURNING 1
    )
    SELECT jsonb_build_object(
               'contacts', (SELECT count(*) FROM contacts), 'events', (SELECT count(*) FROM events),
               'enrollments', (SELECT count(*) FROM enrollments), 'step_log', (SELECT count(*) FROM steps),
               'jobs', (SELECT count(*) FROM jobs), 'message_history', (SELECT count(*) FROM history),
               'list_members', (SELECT count(*) FROM lists), 'contact_rejections', (SELECT count(*) FROM rejections),
               'suppressions', (SELECT count(*) FROM suppressions))
      INTO v_removed;

    INSERT INTO herald.suppressions (workspace_id, email, reason)
    VALUES (workspace, v_key, 'erased')
    ON CONFLICT ON CONSTRAINT suppressions_pkey DO NOTHING;
    INSERT INTO herald.erasures (workspace_id, email_key, erased_by, removed)
    VALUES (workspace, v_key, herald._caller(), v_removed);
    RETURN v_removed;
END
$$;

-- Leases up to max_jobs due jobs. Three steps, whatever the batch size:
--   1. pick fairly and lock (SKIP LOCKED): a skip-scan visits only workspaces with pending work (idle ones
--      cost nothing), each offers its next jobs, and jobs are interleaved by their rank inside their
--      workspace, so a workspace with 100,000 pending cannot starve one with 10; priority first
--      (0 transactional, 1 automation, 2 broadcast);
--   2. rate limits (only when a picked job counts against a limit): lock those limits, keep the jobs that fit
--      in every key's sliding one-second window, record the grants;
--   3. lease them and return them with the contact, the latest template version and the enrollment context.
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
    WITH RECURSIVE busy AS (
        (SELECT o.workspace_id FROM herald.outbox o
          WHERE o.status = 'pending' AND o.run_at <= now()
          ORDER BY o.workspace_id LIMIT 1)
        UNION ALL
        SELECT (SELECT o.workspace_id FROM herald.outbox o
                 WHERE o.status = 'pending' AND o.run_at <= now() AND o.workspace_id > b.workspace_id
                 ORDER BY o.workspace_id LIMIT 1)
          FROM busy b WHERE b.workspace_id IS NOT NULL
    ), workspaces AS (
        SELECT b.workspace_id, count(*) OVER () AS n FROM busy b WHERE b.workspace_id IS NOT NULL
    ), offered AS (
        -- locked while scanned (SKIP LOCKED inside the per-workspace scan), so rows another claimer holds
        -- do not use up the limit; rows offered but not picked are released when claim commits
        SELECT c.workspace_id, c.id, c.priority, c.rate_keys,
               row_number() OVER (PARTITION BY c.workspace_id ORDER BY c.priority, c.run_at, c.id) AS rank
          FROM workspaces w
          CROSS JOIN LATERAL (
              SELECT o.workspace_id, o.id, o.priority, o.run_at,
                     herald._job_rate_keys(o.rate_keys, o.workspace_id, o.provider, o.broadcast_id) AS rate_keys
                FROM herald.outbox o
               WHERE o.workspace_id = w.workspace_id AND o.status = 'pending' AND o.run_at <= now()
               ORDER BY o.priority, o.run_at
               -- each busy workspace offers a few times its fair share, so small ones cannot underfill a batch
               LIMIT least(max_jobs, ceil(max_jobs * 4.0 / w.n)::int)
                 FOR UPDATE OF o SKIP LOCKED) c
    ), locked AS (
        SELECT f.id, f.rate_keys, row_number() OVER (ORDER BY f.priority, f.rank, f.workspace_id) AS ord
          FROM offered f
         ORDER BY f.priority, f.rank, f.workspace_id
         LIMIT max_jobs
    )
    SELECT array_agg(l.id ORDER BY l.ord),
           (SELECT array_agg(DISTINCT k) FROM locked l2, unnest(l2.rate_keys) k
             WHERE k IN (SELECT r.key FROM herald.rate_limits r))
      INTO v_ids, v_keys
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
           SET status = CASE x.broadcast_status WHEN 'paused' THEN 'held' ELSE 'cancelled' END,
               last_error = CASE WHEN x.broadcast_status = 'cancelled' THEN 'broadcast cancelled' ELSE o.last_error END,
               done_at = CASE WHEN x.broadcast_status = 'cancelled' THEN now() END, updated_at = now()
          FROM stopped x
         WHERE o.workspace_id = x.workspace_id AND o.id = x.id
        RETURNING o.id
    ), woken AS (
        UPDATE herald.enrollments e
           SET status = CASE WHEN x.on_success IS NULL THEN 'completed' ELSE 'active' END,
               current_node = coalesce(x.on_success, e.current_node), next_run_at = now(),
               ended_at = CASE WHEN x.on_success IS NULL THEN now() END,
               exit_reason = CASE WHEN x.on_success IS NULL THEN 'completed after ' || x.node || ' (recipient suppressed)' END,
               wait_kind = NULL, wait_job = NULL, updated_at = now()
          FROM suppressed x
         WHERE e.workspace_id = x.workspace_id AND e.wait_job = x.dedupe_key
           AND e.status = 'waiting' AND e.wait_kind = 'job'
        RETURNING 1
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
          FROM unnest(v_ids) WITH ORDINALITY AS u(id, ord)
         WHERE o.id = u.id AND o.status = 'pending'
        RETURNING o.*, u.ord
    )
    SELECT l.id, l.workspace_id, l.kind, l.provider, l.dedupe_key, l.attempt,
           p.payload || jsonb_build_object(
               'to', c.email,
               'contact', herald._contact_facts(c.email, c.attributes, c.timezone, c.tags),
               'context', coalesce(e.context, '{}'),
               'event', e.event -> 'payload',
               'automation_id', l.automation_id,
               'enrollment_id', l.enrollment_id)
           || CASE WHEN l.kind = 'email' THEN jsonb_build_object('template', CASE WHEN t.key IS NULL THEN NULL ELSE
                  jsonb_build_object('key', t.key, 'version', t.version, 'subject', t.subject, 'html', t.html, 'text', t.text_body) END)
              ELSE '{}' END
      FROM leased l
      LEFT JOIN herald.contacts c ON c.workspace_id = l.workspace_id AND c.id = l.contact_id
      LEFT JOIN herald.enrollments e ON e.workspace_id = l.workspace_id AND e.id = l.enrollment_id
      -- a broadcast's rows carry no payload: its variation's is kept once on the broadcast
      LEFT JOIN herald.broadcasts b ON b.workspace_id = l.workspace_id AND b.id = l.broadcast_id
     CROSS JOIN LATERAL (SELECT coalesce(b.payloads -> l.variation, l.payload) AS payload) p
      LEFT JOIN LATERAL (
          SELECT t.* FROM herald.templates t
           WHERE t.workspace_id = l.workspace_id AND t.key = p.payload ->> 'template'
           ORDER BY t.version DESC LIMIT 1) t ON l.kind = 'email'
     ORDER BY l.ord;
END
$$;


-- Every list of a workspace (made with create_list or joined by an update_contact node) with its counts.
CREATE VIEW herald.list_overview AS
SELECT n.workspace_id, n.name AS list, l.description,
       count(m.contact_id) FILTER (WHERE m.status = 'subscribed') AS subscribed,
       count(m.contact_id) FILTER (WHERE m.status = 'unsubscribed') AS unsubscribed,
       l.created_at
  FROM (SELECT workspace_id, name FROM herald.lists
        UNION
        SELECT DISTINCT workspace_id, list FROM herald.list_members) n
  LEFT JOIN herald.lists l ON l.workspace_id = n.workspace_id AND l.name = n.name
  LEFT JOIN herald.list_members m ON m.workspace_id = n.workspace_id AND m.list = n.name
 GROUP BY n.workspace_id, n.name, l.description, l.created_at;

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
        INSERT INTO herald.rate_limits (key, per_second) VALUES ('broadcast:' || v_id, (v_def ->> 'rate_per_second')::int);
    END IF;
    RETURN v_id;
END
$$;

-- draft → scheduled. `at` is when sending starts (default now); a definition's send_at.at wins over it.
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


-- ---------------------------------------------------------------- sql/simulate.sql (new in 0.2.0)
-- the dry run of an automation (issue 15 §2): its Rust function, as cargo pgrx generates it, then the SQL
CREATE FUNCTION herald._simulate(definition jsonb, options jsonb, events json, contacts json,
                                 since double precision, until double precision) RETURNS jsonb
LANGUAGE c
AS 'MODULE_PATHNAME', '_simulate_wrapper';

-- A time as the report shows it (RFC 3339 in UTC, whatever the session's DateStyle and TimeZone).
CREATE FUNCTION herald._simulate_time(t timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"');

-- The dry run itself; `automation` NULL for a definition not stored.
CREATE FUNCTION herald._simulate_run(workspace text, automation bigint, definition jsonb, since timestamptz,
                                     options jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- the json_agg statements are planned far above jit_above_cost, and compiling costs more than it saves
AS $$
DECLARE
    v_check jsonb;
    v_kinds text[];
    v_until timestamptz;
    v_prior boolean;
    v_events json;
    v_contacts json;
BEGIN
    -- the definition (the validator's faults with their JSON paths) and the options (each fault naming its
    -- key) before anything is read
    v_check := herald._simulate(definition, options, NULL, NULL, NULL, NULL);
    IF since IS NULL THEN
        RAISE EXCEPTION 'since must not be NULL' USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Give the start of the period to replay, e.g. now() - interval ''7 days''.';
    END IF;
    IF since > now() THEN
        RAISE EXCEPTION 'since (%) is in the future: a dry run replays events already recorded', herald._simulate_time(since)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_until := coalesce((v_check ->> 'until')::timestamptz, now());
    IF v_until <= since THEN
        RAISE EXCEPTION 'options.until (%) must be after since (%)', herald._simulate_time(v_until), herald._simulate_time(since)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_until > now() THEN
        RAISE EXCEPTION 'options.until (%) is in the future: a dry run replays events already recorded', herald._simulate_time(v_until)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Leave options.until out to replay up to now.';
    END IF;
    v_prior := (v_check ->> 'include_enrolled')::boolean;
    IF v_prior AND automation IS NULL THEN
        RAISE EXCEPTION 'options.include_enrolled needs a stored automation' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Use herald.simulate_automation(automation_id, since, options).';
    END IF;
    v_kinds := ARRAY(SELECT jsonb_array_elements_text(v_check -> 'kinds'));

    -- kind as its position in v_kinds: Rust compares integers, not strings, per event; the time as a float8
    -- (date_part: printed faster than extract's numeric, and microseconds survive at today's epochs)
    SELECT coalesce(json_agg(json_build_array(e.contact_id, date_part('epoch', e.occurred_at),
                                              array_position(v_kinds, e.kind), e.payload)
                             ORDER BY e.contact_id, e.occurred_at, e.id), '[]')
      INTO v_events
      FROM herald.events e
     WHERE e.workspace_id = workspace AND e.kind = ANY (v_kinds) AND e.contact_id IS NOT NULL
       AND e.occurred_at >= since AND e.occurred_at <= v_until;

    SELECT coalesce(json_agg(json_build_array(
               c.id, herald._contact_facts(c.email, c.attributes, c.timezone, c.tags), c.timezone,
               CASE WHEN NOT v_prior THEN 0
                    WHEN EXISTS (SELECT 1 FROM herald.enrollments x
                                  WHERE x.workspace_id = workspace AND x.automation_id = _simulate_run.automation
                                    AND x.contact_id = c.id AND x.status IN ('active', 'waiting')) THEN 2
                    WHEN EXISTS (SELECT 1 FROM herald.enrollments x
                                  WHERE x.workspace_id = workspace AND x.automation_id = _simulate_run.automation
                                    AND x.contact_id = c.id) THEN 1
                    ELSE 0 END) ORDER BY c.id), '[]')
      INTO v_contacts
      FROM herald.contacts c
     WHERE c.workspace_id = workspace
       AND c.id IN (SELECT e.contact_id FROM herald.events e
                     WHERE e.workspace_id = workspace AND e.kind = ANY (v_kinds) AND e.contact_id IS NOT NULL
                       AND e.occurred_at >= since AND e.occurred_at <= v_until);

    RETURN jsonb_build_object('workspace', workspace, 'automation', automation)
        || herald._simulate(definition, options, v_events, v_contacts,
                            extract(epoch FROM since)::float8, extract(epoch FROM v_until)::float8);
END
$$;

-- A dry run of a definition (not stored) over `workspace`'s events since `since` (to options.until, or now).
-- options: {"until": RFC 3339, "replies": {"<email|webhook|decide node>": {"status": "ok" | "error", "body": …}},
-- "approvals": {"<approval node>": "approve" | "reject" | "wait"}, "histogram": "day" | "hour"}.
CREATE FUNCTION herald.simulate_automation(workspace text, definition jsonb, since timestamptz,
                                           options jsonb DEFAULT '{}') RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    PERFORM herald._require_workspace(workspace);
    RETURN herald._simulate_run(workspace, NULL, definition, since, options);
END
$$;

-- A dry run of a stored automation's newest definition over its workspace's events; options as above, plus
-- "include_enrolled": true to start from the contacts already in it (once: anyone ever enrolled is
-- skipped; after_exit: anyone in progress now is skipped for the whole period).
CREATE FUNCTION herald.simulate_automation(automation bigint, since timestamptz, options jsonb DEFAULT '{}') RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.automations;
BEGIN
    -- the caller's workspace first: another tenant's automation and an unknown one look alike
    PERFORM herald._authorize(a.workspace_id, format('automation %s', automation))
       FROM herald.automations a WHERE a.id = automation;
    SELECT * INTO v FROM herald.automations a WHERE a.id = automation;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown automation %', coalesce(automation::text, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    RETURN herald._simulate_run(v.workspace_id, v.id, v.definition, since, options);
END
$$;

-- ------------------------------------------------- recovery: retry failed jobs and their journeys
-- Recovery after a mistake is fixed (a webhook refused by the allow-list, a provider without its SMTP
-- URL, a template error): failed (permanent) and dead jobs of a workspace go back to pending with their
-- attempts reset, and the enrollments that failed because of them wait on them again, at the node they
-- failed on, so the journey resumes where it broke. Choose the jobs with options:
--   {"ids": [job ids]} and/or {"automation": id}, {"error": "text the job's last error contains"},
--   {"since": "<timestamptz>"} (failed or died at or after), {"dry_run": true} (say, change nothing).
-- At least one of ids / automation / error is required (a bare call retrying everything is refused).
-- Broadcast jobs are left out (herald.resend_failed(broadcast) is their retry). An enrollment whose
-- contact has started the same automation again since (re-entry after_exit) stays failed, and its job
-- is not retried either: skipped.
-- A decide job is shared by identical questions; only the enrollment that asked first is restored.
-- Returns {"jobs", "enrollments", "skipped", "dry_run", "sample": [up to 10 job ids]}. herald_app.
CREATE FUNCTION herald.retry_failed(workspace text, options jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_ids bigint[];
    v_jobs bigint[];
    v_enrollments bigint[];
    v_restore boolean[];
    v_skipped bigint;
    v_automation bigint;
    v_error text;
    v_since timestamptz;
    v_dry boolean;
    v_bad text;
    v_result jsonb;
BEGIN
    PERFORM herald._require_workspace(workspace);
    IF jsonb_typeof(options) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'options must be a JSON object' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Example: {"automation": 7, "error": "allow-list", "dry_run": true}';
    END IF;
    SELECT string_agg(k, ', ') INTO v_bad FROM jsonb_object_keys(options) k
     WHERE k NOT IN ('ids', 'automation', 'error', 'since', 'dry_run');
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown option(s) %; allowed: ids, automation, error, since, dry_run', v_bad
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    BEGIN
        v_ids := CASE WHEN options ? 'ids' THEN ARRAY(SELECT jsonb_array_elements_text(options -> 'ids')::bigint) END;
        v_automation := (options ->> 'automation')::bigint;
        v_since := (options ->> 'since')::timestamptz;
        v_dry := coalesce((options ->> 'dry_run')::boolean, false);
    EXCEPTION WHEN others THEN
        RAISE EXCEPTION 'options: %', SQLERRM USING ERRCODE = 'invalid_parameter_value',
            HINT = 'ids is an array of job ids, automation an id, since a timestamp, dry_run true or false.';
    END;
    v_error := options ->> 'error';
    IF v_ids IS NULL AND v_automation IS NULL AND v_error IS NULL THEN
        RAISE EXCEPTION 'say which failed jobs to retry: ids, automation or error'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(v_ids) > 100000 THEN
        RAISE EXCEPTION 'at most 100000 ids per call' USING ERRCODE = 'program_limit_exceeded';
    END IF;

    -- the chosen jobs as three parallel arrays (no temporary table: a SECURITY DEFINER function must not
    -- resolve a name a caller could have created in pg_temp first). A job whose enrollment failed on it
    -- but cannot wait again (its contact is in the automation again) is skipped with it: retrying the
    -- job alone would repeat a side effect for a journey that will not go on.
    WITH chosen AS (
        SELECT o.id, o.enrollment_id, e.id IS NOT NULL AS failed_here,
               -- no newer enrollment of the same contact in the same automation is in progress
               e.id IS NOT NULL AND NOT EXISTS (
                   SELECT 1 FROM herald.enrollments n
                    WHERE n.workspace_id = e.workspace_id AND n.automation_id = e.automation_id
                      AND n.contact_id = e.contact_id AND n.status IN ('active', 'waiting')) AS restore
          FROM herald.outbox o
          LEFT JOIN herald.enrollments e
            ON e.workspace_id = o.workspace_id AND e.id = o.enrollment_id AND e.status = 'failed'
           AND e.exit_reason LIKE o.node || ' failed:%'
         WHERE o.workspace_id = retry_failed.workspace AND o.status IN ('failed', 'dead') AND o.broadcast_id IS NULL
           AND (v_ids IS NULL OR o.id = ANY (v_ids))
           AND (v_automation IS NULL OR o.automation_id = v_automation)
           AND (v_error IS NULL OR strpos(lower(o.last_error), lower(v_error)) > 0)   -- case does not matter
           AND (v_since IS NULL OR o.done_at >= v_since OR o.updated_at >= v_since)
         ORDER BY o.id
         LIMIT 100000
    )
    SELECT coalesce(array_agg(c.id ORDER BY c.id) FILTER (WHERE NOT c.failed_here OR c.restore), '{}'),
           coalesce(array_agg(c.enrollment_id ORDER BY c.id) FILTER (WHERE NOT c.failed_here OR c.restore), '{}'),
           coalesce(array_agg(c.restore ORDER BY c.id) FILTER (WHERE NOT c.failed_here OR c.restore), '{}'),
           count(*) FILTER (WHERE c.failed_here AND NOT c.restore)
      INTO v_jobs, v_enrollments, v_restore, v_skipped
      FROM chosen c;

    v_result := jsonb_build_object(
        'jobs', cardinality(v_jobs),
        'enrollments', (SELECT count(*) FROM unnest(v_restore) r WHERE r),
        'skipped', v_skipped,
        'dry_run', v_dry,
        'sample', to_jsonb(v_jobs[1:10]));
    IF v_dry THEN
        RETURN v_result;
    END IF;

    UPDATE herald.enrollments e
       SET status = 'waiting', wait_kind = 'job', wait_job = o.dedupe_key, next_run_at = 'infinity',
           ended_at = NULL, exit_reason = NULL, updated_at = now()
      FROM unnest(v_jobs, v_enrollments, v_restore) r(id, enrollment_id, restore)
      JOIN herald.outbox o ON o.id = r.id
     WHERE r.restore AND e.workspace_id = o.workspace_id AND e.id = r.enrollment_id AND e.status = 'failed';
    UPDATE herald.outbox o
       SET status = 'pending', attempt = 0, run_at = now(), done_at = NULL, updated_at = now()
     WHERE o.id = ANY (v_jobs) AND o.workspace_id = retry_failed.workspace AND o.status IN ('failed', 'dead');
    RETURN v_result;
END
$$;


-- sql/security.sql, as a fresh install runs it last
-- Roles are cluster-wide: created once, shared by every database of the cluster, kept when the
-- extension is dropped (other databases may use them).
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['herald_admin', 'herald_worker', 'herald_app'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$$;

-- The role a call acts as: the session's current role. SET ROLE counts (connection poolers and
-- PostgREST-style gateways log in as one role and SET ROLE per request); inside these SECURITY DEFINER
-- functions current_user is the owner, so it cannot tell.
CREATE FUNCTION herald._caller() RETURNS name
LANGUAGE sql STABLE
SET search_path = pg_catalog, herald, pg_temp
RETURN CASE WHEN current_setting('role') = 'none' THEN session_user ELSE current_setting('role')::name END;

-- True when the caller serves every workspace: a superuser, or a member of herald_admin or herald_worker
-- (pg_has_role is true for superusers too).
CREATE FUNCTION herald._serves_all_workspaces() RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, herald, pg_temp
RETURN pg_has_role(herald._caller(), 'herald_admin', 'USAGE')
    OR pg_has_role(herald._caller(), 'herald_worker', 'USAGE');

-- The workspaces the caller may act for: every one, or those granted to a role whose privileges it has.
-- Row-level security policies read it once per query (IN (SELECT …) is planned as one hashed subplan).
CREATE FUNCTION herald._my_workspaces() RETURNS SETOF text
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, herald, pg_temp
AS $$
    SELECT w.id FROM herald.workspaces w WHERE herald._serves_all_workspaces()
    UNION
    SELECT g.workspace_id
      FROM herald.workspace_grants g
      JOIN pg_roles r ON r.rolname = g.role_name        -- a dropped role's grants are inert
     WHERE pg_has_role(herald._caller(), r.oid, 'USAGE');
$$;

-- Raises unless the caller may act for `workspace`. `subject` names what was asked for when the caller
-- gave an id ('automation 5'), so the refusal does not reveal another tenant's workspace name.
CREATE FUNCTION herald._authorize(workspace text, subject text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF herald._serves_all_workspaces() THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1
                 FROM herald.workspace_grants g
                 JOIN pg_roles r ON r.rolname = g.role_name
                WHERE g.workspace_id = workspace AND pg_has_role(herald._caller(), r.oid, 'USAGE')) THEN
        RETURN;
    END IF;
    IF subject IS NULL THEN
        RAISE EXCEPTION 'permission denied: role "%" may not act for workspace "%"', herald._caller(), workspace
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'A herald_admin grants it with herald.grant_workspace(role, workspace).';
    END IF;
    RAISE EXCEPTION 'permission denied: role "%" may not act for the workspace of %', herald._caller(), subject
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'A herald_admin grants it with herald.grant_workspace(role, workspace).';
END
$$;

-- Lets `role` (and every role that has its privileges) act for `workspace` as herald_app. Idempotent;
-- returns true when the grant is new. herald_admin only.
CREATE FUNCTION herald.grant_workspace(role name, workspace text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_new boolean;
BEGIN
    IF role IS NULL OR NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = role) THEN
        RAISE EXCEPTION 'unknown role %', coalesce(quote_ident(role), 'NULL')
            USING ERRCODE = 'undefined_object', HINT = 'Create the role first (CREATE ROLE … IN ROLE herald_app).';
    END IF;
    PERFORM herald._require_workspace(workspace);
    INSERT INTO herald.workspace_grants (workspace_id, role_name, granted_by)
    VALUES (workspace, role, herald._caller())
    ON CONFLICT (workspace_id, role_name) DO NOTHING;
    GET DIAGNOSTICS v_new = ROW_COUNT;
    IF NOT pg_has_role(role, 'herald_app', 'USAGE') THEN
        RAISE WARNING 'role % is not a member of herald_app: it may act for workspace "%" but cannot call herald''s functions yet',
            quote_ident(role), workspace
            USING HINT = format('GRANT herald_app TO %s;', quote_ident(role));
    END IF;
    RETURN v_new;
END
$$;

-- Withdraws a grant; returns true when there was one. herald_admin only.
CREATE FUNCTION herald.revoke_workspace(role name, workspace text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_n int;
BEGIN
    DELETE FROM herald.workspace_grants g WHERE g.workspace_id = workspace AND g.role_name = role;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n > 0;
END
$$;

-- ------------------------------------------------------------------------------------------ functions

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA herald FROM PUBLIC;
GRANT USAGE ON SCHEMA herald TO herald_admin, herald_worker, herald_app;

-- every API function runs as the owner (see the top of this file)
ALTER FUNCTION herald.create_workspace(text, text) SECURITY DEFINER;
ALTER FUNCTION herald.upsert_contact(text, text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.upsert_contacts(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.track(text, text, text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.track_many(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.create_automation(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.set_automation_status(bigint, text) SECURITY DEFINER;
ALTER FUNCTION herald.enroll(bigint, bigint[]) SECURITY DEFINER;
ALTER FUNCTION herald.enroll_segment(bigint, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.exit_enrollment(bigint, text) SECURITY DEFINER;
ALTER FUNCTION herald.decide_approval(bigint, boolean, text) SECURITY DEFINER;
ALTER FUNCTION herald.tick(int) SECURITY DEFINER;
ALTER FUNCTION herald.prune(interval) SECURITY DEFINER;
ALTER FUNCTION herald.upsert_template(text, text, text, text, text) SECURITY DEFINER;
ALTER FUNCTION herald.upsert_provider(text, text, text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.set_rate_limit(text, int) SECURITY DEFINER;
ALTER FUNCTION herald.send(text, text, text, jsonb, text, text) SECURITY DEFINER;
ALTER FUNCTION herald.claim(text, int, interval) SECURITY DEFINER;
ALTER FUNCTION herald.complete(jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.reap() SECURITY DEFINER;
ALTER FUNCTION herald.redrive(bigint[]) SECURITY DEFINER;
ALTER FUNCTION herald.flush_stats() SECURITY DEFINER;
ALTER FUNCTION herald.automation_stats(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.automation_stats_daily(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.suppress(text, text, text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.unsuppress(text, text) SECURITY DEFINER;
ALTER FUNCTION herald.create_broadcast(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.schedule_broadcast(bigint, timestamptz) SECURITY DEFINER;
ALTER FUNCTION herald.pause_broadcast(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.resume_broadcast(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.cancel_broadcast(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.resend_failed(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.advance_broadcasts(int) SECURITY DEFINER;
ALTER FUNCTION herald.broadcast_stats(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.record_feedback(jsonb, text) SECURITY DEFINER;
ALTER FUNCTION herald.grant_workspace(name, text) SECURITY DEFINER;
ALTER FUNCTION herald.revoke_workspace(name, text) SECURITY DEFINER;
ALTER FUNCTION herald.create_list(text, text, text) SECURITY DEFINER;
ALTER FUNCTION herald.subscribe(text, text, text[]) SECURITY DEFINER;
ALTER FUNCTION herald.unsubscribe(text, text, text[]) SECURITY DEFINER;
ALTER FUNCTION herald.delete_contact(text, text) SECURITY DEFINER;
ALTER FUNCTION herald.retry_failed(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.update_automation(bigint, jsonb, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.preview_automation_update(bigint, jsonb, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.automation_version_stats(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.preview_broadcast(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.preview_broadcast(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.simulate_automation(text, jsonb, timestamptz, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.simulate_automation(bigint, timestamptz, jsonb) SECURITY DEFINER;
-- the dispatcher writes contacts and enrollments for whoever inserted the events (an application's
-- INSERT INTO herald.events passed row-level security's check of its workspace first)
ALTER FUNCTION herald._dispatch() SECURITY DEFINER;

-- herald_app (and herald_admin): acting for a granted workspace; each checks it with _authorize
GRANT EXECUTE ON FUNCTION
    herald.upsert_contact(text, text, jsonb), herald.upsert_contacts(text, jsonb),
    herald.track(text, text, text, jsonb), herald.track_many(text, jsonb),
    herald.enroll(bigint, bigint[]), herald.enroll_segment(bigint, jsonb),
    herald.exit_enrollment(bigint, text), herald.decide_approval(bigint, boolean, text),
    herald.send(text, text, text, jsonb, text, text),
    herald.suppress(text, text, text, jsonb), herald.unsuppress(text, text),
    herald.redrive(bigint[]),
    herald.create_list(text, text, text), herald.subscribe(text, text, text[]), herald.unsubscribe(text, text, text[]),
    herald.delete_contact(text, text), herald.retry_failed(text, jsonb),
    herald.automation_stats(bigint), herald.automation_stats_daily(bigint), herald.broadcast_stats(bigint),
    herald._my_workspaces()     -- read by the row-level security policies, as the querying role
TO herald_app, herald_admin;
-- read-only: an application's segment editor previews its audience; per-version counts of its journeys
GRANT EXECUTE ON FUNCTION
    herald.preview_broadcast(text, jsonb), herald.preview_broadcast(bigint), herald.automation_version_stats(bigint)
TO herald_app, herald_admin;
-- read-only too: a dry run of a journey over the workspace's own recorded events (writes and sends nothing)
GRANT EXECUTE ON FUNCTION
    herald.simulate_automation(text, jsonb, timestamptz, jsonb), herald.simulate_automation(bigint, timestamptz, jsonb)
TO herald_app, herald_admin;

-- herald_admin: managing workspaces and what runs in them
GRANT EXECUTE ON FUNCTION
    herald.create_workspace(text, text), herald.grant_workspace(name, text), herald.revoke_workspace(name, text),
    herald.create_automation(text, jsonb), herald.set_automation_status(bigint, text),
    herald.upsert_template(text, text, text, text, text), herald.upsert_provider(text, text, text, jsonb),
    herald.set_rate_limit(text, int),
    herald.create_broadcast(text, jsonb), herald.schedule_broadcast(bigint, timestamptz),
    herald.pause_broadcast(bigint), herald.resume_broadcast(bigint), herald.cancel_broadcast(bigint),
    herald.resend_failed(bigint)
TO herald_admin;
-- changing a journey, and previewing a change: the admin's, like create_automation
GRANT EXECUTE ON FUNCTION
    herald.update_automation(bigint, jsonb, jsonb), herald.preview_automation_update(bigint, jsonb, jsonb)
TO herald_admin;

-- herald_worker (and herald_admin): the daemon
GRANT EXECUTE ON FUNCTION
    herald.claim(text, int, interval), herald.complete(jsonb), herald.reap(), herald.tick(int),
    herald.flush_stats(), herald.advance_broadcasts(int), herald.record_feedback(jsonb, text), herald.prune(interval),
    herald._my_workspaces()
TO herald_worker, herald_admin;

-- ------------------------------------------------------------------------------- tables and views

-- Reads: views run as the reader (security_invoker), so the tables' row-level security applies to them.
ALTER VIEW herald.automation_overview SET (security_invoker = true);
ALTER VIEW herald.broadcast_overview SET (security_invoker = true);
ALTER VIEW herald.step_history SET (security_invoker = true);
ALTER VIEW herald.pending_approvals SET (security_invoker = true);
ALTER VIEW herald.dead_letters SET (security_invoker = true);
ALTER VIEW herald.queue_status SET (security_invoker = true);
ALTER VIEW herald.list_overview SET (security_invoker = true);
ALTER VIEW herald.automation_history SET (security_invoker = true);

GRANT SELECT ON
    herald.workspaces, herald.contacts, herald.contact_rejections, herald.events, herald.automations,
    herald.enrollments, herald.templates, herald.providers, herald.outbox, herald.message_history,
    herald.step_log, herald.stats_delta, herald.stats, herald.decide_cache, herald.list_members,
    herald.suppressions, herald.broadcasts, herald.broadcast_stats_delta, herald.broadcast_stats,
    herald.automation_overview, herald.broadcast_overview, herald.step_history, herald.pending_approvals,
    herald.dead_letters, herald.queue_status, herald.lists, herald.erasures, herald.list_overview
TO herald_app, herald_admin;
GRANT SELECT ON herald.workspace_grants, herald.rate_limits TO herald_admin;
GRANT SELECT ON herald.automation_versions, herald.automation_history TO herald_app, herald_admin;
-- /metrics reads the queue depth
GRANT SELECT ON herald.outbox, herald.queue_status TO herald_worker;
-- events may also be written with plain INSERT (the dispatcher takes them from there)
GRANT INSERT ON herald.events TO herald_app, herald_admin;
GRANT USAGE ON SEQUENCE herald.events_id_seq TO herald_app, herald_admin;

-- Row-level security: a role that is not the owner (nor a superuser) sees and writes only the rows of
-- the workspaces it may act for. The owner (every SECURITY DEFINER function above) is not subject to it.
ALTER TABLE herald.workspaces ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.workspaces USING (id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.workspace_grants ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.workspace_grants USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.contacts ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.contacts USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.contact_rejections ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.contact_rejections USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.events ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.events USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.automations ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.automations USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.enrollments ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.enrollments USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.templates ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.templates USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.providers ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.providers USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.outbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.outbox USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.message_history ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.message_history USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.step_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.step_log USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.stats_delta ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.stats_delta USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.stats ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.stats USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.decide_cache ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.decide_cache USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.list_members ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.list_members USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.suppressions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.suppressions USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.broadcasts ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.broadcasts USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.broadcast_stats_delta ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.broadcast_stats_delta USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.broadcast_stats ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.broadcast_stats USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.automation_versions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.automation_versions USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.lists ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.lists USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.erasures ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.erasures USING (workspace_id IN (SELECT herald._my_workspaces()));
-- shared across workspaces: only the owner and herald_admin's reads (no policy: nobody else sees a row)
ALTER TABLE herald.rate_limits ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin ON herald.rate_limits TO herald_admin USING (true);
ALTER TABLE herald.rate_grants ENABLE ROW LEVEL SECURITY;

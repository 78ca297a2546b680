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
-- Existing tables keep every row; one table is added (workspace_grants).
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
               (SELECT a.definition -> 'nodes' -> x.current_node ->> 'next' FROM herald.automations a
                 WHERE a.workspace_id = x.workspace_id AND a.id = x.automation_id) AS next_node
          FROM ev
         CROSS JOIN LATERAL (SELECT e.workspace_id, e.id, e.contact_id, e.automation_id, e.current_node,
                                    e.wait_filter, e.context
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
    herald.automation_stats(bigint), herald.automation_stats_daily(bigint), herald.broadcast_stats(bigint),
    herald._my_workspaces()     -- read by the row-level security policies, as the querying role
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

GRANT SELECT ON
    herald.workspaces, herald.contacts, herald.contact_rejections, herald.events, herald.automations,
    herald.enrollments, herald.templates, herald.providers, herald.outbox, herald.message_history,
    herald.step_log, herald.stats_delta, herald.stats, herald.decide_cache, herald.list_members,
    herald.suppressions, herald.broadcasts, herald.broadcast_stats_delta, herald.broadcast_stats,
    herald.automation_overview, herald.broadcast_overview, herald.step_history, herald.pending_approvals,
    herald.dead_letters, herald.queue_status
TO herald_app, herald_admin;
GRANT SELECT ON herald.workspace_grants, herald.rate_limits TO herald_admin;
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
-- shared across workspaces: only the owner and herald_admin's reads (no policy: nobody else sees a row)
ALTER TABLE herald.rate_limits ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin ON herald.rate_limits TO herald_admin USING (true);
ALTER TABLE herald.rate_grants ENABLE ROW LEVEL SECURITY;

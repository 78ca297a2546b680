-- herald 0.2.0 -> 0.3.0
--   * one home for each rule that was written more than once (issue 12): a contact made from an
--     address alone, with its contact.created event (herald._create_contacts, used by the dispatcher,
--     track/track_many and send); where a job returning to the queue goes by its broadcast's status
--     (herald._queue_status: complete, reap, claim, settling a paused or cancelled broadcast); the rate
--     keys of an email (herald._email_rate_keys, herald._broadcast_rate_key: tick, send, claim's
--     herald._job_rate_keys, which is now inlined: it called the STABLE text || bigint); the broadcast
--     chunk size (herald._chunk_size). Same behaviour, same messages.
--   * the results stream (issue 16 §2, sql/results.sql): herald.results (+ results_staged, where the
--     statements that make a result true append it, and result_subscriptions); written by complete,
--     tick, claim, record_feedback, decide_approval, exit_enrollment, set_automation_status (archive),
--     update_automation, advance_broadcasts; read with herald.read_results; outgoing webhook
--     subscriptions (subscribe_results, unsubscribe_results, result_subscription_overview) delivered
--     by herald.advance_results, which also publishes staged results; prune takes results_older_than
--     (default 7 days); delete_contact erases a contact's results too. The stream starts empty: no
--     result is made up for what happened before the upgrade.
-- Existing tables keep every row; tables added: results_staged, results, result_subscriptions.
\echo Use "ALTER EXTENSION herald UPDATE TO '0.3.0'" to load this file. \quit

-- ------------------------------------------------------------------ one rule, one place (issue 12)

-- new helpers (internal: granted to no role; see the REVOKE at the end)
CREATE FUNCTION herald._create_contacts(workspaces text[], emails text[])
RETURNS TABLE (workspace_id text, id bigint, email text)
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH created AS (
        INSERT INTO herald.contacts AS c (workspace_id, email)
        SELECT DISTINCT u.w, u.e FROM unnest(workspaces, emails) u(w, e) ORDER BY 1, 2
        ON CONFLICT (workspace_id, email) DO NOTHING
        RETURNING c.workspace_id, c.id, c.email
    ), announced AS (
        INSERT INTO herald.events (workspace_id, contact_id, email, kind, payload)
        SELECT c.workspace_id, c.id, c.email, 'contact.created', '{}' FROM created c ORDER BY c.id
    )
    SELECT c.workspace_id, c.id, c.email FROM created c;
END
$$;
CREATE FUNCTION herald._email_rate_keys(workspace text, provider text) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY[herald._provider_rate_key(workspace, provider), 'provider:' || provider];
CREATE FUNCTION herald._broadcast_rate_key(broadcast bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'broadcast:' || broadcast::text;
CREATE FUNCTION herald._queue_status(broadcast_status text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE broadcast_status WHEN 'paused' THEN 'held' WHEN 'cancelled' THEN 'cancelled' ELSE 'pending' END;
CREATE FUNCTION herald._chunk_size() RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 10000;

-- claim's rate keys from the helpers (and inlined now: bigint::text instead of the STABLE text || bigint)
CREATE OR REPLACE FUNCTION herald._job_rate_keys(rate_keys text[], workspace text, provider text, broadcast bigint) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN broadcast IS NULL THEN rate_keys
            ELSE herald._email_rate_keys(workspace, provider) || herald._broadcast_rate_key(broadcast) END;
-- contacts made on the fly through herald._create_contacts
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
CREATE OR REPLACE FUNCTION herald._ingest(workspace text, events jsonb, caller text) RETURNS SETOF bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
AS $$
DECLARE
    v_ws text := workspace;
    v_bad record;
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

    PERFORM herald._create_contacts(m.workspaces, m.emails)
       FROM (SELECT array_agg(v_ws) AS workspaces, array_agg(herald._normalize_email(e ->> 'email')) AS emails
               FROM jsonb_array_elements(events) e) m;

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
-- a stopped job's status from herald._queue_status
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
           SET status = herald._queue_status(x.broadcast_status),
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
    ), locked AS (
        SELECT o.*, i.ok, i.retryable, i.error, i.message_id AS new_message_id, i.response AS new_response,
               CASE WHEN i.ok THEN 'done'
                    -- a retry of a broadcast paused or cancelled meanwhile is held or cancelled, not queued
                    WHEN i.retryable AND o.attempt < o.max_attempts THEN
                         herald._queue_status((SELECT b.status FROM herald.broadcasts b
                                                WHERE b.workspace_id = o.workspace_id AND b.id = o.broadcast_id))
                    WHEN i.retryable THEN 'dead'
                    ELSE 'failed' END AS outcome
          FROM input i JOIN herald.outbox o ON o.id = i.id
         WHERE o.status = 'leased'
           FOR UPDATE OF o
    ), job AS (
        -- where a finished job sends the enrollments waiting on it (a decide reply picks its path)
        SELECT j.*,
               CASE WHEN j.outcome = 'done' AND j.kind = 'decide'
                        THEN coalesce(j.payload -> 'paths' ->> (j.new_response ->> (j.payload ->> 'field')), j.payload ->> 'default')
                    WHEN j.outcome = 'done' THEN j.on_success
                    ELSE j.on_error END AS next_node
          FROM locked j
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
        SELECT j.workspace_id, j.dedupe_key, j.node, j.outcome, j.error, j.kind, j.new_response, j.next_node
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
-- the broadcast's status read once per job (a join instead of two sub-selects)
CREATE OR REPLACE FUNCTION herald.reap() RETURNS int
LANGUAGE sql
SET search_path = pg_catalog, herald, pg_temp
BEGIN ATOMIC
    WITH expired AS (
        -- a broadcast paused (or cancelled) meanwhile keeps its job out of claim's reach
        SELECT o.id, CASE WHEN o.attempt >= o.max_attempts THEN 'dead' ELSE herald._queue_status(b.status) END AS status
          FROM herald.outbox o
          LEFT JOIN herald.broadcasts b ON b.workspace_id = o.workspace_id AND b.id = o.broadcast_id
         WHERE o.status = 'leased' AND o.lease_until < now()
    ), reaped AS (
        UPDATE herald.outbox o
           SET status = x.status,
               last_error = coalesce(o.last_error || '; ', '') || 'lease of ' || coalesce(o.leased_by, '?') || ' expired',
               leased_by = NULL, lease_until = NULL, updated_at = now(),
               done_at = CASE WHEN x.status IN ('dead', 'cancelled') THEN now() END
          FROM expired x
         -- re-checked on the locked row: a job completed or reaped meanwhile is left alone
         WHERE o.id = x.id AND o.status = 'leased' AND o.lease_until < now()
        RETURNING o.workspace_id, o.status, o.automation_id, o.node, o.broadcast_id, o.variation
    ), counted AS (
        -- a job that ends here is counted like one complete() ends
        INSERT INTO herald.stats_delta (workspace_id, automation_id, node, metric, n)
        SELECT r.workspace_id, r.automation_id, r.node, 'dead', count(*)
          FROM reaped r WHERE r.status = 'dead' AND r.automation_id IS NOT NULL GROUP BY 1, 2, 3
    ), counted_b AS (
        INSERT INTO herald.broadcast_stats_delta (workspace_id, broadcast_id, variation, metric, n)
        SELECT r.workspace_id, r.broadcast_id, coalesce(r.variation, 'default'), r.status, count(*)
          FROM reaped r WHERE r.status IN ('dead', 'cancelled') AND r.broadcast_id IS NOT NULL GROUP BY 1, 2, 3, 4
    )
    SELECT count(*)::int FROM reaped;
END;
CREATE OR REPLACE FUNCTION herald._settle_chunk(v herald.broadcasts, lim int) RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_read int;
BEGIN
    WITH scanned AS MATERIALIZED (
        SELECT o.id, o.contact_id FROM herald.outbox o
         WHERE o.broadcast_id = v.id AND o.contact_id > v.settle_cursor
         ORDER BY o.contact_id
         LIMIT lim
    ), moved AS (
        UPDATE herald.outbox o
           SET status = herald._queue_status(v.status),
               last_error = CASE WHEN v.status = 'cancelled' THEN 'broadcast cancelled' ELSE o.last_error END,
               done_at = CASE WHEN v.status = 'cancelled' THEN now() END, updated_at = now()
          FROM scanned s
         WHERE o.id = s.id AND (o.status = 'pending' OR (v.status = 'cancelled' AND o.status = 'held'))
        RETURNING o.variation
    ), counted AS (
        INSERT INTO herald.broadcast_stats_delta (workspace_id, broadcast_id, variation, metric, n)
        SELECT v.workspace_id, v.id, m.variation, 'cancelled', count(*) FROM moved m
         WHERE v.status = 'cancelled' GROUP BY m.variation
    ), stepped AS (
        UPDATE herald.broadcasts b
           SET settle_cursor = CASE WHEN (SELECT count(*) FROM scanned) < lim THEN NULL
                                    ELSE (SELECT max(s.contact_id) FROM scanned s) END
         WHERE b.workspace_id = v.workspace_id AND b.id = v.id
    )
    SELECT count(*) INTO v_read FROM scanned;
    RETURN v_read;
END
$$;
-- an email job's rate keys from herald._email_rate_keys
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
        SELECT st.workspace_id, st.job_kind, 1, st.job_key, st.job ->> 'provider',
               CASE WHEN st.job_kind = 'email'
                    THEN herald._email_rate_keys(st.workspace_id, st.job ->> 'provider')
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
    -- the results stream moves on with every tick (sql/results.sql), so any daemon that ticks keeps it
    -- published and its subscriptions served; one caller at a time does it, the others skip at once
    PERFORM herald.advance_results(100000);
    RETURN v_steps;
END
$$;
-- the broadcast's rate key and the chunk size from their helpers
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
        INSERT INTO herald.rate_limits (key, per_second) VALUES (herald._broadcast_rate_key(v_id), (v_def ->> 'rate_per_second')::int);
    END IF;
    RETURN v_id;
END
$$;
CREATE OR REPLACE FUNCTION herald.pause_broadcast(broadcast bigint) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.broadcasts := herald._lock_broadcast(broadcast);
BEGIN
    IF v.status NOT IN ('scheduled', 'sending') THEN
        RAISE EXCEPTION 'broadcast % is %, only a scheduled or sending broadcast can be paused', v.id, v.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE herald.broadcasts b SET status = 'paused', paused_from = v.status, settle_cursor = 0, updated_at = now()
     WHERE b.workspace_id = v.workspace_id AND b.id = v.id
    RETURNING b.* INTO v;
    PERFORM herald._settle_chunk(v, herald._chunk_size());   -- the first chunk now (all of a broadcast this small)
    PERFORM pg_notify('herald.tick', '');
END
$$;
CREATE OR REPLACE FUNCTION herald.resume_broadcast(broadcast bigint) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.broadcasts := herald._lock_broadcast(broadcast);
BEGIN
    IF v.status <> 'paused' THEN
        RAISE EXCEPTION 'broadcast % is %, only a paused broadcast can be resumed', v.id, v.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- jobs not yet held are claimable again at once, and the first 10,000 held ones; the others go back
    -- with the next advances
    UPDATE herald.broadcasts b SET status = v.paused_from, paused_from = NULL, settle_cursor = NULL, updated_at = now()
     WHERE b.workspace_id = v.workspace_id AND b.id = v.id;
    PERFORM herald._release_held(v.id, herald._chunk_size());
    PERFORM pg_notify('herald.outbox', '');
    PERFORM pg_notify('herald.tick', '');
END
$$;
CREATE OR REPLACE FUNCTION herald.cancel_broadcast(broadcast bigint) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.broadcasts := herald._lock_broadcast(broadcast);
BEGIN
    IF v.status IN ('sent', 'cancelled') THEN
        RAISE EXCEPTION 'broadcast % is already %', v.id, v.status USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE herald.broadcasts b
       SET status = 'cancelled', paused_from = NULL, settle_cursor = 0, finished_at = now(), updated_at = now()
     WHERE b.workspace_id = v.workspace_id AND b.id = v.id
    RETURNING b.* INTO v;
    PERFORM herald._settle_chunk(v, herald._chunk_size());   -- the first chunk now (all of a broadcast this small)
    PERFORM pg_notify('herald.tick', '');
END
$$;
CREATE OR REPLACE FUNCTION herald._advance_broadcast(v herald.broadcasts, budget int, recheck boolean) RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_left int := budget;
    v_read int;
    v_chunk constant int := herald._chunk_size();
    v_win record;
BEGIN
    -- an earlier failure is history once this call gets through (a failure now rolls this back too)
    IF v.last_error IS NOT NULL THEN
        UPDATE herald.broadcasts b SET last_error = NULL WHERE b.workspace_id = v.workspace_id AND b.id = v.id;
    END IF;
    -- a paused or cancelled broadcast: settle its jobs, chunk by chunk, and nothing else
    WHILE v.settle_cursor IS NOT NULL AND v_left > 0 LOOP
        v_left := v_left - herald._settle_chunk(v, least(v_chunk, v_left));
        SELECT b.* INTO v FROM herald.broadcasts b WHERE b.workspace_id = v.workspace_id AND b.id = v.id;
    END LOOP;
    IF v.status NOT IN ('scheduled', 'sending') THEN
        RETURN budget - v_left;
    END IF;
    IF v.status = 'scheduled' THEN
        WITH started AS (
            UPDATE herald.broadcasts b SET status = 'sending', updated_at = now()
             WHERE b.workspace_id = v.workspace_id AND b.id = v.id
            RETURNING b.workspace_id, b.id, b.name, b.send_at
        )
        INSERT INTO herald.results_staged (workspace_id, kind, broadcast_id, data)   -- the results stream
        SELECT s.workspace_id, 'broadcast.started', s.id, jsonb_build_object('name', s.name, 'send_at', s.send_at)
          FROM started s;
        v.status := 'sending';
    ELSIF v_left > 0 THEN
        -- held jobs of a resumed broadcast are claimable again, a chunk per call (also one that came back
        -- held while the resume committed: its complete read the status just before)
        v_left := v_left - herald._release_held(v.id, least(v_chunk, v_left));
    END IF;
    -- enqueue while there is budget and the phase has contacts left
    WHILE v_left > 0 AND v.phase IN ('all', 'test', 'rest') LOOP
        v_read := herald._enqueue_chunk(v, least(v_chunk, v_left), recheck);
        v_left := v_left - v_read;
        SELECT b.* INTO v FROM herald.broadcasts b WHERE b.workspace_id = v.workspace_id AND b.id = v.id;
        IF v_read < least(v_chunk, v_left + v_read) THEN
            -- the phase's audience is exhausted
            v.phase := CASE v.phase WHEN 'test' THEN 'waiting' ELSE 'done' END;
            UPDATE herald.broadcasts b
               SET phase = v.phase, cursor = 0,
                   test_ends_at = CASE WHEN v.phase = 'waiting'
                                       THEN now() + make_interval(secs => (v.definition -> 'ab_test' ->> 'wait_seconds')::float8) END,
                   updated_at = now()
             WHERE b.workspace_id = v.workspace_id AND b.id = v.id
            RETURNING b.* INTO v;
        END IF;
    END LOOP;
    IF v.phase = 'waiting' AND v.test_ends_at <= now() THEN
        v_win := herald._ab_winner(v);
        WITH decided AS (
            UPDATE herald.broadcasts b SET phase = 'rest', cursor = 0, winner = v_win.winner,
                   winner_reason = v_win.reason, updated_at = now()
             WHERE b.workspace_id = v.workspace_id AND b.id = v.id
            RETURNING b.workspace_id, b.id, b.name, b.winner, b.winner_reason
        )
        INSERT INTO herald.results_staged (workspace_id, kind, broadcast_id, data)   -- the results stream
        SELECT d.workspace_id, 'broadcast.winner', d.id,
               jsonb_build_object('name', d.name, 'winner', d.winner, 'reason', d.winner_reason)
          FROM decided d;
        PERFORM pg_notify('herald.tick', '');   -- the rest goes out on the next advance
    ELSIF v.phase = 'done'
          -- the counters first (every job that ends is counted in the statement that ends it): while
          -- fewer have ended than were enqueued, nothing is read; then the rows themselves decide
          AND (SELECT coalesce(sum(x.n), 0) FROM (
                   SELECT s.value AS n FROM herald.broadcast_stats s
                    WHERE s.workspace_id = v.workspace_id AND s.broadcast_id = v.id
                      AND s.metric IN ('sent', 'failed', 'dead', 'cancelled', 'suppressed')
                   UNION ALL
                   SELECT d.n FROM herald.broadcast_stats_delta d
                    WHERE d.workspace_id = v.workspace_id AND d.broadcast_id = v.id
                      AND d.metric IN ('sent', 'failed', 'dead', 'cancelled', 'suppressed')) x) >= v.enqueued
          AND NOT EXISTS (SELECT 1 FROM herald.outbox o WHERE o.broadcast_id = v.id AND o.status = 'held')
          AND NOT EXISTS (SELECT 1 FROM herald.outbox o WHERE o.status = 'leased' AND o.broadcast_id = v.id)
          AND NOT EXISTS (SELECT 1 FROM herald.outbox o WHERE o.broadcast_id = v.id AND o.status = 'pending') THEN
        WITH sent AS (
            UPDATE herald.broadcasts b SET status = 'sent', finished_at = now(), updated_at = now()
             WHERE b.workspace_id = v.workspace_id AND b.id = v.id
            RETURNING b.workspace_id, b.id, b.name, b.enqueued
        )
        INSERT INTO herald.results_staged (workspace_id, kind, broadcast_id, data)   -- the results stream
        SELECT x.workspace_id, 'broadcast.sent', x.id, jsonb_build_object('name', x.name, 'enqueued', x.enqueued)
          FROM sent x;
    END IF;
    RETURN budget - v_left;
END
$$;

-- ------------------------------------------------------------------------- the results stream (issue 16)

CREATE TABLE herald.results_staged (
    workspace_id  text NOT NULL,
    id            bigint GENERATED ALWAYS AS IDENTITY,   -- staging order (not the cursor)
    kind          text NOT NULL,
    at            timestamptz NOT NULL DEFAULT now(),    -- when it happened
    contact_id    bigint,
    automation_id bigint,
    enrollment_id bigint,
    broadcast_id  bigint,
    job_id        bigint,
    data          jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE herald.results (
    workspace_id  text NOT NULL,
    id            bigint GENERATED ALWAYS AS IDENTITY,   -- the cursor: increasing in the order results became visible
    kind          text NOT NULL,
    at            timestamptz NOT NULL,                  -- when it happened
    contact_id    bigint,
    automation_id bigint,
    enrollment_id bigint,
    broadcast_id  bigint,
    job_id        bigint,
    data          jsonb NOT NULL DEFAULT '{}',
    published_at  timestamptz NOT NULL DEFAULT now(),    -- when advance_results numbered it (pruning)
    PRIMARY KEY (workspace_id, id)
);
CREATE INDEX results_kind_idx ON herald.results (workspace_id, kind, id);
CREATE INDEX results_published_idx ON herald.results USING brin (published_at);
CREATE TABLE herald.result_subscriptions (
    workspace_id  text NOT NULL,
    id            bigint GENERATED ALWAYS AS IDENTITY,
    url           text NOT NULL,
    kinds         text[],               -- NULL: every kind
    options       jsonb NOT NULL,
    cursor        bigint NOT NULL,      -- the last result id queued for delivery
    job_id        bigint,               -- the outbox job of the last batch queued
    queued        bigint NOT NULL DEFAULT 0,   -- results queued for it in all
    created_by    name,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, id)
);
CREATE INDEX result_subscriptions_id_idx ON herald.result_subscriptions (id);
-- in every backup (one statement each)
SELECT pg_catalog.pg_extension_config_dump('herald.results_staged', '');
SELECT pg_catalog.pg_extension_config_dump('herald.results', '');
SELECT pg_catalog.pg_extension_config_dump('herald.result_subscriptions', '');
SELECT pg_catalog.pg_extension_config_dump('herald.results_staged_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('herald.results_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('herald.result_subscriptions_id_seq', '');

-- a subscription's URL and options (extension/src/subscription.rs), as generated by pgrx
CREATE  FUNCTION "_check_subscription"(
	"url" TEXT, /* Option < & str > */
	"options" jsonb /* Option < JsonB > */
) RETURNS jsonb /* JsonB */
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_check_subscription_wrapper';

-- sql/results.sql
CREATE FUNCTION herald._result_kinds() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY['email.sent', 'email.failed', 'email.bounced', 'email.opened', 'email.clicked',
             'webhook.answered', 'decide.answered',
             'enrollment.completed', 'enrollment.exited', 'enrollment.failed',
             'approval.requested', 'approval.decided',
             'broadcast.started', 'broadcast.winner', 'broadcast.sent', 'broadcast.auto_paused'];
CREATE FUNCTION herald._ended_data(node text, reason text, context jsonb) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE   -- STABLE like jsonb_build_object(); a stricter label would block inlining
RETURN jsonb_build_object('node', node, 'reason', reason, 'context', context);
CREATE FUNCTION herald._result_json(r herald.results) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
RETURN jsonb_build_object('id', r.id, 'kind', r.kind, 'at', r.at)
       || jsonb_strip_nulls(jsonb_build_object('contact_id', r.contact_id, 'automation_id', r.automation_id,
                                               'enrollment_id', r.enrollment_id, 'broadcast_id', r.broadcast_id,
                                               'job_id', r.job_id))
       || jsonb_build_object('data', r.data);
CREATE FUNCTION herald._check_result_kinds(kinds text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_bad text;
BEGIN
    IF cardinality(kinds) = 0 THEN
        RAISE EXCEPTION 'kinds must name at least one kind of result, or be NULL for every kind'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT string_agg(coalesce(quote_literal(k), 'NULL'), ', ') INTO v_bad
      FROM unnest(kinds) k WHERE k IS NULL OR k <> ALL (herald._result_kinds());
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown result kind(s) %', v_bad
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Known kinds: ' || array_to_string(herald._result_kinds(), ', ') || '.';
    END IF;
END
$$;
CREATE FUNCTION herald._results_after(workspace text, after bigint, lim int, kinds text[])
RETURNS SETOF herald.results
LANGUAGE sql STABLE
AS $$
    SELECT x.* FROM (
        (SELECT r.* FROM herald.results r
          WHERE kinds IS NULL AND r.workspace_id = workspace AND r.id > after
          ORDER BY r.id LIMIT lim)
        UNION ALL
        (SELECT r.* FROM (SELECT DISTINCT unnest(kinds)) k(kind)
          CROSS JOIN LATERAL (SELECT r.* FROM herald.results r
                               WHERE r.workspace_id = workspace AND r.kind = k.kind AND r.id > after
                               ORDER BY r.id LIMIT lim) r)
    ) x
    ORDER BY x.id
    LIMIT lim
$$;
CREATE FUNCTION herald.read_results(workspace text, after bigint, max int DEFAULT 1000, kinds text[] DEFAULT NULL)
RETURNS TABLE (id bigint, kind text, at timestamptz, contact_id bigint, automation_id bigint,
               enrollment_id bigint, broadcast_id bigint, job_id bigint, data jsonb)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    PERFORM herald._require_workspace(workspace);
    IF after IS NULL OR after < 0 THEN
        RAISE EXCEPTION 'after must be a result id (0 reads from the oldest kept), got %', coalesce(after::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max IS NULL OR max < 1 OR max > 10000 THEN
        RAISE EXCEPTION 'max must be between 1 and 10000, got %', coalesce(max::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM herald._check_result_kinds(kinds);
    RETURN QUERY
    SELECT r.id, r.kind, r.at, r.contact_id, r.automation_id, r.enrollment_id, r.broadcast_id, r.job_id, r.data
      FROM herald._results_after(workspace, after, max, kinds) r
     ORDER BY r.id;
END
$$;
CREATE FUNCTION herald.newest_result(workspace text) RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    PERFORM herald._require_workspace(workspace);
    RETURN coalesce((SELECT max(r.id) FROM herald.results r WHERE r.workspace_id = newest_result.workspace), 0);
END
$$;
CREATE FUNCTION herald.subscribe_results(workspace text, url text, kinds text[], options jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_options jsonb;
    v_id bigint;
BEGIN
    PERFORM herald._require_workspace(workspace);
    PERFORM herald._check_result_kinds(kinds);
    v_options := herald._check_subscription(url, options);
    INSERT INTO herald.result_subscriptions (workspace_id, url, kinds, options, cursor, created_by)
    VALUES (workspace, url, (SELECT array_agg(DISTINCT k ORDER BY k) FROM unnest(kinds) k), v_options - 'after' - 'url',
            coalesce((v_options ->> 'after')::bigint, herald.newest_result(workspace)),
            herald._caller())
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;
CREATE FUNCTION herald.unsubscribe_results(workspace text, subscription bigint) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_job bigint;
BEGIN
    PERFORM herald._require_workspace(workspace);
    -- after any advance_results that is queuing a delivery for it (see there)
    PERFORM pg_advisory_xact_lock(hashtext('herald.advance_results'));
    DELETE FROM herald.result_subscriptions s
     WHERE s.workspace_id = unsubscribe_results.workspace AND s.id = subscription
    RETURNING s.job_id INTO v_job;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE herald.outbox o
       SET status = 'cancelled', last_error = 'unsubscribed', done_at = now(), updated_at = now()
     WHERE o.id = v_job AND o.workspace_id = unsubscribe_results.workspace AND o.status = 'pending';
    RETURN true;
END
$$;
CREATE FUNCTION herald.advance_results(max_rows int DEFAULT 10000) RETURNS int
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
         WHERE NOT EXISTS (SELECT 1 FROM herald.outbox o WHERE o.id = s.job_id AND o.status <> 'done')
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
CREATE VIEW herald.result_subscription_overview AS
SELECT s.workspace_id, s.id, s.url, s.kinds, s.options, s.cursor, s.queued,
       CASE WHEN o.status IS NULL OR o.status = 'done' THEN 'idle'
            WHEN o.status IN ('pending', 'leased', 'held') THEN 'delivering'
            ELSE 'blocked' END AS state,
       s.job_id, o.status AS job_status, o.attempt AS attempts,
       CASE WHEN o.status = 'pending' THEN o.run_at END AS next_attempt_at, o.last_error,
       s.created_by, s.created_at, s.updated_at
  FROM herald.result_subscriptions s
  LEFT JOIN herald.outbox o ON o.id = s.job_id;

-- the writers: each statement that makes a result true stages it (complete, tick, claim and
-- _advance_broadcast are replaced above)
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
    INSERT INTO herald.results_staged (workspace_id, kind, contact_id, automation_id, enrollment_id, data)
    VALUES (v.workspace_id, 'approval.decided', v.contact_id, v.automation_id, v.id,
            jsonb_build_object('node', v.current_node, 'approved', approved, 'actor', actor, 'next', v_next));
    INSERT INTO herald.step_log (workspace_id, enrollment_id, automation_id, nodes, visits, actions)
    VALUES (v.workspace_id, v.id, v.automation_id, ARRAY[v.current_node], ARRAY[v.visit],
            ARRAY[format('%s by %s -> %s', CASE WHEN approved THEN 'approved' ELSE 'rejected' END, actor, v_next)]);
    INSERT INTO herald.stats_delta (workspace_id, automation_id, node, metric, n)
    VALUES (v.workspace_id, v.automation_id, v.current_node, CASE WHEN approved THEN 'approved' ELSE 'rejected' END, 1);
    PERFORM pg_notify('herald.tick', '');
END
$$;
CREATE OR REPLACE FUNCTION herald.exit_enrollment(enrollment bigint, reason text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.enrollments;
BEGIN
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'an exit reason is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v := herald._lock_enrollment(enrollment);
    IF v.status NOT IN ('active', 'waiting') THEN
        RAISE EXCEPTION 'enrollment % has already ended (%)', enrollment, v.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE herald.enrollments e
       SET status = 'exited', exit_reason = reason, ended_at = now(), updated_at = now()
     WHERE e.workspace_id = v.workspace_id AND e.id = v.id;
    INSERT INTO herald.results_staged (workspace_id, kind, contact_id, automation_id, enrollment_id, data)
    VALUES (v.workspace_id, 'enrollment.exited', v.contact_id, v.automation_id, v.id,
            herald._ended_data(v.current_node, reason, v.context));
    PERFORM herald._cancel_pending_jobs(v.workspace_id, v.automation_id, v.id, 'enrollment exited: ' || reason);
    INSERT INTO herald.stats_delta (workspace_id, automation_id, metric, n) VALUES (v.workspace_id, v.automation_id, 'exited', 1);
END
$$;
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
               coalesce(t.f ->> 'workspace', m.workspace_id) AS workspace_id,
               herald._normalize_email(coalesce(t.f ->> 'email', c.email)) AS email, t.ord,
               m.contact_id, m.automation_id, m.enrollment_id, m.broadcast_id, m.job_id,
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
                                    (array_agg(h.outbox_id ORDER BY h.id DESC))[1] AS job_id
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
        SELECT k.workspace_id, k.email, k.event_kind, k.event_payload
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
               k.automation_id, k.enrollment_id, k.broadcast_id, k.job_id, k.event_payload
          FROM fresh k
         WHERE k.event_kind IN ('email.bounced', 'email.opened', 'email.clicked')
         ORDER BY k.ord
    )
    SELECT count(*) INTO v_n FROM recorded;
    RETURN v_n;
END
$$;
-- erasure takes the contact's results too
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
    ), contacts AS (
        DELETE FROM herald.contacts c WHERE c.workspace_id = workspace AND c.id = v_contact RETURNING 1
    )
    SELECT jsonb_build_object(
               'contacts', (SELECT count(*) FROM contacts), 'events', (SELECT count(*) FROM events),
               'enrollments', (SELECT count(*) FROM enrollments), 'step_log', (SELECT count(*) FROM steps),
               'jobs', (SELECT count(*) FROM jobs), 'message_history', (SELECT count(*) FROM history),
               'list_members', (SELECT count(*) FROM lists), 'contact_rejections', (SELECT count(*) FROM rejections),
               'suppressions', (SELECT count(*) FROM suppressions),
               'results', (SELECT count(*) FROM results) + (SELECT count(*) FROM staged))
      INTO v_removed;

    INSERT INTO herald.suppressions (workspace_id, email, reason)
    VALUES (workspace, v_key, 'erased')
    ON CONFLICT ON CONSTRAINT suppressions_pkey DO NOTHING;
    INSERT INTO herald.erasures (workspace_id, email_key, erased_by, removed)
    VALUES (workspace, v_key, herald._caller(), v_removed);
    RETURN v_removed;
END
$$;
-- prune: results_older_than (a new argument, so a new function; prune('30 days') works as before)
DROP FUNCTION herald.prune(interval);
CREATE FUNCTION herald.prune(older_than interval DEFAULT '30 days', results_older_than interval DEFAULT '7 days')
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
    DELETE FROM herald.outbox WHERE status IN ('done', 'failed') AND done_at < now() - older_than;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    DELETE FROM herald.decide_cache WHERE expires_at < now();
    GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    RETURN v_total;
END
$$;

-- ------------------------------------------------------------------------------------ who may do what
-- CREATE OR REPLACE FUNCTION reset SECURITY DEFINER on the API functions above (sql/security.sql)
ALTER FUNCTION herald.tick(int) SECURITY DEFINER;
ALTER FUNCTION herald.send(text, text, text, jsonb, text, text) SECURITY DEFINER;
ALTER FUNCTION herald.claim(text, int, interval) SECURITY DEFINER;
ALTER FUNCTION herald.complete(jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.reap() SECURITY DEFINER;
ALTER FUNCTION herald.create_broadcast(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.pause_broadcast(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.resume_broadcast(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.cancel_broadcast(bigint) SECURITY DEFINER;
ALTER FUNCTION herald._dispatch() SECURITY DEFINER;
ALTER FUNCTION herald.decide_approval(bigint, boolean, text) SECURITY DEFINER;
ALTER FUNCTION herald.exit_enrollment(bigint, text) SECURITY DEFINER;
ALTER FUNCTION herald.set_automation_status(bigint, text) SECURITY DEFINER;
ALTER FUNCTION herald.update_automation(bigint, jsonb, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.record_feedback(jsonb, text) SECURITY DEFINER;
ALTER FUNCTION herald.delete_contact(text, text) SECURITY DEFINER;
ALTER FUNCTION herald.prune(interval, interval) SECURITY DEFINER;
ALTER FUNCTION herald.read_results(text, bigint, int, text[]) SECURITY DEFINER;
ALTER FUNCTION herald.newest_result(text) SECURITY DEFINER;
ALTER FUNCTION herald.subscribe_results(text, text, text[], jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.unsubscribe_results(text, bigint) SECURITY DEFINER;
ALTER FUNCTION herald.advance_results(int) SECURITY DEFINER;
-- new functions are executable by PUBLIC until this (as in a fresh install's security.sql)
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA herald FROM PUBLIC;
-- the results stream: an application reads and subscribes for its own workspaces; the daemon reads every
-- workspace's for its stream endpoint
GRANT EXECUTE ON FUNCTION
    herald.subscribe_results(text, text, text[], jsonb), herald.unsubscribe_results(text, bigint)
TO herald_app, herald_admin;
GRANT EXECUTE ON FUNCTION herald.read_results(text, bigint, int, text[]) TO herald_app, herald_worker, herald_admin;
GRANT EXECUTE ON FUNCTION herald.newest_result(text) TO herald_app, herald_worker, herald_admin;
GRANT EXECUTE ON FUNCTION herald.prune(interval, interval), herald.advance_results(int) TO herald_worker, herald_admin;
ALTER VIEW herald.result_subscription_overview SET (security_invoker = true);
GRANT SELECT ON herald.results, herald.result_subscriptions, herald.result_subscription_overview TO herald_app, herald_admin;
ALTER TABLE herald.results ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.results USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.results_staged ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.results_staged USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.result_subscriptions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.result_subscriptions USING (workspace_id IN (SELECT herald._my_workspaces()));

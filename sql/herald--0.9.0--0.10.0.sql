-- herald 0.9.0 -> 0.10.0
--   Release 0.9.0 is the SQL that landed on 2026-12-07 (commit e59ab61), kept in
--   sql/releases/herald--0.9.0.sql. Everything since, one marked block per change:
--   Functions replaced here lose SECURITY DEFINER (CREATE OR REPLACE resets it): it is set again at
--   the end of each block.

-- ==== history_indexes: message_history's contact and automation indexes without created_at ====
-- Rebuilt in the upgrade's transaction: writes to message_history (complete()) wait for the two
-- builds, 33 s per 10,000,000 rows on a 2-core machine (README *Backups and upgrades*).
DROP INDEX herald.message_history_automation_idx;
CREATE INDEX message_history_automation_idx ON herald.message_history (workspace_id, automation_id)
    WHERE automation_id IS NOT NULL;
DROP INDEX herald.message_history_contact_idx;
CREATE INDEX message_history_contact_idx ON herald.message_history (workspace_id, contact_id);

-- ==== request_tick: complete() and the dispatcher's wake-ups coalesced like enrolments' ====
-- herald._request_tick notifies herald.tick unless a wake-up is pending (sql/queue.sql); complete()
-- calls it instead of pg_notify. The dispatcher calls it too: herald._dispatch is replaced in the
-- entry_uq_events block below, which has both changes.
CREATE OR REPLACE FUNCTION herald._request_tick() RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, herald, pg_temp
BEGIN ATOMIC
    SELECT setval('herald.tick_wakeup', n.now_ms, true), pg_notify('herald.tick', '')
      FROM herald.tick_wakeup w, (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now_ms) n
     WHERE NOT (w.is_called AND w.last_value > n.now_ms - 5000);
END;
REVOKE ALL ON FUNCTION herald._request_tick() FROM PUBLIC;

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
                  o.broadcast_id, o.variation, o.node, o.dedupe_key, o.attempt,
                  -- only a decide job's payload is read below (its paths and cache settings): an email's
                  -- variables can be large, and a returned column is copied into every CTE that reads it
                  CASE WHEN o.kind = 'decide' THEN o.payload END AS payload, o.on_success, o.on_error,
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
        -- only a step's job can have enrollments waiting on it, and tick queues every step's job with the
        -- enrollment that took the step (a shared decide question: the first one that asked), so a job
        -- without one (send(), a broadcast's, a results stream's delivery) costs no probe
        SELECT j.workspace_id, j.dedupe_key, j.node, j.outcome, j.error, j.kind, j.new_response, j.next_node
          FROM job j WHERE j.outcome IN ('done', 'failed') AND j.enrollment_id IS NOT NULL
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
        PERFORM herald._request_tick();   -- coalesced (see there)
    END IF;
    RETURN v_applied;
END
$$;
ALTER FUNCTION herald.complete(jsonb) SECURITY DEFINER;

-- ==== entry_uq_events: enrollments_entry_uq without reentry-always ('event:<id>') keys ====
-- The dispatcher writes each event's key once (a fresh event id), so the unique index leaves those
-- keys out; the three inserts that name the index as their ON CONFLICT arbiter say its new predicate.
-- Rebuilt in the upgrade's transaction: enrolments and tick wait for the build (README *Backups and
-- upgrades*).
DROP INDEX herald.enrollments_entry_uq;
CREATE UNIQUE INDEX enrollments_entry_uq ON herald.enrollments (workspace_id, automation_id, contact_id, entry_key)
    WITH (fillfactor = 50)
    WHERE entry_key = 'once' OR (entry_key = 'active' AND status IN ('active', 'waiting'));

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
           WHERE entry_key = 'once' OR (entry_key = 'active' AND status IN ('active', 'waiting'))
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
           WHERE entry_key = 'once' OR (entry_key = 'active' AND status IN ('active', 'waiting'))
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

CREATE OR REPLACE FUNCTION herald._dispatch() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
AS $$
DECLARE
    v_any boolean;
    v_by_email boolean;
    v_bad_payload text;
    v_bad_workspaces text;
    v_bad text;
    v_woken int;
BEGIN
    -- a dump being loaded: these events were dispatched in the database they come from
    IF herald._restoring() THEN
        RETURN NULL;
    END IF;
    -- What the statement inserted, and 1. integrity, all read in ONE statement (each statement a trigger
    -- runs costs its own executor start-up: one per check was ~a tenth of track()'s time in the server).
    -- Payloads bounded like track's (for plain INSERT and COPY; the check prints only payloads large
    -- enough to be out of bounds). The faults are raised below in this order.
    SELECT EXISTS (SELECT 1 FROM new_events),
           EXISTS (SELECT 1 FROM new_events n WHERE n.contact_id IS NULL),
           (SELECT format('event %s (workspace %s): payload %s', n.id, quote_literal(n.workspace_id), herald._value_fault(n.payload))
              FROM new_events n WHERE herald._value_fault(n.payload) IS NOT NULL LIMIT 1),
           (SELECT string_agg(DISTINCT quote_literal(n.workspace_id), ', ')
              FROM new_events n
             WHERE NOT EXISTS (SELECT 1 FROM herald.workspaces w WHERE w.id = n.workspace_id)),
           (SELECT string_agg(format('%s (workspace %s)', b.contact_id, quote_literal(b.workspace_id)), ', ')
              FROM (SELECT DISTINCT n.workspace_id, n.contact_id
                      FROM new_events n
                     WHERE n.contact_id IS NOT NULL
                       AND NOT EXISTS (SELECT 1 FROM herald.contacts c
                                        WHERE c.workspace_id = n.workspace_id AND c.id = n.contact_id)
                     LIMIT 10) b)
      INTO v_any, v_by_email, v_bad_payload, v_bad_workspaces, v_bad;
    -- statements that inserted nothing (tick's list events, usually) cost one check, not a dispatch
    IF NOT v_any THEN
        RETURN NULL;
    END IF;
    IF v_bad_payload IS NOT NULL THEN
        RAISE EXCEPTION '%', v_bad_payload USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF v_bad_workspaces IS NOT NULL THEN
        RAISE EXCEPTION 'events for unknown workspace(s) %', v_bad_workspaces
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'Create the workspace first with herald.create_workspace(id, name).';
    END IF;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'events name unknown contact id(s): %', v_bad
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'Give the email instead of contact_id to create contacts on the fly.';
    END IF;

    -- 2. events that name their contact by email only
    IF v_by_email THEN
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

    -- 3. enrol into every live automation whose trigger matches, with the 'enrolled' stats deltas. One
    --    statement.
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
    ), fresh AS (
        -- the newest version (sql/versions.sql), read in this statement's snapshot like start_node, so the
        -- two agree; version 1 is not written. A column, not a sub-select, as _version_tag's argument, so
        -- the function is inlined (with a sub-select it was called as a function, per enrollment)
        SELECT m.workspace_id, m.automation_id, m.contact_id, herald._entry_key(m.reentry, m.event_id) AS entry_key,
               m.start_node, m.event_id,
               jsonb_build_object('kind', m.kind, 'payload', m.payload) || herald._version_tag(nv.version) AS event
          FROM matched m
         CROSS JOIN LATERAL (SELECT max(v.version) AS version FROM herald.automation_versions v
                              WHERE v.workspace_id = m.workspace_id AND v.automation_id = m.automation_id) nv
    ), enrolled_by_event AS (
        -- reentry always: the key 'event:<id>' names an event this statement inserted (one trigger call
        -- per inserted row, a restore excepted above), so it enrols once per matching automation: a
        -- plain insert, no ON CONFLICT and no probe (enrollments_entry_uq leaves these keys out). An
        -- event id given again after the event that had it was deleted is another event and enrols.
        INSERT INTO herald.enrollments (workspace_id, automation_id, contact_id, entry_key, current_node, event_id, event)
        SELECT f.workspace_id, f.automation_id, f.contact_id, f.entry_key, f.start_node, f.event_id, f.event
          FROM fresh f
         WHERE f.entry_key LIKE 'event:%'
         ORDER BY f.workspace_id, f.automation_id, f.contact_id, f.event_id
        RETURNING workspace_id, automation_id
    ), enrolled_by_rule AS (
        -- reentry once / active: ON CONFLICT DO NOTHING on the re-entry key (concurrent events of one
        -- contact enrol once); its arbiter index is not left to the planner
        INSERT INTO herald.enrollments (workspace_id, automation_id, contact_id, entry_key, current_node, event_id, event)
        SELECT f.workspace_id, f.automation_id, f.contact_id, f.entry_key, f.start_node, f.event_id, f.event
          FROM fresh f
         WHERE f.entry_key NOT LIKE 'event:%'
         ORDER BY f.workspace_id, f.automation_id, f.contact_id, f.event_id
        ON CONFLICT (workspace_id, automation_id, contact_id, entry_key)
           WHERE entry_key = 'once' OR (entry_key = 'active' AND status IN ('active', 'waiting'))
           DO NOTHING
        RETURNING workspace_id, automation_id
    )
    INSERT INTO herald.stats_delta (workspace_id, automation_id, metric, n)
    SELECT x.workspace_id, x.automation_id, 'enrolled', count(*)
      FROM (SELECT * FROM enrolled_by_event UNION ALL SELECT * FROM enrolled_by_rule) x
     GROUP BY 1, 2;

    -- 4. wake the enrollments parked on a wait_event node for one of these events (first matching event
    --    wins). A statement of its own, run only when a probe finds one waiting (events given by email
    --    only: always): most events wake nothing, and the wake-up's plan (an UPDATE of enrollments and
    --    its indexes) cost its executor start-up on every event when it was part of statement 3.
    IF NOT v_by_email AND NOT EXISTS (
        SELECT 1 FROM new_events n
         WHERE EXISTS (SELECT 1 FROM herald.enrollments e
                        WHERE e.workspace_id = n.workspace_id AND e.contact_id = n.contact_id
                          AND e.wait_event = n.kind AND e.wait_kind = 'event' AND e.ended_at IS NULL
                       OFFSET 0)) THEN   -- OFFSET 0: an enrollments_wait_event_idx probe per event
        RETURN NULL;
    END IF;
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
        PERFORM herald._request_tick();   -- coalesced (see there)
    END IF;

    RETURN NULL;
END
$$;

ALTER FUNCTION herald.enroll(bigint, bigint[]) SECURITY DEFINER;
ALTER FUNCTION herald.enroll_segment(bigint, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald._dispatch() SECURITY DEFINER;

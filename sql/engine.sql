-- herald: the step engine.
--
-- tick() is ONE statement, whatever the batch size:
--   due       lock up to max_steps due enrollments of live automations (FOR UPDATE SKIP LOCKED: any number
--             of concurrent ticks are safe and never run a step twice)
--   batch     prefetch their contacts and automations once, as two documents reaching Rust as text (the
--             definitions as json, the enrollments as JSON text written out: no jsonb printing, no json
--             value built per row)
--   steps     herald._steps (Rust, extension/src/step_engine.rs) runs the node logic in memory: a contact
--             advances through consecutive non-waiting nodes until it parks, ends, or hits the per-tick cap
--   writes    data-modifying CTEs write every outcome: enrollments, outbox jobs (ON CONFLICT on the dedupe key,
--             so a step is never queued twice), decide replies served from the cache, contacts and list
--             memberships touched by update_contact (with list.joined / list.left events), the step log and
--             stats deltas.

-- The planner's row estimate for _steps: low on purpose. tick joins its output to enrollments and
-- contacts by primary key; with the default (1,000) the writes hashed the whole enrollments and contacts
-- tables on every tick, a cost that grows with all rows ever made instead of with the batch.
ALTER FUNCTION herald._steps(json, text, float8, int) ROWS 100;

CREATE FUNCTION herald.tick(max_steps int DEFAULT 10000) RETURNS int
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
        -- tags, timezone); _steps joins them into the facts herald._contact_facts would make. Joined
        -- with || rather than concat(): concat looks up every argument's output function on every row.
        -- The status needs no escaping (the CHECK on enrollments.status allows five plain words);
        -- to_json looks up its argument's type on every call (~1,500 instructions each, callgrind).
        SELECT (SELECT json_object_agg(x.automation_id::text || ':' || x.version::text, x.definition) FROM defs x) AS automations,
               '[' || string_agg('{"id":' || d.id::text || ',"workspace_id":' || to_json(d.workspace_id)::text
                   || ',"automation_id":' || d.automation_id::text || ',"version":' || d.version::text
                   || ',"contact_id":' || d.contact_id::text || ',"status":"' || d.status
                   || '","node":' || to_json(d.current_node)::text || ',"visit":' || d.visit::text
                   || ',"context":' || d.context::text || ',"event":' || coalesce((d.event -> 'payload')::text, 'null')
                   || ',"attributes":' || coalesce(c.attributes::text, '{}') || ',"email":' || to_json(c.email)::text
                   || ',"tags":' || coalesce(array_to_json(c.tags)::text, '[]')
                   || ',"timezone":' || coalesce(to_json(c.timezone)::text, 'null') || '}', ',') || ']' AS enrollments
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
        -- straight to the chosen path: cache_reply (the path is read from it in moved).
        SELECT s.*, j.jb, j.jb ->> 'kind' AS job_kind,
               -- decide: identical questions share one job per TTL window (and one cached reply)
               CASE WHEN j.jb ->> 'kind' = 'decide'
                    THEN format('decide:%s:%s', j.jb ->> 'request_hash',
                                floor(extract(epoch FROM now()) / greatest((j.jb ->> 'cache_ttl_seconds')::float8, 1)))
                    ELSE j.jb ->> 'dedupe_key' END AS job_key,
               -- probed for decide jobs only: as a lateral join it was a subquery run for every row
               -- (with the job's kind and key as another: 1.2% of tick's instructions, callgrind)
               CASE WHEN j.jb ->> 'kind' = 'decide'
                    THEN (SELECT c.reply FROM herald.decide_cache c
                           WHERE c.workspace_id = s.workspace_id AND c.request_hash = j.jb ->> 'request_hash'
                             AND c.expires_at > now()
                           LIMIT 1) END AS cache_reply
          FROM batch b
         CROSS JOIN LATERAL herald._steps(b.automations, b.enrollments, extract(epoch FROM now())::float8, 50) s
         -- the job as jsonb, parsed once: every ->> on a json value parses its text again (~10 per job
         -- below); OFFSET 0 keeps the cast from being copied into each of them
         CROSS JOIN LATERAL (SELECT s.job::jsonb AS jb OFFSET 0) j
    ), moved AS (
        UPDATE herald.enrollments e
           SET status = CASE WHEN st.cache_reply IS NOT NULL THEN 'active' ELSE st.status END,
               current_node = CASE WHEN st.cache_reply IS NOT NULL
                                   THEN coalesce(st.jb -> 'payload' -> 'paths' ->> (st.cache_reply ->> (st.jb -> 'payload' ->> 'field')),
                                                 st.jb -> 'payload' ->> 'default', st.node)
                                   ELSE st.node END,
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
    -- the results stream moves on with every tick (sql/results.sql), so whoever ticks keeps it published
    -- and its subscriptions served; one caller at a time does it, the others skip at once. A caller that
    -- publishes on its own says so with herald.tick_publishes_results = off (herald run sets it on its
    -- connections: it publishes every 250 ms and after each tick round, beside the ticks)
    IF coalesce(current_setting('herald.tick_publishes_results', true), '') NOT IN ('off', 'false', '0') THEN
        PERFORM herald.advance_results(100000);
    END IF;
    RETURN v_steps;
END
$$;

-- Resolves an enrollment parked on an approval node: approved → the node's "approved" path, else "rejected".
-- Who decided and when are recorded on the enrollment and in the step log.
CREATE FUNCTION herald.decide_approval(enrollment bigint, approved boolean, actor text) RETURNS void
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

-- The step log, one row per node an enrollment passed, in order (log_id, seq).
CREATE VIEW herald.step_history AS
SELECT l.workspace_id, l.id AS log_id, s.seq, l.enrollment_id, l.automation_id, s.node, s.visit, s.action,
       l.created_at
  FROM herald.step_log l
 CROSS JOIN LATERAL unnest(l.nodes, l.visits, l.actions) WITH ORDINALITY AS s(node, visit, action, seq);

CREATE VIEW herald.pending_approvals AS
SELECT e.workspace_id, e.id AS enrollment_id, e.automation_id, a.name AS automation, e.current_node AS node,
       c.email, e.updated_at AS waiting_since, nullif(e.next_run_at, 'infinity') AS times_out_at
  FROM herald.enrollments e
  JOIN herald.automations a ON a.workspace_id = e.workspace_id AND a.id = e.automation_id
  JOIN herald.contacts c ON c.workspace_id = e.workspace_id AND c.id = e.contact_id
 WHERE e.status = 'waiting' AND e.wait_kind = 'approval';

-- A database setting that holds an interval (prune's retentions): NULL when it is not set or empty, an
-- error that names it when it is not an interval. Internal: granted to no role.
CREATE FUNCTION herald._setting_interval(name text) RETURNS interval
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_value text := nullif(btrim(current_setting(name, true)), '');
BEGIN
    RETURN v_value::interval;
EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow OR interval_field_overflow THEN
    RAISE EXCEPTION 'setting % must be an interval such as ''400 days'', got %', name, quote_literal(v_value)
        USING ERRCODE = 'invalid_parameter_value';
END
$$;

-- Old rows go: the step log, import rejections, finished jobs (done, failed, cancelled; dead ones wait
-- for a redrive) and expired decide replies older than
-- `older_than`, and results of the results stream (sql/results.sql) published longer ago than
-- `results_older_than` (what a subscriber or reader has not fetched by then is gone). Events and
-- message_history are kept for good unless a retention is given: `events_older_than` (at least a day;
-- segments, a broadcast's engagement figures and the dry run then see only the events kept) and
-- `history_older_than` (at least `older_than`: a job's record outlives the job). NULL takes the
-- database's settings herald.prune_events_older_than / herald.prune_history_older_than (so the daemon's
-- hourly prune('30 days') applies them: ALTER DATABASE … SET herald.prune_events_older_than = '400 days');
-- neither set: kept. Rows go by age of arrival (created_at), through BRIN indexes: whatever the
-- statistics say, each DELETE reads the old block ranges only (seq scans off). Returns how many rows
-- were removed. herald_worker (the daemon's maintenance, hourly) and herald_admin.
CREATE FUNCTION herald.prune(older_than interval DEFAULT '30 days', results_older_than interval DEFAULT '7 days',
                             events_older_than interval DEFAULT NULL, history_older_than interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET enable_seqscan = off   -- the BRIN ranges of old rows, not the whole table, on a table never analysed
AS $$
DECLARE
    v_n bigint;
    v_total bigint := 0;
    v_events interval := coalesce(events_older_than, herald._setting_interval('herald.prune_events_older_than'));
    v_history interval := coalesce(history_older_than, herald._setting_interval('herald.prune_history_older_than'));
BEGIN
    IF older_than IS NULL OR older_than < interval '1 hour' THEN
        RAISE EXCEPTION 'older_than must be at least 1 hour' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF results_older_than IS NULL OR results_older_than < interval '1 hour' THEN
        RAISE EXCEPTION 'results_older_than must be at least 1 hour' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_events < interval '1 day' THEN
        RAISE EXCEPTION 'events_older_than must be at least 1 day, got %', v_events
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = CASE WHEN events_older_than IS NULL THEN 'It came from the setting herald.prune_events_older_than.'
                              ELSE 'NULL keeps every event.' END;
    END IF;
    IF v_history < older_than THEN
        RAISE EXCEPTION 'history_older_than must be at least older_than (%), got %', older_than, v_history
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'A finished job''s message_history row outlives the job.',
                  HINT = CASE WHEN history_older_than IS NULL THEN 'It came from the setting herald.prune_history_older_than.'
                              ELSE 'NULL keeps every row.' END;
    END IF;
    DELETE FROM herald.results WHERE published_at < now() - results_older_than;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    DELETE FROM herald.step_log WHERE created_at < now() - older_than;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    DELETE FROM herald.contact_rejections WHERE created_at < now() - older_than;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    DELETE FROM herald.feedback_rejections WHERE created_at < now() - older_than;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    -- finished jobs (cancelled ones too: suppressed, exited, of a cancelled broadcast). created_at is
    -- redundant (a job ends after it is made) and lets outbox_created_idx find the old block ranges:
    -- without it each hourly prune read the whole outbox, 30 days of jobs
    DELETE FROM herald.outbox
     WHERE status IN ('done', 'failed', 'cancelled') AND done_at < now() - older_than
       AND created_at < now() - older_than;
    GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    DELETE FROM herald.decide_cache WHERE expires_at < now();
    GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    -- the HTTP API's idempotency keys hold for 24 hours (sql/api.sql)
    DELETE FROM herald.api_idempotency WHERE created_at < now() - interval '24 hours';
    GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    IF v_events IS NOT NULL THEN
        DELETE FROM herald.events WHERE created_at < now() - v_events;
        GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    END IF;
    IF v_history IS NOT NULL THEN
        DELETE FROM herald.message_history WHERE created_at < now() - v_history;
        GET DIAGNOSTICS v_n = ROW_COUNT; v_total := v_total + v_n;
    END IF;
    RETURN v_total;
END
$$;

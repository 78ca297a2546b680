-- herald 0.4.0 -> 0.5.0
--   Release 0.4.0 is the SQL that landed on 2026-12-06 (commit 04e44b2), kept in
--   sql/releases/herald--0.4.0.sql. Everything since:
--   * tick publishes the results stream only when its caller does not publish on its own
--     (herald.tick_publishes_results = off, which herald run sets on its connections);
--   * advance_results takes the oldest staged results by results_staged_id_idx;
--   Functions replaced here lose SECURITY DEFINER (CREATE OR REPLACE resets it): it is set again at
--   the end of each part.

-- ==== lead: tick leaves the results stream to a caller that publishes on its own (herald.tick_publishes_results = off, set by herald run) ====
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
ALTER FUNCTION herald.tick(int) SECURITY DEFINER;

-- ==== queue: claim plans once (generic plan), complete probes for waiting enrollments only for a step's job ====
CREATE OR REPLACE FUNCTION herald.claim(worker text, max_jobs int DEFAULT 100, lease interval DEFAULT '60 seconds')
RETURNS SETOF herald.job
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
-- Every statement here reaches the outbox through a fixed index path (the pending index, the ids by
-- primary key), so one plan serves every call. With custom plans (the default, max_jobs and lease being
-- parameters) the pick was planned again on every call: 0.30 ms of an idle claim's 0.43 ms.
SET plan_cache_mode = force_generic_plan
-- and since that plan lives as long as the connection: every table is reached by key, as in complete
-- (a plan made while the contacts were few, or never analysed, must not hash all of them per claim later)
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
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
        -- only what the payload below reads (the row's response and errors of earlier attempts are no
        -- business of the sender, and every column returned is copied through each join below)
        RETURNING o.id, o.workspace_id, o.kind, o.provider, o.dedupe_key, o.attempt, o.payload, o.contact_id,
                  o.automation_id, o.enrollment_id, o.broadcast_id, o.variation, array_position(v_ids, o.id) AS ord
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
        PERFORM pg_notify('herald.tick', '');
    END IF;
    RETURN v_applied;
END
$$;

ALTER FUNCTION herald.claim(text, int, interval) SECURITY DEFINER;
ALTER FUNCTION herald.complete(jsonb) SECURITY DEFINER;
-- ==== queue: end ====

-- ==== notify: herald.tick is notified once per daemon round, not by every enrolling transaction (herald._wake_tick, herald.take_tick_wakeup) ====
CREATE SEQUENCE herald.tick_wakeup MINVALUE 0 START 0;
-- in backups like every relation herald owns (a restored state is at worst a stale pending wake-up: not trusted)
SELECT pg_catalog.pg_extension_config_dump('herald.tick_wakeup', '');

-- Called by the notify_tick trigger (new enrollments; the other herald.tick NOTIFYs, of complete(), the
-- dispatcher's wake-up of waiting enrollments and broadcasts, still notify per transaction): notifies
-- herald.tick unless a wake-up is pending.
CREATE FUNCTION herald._wake_tick() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_since bigint;
    v_pending boolean;
    v_now bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
BEGIN
    SELECT w.last_value, w.is_called INTO v_since, v_pending FROM herald.tick_wakeup w;
    IF v_pending AND v_since > v_now - 5000 THEN
        RETURN;
    END IF;
    -- two transactions may both get here: two NOTIFYs, harmless
    PERFORM setval('herald.tick_wakeup', v_now, true);
    PERFORM pg_notify('herald.tick', '');
END
$$;

-- Role: herald_worker (the daemon), herald_admin. Takes the pending herald.tick wake-up before a tick:
-- the next enrolling transaction notifies again. Not workspace-scoped (tick is not either).
CREATE FUNCTION herald.take_tick_wakeup() RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, herald, pg_temp
BEGIN ATOMIC
    SELECT setval('herald.tick_wakeup', (extract(epoch FROM clock_timestamp()) * 1000)::bigint, false);
END;

-- One coalesced wake-up per transaction: Postgres folds identical notifications of a transaction into one,
-- and these triggers fire once per statement, never per row. Channels: herald.outbox (jobs to claim) and
-- herald.tick (enrollments due now; through herald._wake_tick, see above).
-- The channel is the trigger's argument.
CREATE OR REPLACE FUNCTION herald._notify() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows) AND NOT herald._restoring() THEN
        IF TG_ARGV[0] = 'herald.tick' THEN
            PERFORM herald._wake_tick();
        ELSE
            PERFORM pg_notify(TG_ARGV[0], '');
        END IF;
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION herald._wake_tick(), herald.take_tick_wakeup() FROM PUBLIC;
ALTER FUNCTION herald.take_tick_wakeup() SECURITY DEFINER;
GRANT EXECUTE ON FUNCTION herald.take_tick_wakeup() TO herald_worker, herald_admin;

-- ==== ingest: upsert_contacts skips the dispatcher when no automation listens to contact.created; one-pass address check ====
-- _valid_email: one anchored match instead of a match plus a forbidden-character search (same answers)
CREATE OR REPLACE FUNCTION herald._valid_email(email text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE   -- not STRICT: a strict function with an AND body is not inlined
RETURN coalesce(length(email) <= 254
                AND email ~ '^[^@[:space:][:cntrl:]\u0080-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]+@[^@[:space:][:cntrl:]\u0080-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]+\.[^@[:space:].[:cntrl:]\u0080-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]+$', false);
-- upsert_contacts: contact.created events skip the dispatcher (herald.restoring for that one statement) when no
-- live automation of the workspace triggers on contact.created; contact.updated events in a statement of their own
CREATE OR REPLACE FUNCTION herald.upsert_contacts(workspace text, contacts jsonb)
RETURNS TABLE (inserted bigint, updated bigint, rejected bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
AS $$
DECLARE
    v_ws text := workspace;
    v_with_nulls bigint[];
    v_too_large text;
    v_quiet boolean;
    v_restoring text;
    v_changed_ids bigint[];
    v_changed_emails text[];
    v_changed_payloads jsonb[];
BEGIN
    PERFORM herald._require_workspace(v_ws);
    IF jsonb_typeof(contacts) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'contacts must be a JSON array of objects, got %', coalesce(jsonb_typeof(contacts), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Example: [{"email": "ann@example.com", "attributes": {"plan": "pro"}, "timezone": "Europe/Paris"}]';
    END IF;

    -- one index probe (automations_live_trigger_idx; the primary key's range of the workspace when the
    -- statistics call it tiny). An automation set live by a transaction that has not committed yet is
    -- not seen, as the dispatcher's own snapshot would not see it either.
    v_quiet := NOT EXISTS (SELECT 1 FROM herald.automations a
                            WHERE a.workspace_id = v_ws AND a.trigger_event = 'contact.created' AND a.status = 'live');
    IF v_quiet THEN
        v_restoring := current_setting('herald.restoring', true);
        PERFORM set_config('herald.restoring', 'on', true);   -- put back right after the statement
    END IF;

    WITH input AS MATERIALIZED (
        -- each entry's fault, and how often its address occurs in the call (one sort, in byte order:
        -- cheaper than the collation's, and the order contacts are inserted in; a rejected entry may
        -- count, which only sends its address through the merge below, to the same result)
        SELECT x.position, x.entry, x.email, herald._contact_entry_fault(x.entry, x.email) AS fault,
               count(*) OVER (PARTITION BY x.email COLLATE "C") AS copies
          FROM (SELECT (t.ord - 1)::int AS position, t.entry, herald._normalize_email(t.entry ->> 'email') AS email
                  FROM jsonb_array_elements(contacts) WITH ORDINALITY AS t(entry, ord)
                OFFSET 0) x   -- OFFSET 0: each address is normalised once, not once per reference
    ), rejects AS (
        INSERT INTO herald.contact_rejections (workspace_id, batch, position, input, reason)
        SELECT v_ws, txid_current(), i.position, i.entry, i.fault FROM input i WHERE i.fault IS NOT NULL
        ON CONFLICT (workspace_id, batch, position) DO UPDATE SET input = EXCLUDED.input, reason = EXCLUDED.reason
        RETURNING 1
    ), good AS (
        -- an address given once is taken as it is; only repeated ones are merged, in input order
        -- (an ordered aggregate per address cost a sort per group: ~20 ms per 10,000 distinct ones).
        -- Read once, by `up`: not materialized
        SELECT a.email, coalesce(a.entry -> 'attributes', '{}') AS attrs,
               CASE WHEN jsonb_typeof(a.entry -> 'timezone') = 'string' THEN a.entry ->> 'timezone' END AS tz
          FROM input a
         WHERE a.fault IS NULL AND a.copies = 1
        UNION ALL
        SELECT a.email,
               herald._jsonb_merge_agg(coalesce(a.entry -> 'attributes', '{}') ORDER BY a.position),
               (array_agg(a.entry ->> 'timezone' ORDER BY a.position DESC)
                    FILTER (WHERE jsonb_typeof(a.entry -> 'timezone') = 'string'))[1]
          FROM input a
         WHERE a.fault IS NULL AND a.copies > 1
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
    ), created AS (
        INSERT INTO herald.events (workspace_id, contact_id, email, kind, payload)
        SELECT v_ws, u.id, u.email, 'contact.created', jsonb_strip_nulls(u.attributes)
          FROM up u WHERE u.is_new
         ORDER BY u.id
    ), changed AS (
        SELECT u.id, u.email, jsonb_build_object('changed', herald._changed_keys(b.by_id -> u.id::text, u.attributes)) AS payload
          FROM up u CROSS JOIN before b
         WHERE NOT u.is_new
    )
    -- (data-modifying CTEs always run to completion, referenced or not)
    SELECT (SELECT count(*) FROM up WHERE up.is_new),
           (SELECT count(*) FROM input i WHERE i.fault IS NULL) - (SELECT count(*) FROM up WHERE up.is_new),
           (SELECT count(*) FROM rejects),
           (SELECT array_agg(up.id) FROM up WHERE up.is_new AND jsonb_strip_nulls(up.attributes) <> up.attributes),
           -- the dispatcher's bound on event payloads (when it is skipped): entries were checked one by
           -- one, but attributes merged from repeated ones can outgrow it
           (SELECT format('contact.created for %s (workspace %s): payload %s', quote_literal(u.email), quote_literal(v_ws),
                          herald._value_fault(jsonb_strip_nulls(u.attributes)))
              FROM up u WHERE u.is_new AND herald._value_fault(u.attributes) IS NOT NULL
               AND herald._value_fault(jsonb_strip_nulls(u.attributes)) IS NOT NULL LIMIT 1),
           (SELECT array_agg(ch.id ORDER BY ch.id) FROM changed ch),
           (SELECT array_agg(ch.email ORDER BY ch.id) FROM changed ch),
           (SELECT array_agg(ch.payload ORDER BY ch.id) FROM changed ch)
      INTO inserted, updated, rejected, v_with_nulls, v_too_large, v_changed_ids, v_changed_emails, v_changed_payloads;
    IF v_quiet THEN
        PERFORM set_config('herald.restoring', coalesce(v_restoring, ''), true);
    END IF;
    IF v_too_large IS NOT NULL THEN
        RAISE EXCEPTION '%', v_too_large USING ERRCODE = 'program_limit_exceeded';
    END IF;

    -- contact.updated events (an enrollment may wait on one): through the dispatcher, always
    IF v_changed_ids IS NOT NULL THEN
        INSERT INTO herald.events (workspace_id, contact_id, email, kind, payload)
        SELECT v_ws, ch.id, ch.email, 'contact.updated', ch.payload
          FROM unnest(v_changed_ids, v_changed_emails, v_changed_payloads) AS ch(id, email, payload)
         ORDER BY ch.id;
    END IF;

    -- New contacts keep no null-valued keys (ON CONFLICT needs the raw input in EXCLUDED to remove keys).
    IF v_with_nulls IS NOT NULL THEN
        UPDATE herald.contacts c SET attributes = jsonb_strip_nulls(c.attributes)
         WHERE c.workspace_id = v_ws AND c.id = ANY (v_with_nulls);
    END IF;
    RETURN NEXT;
END
$$;
ALTER FUNCTION herald.upsert_contacts(text, jsonb) SECURITY DEFINER;
-- ==== ingest: end ====

-- ==== lead: advance_results takes the oldest staged results by an index on the staging order (a heap scan read every moved row autovacuum had not cleared: 94 MB, 38 ms a call in a soak) ====
CREATE INDEX IF NOT EXISTS results_staged_id_idx ON herald.results_staged (id);
CREATE OR REPLACE FUNCTION herald.advance_results(max_rows int DEFAULT 10000) RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
SET enable_seqscan = off      -- publish: walk results_staged_id_idx whatever the statistics say (a
SET enable_bitmapscan = off   -- scan of the heap reads every moved row vacuum has not cleared yet)
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
        -- the oldest staged rows, by results_staged_id_idx
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
ALTER FUNCTION herald.advance_results(int) SECURITY DEFINER;

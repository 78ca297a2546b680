-- herald 0.11.0 -> 0.12.0
--   Release 0.11.0 is the SQL that landed on 2026-12-07 (commit 2a6badd), kept in
--   sql/releases/herald--0.11.0.sql. Everything since, one marked block per change:
--   Functions replaced here lose SECURITY DEFINER (CREATE OR REPLACE resets it): it is set again at
--   the end of each block.

-- ==== template_share_lock: send, send_test and create_broadcast hold their templates against a delete ====
-- delete_template and archive_template take the template's advisory lock; these three did not, so one
-- committing in the same instant as a delete queued a job (or a broadcast) naming a template that no
-- longer existed. They now take the lock shared (sql/archive.sql, _share_templates).
CREATE FUNCTION herald._share_templates(workspace text, keys text[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('herald.template:' || workspace || '/' || k.key))
       FROM (SELECT DISTINCT u.key FROM unnest(keys) u(key) WHERE u.key IS NOT NULL ORDER BY u.key) k;
END
$$;
REVOKE ALL ON FUNCTION herald._share_templates(text, text[]) FROM PUBLIC;

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
    PERFORM herald._share_templates(workspace, ARRAY[template]);   -- against a concurrent delete (see there)
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
ALTER FUNCTION herald.send(text, text, text, jsonb, text, text) SECURITY DEFINER;

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
    PERFORM herald._share_templates(workspace, ARRAY[key]);   -- against a concurrent delete (see there)
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
ALTER FUNCTION herald.send_test(text, text, text, jsonb, text) SECURITY DEFINER;

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
    -- against a concurrent delete of a template (see there)
    PERFORM herald._share_templates(workspace, ARRAY(SELECT x ->> 'template' FROM jsonb_array_elements(v_def -> 'variations') x));
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
ALTER FUNCTION herald.create_broadcast(text, jsonb) SECURITY DEFINER;

-- ==== test_recipient_screen: claim checks a test's recipient that is no contact against suppressions ====
-- send_test refused a suppressed address when it queued the test, but claim screened only contacts'
-- addresses: an address suppressed between the two was mailed (sql/queue.sql, claim's step 1b).
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
        -- busy: a workspace whose earliest job of some priority is due; with its due priorities, in order,
        -- and where each one's range starts: the first pending job the skip-scan found
        SELECT d.workspace_id, d.priorities, d.starts, count(*) OVER () AS n
          FROM (SELECT p.workspace_id, array_agg(p.priority ORDER BY p.priority) AS priorities,
                       array_agg(p.run_at ORDER BY p.priority) AS starts
                  FROM pairs p WHERE p.run_at <= now() GROUP BY p.workspace_id) d
    ), offered AS (
        -- locked while scanned (SKIP LOCKED inside the per-workspace scan), so rows another claimer holds
        -- do not use up the limit; rows offered but not picked are released when claim commits. One scan
        -- per due priority, read in priority order until the workspace's offer is full. Its run_at range
        -- starts at the job the skip-scan found (no pending job of the pair comes before it in this
        -- statement's snapshot) and ends at the first job not yet due: the index entries of jobs leased
        -- or finished since vacuum last came by, which sit before it and are walked once by the
        -- skip-scan, are not walked a second time (under a long-open snapshot elsewhere, a report or a
        -- pg_dump, they pile up there: README *Known limits*)
        SELECT c.workspace_id, c.id, c.priority, c.rate_keys, c.screen,
               row_number() OVER (PARTITION BY c.workspace_id ORDER BY c.priority, c.run_at, c.id) AS rank
          FROM workspaces w
          CROSS JOIN LATERAL (
              SELECT q.workspace_id, q.id, q.priority, q.run_at, q.kind = 'email' OR q.broadcast_id IS NOT NULL AS screen,
                     herald._job_rate_keys(q.rate_keys, q.workspace_id, q.provider, q.broadcast_id) AS rate_keys
                FROM unnest(w.priorities, w.starts) p(priority, start)
               CROSS JOIN LATERAL (
                   SELECT o.workspace_id, o.id, o.priority, o.run_at, o.kind, o.rate_keys, o.provider, o.broadcast_id
                     FROM herald.outbox o
                    WHERE o.workspace_id = w.workspace_id AND o.priority = p.priority AND o.status = 'pending'
                      AND o.run_at >= p.start AND o.run_at <= now()
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
              -- the recipient: the contact's address, or a test's to an address that is no contact
              -- (send_test checked it when queued; an unsubscribe since must stop it as any other)
             CROSS JOIN LATERAL (SELECT coalesce(c.email, CASE WHEN o.kind = 'email' THEN o.payload ->> 'to' END) AS email) r
              -- the address, or its key when the contact was erased and came back (delete_contact)
              LEFT JOIN LATERAL (SELECT s.reason FROM herald.suppressions s
                                  WHERE r.email IS NOT NULL AND s.workspace_id = o.workspace_id
                                    AND s.email IN (r.email, herald._email_key(r.email))
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
ALTER FUNCTION herald.claim(text, int, interval) SECURITY DEFINER;

-- herald: content, providers, rate limits and the outbox queue the sidecar works from.

-- herald._valid_mailbox(text) (Rust, extension/src/mailbox.rs): a sender or Reply-To as a template or a
-- provider stores it: an address (as _valid_email, without <>"), or a display name and an address in angle
-- brackets: `Acme News <news@acme.test>`, `"Acme, Inc." <news@acme.test>`. An unquoted name holds none of
-- the characters that mean something in an address header (<>@,;:"\[]()), a quoted one no " or \. At most
-- 998 characters (one header line), no control or bidi characters. False (never NULL) for NULL.

-- Role: herald_admin. Creates or changes a provider. Its kind decides its transport in herald run: smtp
-- needs HERALD_SMTP_URL_<NAME> there, file needs HERALD_MAILDIR (never one in place of the other).
-- settings: rate_per_second, and from / reply_to, the sender and Reply-To of its emails (mailboxes, see
-- _valid_mailbox) unless a broadcast or the template says otherwise.
CREATE FUNCTION herald.upsert_provider(workspace text, name text, kind text, settings jsonb DEFAULT '{}')
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

-- Role: herald_worker (and herald_admin). Every provider's workspace, name and kind, for herald run to
-- check at start that each has its transport (the worker has no grant on the table itself: settings are
-- not its business). Only the workspaces the caller may act for (a worker serves every one).
CREATE FUNCTION herald.provider_kinds() RETURNS TABLE (workspace_id text, name text, kind text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
    SELECT p.workspace_id, p.name, p.kind FROM herald.providers p
     WHERE p.workspace_id IN (SELECT herald._my_workspaces())
     ORDER BY p.workspace_id, p.name;
$$;

CREATE FUNCTION herald._provider_rate_key(workspace text, provider text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'workspace_provider:' || workspace || '/' || provider;

-- The rate limits an email counts against: its workspace's provider and the provider across workspaces
-- (send, tick's email jobs, a broadcast's rows through _job_rate_keys).
CREATE FUNCTION herald._email_rate_keys(workspace text, provider text) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY[herald._provider_rate_key(workspace, provider), 'provider:' || provider];

-- A broadcast's own limit (its definition's rate_per_second). bigint::text, not text || bigint: the
-- latter is STABLE, and an IMMUTABLE function calling it is not inlined.
CREATE FUNCTION herald._broadcast_rate_key(broadcast bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'broadcast:' || broadcast::text;

-- The rate limits a job counts against. A broadcast's rows store none (a 1,000,000-recipient broadcast
-- would store the same three keys a million times): theirs follow from the row.
CREATE FUNCTION herald._job_rate_keys(rate_keys text[], workspace text, provider text, broadcast bigint) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN broadcast IS NULL THEN rate_keys
            ELSE herald._email_rate_keys(workspace, provider) || herald._broadcast_rate_key(broadcast) END;

-- Where a job goes when it returns to the queue (a retryable failure in complete, an expired lease in
-- reap) or is stopped on its way out (claim, advance_broadcasts settling a paused or cancelled
-- broadcast), by the status of its broadcast (NULL: not a broadcast's job): held while the broadcast is
-- paused (out of claim's index), cancelled once it is cancelled, else pending.
CREATE FUNCTION herald._queue_status(broadcast_status text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE broadcast_status WHEN 'paused' THEN 'held' WHEN 'cancelled' THEN 'cancelled' ELSE 'pending' END;

-- Limits shared by all workspaces: 'provider:<name>' or 'host:<webhook host>'. per_second NULL removes it.
CREATE FUNCTION herald.set_rate_limit(key text, per_second int) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF key IS NULL OR key !~ '^(provider|host):[^[:space:]]+$' THEN
        RAISE EXCEPTION 'invalid rate limit key %', coalesce(quote_literal(key), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use provider:<name> or host:<webhook host>; per-workspace provider limits are set with upsert_provider(…, ''{"rate_per_second": n}'').';
    END IF;
    IF per_second IS NULL THEN
        DELETE FROM herald.rate_limits r WHERE r.key = set_rate_limit.key;
    ELSIF per_second <= 0 THEN
        RAISE EXCEPTION 'per_second must be greater than 0, got %', per_second USING ERRCODE = 'invalid_parameter_value';
    ELSE
        INSERT INTO herald.rate_limits (key, per_second) VALUES (key, per_second)
        ON CONFLICT ON CONSTRAINT rate_limits_pkey DO UPDATE SET per_second = EXCLUDED.per_second;
    END IF;
END
$$;

-- The row type claim returns: everything the sidecar needs to render and send.
CREATE TYPE herald.job AS (
    id         bigint,
    workspace  text,
    kind       text,
    provider   text,
    dedupe_key text,
    attempt    int,
    payload    jsonb
);

-- herald.tick's wake-up, notified once per daemon round instead of once per enrolling transaction.
-- Postgres commits the transactions that called pg_notify one at a time (the notification queue's lock
-- is held from pre-commit to the end of the commit), so with a NOTIFY in every track() concurrent clients
-- queued behind each other. The state lives in a sequence because a sequence is read and written outside
-- transactions: every session sees a change at once, whatever its snapshot or isolation level.
--   is_called = false: the daemon took the last wake-up (herald.take_tick_wakeup) at last_value (ms
--                      since the epoch, the database's clock); the next enrolling transaction notifies
--   is_called = true:  a wake-up is pending since last_value (ms, set by the transaction that notified);
--                      enrolling transactions do not notify, since the daemon
--                      that takes it waits, after taking it, until every transaction older than the
--                      take has ended and then ticks once more (sidecar/src/run/tick_wakeup.rs)
-- A wake-up pending for more than 5 s is not trusted (a daemon that never takes it: an older build, or
-- none running): such transactions notify as before.
CREATE SEQUENCE herald.tick_wakeup MINVALUE 0 START 0;
-- in backups like every relation herald owns (a restored state is at worst a stale pending wake-up: not trusted)
SELECT pg_catalog.pg_extension_config_dump('herald.tick_wakeup', '');

-- Role: the notify_tick trigger only (new enrollments; complete() and the dispatcher's wake-up of waiting
-- enrollments go through herald._request_tick below, broadcasts and approvals still notify per
-- transaction): notifies herald.tick unless a wake-up is pending. The trigger function itself, not a
-- function the trigger calls: a nested PL/pgSQL call with its own search_path setting cost ~15 µs of
-- every enrolling track().
CREATE FUNCTION herald._wake_tick() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_now bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows) AND NOT herald._restoring() THEN
        -- one statement: read the flag and, unless a wake-up is pending (and trusted: younger than 5 s),
        -- mark it pending and notify. Two transactions may both notify: harmless
        PERFORM setval('herald.tick_wakeup', v_now, true), pg_notify('herald.tick', '')
           FROM herald.tick_wakeup w
          WHERE NOT (w.is_called AND w.last_value > v_now - 5000);
    END IF;
    RETURN NULL;
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

-- Role: internal (complete(), the dispatcher's wake-up of waiting enrollments; no grant). The wake-up of
-- a transaction that made enrollments due without inserting any: notifies herald.tick unless a wake-up
-- is pending, as herald._wake_tick does (which keeps the statement inline: a nested call cost ~15 µs of
-- every enrolling track()). Until 0.10.0 these notified in every transaction, so each complete() that
-- woke a journey queued its commit behind every other notifying transaction's (the soak's complete()
-- waited on that lock, `Lock:object`, ~8% of its time).
CREATE FUNCTION herald._request_tick() RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, herald, pg_temp
BEGIN ATOMIC
    SELECT setval('herald.tick_wakeup', n.now_ms, true), pg_notify('herald.tick', '')
      FROM herald.tick_wakeup w, (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now_ms) n
     WHERE NOT (w.is_called AND w.last_value > n.now_ms - 5000);
END;

-- One coalesced wake-up per transaction: Postgres folds identical notifications of a transaction into one,
-- and these triggers fire once per statement, never per row. Channels: herald.outbox (jobs to claim,
-- through herald._notify, its argument) and herald.tick (enrollments due now, through herald._wake_tick,
-- see above).
CREATE FUNCTION herald._notify() RETURNS trigger
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
CREATE TRIGGER notify_outbox AFTER INSERT ON herald.outbox
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION herald._notify('herald.outbox');
CREATE TRIGGER notify_tick AFTER INSERT ON herald.enrollments
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION herald._wake_tick();

-- Leases up to max_jobs due jobs. Three steps, whatever the batch size:
--   1. pick fairly and lock (SKIP LOCKED): a skip-scan visits only workspaces with pending work (idle ones
--      cost nothing), each offers its next jobs, and jobs are interleaved by their rank inside their
--      workspace, so a workspace with 100,000 pending cannot starve one with 10; priority first
--      (0 transactional, 1 automation, 2 broadcast);
--   2. rate limits (only when a picked job counts against a limit): lock those limits, keep the jobs that fit
--      in every key's sliding one-second window, record the grants;
--   3. lease them and return them with the contact, the latest template version and the enrollment context.
CREATE FUNCTION herald.claim(worker text, max_jobs int DEFAULT 100, lease interval DEFAULT '60 seconds')
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

-- Validates one complete() result; NULL when acceptable, else the reason.
CREATE FUNCTION herald._result_fault(r jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE   -- STABLE like format(); a stricter label would block inlining
RETURN CASE
    WHEN jsonb_typeof(r) IS DISTINCT FROM 'object' THEN 'must be a JSON object'
    WHEN jsonb_typeof(r -> 'id') IS DISTINCT FROM 'number' THEN 'id is missing or not a number'
    WHEN jsonb_typeof(r -> 'ok') IS DISTINCT FROM 'boolean' THEN 'ok is missing or not true/false'
    WHEN r ? 'retryable' AND jsonb_typeof(r -> 'retryable') <> 'boolean' THEN 'retryable must be true or false'
    WHEN NOT (r ->> 'ok')::boolean AND jsonb_typeof(r -> 'error') IS DISTINCT FROM 'string' THEN 'a failed result needs an error string'
    WHEN (r - ARRAY['id', 'ok', 'retryable', 'error', 'message_id', 'response']) <> '{}' THEN
        format('unknown key(s) in %s; allowed: id, ok, retryable, error, message_id, response',
               r - ARRAY['id', 'ok', 'retryable', 'error', 'message_id', 'response'])
END;

-- Finishes a batch of jobs in ONE statement: outbox rows, message history, stats deltas, decide cache,
-- and the enrollments waiting on them (success → on_success; a decide reply picks its path; permanent
-- failure → on_error or the enrollment fails). Retryable failures back off with jitter and become
-- dead after max_attempts (their enrollments keep waiting until redrive or exit).
-- Results for jobs that are not leased (unknown, already completed, reaped) change nothing and are
-- reported in a WARNING; the return value counts the results applied. Calling it twice is harmless.
-- An email the receiving server refused for good with an address-level reply (a failed result whose
-- response says "bounce": "hard", e.g. 550 5.1.1 user unknown) is a hard bounce at send time: recorded
-- as a provider's report of one would be (_record_refusals).
CREATE FUNCTION herald.complete(results jsonb) RETURNS int
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
    v_refused bigint[];
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
           (SELECT count(*) FROM woken w WHERE w.status = 'active'),
           -- emails the receiving server refused for good as a hard bounce (the daemon's response says
           -- "bounce": "hard"): applied now, so a repeated call does not record them twice
           (SELECT array_agg(j.id ORDER BY j.id) FROM job j
             WHERE j.kind = 'email' AND j.outcome = 'failed' AND j.new_response ->> 'bounce' = 'hard')
      INTO v_applied, v_ignored, v_woken, v_refused;

    IF v_ignored IS NOT NULL THEN
        RAISE WARNING 'complete: ignored result(s) for job(s) % (unknown, not leased, or already completed)', v_ignored;
    END IF;
    IF v_woken > 0 THEN
        PERFORM herald._request_tick();   -- coalesced (see there)
    END IF;
    IF v_refused IS NOT NULL THEN
        PERFORM herald._record_refusals(v_refused);
    END IF;
    RETURN v_applied;
END
$$;

-- Role: herald_worker (the daemon), herald_admin. The client session of this database whose snapshot is the
-- oldest (the caller's own aside), if its transaction has been open for at least min_age. While such a
-- snapshot lasts, the index entries of jobs leased or finished since cannot be removed and every claim
-- walks them (README *Known limits*): herald run checks this, warns in its log and shows the age in
-- /metrics. SECURITY DEFINER (the extension's owner), so that it sees every role's sessions; it tells
-- their pid, application_name and state, never their query or role.
CREATE FUNCTION herald.oldest_snapshot(min_age interval DEFAULT '0')
RETURNS TABLE (pid int, application_name text, state text, transaction_age interval)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF min_age IS NULL OR min_age < interval '0' THEN
        RAISE EXCEPTION 'min_age must be 0 or longer, got %', coalesce(min_age::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT a.pid, a.application_name, a.state, clock_timestamp() - a.xact_start
      FROM pg_stat_activity a
     WHERE a.datname = current_database() AND a.backend_type = 'client backend'
       AND a.backend_xmin IS NOT NULL AND a.pid <> pg_backend_pid()
       AND a.xact_start <= clock_timestamp() - min_age
     ORDER BY age(a.backend_xmin) DESC, a.xact_start
     LIMIT 1;
END
$$;

-- Expired leases go back to pending (their attempt stays counted: a job whose worker keeps dying ends dead).
CREATE FUNCTION herald.reap() RETURNS int
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

-- Dead jobs back to pending, attempts reset. Any id that is not a dead job is an error; nothing changes.
CREATE FUNCTION herald.redrive(ids bigint[]) RETURNS int
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

CREATE VIEW herald.dead_letters AS
SELECT o.workspace_id, o.id, o.kind, o.dedupe_key, o.attempt, o.last_error, o.automation_id, o.enrollment_id,
       o.node, o.updated_at AS died_at
  FROM herald.outbox o WHERE o.status = 'dead';

CREATE VIEW herald.queue_status AS
SELECT o.workspace_id, o.kind, o.status, count(*) AS jobs,
       max(now() - o.created_at) FILTER (WHERE o.status = 'pending') AS oldest_pending_age,
       min(o.run_at) FILTER (WHERE o.status = 'pending') AS next_run_at
  FROM herald.outbox o
 GROUP BY o.workspace_id, o.kind, o.status;

-- Transactional email (priority 0: claimed before automation and broadcast mail). The contact is created
-- when the email is unknown. dedupe_key makes a retry of the caller's own request a no-op; by default
-- every call is a new message. Returns the outbox id (of the existing job when the key was seen before).
CREATE FUNCTION herald.send(workspace text, email text, template text, context jsonb DEFAULT '{}',
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
    -- first: holds the template against a concurrent delete (see there)
    PERFORM herald._refuse_archived(workspace, 'send', ARRAY[template]);
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
    -- herald's own jobs share the outbox's dedupe index, so an application's key equal to one of
    -- theirs would take its place: the automation step's, decide question's or result delivery's job
    -- never made, its enrollment or result subscription stuck behind it (b:, broadcasts' keys, which
    -- have an index of their own: so that dedupe_key stays unique over all rows, schema.sql)
    IF v_key = '' OR v_key ~ '^(b:|results:|decide:|a[0-9]+:e[0-9]+:)' THEN
        RAISE EXCEPTION 'dedupe_key % is not allowed', quote_literal(v_key) USING ERRCODE = 'invalid_parameter_value',
            DETAIL = 'Keys beginning with b:, results:, decide: or a<number>:e<number>: are herald''s own (broadcast messages, result deliveries, decide questions, automation steps).',
            HINT = 'Use a non-empty key of your own, e.g. ''order-42''.';
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

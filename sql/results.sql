-- herald: the results stream (issue 16 §2): what happened, per workspace, for apps to follow.
--
-- Kinds, who writes them, and their data:
--   email.sent / email.failed      complete(): an email job sent, or failed for good (failed) or out of
--                                  attempts (dead). data: message_id, node, variation | status, error,
--                                  node, variation, attempt
--   email.bounced / email.opened / email.clicked
--                                  record_feedback(). data: message_id, url, bounce_type, and the report's payload
--   webhook.answered / decide.answered
--                                  complete(), a journey's webhook or decide job that finished. data:
--                                  status ok, reply (the stored reply), node, and for a decide next (the
--                                  path the reply chose) | status failed or dead, error, node, attempt
--   enrollment.completed / enrollment.exited / enrollment.failed
--                                  tick, complete, claim (recipient suppressed), exit_enrollment, archiving an
--                                  automation, update_automation's exits. data: node, reason, context (its last)
--   approval.requested             tick, when an enrollment parks on an approval node. data: node, context
--   approval.decided               decide_approval(). data: node, approved, actor, next
--   broadcast.started / broadcast.winner / broadcast.sent
--                                  advance_broadcasts(). data: name, and send_at (started) | winner,
--                                  reason (winner) | enqueued (sent)
--   broadcast.auto_paused          advance_broadcasts(), a sending broadcast its definition's auto_pause
--                                  stopped. data: name, reason (complaint_percent | bounce_percent),
--                                  percent, limit, min_sent, sent, bounced, complained, since_resume
-- Every result carries its workspace, kind, time (`at`, when the statement that made it true ran) and
-- the subjects it has (contact_id, automation_id, enrollment_id, broadcast_id, job_id).
--
-- Written by the statement that makes the result true: a data-modifying CTE beside the rows it
-- describes (complete, tick, claim, record_feedback, update_automation, archiving, advance_broadcasts),
-- or an INSERT beside the UPDATE in the single-row API functions (decide_approval, exit_enrollment).
-- Set-based, no extra round trip, no per-row code.
--
-- Order and cursor. A reader keeps the id of the last result it read and asks for the ones after it,
-- so no result may become visible later with a smaller id than one already seen. Identity values are
-- drawn before commit: if writers drew the ids, a transaction that drew 5 and commits after one that
-- drew 6 would be skipped by a reader that read 6 in between. Reading only up to the oldest running
-- transaction (pg_snapshot_xmin of the reader's snapshot, with an xid8 column) does not mend it by
-- itself: a transaction can have an older xid than another yet draw a later id, so the stream would
-- have to be ordered by (xid, id) and the cursor become a pair; and any transaction left open anywhere
-- in the cluster (an idle session, a long report, pg_dump) would hold back every workspace's stream,
-- which a tenant holding a transaction open could do to all the others (see "Tenants").
-- So writers do not number results: they append them to herald.results_staged, and
-- herald.advance_results() moves staged rows into herald.results, where the id is drawn. One mover at
-- a time (a transaction-level advisory lock, kept until its commit): a move draws its ids after the
-- previous move committed and makes them visible all at once when it commits, so ids become visible
-- in increasing order. A staged row committed after a move took its snapshot is moved by the next
-- one, above every id handed out so far. An open transaction holds back only its own results.
-- Readers read a plain index range (also on a standby). Results are readable once the next
-- advance_results() has run: every tick() ends with one (so any daemon that ticks keeps the stream
-- moving), and the daemon may call it more often for less delay. Cost: a result is written twice
-- (staged, then published); the staging heap has no index, so the statements that make results pay
-- one heap row each plus building the data.
--
-- Deliveries. herald.subscribe_results(ws, url, kinds, options) registers a URL; advance_results()
-- queues, for every subscription whose previous delivery is done, the next results after its cursor
-- (at most options.batch, about 1 MiB) as ONE ordinary webhook job (kind 'webhook', POST, signed and
-- retried by the daemon like every webhook, dedupe key results:<subscription>:<last result id>) and
-- moves its cursor, in one statement for all subscriptions. At most one delivery per subscription is
-- ever unfinished, so a subscriber receives its results in order, each once (the same job is retried
-- with the same Idempotency-Key); one that answers 500 for a while gets everything afterwards, since
-- the next batch waits for the retried one. A delivery that fails for good or runs out of attempts
-- (options.max_attempts, default 20: about 11 hours) holds its subscription up until it is redriven
-- (herald.redrive / herald.retry_failed), so nothing is skipped; result_subscription_overview says so.
-- Pruning (herald.prune, results_older_than) bounds how long results wait for a subscriber.

-- Every kind a result can have (read_results and subscribe_results check names against it).
CREATE FUNCTION herald._result_kinds() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY['email.sent', 'email.failed', 'email.bounced', 'email.opened', 'email.clicked',
             'webhook.answered', 'decide.answered',
             'enrollment.completed', 'enrollment.exited', 'enrollment.failed',
             'approval.requested', 'approval.decided',
             'broadcast.started', 'broadcast.winner', 'broadcast.sent', 'broadcast.auto_paused'];

-- The data of an enrollment.completed / exited / failed result: the node it ended at, why, and its
-- context (what its webhooks and decides answered, what woke it). One shape for every statement that
-- ends enrollments. Built with jsonb_object and jsonb_set, the same value as jsonb_build_object('node',
-- node, 'reason', reason, 'context', context): jsonb_build_object looks up each of its six arguments'
-- types in the catalog cache on every call, ~12,000 instructions a row, 5% of a tick that ends every
-- enrollment it moves (callgrind); this way it is a third of that.
CREATE FUNCTION herald._ended_data(node text, reason text, context jsonb) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE   -- STABLE like jsonb_build_object(); a stricter label would block inlining
RETURN jsonb_set(jsonb_object(ARRAY['node', 'reason'], ARRAY[node, reason]), '{context}', coalesce(context, 'null'));

-- A result as JSON, the shape deliveries carry (and the names the daemon's stream uses): id, kind, at,
-- the subjects it has, data.
CREATE FUNCTION herald._result_json(r herald.results) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
RETURN jsonb_build_object('id', r.id, 'kind', r.kind, 'at', r.at)
       || jsonb_strip_nulls(jsonb_build_object('contact_id', r.contact_id, 'automation_id', r.automation_id,
                                               'enrollment_id', r.enrollment_id, 'broadcast_id', r.broadcast_id,
                                               'job_id', r.job_id))
       || jsonb_build_object('data', r.data);

-- Raises unless `kinds` is NULL (every kind) or names known kinds only.
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

-- A workspace's results after `after`, in id order, at most `lim`, of the given kinds (NULL: every
-- kind). With kinds, each kind is read from its own range of results_kind_idx and the ranges are
-- merged, so a rare kind among many others costs its own rows only. Inlined where it is called.
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

-- Reads a workspace's results: those after `after` (a result id; 0 reads from the oldest kept), in id
-- order, at most `max` (1 to 10000), of the given kinds (NULL: every kind). Pass the last id read as
-- the next call's `after`: nothing is skipped or read twice (see "Order and cursor" above). Results
-- are there once herald.advance_results() has published them.
-- herald_app (its own workspaces), herald_worker (the daemon's stream endpoint), herald_admin.
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

-- The id of the newest result published in the workspace (0 when there is none): where a reader that
-- wants only what happens from now on starts (GET /stream without a cursor; subscribe_results'
-- default). herald_app (its own workspaces), herald_worker (the daemon's stream endpoint), herald_admin.
CREATE FUNCTION herald.newest_result(workspace text) RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    PERFORM herald._require_workspace(workspace);
    RETURN coalesce((SELECT max(r.id) FROM herald.results r WHERE r.workspace_id = newest_result.workspace), 0);
END
$$;

-- Subscribes `url` to the workspace's results of the given kinds (NULL: every kind); returns the
-- subscription's id. options: {"batch": results per delivery (1-1000, default 100), "max_attempts":
-- per delivery (1-100, default 20), "timeout_ms": per request (default 10000), "after": the result id
-- to start after (default: the newest published now, so only what happens from now on; 0: every
-- result still kept)}. The URL follows the rules of a webhook node's (http or https, a host, no
-- credentials); the daemon's address policy applies when it is called. At most 100 per workspace
-- (the database setting herald.max_result_subscriptions). herald_app (its own workspaces) and
-- herald_admin.
CREATE FUNCTION herald.subscribe_results(workspace text, url text, kinds text[], options jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_options jsonb;
    v_id bigint;
    v_setting text := nullif(btrim(current_setting('herald.max_result_subscriptions', true)), '');
    v_max int;
BEGIN
    PERFORM herald._require_workspace(workspace);
    PERFORM herald._check_result_kinds(kinds);
    v_options := herald._check_subscription(url, options);
    -- a workspace's subscriptions are bounded: every advance_results round looks at each one, so one
    -- tenant (or a leaked key with the results scope) must not make that round slow for all
    IF v_setting IS NOT NULL AND v_setting !~ '^[0-9]{1,9}$' THEN
        RAISE EXCEPTION 'setting herald.max_result_subscriptions must be a whole number, got %', quote_literal(v_setting)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Fix it with ALTER DATABASE … SET herald.max_result_subscriptions = 100, or RESET it.';
    END IF;
    v_max := coalesce(v_setting::int, 100);
    -- two subscribing at once count one after the other
    PERFORM pg_advisory_xact_lock(hashtext('herald.subscribe_results'), hashtext(workspace));
    IF (SELECT count(*) FROM herald.result_subscriptions s WHERE s.workspace_id = subscribe_results.workspace) >= v_max THEN
        RAISE EXCEPTION 'workspace % has % result subscriptions, the most allowed', quote_literal(workspace), v_max
            USING ERRCODE = 'check_violation',
                  HINT = 'End one (herald.unsubscribe_results, DELETE /v1/results/subscriptions/<id>), or raise the database setting herald.max_result_subscriptions.';
    END IF;
    INSERT INTO herald.result_subscriptions (workspace_id, url, kinds, options, cursor, created_by)
    VALUES (workspace, url, (SELECT array_agg(DISTINCT k ORDER BY k) FROM unnest(kinds) k), v_options - 'after' - 'url',
            coalesce((v_options ->> 'after')::bigint, herald.newest_result(workspace)),
            herald._caller())
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

-- Ends a subscription; returns whether it existed. Its delivery not yet handed to the daemon is
-- cancelled (one already handed out still arrives). herald_app (its own workspaces) and herald_admin.
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

-- Publishes staged results and queues subscriptions' deliveries; returns the results published (at
-- most max_rows; the daemon calls again at once while it gets max_rows). ONE caller at a time does the
-- work: the others return 0 at once (a transaction-level advisory lock, kept until the caller
-- commits; call it in a transaction of its own). Two statements, whatever the number of results and
-- subscriptions:
--   1. publish: the oldest staged results, moved to herald.results in staging order, where they get
--      their ids (see "Order and cursor" above);
--   2. deliver: for every subscription whose last delivery is done (or that has none) and that has
--      results after its cursor, one webhook job with the next of them, and its cursor moved past
--      them. (This statement's snapshot is taken after the lock: it sees what the caller before did.)
-- herald_worker (the daemon's maintenance) and herald_admin.
CREATE FUNCTION herald.advance_results(max_rows int DEFAULT 10000) RETURNS int
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

-- Every result subscription with where its delivery stands:
--   state  idle (nothing in flight), delivering (its last batch is queued or being sent, retries
--          included: attempts, next_attempt_at), blocked (its last batch failed for good or ran out of
--          attempts: redrive job_id to resume; last_error says why)
CREATE VIEW herald.result_subscription_overview AS
SELECT s.workspace_id, s.id, s.url, s.kinds, s.options, s.cursor, s.queued,
       CASE WHEN o.status IS NULL OR o.status = 'done' THEN 'idle'
            WHEN o.status IN ('pending', 'leased', 'held') THEN 'delivering'
            ELSE 'blocked' END AS state,
       s.job_id, o.status AS job_status, o.attempt AS attempts,
       CASE WHEN o.status = 'pending' THEN o.run_at END AS next_attempt_at, o.last_error,
       s.created_by, s.created_at, s.updated_at
  FROM herald.result_subscriptions s
  LEFT JOIN herald.outbox o ON o.workspace_id = s.workspace_id AND o.id = s.job_id;

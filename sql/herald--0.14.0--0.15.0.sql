-- herald 0.14.0 -> 0.15.0
--   Release 0.14.0 is the SQL that landed on 2026-12-07 (commit f87cd62), kept in
--   sql/releases/herald--0.14.0.sql. Everything since, one marked block per change:
--   Functions replaced here lose SECURITY DEFINER (CREATE OR REPLACE resets it): it is set again at
--   the end of each block.

-- ==== auto_pause: a broadcast stops by itself when its bounces or complaints pass a line ====
-- The definition's auto_pause {bounce_percent, complaint_percent, min_sent} (validated by
-- herald._check_broadcast, Rust) is checked by advance_broadcasts on every sending broadcast: once
-- min_sent messages are sent and hard bounces or complaints reach their percent, it is paused as
-- pause_broadcast pauses it, with why in broadcasts.auto_paused, broadcast_overview and a
-- broadcast.auto_paused result (the kind was reserved). record_feedback counts a broadcast message's
-- first hard bounce or complaint in broadcast_stats (bounced, complained), marking the message in
-- message_history.reported so a repeated report counts once. resume_broadcast of an auto-paused one
-- counts from then on (auto_pause_base). Definitions stored before have no auto_pause: never paused.
ALTER TABLE herald.broadcasts ADD COLUMN auto_paused jsonb, ADD COLUMN auto_pause_base jsonb;
ALTER TABLE herald.message_history ADD COLUMN reported text;

CREATE FUNCTION herald._report_counts(workspace text, broadcast bigint) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, herald, pg_temp
BEGIN ATOMIC
    SELECT jsonb_build_object('sent', coalesce(sum(x.n) FILTER (WHERE x.metric = 'sent'), 0),
                              'bounced', coalesce(sum(x.n) FILTER (WHERE x.metric = 'bounced'), 0),
                              'complained', coalesce(sum(x.n) FILTER (WHERE x.metric = 'complained'), 0))
      FROM (SELECT s.metric, s.value AS n FROM herald.broadcast_stats s
             WHERE s.workspace_id = _report_counts.workspace AND s.broadcast_id = _report_counts.broadcast
               AND s.metric IN ('sent', 'bounced', 'complained')
            UNION ALL
            SELECT d.metric, d.n FROM herald.broadcast_stats_delta d
             WHERE d.workspace_id = _report_counts.workspace AND d.broadcast_id = _report_counts.broadcast
               AND d.metric IN ('sent', 'bounced', 'complained')) x;
END;
REVOKE ALL ON FUNCTION herald._report_counts(text, bigint) FROM PUBLIC;

CREATE FUNCTION herald._auto_pause_verdict(v herald.broadcasts) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_rule jsonb := v.definition -> 'auto_pause';
    v_now jsonb := herald._report_counts(v.workspace_id, v.id);
    v_sent bigint := (v_now ->> 'sent')::bigint - coalesce((v.auto_pause_base ->> 'sent')::bigint, 0);
    v_bounced bigint := (v_now ->> 'bounced')::bigint - coalesce((v.auto_pause_base ->> 'bounced')::bigint, 0);
    v_complained bigint := (v_now ->> 'complained')::bigint - coalesce((v.auto_pause_base ->> 'complained')::bigint, 0);
    v_reason text;
    v_n bigint;
BEGIN
    IF v_sent < (v_rule ->> 'min_sent')::bigint THEN
        RETURN NULL;
    END IF;
    IF v_complained * 100 >= (v_rule ->> 'complaint_percent')::numeric * v_sent THEN
        v_reason := 'complaint_percent';
        v_n := v_complained;
    ELSIF v_bounced * 100 >= (v_rule ->> 'bounce_percent')::numeric * v_sent THEN
        v_reason := 'bounce_percent';
        v_n := v_bounced;
    ELSE
        RETURN NULL;
    END IF;
    IF v.phase = 'done' AND NOT EXISTS (SELECT 1 FROM herald.outbox o WHERE o.broadcast_id = v.id AND o.status = 'pending') THEN
        RETURN NULL;
    END IF;
    RETURN jsonb_build_object('name', v.name, 'reason', v_reason, 'percent', round(v_n * 100.0 / v_sent, 2),
                              'limit', (v_rule ->> v_reason)::numeric, 'min_sent', (v_rule ->> 'min_sent')::bigint,
                              'sent', v_sent, 'bounced', v_bounced, 'complained', v_complained,
                              'since_resume', v.auto_pause_base IS NOT NULL);
END
$$;
REVOKE ALL ON FUNCTION herald._auto_pause_verdict(herald.broadcasts) FROM PUBLIC;

CREATE OR REPLACE FUNCTION herald._advance_broadcast(v herald.broadcasts, budget int, recheck boolean) RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_left int := budget;
    v_read int;
    v_chunk constant int := herald._chunk_size();
    v_win record;
    v_pause jsonb;
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
    -- the automatic pause: stopped as pause_broadcast stops it (claim holds its jobs from the commit on,
    -- the first chunk is settled now), with why in auto_paused and in the results stream
    IF v.status = 'sending' AND v.definition -> 'auto_pause' <> 'null' THEN
        v_pause := herald._auto_pause_verdict(v);
        IF v_pause IS NOT NULL THEN
            WITH paused AS (
                UPDATE herald.broadcasts b
                   SET status = 'paused', paused_from = 'sending', settle_cursor = 0, auto_paused = v_pause,
                       updated_at = now()
                 WHERE b.workspace_id = v.workspace_id AND b.id = v.id
                RETURNING b.workspace_id, b.id
            )
            INSERT INTO herald.results_staged (workspace_id, kind, broadcast_id, data)   -- the results stream
            SELECT p.workspace_id, 'broadcast.auto_paused', p.id, v_pause FROM paused p;
            SELECT b.* INTO v FROM herald.broadcasts b WHERE b.workspace_id = v.workspace_id AND b.id = v.id;
            IF v_left > 0 THEN   -- (a chunk of 0 would read as the last one)
                v_left := v_left - herald._settle_chunk(v, least(v_chunk, v_left));
            END IF;
            RETURN budget - v_left;
        END IF;
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
    -- with the next advances. Resumed from an automatic pause: the person who resumed it has seen the
    -- rates, so the next check counts only the messages sent (and reported) from now on.
    UPDATE herald.broadcasts b SET status = v.paused_from, paused_from = NULL, settle_cursor = NULL, updated_at = now(),
           auto_paused = NULL,
           auto_pause_base = CASE WHEN v.auto_paused IS NOT NULL THEN herald._report_counts(v.workspace_id, v.id)
                                  ELSE v.auto_pause_base END
     WHERE b.workspace_id = v.workspace_id AND b.id = v.id;
    PERFORM herald._release_held(v.id, herald._chunk_size());
    PERFORM pg_notify('herald.outbox', '');
    PERFORM pg_notify('herald.tick', '');
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
               coalesce(t.f ->> 'workspace', m.workspace_id, bw.workspace_id) AS workspace_id,
               herald._normalize_email(coalesce(t.f ->> 'email', c.email)) AS email, t.ord, t.f AS entry,
               m.contact_id, m.automation_id, m.enrollment_id, m.broadcast_id, m.job_id, m.variation,
               -- the broadcast an open or click names in its payload (read when its message does not say)
               CASE WHEN t.f ->> 'kind' IN ('opened', 'clicked') AND m.broadcast_id IS NULL
                    THEN t.f -> 'payload' ->> 'broadcast' END AS named_broadcast,
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
                                    (array_agg(h.outbox_id ORDER BY h.id DESC))[1] AS job_id,
                                    (array_agg(h.variation ORDER BY h.id DESC))[1] AS variation
                               FROM herald.message_history h
                              WHERE t.f ->> 'message_id' IS NOT NULL AND h.message_id = t.f ->> 'message_id'
                                AND (t.f ->> 'workspace' IS NULL OR h.workspace_id = t.f ->> 'workspace')
                                AND (only_workspace IS NULL OR h.workspace_id = only_workspace)
                             HAVING count(DISTINCT h.workspace_id) = 1) m ON true
          LEFT JOIN LATERAL (SELECT x.email FROM herald.contacts x
                              WHERE x.workspace_id = m.workspace_id AND x.id = m.contact_id LIMIT 1) c ON true
          -- an open or click that names neither a workspace nor a known message: the workspace of the
          -- broadcast its payload names
          LEFT JOIN LATERAL (SELECT x.workspace_id FROM herald.broadcasts x
                              WHERE t.f ->> 'workspace' IS NULL AND m.workspace_id IS NULL
                                AND t.f ->> 'kind' IN ('opened', 'clicked')
                                AND x.id = CASE WHEN t.f -> 'payload' ->> 'broadcast' ~ '^[0-9]{1,18}$'
                                                THEN (t.f -> 'payload' ->> 'broadcast')::bigint END) bw ON true
    ), known AS (
        SELECT i.*,
               CASE WHEN i.named_broadcast ~ '^[0-9]{1,18}$' THEN i.named_broadcast::bigint END AS named_id
          FROM input i
         WHERE i.email IS NOT NULL AND herald._valid_email(i.email)
           AND (only_workspace IS NULL OR i.workspace_id = only_workspace)
           AND EXISTS (SELECT 1 FROM herald.workspaces w WHERE w.id = i.workspace_id)
    ), attributed AS (
        -- opens and clicks: the broadcast and variation they count for, or why they cannot count
        SELECT k.*, b.id AS named_found, j.job_id AS named_job, j.variation AS named_variation,
               CASE WHEN k.named_broadcast IS NULL THEN NULL
                    WHEN k.named_id IS NULL THEN
                        format('payload.broadcast must be a broadcast id (a whole number), got %s', k.entry -> 'payload' -> 'broadcast')
                    WHEN b.id IS NULL THEN
                        format('broadcast %s does not exist in workspace %s', k.named_id, quote_literal(k.workspace_id))
                    WHEN j.variation IS NULL THEN
                        format('could not be attributed to a variation of broadcast %s: no message_id and no message of this broadcast to that address', k.named_id)
                    WHEN NOT j.sent THEN
                        format('could not be attributed to a variation of broadcast %s: its message to that address was not sent (%s)', k.named_id, j.status)
                    WHEN k.payload ->> 'variation' IS NOT NULL AND k.payload ->> 'variation' <> j.variation THEN
                        format('could not be attributed to a variation of broadcast %s: the report names variation %s, the message sent to that address was variation %s',
                               k.named_id, quote_literal(k.payload ->> 'variation'), quote_literal(j.variation))
               END AS refusal
          FROM known k
          LEFT JOIN LATERAL (SELECT x.id FROM herald.broadcasts x
                              WHERE x.workspace_id = k.workspace_id AND x.id = k.named_id) b ON true
          -- the contact's job of that broadcast (one per contact), or, once pruned, its history
          LEFT JOIN LATERAL (SELECT coalesce(o.id, h.outbox_id) AS job_id, coalesce(o.variation, h.variation) AS variation,
                                    -- leased: handed to a daemon, whose completion may not be recorded yet
                                    -- when the recipient already opens it
                                    coalesce(o.status IN ('done', 'leased'), h.status = 'sent') AS sent,
                                    coalesce(o.status, h.status) AS status
                               FROM herald.contacts ct
                               LEFT JOIN herald.outbox o ON o.broadcast_id = b.id AND o.contact_id = ct.id
                                                          AND o.workspace_id = ct.workspace_id
                               LEFT JOIN LATERAL (SELECT y.outbox_id, y.variation, y.status FROM herald.message_history y
                                                   WHERE o.id IS NULL AND y.workspace_id = ct.workspace_id
                                                     AND y.contact_id = ct.id AND y.broadcast_id = b.id
                                                   ORDER BY y.id DESC LIMIT 1) h ON true
                              WHERE b.id IS NOT NULL AND ct.email = k.email AND ct.workspace_id = k.workspace_id
                              LIMIT 1) j ON true
    ), fresh AS (
        -- an open or a click counts once per (message, kind, link) in 10 minutes: a replayed pixel or
        -- link (prefetchers, scanners, a hostile loop) adds no event and wakes no automation
        SELECT k.*,
               -- the broadcast and variation it counts for: its message's, else the named broadcast's job's
               CASE WHEN k.kind NOT IN ('opened', 'clicked') THEN k.event_payload
                    WHEN k.broadcast_id IS NOT NULL THEN
                        k.event_payload || jsonb_build_object('broadcast', k.broadcast_id, 'variation', k.variation)
                    WHEN k.named_job IS NOT NULL THEN
                        k.event_payload || jsonb_build_object('broadcast', k.named_id, 'variation', k.named_variation)
                    ELSE k.event_payload END AS counted_payload
          FROM (SELECT k.*, row_number() OVER (PARTITION BY k.workspace_id, k.kind, k.message_id, k.payload ->> 'url'
                                                        ORDER BY k.ord) AS nth
                           FROM attributed k WHERE k.refusal IS NULL) k
         WHERE k.kind NOT IN ('opened', 'clicked') OR k.message_id IS NULL
            OR (k.nth = 1 AND NOT EXISTS (
                   SELECT 1 FROM herald.events e
                    WHERE e.workspace_id = k.workspace_id AND (e.payload ->> 'message_id') = k.message_id
                      AND e.kind IN ('email.opened', 'email.clicked') AND e.kind = 'email.' || k.kind
                      AND (e.payload ->> 'url') IS NOT DISTINCT FROM (k.payload ->> 'url')
                      AND e.created_at > now() - interval '10 minutes'))
    ), refused AS (
        INSERT INTO herald.feedback_rejections (workspace_id, batch, position, input, reason, broadcast_id)
        SELECT a.workspace_id, txid_current(), (a.ord - 1)::int, a.entry, a.refusal, a.named_found
          FROM attributed a WHERE a.refusal IS NOT NULL
        ON CONFLICT (workspace_id, batch, position) DO UPDATE
           SET input = EXCLUDED.input, reason = EXCLUDED.reason, broadcast_id = EXCLUDED.broadcast_id
        RETURNING 1
    ), unattributed AS (
        -- the broadcast's count of reports that could not count for a variation
        INSERT INTO herald.broadcast_stats_delta (workspace_id, broadcast_id, variation, metric, n)
        SELECT a.workspace_id, a.named_found, '', a.kind || '_unattributed', count(*)
          FROM attributed a WHERE a.refusal IS NOT NULL AND a.named_found IS NOT NULL
         GROUP BY a.workspace_id, a.named_found, a.kind
    ), suppressed AS (
        INSERT INTO herald.suppressions (workspace_id, email, reason, detail)
        SELECT DISTINCT ON (k.workspace_id, k.email) k.workspace_id, k.email,
               CASE k.kind WHEN 'unsubscribed' THEN 'unsubscribed' WHEN 'hard_bounce' THEN 'hard_bounce' ELSE 'complaint' END,
               jsonb_strip_nulls(k.payload || jsonb_build_object('message_id', k.message_id))
          FROM known k WHERE k.kind IN ('unsubscribed', 'hard_bounce', 'complaint')
         ORDER BY k.workspace_id, k.email, k.ord
        ON CONFLICT ON CONSTRAINT suppressions_pkey DO NOTHING
        RETURNING 1
    ), to_count AS MATERIALIZED (
        -- a broadcast message's first hard bounce or complaint counts for its broadcast and variation
        -- (the rates auto_pause reads); a provider's repeat finds the message marked. Locked in id order,
        -- so two batches reporting the same messages wait for each other instead of deadlocking.
        SELECT h.workspace_id, h.id, r.kind
          FROM (SELECT DISTINCT ON (k.workspace_id, k.message_id) k.workspace_id, k.message_id, k.kind
                  FROM known k
                 WHERE k.kind IN ('hard_bounce', 'complaint') AND k.broadcast_id IS NOT NULL
                 ORDER BY k.workspace_id, k.message_id, k.ord) r
          JOIN herald.message_history h ON h.message_id = r.message_id AND h.workspace_id = r.workspace_id
         WHERE h.broadcast_id IS NOT NULL AND h.status = 'sent' AND h.reported IS NULL
         ORDER BY h.workspace_id, h.id
           FOR UPDATE OF h
    ), marked AS (
        UPDATE herald.message_history h SET reported = t.kind
          FROM to_count t
         WHERE h.workspace_id = t.workspace_id AND h.id = t.id
        RETURNING h.workspace_id, h.broadcast_id, h.variation, h.reported
    ), report_counted AS (
        INSERT INTO herald.broadcast_stats_delta (workspace_id, broadcast_id, variation, metric, n)
        SELECT m.workspace_id, m.broadcast_id, coalesce(m.variation, ''),
               CASE m.reported WHEN 'hard_bounce' THEN 'bounced' ELSE 'complained' END, count(*)
          FROM marked m GROUP BY 1, 2, 3, 4
    ), recorded AS (
        INSERT INTO herald.events (workspace_id, email, kind, payload)
        SELECT k.workspace_id, k.email, k.event_kind, k.counted_payload
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
               k.automation_id, k.enrollment_id, coalesce(k.broadcast_id, k.named_id), coalesce(k.job_id, k.named_job),
               k.counted_payload
          FROM fresh k
         WHERE k.event_kind IN ('email.bounced', 'email.opened', 'email.clicked')
         ORDER BY k.ord
    )
    SELECT count(*) INTO v_n FROM recorded;
    RETURN v_n;
END
$$;

CREATE OR REPLACE VIEW herald.broadcast_overview AS
SELECT b.workspace_id, b.id, b.name, b.status, b.phase, b.send_at, b.enqueued, b.winner, b.winner_reason,
       b.retry_of, b.last_error, b.created_at, b.finished_at, b.auto_paused
  FROM herald.broadcasts b
 WHERE NOT EXISTS (SELECT 1 FROM herald.archived a
                    WHERE a.workspace_id = b.workspace_id AND a.kind = 'broadcast' AND a.name = b.id::text);

ALTER VIEW herald.broadcast_overview SET (security_invoker = true);   -- CREATE OR REPLACE VIEW resets it
ALTER FUNCTION herald.resume_broadcast(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.record_feedback(jsonb, text) SECURITY DEFINER;

-- ==== admin_signouts: signing out of the operator's page ends the session everywhere ====
-- A session of the page is a signed cookie every daemon checks by itself; "Sign out" only removed it
-- from the browser, so a copy kept working for 12 hours, and ending every session took a new password.
-- The page now asks herald.admin_session_ok in every request's transaction; "Sign out" and "Sign out
-- everyone" write herald.admin_sign_out. (sql/admin_sessions.sql)
CREATE TABLE herald.admin_signouts (
    -- a session's nonce (32 hex digits), or '*': every session issued before signed_out_at
    session       text PRIMARY KEY CHECK (session ~ '^([0-9a-f]{32}|[*])$'),
    operator      text NOT NULL CHECK (length(operator) BETWEEN 1 AND 64),   -- who signed out
    expires_at    timestamptz NOT NULL,   -- when the session(s) would have ended anyway: the row goes then
    signed_out_at timestamptz NOT NULL DEFAULT now()
);
-- kept by pg_dump: a restored database must not bring signed-out sessions back
SELECT pg_catalog.pg_extension_config_dump('herald.admin_signouts', '');

-- Whether the page's session with this nonce, issued at `issued_at` (by the daemon's clock, to the
-- millisecond), is still signed in as far as the database knows: not signed out itself, and issued
-- after the last "sign out everyone" (by the database's clock: a daemon whose clock is behind may
-- need a second sign-in just after one).
-- Who may call it: herald_admin (the page's role) and herald_worker (the page on the daemon's pool).
CREATE FUNCTION herald.admin_session_ok(session text, issued_at timestamptz) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, herald, pg_temp
BEGIN ATOMIC
    SELECT NOT EXISTS (SELECT 1 FROM herald.admin_signouts s WHERE s.session = admin_session_ok.session)
       AND NOT EXISTS (SELECT 1 FROM herald.admin_signouts s
                        WHERE s.session = '*' AND admin_session_ok.issued_at <= s.signed_out_at);
END;

-- Signs out the session with this nonce or, with `everyone`, every session issued until now; either
-- way the row is kept until `expires_at` (the session's expiry; for everyone, now + a session's
-- life), and sign-outs past theirs are forgotten here. Who may call it: as admin_session_ok.
CREATE FUNCTION herald.admin_sign_out(session text, operator text, expires_at timestamptz,
                                      everyone boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF session IS NULL OR session !~ '^[0-9a-f]{32}$' THEN
        RAISE EXCEPTION 'session must be a session nonce (32 hex digits)' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF operator IS NULL OR length(operator) NOT BETWEEN 1 AND 64 THEN
        RAISE EXCEPTION 'operator must be a name of 1 to 64 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF expires_at IS NULL OR expires_at > now() + interval '7 days' THEN
        RAISE EXCEPTION 'expires_at must be when the session ends, at most 7 days from now, got %',
                        coalesce(expires_at::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM herald.admin_signouts s WHERE s.expires_at < now();
    INSERT INTO herald.admin_signouts AS s (session, operator, expires_at)
    VALUES (CASE WHEN coalesce(everyone, false) THEN '*' ELSE admin_sign_out.session END,
            admin_sign_out.operator, admin_sign_out.expires_at)
    ON CONFLICT ON CONSTRAINT admin_signouts_pkey DO UPDATE
       SET operator = EXCLUDED.operator, signed_out_at = now(),
           expires_at = greatest(s.expires_at, EXCLUDED.expires_at);
END
$$;
REVOKE ALL ON FUNCTION herald.admin_session_ok(text, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION herald.admin_sign_out(text, text, timestamptz, boolean) FROM PUBLIC;
ALTER FUNCTION herald.admin_session_ok(text, timestamptz) SECURITY DEFINER;
ALTER FUNCTION herald.admin_sign_out(text, text, timestamptz, boolean) SECURITY DEFINER;
GRANT EXECUTE ON FUNCTION
    herald.admin_session_ok(text, timestamptz), herald.admin_sign_out(text, text, timestamptz, boolean)
TO herald_worker, herald_admin;
ALTER TABLE herald.admin_signouts ENABLE ROW LEVEL SECURITY;

-- ==== default_auto_pause: the installation's auto_pause for broadcasts that do not say one ====
-- The database setting herald.broadcast_auto_pause (ALTER DATABASE … SET herald.broadcast_auto_pause =
-- '{"bounce_percent": 5, "complaint_percent": 0.1}') is copied into a new broadcast's definition when
-- it does not name auto_pause ("auto_pause": null: none). A bad setting fails create_broadcast naming it.
CREATE FUNCTION herald._with_default_auto_pause(definition jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_value text := nullif(btrim(current_setting('herald.broadcast_auto_pause', true)), '');
    v_rule jsonb;
    v_why text;
BEGIN
    IF v_value IS NULL OR jsonb_typeof(definition) IS DISTINCT FROM 'object' OR definition ? 'auto_pause' THEN
        RETURN definition;
    END IF;
    BEGIN
        v_rule := v_value::jsonb;
        PERFORM herald._check_broadcast(jsonb_build_object('name', 'n', 'template', 't', 'audience', 'all',
                                                           'auto_pause', v_rule));
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS v_why = MESSAGE_TEXT;
        RAISE EXCEPTION 'setting herald.broadcast_auto_pause must be an auto_pause object such as {"bounce_percent": 5, "complaint_percent": 0.1}, got %: %',
                        quote_literal(v_value), v_why
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Fix it with ALTER DATABASE … SET herald.broadcast_auto_pause = ''…'', or RESET it.';
    END;
    RETURN definition || jsonb_build_object('auto_pause', v_rule);
END
$$;
REVOKE ALL ON FUNCTION herald._with_default_auto_pause(jsonb) FROM PUBLIC;

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
    v_def := herald._check_broadcast(herald._with_default_auto_pause(definition));
    PERFORM herald._refuse_archived(workspace, 'create_broadcast',
                                    ARRAY(SELECT x ->> 'template' FROM jsonb_array_elements(v_def -> 'variations') x),
                                    ARRAY(SELECT jsonb_array_elements_text(v_def -> 'lists')));
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

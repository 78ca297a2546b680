-- herald 0.7.0 -> 0.8.0
--   Release 0.7.0 is the SQL that landed on 2026-12-06 (commit 28b72db), kept in
--   sql/releases/herald--0.7.0.sql. Everything since, one marked block per change:
--   Functions replaced here lose SECURITY DEFINER (CREATE OR REPLACE resets it): it is set again at
--   the end of each block.

-- ==== mailbox: _valid_email and _valid_mailbox are the Rust rule (extension/src/mailbox.rs), not regular expressions ====
-- The same answers as 0.7.0's expressions but for addresses holding a Unicode space, now refused (the
-- expressions' [:space:] followed the database's locale; Rust's whitespace is Unicode's), in a third to a
-- ninth of the time (tests/perf/valid_email_ab.py). Same names, arguments and volatility: the functions
-- that call them keep calling them.
CREATE OR REPLACE FUNCTION herald._valid_email(email text) RETURNS boolean
IMMUTABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_valid_email_wrapper';
CREATE OR REPLACE FUNCTION herald._valid_mailbox(mailbox text) RETURNS boolean
IMMUTABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_valid_mailbox_wrapper';

-- ==== retention: prune takes events_older_than and history_older_than (or the database's settings herald.prune_events_older_than / herald.prune_history_older_than); events, message_history and outbox get BRIN indexes on created_at; cancelled jobs are pruned like done and failed ones ====
-- New arguments, so a new function: prune('30 days') and prune('30 days', '7 days') work as before.
CREATE INDEX events_created_idx ON herald.events USING brin (created_at);
CREATE INDEX message_history_created_idx ON herald.message_history USING brin (created_at);
CREATE INDEX outbox_created_idx ON herald.outbox USING brin (created_at);
DROP FUNCTION herald.prune(interval, interval);
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
ALTER FUNCTION herald.prune(interval, interval, interval, interval) SECURITY DEFINER;
REVOKE ALL ON FUNCTION herald._setting_interval(text), herald.prune(interval, interval, interval, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION herald.prune(interval, interval, interval, interval) TO herald_worker, herald_admin;

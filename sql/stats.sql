-- herald: batched stats. Facts append rows to stats_delta in the transaction that makes them true;
-- flush_stats() folds them into stats; readers add both, so every number is exact at any moment.

-- Folds every delta (automations' and broadcasts') in ONE statement: DELETE … RETURNING takes each delta exactly once (a concurrent flush
-- waits on the rows and then skips them), grouped before the upsert so no stats row is touched twice.
CREATE FUNCTION herald.flush_stats() RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, herald, pg_temp
BEGIN ATOMIC
    WITH taken AS (
        DELETE FROM herald.stats_delta d RETURNING d.workspace_id, d.automation_id, d.node, d.metric, d.day, d.n
    ), folded AS (
        INSERT INTO herald.stats AS s (workspace_id, automation_id, node, metric, day, value)
        SELECT t.workspace_id, t.automation_id, t.node, t.metric, t.day, sum(t.n)
          FROM taken t GROUP BY 1, 2, 3, 4, 5
        ON CONFLICT (workspace_id, automation_id, node, metric, day) DO UPDATE SET value = s.value + EXCLUDED.value
        RETURNING 1
    ), taken_b AS (
        DELETE FROM herald.broadcast_stats_delta d RETURNING d.workspace_id, d.broadcast_id, d.variation, d.metric, d.n
    ), folded_b AS (
        INSERT INTO herald.broadcast_stats AS s (workspace_id, broadcast_id, variation, metric, value)
        SELECT t.workspace_id, t.broadcast_id, t.variation, t.metric, sum(t.n)
          FROM taken_b t GROUP BY 1, 2, 3, 4
        ON CONFLICT (workspace_id, broadcast_id, variation, metric) DO UPDATE SET value = s.value + EXCLUDED.value
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM taken) + (SELECT count(*) FROM taken_b);
END;

-- Per node and metric, per day: folded + not yet folded. node '' holds automation-level metrics
-- (enrolled, completed, failed, exited, goal).
CREATE FUNCTION herald.automation_stats_daily(automation bigint)
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

CREATE FUNCTION herald.automation_stats(automation bigint)
RETURNS TABLE (node text, metric text, value bigint)
LANGUAGE sql STABLE
SET search_path = pg_catalog, herald, pg_temp
BEGIN ATOMIC
    SELECT d.node, d.metric, sum(d.value)::bigint
      FROM herald.automation_stats_daily(automation) d
     GROUP BY d.node, d.metric
     ORDER BY d.node, d.metric;
END;

-- herald: versions of an automation, and changing a live journey (issue 15).
--
-- An automation's definition changes by making a new version of it (update_automation): same id, version
-- n+1, the history kept in herald.automation_versions (view herald.automation_history: who, when, note,
-- what changed, what the update did). herald.automations always holds the newest definition.
--
-- Where an enrollment is: its version is written as "version" in its `event` (the triggering event's
-- document, which tick, claim and the step engine read only through `event -> 'payload'`); none written
-- means version 1. Why not a column: 0.2.0 upgrades 0.1.0 in place and keeps every old row as it was
-- (tests/upgrade.sh compares the old tables' rows), and tick reads `event` anyway, so the version costs
-- tick nothing more than a key lookup. New enrollments (the dispatcher, enroll, enroll_segment) start on
-- the newest version, read in the same statement as its start node.
--
-- tick runs each enrollment on the definition of its own version: the batch's definitions are keyed
-- "<automation id>:<version>" and the per-backend definition cache by (automation, version), so pinned
-- and migrated enrollments of one automation share a batch without evicting each other.
--
-- An update pins everything in progress to the version it is on, unless options.migrate maps old node
-- ids to new ones ({"old": "new"} moves, {"old": null} exits); then every node holding contacts must be
-- mapped (else the update is refused naming the nodes and their contacts), the contacts are locked first
-- (a tick running them is waited for) and moved in the update's transaction. A contact waiting on a job,
-- an approval or an event keeps that wait: it may only move to a node of the same type (and, waiting on
-- a decide question, to one with the same field, paths and default: the question routes by them); its
-- email or webhook job is told the new node's next / on_error. Stats stay per (automation, node): a node
-- id kept across versions counts on; automation_version_stats counts enrollments per version.

-- The `event` keys that pin an enrollment to `version` (version 1 writes nothing). Inlinable.
CREATE FUNCTION herald._version_tag(version int) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE WHEN version > 1 THEN jsonb_build_object('version', version) ELSE '{}'::jsonb END;

-- The newest version of an automation and its start node (no row: an automation without version rows,
-- which runs as version 1).
CREATE FUNCTION herald._newest_version(workspace text, automation bigint)
RETURNS TABLE (version int, start_node text)
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT v.version, v.start_node FROM herald.automation_versions v
     WHERE v.workspace_id = _newest_version.workspace AND v.automation_id = _newest_version.automation
     ORDER BY v.version DESC
     LIMIT 1;
END;

-- The definition of one version (version 1 of an automation without version rows: its definition).
CREATE FUNCTION herald._version_definition(workspace text, automation bigint, version int) RETURNS jsonb
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce(
        (SELECT v.definition FROM herald.automation_versions v
          WHERE v.workspace_id = _version_definition.workspace AND v.automation_id = _version_definition.automation
            AND v.version = _version_definition.version),
        (SELECT a.definition FROM herald.automations a
          WHERE a.workspace_id = _version_definition.workspace AND a.id = _version_definition.automation
            AND _version_definition.version = 1
            AND NOT EXISTS (SELECT 1 FROM herald.automation_versions v
                             WHERE v.workspace_id = a.workspace_id AND v.automation_id = a.id)));
END;

-- What a new definition changes against the old one: node ids added, removed, changed (sorted), and the
-- other top-level keys that differ (name, trigger, start, reentry, …).
CREATE FUNCTION herald._version_changes(old jsonb, new jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE
BEGIN ATOMIC
    SELECT jsonb_build_object(
        'added', coalesce((SELECT jsonb_agg(k ORDER BY k) FROM jsonb_object_keys(new -> 'nodes') k
                            WHERE NOT (old -> 'nodes') ? k), '[]'),
        'removed', coalesce((SELECT jsonb_agg(k ORDER BY k) FROM jsonb_object_keys(old -> 'nodes') k
                              WHERE NOT (new -> 'nodes') ? k), '[]'),
        'changed', coalesce((SELECT jsonb_agg(k ORDER BY k) FROM jsonb_object_keys(new -> 'nodes') k
                              WHERE (old -> 'nodes') ? k AND old -> 'nodes' -> k <> new -> 'nodes' -> k), '[]'),
        'settings', coalesce((SELECT jsonb_agg(k ORDER BY k)
                                FROM (SELECT jsonb_object_keys(old) UNION SELECT jsonb_object_keys(new)) s(k)
                               WHERE k <> 'nodes' AND (old -> k) IS DISTINCT FROM (new -> k)), '[]'));
END;

-- update_automation's options, checked: {"migrate": {"<old node>": "<new node>" | null}, "note": text}.
CREATE FUNCTION herald._version_options(options jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_bad text;
BEGIN
    IF options IS NULL OR options = 'null' THEN
        RETURN '{}';
    END IF;
    IF jsonb_typeof(options) <> 'object' THEN
        RAISE EXCEPTION 'options must be a JSON object, got %', jsonb_typeof(options)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Example: {"migrate": {"old_node": "new_node"}, "note": "why"}';
    END IF;
    SELECT string_agg(k, ', ' ORDER BY k) INTO v_bad FROM jsonb_object_keys(options) k WHERE k NOT IN ('migrate', 'note');
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown option(s) %; allowed: migrate, note', v_bad USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF options ? 'note' AND (jsonb_typeof(options -> 'note') <> 'string' OR length(options ->> 'note') > 1000) THEN
        RAISE EXCEPTION 'options.note must be a string of at most 1000 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF options -> 'migrate' = 'null' THEN
        options := options - 'migrate';
    END IF;
    IF options ? 'migrate' THEN
        IF jsonb_typeof(options -> 'migrate') <> 'object' THEN
            RAISE EXCEPTION 'options.migrate must be an object of old node id -> new node id (or null: exit), got %',
                jsonb_typeof(options -> 'migrate') USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT string_agg(format('%s: %s', quote_literal(m.key), m.value), ', ' ORDER BY m.key) INTO v_bad
          FROM jsonb_each(options -> 'migrate') m WHERE jsonb_typeof(m.value) NOT IN ('string', 'null');
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'options.migrate: each old node maps to a new node id or to null (exit), not %', v_bad
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    RETURN options;
END
$$;

-- What updating automation `v` to `definition` does, as update_automation reports it. `ids`: the
-- in-progress enrollments the update locked (NULL: a preview, counted without locks). Faults are listed
-- in "errors" (the update refuses when there is one; a preview shows them).
CREATE FUNCTION herald._version_plan(v herald.automations, definition jsonb, options jsonb, ids bigint[]) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_migrate jsonb := options -> 'migrate';
    v_new_nodes jsonb := definition -> 'nodes';
    v_cur int;
    v_cur_def jsonb;
    v_errors text[] := '{}';
    v_nodes jsonb;
    v_node_errors text[];
    v_pinned bigint;
    v_moved bigint;
    v_exited bigint;
BEGIN
    PERFORM herald._check_automation(definition);
    SELECT n.version, herald._version_definition(v.workspace_id, v.id, n.version) INTO v_cur, v_cur_def
      FROM herald._newest_version(v.workspace_id, v.id) n;
    IF NOT FOUND THEN
        v_cur := 1;
        v_cur_def := v.definition;
    END IF;
    IF v.status = 'archived' THEN
        v_errors := v_errors || format('automation %s is archived: an archived automation is final', v.id);
    END IF;
    IF v_migrate IS NOT NULL THEN
        SELECT v_errors || coalesce(array_agg(format('migrate: %s -> %s: %s', m.key, coalesce(m.value #>> '{}', 'null'),
                                                     CASE WHEN NOT m.known THEN format('%s is not a node of any version of automation %s', m.key, v.id)
                                                          ELSE format('node %s does not exist in the new version', m.value #>> '{}') END)
                                              ORDER BY m.key), '{}')
          INTO v_errors
          FROM (SELECT j.key, j.value,
                       EXISTS (SELECT 1 FROM herald.automation_versions x
                                WHERE x.workspace_id = v.workspace_id AND x.automation_id = v.id AND x.definition -> 'nodes' ? j.key)
                       OR v.definition -> 'nodes' ? j.key AS known
                  FROM jsonb_each(v_migrate) j) m
         WHERE NOT m.known OR (jsonb_typeof(m.value) = 'string' AND NOT v_new_nodes ? (m.value #>> '{}'));
    END IF;

    WITH held AS (
        SELECT coalesce((e.event ->> 'version')::int, 1) AS version, e.current_node AS node,
               count(*) FILTER (WHERE e.status = 'active') AS active,
               count(*) FILTER (WHERE e.status = 'waiting') AS waiting,
               count(*) FILTER (WHERE e.wait_kind = 'job') AS on_job
          FROM herald.enrollments e
         WHERE e.workspace_id = v.workspace_id AND e.automation_id = v.id AND e.status IN ('active', 'waiting')
           AND (ids IS NULL OR e.id = ANY (ids))
         GROUP BY 1, 2
    ), decided AS (
        SELECT h.*, o.node_def AS old_node, v_new_nodes -> (v_migrate ->> h.node) AS new_node,
               CASE WHEN v_migrate IS NULL THEN 'pinned'
                    WHEN NOT v_migrate ? h.node THEN 'unmapped'
                    WHEN v_migrate -> h.node = 'null' THEN 'exit'
                    ELSE 'move' END AS action,
               v_migrate ->> h.node AS target
          FROM held h
         CROSS JOIN LATERAL (SELECT herald._version_definition(v.workspace_id, v.id, h.version) -> 'nodes' -> h.node AS node_def) o
    ), judged AS (
        SELECT d.*,
               CASE WHEN d.action = 'unmapped' THEN
                        format('node %s (version %s) holds %s contact(s) (%s active, %s waiting) and is not in options.migrate',
                               d.node, d.version, d.active + d.waiting, d.active, d.waiting)
                    WHEN d.action = 'move' AND d.new_node IS NOT NULL AND d.waiting > 0
                         AND d.old_node ->> 'type' IS DISTINCT FROM d.new_node ->> 'type' THEN
                        format('node %s (version %s) holds %s contact(s) waiting at a node of type %s: they keep that wait, so %s must be of type %s too (it is of type %s)',
                               d.node, d.version, d.waiting, d.old_node ->> 'type', d.target, d.old_node ->> 'type', d.new_node ->> 'type')
                    WHEN d.action = 'move' AND d.new_node IS NOT NULL AND d.on_job > 0 AND d.old_node ->> 'type' = 'decide'
                         AND (d.old_node -> 'field' IS DISTINCT FROM d.new_node -> 'field'
                              OR d.old_node -> 'paths' IS DISTINCT FROM d.new_node -> 'paths'
                              OR d.old_node -> 'default' IS DISTINCT FROM d.new_node -> 'default') THEN
                        format('node %s (version %s) holds %s contact(s) waiting on a decide question, which routes by its field, paths and default: %s must have the same ones',
                               d.node, d.version, d.on_job, d.target)
               END AS fault
          FROM decided d
    )
    SELECT jsonb_agg(jsonb_build_object('version', j.version, 'node', j.node, 'type', j.old_node ->> 'type',
                                        'contacts', j.active + j.waiting, 'active', j.active, 'waiting', j.waiting,
                                        'action', j.action, 'to', j.target) ORDER BY j.version, j.node),
           array_agg(j.fault ORDER BY j.version, j.node) FILTER (WHERE j.fault IS NOT NULL),
           coalesce(sum(j.active + j.waiting) FILTER (WHERE j.action = 'pinned'), 0),
           coalesce(sum(j.active + j.waiting) FILTER (WHERE j.action = 'move'), 0),
           coalesce(sum(j.active + j.waiting) FILTER (WHERE j.action = 'exit'), 0)
      INTO v_nodes, v_node_errors, v_pinned, v_moved, v_exited
      FROM judged j;

    RETURN jsonb_build_object(
        'automation', v.id, 'from_version', v_cur, 'to_version', v_cur + 1,
        'changes', herald._version_changes(v_cur_def, definition),
        'nodes', coalesce(v_nodes, '[]'),
        'pinned', v_pinned, 'moved', v_moved, 'exited', v_exited,
        'errors', to_jsonb(v_errors || coalesce(v_node_errors, '{}')));
END
$$;

-- Makes `definition` the next version of `automation` (same id). Validated like create_automation; an
-- archived automation cannot change; a live or paused one needs its templates and providers to exist.
-- Enrollments in progress stay on their version unless options.migrate moves them (see the top of this
-- file). Returns what it did, in the shape preview_automation_update answers with.
CREATE FUNCTION herald.update_automation(automation bigint, definition jsonb, options jsonb DEFAULT '{}') RETURNS jsonb
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
    PERFORM herald._refuse_archived(v.workspace_id, format('automation %s cannot be updated', v.id),
                                    herald._definition_templates(definition), herald._definition_lists(definition));
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

-- What update_automation(automation, definition, options) would do, changing nothing: per node holding
-- contacts, how many and where they would go; what the new version changes; "errors" lists why the
-- update would be refused (empty: it would go through). An invalid definition raises, as the update does.
CREATE FUNCTION herald.preview_automation_update(automation bigint, definition jsonb, options jsonb DEFAULT '{}') RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.automations;
    v_opts jsonb;
BEGIN
    v_opts := herald._version_options(options);
    PERFORM herald._authorize(a.workspace_id, format('automation %s', automation))
       FROM herald.automations a WHERE a.id = automation;
    SELECT * INTO v FROM herald.automations a WHERE a.id = automation;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown automation %', coalesce(automation::text, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    RETURN herald._version_plan(v, definition, v_opts, NULL);
END
$$;

-- Enrollments per version of an automation, by status and node (where an enrollment is, or where it
-- ended). automation_stats stays the total over every version.
CREATE FUNCTION herald.automation_version_stats(automation bigint)
RETURNS TABLE (version int, status text, node text, enrollments bigint)
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
    SELECT coalesce((e.event ->> 'version')::int, 1), e.status, e.current_node, count(*)
      FROM herald.enrollments e
     WHERE e.workspace_id = v_ws AND e.automation_id = automation_version_stats.automation
     GROUP BY 1, 2, 3
     ORDER BY 1, 2, 3;
END
$$;

-- The versions of every automation, newest marked current: who made each, when, why (note), what it
-- changed and what its update did (contacts pinned, moved, exited).
CREATE VIEW herald.automation_history AS
SELECT v.workspace_id, v.automation_id, v.version,
       v.version = max(v.version) OVER (PARTITION BY v.workspace_id, v.automation_id) AS current,
       v.definition ->> 'name' AS name, v.created_by, v.created_at, v.note,
       v.report -> 'changes' AS changes,
       (v.report ->> 'pinned')::bigint AS pinned, (v.report ->> 'moved')::bigint AS moved,
       (v.report ->> 'exited')::bigint AS exited,
       v.definition
  FROM herald.automation_versions v;

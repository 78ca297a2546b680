-- herald: automations, their life cycle, and manual enrolment.

CREATE FUNCTION herald.create_automation(workspace text, definition jsonb) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_checked jsonb;
    v_id bigint;
BEGIN
    PERFORM herald._require_workspace(workspace);
    -- raises "invalid automation definition: <path>: <fault>" naming every fault
    v_checked := herald._check_automation(definition);
    PERFORM herald._refuse_archived(workspace, 'create_automation', herald._definition_templates(definition),
                                    herald._definition_lists(definition));
    INSERT INTO herald.automations (workspace_id, name, definition, trigger_event, trigger_filter, filter_reads_contact,
                                    reentry, start_node)
    VALUES (workspace, v_checked ->> 'name', definition, v_checked ->> 'trigger_event',
            nullif(v_checked -> 'trigger_filter', 'null'), (v_checked ->> 'filter_reads_contact')::boolean,
            v_checked ->> 'reentry', v_checked ->> 'start')
    RETURNING id INTO v_id;
    -- version 1 (sql/versions.sql: update_automation makes the next ones)
    INSERT INTO herald.automation_versions (workspace_id, automation_id, version, definition, start_node, created_by)
    VALUES (workspace, v_id, 1, definition, v_checked ->> 'start', herald._caller());
    RETURN v_id;
END
$$;

-- Finds an enrollment by id and locks it, or raises a clear error.
CREATE FUNCTION herald._lock_enrollment(enrollment bigint) RETURNS herald.enrollments
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.enrollments;
BEGIN
    -- the caller's right before the lock: a refused call must not hold another tenant's row
    PERFORM herald._authorize(e.workspace_id, format('enrollment %s', enrollment))
       FROM herald.enrollments e WHERE e.id = enrollment;
    SELECT * INTO v FROM herald.enrollments e WHERE e.id = enrollment FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown enrollment %', coalesce(enrollment::text, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v;
END
$$;

-- Jobs not yet handed to a sidecar are cancelled when their enrollment ends early (a leased job is in
-- flight and finishes). Shared decide questions stay: other enrollments may wait on them.
CREATE FUNCTION herald._cancel_pending_jobs(workspace text, automation bigint, enrollment bigint, reason text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, herald, pg_temp
BEGIN ATOMIC
    UPDATE herald.outbox o
       SET status = 'cancelled', last_error = reason, done_at = now(), updated_at = now()
     WHERE o.workspace_id = _cancel_pending_jobs.workspace AND o.status = 'pending' AND o.kind <> 'decide'
       AND o.automation_id = _cancel_pending_jobs.automation
       AND (_cancel_pending_jobs.enrollment IS NULL OR o.enrollment_id = _cancel_pending_jobs.enrollment);
END;

-- Finds an automation by id and locks it, or raises a clear error.
CREATE FUNCTION herald._lock_automation(automation bigint) RETURNS herald.automations
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.automations;
BEGIN
    PERFORM herald._authorize(a.workspace_id, format('automation %s', automation))
       FROM herald.automations a WHERE a.id = automation;
    SELECT * INTO v FROM herald.automations a WHERE a.id = automation FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown automation %', coalesce(automation::text, 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v;
END
$$;

-- Allowed moves: draft → live | archived; live → paused | archived; paused → live | archived.
-- Going live is a plain row update: the dispatcher reads automations without locks, so ingest never waits.
-- Archiving ends every enrollment still in progress (exit_reason 'automation archived').
CREATE FUNCTION herald.set_automation_status(automation bigint, status text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.automations;
    v_allowed text[];
    v_exited bigint;
    v_missing text;
BEGIN
    IF status IS NULL OR status NOT IN ('live', 'paused', 'archived') THEN
        RAISE EXCEPTION 'invalid automation status %', coalesce(quote_literal(status), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use one of: live, paused, archived.';
    END IF;
    v := herald._lock_automation(automation);
    IF v.status = status THEN
        RETURN;  -- already there: idempotent
    END IF;
    v_allowed := CASE v.status
        WHEN 'draft' THEN ARRAY['live', 'archived']
        WHEN 'live' THEN ARRAY['paused', 'archived']
        WHEN 'paused' THEN ARRAY['live', 'archived']
        ELSE ARRAY[]::text[]
    END;
    IF NOT status = ANY (v_allowed) THEN
        RAISE EXCEPTION 'automation % cannot go from % to %', automation, v.status, status
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = CASE WHEN v.status = 'archived' THEN 'An archived automation is final.'
                                ELSE format('From %s it can go to: %s.', v.status, array_to_string(v_allowed, ', ')) END;
    END IF;

    IF status = 'live' THEN
        PERFORM herald._refuse_archived(v.workspace_id, format('automation %s cannot go live', automation),
                                        herald._definition_templates(v.definition), herald._definition_lists(v.definition));
        -- what the automation sends with must exist before it can run (provider "default" always does:
        -- the sidecar maps it to its default transport)
        SELECT string_agg(DISTINCT format('template %s (node %s)', quote_literal(n.node ->> 'template'), n.id), ', ') INTO v_missing
          FROM jsonb_each(v.definition -> 'nodes') AS n(id, node)
         WHERE n.node ->> 'type' = 'email'
           AND NOT EXISTS (SELECT 1 FROM herald.templates t WHERE t.workspace_id = v.workspace_id AND t.key = n.node ->> 'template');
        IF v_missing IS NULL THEN
            SELECT string_agg(DISTINCT format('provider %s (node %s)', quote_literal(n.node ->> 'provider'), n.id), ', ') INTO v_missing
              FROM jsonb_each(v.definition -> 'nodes') AS n(id, node)
             WHERE n.node ->> 'type' = 'email' AND coalesce(n.node ->> 'provider', 'default') <> 'default'
               AND NOT EXISTS (SELECT 1 FROM herald.providers p WHERE p.workspace_id = v.workspace_id AND p.name = n.node ->> 'provider');
        END IF;
        IF v_missing IS NOT NULL THEN
            RAISE EXCEPTION 'automation % cannot go live: unknown %', automation, v_missing
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Create them with herald.upsert_template(…) / herald.upsert_provider(…) first.';
        END IF;
    END IF;

    UPDATE herald.automations a SET status = set_automation_status.status, updated_at = now()
     WHERE a.workspace_id = v.workspace_id AND a.id = v.id;

    IF status = 'archived' THEN
        WITH exited AS (
            UPDATE herald.enrollments e
               SET status = 'exited', exit_reason = 'automation archived', ended_at = now(), updated_at = now()
             WHERE e.workspace_id = v.workspace_id AND e.automation_id = v.id AND e.status IN ('active', 'waiting')
            RETURNING e.workspace_id, e.id, e.automation_id, e.contact_id, e.current_node, e.exit_reason, e.context
        ), reported AS (
            -- the results stream (sql/results.sql)
            INSERT INTO herald.results_staged (workspace_id, kind, contact_id, automation_id, enrollment_id, data)
            SELECT x.workspace_id, 'enrollment.exited', x.contact_id, x.automation_id, x.id,
                   herald._ended_data(x.current_node, x.exit_reason, x.context)
              FROM exited x
        )
        SELECT count(*) INTO v_exited FROM exited;
        PERFORM herald._cancel_pending_jobs(v.workspace_id, v.id, NULL, 'automation archived');
        IF v_exited > 0 THEN
            INSERT INTO herald.stats_delta (workspace_id, automation_id, metric, n) VALUES (v.workspace_id, v.id, 'exited', v_exited);
        END IF;
    END IF;
END
$$;

-- Only live automations accept enrollments.
CREATE FUNCTION herald._require_live(v herald.automations) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    PERFORM herald._authorize(v.workspace_id, format('automation %s', v.id));
    IF v.status <> 'live' THEN
        RAISE EXCEPTION 'automation % is %, only a live automation accepts enrollments', v.id, v.status
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Call herald.set_automation_status(%s, ''live'') first.', v.id);
    END IF;
END
$$;

-- Enrols contacts by id. Totals add up to the input's length:
--   enrolled  new enrollments;
--   skipped   already enrolled as the re-entry rule forbids again (also a duplicate id in the input);
--   rejected  NULL or not a contact of the automation's workspace.
-- Concurrent calls for the same contacts cannot both enrol: the re-entry unique index decides.
CREATE FUNCTION herald.enroll(automation bigint, contact_ids bigint[])
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

-- Enrols every contact of the workspace that matches a segment condition (contact.* fields only).
-- rejected is always 0 here; skipped counts matching contacts the re-entry rule keeps out.
CREATE FUNCTION herald.enroll_segment(automation bigint, segment jsonb)
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

CREATE FUNCTION herald.exit_enrollment(enrollment bigint, reason text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.enrollments;
BEGIN
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'an exit reason is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v := herald._lock_enrollment(enrollment);
    IF v.status NOT IN ('active', 'waiting') THEN
        RAISE EXCEPTION 'enrollment % has already ended (%)', enrollment, v.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE herald.enrollments e
       SET status = 'exited', exit_reason = reason, ended_at = now(), updated_at = now()
     WHERE e.workspace_id = v.workspace_id AND e.id = v.id;
    INSERT INTO herald.results_staged (workspace_id, kind, contact_id, automation_id, enrollment_id, data)
    VALUES (v.workspace_id, 'enrollment.exited', v.contact_id, v.automation_id, v.id,
            herald._ended_data(v.current_node, reason, v.context));
    PERFORM herald._cancel_pending_jobs(v.workspace_id, v.automation_id, v.id, 'enrollment exited: ' || reason);
    INSERT INTO herald.stats_delta (workspace_id, automation_id, metric, n) VALUES (v.workspace_id, v.automation_id, 'exited', 1);
END
$$;

-- One row per automation: its state and how many enrollments are in each status.
CREATE VIEW herald.automation_overview AS
SELECT a.workspace_id, a.id AS automation_id, a.name, a.status, a.trigger_event, a.reentry,
       coalesce(s.active, 0) AS active, coalesce(s.waiting, 0) AS waiting, coalesce(s.completed, 0) AS completed,
       coalesce(s.exited, 0) AS exited, coalesce(s.failed, 0) AS failed, a.created_at, a.updated_at
  FROM herald.automations a
  LEFT JOIN LATERAL (
      SELECT count(*) FILTER (WHERE e.status = 'active') AS active,
             count(*) FILTER (WHERE e.status = 'waiting') AS waiting,
             count(*) FILTER (WHERE e.status = 'completed') AS completed,
             count(*) FILTER (WHERE e.status = 'exited') AS exited,
             count(*) FILTER (WHERE e.status = 'failed') AS failed
        FROM herald.enrollments e
       WHERE e.workspace_id = a.workspace_id AND e.automation_id = a.id) s ON true;

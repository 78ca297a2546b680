-- herald: archiving and deleting templates, lists and broadcasts (issue 13).
--
-- Archive hides a thing and keeps it: an archived template, list or broadcast stays with its history,
-- cannot be used by a new automation (create_automation, update_automation, going live), a new
-- broadcast (create_broadcast, schedule_broadcast of an archived draft) or send(), and the default
-- listings (broadcast_overview, list_overview, `herald broadcasts`) leave it out; unarchive_* restores
-- it. The mark is a row of herald.archived (kind, name), not a column: a template is many rows (its
-- versions) and keeps its mark when a new version is saved; a list may exist only through members.
-- Delete removes a thing for good. Both are refused, with what uses it, while it is in use:
--   template   an email node of a live or paused automation (any of its versions: enrollments may be
--              pinned to an older one), a variation of a broadcast not yet finished (draft, scheduled,
--              sending, paused), or an email job not yet sent (pending or leased)
--   list       a live or paused automation that adds or removes it (update_contact), or whose
--              conditions may test it (one that triggers or waits on list.* events and compares a
--              value with its name), or the audience of a broadcast not yet finished
--   broadcast  one that is scheduled, sending or paused (cancel it first), one whose jobs are not all
--              settled yet, or (delete) one a resend_failed broadcast not yet finished reads from
-- What deleting keeps: message_history rows (the record of what was sent to whom: per-contact history,
-- and a bounce or complaint that names the Message-ID still suppresses the address), the contacts'
-- events (their activity) and the results stream. They keep the id or key of what was deleted. What it
-- removes: a template's versions; a list's row and memberships; a broadcast's row, its jobs (all
-- finished), its counters (broadcast_stats and deltas), refused feedback naming it and its rate limit.
-- Roles: templates and broadcasts herald_admin (who creates them); lists herald_app and herald_admin
-- (create_list, subscribe are theirs). Every function checks the caller's workspace.

-- The templates an automation definition sends with (its email nodes).
CREATE FUNCTION herald._definition_templates(definition jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT coalesce(array_agg(DISTINCT n.node ->> 'template'), '{}')
          FROM jsonb_each(CASE WHEN jsonb_typeof(definition -> 'nodes') = 'object' THEN definition -> 'nodes' END) n(id, node)
         WHERE n.node ->> 'type' = 'email' AND n.node ->> 'template' IS NOT NULL);

-- The lists an automation definition may use: those its update_contact nodes add or remove, and, when
-- it triggers or waits on list.* events (whose payload names the list), every value its conditions
-- compare with (a condition cannot say which of them is a list name; taking them all is the safe side).
CREATE FUNCTION herald._definition_lists(definition jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT coalesce(array_agg(DISTINCT l.name), '{}') FROM (
            SELECT jsonb_array_elements_text(x) AS name
              FROM jsonb_path_query(definition, 'lax $.nodes.*.add_lists') x WHERE jsonb_typeof(x) = 'array'
            UNION ALL
            SELECT jsonb_array_elements_text(x)
              FROM jsonb_path_query(definition, 'lax $.nodes.*.remove_lists') x WHERE jsonb_typeof(x) = 'array'
            UNION ALL
            SELECT CASE jsonb_typeof(v) WHEN 'string' THEN v #>> '{}' END
              FROM jsonb_path_query(definition, 'lax $.**.value') v
             WHERE jsonb_typeof(v) = 'string'
               AND jsonb_path_exists(definition, 'lax $.** ? (@.event starts with "list.")')
            UNION ALL
            SELECT jsonb_array_elements_text(v)
              FROM jsonb_path_query(definition, 'lax $.**.value') v
             WHERE jsonb_typeof(v) = 'array'
               AND jsonb_path_exists(definition, 'lax $.** ? (@.event starts with "list.")')) l
         WHERE l.name IS NOT NULL);

-- The advisory lock of a template or list (kind 'template' or 'list'): archive, unarchive, delete and
-- upsert_template take it exclusively, every new use (_refuse_archived) shared. Internal.
CREATE FUNCTION herald._use_lock(kind text, workspace text, name text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN hashtext('herald.' || kind || ':' || workspace || '/' || name);

-- Raises when any of `templates` or `lists` is archived in the workspace; `what` says what was being
-- done ("create_broadcast", "automation 4 cannot go live"). Called by the functions that start using
-- templates and lists (create_automation, update_automation, set_automation_status, create_broadcast,
-- send, send_test, subscribe), before they look them up. Unknown ones are their callers' business
-- (they say "unknown").
-- It first holds them against archive and delete until the caller's transaction ends: their lock
-- (_use_lock), shared (new uses do not wait for each other), in one order. An archive or delete then
-- either commits first (this check, a statement after the lock, sees it: "archived", or the caller
-- finds no template) or waits and sees the new use ("in use"). Without it, a use committing in the same
-- instant as a delete queued jobs, or made a broadcast or a live automation, naming a template that
-- was gone or a list that was archived. Not STABLE: a STABLE function reads with its caller's snapshot,
-- taken before the wait.
CREATE FUNCTION herald._refuse_archived(workspace text, what text, templates text[], lists text[] DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_archived text;
    v_hint text;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(herald._use_lock(u.kind, workspace, u.name))
       FROM (SELECT 'template' AS kind, t.name FROM unnest(templates) t(name) WHERE t.name IS NOT NULL
             UNION
             SELECT 'list', l.name FROM unnest(lists) l(name) WHERE l.name IS NOT NULL
             ORDER BY 1, 2) u;
    SELECT string_agg(format('%s %s', a.kind, quote_literal(a.name)), ', ' ORDER BY a.kind, a.name),
           string_agg(DISTINCT format('herald.unarchive_%s(workspace, name)', a.kind), ' / ')
      INTO v_archived, v_hint
      FROM herald.archived a
     WHERE a.workspace_id = workspace
       AND ((a.kind = 'template' AND a.name = ANY (templates)) OR (a.kind = 'list' AND a.name = ANY (lists)));
    IF v_archived IS NOT NULL THEN
        RAISE EXCEPTION '%: % archived', what, v_archived
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('An archived template or list cannot be put to new use (automations, broadcasts, sends, subscriptions); restore it with %s, or use another.', v_hint);
    END IF;
END
$$;

-- What uses a template now (see the top of this file), as text for an error; NULL when nothing does.
CREATE FUNCTION herald._template_users(workspace text, key text) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, herald, pg_temp
BEGIN ATOMIC
    SELECT nullif(concat_ws('; ',
        (SELECT 'automation(s) ' || string_agg(DISTINCT format('%s (%s)', a.id, a.status), ', ')
           FROM herald.automations a
           JOIN herald.automation_versions v ON v.workspace_id = a.workspace_id AND v.automation_id = a.id
          WHERE a.workspace_id = _template_users.workspace AND a.status IN ('live', 'paused')
            AND _template_users.key = ANY (herald._definition_templates(v.definition))),
        (SELECT 'broadcast(s) ' || string_agg(format('%s (%s)', b.id, b.status), ', ' ORDER BY b.id)
           FROM herald.broadcasts b
          WHERE b.workspace_id = _template_users.workspace AND b.status IN ('draft', 'scheduled', 'sending', 'paused')
            AND EXISTS (SELECT 1 FROM jsonb_array_elements(b.definition -> 'variations') x
                         WHERE x ->> 'template' = _template_users.key)),
        (SELECT count(*) || ' email job(s) not yet sent'
           FROM herald.outbox o
          WHERE o.workspace_id = _template_users.workspace AND o.status IN ('pending', 'leased') AND o.kind = 'email'
            AND o.broadcast_id IS NULL AND o.payload ->> 'template' = _template_users.key
         HAVING count(*) > 0)), '');
END;

-- What uses a list now (see the top of this file), as text for an error; NULL when nothing does.
CREATE FUNCTION herald._list_users(workspace text, name text) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, herald, pg_temp
BEGIN ATOMIC
    SELECT nullif(concat_ws('; ',
        (SELECT 'automation(s) ' || string_agg(DISTINCT format('%s (%s)', a.id, a.status), ', ')
           FROM herald.automations a
           JOIN herald.automation_versions v ON v.workspace_id = a.workspace_id AND v.automation_id = a.id
          WHERE a.workspace_id = _list_users.workspace AND a.status IN ('live', 'paused')
            AND _list_users.name = ANY (herald._definition_lists(v.definition))),
        (SELECT 'broadcast(s) ' || string_agg(format('%s (%s)', b.id, b.status), ', ' ORDER BY b.id)
           FROM herald.broadcasts b
          WHERE b.workspace_id = _list_users.workspace AND b.status IN ('draft', 'scheduled', 'sending', 'paused')
            AND b.definition -> 'lists' ? _list_users.name)), '');
END;

-- ---------------------------------------------------------------------------------------- templates

-- Locks a template key for archive/delete (the lock upsert_template takes, _refuse_archived shares) and
-- raises when the workspace has no such template.
CREATE FUNCTION herald._lock_template(workspace text, key text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    PERFORM herald._require_workspace(workspace);
    PERFORM pg_advisory_xact_lock(herald._use_lock('template', workspace, key));
    IF NOT EXISTS (SELECT 1 FROM herald.templates t WHERE t.workspace_id = workspace AND t.key = _lock_template.key) THEN
        RAISE EXCEPTION 'unknown template % in workspace %', coalesce(quote_literal(key), 'NULL'), quote_literal(workspace)
            USING ERRCODE = 'no_data_found';
    END IF;
END
$$;

-- Role: herald_admin. Archives a template (every version); refused while it is in use. Returns true
-- when it was not archived yet.
CREATE FUNCTION herald.archive_template(workspace text, key text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_users text;
    v_new boolean;
BEGIN
    PERFORM herald._lock_template(workspace, key);
    v_users := herald._template_users(workspace, key);
    IF v_users IS NOT NULL THEN
        RAISE EXCEPTION 'template % is in use and cannot be archived: %', quote_literal(key), v_users
            USING ERRCODE = 'object_in_use',
                  HINT = 'Archive the automations first (set_automation_status(id, ''archived'')), let the broadcasts finish or cancel them, and let the jobs be sent.';
    END IF;
    INSERT INTO herald.archived (workspace_id, kind, name, archived_by) VALUES (workspace, 'template', key, herald._caller())
    ON CONFLICT ON CONSTRAINT archived_pkey DO NOTHING
    RETURNING true INTO v_new;
    RETURN coalesce(v_new, false);
END
$$;

-- Role: herald_admin. Restores an archived template; returns true when it was archived.
CREATE FUNCTION herald.unarchive_template(workspace text, key text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_n int;
BEGIN
    PERFORM herald._lock_template(workspace, key);
    DELETE FROM herald.archived a WHERE a.workspace_id = workspace AND a.kind = 'template' AND a.name = key;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n > 0;
END
$$;

-- Role: herald_admin. Deletes a template, every version (archived or not); refused while it is in use.
-- Returns the versions removed.
CREATE FUNCTION herald.delete_template(workspace text, key text) RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_users text;
    v_n int;
BEGIN
    PERFORM herald._lock_template(workspace, key);
    v_users := herald._template_users(workspace, key);
    IF v_users IS NOT NULL THEN
        RAISE EXCEPTION 'template % is in use and cannot be deleted: %', quote_literal(key), v_users
            USING ERRCODE = 'object_in_use',
                  HINT = 'Archive the automations first (set_automation_status(id, ''archived'')), let the broadcasts finish or cancel them, and let the jobs be sent.';
    END IF;
    DELETE FROM herald.archived a WHERE a.workspace_id = workspace AND a.kind = 'template' AND a.name = key;
    DELETE FROM herald.templates t WHERE t.workspace_id = workspace AND t.key = delete_template.key;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;

-- -------------------------------------------------------------------------------------------- lists

-- Locks a list for archive/delete and raises when the workspace has no such list (made with
-- create_list or joined by an update_contact node).
CREATE FUNCTION herald._lock_list(workspace text, name text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    PERFORM herald._require_workspace(workspace);
    PERFORM pg_advisory_xact_lock(herald._use_lock('list', workspace, name));
    IF NOT EXISTS (SELECT 1 FROM herald.lists l WHERE l.workspace_id = workspace AND l.name = _lock_list.name)
       AND NOT EXISTS (SELECT 1 FROM herald.list_members m WHERE m.workspace_id = workspace AND m.list = _lock_list.name) THEN
        RAISE EXCEPTION 'unknown list % in workspace %', coalesce(quote_literal(name), 'NULL'), quote_literal(workspace)
            USING ERRCODE = 'no_data_found', HINT = 'herald.list_overview lists them.';
    END IF;
END
$$;

-- Role: herald_app, herald_admin. Archives a list (its members stay); refused while it is in use.
-- Returns true when it was not archived yet.
CREATE FUNCTION herald.archive_list(workspace text, name text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_users text;
    v_new boolean;
BEGIN
    PERFORM herald._lock_list(workspace, name);
    v_users := herald._list_users(workspace, name);
    IF v_users IS NOT NULL THEN
        RAISE EXCEPTION 'list % is in use and cannot be archived: %', quote_literal(name), v_users
            USING ERRCODE = 'object_in_use',
                  HINT = 'Archive the automations first (set_automation_status(id, ''archived'')), and let the broadcasts finish or cancel them.';
    END IF;
    INSERT INTO herald.archived (workspace_id, kind, name, archived_by) VALUES (workspace, 'list', name, herald._caller())
    ON CONFLICT ON CONSTRAINT archived_pkey DO NOTHING
    RETURNING true INTO v_new;
    RETURN coalesce(v_new, false);
END
$$;

-- Role: herald_app, herald_admin. Restores an archived list; returns true when it was archived.
CREATE FUNCTION herald.unarchive_list(workspace text, name text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_n int;
BEGIN
    PERFORM herald._lock_list(workspace, name);
    DELETE FROM herald.archived a WHERE a.workspace_id = workspace AND a.kind = 'list' AND a.name = unarchive_list.name;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n > 0;
END
$$;

-- Role: herald_app, herald_admin. Deletes a list and its memberships (archived or not); refused while
-- it is in use. The contacts stay, and so do their list.joined / list.left events. Returns
-- {"list": name, "members": n} (memberships removed, subscribed or not).
CREATE FUNCTION herald.delete_list(workspace text, name text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_users text;
    v_n int;
BEGIN
    PERFORM herald._lock_list(workspace, name);
    v_users := herald._list_users(workspace, name);
    IF v_users IS NOT NULL THEN
        RAISE EXCEPTION 'list % is in use and cannot be deleted: %', quote_literal(name), v_users
            USING ERRCODE = 'object_in_use',
                  HINT = 'Archive the automations first (set_automation_status(id, ''archived'')), and let the broadcasts finish or cancel them.';
    END IF;
    DELETE FROM herald.archived a WHERE a.workspace_id = workspace AND a.kind = 'list' AND a.name = delete_list.name;
    DELETE FROM herald.lists l WHERE l.workspace_id = workspace AND l.name = delete_list.name;
    DELETE FROM herald.list_members m WHERE m.workspace_id = workspace AND m.list = delete_list.name;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN jsonb_build_object('list', name, 'members', v_n);
END
$$;

-- ---------------------------------------------------------------------------------------- broadcasts

-- Raises unless the (locked) broadcast is at rest: a draft, or sent or cancelled with every job settled.
CREATE FUNCTION herald._broadcast_at_rest(v herald.broadcasts, what text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF v.status IN ('scheduled', 'sending', 'paused') THEN
        RAISE EXCEPTION 'broadcast % is %: it cannot be %', v.id, v.status, what
            USING ERRCODE = 'object_in_use', HINT = format('Cancel it first: herald.cancel_broadcast(%s).', v.id);
    END IF;
    IF v.settle_cursor IS NOT NULL
       OR EXISTS (SELECT 1 FROM herald.outbox o WHERE o.broadcast_id = v.id AND o.status IN ('pending', 'leased', 'held')) THEN
        RAISE EXCEPTION 'broadcast % is % but some of its jobs are not settled yet: it cannot be %', v.id, v.status, what
            USING ERRCODE = 'object_in_use',
                  HINT = 'herald.advance_broadcasts() settles them (the daemon calls it); jobs handed to a daemon finish first.';
    END IF;
END
$$;

-- Role: herald_admin. Archives a broadcast that is a draft, sent or cancelled: hidden from
-- broadcast_overview and `herald broadcasts` (unless --all), its numbers kept; an archived draft cannot
-- be scheduled. Returns true when it was not archived yet.
CREATE FUNCTION herald.archive_broadcast(broadcast bigint) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.broadcasts := herald._lock_broadcast(broadcast);
    v_new boolean;
BEGIN
    PERFORM herald._broadcast_at_rest(v, 'archived');
    INSERT INTO herald.archived (workspace_id, kind, name, archived_by)
    VALUES (v.workspace_id, 'broadcast', v.id::text, herald._caller())
    ON CONFLICT ON CONSTRAINT archived_pkey DO NOTHING
    RETURNING true INTO v_new;
    RETURN coalesce(v_new, false);
END
$$;

-- Role: herald_admin. Restores an archived broadcast; returns true when it was archived.
CREATE FUNCTION herald.unarchive_broadcast(broadcast bigint) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.broadcasts := herald._lock_broadcast(broadcast);
    v_n int;
BEGIN
    DELETE FROM herald.archived a WHERE a.workspace_id = v.workspace_id AND a.kind = 'broadcast' AND a.name = v.id::text;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n > 0;
END
$$;

-- Raises when the broadcast is archived (schedule_broadcast: an archived draft stays a draft).
CREATE FUNCTION herald._refuse_archived_broadcast(v herald.broadcasts) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM herald.archived a
                WHERE a.workspace_id = v.workspace_id AND a.kind = 'broadcast' AND a.name = v.id::text) THEN
        RAISE EXCEPTION 'broadcast % is archived', v.id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Restore it first: herald.unarchive_broadcast(%s).', v.id);
    END IF;
END
$$;

-- Role: herald_admin. Deletes a broadcast that is a draft, sent or cancelled (archived or not) with its
-- jobs (all finished), counters, refused feedback and rate limit; message_history, events and results
-- keep their rows (see the top of this file). Refused while a resend_failed broadcast not yet finished
-- reads its failed jobs. Returns {"broadcast": id, "jobs": n, "stats": n}.
CREATE FUNCTION herald.delete_broadcast(broadcast bigint) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.broadcasts := herald._lock_broadcast(broadcast);
    v_resends text;
    v_jobs int;
    v_stats int;
    v_n int;
BEGIN
    PERFORM herald._broadcast_at_rest(v, 'deleted');
    SELECT string_agg(format('%s (%s)', r.id, r.status), ', ' ORDER BY r.id) INTO v_resends
      FROM herald.broadcasts r
     WHERE r.workspace_id = v.workspace_id AND r.retry_of = v.id AND r.status IN ('draft', 'scheduled', 'sending', 'paused');
    IF v_resends IS NOT NULL THEN
        RAISE EXCEPTION 'broadcast % cannot be deleted: resend_failed broadcast(s) % read its failed recipients', v.id, v_resends
            USING ERRCODE = 'object_in_use', HINT = 'Let them finish, or cancel them, first.';
    END IF;
    DELETE FROM herald.outbox o WHERE o.broadcast_id = v.id;
    GET DIAGNOSTICS v_jobs = ROW_COUNT;
    DELETE FROM herald.broadcast_stats s WHERE s.workspace_id = v.workspace_id AND s.broadcast_id = v.id;
    GET DIAGNOSTICS v_stats = ROW_COUNT;
    DELETE FROM herald.broadcast_stats_delta d WHERE d.workspace_id = v.workspace_id AND d.broadcast_id = v.id;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    DELETE FROM herald.feedback_rejections r WHERE r.workspace_id = v.workspace_id AND r.broadcast_id = v.id;
    DELETE FROM herald.rate_limits r WHERE r.key = herald._broadcast_rate_key(v.id);
    DELETE FROM herald.archived a WHERE a.workspace_id = v.workspace_id AND a.kind = 'broadcast' AND a.name = v.id::text;
    DELETE FROM herald.broadcasts b WHERE b.workspace_id = v.workspace_id AND b.id = v.id;
    RETURN jsonb_build_object('broadcast', v.id, 'jobs', v_jobs, 'stats', v_stats + v_n);
END
$$;

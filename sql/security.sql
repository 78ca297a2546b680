-- herald: who may do what. Runs last (every function exists by now).
--
-- Three NOLOGIN group roles; users and applications are made members of them:
--   herald_admin   everything, in every workspace: workspaces, automations, templates, providers,
--                  rate limits, broadcasts, workspace grants, and all that the two others may do
--   herald_worker  what the daemon needs and nothing else: claim, complete, reap, tick, flush_stats,
--                  advance_broadcasts, record_feedback, prune, advance_results, read_results (they serve
--                  every workspace), and reading the queue views for /metrics
--   herald_app     an application acting for the workspaces granted to it (herald.grant_workspace):
--                  contacts, events, enrollments, approvals, sends, suppressions, redrives, result
--                  subscriptions, and reads of its own stats and results (read_results, tables and views,
--                  filtered by row-level security)
-- Nothing is granted to PUBLIC. A superuser keeps every right.
--
-- The API functions are SECURITY DEFINER (they run as the extension's owner, which needs no grants on
-- the tables and is not subject to row-level security) with search_path pinned; the ones an
-- application may call check the caller's workspace through herald._authorize, also those that take
-- only an id (they look up its workspace first, before locking anything). Row-level security on every
-- table with a workspace is the second wall, for the reads granted to herald_app.

-- Roles are cluster-wide: created once, shared by every database of the cluster, kept when the
-- extension is dropped (other databases may use them).
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['herald_admin', 'herald_worker', 'herald_app'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$$;

-- The role a call acts as: the session's current role. SET ROLE counts (connection poolers and
-- PostgREST-style gateways log in as one role and SET ROLE per request); inside these SECURITY DEFINER
-- functions current_user is the owner, so it cannot tell.
-- No SET search_path here nor in _serves_all_workspaces (a RETURN body is bound to its objects when it is
-- created, so a search path changes nothing in it): without one Postgres inlines them into their callers.
-- With one, each call was planned afresh and set and reset search_path (~0.05 ms of every track()).
CREATE FUNCTION herald._caller() RETURNS name
LANGUAGE sql STABLE
RETURN CASE WHEN current_setting('role') = 'none' THEN session_user ELSE current_setting('role')::name END;

-- True when the caller serves every workspace: a superuser, or a member of herald_admin or herald_worker
-- (pg_has_role is true for superusers too).
CREATE FUNCTION herald._serves_all_workspaces() RETURNS boolean
LANGUAGE sql STABLE
RETURN pg_has_role(herald._caller(), 'herald_admin', 'USAGE')
    OR pg_has_role(herald._caller(), 'herald_worker', 'USAGE');

-- The workspaces the caller may act for: every one, or those granted to a role whose privileges it has.
-- Row-level security policies read it once per query (IN (SELECT …) is planned as one hashed subplan).
CREATE FUNCTION herald._my_workspaces() RETURNS SETOF text
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, herald, pg_temp
AS $$
    SELECT w.id FROM herald.workspaces w WHERE herald._serves_all_workspaces()
    UNION
    SELECT g.workspace_id
      FROM herald.workspace_grants g
      JOIN pg_roles r ON r.rolname = g.role_name        -- a dropped role's grants are inert
     WHERE pg_has_role(herald._caller(), r.oid, 'USAGE');
$$;

-- Raises unless the caller may act for `workspace`. `subject` names what was asked for when the caller
-- gave an id ('automation 5'), so the refusal does not reveal another tenant's workspace name.
CREATE FUNCTION herald._authorize(workspace text, subject text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF herald._serves_all_workspaces() THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1
                 FROM herald.workspace_grants g
                 JOIN pg_roles r ON r.rolname = g.role_name
                WHERE g.workspace_id = workspace AND pg_has_role(herald._caller(), r.oid, 'USAGE')) THEN
        RETURN;
    END IF;
    IF subject IS NULL THEN
        RAISE EXCEPTION 'permission denied: role "%" may not act for workspace "%"', herald._caller(), workspace
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'A herald_admin grants it with herald.grant_workspace(role, workspace).';
    END IF;
    RAISE EXCEPTION 'permission denied: role "%" may not act for the workspace of %', herald._caller(), subject
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'A herald_admin grants it with herald.grant_workspace(role, workspace).';
END
$$;

-- Lets `role` (and every role that has its privileges) act for `workspace` as herald_app. Idempotent;
-- returns true when the grant is new. herald_admin only.
CREATE FUNCTION herald.grant_workspace(role name, workspace text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_new boolean;
BEGIN
    IF role IS NULL OR NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = role) THEN
        RAISE EXCEPTION 'unknown role %', coalesce(quote_ident(role), 'NULL')
            USING ERRCODE = 'undefined_object', HINT = 'Create the role first (CREATE ROLE … IN ROLE herald_app).';
    END IF;
    PERFORM herald._require_workspace(workspace);
    INSERT INTO herald.workspace_grants (workspace_id, role_name, granted_by)
    VALUES (workspace, role, herald._caller())
    ON CONFLICT (workspace_id, role_name) DO NOTHING;
    GET DIAGNOSTICS v_new = ROW_COUNT;
    IF NOT pg_has_role(role, 'herald_app', 'USAGE') THEN
        RAISE WARNING 'role % is not a member of herald_app: it may act for workspace "%" but cannot call herald''s functions yet',
            quote_ident(role), workspace
            USING HINT = format('GRANT herald_app TO %s;', quote_ident(role));
    END IF;
    RETURN v_new;
END
$$;

-- Withdraws a grant; returns true when there was one. herald_admin only.
CREATE FUNCTION herald.revoke_workspace(role name, workspace text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_n int;
BEGIN
    DELETE FROM herald.workspace_grants g WHERE g.workspace_id = workspace AND g.role_name = role;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n > 0;
END
$$;

-- ------------------------------------------------------------------------------------------ functions

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA herald FROM PUBLIC;
GRANT USAGE ON SCHEMA herald TO herald_admin, herald_worker, herald_app;

-- every API function runs as the owner (see the top of this file)
ALTER FUNCTION herald.create_workspace(text, text) SECURITY DEFINER;
ALTER FUNCTION herald.upsert_contact(text, text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.upsert_contacts(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.track(text, text, text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.track_many(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.create_automation(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.set_automation_status(bigint, text) SECURITY DEFINER;
ALTER FUNCTION herald.enroll(bigint, bigint[]) SECURITY DEFINER;
ALTER FUNCTION herald.enroll_segment(bigint, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.exit_enrollment(bigint, text) SECURITY DEFINER;
ALTER FUNCTION herald.decide_approval(bigint, boolean, text) SECURITY DEFINER;
ALTER FUNCTION herald.tick(int) SECURITY DEFINER;
ALTER FUNCTION herald.take_tick_wakeup() SECURITY DEFINER;
ALTER FUNCTION herald.prune(interval, interval, interval, interval) SECURITY DEFINER;
ALTER FUNCTION herald.upsert_template(text, text, text, text, text, text, text) SECURITY DEFINER;
ALTER FUNCTION herald.render_template(text, text, text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.send_test(text, text, text, jsonb, text) SECURITY DEFINER;
ALTER FUNCTION herald.upsert_provider(text, text, text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.provider_kinds() SECURITY DEFINER;
ALTER FUNCTION herald.set_rate_limit(text, int) SECURITY DEFINER;
ALTER FUNCTION herald.send(text, text, text, jsonb, text, text) SECURITY DEFINER;
ALTER FUNCTION herald.claim(text, int, interval) SECURITY DEFINER;
ALTER FUNCTION herald.complete(jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.reap() SECURITY DEFINER;
ALTER FUNCTION herald.oldest_snapshot(interval) SECURITY DEFINER;
ALTER FUNCTION herald.redrive(bigint[]) SECURITY DEFINER;
ALTER FUNCTION herald.flush_stats() SECURITY DEFINER;
ALTER FUNCTION herald.automation_stats(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.automation_stats_daily(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.suppress(text, text, text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.unsuppress(text, text) SECURITY DEFINER;
ALTER FUNCTION herald.create_broadcast(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.schedule_broadcast(bigint, timestamptz) SECURITY DEFINER;
ALTER FUNCTION herald.pause_broadcast(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.resume_broadcast(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.cancel_broadcast(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.resend_failed(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.advance_broadcasts(int) SECURITY DEFINER;
ALTER FUNCTION herald.broadcast_stats(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.record_feedback(jsonb, text) SECURITY DEFINER;
ALTER FUNCTION herald.grant_workspace(name, text) SECURITY DEFINER;
ALTER FUNCTION herald.revoke_workspace(name, text) SECURITY DEFINER;
ALTER FUNCTION herald.create_list(text, text, text) SECURITY DEFINER;
ALTER FUNCTION herald.subscribe(text, text, text[]) SECURITY DEFINER;
ALTER FUNCTION herald.unsubscribe(text, text, text[]) SECURITY DEFINER;
ALTER FUNCTION herald.delete_contact(text, text) SECURITY DEFINER;
ALTER FUNCTION herald.retry_failed(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.update_automation(bigint, jsonb, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.preview_automation_update(bigint, jsonb, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.automation_version_stats(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.preview_broadcast(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.preview_broadcast(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.simulate_automation(text, jsonb, timestamptz, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.simulate_automation(bigint, timestamptz, jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.read_results(text, bigint, int, text[]) SECURITY DEFINER;
ALTER FUNCTION herald.newest_result(text) SECURITY DEFINER;
ALTER FUNCTION herald.subscribe_results(text, text, text[], jsonb) SECURITY DEFINER;
ALTER FUNCTION herald.unsubscribe_results(text, bigint) SECURITY DEFINER;
ALTER FUNCTION herald.advance_results(int) SECURITY DEFINER;
-- the HTTP API (sql/api.sql): keys are the admin's; api_call is the daemon's one call per request
ALTER FUNCTION herald.create_api_key(text, text, text[]) SECURITY DEFINER;
ALTER FUNCTION herald.revoke_api_key(text, bigint) SECURITY DEFINER;
ALTER FUNCTION herald.list_api_keys(text) SECURITY DEFINER;
ALTER FUNCTION herald.api_call(text, text, jsonb, text) SECURITY DEFINER;
ALTER FUNCTION herald.api_key_workspace(text, text) SECURITY DEFINER;
ALTER FUNCTION herald.archive_template(text, text) SECURITY DEFINER;
ALTER FUNCTION herald.unarchive_template(text, text) SECURITY DEFINER;
ALTER FUNCTION herald.delete_template(text, text) SECURITY DEFINER;
ALTER FUNCTION herald.archive_list(text, text) SECURITY DEFINER;
ALTER FUNCTION herald.unarchive_list(text, text) SECURITY DEFINER;
ALTER FUNCTION herald.delete_list(text, text) SECURITY DEFINER;
ALTER FUNCTION herald.archive_broadcast(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.unarchive_broadcast(bigint) SECURITY DEFINER;
ALTER FUNCTION herald.delete_broadcast(bigint) SECURITY DEFINER;
-- the operator page's sign-outs (sql/admin_sessions.sql)
ALTER FUNCTION herald.admin_session_ok(text, timestamptz) SECURITY DEFINER;
ALTER FUNCTION herald.admin_sign_out(text, text, timestamptz, boolean) SECURITY DEFINER;
-- the dispatcher writes contacts and enrollments for whoever inserted the events (an application's
-- INSERT INTO herald.events passed row-level security's check of its workspace first)
ALTER FUNCTION herald._dispatch() SECURITY DEFINER;

-- herald_app (and herald_admin): acting for a granted workspace; each checks it with _authorize
GRANT EXECUTE ON FUNCTION
    herald.upsert_contact(text, text, jsonb), herald.upsert_contacts(text, jsonb),
    herald.track(text, text, text, jsonb), herald.track_many(text, jsonb),
    herald.enroll(bigint, bigint[]), herald.enroll_segment(bigint, jsonb),
    herald.exit_enrollment(bigint, text), herald.decide_approval(bigint, boolean, text),
    herald.send(text, text, text, jsonb, text, text),
    herald.render_template(text, text, text, jsonb), herald.send_test(text, text, text, jsonb, text),
    herald.suppress(text, text, text, jsonb), herald.unsuppress(text, text),
    herald.redrive(bigint[]),
    herald.create_list(text, text, text), herald.subscribe(text, text, text[]), herald.unsubscribe(text, text, text[]),
    herald.delete_contact(text, text), herald.retry_failed(text, jsonb),
    herald.automation_stats(bigint), herald.automation_stats_daily(bigint), herald.broadcast_stats(bigint),
    herald._my_workspaces()     -- read by the row-level security policies, as the querying role
TO herald_app, herald_admin;
-- read-only: an application's segment editor previews its audience; per-version counts of its journeys
GRANT EXECUTE ON FUNCTION
    herald.preview_broadcast(text, jsonb), herald.preview_broadcast(bigint), herald.automation_version_stats(bigint)
TO herald_app, herald_admin;
-- read-only too: a dry run of a journey over the workspace's own recorded events (writes and sends nothing)
GRANT EXECUTE ON FUNCTION
    herald.simulate_automation(text, jsonb, timestamptz, jsonb), herald.simulate_automation(bigint, timestamptz, jsonb)
TO herald_app, herald_admin;
-- the results stream: an application reads and subscribes for its own workspaces; the daemon reads every
-- workspace's for its stream endpoint
GRANT EXECUTE ON FUNCTION
    herald.subscribe_results(text, text, text[], jsonb), herald.unsubscribe_results(text, bigint)
TO herald_app, herald_admin;
GRANT EXECUTE ON FUNCTION herald.read_results(text, bigint, int, text[]) TO herald_app, herald_worker, herald_admin;
GRANT EXECUTE ON FUNCTION herald.newest_result(text) TO herald_app, herald_worker, herald_admin;

-- herald_admin: managing workspaces and what runs in them
GRANT EXECUTE ON FUNCTION
    herald.create_workspace(text, text), herald.grant_workspace(name, text), herald.revoke_workspace(name, text),
    herald.create_automation(text, jsonb), herald.set_automation_status(bigint, text),
    herald.upsert_template(text, text, text, text, text, text, text), herald.upsert_provider(text, text, text, jsonb),
    herald.set_rate_limit(text, int),
    herald.create_broadcast(text, jsonb), herald.schedule_broadcast(bigint, timestamptz),
    herald.pause_broadcast(bigint), herald.resume_broadcast(bigint), herald.cancel_broadcast(bigint),
    herald.resend_failed(bigint)
TO herald_admin;
-- archiving and deleting (sql/archive.sql): templates and broadcasts are the admin's, like creating them;
-- lists are also the application's, like create_list and subscribe
GRANT EXECUTE ON FUNCTION
    herald.archive_template(text, text), herald.unarchive_template(text, text), herald.delete_template(text, text),
    herald.archive_broadcast(bigint), herald.unarchive_broadcast(bigint), herald.delete_broadcast(bigint)
TO herald_admin;
GRANT EXECUTE ON FUNCTION
    herald.archive_list(text, text), herald.unarchive_list(text, text), herald.delete_list(text, text)
TO herald_app, herald_admin;
-- changing a journey, and previewing a change: the admin's, like create_automation
GRANT EXECUTE ON FUNCTION
    herald.update_automation(bigint, jsonb, jsonb), herald.preview_automation_update(bigint, jsonb, jsonb)
TO herald_admin;

-- herald_worker (and herald_admin): the daemon
GRANT EXECUTE ON FUNCTION
    herald.claim(text, int, interval), herald.complete(jsonb), herald.reap(), herald.tick(int),
    herald.flush_stats(), herald.advance_broadcasts(int), herald.record_feedback(jsonb, text),
    herald.prune(interval, interval, interval, interval), herald.advance_results(int), herald._my_workspaces(), herald.provider_kinds()
TO herald_worker, herald_admin;
GRANT EXECUTE ON FUNCTION herald.take_tick_wakeup() TO herald_worker, herald_admin;
-- the operator's page runs as a role in herald_admin, or on the daemon's pool
GRANT EXECUTE ON FUNCTION
    herald.admin_session_ok(text, timestamptz), herald.admin_sign_out(text, text, timestamptz, boolean)
TO herald_worker, herald_admin;
GRANT EXECUTE ON FUNCTION herald.oldest_snapshot(interval) TO herald_worker, herald_admin;
-- the HTTP API: an admin makes and revokes keys; the daemon serves /v1/… through api_call, which acts
-- only for the workspace of the key it is given (a key is the capability, checked in the database)
GRANT EXECUTE ON FUNCTION
    herald.create_api_key(text, text, text[]), herald.revoke_api_key(text, bigint), herald.list_api_keys(text)
TO herald_admin;
GRANT EXECUTE ON FUNCTION herald.api_call(text, text, jsonb, text), herald.api_key_workspace(text, text)
TO herald_worker, herald_admin;

-- ------------------------------------------------------------------------------- tables and views

-- Reads: views run as the reader (security_invoker), so the tables' row-level security applies to them.
ALTER VIEW herald.automation_overview SET (security_invoker = true);
ALTER VIEW herald.broadcast_overview SET (security_invoker = true);
ALTER VIEW herald.step_history SET (security_invoker = true);
ALTER VIEW herald.pending_approvals SET (security_invoker = true);
ALTER VIEW herald.dead_letters SET (security_invoker = true);
ALTER VIEW herald.queue_status SET (security_invoker = true);
ALTER VIEW herald.list_overview SET (security_invoker = true);
ALTER VIEW herald.automation_history SET (security_invoker = true);
ALTER VIEW herald.result_subscription_overview SET (security_invoker = true);

GRANT SELECT ON
    herald.workspaces, herald.contacts, herald.contact_rejections, herald.events, herald.automations,
    herald.enrollments, herald.templates, herald.providers, herald.outbox, herald.message_history,
    herald.step_log, herald.stats_delta, herald.stats, herald.decide_cache, herald.list_members,
    herald.suppressions, herald.broadcasts, herald.broadcast_stats_delta, herald.broadcast_stats,
    herald.automation_overview, herald.broadcast_overview, herald.step_history, herald.pending_approvals,
    herald.dead_letters, herald.queue_status, herald.lists, herald.erasures, herald.list_overview
TO herald_app, herald_admin;
GRANT SELECT ON herald.workspace_grants, herald.rate_limits TO herald_admin;
GRANT SELECT ON herald.automation_versions, herald.automation_history TO herald_app, herald_admin;
GRANT SELECT ON herald.results, herald.result_subscriptions, herald.result_subscription_overview TO herald_app, herald_admin;
-- /metrics reads the queue depth
GRANT SELECT ON herald.outbox, herald.queue_status TO herald_worker;
-- events may also be written with plain INSERT (the dispatcher takes them from there)
GRANT INSERT ON herald.events TO herald_app, herald_admin;
GRANT USAGE ON SEQUENCE herald.events_id_seq TO herald_app, herald_admin;

-- Row-level security: a role that is not the owner (nor a superuser) sees and writes only the rows of
-- the workspaces it may act for. The owner (every SECURITY DEFINER function above) is not subject to it.
ALTER TABLE herald.workspaces ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.workspaces USING (id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.workspace_grants ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.workspace_grants USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.contacts ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.contacts USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.contact_rejections ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.contact_rejections USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.events ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.events USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.automations ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.automations USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.enrollments ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.enrollments USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.templates ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.templates USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.providers ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.providers USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.outbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.outbox USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.message_history ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.message_history USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.step_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.step_log USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.stats_delta ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.stats_delta USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.stats ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.stats USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.decide_cache ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.decide_cache USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.list_members ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.list_members USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.suppressions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.suppressions USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.broadcasts ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.broadcasts USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.broadcast_stats_delta ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.broadcast_stats_delta USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.broadcast_stats ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.broadcast_stats USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.automation_versions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.automation_versions USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.lists ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.lists USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.erasures ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.erasures USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.results ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.results USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.results_staged ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.results_staged USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.result_subscriptions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.result_subscriptions USING (workspace_id IN (SELECT herald._my_workspaces()));
-- archive marks and refused feedback (issue 13): read by the workspace's roles
GRANT SELECT ON herald.archived, herald.feedback_rejections TO herald_app, herald_admin;
ALTER TABLE herald.archived ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.archived USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.feedback_rejections ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.feedback_rejections USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.api_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.api_keys USING (workspace_id IN (SELECT herald._my_workspaces()));
ALTER TABLE herald.api_idempotency ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON herald.api_idempotency USING (workspace_id IN (SELECT herald._my_workspaces()));
-- shared across workspaces: only the owner and herald_admin's reads (no policy: nobody else sees a row)
ALTER TABLE herald.rate_limits ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin ON herald.rate_limits TO herald_admin USING (true);
ALTER TABLE herald.rate_grants ENABLE ROW LEVEL SECURITY;
-- the operator page's sign-outs: only through admin_session_ok and admin_sign_out (no policy, no grant)
ALTER TABLE herald.admin_signouts ENABLE ROW LEVEL SECURITY;

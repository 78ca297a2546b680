-- herald 0.6.0 -> 0.7.0
--   Release 0.6.0 is the SQL that landed on 2026-12-06 (commit 74747fb), kept in
--   sql/releases/herald--0.6.0.sql. Everything since, one marked block per change:
--   Functions replaced here lose SECURITY DEFINER (CREATE OR REPLACE resets it): it is set again at
--   the end of each block.

-- ==== autovacuum: the tables that churn are vacuumed at 2% dead (outbox, enrollments) or a fixed threshold (staging queues) ====
ALTER TABLE herald.outbox SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_limit = 2000);
ALTER TABLE herald.enrollments SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_limit = 2000);
ALTER TABLE herald.results_staged SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
                                       autovacuum_vacuum_cost_delay = 0);
ALTER TABLE herald.stats_delta SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
                                    autovacuum_vacuum_cost_delay = 0);
ALTER TABLE herald.broadcast_stats_delta SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
                                              autovacuum_vacuum_cost_delay = 0);
ALTER TABLE herald.rate_grants SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
                                    autovacuum_vacuum_cost_delay = 0);

-- ==== contacts: upsert_contacts finds repeated addresses by grouping the accepted ones (no window sort over every entry); events by contact on an int8 key ====
DROP INDEX herald.events_contact_kind_idx;
CREATE INDEX events_contact_idx ON herald.events (contact_id, workspace_id);

CREATE OR REPLACE FUNCTION herald.upsert_contacts(workspace text, contacts jsonb)
RETURNS TABLE (inserted bigint, updated bigint, rejected bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
AS $$
DECLARE
    v_ws text := workspace;
    v_with_nulls bigint[];
    v_too_large text;
    v_quiet boolean;
    v_restoring text;
    v_changed_ids bigint[];
    v_changed_emails text[];
    v_changed_payloads jsonb[];
BEGIN
    PERFORM herald._require_workspace(v_ws);
    IF jsonb_typeof(contacts) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'contacts must be a JSON array of objects, got %', coalesce(jsonb_typeof(contacts), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Example: [{"email": "ann@example.com", "attributes": {"plan": "pro"}, "timezone": "Europe/Paris"}]';
    END IF;

    -- one index probe (automations_live_trigger_idx; the primary key's range of the workspace when the
    -- statistics call it tiny). An automation set live by a transaction that has not committed yet is
    -- not seen, as the dispatcher's own snapshot would not see it either.
    v_quiet := NOT EXISTS (SELECT 1 FROM herald.automations a
                            WHERE a.workspace_id = v_ws AND a.trigger_event = 'contact.created' AND a.status = 'live');
    IF v_quiet THEN
        v_restoring := current_setting('herald.restoring', true);
        PERFORM set_config('herald.restoring', 'on', true);   -- put back right after the statement
    END IF;

    WITH input AS MATERIALIZED (
        -- each entry with its fault (NULL: accepted)
        SELECT x.position, x.entry, x.email, x.attrs, x.tz,
               herald._contact_entry_fault(x.entry, x.email, x.attrs, x.tz) AS fault
          FROM (SELECT (t.ord - 1)::int AS position, t.entry, herald._normalize_email(t.entry ->> 'email') AS email,
                       t.entry -> 'attributes' AS attrs, t.entry -> 'timezone' AS tz
                  FROM jsonb_array_elements(contacts) WITH ORDINALITY AS t(entry, ord)
                OFFSET 0) x   -- OFFSET 0: each field is taken out (and normalised) once, not once per reference
    ), rejects AS (
        INSERT INTO herald.contact_rejections (workspace_id, batch, position, input, reason)
        SELECT v_ws, txid_current(), i.position, i.entry, i.fault FROM input i WHERE i.fault IS NOT NULL
        ON CONFLICT (workspace_id, batch, position) DO UPDATE SET input = EXCLUDED.input, reason = EXCLUDED.reason
        RETURNING 1
    ), repeated AS (
        -- the addresses accepted more than once in this call (usually none), grouped over the addresses
        -- alone: a window count over the entries sorted whole cost ~7,600 instructions an entry (callgrind)
        SELECT i.email COLLATE "C" AS email FROM input i WHERE i.fault IS NULL GROUP BY 1 HAVING count(*) > 1
    ), good AS (
        -- an address given once is taken as it is; only repeated ones are merged, in input order
        -- (an ordered aggregate per address cost a sort per group: ~20 ms per 10,000 distinct ones).
        -- Read once, by `up`: not materialized. `(… IN (…)) = false` rather than NOT IN or a join: a
        -- hashed lookup per entry whatever the estimates (an IN at the top of WHERE becomes a join the
        -- planner may nest-loop; an accepted entry's address is never NULL, so neither is the test)
        -- (an accepted entry's timezone is absent, null or a valid name: #>> '{}' gives NULL or the name)
        SELECT a.email, coalesce(a.attrs, '{}') AS attrs, a.tz #>> '{}' AS tz
          FROM input a
         WHERE a.fault IS NULL AND (a.email IN (SELECT r.email FROM repeated r)) = false
        UNION ALL
        SELECT a.email,
               herald._jsonb_merge_agg(coalesce(a.attrs, '{}') ORDER BY a.position),
               (array_agg(a.tz #>> '{}' ORDER BY a.position DESC) FILTER (WHERE a.tz #>> '{}' IS NOT NULL))[1]
          FROM input a
         WHERE a.fault IS NULL AND (a.email IN (SELECT r.email FROM repeated r)) = true
         GROUP BY a.email
    ), up AS (
        INSERT INTO herald.contacts AS c (workspace_id, email, attributes, timezone)
        SELECT v_ws, g.email, g.attrs, g.tz FROM good g ORDER BY g.email COLLATE "C"   -- as _create_contacts
        ON CONFLICT (workspace_id, email) DO UPDATE
           SET attributes = herald._merge_attributes(c.attributes, EXCLUDED.attributes),
               timezone = coalesce(EXCLUDED.timezone, c.timezone),
               updated_at = now()
         WHERE c.attributes IS DISTINCT FROM herald._merge_attributes(c.attributes, EXCLUDED.attributes)
            OR c.timezone IS DISTINCT FROM coalesce(EXCLUDED.timezone, c.timezone)
        RETURNING c.id, c.email, c.attributes, (c.xmax = 0) AS is_new
    ), before AS MATERIALIZED (
        -- the stored attributes of the contacts this statement updated, as they were before it, as ONE
        -- id -> attributes object. Every part of one statement reads the same snapshot, so
        -- herald.contacts here still holds the old versions of the rows `up` changed; new contacts are
        -- not probed at all (a batch of new ones costs nothing here). LATERAL + LIMIT keeps each probe a
        -- primary-key lookup whatever the estimates say.
        SELECT coalesce(jsonb_object_agg(u.id::text, o.attributes), '{}') AS by_id FROM up u
         CROSS JOIN LATERAL (SELECT c.attributes FROM herald.contacts c
                              WHERE c.workspace_id = v_ws AND c.id = u.id LIMIT 1) o
         WHERE NOT u.is_new
    ), fresh AS MATERIALIZED (
        -- the new contacts with their attributes stripped of null values once: the contact.created
        -- payload, and what the stored row must end up as (see v_with_nulls)
        SELECT u.id, u.email, u.attributes, jsonb_strip_nulls(u.attributes) AS payload FROM up u WHERE u.is_new
    ), created AS (
        -- in contact id order without a sort: `fresh` holds the rows in the order the insert returned
        -- them, which is the order it drew their ids in
        INSERT INTO herald.events (workspace_id, contact_id, email, kind, payload)
        SELECT v_ws, f.id, f.email, 'contact.created', f.payload FROM fresh f
    ), changed AS (
        SELECT u.id, u.email, jsonb_build_object('changed', herald._changed_keys(b.by_id -> u.id::text, u.attributes)) AS payload
          FROM up u CROSS JOIN before b
         WHERE NOT u.is_new
    )
    -- (data-modifying CTEs always run to completion, referenced or not)
    SELECT n.inserted, (SELECT count(*) FROM input i WHERE i.fault IS NULL) - n.inserted,
           (SELECT count(*) FROM rejects),
           n.with_nulls,
           -- the dispatcher's bound on event payloads (when it is skipped): entries were checked one by
           -- one, but attributes merged from repeated ones can outgrow it
           (SELECT format('contact.created for %s (workspace %s): payload %s', quote_literal(f.email), quote_literal(v_ws),
                          herald._value_fault(f.payload))
              FROM fresh f WHERE herald._value_fault(f.payload) IS NOT NULL LIMIT 1),
           (SELECT array_agg(ch.id ORDER BY ch.id) FROM changed ch),
           (SELECT array_agg(ch.email ORDER BY ch.id) FROM changed ch),
           (SELECT array_agg(ch.payload ORDER BY ch.id) FROM changed ch)
      -- one pass over the new contacts. Stripping only removes pairs, so it changed a value iff it made it
      -- shorter: two lengths compared instead of two values walked (~5,000 instructions a contact less).
      -- Neither value is compressed here (RETURNING gives the row as built, not as stored); one that was
      -- would only cost an UPDATE that changes nothing.
      FROM (SELECT count(*) AS inserted,
                   array_agg(f.id) FILTER (WHERE pg_column_size(f.payload) <> pg_column_size(f.attributes)) AS with_nulls
              FROM fresh f) n
      INTO inserted, updated, rejected, v_with_nulls, v_too_large, v_changed_ids, v_changed_emails, v_changed_payloads;
    IF v_quiet THEN
        PERFORM set_config('herald.restoring', coalesce(v_restoring, ''), true);
    END IF;
    IF v_too_large IS NOT NULL THEN
        RAISE EXCEPTION '%', v_too_large USING ERRCODE = 'program_limit_exceeded';
    END IF;

    -- contact.updated events (an enrollment may wait on one): through the dispatcher, always
    IF v_changed_ids IS NOT NULL THEN
        INSERT INTO herald.events (workspace_id, contact_id, email, kind, payload)
        SELECT v_ws, ch.id, ch.email, 'contact.updated', ch.payload
          FROM unnest(v_changed_ids, v_changed_emails, v_changed_payloads) AS ch(id, email, payload)
         ORDER BY ch.id;
    END IF;

    -- New contacts keep no null-valued keys (ON CONFLICT needs the raw input in EXCLUDED to remove keys).
    IF v_with_nulls IS NOT NULL THEN
        UPDATE herald.contacts c SET attributes = jsonb_strip_nulls(c.attributes)
         WHERE c.workspace_id = v_ws AND c.id = ANY (v_with_nulls);
    END IF;
    RETURN NEXT;
END
$$;
ALTER FUNCTION herald.upsert_contacts(text, jsonb) SECURITY DEFINER;

-- ==== tick: the batch text joined with || (no per-row type lookups of concat/to_json for the status); the decide cache probed for decide jobs only; _ended_data without jsonb_build_object; integer-led keys of the two indexes tick inserts one entry into per enrollment ====
DROP INDEX herald.enrollments_automation_idx;
CREATE INDEX enrollments_automation_idx ON herald.enrollments (automation_id, workspace_id, status);
DROP INDEX herald.step_log_enrollment_idx;
CREATE INDEX step_log_enrollment_idx ON herald.step_log (enrollment_id, workspace_id, id);

CREATE OR REPLACE FUNCTION herald._ended_data(node text, reason text, context jsonb) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE   -- STABLE like jsonb_build_object(); a stricter label would block inlining
RETURN jsonb_set(jsonb_object(ARRAY['node', 'reason'], ARRAY[node, reason]), '{context}', coalesce(context, 'null'));

CREATE OR REPLACE FUNCTION herald.tick(max_steps int DEFAULT 10000) RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
SET enable_bitmapscan = off   -- due: walk enrollments_due_idx in next_run_at order and stop at the limit;
SET enable_sort = off         -- a bitmap scan and a sort read and sorted every due enrollment per tick
AS $$
DECLARE
    v_steps int;
BEGIN
    IF max_steps IS NULL OR max_steps < 1 OR max_steps > 100000 THEN
        RAISE EXCEPTION 'max_steps must be between 1 and 100000, got %', coalesce(max_steps::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    WITH due AS (
        -- up to max_steps due enrollments of live automations, oldest due first, locked (FOR UPDATE SKIP
        -- LOCKED: concurrent ticks never run a step twice). Inline, in this statement's snapshot: in a
        -- function of its own (a new snapshot per call, session 7) it locked enrollments committed after
        -- this statement began, which the UPDATE below then could not see, so they stayed due and their
        -- first step ran again (test_crash_recovery). next_run_at < 'infinity' lets enrollments_due_idx
        -- serve it. IS TRUE keeps the live test a hashed subplan (the live automations read once).
        SELECT e.workspace_id, e.id, e.automation_id, e.contact_id, e.status, e.current_node, e.visit,
               e.context, e.event,
               -- the version the enrollment is pinned to (sql/versions.sql); none written: version 1
               coalesce((e.event ->> 'version')::int, 1) AS version
          FROM herald.enrollments e
         WHERE e.status IN ('active', 'waiting') AND e.next_run_at <= now() AND e.next_run_at < 'infinity'
           AND ((e.workspace_id, e.automation_id) IN (SELECT a.workspace_id, a.id FROM herald.automations a
                                                       WHERE a.status = 'live')) IS TRUE
         ORDER BY e.next_run_at
         LIMIT max_steps
           FOR UPDATE OF e SKIP LOCKED
    ), defs AS (
        -- the definition of every (automation, version) in the batch, read once per version. An
        -- enrollment moved to a newer version by an update_automation that committed after this
        -- statement's snapshot (the row lock returns the moved row) finds no definition here and is left
        -- for the next tick, unchanged. Every automation has its version rows (create_automation writes
        -- version 1; the 0.2.0 upgrade wrote them for older ones).
        SELECT v.automation_id, v.version, v.definition
          FROM herald.automation_versions v
         WHERE (v.workspace_id, v.automation_id, v.version) IN (SELECT DISTINCT d.workspace_id, d.automation_id, d.version FROM due d)
    ), batch AS (
        -- the enrollments as the text of a JSON array, written out rather than built as json values
        -- (json_build_object per row, and the contact's facts as jsonb, were ~45 ms of a 10,000 batch):
        -- strings through to_json (quoted, escaped), jsonb through its text form, numbers as they print,
        -- every value that can be NULL coalesced to null. The contact goes in parts (attributes, email,
        -- tags, timezone); _steps joins them into the facts herald._contact_facts would make. Joined
        -- with || rather than concat(): concat looks up every argument's output function on every row.
        -- The status needs no escaping (the CHECK on enrollments.status allows five plain words);
        -- to_json looks up its argument's type on every call (~1,500 instructions each, callgrind).
        SELECT (SELECT json_object_agg(x.automation_id::text || ':' || x.version::text, x.definition) FROM defs x) AS automations,
               '[' || string_agg('{"id":' || d.id::text || ',"workspace_id":' || to_json(d.workspace_id)::text
                   || ',"automation_id":' || d.automation_id::text || ',"version":' || d.version::text
                   || ',"contact_id":' || d.contact_id::text || ',"status":"' || d.status
                   || '","node":' || to_json(d.current_node)::text || ',"visit":' || d.visit::text
                   || ',"context":' || d.context::text || ',"event":' || coalesce((d.event -> 'payload')::text, 'null')
                   || ',"attributes":' || coalesce(c.attributes::text, '{}') || ',"email":' || to_json(c.email)::text
                   || ',"tags":' || coalesce(array_to_json(c.tags)::text, '[]')
                   || ',"timezone":' || coalesce(to_json(c.timezone)::text, 'null') || '}', ',') || ']' AS enrollments
          FROM due d
          -- a primary-key probe per due row (a plain join was planned as a merge over the contacts index)
         CROSS JOIN LATERAL (SELECT c.email, c.attributes, c.timezone, c.tags FROM herald.contacts c
                              WHERE c.workspace_id = d.workspace_id AND c.id = d.contact_id LIMIT 1) c
         WHERE (d.automation_id, d.version) IN (SELECT x.automation_id, x.version FROM defs x)
    ), stepped AS MATERIALIZED (
        -- _steps passes workspace, automation and contact through: no join back to due, so the
        -- planner's estimate stays _steps' ROWS and the writes below probe indexes row by row
        -- instead of hashing whole tables (which grew with every enrollment ever made).
        -- A decide question already answered in the cache (a primary-key probe) takes the enrollment
        -- straight to the chosen path: cache_reply (the path is read from it in moved).
        SELECT s.*, j.jb, j.jb ->> 'kind' AS job_kind,
               -- decide: identical questions share one job per TTL window (and one cached reply)
               CASE WHEN j.jb ->> 'kind' = 'decide'
                    THEN format('decide:%s:%s', j.jb ->> 'request_hash',
                                floor(extract(epoch FROM now()) / greatest((j.jb ->> 'cache_ttl_seconds')::float8, 1)))
                    ELSE j.jb ->> 'dedupe_key' END AS job_key,
               -- probed for decide jobs only: as a lateral join it was a subquery run for every row
               -- (with the job's kind and key as another: 1.2% of tick's instructions, callgrind)
               CASE WHEN j.jb ->> 'kind' = 'decide'
                    THEN (SELECT c.reply FROM herald.decide_cache c
                           WHERE c.workspace_id = s.workspace_id AND c.request_hash = j.jb ->> 'request_hash'
                             AND c.expires_at > now()
                           LIMIT 1) END AS cache_reply
          FROM batch b
         CROSS JOIN LATERAL herald._steps(b.automations, b.enrollments, extract(epoch FROM now())::float8, 50) s
         -- the job as jsonb, parsed once: every ->> on a json value parses its text again (~10 per job
         -- below); OFFSET 0 keeps the cast from being copied into each of them
         CROSS JOIN LATERAL (SELECT s.job::jsonb AS jb OFFSET 0) j
    ), moved AS (
        UPDATE herald.enrollments e
           SET status = CASE WHEN st.cache_reply IS NOT NULL THEN 'active' ELSE st.status END,
               current_node = CASE WHEN st.cache_reply IS NOT NULL
                                   THEN coalesce(st.jb -> 'payload' -> 'paths' ->> (st.cache_reply ->> (st.jb -> 'payload' ->> 'field')),
                                                 st.jb -> 'payload' ->> 'default', st.node)
                                   ELSE st.node END,
               next_run_at = CASE WHEN st.cache_reply IS NOT NULL THEN now()
                                  ELSE coalesce(to_timestamp(st.next_run_at), 'infinity') END,
               visit = st.visit,
               context = CASE WHEN st.cache_reply IS NOT NULL THEN e.context || jsonb_build_object(st.node, st.cache_reply)
                              ELSE e.context END,
               exit_reason = st.exit_reason,
               ended_at = CASE WHEN st.status IN ('completed', 'exited', 'failed') THEN now() END,
               wait_kind = CASE WHEN st.cache_reply IS NOT NULL THEN NULL ELSE st.wait_kind END,
               wait_job = CASE WHEN st.cache_reply IS NULL AND st.wait_kind = 'job' THEN st.job_key END,
               wait_event = st.wait_event,
               wait_filter = st.wait_filter::jsonb,
               updated_at = now()
          FROM stepped st
         WHERE e.workspace_id = st.workspace_id AND e.id = st.enrollment_id
        RETURNING e.workspace_id, e.id, e.automation_id, e.contact_id, e.status, e.current_node, e.exit_reason,
                  e.context, e.wait_kind
    ), reported AS (
        -- the results stream (sql/results.sql): journeys that ended, and approvals asked for (a waiting
        -- enrollment due again always leaves its approval node: waiting on one now means it just came)
        INSERT INTO herald.results_staged (workspace_id, kind, contact_id, automation_id, enrollment_id, data)
        SELECT m.workspace_id, CASE WHEN m.wait_kind = 'approval' THEN 'approval.requested' ELSE 'enrollment.' || m.status END,
               m.contact_id, m.automation_id, m.id,
               CASE WHEN m.wait_kind = 'approval' THEN jsonb_build_object('node', m.current_node, 'context', m.context)
                    ELSE herald._ended_data(m.current_node, m.exit_reason, m.context) END
          FROM moved m
         WHERE m.status IN ('completed', 'exited', 'failed') OR m.wait_kind = 'approval'
    ), queued AS (
        INSERT INTO herald.outbox AS o (workspace_id, kind, priority, dedupe_key, provider, rate_keys, contact_id,
                                        automation_id, enrollment_id, node, on_success, on_error, payload)
        SELECT st.workspace_id, st.job_kind, 1, st.job_key, st.jb ->> 'provider',
               CASE WHEN st.job_kind = 'email'
                    THEN herald._email_rate_keys(st.workspace_id, st.jb ->> 'provider')
                    ELSE ARRAY['host:' || (st.jb ->> 'rate_host')] END,
               st.contact_id, st.automation_id, st.enrollment_id, st.jb ->> 'node',
               st.jb ->> 'on_success', st.jb ->> 'on_error',
               (st.jb -> 'payload') || jsonb_build_object('request_hash', st.jb ->> 'request_hash',
                                                                 'cache_ttl_seconds', (st.jb -> 'cache_ttl_seconds'))
          FROM (SELECT DISTINCT ON (x.job_key) x.* FROM stepped x
                 WHERE x.job IS NOT NULL AND x.cache_reply IS NULL
                 ORDER BY x.job_key, x.enrollment_id) st   -- one row per key: shared decide questions
         ORDER BY st.job_key
        ON CONFLICT (workspace_id, dedupe_key) WHERE broadcast_id IS NULL DO UPDATE
           -- a shared decide question that failed before is asked again for the newcomers
           SET status = 'pending', attempt = 0, run_at = now(), updated_at = now()
         WHERE o.kind = 'decide' AND o.status = 'failed'
        RETURNING 1
    ), contact_changes AS (
        SELECT st.workspace_id, st.contact_id,
               herald._jsonb_merge_agg(coalesce((st.contact_update -> 'set')::jsonb, '{}') ORDER BY st.enrollment_id) AS set_attrs,
               array_agg(DISTINCT t) FILTER (WHERE t IS NOT NULL) AS add_tags
          FROM stepped st
          LEFT JOIN LATERAL json_array_elements_text(st.contact_update -> 'add_tags') t ON true
         WHERE st.contact_update IS NOT NULL
         GROUP BY st.workspace_id, st.contact_id
    ), contact_removals AS (
        SELECT st.workspace_id, st.contact_id, array_agg(DISTINCT t) AS remove_tags
          FROM stepped st
         CROSS JOIN LATERAL json_array_elements_text(st.contact_update -> 'remove_tags') t
         GROUP BY st.workspace_id, st.contact_id
    ), contacts_updated AS (
        UPDATE herald.contacts c
           SET attributes = herald._merge_attributes(c.attributes, ch.set_attrs),
               tags = ARRAY(SELECT DISTINCT x FROM unnest(c.tags || coalesce(ch.add_tags, '{}')) x
                             WHERE x <> ALL (coalesce(r.remove_tags, '{}')) ORDER BY x),
               updated_at = now()
          FROM contact_changes ch
          LEFT JOIN contact_removals r ON r.workspace_id = ch.workspace_id AND r.contact_id = ch.contact_id
         WHERE c.workspace_id = ch.workspace_id AND c.id = ch.contact_id
        RETURNING 1
    ), list_moves AS (
        SELECT DISTINCT ON (st.workspace_id, l.list, st.contact_id)
               st.workspace_id, st.contact_id, l.list, l.status
          FROM stepped st
         CROSS JOIN LATERAL (
             SELECT j, 'subscribed' AS status FROM json_array_elements_text(st.contact_update -> 'add_lists') j
             UNION ALL
             SELECT j, 'unsubscribed' FROM json_array_elements_text(st.contact_update -> 'remove_lists') j) l(list, status)
         WHERE st.contact_update IS NOT NULL
         ORDER BY st.workspace_id, l.list, st.contact_id, st.enrollment_id DESC
    ), memberships AS (
        INSERT INTO herald.list_members AS m (workspace_id, list, contact_id, status)
        SELECT lm.workspace_id, lm.list, lm.contact_id, lm.status FROM list_moves lm
         ORDER BY lm.workspace_id, lm.list, lm.contact_id
        ON CONFLICT (workspace_id, list, contact_id) DO UPDATE SET status = EXCLUDED.status, updated_at = now()
         WHERE m.status <> EXCLUDED.status
        RETURNING m.workspace_id, m.contact_id, m.list, m.status
    ), list_events AS (
        -- reach the dispatcher, so automations can trigger on list.joined / list.left
        INSERT INTO herald.events (workspace_id, contact_id, kind, payload)
        SELECT mb.workspace_id, mb.contact_id,
               CASE mb.status WHEN 'subscribed' THEN 'list.joined' ELSE 'list.left' END,
               jsonb_build_object('list', mb.list)
          FROM memberships mb
        RETURNING 1
    ), logged AS (
        INSERT INTO herald.step_log (workspace_id, enrollment_id, automation_id, nodes, visits, actions)
        SELECT st.workspace_id, st.enrollment_id, st.automation_id, st.log_nodes, st.log_visits, st.log_actions
          FROM stepped st WHERE cardinality(st.log_nodes) > 0
        RETURNING 1
    ), counted AS (
        INSERT INTO herald.stats_delta (workspace_id, automation_id, node, metric, n)
        -- _steps sums the batch's counts per (automation, node, metric) on its first row; the
        -- automations of one batch may belong to several workspaces
        SELECT a.workspace_id, c.automation, c.node, c.metric, c.n
          FROM stepped st
         CROSS JOIN LATERAL unnest(st.count_automations, st.count_nodes, st.count_metrics, st.count_n) c(automation, node, metric, n)
          JOIN herald.automations a ON a.id = c.automation
         WHERE st.count_automations IS NOT NULL
        RETURNING 1
    )
    SELECT count(*) INTO v_steps FROM stepped;
    -- the results stream moves on with every tick (sql/results.sql), so whoever ticks keeps it published
    -- and its subscriptions served; one caller at a time does it, the others skip at once. A caller that
    -- publishes on its own says so with herald.tick_publishes_results = off (herald run sets it on its
    -- connections: it publishes every 250 ms and after each tick round, beside the ticks)
    IF coalesce(current_setting('herald.tick_publishes_results', true), '') NOT IN ('off', 'false', '0') THEN
        PERFORM herald.advance_results(100000);
    END IF;
    RETURN v_steps;
END
$$;
ALTER FUNCTION herald.tick(int) SECURITY DEFINER;

-- ==== track: reentry-always enrollments inserted without ON CONFLICT; _wake_tick is notify_tick's trigger function ====
CREATE OR REPLACE FUNCTION herald._dispatch() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- short OLTP statements: an LLVM compile would cost more than the statement
AS $$
DECLARE
    v_any boolean;
    v_by_email boolean;
    v_bad_payload text;
    v_bad_workspaces text;
    v_bad text;
    v_woken int;
BEGIN
    -- a dump being loaded: these events were dispatched in the database they come from
    IF herald._restoring() THEN
        RETURN NULL;
    END IF;
    -- What the statement inserted, and 1. integrity, all read in ONE statement (each statement a trigger
    -- runs costs its own executor start-up: one per check was ~a tenth of track()'s time in the server).
    -- Payloads bounded like track's (for plain INSERT and COPY; the check prints only payloads large
    -- enough to be out of bounds). The faults are raised below in this order.
    SELECT EXISTS (SELECT 1 FROM new_events),
           EXISTS (SELECT 1 FROM new_events n WHERE n.contact_id IS NULL),
           (SELECT format('event %s (workspace %s): payload %s', n.id, quote_literal(n.workspace_id), herald._value_fault(n.payload))
              FROM new_events n WHERE herald._value_fault(n.payload) IS NOT NULL LIMIT 1),
           (SELECT string_agg(DISTINCT quote_literal(n.workspace_id), ', ')
              FROM new_events n
             WHERE NOT EXISTS (SELECT 1 FROM herald.workspaces w WHERE w.id = n.workspace_id)),
           (SELECT string_agg(format('%s (workspace %s)', b.contact_id, quote_literal(b.workspace_id)), ', ')
              FROM (SELECT DISTINCT n.workspace_id, n.contact_id
                      FROM new_events n
                     WHERE n.contact_id IS NOT NULL
                       AND NOT EXISTS (SELECT 1 FROM herald.contacts c
                                        WHERE c.workspace_id = n.workspace_id AND c.id = n.contact_id)
                     LIMIT 10) b)
      INTO v_any, v_by_email, v_bad_payload, v_bad_workspaces, v_bad;
    -- statements that inserted nothing (tick's list events, usually) cost one check, not a dispatch
    IF NOT v_any THEN
        RETURN NULL;
    END IF;
    IF v_bad_payload IS NOT NULL THEN
        RAISE EXCEPTION '%', v_bad_payload USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF v_bad_workspaces IS NOT NULL THEN
        RAISE EXCEPTION 'events for unknown workspace(s) %', v_bad_workspaces
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'Create the workspace first with herald.create_workspace(id, name).';
    END IF;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'events name unknown contact id(s): %', v_bad
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'Give the email instead of contact_id to create contacts on the fly.';
    END IF;

    -- 2. events that name their contact by email only
    IF v_by_email THEN
        SELECT string_agg(quote_literal(b.email), ', ') INTO v_bad
          FROM (SELECT DISTINCT n.email FROM new_events n
                 WHERE n.contact_id IS NULL AND NOT herald._valid_email(herald._normalize_email(n.email))
                 LIMIT 10) b;
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'events carry invalid email address(es): %', v_bad
                USING ERRCODE = 'invalid_parameter_value';
        END IF;

        PERFORM herald._create_contacts(m.workspaces, m.emails)
           FROM (SELECT array_agg(n.workspace_id) AS workspaces, array_agg(herald._normalize_email(n.email)) AS emails
                   FROM new_events n WHERE n.contact_id IS NULL) m;

        UPDATE herald.events e
           SET contact_id = c.id, email = c.email
          FROM new_events n
          JOIN herald.contacts c ON c.email = herald._normalize_email(n.email) AND c.workspace_id IS NOT DISTINCT FROM n.workspace_id
         WHERE n.contact_id IS NULL AND e.workspace_id = n.workspace_id AND e.id = n.id;
    END IF;

    -- 3. enrol into every live automation whose trigger matches, with the 'enrolled' stats deltas. One
    --    statement.
    WITH ev AS (
        SELECT n.workspace_id, n.id, n.contact_id, n.kind, n.payload
          FROM new_events n WHERE n.contact_id IS NOT NULL
        UNION ALL
        SELECT n.workspace_id, n.id, c.id, n.kind, n.payload
          FROM new_events n
         CROSS JOIN LATERAL (SELECT c.id FROM herald.contacts c
                              WHERE c.email = herald._normalize_email(n.email) AND c.workspace_id IS NOT DISTINCT FROM n.workspace_id
                              LIMIT 1) c   -- LIMIT: keeps it a parameterized unique-index probe (see contacts' index)
         WHERE n.contact_id IS NULL
    ), candidate AS (
        SELECT ev.workspace_id, ev.id AS event_id, ev.contact_id, ev.kind, ev.payload,
               a.id AS automation_id, a.reentry, a.start_node, a.trigger_filter, a.filter_reads_contact
          FROM ev
          JOIN herald.automations a
            ON a.workspace_id = ev.workspace_id AND a.trigger_event = ev.kind
           AND a.status = 'live' AND a.trigger_event IS NOT NULL
    ), matched AS (
        -- the contact is fetched and turned into facts only for filters that read contact.* fields
        SELECT k.* FROM candidate k
         WHERE k.trigger_filter IS NULL
            OR (NOT k.filter_reads_contact AND herald._matches(k.trigger_filter, NULL, k.payload, NULL))
            OR (k.filter_reads_contact AND herald._matches(k.trigger_filter,
                   (SELECT herald._contact_facts(c.email, c.attributes, c.timezone, c.tags) FROM herald.contacts c
                     WHERE c.workspace_id = k.workspace_id AND c.id = k.contact_id),
                   k.payload, NULL))
    ), fresh AS (
        -- the newest version (sql/versions.sql), read in this statement's snapshot like start_node, so the
        -- two agree; version 1 is not written. A column, not a sub-select, as _version_tag's argument, so
        -- the function is inlined (with a sub-select it was called as a function, per enrollment)
        SELECT m.workspace_id, m.automation_id, m.contact_id, herald._entry_key(m.reentry, m.event_id) AS entry_key,
               m.start_node, m.event_id,
               jsonb_build_object('kind', m.kind, 'payload', m.payload) || herald._version_tag(nv.version) AS event
          FROM matched m
         CROSS JOIN LATERAL (SELECT max(v.version) AS version FROM herald.automation_versions v
                              WHERE v.workspace_id = m.workspace_id AND v.automation_id = m.automation_id) nv
    ), enrolled_by_event AS (
        -- reentry always: the key 'event:<id>' names an event this statement inserted, so no other
        -- transaction can be inserting it: a plain insert, without ON CONFLICT's speculative insertion
        -- (its token lock and confirm record: one WAL record and ~0.005 ms an enrollment). An enrollment
        -- holds the key already only when the event's id was given explicitly after the event that had
        -- it was deleted; it is left alone, as ON CONFLICT DO NOTHING did. The probe names every column
        -- and the predicate of enrollments_entry_uq, so whatever the statistics it is one descent of
        -- that unique index (a probe without the predicate could not use it and was planned on
        -- enrollments_automation_idx on tables never analysed: every enrollment of the automation read);
        -- OFFSET 0 keeps it a probe per row, not a join the planner orders by statistics
        INSERT INTO herald.enrollments (workspace_id, automation_id, contact_id, entry_key, current_node, event_id, event)
        SELECT f.workspace_id, f.automation_id, f.contact_id, f.entry_key, f.start_node, f.event_id, f.event
          FROM fresh f
         WHERE f.entry_key LIKE 'event:%'
           AND NOT EXISTS (SELECT 1 FROM herald.enrollments e
                            WHERE e.workspace_id = f.workspace_id AND e.automation_id = f.automation_id
                              AND e.contact_id = f.contact_id AND e.entry_key = f.entry_key
                              AND (e.entry_key <> 'active' OR e.status IN ('active', 'waiting'))
                           OFFSET 0)
         ORDER BY f.workspace_id, f.automation_id, f.contact_id, f.event_id
        RETURNING workspace_id, automation_id
    ), enrolled_by_rule AS (
        -- reentry once / active: ON CONFLICT DO NOTHING on the re-entry key (concurrent events of one
        -- contact enrol once); its arbiter index is not left to the planner
        INSERT INTO herald.enrollments (workspace_id, automation_id, contact_id, entry_key, current_node, event_id, event)
        SELECT f.workspace_id, f.automation_id, f.contact_id, f.entry_key, f.start_node, f.event_id, f.event
          FROM fresh f
         WHERE f.entry_key NOT LIKE 'event:%'
         ORDER BY f.workspace_id, f.automation_id, f.contact_id, f.event_id
        ON CONFLICT (workspace_id, automation_id, contact_id, entry_key)
           WHERE entry_key <> 'active' OR status IN ('active', 'waiting')
           DO NOTHING
        RETURNING workspace_id, automation_id
    )
    INSERT INTO herald.stats_delta (workspace_id, automation_id, metric, n)
    SELECT x.workspace_id, x.automation_id, 'enrolled', count(*)
      FROM (SELECT * FROM enrolled_by_event UNION ALL SELECT * FROM enrolled_by_rule) x
     GROUP BY 1, 2;

    -- 4. wake the enrollments parked on a wait_event node for one of these events (first matching event
    --    wins). A statement of its own, run only when a probe finds one waiting (events given by email
    --    only: always): most events wake nothing, and the wake-up's plan (an UPDATE of enrollments and
    --    its indexes) cost its executor start-up on every event when it was part of statement 3.
    IF NOT v_by_email AND NOT EXISTS (
        SELECT 1 FROM new_events n
         WHERE EXISTS (SELECT 1 FROM herald.enrollments e
                        WHERE e.workspace_id = n.workspace_id AND e.contact_id = n.contact_id
                          AND e.wait_event = n.kind AND e.wait_kind = 'event' AND e.ended_at IS NULL
                       OFFSET 0)) THEN   -- OFFSET 0: an enrollments_wait_event_idx probe per event
        RETURN NULL;
    END IF;
    WITH ev AS (
        SELECT n.workspace_id, n.id, n.contact_id, n.kind, n.payload
          FROM new_events n WHERE n.contact_id IS NOT NULL
        UNION ALL
        SELECT n.workspace_id, n.id, c.id, n.kind, n.payload
          FROM new_events n
         CROSS JOIN LATERAL (SELECT c.id FROM herald.contacts c
                              WHERE c.email = herald._normalize_email(n.email) AND c.workspace_id IS NOT DISTINCT FROM n.workspace_id
                              LIMIT 1) c   -- LIMIT: keeps it a parameterized unique-index probe (see contacts' index)
         WHERE n.contact_id IS NULL
    ), awaited AS (
        -- one probe of enrollments_wait_event_idx per event, and the contact and the automation read by
        -- key only where needed. OFFSET 0 keeps the planner from turning the probe into a join it orders
        -- by statistics: on tables autovacuum had not analysed yet it scanned every waiting enrollment
        -- once per event (266 wake-ups/s instead of 22,000)
        SELECT DISTINCT ON (x.id) x.workspace_id, x.id, ev.payload,
               -- the next node in the version the enrollment is pinned to (update_automation)
               herald._version_definition(x.workspace_id, x.automation_id, coalesce((x.event ->> 'version')::int, 1))
                   -> 'nodes' -> x.current_node ->> 'next' AS next_node
          FROM ev
         CROSS JOIN LATERAL (SELECT e.workspace_id, e.id, e.contact_id, e.automation_id, e.current_node,
                                    e.wait_filter, e.context, e.event
                               FROM herald.enrollments e
                              WHERE e.workspace_id = ev.workspace_id AND e.contact_id = ev.contact_id
                                AND e.wait_event = ev.kind AND e.wait_kind = 'event' AND e.ended_at IS NULL
                                -- not status = 'waiting': that would let the planner read
                                -- enrollments_due_idx instead (see complete); re-checked on the row
                                AND e.status IS NOT DISTINCT FROM 'waiting'
                             OFFSET 0) x
         WHERE x.wait_filter IS NULL
            OR herald._matches(x.wait_filter,
                               (SELECT herald._contact_facts(c.email, c.attributes, c.timezone, c.tags)
                                  FROM herald.contacts c WHERE c.workspace_id = x.workspace_id AND c.id = x.contact_id),
                               ev.payload, x.context)
         ORDER BY x.id, ev.id
    ), woken AS (
        UPDATE herald.enrollments e
           SET status = 'active', next_run_at = now(), updated_at = now(),
               current_node = w.next_node,
               context = e.context || jsonb_build_object(e.current_node, w.payload),
               wait_kind = NULL, wait_event = NULL, wait_filter = NULL
          FROM awaited w
         WHERE e.id = w.id
           -- by id alone (enrollments_id_idx): IS NOT DISTINCT FROM is not indexable, so a planner without
           -- statistics cannot drive this update from another index it guesses at one row (it picked the
           -- partial wait index, then (workspace_id, automation_id) and filtered every enrollment by id);
           -- status and wait_kind are re-checked on the locked row
           AND e.workspace_id IS NOT DISTINCT FROM w.workspace_id
           AND e.status IS NOT DISTINCT FROM 'waiting' AND e.wait_kind IS NOT DISTINCT FROM 'event'
        RETURNING 1
    )
    SELECT count(*) INTO v_woken FROM woken;
    IF v_woken > 0 THEN
        PERFORM pg_notify('herald.tick', '');
    END IF;

    RETURN NULL;
END
$$;
ALTER FUNCTION herald._dispatch() SECURITY DEFINER;

DROP TRIGGER notify_tick ON herald.enrollments;
DROP FUNCTION herald._wake_tick();
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
REVOKE ALL ON FUNCTION herald._wake_tick() FROM PUBLIC;

CREATE OR REPLACE FUNCTION herald._notify() RETURNS trigger
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
CREATE TRIGGER notify_tick AFTER INSERT ON herald.enrollments
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION herald._wake_tick();

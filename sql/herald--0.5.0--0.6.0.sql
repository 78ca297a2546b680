-- herald 0.5.0 -> 0.6.0
--   Release 0.5.0 is the SQL that landed on 2026-12-06 (commit 2a3cd69), kept in
--   sql/releases/herald--0.5.0.sql. Everything since, one marked block per change:
--   Functions replaced here lose SECURITY DEFINER (CREATE OR REPLACE resets it): it is set again at
--   the end of each block.

-- ==== tick: enrollment indexes that tick's updates insert same-key entries into, fillfactor 50 ====
-- Pages split from now on keep half their room (existing pages are left as they are: no rebuild).
ALTER INDEX herald.enrollments_pkey SET (fillfactor = 50);
ALTER INDEX herald.enrollments_id_idx SET (fillfactor = 50);
ALTER INDEX herald.enrollments_entry_uq SET (fillfactor = 50);

-- ==== contacts: upsert_contacts takes each entry's fields out once, strips each new contact's attributes once ====
-- _contact_entry_fault(entry, email) becomes (entry, email, attributes, timezone): the caller passes the
-- fields it has already taken out of the entry. New function first, then its callers, then the old one goes.
CREATE FUNCTION herald._contact_entry_fault(entry jsonb, email text, attributes jsonb, timezone jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE   -- STABLE like format(); a stricter label would block inlining
RETURN CASE
    WHEN jsonb_typeof(entry) IS DISTINCT FROM 'object' THEN
        format('entry must be a JSON object, got %s', coalesce(jsonb_typeof(entry), 'NULL'))
    WHEN (entry - ARRAY['email', 'attributes', 'timezone']) <> '{}' THEN
        format('unknown key(s) in %s; allowed: email, attributes, timezone', entry - ARRAY['email', 'attributes', 'timezone'])
    WHEN jsonb_typeof(entry -> 'email') IS DISTINCT FROM 'string' THEN 'email is missing or not a string'
    WHEN NOT herald._valid_email(email) THEN
        format('email %s is not a valid address', entry -> 'email')
    WHEN jsonb_typeof(attributes) <> 'object' THEN   -- NULL (no attributes) passes
        format('attributes must be a JSON object, got %s', jsonb_typeof(attributes))
    WHEN herald._value_fault(attributes) IS NOT NULL THEN
        'attributes ' || herald._value_fault(attributes)
    WHEN CASE jsonb_typeof(timezone) WHEN 'string' THEN NOT herald._valid_timezone(timezone #>> '{}')
                                     WHEN 'null' THEN false
                                     ELSE timezone IS NOT NULL END THEN   -- absent or null passes
        format('timezone %s is not an IANA time zone name such as "Europe/Paris"', timezone)
END;
REVOKE ALL ON FUNCTION herald._contact_entry_fault(jsonb, text, jsonb, jsonb) FROM PUBLIC;

CREATE OR REPLACE FUNCTION herald._contact_entry_fault(entry jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN herald._contact_entry_fault(entry, herald._normalize_email(entry ->> 'email'), entry -> 'attributes', entry -> 'timezone');

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
        -- each entry's fault, and how often its address occurs in the call (one sort, in byte order:
        -- cheaper than the collation's, and the order contacts are inserted in; a rejected entry may
        -- count, which only sends its address through the merge below, to the same result)
        SELECT x.position, x.entry, x.email, x.attrs, x.tz,
               herald._contact_entry_fault(x.entry, x.email, x.attrs, x.tz) AS fault,
               count(*) OVER (PARTITION BY x.email COLLATE "C") AS copies
          FROM (SELECT (t.ord - 1)::int AS position, t.entry, herald._normalize_email(t.entry ->> 'email') AS email,
                       t.entry -> 'attributes' AS attrs, t.entry -> 'timezone' AS tz
                  FROM jsonb_array_elements(contacts) WITH ORDINALITY AS t(entry, ord)
                OFFSET 0) x   -- OFFSET 0: each field is taken out (and normalised) once, not once per reference
    ), rejects AS (
        INSERT INTO herald.contact_rejections (workspace_id, batch, position, input, reason)
        SELECT v_ws, txid_current(), i.position, i.entry, i.fault FROM input i WHERE i.fault IS NOT NULL
        ON CONFLICT (workspace_id, batch, position) DO UPDATE SET input = EXCLUDED.input, reason = EXCLUDED.reason
        RETURNING 1
    ), good AS (
        -- an address given once is taken as it is; only repeated ones are merged, in input order
        -- (an ordered aggregate per address cost a sort per group: ~20 ms per 10,000 distinct ones).
        -- Read once, by `up`: not materialized
        -- (an accepted entry's timezone is absent, null or a valid name: #>> '{}' gives NULL or the name)
        SELECT a.email, coalesce(a.attrs, '{}') AS attrs, a.tz #>> '{}' AS tz
          FROM input a
         WHERE a.fault IS NULL AND a.copies = 1
        UNION ALL
        SELECT a.email,
               herald._jsonb_merge_agg(coalesce(a.attrs, '{}') ORDER BY a.position),
               (array_agg(a.tz #>> '{}' ORDER BY a.position DESC) FILTER (WHERE a.tz #>> '{}' IS NOT NULL))[1]
          FROM input a
         WHERE a.fault IS NULL AND a.copies > 1
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
        INSERT INTO herald.events (workspace_id, contact_id, email, kind, payload)
        SELECT v_ws, f.id, f.email, 'contact.created', f.payload FROM fresh f ORDER BY f.id
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

DROP FUNCTION herald._contact_entry_fault(jsonb, text);
ALTER FUNCTION herald.upsert_contacts(text, jsonb) SECURITY DEFINER;

-- ==== track: track() on a path of its own, the dispatcher's checks in one statement and its wake-up apart, inlinable security helpers ====
-- _caller, _serves_all_workspaces and _restoring lose SET search_path (RETURN bodies are bound when
-- created), so Postgres inlines them; track becomes PL/pgSQL (its plans kept for the session).
CREATE OR REPLACE FUNCTION herald._caller() RETURNS name
LANGUAGE sql STABLE
RETURN CASE WHEN current_setting('role') = 'none' THEN session_user ELSE current_setting('role')::name END;

CREATE OR REPLACE FUNCTION herald._serves_all_workspaces() RETURNS boolean
LANGUAGE sql STABLE
RETURN pg_has_role(herald._caller(), 'herald_admin', 'USAGE')
    OR pg_has_role(herald._caller(), 'herald_worker', 'USAGE');

CREATE OR REPLACE FUNCTION herald._restoring() RETURNS boolean
LANGUAGE sql STABLE
RETURN coalesce(current_setting('herald.restoring', true), '') IN ('on', 'true', '1')
    OR (current_setting('check_function_bodies') = 'off' AND current_setting('row_security') = 'off');

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
    ), enrolled AS (
        -- ON CONFLICT DO NOTHING for every re-entry rule. For reentry always (key 'event:<id>') a plain
        -- insert behind a NOT EXISTS probe of the key would skip the speculative insertion (~13 µs an
        -- enrollment), but on tables never analysed the probe was planned on enrollments_automation_idx
        -- and read every enrollment of the automation (5-9 ms with 5,000): ON CONFLICT's arbiter index
        -- is not left to the planner
        INSERT INTO herald.enrollments (workspace_id, automation_id, contact_id, entry_key, current_node, event_id, event)
        SELECT f.workspace_id, f.automation_id, f.contact_id, f.entry_key, f.start_node, f.event_id, f.event
          FROM fresh f
         ORDER BY f.workspace_id, f.automation_id, f.contact_id, f.event_id
        ON CONFLICT (workspace_id, automation_id, contact_id, entry_key)
           WHERE entry_key <> 'active' OR status IN ('active', 'waiting')
           DO NOTHING
        RETURNING workspace_id, automation_id
    )
    INSERT INTO herald.stats_delta (workspace_id, automation_id, metric, n)
    SELECT x.workspace_id, x.automation_id, 'enrolled', count(*) FROM enrolled x GROUP BY 1, 2;

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

CREATE OR REPLACE FUNCTION herald.track(workspace text, email text, kind text, payload jsonb DEFAULT '{}') RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_ws text := track.workspace;
    v_fault text;
    v_email text;
    v_contact bigint;
    v_id bigint;
BEGIN
    PERFORM herald._require_workspace(v_ws);
    v_fault := herald._event_entry_fault(jsonb_build_object('email', track.email, 'kind', track.kind,
                                                            'payload', coalesce(track.payload, '{}')));
    IF v_fault IS NOT NULL THEN
        RAISE EXCEPTION 'track: %', v_fault
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = '1 of 1 entries are invalid; nothing was recorded.';
    END IF;
    v_email := herald._normalize_email(track.email);

    -- the contact: a unique-index probe (see contacts' index); created only when it is missing
    SELECT c.id INTO v_contact FROM herald.contacts c
     WHERE c.email = v_email AND c.workspace_id IS NOT DISTINCT FROM v_ws LIMIT 1;
    IF v_contact IS NULL THEN
        SELECT n.id INTO v_contact FROM herald._create_contacts(ARRAY[v_ws], ARRAY[v_email]) n;
        IF v_contact IS NULL THEN
            -- another transaction created it first (its insert was waited for): committed by now
            SELECT c.id INTO v_contact FROM herald.contacts c
             WHERE c.email = v_email AND c.workspace_id IS NOT DISTINCT FROM v_ws LIMIT 1;
        END IF;
        IF v_contact IS NULL THEN
            -- only a snapshot older than that commit (REPEATABLE READ or SERIALIZABLE) gets here
            RAISE EXCEPTION 'track: contact % was created by a concurrent transaction this one cannot see', quote_literal(v_email)
                USING ERRCODE = 'serialization_failure', HINT = 'Retry the transaction.';
        END IF;
    END IF;

    INSERT INTO herald.events (workspace_id, contact_id, email, kind, payload, occurred_at)
    VALUES (v_ws, v_contact, v_email, track.kind, coalesce(track.payload, '{}'), now())
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

ALTER FUNCTION herald._dispatch() SECURITY DEFINER;
ALTER FUNCTION herald.track(text, text, text, jsonb) SECURITY DEFINER;

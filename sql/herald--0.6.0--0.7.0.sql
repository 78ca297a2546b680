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

-- ==== contacts: upsert_contacts finds repeated addresses by hashing (no window sort); events by contact on an int8 key ====
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

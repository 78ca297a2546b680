-- herald: workspaces and contacts.

-- Emails are stored trimmed and lower-cased; every lookup goes through this function.
CREATE FUNCTION herald._normalize_email(email text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN lower(btrim(email));

-- herald._valid_email(text) (Rust, extension/src/mailbox.rs): one @, no whitespace, a dot in the domain,
-- at most 254 characters, no control or bidirectional-formatting characters (they pass for invisible in
-- a mail client or an operator's page, and can make one address display as another); false, never NULL,
-- for NULL. The same rule as a template's sender (herald._valid_mailbox).

-- Creates the contacts that do not exist yet, each with its contact.created event (payload {}: made
-- from an address alone), and returns the ones it created. The one rule for a contact made on the fly:
-- events naming an unknown address (the dispatcher, track/track_many) and send() call it.
-- (upsert_contacts makes contacts with attributes, and its contact.created carries them.)
-- Takes (workspace, email) pairs as two parallel arrays, the emails normalised and valid already
-- (every caller has refused invalid ones). Contacts are inserted in (workspace, email) order, so two
-- callers lock in the same order and cannot deadlock (byte order, COLLATE "C", as upsert_contacts; the
-- database's collation may order some addresses differently); the events follow in contact id order. One
-- statement whatever the number of addresses. Internal: granted to no role.
CREATE FUNCTION herald._create_contacts(workspaces text[], emails text[])
RETURNS TABLE (workspace_id text, id bigint, email text)
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH created AS (
        INSERT INTO herald.contacts AS c (workspace_id, email)
        SELECT d.w, d.e FROM (SELECT DISTINCT u.w, u.e FROM unnest(workspaces, emails) u(w, e)) d
         ORDER BY d.w COLLATE "C", d.e COLLATE "C"   -- the order upsert_contacts inserts in too
        ON CONFLICT (workspace_id, email) DO NOTHING
        RETURNING c.workspace_id, c.id, c.email
    ), announced AS (
        INSERT INTO herald.events (workspace_id, contact_id, email, kind, payload)
        SELECT c.workspace_id, c.id, c.email, 'contact.created', '{}' FROM created c ORDER BY c.id
    )
    SELECT c.workspace_id, c.id, c.email FROM created c;
END
$$;

-- `a || b`, then drop null values: a key set to null is removed. (Stored attributes never hold nulls, at
-- any depth.) A plain expression, so Postgres inlines it into the statements that call it.
CREATE FUNCTION herald._merge_attributes(a jsonb, b jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN jsonb_strip_nulls(coalesce(a, '{}') || coalesce(b, '{}'));

-- Later objects override earlier ones key by key (duplicate emails inside one upsert_contacts call).
CREATE AGGREGATE herald._jsonb_merge_agg(jsonb) (
    SFUNC = jsonb_concat,
    STYPE = jsonb,
    INITCOND = '{}'
);

-- The names of the top-level keys whose values differ between a and b.
CREATE FUNCTION herald._changed_keys(a jsonb, b jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT coalesce(array_agg(k ORDER BY k), '{}')
          FROM (SELECT jsonb_object_keys(coalesce(a, '{}')) UNION SELECT jsonb_object_keys(coalesce(b, '{}'))) AS keys(k)
         WHERE a -> k IS DISTINCT FROM b -> k);

-- Raises unless the workspace exists. Used at the top of every function that takes one.
CREATE FUNCTION herald._require_workspace(workspace text) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF workspace IS NULL THEN
        RAISE EXCEPTION 'workspace must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- the caller's right first: to a tenant, another tenant's workspace and an unknown one look alike
    PERFORM herald._authorize(workspace);
    IF NOT EXISTS (SELECT 1 FROM herald.workspaces w WHERE w.id = workspace) THEN
        RAISE EXCEPTION 'unknown workspace "%"', workspace
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'Create it first with herald.create_workspace(id, name).';
    END IF;
END
$$;

CREATE FUNCTION herald.create_workspace(id text, name text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF id IS NULL OR id !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$' THEN
        RAISE EXCEPTION 'invalid workspace id %', coalesce(quote_literal(id), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'A workspace id is 1 to 64 characters: letters, digits, "_", "-" and ".", starting with a letter or digit.';
    END IF;
    INSERT INTO herald.workspaces AS w (id, name) VALUES (id, coalesce(name, id))
    ON CONFLICT ON CONSTRAINT workspaces_pkey DO UPDATE SET name = coalesce(create_workspace.name, w.name);
    RETURN id;
END
$$;

-- Validates one upsert_contacts entry; NULL when it is acceptable, else the reason. No sub-selects, so
-- Postgres inlines it (a non-inlined SQL function costs ~30 µs per row).
-- Why a JSON value a tenant stores (event payload, contact attributes, a send's context) is out of
-- bounds, or NULL: at most 32 levels deep and 64 KiB. Deeper values broke every tick for every workspace
-- once (the engine's JSON parser stops at 128 levels). Small values, the common case, are not even
-- printed: 33 levels take more than 256 bytes (a compressed value is always checked).
CREATE FUNCTION herald._value_fault(v jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE WHEN pg_column_size(v) > 256 OR pg_column_compression(v) IS NOT NULL
            THEN herald._json_fault(v::text, 32, 65536) END;

-- `email`, `attributes` and `timezone` are the entry's address as herald._normalize_email(entry ->> 'email')
-- gives it, entry -> 'attributes' and entry -> 'timezone' (SQL NULL when the key is absent), taken out of
-- the entry once by the caller: upsert_contacts reads each field once for the check and the insert (an
-- inlined `entry -> 'attributes'` is evaluated at every reference: four times per entry here).
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

CREATE FUNCTION herald._contact_entry_fault(entry jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN herald._contact_entry_fault(entry, herald._normalize_email(entry ->> 'email'), entry -> 'attributes', entry -> 'timezone');

-- Bulk upsert. One statement does the work for the whole array:
--   validate → record rejects → merge duplicates → INSERT … ON CONFLICT DO UPDATE (only when something
--   changed) → emit contact.created events (which reach the dispatcher when an automation listens);
-- then one more for the contact.updated events, if any (always dispatched).
-- Attributes are merged into the stored ones; a key set to null removes it.
-- The dispatcher is told to skip (herald.restoring, for this one statement) when no live automation of
-- the workspace is triggered by contact.created: its work for these events is then provably nothing
-- (every contact id is one this statement created; no enrollment can wait on a contact that did not
-- exist; the workspace was checked above; payloads are attributes validated here) yet it cost a
-- contact-id probe and a wait-event probe per new contact, ~1/4 of an import.
CREATE FUNCTION herald.upsert_contacts(workspace text, contacts jsonb)
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

CREATE FUNCTION herald.upsert_contact(workspace text, email text, attributes jsonb DEFAULT '{}') RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_fault text;
    v_id bigint;
    v_rejected bigint;
BEGIN
    v_fault := herald._contact_entry_fault(jsonb_build_object('email', email, 'attributes', coalesce(attributes, '{}')));
    IF v_fault IS NOT NULL THEN
        RAISE EXCEPTION 'invalid contact: %', v_fault USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT u.rejected INTO v_rejected
      FROM herald.upsert_contacts(workspace, jsonb_build_array(jsonb_build_object('email', email, 'attributes', coalesce(attributes, '{}')))) u;
    SELECT c.id INTO v_id FROM herald.contacts c
     WHERE c.email = herald._normalize_email(upsert_contact.email) AND c.workspace_id IS NOT DISTINCT FROM workspace;
    RETURN v_id;
END
$$;

-- The key an erased address is remembered by: 'sha256:' and the hex SHA-256 of the normalised address.
CREATE FUNCTION herald._email_key(email text) RETURNS text
LANGUAGE sql STABLE STRICT PARALLEL SAFE   -- STABLE like convert_to(); a stricter label would block inlining
RETURN 'sha256:' || encode(sha256(convert_to(herald._normalize_email(email), 'UTF8')), 'hex');

-- ------------------------------------------------------------------------------------------- lists

-- Creates a list (or updates its description). Returns true when it is new. herald_app.
CREATE FUNCTION herald.create_list(workspace text, name text, description text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_new boolean;
BEGIN
    PERFORM herald._require_workspace(workspace);
    IF name IS NULL OR btrim(name) = '' OR length(name) > 200 THEN
        RAISE EXCEPTION 'invalid list name %', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value', DETAIL = 'A list name is 1 to 200 characters.';
    END IF;
    IF length(description) > 2000 THEN
        RAISE EXCEPTION 'list %: the description is % characters; at most 2000 are allowed', quote_literal(name), length(description)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    INSERT INTO herald.lists AS l (workspace_id, name, description) VALUES (workspace, name, description)
    ON CONFLICT ON CONSTRAINT lists_pkey DO UPDATE SET description = coalesce(EXCLUDED.description, l.description)
    RETURNING (xmax = 0) INTO v_new;
    RETURN v_new;
END
$$;

-- Subscribes addresses to a list (one or many; an unknown address becomes a contact, with its
-- contact.created event). Every new subscription is a list.joined event, as update_contact nodes emit,
-- so automations can trigger on it. Totals add up to the array's length: subscribed (new, or back
-- from unsubscribed), already (subscribed before, or a repeat in the array), rejected (not a valid
-- address). Set-based: a constant number of statements whatever the array's length. herald_app.
CREATE FUNCTION herald.subscribe(workspace text, list text, emails text[])
RETURNS TABLE (subscribed bigint, already bigint, rejected bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off
AS $$
DECLARE
    v_valid jsonb;
BEGIN
    PERFORM herald.create_list(workspace, list);
    -- leaving an archived list stays possible (unsubscribe); joining it is refused
    PERFORM herald._refuse_archived(workspace, format('subscribe to list %s', quote_literal(list)), '{}', ARRAY[list]);
    IF emails IS NULL THEN
        RAISE EXCEPTION 'emails must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF cardinality(emails) > 100000 THEN
        RAISE EXCEPTION 'at most 100000 addresses per call, got %', cardinality(emails) USING ERRCODE = 'program_limit_exceeded';
    END IF;
    SELECT jsonb_agg(jsonb_build_object('email', e)) INTO v_valid
      FROM (SELECT DISTINCT herald._normalize_email(u.e) AS e FROM unnest(emails) u(e)
             WHERE herald._valid_email(herald._normalize_email(u.e))) v;
    -- missing contacts are created the way every import creates them
    PERFORM herald.upsert_contacts(workspace, coalesce(v_valid, '[]'));
    WITH wanted AS (
        SELECT c.id FROM jsonb_array_elements(coalesce(v_valid, '[]')) v(x)
         CROSS JOIN LATERAL (SELECT c.id FROM herald.contacts c
                              WHERE c.email = v.x ->> 'email' AND c.workspace_id IS NOT DISTINCT FROM workspace LIMIT 1) c
    ), joined AS (
        INSERT INTO herald.list_members AS m (workspace_id, list, contact_id, status)
        SELECT subscribe.workspace, subscribe.list, w.id, 'subscribed' FROM wanted w ORDER BY w.id
        ON CONFLICT ON CONSTRAINT list_members_pkey DO UPDATE SET status = 'subscribed', updated_at = now()
         WHERE m.status <> 'subscribed'
        RETURNING m.contact_id
    ), announced AS (
        INSERT INTO herald.events (workspace_id, contact_id, kind, payload)
        SELECT subscribe.workspace, j.contact_id, 'list.joined', jsonb_build_object('list', subscribe.list)
          FROM joined j ORDER BY j.contact_id
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM announced),
           cardinality(emails) - (SELECT count(*) FROM announced)
               - (SELECT count(*) FROM unnest(emails) u(e) WHERE NOT herald._valid_email(herald._normalize_email(u.e))),
           (SELECT count(*) FROM unnest(emails) u(e) WHERE NOT herald._valid_email(herald._normalize_email(u.e)))
      INTO subscribed, already, rejected;
    RETURN NEXT;
END
$$;

-- Unsubscribes addresses from a list (the membership stays, as 'unsubscribed'; a list.left event each).
-- Not a suppression: other lists and transactional mail still reach them (herald.suppress stops all).
-- Totals: unsubscribed, not_subscribed (unknown address, not a member, already out, or a repeat),
-- rejected (not a valid address). herald_app.
CREATE FUNCTION herald.unsubscribe(workspace text, list text, emails text[])
RETURNS TABLE (unsubscribed bigint, not_subscribed bigint, rejected bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off
AS $$
BEGIN
    PERFORM herald._require_workspace(workspace);
    IF emails IS NULL THEN
        RAISE EXCEPTION 'emails must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF cardinality(emails) > 100000 THEN
        RAISE EXCEPTION 'at most 100000 addresses per call, got %', cardinality(emails) USING ERRCODE = 'program_limit_exceeded';
    END IF;
    WITH wanted AS (
        SELECT DISTINCT c.id
          FROM unnest(emails) u(e)
         CROSS JOIN LATERAL (SELECT c.id FROM herald.contacts c
                              WHERE c.email = herald._normalize_email(u.e) AND c.workspace_id IS NOT DISTINCT FROM workspace
                              LIMIT 1) c
    ), left_list AS (
        UPDATE herald.list_members m SET status = 'unsubscribed', updated_at = now()
          FROM wanted w
         WHERE m.workspace_id = workspace AND m.list = unsubscribe.list AND m.contact_id = w.id AND m.status = 'subscribed'
        RETURNING m.contact_id
    ), announced AS (
        INSERT INTO herald.events (workspace_id, contact_id, kind, payload)
        SELECT unsubscribe.workspace, l.contact_id, 'list.left', jsonb_build_object('list', unsubscribe.list)
          FROM left_list l ORDER BY l.contact_id
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM announced),
           cardinality(emails) - (SELECT count(*) FROM announced)
               - (SELECT count(*) FROM unnest(emails) u(e) WHERE NOT herald._valid_email(herald._normalize_email(u.e))),
           (SELECT count(*) FROM unnest(emails) u(e) WHERE NOT herald._valid_email(herald._normalize_email(u.e)))
      INTO unsubscribed, not_subscribed, rejected;
    RETURN NEXT;
END
$$;

-- Every list of a workspace (made with create_list or joined by an update_contact node) with its counts;
-- archived ones are left out (herald.archived lists them).
CREATE VIEW herald.list_overview AS
SELECT n.workspace_id, n.name AS list, l.description,
       count(m.contact_id) FILTER (WHERE m.status = 'subscribed') AS subscribed,
       count(m.contact_id) FILTER (WHERE m.status = 'unsubscribed') AS unsubscribed,
       l.created_at
  FROM (SELECT workspace_id, name FROM herald.lists
        UNION
        SELECT DISTINCT workspace_id, list FROM herald.list_members) n
  LEFT JOIN herald.lists l ON l.workspace_id = n.workspace_id AND l.name = n.name
  LEFT JOIN herald.list_members m ON m.workspace_id = n.workspace_id AND m.list = n.name
 WHERE NOT EXISTS (SELECT 1 FROM herald.archived a WHERE a.workspace_id = n.workspace_id AND a.kind = 'list' AND a.name = n.name)
 GROUP BY n.workspace_id, n.name, l.description, l.created_at;

-- ---------------------------------------------------------------------------------------- erasure

-- Erases a contact everywhere (a person's right to erasure): the contact, its events, enrollments and
-- their step log, its jobs (sent or not; a job already handed to a daemon may still go out), message
-- history, list memberships, import rejections that name it, its results (the results stream: not the
-- copies already delivered to subscribers), its results inside result deliveries (the outbox jobs of
-- subscribe_results, sent or not: herald keeps no copy; a delivery already handed to a daemon may still
-- carry them), and any suppression of the address.
-- What stays: a suppression under the address's key (herald._email_key, reason 'erased'), so it is
-- never mailed again even if it comes back; stats (counts, no one in them); and an audit row in
-- herald.erasures (who, when, rows removed per table). Returns those counts. An address herald does
-- not know is still suppressed by key. Cost: a scan of the workspace's enrollments and outbox (no
-- index by contact on those hot tables, on purpose). herald_app.
CREATE FUNCTION herald.delete_contact(workspace text, email text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v_email text := herald._normalize_email(email);
    v_key text;
    v_contact bigint;
    v_removed jsonb;
BEGIN
    PERFORM herald._require_workspace(workspace);
    IF NOT herald._valid_email(v_email) THEN
        RAISE EXCEPTION 'email % is not a valid address', coalesce(quote_literal(email), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_key := herald._email_key(v_email);
    SELECT c.id INTO v_contact FROM herald.contacts c
     WHERE c.email = v_email AND c.workspace_id IS NOT DISTINCT FROM workspace FOR UPDATE;

    WITH enrollments AS (
        DELETE FROM herald.enrollments e WHERE e.workspace_id = workspace AND e.contact_id = v_contact
        RETURNING e.id
    ), steps AS (
        DELETE FROM herald.step_log l
         WHERE l.workspace_id = workspace AND l.enrollment_id IN (SELECT x.id FROM enrollments x)
        RETURNING 1
    ), jobs AS (
        DELETE FROM herald.outbox o WHERE o.workspace_id = workspace AND o.contact_id = v_contact RETURNING 1
    ), history AS (
        DELETE FROM herald.message_history h WHERE h.workspace_id = workspace AND h.contact_id = v_contact RETURNING 1
    ), events AS (
        DELETE FROM herald.events e
         WHERE e.workspace_id = workspace AND (e.contact_id = v_contact OR (e.contact_id IS NULL AND e.email = v_email))
        RETURNING 1
    ), lists AS (
        DELETE FROM herald.list_members m WHERE m.workspace_id = workspace AND m.contact_id = v_contact RETURNING 1
    ), rejections AS (
        DELETE FROM herald.contact_rejections r
         WHERE r.workspace_id = workspace AND herald._normalize_email(r.input ->> 'email') = v_email
        RETURNING 1
    ), suppressions AS (
        DELETE FROM herald.suppressions s WHERE s.workspace_id = workspace AND s.email = v_email RETURNING 1
    ), results AS (
        -- the results stream, published or not yet (copies already delivered to subscribers are theirs)
        DELETE FROM herald.results r WHERE r.workspace_id = workspace AND r.contact_id = v_contact RETURNING 1
    ), staged AS (
        DELETE FROM herald.results_staged r WHERE r.workspace_id = workspace AND r.contact_id = v_contact RETURNING 1
    ), deliveries AS (
        -- a delivery is a batch of many contacts' results: the contact's are taken out of its body
        UPDATE herald.outbox o
           SET payload = jsonb_set(o.payload, '{body,results}',
                                   (SELECT coalesce(jsonb_agg(x.r ORDER BY x.n), '[]')
                                      FROM jsonb_array_elements(o.payload -> 'body' -> 'results') WITH ORDINALITY x(r, n)
                                     WHERE x.r -> 'contact_id' IS DISTINCT FROM to_jsonb(v_contact)))
         WHERE o.workspace_id = workspace AND o.kind = 'webhook' AND o.contact_id IS NULL AND v_contact IS NOT NULL
           AND o.payload -> 'body' -> 'results' @> jsonb_build_array(jsonb_build_object('contact_id', v_contact))
        RETURNING 1
    ), contacts AS (
        DELETE FROM herald.contacts c WHERE c.workspace_id = workspace AND c.id = v_contact RETURNING 1
    )
    SELECT jsonb_build_object(
               'contacts', (SELECT count(*) FROM contacts), 'events', (SELECT count(*) FROM events),
               'enrollments', (SELECT count(*) FROM enrollments), 'step_log', (SELECT count(*) FROM steps),
               'jobs', (SELECT count(*) FROM jobs), 'message_history', (SELECT count(*) FROM history),
               'list_members', (SELECT count(*) FROM lists), 'contact_rejections', (SELECT count(*) FROM rejections),
               'suppressions', (SELECT count(*) FROM suppressions),
               'results', (SELECT count(*) FROM results) + (SELECT count(*) FROM staged),
               'result_deliveries', (SELECT count(*) FROM deliveries))
      INTO v_removed;

    INSERT INTO herald.suppressions (workspace_id, email, reason)
    VALUES (workspace, v_key, 'erased')
    ON CONFLICT ON CONSTRAINT suppressions_pkey DO NOTHING;
    INSERT INTO herald.erasures (workspace_id, email_key, erased_by, removed)
    VALUES (workspace, v_key, herald._caller(), v_removed);
    RETURN v_removed;
END
$$;

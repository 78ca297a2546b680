-- herald: the dry run of an automation (issue 15 §2).
--
-- simulate_automation replays a workspace's recorded events of a past period through an automation's
-- trigger, filter and re-entry rule and walks every would-be enrollment through the graph with the step
-- engine tick runs (extension/src/simulate.rs: a virtual clock per contact; jobs and approvals answered
-- from options). Nothing is written and nothing is sent: these functions only read.
--
-- Two statements read what the run needs, set-based, and hand it to Rust as json text (not jsonb: pgrx
-- would print a jsonb back to text): the events of the kinds the automation reads (trigger first, then
-- the kinds wait_event nodes wait for), ordered by contact then occurred_at, and the contacts they name
-- (facts as conditions see them, time zone, and with options.include_enrolled whether the contact is or
-- was in the automation). Contacts are independent in a dry run, so Rust simulates one contact at a time
-- over that order. Memory: both documents are held whole (about 100 bytes per event with a small
-- payload, plus the engine's state of one contact), so 1,000,000 events take ~150 MB of backend memory
-- for the call.

-- A time as the report shows it (RFC 3339 in UTC, whatever the session's DateStyle and TimeZone).
CREATE FUNCTION herald._simulate_time(t timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"');

-- The dry run itself; `automation` NULL for a definition not stored.
CREATE FUNCTION herald._simulate_run(workspace text, automation bigint, definition jsonb, since timestamptz,
                                     options jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
SET jit = off   -- the json_agg statements are planned far above jit_above_cost, and compiling costs more than it saves
AS $$
DECLARE
    v_check jsonb;
    v_kinds text[];
    v_until timestamptz;
    v_prior boolean;
    v_events json;
    v_contacts json;
BEGIN
    -- the definition (the validator's faults with their JSON paths) and the options (each fault naming its
    -- key) before anything is read
    v_check := herald._simulate(definition, options, NULL, NULL, NULL, NULL);
    IF since IS NULL THEN
        RAISE EXCEPTION 'since must not be NULL' USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Give the start of the period to replay, e.g. now() - interval ''7 days''.';
    END IF;
    IF since > now() THEN
        RAISE EXCEPTION 'since (%) is in the future: a dry run replays events already recorded', herald._simulate_time(since)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_until := coalesce((v_check ->> 'until')::timestamptz, now());
    IF v_until <= since THEN
        RAISE EXCEPTION 'options.until (%) must be after since (%)', herald._simulate_time(v_until), herald._simulate_time(since)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_until > now() THEN
        RAISE EXCEPTION 'options.until (%) is in the future: a dry run replays events already recorded', herald._simulate_time(v_until)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Leave options.until out to replay up to now.';
    END IF;
    v_prior := (v_check ->> 'include_enrolled')::boolean;
    IF v_prior AND automation IS NULL THEN
        RAISE EXCEPTION 'options.include_enrolled needs a stored automation' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Use herald.simulate_automation(automation_id, since, options).';
    END IF;
    v_kinds := ARRAY(SELECT jsonb_array_elements_text(v_check -> 'kinds'));

    -- kind as its position in v_kinds: Rust compares integers, not strings, per event; the time as a float8
    -- (date_part: printed faster than extract's numeric, and microseconds survive at today's epochs)
    SELECT coalesce(json_agg(json_build_array(e.contact_id, date_part('epoch', e.occurred_at),
                                              array_position(v_kinds, e.kind), e.payload)
                             ORDER BY e.contact_id, e.occurred_at, e.id), '[]')
      INTO v_events
      FROM herald.events e
     WHERE e.workspace_id = workspace AND e.kind = ANY (v_kinds) AND e.contact_id IS NOT NULL
       AND e.occurred_at >= since AND e.occurred_at <= v_until;

    SELECT coalesce(json_agg(json_build_array(
               c.id, herald._contact_facts(c.email, c.attributes, c.timezone, c.tags), c.timezone,
               CASE WHEN NOT v_prior THEN 0
                    WHEN EXISTS (SELECT 1 FROM herald.enrollments x
                                  WHERE x.workspace_id = workspace AND x.automation_id = _simulate_run.automation
                                    AND x.contact_id = c.id AND x.status IN ('active', 'waiting')) THEN 2
                    WHEN EXISTS (SELECT 1 FROM herald.enrollments x
                                  WHERE x.workspace_id = workspace AND x.automation_id = _simulate_run.automation
                                    AND x.contact_id = c.id) THEN 1
                    ELSE 0 END) ORDER BY c.id), '[]')
      INTO v_contacts
      FROM herald.contacts c
     WHERE c.workspace_id = workspace
       AND c.id IN (SELECT e.contact_id FROM herald.events e
                     WHERE e.workspace_id = workspace AND e.kind = ANY (v_kinds) AND e.contact_id IS NOT NULL
                       AND e.occurred_at >= since AND e.occurred_at <= v_until);

    RETURN jsonb_build_object('workspace', workspace, 'automation', automation)
        || herald._simulate(definition, options, v_events, v_contacts,
                            extract(epoch FROM since)::float8, extract(epoch FROM v_until)::float8);
END
$$;

-- A dry run of a definition (not stored) over `workspace`'s events since `since` (to options.until, or now).
-- options: {"until": RFC 3339, "replies": {"<email|webhook|decide node>": {"status": "ok" | "error", "body": …}},
-- "approvals": {"<approval node>": "approve" | "reject" | "wait"}, "histogram": "day" | "hour"}.
CREATE FUNCTION herald.simulate_automation(workspace text, definition jsonb, since timestamptz,
                                           options jsonb DEFAULT '{}') RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    PERFORM herald._require_workspace(workspace);
    RETURN herald._simulate_run(workspace, NULL, definition, since, options);
END
$$;

-- A dry run of a stored automation's newest definition over its workspace's events; options as above, plus
-- "include_enrolled": true to start from the contacts already in it (once: anyone ever enrolled is
-- skipped; after_exit: anyone in progress now is skipped for the whole period).
CREATE FUNCTION herald.simulate_automation(automation bigint, since timestamptz, options jsonb DEFAULT '{}') RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
DECLARE
    v herald.automations;
BEGIN
    -- the caller's workspace first: another tenant's automation and an unknown one look alike
    PERFORM herald._authorize(a.workspace_id, format('automation %s', automation))
       FROM herald.automations a WHERE a.id = automation;
    SELECT * INTO v FROM herald.automations a WHERE a.id = automation;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown automation %', coalesce(automation::text, 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    RETURN herald._simulate_run(v.workspace_id, v.id, v.definition, since, options);
END
$$;

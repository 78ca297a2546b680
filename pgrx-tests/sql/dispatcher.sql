-- The dispatcher: one statement-level trigger enrols into every live automation whose trigger and
-- filter match, honouring re-entry; drafts, paused and other kinds are ignored.
\set SHOW_CONTEXT never
-- ids start at this file's own base, so expected output does not depend on the other files
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 30000', t);
  END LOOP;
END $$;
SELECT herald.create_workspace('d1');
SELECT herald.create_workspace('d2');
SELECT * FROM herald.upsert_contacts('d1', '[{"email": "pro@example.com", "attributes": {"plan": "pro"}},
                                             {"email": "free@example.com", "attributes": {"plan": "free"}}]');

SELECT herald.create_automation('d1', '{"name": "once", "trigger": {"event": "signup"}, "reentry": "once",
  "start": "w", "nodes": {"w": {"type": "delay", "duration": "1 day", "next": "x"}, "x": {"type": "exit"}}}') AS once \gset
SELECT herald.create_automation('d1', '{"name": "after_exit", "trigger": {"event": "signup"}, "reentry": "after_exit",
  "start": "w", "nodes": {"w": {"type": "delay", "duration": "1 day", "next": "x"}, "x": {"type": "exit"}}}') AS after_exit \gset
SELECT herald.create_automation('d1', '{"name": "always", "trigger": {"event": "signup"}, "reentry": "always",
  "start": "w", "nodes": {"w": {"type": "delay", "duration": "1 day", "next": "x"}, "x": {"type": "exit"}}}') AS always \gset
SELECT herald.create_automation('d1', '{"name": "pro only", "trigger": {"event": "signup",
  "filter": {"all": [{"field": "contact.plan", "op": "eq", "value": "pro"}, {"field": "event.source", "op": "in", "value": ["ads", "partner"]}]}},
  "start": "w", "nodes": {"w": {"type": "delay", "duration": "1 day", "next": "x"}, "x": {"type": "exit"}}}') AS pro_only \gset
SELECT herald.create_automation('d1', '{"name": "draft", "trigger": {"event": "signup"},
  "start": "x", "nodes": {"x": {"type": "exit"}}}') AS draft \gset
SELECT herald.create_automation('d1', '{"name": "paused", "trigger": {"event": "signup"},
  "start": "x", "nodes": {"x": {"type": "exit"}}}') AS paused \gset
SELECT herald.create_automation('d2', '{"name": "other workspace", "trigger": {"event": "signup"},
  "start": "x", "nodes": {"x": {"type": "exit"}}}') AS other_ws \gset
SELECT herald.set_automation_status(a, 'live') FROM unnest(ARRAY[:once, :after_exit, :always, :pro_only, :paused, :other_ws]::bigint[]) a;
SELECT herald.set_automation_status(:paused, 'paused');

CREATE TEMP VIEW counts AS
SELECT a.name, count(e.*) AS enrollments, count(e.*) FILTER (WHERE e.status IN ('active', 'waiting')) AS in_progress
  FROM herald.automations a LEFT JOIN herald.enrollments e ON e.automation_id = a.id
 WHERE a.workspace_id IN ('d1', 'd2')
 GROUP BY a.id, a.name ORDER BY a.id;

-- one statement, two events for each contact
SELECT herald.track_many('d1', '[
  {"email": "pro@example.com", "kind": "signup", "payload": {"source": "ads"}},
  {"email": "free@example.com", "kind": "signup", "payload": {"source": "ads"}},
  {"email": "pro@example.com", "kind": "signup", "payload": {"source": "organic"}},
  {"email": "free@example.com", "kind": "signup"}
]');
SELECT * FROM counts;
SELECT e.entry_key LIKE 'event:%' AS keyed_by_event, e.event ->> 'kind' AS kind, e.current_node, e.status
  FROM herald.enrollments e WHERE e.automation_id = :always ORDER BY e.id LIMIT 1;

-- again: once never re-enrols, after_exit not while in progress, always once per event
SELECT herald.track('d1', 'pro@example.com', 'signup', '{"source": "partner"}') > 0 AS tracked;
SELECT * FROM counts;

-- after an exit, after_exit lets the contact in again; once never does
SELECT herald.exit_enrollment(e.id, 'test') FROM herald.enrollments e
  JOIN herald.contacts c ON c.id = e.contact_id
 WHERE e.automation_id IN (:once, :after_exit) AND c.email = 'pro@example.com';
SELECT herald.track('d1', 'pro@example.com', 'signup') > 0 AS tracked;
SELECT * FROM counts;

-- other kinds and events of other workspaces do not match
SELECT herald.track('d1', 'pro@example.com', 'signin') > 0 AS tracked;
SELECT herald.track('d2', 'pro@example.com', 'signup') > 0 AS tracked;
SELECT * FROM counts;

-- a plain INSERT enrols too, for a contact created on the fly
INSERT INTO herald.events (workspace_id, email, kind, payload) VALUES ('d1', 'fresh@example.com', 'signup', '{"source": "ads"}');
SELECT a.name FROM herald.enrollments e JOIN herald.automations a ON a.id = e.automation_id
  JOIN herald.contacts c ON c.id = e.contact_id WHERE c.email = 'fresh@example.com' ORDER BY a.id;

-- contact.created / contact.updated from upserts reach automations
SELECT herald.create_automation('d1', '{"name": "on created", "trigger": {"event": "contact.created", "filter": {"field": "event.source", "op": "eq", "value": "import"}},
  "start": "x", "nodes": {"x": {"type": "exit"}}}') AS created \gset
SELECT herald.create_automation('d1', '{"name": "on plan change", "trigger": {"event": "contact.updated", "filter": {"field": "event.changed", "op": "contains", "value": "plan"}},
  "start": "x", "nodes": {"x": {"type": "exit"}}}') AS updated \gset
SELECT herald.set_automation_status(:created, 'live'), herald.set_automation_status(:updated, 'live');
SELECT * FROM herald.upsert_contacts('d1', '[{"email": "imp@example.com", "attributes": {"source": "import"}},
                                             {"email": "web@example.com", "attributes": {"source": "web"}},
                                             {"email": "free@example.com", "attributes": {"plan": "pro"}},
                                             {"email": "pro@example.com", "attributes": {"seats": 3}}]');
SELECT a.name, c.email FROM herald.enrollments e JOIN herald.automations a ON a.id = e.automation_id
  JOIN herald.contacts c ON c.id = e.contact_id WHERE e.automation_id IN (:created, :updated) ORDER BY a.id, c.email;

-- a failing statement enrols nobody
SELECT count(*) AS before FROM herald.enrollments WHERE workspace_id = 'd1';
SELECT herald.track_many('d1', '[{"email": "pro@example.com", "kind": "signup"}, {"email": "bad", "kind": "signup"}]');
SELECT count(*) AS after FROM herald.enrollments WHERE workspace_id = 'd1';

-- every enrollment the dispatcher made is counted once in the stats deltas, whatever its re-entry rule
SELECT a.name, count(e.*) AS enrollments,
       (SELECT sum(d.n) FROM herald.stats_delta d
         WHERE d.automation_id = a.id AND d.metric = 'enrolled') AS counted_enrolled
  FROM herald.automations a LEFT JOIN herald.enrollments e ON e.automation_id = a.id
 WHERE a.workspace_id = 'd1' GROUP BY a.id, a.name ORDER BY a.id;

-- reentry always: an event id given explicitly again, after the event that had it was deleted, is another
-- event: it enrols beside the enrollment that holds the key already (the unique index leaves 'event:'
-- keys out: the dispatcher writes each once); the other rules still keep the contact out
INSERT INTO herald.enrollments (workspace_id, automation_id, contact_id, entry_key, current_node, event_id)
SELECT 'd1', :always, c.id, 'event:39999', 'x', 39999 FROM herald.contacts c WHERE c.workspace_id = 'd1' AND c.email = 'pro@example.com';
INSERT INTO herald.events (workspace_id, id, email, kind, payload) VALUES ('d1', 39999, 'pro@example.com', 'signup', '{"source": "ads"}');
SELECT a.name, e.current_node, e.entry_key FROM herald.enrollments e JOIN herald.automations a ON a.id = e.automation_id
 WHERE e.event_id = 39999 ORDER BY a.id, e.id;

-- enroll, enroll_segment, exit_enrollment: counts, re-entry, errors that change nothing.
\set SHOW_CONTEXT never
-- ids start at this file's own base, so expected output does not depend on the other files
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 50000', t);
  END LOOP;
END $$;
SELECT herald.create_workspace('n1');
SELECT herald.create_workspace('n2');
SELECT * FROM herald.upsert_contacts('n1', '[
  {"email": "p1@example.com", "attributes": {"plan": "pro", "age": 31}, "timezone": "Europe/Paris"},
  {"email": "p2@example.com", "attributes": {"plan": "pro", "age": 45}},
  {"email": "f1@example.com", "attributes": {"plan": "free", "age": 22}},
  {"email": "f2@example.com", "attributes": {"plan": "free"}}]');
SELECT array_agg(id ORDER BY email) AS ids FROM herald.contacts WHERE workspace_id = 'n1' \gset
SELECT herald.upsert_contact('n2', 'stranger@example.com') AS stranger \gset

SELECT herald.create_automation('n1', '{"name": "manual once", "start": "w",
  "nodes": {"w": {"type": "delay", "duration": "1 day", "next": "x"}, "x": {"type": "exit"}}}') AS once \gset
SELECT herald.create_automation('n1', '{"name": "manual after_exit", "reentry": "after_exit", "start": "w",
  "nodes": {"w": {"type": "delay", "duration": "1 day", "next": "x"}, "x": {"type": "exit"}}}') AS again \gset

-- not live yet
SELECT * FROM herald.enroll(:once, :'ids'::bigint[]);
SELECT herald.set_automation_status(:once, 'live'), herald.set_automation_status(:again, 'live');

-- enrolled + skipped + rejected = input length (duplicates skip, strangers and NULLs are rejected)
SELECT * FROM herald.enroll(:once, (:'ids'::bigint[])[1:2] || ARRAY[(:'ids'::bigint[])[1], :stranger, NULL, -5]);
SELECT * FROM herald.enroll(:once, :'ids'::bigint[]);
SELECT * FROM herald.enroll(:once, '{}');
SELECT * FROM herald.enroll(:once, NULL);
SELECT * FROM herald.enroll(-1, :'ids'::bigint[]);
SELECT current_node, status, next_run_at <= now() AS due, event IS NULL AS manual FROM herald.enrollments WHERE automation_id = :once LIMIT 1;

-- exit_enrollment
SELECT id AS first FROM herald.enrollments WHERE automation_id = :once ORDER BY id LIMIT 1 \gset
SELECT herald.exit_enrollment(:first, 'unsubscribed from the series');
SELECT status, exit_reason, ended_at IS NOT NULL AS ended FROM herald.enrollments WHERE id = :first;
SELECT herald.exit_enrollment(:first, 'again');
SELECT herald.exit_enrollment(-1, 'x');
SELECT herald.exit_enrollment(:first, '  ');
SELECT * FROM herald.enroll(:once, :'ids'::bigint[]);  -- once: never again, even after exit

-- after_exit: back in once the previous one ended
SELECT * FROM herald.enroll(:again, :'ids'::bigint[]);
SELECT * FROM herald.enroll(:again, :'ids'::bigint[]);
SELECT herald.exit_enrollment(id, 'done') FROM herald.enrollments WHERE automation_id = :again AND contact_id = (:'ids'::bigint[])[1];
SELECT * FROM herald.enroll(:again, :'ids'::bigint[]);
SELECT count(*) AS total, count(*) FILTER (WHERE status = 'active') AS active FROM herald.enrollments WHERE automation_id = :again;

-- enroll_segment
SELECT herald.create_automation('n1', '{"name": "segment", "start": "x", "nodes": {"x": {"type": "exit"}}}') AS seg \gset
SELECT herald.set_automation_status(:seg, 'live');
SELECT * FROM herald.enroll_segment(:seg, '{"all": [{"field": "contact.plan", "op": "eq", "value": "pro"}, {"field": "contact.age", "op": "gte", "value": 40}]}');
SELECT c.email FROM herald.enrollments e JOIN herald.contacts c ON c.id = e.contact_id WHERE e.automation_id = :seg;
SELECT * FROM herald.enroll_segment(:seg, '{"field": "contact.plan", "op": "in", "value": ["pro", "free"]}');
SELECT * FROM herald.enroll_segment(:seg, '{"not": {"field": "contact.age", "op": "exists"}}');
SELECT * FROM herald.enroll_segment(:seg, '{"field": "contact.email", "op": "ends_with", "value": "@example.com"}');
-- segment errors
SELECT * FROM herald.enroll_segment(:seg, '{"field": "event.kind", "op": "eq", "value": "x"}');
SELECT * FROM herald.enroll_segment(:seg, '{"field": "contact.plan", "op": "between", "value": [1, 2]}');
SELECT * FROM herald.enroll_segment(:seg, '{"field": "contact.plan", "op": "in", "value": "pro"}');
SELECT * FROM herald.enroll_segment(:seg, NULL);
SELECT * FROM herald.enroll_segment(-1, '{"all": []}');

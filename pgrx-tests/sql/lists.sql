-- Lists (create_list, subscribe, unsubscribe, list_overview) and erasure (delete_contact).
\set SHOW_CONTEXT never
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 98000', t);
  END LOOP;
END $$;
SELECT herald.create_workspace('li');
SELECT herald.create_list('li', 'newsletter', 'Monthly news') AS new, herald.create_list('li', 'newsletter') AS again;
SELECT herald.create_list('li', '');
-- an automation that greets new subscribers: list.joined reaches the dispatcher
SELECT herald.set_automation_status(herald.create_automation('li', '{"name": "greet", "trigger": {"event": "list.joined",
  "filter": {"field": "event.list", "op": "eq", "value": "newsletter"}}, "start": "x", "nodes": {"x": {"type": "exit"}}}'), 'live');

-- subscribe: unknown addresses become contacts; totals add up to the input
SELECT * FROM herald.subscribe('li', 'newsletter', ARRAY['Ann@Example.com', 'bob@example.com', 'ann@example.com', 'not an email']);
SELECT * FROM herald.subscribe('li', 'newsletter', ARRAY['bob@example.com']);
SELECT c.email, m.status FROM herald.list_members m JOIN herald.contacts c ON c.id = m.contact_id
 WHERE m.workspace_id = 'li' ORDER BY 1;
SELECT kind, count(*) FROM herald.events WHERE workspace_id = 'li' GROUP BY 1 ORDER BY 1;
SELECT count(*) AS greeted FROM herald.enrollments WHERE workspace_id = 'li';
-- unsubscribe keeps the membership as unsubscribed (not a suppression)
SELECT * FROM herald.unsubscribe('li', 'newsletter', ARRAY['bob@example.com', 'nobody@example.com', 'bad']);
SELECT * FROM herald.unsubscribe('li', 'newsletter', ARRAY['bob@example.com']);
SELECT * FROM herald.subscribe('li', 'newsletter', ARRAY['bob@example.com']);   -- back in: a new list.joined
SELECT list, description, subscribed, unsubscribed FROM herald.list_overview WHERE workspace_id = 'li' ORDER BY list;
SELECT * FROM herald.subscribe('li', 'newsletter', NULL);

-- erasure: everything about ann goes, a keyed suppression and an audit row stay
SELECT herald.upsert_template('li', 't', 'Hi', '<p>hi</p>');
SELECT herald.send('li', 'ann@example.com', 't') > 0 AS queued;
SELECT herald.suppress('li', 'ann@example.com', 'manual');
SELECT herald.delete_contact('li', 'ANN@example.com');
SELECT (SELECT count(*) FROM herald.contacts WHERE workspace_id = 'li' AND email = 'ann@example.com') AS contacts,
       (SELECT count(*) FROM herald.events e WHERE workspace_id = 'li' AND contact_id IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM herald.contacts c WHERE c.workspace_id = 'li' AND c.id = e.contact_id)) AS orphan_events,
       (SELECT count(*) FROM herald.suppressions WHERE workspace_id = 'li' AND email = 'ann@example.com') AS plain_suppressions,
       (SELECT reason FROM herald.suppressions WHERE workspace_id = 'li' AND email = herald._email_key('ann@example.com')) AS keyed;
SELECT workspace_id, email_key = herald._email_key('ann@example.com') AS keyed, removed ->> 'events' AS events
  FROM herald.erasures WHERE workspace_id = 'li';
-- she comes back: a new contact, and still never mailed (claim cancels her email as suppressed)
SELECT herald.send('li', 'ann@example.com', 't') AS again \gset
UPDATE herald.outbox SET status = 'cancelled' WHERE workspace_id <> 'li' AND status = 'pending';
SELECT count(*) AS claimed FROM herald.claim('lists-test', 10);
SELECT status, last_error FROM herald.outbox WHERE id = :again;
-- an address herald never knew is suppressed by key all the same
SELECT herald.delete_contact('li', 'stranger@example.com') ->> 'contacts' AS contacts_removed;
SELECT herald.delete_contact('li', 'nope');

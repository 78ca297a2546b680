-- Archiving and deleting templates, lists and broadcasts (sql/archive.sql): every refusal while in use,
-- archived things refused by create_automation, update_automation, going live, create_broadcast,
-- schedule_broadcast and send, hidden from the default listings, restored by unarchive; deletion keeps
-- message_history.
\set SHOW_CONTEXT never
-- one transaction, rolled back at the end: the suites after this one count automations and broadcasts
\set ON_ERROR_ROLLBACK on
BEGIN;
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox', 'broadcasts'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 7000000', t);
  END LOOP;
END $$;
-- claim serves every workspace: jobs other files left pending must not be handed out here
UPDATE herald.outbox SET status = 'cancelled' WHERE status IN ('pending', 'leased', 'held');
SELECT herald.create_workspace('ar');
SELECT herald.upsert_template('ar', k, 'Subject ' || k, '<p>' || k || '</p>') FROM unnest(ARRAY['t-auto', 't-bc', 't-job', 't-free']) k;
SELECT inserted FROM herald.upsert_contacts('ar', (SELECT jsonb_agg(jsonb_build_object('email', 'a' || i || '@example.com'))
  FROM generate_series(1, 6) i));
SELECT herald.create_list('ar', l) FROM unnest(ARRAY['members', 'vip', 'news', 'old']) l;
SELECT * FROM herald.subscribe('ar', 'old', ARRAY['a1@example.com', 'a2@example.com']);
-- a live journey: triggered by joining vip, sends t-auto, adds to members
SELECT herald.create_automation('ar', '{"name": "vip welcome", "trigger": {"event": "list.joined",
  "filter": {"field": "event.list", "op": "eq", "value": "vip"}}, "start": "m",
  "nodes": {"m": {"type": "email", "template": "t-auto", "next": "u"},
            "u": {"type": "update_contact", "add_lists": ["members"], "next": "x"}, "x": {"type": "exit"}}}') AS auto \gset
SELECT herald.set_automation_status(:auto, 'live');
-- a draft broadcast: t-bc to the news list
SELECT herald.create_broadcast('ar', '{"name": "Draft", "template": "t-bc", "audience": {"lists": ["news"]}}') AS draft \gset
-- a transactional email not sent yet: t-job
SELECT herald.send('ar', 'a3@example.com', 't-job') > 0 AS queued;

-- ---------------------------------------------------------------------------------------- templates
-- in use: refused, saying by what
SELECT herald.archive_template('ar', 't-auto');
SELECT herald.delete_template('ar', 't-auto');
SELECT herald.archive_template('ar', 't-bc');
SELECT herald.archive_template('ar', 't-job');
-- unknown template, unknown workspace
SELECT herald.archive_template('ar', 'nope');
SELECT herald.delete_template('ar', 'nope');
SELECT herald.archive_template('zz', 't-free');
-- archived: idempotent, listed in herald.archived
SELECT herald.archive_template('ar', 't-free') AS archived, herald.archive_template('ar', 't-free') AS again;
SELECT kind, name, archived_by = current_user AS by_me FROM herald.archived WHERE workspace_id = 'ar';
-- an archived template cannot be used: send, create_broadcast, create_automation, going live, update
SELECT herald.send('ar', 'a1@example.com', 't-free');
SELECT herald.create_broadcast('ar', '{"name": "n", "audience": "all", "variations": [{"key": "a", "template": "t-bc"}, {"key": "b", "template": "t-free"}]}');
SELECT herald.create_automation('ar', '{"name": "x", "trigger": {"event": "signup"}, "start": "m", "nodes": {"m": {"type": "email", "template": "t-free"}}}');
SELECT herald.create_automation('ar', '{"name": "drafted before", "trigger": {"event": "signup"}, "start": "m", "nodes": {"m": {"type": "email", "template": "t-bc"}}}') AS before \gset
UPDATE herald.automation_versions SET definition = jsonb_set(definition, '{nodes,m,template}', '"t-free"') WHERE automation_id = :before;
UPDATE herald.automations SET definition = jsonb_set(definition, '{nodes,m,template}', '"t-free"') WHERE id = :before;
SELECT herald.set_automation_status(:before, 'live');
SELECT herald.update_automation(:auto, '{"name": "vip welcome", "trigger": {"event": "list.joined",
  "filter": {"field": "event.list", "op": "eq", "value": "vip"}}, "start": "m",
  "nodes": {"m": {"type": "email", "template": "t-free", "next": "u"},
            "u": {"type": "update_contact", "add_lists": ["members"], "next": "x"}, "x": {"type": "exit"}}}');
-- a new version saved meanwhile keeps the template archived
SELECT herald.upsert_template('ar', 't-free', 'Subject v2', '<p>v2</p>') AS version;
SELECT herald.send('ar', 'a1@example.com', 't-free');
-- restored: usable again
SELECT herald.unarchive_template('ar', 't-free') AS restored, herald.unarchive_template('ar', 't-free') AS again;
SELECT herald.send('ar', 'a1@example.com', 't-free') > 0 AS sent_again;
-- the automation archived and the job sent: t-auto and t-job can go
SELECT herald.set_automation_status(:auto, 'archived');
SELECT herald.complete(coalesce(jsonb_agg(jsonb_build_object('id', j.id, 'ok', true)), '[]')) AS sent
  FROM herald.claim('t', 100) j;
SELECT herald.delete_template('ar', 't-auto') AS versions_deleted;
SELECT herald.archive_template('ar', 't-job') AS archived;
SELECT herald.delete_template('ar', 't-job') AS versions_deleted;
SELECT key, version FROM herald.templates WHERE workspace_id = 'ar' ORDER BY 1, 2;
SELECT kind, name FROM herald.archived WHERE workspace_id = 'ar';
-- a job already sent keeps its history row; the template it named is gone
SELECT count(*) AS history_kept FROM herald.message_history WHERE workspace_id = 'ar';

-- -------------------------------------------------------------------------------------------- lists
SELECT herald.create_automation('ar', '{"name": "members", "trigger": {"event": "list.joined",
  "filter": {"field": "event.list", "op": "in", "value": ["vip", "gold"]}}, "start": "u",
  "nodes": {"u": {"type": "update_contact", "add_lists": ["members"], "remove_lists": ["old2"], "next": "x"}, "x": {"type": "exit"}}}') AS auto2 \gset
SELECT herald.set_automation_status(:auto2, 'live');
-- in use: by a live automation's update_contact node, its trigger's condition, a draft broadcast's audience
SELECT herald.archive_list('ar', 'members');
SELECT herald.delete_list('ar', 'vip');
SELECT herald.archive_list('ar', 'news');
SELECT herald.archive_list('ar', 'nope');
SELECT herald.delete_list('ar', 'nope');
-- a list that exists only through members (update_contact joined them) can be archived
INSERT INTO herald.list_members (workspace_id, list, contact_id, status)
SELECT 'ar', 'joined-only', c.id, 'subscribed' FROM herald.contacts c WHERE c.workspace_id = 'ar' AND c.email = 'a4@example.com';
SELECT herald.archive_list('ar', 'joined-only') AS archived;
SELECT herald.archive_list('ar', 'old') AS archived, herald.archive_list('ar', 'old') AS again;
-- hidden from list_overview; refused by new broadcasts and automations
SELECT list, subscribed FROM herald.list_overview WHERE workspace_id = 'ar' ORDER BY 1;
SELECT herald.create_broadcast('ar', '{"name": "n", "template": "t-bc", "audience": {"lists": ["news", "old"]}}');
SELECT herald.create_automation('ar', '{"name": "x", "trigger": {"event": "signup"}, "start": "u",
  "nodes": {"u": {"type": "update_contact", "remove_lists": ["old"], "next": "x"}, "x": {"type": "exit"}}}');
-- joining an archived list is refused and adds no one; leaving it still works
SELECT * FROM herald.subscribe('ar', 'old', ARRAY['a9@example.com']);
SELECT count(*) AS a9 FROM herald.contacts WHERE workspace_id = 'ar' AND email = 'a9@example.com';
SELECT * FROM herald.unsubscribe('ar', 'old', ARRAY['a2@example.com']);
SELECT herald.unarchive_list('ar', 'old') AS restored;
SELECT list, subscribed FROM herald.list_overview WHERE workspace_id = 'ar' AND list = 'old';
-- deleted: the list and its memberships go, the contacts and their events stay
SELECT herald.delete_list('ar', 'old');
SELECT herald.delete_list('ar', 'joined-only');
SELECT count(*) AS memberships FROM herald.list_members WHERE workspace_id = 'ar' AND list IN ('old', 'joined-only');
SELECT count(*) AS contacts FROM herald.contacts WHERE workspace_id = 'ar';
SELECT count(*) AS joined_events FROM herald.events WHERE workspace_id = 'ar' AND kind = 'list.joined' AND payload ->> 'list' = 'old';
SELECT kind, name FROM herald.archived WHERE workspace_id = 'ar';
-- once the automation is paused it still holds its lists (contacts may resume); archived, it does not
SELECT herald.set_automation_status(:auto2, 'paused');
SELECT herald.archive_list('ar', 'vip');
SELECT herald.set_automation_status(:auto2, 'archived');
SELECT herald.archive_list('ar', 'vip') AS archived;

-- ---------------------------------------------------------------------------------------- broadcasts
SELECT herald.create_broadcast('ar', '{"name": "Sent", "template": "t-bc", "audience": {"segment": {"field": "contact.email", "op": "in", "value": ["a1@example.com", "a2@example.com"]}}}') AS sent \gset
SELECT herald.schedule_broadcast(:sent);
-- scheduled, then sending: refused (cancel first)
SELECT herald.archive_broadcast(:sent);
SELECT herald.advance_broadcasts() AS read;
SELECT herald.delete_broadcast(:sent);
-- sent: one recipient delivered, one failed for good
SELECT herald.complete(jsonb_agg(jsonb_build_object('id', j.id, 'ok', j.to_address = 'a1@example.com', 'retryable', false,
                                                    'message_id', '<' || j.id || '@ar>', 'error', 'mailbox unknown')))
  FROM (SELECT j.id, j.payload ->> 'to' AS to_address FROM herald.claim('t', 100) j) j;
SELECT herald.advance_broadcasts() AS read;
SELECT status FROM herald.broadcasts WHERE id = :sent;
-- archived: hidden from broadcast_overview, kept with its numbers; restored
SELECT herald.archive_broadcast(:sent) AS archived, herald.archive_broadcast(:sent) AS again;
SELECT count(*) AS listed FROM herald.broadcast_overview WHERE id = :sent;
SELECT metric, sum(value) FROM herald.broadcast_stats(:sent) WHERE metric IN ('sent', 'failed') GROUP BY 1 ORDER BY 1;
SELECT herald.unarchive_broadcast(:sent) AS restored;
SELECT count(*) AS listed FROM herald.broadcast_overview WHERE id = :sent;
-- an archived draft cannot be scheduled
SELECT herald.archive_broadcast(:draft) AS archived;
SELECT herald.schedule_broadcast(:draft);
SELECT herald.unarchive_broadcast(:draft) AS restored;
-- a resend of its failed recipients not finished yet holds it
SELECT herald.resend_failed(:sent) AS resend \gset
SELECT herald.delete_broadcast(:sent);
SELECT herald.cancel_broadcast(:resend);
SELECT herald.advance_broadcasts() AS read;
-- deleted: its jobs and counters go; message_history keeps what was sent to whom
SELECT herald.delete_broadcast(:sent);
SELECT count(*) AS rows_left FROM herald.broadcasts WHERE id = :sent;
SELECT count(*) AS jobs_left FROM herald.outbox WHERE broadcast_id = :sent;
SELECT count(*) AS stats_left FROM herald.broadcast_stats_delta WHERE broadcast_id = :sent;
SELECT status, count(*) AS history_kept FROM herald.message_history WHERE broadcast_id = :sent GROUP BY 1 ORDER BY 1;
SELECT herald.delete_broadcast(:sent);
SELECT herald.broadcast_stats(:sent);
-- a draft (no jobs) is deleted at once, its archive mark with it
SELECT herald.archive_broadcast(:draft) AS archived;
SELECT herald.delete_broadcast(:draft);
SELECT count(*) AS marks_left FROM herald.archived WHERE workspace_id = 'ar' AND kind = 'broadcast';
SELECT herald.delete_broadcast(NULL);
ROLLBACK;

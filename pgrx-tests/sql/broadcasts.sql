-- Suppression and broadcasts: audience resolution, chunked enqueue that resumes without repeats,
-- pause/resume/cancel against claim, suppression in claim, A/B winner, resend to failed, counters.
\set SHOW_CONTEXT never
-- ids start at this file's own base, so expected output does not depend on the other files
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['contacts', 'events', 'automations', 'enrollments', 'outbox', 'broadcasts'] LOOP
    EXECUTE format('ALTER TABLE herald.%I ALTER COLUMN id RESTART WITH 2000000', t);
  END LOOP;
END $$;
-- claim serves every workspace: jobs other files left pending must not be handed out here
UPDATE herald.outbox SET status = 'cancelled' WHERE status IN ('pending', 'leased', 'held');
SELECT herald.create_workspace('b1');
SELECT herald.upsert_template('b1', 'news-a', 'A for {{ contact.email }}', '<p>a</p>');
SELECT herald.upsert_template('b1', 'news-b', 'B', '<p>b</p>');
-- 40 contacts: even ones are on plan pro; 1..30 on the newsletter list; 5 unsubscribed from it
SELECT inserted FROM herald.upsert_contacts('b1', (SELECT jsonb_agg(jsonb_build_object('email', 'p' || i || '@example.com',
       'attributes', jsonb_build_object('plan', CASE WHEN i % 2 = 0 THEN 'pro' ELSE 'free' END, 'country', CASE WHEN i % 10 = 0 THEN 'XX' ELSE 'FR' END)))
  FROM generate_series(1, 40) i));
INSERT INTO herald.list_members (workspace_id, list, contact_id, status)
SELECT 'b1', 'newsletter', c.id, CASE WHEN c.email IN ('p2@example.com', 'p4@example.com', 'p6@example.com', 'p7@example.com', 'p9@example.com')
                                      THEN 'unsubscribed' ELSE 'subscribed' END
  FROM herald.contacts c WHERE c.workspace_id = 'b1' AND split_part(split_part(c.email, '@', 1), 'p', 2)::int <= 30;

-- suppression: idempotent, normalised, with clear errors
SELECT herald.suppress('b1', ' P8@Example.com ', 'complaint') AS new, herald.suppress('b1', 'p8@example.com', 'manual') AS again;
SELECT email, reason FROM herald.suppressions WHERE workspace_id = 'b1';
SELECT herald.suppress('b1', 'nope', 'manual');
SELECT herald.suppress('b1', 'x@example.com', 'bored');
SELECT herald.suppress('zz', 'x@example.com', 'manual');
SELECT herald.unsuppress('b1', 'x@example.com') AS removed_nothing;

-- definitions are validated with paths; templates and providers must exist
SELECT herald.create_broadcast('b1', '{"name": "", "template": "news-a", "colour": 1}');
-- the audience must be said: none, or an empty one, is refused ("all" means every contact)
SELECT herald.create_broadcast('b1', '{"name": "n", "template": "news-a", "audience": {}}');
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "n", "template": "missing"}');
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "n", "template": "news-a", "provider": "ses"}');
-- a send time in the past is refused, at creation and when scheduling
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "n", "template": "news-a", "send_at": {"at": "2001-01-01T00:00:00Z"}}');
SELECT herald.create_broadcast('b1', '{"name": "n", "template": "news-a", "audience": {"segment": {"field": "event.x", "op": "eq", "value": 1}}}');
-- a broadcast's own sender and Reply-To are mailboxes (each fault with its JSON path)
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "n", "template": "news-a", "from": "News <news@b1>", "reply_to": ["x"]}');
-- the definition's rule (Rust) and SQL's (templates, providers) agree, example by example
CREATE FUNCTION pg_temp.definition_accepts(m text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    RETURN herald._check_broadcast(jsonb_build_object('name', 'n', 'template', 't', 'audience', 'all', 'from', m)) ->> 'from' = m;
EXCEPTION WHEN OTHERS THEN
    RETURN false;
END $$;
SELECT to_json(m) AS mailbox, herald._valid_mailbox(m) AS sql_accepts, pg_temp.definition_accepts(m) = herald._valid_mailbox(m) AS same
  FROM unnest(ARRAY['news@b1.test', 'News <news@b1.test>', 'News<news@b1.test>', '"B1, Inc." <news@b1.test>',
                    'Zoë <zoe@b1.test>', 'news@b1', 'News <news@b1>', '<news@b1.test>', 'B1, Inc. <news@b1.test>',
                    '"news"@b1.test', 'News <news@b1.test', 'a <b <news@b1.test>>', 'news @b1.test',
                    E'News\r\nBcc: x@evil.test <news@b1.test>', E'News \u202e <news@b1.test>', '"a \ b" <news@b1.test>']) m;

-- audience: the list (subscribed only), pro plan, not country XX, not suppressed
SELECT herald.create_broadcast('b1', '{"name": "November", "template": "news-a",
  "audience": {"lists": ["newsletter"], "segment": {"field": "contact.plan", "op": "eq", "value": "pro"},
               "exclude": {"field": "contact.country", "op": "eq", "value": "XX"}}}') AS nov \gset
SELECT status, phase FROM herald.broadcasts WHERE id = :nov;
SELECT herald.pause_broadcast(:nov);   -- a draft cannot be paused
SELECT herald.schedule_broadcast(:nov);
SELECT herald.schedule_broadcast(:nov); -- only once
-- interrupted after 3 contacts, resumed: the cursor carries on, nobody twice
SELECT herald.advance_broadcasts(3) AS read;
SELECT status, cursor > 0 AS moved, enqueued FROM herald.broadcasts WHERE id = :nov;
SELECT herald.advance_broadcasts() AS read;
SELECT herald.advance_broadcasts() AS read;   -- nothing left to read
SELECT string_agg(split_part(c.email, '@', 1), ' ' ORDER BY c.id) AS recipients, count(DISTINCT o.contact_id) = count(*) AS each_once
  FROM herald.outbox o JOIN herald.contacts c ON c.id = o.contact_id WHERE o.broadcast_id = :nov;
SELECT b.enqueued = (SELECT count(*) FROM herald.outbox o WHERE o.broadcast_id = :nov) AS counter_matches_rows
  FROM herald.broadcasts b WHERE b.id = :nov;
-- re-running a chunk never enqueues twice (dedupe key b:<broadcast>:<contact>)
UPDATE herald.broadcasts SET phase = 'all', cursor = 0 WHERE id = :nov;
SELECT herald.advance_broadcasts() AS read_again;
SELECT count(*) AS jobs FROM herald.outbox WHERE broadcast_id = :nov;
SELECT enqueued, last_error FROM herald.broadcast_overview WHERE id = :nov;   -- no error, nobody counted twice
-- a broadcast's rows carry ids, not the payload or rate keys (claim derives those; see below)
SELECT count(*) FILTER (WHERE payload = '{}' AND rate_keys = '{}') = count(*) AS ids_only FROM herald.outbox WHERE broadcast_id = :nov;

-- pause: at once, whatever the size: the status changes, claim holds any job it picks of a paused
-- broadcast, and the jobs follow in chunks (the first in the call, the rest in advance_broadcasts).
-- Here: a pause that moved nothing yet (as if the broadcast were larger than a chunk)
SELECT herald.pause_broadcast(:nov);
UPDATE herald.outbox SET status = 'pending' WHERE broadcast_id = :nov;
UPDATE herald.broadcasts SET settle_cursor = 0 WHERE id = :nov;
SELECT count(*) AS claimed_while_paused FROM herald.claim('t', 3);
SELECT status, count(*) FROM herald.outbox WHERE broadcast_id = :nov GROUP BY 1 ORDER BY 1;
SELECT herald.advance_broadcasts() AS read;
SELECT status, count(*), (SELECT settle_cursor FROM herald.broadcasts WHERE id = :nov) AS settle_cursor
  FROM herald.outbox WHERE broadcast_id = :nov GROUP BY 1;
SELECT herald.resume_broadcast(:nov);
SELECT herald.resume_broadcast(:nov);  -- not paused any more
-- a recipient suppressed after enqueue is refused by claim itself
SELECT herald.suppress('b1', 'p12@example.com', 'hard_bounce');
SELECT j.payload ->> 'to' AS to, j.payload -> 'broadcast' ->> 'name' AS name, j.payload ->> 'template' AS template
  FROM herald.claim('t', 2) j ORDER BY 1;
SELECT o.status, o.last_error FROM herald.outbox o JOIN herald.contacts c ON c.id = o.contact_id
 WHERE o.broadcast_id = :nov AND c.email = 'p12@example.com';
-- finish everything: the broadcast becomes sent once nothing is pending or leased
SELECT herald.complete((SELECT jsonb_agg(jsonb_build_object('id', o.id, 'ok', true)) FROM herald.outbox o
                         WHERE o.broadcast_id = :nov AND o.status = 'leased')) AS completed_first;
SELECT herald.complete(coalesce(jsonb_agg(jsonb_build_object('id', j.id, 'ok', j.payload ->> 'to' <> 'p16@example.com',
                                                             'error', '550 no such user')), '[]')) AS completed
  FROM herald.claim('t', 100) j;
SELECT herald.advance_broadcasts() AS read;
SELECT status, finished_at IS NOT NULL AS finished FROM herald.broadcasts WHERE id = :nov;
SELECT * FROM herald.broadcast_stats(:nov);
SELECT herald.flush_stats() > 0 AS flushed;
SELECT * FROM herald.broadcast_stats(:nov);   -- the same numbers once folded
-- resend to failed only: exactly the recipient whose send failed
SELECT herald.resend_failed(:nov) AS retry \gset
SELECT name, status FROM herald.broadcasts WHERE id = :retry;
SELECT herald.resend_failed(:retry);   -- not finished yet
SELECT herald.advance_broadcasts() AS read;
SELECT c.email, o.status FROM herald.outbox o JOIN herald.contacts c ON c.id = o.contact_id WHERE o.broadcast_id = :retry;
SELECT herald.cancel_broadcast(:retry);
SELECT status, count(*) FROM herald.outbox WHERE broadcast_id = :retry GROUP BY 1;
SELECT herald.cancel_broadcast(:retry);
SELECT * FROM herald.broadcast_stats(:retry);

-- cancel stops a running broadcast at once
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "Stop", "template": "news-b"}') AS stop \gset
SELECT herald.schedule_broadcast(:stop, now() - interval '1 day');
SELECT herald.schedule_broadcast(:stop);
SELECT herald.advance_broadcasts() AS read;
SELECT herald.cancel_broadcast(:stop);
SELECT status, count(*) FROM herald.outbox WHERE broadcast_id = :stop GROUP BY 1;
SELECT count(*) AS claimed_after_cancel FROM herald.claim('t', 100);

-- a schedule in the future waits; local-time sends get each recipient's own run_at
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "Later", "template": "news-b", "send_at": {"at": "2999-01-01T00:00:00Z"}}') AS later \gset
SELECT herald.schedule_broadcast(:later);
SELECT herald.advance_broadcasts() AS read, (SELECT status FROM herald.broadcasts WHERE id = :later);
SELECT herald.cancel_broadcast(:later);
UPDATE herald.contacts SET timezone = 'Asia/Tokyo' WHERE workspace_id = 'b1' AND email = 'p1@example.com';
SELECT herald.create_broadcast('b1', '{"name": "Morning", "template": "news-b", "send_at": {"local_time": "09:00"},
  "audience": {"segment": {"field": "contact.email", "op": "in", "value": ["p1@example.com", "p3@example.com"]}}}') AS morning \gset
SELECT herald.schedule_broadcast(:morning);
SELECT herald.advance_broadcasts() AS read;
SELECT c.email, to_char(o.run_at AT TIME ZONE coalesce(c.timezone, 'UTC'), 'HH24:MI') AS local_time, o.run_at > now() - interval '1 minute' AS upcoming
  FROM herald.outbox o JOIN herald.contacts c ON c.id = o.contact_id WHERE o.broadcast_id = :morning ORDER BY 1;
SELECT herald.cancel_broadcast(:morning);

-- A/B: 50% test share split a/b; the winner by unique opens goes to the rest
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "AB", "variations": [{"key": "a", "template": "news-a"}, {"key": "b", "template": "news-b"}],
  "ab_test": {"test_percent": 50, "metric": "opens", "wait": "1 minute"}}') AS ab \gset
SELECT herald.schedule_broadcast(:ab);
SELECT herald.advance_broadcasts() AS read;
SELECT phase, test_ends_at > now() AS waiting FROM herald.broadcasts WHERE id = :ab;
SELECT variation, count(*) FROM herald.outbox WHERE broadcast_id = :ab GROUP BY 1 ORDER BY 1;
SELECT herald.complete(coalesce(jsonb_agg(jsonb_build_object('id', j.id, 'ok', true)), '[]')) > 0 AS sent_test
  FROM herald.claim('t', 1000) j;
-- opens: every b recipient opens (twice), two a recipients open
SELECT herald.track_many('b1', (SELECT jsonb_agg(jsonb_build_object('email', c.email, 'kind', 'email.opened',
         'payload', jsonb_build_object('broadcast', o.broadcast_id, 'variation', o.variation)))
  FROM herald.outbox o JOIN herald.contacts c ON c.id = o.contact_id, generate_series(1, 2) g
 WHERE o.broadcast_id = :ab AND (o.variation = 'b' OR c.id IN (SELECT x.contact_id FROM herald.outbox x
                                  WHERE x.broadcast_id = :ab AND x.variation = 'a' ORDER BY x.contact_id LIMIT 2)))) > 0 AS tracked;
SELECT herald.advance_broadcasts() AS read_during_wait;
UPDATE herald.broadcasts SET test_ends_at = now() - interval '1 second' WHERE id = :ab;
SELECT herald.advance_broadcasts() AS decided;
SELECT phase, winner, winner_reason FROM herald.broadcasts WHERE id = :ab;
SELECT herald.advance_broadcasts() > 0 AS rest_enqueued;
SELECT variation, count(*) FROM herald.outbox WHERE broadcast_id = :ab GROUP BY 1 ORDER BY 1;
SELECT count(DISTINCT contact_id) = count(*) AS each_once,
       count(*) = (SELECT count(*) FROM herald.contacts c WHERE c.workspace_id = 'b1'
                    AND NOT EXISTS (SELECT 1 FROM herald.suppressions s WHERE s.workspace_id = 'b1' AND s.email = c.email)) AS whole_audience
  FROM herald.outbox WHERE broadcast_id = :ab;
SELECT * FROM herald.broadcast_stats(:ab) WHERE metric IN ('opened', 'queued');

-- the winner rules on crafted numbers: a tie, and too small a sample
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "Tie", "variations": [{"key": "x", "template": "news-a"}, {"key": "y", "template": "news-b"}],
  "ab_test": {"test_percent": 50, "metric": "clicks", "wait": "1 minute"}}') AS tie \gset
SELECT herald.schedule_broadcast(:tie);
SELECT herald.advance_broadcasts() > 0 AS test_enqueued;
SELECT herald.complete(coalesce(jsonb_agg(jsonb_build_object('id', j.id, 'ok', true)), '[]')) > 0 AS sent_test
  FROM herald.claim('t', 1000) j;
UPDATE herald.broadcasts SET test_ends_at = now() - interval '1 second' WHERE id = :tie;
SELECT herald.advance_broadcasts() AS decided;
SELECT winner, winner_reason FROM herald.broadcasts WHERE id = :tie;
SELECT (herald._ab_winner(b)).* FROM herald.broadcasts b WHERE b.id = :tie;
-- give x and y the same number of clickers relative to their sends: a tie
UPDATE herald.broadcasts SET phase = 'waiting' WHERE id = :tie;
SELECT herald.track_many('b1', (SELECT jsonb_agg(jsonb_build_object('email', c.email, 'kind', 'email.clicked',
         'payload', jsonb_build_object('broadcast', o.broadcast_id, 'variation', o.variation)))
  FROM herald.outbox o JOIN herald.contacts c ON c.id = o.contact_id WHERE o.broadcast_id = :tie)) > 0 AS everyone_clicked;
SELECT (herald._ab_winner(b)).* FROM herald.broadcasts b WHERE b.id = :tie;
SELECT herald.cancel_broadcast(:tie);

-- suppression applies to every source: a transactional send to a suppressed address is not handed out
SELECT herald.send('b1', 'p8@example.com', 'news-a') AS tx \gset
SELECT count(*) AS handed_out FROM herald.claim('t', 10) j WHERE j.id = :tx;
SELECT status, last_error FROM herald.outbox WHERE id = :tx;
SELECT herald.unsuppress('b1', 'p8@example.com') AS removed;
SELECT herald.send('b1', 'p8@example.com', 'news-a') AS tx2 \gset
SELECT count(*) AS handed_out FROM herald.claim('t', 10) j WHERE j.id = :tx2;
SELECT herald.advance_broadcasts(0);
SELECT herald.pause_broadcast(424242);
SELECT * FROM herald.broadcast_stats(424242);
-- feedback from links and providers: one call, suppression for unsubscribes, hard bounces, complaints
SELECT herald.record_feedback('[{"kind": "hard_bounce", "workspace": "b1", "email": "P20@example.com"},
                                {"kind": "soft_bounce", "workspace": "b1", "email": "p21@example.com", "payload": {"reason": "mailbox full"}},
                                {"kind": "complaint", "message_id": "<unknown@herald>"},
                                {"kind": "opened", "workspace": "nope", "email": "p21@example.com"}]') AS recorded;
SELECT email, reason FROM herald.suppressions WHERE workspace_id = 'b1' AND email IN ('p20@example.com', 'p21@example.com');
SELECT email, kind, payload FROM herald.events WHERE workspace_id = 'b1' AND kind = 'email.bounced' ORDER BY id;
SELECT herald.record_feedback('{"kind": "opened"}');
SELECT herald.record_feedback('[{"kind": "liked", "workspace": "b1", "email": "p1@example.com"}]');
-- a report naming only a Message-ID: the workspace and recipient come from the message history; a
-- Message-ID two workspaces share (their dedupe keys coincide) names neither, unless the report says which
SELECT herald.create_workspace('b2');
SELECT herald.upsert_contact('b2', 'p33@example.com') > 0 AS contact;
INSERT INTO herald.message_history (workspace_id, outbox_id, kind, status, contact_id, dedupe_key, message_id, attempt)
SELECT c.workspace_id, 0, 'email', 'sent', c.id, 'order-1', m.message_id, 1
  FROM herald.contacts c, (VALUES ('b1', '<shared@herald>'), ('b2', '<shared@herald>'), ('b1', '<only-b1@herald>')) m(ws, message_id)
 WHERE c.email = 'p33@example.com' AND c.workspace_id = m.ws;
SELECT herald.record_feedback('[{"kind": "complaint", "message_id": "<shared@herald>"}]') AS ambiguous;
SELECT herald.record_feedback('[{"kind": "complaint", "message_id": "<shared@herald>", "workspace": "b2"}]') AS told_which,
       herald.record_feedback('[{"kind": "hard_bounce", "message_id": "<only-b1@herald>"}]') AS unique_id;
SELECT workspace_id, email, reason FROM herald.suppressions WHERE email = 'p33@example.com' ORDER BY 1;
-- a report that came with one workspace's credentials (only_workspace) affects that workspace only
SELECT herald.record_feedback('[{"kind": "hard_bounce", "message_id": "<only-b1@herald>"}]', 'b2') AS b1_message_with_b2_token,
       herald.record_feedback('[{"kind": "unsubscribed", "workspace": "b1", "email": "p41@example.com"}]', 'b2') AS names_b1_with_b2_token,
       herald.record_feedback('[{"kind": "unsubscribed", "workspace": "b1", "email": "p41@example.com"}]', 'b1') AS own_workspace;
SELECT workspace_id, email, reason FROM herald.suppressions WHERE email = 'p41@example.com';
-- opens and clicks count once per (message, kind, link) in 10 minutes: a replayed pixel or link adds nothing
SELECT herald.record_feedback('[{"kind": "opened", "workspace": "b1", "email": "p1@example.com", "message_id": "<replay@herald>"},
                                {"kind": "opened", "workspace": "b1", "email": "p1@example.com", "message_id": "<replay@herald>"}]') AS opened_twice_in_one_call;
SELECT herald.record_feedback('[{"kind": "opened", "workspace": "b1", "email": "p1@example.com", "message_id": "<replay@herald>"}]') AS replayed_open;
SELECT herald.record_feedback('[{"kind": "clicked", "workspace": "b1", "email": "p1@example.com", "message_id": "<replay@herald>", "payload": {"url": "https://a.example/1"}},
                                {"kind": "clicked", "workspace": "b1", "email": "p1@example.com", "message_id": "<replay@herald>", "payload": {"url": "https://a.example/2"}}]') AS two_links;
SELECT herald.record_feedback('[{"kind": "clicked", "workspace": "b1", "email": "p1@example.com", "message_id": "<replay@herald>", "payload": {"url": "https://a.example/1"}}]') AS replayed_click,
       herald.record_feedback('[{"kind": "opened", "workspace": "b1", "email": "p1@example.com", "message_id": "<another@herald>"}]') AS another_message;
SELECT kind, payload ->> 'url' AS url, count(*) FROM herald.events
 WHERE workspace_id = 'b1' AND payload ->> 'message_id' IN ('<replay@herald>', '<another@herald>') GROUP BY 1, 2 ORDER BY 1, 2;
-- a job in flight when its broadcast is paused: an expired lease or a retryable failure comes back held,
-- not claimable; after cancel, cancelled
SELECT herald.create_broadcast('b1', '{"name": "Flight", "template": "news-b", "audience": {"segment": {"field": "contact.email", "op": "in", "value": ["p1@example.com", "p3@example.com"]}}}') AS flight \gset
SELECT herald.schedule_broadcast(:flight);
SELECT herald.advance_broadcasts() AS read;
UPDATE herald.outbox SET status = 'cancelled' WHERE status = 'pending' AND broadcast_id <> :flight;
SELECT count(*) AS claimed FROM herald.claim('t', 10, '1 millisecond');
SELECT herald.pause_broadcast(:flight);
SELECT pg_sleep(0.01);
SELECT herald.reap() AS reaped;   -- its own statement: now() is after the sleep
SELECT status, count(*) FROM herald.outbox WHERE broadcast_id = :flight GROUP BY 1;
SELECT count(*) AS claimed_while_paused FROM herald.claim('t', 10);
SELECT herald.resume_broadcast(:flight);
SELECT count(*) AS claimed FROM herald.claim('t', 10);
SELECT herald.pause_broadcast(:flight);
SELECT herald.complete((SELECT jsonb_agg(jsonb_build_object('id', o.id, 'ok', false, 'retryable', true, 'error', '451 later'))
                          FROM herald.outbox o WHERE o.broadcast_id = :flight AND o.status = 'leased')) AS applied;
SELECT status, count(*) FROM herald.outbox WHERE broadcast_id = :flight GROUP BY 1;
SELECT herald.cancel_broadcast(:flight);
SELECT status, count(*) FROM herald.outbox WHERE broadcast_id = :flight GROUP BY 1;
SELECT * FROM herald.broadcast_stats(:flight);
-- a lease that expires after its broadcast was cancelled ends cancelled, and is counted so
SELECT herald.create_broadcast('b1', '{"name": "Lapsed", "template": "news-b", "audience": {"segment": {"field": "contact.email", "op": "eq", "value": "p1@example.com"}}}') AS lapsed \gset
SELECT herald.schedule_broadcast(:lapsed);
SELECT herald.advance_broadcasts() AS read;
SELECT count(*) AS claimed FROM herald.claim('t', 10, '1 millisecond');
SELECT herald.cancel_broadcast(:lapsed);
SELECT pg_sleep(0.01);
SELECT herald.reap() AS reaped;   -- its own statement: now() is after the sleep
SELECT status, count(*) FROM herald.outbox WHERE broadcast_id = :lapsed GROUP BY 1;
SELECT * FROM herald.broadcast_stats(:lapsed);
-- 'sent' needs the counters to say every job ended and then no open row: counters alone (a redrive
-- counts a job twice) do not finish a broadcast
SELECT herald.create_broadcast('b1', '{"name": "Counted", "template": "news-b", "audience": {"segment": {"field": "contact.email", "op": "eq", "value": "p1@example.com"}}}') AS counted \gset
SELECT herald.schedule_broadcast(:counted);
SELECT herald.advance_broadcasts() AS read;
INSERT INTO herald.broadcast_stats_delta (workspace_id, broadcast_id, variation, metric, n) VALUES ('b1', :counted, 'default', 'dead', 1);
SELECT herald.advance_broadcasts() AS read;
SELECT status, phase FROM herald.broadcasts WHERE id = :counted;
SELECT herald.cancel_broadcast(:counted);
-- pause, resume and cancel race a job in flight: its complete can read the broadcast's status just
-- before the change commits, and leave it pending in a paused or cancelled broadcast, or held in a
-- sending one. Claim itself holds or cancels the first two; the next advance releases the third.
SELECT herald.create_broadcast('b1', '{"name": "Race", "template": "news-b", "audience": {"segment": {"field": "contact.email", "op": "in", "value": ["p1@example.com", "p3@example.com"]}}}') AS race \gset
SELECT herald.schedule_broadcast(:race);
SELECT herald.advance_broadcasts() AS read;
SELECT herald.pause_broadcast(:race);
UPDATE herald.outbox SET status = 'pending' WHERE broadcast_id = :race;
SELECT count(*) AS claimed_while_paused FROM herald.claim('t', 10);
SELECT status, count(*) FROM herald.outbox WHERE broadcast_id = :race GROUP BY 1;
SELECT herald.resume_broadcast(:race);
UPDATE herald.outbox SET status = 'held' WHERE broadcast_id = :race;
SELECT herald.advance_broadcasts() AS read;
SELECT status, count(*) FROM herald.outbox WHERE broadcast_id = :race GROUP BY 1;
UPDATE herald.outbox SET status = 'leased' WHERE broadcast_id = :race;   -- in flight during the cancel
SELECT herald.cancel_broadcast(:race);
UPDATE herald.outbox SET status = 'pending' WHERE broadcast_id = :race;  -- and back, as a retry
SELECT count(*) AS claimed_after_cancel FROM herald.claim('t', 10);
SELECT status, last_error, count(*) FROM herald.outbox WHERE broadcast_id = :race GROUP BY 1, 2;
SELECT * FROM herald.broadcast_stats(:race);
-- a broadcast that cannot advance (its stored segment is broken) keeps its error and holds up no other
SELECT herald.create_broadcast('b1', '{"name": "Broken", "template": "news-a", "audience": {"segment": {"field": "contact.email", "op": "in", "value": ["p1@example.com"]}}}') AS broken \gset
SELECT herald.create_broadcast('b1', '{"name": "Fine", "template": "news-a", "audience": {"segment": {"field": "contact.email", "op": "in", "value": ["p2@example.com"]}}}') AS fine \gset
UPDATE herald.broadcasts SET definition = definition || '{"segment": {"op": "nonsense"}, "segment_exact": false}' WHERE id = :broken;
SELECT herald.schedule_broadcast(:broken), herald.schedule_broadcast(:fine);
SELECT herald.advance_broadcasts() AS read;
SELECT name, status, enqueued, last_error FROM herald.broadcast_overview WHERE id IN (:broken, :fine) ORDER BY id;
SELECT herald.cancel_broadcast(:broken), herald.cancel_broadcast(:fine);
-- segments: what SQL tests itself (attribute equalities and `in`, tags, emails; broadcast.rs: prefilter)
-- selects exactly what the condition engine selects, alone or with the engine's part
UPDATE herald.contacts c SET tags = t.tags
  FROM (VALUES ('p3@example.com', '{vip}'::text[]), ('p5@example.com', '{vip,beta}'), ('p6@example.com', '{beta}')) t(email, tags)
 WHERE c.workspace_id = 'b1' AND c.email = t.email;
CREATE TEMP TABLE segs AS
SELECT s.n, s.seg, herald.create_broadcast('b1', jsonb_build_object('name', 'seg ' || s.n, 'template', 'news-a',
                                                                    'audience', jsonb_build_object('segment', s.seg))) AS id
  FROM (VALUES
    (1, '{"field": "contact.plan", "op": "in", "value": ["pro", "gold"]}'::jsonb),
    (2, '{"field": "contact.tags", "op": "contains", "value": "vip"}'),
    (3, '{"all": [{"field": "contact.tags", "op": "contains", "value": "vip"}, {"field": "contact.tags", "op": "contains", "value": "beta"}]}'),
    (4, '{"field": "contact.email", "op": "in", "value": ["p1@example.com", "p2@example.com", "nobody@example.com"]}'),
    (5, '{"all": [{"field": "contact.country", "op": "eq", "value": "XX"}, {"field": "contact.plan", "op": "in", "value": ["pro"]}]}'),
    (6, '{"all": [{"field": "contact.plan", "op": "eq", "value": "free"}, {"field": "contact.email", "op": "starts_with", "value": "p1"}]}'),
    (7, '{"all": [{"field": "contact.tags", "op": "contains", "value": "beta"}, {"field": "contact.plan", "op": "ne", "value": "pro"}]}')
  ) s(n, seg);
SELECT s.n, b.definition -> 'segment_sql' AS sql_part, b.definition -> 'segment_exact' AS sql_only,
       a.recipients, a.recipients IS NOT DISTINCT FROM (
           SELECT string_agg(split_part(c.email, '@', 1), ' ' ORDER BY c.id) FROM herald.contacts c
            WHERE c.workspace_id = 'b1'
              AND NOT EXISTS (SELECT 1 FROM herald.suppressions x WHERE x.workspace_id = 'b1' AND x.email = c.email)
              AND herald._matches(s.seg, herald._contact_facts(c.email, c.attributes, c.timezone, c.tags), NULL, NULL)) AS engine_agrees
  FROM segs s JOIN herald.broadcasts b ON b.id = s.id
 -- the broadcast read again by the segment's id inside the LATERAL, so whatever join order the planner
 -- picks, _audience_page never runs for another broadcast of b1 (the broken one above raises)
 CROSS JOIN LATERAL (SELECT string_agg(split_part(c.email, '@', 1), ' ' ORDER BY c.id) AS recipients
                       FROM herald._audience_page((SELECT x FROM herald.broadcasts x WHERE x.id = s.id), 0, 1000) p
                       JOIN herald.contacts c ON c.id = p.contact_id) a
 ORDER BY s.n;

-- A/B attribution (issue 13): an open or click without a message_id counts for the variation of the
-- recipient's message of the broadcast its payload names; one that cannot be attributed is refused with
-- its reason (herald.feedback_rejections), counted as unattributed, and the winner's reason says so
UPDATE herald.outbox SET status = 'cancelled' WHERE status IN ('pending', 'leased', 'held');
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "Attr", "variations": [{"key": "a", "template": "news-a"}, {"key": "b", "template": "news-b"}],
  "ab_test": {"test_percent": 50, "metric": "opens", "wait": "1 minute"}}') AS attr \gset
SELECT herald.schedule_broadcast(:attr);
SELECT herald.advance_broadcasts() > 0 AS test_enqueued;
SELECT herald.complete(jsonb_agg(jsonb_build_object('id', j.id, 'ok', true, 'message_id', '<attr-' || j.id || '@herald>'))) > 0 AS sent_test
  FROM herald.claim('t', 1000) j;
CREATE TEMP TABLE attr_r AS
SELECT o.variation, c.email, o.id, row_number() OVER (PARTITION BY o.variation ORDER BY o.contact_id) AS n
  FROM herald.outbox o JOIN herald.contacts c ON c.id = o.contact_id WHERE o.broadcast_id = :attr;
SELECT (SELECT count(*) FROM attr_r WHERE variation = 'a') > 1 AND (SELECT count(*) FROM attr_r WHERE variation = 'b') > 1 AS both_sent;
-- 0: attributed by its address (b); 1: names variation b for a recipient of a: refused; 2: an address
-- the broadcast did not mail: refused; 3: a broadcast that does not exist: refused; 4: not a broadcast
-- id: refused; 5: attributed by its message_id alone (b); 6: names no broadcast: a plain event;
-- 7: a click without a workspace: the broadcast's (a)
SELECT herald.record_feedback(jsonb_build_array(
  jsonb_build_object('kind', 'opened', 'workspace', 'b1', 'email', (SELECT email FROM attr_r WHERE variation = 'b' AND n = 1),
                     'payload', jsonb_build_object('broadcast', :attr)),
  jsonb_build_object('kind', 'opened', 'workspace', 'b1', 'email', (SELECT email FROM attr_r WHERE variation = 'a' AND n = 1),
                     'payload', jsonb_build_object('broadcast', :attr, 'variation', 'b')),
  jsonb_build_object('kind', 'opened', 'workspace', 'b1', 'email', (SELECT c.email FROM herald.contacts c WHERE c.workspace_id = 'b1'
                        AND c.email NOT IN (SELECT email FROM attr_r) ORDER BY c.id LIMIT 1),
                     'payload', jsonb_build_object('broadcast', :attr)),
  jsonb_build_object('kind', 'clicked', 'workspace', 'b1', 'email', (SELECT email FROM attr_r WHERE variation = 'a' AND n = 1),
                     'payload', jsonb_build_object('broadcast', 424242)),
  jsonb_build_object('kind', 'opened', 'workspace', 'b1', 'email', (SELECT email FROM attr_r WHERE variation = 'a' AND n = 1),
                     'payload', jsonb_build_object('broadcast', 'the big one')),
  jsonb_build_object('kind', 'opened', 'message_id', (SELECT '<attr-' || id || '@herald>' FROM attr_r WHERE variation = 'b' AND n = 2)),
  jsonb_build_object('kind', 'opened', 'workspace', 'b1', 'email', (SELECT email FROM attr_r WHERE variation = 'a' AND n = 1)),
  jsonb_build_object('kind', 'clicked', 'email', (SELECT email FROM attr_r WHERE variation = 'a' AND n = 2),
                     'payload', jsonb_build_object('broadcast', :attr)))) AS recorded;
SELECT position, reason, broadcast_id IS NOT DISTINCT FROM :attr AS names_it, input -> 'payload' AS payload
  FROM herald.feedback_rejections WHERE workspace_id = 'b1' ORDER BY batch, position;
SELECT e.kind, r.variation AS sent_as, e.payload ->> 'variation' AS counted_as, e.payload ->> 'broadcast' = :'attr' AS for_attr
  FROM herald.events e JOIN attr_r r ON r.email = e.email
 WHERE e.workspace_id = 'b1' AND e.kind IN ('email.opened', 'email.clicked')
   AND e.created_at >= (SELECT b.created_at FROM herald.broadcasts b WHERE b.id = :attr) ORDER BY 1, 2, 3;
SELECT * FROM herald.broadcast_stats(:attr) WHERE metric NOT IN ('queued', 'sent') ORDER BY 1, 2;
-- the winner: too few attributed opens, and it says how many could not be attributed
UPDATE herald.broadcasts SET test_ends_at = now() - interval '1 second' WHERE id = :attr;
SELECT herald.advance_broadcasts() AS decided;
SELECT phase, winner, winner_reason FROM herald.broadcasts WHERE id = :attr;
-- the rest: a job handed to a daemon (leased: its completion may not be recorded yet) is opened and
-- counts; one still pending cannot have been opened and is refused
SELECT herald.advance_broadcasts() > 0 AS rest_enqueued;
SELECT count(*) AS leased FROM herald.claim('t', 1);
SELECT herald.record_feedback((SELECT jsonb_agg(jsonb_build_object('kind', 'opened', 'workspace', 'b1', 'email', c.email,
                                                                   'payload', jsonb_build_object('broadcast', :attr)) ORDER BY o.status)
                                 FROM (SELECT DISTINCT ON (x.status) x.* FROM herald.outbox x
                                        WHERE x.broadcast_id = :attr AND x.status IN ('leased', 'pending') ORDER BY x.status, x.id) o
                                 JOIN herald.contacts c ON c.id = o.contact_id)) AS recorded;
SELECT position, reason FROM herald.feedback_rejections WHERE workspace_id = 'b1' ORDER BY batch DESC, position LIMIT 1;
SELECT herald.cancel_broadcast(:attr);
-- a bad entry of another kind still fails the whole call before anything is written
SELECT herald.record_feedback('[{"kind": "opened", "workspace": "b1", "email": "p1@example.com", "payload": {"broadcast": 1}}, {"kind": "seen"}]');

-- auto_pause: a sending broadcast stops by itself once, of at least min_sent messages sent, hard
-- bounces or complaints reach their percent (each message's first report counts once); bad settings
-- are refused with their paths
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "n", "template": "news-a", "auto_pause": {"bounce_percent": 0, "min_sent": "ten"}}');
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "n", "template": "news-a", "auto_pause": {"min_sent": 10}}');
UPDATE herald.outbox SET status = 'cancelled' WHERE status IN ('pending', 'leased', 'held');
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "Risky", "template": "news-a",
  "auto_pause": {"bounce_percent": 20, "complaint_percent": 5, "min_sent": 10}}') AS risky \gset
SELECT definition -> 'auto_pause' AS auto_pause FROM herald.broadcasts WHERE id = :risky;
SELECT herald.schedule_broadcast(:risky);
SELECT herald.advance_broadcasts() > 20 AS enqueued;
-- sends n of its pending jobs, each with its own Message-ID
CREATE FUNCTION pg_temp.send_risky(n int) RETURNS int LANGUAGE sql AS $$
  SELECT herald.complete(jsonb_agg(jsonb_build_object('id', j.id, 'ok', true, 'message_id', '<risky-' || j.id || '@herald>')))
    FROM herald.claim('t', n) j $$;
CREATE FUNCTION pg_temp.risky_message(nth int) RETURNS text LANGUAGE sql AS $$
  SELECT h.message_id FROM herald.message_history h WHERE h.broadcast_id = (SELECT max(id) FROM herald.broadcasts WHERE name = 'Risky')
   ORDER BY h.outbox_id OFFSET nth - 1 LIMIT 1 $$;
SELECT pg_temp.send_risky(5) AS sent;
-- 3 of 5 bounce (one reported three times, twice in one batch); a soft bounce and a bounce that names
-- only the address count for nothing: below min_sent, nothing stops
SELECT herald.record_feedback(jsonb_build_array(
  jsonb_build_object('kind', 'hard_bounce', 'message_id', pg_temp.risky_message(1)),
  jsonb_build_object('kind', 'hard_bounce', 'message_id', pg_temp.risky_message(1)),
  jsonb_build_object('kind', 'hard_bounce', 'message_id', pg_temp.risky_message(2)),
  jsonb_build_object('kind', 'soft_bounce', 'message_id', pg_temp.risky_message(4)),
  jsonb_build_object('kind', 'hard_bounce', 'workspace', 'b1', 'email', 'p39@example.com'))) AS recorded;
SELECT herald.record_feedback(jsonb_build_array(
  jsonb_build_object('kind', 'hard_bounce', 'message_id', pg_temp.risky_message(1)),
  jsonb_build_object('kind', 'hard_bounce', 'message_id', pg_temp.risky_message(3)))) AS recorded_again;
SELECT metric, value FROM herald.broadcast_stats(:risky) WHERE metric IN ('sent', 'bounced', 'complained') ORDER BY 1;
SELECT herald.advance_broadcasts() AS advanced, (SELECT status FROM herald.broadcasts WHERE id = :risky) AS status;
-- 5 more sent: 3 bounces in 10 = 30% >= 20%: paused, claim holds its jobs, and it says why
SELECT pg_temp.send_risky(5) AS sent;
SELECT herald.advance_broadcasts() > 0 AS settled;
SELECT status, paused_from, auto_paused FROM herald.broadcasts WHERE id = :risky;
SELECT status, count(*) FROM herald.outbox WHERE broadcast_id = :risky GROUP BY 1 ORDER BY 1;
SELECT count(*) AS claimed_while_paused FROM herald.claim('t', 10);
SELECT kind, data FROM herald.results_staged WHERE broadcast_id = :risky AND kind = 'broadcast.auto_paused'
UNION ALL
SELECT kind, data FROM herald.results WHERE broadcast_id = :risky AND kind = 'broadcast.auto_paused';
SELECT name, status, auto_paused ->> 'reason' AS reason FROM herald.broadcast_overview WHERE id = :risky;
-- resumed by someone who saw the rates: counted afresh from then on (nothing sent since: no pause);
-- then 1 complaint in the next 10 = 10% >= 5%: paused again, complaints named
SELECT herald.resume_broadcast(:risky);
SELECT status, auto_paused, auto_pause_base FROM herald.broadcasts WHERE id = :risky;
SELECT herald.advance_broadcasts() >= 0 AS advanced, (SELECT status FROM herald.broadcasts WHERE id = :risky) AS status;
SELECT pg_temp.send_risky(10) AS sent;
SELECT herald.record_feedback(jsonb_build_array(
  jsonb_build_object('kind', 'complaint', 'message_id', pg_temp.risky_message(12)))) AS recorded;
SELECT herald.advance_broadcasts() > 0 AS settled;
SELECT status, auto_paused FROM herald.broadcasts WHERE id = :risky;
SELECT variation, metric, value FROM herald.broadcast_stats(:risky) WHERE metric IN ('sent', 'bounced', 'complained') ORDER BY 1, 2;
SELECT herald.cancel_broadcast(:risky);
SELECT status, auto_paused ->> 'reason' AS reason FROM herald.broadcasts WHERE id = :risky;
-- refusals at send time: the receiving server's 550 5.1.1 for an address (the daemon's result says
-- "bounce": "hard") is a hard bounce: the address suppressed, an email.bounced event and result, and
-- the broadcast's 'refused' count, which auto_pause reads beside the reported bounces (2 refused of 9
-- tried, 7 sent: 22% >= 20%). A retryable failure is no bounce, whatever it says; a repeated call
-- records nothing twice.
UPDATE herald.outbox SET status = 'cancelled' WHERE status IN ('pending', 'leased', 'held');
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "Refusing", "template": "news-a",
  "auto_pause": {"bounce_percent": 20, "min_sent": 5}}') AS refusing \gset
SELECT herald.schedule_broadcast(:refusing);
SELECT herald.advance_broadcasts() > 10 AS enqueued;
CREATE TEMP TABLE refusing_jobs AS
SELECT j.id, row_number() OVER (ORDER BY j.id) AS n, o.contact_id
  FROM herald.claim('t', 10) j JOIN herald.outbox o ON o.id = j.id;
CREATE TEMP TABLE refusing_results AS
SELECT jsonb_agg(CASE WHEN r.n <= 3
         THEN jsonb_build_object('id', r.id, 'ok', false, 'retryable', r.n = 3, 'error', '550 5.1.1 no such user',
                                 'message_id', '<refused-' || r.n || '@herald>',
                                 'response', jsonb_build_object('smtp', '550 5.1.1 no such user', 'bounce', 'hard'))
         ELSE jsonb_build_object('id', r.id, 'ok', true, 'message_id', '<refusing-' || r.n || '@herald>') END
       ORDER BY r.n) AS results
  FROM refusing_jobs r;
SELECT herald.complete(results) AS applied FROM refusing_results;
SELECT r.n, s.reason, s.detail FROM refusing_jobs r
  JOIN herald.contacts c ON c.workspace_id = 'b1' AND c.id = r.contact_id
  JOIN herald.suppressions s ON s.workspace_id = 'b1' AND s.email = c.email
 ORDER BY r.n;
SELECT r.n, e.kind, e.payload FROM refusing_jobs r
  JOIN herald.contacts c ON c.workspace_id = 'b1' AND c.id = r.contact_id
  JOIN herald.events e ON e.workspace_id = 'b1' AND e.email = c.email AND e.kind = 'email.bounced'
 WHERE e.payload ->> 'message_id' LIKE '<refused-%'
 ORDER BY r.n;
SELECT r.n, x.kind, x.broadcast_id = :refusing AS this_broadcast, x.contact_id = r.contact_id AS its_contact
  FROM (SELECT kind, job_id, broadcast_id, contact_id FROM herald.results_staged WHERE kind = 'email.bounced'
        UNION ALL
        SELECT kind, job_id, broadcast_id, contact_id FROM herald.results WHERE kind = 'email.bounced') x
  JOIN refusing_jobs r ON r.id = x.job_id
 ORDER BY r.n;
SELECT metric, value FROM herald.broadcast_stats(:refusing) WHERE metric IN ('sent', 'failed', 'retried', 'bounced', 'refused') ORDER BY 1;
SET client_min_messages = error;   -- the warning names the ignored jobs' ids
SELECT herald.complete(results) AS applied_again FROM refusing_results;
RESET client_min_messages;
SELECT count(*) AS bounce_events FROM herald.events WHERE payload ->> 'refused_at_send' = 'true';
SELECT metric, value FROM herald.broadcast_stats(:refusing) WHERE metric = 'refused';
SELECT herald.advance_broadcasts() > 0 AS settled;
SELECT status, auto_paused FROM herald.broadcasts WHERE id = :refusing;
SELECT herald.cancel_broadcast(:refusing);
-- the installation's default (the database setting herald.broadcast_auto_pause) for definitions that
-- do not say auto_pause; "auto_pause": null says none; a bad setting fails naming it, creating nothing
SET herald.broadcast_auto_pause = '{"bounce_percent": 5, "complaint_percent": 0.1}';
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "Default net", "template": "news-a"}') AS netted \gset
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "Own line", "template": "news-a", "auto_pause": {"bounce_percent": 2, "min_sent": 50}}') AS own \gset
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "No net", "template": "news-a", "auto_pause": null}') AS bare \gset
SELECT name, definition -> 'auto_pause' AS auto_pause FROM herald.broadcasts WHERE id IN (:netted, :own, :bare) ORDER BY id;
SET herald.broadcast_auto_pause = '{"bounce_percent": 500}';
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "Bad net", "template": "news-a"}');
SET herald.broadcast_auto_pause = 'five percent';
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "Bad net", "template": "news-a"}');
SELECT count(*) AS bad_nets FROM herald.broadcasts WHERE name = 'Bad net';
RESET herald.broadcast_auto_pause;
SELECT herald.create_broadcast('b1', '{"audience": "all", "name": "After reset", "template": "news-a"}') AS after \gset
SELECT definition -> 'auto_pause' AS auto_pause FROM herald.broadcasts WHERE id = :after;

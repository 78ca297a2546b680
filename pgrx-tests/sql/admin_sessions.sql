-- The operator page's sign-outs (sql/admin_sessions.sql): a signed-out session is refused on every
-- daemon, "everyone" ends every session issued before it (not one issued in the same second), bad
-- input is refused and changes nothing, expired sign-outs are forgotten, and only the page's roles
-- (herald_admin, herald_worker) may call.
\set SHOW_CONTEXT never
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hadm_app') THEN CREATE ROLE hadm_app NOLOGIN IN ROLE herald_app; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hadm_worker') THEN CREATE ROLE hadm_worker NOLOGIN IN ROLE herald_worker; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hadm_admin') THEN CREATE ROLE hadm_admin NOLOGIN IN ROLE herald_admin; END IF;
END $$;
\set ann '\'0123456789abcdef0123456789abcdef\''
\set bob '\'fedcba9876543210fedcba9876543210\''
SELECT herald.admin_session_ok(:ann, now() - interval '1 hour') AS ann, herald.admin_session_ok(:bob, now() - interval '1 hour') AS bob;
-- Ann signs out (twice: the second changes nothing); Bob stays signed in
SELECT herald.admin_sign_out(:ann, 'Ann', now() + interval '11 hours');
SELECT herald.admin_sign_out(:ann, 'Ann', now() + interval '11 hours');
SELECT herald.admin_session_ok(:ann, now() - interval '1 hour') AS ann, herald.admin_session_ok(:bob, now() - interval '1 hour') AS bob;
SELECT session, operator FROM herald.admin_signouts ORDER BY session;
-- bad input: refused, nothing written
SELECT herald.admin_sign_out('not-a-nonce', 'Ann', now() + interval '1 hour');
SELECT herald.admin_sign_out(:bob, '', now() + interval '1 hour');
SELECT herald.admin_sign_out(:bob, 'Bob', NULL);
SELECT herald.admin_sign_out(:bob, 'Bob', '2099-01-01 00:00:00+00');
SELECT count(*) AS sign_outs FROM herald.admin_signouts;
-- only the page's roles may call; an application may not sign operators out, nor read the table
SET ROLE hadm_app;
SELECT herald.admin_sign_out(:bob, 'Mallory', now() + interval '1 hour');
SELECT herald.admin_session_ok(:bob, now());
SELECT count(*) FROM herald.admin_signouts;
RESET ROLE;
SET ROLE hadm_worker;
SELECT herald.admin_session_ok(:bob, now() - interval '1 hour') AS bob_as_seen_by_the_daemon;
RESET ROLE;
-- everyone: Bob's session from an hour ago ends, as does one issued a millisecond before; one issued
-- a millisecond after (the operator who asked, signing in again) stays
BEGIN;
SET ROLE hadm_admin;
SELECT herald.admin_sign_out(:bob, 'Bob', now() + interval '12 hours', everyone => true);
SELECT herald.admin_session_ok(:bob, now() - interval '1 hour') AS bob,
       herald.admin_session_ok('00000000000000000000000000000001', now() - interval '1 millisecond') AS a_moment_before,
       herald.admin_session_ok('00000000000000000000000000000002', now() + interval '1 millisecond') AS a_moment_after;
COMMIT;
RESET ROLE;
SELECT session, operator FROM herald.admin_signouts ORDER BY session;
-- sign-outs whose sessions have expired are forgotten by the next sign-out
UPDATE herald.admin_signouts SET expires_at = now() - interval '1 minute' WHERE session = :ann;
SELECT herald.admin_sign_out('00000000000000000000000000000003', 'Cy', now() + interval '1 hour');
SELECT session, operator FROM herald.admin_signouts ORDER BY session;

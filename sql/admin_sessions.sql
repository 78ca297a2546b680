-- herald: sign-outs of the operator's page (sidecar/src/run/admin/). A session there is a signed cookie
-- that any daemon sharing the settings checks by itself (auth.rs): name, expiry, a random nonce, an
-- HMAC. What a signature cannot say is that its operator signed out, or that every session was ended:
-- before this table a cookie copied from a browser kept working for its whole 12 hours after "Sign
-- out", and the only way to end every session was a new password. The page asks this table before
-- every page, live update and action (two primary-key probes), so a signed-out session stops on every
-- daemon at once, and "sign out everyone" ends every session issued before it.
-- Installation-wide (the page serves every workspace): no workspace, only the page's role and the
-- daemon's may call the functions. Rows go once the sessions they name would have expired anyway.

CREATE TABLE herald.admin_signouts (
    -- a session's nonce (32 hex digits), or '*': every session issued before signed_out_at
    session       text PRIMARY KEY CHECK (session ~ '^([0-9a-f]{32}|[*])$'),
    operator      text NOT NULL CHECK (length(operator) BETWEEN 1 AND 64),   -- who signed out
    expires_at    timestamptz NOT NULL,   -- when the session(s) would have ended anyway: the row goes then
    signed_out_at timestamptz NOT NULL DEFAULT now()
);
-- kept by pg_dump: a restored database must not bring signed-out sessions back
SELECT pg_catalog.pg_extension_config_dump('herald.admin_signouts', '');

-- Whether the page's session with this nonce, issued at `issued_at` (by the daemon's clock, to the
-- millisecond), is still signed in as far as the database knows: not signed out itself, and issued
-- after the last "sign out everyone" (by the database's clock: a daemon whose clock is behind may
-- need a second sign-in just after one).
-- Who may call it: herald_admin (the page's role) and herald_worker (the page on the daemon's pool).
CREATE FUNCTION herald.admin_session_ok(session text, issued_at timestamptz) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, herald, pg_temp
BEGIN ATOMIC
    SELECT NOT EXISTS (SELECT 1 FROM herald.admin_signouts s WHERE s.session = admin_session_ok.session)
       AND NOT EXISTS (SELECT 1 FROM herald.admin_signouts s
                        WHERE s.session = '*' AND admin_session_ok.issued_at <= s.signed_out_at);
END;

-- Signs out the session with this nonce or, with `everyone`, every session issued until now; either
-- way the row is kept until `expires_at` (the session's expiry; for everyone, now + a session's
-- life), and sign-outs past theirs are forgotten here. Who may call it: as admin_session_ok.
CREATE FUNCTION herald.admin_sign_out(session text, operator text, expires_at timestamptz,
                                      everyone boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, herald, pg_temp
AS $$
BEGIN
    IF session IS NULL OR session !~ '^[0-9a-f]{32}$' THEN
        RAISE EXCEPTION 'session must be a session nonce (32 hex digits)' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF operator IS NULL OR length(operator) NOT BETWEEN 1 AND 64 THEN
        RAISE EXCEPTION 'operator must be a name of 1 to 64 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF expires_at IS NULL OR expires_at > now() + interval '7 days' THEN
        RAISE EXCEPTION 'expires_at must be when the session ends, at most 7 days from now, got %',
                        coalesce(expires_at::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM herald.admin_signouts s WHERE s.expires_at < now();
    INSERT INTO herald.admin_signouts AS s (session, operator, expires_at)
    VALUES (CASE WHEN coalesce(everyone, false) THEN '*' ELSE admin_sign_out.session END,
            admin_sign_out.operator, admin_sign_out.expires_at)
    ON CONFLICT ON CONSTRAINT admin_signouts_pkey DO UPDATE
       SET operator = EXCLUDED.operator, signed_out_at = now(),
           expires_at = greatest(s.expires_at, EXCLUDED.expires_at);
END
$$;

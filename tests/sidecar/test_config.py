"""Start-up checks of `herald run`: clear errors, no secrets in them."""

import os
import subprocess

from conftest import BIN, PGHOST, USER


def run(env, *args):
    base = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_") and k != "DATABASE_URL"}
    base.update(env)
    return subprocess.run([BIN, "run", *args], env=base, capture_output=True, text=True, timeout=30)


def test_bad_settings_are_named_and_secrets_not_shown():
    r = run({"HERALD_CONCURRENCY": "lots"})
    assert r.returncode != 0
    assert 'HERALD_CONCURRENCY: expected a whole number from 1 to 10000, got "lots"' in r.stderr
    r = run({"HERALD_SMTP_URL_DEFAULT": "smtp://ann:hunter2@mail.test?tls=sometimes"})
    assert r.returncode != 0
    assert "HERALD_SMTP_URL_DEFAULT: tls must be required, opportunistic or none" in r.stderr
    assert "hunter2" not in r.stderr


def test_config_file_and_missing_extension(tmp_path):
    cfg = tmp_path / "herald.toml"
    cfg.write_text(f'DATABASE_URL = "host={PGHOST} dbname=postgres user={USER}"\nHERALD_CONCURRENCY = 4\n')
    r = run({}, "--config", str(cfg))
    assert r.returncode != 0
    assert "the herald extension is not installed in database \"postgres\"" in r.stderr
    cfg.write_text("HERALD_CONCURENCY = 4\n")
    r = run({}, "--config", str(cfg))
    assert r.returncode != 0 and 'unknown key "HERALD_CONCURENCY"' in r.stderr


def test_help_documents_every_setting():
    out = subprocess.run([BIN, "run", "--help"], capture_output=True, text=True, timeout=10, env={
        **{k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}, "HERALD_WEBHOOK_SECRET": "s3cret"}).stdout
    for key in ["DATABASE_URL", "HERALD_WORKER_ID", "HERALD_CONCURRENCY", "HERALD_POLL_INTERVAL_MS",
                "HERALD_LEASE_SECONDS", "HERALD_SMTP_URL_", "HERALD_MAILDIR", "HERALD_FROM", "HERALD_WEBHOOK_SECRET",
                "HERALD_WEBHOOK_ALLOW", "HERALD_METRICS_ADDR", "HERALD_UNSUBSCRIBE_URL", "HERALD_LOG_FORMAT",
                "HERALD_SHUTDOWN_GRACE_SECONDS", "HERALD_SENDGRID_VERIFICATION_KEY",
                "HERALD_LONG_TRANSACTION_WARN_SECONDS"]:
        assert key in out, key
    assert "s3cret" not in out


def test_help_documents_secrets_rotation_and_tls():
    out = subprocess.run([BIN, "run", "--help"], capture_output=True, text=True, timeout=10, env={
        **{k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}}).stdout
    for words in ["HERALD_<PURPOSE>_PREVIOUS", "HERALD_<PURPOSE>_FILE", "[workspaces.acme]", "webhook_secret_previous",
                  "events_token", "link_secret_file", "X-Herald-Signature-Previous", "sslmode=require", "verify-full",
                  "sslrootcert", "herald_worker", "HERALD_LINK_SECRET", "HERALD_EVENTS_TOKEN"]:
        assert words in out, words


def test_per_workspace_secrets_are_checked_at_start_without_showing_them(tmp_path):
    cfg = tmp_path / "herald.toml"
    cfg.write_text('[workspaces.acme]\nlink_secret = "tooshort-x"\n')
    r = run({}, "--config", str(cfg))
    assert r.returncode != 0
    assert "[workspaces.acme] link_secret: must be at least 16 characters" in r.stderr, r.stderr
    assert "tooshort-x" not in r.stderr
    cfg.write_text('[workspaces.acme]\nevents_token = "shared-token-1"\n[workspaces.globex]\nevents_token = "shared-token-1"\n')
    r = run({}, "--config", str(cfg))
    assert r.returncode != 0 and "events tokens must differ" in r.stderr and "shared-token-1" not in r.stderr
    r = run({"HERALD_WEBHOOK_SECRET_FILE": str(tmp_path / "missing")})
    assert r.returncode != 0 and "HERALD_WEBHOOK_SECRET_FILE: cannot read" in r.stderr, r.stderr


def test_a_superuser_connection_is_warned_about(db, sidecar):
    from conftest import wait_until
    s = sidecar()
    wait_until(lambda: "running" in s.log(), timeout=30, what="the daemon running")
    log = s.log()
    assert "connected as a superuser" in log and "herald_worker" in log, log


# ------------------------------------------------------------------------------------- database TLS

def _certificates(tmp_path):
    """A CA, a server certificate for "localhost" signed by it, and an unrelated CA (PEM files)."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    ca_key, ca_cert = ca("herald test CA")
    _, other_cert = ca("another CA")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)
    files = {"ca": tmp_path / "ca.pem", "other": tmp_path / "other-ca.pem"}
    files["ca"].write_bytes(pem(ca_cert))
    files["other"].write_bytes(pem(other_cert))
    server = (pem(cert), key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return files, server


def test_database_tls_require_verify_ca_and_verify_full(tmp_path, smtp):
    import pwd
    import signal
    import time
    from conftest import wait_until
    from scratch_cluster import ScratchCluster

    files, (server_cert, server_key) = _certificates(tmp_path)
    c = ScratchCluster()
    try:
        pg = pwd.getpwnam("postgres")
        for fname, data in [("server.crt", server_cert), ("server.key", server_key)]:
            path = os.path.join(c.data, fname)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o600)
            if os.geteuid() == 0:
                os.chown(path, pg.pw_uid, pg.pw_gid)
        with open(os.path.join(c.data, "postgresql.conf"), "a") as f:
            f.write("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
        c.stop()
        c.start()
        # a least-privilege login role for the daemon, over TCP with a password
        c.admin_sql("CREATE ROLE herald_tls_daemon LOGIN PASSWORD 'tls-test-pw'")
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION herald")
            conn.execute("GRANT herald_worker TO herald_tls_daemon")
            conn.execute("SELECT herald.create_workspace('acme', 'Acme')")
            conn.execute("SELECT herald.upsert_template('acme', 'hi', 'Hi', '<p>hi</p>')")

        def url(host, mode, ca=None):
            u = f"postgres://herald_tls_daemon:tls-test-pw@{host}:{c.port}/{c.dbname}?sslmode={mode}"
            return u + (f"&sslrootcert={ca}" if ca else "")

        def start(database_url):
            env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_") and k != "DATABASE_URL"}
            env.update({"DATABASE_URL": database_url, "RUST_LOG": "info", "NO_COLOR": "1",
                        "HERALD_SMTP_URL_DEFAULT": f"smtp://127.0.0.1:{smtp.port}?tls=none",
                        "HERALD_POLL_INTERVAL_MS": "200"})
            log = open(tmp_path / f"run-{time.monotonic_ns()}.log", "w+b")
            return subprocess.Popen([BIN, "run"], env=env, stdout=log, stderr=subprocess.STDOUT), log

        def text(log):
            log.flush()
            log.seek(0)
            return log.read().decode(errors="replace")

        def ssl_connections():
            with c.connect() as conn:
                return conn.execute("""SELECT s.ssl, count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                                        WHERE a.usename = 'herald_tls_daemon' GROUP BY 1""").fetchall()

        # accepted: verify-full by name, verify-ca and require (by address: not the certificate's name)
        sent = 0
        for database_url in [url("localhost", "verify-full", files["ca"]), url("127.0.0.1", "verify-ca", files["ca"]),
                             url("127.0.0.1", "require")]:
            p, log = start(database_url)
            try:
                wait_until(lambda: "running" in text(log) or p.poll() is not None, timeout=30, what="start")
                assert p.poll() is None, text(log)
                with c.connect() as conn:
                    conn.execute("SELECT herald.send('acme', %s, 'hi')", (f"r{sent}@example.com",))
                sent += 1
                wait_until(lambda: smtp.count() == sent, timeout=30, what="the message through a TLS-connected daemon")
                rows = ssl_connections()
                assert rows and all(ssl for ssl, _ in rows), rows
                assert "connected as a superuser" not in text(log), "herald_worker is not a superuser"
            finally:
                p.send_signal(signal.SIGTERM)
                assert p.wait(timeout=40) == 0, text(log)

        # refused at start, with the reason: an unrelated CA, a name the certificate does not have
        for database_url, says in [(url("localhost", "verify-full", files["other"]), "UnknownIssuer"),
                                   (url("127.0.0.1", "verify-full", files["ca"]), "not valid for name"),
                                   (url("localhost", "verify-ca", tmp_path / "missing.pem"), "sslrootcert")]:
            p, log = start(database_url)
            try:
                assert p.wait(timeout=40) != 0, text(log)
            finally:
                if p.poll() is None:
                    p.kill()
            assert says in text(log), (database_url, text(log))
            assert "tls-test-pw" not in text(log)
    finally:
        c.destroy()

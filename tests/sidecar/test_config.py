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
                "HERALD_SHUTDOWN_GRACE_SECONDS", "HERALD_SENDGRID_VERIFICATION_KEY"]:
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

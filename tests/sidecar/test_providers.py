"""Providers (issue 13): a provider's kind decides its transport (smtp → HERALD_SMTP_URL_<NAME> only, file →
HERALD_MAILDIR only, never one in place of the other), checked at start and per job; From and Reply-To resolved
per email: broadcast > template > provider > HERALD_FROM, as an SMTP server receives them."""

import json
import os
import subprocess

from conftest import BIN, wait_until


def env_for(db, **settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_") and k != "DATABASE_URL"}
    env.update({"DATABASE_URL": db.url, "RUST_LOG": "info", "NO_COLOR": "1"})
    env.update({k: str(v) for k, v in settings.items()})
    return env


def test_refuses_to_start_naming_every_provider_without_its_transport(db, smtp, tmp_path):
    db.q("SELECT herald.create_workspace('globex', 'Globex')")
    db.q("SELECT herald.upsert_provider('acme', 'mail', 'smtp')")
    db.q("SELECT herald.upsert_provider('acme', 'archive', 'file')")
    db.q("SELECT herald.upsert_provider('globex', 'esp-2', 'smtp')")
    db.q("SELECT herald.upsert_provider('globex', 'default', 'smtp')")
    url = f"smtp://127.0.0.1:{smtp.port}?tls=none"
    r = subprocess.run([BIN, "run"], env=env_for(db, HERALD_SMTP_URL_DEFAULT=url, HERALD_SMTP_URL_MAIL=url),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "2 provider(s) cannot send" in r.stderr, r.stderr
    assert ("provider acme/archive is of kind file but HERALD_MAILDIR is not set in herald run's environment"
            in r.stderr), r.stderr
    assert "provider globex/esp-2 is of kind smtp but HERALD_SMTP_URL_ESP_2 is not set" in r.stderr, r.stderr
    # the ones that have theirs are not named
    assert "acme/mail" not in r.stderr and "globex/default" not in r.stderr, r.stderr

    # each transport given: it starts, and says what the implicit default provider (no row) uses
    s = subprocess.Popen([BIN, "run"], env=env_for(db, HERALD_SMTP_URL_MAIL=url, HERALD_SMTP_URL_ESP_2=url,
                                                   HERALD_SMTP_URL_DEFAULT=url, HERALD_MAILDIR=tmp_path / "mail"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in s.stdout:
            lines.append(line)
            if "running" in line and "concurrency" in line:
                break
        log = "".join(lines)
        assert ("every provider has its transport; a workspace's implicit default provider (no row) sends by "
                "SMTP (HERALD_SMTP_URL_DEFAULT)") in log, log
    finally:
        s.terminate()
        assert s.wait(30) == 0


def test_a_file_provider_writes_to_the_mailbox_even_with_an_smtp_url(db, smtp, sidecar, tmp_path):
    db.q("SELECT herald.upsert_template('acme', 'hello', 'Hello', '<p>Hello</p>')")
    db.q("SELECT herald.upsert_provider('acme', 'archive', 'file')")
    maildir = tmp_path / "mail"
    # an SMTP URL of the same name changes nothing: the kind says file
    sidecar(HERALD_MAILDIR=maildir, HERALD_SMTP_URL_ARCHIVE=f"smtp://127.0.0.1:{smtp.port}?tls=none")
    db.q("SELECT herald.send('acme', 'filed@example.com', 'hello', '{}', 'archive')")
    db.q("SELECT herald.send('acme', 'mailed@example.com', 'hello')")   # the implicit default: SMTP
    wait_until(lambda: db.counts() == {"done": 2}, what="both sent")
    files = list(maildir.iterdir())
    assert len(files) == 1
    assert b"To: filed@example.com" in files[0].read_bytes()
    assert [rcpts for rcpts, _, _ in smtp.snapshot()] == [["mailed@example.com"]]
    path = db.one("SELECT o.response ->> 'file' FROM herald.outbox o WHERE o.provider = 'archive'")
    assert path == str(files[0])


def test_a_provider_created_after_start_without_its_url_fails_its_jobs(db, smtp, sidecar, tmp_path):
    db.q("SELECT herald.upsert_template('acme', 'hello', 'Hello', '<p>Hello</p>')")
    maildir = tmp_path / "mail"
    s = sidecar(HERALD_MAILDIR=maildir)
    wait_until(lambda: "running" in s.log(), what="the daemon running")
    db.q("SELECT herald.upsert_provider('acme', 'late', 'smtp')")
    job = db.one("SELECT herald.send('acme', 'late@example.com', 'hello', '{}', 'late')")
    wait_until(lambda: db.one("SELECT status FROM herald.outbox WHERE id = %s", job) not in ("pending", "leased"),
               what="the job finished")
    status, error, attempt = db.q("SELECT status, last_error, attempt FROM herald.outbox WHERE id = %s", job)[0]
    message = "provider acme/late is of kind smtp but HERALD_SMTP_URL_LATE is not set in herald run's environment"
    assert (status, attempt) == ("failed", 1), (status, error, attempt)
    assert message in error, error
    assert message in s.log()
    # nothing went anywhere: not into the mailbox (the old fallback), not over the default's SMTP
    assert not maildir.exists() or list(maildir.iterdir()) == []
    assert smtp.count() == 0


def test_from_and_reply_to_follow_broadcast_then_template_then_provider_then_herald_from(db, smtp, sidecar):
    url = f"smtp://127.0.0.1:{smtp.port}?tls=none"
    db.q("""SELECT herald.upsert_provider('acme', 'esp', 'smtp',
            '{"from": "Acme Provider <provider@acme.test>", "reply_to": "Provider Help <help@acme.test>"}')""")
    db.q("SELECT herald.upsert_template('acme', 'plain', 'Plain', '<p>x</p>')")
    db.q("""SELECT herald.upsert_template('acme', 'signed', 'Signed', '<p>x</p>', NULL,
            '"Acme, Templates" <template@acme.test>', 'template-replies@acme.test')""")
    db.q("""SELECT herald.upsert_template('acme', 'half', 'Half', '<p>x</p>', NULL, 'half@acme.test')""")
    db.q("SELECT herald.send('acme', 'env@example.com', 'plain')")                        # HERALD_FROM
    db.q("SELECT herald.send('acme', 'provider@example.com', 'plain', '{}', 'esp')")     # provider
    db.q("SELECT herald.send('acme', 'template@example.com', 'signed', '{}', 'esp')")    # template over provider
    db.q("SELECT herald.send('acme', 'half@example.com', 'half', '{}', 'esp')")          # each field on its own
    db.q("SELECT herald.upsert_contact('acme', 'broadcast@example.com', '{}')")
    b = db.one("""SELECT herald.create_broadcast('acme', %s::jsonb)""", json.dumps({
        "name": "Senders", "template": "signed", "provider": "esp",
        "audience": {"segment": {"field": "contact.email", "op": "eq", "value": "broadcast@example.com"}},
        "from": "Acme Broadcasts <broadcast@acme.test>", "reply_to": "broadcast-replies@acme.test"}))
    db.q("SELECT herald.schedule_broadcast(%s)", b)
    sidecar(HERALD_SMTP_URL_ESP=url)
    wait_until(lambda: smtp.count() == 5, what="five emails")
    got = {rcpts[0]: (msg["From"], msg["Reply-To"]) for rcpts, msg, _ in smtp.snapshot()}
    assert got == {
        "env@example.com": ("Acme <news@acme.test>", None),
        "provider@example.com": ("Acme Provider <provider@acme.test>", "Provider Help <help@acme.test>"),
        "template@example.com": ('"Acme, Templates" <template@acme.test>', "template-replies@acme.test"),
        "half@example.com": ("half@acme.test", "Provider Help <help@acme.test>"),
        "broadcast@example.com": ("Acme Broadcasts <broadcast@acme.test>", "broadcast-replies@acme.test"),
    }, got
    wait_until(lambda: db.counts() == {"done": 5}, what="five recorded done")

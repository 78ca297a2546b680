"""Webhook calls through `herald run` to a real HTTP server."""

import json

from conftest import signature_ok, wait_until


def webhook(db, key, url, body=None, timeout_ms=2000, method="POST", headers=None, email="ann@example.com"):
    contact = db.one("SELECT herald.upsert_contact('acme', %s, '{\"first_name\": \"Ann\"}')", email)
    payload = {"url": url, "method": method, "headers": headers or {}, "body": body, "timeout_ms": timeout_ms,
               "node": "crm"}
    return db.one("""INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, rate_keys, contact_id, payload)
                     VALUES ('acme', 'webhook', %s, ARRAY['host:127.0.0.1'], %s, %s::jsonb) RETURNING id""",
                  key, contact, json.dumps(payload))


def job(db, id):
    return db.q("SELECT status, attempt, last_error, response FROM herald.outbox WHERE id = %s", id)[0]


def retry_now(db, id):
    db.q("UPDATE herald.outbox SET run_at = now() WHERE id = %s AND status = 'pending'", id)
    db.q('NOTIFY "herald.outbox"')


def test_webhook_is_signed_rendered_and_its_reply_kept(db, http, sidecar):
    http.plan("/hook", (200, 0, json.dumps({"score": 7, "tier": "gold"})))
    http.plan("/text", (200, 0, "plain words"))
    a = webhook(db, "k1", http.url + "/hook", body={"x": "{{ contact.email }}", "n": 1,
                                                     "nested": ["{{ contact.first_name | upper }}", None]},
                headers={"X-Custom": "hello {{ contact.first_name }}"})
    b = webhook(db, "k2", http.url + "/text", body=None, method="get")
    c = webhook(db, "k3", http.url + "/missing-{{ contact.first_name }}")
    http.plan("/missing-Ann", (404, 0, "no such thing"))
    sidecar()
    wait_until(lambda: db.one("SELECT count(*) FROM herald.outbox WHERE status IN ('done', 'failed')") == 3,
               what="3 webhooks finished")
    assert job(db, a)[:2] == ("done", 1)
    assert job(db, a)[3] == {"score": 7, "tier": "gold"}
    assert job(db, b)[3] == {"text": "plain words"}
    status, attempt, error, _ = job(db, c)
    assert (status, attempt) == ("failed", 1) and error.startswith("HTTP 404") and "no such thing" in error

    reqs = {r["path"]: r for r in http.snapshot()}
    hook = reqs["/hook"]
    assert hook["method"] == "POST"
    assert json.loads(hook["body"]) == {"x": "ann@example.com", "n": 1, "nested": ["ANN", None]}
    assert hook["headers"]["Content-Type"] == "application/json"
    assert hook["headers"]["X-Custom"] == "hello Ann"
    assert hook["headers"]["Idempotency-Key"] == "k1"
    assert signature_ok(hook["headers"], hook["body"])
    assert reqs["/text"]["method"] == "GET" and reqs["/text"]["body"] == b""
    assert signature_ok(reqs["/text"]["headers"], b"")
    assert reqs["/missing-Ann"]["headers"]["Idempotency-Key"] == "k3"


def test_webhook_500_is_retried(db, http, sidecar):
    http.plan("/hook", (500, 0, "boom"))
    id = webhook(db, "retry-500", http.url + "/hook", body={"x": "{{ contact.email }}"})
    sidecar()
    wait_until(lambda: job(db, id)[:2] == ("pending", 1), what="the 500 to be recorded")
    assert job(db, id)[2].startswith("HTTP 500") and "boom" in job(db, id)[2]
    retry_now(db, id)
    wait_until(lambda: job(db, id)[0] == "done", what="the retry")
    assert job(db, id)[1] == 2
    reqs = http.snapshot()
    assert len(reqs) == 2
    for r in reqs:
        assert r["headers"]["Idempotency-Key"] == "retry-500"
        assert signature_ok(r["headers"], r["body"])
        assert json.loads(r["body"]) == {"x": "ann@example.com"}


def test_webhook_timeout_is_retried(db, http, sidecar):
    http.plan("/slow", (200, 2.0, "{}"))
    id = webhook(db, "slow-1", http.url + "/slow", body={"a": 1}, timeout_ms=300)
    sidecar()
    wait_until(lambda: job(db, id)[:2] == ("pending", 1), what="the time-out to be recorded")
    assert "did not answer within 300 ms" in job(db, id)[2]
    retry_now(db, id)
    wait_until(lambda: job(db, id)[0] == "done", what="the retry")
    assert http.count("/slow") == 2


def test_private_targets_are_refused_unless_allowed(db, http, sidecar):
    a = webhook(db, "p1", http.url + "/hook", body={"a": 1})
    b = webhook(db, "p2", f"http://localhost:{http.port}/hook", body={"a": 1})
    c = webhook(db, "p3", f"http://[::1]:{http.port}/hook", body={"a": 1})
    s = sidecar(HERALD_WEBHOOK_ALLOW=None)
    wait_until(lambda: db.one("SELECT count(*) FROM herald.outbox WHERE status = 'failed'") == 3,
               what="3 refusals")
    for id, host in [(a, "127.0.0.1"), (b, "localhost"), (c, "::1")]:
        status, attempt, error, _ = job(db, id)
        assert status == "failed" and attempt == 1
        assert f"webhook target {host} refused" in error and "loopback" in error and "HERALD_WEBHOOK_ALLOW" in error
    assert http.count() == 0
    assert s.running()


def test_webhooks_are_signed_with_their_workspace_key_and_the_previous_one_during_rotation(db, http, sidecar, tmp_path):
    import hashlib
    import hmac
    from conftest import SECRET

    def sig(key, headers, body):
        return "sha256=" + hmac.new(key.encode(), headers["X-Herald-Timestamp"].encode() + b"." + body,
                                    hashlib.sha256).hexdigest()

    db.q("SELECT herald.create_workspace('globex', 'Globex')")
    a = webhook(db, "acme-1", http.url + "/acme")
    contact = db.one("SELECT herald.upsert_contact('globex', 'gus@example.com')")
    g = db.one("""INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, rate_keys, contact_id, payload)
                  VALUES ('globex', 'webhook', 'globex-1', ARRAY['host:127.0.0.1'], %s, %s::jsonb) RETURNING id""",
               contact, json.dumps({"url": http.url + "/globex", "body": {"w": "{{ workspace }}"}}))
    (tmp_path / "acme-old").write_text("acme-webhook-key-old\n")
    cfg = tmp_path / "herald.toml"
    cfg.write_text('[workspaces.acme]\nwebhook_secret = "acme-webhook-key-new"\n'
                   f'webhook_secret_previous_file = "{tmp_path / "acme-old"}"\n')
    sidecar(HERALD_CONFIG=str(cfg))
    wait_until(lambda: db.one("SELECT count(*) FROM herald.outbox WHERE status = 'done'") == 2, what="2 webhooks")
    reqs = {r["path"]: r for r in http.snapshot()}
    acme, globex = reqs["/acme"], reqs["/globex"]
    # acme's: its current key, and during the rotation its previous one too
    assert acme["headers"]["X-Herald-Signature"] == sig("acme-webhook-key-new", acme["headers"], acme["body"])
    assert acme["headers"]["X-Herald-Signature-Previous"] == sig("acme-webhook-key-old", acme["headers"], acme["body"])
    assert not signature_ok(acme["headers"], acme["body"]), "not the default key"
    # globex has no key of its own: the default (HERALD_WEBHOOK_SECRET), and no previous one
    assert signature_ok(globex["headers"], globex["body"])
    assert globex["headers"]["X-Herald-Signature"] == sig(SECRET, globex["headers"], globex["body"])
    assert "X-Herald-Signature-Previous" not in globex["headers"]
    assert [job(db, x)[0] for x in (a, g)] == ["done", "done"]

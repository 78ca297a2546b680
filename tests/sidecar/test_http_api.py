"""The HTTP API (/v1/…) end to end: `herald run` serving it as a herald_worker role (the production
set-up), a real HTTP client, assertions on what the database holds and on what the SMTP server got.
Keys are made with herald.create_api_key; the workspace of a request is always its key's."""

import http.client
import json
import socket
import threading
import time
import uuid

import psycopg
import pytest

from conftest import free_port, wait_until
from test_http_side import wait_http
from test_least_privilege import roles, url  # noqa: F401  (roles is a fixture)
from test_stream import EventStream, journey_that_ends_at_once

ALL_SCOPES = "ARRAY['track', 'contacts', 'lists', 'send']"


class Api:
    """A client of the daemon's /v1/… on one port; `key` is sent as the bearer token."""

    def __init__(self, port, key=None):
        self.port = port
        self.key = key

    def call(self, path, body=None, key="default", headers=None, method="POST", raw=None):
        """(status, headers, parsed JSON body or the raw text)."""
        h = {"Content-Type": "application/json"}
        key = self.key if key == "default" else key
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        h.update(headers or {})
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            text = r.read().decode()
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
            return r.status, {k.lower(): v for k, v in r.getheaders()}, parsed
        finally:
            conn.close()


def start_api(db, roles, sidecar, **env):  # noqa: F811
    """The daemon logged in as a herald_worker member, its HTTP side on a free port; a key of 'acme'
    with every scope."""
    worker, _ = roles
    port = free_port()
    sidecar(DATABASE_URL=url(db, worker), HERALD_HTTP_ADDR=f"127.0.0.1:{port}",
            HERALD_PUBLIC_URL=f"http://127.0.0.1:{port}", HERALD_LINK_SECRET="api-test-link-secret", **env)
    wait_http(port)
    key = db.one(f"SELECT herald.create_api_key('acme', 'test', {ALL_SCOPES})")
    return Api(port, key)


@pytest.fixture
def api(db, roles, sidecar):  # noqa: F811
    return start_api(db, roles, sidecar)


def sql_error(db, statement, *params):
    """The error a SQL call raises: (message, hint, detail, SQLSTATE)."""
    with pytest.raises(psycopg.Error) as caught:
        db.q(statement, *params)
    d = caught.value.diag
    return d.message_primary, d.message_hint, d.message_detail, d.sqlstate


def test_every_route_does_its_work_in_the_database(db, smtp, api):
    # track: one event, the contact made on the way
    status, _, body = api.call("/v1/track", {"email": "Ann@Example.com", "kind": "signup", "payload": {"plan": "pro"}})
    assert status == 200, body
    assert db.q("SELECT id, email, kind, payload FROM herald.events WHERE kind = 'signup'") == \
        [(body["id"], "ann@example.com", "signup", {"plan": "pro"})]

    # track/batch: one track_many
    events = [{"email": f"b{i}@example.com", "kind": "viewed", "payload": {"n": i}} for i in range(50)]
    status, _, body = api.call("/v1/track/batch", {"events": events})
    assert (status, body) == (200, {"accepted": 50})
    assert db.one("SELECT count(DISTINCT email) FROM herald.events WHERE kind = 'viewed'") == 50

    # contacts: identify (attributes merged), and many at once
    status, _, body = api.call("/v1/contacts", {"email": "ann@example.com", "attributes": {"first_name": "Ann"}})
    assert status == 200, body
    assert db.q("SELECT id, attributes FROM herald.contacts WHERE email = 'ann@example.com'") == \
        [(body["id"], {"first_name": "Ann"})]
    status, _, body = api.call("/v1/contacts/batch", {"contacts": [
        {"email": "c1@example.com", "attributes": {"plan": "free"}, "timezone": "Europe/Paris"},
        {"email": "ann@example.com", "attributes": {"plan": "pro"}}]})
    assert (status, body) == (200, {"inserted": 1, "updated": 1, "rejected": 0})
    assert db.one("SELECT attributes FROM herald.contacts WHERE email = 'ann@example.com'") == \
        {"first_name": "Ann", "plan": "pro"}
    assert db.one("SELECT timezone FROM herald.contacts WHERE email = 'c1@example.com'") == "Europe/Paris"

    # lists: one address or many, the list from the path
    status, _, body = api.call("/v1/lists/news%20letter/subscribe", {"emails": ["ann@example.com", "new@example.com", "bad"]})
    assert (status, body) == (200, {"subscribed": 2, "already": 0, "rejected": 1})
    status, _, body = api.call("/v1/lists/news%20letter/unsubscribe", {"email": "ann@example.com"})
    assert (status, body) == (200, {"unsubscribed": 1, "not_subscribed": 0, "rejected": 0})
    assert db.q("""SELECT c.email, m.status FROM herald.list_members m JOIN herald.contacts c ON c.id = m.contact_id
                    WHERE m.list = 'news letter' ORDER BY 1""") == \
        [("ann@example.com", "unsubscribed"), ("new@example.com", "subscribed")]
    assert db.one("SELECT count(*) FROM herald.events WHERE kind IN ('list.joined', 'list.left')") == 3

    # send: a transactional email that the SMTP server receives, rendered with the context
    db.q("SELECT herald.upsert_template('acme', 'receipt', 'Receipt {{ variables.order }}', '<p>Thanks {{ contact.first_name }}</p>')")
    status, _, body = api.call("/v1/send", {"email": "ann@example.com", "template": "receipt", "context": {"order": "A-17"}})
    assert status == 200, body
    assert db.one("SELECT kind FROM herald.outbox WHERE id = %s", body["id"]) == "email"
    wait_until(lambda: smtp.count() == 1, timeout=30, what="the receipt")
    rcpts, msg, _ = smtp.snapshot()[0]
    assert rcpts == ["ann@example.com"]
    assert msg["Subject"] == "Receipt A-17"
    assert "Thanks Ann" in msg.get_body(("html",)).get_content()

    # every write was this key's, and its use is visible (without the secret)
    rows = db.q("SELECT name, prefix, last_used_at IS NOT NULL FROM herald.list_api_keys('acme')")
    assert rows == [("test", api.key[:api.key.index("_", 3) + 1], True)]
    assert api.key[-64:] not in json.dumps(db.q("SELECT to_jsonb(k) FROM herald.api_keys k"))


def test_wrong_revoked_and_narrow_keys_are_refused(db, api):
    track = {"email": "x@example.com", "kind": "ping"}
    before = db.one("SELECT count(*) FROM herald.events")
    for key in (None, "nonsense", api.key[:-1] + ("0" if api.key[-1] != "0" else "1"), "hk_999_" + "a" * 64):
        status, _, body = api.call("/v1/track", track, key=key)
        assert status == 401, (key, body)
        assert body["error"]["code"] in ("unauthorized", "28000")
        assert body["error"]["message"] in ("missing API key", "unknown API key")
    # a well-formed wrong key is refused by the database with the same message as a malformed one
    status, _, body = api.call("/v1/track", track, key="hk_999_" + "a" * 64)
    assert body["error"] == {"message": "unknown API key", "code": "28000", "detail": None,
                             "hint": "Send Authorization: Bearer hk_…, a key made by herald.create_api_key(workspace, name)."}

    # a key without the send scope (the default scopes) may track but not send
    narrow = db.one("SELECT herald.create_api_key('acme', 'browser')")
    assert api.call("/v1/track", track, key=narrow)[0] == 200
    db.q("SELECT herald.upsert_template('acme', 't', 'T', '<p>t</p>')")
    status, _, body = api.call("/v1/send", {"email": "x@example.com", "template": "t"}, key=narrow)
    assert status == 403, body
    assert body["error"]["message"].endswith('lacks the scope "send"')
    assert db.one("SELECT count(*) FROM herald.outbox") == 0

    # revoked: refused at once
    key_id = int(narrow.split("_")[1])
    assert db.one("SELECT herald.revoke_api_key('acme', %s)", key_id) is True
    status, _, body = api.call("/v1/track", track, key=narrow)
    assert (status, body["error"]["message"]) == (401, f"API key {key_id} was revoked")
    assert db.one("SELECT count(*) FROM herald.events") == before + 2   # ping + contact.created, once


def test_a_key_acts_for_its_own_workspace_only(db, api):
    db.q("SELECT herald.create_workspace('other', 'Other')")
    other = db.one(f"SELECT herald.create_api_key('other', 'theirs', {ALL_SCOPES})")
    status, _, body = api.call("/v1/track", {"email": "z@example.com", "kind": "ping", "workspace": "acme"}, key=other)
    assert status == 422
    assert body["error"]["message"] == 'unknown field "workspace" in the body; allowed: email, kind, payload'
    assert body["error"]["hint"] == "The workspace is the API key's; a key acts for its workspace only."
    assert api.call("/v1/track", {"email": "z@example.com", "kind": "ping"}, key=other)[0] == 200
    assert api.call("/v1/contacts", {"email": "ann@example.com", "attributes": {"owner": "other"}}, key=other)[0] == 200
    assert api.call("/v1/lists/vip/subscribe", {"email": "z@example.com"}, key=other)[0] == 200
    # everything landed in 'other'; 'acme' has none of it
    assert db.q("SELECT DISTINCT workspace_id FROM herald.events") == [("other",)]
    assert db.q("SELECT workspace_id, email FROM herald.contacts ORDER BY 1, 2") == \
        [("other", "ann@example.com"), ("other", "z@example.com")]
    assert db.q("SELECT DISTINCT workspace_id FROM herald.list_members") == [("other",)]
    # an admin of acme cannot revoke other's key by naming acme
    key_id = int(other.split("_")[1])
    message, hint, _, code = sql_error(db, "SELECT herald.revoke_api_key('acme', %s)", key_id)
    assert (code, message) == ("P0002", f"unknown API key {key_id} in workspace 'acme'")


def test_a_key_over_its_rate_gets_429_and_holds_up_no_other_key(db, roles, sidecar):  # noqa: F811
    api = start_api(db, roles, sidecar, HERALD_API_RATE_PER_KEY="5")
    db.q("SELECT herald.create_workspace('other', 'Other')")
    other = db.one(f"SELECT herald.create_api_key('other', 'theirs', {ALL_SCOPES})")
    started = time.monotonic()
    answers = [api.call("/v1/track", {"email": f"r{i}@example.com", "kind": "burst"}) for i in range(15)]
    took = time.monotonic() - started
    ok = [a for a in answers if a[0] == 200]
    limited = [a for a in answers if a[0] == 429]
    assert len(ok) + len(limited) == 15, [a[0] for a in answers]
    # a second's worth at once, then 5 a second: what refilled while the 15 calls ran, and no more
    assert 5 <= len(ok) <= 5 + int(took * 5) + 1, (len(ok), took)
    assert limited, f"15 calls in {took:.2f} s at 5 a second were all let through"
    status, headers, body = limited[0]
    assert headers["retry-after"] == "1"
    assert body["error"]["code"] == "rate_limited"
    assert body["error"]["message"] == "this API key is over its rate of 5 requests a second"
    # what was refused cost no write: one event per 200
    assert db.one("SELECT count(*) FROM herald.events WHERE kind = 'burst'") == len(ok)
    # another tenant's key is not held up by it, and a secret that is no key is refused as before
    assert api.call("/v1/track", {"email": "o@example.com", "kind": "burst"}, key=other)[0] == 200
    forged = api.key[:-1] + ("0" if api.key[-1] != "0" else "1")
    assert api.call("/v1/track", {"email": "f@example.com", "kind": "burst"}, key=forged)[0] == 401
    # after Retry-After the key is served again
    time.sleep(1.1)
    assert api.call("/v1/track", {"email": "later@example.com", "kind": "burst"})[0] == 200
    assert db.one("SELECT count(*) FROM herald.events WHERE kind = 'burst' AND workspace_id = 'acme'") == len(ok) + 1


def test_a_key_opening_streams_is_held_to_its_rate(db, roles, sidecar):  # noqa: F811
    """GET /stream with an API key is a request of that key's: a reconnect loop gets 429 with
    Retry-After before it costs a database call, and the key's API calls share the same rate."""
    api = start_api(db, roles, sidecar, HERALD_API_RATE_PER_KEY="1")
    reader = db.one("SELECT herald.create_api_key('acme', 'dashboard', ARRAY['results', 'track'])")
    db.q("SELECT herald.create_workspace('other', 'Other')")
    other = db.one("SELECT herald.create_api_key('other', 'theirs', ARRAY['results'])")
    opened = []
    try:
        started = time.monotonic()
        opened.append(EventStream(api.port, "kinds=email.sent", token=reader))
        api_status = api.call("/v1/track", {"email": "a@example.com", "kind": "k"}, key=reader)[0]
        opened.append(EventStream(api.port, "kinds=email.sent", token=reader))
        took = time.monotonic() - started
        assert took < 1.0, f"three requests took {took:.2f} s: the bucket refilled, nothing to tell"
        first, second = opened[0].response, opened[1].response
        assert first.status == 200
        # the stream took the key's one request of this second: its API call and a second stream wait
        assert api_status == 429
        assert second.status == 429
        assert second.getheader("Retry-After") == "1"
        assert second.read().decode().strip() == "this API key is over its rate of 1 request a second"
        # another tenant's key is not held up
        opened.append(EventStream(api.port, "kinds=email.sent", token=other))
        assert opened[-1].response.status == 200
        time.sleep(1.1)
        opened.append(EventStream(api.port, "kinds=email.sent", token=reader))
        assert opened[-1].response.status == 200
    finally:
        for s in opened:
            s.close()


def test_a_newer_daemon_on_an_older_extension_says_what_to_update(db, roles, sidecar):  # noqa: F811
    """A daemon may be upgraded before the database's extension (compat.rs). Routes the older
    extension has work; the results routes answer 501 naming the update, not a 422 about a value."""
    db.q("DROP EXTENSION herald CASCADE")
    db.q("CREATE EXTENSION herald VERSION '0.15.0'")
    db.q("SELECT herald.create_workspace('acme', 'Acme')")
    api = start_api(db, roles, sidecar)
    status, _, body = api.call("/v1/track", {"email": "ann@example.com", "kind": "signup"})
    assert status == 200, body
    for method, path, payload in [("GET", "/v1/results?after=0", None),
                                  ("GET", "/v1/results/subscriptions", None),
                                  ("POST", "/v1/results/subscriptions", {"url": "https://hooks.example.com/r"}),
                                  ("DELETE", "/v1/results/subscriptions/1", None),
                                  ("POST", "/v1/results/subscriptions/1/retry", None),
                                  ("GET", "/v1/suppressions/ann%40example.com", None),
                                  ("POST", "/v1/suppressions", {"email": "ann@example.com"}),
                                  ("DELETE", "/v1/suppressions/ann%40example.com", None)]:
        headers = {"Idempotency-Key": uuid.uuid4().hex} if method != "GET" else None
        status, _, body = api.call(path, payload, method=method, headers=headers)
        assert status == 501, (method, path, body)
        assert body["error"]["code"] == "extension_too_old"
        assert "its herald.api_call does not know" in body["error"]["message"]
        assert "ALTER EXTENSION herald UPDATE" in body["error"]["hint"]
    # a value the old extension does refuse is still its own 422
    status, _, body = api.call("/v1/track", {"email": "not an address", "kind": "signup"})
    assert status == 422, body


def still_open(sock):
    """Whether the daemon has not closed a connection we hold (a refused one is closed unread)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def hold_open(port, n):
    """n connections the daemon accepted and keeps. A connection of start_api's readiness probe that
    the daemon has not yet seen closed still counts for a moment, so one of the first n may be refused
    (closed): it is replaced until n are held (CI caught a 33rd request served that way)."""
    held, deadline = [], time.monotonic() + 10
    while time.monotonic() < deadline:
        held += [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n - len(held))]
        time.sleep(0.3)  # each one accepted and counted, or refused and closed
        kept = [s for s in held if still_open(s)]
        for s in held:
            if s not in kept:
                s.close()
        held = kept
        if len(held) == n:
            return held
    raise AssertionError(f"only {len(held)} of {n} connections held open")


@pytest.mark.parametrize("limit", [None, "0"])
def test_connections_per_address_behind_a_proxy(db, roles, sidecar, limit):  # noqa: F811
    """32 connections per client address by default (a 33rd is closed unread); behind a proxy every
    client is the proxy's address, and HERALD_HTTP_CONNECTIONS_PER_ADDRESS=0 lifts the limit."""
    api = start_api(db, roles, sidecar, **({} if limit is None else {"HERALD_HTTP_CONNECTIONS_PER_ADDRESS": limit}))

    def served():
        try:
            return api.call("/v1/track", {"email": "p@example.com", "kind": "proxied"})[0] == 200
        except (ConnectionError, http.client.RemoteDisconnected):
            return False

    held = hold_open(api.port, 32)
    try:
        assert served() == (limit == "0")
    finally:
        for s in held:
            s.close()
    # the held connections gone, their places are free again
    wait_until(served, timeout=10, what="a place freed")


def test_an_app_with_a_results_key_follows_what_herald_did(db, api):
    """An app that holds only API keys: a journey's results read page by page from GET /v1/results
    (each once, in order, none of another workspace's), then followed live on GET /stream with the
    same key, which stops reading once the key is revoked."""
    journey_that_ends_at_once(db)
    reader = db.one("SELECT herald.create_api_key('acme', 'dashboard', ARRAY['results'])")
    db.q("SELECT herald.create_workspace('other', 'Other')")
    other = db.one("SELECT herald.create_api_key('other', 'theirs', ARRAY['results'])")
    # without after: from what is published now, and where that is
    status, _, start = api.call("/v1/results", method="GET", key=reader)
    assert status == 200 and start["results"] == [], start
    assert start["next"] == db.one("SELECT herald.newest_result('acme')")

    events = [{"email": f"r{i}@example.com", "kind": "ping"} for i in range(30)]
    assert api.call("/v1/track/batch", {"events": events})[0] == 200
    wait_until(lambda: db.one("SELECT count(*) FROM herald.results WHERE workspace_id = 'acme' "
                              "AND kind = 'enrollment.completed'") == 30, what="30 published results")
    got, cursor = [], start["next"]
    while True:
        status, _, page = api.call(f"/v1/results?after={cursor}&kinds=enrollment.completed&limit=7",
                                   method="GET", key=reader)
        assert status == 200, page
        assert len(page["results"]) <= 7
        if not page["results"]:
            assert page["next"] == cursor
            break
        got += page["results"]
        cursor = page["next"]
        assert cursor == page["results"][-1]["id"]
    ids = [r["id"] for r in got]
    assert ids == sorted(ids) and len(set(ids)) == 30, "in order, each once"
    assert {r["kind"] for r in got} == {"enrollment.completed"}
    assert {r["enrollment_id"] for r in got} == {e[0] for e in db.q("SELECT id FROM herald.enrollments")}
    # every kind from 0: the contacts' results too, all acme's
    status, _, everything = api.call("/v1/results?after=0&limit=1000", method="GET", key=reader)
    assert status == 200 and len(everything["results"]) >= 30
    status, _, theirs = api.call("/v1/results?after=0", method="GET", key=other)
    assert (status, theirs["results"]) == (200, [])

    # refusals: a key without the scope, bad values (the database's messages), the query's form
    status, _, body = api.call("/v1/results", method="GET")  # the test's key: every scope but results
    assert status == 403, body
    assert body["error"]["message"].endswith('lacks the scope "results"'), body
    for query, message in [("after=yesterday", 'after must be a result id (a whole number, 0 for every result kept), got "yesterday"'),
                           ("limit=5000", "limit must be a whole number from 1 to 1000, got 5000"),
                           ("kinds=email.sent,no.such", "unknown result kind(s) 'no.such'"),
                           ("workspace=other", "unknown read_results argument(s) 'workspace'")]:
        status, _, body = api.call(f"/v1/results?{query}", method="GET", key=reader)
        assert (status, body["error"]["message"]) == (422, message), query
    status, _, body = api.call("/v1/results?after=1&after=2", method="GET", key=reader)
    assert (status, body["error"]["message"]) == (400, "the query names after twice")
    assert api.call("/v1/results", {}, key=reader)[0] == 405

    # the same key follows the results live on GET /stream (its workspace; no stream token configured)
    stream = EventStream(api.port, "kinds=enrollment.completed", token=reader)
    assert stream.response.status == 200, stream.response.read()
    refused = EventStream(api.port, "workspace=other", token=reader)
    assert refused.response.status == 403
    refused.close()
    narrow = EventStream(api.port, "workspace=acme", token=api.key)
    assert narrow.response.status == 403 and b'lacks the scope "results"' in narrow.response.read()
    narrow.close()
    assert api.call("/v1/track/batch", {"events": [{"email": f"s{i}@example.com", "kind": "ping"}
                                                   for i in range(5)]})[0] == 200
    live = stream.events()
    first = [json.loads(next(live)["data"]) for _ in range(5)]
    assert [r["id"] for r in first] == sorted(r["id"] for r in first) and first[0]["id"] > ids[-1]
    # revoked: the stream ends before it sends another result
    assert db.one("SELECT herald.revoke_api_key('acme', %s)", int(reader.split("_")[1])) is True
    time.sleep(6)  # past the stream's KEY_RECHECK (5 s) since the key was last asked about
    assert api.call("/v1/track/batch", {"events": [{"email": f"t{i}@example.com", "kind": "ping"}
                                                   for i in range(5)]})[0] == 200
    wait_until(lambda: db.one("SELECT count(*) FROM herald.results WHERE workspace_id = 'acme' "
                              "AND kind = 'enrollment.completed'") == 40, what="the last 5 published")
    after_revocation = []
    reader_thread = threading.Thread(target=lambda: after_revocation.extend(live), daemon=True)
    reader_thread.start()
    reader_thread.join(timeout=30)
    assert not reader_thread.is_alive(), f"the stream went on after the revocation: {after_revocation}"
    assert after_revocation == [], "nothing after the revocation"
    stream.close()
    assert api.call("/v1/results", method="GET", key=reader)[0] == 401


def test_an_app_subscribes_its_webhook_with_its_results_key(db, http, api):
    """POST /v1/results/subscriptions with a results key: the daemon then POSTs the workspace's results
    to the URL (a real HTTP receiver); a batch refused for good blocks it (GET says so) until the app
    retries it itself; then every result arrives once, in order. DELETE ends it and nothing more
    arrives. Another workspace's key can neither see, retry nor end it."""
    journey_that_ends_at_once(db)
    reader = db.one("SELECT herald.create_api_key('acme', 'hooks', ARRAY['results'])")
    db.q("SELECT herald.create_workspace('other', 'Other')")
    other = db.one("SELECT herald.create_api_key('other', 'theirs', ARRAY['results'])")
    body = {"url": http.url + "/hooks", "kinds": ["enrollment.completed"], "options": {"batch": 10}}
    status, _, made = api.call("/v1/results/subscriptions", body, key=reader, headers={"Idempotency-Key": "hook-1"})
    assert status == 200, made
    again = api.call("/v1/results/subscriptions", body, key=reader, headers={"Idempotency-Key": "hook-1"})
    assert again[2] == made and again[1]["idempotent-replayed"] == "true"
    assert db.one("SELECT count(*) FROM herald.result_subscriptions") == 1, "made once"
    status, _, listed = api.call("/v1/results/subscriptions", method="GET", key=reader)
    assert status == 200 and [s["id"] for s in listed["subscriptions"]] == [made["id"]]
    assert listed["subscriptions"][0]["state"] == "idle"
    assert listed["subscriptions"][0]["kinds"] == ["enrollment.completed"]
    assert api.call("/v1/results/subscriptions", method="GET", key=other)[2] == {"subscriptions": []}
    # refusals: the form (unknown field), the database's (bad URL), a key without the scope
    status, _, err = api.call("/v1/results/subscriptions", dict(body, workspace="acme"), key=reader)
    assert status == 422 and err["error"]["code"] == "unknown_field"
    status, _, err = api.call("/v1/results/subscriptions", {"url": "ftp://app.example/x"}, key=reader)
    assert status == 422 and "http:// or https://" in err["error"]["message"], err
    assert api.call("/v1/results/subscriptions", body)[0] == 403

    http.plan("/hooks", (400, 0, "not yet"))  # the first batch is refused for good
    assert api.call("/v1/track/batch", {"events": [{"email": f"h{i}@example.com", "kind": "ping"}
                                                   for i in range(25)]})[0] == 200

    def state():
        return api.call("/v1/results/subscriptions", method="GET", key=reader)[2]["subscriptions"][0]["state"]

    wait_until(lambda: state() == "blocked", timeout=60, what="the subscription blocked by the 400")
    assert len(http.snapshot()) == 1, "nothing after the refused batch until it is retried"
    retry = f"/v1/results/subscriptions/{made['id']}/retry"
    status, _, err = api.call(retry, key=other)
    assert (status, err["error"]["message"]) == (404, f"unknown result subscription {made['id']}")
    status, _, answer = api.call(retry, key=reader)
    assert (status, answer) == (200, {"retried": True, "state": "delivering"})

    def delivered():
        return [r for d in http.snapshot()[1:] for r in json.loads(d["body"])["results"]]

    wait_until(lambda: len(delivered()) >= 25, timeout=60, what="25 results delivered")
    assert http.snapshot()[0]["body"] == http.snapshot()[1]["body"], "the refused batch is sent again as it was"
    wait_until(lambda: state() == "idle", what="the subscription idle again")
    assert api.call(retry, key=reader)[2] == {"retried": False, "state": "idle"}
    ids = [r["id"] for r in delivered()]
    assert ids == sorted(ids) and len(set(ids)) == 25, "in order, each once"
    assert {r["kind"] for r in delivered()} == {"enrollment.completed"}
    assert all(d["headers"]["X-Herald-Signature"] for d in http.snapshot())

    # ended: not by another workspace's key, then by its own (no body needed), then nothing more arrives
    status, _, answer = api.call(f"/v1/results/subscriptions/{made['id']}", key=other, method="DELETE")
    assert (status, answer) == (200, {"unsubscribed": False})
    status, _, answer = api.call(f"/v1/results/subscriptions/{made['id']}", key=reader, method="DELETE")
    assert (status, answer) == (200, {"unsubscribed": True})
    status, _, err = api.call("/v1/results/subscriptions/x", key=reader, method="DELETE")
    assert status == 422 and err["error"]["message"] == 'id must be a subscription id (a whole number), got "x"'
    assert api.call("/v1/results/subscriptions", method="GET", key=reader)[2] == {"subscriptions": []}
    requests_before = len(http.snapshot())
    assert api.call("/v1/track/batch", {"events": [{"email": f"i{i}@example.com", "kind": "ping"}
                                                   for i in range(5)]})[0] == 200
    wait_until(lambda: db.one("SELECT count(*) FROM herald.results WHERE workspace_id = 'acme' "
                              "AND kind = 'enrollment.completed'") == 30, what="the last 5 published")
    time.sleep(2)  # deliveries are queued by the same publishing round; give one a chance to go out
    assert len(http.snapshot()) == requests_before, "nothing after the unsubscribe"


def test_an_app_manages_suppressions_with_its_key(db, api):
    """A key with the suppressions scope (never a default) reads whether an address is suppressed and
    why (a bounce at send time included), suppresses one and lifts one; a key without it is refused,
    and so is a key of another workspace reading this one's."""
    db.q("SELECT herald.suppress('acme', 'dead@example.com', 'hard_bounce', "
         "'{\"smtp_reply\": \"550 5.1.1 no such user\", \"refused_at_send\": true}')")
    key = db.one("SELECT herald.create_api_key('acme', 'support', ARRAY['suppressions'])")
    status, _, body = api.call("/v1/suppressions/Dead%40Example.com", method="GET", key=key)
    assert status == 200, body
    assert body["suppressed"] is True and body["email"] == "dead@example.com" and body["reason"] == "hard_bounce"
    assert body["detail"]["smtp_reply"] == "550 5.1.1 no such user" and body["since"]
    status, _, body = api.call("/v1/suppressions", {"email": "ann@example.com", "detail": {"ticket": 12}}, key=key,
                               headers={"Idempotency-Key": "sup-ann"})
    assert (status, body) == (200, {"added": True})
    status, headers, body = api.call("/v1/suppressions", {"email": "ann@example.com", "detail": {"ticket": 12}}, key=key,
                                     headers={"Idempotency-Key": "sup-ann"})
    assert (status, body, headers.get("idempotent-replayed")) == (200, {"added": True}, "true")
    assert db.q("SELECT reason, detail FROM herald.suppressions WHERE workspace_id = 'acme' AND email = 'ann@example.com'") \
        == [("manual", {"ticket": 12})]
    status, _, body = api.call("/v1/suppressions/dead%40example.com", method="DELETE", key=key)
    assert (status, body) == (200, {"removed": True})
    status, _, body = api.call("/v1/suppressions/dead%40example.com", method="DELETE", key=key)
    assert (status, body) == (200, {"removed": False})
    status, _, body = api.call("/v1/suppressions/dead%40example.com", method="GET", key=key)
    assert (status, body) == (200, {"email": "dead@example.com", "suppressed": False})
    # bad input: the SQL function's message; a query string or an unknown field: refused as such
    status, _, body = api.call("/v1/suppressions", {"email": "ann@example.com", "reason": "bored"}, key=key)
    assert status == 422 and "invalid suppression reason" in body["error"]["message"], body
    status, _, body = api.call("/v1/suppressions/not-an-address", method="GET", key=key)
    assert status == 422 and "is not a valid address" in body["error"]["message"], body
    status, _, body = api.call("/v1/suppressions/ann%40example.com?workspace=other", method="GET", key=key)
    assert status == 422 and "no query string" in body["error"]["message"], body
    status, _, body = api.call("/v1/suppressions", {"email": "ann@example.com", "workspace": "other"}, key=key)
    assert status == 422 and body["error"]["code"] == "unknown_field", body
    # the default scopes, and the test's key with four others, do not include it
    status, _, body = api.call("/v1/suppressions/ann%40example.com", method="GET")
    assert status == 403 and 'lacks the scope "suppressions"' in body["error"]["message"], body
    db.q("SELECT herald.create_workspace('globex', 'Globex')")
    other = db.one("SELECT herald.create_api_key('globex', 'theirs', ARRAY['suppressions'])")
    status, _, body = api.call("/v1/suppressions/ann%40example.com", method="GET", key=other)
    assert (status, body) == (200, {"email": "ann@example.com", "suppressed": False})
    status, _, body = api.call("/v1/suppressions/ann%40example.com", method="DELETE", key=other)
    assert (status, body) == (200, {"removed": False})
    assert db.one("SELECT count(*) FROM herald.suppressions WHERE workspace_id = 'acme' AND email = 'ann@example.com'") == 1


def test_a_retry_with_the_same_idempotency_key_writes_once(db, api):
    body = {"email": "ann@example.com", "kind": "paid", "payload": {"amount": 10}}
    first = api.call("/v1/track", body, headers={"Idempotency-Key": "order-17"})
    again = api.call("/v1/track", body, headers={"Idempotency-Key": "order-17"})
    assert first[0] == again[0] == 200
    assert first[2] == again[2]
    assert "idempotent-replayed" not in first[1]
    assert again[1]["idempotent-replayed"] == "true"
    assert db.one("SELECT count(*) FROM herald.events WHERE kind = 'paid'") == 1
    # the same key for another request: 409, nothing written
    status, _, err = api.call("/v1/track", dict(body, payload={"amount": 11}), headers={"Idempotency-Key": "order-17"})
    assert status == 409
    assert err["error"]["message"] == "Idempotency-Key 'order-17' was used for another request"
    assert err["error"]["code"] == "23505"
    assert db.one("SELECT count(*) FROM herald.events WHERE kind = 'paid'") == 1
    # a failed request is not kept: fixed and sent again under the same key, it runs
    bad = {"email": "not-an-address", "kind": "paid"}
    assert api.call("/v1/track", bad, headers={"Idempotency-Key": "order-18"})[0] == 422
    assert api.call("/v1/track", dict(bad, kind="other"), headers={"Idempotency-Key": "order-18"})[0] == 422
    assert db.one("SELECT count(*) FROM herald.api_idempotency WHERE idempotency_key = 'order-18'") == 0
    # after 24 hours the key is free again, and prune removes it
    db.q("UPDATE herald.api_idempotency SET created_at = now() - interval '25 hours'")
    replay = api.call("/v1/track", body, headers={"Idempotency-Key": "order-17"})
    assert replay[0] == 200 and "idempotent-replayed" not in replay[1]
    assert db.one("SELECT count(*) FROM herald.events WHERE kind = 'paid'") == 2
    db.q("UPDATE herald.api_idempotency SET created_at = now() - interval '25 hours'")
    db.q("SELECT herald.prune('30 days')")
    assert db.one("SELECT count(*) FROM herald.api_idempotency") == 0


def test_concurrent_identical_requests_run_once(db, api):
    db.q("SELECT herald.upsert_template('acme', 'receipt', 'Receipt', '<p>r</p>')")
    n = 16
    for path, body, count in [
        ("/v1/track", {"email": "ann@example.com", "kind": "paid"},
         "SELECT count(*) FROM herald.events WHERE kind = 'paid'"),
        ("/v1/send", {"email": "ann@example.com", "template": "receipt"},
         "SELECT count(*) FROM herald.outbox WHERE kind = 'email'"),
    ]:
        key = str(uuid.uuid4())
        barrier = threading.Barrier(n)
        answers = [None] * n

        def one(i, path=path, body=body, key=key, barrier=barrier, answers=answers):
            barrier.wait()
            answers[i] = api.call(path, body, headers={"Idempotency-Key": key})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert {a[0] for a in answers} == {200}, answers
        assert len({json.dumps(a[2]) for a in answers}) == 1, "every copy got the same answer"
        assert sum(1 for a in answers if "idempotent-replayed" not in a[1]) == 1, "exactly one ran"
        assert db.one(count) == 1, path


def test_sql_errors_come_back_with_the_same_message(db, api):
    # one event: the message, detail and SQLSTATE of herald.track itself
    message, hint, detail, code = sql_error(db, "SELECT herald.track('acme', 'nope', 'ping')")
    status, _, body = api.call("/v1/track", {"email": "nope", "kind": "ping"})
    assert status == 422
    assert body["error"] == {"message": message, "hint": hint, "detail": detail, "code": code}
    assert message == 'track: email "nope" is not a valid address'

    # a batch: the first bad entry by position, how many are bad, nothing recorded
    events = [{"email": "a@example.com", "kind": "x"}, {"email": "b@example.com"}, {"email": "c", "kind": "x"}]
    message, hint, detail, code = sql_error(db, "SELECT herald.track_many('acme', %s::jsonb)", json.dumps(events))
    status, _, body = api.call("/v1/track/batch", {"events": events})
    assert status == 422
    assert body["error"] == {"message": message, "hint": hint, "detail": detail, "code": code}
    assert body["error"]["message"] == "track_many: events[1]: kind is missing or not a non-empty string"
    assert body["error"]["detail"] == "2 of 3 entries are invalid; nothing was recorded."

    # an unknown template: 404 with send's message and hint
    message, hint, detail, code = sql_error(db, "SELECT herald.send('acme', 'a@example.com', 'nope')")
    status, _, body = api.call("/v1/send", {"email": "a@example.com", "template": "nope"})
    assert status == 404
    assert body["error"] == {"message": message, "hint": hint, "detail": detail, "code": code}
    assert db.one("SELECT count(*) FROM herald.events") == 0
    assert db.one("SELECT count(*) FROM herald.contacts") == 0


def test_bounds_and_unknown_routes(db, api):
    too_many = {"events": [{"email": "a@example.com", "kind": "x"}] * 10_001}
    status, _, body = api.call("/v1/track/batch", too_many)
    assert status == 413
    assert body["error"]["message"] == "at most 10000 events per request, got 10001"
    deep = {"email": "a@example.com", "kind": "x", "payload": json.loads("[" * 45 + "]" * 45)}
    status, _, body = api.call("/v1/track", deep)
    assert (status, body["error"]["message"]) == (400, "the body nests deeper than 40 levels")
    status, _, body = api.call("/v1/track", raw=b"{not json")
    assert status == 400 and body["error"]["message"].startswith("the body is not JSON")
    # a body announced over 1 MiB is refused before it is sent (raw socket: the server answers and closes
    # without reading it, which an HTTP client still writing the body would see as a broken pipe)
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        s.sendall(f"POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api.key}\r\n"
                  f"Content-Length: {1024 * 1024 + 1}\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")
    status, _, body = api.call("/v1/nothing", {})
    assert (status, body["error"]["code"]) == (404, "not_found")
    assert db.one("SELECT count(*) FROM herald.events") == 0


def test_the_openapi_document_describes_what_is_served(api):
    status, headers, doc = api.call("/v1/openapi.json", method="GET", key=None)
    assert status == 200 and headers["content-type"] == "application/json"
    assert doc["openapi"] == "3.1.0"
    paths = doc["paths"]
    assert set(paths) == {"/v1/track", "/v1/track/batch", "/v1/contacts", "/v1/contacts/batch", "/v1/send",
                          "/v1/lists/{list}/subscribe", "/v1/lists/{list}/unsubscribe", "/v1/results",
                          "/v1/results/subscriptions", "/v1/results/subscriptions/{id}",
                          "/v1/results/subscriptions/{id}/retry", "/v1/suppressions", "/v1/suppressions/{email}",
                          "/v1/openapi.json"}
    for path, item in paths.items():
        for method, op in item.items():
            if path == "/v1/openapi.json":
                continue
            # served, and behind a key: 401 (not 404 or 405) without one
            concrete = path.replace("{list}", "news").replace("{id}", "1").replace("{email}", "ann%40example.com")
            status, _, body = api.call(concrete, {}, key=None, method=method.upper())
            assert status == 401, (method, path, body)
            assert set(op["responses"]) >= {"200", "401", "422"}
            if method == "get":  # a read: its arguments are query or path parameters
                assert "requestBody" not in op and {p["in"] for p in op["parameters"]} <= {"query", "path"}
                continue
            assert op["requestBody"]["content"]["application/json"]["schema"]["additionalProperties"] is False


def test_a_browser_page_may_call_it(db, api):
    """CORS: a page on another origin gets its preflight answered and may read the answers."""
    status, headers, _ = api.call("/v1/track", key=None, method="OPTIONS", headers={
        "Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"})
    assert status == 200
    assert headers["access-control-allow-origin"] == "*"
    assert "idempotency-key" in headers["access-control-allow-headers"]
    status, headers, body = api.call("/v1/track", {"email": "ann@example.com", "kind": "viewed"},
                                     headers={"Origin": "https://shop.example", "Idempotency-Key": "v-1"})
    assert status == 200, body
    assert headers["access-control-allow-origin"] == "*"
    assert "idempotent-replayed" in headers["access-control-expose-headers"]
    assert db.one("SELECT count(*) FROM herald.events WHERE kind = 'viewed'") == 1

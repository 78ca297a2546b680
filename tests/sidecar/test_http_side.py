"""Guards of the HTTP side, end to end through `herald run`: SendGrid's Signed Event Webhook
(HERALD_SENDGRID_VERIFICATION_KEY) and RFC 8058's one-click body on POST /u/<token>. A refused request
must record nothing: no suppression, no event."""

import base64
import http.client
import json
import re
import selectors
import socket
import time
import uuid
from html.parser import HTMLParser
from urllib.parse import urlencode, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import free_port, wait_until
from test_broadcast import EVENTS_TOKEN, add_contacts, http_side, request

SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"


def new_key():
    """(private key, the verification key as SendGrid shows it: base64 of a DER SubjectPublicKeyInfo)."""
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, base64.b64encode(der).decode()


def signed(private, body, at=None):
    """SendGrid's headers: base64(DER ECDSA-P256-SHA256(timestamp || body))."""
    ts = str(int(time.time()) if at is None else at)
    sig = private.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {SIGNATURE: base64.b64encode(sig).decode(), TIMESTAMP: ts, "Content-Type": "application/json"}


def wait_http(port):
    def up():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    wait_until(up, timeout=30, what="the HTTP side to listen")


def send_to(db, smtp, emails):
    """Mails each address once through the daemon; returns address → Message-ID as sent."""
    db.q("SELECT herald.upsert_template('acme', 'news', 'News', '<p>n</p>')")
    before = smtp.count()
    for e in emails:
        db.q("SELECT herald.send('acme', %s, 'news')", e)
    wait_until(lambda: db.counts().get("done") == before + len(emails), timeout=30, what="the messages sent")
    return {rcpts[0]: m for rcpts, m, _ in smtp.snapshot()}


def bounce(email, mid):
    return json.dumps([{"email": email, "event": "bounce", "type": "bounce", "smtp-id": mid,
                        "reason": "550 5.1.1 unknown user", "sg_event_id": uuid.uuid4().hex}]).encode()


def test_sendgrid_signed_events_are_verified_and_others_refused(db, smtp, sidecar):
    add_contacts(db, 3)
    private, shown = new_key()
    port = free_port()
    sidecar(**http_side(port), HERALD_SENDGRID_VERIFICATION_KEY=shown)
    wait_http(port)
    sent = send_to(db, smtp, ["r0@example.com", "r1@example.com", "r2@example.com"])
    mid = {e: m["Message-ID"] for e, m in sent.items()}
    url = f"http://127.0.0.1:{port}/events/sendgrid"

    # refused, each with a short reason, and nothing recorded
    body = bounce("r1@example.com", mid["r1@example.com"])
    other, _ = new_key()
    now = int(time.time())
    token = {"Authorization": f"Bearer {EVENTS_TOKEN}", "Content-Type": "application/json"}
    refusals = [
        ("unsigned", {"Content-Type": "application/json"}, body, 401, b"unsigned"),
        ("the events token instead of a signature", token, body, 401, b"unsigned"),
        ("signature without its timestamp", {SIGNATURE: signed(private, body)[SIGNATURE]}, body, 401,
         b"Timestamp is missing"),
        ("signed by another key", signed(other, body), body, 403, b"does not match"),
        ("body changed after signing", signed(private, body),
         bounce("r2@example.com", mid["r2@example.com"]), 403, b"does not match"),
        ("timestamp changed after signing", {**signed(private, body, now), TIMESTAMP: str(now + 1)}, body, 403,
         b"does not match"),
        ("stale: signed 10 minutes ago", signed(private, body, now - 600), body, 403, b"5 minutes"),
        ("from the future: 10 minutes ahead", signed(private, body, now + 600), body, 403, b"5 minutes"),
        ("not a signature", {**signed(private, body), SIGNATURE: "bm90IGEgc2lnbmF0dXJl"}, body, 403,
         b"DER-encoded"),
        ("timestamp not a number", {**signed(private, body), TIMESTAMP: "soon"}, body, 403, b"Unix time"),
    ]
    for what, headers, payload, want, reason in refusals:
        status, _, reply = request(url, "POST", payload, headers)
        assert (status, reason in reply) == (want, True), (what, status, reply)
    assert db.one("SELECT count(*) FROM herald.suppressions") == 0
    assert db.one("SELECT count(*) FROM herald.events WHERE kind = 'email.bounced'") == 0

    # correctly signed: recorded, whatever Authorization says (the signature is the credential)
    status, _, reply = request(url, "POST", body, signed(private, body))
    assert status == 200 and json.loads(reply) == {"received": 1, "recorded": 1}, reply
    complaint = json.dumps([{"email": "r0@example.com", "event": "spamreport",
                             "smtp-id": mid["r0@example.com"]}]).encode()
    status, _, reply = request(url, "POST", complaint,
                               {**signed(private, complaint, now - 290), "Authorization": "Bearer wrong"})
    assert status == 200 and json.loads(reply) == {"received": 1, "recorded": 1}, reply
    assert db.q("SELECT email, reason FROM herald.suppressions ORDER BY email") == [
        ("r0@example.com", "complaint"), ("r1@example.com", "hard_bounce")]
    assert db.q("SELECT email, kind FROM herald.events WHERE kind LIKE 'email.%' ORDER BY email") == [
        ("r0@example.com", "email.complained"), ("r1@example.com", "email.bounced")]

    # herald's own format keeps its token
    generic = json.dumps({"events": [{"type": "bounce", "message_id": mid["r2@example.com"]}]}).encode()
    assert request(f"http://127.0.0.1:{port}/events/generic", "POST", generic, signed(private, generic))[0] == 401
    assert db.one("SELECT count(*) FROM herald.suppressions WHERE email = 'r2@example.com'") == 0
    status, _, reply = request(f"http://127.0.0.1:{port}/events/generic", "POST", generic, token)
    assert status == 200 and json.loads(reply) == {"received": 1, "recorded": 1}


def test_a_workspace_sendgrid_key_speaks_for_its_workspace_only(db, smtp, sidecar, tmp_path):
    """A tenant on its own SendGrid account: [workspaces.acme] sendgrid_verification_key checks
    /events/sendgrid?workspace=acme, and what it signs may only affect acme; the default key still
    speaks for every workspace."""
    db.q("SELECT herald.create_workspace('globex', 'Globex')")
    add_contacts(db, 2)
    db.q("SELECT herald.upsert_contact('globex', 'g@example.com')")
    acme_private, acme_shown = new_key()
    default_private, default_shown = new_key()
    cfg = tmp_path / "herald.toml"
    cfg.write_text(f'[workspaces.acme]\nsendgrid_verification_key = "{acme_shown}"\n')
    port = free_port()
    sidecar(**http_side(port), HERALD_CONFIG=str(cfg), HERALD_SENDGRID_VERIFICATION_KEY=default_shown)
    wait_http(port)
    mid = {e: m["Message-ID"] for e, m in send_to(db, smtp, ["r0@example.com", "r1@example.com"]).items()}
    db.q("SELECT herald.upsert_template('globex', 'news', 'News', '<p>n</p>')")
    db.q("SELECT herald.send('globex', 'g@example.com', 'news')")
    wait_until(lambda: db.counts().get("done") == 3, timeout=30, what="globex's message")
    gmid = next(m for rcpts, m, _ in smtp.snapshot() if rcpts[0] == "g@example.com")["Message-ID"]
    url = f"http://127.0.0.1:{port}/events/sendgrid"

    def suppressed():
        return db.q("SELECT workspace_id, email FROM herald.suppressions ORDER BY 1, 2")

    both = json.dumps(json.loads(bounce("r0@example.com", mid["r0@example.com"]))
                      + json.loads(bounce("g@example.com", gmid))).encode()
    # acme's key on another URL: checked by the default key, refused
    assert request(url, "POST", both, signed(acme_private, both))[0] == 403
    assert request(url + "?workspace=globex", "POST", both, signed(acme_private, both))[0] == 403
    assert suppressed() == []
    # acme's key on acme's URL: recorded for acme only (g@ is suppressed in acme, not in globex)
    status, _, reply = request(url + "?workspace=acme", "POST", both, signed(acme_private, both))
    assert status == 200, reply
    assert suppressed() == [("acme", "g@example.com"), ("acme", "r0@example.com")]
    # the default key still speaks for every workspace
    only_g = bounce("g@example.com", gmid)
    status, _, reply = request(url, "POST", only_g, signed(default_private, only_g))
    assert (status, json.loads(reply)) == (200, {"received": 1, "recorded": 1}), reply
    assert ("globex", "g@example.com") in suppressed()


def test_sendgrid_key_alone_turns_on_only_the_sendgrid_endpoint(db, smtp, sidecar):
    add_contacts(db, 1)
    private, shown = new_key()
    port = free_port()
    sidecar(**{**http_side(port), "HERALD_EVENTS_TOKEN": None, "HERALD_SENDGRID_VERIFICATION_KEY": shown})
    wait_http(port)
    base = f"http://127.0.0.1:{port}"
    body = json.dumps([{"email": "r0@example.com", "event": "bounce"}]).encode()
    assert request(f"{base}/events/sendgrid?workspace=acme", "POST", body)[0] == 401
    status, _, reply = request(f"{base}/events/sendgrid?workspace=acme", "POST", body, signed(private, body))
    assert status == 200 and json.loads(reply) == {"received": 1, "recorded": 1}, reply
    assert db.q("SELECT email, reason FROM herald.suppressions") == [("r0@example.com", "hard_bounce")]
    generic = json.dumps({"events": [{"type": "complaint", "email": "r0@example.com", "workspace": "acme"}]})
    assert request(f"{base}/events/generic", "POST", generic.encode(),
                   {"Authorization": f"Bearer {EVENTS_TOKEN}"})[0] == 404


def test_a_bad_sendgrid_key_stops_the_start_naming_the_setting(db, smtp, sidecar):
    _, shown = new_key()
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    for bad, says in [(base64.b64encode(p384).decode(), "not a P-256"), ("not-a-key!", "not base64"),
                      (shown[:-8], "not a P-256")]:
        s = sidecar(**http_side(free_port()), HERALD_SENDGRID_VERIFICATION_KEY=bad)
        assert s.wait(timeout=30) != 0
        assert f"HERALD_SENDGRID_VERIFICATION_KEY: {says}" in s.log(), s.log()
    s = sidecar(HERALD_SENDGRID_VERIFICATION_KEY=shown)
    assert s.wait(timeout=30) != 0
    assert "HERALD_SENDGRID_VERIFICATION_KEY: SendGrid events arrive through the HTTP side" in s.log(), s.log()


class Forms(HTMLParser):
    """The forms of a page: method, action and their named inputs."""

    def __init__(self):
        super().__init__()
        self.forms = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"method": a.get("method"), "action": a.get("action"), "fields": []})
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1]["fields"].append((a["name"], a.get("value") or ""))


def multipart(fields, boundary="herald-test-boundary"):
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields]
    return ("".join(parts) + f"--{boundary}--\r\n").encode(), f"multipart/form-data; boundary={boundary}"


def test_one_click_unsubscribe_needs_the_rfc_8058_body(db, smtp, sidecar):
    add_contacts(db, 3)
    port = free_port()
    sidecar(**http_side(port))
    sent = send_to(db, smtp, ["r0@example.com", "r1@example.com", "r2@example.com"])
    unsub = {e: m["List-Unsubscribe"].strip("<>") for e, m in sent.items()}
    assert all(m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click" for m in sent.values())

    form = "application/x-www-form-urlencoded"
    wrong_part, wrong_part_type = multipart([("List-Unsubscribe", "No"), ("note", "One-Click")])
    refused = [
        ("empty", b"", form),
        ("another value", b"List-Unsubscribe=Yes", form),
        ("the value alone", b"One-Click", form),
        ("JSON", b'{"List-Unsubscribe": "One-Click"}', "application/json"),
        ("the right words as JSON's media type", b"List-Unsubscribe=One-Click", "application/json"),
        ("multipart, the value in another field", wrong_part, wrong_part_type),
        ("multipart without a boundary", multipart([("List-Unsubscribe", "One-Click")])[0], "multipart/form-data"),
    ]
    for what, body, ctype in refused:
        status, _, reply = request(unsub["r0@example.com"], "POST", body, {"Content-Type": ctype})
        assert status == 400 and b"List-Unsubscribe=One-Click" in reply, (what, status, reply)
    assert db.one("SELECT count(*) FROM herald.suppressions") == 0
    assert db.one("SELECT count(*) FROM herald.events WHERE kind = 'list.unsubscribed'") == 0

    # the confirmation page's own form, posted as a browser posts it (form-urlencoded, to the same URL)
    status, _, page = request(unsub["r0@example.com"])
    assert status == 200
    parser = Forms()
    parser.feed(page.decode())
    [f] = parser.forms
    assert f["method"] == "post" and f["action"] is None
    status, _, reply = request(unsub["r0@example.com"], "POST", urlencode(f["fields"]).encode(),
                               {"Content-Type": form})
    assert status == 200 and b"will not receive these emails again" in reply, reply

    # a mail client's one-click POST, form-urlencoded or multipart/form-data (RFC 8058 prefers the latter)
    body, ctype = multipart([("List-Unsubscribe", "One-Click")])
    assert request(unsub["r1@example.com"], "POST", body, {"Content-Type": ctype})[0] == 200
    assert request(unsub["r2@example.com"], "POST", b"List-Unsubscribe=One-Click",
                   {"Content-Type": form + "; charset=utf-8"})[0] == 200
    assert db.q("SELECT email, reason FROM herald.suppressions ORDER BY email") == [
        ("r0@example.com", "unsubscribed"), ("r1@example.com", "unsubscribed"), ("r2@example.com", "unsubscribed")]
    assert db.one("SELECT count(*) FROM herald.events WHERE kind = 'list.unsubscribed'") == 3


def raw_get(port, path):
    """The raw response head of a GET (so an injected header line would show as its own line)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    return lines[0], lines[1:]


def sign_link(claims):
    """A link token as herald makes them: base64url(JSON claims) "." base64url(HMAC-SHA256(key, part 1))."""
    import hashlib
    import hmac
    from test_broadcast import LINK_SECRET
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    body = b64(json.dumps(claims).encode())
    return body + "." + b64(hmac.new(LINK_SECRET.encode(), body.encode(), hashlib.sha256).digest())


def test_click_redirects_cannot_inject_headers(db, smtp, sidecar):
    evil = "x\r\nSet-Cookie: injected=1\r\nX-Evil: 1"
    db.q("SELECT herald.upsert_contact('acme', 'r0@example.com', %s::jsonb)", json.dumps({"slug": evil}))
    db.q("""SELECT herald.upsert_template('acme', 'shop', 'Shop',
            '<p><a href="https://shop.example/p/{{ contact.slug }}">see</a></p>')""")
    port = free_port()
    sidecar(**http_side(port))
    wait_http(port)
    db.q("SELECT herald.send('acme', 'r0@example.com', 'shop')")
    wait_until(lambda: smtp.count() == 1, timeout=30, what="the message")
    html = smtp.snapshot()[0][1].get_body(("html",)).get_content()
    click = re.search(r'href="http://127\.0\.0\.1:\d+(/c/[^"]+)"', html).group(1)

    status, headers = raw_get(port, click)
    assert status.startswith("HTTP/1.1 302"), (status, headers)
    locations = [h for h in headers if h.lower().startswith("location:")]
    assert locations == ["Location: https://shop.example/p/xSet-Cookie:%20injected=1X-Evil:%201"], headers
    assert not any(h.lower().startswith(("set-cookie", "x-evil")) for h in headers), headers

    # a token signed before targets were normalised (any URL at all): normalised, or refused
    claims = {"p": "c", "w": "acme", "e": "r0@example.com", "k": "k1"}
    status, headers = raw_get(port, "/c/" + sign_link({**claims, "u": "https://a.example/\r\nSet-Cookie: b=2"}))
    assert status.startswith("HTTP/1.1 302") and "Location: https://a.example/Set-Cookie:%20b=2" in headers, headers
    assert not any(h.lower().startswith("set-cookie") for h in headers), headers
    for bad in ["javascript:alert(1)", "data:text/html,x", "//evil.example/"]:
        status, headers = raw_get(port, "/c/" + sign_link({**claims, "u": bad}))
        assert status.startswith("HTTP/1.1 400"), (bad, status)
        assert not any(h.lower().startswith("location") for h in headers), headers


def closing_times(sockets, since, limit=25):
    """Seconds after `since` at which each socket was closed by the server (None: still open after
    `limit`), and whatever bytes arrived before (an idle connection is closed without an answer)."""
    closed, data = {}, {s: b"" for s in sockets}
    with selectors.DefaultSelector() as sel:
        for s in sockets:
            sel.register(s, selectors.EVENT_READ)
        while len(closed) < len(sockets) and time.monotonic() - since < limit:
            for key, _ in sel.select(timeout=1):
                s = key.fileobj
                try:
                    chunk = s.recv(4096)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    data[s] += chunk
                    continue
                closed[s] = time.monotonic() - since
                sel.unregister(s)
    return [(closed.get(s), data[s]) for s in sockets]


def test_idle_connections_cannot_hold_up_real_requests(db, smtp, sidecar):
    """1,000 connections that send only a request line used to make a real request wait 36 s. Now a
    head must arrive within 10 s, and one address holds at most 32 connections."""
    port = free_port()
    sidecar(**http_side(port))
    wait_http(port)
    idle = []
    opened = time.monotonic()
    for _ in range(300):
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        s.sendall(b"GET /o/x HTTP/1.1\r\n")          # never finished
        idle.append(s)

    # a real request from another address answers at once
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=15, source_address=("127.0.0.2", 0)) as s:
        s.sendall(b"GET /o/x HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert time.monotonic() - started < 15

    # every idle connection is closed, unanswered: those over the per-address limit at once, the
    # others when their head is overdue (10 s)
    answers = closing_times(idle, opened)
    for s in idle:
        s.close()
    assert all(at is not None for at, _ in answers), "closed within 25 s"
    assert all(data == b"" for _, data in answers), {data for _, data in answers}
    held = [at for at, _ in answers if at >= 5]
    assert 1 <= len(held) <= 32, sorted(at for at, _ in answers)
    assert max(held) < 20, held

    # and the address that held them is served again
    status, _, body = request(f"http://127.0.0.1:{port}/o/x")
    assert status == 200 and body.startswith(b"GIF89a")


def chunked(body, size=16):
    """`body` in Transfer-Encoding: chunked framing, `size` bytes a chunk."""
    parts = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def test_chunked_bodies_are_read_and_recorded(db, smtp, sidecar):
    """Providers and mail clients may send their bodies chunked (no Content-Length): hyper reads them,
    and what they say is recorded like any other request's."""
    add_contacts(db, 2)
    port = free_port()
    sidecar(**http_side(port))
    wait_http(port)
    sent = send_to(db, smtp, ["r0@example.com", "r1@example.com"])

    # provider events, chunked on a raw socket (so the framing on the wire is exactly this)
    events = json.dumps({"events": [{"type": "bounce", "bounce_type": "hard",
                                     "message_id": sent["r0@example.com"]["Message-ID"]}]}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST /events/generic HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {EVENTS_TOKEN}\r\n"
                  "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                  .encode() + chunked(events))
        reply = s.makefile("rb").read()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), reply
    assert json.loads(body) == {"received": 1, "recorded": 1}, reply

    # a one-click unsubscribe whose multipart body is chunked (http.client's encode_chunked)
    form, ctype = multipart([("List-Unsubscribe", "One-Click")])
    path = urlsplit(sent["r1@example.com"]["List-Unsubscribe"].strip("<>")).path
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=iter([form[:20], form[20:]]), headers={"Content-Type": ctype},
                     encode_chunked=True)
        answer = conn.getresponse()
        page = answer.read()
    finally:
        conn.close()
    assert answer.status == 200 and b"will not receive these emails again" in page, (answer.status, page)

    assert db.q("SELECT email, reason FROM herald.suppressions ORDER BY email") == [
        ("r0@example.com", "hard_bounce"), ("r1@example.com", "unsubscribed")]
    assert db.q("SELECT email, kind FROM herald.events WHERE kind IN ('email.bounced', 'list.unsubscribed') "
                "ORDER BY email") == [("r0@example.com", "email.bounced"), ("r1@example.com", "list.unsubscribed")]


def test_a_workspace_events_token_affects_only_its_workspace(db, smtp, sidecar, tmp_path):
    db.q("SELECT herald.create_workspace('globex', 'Globex')")
    for ws in ("acme", "globex"):
        db.q("SELECT herald.upsert_contact(%s, 'same@example.com')", ws)
        db.q("SELECT herald.upsert_contact(%s, %s)", ws, f"only-{ws}@example.com")
        db.q("SELECT herald.upsert_template(%s, 'news', 'News', '<p>n</p>')", ws)
    db.q("SELECT herald.send('globex', 'only-globex@example.com', 'news')")
    cfg = tmp_path / "herald.toml"
    cfg.write_text('[workspaces.acme]\nevents_token = "acme-events-token"\n'
                   '[workspaces.globex]\nevents_token = "globex-events-token-new"\n'
                   'events_token_previous = "globex-events-token-old"\n')
    port = free_port()
    sidecar(**http_side(port), HERALD_CONFIG=str(cfg))
    wait_http(port)
    # recorded (its Message-ID is in the message history), not only delivered
    wait_until(lambda: db.counts().get("done") == 1, timeout=30, what="globex's message")
    globex_mid = smtp.snapshot()[0][1]["Message-ID"]
    url = f"http://127.0.0.1:{port}/events/generic"

    def post(token, *events):
        status, _, reply = request(url, "POST", json.dumps({"events": list(events)}).encode(),
                                   {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        return status, json.loads(reply) if status == 200 else reply

    def suppressed():
        return db.q("SELECT workspace_id, email FROM herald.suppressions ORDER BY 1, 2")

    # acme's token naming globex's contacts, by workspace or by a globex Message-ID: nothing happens
    assert post("acme-events-token",
                {"type": "unsubscribe", "email": "same@example.com", "workspace": "globex"},
                {"type": "unsubscribe", "email": "only-globex@example.com", "workspace": "globex"},
                {"type": "complaint", "message_id": globex_mid}) == (200, {"received": 3, "recorded": 0})
    assert suppressed() == []
    # without a workspace, acme's token means acme
    assert post("acme-events-token", {"type": "bounce", "email": "same@example.com"}) == \
        (200, {"received": 1, "recorded": 1})
    assert suppressed() == [("acme", "same@example.com")]
    # globex's previous token still works during its rotation, for globex only
    assert post("globex-events-token-old", {"type": "complaint", "message_id": globex_mid},
                {"type": "unsubscribe", "email": "only-acme@example.com", "workspace": "acme"}) == \
        (200, {"received": 2, "recorded": 1})
    assert suppressed() == [("acme", "same@example.com"), ("globex", "only-globex@example.com")]
    # a wrong token is refused; the default token still speaks for every workspace
    assert post("globex-events-token", {"type": "bounce", "email": "x@example.com"})[0] == 401
    assert post(EVENTS_TOKEN, {"type": "unsubscribe", "email": "same@example.com", "workspace": "globex"}) == \
        (200, {"received": 1, "recorded": 1})
    assert ("globex", "same@example.com") in suppressed()


def test_link_keys_rotate_and_are_per_workspace(db, smtp, sidecar, tmp_path):
    import hashlib
    import hmac
    from test_broadcast import LINK_SECRET
    db.q("SELECT herald.create_workspace('globex', 'Globex')")
    for ws in ("acme", "globex"):
        db.q("SELECT herald.upsert_contact(%s, 'r0@example.com')", ws)
        db.q("SELECT herald.upsert_template(%s, 'news', 'News', '<p>n</p>')", ws)
    port = free_port()

    def unsubscribe_links():
        return {m["Message-ID"]: m["List-Unsubscribe"].strip("<>") for _, m, _ in smtp.snapshot()}

    def signed_with(link, key):
        body, sig = link.rsplit("/", 1)[1].split(".")
        mac = base64.urlsafe_b64encode(hmac.new(key.encode(), body.encode(), hashlib.sha256).digest()).rstrip(b"=")
        return mac.decode() == sig

    # 1. the old key
    s = sidecar(**http_side(port))
    wait_http(port)
    db.q("SELECT herald.send('acme', 'r0@example.com', 'news')")
    wait_until(lambda: smtp.count() == 1, timeout=30, what="the first message")
    [old_link] = unsubscribe_links().values()
    assert signed_with(old_link, LINK_SECRET)
    s.stop()

    # 2. rotating: a new key signs, the old one still verifies; globex has a key of its own
    cfg = tmp_path / "herald.toml"
    cfg.write_text('[workspaces.globex]\nlink_secret = "globex-own-link-key"\n')
    s = sidecar(**{**http_side(port), "HERALD_LINK_SECRET": "the-new-link-key-2",
                   "HERALD_LINK_SECRET_PREVIOUS": LINK_SECRET, "HERALD_CONFIG": str(cfg)})
    wait_http(port)
    db.q("SELECT herald.send('acme', 'r0@example.com', 'news')")
    db.q("SELECT herald.send('globex', 'r0@example.com', 'news')")
    wait_until(lambda: smtp.count() == 3, timeout=30, what="two more messages")
    links = unsubscribe_links()
    new_acme = next(l for l in links.values() if l != old_link and signed_with(l, "the-new-link-key-2"))
    globex_link = next(l for l in links.values() if signed_with(l, "globex-own-link-key"))
    assert request(old_link)[0] == 200, "signed with the previous key: still valid"
    assert request(new_acme)[0] == 200
    assert request(globex_link)[0] == 200
    # a token claiming globex, signed with a key that is not globex's, is refused
    forged = sign_link({"p": "u", "w": "globex", "e": "r0@example.com", "k": "x"})
    assert request(f"http://127.0.0.1:{port}/u/{forged}", "POST", b"List-Unsubscribe=One-Click")[0] == 400
    assert db.one("SELECT count(*) FROM herald.suppressions") == 0
    assert request(old_link, "POST", b"List-Unsubscribe=One-Click")[0] == 200
    assert db.q("SELECT workspace_id, email FROM herald.suppressions") == [("acme", "r0@example.com")]
    s.stop()

    # 3. rotation over: the old key is gone
    s = sidecar(**{**http_side(port), "HERALD_LINK_SECRET": "the-new-link-key-2"})
    wait_http(port)
    assert request(old_link)[0] == 400
    assert request(new_acme)[0] == 200

"""Broadcasts through `herald run` to a real SMTP server, and the HTTP side (unsubscribe, tracking,
provider events) through real HTTP requests to the daemon."""

import base64
import html as htmllib
import json
import os
import re
import socket
import subprocess
import urllib.error
import urllib.request
from collections import Counter

from conftest import BIN, free_port, wait_until

LINK_SECRET = "a-link-secret-for-tests"
EVENTS_TOKEN = "provider-token"


def http_side(port):
    return {
        "HERALD_HTTP_ADDR": f"127.0.0.1:{port}",
        "HERALD_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "HERALD_LINK_SECRET": LINK_SECRET,
        "HERALD_EVENTS_TOKEN": EVENTS_TOKEN,
    }


def request(url, method="GET", body=None, headers=None):
    """(status, headers, body) without following redirects."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None
    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def add_contacts(db, n):
    contacts = [{"email": f"r{i}@example.com", "attributes": {"first_name": f"R{i}"}} for i in range(n)]
    for start in range(0, n, 5000):
        db.q("SELECT * FROM herald.upsert_contacts('acme', %s::jsonb)", json.dumps(contacts[start:start + 5000]))


def test_a_10000_recipient_broadcast_with_two_variations_arrives_once_each(db, smtp, sidecar):
    add_contacts(db, 10_000)
    db.q("SELECT herald.upsert_template('acme', 'news-a', 'A: news for {{ contact.first_name }}', '<p>a {{ broadcast.name }}</p>')")
    db.q("SELECT herald.upsert_template('acme', 'news-b', 'B: news for {{ contact.first_name }}', '<p>b {{ broadcast.name }}</p>')")
    b = db.one("""SELECT herald.create_broadcast('acme', '{"name": "Winter", "audience": "all", "variations": [
                   {"key": "a", "template": "news-a"}, {"key": "b", "template": "news-b"}]}')""")
    db.q("SELECT herald.schedule_broadcast(%s)", b)
    sidecar(HERALD_CONCURRENCY="128")
    wait_until(lambda: db.one("SELECT status FROM herald.broadcasts WHERE id = %s", b) == "sent",
               timeout=120, what="the broadcast to be sent")
    messages = smtp.snapshot()
    per_rcpt = Counter(r for rcpts, _, _ in messages for r in rcpts)
    assert len(per_rcpt) == 10_000 and set(per_rcpt.values()) == {1}, "every recipient exactly once"
    assert len({m["Message-ID"] for _, m, _ in messages}) == 10_000
    subjects = Counter(m["Subject"].split(":")[0] for _, m, _ in messages)
    assert set(subjects) == {"A", "B"} and min(subjects.values()) > 4_000, subjects
    stats = dict(((v, m), n) for v, m, n in db.q("SELECT * FROM herald.broadcast_stats(%s)", b))
    assert stats[("a", "sent")] + stats[("b", "sent")] == 10_000
    assert stats[("a", "sent")] == subjects["A"] and stats[("b", "sent")] == subjects["B"]
    # message history is kept per broadcast
    assert db.one("SELECT count(*) FROM herald.message_history WHERE broadcast_id = %s AND status = 'sent'", b) == 10_000


def test_unsubscribe_click_and_open_through_the_http_side(db, smtp, sidecar):
    add_contacts(db, 3)
    db.q("""SELECT herald.upsert_template('acme', 'news', 'News',
            '<p>Read <a href="https://acme.test/post?id=1&amp;x=2">this</a>. <a href="{{ unsubscribe_url }}">Stop</a></p>')""")
    port = free_port()
    sidecar(**http_side(port))
    b = db.one("""SELECT herald.create_broadcast('acme', '{"name": "One", "audience": "all", "template": "news"}')""")
    db.q("SELECT herald.schedule_broadcast(%s)", b)
    wait_until(lambda: smtp.count() == 3, timeout=30, what="3 messages")
    msg = next(m for rcpts, m, _ in smtp.snapshot() if rcpts == ["r1@example.com"])
    base = f"http://127.0.0.1:{port}"

    # RFC 8058 headers point at the one-click endpoint
    unsub = msg["List-Unsubscribe"].strip("<>")
    assert unsub.startswith(base + "/u/")
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    html = msg.get_body(("html",)).get_content()
    assert unsub in htmllib.unescape(html), "the template's {{ unsubscribe_url }}"
    click = re.search(r'href="(http://127\.0\.0\.1:\d+/c/[^"]+)"', html).group(1)
    pixel = re.search(r'<img src="(http://127\.0\.0\.1:\d+/o/[^"]+)"', html).group(1)

    # a click goes to exactly the URL in the message, and is recorded
    status, headers, _ = request(click)
    assert status == 302 and headers["Location"] == "https://acme.test/post?id=1&x=2"
    # the pixel is a GIF, and records an open
    status, headers, body = request(pixel)
    assert status == 200 and headers["Content-Type"] == "image/gif" and body.startswith(b"GIF89a")
    events = db.q("""SELECT kind, payload ->> 'broadcast', payload ->> 'message_id' FROM herald.events
                      WHERE email = 'r1@example.com' AND kind LIKE 'email.%' ORDER BY id""")
    # both name the message by the Message-ID it was sent and recorded under (the link carries its job)
    mid = msg["Message-ID"]
    assert db.one("SELECT message_id FROM herald.message_history WHERE broadcast_id = %s AND message_id = %s", b, mid) == mid
    assert events == [("email.clicked", str(b), mid), ("email.opened", str(b), mid)]

    # forged and tampered tokens are refused and record nothing
    body_part, sig = click.rsplit("/", 1)[1].split(".")
    assert request(f"{base}/c/{body_part}.{sig[:-2]}xx")[0] == 400
    assert request(f"{base}/c/{pixel.rsplit('/', 1)[1]}")[0] == 400, "an open token is not a click token"
    assert request(f"{base}/u/forged.token", method="POST", body=b"List-Unsubscribe=One-Click")[0] == 400
    assert db.one("SELECT count(*) FROM herald.suppressions") == 0
    # a forged pixel still answers with the GIF (mail clients never see an error) but records nothing
    status, headers, body = request(f"{base}/o/{body_part}.{sig[:-2]}xx")
    assert status == 200 and headers["Content-Type"] == "image/gif" and body.startswith(b"GIF89a")
    # an unsubscribe token whose claims were swapped (another recipient, same signature) is refused
    forged = base64.urlsafe_b64encode(json.dumps({"p": "u", "w": "acme", "e": "r2@example.com", "k": "x"})
                                      .encode()).rstrip(b"=").decode()
    assert request(f"{base}/u/{forged}.{unsub.rsplit('.', 1)[1]}", method="POST",
                   body=b"List-Unsubscribe=One-Click")[0] == 400
    assert db.one("SELECT count(*) FROM herald.events WHERE kind LIKE 'email.%' OR kind = 'list.unsubscribed'") == 2

    # GET shows a confirmation page and changes nothing; POST unsubscribes
    status, _, page = request(unsub)
    assert status == 200 and b"<form method=\"post\"" in page
    assert db.one("SELECT count(*) FROM herald.suppressions") == 0
    # a POST without RFC 8058's body (List-Unsubscribe=One-Click) unsubscribes nobody
    assert request(unsub, method="POST", body=b"")[0] == 400
    assert request(unsub, method="POST", body=b"List-Unsubscribe=Maybe")[0] == 400
    assert db.one("SELECT count(*) FROM herald.suppressions") == 0
    status, _, _ = request(unsub, method="POST", body=b"List-Unsubscribe=One-Click",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200
    assert db.q("SELECT email, reason FROM herald.suppressions") == [("r1@example.com", "unsubscribed")]
    assert db.one("SELECT count(*) FROM herald.events WHERE email = 'r1@example.com' AND kind = 'list.unsubscribed'") == 1

    # the next broadcast skips the unsubscribed address
    before = smtp.count()
    b2 = db.one("""SELECT herald.create_broadcast('acme', '{"name": "Two", "audience": "all", "template": "news"}')""")
    db.q("SELECT herald.schedule_broadcast(%s)", b2)
    wait_until(lambda: db.one("SELECT status FROM herald.broadcasts WHERE id = %s", b2) == "sent", timeout=30,
               what="the second broadcast")
    second = [rcpts[0] for rcpts, _, _ in smtp.snapshot()[before:]]
    assert sorted(second) == ["r0@example.com", "r2@example.com"]


def test_provider_events_suppress_bounces_and_complaints(db, smtp, sidecar):
    add_contacts(db, 4)
    db.q("SELECT herald.upsert_template('acme', 'news', 'News', '<p>n</p>')")
    port = free_port()
    sidecar(**http_side(port))
    for i in range(4):
        db.q("SELECT herald.send('acme', %s, 'news')", f"r{i}@example.com")
    wait_until(lambda: db.counts().get("done") == 4, timeout=30, what="4 messages sent and recorded")
    mid = {rcpts[0]: m["Message-ID"] for rcpts, m, _ in smtp.snapshot()}
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {EVENTS_TOKEN}", "Content-Type": "application/json"}

    generic = json.dumps({"events": [
        {"type": "bounce", "bounce_type": "hard", "message_id": mid["r0@example.com"]},
        {"type": "bounce", "bounce_type": "soft", "email": "r1@example.com", "workspace": "acme"},
    ]}).encode()
    assert request(f"{base}/events/generic", "POST", generic, {"Content-Type": "application/json"})[0] == 401
    assert request(f"{base}/events/generic", "POST", generic,
                   {**auth, "Authorization": "Bearer wrong"})[0] == 401
    status, _, body = request(f"{base}/events/generic", "POST", generic, auth)
    assert status == 200 and json.loads(body) == {"received": 2, "recorded": 2}

    sendgrid = json.dumps([
        {"email": "r2@example.com", "event": "spamreport", "smtp-id": mid["r2@example.com"]},
        {"email": "r3@example.com", "event": "delivered", "smtp-id": mid["r3@example.com"]},
    ]).encode()
    # SendGrid can only put credentials into the webhook URL: Basic auth with the token as password
    basic = {**auth, "Authorization": "Basic " + base64.b64encode(f"sendgrid:{EVENTS_TOKEN}".encode()).decode()}
    status, _, body = request(f"{base}/events/sendgrid", "POST", sendgrid, basic)
    assert status == 200 and json.loads(body) == {"received": 1, "recorded": 1}
    assert request(f"{base}/events/generic", "POST", b"not json", auth)[0] == 400
    # a chunked body is read, not taken as empty: `{}` is JSON without events
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST /events/generic HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {EVENTS_TOKEN}\r\n"
                  "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n".encode())
        reply = s.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 400 ") and b'expected {"events"' in reply, reply

    assert db.q("SELECT email, reason FROM herald.suppressions ORDER BY email") == [
        ("r0@example.com", "hard_bounce"), ("r2@example.com", "complaint")]
    kinds = db.q("SELECT email, kind, payload ->> 'bounce_type' FROM herald.events WHERE kind LIKE 'email.%' ORDER BY email")
    assert kinds == [("r0@example.com", "email.bounced", "hard"), ("r1@example.com", "email.bounced", "soft"),
                     ("r2@example.com", "email.complained", None)]
    # a hard-bounced address is not mailed again, whatever queues the message
    before = smtp.count()
    db.q("SELECT herald.send('acme', 'r0@example.com', 'news')")
    db.q("SELECT herald.send('acme', 'r1@example.com', 'news')")
    wait_until(lambda: smtp.count() == before + 1, timeout=30, what="one more message")
    wait_until(lambda: db.one("SELECT count(*) FROM herald.outbox WHERE status = 'cancelled'") == 1, timeout=10,
               what="the suppressed job cancelled")
    assert [r[0] for r, _, _ in smtp.snapshot()[before:]] == ["r1@example.com"]


def test_a_broadcast_to_addresses_the_server_refuses_pauses_itself(db, smtp, sidecar):
    """A list with dead addresses, sent through an SMTP server that checks recipients: every fifth
    address is answered 550 5.1.1 at RCPT. Each refusal is a hard bounce at send time (suppressed, an
    email.bounced event, the broadcast's 'refused' count), and auto_pause reads them with no provider
    report at all: past 10% of 100 tried, the broadcast pauses. No address is tried twice."""
    add_contacts(db, 1_000)
    smtp.reject.update(f"r{i}@example.com" for i in range(0, 1_000, 5))
    db.q("SELECT herald.upsert_template('acme', 'news', 'News', '<p>n</p>')")
    b = db.one("""SELECT herald.create_broadcast('acme', '{"name": "Old list", "audience": "all", "template": "news",
                   "rate_per_second": 100, "auto_pause": {"bounce_percent": 10, "min_sent": 100}}')""")
    db.q("SELECT herald.schedule_broadcast(%s)", b)
    sidecar()
    wait_until(lambda: db.one("SELECT status FROM herald.broadcasts WHERE id = %s", b) == "paused", timeout=60,
               what="the broadcast to pause itself on refusals")
    wait_until(lambda: db.one("SELECT count(*) FROM herald.outbox WHERE broadcast_id = %s AND status IN ('pending', 'leased')",
                              b) == 0, timeout=30, what="its jobs held")
    stats = dict((m, n) for _, m, n in db.q("SELECT * FROM herald.broadcast_stats(%s)", b))
    refused = [a for a, code in smtp.refusals]
    assert stats["refused"] == stats["failed"] == len(refused) > 0 and "bounced" not in stats, stats
    assert len(set(refused)) == len(refused) and set(refused) <= smtp.reject, "each dead address tried once"
    assert smtp.count() == stats["sent"], "what the SMTP server took is what herald counts as sent"
    assert sorted(db.q("SELECT email, reason FROM herald.suppressions WHERE workspace_id = 'acme'")) == \
        sorted((a, "hard_bounce") for a in refused)
    assert db.one("SELECT count(*) FROM herald.events WHERE kind = 'email.bounced' AND payload ->> 'refused_at_send' = 'true'") \
        == len(refused)
    why = db.one("SELECT auto_paused FROM herald.broadcasts WHERE id = %s", b)
    assert why["reason"] == "bounce_percent" and why["refused"] == len(refused) and why["bounced"] == 0, why
    assert why["sent"] + why["refused"] >= 100 and why["percent"] >= 10, why
    listing = subprocess.run([BIN, "broadcasts", "--workspace", "acme"], capture_output=True, text=True, timeout=30,
                             env={"PATH": os.environ["PATH"], "DATABASE_URL": db.url, "NO_COLOR": "1"})
    assert listing.returncode == 0, listing.stderr
    assert f"messages sent or refused ({len(refused)} refused at send time)" in listing.stdout, listing.stdout
    db.q("SELECT herald.cancel_broadcast(%s)", b)


def test_a_broadcast_pauses_itself_when_its_bounces_pass_the_line(db, smtp, sidecar):
    """auto_pause through the daemon: hard bounces reported to /events/generic (one batch sent twice,
    as a provider retrying) pass 5% of the messages sent while the broadcast is going out at 100/s; the
    daemon's advance pauses it, nothing more is sent, and it says why (results stream, `herald
    broadcasts`). Resumed, the rest goes out, each recipient once."""
    add_contacts(db, 2_000)
    db.q("SELECT herald.upsert_template('acme', 'news', 'News', '<p>n</p>')")
    b = db.one("""SELECT herald.create_broadcast('acme', '{"name": "Risky list", "audience": "all", "template": "news",
                   "rate_per_second": 100, "auto_pause": {"bounce_percent": 5, "min_sent": 100}}')""")
    db.q("SELECT herald.schedule_broadcast(%s)", b)
    port = free_port()
    sidecar(**http_side(port))
    sent = "SELECT count(*) FROM herald.message_history WHERE broadcast_id = %s AND status = 'sent'"
    wait_until(lambda: db.one(sent, b) >= 150, timeout=60, what="150 messages sent and recorded")
    mids = [r[0] for r in db.q(f"SELECT message_id FROM herald.message_history WHERE broadcast_id = %s AND status = 'sent' "
                               f"ORDER BY id LIMIT 60", b)]
    report = json.dumps({"events": [{"type": "bounce", "bounce_type": "hard", "message_id": m} for m in mids]
                         + [{"type": "bounce", "bounce_type": "soft", "message_id": mids[0]}]}).encode()
    auth = {"Authorization": f"Bearer {EVENTS_TOKEN}", "Content-Type": "application/json"}
    for _ in range(2):
        status, _, body = request(f"http://127.0.0.1:{port}/events/generic", "POST", report, auth)
        assert status == 200 and json.loads(body)["recorded"] == 61, body

    wait_until(lambda: db.one("SELECT status FROM herald.broadcasts WHERE id = %s", b) == "paused", timeout=30,
               what="the broadcast to pause itself")
    # settled: nothing of it pending or in flight, the rest held
    wait_until(lambda: db.one("SELECT count(*) FROM herald.outbox WHERE broadcast_id = %s AND status IN ('pending', 'leased')",
                              b) == 0, timeout=30, what="its jobs held")
    held = db.one("SELECT count(*) FROM herald.outbox WHERE broadcast_id = %s AND status = 'held'", b)
    stats = dict(((m), n) for _, m, n in db.q("SELECT * FROM herald.broadcast_stats(%s)", b))
    assert stats["bounced"] == 60, "each message's first hard bounce, once: the repeat and the soft bounce count for nothing"
    assert held > 0 and stats["sent"] + held + stats.get("suppressed", 0) == 2_000, (held, stats)
    assert smtp.count() == stats["sent"], "what the SMTP server received is what herald counts as sent"
    why = db.one("SELECT auto_paused FROM herald.broadcasts WHERE id = %s", b)
    assert why["reason"] == "bounce_percent" and why["bounced"] == 60 and why["limit"] == 5
    assert why["sent"] * 5 <= 60 * 100 and why["since_resume"] is False, why
    wait_until(lambda: db.one("SELECT count(*) FROM herald.read_results('acme', 0, 100, ARRAY['broadcast.auto_paused'])") == 1,
               timeout=10, what="the broadcast.auto_paused result published")
    data = db.one("SELECT data FROM herald.read_results('acme', 0, 100, ARRAY['broadcast.auto_paused'])")
    assert data == why
    db.q("""SELECT herald.create_broadcast('acme', '{"name": "Quiet draft", "audience": "all", "template": "news"}')""")
    listing = subprocess.run([BIN, "broadcasts", "--workspace", "acme"], capture_output=True, text=True, timeout=30,
                             env={"PATH": os.environ["PATH"], "DATABASE_URL": db.url, "NO_COLOR": "1"})
    assert listing.returncode == 0, listing.stderr
    assert f"broadcast {b}: paused by itself: hard bounces reached" in listing.stdout, listing.stdout
    assert listing.stdout.count("paused by itself") == 1, listing.stdout
    as_json = subprocess.run([BIN, "broadcasts", "--workspace", "acme", "--json"], capture_output=True, text=True,
                             timeout=30, env={"PATH": os.environ["PATH"], "DATABASE_URL": db.url, "NO_COLOR": "1"})
    [listed] = [x for x in json.loads(as_json.stdout) if x["id"] == b]
    assert (listed["bounced"], listed["complained"], listed["auto_paused"]["reason"]) == (60, 0, "bounce_percent")

    # resumed: counted afresh, the rest goes out; every recipient once, the bounced ones were already sent
    db.q("SELECT herald.resume_broadcast(%s)", b)
    wait_until(lambda: db.one("SELECT status FROM herald.broadcasts WHERE id = %s", b) == "sent", timeout=90,
               what="the resumed broadcast to be sent")
    per_rcpt = Counter(r for rcpts, _, _ in smtp.snapshot() for r in rcpts)
    assert set(per_rcpt.values()) == {1} and len(per_rcpt) == db.one(sent, b), "nobody twice"

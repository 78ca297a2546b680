"""The operator's page (HERALD_ADMIN_PASSWORD) in a real browser: headless Chromium from Debian driven by
selenium. Signs in behind a path prefix, checks the numbers drawn on the automation's SVG nodes against
the database, approves a pending approval (decide_approval recorded with the operator's name), pauses a
broadcast, redrives a dead letter, sees a number change without a reload, and is refused a POST without
the form token. Screenshots of every page go to target/screenshots/."""

import json
import os
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import ROOT, wait_until
from test_broadcast import EVENTS_TOKEN, LINK_SECRET

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PASSWORD = "an-operator-password"
OPERATOR = "Olga Operator"
PREFIX = "/ops"
SHOTS = os.path.join(ROOT, "target", "screenshots")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

JOURNEY = {
    "name": "Welcome journey", "trigger": {"event": "signup"}, "start": "split",
    "nodes": {
        "split": {"type": "split", "variants": [{"weight": 1, "next": "hello_a"}, {"weight": 1, "next": "hello_b"}]},
        "hello_a": {"type": "email", "template": "welcome", "next": "review"},
        "hello_b": {"type": "email", "template": "welcome-b", "next": "review", "on_error": "done"},
        "review": {"type": "approval", "approved": "thanks", "rejected": "done"},
        "thanks": {"type": "email", "template": "thanks", "next": "done"},
        "done": {"type": "exit"},
    },
}
SIGNUPS = 12


@pytest.fixture
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium and chromium-driver are not installed (tests/setup.sh installs them)")
    options = webdriver.ChromeOptions()
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"]:
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def screenshot(driver, name):
    """The whole page (the window made as tall as the page), as target/screenshots/<name>.png."""
    os.makedirs(SHOTS, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(height + 40, 600), 5000))
    driver.save_screenshot(os.path.join(SHOTS, f"{name}.png"))
    driver.set_window_size(1280, 900)


def number(text):
    """A count as the page writes it (thin spaces between thousands)."""
    return int(text.replace("\u202f", "").strip())


def wait_http(port):
    def up():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    wait_until(up, timeout=30, what="the HTTP side to listen")


def populate(db):
    """A journey with contacts waiting for approval, a broadcast sent with two variations, one scheduled
    for later, and a dead letter. Returns (automation id, scheduled broadcast id, dead job id)."""
    db.q("SELECT herald.upsert_template('acme', 'welcome', 'Welcome', '<p>Hello</p>')")
    db.q("SELECT herald.upsert_template('acme', 'welcome-b', 'Welcome!', '<p>Hello there</p>')")
    db.q("SELECT herald.upsert_template('acme', 'thanks', 'Approved', '<p>You are in</p>')")
    automation = db.one("SELECT herald.create_automation('acme', %s::jsonb)", json.dumps(JOURNEY))
    db.q("SELECT herald.set_automation_status(%s, 'live')", automation)
    for i in range(SIGNUPS):
        db.q("SELECT herald.track('acme', %s, 'signup', '{}')", f"person{i}@example.com")
    news = db.one("""SELECT herald.create_broadcast('acme', '{"name": "Spring news", "audience": "all",
                     "variations": [{"key": "a", "template": "welcome"}, {"key": "b", "template": "welcome-b"}],
                     "ab_test": {"test_percent": 50, "metric": "opens", "wait": "1 minute"}}')""")
    db.q("SELECT herald.schedule_broadcast(%s)", news)
    later = db.one("""SELECT herald.create_broadcast('acme', '{"name": "Summer <sale>", "audience": "all",
                      "template": "welcome"}')""")
    db.q("SELECT herald.schedule_broadcast(%s, now() + interval '2 hours')", later)
    dead = db.one("SELECT herald.send('acme', 'bounced@example.com', 'welcome')")
    db.q("UPDATE herald.outbox SET status = 'dead', attempt = 5, "
         "last_error = '451 4.3.0 mailbox busy <try later> (five times)' WHERE id = %s", dead)
    return automation, later, dead


# messages per minute of a second workspace over the last 40 minutes: (minutes ago, sent, failed)
GLOBEX_HISTORY = [(m, 8 + (m * 7) % 23, (m % 9 == 0) + (m % 13 == 0)) for m in range(40, 0, -1)]


def populate_globex(db):
    """A second workspace with contacts and an hour of delivery history (written in time order, so ids
    rise with created_at as they do when complete() writes them)."""
    db.q("SELECT herald.create_workspace('globex', 'Globex Corporation')")
    db.q("SELECT * FROM herald.upsert_contacts('globex', %s::jsonb)",
         json.dumps([{"email": f"g{i}@globex.test"} for i in range(250)]))
    for ago, sent, failed in GLOBEX_HISTORY:
        db.q("""INSERT INTO herald.message_history (workspace_id, outbox_id, kind, status, dedupe_key, attempt, created_at)
                SELECT 'globex', 0, 'email', CASE WHEN i <= %s THEN 'sent' ELSE 'failed' END, 'hist:' || %s || ':' || i, 1,
                       date_trunc('minute', now()) - make_interval(mins => %s) + interval '20 seconds'
                  FROM generate_series(1, %s) i""", sent, ago, ago, sent + failed)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None


def admin_get(url, cookie):
    """(status, Location) of a GET with the session cookie, redirects not followed."""
    request = urllib.request.Request(url, headers={"Cookie": f"herald_admin={cookie}"})
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as r:
            return r.status, r.headers.get("Location", "")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Location", "")


def http_sign_in(public, name):
    """Signs in without the browser (another device); returns the session cookie's value."""
    origin = public.split(PREFIX)[0]
    body = urllib.parse.urlencode({"name": name, "password": PASSWORD, "next": ""}).encode()
    request = urllib.request.Request(f"{public}/admin/login", data=body, method="POST", headers={
        "Origin": origin, "Content-Type": "application/x-www-form-urlencoded"})

    try:
        urllib.request.build_opener(NoRedirect).open(request, timeout=10)
        raise AssertionError("a sign-in answers with a redirect")
    except urllib.error.HTTPError as e:
        assert e.code == 303, e.code
        return e.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]


def record_opens(db, automation, n):
    """n contacts open the welcome email of hello_a or hello_b, as the open pixel would record it."""
    rows = db.q("SELECT h.message_id, h.dedupe_key, c.email FROM herald.message_history h "
                "JOIN herald.contacts c ON c.workspace_id = h.workspace_id AND c.id = h.contact_id "
                "WHERE h.automation_id = %s AND h.status = 'sent' ORDER BY h.id LIMIT %s", automation, n)
    feedback = [{"kind": "opened", "workspace": "acme", "email": email, "message_id": mid,
                 "payload": {"broadcast": None, "variation": None, "message": key}} for mid, key, email in rows]
    db.q("SELECT herald.record_feedback(%s::jsonb)", json.dumps(feedback))


def figures_in_db(db, automation):
    now = dict(db.q("SELECT current_node, count(*) FROM herald.enrollments WHERE automation_id = %s "
                    "AND status IN ('active', 'waiting') GROUP BY 1", automation))
    stats = {(n, m): v for n, m, v in db.q("SELECT node, metric, value FROM herald.automation_stats(%s)", automation)}
    opened = dict(db.q("""SELECT substring(payload ->> 'message' FROM '^a[0-9]+:e[0-9]+:(.*):[0-9]+$'),
                                 count(DISTINCT contact_id)
                            FROM herald.events WHERE kind = 'email.opened' GROUP BY 1"""))
    return now, stats, opened


def test_the_admin_page_in_a_browser(db, smtp, sidecar, browser):
    automation, later, dead = populate(db)
    populate_globex(db)
    port = __import__("conftest").free_port()
    public = f"http://127.0.0.1:{port}{PREFIX}"
    sidecar(HERALD_HTTP_ADDR=f"127.0.0.1:{port}", HERALD_PUBLIC_URL=public, HERALD_LINK_SECRET=LINK_SECRET,
            HERALD_EVENTS_TOKEN=EVENTS_TOKEN, HERALD_ADMIN_PASSWORD=PASSWORD)
    wait_http(port)
    # every journey parked at the approval, every broadcast message sent
    wait_until(lambda: db.one("SELECT count(*) FROM herald.enrollments WHERE wait_kind = 'approval'") == SIGNUPS,
               timeout=60, what="the journeys to wait for approval")
    # the A/B test's share is sent; its minute of waiting is cut short
    wait_until(lambda: db.one("SELECT phase FROM herald.broadcasts WHERE name = 'Spring news'") == "waiting",
               timeout=60, what="the A/B test share to be sent")
    db.q("UPDATE herald.broadcasts SET test_ends_at = now() WHERE name = 'Spring news'")
    wait_until(lambda: db.one("SELECT status FROM herald.broadcasts WHERE name = 'Spring news'") == "sent",
               timeout=60, what="the broadcast to be sent")
    # a broadcast that paused itself: its first message hard-bounced (auto_pause: 50% of at least 1 sent),
    # while the rest went out at 1 a second
    risky = db.one("""SELECT herald.create_broadcast('acme', '{"name": "Risky import", "audience": "all",
                      "template": "welcome", "rate_per_second": 1, "auto_pause": {"bounce_percent": 50, "min_sent": 1}}')""")
    db.q("SELECT herald.schedule_broadcast(%s)", risky)
    first = "SELECT message_id FROM herald.message_history WHERE broadcast_id = %s AND status = 'sent' ORDER BY id LIMIT 1"
    wait_until(lambda: db.one(first, risky) is not None, timeout=30, what="the risky broadcast's first message")
    db.q("SELECT herald.record_feedback(jsonb_build_array(jsonb_build_object('kind', 'hard_bounce', 'message_id', %s::text)))",
         db.one(first, risky))
    wait_until(lambda: db.one("SELECT status FROM herald.broadcasts WHERE id = %s", risky) == "paused", timeout=30,
               what="the risky broadcast to pause itself")
    record_opens(db, automation, 5)
    db.q("SELECT herald.flush_stats()")
    base = f"{public}/admin"
    wait = WebDriverWait(browser, 20)

    # signed out: /admin sends the browser to the sign-in form, which brings it back afterwards
    browser.get(f"{base}/automations/{automation}")
    assert browser.current_url.startswith(f"{base}/login?next="), browser.current_url
    screenshot(browser, "login")
    browser.find_element(By.ID, "name").send_keys(OPERATOR)
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
    wait.until(EC.url_to_be(f"{base}/automations/{automation}"))
    cookie = browser.get_cookie("herald_admin")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == f"{PREFIX}/admin", cookie

    # the automation: the figures drawn on each node are the database's
    now, stats, opened = figures_in_db(db, automation)
    assert now == {"review": SIGNUPS}
    drawn = drawn_figures(browser)
    assert set(drawn) == set(JOURNEY["nodes"]), drawn
    for node, figures in drawn.items():
        assert figures["now"] == now.get(node, 0), (node, figures)
        assert figures["passed"] == stats.get((node, "entered"), 0), (node, figures)
    for node in ["hello_a", "hello_b"]:
        assert drawn[node]["sent"] == stats.get((node, "sent"), 0) > 0, drawn[node]
        assert drawn[node]["opened"] == opened.get(node, 0), (drawn[node], opened)
    assert drawn["hello_a"]["opened"] + drawn["hello_b"]["opened"] == 5
    assert drawn["hello_a"]["passed"] + drawn["hello_b"]["passed"] == SIGNUPS
    # the split's arms carry their share
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, 'svg.diagram g.edge-label[data-from="split"] text')]
    assert len(labels) == 2 and all("%" in t for t in labels), labels
    screenshot(browser, "automation")

    # approvals: approve the first one; decide_approval records the operator
    browser.find_element(By.LINK_TEXT, "Approvals").click()
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "tr[data-enrollment]")))
    screenshot(browser, "approvals")
    row = browser.find_element(By.CSS_SELECTOR, "tr[data-enrollment]")
    enrollment = int(row.get_attribute("data-enrollment"))
    email = db.one("SELECT c.email FROM herald.enrollments e JOIN herald.contacts c "
                   "ON c.workspace_id = e.workspace_id AND c.id = e.contact_id WHERE e.id = %s", enrollment)
    assert email in row.text
    row.find_element(By.CSS_SELECTOR, "button.good").click()
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, ".notice-ok"), f"Enrollment #{enrollment} approved."))
    assert db.q("SELECT decided_by, approved FROM herald.enrollments WHERE id = %s", enrollment) == [(OPERATOR, True)]
    wait_until(lambda: db.one("SELECT status FROM herald.enrollments WHERE id = %s", enrollment) == "completed",
               timeout=30, what="the approved journey to go on (thanks email, done)")
    assert not browser.find_elements(By.CSS_SELECTOR, f'tr[data-enrollment="{enrollment}"]')
    # and the contact's step history on the automation page shows who decided
    browser.get(f"{base}/automations/{automation}")
    field = browser.find_element(By.ID, "email")
    field.send_keys(email)
    field.submit()
    steps = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f'table.steps[data-enrollment="{enrollment}"]')))
    assert f"approved by {OPERATOR} -> thanks" in steps.text, steps.text
    assert "queued email" in steps.text

    # broadcasts: pause the scheduled one from the page
    browser.find_element(By.LINK_TEXT, "Broadcasts").click()
    section = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f'section[data-broadcast="{later}"]')))
    assert "Summer <sale>" in section.text
    news = browser.find_element(By.XPATH, "//section[.//h2[contains(., 'Spring news')]]")
    winner, reason = db.q("SELECT winner, winner_reason FROM herald.broadcasts WHERE name = 'Spring news'")[0]
    assert f"A/B winner: {winner}" in news.text and reason in news.text, news.text
    paused = browser.find_element(By.CSS_SELECTOR, f'section[data-broadcast="{risky}"] [data-auto-paused]')
    assert paused.text.startswith("Paused by itself: hard bounces reached 100% of 1 message sent"), paused.text
    assert len(browser.find_elements(By.CSS_SELECTOR, "[data-auto-paused]")) == 1, "only the one that paused itself"
    bounced = browser.find_element(By.CSS_SELECTOR, f'[data-live="b:{risky}:v:default:bounced"]')
    assert bounced.text == "1", bounced.text
    screenshot(browser, "broadcasts")
    section.find_element(By.XPATH, ".//button[normalize-space()='Pause']").click()
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, ".notice-ok"), f"Broadcast #{later} paused."))
    assert db.one("SELECT status FROM herald.broadcasts WHERE id = %s", later) == "paused"

    # a POST without the form token is refused, and nothing changes
    section = browser.find_element(By.CSS_SELECTOR, f'section[data-broadcast="{later}"]')
    resume = section.find_element(By.XPATH, ".//button[normalize-space()='Resume']")
    browser.execute_script("arguments[0].form.querySelector('input[name=csrf]').remove()", resume)
    resume.click()
    wait.until(EC.text_to_be_present_in_element((By.TAG_NAME, "body"), "refused"))
    assert "token is missing or stale" in browser.find_element(By.TAG_NAME, "body").text
    assert db.one("SELECT status FROM herald.broadcasts WHERE id = %s", later) == "paused"

    # an archived broadcast leaves the list (herald.archive_broadcast); the others stay
    spring = db.one("SELECT id FROM herald.broadcasts WHERE name = 'Spring news'")
    db.q("SELECT herald.archive_broadcast(%s)", spring)
    browser.get(f"{base}/broadcasts")
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f'section[data-broadcast="{later}"]')))
    assert not browser.find_elements(By.CSS_SELECTOR, f'section[data-broadcast="{spring}"]')

    # dead letters: the error is shown, redrive puts the job back and the daemon sends it
    browser.get(f"{base}/dead-letters")
    row = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f'tr[data-job="{dead}"]')))
    assert "451 4.3.0 mailbox busy <try later>" in row.text
    screenshot(browser, "dead-letters")
    row.find_element(By.CSS_SELECTOR, "button.primary").click()
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, ".notice-ok"), f"Job #{dead} is back in the queue."))
    wait_until(lambda: db.one("SELECT status FROM herald.outbox WHERE id = %s", dead) == "done",
               timeout=30, what="the redriven job to be sent")

    # the overview: numbers change in place, without a reload
    browser.get(base)
    contacts = browser.find_element(By.CSS_SELECTOR, '[data-live="w:acme:contacts"]')
    before = number(contacts.text)
    assert before == db.one("SELECT count(*) FROM herald.contacts WHERE workspace_id = 'acme'")
    browser.execute_script("window.__not_reloaded = true")
    db.q("SELECT * FROM herald.upsert_contacts('acme', %s::jsonb)",
         json.dumps([{"email": f"late{i}@example.com"} for i in range(7)]))
    wait.until(lambda d: number(d.find_element(By.CSS_SELECTOR, '[data-live="w:acme:contacts"]').text) == before + 7)
    assert browser.execute_script("return window.__not_reloaded") is True
    sent = db.one("SELECT count(*) FROM herald.message_history WHERE workspace_id = 'acme' AND status = 'sent'")
    chart = browser.find_element(By.CSS_SELECTOR, '[data-live-html="w:acme:chart"] svg title').get_attribute("textContent")
    assert chart.startswith(f"acme: {sent} sent, 0 failed"), chart
    # the other workspace's chart: its hour of history, minute by minute
    chart = browser.find_element(By.CSS_SELECTOR, '[data-live-html="w:globex:chart"] svg')
    sent = sum(s for _, s, _ in GLOBEX_HISTORY)
    failed = sum(f for _, _, f in GLOBEX_HISTORY)
    summary = chart.find_element(By.TAG_NAME, "title").get_attribute("textContent")
    assert summary.startswith(f"globex: {sent} sent, {failed} failed in the last 60 minutes"), summary
    minutes = [t.get_attribute("textContent") for t in chart.find_elements(By.CSS_SELECTOR, "g > title")]
    # minute by minute (the history was written a minute or two before the page read it)
    assert any(all(f"{ago + shift} min ago: {s} sent, {f} failed" in minutes for ago, s, f in GLOBEX_HISTORY)
               for shift in range(3)), minutes
    assert number(browser.find_element(By.CSS_SELECTOR, '[data-live="w:globex:contacts"]').text) == 250
    screenshot(browser, "overview")

    browser.find_element(By.LINK_TEXT, "Automations").click()
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "table")))
    screenshot(browser, "automations")

    # signing out ends the session everywhere: the page asks to sign in again, and a copy of the
    # cookie (another tab, a stolen one) opens nothing any more
    copied = browser.get_cookie("herald_admin")["value"]
    assert admin_get(f"{base}/broadcasts", copied)[0] == 200
    browser.find_element(By.XPATH, "//form[contains(@class, 'logout')]//button[normalize-space()='Sign out']").click()
    wait.until(EC.url_contains("/admin/login"))
    browser.get(base)
    assert "/admin/login" in browser.current_url
    status, location = admin_get(f"{base}/broadcasts", copied)
    assert status == 303 and "/admin/login" in location, (status, location)
    assert admin_get(f"{base}/live?view=overview", copied)[0] == 401

    # sign out everyone: the browser's session and one on another device end with one click; signing
    # in again works at once
    browser.find_element(By.ID, "name").send_keys(OPERATOR)
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "form.logout")))
    other = http_sign_in(public, "Otto Other")
    assert admin_get(base, other)[0] == 200
    browser.find_element(By.XPATH, "//button[normalize-space()='Sign out everyone']").click()
    browser.switch_to.alert.accept()
    wait.until(EC.url_contains("/admin/login"))
    assert admin_get(base, other)[0] == 303
    assert db.q("SELECT session = '*', operator FROM herald.admin_signouts ORDER BY 1") == [
        (False, OPERATOR), (True, OPERATOR)]
    assert admin_get(base, http_sign_in(public, "Otto Other"))[0] == 200


VERSIONED = {
    "name": "Versioned journey", "trigger": {"event": "joined"}, "start": "hello",
    "nodes": {
        "hello": {"type": "email", "template": "welcome", "next": "wait"},
        "wait": {"type": "delay", "duration": "1 hour", "next": "done"},
        "done": {"type": "exit"},
    },
}


def drawn_figures(browser):
    """node → {figure label: number} as drawn on the automation's diagram. Read in one script: the
    page's live updates may replace the figures between two WebDriver calls."""
    drawn = browser.execute_script("""
        const out = {};
        for (const node of document.querySelectorAll('svg.diagram g.node')) {
            const figures = {};
            for (const f of node.querySelectorAll('tspan.figure')) {
                figures[f.getAttribute('data-count')] = f.textContent;
            }
            out[node.getAttribute('data-node')] = figures;
        }
        return out;""")
    return {node: {label: number(text) for label, text in figures.items()} for node, figures in drawn.items()}


def test_passed_and_now_per_version(db, smtp, sidecar, browser):
    """Contacts on version 1 and on version 2 of one automation: each node shows, per version, how many
    are on it now and how many passed it, and both agree with the step log of each version's enrollments."""
    db.q("SELECT herald.upsert_template('acme', 'welcome', 'Welcome', '<p>Hello</p>')")
    db.q("SELECT herald.upsert_template('acme', 'welcome-b', 'Welcome!', '<p>Hello there</p>')")
    automation = db.one("SELECT herald.create_automation('acme', %s::jsonb)", json.dumps(VERSIONED))
    db.q("SELECT herald.set_automation_status(%s, 'live')", automation)
    port = __import__("conftest").free_port()
    base = f"http://127.0.0.1:{port}/admin"
    sidecar(HERALD_HTTP_ADDR=f"127.0.0.1:{port}", HERALD_PUBLIC_URL=f"http://127.0.0.1:{port}",
            HERALD_LINK_SECRET=LINK_SECRET, HERALD_ADMIN_PASSWORD=PASSWORD)
    wait_http(port)

    def parked(n):
        # a delay parks the contact on the node after it, due when the delay ends
        wait_until(lambda: db.one("SELECT count(*) FROM herald.enrollments WHERE automation_id = %s "
                                  "AND current_node = 'done' AND next_run_at > now()", automation) == n,
                   timeout=60, what=f"{n} contacts to be delayed")

    for i in range(4):
        db.q("SELECT herald.track('acme', %s, 'joined', '{}')", f"early{i}@example.com")
    parked(4)
    v2 = json.loads(json.dumps(VERSIONED))
    v2["nodes"]["hello"]["template"] = "welcome-b"
    db.q("SELECT herald.update_automation(%s, %s::jsonb, '{\"note\": \"new welcome\"}')", automation, json.dumps(v2))
    for i in range(3):
        db.q("SELECT herald.track('acme', %s, 'joined', '{}')", f"late{i}@example.com")
    parked(7)
    db.q("SELECT herald.flush_stats()")

    # what the database says, from the step log and each enrollment's version (not from the stats)
    passed = {(node, version): n for node, version, n in db.q(
        """SELECT h.node, coalesce((e.event ->> 'version')::int, 1), count(DISTINCT e.id)
             FROM herald.step_history h JOIN herald.enrollments e ON e.id = h.enrollment_id
            WHERE h.automation_id = %s GROUP BY 1, 2""", automation)}
    assert passed[("hello", 1)] == 4 and passed[("hello", 2)] == 3, passed

    browser.get(f"{base}/login")
    browser.find_element(By.ID, "name").send_keys(OPERATOR)
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
    WebDriverWait(browser, 20).until(EC.url_to_be(base))

    def shown():
        browser.get(f"{base}/automations/{automation}")
        return drawn_figures(browser)

    # the page's figures are cached for a moment: wait for the ones read after the second version
    wait_until(lambda: shown()["hello"].get("v2 passed") == 3, timeout=30, what="v2's figures on the page")
    drawn = shown()
    for node in ["hello", "wait"]:
        assert drawn[node]["passed"] == passed[(node, 1)] + passed[(node, 2)], (node, drawn[node])
        for version in (1, 2):
            assert drawn[node][f"v{version} passed"] == passed[(node, version)], (node, version, drawn[node])
            assert drawn[node][f"v{version} now"] == 0, (node, drawn[node])
    # the delayed contacts are on done, each on its version; none has entered it yet
    assert (drawn["done"]["v1 now"], drawn["done"]["v2 now"]) == (4, 3), drawn["done"]
    assert (drawn["done"]["v1 passed"], drawn["done"]["v2 passed"]) == (0, 0), drawn["done"]
    screenshot(browser, "automation-versions")

#!/usr/bin/env bash
# End-to-end: the `herald` binary as a process against the real Postgres with the extension installed.
# Runs the demo, then checks what `herald status`, the database and the file mailbox say against what the
# demo did.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=./target/release/herald
fail() { echo "e2e: FAIL: $*" >&2; exit 1; }

out=$("$bin" demo)
echo "$out" | grep -q "inserted 1000, updated 0, rejected 2" || fail "demo import counts: $out"
echo "$out" | grep -q "a broken definition is refused: invalid automation definition: \$.nodes.a.template" \
    || fail "broken automation not refused"

status=$(DATABASE_URL="host=/var/run/postgresql dbname=herald_demo user=$(id -un)" "$bin" status)
line=$(echo "$status" | awk '$1 == "acme"')
[ -n "$line" ] || fail "no acme line in status: $status"
read -r _ contacts events live active waiting completed exited failed <<<"$line"

q() { psql -X -qtA -d herald_demo -c "$1"; }
# 1000 imported + 1 created on the fly by a plain INSERT; 334 ad signups + that newcomer; 1 upgrade
[ "$contacts" = 1001 ] || fail "contacts $contacts"
[ "$live" = 2 ] || fail "live automations $live"
# after tick + delivery: 335 welcome journeys wait on their 2-day delay, the upgrade journey completed
[ "$active" = 335 ] || fail "active enrollments $active"
[ "$completed" = 1 ] || fail "completed enrollments $completed"
# every queued message is in the file mailbox exactly once, addressed to an enrolled contact
n=$(ls demo-mailbox/*.eml | wc -l)
[ "$n" = 336 ] || fail "$n messages in demo-mailbox, expected 336"
[ "$(grep -h '^Message-ID:' demo-mailbox/*.eml | sort -u | wc -l)" = 336 ] || fail "duplicate Message-IDs"
[ "$(q "SELECT count(*) FROM herald.outbox WHERE status = 'done'")" = 336 ] || fail "not every job is done"
grep -l '^To: person3@example.com' demo-mailbox/*.eml >/dev/null || fail "person3 (an ads signup) got no welcome"
grep -q '^Subject: Welcome, Person 3!' $(grep -l '^To: person3@example.com' demo-mailbox/*.eml) || fail "subject not personalised"
[ "$events" = "$(q 'SELECT count(*) FROM herald.events')" ] || fail "events $events"
[ "$(q "SELECT count(*) FROM herald.enrollments e JOIN herald.contacts c ON c.id = e.contact_id
        WHERE c.attributes->>'plan' IS DISTINCT FROM 'pro' AND e.automation_id = 2")" = 0 ] \
    || fail "the upgrade automation enrolled a contact whose plan is not pro"
[ "$(q "SELECT count(*) - count(DISTINCT (automation_id, contact_id)) FROM herald.enrollments WHERE automation_id = 1")" = 0 ] \
    || fail "re-entry once was violated"
# herald import: a CSV streamed in chunks of 2; bad rows are reported with their line, the rest lands
csv=$(mktemp --suffix=.csv)
trap 'rm -f "$csv"' EXIT
cat >"$csv" <<'CSV'
email,first_name,plan,timezone
Imported1@Example.com,Ima,pro,Europe/Paris
imported2@example.com,Ian,,
not-an-email,Nope,free,
person1@example.com,,team,
imported3@example.com,Ivy,free,Mars/Base
CSV
out=$(DATABASE_URL="host=/var/run/postgresql dbname=herald_demo user=$(id -un)" "$bin" import "$csv" --workspace acme --chunk 2 2>/dev/null)
echo "$out" | grep -q "imported 5 rows into workspace acme: 2 inserted, 1 updated, 2 rejected" || fail "import summary: $out"
echo "$out" | grep -q 'line 4: email "not-an-email" is not a valid address' || fail "import line 4: $out"
echo "$out" | grep -q 'line 6: timezone "Mars/Base" is not an IANA' || fail "import line 6: $out"
[ "$(q "SELECT attributes->>'plan' || '/' || timezone FROM herald.contacts WHERE email = 'imported1@example.com'")" = "pro/Europe/Paris" ] \
    || fail "imported attributes"
[ "$(q "SELECT attributes->>'plan' || '/' || (attributes->>'first_name') FROM herald.contacts WHERE email = 'person1@example.com'")" = "team/Person 1" ] \
    || fail "import must merge attributes and leave empty cells alone"
DATABASE_URL="host=/var/run/postgresql dbname=herald_demo user=$(id -un)" "$bin" import "$csv" --workspace nope >/dev/null 2>&1 \
    && fail "import into an unknown workspace succeeded"

echo "e2e: ok (demo + status: $contacts contacts, $events events, $active active enrollments, $n messages delivered, import)"

#!/usr/bin/env bash
# End-to-end: the `herald` binary as a process against the real Postgres with the extension installed.
# Runs the demo, then checks what `herald status` and the database say against what the demo did.
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
[ "$active" = 336 ] || fail "active enrollments $active"
[ "$events" = "$(q 'SELECT count(*) FROM herald.events')" ] || fail "events $events"
[ "$(q "SELECT count(*) FROM herald.enrollments e JOIN herald.contacts c ON c.id = e.contact_id
        WHERE c.attributes->>'plan' IS DISTINCT FROM 'pro' AND e.automation_id = 2")" = 0 ] \
    || fail "the upgrade automation enrolled a contact whose plan is not pro"
[ "$(q "SELECT count(*) - count(DISTINCT (automation_id, contact_id)) FROM herald.enrollments WHERE automation_id = 1")" = 0 ] \
    || fail "re-entry once was violated"
echo "e2e: ok (demo + status: $contacts contacts, $events events, $active active enrollments)"

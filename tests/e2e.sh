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

export DATABASE_URL="host=/var/run/postgresql dbname=herald_demo user=$(id -un)"
status=$("$bin" status)
# the first table: workspaces (the broadcasts section has acme lines too)
line=$(echo "$status" | awk '$1 == "acme"' | head -1)
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
csv2=$(mktemp --suffix=.csv)
trap 'rm -f "$csv" "$csv2"' EXIT
cat >"$csv" <<'CSV'
email,first_name,plan,timezone
Imported1@Example.com,Ima,pro,Europe/Paris
imported2@example.com,Ian,,
not-an-email,Nope,free,
person1@example.com,,team,
imported3@example.com,Ivy,free,Mars/Base
CSV
out=$("$bin" import "$csv" --workspace acme --chunk 2 2>/dev/null)
echo "$out" | grep -q "imported 5 rows into workspace acme: 2 inserted, 1 updated, 2 rejected" || fail "import summary: $out"
echo "$out" | grep -q 'line 4: email "not-an-email" is not a valid address' || fail "import line 4: $out"
echo "$out" | grep -q 'line 6: timezone "Mars/Base" is not an IANA' || fail "import line 6: $out"
[ "$(q "SELECT attributes->>'plan' || '/' || timezone FROM herald.contacts WHERE email = 'imported1@example.com'")" = "pro/Europe/Paris" ] \
    || fail "imported attributes"
[ "$(q "SELECT attributes->>'plan' || '/' || (attributes->>'first_name') FROM herald.contacts WHERE email = 'person1@example.com'")" = "team/Person 1" ] \
    || fail "import must merge attributes and leave empty cells alone"
"$bin" import "$csv" --workspace nope >/dev/null 2>&1 && fail "import into an unknown workspace succeeded"

# herald import, what a spreadsheet export brings: a BOM, `Email`/`First_Name` headers, `;` as delimiter,
# an empty line (line numbers count it), a ragged row (rejected, the run goes on), a duplicate email (the
# last one wins, the first is rejected naming the line that won), a quoted cell over two lines
printf '\xef\xbb\xbfEmail;First_Name;Plan\ndup@example.com;Dee;free\n\nragged@example.com;Rae\nDup@Example.com;Dee;pro\n"fresh@example.com";"Fay\nF.";team\nlate@example.com;Lee;free\n' >"$csv2"
snapshot() { q "SELECT (SELECT count(*) || '/' || md5(string_agg(email || attributes::text || coalesce(timezone, ''), ',' ORDER BY id)) FROM herald.contacts)
                    || ' ' || (SELECT count(*) FROM herald.events) || ' ' || (SELECT count(*) FROM herald.contact_rejections)
                    || ' ' || (SELECT count(*) FROM herald.enrollments)"; }
before=$(snapshot)
out=$("$bin" import "$csv2" --workspace acme --delimiter ';' --chunk 2 --dry-run 2>/dev/null) || fail "dry run: $out"
echo "$out" | grep -q "dry run, nothing written: 5 rows for workspace acme would be 3 inserted, 0 updated, 2 rejected" \
    || fail "dry-run summary: $out"
[ "$(snapshot)" = "$before" ] || fail "--dry-run changed the database: $before -> $(snapshot)"
out=$("$bin" import "$csv2" --workspace acme --delimiter ';' --chunk 2 2>/dev/null) || fail "import: $out"
echo "$out" | grep -q "imported 5 rows into workspace acme: 3 inserted, 0 updated, 2 rejected" || fail "import summary: $out"
echo "$out" | grep -q 'line 2: duplicate of line 5 (dup@example.com), which is imported instead' || fail "duplicate: $out"
echo "$out" | grep -q 'line 4: has 2 fields, the header has 3' || fail "ragged row: $out"
[ "$(q "SELECT attributes::text FROM herald.contacts WHERE email = 'dup@example.com'")" = '{"plan": "pro", "first_name": "Dee"}' ] \
    || fail "the last duplicate must win, with lower-cased attribute names"
[ "$(q "SELECT attributes->>'first_name' FROM herald.contacts WHERE email = 'fresh@example.com'")" = "Fay
F." ] && [ "$(q "SELECT count(*) FROM herald.contacts WHERE email = 'late@example.com'")" = 1 ] \
    || fail "rows after the ragged row and the quoted newline were not imported"
[ "$(q "SELECT count(*) FROM herald.contacts WHERE email = 'ragged@example.com'")" = 0 ] || fail "ragged row imported"
[ "$(q "SELECT count(*) FROM herald.contacts c, jsonb_object_keys(c.attributes) k
        WHERE c.email IN ('dup@example.com', 'fresh@example.com', 'late@example.com') AND k NOT IN ('first_name', 'plan')")" = 0 ] \
    || fail "an attribute name kept its case, or the email (with a BOM) became an attribute"
# two columns with one name after normalisation: refused before anything is written
printf 'email,Plan, plan\nnew9@example.com,a,b\n' >"$csv2"
before=$(snapshot)
out=$("$bin" import "$csv2" --workspace acme 2>&1) && fail "duplicate header accepted: $out"
echo "$out" | grep -q 'columns 2 and 3 of the CSV header are both named "plan"' || fail "duplicate header message: $out"
[ "$(snapshot)" = "$before" ] || fail "a refused header wrote something"

# the run stops half-way (here a trigger fails the third chunk): the summary says what is in, exit 1
q "CREATE FUNCTION public.e2e_boom() RETURNS trigger LANGUAGE plpgsql AS \$\$ BEGIN
     IF NEW.email = 'boom@example.com' THEN RAISE EXCEPTION 'e2e: boom'; END IF; RETURN NEW; END \$\$;
   CREATE TRIGGER e2e_boom BEFORE INSERT ON herald.contacts FOR EACH ROW EXECUTE FUNCTION public.e2e_boom()"
printf 'email\nstop1@example.com\nstop2@example.com\n\nstop3@example.com\nstop4@example.com\nboom@example.com\nstop6@example.com\n' >"$csv2"
out=$("$bin" import "$csv2" --workspace acme --chunk 2 2>&1) && fail "an import whose chunk failed exited 0: $out"
echo "$out" | grep -q "import stopped: 4 of 6 rows done (lines up to 6 are in, none after): 4 inserted, 0 updated, 0 rejected" \
    || fail "stopped import summary: $out"
echo "$out" | grep -q "stopped after line 6: upsert_contacts of lines 7–8: .*e2e: boom" || fail "stopped import error: $out"
[ "$(q "SELECT count(*) FROM herald.contacts WHERE email LIKE 'stop%@example.com'")" = 4 ] || fail "stopped import: rows in"
q "DROP TRIGGER e2e_boom ON herald.contacts; DROP FUNCTION public.e2e_boom()"

# herald automations / broadcasts / status: what the demo made, and a broadcast half-way
out=$("$bin" automations --workspace acme)
echo "$out" | grep -Eq '^ *1 +acme +Welcome series +live +signup +335 +0 +0 +0 +0$' || fail "automations: $out"
echo "$out" | grep -Eq '^ *2 +acme +Upgrade thanks +live +plan.upgraded +0 +0 +1 +0 +0$' || fail "automations: $out"
[ "$("$bin" automations --json | jq -r '[.[] | select(.workspace == "acme")] | map(.active) | add')" = 335 ] \
    || fail "automations --json"
"$bin" broadcasts --workspace nope >/dev/null 2>&1 && fail "broadcasts of an unknown workspace"
echo "$("$bin" broadcasts)" | grep -q 'no broadcasts' || fail "no broadcasts yet"
bid=$(q "SELECT herald.create_broadcast('acme', '{\"name\": \"E2E news\", \"variations\": [{\"key\": \"a\", \"template\": \"welcome\"}],
          \"audience\": {\"segment\": {\"field\": \"contact.email\", \"op\": \"in\", \"value\": [\"person1@example.com\", \"person2@example.com\"]}}}')")
q "SELECT herald.create_broadcast('acme', '{\"name\": \"Draft\", \"variations\": [{\"key\": \"a\", \"template\": \"welcome\"}],
     \"audience\": {\"segment\": {\"field\": \"contact.email\", \"op\": \"eq\", \"value\": \"person1@example.com\"}}}')" >/dev/null
q "SELECT herald.schedule_broadcast($bid)" >/dev/null
q "SELECT herald.advance_broadcasts(1000)" >/dev/null
# one of its two jobs sent (nothing else is pending after the demo)
[ "$(q "SELECT herald.complete(jsonb_agg(jsonb_build_object('id', j.id, 'ok', true))) FROM herald.claim('e2e', 1) j")" = 1 ] \
    || fail "claiming a broadcast job"
out=$("$bin" broadcasts --workspace acme)
echo "$out" | grep -Eq "^ *$bid +acme +E2E news +sending +done +2 +1 +0 +50.0%$" || fail "broadcasts: $out"
echo "$out" | grep -Eq "^ *$((bid + 1)) +acme +Draft +draft +all +0 +0 +0 +-$" || fail "broadcasts (draft): $out"
[ "$("$bin" broadcasts --json | jq -r ".[] | select(.id == $bid) | .progress_percent")" = 50 ] || fail "broadcasts --json"
status=$("$bin" status)
echo "$status" | grep -Eq '^acme +1 +0 +1 +0 +0 +0$' || fail "status broadcasts by status: $status"
echo "$status" | grep -Eq "^ *$bid +acme +E2E news +sending +done +2 +1 +0 +50.0%$" || fail "status in-flight broadcasts: $status"

# an archived broadcast (herald.archive_broadcast) is listed only with --all, marked
q "SELECT herald.archive_broadcast($((bid + 1)))" >/dev/null
"$bin" broadcasts --workspace acme | grep -q 'Draft' && fail "an archived broadcast is listed without --all"
out=$("$bin" broadcasts --workspace acme --all)
echo "$out" | grep -Eq "^ *$((bid + 1)) +acme +Draft +draft \(archived\) +all +0 +0 +0 +-$" || fail "broadcasts --all: $out"

echo "e2e: ok (demo + status: $contacts contacts, $events events, $active active enrollments, $n messages delivered, import, automations, broadcasts)"

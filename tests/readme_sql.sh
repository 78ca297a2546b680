#!/usr/bin/env bash
# Every ```sql block of the README runs, in order, in a fresh database: the examples people copy work as
# written. Roles a block creates are cluster-wide, so they are dropped again at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
db=herald_readme${TEST_TAG:+_$TEST_TAG}
sql() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -tA -d "$1" -c "$2"; }
script=$(mktemp --suffix=.sql)
roles=""
cleanup() {
    rm -f "$script"
    for r in $roles; do sql postgres "DROP ROLE IF EXISTS $r" || true; done
    sql postgres "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
}
trap cleanup EXIT
awk '/^```sql/{f=1; n++; printf "\\echo README sql block %d (line %d)\n", n, NR; next} /^```/{f=0} f' README.md >"$script"
roles=$(grep -oE 'CREATE ROLE [a-z_]+' "$script" | awk '{print $3}' | sort -u | tr '\n' ' ')
for r in $roles; do sql postgres "DROP ROLE IF EXISTS $r"; done
sql postgres "DROP DATABASE IF EXISTS $db WITH (FORCE)"
sql postgres "CREATE DATABASE $db TEMPLATE template0"
n=$(grep -c '^\\echo README sql block' "$script")
psql -X -q -v ON_ERROR_STOP=1 -d "$db" -f "$script" >/dev/null || { echo "readme-sql: FAIL (the block echoed last above)" >&2; exit 1; }
echo "readme-sql: ok ($n SQL blocks of README.md ran as written)"

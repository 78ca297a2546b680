#!/usr/bin/env bash
# Upgrade = fresh install, with the data kept. For every earlier release whose install script is kept
# in sql/releases/ (herald--X.sql, never edited once released):
#   1. install release X, fill it with the mid-flight fixture (tests/fixtures/midflight.sql), checksum
#      every table and sequence (tests/fixtures/table_checksums.sql);
#   2. ALTER EXTENSION herald UPDATE: the upgrade scripts sql/herald--A--B.sql take it to the current
#      release (a missing step fails here: "no update path");
#   3. every row is still there (same checksums) and the catalog (tables, columns, indexes, functions
#      and their bodies, triggers, policies, grants, what pg_dump carries) equals a fresh install's
#      (tests/upgrade/catalog.sql): an SQL change without its upgrade script fails here;
#   4. the pg_regress suites pass in a database that reached the current release by upgrading.
# A file herald--X+COMMIT.sql is SQL that landed from COMMIT while still labelled X (release X itself is
# herald--X.sql): it is installed as version 'X+COMMIT', relabelled X, and must upgrade like X does.
# And: the extension dumps every table and sequence it owns, and a kept release script of the current
# version (once it is released) still equals what the build generates.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PGBIN=$($PG_CONFIG --bindir)
EXTDIR=$($PG_CONFIG --sharedir)/extension
PG_REGRESS=$($PG_CONFIG --pkglibdir)/pgxs/src/test/regress/pg_regress
TAG=${TEST_TAG:+_$TEST_TAG}
OUT=target/upgrade$TAG
mkdir -p "$OUT"

fail() { echo "upgrade-check: FAIL: $*" >&2; exit 1; }
sql() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -tA -d "$1" -c "$2"; }
recreate() {
    sql postgres "DROP DATABASE IF EXISTS \"$1\" WITH (FORCE)"
    sql postgres "CREATE DATABASE \"$1\" TEMPLATE template0"
}
catalog() { psql -X -q -v ON_ERROR_STOP=1 -d "$1" -f tests/upgrade/catalog.sql >"$2"; }
checksums() { psql -X -q -v ON_ERROR_STOP=1 -tA -d "$1" -f tests/fixtures/table_checksums.sql >"$2"; }

# installs kept script $2 into database $1 and labels it $3, as a database installed from it reports
install_as() {
    sql "$1" "CREATE EXTENSION herald VERSION '$2'"
    [ "$2" = "$3" ] || sql "$1" "UPDATE pg_catalog.pg_extension SET extversion = '$3' WHERE extname = 'herald'"
}

current=$(sql postgres "SELECT default_version FROM pg_available_extensions WHERE name = 'herald'")
[ -n "$current" ] || fail "herald is not installed (make install)"

# A release, once kept, is immutable: the generated script of the current version must match it.
if [ -f "sql/releases/herald--$current.sql" ]; then
    diff <(tail -n +3 "sql/releases/herald--$current.sql") "$EXTDIR/herald--$current.sql" >"$OUT/release.diff" \
        || fail "the SQL of released version $current changed (see $OUT/release.diff): bump the version in Cargo.toml and ship an upgrade script"
fi

fresh=herald_upgrade_fresh$TAG
recreate "$fresh"
sql "$fresh" "CREATE EXTENSION herald"
catalog "$fresh" "$OUT/fresh.catalog"

# pg_dump carries every table and sequence herald owns (the rest of a backup is checked by
# tests/sidecar/test_backup_restore.py)
missing=$(sql "$fresh" "
    SELECT string_agg(c.oid::regclass::text, ', ' ORDER BY c.relname)
      FROM pg_depend d JOIN pg_class c ON c.oid = d.objid AND d.classid = 'pg_class'::regclass
      JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'herald'
     WHERE d.deptype = 'e' AND c.relkind IN ('r', 'p', 'S')
       AND c.oid <> ALL (e.extconfig)")
[ -z "$missing" ] || fail "not registered with pg_extension_config_dump, so left out of every backup: $missing"

upgraded=0
for release in sql/releases/herald--*.sql; do
    from=$(basename "$release" .sql); from=${from#herald--}
    [ "$from" = "$current" ] && continue
    label=${from%%+*}   # the extversion such a database reports
    db=herald_upgrade_from_${from//[.+]/_}$TAG
    echo "upgrade-check: $from -> $current"
    # the kept script of release X, installed beside the current ones (make install copies them too)
    [ -f "$EXTDIR/herald--$from.sql" ] || fail "$EXTDIR/herald--$from.sql is missing (make install copies sql/releases/)"

    recreate "$db"
    install_as "$db" "$from" "$label"
    psql -X -q -v ON_ERROR_STOP=1 -d "$db" -f tests/fixtures/midflight.sql >"$OUT/midflight-$from.log" 2>&1 \
        || { cat "$OUT/midflight-$from.log" >&2; fail "the mid-flight fixture does not load into release $from"; }
    checksums "$db" "$OUT/before-$from.sums"

    sql "$db" "ALTER EXTENSION herald UPDATE" || fail "ALTER EXTENSION herald UPDATE from $from failed"
    [ "$(sql "$db" "SELECT extversion FROM pg_extension WHERE extname = 'herald'")" = "$current" ] \
        || fail "$from did not reach $current"

    checksums "$db" "$OUT/after-$from.sums"
    # every table and sequence of the old release holds exactly what it held (new tables may appear;
    # a release that adds a column must compare the old columns here instead of whole rows)
    comm -23 <(sort "$OUT/before-$from.sums") <(sort "$OUT/after-$from.sums") >"$OUT/data-$from.diff"
    [ ! -s "$OUT/data-$from.diff" ] \
        || { cat "$OUT/data-$from.diff" >&2; fail "upgrading from $from changed or lost rows in the tables above"; }
    catalog "$db" "$OUT/upgraded-$from.catalog"
    diff "$OUT/fresh.catalog" "$OUT/upgraded-$from.catalog" >"$OUT/catalog-$from.diff" \
        || { head -60 "$OUT/catalog-$from.diff" >&2; fail "$from upgraded differs from a fresh install of $current (< fresh, > upgraded; full diff in $OUT/catalog-$from.diff)"; }
    # the upgraded database still works: the data of the fixture moves on
    sql "$db" "SELECT herald.tick(10000); SELECT herald.flush_stats(); SELECT count(*) FROM herald.claim('upgrade-check', 10)" >/dev/null \
        || fail "tick/flush_stats/claim fail after upgrading from $from"

    # the regression suites, in a database that got here by upgrading (pg_regress --use-existing does
    # not create it, so it gets the settings pg_regress would give a database it creates)
    rdb=herald_regress_from_${from//[.+]/_}$TAG
    recreate "$rdb"
    install_as "$rdb" "$from" "$label"
    sql "$rdb" "ALTER EXTENSION herald UPDATE"
    sql postgres "ALTER DATABASE \"$rdb\" SET lc_messages TO 'C'; ALTER DATABASE \"$rdb\" SET lc_monetary TO 'C';
                  ALTER DATABASE \"$rdb\" SET lc_numeric TO 'C'; ALTER DATABASE \"$rdb\" SET lc_time TO 'C';
                  ALTER DATABASE \"$rdb\" SET bytea_output TO 'hex';
                  ALTER DATABASE \"$rdb\" SET timezone_abbreviations TO 'Default'"
    regress=$(ls pgrx-tests/sql/*.sql | xargs -n1 basename | sed 's/\.sql$//' | sort)
    mkdir -p "$OUT/regress-$from"
    # shellcheck disable=SC2086
    "$PG_REGRESS" --bindir="$PGBIN" --inputdir=pgrx-tests --outputdir="$OUT/regress-$from" \
        --use-existing --dbname="$rdb" $regress >"$OUT/regress-$from.log" 2>&1 \
        || { cat "$OUT/regress-$from.log" "$OUT/regress-$from/regression.diffs" >&2 || true;
             fail "the regression suites fail in a database upgraded from $from"; }

    sql postgres "DROP DATABASE \"$db\" WITH (FORCE)"
    sql postgres "DROP DATABASE \"$rdb\" WITH (FORCE)"
    upgraded=$((upgraded + 1))
done
sql postgres "DROP DATABASE \"$fresh\" WITH (FORCE)"
echo "upgrade-check: ok ($upgraded earlier release(s) upgraded to $current: rows kept, catalog equal to a fresh install, regression suites pass)"

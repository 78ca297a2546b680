#!/usr/bin/env bash
# make scaling-check: the invariants docs/SCALING.md relies on, against a fresh database with herald.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! python3 -c 'import pglast, psycopg' 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        -r tests/sidecar/requirements.txt
fi
db="herald_scaling${TEST_TAG:+_$TEST_TAG}"
PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
psql -X -q -v ON_ERROR_STOP=1 -d "$db" -c "CREATE EXTENSION herald"
python3 tests/scaling/check.py "$db"
psql -X -q -d postgres -c "DROP DATABASE $db"

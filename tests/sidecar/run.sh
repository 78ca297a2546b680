#!/usr/bin/env bash
# End-to-end tests of `herald run` against real SMTP and HTTP servers on loopback (see conftest.py).
# Needs the extension installed (make install) and the binary built (cargo build --release -p herald-sidecar).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! python3 -c 'import pytest, aiosmtpd, psycopg, cryptography, selenium, pglast' 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        -r tests/sidecar/requirements.txt
fi
export HERALD_BIN="${HERALD_BIN:-$PWD/target/release/herald}"
[ -x "$HERALD_BIN" ] || { echo "sidecar tests: $HERALD_BIN is missing; run cargo build --release -p herald-sidecar" >&2; exit 1; }
exec python3 -m pytest -q -p no:cacheprovider tests/sidecar "$@"

#!/usr/bin/env bash
# Brings a Debian machine to the state herald's make targets need. Idempotent and non-interactive:
# each step checks first and does nothing when it is already done.
#
#   Debian packages  Postgres 15 server + headers, libclang (bindgen), postfix (smtp-sink), PgQ,
#                    DejaVu Sans (the text of the soak's chart)
#   cargo-pgrx       the pinned version, registered against the system pg_config
#   Postgres         cluster 15/main running, pg_stat_statements loaded, a superuser role for $USER
#
# Clients authenticate over the local socket with peer auth as the OS user that runs make (root in CI).
set -euo pipefail

PGRX_VERSION=0.18.1
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PACKAGES=(postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev postfix postgresql-15-pgq3 wrk sudo chromium chromium-driver fonts-dejavu-core)

log() { printf 'setup: %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -q >/dev/null
    # postfix asks questions unless told not to; we only need its smtp-sink/smtp-source tools.
    echo "postfix postfix/main_mailer_type select No configuration" | as_root debconf-set-selections
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q "${missing[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    log "installing cargo-pgrx $PGRX_VERSION (takes a few minutes, once)"
    cargo install --locked cargo-pgrx --version "$PGRX_VERSION"
fi
if ! grep -qs '^pg15' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    log "registering the system Postgres 15 with pgrx"
    cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
fi

if ! pg_lsclusters -h 2>/dev/null | grep -q '^15 *main'; then
    log "creating cluster 15/main"
    as_root pg_createcluster 15 main >/dev/null
fi

psql_admin() { as_root runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -tA "$@"; }

if ! pg_lsclusters -h | grep -q '^15 *main .*online'; then
    log "starting cluster 15/main"
    as_root pg_ctlcluster 15 main start
fi

# pg_stat_statements counts statements per tick batch in the benchmark.
if [ "$(psql_admin -c 'SHOW shared_preload_libraries')" != "pg_stat_statements" ]; then
    log "loading pg_stat_statements (restarts the cluster)"
    psql_admin -c "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'"
    as_root pg_ctlcluster 15 main restart
fi

me=$(id -un)
if [ "$(psql_admin -c "SELECT count(*) FROM pg_roles WHERE rolname = '$me'")" = 0 ]; then
    log "creating database role $me (superuser, peer auth over the local socket)"
    psql_admin -c "CREATE ROLE \"$me\" SUPERUSER LOGIN"
fi
if [ "$(psql_admin -c "SELECT count(*) FROM pg_database WHERE datname = '$me'")" = 0 ]; then
    psql_admin -c "CREATE DATABASE \"$me\" OWNER \"$me\""
fi

#!/usr/bin/env bash
# Email delivery throughput: `herald run` draining N queued emails into postfix's smtp-sink, next to
# postfix's smtp-source pushing N messages of about the same size into the same sink (20 sessions).
# Usage: tests/bench_delivery.sh [emails] (default 10000). Prints msgs/s and the ratio; asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000}
db=herald_bench_delivery
bin=./target/release/herald
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
sink_pid=; run_pid=
cleanup() { [ -n "$run_pid" ] && kill "$run_pid" 2>/dev/null; [ -n "$sink_pid" ] && kill "$sink_pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
/usr/sbin/smtp-sink -u nobody "127.0.0.1:$port" 1000 &
sink_pid=$!
sleep 0.3

psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" 2>/dev/null
psql -X -q -d $db -v ON_ERROR_STOP=1 <<SQL >/dev/null
CREATE EXTENSION herald;
SELECT herald.create_workspace('bench');
SELECT herald.upsert_template('bench', 'news', 'News for {{ contact.email }}',
  '<p>Hello {{ contact.email }}, here is the news.</p>', 'Hello {{ contact.email }}, here is the news.');
SELECT count(herald.send('bench', 'r' || i || '@example.com', 'news')) FROM generate_series(1, $n) i;
SQL
done_count() { psql -X -qtA -d $db -c "SELECT count(*) FROM herald.outbox WHERE status = 'done'"; }

start=$(date +%s.%N)
DATABASE_URL="host=/var/run/postgresql dbname=$db user=$(id -un)" HERALD_SMTP_URL_DEFAULT="smtp://127.0.0.1:$port?tls=none&pool=32" \
  HERALD_CONCURRENCY=128 HERALD_FROM="Bench <bench@example.com>" NO_COLOR=1 "$bin" run >"$dir/run.log" 2>&1 &
run_pid=$!
while [ "$(done_count)" -lt "$n" ]; do
    kill -0 "$run_pid" 2>/dev/null || { cat "$dir/run.log" >&2; echo "herald run died" >&2; exit 1; }
    sleep 0.05
done
herald_secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
kill -TERM "$run_pid"; wait "$run_pid" || true; run_pid=

start=$(date +%s.%N)
/usr/sbin/smtp-source -s 20 -m "$n" -l 600 -f bench@example.com -t r@example.com "127.0.0.1:$port" >/dev/null
source_secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')

awk -v n="$n" -v h="$herald_secs" -v s="$source_secs" 'BEGIN {
  printf "email delivery, %d messages into postfix smtp-sink on loopback\n", n
  printf "  herald run (queue -> render -> SMTP -> complete)  %8.0f msgs/s  (%.2f s)\n", n / h, h
  printf "  smtp-source, 20 sessions                          %8.0f msgs/s  (%.2f s)\n", n / s, s
  printf "  herald / smtp-source = %.2f (goal >= 0.70: %s)\n", s / h, (s / h >= 0.7 ? "PASS" : "MISS")
}'
psql -X -q -d postgres -c "DROP DATABASE $db"

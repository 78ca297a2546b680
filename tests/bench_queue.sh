#!/usr/bin/env bash
# Queue throughput, herald vs two textbook queues, measured with pgbench in one database and run:
#   herald        claim(100) + complete(100 ok results) per transaction: leases, history, stats, fairness,
#                 rate-limit check
#   single-row    DELETE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED LIMIT 1), one job per transaction
#   batched       lease 100 with SKIP LOCKED, delete them, per transaction (no bookkeeping)
# Usage: tests/bench_queue.sh [jobs]   (default 20000). Prints jobs/s and ratios; asserts nothing.
set -euo pipefail
jobs=${1:-20000}
db=herald_bench_queue
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
psql -X -q -d $db -v ON_ERROR_STOP=1 <<SQL
CREATE EXTENSION herald;
SELECT count(herald.create_workspace('w' || i)) AS workspaces FROM generate_series(1, 10) i \g /dev/null
INSERT INTO herald.outbox (workspace_id, kind, dedupe_key, payload)
SELECT 'w' || (i % 10 + 1), 'webhook', 'j' || i, '{"url": "https://x.example/h"}' FROM generate_series(1, $jobs) i;
CREATE SCHEMA bench_q;
CREATE TABLE bench_q.single (id bigserial PRIMARY KEY, payload jsonb);
INSERT INTO bench_q.single (payload) SELECT '{"url": "https://x.example/h"}' FROM generate_series(1, $jobs);
CREATE TABLE bench_q.batch (id bigserial PRIMARY KEY, payload jsonb, leased_until timestamptz);
INSERT INTO bench_q.batch (payload) SELECT '{"url": "https://x.example/h"}' FROM generate_series(1, $jobs);
VACUUM ANALYZE;
SQL
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
echo "SELECT herald.complete(coalesce(jsonb_agg(jsonb_build_object('id', j.id, 'ok', true)), '[]')) FROM herald.claim('bench', 100) j;" >"$dir/herald.sql"
echo "DELETE FROM bench_q.single WHERE id = (SELECT id FROM bench_q.single ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1);" >"$dir/single.sql"
echo "WITH c AS (SELECT id FROM bench_q.batch ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 100) DELETE FROM bench_q.batch b USING c WHERE b.id = c.id;" >"$dir/batch.sql"
tps() { pgbench -n -c 1 -t "$2" -f "$dir/$1.sql" $db 2>/dev/null | awk '/^tps/ {print $3}'; }
herald=$(tps herald $((jobs / 100)))
single=$(tps single "$jobs")
batch=$(tps batch $((jobs / 100)))
left=$(psql -X -qtA -d $db -c "SELECT count(*) FROM herald.outbox WHERE status <> 'done'")
awk -v h="$herald" -v s="$single" -v b="$batch" -v n="$jobs" -v left="$left" 'BEGIN {
  printf "queue throughput, %d jobs, one client\n", n
  printf "  herald claim(100)+complete(100)   %9.0f jobs/s\n", h * 100
  printf "  single-row SKIP LOCKED + delete   %9.0f jobs/s   herald = %.1fx  (goal >= 10x: %s)\n", s, h * 100 / s, (h * 100 / s >= 10 ? "PASS" : "MISS")
  printf "  batched lease 100 + delete        %9.0f jobs/s   herald = %.2fx (goal >= 0.5x: %s)\n", b * 100, h / b, (h / b >= 0.5 ? "PASS" : "MISS")
  printf "  herald jobs not done afterwards: %d\n", left
}'
psql -X -q -d postgres -c "DROP DATABASE $db"

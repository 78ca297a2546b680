#!/usr/bin/env python3
"""Which relations write the WAL, and how much of it is full-page images, over a window of a running
load (a soak, a bench section). Reads the WAL itself with pg_walinspect (contrib, Postgres 15), after
the window, from the `postgres` database; names the relations in the load's database. Asserts nothing.

    python3 tests/perf/wal_by_relation.py watch <seconds> [database=herald_bench_soak] [label]

Prints one JSON line (window, totals, top relations by WAL bytes) and a table. A record's full-page
image bytes are split evenly over its blocks marked FPW; the rest of the record goes to its first block.
The window's WAL must still be on disk when it is read: a window shorter than a checkpoint cycle is.
Runs as root (psql as the postgres user)."""
import json
import subprocess
import sys
import time


def psql(database, query):
    r = subprocess.run(["su", "postgres", "-c", f"psql -X -q -v ON_ERROR_STOP=1 -d {database} -At -F '|' -f -"],
                       input=query, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"psql failed: {r.stderr.strip()}")
    return r.stdout.strip()


# Per record: its blocks (relfilenode, FPW or not); the sums are grouped per relfilenode.
BY_FILENODE = """
WITH rec AS (
    SELECT r.record_length, r.fpi_length,
           array(SELECT ARRAY[m[1], m[2]] FROM regexp_matches(r.block_ref,
                 'rel \\d+/\\d+/(\\d+) fork main blk \\d+( \\(FPW\\))?', 'g') AS m) AS blocks
    FROM pg_get_wal_records_info('{start}', '{end}') r
    WHERE r.block_ref IS NOT NULL
), blk AS (
    SELECT b.ord, b.filenode::oid AS filenode, b.fpw, rec.record_length, rec.fpi_length,
           count(*) FILTER (WHERE b.fpw) OVER (PARTITION BY rec.record_no) AS fpws
    FROM (SELECT *, row_number() OVER () AS record_no FROM rec) rec,
         LATERAL (SELECT ord, blocks[ord][1] AS filenode, blocks[ord][2] IS NOT NULL AS fpw
                  FROM generate_subscripts(blocks, 1) AS ord) b
)
SELECT filenode,
       count(*) FILTER (WHERE ord = 1) AS records,
       sum(CASE WHEN ord = 1 THEN record_length - fpi_length ELSE 0 END)
         + sum(CASE WHEN fpw THEN fpi_length / fpws ELSE 0 END) AS bytes,
       count(*) FILTER (WHERE fpw) AS fpis,
       sum(CASE WHEN fpw THEN fpi_length / fpws ELSE 0 END) AS fpi_bytes
FROM blk GROUP BY filenode ORDER BY bytes DESC
"""


def watch(seconds, database, label):
    psql("postgres", "SET client_min_messages = warning; CREATE EXTENSION IF NOT EXISTS pg_walinspect")
    start = psql("postgres", "SELECT pg_current_wal_insert_lsn()")
    time.sleep(seconds)
    end = psql("postgres", "SELECT pg_current_wal_insert_lsn()")
    # the window's end must be flushed before it can be read
    while psql("postgres", f"SELECT pg_current_wal_flush_lsn() >= '{end}'") != "t":
        time.sleep(0.2)
    rows = psql("postgres", BY_FILENODE.format(start=start, end=end)).splitlines()
    total = int(psql("postgres", f"SELECT pg_wal_lsn_diff('{end}', '{start}')"))
    names = {}
    nodes = [r.split("|")[0] for r in rows]
    if nodes:
        q = "SELECT f, coalesce(pg_filenode_relation(0, f)::regclass::text, '?') FROM unnest(ARRAY[{}]::oid[]) f".format(
            ",".join(nodes))
        for line in psql(database, q).splitlines():
            f, name = line.split("|", 1)
            names[f] = name
    top = []
    for r in rows:
        f, records, nbytes, fpis, fpi_bytes = r.split("|")
        top.append({"relation": names.get(f, f"filenode {f}"), "records": int(records), "bytes": int(nbytes),
                    "fpis": int(fpis), "fpi_bytes": int(fpi_bytes)})
    fpi_total = sum(t["fpi_bytes"] for t in top)
    print(json.dumps({"label": label, "seconds": seconds, "wal_bytes": total, "fpi_bytes": fpi_total,
                      "top": top[:25]}))
    print(f"# {label}: {total / seconds / 1e6:.1f} MB/s of WAL, {fpi_total / max(total, 1):.0%} full-page images",
          file=sys.stderr)
    print(f"# {'relation':<42} {'MB/s':>7} {'FPI MB/s':>9} {'FPI/s':>8} {'records/s':>10}", file=sys.stderr)
    for t in top[:25]:
        print(f"  {t['relation']:<42} {t['bytes'] / seconds / 1e6:7.2f} {t['fpi_bytes'] / seconds / 1e6:9.2f}"
              f" {t['fpis'] / seconds:8.0f} {t['records'] / seconds:10.0f}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "watch":
        raise SystemExit(__doc__)
    watch(float(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "herald_bench_soak",
          sys.argv[4] if len(sys.argv) > 4 else "")

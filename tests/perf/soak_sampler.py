#!/usr/bin/env python3
"""Beside a soak (`herald-bench --only soak`): where the machine's CPU goes and what the server writes,
every 10 s, as JSON lines: CPU seconds per process class (Postgres backends, autovacuum workers,
checkpointer, WAL writer, background writer, herald run, herald-bench, the rest: smtp-sink, receivers),
pg_stat_wal (records, full-page images, bytes), pg_stat_bgwriter (checkpoints, buffers written), the
tables autovacuum is working on, and per statement of the load (the probe's claim, the daemon's claim,
complete, track; pg_stat_statements) calls, time, blocks hit / read / dirtied / written, the time spent
reading and writing them (0 unless the server's track_io_timing is on) and the WAL they wrote. Then
`summary` prints one line per minute, and one per minute for each of those statements: where a call's
time goes. Asserts nothing.

    python3 tests/perf/soak_sampler.py sample out.jsonl [database=herald_bench_soak]   # until killed
    python3 tests/perf/soak_sampler.py summary out.jsonl

Runs as root (reads every process's /proc/<pid>/stat; psql as the postgres user)."""
import json
import os
import subprocess
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")


def process_class(pid):
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    for needle, name in (("autovacuum worker", "autovacuum"), ("checkpointer", "checkpointer"),
                         ("walwriter", "walwriter"), ("background writer", "bgwriter")):
        if needle in cmd:
            return name
    if cmd.startswith("postgres:"):
        return "backend"
    if "herald-bench" in cmd:
        return "bench"
    if "herald" in cmd and " run" in cmd:
        return "daemon"
    return "other" if cmd else None


def cpu_by_process():
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        c = process_class(d)
        if c is not None:
            out[d] = (c, int(f[11]) + int(f[12]))
    return out


def psql(database, query):
    return subprocess.run(["su", "postgres", "-c", f'psql -d {database} -Atc "{query}"'],
                          capture_output=True, text=True).stdout.strip()


# the load's statements as pg_stat_statements normalises them (no '$' here: the query goes through a
# shell's double quotes). The probe's claim is bench/src/soak/load.rs's, the daemon's is producer.rs's.
STATEMENTS = ("CASE WHEN query LIKE 'SELECT count(*) FROM herald.claim(%' THEN 'probe' "
              "WHEN query LIKE '%FROM herald.claim(%' THEN 'claim' "
              "WHEN query LIKE '%herald.complete(%' THEN 'complete' "
              "WHEN query LIKE '%herald.track(%' THEN 'track' END")
COUNTERS = ("calls", "total_exec_time", "shared_blks_hit", "shared_blks_read", "blk_read_time",
            "shared_blks_dirtied", "shared_blks_written", "blk_write_time", "wal_fpi", "wal_bytes")


def statements(database):
    sums = ", ".join(f"sum({c})::float8" for c in COUNTERS)
    got = psql(database, f"SELECT coalesce(json_object_agg(k, v), '{{}}') FROM (SELECT {STATEMENTS} AS k, "
                         f"json_build_array({sums}) AS v FROM pg_stat_statements GROUP BY 1) s WHERE k IS NOT NULL")
    try:
        return json.loads(got)
    except ValueError:
        return {}   # pg_stat_statements not there (yet), or the database gone


def sample(path, database):
    out, last, t0 = open(path, "a"), cpu_by_process(), time.time()
    while True:
        time.sleep(10)
        now, cpu = cpu_by_process(), {}
        for pid, (c, ticks) in now.items():
            # a process born since the last sample counts from 0; one that ended loses its last interval
            cpu[c] = cpu.get(c, 0) + (ticks - last.get(pid, (c, 0))[1]) / TICKS
        last = now
        out.write(json.dumps({
            "t": round(time.time() - t0), "cpu": {k: round(v, 2) for k, v in cpu.items()},
            "wal": psql(database, "SELECT wal_records||','||wal_fpi||','||wal_bytes FROM pg_stat_wal"),
            "bg": psql(database, "SELECT checkpoints_timed||','||checkpoints_req||','||buffers_checkpoint"
                                 "||','||buffers_backend FROM pg_stat_bgwriter"),
            "vacuum": psql(database, "SELECT string_agg(relid::regclass::text, ' ') FROM pg_stat_progress_vacuum"),
            "stmts": statements(database),
            "load": open("/proc/loadavg").read().split()[0]}) + "\n")
        out.flush()


def summary(path):
    rows = [json.loads(line) for line in open(path)]
    minutes, prev = {}, None
    for r in rows:
        if not r["wal"] or not r["bg"]:
            continue   # the database was gone (the soak had ended)
        m = minutes.setdefault(r["t"] // 60, {"cpu": {}, "load": 0.0, "vacuum": set(), "wal": 0, "fpi": 0, "ckpt": 0})
        for k, v in r["cpu"].items():
            m["cpu"][k] = m["cpu"].get(k, 0) + v
        m["load"] = max(m["load"], float(r["load"]))
        m["vacuum"].update(x for x in r["vacuum"].split() if x)
        wal, bg = [int(x) for x in r["wal"].split(",")], [int(x) for x in r["bg"].split(",")]
        if prev:
            m["wal"] += wal[2] - prev[0][2]
            m["fpi"] += wal[1] - prev[0][1]
            m["ckpt"] += bg[0] + bg[1] - prev[1][0] - prev[1][1]
        prev = (wal, bg)
    print("min  load | CPU s: backend autovac ckpt daemon other | WAL MB   FPIs ckpts | vacuumed")
    for k, m in sorted(minutes.items()):
        c = m["cpu"]
        print(f"{k:3d} {m['load']:5.1f} | {c.get('backend', 0):14.1f} {c.get('autovacuum', 0):7.1f} "
              f"{c.get('checkpointer', 0):4.1f} {c.get('daemon', 0):6.1f} {c.get('other', 0):5.1f} | "
              f"{m['wal'] / 1e6:6.0f} {m['fpi']:6d} {m['ckpt']:5d} | {' '.join(sorted(m['vacuum']))}")
    statement_summary(rows)


def statement_summary(rows):
    # per minute and statement, the counters' growth divided by the calls (a sample whose counters went
    # down, e.g. after pg_stat_statements_reset, starts the differences again)
    minutes, prev = {}, {}
    for r in rows:
        for k, v in r.get("stmts", {}).items():
            p = prev.get(k)
            prev[k] = v
            if p is None or v[0] < p[0]:
                continue
            m = minutes.setdefault((k, r["t"] // 60), [0.0] * len(COUNTERS))
            for i, (a, b) in enumerate(zip(v, p)):
                m[i] += a - b
    if not minutes:
        return
    print("per call: ms | blocks hit read dirtied written | read ms, write ms | WAL: FPIs, KB  (track_io_timing "
          "off: read/write ms are 0)")
    for (k, minute), m in sorted(minutes.items()):
        calls = m[0] or 1
        per = [x / calls for x in m]
        print(f"{k:>8} {minute:3d} {m[0]:6.0f} calls | {per[1]:7.2f} ms | {per[2]:7.0f} {per[3]:6.1f} {per[5]:6.1f} "
              f"{per[6]:6.1f} | {per[4]:6.2f} {per[7]:6.2f} | {per[8]:5.1f} {per[9] / 1024:6.1f}")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("sample", "summary"):
        sys.exit(__doc__)
    if sys.argv[1] == "sample":
        sample(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "herald_bench_soak")
    else:
        summary(sys.argv[2])

#!/usr/bin/env python3
"""Beside a soak (`herald-bench --only soak`): where the machine's CPU goes and what the server writes,
every 10 s, as JSON lines: CPU seconds per process class (Postgres backends, autovacuum workers,
checkpointer, WAL writer, background writer, herald run, herald-bench, the rest: smtp-sink, receivers),
pg_stat_wal (records, full-page images, bytes), pg_stat_bgwriter (checkpoints, buffers written) and the
tables autovacuum is working on. Then `summary` prints one line per minute. Asserts nothing.

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


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("sample", "summary"):
        sys.exit(__doc__)
    if sys.argv[1] == "sample":
        sample(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "herald_bench_soak")
    else:
        summary(sys.argv[2])

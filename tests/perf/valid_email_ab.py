#!/usr/bin/env python3
"""herald._valid_email / _valid_mailbox (Rust since 0.8.0) against release 0.7.0's regular expressions:
the same answers on generated strings (addresses, near-addresses, names in angle brackets, control,
bidi and Unicode space characters), then the time of each over the same rows, in turns.

    python3 tests/perf/valid_email_ab.py [rows]

Needs make install; runs as a Postgres superuser over the local socket; drops and creates the database
bench_valid_email. Counts the strings the two disagree on (expected: only addresses holding a Unicode space the
database's locale does not call [:space:], which Rust refuses) and prints the per-row time of each."""
import random, sys, time, psycopg

HOST = "/var/run/postgresql"
ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
FORBIDDEN = r"[:cntrl:]\u0080-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
# release 0.7.0's sql/contacts.sql and sql/queue.sql
OLD_EMAIL = (f"coalesce(length(x) <= 254 AND x ~ '^[^@[:space:]{FORBIDDEN}]+@[^@[:space:]{FORBIDDEN}]+"
             f"\\.[^@[:space:].{FORBIDDEN}]+$', false)")
OLD_MAILBOX = (f"coalesce(length(x) <= 998 AND x !~ '[{FORBIDDEN}]' AND (({OLD_EMAIL} AND x !~ '[<>\"]') "
               f"OR (x ~ '^([^]<>@,;:\"\\\\[()[:cntrl:]]+|\"[^\"\\\\]*\")[[:space:]]*<[^<>]+>$' AND "
               + OLD_EMAIL.replace("x", "substring(x FROM '<([^<>]+)>$')") + ")), false)")

random.seed(8)
PIECES = ["a", "b", "z", "0", ".", "@", "-", "+", "_", "é", "ü", "中", " ", "\t", "\n", "\x7f", "\x85", "\u00a0",
          "\u2003", "\u202e", "\u2066", "\u3000", "<", ">", '"', ",", ";", ":", "(", "\\", "[", "]"]


def candidate():
    r = random.random()
    if r < 0.5:   # address-shaped, sometimes with one odd character
        local = "".join(random.choice("abcxyz019.+_-") for _ in range(random.randint(1, 12)))
        dom = random.choice(["example.com", "ex.co.uk", "x.y", "ex", "ex.", ".com", "ex..com", "exämple.de"])
        s = f"{local}@{dom}"
        if random.random() < 0.4:
            i = random.randint(0, len(s))
            s = s[:i] + random.choice(PIECES) + s[i:]
        return s
    if r < 0.8:   # a name and an address
        name = random.choice(["Acme News", '"Acme, Inc."', "Acme, Inc.", "Zoë", '"x\\"y"', "", " ", "A<B", "N (x)"])
        return f"{name}{random.choice(['', ' ', '  '])}<{candidate()}>{random.choice(['', '', ' x', '>'])}"
    return "".join(random.choice(PIECES) for _ in range(random.randint(0, 20)))


rows = [candidate() for _ in range(ROWS)] + ["a" * 250 + "@x.io", "a" * 244 + "@x.io"]
admin = psycopg.connect(host=HOST, dbname="postgres", autocommit=True)
admin.execute("DROP DATABASE IF EXISTS bench_valid_email WITH (FORCE)")
admin.execute("CREATE DATABASE bench_valid_email")
db = psycopg.connect(host=HOST, dbname="bench_valid_email", autocommit=True)
db.execute("CREATE EXTENSION herald")
db.execute("CREATE TABLE s (x text)")
with db.cursor().copy("COPY s (x) FROM STDIN") as cp:
    for x in rows:
        cp.write_row((x,))
db.execute("ANALYZE s")
print(f"{ROWS} strings; lc_ctype {db.execute('SHOW lc_ctype').fetchone()[0]}")
for what, old, new in (("_valid_email", OLD_EMAIL, "herald._valid_email(x)"),
                       ("_valid_mailbox", OLD_MAILBOX, "herald._valid_mailbox(x)")):
    differ = db.execute(f"SELECT x, {old}, {new} FROM s WHERE ({old}) IS DISTINCT FROM ({new})").fetchall()
    accepted = db.execute(f"SELECT count(*) FILTER (WHERE {new}) FROM s").fetchone()[0]
    # A space outside ASCII (no-break space, em space, ideographic space): [:space:] followed the locale
    unicode_space = [d for d in differ if not d[2] and any(c.isspace() and ord(c) > 127 for c in d[0])]
    other = [d for d in differ if d not in unicode_space]
    print(f"{what}: {accepted} accepted; {len(differ)} answered differently: {len(unicode_space)} now refused "
          f"for a Unicode space, {len(other)} otherwise")
    for x, o, n in unicode_space[:3] + other[:20]:
        print(f"    {x!r}: 0.7.0 {o}, now {n}")
    took = {"0.7.0": [], "now": []}
    for _ in range(5):
        for tag, expr in (("0.7.0", old), ("now", new)):
            t = time.perf_counter()
            db.execute(f"SELECT count(*) FILTER (WHERE {expr}) FROM s").fetchone()
            took[tag].append(time.perf_counter() - t)
    best = {k: min(v) / (ROWS / 1e6) for k, v in took.items()}
    print(f"    best of 5, per string: 0.7.0 {best['0.7.0']:.2f} µs, now {best['now']:.2f} µs "
          f"({best['0.7.0'] / best['now']:.1f}x)")
admin.execute("DROP DATABASE bench_valid_email WITH (FORCE)")

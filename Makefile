# herald — the two commands: `make demo` (end-to-end flow) and `make test` (every test).
# Both set the machine up first (tests/setup.sh is idempotent), so they work on a fresh Debian box.

PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
PGBIN     := $(shell $(PG_CONFIG) --bindir 2>/dev/null)
PGXS_TEST := $(shell $(PG_CONFIG) --pkglibdir 2>/dev/null)/pgxs/src/test
export PGHOST ?= /var/run/postgresql
export PGPORT ?= 5432

# In-database suites: pgrx-tests/sql/<name>.sql against pgrx-tests/expected/<name>.out, and isolation specs.
REGRESS   := $(sort $(basename $(notdir $(wildcard pgrx-tests/sql/*.sql))))
ISOLATION := $(sort $(basename $(notdir $(wildcard pgrx-tests/specs/*.spec))))
# Parallel runs on one machine need their own databases and output folders: make regress TEST_TAG=a
TEST_TAG  ?=
REGRESS_DB := herald_regress$(if $(TEST_TAG),_$(TEST_TAG))
ISOLATION_DB := herald_isolation$(if $(TEST_TAG),_$(TEST_TAG))

.PHONY: setup install install-locked build test unit regress isolation upgrade-check readme-sql scaling-check e2e sidecar-e2e demo bench bench-small lint fmt

setup:
	@./tests/setup.sh

# Builds the extension (release) and installs it into the system Postgres. Each file is written beside
# its destination and renamed over it: running backends keep the old herald.so they mapped (copying over
# it in place, as `cargo pgrx install` does, killed them with SIGBUS and sent the server into recovery).
# Two installs at once (parallel test runs) would race on $(PKG): one copies while the other rebuilds
# it; a lock file serialises them.
PKG := target/release/herald-pg15
install: setup
	@mkdir -p target && flock target/.install.lock $(MAKE) --no-print-directory install-locked

install-locked:
	cargo pgrx package --pg-config $(PG_CONFIG) --package herald 2>&1 \
	  | sed 's/\x1b\[[0-9;]*m//g' | grep -Ev '^ *(Using|Running|Copying|Discovered|Writing|Building|Installing|Compiling)' || true
	@test -f $(PKG)$(shell $(PG_CONFIG) --pkglibdir)/herald.so || { echo "herald was not built" >&2; exit 1; }
	@cd $(PKG) && find . -type f | while read -r f; do \
	    dest="/$${f#./}"; install -D -m 644 "$$f" "$$dest.new.$$$$" && mv -f "$$dest.new.$$$$" "$$dest"; \
	done
	@# upgrade scripts (ALTER EXTENSION herald UPDATE) and the kept install scripts of earlier releases
	@for f in sql/herald--*--*.sql sql/releases/herald--*.sql; do \
	    dest="$(shell $(PG_CONFIG) --sharedir)/extension/$$(basename $$f)"; \
	    install -m 644 "$$f" "$$dest.new.$$$$" && mv -f "$$dest.new.$$$$" "$$dest"; \
	done
	@test -f $(shell $(PG_CONFIG) --sharedir)/extension/herald.control || { echo "herald was not installed" >&2; exit 1; }

# The daemon/CLI (`herald`) and the benchmark harness (`herald-bench`, a binary of its own so the daemon
# users deploy does not carry it).
build: setup
	cargo build --release --package herald-sidecar --package herald-bench

unit: setup
	cargo test --workspace --quiet

regress: install
	@mkdir -p target/pg_regress$(TEST_TAG)
	$(PGXS_TEST)/regress/pg_regress --bindir=$(PGBIN) --inputdir=pgrx-tests --outputdir=target/pg_regress$(TEST_TAG) \
	    --dbname=$(REGRESS_DB) --load-extension=herald $(REGRESS) \
	  || { cat target/pg_regress$(TEST_TAG)/regression.diffs; exit 1; }

isolation: install
	@mkdir -p target/pg_isolation$(TEST_TAG)
	$(PGXS_TEST)/isolation/pg_isolation_regress --bindir=$(PGBIN) --inputdir=pgrx-tests --outputdir=target/pg_isolation$(TEST_TAG) \
	    --dbname=$(ISOLATION_DB) --load-extension=herald $(ISOLATION) \
	  || { cat target/pg_isolation$(TEST_TAG)/regression.diffs; exit 1; }

# Every earlier release upgrades to this one with its rows kept and a catalog equal to a fresh install.
upgrade-check: install
	./tests/upgrade.sh

# Every SQL block of the README runs as written, in order, in a fresh database.
readme-sql: install
	./tests/readme_sql.sh

# The invariants docs/SCALING.md relies on (keys and co-located joins), against the installed extension.
scaling-check: install
	./tests/scaling/run.sh

e2e: install build
	./tests/e2e.sh

# The daemon end to end: `herald run` as a process against a real SMTP server and HTTP receiver (pytest).
sidecar-e2e: install build
	./tests/sidecar/run.sh

test: unit regress isolation upgrade-check readme-sql scaling-check e2e sidecar-e2e bench-small

demo: install build
	./target/release/herald demo

bench: install build
	./target/release/herald-bench

# Keeps the benchmark working in CI at a tiny size; prints figures, asserts nothing about time.
bench-small: install build
	./target/release/herald-bench --small

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

"""Retention of events and message_history: set once on the database, applied by the daemon's own
hourly prune (it runs once at start), with no flag on the daemon."""

from conftest import wait_until


def ages(db, table, where):
    return [r[0] for r in db.q(f"SELECT extract(day FROM now() - created_at)::int FROM herald.{table} "
                               f"WHERE {where} ORDER BY created_at")]


def test_the_daemon_applies_the_databases_retention(db, sidecar):
    db.q("INSERT INTO herald.events (workspace_id, email, kind, created_at) "
         "SELECT 'acme', 'old@example.com', 'retention.test', now() - make_interval(days => d) "
         "FROM unnest(ARRAY[1, 20, 90]) d")
    db.q("INSERT INTO herald.message_history (workspace_id, outbox_id, kind, status, dedupe_key, attempt, created_at) "
         "SELECT 'acme', -d, 'email', 'sent', 'retention:' || d, 1, now() - make_interval(days => d) "
         "FROM unnest(ARRAY[1, 40, 90]) d")
    db.q(f'ALTER DATABASE "{db.name}" SET herald.prune_events_older_than = \'10 days\'')
    db.q(f'ALTER DATABASE "{db.name}" SET herald.prune_history_older_than = \'60 days\'')
    s = sidecar()
    wait_until(lambda: ages(db, "events", "kind = 'retention.test'") == [1], what="events older than 10 days gone")
    wait_until(lambda: ages(db, "message_history", "dedupe_key LIKE 'retention:%'") == [40, 1],
               what="history older than 60 days gone")
    assert not [line for line in s.log().splitlines() if "herald.prune" in line and "failed" in line], s.log()
    assert s.running()


def test_a_bad_retention_fails_prune_and_removes_nothing(db, sidecar):
    db.q("INSERT INTO herald.events (workspace_id, email, kind, created_at) "
         "VALUES ('acme', 'old@example.com', 'retention.test', now() - interval '90 days')")
    db.q(f'ALTER DATABASE "{db.name}" SET herald.prune_events_older_than = \'a while\'')
    s = sidecar()
    wait_until(lambda: "herald.prune_events_older_than" in s.log(), what="prune's error in the log")
    assert "must be an interval" in s.log(), s.log()
    assert ages(db, "events", "kind = 'retention.test'") == [90]
    assert s.running()

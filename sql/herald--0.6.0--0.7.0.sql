-- herald 0.6.0 -> 0.7.0
--   Release 0.6.0 is the SQL that landed on 2026-12-06 (commit 74747fb), kept in
--   sql/releases/herald--0.6.0.sql. Everything since, one marked block per change:
--   Functions replaced here lose SECURITY DEFINER (CREATE OR REPLACE resets it): it is set again at
--   the end of each block.

-- ==== autovacuum: the tables that churn are vacuumed at 2% dead (outbox, enrollments) or a fixed threshold (staging queues) ====
ALTER TABLE herald.outbox SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_limit = 2000);
ALTER TABLE herald.enrollments SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_limit = 2000);
ALTER TABLE herald.results_staged SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
                                       autovacuum_vacuum_cost_delay = 0);
ALTER TABLE herald.stats_delta SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
                                    autovacuum_vacuum_cost_delay = 0);
ALTER TABLE herald.broadcast_stats_delta SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
                                              autovacuum_vacuum_cost_delay = 0);
ALTER TABLE herald.rate_grants SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
                                    autovacuum_vacuum_cost_delay = 0);

-- herald 0.9.0 -> 0.10.0
--   Release 0.9.0 is the SQL that landed on 2026-12-07 (commit e59ab61), kept in
--   sql/releases/herald--0.9.0.sql. Everything since, one marked block per change:
--   Functions replaced here lose SECURITY DEFINER (CREATE OR REPLACE resets it): it is set again at
--   the end of each block.

-- ==== history_indexes: message_history's contact and automation indexes without created_at ====
-- Rebuilt in the upgrade's transaction: writes to message_history (complete()) wait for the two
-- builds, about 10 s per 10,000,000 rows on a 2-core machine (README *Backups and upgrades*).
DROP INDEX herald.message_history_automation_idx;
CREATE INDEX message_history_automation_idx ON herald.message_history (workspace_id, automation_id)
    WHERE automation_id IS NOT NULL;
DROP INDEX herald.message_history_contact_idx;
CREATE INDEX message_history_contact_idx ON herald.message_history (workspace_id, contact_id);

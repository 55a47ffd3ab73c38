-- The (time_ms, writer, seq) index of migration 0014 serves every query by time (its first
-- column), so the single-column time index only cost a B-tree insert per stored record.
DROP INDEX IF EXISTS audit_records_time;

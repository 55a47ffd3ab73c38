-- Time-ordered scans of the audit store (policy impact, access report) page by the key
-- (time_ms, writer, seq): one index serves both the window bound and the keyset cursor.
CREATE INDEX audit_records_window ON audit_records(time_ms, writer, seq);

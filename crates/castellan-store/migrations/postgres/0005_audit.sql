-- Audit records as shipped by each enforcement point (writer), chained per writer. The JSON is
-- the record exactly as hashed; the other columns are copies for querying.
CREATE TABLE audit_records (
    writer      TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    record      TEXT NOT NULL,
    time_ms     BIGINT NOT NULL,
    source      TEXT NOT NULL,
    user_sub    TEXT NOT NULL,
    destination TEXT NOT NULL,
    decision    TEXT NOT NULL,
    rule        TEXT NOT NULL,
    PRIMARY KEY (writer, seq)
);
CREATE INDEX audit_records_time ON audit_records(time_ms);

-- Rollups of enforced traffic for the dashboard, kept as batches are stored (one upsert per
-- distinct key per batch) so that its pages never scan the audit records: caller→callee edges
-- with allow/deny counts and last use, and allow/deny counts per minute and destination.
CREATE TABLE audit_edges (
    source      TEXT NOT NULL,
    destination TEXT NOT NULL,
    origin      TEXT NOT NULL,
    allowed     BIGINT NOT NULL,
    denied      BIGINT NOT NULL,
    last_ms     BIGINT NOT NULL,
    PRIMARY KEY (source, destination, origin)
);
CREATE TABLE audit_minutes (
    minute_ms   BIGINT NOT NULL,
    destination TEXT NOT NULL,
    allowed     BIGINT NOT NULL,
    denied      BIGINT NOT NULL,
    PRIMARY KEY (minute_ms, destination)
);

-- Anomaly events (new caller→callee edge, user first seen on a service, deny spike): one row
-- per event, claimed by the first control-plane replica to see it (the primary key makes the
-- claim), which alone sends the alert.
CREATE TABLE anomaly_events (
    kind        TEXT NOT NULL,
    key         TEXT NOT NULL,
    at_ms       BIGINT NOT NULL,
    detail      TEXT NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX anomaly_events_at ON anomaly_events(at_ms);

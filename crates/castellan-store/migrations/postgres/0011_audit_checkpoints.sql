-- Signed checkpoints of audit chains: (chain, seq, hash) signed by the writer's SVID key, with
-- the signing certificate chain (JSON array of base64 DER), checked by `castellan audit verify`
-- against the operator's own trust bundle.
CREATE TABLE audit_checkpoints (
    writer      TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    hash        TEXT NOT NULL,
    time_ms     BIGINT NOT NULL,
    signature   TEXT NOT NULL,
    cert_chain  TEXT NOT NULL,
    PRIMARY KEY (writer, seq)
);

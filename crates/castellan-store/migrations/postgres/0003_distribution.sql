-- What the control plane pushes to proxies: policy revisions, API keys (hashes only), and the
-- proxies themselves (status, and the inbound address other proxies dial).

CREATE TABLE policy_revisions (
    rev          BIGSERIAL PRIMARY KEY,
    author       TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    content_hash TEXT NOT NULL,
    files        TEXT NOT NULL,
    comment      TEXT NOT NULL
);

CREATE TABLE api_keys (
    key_id      TEXT PRIMARY KEY,
    key_hash    BYTEA NOT NULL UNIQUE,
    username    TEXT NOT NULL,
    roles       TEXT NOT NULL,
    claims      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

CREATE TABLE proxies (
    proxy_id       TEXT PRIMARY KEY,
    service        TEXT NOT NULL,
    mode           TEXT NOT NULL,
    address        TEXT NOT NULL,
    revision       BIGINT NOT NULL,
    cert_not_after BIGINT NOT NULL,
    last_contact   BIGINT NOT NULL
);

-- Control-plane state for identities and credentials. Secrets are stored only as hashes
-- (tokens, client secrets) or sealed with the key-encryption key (private keys).

CREATE TABLE services (
    name        TEXT PRIMARY KEY,
    created_at  BIGINT NOT NULL,
    disabled_at BIGINT
);

CREATE TABLE join_tokens (
    token_hash  BYTEA PRIMARY KEY,
    service     TEXT NOT NULL REFERENCES services(name),
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT
);

CREATE TABLE certificates (
    serial      BYTEA PRIMARY KEY,
    service     TEXT NOT NULL REFERENCES services(name),
    issued_at   BIGINT NOT NULL,
    not_after   BIGINT NOT NULL,
    revoked_at  BIGINT
);
CREATE INDEX certificates_service ON certificates(service);

CREATE TABLE ca_keys (
    id          TEXT PRIMARY KEY,
    cert_der    BYTEA NOT NULL,
    sealed_key  BYTEA NOT NULL,
    created_at  BIGINT NOT NULL,
    retired_at  BIGINT
);

CREATE TABLE signing_keys (
    kid         TEXT PRIMARY KEY,
    alg         TEXT NOT NULL,
    public_jwk  TEXT NOT NULL,
    sealed_key  BYTEA NOT NULL,
    created_at  BIGINT NOT NULL,
    retired_at  BIGINT
);

CREATE TABLE oauth_clients (
    client_id   TEXT PRIMARY KEY,
    secret_hash BYTEA NOT NULL,
    scopes      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    disabled_at BIGINT
);

CREATE TABLE admin_tokens (
    token_hash  BYTEA PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

-- What proxies must learn about, in order: service disables and certificate revocations.
CREATE TABLE revocation_events (
    seq         BIGSERIAL PRIMARY KEY,
    kind        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    at          BIGINT NOT NULL
);

-- Control-plane state for identities and credentials. Secrets are stored only as hashes
-- (tokens, client secrets) or sealed with the key-encryption key (private keys).

CREATE TABLE services (
    name        TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL,
    disabled_at INTEGER
);

CREATE TABLE join_tokens (
    token_hash  BLOB PRIMARY KEY,
    service     TEXT NOT NULL REFERENCES services(name),
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER
);

CREATE TABLE certificates (
    serial      BLOB PRIMARY KEY,
    service     TEXT NOT NULL REFERENCES services(name),
    issued_at   INTEGER NOT NULL,
    not_after   INTEGER NOT NULL,
    revoked_at  INTEGER
);
CREATE INDEX certificates_service ON certificates(service);

CREATE TABLE ca_keys (
    id          TEXT PRIMARY KEY,
    cert_der    BLOB NOT NULL,
    sealed_key  BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    retired_at  INTEGER
);

CREATE TABLE signing_keys (
    kid         TEXT PRIMARY KEY,
    alg         TEXT NOT NULL,
    public_jwk  TEXT NOT NULL,
    sealed_key  BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    retired_at  INTEGER
);

CREATE TABLE oauth_clients (
    client_id   TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    scopes      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    disabled_at INTEGER
);

CREATE TABLE admin_tokens (
    token_hash  BLOB PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);

-- What proxies must learn about, in order: service disables and certificate revocations.
CREATE TABLE revocation_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    at          INTEGER NOT NULL
);

-- What `castellan server` needs beyond the identity tables: its own settings (the trust
-- domain), revoked access tokens (RFC 7009), and certificate-bound clients (RFC 8705).

CREATE TABLE settings (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL
);

CREATE TABLE revoked_tokens (
    jti         TEXT PRIMARY KEY,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX revoked_tokens_expiry ON revoked_tokens(expires_at);

-- The SPIFFE ID a `tls_client_auth` client must present; NULL for secret-only clients.
ALTER TABLE oauth_clients ADD COLUMN tls_san_uri TEXT;

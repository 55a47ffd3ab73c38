-- API keys scoped as the seeds ask ("restrictions per application and set of APIs"): services
-- and route prefixes they may be used for (space-separated; empty = any), an optional expiry,
-- and when a gateway last saw them used.
ALTER TABLE api_keys ADD COLUMN services TEXT NOT NULL DEFAULT '';
ALTER TABLE api_keys ADD COLUMN prefixes TEXT NOT NULL DEFAULT '';
ALTER TABLE api_keys ADD COLUMN expires_at BIGINT;
ALTER TABLE api_keys ADD COLUMN last_used_at BIGINT;

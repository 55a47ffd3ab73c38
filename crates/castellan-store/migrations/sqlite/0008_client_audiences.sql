-- The audiences each OAuth2 client may request tokens for (space-separated), besides the
-- server's default audience.
ALTER TABLE oauth_clients ADD COLUMN audiences TEXT NOT NULL DEFAULT '';

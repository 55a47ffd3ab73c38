-- An admin credential row is accepted only with a MAC made with a key derived from the
-- key-encryption key, which the database does not hold: a row inserted past the API (by whoever
-- can write the database) is refused.
ALTER TABLE admin_tokens ADD COLUMN mac BLOB;

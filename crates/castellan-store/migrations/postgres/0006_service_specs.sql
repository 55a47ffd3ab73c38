-- A service's OpenAPI document (as JSON), pushed to proxies for request validation.
CREATE TABLE service_specs (
    service     TEXT PRIMARY KEY REFERENCES services(name),
    spec        TEXT NOT NULL,
    updated_at  BIGINT NOT NULL
);

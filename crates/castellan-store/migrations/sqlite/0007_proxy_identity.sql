-- A proxy's registry row belongs to the workload identity that reported it: keyed by
-- (service, proxy_id), so no identity can overwrite another's row by naming its proxy id.
CREATE TABLE proxies_new (
    proxy_id       TEXT NOT NULL,
    service        TEXT NOT NULL,
    mode           TEXT NOT NULL,
    address        TEXT NOT NULL,
    revision       BIGINT NOT NULL,
    cert_not_after BIGINT NOT NULL,
    last_contact   BIGINT NOT NULL,
    PRIMARY KEY (service, proxy_id)
);
INSERT INTO proxies_new SELECT proxy_id, service, mode, address, revision, cert_not_after, last_contact FROM proxies;
DROP TABLE proxies;
ALTER TABLE proxies_new RENAME TO proxies;

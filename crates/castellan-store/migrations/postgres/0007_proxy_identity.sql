-- A proxy's registry row belongs to the workload identity that reported it: keyed by
-- (service, proxy_id), so no identity can overwrite another's row by naming its proxy id.
ALTER TABLE proxies DROP CONSTRAINT proxies_pkey;
ALTER TABLE proxies ADD PRIMARY KEY (service, proxy_id);

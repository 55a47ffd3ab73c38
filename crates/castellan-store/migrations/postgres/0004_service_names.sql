-- DNS names and IP addresses a service's SVIDs also carry (space-separated), for listeners that
-- clients outside the mesh dial by name or address — the gateway's edge. Empty for most services.
ALTER TABLE services ADD COLUMN dns_names TEXT NOT NULL DEFAULT '';

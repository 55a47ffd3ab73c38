-- What each service's proxies enforce, decided here and never from what a proxy says about
-- itself: its kind (sidecar, gateway, decision), a gateway's routes ("prefix=service",
-- space-separated) and a sidecar's upstreams (space-separated service names).
ALTER TABLE services ADD COLUMN kind TEXT NOT NULL DEFAULT 'sidecar';
ALTER TABLE services ADD COLUMN routes TEXT NOT NULL DEFAULT '';
ALTER TABLE services ADD COLUMN upstreams TEXT NOT NULL DEFAULT '';

-- Per-app broadcast limits (owned by center): POST /v1/broadcast requests per minute (0 = unlimited)
-- and the pacing of one broadcast's deliveries per second across all room instances (0 = unlimited).
ALTER TABLE apps ADD COLUMN IF NOT EXISTS broadcasts_per_min INT NOT NULL DEFAULT 60;
ALTER TABLE apps ADD COLUMN IF NOT EXISTS broadcast_deliveries_per_s INT NOT NULL DEFAULT 0;

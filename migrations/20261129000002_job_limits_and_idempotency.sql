-- Per-job wall-clock limit (seconds), fixed at submission from the request or the configured default.
ALTER TABLE jobs ADD COLUMN timeout_s integer NOT NULL DEFAULT 1800 CHECK (timeout_s > 0);

-- Idempotent submission: the same Idempotency-Key returns the same job; request_hash tells a retry
-- of the same request from a different request reusing the key.
ALTER TABLE jobs ADD COLUMN idempotency_key text;
ALTER TABLE jobs ADD COLUMN request_hash text;
CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- Webhooks: a job may name a URL that is told (signed with its tenant's secret) when the job ends.
ALTER TABLE tenants ADD COLUMN webhook_secret text;
ALTER TABLE jobs ADD COLUMN webhook_url text;

-- One row per (job, terminal state) to announce. Rows are written by a trigger in the same
-- transaction that ends the job, so a delivery can never be lost between the state change and the
-- sender; the sender claims due rows with a lease (next_attempt_at pushed forward while in flight).
CREATE TABLE webhook_deliveries (
    id              uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES tenants (id),
    job_id          uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    url             text NOT NULL,
    event           text NOT NULL,
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    -- [{attempt, at, status, error}]
    attempt_log     jsonb NOT NULL DEFAULT '[]'::jsonb,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_by_job ON webhook_deliveries (job_id, created_at);

CREATE FUNCTION enqueue_job_webhook() RETURNS trigger AS $$
BEGIN
    INSERT INTO webhook_deliveries (id, tenant_id, job_id, url, event)
    VALUES (gen_random_uuid(), NEW.tenant_id, NEW.id, NEW.webhook_url, NEW.state);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_enqueue_webhook
    AFTER UPDATE OF state ON jobs
    FOR EACH ROW
    WHEN (NEW.webhook_url IS NOT NULL
          AND NEW.state IN ('succeeded', 'failed', 'cancelled')
          AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION enqueue_job_webhook();

-- Evaluation datasets (.npz), owned by a tenant like models.
CREATE TABLE datasets (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    name        text NOT NULL,
    size_bytes  bigint NOT NULL,
    sha256      text NOT NULL,
    storage_key text NOT NULL,
    -- [{name, dtype, shape}]
    arrays      jsonb NOT NULL,
    samples     bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX datasets_by_tenant_newest ON datasets (tenant_id, created_at DESC, id DESC);

-- What a job measures with: an optional dataset and the evaluation options (task, label key,
-- calibration split, execution provider), kept as one document that grows with the engine.
ALTER TABLE jobs ADD COLUMN dataset_id uuid;
ALTER TABLE jobs ADD COLUMN evaluation jsonb NOT NULL DEFAULT '{}'::jsonb;
CREATE INDEX jobs_by_dataset ON jobs (dataset_id) WHERE state IN ('queued', 'running');

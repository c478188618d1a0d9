-- Tenants own every row; until API keys exist, everything belongs to the built-in "default" tenant.
CREATE TABLE tenants (
    id         uuid PRIMARY KEY,
    name       text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO tenants (id, name) VALUES ('00000000-0000-0000-0000-000000000001', 'default');

CREATE TABLE models (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    name        text NOT NULL,
    size_bytes  bigint NOT NULL,
    sha256      text NOT NULL,
    storage_key text NOT NULL,
    summary     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX models_by_tenant_newest ON models (tenant_id, created_at DESC, id DESC);

-- The jobs table is the queue: a job is claimed with a lease (lease_expires_at), renewed by
-- heartbeats that are fenced by `attempt`, and swept back to 'queued' when the lease expires.
CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL REFERENCES tenants (id),
    -- No foreign key: finished jobs outlive the model they compressed (deleting a model with
    -- queued or running jobs is refused by the API).
    model_id         uuid NOT NULL,
    recipe           jsonb NOT NULL,
    state            text NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    priority         integer NOT NULL DEFAULT 0,
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 10),
    scheduled_at     timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz,
    worker_id        text,
    cancel_requested boolean NOT NULL DEFAULT false,
    progress_stage   text NOT NULL DEFAULT 'queued',
    progress_percent real NOT NULL DEFAULT 0,
    error            jsonb,
    attempt_errors   jsonb NOT NULL DEFAULT '[]'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);
CREATE INDEX jobs_runnable ON jobs (priority DESC, scheduled_at, created_at) WHERE state = 'queued';
CREATE INDEX jobs_by_tenant_newest ON jobs (tenant_id, created_at DESC, id DESC);
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_by_model ON jobs (model_id) WHERE state IN ('queued', 'running');

CREATE TABLE artifacts (
    job_id       uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    tenant_id    uuid NOT NULL REFERENCES tenants (id),
    name         text NOT NULL,
    size_bytes   bigint NOT NULL,
    sha256       text NOT NULL,
    content_type text NOT NULL,
    storage_key  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, name)
);

-- Wake idle workers as soon as a job becomes runnable; workers also poll, so a lost notification
-- only costs one poll interval.
CREATE FUNCTION notify_job_queued() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('modelpress_jobs', NEW.id::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_notify_queued
    AFTER INSERT OR UPDATE OF state ON jobs
    FOR EACH ROW WHEN (NEW.state = 'queued')
    EXECUTE FUNCTION notify_job_queued();

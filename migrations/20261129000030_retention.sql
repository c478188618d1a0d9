-- Retention: when a succeeded job's artifacts were deleted (the job row stays and says so).
ALTER TABLE jobs ADD COLUMN artifacts_expired_at timestamptz;
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE state IN ('succeeded', 'failed', 'cancelled');

-- The orphan sweep asks, for each stored object, whether any row refers to its key.
CREATE INDEX models_by_storage_key ON models (storage_key);
CREATE INDEX models_file_keys ON models USING gin (files jsonb_path_ops);
CREATE INDEX datasets_by_storage_key ON datasets (storage_key);
CREATE INDEX artifacts_by_storage_key ON artifacts (storage_key);

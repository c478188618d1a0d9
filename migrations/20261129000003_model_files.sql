-- External-data files uploaded with a model (bundles): [{path, size_bytes, sha256, storage_key}],
-- `path` relative to the model's folder as the model's external_data locations name it.
ALTER TABLE models ADD COLUMN files jsonb NOT NULL DEFAULT '[]'::jsonb;

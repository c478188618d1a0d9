-- API keys: a request's tenant comes from its key. Only the SHA-256 of the key's secret part is
-- stored; the key itself is printed once by `modelpress keys create`.
CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    secret_hash bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, created_at);
CREATE INDEX artifacts_by_tenant ON artifacts (tenant_id);

//! SQL for models, datasets, artifacts and tenants (the job queue's SQL lives in `queue`). Every query is scoped by
//! tenant: another tenant's row is indistinguishable from a missing one.

pub mod artifacts;
pub mod datasets;
pub mod models;
pub mod page;
pub mod tenants;
pub mod webhooks;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

/// What deleting a model or dataset did; shared so both endpoints answer alike.
pub enum DeleteOutcome {
    /// Deleted; the caller removes the stored bytes.
    Deleted,
    NotFound,
    /// A queued or running job still needs the row.
    InUse,
}

/// The built-in tenant: everything belongs to it in auth mode "none" (single-tenant local use).
pub const DEFAULT_TENANT: Uuid = Uuid::from_u128(1);

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(url)
        .await
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

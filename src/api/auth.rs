//! Who is calling: API keys (`Authorization: Bearer mpk_<key id>_<secret>`) resolved to a tenant,
//! or the default tenant in auth mode "none". Every `/v1` request passes through [`authenticate`],
//! which also applies the per-key rate limit; handlers get the tenant through the `Tenant`
//! extractor, which refuses a request that was never authenticated (fail closed).

use std::sync::LazyLock;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::AppState;
use super::audit;
use super::error::ApiError;
use crate::config::AuthMode;
use crate::db::{self, DEFAULT_TENANT};

const PREFIX: &str = "mpk_";

/// The caller of one request: its key (none in auth mode "none") and its tenant.
#[derive(Debug, Clone, Copy)]
pub struct Principal {
    pub key_id: Option<Uuid>,
    pub tenant: Uuid,
}

/// A freshly issued key: the only moment its full text exists outside the caller's hands.
pub struct IssuedKey {
    pub id: Uuid,
    pub tenant: Uuid,
    pub key: String,
}

fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// 32 random bytes from the OS-seeded CSPRNG, as hex.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Creates a key for the tenant `tenant_name` (creating the tenant if needed).
pub async fn issue_key(pool: &PgPool, tenant_name: &str) -> Result<IssuedKey, sqlx::Error> {
    let tenant = db::tenants::get_or_create(pool, tenant_name).await?;
    let id = Uuid::new_v4();
    let secret = random_secret();
    db::tenants::insert_key(pool, id, tenant, &hash_secret(&secret)).await?;
    Ok(IssuedKey {
        id,
        tenant,
        key: format!("{PREFIX}{}_{secret}", id.simple()),
    })
}

/// Splits a presented key into its id and secret; `None` when it is not shaped like one of ours.
fn parse_key(key: &str) -> Option<(Uuid, &str)> {
    let (id, secret) = key.strip_prefix(PREFIX)?.split_once('_')?;
    if id.len() != 32 || secret.len() != 64 {
        return None;
    }
    Some((Uuid::try_parse(id).ok()?, secret))
}

/// What an unknown key id is compared against, so a miss costs the same hash and comparison as a
/// hit.
static DUMMY_HASH: LazyLock<[u8; 32]> = LazyLock::new(|| hash_secret("no such key"));

/// The key's principal, or `None` for a key that is malformed, unknown or revoked (the caller
/// cannot tell which).
pub async fn verify(pool: &PgPool, presented: &str) -> Result<Option<Principal>, sqlx::Error> {
    let Some((id, secret)) = parse_key(presented) else {
        return Ok(None);
    };
    let row = db::tenants::find_key(pool, id).await?;
    let presented_hash = hash_secret(secret);
    let stored: &[u8] = row.as_ref().map_or(&DUMMY_HASH[..], |r| &r.secret_hash);
    let equal: bool = presented_hash.ct_eq(stored).into();
    Ok(match row {
        Some(r) if equal && r.revoked_at.is_none() => Some(Principal {
            key_id: Some(r.id),
            tenant: r.tenant_id,
        }),
        _ => None,
    })
}

fn bearer(req: &Request<Body>) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Resolves the caller of every `/v1` request (401 `unauthorized` without a valid key in auth mode
/// "api_key"), applies the per-key rate limit, and writes the audit line of mutating requests.
/// Routes outside `/v1` (health, metrics, the dashboard page) stay open.
pub async fn authenticate(State(state): State<AppState>, mut req: Request<Body>, next: Next) -> Response {
    if !req.uri().path().starts_with("/v1/") && req.uri().path() != "/v1" {
        return next.run(req).await;
    }
    let principal = match state.config.auth.mode {
        AuthMode::None => Principal {
            key_id: None,
            tenant: DEFAULT_TENANT,
        },
        AuthMode::ApiKey => {
            let Some(token) = bearer(&req) else {
                return unauthorized("this API needs an API key: send Authorization: Bearer <key>");
            };
            match verify(&state.pool, token).await {
                Ok(Some(p)) => p,
                Ok(None) => {
                    // Who tried, as far as the key says (its id part; never the secret).
                    let key_id = parse_key(token).map(|(id, _)| id.to_string());
                    tracing::warn!(
                        target: "audit",
                        key_id = key_id.as_deref().unwrap_or("malformed"),
                        path = %req.uri().path(),
                        "refused an invalid API key"
                    );
                    return unauthorized("the API key is not valid (unknown, malformed or revoked)");
                }
                Err(e) => return ApiError::from(e).into_response(),
            }
        }
    };
    if let Some(key) = principal.key_id
        && let Err(wait) = state.rate_limiter.check(key)
    {
        return ApiError::RateLimited {
            retry_after_s: wait.as_secs_f64().ceil().max(1.0) as u64,
        }
        .into_response();
    }
    req.extensions_mut().insert(principal);
    audit::record(principal, req, next).await
}

fn unauthorized(message: &str) -> Response {
    ApiError::Unauthorized(message.into()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_keys_parse() {
        let id = Uuid::new_v4();
        let secret = random_secret();
        let key = format!("{PREFIX}{}_{secret}", id.simple());
        assert_eq!(parse_key(&key), Some((id, secret.as_str())));
        assert_eq!(parse_key(&key[1..]), None);
        assert_eq!(parse_key(&format!("{PREFIX}{}_{}", id.simple(), &secret[1..])), None);
        assert_eq!(parse_key(&format!("{PREFIX}{}-{secret}", id.simple())), None);
        assert_eq!(parse_key(""), None);
    }

    #[test]
    fn secrets_are_256_random_bits() {
        let (a, b) = (random_secret(), random_secret());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}

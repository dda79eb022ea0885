//! API keys for backend services and operators.
//!
//! A secret is `fk_` followed by 32 random bytes in unpadded base64url. Only its SHA-256 (hex)
//! is stored. [`ApiKeys`] answers "who is this key?" from memory (the MQTT service listener
//! asks on every connect, the REST bridge on every request). Keys are created and revoked by
//! [`crate::ops::Ops`], which stores the change and then has every process refresh its cache
//! from the store.
//!
//! # Invariants
//! - A secret is shown once, when it is created, and never stored or logged.
//! - A revoked key stops authenticating on this node as soon as
//!   [`crate::ops::Ops::revoke_api_key`] returns.

use std::sync::Arc;

use base64::Engine;
use broker::auth::{Scope, ServiceAuth, ServicePrincipal, ServiceRole, DEFAULT_ORG};
use dashmap::DashMap;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::store::{now_ms, ApiKeyRecord, Store, StoreError};

/// The id of the admin key whose secret comes from configuration.
pub const BOOTSTRAP_ADMIN_ID: &str = "bootstrap-admin";

/// Shortest bootstrap token accepted.
pub const MIN_BOOTSTRAP_TOKEN_LEN: usize = 16;

const SECRET_PREFIX: &str = "fk_";

/// A new random secret: `fk_` + 32 random bytes, base64url without padding.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Lower-case hex SHA-256 of a secret: what the store keeps.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the bootstrap admin token must be at least {MIN_BOOTSTRAP_TOKEN_LEN} characters")]
    WeakToken,
    #[error("the API key name must be 1 to 200 printable characters")]
    BadName,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Makes sure the admin key `bootstrap-admin` exists, is not revoked, and has `token` as its
/// secret (replacing an older one). Call before [`ApiKeys::load`], or `reload` afterwards.
pub async fn ensure_bootstrap_admin(store: &Store, token: &str) -> Result<(), KeyError> {
    if token.chars().count() < MIN_BOOTSTRAP_TOKEN_LEN {
        return Err(KeyError::WeakToken);
    }
    store
        .upsert_api_key(&ApiKeyRecord {
            id: BOOTSTRAP_ADMIN_ID.to_owned(),
            org_id: DEFAULT_ORG.to_owned(),
            name: "bootstrap admin".to_owned(),
            role: ServiceRole::Admin,
            scope: Scope::Org,
            secret_hash: hash_secret(token),
            created_at_ms: now_ms(),
            revoked_at_ms: None,
        })
        .await?;
    Ok(())
}

/// The in-memory view of the active API keys.
#[derive(Clone)]
pub struct ApiKeys {
    store: Store,
    by_hash: Arc<DashMap<String, ServicePrincipal>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("active", &self.by_hash.len())
            .finish()
    }
}

/// A key just created, with its secret: the only time the secret exists outside the client.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub record: ApiKeyRecord,
    pub secret: String,
}

impl CreatedKey {
    /// A new key with a fresh secret, not stored yet. The caller checked that the scope's
    /// product and cohort belong to `org_id`.
    pub fn new(
        org_id: &str,
        name: &str,
        role: ServiceRole,
        scope: Scope,
    ) -> Result<CreatedKey, KeyError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
            return Err(KeyError::BadName);
        }
        let secret = generate_secret();
        let record = ApiKeyRecord {
            id: crate::store::new_id(),
            org_id: org_id.to_owned(),
            name: name.to_owned(),
            role,
            scope,
            secret_hash: hash_secret(&secret),
            created_at_ms: now_ms(),
            revoked_at_ms: None,
        };
        Ok(CreatedKey { record, secret })
    }
}

impl ApiKeys {
    /// Loads every active key from the store.
    pub async fn load(store: &Store) -> Result<Self, StoreError> {
        let keys = Self {
            store: store.clone(),
            by_hash: Arc::new(DashMap::new()),
        };
        keys.reload().await?;
        Ok(keys)
    }

    /// Replaces the cache with the store's active keys.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let active: Vec<ApiKeyRecord> = self
            .store
            .api_keys(None, &crate::store::PageRequest::ALL)
            .await?
            .into_iter()
            .filter(|k| k.revoked_at_ms.is_none())
            .collect();
        self.by_hash
            .retain(|hash, _| active.iter().any(|k| &k.secret_hash == hash));
        for k in active {
            self.by_hash.insert(k.secret_hash.clone(), principal_of(&k));
        }
        Ok(())
    }

    /// Makes the cache hold what the store holds of key `id`: `Some` an active key, `None`
    /// one revoked or deleted.
    pub(crate) fn refresh(&self, id: &str, active: Option<&ApiKeyRecord>) {
        self.by_hash.retain(|_, p| p.key_id != id);
        if let Some(k) = active {
            self.by_hash.insert(k.secret_hash.clone(), principal_of(k));
        }
    }

    /// One page of an organization's keys, revoked ones included.
    pub async fn list(
        &self,
        org_id: &str,
        page: &crate::store::PageRequest,
    ) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.store.api_keys(Some(org_id), page).await
    }

    /// Who holds `secret`, if it is an active key.
    pub fn principal(&self, secret: &str) -> Option<ServicePrincipal> {
        self.by_hash.get(&hash_secret(secret)).map(|p| p.clone())
    }
}

fn principal_of(k: &ApiKeyRecord) -> ServicePrincipal {
    ServicePrincipal {
        key_id: k.id.clone(),
        org_id: k.org_id.clone(),
        role: k.role,
        scope: k.scope.clone(),
    }
}

impl ServiceAuth for ApiKeys {
    fn authenticate(&self, api_key: &str) -> Option<ServicePrincipal> {
        self.principal(api_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_have_the_documented_shape() {
        let a = generate_secret();
        let b = generate_secret();
        assert_ne!(a, b);
        let body = a.strip_prefix("fk_").unwrap();
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap();
        assert_eq!(raw.len(), 32);
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

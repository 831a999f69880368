//! The gateway's token cache. A token's expert is read from Redis at most every
//! [`AUTH_CACHE_TTL`]; a revocation reaches every gateway at once through `P:auth:revoked`,
//! and an expiry is honoured to the millisecond. Race-free by an epoch: an entry counts only
//! if no revocation arrived between the start of its Redis read and its use.

use mp_store::{Expert, Store};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const AUTH_CACHE_TTL: Duration = Duration::from_secs(10);
/// Entries kept at most; the cache starts over beyond.
const MAX_ENTRIES: usize = 10_000;

/// A token's expert, when it was read, and the epoch its read began in.
type Entry = (Expert, Instant, u64);

#[derive(Clone, Default)]
pub struct AuthCache {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    epoch: Arc<AtomicU64>,
}

impl AuthCache {
    /// Take this before reading a token's expert from Redis; pass it to [`AuthCache::put`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The token's expert, if read less than the TTL ago, with no revocation since the read
    /// began, and not expired.
    pub fn get(&self, token: &str) -> Option<Expert> {
        let epoch = self.epoch();
        let entries = self.entries.lock().ok()?;
        let (e, at, seen) = entries.get(token)?;
        let fresh = at.elapsed() < AUTH_CACHE_TTL && *seen == epoch;
        let live = e.expires_ms.is_none_or(|t| mp_store::now_ms() < t);
        (fresh && live).then(|| e.clone())
    }

    /// Caches `e` for `token`, read from Redis after [`AuthCache::epoch`] returned `epoch`.
    pub fn put(&self, token: &str, e: &Expert, epoch: u64) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
            entries.insert(token.to_string(), (e.clone(), Instant::now(), epoch));
        }
    }

    /// Forgets every entry, including any whose Redis read is still under way.
    pub fn invalidate(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut entries) = self.entries.lock() {
            entries.clear();
        }
    }

    /// Follows the store's revocations for as long as the gateway runs: each one, and each
    /// (re)subscription (a revocation may have passed while the connection was down),
    /// invalidates the cache.
    pub fn follow(&self, store: Store) {
        use futures::StreamExt;
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                match store.revocations().await {
                    Ok(events) => {
                        me.invalidate();
                        let mut events = std::pin::pin!(events);
                        while let Some(id) = events.next().await {
                            tracing::info!(expert = %id, "token revoked: cache dropped");
                            me.invalidate();
                        }
                        tracing::warn!("revocations: connection lost; reconnecting");
                    }
                    Err(e) => tracing::warn!(error = %e, "revocations: subscribing failed"),
                }
                me.invalidate();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expert(expires_ms: Option<u64>) -> Expert {
        Expert {
            id: "e1".into(),
            name: "ann".into(),
            role: mp_store::Role::Expert,
            created_ms: 0,
            expires_ms,
            revoked_ms: None,
        }
    }

    #[test]
    fn a_revocation_during_a_read_and_an_expiry_are_never_served_from_the_cache() {
        let cache = AuthCache::default();
        let before = cache.epoch();
        cache.put("t", &expert(None), before);
        assert!(cache.get("t").is_some());
        // A read began, a revocation arrived, then the read's (stale) answer was cached.
        let read = cache.epoch();
        cache.invalidate();
        cache.put("t", &expert(None), read);
        assert!(cache.get("t").is_none(), "stale entry served");
        cache.put("t", &expert(None), cache.epoch());
        assert!(cache.get("t").is_some());
        // Expired a moment ago: not served although cached just now.
        cache.put("u", &expert(Some(mp_store::now_ms() - 1)), cache.epoch());
        assert!(cache.get("u").is_none());
    }
}

//! Memoised functions on the key/value cache (feature `cached`): [`Memo`], a store for
//! the `cached` crate's `#[concurrent_cached]` macro, and its own single-flight
//! [`Memo::get_or_compute`].
//!
//! A memo is a name and a TTL over `cache_entries`: the result for argument `k` is the
//! entry `"{name}:{k}"`, so memoised results expire, are cleaned up, bounded and shared
//! between processes like every other kv entry.

use std::fmt::{self, Display};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::background::Worker;
use crate::cache::Cache;
use crate::caches::KvCache;
use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::expiry::ttl_interval;
use crate::validation::check_key;

/// A memoised function's results in the key/value cache: argument `K` to result `V`,
/// each stored as the kv entry `"{name}:{key}"` (the key's `Display` form) for the
/// memo's TTL. Made by [`CacheManager::memo`](crate::CacheManager::memo).
///
/// Two ways to use it:
///
/// - [`get_or_compute`](Self::get_or_compute): concurrent misses on one key, in any
///   thread of any process, run the computation once (the kv cache's single flight,
///   as [`KvCache::get_or_set`]).
/// - As the store of the `cached` crate's `#[concurrent_cached]` macro, through its
///   `ConcurrentCached` implementation (`ty` and `create` name the memo, `map_error`
///   converts [`Error`]). The macro's expansion reads the store, calls the function
///   and writes the result itself, so it cannot route through single flight:
///   concurrent first calls on one key may each run the function (each stores the
///   same result). Use `get_or_compute` where that matters.
///
/// ```no_run
/// use std::sync::LazyLock;
/// use std::time::Duration;
/// use cached::macros::concurrent_cached;
/// use pgcache::{CacheManager, Error};
///
/// static CACHE: LazyLock<CacheManager> =
///     LazyLock::new(|| CacheManager::from_env().expect("the cache starts"));
///
/// #[concurrent_cached(
///     ty = "pgcache::Memo<u64, String>",
///     create = r#"{ CACHE.memo("user_name:v1", Duration::from_secs(300)).expect("a valid memo") }"#,
///     map_error = r#"|e| e"#
/// )]
/// fn user_name(id: u64) -> Result<String, Error> {
///     Ok(format!("user {id}")) // the expensive lookup
/// }
///
/// let name = user_name(42)?; // computed, stored as `user_name:v1:42`
/// let again = user_name(42)?; // read back
///
/// // The same, with single flight.
/// let memo = CACHE.memo::<u64, String>("user_name:v1", Duration::from_secs(300))?;
/// let name = memo.get_or_compute(&42, || Ok::<_, Error>(format!("user {}", 42)))?;
/// # Ok::<(), Error>(())
/// ```
///
/// A stored result that no longer reads as a `V` (the function's type changed) is
/// an [`Error::Json`] on lookup, as for every kv read: put a version in the name
/// (`user_name:v2`) when `V` changes.
pub struct Memo<K, V> {
    cluster: Arc<Cluster>,
    /// Held so the janitors keep cleaning up while a memo lives, as for a manager.
    _janitors: Arc<Vec<Worker>>,
    name: String,
    /// The TTL in nanoseconds: `ConcurrentCached::set_ttl` changes it through `&self`.
    ttl_nanos: AtomicU64,
    /// Whether a hit restarts the entry's TTL (`ConcurrentCached::set_refresh_on_hit`).
    refresh: AtomicBool,
    types: PhantomData<fn(K) -> V>,
}

impl<K, V> fmt::Debug for Memo<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memo")
            .field("name", &self.name)
            .field("ttl", &self.ttl())
            .field("refresh", &self.refresh.load(Ordering::Relaxed))
            .field("key", &std::any::type_name::<K>())
            .field("value", &std::any::type_name::<V>())
            .finish()
    }
}

/// `ttl` in nanoseconds; a TTL beyond `u64` nanoseconds (584 years) saturates, and is
/// refused by the next write as any TTL over [`MAX_TTL`](crate::MAX_TTL) is.
fn nanos(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX)
}

impl<K, V> Memo<K, V> {
    /// Checks the name and TTL before any call: the name is a kv key prefix.
    pub(crate) fn new(
        cluster: Arc<Cluster>,
        janitors: Arc<Vec<Worker>>,
        name: &str,
        ttl: Duration,
    ) -> Result<Self> {
        check_key(name).map_err(|e| match e {
            Error::InvalidInput { reason, .. } => Error::invalid("memo name", reason),
            other => other,
        })?;
        ttl_interval(ttl)?;
        Ok(Memo {
            cluster,
            _janitors: janitors,
            name: name.to_owned(),
            ttl_nanos: AtomicU64::new(nanos(ttl)),
            refresh: AtomicBool::new(false),
            types: PhantomData,
        })
    }

    /// The memo's name, the prefix of its keys.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How long a computed result is kept.
    pub fn ttl(&self) -> Duration {
        Duration::from_nanos(self.ttl_nanos.load(Ordering::Relaxed))
    }

    /// Deletes every result of this memo (the kv entries under `"{name}:"`); returns
    /// how many were removed.
    ///
    /// # Errors
    /// [`Error::Unsupported`](crate::Error::Unsupported) when key/value keys are
    /// stored hashed (`hash_kv_keys`), which have no prefixes; a connection or
    /// database error.
    pub fn clear(&self) -> Result<u64> {
        KvCache::new(&self.cluster).delete_prefix(&format!("{}:", self.name))
    }
}

impl<K: Display, V: Serialize + DeserializeOwned + Send + 'static> Memo<K, V> {
    /// The kv key holding `key`'s result: `"{name}:{key}"`.
    pub fn kv_key(&self, key: &K) -> String {
        format!("{}:{key}", self.name)
    }

    fn kv(&self) -> KvCache<'_, V> {
        KvCache::new(&self.cluster).typed::<V>()
    }

    /// `key`'s stored result, or `compute`'s, stored for the memo's TTL; of
    /// concurrent callers on one key, in any process, one computes and the others
    /// wait for its result ([`KvCache::get_or_set`]).
    ///
    /// # Errors
    /// `compute`'s error (nothing stored), or a cache error converted into `E`: a key
    /// whose `"{name}:{key}"` is not a valid kv key, a stored result that is not a
    /// `V`, [`Error::ComputeTimeout`] after waiting too long for another caller's
    /// result, or a connection or database error.
    pub fn get_or_compute<E, F>(&self, key: &K, compute: F) -> Result<V, E>
    where
        F: FnOnce() -> Result<V, E>,
        E: From<Error>,
    {
        self.kv().get_or_set(&self.kv_key(key), self.ttl(), compute)
    }
}

/// The `cached` crate's store trait: `#[concurrent_cached(ty = "pgcache::Memo<K, V>",
/// create = ..., map_error = ...)]`. Every method is one kv operation on
/// `"{name}:{key}"` and fails with [`Error`].
impl<K, V> cached::ConcurrentCached<K, V> for Memo<K, V>
where
    K: Display + Clone,
    V: Serialize + DeserializeOwned + Send + 'static,
{
    type Error = Error;

    /// The live result; with refresh on hit, its TTL restarts (one statement).
    fn cache_get(&self, key: &K) -> Result<Option<V>> {
        if self.refresh.load(Ordering::Relaxed) {
            self.kv().get_touch(&self.kv_key(key), self.ttl())
        } else {
            self.kv().get(&self.kv_key(key))
        }
    }

    /// Stores `value` for the memo's TTL and returns the live result it replaced.
    /// The previous result is read just before the write, not atomically with it;
    /// one that no longer reads as a `V` is returned as `None` and overwritten.
    fn cache_set(&self, key: K, value: V) -> Result<Option<V>> {
        let (kv, key) = (self.kv(), self.kv_key(&key));
        let previous = match kv.get(&key) {
            Ok(previous) => previous,
            Err(Error::Json(_)) => None,
            Err(error) => return Err(error),
        };
        kv.set_with_ttl(&key, &value, self.ttl())?;
        Ok(previous)
    }

    /// Deletes the result, returning it if it was live (atomically: of concurrent
    /// callers one gets it).
    fn cache_remove(&self, key: &K) -> Result<Option<V>> {
        self.kv().get_del(&self.kv_key(key))
    }

    /// As `cache_remove`: an expired result is deleted but not
    /// returned, as for the crate's Redis store (expiry is judged by the database).
    fn cache_remove_entry(&self, key: &K) -> Result<Option<(K, V)>> {
        Ok(self.cache_remove(key)?.map(|value| (key.clone(), value)))
    }

    /// Deletes the result without reading it; true if it was live.
    fn cache_delete(&self, key: &K) -> Result<bool> {
        self.kv().delete(&self.kv_key(key))
    }

    fn set_refresh_on_hit(&self, refresh: bool) -> bool {
        self.refresh.swap(refresh, Ordering::Relaxed)
    }

    fn ttl(&self) -> Option<Duration> {
        Some(Memo::ttl(self))
    }

    /// Changes the TTL of results stored from now on; stored ones keep theirs.
    fn set_ttl(&self, ttl: Duration) -> Option<Duration> {
        Some(Duration::from_nanos(
            self.ttl_nanos.swap(nanos(ttl), Ordering::Relaxed),
        ))
    }
}

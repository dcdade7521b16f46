//! The async face (feature `tokio`): [`AsyncCacheManager`], over the same engine as
//! the blocking API.
//!
//! A near-cache hit is answered on the calling task: no thread hop, no wait. What
//! needs the database runs on tokio's blocking threads, at most as many at once as
//! the pools have connections (a semaphore; the others wait asynchronously,
//! holding no thread), inside the caller's tracing span. Single flight's waiters
//! sleep on tokio's timer between polls, and a computing future that is dropped
//! or panics releases its lease at once.

use std::borrow::Borrow;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::cache::{
    get_entry, get_from_memory, get_many_entries, get_many_from_memory, lookup, Cache, Storage,
};
use crate::caches::{
    AudioChunkTable, EmbeddingTable, KvCache, LlmResponseTable, VectorSearchTable,
};
use crate::error::{Error, Result};
use crate::kind::CacheKind;
use crate::manager::CacheManager;
use crate::single_flight::{
    refresh_failed, release_lease, store, Due, Flight, Poll, Refreshing, Start, Won,
};
use crate::table::{TypedCache, TypedTable};

/// The async face of a [`CacheManager`]: what a tokio service calls. Cheap to clone
/// (two `Arc`s); made by [`CacheManager::to_async`].
///
/// ```no_run
/// # async fn handler(cache: pgcache::AsyncCacheManager) -> pgcache::Result<()> {
/// let hit = cache.kv().get("user:42:profile:v2").await?;
/// cache.kv().set("user:42:profile:v2", serde_json::json!({"name": "Ada"})).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct AsyncCacheManager {
    manager: CacheManager,
    /// One permit per blocking call running at once.
    permits: Arc<Semaphore>,
}

impl CacheManager {
    /// The async face of this manager (feature `tokio`), sharing its pools, near
    /// caches and counters. Its blocking calls are bounded by the pools' sizes (the
    /// sum of the shards' [`PoolStatus::max_size`](crate::PoolStatus::max_size));
    /// see [`AsyncCacheManager::max_blocking`].
    pub fn to_async(&self) -> AsyncCacheManager {
        let connections: u32 = self.pool_status().iter().map(|pool| pool.max_size).sum();
        AsyncCacheManager {
            manager: self.clone(),
            permits: Arc::new(Semaphore::new(connections.max(1) as usize)),
        }
    }
}

impl AsyncCacheManager {
    /// The same face with at most `calls` blocking calls at once (at least one);
    /// the default is the pools' connections, since a call beyond them would only
    /// hold a thread while it waits for one.
    #[must_use]
    pub fn max_blocking(mut self, calls: usize) -> Self {
        self.permits = Arc::new(Semaphore::new(calls.max(1)));
        self
    }

    /// The blocking manager underneath, for calls made from blocking code.
    pub fn blocking(&self) -> &CacheManager {
        &self.manager
    }

    /// Runs any blocking call of the manager (statistics, cleanup, warmup, a `*_in`
    /// call on a connection) on a blocking thread, counted in the bound, inside the
    /// caller's span.
    ///
    /// ```no_run
    /// # async fn report(cache: pgcache::AsyncCacheManager) -> pgcache::Result<()> {
    /// let stats = cache.run(|cache| cache.stats()).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Panics
    /// When `work` panics (the panic is resumed on the calling task), or when the
    /// runtime shuts down under the call.
    pub async fn run<R, F>(&self, work: F) -> R
    where
        F: FnOnce(&CacheManager) -> R + Send + 'static,
        R: Send + 'static,
    {
        // `Semaphore::close` is never called: acquiring cannot fail.
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let manager = self.manager.clone();
        // Spans do not cross to the blocking thread on their own.
        let span = tracing::Span::current();
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _entered = span.enter();
            work(&manager)
        });
        match task.await {
            Ok(value) => value,
            Err(error) => match error.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(error) => panic!("pgcache: a blocking call was cancelled: {error}"),
            },
        }
    }

    /// The key/value cache, holding `serde_json::Value`s; see
    /// [`AsyncCache::typed`] for your own type.
    pub fn kv(&self) -> AsyncCache<'_, KvTable> {
        AsyncCache::new(self)
    }

    /// The embedding cache.
    pub fn embedding(&self) -> AsyncCache<'_, EmbeddingTable> {
        AsyncCache::new(self)
    }

    /// The vector-search results cache.
    pub fn vector_search(&self) -> AsyncCache<'_, VectorSearchTable> {
        AsyncCache::new(self)
    }

    /// The LLM response cache.
    pub fn llm_response(&self) -> AsyncCache<'_, LlmResponseTable> {
        AsyncCache::new(self)
    }

    /// The TTS audio chunk cache.
    pub fn audio_chunk(&self) -> AsyncCache<'_, AudioChunkTable> {
        AsyncCache::new(self)
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A cache table of the async face: names the blocking handle its calls run on.
/// Implemented by [`KvTable`] and the typed tables' types ([`EmbeddingTable`], ...);
/// cannot be implemented outside the crate.
pub trait AsyncTable: sealed::Sealed + Send + Sync + 'static {
    /// What identifies an entry (as the blocking handle's).
    type Key: ?Sized + ToOwned<Owned = Self::OwnedKey> + Sync;
    /// The key, owned, as it crosses to a blocking thread.
    type OwnedKey: Borrow<Self::Key> + Clone + Send + Sync + 'static;
    /// What is stored.
    type Value: Send + Sync + 'static;
    /// What a hit returns.
    type Entry: Send + 'static;
    /// The blocking handle.
    type Blocking<'m>: Cache<Key = Self::Key, Value = Self::Value, Entry = Self::Entry>;

    /// The blocking handle on `manager`, with `ttl` as its default TTL when given.
    fn open(manager: &CacheManager, ttl: Option<Duration>) -> Self::Blocking<'_>;
}

/// The key/value table of the async face, holding `V`s.
#[derive(Debug)]
pub struct KvTable<V = serde_json::Value>(PhantomData<fn() -> V>);

impl<V> sealed::Sealed for KvTable<V> {}

impl<V> AsyncTable for KvTable<V>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Key = str;
    type OwnedKey = String;
    type Value = V;
    type Entry = V;
    type Blocking<'m> = KvCache<'m, V>;

    fn open(manager: &CacheManager, ttl: Option<Duration>) -> KvCache<'_, V> {
        let handle = manager.kv().typed::<V>();
        match ttl {
            Some(ttl) => handle.with_default_ttl(ttl),
            None => handle,
        }
    }
}

macro_rules! typed_tables {
    ($($table:ty => $open:ident),* $(,)?) => {$(
        impl sealed::Sealed for $table {}

        impl AsyncTable for $table {
            type Key = <$table as TypedTable>::Key;
            type OwnedKey = <$table as TypedTable>::Key;
            type Value = <$table as TypedTable>::Value;
            type Entry = <$table as TypedTable>::Entry;
            type Blocking<'m> = TypedCache<'m, $table>;

            fn open(manager: &CacheManager, ttl: Option<Duration>) -> TypedCache<'_, $table> {
                let handle = manager.$open();
                match ttl {
                    Some(ttl) => handle.with_default_ttl(ttl),
                    None => handle,
                }
            }
        }
    )*};
}

typed_tables!(
    EmbeddingTable => embedding,
    VectorSearchTable => vector_search,
    LlmResponseTable => llm_response,
    AudioChunkTable => audio_chunk,
);

/// Which cache `T` is.
fn kind_of<T: AsyncTable>() -> CacheKind {
    <T::Blocking<'static> as Storage>::KIND
}

/// The value of a hit, without its metadata.
fn value_of<T: AsyncTable>(entry: T::Entry) -> T::Value {
    <T::Blocking<'static> as Storage>::into_value(entry)
}

/// An async handle on one cache table: what [`AsyncCacheManager::kv`] and its
/// siblings return. The operations of the blocking [`Cache`] trait, as futures;
/// any other blocking call of the table through [`run`](Self::run).
pub struct AsyncCache<'m, T> {
    cache: &'m AsyncCacheManager,
    ttl: Option<Duration>,
    table: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for AsyncCache<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncCache")
            .field("table", &std::any::type_name::<T>())
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl<T> Clone for AsyncCache<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for AsyncCache<'_, T> {}

impl<'m, T: AsyncTable> AsyncCache<'m, T> {
    fn new(cache: &'m AsyncCacheManager) -> Self {
        AsyncCache {
            cache,
            ttl: None,
            table: PhantomData,
        }
    }

    /// A handle whose [`set`](Self::set) and `get_or_compute` use `ttl` instead of
    /// this cache's default preset.
    #[must_use]
    pub fn with_default_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The blocking handle, on the calling task.
    fn here(&self) -> T::Blocking<'m> {
        T::open(&self.cache.manager, self.ttl)
    }

    /// Runs `work` on the blocking handle on a blocking thread, as
    /// [`AsyncCacheManager::run`] does: for the table's calls with no async form
    /// (`llm_response().top(..)`, the `*_in` calls on a connection, ...).
    ///
    /// # Panics
    /// As [`AsyncCacheManager::run`].
    pub async fn run<R, F>(&self, work: F) -> R
    where
        F: for<'x> FnOnce(T::Blocking<'x>) -> R + Send + 'static,
        R: Send + 'static,
    {
        let ttl = self.ttl;
        self.cache
            .run(move |manager| work(T::open(manager, ttl)))
            .await
    }

    /// Reads a live entry: from the near cache on the calling task when it holds
    /// one, else on a blocking thread. As [`Cache::get`].
    ///
    /// # Errors
    /// As [`Cache::get`].
    pub async fn get(&self, key: &T::Key) -> Result<Option<T::Entry>> {
        if let Some(found) = get_from_memory(&self.here(), key) {
            return found.map(Some);
        }
        let key = key.to_owned();
        self.run(move |cache| get_entry(&cache, key.borrow(), false))
            .await
    }

    /// Reads many entries in one round trip, in `keys` order: those the near cache
    /// holds on the calling task, the rest (if any) on a blocking thread. As
    /// [`Cache::get_many`].
    ///
    /// # Errors
    /// As [`Cache::get_many`].
    pub async fn get_many(&self, keys: &[&T::Key]) -> Result<Vec<Option<T::Entry>>> {
        let (mut found, wanted, memory) = match get_many_from_memory(&self.here(), keys) {
            Some(part) => {
                let part = part?;
                if part.missing.is_empty() {
                    return Ok(part.found);
                }
                (part.found, part.missing, false)
            }
            // No near cache (or a bad key, which the full read reports).
            None => (Vec::new(), (0..keys.len()).collect(), true),
        };
        let owned: Vec<T::OwnedKey> = wanted.iter().map(|&i| keys[i].to_owned()).collect();
        let read = self
            .run(move |cache| {
                let keys: Vec<&T::Key> = owned.iter().map(Borrow::borrow).collect();
                get_many_entries(&cache, &keys, memory)
            })
            .await?;
        if memory {
            return Ok(read);
        }
        for (i, entry) in wanted.into_iter().zip(read) {
            found[i] = entry;
        }
        Ok(found)
    }

    /// Stores an entry with the handle's default TTL. As [`Cache::set`].
    ///
    /// # Errors
    /// As [`Cache::set`].
    pub async fn set(&self, key: &T::Key, value: T::Value) -> Result<()> {
        let key = key.to_owned();
        self.run(move |cache| cache.set(key.borrow(), &value)).await
    }

    /// Stores an entry expiring `ttl` from now. As [`Cache::set_with_ttl`].
    ///
    /// # Errors
    /// As [`Cache::set_with_ttl`].
    pub async fn set_with_ttl(&self, key: &T::Key, value: T::Value, ttl: Duration) -> Result<()> {
        let key = key.to_owned();
        self.run(move |cache| cache.set_with_ttl(key.borrow(), &value, ttl))
            .await
    }

    /// Stores many entries in one statement; all or none. As [`Cache::set_many`].
    ///
    /// # Errors
    /// As [`Cache::set_many`].
    pub async fn set_many(
        &self,
        entries: Vec<(T::OwnedKey, T::Value)>,
        ttl: Duration,
    ) -> Result<()> {
        self.run(move |cache| {
            let entries: Vec<(&T::Key, &T::Value)> =
                entries.iter().map(|(k, v)| (k.borrow(), v)).collect();
            cache.set_many(&entries, ttl)
        })
        .await
    }

    /// Deletes an entry; true if a live entry was removed. As [`Cache::delete`].
    ///
    /// # Errors
    /// As [`Cache::delete`].
    pub async fn delete(&self, key: &T::Key) -> Result<bool> {
        let key = key.to_owned();
        self.run(move |cache| cache.delete(key.borrow())).await
    }

    /// Deletes many entries in one statement. As [`Cache::delete_many`].
    ///
    /// # Errors
    /// As [`Cache::delete_many`].
    pub async fn delete_many(&self, keys: &[&T::Key]) -> Result<u64> {
        let keys: Vec<T::OwnedKey> = keys.iter().map(|key| (*key).to_owned()).collect();
        self.run(move |cache| {
            let keys: Vec<&T::Key> = keys.iter().map(Borrow::borrow).collect();
            cache.delete_many(&keys)
        })
        .await
    }

    /// Cache-aside with single flight, the computation a future: the live value, or
    /// `compute`'s, stored with the handle's default TTL. As
    /// [`Cache::get_or_compute`]: concurrent misses on one key, in any task of any
    /// process sharing the database, run one computation, on the runtime of the
    /// task that won the key's lease; the others wait on tokio's timer, holding no
    /// thread and no connection. When the computing future returns an error,
    /// panics or is dropped (its task cancelled), the lease is released at once and
    /// a waiter computes. Early refresh as [`Cache::get_or_compute`]'s: the task
    /// that takes the lease of a value due for refresh runs `compute` and returns
    /// its value, the others return the current value at once.
    ///
    /// # Errors
    /// As [`Cache::get_or_compute`].
    pub async fn get_or_compute<E, F, Fut>(&self, key: &T::Key, compute: F) -> Result<T::Value, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T::Value, E>>,
        E: From<Error>,
    {
        let ttl = self.here().default_ttl();
        self.get_or_compute_with_ttl(key, ttl, compute).await
    }

    /// [`get_or_compute`](Self::get_or_compute) with an explicit TTL.
    ///
    /// # Errors
    /// As [`Cache::get_or_compute`].
    pub async fn get_or_compute_with_ttl<E, F, Fut>(
        &self,
        key: &T::Key,
        ttl: Duration,
        compute: F,
    ) -> Result<T::Value, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T::Value, E>>,
        E: From<Error>,
    {
        if let Some(found) = get_from_memory(&self.here(), key) {
            return Ok(value_of::<T>(found?));
        }
        let owned = key.to_owned();
        let start = {
            let key = owned.clone();
            self.run(move |cache| {
                let found = lookup(&cache, key.borrow(), false, true)?;
                Flight::start(&cache, key.borrow(), ttl, found)
            })
            .await?
        };
        let mut flight = match start {
            Start::Found(value) => return Ok(value),
            Start::Alone => return compute().await,
            Start::Refresh(due) => return self.refresh((owned, ttl), due, compute).await,
            Start::Flight(flight) => flight,
        };
        let lease = loop {
            let (key, face) = (owned.clone(), self.cache.clone());
            let (returned, polled) = self
                .run(move |cache| {
                    let polled = flight.poll(&cache, key.borrow()).map(|poll| match poll {
                        // Guarded here: if the caller is gone by the time this call
                        // returns, dropping its result releases the lease.
                        Poll::Won(won) => Polled::Won(Lease::<T> {
                            cache: face,
                            key,
                            won: Some(won),
                        }),
                        Poll::Found(entry) => Polled::Found(entry),
                        Poll::Busy => Polled::Busy,
                        Poll::Unavailable => Polled::Unavailable,
                    });
                    (flight, polled)
                })
                .await;
            flight = returned;
            match polled? {
                Polled::Found(entry) => return Ok(value_of::<T>(entry)),
                Polled::Won(lease) => break Some(lease),
                Polled::Unavailable => break None,
                Polled::Busy => tokio::time::sleep(flight.pause(kind_of::<T>())?).await,
            }
        };
        // An `Err`, a panic or a drop of this future drops `lease`, which releases it.
        let started = Instant::now();
        let value = compute().await?;
        self.store(owned, ttl, value, lease, started.elapsed())
            .await
    }

    /// A hit due for refresh, as the blocking face's: the task that takes the lease
    /// runs `compute` and returns its value, the others the value read at once; a
    /// failed computation is logged and the value read returned, and a failed,
    /// panicking or dropped one releases the lease.
    async fn refresh<E: From<Error>, Fut: Future<Output = Result<T::Value, E>>>(
        &self,
        (key, ttl): (T::OwnedKey, Duration),
        due: Due<T::Value>,
        compute: impl FnOnce() -> Fut,
    ) -> Result<T::Value, E> {
        let (face, owned) = (self.cache.clone(), key.clone());
        let (due, tried) = self
            .run(move |cache| {
                let tried = match due.try_refresh(&cache, owned.borrow()) {
                    Refreshing::Won(won) => Polled::Won(Lease::<T> {
                        cache: face,
                        key: owned,
                        won: Some(won),
                    }),
                    Refreshing::Newer(entry) => Polled::Found(entry),
                    Refreshing::Busy => Polled::Busy,
                };
                (due, tried)
            })
            .await;
        let lease = match tried {
            Polled::Won(lease) => lease,
            Polled::Found(entry) => return Ok(value_of::<T>(entry)),
            Polled::Busy | Polled::Unavailable => return Ok(due.current),
        };
        let started = Instant::now();
        match compute().await {
            Ok(value) => {
                self.store(key, ttl, value, Some(lease), started.elapsed())
                    .await
            }
            Err(_) => {
                drop(lease);
                refresh_failed(kind_of::<T>());
                Ok(due.current)
            }
        }
    }

    /// Stores a value computed in `took` on a blocking thread and releases `lease`
    /// (none: computed without single flight); the value back, or the store's error.
    async fn store<E: From<Error>>(
        &self,
        key: T::OwnedKey,
        ttl: Duration,
        value: T::Value,
        lease: Option<Lease<T>>,
        took: Duration,
    ) -> Result<T::Value, E> {
        let won = lease.and_then(|mut lease| lease.won.take());
        let (value, stored) = self
            .run(move |cache| {
                let stored = store(&cache, key.borrow(), &value, ttl, won.as_ref(), took);
                if let Some(won) = &won {
                    release_lease(&cache, key.borrow(), won);
                }
                (value, stored)
            })
            .await;
        stored?;
        Ok(value)
    }
}

/// What a poll of an async `get_or_compute` found: [`Poll`], a won lease guarded.
enum Polled<T: AsyncTable> {
    Found(T::Entry),
    Won(Lease<T>),
    Busy,
    Unavailable,
}

/// A lease won by an async `get_or_compute`, released on a blocking thread when
/// dropped while still held: the computation failed, panicked or was cancelled
/// (or the caller was gone when the poll that won it returned).
struct Lease<T: AsyncTable> {
    cache: AsyncCacheManager,
    key: T::OwnedKey,
    won: Option<Won>,
}

impl<T: AsyncTable> Drop for Lease<T> {
    fn drop(&mut self) {
        let Some(won) = self.won.take() else {
            return;
        };
        let manager = self.cache.manager.clone();
        let key = self.key.clone();
        let release = move || release_lease(&T::open(&manager, None), key.borrow(), &won);
        match tokio::runtime::Handle::try_current() {
            // The drop must not block the task; the release is one short statement.
            Ok(runtime) => drop(runtime.spawn_blocking(release)),
            // Dropped outside a runtime: nothing else to run it on.
            Err(_) => release(),
        }
    }
}

/// Tags moved to a blocking thread, and borrowed back there.
fn owned(tags: &[&str]) -> Vec<String> {
    tags.iter().map(|&tag| tag.to_owned()).collect()
}

fn borrowed(tags: &[String]) -> Vec<&str> {
    tags.iter().map(String::as_str).collect()
}

/// The key/value cache's own operations (Redis's), each on a blocking thread.
impl<'m, V> AsyncCache<'m, KvTable<V>>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// A handle that stores and returns `W` instead (same table, same keys).
    #[must_use]
    pub fn typed<W>(self) -> AsyncCache<'m, KvTable<W>> {
        AsyncCache {
            cache: self.cache,
            ttl: self.ttl,
            table: PhantomData,
        }
    }

    /// As [`KvCache::incr`].
    ///
    /// # Errors
    /// As [`KvCache::incr`].
    pub async fn incr(&self, key: &str, delta: i64, ttl: Duration) -> Result<i64> {
        let key = key.to_owned();
        self.run(move |kv| kv.incr(&key, delta, ttl)).await
    }

    /// As [`KvCache::decr`].
    ///
    /// # Errors
    /// As [`KvCache::decr`].
    pub async fn decr(&self, key: &str, delta: i64, ttl: Duration) -> Result<i64> {
        let key = key.to_owned();
        self.run(move |kv| kv.decr(&key, delta, ttl)).await
    }

    /// As [`KvCache::set_nx`].
    ///
    /// # Errors
    /// As [`KvCache::set_nx`].
    pub async fn set_nx(&self, key: &str, value: V, ttl: Duration) -> Result<bool> {
        let key = key.to_owned();
        self.run(move |kv| kv.set_nx(&key, &value, ttl)).await
    }

    /// As [`KvCache::get_del`].
    ///
    /// # Errors
    /// As [`KvCache::get_del`].
    pub async fn get_del(&self, key: &str) -> Result<Option<V>> {
        let key = key.to_owned();
        self.run(move |kv| kv.get_del(&key)).await
    }

    /// As [`KvCache::get_touch`].
    ///
    /// # Errors
    /// As [`KvCache::get_touch`].
    pub async fn get_touch(&self, key: &str, ttl: Duration) -> Result<Option<V>> {
        let key = key.to_owned();
        self.run(move |kv| kv.get_touch(&key, ttl)).await
    }

    /// As [`KvCache::exists`].
    ///
    /// # Errors
    /// As [`KvCache::exists`].
    pub async fn exists(&self, key: &str) -> Result<bool> {
        let key = key.to_owned();
        self.run(move |kv| kv.exists(&key)).await
    }

    /// As [`KvCache::ttl`].
    ///
    /// # Errors
    /// As [`KvCache::ttl`].
    pub async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        let key = key.to_owned();
        self.run(move |kv| kv.ttl(&key)).await
    }

    /// As [`KvCache::touch`].
    ///
    /// # Errors
    /// As [`KvCache::touch`].
    pub async fn touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        let key = key.to_owned();
        self.run(move |kv| kv.touch(&key, ttl)).await
    }

    /// As [`KvCache::delete_prefix`].
    ///
    /// # Errors
    /// As [`KvCache::delete_prefix`].
    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        let prefix = prefix.to_owned();
        self.run(move |kv| kv.delete_prefix(&prefix)).await
    }

    /// As [`KvCache::set_tagged`] (with the default TTL).
    ///
    /// # Errors
    /// As [`KvCache::set_tagged`].
    pub async fn set_tagged(&self, key: &str, value: V, tags: &[&str]) -> Result<()> {
        let (key, tags) = (key.to_owned(), owned(tags));
        self.run(move |kv| kv.set_tagged(&key, &value, &borrowed(&tags)))
            .await
    }

    /// As [`KvCache::invalidate_tags`] (one tag: `&[tag]`).
    ///
    /// # Errors
    /// As [`KvCache::invalidate_tags`].
    pub async fn invalidate_tags(&self, tags: &[&str]) -> Result<()> {
        let tags = owned(tags);
        self.run(move |kv| kv.invalidate_tags(&borrowed(&tags)))
            .await
    }

    /// As [`KvCache::set_bytes`].
    ///
    /// # Errors
    /// As [`KvCache::set_bytes`].
    pub async fn set_bytes(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<()> {
        let key = key.to_owned();
        self.run(move |kv| kv.set_bytes(&key, &value, ttl)).await
    }

    /// As [`KvCache::get_bytes`].
    ///
    /// # Errors
    /// As [`KvCache::get_bytes`].
    pub async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_owned();
        self.run(move |kv| kv.get_bytes(&key)).await
    }

    /// Cache-aside with an explicit TTL, the computation a future (Redis-style
    /// `get` then `set ... EX`); the same as
    /// [`get_or_compute_with_ttl`](Self::get_or_compute_with_ttl), single flight
    /// included.
    ///
    /// # Errors
    /// As [`Cache::get_or_compute`].
    pub async fn get_or_set<E, F, Fut>(&self, key: &str, ttl: Duration, compute: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: From<Error>,
    {
        self.get_or_compute_with_ttl(key, ttl, compute).await
    }
}

//! The key/value cache (`cache_entries`): the Redis GET/SET/DEL replacement.
//!
//! Here: the handle, its bytes API and what its parts share. The table's one
//! `Storage` over its two payload columns (JSON values, bytes) is `storage.rs`; the
//! statements and rows are `statements.rs`; the Redis-style operations beyond
//! [`Cache`] are `redis.rs`; tags are `tags.rs`.

use std::borrow::Cow;
use std::marker::PhantomData;
use std::time::Duration;

use diesel::pg::PgConnection;

use crate::cache::{distinct_in_write_order, store_rows, write_rows_in, Cache, Handle};
use crate::cluster::Cluster;
use crate::codec::Codec;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::expiry::ttl_interval;
use crate::key::{KeyDigest, KeyHasher};
use crate::kind::CacheKind;
use crate::metrics::Op;
use crate::validation::check_key;

mod redis;
mod statements;
mod storage;
mod tags;

pub(crate) use statements::Row;
use storage::KvBytes;
pub(crate) use tags::sweep_invalidated;
pub use tags::{MAX_TAGS_PER_ENTRY, MAX_TAG_BYTES};

/// The key/value cache: string keys, values of any serde type stored as JSONB, or
/// opaque bytes stored exactly.
///
/// Keys are 1 to [`MAX_KEY_BYTES`](crate::MAX_KEY_BYTES) bytes of UTF-8 without NUL;
/// versioned keys like `user:42:profile:v2` are the norm. Values are
/// `serde_json::Value` unless you ask for a [`typed`](Self::typed) handle.
///
/// JSONB keeps JSON's meaning, not its text: numbers become `numeric` (`1e16` reads
/// back as `10000000000000000`, `-0.0` as `0.0`), object keys are reordered, a
/// duplicated key keeps its last value, whitespace is normalised. Values that must
/// come back byte for byte (protobuf, msgpack, images, JSON text as written) go
/// through [`set_bytes`](Self::set_bytes) and [`get_bytes`](Self::get_bytes). A key
/// holds one kind at a time; reading it as the other kind is
/// [`Error::WrongType`], never a miss.
///
/// ```no_run
/// use std::time::Duration;
/// use pgcache::{Cache, CacheManager};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Profile { name: String }
///
/// let cache = CacheManager::from_env()?;
/// let profiles = cache.kv().typed::<Profile>();
/// profiles.set_with_ttl("user:42:profile:v2", &Profile { name: "Ada".into() }, Duration::from_secs(60))?;
/// let hit: Option<Profile> = profiles.get("user:42:profile:v2")?;
/// profiles.delete_prefix("user:42:")?;
/// # Ok::<(), pgcache::Error>(())
/// ```
pub struct KvCache<'a, V = serde_json::Value> {
    handle: Handle<'a>,
    /// What its writes tag entries with ([`tagged`](Self::tagged)).
    tags: &'a [&'a str],
    value: PhantomData<fn() -> V>,
}

impl<V> std::fmt::Debug for KvCache<'_, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("ttl", &self.handle.ttl)
            .field("tags", &self.tags)
            .field("value", &std::any::type_name::<V>())
            .finish()
    }
}

impl<V> Clone for KvCache<'_, V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<V> Copy for KvCache<'_, V> {}

impl<'a> KvCache<'a> {
    pub(crate) fn new(cluster: &'a Cluster) -> Self {
        KvCache {
            handle: Handle::new(cluster),
            tags: &[],
            value: PhantomData,
        }
    }
}

impl<'a, V> KvCache<'a, V> {
    /// A handle that stores and returns `W` instead (same table, same keys).
    #[must_use]
    pub fn typed<W>(self) -> KvCache<'a, W> {
        KvCache {
            handle: self.handle,
            tags: self.tags,
            value: PhantomData,
        }
    }

    /// A handle whose [`set`](Cache::set) uses `ttl` instead of the medium preset.
    #[must_use]
    pub fn with_default_ttl(mut self, ttl: Duration) -> Self {
        self.handle.ttl = Some(ttl);
        self
    }

    /// The digest naming `key`'s single-flight lease (`cache_leases`), the same in
    /// every process.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a bad key.
    pub fn key_digest(&self, key: &str) -> Result<KeyDigest> {
        check_key(key)?;
        Ok(kv_digest(key))
    }

    /// The kv table, schema-qualified.
    pub(super) fn table(&self) -> &'a str {
        self.handle.front().tables().of(CacheKind::Kv)
    }

    /// The kv table and the tag table.
    fn tables(&self) -> statements::KvTables<'a> {
        statements::KvTables::of(self.handle.front().tables())
    }

    /// The engine of the shard holding `key`.
    pub(super) fn engine(&self, key: &str) -> &'a Engine {
        self.handle.cluster.engine_for(|| kv_digest(key))
    }

    /// The codec of this handle's configuration.
    pub(super) fn codec(&self) -> &'a Codec {
        self.handle.cluster.config().codec()
    }

    /// `key` checked, as stored: itself, or its keyed hash.
    pub(super) fn stored_key<'k>(&self, key: &'k str) -> Result<Cow<'k, str>> {
        check_key(key)?;
        Ok(self.codec().kv_key(key))
    }

    /// Evicts `key` (stored as `stored`) from this process's near cache, after a
    /// write outside the `Cache` trait's path.
    pub(super) fn evict_near(&self, key: &str, stored: &str) {
        if let Some(near) = self.engine(key).near() {
            near.invalidate(CacheKind::Kv, [stored.as_bytes()]);
        }
    }

    /// Empties this process's kv near cache, after a write of many keys.
    pub(super) fn evict_all_near(&self) {
        for (_, engine) in self.handle.cluster.shards() {
            if let Some(near) = engine.near() {
                near.invalidate_all(CacheKind::Kv);
            }
        }
    }
}

/// Bytes values: stored in the `bytes` column and returned byte for byte (see the
/// type's documentation for JSON versus bytes).
impl<'a, V> KvCache<'a, V> {
    /// This handle's bytes entries, read and written through the path every cache
    /// shares.
    fn bytes(&self) -> KvBytes<'a> {
        KvBytes {
            handle: self.handle,
            tags: self.tags,
        }
    }

    /// Stores `value` as opaque bytes, expiring `ttl` from now: returned exactly as
    /// given (any bytes, empty too), never parsed. Replaces a JSON entry of the key.
    ///
    /// # Errors
    /// A bad key or TTL (nothing is stored), or a connection or database error
    /// (skipped in fail-open mode).
    pub fn set_bytes(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        self.set_many_bytes(&[(key, value)], ttl)
    }

    /// Stores many bytes entries in one statement; all or none (a key given twice
    /// keeps its last value).
    ///
    /// # Errors
    /// As [`set_bytes`](Self::set_bytes); one bad key rejects the whole batch.
    pub fn set_many_bytes(&self, entries: &[(&str, &[u8])], ttl: Duration) -> Result<()> {
        store_rows(
            &self.bytes(),
            Op::SetMany,
            ttl,
            || self.bytes_rows(entries),
            &entries.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            None,
        )
    }

    /// [`set_bytes`](Self::set_bytes) on your connection, e.g. inside your own
    /// transaction.
    ///
    /// # Errors
    /// A bad key or TTL, or a database error.
    pub fn set_bytes_in(
        &self,
        conn: &mut PgConnection,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        let interval = ttl_interval(ttl)?;
        let rows = self.bytes_rows(&[(key, value)])?;
        write_rows_in(&self.bytes(), conn, &rows, interval)
    }

    /// Reads a live bytes entry, exactly as stored; `None` on a miss, on an expired
    /// entry, and when caching is disabled.
    ///
    /// # Errors
    /// [`Error::WrongType`] when `key` holds JSON; a bad key; a connection or
    /// database error (a miss instead in fail-open mode).
    pub fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.bytes().get(key)
    }

    /// Reads many bytes entries in one round trip, in `keys` order.
    ///
    /// # Errors
    /// As [`get_bytes`](Self::get_bytes): one key holding JSON fails the batch.
    pub fn get_many_bytes(&self, keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>> {
        self.bytes().get_many(keys)
    }

    /// [`get_bytes`](Self::get_bytes) on your connection.
    ///
    /// # Errors
    /// [`Error::WrongType`] when `key` holds JSON; a bad key; a database error.
    pub fn get_bytes_in(&self, conn: &mut PgConnection, key: &str) -> Result<Option<Vec<u8>>> {
        self.bytes().get_in(conn, key)
    }
}

impl<V> KvCache<'_, V> {
    /// Validates bytes entries (and this handle's tags) into rows with distinct
    /// keys (the last value of a key wins), in write order, encoded by the codec.
    fn bytes_rows<'e>(&self, entries: &[(&'e str, &'e [u8])]) -> Result<Vec<Row<'e>>> {
        tags::check_tags(self.tags)?;
        let rows = entries
            .iter()
            .map(|(key, value)| Row::bytes(key, value)?.encoded(self.codec()))
            .collect::<Result<Vec<_>>>()?;
        Ok(distinct_in_write_order::<KvBytes<'e>>(rows))
    }
}

/// The digest of a (checked) key/value key: it names the key's single-flight lease
/// and routes the key to its shard.
pub(super) fn kv_digest(key: &str) -> KeyDigest {
    KeyHasher::new("kv").text(key).finish()
}

/// What reading `key` as `requested` (`json` or `bytes`) reports when it holds
/// the other kind, `stored`.
pub(super) fn wrong_type(key: &str, stored: &'static str, requested: &'static str) -> Error {
    Error::WrongType {
        key: key.to_owned(),
        stored,
        requested,
    }
}

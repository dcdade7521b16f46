//! The typed-table core: one implementation of get, get_many, set, set_many, delete
//! and delete_many for every digest-keyed cache table (embeddings, vector searches,
//! LLM responses, audio chunks).
//!
//! A table module says only what is its own ([`TypedTable`]): its key and how it is
//! digested, its value and how it maps to a row, the column arrays of its upsert and
//! how a stored row decodes. Everything else is here, once: reading live rows by
//! digest (one prepared statement per table and shape), putting a batch back in
//! request order, counting hits where the table tracks them, batching upserts in key
//! order, and deleting by digest. The [`Cache`](crate::Cache) trait comes with it:
//! every `TypedTable` is a cache's `Storage`.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use diesel::data_types::PgInterval;
use diesel::pg::{Pg, PgConnection};
use diesel::{OptionalExtension, QueryResult, QueryableByName, RunQueryDsl};

use crate::cache::{Handle, NearRead, NearStorage, Storage};
mod live;
mod packing;
mod statements;

use crate::cluster::Cluster;
use crate::codec::Codec;
use crate::error::Result;
use crate::freshness::Freshness;
use crate::key::KeyDigest;
use crate::kind::CacheKind;
use crate::near::{NearKey, NearValue};
use crate::skipped::Skipped;
pub use live::Written;
use live::{Live, LiveRows};
pub use packing::Packing;
pub(crate) use statements::write_batches;
pub(crate) use statements::{column, UpsertColumns};
use statements::{delete_digests, UnnestUpsert};

/// One validated entry of table `T`, ready to upsert: its key's digest, the key and
/// value it was made from, and what [`TypedTable::encode`] made of them.
pub struct Row<'a, T: TypedTable + ?Sized> {
    pub(crate) digest: KeyDigest,
    pub(crate) key: &'a T::Key,
    pub(crate) value: &'a T::Value,
    pub(crate) encoded: T::Encoded,
}

impl<T: TypedTable + ?Sized> std::fmt::Debug for Row<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Row")
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl<T: TypedTable + ?Sized> Clone for Row<'_, T> {
    fn clone(&self) -> Self {
        Row {
            digest: self.digest,
            key: self.key,
            value: self.value,
            encoded: self.encoded.clone(),
        }
    }
}

/// A handle on the digest-keyed cache table `T`: what
/// [`CacheManager::embedding`](crate::CacheManager::embedding) and its siblings return,
/// under the names [`EmbeddingCache`](crate::EmbeddingCache),
/// [`VectorSearchCache`](crate::VectorSearchCache),
/// [`LlmResponseCache`](crate::LlmResponseCache) and
/// [`AudioChunkCache`](crate::AudioChunkCache). Every operation is in the
/// [`Cache`](crate::Cache) trait; each table adds its own few methods.
#[derive(Debug, Clone, Copy)]
pub struct TypedCache<'a, T> {
    handle: Handle<'a>,
    pub(crate) table: T,
}

impl<'a, T: TypedTable + Default> TypedCache<'a, T> {
    pub(crate) fn new(cluster: &'a Cluster) -> Self {
        TypedCache {
            handle: Handle::new(cluster),
            table: T::default(),
        }
    }
}

impl<'a, T> TypedCache<'a, T> {
    /// A handle whose [`set`](crate::Cache::set) uses `ttl` instead of this cache's
    /// default preset (named in the cache's documentation).
    #[must_use]
    pub fn with_default_ttl(mut self, ttl: Duration) -> Self {
        self.handle.ttl = Some(ttl);
        self
    }

    /// The shards this handle works through.
    pub(crate) fn cluster(&self) -> &'a Cluster {
        self.handle.cluster
    }

    /// The codec of this handle's configuration.
    fn codec(&self) -> &'a Codec {
        self.handle.cluster.config().codec()
    }
}

/// What one digest-keyed cache table is; implemented by a type naming the table
/// (`EmbeddingTable`, ...), the parameter of its [`TypedCache`].
///
/// Public only so [`TypedCache`]'s [`Cache`](crate::Cache) implementation may name
/// it; it lives in a private module and cannot be implemented outside the crate.
// `Sync`/`Send` bounds: a batch over several shards runs on a thread per shard.
pub trait TypedTable: Sync {
    /// Which cache this is.
    const CACHE: CacheKind;
    /// What the table calls the payload its codec packs (`response`, ...), bound
    /// into the payload's seal.
    const PAYLOAD: &'static str;
    /// What identifies an entry.
    type Key: ?Sized + Sync;
    /// What is stored.
    type Value: Sync;
    /// What a hit returns: the value with its metadata (also what a near cache
    /// keeps).
    type Entry: TableEntry<Value = Self::Value>;
    /// The columns an entry's key and value are converted to before the upsert binds
    /// them (`()` when they bind as they are).
    type Encoded: Clone + Send + Sync;
    /// A live row as read back (`SELECT *`, columns matched by name); its type also
    /// names the table's prepared statements.
    type Stored: QueryableByName<Pg> + 'static;

    /// Validates `key` and computes the digest its row is stored under.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a bad key.
    fn digest(key: &Self::Key) -> Result<KeyDigest>;

    /// Validates a value (the key is valid) and converts what needs converting; a
    /// payload the table packs goes through `packing`, bound to the entry.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a bad value.
    fn encode(key: &Self::Key, value: &Self::Value, packing: Packing<'_>) -> Result<Self::Encoded>;

    /// The payload bytes of a row (splits very large batches).
    fn row_bytes(row: &Row<'_, Self>) -> usize;

    /// The columns of `rows` besides `key_hash`, one
    /// [`column`] each, for their upsert.
    fn columns<'r>(rows: &'r [Row<'_, Self>]) -> impl UpsertColumns + 'r;

    /// The entry of a live row: its own columns (`stored`) and the ones every
    /// table has (`written`); a packed payload opened through `packing`. `None`
    /// when the codec cannot vouch for it (a miss).
    fn decode(stored: Self::Stored, written: &Written, packing: Packing<'_>)
        -> Option<Self::Entry>;

    /// Whether an entry found under `key`'s digest answers `key`: the vector-search
    /// cache checks the user as well, so a user never sees another's results.
    fn answers(_key: &Self::Key, _entry: &Self::Entry) -> bool {
        true
    }

    /// Whether this handle stores `key` at all (the audio cache skips long text): it
    /// is then neither read nor written.
    fn stores(&self, _key: &Self::Key) -> bool {
        true
    }
}

/// An entry as read from its table, with its freshness.
type Read<T> = (<T as TypedTable>::Entry, Freshness);

/// What a hit of a typed table returns: its value with the metadata of its row.
///
/// Public only so [`TypedTable`] may name it, like that trait.
pub trait TableEntry: Clone + Send + Sync + 'static {
    /// The value without its metadata.
    type Value;

    /// The value, the metadata dropped.
    fn into_value(self) -> Self::Value;

    /// The payload's bytes: what the entry weighs in a near cache.
    fn weight(&self) -> usize;
}

/// Reads the live entry stored under `digest` (`key`'s), with its freshness;
/// counts the hit where the table tracks hits.
fn read_one<T: TypedTable>(
    table: &TypedCache<'_, T>,
    conn: &mut PgConnection,
    key: &T::Key,
    digest: &KeyDigest,
) -> Result<Option<Read<T>>> {
    if !table.table.stores(key) {
        return Ok(None);
    }
    let found = LiveRows::<T, _>::new(table.table(), digest.as_bytes().as_slice())
        .get_result::<Live<T::Stored>>(conn)
        .optional()?
        .and_then(|live| decode::<T>(live, table.codec()).map(|(_, found)| found))
        .filter(|(entry, _)| T::answers(key, entry));
    count_hits(
        table.cluster(),
        T::CACHE,
        std::slice::from_ref(digest),
        std::slice::from_ref(&found),
    );
    Ok(found)
}

/// Reads many live entries in one statement, in `keys` order, each with its
/// freshness.
fn read_many<T: TypedTable>(
    table: &TypedCache<'_, T>,
    conn: &mut PgConnection,
    keys: &[&T::Key],
    digests: &[KeyDigest],
) -> Result<Vec<Option<Read<T>>>> {
    let wanted: Vec<&[u8]> = digests
        .iter()
        .zip(keys)
        .filter(|(_, k)| table.table.stores(k))
        .map(|(d, _)| d.as_bytes().as_slice())
        .collect();
    let mut by_digest = HashMap::with_capacity(wanted.len());
    if !wanted.is_empty() {
        let rows = LiveRows::<T, _>::new(table.table(), wanted).load::<Live<T::Stored>>(conn)?;
        by_digest.extend(
            rows.into_iter()
                .filter_map(|live| decode::<T>(live, table.codec())),
        );
    }
    // Per requested key, so a key asked for twice gets its entry twice.
    let found: Vec<Option<Read<T>>> = digests
        .iter()
        .zip(keys)
        .map(|(d, k)| by_digest.get(d).filter(|(e, _)| T::answers(k, e)).cloned())
        .collect();
    count_hits(table.cluster(), T::CACHE, digests, &found);
    Ok(found)
}

/// A live row's digest, entry and freshness; `None` when it does not decode.
fn decode<T: TypedTable>(
    Live {
        stored,
        written,
        facts,
    }: Live<T::Stored>,
    codec: &Codec,
) -> Option<(KeyDigest, Read<T>)> {
    let digest = KeyDigest::from_slice(written.digest())?;
    let entry = T::decode(stored, &written, Packing::new::<T>(codec, written.digest()))?;
    Some((digest, (entry, facts.of(written.expires_at))))
}

/// Counts a hit for every entry found, where the table tracks hits per entry (by
/// the shard holding the entry, whose row the count is flushed to).
fn count_hits<E>(cluster: &Cluster, kind: CacheKind, digests: &[KeyDigest], found: &[Option<E>]) {
    if !kind.descriptor().tracks_hits() {
        return;
    }
    for (digest, entry) in digests.iter().zip(found) {
        if entry.is_some() {
            cluster
                .engine_for(|| *digest)
                .record_entry_hit(kind, *digest);
        }
    }
}

/// Every typed table is a cache's storage (and so a [`Cache`](crate::Cache)).
impl<T: TypedTable> Storage for TypedCache<'_, T> {
    type Key = T::Key;
    type Value = T::Value;
    type Entry = T::Entry;
    type CheckedKey = KeyDigest;
    type Row<'a>
        = Row<'a, T>
    where
        Self: 'a;

    const KIND: CacheKind = T::CACHE;

    fn handle(&self) -> &Handle<'_> {
        &self.handle
    }

    fn into_value(entry: T::Entry) -> T::Value {
        entry.into_value()
    }

    fn key_digest(&self, key: &T::Key) -> Result<KeyDigest> {
        T::digest(key)
    }

    fn route(_: &T::Key, digest: &KeyDigest) -> KeyDigest {
        *digest
    }

    fn row_route(row: &Row<'_, T>) -> KeyDigest {
        row.digest
    }

    fn check_key(&self, key: &T::Key) -> Result<KeyDigest> {
        T::digest(key)
    }

    fn check_entry<'a>(&self, key: &'a T::Key, value: &'a T::Value) -> Result<Row<'a, T>> {
        let digest = T::digest(key)?;
        Ok(Row {
            digest,
            key,
            value,
            encoded: T::encode(
                key,
                value,
                Packing::new::<T>(self.codec(), digest.as_bytes()),
            )?,
        })
    }

    fn row_order(a: &Row<'_, T>, b: &Row<'_, T>) -> Ordering {
        a.digest.cmp(&b.digest)
    }

    fn stores(&self, key: &T::Key) -> bool {
        self.table.stores(key)
    }

    fn skipped(&self, _keys: &[&T::Key], digests: &[KeyDigest]) -> Skipped {
        let keys = digests
            .iter()
            .map(|d| Box::from(&d.as_bytes()[..]))
            .collect();
        Skipped::keys(keys, |conn, table, keys| {
            let digests: Vec<KeyDigest> = keys
                .iter()
                .filter_map(|k| KeyDigest::from_slice(k))
                .collect();
            Ok(delete_digests(conn, table, &digests).map(drop)?)
        })
    }

    fn read_one(
        &self,
        conn: &mut PgConnection,
        key: &T::Key,
        digest: &KeyDigest,
    ) -> Result<Option<T::Entry>> {
        Ok(read_one(self, conn, key, digest)?.map(|(entry, _)| entry))
    }

    fn read_many(
        &self,
        conn: &mut PgConnection,
        keys: &[&T::Key],
        digests: &[KeyDigest],
    ) -> Result<Vec<Option<T::Entry>>> {
        Ok(read_many(self, conn, keys, digests)?
            .into_iter()
            .map(|found| found.map(|(entry, _)| entry))
            .collect())
    }

    /// Rows of keys this handle does not store are skipped (validated all the same).
    fn write(&self, conn: &mut PgConnection, rows: &[Row<'_, T>], ttl: PgInterval) -> Result<()> {
        let stored: Vec<Row<'_, T>> = rows
            .iter()
            .filter(|r| self.table.stores(r.key))
            .cloned()
            .collect();
        write_rows::<T>(conn, self.table(), &stored, ttl)?;
        Ok(())
    }

    fn remove(
        &self,
        conn: &mut PgConnection,
        _keys: &[&T::Key],
        digests: &[KeyDigest],
    ) -> Result<u64> {
        Ok(delete_digests(conn, self.table(), digests)?)
    }
}

/// A typed table's near cache keeps its entries as they are, under their digests.
impl<T: TypedTable> NearStorage for TypedCache<'_, T> {
    fn near_key(_key: &T::Key, digest: &KeyDigest) -> NearKey {
        digest.as_bytes().as_slice().into()
    }

    fn row_near_key(row: &Row<'_, T>) -> NearKey {
        row.digest.as_bytes().as_slice().into()
    }

    fn read_for_near(
        &self,
        conn: &mut PgConnection,
        key: &T::Key,
        digest: &KeyDigest,
    ) -> Result<Option<NearRead<T::Entry>>> {
        Ok(read_one(self, conn, key, digest)?.map(near_read::<T>))
    }

    fn read_many_for_near(
        &self,
        conn: &mut PgConnection,
        keys: &[&T::Key],
        digests: &[KeyDigest],
    ) -> Result<Vec<Option<NearRead<T::Entry>>>> {
        Ok(read_many(self, conn, keys, digests)?
            .into_iter()
            .map(|entry| entry.map(near_read::<T>))
            .collect())
    }

    fn from_near(kept: &NearValue) -> Result<Option<T::Entry>> {
        Ok(kept.downcast_ref::<T::Entry>().cloned())
    }

    fn near_hit(&self, digest: &KeyDigest) {
        count_hits(
            self.cluster(),
            T::CACHE,
            std::slice::from_ref(digest),
            &[Some(())],
        );
    }
}

/// An entry as the near cache keeps it.
fn near_read<T: TypedTable>((entry, fresh): Read<T>) -> NearRead<T::Entry> {
    NearRead {
        kept: Arc::new(entry.clone()),
        weight: entry.weight(),
        entry,
        tags: None,
        fresh,
    }
}

/// Upserts rows with distinct keys, in key order, in as few statements as the
/// byte budget allows (several in one transaction, so all or none).
/// `table`: `T`'s, schema-qualified.
pub(crate) fn write_rows<T: TypedTable>(
    conn: &mut PgConnection,
    table: &str,
    rows: &[Row<'_, T>],
    ttl: PgInterval,
) -> QueryResult<usize> {
    write_batches(conn, rows, T::row_bytes, |conn, rows| {
        UnnestUpsert::new(table, rows, T::columns(rows), ttl).execute(conn)
    })
}

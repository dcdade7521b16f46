//! The key/value table's one [`Storage`] over its payload column: JSON values
//! (`value`, [`KvCache`]) and opaque bytes (`bytes`, [`KvBytes`]) share the table,
//! keys, rows, writes, deletes and reads, and differ only in the column a read
//! takes ([`KvColumn`]). Keys and payloads pass through the codec here: a key is
//! checked into its stored form (itself, or its keyed hash), a row is encoded as it
//! is checked, and an entry read is opened before its column is taken.

use std::any::{Any, TypeId};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use diesel::data_types::PgInterval;
use diesel::pg::PgConnection;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::statements::{
    in_key_order, read_live, read_live_many, remove, skipped, write, KvTables, LiveEntry, Payload,
    Row,
};
use super::tags::check_tags;
use super::{kv_digest, wrong_type, KvCache};
use crate::cache::{Handle, NearRead, NearStorage, Storage};
use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::jsonb::{JsonbOut, JsonbText};
use crate::key::KeyDigest;
use crate::kind::CacheKind;
use crate::near::{NearKey, NearValue, TagSlots};
use crate::skipped::Skipped;
use crate::validation::check_key;

/// One payload column of the key/value table, as a cache: what is stored in it,
/// and how a live entry read with both columns becomes this column's entry (or the
/// error saying it holds the other kind).
pub trait KvColumn: Sync {
    /// What is stored, and what a read returns.
    type Value: Send;
    /// This kind's name in [`Error::WrongType`]: `json` or `bytes`.
    const KIND_NAME: &'static str;
    /// The other kind's name.
    const OTHER_NAME: &'static str;

    /// The shards and chosen TTL of this handle.
    fn column_handle(&self) -> &Handle<'_>;

    /// The tags this handle's writes give their entries.
    fn column_tags(&self) -> &[&str];

    /// The kv table and the tag table.
    fn kv_tables(&self) -> KvTables<'_> {
        KvTables::of(self.column_handle().front().tables())
    }

    /// The codec of this handle's configuration.
    fn codec(&self) -> &Codec {
        self.column_handle().cluster.config().codec()
    }

    /// An entry validated into a row (its key already checked).
    fn row<'a>(key: &'a str, value: &'a Self::Value) -> Result<Row<'a>>;

    /// This column's entry of a live row: `None` when the row holds the other kind.
    fn decode(entry: &LiveEntry) -> Option<Result<Self::Value>>;

    /// [`decode`](Self::decode) of a row read for one key, which may be taken apart.
    fn take(entry: LiveEntry) -> Option<Result<Self::Value>> {
        Self::decode(&entry)
    }

    /// What the near cache keeps of an entry, and its weight.
    fn keep(entry: &LiveEntry) -> Option<Result<(Self::Value, NearValue, usize)>>;

    /// An entry back from what the near cache kept: `None` when it kept the other
    /// kind (the read that follows reports it).
    fn from_kept(kept: &NearValue) -> Result<Option<Self::Value>>;
}

/// A key checked into its stored form: `None` when it is stored as it is, its keyed
/// hash otherwise.
pub(super) type StoredKey = Option<String>;

/// `key` checked, and its stored form.
fn checked_key(codec: &Codec, key: &str) -> Result<StoredKey> {
    check_key(key)?;
    Ok(match codec.kv_key(key) {
        Cow::Owned(hashed) => Some(hashed),
        Cow::Borrowed(_) => None,
    })
}

/// The key `key` is stored under, from its checked form.
fn stored<'k>(key: &'k str, checked: &'k StoredKey) -> &'k str {
    checked.as_deref().unwrap_or(key)
}

/// The live entries of `keys` (checked as `checked`), read in one statement and
/// opened, by the caller's keys; an entry the codec cannot open is left out (a
/// miss).
fn read_opened<C: KvColumn>(
    cache: &C,
    conn: &mut PgConnection,
    keys: &[&str],
    checked: &[StoredKey],
) -> Result<Vec<(String, LiveEntry)>> {
    let stored = stored_keys(keys, checked);
    let given: HashMap<&str, &str> = stored.iter().copied().zip(keys.iter().copied()).collect();
    Ok(read_live_many(conn, cache.kv_tables(), &stored)?
        .into_iter()
        .filter_map(|(stored, entry)| {
            let key = *given.get(stored.as_str())?;
            Some((key.to_owned(), entry.opened(cache.codec(), key)?))
        })
        .collect())
}

/// `entry`'s own column, or [`Error::WrongType`] naming the kind it holds.
fn own<C: KvColumn, T>(key: &str, taken: Option<Result<T>>) -> Result<T> {
    taken.unwrap_or_else(|| Err(wrong_type(key, C::OTHER_NAME, C::KIND_NAME)))
}

impl<C: KvColumn> Storage for C {
    type Value = C::Value;
    type Entry = C::Value;
    /// The key as stored.
    type CheckedKey = StoredKey;
    type Key = str;
    type Row<'a>
        = Row<'a>
    where
        Self: 'a;

    const KIND: CacheKind = CacheKind::Kv;

    fn handle(&self) -> &Handle<'_> {
        self.column_handle()
    }

    fn into_value(entry: C::Value) -> C::Value {
        entry
    }

    fn key_digest(&self, key: &str) -> Result<KeyDigest> {
        check_key(key)?;
        Ok(kv_digest(key))
    }

    fn route(key: &str, _: &StoredKey) -> KeyDigest {
        kv_digest(key)
    }

    fn row_route(row: &Row<'_>) -> KeyDigest {
        kv_digest(row.key)
    }

    fn check_key(&self, key: &str) -> Result<StoredKey> {
        checked_key(self.codec(), key)
    }

    fn check_entry<'a>(&self, key: &'a str, value: &'a C::Value) -> Result<Row<'a>> {
        check_key(key)?;
        check_tags(self.column_tags())?;
        C::row(key, value)?.encoded(self.codec())
    }

    /// By the key as stored: the order every multi-row statement locks rows in.
    fn row_order(a: &Row<'_>, b: &Row<'_>) -> std::cmp::Ordering {
        a.stored().cmp(b.stored())
    }

    fn skipped(&self, keys: &[&str], checked: &[StoredKey]) -> Skipped {
        skipped(&stored_keys(keys, checked))
    }

    fn read_one(
        &self,
        conn: &mut PgConnection,
        key: &str,
        checked: &StoredKey,
    ) -> Result<Option<C::Value>> {
        read_live(conn, self.kv_tables(), stored(key, checked))?
            .and_then(|entry| entry.opened(self.codec(), key))
            .map(|entry| own::<C, _>(key, C::take(entry)))
            .transpose()
    }

    fn read_many(
        &self,
        conn: &mut PgConnection,
        keys: &[&str],
        checked: &[StoredKey],
    ) -> Result<Vec<Option<C::Value>>> {
        in_key_order(keys, &read_opened(self, conn, keys, checked)?, |key, e| {
            own::<C, _>(key, C::decode(e))
        })
    }

    fn write(&self, conn: &mut PgConnection, rows: &[Row<'_>], ttl: PgInterval) -> Result<()> {
        write(conn, self.kv_tables(), rows, ttl, self.column_tags())
    }

    fn remove(&self, conn: &mut PgConnection, keys: &[&str], checked: &[StoredKey]) -> Result<u64> {
        remove(conn, self.table(), &stored_keys(keys, checked))
    }
}

/// Every key as stored.
fn stored_keys<'k>(keys: &[&'k str], checked: &'k [StoredKey]) -> Vec<&'k str> {
    keys.iter()
        .zip(checked)
        .map(|(key, checked)| stored(key, checked))
        .collect()
}

/// Near caches hold key/value entries under their keys as stored, as the change
/// log names them.
impl<C: KvColumn> NearStorage for C {
    fn near_key(key: &str, checked: &StoredKey) -> NearKey {
        stored(key, checked).as_bytes().into()
    }

    fn row_near_key(row: &Row<'_>) -> NearKey {
        row.stored().as_bytes().into()
    }

    fn read_for_near(
        &self,
        conn: &mut PgConnection,
        key: &str,
        checked: &StoredKey,
    ) -> Result<Option<NearRead<C::Value>>> {
        read_live(conn, self.kv_tables(), stored(key, checked))?
            .and_then(|entry| entry.opened(self.codec(), key))
            .map(|entry| near_read::<C>(key, &entry))
            .transpose()
    }

    fn read_many_for_near(
        &self,
        conn: &mut PgConnection,
        keys: &[&str],
        checked: &[StoredKey],
    ) -> Result<Vec<Option<NearRead<C::Value>>>> {
        in_key_order(
            keys,
            &read_opened(self, conn, keys, checked)?,
            near_read::<C>,
        )
    }

    fn from_near(kept: &NearValue) -> Result<Option<C::Value>> {
        C::from_kept(kept)
    }
}

/// A live entry as the near cache keeps it.
fn near_read<C: KvColumn>(key: &str, entry: &LiveEntry) -> Result<NearRead<C::Value>> {
    let (entry_of, kept, weight) = own::<C, _>(key, C::keep(entry))?;
    Ok(NearRead {
        entry: entry_of,
        kept,
        weight,
        tags: entry
            .tags
            .as_ref()
            .and_then(|tags| TagSlots::of(tags.iter().map(String::as_str))),
        fresh: entry.facts.of(entry.expires_at),
    })
}

/// JSON values (`value`): decoded into `V`; the near cache keeps them as JSON,
/// decoded once, whatever `V` is.
impl<V: Serialize + DeserializeOwned + Send + 'static> KvColumn for KvCache<'_, V> {
    type Value = V;
    const KIND_NAME: &'static str = "json";
    const OTHER_NAME: &'static str = "bytes";

    fn column_handle(&self) -> &Handle<'_> {
        &self.handle
    }

    fn column_tags(&self) -> &[&str] {
        self.tags
    }

    fn row<'a>(key: &'a str, value: &'a V) -> Result<Row<'a>> {
        Ok(Row::new(key, Payload::Json(JsonbOut::new("value", value)?)))
    }

    fn decode(entry: &LiveEntry) -> Option<Result<V>> {
        let JsonbText(text) = entry.value.as_ref()?;
        Some(serde_json::from_slice(text).map_err(Error::from))
    }

    fn keep(entry: &LiveEntry) -> Option<Result<(V, NearValue, usize)>> {
        let JsonbText(text) = entry.value.as_ref()?;
        let kept = || -> Result<(V, NearValue, usize)> {
            let json: serde_json::Value = serde_json::from_slice(text)?;
            Ok((V::deserialize(&json)?, Arc::new(json), text.len()))
        };
        Some(kept())
    }

    /// A bytes entry held in memory is not served: the read that follows reports it.
    fn from_kept(kept: &NearValue) -> Result<Option<V>> {
        let Some(json) = kept.downcast_ref::<serde_json::Value>() else {
            return Ok(None);
        };
        // Asked for `serde_json::Value` itself: a clone, cheaper than a decode.
        if TypeId::of::<V>() == TypeId::of::<serde_json::Value>() {
            let mut cloned = Some(json.clone());
            if let Some(value) = (&mut cloned as &mut dyn Any).downcast_mut::<Option<V>>() {
                return Ok(value.take());
            }
        }
        V::deserialize(json).map(Some).map_err(Error::from)
    }
}

/// The key/value cache's bytes entries (`bytes`), as a [`Storage`], so that their
/// reads and writes take the path every cache shares (near cache, fail-open,
/// counting). Private: users reach it through [`KvCache::get_bytes`] and its
/// siblings. The near cache keeps a copy of the bytes, weighing their length.
#[derive(Clone, Copy)]
pub(super) struct KvBytes<'a> {
    pub(super) handle: Handle<'a>,
    pub(super) tags: &'a [&'a str],
}

impl KvColumn for KvBytes<'_> {
    type Value = Vec<u8>;
    const KIND_NAME: &'static str = "bytes";
    const OTHER_NAME: &'static str = "json";

    fn column_handle(&self) -> &Handle<'_> {
        &self.handle
    }

    fn column_tags(&self) -> &[&str] {
        self.tags
    }

    fn row<'a>(key: &'a str, value: &'a Vec<u8>) -> Result<Row<'a>> {
        Ok(Row::new(key, Payload::Bytes(value)))
    }

    fn decode(entry: &LiveEntry) -> Option<Result<Vec<u8>>> {
        entry.bytes.clone().map(Ok)
    }

    /// The bytes moved out, not copied.
    fn take(entry: LiveEntry) -> Option<Result<Vec<u8>>> {
        entry.bytes.map(Ok)
    }

    fn keep(entry: &LiveEntry) -> Option<Result<(Vec<u8>, NearValue, usize)>> {
        let bytes = entry.bytes.as_ref()?;
        Some(Ok((bytes.clone(), Arc::new(bytes.clone()), bytes.len())))
    }

    /// A JSON entry held in memory is not served: the read that follows reports it.
    fn from_kept(kept: &NearValue) -> Result<Option<Vec<u8>>> {
        Ok(kept.downcast_ref::<Vec<u8>>().cloned())
    }
}

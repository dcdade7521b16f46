//! The key/value cache (`cache_entries`): the Redis GET/SET/DEL replacement.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::data_types::PgInterval;
use diesel::pg::{Pg, PgConnection};
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Binary, Jsonb, Nullable, Text, Timestamptz, Untyped};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::common::{push_with_table, write_batches, Param, Prepared};
use crate::cache::{
    distinct_in_write_order, store_rows, write_rows_in, Cache, Handle, NearRead, Storage,
};
use crate::cluster::Cluster;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::expiry::ttl_interval;
use crate::expiry::ExpiresIn;
use crate::jsonb::{JsonbIn, JsonbOut, JsonbText};
use crate::key::{KeyDigest, KeyHasher};
use crate::kind::CacheKind;
use crate::metrics::Op;
use crate::migrations::change_stamp;
use crate::near::{NearKey, NearValue};
use crate::skipped::Skipped;
use crate::validation::check_key;

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
    value: PhantomData<fn() -> V>,
}

impl<V> std::fmt::Debug for KvCache<'_, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("ttl", &self.handle.ttl)
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
    fn table(&self) -> &'a str {
        self.handle.front().tables().of(CacheKind::Kv)
    }

    /// The engine of the shard holding `key`.
    fn engine(&self, key: &str) -> &'a Engine {
        self.handle.cluster.engine_for(|| kv_digest(key))
    }

    /// Whether `key` holds a live entry.
    ///
    /// # Errors
    /// A bad key, or a connection or database error.
    pub fn exists(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        self.engine(key)
            .read(CacheKind::Kv, Op::Exists, false, |conn| {
                Ok(remaining(conn, self.table(), key)?.is_some())
            })
    }

    /// Time left before `key` expires; `None` when it holds no live entry.
    ///
    /// # Errors
    /// A bad key, or a connection or database error.
    pub fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        check_key(key)?;
        self.engine(key).read(CacheKind::Kv, Op::Ttl, None, |conn| {
            Ok(remaining(conn, self.table(), key)?
                .map(|(expires, now)| (expires - now).to_std().unwrap_or(Duration::ZERO)))
        })
    }

    /// Sets a live entry to expire `ttl` from now (Redis `EXPIRE`); true if `key`
    /// held a live entry.
    ///
    /// # Errors
    /// A bad key or TTL, or a connection or database error.
    pub fn touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        check_key(key)?;
        let interval = ttl_interval(ttl)?;
        self.engine(key).write(
            CacheKind::Kv,
            Op::Touch,
            false,
            || None,
            |conn| {
                // Hand-written for the statement cache, as `get_touch`.
                let (key, interval) = (
                    Param::<Text, _>::new(key),
                    Param::<diesel::sql_types::Interval, _>::new(interval),
                );
                let touched = Prepared::new(
                    self.table(),
                    &[
                        "UPDATE {t} SET expires_at = statement_timestamp() + ",
                        concat!(", ", change_stamp!("{t}", "true"), " WHERE key = "),
                        " AND expires_at > statement_timestamp()",
                    ],
                    vec![&interval, &key],
                )
                .execute(conn)?;
                Ok(touched > 0)
            },
        )
    }

    /// Deletes every entry whose key starts with `prefix`; returns how many rows were
    /// removed. `%` and `_` are ordinary characters here, not wildcards, and the
    /// delete is an index range scan.
    ///
    /// # Errors
    /// An empty or bad prefix (use [`clear`](Self::clear) to delete everything), or a
    /// connection or database error.
    pub fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        check_key(prefix).map_err(|e| match e {
            Error::InvalidInput { reason, .. } => Error::invalid("prefix", reason),
            other => other,
        })?;
        let removed = self.handle.cluster.all(|engine| {
            engine.write(
                CacheKind::Kv,
                Op::DeletePrefix,
                0,
                || {
                    Some(Skipped::prefix(prefix.to_owned(), |conn, table, prefix| {
                        Ok(delete_prefix(conn, table, prefix).map(drop)?)
                    }))
                },
                |conn| self.delete_prefix_in(conn, prefix),
            )
        });
        self.evict_all_near();
        Ok(removed?.into_iter().sum())
    }

    /// [`delete_prefix`](Self::delete_prefix) on your connection, e.g. inside your
    /// own transaction.
    ///
    /// # Errors
    /// As [`delete_prefix`](Self::delete_prefix).
    pub fn delete_prefix_in(&self, conn: &mut PgConnection, prefix: &str) -> Result<u64> {
        check_key(prefix)?;
        if !self.handle.front().is_enabled() {
            return Ok(0);
        }
        Ok(delete_prefix(conn, self.table(), prefix)? as u64)
    }

    /// Deletes every entry of the key/value cache; returns how many rows were removed.
    ///
    /// # Errors
    /// A connection or database error.
    pub fn clear(&self) -> Result<u64> {
        let removed =
            self.handle.cluster.all(|engine| {
                engine.write(
                    CacheKind::Kv,
                    Op::Clear,
                    0,
                    || Some(Skipped::whole()),
                    |conn| {
                        Ok(Prepared::new(self.table(), &["DELETE FROM {t}"], vec![])
                            .execute(conn)? as u64)
                    },
                )
            });
        self.evict_all_near();
        Ok(removed?.into_iter().sum())
    }
}

impl<V> KvCache<'_, V> {
    /// Adds `delta` to the integer stored under `key` and returns the result (Redis
    /// `INCRBY`), atomically under any concurrency. An absent or expired key starts
    /// from 0 and expires `ttl` from now; a live one keeps its expiry.
    ///
    /// If the connection is lost while the statement runs it is retried once on a
    /// live connection, so an increment whose commit was never acknowledged may count
    /// twice (as a client retrying Redis `INCR` would).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the live value is not an integer or the result
    /// would leave `i64`, [`Error::WrongType`] when it is bytes (nothing is changed
    /// then); a bad key or TTL; a connection or database error.
    pub fn incr(&self, key: &str, delta: i64, ttl: Duration) -> Result<i64> {
        self.add(Op::Incr, key, delta, ttl)
    }

    /// [`incr`](Self::incr), labelled `op` in metrics and spans.
    fn add(&self, op: Op, key: &str, delta: i64, ttl: Duration) -> Result<i64> {
        check_key(key)?;
        let interval = ttl_interval(ttl)?;
        let engine = self.engine(key);
        let result = engine.exact(CacheKind::Kv, op, |conn| {
            #[derive(QueryableByName)]
            struct Counted {
                #[diesel(sql_type = BigInt)]
                n: i64,
            }
            // A value that is not an integer, or a sum outside int8, sets NULL: the
            // one-payload constraint then fails the statement, and nothing changes.
            // A live bytes entry is not updated at all: no row comes back.
            let name = key;
            let (key, delta, interval) = (
                Param::<Text, _>::new(key),
                Param::<BigInt, _>::new(delta),
                Param::<diesel::sql_types::Interval, _>::new(interval),
            );
            let counted: Option<Counted> = Prepared::new(
                self.table(),
                &[
                    "INSERT INTO {t} AS c (key, value, expires_at) VALUES (",
                    ", to_jsonb(",
                    "::int8), statement_timestamp() + ",
                    ") ON CONFLICT (key) DO UPDATE SET value = CASE \
                     WHEN c.expires_at <= statement_timestamp() THEN excluded.value \
                     WHEN jsonb_typeof(c.value) = 'number' AND (c.value #>> '{}') ~ '^-?[0-9]{1,19}$' \
                       AND (c.value #>> '{}')::numeric + ",
                    " BETWEEN -9223372036854775808 AND 9223372036854775807 \
                     THEN to_jsonb(((c.value #>> '{}')::numeric + ",
                    concat!(
                        ")::int8) ELSE NULL END, bytes = NULL, \
                         expires_at = CASE WHEN c.expires_at <= statement_timestamp() \
                           THEN excluded.expires_at ELSE c.expires_at END, \
                         created_at = CASE WHEN c.expires_at <= statement_timestamp() \
                           THEN now() ELSE c.created_at END, ",
                        change_stamp!("c", "true"),
                        " WHERE c.bytes IS NULL OR c.expires_at <= statement_timestamp() \
                         RETURNING (value #>> '{}')::int8 AS n"
                    ),
                ],
                vec![&key, &delta, &interval, &delta, &delta],
            )
            .get_result(conn)
            .optional()?;
            counted
                .map(|c| c.n)
                .ok_or_else(|| wrong_type(name, "bytes", "integer"))
        });
        self.evict_near(key);
        let counted = result.map_err(|error| match error {
            Error::Database(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::CheckViolation,
                _,
            )) => Error::invalid(
                "value",
                format!("the live value of `{key}` is not an integer, or adding {delta} would overflow i64"),
            ),
            other => other,
        })?;
        Ok(counted)
    }

    /// Subtracts `delta` (Redis `DECRBY`): [`incr`](Self::incr) of `-delta`.
    ///
    /// # Errors
    /// As [`incr`](Self::incr); also `delta == i64::MIN`.
    pub fn decr(&self, key: &str, delta: i64, ttl: Duration) -> Result<i64> {
        let negated = delta
            .checked_neg()
            .ok_or_else(|| Error::invalid("delta", "i64::MIN cannot be negated"))?;
        self.add(Op::Decr, key, negated, ttl)
    }

    /// Evicts `key` from this process's near cache, after a write outside the
    /// `Cache` trait's path.
    fn evict_near(&self, key: &str) {
        if let Some(near) = self.engine(key).near() {
            near.invalidate(CacheKind::Kv, [key.as_bytes()]);
        }
    }

    /// Empties this process's kv near cache, after a write of many keys.
    fn evict_all_near(&self) {
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
            || bytes_rows(entries),
            &entries.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
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
        write_rows_in(&self.bytes(), conn, &bytes_rows(&[(key, value)])?, interval)
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

/// A live entry's two payload columns (exactly one is set: JSON decoded as `J`, or
/// bytes) and its expiry.
type LiveEntry<J> = (Option<J>, Option<Vec<u8>>, DateTime<Utc>);

/// A live entry read with both payload columns.
#[derive(QueryableByName)]
struct LiveRow<J> {
    #[diesel(sql_type = Nullable<Jsonb>)]
    value: Option<J>,
    #[diesel(sql_type = Nullable<Binary>)]
    bytes: Option<Vec<u8>>,
    #[diesel(sql_type = Timestamptz)]
    expires_at: DateTime<Utc>,
}

impl<J> From<LiveRow<J>> for LiveEntry<J> {
    fn from(row: LiveRow<J>) -> Self {
        (row.value, row.bytes, row.expires_at)
    }
}

/// The one-key read of both kinds of entry, kept in memory or not: each then takes
/// its own column or reports the other kind. `table`: the kv table, qualified.
fn read_live<J>(
    conn: &mut PgConnection,
    table: &str,
    key: &str,
) -> QueryResult<Option<LiveEntry<J>>>
where
    J: diesel::deserialize::FromSql<Jsonb, diesel::pg::Pg> + 'static,
{
    let key = Param::<Text, _>::new(key);
    let row: Option<LiveRow<J>> = Prepared::new(
        table,
        &[
            "SELECT value, bytes, expires_at FROM {t} WHERE key = ",
            " AND expires_at > statement_timestamp()",
        ],
        vec![&key],
    )
    .get_result(conn)
    .optional()?;
    Ok(row.map(LiveEntry::from))
}

/// [`read_live`] for many keys: the live entries among `keys`, each with its key.
fn read_live_many(
    conn: &mut PgConnection,
    table: &str,
    keys: &[&str],
) -> QueryResult<Vec<(String, LiveEntry<JsonbText>)>> {
    #[derive(QueryableByName)]
    struct Keyed {
        #[diesel(sql_type = Text)]
        key: String,
        #[diesel(embed)]
        row: LiveRow<JsonbText>,
    }
    let keys = Param::<Array<Text>, _>::new(keys);
    let rows: Vec<Keyed> = Prepared::new(
        table,
        &[
            "SELECT key, value, bytes, expires_at FROM {t} WHERE key = ANY(",
            ") AND expires_at > statement_timestamp()",
        ],
        vec![&keys],
    )
    .load(conn)?;
    Ok(rows.into_iter().map(|r| (r.key, r.row.into())).collect())
}

/// Validates bytes entries into rows with distinct keys (the last value of a key
/// wins), in write order.
fn bytes_rows<'e>(entries: &[(&'e str, &'e [u8])]) -> Result<Vec<Row<'e>>> {
    let rows = entries
        .iter()
        .map(|(key, value)| Row::bytes(key, value))
        .collect::<Result<Vec<_>>>()?;
    Ok(distinct_in_write_order::<KvBytes<'e>>(rows))
}

impl<V: Serialize + DeserializeOwned + Send + 'static> KvCache<'_, V> {
    /// Live JSON entries whose value contains `filter` (JSONB containment, `@>`), in
    /// key order, at most `limit` (bytes entries are never found): `json!({"plan": "pro"})` finds every cached object with
    /// that field and value.
    ///
    /// This reads the whole table unless it has a GIN index on `value`; add one
    /// (`CREATE INDEX ON cache_entries USING gin (value jsonb_path_ops)`) when such
    /// queries are frequent, at some cost to every write.
    ///
    /// # Errors
    /// A filter holding NUL, a stored value that is not a `V`, or a connection or
    /// database error.
    pub fn find_containing(
        &self,
        filter: &serde_json::Value,
        limit: usize,
    ) -> Result<Vec<(String, V)>> {
        let filter = JsonbOut::new("filter", filter)?;
        let limit_sql = i64::try_from(limit).unwrap_or(i64::MAX);
        let per_shard = self.handle.cluster.all(|engine| {
            engine.read(CacheKind::Kv, Op::FindContaining, Vec::new(), |conn| {
                #[derive(QueryableByName)]
                struct Found<V> {
                    #[diesel(sql_type = Text)]
                    key: String,
                    #[diesel(sql_type = Jsonb)]
                    value: JsonbIn<V>,
                }
                let (filter, limit) = (
                    Param::<Jsonb, _>::new(&filter),
                    Param::<BigInt, _>::new(limit_sql),
                );
                let rows: Vec<Found<V>> = Prepared::new(
                    engine.tables().of(CacheKind::Kv),
                    &[
                        "SELECT key, value FROM {t} WHERE value @> ",
                        " AND expires_at > statement_timestamp() ORDER BY key LIMIT ",
                        "",
                    ],
                    vec![&filter, &limit],
                )
                .load(conn)?;
                Ok(rows
                    .into_iter()
                    .map(
                        |Found {
                             key,
                             value: JsonbIn(v),
                         }| (key, v),
                    )
                    .collect::<Vec<_>>())
            })
        })?;
        // Each shard's first `limit` in key order: together, the first `limit` of all.
        let mut found: Vec<(String, V)> = per_shard.into_iter().flatten().collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found.truncate(limit);
        Ok(found)
    }

    /// Stores `value` only if `key` holds no live entry (Redis `SET ... NX`); true if
    /// it stored. Of concurrent callers on one key exactly one stores: idempotency
    /// keys, simple locks (whose holder deletes the key, or lets it expire).
    ///
    /// # Errors
    /// A bad key, value or TTL, or a connection or database error.
    pub fn set_nx(&self, key: &str, value: &V, ttl: Duration) -> Result<bool> {
        let interval = ttl_interval(ttl)?;
        let row = self.check_entry(key, value)?;
        let engine = self.engine(key);
        let stored = engine.exact(CacheKind::Kv, Op::SetNx, |conn| {
            #[derive(QueryableByName)]
            struct Stored {
                #[diesel(sql_type = diesel::sql_types::Bool)]
                stored: bool,
            }
            // Taken by a live entry: neither the insert nor the update writes, so
            // the statement locks nothing and commits nothing. An expired entry is
            // replaced by the update; of racing callers the row lock admits one.
            let (key, value, interval) = (
                Param::<Text, _>::new(row.key),
                Param::<Nullable<Jsonb>, _>::new(row.json()),
                Param::<diesel::sql_types::Interval, _>::new(interval),
            );
            let stored: Stored = Prepared::new(
                self.table(),
                &[
                    "WITH inserted AS (INSERT INTO {t} (key, value, expires_at) VALUES (",
                    ", ",
                    ", statement_timestamp() + ",
                    ") ON CONFLICT (key) DO NOTHING RETURNING true), \
                     replaced AS (UPDATE {t} SET bytes = NULL, value = ",
                    ", expires_at = statement_timestamp() + ",
                    ", created_at = now() WHERE key = ",
                    " AND expires_at <= statement_timestamp() \
                       AND NOT EXISTS (SELECT 1 FROM inserted) RETURNING true) \
                     SELECT EXISTS (SELECT 1 FROM inserted) \
                       OR EXISTS (SELECT 1 FROM replaced) AS stored",
                ],
                vec![&key, &value, &interval, &value, &interval, &key],
            )
            .get_result(conn)?;
            Ok(stored.stored)
        })?;
        self.evict_near(key);
        Ok(stored)
    }

    /// Removes `key` and returns its live value, if any (Redis `GETDEL`): of
    /// concurrent callers exactly one gets it.
    ///
    /// # Errors
    /// A bad key, a stored value that is not a `V`, [`Error::WrongType`] for a bytes
    /// entry (left in place), or a connection or database error.
    pub fn get_del(&self, key: &str) -> Result<Option<V>> {
        check_key(key)?;
        let taken = self.engine(key).exact(CacheKind::Kv, Op::GetDel, |conn| {
            #[derive(QueryableByName)]
            struct Taken<V> {
                #[diesel(sql_type = Jsonb)]
                value: JsonbIn<V>,
                #[diesel(sql_type = diesel::sql_types::Bool)]
                live: bool,
            }
            // A bytes entry is left alone: reading it as JSON is an error.
            let param = Param::<Text, _>::new(key);
            let taken: Option<Taken<V>> = Prepared::new(
                self.table(),
                &[
                    "DELETE FROM {t} WHERE key = ",
                    " AND bytes IS NULL \
                     RETURNING value, expires_at > statement_timestamp() AS live",
                ],
                vec![&param],
            )
            .get_result(conn)
            .optional()?;
            match taken {
                Some(Taken {
                    value: JsonbIn(value),
                    live,
                }) => Ok(live.then_some(value)),
                None => refuse_bytes(conn, self.table(), key).map(|()| None),
            }
        })?;
        self.evict_near(key);
        Ok(taken)
    }

    /// Reads a live entry and makes it expire `ttl` from now (Redis `GETEX ... EX`):
    /// sliding expiry, as moka's time-to-idle, in one statement.
    ///
    /// # Errors
    /// A bad key or TTL, a stored value that is not a `V`, [`Error::WrongType`] for a
    /// bytes entry (its expiry unchanged), or a connection or database error.
    pub fn get_touch(&self, key: &str, ttl: Duration) -> Result<Option<V>> {
        check_key(key)?;
        let interval = ttl_interval(ttl)?;
        self.engine(key).write(
            CacheKind::Kv,
            Op::GetTouch,
            None,
            || None,
            |conn| {
                #[derive(QueryableByName)]
                struct Touched<V> {
                    #[diesel(sql_type = Jsonb)]
                    value: JsonbIn<V>,
                }
                // Hand-written: Diesel prepares an UPDATE anew on every call (it
                // keeps no UPDATE in its statement cache), which cost a quarter more
                // than the statement itself. `touch` likewise.
                let name = key;
                let (key, interval) = (
                    Param::<Text, _>::new(key),
                    Param::<diesel::sql_types::Interval, _>::new(interval),
                );
                let found: Option<Touched<V>> = Prepared::new(
                    self.table(),
                    &[
                        "UPDATE {t} SET expires_at = statement_timestamp() + ",
                        concat!(", ", change_stamp!("{t}", "true"), " WHERE key = "),
                        " AND expires_at > statement_timestamp() AND bytes IS NULL \
                         RETURNING value",
                    ],
                    vec![&interval, &key],
                )
                .get_result(conn)
                .optional()?;
                match found {
                    Some(Touched {
                        value: JsonbIn(value),
                    }) => Ok(Some(value)),
                    None => refuse_bytes(conn, self.table(), name).map(|()| None),
                }
            },
        )
    }

    /// Cache-aside with an explicit TTL (Redis-style `get` then `set ... EX`): the
    /// live value, or `compute`'s result, stored. Same as
    /// [`Cache::get_or_compute_with_ttl`].
    ///
    /// # Errors
    /// `compute`'s error (nothing cached), or a cache error converted into `E`.
    pub fn get_or_set<E, F>(&self, key: &str, ttl: Duration, compute: F) -> Result<V, E>
    where
        F: FnOnce() -> Result<V, E>,
        E: From<Error>,
    {
        self.get_or_compute_with_ttl(key, ttl, compute)
    }
}

/// The digest of a (checked) key/value key: it names the key's single-flight lease
/// and routes the key to its shard.
fn kv_digest(key: &str) -> KeyDigest {
    KeyHasher::new("kv").text(key).finish()
}

/// Deletes every entry whose key starts with `prefix` (checked by the caller) from
/// `table` (the kv table, qualified); an index range scan, with `%` and `_` as
/// ordinary characters.
pub(crate) fn delete_prefix(
    conn: &mut PgConnection,
    table: &str,
    prefix: &str,
) -> QueryResult<usize> {
    let from = Param::<Text, _>::new(prefix);
    match prefix_upper_bound(prefix) {
        Some(upper) => {
            let upper = Param::<Text, _>::new(upper);
            Prepared::new(
                table,
                &["DELETE FROM {t} WHERE key >= ", " AND key < ", ""],
                vec![&from, &upper],
            )
            .execute(conn)
        }
        None => {
            Prepared::new(table, &["DELETE FROM {t} WHERE key >= ", ""], vec![&from]).execute(conn)
        }
    }
}

/// `(expires_at, now())` of a live entry.
fn remaining(
    conn: &mut PgConnection,
    table: &str,
    key: &str,
) -> QueryResult<Option<(DateTime<Utc>, DateTime<Utc>)>> {
    #[derive(QueryableByName)]
    struct Remaining {
        #[diesel(sql_type = Timestamptz)]
        expires_at: DateTime<Utc>,
        #[diesel(sql_type = Timestamptz)]
        now: DateTime<Utc>,
    }
    let key = Param::<Text, _>::new(key);
    let found: Option<Remaining> = Prepared::new(
        table,
        &[
            "SELECT expires_at, statement_timestamp() AS now FROM {t} WHERE key = ",
            " AND expires_at > statement_timestamp()",
        ],
        vec![&key],
    )
    .get_result(conn)
    .optional()?;
    Ok(found.map(|r| (r.expires_at, r.now)))
}

/// [`Error::WrongType`] if `key` holds a live bytes entry: what a JSON operation
/// that found no JSON entry reports, rather than a miss.
fn refuse_bytes(conn: &mut PgConnection, table: &str, key: &str) -> Result<()> {
    #[derive(QueryableByName)]
    struct Bytes {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        bytes: bool,
    }
    let param = Param::<Text, _>::new(key);
    let found: Bytes = Prepared::new(
        table,
        &[
            "SELECT EXISTS (SELECT 1 FROM {t} WHERE key = ",
            " AND expires_at > statement_timestamp() AND bytes IS NOT NULL) AS bytes",
        ],
        vec![&param],
    )
    .get_result(conn)?;
    if found.bytes {
        Err(wrong_type(key, "bytes", "json"))
    } else {
        Ok(())
    }
}

fn wrong_type(key: &str, stored: &'static str, requested: &'static str) -> Error {
    Error::WrongType {
        key: key.to_owned(),
        stored,
        requested,
    }
}

/// The smallest string greater than every string starting with `prefix`, in byte
/// (C collation) order, which for UTF-8 is code point order: the prefix with its last
/// character incremented. `None` when no such string exists (all `U+10FFFF`).
fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = last as u32 + 1;
        if (0xD800..=0xDFFF).contains(&next) {
            next = 0xE000;
        }
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// What an upsert does to an existing key: new payload (of either kind), new expiry,
/// new `created_at`, and the change stamp. Every key/value update is stamped, values
/// not compared (cheaper for writers; it only evicts an entry that was still right).
const ON_CONFLICT_OVERWRITE: &str = concat!(
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
     bytes = excluded.bytes, expires_at = excluded.expires_at, created_at = now(), ",
    change_stamp!("{t}", "true")
);

/// The upserts as typed fragments Diesel caches by their text (which names the
/// schema, see `Prepared`): Diesel's own `insert_into(..).on_conflict(..)` is never
/// put in its prepared-statement cache, and its multi-row `VALUES` list would be a
/// new statement for every batch size. These are prepared once per connection. A
/// row binds both value columns, one of them NULL.
struct Upsert<'a> {
    table: &'a str,
    key: &'a str,
    value: Option<&'a JsonbOut>,
    bytes: Option<&'a [u8]>,
    expires: ExpiresIn,
}

/// The batch as three arrays (`SELECT ... FROM unnest($keys, $values, $bytes)`): one
/// statement text for any batch size. Must stay equivalent to [`Upsert`].
struct UpsertMany<'a> {
    table: &'a str,
    keys: Vec<&'a str>,
    values: Vec<Option<&'a JsonbOut>>,
    bytes: Vec<Option<&'a [u8]>>,
    expires: ExpiresIn,
}

const INSERT_INTO: &str = "INSERT INTO {t} (key, value, bytes, expires_at) ";

impl QueryFragment<Pg> for Upsert<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        push_with_table(&mut out, INSERT_INTO, self.table);
        out.push_sql("VALUES (");
        out.push_bind_param::<Text, _>(self.key)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Jsonb>, _>(&self.value)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Binary>, _>(&self.bytes)?;
        out.push_sql(", ");
        self.expires.walk_ast(out.reborrow())?;
        out.push_sql(")");
        push_with_table(&mut out, ON_CONFLICT_OVERWRITE, self.table);
        Ok(())
    }
}

impl QueryFragment<Pg> for UpsertMany<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        push_with_table(&mut out, INSERT_INTO, self.table);
        out.push_sql("SELECT u.k, u.v, u.b, ");
        self.expires.walk_ast(out.reborrow())?;
        out.push_sql(" FROM unnest(");
        out.push_bind_param::<Array<Text>, _>(&self.keys)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Jsonb>>, _>(&self.values)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Binary>>, _>(&self.bytes)?;
        out.push_sql(") AS u(k, v, b)");
        push_with_table(&mut out, ON_CONFLICT_OVERWRITE, self.table);
        Ok(())
    }
}

impl QueryId for Upsert<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl QueryId for UpsertMany<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Conn> RunQueryDsl<Conn> for Upsert<'_> {}

impl<Conn> RunQueryDsl<Conn> for UpsertMany<'_> {}

/// `DELETE ... WHERE key IN (SELECT key ... ORDER BY key FOR UPDATE) RETURNING
/// live`: rows locked in key order, as `set_many` takes them, so the two cannot
/// deadlock whatever plan the delete gets. Prepared once per connection (cached by
/// its text).
struct DeleteMany<'a> {
    table: &'a str,
    keys: &'a [&'a str],
}

impl QueryFragment<Pg> for DeleteMany<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        push_with_table(
            &mut out,
            "DELETE FROM {t} WHERE key IN (SELECT key FROM {t} WHERE key = ANY(",
            self.table,
        );
        out.push_bind_param::<Array<Text>, _>(self.keys)?;
        out.push_sql(
            ") ORDER BY key FOR UPDATE) RETURNING expires_at > statement_timestamp() AS live",
        );
        Ok(())
    }
}

impl QueryId for DeleteMany<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for DeleteMany<'_> {
    type SqlType = Untyped;
}

impl<Conn> RunQueryDsl<Conn> for DeleteMany<'_> {}

#[derive(QueryableByName)]
struct Live {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    live: bool,
}

/// A key/value entry validated for writing.
#[derive(Debug, Clone)]
pub struct Row<'a> {
    key: &'a str,
    payload: Payload<'a>,
}

/// What a key/value entry holds: exactly one of the table's two value columns.
#[derive(Debug, Clone)]
enum Payload<'a> {
    /// For `value` (JSONB).
    Json(JsonbOut),
    /// For `bytes`, kept exactly.
    Bytes(&'a [u8]),
}

impl<'a> Row<'a> {
    fn bytes(key: &'a str, bytes: &'a [u8]) -> Result<Self> {
        check_key(key)?;
        Ok(Row {
            key,
            payload: Payload::Bytes(bytes),
        })
    }

    fn json(&self) -> Option<&JsonbOut> {
        match &self.payload {
            Payload::Json(json) => Some(json),
            Payload::Bytes(_) => None,
        }
    }

    fn raw(&self) -> Option<&'a [u8]> {
        match self.payload {
            Payload::Json(_) => None,
            Payload::Bytes(bytes) => Some(bytes),
        }
    }

    fn size(&self) -> usize {
        self.key.len()
            + match &self.payload {
                Payload::Json(json) => json.byte_len(),
                Payload::Bytes(bytes) => bytes.len(),
            }
    }
}

/// Upserts rows of either kind; a batch too large for one statement is split, in
/// one transaction.
fn write(conn: &mut PgConnection, table: &str, rows: &[Row<'_>], ttl: PgInterval) -> Result<()> {
    let expires = ExpiresIn(ttl);
    match rows {
        [row] => Upsert {
            table,
            key: row.key,
            value: row.json(),
            bytes: row.raw(),
            expires,
        }
        .execute(conn)?,
        rows => write_batches(conn, rows, Row::size, |conn, rows| {
            UpsertMany {
                table,
                keys: rows.iter().map(|r| r.key).collect(),
                values: rows.iter().map(Row::json).collect(),
                bytes: rows.iter().map(Row::raw).collect(),
                expires,
            }
            .execute(conn)
        })?,
    };
    Ok(())
}

/// Deletes entries of either kind; returns how many were live.
fn remove(conn: &mut PgConnection, table: &str, keys: &[&str]) -> Result<u64> {
    let live: Vec<Live> = match keys {
        // One row: nothing to order, and a plain key probe.
        [key] => {
            let key = Param::<Text, _>::new(key);
            Prepared::new(
                table,
                &[
                    "DELETE FROM {t} WHERE key = ",
                    " RETURNING expires_at > statement_timestamp() AS live",
                ],
                vec![&key],
            )
            .load(conn)?
        }
        keys => DeleteMany { table, keys }.load(conn)?,
    };
    Ok(live.into_iter().filter(|l| l.live).count() as u64)
}

/// The delete undoing a skipped write or delete of `keys`.
fn skipped(keys: &[&str]) -> Skipped {
    let keys = keys.iter().map(|k| Box::from(k.as_bytes())).collect();
    Skipped::keys(keys, |conn, table, keys| {
        let keys = keys
            .iter()
            .map(|k| std::str::from_utf8(k).expect("remembered from a key"))
            .collect::<Vec<_>>();
        // `remove` locks rows in key order: no deadlock with concurrent batches.
        remove(conn, table, &keys).map(drop)
    })
}

/// Live entries read with their keys, decoded per requested key in `keys` order, so
/// a key asked for twice gets its value twice; a failed decode (an entry of the
/// other kind) fails the batch.
fn in_key_order<R, T>(
    keys: &[&str],
    rows: &[(String, R)],
    decode: impl Fn(&str, &R) -> Result<T>,
) -> Result<Vec<Option<T>>> {
    let by_key: HashMap<&str, &R> = rows.iter().map(|(key, row)| (key.as_str(), row)).collect();
    keys.iter()
        .map(|k| by_key.get(k).map(|row| decode(k, row)).transpose())
        .collect()
}

/// One of the two value columns of `key`'s entry (`kinds`: the other kind, this
/// one), or the error saying it holds the other kind.
fn own<P>(key: &str, payload: Option<P>, kinds: (&'static str, &'static str)) -> Result<P> {
    payload.ok_or_else(|| wrong_type(key, kinds.0, kinds.1))
}

/// A JSON entry as the near cache keeps it: decoded once, as JSON whatever `V` is.
fn json_for_near<V: DeserializeOwned>(
    key: &str,
    (json, _, expires_at): &LiveEntry<JsonbText>,
) -> Result<NearRead<V>> {
    let JsonbText(text) = own(key, json.as_ref(), ("bytes", "json"))?;
    let json: serde_json::Value = serde_json::from_slice(text)?;
    Ok(NearRead {
        entry: V::deserialize(&json)?,
        kept: Arc::new(json),
        expires_at: *expires_at,
        weight: text.len(),
    })
}

/// A bytes entry as the near cache keeps it: a copy, weighing its length. Owned, so
/// a get copies the bytes once.
fn bytes_for_near(
    key: &str,
    bytes: Option<Vec<u8>>,
    expires_at: DateTime<Utc>,
) -> Result<NearRead<Vec<u8>>> {
    let bytes = own(key, bytes, ("json", "bytes"))?;
    Ok(NearRead {
        weight: bytes.len(),
        kept: Arc::new(bytes.clone()),
        entry: bytes,
        expires_at,
    })
}

/// What the two `Storage` impls of the key/value table (JSON values and bytes) share:
/// the same table, keys, rows and writes; they differ in the column they read.
macro_rules! kv_storage_shared {
    () => {
        /// Keys are stored as they are: nothing to compute.
        type CheckedKey = ();
        type Key = str;
        type Row<'a>
            = Row<'a>
        where
            Self: 'a;

        const KIND: CacheKind = CacheKind::Kv;

        fn handle(&self) -> &Handle<'_> {
            &self.handle
        }

        fn into_value(entry: Self::Entry) -> Self::Value {
            entry
        }

        fn key_digest(&self, key: &str) -> Result<KeyDigest> {
            check_key(key)?;
            Ok(kv_digest(key))
        }

        fn route(key: &str, (): &()) -> KeyDigest {
            kv_digest(key)
        }

        fn row_route(row: &Row<'_>) -> KeyDigest {
            kv_digest(row.key)
        }

        fn check_key(&self, key: &str) -> Result<()> {
            check_key(key)
        }

        fn row_order(a: &Row<'_>, b: &Row<'_>) -> std::cmp::Ordering {
            a.key.cmp(b.key)
        }

        fn skipped(&self, keys: &[&str], _checked: &[()]) -> Skipped {
            skipped(keys)
        }

        fn near_key(key: &str, _checked: &()) -> NearKey {
            key.as_bytes().into()
        }

        fn row_near_key(row: &Row<'_>) -> NearKey {
            row.key.as_bytes().into()
        }

        fn write(&self, conn: &mut PgConnection, rows: &[Row<'_>], ttl: PgInterval) -> Result<()> {
            write(conn, self.table(), rows, ttl)
        }

        fn remove(&self, conn: &mut PgConnection, keys: &[&str], _checked: &[()]) -> Result<u64> {
            remove(conn, self.table(), keys)
        }
    };
}

impl<V: Serialize + DeserializeOwned + Send + 'static> Storage for KvCache<'_, V> {
    type Value = V;
    type Entry = V;

    kv_storage_shared!();

    fn check_entry<'a>(&self, key: &'a str, value: &'a V) -> Result<Row<'a>> {
        check_key(key)?;
        Ok(Row {
            key,
            payload: Payload::Json(JsonbOut::new("value", value)?),
        })
    }

    fn read_one(&self, conn: &mut PgConnection, key: &str, _checked: &()) -> Result<Option<V>> {
        read_live::<JsonbIn<V>>(conn, self.table(), key)?
            .map(|(json, _, _)| own(key, json.map(|JsonbIn(value)| value), ("bytes", "json")))
            .transpose()
    }

    /// The near cache keeps the value as JSON (decoded once), whatever `V` is.
    fn read_for_near(
        &self,
        conn: &mut PgConnection,
        key: &str,
        _checked: &(),
    ) -> Result<Option<NearRead<V>>> {
        read_live::<JsonbText>(conn, self.table(), key)?
            .map(|entry| json_for_near(key, &entry))
            .transpose()
    }

    fn read_many_for_near(
        &self,
        conn: &mut PgConnection,
        keys: &[&str],
        _checked: &[()],
    ) -> Result<Vec<Option<NearRead<V>>>> {
        in_key_order(
            keys,
            &read_live_many(conn, self.table(), keys)?,
            json_for_near,
        )
    }

    /// A bytes entry held in memory is not served: the read that follows reports it.
    fn from_near(kept: &NearValue) -> Result<Option<V>> {
        kept.downcast_ref::<serde_json::Value>()
            .map(|json| V::deserialize(json).map_err(Error::from))
            .transpose()
    }

    fn read_many(
        &self,
        conn: &mut PgConnection,
        keys: &[&str],
        _checked: &[()],
    ) -> Result<Vec<Option<V>>> {
        #[derive(QueryableByName)]
        struct Keyed {
            #[diesel(sql_type = Text)]
            key: String,
            #[diesel(sql_type = Nullable<Jsonb>)]
            value: Option<JsonbText>,
        }
        let keys_param = Param::<Array<Text>, _>::new(keys);
        let rows: Vec<(String, Option<JsonbText>)> = Prepared::new(
            self.table(),
            &[
                "SELECT key, value FROM {t} WHERE key = ANY(",
                ") AND expires_at > statement_timestamp()",
            ],
            vec![&keys_param],
        )
        .load::<Keyed>(conn)?
        .into_iter()
        .map(|r| (r.key, r.value))
        .collect();
        in_key_order(keys, &rows, |key, json| {
            let JsonbText(text) = own(key, json.as_ref(), ("bytes", "json"))?;
            Ok(serde_json::from_slice(text)?)
        })
    }
}

/// The key/value cache's bytes entries, as a [`Storage`], so that their reads and
/// writes take the path every cache shares (near cache, fail-open, counting). Private:
/// users reach it through [`KvCache::get_bytes`] and its siblings.
#[derive(Clone, Copy)]
struct KvBytes<'a> {
    handle: Handle<'a>,
}

impl Storage for KvBytes<'_> {
    type Value = Vec<u8>;
    type Entry = Vec<u8>;

    kv_storage_shared!();

    fn check_entry<'a>(&self, key: &'a str, value: &'a Vec<u8>) -> Result<Row<'a>> {
        Row::bytes(key, value)
    }

    fn read_one(
        &self,
        conn: &mut PgConnection,
        key: &str,
        _checked: &(),
    ) -> Result<Option<Vec<u8>>> {
        read_live::<JsonbText>(conn, self.table(), key)?
            .map(|(_, bytes, _)| own(key, bytes, ("json", "bytes")))
            .transpose()
    }

    /// The near cache keeps a copy of the bytes, weighing their length.
    fn read_for_near(
        &self,
        conn: &mut PgConnection,
        key: &str,
        _checked: &(),
    ) -> Result<Option<NearRead<Vec<u8>>>> {
        read_live::<JsonbText>(conn, self.table(), key)?
            .map(|(_, bytes, expires_at)| bytes_for_near(key, bytes, expires_at))
            .transpose()
    }

    fn read_many_for_near(
        &self,
        conn: &mut PgConnection,
        keys: &[&str],
        _checked: &[()],
    ) -> Result<Vec<Option<NearRead<Vec<u8>>>>> {
        in_key_order(
            keys,
            &read_live_many(conn, self.table(), keys)?,
            |key, (_, bytes, expires_at)| bytes_for_near(key, bytes.clone(), *expires_at),
        )
    }

    /// A JSON entry held in memory is not served: the read that follows reports it.
    fn from_near(kept: &NearValue) -> Result<Option<Vec<u8>>> {
        Ok(kept.downcast_ref::<Vec<u8>>().cloned())
    }

    fn read_many(
        &self,
        conn: &mut PgConnection,
        keys: &[&str],
        _checked: &[()],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        #[derive(QueryableByName)]
        struct Keyed {
            #[diesel(sql_type = Text)]
            key: String,
            #[diesel(sql_type = Nullable<Binary>)]
            bytes: Option<Vec<u8>>,
        }
        let keys_param = Param::<Array<Text>, _>::new(keys);
        let rows: Vec<(String, Option<Vec<u8>>)> = Prepared::new(
            self.table(),
            &[
                "SELECT key, bytes FROM {t} WHERE key = ANY(",
                ") AND expires_at > statement_timestamp()",
            ],
            vec![&keys_param],
        )
        .load::<Keyed>(conn)?
        .into_iter()
        .map(|r| (r.key, r.bytes))
        .collect();
        in_key_order(keys, &rows, |key, bytes| {
            Ok(own(key, bytes.as_ref(), ("json", "bytes"))?.clone())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_upper_bound;

    #[test]
    fn upper_bound_increments_the_last_character() {
        assert_eq!(prefix_upper_bound("user:4").as_deref(), Some("user:5"));
        assert_eq!(prefix_upper_bound("a%").as_deref(), Some("a&"));
        assert_eq!(prefix_upper_bound("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_upper_bound("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(prefix_upper_bound("\u{10FFFF}"), None);
    }
}

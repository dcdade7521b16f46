//! The key/value cache's Redis-style operations beyond [`Cache`]: `EXISTS`, `TTL`,
//! `EXPIRE`, `INCRBY`/`DECRBY`, `SET NX`, `GETDEL`, `GETEX`, prefix deletes,
//! `FLUSH`, and JSON containment queries. Each is one statement; a write leaves
//! this process's near cache at once and is logged for the others' as the
//! change-logging protocol says (a stamp on every update, the trigger for deletes).
//! An entry with a tag invalidated since its write is not live ([`live!`]): they
//! treat it as absent, as an expired one.
//!
//! Each binds the key as stored (its keyed hash with `hash_kv_keys`) and opens what
//! it reads through the codec. What runs on values in SQL sees plain values only:
//! `incr` stores its counters plain (numbers, never compressed, and not sealed:
//! the database adds to them) and refuses a sealed or compressed value as not an
//! integer; `find_containing` finds values stored plain, and is refused when every
//! value is sealed or keys are hashed, as `delete_prefix` is with hashed keys.

use std::time::Duration;

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Jsonb, Nullable, Text};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::statements::{
    delete_prefix, entry_columns, refuse_bytes, remaining, KvTables, LiveEntry,
};
use super::storage::KvColumn;
use super::tags::{generations, live};
use super::{wrong_type, KvCache};
use crate::cache::{Cache, Storage};
use crate::error::{Error, Result};
use crate::expiry::ttl_interval;
use crate::jsonb::{JsonbIn, JsonbOut};
use crate::kind::CacheKind;
use crate::metrics::Op;
use crate::near::protocol::change_stamp;
use crate::skipped::Skipped;
use crate::statement::{BindParam, Param, Prepared};
use crate::validation::check_key;

/// Pieces of `set_nx`'s statement, between its bind parameters. Up to the values:
/// the insert of an absent key (`$columns`: the tags' columns, if any).
macro_rules! set_nx_insert {
    ($columns:literal) => {
        concat!(
            "WITH inserted AS (INSERT INTO {t} (key, value, packed, expires_at",
            $columns,
            ") VALUES ("
        )
    };
}

/// ... after the insert's values: the update of an entry that is not live, up to
/// its value.
macro_rules! set_nx_replace {
    () => {
        ") ON CONFLICT (key) DO NOTHING RETURNING true), \
         replaced AS (UPDATE {t} SET bytes = NULL, bytes_packed = false, value = "
    };
}

/// ... after the update's tags: its stamp, up to the key.
macro_rules! set_nx_stamp {
    () => {
        concat!(", ", change_stamp!("{t}", "true"), " WHERE key = ")
    };
}

/// ... after the key: the update's condition, and the answer.
const SET_NX_WHERE: &str = concat!(
    " AND NOT (",
    live!(""),
    ") AND NOT EXISTS (SELECT 1 FROM inserted) RETURNING true) \
     SELECT EXISTS (SELECT 1 FROM inserted) OR EXISTS (SELECT 1 FROM replaced) AS stored"
);

/// `set_nx` of a handle without tags: key, value, packed, TTL, then value, packed,
/// TTL and key again.
const SET_NX_UNTAGGED: [&str; 9] = [
    set_nx_insert!(""),
    ", ",
    ", ",
    ", statement_timestamp() + ",
    set_nx_replace!(),
    ", packed = ",
    ", expires_at = statement_timestamp() + ",
    concat!(
        ", created_at = now(), tags = NULL, tag_generations = NULL",
        set_nx_stamp!()
    ),
    SET_NX_WHERE,
];

/// `set_nx` of a tagged handle: as [`SET_NX_UNTAGGED`], with the tags and their
/// generations (the tags bound twice) after each TTL.
const SET_NX_TAGGED: [&str; 13] = [
    set_nx_insert!(", tags, tag_generations"),
    ", ",
    ", ",
    ", statement_timestamp() + ",
    ", ",
    concat!("::text[], ", generations!(before)),
    concat!(generations!(after), set_nx_replace!()),
    ", packed = ",
    ", expires_at = statement_timestamp() + ",
    ", created_at = now(), tags = ",
    concat!("::text[], tag_generations = ", generations!(before)),
    concat!(generations!(after), set_nx_stamp!()),
    SET_NX_WHERE,
];

impl<V> KvCache<'_, V> {
    /// Whether `key` holds a live entry.
    ///
    /// # Errors
    /// A bad key, or a connection or database error.
    pub fn exists(&self, key: &str) -> Result<bool> {
        let stored = self.stored_key(key)?;
        self.engine(key)
            .read(CacheKind::Kv, Op::Exists, false, |conn| {
                Ok(remaining(conn, self.tables(), &stored)?.is_some())
            })
    }

    /// Time left before `key` expires; `None` when it holds no live entry.
    ///
    /// # Errors
    /// A bad key, or a connection or database error.
    pub fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        let stored = self.stored_key(key)?;
        self.engine(key).read(CacheKind::Kv, Op::Ttl, None, |conn| {
            Ok(remaining(conn, self.tables(), &stored)?
                .map(|(expires, now)| (expires - now).to_std().unwrap_or(Duration::ZERO)))
        })
    }

    /// Sets a live entry to expire `ttl` from now (Redis `EXPIRE`); true if `key`
    /// held a live entry.
    ///
    /// # Errors
    /// A bad key or TTL, or a connection or database error.
    pub fn touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.slide_expiry(
            key,
            ttl,
            Op::Touch,
            false,
            &[
                "UPDATE {t} SET expires_at = statement_timestamp() + ",
                concat!(", ", change_stamp!("{t}", "true"), " WHERE key = "),
                concat!(" AND ", live!("")),
            ],
            |conn, touch, _| Ok(touch.execute(conn)? > 0),
        )
    }

    /// Write `op` on `key`'s shard: `finish` runs the `UPDATE` written by `pieces`,
    /// which binds the new time to live (`ttl` from now), then `key` as stored, and
    /// gets `key` as stored too.
    ///
    /// Hand-written: Diesel prepares an UPDATE anew on every call (it keeps no
    /// UPDATE in its statement cache), which cost a quarter more than the statement
    /// itself.
    fn slide_expiry<R>(
        &self,
        key: &str,
        ttl: Duration,
        op: Op,
        skipped: R,
        pieces: &'static [&'static str],
        finish: impl Fn(&mut PgConnection, Prepared<'_>, &str) -> Result<R>,
    ) -> Result<R> {
        let stored = self.stored_key(key)?;
        let interval = ttl_interval(ttl)?;
        self.engine(key).write(
            CacheKind::Kv,
            op,
            skipped,
            || None,
            |conn| {
                let (param, interval) = (
                    Param::<Text, _>::new(&*stored),
                    Param::<diesel::sql_types::Interval, _>::new(interval),
                );
                finish(
                    conn,
                    self.tables().prepared(pieces, vec![&interval, &param]),
                    &stored,
                )
            },
        )
    }

    /// Deletes every entry whose key starts with `prefix`; returns how many rows were
    /// removed. `%` and `_` are ordinary characters here, not wildcards, and the
    /// delete is an index range scan.
    ///
    /// # Errors
    /// An empty or bad prefix (use [`clear`](Self::clear) to delete everything),
    /// [`Error::Unsupported`] when keys are stored hashed (`hash_kv_keys`), or a
    /// connection or database error.
    pub fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        self.refuse_with_hashed_keys("delete_prefix")?;
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
        self.refuse_with_hashed_keys("delete_prefix")?;
        check_key(prefix)?;
        if !self.handle.front().is_enabled() {
            return Ok(0);
        }
        Ok(delete_prefix(conn, self.table(), prefix)? as u64)
    }

    /// [`Error::Unsupported`] for `operation` when keys are stored hashed: a hash has
    /// no prefix, and gives no key back.
    fn refuse_with_hashed_keys(&self, operation: &'static str) -> Result<()> {
        match self.codec().kv_key_hashing() {
            Some(_) => Err(Error::Unsupported {
                operation,
                reason: "key/value keys are stored as keyed hashes (PGCACHE_HASH_KV_KEYS, \
                         `hash_kv_keys`), which have no prefixes and give no key text back: \
                         delete or read keys one by one, or `clear` the cache",
            }),
            None => Ok(()),
        }
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
        let stored = self.stored_key(key)?;
        let interval = ttl_interval(ttl)?;
        let engine = self.engine(key);
        let result = engine.exact(CacheKind::Kv, op, |conn| {
            #[derive(QueryableByName)]
            struct Counted {
                #[diesel(sql_type = BigInt)]
                n: i64,
            }
            // A value that is not an integer (a packed one too: its `value` is
            // NULL), or a sum outside int8, sets NULL: the one-payload constraint
            // then fails the statement, and nothing changes. A live bytes entry is
            // not updated at all: no row comes back.
            let name = key;
            let (key, delta, interval) = (
                Param::<Text, _>::new(&*stored),
                Param::<BigInt, _>::new(delta),
                Param::<diesel::sql_types::Interval, _>::new(interval),
            );
            // An entry that is not live (expired, or with a tag invalidated since)
            // starts over, without tags; a live one keeps its expiry and tags.
            macro_rules! dead {
                () => {
                    concat!("NOT (", live!("c."), ")")
                };
            }
            let counted: Option<Counted> = self
                .tables()
                .prepared(
                    &[
                        "INSERT INTO {t} AS c (key, value, expires_at) VALUES (",
                        ", to_jsonb(",
                        "::int8), statement_timestamp() + ",
                        concat!(
                            ") ON CONFLICT (key) DO UPDATE SET value = CASE WHEN ",
                            dead!(),
                            " THEN excluded.value \
                             WHEN jsonb_typeof(c.value) = 'number' AND (c.value #>> '{}') ~ '^-?[0-9]{1,19}$' \
                               AND (c.value #>> '{}')::numeric + "
                        ),
                        " BETWEEN -9223372036854775808 AND 9223372036854775807 \
                         THEN to_jsonb(((c.value #>> '{}')::numeric + ",
                        concat!(
                            ")::int8) ELSE NULL END, bytes = NULL, packed = NULL, bytes_packed = false, \
                             expires_at = CASE WHEN ",
                            dead!(),
                            " THEN excluded.expires_at ELSE c.expires_at END, \
                             created_at = CASE WHEN ",
                            dead!(),
                            " THEN now() ELSE c.created_at END, \
                             tags = CASE WHEN ",
                            dead!(),
                            " THEN NULL ELSE c.tags END, \
                             tag_generations = CASE WHEN ",
                            dead!(),
                            " THEN NULL ELSE c.tag_generations END, ",
                            change_stamp!("c", "true"),
                            " WHERE c.bytes IS NULL OR ",
                            dead!(),
                            " RETURNING (value #>> '{}')::int8 AS n"
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
        self.evict_near(key, &stored);
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
    /// Only values stored as JSONB are searched: a value stored compressed (over
    /// the compression threshold) is not found. Turn compression off
    /// (`compression_threshold(None)`) for a cache queried this way.
    ///
    /// # Errors
    /// A filter holding NUL, a stored value that is not a `V`,
    /// [`Error::Unsupported`] when values are sealed or keys hashed, or a
    /// connection or database error.
    pub fn find_containing(
        &self,
        filter: &serde_json::Value,
        limit: usize,
    ) -> Result<Vec<(String, V)>> {
        self.refuse_with_hashed_keys("find_containing")?;
        if self.codec().seals() {
            return Err(Error::Unsupported {
                operation: "find_containing",
                reason: "values are stored sealed (PGCACHE_ENCRYPTION_KEYS, \
                         `encryption_key`), and the database cannot look into them",
            });
        }
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
                let rows: Vec<Found<V>> = KvTables::of(engine.tables())
                    .prepared(
                        &[
                            "SELECT key, value FROM {t} WHERE value @> ",
                            concat!(" AND ", live!(""), " ORDER BY key LIMIT "),
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
            // the statement locks nothing and commits nothing. An entry that is
            // not live (expired, or with a tag invalidated since) is replaced by
            // the update, stamped as it may be held unexpired; of racing callers
            // the row lock admits one. A handle without tags sends the statement
            // without the tags' subqueries, which cost their start-up on every
            // call even when they read nothing.
            let columns = row.columns();
            let (key, value, packed, interval, tags) = (
                Param::<Text, _>::new(row.stored()),
                Param::<Nullable<Jsonb>, _>::new(columns.value),
                Param::<Nullable<diesel::sql_types::Binary>, _>::new(columns.packed),
                Param::<diesel::sql_types::Interval, _>::new(interval),
                Param::<diesel::sql_types::Array<Text>, _>::new(self.tags),
            );
            let (pieces, params): (&'static [&'static str], Vec<&dyn BindParam>) =
                if self.tags.is_empty() {
                    (
                        &SET_NX_UNTAGGED,
                        vec![
                            &key, &value, &packed, &interval, &value, &packed, &interval, &key,
                        ],
                    )
                } else {
                    (
                        &SET_NX_TAGGED,
                        vec![
                            &key, &value, &packed, &interval, &tags, &tags, &value, &packed,
                            &interval, &tags, &tags, &key,
                        ],
                    )
                };
            let stored: Stored = self.tables().prepared(pieces, params).get_result(conn)?;
            Ok(stored.stored)
        })?;
        self.evict_near(key, row.stored());
        Ok(stored)
    }

    /// Removes `key` and returns its live value, if any (Redis `GETDEL`): of
    /// concurrent callers exactly one gets it.
    ///
    /// # Errors
    /// A bad key, a stored value that is not a `V`, [`Error::WrongType`] for a bytes
    /// entry (left in place), or a connection or database error.
    pub fn get_del(&self, key: &str) -> Result<Option<V>> {
        let stored = self.stored_key(key)?;
        let taken = self.engine(key).exact(CacheKind::Kv, Op::GetDel, |conn| {
            #[derive(QueryableByName)]
            struct Taken {
                #[diesel(embed)]
                entry: LiveEntry,
                #[diesel(sql_type = diesel::sql_types::Bool)]
                live: bool,
            }
            // A bytes entry is left alone: reading it as JSON is an error.
            let param = Param::<Text, _>::new(&*stored);
            let taken: Option<Taken> = self
                .tables()
                .prepared(
                    &[
                        "DELETE FROM {t} WHERE key = ",
                        concat!(
                            " AND bytes IS NULL RETURNING ",
                            entry_columns!(),
                            ", ",
                            live!(""),
                            " AS live"
                        ),
                    ],
                    vec![&param],
                )
                .get_result(conn)
                .optional()?;
            match taken {
                Some(Taken { entry, live: true }) => self.json_of(key, entry),
                Some(Taken { live: false, .. }) => Ok(None),
                None => refuse_bytes(conn, self.tables(), &stored, key).map(|()| None),
            }
        })?;
        self.evict_near(key, &stored);
        Ok(taken)
    }

    /// The JSON value of an entry read outside the `Cache` trait's path, opened;
    /// `None` when the codec cannot open it.
    fn json_of(&self, key: &str, entry: LiveEntry) -> Result<Option<V>> {
        entry
            .opened(self.codec(), key)
            .and_then(<Self as KvColumn>::take)
            .transpose()
    }

    /// Reads a live entry and makes it expire `ttl` from now (Redis `GETEX ... EX`):
    /// sliding expiry, as moka's time-to-idle, in one statement.
    ///
    /// # Errors
    /// A bad key or TTL, a stored value that is not a `V`, [`Error::WrongType`] for a
    /// bytes entry (its expiry unchanged), or a connection or database error.
    pub fn get_touch(&self, key: &str, ttl: Duration) -> Result<Option<V>> {
        self.slide_expiry(
            key,
            ttl,
            Op::GetTouch,
            None,
            &[
                "UPDATE {t} SET expires_at = statement_timestamp() + ",
                concat!(", ", change_stamp!("{t}", "true"), " WHERE key = "),
                concat!(
                    " AND bytes IS NULL AND ",
                    live!(""),
                    " RETURNING ",
                    entry_columns!()
                ),
            ],
            |conn, touch, stored| {
                let found: Option<LiveEntry> = touch.get_result(conn).optional()?;
                match found {
                    Some(entry) => self.json_of(key, entry),
                    None => refuse_bytes(conn, self.tables(), stored, key).map(|()| None),
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

//! The key/value table's statements: the upserts of both payload kinds, the deletes
//! (by key, in key order, by prefix), the reads of a live entry with both columns,
//! and the rows they take. Each is hand-written and cached by its text (which names
//! the schema, see `Prepared`): Diesel prepares it once per connection. What is
//! live is [`live!`]: not expired, and no tag invalidated since the write.

use std::borrow::Cow;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel::data_types::PgInterval;
use diesel::pg::{Pg, PgConnection};
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, Binary, Jsonb, Nullable, Text, Timestamptz, Untyped};

use super::tags::{generations, live};
use super::wrong_type;
use crate::codec::{Codec, Context};
use crate::error::Result;
use crate::expiry::ExpiresIn;
use crate::freshness::Facts;
use crate::jsonb::{JsonbOut, JsonbText};
use crate::kind::CacheKind;
use crate::near::protocol::change_stamp;
use crate::skipped::Skipped;
use crate::statement::{push_with_table, push_with_tables, BindParam, Param, Prepared};
use crate::table::write_batches;
use crate::tables::Tables;
use crate::validation::check_key;

/// The kv table and the tag table its statements judge tags by, both
/// schema-qualified.
#[derive(Debug, Clone, Copy)]
pub struct KvTables<'a> {
    pub(super) entries: &'a str,
    pub(super) tags: &'a str,
}

impl<'a> KvTables<'a> {
    pub(super) fn of(tables: &'a Tables) -> Self {
        KvTables {
            entries: tables.of(crate::kind::CacheKind::Kv),
            tags: tables.tags(),
        }
    }

    /// A statement naming both (`{t}`, `{g}`).
    pub(super) fn prepared(
        self,
        pieces: &'static [&'static str],
        params: Vec<&'a dyn BindParam>,
    ) -> Prepared<'a> {
        Prepared::new(self.entries, pieces, params).with_tags(self.tags)
    }
}

/// A live entry read with its payload columns (exactly one of `value`, `bytes` and
/// `packed` is set), its expiry, its tags and the facts of its freshness: every read
/// of either kind takes this one shape, [`opened`](Self::opened), then its own
/// column.
/// The columns of a [`LiveEntry`], as every statement that reads one selects (or
/// returns) them.
macro_rules! entry_columns {
    () => {
        concat!(
            "value, bytes, packed, bytes_packed, expires_at, tags, ",
            $crate::freshness::fact_columns!()
        )
    };
}
pub(super) use entry_columns;

#[derive(QueryableByName)]
pub struct LiveEntry {
    #[diesel(sql_type = Nullable<Jsonb>)]
    pub(super) value: Option<JsonbText>,
    #[diesel(sql_type = Nullable<Binary>)]
    pub(super) bytes: Option<Vec<u8>>,
    /// A JSON value as the codec's envelope.
    #[diesel(sql_type = Nullable<Binary>)]
    packed: Option<Vec<u8>>,
    /// Whether `bytes` is the codec's envelope.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    bytes_packed: bool,
    #[diesel(sql_type = Timestamptz)]
    pub(super) expires_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Array<Text>>)]
    pub(super) tags: Option<Vec<String>>,
    #[diesel(embed)]
    pub(super) facts: Facts,
}

impl LiveEntry {
    /// The entry with its envelope, if any, opened: a JSON value's text in `value`,
    /// bytes in `bytes`. `None` when the codec cannot vouch for it (a miss; the
    /// codec warned). `key` is the entry's key as the caller gave it.
    pub(super) fn opened(mut self, codec: &Codec, key: &str) -> Option<Self> {
        let context = |part| Context::new(CacheKind::Kv, part, key.as_bytes());
        if let Some(envelope) = self.packed.take() {
            self.value = Some(JsonbText(codec.open(&envelope, context("json"))?));
        } else if self.bytes_packed {
            let envelope = self.bytes.take()?;
            self.bytes = Some(codec.open(&envelope, context("bytes"))?);
            self.bytes_packed = false;
        }
        Some(self)
    }
}

impl std::fmt::Debug for LiveEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveEntry")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The one-key read of both kinds of entry.
pub(super) fn read_live(
    conn: &mut PgConnection,
    tables: KvTables<'_>,
    key: &str,
) -> QueryResult<Option<LiveEntry>> {
    let key = Param::<Text, _>::new(key);
    tables
        .prepared(
            &[
                concat!("SELECT ", entry_columns!(), " FROM {t} WHERE key = "),
                concat!(" AND ", live!("")),
            ],
            vec![&key],
        )
        .get_result(conn)
        .optional()
}

/// [`read_live`] for many keys: the live entries among `keys`, each with its key.
pub(super) fn read_live_many(
    conn: &mut PgConnection,
    tables: KvTables<'_>,
    keys: &[&str],
) -> QueryResult<Vec<(String, LiveEntry)>> {
    #[derive(QueryableByName)]
    struct Keyed {
        #[diesel(sql_type = Text)]
        key: String,
        #[diesel(embed)]
        row: LiveEntry,
    }
    let keys = Param::<Array<Text>, _>::new(keys);
    let rows: Vec<Keyed> = tables
        .prepared(
            &[
                concat!(
                    "SELECT key, ",
                    entry_columns!(),
                    " FROM {t} WHERE key = ANY("
                ),
                concat!(") AND ", live!("")),
            ],
            vec![&keys],
        )
        .load(conn)?;
    Ok(rows.into_iter().map(|r| (r.key, r.row)).collect())
}

/// Deletes every entry whose key starts with `prefix` (checked by the caller) from
/// `table` (the kv table, qualified); an index range scan, with `%` and `_` as
/// ordinary characters.
pub(super) fn delete_prefix(
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
pub(super) fn remaining(
    conn: &mut PgConnection,
    tables: KvTables<'_>,
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
    let found: Option<Remaining> = tables
        .prepared(
            &[
                "SELECT expires_at, statement_timestamp() AS now FROM {t} WHERE key = ",
                concat!(" AND ", live!("")),
            ],
            vec![&key],
        )
        .get_result(conn)
        .optional()?;
    Ok(found.map(|r| (r.expires_at, r.now)))
}

/// [`Error::WrongType`] if `key` (stored as `stored`) holds a live bytes entry: what
/// a JSON operation that found no JSON entry reports, rather than a miss.
pub(super) fn refuse_bytes(
    conn: &mut PgConnection,
    tables: KvTables<'_>,
    stored: &str,
    key: &str,
) -> Result<()> {
    #[derive(QueryableByName)]
    struct Bytes {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        bytes: bool,
    }
    let param = Param::<Text, _>::new(stored);
    let found: Bytes = tables
        .prepared(
            &[
                "SELECT EXISTS (SELECT 1 FROM {t} WHERE key = ",
                concat!(" AND bytes IS NOT NULL AND ", live!(""), ") AS bytes"),
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

/// The smallest string greater than every string starting with `prefix`, in byte
/// (C collation) order, which for UTF-8 is code point order: the prefix with its last
/// character incremented. `None` when no such string exists (all `U+10FFFF`).
pub(super) fn prefix_upper_bound(prefix: &str) -> Option<String> {
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

/// What an upsert does to an existing key: new payload (of either kind, plain or
/// packed), new expiry, new `created_at`, new tags (none for an untagged write), and
/// the change stamp. Every key/value update is stamped, values not compared (cheaper
/// for writers; it only evicts an entry that was still right).
const ON_CONFLICT_OVERWRITE: &str = concat!(
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
     bytes = excluded.bytes, packed = excluded.packed, bytes_packed = excluded.bytes_packed, \
     expires_at = excluded.expires_at, created_at = now(), \
     tags = excluded.tags, tag_generations = excluded.tag_generations, ",
    change_stamp!("{t}", "true")
);

/// The upserts as typed fragments Diesel caches by their text (which names the
/// schema, see `Prepared`): Diesel's own `insert_into(..).on_conflict(..)` is never
/// put in its prepared-statement cache, and its multi-row `VALUES` list would be a
/// new statement for every batch size. These are prepared once per connection. A
/// row binds every payload column, all but one of them NULL. A tagged write also
/// stores its tags with their generations, read in the same statement
/// ([`Tagging`]); an untagged one is the statement it was before tags.
struct Upsert<'a> {
    tables: KvTables<'a>,
    key: &'a str,
    columns: Columns<'a>,
    expires: ExpiresIn,
    tags: &'a [&'a str],
}

/// The batch as one array per column (`SELECT ... FROM unnest($keys, $values,
/// ...)`): one statement text for any batch size. Must stay equivalent to
/// [`Upsert`].
struct UpsertMany<'a> {
    tables: KvTables<'a>,
    keys: Vec<&'a str>,
    values: Vec<Option<&'a JsonbOut>>,
    bytes: Vec<Option<&'a [u8]>>,
    packed: Vec<Option<&'a [u8]>>,
    bytes_packed: Vec<bool>,
    expires: ExpiresIn,
    tags: &'a [&'a str],
}

/// The columns both upserts insert (`{t}`: the kv table).
const INSERT_INTO: [&str; 2] = [
    "INSERT INTO {t} (key, value, bytes, packed, bytes_packed, expires_at",
    ") ",
];

/// The tags of an upsert: after its columns, `, tags, tag_generations`; after its
/// expiry, the tags and their generations. Nothing for an untagged write.
#[derive(Clone, Copy)]
struct Tagging<'a>(&'a [&'a str]);

impl<'a> Tagging<'a> {
    /// `INSERT INTO {t} (...) `: the upserts' columns, and the tags' when tagged.
    fn insert_into(&self, out: &mut AstPass<'_, '_, Pg>, entries: &str) {
        push_with_table(out, INSERT_INTO[0], entries);
        if !self.0.is_empty() {
            out.push_sql(", tags, tag_generations");
        }
        out.push_sql(INSERT_INTO[1]);
    }

    fn values<'b>(self, out: &mut AstPass<'_, 'b, Pg>, tags_table: &str) -> QueryResult<()>
    where
        'a: 'b,
    {
        if self.0.is_empty() {
            return Ok(());
        }
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(self.0)?;
        out.push_sql("::text[], ");
        push_with_tables(out, generations!(before), "", tags_table);
        out.push_bind_param::<Array<Text>, _>(self.0)?;
        push_with_tables(out, generations!(after), "", tags_table);
        Ok(())
    }
}

impl QueryFragment<Pg> for Upsert<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let tagging = Tagging(self.tags);
        tagging.insert_into(&mut out, self.tables.entries);
        out.push_sql("VALUES (");
        out.push_bind_param::<Text, _>(self.key)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Jsonb>, _>(&self.columns.value)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Binary>, _>(&self.columns.bytes)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<Binary>, _>(&self.columns.packed)?;
        out.push_sql(", ");
        out.push_bind_param::<diesel::sql_types::Bool, _>(&self.columns.bytes_packed)?;
        out.push_sql(", ");
        self.expires.walk_ast(out.reborrow())?;
        tagging.values(&mut out, self.tables.tags)?;
        out.push_sql(")");
        push_with_table(&mut out, ON_CONFLICT_OVERWRITE, self.tables.entries);
        Ok(())
    }
}

impl QueryFragment<Pg> for UpsertMany<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let tagging = Tagging(self.tags);
        tagging.insert_into(&mut out, self.tables.entries);
        out.push_sql("SELECT u.k, u.v, u.b, u.p, u.bp, ");
        self.expires.walk_ast(out.reborrow())?;
        tagging.values(&mut out, self.tables.tags)?;
        out.push_sql(" FROM unnest(");
        out.push_bind_param::<Array<Text>, _>(&self.keys)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Jsonb>>, _>(&self.values)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Binary>>, _>(&self.bytes)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Binary>>, _>(&self.packed)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<diesel::sql_types::Bool>, _>(&self.bytes_packed)?;
        out.push_sql(") AS u(k, v, b, p, bp)");
        push_with_table(&mut out, ON_CONFLICT_OVERWRITE, self.tables.entries);
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
    /// The key as the caller gave it.
    pub(super) key: &'a str,
    /// The key as stored: itself, or its keyed hash.
    stored: Cow<'a, str>,
    pub(super) payload: Payload<'a>,
}

/// What a key/value entry holds: exactly one of the table's payload columns.
#[derive(Debug, Clone)]
pub(super) enum Payload<'a> {
    /// For `value` (JSONB).
    Json(JsonbOut),
    /// For `bytes`, kept exactly.
    Bytes(&'a [u8]),
    /// Either, as the codec's envelope: in `packed` for JSON, in `bytes` (with
    /// `bytes_packed`) for bytes.
    Packed { json: bool, envelope: Vec<u8> },
}

impl<'a> Row<'a> {
    /// A row of `key` holding `payload`, not yet [`encoded`](Self::encoded).
    pub(super) fn new(key: &'a str, payload: Payload<'a>) -> Self {
        Row {
            key,
            stored: Cow::Borrowed(key),
            payload,
        }
    }

    pub(super) fn bytes(key: &'a str, bytes: &'a [u8]) -> Result<Self> {
        check_key(key)?;
        Ok(Row::new(key, Payload::Bytes(bytes)))
    }

    /// The row as stored: its key hashed and its payload packed as the codec
    /// says (compressed over the threshold, sealed with keys).
    ///
    /// # Errors
    /// As [`Codec::pack`].
    pub(super) fn encoded(self, codec: &Codec) -> Result<Self> {
        let (part, plain) = match &self.payload {
            Payload::Json(json) => ("json", json.text()),
            Payload::Bytes(bytes) => ("bytes", *bytes),
            Payload::Packed { .. } => return Ok(self),
        };
        let context = Context::new(CacheKind::Kv, part, self.key.as_bytes());
        let payload = match codec.pack(plain, context)? {
            Some(envelope) => Payload::Packed {
                json: part == "json",
                envelope,
            },
            None => self.payload,
        };
        Ok(Row {
            key: self.key,
            stored: codec.kv_key(self.key),
            payload,
        })
    }

    /// The key as stored.
    pub(super) fn stored(&self) -> &str {
        &self.stored
    }

    /// What the row binds to each payload column.
    pub(super) fn columns(&self) -> Columns<'_> {
        let none = Columns {
            value: None,
            bytes: None,
            packed: None,
            bytes_packed: false,
        };
        match &self.payload {
            Payload::Json(json) => Columns {
                value: Some(json),
                ..none
            },
            Payload::Bytes(bytes) => Columns {
                bytes: Some(bytes),
                ..none
            },
            Payload::Packed {
                json: true,
                envelope,
            } => Columns {
                packed: Some(envelope),
                ..none
            },
            Payload::Packed {
                json: false,
                envelope,
            } => Columns {
                bytes: Some(envelope),
                bytes_packed: true,
                ..none
            },
        }
    }

    fn size(&self) -> usize {
        self.stored.len()
            + match &self.payload {
                Payload::Json(json) => json.byte_len(),
                Payload::Bytes(bytes) => bytes.len(),
                Payload::Packed { envelope, .. } => envelope.len(),
            }
    }
}

/// A row's payload columns as bound: exactly one of `value`, `bytes` and `packed`
/// set, and `bytes_packed` when `bytes` is an envelope.
#[derive(Clone, Copy)]
pub(super) struct Columns<'r> {
    pub(super) value: Option<&'r JsonbOut>,
    bytes: Option<&'r [u8]>,
    pub(super) packed: Option<&'r [u8]>,
    bytes_packed: bool,
}

/// Upserts rows of either kind, tagged with `tags` (checked; none: untagged); a
/// batch too large for one statement is split, in one transaction.
pub(super) fn write(
    conn: &mut PgConnection,
    tables: KvTables<'_>,
    rows: &[Row<'_>],
    ttl: PgInterval,
    tags: &[&str],
) -> Result<()> {
    let expires = ExpiresIn(ttl);
    match rows {
        [row] => Upsert {
            tables,
            key: row.stored(),
            columns: row.columns(),
            expires,
            tags,
        }
        .execute(conn)?,
        rows => write_batches(conn, rows, Row::size, |conn, rows| {
            let columns: Vec<Columns<'_>> = rows.iter().map(Row::columns).collect();
            UpsertMany {
                tables,
                keys: rows.iter().map(Row::stored).collect(),
                values: columns.iter().map(|c| c.value).collect(),
                bytes: columns.iter().map(|c| c.bytes).collect(),
                packed: columns.iter().map(|c| c.packed).collect(),
                bytes_packed: columns.iter().map(|c| c.bytes_packed).collect(),
                expires,
                tags,
            }
            .execute(conn)
        })?,
    };
    Ok(())
}

/// Deletes entries of either kind; returns how many were live.
pub(super) fn remove(conn: &mut PgConnection, table: &str, keys: &[&str]) -> Result<u64> {
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
pub(super) fn skipped(keys: &[&str]) -> Skipped {
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
pub(super) fn in_key_order<R, T>(
    keys: &[&str],
    rows: &[(String, R)],
    decode: impl Fn(&str, &R) -> Result<T>,
) -> Result<Vec<Option<T>>> {
    let by_key: HashMap<&str, &R> = rows.iter().map(|(key, row)| (key.as_str(), row)).collect();
    keys.iter()
        .map(|k| by_key.get(k).map(|row| decode(k, row)).transpose())
        .collect()
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

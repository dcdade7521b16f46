//! Pieces every AI cache shares: name checks, batch shaping and digest bookkeeping.

use std::collections::HashMap;
use std::time::Duration;

use diesel::data_types::PgInterval;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, Bool, Bytea};

use crate::cache::CacheKind;
use crate::error::{Error, Result};
use crate::input::{check_text, ttl_interval};
use crate::key::KeyDigest;
use crate::manager::CacheManager;

/// Rows per INSERT: keeps every statement far below PostgreSQL's 65 535 bind
/// parameters whatever the number of columns.
const ROWS_PER_STATEMENT: usize = 1000;

/// Hex characters of a digest shown in reports (`top`, `stats`).
const HASH_PREFIX_CHARS: usize = 16;

/// A name-like field (model, provider, voice, format): not empty, no NUL.
pub(crate) fn check_name(what: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(what, "must not be empty"));
    }
    check_text(what, value)
}

/// The digest of a stored row, read back from its `key_hash` column.
fn stored_digest(bytes: &[u8]) -> QueryResult<KeyDigest> {
    KeyDigest::from_slice(bytes).ok_or_else(|| {
        diesel::result::Error::DeserializationError(
            format!("key_hash has {} bytes, expected 32", bytes.len()).into(),
        )
    })
}

/// The short hex form of a stored digest used in reports.
pub(crate) fn hash_prefix(bytes: &[u8]) -> String {
    let mut hex = hex::encode(bytes);
    hex.truncate(HASH_PREFIX_CHARS);
    hex
}

/// Validates and hashes every key of a batch.
pub(crate) fn digests<K: ?Sized>(
    keys: &[&K],
    digest: impl Fn(&K) -> Result<KeyDigest>,
) -> Result<Vec<KeyDigest>> {
    keys.iter().map(|k| digest(k)).collect()
}

/// Puts rows loaded by digest back in the order (and multiplicity) of the request;
/// `split` separates a row's `key_hash` from the entry it decodes to.
pub(crate) fn in_request_order<S, E: Clone>(
    digests: &[KeyDigest],
    rows: Vec<S>,
    split: impl Fn(S) -> (Vec<u8>, E),
) -> Result<Vec<Option<E>>> {
    let mut found = HashMap::with_capacity(rows.len());
    for row in rows {
        let (hash, entry) = split(row);
        found.insert(stored_digest(&hash)?, entry);
    }
    Ok(digests.iter().map(|d| found.get(d).cloned()).collect())
}

/// Counts a hit for every entry found, in the manager's deferred per-entry counters.
pub(crate) fn record_hits<E>(
    manager: &CacheManager,
    kind: CacheKind,
    digests: &[KeyDigest],
    found: &[Option<E>],
) {
    for (digest, entry) in digests.iter().zip(found) {
        if entry.is_some() {
            manager.record_entry_hit(kind, *digest);
        }
    }
}

/// Deletes the rows of `kind`'s table with these digests; returns how many of them
/// were live. The table name comes from the closed [`CacheKind`] enum, never from
/// input.
pub(crate) fn delete_digests(
    conn: &mut PgConnection,
    kind: CacheKind,
    digests: &[KeyDigest],
) -> QueryResult<u64> {
    #[derive(QueryableByName)]
    struct Live {
        #[diesel(sql_type = Bool)]
        live: bool,
    }
    let removed: Vec<Live> = diesel::sql_query(format!(
        "DELETE FROM {} WHERE key_hash = ANY($1) RETURNING expires_at > now() AS live",
        kind.table()
    ))
    .bind::<Array<Bytea>, _>(digest_params(digests))
    .load(conn)?;
    Ok(removed.iter().filter(|r| r.live).count() as u64)
}

/// The digests as bind parameters for `key_hash = ANY($1)`.
pub(crate) fn digest_params(digests: &[KeyDigest]) -> Vec<&[u8]> {
    digests.iter().map(|d| d.as_bytes().as_slice()).collect()
}

/// Validates every entry into a row, then writes the rows expiring `ttl` from now:
/// one bad entry rejects the batch before anything is written.
pub(crate) fn store<'a, K: ?Sized, V: ?Sized, R>(
    conn: &mut PgConnection,
    entries: &[(&'a K, &'a V)],
    ttl: Duration,
    row: impl Fn(&'a K, &'a V) -> Result<R>,
    write: impl FnOnce(&mut PgConnection, Vec<R>, PgInterval) -> QueryResult<usize>,
) -> Result<()> {
    let interval = ttl_interval(ttl)?;
    let rows = entries
        .iter()
        .map(|(k, v)| row(k, v))
        .collect::<Result<Vec<_>>>()?;
    write(conn, rows, interval)?;
    Ok(())
}

/// Upserts `rows` in as few statements as possible, in key order. A key given twice
/// keeps its last row (one statement cannot upsert a row twice), and several statements run in one
/// transaction (a savepoint inside the caller's), so the batch is all-or-nothing.
pub(crate) fn upsert_batch<R>(
    conn: &mut PgConnection,
    rows: Vec<R>,
    digest: impl Fn(&R) -> KeyDigest,
    upsert: impl Fn(&mut PgConnection, &[R]) -> QueryResult<usize>,
) -> QueryResult<usize> {
    let mut position: HashMap<KeyDigest, usize> = HashMap::with_capacity(rows.len());
    let mut unique: Vec<Option<R>> = Vec::with_capacity(rows.len());
    for row in rows {
        let d = digest(&row);
        if let Some(&earlier) = position.get(&d) {
            unique[earlier] = None;
        }
        position.insert(d, unique.len());
        unique.push(Some(row));
    }
    let mut unique: Vec<R> = unique.into_iter().flatten().collect();
    // Rows are locked in key order, so two overlapping batches cannot deadlock.
    unique.sort_unstable_by_key(|row| digest(row));
    match unique.len() {
        0 => Ok(0),
        n if n <= ROWS_PER_STATEMENT => upsert(conn, &unique),
        _ => conn.transaction(|conn| {
            unique
                .chunks(ROWS_PER_STATEMENT)
                .try_fold(0, |sum, chunk| Ok(sum + upsert(conn, chunk)?))
        }),
    }
}

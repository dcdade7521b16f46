//! Tags on key/value entries: a handle that tags what it writes
//! ([`KvCache::tagged`]), the invalidation of tags, and the SQL every kv statement
//! judges an entry's tags with.
//!
//! Each tag ever invalidated has a row in `cache_tags` with its generation, drawn
//! anew by each invalidation (a tag without a row has generation 0). An entry keeps
//! its tags and the generations its writing statement read for them in that same
//! statement; it is live while each is still its tag's generation ([`live!`]). So
//! an invalidation is one row per tag, whatever the number of entries, and one that
//! commits after a write read the generations makes that entry stale, however the
//! two interleave. Entries without tags keep both columns NULL and are judged by
//! their expiry alone: the tag check is never run for them. Cleanup deletes the
//! stale entries later ([`sweep_invalidated`]). Near caches hear of an invalidation
//! through the tag table's triggers (see `near/protocol.rs`).

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::KvCache;
use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::kind::CacheKind;
use crate::metrics::Op;
use crate::skipped::Skipped;
use crate::statement::{Param, Prepared};
use crate::tables::Tables;
use crate::validation::check_bounded;

/// Longest tag accepted, in bytes (UTF-8).
pub const MAX_TAG_BYTES: usize = 256;

/// Most tags one entry may carry.
pub const MAX_TAGS_PER_ENTRY: usize = 64;

/// SQL for the generation of the tag `$tag` (SQL) in the tag table (`{g}`): 0 for
/// a tag without a row. One index probe per tag, written as a subquery for each
/// so that no plan scans the tag table whole (a join of the tags with it may be
/// planned as a hash join over all of it, at a cost growing with the tags ever
/// invalidated).
macro_rules! generation_of {
    ($tag:literal) => {
        concat!(
            "coalesce((SELECT g.generation FROM {g} AS g WHERE g.tag = ",
            $tag,
            "), 0)"
        )
    };
}

/// SQL true when none of a row's tags (`$row`: its name or alias followed by a
/// dot, or nothing) was invalidated since it was written: the generations it keeps
/// are still its tags' ([`generation_of!`]), in order. NULL, so never true, for a
/// row with tags and no generations.
macro_rules! tags_hold {
    ($row:literal) => {
        concat!(
            $row,
            "tag_generations = ARRAY(SELECT ",
            $crate::caches::kv::tags::generation_of!("t"),
            " FROM unnest(",
            $row,
            "tags) AS t)"
        )
    };
}

/// SQL true when a row (as for [`tags_hold!`]) is live: not expired, and none of
/// its tags invalidated since it was written. A row without tags is judged by its
/// expiry alone (the tag check is not evaluated for it).
macro_rules! live {
    ($row:literal) => {
        concat!(
            $row,
            "expires_at > statement_timestamp() AND (",
            $row,
            "tags IS NULL OR ",
            $crate::caches::kv::tags::tags_hold!($row),
            ")"
        )
    };
}

/// The generations of the tags bound between its `before` and `after` pieces
/// (`text[]`), in their order, read from the tag table (`{g}`) as a write stores
/// them with the tags: in the write's own statement, so in its snapshot. NULL for
/// no tags.
macro_rules! generations {
    (before) => {
        concat!(
            "(SELECT array_agg(",
            $crate::caches::kv::tags::generation_of!("x.tag"),
            " ORDER BY x.n) FROM unnest("
        )
    };
    (after) => {
        "::text[]) WITH ORDINALITY AS x(tag, n))"
    };
}
pub(crate) use {generation_of, generations, live, tags_hold};

/// Checks one tag: not empty, at most [`MAX_TAG_BYTES`], no NUL; the error names it.
fn check_tag(tag: &str) -> Result<()> {
    check_bounded("tag", tag, MAX_TAG_BYTES).map_err(|error| match error {
        // A NUL: the tag named (an empty one needs no name, a long one has its start).
        Error::InvalidInput { what, reason } if tag.contains('\0') => {
            Error::invalid(what, format!("tag {tag:?} {reason}"))
        }
        other => other,
    })
}

/// Checks the tags of an entry: at most [`MAX_TAGS_PER_ENTRY`], each valid.
pub(super) fn check_tags(tags: &[&str]) -> Result<()> {
    match tags.len() {
        n if n > MAX_TAGS_PER_ENTRY => Err(Error::invalid(
            "tags",
            format!("an entry carries at most {MAX_TAGS_PER_ENTRY} tags, not {n}"),
        )),
        _ => tags.iter().try_for_each(|tag| check_tag(tag)),
    }
}

/// Draws a new generation for each of `tags` (checked) in `tag_table`, locking
/// their rows in tag order, so that concurrent invalidations cannot deadlock.
fn bump(conn: &mut PgConnection, tag_table: &str, tags: &[&str]) -> QueryResult<usize> {
    let tags = Param::<Array<Text>, _>::new(tags);
    Prepared::new(
        tag_table,
        &[
            "INSERT INTO {t} (tag) SELECT DISTINCT t FROM unnest(",
            "::text[]) AS t ORDER BY t ON CONFLICT (tag) DO UPDATE \
             SET generation = excluded.generation, invalidated_at = now()",
        ],
        vec![&tags],
    )
    .execute(conn)
}

/// Tagged writes and tag invalidation.
impl<'a, V> KvCache<'a, V> {
    /// A handle whose writes tag their entries with `tags` (default: none, and
    /// writing with no tags removes an entry's old ones): [`set`](Cache::set) and
    /// its siblings, their `_in` forms, [`set_bytes`](Self::set_bytes) and its
    /// siblings, [`set_nx`](Self::set_nx), and the entry stored by
    /// [`get_or_compute`](Cache::get_or_compute). An entry written with tags reads
    /// as a miss once any of them is [invalidated](Self::invalidate_tag) after the
    /// write. [`incr`](Self::incr), [`touch`](Self::touch) and
    /// [`get_touch`](Self::get_touch) keep a live entry's tags (a counter `incr`
    /// starts has none).
    ///
    /// Tags are 1 to [`MAX_TAG_BYTES`] bytes without NUL, at most
    /// [`MAX_TAGS_PER_ENTRY`] per entry; a write with a bad tag fails with
    /// [`Error::InvalidInput`] naming it, and stores nothing.
    ///
    /// ```no_run
    /// use pgcache::{Cache, CacheManager};
    /// use serde_json::json;
    ///
    /// let cache = CacheManager::from_env()?;
    /// let page = cache.kv().tagged(&["user:42", "product:7"]);
    /// page.set("page:/products/7", &json!({"html": "..."}))?;
    /// // User 42 changed: every entry tagged with them reads as a miss.
    /// cache.kv().invalidate_tag("user:42")?;
    /// assert_eq!(cache.kv().get("page:/products/7")?, None);
    /// # Ok::<(), pgcache::Error>(())
    /// ```
    #[must_use]
    pub fn tagged<'t>(self, tags: &'t [&'t str]) -> KvCache<'t, V>
    where
        'a: 't,
    {
        KvCache {
            handle: self.handle,
            tags,
            value: std::marker::PhantomData,
        }
    }

    /// Makes every entry written with `tag` before now read as a miss, in every
    /// process (near caches within their staleness bound): the cost of one row,
    /// however many entries carry the tag. Cleanup deletes them later. Entries
    /// written with the tag afterwards are served.
    ///
    /// # Errors
    /// A bad tag (nothing is invalidated), or a connection or database error. In
    /// fail-open mode an invalidation the database did not get is not an error: the
    /// key/value cache is emptied once it answers, and read as misses until then.
    pub fn invalidate_tag(&self, tag: &str) -> Result<()> {
        self.invalidate_tags(&[tag])
    }

    /// [`invalidate_tag`](Self::invalidate_tag) for several tags at once, all or
    /// none.
    ///
    /// # Errors
    /// As [`invalidate_tag`](Self::invalidate_tag); one bad tag invalidates none.
    pub fn invalidate_tags(&self, tags: &[&str]) -> Result<()> {
        tags.iter().try_for_each(|tag| check_tag(tag))?;
        if tags.is_empty() {
            return Ok(());
        }
        let bumped = self.handle.cluster.all(|engine| {
            engine.write(
                CacheKind::Kv,
                Op::InvalidateTags,
                0,
                || Some(Skipped::whole()),
                |conn| Ok(bump(conn, engine.tables().tags(), tags)?),
            )
        });
        self.forget_tags_near(tags);
        bumped.map(drop)
    }

    /// [`invalidate_tag`](Self::invalidate_tag) on your connection, e.g. inside your
    /// own transaction: it takes effect when that transaction commits, and not at
    /// all if it rolls back.
    ///
    /// # Errors
    /// A bad tag, or a database error.
    pub fn invalidate_tag_in(&self, conn: &mut PgConnection, tag: &str) -> Result<()> {
        self.invalidate_tags_in(conn, &[tag])
    }

    /// [`invalidate_tags`](Self::invalidate_tags) on your connection, as
    /// [`invalidate_tag_in`](Self::invalidate_tag_in).
    ///
    /// # Errors
    /// A bad tag, or a database error.
    pub fn invalidate_tags_in(&self, conn: &mut PgConnection, tags: &[&str]) -> Result<()> {
        tags.iter().try_for_each(|tag| check_tag(tag))?;
        if tags.is_empty() || !self.handle.front().is_enabled() {
            return Ok(());
        }
        bump(conn, self.tag_table(), tags)?;
        // Harmless if the caller's transaction rolls back; its commit notifies.
        self.forget_tags_near(tags);
        Ok(())
    }

    /// The tag table, schema-qualified.
    pub(super) fn tag_table(&self) -> &'a str {
        self.handle.front().tables().tags()
    }

    /// This process's near caches stop serving entries read with `tags` before
    /// now (read-your-writes; other processes learn of it from the change log).
    fn forget_tags_near(&self, tags: &[&str]) {
        for (_, engine) in self.handle.cluster.shards() {
            if let Some(near) = engine.near() {
                near.invalidate_tags(tags.iter().copied());
            }
        }
    }
}

impl<V: Serialize + DeserializeOwned + Send + 'static> KvCache<'_, V> {
    /// Stores an entry with the default TTL, tagged with `tags`:
    /// [`tagged`](Self::tagged)`(tags).`[`set`](Cache::set)`(key, value)`.
    ///
    /// # Errors
    /// A bad key, value or tag (nothing is stored), or a connection or database
    /// error (skipped in fail-open mode).
    pub fn set_tagged(&self, key: &str, value: &V, tags: &[&str]) -> Result<()> {
        self.tagged(tags).set(key, value)
    }
}

/// Deletes the key/value entries made stale by the tags invalidated since cleanup
/// last swept them, with `delete` (cleanup's batched delete of the kv table's rows
/// matching an SQL condition); returns how many it deleted. The tags are then
/// recorded as swept at the generation read first: one invalidated again
/// meanwhile is swept next time.
pub(crate) fn sweep_invalidated(
    conn: &mut PgConnection,
    tables: &Tables,
    delete: &mut dyn FnMut(&mut PgConnection, &str) -> QueryResult<u64>,
) -> QueryResult<u64> {
    #[derive(QueryableByName)]
    struct Unswept {
        #[diesel(sql_type = Text)]
        tag: String,
        #[diesel(sql_type = BigInt)]
        generation: i64,
    }
    let unswept: Vec<Unswept> = diesel::sql_query(format!(
        "SELECT tag, generation FROM {} WHERE swept_generation IS DISTINCT FROM generation",
        tables.tags()
    ))
    .load(conn)?;
    if unswept.is_empty() {
        return Ok(0);
    }
    // Found through the partial GIN index on `tags` (`&&` implies NOT NULL).
    let condition = concat!(
        "tags && ARRAY(SELECT tag FROM {g} WHERE swept_generation IS DISTINCT FROM generation) \
         AND NOT (",
        tags_hold!(""),
        ")"
    )
    .replace("{g}", tables.tags());
    let removed = delete(conn, &condition)?;
    let (tags, generations): (Vec<String>, Vec<i64>) =
        unswept.into_iter().map(|u| (u.tag, u.generation)).unzip();
    diesel::sql_query(format!(
        "UPDATE {} AS s SET swept_generation = x.generation \
         FROM unnest($1::text[], $2::int8[]) AS x(tag, generation) WHERE s.tag = x.tag",
        tables.tags()
    ))
    .bind::<Array<Text>, _>(tags)
    .bind::<Array<BigInt>, _>(generations)
    .execute(conn)?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(tags: &[&str]) -> String {
        match check_tags(tags) {
            Err(Error::InvalidInput { reason, .. }) => reason,
            other => panic!("{tags:?}: {other:?}"),
        }
    }

    #[test]
    fn bad_tags_are_refused_naming_them() {
        assert!(check_tags(&[]).is_ok());
        assert!(check_tags(&["user:42", "product:7"]).is_ok());
        assert!(reason(&["ok", ""]).contains("must not be empty"));
        assert!(reason(&["a\0b"]).contains(r#""a\0b""#));
        let long = "x".repeat(MAX_TAG_BYTES + 1);
        let named = format!("this one has 257 (starts with {:?})", "x".repeat(32));
        assert!(reason(&[&long]).contains(&named));
        let many = vec!["t"; MAX_TAGS_PER_ENTRY + 1];
        assert!(reason(&many).contains("at most 64 tags, not 65"));
    }

    #[test]
    fn the_liveness_check_judges_untagged_rows_by_expiry_first() {
        assert!(live!("c.").starts_with(
            "c.expires_at > statement_timestamp() AND (c.tags IS NULL OR c.tag_generations = "
        ));
    }
}

//! The change-logging protocol: every rule by which a change to a cache table
//! reaches the near caches of other processes, in one place.
//!
//! A change is logged in one of two ways, in the writer's transaction:
//! - **by a trigger**: the statement-level triggers of a table with a near cache
//!   ([`create_triggers_sql`]) run `pgcache_near_invalidate` (in `migrations/`),
//!   which appends one row naming the changed keys to `cache_changes`. Deletes and
//!   `TRUNCATE` always go this way, and so do the updates of every connection that
//!   does not stamp;
//! - **by a stamp**: pgcache's own connections, when a near cache is configured,
//!   turn [`STAMPING_SETTING`] on; the update trigger's `WHEN` then skips their
//!   statements, and each of their updates sets `changed_xid` to its transaction id
//!   on the rows whose content it changed ([`change_stamp!`], [`upsert_stamp`]).
//!
//! A key/value tag invalidation changes no row of a cache table: it moves the tag's
//! generation in `cache_tags`, whose triggers (migration `tags`, always installed)
//! log one row under [`TAG_LOG_NAME`] naming the tags whose generation moved (NULL
//! for a `TRUNCATE`: every tag). The pollers read it with the rest, and a near
//! cache stops serving the entries it holds with those tags.
//!
//! What counts as a change is the same on both paths: a live row whose payload
//! ([`payload_columns`]) changed or whose expiry came earlier ([`changed_sql`]),
//! a live row deleted, a key that appears or goes. The trigger function's branches
//! are checked against [`trigger_branch_sql`] by this module's tests, so the two
//! paths cannot drift apart. The pollers read both in one snapshot, by the same
//! window on transaction ids ([`poll_sql`]), and the keys come back as the log names
//! them ([`logged_key_sql`], undone by [`near_key_from_log`]).
//!
//! Every update pgcache makes on a stamping connection that can change what a near
//! cache holds must carry a stamp: `tests/integration/near_logging_invariant.rs` runs every
//! write operation of every cache and fails on any changed row left unlogged.
//!
//! This module only writes SQL text (no database, no connection): migrations, the
//! pool, the statements of the tables and the poller take theirs from here.

use crate::config::CacheConfig;
use crate::kind::CacheKind;
use crate::tables::Tables;

/// [`STAMPING_SETTING`] as a literal, for statements written with `concat!`.
macro_rules! stamping_setting {
    () => {
        "pgcache.stamps_changes"
    };
}

/// The session setting with which a connection says that it stamps the rows its
/// updates change with its transaction id (`changed_xid`, read by the pollers next
/// to `cache_changes`), so the update triggers, which cost a quarter of a relaxed
/// write, need not log them: set on the cache's own pooled connections when a near
/// cache is configured ([`stamps_changes`]). The stamp and the triggers' `WHEN`
/// read this one setting, so an update is logged by exactly one of them. Every
/// update pgcache makes on such a connection that can change what a near cache
/// holds (a payload, an earlier expiry) must therefore carry a stamp; updates that
/// cannot (hit counts) need none.
pub(crate) const STAMPING_SETTING: &str = stamping_setting!();

/// The stamp's SQL in pieces: the `SET` item up to its condition ...
macro_rules! stamp_when {
    () => {
        concat!(
            "changed_xid = CASE WHEN current_setting('",
            $crate::near::protocol::stamping_setting!(),
            "', true) = 'on' AND ("
        )
    };
}

/// ... from its condition to the table's name or alias ...
macro_rules! stamp_then {
    () => {
        ") THEN pg_current_xact_id()::text::int8 ELSE "
    };
}

/// ... and after the table's name or alias.
macro_rules! stamp_end {
    () => {
        ".changed_xid END"
    };
}

/// The `SET` item stamping the row an update changes (`$table`: the name or alias
/// the statement gives the table) when the connection stamps and `$changed` (SQL,
/// true when the update changes what a near cache may hold) holds. Otherwise the
/// stamp is kept: one no poller has read yet must survive a later update the trigger
/// does not log (the same value again), or the change it stands for would be lost.
/// A row never stamped stays NULL, out of the partial index, so a database without
/// near caches pays nothing; an insert leaves it NULL (no near cache holds a key
/// that had no row).
macro_rules! change_stamp {
    ($table:literal, $changed:literal) => {
        concat!(
            $crate::near::protocol::stamp_when!(),
            $changed,
            $crate::near::protocol::stamp_then!(),
            $table,
            $crate::near::protocol::stamp_end!()
        )
    };
}
pub(crate) use {change_stamp, stamp_end, stamp_then, stamp_when, stamping_setting};

/// The cache name under which the change log names invalidated key/value tags.
/// The tag table's trigger function (migration `tags`) writes it as a literal.
pub(crate) const TAG_LOG_NAME: &str = "kv_tags";

/// Whether the cache's own connections stamp their changes (a near cache is
/// configured). Never through a transaction pooler: the setting would stay on a
/// server connection another client then uses, whose updates would skip the
/// trigger and reach no poller (stale near caches, no error); there the triggers
/// log pgcache's updates too.
pub(crate) fn stamps_changes(config: &CacheConfig) -> bool {
    !config.sessionless()
        && CacheKind::ALL
            .iter()
            .any(|&kind| config.near_cache(kind).is_some())
}

/// The columns whose change near caches must hear of (an earlier expiry too): a
/// typed table's upsert stamps a live row only when one of them changes, and the
/// trigger function compares the same ones for other writers. (The key/value cache
/// stamps every update without comparing.)
pub(crate) fn payload_columns(kind: CacheKind) -> &'static [&'static str] {
    match kind {
        // The near cache keeps an entry's tags with its value.
        CacheKind::Kv => &[
            "value",
            "bytes",
            "packed",
            "bytes_packed",
            "tags",
            "tag_generations",
        ],
        CacheKind::Embedding => &["embedding", "packed"],
        CacheKind::VectorSearch => &["results", "filters", "top_k", "user_id", "packed"],
        CacheKind::LlmResponse => &["response", "packed"],
        CacheKind::AudioChunk => &["audio_data", "storage_path", "packed"],
    }
}

/// SQL true when the row `new` (a name or alias: `excluded`, `n`) changes what a
/// near cache may hold of the live row `old`: its payload changed, or its expiry
/// came earlier.
pub(crate) fn changed_sql(kind: CacheKind, old: &str, new: &str) -> String {
    let columns = payload_columns(kind);
    let row = |alias: &str| {
        let list: Vec<String> = columns.iter().map(|c| format!("{alias}.{c}")).collect();
        match list.as_slice() {
            [one] => one.clone(),
            many => format!("({})", many.join(", ")),
        }
    };
    format!(
        "{} IS DISTINCT FROM {} OR {new}.expires_at < {old}.expires_at",
        row(old),
        row(new)
    )
}

/// The stamp of a typed table's upsert (`table`: its schema-qualified name, under
/// which `SET` sees the old row; `excluded` the new one): a live row is stamped only
/// when [`changed_sql`] holds. Entries keyed by a digest of their inputs are
/// normally written again unchanged, and that must not evict them from every near
/// cache.
pub(crate) fn upsert_stamp(kind: CacheKind, table: &str) -> String {
    format!(
        "{}{table}.expires_at > statement_timestamp() AND ({}){}{table}{}",
        stamp_when!(),
        changed_sql(kind, table, "excluded"),
        stamp_then!(),
        stamp_end!()
    )
}

/// SQL naming a row's key as the change log does (key/value keys as they are,
/// digests as hex), for the row alias `row` (`None`: unqualified).
pub(crate) fn logged_key_sql(kind: CacheKind, row: Option<&str>) -> String {
    let column = kind.descriptor().key;
    let qualified = match row {
        Some(row) => format!("{row}.{column}"),
        None => column.to_owned(),
    };
    match kind {
        CacheKind::Kv => qualified,
        _ => format!("encode({qualified}, 'hex')"),
    }
}

/// A near-cache key back from a key as the change log names it; `None` for one
/// that is not well formed (no near cache holds it).
pub(crate) fn near_key_from_log(kind: CacheKind, logged: &str) -> Option<Vec<u8>> {
    match kind {
        CacheKind::Kv => Some(logged.as_bytes().to_vec()),
        _ => hex::decode(logged).ok(),
    }
}

/// The trigger function's branch for updates of `kind`'s table: old and new rows
/// fully joined on the key, so a key an update moves is named on both sides; a key
/// on both sides is named when it was live and [`changed_sql`] holds. The newest
/// migration defining `pgcache_near_invalidate` holds exactly this branch for
/// every cache (checked by this module's tests): a migration replacing the function
/// writes its branches from here.
#[cfg(test)]
fn trigger_branch_sql(kind: CacheKind) -> String {
    let key = kind.descriptor().key;
    format!(
        "ELSIF TG_ARGV[0] = '{name}' THEN \
         SELECT array_agg({logged}) INTO changed \
         FROM old_rows o FULL JOIN new_rows n USING ({key}) \
         WHERE CASE WHEN o.{key} IS NULL THEN true \
         WHEN o.expires_at <= statement_timestamp() THEN false \
         WHEN n.{key} IS NULL THEN true \
         ELSE {changed} END;",
        name = kind.name(),
        logged = logged_key_sql(kind, None),
        changed = changed_sql(kind, "o", "n"),
    )
}

/// The trigger names, in the order [`create_triggers_sql`] creates them.
pub(crate) const TRIGGERS: [&str; 3] = [
    "pgcache_near_update",
    "pgcache_near_delete",
    "pgcache_near_truncate",
];

/// The statements creating `kind`'s near-cache invalidation triggers on `relation`
/// (its table or one of the table's leaf partitions), replacing those there. The
/// update trigger skips the statements of connections that stamp their own changes
/// ([`STAMPING_SETTING`]).
pub(crate) fn create_triggers_sql(kind: CacheKind, relation: &str) -> String {
    // Names come from the closed descriptors and the catalog, never from input.
    let drops: String = TRIGGERS
        .iter()
        .map(|t| format!("DROP TRIGGER IF EXISTS {t} ON {relation}; "))
        .collect();
    format!(
        "{drops}\
         CREATE TRIGGER pgcache_near_update AFTER UPDATE ON {relation} \
           REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows \
           FOR EACH STATEMENT WHEN (current_setting('{STAMPING_SETTING}', true) IS DISTINCT FROM 'on') \
           EXECUTE FUNCTION pgcache_near_invalidate('{name}'); \
         CREATE TRIGGER pgcache_near_delete AFTER DELETE ON {relation} \
           REFERENCING OLD TABLE AS old_rows \
           FOR EACH STATEMENT EXECUTE FUNCTION pgcache_near_invalidate('{name}'); \
         CREATE TRIGGER pgcache_near_truncate AFTER TRUNCATE ON {relation} \
           FOR EACH STATEMENT EXECUTE FUNCTION pgcache_near_invalidate('{name}');",
        name = kind.name()
    )
}

/// The query finding, among the relations `$1` (`text[]`, in order), those whose
/// triggers are not all as [`create_triggers_sql`] makes them: one missing, or an
/// update trigger without the `WHEN` on the current setting (`$2`:
/// [`setting_in_trigger`]; one installed by an earlier version has none, or another
/// setting's). In the order given: the partitioned table before its partitions, as
/// writers lock them.
pub(crate) const LACKING_TRIGGERS_SQL: &str =
    "SELECT t.name FROM unnest($1::text[]) WITH ORDINALITY AS t(name, n) \
     WHERE (SELECT count(*) FROM pg_trigger g \
            WHERE g.tgrelid = t.name::regclass \
              AND g.tgname IN ('pgcache_near_update', 'pgcache_near_delete', 'pgcache_near_truncate') \
              AND (g.tgname <> 'pgcache_near_update' OR strpos(pg_get_triggerdef(g.oid), $2) > 0)) <> 3 \
     ORDER BY t.n";

/// How the setting appears in a current update trigger's definition: the `$2` of
/// [`LACKING_TRIGGERS_SQL`].
pub(crate) fn setting_in_trigger() -> String {
    format!("'{STAMPING_SETTING}'")
}

/// The poll statement for near caches of `kinds`, after its two parameters (the
/// poller's `PollStatement`): the change log's rows, and the rows of their tables
/// that pgcache's own updates stamped (`changed_xid`), both by the same window rule
/// (`w.xmax`: the previous snapshot's xmax, `w.xip`: the transactions it saw
/// running) and in the same snapshot. Keys as the change log names them
/// ([`logged_key_sql`]). The upper bound (the snapshot's own xmax, which every
/// visible row is below) changes no answer: it lets the plan prepared once, which
/// cannot see the parameters, estimate a narrow range and use the indexes.
pub(crate) fn poll_sql(tables: &Tables, kinds: impl Iterator<Item = CacheKind>) -> String {
    let window = |column: &str| {
        format!(
            "({column} >= (SELECT xmax FROM w) \
             AND {column} < (SELECT pg_snapshot_xmax(snap)::text::int8 FROM s)) \
             OR {column} = ANY((SELECT xip FROM w)::int8[])"
        )
    };
    let mut changes = format!(
        "SELECT cache_name, keys FROM {} WHERE {}",
        tables.changes(),
        window("xid")
    );
    for kind in kinds {
        // Names come from the closed descriptors, never from input.
        changes.push_str(&format!(
            " UNION ALL SELECT '{name}', array_agg({key}) FROM {t} WHERE {window} \
             HAVING count(*) > 0",
            name = kind.name(),
            key = logged_key_sql(kind, None),
            t = tables.of(kind),
            window = window("changed_xid"),
        ));
    }
    format!(
        "::text[]::int8[] AS xip), s AS (SELECT pg_current_snapshot() AS snap), \
         c AS ({changes}) \
         SELECT pg_snapshot_xmax(s.snap)::text AS xmax, \
                array(SELECT pg_snapshot_xip(s.snap)::text) AS xip, \
                (extract(epoch FROM clock_timestamp()) * 1000000)::int8 AS now_us, \
                c.cache_name, c.keys, c.cache_name IS NOT NULL AS is_change \
         FROM s LEFT JOIN c ON true"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SQL without comments, in single-spaced words.
    fn words(sql: &str) -> String {
        sql.lines()
            .map(|line| line.split("--").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" ")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The newest migration that (re)defines the trigger function.
    fn newest_trigger_function() -> (String, String) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut migrations: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        migrations.sort();
        migrations
            .iter()
            .rev()
            .find_map(|m| {
                let up = std::fs::read_to_string(m.join("up.sql")).ok()?;
                up.contains("FUNCTION pgcache_near_invalidate()")
                    .then(|| (m.display().to_string(), words(&up)))
            })
            .expect("a migration defines the trigger function")
    }

    #[test]
    fn the_trigger_function_counts_the_payloads_the_stamps_count() {
        let (migration, function) = newest_trigger_function();
        for kind in CacheKind::ALL {
            let branch = words(&trigger_branch_sql(kind));
            assert!(
                function.contains(&branch),
                "{migration} lacks the protocol's branch for {kind}:\n{branch}"
            );
        }
    }

    #[test]
    fn the_trigger_function_names_deleted_keys_as_the_poll_does() {
        let (migration, function) = newest_trigger_function();
        for kind in [CacheKind::Kv, CacheKind::Embedding] {
            let named = format!("SELECT array_agg({})", logged_key_sql(kind, Some("o")));
            assert!(function.contains(&named), "{migration} lacks {named}");
        }
    }

    #[test]
    fn tag_invalidations_are_logged_under_the_name_the_pollers_read() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let up = std::fs::read_to_string(dir.join("2026-12-07-100000_tags/up.sql")).unwrap();
        let function = words(&up);
        let logged = format!("VALUES ('{TAG_LOG_NAME}', changed)");
        assert!(function.contains(&logged), "migration tags lacks {logged}");
        assert!(CacheKind::from_name(TAG_LOG_NAME).is_none());
    }

    #[test]
    fn a_typed_upsert_stamps_only_changed_live_rows() {
        assert_eq!(
            upsert_stamp(CacheKind::Embedding, "t"),
            "changed_xid = CASE WHEN current_setting('pgcache.stamps_changes', true) = 'on' \
             AND (t.expires_at > statement_timestamp() AND ((t.embedding, t.packed) IS DISTINCT \
             FROM (excluded.embedding, excluded.packed) OR excluded.expires_at < t.expires_at)) \
             THEN pg_current_xact_id()::text::int8 ELSE t.changed_xid END"
        );
    }

    #[test]
    fn logged_keys_come_back_as_near_keys() {
        assert_eq!(
            near_key_from_log(CacheKind::Kv, "user:1").as_deref(),
            Some(&b"user:1"[..])
        );
        assert_eq!(
            near_key_from_log(CacheKind::Embedding, "00ff").as_deref(),
            Some(&[0u8, 255][..])
        );
        assert_eq!(near_key_from_log(CacheKind::Embedding, "zz"), None);
    }
}

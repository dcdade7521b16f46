//! Hash partitioning of the cache tables on their key, chosen at migrate time
//! (`pgcache migrate --partitions N`), and finding a table's partitions for the
//! statements that must run per partition.
//!
//! Why per partition: cleanup and eviction claim rows by `ctid` (one statement for
//! every table, whatever its key, and a TID scan for the delete), and a `ctid` is
//! only unique within one partition. Reads and writes by key need nothing: the
//! partition key is the primary key, so upserts work unchanged and a prepared
//! statement's generic plan prunes to one partition when it starts.

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::sql_types::{BigInt, Bool, Nullable, Text};
use diesel::{Connection, QueryResult, QueryableByName, RunQueryDsl};

use crate::error::{Error, Result};
use crate::kind::CacheKind;
use crate::migrations::SchemaLock;
use crate::pool::quote_ident;

/// Most partitions per table: enough for any single server, and it bounds the
/// statements a cleanup runs per table.
pub const MAX_PARTITIONS: u32 = 1024;

/// The tables holding `table`'s rows (`table` schema-qualified): its leaf
/// partitions, or the table itself when it is not partitioned. Names quoted and
/// schema-qualified, so usable in SQL as they are on any search path.
pub(crate) fn leaves(conn: &mut PgConnection, table: &str) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Leaf {
        #[diesel(sql_type = Text)]
        name: String,
    }
    let leaves: Vec<Leaf> = diesel::sql_query(
        "SELECT format('%I.%I', n.nspname, c.relname) AS name \
         FROM pg_partition_tree($1::regclass) t JOIN pg_class c ON c.oid = t.relid \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.isleaf ORDER BY t.relid",
    )
    .bind::<Text, _>(table)
    .load(conn)?;
    Ok(if leaves.is_empty() {
        vec![table.to_owned()]
    } else {
        leaves.into_iter().map(|leaf| leaf.name).collect()
    })
}

/// SQL for the bytes on disk of `table` and its partitions (heap, indexes, TOAST);
/// `pg_total_relation_size` of a partitioned table alone is 0.
pub(crate) fn size_sql(table: &str) -> String {
    let table = table.replace('\'', "''");
    format!(
        "(SELECT coalesce(sum(pg_total_relation_size(relid))::bigint, \
           pg_total_relation_size('{table}'::regclass)) FROM pg_partition_tree('{table}'::regclass))"
    )
}

/// How many hash partitions `table` (schema-qualified) has: `None` when it is not
/// partitioned.
fn partition_count(conn: &mut PgConnection, table: &str) -> QueryResult<Option<u32>> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = Nullable<BigInt>)]
        n: Option<i64>,
    }
    let count: Count = diesel::sql_query(
        "SELECT CASE WHEN c.relkind = 'p' THEN \
           (SELECT count(*) FROM pg_inherits WHERE inhparent = c.oid) END AS n \
         FROM pg_class c WHERE c.oid = $1::regclass",
    )
    .bind::<Text, _>(table)
    .get_result(conn)?;
    Ok(count.n.map(|n| n as u32))
}

/// What [`CacheManager::partition_tables`](crate::CacheManager::partition_tables) did to one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Partitioning {
    /// The cache.
    pub cache: CacheKind,
    /// Its hash partitions now.
    pub partitions: u32,
    /// Whether this run converted it (false: it already had that many).
    pub converted: bool,
}

/// Checks a number of partitions, before anything touches the database.
///
/// # Errors
/// [`Error::InvalidInput`] for 0 or more than [`MAX_PARTITIONS`].
pub(crate) fn check_count(partitions: u32) -> Result<()> {
    if partitions == 0 || partitions > MAX_PARTITIONS {
        return Err(Error::invalid(
            "partitions",
            format!("must be 1 to {MAX_PARTITIONS}, not {partitions}"),
        ));
    }
    Ok(())
}

/// `table` of `schema`, both quoted: every statement of partitioning names the
/// cache's schema, whatever the connection's search path (on an application's
/// pool, the cache's schema comes last, and a table created by an unqualified name
/// would land in the application's).
fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// Makes every cache table of `lock`'s schema hash-partitioned on its key into
/// `partitions` tables named `<table>_p<i>`, moving the rows over, each table in one
/// transaction (its reads and writes wait for it) under the migration timeout.
/// Indexes, checks, defaults, storage options, unlogged status and near-cache
/// triggers carry over; privileges granted on the table do not (grant them again).
/// A table that already has `partitions` partitions is left alone, so running it
/// again is safe.
///
/// # Errors
/// [`Error::InvalidInput`] for 0 or more than [`MAX_PARTITIONS`] partitions, or
/// for a table already partitioned into another number (repartitioning would
/// rewrite it: clear the cache and recreate the schema instead); a database error
/// leaves the table as it was.
pub(crate) fn partition(
    conn: &mut PgConnection,
    lock: SchemaLock<'_>,
    partitions: u32,
) -> Result<Vec<Partitioning>> {
    check_count(partitions)?;
    let schema = lock.schema();
    lock.extended(|| {
        crate::migrations::locked(conn, lock, |conn| {
            CacheKind::ALL
                .iter()
                .map(|&cache| {
                    let table = cache.table();
                    match partition_count(conn, &qualified(schema, table))? {
                        Some(n) if n == partitions => Ok(Partitioning {
                            cache,
                            partitions,
                            converted: false,
                        }),
                        Some(n) => Err(Error::invalid(
                            "partitions",
                            format!(
                                "{table} already has {n} partitions, not {partitions}; \
                                 repartitioning is not supported"
                            ),
                        )),
                        None => {
                            convert(conn, lock, cache, partitions)?;
                            Ok(Partitioning {
                                cache,
                                partitions,
                                converted: true,
                            })
                        }
                    }
                })
                .collect()
        })
    })
}

/// The conversion of one table, in one transaction with the migration timeout.
fn convert(
    conn: &mut PgConnection,
    lock: SchemaLock<'_>,
    cache: CacheKind,
    partitions: u32,
) -> Result<()> {
    #[derive(QueryableByName)]
    struct Shape {
        #[diesel(sql_type = Text)]
        options: String,
        #[diesel(sql_type = Text)]
        persistence: String,
        #[diesel(sql_type = Text)]
        rename_indexes: String,
        #[diesel(sql_type = BigInt)]
        near_triggers: i64,
        #[diesel(sql_type = Bool)]
        relaxed_commit_trigger: bool,
    }
    let descriptor = cache.descriptor();
    let schema = lock.schema();
    let key = descriptor.key;
    let old_name = format!("{}_unpartitioned", descriptor.table);
    let (table, old) = (
        qualified(schema, descriptor.table),
        qualified(schema, &old_name),
    );
    conn.transaction(|conn| -> Result<()> {
        lock.limit_transaction(conn)?;
        conn.batch_execute(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))?;
        // Read under the lock. The old table's indexes are renamed so that the new
        // table's get their usual names.
        let shape: Shape = diesel::sql_query(
            "SELECT coalesce(' WITH (' || array_to_string(c.reloptions, ', ') || ')', '') AS options, \
               CASE c.relpersistence WHEN 'u' THEN 'UNLOGGED ' ELSE '' END AS persistence, \
               coalesce((SELECT string_agg(format('ALTER INDEX %I.%I RENAME TO %I;', n.nspname, \
                   i.relname, left(i.relname, 48) || '_unpartitioned'), ' ') \
                 FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid \
                   JOIN pg_namespace n ON n.oid = i.relnamespace \
                 WHERE x.indrelid = c.oid), '') AS rename_indexes, \
               (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = c.oid \
                 AND t.tgname LIKE 'pgcache_near_%') AS near_triggers, \
               EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = c.oid \
                 AND t.tgname = 'pgcache_relaxed_commit') AS relaxed_commit_trigger \
             FROM pg_class c WHERE c.oid = $1::regclass",
        )
        .bind::<Text, _>(&table)
        .get_result(conn)?;
        // Names come from the closed descriptors and the catalog, never from input.
        let mut sql = format!(
            "ALTER TABLE {table} RENAME TO {old_name}; {rename} \
             CREATE TABLE {table} (LIKE {old} INCLUDING ALL) PARTITION BY HASH ({key});",
            old_name = quote_ident(&old_name),
            rename = shape.rename_indexes
        );
        for i in 0..partitions {
            sql.push_str(&format!(
                " CREATE {persistence}TABLE {leaf} PARTITION OF {table} \
                   FOR VALUES WITH (MODULUS {partitions}, REMAINDER {i}){options};",
                leaf = qualified(schema, &format!("{}_p{i}", descriptor.table)),
                persistence = shape.persistence,
                options = shape.options,
            ));
        }
        sql.push_str(&format!(
            " INSERT INTO {table} SELECT * FROM {old}; DROP TABLE {old};"
        ));
        if shape.relaxed_commit_trigger {
            // On the new table only: pgcache's writes name the table, never a
            // partition.
            sql.push_str(&crate::relaxed::TRIGGER.replace("{table}", &table).replace("{schema}", &quote_ident(schema)));
            sql.push(';');
        }
        conn.batch_execute(&sql)?;
        if shape.near_triggers > 0 {
            // On the new table and each partition: a statement naming a partition
            // fires only the partition's statement triggers. Their tables and
            // function are found on the cache's schema alone, for this transaction
            // only (an application's connection may not have it on its path).
            diesel::sql_query("SELECT set_config('search_path', $1, true)")
                .bind::<Text, _>(quote_ident(schema))
                .execute(conn)?;
            crate::migrations::install_near_triggers(conn, cache)?;
        }
        Ok(())
    })
}

//! The tag rows of `pgcache-bench ops`: a kv get of entries with 0 (the tag
//! column empty), 1 and 5 tags against a get of untagged entries, and
//! `invalidate_tag` of a tag that `--tagged-entries` entries carry against one that
//! none carries, alternating slices, both sides through the library; and what the
//! tag check adds to the read of an untagged entry: the get's statement against
//! the one before tags, both on plain connections.

use pgcache::{Cache, CacheManager};
use postgres::{Client, NoTls, Statement};

use super::{alternate, BenchResult, Budget, Results, Worker};

/// Entries per read row (and of the untagged baseline).
const READ_ROWS: u64 = 10_000;

/// Tags invalidated before the fill, so that half the tags read have a row in
/// `cache_tags` (the other half: a tag never invalidated, generation 0).
const INVALIDATED: u64 = 1000;

/// The tag every `--tagged-entries` entry carries, and one no entry carries.
const BIG_TAG: &str = "bench:big";
const EMPTY_TAG: &str = "bench:none";

/// The read rows' names (each judged against the 1.25x target).
pub(super) const READ_ROW_NAMES: [&str; 3] = [
    "kv get 0 tags (empty) / untagged",
    "kv get 1 tag / untagged",
    "kv get 5 tags / untagged",
];

/// How the invalidation row's name starts (the entries' count follows).
pub(super) const INVALIDATE_ROW: &str = "kv invalidate_tag ";

/// The read rows: name, key prefix of the tagged side, and the SQL of its tags
/// for entry `g` (`tags_0`: an empty array).
const READS: [(&str, &str, &str); 3] = [
    (READ_ROW_NAMES[0], "tags_0:", "ARRAY[]::text[]"),
    (READ_ROW_NAMES[1], "tags_1:", "ARRAY['p:' || (g % 2000)]"),
    (
        READ_ROW_NAMES[2],
        "tags_5:",
        "ARRAY['p:' || (g % 2000), 'u:' || (g % 997), 'c:' || (g % 13), 'site', 'lang:' || (g % 7)]",
    ),
];
const UNTAGGED: &str = "untagged:";

/// The library's kv get, with the check of an entry's tags (`caches/kv/tags.rs`,
/// `live!`), and the same read before tags.
const GET_CHECKED: &str = "SELECT value, bytes, expires_at, tags FROM cache_entries \
     WHERE key = $1 AND expires_at > statement_timestamp() AND (tags IS NULL OR NOT EXISTS \
     (SELECT FROM unnest(tags, tag_generations) AS x(tag, generation) WHERE \
     coalesce((SELECT g.generation FROM cache_tags AS g WHERE g.tag = x.tag), 0) <> x.generation))";
const GET_BEFORE_TAGS: &str = "SELECT value, bytes, expires_at FROM cache_entries \
     WHERE key = $1 AND expires_at > statement_timestamp()";

/// A plain connection with one of those statements prepared, planned as the
/// library's connections plan.
struct RawGet {
    client: Client,
    get: Statement,
}

/// One side of a row: the manager, and the prefix of the keys it reads or the tag
/// it invalidates.
#[derive(Clone, Copy)]
struct Side<'a> {
    cache: &'a CacheManager,
    prefix: &'static str,
}

/// Fills the tables and measures the rows for each thread count in `passes`, on
/// the bench's schema.
pub(super) fn rows(
    url: &str,
    schema: &str,
    tagged_entries: u64,
    passes: &[usize],
    budget: Budget,
    cache: &CacheManager,
    results: &mut Results,
) -> BenchResult<()> {
    let mut client = Client::connect(url, NoTls)?;
    client.batch_execute(&format!("SET search_path TO \"{schema}\""))?;
    // Half the `p:` tags have a generation; the entries carry the generations a
    // write would have read (the library's expression).
    client.batch_execute(&format!(
        "INSERT INTO cache_tags (tag) SELECT 'p:' || g FROM generate_series(0, {last_tag}) g;
         INSERT INTO cache_entries (key, value, expires_at)
           SELECT '{UNTAGGED}' || g, '{{\"id\": 1}}', now() + interval '1 day'
           FROM generate_series(0, {last}) g;",
        last_tag = INVALIDATED - 1,
        last = READ_ROWS - 1
    ))?;
    for (_, prefix, tags) in READS {
        client.batch_execute(&format!(
            "INSERT INTO cache_entries (key, value, expires_at, tags, tag_generations)
               SELECT '{prefix}' || g, '{{\"id\": 1}}', now() + interval '1 day', t.tags,
                 coalesce((SELECT array_agg(coalesce(c.generation, 0) ORDER BY x.n)
                   FROM unnest(t.tags) WITH ORDINALITY AS x(tag, n)
                   LEFT JOIN cache_tags c ON c.tag = x.tag), ARRAY[]::bigint[])
               FROM generate_series(0, {last}) g, LATERAL (SELECT {tags} AS tags) t;",
            last = READ_ROWS - 1
        ))?;
    }
    results.mark("tags: read rows filled");
    client.batch_execute(&format!(
        "INSERT INTO cache_entries (key, value, expires_at, tags, tag_generations)
           SELECT 'big:' || g, '1', now() + interval '1 day', ARRAY['{BIG_TAG}'], ARRAY[0::bigint]
           FROM generate_series(1, {tagged_entries}) g;"
    ))?;
    // Separately: VACUUM cannot run in a multi-statement query's transaction.
    for table in ["cache_entries", "cache_tags"] {
        client.batch_execute(&format!("VACUUM ANALYZE {table}"))?;
    }
    results.mark("tags: tagged entries filled");
    for &threads in passes {
        for (name, prefix, _) in READS {
            let get = |side: &mut Side<'_>, w: &mut Worker| -> BenchResult<bool> {
                let n = w.random() % READ_ROWS;
                let key = w.set_key(format_args!("{}{n}", side.prefix));
                Ok(side.cache.kv().get(key)?.is_some())
            };
            compare(
                name,
                threads,
                budget,
                results,
                [prefix, UNTAGGED],
                cache,
                &get,
            )?;
        }
    }
    let raw = |sql: &str| -> BenchResult<RawGet> {
        let mut client = Client::connect(url, NoTls)?;
        client.batch_execute(&format!(
            "SET search_path TO \"{schema}\"; SET plan_cache_mode = force_generic_plan"
        ))?;
        let get = client.prepare(sql)?;
        Ok(RawGet { client, get })
    };
    let raw_get = |side: &mut RawGet, w: &mut Worker| -> BenchResult<bool> {
        let n = w.random() % READ_ROWS;
        let key = w.set_key(format_args!("{UNTAGGED}{n}"));
        Ok(side.client.query_opt(&side.get, &[&key])?.is_some())
    };
    for &threads in passes {
        let sides = [GET_CHECKED, GET_BEFORE_TAGS].map(|sql| {
            (0..threads)
                .map(|_| raw(sql))
                .collect::<BenchResult<Vec<_>>>()
        });
        let [checked, before] = sides;
        let [with, without] = alternate([checked?, before?], 3000, READ_ROWS, budget, &raw_get)?;
        results.record(
            "untagged get SQL: tag check / none",
            threads,
            with,
            Some(without),
        );
    }
    // One thread: invalidations of one tag serialise on its row anyway.
    let invalidate = |side: &mut Side<'_>, _: &mut Worker| -> BenchResult<bool> {
        side.cache.kv().invalidate_tag(side.prefix)?;
        Ok(true)
    };
    let name = format!("{INVALIDATE_ROW}{tagged_entries} / 0 entries");
    compare(
        &name,
        1,
        budget,
        results,
        [BIG_TAG, EMPTY_TAG],
        cache,
        &invalidate,
    )?;
    Ok(())
}

/// Measures `step` on two sides (`prefixes[0]`: the row's, `[1]`: its baseline, in
/// the raw columns).
fn compare(
    name: &str,
    threads: usize,
    budget: Budget,
    results: &mut Results,
    prefixes: [&'static str; 2],
    cache: &CacheManager,
    step: &(dyn Fn(&mut Side<'_>, &mut Worker) -> BenchResult<bool> + Sync),
) -> BenchResult<()> {
    let sides = prefixes.map(|prefix| vec![Side { cache, prefix }; threads]);
    let [row, baseline] = alternate(sides, 3000, READ_ROWS, budget, step)?;
    results.record(name, threads, row, Some(baseline));
    Ok(())
}

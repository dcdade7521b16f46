//! Rows for the operations tests, written with SQL directly so every cache table can
//! be filled whether or not its typed handle exists.
#![allow(dead_code)]

use crate::common::TestDb;

/// Every table cleanup looks at: the five cache tables and the leases.
pub const TABLES: [&str; 6] = [
    "cache_entries",
    "embedding_cache",
    "vector_search_cache",
    "llm_response_cache",
    "audio_chunk_cache",
    "cache_leases",
];

/// Inserts `n` rows into `table`, keyed by `tag` and a counter, expiring at
/// `now() + offset` (`offset` is an SQL interval literal such as `-1 minute`).
pub fn fill(db: &TestDb, table: &str, tag: &str, n: u32, offset: &str) {
    let expires = format!("now() + interval '{offset}'");
    let hash = format!("sha256(('{tag}' || g)::bytea)");
    let sql = match table {
        "cache_entries" => format!(
            "INSERT INTO cache_entries (key, value, expires_at) \
             SELECT '{tag}:' || g, '1'::jsonb, {expires} FROM generate_series(1, {n}) g"
        ),
        "embedding_cache" => format!(
            "INSERT INTO embedding_cache (key_hash, model, dimensions, embedding, expires_at) \
             SELECT {hash}, 'm', 1, '\\x00000000'::bytea, {expires} FROM generate_series(1, {n}) g"
        ),
        "vector_search_cache" => format!(
            "INSERT INTO vector_search_cache (key_hash, user_id, top_k, filters, results, expires_at) \
             SELECT {hash}, gen_random_uuid(), 1, '{{}}', '[]', {expires} FROM generate_series(1, {n}) g"
        ),
        "llm_response_cache" => format!(
            "INSERT INTO llm_response_cache (key_hash, provider, response, hit_count, expires_at) \
             SELECT {hash}, 'gemini-flash', 'r', g, {expires} FROM generate_series(1, {n}) g"
        ),
        "audio_chunk_cache" => format!(
            "INSERT INTO audio_chunk_cache (key_hash, voice_model_id, provider, audio_data, format, \
             duration_ms, sample_rate, channels, byte_size, hit_count, expires_at) \
             SELECT {hash}, 'v', 'xtts-v2', '\\x00'::bytea, 'opus', 1000, 16000, 1, 1000, g, {expires} \
             FROM generate_series(1, {n}) g"
        ),
        "cache_leases" => format!(
            "INSERT INTO cache_leases (lease_key, holder, expires_at) \
             SELECT {hash}, gen_random_uuid(), {expires} FROM generate_series(1, {n}) g"
        ),
        other => panic!("no filler for {other}"),
    };
    db.exec(&sql);
}

/// Rows of `table` that have expired / are live.
pub fn expired(db: &TestDb, table: &str) -> i64 {
    db.count(&format!(
        "SELECT count(*) AS n FROM {table} WHERE expires_at <= now()"
    ))
}

pub fn live(db: &TestDb, table: &str) -> i64 {
    db.count(&format!(
        "SELECT count(*) AS n FROM {table} WHERE expires_at > now()"
    ))
}

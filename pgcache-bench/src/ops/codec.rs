//! The codec rows of `pgcache-bench ops`: what compression and encryption at rest
//! cost. Each row sets or gets through two managers on the bench's schema, side by
//! side in alternating slices: the codec's side in the "pgcache" columns, the same
//! cache without it in the "raw" ones. Compression: a 10 KB JSON document and a
//! 4 KB LLM response, compressed (the default threshold, 1 KiB) against
//! compression off, with the size each is stored in. Encryption: a 1 KB value
//! sealed with a key against the default configuration (not compressed on either
//! side: it is under the threshold).

use pgcache::{Cache, CacheManager, LlmPrompt};
use serde_json::{json, Value};

use super::{bench_config, side_by_side, BenchResult, Budget, Results, Worker, TTL};

/// Keys each side writes and reads, per thread of the largest pass.
const KEYS: u64 = 64;

/// An LLM's answer of about 4 KB, as a cache would hold it: prose, not one
/// repeated character.
const RESPONSE: &str = "Caching the answers of a language model is worth it when the same \
questions come back, and in most products they do: support assistants see the same dozen \
questions about passwords, invoices and shipping every hour, and documentation assistants \
are asked how to install, configure and upgrade far more often than anything else. The \
simplest cache keys the response by the exact prompt, the model and the generation \
parameters, so that a change of temperature or of the system prompt never returns an answer \
produced under other conditions.\n\nThere are three things to decide. First, what makes two \
requests the same. Hashing the prompt byte for byte is safe but strict: a trailing space or \
a different capitalisation is a different key. Normalising whitespace and case before \
hashing raises the hit rate without much risk, while semantic matching (embedding the \
prompt and looking for a near neighbour) raises it further but can return an answer to a \
question that was not quite asked, which matters for anything involving numbers, dates or \
names. Second, how long an answer stays valid. Answers that depend on documents should \
expire when the documents change, which is easiest when the cache write happens in the same \
transaction as the document update, or when entries carry the version of the sources they \
were built from. Answers that depend only on the model can live for days, but should be \
dropped when the model is upgraded, so the model name belongs in the key. Third, who may see \
an answer. A response generated for one user may contain that user's data, such as an \
order number, an address or the text of a private message. Such entries must be keyed by \
the user as well, and removed when the user asks to be forgotten.\n\nStorage matters more \
than it first seems. Responses are a few kilobytes each, and a busy assistant produces \
millions of them, so the cache quickly becomes one of the larger tables of the database. \
Compressing the text before storing it typically halves or thirds its size, which shrinks \
the table, its backups and the write-ahead log that replicas replay. Encrypting it at rest \
keeps a database dump, a misplaced backup or a read replica from revealing what users \
asked and what they were told; with authenticated encryption, a value copied from one row \
to another is detected instead of being served to the wrong person. Key rotation should be \
routine: new entries are written with the newest key while older entries remain readable \
with the keys they were written with until they expire.\n\nFinally, measure. Track the hit \
rate per prompt template, the latency of hits and misses, and the cost saved by every hit. \
A cache that answers a third of the requests of an expensive model pays for itself many \
times over, but a cache with a low hit rate only adds a lookup to every request. Start \
with exact matching and a short lifetime, look at which prompts repeat, and only then \
consider normalisation or semantic matching for the templates where it is safe. Keep the \
most popular answers visible to a human reviewer, since a wrong answer that is cached is \
served to everyone who asks the same question until it expires or is removed by hand.";

/// A JSON document of about `len` bytes: orders with ids, customers, statuses,
/// amounts and notes drawn from a seeded sequence, as an API response would hold.
fn document(len: usize) -> Value {
    let words = [
        "invoice",
        "shipped",
        "pending",
        "customer",
        "warehouse",
        "express",
        "refund",
        "priority",
        "Lisbon",
        "Osaka",
        "Toronto",
        "Nairobi",
        "blue",
        "large",
        "gift",
    ];
    let mut seed = 0x2545_F491_4F6C_DD1D_u64;
    let mut orders = Vec::new();
    let mut text_len = 2;
    while text_len < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let note: Vec<&str> = (0..6)
            .map(|i| words[((seed >> (i * 5)) % 15) as usize])
            .collect();
        let order = json!({
            "id": seed % 1_000_000,
            "customer": format!("customer-{}", seed % 977),
            "status": words[(seed % 7) as usize],
            "amount_cents": seed % 100_000,
            "note": note.join(" "),
        });
        text_len += order.to_string().len() + 1;
        orders.push(order);
    }
    Value::Array(orders)
}

/// Measures the codec rows for each thread count in `passes` on the bench's
/// schema; notes the stored sizes.
pub(super) fn rows(
    url: &str,
    schema: &str,
    passes: &[usize],
    budget: Budget,
    results: &mut Results,
) -> BenchResult<()> {
    let max_threads = passes.iter().copied().max().unwrap_or(1);
    let manager = |tweak: fn(pgcache::CacheConfigBuilder) -> pgcache::CacheConfigBuilder| {
        CacheManager::new(
            tweak(bench_config(url, schema, max_threads, false))
                .application_name("pgcache-bench-codec")
                .build()?,
        )
    };
    let compressed = manager(|b| b)?;
    let plain = manager(|b| b.compression_threshold(None))?;
    // A fixed key: the bench measures the cipher, not the key's secrecy.
    let sealed = manager(|b| b.encryption_key("bench", [0x42; 32]))?;
    results.mark("codec: managers");

    let doc = document(10_000);
    let small = document(1000);
    let response = RESPONSE.to_owned();
    for (cache, side) in [(&compressed, "z"), (&plain, "p"), (&sealed, "s")] {
        for n in 0..KEYS * max_threads as u64 {
            cache
                .kv()
                .set_with_ttl(&format!("codec:{side}:doc:{n}"), &doc, TTL)?;
            cache
                .kv()
                .set_with_ttl(&format!("codec:{side}:1k:{n}"), &small, TTL)?;
            cache
                .llm_response()
                .set_with_ttl(&prompt(side, n), &response, TTL)?;
        }
    }
    results.mark("codec: fill");
    results.note(stored_sizes(&compressed, &doc, &response)?);

    // Which side a context is: its key prefix.
    let side_of = |cache: &CacheManager| -> &'static str {
        if std::ptr::eq(cache, &compressed) {
            "z"
        } else if std::ptr::eq(cache, &sealed) {
            "s"
        } else {
            "p"
        }
    };
    let n_of = |w: &mut Worker| w.random() % (KEYS * max_threads as u64);
    let kv_key = |cache: &CacheManager, w: &mut Worker, what: &str| {
        format!("codec:{}:{what}:{}", side_of(cache), n_of(w))
    };
    type Step<'s> = &'s (dyn Fn(&CacheManager, &mut Worker) -> BenchResult<bool> + Sync);
    let table: [(&str, [&CacheManager; 2], Step<'_>); 6] = [
        (
            "codec get 10KB json zstd/plain",
            [&compressed, &plain],
            &|cache, w| Ok(cache.kv().get(&kv_key(cache, w, "doc"))?.is_some()),
        ),
        (
            "codec set 10KB json zstd/plain",
            [&compressed, &plain],
            &|cache, w| {
                cache
                    .kv()
                    .set_with_ttl(&kv_key(cache, w, "doc"), &doc, TTL)?;
                Ok(true)
            },
        ),
        (
            "codec get 4KB llm zstd/plain",
            [&compressed, &plain],
            &|cache, w| {
                let prompt = prompt(side_of(cache), n_of(w));
                Ok(cache.llm_response().get(&prompt)?.is_some())
            },
        ),
        (
            "codec set 4KB llm zstd/plain",
            [&compressed, &plain],
            &|cache, w| {
                let prompt = prompt(side_of(cache), n_of(w));
                cache.llm_response().set_with_ttl(&prompt, &response, TTL)?;
                Ok(true)
            },
        ),
        (
            "codec get 1KB sealed/plain",
            [&sealed, &plain],
            &|cache, w| Ok(cache.kv().get(&kv_key(cache, w, "1k"))?.is_some()),
        ),
        (
            "codec set 1KB sealed/plain",
            [&sealed, &plain],
            &|cache, w| {
                cache
                    .kv()
                    .set_with_ttl(&kv_key(cache, w, "1k"), &small, TTL)?;
                Ok(true)
            },
        ),
    ];
    for (name, sides, step) in table {
        side_by_side(name, sides, passes, budget, results, step)?;
    }
    Ok(())
}

/// The prompt of a side's `n`th cached response.
fn prompt(side: &str, n: u64) -> LlmPrompt {
    LlmPrompt::new(format!("codec bench question {n} ({side})"), "bench")
}

/// How the compressed side stored the document and the response: bytes written
/// (the envelope) against the text given.
fn stored_sizes(cache: &CacheManager, doc: &Value, response: &str) -> BenchResult<String> {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Size {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = cache.connection()?;
    let mut size = |sql: &str| -> BenchResult<i64> {
        Ok(diesel::sql_query(sql).get_result::<Size>(&mut *conn)?.n)
    };
    let table = |name: &str| format!("\"{}\".{name}", cache.config().schema());
    let doc_stored = size(&format!(
        "SELECT octet_length(packed)::int8 AS n FROM {} WHERE key = 'codec:z:doc:0'",
        table("cache_entries")
    ))?;
    let response_stored = size(&format!(
        "SELECT max(octet_length(packed))::int8 AS n FROM {}",
        table("llm_response_cache")
    ))?;
    let (doc_len, response_len) = (doc.to_string().len(), response.len());
    Ok(format!(
        "codec: 10KB JSON {doc_len} B stored as {doc_stored} B (ratio {:.2}); \
         4KB LLM response {response_len} B stored as {response_stored} B (ratio {:.2})",
        doc_len as f64 / doc_stored as f64,
        response_len as f64 / response_stored as f64
    ))
}

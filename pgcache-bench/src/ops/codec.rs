//! The codec rows of `pgcache-bench ops`: what compression and encryption at rest
//! cost. Each row sets or gets through two managers on the bench's schema, side by
//! side in alternating slices: the codec's side in the "pgcache" columns, the same
//! cache without it in the "raw" ones. Compression: a 10 KB JSON document and a
//! 4 KB LLM response, compressed (the default threshold, 1 KiB) against
//! compression off, with the size each is stored in. Encryption: a 1 KB value
//! sealed with a key against the default configuration (not compressed on either
//! side: it is under the threshold).

use pgcache::{Cache, CacheConfigBuilder, CacheManager, LlmPrompt};
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
served to everyone who asks the same question until it expires or is removed by hand.\n\n\
A few practical notes from teams that run such caches in production. Put the cache in \
the same database as the documents it depends on, so that invalidation can be part of the \
same transaction and never lags behind. Give every template a version and include it in the \
key, so that editing a prompt retires its old answers without a manual purge. Log the key \
digest rather than the prompt when a lookup fails, since prompts may contain personal data. \
Cap the size of a cached answer, because a model that loops can produce megabytes of text \
that nobody will ever read again. And load-test the cold start: after a deploy that changes \
the model, every request misses at once, and the expensive backend sees the full traffic \
until the cache is warm again, so a gradual rollout is kinder to both the budget and the \
rate limits.";

/// A JSON document of about `len` bytes, as a product search API returns it: a
/// page of products with names, prices, stock per warehouse and attributes, their
/// values spread by a multiplicative hash of the product's number.
fn document(len: usize) -> Value {
    const COLOURS: [&str; 5] = ["red", "blue", "black", "white", "green"];
    const CITIES: [&str; 4] = ["Lisbon", "Osaka", "Toronto", "Nairobi"];
    const KINDS: [&str; 6] = ["kettle", "lamp", "chair", "backpack", "jacket", "monitor"];
    let mut page = json!({"page": 1, "per_page": 0, "products": []});
    for n in 0u64.. {
        if page.to_string().len() >= len {
            break;
        }
        let h = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
        let kind = KINDS[(h % 6) as usize];
        let colour = COLOURS[(h / 7 % 5) as usize];
        page["products"].as_array_mut().expect("an array").push(json!({
            "sku": format!("{}-{:06}", &kind[..3].to_uppercase(), h % 1_000_000),
            "name": format!("{colour} {kind}, model {}", h % 97),
            "price": {"amount": (h % 50_000) as f64 / 100.0, "currency": "EUR"},
            "stock": CITIES.iter().map(|c| json!({"warehouse": c, "units": h / 11 % 40})).collect::<Vec<_>>(),
            "attributes": {"colour": colour, "weight_g": h % 5000, "in_sale": h % 3 == 0},
        }));
        page["per_page"] = json!(n + 1);
    }
    page
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
    let tweaks: [fn(CacheConfigBuilder) -> CacheConfigBuilder; 3] = [
        |b| b.compression_threshold(Some(pgcache::DEFAULT_COMPRESSION_THRESHOLD)),
        |b| b.compression_threshold(None),
        // A fixed key: the bench measures the cipher, not the key's secrecy.
        |b| {
            b.compression_threshold(Some(pgcache::DEFAULT_COMPRESSION_THRESHOLD))
                .encryption_key("bench", [0x42; 32])
        },
    ];
    let mut managers = tweaks
        .into_iter()
        .map(|tweak| -> BenchResult<CacheManager> {
            let config = bench_config(url, schema, max_threads, false);
            Ok(CacheManager::new(
                tweak(config.application_name("pgcache-bench-codec")).build()?,
            )?)
        });
    let mut next = || managers.next().expect("three managers");
    let (compressed, plain, sealed) = (next()?, next()?, next()?);
    results.mark("codec: managers");

    let doc = document(10_000);
    // About 1 KB, under the compression threshold: each side stores it as given,
    // sealed or not.
    let small = json!({"id": 42, "bio": &RESPONSE[..960]});
    let response = RESPONSE.to_owned();
    // One batch per side and kind: what each row reads, and overwrites.
    let keys = KEYS * max_threads as u64;
    for (cache, side) in [(&compressed, "z"), (&plain, "p"), (&sealed, "s")] {
        for (what, value) in [("doc", &doc), ("1k", &small)] {
            let names: Vec<String> = (0..keys)
                .map(|n| format!("codec:{side}:{what}:{n}"))
                .collect();
            let entries: Vec<(&str, &Value)> = names.iter().map(|k| (k.as_str(), value)).collect();
            cache.kv().set_many(&entries, TTL)?;
        }
        let prompts: Vec<LlmPrompt> = (0..keys).map(|n| prompt(side, n)).collect();
        let entries: Vec<(&LlmPrompt, &String)> = prompts.iter().map(|p| (p, &response)).collect();
        cache.llm_response().set_many(&entries, TTL)?;
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

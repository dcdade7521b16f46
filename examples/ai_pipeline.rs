//! A RAG, LLM and TTS pipeline in Rust: embed a question, search, answer
//! and speak it, with fake but deterministic providers that take a little time, as
//! real ones do. The first pass misses and computes; the second is served from the
//! cache.
//!
//! ```text
//! cargo run --example ai_pipeline
//! ```
//!
//! Reads `DATABASE_URL` (default `postgres://postgres@localhost:5432/postgres`) and
//! keeps its tables in the schema `pgcache_ai_pipeline` unless `PGCACHE_SCHEMA` says
//! otherwise.

use std::process::ExitCode;
use std::thread::sleep;
use std::time::{Duration, Instant};

use pgcache::{
    AudioChunk, AudioChunkKey, Cache, CacheConfig, CacheManager, Error, LlmPrompt,
    VectorSearchQuery,
};
use serde_json::{json, Value};
use uuid::Uuid;

const EMBEDDING_MODEL: &str = "fake-embed-8";

/// Fake embedding API: a deterministic 8-dimension vector from the text's bytes.
fn embed(texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
    sleep(Duration::from_millis(40));
    Ok(texts
        .iter()
        .map(|t| {
            (0..8)
                .map(|i| t.bytes().skip(i).step_by(8).map(f32::from).sum::<f32>() / 255.0)
                .collect()
        })
        .collect())
}

/// Fake vector database: the nearest documents by a made-up score.
fn search(query: &VectorSearchQuery) -> Result<Value, Error> {
    sleep(Duration::from_millis(30));
    let score: f32 = query.embedding.iter().sum();
    Ok((0..query.top_k)
        .map(|i| json!({"doc": format!("doc-{i}"), "score": score / (i + 1) as f32}))
        .collect())
}

/// Fake LLM.
fn answer(prompt: &LlmPrompt) -> Result<String, Error> {
    sleep(Duration::from_millis(80));
    Ok(format!(
        "An answer to {:?} using {}",
        prompt.prompt,
        prompt.context.as_deref().unwrap_or("no context")
    ))
}

/// Fake TTS: one byte per character.
fn speak(key: &AudioChunkKey) -> Result<AudioChunk, Error> {
    sleep(Duration::from_millis(60));
    Ok(AudioChunk::inline(key.text.bytes().collect(), "opus")
        .duration_ms(key.text.len() as u32 * 60)
        .sample_rate(16_000)
        .channels(1)
        .compression("opus"))
}

/// One request through the pipeline: the RAG, LLM and TTS services, cache first.
fn handle(cache: &CacheManager, user: Uuid, question: &str) -> Result<(String, usize), Error> {
    // RAG service: embedQuery
    let embedding = cache
        .embedding()
        .get_or_compute_many(&[question], EMBEDDING_MODEL, embed)?
        .remove(0);
    // RAG service: searchVectors (per user)
    let query = VectorSearchQuery::new(user, embedding, 3).with_filters(json!({"lang": "en"}));
    let docs = cache
        .vector_search()
        .get_or_compute(&query, || search(&query))?;
    // LLM service: generateResponse
    // The answer draws on the user's documents, so it belongs to the user.
    let prompt = LlmPrompt::new(question, "fake-llm")
        .with_context(docs.to_string())
        .owned_by(user);
    let text = cache
        .llm_response()
        .get_or_compute(&prompt, || answer(&prompt))?;
    // TTS service: synthesize
    let key = AudioChunkKey::new(&text, "voice-123", "fake-tts").owned_by(user);
    let audio = cache
        .audio_chunk()
        .with_max_text_chars(None)
        .get_or_compute(&key, || speak(&key))?;
    Ok((text, audio.byte_size() as usize))
}

fn run() -> Result<(), Error> {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    if !vars.iter().any(|(k, _)| k == "PGCACHE_SCHEMA") {
        vars.push(("PGCACHE_SCHEMA".into(), "pgcache_ai_pipeline".into()));
    }
    let config = CacheConfig::from_vars(vars)?;
    println!(
        "connecting to {} (schema {})",
        config.database_url(),
        config.schema()
    );
    let cache = CacheManager::new(config)?;
    // Start from a cold cache so the first pass really misses: the user's entries
    // and the fake model's embeddings from an earlier run go.
    let user = Uuid::from_u128(42);
    cache.invalidate_user(user)?;
    cache.invalidate_model(EMBEDDING_MODEL)?;

    let questions = ["What is AI?", "How does ML work?", "What is AI?"];
    let mut timings = Vec::new();
    for pass in ["cold", "warm"] {
        let started = Instant::now();
        for q in questions {
            let (text, bytes) = handle(&cache, user, q)?;
            println!(
                "[{pass}] {q:<18} -> {} chars of answer, {bytes} bytes of audio",
                text.len()
            );
        }
        let took = started.elapsed();
        println!("[{pass}] {} requests in {took:.2?}", questions.len());
        timings.push(took);
    }
    println!(
        "time saved by the cache on the warm pass: {:.2?}",
        timings[0].saturating_sub(timings[1])
    );
    for top in cache.llm_response().top(3)? {
        println!(
            "top LLM response {}... {} hits ({})",
            top.hash_prefix(),
            top.hits,
            top.provider
        );
    }
    let stats = cache.audio_chunk().stats(3)?;
    println!(
        "audio cache: {} entries, {} bytes, {:.2} hits on average",
        stats.entries, stats.total_bytes, stats.average_hit_count
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ai_pipeline: {error}");
            ExitCode::FAILURE
        }
    }
}

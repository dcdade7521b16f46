//! The caches from async code (feature `tokio`): a tokio runtime serving concurrent
//! requests through the async face, `AsyncCacheManager`. A near-cache hit is
//! answered on the task; misses and writes run on a bounded number of blocking
//! threads; identical concurrent questions call the model once (async single
//! flight).
//!
//! ```text
//! cargo run --example async_service --features tokio
//! ```
//!
//! Reads `DATABASE_URL` (default `postgres://postgres@localhost:5432/postgres`) and
//! keeps its tables in the schema `pgcache_async_service` unless `PGCACHE_SCHEMA`
//! says otherwise.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pgcache::{AsyncCacheManager, CacheConfig, CacheManager, EmbeddingKey, Error, LlmPrompt};

/// How often the fake model was called.
static LLM_CALLS: AtomicUsize = AtomicUsize::new(0);

/// A fake LLM call: async, slow.
async fn call_llm(prompt: &str) -> Result<String, Error> {
    LLM_CALLS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(format!("answer to {prompt:?}"))
}

/// One request: the cached answer, or the model's (once for concurrent identical
/// questions), cached.
async fn answer(cache: AsyncCacheManager, question: String) -> Result<String, Error> {
    let prompt = LlmPrompt::new(question.as_str(), "fake-llm");
    cache
        .llm_response()
        .get_or_compute(&prompt, || call_llm(&question))
        .await
}

async fn run() -> Result<(), Error> {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    if !vars.iter().any(|(k, _)| k == "PGCACHE_SCHEMA") {
        vars.push(("PGCACHE_SCHEMA".into(), "pgcache_async_service".into()));
    }
    let config = CacheConfig::from_vars(vars)?;
    // Opening the pool and migrating block: once, at start-up.
    let cache = tokio::task::spawn_blocking(move || CacheManager::new(config))
        .await
        .expect("start-up task panicked")?
        .to_async();

    let questions = ["What is AI?", "What is ML?", "What is AI?", "What is RAG?"];
    // Start cold, so the first round misses even when the example ran before.
    let prompts: Vec<LlmPrompt> = questions
        .iter()
        .map(|q| LlmPrompt::new(*q, "fake-llm"))
        .collect();
    cache
        .llm_response()
        .delete_many(&prompts.iter().collect::<Vec<_>>())
        .await?;
    for round in 1..=2 {
        let before = LLM_CALLS.load(Ordering::SeqCst);
        let tasks: Vec<_> = questions
            .iter()
            .map(|q| tokio::spawn(answer(cache.clone(), q.to_string())))
            .collect();
        for task in tasks {
            task.await.expect("request task panicked")?;
        }
        println!(
            "round {round}: {} requests, {} model calls",
            questions.len(),
            LLM_CALLS.load(Ordering::SeqCst) - before
        );
    }

    // Any cache works the same way, e.g. embeddings.
    let vector = cache
        .embedding()
        .get_or_compute(&EmbeddingKey::new("What is AI?", "fake-embed"), || async {
            Ok::<_, Error>(vec![0.1, 0.2, 0.3])
        })
        .await?;
    println!("embedding of \"What is AI?\": {vector:?}");

    // Calls with no async form run on a blocking thread through `run`; here,
    // flushing hit counters before the runtime shuts down (dropping does it too).
    cache.run(|cache| cache.flush_stats()).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("async_service: {error}");
            ExitCode::FAILURE
        }
    }
}

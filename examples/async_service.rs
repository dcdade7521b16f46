//! The caches from async code: a tokio runtime serving concurrent requests, each
//! calling the blocking cache API through `tokio::task::spawn_blocking`.
//!
//! ```text
//! cargo run --example async_service
//! ```
//!
//! Reads `DATABASE_URL` (default `postgres://postgres@localhost:5432/postgres`) and
//! keeps its tables in the schema `pgcache_async_service` unless `PGCACHE_SCHEMA`
//! says otherwise.

use std::process::ExitCode;
use std::time::Duration;

use pgcache::{Cache, CacheConfig, CacheManager, EmbeddingKey, Error, LlmPrompt};

/// A fake LLM call: async, slow.
async fn call_llm(prompt: &str) -> String {
    tokio::time::sleep(Duration::from_millis(50)).await;
    format!("answer to {prompt:?}")
}

/// One request: look in the cache off the async threads, call the model on a miss,
/// store the answer off the async threads again.
async fn answer(cache: CacheManager, question: String) -> Result<(String, bool), Error> {
    let prompt = LlmPrompt::new(question.clone(), "fake-llm");
    let (c, p) = (cache.clone(), prompt.clone());
    let cached = tokio::task::spawn_blocking(move || c.llm_response().get(&p))
        .await
        .expect("cache task panicked")?;
    if let Some(hit) = cached {
        return Ok((hit.response, true));
    }
    let response = call_llm(&question).await;
    let stored = response.clone();
    tokio::task::spawn_blocking(move || cache.llm_response().set(&prompt, &stored))
        .await
        .expect("cache task panicked")?;
    Ok((response, false))
}

async fn run() -> Result<(), Error> {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    if !vars.iter().any(|(k, _)| k == "PGCACHE_SCHEMA") {
        vars.push(("PGCACHE_SCHEMA".into(), "pgcache_async_service".into()));
    }
    let config = CacheConfig::from_vars(vars)?;
    // Opening the pool and migrating block too.
    let cache = tokio::task::spawn_blocking(move || CacheManager::new(config))
        .await
        .expect("start-up task panicked")?;

    let questions = ["What is AI?", "What is ML?", "What is AI?", "What is RAG?"];
    // Start cold, so the first round misses even when the example ran before.
    let c = cache.clone();
    tokio::task::spawn_blocking(move || {
        let prompts: Vec<LlmPrompt> = questions
            .iter()
            .map(|q| LlmPrompt::new(*q, "fake-llm"))
            .collect();
        c.llm_response()
            .delete_many(&prompts.iter().collect::<Vec<_>>())
    })
    .await
    .expect("cache task panicked")?;
    for round in 1..=2 {
        let tasks: Vec<_> = questions
            .iter()
            .map(|q| tokio::spawn(answer(cache.clone(), q.to_string())))
            .collect();
        let mut hits = 0;
        for task in tasks {
            let (_, hit) = task.await.expect("request task panicked")?;
            hits += usize::from(hit);
        }
        println!(
            "round {round}: {} requests, {hits} served from the cache",
            questions.len()
        );
    }

    // Any cache works the same way, e.g. embeddings.
    let c = cache.clone();
    let vector = tokio::task::spawn_blocking(move || {
        c.embedding()
            .get_or_compute(&EmbeddingKey::new("What is AI?", "fake-embed"), || {
                Ok::<_, Error>(vec![0.1, 0.2, 0.3])
            })
    })
    .await
    .expect("cache task panicked")?;
    println!("embedding of \"What is AI?\": {vector:?}");

    // Flush hit counters before the runtime shuts down (dropping does it too).
    tokio::task::spawn_blocking(move || cache.flush_stats())
        .await
        .expect("flush task panicked")?;
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

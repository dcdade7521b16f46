//! Every integration test of the library, one module per subject, in one binary:
//! one link instead of one per file. Each test gets its own schema (see `common`),
//! so they run in parallel. One test has a binary of its own, `tests/axum_service.rs`:
//! the example service it drives installs the process-wide metrics recorder, which
//! `metrics.rs` installs here.

mod common;
mod near_support;
mod ops_support;
mod pgbouncer;
mod proxy;
mod scratch;

mod app_connections;
#[cfg(feature = "tokio")]
mod async_cache;
#[cfg(feature = "tokio")]
mod async_single_flight;
mod audio_chunk;
mod bad_input;
mod bounds;
mod caching_disabled;
mod cleanup;
mod compression;
mod concurrent_start;
mod config;
mod connection_budget;
mod connection_strings;
mod counting_off_the_request_path;
mod early_refresh;
mod embedding;
mod encryption;
mod error_messages;
mod faults;
mod frozen_server;
mod health;
mod host_app;
mod invalidation;
mod keys;
mod kv;
mod kv_bytes;
mod kv_query;
mod kv_redis_ops;
mod llm_response;
mod lock_order;
#[cfg(feature = "cached")]
mod memoize;
mod metrics;
mod near_cache;
mod near_cache_faults;
mod near_cache_processes;
mod near_logging_invariant;
mod outage;
mod partitions;
mod pooler;
mod readme_app;
mod recovery;
mod relaxed_app_pool;
mod security;
mod shards;
mod single_flight;
mod standard_traits;
mod statement_cache;
mod stats;
mod stress;
mod tags;
mod transactions;
mod vector_search;
mod warmup;

//! Connection strings in both forms libpq accepts, and their passwords: never in an
//! error, `Debug`, `Display` or the command's output.

use std::time::Duration;

use pgcache::{CacheConfig, CacheManager};

/// A configuration that fails fast when it connects.
fn quick(url: &str) -> pgcache::CacheConfigBuilder {
    CacheConfig::builder()
        .database_url(url)
        .pool_connection_timeout(Duration::from_millis(300))
        .run_migrations(false)
}

#[test]
fn an_invalid_sslmode_is_a_configuration_failure_not_a_transient_one() {
    let config = quick("postgres://postgres@127.0.0.1:5432/postgres?sslmode=bogus")
        .build()
        .unwrap();
    let err = CacheManager::new(config).unwrap_err();
    assert!(err.to_string().contains("invalid sslmode value"), "{err}");
    assert!(!err.is_transient(), "{err}");
}

//! Configuration from code and from the environment.

use crate::common;

use std::time::Duration;

use pgcache::{CacheConfig, CacheManager, Durability, Error};

fn from(vars: &[(&str, &str)]) -> Result<CacheConfig, Error> {
    CacheConfig::from_vars(vars.iter().copied())
}

#[test]
fn defaults_follow_the_spec() {
    let c = from(&[]).unwrap();
    assert_eq!(c.database_url().expose(), pgcache::DEFAULT_DATABASE_URL);
    assert!(c.enabled());
    assert_eq!(c.ttl().short, Duration::from_secs(300));
    assert_eq!(c.ttl().medium, Duration::from_secs(3600));
    assert_eq!(c.ttl().long, Duration::from_secs(86_400));
    assert_eq!(c.ttl().week, Duration::from_secs(604_800));
    assert_eq!(c.pool().max_size, 20);
    assert_eq!(
        c.pool().min_idle,
        0,
        "no background refills unless asked for"
    );
    assert_eq!(c.pool().idle_timeout, Duration::from_secs(30));
    assert_eq!(c.pool().connection_timeout, Duration::from_secs(2));
    assert!(c.run_migrations());
    assert_eq!(c.durability(), Durability::Full);
}

#[test]
fn environment_variables_are_read() {
    let c = from(&[
        ("DATABASE_URL", "postgres://app@db:5432/app"),
        ("ENABLE_CACHING", "false"),
        ("CACHE_TTL_SHORT", "10"),
        ("CACHE_TTL_MEDIUM", "20"),
        ("CACHE_TTL_LONG", "30"),
        ("CACHE_TTL_WEEK", "40"),
        ("PGCACHE_POOL_MAX_SIZE", "7"),
        ("PGCACHE_POOL_CONNECTION_TIMEOUT_MS", "250"),
        ("PGCACHE_SCHEMA", "cache"),
        ("PGCACHE_RUN_MIGRATIONS", "no"),
        ("PGCACHE_DURABILITY", "relaxed"),
        ("UNRELATED", "ignored"),
    ])
    .unwrap();
    assert!(!c.enabled());
    assert_eq!(c.ttl().short, Duration::from_secs(10));
    assert_eq!(c.ttl().week, Duration::from_secs(40));
    assert_eq!(c.pool().max_size, 7);
    assert_eq!(c.pool().connection_timeout, Duration::from_millis(250));
    assert_eq!(c.schema(), "cache");
    assert!(!c.run_migrations());
    assert_eq!(c.durability(), Durability::Relaxed);
}

#[test]
fn malformed_values_name_the_variable_and_the_value() {
    for (name, value) in [
        ("CACHE_TTL_SHORT", "five"),
        ("CACHE_TTL_MEDIUM", "-1"),
        ("CACHE_TTL_LONG", "0"),
        ("ENABLE_CACHING", "maybe"),
        ("PGCACHE_POOL_MAX_SIZE", "0"),
        ("PGCACHE_POOL_MAX_SIZE", "lots"),
        ("PGCACHE_DURABILITY", "eventual"),
        ("PGCACHE_STATEMENT_TIMEOUT_MS", "0"),
        ("DATABASE_URL", "mysql://root@localhost/db"),
    ] {
        let err = from(&[(name, value)]).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, Error::Config { .. }), "{message}");
        assert!(message.contains(name), "{message} should name {name}");
        assert!(message.contains(value), "{message} should show {value}");
    }
}

#[test]
fn ttl_so_large_it_would_overflow_is_a_config_error() {
    let err = from(&[("CACHE_TTL_WEEK", "18446744073709551615")]).unwrap_err();
    assert!(err.to_string().contains("CACHE_TTL_WEEK"), "{err}");
}

#[test]
fn passwords_never_appear_in_debug_display_or_errors() {
    let c = from(&[("DATABASE_URL", "postgres://app:s3cr3t@db:5432/app")]).unwrap();
    assert!(!format!("{c:?}").contains("s3cr3t"));
    assert!(!c.database_url().to_string().contains("s3cr3t"));
    assert!(c.database_url().to_string().contains("app:***@db"));
    let err = from(&[("DATABASE_URL", "postgres://app:s3cr3t@db:notaport/app")]).unwrap_err();
    assert!(!err.to_string().contains("s3cr3t"), "{err}");
    assert!(err.to_string().contains("DATABASE_URL"), "{err}");
}

#[test]
fn failed_connection_with_credentials_never_echoes_the_password() {
    let config = CacheConfig::builder()
        .database_url("postgres://app:WrongHorse99@127.0.0.1:1/app")
        .pool_connection_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    assert!(!format!("{config:?}").contains("WrongHorse99"));
    let err = CacheManager::new(config).unwrap_err();
    assert!(matches!(err, Error::Connection(_)), "{err}");
    assert!(!err.to_string().contains("WrongHorse99"), "{err}");
    assert!(!format!("{err:?}").contains("WrongHorse99"), "{err:?}");
}

#[test]
fn unreachable_database_is_a_connection_error_after_the_timeout() {
    let config = CacheConfig::builder()
        .database_url("postgres://postgres@127.0.0.1:1/postgres")
        .pool_connection_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let err = CacheManager::new(config).unwrap_err();
    assert!(matches!(err, Error::Connection(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn an_unknown_database_is_named_and_not_transient_even_under_a_short_timeout() {
    let config = || {
        CacheConfig::builder()
            .database_url("postgres://postgres@127.0.0.1:5432/no_such_db_xyz")
            .pool_connection_timeout(Duration::from_millis(300))
            .run_migrations(false)
    };
    let err = CacheManager::new(config().build().unwrap()).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(!err.is_transient(), "{err}");
    // Nor does fail-open mode pass it for an outage: it does not start on it.
    let err = CacheManager::new(config().fail_open(true).build().unwrap()).unwrap_err();
    assert!(err.to_string().contains("no_such_db_xyz"), "{err}");
    assert!(!err.is_transient(), "{err}");
}

#[test]
fn missing_tables_say_to_run_migrate() {
    let db = common::TestDb::new();
    let config = db
        .config()
        .schema(format!("{}_empty", db.schema))
        .run_migrations(false)
        .build()
        .unwrap();
    let cache = CacheManager::new(config).unwrap();
    let err = pgcache::Cache::get(&cache.kv(), "k").unwrap_err();
    assert!(matches!(err, Error::MissingTable { .. }), "{err}");
    assert!(err.to_string().contains("pgcache migrate"), "{err}");
}

#[test]
fn builder_errors_name_the_setter_not_a_variable() {
    for (builder, setting) in [
        (CacheConfig::builder().pool_max_size(0), "pool_max_size"),
        (
            CacheConfig::builder().statement_timeout(Duration::ZERO),
            "statement_timeout",
        ),
        (
            CacheConfig::builder().ttl_short(Duration::ZERO),
            "ttl_short",
        ),
        (CacheConfig::builder().schema(""), "schema"),
        (
            CacheConfig::builder().max_entries(pgcache::CacheKind::Kv, Some(0)),
            "max_entries(kv)",
        ),
        (
            CacheConfig::builder().database_url("mysql://root@localhost/db"),
            "database_url",
        ),
    ] {
        let err = builder.build().unwrap_err();
        let Error::Config { setting: named, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(named, setting, "{err}");
        assert!(!err.to_string().contains("PGCACHE_"), "{err}");
    }
}

#[test]
fn environment_errors_name_the_variable_and_its_text() {
    for (name, value) in [
        ("PGCACHE_POOL_MAX_SIZE", "0"),
        ("PGCACHE_POOL_MIN_IDLE", "30"),
        ("PGCACHE_KV_MAX_BYTES", "18446744073709551615"),
        ("PGCACHE_EVICTION_LOW_WATERMARK", "1.5"),
    ] {
        let err = from(&[(name, value)]).unwrap_err();
        let Error::Config {
            setting,
            value: shown,
            ..
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!((setting.as_str(), shown.as_str()), (name, value), "{err}");
    }
}

#[test]
fn a_setter_overriding_the_environment_owns_the_error() {
    let builder = pgcache::CacheConfigBuilder::from_vars([("PGCACHE_SCHEMA", "cache")]).unwrap();
    let err = builder.schema("").build().unwrap_err();
    assert!(
        matches!(&err, Error::Config { setting, .. } if setting == "schema"),
        "{err}"
    );
    let config = pgcache::CacheConfigBuilder::from_vars([("PGCACHE_POOL_MAX_SIZE", "0")])
        .unwrap()
        .pool_max_size(2)
        .build()
        .unwrap();
    assert_eq!(config.pool().max_size, 2);
}

#[test]
fn a_builder_read_from_the_environment_never_shows_a_password_in_debug() {
    let b = pgcache::CacheConfigBuilder::from_vars([
        ("DATABASE_URL", "postgres://app:s3cr3t@db:5432/app"),
        ("PGCACHE_SHARDS", "a=postgres://app:sh4rd@db1/app"),
    ])
    .unwrap();
    let debug = format!("{b:?}");
    assert!(
        !debug.contains("s3cr3t") && !debug.contains("sh4rd"),
        "{debug}"
    );
}

#[test]
fn shards_are_read_in_order_with_names_and_hidden_passwords() {
    let c = from(&[(
        "PGCACHE_SHARDS",
        "a=postgres://app:s3cr3t@db1/app, b=host=db2 port=5433 password=s3cr3t",
    )])
    .unwrap();
    let names: Vec<&str> = c.shards().iter().map(|s| s.name()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(c.shards()[1].database_url().expose().contains("port=5433"));
    assert!(!format!("{c:?}").contains("s3cr3t"));
}

#[test]
fn a_bad_shard_list_names_the_variable_and_the_shard_but_no_password() {
    for (text, expected) in [
        ("postgres://app:s3cr3t@db1/app", "name=url"),
        ("a=postgres://app:s3cr3t@db1:notaport/app", "shard `a`"),
        (
            "a=postgres://db1/app,a=postgres://app:s3cr3t@db2/app",
            "once",
        ),
        ("bad name=postgres://app:s3cr3t@db1/app", "bad name"),
        (" , ", "at least one"),
    ] {
        let err = from(&[("PGCACHE_SHARDS", text)]).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("PGCACHE_SHARDS"), "{message}");
        assert!(message.contains(expected), "{text}: {message}");
        assert!(!message.contains("s3cr3t"), "{message}");
    }
}

#[test]
fn shards_from_the_builder_are_checked_under_the_setters_name() {
    let err = CacheConfig::builder()
        .shard("a", "postgres://db1/app")
        .shard("a", "postgres://db2/app")
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("shards"), "{err}");
}

#[test]
fn the_watchdog_is_on_by_default_and_turned_off_by_variable_or_builder() {
    assert!(from(&[]).unwrap().watchdog());
    assert!(!from(&[("PGCACHE_WATCHDOG", "false")]).unwrap().watchdog());
    assert!(!CacheConfig::builder()
        .watchdog(false)
        .build()
        .unwrap()
        .watchdog());
    assert!(matches!(
        from(&[("PGCACHE_WATCHDOG", "sometimes")]),
        Err(Error::Config { .. })
    ));
}

//! Connection strings in both forms libpq accepts, and their passwords: never in an
//! error, `Debug`, `Display` or the command's output.

use crate::common;
use crate::scratch;

use std::process::Command as Process;
use std::time::Duration;

use common::TestDb;
use pgcache::{Cache, CacheConfig, CacheManager, DatabaseUrl, Error};
use scratch::ScratchCluster;
use serde_json::json;

/// Asserts that no rendering of `config` or its connection string shows `secret`.
fn assert_hidden(config: &CacheConfig, secret: &str) {
    for shown in [
        format!("{config:?}"),
        format!("{:?}", config.database_url()),
        config.database_url().to_string(),
        config.database_url().redacted(),
    ] {
        assert!(!shown.contains(secret), "{shown}");
    }
}

/// A configuration that fails fast when it connects.
fn quick(url: &str) -> pgcache::CacheConfigBuilder {
    CacheConfig::builder()
        .database_url(url)
        .pool_connection_timeout(Duration::from_millis(300))
        .run_migrations(false)
}

#[test]
fn key_value_pairs_connect_like_a_url() {
    let db =
        TestDb::with(|b| b.database_url("host=127.0.0.1 port=5432 user=postgres dbname=postgres"));
    db.cache.kv().set("k", &json!("v")).unwrap();
    assert_eq!(db.cache.kv().get("k").unwrap(), Some(json!("v")));
    assert_eq!(
        db.cache.config().database_url().to_string(),
        "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    );
}

#[test]
fn a_password_in_a_query_parameter_is_masked_everywhere() {
    let url = "postgres://app@127.0.0.1:1/app?sslmode=disable&password=Qu3ry5ecret";
    assert_eq!(
        DatabaseUrl::parse(url).unwrap().to_string(),
        "postgres://app@127.0.0.1:1/app?sslmode=disable&password=***"
    );
    let builder = quick(url);
    assert!(!format!("{builder:?}").contains("Qu3ry5ecret"));
    let config = builder.build().unwrap();
    assert_hidden(&config, "Qu3ry5ecret");
    // A disabled manager opens nothing, so its `Debug` can be had without a server.
    let disabled = CacheManager::new(quick(url).enabled(false).build().unwrap()).unwrap();
    let debug = format!("{disabled:?}");
    assert!(
        debug.contains("password=***") && !debug.contains("Qu3ry5ecret"),
        "{debug}"
    );
    let err = CacheManager::new(config).unwrap_err();
    assert!(matches!(err, Error::Connection(_)), "{err}");
    assert!(!format!("{err} {err:?}").contains("Qu3ry5ecret"), "{err:?}");
}

#[test]
fn a_quoted_key_value_password_is_masked_everywhere() {
    let url = r"host=127.0.0.1 port=1 user=app password='Kv 5ecret\'s' dbname=app";
    let config = quick(url).build().unwrap();
    assert_eq!(
        config.database_url().to_string(),
        "host=127.0.0.1 port=1 user=app password=*** dbname=app"
    );
    assert_hidden(&config, "5ecret");
    let err = CacheManager::new(config).unwrap_err();
    assert!(!format!("{err} {err:?}").contains("5ecret"), "{err:?}");
}

#[test]
fn an_unencoded_at_in_the_password_is_rejected_without_showing_any_of_it() {
    for url in [
        "postgres://app:p@ss#SECRET@127.0.0.1/db",
        "postgres://app:p@ssSECRET@127.0.0.1/db",
        "postgres://app:a/bSECRET@127.0.0.1/db",
    ] {
        let err = quick(url).build().unwrap_err();
        let message = format!("{err} {err:?}");
        assert!(matches!(err, Error::Config { .. }), "{message}");
        assert!(message.contains("percent-encode"), "{message}");
        assert!(
            !message.contains("SECRET") && !message.contains("@ss"),
            "{message}"
        );
    }
    // Encoded, the same password is accepted and masked.
    let config = quick("postgres://app:p%40ss%23SECRET@127.0.0.1:1/db")
        .build()
        .unwrap();
    assert_eq!(
        config.database_url().to_string(),
        "postgres://app:***@127.0.0.1:1/db"
    );
    let err = CacheManager::new(config).unwrap_err();
    assert!(!format!("{err:?}").contains("SECRET"), "{err:?}");
}

#[test]
fn libpq_errors_echoing_the_connection_string_are_scrubbed() {
    // libpq prints the host it cannot resolve; here that is the password too.
    let err = CacheManager::new(
        quick("host=Scrub5ecret.invalid user=app password=Scrub5ecret.invalid")
            .build()
            .unwrap(),
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("\"***\""), "{message}");
    assert!(
        !format!("{message} {err:?}").contains("Scrub5ecret"),
        "{err:?}"
    );
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

/// Runs SQL as `postgres` over the scratch cluster's local socket (trust).
fn psql(cluster: &ScratchCluster, sql: &str) {
    let status = Process::new("psql")
        .args(["-h", "/var/run/postgresql", "-p", &cluster.port.to_string()])
        .args([
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-qc",
            sql,
        ])
        .status()
        .expect("psql runs");
    assert!(status.success(), "psql -c {sql}");
}

#[test]
fn a_password_protected_role_connects_with_either_form_and_a_wrong_password_is_hidden() {
    let cluster = ScratchCluster::start_with(&["--auth-host=scram-sha-256", "--auth-local=trust"]);
    // Every character a connection string treats specially.
    let password = r"p@ss w#rd/'\%=&?";
    psql(
        &cluster,
        &format!(
            "CREATE ROLE app LOGIN PASSWORD '{}'",
            password.replace('\'', "''")
        ),
    );
    let port = cluster.port;
    let encoded: String = password
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let quoted = password.replace('\\', r"\\").replace('\'', r"\'");
    for url in [
        format!("postgres://app:{encoded}@127.0.0.1:{port}/postgres"),
        format!("host=127.0.0.1 port={port} user=app dbname=postgres password='{quoted}'"),
    ] {
        // SCRAM handshakes on a loaded machine can outlast `quick`'s timeout.
        let config = quick(&url)
            .pool_connection_timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        assert_hidden(&config, password);
        let cache = CacheManager::new(config).unwrap();
        let mut conn = cache.connection().unwrap();
        diesel::connection::SimpleConnection::batch_execute(&mut *conn, "SELECT 1").unwrap();
    }
    let wrong = "Wr0ngHorse";
    // A refused password is final: reported at once with the server's reason, not
    // retried for the whole connection timeout.
    let timeout = Duration::from_secs(30);
    let started = std::time::Instant::now();
    let err = CacheManager::new(
        quick(&format!("postgres://app:{wrong}@127.0.0.1:{port}/postgres"))
            .pool_connection_timeout(timeout)
            .build()
            .unwrap(),
    )
    .unwrap_err();
    assert!(started.elapsed() < timeout / 2, "{:?}", started.elapsed());
    let message = format!("{err} {err:?}");
    assert!(
        message.contains("password authentication failed"),
        "{message}"
    );
    assert!(!message.contains(wrong), "{message}");
    assert!(!err.is_transient(), "{message}");
}

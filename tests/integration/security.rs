//! Hostile keys and prefixes touch exactly the intended rows, and the library works
//! with a role that may only read and write the cache tables.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::TestDb;
use diesel::connection::SimpleConnection;
use diesel::RunQueryDsl;
use pgcache::{Cache, CacheManager, Error};
use serde_json::json;

/// Keys an attacker (or an unlucky user id) might produce.
const HOSTILE: &[&str] = &[
    "'; DROP TABLE cache_entries; --",
    "' OR '1'='1",
    "\" OR \"\"=\"",
    "\\",
    "\\\\",
    "\\'",
    "%",
    "_",
    "%_%",
    "a%",
    "a_",
    "a",
    "ab",
    "a;b",
    "; DELETE FROM cache_entries",
    "$1",
    "E'\\x00'",
    "user:1%",
    "user:1_",
    "user:10",
    "user:1",
    "*",
    "\u{10FFFF}",
    "ключ",
];

fn stored_keys(db: &TestDb) -> BTreeSet<String> {
    #[derive(diesel::QueryableByName)]
    struct K {
        #[diesel(sql_type = diesel::sql_types::Text)]
        key: String,
    }
    diesel::sql_query("SELECT key FROM cache_entries")
        .load::<K>(&mut db.raw_connection())
        .unwrap()
        .into_iter()
        .map(|k| k.key)
        .collect()
}

fn fill(db: &TestDb) {
    let values: Vec<_> = HOSTILE.iter().map(|k| json!({ "key": k })).collect();
    let entries: Vec<_> = HOSTILE.iter().copied().zip(values.iter()).collect();
    db.cache
        .kv()
        .set_many(&entries, Duration::from_secs(60))
        .unwrap();
}

#[test]
fn hostile_keys_read_and_write_only_their_own_row() {
    let db = TestDb::new();
    fill(&db);
    let kv = db.cache.kv();
    let all: BTreeSet<String> = HOSTILE.iter().map(|k| k.to_string()).collect();
    assert_eq!(stored_keys(&db), all);
    for key in HOSTILE {
        assert_eq!(kv.get(key).unwrap(), Some(json!({ "key": key })), "{key}");
        assert!(kv.exists(key).unwrap(), "{key}");
    }
    let found = kv.get_many(HOSTILE).unwrap();
    for (key, value) in HOSTILE.iter().zip(found) {
        assert_eq!(value, Some(json!({ "key": key })), "{key}");
    }
    for (i, key) in HOSTILE.iter().enumerate() {
        kv.set(key, &json!({ "key": key, "round": 2 })).unwrap();
        assert!(kv.delete(key).unwrap(), "{key}");
        let left = stored_keys(&db);
        let expected: BTreeSet<String> = HOSTILE[i + 1..].iter().map(|k| k.to_string()).collect();
        assert_eq!(left, expected, "deleting {key:?}");
    }
}

#[test]
fn hostile_prefixes_delete_exactly_the_keys_that_start_with_them() {
    let db = TestDb::new();
    for prefix in HOSTILE {
        db.cache.kv().clear().unwrap();
        fill(&db);
        let removed = db.cache.kv().delete_prefix(prefix).unwrap();
        let expected: BTreeSet<String> = HOSTILE
            .iter()
            .filter(|k| !k.starts_with(prefix))
            .map(|k| k.to_string())
            .collect();
        assert_eq!(stored_keys(&db), expected, "prefix {prefix:?}");
        assert_eq!(removed as usize, HOSTILE.len() - expected.len());
    }
}

#[test]
fn hostile_batch_deletes_touch_only_the_named_keys() {
    let db = TestDb::new();
    fill(&db);
    let targets = ["'; DROP TABLE cache_entries; --", "%", "\\", "a_"];
    assert_eq!(db.cache.kv().delete_many(&targets).unwrap(), 4);
    let expected: BTreeSet<String> = HOSTILE
        .iter()
        .filter(|k| !targets.contains(k))
        .map(|k| k.to_string())
        .collect();
    assert_eq!(stored_keys(&db), expected);
}

/// A login role with only the privileges the library needs at run time; dropped
/// (with its grants) when the test ends.
struct AppRole {
    name: String,
}

impl AppRole {
    fn create(db: &TestDb) -> Self {
        let name = format!("pgcache_app_{}", uuid::Uuid::new_v4().simple());
        db.exec(&format!(
            "CREATE ROLE {name} LOGIN; \
             GRANT USAGE ON SCHEMA \"{schema}\" TO {name}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA \"{schema}\" TO {name}; \
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA \"{schema}\" TO {name};",
            schema = db.schema
        ));
        AppRole { name }
    }

    fn url(&self) -> String {
        let mut url = url::Url::parse(&common::database_url()).unwrap();
        url.set_username(&self.name).unwrap();
        url.set_password(None).unwrap();
        url.to_string()
    }
}

impl Drop for AppRole {
    fn drop(&mut self) {
        if let Ok(mut conn) =
            <diesel::PgConnection as diesel::Connection>::establish(&common::database_url())
        {
            let _ = conn.batch_execute(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{0}'; \
                 DROP OWNED BY {0}; DROP ROLE {0};",
                self.name
            ));
        }
    }
}

#[test]
fn least_privilege_role_can_use_the_cache_but_not_change_its_tables() {
    // The owner ran the migrations (TestDb does); the application connects as a role
    // that may only read and write rows.
    let db = TestDb::new();
    let role = AppRole::create(&db);
    let config = db
        .config()
        .database_url(role.url())
        .run_migrations(false)
        .build()
        .unwrap();
    let cache = CacheManager::new(config).unwrap();
    let kv = cache.kv();
    kv.set("k", &json!(1)).unwrap();
    assert_eq!(kv.get("k").unwrap(), Some(json!(1)));
    let (a, b) = (json!("a"), json!("b"));
    kv.set_many(&[("a", &a), ("b", &b)], Duration::from_secs(60))
        .unwrap();
    assert_eq!(kv.get_many(&["a", "b"]).unwrap(), vec![Some(a), Some(b)]);
    assert!(kv.touch("k", Duration::from_secs(600)).unwrap());
    let computed = kv
        .get_or_compute("computed", || Ok::<_, Error>(json!("c")))
        .unwrap();
    assert_eq!(computed, json!("c"));
    assert!(kv.delete("k").unwrap());
    assert_eq!(kv.delete_prefix("a").unwrap(), 1);
    cache.flush_stats().unwrap();

    let mut conn = cache.connection().unwrap();
    for forbidden in [
        "DROP TABLE cache_entries",
        "TRUNCATE cache_entries",
        "ALTER TABLE cache_entries ADD COLUMN x int",
        "CREATE TABLE sneaky (x int)",
        "ALTER TABLE cache_entries SET UNLOGGED",
    ] {
        let err = conn.batch_execute(forbidden).unwrap_err().to_string();
        assert!(
            err.contains("must be owner") || err.contains("permission denied"),
            "{forbidden}: {err}"
        );
    }
    drop(conn);
    drop(cache);
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_entries"), 2);
}

#[test]
fn a_role_that_may_not_migrate_is_told_how_to_start() {
    let db = TestDb::new();
    let role = AppRole::create(&db);
    // Migrations on, as by default, and all of them to run: a schema not there yet.
    let config = db
        .config()
        .database_url(role.url())
        .schema(format!("{}_new", db.schema))
        .build()
        .unwrap();
    let err = CacheManager::new(config).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Migration(_)), "{message}");
    assert!(message.contains("permission denied"), "{message}");
    assert!(
        message.contains("`pgcache migrate`") && message.contains("PGCACHE_RUN_MIGRATIONS=false"),
        "{message}"
    );
    // Where every migration is applied there is nothing to do: it starts.
    let cache = CacheManager::new(db.config().database_url(role.url()).build().unwrap()).unwrap();
    cache.kv().set("k", &json!(1)).unwrap();
    assert_eq!(cache.kv().get("k").unwrap(), Some(json!(1)));
}

#[test]
fn the_owner_of_an_existing_schema_can_migrate_without_creating_schemas() {
    // A role that owns the cache's schema but may not create schemas in the
    // database: the setup the error above recommends for `pgcache migrate`.
    let db = TestDb::new();
    let role = AppRole::create(&db);
    let schema = format!("{}_owned", db.schema);
    db.exec(&format!(
        "CREATE SCHEMA \"{schema}\" AUTHORIZATION {}",
        role.name
    ));
    let config = db
        .config()
        .database_url(role.url())
        .schema(&schema)
        .build()
        .unwrap();
    let cache = CacheManager::new(config).unwrap();
    cache.kv().set("k", &json!(1)).unwrap();
    assert_eq!(cache.kv().get("k").unwrap(), Some(json!(1)));
}

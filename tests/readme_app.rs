//! The guide's "Inside an existing Diesel application" and "Cache writes inside
//! your transaction" examples, run as they are written (their visible lines are
//! checked against docs/guide.md) on an application's database: its tables in
//! `public`, its pool's connections fresh and on the server's default search path,
//! the cache in a schema of its own; with caching on and off.

mod common;

use common::FreshDatabase;
use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use pgcache::{CacheConfig, CacheManager};

diesel::table! { users (id) { id -> Integer, name -> Text } }

type AnyError = Box<dyn std::error::Error>;

/// The guide's "Inside an existing Diesel application" example; returns the
/// manager and the application's pool for the checks after it.
fn inside_an_existing_diesel_application(
    config: CacheConfig,
) -> Result<
    (
        CacheManager,
        diesel::r2d2::Pool<diesel::r2d2::ConnectionManager<PgConnection>>,
    ),
    AnyError,
> {
    // guide begin
    use diesel::prelude::*;
    use diesel::r2d2::{ConnectionManager, Pool};
    use pgcache::{Cache, CacheConfig, CacheManager};
    // `config`: `CacheConfig::from_env()?`, or one made with `CacheConfig::builder()`.
    let app_pool = Pool::builder()
        .max_size(8)
        .build(ConnectionManager::<PgConnection>::new(
            config.database_url().expose(),
        ))?;
    let cache = CacheManager::with_pool(app_pool.clone(), config)?;
    cache.kv().set("greeting", &serde_json::json!("hello"))?;

    // The application's own connection and transaction: the cache's delete commits
    // or rolls back with the update.
    let mut conn = app_pool.get()?;
    conn.transaction(|conn| {
        diesel::update(users::table.find(42))
            .set(users::name.eq("Ada"))
            .execute(conn)?;
        cache.kv().delete_in(conn, "user:42:profile:v2")?;
        Ok::<_, pgcache::Error>(())
    })?;
    // guide end
    // (`CacheConfig` is the guide's hidden set-up line's.)
    let _ = CacheConfig::builder;
    Ok((cache, app_pool))
}

/// The guide's "Cache writes inside your transaction" example.
fn cache_writes_inside_your_transaction(cache: &CacheManager) -> Result<(), pgcache::Error> {
    // guide begin
    use diesel::prelude::*;
    use pgcache::Cache;
    let mut conn = cache.connection()?;
    conn.transaction(|conn| {
        diesel::update(users::table.find(42))
            .set(users::name.eq("Ada"))
            .execute(conn)?;
        cache.kv().delete_in(conn, "user:42:profile:v2")?;
        Ok::<_, pgcache::Error>(())
    })?;
    // guide end
    Ok(())
}

/// An application's database: `users` in `public`, user 42 named `ada`; the
/// cache's configuration for it, in a schema of its own.
fn app_database(caching: bool) -> (FreshDatabase, CacheConfig) {
    let db = FreshDatabase::new();
    PgConnection::establish(&db.url)
        .unwrap()
        .batch_execute(
            "CREATE TABLE public.users (id int PRIMARY KEY, name text NOT NULL); \
             INSERT INTO public.users VALUES (42, 'ada')",
        )
        .unwrap();
    let config = CacheConfig::builder()
        .database_url(db.url.as_str())
        .schema(format!("pgcache_{}", uuid::Uuid::new_v4().simple()))
        .enabled(caching)
        .build()
        .unwrap();
    (db, config)
}

fn user_42(db: &FreshDatabase) -> String {
    use diesel::prelude::*;
    let mut conn = PgConnection::establish(&db.url).unwrap();
    users::table
        .find(42)
        .select(users::name)
        .first(&mut conn)
        .unwrap()
}

/// A cached profile to be deleted by the examples.
fn cache_profile(cache: &CacheManager) {
    use pgcache::Cache;
    cache
        .kv()
        .set("user:42:profile:v2", &serde_json::json!({"name": "ada"}))
        .unwrap();
}

#[test]
fn the_readme_examples_run_on_an_application_pool() {
    let (db, config) = app_database(true);
    let (cache, pool) = inside_an_existing_diesel_application(config).unwrap();
    use pgcache::Cache;
    assert_eq!(user_42(&db), "Ada");
    assert_eq!(
        cache.kv().get("greeting").unwrap(),
        Some(serde_json::json!("hello"))
    );
    // The example's delete ran: set the profile, run it again, with the other
    // example too.
    cache_profile(&cache);
    inside_again(&cache, &pool);
    assert_eq!(cache.kv().get("user:42:profile:v2").unwrap(), None);
    cache_profile(&cache);
    cache_writes_inside_your_transaction(&cache).unwrap();
    assert_eq!(cache.kv().get("user:42:profile:v2").unwrap(), None);

    // And the transaction example on a standalone manager's own pool.
    let standalone = CacheManager::new(cache.config().clone()).unwrap();
    cache_profile(&standalone);
    cache_writes_inside_your_transaction(&standalone).unwrap();
    assert_eq!(standalone.kv().get("user:42:profile:v2").unwrap(), None);
    assert_eq!(user_42(&db), "Ada");
}

/// The app-pool transaction once more, on every one of the pool's connections.
fn inside_again(
    cache: &CacheManager,
    pool: &diesel::r2d2::Pool<diesel::r2d2::ConnectionManager<PgConnection>>,
) {
    use diesel::prelude::*;
    use pgcache::Cache;
    let mut conns: Vec<_> = (0..pool.max_size()).map(|_| pool.get().unwrap()).collect();
    for conn in &mut conns {
        conn.transaction(|conn| {
            diesel::update(users::table.find(42))
                .set(users::name.eq("Ada"))
                .execute(conn)?;
            cache.kv().delete_in(conn, "user:42:profile:v2")?;
            Ok::<_, pgcache::Error>(())
        })
        .unwrap();
    }
}

#[test]
fn the_readme_examples_run_on_an_application_pool_with_caching_off() {
    let (db, config) = app_database(false);
    let (cache, _app_pool) = inside_an_existing_diesel_application(config).unwrap();
    use pgcache::Cache;
    assert_eq!(user_42(&db), "Ada");
    assert_eq!(cache.kv().get("greeting").unwrap(), None);
    cache_writes_inside_your_transaction(&cache).unwrap();
    let standalone = CacheManager::new(cache.config().clone()).unwrap();
    cache_writes_inside_your_transaction(&standalone).unwrap();
    assert_eq!(user_42(&db), "Ada");
}

/// The visible lines of the guide's Rust block under `heading` (hidden `# `
/// lines left out), and the `n`th block between `// guide begin` and
/// `// guide end` in this file, without their indentation.
fn blocks(heading: &str, n: usize) -> (Vec<String>, Vec<String>) {
    let readme = include_str!("../docs/guide.md");
    let section = &readme[readme.find(heading).expect("heading in docs/guide.md")..];
    let code = &section[section.find("```rust").unwrap()..];
    let code = &code[code.find('\n').unwrap() + 1..];
    let code = &code[..code.find("```").unwrap()];
    let visible: Vec<String> = code
        .lines()
        .filter(|l| !(l.starts_with("# ") || *l == "#"))
        .map(|l| l.trim().to_owned())
        .collect();
    let this = include_str!("readme_app.rs");
    let body = this.split("// guide begin").nth(n + 1).unwrap();
    let body = &body[..body.find("// guide end").unwrap()];
    let ours: Vec<String> = body
        .lines()
        .map(|l| l.trim().to_owned())
        .skip_while(String::is_empty)
        .collect();
    let trim = |mut v: Vec<String>| {
        while v.last().is_some_and(String::is_empty) {
            v.pop();
        }
        v
    };
    (trim(visible), trim(ours))
}

#[test]
fn the_tests_run_the_guides_examples_as_written() {
    let (guide, ours) = blocks("## Inside an existing Diesel application", 0);
    assert_eq!(guide, ours);
    let (guide, ours) = blocks("### Cache writes inside your transaction", 1);
    assert_eq!(guide, ours);
}

//! Test harness: every test gets its own schema (random name, migrations run into it,
//! dropped afterwards), so the suite runs in parallel on one database.
#![allow(dead_code)]

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use pgcache::{CacheConfig, CacheConfigBuilder, CacheManager};

/// `DATABASE_URL`, or the local default.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| pgcache::DEFAULT_DATABASE_URL.to_owned())
}

pub struct TestDb {
    pub cache: CacheManager,
    pub schema: String,
}

impl TestDb {
    /// A manager on a fresh schema with the default settings.
    pub fn new() -> Self {
        Self::with(|b| b)
    }

    /// A manager on a fresh schema, with `tweak` applied to the builder.
    pub fn with(tweak: impl FnOnce(CacheConfigBuilder) -> CacheConfigBuilder) -> Self {
        let schema = format!("pgcache_test_{}", uuid::Uuid::new_v4().simple());
        let config = tweak(base_config(&schema))
            .build()
            .expect("test config is valid");
        let cache = CacheManager::new(config).expect("test database is reachable");
        TestDb { cache, schema }
    }

    /// A builder pointing at this test's schema, for a second manager ("another
    /// process") sharing the same tables.
    pub fn config(&self) -> CacheConfigBuilder {
        base_config(&self.schema)
    }

    /// Another manager on the same schema.
    pub fn another_manager(&self) -> CacheManager {
        CacheManager::new(self.config().build().unwrap()).unwrap()
    }

    /// A plain connection (not from the cache's pool) with this schema on its path.
    pub fn raw_connection(&self) -> PgConnection {
        let mut conn = PgConnection::establish(&database_url()).expect("connect");
        conn.batch_execute(&format!("SET search_path TO \"{}\"", self.schema))
            .unwrap();
        conn
    }

    /// Runs SQL on a plain connection in this schema.
    pub fn exec(&self, sql: &str) {
        self.raw_connection().batch_execute(sql).unwrap();
    }

    /// A single number from a query on a plain connection.
    pub fn count(&self, sql: &str) -> i64 {
        use diesel::sql_types::BigInt;
        use diesel::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        diesel::sql_query(sql)
            .get_result::<N>(&mut self.raw_connection())
            .unwrap()
            .n
    }

    /// Makes every entry of `table` expire in the past, as if time had passed.
    pub fn expire_all(&self, table: &str) {
        self.exec(&format!(
            "UPDATE {table} SET expires_at = now() - interval '1 second'"
        ));
    }
}

/// How long a test's manager may take to connect: on a machine as busy as CI's may
/// be (load 10 and more on 2 cores), opening a connection can take longer than the
/// default 2 s. Tests of the connection timeout set their own.
pub const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// A manager on `schema`, whose migrations the parent test ran: what a test's
/// child process uses, with `tweak` applied to the builder first.
pub fn child_manager(
    schema: String,
    tweak: impl FnOnce(CacheConfigBuilder) -> CacheConfigBuilder,
) -> CacheManager {
    let config = tweak(CacheConfig::builder())
        .database_url(database_url())
        .schema(schema)
        .run_migrations(false)
        .pool_connection_timeout(CONNECTION_TIMEOUT)
        .build()
        .unwrap();
    CacheManager::new(config).unwrap()
}

fn base_config(schema: &str) -> CacheConfigBuilder {
    CacheConfig::builder()
        .database_url(database_url())
        .schema(schema)
        .application_name(format!("pgcache-test-{schema}"))
        .pool_max_size(4)
        .pool_min_idle(0)
        .pool_connection_timeout(CONNECTION_TIMEOUT)
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // The manager still runs here (fields drop after this): its near-cache
        // poller's statement can deadlock with the DROP, which locks the same
        // tables in another order. PostgreSQL cancels one side; try again.
        let drop_schema = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        let mut last = None;
        for _ in 0..5 {
            match PgConnection::establish(&database_url())
                .map_err(|e| e.to_string())
                .and_then(|mut conn| conn.batch_execute(&drop_schema).map_err(|e| e.to_string()))
            {
                Ok(()) => return,
                Err(error) => last = Some(error),
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        eprintln!("cannot drop test schema {}: {last:?}", self.schema);
    }
}

/// A database of its own (the default schema `pgcache` is shared by name), dropped
/// afterwards.
pub struct FreshDatabase {
    pub name: String,
    pub url: String,
}

impl FreshDatabase {
    pub fn new() -> Self {
        let name = format!("pgcache_app_{}", uuid::Uuid::new_v4().simple());
        PgConnection::establish(&database_url())
            .unwrap()
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .unwrap();
        let mut url = url::Url::parse(&database_url()).unwrap();
        url.set_path(&name);
        FreshDatabase {
            name,
            url: url.into(),
        }
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        if let Ok(mut conn) = PgConnection::establish(&database_url()) {
            let _ = conn.batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ));
        }
    }
}

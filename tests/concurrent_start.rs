//! Replicas of a service starting together on a fresh database all start.

mod common;

use std::sync::{Arc, Barrier};

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use pgcache::{CacheConfig, CacheManager};

#[test]
fn managers_starting_at_once_on_a_schema_that_does_not_exist_yet_all_start() {
    const MANAGERS: usize = 8;
    for round in 0..6 {
        let schema = format!("pgcache_test_start_{}", uuid::Uuid::new_v4().simple());
        let barrier = Arc::new(Barrier::new(MANAGERS));
        let threads: Vec<_> = (0..MANAGERS)
            .map(|_| {
                let (schema, barrier) = (schema.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let config = CacheConfig::builder()
                        .database_url(common::database_url())
                        .schema(schema)
                        .pool_max_size(1)
                        .build()
                        .unwrap();
                    barrier.wait();
                    CacheManager::new(config).map(drop)
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        PgConnection::establish(&common::database_url())
            .unwrap()
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .unwrap();
        for result in results {
            result.unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
}

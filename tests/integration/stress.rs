//! Many threads mixing every operation on a few overlapping keys: no errors, no
//! duplicate rows, and every read is a miss or a whole value written for that key.

use crate::common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestDb;
use diesel::connection::SimpleConnection;
use pgcache::{Cache, Error};
use serde_json::{json, Value};

const THREADS: u64 = 8;
const KEYS: u64 = 12;
/// Bounds: whichever comes first.
const RUN_FOR: Duration = Duration::from_secs(3);
const MAX_OPS_PER_THREAD: u64 = 1500;

/// A value that names its key and writer, with a body derived from both, so a value
/// of another key or a mix of two writes is detected.
fn value_for(key: &str, writer: u64, seq: u64) -> Value {
    json!({
        "key": key,
        "writer": writer,
        "seq": seq,
        "body": body(key, writer, seq),
    })
}

fn body(key: &str, writer: u64, seq: u64) -> String {
    format!("{key}/{writer}/{seq}/").repeat(8)
}

fn check(key: &str, found: Option<Value>) {
    let Some(v) = found else { return };
    assert_eq!(v["key"], json!(key), "read {v} for key {key}");
    let (writer, seq) = (v["writer"].as_u64().unwrap(), v["seq"].as_u64().unwrap());
    assert_eq!(v["body"], json!(body(key, writer, seq)), "torn value {v}");
}

/// xorshift: a deterministic, dependency-free random stream per thread.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn mixed_concurrent_operations_never_error_duplicate_or_mix_values() {
    let db = TestDb::with(|b| b.pool_max_size(6));
    let ops = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|writer| {
            let (cache, ops) = (db.cache.clone(), ops.clone());
            let mut cleaner = (writer == 0).then(|| db.raw_connection());
            std::thread::spawn(move || {
                let kv = cache.kv();
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (writer + 1));
                let key = |n: u64| format!("key:{n}");
                for seq in 0..MAX_OPS_PER_THREAD {
                    if started.elapsed() > RUN_FOR {
                        break;
                    }
                    let k = key(rng.below(KEYS));
                    // Short TTLs make entries expire under the readers and the cleaner.
                    let ttl = Duration::from_millis(20 + rng.below(500));
                    match rng.below(9) {
                        0 | 1 => check(&k, kv.get(&k).unwrap()),
                        2 => kv
                            .set_with_ttl(&k, &value_for(&k, writer, seq), ttl)
                            .unwrap(),
                        3 => {
                            kv.delete(&k).unwrap();
                        }
                        4 => {
                            let keys = [k.clone(), key(rng.below(KEYS)), key(rng.below(KEYS))];
                            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                            for (k, found) in refs.iter().zip(kv.get_many(&refs).unwrap()) {
                                check(k, found);
                            }
                        }
                        5 => {
                            let keys = [k.clone(), key(rng.below(KEYS)), key(rng.below(KEYS))];
                            let values: Vec<Value> =
                                keys.iter().map(|k| value_for(k, writer, seq)).collect();
                            let entries: Vec<(&str, &Value)> =
                                keys.iter().map(String::as_str).zip(values.iter()).collect();
                            kv.set_many(&entries, ttl).unwrap();
                        }
                        6 => {
                            let keys = [k.clone(), key(rng.below(KEYS))];
                            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                            kv.delete_many(&refs).unwrap();
                        }
                        7 => {
                            let v = kv
                                .get_or_compute_with_ttl(&k, ttl, || {
                                    Ok::<_, Error>(value_for(&k, writer, seq))
                                })
                                .unwrap();
                            check(&k, Some(v));
                        }
                        _ => match cleaner.as_mut() {
                            // What the cleanup job runs.
                            Some(conn) => conn
                                .batch_execute(
                                    "DELETE FROM cache_entries WHERE expires_at <= now()",
                                )
                                .unwrap(),
                            None => check(&k, kv.get(&k).unwrap()),
                        },
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a worker failed");
    }
    let ops = ops.load(Ordering::Relaxed);
    eprintln!("{ops} operations in {:?}", started.elapsed());
    assert!(ops >= THREADS, "the workers ran");
    assert_eq!(
        db.count("SELECT (count(*) - count(DISTINCT key)) AS n FROM cache_entries"),
        0
    );
    assert!(db.count("SELECT count(*) AS n FROM cache_entries") <= KEYS as i64);
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_leases"), 0);
    // Every surviving row is whole and under its own key.
    let kv = db.cache.kv();
    for n in 0..KEYS {
        let k = format!("key:{n}");
        check(&k, kv.get(&k).unwrap());
    }
}

//! The near cache across real processes: one writer, two readers and a prober, each
//! its own process with its own near cache on the same schema. No read, in any
//! process, may return a value older than the staleness bound allows, and the
//! commit-to-visibility latency is measured (reported, not asserted).
//!
//! The test binary runs itself as the children: the same test, with the child's role
//! and the schema in the environment, does the child's work and exits. The children
//! record what they did in plain tables of the test schema; the parent checks it.
//!
//! All times are the wall clock of this one machine, read by every process: no
//! allowance is made for clock noise. A write's commit time is taken right after
//! `set` returns (the commit happened before), a read's start right before `get`.

use crate::common;
use crate::near_support;

use near_support::{kv_stats, wait_current};
use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::TestDb;
use diesel::connection::SimpleConnection;
use diesel::sql_types::{Array, BigInt, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use pgcache::{Cache, CacheConfig, CacheKind, CacheManager, NearCache};
use serde_json::json;

/// The staleness bound `S` every process runs with.
const BOUND: Duration = Duration::from_millis(100);

/// The keys the writer updates and the readers read.
const HOT_KEYS: usize = 100;

/// The key the prober keeps hot; the writer updates it every [`PROBE_EVERY`].
const PROBE_KEY: &str = "probe";
const PROBE_EVERY: Duration = Duration::from_millis(25);

/// How long the writer writes. Readers go on for two bounds more, so the last
/// writes are checked too.
const RUN: Duration = Duration::from_millis(3500);

/// The pause between two writes, and between two reads.
const WRITE_PAUSE: Duration = Duration::from_millis(1);
const READ_PAUSE: Duration = Duration::from_micros(100);
const PROBE_PAUSE: Duration = Duration::from_micros(50);

/// What a child is (`writer`, `reader-1`, `reader-2`, `prober`), and its schema.
const ROLE_VAR: &str = "PGCACHE_NEAR_CHILD_ROLE";
const SCHEMA_VAR: &str = "PGCACHE_NEAR_CHILD_SCHEMA";
const ROLES: [&str; 4] = ["writer", "reader-1", "reader-2", "prober"];

/// This test's name: what the children are run with.
const TEST_NAME: &str = "near_cache_processes::no_process_reads_a_value_staler_than_the_bound";

#[test]
fn no_process_reads_a_value_staler_than_the_bound() {
    match std::env::var(ROLE_VAR) {
        Ok(role) => child(&role, &std::env::var(SCHEMA_VAR).expect("child schema")),
        Err(_) => parent(),
    }
}

// ---------------------------------------------------------------------------
// Parent: sets up, starts the children together, checks what they recorded.
// ---------------------------------------------------------------------------

fn parent() {
    let began = Instant::now();
    let db = TestDb::with(near_settings);
    db.exec(
        "CREATE TABLE near_history (key text NOT NULL, version bigint NOT NULL, committed_us bigint NOT NULL);
         CREATE TABLE near_reads (role text NOT NULL, key text NOT NULL, version bigint NOT NULL,
                                  first_us bigint NOT NULL, last_us bigint NOT NULL, reads bigint NOT NULL);
         CREATE TABLE near_probe (version bigint NOT NULL, seen_us bigint NOT NULL);
         CREATE TABLE near_stats (role text NOT NULL, reads bigint NOT NULL, hits bigint NOT NULL,
                                  misses bigint NOT NULL, bypasses bigint NOT NULL,
                                  invalidations bigint NOT NULL);
         CREATE TABLE near_ready (role text NOT NULL);
         CREATE TABLE near_go (start_us bigint NOT NULL, end_us bigint NOT NULL);",
    );
    // Version 0 of every key, committed before any child starts.
    let mut initial = History::default();
    for key in hot_keys().iter().map(String::as_str).chain([PROBE_KEY]) {
        db.cache.kv().set(key, &json!({"v": 0})).unwrap();
        initial.push(key, 0, now_us());
    }
    initial.save(&mut db.raw_connection());

    let mut children = Children(
        ROLES
            .iter()
            .map(|role| {
                let child = Command::new(std::env::current_exe().expect("test binary"))
                    .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
                    .env(ROLE_VAR, role)
                    .env(SCHEMA_VAR, &db.schema)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("start a child");
                (role.to_string(), Some(child))
            })
            .collect(),
    );

    // Every child current and warm before anyone starts: then all run together.
    let deadline = Instant::now() + Duration::from_secs(20);
    while db.count("SELECT count(*) AS n FROM near_ready") < ROLES.len() as i64 {
        children.fail_if_any_exited();
        assert!(Instant::now() < deadline, "the children never got ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    let start_us = now_us() + 50_000;
    let end_us = start_us + RUN.as_micros() as i64;
    db.exec(&format!(
        "INSERT INTO near_go VALUES ({start_us}, {end_us})"
    ));
    for (role, output) in children.wait(Duration::from_secs(20)) {
        eprintln!("--- {role} ---");
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
        assert!(
            output.status.success(),
            "{role} failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout)
        );
    }

    let mut conn = db.raw_connection();
    let history = Writes::load(&mut conn);
    check_reads(&history, &mut conn);
    check_stats(&mut conn);
    report_visibility(&history, &mut conn);
    eprintln!(
        "near_cache_processes: {:.1} s in all",
        began.elapsed().as_secs_f64()
    );
}

/// Every reading process read a lot, and answered some of it from memory while it
/// was being invalidated: the bound is checked on reads the near cache served.
fn check_stats(conn: &mut PgConnection) {
    #[derive(QueryableByName, Debug)]
    struct Row {
        #[diesel(sql_type = Text)]
        role: String,
        #[diesel(sql_type = BigInt)]
        reads: i64,
        #[diesel(sql_type = BigInt)]
        hits: i64,
        #[diesel(sql_type = BigInt)]
        invalidations: i64,
    }
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT role, reads, hits, invalidations FROM near_stats WHERE role <> 'writer'",
    )
    .load(conn)
    .unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for row in &rows {
        let role = &row.role;
        assert!(row.reads > 0, "{role} read nothing: {row:?}");
        assert!(row.hits > 0, "{role} served no read from memory: {row:?}");
        assert!(
            row.invalidations > 0,
            "{role} received no invalidation: {row:?}"
        );
    }
}

/// A read that started at `t` returned version `v` of a key: no version newer than
/// `v` may have committed before `t - S`. Children keep, per key and version seen,
/// the latest start of a read returning it: the latest is the one to check, since
/// the condition only gets harder as `t` grows.
fn check_reads(history: &Writes, conn: &mut PgConnection) {
    #[derive(QueryableByName)]
    struct Seen {
        #[diesel(sql_type = Text)]
        role: String,
        #[diesel(sql_type = Text)]
        key: String,
        #[diesel(sql_type = BigInt)]
        version: i64,
        #[diesel(sql_type = BigInt)]
        last_us: i64,
        #[diesel(sql_type = BigInt)]
        reads: i64,
    }
    let seen: Vec<Seen> =
        diesel::sql_query("SELECT role, key, version, last_us, reads FROM near_reads")
            .load(conn)
            .unwrap();
    let bound_us = BOUND.as_micros() as i64;
    let mut reads = 0;
    let mut behind = 0;
    let mut violations = Vec::new();
    for s in &seen {
        reads += s.reads;
        let writes = history.of(&s.key);
        assert!(
            writes.iter().any(|&(v, _)| v == s.version),
            "{} read version {} of {}, which was never written",
            s.role,
            s.version,
            s.key
        );
        // Versions still read after a newer one had committed (within the bound).
        if writes.iter().any(|&(v, c)| v > s.version && c < s.last_us) {
            behind += 1;
        }
        // The first newer version: the value read stopped being current when it
        // committed.
        if let Some(&(newer, committed)) = writes
            .iter()
            .filter(|&&(v, _)| v > s.version)
            .min_by_key(|&&(_, c)| c)
            .filter(|&&(_, c)| c + bound_us < s.last_us)
        {
            violations.push(format!(
                "{} read {} = v{} at {} µs, but v{newer} had committed {:.3} ms earlier",
                s.role,
                s.key,
                s.version,
                s.last_us,
                (s.last_us - committed) as f64 / 1e3
            ));
        }
    }
    eprintln!(
        "near_cache_processes: {reads} reads checked ({} key versions seen), \
         {behind} versions read after a newer one had committed, {} staler than {BOUND:?}",
        seen.len(),
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "{} key versions read later than the bound allows:\n{}",
        violations.len(),
        violations[..violations.len().min(20)].join("\n")
    );
}

/// Commit-to-visibility of the probe key: when the prober's first read returning a
/// version (or a newer one) completed, minus when the writer's `set` of it returned.
fn report_visibility(history: &Writes, conn: &mut PgConnection) {
    #[derive(QueryableByName)]
    struct Probe {
        #[diesel(sql_type = BigInt)]
        version: i64,
        #[diesel(sql_type = BigInt)]
        seen_us: i64,
    }
    let seen: HashMap<i64, i64> = diesel::sql_query("SELECT version, seen_us FROM near_probe")
        .load::<Probe>(conn)
        .unwrap()
        .into_iter()
        .map(|p| (p.version, p.seen_us))
        .collect();
    let mut latencies_us: Vec<i64> = history
        .of(PROBE_KEY)
        .iter()
        .filter(|&&(v, _)| v > 0)
        .filter_map(|&(v, committed)| seen.get(&v).map(|s| s - committed))
        .collect();
    assert!(
        !latencies_us.is_empty(),
        "the prober saw none of the writes of its key"
    );
    latencies_us.sort_unstable();
    let at = |q: f64| {
        let i = ((latencies_us.len() - 1) as f64 * q).round() as usize;
        latencies_us[i] as f64 / 1e3
    };
    eprintln!(
        "near_cache_processes: commit-to-visibility over {} writes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies_us.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

/// The children, killed if the parent gives up on them.
struct Children(Vec<(String, Option<Child>)>);

impl Children {
    fn fail_if_any_exited(&mut self) {
        for (role, child) in &mut self.0 {
            let running = child.as_mut().expect("child");
            if let Ok(Some(status)) = running.try_wait() {
                let output = child.take().expect("child").wait_with_output().unwrap();
                panic!(
                    "{role} exited early ({status}):\n{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }

    /// Each child's output once all have exited, at most `limit` from now.
    fn wait(&mut self, limit: Duration) -> Vec<(String, Output)> {
        let deadline = Instant::now() + limit;
        let mut outputs = Vec::new();
        for (role, child) in &mut self.0 {
            let running = child.as_mut().expect("child");
            while running.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "{role} did not finish in time");
                std::thread::sleep(Duration::from_millis(10));
            }
            let output = child.take().expect("child").wait_with_output().unwrap();
            outputs.push((role.clone(), output));
        }
        outputs
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in self.0.iter_mut().filter_map(|(_, c)| c.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Children.
// ---------------------------------------------------------------------------

fn child(role: &str, schema: &str) {
    let cache = CacheManager::new(
        near_settings(
            CacheConfig::builder()
                .database_url(common::database_url())
                .schema(schema)
                .application_name(format!("pgcache-test-{schema}"))
                .pool_max_size(4)
                .pool_min_idle(0),
        )
        .build()
        .unwrap(),
    )
    .unwrap();
    let mut conn = PgConnection::establish(&common::database_url()).expect("connect");
    conn.batch_execute(&format!("SET search_path TO \"{schema}\""))
        .unwrap();
    wait_current(&cache);
    // Warm: the first read of a key fills the near cache.
    let warm: Vec<String> = match role {
        "writer" => Vec::new(),
        "prober" => vec![PROBE_KEY.to_owned()],
        _ => hot_keys(),
    };
    for key in &warm {
        cache.kv().get(key).unwrap();
    }
    diesel::sql_query("INSERT INTO near_ready VALUES ($1)")
        .bind::<Text, _>(role)
        .execute(&mut conn)
        .unwrap();
    let (start_us, end_us) = wait_for_go(&mut conn);
    while now_us() < start_us {
        std::thread::sleep(Duration::from_micros(200));
    }
    let before = kv_stats(&cache);
    let mut rng = Rng::new();
    let read_until = end_us + 2 * BOUND.as_micros() as i64;
    match role {
        "writer" => write(&cache, &mut rng, end_us).save(&mut conn),
        "prober" => {
            let (reads, first_seen) = probe(&cache, read_until);
            save_probe(&first_seen, &mut conn);
            reads.save(role, &mut conn);
        }
        _ => read(&cache, &mut rng, read_until).save(role, &mut conn),
    }
    let after = kv_stats(&cache);
    let reads = (after.hits + after.misses + after.bypasses)
        - (before.hits + before.misses + before.bypasses);
    eprintln!(
        "{role}: reads {reads}, near-cache hits {}, misses {}, bypasses {}, invalidations {}, channel lag {:?} ms",
        after.hits - before.hits,
        after.misses - before.misses,
        after.bypasses - before.bypasses,
        after.invalidations - before.invalidations,
        after.poll_lag_ms
    );
    diesel::sql_query("INSERT INTO near_stats VALUES ($1, $2, $3, $4, $5, $6)")
        .bind::<Text, _>(role)
        .bind::<BigInt, _>(reads as i64)
        .bind::<BigInt, _>((after.hits - before.hits) as i64)
        .bind::<BigInt, _>((after.misses - before.misses) as i64)
        .bind::<BigInt, _>((after.bypasses - before.bypasses) as i64)
        .bind::<BigInt, _>((after.invalidations - before.invalidations) as i64)
        .execute(&mut conn)
        .unwrap();
}

/// Writes increasing versions of random hot keys, and of the probe key every
/// [`PROBE_EVERY`], until `end_us`. A write's commit time is taken right after
/// `set` returns: the commit happened before, so this errs towards lenience by
/// the few microseconds between the two.
fn write(cache: &CacheManager, rng: &mut Rng, end_us: i64) -> History {
    let keys = hot_keys();
    let mut versions = vec![0i64; HOT_KEYS];
    let mut probe_version = 0;
    let mut next_probe_us = now_us();
    let mut history = History::default();
    while now_us() < end_us {
        if now_us() >= next_probe_us {
            probe_version += 1;
            cache
                .kv()
                .set(PROBE_KEY, &json!({"v": probe_version}))
                .unwrap();
            let committed = now_us();
            history.push(PROBE_KEY, probe_version, committed);
            next_probe_us = committed + PROBE_EVERY.as_micros() as i64;
        } else {
            let i = rng.below(HOT_KEYS);
            versions[i] += 1;
            cache
                .kv()
                .set(&keys[i], &json!({"v": versions[i]}))
                .unwrap();
            history.push(&keys[i], versions[i], now_us());
        }
        std::thread::sleep(WRITE_PAUSE);
    }
    eprintln!("writer: {} writes", history.keys.len());
    history
}

/// Reads random hot keys until `until_us`.
fn read(cache: &CacheManager, rng: &mut Rng, until_us: i64) -> Reads {
    let keys = hot_keys();
    let mut reads = Reads::default();
    loop {
        let started = now_us();
        if started >= until_us {
            return reads;
        }
        let key = &keys[rng.below(HOT_KEYS)];
        reads.note(key, version(cache, key), started);
        std::thread::sleep(READ_PAUSE);
    }
}

/// Reads the probe key in a tight loop until `until_us`; returns its reads and,
/// per version, when the first read returning it (or a newer one) completed.
fn probe(cache: &CacheManager, until_us: i64) -> (Reads, BTreeMap<i64, i64>) {
    let mut reads = Reads::default();
    let mut first_seen = BTreeMap::new();
    let mut newest = 0;
    loop {
        let started = now_us();
        if started >= until_us {
            return (reads, first_seen);
        }
        let v = version(cache, PROBE_KEY);
        let done = now_us();
        reads.note(PROBE_KEY, v, started);
        for missed in newest + 1..=v {
            first_seen.insert(missed, done);
        }
        newest = newest.max(v);
        std::thread::sleep(PROBE_PAUSE);
    }
}

fn version(cache: &CacheManager, key: &str) -> i64 {
    let value = cache
        .kv()
        .get(key)
        .unwrap()
        .unwrap_or_else(|| panic!("{key} is missing"));
    value["v"].as_i64().expect("a version")
}

fn save_probe(first_seen: &BTreeMap<i64, i64>, conn: &mut PgConnection) {
    diesel::sql_query("INSERT INTO near_probe SELECT * FROM unnest($1::bigint[], $2::bigint[])")
        .bind::<Array<BigInt>, _>(first_seen.keys().copied().collect::<Vec<_>>())
        .bind::<Array<BigInt>, _>(first_seen.values().copied().collect::<Vec<_>>())
        .execute(conn)
        .unwrap();
}

fn wait_for_go(conn: &mut PgConnection) -> (i64, i64) {
    #[derive(QueryableByName)]
    struct Go {
        #[diesel(sql_type = BigInt)]
        start_us: i64,
        #[diesel(sql_type = BigInt)]
        end_us: i64,
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let go: Vec<Go> = diesel::sql_query("SELECT start_us, end_us FROM near_go")
            .load(conn)
            .unwrap();
        if let Some(go) = go.first() {
            return (go.start_us, go.end_us);
        }
        assert!(Instant::now() < deadline, "no start signal");
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------
// Shared.
// ---------------------------------------------------------------------------

fn near_settings(builder: pgcache::CacheConfigBuilder) -> pgcache::CacheConfigBuilder {
    builder
        .near_cache(CacheKind::Kv, Some(NearCache::new()))
        .near_cache_staleness(BOUND)
}

fn hot_keys() -> Vec<String> {
    (0..HOT_KEYS).map(|i| format!("hot:{i}")).collect()
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// Writes: key, version, commit time.
#[derive(Default)]
struct History {
    keys: Vec<String>,
    versions: Vec<i64>,
    committed_us: Vec<i64>,
}

impl History {
    fn push(&mut self, key: &str, version: i64, committed_us: i64) {
        self.keys.push(key.to_owned());
        self.versions.push(version);
        self.committed_us.push(committed_us);
    }

    fn save(&self, conn: &mut PgConnection) {
        diesel::sql_query(
            "INSERT INTO near_history SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])",
        )
        .bind::<Array<Text>, _>(&self.keys)
        .bind::<Array<BigInt>, _>(&self.versions)
        .bind::<Array<BigInt>, _>(&self.committed_us)
        .execute(conn)
        .unwrap();
    }
}

/// The writes as the parent reads them back: per key, (version, commit time) by
/// version.
struct Writes(HashMap<String, Vec<(i64, i64)>>);

impl Writes {
    fn of(&self, key: &str) -> &[(i64, i64)] {
        self.0.get(key).map_or(&[], Vec::as_slice)
    }

    fn load(conn: &mut PgConnection) -> Self {
        #[derive(QueryableByName)]
        struct Row {
            #[diesel(sql_type = Text)]
            key: String,
            #[diesel(sql_type = BigInt)]
            version: i64,
            #[diesel(sql_type = BigInt)]
            committed_us: i64,
        }
        let mut by_key: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
        let rows: Vec<Row> = diesel::sql_query(
            "SELECT key, version, committed_us FROM near_history ORDER BY key, version",
        )
        .load(conn)
        .unwrap();
        for row in rows {
            by_key
                .entry(row.key)
                .or_default()
                .push((row.version, row.committed_us));
        }
        Writes(by_key)
    }
}

/// Per key and version read: first and latest start of a read returning it, and
/// how many.
#[derive(Default)]
struct Reads(HashMap<(String, i64), (i64, i64, i64)>);

impl Reads {
    fn note(&mut self, key: &str, version: i64, started_us: i64) {
        let entry = self
            .0
            .entry((key.to_owned(), version))
            .or_insert((started_us, started_us, 0));
        entry.1 = entry.1.max(started_us);
        entry.2 += 1;
    }

    fn save(&self, role: &str, conn: &mut PgConnection) {
        let (mut keys, mut versions, mut first, mut last, mut counts) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((key, version), &(f, l, n)) in &self.0 {
            keys.push(key.clone());
            versions.push(*version);
            first.push(f);
            last.push(l);
            counts.push(n);
        }
        diesel::sql_query(
            "INSERT INTO near_reads SELECT $1, * FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[])",
        )
        .bind::<Text, _>(role)
        .bind::<Array<Text>, _>(keys)
        .bind::<Array<BigInt>, _>(versions)
        .bind::<Array<BigInt>, _>(first)
        .bind::<Array<BigInt>, _>(last)
        .bind::<Array<BigInt>, _>(counts)
        .execute(conn)
        .unwrap();
    }
}

/// A small xorshift generator, seeded from the process id and the clock.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        Rng((u64::from(std::process::id()) << 32 | now_us() as u64) | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

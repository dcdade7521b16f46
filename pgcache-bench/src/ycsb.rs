//! `pgcache-bench ycsb`: the YCSB core workloads (Cooper et al., "Benchmarking Cloud
//! Serving Systems with YCSB", SoCC 2010) on every system in one run, with the same
//! threads and the same keys.
//!
//! Load phase: `--records` records of ten 100-byte fields (1 KB), key `user<hash>`.
//! Then each workload at each thread count: every system warmed up (unmeasured),
//! then the systems in turn, in four slices, `--duration` seconds (or
//! `--operations`) in all each:
//!
//! | workload | mix | request distribution |
//! |---|---|---|
//! | A | 50 % read, 50 % update | scrambled Zipfian |
//! | B | 95 % read, 5 % update | scrambled Zipfian |
//! | C | 100 % read | scrambled Zipfian |
//! | D | 95 % read, 5 % insert | latest |
//! | F | 50 % read, 50 % read-modify-write | scrambled Zipfian |
//!
//! An update writes the whole record (a cache entry is one value). The systems:
//! pgcache with its near cache, pgcache without it, the same statements
//! hand-written and prepared on pgcache's own table (`postgres` crate), Redis, and
//! an in-process cache (moka), the incoherent ceiling.

mod chart;
pub(crate) mod generator;
mod histogram;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pgcache::{Cache, CacheKind, CacheManager, NearCache};
use postgres::types::Json;
use postgres::{Client, NoTls, Statement};
use serde_json::Value;

use crate::ops::{bench_config, near::wait_current, Interval, Scratch, TTL};
use crate::BenchResult;
use generator::{Latest, Rng, ScrambledZipfian, ZIPFIAN_CONSTANT};
use histogram::Histogram;

/// Options of `pgcache-bench ycsb`.
#[derive(Debug, clap::Args)]
pub struct YcsbArgs {
    /// Workloads to run, in this order (YCSB's D inserts, so it is best last).
    #[arg(long, value_delimiter = ',', default_value = "a,b,c,f,d")]
    workloads: Vec<Workload>,
    /// Client thread counts; every system runs each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    threads: Vec<usize>,
    /// Systems to measure.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "pgcache-near,pgcache,raw-sql,redis,moka"
    )]
    systems: Vec<System>,
    /// Records loaded before the workloads (YCSB's `recordcount`).
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    /// Seconds each cell (workload, system, threads) is measured.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Stop each cell after this many operations (whichever comes first with
    /// `--duration`).
    #[arg(long)]
    operations: Option<u64>,
    /// Seconds of unmeasured warm-up before each cell (at most a fifth of
    /// `--duration`).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// `full` (synchronous commit) or `relaxed` (`synchronous_commit = off` for
    /// pgcache and raw SQL alike).
    #[arg(long, value_enum, default_value_t = Durability::Full)]
    durability: Durability,
    /// The Redis to measure.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Also draw the throughput per workload and system as a PNG here (a legend
    /// is written next to it, `<path>.legend.txt`: the chart has no text).
    #[arg(long, value_name = "PATH")]
    chart: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
enum Durability {
    Full,
    Relaxed,
}

/// A YCSB core workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Workload {
    A,
    B,
    C,
    D,
    F,
}

/// What one operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Update,
    Insert,
    ReadModifyWrite,
}

const OPS: [Op; 4] = [Op::Read, Op::Update, Op::Insert, Op::ReadModifyWrite];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Update => "update",
            Op::Insert => "insert",
            Op::ReadModifyWrite => "rmw",
        }
    }
}

impl Workload {
    pub(crate) fn letter(self) -> char {
        match self {
            Workload::A => 'A',
            Workload::B => 'B',
            Workload::C => 'C',
            Workload::D => 'D',
            Workload::F => 'F',
        }
    }

    /// The share of reads; the rest is this workload's other operation.
    fn read_share(self) -> f64 {
        match self {
            Workload::A | Workload::F => 0.5,
            Workload::B | Workload::D => 0.95,
            Workload::C => 1.0,
        }
    }

    fn other(self) -> Op {
        match self {
            Workload::A | Workload::B | Workload::C => Op::Update,
            Workload::D => Op::Insert,
            Workload::F => Op::ReadModifyWrite,
        }
    }
}

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum System {
    /// pgcache with its near cache (kv).
    PgcacheNear,
    /// pgcache, every read from PostgreSQL.
    Pgcache,
    /// The same statements hand-written and prepared, on pgcache's table.
    RawSql,
    /// Redis GET and SET EX of the same JSON text.
    Redis,
    /// An in-process cache (moka): no database, no coherence between processes.
    Moka,
}

impl System {
    pub(crate) fn name(self) -> &'static str {
        match self {
            System::PgcacheNear => "pgcache+near",
            System::Pgcache => "pgcache",
            System::RawSql => "raw-sql",
            System::Redis => "redis",
            System::Moka => "moka",
        }
    }

    /// Inserted keys carry the system's tag: pgcache and raw SQL share a table.
    fn tag(self) -> &'static str {
        match self {
            System::PgcacheNear => "n",
            System::Pgcache => "p",
            System::RawSql => "r",
            System::Redis => "s",
            System::Moka => "m",
        }
    }
}

/// FNV-1a of a key number, as YCSB names its records (`user<hash>`).
fn fnv64(n: u64) -> u64 {
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for byte in n.to_le_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01B3);
    }
    hash
}

const FIELDS: usize = 10;
const FIELD_BYTES: usize = 100;

/// A record: ten 100-character fields.
fn record(rng: &mut Rng) -> Value {
    let mut map = serde_json::Map::new();
    for f in 0..FIELDS {
        let text: String = (0..FIELD_BYTES)
            .map(|_| char::from(b'a' + (rng.next_u64() % 26) as u8))
            .collect();
        map.insert(format!("field{f}"), Value::String(text));
    }
    Value::Object(map)
}

/// Values each thread cycles through when writing (built once, outside the clock).
const VALUE_POOL: usize = 16;

/// What a run shares between the threads of a system.
struct Stores {
    records: u64,
    near: Option<CacheManager>,
    plain: Option<CacheManager>,
    url: String,
    schema: String,
    relaxed: bool,
    redis: Option<redis::Client>,
    redis_prefix: String,
    moka: moka::sync::Cache<String, Value>,
}

/// Per system: the next key number to insert and how many are acknowledged.
struct InsertCounter {
    next: AtomicU64,
    acknowledged: AtomicU64,
}

impl Stores {
    fn key(&self, system: System, n: u64) -> String {
        let hash = fnv64(n);
        let tag = if n < self.records { "" } else { system.tag() };
        match system {
            System::Redis => format!("{}user{hash}{tag}", self.redis_prefix),
            _ => format!("user{hash}{tag}"),
        }
    }

    fn connect(&self, system: System) -> BenchResult<Conn<'_>> {
        Ok(match system {
            System::PgcacheNear => Conn::Cache(self.near.as_ref().ok_or("no near manager")?),
            System::Pgcache => Conn::Cache(self.plain.as_ref().ok_or("no manager")?),
            System::RawSql => Conn::Raw(Box::new(Raw::connect(
                &self.url,
                &self.schema,
                self.relaxed,
            )?)),
            System::Redis => Conn::Redis(Box::new(
                self.redis
                    .as_ref()
                    .ok_or("no Redis client")?
                    .get_connection()?,
            )),
            System::Moka => Conn::Moka(&self.moka),
        })
    }
}

/// Raw SQL on pgcache's table: the statements prepared once per connection.
struct Raw {
    client: Client,
    get: Statement,
    upsert: Statement,
}

impl Raw {
    fn connect(url: &str, schema: &str, relaxed: bool) -> BenchResult<Self> {
        let mut client = Client::connect(url, NoTls)?;
        let mut setup = format!("SET search_path TO \"{schema}\";");
        if relaxed {
            setup.push_str(" SET synchronous_commit = off;");
        }
        client.batch_execute(&setup)?;
        let get = client
            .prepare("SELECT value FROM cache_entries WHERE key = $1 AND expires_at > now()")?;
        let upsert = client.prepare(
            "INSERT INTO cache_entries (key, value, expires_at) VALUES ($1, $2, now() + $3) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
             expires_at = excluded.expires_at, created_at = now()",
        )?;
        Ok(Raw {
            client,
            get,
            upsert,
        })
    }
}

/// One thread's handle on a system.
enum Conn<'a> {
    Cache(&'a CacheManager),
    Raw(Box<Raw>),
    Redis(Box<redis::Connection>),
    Moka(&'a moka::sync::Cache<String, Value>),
}

impl Conn<'_> {
    /// Reads a record (parsed, as an application would use it); whether found.
    fn read(&mut self, key: &str) -> BenchResult<bool> {
        Ok(match self {
            Conn::Cache(cache) => cache.kv().get(key)?.is_some(),
            Conn::Raw(raw) => raw
                .client
                .query_opt(&raw.get, &[&key])?
                .map(|row| row.get::<_, Value>(0))
                .is_some(),
            Conn::Redis(conn) => {
                use redis::Commands;
                let text: Option<String> = conn.get(key)?;
                text.map(|t| serde_json::from_str::<Value>(&t))
                    .transpose()?
                    .is_some()
            }
            Conn::Moka(cache) => cache.get(key).is_some(),
        })
    }

    /// Writes a whole record, inserting or replacing it.
    fn write(&mut self, key: &str, value: &Value) -> BenchResult<()> {
        match self {
            Conn::Cache(cache) => cache.kv().set_with_ttl(key, value, TTL)?,
            Conn::Raw(raw) => {
                raw.client
                    .execute(&raw.upsert, &[&key, &Json(value), &Interval(TTL)])?;
            }
            Conn::Redis(conn) => {
                use redis::Commands;
                let text = serde_json::to_string(value)?;
                let _: () = conn.set_ex(key, text, TTL.as_secs())?;
            }
            Conn::Moka(cache) => cache.insert(key.to_owned(), value.clone()),
        }
        Ok(())
    }
}

/// Latency and count of one operation type in a cell.
#[derive(Debug, Clone, serde::Serialize)]
struct OpFigures {
    operation: &'static str,
    count: u64,
    p50_us: f64,
    p99_us: f64,
}

/// One measured cell: a workload on a system at a thread count.
#[derive(Debug, Clone, serde::Serialize)]
struct Cell {
    workload: char,
    system: &'static str,
    threads: usize,
    operations: u64,
    seconds: f64,
    ops_per_sec: f64,
    /// Per operation type that ran.
    latencies: Vec<OpFigures>,
    /// Reads that found no record (D's reads of a record another thread has not
    /// finished inserting).
    read_misses: u64,
    /// Near-cache hits / reads, for pgcache with the near cache.
    near_hit_rate: Option<f64>,
}

/// How long a system took to load the records.
#[derive(Debug, Clone, serde::Serialize)]
struct Load {
    system: &'static str,
    seconds: f64,
    records_per_sec: f64,
}

/// The generator check: the hottest 1 % of the records' share of requests.
#[derive(Debug, Clone, serde::Serialize)]
struct GeneratorCheck {
    records: u64,
    theta: f64,
    hottest: u64,
    measured_share: f64,
    expected_share: f64,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    records: u64,
    value_bytes: usize,
    durability: Durability,
    duration: f64,
    generator: GeneratorCheck,
    load: Vec<Load>,
    cells: Vec<Cell>,
    targets: Vec<String>,
}

/// Entry point of `pgcache-bench ycsb`.
///
/// # Errors
/// Configuration, connection and database errors, with what failed.
pub fn run(args: &YcsbArgs, database_url: Option<&str>, quiet: bool) -> BenchResult<()> {
    let records = args.records.max(100);
    let (url, shown) = crate::database_url(database_url, "pgcache-bench ycsb")?;
    let relaxed = args.durability == Durability::Relaxed;
    let mut systems = args.systems.clone();
    systems.dedup();
    let threads: Vec<usize> = args.threads.iter().map(|&t| t.max(1)).collect();
    let max_threads = threads.iter().copied().max().unwrap_or(1);
    let say = |line: &str| {
        if !quiet {
            eprintln!("{line}");
        }
    };
    let hottest = (records / 100).max(1);
    let generator = GeneratorCheck {
        records,
        theta: ZIPFIAN_CONSTANT,
        hottest,
        measured_share: generator::measured_top_share(records, hottest, 1_000_000, 42),
        expected_share: generator::expected_top_share(hottest, records, ZIPFIAN_CONSTANT),
    };
    say(&format!(
        "pgcache-bench ycsb: {records} records of {} B, {} durability, {:.1} s per cell, threads {threads:?}, on {shown} (no TLS)\n\
         generator: the hottest 1 % ({hottest} records) get {:.1} % of requests (Zipfian theta {}: {:.1} % expected)",
        FIELDS * FIELD_BYTES,
        if relaxed { "relaxed" } else { "full" },
        args.duration,
        generator.measured_share * 100.0,
        ZIPFIAN_CONSTANT,
        generator.expected_share * 100.0,
    ));

    let id = uuid::Uuid::new_v4().simple().to_string();
    let plain_scratch = Scratch {
        url: url.clone(),
        schema: format!("pgcache_ycsb_{id}"),
    };
    let near_scratch = Scratch {
        url: url.clone(),
        schema: format!("pgcache_ycsb_{id}_near"),
    };
    let wants = |s: System| systems.contains(&s);
    // Raw SQL works on pgcache's table: the plain manager creates and loads it.
    let plain = if wants(System::Pgcache) || wants(System::RawSql) {
        Some(CacheManager::new(
            bench_config(&url, &plain_scratch.schema, max_threads, relaxed)
                .application_name("pgcache-bench-ycsb")
                .build()?,
        )?)
    } else {
        None
    };
    let near = if wants(System::PgcacheNear) {
        Some(CacheManager::new(
            bench_config(&url, &near_scratch.schema, max_threads, relaxed)
                .application_name("pgcache-bench-ycsb-near")
                .near_cache(CacheKind::Kv, Some(NearCache::new().max_bytes(1 << 30)))
                .build()?,
        )?)
    } else {
        None
    };
    let redis = if wants(System::Redis) {
        Some(redis::Client::open(args.redis_url.as_str())?)
    } else {
        None
    };
    let stores = Stores {
        records,
        near,
        plain,
        url: url.clone(),
        schema: plain_scratch.schema.clone(),
        relaxed,
        redis,
        redis_prefix: format!("pgcache_ycsb_{id}:"),
        moka: moka::sync::Cache::new(records.saturating_mul(4)),
    };
    let counters: Vec<InsertCounter> = systems
        .iter()
        .map(|_| InsertCounter {
            next: AtomicU64::new(records),
            acknowledged: AtomicU64::new(records),
        })
        .collect();

    // Whatever happens next, Redis's keys go (the schemas go with their guards).
    let result = (|| -> BenchResult<(Vec<Load>, Vec<Cell>)> {
        let load = load(&stores, &systems, &say)?;
        if let Some(near) = &stores.near {
            wait_current(near)?;
        }
        let mut cells = Vec::new();
        let mut table = Table::new(!args.json && !quiet, args.json && !quiet);
        for &workload in &args.workloads {
            for &n in &threads {
                for cell in run_cells(&stores, &systems, &counters, workload, n, args)? {
                    table.show(&cell);
                    cells.push(cell);
                }
            }
        }
        Ok((load, cells))
    })();
    let cleared = clear_redis(&stores, &systems, &counters);
    let (load, cells) = result?;
    cleared?;
    drop(stores);
    drop(plain_scratch);
    drop(near_scratch);

    let targets = targets(&cells, relaxed);
    let report = Report {
        records,
        value_bytes: FIELDS * FIELD_BYTES,
        durability: args.durability,
        duration: args.duration,
        generator,
        load,
        cells,
        targets,
    };
    if let Some(path) = &args.chart {
        let legend = chart::draw(path, &report.cells, &args.workloads, &systems, &threads)?;
        say(&format!(
            "chart: {} (legend: {})",
            path.display(),
            legend.display()
        ));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if !quiet {
        println!("\nTargets:");
        for line in &report.targets {
            println!("  {line}");
        }
    }
    Ok(())
}

/// The load phase: every record into each system's store (raw SQL shares
/// pgcache's table), in batches.
fn load(stores: &Stores, systems: &[System], say: &dyn Fn(&str)) -> BenchResult<Vec<Load>> {
    const BATCH: u64 = 500;
    let mut rng = Rng::new(1);
    let values: Vec<Value> = (0..VALUE_POOL).map(|_| record(&mut rng)).collect();
    let mut loads = Vec::new();
    for &system in systems {
        if system == System::RawSql {
            continue;
        }
        let started = Instant::now();
        let mut redis = match system {
            System::Redis => Some(stores.redis.as_ref().ok_or("no Redis")?.get_connection()?),
            _ => None,
        };
        for start in (0..stores.records).step_by(BATCH as usize) {
            let keys: Vec<String> = (start..(start + BATCH).min(stores.records))
                .map(|n| stores.key(system, n))
                .collect();
            let value = |i: usize| &values[(start as usize + i) % VALUE_POOL];
            match system {
                System::PgcacheNear | System::Pgcache => {
                    let cache = match system {
                        System::PgcacheNear => stores.near.as_ref(),
                        _ => stores.plain.as_ref(),
                    }
                    .ok_or("no manager")?;
                    let entries: Vec<(&str, &Value)> = keys
                        .iter()
                        .enumerate()
                        .map(|(i, k)| (k.as_str(), value(i)))
                        .collect();
                    cache.kv().set_many(&entries, TTL)?;
                }
                System::Redis => {
                    let mut pipe = redis::pipe();
                    for (i, k) in keys.iter().enumerate() {
                        pipe.cmd("SET")
                            .arg(k)
                            .arg(serde_json::to_string(value(i))?)
                            .arg("EX")
                            .arg(TTL.as_secs())
                            .ignore();
                    }
                    pipe.exec(redis.as_mut().ok_or("no Redis connection")?)?;
                }
                System::Moka => {
                    for (i, k) in keys.into_iter().enumerate() {
                        stores.moka.insert(k, value(i).clone());
                    }
                }
                System::RawSql => unreachable!("skipped above"),
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        say(&format!(
            "load {:<13} {} records in {seconds:.1} s",
            system.name(),
            stores.records
        ));
        loads.push(Load {
            system: system.name(),
            seconds,
            records_per_sec: stores.records as f64 / seconds.max(1e-9),
        });
    }
    if stores.plain.is_some() {
        // Fresh statistics, as after a real load.
        let mut client = Client::connect(&stores.url, NoTls)?;
        client.batch_execute(&format!(
            "VACUUM ANALYZE \"{}\".cache_entries",
            stores.schema
        ))?;
    }
    Ok(loads)
}

/// What one thread measured in a cell.
#[derive(Default)]
struct ThreadResult {
    by_op: [Histogram; 4],
    read_misses: u64,
}

/// Slices of each cell: the systems of a workload and thread count take turns, so
/// a burst of load from elsewhere on the machine hits them alike.
const SLICES: u32 = 4;

/// One system's cell while it is being measured: its threads' connections and
/// what its slices measured so far.
struct CellRun<'a> {
    stores: &'a Stores,
    system: System,
    workload: Workload,
    counter: &'a InsertCounter,
    conns: Vec<Conn<'a>>,
    zipfian: ScrambledZipfian,
    latest: Latest,
    by_op: [Histogram; 4],
    read_misses: u64,
    seconds: f64,
    near_hits: u64,
    near_reads: u64,
    slices: u64,
}

impl<'a> CellRun<'a> {
    fn new(
        stores: &'a Stores,
        system: System,
        workload: Workload,
        threads: usize,
        counter: &'a InsertCounter,
    ) -> BenchResult<Self> {
        Ok(CellRun {
            stores,
            system,
            workload,
            counter,
            conns: (0..threads)
                .map(|_| stores.connect(system))
                .collect::<BenchResult<_>>()?,
            zipfian: ScrambledZipfian::new(stores.records, ZIPFIAN_CONSTANT),
            latest: Latest::new(
                counter.acknowledged.load(Ordering::Relaxed),
                ZIPFIAN_CONSTANT,
            ),
            by_op: Default::default(),
            read_misses: 0,
            seconds: 0.0,
            near_hits: 0,
            near_reads: 0,
            slices: 0,
        })
    }

    /// Near-cache hits and reads so far (zero for the other systems).
    fn near_stats(&self) -> (u64, u64) {
        let near = if self.system == System::PgcacheNear {
            self.stores.near.as_ref()
        } else {
            None
        };
        near.map_or((0, 0), |cache| {
            cache
                .near_cache_stats()
                .iter()
                .filter(|s| s.cache == CacheKind::Kv)
                .fold((0, 0), |(h, r), s| {
                    (h + s.hits, r + s.hits + s.misses + s.bypasses)
                })
        })
    }

    /// Runs the threads for `time` (or `limit` operations each); counted unless
    /// `warm_up`.
    fn run(&mut self, time: Duration, limit: Option<u64>, warm_up: bool) -> BenchResult<()> {
        let (hits_before, reads_before) = self.near_stats();
        self.slices += 1;
        let seed = if warm_up { 0xA5A5 } else { 0x5EED } ^ (self.slices << 48);
        let (stores, system, workload, counter) =
            (self.stores, self.system, self.workload, self.counter);
        let (zipfian, latest) = (&self.zipfian, &self.latest);
        let started = Instant::now();
        let results = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .conns
                .iter_mut()
                .enumerate()
                .map(|(t, conn)| {
                    let mut zipfian = zipfian.clone();
                    let mut latest = latest.clone();
                    scope.spawn(move || -> BenchResult<ThreadResult> {
                        let mut rng = Rng::new(seed ^ ((t as u64 + 1) << 32));
                        let values: Vec<Value> =
                            (0..VALUE_POOL).map(|_| record(&mut rng)).collect();
                        let mut out = ThreadResult::default();
                        let mut done = 0u64;
                        let begin = Instant::now();
                        while begin.elapsed() < time && limit.is_none_or(|n| done < n) {
                            let value = &values[(done as usize) % VALUE_POOL];
                            let op = if rng.unit() < workload.read_share() {
                                Op::Read
                            } else {
                                workload.other()
                            };
                            let key = match (op, workload) {
                                (Op::Insert, _) => {
                                    let n = counter.next.fetch_add(1, Ordering::Relaxed);
                                    stores.key(system, n)
                                }
                                (_, Workload::D) => {
                                    let count = counter.acknowledged.load(Ordering::Relaxed);
                                    stores.key(system, latest.next(count, &mut rng))
                                }
                                _ => stores.key(system, zipfian.next(&mut rng).0),
                            };
                            let started = Instant::now();
                            match op {
                                Op::Read => {
                                    if !conn.read(&key)? {
                                        out.read_misses += 1;
                                    }
                                }
                                Op::Update => conn.write(&key, value)?,
                                Op::Insert => {
                                    conn.write(&key, value)?;
                                    // "latest" reads reach it from now on.
                                    counter.acknowledged.fetch_add(1, Ordering::Relaxed);
                                }
                                Op::ReadModifyWrite => {
                                    if !conn.read(&key)? {
                                        out.read_misses += 1;
                                    }
                                    conn.write(&key, value)?;
                                }
                            }
                            let nanos = started.elapsed().as_nanos() as u64;
                            out.by_op[op as usize].record(nanos);
                            done += 1;
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("ycsb thread panicked"))
                .collect::<BenchResult<Vec<ThreadResult>>>()
        })?;
        let seconds = started.elapsed().as_secs_f64();
        if warm_up {
            return Ok(());
        }
        let (hits_after, reads_after) = self.near_stats();
        self.near_hits += hits_after - hits_before;
        self.near_reads += reads_after - reads_before;
        self.seconds += seconds;
        for r in &results {
            for (all, one) in self.by_op.iter_mut().zip(&r.by_op) {
                all.merge(one);
            }
            self.read_misses += r.read_misses;
        }
        Ok(())
    }

    fn finish(self) -> Cell {
        let operations: u64 = self.by_op.iter().map(Histogram::count).sum();
        let latencies = OPS
            .iter()
            .zip(&self.by_op)
            .filter_map(|(op, h)| {
                Some(OpFigures {
                    operation: op.name(),
                    count: h.count(),
                    p50_us: h.quantile_us(0.5)?,
                    p99_us: h.quantile_us(0.99)?,
                })
            })
            .collect();
        Cell {
            workload: self.workload.letter(),
            system: self.system.name(),
            threads: self.conns.len(),
            operations,
            seconds: self.seconds,
            ops_per_sec: operations as f64 / self.seconds.max(1e-9),
            latencies,
            read_misses: self.read_misses,
            near_hit_rate: (self.system == System::PgcacheNear && self.near_reads > 0)
                .then(|| self.near_hits as f64 / self.near_reads as f64),
        }
    }
}

/// Runs one workload at one thread count on every system: each warmed up, then
/// the systems in turn, [`SLICES`] times, for `--duration` in all each.
fn run_cells<'a>(
    stores: &'a Stores,
    systems: &[System],
    counters: &'a [InsertCounter],
    workload: Workload,
    threads: usize,
    args: &YcsbArgs,
) -> BenchResult<Vec<Cell>> {
    let duration = Duration::from_secs_f64(args.duration.max(0.01));
    let warmup = Duration::from_secs_f64(args.warmup.max(0.0)).min(duration / 5);
    let slice = duration / SLICES;
    let limit = args
        .operations
        .map(|n| n.div_ceil(threads as u64 * u64::from(SLICES)));
    let mut runs: Vec<CellRun<'a>> = systems
        .iter()
        .zip(counters)
        .map(|(&system, counter)| CellRun::new(stores, system, workload, threads, counter))
        .collect::<BenchResult<_>>()?;
    if !warmup.is_zero() {
        for run in &mut runs {
            run.run(warmup, None, true)?;
        }
    }
    for _ in 0..SLICES {
        for run in &mut runs {
            run.run(slice, limit, false)?;
        }
    }
    Ok(runs.into_iter().map(CellRun::finish).collect())
}

/// Deletes the run's keys from Redis: the loaded records and its inserts.
fn clear_redis(stores: &Stores, systems: &[System], counters: &[InsertCounter]) -> BenchResult<()> {
    let Some(i) = systems.iter().position(|&s| s == System::Redis) else {
        return Ok(());
    };
    let Some(client) = &stores.redis else {
        return Ok(());
    };
    let mut conn = client.get_connection()?;
    let end = counters[i].next.load(Ordering::Relaxed);
    let numbers: Vec<u64> = (0..end).collect();
    for chunk in numbers.chunks(1000) {
        let keys: Vec<String> = chunk
            .iter()
            .map(|&n| stores.key(System::Redis, n))
            .collect();
        redis::cmd("DEL").arg(keys).exec(&mut conn)?;
    }
    Ok(())
}

/// The cells as a table, each line shown as soon as measured: on stdout, or on
/// stderr when stdout is the JSON document.
struct Table {
    stdout: bool,
    stderr: bool,
    header_shown: bool,
}

impl Table {
    fn new(stdout: bool, stderr: bool) -> Self {
        Table {
            stdout,
            stderr,
            header_shown: false,
        }
    }

    fn show(&mut self, cell: &Cell) {
        let mut lines = Vec::new();
        if !self.header_shown {
            self.header_shown = true;
            lines.push(format!(
                "\n{:<2} {:>3} {:<13} | {:>10} | {:>8} {:>8} | {:<6} {:>8} {:>8} | {:>6}",
                "wl",
                "thr",
                "system",
                "ops/s",
                "read p50",
                "read p99",
                "other",
                "p50 us",
                "p99 us",
                "near"
            ));
            lines.push("-".repeat(96));
        }
        let read = cell.latencies.iter().find(|l| l.operation == "read");
        let other = cell.latencies.iter().find(|l| l.operation != "read");
        let us = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        lines.push(format!(
            "{:<2} {:>3} {:<13} | {:>10.0} | {:>8} {:>8} | {:<6} {:>8} {:>8} | {:>6}",
            cell.workload,
            cell.threads,
            cell.system,
            cell.ops_per_sec,
            us(read.map(|l| l.p50_us)),
            us(read.map(|l| l.p99_us)),
            other.map_or("-", |l| l.operation),
            us(other.map(|l| l.p50_us)),
            us(other.map(|l| l.p99_us)),
            cell.near_hit_rate
                .map_or("-".to_owned(), |h| format!("{:.1}%", h * 100.0)),
        ));
        for line in lines {
            if self.stdout {
                println!("{line}");
            } else if self.stderr {
                eprintln!("{line}");
            }
        }
    }
}

/// The targets of the performance issue, judged on this run.
fn targets(cells: &[Cell], relaxed: bool) -> Vec<String> {
    let find = |w: char, s: System, t: usize| {
        cells
            .iter()
            .find(|c| c.workload == w && c.system == s.name() && c.threads == t)
            .map(|c| c.ops_per_sec)
    };
    let mut lines = Vec::new();
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    for w in ['C', 'B'] {
        if let (Some(near), Some(redis)) =
            (find(w, System::PgcacheNear, 4), find(w, System::Redis, 4))
        {
            let r = near / redis;
            lines.push(format!(
                "{w}, 4 threads: pgcache+near / redis throughput {r:.2} (target >= 10) {}",
                verdict(r >= 10.0)
            ));
        }
    }
    let mut threads: Vec<usize> = cells.iter().map(|c| c.threads).collect();
    threads.sort_unstable();
    threads.dedup();
    let mut workloads: Vec<char> = cells.iter().map(|c| c.workload).collect();
    workloads.dedup();
    for &w in &workloads {
        for &t in &threads {
            if let (Some(p), Some(raw)) = (find(w, System::Pgcache, t), find(w, System::RawSql, t))
            {
                let r = raw / p;
                lines.push(format!(
                    "{w}, {t} threads: raw-sql / pgcache throughput {r:.2} (target <= 1.25) {}",
                    verdict(r <= 1.25)
                ));
            }
        }
    }
    for s in [System::Pgcache, System::PgcacheNear] {
        if let (Some(p), Some(redis)) = (find('A', s, 4), find('A', System::Redis, 4)) {
            let r = p / redis;
            let durability = if relaxed {
                "relaxed"
            } else {
                "full (the target is for relaxed)"
            };
            lines.push(format!(
                "A, 4 threads, {durability}: {} / redis throughput {r:.2} (target >= 0.5) {}",
                s.name(),
                verdict(r >= 0.5)
            ));
        }
    }
    lines
}

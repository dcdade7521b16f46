//! A frozen server, or a network path that swallows traffic, cannot enforce
//! `statement_timeout`: pgcache cuts the statement itself, `statement_timeout` + 1 s
//! after it was sent, and recovers once the server answers again. Statements that
//! are answered in time, however many and however long the operation, are never cut.

mod common;
mod scratch;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::TestDb;
use diesel::sql_types::Integer;
use diesel::RunQueryDsl;
use pgcache::{Cache, CacheManager, Error};
use serde_json::json;

/// What the watchdog adds to `statement_timeout` before it cuts a statement.
const MARGIN: Duration = Duration::from_secs(1);

/// Scheduling and teardown slack on a busy machine.
const SLACK: Duration = Duration::from_millis(700);

/// Long enough to tell a bounded wait from a hang, short enough for a test.
const HANG: Duration = Duration::from_secs(6);

/// The backend serving the pool's connection (the pool holds one), to tell whether
/// that connection was replaced.
fn backend_pid(cache: &CacheManager) -> i32 {
    #[derive(diesel::QueryableByName)]
    struct Pid {
        #[diesel(sql_type = Integer)]
        pid: i32,
    }
    diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Pid>(&mut *cache.connection().unwrap())
        .unwrap()
        .pid
}

/// Runs `undo` after `after` unless the returned flag is set first: a test that
/// would otherwise hang for ever fails on its timing assertion instead.
fn undo_after(after: Duration, undo: impl FnOnce() + Send + 'static) -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let done_ = Arc::clone(&done);
    thread::spawn(move || {
        thread::sleep(after);
        if !done_.load(Ordering::SeqCst) {
            undo();
        }
    });
    done
}

/// Asserts `result` is the watchdog's cut of a `limit` wait, `elapsed` after the
/// operation started.
fn assert_cut<T: std::fmt::Debug>(
    what: &str,
    result: pgcache::Result<T>,
    elapsed: Duration,
    limit: Duration,
) {
    let error = result.expect_err(what);
    assert!(
        matches!(error, Error::Unresponsive { waited_ms } if u128::from(waited_ms) == limit.as_millis()),
        "{what}: {error}"
    );
    assert!(error.is_transient(), "{what}: {error}");
    assert!(
        elapsed >= limit - Duration::from_millis(20) && elapsed <= limit + SLACK,
        "{what} failed after {elapsed:?}, expected {limit:?}"
    );
}

#[test]
fn an_operation_on_a_frozen_server_fails_within_the_statement_timeout_plus_margin() {
    let cluster = scratch::ScratchCluster::start();
    let statement_timeout = Duration::from_millis(500);
    let db = TestDb::with(|b| {
        b.database_url(cluster.url())
            .statement_timeout(statement_timeout)
            .pool_max_size(2)
            // Both connections open, so that each operation below holds one when the
            // server freezes.
            .pool_min_idle(2)
    });
    let kv = db.cache.kv();
    kv.set("k", &json!(1)).unwrap();
    // The same tables over the Unix-domain socket.
    let local = CacheManager::new(
        db.config()
            .database_url(format!(
                "postgres:///postgres?host=/var/run/postgresql&port={}&user=postgres",
                cluster.port
            ))
            .statement_timeout(statement_timeout)
            .pool_max_size(1)
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(local.kv().get("k").unwrap(), Some(json!(1)));
    let limit = statement_timeout + MARGIN;

    let pids = cluster.freeze();
    let thaw_pids = pids.clone();
    let port = cluster.port;
    let done = undo_after(HANG, move || {
        // Mirrors ScratchCluster::thaw, which cannot move into this thread.
        let _ = std::process::Command::new("kill")
            .arg("-CONT")
            .args(&thaw_pids)
            .status();
        eprintln!("thawed the cluster on port {port}: the operations hung");
    });
    let started = Instant::now();
    let (get, set, local_get) = thread::scope(|s| {
        let get = s.spawn(|| (kv.get("k"), started.elapsed()));
        let set = s.spawn(|| (kv.set("k", &json!(2)), started.elapsed()));
        let local_get = s.spawn(|| (local.kv().get("k"), started.elapsed()));
        (
            get.join().unwrap(),
            set.join().unwrap(),
            local_get.join().unwrap(),
        )
    });
    done.store(true, Ordering::SeqCst);
    cluster.thaw(&pids);
    eprintln!(
        "frozen server: get failed after {:?}, set after {:?}, get over the Unix socket after {:?}",
        get.1, set.1, local_get.1
    );
    assert_cut("get", get.0, get.1, limit);
    assert_cut("set", set.0, set.1, limit);
    assert_cut("get over the Unix socket", local_get.0, local_get.1, limit);

    // Both cut connections were discarded: the pool's two connections are fresh
    // and answer.
    let (mut a, mut b) = (
        db.cache.connection().unwrap(),
        db.cache.connection().unwrap(),
    );
    use diesel::connection::SimpleConnection;
    a.batch_execute("SELECT 1").unwrap();
    b.batch_execute("SELECT 1").unwrap();
    drop((a, b));
    kv.set("k", &json!(3)).unwrap();
    assert_eq!(kv.get("k").unwrap(), Some(json!(3)));
    assert_eq!(local.kv().get("k").unwrap(), Some(json!(3)));
}

/// A TCP proxy that can stop forwarding in both directions, leaving both
/// connections open: to each side the other one stops answering, although every
/// packet is still acknowledged.
struct Proxy {
    addr: SocketAddr,
    paused: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let paused = Arc::new(AtomicBool::new(false));
        let paused_ = Arc::clone(&paused);
        thread::spawn(move || {
            for client in listener.incoming() {
                let (Ok(client), Ok(server)) = (client, TcpStream::connect(upstream)) else {
                    continue;
                };
                let (client_, server_) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                forward(client, server_, Arc::clone(&paused_));
                forward(server, client_, Arc::clone(&paused_));
            }
        });
        Proxy { addr, paused }
    }

    fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }
}

fn forward(mut from: TcpStream, mut to: TcpStream, paused: Arc<AtomicBool>) {
    thread::spawn(move || {
        from.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let mut buf = [0; 16 * 1024];
        loop {
            if paused.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// The test database's URL with host and port replaced by `proxy`, and the server
/// address it names.
fn through_proxy() -> (String, SocketAddr) {
    let mut url = url::Url::parse(&common::database_url()).unwrap();
    let host = url.host_str().unwrap().to_owned();
    let port = url.port().unwrap_or(5432);
    let server = (host.as_str(), port)
        .to_socket_addrs()
        .unwrap()
        .find(|addr| TcpStream::connect(addr).is_ok())
        .expect("the test database is reachable over TCP");
    url.set_host(Some("127.0.0.1")).unwrap();
    (url.to_string(), server)
}

#[test]
fn a_black_holed_connection_fails_within_the_bound() {
    let (url, server) = through_proxy();
    let proxy = Proxy::start(server);
    let mut proxied = url::Url::parse(&url).unwrap();
    proxied.set_port(Some(proxy.addr.port())).unwrap();
    let statement_timeout = Duration::from_millis(300);
    let db = TestDb::with(|b| {
        b.database_url(proxied.as_str())
            .statement_timeout(statement_timeout)
            .pool_max_size(2)
    });
    let kv = db.cache.kv();
    kv.set("k", &json!(1)).unwrap();
    let limit = statement_timeout + MARGIN;

    proxy.pause(true);
    let paused = Arc::clone(&proxy.paused);
    let done = undo_after(HANG, move || paused.store(false, Ordering::SeqCst));
    let started = Instant::now();
    let result = kv.get("k");
    let elapsed = started.elapsed();
    done.store(true, Ordering::SeqCst);
    proxy.pause(false);
    eprintln!("black hole: get failed after {elapsed:?}");
    assert_cut("get", result, elapsed, limit);

    // Forwarding again: the cut connection was discarded, the next ones work.
    assert_eq!(kv.get("k").unwrap(), Some(json!(1)));
    kv.set("k", &json!(2)).unwrap();
    assert_eq!(kv.get("k").unwrap(), Some(json!(2)));
}

#[test]
fn a_cleanup_of_many_slow_batches_is_not_cut() {
    let statement_timeout = Duration::from_millis(400);
    let db = TestDb::with(|b| b.statement_timeout(statement_timeout).pool_max_size(1));
    // Every delete takes 150 ms, well within the statement timeout; 12 full batches
    // and the last, empty one take longer than the watchdog's limit in total.
    db.exec(
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(0.15); RETURN NULL; END $$; \
         CREATE TRIGGER slow_deletes BEFORE DELETE ON cache_entries \
         FOR EACH STATEMENT EXECUTE FUNCTION slow(); \
         INSERT INTO cache_entries (key, value, expires_at) \
         SELECT 'k' || g, '1', now() - interval '1 minute' FROM generate_series(1, 60000) g",
    );
    let pid = backend_pid(&db.cache);

    let started = Instant::now();
    let report = db.cache.cleanup().unwrap();
    let elapsed = started.elapsed();

    assert_eq!(report.rows_removed(), 60_000);
    assert!(
        elapsed > statement_timeout + MARGIN,
        "the cleanup took only {elapsed:?}: the test proves nothing"
    );
    assert_eq!(backend_pid(&db.cache), pid, "the connection was replaced");
}

#[test]
fn a_busy_connection_whose_statements_are_answered_is_never_cut() {
    let statement_timeout = Duration::from_millis(200);
    let db = TestDb::with(|b| b.statement_timeout(statement_timeout).pool_max_size(1));
    let kv = db.cache.kv();
    let pid = backend_pid(&db.cache);

    // Operations back to back on the pool's one connection, for longer than the
    // watchdog's limit.
    let started = Instant::now();
    let mut operations = 0;
    while started.elapsed() < (statement_timeout + MARGIN) * 2 {
        let key = format!("k{}", operations % 50);
        kv.set(&key, &json!(operations)).unwrap();
        assert_eq!(kv.get(&key).unwrap(), Some(json!(operations)));
        kv.get_many(&["k1", "k2", "k3"]).unwrap();
        operations += 1;
    }

    assert!(operations > 10);
    assert_eq!(backend_pid(&db.cache), pid, "the connection was replaced");
}

/// Checks out `n` connections at once, so the pool holds `n` idle ones afterwards.
fn fill_pool(cache: &CacheManager, n: usize) {
    let held: Vec<_> = (0..n).map(|_| cache.connection().unwrap()).collect();
    drop(held);
}

/// Thaws `pids` as [`scratch::ScratchCluster::thaw`] does, ignoring processes that
/// have exited (the backends of connections closed meanwhile).
fn thaw(pids: &[String]) {
    let _ = std::process::Command::new("kill")
        .arg("-CONT")
        .args(pids)
        .status();
}

/// Thaws `pids` after `after`, unless the returned flag is set first.
fn thaw_after(after: Duration, pids: &[String]) -> Arc<AtomicBool> {
    let pids = pids.to_vec();
    undo_after(after, move || thaw(&pids))
}

#[test]
fn a_frozen_server_delays_each_call_by_the_documented_bound_whatever_the_pool_size() {
    let cluster = scratch::ScratchCluster::start();
    let statement_timeout = Duration::from_secs(1);
    let connection_timeout = Duration::from_secs(2);
    let pool = 20;
    let settings = |b: pgcache::CacheConfigBuilder| {
        b.database_url(cluster.url())
            .statement_timeout(statement_timeout)
            .pool_connection_timeout(connection_timeout)
            .pool_max_size(pool)
    };
    let db = TestDb::with(settings);
    let lenient =
        CacheManager::new(settings(db.config()).fail_open(true).build().unwrap()).unwrap();
    let kv = db.cache.kv();
    kv.set("k", &json!(1)).unwrap();
    // Every connection open and idle in the pool when the server freezes.
    fill_pool(&db.cache, pool as usize);
    fill_pool(&lenient, pool as usize);
    // The documented bound for one call (docs/operations.md), and room for a busy machine.
    let bound = connection_timeout + statement_timeout + MARGIN;
    let allowed = bound + bound / 4;

    let pids = cluster.freeze();
    // Each call: how long it took, and whether it failed (or missed, failing open)
    // as it should.
    let mut timings = Vec::new();
    let mut time = |what: &'static str, call: &dyn Fn() -> bool| {
        let done = thaw_after(allowed * 3, &pids);
        let started = Instant::now();
        let expected = call();
        timings.push((what, started.elapsed(), expected));
        done.store(true, Ordering::SeqCst);
    };
    // Twice: the first get meets a connection nothing was suspected of; after its
    // statement was cut, every pooled connection is suspect and probed.
    for _ in 0..2 {
        time("get", &|| kv.get("k").is_err());
        time("stats", &|| db.cache.stats().is_err());
        time("fail-open get", &|| {
            lenient.kv().get("k").is_ok_and(|v| v.is_none())
        });
        time("fail-open stats", &|| lenient.stats().is_err());
    }
    thaw(&pids);
    eprintln!("pool of {pool}, frozen server: {timings:?}");
    for (what, took, expected) in &timings {
        assert!(
            *took <= allowed,
            "{what} took {took:?}; the bound is {bound:?}"
        );
        assert!(expected, "{what} did not fail (or miss, failing open)");
    }
    // Thawed: the cache serves again.
    let started = Instant::now();
    while kv.get("k").ok() != Some(Some(json!(1))) {
        assert!(started.elapsed() < bound * 2, "not served after the thaw");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until a statement of `application_name` waits for a lock on the server.
fn wait_for_lock_wait(watcher: &mut diesel::PgConnection, application_name: &str) {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let started = Instant::now();
    loop {
        let waiting = diesel::sql_query(
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE application_name = $1 AND wait_event_type = 'Lock'",
        )
        .bind::<diesel::sql_types::Text, _>(application_name)
        .get_result::<N>(watcher)
        .unwrap()
        .n;
        if waiting > 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the call never waited for the lock"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn stats_and_health_are_cut_when_the_server_freezes_during_the_call() {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    let cluster = scratch::ScratchCluster::start();
    // Long enough that the server's own timeout cannot fire before the freeze.
    let statement_timeout = Duration::from_secs(2);
    let db = TestDb::with(|b| {
        b.database_url(cluster.url())
            .statement_timeout(statement_timeout)
            .pool_max_size(2)
    });
    db.cache.kv().set("k", &json!(1)).unwrap();
    let limit = statement_timeout + MARGIN;
    let application_name = format!("pgcache-test-{}", db.schema);
    let mut locker = diesel::PgConnection::establish(&cluster.url()).unwrap();
    locker
        .batch_execute(&format!("SET search_path TO \"{}\"", db.schema))
        .unwrap();
    let mut watcher = diesel::PgConnection::establish(&cluster.url()).unwrap();
    type Call<'a> = Box<dyn Fn() -> pgcache::Result<()> + Send + Sync + 'a>;
    let calls: [(&str, &str, Call); 2] = [
        (
            "stats",
            "cache_entries",
            Box::new(|| db.cache.stats().map(drop)),
        ),
        (
            "health",
            "cache_cleanup_runs",
            Box::new(|| db.cache.health(&Default::default()).map(drop)),
        ),
    ];
    for (what, table, call) in calls {
        db.cache.flush_stats().unwrap();
        // The call's statement on `table` waits for this lock: in flight when the
        // server freezes.
        locker
            .batch_execute(&format!(
                "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
            ))
            .unwrap();
        let (result, after_freeze, pids) = thread::scope(|s| {
            let running = s.spawn(&call);
            wait_for_lock_wait(&mut watcher, &application_name);
            let pids = cluster.freeze();
            let frozen = Instant::now();
            let done = thaw_after(limit * 3, &pids);
            let result = running.join().unwrap();
            done.store(true, Ordering::SeqCst);
            (result, frozen.elapsed(), pids)
        });
        cluster.thaw(&pids);
        locker.batch_execute("ROLLBACK").unwrap();
        eprintln!("{what}: frozen mid-call, returned {after_freeze:?} after the freeze");
        let error = result.expect_err(what);
        assert!(
            matches!(error, Error::Unresponsive { .. }),
            "{what}: the database is reported unresponsive: {error}"
        );
        assert!(
            after_freeze <= limit + SLACK,
            "{what} returned {after_freeze:?} after the freeze; its statement was sent before, \
             so it is cut within {limit:?}"
        );
    }
}

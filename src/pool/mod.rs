//! The r2d2 pool, the settings every cache connection starts with, and surviving
//! connections lost under the pool (killed backends, server restart, network cut)
//! without restarting the process.
//!
//! r2d2 discards a connection when Diesel reports it broken, but Diesel only notices
//! a dead socket when a statement it *executes* fails: when *preparing* a query
//! fails (the first use of each query on a connection), the connection is not
//! marked, r2d2 takes it back, and it fails again for the next caller, forever if
//! calls come more often than the idle timeout. So after any statement failed on a
//! pooled connection (seen by an instrumentation installed on every one, whoever ran
//! the statement: a cache operation or your own transaction on
//! `cache.connection()`), the next `max_size` checkouts are probed through the path
//! Diesel does watch ([`probe`]): the connections that died at the same moment
//! (server restart, killed backends) are marked and discarded before an operation
//! meets them. A cache operation whose connection turns out dead is run once more on
//! one that has just answered. A `SELECT 1` before every checkout would double the
//! cost of a get, so while nothing fails, nothing is probed. Every cache operation
//! is idempotent (a read, an upsert or a delete), so the retry cannot apply anything
//! twice. A statement PostgreSQL aborted to break a deadlock, or for a serialization
//! failure, is likewise retried once.
//!
//! A call has one deadline for all its waits for a connection (each connection it
//! probes, its retry), and a probe the server leaves unanswered (a frozen server,
//! cut by the watchdog) fails the call: so one call waits at most the connection
//! timeout plus one statement limit, whatever the pool's size. Suspect connections,
//! probes, failed connection attempts and the database known to be down (with its
//! prober) are in [`health`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::{InstrumentationEvent, SimpleConnection};
use diesel::pg::PgConnection;
use diesel::r2d2::{self, ConnectionManager, CustomizeConnection};
use diesel::{Connection, ConnectionError};

use crate::affinity::{Held, Parking, PARK_FOR};
use crate::config::{CacheConfig, Durability};
use crate::conninfo::{client_timeouts, with_defaults};
use crate::error::{Error, Result};
use crate::watchdog::{no_answer_limit, watched, Watchdog};

mod health;
mod plain;
mod status;

pub(crate) use plain::Plain;
use status::Waiters;
pub use status::{PoolSource, PoolStatus};

use health::{probe, Attempt, ConnectFailures, FailureLog, Observer, Outage, Probe, Suspicion};

/// An r2d2 pool of Diesel PostgreSQL connections: what an application that already
/// has one passes to [`CacheManager::with_pool`](crate::CacheManager::with_pool).
pub type ConnectionPool = r2d2::Pool<ConnectionManager<PgConnection>>;

/// A connection checked out of the cache's pool; derefs to `PgConnection`.
pub type PooledConnection = r2d2::PooledConnection<ConnectionManager<PgConnection>>;

/// Runs once per new connection: search path, statement timeout, application name
/// and durability, so no cache operation pays for them again; in
/// transaction-pooler mode, only Diesel's statement cache turned off (see
/// [`session_sql`]).
#[derive(Debug)]
struct SessionSetup {
    sql: String,
    /// Transaction-pooler mode: no statement cache (see [`unprepared`]).
    sessionless: bool,
    observer: Observer,
    /// Dropped with the pool (and the prober), which stops its thread.
    watchdog: Option<Watchdog>,
}

impl CustomizeConnection<PgConnection, r2d2::Error> for SessionSetup {
    fn on_acquire(&self, conn: &mut PgConnection) -> std::result::Result<(), r2d2::Error> {
        match &self.watchdog {
            Some(watchdog) => watchdog.watch(conn, Box::new(self.observer.clone())),
            None => conn.set_instrumentation(self.observer.clone()),
        }
        if self.sessionless {
            unprepared(conn);
            return Ok(());
        }
        watched(conn, |conn| Ok(conn.batch_execute(&self.sql)?)).map_err(|error| match error {
            Error::Database(error) => r2d2::Error::QueryError(error),
            other => {
                r2d2::Error::ConnectionError(ConnectionError::BadConnection(other.to_string()))
            }
        })
    }
}

/// Turns Diesel's prepared-statement cache off on `conn`, for a connection through
/// a transaction pooler: a named statement prepared on one server connection would
/// be executed later on whichever the pooler hands out next ("prepared statement
/// ... does not exist", or "already exists" on one another client prepared it on).
/// Without the cache Diesel sends each statement unnamed, its parse, bind and
/// execute in one message sequence ending in one `Sync` (libpq's
/// `PQsendQueryParams`), which a pooler in transaction mode never splits across
/// server connections; inside a transaction the server connection is pinned anyway.
pub(crate) fn unprepared(conn: &mut PgConnection) {
    conn.set_prepared_statement_cache_size(diesel::connection::CacheSize::Disabled);
}

pub(crate) use crate::tables::quote_ident;

/// Quotes an SQL string literal; only for `SET`, which takes no bind parameters.
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The session a cache connection starts with. In transaction-pooler mode none at
/// all: the server connection under it is shared with other clients, which would
/// inherit every setting (and a setting made on one server connection is missing
/// on the next). There `statement_timeout` is not set (the watchdog still cuts a
/// statement left unanswered, client-side; operations allowed longer set their
/// own with `SET LOCAL`), nor `plan_cache_mode` (no statement outlives one
/// execution, so there is no cached plan to choose), `application_name` is in the
/// connection string (PgBouncer passes it on to the server connection, see
/// [`conninfo`]), the search path is not needed (statements name the cache's
/// schema), relaxed durability is refused by the configuration, and changes are
/// not stamped ([`crate::migrations::stamps_changes`]: the update triggers log
/// them).
pub(crate) fn session_sql(config: &CacheConfig) -> String {
    if config.sessionless() {
        return String::new();
    }
    // Generic plans always: every statement the cache prepares looks rows up by key,
    // and on hash-partitioned tables PostgreSQL's default would re-plan each
    // execution (a generic plan costed over every partition never wins), when the
    // generic plan prunes to one partition as it starts.
    let mut sql = format!(
        "SET statement_timeout = {}; SET application_name = {}; \
         SET plan_cache_mode = force_generic_plan;",
        config.statement_timeout().as_millis(),
        quote_literal(config.application_name())
    );
    // The cache's schema first, then the server's default path (the role's or
    // database's, `"$user", public` by default): pgcache's own statements name
    // their tables with the schema, and a caller's statements on
    // `cache.connection()` find the application's tables as on any connection.
    let schema = quote_literal(&quote_ident(config.schema()));
    sql.push_str(&format!(
        " SELECT set_config('search_path', CASE current_setting('search_path') \
           WHEN '' THEN {schema} ELSE {schema} || ', ' || current_setting('search_path') END, \
           false);"
    ));
    if config.durability() == Durability::Relaxed {
        sql.push_str(" SET synchronous_commit = off;");
    }
    if crate::migrations::stamps_changes(config) {
        sql.push_str(&format!(
            " SET {} = 'on';",
            crate::migrations::STAMPING_SETTING
        ));
    }
    sql
}

/// The connection string of `config`'s connections: its URL with pgcache's
/// client-side timeouts and, in transaction-pooler mode, its `application_name`
/// (where a session `SET` would outlive the cache's use of the server connection,
/// a start-up parameter is one a pooler tracks per client), unless the URL sets
/// them.
fn conninfo(config: &CacheConfig) -> String {
    let mut params = client_timeouts(config.pool().connection_timeout, no_answer_limit(config));
    if config.sessionless() {
        params.push(("application_name", config.application_name().to_owned()));
    }
    with_defaults(config.database_url().expose(), &params)
}

/// A connection of its own (outside the pool) with the pool's connection settings
/// and session: for the near caches' poller, which holds it for good, and for the
/// outage's prober, which tries the database with it. Watched by
/// `watchdog` when there is one, as pooled connections are, so statements run
/// through [`watched`] on it are cut when the server does not answer.
pub(crate) fn dedicated(config: &CacheConfig, watchdog: Option<&Watchdog>) -> Result<PgConnection> {
    let mut conn = establish(config)?;
    if let Some(watchdog) = watchdog {
        watchdog.watch(&mut conn, Box::new(|_: InstrumentationEvent<'_>| {}));
    }
    let sql = match session_sql(config) {
        // No session to set up: still a query, which tests the connection.
        sql if sql.is_empty() => "SELECT 1".to_owned(),
        sql => sql,
    };
    if config.sessionless() {
        unprepared(&mut conn);
    }
    watched(&mut conn, |conn| Ok(conn.batch_execute(&sql)?))?;
    Ok(conn)
}

/// One connection attempt outside the pool, bounded by libpq's connect timeout;
/// its error (scrubbed of the password) is the server's own.
fn establish(config: &CacheConfig) -> Result<PgConnection> {
    PgConnection::establish(&conninfo(config))
        .map_err(|e| Error::connection(&config.database_url().scrub(&e.to_string())))
}

/// How long a checkout waits for a connection between looks at whether an attempt
/// to open one failed.
const FAILURE_CHECK: Duration = Duration::from_millis(20);

/// How often a checkout waiting for a connection attempt in flight looks for an
/// idle connection.
const POLL: Duration = Duration::from_millis(1);

/// The prober's attempt (see [`Outage`]): a connection of its own with the pool's
/// settings, watched like the pool's, its session set-up the query that tests it.
/// Once one answers, every pooled connection from before the outage is suspect.
fn attempt(config: &CacheConfig, watchdog: Option<Watchdog>, suspicion: Suspicion) -> Attempt {
    let config = config.clone();
    Box::new(move || match dedicated(&config, watchdog.as_ref()) {
        Ok(_) => {
            suspicion.raise();
            Ok(())
        }
        Err(Error::Connection(error)) => Err(error.message().to_owned()),
        Err(error) => Err(error.to_string()),
    })
}

/// The cache's connection pool: its own, or the application's.
pub(crate) struct Pool {
    pool: ConnectionPool,
    suspicion: Suspicion,
    failures: Arc<ConnectFailures>,
    outage: Arc<Outage>,
    /// Whether its connections stamp the rows their updates change
    /// (see [`crate::migrations::STAMPING_SETTING`]).
    stamps: bool,
    /// The cache's own pool, or the application's.
    source: PoolSource,
    /// Each thread's last connection, for its next operation (see
    /// [`crate::affinity`]); none on the application's pool, whose connections go
    /// back to it at once.
    parking: Option<Parking>,
    /// The cache's checkouts waiting for a connection, for [`PoolStatus`].
    waiters: Waiters,
}

impl Pool {
    /// Builds the pool; with `check` (not in fail-open mode, not a shard that may be
    /// down), checks that the server answers, so a wrong URL fails at start-up
    /// rather than on the first get.
    pub(crate) fn new(config: &CacheConfig, check: bool) -> Result<Self> {
        let settings = config.pool();
        let suspicion = Suspicion::new(settings.max_size);
        let limit = no_answer_limit(config);
        let manager = ConnectionManager::<PgConnection>::new(conninfo(config));
        if check {
            // One attempt of our own first: a wrong password or an unknown database
            // fails at once with the server's reason, where the pool would retry it
            // for the whole connection timeout and, when the server is slow to
            // answer, report only that it timed out.
            drop(establish(config)?);
        }
        let failures = Arc::new(ConnectFailures::new(config.database_url()));
        let watchdog = Watchdog::start(limit);
        let outage = Outage::new(
            &config.shard_name,
            Some(attempt(config, watchdog.clone(), suspicion.clone())),
        );
        let pool = r2d2::Pool::builder()
            .max_size(settings.max_size)
            .min_idle(Some(settings.min_idle))
            .idle_timeout(Some(settings.idle_timeout))
            .connection_timeout(settings.connection_timeout)
            // See the module docs: probed after failures instead.
            .test_on_check_out(false)
            .connection_customizer(Box::new(SessionSetup {
                sql: session_sql(config),
                sessionless: config.sessionless(),
                observer: Observer {
                    suspicion: suspicion.clone(),
                    outage: Arc::clone(&outage),
                },
                watchdog,
            }))
            .error_handler(Box::new(FailureLog(Arc::clone(&failures))))
            .event_handler(Box::new(FailureLog(Arc::clone(&failures))));
        let pool = if check {
            pool.build(manager).map_err(|e| failures.error(&e))?
        } else {
            // Without waiting for `min_idle` connections a server that is down
            // cannot give.
            pool.build_unchecked(manager)
        };
        let pool = Pool {
            pool,
            suspicion,
            failures,
            outage,
            stamps: crate::migrations::stamps_changes(config),
            source: PoolSource::Own,
            parking: Some(Parking::new(settings.max_size)),
            waiters: Waiters::default(),
        };
        if check {
            drop(pool.checkout()?);
        }
        Ok(pool)
    }

    /// Wraps the application's pool. Its connections keep their settings (statement
    /// timeout, application name, durability, search path: every cache statement
    /// names its table with the cache's schema); `Durability::Relaxed` is the
    /// engine's, per write ([`relaxed`]), never the session's. Unless in fail-open
    /// mode, checks that the server answers.
    ///
    /// # Errors
    /// [`Error::Connection`] when no
    /// connection is free within the pool's timeout.
    pub(crate) fn shared(pool: ConnectionPool, config: &CacheConfig) -> Result<Self> {
        let pool = Pool {
            suspicion: Suspicion::new(pool.max_size()),
            pool,
            // The application's pool reports no failed attempts to us: no outage
            // is ever seen, every checkout waits as the application's own do.
            failures: Arc::new(ConnectFailures::new(config.database_url())),
            outage: Outage::new(&config.shard_name, None),
            stamps: false,
            source: PoolSource::Application,
            parking: None,
            waiters: Waiters::default(),
        };
        if !config.fail_open() {
            drop(pool.for_caller()?);
        }
        Ok(pool)
    }

    /// Checks a connection out, waiting at most the connection timeout, and less
    /// when an attempt to open one fails meanwhile while the pool holds none that
    /// could come back: the server is down or refuses us, and the rest of the
    /// timeout would only delay that answer (r2d2 itself retries a refused
    /// connection until the timeout ends). So the wait goes in slices of
    /// [`FAILURE_CHECK`], with a look at the failed attempts after each. A pool with
    /// connections out waits on: one refused attempt (a server at its connection
    /// limit) says nothing of those. `deadline` is the call's (see
    /// [`checkout_by`](Self::checkout_by)): past it, only a connection at hand is taken.
    fn get(&self, deadline: Instant) -> Result<Held<'_>> {
        if let Some(error) = self.outage.fail_fast() {
            return Err(error);
        }
        let parking = self.parking.as_ref();
        let held = |conn| Ok(Held::new(conn, parking));
        // This thread's own connection first, then an idle one, then another
        // thread's parked one: only then wait (see `affinity`).
        if let Some(conn) = parking.and_then(Parking::take_own) {
            return held(conn);
        }
        if let Some(conn) = self.pool.try_get() {
            return held(conn);
        }
        let _waiting = (parking.map(Parking::wait), self.waiters.enter());
        let failed_before = self.failures.count();
        let mut asked = None;
        loop {
            if let Some(conn) = parking.and_then(Parking::steal) {
                return held(conn);
            }
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(FAILURE_CHECK);
            // r2d2 starts an attempt to connect on every call that finds nothing
            // idle and room in the pool, however many its earlier calls started:
            // asked every slice, a connection slower to open than a slice would
            // open several. So r2d2 is asked again only once something changed since
            // the last time (an attempt opened a connection, perhaps taken by another
            // checkout; a connection closed) or when the pool is full (nothing to
            // start); meanwhile the checkout waits for the attempt in flight.
            let now = (self.failures.opened(), self.pool.state().connections);
            let got = if asked != Some(now) || now.1 >= self.pool.max_size() {
                asked = Some(now);
                self.pool.get_timeout(slice).map_err(Some)
            } else {
                self.poll(slice).ok_or(None)
            };
            match got {
                Ok(conn) => return held(conn),
                Err(error) => {
                    // The database is down when the last attempt to connect failed
                    // and no pooled connection is out that could come back.
                    let down = self
                        .failures
                        .last()
                        .filter(|_| self.pool.state().connections == 0);
                    // A failed connection attempt, not a pool that was merely busy
                    // (an attempt that failed before this checkout began, with none
                    // since, tells nothing of the server now: wait on).
                    let give_up = down.is_some() && self.failures.count() != failed_before;
                    if give_up || Instant::now() >= deadline {
                        let error = match &error {
                            Some(error) => self.failures.error(error),
                            None => self.failures.timed_out(),
                        };
                        if let Some(cause) = down {
                            self.outage.open(cause);
                        }
                        return Err(error);
                    }
                }
            }
        }
    }

    /// An idle connection taken within `slice`, looked for every [`POLL`], without
    /// having r2d2 start an attempt to connect (see [`get`](Self::get)).
    fn poll(&self, slice: Duration) -> Option<PooledConnection> {
        let end = Instant::now() + slice;
        loop {
            if let Some(conn) = self.pool.try_get() {
                return Some(conn);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            std::thread::sleep(left.min(POLL));
        }
    }

    /// Gives back to the pool the connections parked unused for [`PARK_FOR`], so
    /// that the pool's idle timeout applies to them.
    pub(crate) fn release_parked(&self) {
        if let Some(parking) = &self.parking {
            parking.sweep(PARK_FOR);
        }
    }

    /// The pool's current state (for `Debug`).
    pub(crate) fn state(&self) -> r2d2::State {
        self.pool.state()
    }

    /// What the pool holds now, for [`PoolStatus`]: `shard` names it.
    pub(crate) fn status(&self, shard: &str) -> PoolStatus {
        let state = self.pool.state();
        PoolStatus {
            shard: shard.to_owned(),
            source: self.source,
            max_size: self.pool.max_size(),
            open: state.connections,
            idle: state.idle_connections,
            parked: self.parking.as_ref().map_or(0, Parking::parked),
            waiting: self.waiters.count(),
        }
    }

    /// When a call starting now stops waiting for a connection.
    fn deadline(&self) -> Instant {
        Instant::now() + self.pool.connection_timeout()
    }

    /// A connection not known to be dead: probed first while connections are
    /// suspect (see the module docs).
    pub(crate) fn checkout(&self) -> Result<Held<'_>> {
        self.checkout_by(self.deadline(), false)
    }

    /// A connection not known to be dead, waited for until the call's `deadline`
    /// (one for all the call's checkouts: the wait does not start again for each
    /// connection probed or for a retry); probed first while connections are
    /// suspect, or always with `always`. Dead ones met on the way are discarded.
    /// A probe the server leaves unanswered fails the call with
    /// [`Error::Unresponsive`]: probing the next connection would wait as long, so
    /// a frozen server costs a call one statement limit, whatever the pool's size.
    /// Bounded: the pool holds at most `max_size` dead connections, after which it
    /// opens a fresh one or fails at the deadline.
    fn checkout_by(&self, deadline: Instant, always: bool) -> Result<Held<'_>> {
        for _ in 0..=self.pool.max_size() {
            let mut conn = self.get(deadline)?;
            if !always && !self.suspicion.take() {
                return Ok(conn);
            }
            match probe(&mut conn) {
                Probe::Alive => return Ok(conn),
                Probe::Dead => self.suspicion.raise(),
                Probe::Unresponsive(error) => {
                    self.suspicion.raise();
                    return Err(error);
                }
            }
        }
        Err(Error::Connection(
            "every pooled connection was dead and no new one answered".into(),
        ))
    }

    /// A connection that has just answered a probe, for maintenance work (statistics,
    /// health, cleanup) whose cost dwarfs the extra round trip. Run its statements
    /// under [`watched`].
    pub(crate) fn live(&self) -> Result<PooledConnection> {
        Ok(self.checkout_by(self.deadline(), true)?.into_pooled())
    }

    /// A connection for the caller's own statements.
    pub(crate) fn for_caller(&self) -> Result<PooledConnection> {
        let mut conn = self.checkout()?.into_pooled();
        if self.stamps {
            // The caller's own statements do not stamp their rows: the trigger
            // must see them. (The connection keeps this: the cache's own updates on
            // it then go through the trigger too, logged once all the same.)
            watched(&mut conn, |conn| {
                Ok(conn.batch_execute(&format!("RESET {}", crate::migrations::STAMPING_SETTING))?)
            })?;
        }
        Ok(conn)
    }

    /// Runs `op` on a pooled connection, under the watchdog; once more, on a live
    /// connection, if the first one turned out to be dead or PostgreSQL aborted the
    /// statement to resolve a conflict. A run the watchdog cut
    /// ([`Error::Unresponsive`]) is not retried, nor one whose connection then
    /// left its probe unanswered: that would wait as long again. The retry's
    /// checkout keeps the first one's deadline.
    pub(crate) fn run<T>(&self, op: impl Fn(&mut PgConnection) -> Result<T>) -> Result<T> {
        self.run_from(Instant::now(), op)
    }

    /// [`run`](Self::run) for a caller that read the clock at `started`, just
    /// before: the time to check the connection out (the pool wait metric) is
    /// measured from there, one clock read instead of two.
    pub(crate) fn run_from<T>(
        &self,
        started: Instant,
        op: impl Fn(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        let deadline = started + self.pool.connection_timeout();
        let conn = self.checkout_by(deadline, false);
        crate::metrics::pool_wait(started.elapsed());
        let mut conn = conn?;
        let error = match watched(&mut conn, &op) {
            Ok(done) => return Ok(done),
            Err(error) => error,
        };
        if error.is_database_failure() {
            match probe(&mut conn) {
                Probe::Alive => {}
                Probe::Dead => {
                    drop(conn);
                    self.suspicion.raise();
                    tracing::warn!(%error, "pgcache: connection lost; retrying once on a live connection");
                    return watched(&mut *self.checkout_by(deadline, false)?, &op);
                }
                Probe::Unresponsive(_) => {
                    self.suspicion.raise();
                    return Err(error);
                }
            }
        }
        // PostgreSQL rolled the statement back to break a deadlock (or a
        // serialization conflict): running it again normally succeeds.
        if error.is_retryable_conflict() {
            tracing::debug!(%error, "pgcache: retrying once after a conflict");
            return watched(&mut conn, &op);
        }
        Err(error)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.outage.stop();
    }
}

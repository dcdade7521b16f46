//! Cutting, client side, statements that a frozen or unreachable server never answers.
//!
//! `statement_timeout` is enforced by the server, so it cannot fire when the server
//! is frozen (stopped processes, a paused VM) or when the network path silently
//! swallows traffic (a stalled proxy or NAT). libpq then waits for the answer in
//! `poll()` with no timeout of its own, and TCP keepalives do not help while the
//! peer's kernel still acknowledges every packet. So each pool runs a watchdog
//! thread that cuts a statement still unanswered [`NO_ANSWER_MARGIN`] after its
//! `statement_timeout` would have fired: it shuts the connection's socket down, libpq
//! sees the end of the stream, the statement fails, the connection is discarded and
//! the operation fails with [`Error::Unresponsive`]. Normally the server's own
//! timeout fires first and the watchdog never acts.
//!
//! Which operations: everything run through [`watched`], i.e. every cache operation,
//! cleanup, statistics, health and the hit-counter flushes. The deadline is re-armed at every statement
//! (Diesel's instrumentation events), so an operation of many statements (a cleanup
//! of many batches) is cut only when one statement goes unanswered.
//!
//! Which socket: each connection's own, recorded as the connection is made
//! ([`sockets`]: the one new socket to the configured server between a listing of
//! the process's sockets before and after). A connection whose socket could not be
//! told apart is not watched. This works for TCP and Unix-domain sockets, directly
//! or through proxies and poolers, wherever `/proc/self/fd` is readable (Linux);
//! elsewhere, or with the watchdog turned off ([`CacheConfig::watchdog`]), there is
//! no client-side cut.
//!
//! Why it never cuts anything else: it shuts down only the socket recorded for the
//! connection, only while that connection's operation is still inside [`watched`],
//! and, while it cuts, holds the lock that leaving [`watched`] takes. Nothing but
//! pgcache's own work runs inside [`watched`] (a callback of the caller's, the
//! cleanup's progress, runs in [`outside`]): a statement is overdue only when the
//! server has not answered it.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use diesel::connection::{Instrumentation, InstrumentationEvent, SimpleConnection};
use diesel::pg::PgConnection;
use diesel::Connection;
use scheduled_thread_pool::ScheduledThreadPool;

use crate::config::CacheConfig;
use crate::error::{Error, Result};

mod sockets;

use sockets::{Server, Socket, Sockets};

/// How long past `statement_timeout` a statement may go unanswered before the
/// watchdog cuts it: time for the server's own timeout to fire and its error to
/// arrive, so that the watchdog acts only when the server cannot.
pub(crate) const NO_ANSWER_MARGIN: Duration = Duration::from_secs(1);

/// How soon an overdue connection is looked at again when its thread had not left
/// [`watched`] yet after a cut.
const RECHECK: Duration = Duration::from_millis(50);

/// How many times [`Watchdog::open`] opens a connection whose socket cannot be
/// told apart before it keeps one unwatched.
const OPEN_TRIES: u32 = 3;

/// How often the pool's connector thread lists the process's sockets between
/// connections (see [`Watchdog::relist_on`]).
const RELIST: Duration = Duration::from_secs(1);

thread_local! {
    /// The watch of the connection whose operation this thread runs inside
    /// [`watched`], for [`outside`].
    static CURRENT: std::cell::RefCell<Option<Arc<Watch>>> = const { std::cell::RefCell::new(None) };
    /// A longer limit than the pool's for the statements this thread runs inside
    /// [`extended`]; 0 outside.
    static EXTENDED_MS: Cell<u64> = const { Cell::new(0) };
}

/// Runs `op` with this thread's statements allowed `statement_timeout` +
/// [`NO_ANSWER_MARGIN`] when that is longer than the pool's limit: for an operation
/// that sets a longer `statement_timeout` for itself (`SET LOCAL`), which the server
/// still enforces.
pub(crate) fn extended<T>(statement_timeout: Duration, op: impl FnOnce() -> T) -> T {
    /// Puts the previous limit back, also when `op` panics.
    struct Restore(u64);
    impl Drop for Restore {
        fn drop(&mut self) {
            EXTENDED_MS.with(|ms| ms.set(self.0));
        }
    }
    let limit = statement_timeout.saturating_add(NO_ANSWER_MARGIN);
    let limit = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
    let _restore = Restore(EXTENDED_MS.with(|ms| ms.replace(limit)));
    op()
}

/// How long a statement may go unanswered: `statement_timeout` + [`NO_ANSWER_MARGIN`].
pub(crate) fn no_answer_limit(config: &CacheConfig) -> Duration {
    config.statement_timeout().saturating_add(NO_ANSWER_MARGIN)
}

/// A pool's watchdog, kept by the pool's connection customizer (and its prober): it
/// watches each new connection, and dropping the last clone (with the pool) stops
/// the thread.
#[derive(Debug, Clone)]
pub(crate) struct Watchdog {
    shared: Arc<Shared>,
    /// Nothing is sent; dropping it wakes and ends the thread.
    _stop: Sender<()>,
}

/// What the thread and the pool share: the watches of the pool's connections.
#[derive(Debug)]
struct Shared {
    watches: Mutex<Vec<Weak<Watch>>>,
    epoch: Instant,
    limit_ms: u64,
    /// Where the connections' peer is.
    server: Server,
    /// The process's sockets after the pool's last connection was made (see
    /// [`Watchdog::adopt`]).
    seen: Mutex<Option<Sockets>>,
}

/// One connection's watch, shared by its instrumentation (which owns it, so it lives
/// as long as the connection), [`watched`] and the watchdog thread.
#[derive(Debug)]
struct Watch {
    /// Milliseconds after `epoch` from which the statement in flight counts as
    /// unanswered; 0 while the connection is not inside [`watched`].
    deadline: AtomicU64,
    /// The connection's socket, recorded when it was made.
    socket: Socket,
    /// Whether the watchdog cut the connection. Held by the watchdog while it looks
    /// and cuts, and by [`Watch::disarm`], so no cut happens after disarming.
    cut: Mutex<bool>,
    epoch: Instant,
    limit_ms: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing behind these locks can be left half-updated by a panic.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Watchdog {
    /// Starts the watchdog thread of a pool of `config`'s connections. `None`
    /// when the configuration turns it off, where sockets cannot be listed (see the
    /// module docs) or when the thread cannot start: statements then wait for the
    /// server however long.
    pub(crate) fn start(config: &CacheConfig) -> Option<Self> {
        if !config.watchdog() {
            return None;
        }
        if sockets::list().is_none() {
            tracing::warn!("pgcache: cannot list the process's sockets (no readable /proc/self/fd); statements a frozen server never answers will not be cut");
            return None;
        }
        let shared = Arc::new(Shared {
            watches: Mutex::default(),
            epoch: Instant::now(),
            limit_ms: u64::try_from(no_answer_limit(config).as_millis()).unwrap_or(u64::MAX),
            server: Server::of(config.database_url()),
            seen: Mutex::new(sockets::list()),
        });
        let (stop, stopped) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("pgcache-watchdog".to_owned())
            .spawn(move || run(&thread_shared, &stopped));
        match spawned {
            Ok(_) => Some(Watchdog {
                shared,
                _stop: stop,
            }),
            Err(error) => {
                tracing::error!(%error, "pgcache: cannot start the watchdog thread; statements a frozen server never answers will not be cut");
                None
            }
        }
    }

    /// Watches a pooled connection just made, if its socket is the one new socket
    /// to the server since the pool's previous connection was made (or since the
    /// watchdog started): the pool must open its connections one at a time, on one
    /// thread, and call this as each is made (its connection customizer), so that
    /// the connection's socket is certainly among the new ones. Installs `next`
    /// either way.
    pub(crate) fn adopt(&self, conn: &mut PgConnection, next: Box<dyn Instrumentation>) {
        let now = sockets::list();
        let before = std::mem::replace(&mut *lock(&self.shared.seen), now.clone());
        let socket = match (before, now) {
            (Some(before), Some(now)) => self.shared.server.new_socket(&before, &now),
            _ => None,
        };
        self.install(conn, socket, next);
    }

    /// Has `connector`, the one thread the pool opens its connections on, list the
    /// process's sockets every [`RELIST`] between connections: sockets the
    /// application opens meanwhile are then not new to the next connection made.
    /// Only that thread may list them for [`adopt`](Self::adopt): a listing made
    /// while a connection is being made would count its socket as old.
    pub(crate) fn relist_on(&self, connector: &ScheduledThreadPool) {
        let shared = Arc::downgrade(&self.shared);
        connector.execute_at_fixed_rate(RELIST, RELIST, move || {
            if let Some(shared) = shared.upgrade() {
                *lock(&shared.seen) = sockets::list();
            }
        });
    }

    /// Opens a connection of its own with `open` (on this thread, outside any pool)
    /// and watches it if its socket is the one new socket to the server meanwhile.
    /// A connection whose socket cannot be told apart (another thread connected
    /// to the server at the same moment) is opened again, up to [`OPEN_TRIES`]
    /// times in all: such a connection (the near-cache poller's) is held for long.
    pub(crate) fn open(
        &self,
        open: impl Fn() -> Result<PgConnection>,
        next: Box<dyn Instrumentation>,
    ) -> Result<PgConnection> {
        let mut tries = 1;
        loop {
            let before = sockets::list();
            let mut conn = open()?;
            let socket = before
                .zip(sockets::list())
                .and_then(|(before, after)| self.shared.server.new_socket(&before, &after));
            if socket.is_some() || tries == OPEN_TRIES {
                self.install(&mut conn, socket, next);
                return Ok(conn);
            }
            tries += 1;
        }
    }

    /// Installs the instrumentation that re-arms the connection's deadline at every
    /// statement and passes every event on to `next`; only `next` when the
    /// connection's socket is not known.
    fn install(
        &self,
        conn: &mut PgConnection,
        socket: Option<Socket>,
        next: Box<dyn Instrumentation>,
    ) {
        let Some(socket) = socket else {
            tracing::debug!(
                "pgcache: a new connection's socket could not be told apart; it is not watched"
            );
            conn.set_instrumentation(next);
            return;
        };
        let watch = Arc::new(Watch {
            deadline: AtomicU64::new(0),
            socket,
            cut: Mutex::new(false),
            epoch: self.shared.epoch,
            limit_ms: self.shared.limit_ms,
        });
        lock(&self.shared.watches).push(Arc::downgrade(&watch));
        conn.set_instrumentation(Watched {
            watch,
            next: Some(next),
        });
    }
}

/// The watchdog thread: checks, then sleeps until the next deadline or until the
/// pool is dropped (which disconnects `stopped`).
fn run(shared: &Shared, stopped: &Receiver<()>) {
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(shared.check()) {}
}

impl Shared {
    /// Cuts every connection whose statement is overdue and forgets dropped ones;
    /// returns how long to sleep: until the earliest deadline, at most the limit (a
    /// statement sent after this check is due no sooner).
    fn check(&self) -> Duration {
        let now = millis_since(self.epoch);
        let mut sleep = self.limit_ms;
        lock(&self.watches).retain(|watch| {
            let Some(watch) = watch.upgrade() else {
                return false;
            };
            match watch.deadline.load(Ordering::Acquire) {
                0 => {}
                deadline if deadline > now => sleep = sleep.min(deadline - now),
                deadline => {
                    watch.cut_if_stuck(deadline);
                    sleep = sleep.min(RECHECK.as_millis() as u64);
                }
            }
            true
        });
        Duration::from_millis(sleep.max(1))
    }
}

impl Watch {
    /// The limit for this thread's statements now (see [`extended`]).
    fn limit_ms(&self) -> u64 {
        self.limit_ms.max(EXTENDED_MS.with(Cell::get))
    }

    fn next_deadline(&self) -> u64 {
        // Never 0 (which means unarmed): the limit is at least the margin.
        millis_since(self.epoch).saturating_add(self.limit_ms())
    }

    fn arm(&self) {
        self.deadline.store(self.next_deadline(), Ordering::Release);
    }

    /// A statement started or finished: the next answer is due a full limit from now.
    fn progress(&self) {
        // Only this connection's thread writes the deadline, so load-then-store
        // cannot lose a concurrent update.
        if self.deadline.load(Ordering::Relaxed) != 0 {
            self.deadline.store(self.next_deadline(), Ordering::Release);
        }
    }

    /// Lifts the deadline for a while (see [`outside`]); a cut already made stays.
    fn pause(&self) {
        let _cut = lock(&self.cut);
        self.deadline.store(0, Ordering::Release);
    }

    /// Sets the deadline again after [`pause`](Self::pause).
    fn resume(&self) {
        self.deadline.store(self.next_deadline(), Ordering::Release);
    }

    /// Leaves [`watched`]; whether the watchdog cut the connection meanwhile.
    fn disarm(&self) -> bool {
        let mut cut = lock(&self.cut);
        self.deadline.store(0, Ordering::Relaxed);
        std::mem::take(&mut *cut)
    }

    /// Cuts the connection if the statement that was due at `deadline` is still
    /// unanswered (its operation still inside [`watched`]).
    fn cut_if_stuck(&self, deadline: u64) {
        let mut cut = lock(&self.cut);
        if *cut || self.deadline.load(Ordering::Acquire) != deadline {
            return;
        }
        if sockets::cut(self.socket) {
            *cut = true;
            tracing::warn!(
                limit_ms = self.limit_ms,
                "pgcache: the database has not answered a statement within the limit; closing its connection"
            );
        }
    }
}

/// The instrumentation of a watched connection.
struct Watched {
    watch: Arc<Watch>,
    /// The pool's own instrumentation (which notices failed statements).
    next: Option<Box<dyn Instrumentation>>,
}

impl fmt::Debug for Watched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watched")
            .field("watch", &self.watch)
            .finish_non_exhaustive()
    }
}

impl Instrumentation for Watched {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if matches!(
            event,
            InstrumentationEvent::StartQuery { .. } | InstrumentationEvent::FinishQuery { .. }
        ) {
            self.watch.progress();
        }
        if let Some(next) = &mut self.next {
            next.on_connection_event(event);
        }
    }
}

/// Runs `op` on `conn` under the watchdog: a statement of `op` that the server has
/// not answered within the limit is cut, and the operation fails with
/// [`Error::Unresponsive`] (a result `op` got just as the cut happened is kept).
/// A connection not watched (no watchdog, or its socket unknown) just runs `op`.
/// `op` runs only pgcache's own statements: a caller's callback inside would count
/// as the server's silence.
pub(crate) fn watched<T>(
    conn: &mut PgConnection,
    op: impl FnOnce(&mut PgConnection) -> Result<T>,
) -> Result<T> {
    let watch = match conn.instrumentation().downcast_ref::<Watched>() {
        Some(watched) => Arc::clone(&watched.watch),
        None => return op(conn),
    };
    watch.arm();
    let previous = CURRENT.with(|current| current.replace(Some(Arc::clone(&watch))));
    /// Puts the previous watch back, also when `op` panics.
    struct Restore(Option<Arc<Watch>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|current| *current.borrow_mut() = self.0.take());
        }
    }
    let restore = Restore(previous);
    let result = op(conn);
    drop(restore);
    if !watch.disarm() {
        return result;
    }
    // The pool discards a connection Diesel reports broken, which it does only after
    // a failed statement went through its bookkeeping (a failure while preparing one
    // does not): any statement fails at once on the shut-down socket, and does.
    let _ = conn.batch_execute("SELECT 1");
    result.map_err(|_| Error::Unresponsive {
        waited_ms: watch.limit_ms(),
    })
}

/// Runs `f`, code of the caller's (a progress callback), with the statement
/// deadline of the operation this thread runs inside [`watched`] lifted: however
/// long `f` takes, it is not the server's silence. The deadline starts again when
/// `f` returns. Outside [`watched`], just runs `f`.
pub(crate) fn outside<T>(f: impl FnOnce() -> T) -> T {
    let Some(watch) = CURRENT.with(|current| current.borrow().clone()) else {
        return f();
    };
    /// Re-arms the deadline, also when `f` panics.
    struct Resume(Arc<Watch>);
    impl Drop for Resume {
        fn drop(&mut self) {
            self.0.resume();
        }
    }
    watch.pause();
    let _resume = Resume(watch);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_ends_when_the_watchdog_is_dropped() {
        let config = CacheConfig::builder()
            .statement_timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let Some(watchdog) = Watchdog::start(&config) else {
            return;
        };
        let shared = Arc::downgrade(&watchdog.shared);
        drop(watchdog);
        let dropped = Instant::now();
        while shared.upgrade().is_some() {
            assert!(
                dropped.elapsed() < Duration::from_secs(2),
                "the thread still runs"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn url() -> String {
        std::env::var("DATABASE_URL").unwrap_or_else(|_| crate::DEFAULT_DATABASE_URL.to_owned())
    }

    fn is_watched(conn: &mut PgConnection) -> bool {
        conn.instrumentation().downcast_ref::<Watched>().is_some()
    }

    fn nothing() -> Box<dyn Instrumentation> {
        Box::new(|_: InstrumentationEvent<'_>| {})
    }

    #[test]
    fn a_connection_whose_socket_cannot_be_told_apart_is_not_watched() {
        let config = CacheConfig::builder().database_url(url()).build().unwrap();
        let Some(watchdog) = Watchdog::start(&config) else {
            return;
        };
        // Two new sockets to the server since the last listing: neither is known
        // to be this connection's.
        let mut first = PgConnection::establish(&url()).unwrap();
        let _second = PgConnection::establish(&url()).unwrap();
        watchdog.adopt(&mut first, nothing());
        assert!(
            !is_watched(&mut first),
            "an ambiguous connection is watched"
        );
        // One made alone is (other tests of this process may connect at the same
        // moment: a few tries).
        let watched = (0..20).any(|_| {
            let mut alone = PgConnection::establish(&url()).unwrap();
            watchdog.adopt(&mut alone, nothing());
            is_watched(&mut alone)
        });
        assert!(watched, "a connection made alone is never watched");
    }

    #[test]
    fn with_the_watchdog_off_nothing_is_watched() {
        let config = CacheConfig::builder()
            .database_url(url())
            .watchdog(false)
            .build()
            .unwrap();
        assert!(Watchdog::start(&config).is_none());
    }
}

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
//! Finding the socket: Diesel does not expose libpq's socket, and the server's view
//! of the client (`inet_client_port()`) names a proxy's or NAT's port rather than
//! ours. But the thread waiting for the answer is blocked in `poll()` on exactly that
//! socket, so the watchdog reads the pollfd array's address from the thread's system
//! call (`/proc/self/task/<tid>/syscall`) and the descriptor from the array
//! (`/proc/self/mem`). This works for TCP and Unix-domain sockets, directly or
//! through proxies and poolers. Linux on x86-64 and AArch64 only; elsewhere there is
//! no client-side cut.
//!
//! Why it never cuts anything else: it acts only on a connection whose operation is
//! still inside [`watched`] and, while it looks and cuts, holds the lock that leaving
//! [`watched`] takes, so the thread cannot have moved on to other work; it reads the
//! system call again after reading the descriptor and acts only if nothing changed.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use diesel::connection::{Instrumentation, InstrumentationEvent, SimpleConnection};
use diesel::pg::PgConnection;
use diesel::Connection;

use crate::config::CacheConfig;
use crate::error::{Error, Result};

/// How long past `statement_timeout` a statement may go unanswered before the
/// watchdog cuts it: time for the server's own timeout to fire and its error to
/// arrive, so that the watchdog acts only when the server cannot.
pub(crate) const NO_ANSWER_MARGIN: Duration = Duration::from_secs(1);

/// How soon an overdue connection is looked at again when its thread was not
/// blocked waiting for the server (busy on the client side) or had not left
/// [`watched`] yet after a cut.
const RECHECK: Duration = Duration::from_millis(50);

thread_local! {
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
}

/// One connection's watch, shared by its instrumentation (which owns it, so it lives
/// as long as the connection), [`watched`] and the watchdog thread.
#[derive(Debug)]
struct Watch {
    /// Milliseconds after `epoch` from which the statement in flight counts as
    /// unanswered; 0 while the connection is not inside [`watched`].
    deadline: AtomicU64,
    /// The kernel thread id of the thread inside [`watched`].
    tid: AtomicI32,
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
    /// Starts the watchdog thread of a pool whose statements may go unanswered for
    /// `limit`. `None` where the socket cannot be found (see the module docs) or the
    /// thread cannot start: statements then wait for the server however long.
    pub(crate) fn start(limit: Duration) -> Option<Self> {
        if !stuck::SUPPORTED {
            return None;
        }
        let shared = Arc::new(Shared {
            watches: Mutex::default(),
            epoch: Instant::now(),
            limit_ms: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
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

    /// Watches a new connection: installs the instrumentation that re-arms its
    /// deadline at every statement and passes every event on to `next`.
    pub(crate) fn watch(&self, conn: &mut PgConnection, next: Box<dyn Instrumentation>) {
        let watch = Arc::new(Watch {
            deadline: AtomicU64::new(0),
            tid: AtomicI32::new(0),
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
        self.tid.store(stuck::current_tid(), Ordering::Relaxed);
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

    /// Leaves [`watched`]; whether the watchdog cut the connection meanwhile.
    fn disarm(&self) -> bool {
        let mut cut = lock(&self.cut);
        self.deadline.store(0, Ordering::Relaxed);
        std::mem::take(&mut *cut)
    }

    /// Cuts the connection if its thread is (still) blocked waiting for the answer to
    /// the statement that was due at `deadline`.
    fn cut_if_stuck(&self, deadline: u64) {
        let mut cut = lock(&self.cut);
        let still_due = || self.deadline.load(Ordering::Acquire) == deadline;
        if *cut || !still_due() {
            return;
        }
        if stuck::cut(self.tid.load(Ordering::Relaxed), still_due) {
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
/// A connection not watched (no watchdog on this platform) just runs `op`.
pub(crate) fn watched<T>(
    conn: &mut PgConnection,
    op: impl FnOnce(&mut PgConnection) -> Result<T>,
) -> Result<T> {
    let watch = match conn.instrumentation().downcast_ref::<Watched>() {
        Some(watched) => Arc::clone(&watched.watch),
        None => return op(conn),
    };
    watch.arm();
    let result = op(conn);
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

/// Finding and shutting down the socket a thread is blocked on.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod stuck {
    use std::fs::File;
    use std::os::fd::RawFd;
    use std::os::unix::fs::FileExt;
    use std::sync::Once;

    use nix::sys::socket::{shutdown, Shutdown};

    pub(super) const SUPPORTED: bool = true;

    /// `poll` and `ppoll`, in which libpq waits for the server, and which take the
    /// pollfd array and its length as their first two arguments.
    #[cfg(target_arch = "x86_64")]
    const POLL_SYSCALLS: &[u64] = &[7, 271];
    #[cfg(target_arch = "aarch64")]
    const POLL_SYSCALLS: &[u64] = &[73];

    /// The kernel id of the calling thread.
    pub(super) fn current_tid() -> i32 {
        thread_local! {
            static TID: i32 = nix::unistd::gettid().as_raw();
        }
        TID.with(|tid| *tid)
    }

    /// Shuts down the socket thread `tid` is blocked polling, if it is blocked in
    /// `poll` on exactly one descriptor and `still_due()` holds once the descriptor
    /// is known; whether it did.
    pub(super) fn cut(tid: i32, still_due: impl Fn() -> bool) -> bool {
        let Some(fd) = polled_fd(tid) else {
            return false;
        };
        if !still_due() {
            return false;
        }
        match shutdown(fd, Shutdown::Both) {
            Ok(()) => true,
            Err(errno) => {
                tracing::warn!(%errno, "pgcache: cannot shut down the socket of an unanswered statement");
                false
            }
        }
    }

    /// The descriptor thread `tid` of this process is polling. The system call line
    /// is read again afterwards: if the thread had left the call meanwhile, the array
    /// may have been read mid-change, and nothing is returned.
    fn polled_fd(tid: i32) -> Option<RawFd> {
        let path = format!("/proc/self/task/{tid}/syscall");
        // "<number> <arg1> <arg2> …" in hex; "running" or "-1 …" outside a call.
        let before = match std::fs::read_to_string(&path) {
            Ok(line) => line,
            Err(error) => {
                static ONCE: Once = Once::new();
                ONCE.call_once(|| tracing::warn!(%error, "pgcache: cannot see what a thread waits on (restricted /proc?); unanswered statements are not cut"));
                return None;
            }
        };
        let mut fields = before.split_whitespace();
        let number: u64 = fields.next()?.parse().ok()?;
        let pollfds = hex(fields.next()?)?;
        let count = hex(fields.next()?)?;
        if !POLL_SYSCALLS.contains(&number) || count != 1 {
            return None;
        }
        // A `struct pollfd` starts with its `int fd`.
        let mut fd = [0; 4];
        File::open("/proc/self/mem")
            .and_then(|mem| mem.read_exact_at(&mut fd, pollfds))
            .ok()?;
        let after = std::fs::read_to_string(&path).ok()?;
        (after == before).then_some(RawFd::from_ne_bytes(fd))
    }

    fn hex(field: &str) -> Option<u64> {
        u64::from_str_radix(field.strip_prefix("0x")?, 16).ok()
    }
}

/// Elsewhere the socket cannot be found: no watchdog is started.
#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
mod stuck {
    pub(super) const SUPPORTED: bool = false;

    pub(super) fn current_tid() -> i32 {
        0
    }

    pub(super) fn cut(_tid: i32, _still_due: impl Fn() -> bool) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_ends_when_the_watchdog_is_dropped() {
        let Some(watchdog) = Watchdog::start(Duration::from_secs(60)) else {
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
}

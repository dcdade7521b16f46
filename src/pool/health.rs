//! The pool's health: which connections are suspect and how they are probed, what
//! the last attempts to connect reported, and the database known to be down.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use diesel::connection::{Instrumentation, InstrumentationEvent, SimpleConnection};
use diesel::pg::PgConnection;
use diesel::r2d2::event::AcquireEvent;
use diesel::r2d2::{self, HandleError, HandleEvent};

use crate::database_url::DatabaseUrl;
use crate::error::{one_line, Error};
use crate::watchdog::watched;

/// How many checkouts are still to be probed; shared by the pool and the
/// instrumentation of each of its connections.
#[derive(Debug, Clone)]
pub(super) struct Suspicion {
    remaining: Arc<AtomicU32>,
    pool_size: u32,
}

impl Suspicion {
    /// Nothing suspect yet, for a pool of `pool_size` connections.
    pub(super) fn new(pool_size: u32) -> Self {
        Suspicion {
            remaining: Arc::new(AtomicU32::new(0)),
            pool_size,
        }
    }

    /// Every pooled connection may be dead: probe each at its next checkout.
    pub(super) fn raise(&self) {
        self.remaining.fetch_max(self.pool_size, Ordering::Relaxed);
    }

    /// Whether this checkout is to be probed.
    pub(super) fn take(&self) -> bool {
        self.remaining.load(Ordering::Relaxed) > 0
            && self
                .remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
    }
}

/// The instrumentation of each pooled connection: a failed statement makes every
/// pooled connection suspect; an answered one shows that the database answers, and
/// ends an outage.
#[derive(Debug, Clone)]
pub(super) struct Observer {
    pub(super) suspicion: Suspicion,
    pub(super) outage: Arc<Outage>,
}

impl Instrumentation for Observer {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::FinishQuery { error, .. } = event {
            match error {
                Some(_) => self.suspicion.raise(),
                None => self.outage.close(),
            }
        }
    }
}

/// What a probe found.
pub(super) enum Probe {
    /// The connection answered.
    Alive,
    /// It failed at once: marked broken, r2d2 discards it when it is given back.
    Dead,
    /// The server left it unanswered and the watchdog cut it (marked broken too):
    /// every other connection would wait as long.
    Unresponsive(Error),
}

/// Probes `conn` with `SELECT 1`: `batch_execute` goes through Diesel's
/// connection-status bookkeeping whatever statement failed before, so a dead
/// connection is marked broken; the watchdog bounds the wait.
pub(super) fn probe(conn: &mut PgConnection) -> Probe {
    match watched(conn, |conn| Ok(conn.batch_execute("SELECT 1")?)) {
        Ok(()) => Probe::Alive,
        Err(error @ Error::Unresponsive { .. }) => Probe::Unresponsive(error),
        Err(_) => Probe::Dead,
    }
}

/// What the pool's last connection attempt reported.
#[derive(Debug)]
pub(super) struct ConnectFailures {
    url: DatabaseUrl,
    /// The last failed attempt's message, scrubbed; cleared by a success. r2d2 hands
    /// its own copy to only one of the callers timing out together, and others then
    /// learn nothing of the cause (an unknown database passing for a slow server).
    last: Mutex<Option<String>>,
    /// How many attempts have failed so far: a checkout tells from it whether one
    /// failed while it waited.
    failed: AtomicU64,
    /// How many attempts have opened a connection so far: a waiting checkout tells
    /// from it whether the attempt it started has ended.
    opened: AtomicU64,
}

impl ConnectFailures {
    /// No attempt has failed yet.
    pub(super) fn new(url: &DatabaseUrl) -> Self {
        ConnectFailures {
            url: url.clone(),
            last: Mutex::new(None),
            failed: AtomicU64::new(0),
            opened: AtomicU64::new(0),
        }
    }

    /// How many attempts have opened a connection so far.
    pub(super) fn opened(&self) -> u64 {
        self.opened.load(Ordering::Acquire)
    }

    /// The error of a checkout that timed out without r2d2's (see `Pool::get`),
    /// worded as r2d2's, with the last attempt's cause.
    pub(super) fn timed_out(&self) -> Error {
        match self.last() {
            Some(cause) => Error::connection(&format!("timed out waiting for connection: {cause}")),
            None => Error::connection("timed out waiting for connection"),
        }
    }

    /// How many attempts have failed so far.
    pub(super) fn count(&self) -> u64 {
        self.failed.load(Ordering::Acquire)
    }

    /// The pool's error as an [`Error::Connection`], scrubbed of the password, with
    /// the cause of the timeout when r2d2 did not give it.
    pub(super) fn error(&self, error: &r2d2::PoolError) -> Error {
        let message = self.url.scrub(&error.to_string());
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match last.as_deref() {
            // r2d2's message is "timed out waiting for connection[: cause]".
            Some(cause) if !message.contains(':') => {
                Error::connection(&format!("{message}: {cause}"))
            }
            _ => Error::connection(&message),
        }
    }

    /// The last connection attempt's cause, if it failed.
    pub(super) fn last(&self) -> Option<String> {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// How often, while the database is known to be down, the prober tries to connect.
pub(crate) const OUTAGE_RETRY: Duration = Duration::from_millis(500);

/// One attempt of the prober's to reach the database: a connection of its own,
/// tested with a query; on failure, the cause, as one line.
pub(super) type Attempt = Box<dyn Fn() -> std::result::Result<(), String> + Send + Sync>;

/// The database known to be down: checkouts fail at once instead of each waiting
/// the whole connection timeout, so a cache whose database (or one of whose shards)
/// is down answers errors, or misses failing open, in microseconds once one caller
/// has waited to learn it. A thread of the pool's own, the prober (started at the
/// first outage, then waiting for the next one until the pool is dropped), tries to
/// connect every [`OUTAGE_RETRY`] while the outage lasts, and ends it as soon as its
/// connection answers a query; a statement answered on any pooled connection ends
/// it too. So the database's return is seen while the process is idle, and no
/// caller pays for an attempt.
pub(super) struct Outage {
    /// The shard's name, for the `pgcache_database_up` gauge and the logs.
    shard: String,
    /// Whether the database is known to be down: one load per checkout.
    down: AtomicBool,
    state: Mutex<OutageState>,
    /// Wakes the prober: an outage began, or the pool is gone.
    wake: Condvar,
    /// The prober's attempt; none on the application's pool, which reports no
    /// failed attempts, so no outage opens on it.
    attempt: Option<Attempt>,
}

/// What the callers and the prober share.
#[derive(Debug, Default)]
struct OutageState {
    /// The last failed attempt's cause (scrubbed, one line), while down.
    cause: String,
    /// Whether the prober was started.
    prober: bool,
    /// The pool is gone: the prober ends.
    stopped: bool,
}

impl fmt::Debug for Outage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outage")
            .field("shard", &self.shard)
            .field("down", &self.down)
            .finish_non_exhaustive()
    }
}

impl Outage {
    /// The database not known to be down; `attempt` is the prober's.
    pub(super) fn new(shard: &str, attempt: Option<Attempt>) -> Arc<Self> {
        crate::metrics::database_up(shard, true);
        Arc::new(Outage {
            shard: shard.to_owned(),
            down: AtomicBool::new(false),
            state: Mutex::default(),
            wake: Condvar::new(),
            attempt,
        })
    }

    fn state(&self) -> MutexGuard<'_, OutageState> {
        // A cause, two flags: nothing a panic could leave half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The error of a checkout while the database is known to be down (`None`: it
    /// is not).
    pub(super) fn fail_fast(&self) -> Option<Error> {
        if !self.down.load(Ordering::Acquire) {
            return None;
        }
        Some(Error::connection(&format!(
            "the database is not answering (last attempt: {}); trying again every {} ms",
            self.state().cause,
            OUTAGE_RETRY.as_millis()
        )))
    }

    /// The database is down: an attempt to connect failed with `cause` while no
    /// pooled connection was out that could come back. Starts the prober the first
    /// time; without one (it cannot start) no outage opens, as nothing would end it.
    pub(super) fn open(self: &Arc<Self>, cause: String) {
        let mut state = self.state();
        if !state.prober && !self.start_prober() {
            return;
        }
        state.prober = true;
        state.cause = cause;
        if !self.down.swap(true, Ordering::AcqRel) {
            crate::metrics::database_up(&self.shard, false);
            tracing::warn!(
                shard = %self.shard,
                cause = %state.cause,
                "pgcache: the database is down; operations on it fail at once while it is retried every {} ms",
                OUTAGE_RETRY.as_millis()
            );
        }
        self.wake.notify_all();
    }

    /// The database answers: ends the outage, if there is one.
    pub(super) fn close(&self) {
        // One load while the database answers: no write on the request path.
        if self.down.load(Ordering::Relaxed) && self.down.swap(false, Ordering::AcqRel) {
            crate::metrics::database_up(&self.shard, true);
            tracing::info!(shard = %self.shard, "pgcache: the database answers again");
        }
    }

    /// The pool is gone: the prober ends (once its attempt in flight, if any, is
    /// over).
    pub(super) fn stop(&self) {
        self.state().stopped = true;
        self.wake.notify_all();
    }

    fn start_prober(self: &Arc<Self>) -> bool {
        if self.attempt.is_none() {
            return false;
        }
        let outage = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("pgcache-prober".to_owned())
            .spawn(move || outage.probe_while_down());
        match spawned {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(%error, "pgcache: cannot start the prober thread; a database down is not remembered");
                false
            }
        }
    }

    /// The prober: waits for an outage, then tries the database every
    /// [`OUTAGE_RETRY`] until it answers or the outage ends otherwise.
    fn probe_while_down(&self) {
        let Some(attempt) = &self.attempt else {
            return;
        };
        let mut state = self.state();
        loop {
            if state.stopped {
                return;
            }
            if !self.down.load(Ordering::Acquire) {
                state = self
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // The attempt that opened the outage has just failed: wait first.
            let next = Instant::now() + OUTAGE_RETRY;
            while !state.stopped && Instant::now() < next {
                let left = next.saturating_duration_since(Instant::now());
                state = self
                    .wake
                    .wait_timeout(state, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if state.stopped || !self.down.load(Ordering::Acquire) {
                continue;
            }
            drop(state);
            let result = attempt();
            state = self.state();
            match result {
                Ok(()) => self.close(),
                Err(cause) => {
                    tracing::debug!(shard = %self.shard, %cause, "pgcache: the database is still down");
                    state.cause = cause;
                }
            }
        }
    }
}

/// r2d2's error and event handler: records (instead of r2d2's own logging, which
/// would print the unscrubbed message) each failed connection attempt.
#[derive(Debug)]
pub(super) struct FailureLog(pub(super) Arc<ConnectFailures>);

impl HandleError<r2d2::Error> for FailureLog {
    fn handle_error(&self, error: r2d2::Error) {
        let message = one_line(&self.0.url.scrub(&error.to_string()));
        // Debug: the pool retries in the background, and the caller gets the cause.
        tracing::debug!(error = %message, "pgcache: opening a connection failed");
        *self.0.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(message);
        self.0.failed.fetch_add(1, Ordering::AcqRel);
    }
}

impl HandleEvent for FailureLog {
    fn handle_acquire(&self, _: AcquireEvent) {
        *self.0.last.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.0.opened.fetch_add(1, Ordering::AcqRel);
    }
}

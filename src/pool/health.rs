//! The pool's health: which connections are suspect and how they are probed, what
//! the last attempts to connect reported, and the database known to be down.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use diesel::connection::{Instrumentation, InstrumentationEvent, SimpleConnection};
use diesel::pg::PgConnection;
use diesel::r2d2::event::AcquireEvent;
use diesel::r2d2::{self, HandleError, HandleEvent};

use crate::database_url::DatabaseUrl;
use crate::error::Error;
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

impl Instrumentation for Suspicion {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::FinishQuery { error: Some(_), .. } = event {
            self.raise();
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
}

impl ConnectFailures {
    /// No attempt has failed yet.
    pub(super) fn new(url: &DatabaseUrl) -> Self {
        ConnectFailures {
            url: url.clone(),
            last: Mutex::new(None),
            failed: AtomicU64::new(0),
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

    /// Whether the last connection attempt failed.
    pub(super) fn failing(&self) -> bool {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }
}

/// How often, while the server is known to be down, a background thread tries to
/// connect again.
pub(crate) const OUTAGE_RETRY: Duration = Duration::from_millis(500);

/// Fails checkouts at once while the server is known to be down, instead of each
/// waiting the whole connection timeout: a cache whose database (or one of whose
/// shards) is down answers errors, or misses failing open, in microseconds, once
/// one caller has waited to learn it. Every [`OUTAGE_RETRY`], while calls come, a
/// thread of its own tries to connect; its success ends the outage.
#[derive(Debug)]
pub(super) struct Outage {
    /// The shard's name, for the `pgcache_database_up` gauge and the logs.
    shard: String,
    base: Instant,
    /// Nanoseconds since `base` before which checkouts fail at once; 0 while the
    /// server answers.
    retry_at: AtomicU64,
}

impl Outage {
    pub(super) fn new(shard: &str) -> Self {
        crate::metrics::database_up(shard, true);
        Outage {
            shard: shard.to_owned(),
            base: Instant::now(),
            retry_at: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        // Never 0, which means "no outage".
        u64::try_from(self.base.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn retry_after(&self, now: u64) -> u64 {
        now.saturating_add(u64::try_from(OUTAGE_RETRY.as_nanos()).unwrap_or(u64::MAX))
    }

    /// The error of a checkout during an outage (`None`: no outage); when it is
    /// time to try again, `retry` is started, by one caller.
    pub(super) fn fail_fast(
        &self,
        failures: &ConnectFailures,
        retry: impl FnOnce(),
    ) -> Option<Error> {
        let retry_at = self.retry_at.load(Ordering::Acquire);
        if retry_at == 0 {
            return None;
        }
        let now = self.now();
        if now >= retry_at
            && self
                .retry_at
                .compare_exchange(
                    retry_at,
                    self.retry_after(now),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            retry();
        }
        let last = failures.last.lock().unwrap_or_else(PoisonError::into_inner);
        Some(Error::connection(&format!(
            "the database is not answering (last attempt: {}); trying again every {} ms",
            last.as_deref().unwrap_or("failed"),
            OUTAGE_RETRY.as_millis()
        )))
    }

    pub(super) fn open(&self) {
        let was = self
            .retry_at
            .swap(self.retry_after(self.now()), Ordering::AcqRel);
        if was == 0 {
            crate::metrics::database_up(&self.shard, false);
            tracing::warn!(
                shard = %self.shard,
                "pgcache: the database is down; operations on it fail at once while it is retried every {} ms",
                OUTAGE_RETRY.as_millis()
            );
        }
    }

    pub(super) fn close(&self) {
        // One load while the database answers: no write on the request path.
        if self.retry_at.load(Ordering::Relaxed) != 0
            && self.retry_at.swap(0, Ordering::AcqRel) != 0
        {
            crate::metrics::database_up(&self.shard, true);
            tracing::info!(shard = %self.shard, "pgcache: the database answers again");
        }
    }
}

/// r2d2's error and event handler: records (instead of r2d2's own logging, which
/// would print the unscrubbed message) each failed connection attempt.
#[derive(Debug)]
pub(super) struct FailureLog(pub(super) Arc<ConnectFailures>);

impl HandleError<r2d2::Error> for FailureLog {
    fn handle_error(&self, error: r2d2::Error) {
        let message = self.0.url.scrub(&error.to_string());
        // Debug: the pool retries in the background, and the caller gets the cause.
        tracing::debug!(error = %message, "pgcache: opening a connection failed");
        *self.0.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(message);
        self.0.failed.fetch_add(1, Ordering::AcqRel);
    }
}

impl HandleEvent for FailureLog {
    fn handle_acquire(&self, _: AcquireEvent) {
        *self.0.last.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

//! Single flight for `get_or_compute`: concurrent misses on one key, in any thread of
//! any process, run the computation once.
//!
//! The first caller to miss takes a lease, a row of `cache_leases` keyed by the cache
//! and the key's digest; it computes, stores the value and deletes the lease. The
//! others poll until the value appears, taking the lease over if it disappears
//! without a value (the computation failed) or lapses (its process died), and give up
//! with [`Error::ComputeTimeout`] after the configured wait. A poll checks a
//! connection out, runs two statements and returns it, so waiters never hold pool
//! connections while they sleep. The steps ([`Flight`]: start, poll, pause; `store`;
//! `release_lease`) are shared by the blocking loop here and the async face's, which
//! sleeps on tokio's timer and runs the computation as a future.
//!
//! Lease statements commit without waiting for the disk (`relaxed`), whatever the
//! durability: a lease is coordination, not data (a crash loses the computations
//! it stood for anyway), and a lease insert waiting for its flush would hold up
//! every caller trying the same key behind its row.
//!
//! Early refresh rides on the same lease. A live entry read from the database
//! comes with its freshness (`freshness.rs`); when it is due (past its freshness,
//! within the stale window, or drawn early by XFetch), the caller tries the lease
//! once ([`Due::try_refresh`]): the one that takes it recomputes inline and
//! stores the value with its new freshness and the computation's time, every other
//! caller in any process returns the value it read at once. A failed or panicking
//! refresh releases the lease and leaves the old value in place.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::data_types::PgInterval;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bytea, Interval, Uuid as SqlUuid};
use uuid::Uuid;

use crate::cache::{check_entries, lookup, store_rows, Cache};
use crate::error::{Error, Result};
use crate::expiry::{ttl_interval, MAX_TTL};
use crate::freshness::{random_unit, Found};
use crate::kind::CacheKind;
use crate::metrics::Op;
use crate::relaxed::relaxed;
use crate::statement::{Param, Prepared};

/// First pause between polls; doubled after each poll up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// Longest pause between polls: bounds both the delay before a waiter sees the value
/// and the load many waiters put on the pool.
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// How long, after a caller found a due value's lease taken, the other callers of
/// this process serve that value without trying the lease themselves: the refresh
/// is under way, and a round trip each would only slow them down.
const TAKEN_FOR: Duration = FIRST_PAUSE;

/// Leases this process found taken by someone refreshing, each until when its
/// callers skip trying it ([`TAKEN_FOR`] after). Keyed by the lease table (named
/// with its schema) and the lease key: managers of other caches in the process
/// never hold up each other's refreshes; two managers of one cache share what
/// they found, as the callers of one manager do.
static TAKEN: OnceLock<Mutex<HashMap<TakenKey, Instant>>> = OnceLock::new();

/// A lease table (named with its schema) and a lease key of it.
type TakenKey = (String, Vec<u8>);

/// Whether a caller of this process found `lease_key` of the lease table `table`
/// taken less than [`TAKEN_FOR`] ago.
fn recently_taken(table: &str, lease_key: &[u8]) -> bool {
    let now = Instant::now();
    TAKEN.get_or_init(Mutex::default).lock().is_ok_and(|taken| {
        taken
            .get(&(table.to_owned(), lease_key.to_vec()))
            .is_some_and(|until| *until > now)
    })
}

/// Notes that `lease_key` of `table` was found taken; forgets the notes that ran
/// out, so the map holds only the keys refreshed in the last few milliseconds.
fn note_taken(table: &str, lease_key: &[u8]) {
    let now = Instant::now();
    if let Ok(mut taken) = TAKEN.get_or_init(Mutex::default).lock() {
        taken.retain(|_, until| *until > now);
        taken.insert((table.to_owned(), lease_key.to_vec()), now + TAKEN_FOR);
    }
}

/// What one poll found.
pub(crate) enum Poll<T> {
    /// The value is there.
    Found(T),
    /// We hold the lease and the value is still missing: compute it.
    Won(Won),
    /// Someone else holds the lease.
    Busy,
    /// The lease table could not be reached and fail-open mode is on, or the last
    /// holder's value could not be stored: compute without single flight.
    Unavailable,
}

/// A lease this caller holds.
#[derive(Debug, Clone)]
pub(crate) struct Won {
    lease_key: Vec<u8>,
    holder: Uuid,
}

/// How a `get_or_compute` begins.
pub(crate) enum Start<T> {
    /// A hit.
    Found(T),
    /// Compute without a lease: caching is disabled, or the handle would not store
    /// the value.
    Alone,
    /// A miss: poll for the lease.
    Flight(Flight),
    /// A hit due for refresh: try the lease once.
    Refresh(Due<T>),
}

/// A live value due for refresh: what to serve unless this caller refreshes it.
#[derive(Debug)]
pub(crate) struct Due<T> {
    /// The value read.
    pub(crate) current: T,
    /// The expiry it was read with: a different one means it was rewritten since.
    seen: DateTime<Utc>,
    flight: Flight,
}

impl<T> Due<T> {
    /// [`Flight::try_refresh`] for this value.
    pub(crate) fn try_refresh<C: Cache + ?Sized>(
        &self,
        cache: &C,
        key: &C::Key,
    ) -> Refreshing<C::Entry> {
        self.flight.try_refresh(cache, key, self.seen)
    }
}

/// What [`Flight::try_refresh`] found.
pub(crate) enum Refreshing<E> {
    /// This caller holds the lease: it recomputes.
    Won(Won),
    /// Rewritten since it was read: serve this.
    Newer(E),
    /// Someone else holds the lease (or it could not be tried): serve the value read.
    Busy,
}

/// One caller's wait for a key's value: the lease it polls and its pause, which grows
/// while another caller computes. Owns what it needs, so an async caller can keep it
/// across blocking calls.
#[derive(Debug)]
pub(crate) struct Flight {
    lease_key: Vec<u8>,
    lease_ttl: Duration,
    wait_timeout: Duration,
    started: Instant,
    pause: Duration,
}

impl Flight {
    /// After a lookup that found `found`: a hit, a hit due for refresh, a
    /// computation without single flight, or a flight to poll. A bad key or TTL
    /// fails here, before any computation.
    pub(crate) fn start<C: Cache + ?Sized>(
        cache: &C,
        key: &C::Key,
        ttl: Duration,
        found: Option<Found<C::Entry>>,
    ) -> Result<Start<C::Value>> {
        let due = match found {
            None => None,
            Some(Found { entry, fresh }) => {
                let beta = cache.front().config().early_refresh_beta();
                match fresh {
                    Some(fresh) if fresh.due(beta, random_unit()) => {
                        Some((C::into_value(entry), fresh.expires_at))
                    }
                    _ => return Ok(Start::Found(C::into_value(entry))),
                }
            }
        };
        let checked = cache.check_key(key)?;
        // The lease lives beside the entry, on the key's shard.
        let engine = cache.engine_for(key, &checked);
        // Reject a bad TTL before paying for the computation.
        ttl_interval(ttl)?;
        // What will not be stored is not worth waiting for: no lease.
        if !engine.is_enabled() || !cache.stores(key) {
            return Ok(due.map_or(Start::Alone, |(current, _)| Start::Found(current)));
        }
        let flight = Flight {
            lease_key: lease_key(C::KIND, &cache.key_digest(key)?),
            lease_ttl: engine.config().lease_ttl(),
            wait_timeout: engine.config().compute_wait_timeout(),
            started: Instant::now(),
            pause: FIRST_PAUSE,
        };
        Ok(match due {
            Some((current, seen)) => Start::Refresh(Due {
                current,
                seen,
                flight,
            }),
            None => Start::Flight(flight),
        })
    }

    /// Tries once to take the lease to refresh a live entry read with expiry
    /// `seen`, on the key's shard, then looks at the entry again (as [`poll`]
    /// does, so a caller that takes the lease just after another's refresh serves
    /// that instead of computing again). A failure to try is logged and reads as
    /// [`Refreshing::Busy`]: the value read is still good to serve.
    fn try_refresh<C: Cache + ?Sized>(
        &self,
        cache: &C,
        key: &C::Key,
        seen: DateTime<Utc>,
    ) -> Refreshing<C::Entry> {
        let warned = |error: Error| {
            tracing::warn!(cache = %C::KIND, %error, "pgcache: an early refresh could not try the lease; the value read is served");
            Refreshing::Busy
        };
        let checked = match cache.check_key(key) {
            Ok(checked) => checked,
            Err(error) => return warned(error),
        };
        let engine = cache.engine_for(key, &checked);
        let leases = engine.tables().leases();
        if recently_taken(leases, &self.lease_key) {
            return Refreshing::Busy;
        }
        let refreshing = engine
            .write(
                C::KIND,
                Op::Lease,
                Refreshing::Busy,
                || None,
                |conn| {
                    relaxed(conn, |conn| {
                        let (holder, table) = (Uuid::new_v4(), leases);
                        if !try_acquire(conn, table, &self.lease_key, holder, self.lease_ttl)? {
                            return Ok(Refreshing::Busy);
                        }
                        match cache.read_for_near(conn, key, &checked)? {
                            Some(read) if read.fresh.expires_at != seen => {
                                release(conn, table, &self.lease_key, holder)?;
                                Ok(Refreshing::Newer(read.entry))
                            }
                            // The write that was read, or none since it expired: refresh.
                            _ => Ok(Refreshing::Won(Won {
                                lease_key: self.lease_key.clone(),
                                holder,
                            })),
                        }
                    })
                },
            )
            .unwrap_or_else(warned);
        if matches!(refreshing, Refreshing::Busy) {
            note_taken(leases, &self.lease_key);
        }
        refreshing
    }

    /// Tries to take the lease and looks for the value, on the key's shard.
    pub(crate) fn poll<C: Cache + ?Sized>(
        &self,
        cache: &C,
        key: &C::Key,
    ) -> Result<Poll<C::Entry>> {
        let engine = cache.engine_for(key, &cache.check_key(key)?);
        engine.write(
            C::KIND,
            Op::Lease,
            Poll::Unavailable,
            || None,
            |conn| {
                relaxed(conn, |conn| {
                    poll(cache, conn, key, &self.lease_key, self.lease_ttl)
                })
            },
        )
    }

    /// After a busy poll: how long to sleep before the next, or
    /// [`Error::ComputeTimeout`] once the wait is over.
    pub(crate) fn pause(&mut self, kind: CacheKind) -> Result<Duration> {
        if self.pause == FIRST_PAUSE {
            crate::metrics::single_flight_wait(kind);
        }
        let waited = self.started.elapsed();
        if waited >= self.wait_timeout {
            return Err(Error::ComputeTimeout {
                waited_ms: waited.as_millis() as u64,
            });
        }
        let sleep = jitter(self.pause).min(self.wait_timeout - waited);
        self.pause = (self.pause * 2).min(MAX_PAUSE);
        Ok(sleep)
    }
}

/// The provided `Cache::get_or_compute_with_ttl`.
pub(crate) fn get_or_compute<C, E, F>(
    cache: &C,
    key: &C::Key,
    ttl: Duration,
    compute: F,
) -> Result<C::Value, E>
where
    C: Cache + ?Sized,
    F: FnOnce() -> Result<C::Value, E>,
    E: From<Error>,
{
    let found = lookup(cache, key, true, true)?;
    let mut flight = match Flight::start(cache, key, ttl, found)? {
        Start::Found(value) => return Ok(value),
        Start::Alone => return compute(),
        Start::Refresh(due) => return refresh(cache, key, (ttl, due), compute),
        Start::Flight(flight) => flight,
    };
    loop {
        let guard = match flight.poll(cache, key)? {
            Poll::Found(entry) => return Ok(C::into_value(entry)),
            Poll::Won(won) => Some(LeaseGuard { cache, key, won }),
            Poll::Unavailable => None,
            Poll::Busy => {
                std::thread::sleep(flight.pause(C::KIND)?);
                continue;
            }
        };
        // An `Err` or a panic drops the guard, which releases the lease: nothing is
        // cached and the next caller computes.
        let started = Instant::now();
        let value = compute()?;
        let took = started.elapsed();
        store(
            cache,
            key,
            &value,
            ttl,
            guard.as_ref().map(|g| &g.won),
            took,
        )?;
        drop(guard);
        return Ok(value);
    }
}

/// A hit due for refresh: the caller that takes the lease recomputes inline and
/// returns the new value; the others return the value read at once. A failed
/// computation is logged and the value read returned (a panic goes on up): either
/// way the guard releases the lease and the old entry stays.
fn refresh<C: Cache + ?Sized, E: From<Error>>(
    cache: &C,
    key: &C::Key,
    (ttl, due): (Duration, Due<C::Value>),
    compute: impl FnOnce() -> Result<C::Value, E>,
) -> Result<C::Value, E> {
    let won = match due.try_refresh(cache, key) {
        Refreshing::Won(won) => won,
        Refreshing::Newer(entry) => return Ok(C::into_value(entry)),
        Refreshing::Busy => return Ok(due.current),
    };
    let guard = LeaseGuard { cache, key, won };
    let started = Instant::now();
    match compute() {
        Ok(value) => {
            store(cache, key, &value, ttl, Some(&guard.won), started.elapsed())?;
            Ok(value)
        }
        Err(_) => {
            refresh_failed(C::KIND);
            Ok(due.current)
        }
    }
}

/// Logs an early refresh whose computation returned an error (its type need not
/// print): the old value is served until its hard expiry.
pub(crate) fn refresh_failed(kind: CacheKind) {
    tracing::warn!(cache = %kind, "pgcache: an early refresh's computation failed; the current value is served");
}

/// Stores a value computed in `took`: fresh for `ttl`, then, with a stale window
/// configured, served stale for that long more (its hard expiry), with its freshness
/// and `took` beside it in the same transaction; with early refresh off, a plain
/// set. When the cache refuses it (a value too large, say) while `won` is held, the
/// lease is handed to [`UNCACHEABLE`] so the waiters compute at once instead of
/// one after another; releasing it then releases nothing.
///
/// # Errors
/// The store's error.
pub(crate) fn store<C: Cache + ?Sized>(
    cache: &C,
    key: &C::Key,
    value: &C::Value,
    ttl: Duration,
    won: Option<&Won>,
    took: Duration,
) -> Result<()> {
    let config = cache.front().config();
    let window = config.stale_while_revalidate();
    let stored = if window.is_zero() && config.early_refresh_beta() == 0.0 {
        cache.set_with_ttl(key, value, ttl)
    } else {
        store_fresh(cache, key, value, ttl, window, took)
    };
    if let (Some(won), Err(Error::InvalidInput { .. })) = (won, &stored) {
        mark_uncacheable(cache, key, won);
    }
    stored
}

/// The set of [`store`] with the facts early refresh reads: expiring after `ttl`
/// and `window` (at most [`MAX_TTL`]), fresh for `ttl`, computed in `took`.
fn store_fresh<C: Cache + ?Sized>(
    cache: &C,
    key: &C::Key,
    value: &C::Value,
    ttl: Duration,
    window: Duration,
    took: Duration,
) -> Result<()> {
    let hard = ttl.saturating_add(window).min(MAX_TTL.max(ttl));
    let stale_for = PgInterval::from_microseconds(hard.saturating_sub(ttl).as_micros() as i64);
    let compute_us = i64::try_from(took.as_micros()).unwrap_or(i64::MAX);
    let near_key = C::near_key(key, &cache.check_key(key)?);
    let table = cache.table();
    let facts = |conn: &mut PgConnection| -> Result<()> {
        write_facts(conn, table, C::KIND, &near_key, stale_for, compute_us)?;
        Ok(())
    };
    store_rows(
        cache,
        Op::Set,
        hard,
        || check_entries(cache, &[(key, value)]),
        &[key],
        Some(&facts),
    )
}

/// Writes a just-written row's freshness and computation time: fresh until
/// `stale_for` before its expiry, `fresh_expiry` naming that expiry. `near_key`:
/// the row's key column as bytes (a key/value key's text, else the digest).
fn write_facts(
    conn: &mut PgConnection,
    table: &str,
    kind: CacheKind,
    near_key: &[u8],
    stale_for: PgInterval,
    compute_us: i64,
) -> QueryResult<usize> {
    let (stale_for, compute_us, key) = (
        Param::<Interval, _>::new(stale_for),
        Param::<BigInt, _>::new(compute_us),
        Param::<Bytea, _>::new(near_key),
    );
    let pieces: &'static [&'static str] = if matches!(kind, CacheKind::Kv) {
        &[
            "UPDATE {t} SET fresh_until = expires_at - ",
            ", fresh_expiry = expires_at, compute_us = ",
            " WHERE key = convert_from(",
            ", 'UTF8')",
        ]
    } else {
        &[
            "UPDATE {t} SET fresh_until = expires_at - ",
            ", fresh_expiry = expires_at, compute_us = ",
            " WHERE key_hash = ",
            "",
        ]
    };
    Prepared::new(table, pieces, vec![&stale_for, &compute_us, &key]).execute(conn)
}

/// Tries to take the lease, then looks for the value. In this order, a caller that
/// wins the lease just after the previous holder stored the value and released it
/// still finds the value instead of computing it again.
fn poll<C: Cache + ?Sized>(
    cache: &C,
    conn: &mut PgConnection,
    key: &C::Key,
    lease_key: &[u8],
    lease_ttl: Duration,
) -> Result<Poll<C::Entry>> {
    let holder = Uuid::new_v4();
    let table = cache.front().tables().leases();
    let won = try_acquire(conn, table, lease_key, holder, lease_ttl)?;
    match cache.get_in(conn, key)? {
        Some(entry) => {
            if won {
                release(conn, table, lease_key, holder)?;
            }
            Ok(Poll::Found(entry))
        }
        None if won => Ok(Poll::Won(Won {
            lease_key: lease_key.to_vec(),
            holder,
        })),
        None if lease_holder(conn, table, lease_key)? == Some(UNCACHEABLE) => Ok(Poll::Unavailable),
        None => Ok(Poll::Busy),
    }
}

/// The holder a lease is handed to when its key's value was refused by the cache (a
/// value too large, say): until the lease lapses, callers compute without waiting.
const UNCACHEABLE: Uuid = Uuid::nil();

/// The holder of the lease row `lease_key` in `table` (the leases table, qualified).
fn lease_holder(
    conn: &mut PgConnection,
    table: &str,
    lease_key: &[u8],
) -> QueryResult<Option<Uuid>> {
    #[derive(QueryableByName)]
    struct Holder {
        #[diesel(sql_type = SqlUuid)]
        holder: Uuid,
    }
    let key = Param::<Bytea, _>::new(lease_key);
    let found: Option<Holder> = Prepared::new(
        table,
        &["SELECT holder FROM {t} WHERE lease_key = ", ""],
        vec![&key],
    )
    .get_result(conn)
    .optional()?;
    Ok(found.map(|h| h.holder))
}

/// The lease row's key: the cache's name and the key's digest, so the caches never
/// share leases.
fn lease_key(kind: CacheKind, digest: &crate::KeyDigest) -> Vec<u8> {
    let mut key = Vec::with_capacity(kind.name().len() + 1 + 32);
    key.extend_from_slice(kind.name().as_bytes());
    key.push(b':');
    key.extend_from_slice(digest.as_bytes());
    key
}

/// Inserts the lease, or takes over one that has lapsed; true if `holder` now holds
/// it. One statement, so two callers can never both win.
fn try_acquire(
    conn: &mut PgConnection,
    table: &str,
    lease_key: &[u8],
    holder: Uuid,
    ttl: Duration,
) -> Result<bool> {
    #[derive(QueryableByName)]
    struct Holder {
        #[diesel(sql_type = SqlUuid)]
        holder: Uuid,
    }
    let (key, holder_param, ttl) = (
        Param::<Bytea, _>::new(lease_key),
        Param::<SqlUuid, _>::new(holder),
        Param::<Interval, _>::new(ttl_interval(ttl)?),
    );
    // `ON CONFLICT ... DO UPDATE ... WHERE`: take the row over only once it lapsed.
    // A live lease found first inserts nothing, so the crowd polling a key someone
    // holds (or serving it stale meanwhile) reads the row instead of locking it.
    let taken: Option<Holder> = Prepared::new(
        table,
        &[
            "INSERT INTO {t} AS l (lease_key, holder, expires_at) SELECT ",
            ", ",
            ", statement_timestamp() + ",
            " WHERE NOT EXISTS (SELECT 1 FROM {t} WHERE lease_key = ",
            " AND expires_at > statement_timestamp()) \
             ON CONFLICT (lease_key) DO UPDATE SET holder = excluded.holder, \
             expires_at = excluded.expires_at WHERE l.expires_at <= statement_timestamp() \
             RETURNING holder",
        ],
        vec![&key, &holder_param, &ttl, &key],
    )
    .get_result(conn)
    .optional()?;
    Ok(taken.map(|t| t.holder) == Some(holder))
}

/// Deletes the lease if `holder` still holds it (not if it lapsed and was taken over).
fn release(
    conn: &mut PgConnection,
    table: &str,
    lease_key: &[u8],
    holder: Uuid,
) -> QueryResult<usize> {
    let (key, holder) = (
        Param::<Bytea, _>::new(lease_key),
        Param::<SqlUuid, _>::new(holder),
    );
    Prepared::new(
        table,
        &["DELETE FROM {t} WHERE lease_key = ", " AND holder = ", ""],
        vec![&key, &holder],
    )
    .execute(conn)
}

/// Releases a won lease when dropped: after the value is stored, when the computation
/// returns an error, and when it panics.
struct LeaseGuard<'a, C: Cache + ?Sized> {
    cache: &'a C,
    key: &'a C::Key,
    won: Won,
}

impl<C: Cache + ?Sized> Drop for LeaseGuard<'_, C> {
    fn drop(&mut self) {
        release_lease(self.cache, self.key, &self.won);
    }
}

/// Runs a lease statement on the key's shard; a failure is logged, not returned.
fn on_lease<C: Cache + ?Sized>(
    cache: &C,
    key: &C::Key,
    what: &str,
    statement: impl Fn(&mut PgConnection, &str) -> QueryResult<usize>,
) {
    let done = cache.check_key(key).and_then(|checked| {
        let engine = cache.engine_for(key, &checked);
        engine.write(
            C::KIND,
            Op::Lease,
            0,
            || None,
            |conn| relaxed(conn, |conn| Ok(statement(conn, engine.tables().leases())?)),
        )
    });
    if let Err(error) = done {
        // The lease lapses on its own after the lease TTL.
        tracing::warn!(cache = %C::KIND, %error, "pgcache: {what} a single-flight lease failed");
    }
}

/// Releases `won` (unless it lapsed and was taken over); a failure is logged, and
/// the lease lapses after the lease TTL.
pub(crate) fn release_lease<C: Cache + ?Sized>(cache: &C, key: &C::Key, won: &Won) {
    on_lease(cache, key, "releasing", |conn, table| {
        release(conn, table, &won.lease_key, won.holder)
    });
}

/// Hands `won` to [`UNCACHEABLE`]; releasing it then releases nothing.
fn mark_uncacheable<C: Cache + ?Sized>(cache: &C, key: &C::Key, won: &Won) {
    on_lease(cache, key, "marking", |conn, table| {
        let (key, holder, uncacheable) = (
            Param::<Bytea, _>::new(&won.lease_key[..]),
            Param::<SqlUuid, _>::new(won.holder),
            Param::<SqlUuid, _>::new(UNCACHEABLE),
        );
        Prepared::new(
            table,
            &[
                "UPDATE {t} SET holder = ",
                " WHERE lease_key = ",
                " AND holder = ",
                "",
            ],
            vec![&uncacheable, &key, &holder],
        )
        .execute(conn)
    });
}

/// `pause` scaled by a random factor in (0.5, 1.5], so waiters that started together
/// do not poll in lockstep.
fn jitter(pause: Duration) -> Duration {
    pause.mul_f64(0.5 + random_unit())
}

//! Single flight for `get_or_compute`: concurrent misses on one key, in any thread of
//! any process, run the computation once.
//!
//! The first caller to miss takes a lease, a row of `cache_leases` keyed by the cache
//! and the key's digest; it computes, stores the value and deletes the lease. The
//! others poll until the value appears, taking the lease over if it disappears
//! without a value (the computation failed) or lapses (its process died), and give up
//! with [`Error::ComputeTimeout`] after the configured wait. A poll checks a
//! connection out, runs two statements and returns it, so waiters never hold pool
//! connections while they sleep.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Bytea, Interval, Uuid as SqlUuid};
use uuid::Uuid;

use crate::cache::Cache;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::expiry::ttl_interval;
use crate::kind::CacheKind;
use crate::metrics::Op;
use crate::statement::{Param, Prepared};

/// First pause between polls; doubled after each poll up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// Longest pause between polls: bounds both the delay before a waiter sees the value
/// and the load many waiters put on the pool.
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// What one poll found.
enum Poll<T> {
    /// The value is there.
    Found(T),
    /// We hold the lease and the value is still missing: compute it.
    Won(Uuid),
    /// Someone else holds the lease.
    Busy,
    /// The lease table could not be reached and fail-open mode is on, or the last
    /// holder's value could not be stored: compute without single flight.
    Unavailable,
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
    if let Some(entry) = cache.get(key)? {
        return Ok(C::into_value(entry));
    }
    let checked = cache.check_key(key)?;
    // The lease lives beside the entry, on the key's shard.
    let engine = cache.engine_for(key, &checked);
    // Reject a bad TTL before paying for the computation.
    ttl_interval(ttl)?;
    // What will not be stored is not worth waiting for: no lease.
    if !engine.is_enabled() || !cache.stores(key) {
        return compute();
    }
    let lease_key = lease_key(C::KIND, &cache.key_digest(key)?);
    let lease_ttl = engine.config().lease_ttl();
    let wait_timeout = engine.config().compute_wait_timeout();
    let started = Instant::now();
    let mut pause = FIRST_PAUSE;
    loop {
        let poll = engine.write(
            C::KIND,
            Op::Lease,
            Poll::Unavailable,
            || None,
            |conn| poll(cache, conn, key, &lease_key, lease_ttl),
        )?;
        let guard = match poll {
            Poll::Found(entry) => return Ok(C::into_value(entry)),
            Poll::Won(holder) => Some(LeaseGuard {
                engine,
                kind: C::KIND,
                lease_key: &lease_key,
                holder,
            }),
            Poll::Unavailable => None,
            Poll::Busy => {
                if pause == FIRST_PAUSE {
                    crate::metrics::single_flight_wait(C::KIND);
                }
                let waited = started.elapsed();
                if waited >= wait_timeout {
                    return Err(Error::ComputeTimeout {
                        waited_ms: waited.as_millis() as u64,
                    }
                    .into());
                }
                std::thread::sleep(jitter(pause).min(wait_timeout - waited));
                pause = (pause * 2).min(MAX_PAUSE);
                continue;
            }
        };
        // An `Err` or a panic drops the guard, which releases the lease: nothing is
        // cached and the next caller computes.
        let value = compute()?;
        if let Err(error) = cache.set_with_ttl(key, &value, ttl) {
            if let (Some(guard), Error::InvalidInput { .. }) = (&guard, &error) {
                // Waiters would wait for a value that never comes, one after another.
                guard.mark_uncacheable();
            }
            return Err(error.into());
        }
        drop(guard);
        return Ok(value);
    }
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
        None if won => Ok(Poll::Won(holder)),
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
    let taken: Option<Holder> = Prepared::new(
        table,
        &[
            "INSERT INTO {t} AS l (lease_key, holder, expires_at) VALUES (",
            ", ",
            ", statement_timestamp() + ",
            ") ON CONFLICT (lease_key) DO UPDATE SET holder = excluded.holder, \
             expires_at = excluded.expires_at WHERE l.expires_at <= statement_timestamp() \
             RETURNING holder",
        ],
        vec![&key, &holder_param, &ttl],
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
struct LeaseGuard<'a> {
    engine: &'a Engine,
    kind: CacheKind,
    lease_key: &'a [u8],
    holder: Uuid,
}

impl LeaseGuard<'_> {
    /// Hands the lease to [`UNCACHEABLE`]; dropping the guard then releases nothing.
    fn mark_uncacheable(&self) {
        let marked = self.engine.write(
            self.kind,
            Op::Lease,
            0,
            || None,
            |conn| {
                let (key, holder, uncacheable) = (
                    Param::<Bytea, _>::new(self.lease_key),
                    Param::<SqlUuid, _>::new(self.holder),
                    Param::<SqlUuid, _>::new(UNCACHEABLE),
                );
                Ok(Prepared::new(
                    self.engine.tables().leases(),
                    &[
                        "UPDATE {t} SET holder = ",
                        " WHERE lease_key = ",
                        " AND holder = ",
                        "",
                    ],
                    vec![&uncacheable, &key, &holder],
                )
                .execute(conn)?)
            },
        );
        if let Err(error) = marked {
            tracing::warn!(cache = %self.kind, %error, "pgcache: marking a single-flight lease failed");
        }
    }
}

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        let released = self.engine.write(
            self.kind,
            Op::Lease,
            0,
            || None,
            |conn| {
                Ok(release(
                    conn,
                    self.engine.tables().leases(),
                    self.lease_key,
                    self.holder,
                )?)
            },
        );
        if let Err(error) = released {
            // The lease lapses on its own after the lease TTL.
            tracing::warn!(cache = %self.kind, %error, "pgcache: releasing a single-flight lease failed");
        }
    }
}

/// `pause` scaled by a random factor in [0.5, 1.5), so waiters that started together
/// do not poll in lockstep.
fn jitter(pause: Duration) -> Duration {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    pause.mul_f64(0.5 + (random % 1000) as f64 / 1000.0)
}

//! Surviving connections lost under the pool (killed backends, server restart,
//! network cut) without restarting the process.
//!
//! Diesel marks a `PgConnection` whose socket died as broken once a query on it fails
//! (libpq reports an unknown transaction status), and r2d2 then discards it instead
//! of returning it to the pool. What neither does is notice the *idle* connections
//! that died at the same moment: with `test_on_check_out` off (a ping per checkout
//! would double the cost of a get), each of them would fail one more operation. So
//! an operation that loses its connection is retried once, on a connection that has
//! just answered a ping; the pings discard the other dead idle connections on the
//! way. Every cache operation is idempotent (a read, an upsert or a delete), so the
//! retry cannot apply anything twice. A statement PostgreSQL aborted to break a
//! deadlock, or for a serialization failure, is likewise retried once.

use diesel::pg::PgConnection;
use diesel::r2d2::R2D2Connection;

use crate::error::{Error, Result};
use crate::pool::{PgPool, PooledConnection};
use crate::watchdog::watched;

/// Runs `op` on a pooled connection, once more on a live one if the first
/// connection turned out to be dead. Each run is under the watchdog; a run it cut
/// ([`Error::Unresponsive`]) is not retried, which would wait as long again.
pub(crate) fn run_on_pool<T>(
    pool: &PgPool,
    op: impl Fn(&mut PgConnection) -> Result<T>,
) -> Result<T> {
    match pool
        .get()
        .map_err(Error::from)
        .and_then(|mut conn| watched(&mut conn, &op))
    {
        Err(error) if error.is_connection_lost() => {
            tracing::warn!(%error, "pgcache: connection lost; retrying once on a live connection");
            watched(&mut *live_connection(pool)?, &op)
        }
        // PostgreSQL rolled the statement back to break a deadlock (or a
        // serialization conflict): running it again normally succeeds.
        Err(error) if error.is_retryable_conflict() => {
            tracing::debug!(%error, "pgcache: retrying once after a conflict");
            watched(&mut *pool.get()?, &op)
        }
        other => other,
    }
}

/// A pooled connection that has just answered a ping. Dead ones met on the way are
/// dropped, which discards them (Diesel reports them broken after the failed ping).
/// Bounded: the pool holds at most `max_size` dead connections, after which it opens
/// a fresh one or fails after its connection timeout.
pub(crate) fn live_connection(pool: &PgPool) -> Result<PooledConnection> {
    let mut last_error = None;
    for _ in 0..=pool.max_size() {
        let mut conn = pool.get()?;
        match watched(&mut conn, |conn| Ok(conn.ping()?)) {
            Ok(()) => return Ok(conn),
            // The server does not answer: the next ping would wait as long again.
            Err(error @ Error::Unresponsive { .. }) => return Err(error),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error
        .unwrap_or_else(|| Error::Connection("no live connection in the pool".to_owned())))
}

//! The poller: one thread per manager's near caches, reading the change log and the
//! stamps ([`protocol::poll_sql`]) and evicting the keys they name.
//!
//! It polls every [`POLL_INTERVAL`] while changes come in; each poll that finds
//! none doubles the wait, up to a third of the staleness bound `S`
//! ([`idle_interval`]), and the first poll that finds one returns to the fast
//! interval. An idle manager costs the server three polls per `S` (30 a second at
//! the default 100 ms) instead of one every 2 ms, and the bound is untouched: L1
//! serves only while the last poll was sent less than `S` ago
//! (`NearCaches::polled`), whatever the interval; an idle poller sends one every
//! `S/3`, so two may come late before L1 turns off, and a change committed while
//! it idles is read at most `S/3` (and the poll's time) later.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::pg::{Pg, PgConnection};
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text};

use super::{protocol, NearCaches};
use crate::error::Result;
use crate::kind::CacheKind;
use crate::tables::Tables;
use crate::watchdog::watched;

/// How often the poller reads the change log while changes come in: the most a
/// change committed then waits for the next poll.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(2);

/// The longest the poller waits between polls while nothing changes, under the
/// staleness bound `staleness`: a third of it (at least [`POLL_INTERVAL`]), so an
/// idle near cache stays current with room for two late polls, and a change after
/// a quiet spell waits at most this long for its poll.
pub(crate) fn idle_interval(staleness: Duration) -> Duration {
    (staleness / 3).max(POLL_INTERVAL)
}

/// The wait before the next poll: [`POLL_INTERVAL`] after a poll that found a
/// change, else twice the last wait, at most `idle`.
fn next_interval(last: Duration, found_changes: bool, idle: Duration) -> Duration {
    if found_changes {
        POLL_INTERVAL
    } else {
        (last * 2).min(idle).max(POLL_INTERVAL)
    }
}

/// How long the change log keeps a change; a poller that fell half as far behind
/// starts over with an empty L1.
const RETENTION: Duration = Duration::from_secs(10);

/// The wait before reconnecting a lost poller.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// The poller thread of one manager's near caches.
pub(crate) struct Poller {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller").finish_non_exhaustive()
    }
}

impl Poller {
    /// Starts polling the change log for `caches` with connections from `connect`;
    /// the thread ends when `caches` is dropped or the poller is.
    pub(crate) fn start(
        caches: Weak<NearCaches>,
        tables: Tables,
        connect: impl Fn() -> Option<PgConnection> + Send + 'static,
    ) -> Option<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("pgcache-near-poller".to_owned())
            .spawn(move || poll_loop(&caches, &tables, &connect, &stopping))
            .ok()?;
        Some(Poller {
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }
}

/// Where the next poll starts: the transactions it must look at.
struct Window {
    /// The previous snapshot's xmax: every transaction that took its id later.
    xmax: String,
    /// The transactions in progress at the previous snapshot.
    in_progress: Vec<String>,
}

/// One row of a poll: the snapshot's bounds, the database clock, and a change if
/// any.
#[derive(QueryableByName)]
struct Polled {
    #[diesel(sql_type = Text)]
    xmax: String,
    #[diesel(sql_type = Array<Text>)]
    xip: Vec<String>,
    #[diesel(sql_type = BigInt)]
    now_us: i64,
    #[diesel(sql_type = Nullable<Text>)]
    cache_name: Option<String>,
    #[diesel(sql_type = Nullable<Array<Text>>)]
    keys: Option<Vec<String>>,
    #[diesel(sql_type = Bool)]
    is_change: bool,
}

impl Window {
    /// The snapshot's xmin as a number: every transaction below it had ended when
    /// the snapshot was taken.
    fn xmin(&self) -> Option<i64> {
        let in_progress = self.in_progress.iter().filter_map(|x| x.parse().ok()).min();
        in_progress.or_else(|| self.xmax.parse().ok())
    }
}

/// The poll: `WITH w AS (SELECT $1::int8 AS xmax, $2` then
/// [`protocol::poll_sql`]'s text. A poller's connection runs only this one text
/// (fixed by its near caches) under one static query id, so Diesel prepares it
/// once per connection: parsing and planning every 2 ms cost more than running it.
struct PollStatement<'a> {
    sql: &'a str,
    xmax: &'a str,
    in_progress: &'a [String],
}

impl QueryFragment<Pg> for PollStatement<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("WITH w AS (SELECT ");
        out.push_bind_param::<Text, _>(self.xmax)?;
        out.push_sql("::int8 AS xmax, ");
        out.push_bind_param::<Array<Text>, _>(self.in_progress)?;
        out.push_sql(self.sql);
        Ok(())
    }
}

impl QueryId for PollStatement<'_> {
    type QueryId = PollStatement<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::Query for PollStatement<'_> {
    type SqlType = diesel::sql_types::Untyped;
}

impl<Conn> RunQueryDsl<Conn> for PollStatement<'_> {}

/// Runs the poll ([`protocol::poll_sql`]'s text): the changes committed since
/// `window` was taken (none without one: the baseline) and the next window.
fn poll(conn: &mut PgConnection, sql: &str, window: Option<&Window>) -> QueryResult<Vec<Polled>> {
    let (xmax, in_progress) = match window {
        Some(w) => (w.xmax.as_str(), w.in_progress.as_slice()),
        // The baseline: no change, only the snapshot.
        None => ("9223372036854775807", &[][..]),
    };
    PollStatement {
        sql,
        xmax,
        in_progress,
    }
    .load(conn)
}

/// The poller's loop: connect, take a baseline, then poll (see the module doc for
/// how often) until told to stop; a lost connection is reported and replaced.
fn poll_loop(
    caches: &Weak<NearCaches>,
    tables: &Tables,
    connect: &dyn Fn() -> Option<PgConnection>,
    stop: &AtomicBool,
) {
    // Fixed for the poller's life: its near caches do not change.
    let Some((sql, idle)) = caches.upgrade().map(|near| {
        let sql = protocol::poll_sql(
            tables,
            CacheKind::ALL.into_iter().filter(|&k| near.serves(k)),
        );
        (sql, idle_interval(near.staleness()))
    }) else {
        return;
    };
    while !stop.load(Ordering::SeqCst) {
        let Some(mut conn) = connect() else {
            std::thread::sleep(RECONNECT_DELAY);
            continue;
        };
        // Every statement is watched: a poll a frozen server never answers is cut
        // after statement_timeout + 1 s, and the poller reconnects.
        let outcome: Result<()> = (|| {
            let sent = Instant::now();
            let baseline = watched(&mut conn, |conn| Ok(poll(conn, &sql, None)?))?;
            let mut window = next_window(&baseline);
            match caches.upgrade() {
                Some(near) => near.baseline_taken(sent, db_clock(&baseline)),
                None => return Ok(()),
            }
            let mut pruned = Instant::now();
            // Windows of the last RETENTION, to prune what every poller has read.
            let mut past: VecDeque<(Instant, i64)> = VecDeque::new();
            let mut last_ok = Instant::now();
            let mut interval = POLL_INTERVAL;
            loop {
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let Some(near) = caches.upgrade() else {
                    return Ok(());
                };
                let sent = Instant::now();
                if sent.duration_since(last_ok) > RETENTION / 2 {
                    // Stalled this long, changes may have been pruned unread:
                    // start over from an empty L1.
                    near.lost();
                    let baseline = watched(&mut conn, |conn| Ok(poll(conn, &sql, None)?))?;
                    window = next_window(&baseline);
                    near.baseline_taken(sent, db_clock(&baseline));
                }
                let rows = watched(&mut conn, |conn| Ok(poll(conn, &sql, window.as_ref())?))?;
                let mut changed = false;
                for row in rows.iter().filter(|r| r.is_change) {
                    changed = true;
                    if let Some(cache) = &row.cache_name {
                        near.apply(cache, row.keys.as_deref());
                    }
                }
                window = next_window(&rows);
                near.polled(sent, db_clock(&rows));
                crate::metrics::near_cache_poll(sent.elapsed());
                last_ok = sent;
                drop(near);
                if pruned.elapsed() > Duration::from_secs(1) {
                    pruned = Instant::now();
                    if let Some(xmin) = window.as_ref().and_then(Window::xmin) {
                        past.push_back((pruned, xmin));
                    }
                    // Changes of transactions that had all ended RETENTION ago (every
                    // current poller has read them): by the index, not by a scan.
                    while let Some(&(at, xmin)) = past.front() {
                        if at.elapsed() < RETENTION {
                            break;
                        }
                        past.pop_front();
                        watched(&mut conn, |conn| {
                            Ok(diesel::sql_query(format!(
                                "DELETE FROM {} WHERE xid < $1",
                                tables.changes()
                            ))
                            .bind::<BigInt, _>(xmin)
                            .execute(conn)?)
                        })?;
                    }
                }
                // Polls start every `interval`, whatever a poll took (a change
                // waits at most one interval for the next), with a pause of at least
                // a quarter interval when a poll took longer.
                interval = next_interval(interval, changed, idle);
                sleep_unless_stopped(
                    interval.saturating_sub(sent.elapsed()).max(interval / 4),
                    stop,
                );
            }
        })();
        if let Some(near) = caches.upgrade() {
            near.lost();
        }
        if let Err(error) = outcome {
            tracing::warn!(%error, "pgcache: near-cache poller lost its connection; near caches off until it is back");
            std::thread::sleep(RECONNECT_DELAY);
        }
    }
}

/// Sleeps `wait`, in steps of at most 10 ms so that a stopping manager is not held
/// up by an idle poller's longer wait.
fn sleep_unless_stopped(wait: Duration, stop: &AtomicBool) {
    let until = Instant::now() + wait;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stop.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(10)));
    }
}

/// Deletes changes logged more than an hour ago: cleanup does, for when no near
/// cache runs any more (pollers prune as they go). An hour, not the pollers'
/// retention: a change is dated by its statement, and a long transaction may commit
/// it long after.
pub(crate) fn prune_changes(conn: &mut PgConnection, tables: &Tables) -> QueryResult<()> {
    conn.batch_execute(&format!(
        "DELETE FROM {} WHERE created_at < now() - interval '1 hour'",
        tables.changes()
    ))
}

/// The window the next poll starts from, from this poll's snapshot.
fn next_window(rows: &[Polled]) -> Option<Window> {
    rows.first().map(|row| Window {
        xmax: row.xmax.clone(),
        in_progress: row.xip.clone(),
    })
}

/// The database clock a poll read, microseconds since the Unix epoch.
fn db_clock(rows: &[Polled]) -> Option<i64> {
    rows.first().map(|row| row.now_us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_poller_backs_off_to_a_third_of_the_bound_and_a_change_resets_it() {
        let idle = idle_interval(Duration::from_millis(75));
        assert_eq!(idle, Duration::from_millis(25));
        let mut interval = POLL_INTERVAL;
        let mut waits = Vec::new();
        for _ in 0..6 {
            interval = next_interval(interval, false, idle);
            waits.push(interval.as_millis());
        }
        assert_eq!(waits, [4, 8, 16, 25, 25, 25]);
        assert_eq!(next_interval(idle, true, idle), POLL_INTERVAL);
        assert_eq!(idle_interval(Duration::from_millis(4)), POLL_INTERVAL);
    }
}

//! Early refresh's facts about an entry and the decisions made from them, with no
//! database: when a live entry is due for a refresh (stale-while-revalidate, and
//! XFetch's probabilistic early recomputation, Vattani et al., VLDB 2015), and how
//! long a near cache may keep it.
//!
//! The facts are columns of every cache table (migration `early_refresh`), read by
//! the same statement that reads the entry, with the database's clock at that
//! statement ([`Facts`]): `fresh_until`, when the value stops being fresh (void
//! unless the row's `expires_at` still equals `fresh_expiry`, the expiry it was
//! written with, so any later write or touch voids it); and `compute_us`, how long
//! the last computation took (XFetch's `delta`). An entry with no valid
//! `fresh_until` is fresh until it expires.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Nullable, Timestamptz};
use diesel::QueryableByName;

/// What a read selects besides a typed table's `SELECT *` (which has the facts'
/// columns already): the statement's time (a literal, for `concat!`).
macro_rules! read_at {
    () => {
        "statement_timestamp() AS read_at"
    };
}

/// The facts' columns and [`read_at!`], as a read that names its columns selects
/// them.
macro_rules! fact_columns {
    () => {
        concat!(
            "fresh_until, fresh_expiry, compute_us, ",
            $crate::freshness::read_at!()
        )
    };
}
pub(crate) use {fact_columns, read_at};

/// The facts columns of a row as read, and the database's time of the read.
#[derive(Debug, Clone, Copy, QueryableByName)]
pub(crate) struct Facts {
    #[diesel(sql_type = Nullable<Timestamptz>)]
    fresh_until: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    fresh_expiry: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<BigInt>)]
    compute_us: Option<i64>,
    #[diesel(sql_type = Timestamptz)]
    read_at: DateTime<Utc>,
}

impl Facts {
    /// The freshness of the entry these facts were read with, which expires at
    /// `expires_at`.
    pub(crate) fn of(self, expires_at: DateTime<Utc>) -> Freshness {
        let fresh_end = match (self.fresh_until, self.fresh_expiry) {
            (Some(until), Some(expiry)) if expiry == expires_at => until.min(expires_at),
            _ => expires_at,
        };
        Freshness {
            expires_at,
            fresh_end,
            read_at: self.read_at,
            compute: self
                .compute_us
                .and_then(|us| u64::try_from(us).ok())
                .map(Duration::from_micros),
        }
    }
}

/// A live entry found for `get_or_compute`, with its freshness when it was read
/// from the database; `None` when a near cache served it (it keeps entries only
/// while fresh, see [`Freshness::near_until`]).
pub(crate) struct Found<E> {
    pub(crate) entry: E,
    pub(crate) fresh: Option<Freshness>,
}

/// How fresh a live entry was when it was read (database clock throughout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Freshness {
    /// The row's expiry: also what tells one write of the key from the next.
    pub(crate) expires_at: DateTime<Utc>,
    fresh_end: DateTime<Utc>,
    read_at: DateTime<Utc>,
    compute: Option<Duration>,
}

impl Freshness {
    /// Whether a `get_or_compute` that read this entry should try to refresh it
    /// now: past its freshness (within the stale window, since it was still live),
    /// or, before that, when XFetch draws it (`beta` weighting the last
    /// computation's time; 0 never), given `random`, uniform in (0, 1].
    pub(crate) fn due(&self, beta: f64, random: f64) -> bool {
        let left = seconds(self.fresh_end - self.read_at);
        if left <= 0.0 {
            return true;
        }
        match self.compute {
            Some(delta) => xfetch_due(left, delta.as_secs_f64(), beta, random),
            None => false,
        }
    }

    /// How long a near cache may keep the entry: until its freshness ends, drawn
    /// earlier as XFetch would recompute (given `random`, uniform in (0, 1]), so
    /// that reads go to the database, where the refresh is decided, as the end
    /// nears; never past the expiry.
    pub(crate) fn near_until(&self, beta: f64, random: f64) -> DateTime<Utc> {
        let margin = match self.compute {
            Some(delta) if beta > 0.0 => delta.as_secs_f64() * beta * -random.ln(),
            _ => 0.0,
        };
        let margin = chrono::Duration::microseconds((margin * 1e6).round().min(1e15) as i64);
        (self.fresh_end - margin).min(self.expires_at)
    }
}

/// XFetch's test, `now - delta * beta * ln(random) >= expiry`, with `left` =
/// `expiry - now` and `delta` in seconds: true when the entry should be
/// recomputed now. `random` is uniform in (0, 1], so `-ln(random)` is an
/// exponential draw: the chance grows as the expiry nears, and with the time the
/// computation takes.
pub(crate) fn xfetch_due(left: f64, delta: f64, beta: f64, random: f64) -> bool {
    beta > 0.0 && delta * beta * -random.ln() >= left
}

/// A random number uniform in (0, 1], from the standard library's per-process
/// random hasher keys (no dependency for a draw that needs no strength).
pub(crate) fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    // 53 random bits: [0, 1) turned into (0, 1].
    1.0 - (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// A signed time span in seconds.
fn seconds(span: chrono::Duration) -> f64 {
    span.num_microseconds()
        .map_or(span.num_seconds() as f64, |us| us as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap()
    }

    fn read(fresh_until: Option<i64>, fresh_expiry: Option<i64>, compute_ms: Option<i64>) -> Facts {
        Facts {
            fresh_until: fresh_until.map(at),
            fresh_expiry: fresh_expiry.map(at),
            compute_us: compute_ms.map(|ms| ms * 1000),
            read_at: at(0),
        }
    }

    #[test]
    fn xfetch_recomputes_early_only_with_a_positive_beta() {
        // 10 ms left, a 50 ms computation: a draw of 1 (ln = 0) never recomputes,
        // an ordinary one (1/e: -ln = 1) does with beta 1, never with beta 0.
        assert!(!xfetch_due(0.010, 0.050, 1.0, 1.0));
        assert!(xfetch_due(0.010, 0.050, 1.0, (-1.0f64).exp()));
        assert!(!xfetch_due(0.010, 0.050, 0.0, 1e-300));
        // Far from the expiry a likely draw does not recompute; a rare one does.
        assert!(!xfetch_due(10.0, 0.050, 1.0, 0.5));
        assert!(xfetch_due(10.0, 0.050, 1.0, (-300.0f64).exp()));
    }

    #[test]
    fn past_its_freshness_a_live_entry_is_due_whatever_the_draw() {
        let stale = read(Some(-1), Some(5_000), None).of(at(5_000));
        assert!(stale.due(0.0, 1.0));
        let fresh = read(Some(1_000), Some(5_000), None).of(at(5_000));
        assert!(
            !fresh.due(1.0, 1e-300),
            "no computation time: no early draw"
        );
    }

    #[test]
    fn a_freshness_written_for_another_expiry_is_void() {
        // Rewritten by a plain set since: fresh until its own expiry.
        let overwritten = read(Some(-1), Some(4_000), Some(50)).of(at(5_000));
        assert!(!overwritten.due(1.0, 0.5));
        assert_eq!(overwritten.near_until(0.0, 0.5), at(5_000));
    }

    #[test]
    fn a_near_cache_keeps_an_entry_at_most_until_its_freshness_ends() {
        let fresh = read(Some(1_000), Some(5_000), Some(100)).of(at(5_000));
        assert_eq!(fresh.near_until(0.0, 0.5), at(1_000));
        // -ln(1/e) = 1: one computation's time earlier with beta 1, two with 2.
        let draw = (-1.0f64).exp();
        assert_eq!(fresh.near_until(1.0, draw), at(900));
        assert_eq!(fresh.near_until(2.0, draw), at(800));
    }

    #[test]
    fn random_draws_are_in_the_open_closed_unit_interval() {
        for _ in 0..1000 {
            let r = random_unit();
            assert!(r > 0.0 && r <= 1.0, "{r}");
        }
    }
}

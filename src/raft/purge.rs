//! The leader's purge of long-expired rows: which command it proposes, and
//! a round of them.
//!
//! Every ten minutes (`PURGE_EVERY` in `src/server.rs`) the leader runs one
//! round. Where every member can apply it, a round is a sequence of
//! [`Command::PurgeBounded`] entries of at most [`MAX_ROWS`] rows each,
//! proposed one after the other while the previous one answers that more
//! is due: a backlog (days without a leader, `limits.keep_expired_days`
//! lowered) is cleared in many short entries, and the writes proposed
//! meanwhile go between them instead of waiting behind one long entry
//! that could outlast the write timeout. Where some member has not said it
//! can apply the bounded command (a node of an older release during a
//! rolling upgrade, or a member not heard from yet), the round is the one
//! unbounded [`Command::Purge`] such a node applies alike: the same gate as
//! group proposal's (`StatusReport::applies_batches`).

use std::future::Future;
use std::time::{Duration, Instant};

use super::liveness::Liveness;
use super::types::{Command, NodeId, Response};
use crate::metrics::Metrics;

/// Rows one [`Command::PurgeBounded`] deletes at most (over every table a
/// purge deletes from, aliases and their tombstones first). Measured with
/// `purge_bench` (docs/benchmarks.md, "Purge and the expiry indexes"):
/// one entry of this many aliases applies in a few tens of milliseconds on
/// a loaded two-core machine, against a write timeout of seconds.
pub const MAX_ROWS: u64 = 1000;

/// Environment variable giving the time between two purge rounds in
/// milliseconds instead of ten minutes. Meant for tests that watch a round
/// through the binary; never set it in production.
pub const TEST_PURGE_EVERY_ENV: &str = "TEMPALIAS_TEST_PURGE_EVERY_MS";

/// The time between two purge rounds: `default`, or what
/// [`TEST_PURGE_EVERY_ENV`] says (at least 10 ms).
pub fn every(default: Duration) -> Duration {
    std::env::var(TEST_PURGE_EVERY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(default, |ms| Duration::from_millis(ms.max(10)))
}

/// Entries one round proposes at most: a bound on the loop, far beyond any
/// backlog (ten million rows). What is left waits for the next round.
const MAX_ENTRIES: u64 = 10_000;

/// The purge command a leader proposes now: bounded when every member of
/// `members` (this node aside) has said it applies [`Command::PurgeBounded`],
/// else the unbounded [`Command::Purge`] every release applies alike.
pub fn command_for(
    liveness: &Liveness,
    members: impl IntoIterator<Item = NodeId>,
    keep_ms: u64,
) -> Command {
    if liveness.all_apply_bounded_purges(members) {
        Command::PurgeBounded {
            keep_ms,
            max_rows: MAX_ROWS,
        }
    } else {
        Command::Purge { keep_ms }
    }
}

/// What one round of purge entries did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Round {
    /// Purge entries committed and applied.
    pub entries: u64,
    /// Entries that were bounded ([`Command::PurgeBounded`]).
    pub bounded: u64,
    /// Aliases deleted.
    pub aliases: u64,
    /// Rows deleted over every table.
    pub rows: u64,
    /// The round ended with rows still due: it reached `MAX_ENTRIES`, or
    /// this node stopped leading or is shutting down.
    pub more: bool,
    /// Why the last entry failed, if it did.
    pub error: Option<String>,
    pub elapsed: Duration,
}

/// Runs one round: proposes `next()` through `write` until an answer says
/// nothing more is due, an entry fails, `go_on()` turns false (no longer
/// the leader, shutting down) or `MAX_ENTRIES` entries were applied.
/// Yields between entries. Counts entries and rows in `metrics` as they
/// are applied.
pub async fn round<W, Fut, E>(
    mut write: W,
    next: impl Fn() -> Command,
    go_on: impl Fn() -> bool,
    metrics: &Metrics,
) -> Round
where
    W: FnMut(Command) -> Fut,
    Fut: Future<Output = Result<Response, E>>,
    E: std::fmt::Display,
{
    let started = Instant::now();
    let mut r = Round::default();
    while r.entries < MAX_ENTRIES {
        if !go_on() {
            r.more = r.entries > 0;
            break;
        }
        let cmd = next();
        let bounded = matches!(cmd, Command::PurgeBounded { .. });
        match write(cmd).await {
            Ok(Response::Purged { count, rows, more }) => {
                r.entries += 1;
                r.bounded += u64::from(bounded);
                r.aliases += count;
                r.rows += rows;
                metrics.purge_entries.inc();
                metrics.purged_aliases.inc_by(count);
                metrics.purged_rows.inc_by(rows);
                r.more = more;
                if !more {
                    break;
                }
            }
            Ok(other) => {
                r.error = Some(format!("unexpected answer {other:?}"));
                break;
            }
            Err(e) => {
                r.error = Some(e.to_string());
                break;
            }
        }
        // Writes queued meanwhile are proposed before the next entry.
        tokio::task::yield_now().await;
    }
    r.elapsed = started.elapsed();
    r
}

impl Round {
    /// Logs what the round did: one line when something was deleted or
    /// something went wrong, nothing for an idle round.
    pub fn log(&self) {
        let ms = self.elapsed.as_millis() as u64;
        if let Some(error) = &self.error {
            tracing::warn!(
                error = %error,
                entries = self.entries,
                aliases = self.aliases,
                rows = self.rows,
                "purge not committed"
            );
        } else if self.more {
            tracing::warn!(
                entries = self.entries,
                aliases = self.aliases,
                rows = self.rows,
                ms,
                "purge round ended with rows still due; the next round goes on"
            );
        } else if self.rows > 0 {
            tracing::info!(
                entries = self.entries,
                bounded = self.bounded == self.entries,
                aliases = self.aliases,
                rows = self.rows,
                ms,
                "purged long-expired aliases"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::cluster::messages::StatusReport;
    use crate::raft::liveness::Timing;

    fn liveness() -> Liveness {
        Liveness::new(
            1,
            Timing {
                probe_every: Duration::from_millis(80),
                probe_timeout: Duration::from_millis(250),
                lease: Duration::from_millis(500),
            },
        )
    }

    fn report(bounded: bool) -> StatusReport {
        StatusReport {
            leader: Some(1),
            applies_bounded_purges: bounded,
            ..StatusReport::for_test(0)
        }
    }

    const KEEP: u64 = 7 * 86_400_000;

    #[test]
    fn a_member_without_the_capability_gets_the_unbounded_purge() {
        let l = liveness();
        let bounded = Command::PurgeBounded {
            keep_ms: KEEP,
            max_rows: MAX_ROWS,
        };
        let unbounded = Command::Purge { keep_ms: KEEP };
        // Alone: bounded.
        assert_eq!(command_for(&l, [1], KEEP), bounded);
        // Members not heard from yet: unbounded.
        assert_eq!(command_for(&l, [1, 2, 3], KEEP), unbounded);
        l.record_probe(2, Some(&report(true)));
        l.record_probe(3, Some(&report(false)));
        assert_eq!(command_for(&l, [1, 2, 3], KEEP), unbounded);
        // The older member upgraded.
        l.record_probe(3, Some(&report(true)));
        assert_eq!(command_for(&l, [1, 2, 3], KEEP), bounded);
        // A new member joins: unbounded until it has said it can.
        assert_eq!(command_for(&l, [1, 2, 3, 4], KEEP), unbounded);
        l.record_probe(4, Some(&report(true)));
        assert_eq!(command_for(&l, [1, 2, 3, 4], KEEP), bounded);
    }

    /// A fake state machine holding `due` rows: each bounded entry deletes
    /// up to its bound, an unbounded one everything.
    struct Due {
        left: RefCell<u64>,
        seen: RefCell<Vec<Command>>,
    }

    impl Due {
        fn new(n: u64) -> Self {
            Self {
                left: RefCell::new(n),
                seen: RefCell::default(),
            }
        }

        fn apply(&self, cmd: Command) -> Result<Response, String> {
            let take = match &cmd {
                Command::PurgeBounded { max_rows, .. } => *max_rows,
                Command::Purge { .. } => u64::MAX,
                other => return Err(format!("not a purge: {other:?}")),
            };
            self.seen.borrow_mut().push(cmd);
            let mut left = self.left.borrow_mut();
            let n = take.min(*left);
            *left -= n;
            Ok(Response::Purged {
                count: n,
                rows: n,
                more: *left > 0,
            })
        }
    }

    #[tokio::test]
    async fn a_round_proposes_bounded_entries_until_nothing_is_due() {
        let due = Due::new(2 * MAX_ROWS + 5);
        let metrics = Metrics::new();
        let next = || Command::PurgeBounded {
            keep_ms: KEEP,
            max_rows: MAX_ROWS,
        };
        let run = || {
            round(
                |c| std::future::ready(due.apply(c)),
                next,
                || true,
                &metrics,
            )
        };
        let r = run().await;
        assert_eq!(r.entries, 3);
        assert_eq!(r.bounded, 3);
        assert_eq!((r.aliases, r.rows), (2 * MAX_ROWS + 5, 2 * MAX_ROWS + 5));
        assert!(!r.more && r.error.is_none());
        assert_eq!(*due.left.borrow(), 0);
        assert_eq!(metrics.purge_entries.get(), 3);
        assert_eq!(metrics.purged_rows.get(), 2 * MAX_ROWS + 5);
        // An idle round is one entry that finds nothing.
        let r = run().await;
        assert_eq!((r.entries, r.rows, r.more), (1, 0, false));
    }

    #[tokio::test]
    async fn a_round_with_an_older_member_is_one_unbounded_purge() {
        let due = Due::new(10 * MAX_ROWS);
        let l = liveness();
        l.record_probe(2, Some(&report(false)));
        let metrics = Metrics::new();
        let r = round(
            |c| std::future::ready(due.apply(c)),
            || command_for(&l, [1, 2], KEEP),
            || true,
            &metrics,
        )
        .await;
        assert_eq!((r.entries, r.bounded, r.rows), (1, 0, 10 * MAX_ROWS));
        assert_eq!(*due.seen.borrow(), vec![Command::Purge { keep_ms: KEEP }]);
    }

    #[tokio::test]
    async fn a_round_stops_on_a_failure_and_when_told_to() {
        let metrics = Metrics::new();
        let next = || Command::PurgeBounded {
            keep_ms: KEEP,
            max_rows: 1,
        };
        let r = round(
            |_| std::future::ready(Err::<Response, _>("no quorum")),
            next,
            || true,
            &metrics,
        )
        .await;
        assert_eq!(r.entries, 0);
        assert_eq!(r.error.as_deref(), Some("no quorum"));
        // Leadership lost after two entries: the rest waits.
        let due = Due::new(10);
        let calls = RefCell::new(0);
        let r = round(
            |c| std::future::ready(due.apply(c)),
            next,
            || {
                *calls.borrow_mut() += 1;
                *calls.borrow() <= 2
            },
            &metrics,
        )
        .await;
        assert_eq!((r.entries, r.rows, r.more), (2, 2, true));
        assert_eq!(*due.left.borrow(), 8);
    }

    #[tokio::test]
    async fn a_round_is_bounded_even_if_rows_keep_coming() {
        let metrics = Metrics::new();
        let always_more = |_| {
            std::future::ready(Ok::<_, String>(Response::Purged {
                count: 1,
                rows: 1,
                more: true,
            }))
        };
        let next = || Command::PurgeBounded {
            keep_ms: KEEP,
            max_rows: 1,
        };
        let r = round(always_more, next, || true, &metrics).await;
        assert_eq!((r.entries, r.more), (MAX_ENTRIES, true));
    }
}

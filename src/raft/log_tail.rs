//! The newest Raft log entries, kept in memory beside the redb log.
//!
//! Every entry is read back soon after it is appended: on the leader by each
//! replication stream (to send it) and by openraft's core (to apply it once
//! committed), on a follower by the core (to apply it). Reading it from redb
//! costs a hop to the blocking pool, a read transaction and a JSON decode,
//! and openraft 0.9's core awaits the apply read itself, so every write waited
//! for it between commit and answer. The entries were in memory a moment
//! before (`append` got them), so the log store keeps a copy of the newest
//! ones and answers a read from it when it holds the whole range.
//!
//! The tail holds consecutive entries, each identical to the log's entry at
//! its index: a subset of the durable log. It is changed together with the
//! log (filled after an append has committed; cut before a truncation or
//! purge commits, so it never holds an entry the log may already have lost).
//! That is all a read needs: the tail answers only a bounded range it holds
//! whole, and those entries are the log's. It need not reach the log's end:
//! it starts empty after a restart, and an append that failed or was
//! cancelled after its commit may leave the log's newest entries out of it
//! (the next append that does not follow its last entry starts it afresh).
//! A read it cannot answer whole (older entries, an unbounded range, entries
//! it lacks) goes to redb as before, so the answers are the same either way.
//! Nothing here is written to disk.

use std::collections::VecDeque;
use std::ops::{Bound, RangeBounds};

use super::types::TypeConfig;

type Entry = openraft::Entry<TypeConfig>;

/// Entries kept at most: far more than are ever between an append and the
/// last reader that needs it (replication to every follower, apply). A
/// follower further behind reads from redb, as before.
pub const MAX_ENTRIES: usize = 1024;

/// Encoded bytes kept at most, counted as the entries' JSON encoding as
/// written to the log (an entry holds up to about 128 commands of at most
/// ~400 bytes of JSON each, see `batch.rs`), so the tail stays a few MiB
/// whatever the entries hold (their in-memory size is of the same order).
pub const MAX_BYTES: usize = 4 * 1024 * 1024;

/// The newest log entries, consecutive, with their encoded sizes.
#[derive(Default)]
pub struct LogTail {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl LogTail {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    /// The entries of `range` if the tail holds every one of them (an empty
    /// range counts as held only when it lies within the tail), else `None`.
    pub fn get(&self, range: &(Bound<u64>, Bound<u64>)) -> Option<Vec<Entry>> {
        let (first, last) = (self.first_index()?, self.last_index()?);
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.checked_add(1)?,
            Bound::Unbounded => return None,
        };
        // Exclusive end.
        let end = match range.end_bound() {
            Bound::Included(&e) => e.checked_add(1)?,
            Bound::Excluded(&e) => e,
            Bound::Unbounded => return None,
        };
        if start < first || end > last + 1 || start > end {
            return None;
        }
        let from = usize::try_from(start - first).ok()?;
        let to = usize::try_from(end - first).ok()?;
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }

    /// Records entries just appended to the log (with their encoded sizes).
    /// Entries that do not follow the tail's last one start it afresh.
    pub fn append(&mut self, entries: impl IntoIterator<Item = (Entry, usize)>) {
        for (entry, size) in entries {
            let follows = match self.last_index() {
                None => true,
                Some(last) => entry.log_id.index == last + 1,
            };
            if !follows {
                self.entries.clear();
                self.bytes = 0;
            }
            self.bytes += size;
            self.entries.push_back((entry, size));
        }
        while self.entries.len() > MAX_ENTRIES || (self.bytes > MAX_BYTES && self.entries.len() > 1)
        {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }

    /// Forgets the entries from index `since` on (the log is truncated).
    pub fn truncate(&mut self, since: u64) {
        while self.last_index().is_some_and(|last| last >= since) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Forgets the entries up to index `upto` (the log is purged).
    pub fn purge(&mut self, upto: u64) {
        while self.first_index().is_some_and(|first| first <= upto) {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    fn entry(index: u64) -> (Entry, usize) {
        (
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
                payload: EntryPayload::Blank,
            },
            100,
        )
    }

    fn indexes(entries: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        entries.map(|es| es.iter().map(|e| e.log_id.index).collect())
    }

    fn range(start: u64, end: u64) -> (Bound<u64>, Bound<u64>) {
        (Bound::Included(start), Bound::Excluded(end))
    }

    #[test]
    fn answers_only_ranges_it_holds_whole() {
        let mut t = LogTail::default();
        assert_eq!(indexes(t.get(&range(1, 2))), None, "empty tail");
        t.append((5..=9).map(entry));
        assert_eq!(indexes(t.get(&range(5, 10))), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(indexes(t.get(&range(7, 9))), Some(vec![7, 8]));
        assert_eq!(
            indexes(t.get(&(Bound::Included(6), Bound::Included(9)))),
            Some(vec![6, 7, 8, 9])
        );
        assert_eq!(indexes(t.get(&range(7, 7))), Some(vec![]));
        // Older entries, or past the end, or unbounded: the database answers.
        assert_eq!(indexes(t.get(&range(4, 6))), None);
        assert_eq!(indexes(t.get(&range(8, 11))), None);
        assert_eq!(
            indexes(t.get(&(Bound::Included(6), Bound::Unbounded))),
            None
        );
        assert_eq!(
            indexes(t.get(&(Bound::Unbounded, Bound::Excluded(7)))),
            None
        );
    }

    #[test]
    fn follows_truncation_purge_and_gaps() {
        let mut t = LogTail::default();
        t.append((1..=6).map(entry));
        t.truncate(4);
        assert_eq!(indexes(t.get(&range(1, 4))), Some(vec![1, 2, 3]));
        assert_eq!(indexes(t.get(&range(3, 5))), None, "4 was truncated");
        t.append((4..=5).map(entry));
        assert_eq!(indexes(t.get(&range(3, 6))), Some(vec![3, 4, 5]));
        t.purge(2);
        assert_eq!(indexes(t.get(&range(2, 4))), None, "2 was purged");
        assert_eq!(indexes(t.get(&range(3, 4))), Some(vec![3]));
        // A snapshot installed meanwhile: the log goes on after a gap.
        t.append((20..=21).map(entry));
        assert_eq!(indexes(t.get(&range(5, 6))), None);
        assert_eq!(indexes(t.get(&range(20, 22))), Some(vec![20, 21]));
        t.truncate(0);
        assert_eq!(indexes(t.get(&range(20, 21))), None);
    }

    #[test]
    fn stays_bounded() {
        let mut t = LogTail::default();
        t.append((1..=(MAX_ENTRIES as u64 + 10)).map(entry));
        assert_eq!(t.entries.len(), MAX_ENTRIES);
        assert_eq!(t.first_index(), Some(11));
        let mut t = LogTail::default();
        t.append((1..=3).map(|i| (entry(i).0, MAX_BYTES / 2)));
        assert_eq!(t.entries.len(), 2);
        assert_eq!(t.bytes, MAX_BYTES);
        // One entry larger than the bound is still kept (it is the last).
        t.append([(entry(4).0, MAX_BYTES * 2)]);
        assert_eq!(indexes(t.get(&range(4, 5))), Some(vec![4]));
    }
}

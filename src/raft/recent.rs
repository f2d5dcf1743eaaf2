//! The last entries appended to the Raft log, kept in memory beside it.
//!
//! Owns: a copy of the log's newest entries, so that the leader's
//! replication and every member's apply (both read the entries just
//! appended) skip a read from the log file, and the entries the writer
//! thread has not written yet. Must not: hold an entry the log does not
//! hold at that index, or let go of one before it is written to the log
//! file ([`super::store`] reads the older entries from the file and these
//! after them).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::{Entry, LogId};

/// Entries kept in memory once written: the last ones appended.
pub(super) const RECENT: usize = 256;

/// The log's newest entries, by index, each with the number of the append
/// that brought it: exactly what the log holds at those indexes (every
/// append, truncation and purge updates both), contiguous, and never fewer
/// than the entries not yet written to the log file.
#[derive(Default)]
pub(super) struct Recent(Mutex<Inner>);

#[derive(Default)]
struct Inner {
    entries: BTreeMap<u64, (u64, Entry)>,
    /// The number the last append was given.
    appends: u64,
    /// Every append up to this number is written to the log file.
    written: u64,
}

impl Inner {
    /// Forgets the oldest entries beyond [`RECENT`], but none not written.
    fn trim(&mut self) {
        while self.entries.len() > RECENT {
            match self.entries.first_key_value() {
                Some((_, (append, _))) if *append <= self.written => self.entries.pop_first(),
                _ => break,
            };
        }
    }
}

impl Recent {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes in an append's entries; returns the append's number, for
    /// [`Recent::written`] once the log file holds them.
    pub(super) fn appended(&self, entries: &[Entry]) -> u64 {
        let mut r = self.inner();
        r.appends += 1;
        let append = r.appends;
        for e in entries {
            r.entries.insert(e.log_id.index, (append, e.clone()));
        }
        r.trim();
        append
    }

    /// Every append up to number `append` is in the log file: those entries may go.
    pub(super) fn written(&self, append: u64) {
        let mut r = self.inner();
        r.written = r.written.max(append);
        r.trim();
    }

    /// Forgets every entry from `index` on (a truncation).
    pub(super) fn truncated(&self, index: u64) {
        self.inner().entries.split_off(&index);
    }

    /// Forgets every entry up to `index` (a purge).
    pub(super) fn purged(&self, index: u64) {
        let mut r = self.inner();
        r.entries = r.entries.split_off(&index.saturating_add(1));
    }

    /// The log's last entry, if it is here (if nothing is, the log file
    /// holds the whole log).
    pub(super) fn last(&self) -> Option<LogId> {
        self.inner()
            .entries
            .last_key_value()
            .map(|(_, (_, e))| e.log_id)
    }

    /// The entries of `start..end` (`end` exclusive, `None`: to the last)
    /// held here, and the first index held here (`None`: nothing is). The
    /// caller reads the indexes below that from the log file, which holds
    /// them.
    pub(super) fn from(&self, start: u64, end: Option<u64>) -> (Option<u64>, Vec<Entry>) {
        let r = self.inner();
        let Some(&first) = r.entries.keys().next() else {
            return (None, Vec::new());
        };
        let (from, end) = (start.max(first), end.unwrap_or(u64::MAX));
        if from >= end {
            return (Some(first), Vec::new());
        }
        let tail = r
            .entries
            .range(from..end)
            .map(|(_, (_, e))| e.clone())
            .collect();
        (Some(first), tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(from: u64, to: u64, term: u64) -> Vec<Entry> {
        (from..=to)
            .map(|i| openraft::testing::blank_ent::<super::super::TypeConfig>(term, 1, i))
            .collect()
    }

    /// (first index held, the (index, term) of what is answered)
    fn read(r: &Recent, start: u64, end: Option<u64>) -> (Option<u64>, Vec<(u64, u64)>) {
        let (first, v) = r.from(start, end);
        let v = v
            .iter()
            .map(|e| (e.log_id.index, e.log_id.leader_id.term))
            .collect();
        (first, v)
    }

    #[test]
    fn answers_what_it_holds_and_says_where_the_log_must_answer() {
        let r = Recent::default();
        assert_eq!(read(&r, 1, None), (None, vec![]), "empty: all from file");
        let append = r.appended(&entries(5, 10, 1));
        r.written(append);
        let span = |a: u64, b: u64, t: u64| (a..=b).map(|i| (i, t)).collect::<Vec<_>>();
        // (start, end) -> what it answers
        let table = [
            ((5, Some(11)), span(5, 10, 1)),
            ((7, Some(9)), span(7, 8, 1)),
            ((8, None), span(8, 10, 1)),
            ((4, Some(8)), span(5, 7, 1)),
            ((1, Some(4)), vec![]),
            ((9, Some(12)), span(9, 10, 1)),
            ((11, None), vec![]),
        ];
        for ((start, end), want) in table {
            assert_eq!(read(&r, start, end), (Some(5), want), "{start}..{end:?}");
        }
        assert_eq!(r.last().map(|l| l.index), Some(10));
        // A follower's log truncated and rewritten in a newer term.
        r.truncated(8);
        assert_eq!(read(&r, 7, Some(9)).1, vec![(7, 1)]);
        r.appended(&entries(8, 9, 2));
        assert_eq!(read(&r, 7, Some(10)).1, vec![(7, 1), (8, 2), (9, 2)]);
        // A purge (a snapshot taken or installed) forgets the prefix.
        r.purged(7);
        assert_eq!(read(&r, 7, Some(9)), (Some(8), vec![(8, 2)]));
    }

    #[test]
    fn lets_go_of_the_oldest_only_once_written() {
        let r = Recent::default();
        let n = RECENT as u64;
        let first = r.appended(&entries(1, n, 1));
        let second = r.appended(&entries(n + 1, n + 10, 1));
        assert_eq!(read(&r, 1, Some(2)).1, vec![(1, 1)], "kept: not written");
        r.written(first);
        assert_eq!(read(&r, 1, Some(2)).0, Some(11), "written: the oldest go");
        // Only what is written may go, however many wait.
        let third = r.appended(&entries(n + 11, 3 * n, 1));
        assert_eq!(read(&r, 1, None).0, Some(n + 1), "the written ones go");
        r.written(second);
        assert_eq!(read(&r, 1, None).0, Some(n + 11));
        r.written(third);
        assert_eq!(read(&r, 1, None).0, Some(2 * n + 1));
    }
}

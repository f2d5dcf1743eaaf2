//! The last entries appended to the Raft log, kept in memory beside it.
//!
//! Owns: a bounded copy of the log's newest entries, so that the leader's
//! replication and every member's apply (both read the entries just
//! appended) skip a read from sled on the blocking pool. Must not: hold an
//! entry the log does not hold at that index, or answer a range it does
//! not hold whole ([`super::store`] keeps both in step and reads the log
//! otherwise).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::Entry;

/// Entries kept in memory beside the log: the last ones appended.
pub(super) const RECENT: usize = 256;

/// The last [`RECENT`] entries appended, by index: exactly what the log
/// holds at those indexes (every append, truncation and purge updates both),
/// so that the leader's replication and every member's apply, which read
/// the entries just appended, need no read from sled on the blocking pool.
#[derive(Default)]
pub(super) struct Recent(Mutex<BTreeMap<u64, Entry>>);

impl Recent {
    fn map(&self) -> MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn appended(&self, entries: &[Entry]) {
        let mut m = self.map();
        for e in entries {
            m.insert(e.log_id.index, e.clone());
        }
        while m.len() > RECENT {
            m.pop_first();
        }
    }

    /// Forgets every entry from `index` on (a truncation).
    pub(super) fn truncated(&self, index: u64) {
        self.map().split_off(&index);
    }

    /// Forgets every entry up to `index` (a purge).
    pub(super) fn purged(&self, index: u64) {
        let mut m = self.map();
        *m = m.split_off(&index.saturating_add(1));
    }

    /// Entries `start..end` (`end` exclusive, `None`: to the last) if every
    /// one of them is here, else `None` (read the log then).
    pub(super) fn get(&self, start: u64, end: Option<u64>) -> Option<Vec<Entry>> {
        let m = self.map();
        let (&first, &last) = (m.keys().next()?, m.keys().next_back()?);
        let end = end.unwrap_or(last.saturating_add(1));
        if start < first || end > last.saturating_add(1) {
            return None;
        }
        let entries: Vec<Entry> = m.range(start..end).map(|(_, e)| e.clone()).collect();
        // Never a hole: the log has none, and neither may what stands in.
        (entries.len() as u64 == end.saturating_sub(start)).then_some(entries)
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

    fn indexes(r: &Recent, start: u64, end: Option<u64>) -> Option<Vec<(u64, u64)>> {
        r.get(start, end).map(|v| {
            v.iter()
                .map(|e| (e.log_id.index, e.log_id.leader_id.term))
                .collect()
        })
    }

    #[test]
    fn only_whole_ranges_it_holds_as_the_log_holds_them() {
        let r = Recent::default();
        assert_eq!(indexes(&r, 1, None), None, "empty: read the log");
        r.appended(&entries(5, 10, 1));
        // (start, end) -> what it answers
        let table = [
            ((5, Some(11)), Some((5..=10).map(|i| (i, 1)).collect())),
            ((7, Some(9)), Some(vec![(7, 1), (8, 1)])),
            ((8, None), Some(vec![(8, 1), (9, 1), (10, 1)])),
            ((4, Some(8)), None),
            ((9, Some(12)), None),
            ((11, None), Some(vec![])),
        ];
        for ((start, end), want) in table {
            assert_eq!(indexes(&r, start, end), want, "{start}..{end:?}");
        }
        // A follower's log truncated and rewritten in a newer term.
        r.truncated(8);
        assert_eq!(indexes(&r, 7, Some(9)), None);
        r.appended(&entries(8, 9, 2));
        assert_eq!(indexes(&r, 7, Some(10)), Some(vec![(7, 1), (8, 2), (9, 2)]));
        // A purge (a snapshot taken or installed) forgets the prefix.
        r.purged(7);
        assert_eq!(indexes(&r, 7, Some(9)), None);
        assert_eq!(indexes(&r, 8, Some(10)), Some(vec![(8, 2), (9, 2)]));
        // Bounded: the oldest go first.
        r.appended(&entries(10, 10 + RECENT as u64, 2));
        assert_eq!(indexes(&r, 9, Some(11)), None);
        assert!(indexes(&r, 11, Some(12)).is_some());
    }
}

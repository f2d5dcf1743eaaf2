//! The Raft log's own file: each append one write, made durable by one
//! fdatasync.
//!
//! Owns: the file `log` in the Raft store's directory, its records (a
//! [`codec`] record whose head is the entry's index and whose body is the
//! entry's JSON), the offsets of the entries it holds, dropping a torn
//! last append on open, truncation and purging (a prefix forgotten, then
//! rewritten away once large). Must not: say when an append is durable
//! ([`super::flush`]'s writer syncs and answers), or run on an async
//! worker (every call may block).
//!
//! Why not sled: sled's own flush ends in a disk sync of its own, so an
//! append paid two syncs, and with three members on one disk it took
//! 0.5-0.65 ms at p50 before keyraft's fdatasync even began.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use super::codec;
use super::disk::{self, Disk};
use super::layout::LOG;
use super::Entry;
use crate::plant::{self, Plant};

/// Purged bytes that make a purge rewrite the file (once they also exceed
/// what is kept).
const COMPACT_AT: u64 = 1 << 20;

fn bad(why: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

/// One append's entries as records, ready for one write.
pub(super) struct Records {
    first: u64,
    pub(super) bytes: Vec<u8>,
    lens: Vec<u64>,
}

impl Records {
    pub(super) fn new(entries: &[Entry]) -> io::Result<Records> {
        let first = entries.first().map_or(0, |e| e.log_id.index);
        let mut r = Records {
            first,
            bytes: Vec::new(),
            lens: Vec::with_capacity(entries.len()),
        };
        for (i, e) in entries.iter().enumerate() {
            if e.log_id.index != first + i as u64 {
                return Err(bad("an append's entries are not consecutive"));
            }
            let json = serde_json::to_vec(e).map_err(bad)?;
            let len = codec::put(&mut r.bytes, e.log_id.index.to_le_bytes(), &json).map_err(bad)?;
            r.lens.push(len);
        }
        Ok(r)
    }

    /// How many entries these are.
    pub(super) fn count(&self) -> usize {
        self.lens.len()
    }
}

/// Parses the record at the start of `bytes`: its index, its entry's JSON
/// and its whole length; `None` if it is cut short or does not check.
fn record(bytes: &[u8]) -> Option<(u64, &[u8], usize)> {
    codec::take::<8>(bytes).map(|(index, json, len)| (u64::from_le_bytes(index), json, len))
}

/// The log file and where each entry it holds starts.
pub(super) struct LogFile {
    disk: Arc<dyn Disk>,
    /// Index of the first entry held (the next one's when none is).
    first: u64,
    /// Offset of each entry held, from `first` on.
    offsets: VecDeque<u64>,
    /// Where the next record goes: the end of the last one.
    end: u64,
}

impl LogFile {
    /// Opens the log on `disk` (an empty one if there is none) and forgets
    /// what `purged` covers. A last append cut short by a crash (never
    /// acknowledged: its sync did not finish) is dropped, with a warning.
    pub(super) fn open(disk: Arc<dyn Disk>, purged: Option<u64>) -> io::Result<Self> {
        let bytes = disk::read_or_create(disk.as_ref(), LOG)?;
        let mut log = LogFile {
            disk,
            first: 0,
            offsets: VecDeque::new(),
            end: 0,
        };
        let mut at = 0usize;
        while let Some((index, _, len)) = bytes.get(at..).and_then(record) {
            let all_purged = purged.is_some_and(|p| log.next() <= p + 1 && index <= p + 1);
            if !log.offsets.is_empty() && index != log.next() && all_purged {
                // Purged entries followed by later ones (a purge past the
                // log's end that a crash kept from emptying the file).
                log.offsets.clear();
            }
            if !log.offsets.is_empty() && index != log.next() {
                return Err(bad(format!(
                    "entry {index} follows entry {} in the log",
                    log.next() - 1,
                )));
            }
            if log.offsets.is_empty() {
                log.first = index;
            }
            log.offsets.push_back(at as u64);
            at += len;
        }
        log.end = at as u64;
        if at < bytes.len() {
            tracing::warn!(
                "dropping {} bytes of a last append cut short at the end of the log",
                bytes.len() - at,
            );
            if plant::on(Plant::TornTailAccepted) {
                // Planted: the torn bytes stay, and the next append goes
                // after them, where the next open never reads it.
                log.end = bytes.len() as u64;
            } else {
                log.disk.set_len(LOG, log.end)?;
                log.disk.sync(LOG)?;
            }
        }
        match purged {
            Some(p) if !log.offsets.is_empty() && log.first > p + 1 => Err(bad(format!(
                "the log starts at entry {} but only entries up to {p} were purged",
                log.first
            ))),
            Some(p) => {
                log.forget_to(p);
                Ok(log)
            }
            None if !log.offsets.is_empty() && log.first > 1 => Err(bad(format!(
                "the log starts at entry {} and nothing was purged",
                log.first
            ))),
            None => Ok(log),
        }
    }

    /// The index the next append must start at.
    fn next(&self) -> u64 {
        self.first + self.offsets.len() as u64
    }

    /// The first and last index held, if any.
    pub(super) fn bounds(&self) -> Option<(u64, u64)> {
        (!self.offsets.is_empty()).then(|| (self.first, self.next() - 1))
    }

    /// Writes an append's records after the last entry (not synced).
    pub(super) fn append(&mut self, r: &Records) -> io::Result<()> {
        if r.lens.is_empty() {
            return Ok(());
        }
        // A log that never held an entry and purged none may start anywhere.
        let anywhere = self.offsets.is_empty() && self.first == 0;
        if anywhere {
            self.first = r.first;
        } else if r.first != self.next() {
            return Err(bad(format!(
                "an append at entry {} after entry {}",
                r.first,
                self.next() - 1
            )));
        }
        self.disk.write_at(LOG, self.end, &r.bytes)?;
        for len in &r.lens {
            self.offsets.push_back(self.end);
            self.end += len;
        }
        Ok(())
    }

    /// Entries `start..end` it holds (`end` exclusive).
    pub(super) fn read(&self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        let (start, end) = (start.max(self.first), end.min(self.next()));
        if start >= end {
            return Ok(Vec::new());
        }
        let at = |i: u64| self.offsets[(i - self.first) as usize];
        let from = at(start);
        let to = if end == self.next() {
            self.end
        } else {
            at(end)
        };
        let mut bytes = vec![0; (to - from) as usize];
        self.disk.read_at(LOG, from, &mut bytes)?;
        let mut entries = Vec::with_capacity((end - start) as usize);
        let mut pos = 0usize;
        for want in start..end {
            let (index, json, len) = bytes
                .get(pos..)
                .and_then(record)
                .ok_or_else(|| bad(format!("entry {want} in the log does not check")))?;
            if index != want {
                return Err(bad(format!("entry {index} found where {want} belongs")));
            }
            entries.push(serde_json::from_slice(json).map_err(bad)?);
            pos += len;
        }
        Ok(entries)
    }

    /// Forgets entries from `from` on, and syncs the shorter file.
    pub(super) fn truncate(&mut self, from: u64) -> io::Result<()> {
        if from >= self.next() {
            return Ok(());
        }
        let keep = from.saturating_sub(self.first) as usize;
        self.end = if keep < self.offsets.len() {
            self.offsets[keep]
        } else {
            self.end
        };
        self.offsets.truncate(keep);
        self.disk.set_len(LOG, self.end)?;
        self.disk.sync(LOG)
    }

    /// Forgets entries up to `to` (no I/O).
    fn forget_to(&mut self, to: u64) {
        while self.first <= to && self.offsets.pop_front().is_some() {
            self.first += 1;
        }
        if self.offsets.is_empty() {
            self.first = self.first.max(to + 1);
        }
    }

    /// Purges entries up to `to`. Once the purged bytes are large, the
    /// file is rewritten without them; `durable` is called first, and must
    /// make the purge point (and the snapshot behind it) survive a crash.
    pub(super) fn purge(
        &mut self,
        to: u64,
        durable: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        self.forget_to(to);
        if self.offsets.is_empty() && self.end > 0 {
            // Every entry held is purged (a snapshot past the log's end):
            // the file is emptied, or the next append would follow
            // entries it skips, and the next open would refuse the log.
            durable()?;
            self.disk.set_len(LOG, 0)?;
            self.disk.sync(LOG)?;
            self.end = 0;
            return Ok(());
        }
        let dead = self.offsets.front().copied().unwrap_or(self.end);
        if dead < COMPACT_AT || dead < self.end - dead {
            return Ok(());
        }
        durable()?;
        // What the writer wrote to the old file is made durable there
        // first: a crash before the rename is durable brings it back.
        self.disk.sync(LOG)?;
        let mut kept = vec![0; (self.end - dead) as usize];
        self.disk.read_at(LOG, dead, &mut kept)?;
        disk::replace(self.disk.as_ref(), LOG, &kept)?;
        for o in self.offsets.iter_mut() {
            *o -= dead;
        }
        self.end -= dead;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::disk::FileDisk;

    fn entries(from: u64, to: u64, term: u64) -> Vec<Entry> {
        (from..=to)
            .map(|i| openraft::testing::blank_ent::<super::super::TypeConfig>(term, 1, i))
            .collect()
    }

    fn ids(v: Vec<Entry>) -> Vec<(u64, u64)> {
        v.iter()
            .map(|e| (e.log_id.index, e.log_id.leader_id.term))
            .collect()
    }

    fn disk(dir: &tempfile::TempDir) -> Arc<dyn Disk> {
        Arc::new(FileDisk::open(dir.path()).expect("disk"))
    }

    #[test]
    fn what_is_appended_reads_back_after_a_reopen_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().expect("dir");
        let disk = disk(&dir);
        let mut log = LogFile::open(disk.clone(), None).expect("open");
        log.append(&Records::new(&entries(1, 5, 1)).expect("records"))
            .expect("append");
        log.append(&Records::new(&entries(6, 6, 1)).expect("records"))
            .expect("append");
        assert!(
            log.append(&Records::new(&entries(8, 8, 1)).expect("records"))
                .is_err(),
            "a hole is refused"
        );
        assert_eq!(ids(log.read(2, 4).expect("read")), vec![(2, 1), (3, 1)]);
        let end = log.end;
        drop(log);
        // A crash in the middle of the next append: half a record.
        let half = Records::new(&entries(7, 7, 1)).expect("records");
        disk.write_at(LOG, end, &half.bytes[..half.bytes.len() / 2])
            .expect("write");
        let log = LogFile::open(disk.clone(), None).expect("reopen");
        assert_eq!(log.bounds(), Some((1, 6)));
        assert_eq!(log.end, end, "the torn record is cut off the file");
        assert_eq!(
            ids(log.read(1, 100).expect("read")),
            (1..=6).map(|i| (i, 1)).collect::<Vec<_>>()
        );
    }

    /// A snapshot ahead of a lagging log purges past its end: the entries
    /// after it must not follow the skipped ones in the file, and a file a
    /// crash kept from being emptied still opens.
    #[test]
    fn a_purge_past_the_end_empties_the_log_and_the_next_entries_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let disk = disk(&dir);
        let mut log = LogFile::open(disk.clone(), None).expect("open");
        log.append(&Records::new(&entries(1, 4, 1)).expect("records"))
            .expect("append");
        let stale = disk.read(LOG).expect("read").expect("a file");
        log.purge(9, || Ok(())).expect("purge");
        log.append(&Records::new(&entries(10, 12, 2)).expect("records"))
            .expect("append");
        drop(log);
        let log = LogFile::open(disk.clone(), Some(9)).expect("reopen");
        assert_eq!(log.bounds(), Some((10, 12)));
        // The purge point durable, the file not yet emptied, then appends.
        let mut kept = stale;
        kept.extend(Records::new(&entries(10, 11, 2)).expect("records").bytes);
        disk::replace(disk.as_ref(), LOG, &kept).expect("replace");
        let log = LogFile::open(disk, Some(9)).expect("reopen after a crash");
        assert_eq!(ids(log.read(1, 100).expect("read")), vec![(10, 2), (11, 2)]);
    }

    #[test]
    fn truncation_and_purges_survive_a_reopen_and_large_purges_shrink_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let disk = disk(&dir);
        let mut log = LogFile::open(disk.clone(), None).expect("open");
        log.append(&Records::new(&entries(1, 10, 1)).expect("records"))
            .expect("append");
        log.truncate(8).expect("truncate");
        log.append(&Records::new(&entries(8, 9, 2)).expect("records"))
            .expect("append");
        let mut synced = 0;
        log.purge(3, || {
            synced += 1;
            Ok(())
        })
        .expect("purge");
        assert_eq!(synced, 0, "a small purge rewrites nothing");
        let want: Vec<(u64, u64)> = (4..=7).map(|i| (i, 1)).chain([(8, 2), (9, 2)]).collect();
        assert_eq!(ids(log.read(1, 100).expect("read")), want);
        drop(log);
        // The purge point lost in a crash: entries 1-3 are still there.
        let log = LogFile::open(disk.clone(), None).expect("reopen");
        assert_eq!(log.bounds(), Some((1, 9)));
        drop(log);
        let mut log = LogFile::open(disk.clone(), Some(3)).expect("reopen");
        assert_eq!(ids(log.read(1, 100).expect("read")), want);
        // Enough entries that a purge of most rewrites the file.
        let many = entries(10, 30_000, 2);
        log.append(&Records::new(&many).expect("records"))
            .expect("append");
        let before = log.end;
        log.purge(29_990, || {
            synced += 1;
            Ok(())
        })
        .expect("purge");
        assert_eq!(synced, 1, "the purge point is made durable first");
        assert!(log.end < before / 100, "{} bytes kept of {before}", log.end);
        let tail: Vec<(u64, u64)> = (29_991..=30_000).map(|i| (i, 2)).collect();
        assert_eq!(ids(log.read(1, 40_000).expect("read")), tail);
        log.append(&Records::new(&entries(30_001, 30_001, 2)).expect("records"))
            .expect("append");
        drop(log);
        let log = LogFile::open(disk.clone(), Some(29_990)).expect("reopen");
        assert_eq!(log.bounds(), Some((29_991, 30_001)));
        assert!(
            LogFile::open(disk, Some(100)).is_err(),
            "a log that starts past the purge point has a hole"
        );
    }
}

//! The Raft log's own file: each append one `write`, made durable by one
//! `fdatasync`.
//!
//! Owns: the file `log` in the Raft store's directory, its record format
//! (length, CRC-32, index, the entry's JSON), the offsets of the entries it
//! holds, dropping a torn last append on open, truncation, purging (a
//! prefix forgotten, then rewritten away once large) and the move of a log
//! an older keyraft kept in sled. Must not: say when an append is durable
//! ([`super::flush`]'s writer thread syncs and answers), or run on an async
//! worker (every call blocks).
//!
//! Why not sled: sled's own flush ends in a disk sync of its own, so an
//! append paid two syncs, and with three members on one disk it took
//! 0.5-0.65 ms at p50 before keyraft's fdatasync even began.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Entry;

/// Bytes before each record's entry: its length, its CRC-32 (of the index
/// and the entry), its index.
const HEADER: usize = 16;

/// Largest entry a record may hold: a length beyond it is a torn header.
const MAX_RECORD: usize = 64 << 20;

/// Purged bytes that make a purge rewrite the file (once they also exceed
/// what is kept).
const COMPACT_AT: u64 = 1 << 20;

fn bad(why: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

/// One append's entries as records, ready for one write.
pub(super) struct Records {
    first: u64,
    bytes: Vec<u8>,
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
            let index = e.log_id.index.to_le_bytes();
            let mut crc = crc32fast::Hasher::new();
            crc.update(&index);
            crc.update(&json);
            let len = u32::try_from(json.len()).map_err(bad)?;
            r.bytes.extend_from_slice(&len.to_le_bytes());
            r.bytes.extend_from_slice(&crc.finalize().to_le_bytes());
            r.bytes.extend_from_slice(&index);
            r.bytes.extend_from_slice(&json);
            r.lens.push((HEADER + json.len()) as u64);
        }
        Ok(r)
    }
}

/// Parses the record at the start of `bytes`: its index, its entry's JSON
/// and its whole length; `None` if it is cut short or does not check.
fn record(bytes: &[u8]) -> Option<(u64, &[u8], usize)> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    let len = word(0)? as usize;
    if len > MAX_RECORD {
        return None;
    }
    let index_bytes = bytes.get(8..16)?;
    let json = bytes.get(HEADER..HEADER + len)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(index_bytes);
    crc.update(json);
    if crc.finalize() != word(4)? {
        return None;
    }
    let index = u64::from_le_bytes(index_bytes.try_into().ok()?);
    Some((index, json, HEADER + len))
}

/// The log file and where each entry it holds starts.
pub(super) struct LogFile {
    path: PathBuf,
    file: Arc<File>,
    /// Index of the first entry held (the next one's when none is).
    first: u64,
    /// Offset of each entry held, from `first` on.
    offsets: VecDeque<u64>,
    /// Where the next record goes: the end of the last one.
    end: u64,
}

impl LogFile {
    /// Opens the log in `dir`, first moving into it what `sled_log` (an
    /// older keyraft's log tree) holds, and forgets what `purged` covers.
    /// A last append cut short by a crash (never acknowledged: its sync did
    /// not finish) is dropped, with a warning.
    pub(super) fn open(dir: &Path, sled_log: &sled::Tree, purged: Option<u64>) -> io::Result<Self> {
        let path = dir.join("log");
        if !path.exists() {
            move_from_sled(dir, &path, sled_log)?;
        }
        if !sled_log.is_empty() {
            // Moved by an earlier start that stopped before this.
            sled_log.clear().map_err(bad)?;
        }
        let mut file = OpenOptions::new().read(true).write(true).open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut log = LogFile {
            path,
            file: Arc::new(file),
            first: 0,
            offsets: VecDeque::new(),
            end: 0,
        };
        let mut at = 0usize;
        while let Some((index, _, len)) = bytes.get(at..).and_then(record) {
            if !log.offsets.is_empty() && index != log.next() {
                return Err(bad(format!(
                    "entry {index} follows entry {} in {}",
                    log.next() - 1,
                    log.path.display()
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
                "dropping {} bytes of a last append cut short at the end of {}",
                bytes.len() - at,
                log.path.display()
            );
            log.file.set_len(log.end)?;
            log.file.sync_data()?;
        }
        match purged {
            Some(p) if !log.offsets.is_empty() && log.first > p + 1 => Err(bad(format!(
                "{} starts at entry {} but only entries up to {p} were purged",
                log.path.display(),
                log.first
            ))),
            Some(p) => {
                log.forget_to(p);
                Ok(log)
            }
            None if !log.offsets.is_empty() && log.first > 1 => Err(bad(format!(
                "{} starts at entry {} and nothing was purged",
                log.path.display(),
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

    /// The file, to sync it without holding the log.
    pub(super) fn file(&self) -> Arc<File> {
        self.file.clone()
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
        self.file.write_all_at(&r.bytes, self.end)?;
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
        self.file.read_exact_at(&mut bytes, from)?;
        let mut entries = Vec::with_capacity((end - start) as usize);
        let mut pos = 0usize;
        for want in start..end {
            let (index, json, len) = bytes.get(pos..).and_then(record).ok_or_else(|| {
                bad(format!(
                    "entry {want} in {} does not check",
                    self.path.display()
                ))
            })?;
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
        self.file.set_len(self.end)?;
        self.file.sync_data()
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
        let dead = self.offsets.front().copied().unwrap_or(self.end);
        if dead < COMPACT_AT || dead < self.end - dead {
            return Ok(());
        }
        durable()?;
        let mut kept = vec![0; (self.end - dead) as usize];
        self.file.read_exact_at(&mut kept, dead)?;
        let file = replace(&self.path, &kept)?;
        for o in self.offsets.iter_mut() {
            *o -= dead;
        }
        self.end -= dead;
        self.file = Arc::new(file);
        Ok(())
    }
}

/// Writes `bytes` as the whole new content of `path`: a temporary file,
/// synced, renamed over it, the directory synced. Returns it open.
fn replace(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let tmp = path.with_extension("new");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        crate::durable::fsync_dir(dir)?;
    }
    OpenOptions::new().read(true).write(true).open(path)
}

/// Creates the log file from what an older keyraft kept in sled's log tree
/// (nothing, on a new data dir). The file appears whole or not at all.
fn move_from_sled(dir: &Path, path: &Path, sled_log: &sled::Tree) -> io::Result<()> {
    let mut entries: Vec<Entry> = Vec::new();
    for kv in sled_log.iter() {
        let (_, v) = kv.map_err(bad)?;
        entries.push(serde_json::from_slice(&v).map_err(bad)?);
    }
    let records = Records::new(&entries)?;
    if !entries.is_empty() {
        tracing::info!(
            "moving {} Raft log entries from sled to {}",
            entries.len(),
            path.display()
        );
    }
    replace(path, &records.bytes)?;
    crate::durable::fsync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn sled_tree(dir: &Path) -> sled::Tree {
        let db = sled::Config::new()
            .path(dir.join("sled"))
            .open()
            .expect("sled");
        db.open_tree("log").expect("tree")
    }

    #[test]
    fn what_is_appended_reads_back_after_a_reopen_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().expect("dir");
        let tree = sled_tree(dir.path());
        let mut log = LogFile::open(dir.path(), &tree, None).expect("open");
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
        let f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("log"))
            .expect("file");
        (&f).write_all(&half.bytes[..half.bytes.len() / 2])
            .expect("write");
        let log = LogFile::open(dir.path(), &tree, None).expect("reopen");
        assert_eq!(log.bounds(), Some((1, 6)));
        assert_eq!(log.end, end, "the torn record is cut off the file");
        assert_eq!(
            ids(log.read(1, 100).expect("read")),
            (1..=6).map(|i| (i, 1)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn truncation_and_purges_survive_a_reopen_and_large_purges_shrink_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let tree = sled_tree(dir.path());
        let mut log = LogFile::open(dir.path(), &tree, None).expect("open");
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
        let log = LogFile::open(dir.path(), &tree, None).expect("reopen");
        assert_eq!(log.bounds(), Some((1, 9)));
        drop(log);
        let mut log = LogFile::open(dir.path(), &tree, Some(3)).expect("reopen");
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
        let log = LogFile::open(dir.path(), &tree, Some(29_990)).expect("reopen");
        assert_eq!(log.bounds(), Some((29_991, 30_001)));
        assert!(
            LogFile::open(dir.path(), &tree, Some(100)).is_err(),
            "a log that starts past the purge point has a hole"
        );
    }

    #[test]
    fn an_older_keyraft_log_in_sled_moves_into_the_file_once() {
        let dir = tempfile::tempdir().expect("dir");
        let tree = sled_tree(dir.path());
        for e in entries(5, 9, 3) {
            tree.insert(
                e.log_id.index.to_be_bytes(),
                serde_json::to_vec(&e).expect("json"),
            )
            .expect("insert");
        }
        let log = LogFile::open(dir.path(), &tree, Some(4)).expect("open");
        assert_eq!(log.bounds(), Some((5, 9)));
        assert!(tree.is_empty(), "sled's copy is cleared");
        drop(log);
        let log = LogFile::open(dir.path(), &tree, Some(4)).expect("reopen");
        assert_eq!(
            ids(log.read(0, 100).expect("read")),
            (5..=9).map(|i| (i, 3)).collect::<Vec<_>>()
        );
    }
}

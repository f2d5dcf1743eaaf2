//! A small file of named values (the vote, the applied state, what this
//! node remembers of each member): each change one record appended, the
//! last record of a name its value, made durable by one fdatasync.
//!
//! Opening reads every record into memory and drops a torn last one (a
//! write a crash cut short was never synced, so nobody relied on it). Once
//! the records no longer current outweigh the current ones, the file is
//! rewritten with only those, in a new file renamed over it.
//!
//! Owns: one values file's record format (a [`codec`] record whose body is
//! a kind byte, the name's length and bytes, the value) and its
//! compaction. Must not: say when a change must be durable (its owner
//! calls [`Values::sync`]), or decode a value.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::codec;
use super::disk::{self, Disk};

/// Bytes of records no longer current that make a change rewrite the
/// file (once they also outweigh the current ones).
const COMPACT_AT: u64 = 1 << 20;

const PUT: u8 = 1;
const REMOVE: u8 = 0;

fn bad(why: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

/// One values file: what each name holds now, and where the file ends.
pub struct Values {
    disk: Arc<dyn Disk>,
    name: &'static str,
    values: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Where the next record goes.
    end: u64,
    /// Bytes of the current records.
    live: u64,
    /// Why the file may no longer be written (a write or sync failed).
    broken: Option<String>,
}

/// A values file shared by the store's parts.
pub type Shared = Arc<Mutex<Values>>;

/// The values file, locked: a poisoned lock means a write may be half
/// done, so it is not used again.
pub fn locked(values: &Shared) -> io::Result<MutexGuard<'_, Values>> {
    values
        .lock()
        .map_err(|_| io::Error::other("a Raft store file is unusable after a panic"))
}

/// The length of the record of `key` and `value`.
fn size(key: &[u8], value: &[u8]) -> u64 {
    (codec::PREFIX + 2 + key.len() + value.len()) as u64
}

fn record(kind: u8, key: &[u8], value: &[u8]) -> io::Result<Vec<u8>> {
    let klen = u8::try_from(key.len()).map_err(|_| bad("a value's name is too long"))?;
    let mut body = Vec::with_capacity(2 + key.len() + value.len());
    body.extend_from_slice(&[kind, klen]);
    body.extend_from_slice(key);
    body.extend_from_slice(value);
    let mut out = Vec::with_capacity(codec::PREFIX + body.len());
    codec::put(&mut out, [], &body).map_err(bad)?;
    Ok(out)
}

/// A values file holding `pairs`, as bytes.
pub(super) fn image(pairs: &[(Vec<u8>, Vec<u8>)]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend(record(PUT, k, v)?);
    }
    Ok(out)
}

impl Values {
    /// Opens `name` on `disk` (an empty one if there is no such file).
    pub fn open(disk: Arc<dyn Disk>, name: &'static str) -> io::Result<Values> {
        let bytes = disk::read_or_create(disk.as_ref(), name)?;
        let mut values = BTreeMap::new();
        let mut at = 0usize;
        while let Some(([], body, len)) = bytes.get(at..).and_then(codec::take::<0>) {
            let (kind, klen) = match body {
                [kind, klen, ..] => (*kind, *klen as usize),
                _ => return Err(bad(format!("a record of {name} has no name"))),
            };
            let key = body
                .get(2..2 + klen)
                .ok_or_else(|| bad(format!("a record of {name} is cut short")))?;
            match kind {
                PUT => values.insert(key.to_vec(), body[2 + klen..].to_vec()),
                REMOVE => values.remove(key),
                other => return Err(bad(format!("a record of {name} is of kind {other}"))),
            };
            at += len;
        }
        if at < bytes.len() {
            tracing::warn!(
                "dropping {} bytes of a last write cut short at the end of {name}",
                bytes.len() - at
            );
            disk.set_len(name, at as u64)?;
            disk.sync(name)?;
        }
        let mut v = Values {
            disk,
            name,
            values,
            end: at as u64,
            live: 0,
            broken: None,
        };
        v.live = v.current()?.len() as u64;
        Ok(v)
    }

    /// A values file, shared.
    pub fn shared(disk: Arc<dyn Disk>, name: &'static str) -> io::Result<Shared> {
        Ok(Arc::new(Mutex::new(Values::open(disk, name)?)))
    }

    /// What `key` holds.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.values.get(key).map(Vec::as_slice)
    }

    /// What `key` holds, decoded.
    pub fn get_json<T: DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        self.get(key)
            .map(|v| serde_json::from_slice(v).map_err(bad))
            .transpose()
    }

    /// Every name and value.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.values
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.values.contains_key(key)
    }

    /// Sets `key` to `value` (not durable until [`Values::sync`]).
    pub fn put(&mut self, key: &[u8], value: Vec<u8>) -> io::Result<()> {
        self.write(record(PUT, key, &value)?)?;
        self.live += size(key, &value);
        if let Some(old) = self.values.insert(key.to_vec(), value) {
            self.live -= size(key, &old);
        }
        self.compact_if_large()
    }

    /// Sets `key` to `value` as JSON.
    pub fn put_json<T: Serialize>(&mut self, key: &[u8], value: &T) -> io::Result<()> {
        self.put(key, serde_json::to_vec(value).map_err(bad)?)
    }

    /// Forgets `key` (not durable until [`Values::sync`]).
    pub fn remove(&mut self, key: &[u8]) -> io::Result<()> {
        if !self.values.contains_key(key) {
            return Ok(());
        }
        self.write(record(REMOVE, key, &[])?)?;
        if let Some(old) = self.values.remove(key) {
            self.live -= size(key, &old);
        }
        self.compact_if_large()
    }

    /// Makes every change so far survive a crash.
    pub fn sync(&mut self) -> io::Result<()> {
        self.usable()?;
        let synced = self.disk.sync(self.name);
        self.fail_on(synced)
    }

    /// An error of an earlier write or sync: after it, where the file ends
    /// and what survived are unknown, so nothing more is written.
    fn usable(&self) -> io::Result<()> {
        match &self.broken {
            Some(why) => Err(io::Error::other(format!("{}: {why}", self.name))),
            None => Ok(()),
        }
    }

    fn fail_on<T>(&mut self, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            self.broken.get_or_insert_with(|| e.to_string());
        }
        r
    }

    fn write(&mut self, record: Vec<u8>) -> io::Result<()> {
        self.usable()?;
        let written = self.disk.write_at(self.name, self.end, &record);
        self.fail_on(written)?;
        self.end += record.len() as u64;
        Ok(())
    }

    /// Every current value as records.
    fn current(&self) -> io::Result<Vec<u8>> {
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = self
            .values
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        image(&pairs)
    }

    /// Rewrites the file with only the current records once the others
    /// are many: synced, so everything written before is durable too.
    fn compact_if_large(&mut self) -> io::Result<()> {
        let dead = self.end.saturating_sub(self.live);
        if dead < COMPACT_AT || dead < self.live {
            return Ok(());
        }
        let bytes = self.current()?;
        let replaced = disk::replace(self.disk.as_ref(), self.name, &bytes);
        self.fail_on(replaced)?;
        self.end = bytes.len() as u64;
        self.live = self.end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::disk::FileDisk;

    #[test]
    fn values_survive_a_reopen_a_torn_tail_is_dropped_and_a_large_file_shrinks() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let disk: Arc<dyn Disk> = Arc::new(FileDisk::open(tmp.path()).expect("disk"));
        let mut v = Values::open(disk.clone(), "meta").expect("open");
        v.put_json(b"vote", &3u64).expect("put");
        v.put_json(b"gone", &1u64).expect("put");
        v.remove(b"gone").expect("remove");
        v.sync().expect("sync");
        let end = v.end;
        // A torn last write: a record cut short.
        disk.write_at(
            "meta",
            end,
            &record(PUT, b"vote", b"4").expect("record")[..9],
        )
        .expect("torn write");
        drop(v);
        let mut v = Values::open(disk.clone(), "meta").expect("reopen");
        assert_eq!(v.get_json::<u64>(b"vote").expect("decodes"), Some(3));
        assert!(!v.contains(b"gone"));
        assert_eq!(v.end, end, "the torn record is cut off");
        let big = vec![7u8; 64 << 10];
        for _ in 0..40 {
            v.put(b"state", big.clone()).expect("put");
        }
        v.sync().expect("sync");
        let size = disk.read("meta").expect("read").expect("a file").len() as u64;
        assert!(size < 2 * COMPACT_AT, "{size} bytes: never rewritten");
        drop(v);
        let v = Values::open(disk, "meta").expect("reopen");
        assert_eq!(v.get(b"state"), Some(&big[..]));
        assert_eq!(v.get_json::<u64>(b"vote").expect("decodes"), Some(3));
    }
}

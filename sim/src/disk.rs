//! Each host's disk: the files of keyraft's Raft store directory, behind
//! keyraft's own `raft::disk::Disk` calls, so keyraft's real log file,
//! values files, writer (group commit) and recovery run on every seed.
//!
//! A write lands in the page cache at once (reads see it) and survives a
//! crash only once its file is synced; a name created or renamed survives
//! only once the directory is synced. At a power loss each file keeps
//! what was synced plus a drawn prefix of the writes made since, in
//! order, the last of them possibly torn part way (a sector that made it,
//! the next that did not); names fall back to the last synced directory.
//! A process kill loses nothing (the page cache survives it). Every sync
//! takes a drawn latency, more on a slow disk. A copy of a disk is what a
//! crash would leave of it, for restoring a node from an older backup
//! (the amnesia case).
//!
//! Owns: [`Disk`] and its crash semantics. Must not: know what a file
//! holds (keyraft's store reads it, also for [`Disk::holds`]).

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use keyraft::raft::disk::Task;
use keyraft::raft::memory::Holds;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A change not yet synced, in the order it was made.
#[derive(Clone)]
enum Change {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

/// One file: what reads see, what was synced, and the changes since.
#[derive(Clone, Default)]
struct File {
    now: Vec<u8>,
    synced: Vec<u8>,
    since: Vec<Change>,
}

fn apply(bytes: &mut Vec<u8>, change: &Change) {
    match change {
        Change::Write(at, data) => {
            let (at, end) = (*at as usize, *at as usize + data.len());
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[at..end].copy_from_slice(data);
        }
        Change::SetLen(len) => bytes.resize(*len as usize, 0),
    }
}

impl File {
    fn change(&mut self, c: Change) {
        apply(&mut self.now, &c);
        self.since.push(c);
    }

    /// What a power loss leaves: the synced bytes and a drawn prefix of
    /// the changes since, the next one possibly torn (with `torn`, surely,
    /// if there is one).
    fn crash(&mut self, rng: &mut SmallRng, torn: bool) {
        let mut left = std::mem::take(&mut self.synced);
        let kept = match (torn, self.since.len()) {
            (true, n) if n > 0 => rng.random_range(0..n),
            (_, n) => rng.random_range(0..=n),
        };
        for c in &self.since[..kept] {
            apply(&mut left, c);
        }
        if let Some(Change::Write(at, data)) = self.since.get(kept) {
            if data.len() > 1 && (torn || rng.random_bool(0.5)) {
                let cut = rng.random_range(1..data.len());
                apply(&mut left, &Change::Write(*at, data[..cut].to_vec()));
            }
        }
        self.now = left.clone();
        self.synced = left;
        self.since.clear();
    }
}

/// One host's disk: its files (by inode), the names reads see and the
/// names synced.
#[derive(Clone)]
pub struct DiskState {
    files: BTreeMap<u64, File>,
    names: BTreeMap<String, u64>,
    synced_names: BTreeMap<String, u64>,
    next_inode: u64,
    /// Bumped by every crash and process start: a process that is gone
    /// can no longer write.
    incarnation: u64,
    /// Extra sync latency (a slow disk fault).
    pub slow: Duration,
    rng: SmallRng,
}

/// A host's disk, shared by the world (faults) and the process on it.
#[derive(Clone)]
pub struct Disk(Arc<Mutex<DiskState>>);

fn gone() -> io::Error {
    io::Error::other("the process that owned this disk is gone")
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no file {name}"))
}

impl Disk {
    pub fn new(seed: u64) -> Disk {
        Disk(Arc::new(Mutex::new(DiskState {
            files: BTreeMap::new(),
            names: BTreeMap::new(),
            synced_names: BTreeMap::new(),
            next_inode: 1,
            incarnation: 0,
            slow: Duration::ZERO,
            rng: SmallRng::seed_from_u64(seed),
        })))
    }

    pub fn lock(&self) -> MutexGuard<'_, DiskState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A host crash: what was not synced is lost or torn (with `torn`,
    /// every file's next unsynced write is torn). Returns the new
    /// incarnation.
    pub fn crash(&self, torn: bool) -> u64 {
        let mut d = self.lock();
        d.crash(torn);
        d.incarnation += 1;
        d.incarnation
    }

    /// Whether process `inc` is the one this disk serves.
    pub fn is_current(&self, inc: u64) -> bool {
        self.lock().incarnation == inc
    }

    /// Whether a file has writes not yet synced.
    pub fn unsynced(&self) -> bool {
        self.lock().files.values().any(|f| {
            f.since
                .iter()
                .any(|c| matches!(c, Change::Write(_, d) if d.len() > 1))
        })
    }

    /// A process stop without a host crash: the page cache survives.
    pub fn new_process(&self) -> u64 {
        let mut d = self.lock();
        d.incarnation += 1;
        d.incarnation
    }

    /// What process `inc` writes through: keyraft's store runs on it.
    pub fn process(&self, inc: u64) -> Arc<dyn keyraft::raft::disk::Disk> {
        Arc::new(ProcessDisk {
            disk: self.clone(),
            inc,
        })
    }

    /// The durable image, as a backup taken now would hold it.
    pub fn image(&self) -> DiskState {
        let mut copy = self.lock().clone();
        copy.crash(false);
        copy
    }

    /// Replaces the disk by an older image (a restored data dir) or an
    /// empty one; the host must be down.
    pub fn restore(&self, image: Option<DiskState>) {
        let mut d = self.lock();
        let (inc, slow, rng) = (d.incarnation + 1, d.slow, d.rng.clone());
        *d = image.unwrap_or_else(|| Disk::new(0).image());
        d.incarnation = inc;
        d.slow = slow;
        d.rng = rng;
    }

    /// What this data dir holds now, read by keyraft's own store from a
    /// copy (for the judge's record of restored data dirs).
    pub fn holds(&self) -> Result<Holds, keyraft::raft::store::StoreError> {
        let copy = Disk(Arc::new(Mutex::new(self.lock().clone())));
        let inc = copy.new_process();
        keyraft::raft::store::holds_on(copy.process(inc))
    }
}

impl DiskState {
    fn crash(&mut self, torn: bool) {
        let mut rng = self.rng.clone();
        for f in self.files.values_mut() {
            f.crash(&mut rng, torn);
        }
        self.rng = rng;
        self.names = self.synced_names.clone();
        let live: Vec<u64> = self.names.values().copied().collect();
        self.files.retain(|inode, _| live.contains(inode));
    }

    fn file(&mut self, name: &str) -> io::Result<&mut File> {
        let inode = *self.names.get(name).ok_or_else(|| not_found(name))?;
        self.files.get_mut(&inode).ok_or_else(|| not_found(name))
    }

    fn create(&mut self, name: &str) -> &mut File {
        let inode = match self.names.get(name) {
            Some(i) => *i,
            None => {
                let i = self.next_inode;
                self.next_inode += 1;
                self.names.insert(name.to_string(), i);
                i
            }
        };
        self.files.entry(inode).or_default()
    }
}

/// The disk as one process (incarnation) sees it: every call fails once
/// the process is gone.
struct ProcessDisk {
    disk: Disk,
    inc: u64,
}

impl ProcessDisk {
    fn state(&self) -> io::Result<MutexGuard<'_, DiskState>> {
        let d = self.disk.lock();
        if d.incarnation != self.inc {
            return Err(gone());
        }
        Ok(d)
    }
}

impl keyraft::raft::disk::Disk for ProcessDisk {
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let mut d = self.state()?;
        Ok(d.file(name).ok().map(|f| f.now.clone()))
    }

    fn read_at(&self, name: &str, at: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut d = self.state()?;
        let f = d.file(name)?;
        let bytes = f
            .now
            .get(at as usize..at as usize + buf.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    fn write_at(&self, name: &str, at: u64, bytes: &[u8]) -> io::Result<()> {
        let mut d = self.state()?;
        d.create(name).change(Change::Write(at, bytes.to_vec()));
        Ok(())
    }

    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        let mut d = self.state()?;
        d.create(name).change(Change::SetLen(len));
        Ok(())
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        let mut d = self.state()?;
        let f = d.file(name)?;
        f.synced = f.now.clone();
        f.since.clear();
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut d = self.state()?;
        let inode = d.names.remove(from).ok_or_else(|| not_found(from))?;
        d.names.insert(to.to_string(), inode);
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut d = self.state()?;
        d.synced_names = d.names.clone();
        Ok(())
    }

    fn latency(&self) -> Option<Duration> {
        let mut d = self.disk.lock();
        let base = Duration::from_micros(d.rng.random_range(50..=1500));
        Some(base + d.slow)
    }

    fn spawn(&self, _name: &str, task: Task) -> io::Result<()> {
        crate::types::spawn(task);
        Ok(())
    }
}

//! The move of a Raft store an older keyraft kept in sled (its trees
//! `meta`, `sm`, `memory` and, older still, `log`) into today's files,
//! once, at the first start of this keyraft on that data dir.
//!
//! Each file appears whole (written aside, synced, renamed); `meta` comes
//! last and marks the move done, so a crash during it moves again from
//! sled, which is only read. sled's data file is then renamed
//! `db.moved`: a later start does not read it again.
//!
//! Owns: reading sled's trees and the order of the move. Must not: run
//! once `meta` exists, or change what sled holds.

use std::io;
use std::path::Path;

use super::disk::{self, Disk, FileDisk};
use super::layout::{LOG, MEMORY, META, STATE};
use super::logfile::Records;
use super::values;
use super::Entry;

/// sled's data file in an older keyraft's store.
const SLED_DATA: &str = "db";

fn sled_err(e: sled::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// Whether `dir` holds a store an older keyraft kept in sled.
pub(super) fn needed(dir: &Path) -> bool {
    dir.join(SLED_DATA).exists() && !dir.join(META).exists()
}

/// Moves what sled holds in `dir` into the files `disk` keeps there.
pub(super) fn move_store(dir: &Path, disk: &FileDisk) -> io::Result<()> {
    let db = sled::Config::new()
        .path(dir)
        .mode(sled::Mode::LowSpace)
        .flush_every_ms(None)
        .open()
        .map_err(sled_err)?;
    let tree = |name: &str| -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        db.open_tree(name)
            .map_err(sled_err)?
            .iter()
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(sled_err))
            .collect()
    };
    let log = tree("log")?;
    if disk.read(LOG)?.is_none() {
        let entries = log
            .iter()
            .map(|(_, v)| serde_json::from_slice::<Entry>(v))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        tracing::info!("moving {} Raft log entries from sled", entries.len());
        disk::replace(disk, LOG, &Records::new(&entries)?.bytes)?;
    }
    let (sm, memory, meta) = (tree("sm")?, tree("memory")?, tree("meta")?);
    drop(db);
    for (name, pairs) in [(STATE, sm), (MEMORY, memory), (META, meta)] {
        disk::replace(disk, name, &values::image(&pairs)?)?;
    }
    std::fs::rename(dir.join(SLED_DATA), dir.join("db.moved"))?;
    crate::durable::fsync_dir(dir)?;
    tracing::info!("the Raft store in {} moved out of sled", dir.display());
    Ok(())
}

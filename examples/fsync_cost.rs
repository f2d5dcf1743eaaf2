//! What a durable Raft append costs on this disk: sled 0.34's own `flush`
//! (which ends in `sync_file_range`, not durable against power loss) next
//! to `flush` plus `fdatasync` of sled's data file (what keyraft's store
//! does since it stopped trusting `flush` alone).
//!
//! `cargo run --release --example fsync_cost [-- DIR [ROUNDS]]`: DIR must be
//! on the disk the data dir will use (default: a temp dir under $TMPDIR).

use std::fs::File;
use std::time::{Duration, Instant};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let base = args.next().map(std::path::PathBuf::from);
    let rounds: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(500);
    let dir = match &base {
        Some(b) => tempfile::tempdir_in(b)?,
        None => tempfile::tempdir()?,
    };
    let db = sled::Config::new()
        .path(dir.path())
        .mode(sled::Mode::LowSpace)
        .cache_capacity(4 << 20)
        .flush_every_ms(None)
        .open()?;
    let log = db.open_tree("log")?;
    let file = File::open(dir.path().join("db"))?;
    // A Raft entry of keyraft's size: a small JSON command.
    let entry = vec![b'x'; 200];
    let run = |durable: bool, offset: usize| -> anyhow::Result<Vec<Duration>> {
        let mut took = Vec::with_capacity(rounds);
        for i in 0..rounds {
            let t = Instant::now();
            log.insert(((offset + i) as u64).to_be_bytes(), entry.clone())?;
            db.flush()?;
            if durable {
                file.sync_data()?;
            }
            took.push(t.elapsed());
        }
        took.sort();
        Ok(took)
    };
    let before = run(false, 0)?;
    let after = run(true, rounds)?;
    println!(
        "append + flush, {rounds} rounds in {}",
        dir.path().display()
    );
    for (what, t) in [
        ("sled flush only (before)", &before),
        ("flush + fdatasync (after)", &after),
    ] {
        println!(
            "{what:<28} p50 {:>8.3} ms  p99 {:>8.3} ms",
            percentile(t, 0.5).as_secs_f64() * 1e3,
            percentile(t, 0.99).as_secs_f64() * 1e3
        );
    }
    Ok(())
}

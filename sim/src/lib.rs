//! keyraft's cluster code under a deterministic simulation: three or five
//! nodes on a simulated network, disk and clock (tokio's paused clock, one
//! thread per run, every random draw from the run's seed), with faults
//! drawn per seed, an oracle checked at every step, and a failing seed
//! that replays exactly and shrinks to its smallest schedule. The
//! approach of FoundationDB's simulator, TigerBeetle's VOPR and openraft's
//! own `tests-turmoil/`. `docs/testing.md` ("The simulator") says what is
//! keyraft's real code here, what is a model, and what only the
//! real-process tests cover.
//!
//! A short tour, from the bottom up:
//!
//! - [`types`]: keyraft's own openraft type configuration (seeded under
//!   `--cfg keyraft_sim`).
//! - [`disk`]: each host's disk, below keyraft's own Raft store (its log
//!   file, values files, writer and recovery): it keeps what was synced
//!   and loses or tears what was not at a crash.
//! - [`judged`]: keyraft's log store with what it acknowledged recorded,
//!   so that a restart that lost an acknowledged entry is a violation.
//! - [`oracle`]: what must never happen.
//! - [`faults`]: the faults drawn per seed, and shrinking.
//! - [`host`]: the OS boundary as a model: power, freezes, the guard, the
//!   validator's process, the kernel fence; and the process that runs on
//!   the host, known only by its incarnation.
//! - [`judge`]: the run's clock, the chain's height and the judge's record
//!   (the oracle and the ground truth it is judged against).
//! - [`net`]: links that drop, delay, reorder, duplicate, cut one way or
//!   flap, and frozen hosts whose messages arrive late.
//! - [`ports`]: the peer port over [`net`]: keyraft's Raft client's
//!   transport, a signature forwarded to the leader, an operator's command
//!   relayed to it, each served by the receiver's own keyraft service.
//! - [`signer`]: the simulated chain's key, and keyraft's own
//!   `signer::Signer` for each process.
//! - [`node`]: one keyraft process: real openraft, keyraft's openraft
//!   configuration, gate, heartbeat timer, keyraft's own step 9 at every
//!   restart (`join::bootstrap`, `gossip::hello_reply`), keyraft's Raft
//!   service and its client's rules, over [`ports`].
//! - [`coordinator`]: keyraft's own coordinator (state machine, handlers,
//!   custody, policy), over models of the two edges `coordinator::host`
//!   names: the validator side of [`host`], and the clock.
//! - [`sentry`]: each host's CometBFT node, asking keyraft's signer with
//!   real CometBFT requests, and the judging of what comes back.
//! - [`operator`]: the operator, running keyraft's own commands
//!   (`admin::Commands`: pause, switchover, members, register, the
//!   signer's floor) on a running host.
//! - [`world`]: one run's time line, its faults carried out, the heal and
//!   the liveness check.

pub mod coordinator;
pub mod disk;
pub mod faults;
pub mod host;
pub mod judge;
pub mod judged;
pub mod net;
pub mod node;
pub mod operator;
pub mod oracle;
pub mod ports;
pub mod sentry;
pub mod signer;
pub mod types;
pub mod world;

use std::cell::Cell;

use keyraft::plant::Plant;

use faults::{Fault, Plan};
use world::Outcome;

/// Simulated time of one run: faults until the heal, then the liveness window.
pub const LIVENESS_MS: u64 = 10_000;

thread_local! {
    /// Panics on this thread (a run's tasks all run on its thread).
    pub static PANICS: Cell<usize> = const { Cell::new(0) };
}

pub use judge::LIVE;

/// tracing's timer in a run (`--live`): simulated milliseconds since its
/// first line, as the time line counts them.
#[derive(Default)]
pub struct SimClock(std::sync::OnceLock<tokio::time::Instant>);

impl tracing_subscriber::fmt::time::FormatTime for SimClock {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let epoch = *self.0.get_or_init(tokio::time::Instant::now);
        write!(w, "{:>6} ms", epoch.elapsed().as_millis())
    }
}

/// Runs `seed` (its drawn plan, or `faults` instead of the drawn ones)
/// with `plant` switched on, on a fresh paused runtime on this thread.
pub fn run_seed(
    seed: u64,
    plant: Option<Plant>,
    faults: Option<&[Fault]>,
) -> anyhow::Result<(Plan, Outcome)> {
    anyhow::ensure!(
        keyraft::plant::set(plant),
        "this build has no planted bugs: build it with scripts/sim (--cfg keyraft_sim)"
    );
    let mut plan = faults::draw(seed);
    if let Some(f) = faults {
        plan.faults = f.to_vec();
    }
    let config = world::config()?;
    let mut timing = config.timing;
    timing.stop_timeout = std::time::Duration::from_millis(plan.stop_timeout_ms);
    let mut rt = tokio::runtime::Builder::new_current_thread();
    rt.enable_time().start_paused(true);
    // tokio's own random draws (which shard of a watch's waiters a task
    // joins, so the order they wake in; unbiased `select!`) from the seed
    // too: only with `--cfg tokio_unstable`, which scripts/sim passes.
    #[cfg(tokio_unstable)]
    rt.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
    let rt = rt.build()?;
    let before = PANICS.with(Cell::get);
    let until = plan.heal_ms + LIVENESS_MS;
    let run = types::Rt::scope(seed, world::run(seed, &plan, config, timing, until));
    let mut outcome = rt.block_on(run);
    drop(rt);
    outcome.panics = PANICS.with(Cell::get) - before;
    if outcome.panics > 0 {
        outcome
            .violations
            .push(format!("{} panics in the run", outcome.panics));
    }
    Ok((plan, outcome))
}

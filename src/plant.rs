//! Planted bugs: the simulator's proof that it finds what it looks for.
//!
//! Each [`Plant`] names one deliberate safety bug at one decision of the
//! real code (a pure function the running node and the simulator both
//! call). `scripts/sim --plant NAME` switches one on for a run, and the
//! simulator must then report a violation within its CI seed budget.
//!
//! Owns: the list of plants and the switch. Must not: exist in a release
//! build. The switch is compiled only with `--cfg keyraft_sim`, which only
//! `scripts/sim` passes (to its own `target/sim` build); everywhere else
//! [`on`] is a constant `false` and the planted branches are dead code the
//! compiler removes. It sits at the bottom of the module graph.

/// One planted bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plant {
    /// The signer signs a new (height, round, step) from its applied
    /// watermark without committing it through Raft first.
    SignBeforeCommit,
    /// A leader renews its lease from the time of the renewal instead of
    /// its last quorum ack, so that, cut off, it keeps its key while a
    /// newer term begins on the other side.
    RenewPastTerm,
    /// A node restored from an older copy of its data dir is let take part
    /// (and vote) instead of refused.
    RestoredVotes,
    /// `Released` is committed although the validator's death was not proven.
    ReleaseUnproven,
    /// The Raft store's writer acknowledges an append as durable once
    /// written, before its fdatasync.
    AckBeforeFsync,
    /// Opening the Raft log keeps a torn last record: the next append
    /// goes after it, where the next open never reads.
    TornTailAccepted,
    /// The leader signs inside its reservation without the other voters'
    /// confirmation, trusting its own memory of what it signed there.
    SignUnconfirmed,
}

impl Plant {
    pub const ALL: [Plant; 7] = [
        Plant::SignBeforeCommit,
        Plant::RenewPastTerm,
        Plant::RestoredVotes,
        Plant::ReleaseUnproven,
        Plant::AckBeforeFsync,
        Plant::TornTailAccepted,
        Plant::SignUnconfirmed,
    ];

    /// The name `--plant` takes.
    pub fn name(self) -> &'static str {
        match self {
            Plant::SignBeforeCommit => "sign-before-commit",
            Plant::RenewPastTerm => "renew-past-term",
            Plant::RestoredVotes => "restored-votes",
            Plant::ReleaseUnproven => "release-unproven",
            Plant::AckBeforeFsync => "ack-before-fsync",
            Plant::TornTailAccepted => "torn-tail-accepted",
            Plant::SignUnconfirmed => "sign-unconfirmed",
        }
    }

    pub fn parse(name: &str) -> Option<Plant> {
        Plant::ALL.into_iter().find(|p| p.name() == name)
    }
}

#[cfg(keyraft_sim)]
thread_local! {
    /// The plant switched on for the simulation running on this thread.
    static ACTIVE: std::cell::Cell<Option<Plant>> = const { std::cell::Cell::new(None) };
}

/// Whether this build can plant bugs at all (`--cfg keyraft_sim`).
pub const AVAILABLE: bool = cfg!(keyraft_sim);

/// Switches `plant` on (or every plant off) for this thread's simulation.
/// Returns false, and does nothing, in a build without plants.
pub fn set(plant: Option<Plant>) -> bool {
    #[cfg(keyraft_sim)]
    {
        ACTIVE.with(|a| a.set(plant));
        true
    }
    #[cfg(not(keyraft_sim))]
    {
        plant.is_none()
    }
}

/// Whether `plant` is switched on here: always false outside the
/// simulator's own build.
#[inline]
pub fn on(plant: Plant) -> bool {
    #[cfg(keyraft_sim)]
    {
        ACTIVE.with(|a| a.get() == Some(plant))
    }
    #[cfg(not(keyraft_sim))]
    {
        let _ = plant;
        false
    }
}

//! openraft's own storage suite against keyraft's Raft store: the log,
//! the vote and the state machine behave as openraft relies on (reads after
//! appends, truncation and purge included, with the newest entries served
//! from memory), on a real store in a temp dir.

use keyraft::raft::store::{self, LogStore, StateMachine};
use keyraft::raft::TypeConfig;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let io = |e: String| {
            StorageError::from_io_error(
                openraft::ErrorSubject::Store,
                openraft::ErrorVerb::Read,
                std::io::Error::other(e),
            )
        };
        let dir = tempfile::tempdir().map_err(|e| io(e.to_string()))?;
        let (log, sm, _memory) = store::open(dir.path()).map_err(|e| io(e.to_string()))?;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes() -> anyhow::Result<()> {
    Suite::test_all(Builder).await?;
    Ok(())
}

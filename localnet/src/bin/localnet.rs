//! `localnet`: the demo, fault and benchmark front end of the judge.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use localnet::bench;

#[derive(Parser)]
#[command(version, about = "keyraft's local test network and judge")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Benchmarks that print numbers.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// How many heights per second fakechain sustains with fakenodes
    /// following it, and its memory after many heights.
    Chain {
        #[arg(long, default_value_t = 5)]
        nodes: u64,
        #[arg(long, default_value_t = 50)]
        block_ms: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Heights to run for the memory measurement.
        #[arg(long, default_value_t = 100_000)]
        heights: u64,
        /// Block interval of the memory run (short, to reach the heights soon).
        #[arg(long, default_value_t = 1)]
        memory_block_ms: u64,
    },
    /// Cold-start election time and the idle footprint of each coordinator.
    Idle {
        #[arg(long, default_value_t = 5)]
        starts: usize,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Failover (SIGKILL of the active coordinator) and switchover times,
    /// measured by the chain.
    Failover {
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        #[arg(long, default_value_t = 500)]
        block_ms: u64,
        /// restart or sighup.
        #[arg(long, default_value = "restart")]
        activate_by: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    localnet::init_logging();
    let result = match args.command {
        Cmd::Bench {
            what:
                BenchCmd::Chain {
                    nodes,
                    block_ms,
                    seconds,
                    heights,
                    memory_block_ms,
                },
        } => {
            let b = bench::ChainBench {
                nodes,
                block_ms,
                seconds,
                heights,
                memory_block_ms,
            };
            bench::chain(&b).await.map(|v| println!("{v}"))
        }
        Cmd::Bench {
            what: BenchCmd::Idle { starts, seconds },
        } => bench::idle(starts, seconds).await.map(|v| println!("{v}")),
        Cmd::Bench {
            what:
                BenchCmd::Failover {
                    rounds,
                    block_ms,
                    activate_by,
                },
        } => bench::failover(rounds, block_ms, &activate_by)
            .await
            .map(|v| println!("{v}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => localnet::report(e),
    }
}

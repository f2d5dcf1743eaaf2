//! `localnet`: the one-command demo, fault injection, chaos and benchmarks.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use localnet::chaos::{self, Fault};
use localnet::comet::node::Protocol;
use localnet::{bench, docker, launcher};

/// Where `bench signer`'s hosts keep the key.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KeyBackend {
    File,
    Pkcs11,
}

#[derive(Parser)]
#[command(
    version,
    about = "keyraft's local test network: demo, faults, chaos and benchmarks"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct DirArg {
    /// The localnet's dir [default: $TMPDIR/keyraft-localnet].
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl DirArg {
    fn path(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(launcher::default_dir)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Start fakechain and keyraft coordinators with fakenodes, and show them live.
    Up {
        #[command(flatten)]
        dir: DirArg,
        /// Coordinators (2 to 5).
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Make the last node a witness (no validator).
        #[arg(long)]
        witness: bool,
        #[arg(long, default_value_t = 500)]
        block_ms: u64,
        /// CometBFT signer mode: each keyraft signs (through Raft) for a
        /// fake CometBFT sentry it supervises; the chain counts equivocations.
        #[arg(long)]
        cometbft: bool,
        /// With --cometbft: sentries per host, each dialed by the host's
        /// keyraft (the first is supervised by it).
        #[arg(long, default_value_t = 1)]
        sentries: u64,
        /// With --cometbft: chains the cluster signs for (1 to 5), each
        /// with its own fake chain, key and a sentry on every host.
        #[arg(long, default_value_t = 1)]
        chains: u64,
        /// One-way delay on every peer link, each direction (e.g. 40ms).
        #[arg(long, value_parser = parse_ms, default_value = "0ms")]
        latency: Duration,
        /// Random spread of that delay, plus or minus (e.g. 10ms).
        #[arg(long, value_parser = parse_ms, default_value = "0ms")]
        jitter: Duration,
        /// keyraft's timing profile (lan or wan) [default: keyraft's].
        #[arg(long)]
        timing: Option<String>,
        /// With --cometbft: the sentries' privval protocol, v0.38 or v1
        /// (CometBFT 1.x; one chain, one sentry per host).
        #[arg(long, value_enum, default_value = "v0.38")]
        protocol: Protocol,
    },
    /// Print the live view once.
    Status {
        #[command(flatten)]
        dir: DirArg,
    },
    /// Kill node N: its whole host, or only its coordinator or validator.
    Kill {
        id: u64,
        #[arg(long, conflicts_with = "validator")]
        coordinator: bool,
        #[arg(long)]
        validator: bool,
        #[command(flatten)]
        dir: DirArg,
    },
    /// SIGSTOP node N's coordinator, or its whole host with --host.
    Pause {
        id: u64,
        #[arg(long)]
        host: bool,
        #[command(flatten)]
        dir: DirArg,
    },
    /// SIGCONT node N (coordinator, guard and validator).
    Resume {
        id: u64,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Cut every peer link to and from node N (blackhole).
    Partition {
        id: u64,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Restore every peer link.
    Heal {
        #[command(flatten)]
        dir: DirArg,
    },
    /// Start node N's coordinator again after a kill.
    Start {
        id: u64,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Seeded rounds of random faults; the last line is a JSON summary.
    /// Exits non-zero if any double sign occurred.
    Chaos {
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where to keep the cluster's files [default: a temp dir, removed].
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 500)]
        block_ms: u64,
        /// Faults to draw from [default: all that apply].
        #[arg(long, value_enum, value_delimiter = ',')]
        faults: Vec<Fault>,
        /// Signer mode (CometBFT): three keyraft signers with a sentry each,
        /// judged by equivocations.
        #[arg(long)]
        cometbft: bool,
        /// With --cometbft: chains signed for at once (1 to 5), each judged
        /// by its own fake chain; the summary counts each.
        #[arg(long, default_value_t = 1)]
        chains: u64,
        /// Busy processes to run beside the cluster (a loaded host: 2 on
        /// a 2-core machine keeps every core busy).
        #[arg(long, default_value_t = 0)]
        load: usize,
        /// Give each validator host a fence agent (`fakefence`) for the
        /// other: a takeover without a release powers the old host off
        /// first (it is started again after the round).
        #[arg(long)]
        fence_agents: bool,
    },
    /// The Docker Compose cluster under docker network disconnect, docker
    /// kill and docker pause of the active host, judged by the chain.
    DockerTest {
        #[arg(long, default_value = "keyraft:local")]
        image: String,
        /// [default: localnet/docker/docker-compose.yml, or
        /// docker-compose.cometbft.yml with --cometbft]
        #[arg(long)]
        compose_file: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        #[arg(long, default_value_t = 500)]
        block_ms: u64,
        /// A new signer must appear within this many ms of each fault.
        #[arg(long, default_value_t = 5000)]
        bound_ms: u64,
        /// The signer-mode cluster (docker-compose.cometbft.yml): faults on
        /// the signer leader, 0 equivocations required for every fault.
        #[arg(long)]
        cometbft: bool,
        /// Busy processes to run on the host through the rounds (2 keep a
        /// 2-core machine busy).
        #[arg(long, default_value_t = 0)]
        load: usize,
    },
    /// A validator cluster, every node under fakecosmovisor, at a chain
    /// upgrade's halt, or (`rolling`) a new node program rolled through
    /// it: per scenario what the chain saw (the last line is JSON).
    UpgradeTest {
        /// Scenarios to run [default: all].
        #[arg(long, value_enum)]
        scenario: Vec<localnet::halt::Scenario>,
        /// Run keyraft without `--upgrades cosmovisor`, as before it
        /// followed upgrades (what it did then, measured).
        #[arg(long, conflicts_with = "cometbft")]
        without_upgrades: bool,
        /// Signer mode: each host's sentry halts and comes back as a
        /// CometBFT 1.x node (every scenario but rolling).
        #[arg(long)]
        cometbft: bool,
    },
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
    /// The CometBFT judge: votes per second the chain verifies, and a
    /// sentry's round trip to tmkms per signature (needs tmkms; see
    /// localnet/scripts/install-tmkms.sh).
    Cometbft {
        #[arg(long, default_value_t = 20_000)]
        votes: usize,
        #[arg(long, default_value_t = 4)]
        clients: usize,
        #[arg(long, default_value_t = 200)]
        block_ms: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// keyraft's CometBFT signer next to tmkms: signature latency as the
    /// sentries see it, and missed heights when the signer leader is killed.
    Signer {
        /// Round length of the latency run: 200 ms, or 1000 ms with more
        /// than 5 chains.
        #[arg(long)]
        block_ms: Option<u64>,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value_t = 10)]
        kills: usize,
        /// Round length of the kill run.
        #[arg(long, default_value_t = 1000)]
        kill_block_ms: u64,
        /// Chains signed for at once (1 to 50): latency per chain while all
        /// sign, and tmkms signing as many.
        #[arg(long, default_value_t = 1)]
        chains: u64,
        /// keyraft's sentries' privval protocol, v0.38 or v1 (one chain;
        /// tmkms, which has no v1, is measured on v0.38 either way).
        #[arg(long, value_enum, default_value = "v0.38")]
        protocol: Protocol,
        /// Where each signer host's key is: its key file, or a SoftHSM2
        /// token of its own, signing through PKCS#11 (the first chain's).
        #[arg(long, value_enum, default_value = "file")]
        key: KeyBackend,
    },
    /// Cold-start election time and the idle footprint of each coordinator.
    Idle {
        #[arg(long, default_value_t = 5)]
        starts: usize,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Then three signer hosts with this many chains configured (1 to
        /// 50) and nothing to sign, each host's CPU and RSS
        #[arg(long)]
        chains: Option<u64>,
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
        /// keyraft's timing profile (lan or wan) [default: keyraft's].
        #[arg(long)]
        timing: Option<String>,
    },
    /// Stability under emulated WAN latency: a cluster whose peer links all
    /// carry a one-way delay runs for a while; counts failovers, missed
    /// heights and double signs.
    Latency {
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        #[arg(long, value_parser = parse_ms, default_value = "40ms")]
        latency: Duration,
        #[arg(long, value_parser = parse_ms, default_value = "10ms")]
        jitter: Duration,
        /// keyraft's timing profile (lan or wan) [default: keyraft's].
        #[arg(long)]
        timing: Option<String>,
        #[arg(long, default_value_t = 500)]
        block_ms: u64,
    },
}

/// A duration that is not one.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a duration (like 40ms or 1.5s)")]
struct NotADuration(String);

/// A duration as `40ms`, `1.5s` or a bare number of milliseconds.
fn parse_ms(s: &str) -> Result<Duration, NotADuration> {
    let bad = || NotADuration(s.to_string());
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !(0.0..=3_600_000.0).contains(&v) {
        return Err(bad());
    }
    Ok(Duration::from_micros((v * scale * 1000.0) as u64))
}

/// Under `cargo run -p localnet`, cargo builds only this package: build the
/// `keyraft` binary too (same profile), so that `cargo run --release -p
/// localnet -- up` works on a fresh checkout. Outside cargo, `keyraft` must
/// sit beside `localnet`, as in `target/release` after a workspace build.
fn build_keyraft_under_cargo() -> anyhow::Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(());
    };
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    if !manifest.is_file() {
        return Ok(());
    }
    let release = std::env::current_exe()?
        .components()
        .any(|c| c.as_os_str() == "release");
    // The whole workspace, as `cargo build --workspace` builds it: one
    // feature set for the dependencies, shared with that command (building
    // `-p keyraft` alone would resolve another and compile them again).
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--workspace", "--manifest-path"])
        .arg(&manifest);
    if release {
        cmd.arg("--release");
    }
    eprintln!("building keyraft ...");
    let status = cmd.status()?;
    anyhow::ensure!(status.success(), "building keyraft failed");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    localnet::init_logging();
    if matches!(
        args.command,
        Cmd::Up { .. } | Cmd::Chaos { .. } | Cmd::Bench { .. } | Cmd::UpgradeTest { .. }
    ) {
        if let Err(e) = build_keyraft_under_cargo() {
            return localnet::report(e);
        }
    }
    let result = match args.command {
        Cmd::Up {
            dir,
            nodes,
            witness,
            block_ms,
            cometbft,
            sentries,
            chains,
            latency,
            jitter,
            timing,
            protocol,
        } => {
            launcher::up(launcher::UpOptions {
                dir: dir.path(),
                nodes,
                witness,
                block_ms,
                cometbft,
                sentries,
                chains,
                latency: localnet::proxy::Latency {
                    delay: latency,
                    jitter,
                },
                timing,
                protocol,
            })
            .await
        }
        Cmd::Status { dir } => launcher::status(&dir.path()).await,
        Cmd::Kill {
            id,
            coordinator,
            validator,
            dir,
        } => {
            let what = match (coordinator, validator) {
                (true, _) => "coordinator",
                (_, true) => "validator",
                _ => "host",
            };
            launcher::control(&dir.path(), &format!("kill/{id}?what={what}")).await
        }
        Cmd::Pause { id, host, dir } => {
            launcher::control(&dir.path(), &format!("pause/{id}?host={host}")).await
        }
        Cmd::Resume { id, dir } => {
            launcher::control(&dir.path(), &format!("resume/{id}?host=true")).await
        }
        Cmd::Partition { id, dir } => {
            launcher::control(&dir.path(), &format!("partition/{id}")).await
        }
        Cmd::Heal { dir } => launcher::control(&dir.path(), "heal").await,
        Cmd::Start { id, dir } => launcher::control(&dir.path(), &format!("start/{id}")).await,
        Cmd::Chaos {
            rounds,
            seed,
            dir,
            block_ms,
            faults,
            cometbft,
            chains,
            load,
            fence_agents,
        } => {
            let o = chaos::ChaosOptions {
                rounds,
                seed,
                dir,
                block_ms,
                faults,
                cometbft,
                chains,
                load,
                fence_agents,
            };
            match chaos::run(o).await {
                Ok((summary, clean)) => {
                    println!("{summary}");
                    if clean {
                        Ok(())
                    } else {
                        Err(anyhow::anyhow!("double signs occurred (see the summary)"))
                    }
                }
                Err(e) => Err(e),
            }
        }
        Cmd::DockerTest {
            image,
            compose_file,
            rounds,
            block_ms,
            bound_ms,
            cometbft,
            load,
        } => {
            let o = docker::DockerTestOptions {
                compose_file: compose_file
                    .unwrap_or_else(|| docker::default_compose_file(cometbft)),
                image,
                rounds,
                block_ms,
                bound: std::time::Duration::from_millis(bound_ms),
                cometbft,
                load,
            };
            match docker::check_tools() {
                Err(e) => Err(e),
                Ok(()) => match docker::run(o).await {
                    Ok((summary, passed)) => {
                        println!("{summary}");
                        if passed {
                            Ok(())
                        } else {
                            Err(anyhow::anyhow!(
                                "the docker cluster failed a check (see above)"
                            ))
                        }
                    }
                    Err(e) => Err(e),
                },
            }
        }
        Cmd::UpgradeTest {
            scenario,
            without_upgrades,
            cometbft,
        } => upgrade_test(scenario, !without_upgrades, cometbft).await,
        Cmd::Bench { what } => match what {
            BenchCmd::Chain {
                nodes,
                block_ms,
                seconds,
                heights,
                memory_block_ms,
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
            BenchCmd::Cometbft {
                votes,
                clients,
                block_ms,
                seconds,
            } => {
                let b = bench::CometBench {
                    votes,
                    clients,
                    block_ms,
                    seconds,
                };
                bench::comet(&b).await.map(|v| println!("{v}"))
            }
            BenchCmd::Signer {
                block_ms,
                seconds,
                kills,
                kill_block_ms,
                chains,
                protocol,
                key,
            } => {
                let b = bench::SignerBench {
                    block_ms: block_ms.unwrap_or(if chains > 5 { 1000 } else { 200 }),
                    seconds,
                    kills,
                    kill_block_ms,
                    chains,
                    v1: protocol == Protocol::V1,
                    key_in: match key {
                        KeyBackend::File => localnet::token::KeyIn::File,
                        KeyBackend::Pkcs11 => localnet::token::KeyIn::Token,
                    },
                };
                bench::signer(&b).await.map(|v| println!("{v}"))
            }
            BenchCmd::Idle {
                starts,
                seconds,
                chains,
            } => {
                async {
                    let mut v = bench::idle(starts, seconds).await?;
                    if let Some(n) = chains {
                        v["signer"] = bench::signer_idle(n, seconds).await?;
                    }
                    println!("{v}");
                    Ok(())
                }
                .await
            }
            BenchCmd::Failover {
                rounds,
                block_ms,
                activate_by,
                timing,
            } => bench::failover(rounds, block_ms, &activate_by, timing.as_deref())
                .await
                .map(|v| println!("{v}")),
            BenchCmd::Latency {
                seconds,
                latency,
                jitter,
                timing,
                block_ms,
            } => {
                let b = bench::LatencyBench {
                    seconds,
                    latency: localnet::proxy::Latency {
                        delay: latency,
                        jitter,
                    },
                    timing,
                    block_ms,
                };
                bench::latency(&b).await.map(|v| println!("{v}"))
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => localnet::report(e),
    }
}

/// `localnet upgrade-test`: each scenario in turn, one JSON line at the
/// end; exit 1 when one does not pass (keyraft following upgrades).
async fn upgrade_test(
    scenarios: Vec<localnet::halt::Scenario>,
    follow: bool,
    cometbft: bool,
) -> anyhow::Result<()> {
    use clap::ValueEnum;
    let scenarios = if scenarios.is_empty() {
        localnet::halt::Scenario::value_variants()
            .iter()
            .copied()
            .filter(|s| !cometbft || s.in_signer_mode())
            .collect()
    } else {
        scenarios
    };
    let mut verdicts = Vec::new();
    for s in scenarios {
        let v = match (cometbft, s) {
            (true, _) => localnet::halt::run_signer(s).await?,
            (false, localnet::halt::Scenario::Rolling) => localnet::rolling::run().await?,
            (false, _) => localnet::halt::run(s, follow).await?,
        };
        eprintln!("{}", serde_json::to_string(&v)?);
        verdicts.push(v);
    }
    println!("{}", serde_json::json!({ "scenarios": verdicts }));
    let failed: Vec<&str> = verdicts
        .iter()
        .filter(|v| !v.pass)
        .map(|v| v.name.as_str())
        .collect();
    match (follow, failed.as_slice()) {
        (true, [_, ..]) => anyhow::bail!("scenarios failed: {}", failed.join(", ")),
        _ => Ok(()),
    }
}

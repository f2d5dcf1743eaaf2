//! `keyraft-sim`: runs seeds of the simulation (see `src/lib.rs`), prints
//! progress on stderr and one JSON line last on stdout. `scripts/sim` builds
//! and runs it.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use keyraft::plant::Plant;
use keyraft_sim::faults::{self, Fault};
use keyraft_sim::{run_seed, PANICS};

#[derive(Parser)]
#[command(about = "keyraft's cluster code under a deterministic simulation with drawn faults")]
struct Args {
    /// How many seeds to run (from --first on).
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed of a --seeds run.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Run this one seed, print its schedule and time line, and shrink it
    /// if it fails.
    #[arg(long)]
    seed: Option<u64>,
    /// Switch on one planted bug (sign-before-commit, renew-past-term,
    /// restored-votes, release-unproven): the run succeeds when the
    /// simulator finds it.
    #[arg(long)]
    plant: Option<String>,
    /// Worker threads (one run each at a time).
    #[arg(long, default_value_t = 2)]
    threads: u64,
    /// Run every seed twice and require the same time line.
    #[arg(long)]
    twice: bool,
    /// With --seed: print the time line as it happens, with every
    /// coordinator's own log lines (at keyraft's `info`, or as RUST_LOG
    /// says) at their simulated time.
    #[arg(long)]
    live: bool,
    /// With --seed: a run through step 9's documented blind spot fails too
    /// (for regression seeds of a blind spot that was closed).
    #[arg(long)]
    strict: bool,
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("keyraft-sim: {e:#}");
        std::process::exit(2);
    }
}

fn real_main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plant = match &args.plant {
        None => None,
        Some(name) => Some(Plant::parse(name).with_context(|| {
            let names: Vec<&str> = Plant::ALL.iter().map(|p| p.name()).collect();
            format!("no planted bug '{name}': one of {}", names.join(", "))
        })?),
    };
    anyhow::ensure!(
        plant.is_none() || keyraft::plant::AVAILABLE,
        "this build has no planted bugs: run it through scripts/sim (--cfg keyraft_sim)"
    );
    anyhow::ensure!(args.threads >= 1, "--threads must be at least 1");
    std::panic::set_hook(Box::new(|_| PANICS.with(|p| p.set(p.get() + 1))));
    keyraft_sim::LIVE.with(|l| l.set(args.live));
    if args.live {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("keyraft=info"));
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_timer(keyraft_sim::SimClock::default())
            .with_target(false)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .init();
    }
    match args.seed {
        Some(seed) => one(seed, plant, args.strict),
        None => many(&args, plant),
    }
}

/// One seed: its schedule, its time line, and, if it fails, the smallest
/// schedule that still fails.
fn one(seed: u64, plant: Option<Plant>, strict: bool) -> anyhow::Result<()> {
    let (plan, outcome) = run_seed(seed, plant, None)?;
    println!(
        "seed {seed}: {} nodes, {} mode, {} faults:",
        plan.nodes,
        if plan.signer_mode {
            "signer"
        } else {
            "validator"
        },
        plan.faults.len()
    );
    for f in &plan.faults {
        println!("  {f}");
    }
    println!("time line:");
    for line in &outcome.trace {
        println!("  {line}");
    }
    let failed = (strict && outcome.residual.is_some())
        || (!outcome.violations.is_empty() && outcome.residual.is_none());
    if let Some(why) = &outcome.residual {
        if strict {
            println!("RESIDUAL RISK (--strict: counted as a failure): {why}");
        } else {
            println!("RESIDUAL RISK (docs/safety.md; not counted as a violation): {why}");
        }
    }
    for v in outcome.violations.iter().take(10) {
        println!("VIOLATION: {v}");
    }
    if outcome.violations.len() > 10 {
        println!("... and {} more violations", outcome.violations.len() - 10);
    }
    if failed {
        let fails = |f: &[Fault]| {
            run_seed(seed, plant, Some(f)).is_ok_and(|(_, o)| {
                (strict && o.residual.is_some())
                    || (!o.violations.is_empty() && o.residual.is_none())
            })
        };
        let minimal = faults::shrink(&plan.faults, fails);
        println!(
            "smallest schedule that still fails ({} faults):",
            minimal.len()
        );
        for f in &minimal {
            println!("  {f}");
        }
        let (_, again) = run_seed(seed, plant, Some(&minimal))?;
        println!("its time line:");
        for line in &again.trace {
            println!("  {line}");
        }
        for v in again.violations.iter().take(3) {
            println!("  VIOLATION: {v}");
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "seeds": 1, "seed": seed, "violations": outcome.violations.len(),
            "signatures": outcome.signatures, "plant": plant.map(|p| p.name()),
            "residual_risk": outcome.residual.is_some(),
        })
    );
    if failed && plant.is_none() {
        std::process::exit(1);
    }
    Ok(())
}

/// The first violation of a run, and how many more there were.
fn summary(v: &[String]) -> String {
    match v {
        [] => String::new(),
        [one] => one.clone(),
        [first, rest @ ..] => format!("{first} (and {} more)", rest.len()),
    }
}

/// Real time one run may take before it counts as stuck.
const STUCK: std::time::Duration = std::time::Duration::from_secs(60);

fn lock_running(
    r: &Mutex<BTreeMap<u64, (u64, Instant)>>,
) -> std::sync::MutexGuard<'_, BTreeMap<u64, (u64, Instant)>> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

fn lock(t: &Mutex<Totals>) -> std::sync::MutexGuard<'_, Totals> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

struct Totals {
    violations: u64,
    /// Runs through step 9's documented blind spot, and those of them
    /// with violations (reported apart).
    residual: u64,
    residual_violations: Vec<u64>,
    signatures: u64,
    failing: Vec<(u64, Vec<String>)>,
    nondeterministic: Vec<u64>,
}

fn many(args: &Args, plant: Option<Plant>) -> anyhow::Result<()> {
    let started = Instant::now();
    let next = AtomicU64::new(args.first);
    let done = AtomicU64::new(0);
    let end = args.first + args.seeds;
    let totals = Mutex::new(Totals {
        violations: 0,
        residual: 0,
        residual_violations: Vec::new(),
        signatures: 0,
        failing: Vec::new(),
        nondeterministic: Vec::new(),
    });
    let found = std::sync::atomic::AtomicBool::new(false);
    let running: Mutex<BTreeMap<u64, (u64, Instant)>> = Mutex::new(BTreeMap::new());
    std::thread::scope(|s| -> anyhow::Result<()> {
        let mut workers = Vec::new();
        for worker in 0..args.threads {
            let (running, next, done, totals, found) = (&running, &next, &done, &totals, &found);
            let worker = std::thread::Builder::new()
                .stack_size(64 << 20)
                .spawn_scoped(s, move || -> anyhow::Result<()> {
                    loop {
                        let seed = next.fetch_add(1, Ordering::Relaxed);
                        if seed >= end || (plant.is_some() && found.load(Ordering::Relaxed)) {
                            lock_running(running).remove(&worker);
                            return Ok(());
                        }
                        lock_running(running).insert(worker, (seed, Instant::now()));
                        let (_, o) = run_seed(seed, plant, None)?;
                        let same = !args.twice || run_seed(seed, plant, None)?.1.trace == o.trace;
                        let mut t = lock(totals);
                        t.signatures += o.signatures;
                        if !same {
                            t.nondeterministic.push(seed);
                        }
                        if o.residual.is_some() {
                            t.residual += 1;
                            if !o.violations.is_empty() {
                                t.residual_violations.push(seed);
                            }
                        } else if !o.violations.is_empty() {
                            t.violations += 1;
                            t.failing.push((seed, o.violations.clone()));
                            found.store(true, Ordering::Relaxed);
                            eprintln!("seed {seed}: VIOLATION: {}", summary(&o.violations));
                        }
                        drop(t);
                        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if n % 100 == 0 {
                            eprintln!(
                                "{n}/{} seeds, {} violations, {:.1} s",
                                args.seeds,
                                lock(totals).violations,
                                started.elapsed().as_secs_f64()
                            );
                        }
                    }
                })?;
            workers.push(worker);
        }
        // Simulated time stops if a task spins: no run may take long in
        // real time.
        while workers.iter().any(|w| !w.is_finished()) {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let now = Instant::now();
            for (seed, since) in lock_running(&running).values() {
                if now.duration_since(*since) > STUCK {
                    eprintln!("seed {seed} has run for {STUCK:?} of real time: stuck (a task spins and simulated time stops); replay it with scripts/sim --seed {seed}");
                    std::process::exit(1);
                }
            }
        }
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a worker thread panicked"))??;
        }
        Ok(())
    })?;
    let t = lock(&totals);
    let seconds = started.elapsed().as_secs_f64();
    let ran = done.load(Ordering::Relaxed);
    let mut failing: Vec<&(u64, Vec<String>)> = t.failing.iter().collect();
    failing.sort_by_key(|f| f.0);
    let first_failing = failing.first().map(|f| f.0);
    if let Some(seed) = first_failing {
        let plant_arg = plant.map_or(String::new(), |p| format!(" --plant {}", p.name()));
        eprintln!(
            "replay (and shrink) the first failing seed: scripts/sim --seed {seed}{plant_arg}"
        );
    }
    let line = serde_json::json!({
        "seeds": ran,
        "violations": t.violations,
        "seconds": (seconds * 10.0).round() / 10.0,
        "seeds_per_minute": (ran as f64 * 60.0 / seconds.max(0.001)).round(),
        "signatures": t.signatures,
        "plant": plant.map(|p| p.name()),
        "first_failing_seed": first_failing,
        "nondeterministic_seeds": t.nondeterministic,
        "residual_risk_runs": t.residual,
        "residual_risk_violations": t.residual_violations,
    });
    println!("{line}");
    std::io::stdout().flush()?;
    let ok = match plant {
        None => t.violations == 0 && t.nondeterministic.is_empty(),
        Some(p) => {
            if t.violations == 0 {
                eprintln!("the planted bug {} was NOT found in {ran} seeds", p.name());
            }
            t.violations > 0
        }
    };
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

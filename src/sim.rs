//! `cellbank sim`: the deterministic simulator of the failover and money
//! protocol (crate `cellbank-sim`). Many seeds with a progress bar and a
//! summary, or one seed replayed with its trace.

use std::time::Instant;

use anyhow::bail;
use cellbank_sim::{minimize, run_plan, scenario, sweep_plans, Faults, Mutation, Plan, RunResult, SCENARIOS};

#[derive(clap::Args)]
pub struct SimArgs {
    /// How many seeds to run (from --first).
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    /// The first seed of a sweep.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Replay this one seed and print its trace (ignores --seeds).
    #[arg(long)]
    seed: Option<u64>,
    /// With --seed: run only these faults of the seed's plan (indexes, as a
    /// failing run's minimal plan prints them).
    #[arg(long, value_delimiter = ',')]
    keep: Option<Vec<usize>>,
    /// Fault kinds a run may draw: `all`, `none`, or a list of crash,
    /// cell-crash, cell-lost, partition, slow-disk, pause,
    /// coordinator-restart, network, clock-skew, and the operator's
    /// switchover and forced-failover.
    #[arg(long, default_value = "all")]
    faults: String,
    /// Run every seed with this named plan instead of the one it draws
    /// (forced-failover-of-a-degraded-pair).
    #[arg(long)]
    scenario: Option<String>,
    /// Turn on one deliberate bug (early-release, volatile-deposition,
    /// no-sender-epoch, ack-off-by-one) to show the checkers catch it.
    #[arg(long, default_value = "none")]
    mutate: String,
    /// Threads running seeds (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Stop a sweep after this many failing seeds (0: run them all).
    #[arg(long, default_value_t = 1)]
    stop_after: usize,
    /// Lines of a failing run's trace to print (its end).
    #[arg(long, default_value_t = 80)]
    trace_lines: usize,
}

pub fn run(args: SimArgs) -> anyhow::Result<()> {
    let faults = Faults::parse(&args.faults).map_err(anyhow::Error::msg)?;
    let Some(mutation) = Mutation::parse(&args.mutate) else {
        bail!("--mutate: unknown mutation {:?} (none, early-release, volatile-deposition, no-sender-epoch, ack-off-by-one)", args.mutate);
    };
    cellbank_raft::mutation::set(mutation);
    let fixed = match &args.scenario {
        Some(name) => Some(
            scenario(name)
                .ok_or_else(|| anyhow::anyhow!("--scenario: unknown {name:?}; known: {}", SCENARIOS.join(", ")))?,
        ),
        None => None,
    };
    if let Some(seed) = args.seed {
        let drawn = fixed.clone().unwrap_or_else(|| Plan::draw(seed, &faults));
        let plan = match &args.keep {
            Some(keep) => drawn.keep(keep),
            None => drawn,
        };
        let result = run_plan(seed, &faults, plan, true);
        print_plan(&result);
        for line in &result.trace {
            println!("{line}");
        }
        print_stats(&result);
        return match &result.violation {
            Some(violation) => bail!("seed {seed} fails: {violation}"),
            None => {
                println!("seed {seed}: every check passed");
                Ok(())
            }
        };
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    println!(
        "simulating seeds {}..={} (faults: {faults}; scenario: {}; mutation: {}; {threads} threads)",
        args.first,
        args.first + args.seeds.saturating_sub(1),
        args.scenario.as_deref().unwrap_or("drawn per seed"),
        mutation.name()
    );
    let bar = indicatif::ProgressBar::new(args.seeds);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} seeds, {per_sec}, eta {eta} {msg}")
            .expect("progress template"),
    );
    let failures = std::sync::atomic::AtomicU64::new(0);
    let started = Instant::now();
    let summary = sweep_plans(
        args.first,
        args.seeds,
        &faults,
        fixed.as_ref(),
        threads,
        args.stop_after,
        &|result: &RunResult| {
            if result.violation.is_some() {
                let n = failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                bar.set_message(format!("{n} failing"));
            }
            bar.inc(1);
        },
    );
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    let s = &summary.stats;
    println!(
        "{} seeds in {:.1} s ({:.0} seeds/s): {} failing",
        summary.seeds,
        elapsed.as_secs_f64(),
        summary.seeds as f64 / elapsed.as_secs_f64().max(1e-9),
        summary.failures.len()
    );
    println!(
        "  {} events, {} messages ({} lost, {} duplicated), {} entries applied, {} requests answered ({} reads \
         checked), {} writes acknowledged and checked, {} failovers, {} faults; {} runs lost their serving cell for \
         good (nothing left to check at the end)",
        s.events,
        s.messages,
        s.lost,
        s.duplicated,
        s.applied,
        s.completed,
        s.reads,
        s.acked,
        s.failovers,
        s.faults,
        summary.serving_lost
    );
    println!(
        "  operator: {} switchovers, {} forced failovers, {} refused or failed; {} writes and credits lost within \
         the loss windows forced failovers reported",
        s.switchovers, s.forced_failovers, s.operator_refused, s.forfeited
    );
    let Some(first) = summary.failures.first() else { return Ok(()) };
    for failure in &summary.failures {
        println!("seed {}: {}", failure.seed, failure.violation.as_ref().expect("failing"));
    }
    println!("\nminimizing seed {} (dropping faults while the same invariant still breaks)...", first.seed);
    let (keep, minimal) = minimize(first.seed, &faults, first);
    print_plan(&minimal);
    let skip = minimal.trace.len().saturating_sub(args.trace_lines);
    for line in &minimal.trace[skip..] {
        println!("{line}");
    }
    let keep: Vec<String> = keep.iter().map(|k| k.to_string()).collect();
    let mut mutate = if mutation == Mutation::None { String::new() } else { format!(" --mutate {}", mutation.name()) };
    if let Some(name) = &args.scenario {
        mutate.push_str(&format!(" --scenario {name}"));
    }
    println!(
        "\nreplay: cellbank sim --seed {} --faults {faults} --keep {}{mutate}",
        first.seed,
        if keep.is_empty() { "''".to_string() } else { keep.join(",") }
    );
    bail!("{} of {} seeds broke an invariant", summary.failures.len(), summary.seeds)
}

fn print_plan(result: &RunResult) {
    println!("seed {}: {} fault(s)", result.seed, result.plan.faults.len());
    for fault in &result.plan.faults {
        println!("  {}", fault.describe());
    }
    if let Some(violation) = &result.violation {
        println!("  broke: {violation}");
    }
}

fn print_stats(result: &RunResult) {
    let s = &result.stats;
    println!(
        "{} events, {} requests answered, {} writes acknowledged, {} failovers, {} promotions; operator: {} \
         switchovers, {} forced failovers, {} refused; {} lost within reported loss windows",
        s.events,
        s.completed,
        s.acked,
        s.failovers,
        s.promotions,
        s.switchovers,
        s.forced_failovers,
        s.operator_refused,
        s.forfeited
    );
}

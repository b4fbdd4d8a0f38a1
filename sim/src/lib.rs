//! A deterministic simulator of cellbank's failover and money protocol.
//!
//! One seed is one run: a pair of cells (three replicas each, raft-rs in
//! memory, the real ledger on an in-memory store), the failover
//! coordinator's real decisions over the real routing table machine, and
//! clients writing and reading, under a fault plan drawn from the seed
//! (crashes and restarts, a whole cell down, a cell lost for good,
//! partitions including one-way ones, slow disks, a new coordinator) and
//! ambient faults (message delay, loss, duplication and reordering; clock
//! rates). Everything happens in one thread on a simulated clock, so a seed
//! replays exactly. See `world.rs` for what is real code and what is
//! modelled, and `docs/design.md` for the invariants checked.

pub mod rng;
pub mod world;

use std::fmt;

pub use cellbank_raft::mutation::Mutation;

use rng::Rng;
use world::World;

/// Fault kinds a run may draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// One replica crashes (volatile state lost, log and ledger kept) and
    /// restarts after the fault's duration.
    Crash,
    /// Every replica of a cell crashes, and restarts later.
    CellCrash,
    /// Every replica of a cell crashes and never returns.
    CellLost,
    /// A cut: between the two cells (both ways or one way), between a cell
    /// and the coordinator and clients, or one replica from its cell.
    Partition,
    /// One replica's disk takes milliseconds per write.
    SlowDisk,
    /// One replica stops (as by SIGSTOP) and resumes with its old state.
    Pause,
    /// The coordinator is replaced: a new term, no memory of the cells.
    CoordinatorRestart,
    /// Ambient: message delay (reordering), loss and duplication.
    Network,
    /// Ambient: replica clocks run up to 5% fast or slow.
    ClockSkew,
    /// An operator's planned switchover of a pair (`admin switchover`):
    /// fence the active, let the standby catch up, flip, demote.
    Switchover,
    /// An operator's forced failover of a pair (`admin failover --force`),
    /// whatever its state: a reachable active is fenced first; what may be
    /// lost is reported and is the only loss the checks allow.
    ForcedFailover,
}

pub const ALL_FAULTS: [FaultKind; 11] = [
    FaultKind::Crash,
    FaultKind::CellCrash,
    FaultKind::CellLost,
    FaultKind::Partition,
    FaultKind::SlowDisk,
    FaultKind::Pause,
    FaultKind::CoordinatorRestart,
    FaultKind::Network,
    FaultKind::ClockSkew,
    FaultKind::Switchover,
    FaultKind::ForcedFailover,
];

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Crash => "crash",
            FaultKind::CellCrash => "cell-crash",
            FaultKind::CellLost => "cell-lost",
            FaultKind::Partition => "partition",
            FaultKind::SlowDisk => "slow-disk",
            FaultKind::Pause => "pause",
            FaultKind::CoordinatorRestart => "coordinator-restart",
            FaultKind::Network => "network",
            FaultKind::ClockSkew => "clock-skew",
            FaultKind::Switchover => "switchover",
            FaultKind::ForcedFailover => "forced-failover",
        }
    }

    pub fn parse(name: &str) -> Option<FaultKind> {
        ALL_FAULTS.into_iter().find(|k| k.name() == name)
    }

    /// An operator's action rather than a fault.
    pub fn operator(self) -> bool {
        matches!(self, FaultKind::Switchover | FaultKind::ForcedFailover)
    }
}

/// The set of fault kinds a run may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Faults(Vec<FaultKind>);

impl Faults {
    pub fn all() -> Faults {
        Faults(ALL_FAULTS.to_vec())
    }

    pub fn none() -> Faults {
        Faults(Vec::new())
    }

    /// A comma-separated list of fault names, or `all`.
    pub fn parse(list: &str) -> Result<Faults, String> {
        if list == "all" {
            return Ok(Faults::all());
        }
        if list == "none" || list.is_empty() {
            return Ok(Faults::none());
        }
        let mut kinds = Vec::new();
        for name in list.split(',') {
            let kind = FaultKind::parse(name.trim()).ok_or_else(|| {
                let known: Vec<&str> = ALL_FAULTS.iter().map(|k| k.name()).collect();
                format!("unknown fault {name:?}; known: {}", known.join(", "))
            })?;
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        Ok(Faults(kinds))
    }

    pub fn has(&self, kind: FaultKind) -> bool {
        self.0.contains(&kind)
    }

    /// The faults scheduled at points in time (not ambient, not an
    /// operator's action).
    fn scheduled(&self) -> Vec<FaultKind> {
        self.0
            .iter()
            .copied()
            .filter(|k| !matches!(k, FaultKind::Network | FaultKind::ClockSkew) && !k.operator())
            .collect()
    }

    /// The operator's actions a run may take.
    fn operator(&self) -> Vec<FaultKind> {
        self.0.iter().copied().filter(|k| k.operator()).collect()
    }
}

impl fmt::Display for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.len() == ALL_FAULTS.len() {
            return write!(f, "all");
        }
        if self.0.is_empty() {
            return write!(f, "none");
        }
        let names: Vec<&str> = self.0.iter().map(|k| k.name()).collect();
        write!(f, "{}", names.join(","))
    }
}

/// One fault of a run's plan. `a` picks the cell when the fault starts
/// (0 and 1: the active and standby of pair 1; 2 and 3: of pair 2); `b` the
/// replica or the kind of cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledFault {
    pub at_ms: u64,
    pub kind: FaultKind,
    pub a: u64,
    pub b: u64,
    pub duration_ms: u64,
}

impl ScheduledFault {
    pub fn describe(&self) -> String {
        let pair = 1 + self.a / 2;
        let cell = if self.a.is_multiple_of(2) {
            format!("the active cell of pair {pair}")
        } else {
            format!("the standby cell of pair {pair}")
        };
        let what = match self.kind {
            FaultKind::Crash => format!("crash replica {} of {cell} for {} ms", self.b, self.duration_ms),
            FaultKind::CellCrash => format!("crash every replica of {cell} for {} ms", self.duration_ms),
            FaultKind::CellLost => format!("lose {cell} for good"),
            FaultKind::Partition => {
                let cut = match self.b {
                    0 => format!("cut {cell} from the other cell"),
                    1 => format!("cut {cell}'s messages to the other cell (one way)"),
                    2 => format!("cut the other cell's messages to {cell} (one way)"),
                    3 => format!("cut {cell} from both routers and the clients"),
                    4 => format!("cut {cell} from the coordinator (clients and the other router still reach it)"),
                    r => format!("cut replica {} of {cell} from its cell", r - 4),
                };
                format!("{cut} for {} ms", self.duration_ms)
            }
            FaultKind::SlowDisk => format!("slow disk on replica {} of {cell} for {} ms", self.b, self.duration_ms),
            FaultKind::Pause => format!("pause replica {} of {cell} for {} ms", self.b, self.duration_ms),
            FaultKind::CoordinatorRestart => "a new coordinator takes over".to_string(),
            FaultKind::Switchover => format!("an operator switches pair {pair} over"),
            FaultKind::ForcedFailover => format!("an operator forces a failover of pair {pair}"),
            FaultKind::Network | FaultKind::ClockSkew => self.kind.name().to_string(),
        };
        format!("at {} ms: {what}", self.at_ms)
    }
}

/// A run's faults, drawn from its seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub chaos_ms: u64,
    pub quiet_ms: u64,
    pub faults: Vec<ScheduledFault>,
}

impl Plan {
    pub fn draw(seed: u64, faults: &Faults) -> Plan {
        let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9).wrapping_add(17));
        let chaos_ms = 14_000;
        let kinds = faults.scheduled();
        let mut planned = Vec::new();
        if !kinds.is_empty() {
            let count = rng.range(1, 5);
            for _ in 0..count {
                let kind = rng.pick(&kinds);
                let (a, b) = match kind {
                    FaultKind::Crash | FaultKind::SlowDisk | FaultKind::Pause => (rng.range(0, 3), rng.range(1, 3)),
                    FaultKind::Partition => (rng.range(0, 3), rng.range(0, 7)),
                    _ => (rng.range(0, 3), 0),
                };
                planned.push(ScheduledFault {
                    at_ms: rng.range(3_000, chaos_ms - 2_000),
                    kind,
                    a,
                    b,
                    duration_ms: rng.range(300, 6_000),
                });
            }
        }
        // Operator actions come from their own stream, so that the faults
        // of a seed do not depend on whether actions are drawn too.
        let actions = faults.operator();
        if !actions.is_empty() {
            let mut rng = Rng::new(seed.wrapping_mul(0xD1B5_4A32_D192_ED03).wrapping_add(29));
            for _ in 0..rng.range(0, 2) {
                let kind = rng.pick(&actions);
                let pair = rng.range(0, 1);
                let at_ms = rng.range(3_000, chaos_ms - 2_000);
                planned.push(ScheduledFault { at_ms, kind, a: pair * 2, b: 0, duration_ms: 0 });
            }
        }
        planned.sort_by_key(|f| f.at_ms);
        Plan { chaos_ms, quiet_ms: 10_000, faults: planned }
    }

    /// The plan with only the faults at `keep` (indexes into this plan).
    pub fn keep(&self, keep: &[usize]) -> Plan {
        Plan {
            chaos_ms: self.chaos_ms,
            quiet_ms: self.quiet_ms,
            faults: self.faults.iter().enumerate().filter(|(i, _)| keep.contains(i)).map(|(_, f)| f.clone()).collect(),
        }
    }
}

/// An invariant a run broke.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub invariant: String,
    pub detail: String,
    pub at_us: u64,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at {} ms): {}", self.invariant, self.at_us / 1000, self.detail)
    }
}

/// What one run did.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub events: u64,
    pub messages: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub applied: u64,
    pub completed: u64,
    pub reads: u64,
    pub acked: u64,
    pub failovers: u64,
    pub promotions: u64,
    pub faults: u64,
    pub deliveries: u64,
    /// Operator actions that completed, and that were refused or failed.
    pub switchovers: u64,
    pub forced_failovers: u64,
    pub operator_refused: u64,
    /// Acknowledged writes (and answered credits, and credits whose debit
    /// is gone) that a forced failover lost, each within the loss window
    /// it reported.
    pub forfeited: u64,
    pub serving_lost: bool,
}

impl Stats {
    pub fn add(&mut self, other: &Stats) {
        self.events += other.events;
        self.messages += other.messages;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.applied += other.applied;
        self.completed += other.completed;
        self.reads += other.reads;
        self.acked += other.acked;
        self.failovers += other.failovers;
        self.promotions += other.promotions;
        self.faults += other.faults;
        self.deliveries += other.deliveries;
        self.switchovers += other.switchovers;
        self.forced_failovers += other.forced_failovers;
        self.operator_refused += other.operator_refused;
        self.forfeited += other.forfeited;
    }
}

/// One run's result.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub seed: u64,
    pub plan: Plan,
    pub violation: Option<Violation>,
    pub stats: Stats,
    pub trace: Vec<String>,
}

/// Runs one seed with its drawn plan.
pub fn run_seed(seed: u64, faults: &Faults, trace: bool) -> RunResult {
    run_plan(seed, faults, Plan::draw(seed, faults), trace)
}

/// Runs one seed with a given plan (a drawn plan, or a subset of one).
pub fn run_plan(seed: u64, faults: &Faults, plan: Plan, trace: bool) -> RunResult {
    let mut world = World::new(seed, faults.clone(), plan.clone());
    if trace {
        world.trace = Some(Vec::new());
    }
    world.run(plan.chaos_ms + plan.quiet_ms);
    world.final_checks();
    RunResult {
        seed,
        plan,
        violation: world.violation.clone(),
        stats: world.stats.clone(),
        trace: world.trace.take().unwrap_or_default(),
    }
}

/// The smallest subset of a failing run's faults (removing one at a time
/// while the same invariant still breaks): the faults that matter.
pub fn minimize(seed: u64, faults: &Faults, failing: &RunResult) -> (Vec<usize>, RunResult) {
    let Some(violation) = &failing.violation else {
        return ((0..failing.plan.faults.len()).collect(), failing.clone());
    };
    let drawn = failing.plan.clone();
    let mut keep: Vec<usize> = (0..drawn.faults.len()).collect();
    let mut best = failing.clone();
    let mut k = 0;
    while k < keep.len() {
        let mut candidate = keep.clone();
        candidate.remove(k);
        let result = run_plan(seed, faults, drawn.keep(&candidate), false);
        if result.violation.as_ref().is_some_and(|v| v.invariant == violation.invariant) {
            keep = candidate;
            best = result;
        } else {
            k += 1;
        }
    }
    let traced = run_plan(seed, faults, drawn.keep(&keep), true);
    if traced.violation.is_some() {
        best = traced;
    }
    (keep, best)
}

/// What a sweep over many seeds found.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub seeds: u64,
    pub stats: Stats,
    /// Failing runs, lowest seed first.
    pub failures: Vec<RunResult>,
    /// Runs whose serving cell was lost for good (nothing to check at the end).
    pub serving_lost: u64,
}

/// Named fault plans that every seed of a sweep runs (the seed then varies
/// the network, the clocks and the workload): a situation rare in random
/// plans, explored many times.
pub const SCENARIOS: [&str; 1] = ["forced-failover-of-a-degraded-pair"];

/// The plan of a named scenario.
///
/// `forced-failover-of-a-degraded-pair`: pair 1's active is cut from its
/// standby (the pair degrades), then from the coordinator only (clients
/// and the other router still reach it), and an operator forces a failover
/// while it still takes writes alone; every cut heals at 14 s.
pub fn scenario(name: &str) -> Option<Plan> {
    let faults = match name {
        "forced-failover-of-a-degraded-pair" => vec![
            ScheduledFault { at_ms: 3_000, kind: FaultKind::Partition, a: 0, b: 0, duration_ms: 11_000 },
            ScheduledFault { at_ms: 6_000, kind: FaultKind::Partition, a: 0, b: 4, duration_ms: 8_000 },
            ScheduledFault { at_ms: 7_000, kind: FaultKind::ForcedFailover, a: 0, b: 0, duration_ms: 0 },
        ],
        _ => return None,
    };
    Some(Plan { chaos_ms: 14_000, quiet_ms: 10_000, faults })
}

/// Runs `count` seeds from `first` on `threads` threads. `progress` hears
/// of every finished run. Stops early after `stop_after` failures (0:
/// never).
pub fn sweep(
    first: u64,
    count: u64,
    faults: &Faults,
    threads: usize,
    stop_after: usize,
    progress: &(dyn Fn(&RunResult) + Sync),
) -> Summary {
    sweep_plans(first, count, faults, None, threads, stop_after, progress)
}

/// As [`sweep`], every seed with `plan` when one is given (a scenario)
/// rather than the plan it draws.
pub fn sweep_plans(
    first: u64,
    count: u64,
    faults: &Faults,
    plan: Option<&Plan>,
    threads: usize,
    stop_after: usize,
    progress: &(dyn Fn(&RunResult) + Sync),
) -> Summary {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    let next = AtomicU64::new(0);
    let summary = Mutex::new(Summary::default());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= count {
                    return;
                }
                let seed = first + k;
                let result = match plan {
                    Some(plan) => run_plan(seed, faults, plan.clone(), false),
                    None => run_seed(seed, faults, false),
                };
                progress(&result);
                let mut summary = summary.lock().expect("summary lock");
                summary.seeds += 1;
                summary.stats.add(&result.stats);
                if result.stats.serving_lost {
                    summary.serving_lost += 1;
                }
                if result.violation.is_some() {
                    summary.failures.push(result);
                    if stop_after > 0 && summary.failures.len() >= stop_after {
                        next.store(count, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let mut summary = summary.into_inner().expect("summary lock");
    summary.failures.sort_by_key(|r| r.seed);
    summary
}

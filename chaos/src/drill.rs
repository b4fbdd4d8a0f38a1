//! Drill files (TOML, `deploy/drills/`): what to run, what to break, when,
//! and what must hold. Parsing points at the line and field of a mistake;
//! [`Drill::check`] refuses a drill that could not run as written before
//! anything is started or injected.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// A whole drill file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Drill {
    pub name: String,
    /// One paragraph: what the drill proves.
    #[serde(default)]
    pub description: String,
    /// Chooses targets and timing; the same seed makes the same choices.
    pub seed: u64,
    pub cluster: ClusterSpec,
    pub workload: Workload,
    #[serde(default)]
    pub steady_state: SteadyState,
    #[serde(default)]
    pub method: Vec<Step>,
    #[serde(default)]
    pub stop: StopConditions,
    #[serde(default)]
    pub expect: Expectations,
    /// Run after the method whatever happened (the runner also heals every
    /// fault it injected, always).
    #[serde(default)]
    pub rollbacks: Vec<Rollback>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClusterMode {
    /// The runner starts a local cluster from the topology below and owns
    /// its processes.
    Local,
    /// The runner attaches to a running cluster through its routers. Only
    /// fault points and router faults are available; admin credentials and
    /// a blast radius are required.
    Attach,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    pub mode: ClusterMode,
    /// Local: the topology.
    #[serde(default = "one")]
    pub routers: u64,
    #[serde(default = "two")]
    pub pairs: u64,
    #[serde(default = "three")]
    pub replicas: u64,
    #[serde(default = "yes")]
    pub standby: bool,
    /// Attach: the routers' client addresses.
    #[serde(default)]
    pub router_addrs: Vec<String>,
    /// Attach: the environment variable that holds the admin token.
    #[serde(default = "token_env")]
    pub admin_token_env: String,
    /// Attach: the only cells the drill may touch.
    #[serde(default)]
    pub blast_radius: Vec<u64>,
}

fn one() -> u64 {
    1
}
fn two() -> u64 {
    2
}
fn three() -> u64 {
    3
}
fn yes() -> bool {
    true
}
fn token_env() -> String {
    "CELLBANK_ADMIN_TOKEN".into()
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// Bank transfers within and across cells.
    Transfers,
    /// Red envelopes: senders send, every user grabs.
    Envelopes,
    /// Both at once.
    Mixed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub kind: WorkloadKind,
    /// Operations per second, all clients together (open loop).
    pub rate: u64,
    /// Concurrent clients.
    #[serde(default = "clients")]
    pub clients: u64,
    /// Users (accounts) taking part; each is seeded with `seed_amount`.
    #[serde(default = "accounts")]
    pub accounts: u64,
    #[serde(default = "seed_amount")]
    pub seed_amount: u64,
    /// Share of transfers whose recipient is in another pair.
    #[serde(default = "cross_cell")]
    pub cross_cell: f64,
    /// Largest transfer; 1 in 50 transfers asks for more than any balance
    /// (they must be refused, not applied).
    #[serde(default = "amount_max")]
    pub amount_max: u64,
    /// Envelopes: how many are sent, and shares per envelope.
    #[serde(default = "envelopes")]
    pub envelopes: u64,
    #[serde(default = "shares")]
    pub shares: u32,
    /// Client deadline per operation; past it the outcome is unknown.
    #[serde(default = "deadline_ms")]
    pub deadline_ms: u64,
    /// Share of operations that are reads, half a user's balance
    /// (GetAccount), half a recently answered transfer (GetTransfer); the
    /// checker `reads_see_acknowledged_writes` judges what they returned.
    /// 0..=0.5.
    #[serde(default = "reads")]
    pub reads: f64,
}

fn clients() -> u64 {
    8
}
fn accounts() -> u64 {
    200
}
fn seed_amount() -> u64 {
    1_000_000
}
fn cross_cell() -> f64 {
    0.3
}
fn amount_max() -> u64 {
    500
}
fn envelopes() -> u64 {
    10
}
fn shares() -> u32 {
    40
}
fn deadline_ms() -> u64 {
    5_000
}
fn reads() -> f64 {
    0.1
}

/// Probes of the steady state, measured over a window before the method
/// (the drill does not start when they fail) and over the last window of
/// recovery.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SteadyState {
    #[serde(default = "warmup_s")]
    pub warmup_s: u64,
    #[serde(default = "window_s")]
    pub window_s: u64,
    #[serde(default)]
    pub probes: Vec<Probe>,
}

fn warmup_s() -> u64 {
    3
}
fn window_s() -> u64 {
    4
}

impl Default for SteadyState {
    fn default() -> Self {
        SteadyState { warmup_s: warmup_s(), window_s: window_s(), probes: Vec::new() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Probe {
    /// Acknowledged operations per second at least `min` (as a fraction of
    /// the workload's rate when `fraction_of_rate` is set).
    Throughput {
        #[serde(default)]
        min: f64,
        #[serde(default)]
        fraction_of_rate: f64,
    },
    /// 99th percentile latency of acknowledged operations at most `max_ms`.
    P99 { max_ms: f64 },
    /// Share of operations that got no answer or an error at most `max`.
    ErrorRate { max: f64 },
    /// Every pair is SYNC.
    PairsSync,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL; restarted on its data after `duration_s`.
    Kill,
    /// SIGKILL and restart at once (with `role = "all"`: every process in
    /// turn, `interval_s` apart, waiting for the cluster to be whole).
    Restart,
    /// SIGSTOP, SIGCONT after `duration_s`.
    Pause,
    /// The replica drops every Raft message to and from its peers.
    Partition,
    /// The routers treat the cell as unreachable.
    IsolateCell,
    /// The active cell's stream to its standby is cut.
    CutStandby,
    /// Raft messages from the target are delayed by `delay_ms`.
    Delay,
    /// Raft messages from the target are dropped with `probability`.
    Loss,
    /// Synced log writes take `delay_ms` longer.
    SlowDisk,
    /// The next synced log write fails; the replica stops (restarted after
    /// `duration_s`).
    DiskError,
    /// The replica's wall clock moves by `offset_ms`.
    ClockJump,
    /// A planned switchover of the pair (no fault: an operator action).
    Switchover,
    /// A forced failover of the pair through the routers' admin API (an
    /// operator action): the active is fenced and the standby promoted even
    /// if it is behind or the active is healthy.
    Failover,
    /// `slices` slices of the pair move to another pair, one after another
    /// (an operator action: `admin move-slice`).
    MoveSlices,
    /// A new pair is added (an operator action: `admin add-pair`, an
    /// active and a standby cell of three replicas on free ports of this
    /// machine, started by the runner), and once it is SYNC `slices`
    /// slices of the target pair move to it. Local clusters only.
    AddPair,
    /// Writes are acknowledged without waiting for the standby, whose
    /// stream is cut: synchronous replication off. Breaks RPO = 0 on
    /// purpose: it exists to prove that the lost-write checker fails.
    UnsafeAsyncStandby,
}

impl FaultKind {
    /// Needs the runner to own the processes (a local cluster).
    pub fn is_process_fault(self) -> bool {
        matches!(self, FaultKind::Kill | FaultKind::Restart | FaultKind::Pause | FaultKind::DiskError)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The leader of the cell.
    Leader,
    /// One follower of the cell (chosen by the seed).
    Follower,
    /// Any one replica of the cell (chosen by the seed).
    Replica,
    /// Every replica of the cell.
    Cell,
    /// The coordinating router (the routers' Raft leader).
    RouterLeader,
    /// Every process of the cluster (rolling restart).
    All,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    Active,
    Standby,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub role: Role,
    /// The pair; 0 (absent) lets the seed choose.
    #[serde(default)]
    pub pair: u64,
    /// Which cell of the pair.
    #[serde(default = "active")]
    pub side: Side,
}

fn active() -> Side {
    Side::Active
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub fault: FaultKind,
    pub target: Target,
    /// Start, seconds after the method begins (steps with `at_s` run in
    /// parallel on one timeline)...
    #[serde(default)]
    pub at_s: Option<f64>,
    /// ...or seconds after the previous step ended (serial).
    #[serde(default)]
    pub after_s: Option<f64>,
    /// Up to this much is added to the start, chosen by the seed.
    #[serde(default)]
    pub jitter_ms: u64,
    /// How long the fault lasts before it is healed.
    #[serde(default)]
    pub duration_s: f64,
    #[serde(default)]
    pub delay_ms: u64,
    #[serde(default)]
    pub probability: f64,
    #[serde(default)]
    pub offset_ms: i64,
    /// Rolling restart: pause between two processes.
    #[serde(default)]
    pub interval_s: f64,
    /// Kill: fault points the killed replicas have from the first instant
    /// of their restart (the replicas' `CELLBANK_FAULTS`:
    /// `;`-separated `point=action:duration_ms[:value]`, e.g.
    /// `standby.ship=drop:30000`). The runner heals them after their
    /// longest duration; the step lasts until then.
    #[serde(default)]
    pub restart_faults: Option<String>,
    /// Kill of a whole cell: it is never restarted during the drill (a
    /// cell lost for good), whatever the rollbacks say. A `duration_s` here
    /// is how long the method keeps running with the cell lost (it stays
    /// lost after that too), so the drill observes a long outage.
    #[serde(default)]
    pub permanent: bool,
    /// Move-slices and add-pair: how many of the pair's slices move (1..=64).
    #[serde(default)]
    pub slices: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StopConditions {
    /// Abort when no operation at all succeeded for this long.
    #[serde(default = "max_unavailable_s")]
    pub max_unavailable_s: f64,
    /// Abort when more than this share of operations failed over 5 s.
    #[serde(default = "max_error_rate")]
    pub max_error_rate: f64,
}

fn max_unavailable_s() -> f64 {
    30.0
}
fn max_error_rate() -> f64 {
    1.0
}

impl Default for StopConditions {
    fn default() -> Self {
        StopConditions { max_unavailable_s: max_unavailable_s(), max_error_rate: max_error_rate() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Expectations {
    /// Every fault's RTO at most this (ms); none when absent.
    #[serde(default)]
    pub rto_max_ms: Option<u64>,
    /// No acknowledged operation lost. `false` only for the drill that
    /// proves the checker fails.
    #[serde(default = "yes")]
    pub rpo_zero: bool,
    /// Throughput back to `fraction` of the steady state within `within_s`
    /// of the last fault's end.
    #[serde(default = "recovery_fraction")]
    pub recovery_fraction: f64,
    #[serde(default = "recovery_within_s")]
    pub recovery_within_s: f64,
    /// The 99th percentile of the credit delay of acknowledged cross-pair
    /// transfers (the recipient cell's credit time minus the sender cell's
    /// debit time) at most this (ms), and every one of them credited or
    /// refunded by the end; none when absent.
    #[serde(default)]
    pub credit_delay_p99_max_ms: Option<u64>,
}

fn recovery_fraction() -> f64 {
    0.8
}
fn recovery_within_s() -> f64 {
    15.0
}

impl Default for Expectations {
    fn default() -> Self {
        Expectations {
            rto_max_ms: None,
            rpo_zero: true,
            recovery_fraction: recovery_fraction(),
            recovery_within_s: recovery_within_s(),
            credit_delay_p99_max_ms: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Rollback {
    /// Heal every fault point and router isolation.
    HealAll,
    /// Start (and resume) every process of a local cluster.
    StartAll,
    /// Wait until every pair is SYNC again.
    WaitSync,
}

/// A drill file that does not parse, with where.
#[derive(Debug, Clone, PartialEq)]
pub struct DrillError {
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for DrillError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(column)) => write!(f, "line {line}, column {column}: {}", self.message),
            (Some(line), None) => write!(f, "line {line}: {}", self.message),
            _ => write!(f, "{}", self.message),
        }
    }
}

impl std::error::Error for DrillError {}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

/// The line where `key = ` first appears in the text (for checks that
/// run after parsing).
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.starts_with(key) && l[key.len()..].trim_start().starts_with('=')
        })
        .map(|i| i + 1)
}

impl Drill {
    /// Parses and checks a drill file.
    pub fn parse(text: &str) -> Result<Drill, DrillError> {
        let drill: Drill = toml::from_str(text).map_err(|e| {
            let (line, column) = match e.span() {
                Some(span) => {
                    let (l, c) = line_col(text, span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            DrillError { line, column, message: e.message().to_string() }
        })?;
        drill.check().map_err(|(key, message)| DrillError {
            line: key.and_then(|k| line_of(text, k)),
            column: None,
            message,
        })?;
        Ok(drill)
    }

    /// Checks what TOML cannot: (key for the line, message naming the field).
    fn check(&self) -> Result<(), (Option<&'static str>, String)> {
        let err = |key: &'static str, message: String| Err((Some(key), message));
        if self.name.trim().is_empty() {
            return err("name", "name: must not be empty".into());
        }
        let c = &self.cluster;
        match c.mode {
            ClusterMode::Local => {
                if !(1..=5).contains(&c.routers) {
                    return err("routers", "cluster.routers: 1..=5".into());
                }
                if !(1..=4).contains(&c.pairs) {
                    return err("pairs", "cluster.pairs: 1..=4".into());
                }
                if !(1..=5).contains(&c.replicas) {
                    return err("replicas", "cluster.replicas: 1..=5".into());
                }
            }
            ClusterMode::Attach => {
                if c.router_addrs.is_empty() {
                    return err("router_addrs", "cluster.router_addrs: an attached drill needs the routers".into());
                }
                if c.blast_radius.is_empty() {
                    return err(
                        "blast_radius",
                        "cluster.blast_radius: an attached drill must name the cells it may touch".into(),
                    );
                }
            }
        }
        let w = &self.workload;
        if w.rate == 0 || w.rate > 100_000 {
            return err("rate", "workload.rate: 1..=100000 operations per second".into());
        }
        if w.clients == 0 || w.clients > 256 {
            return err("clients", "workload.clients: 1..=256".into());
        }
        if w.accounts < 2 || w.accounts > 100_000 {
            return err("accounts", "workload.accounts: 2..=100000".into());
        }
        if !(0.0..=1.0).contains(&w.cross_cell) {
            return err("cross_cell", "workload.cross_cell: a share in [0, 1]".into());
        }
        if !(0.0..=0.5).contains(&w.reads) {
            return err(
                "reads",
                "workload.reads: a share in [0, 0.5] (reads check the writes; most must be writes)".into(),
            );
        }
        if w.amount_max == 0 || w.seed_amount == 0 || w.seed_amount > 1 << 40 {
            return err("amount_max", "workload.amount_max and seed_amount: positive, seed_amount ≤ 2^40".into());
        }
        if w.kind != WorkloadKind::Transfers && (w.envelopes == 0 || w.shares == 0 || w.shares > 10_000) {
            return err("shares", "workload.envelopes ≥ 1 and shares 1..=10000 for envelope workloads".into());
        }
        if self.steady_state.window_s == 0 {
            return err("window_s", "steady_state.window_s: at least 1".into());
        }
        let mut last_at = 0.0;
        for (i, step) in self.method.iter().enumerate() {
            let at = |m: String| format!("method[{i}] ({:?}): {m}", step.fault);
            match (step.at_s, step.after_s) {
                (Some(_), Some(_)) | (None, None) => {
                    return err("fault", at("exactly one of at_s (parallel) or after_s (serial)".into()))
                }
                (Some(t), None) | (None, Some(t)) if !(0.0..=3600.0).contains(&t) => {
                    return err("fault", at("the start must be 0..=3600 s".into()))
                }
                _ => {}
            }
            // Fault points live at most 600 s and the runner gives each its
            // duration plus 5 s.
            if !(0.0..=595.0).contains(&step.duration_s) {
                return err("duration_s", at("duration_s: 0..=595".into()));
            }
            if let Some(t) = step.at_s {
                if t < last_at {
                    return err(
                        "at_s",
                        at(format!("at_s {t} is earlier than an earlier step's {last_at}: steps run in file order")),
                    );
                }
                last_at = t;
            }
            let needs_duration = !matches!(
                step.fault,
                FaultKind::Restart
                    | FaultKind::Switchover
                    | FaultKind::Failover
                    | FaultKind::MoveSlices
                    | FaultKind::AddPair
            ) && !step.permanent;
            let moves = matches!(step.fault, FaultKind::MoveSlices | FaultKind::AddPair);
            if moves && !(1..=64).contains(&step.slices) {
                return err("slices", at("slices: 1..=64 slices of the pair move".into()));
            }
            if !moves && step.slices != 0 {
                return err("slices", at("slices: only for move-slices and add-pair".into()));
            }
            if step.permanent {
                if step.fault != FaultKind::Kill || step.target.role != Role::Cell {
                    return err("permanent", at("permanent: only a kill of a whole cell (role = \"cell\")".into()));
                }
                if step.restart_faults.is_some() {
                    return err(
                        "permanent",
                        at("permanent: a cell lost for good is never restarted (no restart_faults)".into()),
                    );
                }
            }
            if let Some(faults) = &step.restart_faults {
                if step.fault != FaultKind::Kill {
                    return err("restart_faults", at("restart_faults: only a kill restarts its targets".into()));
                }
                restart_fault_points(faults)
                    .map_err(|e| (Some("restart_faults"), at(format!("restart_faults: {e}"))))?;
            }
            if needs_duration && step.duration_s <= 0.0 {
                return err(
                    "duration_s",
                    at("duration_s: this fault needs a duration (it heals itself after it)".into()),
                );
            }
            let role = step.target.role;
            let allowed: &[Role] = match step.fault {
                FaultKind::Kill | FaultKind::Pause => {
                    &[Role::Leader, Role::Follower, Role::Replica, Role::Cell, Role::RouterLeader]
                }
                FaultKind::Restart => {
                    &[Role::Leader, Role::Follower, Role::Replica, Role::Cell, Role::RouterLeader, Role::All]
                }
                FaultKind::IsolateCell
                | FaultKind::CutStandby
                | FaultKind::Switchover
                | FaultKind::Failover
                | FaultKind::MoveSlices
                | FaultKind::AddPair
                | FaultKind::UnsafeAsyncStandby => &[Role::Cell],
                _ => &[Role::Leader, Role::Follower, Role::Replica, Role::Cell],
            };
            if !allowed.contains(&role) {
                return err("role", at(format!("target.role {role:?} does not fit; allowed: {allowed:?}")));
            }
            match step.fault {
                FaultKind::Delay | FaultKind::SlowDisk if step.delay_ms == 0 || step.delay_ms > 60_000 => {
                    return err("delay_ms", at("delay_ms: 1..=60000".into()))
                }
                FaultKind::Loss if !(step.probability > 0.0 && step.probability <= 1.0) => {
                    return err("probability", at("probability: in (0, 1]".into()))
                }
                FaultKind::ClockJump if step.offset_ms == 0 || step.offset_ms.abs() > 86_400_000 => {
                    return err("offset_ms", at("offset_ms: non-zero, at most a day either way".into()))
                }
                FaultKind::CutStandby
                | FaultKind::Switchover
                | FaultKind::Failover
                | FaultKind::MoveSlices
                | FaultKind::AddPair
                | FaultKind::UnsafeAsyncStandby
                    if step.target.side != Side::Active =>
                {
                    return err("side", at("target.side: this fault acts on the active cell".into()))
                }
                _ => {}
            }
            if c.mode == ClusterMode::Attach {
                if step.fault.is_process_fault() || step.fault == FaultKind::AddPair {
                    return err(
                        "fault",
                        at("process faults need a local cluster the runner owns (cluster.mode = \"local\")".into()),
                    );
                }
                if role == Role::RouterLeader || role == Role::All {
                    return err("role", at("an attached drill may only touch cells".into()));
                }
            }
            if c.mode == ClusterMode::Local && step.target.pair > c.pairs {
                return err(
                    "pair",
                    at(format!("target.pair {} but the cluster has {} pairs", step.target.pair, c.pairs)),
                );
            }
            if step.target.side == Side::Standby && !c.standby && c.mode == ClusterMode::Local {
                return err("side", at("target.side = standby, but the cluster has no standby cells".into()));
            }
        }
        if !(0.0..=1.0).contains(&self.expect.recovery_fraction) {
            return err("recovery_fraction", "expect.recovery_fraction: a share in [0, 1]".into());
        }
        if self.expect.credit_delay_p99_max_ms.is_some_and(|b| b == 0 || b > 3_600_000) {
            return err("credit_delay_p99_max_ms", "expect.credit_delay_p99_max_ms: 1..=3600000 ms".into());
        }
        if self.expect.credit_delay_p99_max_ms.is_some() && self.workload.cross_cell == 0.0 {
            return err(
                "credit_delay_p99_max_ms",
                "expect.credit_delay_p99_max_ms: the workload has no cross-cell transfers (cross_cell = 0)".into(),
            );
        }
        let distinct: BTreeSet<_> = self.rollbacks.iter().collect();
        if distinct.len() != self.rollbacks.len() {
            return err("rollbacks", "rollbacks: each at most once".into());
        }
        Ok(())
    }
}

/// The fault points a `restart_faults` value sets, with the longest of its
/// durations (ms), checked as the replica checks `CELLBANK_FAULTS` at start
/// (a value it would refuse would keep the restarted replica down).
pub fn restart_fault_points(value: &str) -> Result<(Vec<String>, u64), String> {
    let requests = cellbank_raft::faults::parse_startup(value)?;
    if requests.is_empty() {
        return Err("names no fault".into());
    }
    let longest = requests.iter().map(|r| r.duration_ms).max().unwrap_or(0);
    let mut points: Vec<String> = requests.into_iter().map(|r| r.point).collect();
    points.sort();
    points.dedup();
    Ok((points, longest))
}

/// A small, fixed PRNG (splitmix64): a seed means the same choices in every
/// build of every version.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5eed_ce11_ba4c_0001)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// One step of the method with every seeded choice made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlannedStep {
    pub index: usize,
    pub fault: FaultKind,
    pub role: Role,
    pub side: Side,
    /// The pair (chosen by the seed when the file left it open).
    pub pair: u64,
    /// Which of the candidates (sorted by id) a follower/replica target is;
    /// taken modulo their number when the fault starts.
    pub pick: u64,
    /// Start and end, ms after the method begins (serial steps: relative to
    /// the previous step's end, fixed when it ends).
    pub start_ms: u64,
    pub duration_ms: u64,
    pub serial: bool,
}

/// The seeded plan: the same drill and seed give the same plan.
pub fn plan(drill: &Drill, pairs: u64) -> Vec<PlannedStep> {
    let mut rng = Rng::new(drill.seed);
    drill
        .method
        .iter()
        .enumerate()
        .map(|(index, step)| {
            let pair = if step.target.pair == 0 { 1 + rng.below(pairs) } else { step.target.pair };
            let pick = rng.next_u64();
            let jitter = if step.jitter_ms > 0 { rng.below(step.jitter_ms + 1) } else { 0 };
            let (base, serial) = match (step.at_s, step.after_s) {
                (Some(t), _) => (t, false),
                (None, Some(t)) => (t, true),
                (None, None) => (0.0, false),
            };
            PlannedStep {
                index,
                fault: step.fault,
                role: step.target.role,
                side: step.target.side,
                pair,
                pick,
                start_ms: (base * 1000.0) as u64 + jitter,
                duration_ms: (step.duration_s * 1000.0) as u64,
                serial,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;

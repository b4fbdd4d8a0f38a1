//! Runs one drill: steady state, method, rollbacks, resolution, checkers,
//! expectations; returns the journal the report is made from.
//!
//! Order of a run (times in ms since the workload started):
//! 1. Before anything: the cluster answers, every targeted cell is inside
//!    the blast radius, the credentials work on every replica.
//! 2. Accounts are opened and seeded; the workload starts.
//! 3. After the warm-up, the steady-state probes are measured over one
//!    window. If they fail, no fault is injected and the drill fails.
//! 4. The method: each step starts at its time (parallel) or after the
//!    previous step ended (serial); its targets are resolved by role at that
//!    moment; it is healed after its duration. Stop conditions are watched
//!    every 100 ms and abort the method (healing everything).
//! 5. Everything is healed and the heal verified; the rollbacks run.
//! 6. Recovery: the workload runs on until throughput is back (or the
//!    bound passes), then one more steady-state window.
//! 7. The workload stops; unknown outcomes are resolved; the credits
//!    settle; the final state is read; the checkers and expectations judge.
//!
//! A cell killed for good (`permanent`) stays down through the rollbacks and
//! the checks: the pair it belonged to must be served by its other cell, is
//! not expected to be SYNC (it has no standby left), and is reconciled
//! without it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cellbank_proto::cell::InjectFaultRequest;
use cellbank_proto::cell::PairRole;
use cellbank_proto::router::RoutingTable;
use serde::{Deserialize, Serialize};

use crate::checkers::{self, CreditDelays, Status, Verdict};
use crate::drill::{ClusterMode, Drill, FaultKind, PlannedStep, Probe, Role, Rollback, Side};
use crate::faults::{Access, Proc, Processes};
use crate::history::History;
use crate::workload::{self, Population, Recorder};

/// Width of one point of the throughput/latency series.
pub const BUCKET_MS: u64 = 500;

pub struct Cluster {
    pub access: Access,
    /// Present for a local cluster the runner owns.
    pub processes: Option<Box<dyn Processes>>,
    /// Where the processes' logs are (local), for the report.
    pub logs: Option<String>,
}

/// What the terminal shows while a drill runs.
pub trait Progress: Send + Sync {
    fn line(&self, text: &str);
}

pub struct Stdout;

impl Progress for Stdout {
    fn line(&self, text: &str) {
        eprintln!("{text}");
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultRecord {
    pub step: usize,
    pub fault: FaultKind,
    pub pair: u64,
    /// The processes or cells it acted on, as resolved when it started.
    pub targets: Vec<String>,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Time to the first acknowledged write sent once the fault was in
    /// place, on the pairs the fault touched; for a switchover or a
    /// failover, the longest wait of any write in flight during the call
    /// (see [`rto`]).
    pub rto_ms: Option<u64>,
    pub failover: Option<FailoverTimeline>,
    pub detail: String,
}

impl FaultKind {
    /// An operator action on the pair whose outage is the call itself.
    fn is_pair_action(self) -> bool {
        matches!(self, FaultKind::Switchover | FaultKind::Failover | FaultKind::MoveSlices | FaultKind::AddPair)
    }
}

/// A pair's change of active cell during a fault, each time since the
/// fault started (ms). Observed by polling every 100 ms.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct FailoverTimeline {
    /// The coordinator decided (its audit record's time).
    pub detection_ms: Option<u64>,
    /// The new active cell reported itself ACTIVE at the new epoch.
    pub promotion_ms: Option<u64>,
    /// The routing table sent the pair's slices to the new active cell.
    pub route_switch_ms: Option<u64>,
    /// The first acknowledged operation on the pair.
    pub first_success_ms: Option<u64>,
    pub from_cell: u64,
    pub to_cell: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    pub t_ms: u64,
    pub ok: u64,
    pub refused: u64,
    pub unknown: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeResult {
    pub probe: String,
    pub measured: f64,
    pub bound: String,
    pub pass: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Expectation {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub t_ms: u64,
    pub what: String,
}

/// The drill's journal: everything the report shows.
#[derive(Debug, Clone, Serialize)]
pub struct Journal {
    pub drill: Drill,
    pub seed: u64,
    pub replay: String,
    pub started_at_unix_ms: u64,
    pub plan: Vec<PlannedStep>,
    pub blast_radius: Vec<u64>,
    pub events: Vec<Event>,
    pub faults: Vec<FaultRecord>,
    pub series: Vec<Point>,
    pub method_window_ms: (u64, u64),
    pub steady_before: Vec<ProbeResult>,
    pub steady_after: Vec<ProbeResult>,
    pub steady_throughput: f64,
    pub recovery_ms: Option<u64>,
    pub verdicts: Vec<Verdict>,
    pub expectations: Vec<Expectation>,
    pub operations: usize,
    pub acknowledged: usize,
    /// Reads among the operations (balance and transfer reads).
    pub reads: usize,
    /// Writes whose outcome the client never heard (reads not counted).
    pub unknown: usize,
    pub resolved: usize,
    /// The credit delays of the acknowledged cross-pair transfers (none when
    /// the final state could not be read).
    pub credit_delay: Option<CreditDelays>,
    /// Cells killed for good (never restarted during the drill).
    pub lost_cells: Vec<u64>,
    /// Acknowledged operations missing from the ledger.
    pub rpo_lost: usize,
    pub heal_verified: bool,
    pub aborted: Option<String>,
    pub reconcile_discrepancies: Vec<String>,
    pub logs: Option<String>,
    pub history: History,
}

impl Journal {
    pub fn passed(&self) -> bool {
        self.aborted.is_none()
            && self.verdicts.iter().all(|v| v.status == Status::Pass)
            && self.expectations.iter().all(|e| e.pass)
            && self.steady_before.iter().all(|p| p.pass)
            && self.steady_after.iter().all(|p| p.pass)
    }
}

pub struct RunOptions {
    pub seed: u64,
    /// The command that replays this drill (shown in the report).
    pub replay: String,
    /// Set by a signal or `cellbank chaos halt`: abort, heal, report.
    pub halt: Arc<std::sync::atomic::AtomicBool>,
}

/// The cells a step may touch: its pair's active and standby cell.
fn cells_of(table: &RoutingTable, pair: u64) -> (u64, u64) {
    table.pairs.iter().find(|p| p.pair_id == pair).map(|p| (p.active_cell_id, p.standby_cell_id)).unwrap_or((0, 0))
}

/// An injected fault still to be healed.
struct Live {
    record: usize,
    kind: FaultKind,
    procs: Vec<Proc>,
    addrs: Vec<String>,
    /// The fault points set on `addrs` (healed one by one, so that another
    /// live step's faults on the same replica stay).
    points: Vec<String>,
    cells: Vec<u64>,
    heal_at_ms: Option<u64>,
    /// A kill whose targets restart with these fault points in place
    /// (`CELLBANK_FAULTS`), and the targets' addresses to heal them on.
    restart_faults: Option<String>,
    restart_addrs: Vec<String>,
}

struct Run<'a> {
    drill: &'a Drill,
    cluster: Cluster,
    recorder: Arc<Recorder>,
    progress: &'a dyn Progress,
    events: Vec<Event>,
    faults: Vec<FaultRecord>,
    live: Vec<Live>,
    /// (t_ms, pair, epoch, active cell, promoted: new active reports ACTIVE)
    observations: Vec<(u64, u64, u64, u64, bool)>,
    /// The only cells this drill may touch.
    radius: Vec<u64>,
    halt: Arc<std::sync::atomic::AtomicBool>,
    /// Cells killed for good, and their processes (never restarted).
    lost: Vec<(u64, Vec<Proc>)>,
    /// Steps that run alongside the timeline (slice moves: other steps may
    /// strike in the middle of them): their record and their task, which
    /// answers what happened and when it ended.
    background: Vec<(usize, Background)>,
}

/// A step running alongside the timeline: what happened, and when it ended.
type Background = tokio::task::JoinHandle<anyhow::Result<(String, u64)>>;

impl<'a> Run<'a> {
    fn event(&mut self, what: String) {
        let t_ms = self.recorder.now_ms();
        self.progress.line(&format!("[{:>6.1}s] {what}", t_ms as f64 / 1000.0));
        self.events.push(Event { t_ms, what });
    }

    fn procs(&mut self) -> anyhow::Result<&mut Box<dyn Processes>> {
        self.cluster.processes.as_mut().ok_or_else(|| anyhow::anyhow!("process faults need a local cluster"))
    }

    /// Resolves a step's targets by role now (the seed's pick among sorted
    /// candidates) and injects it.
    async fn inject(&mut self, step: &PlannedStep) -> anyhow::Result<()> {
        let table = self.cluster.access.table().await?;
        let (active, standby) = cells_of(&table, step.pair);
        let cell = if step.side == Side::Active { active } else { standby };
        anyhow::ensure!(cell != 0, "pair {} has no {:?} cell now", step.pair, step.side);
        anyhow::ensure!(self.radius.contains(&cell), "cell {cell} is outside the blast radius {:?}", self.radius);
        let (members, leader) = crate::faults::replicas(&table, cell).await;
        anyhow::ensure!(!members.is_empty(), "cell {cell} has no replicas in the routing table");
        let chosen: Vec<(u64, String)> = match step.role {
            Role::Leader => {
                let id = leader.ok_or_else(|| anyhow::anyhow!("cell {cell} has no leader to target"))?;
                members.iter().filter(|(r, _)| *r == id).cloned().collect()
            }
            Role::Follower => {
                let followers: Vec<_> = members.iter().filter(|(r, _)| Some(*r) != leader).cloned().collect();
                anyhow::ensure!(!followers.is_empty(), "cell {cell} has no follower");
                vec![followers[(step.pick % followers.len() as u64) as usize].clone()]
            }
            Role::Replica => vec![members[(step.pick % members.len() as u64) as usize].clone()],
            Role::Cell => members.clone(),
            Role::RouterLeader | Role::All => Vec::new(),
        };
        let procs: Vec<Proc> = chosen.iter().map(|(r, _)| Proc::Replica { cell, replica: *r }).collect();
        let addrs: Vec<String> = chosen.iter().map(|(_, a)| a.clone()).collect();
        // Fault points outlive the planned heal by a margin, so the runner
        // heals them; they heal themselves if the runner is gone.
        let expiry_ms = step.duration_ms + 5_000;
        let now = self.recorder.now_ms();
        let mut record = FaultRecord {
            step: step.index,
            fault: step.fault,
            pair: step.pair,
            targets: Vec::new(),
            start_ms: now,
            end_ms: now,
            rto_ms: None,
            failover: None,
            detail: String::new(),
        };
        let mut live = Live {
            record: self.faults.len(),
            kind: step.fault,
            procs: Vec::new(),
            addrs: Vec::new(),
            points: Vec::new(),
            cells: Vec::new(),
            heal_at_ms: None,
            restart_faults: None,
            restart_addrs: Vec::new(),
        };
        let point = |point: &str, action: &str| InjectFaultRequest {
            point: point.into(),
            action: action.into(),
            duration_ms: expiry_ms,
            ..Default::default()
        };
        let d = &self.drill.method[step.index];
        match step.fault {
            FaultKind::Kill | FaultKind::Pause | FaultKind::Restart => {
                let targets = if step.role == Role::RouterLeader {
                    let status = self.cluster.access.status().await?;
                    vec![Proc::Router(status.leader_router_id)]
                } else if step.role == Role::All {
                    let mut all = self.procs()?.all();
                    all.sort();
                    all
                } else {
                    procs.clone()
                };
                if step.fault == FaultKind::Restart && step.role == Role::All {
                    return self.rolling_restart(step, targets, record).await;
                }
                for p in &targets {
                    match step.fault {
                        FaultKind::Pause => self.procs()?.pause(*p, true)?,
                        _ => self.procs()?.kill(*p)?,
                    }
                }
                if step.fault == FaultKind::Restart {
                    for p in &targets {
                        self.procs()?.start(*p)?;
                    }
                } else if d.permanent {
                    // Lost for good: nothing heals it.
                    self.lost.push((cell, targets.clone()));
                    record.detail = format!("cell {cell} lost for good: never restarted during the drill");
                } else {
                    live.procs = targets.clone();
                    if let Some(faults) = &d.restart_faults {
                        live.restart_faults = Some(faults.clone());
                        live.restart_addrs = addrs.clone();
                        record.detail = format!("restarted with CELLBANK_FAULTS={faults}");
                    }
                }
                record.targets = targets.iter().map(|p| p.to_string()).collect();
            }
            FaultKind::DiskError => {
                for addr in &addrs {
                    self.cluster.access.inject(addr, point("disk.sync", "error")).await?;
                }
                live.points = vec!["disk.sync".into()];
                live.procs = procs.clone();
                live.addrs = addrs.clone();
                record.targets = procs.iter().map(|p| p.to_string()).collect();
            }
            FaultKind::Partition | FaultKind::Delay | FaultKind::Loss | FaultKind::SlowDisk | FaultKind::ClockJump => {
                let requests: Vec<InjectFaultRequest> = match step.fault {
                    FaultKind::Partition => vec![point("raft.send", "drop"), point("raft.recv", "drop")],
                    FaultKind::Delay => {
                        vec![InjectFaultRequest { delay_ms: d.delay_ms, ..point("raft.send", "delay") }]
                    }
                    FaultKind::Loss => {
                        vec![InjectFaultRequest { probability: d.probability, ..point("raft.send", "drop") }]
                    }
                    FaultKind::SlowDisk => {
                        vec![InjectFaultRequest { delay_ms: d.delay_ms, ..point("disk.sync", "delay") }]
                    }
                    _ => vec![InjectFaultRequest { offset_ms: d.offset_ms, ..point("clock", "offset") }],
                };
                for addr in &addrs {
                    for request in &requests {
                        self.cluster.access.inject(addr, request.clone()).await?;
                    }
                }
                live.points = requests.iter().map(|r| r.point.clone()).collect();
                live.addrs = addrs.clone();
                record.targets = procs.iter().map(|p| p.to_string()).collect();
            }
            FaultKind::CutStandby | FaultKind::UnsafeAsyncStandby => {
                let requests = if step.fault == FaultKind::CutStandby {
                    vec![point("standby.ship", "drop")]
                } else {
                    vec![point("standby.ack", "skip"), point("standby.ship", "drop")]
                };
                for addr in &addrs {
                    for request in &requests {
                        self.cluster.access.inject(addr, request.clone()).await?;
                    }
                }
                live.points = requests.iter().map(|r| r.point.clone()).collect();
                live.addrs = addrs.clone();
                record.targets = vec![format!("cell {cell} (all replicas)")];
            }
            FaultKind::IsolateCell => {
                self.set_isolation(Some((cell, self.recorder.now_ms() + step.duration_ms))).await?;
                live.cells = vec![cell];
                record.targets = vec![format!("cell {cell} from every router")];
            }
            FaultKind::Switchover => {
                let pause = self.cluster.access.switchover(step.pair, "planned switchover drill").await?;
                record.targets = vec![format!("pair {} (cell {cell} active)", step.pair)];
                record.detail = format!("write pause reported by the coordinator: {pause} ms");
            }
            FaultKind::MoveSlices => {
                // In the background: the timeline goes on, so a later step
                // can strike in the middle of the moves.
                let (access, recorder, pair, slices) =
                    (self.cluster.access.clone(), self.recorder.clone(), step.pair, d.slices);
                let task = tokio::spawn(async move {
                    let detail = access.move_slices(pair, slices, "slice move drill").await?;
                    Ok((detail, recorder.now_ms()))
                });
                self.background.push((self.faults.len(), task));
                record.targets = vec![format!("{} slices of pair {}", d.slices, step.pair)];
                record.detail = "moving".into();
            }
            FaultKind::AddPair => {
                let add = self.procs()?.plan_pair(&table)?;
                let (pair_id, active, standby) =
                    (add.pair_id, add.active.as_ref().map(|c| c.cell_id), add.standby.as_ref().map(|c| c.cell_id));
                let added = self.cluster.access.add_pair(add, "a pair added at peak").await?;
                let table = self.cluster.access.table().await?;
                let started = self.procs()?.adopt(&table)?;
                self.event(format!("pair {pair_id} added ({added}); {} processes started", started.len()));
                // The pair comes to SYNC and the slices move in the
                // background, as the timeline goes on.
                let (access, recorder, from, slices) =
                    (self.cluster.access.clone(), self.recorder.clone(), step.pair, d.slices);
                let task = tokio::spawn(async move {
                    let added_at = std::time::Instant::now();
                    loop {
                        let table = access.table().await.unwrap_or_default();
                        let sync = table
                            .pairs
                            .iter()
                            .any(|p| p.pair_id == pair_id && p.mode == cellbank_proto::router::PairMode::Sync as i32);
                        if sync {
                            break;
                        }
                        anyhow::ensure!(
                            added_at.elapsed() < std::time::Duration::from_secs(90),
                            "pair {pair_id} was not SYNC 90 s after it was added"
                        );
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    let sync_ms = added_at.elapsed().as_millis();
                    let moved = access.move_slices_to(from, Some(pair_id), slices, "a pair added at peak").await?;
                    Ok((format!("{moved}; pair {pair_id} was SYNC {sync_ms} ms after it was added"), recorder.now_ms()))
                });
                self.background.push((self.faults.len(), task));
                record.targets = vec![format!(
                    "new pair {pair_id} (cell {} active, cell {} standby), then {} slices of pair {}",
                    active.unwrap_or(0),
                    standby.unwrap_or(0),
                    d.slices,
                    step.pair
                )];
                record.detail = "adding".into();
            }
            FaultKind::Failover => {
                let answer = self.cluster.access.failover(step.pair, "forced failover drill").await?;
                record.targets = vec![format!("pair {} (cell {cell} active)", step.pair)];
                record.detail = format!(
                    "forced failover: cell {} active at epoch {}{}",
                    answer.active_cell_id,
                    answer.new_epoch,
                    if answer.may_be_lost.is_empty() {
                        String::new()
                    } else {
                        format!("; the coordinator says may be lost: {}", answer.may_be_lost)
                    }
                );
            }
        }
        // The fault is in place now: its window (and RTO) starts here. A
        // switchover's or failover's starts with the call (its write pause is
        // inside it).
        let now = self.recorder.now_ms();
        if !step.fault.is_pair_action() {
            record.start_ms = now;
        }
        record.end_ms = now;
        // A cell lost for good with a duration keeps the method running that
        // long (its "heal" restarts nothing).
        let observed_loss = d.permanent && step.duration_ms > 0;
        if !live.procs.is_empty() || !live.addrs.is_empty() || !live.cells.is_empty() || observed_loss {
            live.heal_at_ms = (step.duration_ms > 0).then(|| now + step.duration_ms);
            self.live.push(live);
        }
        self.event(format!(
            "inject {:?} on {} (step {}, pair {})",
            step.fault,
            record.targets.join(", "),
            step.index,
            step.pair
        ));
        self.faults.push(record);
        Ok(())
    }

    async fn rolling_restart(
        &mut self,
        step: &PlannedStep,
        targets: Vec<Proc>,
        mut record: FaultRecord,
    ) -> anyhow::Result<()> {
        let interval = Duration::from_secs_f64(self.drill.method[step.index].interval_s.max(0.5));
        self.event(format!("rolling restart of {} processes", targets.len()));
        for p in &targets {
            if self.halted() {
                break;
            }
            self.procs()?.kill(*p)?;
            self.procs()?.start(*p)?;
            self.event(format!("restarted {p}"));
            tokio::time::sleep(interval).await;
            // Wait for the cluster to be whole before the next one.
            self.cluster.access.wait_sync(Duration::from_secs(20)).await;
        }
        record.targets = targets.iter().map(|p| p.to_string()).collect();
        record.end_ms = self.recorder.now_ms();
        self.faults.push(record);
        Ok(())
    }

    /// Sets the routers' isolation to the cells of every live isolation
    /// step plus `adding` (cell, heal time), until the latest heal time and
    /// 5 s more (a router's isolation call replaces its whole set).
    async fn set_isolation(&self, adding: Option<(u64, u64)>) -> anyhow::Result<()> {
        let now = self.recorder.now_ms();
        let isolated: Vec<(u64, u64)> = self
            .live
            .iter()
            .flat_map(|l| l.cells.iter().map(move |c| (*c, l.heal_at_ms.unwrap_or(now))))
            .chain(adding)
            .collect();
        if isolated.is_empty() {
            return self.cluster.access.clear_isolation().await;
        }
        let until = isolated.iter().map(|i| i.1).max().unwrap_or(now);
        let mut cells: Vec<u64> = isolated.iter().map(|i| i.0).collect();
        cells.sort_unstable();
        cells.dedup();
        self.cluster
            .access
            .isolate(&cells, Duration::from_millis(until.saturating_sub(now)) + Duration::from_secs(5))
            .await
    }

    fn halted(&self) -> bool {
        self.halt.load(Ordering::Relaxed)
    }

    /// Heals one live fault. A kill with `restart_faults` restarts its
    /// targets with them in place and stays live until they are healed in
    /// turn (unless `ending`: at the end of the method, a plain restart).
    async fn heal(&mut self, index: usize, ending: bool) {
        let mut live = self.live.remove(index);
        if let (Some(faults), false) = (live.restart_faults.take(), ending) {
            if !live.procs.is_empty() && self.cluster.processes.is_some() {
                return self.restart_with_faults(live, faults).await;
            }
        }
        // A replica a disk fault stopped must be seen stopped to be restarted.
        let exited = self.cluster.processes.as_mut().map(|p| p.reap_exited()).unwrap_or_default();
        for p in exited {
            self.event(format!("{p} exited"));
        }
        for p in &live.procs {
            if let Some(procs) = self.cluster.processes.as_mut() {
                let result = match live.kind {
                    FaultKind::Pause => procs.pause(*p, false),
                    _ if procs.is_running(*p) => Ok(()),
                    _ => procs.start(*p),
                };
                if let Err(e) = result {
                    self.event(format!("heal {p}: {e}"));
                }
            }
        }
        for (addr, point) in live.addrs.iter().flat_map(|a| live.points.iter().map(move |p| (a, p))) {
            if let Err(e) = self.cluster.access.heal_point(addr, point).await {
                // A replica the fault stopped (disk error) lost its faults with it.
                if live.kind != FaultKind::DiskError {
                    self.event(format!("heal {addr}: {e}"));
                }
            }
        }
        if !live.cells.is_empty() {
            // The other live isolations stay.
            if let Err(e) = self.set_isolation(None).await {
                self.event(format!("isolation: {e}"));
            }
        }
        let now = self.recorder.now_ms();
        self.faults[live.record].end_ms = now;
        let what = self.faults[live.record].targets.join(", ");
        if live.procs.is_empty() && live.addrs.is_empty() && live.cells.is_empty() {
            self.event(format!("{what}: still lost for good; the observed outage ends"));
        } else {
            self.event(format!("healed {:?} on {what}", live.kind));
        }
    }

    /// The heal of a kill with `restart_faults`: its targets start with the
    /// fault points in place from their first instant; the points are healed
    /// after their longest duration (the step lasts until then).
    async fn restart_with_faults(&mut self, live: Live, faults: String) {
        let (points, longest_ms) = match crate::drill::restart_fault_points(&faults) {
            Ok(parsed) => parsed,
            Err(e) => {
                // Checked when the drill was parsed; restart plainly.
                self.event(format!("restart_faults {faults:?}: {e}"));
                (Vec::new(), 0)
            }
        };
        let env = [(cellbank_raft::faults::STARTUP_ENV, faults.as_str())];
        let exited = self.cluster.processes.as_mut().map(|p| p.reap_exited()).unwrap_or_default();
        for p in exited {
            self.event(format!("{p} exited"));
        }
        for p in &live.procs {
            if let Some(procs) = self.cluster.processes.as_mut() {
                let result = if procs.is_running(*p) { Ok(()) } else { procs.start_with_env(*p, &env) };
                if let Err(e) = result {
                    self.event(format!("restart {p}: {e}"));
                }
            }
        }
        let what = self.faults[live.record].targets.join(", ");
        self.event(format!("restarted {what} with {}={faults}", cellbank_raft::faults::STARTUP_ENV));
        if points.is_empty() {
            self.faults[live.record].end_ms = self.recorder.now_ms();
            return;
        }
        let now = self.recorder.now_ms();
        self.live.push(Live {
            record: live.record,
            kind: live.kind,
            procs: Vec::new(),
            addrs: live.restart_addrs,
            points,
            cells: Vec::new(),
            heal_at_ms: Some(now + longest_ms),
            restart_faults: None,
            restart_addrs: Vec::new(),
        });
    }

    fn lost_procs(&self) -> Vec<Proc> {
        self.lost.iter().flat_map(|(_, procs)| procs.iter().copied()).collect()
    }

    fn lost_cells(&self) -> Vec<u64> {
        self.lost.iter().map(|(cell, _)| *cell).collect()
    }

    /// Heals everything the runner may have touched and checks that nothing
    /// is left: no fault point on any replica, no isolation, every process
    /// running (but those of a cell lost for good).
    async fn heal_all(&mut self) -> bool {
        while !self.live.is_empty() {
            self.heal(0, true).await;
        }
        let mut ok = true;
        let lost = self.lost_procs();
        if let Some(procs) = self.cluster.processes.as_mut() {
            procs.reap_exited();
            for p in procs.all().into_iter().filter(|p| !lost.contains(p)) {
                let _ = procs.pause(p, false);
                if !procs.is_running(p) {
                    if let Err(e) = procs.start(p) {
                        ok = false;
                        self.progress.line(&format!("could not restart {p}: {e}"));
                    }
                }
            }
        }
        // Isolation is cleared on a cluster the drill owns, or when the drill
        // isolated a cell (an operator's own isolation of an attached
        // cluster is left alone otherwise).
        let isolated = self.faults.iter().any(|f| f.fault == FaultKind::IsolateCell);
        if self.drill.cluster.mode == ClusterMode::Local || isolated {
            // Every router must hear it; a router just restarted may take
            // a few seconds to listen.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                match self.cluster.access.clear_isolation().await {
                    Ok(()) => break,
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        self.progress.line(&format!("could not clear the routers' isolation: {e:#}"));
                        ok = false;
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
        }
        // Every replica inside the blast radius (give restarted replicas a
        // moment to listen before asking them).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let lost_cells = self.lost_cells();
        let addrs: Vec<String> = match self.cluster.access.table().await {
            Ok(table) => table
                .cells
                .iter()
                .filter(|c| self.radius.contains(&c.cell_id) && !lost_cells.contains(&c.cell_id))
                .flat_map(|c| c.replicas.clone())
                .collect(),
            Err(_) => Vec::new(),
        };
        if addrs.is_empty() {
            ok = false;
        }
        for addr in addrs {
            loop {
                let _ = self.cluster.access.heal(&addr).await;
                match self.cluster.access.list(&addr).await {
                    Ok(list) if list.faults.is_empty() => break,
                    Ok(list) => {
                        self.progress.line(&format!("replica {addr} still has {} fault(s)", list.faults.len()));
                    }
                    Err(_) => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    self.progress.line(&format!("could not verify that replica {addr} is healed"));
                    ok = false;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        self.event(format!("healed everything; verified: {ok}"));
        ok
    }

    /// Polls the routing table and the cells' pair state (100 ms).
    async fn observe(&mut self) {
        let Ok(status) = self.cluster.access.status().await else { return };
        let t = self.recorder.now_ms();
        let table = status.table.clone().unwrap_or_default();
        for pair in &table.pairs {
            let promoted = status.replicas.iter().any(|r| {
                r.cell_id == pair.active_cell_id
                    && r.status
                        .as_ref()
                        .and_then(|s| s.pair.as_ref())
                        .is_some_and(|p| p.epoch == pair.epoch && p.role == PairRole::Active as i32)
            });
            let last = self.observations.iter().rev().find(|o| o.1 == pair.pair_id).copied();
            if last.map(|o| (o.2, o.4)) != Some((pair.epoch, promoted)) {
                self.observations.push((t, pair.pair_id, pair.epoch, pair.active_cell_id, promoted));
            }
        }
    }
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64
}

/// Throughput and latency per bucket, by answer time.
pub fn series(history: &History) -> Vec<Point> {
    let end = history.ops.iter().map(|op| op.answered_ms).max().unwrap_or(0);
    let mut points: Vec<(Point, Vec<u64>)> = (0..=end / BUCKET_MS)
        .map(|i| (Point { t_ms: i * BUCKET_MS, ok: 0, refused: 0, unknown: 0, p50_ms: 0.0, p99_ms: 0.0 }, Vec::new()))
        .collect();
    for op in &history.ops {
        let (point, latencies) = &mut points[(op.answered_ms / BUCKET_MS) as usize];
        match op.outcome {
            crate::history::Outcome::Ok => {
                point.ok += 1;
                latencies.push(op.answered_ms - op.sent_ms);
            }
            crate::history::Outcome::Refused(_) => point.refused += 1,
            crate::history::Outcome::Unknown => point.unknown += 1,
        }
    }
    points
        .into_iter()
        .map(|(mut p, mut l)| {
            l.sort_unstable();
            p.p50_ms = percentile(&l, 0.5);
            p.p99_ms = percentile(&l, 0.99);
            p
        })
        .collect()
}

/// Measures the probes over [from, to) (ms).
fn probe(drill: &Drill, history: &History, from: u64, to: u64, pairs_sync: bool) -> (Vec<ProbeResult>, f64) {
    let span = ((to - from) as f64 / 1000.0).max(0.001);
    let ops: Vec<_> = history.ops.iter().filter(|op| op.answered_ms >= from && op.answered_ms < to).collect();
    let mut sorted: Vec<u64> = ops
        .iter()
        .filter(|op| op.outcome == crate::history::Outcome::Ok)
        .map(|op| op.answered_ms - op.sent_ms)
        .collect();
    sorted.sort_unstable();
    let throughput = sorted.len() as f64 / span;
    let unknown = ops.iter().filter(|op| op.outcome == crate::history::Outcome::Unknown).count();
    let error_rate = if ops.is_empty() { 1.0 } else { unknown as f64 / ops.len() as f64 };
    let results = drill
        .steady_state
        .probes
        .iter()
        .map(|p| match p {
            Probe::Throughput { min, fraction_of_rate } => {
                let bound = min.max(fraction_of_rate * drill.workload.rate as f64);
                ProbeResult {
                    probe: "throughput (ops/s)".into(),
                    measured: throughput,
                    bound: format!(">= {bound:.0}"),
                    pass: throughput >= bound,
                }
            }
            Probe::P99 { max_ms } => {
                let p99 = percentile(&sorted, 0.99);
                ProbeResult {
                    probe: "p99 latency (ms)".into(),
                    measured: p99,
                    bound: format!("<= {max_ms}"),
                    pass: p99 <= *max_ms,
                }
            }
            Probe::ErrorRate { max } => ProbeResult {
                probe: "error rate".into(),
                measured: error_rate,
                bound: format!("<= {max}"),
                pass: error_rate <= *max,
            },
            Probe::PairsSync => ProbeResult {
                probe: "every pair SYNC".into(),
                measured: if pairs_sync { 1.0 } else { 0.0 },
                bound: "= 1".into(),
                pass: pairs_sync,
            },
        })
        .collect();
    (results, throughput)
}

/// Checks, before any fault: the blast radius and the credentials.
pub async fn preflight(drill: &Drill, access: &Access, plan: &[PlannedStep]) -> anyhow::Result<Vec<u64>> {
    let table = access.table().await?;
    let radius: Vec<u64> = match drill.cluster.mode {
        ClusterMode::Local => table.cells.iter().map(|c| c.cell_id).collect(),
        ClusterMode::Attach => drill.cluster.blast_radius.clone(),
    };
    for step in plan {
        let (active, standby) = cells_of(&table, step.pair);
        anyhow::ensure!(active != 0, "method[{}]: pair {} does not exist in this cluster", step.index, step.pair);
        // A step may touch its pair's cell on its side; a failover it causes
        // moves traffic to the other cell of the pair, so both must be inside.
        for cell in [active, standby].into_iter().filter(|c| *c != 0) {
            anyhow::ensure!(
                radius.contains(&cell),
                "method[{}] ({:?} on pair {}) may touch cell {cell}, outside the blast radius {radius:?}",
                step.index,
                step.fault,
                step.pair
            );
        }
    }
    for cell in &radius {
        let addrs = table.cells.iter().find(|c| c.cell_id == *cell).map(|c| c.replicas.clone()).unwrap_or_default();
        anyhow::ensure!(!addrs.is_empty(), "blast radius: no cell {cell} in this cluster");
        for addr in addrs {
            access.check_credentials(&addr).await?;
        }
    }
    Ok(radius)
}

/// Runs the drill against `cluster`: the phases of the module's doc, in
/// order, each a function below.
pub async fn run(
    drill: &Drill,
    options: &RunOptions,
    cluster: Cluster,
    progress: &dyn Progress,
) -> anyhow::Result<Journal> {
    let mut drill = drill.clone();
    drill.seed = options.seed;
    let drill = &drill;
    let access = cluster.access.clone();
    // 1 and 2: preflight, accounts, the workload.
    let setup = prepare(drill, options, &access, progress).await?;
    let recorder = Recorder::new();
    let tasks = workload::start(
        access.routers.clone(),
        &drill.workload,
        setup.population.clone(),
        recorder.clone(),
        options.seed,
    );
    let mut run = Run {
        drill,
        cluster,
        recorder: recorder.clone(),
        progress,
        events: Vec::new(),
        faults: Vec::new(),
        live: Vec::new(),
        observations: Vec::new(),
        radius: setup.blast_radius.clone(),
        halt: options.halt.clone(),
        lost: Vec::new(),
        background: Vec::new(),
    };
    // 3: the steady state before.
    let steady = run.steady_state_before(options, &access).await;
    // 4: the method.
    let mut aborted = steady.aborted.clone();
    let mut method_end = recorder.now_ms();
    if aborted.is_none() {
        let (end, why) = run.method(&setup.plan, steady.method_start, options).await;
        method_end = end;
        aborted = why;
    }
    // 5: heal, rollbacks.
    let heal_verified = run.heal_all().await;
    if !heal_verified && aborted.is_none() {
        aborted = Some("the heal at the end of the method could not be verified".into());
    }
    run.rollbacks(&access).await;
    // 6: recovery.
    let recovery = run.recover(&steady, method_end, options, &access).await;
    recorder.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    run.event("workload stopped".into());
    // 7: resolution, the final state, the checkers, the expectations.
    let lost_cells = run.lost_cells();
    let judged = run.judge(&setup.population, &lost_cells, &access).await;
    let faults = run.fault_timelines(&judged.history, &setup.table, &access).await;
    let no_lost = judged.verdicts.iter().find(|v| v.checker == "no_lost_ack").map(|v| v.offenses).unwrap_or(0);
    let expectations = expectations(drill, &faults, no_lost, &recovery, judged.credit_delay.as_ref());
    let mut verdicts = judged.verdicts;
    // A negative control: its failing checkers are what it exists to show
    // (the drill still exits non-zero: a checker failed).
    if !drill.expect.rpo_zero {
        for v in verdicts.iter_mut().filter(|v| v.status == Status::Fail) {
            v.detail = format!("(expected by this drill) {}", v.detail);
        }
    }
    let history = judged.history;
    let acknowledged = history.ops.iter().filter(|op| op.outcome == crate::history::Outcome::Ok).count();
    let reads = history.ops.iter().filter(|op| op.is_read()).count();
    if let Some(procs) = run.cluster.processes.as_mut() {
        procs.stop_all();
    }
    Ok(Journal {
        drill: drill.clone(),
        seed: options.seed,
        replay: options.replay.clone(),
        started_at_unix_ms: setup.started_at_unix_ms,
        plan: setup.plan,
        blast_radius: setup.blast_radius,
        events: run.events,
        faults,
        series: series(&history),
        method_window_ms: (steady.method_start, method_end),
        steady_before: steady.probes,
        steady_after: recovery.steady_after,
        steady_throughput: steady.throughput,
        recovery_ms: recovery.recovery_ms,
        verdicts,
        expectations,
        operations: history.ops.len(),
        acknowledged,
        reads,
        unknown: judged.unknown,
        resolved: judged.resolved,
        credit_delay: judged.credit_delay,
        lost_cells,
        rpo_lost: no_lost,
        heal_verified,
        aborted,
        reconcile_discrepancies: judged.discrepancies,
        logs: run.cluster.logs.clone(),
        history,
    })
}

/// What the run knows once the workload may start.
struct Setup {
    started_at_unix_ms: u64,
    table: RoutingTable,
    plan: Vec<PlannedStep>,
    blast_radius: Vec<u64>,
    population: Arc<Population>,
}

/// Phases 1 and 2: the plan, the preflight checks, the population of users
/// (only in pairs wholly inside the blast radius), their seeded accounts.
async fn prepare(
    drill: &Drill,
    options: &RunOptions,
    access: &Access,
    progress: &dyn Progress,
) -> anyhow::Result<Setup> {
    let started_at_unix_ms = cellbank_client::clock::unix_ms();
    access.wait_ready(Duration::from_secs(60)).await?;
    let table = access.table().await?;
    let plan = crate::drill::plan(drill, table.pairs.len() as u64);
    let blast_radius = preflight(drill, access, &plan).await?;
    progress.line(&format!(
        "drill {} (seed {}): blast radius cells {blast_radius:?}; {} step(s) planned",
        drill.name,
        options.seed,
        plan.len()
    ));
    for step in &plan {
        progress.line(&format!(
            "  step {}: {:?} {:?} of pair {} ({:?}) at +{} ms{} for {} ms",
            step.index,
            step.fault,
            step.role,
            step.pair,
            step.side,
            step.start_ms,
            if step.serial { " after the previous step" } else { "" },
            step.duration_ms
        ));
    }
    let slice_count = table.slice_count.max(1);
    let slice_pair = table.slice_pair.clone();
    let first_user = match drill.cluster.mode {
        ClusterMode::Local => 1,
        // Fresh users on a shared cluster: earlier runs' balances stay out.
        // A range of a million ids per millisecond of the start time.
        ClusterMode::Attach => (started_at_unix_ms % (1 << 40)) << 20,
    };
    let run_id = format!("{}-{:x}", drill.name, started_at_unix_ms);
    // Users live only in pairs whose cells are all inside the blast radius.
    let allowed: Vec<u64> = table
        .pairs
        .iter()
        .filter(|p| {
            blast_radius.contains(&p.active_cell_id)
                && (p.standby_cell_id == 0 || blast_radius.contains(&p.standby_cell_id))
        })
        .map(|p| p.pair_id)
        .collect();
    anyhow::ensure!(!allowed.is_empty(), "no pair lies wholly inside the blast radius {blast_radius:?}");
    let population = Arc::new(Population::new(
        run_id,
        first_user,
        drill.workload.accounts,
        |u| {
            let slice = cellbank_router::table::slice_of(u, slice_count) as usize;
            slice_pair.get(slice).copied().unwrap_or(0)
        },
        |pair| allowed.contains(&pair),
    ));
    let seeder = cellbank_client::CellClient::new(access.routers.clone());
    let fresh = drill.cluster.mode == ClusterMode::Attach;
    workload::seed(&seeder, &population, drill.workload.seed_amount, fresh).await?;
    progress.line(&format!(
        "seeded {} accounts; workload {:?} at {}/s",
        population.users.len(),
        drill.workload.kind,
        drill.workload.rate
    ));
    Ok(Setup { started_at_unix_ms, table, plan, blast_radius, population })
}

/// Phase 3's result.
struct SteadyBefore {
    /// Method time zero (ms since the workload started).
    method_start: u64,
    probes: Vec<ProbeResult>,
    throughput: f64,
    /// Why the method must not run (a halt, a failed probe).
    aborted: Option<String>,
}

/// Phase 6's result.
struct Recovery {
    recovery_ms: Option<u64>,
    /// The bound on `recovery_ms` and the throughput it had to reach.
    within_ms: u64,
    target: f64,
    steady_after: Vec<ProbeResult>,
}

/// Phase 7's findings.
struct Judged {
    history: History,
    unknown: usize,
    resolved: usize,
    verdicts: Vec<Verdict>,
    credit_delay: Option<CreditDelays>,
    discrepancies: Vec<String>,
}

impl Run<'_> {
    /// Phase 3: waits out the warm-up and measures the steady-state probes
    /// over one window.
    async fn steady_state_before(&mut self, options: &RunOptions, access: &Access) -> SteadyBefore {
        let drill = self.drill;
        let steady_from = drill.steady_state.warmup_s * 1000;
        let method_start = steady_from + drill.steady_state.window_s * 1000;
        while self.recorder.now_ms() < method_start && !options.halt.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let sync_before = access.all_pairs_sync().await;
        let (probes, throughput) = probe(drill, &self.recorder.history(), steady_from, method_start, sync_before);
        for p in &probes {
            self.event(format!(
                "steady state before: {} = {:.1} ({}) {}",
                p.probe,
                p.measured,
                p.bound,
                if p.pass { "ok" } else { "FAILED" }
            ));
        }
        let aborted = if options.halt.load(Ordering::Relaxed) {
            Some("halted by an operator before the method".into())
        } else if probes.iter().any(|p| !p.pass) {
            Some("the steady-state hypothesis did not hold before the method; nothing was injected".into())
        } else {
            None
        };
        SteadyBefore { method_start, probes, throughput, aborted }
    }

    /// Phase 4: injects each step when due, heals what is due, watches the
    /// stop conditions. Returns when the method ended and why it was
    /// aborted, if it was.
    async fn method(&mut self, plan: &[PlannedStep], method_start: u64, options: &RunOptions) -> (u64, Option<String>) {
        let drill = self.drill;
        let recorder = self.recorder.clone();
        let mut aborted = None;
        let mut next = 0usize;
        // When the previous step ended (method time); None while it is live.
        let mut previous_end: Option<u64> = Some(0);
        self.observe().await;
        self.event("method begins".into());
        loop {
            let now = recorder.now_ms();
            let t = now.saturating_sub(method_start);
            if next < plan.len() {
                let step = &plan[next];
                let due = match (step.serial, previous_end) {
                    (false, _) => Some(step.start_ms),
                    (true, Some(end)) => Some(end + step.start_ms),
                    (true, None) => None,
                };
                if due.is_some_and(|due| t >= due) {
                    if let Err(e) = self.inject(step).await {
                        aborted = Some(format!("step {} could not be injected: {e:#}", step.index));
                        break;
                    }
                    next += 1;
                    let timed =
                        self.live.iter().any(|l| l.heal_at_ms.is_some() && self.faults[l.record].step == step.index);
                    previous_end = if timed { None } else { Some(recorder.now_ms().saturating_sub(method_start)) };
                }
            }
            // Heal what is due.
            let now = recorder.now_ms();
            while let Some(i) = self.live.iter().position(|l| l.heal_at_ms.is_some_and(|h| h <= now)) {
                self.heal(i, false).await;
                let last_step = next.checked_sub(1).map(|n| plan[n].index);
                let still =
                    self.live.iter().any(|l| l.heal_at_ms.is_some() && Some(self.faults[l.record].step) == last_step);
                if previous_end.is_none() && !still {
                    previous_end = Some(recorder.now_ms().saturating_sub(method_start));
                }
            }
            if let Some(procs) = self.cluster.processes.as_mut() {
                for p in procs.reap_exited() {
                    self.event(format!("{p} exited"));
                }
            }
            self.observe().await;
            // Stop conditions.
            let last_ok = recorder.last_ok_ms.load(Ordering::Relaxed);
            if now.saturating_sub(last_ok.max(method_start)) as f64 > drill.stop.max_unavailable_s * 1000.0 {
                aborted =
                    Some(format!("stop condition: no operation succeeded for {} s", drill.stop.max_unavailable_s));
                break;
            }
            // Errors are unknown outcomes (refusals such as the workload's
            // deliberate overdrafts are answers, not errors).
            let (recent, unknown) = recorder.recent(5000);
            if recent >= 20 && unknown as f64 / recent as f64 > drill.stop.max_error_rate {
                aborted = Some(format!("stop condition: error rate above {} over 5 s", drill.stop.max_error_rate));
                break;
            }
            if options.halt.load(Ordering::Relaxed) || self.halted() {
                aborted = Some("halted by an operator".into());
                break;
            }
            // Kill faults without a duration stay until the end of the method.
            let background_done = self.background.iter().all(|(_, task)| task.is_finished());
            if next >= plan.len() && self.live.iter().all(|l| l.heal_at_ms.is_none()) && background_done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (record, task) in std::mem::take(&mut self.background) {
            match task.await {
                Ok(Ok((detail, end_ms))) => {
                    self.faults[record].detail = detail;
                    self.faults[record].end_ms = end_ms;
                }
                Ok(Err(e)) => {
                    self.faults[record].detail = format!("failed: {e:#}");
                    aborted.get_or_insert(format!("step {} failed: {e:#}", self.faults[record].step));
                }
                Err(e) => {
                    aborted.get_or_insert(format!("step {} stopped: {e}", self.faults[record].step));
                }
            }
        }
        (recorder.now_ms(), aborted)
    }

    /// Phase 5's rollbacks (healing and restarting are done by `heal_all`,
    /// always).
    async fn rollbacks(&mut self, access: &Access) {
        for rollback in &self.drill.rollbacks {
            match rollback {
                Rollback::HealAll | Rollback::StartAll => {}
                Rollback::WaitSync => {
                    let lost = self.lost_cells();
                    let ok = access.wait_sync_except(&lost, Duration::from_secs(90)).await;
                    self.event(format!(
                        "rollback wait-sync: {}{}",
                        if ok { "every pair SYNC" } else { "NOT SYNC after 90 s" },
                        if lost.is_empty() {
                            String::new()
                        } else {
                            format!(" (but the pairs of lost cells {lost:?})")
                        }
                    ));
                }
            }
        }
    }

    /// Phase 6: runs on until throughput is back (bounded), then one more
    /// window, and measures the steady state after.
    async fn recover(
        &mut self,
        steady: &SteadyBefore,
        method_end: u64,
        options: &RunOptions,
        access: &Access,
    ) -> Recovery {
        let drill = self.drill;
        let recorder = self.recorder.clone();
        let last_fault_end = self.faults.iter().map(|f| f.end_ms).max().unwrap_or(method_end).max(method_end);
        let within_ms = (drill.expect.recovery_within_s * 1000.0) as u64;
        let window = drill.steady_state.window_s * 1000;
        let target = steady.throughput * drill.expect.recovery_fraction;
        let mut recovery_ms = None;
        loop {
            let now = recorder.now_ms();
            self.observe().await;
            if recovery_ms.is_none() {
                recovery_ms = recorder.with_ops(|ops| recovered_at(ops, last_fault_end, target));
            }
            let done_recovering = recovery_ms.is_some() || now > last_fault_end + within_ms;
            if (done_recovering && now >= last_fault_end + window.max(recovery_ms.unwrap_or(0) + window))
                || options.halt.load(Ordering::Relaxed)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let end = recorder.now_ms();
        let sync_after = access.pairs_sync_except(&self.lost_cells()).await;
        let (steady_after, _) = probe(drill, &recorder.history(), end.saturating_sub(window), end, sync_after);
        Recovery { recovery_ms, within_ms, target, steady_after }
    }

    /// Phase 7: resolves unknown outcomes, lets the credits settle, reads
    /// the final state, reconciles, and runs the checkers.
    async fn judge(&mut self, population: &Population, lost_cells: &[u64], access: &Access) -> Judged {
        let drill = self.drill;
        let mut history = self.recorder.history();
        history.user_pairs = population.pair_of.clone();
        let unknown =
            history.ops.iter().filter(|op| !op.is_read() && op.outcome == crate::history::Outcome::Unknown).count();
        let resolved =
            workload::resolve(access.routers.clone(), &mut history, Duration::from_secs(60), Duration::from_secs(600))
                .await;
        self.event(format!("resolved {resolved} of {unknown} unknown outcomes"));
        access.wait_sync_except(lost_cells, Duration::from_secs(60)).await;
        settle(access, Duration::from_secs(60)).await;
        // A read that fails here leaves the verdicts unknown; the report is
        // still written.
        let state_result =
            workload::read_final(access.routers.clone(), population, &history, drill.workload.seed_amount).await;
        let reconciled = match access.status().await {
            Ok(mut status) => {
                let table = status.table.clone().unwrap_or_default();
                // A cell lost for good cannot be audited: its pair is
                // reconciled as one without a standby (its active's replicas,
                // money and clearing are all still checked).
                if let Some(t) = status.table.as_mut() {
                    for pair in t.pairs.iter_mut().filter(|p| lost_cells.contains(&p.standby_cell_id)) {
                        pair.standby_cell_id = 0;
                    }
                }
                let report = cellbank_router::reconcile::reconcile(&status, &Default::default()).await;
                Ok((report, table))
            }
            Err(e) => Err(e),
        };
        let mut credit_delay = None;
        let verdicts = match (&state_result, &reconciled) {
            (Ok(state), Ok((report, table))) => {
                let mut state = state.clone();
                fill_from_reconcile(&mut state, report, table);
                state.lost_cells = lost_cells.iter().copied().collect();
                credit_delay = Some(checkers::credit_delays(&history, &state));
                let mut verdicts = checkers::check_all(&history, &state);
                verdicts.push(Verdict::from_findings("reconcile", report.discrepancies.clone()));
                verdicts
            }
            (Err(e), _) | (_, Err(e)) => {
                let why = format!("the final state could not be read: {e:#}");
                self.event(why.clone());
                vec![Verdict::unknown("final_state", why)]
            }
        };
        let discrepancies = reconciled.as_ref().map(|r| r.0.discrepancies.clone()).unwrap_or_default();
        Judged { history, unknown, resolved, verdicts, credit_delay, discrepancies }
    }

    /// Each fault's RTO (from the history) and failover timeline (from the
    /// observations and the routers' audit log).
    async fn fault_timelines(&self, history: &History, table: &RoutingTable, access: &Access) -> Vec<FaultRecord> {
        let audit = access.audit_log().await.unwrap_or_default();
        let pairs_all: Vec<u64> = table.pairs.iter().map(|p| p.pair_id).collect();
        let pairs_of_ops: Vec<u64> = self.recorder.op_pairs();
        let mut faults = self.faults.clone();
        let starts: Vec<(u64, u64)> = faults.iter().map(|f| (f.pair, f.start_ms)).collect();
        for f in &mut faults {
            let affected: Vec<u64> = if matches!(self.drill.method[f.step].target.role, Role::RouterLeader | Role::All)
            {
                pairs_all.clone()
            } else {
                vec![f.pair]
            };
            let on_pair = history
                .ops
                .iter()
                .zip(pairs_of_ops.iter())
                .filter(|(_, pair)| affected.contains(pair))
                .map(|(op, _)| op);
            f.rto_ms = rto(f, on_pair);
            // A pair change belongs to this fault if it came before the
            // pair's next fault.
            let until = starts.iter().filter(|(p, s)| *p == f.pair && *s > f.start_ms).map(|(_, s)| *s).min();
            f.failover =
                failover_timeline(f, until.unwrap_or(u64::MAX), &self.observations, &audit, wall_zero(&self.recorder));
        }
        faults
    }
}

/// A fault's RTO from the operations on the pairs it hit. Writes only: a
/// read answered says nothing about writes.
/// - A pair action (switchover, failover) stops the pair's writes inside
///   the call: the longest any write in flight during the call waited for
///   its answer. In flight, not only sent during it: a switchover can take
///   60 ms, in which the workload may send the pair no write at all while
///   the ones sent just before it wait. When no write was in flight at all
///   (a quick call between two writes), as for any other fault.
/// - Any other fault: from the fault being in place to the first
///   acknowledgement of a write sent after that.
fn rto<'a>(fault: &FaultRecord, ops: impl Iterator<Item = &'a crate::history::Op>) -> Option<u64> {
    let writes: Vec<&crate::history::Op> = ops.filter(|op| !op.is_read()).collect();
    if fault.fault.is_pair_action() {
        let paused = writes
            .iter()
            .filter(|op| op.sent_ms <= fault.end_ms && op.answered_ms >= fault.start_ms)
            .map(|op| op.answered_ms - op.sent_ms)
            .max();
        if paused.is_some() {
            return paused;
        }
    }
    writes
        .iter()
        .filter(|op| op.sent_ms >= fault.start_ms && op.outcome == crate::history::Outcome::Ok)
        .map(|op| op.answered_ms - fault.start_ms)
        .min()
}

/// The drill's expectations judged: each fault's RTO, RPO, recovery, and
/// the credit delay of cross-pair transfers.
fn expectations(
    drill: &Drill,
    faults: &[FaultRecord],
    no_lost: usize,
    recovery: &Recovery,
    credit_delay: Option<&CreditDelays>,
) -> Vec<Expectation> {
    let mut expectations = Vec::new();
    if let Some(bound) = drill.expect.rto_max_ms {
        for f in faults.iter().filter(|f| f.fault != FaultKind::Restart || f.targets.len() == 1) {
            let pass = f.rto_ms.is_some_and(|r| r <= bound);
            expectations.push(Expectation {
                name: format!("RTO of step {} ({:?})", f.step, f.fault),
                pass,
                detail: format!(
                    "{} (bound {bound} ms)",
                    f.rto_ms.map(|r| format!("{r} ms")).unwrap_or("no success after the fault".into())
                ),
            });
        }
    }
    expectations.push(Expectation {
        name: if drill.expect.rpo_zero { "RPO = 0".into() } else { "RPO > 0 (negative control)".into() },
        pass: (no_lost == 0) == drill.expect.rpo_zero,
        detail: if drill.expect.rpo_zero {
            format!("{no_lost} acknowledged operation(s) lost")
        } else {
            format!("{no_lost} acknowledged operation(s) lost; this drill expects loss (it proves the checker fails)")
        },
    });
    let target = recovery.target;
    expectations.push(Expectation {
        name: format!(
            "throughput back to {:.0}% of the steady state within {} s",
            drill.expect.recovery_fraction * 100.0,
            drill.expect.recovery_within_s
        ),
        pass: recovery.recovery_ms.is_some_and(|r| r <= recovery.within_ms),
        detail: match recovery.recovery_ms {
            Some(r) => format!("back after {r} ms (target {target:.0} ops/s)"),
            None => format!("not back to {target:.0} ops/s"),
        },
    });
    if let Some(bound) = drill.expect.credit_delay_p99_max_ms {
        let (pass, detail) = match credit_delay {
            None => (false, "not measured: the final state could not be read".to_string()),
            Some(d) if d.count == 0 => (false, "no acknowledged cross-pair transfer was credited".to_string()),
            Some(d) => {
                let p99 = d.p99_ms.unwrap_or(0);
                let mut detail = format!(
                    "p99 {p99} ms over {} credited transfer(s) (p50 {} ms, max {} ms; bound {bound} ms)",
                    d.count,
                    d.p50_ms.unwrap_or(0),
                    d.max_ms.unwrap_or(0)
                );
                if d.in_transit > 0 {
                    detail.push_str(&format!("; {} acknowledged transfer(s) never credited", d.in_transit));
                }
                (p99 <= bound as i64 && d.in_transit == 0, detail)
            }
        };
        expectations.push(Expectation { name: "credit delay p99 of cross-pair transfers".into(), pass, detail });
    }
    expectations
}

/// The wall clock (ms) at the recorder's zero.
fn wall_zero(recorder: &Recorder) -> u64 {
    cellbank_client::clock::unix_ms().saturating_sub(recorder.now_ms())
}

/// When (ms after `from`) the first one-second window begins in which the
/// acknowledged throughput reaches `target`.
fn recovered_at(ops: &[crate::history::Op], from: u64, target: f64) -> Option<u64> {
    let mut acks: Vec<u64> = ops
        .iter()
        .filter(|op| op.outcome == crate::history::Outcome::Ok && op.answered_ms >= from)
        .map(|op| op.answered_ms)
        .collect();
    acks.sort_unstable();
    let need = target.ceil().max(1.0) as usize;
    (0..acks.len()).find_map(|i| {
        let j = i + need - 1;
        (j < acks.len() && acks[j] - acks[i] < 1000).then(|| acks[i] - from)
    })
}

/// Waits until no cross-cell credit is pending anywhere.
async fn settle(access: &Access, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if let Ok(status) = access.status().await {
            if !status.pairs.is_empty() && status.pairs.iter().all(|p| p.outbox_pending == 0) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The digests and sums of the final state, from a reconciliation: every
/// cell's replicas (the standby's included) were compared with the digest of
/// their pair's active cell, so each cell lists that reference, then one
/// entry per replica: the reference when it agreed, a mismatch when not.
fn fill_from_reconcile(
    state: &mut crate::history::FinalState,
    report: &cellbank_router::reconcile::Report,
    table: &RoutingTable,
) {
    for pair in &table.pairs {
        state.pairs.insert(pair.pair_id, (pair.active_cell_id, pair.standby_cell_id));
    }
    for cell in &report.cells {
        let reference = report
            .cells
            .iter()
            .find(|c| c.pair_id == cell.pair_id && c.role == "active")
            .map(|c| c.digest.clone())
            .unwrap_or_default();
        let replicas = table.cells.iter().find(|c| c.cell_id == cell.cell_id).map(|c| c.replicas.len()).unwrap_or(0);
        let mut digests = vec![reference.clone(); 1 + cell.replicas_agreeing];
        digests.extend((cell.replicas_agreeing..replicas).map(|_| format!("a replica differs from {reference}")));
        state.digests.insert(cell.cell_id, digests);
        for (currency, sum) in &cell.balance_sums {
            state.sums.insert((cell.cell_id, currency.clone()), sum.parse().unwrap_or(i128::MAX));
        }
    }
}

fn failover_timeline(
    fault: &FaultRecord,
    until_ms: u64,
    observations: &[(u64, u64, u64, u64, bool)],
    audit: &[cellbank_proto::router::AuditRecord],
    wall_zero: u64,
) -> Option<FailoverTimeline> {
    let before = observations.iter().rev().find(|o| o.1 == fault.pair && o.0 <= fault.start_ms)?;
    let switched =
        observations.iter().find(|o| o.1 == fault.pair && o.0 > fault.start_ms && o.0 < until_ms && o.2 > before.2)?;
    let promoted = observations.iter().find(|o| o.1 == fault.pair && o.0 > fault.start_ms && o.2 == switched.2 && o.4);
    let start_wall = wall_zero + fault.start_ms;
    // The coordinator's record of this pair's change: a switchover names
    // the pair, an automatic failover the cell that went down.
    let names_it = |r: &cellbank_proto::router::AuditRecord| {
        r.what.contains(&format!("pair {}", fault.pair))
            || (r.what.contains("failover") && r.why.contains(&format!("cell {} ", before.3)))
    };
    let decided = audit
        .iter()
        .filter(|r| r.time_ms >= start_wall && r.time_ms < wall_zero.saturating_add(until_ms) && names_it(r))
        .map(|r| r.time_ms - start_wall)
        .min();
    Some(FailoverTimeline {
        detection_ms: decided,
        promotion_ms: promoted.map(|o| o.0 - fault.start_ms),
        route_switch_ms: Some(switched.0 - fault.start_ms),
        first_success_ms: fault.rto_ms,
        from_cell: before.3,
        to_cell: switched.3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Op, OpKind, Outcome};

    fn write(sent_ms: u64, answered_ms: u64, outcome: Outcome) -> Op {
        let kind =
            OpKind::Transfer { transfer_id: format!("t{sent_ms}"), from: 1, to: 2, currency: "CNY".into(), amount: 1 };
        Op { seq: sent_ms, sent_ms, answered_ms, kind, outcome, resolved: None }
    }

    fn fault(kind: FaultKind, start_ms: u64, end_ms: u64) -> FaultRecord {
        FaultRecord {
            step: 0,
            fault: kind,
            pair: 1,
            targets: Vec::new(),
            start_ms,
            end_ms,
            rto_ms: None,
            failover: None,
            detail: String::new(),
        }
    }

    /// Seed 1010 of switchover-under-load once missed its RTO: the second
    /// switchover's call took about 60 ms and the workload sent pair 1 no
    /// write inside it. The writes in flight across the call are what it
    /// paused.
    #[test]
    fn a_switchover_is_timed_by_the_writes_in_flight_during_the_call() {
        let switchover = fault(FaultKind::Switchover, 1_000, 1_060);
        let ops = [
            write(900, 950, Outcome::Ok),   // answered before the call: not paused
            write(990, 1_070, Outcome::Ok), // sent before, answered after: 80 ms
            write(1_100, 1_110, Outcome::Ok),
        ];
        assert_eq!(rto(&switchover, ops.iter()), Some(80));
        let read = Op {
            kind: OpKind::ReadBalance { user: 1, currency: "CNY".into(), balance: None },
            ..write(995, 2_000, Outcome::Ok)
        };
        assert_eq!(rto(&switchover, [read].iter()), None, "reads do not count");
        // A kill: from the fault to the first acknowledged write sent after it.
        let kill = fault(FaultKind::Kill, 1_000, 1_000);
        let ops =
            [write(990, 1_500, Outcome::Ok), write(1_010, 1_400, Outcome::Unknown), write(1_020, 1_300, Outcome::Ok)];
        assert_eq!(rto(&kill, ops.iter()), Some(300));
    }

    /// Seed 1010 again: a switchover call so quick that no write to the pair
    /// was in flight during it. Then, as for any fault: the first write
    /// acknowledged after the call began.
    #[test]
    fn a_switchover_with_no_write_in_flight_is_timed_by_the_next_acknowledgement() {
        let switchover = fault(FaultKind::Switchover, 1_000, 1_020);
        let ops = [write(900, 950, Outcome::Ok), write(1_030, 1_040, Outcome::Ok), write(1_050, 1_055, Outcome::Ok)];
        assert_eq!(rto(&switchover, ops.iter()), Some(40));
        assert_eq!(rto(&switchover, ops[..1].iter()), None, "no write after it: no recovery seen");
    }
}

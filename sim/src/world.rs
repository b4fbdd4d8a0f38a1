//! The simulated world: two pairs of cells of three replicas, a failover
//! coordinator (a router too), a second router, clients, and a network,
//! all in one thread under one seeded scheduler and a simulated clock.
//!
//! What runs for real (production code, called as is):
//! - raft-rs `RawNode` per replica (in-memory log), driven by the same
//!   Ready order as the production node: send the leader's messages, apply
//!   committed entries, persist entries and hard state, then send the
//!   messages that must follow persistence;
//! - the ledger state machine (`Ledger::apply`) on an in-memory store: pair
//!   state rules, configure and depose, the standby's replay of source
//!   entries and snapshot chunks, idempotent transfers;
//! - the pair history and the acknowledgement rule (`replication::judge`),
//!   the standby's hello check and acknowledgement
//!   (`replication::check_hello`, `ship_ack`), the shipper's watermark rules
//!   (`on_hello_answer`, `on_ack`, `on_refusal`), authority
//!   (`Replication::earn_authority` / `has_authority`), the deposition
//!   command (`deposition_command`);
//! - the request gate (`context::gate_refusal`);
//! - the routing table state machine (`TableMachine`), the coordinator's
//!   decisions (`coordinator::record_probes`, `plan_pair`) and the
//!   operator's (`check_switchover`, `check_failover`, `loss_window`,
//!   `fenced`, `change_active_command`, `promotion`, `desired_standby`);
//! - the router's sender check (`courier::check_sender`).
//!
//! What is modelled here (the I/O around that code): message transport and
//! its faults, the shipper's session loop and the standby's stream loop (as
//! in `replication.rs` and `service.rs`), the courier's loop, the
//! operator's action sequence (as `Coordinator::switchover` and `failover`
//! run it), a second router's lagging table copy, the client's retries,
//! crashes and restarts, clocks and disks.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellbank_cell::context::gate_refusal;
use cellbank_cell::ledger::{self, keys, pair, Ledger, PairHistory, PairView};
use cellbank_cell::replication::{self, HelloRefusal, Replication, Verdict, READ_LEASE};
use cellbank_proto::cell::{
    command, Command, CommandBatch, ConfigureCommand, CreditBatch, CreditSender, InboxCredit, MoveCommand,
    OpenAccountCommand, OutboxEntry, PairRole, PairState, RaftRole, ReplicaStatus, SettleCommand, ShipAck,
    SourceEntries, SourceSnapshotChunk,
};
use cellbank_proto::router::{
    table_command, CellReplicas, Pair, PairMode, RoutingTable, TableCommand, TableCommandResult,
};
use cellbank_proto::v1::{ResultCode, TransferKind, TransferRecord, TransferResult};
use cellbank_raft::{Kv, StateMachine};
use cellbank_router::config::CoordinatorConfig;
use cellbank_router::coordinator::{self, Action, CellHealth, FailoverStart, LossWindow, ReplicaProbe};
use cellbank_router::table::{self, TableMachine};
use prost::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, Message as RaftMessage};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RawNode, StateRole, Storage};

use crate::rng::Rng;
use crate::{FaultKind, Faults, Plan, ScheduledFault, Violation};

/// Two pairs: (pair, first active, first standby).
pub const PAIRS: [(u64, u64, u64); 2] = [(1, 1, 2), (2, 3, 4)];
pub const CELLS: [u64; 4] = [1, 2, 3, 4];
/// Users, spread over the pairs by the routing table's slices.
pub const USERS: u64 = 16;
/// Clients, half on each pair's users.
pub const CLIENTS: usize = 4;

/// The pair a cell belongs to.
pub fn pair_of(cell: u64) -> u64 {
    PAIRS.iter().find(|(_, a, b)| *a == cell || *b == cell).map(|(p, _, _)| *p).expect("a known cell")
}

/// The other cell of a cell's pair.
pub fn peer_of(cell: u64) -> u64 {
    PAIRS
        .iter()
        .find_map(|(_, a, b)| {
            if *a == cell {
                Some(*b)
            } else if *b == cell {
                Some(*a)
            } else {
                None
            }
        })
        .expect("a known cell")
}
pub const REPLICAS: u64 = 3;
pub const CURRENCY: &str = "USD";
/// Money each user starts with.
pub const FUNDING: u64 = 1_000;

const TICK_MS: u64 = 100;
const COORDINATOR_INTERVAL_MS: u64 = 150;
const CLIENT_TIMEOUT_MS: u64 = 5_000;
const SHIP_RETRY_MS: u64 = 50;
const ACK_TIMEOUT_MS: u64 = 2_000;
const KEEPALIVE_MS: u64 = 100;
const SHIP_BATCH_ENTRIES: u64 = 64;
const SHIP_IN_FLIGHT: usize = 16;
/// Once every fault has healed, no credit may wait longer than this for
/// delivery (the end of the run is 12 s after the heal).
const CREDIT_DELAY_MAX_MS: u64 = 5_000;
/// The coordinator's limits on one configure call and on a switchover's
/// wait for the standby (as in `coordinator.rs`).
const CONFIGURE_TIMEOUT_MS: u64 = 2_000;
const CATCH_UP_MAX_MS: u64 = 5_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Addr {
    Replica(u64, u64),
    /// The routers' leader: the coordinator, and a router.
    Coordinator,
    /// A second router: it follows the routing table by copies of it the
    /// leader sends (so it may lag) and serves the couriers too.
    Router,
    Client(usize),
}

/// A part of the network a cut applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Cell(u64),
    Replica(u64, u64),
    Coordinator,
    Router,
    Clients,
}

impl Side {
    fn holds(self, addr: Addr) -> bool {
        match (self, addr) {
            (Side::Cell(c), Addr::Replica(cell, _)) => c == cell,
            (Side::Replica(c, r), Addr::Replica(cell, rid)) => c == cell && r == rid,
            (Side::Coordinator, Addr::Coordinator) => true,
            (Side::Router, Addr::Router) => true,
            (Side::Clients, Addr::Client(_)) => true,
            _ => false,
        }
    }
}

/// Messages from `from` to `to` are lost.
#[derive(Clone, Copy, Debug)]
struct Cut {
    from: Side,
    to: Side,
}

/// Why a standby refused (or ended) a shipping session.
#[derive(Clone, Debug)]
enum ShipReply {
    Ack(ShipAck),
    Superseded(u64),
    NotYet,
    NotLeader(u64),
}

#[derive(Clone, Debug)]
enum Msg {
    Raft(Box<RaftMessage>),
    /// Shipping stream, shipper to standby (`seq` orders the stream; a gap
    /// ends it, as a broken connection would).
    Hello {
        session: u64,
        seq: u64,
        source_cell: u64,
        epoch: u64,
    },
    Ship {
        session: u64,
        seq: u64,
        kind: command::Kind,
    },
    /// Standby to shipper.
    ShipAnswer {
        session: u64,
        seq: u64,
        reply: ShipReply,
    },
    Probe {
        round: u64,
    },
    ProbeReply {
        round: u64,
        status: ReplicaStatus,
    },
    /// `reply`: nonzero when the coordinator waits for the answer (an
    /// operator's action), as production's `configure` call does.
    Configure {
        state: PairState,
        source_state: Option<PairState>,
        reply: u64,
    },
    /// The routers' leader's table, as of its log index, to the other router.
    TableSync {
        index: u64,
        table: RoutingTable,
    },
    /// The leader's answer to a configure: its applied index and pair state,
    /// or `None` when the cell refused it.
    ConfigureAnswer {
        reply: u64,
        result: Option<(u64, PairState)>,
    },
    Submit {
        req: u64,
        command: Command,
        epoch: u64,
    },
    Read {
        req: u64,
        transfer_id: Vec<u8>,
        epoch: u64,
    },
    Reply {
        req: u64,
        outcome: Outcome,
    },
    /// Courier to router; router to the destination; answers back.
    Deliver {
        req: u64,
        batch: CreditBatch,
    },
    ApplyCredits {
        req: u64,
        batch: CreditBatch,
        epoch: u64,
    },
    CreditsAnswer {
        req: u64,
        outcome: Outcome,
    },
}

#[derive(Clone, Debug)]
enum Outcome {
    Done(TransferResult),
    Read(Option<TransferRecord>),
    /// Nothing is known: retry (with the same id).
    Retry,
    /// A destination's results for a batch of credits.
    Credits(Vec<TransferResult>),
    /// The destination took credits from a later sender of that pair.
    StaleSender(u64),
    NotLeader(u64),
}

// Events live in the queue by value; boxing the message would cost an
// allocation per message sent.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum EventKind {
    Deliver { from: Addr, to: Addr, msg: Msg },
    Tick { cell: u64, rid: u64, incarnation: u64 },
    Ready { cell: u64, rid: u64, incarnation: u64 },
    Coordinator,
    Client(usize),
    Fault(usize),
    Heal,
}

struct Event {
    at: u64,
    seq: u64,
    kind: EventKind,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A proposal this replica made and waits to see applied.
#[derive(Debug)]
enum Pending {
    Client {
        client: usize,
        req: u64,
    },
    /// The courier's settles (its delivery is in flight until they apply).
    Settle,
    Credits {
        req: u64,
        router: Addr,
    },
    Standby {
        session: u64,
    },
    Configure {
        term: u64,
        reply: u64,
    },
    Other,
}

/// A client request waiting for the acknowledgement rule.
#[derive(Debug)]
struct Waiter {
    /// Who hears the answer: a client, or the router (credits).
    to: Addr,
    req: u64,
    index: u64,
    read: bool,
    outcome: Outcome,
    deadline_local: u64,
}

#[derive(Debug)]
enum StandbyItem {
    Barrier { ctx: u64, index: Option<u64> },
    Proposal { ctx: u64, result: Option<TransferResult> },
    Keepalive,
}

/// A shipping session as the standby's leader sees it.
#[derive(Debug)]
struct StandbySession {
    source: Addr,
    source_cell: u64,
    epoch: u64,
    expect_seq: u64,
    out_seq: u64,
    items: VecDeque<StandbyItem>,
}

#[derive(Debug)]
enum ShipPhase {
    Hello { sent_local: u64 },
    Snapshot { index: u64, sent_local: u64 },
    Streaming { next: u64, in_flight: VecDeque<(u64, u64)>, last_sent_local: u64 },
}

/// The shipper on an active cell's leader.
#[derive(Debug)]
struct Shipper {
    session: u64,
    target: u64,
    started: PairState,
    term: u64,
    out_seq: u64,
    in_seq: u64,
    phase: ShipPhase,
}

/// What a replica loses in a crash.
struct Volatile {
    node: RawNode<MemStorage>,
    ledger: Ledger,
    view: PairView,
    history: PairHistory,
    repl: Replication,
    leader_term: u64,
    leader_id: u64,
    settle_until_local: Option<u64>,
    ready_scheduled: bool,
    proposals: BTreeMap<u64, Pending>,
    waiters: Vec<Waiter>,
    /// Reads waiting for their read index: ctx to (client, req, id, deadline).
    reads: BTreeMap<u64, (usize, u64, Vec<u8>, u64)>,
    /// Reads whose index is known, waiting for apply.
    reads_ready: Vec<(u64, usize, u64, Vec<u8>, u64)>,
    shipper: Option<Shipper>,
    ship_retry_at_local: u64,
    preferred: u64,
    standby_sessions: BTreeMap<u64, StandbySession>,
    /// Since when (local ms) an applied entry has waited for the standby.
    unacked_since_local: Option<u64>,
    /// The courier's delivery in flight: (request, deadline, seqs, sender epoch).
    courier: Option<(u64, u64, Vec<u64>, u64)>,
    courier_retry_at_local: u64,
    courier_failures: u32,
}

struct Replica {
    cell: u64,
    rid: u64,
    up: bool,
    lost: bool,
    incarnation: u64,
    /// Durable: the Raft log and hard state, the ledger and its applied index.
    store: MemStorage,
    kv: BTreeMap<Vec<u8>, Vec<u8>>,
    applied: u64,
    vol: Option<Volatile>,
    /// Clock rate in parts per million of true time.
    rate_ppm: u64,
    /// Extra time a Ready takes to persist (slow disk).
    disk_ms: u64,
    /// Stopped (as by SIGSTOP) until then: nothing it would do happens
    /// before, and it resumes with the state it had.
    paused_until: u64,
}

/// A client: a sequence of requests, each retried until it has an answer.
struct Client {
    /// The users this client opens, funds and sends from (one pair's).
    users: Vec<u64>,
    /// The routing table as this client's router last saw it (routers
    /// follow the table's log and may lag).
    table: RoutingTable,
    next_req: u64,
    /// The request in flight: (req id, what, attempt deadline).
    current: Option<Request>,
    leader_hint: HashMap<u64, u64>,
    done: u64,
    rng: Rng,
}

#[derive(Clone, Debug)]
struct Request {
    req: u64,
    op: Op,
    sent_at: u64,
    attempts: u32,
    /// The pair epoch the last attempt was routed at.
    epoch: u64,
}

#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
enum Op {
    /// `user`: whose pair serves it.
    Write {
        command: Command,
        transfer_id: Vec<u8>,
        user: u64,
    },
    Read {
        transfer_id: Vec<u8>,
        expect: i32,
        pair: u64,
    },
}

/// A write a client heard the outcome of.
#[derive(Clone, Debug)]
struct Acked {
    transfer_id: Vec<u8>,
    code: i32,
    /// When the serving replica released it (true time, µs).
    released_at: u64,
    /// When the client heard it.
    heard_at: u64,
    cell: u64,
    pair: u64,
    /// The epoch, log index and ticket it was released under: `alone` when
    /// no standby acknowledgement covered it (an ASYNC ticket, or a SYNC
    /// one released by an explicit degradation).
    epoch: u64,
    index: u64,
    alone: bool,
}

/// What a forced failover reported it may lose: entries of `cell`'s log at
/// `epoch` in its loss window.
#[derive(Clone, Copy, Debug)]
struct Forfeit {
    pair: u64,
    cell: u64,
    epoch: u64,
    window: LossWindow,
}

impl Forfeit {
    fn covers(&self, pair: u64, cell: u64, epoch: u64, index: u64) -> bool {
        self.pair == pair
            && self.cell == cell
            && self.epoch == epoch
            && index > self.window.after_index
            && self.window.through_index.is_none_or(|t| index <= t)
    }
}

/// An operator's action in progress (production runs it under the
/// coordinator's action lock, so no pass interleaves with it).
#[derive(Clone, Debug)]
struct Job {
    kind: FaultKind,
    pair_id: u64,
    phase: JobPhase,
}

#[derive(Clone, Debug)]
enum JobPhase {
    /// Waits for the next round of probes: a fresh look at both cells.
    Look,
    /// The active's fence was sent; waits for its answer.
    Fence {
        table: RoutingTable,
        pair: Pair,
        start: Option<FailoverStart>,
        active_state: PairState,
        req: u64,
        deadline: u64,
    },
    /// Waits until the active's leader reports the standby holds the fence.
    CatchUp {
        table: RoutingTable,
        pair: Pair,
        start: Option<FailoverStart>,
        active_state: PairState,
        fence_index: u64,
        deadline: u64,
    },
    /// A switchover's promotion was sent; waits for its answer to demote
    /// the old active.
    Promote { old_active: u64, req: u64, deadline: u64 },
}

pub struct World {
    pub now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Event>>,
    net_rng: Rng,
    work_rng: Rng,
    plan: Plan,
    replicas: Vec<Replica>,
    cuts: Vec<(usize, Cut)>,
    loss_per_million: u64,
    dup_per_million: u64,
    delay_max_us: u64,
    /// Per stream session: the time its last message is delivered (streams keep order).
    stream_last: HashMap<u64, u64>,
    table: TableMachine,
    table_view: table::TableView,
    table_kv: BTreeMap<Vec<u8>, Vec<u8>>,
    table_index: u64,
    coordinator_config: CoordinatorConfig,
    coordinator_term: u64,
    health: HashMap<u64, CellHealth>,
    probe_round: u64,
    probe_replies: Vec<(u64, u64, ReplicaStatus)>,
    clients: Vec<Client>,
    acked: Vec<Acked>,
    /// Epoch to the cell that applied client writes at it.
    writers: HashMap<(u64, u64), u64>,
    next_ctx: u64,
    next_session: u64,
    base: Instant,
    pub trace: Option<Vec<String>>,
    pub violation: Option<Violation>,
    pub stats: crate::Stats,
    healed: bool,
    /// Which pair serves each user (the table's slices).
    user_pair: BTreeMap<u64, u64>,
    /// Replica clocks run at different rates.
    skewed: bool,
    /// The second router's copy of the table, and its log index.
    router_table: RoutingTable,
    router_table_index: u64,
    /// Credit batches the router forwarded: its request to (courier, theirs).
    router_pending: HashMap<u64, (Addr, u64)>,
    next_router_req: u64,
    /// The operator's action in progress, and the configure answers it
    /// waits for.
    job: Option<Job>,
    configure_answers: Vec<(u64, Option<(u64, PairState)>)>,
    /// Loss windows forced failovers reported.
    forfeits: Vec<Forfeit>,
    /// The newest epoch of the source pair known to a router that passed
    /// each credit on (by source pair, seq and origin: a promoted cell may
    /// reuse a seq its predecessor's lost tail had used).
    routed: HashMap<(u64, u64, u64, u64), u64>,
    /// Where each credit applied: transfer id to (cell, epoch, index).
    credit_applies: HashMap<Vec<u8>, Vec<(u64, u64, u64)>>,
    /// When each promotion (cell, epoch) first applied.
    promoted_at: HashMap<(u64, u64), u64>,
    /// Cross-pair transfers the clients proposed: id, source and destination pair.
    cross_ids: Vec<(Vec<u8>, u64, u64)>,
}

fn ctx_bytes(ctx: u64) -> Vec<u8> {
    ctx.to_be_bytes().to_vec()
}

fn ctx_of(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}

fn rid_of(addr: Addr) -> u64 {
    match addr {
        Addr::Replica(_, rid) => rid,
        _ => 0,
    }
}

fn replica_index(cell: u64, rid: u64) -> usize {
    ((cell - 1) * REPLICAS + (rid - 1)) as usize
}

fn raft_config(rid: u64, applied: u64) -> raft::Config {
    let election_tick = 10;
    let min = election_tick + cellbank_raft::node::election_stagger_ticks(rid);
    raft::Config {
        id: rid,
        election_tick,
        heartbeat_tick: 2,
        min_election_tick: min,
        max_election_tick: min + 1,
        applied,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 64,
        check_quorum: true,
        pre_vote: true,
        ..Default::default()
    }
}

fn discard_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

fn transfer_id_of(command: &Command) -> Vec<u8> {
    match &command.kind {
        Some(command::Kind::Move(m)) => m.transfer_id.clone(),
        Some(command::Kind::OpenAccount(o)) => format!("open-{}", o.user_id).into_bytes(),
        _ => Vec::new(),
    }
}

impl World {
    pub fn new(seed: u64, faults: Faults, plan: Plan) -> World {
        let mut rng = Rng::new(seed);
        let net_rng = rng.fork();
        let mut work_rng = rng.fork();
        let mut setup_rng = rng.fork();
        let mut replicas = Vec::new();
        for cell in CELLS {
            for rid in 1..=REPLICAS {
                let store = MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
                let rate_ppm = if faults.has(FaultKind::ClockSkew) {
                    // Within the drift the lease and settle times allow
                    // (300 ms lease, 400 ms settle).
                    setup_rng.range(950_000, 1_050_000)
                } else {
                    1_000_000
                };
                replicas.push(Replica {
                    cell,
                    rid,
                    up: true,
                    lost: false,
                    incarnation: 0,
                    store,
                    kv: BTreeMap::new(),
                    applied: 0,
                    vol: None,
                    rate_ppm,
                    disk_ms: 0,
                    paused_until: 0,
                });
            }
        }
        let table_view: table::TableView = Arc::new(tokio::sync::watch::Sender::new(RoutingTable::default()));
        let table = TableMachine::new(None, table_view.clone());
        let clients = (0..CLIENTS)
            .map(|_| Client {
                users: Vec::new(),
                table: RoutingTable::default(),
                next_req: 1,
                current: None,
                leader_hint: HashMap::new(),
                done: 0,
                rng: work_rng.fork(),
            })
            .collect();
        let (loss, dup, delay) = if faults.has(FaultKind::Network) {
            (setup_rng.range(0, 30_000), setup_rng.range(0, 30_000), setup_rng.range(2_000, 30_000))
        } else {
            (0, 0, 1_000)
        };
        let mut world = World {
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            net_rng,
            work_rng,
            plan,
            replicas,
            cuts: Vec::new(),
            loss_per_million: loss,
            dup_per_million: dup,
            delay_max_us: delay,
            stream_last: HashMap::new(),
            table,
            table_view,
            table_kv: BTreeMap::new(),
            table_index: 0,
            coordinator_config: CoordinatorConfig {
                // Short enough that one run sees several failovers.
                cooldown_ms: 2_000,
                ..CoordinatorConfig::default()
            },
            coordinator_term: 1,
            health: HashMap::new(),
            probe_round: 0,
            probe_replies: Vec::new(),
            clients,
            acked: Vec::new(),
            writers: HashMap::new(),
            next_ctx: 1,
            next_session: 1,
            base: Instant::now(),
            trace: None,
            violation: None,
            stats: crate::Stats::default(),
            healed: false,
            user_pair: BTreeMap::new(),
            skewed: faults.has(FaultKind::ClockSkew),
            router_table: RoutingTable::default(),
            router_table_index: 0,
            router_pending: HashMap::new(),
            next_router_req: 1,
            job: None,
            configure_answers: Vec::new(),
            forfeits: Vec::new(),
            routed: HashMap::new(),
            credit_applies: HashMap::new(),
            cross_ids: Vec::new(),
            promoted_at: HashMap::new(),
        };
        for i in 0..world.replicas.len() {
            world.start_replica(i);
        }
        world.bootstrap_table();
        // Users by pair, each pair's split between its two clients.
        let table = world.table_now();
        for user in 1..=USERS {
            let pair = table::route(&table, user).expect("routed").pair_id;
            world.user_pair.insert(user, pair);
        }
        for (k, (pair, _, _)) in PAIRS.iter().enumerate() {
            let users: Vec<u64> = world.user_pair.iter().filter(|(_, p)| *p == pair).map(|(u, _)| *u).collect();
            for (j, user) in users.into_iter().enumerate() {
                world.clients[k + 2 * (j % 2)].users.push(user);
            }
        }
        world.schedule(COORDINATOR_INTERVAL_MS * 1000, EventKind::Coordinator);
        for c in 0..world.clients.len() {
            world.schedule(2_000_000 + c as u64 * 1_000, EventKind::Client(c));
        }
        for (i, fault) in world.plan.faults.clone().iter().enumerate() {
            world.schedule_at(fault.at_ms * 1000, EventKind::Fault(i));
        }
        world.schedule_at(world.plan.chaos_ms * 1000, EventKind::Heal);
        world
    }

    fn note(&mut self, line: impl FnOnce() -> String) {
        if let Some(trace) = &mut self.trace {
            let at = self.now;
            trace.push(format!("{:>6}.{:03} ms  {}", at / 1000, at % 1000, line()));
        }
    }

    fn fail(&mut self, what: &str, detail: String) {
        if self.violation.is_none() {
            self.note(|| format!("VIOLATION {what}: {detail}"));
            self.violation = Some(Violation { invariant: what.to_string(), detail, at_us: self.now });
        }
    }

    fn schedule(&mut self, delay_us: u64, kind: EventKind) {
        self.schedule_at(self.now + delay_us, kind);
    }

    fn schedule_at(&mut self, at: u64, kind: EventKind) {
        self.seq += 1;
        self.queue.push(Reverse(Event { at, seq: self.seq, kind }));
    }

    fn instant(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.base + Duration::from_micros(self.now))
    }

    /// A replica's clock, in ms.
    fn local_ms(&self, i: usize) -> u64 {
        (self.now as u128 * self.replicas[i].rate_ppm as u128 / 1_000_000 / 1000) as u64
    }

    fn local_instant(&self, i: usize) -> Instant {
        self.base + Duration::from_millis(self.local_ms(i))
    }

    /// Runs until `end_ms` of simulated time or the first violation.
    pub fn run(&mut self, end_ms: u64) {
        while let Some(Reverse(event)) = self.queue.pop() {
            if event.at > end_ms * 1000 {
                self.queue.push(Reverse(event));
                break;
            }
            self.now = event.at;
            self.stats.events += 1;
            self.handle(event.kind);
            if self.violation.is_some() {
                return;
            }
        }
        self.now = end_ms * 1000;
    }

    fn handle(&mut self, kind: EventKind) {
        // A paused replica does nothing until it resumes.
        let target = match &kind {
            EventKind::Deliver { to: Addr::Replica(cell, rid), .. }
            | EventKind::Tick { cell, rid, .. }
            | EventKind::Ready { cell, rid, .. } => Some(replica_index(*cell, *rid)),
            _ => None,
        };
        if let Some(i) = target {
            if self.now < self.replicas[i].paused_until {
                let at = self.replicas[i].paused_until;
                self.schedule_at(at, kind);
                return;
            }
        }
        match kind {
            EventKind::Deliver { from, to, msg } => self.deliver(from, to, msg),
            EventKind::Tick { cell, rid, incarnation } => {
                let i = replica_index(cell, rid);
                if self.replicas[i].up && self.replicas[i].incarnation == incarnation {
                    if let Some(vol) = &mut self.replicas[i].vol {
                        vol.node.tick();
                    }
                    self.after(i);
                    let period = TICK_MS * 1000 * 1_000_000 / self.replicas[i].rate_ppm;
                    self.schedule(period, EventKind::Tick { cell, rid, incarnation });
                }
            }
            EventKind::Ready { cell, rid, incarnation } => {
                let i = replica_index(cell, rid);
                if self.replicas[i].up && self.replicas[i].incarnation == incarnation {
                    if let Some(vol) = &mut self.replicas[i].vol {
                        vol.ready_scheduled = false;
                    }
                    self.handle_ready(i);
                    self.after(i);
                }
            }
            EventKind::Coordinator => {
                self.coordinator_pass();
                self.schedule(COORDINATOR_INTERVAL_MS * 1000, EventKind::Coordinator);
            }
            EventKind::Client(c) => self.client_step(c),
            EventKind::Fault(n) => match recovery_of(n) {
                Some(k) => self.recover(k),
                None => {
                    let fault = self.plan.faults[n].clone();
                    self.inject(n, &fault);
                }
            },
            EventKind::Heal => self.heal(),
        }
    }

    // ---- network -------------------------------------------------------

    fn blocked(&self, from: Addr, to: Addr) -> bool {
        self.cuts.iter().any(|(_, cut)| cut.from.holds(from) && cut.to.holds(to))
    }

    fn send(&mut self, from: Addr, to: Addr, msg: Msg) {
        self.stats.messages += 1;
        let session = match &msg {
            Msg::Hello { session, .. } | Msg::Ship { session, .. } | Msg::ShipAnswer { session, .. } => Some(*session),
            _ => None,
        };
        let mut delay = self.net_rng.range(50, self.delay_max_us);
        if self.net_rng.chance(self.loss_per_million) {
            self.stats.lost += 1;
            return;
        }
        if let Some(session) = session {
            // A stream keeps its order: nothing overtakes what was sent before.
            let last = self.stream_last.entry(session).or_insert(0);
            let at = (self.now + delay).max(*last);
            *last = at;
            delay = at - self.now;
        } else if self.net_rng.chance(self.dup_per_million) {
            self.stats.duplicated += 1;
            let again = self.net_rng.range(50, self.delay_max_us * 2);
            self.schedule(again, EventKind::Deliver { from, to, msg: msg.clone() });
        }
        self.schedule(delay, EventKind::Deliver { from, to, msg });
    }

    fn deliver(&mut self, from: Addr, to: Addr, msg: Msg) {
        // A cut drops what arrives while it holds (a message in flight when
        // the cut begins is lost too).
        if self.blocked(from, to) {
            self.stats.lost += 1;
            return;
        }
        match to {
            Addr::Replica(cell, rid) => {
                let i = replica_index(cell, rid);
                if !self.replicas[i].up {
                    return;
                }
                self.replica_receive(i, from, msg);
                self.after(i);
            }
            Addr::Coordinator => match msg {
                Msg::ProbeReply { round, status } if round == self.probe_round => {
                    self.probe_replies.push((status.cell_id, status.replica_id, status));
                }
                Msg::Deliver { req, batch } => self.router_deliver(Addr::Coordinator, from, req, batch),
                Msg::ConfigureAnswer { reply, result } => self.configure_answers.push((reply, result)),
                Msg::CreditsAnswer { req, outcome } => {
                    if let Some((courier, theirs)) = self.router_pending.remove(&req) {
                        self.send(Addr::Coordinator, courier, Msg::CreditsAnswer { req: theirs, outcome });
                    }
                }
                _ => {}
            },
            Addr::Router => match msg {
                Msg::TableSync { index, table } if index > self.router_table_index => {
                    self.router_table_index = index;
                    self.router_table = table;
                }
                Msg::Deliver { req, batch } => self.router_deliver(Addr::Router, from, req, batch),
                Msg::CreditsAnswer { req, outcome } => {
                    if let Some((courier, theirs)) = self.router_pending.remove(&req) {
                        self.send(Addr::Router, courier, Msg::CreditsAnswer { req: theirs, outcome });
                    }
                }
                _ => {}
            },
            Addr::Client(c) => {
                if let Msg::Reply { req, outcome } = msg {
                    self.client_reply(c, from, req, outcome);
                }
            }
        }
    }

    // ---- replicas ------------------------------------------------------

    fn start_replica(&mut self, i: usize) {
        let r = &mut self.replicas[i];
        r.up = true;
        r.incarnation += 1;
        let node =
            RawNode::new(&raft_config(r.rid, r.applied), r.store.clone(), &discard_logger()).expect("create raft node");
        let view: PairView = Arc::new(tokio::sync::watch::Sender::new(pair::unpaired()));
        let history: PairHistory = Arc::new(Mutex::new(pair::History::default()));
        let mut ledger = Ledger::detached(view.clone(), history.clone());
        ledger.load_pair_view(&r.kv, r.applied);
        r.vol = Some(Volatile {
            node,
            ledger,
            view,
            history: history.clone(),
            repl: Replication::new(history),
            leader_term: 0,
            leader_id: 0,
            settle_until_local: None,
            ready_scheduled: false,
            proposals: BTreeMap::new(),
            waiters: Vec::new(),
            reads: BTreeMap::new(),
            reads_ready: Vec::new(),
            shipper: None,
            ship_retry_at_local: 0,
            preferred: 0,
            standby_sessions: BTreeMap::new(),
            unacked_since_local: None,
            courier: None,
            courier_retry_at_local: 0,
            courier_failures: 0,
        });
        let (cell, rid, incarnation) = (r.cell, r.rid, r.incarnation);
        let phase = self.net_rng.range(1, TICK_MS * 1000);
        self.schedule(phase, EventKind::Tick { cell, rid, incarnation });
    }

    fn crash_replica(&mut self, i: usize) {
        let r = &mut self.replicas[i];
        if !r.up {
            return;
        }
        r.up = false;
        r.vol = None;
        r.incarnation += 1;
        let (cell, rid) = (r.cell, r.rid);
        self.note(|| format!("crash c{cell}r{rid}"));
    }

    /// After anything happened at a replica: persist and send what Raft
    /// has ready, then serve what may now be served.
    fn after(&mut self, i: usize) {
        if !self.replicas[i].up {
            return;
        }
        let disk_ms = self.replicas[i].disk_ms;
        let has_ready = self.replicas[i].vol.as_ref().is_some_and(|v| v.node.has_ready());
        if has_ready {
            if disk_ms == 0 {
                self.handle_ready(i);
            } else {
                let vol = self.replicas[i].vol.as_mut().expect("up");
                if !vol.ready_scheduled {
                    vol.ready_scheduled = true;
                    let (cell, rid, incarnation) =
                        (self.replicas[i].cell, self.replicas[i].rid, self.replicas[i].incarnation);
                    self.schedule(disk_ms * 1000, EventKind::Ready { cell, rid, incarnation });
                }
            }
        }
        self.serve_reads(i);
        self.judge_waiters(i);
        self.pump_standby(i);
        self.pump_shipper(i);
        self.pump_courier(i);
    }

    fn handle_ready(&mut self, i: usize) {
        let (cell, rid) = (self.replicas[i].cell, self.replicas[i].rid);
        let from = Addr::Replica(cell, rid);
        loop {
            let vol = self.replicas[i].vol.as_mut().expect("up");
            if !vol.node.has_ready() {
                break;
            }
            let mut ready = vol.node.ready();
            if let Some(ss) = ready.ss() {
                let (state, leader) = (ss.raft_state, ss.leader_id);
                self.role_changed(i, state, leader);
            }
            let messages = ready.take_messages();
            let read_states = ready.take_read_states();
            let committed = ready.take_committed_entries();
            self.send_raft(from, messages);
            for rs in read_states {
                self.read_state(i, ctx_of(&rs.request_ctx).unwrap_or(0), rs.index);
            }
            self.apply_entries(i, committed);
            let r = &mut self.replicas[i];
            let vol = r.vol.as_mut().expect("up");
            if !ready.entries().is_empty() {
                r.store.wl().append(ready.entries()).expect("append");
            }
            if let Some(hs) = ready.hs() {
                r.store.wl().set_hardstate(hs.clone());
            }
            let persisted = ready.take_persisted_messages();
            let mut light = vol.node.advance(ready);
            if let Some(commit) = light.commit_index() {
                r.store.wl().mut_hard_state().set_commit(commit);
            }
            let messages = light.take_messages();
            let committed = light.take_committed_entries();
            self.send_raft(from, persisted);
            self.send_raft(from, messages);
            self.apply_entries(i, committed);
            let vol = self.replicas[i].vol.as_mut().expect("up");
            vol.node.advance_apply();
        }
    }

    fn send_raft(&mut self, from: Addr, messages: Vec<RaftMessage>) {
        let Addr::Replica(cell, _) = from else { unreachable!() };
        for message in messages {
            let to = Addr::Replica(cell, message.to);
            self.send(from, to, Msg::Raft(Box::new(message)));
        }
    }

    fn role_changed(&mut self, i: usize, state: StateRole, leader: u64) {
        let (cell, rid) = (self.replicas[i].cell, self.replicas[i].rid);
        let vol = self.replicas[i].vol.as_mut().expect("up");
        let was_leader = vol.leader_term != 0;
        vol.leader_id = leader;
        if state == StateRole::Leader {
            vol.leader_term = vol.node.raft.term;
            let term = vol.leader_term;
            self.note(|| format!("c{cell}r{rid} leads (term {term})"));
        } else {
            vol.leader_term = 0;
            if was_leader {
                self.lose_leadership(i);
            }
        }
    }

    /// Leadership was lost: every waiter learns nothing more here.
    fn lose_leadership(&mut self, i: usize) {
        let (cell, rid) = (self.replicas[i].cell, self.replicas[i].rid);
        let vol = self.replicas[i].vol.as_mut().expect("up");
        let hint = vol.leader_id;
        let proposals = std::mem::take(&mut vol.proposals);
        let waiters = std::mem::take(&mut vol.waiters);
        let reads: Vec<_> = std::mem::take(&mut vol.reads).into_values().map(|r| (r.0, r.1)).collect();
        let ready: Vec<_> = vol.reads_ready.drain(..).map(|r| (r.1, r.2)).collect();
        vol.shipper = None;
        let sessions = std::mem::take(&mut vol.standby_sessions);
        let from = Addr::Replica(cell, rid);
        for (_, pending) in proposals {
            if let Pending::Client { client, req } = pending {
                self.send(from, Addr::Client(client), Msg::Reply { req, outcome: Outcome::NotLeader(hint) });
            }
        }
        for waiter in waiters {
            self.answer(from, waiter.to, waiter.req, Outcome::Retry);
        }
        for (client, req) in reads.into_iter().chain(ready) {
            self.send(from, Addr::Client(client), Msg::Reply { req, outcome: Outcome::NotLeader(hint) });
        }
        for (session, s) in sessions {
            let reply = ShipReply::NotLeader(hint);
            self.send(from, s.source, Msg::ShipAnswer { session, seq: s.out_seq, reply });
        }
    }

    fn apply_entries(&mut self, i: usize, entries: Vec<Entry>) {
        for entry in entries {
            let r = &mut self.replicas[i];
            if entry.index <= r.applied {
                continue;
            }
            let vol = r.vol.as_mut().expect("up");
            if entry.get_entry_type() != EntryType::EntryNormal || entry.data.is_empty() {
                r.applied = entry.index;
                continue;
            }
            let before = vol.view.borrow().clone();
            let results = vol.ledger.apply(&mut r.kv, entry.index, &entry.data);
            r.applied = entry.index;
            let after = vol.view.borrow().clone();
            self.stats.applied += 1;
            self.after_apply(i, entry.index, &entry.data, &before, &after);
            if let Some(ctx) = ctx_of(&entry.context) {
                let vol = self.replicas[i].vol.as_mut().expect("up");
                if let Some(pending) = vol.proposals.remove(&ctx) {
                    self.proposal_applied(i, ctx, pending, results);
                }
            }
        }
    }

    /// The checks that run at every apply.
    fn after_apply(&mut self, i: usize, index: u64, data: &[u8], before: &PairState, after: &PairState) {
        let (cell, rid) = (self.replicas[i].cell, self.replicas[i].rid);
        let batch = CommandBatch::decode(data).expect("entries are command batches");
        for command in &batch.commands {
            match &command.kind {
                // Applied (not refused) client writes: at most one cell per
                // pair per epoch.
                Some(command::Kind::Move(_)) | Some(command::Kind::OpenAccount(_)) if pair::writable(before) => {
                    let writer = *self.writers.entry((pair_of(cell), before.epoch)).or_insert(cell);
                    if writer != cell {
                        self.fail(
                            "one writer per epoch",
                            format!("cells {writer} and {cell} both applied client writes at epoch {}", before.epoch),
                        );
                    }
                }
                Some(command::Kind::Credit(credit)) => {
                    let applies = self.credit_applies.entry(credit.transfer_id.clone()).or_default();
                    if !applies.contains(&(cell, before.epoch, index)) {
                        applies.push((cell, before.epoch, index));
                    }
                }
                Some(command::Kind::Configure(_)) | Some(command::Kind::Depose(_)) if before != after => {
                    let (b, a) = (before.clone(), after.clone());
                    self.note(|| {
                        format!(
                            "c{cell}r{rid} @{index}: {} e{} -> {} e{} {}{}",
                            pair::role(&b).as_str_name(),
                            b.epoch,
                            pair::role(&a).as_str_name(),
                            a.epoch,
                            pair::mode(&a).as_str_name(),
                            if a.deposed_by_epoch > a.epoch {
                                format!(" deposed by {}", a.deposed_by_epoch)
                            } else {
                                String::new()
                            }
                        )
                    });
                }
                _ => {}
            }
        }
        let promoted = pair::role(before) == PairRole::Standby && pair::role(after) == PairRole::Active;
        if promoted {
            self.stats.promotions += 1;
            if after.promotion_settle_ms > 0 {
                let until = self.local_ms(i) + after.promotion_settle_ms;
                self.replicas[i].vol.as_mut().expect("up").settle_until_local = Some(until);
            }
            // Every write released before the promotion first applied in
            // this cell is in the promoted copy (a replica that catches up
            // later applies the same entry over the same ledger).
            let first = *self.promoted_at.entry((cell, after.epoch)).or_insert(self.now);
            let missing: Vec<String> = self
                .acked
                .iter()
                .filter(|a| a.released_at < first && a.cell != cell && a.pair == pair_of(cell))
                .filter(|a| !holds(&self.replicas[i].kv, a) && !self.forfeited(a))
                .map(|a| String::from_utf8_lossy(&a.transfer_id).into_owned())
                .collect();
            if !missing.is_empty() {
                self.fail(
                    "acknowledged writes survive failover",
                    format!(
                        "cell {cell} was promoted at epoch {} (replica {rid}, index {index}) without {} acknowledged \
                         write(s): {}",
                        after.epoch,
                        missing.len(),
                        missing.join(", ")
                    ),
                );
            }
        }
    }

    fn proposal_applied(&mut self, i: usize, _ctx: u64, pending: Pending, mut results: Vec<TransferResult>) {
        let (cell, rid) = (self.replicas[i].cell, self.replicas[i].rid);
        let from = Addr::Replica(cell, rid);
        if let Pending::Credits { req, router } = pending {
            if results.iter().any(|r| r.code == ResultCode::CellNotWritable as i32) {
                return self.answer(from, router, req, Outcome::Retry);
            }
            let index = results.iter().map(|r| r.entry_index).max().unwrap_or(0);
            let deadline_local = self.local_ms(i) + CLIENT_TIMEOUT_MS;
            let vol = self.replicas[i].vol.as_mut().expect("up");
            vol.waiters.push(Waiter {
                to: router,
                req,
                index,
                read: false,
                outcome: Outcome::Credits(results),
                deadline_local,
            });
            return;
        }
        let result = results.pop().expect("one result per command");
        match pending {
            Pending::Client { client, req } => {
                if result.code == ResultCode::CellNotWritable as i32 {
                    let outcome = Outcome::Retry;
                    self.send(from, Addr::Client(client), Msg::Reply { req, outcome });
                    return;
                }
                let index = if result.entry_index > 0 { result.entry_index } else { result.applied_index };
                let deadline_local = self.local_ms(i) + CLIENT_TIMEOUT_MS;
                let vol = self.replicas[i].vol.as_mut().expect("up");
                vol.waiters.push(Waiter {
                    to: Addr::Client(client),
                    req,
                    index,
                    read: false,
                    outcome: Outcome::Done(result),
                    deadline_local,
                });
            }
            Pending::Standby { session } => {
                let vol = self.replicas[i].vol.as_mut().expect("up");
                if let Some(s) = vol.standby_sessions.get_mut(&session) {
                    for item in s.items.iter_mut() {
                        if let StandbyItem::Proposal { ctx, result: slot } = item {
                            if *ctx == _ctx {
                                *slot = Some(result.clone());
                            }
                        }
                    }
                }
            }
            Pending::Configure { term, reply } => {
                let vol = self.replicas[i].vol.as_mut().expect("up");
                let ok = result.code == ResultCode::Ok as i32;
                if ok && term != 0 && vol.leader_term == term {
                    vol.repl.earn_authority(term);
                }
                if reply != 0 {
                    let answer = ok.then(|| (result.applied_index, vol.view.borrow().clone()));
                    self.send(from, Addr::Coordinator, Msg::ConfigureAnswer { reply, result: answer });
                }
            }
            Pending::Settle => {
                let vol = self.replicas[i].vol.as_mut().expect("up");
                if vol.courier.as_ref().is_some_and(|(r, ..)| *r == _ctx) {
                    vol.courier = None;
                }
            }
            Pending::Other | Pending::Credits { .. } => {}
        }
    }

    /// Proposes one command; its context names the proposal. `None` when
    /// Raft drops it (not the leader, a leader transfer).
    fn propose(&mut self, i: usize, command: Command, pending: Pending) -> Option<u64> {
        self.propose_all(i, vec![command], pending)
    }

    /// Proposes commands as one entry.
    fn propose_all(&mut self, i: usize, commands: Vec<Command>, pending: Pending) -> Option<u64> {
        let ctx = self.next_ctx;
        self.next_ctx += 1;
        let timestamp_ms = self.local_ms(i) + 1_700_000_000_000;
        let vol = self.replicas[i].vol.as_mut().expect("up");
        let data = vol.ledger.encode_batch(commands, timestamp_ms);
        if vol.node.propose(ctx_bytes(ctx), data).is_err() {
            return None;
        }
        vol.proposals.insert(ctx, pending);
        Some(ctx)
    }

    fn replica_receive(&mut self, i: usize, from: Addr, msg: Msg) {
        let (cell, rid) = (self.replicas[i].cell, self.replicas[i].rid);
        let me = Addr::Replica(cell, rid);
        match msg {
            Msg::Raft(message) => {
                let vol = self.replicas[i].vol.as_mut().expect("up");
                let _ = vol.node.step(*message);
            }
            Msg::Probe { round } => {
                let status = self.status(i);
                self.send(me, from, Msg::ProbeReply { round, status });
            }
            Msg::Configure { state, source_state, reply } => {
                let vol = self.replicas[i].vol.as_ref().expect("up");
                if vol.leader_term != 0 {
                    let term = vol.leader_term;
                    let command = Command {
                        kind: Some(command::Kind::Configure(ConfigureCommand {
                            state: Some(state),
                            source_state,
                            force_rebuild: false,
                        })),
                    };
                    self.propose(i, command, Pending::Configure { term, reply });
                }
            }
            Msg::Submit { req, command, epoch } => {
                let Addr::Client(client) = from else { return };
                if let Some(outcome) = self.gate(i, epoch) {
                    self.send(me, from, Msg::Reply { req, outcome });
                    return;
                }
                if self.propose(i, command, Pending::Client { client, req }).is_none() {
                    let outcome = Outcome::Retry;
                    self.send(me, from, Msg::Reply { req, outcome });
                }
            }
            Msg::Read { req, transfer_id, epoch } => {
                let Addr::Client(client) = from else { return };
                if let Some(outcome) = self.gate(i, epoch) {
                    self.send(me, from, Msg::Reply { req, outcome });
                    return;
                }
                let ctx = self.next_ctx;
                self.next_ctx += 1;
                let deadline = self.local_ms(i) + CLIENT_TIMEOUT_MS;
                let vol = self.replicas[i].vol.as_mut().expect("up");
                vol.node.read_index(ctx_bytes(ctx));
                vol.reads.insert(ctx, (client, req, transfer_id, deadline));
            }
            Msg::Hello { session, seq, source_cell, epoch } => {
                self.standby_hello(i, from, session, seq, source_cell, epoch)
            }
            Msg::Ship { session, seq, kind } => self.standby_ship(i, session, seq, kind),
            Msg::ShipAnswer { session, seq, reply } => self.shipper_answer(i, session, seq, reply),
            Msg::ApplyCredits { req, batch, epoch } => {
                if let Some(outcome) = self.gate(i, epoch) {
                    return self.answer(me, from, req, outcome);
                }
                let sender = batch.sender.unwrap_or_default();
                let commands = batch
                    .credits
                    .into_iter()
                    .map(|mut credit| {
                        // The apply refuses an epoch older than the newest
                        // it took credits from for this source pair.
                        credit.sender_epoch = sender.epoch;
                        Command { kind: Some(command::Kind::Credit(credit)) }
                    })
                    .collect();
                if self.propose_all(i, commands, Pending::Credits { req, router: from }).is_none() {
                    self.answer(me, from, req, Outcome::Retry);
                }
            }
            Msg::CreditsAnswer { req, outcome } => self.courier_answer(i, req, outcome),
            Msg::ProbeReply { .. }
            | Msg::Reply { .. }
            | Msg::Deliver { .. }
            | Msg::ConfigureAnswer { .. }
            | Msg::TableSync { .. } => {}
        }
    }

    /// The request gate of `service.rs`; `None` admits.
    fn gate(&self, i: usize, epoch: u64) -> Option<Outcome> {
        let vol = self.replicas[i].vol.as_ref().expect("up");
        if vol.leader_term == 0 {
            return Some(Outcome::NotLeader(vol.leader_id));
        }
        let settling = vol.settle_until_local.is_some_and(|until| self.local_ms(i) < until);
        let state = vol.view.borrow();
        let authority = vol.repl.has_authority(vol.leader_term, &state);
        let deposed = vol.repl.state.borrow().deposed_by_epoch;
        gate_refusal(&state, Some(epoch), settling, deposed, authority).map(|_| Outcome::Retry)
    }

    fn status(&self, i: usize) -> ReplicaStatus {
        let r = &self.replicas[i];
        let vol = r.vol.as_ref().expect("up");
        let pair_state = vol.view.borrow().clone();
        let ship = vol.repl.state.borrow().clone();
        let is_leader = vol.leader_term != 0;
        let lag_ms = match vol.unacked_since_local {
            Some(since) if is_leader => self.local_ms(i).saturating_sub(since),
            _ => 0,
        };
        ReplicaStatus {
            cell_id: r.cell,
            replica_id: r.rid,
            role: if is_leader { "leader".into() } else { "follower".into() },
            raft_role: if is_leader { RaftRole::Leader } else { RaftRole::Follower } as i32,
            term: vol.node.raft.term,
            applied_index: r.applied,
            leader_id: vol.leader_id,
            addr: format!("c{}r{}", r.cell, r.rid),
            standby_acked_index: if ship.epoch == pair_state.epoch { ship.acked_index } else { 0 },
            standby_lag_ms: lag_ms,
            deposed: vol.repl.deposed(pair_state.epoch) || pair::deposed(&pair_state),
            authority: is_leader && vol.repl.has_authority(vol.leader_term, &pair_state),
            pair: Some(pair_state),
            ..Default::default()
        }
    }

    fn read_state(&mut self, i: usize, ctx: u64, index: u64) {
        let vol = self.replicas[i].vol.as_mut().expect("up");
        if let Some((client, req, id, deadline)) = vol.reads.remove(&ctx) {
            vol.reads_ready.push((index, client, req, id, deadline));
            return;
        }
        // A standby's hello barrier.
        for s in vol.standby_sessions.values_mut() {
            for item in s.items.iter_mut() {
                if let StandbyItem::Barrier { ctx: c, index: slot } = item {
                    if *c == ctx {
                        *slot = Some(index);
                    }
                }
            }
        }
    }

    /// Reads whose index has applied take their view and wait for the rule.
    fn serve_reads(&mut self, i: usize) {
        let applied = self.replicas[i].applied;
        let vol = self.replicas[i].vol.as_mut().expect("up");
        let ready: Vec<_> = vol.reads_ready.iter().filter(|r| r.0 <= applied).cloned().collect();
        vol.reads_ready.retain(|r| r.0 > applied);
        for (_, client, req, id, deadline_local) in ready {
            let record = ledger::read_transfer(&self.replicas[i].kv, &id);
            let vol = self.replicas[i].vol.as_mut().expect("up");
            vol.waiters.push(Waiter {
                to: Addr::Client(client),
                req,
                index: applied,
                read: true,
                outcome: Outcome::Read(record),
                deadline_local,
            });
        }
    }

    /// The acknowledgement rule, for every waiter of this replica.
    fn judge_waiters(&mut self, i: usize) {
        let local = self.local_ms(i);
        let local_instant = self.local_instant(i);
        let (cell, rid) = (self.replicas[i].cell, self.replicas[i].rid);
        let vol = self.replicas[i].vol.as_mut().expect("up");
        if vol.waiters.is_empty() {
            return;
        }
        let current = vol.view.borrow().clone();
        let ship = vol.repl.state.borrow().clone();
        let lease_fresh = ship.confirmed_at.is_some_and(|at| local_instant.saturating_duration_since(at) < READ_LEASE);
        let history = vol.history.lock().expect("history");
        let mut done = Vec::new();
        vol.waiters.retain_mut(|w| {
            let ticket = history.at(w.index).map(|t| t.as_state());
            let verdict = match &ticket {
                None => Verdict::Fail(replication::WaitFailure::NoTicket),
                Some(ticket) => replication::judge(ticket, &current, &ship, w.index, w.read, lease_fresh, false),
            };
            // Released on the standby's acknowledgement, or alone.
            let how = ticket.map(|t| {
                let acknowledged = pair::waits_for_standby(&t)
                    && ship.epoch == t.epoch
                    && ship.standby_cell_id == t.standby_cell_id
                    && ship.acked_index >= w.index;
                (t.epoch, w.index, !acknowledged)
            });
            match verdict {
                Verdict::Release => {
                    done.push((w.to, w.req, w.outcome.clone(), how));
                    false
                }
                Verdict::Fail(_) => {
                    done.push((w.to, w.req, Outcome::Retry, None));
                    false
                }
                Verdict::Wait if local >= w.deadline_local => {
                    done.push((w.to, w.req, Outcome::Retry, None));
                    false
                }
                Verdict::Wait => true,
            }
        });
        drop(history);
        let from = Addr::Replica(cell, rid);
        for (to, req, outcome, how) in done {
            let released = how.is_some();
            let outcome = match (to, outcome) {
                (Addr::Client(client), Outcome::Done(result)) if released => {
                    let (epoch, index, alone) = how.expect("released");
                    self.released(client, req, cell, &result, epoch, index, alone);
                    Outcome::Done(result)
                }
                // A destination that took a later sender's credits refuses
                // the batch (FAILED_PRECONDITION); the router reports it per
                // credit and the courier only retries later (it records no
                // deposition from a destination's answer).
                (_, Outcome::Credits(results))
                    if released && results.iter().any(|r| r.code == ResultCode::StaleSender as i32) =>
                {
                    Outcome::Retry
                }
                (_, outcome) => outcome,
            };
            self.answer(from, to, req, outcome);
        }
    }

    /// Sends an answer to a client or (credits) to the router.
    fn answer(&mut self, from: Addr, to: Addr, req: u64, outcome: Outcome) {
        let msg = match to {
            Addr::Client(_) => Msg::Reply { req, outcome },
            _ => Msg::CreditsAnswer { req, outcome },
        };
        self.send(from, to, msg);
    }

    /// A write's outcome leaves the cell: it must survive from now on.
    #[allow(clippy::too_many_arguments)]
    fn released(
        &mut self,
        client: usize,
        req: u64,
        cell: u64,
        result: &TransferResult,
        epoch: u64,
        index: u64,
        alone: bool,
    ) {
        let Some(request) = self.clients[client].current.as_ref().filter(|r| r.req == req) else { return };
        if let Op::Write { transfer_id, .. } = &request.op {
            let transfer_id = transfer_id.clone();
            let code = result.code;
            let pair = pair_of(cell);
            let released_at = self.now;
            let heard_at = u64::MAX;
            self.acked.push(Acked { transfer_id, code, released_at, heard_at, cell, pair, epoch, index, alone });
        }
    }

    /// True when a forced failover reported it may lose this write: the
    /// only acknowledged writes a run may lose.
    fn forfeited(&self, a: &Acked) -> bool {
        a.alone && self.forfeits.iter().any(|f| f.covers(a.pair, a.cell, a.epoch, a.index))
    }

    /// True when a forced failover reported it may lose the write with this
    /// id (any of its acknowledgements).
    fn forfeited_id(&self, transfer_id: &[u8]) -> bool {
        self.acked.iter().any(|a| a.transfer_id == transfer_id && self.forfeited(a))
    }

    // ---- standby side of the stream ------------------------------------

    fn standby_hello(&mut self, i: usize, from: Addr, session: u64, seq: u64, source_cell: u64, epoch: u64) {
        let (cell, rid) = (self.replicas[i].cell, self.replicas[i].rid);
        let me = Addr::Replica(cell, rid);
        let vol = self.replicas[i].vol.as_mut().expect("up");
        if seq > 0 {
            // A keepalive on an open stream.
            let Some(s) = vol.standby_sessions.get_mut(&session) else { return };
            if s.expect_seq != seq {
                vol.standby_sessions.remove(&session);
                return;
            }
            s.expect_seq += 1;
            s.items.push_back(StandbyItem::Keepalive);
            return;
        }
        if vol.leader_term == 0 {
            let reply = ShipReply::NotLeader(vol.leader_id);
            self.send(me, from, Msg::ShipAnswer { session, seq: 0, reply });
            return;
        }
        let state = vol.view.borrow().clone();
        if let Err(refusal) = replication::check_hello(cell, &state, source_cell, epoch) {
            let reply = match refusal {
                HelloRefusal::Superseded { epoch, .. } => ShipReply::Superseded(epoch),
                HelloRefusal::NotYet(_) => ShipReply::NotYet,
            };
            self.send(me, from, Msg::ShipAnswer { session, seq: 0, reply });
            return;
        }
        let ctx = self.next_ctx;
        self.next_ctx += 1;
        let vol = self.replicas[i].vol.as_mut().expect("up");
        vol.node.read_index(ctx_bytes(ctx));
        vol.standby_sessions.insert(
            session,
            StandbySession {
                source: from,
                source_cell,
                epoch,
                expect_seq: 1,
                out_seq: 0,
                items: VecDeque::from([StandbyItem::Barrier { ctx, index: None }]),
            },
        );
    }

    fn standby_ship(&mut self, i: usize, session: u64, seq: u64, kind: command::Kind) {
        let vol = self.replicas[i].vol.as_mut().expect("up");
        let Some(s) = vol.standby_sessions.get_mut(&session) else { return };
        if s.expect_seq != seq {
            vol.standby_sessions.remove(&session);
            return;
        }
        s.expect_seq += 1;
        let proposed = self.propose(i, Command { kind: Some(kind) }, Pending::Standby { session });
        let vol = self.replicas[i].vol.as_mut().expect("up");
        match proposed {
            Some(ctx) => {
                let s = vol.standby_sessions.get_mut(&session).expect("checked");
                s.items.push_back(StandbyItem::Proposal { ctx, result: None });
            }
            None => {
                vol.standby_sessions.remove(&session);
            }
        }
    }

    /// Answers a standby session's items in stream order.
    fn pump_standby(&mut self, i: usize) {
        let (cell, rid) = (self.replicas[i].cell, self.replicas[i].rid);
        let me = Addr::Replica(cell, rid);
        let applied = self.replicas[i].applied;
        let mut out = Vec::new();
        let vol = self.replicas[i].vol.as_mut().expect("up");
        if vol.standby_sessions.is_empty() {
            return;
        }
        let state = vol.view.borrow().clone();
        let mut closed = Vec::new();
        for (session, s) in vol.standby_sessions.iter_mut() {
            while let Some(front) = s.items.front() {
                let reply = match front {
                    StandbyItem::Barrier { index: Some(index), .. } if *index <= applied => {
                        match replication::check_hello(cell, &state, s.source_cell, s.epoch) {
                            Ok(()) => ShipReply::Ack(replication::ship_ack(&state)),
                            Err(HelloRefusal::Superseded { epoch, .. }) => ShipReply::Superseded(epoch),
                            Err(HelloRefusal::NotYet(_)) => ShipReply::NotYet,
                        }
                    }
                    StandbyItem::Barrier { .. } => break,
                    StandbyItem::Proposal { result: Some(result), .. } => {
                        if result.code == ResultCode::Ok as i32 {
                            ShipReply::Ack(replication::ship_ack(&state))
                        } else {
                            ShipReply::Superseded(state.epoch)
                        }
                    }
                    StandbyItem::Proposal { .. } => break,
                    StandbyItem::Keepalive => match replication::check_hello(cell, &state, s.source_cell, s.epoch) {
                        Ok(()) => ShipReply::Ack(replication::ship_ack(&state)),
                        Err(HelloRefusal::Superseded { epoch, .. }) => ShipReply::Superseded(epoch),
                        Err(HelloRefusal::NotYet(_)) => ShipReply::NotYet,
                    },
                };
                s.items.pop_front();
                let failed = !matches!(reply, ShipReply::Ack(_));
                out.push((s.source, *session, s.out_seq, reply));
                s.out_seq += 1;
                if failed {
                    closed.push(*session);
                    break;
                }
            }
        }
        for session in closed {
            vol.standby_sessions.remove(&session);
        }
        for (to, session, seq, reply) in out {
            self.send(me, to, Msg::ShipAnswer { session, seq, reply });
        }
    }

    // ---- the shipper ---------------------------------------------------

    fn still_current(vol: &Volatile, started: &PairState) -> bool {
        let now = vol.view.borrow();
        vol.leader_term != 0
            && pair::ships(&now)
            && now.epoch == started.epoch
            && now.standby_cell_id == started.standby_cell_id
    }

    fn end_session(&mut self, i: usize, why: &str, retry: bool) {
        let local = self.local_ms(i);
        let (cell, rid) = (self.replicas[i].cell, self.replicas[i].rid);
        let vol = self.replicas[i].vol.as_mut().expect("up");
        if let Some(s) = vol.shipper.take() {
            if retry {
                vol.ship_retry_at_local = local + SHIP_RETRY_MS;
                vol.preferred += 1;
            }
            let session = s.session;
            let why = why.to_string();
            self.note(|| format!("c{cell}r{rid} ship session {session} ended: {why}"));
        }
    }

    fn pump_shipper(&mut self, i: usize) {
        let local = self.local_ms(i);
        let (cell, rid) = (self.replicas[i].cell, self.replicas[i].rid);
        let me = Addr::Replica(cell, rid);
        let applied = self.replicas[i].applied;
        let store = self.replicas[i].store.clone();
        let vol = self.replicas[i].vol.as_mut().expect("up");
        // The lag the coordinator reads.
        let acked = vol.repl.state.borrow().acked_index;
        if vol.leader_term != 0 && applied > acked {
            vol.unacked_since_local.get_or_insert(local);
        } else {
            vol.unacked_since_local = None;
        }
        if vol.leader_term == 0 && vol.shipper.is_none() {
            return;
        }
        let pair_state = vol.view.borrow().clone();
        let shipping = vol.leader_term != 0 && pair::ships(&pair_state) && pair_state.standby_cell_id != 0;
        if let Some(s) = &vol.shipper {
            if !shipping || !World::still_current(vol, &s.started) {
                self.end_session(i, "the configuration or leadership changed", false);
                return self.pump_shipper_again(i);
            }
        }
        let vol = self.replicas[i].vol.as_mut().expect("up");
        if vol.shipper.is_none() {
            if !shipping || local < vol.ship_retry_at_local {
                return;
            }
            let session = self.next_session;
            self.next_session += 1;
            let target = (vol.preferred % REPLICAS) + 1;
            vol.shipper = Some(Shipper {
                session,
                target,
                started: pair_state.clone(),
                term: vol.leader_term,
                out_seq: 1,
                in_seq: 0,
                phase: ShipPhase::Hello { sent_local: local },
            });
            let to = Addr::Replica(pair_state.standby_cell_id, target);
            let msg = Msg::Hello { session, seq: 0, source_cell: cell, epoch: pair_state.epoch };
            self.send(me, to, msg);
            return;
        }
        let s = vol.shipper.as_mut().expect("checked");
        let to = Addr::Replica(s.started.standby_cell_id, s.target);
        let session = s.session;
        let epoch = s.started.epoch;
        let mut out: Vec<Msg> = Vec::new();
        let mut timed_out = false;
        match &mut s.phase {
            ShipPhase::Hello { sent_local } | ShipPhase::Snapshot { sent_local, .. } => {
                timed_out = local >= *sent_local + ACK_TIMEOUT_MS;
            }
            ShipPhase::Streaming { next, in_flight, last_sent_local } => {
                if in_flight.front().is_some_and(|(_, sent)| local >= sent + ACK_TIMEOUT_MS) {
                    timed_out = true;
                } else {
                    while in_flight.len() < SHIP_IN_FLIGHT && *next <= applied {
                        let high = (*next + SHIP_BATCH_ENTRIES).min(applied + 1);
                        let entries = store
                            .entries(*next, high, None, GetEntriesContext::empty(false))
                            .expect("shipped entries are in the log");
                        let data: Vec<Vec<u8>> = entries
                            .iter()
                            .map(|e| {
                                if e.get_entry_type() == EntryType::EntryNormal {
                                    e.data.to_vec()
                                } else {
                                    Vec::new()
                                }
                            })
                            .collect();
                        let count = data.len() as u64;
                        let batch = SourceEntries {
                            source_cell_id: cell,
                            epoch,
                            first_index: *next,
                            entries: data,
                            checksum: 0,
                        };
                        out.push(Msg::Ship { session, seq: 0, kind: command::Kind::SourceEntries(batch) });
                        *next += count;
                        *last_sent_local = local;
                        in_flight.push_back((*next - 1, local));
                    }
                    if in_flight.is_empty() && local >= *last_sent_local + KEEPALIVE_MS {
                        out.push(Msg::Hello { session, seq: 0, source_cell: cell, epoch });
                        *last_sent_local = local;
                        in_flight.push_back((*next - 1, local));
                    }
                }
            }
        }
        for mut msg in out {
            let vol = self.replicas[i].vol.as_mut().expect("up");
            let s = vol.shipper.as_mut().expect("checked");
            match &mut msg {
                Msg::Ship { seq, .. } | Msg::Hello { seq, .. } => *seq = s.out_seq,
                _ => {}
            }
            s.out_seq += 1;
            self.send(me, to, msg);
        }
        if timed_out {
            self.end_session(i, "no ack in time", true);
        }
    }

    fn pump_shipper_again(&mut self, i: usize) {
        let vol = self.replicas[i].vol.as_ref().expect("up");
        if vol.shipper.is_none() {
            self.pump_shipper(i);
        }
    }

    fn shipper_answer(&mut self, i: usize, session: u64, seq: u64, reply: ShipReply) {
        let local = self.local_ms(i);
        let local_instant = self.local_instant(i);
        let (cell, rid) = (self.replicas[i].cell, self.replicas[i].rid);
        let vol = self.replicas[i].vol.as_mut().expect("up");
        let Some(s) = vol.shipper.as_mut().filter(|s| s.session == session) else { return };
        if s.in_seq != seq {
            return self.end_session(i, "the stream broke", true);
        }
        s.in_seq += 1;
        let started = s.started.clone();
        let ack = match reply {
            ShipReply::Ack(ack) => ack,
            ShipReply::Superseded(epoch) => {
                let mut deposed = false;
                vol.repl.state.send_modify(|ship| deposed = replication::on_refusal(ship, started.epoch, epoch));
                if deposed {
                    self.note(|| format!("c{cell}r{rid} learns it is deposed by epoch {epoch}"));
                    if let Some(command) = replication::deposition_command(epoch) {
                        self.propose(i, command, Pending::Other);
                    }
                }
                return self.end_session(i, "refused: superseded", true);
            }
            ShipReply::NotYet => return self.end_session(i, "refused: not yet the standby", true),
            ShipReply::NotLeader(hint) => {
                let vol = self.replicas[i].vol.as_mut().expect("up");
                if hint != 0 {
                    vol.preferred = hint - 1;
                    vol.shipper = None;
                    return;
                }
                return self.end_session(i, "refused: not the leader", true);
            }
        };
        let s = vol.shipper.as_mut().expect("checked");
        let term = s.term;
        match &mut s.phase {
            ShipPhase::Hello { sent_local } => {
                let sent = self.base + Duration::from_millis(*sent_local);
                let held = ack.source_index;
                let needs = ack.needs_snapshot;
                if let Some(trace) = &mut self.trace {
                    trace.push(format!(
                        "{:>6}.{:03} ms  c{cell}r{rid} session {session}: the standby holds {held}{}",
                        self.now / 1000,
                        self.now % 1000,
                        if needs { " and needs a snapshot" } else { "" }
                    ));
                }
                vol.repl.state.send_modify(|ship| replication::on_hello_answer(ship, &started, held, sent));
                if World::still_current(vol, &started) {
                    vol.repl.earn_authority(term);
                }
                let s = vol.shipper.as_mut().expect("checked");
                if ack.needs_snapshot || held == 0 {
                    let (index, chunk) = self.snapshot_chunk(i, &started);
                    let vol = self.replicas[i].vol.as_mut().expect("up");
                    let s = vol.shipper.as_mut().expect("checked");
                    s.phase = ShipPhase::Snapshot { index, sent_local: local };
                    let seq = s.out_seq;
                    s.out_seq += 1;
                    let to = Addr::Replica(started.standby_cell_id, s.target);
                    let msg = Msg::Ship { session, seq, kind: command::Kind::SourceSnapshot(chunk) };
                    self.send(Addr::Replica(cell, rid), to, msg);
                } else {
                    s.phase =
                        ShipPhase::Streaming { next: held + 1, in_flight: VecDeque::new(), last_sent_local: local };
                }
            }
            ShipPhase::Snapshot { index, .. } => {
                let index = *index;
                if let Some(trace) = &mut self.trace {
                    trace.push(format!(
                        "{:>6}.{:03} ms  c{cell}r{rid} session {session}: snapshot at {index} acknowledged ({:?})",
                        self.now / 1000,
                        self.now % 1000,
                        ack
                    ));
                }
                vol.repl.state.send_modify(|ship| ship.acked_index = ship.acked_index.max(index));
                s.phase = ShipPhase::Streaming { next: index + 1, in_flight: VecDeque::new(), last_sent_local: local };
            }
            ShipPhase::Streaming { in_flight, .. } => {
                let Some((_, sent_local)) = in_flight.pop_front() else { return };
                let sent = self.base + Duration::from_millis(sent_local);
                let _ = local_instant;
                vol.repl.state.send_modify(|ship| replication::on_ack(ship, ack.source_index, sent));
            }
        }
    }

    /// The ledger at this replica's applied index, as one chunk.
    fn snapshot_chunk(&self, i: usize, started: &PairState) -> (u64, SourceSnapshotChunk) {
        let r = &self.replicas[i];
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for (k, v) in r.kv.range(pair::LEDGER_START.to_vec()..pair::LEDGER_END.to_vec()) {
            keys.push(k.clone());
            values.push(v.clone());
        }
        let source_state = pair::read(&r.kv, pair::Slot::Own);
        let chunk = SourceSnapshotChunk {
            source_cell_id: r.cell,
            epoch: started.epoch,
            snapshot_index: r.applied,
            chunk: 0,
            last: true,
            keys,
            values,
            source_state: Some(source_state),
            // The simulator proposes into the ledger directly; the checksum
            // is checked by the standby service, which it stands in for.
            checksum: 0,
        };
        (r.applied, chunk)
    }

    // ---- money between the pairs ---------------------------------------

    /// The courier of `clearing.rs`: a serving leader delivers its pending
    /// outbox entries, once they may be acknowledged, through the router.
    fn pump_courier(&mut self, i: usize) {
        let local = self.local_ms(i);
        let applied = self.replicas[i].applied;
        let (cell, rid) = (self.replicas[i].cell, self.replicas[i].rid);
        let vol = self.replicas[i].vol.as_mut().expect("up");
        if let Some((_, deadline, _, _)) = &vol.courier {
            if local < *deadline {
                return;
            }
            vol.courier = None;
            vol.courier_failures += 1;
            vol.courier_retry_at_local = local + (50u64 << vol.courier_failures.min(10)).min(5_000);
        }
        if local < vol.courier_retry_at_local || vol.leader_term == 0 {
            return;
        }
        let has_outbox = self.replicas[i]
            .kv
            .range(keys::OUTBOX_PREFIX.to_vec()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(keys::OUTBOX_PREFIX));
        if !has_outbox {
            return;
        }
        let vol = self.replicas[i].vol.as_mut().expect("up");
        let state = vol.view.borrow().clone();
        if !pair::writable(&state) || vol.repl.deposed(state.epoch) || !vol.repl.has_authority(vol.leader_term, &state)
        {
            return;
        }
        let entries: Vec<OutboxEntry> = self.replicas[i]
            .kv
            .range(keys::OUTBOX_PREFIX.to_vec()..)
            .take_while(|(k, _)| k.starts_with(keys::OUTBOX_PREFIX))
            .take(64)
            .map(|(_, v)| OutboxEntry::decode(v.as_slice()).expect("outbox entries decode"))
            .collect();
        if entries.is_empty() {
            return;
        }
        // No credit leaves before its entry may be acknowledged.
        let vol = self.replicas[i].vol.as_ref().expect("up");
        let verdict = {
            let history = vol.history.lock().expect("history");
            let ship = vol.repl.state.borrow();
            match history.at(applied) {
                None => Verdict::Fail(replication::WaitFailure::NoTicket),
                Some(ticket) => replication::judge(&ticket.as_state(), &state, &ship, applied, false, false, false),
            }
        };
        if verdict != Verdict::Release {
            return;
        }
        let source_pair_id = entries[0].credit.as_ref().map(|c| c.source_pair_id).unwrap_or(0);
        let sender = CreditSender { source_pair_id, cell_id: cell, epoch: state.epoch };
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        let batch = CreditBatch {
            credits: entries.into_iter().map(|e| e.credit.unwrap_or_default()).collect(),
            sender: Some(sender),
        };
        let req = self.next_ctx;
        self.next_ctx += 1;
        let vol = self.replicas[i].vol.as_mut().expect("up");
        vol.courier = Some((req, local + 3_000, seqs, state.epoch));
        self.stats.deliveries += 1;
        // Any router: the two in turn.
        let router = if req.is_multiple_of(2) { Addr::Coordinator } else { Addr::Router };
        self.send(Addr::Replica(cell, rid), router, Msg::Deliver { req, batch });
    }

    fn courier_answer(&mut self, i: usize, req: u64, outcome: Outcome) {
        let local = self.local_ms(i);
        let (cell, rid) = (self.replicas[i].cell, self.replicas[i].rid);
        let vol = self.replicas[i].vol.as_mut().expect("up");
        let Some((_, _, seqs, sender_epoch)) = vol.courier.take_if(|(r, ..)| *r == req) else { return };
        if let Some(trace) = &mut self.trace {
            let what = match &outcome {
                Outcome::Credits(results) => {
                    let fresh = results.iter().filter(|r| !r.duplicate).count();
                    format!("answered ({fresh} applied now, {} before)", results.len() - fresh)
                }
                Outcome::StaleSender(epoch) => format!("refused: the pair is at epoch {epoch}"),
                _ => "not answered".to_string(),
            };
            let (at, n) = (self.now, seqs.len());
            trace.push(format!("{:>6}.{:03} ms  c{cell}r{rid} courier: {n} credit(s) {what}", at / 1000, at % 1000));
        }
        match outcome {
            Outcome::Credits(results) if results.len() == seqs.len() => {
                vol.courier_failures = 0;
                let settles: Vec<Command> = seqs
                    .iter()
                    .zip(&results)
                    .filter(|(_, r)| {
                        ledger::clearing::settles(ResultCode::try_from(r.code).unwrap_or(ResultCode::Unspecified))
                    })
                    .map(|(seq, r)| Command {
                        kind: Some(command::Kind::Settle(SettleCommand {
                            seq: *seq,
                            code: r.code,
                            credited_at_ms: r.timestamp_ms,
                        })),
                    })
                    .collect();
                if !settles.is_empty() {
                    // The entries stay in flight until their settles apply
                    // (as the production courier's delivery task does).
                    if let Some(ctx) = self.propose_all(i, settles, Pending::Settle) {
                        let vol = self.replicas[i].vol.as_mut().expect("up");
                        vol.courier = Some((ctx, local + 3_000, Vec::new(), sender_epoch));
                    }
                }
            }
            Outcome::StaleSender(epoch) if epoch > sender_epoch => {
                // A router (or the destination) knows a later sender: this
                // cell was deposed.
                vol.courier_retry_at_local = local + 50;
                if let Some(command) = replication::deposition_command(epoch) {
                    self.propose(i, command, Pending::Other);
                }
            }
            _ => {
                vol.courier_failures += 1;
                vol.courier_retry_at_local = local + (50u64 << vol.courier_failures.min(10)).min(5_000);
            }
        }
    }

    /// The router's courier service: only the table's active at the table's
    /// epoch may send; the credits go to the destination pair's active.
    fn router_deliver(&mut self, router: Addr, courier: Addr, req: u64, batch: CreditBatch) {
        let table = if router == Addr::Coordinator { self.table_now() } else { self.router_table.clone() };
        let sender = batch.sender.unwrap_or_default();
        if let Err(status) = cellbank_router::courier::check_sender(&table, &sender) {
            let outcome = if status.code() == tonic::Code::FailedPrecondition {
                let epoch = table::find_pair(&table, sender.source_pair_id).map(|p| p.epoch).unwrap_or(0);
                Outcome::StaleSender(epoch)
            } else {
                Outcome::Retry
            };
            return self.send(router, courier, Msg::CreditsAnswer { req, outcome });
        }
        let dest_pair_id = batch.credits.first().map(|c| c.dest_pair_id).unwrap_or(0);
        let Some(dest) = table::find_pair(&table, dest_pair_id).copied() else { return };
        // The newest epoch of the sender's pair a router knew when it passed
        // the credit on.
        let known = table::find_pair(&table, sender.source_pair_id).map(|p| p.epoch).unwrap_or(0);
        for credit in &batch.credits {
            let key = (credit.source_pair_id, credit.seq, credit.created_epoch, credit.created_index);
            let epoch = self.routed.entry(key).or_insert(known);
            *epoch = (*epoch).max(known);
        }
        let rid = self
            .health
            .get(&dest.active_cell_id)
            .and_then(|h| h.leader.as_ref())
            .map(|s| s.replica_id)
            .unwrap_or_else(|| self.work_rng.range(1, REPLICAS));
        let fwd = self.next_router_req;
        self.next_router_req += 1;
        self.router_pending.insert(fwd, (courier, req));
        let msg = Msg::ApplyCredits { req: fwd, batch, epoch: dest.epoch };
        self.send(router, Addr::Replica(dest.active_cell_id, rid), msg);
    }

    // ---- the coordinator -----------------------------------------------

    fn bootstrap_table(&mut self) {
        let cells = CELLS
            .iter()
            .map(|c| CellReplicas { cell_id: *c, replicas: (1..=REPLICAS).map(|r| format!("c{c}r{r}")).collect() })
            .collect();
        let seed = RoutingTable {
            slice_count: 2,
            slice_pair: PAIRS.iter().map(|(p, _, _)| *p).collect(),
            pairs: PAIRS
                .iter()
                .map(|(pair_id, active, standby)| Pair {
                    pair_id: *pair_id,
                    active_cell_id: *active,
                    standby_cell_id: *standby,
                    epoch: 1,
                    mode: PairMode::Sync as i32,
                    ..Default::default()
                })
                .collect(),
            cells,
            ..Default::default()
        };
        let command = TableCommand { kind: Some(table_command::Kind::Bootstrap(seed)), audit: None };
        let result = self.apply_table(command);
        assert!(result.ok, "bootstrap: {}", result.detail);
    }

    fn apply_table(&mut self, command: TableCommand) -> TableCommandResult {
        self.table_index += 1;
        let data = self.table.encode_batch(vec![command], self.now / 1000);
        self.table.apply(&mut self.table_kv, self.table_index, &data).pop().expect("one result")
    }

    fn table_now(&self) -> RoutingTable {
        self.table_view.borrow().clone()
    }

    fn coordinator_pass(&mut self) {
        let now = self.instant();
        // Fold the last round's answers (a replica that did not answer in
        // time is unreachable).
        if self.probe_round > 0 {
            for cell in CELLS {
                let probes = (1..=REPLICAS)
                    .map(|rid| {
                        let status = self
                            .probe_replies
                            .iter()
                            .find(|(c, r, _)| *c == cell && *r == rid)
                            .map(|(_, _, s)| s.clone());
                        ReplicaProbe {
                            addr: format!("c{cell}r{rid}"),
                            reachable: status.is_some(),
                            serving: status.is_some(),
                            status,
                            last_seen: None,
                        }
                    })
                    .collect();
                let entry = self
                    .health
                    .entry(cell)
                    .or_insert_with(|| CellHealth { leader_seen: Some(now), ..Default::default() });
                coordinator::record_probes(entry, probes, now);
            }
            // An operator's action holds the coordinator's action lock: no
            // pass plans while it runs.
            if self.job.is_some() {
                self.job_step();
            }
            for (pair_id, _, _) in PAIRS {
                if self.job.is_some() {
                    break;
                }
                let table = self.table_now();
                let pair = *table::find_pair(&table, pair_id).expect("the pair");
                let active = self.health.get(&pair.active_cell_id).cloned().unwrap_or_default();
                let standby = self.health.get(&pair.standby_cell_id).cloned().unwrap_or_default();
                let actions = coordinator::plan_pair(
                    &self.coordinator_config,
                    &table,
                    &pair,
                    self.coordinator_term,
                    &active,
                    &standby,
                    now,
                    self.now / 1000,
                );
                for action in actions {
                    if !self.execute(&table, &pair, action) {
                        break;
                    }
                }
            }
        }
        let (index, table) = (self.table_index, self.table_now());
        self.send(Addr::Coordinator, Addr::Router, Msg::TableSync { index, table });
        self.probe_round += 1;
        self.probe_replies.clear();
        let round = self.probe_round;
        for cell in CELLS {
            for rid in 1..=REPLICAS {
                self.send(Addr::Coordinator, Addr::Replica(cell, rid), Msg::Probe { round });
            }
        }
    }

    fn execute(&mut self, table: &RoutingTable, pair: &Pair, action: Action) -> bool {
        match action {
            Action::ChangeActive { mode, record } => {
                if !self.apply_table(coordinator::change_active_command(pair, mode, record)).ok {
                    return false;
                }
                self.stats.failovers += 1;
                let (cell, desired) = coordinator::promotion(table, pair, mode, false);
                let epoch = desired.epoch;
                self.note(|| format!("coordinator: failover to cell {cell} at epoch {epoch}"));
                self.configure(cell, desired);
                true
            }
            Action::ProposeTable { command, count } => {
                let ok = self.apply_table(command).ok;
                self.note(|| format!("coordinator: {count} ({})", if ok { "committed" } else { "refused" }));
                ok
            }
            Action::Configure { cell_id, state } => {
                self.configure(cell_id, state);
                true
            }
        }
    }

    fn configure(&mut self, cell: u64, state: PairState) {
        self.configure_with(cell, state, None, 0);
    }

    /// A configure whose answer the coordinator waits for (`reply`
    /// nonzero), perhaps with the source's state (a demotion).
    fn configure_with(&mut self, cell: u64, state: PairState, source_state: Option<PairState>, reply: u64) {
        let state = PairState { coordinator_term: self.coordinator_term, ..state };
        for rid in 1..=REPLICAS {
            let msg = Msg::Configure { state: state.clone(), source_state: source_state.clone(), reply };
            self.send(Addr::Coordinator, Addr::Replica(cell, rid), msg);
        }
    }

    // ---- the operator --------------------------------------------------

    /// One step of the operator's action, after a round of probes: the
    /// same sequence as `Coordinator::switchover` and
    /// `Coordinator::failover` (with `--force`), on their pure decisions.
    fn job_step(&mut self) {
        let Some(job) = self.job.clone() else { return };
        let switchover = job.kind == FaultKind::Switchover;
        let now = self.now;
        match job.phase.clone() {
            JobPhase::Look => {
                let table = self.table_now();
                let pair = *table::find_pair(&table, job.pair_id).expect("the pair");
                let active = self.health.get(&pair.active_cell_id).cloned().unwrap_or_default();
                let standby = self.health.get(&pair.standby_cell_id).cloned().unwrap_or_default();
                let (start, active_state) = if switchover {
                    match coordinator::check_switchover(&pair, &active, &standby) {
                        Ok(state) => (None, Some(state)),
                        Err(refusal) => return self.job_ends(false, &refusal.to_string()),
                    }
                } else {
                    match coordinator::check_failover(&pair, true, &active, &standby) {
                        Ok(start) => {
                            let state = start.active_state.clone();
                            (Some(start), state)
                        }
                        Err(refusal) => return self.job_ends(false, &refusal.to_string()),
                    }
                };
                let Some(active_state) = active_state else {
                    return self.job_change_active(&job, &table, &pair, start, None, false);
                };
                let req = self.next_ctx;
                self.next_ctx += 1;
                self.note(|| format!("operator: fence cell {}", pair.active_cell_id));
                self.configure_with(pair.active_cell_id, coordinator::fenced(&active_state), None, req);
                let deadline = now + CONFIGURE_TIMEOUT_MS * 1000;
                let phase = JobPhase::Fence { table, pair, start, active_state, req, deadline };
                self.job = Some(Job { phase, ..job });
            }
            JobPhase::Fence { table, pair, start, active_state, req, deadline } => match self.take_answer(req) {
                Some(Some((fence_index, _))) => {
                    let deadline = now + CATCH_UP_MAX_MS * 1000;
                    let phase = JobPhase::CatchUp { table, pair, start, active_state, fence_index, deadline };
                    self.job = Some(Job { phase, ..job });
                }
                Some(None) => self.job_ends(false, "the active refused the fence"),
                None if now >= deadline => self.job_ends(false, "the fence was not answered in time"),
                None => {}
            },
            JobPhase::CatchUp { table, pair, start, active_state, fence_index, deadline } => {
                let active = self.health.get(&pair.active_cell_id).cloned().unwrap_or_default();
                let acked = active.leader.as_ref().map(|s| s.standby_acked_index).unwrap_or(0);
                if acked >= fence_index {
                    self.job_change_active(&job, &table, &pair, start, None, true);
                } else if now >= deadline {
                    if switchover {
                        // Undone: the active takes writes again.
                        self.configure(pair.active_cell_id, active_state);
                        self.job_ends(false, "the standby did not catch up; the fence was undone");
                    } else {
                        self.job_change_active(&job, &table, &pair, start, Some((fence_index, acked)), true);
                    }
                }
            }
            JobPhase::Promote { old_active, req, deadline } => match self.take_answer(req) {
                Some(Some((index, state))) => {
                    let new_pair = *table::find_pair(&self.table_now(), job.pair_id).expect("the pair");
                    let demoted = coordinator::desired_standby(&new_pair, index);
                    self.configure_with(old_active, demoted, Some(state), 0);
                    self.stats.switchovers += 1;
                    self.job_ends(true, "switchover done");
                }
                Some(None) => self.job_ends(false, "the promotion was refused"),
                None if now >= deadline => self.job_ends(false, "the promotion was not answered in time"),
                None => {}
            },
        }
    }

    /// Commits the change of active and promotes the standby; a forced
    /// failover of a DEGRADED pair records the loss window it reports.
    fn job_change_active(
        &mut self,
        job: &Job,
        table: &RoutingTable,
        pair: &Pair,
        start: Option<FailoverStart>,
        fence: Option<(u64, u64)>,
        fenced: bool,
    ) {
        let switchover = job.kind == FaultKind::Switchover;
        let mode = if switchover { PairMode::Sync } else { PairMode::Degraded };
        // `loss_window` itself says nothing is lost for a fenced active
        // the standby caught up with (no `fence` outcome), and a switchover
        // has no `start`.
        let window = start.as_ref().and_then(|start| coordinator::loss_window(pair, start, fence));
        let what = if switchover { "switchover" } else { "forced failover" };
        let why = window.map(|w| w.describe(table::mode(pair))).unwrap_or_default();
        let record = cellbank_proto::router::AuditRecord {
            who: "operator".into(),
            what: what.into(),
            why: why.clone(),
            ..Default::default()
        };
        if !self.apply_table(coordinator::change_active_command(pair, mode, record)).ok {
            return self.job_ends(false, "the table refused the change of active");
        }
        self.stats.failovers += 1;
        if let Some(window) = window.filter(|_| table::mode(pair) != PairMode::Sync) {
            let (pair_id, cell, epoch) = (pair.pair_id, pair.active_cell_id, pair.epoch);
            self.forfeits.push(Forfeit { pair: pair_id, cell, epoch, window });
        }
        let (cell, desired) = coordinator::promotion(table, pair, mode, fenced);
        let epoch = desired.epoch;
        self.note(|| format!("operator: {what} to cell {cell} at epoch {epoch}; may be lost: {why}"));
        if switchover {
            let req = self.next_ctx;
            self.next_ctx += 1;
            self.configure_with(cell, desired, None, req);
            let deadline = self.now + CONFIGURE_TIMEOUT_MS * 1000;
            let phase = JobPhase::Promote { old_active: pair.active_cell_id, req, deadline };
            self.job = Some(Job { phase, ..job.clone() });
        } else {
            self.configure(cell, desired);
            self.stats.forced_failovers += 1;
            self.job_ends(true, "forced failover done");
        }
    }

    fn take_answer(&mut self, req: u64) -> Option<Option<(u64, PairState)>> {
        let k = self.configure_answers.iter().position(|(r, _)| *r == req)?;
        Some(self.configure_answers.swap_remove(k).1)
    }

    fn job_ends(&mut self, done: bool, why: &str) {
        if !done {
            self.stats.operator_refused += 1;
        }
        self.note(|| format!("operator: {why}"));
        self.job = None;
        self.configure_answers.clear();
    }

    // ---- clients -------------------------------------------------------

    fn client_step(&mut self, c: usize) {
        if self.violation.is_some() {
            return;
        }
        let started = self.now >= 2_000_000;
        if !started {
            return;
        }
        // A request in flight past its attempt deadline is retried.
        if let Some(request) = &self.clients[c].current {
            if self.now < request.sent_at + CLIENT_TIMEOUT_MS * 1000 {
                return;
            }
            let request = request.clone();
            self.send_request(c, request);
            return;
        }
        let op = self.next_op(c);
        let req = self.clients[c].next_req;
        self.clients[c].next_req += 1;
        let request = Request { req, op, sent_at: self.now, attempts: 0, epoch: 0 };
        self.send_request(c, request);
    }

    fn next_op(&mut self, c: usize) -> Op {
        let client = &mut self.clients[c];
        let n = client.done;
        // Each client opens and funds its own users first.
        let own = client.users.clone();
        if n < own.len() as u64 * 2 {
            let user = own[(n / 2) as usize];
            if n.is_multiple_of(2) {
                let command = Command {
                    kind: Some(command::Kind::OpenAccount(OpenAccountCommand {
                        user_id: user,
                        currency: CURRENCY.into(),
                    })),
                };
                return Op::Write { transfer_id: transfer_id_of(&command), command, user };
            }
            let id = format!("fund-{user}").into_bytes();
            let command = Command {
                kind: Some(command::Kind::Move(MoveCommand {
                    transfer_id: id.clone(),
                    kind: TransferKind::Deposit as i32,
                    from_user_id: 0,
                    to_user_id: user,
                    currency: CURRENCY.into(),
                    amount: FUNDING,
                    ..Default::default()
                })),
            };
            return Op::Write { transfer_id: id, command, user };
        }
        let heard: Vec<usize> = self
            .acked
            .iter()
            .enumerate()
            .filter(|(_, a)| a.heard_at <= self.now && !a.transfer_id.starts_with(b"open-"))
            .map(|(k, _)| k)
            .collect();
        if !heard.is_empty() && client.rng.chance(250_000) {
            let k = client.rng.pick(&heard);
            let a = &self.acked[k];
            return Op::Read { transfer_id: a.transfer_id.clone(), expect: a.code, pair: a.pair };
        }
        let from = client.rng.pick(&own);
        let mut to = client.rng.range(1, USERS);
        if to == from {
            to = if to == USERS { 1 } else { to + 1 };
        }
        let amount = client.rng.range(1, 300);
        let id = format!("t{c}-{n}").into_bytes();
        let (source, dest) = (self.user_pair[&from], self.user_pair[&to]);
        let (source_pair_id, dest_pair_id) = if source == dest { (0, 0) } else { (source, dest) };
        if source != dest {
            self.cross_ids.push((id.clone(), source, dest));
        }
        let command = Command {
            kind: Some(command::Kind::Move(MoveCommand {
                transfer_id: id.clone(),
                kind: TransferKind::Transfer as i32,
                from_user_id: from,
                to_user_id: to,
                currency: CURRENCY.into(),
                amount,
                source_pair_id,
                dest_pair_id,
            })),
        };
        Op::Write { transfer_id: id, command, user: from }
    }

    fn send_request(&mut self, c: usize, mut request: Request) {
        request.attempts += 1;
        request.sent_at = self.now;
        // The router catches up with the table now and then (and always
        // before its first request).
        if self.clients[c].table.slice_count == 0 || self.work_rng.chance(300_000) {
            self.clients[c].table = self.table_now();
        }
        let table = self.clients[c].table.clone();
        let pair_id = match &request.op {
            Op::Write { user, .. } => self.user_pair[user],
            Op::Read { pair, .. } => *pair,
        };
        let pair = table::find_pair(&table, pair_id).expect("the pair");
        let route = table::Route { slice: 0, pair_id, cell_id: pair.active_cell_id, epoch: pair.epoch, moving: false };
        let hint = self.clients[c].leader_hint.get(&route.cell_id).copied();
        let rid = match hint {
            Some(rid) if rid != 0 => rid,
            _ => self.work_rng.range(1, REPLICAS),
        };
        let msg = match &request.op {
            Op::Write { command, .. } => Msg::Submit { req: request.req, command: command.clone(), epoch: route.epoch },
            Op::Read { transfer_id, .. } => {
                Msg::Read { req: request.req, transfer_id: transfer_id.clone(), epoch: route.epoch }
            }
        };
        request.epoch = route.epoch;
        self.clients[c].current = Some(request);
        self.send(Addr::Client(c), Addr::Replica(route.cell_id, rid), msg);
        self.schedule(CLIENT_TIMEOUT_MS * 1000 + 1, EventKind::Client(c));
    }

    fn client_reply(&mut self, c: usize, from: Addr, req: u64, outcome: Outcome) {
        let Some(request) = self.clients[c].current.clone().filter(|r| r.req == req) else { return };
        let Addr::Replica(cell, _) = from else { return };
        match outcome {
            Outcome::NotLeader(hint) => {
                self.clients[c].leader_hint.insert(cell, hint);
                self.retry_soon(c);
            }
            Outcome::Retry => {
                self.clients[c].leader_hint.remove(&cell);
                self.retry_soon(c);
            }
            Outcome::Done(result) => {
                if let Op::Write { transfer_id, .. } = &request.op {
                    let now = self.now;
                    let mut this_forfeited = false;
                    if let Some(k) = self
                        .acked
                        .iter()
                        .position(|a| &a.transfer_id == transfer_id && a.code == result.code && a.heard_at == u64::MAX)
                    {
                        self.acked[k].heard_at = now;
                        this_forfeited = self.forfeited(&self.acked[k]);
                    }
                    // A transfer id has one outcome, whichever attempt
                    // (and cell) answers. (Opening an account is not keyed
                    // by an id: a retry hears ACCOUNT_ALREADY_EXISTS.) Not
                    // across a forced failover's loss: either answer may be
                    // one it lost.
                    let first = self.acked.iter().find(|a| &a.transfer_id == transfer_id && a.heard_at != u64::MAX);
                    let forfeited = this_forfeited || first.is_some_and(|a| self.forfeited(a));
                    if let Some(first) = first.filter(|_| !transfer_id.starts_with(b"open-") && !forfeited) {
                        if first.code != result.code {
                            let detail = format!(
                                "{} was answered {} and later {}",
                                String::from_utf8_lossy(transfer_id),
                                first.code,
                                result.code
                            );
                            self.fail("one outcome per transfer", detail);
                        }
                    }
                }
                self.finish(c);
            }
            Outcome::Credits(_) | Outcome::StaleSender(_) => {}
            Outcome::Read(record) => {
                if let Op::Read { transfer_id, expect, .. } = &request.op {
                    let ok = record.as_ref().is_some_and(|r| r.result == *expect);
                    // An old active that a forced failover deposed while it
                    // was unreachable serves its own history to clients that
                    // still route to it, until it learns (the loss the
                    // failover reported: everything after the standby's copy).
                    let split = self.forfeits.iter().any(|f| {
                        f.window.through_index.is_none()
                            && from == Addr::Replica(f.cell, rid_of(from))
                            && request.epoch == f.epoch
                    });
                    if !ok && !split && !self.forfeited_id(transfer_id) {
                        let acks: Vec<String> = self
                            .acked
                            .iter()
                            .filter(|a| &a.transfer_id == transfer_id)
                            .map(|a| {
                                format!(
                                    "cell {} epoch {} index {}{}",
                                    a.cell,
                                    a.epoch,
                                    a.index,
                                    if a.alone { " alone" } else { "" }
                                )
                            })
                            .collect();
                        let detail = format!(
                            "a read of {} that began after its acknowledgement ({}) found {:?} (expected result {}) \
                             at {from:?}",
                            String::from_utf8_lossy(transfer_id),
                            acks.join("; "),
                            record.map(|r| r.result),
                            expect
                        );
                        self.fail("reads see acknowledged writes", detail);
                    }
                    self.stats.reads += 1;
                }
                self.finish(c);
            }
        }
    }

    fn retry_soon(&mut self, c: usize) {
        if let Some(request) = self.clients[c].current.as_mut() {
            // The attempt is over: the next step resends it.
            request.sent_at = self.now.saturating_sub(CLIENT_TIMEOUT_MS * 1000);
        }
        let backoff = self.work_rng.range(5_000, 50_000);
        self.schedule(backoff, EventKind::Client(c));
    }

    fn finish(&mut self, c: usize) {
        let client = &mut self.clients[c];
        client.current = None;
        client.done += 1;
        self.stats.completed += 1;
        let think = self.work_rng.range(5_000, 40_000);
        self.schedule(think, EventKind::Client(c));
    }

    // ---- faults --------------------------------------------------------

    fn inject(&mut self, n: usize, fault: &ScheduledFault) {
        self.note(|| format!("fault #{n}: {}", fault.describe()));
        self.stats.faults += 1;
        // `a`: 0 and 1 the active and standby of pair 1, 2 and 3 of pair 2.
        let table = self.table_now();
        let pair = *table::find_pair(&table, 1 + fault.a / 2).expect("the pair");
        let (active, standby) = (pair.active_cell_id, pair.standby_cell_id);
        let cell_of = |which: u64| if which.is_multiple_of(2) { active } else { standby };
        match fault.kind {
            FaultKind::Crash => {
                let i = replica_index(cell_of(fault.a), fault.b);
                self.crash_replica(i);
                self.schedule(fault.duration_ms * 1000, EventKind::Fault(usize::MAX - n));
            }
            FaultKind::CellCrash => {
                let cell = cell_of(fault.a);
                for rid in 1..=REPLICAS {
                    self.crash_replica(replica_index(cell, rid));
                }
                self.schedule(fault.duration_ms * 1000, EventKind::Fault(usize::MAX - n));
            }
            FaultKind::CellLost => {
                let cell = cell_of(fault.a);
                for rid in 1..=REPLICAS {
                    let i = replica_index(cell, rid);
                    self.crash_replica(i);
                    self.replicas[i].lost = true;
                }
            }
            FaultKind::Partition => {
                // The cell from its peer cell (both ways, or one way), from
                // the coordinator, or one replica from its cell.
                let cell = cell_of(fault.a);
                let peer = peer_of(cell);
                let cuts: Vec<Cut> = match fault.b {
                    0 => vec![
                        Cut { from: Side::Cell(cell), to: Side::Cell(peer) },
                        Cut { from: Side::Cell(peer), to: Side::Cell(cell) },
                    ],
                    1 => vec![Cut { from: Side::Cell(cell), to: Side::Cell(peer) }],
                    2 => vec![Cut { from: Side::Cell(peer), to: Side::Cell(cell) }],
                    3 => vec![
                        Cut { from: Side::Cell(cell), to: Side::Coordinator },
                        Cut { from: Side::Coordinator, to: Side::Cell(cell) },
                        Cut { from: Side::Cell(cell), to: Side::Router },
                        Cut { from: Side::Router, to: Side::Cell(cell) },
                        Cut { from: Side::Cell(cell), to: Side::Clients },
                        Cut { from: Side::Clients, to: Side::Cell(cell) },
                    ],
                    4 => vec![
                        Cut { from: Side::Cell(cell), to: Side::Coordinator },
                        Cut { from: Side::Coordinator, to: Side::Cell(cell) },
                    ],
                    _ => {
                        let rid = fault.b - 4;
                        vec![
                            Cut { from: Side::Replica(cell, rid), to: Side::Cell(cell) },
                            Cut { from: Side::Cell(cell), to: Side::Replica(cell, rid) },
                        ]
                    }
                };
                for cut in cuts {
                    self.cuts.push((n, cut));
                }
                self.schedule(fault.duration_ms * 1000, EventKind::Fault(usize::MAX - n));
            }
            FaultKind::Pause => {
                let i = replica_index(cell_of(fault.a), fault.b);
                self.replicas[i].paused_until = self.now + fault.duration_ms * 1000;
            }
            FaultKind::SlowDisk => {
                let i = replica_index(cell_of(fault.a), fault.b);
                self.replicas[i].disk_ms = 5 + fault.duration_ms % 200;
                self.schedule(fault.duration_ms * 1000, EventKind::Fault(usize::MAX - n));
            }
            FaultKind::CoordinatorRestart => {
                // A new coordinator: a new term, and no memory of the cells
                // (it gives each a full window). An operator's action dies
                // with the old one.
                if self.job.take().is_some() {
                    self.stats.operator_refused += 1;
                    self.configure_answers.clear();
                }
                self.coordinator_term += 1;
                let now = self.instant();
                for health in self.health.values_mut() {
                    *health = CellHealth { leader_seen: Some(now), ..Default::default() };
                }
            }
            FaultKind::Switchover | FaultKind::ForcedFailover => {
                // The action waits for the coordinator's lock in
                // production; here a second one while one runs is refused.
                if self.job.is_some() {
                    self.stats.operator_refused += 1;
                } else {
                    self.job = Some(Job { kind: fault.kind, pair_id: pair.pair_id, phase: JobPhase::Look });
                }
            }
            FaultKind::Network | FaultKind::ClockSkew => {}
        }
    }

    /// The end of fault `n`.
    pub fn recover(&mut self, n: usize) {
        let fault = self.plan.faults[n].clone();
        self.note(|| format!("fault #{n} ends"));
        match fault.kind {
            FaultKind::Crash | FaultKind::CellCrash | FaultKind::SlowDisk => {
                for i in 0..self.replicas.len() {
                    let r = &mut self.replicas[i];
                    r.disk_ms = 0;
                    if !r.up && !r.lost {
                        let (cell, rid) = (r.cell, r.rid);
                        self.note(|| format!("restart c{cell}r{rid}"));
                        self.start_replica(i);
                    }
                }
            }
            FaultKind::Partition => self.cuts.retain(|(k, _)| *k != n),
            _ => {}
        }
    }

    fn heal(&mut self) {
        self.note(|| "heal: every fault ends".to_string());
        self.healed = true;
        self.cuts.clear();
        self.loss_per_million = 0;
        self.dup_per_million = 0;
        for i in 0..self.replicas.len() {
            self.replicas[i].disk_ms = 0;
            self.replicas[i].paused_until = self.replicas[i].paused_until.min(self.now);
            if !self.replicas[i].up && !self.replicas[i].lost {
                self.start_replica(i);
            }
        }
    }

    // ---- final checks --------------------------------------------------

    /// After the quiet period: the serving cell holds every acknowledged
    /// write, its replicas agree, and the money adds up.
    pub fn final_checks(&mut self) {
        if self.violation.is_some() {
            return;
        }
        let table = self.table_now();
        let currency = ledger::Currency::parse(CURRENCY).expect("currency");
        // Per pair: the replica of the serving cell that applied the most.
        let mut serving: BTreeMap<u64, usize> = BTreeMap::new();
        for (pair_id, _, _) in PAIRS {
            let pair = *table::find_pair(&table, pair_id).expect("the pair");
            let cell = pair.active_cell_id;
            let best = (1..=REPLICAS)
                .map(|rid| replica_index(cell, rid))
                .filter(|i| !self.replicas[*i].lost)
                .max_by_key(|i| self.replicas[*i].applied);
            let Some(best) = best else {
                self.stats.serving_lost = true;
                continue;
            };
            serving.insert(pair_id, best);
            let kv = &self.replicas[best].kv;
            let (forfeited, missing): (Vec<&Acked>, Vec<&Acked>) =
                self.acked.iter().filter(|a| a.pair == pair_id && !holds(kv, a)).partition(|a| self.forfeited(a));
            let missing: Vec<String> =
                missing.iter().map(|a| String::from_utf8_lossy(&a.transfer_id).into_owned()).collect();
            self.stats.forfeited += forfeited.len() as u64;
            if !missing.is_empty() {
                let detail = format!(
                    "cell {cell} (serving pair {pair_id} at epoch {}) lacks {} acknowledged write(s): {}",
                    pair.epoch,
                    missing.len(),
                    missing.join(", ")
                );
                return self.fail("acknowledged writes survive failover", detail);
            }
            let digest = ledger::digest(kv.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
            for (c, sum) in &digest.balance_sum_by_currency {
                if *sum != 0 {
                    return self.fail("balances sum to zero", format!("{c} sums to {sum} on cell {cell}"));
                }
            }
        }
        // Replicas of one cell at the same index hold the same ledger.
        for cell in CELLS {
            let mut seen: HashMap<u64, String> = HashMap::new();
            for rid in 1..=REPLICAS {
                let r = &self.replicas[replica_index(cell, rid)];
                if r.lost {
                    continue;
                }
                let d = ledger::digest(r.kv.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))).digest_hex;
                if let Some(other) = seen.insert(r.applied, d.clone()) {
                    if other != d {
                        return self.fail(
                            "replicas agree",
                            format!("cell {cell}: two replicas at index {} hold different ledgers", r.applied),
                        );
                    }
                }
            }
        }
        self.stats.acked += self.acked.len() as u64;
        if serving.len() < PAIRS.len() {
            // A pair has no serving cell (its cells lost): money between
            // the pairs cannot be checked end to end.
            return;
        }
        // Credits: every outbox delivered within the quiet period, each
        // credit applied once and only with its debit, the clearing
        // accounts of the two pairs cancel, and users hold the deposits.
        let kv_of = |pair_id: u64| &self.replicas[serving[&pair_id]].kv;
        // Money in flight: outbox entries the destination has not credited.
        let mut in_flight: i128 = 0;
        for (pair_id, _, _) in PAIRS {
            let best = serving[&pair_id];
            let now_ms = self.local_ms(best) + 1_700_000_000_000;
            let pending: Vec<OutboxEntry> = kv_of(pair_id)
                .range(keys::OUTBOX_PREFIX.to_vec()..)
                .take_while(|(k, _)| k.starts_with(keys::OUTBOX_PREFIX))
                .map(|(_, v)| OutboxEntry::decode(v.as_slice()).expect("outbox entries decode"))
                .collect();
            for entry in &pending {
                let credit = entry.credit.clone().unwrap_or_default();
                let age_ms = now_ms.saturating_sub(entry.created_at_ms);
                // Clocks may drift apart by up to 10% of the run (rates
                // within 5%): the bound allows for it.
                let bound =
                    if self.skewed { CREDIT_DELAY_MAX_MS + (self.now / 1000) / 10 } else { CREDIT_DELAY_MAX_MS };
                if age_ms > bound {
                    let detail = format!(
                        "pair {pair_id}'s credit {} (seq {}) is still in transit {age_ms} ms after its debit, every \
                         fault healed {} s before the end",
                        String::from_utf8_lossy(&credit.transfer_id),
                        entry.seq,
                        self.plan.quiet_ms / 1000
                    );
                    return self.fail("credits are delivered once a serving cell exists", detail);
                }
                let credited = ledger::read_record(kv_of(credit.dest_pair_id), &keys::inbox(pair_id, entry.seq))
                    .is_some_and(|r| r.result == ResultCode::Ok as i32);
                if !credited {
                    in_flight += credit.amount as i128;
                }
            }
        }
        // Credits a forced failover's loss window allows: applied at the
        // destination with no surviving debit (passed on only by routers that
        // did not know of the failover), and answered by a cell whose copy
        // was lost.
        let mut orphaned: i128 = 0;
        let mut lost: i128 = 0;
        let mut credited_ids: BTreeMap<(u64, u64), std::collections::HashSet<Vec<u8>>> = BTreeMap::new();
        for (dest, _, _) in PAIRS {
            for (source, _, _) in PAIRS {
                if source == dest {
                    continue;
                }
                let prefix = keys::inbox_prefix(source);
                let mut seen_ids = std::collections::HashSet::new();
                for (key, value) in kv_of(dest).range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix)) {
                    let record = TransferRecord::decode(value.as_slice()).expect("inbox records decode");
                    if record.result != ResultCode::Ok as i32 {
                        continue;
                    }
                    let seq = u64::from_be_bytes(key[prefix.len()..].try_into().expect("inbox keys end in a seq"));
                    let id = String::from_utf8_lossy(&record.transfer_id).into_owned();
                    if !seen_ids.insert(record.transfer_id.clone()) {
                        return self
                            .fail("a credit applies at most once", format!("{id} was credited twice on pair {dest}"));
                    }
                    let credit = InboxCredit {
                        seq,
                        kind: record.kind,
                        transfer_id: record.transfer_id.clone(),
                        to_user_id: record.to_user_id,
                        currency: record.currency.clone(),
                        amount: record.amount,
                        ..Default::default()
                    };
                    if !ledger::clearing::holds_debit(kv_of(source), &credit) {
                        let origin = ledger::clearing::read_inbox_origin(kv_of(dest), source, seq);
                        // Allowed only if no router that passed it on knew the
                        // sender had been deposed.
                        let routed = origin
                            .and_then(|(epoch, index)| self.routed.get(&(source, seq, epoch, index)).copied())
                            .unwrap_or(u64::MAX);
                        let allowed = origin.is_some_and(|(epoch, index)| {
                            routed <= epoch && self.forfeits.iter().any(|f| f.covers(source, f.cell, epoch, index))
                        });
                        if !allowed {
                            let detail = format!(
                                "pair {dest} credited {id} (seq {seq}, created at epoch and index {origin:?}; a router \
                                 that passed it on knew epoch {routed}) but pair {source} holds no debit for it"
                            );
                            return self.fail("a credit has a surviving debit", detail);
                        }
                        orphaned += record.amount as i128;
                        self.stats.forfeited += 1;
                    }
                }
                credited_ids.insert((dest, source), seen_ids);
            }
        }
        // Every credit a destination answered (its source settled it
        // CREDITED) is in the destination's serving cell.
        for (id, source, dest) in &self.cross_ids {
            let credited = ledger::read_transfer(kv_of(*source), id)
                .is_some_and(|r| r.settlement == cellbank_proto::v1::Settlement::Credited as i32);
            if !credited || credited_ids.get(&(*dest, *source)).is_some_and(|ids| ids.contains(id)) {
                continue;
            }
            let applies = self.credit_applies.get(id).cloned().unwrap_or_default();
            let allowed = applies
                .iter()
                .any(|(cell, epoch, index)| self.forfeits.iter().any(|f| f.covers(*dest, *cell, *epoch, *index)));
            if !allowed {
                let detail = format!(
                    "pair {source} settled {} as credited, but pair {dest}'s serving cell holds no credit for it \
                     (applied at {applies:?})",
                    String::from_utf8_lossy(id)
                );
                return self.fail("answered credits survive failover", detail);
            }
            let amount = ledger::read_transfer(kv_of(*source), id).map(|r| r.amount).unwrap_or(0);
            lost += amount as i128;
            self.stats.forfeited += 1;
        }
        let clearing: i128 = PAIRS
            .iter()
            .map(|(pair_id, _, _)| {
                let peer = PAIRS.iter().map(|(p, _, _)| *p).find(|p| p != pair_id).expect("two pairs");
                ledger::read_account(kv_of(*pair_id), &ledger::AccountId::clearing(peer, currency))
                    .map(|a| a.balance)
                    .unwrap_or(0)
            })
            .sum();
        if clearing + orphaned - lost != in_flight {
            let detail = format!(
                "the pairs' clearing accounts sum to {clearing}, the money in flight is {in_flight} (credits without \
                 a debit a forced failover allowed: {orphaned}; answered credits it lost: {lost})"
            );
            return self.fail("clearing accounts equal the money in flight", detail);
        }
        let mut users: i128 = 0;
        let mut deposits: i128 = 0;
        for u in 1..=USERS {
            let kv = kv_of(self.pair_of_user(u));
            users += ledger::get_user_account(kv, u, currency).map(|a| a.balance).unwrap_or(0);
            if ledger::read_transfer(kv, format!("fund-{u}").as_bytes())
                .is_some_and(|r| r.result == ResultCode::Ok as i32)
            {
                deposits += FUNDING as i128;
            }
        }
        if users + in_flight != deposits + orphaned - lost {
            let detail = format!(
                "users hold {users} across both pairs and {in_flight} is in flight; deposits were {deposits} (credits \
                 without a debit a forced failover allowed: {orphaned}; answered credits it lost: {lost})"
            );
            self.fail("money is conserved", detail);
        }
    }

    fn pair_of_user(&self, user: u64) -> u64 {
        table::route(&self.table_now(), user).expect("the table routes every user").pair_id
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

/// True when `kv` holds the acknowledged write with the outcome heard.
fn holds(kv: &BTreeMap<Vec<u8>, Vec<u8>>, acked: &Acked) -> bool {
    if let Some(user) = acked.transfer_id.strip_prefix(b"open-") {
        let user: u64 = String::from_utf8_lossy(user).parse().unwrap_or(0);
        return ledger::get_user_account(kv, user, ledger::Currency::parse(CURRENCY).expect("currency")).is_some();
    }
    ledger::read_transfer(kv as &dyn Kv, &acked.transfer_id).is_some_and(|r| r.result == acked.code)
}

/// Which fault a recovery event belongs to.
pub fn recovery_of(kind: usize) -> Option<usize> {
    (kind > usize::MAX / 2).then(|| usize::MAX - kind)
}

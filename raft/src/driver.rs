//! The one thread that owns a [`RaftNode`]: it ticks the node every
//! [`TICK`], drains a bounded input queue, folds every proposal that arrived
//! while the previous Ready was being persisted into one entry, and hands
//! outgoing messages to the transport. Batching comes from this loop: while
//! one fsync runs, the next batch accumulates.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TryRecvError, TrySendError};
use raft::eraftpb::{ConfChange, Message};

use super::node::{Membership, NodeStatus, ProposeError, RaftNode, Responder};
use super::StateMachine;

/// The Raft tick; with `election_tick = 10` an election starts 1-2 s after
/// the leader goes silent.
pub const TICK: Duration = Duration::from_millis(100);
/// Inputs waiting for the node thread; beyond this, callers hear "overloaded".
pub const INPUT_QUEUE_MAX: usize = 65_536;
/// Peer messages waiting for the node thread; beyond this they are dropped
/// (raft retransmits).
pub const RAFT_QUEUE_MAX: usize = 65_536;
/// Peer messages handled per loop round.
pub const RAFT_MESSAGES_PER_ROUND_MAX: usize = 65_536;
/// Inputs handled per loop round before the node persists and applies.
pub const INPUTS_PER_ROUND_MAX: usize = 16_384;
/// Ticks made up in one round after the loop was held up.
const TICKS_CATCH_UP_MAX: usize = 5;
/// Ready rounds per loop iteration.
const READY_ROUNDS_MAX: usize = 8;

pub enum Input<SM: StateMachine> {
    Raft(Box<Message>),
    Propose(Vec<SM::Command>, Responder<Vec<SM::Output>>),
    Read(Responder<u64>),
    ConfChange(ConfChange, Responder<Membership>),
    TransferLeader(u64),
    Unreachable(u64),
    SnapshotReport { replica_id: u64, delivered: bool },
    Status(Box<dyn FnOnce(NodeStatus) + Send>),
    Campaign,
    Shutdown,
}

/// Where the node's outgoing messages go.
pub trait MessageSink: Send + Sync + 'static {
    fn send(&self, messages: Vec<Message>);
    /// Called whenever the applied address book changes.
    fn set_peers(&self, peers: &BTreeMap<u64, String>);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeError {
    Propose(ProposeError),
    /// The input queue is full; retry later.
    Overloaded,
    /// The node thread has stopped.
    Stopped,
}

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeError::Propose(e) => e.fmt(f),
            NodeError::Overloaded => write!(f, "replica overloaded: input queue full"),
            NodeError::Stopped => write!(f, "replica is stopping"),
        }
    }
}

/// What other threads may read without asking the node thread.
pub struct Shared {
    pub leader_id: AtomicU64,
    pub is_leader: AtomicBool,
    /// The term this replica leads in; 0 while it does not lead. Authority
    /// earned in one term (see `replication.rs`) is void in any other.
    pub leader_term: AtomicU64,
    pub applied_index: AtomicU64,
    /// The applied index, for tasks that wait for it to move.
    pub applied: tokio::sync::watch::Sender<u64>,
    pub peers: RwLock<BTreeMap<u64, String>>,
    /// Log entries from this index on are kept for the standby shipper (0: none).
    pub retain_floor: AtomicU64,
    /// The highest leader's commit index this replica has heard of (see
    /// `RaftNode::leader_commit_seen`).
    pub leader_commit_seen: AtomicU64,
}

impl Shared {
    /// Whether this member can serve: it knows a leader, and (a follower)
    /// has applied all but `lag_max` entries of the leader's commit index
    /// it has heard of. A replica that is restarting, cut off from its
    /// leader (it stops knowing one once its election timer fires) or far
    /// behind is not ready; a leader is.
    pub fn readiness(&self, lag_max: u64) -> Result<(), String> {
        let leader = self.leader_id.load(Ordering::Relaxed);
        if leader == 0 {
            return Err("no known leader".into());
        }
        if self.is_leader.load(Ordering::Relaxed) {
            return Ok(());
        }
        let applied = self.applied_index.load(Ordering::Relaxed);
        let commit = self.leader_commit_seen.load(Ordering::Relaxed);
        if commit > applied.saturating_add(lag_max) {
            return Err(format!(
                "behind leader {leader}: applied index {applied}, the leader's commit index {commit} (more than {lag_max} entries)"
            ));
        }
        Ok(())
    }
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            leader_id: AtomicU64::new(0),
            is_leader: AtomicBool::new(false),
            leader_term: AtomicU64::new(0),
            applied_index: AtomicU64::new(0),
            applied: tokio::sync::watch::Sender::new(0),
            peers: RwLock::new(BTreeMap::new()),
            retain_floor: AtomicU64::new(0),
            leader_commit_seen: AtomicU64::new(0),
        }
    }
}

/// Where the outputs of queued commands arrive.
pub type OutputsReceiver<SM> = tokio::sync::oneshot::Receiver<Result<Vec<<SM as StateMachine>::Output>, ProposeError>>;

pub struct DriverHandle<SM: StateMachine> {
    tx: Sender<Input<SM>>,
    /// Messages from peers, on their own queue (see [`Queues`]).
    raft_tx: Sender<Input<SM>>,
    /// Delivery reports from the transport: never dropped (raft waits for
    /// the outcome of every snapshot it sends), drained every round.
    reports_tx: Sender<Input<SM>>,
    pub shared: Arc<Shared>,
}

impl<SM: StateMachine> Clone for DriverHandle<SM> {
    fn clone(&self) -> Self {
        DriverHandle {
            tx: self.tx.clone(),
            raft_tx: self.raft_tx.clone(),
            reports_tx: self.reports_tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<SM: StateMachine> DriverHandle<SM> {
    pub fn send(&self, input: Input<SM>) -> Result<(), NodeError> {
        let queue = if matches!(input, Input::Raft(_)) { &self.raft_tx } else { &self.tx };
        match queue.try_send(input) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(NodeError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(NodeError::Stopped),
        }
    }

    async fn ask<T: Send + 'static>(&self, make: impl FnOnce(Responder<T>) -> Input<SM>) -> Result<T, NodeError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(make(Box::new(move |result| {
            let _ = tx.send(result);
        })))?;
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(NodeError::Propose(e)),
            Err(_) => Err(NodeError::Stopped),
        }
    }

    /// Proposes commands; resolves with one output per command once applied.
    pub async fn propose(&self, commands: Vec<SM::Command>) -> Result<Vec<SM::Output>, NodeError> {
        self.ask(|waiter| Input::Propose(commands, waiter)).await
    }

    /// Queues commands for proposal now (so that calls made in order are
    /// proposed in order) and returns the receiver of their outputs.
    pub fn propose_queued(&self, commands: Vec<SM::Command>) -> Result<OutputsReceiver<SM>, NodeError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Input::Propose(
            commands,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        ))?;
        Ok(rx)
    }

    /// A linearizable read barrier: resolves once this replica (the leader)
    /// has applied everything committed before the call.
    pub async fn read_index(&self) -> Result<u64, NodeError> {
        self.ask(Input::Read).await
    }

    pub async fn conf_change(&self, change: ConfChange) -> Result<Membership, NodeError> {
        self.ask(|waiter| Input::ConfChange(change, waiter)).await
    }

    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Input::Status(Box::new(move |status| {
            let _ = tx.send(status);
        })))?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Sends a transport report on the lossless channel.
    pub fn report(&self, input: Input<SM>) {
        let _ = self.reports_tx.send(input);
    }

    pub fn shutdown(&self) {
        let _ = self.tx.send(Input::Shutdown);
    }
}

/// Entry timestamps: the wall clock, as moved by a drill's `clock` fault.
fn now_ms() -> u64 {
    crate::faults::wall_ms()
}

/// Starts the node thread. Returns the handle and the thread's join handle.
pub fn spawn<SM: StateMachine>(
    node: RaftNode<SM>,
    sink: Arc<dyn MessageSink>,
) -> (DriverHandle<SM>, std::thread::JoinHandle<()>) {
    let (tx, rx) = bounded(INPUT_QUEUE_MAX);
    let (raft_tx, raft_rx) = bounded(RAFT_QUEUE_MAX);
    let (reports_tx, reports_rx) = crossbeam_channel::unbounded();
    let shared = Arc::new(Shared::default());
    let handle = DriverHandle { tx, raft_tx, reports_tx, shared: shared.clone() };
    let queues = Queues { reports: reports_rx, raft: raft_rx, rest: rx };
    let name = format!("raft-{}", node.replica_id());
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || run(node, queues, sink, shared))
        .expect("spawn raft thread");
    (handle, thread)
}

/// The three input queues, by priority: transport reports (lossless), peer
/// messages (so that acknowledgements never wait behind client proposals:
/// an overloaded leader must still see its quorum), then everything else.
struct Queues<SM: StateMachine> {
    reports: Receiver<Input<SM>>,
    raft: Receiver<Input<SM>>,
    rest: Receiver<Input<SM>>,
}

/// Handles inputs until the round is full or the queues are empty; returns
/// false on shutdown or when the handles are gone.
fn drain<SM: StateMachine>(node: &mut RaftNode<SM>, queues: &Queues<SM>) -> bool {
    while let Ok(report) = queues.reports.try_recv() {
        handle_input(node, report);
    }
    for _ in 0..RAFT_MESSAGES_PER_ROUND_MAX {
        match queues.raft.try_recv() {
            Ok(input) => {
                handle_input(node, input);
            }
            Err(_) => break,
        }
    }
    for _ in 0..INPUTS_PER_ROUND_MAX {
        match queues.rest.try_recv() {
            Ok(input) => {
                if !handle_input(node, input) {
                    return false;
                }
            }
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Disconnected) => return false,
        }
    }
    true
}

fn run<SM: StateMachine>(mut node: RaftNode<SM>, queues: Queues<SM>, sink: Arc<dyn MessageSink>, shared: Arc<Shared>) {
    sink.set_peers(node.peers());
    *shared.peers.write().expect("peers lock") = node.peers().clone();
    let mut known_peers = node.peers().clone();
    let mut next_tick = Instant::now() + TICK;
    loop {
        let timeout = next_tick.saturating_duration_since(Instant::now());
        // Wait for any input or the next tick; the drain below handles it.
        crossbeam_channel::select! {
            recv(queues.reports) -> input => if let Ok(input) = input { handle_input(&mut node, input); },
            recv(queues.raft) -> input => if let Ok(input) = input { handle_input(&mut node, input); },
            recv(queues.rest) -> input => match input {
                Ok(input) => if !handle_input(&mut node, input) { break },
                Err(_) => break,
            },
            default(timeout) => {},
        }
        if !drain(&mut node, &queues) {
            break;
        }
        // Logical time follows the wall clock: ticks missed while the loop
        // was busy are made up (a few at most, then time is re-anchored).
        let now = Instant::now();
        let mut ticks = 0;
        while now >= next_tick && ticks < TICKS_CATCH_UP_MAX {
            node.tick();
            next_tick += TICK;
            ticks += 1;
        }
        if now >= next_tick {
            next_tick = now + TICK;
        }
        node.set_retain_floor(shared.retain_floor.load(Ordering::Relaxed));
        // Before the round's (maybe slow) persist: how far behind this
        // replica now knows it is shows while it catches up.
        shared.leader_commit_seen.store(node.leader_commit_seen(), Ordering::Relaxed);
        node.flush_proposals(now_ms());
        node.flush_reads();
        for _ in 0..READY_ROUNDS_MAX {
            if !node.has_ready() {
                break;
            }
            node.handle_ready(&mut |messages| sink.send(messages));
        }
        shared.leader_id.store(node.leader_id(), Ordering::Relaxed);
        // The term first: a reader that sees is_leader sees this term or a later one.
        shared.leader_term.store(if node.is_leader() { node.term() } else { 0 }, Ordering::Relaxed);
        shared.is_leader.store(node.is_leader(), Ordering::Relaxed);
        shared.applied_index.store(node.applied_index(), Ordering::Relaxed);
        let applied = node.applied_index();
        shared.applied.send_if_modified(|value| {
            let changed = *value != applied;
            *value = applied;
            changed
        });
        if node.peers() != &known_peers {
            known_peers = node.peers().clone();
            sink.set_peers(&known_peers);
            *shared.peers.write().expect("peers lock") = known_peers.clone();
        }
    }
    tracing::info!(replica = node.replica_id(), "raft thread stopped");
}

/// Returns false on shutdown.
fn handle_input<SM: StateMachine>(node: &mut RaftNode<SM>, input: Input<SM>) -> bool {
    match input {
        Input::Raft(message) => {
            if let Err(err) = node.step(*message) {
                tracing::debug!(replica = node.replica_id(), "refused a raft message: {err}");
            }
        }
        Input::Propose(commands, waiter) => node.submit(commands, waiter),
        Input::Read(waiter) => node.read(waiter),
        Input::ConfChange(change, waiter) => node.propose_conf_change(change, waiter),
        Input::TransferLeader(replica_id) => node.transfer_leader(replica_id),
        Input::Unreachable(replica_id) => node.report_unreachable(replica_id),
        Input::SnapshotReport { replica_id, delivered } => node.report_snapshot(replica_id, delivered),
        Input::Status(reply) => reply(node.status()),
        Input::Campaign => node.campaign(),
        Input::Shutdown => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ready means: a leader is known, and a follower has applied all but
    /// the bound of the leader's commit index it heard of.
    #[test]
    fn a_replica_is_ready_with_a_leader_and_not_too_far_behind_it() {
        let shared = Shared::default();
        assert_eq!(shared.readiness(10), Err("no known leader".to_string()));
        shared.leader_id.store(2, Ordering::Relaxed);
        shared.leader_commit_seen.store(500, Ordering::Relaxed);
        shared.applied_index.store(489, Ordering::Relaxed);
        let behind = shared.readiness(10).unwrap_err();
        assert!(behind.starts_with("behind leader 2: applied index 489, the leader's commit index 500"), "{behind}");
        shared.applied_index.store(490, Ordering::Relaxed);
        assert_eq!(shared.readiness(10), Ok(()));
        // A leader is ready however its followers stand.
        shared.applied_index.store(1, Ordering::Relaxed);
        shared.is_leader.store(true, Ordering::Relaxed);
        assert_eq!(shared.readiness(10), Ok(()));
        // Cut off: the election timer fired and no leader is known.
        shared.is_leader.store(false, Ordering::Relaxed);
        shared.leader_id.store(0, Ordering::Relaxed);
        assert!(shared.readiness(10).is_err());
    }
}

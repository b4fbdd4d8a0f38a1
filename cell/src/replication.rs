//! Standby replication: the active cell's leader ships its committed
//! entries, in order, to the standby cell's leader; the standby proposes
//! them into its own log and acknowledges the source index it has
//! committed. In sync mode a client hears of a write (or a read) only once
//! the standby holds its entry.
//!
//! Invariants:
//! - Only the leader of an ACTIVE (or FENCED) cell ships, and only entries it has
//!   applied (so committed); it reads them from its own log.
//! - The stream starts with a hello; the standby answers with the source
//!   index it holds after a read barrier, so the shipper resumes right after
//!   it: no gap, and nothing is applied twice (the standby's apply skips any
//!   entry at or below its source index and refuses a gap).
//! - A standby that holds nothing usable (new, rebuilding, or behind the
//!   active's compacted log) is rebuilt from a snapshot of the active's
//!   ledger, shipped in chunks that are commands in the standby's log.
//! - A standby that was promoted (or moved to a later epoch) refuses the
//!   stream with FAILED_PRECONDITION and its epoch: the old active is then
//!   deposed and acknowledges nothing more, and records its deposition in
//!   its own log (a `Depose` command) so that no restart forgets it.
//! - The acknowledged watermark only grows within one pair configuration.
//!
//! The acknowledgement rule ([`judge`]): a client write, a read, a credit
//! the courier sends and a credit `ApplyCredits` answers for are released
//! only on positive evidence. The waiter for entry `i` takes the pair state
//! `i` applied under (its ticket, from the ledger's pair history). A SYNC
//! ticket (epoch E, standby S) is released when the standby acknowledged
//! `i` in a session at epoch E with standby S, or when the cell was
//! explicitly degraded to ASYNC at epoch E with standby S. Any other change
//! (another epoch, a demotion, another or no standby, a deposition) fails
//! the waiter: the outcome is unknown and the client retries with the same
//! id. A demotion is never a degradation.
//!
//! Authority ([`Replication::has_authority`]): a replica that becomes leader
//! (a restart, an election) serves nothing for a paired cell until its
//! standby has answered the stream's hello at the cell's epoch in this
//! term, or the coordinator has stamped it with a configure in this term.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellbank_client::channel::{self, ChannelSettings};
use cellbank_client::retry;
use cellbank_proto::cell::standby_client::StandbyClient;
use cellbank_proto::cell::{
    ship_batch, PairRole, PairState, ShipAck, ShipBatch, ShipHello, SourceEntries, SourceSnapshotChunk,
};
use protobuf::Message as _;
use raft::eraftpb::{Entry, EntryType};
use rocksdb::DB;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;
use tonic::Status;

use crate::ledger::{pair, Ledger, PairHistory, PairView};
use cellbank_raft::driver::DriverHandle;
use cellbank_raft::storage::{log_key, read_u64, APPLIED_INDEX_KEY};

/// Source entries in one shipped batch, and their bytes.
pub const SHIP_BATCH_ENTRIES_MAX: usize = 512;
pub const SHIP_BATCH_BYTES_MAX: usize = 1024 * 1024;
/// Batches sent and not yet acknowledged.
pub const SHIP_IN_FLIGHT_MAX: usize = 16;
/// Bytes of ledger per snapshot chunk.
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 1024 * 1024;
/// Largest shipped message (a batch or a chunk, with framing).
pub const SHIP_MESSAGE_BYTES_MAX: usize = 4 * SHIP_BATCH_BYTES_MAX;
/// How long the shipper waits before it tries again after a failure.
const SHIP_RETRY_DELAY: Duration = Duration::from_millis(50);
/// No ack for this long ends the stream (the standby lost its leader).
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// An idle stream sends a keepalive this often.
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(100);
/// In sync mode a read is served only if the standby confirmed, within this
/// long before, that it still is this cell's standby (it was not promoted).
pub const READ_LEASE: Duration = Duration::from_millis(300);
pub use cellbank_client::pair::PROMOTION_SETTLE;

/// What the active cell's leader knows about its standby.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShipState {
    /// The pair epoch and the standby cell this watermark belongs to.
    pub epoch: u64,
    pub standby_cell_id: u64,
    /// The standby holds the source log up to here.
    pub acked_index: u64,
    /// Set when the standby refused the stream because it moved to a later
    /// epoch (promoted): this cell must acknowledge nothing more.
    pub deposed_by_epoch: u64,
    /// When the newest message the standby has acknowledged was sent: the
    /// standby was this cell's standby then (the read lease starts there).
    pub confirmed_at: Option<Instant>,
}

/// Applied indexes remembered for the lag in milliseconds; past this the
/// oldest stays and newer ones are not recorded (the lag only grows).
const LAG_SAMPLES_MAX: usize = 65_536;

/// Shared between the shipper task and the request path.
pub struct Replication {
    pub state: watch::Sender<ShipState>,
    /// (applied index, when it was first seen applied) of entries the
    /// standby has not acknowledged, oldest first.
    unacked: Mutex<VecDeque<(u64, Instant)>>,
    /// Which pair state each index applied under (kept by the ledger).
    history: PairHistory,
    /// The leader term in which this replica last earned authority (0: never).
    authority_term: AtomicU64,
}

impl Default for Replication {
    fn default() -> Self {
        Replication::new(PairHistory::default())
    }
}

/// What the acknowledgement rule says of a waiter right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Release,
    Wait,
    /// The outcome is unknown to the client: retry with the same id.
    Fail(WaitFailure),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitFailure {
    /// The pair history does not reach back to the entry.
    NoTicket,
    /// The cell learnt its pair moved to this epoch.
    Deposed(u64),
    /// The cell is at another epoch than the entry applied under.
    EpochChanged { from: u64, to: u64 },
    /// The cell no longer is the pair's active (demoted, or never was).
    NotActive,
    /// The cell's standby changed (or was removed) at the same epoch.
    StandbyChanged { from: u64, to: u64 },
}

impl WaitFailure {
    /// UNAVAILABLE (retryable), with the epoch the cell now knows of.
    pub fn status(&self, index: u64, current_epoch: u64) -> Status {
        let why = match self {
            WaitFailure::NoTicket => format!("no record of the pair configuration entry {index} applied under"),
            WaitFailure::Deposed(epoch) => format!("this cell was deposed: its pair moved to epoch {epoch}"),
            WaitFailure::EpochChanged { from, to } => {
                format!("the pair moved from epoch {from} to epoch {to} while entry {index} waited for the standby")
            }
            WaitFailure::NotActive => format!("this cell stopped being the pair's active while entry {index} waited"),
            WaitFailure::StandbyChanged { from, to } => {
                format!("the standby changed from cell {from} to cell {to} while entry {index} waited")
            }
        };
        let epoch = match self {
            WaitFailure::Deposed(epoch) => (*epoch).max(current_epoch),
            _ => current_epoch,
        };
        cellbank_client::errors::with_epoch(
            Status::unavailable(format!("{why}; the outcome is unknown: retry with the same transfer_id")),
            epoch,
        )
    }
}

/// The acknowledgement rule, as a pure function of what a waiter for entry
/// `index` knows: the pair state the entry applied under (`ticket`), the
/// pair state now, and the shipper's state. `read`: a read, which also needs
/// `lease_fresh` (a standby confirmation within [`READ_LEASE`]) and is
/// never released on evidence alone once the configuration changed.
/// `skip_ack`: the drills' `standby.ack` fault (writes only).
pub fn judge(
    ticket: &PairState,
    current: &PairState,
    ship: &ShipState,
    index: u64,
    read: bool,
    lease_fresh: bool,
    skip_ack: bool,
) -> Verdict {
    use cellbank_proto::cell::{PairRole, ReplicationMode};
    // A cell that never had a pair answers alone.
    if pair::role(ticket) == PairRole::Unpaired && ticket.epoch == 0 {
        return Verdict::Release;
    }
    if cellbank_raft::mutation::active(cellbank_raft::mutation::Mutation::EarlyRelease)
        && !pair::waits_for_standby(current)
    {
        return Verdict::Release;
    }
    let ticket_sync = pair::waits_for_standby(ticket);
    let needed =
        if cellbank_raft::mutation::active(cellbank_raft::mutation::Mutation::AckOffByOne) { index - 1 } else { index };
    // Positive evidence for a write: the standby acknowledged the entry at
    // the ticket's epoch and standby, so it holds it whatever happened since
    // (a standby promoted later holds everything it acknowledged).
    let acknowledged = ticket_sync
        && ship.epoch == ticket.epoch
        && ship.standby_cell_id == ticket.standby_cell_id
        && ship.acked_index >= needed;
    if acknowledged && !read {
        return Verdict::Release;
    }
    let deposed_by = ship.deposed_by_epoch.max(current.deposed_by_epoch);
    if deposed_by > ticket.epoch {
        return Verdict::Fail(WaitFailure::Deposed(deposed_by));
    }
    if current.epoch != ticket.epoch {
        return Verdict::Fail(WaitFailure::EpochChanged { from: ticket.epoch, to: current.epoch });
    }
    if !pair::ships(ticket) || !matches!(pair::role(current), PairRole::Active | PairRole::Fenced) {
        return Verdict::Fail(WaitFailure::NotActive);
    }
    if current.standby_cell_id != ticket.standby_cell_id {
        return Verdict::Fail(WaitFailure::StandbyChanged {
            from: ticket.standby_cell_id,
            to: current.standby_cell_id,
        });
    }
    if !ticket_sync || (skip_ack && !read) {
        return Verdict::Release;
    }
    if acknowledged && lease_fresh {
        return Verdict::Release;
    }
    // An explicit degrade at the same epoch and standby (the coordinator
    // recorded the pair DEGRADED in the routing table first).
    if pair::mode(current) == ReplicationMode::Async {
        return Verdict::Release;
    }
    Verdict::Wait
}

impl Replication {
    pub fn new(history: PairHistory) -> Replication {
        Replication {
            state: watch::Sender::new(ShipState::default()),
            unacked: Mutex::new(VecDeque::new()),
            history,
            authority_term: AtomicU64::new(0),
        }
    }

    /// Records that this replica may serve in `term` (0: ignored).
    pub fn earn_authority(&self, term: u64) {
        if term != 0 {
            let before = self.authority_term.swap(term, Ordering::Relaxed);
            if before != term {
                tracing::info!(term, "authority earned: this leader may serve at the cell's epoch");
            }
        }
    }

    /// True when this replica may serve a cell in `state`: a cell that never
    /// had a pair always may; a paired one only while this replica leads in
    /// the term in which it earned authority.
    pub fn has_authority(&self, leader_term: u64, state: &PairState) -> bool {
        if pair::role(state) == cellbank_proto::cell::PairRole::Unpaired && state.epoch == 0 {
            return true;
        }
        leader_term != 0 && self.authority_term.load(Ordering::Relaxed) == leader_term
    }

    /// Replication lag: (entries, milliseconds the oldest unacknowledged
    /// entry has waited).
    pub fn lag(&self, applied_index: u64) -> (u64, u64) {
        let acked = self.state.borrow().acked_index;
        let entries = applied_index.saturating_sub(acked);
        let unacked = self.unacked.lock().expect("lag lock");
        let ms = match unacked.iter().find(|(index, _)| *index > acked) {
            Some((_, since)) if entries > 0 => since.elapsed().as_millis() as u64,
            _ => 0,
        };
        (entries, ms)
    }

    fn note_progress(&self, applied_index: u64) {
        let acked = self.state.borrow().acked_index;
        let mut unacked = self.unacked.lock().expect("lag lock");
        while unacked.front().is_some_and(|(index, _)| *index <= acked) {
            unacked.pop_front();
        }
        let newest = unacked.back().map(|(index, _)| *index).unwrap_or(acked);
        if applied_index > newest && unacked.len() < LAG_SAMPLES_MAX {
            unacked.push_back((applied_index, Instant::now()));
        }
    }

    /// Forgets the lag samples (a new leader, or a new configuration).
    fn reset_lag(&self) {
        self.unacked.lock().expect("lag lock").clear();
    }

    /// True when the standby refused this cell at its current epoch.
    pub fn deposed(&self, pair_epoch: u64) -> bool {
        self.state.borrow().deposed_by_epoch > pair_epoch
    }

    /// Waits until entry `index` may be acknowledged under the rule of
    /// [`judge`]: for a client write, a credit the courier sends and a
    /// credit `ApplyCredits` answers for. Fails when the outcome became
    /// unknown (see [`WaitFailure`]) or the deadline passes.
    pub async fn wait_for(&self, pair_view: &PairView, index: u64, timeout: Duration) -> Result<(), Status> {
        self.wait(pair_view, index, timeout, false).await
    }

    /// [`Replication::wait_for`] for a read: also waits for a standby
    /// confirmation within [`READ_LEASE`], so that a deposed active that has
    /// not heard of its deposition yet serves no stale read.
    pub async fn wait_for_read(&self, pair_view: &PairView, index: u64, timeout: Duration) -> Result<(), Status> {
        self.wait(pair_view, index, timeout, true).await
    }

    async fn wait(&self, pair_view: &PairView, index: u64, timeout: Duration, read: bool) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + timeout;
        let ticket = self.history.lock().expect("pair history lock").at(index).map(|t| t.as_state());
        let mut ship_rx = self.state.subscribe();
        let mut pair_rx = pair_view.subscribe();
        let Some(ticket) = ticket else {
            return Err(WaitFailure::NoTicket.status(index, pair_rx.borrow().epoch));
        };
        loop {
            let (verdict, current_epoch) = {
                let current = pair_rx.borrow_and_update();
                let ship = ship_rx.borrow_and_update();
                let lease_fresh = ship.confirmed_at.is_some_and(|at| at.elapsed() < READ_LEASE);
                let skip_ack = cellbank_raft::faults::skip_standby_ack();
                (judge(&ticket, &current, &ship, index, read, lease_fresh, skip_ack), current.epoch)
            };
            match verdict {
                Verdict::Release => return Ok(()),
                Verdict::Fail(failure) => return Err(failure.status(index, current_epoch)),
                Verdict::Wait => {}
            }
            tokio::select! {
                _ = ship_rx.changed() => {}
                _ = pair_rx.changed() => {}
                // A lease is renewed by keepalives; look again soon.
                _ = tokio::time::sleep(KEEPALIVE_INTERVAL), if read => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Status::deadline_exceeded(format!(
                        "the standby did not acknowledge entry {index} in time; the outcome is unknown: retry with the \
                         same transfer_id"
                    )));
                }
            }
        }
    }
}

/// Writes a deposition learnt by this replica into the cell's own log, so
/// that no restart or new leader forgets it (in the background: the caller
/// has already stopped acknowledging). A failed proposal is retried by the
/// next refusal.
pub fn record_deposition(node: &DriverHandle<Ledger>, by_epoch: u64) {
    let Some(command) = deposition_command(by_epoch) else { return };
    let node = node.clone();
    tokio::spawn(async move {
        match tokio::time::timeout(Duration::from_secs(5), node.propose(vec![command])).await {
            Ok(Ok(_)) => tracing::info!(by_epoch, "recorded the deposition in the cell's log"),
            Ok(Err(e)) => tracing::info!(by_epoch, "recording the deposition failed ({e}); the next refusal retries"),
            Err(_) => tracing::info!(by_epoch, "recording the deposition timed out; the next refusal retries"),
        }
    });
}

/// The command that records a deposition in the cell's log (`None` only
/// under the simulator's `VolatileDeposition` mutation).
pub fn deposition_command(by_epoch: u64) -> Option<cellbank_proto::cell::Command> {
    if cellbank_raft::mutation::active(cellbank_raft::mutation::Mutation::VolatileDeposition) {
        return None;
    }
    Some(cellbank_proto::cell::Command {
        kind: Some(cellbank_proto::cell::command::Kind::Depose(cellbank_proto::cell::DeposeCommand { by_epoch })),
    })
}

/// Why a standby refuses a shipping session's hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HelloRefusal {
    /// The standby is at a later epoch, or at the same epoch in another
    /// role (promoted): the source is deposed by `epoch`
    /// (FAILED_PRECONDITION).
    Superseded { epoch: u64, detail: String },
    /// The standby has not been configured for this source and epoch yet
    /// (UNAVAILABLE: try again).
    NotYet(String),
}

/// A standby's answer to a hello (or keepalive) from `source_cell_id` at
/// `epoch`, given its own pair state. Pure: the standby service and the
/// simulator both use it.
pub fn check_hello(cell_id: u64, state: &PairState, source_cell_id: u64, epoch: u64) -> Result<(), HelloRefusal> {
    let role = pair::role(state);
    if state.epoch > epoch || (role != PairRole::Standby && state.epoch >= epoch && state.epoch > 0) {
        return Err(HelloRefusal::Superseded {
            epoch: state.epoch,
            detail: format!(
                "cell {cell_id} is {} at epoch {}: it takes no stream from cell {source_cell_id} at epoch {epoch}",
                role.as_str_name(),
                state.epoch,
            ),
        });
    }
    if state.epoch < epoch || role != PairRole::Standby || state.source_cell_id != source_cell_id {
        return Err(HelloRefusal::NotYet(format!(
            "cell {cell_id} is not yet the standby of cell {source_cell_id} at epoch {epoch} (it is {} of cell {} at \
             epoch {})",
            role.as_str_name(),
            state.source_cell_id,
            state.epoch
        )));
    }
    Ok(())
}

/// What a standby replica does with a keepalive on an open stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Keepalive {
    /// Answered, in stream order, with the standby's acknowledgement (which
    /// renews the active's read lease).
    Answer,
    /// This replica no longer leads its cell: the stream ends and the
    /// source looks for the new leader. A leader cut off from its own cell
    /// keeps its old view of the pair state; answering from it would renew
    /// the active's read lease after the cell was promoted.
    NotLeader,
    /// This cell is no longer the source's standby at that epoch.
    Refused(HelloRefusal),
}

/// A standby replica's verdict on a keepalive (`hello` on an open stream).
/// Pure: the standby service runs it on every keepalive.
pub fn judge_keepalive(cell_id: u64, is_leader: bool, state: &PairState, hello: &ShipHello) -> Keepalive {
    if !is_leader {
        return Keepalive::NotLeader;
    }
    match check_hello(cell_id, state, hello.source_cell_id, hello.epoch) {
        Ok(()) => Keepalive::Answer,
        Err(refusal) => Keepalive::Refused(refusal),
    }
}

/// What a standby acknowledges: the source index it holds, or that it
/// needs a snapshot (and which chunk comes next).
pub fn ship_ack(state: &PairState) -> ShipAck {
    ShipAck {
        source_index: state.source_index,
        needs_snapshot: state.source_index == 0 || state.rebuild_snapshot_index != 0,
        next_chunk: state.rebuild_next_chunk,
    }
}

/// The shipper's watermark after the answer to a session's hello: the
/// answer is the truth (read after a barrier on the standby), so the
/// watermark may go down (a rebuild began).
pub fn on_hello_answer(ship: &mut ShipState, state: &PairState, held: u64, sent_at: Instant) {
    ship.epoch = state.epoch;
    ship.standby_cell_id = state.standby_cell_id;
    ship.acked_index = held;
    ship.confirmed_at = Some(sent_at);
}

/// The shipper's watermark after an acknowledgement, in a session whose
/// hello was answered: it only grows.
pub fn on_ack(ship: &mut ShipState, source_index: u64, sent_at: Instant) {
    ship.acked_index = ship.acked_index.max(source_index);
    ship.confirmed_at = Some(sent_at);
}

/// The shipper's state after a refusal at `epoch`: a later epoch deposes
/// the cell (true: record the deposition in the log).
pub fn on_refusal(ship: &mut ShipState, pair_epoch: u64, epoch: u64) -> bool {
    if epoch > pair_epoch {
        ship.deposed_by_epoch = ship.deposed_by_epoch.max(epoch);
        return true;
    }
    false
}

/// Everything the shipper needs from its replica.
pub struct Shipper {
    /// The cluster's name, in every hello.
    pub cluster: String,
    pub cell_id: u64,
    pub node: DriverHandle<Ledger>,
    pub db: Arc<DB>,
    pub pair: PairView,
    pub replication: Arc<Replication>,
}

/// Why one shipping session ended.
enum SessionEnd {
    /// The configuration or leadership changed; start again at once.
    Changed,
    Failed(String),
}

impl Shipper {
    /// Runs for the replica's lifetime: ships whenever this replica leads an
    /// ACTIVE cell that has a standby.
    pub async fn run(self: Arc<Self>) {
        let mut preferred = 0usize;
        let mut last_reason = String::new();
        let mut applied_rx = self.node.shared.applied.subscribe();
        let mut pair_rx = self.pair.subscribe();
        loop {
            let pair_state = pair_rx.borrow_and_update().clone();
            let leading = self.node.shared.is_leader.load(Ordering::Relaxed);
            if !leading || !pair::ships(&pair_state) || pair_state.standby_cell_id == 0 {
                self.node.shared.retain_floor.store(0, Ordering::Relaxed);
                tokio::select! {
                    _ = pair_rx.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                continue;
            }
            match self.session(&pair_state, &mut preferred, &mut applied_rx).await {
                SessionEnd::Changed => {}
                SessionEnd::Failed(reason) => {
                    // Said once per distinct reason: a dead standby is retried
                    // every SHIP_RETRY_DELAY.
                    if reason != last_reason {
                        tracing::info!(cell = self.cell_id, "standby stream ended: {reason}");
                    } else {
                        tracing::debug!(cell = self.cell_id, "standby stream ended: {reason}");
                    }
                    last_reason = reason;
                    preferred = preferred.wrapping_add(1);
                    tokio::time::sleep(SHIP_RETRY_DELAY).await;
                }
            }
        }
    }

    /// True while this replica still leads the same shipping configuration.
    fn still_current(&self, started: &PairState) -> bool {
        let now = self.pair.borrow();
        self.node.shared.is_leader.load(Ordering::Relaxed)
            && pair::ships(&now)
            && now.epoch == started.epoch
            && now.standby_cell_id == started.standby_cell_id
            && now.standby_addrs == started.standby_addrs
    }

    async fn connect(&self, pair_state: &PairState, preferred: &mut usize) -> Result<StandbyClient<Channel>, String> {
        let addrs = &pair_state.standby_addrs;
        if addrs.is_empty() {
            return Err("the standby has no addresses".into());
        }
        let addr = &addrs[*preferred % addrs.len()];
        let peer = cellbank_client::planes::Plane::Peer.of(addr);
        let expect = cellbank_client::tls::Expect::Replica(Some(pair_state.standby_cell_id));
        let channel =
            ChannelSettings::PEER.connect_to(&peer, expect).await.map_err(|e| format!("connect {peer}: {e}"))?;
        Ok(channel::standby(channel, SHIP_MESSAGE_BYTES_MAX))
    }

    fn set_ship_state(&self, change: impl FnOnce(&mut ShipState)) {
        self.replication.state.send_modify(change);
    }

    /// Handles a refusal of the stream: a later epoch deposes this cell; a
    /// leader hint moves the next attempt there.
    fn refused(&self, status: &Status, pair_state: &PairState, preferred: &mut usize) -> SessionEnd {
        if let Some(epoch) = retry::epoch_hint(status) {
            if epoch > pair_state.epoch && status.code() == tonic::Code::FailedPrecondition {
                tracing::warn!(cell = self.cell_id, epoch, "the standby was promoted; this cell is deposed");
                let mut deposed = false;
                self.set_ship_state(|s| deposed = on_refusal(s, pair_state.epoch, epoch));
                if deposed {
                    record_deposition(&self.node, epoch);
                }
            }
        }
        if let Some(leader) = retry::leader_hint(status) {
            if let Some(position) = pair_state.standby_addrs.iter().position(|a| a == leader) {
                *preferred = position;
                return SessionEnd::Changed;
            }
        }
        SessionEnd::Failed(format!("standby refused: {}", status.message()))
    }

    async fn session(
        &self,
        pair_state: &PairState,
        preferred: &mut usize,
        applied_rx: &mut watch::Receiver<u64>,
    ) -> SessionEnd {
        if cellbank_raft::faults::message("standby.ship", 0) == Some(cellbank_raft::faults::Hit::Drop) {
            return SessionEnd::Failed("injected fault: the standby stream is cut".into());
        }
        let mut client = match self.connect(pair_state, preferred).await {
            Ok(client) => client,
            Err(e) => return SessionEnd::Failed(e),
        };
        // The term this session serves: a hello answered in it earns this
        // leader its authority for that term only.
        let term = self.node.shared.leader_term.load(Ordering::Relaxed);
        let (tx, rx) = mpsc::channel::<ShipBatch>(SHIP_IN_FLIGHT_MAX + 2);
        let hello = self.hello(pair_state);
        let hello_sent = Instant::now();
        tx.try_send(ShipBatch { kind: Some(ship_batch::Kind::Hello(hello)) }).expect("fresh channel has room");
        let response = match client.replicate(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
            Ok(response) => response,
            Err(status) => return self.refused(&status, pair_state, preferred),
        };
        let mut acks = response.into_inner();
        let first = match tokio::time::timeout(ACK_TIMEOUT, acks.message()).await {
            Ok(Ok(Some(ack))) => ack,
            Ok(Ok(None)) => return SessionEnd::Failed("stream closed before the hello was answered".into()),
            Ok(Err(status)) => return self.refused(&status, pair_state, preferred),
            Err(_) => return SessionEnd::Failed("the hello was not answered in time".into()),
        };
        let mut held = first.source_index;
        self.replication.reset_lag();
        // The hello's answer is the truth (read after a barrier on the
        // standby): the watermark may go down, e.g. after a rebuild began.
        self.set_ship_state(|s| on_hello_answer(s, pair_state, held, hello_sent));
        // The standby confirmed it still copies this cell at this epoch.
        if self.still_current(pair_state) {
            self.replication.earn_authority(term);
        }
        let first_log_index = self.first_log_index();
        if first.needs_snapshot || held == 0 || held + 1 < first_log_index {
            match self.send_snapshot(pair_state, &tx, &mut acks).await {
                Ok(index) => held = index,
                Err(end) => return end,
            }
        }
        self.stream_entries(pair_state, held, &tx, &mut acks, applied_rx, preferred).await
    }

    fn first_log_index(&self) -> u64 {
        let mut iter = self.db.raw_iterator();
        iter.seek(log_key(0));
        match iter.key() {
            Some(key) if key[0] == cellbank_raft::storage::LOG_PREFIX => {
                u64::from_be_bytes(key[1..9].try_into().expect("log key holds an index"))
            }
            _ => u64::MAX,
        }
    }

    /// Reads entries `from..` of this replica's log, up to `to`, within the
    /// batch bounds. `None` when an entry is gone (compacted).
    fn read_entries(&self, from: u64, to: u64) -> Option<Vec<Vec<u8>>> {
        let mut entries = Vec::new();
        let mut bytes = 0;
        for index in from..=to {
            if entries.len() >= SHIP_BATCH_ENTRIES_MAX || (bytes >= SHIP_BATCH_BYTES_MAX && !entries.is_empty()) {
                break;
            }
            let raw = self.db.get(log_key(index)).unwrap_or_else(|e| panic!("storage failure (read log): {e}"))?;
            let entry = Entry::parse_from_bytes(&raw).unwrap_or_else(|e| panic!("log entry {index} is corrupt: {e}"));
            assert_eq!(entry.index, index, "log key and entry index disagree");
            let data = match entry.get_entry_type() {
                EntryType::EntryNormal => entry.data.to_vec(),
                _ => Vec::new(),
            };
            bytes += data.len();
            entries.push(data);
        }
        Some(entries)
    }

    async fn stream_entries(
        &self,
        pair_state: &PairState,
        held: u64,
        tx: &mpsc::Sender<ShipBatch>,
        acks: &mut tonic::Streaming<ShipAck>,
        applied_rx: &mut watch::Receiver<u64>,
        preferred: &mut usize,
    ) -> SessionEnd {
        let mut next = held + 1;
        // (last source index of the message, when it was sent)
        let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::new();
        let mut last_sent = Instant::now();
        loop {
            if !self.still_current(pair_state) {
                return SessionEnd::Changed;
            }
            let applied = *applied_rx.borrow_and_update();
            self.replication.note_progress(applied);
            self.node.shared.retain_floor.store(self.replication.state.borrow().acked_index + 1, Ordering::Relaxed);
            match cellbank_raft::faults::message("standby.ship", 0) {
                Some(cellbank_raft::faults::Hit::Drop) => {
                    return SessionEnd::Failed("injected fault: the standby stream is cut".into())
                }
                Some(cellbank_raft::faults::Hit::Delay(delay)) if next <= applied => tokio::time::sleep(delay).await,
                _ => {}
            }
            while in_flight.len() < SHIP_IN_FLIGHT_MAX && next <= applied {
                let Some(entries) = self.read_entries(next, applied) else {
                    return SessionEnd::Failed(format!("entry {next} was compacted; the standby needs a snapshot"));
                };
                let count = entries.len() as u64;
                let mut batch = SourceEntries {
                    source_cell_id: self.cell_id,
                    epoch: pair_state.epoch,
                    first_index: next,
                    entries,
                    checksum: 0,
                };
                batch.checksum = cellbank_client::integrity::source_entries(&batch);
                if tx.send(ShipBatch { kind: Some(ship_batch::Kind::Entries(batch)) }).await.is_err() {
                    return SessionEnd::Failed("the stream closed".into());
                }
                next += count;
                last_sent = Instant::now();
                in_flight.push_back((next - 1, last_sent));
            }
            if in_flight.is_empty() && last_sent.elapsed() >= KEEPALIVE_INTERVAL {
                let hello = self.hello(pair_state);
                if tx.send(ShipBatch { kind: Some(ship_batch::Kind::Hello(hello)) }).await.is_err() {
                    return SessionEnd::Failed("the stream closed".into());
                }
                last_sent = Instant::now();
                in_flight.push_back((next - 1, last_sent));
            }
            let wait_for_ack = !in_flight.is_empty();
            tokio::select! {
                ack = tokio::time::timeout(ACK_TIMEOUT, acks.message()), if wait_for_ack => {
                    match ack {
                        Ok(Ok(Some(ack))) => {
                            let (_, sent) = in_flight.pop_front().expect("an ack answers a message in flight");
                            self.set_ship_state(|s| on_ack(s, ack.source_index, sent));
                            self.replication.note_progress(*applied_rx.borrow());
                        }
                        Ok(Ok(None)) => return SessionEnd::Failed("the standby closed the stream".into()),
                        Ok(Err(status)) => return self.refused(&status, pair_state, preferred),
                        Err(_) => return SessionEnd::Failed("no ack in time".into()),
                    }
                }
                changed = applied_rx.changed(), if !wait_for_ack || in_flight.len() < SHIP_IN_FLIGHT_MAX => {
                    if changed.is_err() {
                        return SessionEnd::Failed("the replica is stopping".into());
                    }
                }
                _ = tokio::time::sleep(KEEPALIVE_INTERVAL), if !wait_for_ack => {}
            }
        }
    }

    /// Ships the ledger at this replica's applied index, in chunks read
    /// from one RocksDB view as they are sent (at most
    /// [`SHIP_IN_FLIGHT_MAX`] unacknowledged, two more read ahead: the
    /// ledger is never in memory whole). Returns the snapshot's index once
    /// the standby has committed the last chunk.
    async fn send_snapshot(
        &self,
        pair_state: &PairState,
        tx: &mpsc::Sender<ShipBatch>,
        acks: &mut tonic::Streaming<ShipAck>,
    ) -> Result<u64, SessionEnd> {
        let mut chunks = snapshot_chunks(self.db.clone(), self.cell_id, pair_state.epoch);
        let mut snapshot_index = None;
        let (mut sent, mut acked, mut last_sent) = (0usize, 0usize, false);
        loop {
            while !last_sent && sent - acked < SHIP_IN_FLIGHT_MAX {
                let Some(mut chunk) = chunks.recv().await else {
                    return Err(SessionEnd::Failed("the snapshot could not be read".into()));
                };
                if snapshot_index.is_none() {
                    tracing::info!(
                        cell = self.cell_id,
                        snapshot_index = chunk.snapshot_index,
                        "rebuilding the standby from a snapshot"
                    );
                }
                snapshot_index.get_or_insert(chunk.snapshot_index);
                last_sent = chunk.last;
                chunk.checksum = cellbank_client::integrity::source_snapshot(&chunk);
                if tx.send(ShipBatch { kind: Some(ship_batch::Kind::Snapshot(chunk)) }).await.is_err() {
                    return Err(SessionEnd::Failed("the stream closed".into()));
                }
                sent += 1;
            }
            if last_sent && acked == sent {
                break;
            }
            match tokio::time::timeout(ACK_TIMEOUT * 5, acks.message()).await {
                Ok(Ok(Some(_))) => acked += 1,
                Ok(Ok(None)) => return Err(SessionEnd::Failed("the standby closed the stream".into())),
                Ok(Err(status)) => return Err(SessionEnd::Failed(format!("snapshot refused: {}", status.message()))),
                Err(_) => return Err(SessionEnd::Failed("no snapshot ack in time".into())),
            }
        }
        let snapshot_index = snapshot_index.expect("at least one chunk was sent");
        tracing::info!(cell = self.cell_id, snapshot_index, chunks = sent, "the standby holds the snapshot");
        self.set_ship_state(|s| s.acked_index = s.acked_index.max(snapshot_index));
        Ok(snapshot_index)
    }

    fn hello(&self, pair_state: &PairState) -> ShipHello {
        ShipHello { source_cell_id: self.cell_id, epoch: pair_state.epoch, cluster: self.cluster.clone() }
    }
}

/// The ledger region and this cell's pair state, from one consistent
/// view, in chunks of about [`SNAPSHOT_CHUNK_BYTES_MAX`] read on the
/// blocking pool as the receiver takes them; the channel closes early
/// if reading fails.
fn snapshot_chunks(db: Arc<DB>, cell_id: u64, epoch: u64) -> mpsc::Receiver<SourceSnapshotChunk> {
    let (tx, rx) = mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let view = db.snapshot();
        if cellbank_raft::storage::installing(&view) {
            // This replica stopped leading and is installing a snapshot of
            // its own cell: nothing consistent to ship.
            tracing::warn!("not shipping a snapshot while one is being installed here");
            return;
        }
        let snapshot_index = read_u64(&view, APPLIED_INDEX_KEY).expect("a cell always has an applied index");
        let source_state = view
            .get(pair::OWN_PAIR_KEY)
            .expect("storage failure (read pair state)")
            .map(|bytes| prost::Message::decode(bytes.as_slice()).expect("pair state decodes"))
            .unwrap_or_else(pair::unpaired);
        let new_chunk = |n: u64| SourceSnapshotChunk {
            source_cell_id: cell_id,
            epoch,
            snapshot_index,
            chunk: n,
            ..Default::default()
        };
        let mut current = new_chunk(0);
        let mut bytes = 0;
        let mut iter = view.raw_iterator();
        iter.seek(pair::LEDGER_START);
        while iter.valid() {
            let key = iter.key().expect("key");
            if key >= pair::LEDGER_END {
                break;
            }
            let value = iter.value().expect("value");
            bytes += key.len() + value.len();
            current.keys.push(key.to_vec());
            current.values.push(value.to_vec());
            if bytes >= SNAPSHOT_CHUNK_BYTES_MAX {
                let n = current.chunk + 1;
                if tx.blocking_send(std::mem::replace(&mut current, new_chunk(n))).is_err() {
                    return;
                }
                bytes = 0;
            }
            iter.next();
        }
        if let Err(error) = iter.status() {
            tracing::error!(%error, "cannot read the ledger for the standby's snapshot");
            return;
        }
        current.last = true;
        current.source_state = Some(source_state);
        let _ = tx.blocking_send(current);
    });
    rx
}

#[cfg(test)]
mod tests {

    /// Found reviewing the simulator's stream model: a standby replica that
    /// stopped leading (cut off from its own cell) still answered the
    /// active's keepalives from its old view, renewing the active's read
    /// lease after the cell was promoted. Only a leader answers.
    #[test]
    fn only_a_leading_standby_replica_answers_a_keepalive() {
        use cellbank_proto::cell::{PairRole, ShipHello};
        let standby = PairState {
            epoch: 3,
            role: PairRole::Standby as i32,
            mode: cellbank_proto::cell::ReplicationMode::Sync as i32,
            source_cell_id: 1,
            source_index: 40,
            ..Default::default()
        };
        let hello = ShipHello { source_cell_id: 1, epoch: 3, cluster: "local".into() };
        assert_eq!(judge_keepalive(2, true, &standby, &hello), Keepalive::Answer);
        assert_eq!(judge_keepalive(2, false, &standby, &hello), Keepalive::NotLeader);
        // Promoted (a later epoch): the source is superseded.
        let promoted = PairState { epoch: 4, role: PairRole::Active as i32, ..standby.clone() };
        assert!(matches!(
            judge_keepalive(2, true, &promoted, &hello),
            Keepalive::Refused(HelloRefusal::Superseded { epoch: 4, .. })
        ));
        // A follower's stale view never answers, whatever it shows.
        assert_eq!(judge_keepalive(2, false, &promoted, &hello), Keepalive::NotLeader);
    }
    use super::*;
    use cellbank_proto::cell::{PairRole, ReplicationMode};

    /// A standby rebuild reads the ledger a chunk at a time as the stream
    /// takes them: every key once, in order, the pair state with the last.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_standby_snapshot_is_read_in_chunks_as_they_are_taken() {
        use cellbank_raft::storage::STATE_PREFIX;
        let dir = tempfile::tempdir().unwrap();
        let db = cellbank_raft::storage::open_db(dir.path());
        db.put(APPLIED_INDEX_KEY, 42u64.to_be_bytes()).unwrap();
        let keys: Vec<Vec<u8>> =
            (0..3_000u32).map(|i| [&[STATE_PREFIX, b'a'][..], &i.to_be_bytes()].concat()).collect();
        for key in &keys {
            db.put(key, vec![1u8; 1_000]).unwrap();
        }
        db.put([STATE_PREFIX, b'z', b'q'], b"outside the ledger").unwrap();
        let mut chunks = snapshot_chunks(db, 3, 7);
        let mut seen = Vec::new();
        let mut count = 0;
        while let Some(chunk) = chunks.recv().await {
            assert_eq!((chunk.source_cell_id, chunk.epoch, chunk.snapshot_index, chunk.chunk), (3, 7, 42, count));
            assert_eq!(chunk.last, chunk.source_state.is_some());
            let bytes: usize = chunk.keys.iter().chain(&chunk.values).map(Vec::len).sum();
            assert!(bytes < SNAPSHOT_CHUNK_BYTES_MAX + 2_000, "a chunk of {bytes} bytes");
            seen.extend(chunk.keys);
            count += 1;
            if chunk.last {
                break;
            }
        }
        assert!(count >= 3, "{count} chunks");
        assert_eq!(seen, keys);
        assert!(chunks.recv().await.is_none(), "nothing after the last chunk");
    }

    const INDEX: u64 = 100;

    fn active(epoch: u64, mode: ReplicationMode, standby: u64) -> PairState {
        PairState {
            epoch,
            role: PairRole::Active as i32,
            mode: mode as i32,
            standby_cell_id: standby,
            ..Default::default()
        }
    }

    fn sync() -> PairState {
        active(1, ReplicationMode::Sync, 3)
    }

    fn ship(epoch: u64, standby: u64, acked: u64) -> ShipState {
        ShipState { epoch, standby_cell_id: standby, acked_index: acked, ..Default::default() }
    }

    fn write(ticket: &PairState, current: &PairState, ship: &ShipState) -> Verdict {
        judge(ticket, current, ship, INDEX, false, false, false)
    }

    #[test]
    fn a_sync_write_waits_for_the_standby_of_its_own_epoch() {
        assert_eq!(write(&sync(), &sync(), &ship(1, 3, INDEX - 1)), Verdict::Wait);
        assert_eq!(write(&sync(), &sync(), &ship(1, 3, INDEX)), Verdict::Release);
        // An acknowledgement from another standby or epoch is no evidence.
        assert_eq!(write(&sync(), &sync(), &ship(1, 4, INDEX)), Verdict::Wait);
        assert_eq!(write(&sync(), &sync(), &ship(0, 3, INDEX)), Verdict::Wait);
        // Fenced for a switchover: still waits.
        let fenced = PairState { role: PairRole::Fenced as i32, ..sync() };
        assert_eq!(write(&sync(), &fenced, &ship(1, 3, 0)), Verdict::Wait);
    }

    #[test]
    fn a_demotion_fails_the_waiter_and_never_releases_it() {
        // The hole that acknowledged lost writes: demoted to standby at a
        // later epoch while waiting.
        let demoted = PairState {
            epoch: 2,
            role: PairRole::Standby as i32,
            mode: ReplicationMode::Sync as i32,
            source_cell_id: 3,
            ..Default::default()
        };
        assert!(matches!(write(&sync(), &demoted, &ship(1, 3, 0)), Verdict::Fail(WaitFailure::EpochChanged { .. })));
        // A demotion at the same epoch.
        let same_epoch = PairState { epoch: 1, ..demoted.clone() };
        assert_eq!(write(&sync(), &same_epoch, &ship(1, 3, 0)), Verdict::Fail(WaitFailure::NotActive));
        // The standby removed (not a degrade).
        let no_standby = active(1, ReplicationMode::Async, 0);
        assert_eq!(
            write(&sync(), &no_standby, &ship(1, 3, 0)),
            Verdict::Fail(WaitFailure::StandbyChanged { from: 3, to: 0 })
        );
        // Deposed, learnt from the standby or from the log.
        let mut deposed_ship = ship(1, 3, 0);
        deposed_ship.deposed_by_epoch = 2;
        assert_eq!(write(&sync(), &sync(), &deposed_ship), Verdict::Fail(WaitFailure::Deposed(2)));
        let deposed_state = PairState { deposed_by_epoch: 2, ..sync() };
        assert_eq!(write(&sync(), &deposed_state, &ship(1, 3, 0)), Verdict::Fail(WaitFailure::Deposed(2)));
        // But evidence gathered before the change stands: the standby that
        // was promoted holds what it acknowledged.
        assert_eq!(write(&sync(), &demoted, &ship(1, 3, INDEX)), Verdict::Release);
        assert_eq!(write(&sync(), &sync(), &ShipState { deposed_by_epoch: 2, ..ship(1, 3, INDEX) }), Verdict::Release);
    }

    #[test]
    fn only_an_explicit_degrade_at_the_same_epoch_releases_sync_waiters() {
        let degraded = active(1, ReplicationMode::Async, 3);
        assert_eq!(write(&sync(), &degraded, &ship(1, 3, 0)), Verdict::Release);
        let degraded_later = active(2, ReplicationMode::Async, 3);
        assert!(matches!(write(&sync(), &degraded_later, &ship(1, 3, 0)), Verdict::Fail(_)));
    }

    #[test]
    fn async_and_unpaired_entries_need_no_standby_but_not_a_later_epoch() {
        let async_ticket = active(2, ReplicationMode::Async, 1);
        assert_eq!(write(&async_ticket, &async_ticket, &ShipState::default()), Verdict::Release);
        let moved_on = active(3, ReplicationMode::Async, 1);
        assert!(matches!(write(&async_ticket, &moved_on, &ShipState::default()), Verdict::Fail(_)));
        let unpaired = pair::unpaired();
        assert_eq!(write(&unpaired, &unpaired, &ShipState::default()), Verdict::Release);
        // An entry applied while the cell was a standby is never acknowledged.
        let standby = PairState { epoch: 1, role: PairRole::Standby as i32, ..Default::default() };
        assert_eq!(write(&standby, &sync(), &ShipState::default()), Verdict::Fail(WaitFailure::NotActive));
    }

    #[test]
    fn a_read_needs_a_fresh_lease_and_the_same_configuration() {
        let read = |current: &PairState, ship: &ShipState, lease: bool| {
            judge(&sync(), current, ship, INDEX, true, lease, false)
        };
        assert_eq!(read(&sync(), &ship(1, 3, INDEX), false), Verdict::Wait);
        assert_eq!(read(&sync(), &ship(1, 3, INDEX), true), Verdict::Release);
        let demoted = PairState { epoch: 2, role: PairRole::Standby as i32, ..Default::default() };
        assert!(matches!(read(&demoted, &ship(1, 3, INDEX), true), Verdict::Fail(_)), "no read after a change");
    }

    #[test]
    fn the_unsafe_drill_fault_releases_writes_only() {
        assert_eq!(judge(&sync(), &sync(), &ship(1, 3, 0), INDEX, false, false, true), Verdict::Release);
        assert_eq!(judge(&sync(), &sync(), &ship(1, 3, 0), INDEX, true, true, true), Verdict::Wait);
    }

    #[test]
    fn authority_is_per_term_and_unpaired_cells_need_none() {
        let replication = Replication::default();
        assert!(replication.has_authority(0, &pair::unpaired()));
        assert!(!replication.has_authority(5, &sync()), "a new leader has none");
        replication.earn_authority(5);
        assert!(replication.has_authority(5, &sync()));
        assert!(!replication.has_authority(6, &sync()), "a later term must earn it again");
        assert!(!replication.has_authority(0, &sync()), "a follower has none");
    }
}

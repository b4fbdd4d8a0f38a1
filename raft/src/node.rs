//! [`RaftNode`]: one replica's Raft state and state machine, driven through
//! the raft-rs Ready loop. No sockets, no clocks, no threads: the caller
//! ticks it, steps messages into it, and sends what it hands back.
//!
//! Ready handling follows raft-rs's Ready contract step by step; see
//! [`RaftNode::handle_ready`]. Invariants asserted here:
//! - entries are applied in index order, each exactly once
//!   (`index == applied + 1`);
//! - a proposer hears the outputs of its commands only if the entry applied
//!   at the index it was proposed at carries the term it was proposed in;
//!   otherwise it hears `Superseded` (the outcome is then unknown to it and a
//!   retry with the same transfer id is safe);
//! - a read is answered only when `applied >= read index`, on the leader.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use cellbank_proto::cell::PeerAddress;
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType};
use raft::{RawNode, SnapshotStatus, StateRole};
use rocksdb::DB;

use super::storage::{peer_key, RaftStorage, PEER_PREFIX};
use super::{ApplyBatch, StateMachine};
use crate::metrics::RaftMetrics;

/// Most commands folded into one Raft entry.
pub const COMMANDS_PER_ENTRY_MAX: usize = 16_384;
/// A follower more entries behind than this is not waited for by log
/// compaction; it will catch up from a snapshot.
pub const LAGGARD_ENTRIES_MAX: u64 = 100_000;
/// Most reads waiting for one ReadIndex round.
pub const READS_PER_ROUND_MAX: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProposeError {
    /// This replica is not the leader; `leader_id` is 0 when unknown.
    NotLeader { leader_id: u64 },
    /// The entry was overwritten by a new leader, or leadership was lost
    /// before it applied: its outcome is unknown here.
    Superseded { leader_id: u64 },
    /// Raft refused the proposal (for example during a leader transfer, or a
    /// conf change while another is pending).
    Dropped(String),
}

impl std::fmt::Display for ProposeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProposeError::NotLeader { leader_id } => write!(f, "not the leader (leader is replica {leader_id})"),
            ProposeError::Superseded { leader_id } => {
                write!(
                    f,
                    "leadership changed before the command applied; outcome unknown (leader is replica {leader_id})"
                )
            }
            ProposeError::Dropped(why) => write!(f, "proposal dropped: {why}"),
        }
    }
}

/// Why a message from the network was not stepped (it changed nothing).
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("message for replica {to} delivered to {here}")]
    OtherReplica { to: u64, here: u64 },
    #[error("local message type {0:?} from the network")]
    LocalType(MessageType),
    #[error("MsgPropose from replica {from} refused")]
    Propose { from: u64 },
    #[error("heartbeat from replica {from} commits index {commit}, past this log's last index {last_index}")]
    CommitPastLog { from: u64, commit: u64, last_index: u64 },
    #[error("{field} {value} from replica {from} is out of range")]
    OutOfRange { from: u64, field: &'static str, value: u64 },
    #[error("{0:?} from the network must carry a term")]
    NoTerm(MessageType),
    #[error("{kind:?} from replica {from} carries {what}, which only {only} may")]
    Misplaced { from: u64, kind: MessageType, what: &'static str, only: &'static str },
    #[error("append from replica {from}: entry {at} of {count} is at index {index}, not {expected}")]
    Gap { from: u64, at: usize, count: usize, index: u64, expected: u64 },
    #[error("append from replica {from}: entry {index} has term {term}, outside {low}..={high}")]
    EntryTerm { from: u64, index: u64, term: u64, low: u64, high: u64 },
    #[error("append from replica {from}: entry {index} (term {term}) conflicts with the committed log")]
    ConflictsCommitted { from: u64, index: u64, term: u64 },
    #[error("append from replica {from}: entry {index} is not valid: {why}")]
    BadEntry { from: u64, index: u64, why: String },
    #[error("snapshot from replica {from} is not valid: {why}")]
    BadSnapshot { from: u64, why: String },
    #[error("append response from replica {from} acknowledges index {index}, past this log's last index {last_index}")]
    AckPastLog { from: u64, index: u64, last_index: u64 },
    #[error("raft refused the message: {0}")]
    Raft(raft::Error),
}

/// The largest term or index a message may carry. Real ones are far below
/// (a term a second for 10^11 years); anything near `u64::MAX` would only
/// overflow raft-rs's `+ 1`s.
pub const TERM_INDEX_MAX: u64 = 1 << 62;

pub type Responder<T> = Box<dyn FnOnce(Result<T, ProposeError>) + Send>;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub replica_id: u64,
    /// Ticks without a leader before a follower campaigns (randomized up to
    /// `max_election_tick`).
    pub election_tick: usize,
    /// Lower bound of the randomized election timeout, in ticks (at least
    /// `election_tick`, which is also the leader lease for check_quorum).
    pub min_election_tick: usize,
    /// Upper bound (exclusive) of the randomized election timeout, in ticks.
    pub max_election_tick: usize,
    pub heartbeat_tick: usize,
    /// Compact the log once it holds this many applied entries...
    pub log_compact_threshold_entries: u64,
    /// ...keeping this many applied entries for slow followers.
    pub log_retain_entries: u64,
    /// Compact the log once it holds this many bytes, down to half of it.
    pub log_compact_threshold_bytes: u64,
    pub max_size_per_msg_bytes: u64,
    pub max_inflight_msgs: usize,
}

/// Replicas whose election timeouts are kept apart (ids 1..=5 of a cell).
pub const ELECTION_STAGGER_SLOTS: u64 = 5;
/// Ticks between two replicas' election timeouts: more than the up-to-one
/// tick by which two processes' tick phases can differ.
pub const ELECTION_STAGGER_TICKS: usize = 2;

/// Extra election-timeout ticks for a replica. Each replica's timeout is
/// fixed and distinct (10, 12, 14, ... ticks) instead of random, so after a
/// leader dies the followers never campaign in the same tick: no split vote,
/// and a new leader within one timeout (at most 1.8 s for five replicas,
/// 1.4 s for three). Pre-vote and check_quorum keep an eager replica from
/// disrupting a healthy leader.
pub fn election_stagger_ticks(replica_id: u64) -> usize {
    ELECTION_STAGGER_TICKS * (replica_id.saturating_sub(1) % ELECTION_STAGGER_SLOTS) as usize
}

impl NodeConfig {
    pub fn new(replica_id: u64) -> NodeConfig {
        let election_tick = 10;
        let min_election_tick = election_tick + election_stagger_ticks(replica_id);
        NodeConfig {
            replica_id,
            election_tick,
            min_election_tick,
            max_election_tick: min_election_tick + 1,
            heartbeat_tick: 2,
            log_compact_threshold_entries: 10_000,
            log_retain_entries: 2_000,
            log_compact_threshold_bytes: 64 * 1024 * 1024,
            // At most 64 MiB of appends in flight to one follower.
            max_size_per_msg_bytes: 1024 * 1024,
            max_inflight_msgs: 64,
        }
    }
}

/// A conf change's outcome: the new configuration and the address book.
pub type Membership = (ConfState, BTreeMap<u64, String>);

/// What applying one entry produced, for its proposer.
enum Applied<O> {
    Commands(Vec<O>),
    ConfChange(ConfState),
}

/// What a proposer waits for at one log index.
enum Pending<O> {
    Commands { term: u64, waiters: Vec<(usize, Responder<Vec<O>>)> },
    ConfChange { term: u64, waiter: Responder<Membership> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub replica_id: u64,
    pub role: StateRole,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub leader_id: u64,
    pub first_log_index: u64,
    pub last_log_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub peers: BTreeMap<u64, String>,
    pub snapshots_installed: u64,
}

pub struct RaftNode<SM: StateMachine> {
    raw: RawNode<RaftStorage>,
    sm: SM,
    db: Arc<DB>,
    config: NodeConfig,
    applied_index: u64,
    role: StateRole,
    leader_id: u64,
    pending: BTreeMap<u64, Pending<SM::Output>>,
    queued_commands: Vec<SM::Command>,
    queued_waiters: Vec<(usize, Responder<Vec<SM::Output>>)>,
    reads_queued: Vec<Responder<u64>>,
    reads_in_flight: HashMap<u64, Vec<Responder<u64>>>,
    reads_ready: VecDeque<(u64, Vec<Responder<u64>>)>,
    read_context_next: u64,
    peers: BTreeMap<u64, String>,
    snapshots_installed: u64,
    metrics: Arc<RaftMetrics>,
    /// When a refused message was last logged.
    refusal_logged: Option<std::time::Instant>,
    /// The highest commit index a leader's append carried (an append
    /// carries the leader's whole commit index, a heartbeat only what this
    /// replica holds): how far behind this replica knows it is.
    leader_commit_seen: u64,
    /// The lowest index another consumer of the log (the standby shipper)
    /// still needs; 0 when none.
    retain_floor: u64,
}

/// The role as the status reports it.
pub fn raft_role(role: StateRole) -> cellbank_proto::cell::RaftRole {
    use cellbank_proto::cell::RaftRole;
    match role {
        StateRole::Leader => RaftRole::Leader,
        StateRole::Follower => RaftRole::Follower,
        StateRole::Candidate => RaftRole::Candidate,
        StateRole::PreCandidate => RaftRole::PreCandidate,
    }
}

pub fn role_str(role: StateRole) -> &'static str {
    match role {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre-candidate",
    }
}

fn load_peers(db: &DB) -> BTreeMap<u64, String> {
    let mut peers = BTreeMap::new();
    let mut iter = db.raw_iterator();
    iter.seek(PEER_PREFIX);
    while iter.valid() {
        let key = iter.key().expect("key");
        if !key.starts_with(PEER_PREFIX) {
            break;
        }
        let id = key[PEER_PREFIX.len()..].try_into().map(u64::from_be_bytes);
        let addr = String::from_utf8(iter.value().expect("value").to_vec());
        match (id, addr) {
            (Ok(id), Ok(addr)) => {
                peers.insert(id, addr);
            }
            _ => tracing::error!("skipping a malformed peer address entry {key:02x?}"),
        }
        iter.next();
    }
    iter.status().unwrap_or_else(|e| panic!("storage failure (scan peers): {e}"));
    peers
}

impl<SM: StateMachine> RaftNode<SM> {
    /// Opens a replica on `db`. `bootstrap_peers` (id to address) founds a new
    /// group when the database is empty; it is ignored otherwise. A replica
    /// joining an existing group passes an empty map.
    pub fn open(
        config: NodeConfig,
        db: Arc<DB>,
        mut sm: SM,
        bootstrap_peers: &BTreeMap<u64, String>,
        snapshots: Arc<crate::snapshot::SnapshotDir>,
        metrics: Arc<RaftMetrics>,
    ) -> RaftNode<SM> {
        let is_new = db.get(super::storage::CONF_STATE_KEY).expect("read conf state").is_none();
        if is_new && !bootstrap_peers.is_empty() {
            for (id, addr) in bootstrap_peers {
                db.put(peer_key(*id), addr.as_bytes()).expect("write peer address");
            }
        }
        let voters: Vec<u64> = if is_new { bootstrap_peers.keys().copied().collect() } else { Vec::new() };
        let storage = RaftStorage::open(db.clone(), &voters, snapshots);
        if storage.resumed_install {
            sm.restored();
        }
        let applied_index = storage.applied_index();
        let raft_config = raft::Config {
            id: config.replica_id,
            election_tick: config.election_tick,
            heartbeat_tick: config.heartbeat_tick,
            min_election_tick: config.min_election_tick.max(config.election_tick),
            max_election_tick: config.max_election_tick.max(config.min_election_tick.max(config.election_tick) + 1),
            applied: applied_index,
            max_size_per_msg: config.max_size_per_msg_bytes,
            max_inflight_msgs: config.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_config.validate().expect("valid raft config");
        let raw =
            RawNode::new(&raft_config, storage, &super::raft_logger(config.replica_id)).expect("create raft node");
        let peers = load_peers(&db);
        RaftNode {
            raw,
            sm,
            db,
            config,
            applied_index,
            role: StateRole::Follower,
            leader_id: 0,
            pending: BTreeMap::new(),
            queued_commands: Vec::new(),
            queued_waiters: Vec::new(),
            reads_queued: Vec::new(),
            reads_in_flight: HashMap::new(),
            reads_ready: VecDeque::new(),
            read_context_next: 1,
            peers,
            snapshots_installed: 0,
            retain_floor: 0,
            metrics,
            refusal_logged: None,
            leader_commit_seen: 0,
        }
    }

    pub fn replica_id(&self) -> u64 {
        self.config.replica_id
    }

    /// This replica's snapshot files.
    pub fn snapshots(&self) -> &Arc<crate::snapshot::SnapshotDir> {
        self.raw.store().snapshots()
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The Raft term this node is in.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn leader_id(&self) -> u64 {
        self.raw.raft.leader_id
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub fn peers(&self) -> &BTreeMap<u64, String> {
        &self.peers
    }

    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    pub fn tick(&mut self) {
        self.raw.tick();
    }

    pub fn campaign(&mut self) {
        let _ = self.raw.campaign();
    }

    /// Steps a message from a peer. Messages for another replica and local
    /// message types are refused.
    pub fn step(&mut self, message: Message) -> Result<(), StepError> {
        if message.to != self.config.replica_id {
            return Err(StepError::OtherReplica { to: message.to, here: self.config.replica_id });
        }
        if raft::raw_node::is_local_msg(message.get_msg_type()) {
            return Err(StepError::LocalType(message.get_msg_type()));
        }
        if message.get_msg_type() == MessageType::MsgPropose {
            // Clients propose through the gRPC API on the leader; a proposal
            // from the network would let any peer write the log.
            return Err(StepError::Propose { from: message.from });
        }
        if let Err(refusal) = self.check_message(&message) {
            self.metrics.raft_messages_refused_total.inc();
            // At most one line a second: a peer sending garbage must not
            // flood the log.
            let now = std::time::Instant::now();
            if self.refusal_logged.is_none_or(|at| now.duration_since(at) >= std::time::Duration::from_secs(1)) {
                self.refusal_logged = Some(now);
                tracing::warn!(replica = self.config.replica_id, "refused a raft message: {refusal}");
            }
            // A refused snapshot's received body will never be installed.
            if message.get_msg_type() == MessageType::MsgSnapshot {
                if let Ok(body) = crate::snapshot::BodyRef::decode(&message.get_snapshot().data) {
                    let path = self.snapshots().received(message.get_snapshot().get_metadata(), &body);
                    let _ = std::fs::remove_file(path);
                }
            }
            return Err(refusal);
        }
        if message.get_msg_type() == MessageType::MsgAppend {
            self.leader_commit_seen = self.leader_commit_seen.max(message.commit);
        }
        self.raw.step(message).map_err(StepError::Raft)
    }

    /// See the field: the highest leader's commit index an append carried.
    pub fn leader_commit_seen(&self) -> u64 {
        self.leader_commit_seen
    }

    /// Refuses, before raft-rs sees it, any message that an honest peer
    /// never sends and that raft-rs would abort on (it treats such inputs as
    /// its own bugs: `fatal!`), or that would put something in the log that
    /// this replica could not apply. Found and kept honest by the hostile
    /// message fuzz test (`tests/hostile_messages.rs`).
    fn check_message(&self, message: &Message) -> Result<(), StepError> {
        let from = message.from;
        let kind = message.get_msg_type();
        for (field, value) in [
            ("term", message.term),
            ("index", message.index),
            ("log_term", message.log_term),
            ("commit", message.commit),
            ("commit_term", message.commit_term),
            ("reject_hint", message.reject_hint),
            ("request_snapshot", message.request_snapshot),
        ] {
            if value > TERM_INDEX_MAX {
                return Err(StepError::OutOfRange { from, field, value });
            }
        }
        if from == 0 || from == self.config.replica_id {
            return Err(StepError::OutOfRange { from, field: "from", value: from });
        }
        // Followers forward read requests to the leader without a term (as
        // raft-rs does proposals), and raft-rs panics forwarding one that
        // has a term; every other message from a peer carries one, and
        // raft-rs panics answering a vote request of term 0.
        let forwarded_read = kind == MessageType::MsgReadIndex;
        if forwarded_read && message.term != 0 {
            return Err(StepError::OutOfRange { from, field: "term of a forwarded read", value: message.term });
        }
        if message.term == 0 && !forwarded_read {
            return Err(StepError::NoTerm(kind));
        }
        // A follower forwards a leader transfer to its leader with its term
        // set; a replica that is not (or no longer) the leader would forward
        // it again, and raft-rs panics sending one that has a term. Only the
        // leader of that term or a later one takes it.
        if kind == MessageType::MsgTransferLeader && (!self.is_leader() || message.term > self.raw.raft.term) {
            return Err(StepError::Misplaced { from, kind, what: "a leader transfer", only: "the current leader" });
        }
        // A read request and its answer carry the request's context as
        // their one entry (raft-rs reads `entries[0]` unchecked).
        let reads = matches!(kind, MessageType::MsgReadIndex | MessageType::MsgReadIndexResp);
        if reads && message.entries.len() != 1 {
            return Err(StepError::Misplaced { from, kind, what: "other than one entry", only: "no read" });
        }
        if !message.entries.is_empty() && kind != MessageType::MsgAppend && !reads {
            return Err(StepError::Misplaced { from, kind, what: "entries", only: "MsgAppend and reads" });
        }
        if kind != MessageType::MsgSnapshot && message.has_snapshot() && !message.get_snapshot().is_empty() {
            return Err(StepError::Misplaced { from, kind, what: "a snapshot", only: "MsgSnapshot" });
        }
        let log = &self.raw.raft.raft_log;
        let last_index = log.last_index();
        match kind {
            // raft-rs aborts the process on a heartbeat that commits past
            // the log (`commit_to`). A leader never sends one (it commits at
            // most what the follower acknowledged holding).
            MessageType::MsgHeartbeat if message.commit > last_index => {
                Err(StepError::CommitPastLog { from, commit: message.commit, last_index })
            }
            MessageType::MsgAppend => self.check_append(message),
            MessageType::MsgSnapshot => {
                check_snapshot(message)?;
                // raft-rs ignores a snapshot below its commit index, and
                // fast-forwards to one that matches its log; one at the
                // commit index with another term would replace committed
                // state.
                let metadata = message.get_snapshot().get_metadata();
                // Its body came through the transport's snapshot stream into
                // this replica's snapshot directory, checked as it arrived.
                let body = crate::snapshot::BodyRef::decode(&message.get_snapshot().data)
                    .map_err(|e| StepError::BadSnapshot { from, why: e.to_string() })?;
                self.raw
                    .store()
                    .snapshots()
                    .check_received(metadata, &body)
                    .map_err(|e| StepError::BadSnapshot { from, why: e.to_string() })?;
                let known = log.term(metadata.index).unwrap_or(0);
                let conflicts = metadata.index <= log.committed && known != 0 && known != metadata.term;
                if conflicts || (metadata.index == log.committed && !log.match_term(metadata.index, metadata.term)) {
                    return Err(StepError::ConflictsCommitted { from, index: metadata.index, term: metadata.term });
                }
                Ok(())
            }
            // A leader counts an acknowledgement toward commit: one past its
            // own log would commit entries it does not hold.
            MessageType::MsgAppendResponse if !message.reject && message.index > last_index => {
                Err(StepError::AckPastLog { from, index: message.index, last_index })
            }
            _ => Ok(()),
        }
    }

    /// An append's entries follow its index one by one, with terms that
    /// never fall and never pass the sender's term; none rewrites a
    /// committed entry; each is one this replica can apply.
    fn check_append(&self, message: &Message) -> Result<(), StepError> {
        let from = message.from;
        let log = &self.raw.raft.raft_log;
        let count = message.entries.len();
        // raft-rs reads the term of an index past its log as 0, so an append
        // after such an index with log term 0 would "match" and commit
        // entries this replica does not hold.
        if (message.log_term == 0) != (message.index == 0) || message.log_term > message.term {
            return Err(StepError::EntryTerm {
                from,
                index: message.index,
                term: message.log_term,
                low: u64::from(message.index != 0),
                high: message.term,
            });
        }
        let mut low = message.log_term.max(1);
        for (at, entry) in message.entries.iter().enumerate() {
            let expected = message.index + 1 + at as u64;
            if entry.index != expected {
                return Err(StepError::Gap { from, at, count, index: entry.index, expected });
            }
            if entry.term < low || entry.term > message.term {
                return Err(StepError::EntryTerm {
                    from,
                    index: entry.index,
                    term: entry.term,
                    low,
                    high: message.term,
                });
            }
            low = entry.term;
            if entry.index <= log.committed && !log.match_term(entry.index, entry.term) {
                return Err(StepError::ConflictsCommitted { from, index: entry.index, term: entry.term });
            }
            let bad = |why: String| StepError::BadEntry { from, index: entry.index, why };
            match entry.get_entry_type() {
                // Checked by the transport service (`StateMachine::check_entry`)
                // before the message reaches this thread.
                EntryType::EntryNormal => {}
                EntryType::EntryConfChange => {
                    ConfChange::parse_from_bytes(&entry.data).map_err(|e| bad(format!("not a conf change: {e}")))?;
                }
                EntryType::EntryConfChangeV2 => {
                    return Err(bad("a joint conf change, which cellbank never proposes".into()))
                }
            }
        }
        Ok(())
    }

    pub fn report_unreachable(&mut self, replica_id: u64) {
        self.raw.report_unreachable(replica_id);
    }

    pub fn report_snapshot(&mut self, replica_id: u64, delivered: bool) {
        let status = if delivered { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
        self.raw.report_snapshot(replica_id, status);
        self.raw.store().release_snapshot();
    }

    pub fn transfer_leader(&mut self, replica_id: u64) {
        self.raw.transfer_leader(replica_id);
    }

    /// Queues commands to go into the next entry; `waiter` hears one output
    /// per command once they apply.
    pub fn submit(&mut self, commands: Vec<SM::Command>, waiter: Responder<Vec<SM::Output>>) {
        if !self.is_leader() {
            waiter(Err(ProposeError::NotLeader { leader_id: self.leader_id() }));
            return;
        }
        self.queued_waiters.push((commands.len(), waiter));
        self.queued_commands.extend(commands);
    }

    /// Proposes every queued command as entries of at most
    /// [`COMMANDS_PER_ENTRY_MAX`] commands (a caller's commands never split).
    pub fn flush_proposals(&mut self, timestamp_ms: u64) {
        if !self.is_leader() {
            // Leadership was lost in this round (a higher term arrived after
            // the commands were queued): nothing queued was proposed.
            let error = ProposeError::NotLeader { leader_id: self.leader_id() };
            self.queued_commands.clear();
            for (_, waiter) in self.queued_waiters.drain(..) {
                waiter(Err(error.clone()));
            }
            return;
        }
        while !self.queued_waiters.is_empty() {
            let mut take_waiters = 0;
            let mut take_commands = 0;
            for (count, _) in &self.queued_waiters {
                if take_waiters > 0 && take_commands + count > COMMANDS_PER_ENTRY_MAX {
                    break;
                }
                take_waiters += 1;
                take_commands += count;
            }
            let waiters: Vec<_> = self.queued_waiters.drain(..take_waiters).collect();
            let commands: Vec<_> = self.queued_commands.drain(..take_commands).collect();
            self.propose_entry(commands, waiters, timestamp_ms);
        }
    }

    fn propose_entry(
        &mut self,
        commands: Vec<SM::Command>,
        waiters: Vec<(usize, Responder<Vec<SM::Output>>)>,
        timestamp_ms: u64,
    ) {
        let command_count = commands.len();
        let data = self.sm.encode_batch(commands, timestamp_ms);
        let index_before = self.raw.raft.raft_log.last_index();
        if let Err(err) = self.raw.propose(Vec::new(), data) {
            let error = match err {
                raft::Error::ProposalDropped if !self.is_leader() => {
                    ProposeError::NotLeader { leader_id: self.leader_id() }
                }
                other => ProposeError::Dropped(other.to_string()),
            };
            for (_, waiter) in waiters {
                waiter(Err(error.clone()));
            }
            return;
        }
        let index = self.raw.raft.raft_log.last_index();
        if index != index_before + 1 || !self.is_leader() {
            // raft-rs forwards a follower's proposal instead of appending it;
            // cellbank does not rely on forwarding, so the caller retries.
            for (_, waiter) in waiters {
                waiter(Err(ProposeError::NotLeader { leader_id: self.leader_id() }));
            }
            return;
        }
        self.metrics.proposals_total.inc();
        self.metrics.commands_per_entry.observe(command_count as f64);
        let term = self.raw.raft.term;
        let previous = self.pending.insert(index, Pending::Commands { term, waiters });
        assert!(previous.is_none(), "two proposals at index {index}");
    }

    /// Adds a replica (with its address) or removes one.
    pub fn propose_conf_change(&mut self, change: ConfChange, waiter: Responder<Membership>) {
        if !self.is_leader() {
            waiter(Err(ProposeError::NotLeader { leader_id: self.leader_id() }));
            return;
        }
        if self.raw.raft.has_pending_conf() {
            waiter(Err(ProposeError::Dropped("another membership change is still being applied".into())));
            return;
        }
        let index_before = self.raw.raft.raft_log.last_index();
        if let Err(err) = self.raw.propose_conf_change(Vec::new(), change) {
            waiter(Err(ProposeError::Dropped(err.to_string())));
            return;
        }
        let index = self.raw.raft.raft_log.last_index();
        if index == index_before {
            waiter(Err(ProposeError::Dropped("raft did not append the conf change".into())));
            return;
        }
        let term = self.raw.raft.term;
        self.pending.insert(index, Pending::ConfChange { term, waiter });
    }

    /// Queues a linearizable read; `waiter` hears the read index once this
    /// replica has applied up to it (leader only).
    pub fn read(&mut self, waiter: Responder<u64>) {
        if !self.is_leader() {
            waiter(Err(ProposeError::NotLeader { leader_id: self.leader_id() }));
            return;
        }
        if self.reads_queued.len() >= READS_PER_ROUND_MAX {
            waiter(Err(ProposeError::Dropped("too many reads waiting".into())));
            return;
        }
        self.reads_queued.push(waiter);
    }

    /// Starts one ReadIndex round for every queued read.
    pub fn flush_reads(&mut self) {
        // raft-rs drops a ReadIndex request until the leader has committed an
        // entry of its own term; keep reads queued until then.
        if self.reads_queued.is_empty() || !self.is_leader() || !self.raw.raft.commit_to_current_term() {
            return;
        }
        let context = self.read_context_next;
        self.read_context_next += 1;
        let waiters = std::mem::take(&mut self.reads_queued);
        self.reads_in_flight.insert(context, waiters);
        self.raw.read_index(context.to_be_bytes().to_vec());
    }

    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    /// Handles one Ready, in the contract's order. `send` is called with
    /// messages that may leave now: first the leader's (in parallel with the
    /// local write), then the ones that acknowledge what this call persisted.
    pub fn handle_ready(&mut self, send: &mut dyn FnMut(Vec<Message>)) {
        if !self.raw.has_ready() {
            return;
        }
        let mut ready = self.raw.ready();
        if let Some(soft_state) = ready.ss() {
            self.on_soft_state(soft_state.raft_state, soft_state.leader_id);
        }
        // 3. A leader's messages go out at once, in parallel with the write.
        let messages = ready.take_messages();
        if !messages.is_empty() {
            send(messages);
        }
        // 4. A snapshot is installed durably before anything else.
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone());
        }
        for read_state in ready.take_read_states() {
            self.on_read_state(read_state.index, &read_state.request_ctx);
        }
        // 5. Apply committed entries (all of them are persisted locally).
        let committed = ready.take_committed_entries();
        self.apply_entries(committed);
        // 6. Append entries and the hard state in one batch; fsync if asked.
        let started = std::time::Instant::now();
        let must_sync = ready.must_sync();
        let hard_state = ready.hs().cloned();
        self.raw.mut_store().append(ready.entries(), hard_state.as_ref(), must_sync);
        if must_sync {
            self.metrics.fsync_seconds.observe(started.elapsed().as_secs_f64());
        }
        // 7. Acknowledgements only after the write is durable.
        let persisted = ready.take_persisted_messages();
        if !persisted.is_empty() {
            send(persisted);
        }
        // 8. Advance, then the light ready.
        let mut light = self.raw.advance(ready);
        let messages = light.take_messages();
        if !messages.is_empty() {
            send(messages);
        }
        let committed = light.take_committed_entries();
        self.apply_entries(committed);
        self.raw.advance_apply();
        self.serve_ready_reads();
        self.maybe_compact();
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let raft = &self.raw.raft;
        self.metrics.term.set(raft.term as i64);
        self.metrics.commit_index.set(raft.raft_log.committed as i64);
        self.metrics.applied_index.set(self.applied_index as i64);
        self.metrics.apply_lag_entries.set(raft.raft_log.committed.saturating_sub(self.applied_index) as i64);
        self.metrics.is_leader.set(if self.is_leader() { 1 } else { 0 });
    }

    fn on_soft_state(&mut self, role: StateRole, leader_id: u64) {
        if leader_id != self.leader_id && leader_id != 0 {
            self.metrics.leader_changes_total.inc();
        }
        let was_leader = self.role == StateRole::Leader;
        self.role = role;
        self.leader_id = leader_id;
        tracing::info!(
            replica = self.config.replica_id,
            role = role_str(role),
            leader = leader_id,
            term = self.raw.raft.term,
            "role changed"
        );
        if was_leader && role != StateRole::Leader {
            self.fail_all_waiters(leader_id);
        }
    }

    /// Leadership was lost: nobody here can learn the outcome of in-flight
    /// proposals or serve waiting reads.
    fn fail_all_waiters(&mut self, leader_id: u64) {
        let error = ProposeError::Superseded { leader_id };
        for (_, pending) in std::mem::take(&mut self.pending) {
            match pending {
                Pending::Commands { waiters, .. } => {
                    for (_, waiter) in waiters {
                        waiter(Err(error.clone()));
                    }
                }
                Pending::ConfChange { waiter, .. } => waiter(Err(error.clone())),
            }
        }
        for (_, waiter) in self.queued_waiters.drain(..) {
            waiter(Err(error.clone()));
        }
        self.queued_commands.clear();
        let reads = self.reads_queued.drain(..).chain(self.reads_in_flight.drain().flat_map(|(_, w)| w));
        let reads: Vec<_> = reads.chain(self.reads_ready.drain(..).flat_map(|(_, w)| w)).collect();
        for waiter in reads {
            waiter(Err(error.clone()));
        }
    }

    fn on_read_state(&mut self, index: u64, context: &[u8]) {
        let Ok(bytes) = <[u8; 8]>::try_from(context) else { return };
        if let Some(waiters) = self.reads_in_flight.remove(&u64::from_be_bytes(bytes)) {
            self.reads_ready.push_back((index, waiters));
        }
    }

    fn serve_ready_reads(&mut self) {
        while let Some((index, _)) = self.reads_ready.front() {
            if *index > self.applied_index {
                break;
            }
            let (index, waiters) = self.reads_ready.pop_front().expect("front exists");
            for waiter in waiters {
                waiter(Ok(index));
            }
        }
    }

    fn install_snapshot(&mut self, snapshot: raft::eraftpb::Snapshot) {
        let index = snapshot.get_metadata().index;
        assert!(index > self.applied_index, "snapshot at {index} is not past applied {}", self.applied_index);
        if let Err(err) = self.raw.mut_store().install_snapshot(&snapshot) {
            panic!("cannot install snapshot at {index}: {err}");
        }
        self.applied_index = index;
        self.sm.restored();
        self.peers = load_peers(&self.db);
        self.snapshots_installed += 1;
        self.metrics.snapshots_installed_total.inc();
        tracing::info!(replica = self.config.replica_id, index, "installed snapshot");
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        let Some(last) = entries.last() else { return };
        let last_index = last.index;
        let db = self.db.clone();
        let bytes = entries.iter().map(|e| e.data.len()).sum();
        let mut batch = ApplyBatch::for_bytes(&db, bytes);
        let mut applied: Vec<(u64, u64, Applied<SM::Output>)> = Vec::new();
        let mut conf_state = None;
        for entry in entries {
            assert_eq!(entry.index, self.applied_index + 1, "entries must apply in order, each once");
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {}
                EntryType::EntryNormal => {
                    let result = self.sm.apply(&mut batch, entry.index, &entry.data);
                    applied.push((entry.index, entry.term, Applied::Commands(result)));
                }
                EntryType::EntryConfChange => {
                    let change = ConfChange::parse_from_bytes(&entry.data)
                        .unwrap_or_else(|e| panic!("entry {} holds a corrupt conf change: {e}", entry.index));
                    // raft-rs refuses a change its rules forbid (removing
                    // the last voter) before changing anything; every
                    // replica refuses the same entry the same way, so it is
                    // skipped, and its proposer hears that it did not apply.
                    match self.raw.apply_conf_change(&change) {
                        Ok(cs) => {
                            self.record_peer_change(&mut batch, &change);
                            applied.push((entry.index, entry.term, Applied::ConfChange(cs.clone())));
                            conf_state = Some(cs);
                        }
                        Err(e) => tracing::error!(index = entry.index, "conf change skipped: raft refused it: {e}"),
                    }
                }
                // cellbank never proposes one, and refuses snapshots and
                // appends that would lead raft-rs to (leaving a joint
                // configuration); one in the log is applied as raft-rs
                // rules say, or skipped as every replica skips it.
                EntryType::EntryConfChangeV2 => {
                    let outcome = raft::eraftpb::ConfChangeV2::parse_from_bytes(&entry.data)
                        .map_err(|e| e.to_string())
                        .and_then(|change| self.raw.apply_conf_change(&change).map_err(|e| e.to_string()));
                    match outcome {
                        Ok(cs) => {
                            tracing::warn!(index = entry.index, "applied a joint conf change");
                            applied.push((entry.index, entry.term, Applied::ConfChange(cs.clone())));
                            conf_state = Some(cs);
                        }
                        Err(e) => tracing::error!(index = entry.index, "joint conf change skipped: {e}"),
                    }
                }
            }
            self.applied_index = entry.index;
        }
        self.raw.mut_store().write_apply(batch.into_write_batch(), last_index, conf_state.as_ref());
        self.deliver(applied);
    }

    fn record_peer_change(&mut self, batch: &mut ApplyBatch, change: &ConfChange) {
        use super::Kv;
        match change.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                if let Ok(peer) = PeerAddress::decode(change.context.as_ref()) {
                    if !peer.addr.is_empty() {
                        batch.put(&peer_key(change.node_id), peer.addr.as_bytes());
                        self.peers.insert(change.node_id, peer.addr);
                    }
                }
            }
            ConfChangeType::RemoveNode => {
                batch.delete(&peer_key(change.node_id));
                self.peers.remove(&change.node_id);
            }
        }
    }

    /// Hands each applied entry's outputs to its proposer, in index order,
    /// if the entry is the one it proposed (same term); fails every waiter
    /// whose index was passed without a match.
    fn deliver(&mut self, applied: Vec<(u64, u64, Applied<SM::Output>)>) {
        let leader_id = self.leader_id();
        for (index, term, outcome) in applied {
            self.fail_pending_before(index, leader_id);
            let Some(pending) = self.pending.remove(&index) else { continue };
            match (pending, outcome) {
                (Pending::Commands { term: proposed_term, waiters }, Applied::Commands(mut outputs))
                    if proposed_term == term =>
                {
                    let total: usize = waiters.iter().map(|(count, _)| count).sum();
                    assert_eq!(total, outputs.len(), "entry {index}: one output per proposed command");
                    for (count, waiter) in waiters.into_iter().rev() {
                        let tail = outputs.split_off(outputs.len() - count);
                        waiter(Ok(tail));
                    }
                }
                (Pending::ConfChange { term: proposed_term, waiter }, Applied::ConfChange(cs))
                    if proposed_term == term =>
                {
                    waiter(Ok((cs, self.peers.clone())))
                }
                (other, _) => self.fail_pending(other, leader_id),
            }
        }
        self.fail_pending_before(self.applied_index + 1, leader_id);
    }

    fn fail_pending_before(&mut self, index: u64, leader_id: u64) {
        while let Some((&first, _)) = self.pending.first_key_value() {
            if first >= index {
                break;
            }
            let (_, pending) = self.pending.pop_first().expect("first exists");
            self.fail_pending(pending, leader_id);
        }
    }

    fn fail_pending(&mut self, pending: Pending<SM::Output>, leader_id: u64) {
        let error = ProposeError::Superseded { leader_id };
        match pending {
            Pending::Commands { waiters, .. } => {
                for (_, waiter) in waiters {
                    waiter(Err(error.clone()));
                }
            }
            Pending::ConfChange { waiter, .. } => waiter(Err(error)),
        }
    }

    /// Compacts the log when it holds too many entries or too many bytes,
    /// never past the applied index, and (on the leader) not past what an
    /// active follower still needs unless the log has grown far too large.
    fn maybe_compact(&mut self) {
        let store = self.raw.store();
        let truncated = store.truncated_index();
        let log_bytes = store.log_bytes();
        let over_entries = self.applied_index.saturating_sub(truncated) >= self.config.log_compact_threshold_entries;
        let over_bytes = log_bytes >= self.config.log_compact_threshold_bytes;
        if !over_entries && !over_bytes {
            return;
        }
        let mut target = self.applied_index.saturating_sub(self.config.log_retain_entries);
        if over_bytes {
            target = target.max(store.compaction_index_for_bytes(self.config.log_compact_threshold_bytes / 2));
        }
        let far_too_large = log_bytes >= self.config.log_compact_threshold_bytes.saturating_mul(4);
        if self.is_leader() && !far_too_large {
            target = target.min(self.slowest_active_follower(target));
            if self.retain_floor > 0 && self.applied_index.saturating_sub(self.retain_floor) <= LAGGARD_ENTRIES_MAX {
                target = target.min(self.retain_floor.saturating_sub(1));
            }
        }
        let target = target.min(self.applied_index);
        if target > truncated {
            let applied = self.applied_index;
            self.raw.mut_store().compact(target, applied);
            tracing::debug!(replica = self.config.replica_id, to = target, "compacted the log");
        }
    }

    /// The lowest index an active follower still needs from the log: its
    /// matched index, or the index of the snapshot it is installing. A
    /// follower further behind than [`LAGGARD_ENTRIES_MAX`] is not waited for.
    fn slowest_active_follower(&self, target: u64) -> u64 {
        let mut lowest = target;
        for (id, progress) in self.raw.raft.prs().iter() {
            if *id == self.config.replica_id || !progress.recent_active {
                continue;
            }
            let needs = progress.matched.max(progress.pending_snapshot);
            if self.applied_index.saturating_sub(needs) <= LAGGARD_ENTRIES_MAX {
                lowest = lowest.min(needs);
            }
        }
        lowest
    }

    /// Keeps log entries from `index` on (while within [`LAGGARD_ENTRIES_MAX`]
    /// of the applied index); 0 lifts the floor.
    pub fn set_retain_floor(&mut self, index: u64) {
        self.retain_floor = index;
    }

    pub fn status(&self) -> NodeStatus {
        let raft = &self.raw.raft;
        let cs = self.raw.store().conf_state();
        NodeStatus {
            replica_id: self.config.replica_id,
            role: raft.state,
            term: raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: self.applied_index,
            leader_id: raft.leader_id,
            first_log_index: self.raw.store().truncated_index() + 1,
            last_log_index: raft.raft_log.last_index(),
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            peers: self.peers.clone(),
            snapshots_installed: self.snapshots_installed,
        }
    }
}

/// A snapshot raft-rs can restore without aborting: its metadata names a
/// real index and term and a configuration raft-rs's own change rules can
/// rebuild, and its body decodes.
fn check_snapshot(message: &Message) -> Result<(), StepError> {
    let bad = |why: String| StepError::BadSnapshot { from: message.from, why };
    let snapshot = message.get_snapshot();
    let metadata = snapshot.get_metadata();
    if metadata.index == 0 || metadata.index > TERM_INDEX_MAX || metadata.term == 0 || metadata.term > message.term {
        return Err(bad(format!(
            "index {} term {} in a message of term {}",
            metadata.index, metadata.term, message.term
        )));
    }
    let cs = metadata.get_conf_state();
    // cellbank changes membership one replica at a time and never enters a
    // joint configuration; raft-rs would leave one by proposing a joint
    // conf change of its own.
    if !cs.voters_outgoing.is_empty() || !cs.learners_next.is_empty() || cs.auto_leave {
        return Err(bad(format!("a joint configuration {cs:?}")));
    }
    check_conf_state(cs).map_err(bad)?;
    crate::snapshot::BodyRef::decode(&snapshot.data).map_err(|e| bad(e.to_string()))?;
    Ok(())
}

/// Rebuilds a configuration the way raft-rs does when it restores a
/// snapshot (`confchange::restore`) and requires the same result: raft-rs
/// aborts on a configuration it cannot rebuild or that comes out different.
pub fn check_conf_state(cs: &ConfState) -> Result<(), String> {
    use raft::eraftpb::ConfChangeSingle;
    let lists = [&cs.voters, &cs.learners, &cs.voters_outgoing, &cs.learners_next];
    for list in lists {
        let mut sorted = list.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != list.len() || sorted.first() == Some(&0) {
            return Err(format!("a configuration list with repeats or replica 0: {list:?}"));
        }
    }
    if cs.voters.is_empty() {
        return Err("a configuration without voters".into());
    }
    let single = |id: u64, change_type: ConfChangeType| {
        let mut change = ConfChangeSingle::default();
        change.node_id = id;
        change.set_change_type(change_type);
        change
    };
    let mut tracker = raft::ProgressTracker::new(1);
    let outgoing: Vec<_> = cs.voters_outgoing.iter().map(|&id| single(id, ConfChangeType::AddNode)).collect();
    let mut incoming: Vec<_> = cs.voters_outgoing.iter().map(|&id| single(id, ConfChangeType::RemoveNode)).collect();
    incoming.extend(cs.voters.iter().map(|&id| single(id, ConfChangeType::AddNode)));
    incoming.extend(cs.learners.iter().map(|&id| single(id, ConfChangeType::AddLearnerNode)));
    incoming.extend(cs.learners_next.iter().map(|&id| single(id, ConfChangeType::AddLearnerNode)));
    let refused = |e: raft::Error| format!("configuration {cs:?} cannot be rebuilt: {e}");
    if outgoing.is_empty() {
        if cs.auto_leave || !cs.learners_next.is_empty() {
            return Err(format!("configuration {cs:?} is not joint but carries joint fields"));
        }
        for change in incoming {
            let (conf, changes) = raft::Changer::new(&tracker).simple(&[change]).map_err(refused)?;
            tracker.apply_conf(conf, changes, 1);
        }
    } else {
        for change in outgoing {
            let (conf, changes) = raft::Changer::new(&tracker).simple(&[change]).map_err(refused)?;
            tracker.apply_conf(conf, changes, 1);
        }
        let (conf, changes) = raft::Changer::new(&tracker).enter_joint(cs.auto_leave, &incoming).map_err(refused)?;
        tracker.apply_conf(conf, changes, 1);
    }
    let rebuilt = tracker.conf().to_conf_state();
    let sorted = |v: &[u64]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    };
    let same = sorted(&rebuilt.voters) == sorted(&cs.voters)
        && sorted(&rebuilt.learners) == sorted(&cs.learners)
        && sorted(&rebuilt.voters_outgoing) == sorted(&cs.voters_outgoing)
        && sorted(&rebuilt.learners_next) == sorted(&cs.learners_next)
        && rebuilt.auto_leave == cs.auto_leave;
    if !same {
        return Err(format!("configuration {cs:?} rebuilds as {rebuilt:?}"));
    }
    Ok(())
}

/// True when a message carries a snapshot (sent through the chunked path).
pub fn is_snapshot(message: &Message) -> bool {
    message.get_msg_type() == MessageType::MsgSnapshot
}

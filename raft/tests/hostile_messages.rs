//! Fuzzing of `RaftNode::step`, the one door through which network bytes
//! reach raft-rs. A cell of three real `RaftNode`s (real RocksDB) runs a
//! simulated network; between honest rounds, hostile messages of every type
//! with random terms, indexes, commits, entries (any type, any bytes) and
//! snapshots (random metadata and bodies) are stepped into random replicas,
//! and the replicas go on ticking, electing, replicating and applying.
//!
//! The property: no input reaches a panic (raft-rs aborts the process on
//! several impossible inputs, and the storage asserts contiguous appends),
//! neither in `step` nor in the Ready handling that follows. Inputs the
//! node cannot take safely must be refused by `step` with an error.
//!
//! `CELLBANK_FUZZ_CASES` sets the number of hostile messages (default
//! 20,000); `CELLBANK_FUZZ_SEED` the seed (default: random, printed).

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use cellbank_raft::metrics::RaftMetrics;
use cellbank_raft::node::{NodeConfig, RaftNode};
use cellbank_raft::snapshot::SnapshotDir;
use cellbank_raft::storage::{open_db, STATE_PREFIX};
use cellbank_raft::{Kv, StateMachine};
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType,
    Snapshot,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Takes any entry: counts what it applied. Hostile entries that a forged
/// leader gets committed are still applied without a panic here, so the
/// test looks at the Raft layer alone.
struct Counter;

impl StateMachine for Counter {
    type Command = Vec<u8>;
    type Output = u64;

    fn encode_batch(&self, commands: Vec<Vec<u8>>, _timestamp_ms: u64) -> Vec<u8> {
        commands.concat()
    }

    fn apply(&mut self, kv: &mut dyn Kv, index: u64, data: &[u8]) -> Vec<u64> {
        kv.put(&[STATE_PREFIX, b'c'], &index.to_be_bytes());
        vec![data.len() as u64]
    }
}

const REPLICAS: u64 = 3;

struct Cell {
    _dir: tempfile::TempDir,
    nodes: BTreeMap<u64, RaftNode<Counter>>,
    in_flight: Vec<Message>,
}

/// A directory in memory when the machine has one: the test fsyncs on every
/// append and is about steps, not disks.
fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().expect("temporary directory")
}

impl Cell {
    fn new() -> Cell {
        let dir = scratch_dir();
        let bootstrap: BTreeMap<u64, String> =
            (1..=REPLICAS).map(|id| (id, format!("127.0.0.1:{}", 9000 + id))).collect();
        let mut nodes = BTreeMap::new();
        for id in 1..=REPLICAS {
            let db = open_db(&dir.path().join(id.to_string()));
            let snapshots = Arc::new(SnapshotDir::open(&dir.path().join(format!("{id}-snapshots"))));
            let mut config = NodeConfig::new(id);
            // Snapshots and compaction are part of what is exercised.
            config.log_compact_threshold_entries = 40;
            config.log_retain_entries = 10;
            let metrics = Arc::new(RaftMetrics::new(1, id));
            nodes.insert(id, RaftNode::open(config, db, Counter, &bootstrap, snapshots, metrics));
        }
        let mut cell = Cell { _dir: dir, nodes, in_flight: Vec::new() };
        cell.nodes.get_mut(&1).expect("replica 1").campaign();
        cell.settle(50);
        cell
    }

    /// Honest rounds: every replica handles its Ready, queued messages are
    /// delivered (an honest message a replica refuses is dropped, as the
    /// transport does).
    fn settle(&mut self, rounds: usize) {
        for _ in 0..rounds {
            for node in self.nodes.values_mut() {
                node.flush_proposals(1);
                while node.has_ready() {
                    let in_flight = &mut self.in_flight;
                    node.handle_ready(&mut |messages| in_flight.extend(messages));
                }
            }
            if self.in_flight.is_empty() {
                return;
            }
            for message in std::mem::take(&mut self.in_flight) {
                // A snapshot's body travels as the transport carries it,
                // from the sender's files to the receiver's.
                if message.get_msg_type() == MessageType::MsgSnapshot {
                    let (from, to) = (self.nodes.get(&message.from), self.nodes.get(&message.to));
                    if let (Some(from), Some(to)) = (from, to) {
                        let _ = to.snapshots().carry_from(from.snapshots(), message.get_snapshot(), |_, _| Ok(()));
                    }
                }
                if let Some(node) = self.nodes.get_mut(&message.to) {
                    let _ = node.step(message);
                }
            }
        }
    }

    fn leader(&mut self) -> Option<&mut RaftNode<Counter>> {
        self.nodes.values_mut().find(|node| node.is_leader())
    }
}

/// Numbers around what the target holds, and the extremes.
fn near(rng: &mut StdRng, around: u64) -> u64 {
    match rng.gen_range(0..8) {
        0 => 0,
        1 => u64::MAX,
        2 => u64::MAX - rng.gen_range(0..3),
        3 => rng.gen(),
        _ => around.saturating_add(rng.gen_range(0..6)).saturating_sub(3),
    }
}

fn bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let len = rng.gen_range(0..=max);
    (0..len).map(|_| rng.gen()).collect()
}

fn conf_state(rng: &mut StdRng) -> ConfState {
    let ids = |rng: &mut StdRng| -> Vec<u64> { (0..rng.gen_range(0..4)).map(|_| rng.gen_range(0..6)).collect() };
    let mut cs = ConfState { voters: ids(rng), learners: ids(rng), ..Default::default() };
    if rng.gen_bool(0.3) {
        cs.voters_outgoing = ids(rng);
        cs.learners_next = ids(rng);
        cs.auto_leave = rng.gen();
    }
    cs
}

fn entry_data(rng: &mut StdRng, entry_type: EntryType) -> Vec<u8> {
    match (entry_type, rng.gen_range(0..3)) {
        (EntryType::EntryConfChange, 0) => {
            let mut change = ConfChange::default();
            change.set_change_type(match rng.gen_range(0..3) {
                0 => ConfChangeType::AddNode,
                1 => ConfChangeType::RemoveNode,
                _ => ConfChangeType::AddLearnerNode,
            });
            change.node_id = rng.gen_range(0..6);
            change.write_to_bytes().expect("encode")
        }
        (EntryType::EntryConfChangeV2, 0) => {
            let mut change = ConfChangeV2::default();
            for _ in 0..rng.gen_range(0..3) {
                let mut single = ConfChangeSingle { node_id: rng.gen_range(0..6), ..Default::default() };
                single.set_change_type(if rng.gen() { ConfChangeType::AddNode } else { ConfChangeType::RemoveNode });
                change.changes.push(single);
            }
            change.write_to_bytes().expect("encode")
        }
        _ => bytes(rng, 24),
    }
}

const TYPES: [MessageType; 19] = [
    MessageType::MsgHup,
    MessageType::MsgBeat,
    MessageType::MsgPropose,
    MessageType::MsgAppend,
    MessageType::MsgAppendResponse,
    MessageType::MsgRequestVote,
    MessageType::MsgRequestVoteResponse,
    MessageType::MsgSnapshot,
    MessageType::MsgHeartbeat,
    MessageType::MsgHeartbeatResponse,
    MessageType::MsgUnreachable,
    MessageType::MsgSnapStatus,
    MessageType::MsgCheckQuorum,
    MessageType::MsgTransferLeader,
    MessageType::MsgTimeoutNow,
    MessageType::MsgReadIndex,
    MessageType::MsgReadIndexResp,
    MessageType::MsgRequestPreVote,
    MessageType::MsgRequestPreVoteResponse,
];

/// One hostile message for `to`, shaped around what `to` holds. Half are
/// wild (any field anything); half are plausible (the shape an honest peer
/// sends, with lies in the values) so that many get past the refusals and
/// into raft-rs.
fn hostile(rng: &mut StdRng, to: u64, term: u64, last_index: u64, commit: u64) -> Message {
    let plausible = rng.gen_bool(0.5);
    // Plausible numbers: near what the target holds, never extreme.
    let value = |rng: &mut StdRng, around: u64| -> u64 {
        if plausible {
            around.saturating_add(rng.gen_range(0..5)).saturating_sub(2).max(1)
        } else {
            near(rng, around)
        }
    };
    let kind = TYPES[rng.gen_range(0..TYPES.len())];
    let mut message = Message::default();
    message.set_msg_type(kind);
    message.to = to;
    message.from = match (plausible, rng.gen_range(0..6)) {
        (true, _) => (to % REPLICAS) + 1 + rng.gen_range(0..REPLICAS - 1) % REPLICAS,
        (false, 0) => 0,
        (false, 1) => rng.gen(),
        (false, _) => rng.gen_range(1..=REPLICAS + 1),
    };
    if message.from == to {
        message.from = to % REPLICAS + 1;
    }
    message.term = if plausible && kind == MessageType::MsgReadIndex { 0 } else { value(rng, term) };
    let around = if rng.gen() { last_index } else { commit };
    message.index = value(rng, around);
    message.log_term =
        if plausible { message.term.saturating_sub(rng.gen_range(0..2)).max(1) } else { near(rng, term) };
    let around = if rng.gen() { last_index } else { commit };
    message.commit = value(rng, around).min(if plausible { last_index } else { u64::MAX });
    message.reject = rng.gen_bool(0.2);
    message.reject_hint = value(rng, last_index);
    message.request_snapshot = if rng.gen_bool(0.1) { value(rng, commit) } else { 0 };
    message.commit_term = value(rng, term);
    message.priority = if rng.gen_bool(0.1) { rng.gen() } else { 0 };
    if rng.gen_bool(0.2) {
        message.context = bytes(rng, 12).into();
    }
    let reads = matches!(kind, MessageType::MsgReadIndex | MessageType::MsgReadIndexResp);
    let count = match (plausible, kind) {
        (true, _) if reads => 1,
        (true, MessageType::MsgAppend) => rng.gen_range(0..5),
        (true, _) => 0,
        (false, _) if rng.gen_bool(0.5) => rng.gen_range(1..5),
        (false, _) => 0,
    };
    let contiguous = plausible || rng.gen_bool(0.7);
    let mut entry_term = message.log_term;
    for offset in 0..count {
        let mut entry = Entry::default();
        let entry_type = match rng.gen_range(0..8) {
            0 => EntryType::EntryConfChange,
            1 if !plausible => EntryType::EntryConfChangeV2,
            _ => EntryType::EntryNormal,
        };
        entry.set_entry_type(entry_type);
        entry.index = if contiguous { message.index.wrapping_add(1 + offset) } else { near(rng, last_index) };
        if rng.gen_bool(0.3) {
            entry_term = if plausible { (entry_term + 1).min(message.term) } else { near(rng, term) };
        }
        entry.term = entry_term;
        entry.data = entry_data(rng, entry_type).into();
        if rng.gen_bool(0.1) {
            entry.context = bytes(rng, 8).into();
        }
        message.entries.push(entry);
    }
    if kind == MessageType::MsgSnapshot || (!plausible && rng.gen_bool(0.05)) {
        let mut snapshot = Snapshot::default();
        let metadata = snapshot.mut_metadata();
        metadata.index = value(rng, last_index);
        metadata.term = if plausible { message.term } else { near(rng, term) };
        *metadata.mut_conf_state() = if plausible && rng.gen() {
            ConfState { voters: (1..=REPLICAS).collect(), ..Default::default() }
        } else {
            conf_state(rng)
        };
        snapshot.data = if plausible || rng.gen() { Vec::new().into() } else { bytes(rng, 40).into() };
        *message.mut_snapshot() = snapshot;
    }
    message
}

/// `CELLBANK_FUZZ_CASES` (default 20,000) and `CELLBANK_FUZZ_SEED`
/// (default random).
fn fuzz_settings() -> (u64, u64) {
    let read = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    (read("CELLBANK_FUZZ_CASES").unwrap_or(20_000), read("CELLBANK_FUZZ_SEED").unwrap_or_else(rand::random))
}

#[test]
fn no_hostile_message_makes_a_replica_panic() {
    let (cases, seed) = fuzz_settings();
    println!("hostile raft messages: {cases} cases, seed {seed} (CELLBANK_FUZZ_SEED={seed} repeats this run)");
    let mut rng = StdRng::seed_from_u64(seed);
    // Each cell lives for a while: hostile terms and logs pile up, elections
    // and compaction run in between, then a fresh cell starts.
    const CASES_PER_CELL: u64 = 400;
    let mut cell = Cell::new();
    let (mut refused, mut stepped) = (0u64, 0u64);
    for case in 0..cases {
        if case > 0 && case % CASES_PER_CELL == 0 {
            cell = Cell::new();
        }
        let to = rng.gen_range(1..=REPLICAS);
        let status = cell.nodes[&to].status();
        let message = hostile(&mut rng, to, status.term, status.last_log_index, status.commit_index);
        let shown = format!("{message:?}");
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let node = cell.nodes.get_mut(&to).expect("replica");
            let accepted = node.step(message).is_ok();
            // What raft does with it shows in the Ready that follows, and
            // in the honest traffic after that.
            cell.settle(20);
            if rng.gen_bool(0.3) {
                for node in cell.nodes.values_mut() {
                    node.tick();
                }
            }
            if rng.gen_bool(0.3) {
                if let Some(leader) = cell.leader() {
                    leader.submit(vec![b"honest".to_vec()], Box::new(|_| {}));
                }
            }
            cell.settle(20);
            accepted
        }));
        match outcome {
            Ok(true) => stepped += 1,
            Ok(false) => refused += 1,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("case {case} (seed {seed}) panicked replica {to}: {why}\nmessage: {shown}");
            }
        }
    }
    println!("{cases} hostile messages: {stepped} taken by raft, {refused} refused by step; no panic");
    // Most plausible messages get through, so raft-rs itself is exercised.
    assert!(stepped * 10 > cases, "too few messages reached raft: {stepped} of {cases}");
    assert_eq!(stepped + refused, cases);
    assert!(refused > 0, "the generator must reach the refusals");
}

/// The other decoders on the Raft port, over arbitrary bytes and over
/// mutated valid inputs: a batch envelope, a message, and a snapshot body
/// (which a follower installs as its state). Each either decodes or is
/// refused; none panics. `CELLBANK_FUZZ_CASES` as above.
#[test]
fn transport_decoders_take_any_bytes() {
    use cellbank_proto::cell::{RaftBatch, SnapshotChunk};
    use prost::Message as _;
    let (cases, seed) = fuzz_settings();
    println!("transport decoders: {cases} cases, seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    // Valid inputs to mutate: a snapshot body of a few pairs, a message,
    // a sealed batch and a chunk.
    let mut body = Vec::new();
    for (key, value) in [(vec![STATE_PREFIX, b'a'], vec![1u8; 24]), (vec![STATE_PREFIX, b'k'], vec![0u8; 8])] {
        body.extend_from_slice(&(key.len() as u32).to_be_bytes());
        body.extend_from_slice(&key);
        body.extend_from_slice(&(value.len() as u32).to_be_bytes());
        body.extend_from_slice(&value);
    }
    let message = hostile(&mut rng, 1, 5, 10, 8).write_to_bytes().expect("encode");
    let mut batch =
        RaftBatch { cell_id: 1, messages: vec![message.clone()], cluster: "local".into(), ..Default::default() };
    batch.checksum = cellbank_client::integrity::raft_batch(&batch);
    let chunk =
        SnapshotChunk { cell_id: 1, message: message.clone(), total_len: 9, data: body.clone(), ..Default::default() };
    let seeds = [body, message, batch.encode_to_vec(), chunk.encode_to_vec()];
    let (mut bodies, mut batches, mut sealed) = (0u64, 0u64, 0u64);
    for _ in 0..cases {
        let bytes = if rng.gen_bool(0.3) {
            bytes(&mut rng, 64)
        } else {
            let mut bytes = seeds[rng.gen_range(0..seeds.len())].clone();
            for _ in 0..rng.gen_range(1..4) {
                let len = bytes.len();
                match rng.gen_range(0..4) {
                    0 if len > 0 => bytes[rng.gen_range(0..len)] ^= 1 << rng.gen_range(0..8),
                    1 if len > 0 => bytes.truncate(rng.gen_range(0..len)),
                    2 => bytes.insert(rng.gen_range(0..=len), rng.gen()),
                    _ if len > 0 => bytes[rng.gen_range(0..len)] = 0xff,
                    _ => bytes.push(rng.gen()),
                }
            }
            bytes
        };
        // A body decodes the same whole or pushed in pieces of any size
        // (as it arrives from the network).
        let whole = cellbank_raft::snapshot::decode_body(&bytes);
        let mut decoder = cellbank_raft::snapshot::BodyDecoder::new();
        let mut pieces = Ok(());
        let mut at = 0;
        while at < bytes.len() && pieces.is_ok() {
            let end = (at + rng.gen_range(1..=16)).min(bytes.len());
            pieces = decoder.push(&bytes[at..end], &mut |_, _| Ok(()));
            at = end;
        }
        let pieces = pieces.and_then(|()| decoder.finish());
        assert_eq!(whole.is_ok(), pieces.is_ok(), "{bytes:02x?}");
        bodies += u64::from(whole.is_ok());
        let _ = cellbank_raft::snapshot::BodyRef::decode(&bytes);
        let _ = Message::parse_from_bytes(&bytes);
        if let Ok(batch) = RaftBatch::decode(bytes.as_slice()) {
            batches += 1;
            sealed += u64::from(cellbank_client::integrity::raft_batch(&batch) == batch.checksum);
            for message in &batch.messages {
                let _ = Message::parse_from_bytes(message);
            }
        }
        let _ = SnapshotChunk::decode(bytes.as_slice()).map(|c| cellbank_client::integrity::snapshot_chunk(&c));
    }
    println!(
        "{cases} inputs: {bodies} snapshot bodies decoded, {batches} batches decoded, {sealed} of them still sealed"
    );
    assert!(bodies > 0 && batches > 0, "the inputs must reach the decoders' success paths");
}

/// The refusals do not refuse honest traffic: a leader transfer asked of a
/// follower is forwarded to the leader with the follower's term (as raft-rs
/// sends it) and still moves leadership.
#[test]
fn a_leader_transfer_asked_of_a_follower_still_moves_leadership() {
    let mut cell = Cell::new();
    let leader = cell.nodes.values().find(|n| n.is_leader()).expect("a leader").replica_id();
    let follower = (1..=REPLICAS).find(|id| *id != leader).expect("a follower");
    let target = (1..=REPLICAS).find(|id| *id != leader && *id != follower).expect("a third replica");
    cell.nodes.get_mut(&follower).expect("follower").transfer_leader(target);
    cell.settle(50);
    assert!(cell.nodes[&target].is_leader(), "leadership moved to replica {target}");
    assert_eq!(cell.nodes[&follower].leader_id(), target);
}

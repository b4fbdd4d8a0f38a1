//! Scenario scripts for the Raft layer: a cluster of real `RaftNode`s (real
//! RocksDB in temporary directories) on a simulated network that the script
//! controls message by message. No clocks: nodes tick only when told to, and
//! elections start only with `campaign`, so every run prints the same thing.
//!
//! Commands:
//! - `cluster nodes=N`: found a cell of N replicas.
//! - `campaign ID`: the replica starts an election.
//! - `propose ID KEY=VALUE`: a client proposes a write on that replica.
//! - `read ID`: a client asks that replica for a linearizable read barrier.
//! - `stabilize`: deliver messages and handle Ready until nothing moves.
//! - `deliver`: one round: every replica handles its Ready, then every queued
//!   message is delivered once.
//! - `partition ID...`: cut those replicas off from the rest; `heal` ends it.
//! - `tick ID [times=N]`: advance that replica's logical clock. A leader
//!   checks its quorum every 10 ticks; a follower's lease on its leader
//!   expires after 10 ticks and it campaigns by itself after 20.
//! - `crash ID` / `restart ID`: stop a replica (losing only what it never
//!   persisted) and start it again from its RocksDB.
//! - `status`, `state`: print roles and indexes; print each replica's data.
//!
//! Output lines prefixed `client:` are what proposers heard.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use cellbank_raft::metrics::RaftMetrics;
use cellbank_raft::node::{role_str, NodeConfig, RaftNode, StepError};
use cellbank_raft::storage::{open_db, STATE_PREFIX};
use cellbank_raft::{Kv, StateMachine};
use raft::eraftpb::{Message, MessageType};

/// A key-value state machine: each command is `key=value`.
struct KvMachine;

impl StateMachine for KvMachine {
    type Command = String;
    type Output = String;

    fn encode_batch(&self, commands: Vec<String>, _timestamp_ms: u64) -> Vec<u8> {
        commands.join("\n").into_bytes()
    }

    fn apply(&mut self, kv: &mut dyn Kv, index: u64, data: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(data).expect("utf-8 commands");
        text.lines()
            .map(|line| {
                let (key, value) = line.split_once('=').expect("key=value");
                let mut stored_key = vec![STATE_PREFIX];
                stored_key.extend_from_slice(key.as_bytes());
                kv.put(&stored_key, value.as_bytes());
                format!("{line} applied at {index}")
            })
            .collect()
    }
}

struct Cluster {
    dirs: BTreeMap<u64, tempfile::TempDir>,
    nodes: BTreeMap<u64, Option<RaftNode<KvMachine>>>,
    bootstrap: BTreeMap<u64, String>,
    in_flight: Vec<Message>,
    partitioned: BTreeSet<u64>,
    heard: Arc<Mutex<Vec<String>>>,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster {
            dirs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            bootstrap: BTreeMap::new(),
            in_flight: Vec::new(),
            partitioned: BTreeSet::new(),
            heard: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn open(&self, id: u64) -> RaftNode<KvMachine> {
        let dir = self.dirs[&id].path();
        let db = open_db(&dir.join("db"));
        let snapshots = Arc::new(cellbank_raft::snapshot::SnapshotDir::open(&dir.join("snapshots")));
        let mut config = NodeConfig::new(id);
        config.log_compact_threshold_entries = u64::MAX;
        // A follower campaigns by itself only after exactly 20 ticks, so
        // scripts are deterministic; the leader lease (check_quorum) is the
        // usual 10 ticks.
        config.min_election_tick = 20;
        config.max_election_tick = 21;
        RaftNode::open(config, db, KvMachine, &self.bootstrap, snapshots, Arc::new(RaftMetrics::new(1, id)))
    }

    fn node(&mut self, id: u64) -> Result<&mut RaftNode<KvMachine>, Box<dyn Error>> {
        match self.nodes.get_mut(&id) {
            Some(Some(node)) => Ok(node),
            Some(None) => Err(format!("replica {id} is crashed").into()),
            None => Err(format!("no replica {id}").into()),
        }
    }

    fn cut(&self, from: u64, to: u64) -> bool {
        self.partitioned.contains(&from) != self.partitioned.contains(&to)
    }

    /// Every live replica handles its Ready; messages are queued. Returns
    /// whether anything happened.
    fn ready_round(&mut self, out: &mut String) -> bool {
        let mut moved = false;
        for node in self.nodes.values_mut().flatten() {
            while node.has_ready() {
                moved = true;
                let mut sent = Vec::new();
                node.handle_ready(&mut |messages| sent.extend(messages));
                self.in_flight.extend(sent);
            }
        }
        self.flush_heard(out);
        moved
    }

    fn deliver_round(&mut self, out: &mut String) -> Result<bool, Box<dyn Error>> {
        let messages = std::mem::take(&mut self.in_flight);
        let moved = !messages.is_empty();
        for message in messages {
            let (from, to) = (message.from, message.to);
            let verdict = if self.cut(from, to) {
                " [dropped: partition]"
            } else if !matches!(self.nodes.get(&to), Some(Some(_))) {
                " [dropped: replica down]"
            } else {
                ""
            };
            writeln!(out, "n{from}→n{to} {}{verdict}", describe(&message))?;
            if verdict.is_empty() {
                self.node(to)?.step(message)?;
            }
        }
        Ok(moved)
    }

    fn flush_heard(&mut self, out: &mut String) {
        for line in self.heard.lock().unwrap().drain(..) {
            let _ = writeln!(out, "client: {line}");
        }
    }
}

fn describe(m: &Message) -> String {
    let kind = format!("{:?}", m.get_msg_type());
    match m.get_msg_type() {
        MessageType::MsgAppend => format!(
            "{kind} term={} prev={}/{} entries={} commit={}",
            m.term,
            m.index,
            m.log_term,
            m.entries.len(),
            m.commit
        ),
        MessageType::MsgAppendResponse => {
            format!("{kind} term={} index={} reject={}", m.term, m.index, m.reject)
        }
        MessageType::MsgRequestVote | MessageType::MsgRequestPreVote => {
            format!("{kind} term={} last={}/{}", m.term, m.index, m.log_term)
        }
        MessageType::MsgRequestVoteResponse | MessageType::MsgRequestPreVoteResponse => {
            format!("{kind} term={} reject={}", m.term, m.reject)
        }
        MessageType::MsgHeartbeat => format!("{kind} term={} commit={}", m.term, m.commit),
        MessageType::MsgSnapshot => {
            format!("{kind} term={} snapshot_index={}", m.term, m.get_snapshot().get_metadata().index)
        }
        _ => format!("{kind} term={}", m.term),
    }
}

struct Runner {
    cluster: Cluster,
}

impl goldenscript::Runner for Runner {
    type Command = goldenscript::Command;

    fn run(
        &mut self,
        command: &goldenscript::Command,
        _context: &goldenscript::Context,
    ) -> Result<String, Box<dyn Error>> {
        let mut out = String::new();
        let mut args = command.consume_args();
        let c = &mut self.cluster;
        match command.name.as_str() {
            "cluster" => {
                let n: u64 = args.take_key("nodes").ok_or("nodes=N")?.parse()?;
                args.reject_next()?;
                for id in 1..=n {
                    c.bootstrap.insert(id, format!("127.0.0.1:{}", 7100 + id));
                    c.dirs.insert(id, tempfile::tempdir()?);
                }
                for id in 1..=n {
                    let node = c.open(id);
                    c.nodes.insert(id, Some(node));
                }
                writeln!(out, "founded a cell of {n} replicas")?;
            }
            "campaign" => {
                let id: u64 = args.next_pos().ok_or("ID")?.parse()?;
                c.node(id)?.campaign();
            }
            "propose" => {
                let id: u64 = args.next_pos().ok_or("ID")?.parse()?;
                let (key, value) = args.next_key().ok_or("KEY=VALUE")?;
                let write = format!("{key}={value}");
                let heard = c.heard.clone();
                let label = write.clone();
                let node = c.node(id)?;
                node.submit(
                    vec![write],
                    Box::new(move |result| {
                        let line = match result {
                            Ok(outputs) => format!("n{id} {label}: {}", outputs.join(", ")),
                            Err(e) => format!("n{id} {label}: error: {e}"),
                        };
                        heard.lock().unwrap().push(line);
                    }),
                );
                node.flush_proposals(0);
                c.flush_heard(&mut out);
            }
            "read" => {
                let id: u64 = args.next_pos().ok_or("ID")?.parse()?;
                let heard = c.heard.clone();
                let node = c.node(id)?;
                node.read(Box::new(move |result| {
                    let line = match result {
                        Ok(index) => format!("n{id} read: linearizable at index {index}"),
                        Err(e) => format!("n{id} read: error: {e}"),
                    };
                    heard.lock().unwrap().push(line);
                }));
                node.flush_reads();
                c.flush_heard(&mut out);
            }
            "stabilize" => {
                for _ in 0..100 {
                    let readied = c.ready_round(&mut out);
                    let delivered = c.deliver_round(&mut out)?;
                    if !readied && !delivered {
                        break;
                    }
                }
            }
            "deliver" => {
                c.ready_round(&mut out);
                c.deliver_round(&mut out)?;
            }
            "partition" => {
                while let Some(id) = args.next_pos() {
                    c.partitioned.insert(id.parse()?);
                }
                writeln!(out, "partitioned {:?} from the rest", c.partitioned)?;
            }
            "heal" => {
                c.partitioned.clear();
                writeln!(out, "healed")?;
            }
            "tick" => {
                let id: u64 = args.next_pos().ok_or("ID")?.parse()?;
                let times: u64 = args.take_key("times").map(str::parse).transpose()?.unwrap_or(1);
                for _ in 0..times {
                    c.node(id)?.tick();
                }
            }
            "crash" => {
                let id: u64 = args.next_pos().ok_or("ID")?.parse()?;
                c.node(id)?;
                c.nodes.insert(id, None);
                writeln!(out, "n{id} crashed")?;
            }
            "restart" => {
                let id: u64 = args.next_pos().ok_or("ID")?.parse()?;
                c.nodes.insert(id, None);
                let node = c.open(id);
                let s = node.status();
                writeln!(
                    out,
                    "n{id} restarted: term={} commit={} applied={} last={}",
                    s.term, s.commit_index, s.applied_index, s.last_log_index
                )?;
                c.nodes.insert(id, Some(node));
            }
            "status" => {
                for (id, node) in &c.nodes {
                    match node {
                        Some(node) => {
                            let s = node.status();
                            writeln!(
                                out,
                                "n{id} {} term={} leader={} commit={} applied={} log={}..{}",
                                role_str(s.role),
                                s.term,
                                s.leader_id,
                                s.commit_index,
                                s.applied_index,
                                s.first_log_index,
                                s.last_log_index
                            )?;
                        }
                        None => writeln!(out, "n{id} down")?,
                    }
                }
            }
            "state" => {
                for id in c.nodes.keys().copied().collect::<Vec<_>>() {
                    if c.nodes[&id].is_none() {
                        writeln!(out, "n{id} down")?;
                        continue;
                    }
                    let node = c.node(id)?;
                    writeln!(out, "n{id} applied={} {}", node.applied_index(), node_state(node))?;
                }
            }
            other => return Err(format!("unknown command {other}").into()),
        }
        Ok(out)
    }
}

fn node_state(node: &RaftNode<KvMachine>) -> String {
    let db = node.db();
    let mut iter = db.raw_iterator();
    iter.seek([STATE_PREFIX]);
    let mut pairs = Vec::new();
    while iter.valid() && iter.key().unwrap()[0] == STATE_PREFIX {
        let key = String::from_utf8_lossy(&iter.key().unwrap()[1..]).to_string();
        let value = String::from_utf8_lossy(iter.value().unwrap()).to_string();
        pairs.push(format!("{key}={value}"));
        iter.next();
    }
    format!("{{{}}}", pairs.join(" "))
}

#[test]
fn election() -> std::io::Result<()> {
    goldenscript::run(&mut Runner { cluster: Cluster::new() }, "tests/scripts/raft/election")
}

#[test]
fn partition_and_heal() -> std::io::Result<()> {
    goldenscript::run(&mut Runner { cluster: Cluster::new() }, "tests/scripts/raft/partition")
}

#[test]
fn restart() -> std::io::Result<()> {
    goldenscript::run(&mut Runner { cluster: Cluster::new() }, "tests/scripts/raft/restart")
}

#[test]
fn leader_change_with_proposals_in_flight() -> std::io::Result<()> {
    goldenscript::run(&mut Runner { cluster: Cluster::new() }, "tests/scripts/raft/leader_change")
}

/// A forged heartbeat that commits past the follower's log, which raft-rs
/// answers by aborting the process, is refused before it reaches raft-rs;
/// the follower goes on following its real leader.
#[test]
fn a_heartbeat_committing_past_the_log_is_refused_and_the_replica_goes_on() -> Result<(), Box<dyn Error>> {
    let mut c = Cluster::new();
    for id in 1..=3 {
        c.bootstrap.insert(id, format!("127.0.0.1:{}", 7100 + id));
        c.dirs.insert(id, tempfile::tempdir()?);
    }
    for id in 1..=3 {
        let node = c.open(id);
        c.nodes.insert(id, Some(node));
    }
    let mut out = String::new();
    c.node(1)?.campaign();
    for _ in 0..100 {
        if !c.ready_round(&mut out) && !c.deliver_round(&mut out)? {
            break;
        }
    }
    let mut forged = Message::default();
    forged.set_msg_type(MessageType::MsgHeartbeat);
    forged.from = 1;
    forged.to = 2;
    forged.term = 1_000;
    forged.commit = 1_000_000;
    let refused = c.node(2)?.step(forged).expect_err("a heartbeat past the log must be refused");
    assert!(matches!(refused, StepError::CommitPastLog { commit: 1_000_000, .. }), "{refused}");
    // Still a working follower: a write through the leader reaches it.
    let heard = c.heard.clone();
    let leader = c.node(1)?;
    leader.submit(vec!["k=v".into()], Box::new(move |r| heard.lock().unwrap().push(format!("{r:?}"))));
    leader.flush_proposals(0);
    for _ in 0..100 {
        if !c.ready_round(&mut out) && !c.deliver_round(&mut out)? {
            break;
        }
    }
    let mut key = vec![STATE_PREFIX];
    key.extend_from_slice(b"k");
    assert_eq!(c.node(2)?.db().get(&key)?.as_deref(), Some(&b"v"[..]), "{out}");
    Ok(())
}

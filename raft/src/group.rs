//! Starts one replica of a Raft group: the node (on its own thread) and its
//! transport, wired so that delivery reports reach the node. Ledger cells
//! and the routers' table group both start here.

use std::collections::BTreeMap;
use std::sync::Arc;

use rocksdb::DB;

use super::driver::{self, DriverHandle, Input, MessageSink};
use super::node::{election_stagger_ticks, NodeConfig, RaftNode};
use super::snapshot::SnapshotDir;
use super::transport::{GrpcTransport, Report};
use super::StateMachine;
use crate::config::RaftTuning;
use crate::metrics::RaftMetrics;

pub struct Group<SM: StateMachine> {
    pub handle: DriverHandle<SM>,
    pub thread: std::thread::JoinHandle<()>,
    pub transport: Arc<GrpcTransport>,
}

/// What identifies a replica within its group.
pub struct GroupMember<'a> {
    /// The cluster's name, carried by every message to the group's peers.
    pub cluster: &'a str,
    pub group_id: u64,
    pub replica_id: u64,
    /// This replica's gRPC address, as peers should dial it.
    pub addr: String,
    pub tuning: &'a RaftTuning,
    /// The founding members (empty when joining an existing group).
    pub peers: &'a BTreeMap<u64, String>,
    /// Where snapshot bodies are built and received.
    pub snapshot_dir: std::path::PathBuf,
}

pub fn node_config(replica_id: u64, tuning: &RaftTuning) -> NodeConfig {
    let mut node_config = NodeConfig::new(replica_id);
    node_config.election_tick = tuning.election_tick;
    node_config.min_election_tick = tuning.election_tick + election_stagger_ticks(replica_id);
    node_config.max_election_tick = node_config.min_election_tick + 1;
    node_config.heartbeat_tick = tuning.heartbeat_tick;
    node_config.log_compact_threshold_entries = tuning.log_compact_threshold_entries;
    node_config.log_retain_entries = tuning.log_retain_entries;
    node_config.log_compact_threshold_bytes = tuning.log_compact_threshold_bytes;
    node_config
}

/// Must run inside a tokio runtime (the transport's tasks live there).
pub fn start<SM: StateMachine>(member: GroupMember<'_>, db: Arc<DB>, sm: SM, metrics: Arc<RaftMetrics>) -> Group<SM> {
    let snapshots = Arc::new(SnapshotDir::open(&member.snapshot_dir));
    let config = node_config(member.replica_id, member.tuning);
    let node = RaftNode::open(config, db, sm, member.peers, snapshots.clone(), metrics.clone());
    let transport = GrpcTransport::new(
        member.cluster.to_string(),
        member.group_id,
        member.replica_id,
        member.addr,
        tokio::runtime::Handle::current(),
        metrics,
        snapshots,
    );
    let sink: Arc<dyn MessageSink> = transport.clone();
    // The reporter is bound before the node thread starts so that every peer
    // task can report back; it reaches the node through a late-set handle.
    let slot: Arc<std::sync::OnceLock<DriverHandle<SM>>> = Arc::new(std::sync::OnceLock::new());
    let reporter_slot = slot.clone();
    transport.set_reporter(Arc::new(move |report| {
        let input = match report {
            Report::Unreachable(id) => Input::Unreachable(id),
            Report::Snapshot { replica_id, delivered } => Input::SnapshotReport { replica_id, delivered },
        };
        if let Some(handle) = reporter_slot.get() {
            handle.report(input);
        }
    }));
    let (handle, thread) = driver::spawn(node, sink);
    let _ = slot.set(handle.clone());
    Group { handle, thread, transport }
}

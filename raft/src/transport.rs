//! Raft messages between replicas over long-lived gRPC streams.
//!
//! One task per peer owns one client stream (`RaftTransport.Stream`) and
//! sends batches of encoded messages on it; when the stream breaks, the task
//! reports the peer unreachable and reconnects with a jittered backoff
//! (`RetryPolicy::PEER_RECONNECT`: a restarted replica is not met by every
//! peer at the same instant). Snapshots go
//! through `RaftTransport.SendSnapshot` in [`SNAPSHOT_CHUNK_BYTES`] chunks
//! read from their body file ([`crate::snapshot`]), and the outcome is
//! reported back to the node. Every queue is bounded;
//! Raft tolerates lost messages, so a full queue drops rather than blocks.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use cellbank_proto::cell::{RaftBatch, SnapshotChunk};
use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::driver::MessageSink;
use super::node::is_snapshot;
use super::snapshot::{BodyRef, SnapshotDir};
use crate::metrics::RaftMetrics;

/// Messages waiting for one peer's stream.
pub const PEER_QUEUE_MAX: usize = 8_192;
/// Messages per batch on the stream.
pub const MESSAGES_PER_BATCH_MAX: usize = 256;
/// Encoded bytes per batch on the stream (well under the gRPC limit).
pub const BATCH_BYTES_MAX: usize = 8 * 1024 * 1024;
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;
/// Largest snapshot a replica accepts.
pub const SNAPSHOT_BYTES_MAX: u64 = 4 * 1024 * 1024 * 1024;
/// Largest gRPC message on the internal services (a batch of appends).
pub const INTERNAL_MESSAGE_BYTES_MAX: usize = cellbank_client::channel::PEER_MESSAGE_BYTES_MAX;

/// What the transport tells the node about delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    Unreachable(u64),
    Snapshot { replica_id: u64, delivered: bool },
}

pub type Reporter = Arc<dyn Fn(Report) + Send + Sync>;

struct Peer {
    addr: String,
    tx: mpsc::Sender<Message>,
    task: tokio::task::JoinHandle<()>,
}

pub struct GrpcTransport {
    cluster: String,
    cell_id: u64,
    replica_id: u64,
    addr: String,
    runtime: tokio::runtime::Handle,
    peers: Mutex<HashMap<u64, Peer>>,
    reporter: Mutex<Option<Reporter>>,
    metrics: Arc<RaftMetrics>,
    snapshots: Arc<SnapshotDir>,
}

impl GrpcTransport {
    pub fn new(
        cluster: String,
        cell_id: u64,
        replica_id: u64,
        addr: String,
        runtime: tokio::runtime::Handle,
        metrics: Arc<RaftMetrics>,
        snapshots: Arc<SnapshotDir>,
    ) -> Arc<GrpcTransport> {
        Arc::new(GrpcTransport {
            cluster,
            cell_id,
            replica_id,
            addr,
            runtime,
            peers: Mutex::new(HashMap::new()),
            reporter: Mutex::new(None),
            metrics,
            snapshots,
        })
    }

    /// This replica's snapshot files (built ones are sent from here,
    /// received ones written here).
    pub fn snapshots(&self) -> &Arc<SnapshotDir> {
        &self.snapshots
    }

    pub fn set_reporter(&self, reporter: Reporter) {
        *self.reporter.lock().expect("reporter lock") = Some(reporter);
    }

    /// Learns a peer's address from a message it sent, if it is not known
    /// yet (a replica that joined has no address book until its snapshot).
    pub fn learn(&self, replica_id: u64, addr: &str) {
        if replica_id == self.replica_id || cellbank_client::planes::check_process_addr(addr).is_err() {
            return;
        }
        let mut peers = self.peers.lock().expect("peers lock");
        if peers.contains_key(&replica_id) {
            return;
        }
        self.start_peer(&mut peers, replica_id, addr.to_string());
    }

    fn start_peer(&self, peers: &mut HashMap<u64, Peer>, id: u64, addr: String) {
        let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
        let reporter = self.reporter.lock().expect("reporter lock").clone();
        let identity = Identity {
            cluster: self.cluster.clone(),
            cell_id: self.cell_id,
            replica_id: self.replica_id,
            addr: self.addr.clone(),
        };
        let task = self.runtime.spawn(run_peer(
            identity,
            id,
            addr.clone(),
            rx,
            reporter,
            self.metrics.clone(),
            self.snapshots.clone(),
        ));
        peers.insert(id, Peer { addr, tx, task });
    }

    fn report(&self, report: Report) {
        if let Some(reporter) = self.reporter.lock().expect("reporter lock").as_ref() {
            reporter(report);
        }
    }
}

impl MessageSink for GrpcTransport {
    fn send(&self, messages: Vec<Message>) {
        let peers = self.peers.lock().expect("peers lock");
        let mut reports = Vec::new();
        for message in messages {
            let to = message.to;
            let snapshot = is_snapshot(&message);
            // A drill's partition or loss: undelivered, as on a real network.
            let dropped = crate::faults::message("raft.send", to) == Some(crate::faults::Hit::Drop);
            let delivered = !dropped && peers.get(&to).map(|peer| peer.tx.try_send(message).is_ok()).unwrap_or(false);
            if !delivered {
                self.metrics.raft_messages_dropped_total.inc();
                // Raft waits for the outcome of every snapshot it sends.
                let report = if snapshot {
                    Report::Snapshot { replica_id: to, delivered: false }
                } else {
                    Report::Unreachable(to)
                };
                if !reports.contains(&report) {
                    reports.push(report);
                }
            }
        }
        drop(peers);
        for report in reports {
            self.report(report);
        }
    }

    fn set_peers(&self, wanted: &BTreeMap<u64, String>) {
        let mut peers = self.peers.lock().expect("peers lock");
        let mut stopped = Vec::new();
        peers.retain(|id, peer| {
            let keep = wanted.get(id) == Some(&peer.addr);
            if !keep {
                peer.task.abort();
                stopped.push(*id);
            }
            keep
        });
        // A snapshot may have been queued on a stopped task; raft waits for
        // its outcome (reporting a failure for a peer not receiving one is
        // harmless).
        for id in stopped {
            self.report(Report::Snapshot { replica_id: id, delivered: false });
        }
        for (id, addr) in wanted {
            if *id == self.replica_id || peers.contains_key(id) {
                continue;
            }
            self.start_peer(&mut peers, *id, addr.clone());
        }
    }
}

impl Drop for GrpcTransport {
    fn drop(&mut self) {
        for (_, peer) in self.peers.lock().expect("peers lock").drain() {
            peer.task.abort();
        }
    }
}

fn report(reporter: &Option<Reporter>, report: Report) {
    if let Some(reporter) = reporter {
        reporter(report);
    }
}

/// A channel to the peer plane of the process at `addr`, a member of
/// group `group_id` (its certificate must say so: a replica of that cell,
/// or a router for the routers' group 0).
pub async fn connect(addr: &str, group_id: u64) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use cellbank_client::tls::Expect;
    let expect = if group_id == 0 { Expect::Router } else { Expect::Replica(Some(group_id)) };
    cellbank_client::ChannelSettings::PEER.connect_to(&cellbank_client::planes::Plane::Peer.of(addr), expect).await
}

#[derive(Clone)]
struct Identity {
    cluster: String,
    cell_id: u64,
    replica_id: u64,
    addr: String,
}

async fn run_peer(
    identity: Identity,
    peer_id: u64,
    addr: String,
    mut rx: mpsc::Receiver<Message>,
    reporter: Option<Reporter>,
    metrics: Arc<RaftMetrics>,
    snapshots: Arc<SnapshotDir>,
) {
    let policy = cellbank_client::RetryPolicy::PEER_RECONNECT;
    let mut backoff = policy.backoff();
    loop {
        let channel = match connect(&addr, identity.cell_id).await {
            Ok(channel) => channel,
            Err(_) => {
                // Drop what queued up while the peer was down: raft resends.
                let mut dropped = 0;
                while let Ok(message) = rx.try_recv() {
                    dropped += 1;
                    if is_snapshot(&message) {
                        report(&reporter, Report::Snapshot { replica_id: peer_id, delivered: false });
                    }
                }
                if dropped > 0 {
                    metrics.raft_messages_dropped_total.inc_by(dropped);
                    report(&reporter, Report::Unreachable(peer_id));
                }
                tokio::time::sleep(backoff.next_delay(false)).await;
                continue;
            }
        };
        backoff = policy.backoff();
        let mut client = cellbank_client::channel::raft_transport(channel.clone());
        let (stream_tx, stream_rx) = mpsc::channel::<RaftBatch>(64);
        let call = tokio::spawn(async move { client.stream(ReceiverStream::new(stream_rx)).await });
        loop {
            let Some(first) = rx.recv().await else {
                call.abort();
                return;
            };
            let mut encoded = Vec::new();
            let mut encoded_bytes = 0;
            let mut next = Some(first);
            while let Some(message) = next.take() {
                if is_snapshot(&message) {
                    let snapshot = send_snapshot(
                        channel.clone(),
                        identity.clone(),
                        message,
                        reporter.clone(),
                        metrics.clone(),
                        snapshots.clone(),
                    );
                    tokio::spawn(snapshot);
                } else {
                    let bytes = message.write_to_bytes().expect("encode raft message");
                    encoded_bytes += bytes.len();
                    encoded.push(bytes);
                }
                if encoded.len() < MESSAGES_PER_BATCH_MAX && encoded_bytes < BATCH_BYTES_MAX {
                    next = rx.try_recv().ok();
                }
            }
            if encoded.is_empty() {
                continue;
            }
            if let Some(crate::faults::Hit::Delay(delay)) = crate::faults::message("raft.send", peer_id) {
                tokio::time::sleep(delay).await;
            }
            let mut batch = RaftBatch {
                cell_id: identity.cell_id,
                messages: encoded,
                from_replica_id: identity.replica_id,
                from_addr: identity.addr.clone(),
                cluster: identity.cluster.clone(),
                checksum: 0,
            };
            batch.checksum = cellbank_client::integrity::raft_batch(&batch);
            if stream_tx.send(batch).await.is_err() {
                report(&reporter, Report::Unreachable(peer_id));
                break;
            }
        }
        call.abort();
        tokio::time::sleep(backoff.next_delay(false)).await;
    }
}

/// Sends a snapshot: its message (with the body's reference) in the first
/// chunk, then the body read from its file a chunk at a time, two chunks
/// in memory at most.
async fn send_snapshot(
    channel: tonic::transport::Channel,
    identity: Identity,
    message: Message,
    reporter: Option<Reporter>,
    metrics: Arc<RaftMetrics>,
    snapshots: Arc<SnapshotDir>,
) {
    let to = message.to;
    let body = match BodyRef::decode(&message.get_snapshot().data) {
        Ok(body) => body,
        Err(error) => {
            tracing::error!(to, %error, "a snapshot to send has no body reference");
            report(&reporter, Report::Snapshot { replica_id: to, delivered: false });
            return;
        }
    };
    let path = snapshots.built(message.get_snapshot().get_metadata(), &body);
    let head = message.write_to_bytes().expect("encode snapshot message");
    let cell_id = identity.cell_id;
    let sealed = |mut chunk: SnapshotChunk| {
        chunk.checksum = cellbank_client::integrity::snapshot_chunk(&chunk);
        chunk
    };
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(2);
    let first =
        SnapshotChunk { cell_id, message: head, total_len: body.len, cluster: identity.cluster, ..Default::default() };
    // `rx` is held until the call below: the first chunk always fits.
    let _ = tx.send(sealed(first)).await;
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Read as _;
        let mut file = std::fs::File::open(&path)?;
        loop {
            let mut data = vec![0u8; SNAPSHOT_CHUNK_BYTES];
            let mut filled = 0;
            while filled < data.len() {
                let n = file.read(&mut data[filled..])?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                return Ok(());
            }
            data.truncate(filled);
            if tx.blocking_send(sealed(SnapshotChunk { cell_id, data, ..Default::default() })).is_err() {
                return Ok(());
            }
        }
    });
    let mut client = cellbank_client::channel::raft_transport(channel);
    let delivered = client.send_snapshot(ReceiverStream::new(rx)).await.is_ok();
    if let Ok(Err(error)) = reader.await {
        // The receiver got a short body and refused it.
        tracing::error!(to, %error, "cannot read a snapshot body to send");
    }
    if delivered {
        metrics.snapshots_sent_total.inc();
    }
    tracing::info!(to, bytes = body.len, delivered, "sent snapshot");
    report(&reporter, Report::Snapshot { replica_id: to, delivered });
}

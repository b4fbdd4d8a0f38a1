//! The `RaftTransport` service: receives peer messages and snapshots for one
//! Raft group (a ledger cell, or the routers' table group) and hands them to
//! its driver. Messages for another group or replica are refused or skipped;
//! a snapshot body is written to the replica's snapshot files as it
//! arrives, and one that cannot be installed is refused before raft sees it.

use std::sync::Arc;

use cellbank_proto::cell::raft_transport_server::RaftTransport;
use cellbank_proto::cell::{RaftBatch, SnapshotChunk, TransportAck};
use protobuf::Message as _;
use raft::eraftpb::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::driver::{DriverHandle, Input};
use crate::metrics::RaftMetrics;
use crate::transport::{GrpcTransport, SNAPSHOT_BYTES_MAX};
use crate::StateMachine;
use cellbank_client::integrity;

/// Peer messages and snapshots for one Raft group.
pub struct TransportService<SM: StateMachine> {
    /// The cluster's name: a message from another cluster is refused.
    pub cluster: String,
    pub group_id: u64,
    pub replica_id: u64,
    pub node: DriverHandle<SM>,
    pub transport: Arc<GrpcTransport>,
    pub metrics: Arc<RaftMetrics>,
    /// Bounds concurrent snapshot receives.
    pub snapshot_receives: Arc<tokio::sync::Semaphore>,
    /// While set (the data disk is nearly full), appends and snapshots are
    /// dropped: they would grow the disk. The leader resends them later.
    pub paused: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl<SM: StateMachine> TransportService<SM> {
    fn is_paused(&self) -> bool {
        self.paused.as_ref().is_some_and(|p| p.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Decodes one message; `None` for a message addressed to another
    /// replica (a peer's stale address book), which is skipped, not fatal.
    /// An append's entries must be ones the state machine can apply
    /// (`StateMachine::check_entry`): checked here, on the service's
    /// threads, rather than by `RaftNode::step` on the Raft thread.
    fn decode(&self, bytes: &[u8]) -> Result<Option<Message>, Status> {
        let message = Message::parse_from_bytes(bytes)
            .map_err(|e| Status::invalid_argument(format!("messages: not a raft message ({e})")))?;
        if message.to != self.replica_id {
            tracing::debug!(to = message.to, from = message.from, "skipping a raft message for another replica");
            self.metrics.raft_messages_dropped_total.inc();
            return Ok(None);
        }
        let appends = message.get_msg_type() == raft::eraftpb::MessageType::MsgAppend;
        for entry in message.entries.iter().filter(|_| appends) {
            if entry.get_entry_type() == raft::eraftpb::EntryType::EntryNormal && !entry.data.is_empty() {
                if let Err(why) = SM::check_entry(&entry.data) {
                    self.metrics.raft_messages_refused_total.inc();
                    return Err(Status::invalid_argument(format!(
                        "messages: entry {} from replica {} is not valid: {why}",
                        entry.index, message.from
                    )));
                }
            }
        }
        Ok(Some(message))
    }

    fn check_cell(&self, cell_id: u64) -> Result<(), Status> {
        if cell_id != self.group_id {
            return Err(Status::failed_precondition(format!(
                "cell_id: this replica belongs to group {}, not {cell_id}",
                self.group_id
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl<SM: StateMachine> RaftTransport for TransportService<SM> {
    async fn stream(&self, request: Request<Streaming<RaftBatch>>) -> Result<Response<TransportAck>, Status> {
        let mut stream = request.into_inner();
        while let Some(batch) = stream.message().await? {
            self.check_cell(batch.cell_id)?;
            integrity::check_cluster(&batch.cluster, &self.cluster)?;
            integrity::check(batch.checksum, integrity::raft_batch(&batch))?;
            // A drill's delay holds the whole batch once.
            if let Some(crate::faults::Hit::Delay(delay)) = crate::faults::message("raft.recv", batch.from_replica_id) {
                tokio::time::sleep(delay).await;
            }
            for bytes in &batch.messages {
                let Some(message) = self.decode(bytes)? else { continue };
                if message.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                    // A snapshot's body comes through SendSnapshot, which
                    // checks it into this replica's snapshot files.
                    self.metrics.raft_messages_refused_total.inc();
                    return Err(Status::invalid_argument("messages: a MsgSnapshot must come through SendSnapshot"));
                }
                if crate::faults::message("raft.recv", message.from) == Some(crate::faults::Hit::Drop) {
                    continue;
                }
                let grows_disk = matches!(
                    message.get_msg_type(),
                    raft::eraftpb::MessageType::MsgAppend | raft::eraftpb::MessageType::MsgSnapshot
                );
                if grows_disk && self.is_paused() {
                    self.metrics.raft_messages_dropped_total.inc();
                    continue;
                }
                if message.from == batch.from_replica_id {
                    self.transport.learn(batch.from_replica_id, &batch.from_addr);
                }
                // Messages the node refuses (`RaftNode::step`) are logged
                // and counted there. A full queue drops the message; raft
                // retransmits.
                let _ = self.node.send(Input::Raft(Box::new(message)));
            }
        }
        Ok(Response::new(TransportAck {}))
    }

    async fn send_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<TransportAck>, Status> {
        if self.is_paused() {
            return Err(Status::resource_exhausted("snapshot: this replica's data disk is nearly full"));
        }
        // One snapshot at a time: each may hold gigabytes. The permit is
        // released when this call returns, and it returns within
        // SNAPSHOT_RECEIVE_TIMEOUT whatever the sender does.
        let _permit = self
            .snapshot_receives
            .try_acquire()
            .map_err(|_| Status::resource_exhausted("another snapshot is being received"))?;
        match tokio::time::timeout(SNAPSHOT_RECEIVE_TIMEOUT, self.receive_snapshot(request.into_inner())).await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::warn!("a snapshot receive took longer than {SNAPSHOT_RECEIVE_TIMEOUT:?}: dropped");
                Err(Status::deadline_exceeded(format!("snapshot: not received within {SNAPSHOT_RECEIVE_TIMEOUT:?}")))
            }
        }
    }
}

/// Longest a snapshot receive may take (4 GiB at about 8 MiB/s); the sender
/// retries after that, and another sender may take the permit.
pub const SNAPSHOT_RECEIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
/// Longest wait for the next chunk of a snapshot.
pub const SNAPSHOT_CHUNK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl<SM: StateMachine> TransportService<SM> {
    /// The next chunk, checked, or the end of the stream.
    async fn next_chunk(&self, stream: &mut Streaming<SnapshotChunk>) -> Result<Option<SnapshotChunk>, Status> {
        let chunk = tokio::time::timeout(SNAPSHOT_CHUNK_TIMEOUT, stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded(format!("snapshot: no chunk for {SNAPSHOT_CHUNK_TIMEOUT:?}")))??;
        if let Some(chunk) = &chunk {
            integrity::check(chunk.checksum, integrity::snapshot_chunk(chunk))?;
        }
        Ok(chunk)
    }

    async fn receive_snapshot(&self, mut stream: Streaming<SnapshotChunk>) -> Result<Response<TransportAck>, Status> {
        let first =
            self.next_chunk(&mut stream).await?.ok_or_else(|| Status::invalid_argument("snapshot: empty stream"))?;
        self.check_cell(first.cell_id)?;
        integrity::check_cluster(&first.cluster, &self.cluster)?;
        let message = self
            .decode(&first.message)?
            .ok_or_else(|| Status::invalid_argument("message: snapshot for another replica"))?;
        if message.get_msg_type() != raft::eraftpb::MessageType::MsgSnapshot {
            return Err(Status::invalid_argument("message: not a MsgSnapshot"));
        }
        if first.total_len > SNAPSHOT_BYTES_MAX {
            return Err(Status::invalid_argument(format!(
                "total_len: {} exceeds {SNAPSHOT_BYTES_MAX}",
                first.total_len
            )));
        }
        let invalid = |e: crate::snapshot::SnapshotBodyError| Status::invalid_argument(format!("data: {e}"));
        let body = crate::snapshot::BodyRef::decode(&message.get_snapshot().data).map_err(invalid)?;
        if body.len != first.total_len {
            return Err(Status::invalid_argument(format!(
                "total_len: {} but the snapshot's body has {}",
                first.total_len, body.len
            )));
        }
        // The body goes to a file as it arrives, each pair checked (its
        // region, and the state machine's rule) on the blocking pool; a
        // body that cannot be installed is refused before raft sees it.
        let snapshots = self.transport.snapshots().clone();
        let metadata = message.get_snapshot().get_metadata().clone();
        let mut incoming =
            tokio::task::spawn_blocking(move || snapshots.receive(&metadata, body, SM::check_snapshot_pair))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(invalid)?;
        let mut data = first.data;
        loop {
            if !data.is_empty() {
                incoming = tokio::task::spawn_blocking(move || incoming.write(&data).map(|()| incoming))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(invalid)?;
            }
            match self.next_chunk(&mut stream).await? {
                Some(chunk) => data = chunk.data,
                None => break,
            }
        }
        tokio::task::spawn_blocking(move || incoming.finish())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(invalid)?;
        self.node.send(Input::Raft(Box::new(message))).map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(TransportAck {}))
    }
}

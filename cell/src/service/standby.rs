//! `Standby`: the standby side of replication. This cell's leader takes the
//! active's entries and proposes them into its own log, acknowledging each
//! batch once it is durable here.

use std::sync::atomic::Ordering;

use cellbank_proto::cell::standby_server::Standby as StandbyApi;
use cellbank_proto::cell::{
    command, ship_batch, Command, PairState, ShipAck, ShipBatch, ShipHello, SourceEntries, SourceSnapshotChunk,
};
use cellbank_proto::v1::*;
use tonic::{Request, Response, Status, Streaming};

use crate::context::{ReplicaContext, REQUEST_TIMEOUT_DEFAULT};
use crate::replication::ship_ack;
use cellbank_client::errors::with_epoch;
use cellbank_raft::driver::NodeError;
use cellbank_raft::node::ProposeError;

/// The standby side of replication: this cell's leader takes the active's
/// entries and proposes them into its own log.
pub struct StandbyService {
    pub context: ReplicaContext,
}

/// Shipped batches proposed and not yet acknowledged, per stream.
const STANDBY_IN_FLIGHT_MAX: usize = 32;

impl StandbyService {
    /// Checks a hello against this cell's pair state
    /// ([`crate::replication::check_hello`]).
    fn check_hello(&self, hello: &ShipHello) -> Result<PairState, Status> {
        let state = self.context.pair.borrow().clone();
        match crate::replication::check_hello(self.context.cell_id, &state, hello.source_cell_id, hello.epoch) {
            Ok(()) => Ok(state),
            Err(refusal) => Err(refusal_status(refusal)),
        }
    }
}

/// Only a replica of the cell a hello names as its source may ship as that
/// cell (the hello's source is then checked against the pair state). An
/// insecure server has no caller and skips this.
fn check_shipper(caller: Option<&cellbank_client::tls::Identity>, source_cell_id: u64) -> Result<(), Status> {
    match caller {
        None => Ok(()),
        Some(cellbank_client::tls::Identity::Replica { cell, .. }) if *cell == source_cell_id => Ok(()),
        Some(identity) => Err(cellbank_client::errors::denied(
            tonic::Code::PermissionDenied,
            &format!("{identity} may not ship as cell {source_cell_id}: only that cell's replicas may"),
            Some("/cellbank.cell.v1.Standby/Replicate"),
        )),
    }
}

/// Shipped entries are checked before they are proposed: the checksum, and
/// that each entry is a command batch this cell can apply. What fails ends
/// the stream and is never in the standby's log.
fn check_entries(shipped: &SourceEntries) -> Result<(), Status> {
    use cellbank_client::integrity;
    integrity::check(shipped.checksum, integrity::source_entries(shipped))?;
    crate::ledger::check_source_entries(shipped).map_err(|e| Status::invalid_argument(format!("entries: {e}")))
}

/// A shipped snapshot chunk's checksum and shape, before it is proposed.
fn check_snapshot_chunk(chunk: &SourceSnapshotChunk) -> Result<(), Status> {
    use cellbank_client::integrity;
    integrity::check(chunk.checksum, integrity::source_snapshot(chunk))?;
    crate::ledger::check_source_snapshot(chunk).map_err(|e| Status::invalid_argument(format!("snapshot: {e}")))
}

/// The status a refused hello (or keepalive) ends the stream with.
fn refusal_status(refusal: crate::replication::HelloRefusal) -> Status {
    match refusal {
        crate::replication::HelloRefusal::Superseded { epoch, detail } => {
            with_epoch(Status::failed_precondition(detail), epoch)
        }
        crate::replication::HelloRefusal::NotYet(detail) => Status::unavailable(detail),
    }
}

type AckStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<ShipAck, Status>> + Send>>;

/// One shipped message's outcome, in stream order: a proposal's outputs, or
/// (empty) a keepalive's.
type PendingAck = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<Result<Vec<TransferResult>, ProposeError>, tokio::sync::oneshot::error::RecvError>,
            > + Send,
    >,
>;

#[tonic::async_trait]
impl StandbyApi for StandbyService {
    type ReplicateStream = AckStream;

    async fn replicate(&self, request: Request<Streaming<ShipBatch>>) -> Result<Response<AckStream>, Status> {
        let context = self.context.clone();
        if !context.node.shared.is_leader.load(Ordering::Relaxed) {
            let leader_id = context.node.shared.leader_id.load(Ordering::Relaxed);
            return Err(context.unavailable(format!("replica {} is not the leader", context.replica_id), leader_id));
        }
        let caller = cellbank_client::gate::caller(&request).cloned();
        let refuser = cellbank_client::gate::refuser(&request);
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(ShipBatch { kind: Some(ship_batch::Kind::Hello(hello)) }) => hello,
            _ => return Err(Status::invalid_argument("the first message must be a hello")),
        };
        if let Err(status) = check_shipper(caller.as_ref(), hello.source_cell_id) {
            return Err(match &refuser {
                Some(refuser) => refuser.refuse("/cellbank.cell.v1.Standby/Replicate", status),
                None => status,
            });
        }
        cellbank_client::integrity::check_cluster(&hello.cluster, &context.cluster)?;
        self.check_hello(&hello)?;
        // Everything committed before the hello is applied before the
        // answer, so the source index it names is the one the log holds.
        context.within(REQUEST_TIMEOUT_DEFAULT, context.node.read_index()).await?;
        let state = self.check_hello(&hello)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<ShipAck, Status>>(STANDBY_IN_FLIGHT_MAX + 1);
        tx.try_send(Ok(ship_ack(&state))).expect("fresh channel has room");
        tokio::spawn(async move {
            let mut pending: futures::stream::FuturesOrdered<PendingAck> = futures::stream::FuturesOrdered::new();
            let mut inbound_open = true;
            loop {
                tokio::select! {
                    message = inbound.message(), if inbound_open && pending.len() < STANDBY_IN_FLIGHT_MAX => {
                        let command = match message {
                            Ok(Some(ShipBatch { kind: Some(ship_batch::Kind::Entries(entries)) })) => {
                                if let Err(status) = check_entries(&entries) {
                                    let _ = tx.send(Err(status)).await;
                                    return;
                                }
                                command::Kind::SourceEntries(entries)
                            }
                            Ok(Some(ShipBatch { kind: Some(ship_batch::Kind::Snapshot(chunk)) })) => {
                                if let Err(status) = check_snapshot_chunk(&chunk) {
                                    let _ = tx.send(Err(status)).await;
                                    return;
                                }
                                command::Kind::SourceSnapshot(chunk)
                            }
                            Ok(Some(ShipBatch { kind: Some(ship_batch::Kind::Hello(keepalive)) })) => {
                                // A keepalive: answered in order, if this
                                // replica still leads and this cell still is
                                // the source's standby
                                // (`replication::judge_keepalive`).
                                let is_leader = context.node.shared.is_leader.load(Ordering::Relaxed);
                                let state = context.pair.borrow().clone();
                                match crate::replication::judge_keepalive(context.cell_id, is_leader, &state, &keepalive) {
                                    crate::replication::Keepalive::Answer => {
                                        pending.push_back(Box::pin(async { Ok(Ok(Vec::new())) }))
                                    }
                                    crate::replication::Keepalive::NotLeader => {
                                        let leader_id = context.node.shared.leader_id.load(Ordering::Relaxed);
                                        let why = format!("replica {} is no longer the leader", context.replica_id);
                                        let _ = tx.send(Err(context.unavailable(why, leader_id))).await;
                                        return;
                                    }
                                    crate::replication::Keepalive::Refused(refusal) => {
                                        let _ = tx.send(Err(refusal_status(refusal))).await;
                                        return;
                                    }
                                }
                                continue;
                            }
                            Ok(Some(_)) => {
                                let _ = tx.send(Err(Status::invalid_argument("a message with nothing in it"))).await;
                                return;
                            }
                            Ok(None) | Err(_) => {
                                inbound_open = false;
                                continue;
                            }
                        };
                        // Queued now, in stream order, so the log holds the
                        // batches in the order they were shipped.
                        match context.node.propose_queued(vec![Command { kind: Some(command) }]) {
                            Ok(receiver) => pending.push_back(Box::pin(receiver)),
                            Err(e) => {
                                let _ = tx.send(Err(context.node_error(e))).await;
                                return;
                            }
                        }
                    }
                    done = futures::StreamExt::next(&mut pending), if !pending.is_empty() => {
                        let outcome = match done.expect("pending is not empty") {
                            // A keepalive's answer.
                            Ok(Ok(results)) if results.is_empty() => {
                                if context.node.shared.is_leader.load(Ordering::Relaxed) {
                                    Ok(ship_ack(&context.pair.borrow()))
                                } else {
                                    Err(Status::unavailable("this replica is no longer the leader"))
                                }
                            }
                            Ok(Ok(mut results)) => {
                                let result = results.pop().expect("one result per command");
                                if result.code == ResultCode::Ok as i32 {
                                    Ok(ship_ack(&context.pair.borrow()))
                                } else {
                                    let epoch = context.pair.borrow().epoch;
                                    Err(with_epoch(Status::failed_precondition(result.detail), epoch))
                                }
                            }
                            Ok(Err(e)) => Err(context.node_error(NodeError::Propose(e))),
                            Err(_) => Err(Status::unavailable("the replica is stopping")),
                        };
                        let failed = outcome.is_err();
                        if tx.send(outcome).await.is_err() || failed {
                            return;
                        }
                    }
                    else => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

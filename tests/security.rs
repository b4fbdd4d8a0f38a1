//! The attacker suite, over real sockets against a real cluster with mutual
//! TLS: callers with no certificate, a certificate of another CA, and valid
//! certificates of the wrong identity for each internal service are
//! refused with the right code, counted and audited, and nothing changes:
//! every replica's digest is the same afterwards and reconciliation passes.
//! Then throttling (a refused identity or address backs off exponentially,
//! an honest caller does not notice) and certificate reload.

// tonic::Status is the error of every call here.
#![allow(clippy::result_large_err)]

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellbank_client::planes::Plane;
use cellbank_client::tls::{Credentials, Identity};
use cellbank_client::ChannelSettings;
use cellbank_proto::cell::clearing_client::ClearingClient;
use cellbank_proto::cell::raft_transport_client::RaftTransportClient;
use cellbank_proto::cell::replica_admin_client::ReplicaAdminClient;
use cellbank_proto::cell::standby_client::StandbyClient;
use cellbank_proto::cell::{
    ship_batch, ChangeMembershipRequest, ConfigureRequest, CreditBatch, CreditCommand, CreditSender, PairState,
    RaftBatch, ShipBatch, ShipHello, SourceEntries, SourceSnapshotChunk, StatusRequest,
};
use cellbank_proto::router::courier_client::CourierClient;
use cellbank_proto::router::router_admin_client::RouterAdminClient;
use cellbank_proto::router::{AuditLogRequest, ClusterStatusRequest, FailoverRequest, PairMode, SwitchoverRequest};
use cellbank_proto::v1::ledger_client::LedgerClient;
use cellbank_proto::v1::GetAccountRequest;
use common::cluster::Cluster;
use tonic::transport::Channel;
use tonic::Code;

fn identity(path: &str) -> Identity {
    Identity::parse(&format!("cellbank://{}/{path}", common::CLUSTER)).unwrap()
}

fn as_identity(path: &str) -> Arc<Credentials> {
    common::credentials_of(path)
}

/// A certificate naming `path` from a CA the cluster never saw.
fn from_another_ca(dir: &std::path::Path, path: &str) -> Arc<Credentials> {
    let identity = identity(path);
    cellbank::certs::ensure(dir, common::CLUSTER, std::slice::from_ref(&identity)).unwrap();
    Credentials::load(cellbank::certs::paths(dir, &identity)).unwrap()
}

async fn channel(addr: &str, credentials: Option<&Arc<Credentials>>) -> Result<Channel, tonic::transport::Error> {
    ChannelSettings::SERVICE.connect_as(addr, credentials).await
}

/// A channel from a given local address (loopback has all of 127/8).
async fn channel_from(addr: &str, credentials: &Arc<Credentials>, local: IpAddr) -> Result<Channel, tonic::Status> {
    ChannelSettings::SERVICE
        .endpoint(addr)
        .unwrap()
        .connect_with_connector(cellbank_client::tls::connector(
            credentials.clone(),
            Some(local),
            cellbank_client::tls::Expect::Any,
        ))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))
}

/// A channel to `addr`, or UNAVAILABLE when none could be made.
async fn channel_or_status(addr: &str, credentials: &Arc<Credentials>) -> Result<Channel, tonic::Status> {
    channel(addr, Some(credentials)).await.map_err(|e| tonic::Status::unavailable(e.to_string()))
}

/// Asserts that a call on a connection the server refused to keep failed
/// at the transport, never with an answer from a handler: UNAVAILABLE when
/// the connection was gone before the call was sent, UNKNOWN or CANCELLED
/// (hyper's word for a request whose connection closed under it) when it
/// went while the call was on it. Why is in the server's metrics and audit
/// trail, which the callers check.
fn assert_connection_refused(result: Result<(), tonic::Status>) {
    let status = result.expect_err("the call was let in");
    assert!(matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled), "{status:?}");
    assert!(cellbank_client::errors::reason(&status).is_none(), "a handler answered: {status:?}");
}

fn code_of<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> Code {
    match result {
        Ok(answer) => panic!("the call was let in: {answer:?}"),
        Err(status) => status.code(),
    }
}

fn hello(source_cell_id: u64, epoch: u64) -> ShipBatch {
    let cluster = common::CLUSTER.into();
    ShipBatch { kind: Some(ship_batch::Kind::Hello(ShipHello { source_cell_id, epoch, cluster })) }
}

fn sealed_entries(source_cell_id: u64, epoch: u64, entries: Vec<Vec<u8>>) -> ShipBatch {
    let mut batch = SourceEntries { source_cell_id, epoch, first_index: 1, entries, checksum: 0 };
    batch.checksum = cellbank_client::integrity::source_entries(&batch);
    ShipBatch { kind: Some(ship_batch::Kind::Entries(batch)) }
}

/// Ships `batches` to `addr` as `credentials`; the acks, or the status the
/// stream ended with.
async fn ship(addr: &str, credentials: &Arc<Credentials>, batches: Vec<ShipBatch>) -> Result<usize, tonic::Status> {
    let ch = channel(&Plane::Peer.of(addr), Some(credentials)).await.unwrap();
    let mut acks = StandbyClient::new(ch).replicate(futures::stream::iter(batches)).await?.into_inner();
    let mut count = 0;
    while acks.message().await?.is_some() {
        count += 1;
    }
    Ok(count)
}

fn sealed_raft(cell_id: u64, from_replica_id: u64, messages: Vec<raft::eraftpb::Message>) -> RaftBatch {
    let messages = messages.iter().map(|m| protobuf::Message::write_to_bytes(m).unwrap()).collect();
    let cluster = common::CLUSTER.into();
    let mut batch = RaftBatch { cell_id, messages, from_replica_id, from_addr: String::new(), cluster, checksum: 0 };
    batch.checksum = cellbank_client::integrity::raft_batch(&batch);
    batch
}

fn forged_credit(source_pair_id: u64, cell_id: u64, to_user_id: u64, dest_pair_id: u64) -> CreditBatch {
    CreditBatch {
        sender: Some(CreditSender { source_pair_id, cell_id, epoch: 1 }),
        credits: vec![CreditCommand {
            source_pair_id,
            seq: 1,
            to_user_id,
            dest_pair_id,
            currency: "CNY".into(),
            amount: 1_000_000_000,
            ..Default::default()
        }],
    }
}

/// Every replica's ledger digest, of every cell. (Not the applied index:
/// entries that change no ledger key, such as a new leader's empty entry,
/// may apply meanwhile.)
async fn digests(cluster: &Cluster, cells: u64) -> Vec<String> {
    let mut out = Vec::new();
    for cell in 1..=cells {
        out.extend(cluster.digests(cell).await.into_iter().map(|d| d.digest));
    }
    out
}

fn logs(cluster: &Cluster) -> String {
    cluster.sup.ids().into_iter().filter_map(|id| std::fs::read_to_string(cluster.sup.log_path(id)?).ok()).collect()
}

async fn wait_ready(cluster: &Cluster) {
    for pair in 1..=2 {
        cluster.wait_for_mode(pair, PairMode::Sync, Duration::from_secs(60)).await;
    }
}

fn with_metrics(topology: &mut cellbank::supervisor::Topology) {
    for process in topology.routers.iter_mut().chain(topology.cells.iter_mut().flat_map(|c| c.replicas.iter_mut())) {
        process.metrics = Some(format!("127.0.0.1:{}", common::free_port()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_wrong_caller_is_refused_counted_and_audited_and_nothing_changes() {
    let cluster = Cluster::start(1, 2, with_metrics);
    wait_ready(&cluster).await;
    let client = cluster.client();
    let users: Vec<u64> = (1..=8).collect();
    common::open_and_seed(&client, &users, "CNY", 10_000).await;
    cluster.assert_pair_identical(1, Duration::from_secs(30)).await;
    cluster.assert_pair_identical(2, Duration::from_secs(30)).await;
    let before = digests(&cluster, 4).await;
    assert_eq!(before.len(), 12, "every replica answers: {before:?}");

    let router = cluster.routers()[0].clone();
    let cell = |c: u64| cluster.sup.cell_endpoints(c)[0].clone();
    let table = cluster.status().await.unwrap().table.unwrap();
    let user_in_pair_2 =
        users.iter().copied().find(|u| cellbank_router::table::route(&table, *u).unwrap().pair_id == 2);
    let victim = user_in_pair_2.expect("a user of pair 2");

    // No certificate at all: no TLS handshake, no call.
    let plain = match channel(&router, None).await {
        Ok(channel) => LedgerClient::new(channel)
            .get_account(GetAccountRequest { user_id: 1, currency: "CNY".into() })
            .await
            .map(|_| ())
            .map_err(|s| s.code()),
        Err(_) => Err(Code::Unavailable),
    };
    assert!(plain.is_err(), "a plaintext call was answered");

    // A router's identity from another CA: the handshake fails.
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign = from_another_ca(foreign_dir.path(), "router/1");
    assert!(channel(&router, Some(&foreign)).await.is_err(), "another CA's certificate was let in");
    assert!(channel(&cell(1), Some(&foreign)).await.is_err(), "another CA's certificate was let in");

    // A service calling the internal services of a cell: it may not even
    // hold a connection to the cell's peer or admin plane (refused after
    // the handshake, so the call is never read).
    let service = |name: &str| as_identity(&format!("service/{name}"));
    let peer = |addr: &str| Plane::Peer.of(addr);
    let admin = |addr: &str| Plane::Admin.of(addr);
    let credit = forged_credit(2, 2, 1, 1);
    let minted = match channel_or_status(&peer(&cell(1)), &service("minter")).await {
        Ok(ch) => ClearingClient::new(ch).apply_credits(credit.clone()).await.map(|_| ()),
        Err(status) => Err(status),
    };
    assert_connection_refused(minted);
    let huge_term = ConfigureRequest {
        cell_id: 1,
        state: Some(PairState { coordinator_term: u64::MAX, ..Default::default() }),
        ..Default::default()
    };
    let usurped = match channel_or_status(&admin(&cell(1)), &service("usurper")).await {
        Ok(ch) => ReplicaAdminClient::new(ch).configure(huge_term.clone()).await.map(|_| ()),
        Err(status) => Err(status),
    };
    assert_connection_refused(usurped);
    let batch = RaftBatch { cell_id: 1, messages: vec![vec![0xff; 64]], from_replica_id: 9, ..Default::default() };
    let raft = match channel_or_status(&peer(&cell(1)), &service("raft-forger")).await {
        Ok(ch) => RaftTransportClient::new(ch).stream(futures::stream::iter(vec![batch])).await.map(|_| ()),
        Err(status) => Err(status),
    };
    assert_connection_refused(raft);
    let shipped = match channel_or_status(&peer(&cell(3)), &service("shipper")).await {
        Ok(ch) => StandbyClient::new(ch).replicate(futures::stream::iter(vec![hello(1, 1)])).await.map(|_| ()),
        Err(status) => Err(status),
    };
    assert_connection_refused(shipped);
    // An operator may connect to a cell's client plane, but the admin
    // calls are not served there: refused naming the plane that serves them.
    let ch = channel(&cell(1), Some(&as_identity("operator/lost"))).await.unwrap();
    let status = ReplicaAdminClient::new(ch).status(StatusRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("served on the admin plane"), "{status:?}");

    // A replica of the other pair shipping to pair 1's standby as cell 1.
    let ch = channel(&peer(&cell(3)), Some(&as_identity("cell/2/replica/1"))).await.unwrap();
    let shipped = StandbyClient::new(ch).replicate(futures::stream::iter(vec![hello(1, 1)])).await;
    assert_eq!(code_of(shipped), Code::PermissionDenied);
    // A replica of a cell of this group calling RaftTransport of another cell.
    let ch = channel(&peer(&cell(1)), Some(&as_identity("cell/2/replica/2"))).await.unwrap();
    let batch = RaftBatch { cell_id: 1, from_replica_id: 2, ..Default::default() };
    let raft = RaftTransportClient::new(ch).stream(futures::stream::iter(vec![batch])).await;
    assert_eq!(code_of(raft), Code::PermissionDenied);

    // Integrity, from the right identities: cell 1 (pair 1's active)
    // shipping to its standby (cell 3) a poison entry (not a command
    // batch), a corrupt checksum, a snapshot chunk outside the ledger, or a
    // hello naming another cluster. Each ends the stream before anything is
    // proposed.
    let epoch = table.pairs.iter().find(|p| p.pair_id == 1).expect("pair 1").epoch;
    let active = as_identity("cell/1/replica/1");
    let mut standby_leader = None;
    for addr in cluster.sup.cell_endpoints(3) {
        match ship(&addr, &active, vec![hello(1, epoch)]).await {
            Ok(_) => standby_leader = Some(addr),
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        }
    }
    let standby_leader = standby_leader.expect("cell 3 has a leader that takes cell 1's hello");
    let poison = ship(&standby_leader, &active, vec![hello(1, epoch), sealed_entries(1, epoch, vec![vec![0xff; 16]])]);
    let status = poison.await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("not a command batch"), "{status:?}");
    let mut corrupt = sealed_entries(1, epoch, vec![Vec::new()]);
    if let Some(ship_batch::Kind::Entries(entries)) = &mut corrupt.kind {
        entries.checksum ^= 1;
    }
    let status = ship(&standby_leader, &active, vec![hello(1, epoch), corrupt]).await.unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    let mut outside = SourceSnapshotChunk {
        source_cell_id: 1,
        epoch,
        snapshot_index: 1,
        keys: vec![b"\x00raft".to_vec()],
        values: vec![vec![1]],
        ..Default::default()
    };
    outside.checksum = cellbank_client::integrity::source_snapshot(&outside);
    let chunk = ShipBatch { kind: Some(ship_batch::Kind::Snapshot(outside)) };
    let status = ship(&standby_leader, &active, vec![hello(1, epoch), chunk]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut foreign_hello = hello(1, epoch);
    if let Some(ship_batch::Kind::Hello(hello)) = &mut foreign_hello.kind {
        hello.cluster = "another".into();
    }
    let status = ship(&standby_leader, &active, vec![foreign_hello]).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // A heartbeat that commits past a follower's log, in the follower's
    // term from its leader's id, sealed and sent as a replica of its cell:
    // raft-rs would abort the process; the follower refuses it and serves on.
    let mut follower = None;
    for addr in cluster.sup.cell_endpoints(1) {
        let ch = ChannelSettings::SERVICE.connect(&admin(&addr)).await.unwrap();
        let status = ReplicaAdminClient::new(ch).status(StatusRequest {}).await.unwrap().into_inner();
        if status.leader_id != 0 && status.leader_id != status.replica_id {
            follower = Some((addr, status));
        }
    }
    let (follower_addr, follower_status) = follower.expect("cell 1 has a follower");
    let follower_id = follower_status.replica_id;
    let mut heartbeat = raft::eraftpb::Message::default();
    heartbeat.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
    heartbeat.to = follower_status.replica_id;
    heartbeat.from = follower_status.leader_id;
    heartbeat.term = follower_status.term;
    heartbeat.commit = follower_status.last_log_index + 1_000;
    let ch = channel(&peer(&follower_addr), Some(&as_identity("cell/1/replica/9"))).await.unwrap();
    let batch = sealed_raft(1, follower_status.leader_id, vec![heartbeat]);
    RaftTransportClient::new(ch).stream(futures::stream::iter(vec![batch])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ch = ChannelSettings::SERVICE.connect(&admin(&follower_addr)).await.unwrap();
    ReplicaAdminClient::new(ch).status(StatusRequest {}).await.expect("the follower still serves");
    // Counted by the same process (a restarted one would count from 0).
    let follower_metrics =
        cluster.sup.metrics_addr(cellbank::supervisor::ProcessId::Replica { cell: 1, replica: follower_id }).unwrap();
    let refused = common::metric(&follower_metrics, "cellbank_raft_messages_refused_total", "").await;
    assert!(refused >= Some(1), "the forged heartbeat is counted: {refused:?}");

    // A router changing a cell's membership; an operator forging a
    // coordinator's Configure with a huge term.
    let ch = channel(&admin(&cell(1)), Some(&as_identity("router/1"))).await.unwrap();
    let add = ChangeMembershipRequest { action: 1, replica_id: 9, addr: "127.0.0.1:1".into() };
    assert_eq!(code_of(ReplicaAdminClient::new(ch).change_membership(add).await), Code::PermissionDenied);
    let ch = channel(&admin(&cell(1)), Some(&as_identity("operator/mallory"))).await.unwrap();
    assert_eq!(code_of(ReplicaAdminClient::new(ch).configure(huge_term).await), Code::PermissionDenied);

    // Forged credits at the router: a service, and a replica of cell 1
    // claiming to be cell 2 (pair 2's active) to credit a user of pair 2.
    let forged = forged_credit(1, 1, victim, 2);
    let delivered = match channel_or_status(&peer(&router), &service("courier-forger")).await {
        Ok(ch) => CourierClient::new(ch).deliver_credits(forged).await.map(|_| ()),
        Err(status) => Err(status),
    };
    assert_connection_refused(delivered);
    let ch = channel(&peer(&router), Some(&as_identity("cell/1/replica/3"))).await.unwrap();
    let forged = forged_credit(2, 2, victim, 2);
    assert_eq!(code_of(CourierClient::new(ch).deliver_credits(forged).await), Code::PermissionDenied);
    // The standby of pair 1 (cell 3) delivering as itself: not the active.
    let ch = channel(&peer(&router), Some(&as_identity("cell/3/replica/1"))).await.unwrap();
    let forged = forged_credit(1, 3, victim, 2);
    assert_eq!(code_of(CourierClient::new(ch).deliver_credits(forged).await), Code::FailedPrecondition);

    // A service forcing a failover: on the router's admin plane it cannot
    // connect; on the client plane, where it may, the call is refused.
    let failover = FailoverRequest { pair_id: 1, force: true, who: "operator".into(), why: "x".into() };
    let forced = match channel_or_status(&admin(&router), &service("failover-forcer")).await {
        Ok(ch) => RouterAdminClient::new(ch).failover(failover.clone()).await.map(|_| ()),
        Err(status) => Err(status),
    };
    assert_connection_refused(forced);
    let ch = channel(&router, Some(&service("failover-forcer"))).await.unwrap();
    assert_eq!(code_of(RouterAdminClient::new(ch).failover(failover).await), Code::PermissionDenied);

    // Counted on the router and the cells' first replicas.
    let router_metrics = cluster.sup.metrics_addr(cellbank::supervisor::ProcessId::Router(1)).unwrap();
    let denied = common::metric(&router_metrics, "cellbank_calls_denied_total", "PermissionDenied").await;
    assert!(denied >= Some(2), "router denials counted: {denied:?}");
    let refused = common::metric(&router_metrics, "cellbank_tls_handshakes_refused_total", "failed").await;
    assert!(refused >= Some(2), "router handshakes refused: {refused:?}");
    let refused = common::metric(&router_metrics, "cellbank_tls_handshakes_refused_total", "wrong_plane").await;
    assert!(refused >= Some(2), "router connections refused on their plane: {refused:?}");
    let cell_1 = cluster.sup.metrics_addr(cellbank::supervisor::ProcessId::Replica { cell: 1, replica: 1 }).unwrap();
    let denied = common::metric(&cell_1, "cellbank_calls_denied_total", "PermissionDenied").await;
    assert!(denied >= Some(4), "cell 1 denials counted: {denied:?}");
    let refused = common::metric(&cell_1, "cellbank_tls_handshakes_refused_total", "wrong_plane").await;
    assert!(refused >= Some(3), "cell 1 connections refused on their plane: {refused:?}");

    // Audited with the peer's address and identity.
    let text = logs(&cluster);
    for who in [
        "operator/lost",
        "router/1",
        "operator/mallory",
        "service/failover-forcer",
        // Refused by the handlers: a sender or a source cell not the caller's.
        "cell/1/replica/3",
        "cell/2/replica/1",
    ] {
        let line = text
            .lines()
            .find(|l| l.contains("call_denied") && l.contains(&format!("cellbank://local/{who}")))
            .unwrap_or_else(|| panic!("no audit line for {who}"));
        assert!(line.contains("peer=127.0.0.1:"), "{line}");
    }
    assert!(text.contains("connection_refused"), "refused handshakes are audited");
    for who in ["service/minter", "service/usurper", "service/raft-forger", "service/shipper", "service/courier-forger"]
    {
        let line = text
            .lines()
            .find(|l| l.contains("connection_refused") && l.contains(&format!("cellbank://local/{who}")))
            .unwrap_or_else(|| panic!("no audit line for {who}'s connection"));
        assert!(line.contains("peer=127.0.0.1") && line.contains("wrong_plane"), "{line}");
    }

    // A client that knows whom it dials refuses another process answering
    // there: a replica's certificate does not pass for a router's, nor one
    // cell's for another's.
    use cellbank_client::tls::Expect;
    let error = ChannelSettings::OPERATOR.connect_to(&admin(&cell(1)), Expect::Router).await.unwrap_err();
    assert!(format!("{error:?}").contains("not a router"), "{error:?}");
    assert!(ChannelSettings::OPERATOR.connect_to(&admin(&cell(1)), Expect::Replica(Some(2))).await.is_err());
    assert!(ChannelSettings::OPERATOR.connect_to(&admin(&cell(1)), Expect::Replica(Some(1))).await.is_ok());
    assert!(ChannelSettings::OPERATOR.connect_to(&admin(&router), Expect::Router).await.is_ok());

    // Nothing changed anywhere, and the books reconcile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(digests(&cluster, 4).await, before, "a replica's ledger changed");
    let status = cluster.status().await.unwrap();
    let report = cellbank::reconcile::reconcile(&status, &cellbank::reconcile::Options::default()).await;
    assert!(report.ok(), "{:#?}", report.discrepancies);

    // The operator's own action is audited under the identity its
    // certificate proves, whatever name the request gives.
    let ch = channel(&admin(&router), Some(&as_identity("operator/alice"))).await.unwrap();
    let mut admin = RouterAdminClient::new(ch);
    let switchover = SwitchoverRequest { pair_id: 2, who: "mallory".into(), why: "drill".into() };
    admin.switchover(switchover).await.expect("an operator may switch over");
    let log = admin.audit_log(AuditLogRequest::default()).await.unwrap().into_inner();
    let last = log.records.last().expect("an audit record");
    assert_eq!(last.who, "cellbank://local/operator/alice", "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_caller_backs_off_exponentially_and_an_honest_one_is_untouched() {
    let cluster = Cluster::start(1, 1, |_| {});
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(60)).await;
    let router = cluster.routers()[0].clone();
    let operator = as_identity("operator/honest");
    let honest = channel(&Plane::Admin.of(&router), Some(&operator)).await.unwrap();
    let mut honest = RouterAdminClient::new(honest);
    // A service may connect to the router's client plane, where the
    // admin calls it tries are refused.
    let brute = channel(&router, Some(&as_identity("service/brute"))).await.unwrap();
    let mut brute = RouterAdminClient::new(brute);

    // Each refused call bars the identity for twice as long as the last.
    let mut bars = Vec::new();
    for _ in 0..5 {
        let status = brute.status(ClusterStatusRequest {}).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let barred = brute.status(ClusterStatusRequest {}).await.unwrap_err();
        assert_eq!(barred.code(), Code::ResourceExhausted, "{barred:?}");
        let left = cellbank_client::errors::retry_delay(&barred).expect("RetryInfo on a throttled call");
        bars.push(left);
        // The honest operator, on its own connection, is answered at once.
        let asked = Instant::now();
        honest.status(ClusterStatusRequest {}).await.expect("the honest caller is answered");
        assert!(asked.elapsed() < Duration::from_secs(1), "the honest caller waited {:?}", asked.elapsed());
        tokio::time::sleep(left + Duration::from_millis(20)).await;
    }
    println!("bars after each refused call: {bars:?}");
    for (n, pair) in bars.windows(2).enumerate() {
        // Doubling, less the moments between the refusal and the probe.
        assert!(pair[1] > pair[0] + pair[0] / 2, "bar {n} {:?} then {:?}", pair[0], pair[1]);
    }
    assert!(bars[4] > Duration::from_millis(1_000), "{bars:?}");

    // Failed handshakes hold their address back: past the free allowance,
    // a good certificate from 127.0.0.2 waits for the bar (100 ms) before
    // its handshake starts, while 127.0.0.1 connects at once.
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign = from_another_ca(foreign_dir.path(), "operator/honest");
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    // Failures on one plane hold the address back on every plane.
    for _ in 0..=cellbank_client::tls::HANDSHAKE_FAILURES_FREE {
        assert!(channel_from(&router, &foreign, other).await.is_err());
    }
    let router = Plane::Admin.of(&router);
    let asked = Instant::now();
    let ch = channel_from(&router, &operator, local).await.expect("another address is not held back");
    let honest_connect = asked.elapsed();
    RouterAdminClient::new(ch).status(ClusterStatusRequest {}).await.expect("answered");
    let asked = Instant::now();
    let ch = channel_from(&router, &operator, other).await.expect("let in after the bar");
    let barred_connect = asked.elapsed();
    RouterAdminClient::new(ch).status(ClusterStatusRequest {}).await.expect("answered after the bar");
    println!("connect: honest address {honest_connect:?}, barred address {barred_connect:?}");
    assert!(barred_connect >= Duration::from_millis(50), "the barred address waited only {barred_connect:?}");
    assert!(honest_connect < Duration::from_millis(50), "the honest address waited {honest_connect:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificates_are_used_without_a_restart() {
    // A server of its own, on the cluster's TLS stack: renew every file
    // (a new CA), and new connections follow while the process runs.
    let dir = tempfile::tempdir().unwrap();
    let server_id = identity("router/7");
    let client_id = identity("operator/reload");
    cellbank::certs::ensure(dir.path(), common::CLUSTER, &[server_id.clone(), client_id.clone()]).unwrap();
    let server_credentials = Credentials::load(cellbank::certs::paths(dir.path(), &server_id)).unwrap();
    let old_client = Credentials::load(cellbank::certs::paths(dir.path(), &client_id)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (on_handshake_refused, on_denied) = cellbank_raft::metrics::security_observers(&prometheus::Registry::new());
    let policy = cellbank_client::gate::Policy::new(
        cellbank_client::gate::Member::Routers,
        &[
            (Plane::Client, "/grpc.health.v1.Health/", cellbank_client::gate::Allow::ANYONE),
            (Plane::Client, "/cellbank.v1.Ledger/", cellbank_client::gate::Allow::OPERATORS),
        ],
    );
    let security = cellbank_client::server::Security::new(
        Some(server_credentials.clone()),
        policy,
        on_handshake_refused,
        on_denied,
    );
    let (mut server, incoming) = cellbank_client::server::secured(listener, Plane::Client, &security);
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(server.add_service(health).serve_with_incoming(incoming));
    let check = |credentials: Arc<Credentials>| {
        let addr = addr.clone();
        async move {
            let channel =
                channel(&addr, Some(&credentials)).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                .await
                .map(|_| ())
        }
    };
    check(old_client.clone()).await.expect("the first certificates work");

    // A new CA and new certificates in place of the old files.
    std::fs::remove_file(dir.path().join("ca.pem")).unwrap();
    std::fs::remove_file(dir.path().join("ca.key")).unwrap();
    let renewed = tempfile::tempdir().unwrap();
    cellbank::certs::ensure(renewed.path(), common::CLUSTER, &[server_id.clone(), client_id.clone()]).unwrap();
    for file in ["ca.pem", "router-7.pem", "router-7.key"] {
        std::fs::copy(renewed.path().join(file), dir.path().join(file)).unwrap();
    }
    server_credentials.check_now();
    let new_client = Credentials::load(cellbank::certs::paths(renewed.path(), &client_id)).unwrap();
    check(new_client).await.expect("the renewed certificates are used");
    assert!(check(old_client).await.is_err(), "the old CA's client is refused after the renewal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_does_only_what_its_scope_allows_and_a_new_policy_applies_without_a_restart() {
    use cellbank_proto::v1::{DepositRequest, GetTransferRequest, TransferRequest};
    let cluster = Cluster::start(1, 1, |t| t.routers[0].metrics = Some(format!("127.0.0.1:{}", common::free_port())));
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(60)).await;
    let policy = cluster.sup.topology.policy_path();
    let scoped = r#"
[service.payments]
operations = ["open_account", "transfer", "submit_transfers", "get_account", "get_transfer"]
debit_users = [[1, 4]]
[service.payroll]
operations = ["transfer", "get_transfer"]
debit_users = [[3, 4]]
[service.reporting]
operations = ["get_account"]
"#;
    std::fs::write(&policy, scoped).unwrap();
    let users: Vec<u64> = (1..=6).collect();
    common::open_and_seed(&cluster.client(), &users, "CNY", 10_000).await;
    // The routers look at the file at most once a second.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let router = cluster.routers()[0].clone();
    let ledger = |path: &str| {
        let credentials = as_identity(path);
        let router = router.clone();
        async move { LedgerClient::new(channel(&router, Some(&credentials)).await.unwrap()) }
    };
    let transfer = |id: &str, from: u64, to: u64| TransferRequest {
        transfer_id_text: id.into(),
        from_user_id: from,
        to_user_id: to,
        currency: "CNY".into(),
        amount: 100,
        ..Default::default()
    };
    let deposit = |id: &str| DepositRequest {
        transfer_id_text: id.into(),
        user_id: 1,
        currency: "CNY".into(),
        amount: 5,
        ..Default::default()
    };
    let account = |user: u64| GetAccountRequest { user_id: user, currency: "CNY".into() };

    let mut payments = ledger("service/payments").await;
    payments.transfer(transfer("scoped-1", 1, 2)).await.expect("inside its scope");
    let refused = payments.transfer(transfer("scoped-2", 5, 1)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("may not debit user 5: rule service.payments.debit_users"), "{refused:?}");
    let refused = payments.deposit(deposit("scoped-3")).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("rule service.payments.operations"), "{refused:?}");

    let mut reporting = ledger("service/reporting").await;
    reporting.get_account(account(5)).await.expect("read-only may read");
    let refused = reporting.transfer(transfer("scoped-4", 3, 4)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = ledger("service/stranger").await.get_account(account(1)).await.unwrap_err();
    assert!(refused.message().contains("names no such service"), "{refused:?}");

    // Transfer ids are per service: payroll's "scoped-1" is its own
    // transfer, not a duplicate of payments'; each service finds its own
    // under the id it gave; an operator sees both under their namespaces
    // and may not write into one.
    let mut payroll = ledger("service/payroll").await;
    let theirs = payroll.transfer(transfer("scoped-1", 3, 4)).await.expect("its own id").into_inner();
    let theirs = theirs.result.unwrap();
    assert_eq!((theirs.code, theirs.duplicate), (cellbank_proto::v1::ResultCode::Ok as i32, false), "{theirs:?}");
    let lookup = |id: &str| GetTransferRequest { transfer_id_text: id.into(), ..Default::default() };
    let mine = payments.get_transfer(lookup("scoped-1")).await.unwrap().into_inner().transfer.unwrap();
    assert_eq!((mine.from_user_id, mine.to_user_id, mine.transfer_id.as_slice()), (1, 2, &b"scoped-1"[..]));
    let theirs = payroll.get_transfer(lookup("scoped-1")).await.unwrap().into_inner().transfer.unwrap();
    assert_eq!((theirs.from_user_id, theirs.to_user_id, theirs.transfer_id.as_slice()), (3, 4, &b"scoped-1"[..]));
    let operator_ledger = ledger("operator/alice").await;
    let missing = operator_ledger.clone().get_transfer(lookup("scoped-1")).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let found = operator_ledger.clone().get_transfer(lookup("svc:payments:scoped-1")).await.unwrap().into_inner();
    assert_eq!(found.transfer.unwrap().from_user_id, 1);
    let intrusion = operator_ledger.clone().transfer(transfer("svc:payroll:next", 1, 2)).await.unwrap_err();
    assert_eq!(intrusion.code(), Code::InvalidArgument, "{intrusion:?}");

    // Nothing refused was applied.
    let operator = Arc::new(cluster.client());
    let balance = |user: u64| {
        let operator = operator.clone();
        async move { operator.get_account(account(user)).await.unwrap().balance }
    };
    assert_eq!(balance(5).await, 10_000);
    assert_eq!(balance(1).await, 9_900);
    assert_eq!(balance(2).await, 10_100);
    assert_eq!(balance(3).await, 9_900);
    assert_eq!(balance(4).await, 10_100);

    // A new policy applies to the next call, with no restart.
    std::fs::write(
        &policy,
        scoped.replace("operations = [\"get_account\"]", "operations = [\"get_account\", \"deposit\"]"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    reporting.deposit(deposit("scoped-5")).await.expect("allowed by the new policy");
    assert_eq!(balance(1).await, 9_905);

    // The service's opt-in coalescer: its callers' transfers leave as one
    // SubmitTransfers call, which the scope refuses whole for the one
    // caller debiting user 5; they are sent again one by one, and only
    // that caller is refused.
    let router_metrics = cluster.sup.metrics_addr(cellbank::supervisor::ProcessId::Router(1)).expect("router metrics");
    let calls = |method: &'static str, code: &'static str| {
        let router_metrics = router_metrics.clone();
        async move {
            let label = format!("code=\"{code}\",method=\"{method}\"");
            common::metric(&router_metrics, "cellbank_grpc_server_handled_total", &label).await.unwrap_or(0)
        }
    };
    let (refused_before, unary_before) =
        (calls("SubmitTransfers", "PermissionDenied").await, calls("Transfer", "OK").await);
    let coalescer =
        cellbank_client::ledger::TransferCoalescer::new(ledger("service/payments").await, Default::default());
    let mut requests: Vec<TransferRequest> = (0..30).map(|i| transfer(&format!("co-{i}"), 1, 2)).collect();
    requests.insert(15, transfer("co-outside", 5, 1));
    let answers =
        futures::future::join_all(requests.into_iter().map(|r| coalescer.transfer(r, Duration::from_secs(30)))).await;
    for (position, answer) in answers.iter().enumerate().filter(|(position, _)| *position != 15) {
        let answer = answer.as_ref().unwrap_or_else(|e| panic!("transfer {position}: {e:?}"));
        assert_eq!(answer.code, cellbank_proto::v1::ResultCode::Ok as i32, "{answer:?}");
    }
    let refused = answers[15].as_ref().unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("may not debit user 5"), "{refused:?}");
    // The batch was refused whole, then its 30 other transfers went alone.
    assert!(calls("SubmitTransfers", "PermissionDenied").await > refused_before, "a batch was refused whole");
    assert!(calls("Transfer", "OK").await >= unary_before + 30, "the others went again one by one");
    assert_eq!(balance(1).await, 9_905 - 3_000);
    assert_eq!(balance(2).await, 10_100 + 3_000);
    assert_eq!(balance(5).await, 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_failover_that_may_lose_writes_needs_a_second_operator() {
    let mut cluster = Cluster::start(1, 1, |_| {});
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(60)).await;
    // The standby lost: the pair turns DEGRADED, and a forced failover now
    // could lose what only the active holds.
    cluster.sup.kill_cell(2);
    cluster.wait_for_mode(1, PairMode::Degraded, Duration::from_secs(30)).await;
    let router = cluster.routers()[0].clone();
    let admin = |path: &str| {
        let credentials = as_identity(path);
        let router = router.clone();
        async move { RouterAdminClient::new(channel(&Plane::Admin.of(&router), Some(&credentials)).await.unwrap()) }
    };
    let force = || FailoverRequest { pair_id: 1, force: true, who: String::new(), why: "drill".into() };
    let held = admin("operator/alice").await.failover(force()).await.unwrap_err();
    assert_eq!(held.code(), Code::FailedPrecondition);
    assert!(held.message().contains("needs a second operator"), "{held:?}");
    let again = admin("operator/alice").await.failover(force()).await.unwrap_err();
    assert!(again.message().contains("a different operator must approve it"), "{again:?}");
    // A second operator lets it through to the coordinator, which judges
    // the failover itself (here: the standby is dead, nothing to promote).
    let approved = admin("operator/bob").await.failover(force()).await.unwrap_err();
    assert!(!approved.message().contains("second operator"), "{approved:?}");
    assert!(!approved.message().contains("different operator"), "{approved:?}");
    let table = cluster.status().await.unwrap().table.unwrap();
    assert_eq!(table.pairs[0].active_cell_id, 1, "the active is unchanged");
}

//! Assembles one replica: RocksDB, the Raft node thread, the transport, the
//! gRPC servers of its three planes (client: Ledger; peer: RaftTransport,
//! Standby, Clearing; admin: ReplicaAdmin, FaultPoints; health on each,
//! reflection on the client plane) and the metrics endpoint.
//! [`Replica::stop`] shuts it down in order.

use std::sync::Arc;

use cellbank_client::gate::{Allow, Member, Policy, OPEN_RULES};
use cellbank_client::planes::Plane;
use cellbank_client::server::{Listeners, Security, Serving};
use cellbank_proto::cell::clearing_server::ClearingServer;
use cellbank_proto::cell::raft_transport_server::RaftTransportServer;
use cellbank_proto::cell::replica_admin_server::ReplicaAdminServer;
use cellbank_proto::cell::standby_server::StandbyServer;
use cellbank_proto::v1::ledger_server::LedgerServer;

use crate::clearing::ClearingService;
use crate::config::ReplicaConfig;
use crate::context::ReplicaContext;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::replication::{Replication, Shipper, SHIP_MESSAGE_BYTES_MAX};
use crate::service::{AdminService, LedgerService, StandbyService};
use cellbank_raft::driver::DriverHandle;
use cellbank_raft::group::{self, Group, GroupMember};
use cellbank_raft::service::TransportService;
use cellbank_raft::storage::open_db;
use cellbank_raft::transport::{GrpcTransport, INTERNAL_MESSAGE_BYTES_MAX};

/// Largest client request (a full SubmitTransfers batch is well under this).
pub const CLIENT_MESSAGE_BYTES_MAX: usize = cellbank_client::MESSAGE_BYTES_MAX;

pub struct Replica {
    pub node: DriverHandle<Ledger>,
    pub metrics: Arc<Metrics>,
    pub addr: std::net::SocketAddr,
    serving: Option<Serving>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    shipper_task: tokio::task::JoinHandle<()>,
    health_task: tokio::task::JoinHandle<()>,
    courier_task: tokio::task::JoinHandle<()>,
    expiry_task: tokio::task::JoinHandle<()>,
    disk_task: tokio::task::JoinHandle<()>,
    thread: Option<std::thread::JoinHandle<()>>,
    _transport: Arc<GrpcTransport>,
}

/// Who may call what on a replica, on which plane (see
/// [`cellbank_client::gate`] and [`cellbank_client::planes`]).
pub fn policy(cell_id: u64) -> Policy {
    let own = [
        // Services go through the routers, where their scopes are
        // enforced; operators may ask a cell directly.
        (Plane::Client, "/cellbank.v1.Ledger/", Allow::ROUTERS.or(Allow::OPERATORS)),
        // Raft messages from the other replicas of this cell only.
        (Plane::Peer, "/cellbank.cell.v1.RaftTransport/", Allow::GROUP),
        // Any replica may open the stream; the hello's source cell must
        // be the caller's, and the pair state's (StandbyService).
        (Plane::Peer, "/cellbank.cell.v1.Standby/", Allow::REPLICAS),
        // Credits, envelope grabs and sends come through the routers.
        (Plane::Peer, "/cellbank.cell.v1.Clearing/", Allow::ROUTERS),
        (Plane::Admin, "/cellbank.cell.v1.ReplicaAdmin/", Allow::ROUTERS.or(Allow::OPERATORS)),
        (Plane::Admin, "/cellbank.cell.v1.ReplicaAdmin/Configure", Allow::ROUTERS),
        // A slice's move: the coordinator's steps only.
        (Plane::Admin, "/cellbank.cell.v1.ReplicaAdmin/FreezeSlice", Allow::ROUTERS),
        (Plane::Admin, "/cellbank.cell.v1.ReplicaAdmin/ThawSlice", Allow::ROUTERS),
        (Plane::Admin, "/cellbank.cell.v1.ReplicaAdmin/ExportSlice", Allow::ROUTERS),
        (Plane::Admin, "/cellbank.cell.v1.ReplicaAdmin/ImportSlice", Allow::ROUTERS),
        (Plane::Admin, "/cellbank.cell.v1.ReplicaAdmin/ChangeMembership", Allow::OPERATORS),
        (Plane::Admin, "/cellbank.cell.v1.ReplicaAdmin/TransferLeader", Allow::OPERATORS),
        (Plane::Admin, "/cellbank.cell.v1.FaultPoints/", Allow::OPERATORS),
    ];
    Policy::new(Member::Cell(cell_id), &[&OPEN_RULES[..], &own[..]].concat())
}

pub async fn start(config: ReplicaConfig) -> anyhow::Result<Replica> {
    config.check()?;
    let credentials = cellbank_client::tls::server_credentials(
        config.tls.as_ref(),
        config.insecure,
        &config.cluster,
        &format!("cell/{}/replica/{}", config.cell_id, config.replica_id),
    )?;
    // This process's own calls (Raft, shipping, the courier) go out with
    // the same certificate.
    cellbank_client::tls::use_credentials(credentials.clone());
    std::fs::create_dir_all(&config.data_dir)?;
    let metrics = Metrics::new(config.cell_id, config.replica_id);
    let db = open_db(&config.data_dir.join("rocksdb"));
    let disk = crate::disk::DiskWatch::new(&config.data_dir, config.min_free_bytes, &metrics.raft.registry);
    let listeners = Listeners::bind(config.listen).await?;
    let addr = listeners.addr;
    let pair_view: crate::ledger::PairView = Arc::new(tokio::sync::watch::Sender::new(crate::ledger::pair::unpaired()));
    let settling_until: crate::ledger::SettleUntil = Arc::new(std::sync::Mutex::new(None));
    let pair_history: crate::ledger::PairHistory = Arc::default();
    let ledger = Ledger::with_view(db.clone(), pair_view.clone(), pair_history.clone(), settling_until.clone());
    let member = GroupMember {
        cluster: &config.cluster,
        group_id: config.cell_id,
        replica_id: config.replica_id,
        addr: config.advertised(addr),
        tuning: &config.raft,
        peers: &config.peers,
        snapshot_dir: config.data_dir.join("snapshots"),
    };
    let Group { handle, thread, transport } = group::start(member, db.clone(), ledger, metrics.raft.clone());

    let replication = Arc::new(Replication::new(pair_history));
    let context = ReplicaContext {
        cluster: config.cluster.clone(),
        cell_id: config.cell_id,
        replica_id: config.replica_id,
        addr: config.advertised(addr),
        node: handle.clone(),
        db: db.clone(),
        metrics: metrics.clone(),
        transport: transport.clone(),
        snapshot_receives: Arc::new(tokio::sync::Semaphore::new(1)),
        pair: pair_view.clone(),
        replication: replication.clone(),
        settling_until,
        disk: disk.clone(),
    };
    let shipper = Arc::new(Shipper {
        cluster: config.cluster.clone(),
        cell_id: config.cell_id,
        node: handle.clone(),
        db: db.clone(),
        pair: pair_view,
        replication,
    });
    let shipper_task = tokio::spawn(shipper.run());
    let (mut health_reporter, health_service) = tonic_health::server::health_reporter();
    // Not serving until readiness says otherwise (the health service would
    // otherwise answer SERVING for the whole server from the start).
    health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    let readiness: cellbank_raft::metrics::Readiness = {
        let (shared, db, lag_max) = (handle.shared.clone(), db.clone(), config.raft.ready_lag_entries);
        let disk = disk.clone();
        Arc::new(move || {
            shared.readiness(lag_max)?;
            // A follower below its disk watermark drops appends: it falls
            // behind without hearing how far (a leader then refuses writes
            // itself, and stays the cell's leader).
            if disk.is_low() && !shared.is_leader.load(std::sync::atomic::Ordering::Relaxed) {
                return Err("the data disk is below its free-space watermark: appends are dropped".into());
            }
            match db.get(cellbank_raft::storage::INSTALLING_KEY) {
                Ok(None) => Ok(()),
                Ok(Some(_)) => Err("installing a snapshot".into()),
                Err(e) => Err(format!("cannot read the store: {e}")),
            }
        })
    };
    let health_task = tokio::spawn(cellbank_client::server::follow_readiness(
        health_reporter,
        vec![<LedgerServer<LedgerService> as tonic::server::NamedService>::NAME],
        readiness.clone(),
    ));
    let (reflection, reflection_alpha) = cellbank_client::server::reflection_services()?;
    let ledger = LedgerServer::new(LedgerService { context: context.clone() })
        .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(CLIENT_MESSAGE_BYTES_MAX);
    let transport_service = RaftTransportServer::new(TransportService {
        cluster: config.cluster.clone(),
        group_id: config.cell_id,
        replica_id: config.replica_id,
        node: handle.clone(),
        transport: transport.clone(),
        metrics: metrics.raft.clone(),
        snapshot_receives: context.snapshot_receives.clone(),
        paused: Some(disk.low_flag()),
    })
    .max_decoding_message_size(INTERNAL_MESSAGE_BYTES_MAX);
    let standby = StandbyServer::new(StandbyService { context: context.clone() })
        .max_decoding_message_size(SHIP_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(SHIP_MESSAGE_BYTES_MAX);
    let clearing = ClearingServer::new(ClearingService { context: context.clone() })
        .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(CLIENT_MESSAGE_BYTES_MAX);
    let courier_task = tokio::spawn(crate::clearing::run_courier(context.clone(), config.routers.clone()));
    let expiry_task = tokio::spawn(crate::clearing::run_expiry(context.clone()));
    let disk_task = tokio::spawn(disk.run());
    // Reconciliation asks about many outbox entries at once.
    let admin = ReplicaAdminServer::new(AdminService { context })
        .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(cellbank_client::channel::AUDIT_MESSAGE_BYTES_MAX);
    let faults = cellbank_raft::faults::FaultService { admin_token: config.admin_token.clone() };
    let faults = cellbank_proto::cell::fault_points_server::FaultPointsServer::new(faults);
    let (on_handshake_refused, on_denied) = cellbank_raft::metrics::security_observers(&metrics.raft.registry);
    let security = Security::new(credentials, policy(config.cell_id), on_handshake_refused, on_denied)
        .observing_calls(cellbank_raft::metrics::call_observer(&metrics.raft.registry));
    let serving = cellbank_client::server::serve(listeners, &security, |plane, mut server| match plane {
        Plane::Client => server
            .add_service(health_service.clone())
            .add_service(reflection.clone())
            .add_service(reflection_alpha.clone())
            .add_service(ledger.clone()),
        Plane::Peer => server
            .add_service(health_service.clone())
            .add_service(transport_service.clone())
            .add_service(standby.clone())
            .add_service(clearing.clone()),
        Plane::Admin => {
            server.add_service(health_service.clone()).add_service(admin.clone()).add_service(faults.clone())
        }
    });
    let metrics_task = match config.metrics_listen {
        Some(metrics_addr) => {
            let listener = cellbank_raft::metrics::bind(metrics_addr).await?;
            let endpoint =
                cellbank_raft::metrics::Endpoint { registry: metrics.raft.registry.clone(), ready: readiness };
            Some(tokio::spawn(cellbank_raft::metrics::serve(listener, endpoint)))
        }
        None => None,
    };
    tracing::info!(cell = config.cell_id, replica = config.replica_id, %addr, data = %config.data_dir.display(), "replica started");
    Ok(Replica {
        node: handle,
        metrics,
        addr,
        serving: Some(serving),
        metrics_task,
        shipper_task,
        health_task,
        courier_task,
        expiry_task,
        disk_task,
        thread: Some(thread),
        _transport: transport,
    })
}

impl Replica {
    /// Stops serving, stops the Raft thread, and closes the database.
    pub async fn stop(mut self) {
        if let Some(serving) = self.serving.take() {
            serving.stop(std::time::Duration::from_secs(2)).await;
        }
        if let Some(task) = self.metrics_task.take() {
            task.abort();
        }
        self.shipper_task.abort();
        self.health_task.abort();
        self.courier_task.abort();
        self.expiry_task.abort();
        self.disk_task.abort();
        self.node.shutdown();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

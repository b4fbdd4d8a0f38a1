//! Assembles one router: RocksDB for the table's log, the table group's
//! Raft node, the connections to the cells, the coordinator, and the gRPC
//! servers of its three planes: client (the front door,
//! `cellbank.v1.Ledger`, and reflection), peer (the table group's Raft
//! transport, the courier of credits out of cells) and admin (the admin
//! API); health on each.

use std::sync::Arc;

use cellbank_client::gate::{Allow, Member, Policy, OPEN_RULES};
use cellbank_client::planes::Plane;
use cellbank_client::server::{Listeners, Security, Serving};
use cellbank_client::MESSAGE_BYTES_MAX;
use cellbank_proto::cell::raft_transport_server::RaftTransportServer;
use cellbank_proto::router::router_admin_server::RouterAdminServer;
use cellbank_proto::router::RoutingTable;
use cellbank_proto::v1::ledger_server::LedgerServer;
use cellbank_raft::driver::DriverHandle;
use cellbank_raft::group::{self, Group, GroupMember};
use cellbank_raft::metrics::{self, RaftMetrics};
use cellbank_raft::service::TransportService;
use cellbank_raft::storage::open_db;
use cellbank_raft::transport::{GrpcTransport, INTERNAL_MESSAGE_BYTES_MAX};

use crate::admin::AdminService;
use crate::cells::CellPool;
use crate::config::RouterConfig;
use crate::coordinator::Coordinator;
use crate::front::Front;
use crate::metrics::RouterMetrics;
use crate::table::{TableMachine, TableView};

/// The routers' Raft group id on the transport (cells start at 1).
pub const ROUTER_GROUP_ID: u64 = 0;

pub struct Router {
    pub node: DriverHandle<TableMachine>,
    pub addr: std::net::SocketAddr,
    pub table: TableView,
    serving: Option<Serving>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _transport: Arc<GrpcTransport>,
}

/// Who may call what on a router, on which plane (see
/// [`cellbank_client::gate`] and [`cellbank_client::planes`]).
pub fn policy() -> Policy {
    let own = [
        (Plane::Client, "/cellbank.v1.Ledger/", Allow::SERVICES.or(Allow::OPERATORS)),
        // Credits leave cells through the routers.
        (Plane::Peer, "/cellbank.router.v1.Courier/", Allow::REPLICAS),
        // The routing table's Raft group: the other routers only.
        (Plane::Peer, "/cellbank.cell.v1.RaftTransport/", Allow::GROUP),
        (Plane::Admin, "/cellbank.router.v1.RouterAdmin/", Allow::OPERATORS),
    ];
    Policy::new(Member::Routers, &[&OPEN_RULES[..], &own[..]].concat())
}

pub async fn start(config: RouterConfig) -> anyhow::Result<Router> {
    config.check()?;
    let credentials = cellbank_client::tls::server_credentials(
        config.tls.as_ref(),
        config.insecure,
        &config.cluster,
        &format!("router/{}", config.router_id),
    )?;
    // This router's calls to the cells and the other routers go out with
    // the same certificate.
    cellbank_client::tls::use_credentials(credentials.clone());
    std::fs::create_dir_all(&config.data_dir)?;
    let metrics = Arc::new(RaftMetrics::with_labels(&[("router", config.router_id)]));
    let db = open_db(&config.data_dir.join("rocksdb"));
    let listeners = Listeners::bind(config.listen).await?;
    let addr = listeners.addr;
    let table: TableView = Arc::new(tokio::sync::watch::Sender::new(RoutingTable::default()));
    let machine = TableMachine::new(Some(db.clone()), table.clone());
    let drift = crate::table::config_drift(&config.seed_table(), &table.borrow());
    if !drift.is_empty() {
        tracing::warn!(
            "this router's config differs from the routing table it holds, and the table wins (the config only \
             seeds a new table; add cells with `cellbank admin add-pair`, replace replicas with `cellbank admin \
             replace-replica`): {}",
            drift.join("; ")
        );
    }
    let member = GroupMember {
        cluster: &config.cluster,
        group_id: ROUTER_GROUP_ID,
        replica_id: config.router_id,
        addr: config.peers.get(&config.router_id).cloned().unwrap_or_else(|| addr.to_string()),
        tuning: &config.raft,
        peers: &config.peers,
        snapshot_dir: config.data_dir.join("snapshots"),
    };
    let Group { handle, thread, transport } = group::start(member, db.clone(), machine, metrics.clone());
    let router_metrics = RouterMetrics::register(&metrics.registry);
    let pool = CellPool::with_metrics(table.clone(), Some(router_metrics.clone()));
    let busiest = pool.clone();
    metrics
        .registry
        .register(Box::new(crate::metrics::HotSlices::new(move || busiest.load().counters())))
        .expect("register the busiest slices");
    let coordinator =
        Coordinator::new(handle.clone(), pool.clone(), config.coordinator.clone(), config.seed_table(), router_metrics);
    let mut tasks = vec![tokio::spawn(coordinator.clone().run())];

    let (mut health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    // A router can route once it holds a table (bootstrapped, or caught
    // up from the routers' log after a restart).
    let readiness: metrics::Readiness = {
        let table = table.clone();
        Arc::new(move || if table.borrow().slice_count > 0 { Ok(()) } else { Err("no routing table yet".into()) })
    };
    tasks.push(tokio::spawn(cellbank_client::server::follow_readiness(
        health_reporter,
        vec![<LedgerServer<Front> as tonic::server::NamedService>::NAME],
        readiness.clone(),
    )));
    let (reflection, reflection_alpha) = cellbank_client::server::reflection_services()?;
    let courier = cellbank_proto::router::courier_server::CourierServer::new(crate::courier::CourierService {
        pool: pool.clone(),
    })
    .max_decoding_message_size(MESSAGE_BYTES_MAX)
    .max_encoding_message_size(MESSAGE_BYTES_MAX);
    let scopes = Arc::new(crate::scopes::Scopes::load(config.policy.clone())?);
    let front = LedgerServer::new(Front::new(pool.clone(), config.forbid_own_grab, scopes))
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX);
    let admin = RouterAdminServer::new(AdminService {
        router_id: config.router_id,
        node: handle.clone(),
        coordinator,
        db,
        admin_token: config.admin_token.clone(),
        fault_injection: config.fault_injection,
        approvals: Default::default(),
    });
    let transport_service = RaftTransportServer::new(TransportService {
        cluster: config.cluster.clone(),
        group_id: ROUTER_GROUP_ID,
        replica_id: config.router_id,
        node: handle.clone(),
        transport: transport.clone(),
        metrics: metrics.clone(),
        snapshot_receives: Arc::new(tokio::sync::Semaphore::new(1)),
        paused: None,
    })
    .max_decoding_message_size(INTERNAL_MESSAGE_BYTES_MAX);
    let (on_handshake_refused, on_denied) = metrics::security_observers(&metrics.registry);
    let security = Security::new(credentials, policy(), on_handshake_refused, on_denied)
        .observing_calls(metrics::call_observer(&metrics.registry));
    let serving = cellbank_client::server::serve(listeners, &security, |plane, mut server| match plane {
        Plane::Client => server
            .add_service(health_service.clone())
            .add_service(reflection.clone())
            .add_service(reflection_alpha.clone())
            .add_service(front.clone()),
        Plane::Peer => server
            .add_service(health_service.clone())
            .add_service(courier.clone())
            .add_service(transport_service.clone()),
        Plane::Admin => server.add_service(health_service.clone()).add_service(admin.clone()),
    });
    if let Some(metrics_addr) = config.metrics_listen {
        let listener = metrics::bind(metrics_addr).await?;
        let endpoint = metrics::Endpoint { registry: metrics.registry.clone(), ready: readiness };
        tasks.push(tokio::spawn(metrics::serve(listener, endpoint)));
    }
    tracing::info!(router = config.router_id, %addr, data = %config.data_dir.display(), "router started");
    Ok(Router { node: handle, addr, table, serving: Some(serving), tasks, thread: Some(thread), _transport: transport })
}

impl Router {
    pub async fn stop(mut self) {
        if let Some(serving) = self.serving.take() {
            serving.stop(std::time::Duration::from_secs(2)).await;
        }
        for task in &self.tasks {
            task.abort();
        }
        self.node.shutdown();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}
